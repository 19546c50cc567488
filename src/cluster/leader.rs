//! Leader election over a coordination.k8s.io/v1 Lease in arcguard's namespace: one replica
//! writes (the certificate Secret, the webhooks' CA bundle, policy status); every replica serves
//! admission.
//!
//! [`decide`] is the pure rule; [`LeaderElector`] applies it against the API with optimistic
//! concurrency. A write that loses a race (409) makes this replica a follower until its next
//! retry; it is never retried in a loop. Expiry is measured on the local clock from when this
//! replica first saw the current Lease record (as client-go does), so clock skew between nodes
//! cannot make two replicas leader at once.
//!
//! Why arcguard keeps its own: kube-runtime has no leader election, and the crates that do it
//! over a Lease (kube-leader-election, kubert's lease module) did not support kube 5 when this
//! was written; this one also steps down on its own timer when a renewal cannot finish within
//! the renew deadline, whatever call is in flight (the hung-apiserver case). Revisit when a
//! maintained lease crate supports the kube version in use.
//!
//! # API calls (for RBAC)
//!
//! - `get coordination.k8s.io/leases (namespaced: the Lease, by name)`
//! - `create coordination.k8s.io/leases (namespaced)`
//! - `update coordination.k8s.io/leases (namespaced: the Lease, by name)`

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Default name of the Lease.
pub const DEFAULT_LEASE_NAME: &str = "arcguard-leader";
/// Default time a Lease stays valid without renewal: 15 seconds.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default time between renewals by the leader: 5 seconds.
pub const DEFAULT_RENEW_PERIOD: Duration = Duration::from_secs(5);
/// Default time a leader keeps leading without a successful renewal: 10 seconds, so it steps
/// down before another replica may take over.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Default time between attempts by a follower: 2 seconds.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Field manager recorded on writes.
const FIELD_MANAGER: &str = "arcguard";

/// Why leader election failed. API errors are retryable (the loop tries again after the retry
/// period); invalid settings are not.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The timings could let two replicas lead at once, or cannot work.
    #[error("invalid leader election settings: {0}")]
    InvalidConfig(&'static str),
    /// A call did not answer before the renew deadline (or, for a follower, the retry bound):
    /// the apiserver hangs or cannot be reached.
    #[error("the Lease {namespace}/{name} call did not answer within {after:?}")]
    Timeout {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// How long it was given.
        after: Duration,
    },
    /// The apiserver refused or failed a call (other than a lost race).
    #[error("failed to {action} Lease {namespace}/{name}: {source}")]
    Api {
        /// "read", "create" or "update".
        action: &'static str,
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The client error (boxed: it is large).
        #[source]
        source: Box<kube::Error>,
    },
}

/// Where the Lease lives, who this replica is, and the timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// arcguard's namespace.
    pub namespace: String,
    /// The Lease's name; default [`DEFAULT_LEASE_NAME`].
    pub name: String,
    /// This replica's identity (the pod name); unique among replicas.
    pub identity: String,
    /// How long a Lease is valid without renewal; default [`DEFAULT_LEASE_DURATION`].
    pub lease_duration: Duration,
    /// Time between renewals; default [`DEFAULT_RENEW_PERIOD`].
    pub renew_period: Duration,
    /// How long a leader that cannot renew keeps leading; default [`DEFAULT_RENEW_DEADLINE`].
    pub renew_deadline: Duration,
    /// Time between a follower's attempts; default [`DEFAULT_RETRY_PERIOD`].
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The defaults for `identity` in `namespace`.
    #[must_use]
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: DEFAULT_LEASE_NAME.to_owned(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_period: DEFAULT_RENEW_PERIOD,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// Checks that a leader steps down before its Lease can be taken over.
    ///
    /// # Errors
    ///
    /// [`LeaderError::InvalidConfig`] unless `0 < renew_period < renew_deadline <
    /// lease_duration`, `retry_period` is positive and the identity is not empty.
    pub fn validate(&self) -> Result<(), LeaderError> {
        let invalid = |reason| Err(LeaderError::InvalidConfig(reason));
        if self.identity.is_empty() {
            return invalid("the identity must not be empty");
        }
        if self.lease_duration.as_secs() < 1 || self.lease_duration.as_secs() > i32::MAX as u64 {
            return invalid("the lease duration must be whole seconds, at least one");
        }
        if self.renew_period.is_zero() || self.renew_period >= self.renew_deadline {
            return invalid(
                "the renew period must be positive and shorter than the renew deadline",
            );
        }
        if self.renew_deadline >= self.lease_duration {
            return invalid("the renew deadline must be shorter than the lease duration");
        }
        if self.retry_period.is_zero() {
            return invalid("the retry period must be positive");
        }
        Ok(())
    }
}

