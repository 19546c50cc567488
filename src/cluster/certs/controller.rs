//! The leader's loop around [`reconcile_once`]: plan on every change and when something falls
//! due, and back off after conflicts, errors, or writes that do not settle.

use std::future::Future;
use std::sync::Arc;

use kube::Client;
use time::OffsetDateTime;

use super::reconcile::{Outcome, reconcile_once};
use super::{CertApis, CertConfig, ControllerError};
use crate::cluster::leader::Leadership;
use crate::cluster::objects::Objects;
use crate::metrics::Metrics;

/// Longest time between two plans even without changes, in case a watch event was missed.
const MAX_REQUEUE: std::time::Duration = std::time::Duration::from_secs(3600);
/// First delay after a conflict or error; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest delay after repeated conflicts or errors.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(300);
/// Writes in a row without the planner settling before the loop backs off: a normal sequence
/// (write, inject, switch) needs at most three.
const MAX_STEPS_IN_A_ROW: u32 = 6;
/// Re-injections closer together than this count as a fight with another writer and back off.
const INJECTION_FIGHT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Doubling delays for conflicts and errors, from one second to five minutes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt; each call doubles it.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let delay = MIN_BACKOFF.saturating_mul(1 << self.failures.min(16)).min(MAX_BACKOFF);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Manages the certificate while this replica leads, until `shutdown` completes.
///
/// Plans on every change of the Secret or either webhook configuration (the shared watches of
/// [`crate::cluster::objects`]; a plan reads the objects afresh) and at the planner's due time
/// (at least hourly); after a write it plans again at once, after a conflict or error
/// it backs off (1 s doubling to 5 min), and it backs off too when writes do not settle or
/// another writer keeps resetting the CA bundle.
///
/// # Errors
///
/// [`ControllerError::Config`] for invalid settings; everything else is logged and retried.
pub async fn run_controller(
    client: Client,
    objects: Objects,
    config: CertConfig,
    mut leadership: Leadership,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    config.validate()?;
    let apis = CertApis::new(client, &config.namespace);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            waited = leadership.wait_for(true) => if waited.is_err() {
                // The elector stopped: this replica will not lead again.
                shutdown.await;
                return Ok(());
            },
        }
        tracing::info!(secret = %config.secret_ref(), external = config.external, "leading: managing the serving certificate");
        let mut follower = leadership.clone();
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = follower.wait_for(false) => tracing::info!("no longer leading: stopped managing the serving certificate"),
            () = lead(&apis, objects.clone(), &config, &metrics) => {}
        }
    }
}

/// The reconcile loop of a leader; runs until dropped.
async fn lead(apis: &CertApis, mut changes: Objects, config: &CertConfig, metrics: &Metrics) {
    let mut backoff = Backoff::default();
    let mut injection_fight = Backoff::default();
    let mut last_injection: Option<tokio::time::Instant> = None;
    // An injection that follows our own Secret write publishes a bundle we changed; only a
    // re-injection of an unchanged bundle means someone else reset it.
    let mut wrote_since_injection = false;
    let mut steps = 0u32;
    loop {
        // Marked before the plan reads, not after: a change that lands between the plan's reads
        // and its end (a revocation request just after this replica took the lease) must wake
        // the next wait. The price is one extra plan for the echo of our own writes.
        changes.mark_seen();
        let now = OffsetDateTime::now_utc();
        // Some(delay): sleep through changes; None with a deadline: wake on a change too.
        let (delay, wake_on_change) = match reconcile_once(apis, config, now).await {
            Ok(Outcome::Wrote(reason)) => {
                wrote_since_injection = true;
                tracing::info!(%reason, secret = %config.secret_ref(), "wrote the certificate Secret");
                metrics.record_certificate_rotation(reason.as_str());
                backoff.reset();
                steps += 1;
                (std::time::Duration::ZERO, false)
            }
            Ok(Outcome::Injected { validating, mutating }) => {
                tracing::info!(
                    validating,
                    mutating,
                    "injected the CA bundle into arcguard's webhooks"
                );
                if validating > 0 {
                    metrics.record_ca_bundle_injection("validating");
                }
                if mutating > 0 {
                    metrics.record_ca_bundle_injection("mutating");
                }
                backoff.reset();
                steps += 1;
                let fighting = !wrote_since_injection
                    && last_injection.is_some_and(|at| at.elapsed() < INJECTION_FIGHT_WINDOW);
                wrote_since_injection = false;
                last_injection = Some(tokio::time::Instant::now());
                if fighting {
                    let delay = injection_fight.next_delay();
                    tracing::warn!(
                        ?delay,
                        "the webhooks' CA bundle keeps being reset by someone else; backing off"
                    );
                    (delay, false)
                } else {
                    injection_fight.reset();
                    (std::time::Duration::ZERO, false)
                }
            }
            Ok(Outcome::Conflict) => {
                let delay = backoff.next_delay();
                tracing::info!(
                    ?delay,
                    "another writer changed the certificate objects first; re-reading after a back-off"
                );
                steps += 1;
                (delay, false)
            }
            Ok(Outcome::Idle { until }) => {
                backoff.reset();
                steps = 0;
                let wait = until
                    .map(|until| std::time::Duration::try_from(until - now).unwrap_or_default())
                    .unwrap_or(MAX_REQUEUE)
                    .min(MAX_REQUEUE);
                (wait, true)
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::error!(%error, ?delay, "certificate reconcile failed; retrying after a back-off");
                (delay, false)
            }
        };
        let delay = if steps > MAX_STEPS_IN_A_ROW {
            steps = 0;
            let delay = backoff.next_delay();
            tracing::error!(?delay, "the certificate plan does not settle; backing off");
            delay
        } else {
            delay
        };
        if wake_on_change {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = changes.changed() => {}
            }
        } else if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes_and_starts_over_after_a_success() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..12).map(|_| backoff.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.next_delay().as_secs(), 1);
    }
}
