//! The HTTPS webhook server and the plain-HTTP metrics server.

mod batching;
pub mod budget;
pub mod decision_log;
pub mod listen;
mod routes;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::BoxFuture;

use crate::admission::RequestView;
use crate::memory::MemoryPool;
use crate::metrics::Metrics;
use crate::policy::PolicySet;
use crate::rules::{Rule, StaticFacts};

pub use listen::{ListenError, Listening, Running, drain_on, listen};
pub use routes::{metrics_router, webhook_router};
pub use tls::serve_tls;

/// What requests are evaluated against; swapped atomically as a whole, so a request finishes
/// on the snapshot it started with.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The policies in force.
    pub policies: PolicySet,
    /// What the rules know beyond the request.
    pub facts: StaticFacts,
}

/// Whether the server should receive traffic: policies loaded, certificate served, not
/// shutting down.
#[derive(Debug)]
pub struct Readiness {
    policies_loaded: AtomicBool,
    certificate_loaded: AtomicBool,
    /// The namespace and node caches have been filled once.
    caches_synced: AtomicBool,
    /// The GMSACredentialSpec cache has been filled once (needed only while a gMSA policy is
    /// in force: clusters without the CRD never fill it).
    credential_specs_synced: AtomicBool,
    shutting_down: AtomicBool,
    /// Turns true with `shutting_down`: the webhook server then asks every connection to go.
    draining: tokio::sync::watch::Sender<bool>,
    /// Bumped by every setter, so a task that acts on readiness (the webhooks' failure policy)
    /// wakes when it may have changed instead of polling.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            policies_loaded: AtomicBool::new(false),
            certificate_loaded: AtomicBool::new(false),
            caches_synced: AtomicBool::new(false),
            credential_specs_synced: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            draining: tokio::sync::watch::Sender::new(false),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Readiness {
    /// Marks the policy set as loaded.
    pub fn set_policies_loaded(&self) {
        self.policies_loaded.store(true, Ordering::Release);
        self.changed();
    }

    /// Whether the policy set has been loaded.
    pub fn is_policies_loaded(&self) -> bool {
        self.policies_loaded.load(Ordering::Acquire)
    }

    /// Marks the caches the rules read as filled: until then a replica would deny valid gMSA
    /// pods ("does not exist"), apply namespaceSelector policies everywhere, and refuse
    /// bindings to nodes it has not listed yet.
    pub fn set_caches_synced(&self) {
        self.caches_synced.store(true, Ordering::Release);
        self.changed();
    }

    /// Marks the GMSACredentialSpec cache as filled.
    pub fn set_credential_specs_synced(&self) {
        self.credential_specs_synced.store(true, Ordering::Release);
        self.changed();
    }

    /// Whether the server is ready for the policies in force: with a gMSA policy, the
    /// GMSACredentialSpec cache must be filled too.
    pub fn is_ready_for(&self, policies: &PolicySet) -> bool {
        let needs_specs = policies.policies().iter().any(|p| matches!(p.rule, Rule::Gmsa(_)));
        self.is_ready() && (!needs_specs || self.credential_specs_synced.load(Ordering::Acquire))
    }

    /// Marks the serving certificate as loaded.
    pub fn set_certificate_loaded(&self) {
        self.set_certificate_ready(true);
    }

    /// Sets whether the served certificate is valid and trusted by the webhooks' CA bundle.
    pub fn set_certificate_ready(&self, ready: bool) {
        self.certificate_loaded.store(ready, Ordering::Release);
        self.changed();
    }

    /// Marks the server as draining: readiness turns false so endpoints stop routing here.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.draining.send_replace(true);
        self.changed();
    }

    /// Follows whether the server is shutting down (true from the start of the shutdown delay).
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Wakes on every readiness setter call (the value is a counter; read readiness itself
    /// with [`Readiness::is_ready_for`]).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether the server is ready.
    pub fn is_ready(&self) -> bool {
        self.policies_loaded.load(Ordering::Acquire)
            && self.certificate_loaded.load(Ordering::Acquire)
            && self.caches_synced.load(Ordering::Acquire)
            && !self.shutting_down.load(Ordering::Acquire)
    }
}

/// Looks up what the rules need to know about the cluster for one request (namespace labels,
/// then what the policies that apply ask for: credential specs, node OSes, the pod a binding
/// names, `use` authorizations), so that evaluation itself stays pure.
pub trait FactSource: Send + Sync + std::fmt::Debug {
    /// The facts for this request under `policies`.
    fn gather<'a>(
        &'a self,
        view: &'a RequestView,
        policies: &'a PolicySet,
    ) -> BoxFuture<'a, StaticFacts>;
}

/// Reads what registries serve for the images a request's policies ask about
/// (imageProvenance), so that evaluation itself stays pure.
pub trait ImageSource: Send + Sync + std::fmt::Debug {
    /// The facts for `keys` ([`crate::rules::provenance::lookup_key`]s) and the verdicts on
    /// their signatures under the trusts in `signatures`, each image within the source's
    /// deadline, pulled with the matching one of `credentials` (the pod's imagePullSecrets),
    /// on behalf of `namespace` (the object's, `""` for none: reads are shared out by it), all
    /// within the deadline from `arrived`, when the request arrived.
    fn lookup<'a>(
        &'a self,
        keys: &'a std::collections::BTreeSet<String>,
        signatures: &'a std::collections::BTreeSet<(String, crate::signature::TrustRef)>,
        credentials: &'a [crate::pull_secrets::RegistryCredential],
        namespace: &'a str,
        arrived: std::time::Instant,
    ) -> BoxFuture<'a, crate::rules::provenance::RegistryFacts>;
}