// === the rule ===

/// What this replica knows of an existing Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The holder; `None` or empty when released.
    pub holder: Option<String>,
    /// The holder's promised validity (`leaseDurationSeconds`), if set and positive.
    pub duration: Option<Duration>,
    /// When this replica first saw this record (this `resourceVersion`), on its own clock.
    pub observed_at: OffsetDateTime,
}

/// What to do about the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// The Lease is released or expired: take it over.
    Acquire,
    /// This replica holds the Lease: renew it.
    Renew,
    /// Someone else holds a live Lease: follow.
    Follow {
        /// The holder.
        holder: String,
        /// When the Lease expires unless renewed.
        expires_at: OffsetDateTime,
    },
}

/// Decides what to do about `lease` as `identity` at `now`; pure.
///
/// A Lease without a valid duration is taken to last `config.lease_duration`.
#[must_use]
pub fn decide(
    lease: Option<&LeaseRecord>,
    identity: &str,
    now: OffsetDateTime,
    config: &LeaseConfig,
) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let holder = lease.holder.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == identity {
        return Decision::Renew;
    }
    let expires_at = lease.observed_at + lease.duration.unwrap_or(config.lease_duration);
    if now >= expires_at {
        return Decision::Acquire;
    }
    Decision::Follow { holder: holder.to_owned(), expires_at }
}

// === leadership ===

/// Whether this replica leads; cheap to clone, and changes can be awaited.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// Keeps a fixed leadership's channel open, so waiting on it never ends early.
    _fixed: Option<Arc<watch::Sender<bool>>>,
}

/// The elector went away (it only does after releasing leadership on shutdown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the leader elector has stopped")]
pub struct ElectorStopped;

impl Leadership {
    /// A leadership that never changes: `true` for a single replica without election, or for
    /// tests.
    #[must_use]
    pub fn fixed(leader: bool) -> Self {
        let (tx, rx) = watch::channel(leader);
        Self { rx, _fixed: Some(Arc::new(tx)) }
    }

    /// Whether this replica leads now.
    #[must_use]
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until leadership is `leader`.
    ///
    /// # Errors
    ///
    /// [`ElectorStopped`] when the elector stopped first (then this replica no longer leads).
    pub async fn wait_for(&mut self, leader: bool) -> Result<(), ElectorStopped> {
        self.rx.wait_for(|now| *now == leader).await.map(drop).map_err(|_| ElectorStopped)
    }

    /// A receiver of every change, for `select!` loops.
    #[must_use]
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}

// === the elector ===

/// What one [`LeaderElector::tick`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tick {
    /// This replica leads (it created, acquired or renewed the Lease).
    Leading,
    /// Someone else leads, or won the race for the Lease.
    Following {
        /// The holder, if known.
        holder: Option<String>,
    },
}

/// Runs the election against the API and publishes the result to [`Leadership`] handles.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    tx: watch::Sender<bool>,
    /// The Lease as last read or written.
    lease: Option<Lease>,
    /// The `resourceVersion` last seen and when it was first seen.
    observed: Option<(String, OffsetDateTime)>,
    /// When this replica last wrote the Lease as holder.
    renewed_at: Option<OffsetDateTime>,
}

impl LeaderElector {
    /// An elector for `config`, and the leadership it publishes (initially: not leader).
    #[must_use]
    pub fn new(client: Client, config: LeaseConfig) -> (Self, Leadership) {
        let (tx, rx) = watch::channel(false);
        let api = Api::namespaced(client, &config.namespace);
        let elector = Self { api, config, tx, lease: None, observed: None, renewed_at: None };
        (elector, Leadership { rx, _fixed: None })
    }

    /// Whether this replica leads.
    #[must_use]
    pub fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    fn set_leader(&self, leader: bool) {
        self.tx.send_if_modified(|current| std::mem::replace(current, leader) != leader);
    }

