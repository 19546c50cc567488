//! Cluster mode: policies from custom resources, facts from watch-backed caches, the
//! controller that manages arcguard's own serving certificate, and the failure policy of its
//! webhooks.

pub mod api_client;
pub mod audit;
pub mod certs;
pub mod facts;
pub mod labeller;
pub mod leader;
pub mod objects;
pub mod policies;
pub mod policy_status;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::watcher::ExponentialBackoff;
use tokio::sync::watch;

pub use self::api_client::client;
use self::certs::CertConfig;
use self::leader::{LeaderElector, LeaseConfig};
use crate::certs::CertResolver;
use crate::memory::MemoryPool;
use crate::server::{Addresses, AppState, Limits, Snapshot};
use crate::server::{ListenError, Running, drain_on, listen};

/// The back-off of every watch arcguard runs: a base of 250 ms doubling to at most 1 s, plus a
/// jitter of up to the base (backon adds `base × rand[0, 1)` on top of the capped base), so
/// every wait is under 2 s; reset after two quiet minutes. kube-runtime's default goes up to
/// 30 s, so after an apiserver outage policies and caches could lag for half a minute; with
/// this they resume within 2 s of the apiserver answering again (also after the 403s a
/// restarted apiserver gives while its RBAC caches sync), for at most one list per watch a
/// second while it is down.
pub fn watch_backoff() -> ResetTimerBackoff<ExponentialBackoff> {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(ExponentialBackoff::from(builder), Duration::from_secs(120))
}