/// State shared by every request.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The policy snapshot in force.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// Cluster facts; `None` in standalone mode, where the snapshot's facts are used.
    pub facts: Option<Arc<dyn FactSource>>,
    /// Registry access for imageProvenance; `None` when registries are not read.
    pub images: Option<Arc<dyn ImageSource>>,
    /// The memory pool webhook requests share with registry reads; `None`: the webhook router
    /// makes one of its [`Limits::request_budget`] (no registry reads share it).
    pub memory: Option<MemoryPool>,
}

impl AppState {
    /// State with an initial snapshot.
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(Readiness::default()),
            facts: None,
            images: None,
            memory: None,
        }
    }

    /// The same state, its webhook requests charged to `pool` (which the registry reads of
    /// [`Self::images`] should share: build both from the same [`Limits::request_budget`]).
    #[must_use]
    pub fn with_memory(mut self, pool: MemoryPool) -> Self {
        self.memory = Some(pool);
        self
    }

    /// The same state, reading registries through `source`.
    #[must_use]
    pub fn with_images(mut self, source: Arc<dyn ImageSource>) -> Self {
        self.images = Some(source);
        self
    }

    /// The same state, looking facts up from `source`.
    #[must_use]
    pub fn with_facts(mut self, source: Arc<dyn FactSource>) -> Self {
        self.facts = Some(source);
        self
    }
}

/// Limits that protect the server from slow or oversized clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed to receive a request's headers.
    pub header_timeout: Duration,
    /// Time allowed to read a body and answer; then 408.
    pub request_timeout: Duration,
    /// Time allowed for a body to arrive once its headers have (then 408); capped at the
    /// request timeout. The apiserver sends a review at once: a slow body is hostile, and it
    /// holds its share of the memory budget while it trickles in.
    pub body_timeout: Duration,
    /// Connections served at once, at most; more are closed on accept. The slots actually
    /// served are also bounded by the memory budget ([`Limits::connection_slots`]).
    pub max_connections: usize,
    /// Connections one client IP may hold at once; `None`: three quarters of the slots
    /// ([`Limits::connections_per_client`]).
    pub max_connections_per_client: Option<usize>,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// An HTTP/2 connection with no request in flight for this long is closed (GOAWAY).
    /// HTTP/1.1 keep-alive connections close sooner, after `header_timeout` without a request.
    pub idle_timeout: Duration,
    /// Time between HTTP/2 PINGs to a peer.
    pub keep_alive_interval: Duration,
    /// A peer that does not acknowledge a PING within this is dropped.
    pub keep_alive_timeout: Duration,
    /// Bytes that webhook requests in flight may use ([`budget`]).
    pub memory_budget: usize,
    /// Decision lines (denials, warnings, Audit-policy violations) logged per second at
    /// `info`; the rest are counted and summarised ([`decision_log`]).
    pub decisions_logged_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // The apiserver caps objects at 3 MiB; a review holds object and oldObject.
            max_body_bytes: 7 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_client: None,
            shutdown_grace: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            keep_alive_interval: Duration::from_secs(20),
            keep_alive_timeout: Duration::from_secs(10),
            memory_budget: budget::UNLIMITED_BUDGET,
            decisions_logged_per_second: decision_log::DEFAULT_PER_SECOND,
        }
    }
}

/// The fewest connection slots a budget is given, however small.
const MIN_CONNECTION_SLOTS: usize = 16;

impl Limits {
    /// The connections served at once: `max_connections`, but no more than a quarter of the
    /// memory budget can buffer ([`budget::PER_CONNECTION`] each; at least 16). 128 for the
    /// 64 MiB budget of a 128 Mi container, 1024 for the 512 MiB budget of an unknown limit.
    pub fn connection_slots(&self) -> usize {
        let by_budget = (self.memory_budget / 4 / budget::PER_CONNECTION).max(MIN_CONNECTION_SLOTS);
        self.max_connections.min(by_budget).max(1)
    }

    /// The connections one client IP may hold: three quarters of the slots unless set. The
    /// apiserver opens one HTTP/1.1 connection per concurrent webhook call through the Service,
    /// from one address per apiserver instance, so a single apiserver under a burst (a
    /// ReplicaSet creating hundreds of pods) must not be refused early; a client elsewhere (any
    /// pod, where the NetworkPolicy component is not installed) still cannot take every slot.
    pub fn connections_per_client(&self) -> usize {
        self.max_connections_per_client
            .unwrap_or_else(|| (self.connection_slots() * 3).div_ceil(4))
            .clamp(1, self.connection_slots())
    }

    /// What webhook requests in flight may use: the memory budget less what the connection
    /// slots may buffer.
    pub fn request_budget(&self) -> usize {
        let connections = self.connection_slots().saturating_mul(budget::PER_CONNECTION);
        self.memory_budget.saturating_sub(connections).max(self.memory_budget / 2)
    }

    /// How long a body may take to arrive.
    pub fn body_deadline(&self) -> Duration {
        self.body_timeout.min(self.request_timeout)
    }
}

/// Where the servers listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addresses {
    /// HTTPS webhook address.
    pub webhook: SocketAddr,
    /// Plain-HTTP metrics and probes address.
    pub metrics: SocketAddr,
}