    fn api_error(&self, action: &'static str, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            action,
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source: Box::new(source),
        }
    }

    /// One round: read the Lease (unless leading with a fresh copy), decide, write at most once.
    ///
    /// # Errors
    ///
    /// [`LeaderError`] when a call fails for another reason than a lost race. A leader that
    /// has not renewed within the renew deadline steps down before the error is returned.
    pub async fn tick(&mut self, now: OffsetDateTime) -> Result<Tick, LeaderError> {
        // The calls of a round get until the renew deadline (a leader) or one renew deadline
        // (a follower): a hung apiserver cannot keep a leader leading past its deadline while
        // another replica takes the Lease over.
        let budget = match self.renewed_at.filter(|_| self.is_leader()) {
            Some(at) => {
                let left = at + self.config.renew_deadline - now;
                Duration::try_from(left).unwrap_or(Duration::ZERO)
            }
            None => self.config.renew_deadline,
        };
        let started = tokio::time::Instant::now();
        let result = match tokio::time::timeout(budget, self.try_tick(now)).await {
            Ok(result) => result,
            Err(_) => Err(LeaderError::Timeout {
                namespace: self.config.namespace.clone(),
                name: self.config.name.clone(),
                after: budget,
            }),
        };
        // The round may have taken up to the whole budget: judge the deadline at its end.
        let ended = now + started.elapsed();
        if result.is_err()
            && self.is_leader()
            && self.renewed_at.is_none_or(|at| ended >= at + self.config.renew_deadline)
        {
            tracing::warn!(lease = %self.config.name, "could not renew the leader Lease in time; stepping down");
            self.set_leader(false);
            self.lease = None;
        }
        result
    }

    async fn try_tick(&mut self, now: OffsetDateTime) -> Result<Tick, LeaderError> {
        if !(self.is_leader() && self.lease.is_some()) {
            self.lease =
                self.api.get_opt(&self.config.name).await.map_err(|e| self.api_error("read", e))?;
        }
        let record = self.lease.as_ref().map(|lease| observe(&mut self.observed, lease, now));
        match decide(record.as_ref(), &self.config.identity, now, &self.config) {
            Decision::Follow { holder, .. } => {
                self.set_leader(false);
                Ok(Tick::Following { holder: Some(holder) })
            }
            Decision::Create => {
                let lease = self.held(None, now);
                let written = self.api.create(&post_params(), &lease).await;
                let tick = self.settle_write(written, now, "create");
                if tick.as_ref().is_ok_and(|t| *t == Tick::Leading) {
                    tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                }
                tick
            }
            decision @ (Decision::Acquire | Decision::Renew) => {
                let current = self.lease.clone();
                let lease = self.held(current, now);
                let written = self.api.replace(&self.config.name, &post_params(), &lease).await;
                let tick = self.settle_write(written, now, "update");
                if decision == Decision::Acquire && tick.as_ref().is_ok_and(|t| *t == Tick::Leading)
                {
                    tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                }
                tick
            }
        }
    }

    /// The Lease as this replica holds it from `now`, based on `current` (which carries the
    /// `resourceVersion` the write is conditional on).
    fn held(&self, current: Option<Lease>, now: OffsetDateTime) -> Lease {
        let mut lease = current.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: None,
        });
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.config.identity.as_str());
        if !ours {
            spec.holder_identity = Some(self.config.identity.clone());
            spec.acquire_time = Some(micro_time(now));
            spec.lease_transitions =
                Some(spec.lease_transitions.map_or(0, |n| n.saturating_add(1)));
        }
        spec.renew_time = Some(micro_time(now));
        spec.lease_duration_seconds =
            Some(i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX));
        lease
    }

    /// Turns the result of a write into leadership: success leads, a lost race follows.
    fn settle_write(
        &mut self,
        written: Result<Lease, kube::Error>,
        now: OffsetDateTime,
        action: &'static str,
    ) -> Result<Tick, LeaderError> {
        match written {
            Ok(lease) => {
                self.observed = lease.metadata.resource_version.clone().map(|v| (v, now));
                self.lease = Some(lease);
                self.renewed_at = Some(now);
                self.set_leader(true);
                Ok(Tick::Leading)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Someone else wrote first: follow, and read afresh next time.
                self.lease = None;
                self.set_leader(false);
                Ok(Tick::Following { holder: None })
            }
            Err(source) => Err(self.api_error(action, source)),
        }
    }

    /// Gives the Lease up (empty holder) so another replica takes over at once. Leadership
    /// turns false before the write, so nothing here acts as leader afterwards.
    ///
    /// # Errors
    ///
    /// [`LeaderError`] when the write fails; a lost race counts as success (someone else
    /// already holds it).
    pub async fn release(&mut self, now: OffsetDateTime) -> Result<(), LeaderError> {
        let was_leader = self.is_leader();
        self.set_leader(false);
        let Some(mut lease) = self.lease.take().filter(|_| was_leader) else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.renew_time = Some(micro_time(now));
        match self.api.replace(&self.config.name, &post_params(), &lease).await {
            Ok(_) => {
                tracing::info!(lease = %self.config.name, "released the leader Lease");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(source) => Err(self.api_error("update", source)),
        }
    }

    /// Runs the election until `shutdown` completes, then releases the Lease if held.
    ///
    /// # Errors
    ///
    /// [`LeaderError::InvalidConfig`] for invalid settings (checked before anything else);
    /// API errors are logged and retried.
    pub async fn run(
        mut self,
        metrics: Arc<Metrics>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), LeaderError> {
        self.config.validate()?;
        tokio::pin!(shutdown);
        loop {
            let delay = match self.tick(OffsetDateTime::now_utc()).await {
                Ok(Tick::Leading) => self.config.renew_period,
                Ok(Tick::Following { .. }) => self.config.retry_period,
                Err(error) => {
                    tracing::warn!(%error, "leader election failed; retrying");
                    self.config.retry_period
                }
            };
            metrics.set_leader(self.is_leader());
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        if let Err(error) = self.release(OffsetDateTime::now_utc()).await {
            tracing::warn!(%error, "could not release the leader Lease; another replica takes over when it expires");
        }
        metrics.set_leader(false);
        Ok(())
    }
}

/// Remembers when this `resourceVersion` was first seen, and returns the record.
fn observe(
    observed: &mut Option<(String, OffsetDateTime)>,
    lease: &Lease,
    now: OffsetDateTime,
) -> LeaseRecord {
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    let observed_at = match observed {
        Some((seen, at)) if *seen == version => *at,
        _ => {
            *observed = Some((version, now));
            now
        }
    };
    let spec = lease.spec.as_ref();
    LeaseRecord {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        duration: spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        observed_at,
    }
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PostParams::default() }
}