/// This replica's leader-election identity: the pod name when given; otherwise the host name
/// with the process id and start time, so two replicas on one host (out of cluster, or started
/// without `POD_NAME`) can never share an identity and both lead.
pub fn identity(pod_name: Option<&str>, hostname: Option<&str>) -> String {
    if let Some(name) = pod_name.filter(|n| !n.is_empty()) {
        return name.to_owned();
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{}-{nanos:08x}", hostname.unwrap_or("arcguard"), std::process::id())
}

/// How long readiness waits for the GMSACredentialSpec cache while a gMSA policy is in force.
const CREDENTIAL_SPECS_WAIT: Duration = Duration::from_secs(60);

/// Settings of cluster mode.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Listen addresses.
    pub addresses: Addresses,
    /// Server limits.
    pub limits: Limits,
    /// Time between readiness turning false and the listeners closing on shutdown.
    pub shutdown_delay: Duration,
    /// This replica's identity for leader election.
    pub identity: String,
    /// The Lease's name.
    pub lease_name: String,
    /// The serving certificate's Secret, Service, webhook configurations and lifetimes.
    pub certs: CertConfig,
    /// Whether the leader labels existing pods with their OS ([`labeller`]).
    pub label_existing_pods: bool,
    /// Time between two labeller passes over every pod.
    pub label_pods_interval: Duration,
    /// The background audit's settings ([`audit`]).
    pub audit: audit::AuditConfig,
    /// How imageProvenance policies reach registries.
    pub registries: crate::oci::RegistryConfig,
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("failed to configure the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The certificate settings are invalid.
    #[error(transparent)]
    Certificates(#[from] certs::ControllerError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] crate::certs::CertError),
    /// Registry access could not be set up.
    #[error(transparent)]
    Registry(#[from] crate::oci::RegistryError),
    /// A listener could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// Starts cluster mode; it runs until `shutdown` completes.
///
/// Every replica serves admission, compiles policies and serves the certificate it reads from
/// the Secret; only the leader writes the Secret, the webhook configurations and policy status.
///
/// # Errors
/// [`ClusterError`] when the client, certificates or listeners cannot be set up.
pub async fn start(
    config: ClusterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ClusterError> {
    config.certs.validate()?;
    let client = client().await?;
    let facts = facts::ClusterFacts::start(client.clone());
    // Webhook requests and registry reads share one memory budget.
    let memory = MemoryPool::new(config.limits.request_budget());
    let state =
        AppState::new(Snapshot::default()).with_facts(facts.clone()).with_memory(memory.clone());
    let registries =
        crate::oci::Registries::new(&config.registries, memory, state.metrics.clone())?;
    let state = state.with_images(Arc::new(registries));
    let resolver = Arc::new(CertResolver::empty());
    let tls = Arc::new(crate::certs::server_config(resolver.clone())?);

    let (stop_tx, stop_rx) = watch::channel(false);
    let (synced_facts, readiness) = (facts.clone(), state.readiness.clone());
    let mut caches_stop = stop_rx.clone();
    let caches = tokio::spawn(async move {
        let filled = async {
            synced_facts.synced().await;
            readiness.set_caches_synced();
            tracing::info!("caches filled: namespaces, nodes");
            // Bounded: on a cluster without the GMSACredentialSpec CRD the cache never fills,
            // and a gMSA policy must not keep every replica unready (which would fail every
            // inspected request closed); gMSA checks then deny, saying the spec does not exist.
            let specs = synced_facts.credential_specs_synced();
            match tokio::time::timeout(CREDENTIAL_SPECS_WAIT, specs).await {
                Ok(()) => tracing::info!("caches filled: GMSACredentialSpecs"),
                Err(_) => tracing::error!(
                    wait = ?CREDENTIAL_SPECS_WAIT,
                    "GMSACredentialSpecs could not be listed (is the windows.k8s.io CRD installed, and may arcguard list it?); ready anyway: gMSA policies deny pods whose credential spec arcguard cannot see"
                ),
            }
            readiness.set_credential_specs_synced();
        };
        tokio::select! {
            () = filled => {}
            _ = caches_stop.wait_for(|stop| *stop) => {}
        }
    });

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let lease = LeaseConfig {
        name: config.lease_name.clone(),
        ..LeaseConfig::new(&config.certs.namespace, &config.identity)
    };
    let (elector, leadership) = LeaderElector::new(client.clone(), lease);
    let election = elector.run(state.metrics.clone(), stopped(stop_rx.clone()));
    let mut tasks = vec![
        caches,
        tokio::spawn(async move {
            if let Err(error) = election.await {
                tracing::error!(%error, "leader election stopped");
            }
        }),
    ];
    // arcguard's Secret and webhook configurations, each watched once for every task below.
    let (objects, watches) = objects::Objects::watch(&client, &config.certs, &stop_rx);
    tasks.extend(watches);
    let controller = certs::run_controller(
        client.clone(),
        objects.clone(),
        config.certs.clone(),
        leadership.clone(),
        state.metrics.clone(),
        stopped(stop_rx.clone()),
    );
    tasks.push(tokio::spawn(async move {
        if let Err(error) = controller.await {
            tracing::error!(%error, "certificate controller stopped");
        }
    }));
    // The webhooks fail closed only once this replica can answer (webhooks.rs).
    tasks.push(tokio::spawn(webhooks::run(
        client.clone(),
        objects.clone(),
        config.certs.clone(),
        leadership.clone(),
        state.clone(),
        stopped(stop_rx.clone()),
    )));
    tasks.push(tokio::spawn(certs::run_serving(
        objects,
        config.certs.clone(),
        resolver,
        state.readiness.clone(),
        state.metrics.clone(),
        stopped(stop_rx.clone()),
    )));
    let audit_facts = facts.clone();
    if config.label_existing_pods {
        tasks.push(tokio::spawn(labeller::run(
            client.clone(),
            state.clone(),
            facts,
            config.label_pods_interval,
            leadership.receiver(),
            stop_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(audit::run(
        client.clone(),
        state.clone(),
        audit_facts,
        config.audit,
        leadership.receiver(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(policies::run(
        client,
        state.clone(),
        config.identity.clone(),
        leadership.receiver(),
        stop_rx.clone(),
    )));

    let listening = listen(&config.addresses, tls, state.clone(), &config.limits, stop_rx).await?;
    tracing::info!(webhook = %format!("https://{}", listening.webhook_addr), metrics = %format!("http://{}/metrics", listening.metrics_addr), namespace = %config.certs.namespace, secret = %config.certs.secret_name, identity = %config.identity, "arcguard is serving in cluster mode");
    let (webhook_addr, metrics_addr) = (listening.webhook_addr, listening.metrics_addr);
    tasks.extend(listening.tasks);
    let done = drain_on(shutdown, state.readiness.clone(), config.shutdown_delay, stop_tx, tasks);
    Ok(Running { webhook_addr, metrics_addr, state, done })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_pod_name_the_identity_is_unique_to_the_process() {
        assert_eq!(identity(Some("arcguard-7d9f-x2"), Some("node-1")), "arcguard-7d9f-x2");
        let fallback = identity(None, Some("node-1"));
        assert!(fallback.starts_with(&format!("node-1-{}-", std::process::id())), "{fallback}");
        assert!(identity(Some(""), None).starts_with("arcguard-"));
        assert_ne!(identity(None, None), "arcguard", "never the shared default");
    }

    #[test]
    fn every_watch_back_off_wait_is_under_two_seconds_and_grows_from_a_quarter_second() {
        let mut backoff = watch_backoff();
        let waits: Vec<Duration> = (0..2000).map_while(|_| backoff.next()).collect();
        assert_eq!(waits.len(), 2000, "retries forever");
        assert!(waits[0] >= Duration::from_millis(250) && waits[0] < Duration::from_millis(500));
        let longest = waits.iter().max().copied().unwrap_or_default();
        assert!(longest < Duration::from_secs(2), "longest wait {longest:?}");
        assert!(longest > Duration::from_millis(1500), "jitter spreads the retries: {longest:?}");
    }
}