/// `now` as a Lease time (microseconds).
fn micro_time(now: OffsetDateTime) -> MicroTime {
    let micros = i64::try_from(now.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX);
    MicroTime(Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
    }

    fn record(holder: Option<&str>, duration: Option<u64>, observed_secs_ago: i64) -> LeaseRecord {
        LeaseRecord {
            holder: holder.map(str::to_owned),
            duration: duration.map(Duration::from_secs),
            observed_at: t0() - time::Duration::seconds(observed_secs_ago),
        }
    }

    #[test]
    fn decide_acquires_free_or_expired_leases_renews_its_own_and_follows_live_ones() {
        let config = LeaseConfig::new("arcguard-system", "me");
        let follow = |secs_left: i64| Decision::Follow {
            holder: "other".to_owned(),
            expires_at: t0() + time::Duration::seconds(secs_left),
        };
        let cases: [(&str, Option<LeaseRecord>, Decision); 9] = [
            ("absent", None, Decision::Create),
            ("released (no holder)", Some(record(None, Some(15), 0)), Decision::Acquire),
            ("released (empty holder)", Some(record(Some(""), Some(15), 0)), Decision::Acquire),
            ("ours", Some(record(Some("me"), Some(15), 60)), Decision::Renew),
            ("other, just seen", Some(record(Some("other"), Some(15), 0)), follow(15)),
            ("other, seen 14 s ago", Some(record(Some("other"), Some(15), 14)), follow(1)),
            ("other, seen 15 s ago", Some(record(Some("other"), Some(15), 15)), Decision::Acquire),
            ("other, own duration", Some(record(Some("other"), Some(60), 30)), follow(30)),
            (
                "other, no duration: the configured one",
                Some(record(Some("other"), None, 16)),
                Decision::Acquire,
            ),
        ];
        for (label, lease, expected) in cases {
            assert_eq!(decide(lease.as_ref(), "me", t0(), &config), expected, "{label}");
        }
    }

    #[tokio::test]
    async fn fixed_leadership_never_changes_and_waiting_for_it_does_not_end_early() {
        use futures::FutureExt;

        let mut leader = Leadership::fixed(true);
        assert!(leader.is_leader());
        assert_eq!(leader.wait_for(true).await, Ok(()));
        let mut follower = Leadership::fixed(false);
        assert!(!follower.is_leader());
        assert_eq!(follower.wait_for(true).now_or_never(), None, "pending, not stopped");
    }

    #[test]
    fn lease_settings_must_let_a_leader_step_down_before_its_lease_expires() {
        type Edit = fn(&mut LeaseConfig);
        let cases: [(Edit, bool); 6] = [
            (|_| {}, true),
            (|c| c.identity.clear(), false),
            (|c| c.renew_deadline = c.lease_duration, false),
            (|c| c.renew_period = c.renew_deadline, false),
            (|c| c.retry_period = Duration::ZERO, false),
            (|c| c.lease_duration = Duration::from_millis(500), false),
        ];
        for (index, (edit, valid)) in cases.into_iter().enumerate() {
            let mut config = LeaseConfig::new("arcguard-system", "me");
            edit(&mut config);
            assert_eq!(config.validate().is_ok(), valid, "case {index}");
        }
    }

    #[test]
    fn lease_times_carry_microseconds() {
        let now = t0() + time::Duration::microseconds(1_234_567);
        assert_eq!(micro_time(now).0.as_microsecond(), 1_767_225_601_234_567);
    }
}
