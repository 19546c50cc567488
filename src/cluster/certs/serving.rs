//! Serving on every replica: follow the Secret and both webhook configurations, swap a changed
//! certificate into the resolver, and report whether the webhooks trust what is served.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use time::OffsetDateTime;

use super::reconcile::{observe, stored_secret};
use super::{CertApis, CertConfig};
use crate::certs::plan::{CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
use crate::certs::{CertInfo, CertResolver, load_pem};
use crate::cluster::watch_backoff;
use crate::metrics::Metrics;
use crate::server::Readiness;

/// Longest time between two readiness checks of the served certificate.
const READINESS_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// The newest state of one object watched by name, following watcher events (a re-list
/// replaces it atomically at `InitDone`).
#[derive(Clone, Debug)]
pub struct Latest<K> {
    current: Option<K>,
    relisting: Option<Option<K>>,
    synced: bool,
}

impl<K> Default for Latest<K> {
    fn default() -> Self {
        Self { current: None, relisting: None, synced: false }
    }
}

impl<K: Clone> Latest<K> {
    /// Applies one watcher event.
    pub fn apply(&mut self, event: Event<K>) {
        match event {
            Event::Apply(object) => {
                self.current = Some(object);
                self.synced = true;
            }
            Event::Delete(_) => {
                self.current = None;
                self.synced = true;
            }
            Event::Init => self.relisting = Some(None),
            Event::InitApply(object) => self.relisting = Some(Some(object)),
            Event::InitDone => {
                self.current = self.relisting.take().flatten();
                self.synced = true;
            }
        }
    }

    /// The object, if it exists (as of the last complete list or event).
    #[must_use]
    pub fn get(&self) -> Option<&K> {
        self.current.as_ref()
    }

    /// Whether the first list has completed.
    #[must_use]
    pub fn is_synced(&self) -> bool {
        self.synced
    }
}

/// The serving side's view: the Secret and the webhooks, and the pair last loaded.
#[derive(Debug, Default)]
pub struct ServingState {
    /// The Secret.
    pub secret: Latest<Secret>,
    /// arcguard's ValidatingWebhookConfiguration.
    pub validating: Latest<ValidatingWebhookConfiguration>,
    /// arcguard's MutatingWebhookConfiguration.
    pub mutating: Latest<MutatingWebhookConfiguration>,
    /// The `tls.crt` and `tls.key` last tried, loaded or not, so a bad pair is reported once.
    tried: Option<(Vec<u8>, Vec<u8>)>,
    /// The `ca.crt` last reported.
    ca: Option<Vec<u8>>,
}

impl ServingState {
    /// Swaps a changed pair into `resolver` (a pair that fails to load is reported and the
    /// previous one stays), updates the expiry metrics, and returns whether the served
    /// certificate is ready: valid at `now` and, with `inject_ca_bundle`, issued by a CA in
    /// every one of arcguard's webhooks' `caBundle`. Not ready before all three watches have
    /// listed once.
    pub fn refresh(
        &mut self,
        config: &CertConfig,
        now: OffsetDateTime,
        resolver: &CertResolver,
        metrics: &Metrics,
    ) -> bool {
        let secret = self.secret.get().map(stored_secret);
        let data = |key: &str| secret.as_ref().and_then(|s| s.data.get(key)).cloned();
        if let (Some(cert), Some(key)) = (data(TLS_CERT_KEY), data(TLS_KEY_KEY)) {
            let pair = (cert, key);
            if self.tried.as_ref() != Some(&pair) {
                match load_pem(&pair.0, &pair.1) {
                    Ok((certified, info)) => {
                        let not_after = info.not_after.unix_timestamp();
                        tracing::info!(subject = %info.subject, issuer = %info.issuer, not_after, "serving the certificate from the Secret");
                        resolver.swap(certified, info);
                        metrics.record_certificate("serving", Some(not_after));
                    }
                    Err(error) => {
                        metrics.record_certificate("serving", None);
                        tracing::warn!(%error, secret = %config.secret_ref(), "the Secret's certificate does not load; the previous one stays in use");
                    }
                }
                self.tried = Some(pair);
            }
        }
        let ca = data(CA_CERT_KEY);
        if ca != self.ca {
            let not_after =
                ca.as_deref().and_then(|pem| CertInfo::from_pem(pem).ok()).map(|i| i.not_after);
            metrics.set_certificate_expiry("ca", not_after.map(OffsetDateTime::unix_timestamp));
            self.ca = ca;
        }
        self.is_ready(config, now, resolver)
    }

    fn is_ready(&self, config: &CertConfig, now: OffsetDateTime, resolver: &CertResolver) -> bool {
        let synced =
            self.secret.is_synced() && self.validating.is_synced() && self.mutating.is_synced();
        let Some(served) = resolver.current_info().filter(|_| synced) else {
            return false;
        };
        if !served.is_valid_at(now) {
            return false;
        }
        if !config.inject_ca_bundle {
            return true;
        }
        let observed = observe(config, None, self.validating.get(), self.mutating.get());
        observed.webhooks.iter().all(|webhook| {
            webhook.ca_bundle.as_deref().is_some_and(|bundle| served.is_issued_by_any(bundle))
        })
    }
}

/// A watch event for one of the three objects.
enum Change {
    Secret(Event<Secret>),
    Validating(Event<ValidatingWebhookConfiguration>),
    Mutating(Event<MutatingWebhookConfiguration>),
}

/// Serves the Secret's certificate on this replica until `shutdown` completes, and keeps
/// readiness in step.
///
/// Watches the Secret and both webhook configurations through the API (no volume, so no
/// kubelet delay), swaps a changed `tls.crt`/`tls.key` into `resolver` atomically, and sets
/// `readiness.set_certificate_ready` on every change and at least every minute (certificates
/// expire without any event).
pub async fn run_serving(
    client: Client,
    config: CertConfig,
    resolver: Arc<CertResolver>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let apis = CertApis::new(client, &config.namespace);
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = futures::stream::select_all([
        watcher(apis.secrets, by_name(&config.secret_name))
            .backoff(watch_backoff())
            .map(|event| event.map(Change::Secret))
            .boxed(),
        watcher(apis.validating, by_name(&config.validating_webhook_configuration))
            .backoff(watch_backoff())
            .map(|event| event.map(Change::Validating))
            .boxed(),
        watcher(apis.mutating, by_name(&config.mutating_webhook_configuration))
            .backoff(watch_backoff())
            .map(|event| event.map(Change::Mutating))
            .boxed(),
    ]);
    let mut state = ServingState::default();
    let mut was_ready = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = events.next() => match event {
                Some(Ok(Change::Secret(event))) => state.secret.apply(event),
                Some(Ok(Change::Validating(event))) => state.validating.apply(event),
                Some(Ok(Change::Mutating(event))) => state.mutating.apply(event),
                Some(Err(error)) => tracing::warn!(%error, "watching the certificate objects failed; retrying"),
                None => break,
            },
            () = tokio::time::sleep(READINESS_RECHECK) => {}
        }
        let ready = state.refresh(&config, OffsetDateTime::now_utc(), &resolver, &metrics);
        readiness.set_certificate_ready(ready);
        if was_ready != Some(ready) {
            if ready {
                tracing::info!("the served certificate is valid and trusted by every webhook");
            } else {
                tracing::warn!(
                    "not ready: no certificate served yet, it is not valid now, or a webhook's caBundle does not trust it"
                );
            }
            was_ready = Some(ready);
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;

    use super::super::test_support::{contents, mutating, secret, t0, validating};
    use super::*;

    #[test]
    fn latest_follows_events_and_replaces_its_object_only_when_a_relist_completes() {
        let mut latest = Latest::<u32>::default();
        assert!(!latest.is_synced());
        latest.apply(Event::Init);
        latest.apply(Event::InitApply(1));
        assert_eq!((latest.get(), latest.is_synced()), (None, false), "not before InitDone");
        latest.apply(Event::InitDone);
        assert_eq!((latest.get(), latest.is_synced()), (Some(&1), true));
        latest.apply(Event::Apply(2));
        assert_eq!(latest.get(), Some(&2));
        latest.apply(Event::Init);
        assert_eq!(latest.get(), Some(&2), "kept while relisting");
        latest.apply(Event::InitDone);
        assert_eq!(latest.get(), None, "a relist without it means it is gone");
        latest.apply(Event::Apply(3));
        latest.apply(Event::Delete(3));
        assert_eq!(latest.get(), None);
    }

    fn listed<K: Clone>(latest: &mut Latest<K>, object: K) {
        for event in [Event::Init, Event::InitApply(object), Event::InitDone] {
            latest.apply(event);
        }
    }

    /// A serving state whose three watches have listed: the Secret, and both configurations
    /// with the given bundles.
    fn serving_state(
        secret: Option<Secret>,
        validating_bundles: &[(&str, Option<&str>)],
        mutating_bundles: &[(&str, Option<&str>)],
    ) -> ServingState {
        let mut state = ServingState::default();
        match secret {
            Some(secret) => listed(&mut state.secret, secret),
            None => state.secret.apply(Event::InitDone),
        }
        listed(&mut state.validating, validating(validating_bundles));
        listed(&mut state.mutating, mutating(mutating_bundles));
        state
    }

    #[test]
    fn the_serving_side_swaps_in_a_new_pair_and_keeps_the_old_one_when_a_pair_is_broken() {
        let config = CertConfig::default();
        let first = contents(&config, t0());
        let bundle = first.bundle();
        let trusted = [("v.arcguard.io", Some(bundle.as_str()))];
        let resolver = CertResolver::empty();
        let metrics = Metrics::new();
        let mut state = serving_state(Some(secret(&first)), &trusted, &trusted);
        assert!(state.refresh(&config, t0(), &resolver, &metrics));
        let served = resolver.current_info().expect("serving");
        assert_eq!(served.not_after, t0() + config.serving_validity);

        let mut broken = secret(&first);
        if let Some(data) = broken.data.as_mut() {
            data.insert(TLS_KEY_KEY.to_owned(), ByteString(b"garbage".to_vec()));
        }
        state.secret.apply(Event::Apply(broken));
        assert!(state.refresh(&config, t0(), &resolver, &metrics), "the old pair is still good");
        assert_eq!(resolver.current_info().expect("serving"), served, "previous pair stays");
        let text = metrics.encode();
        assert!(
            text.contains("arcguard_certificate_reloads_total{result=\"failure\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("arcguard_certificate_expiry_timestamp_seconds{certificate=\"ca\"}"),
            "{text}"
        );

        let second = contents(&config, t0() + time::Duration::days(1));
        state.secret.apply(Event::Apply(secret(&second)));
        state.refresh(&config, t0(), &resolver, &metrics);
        assert_ne!(resolver.current_info().expect("serving"), served, "new pair swapped in");
    }

    #[test]
    fn readiness_needs_a_valid_certificate_whose_ca_every_webhook_trusts() {
        let config = CertConfig::default();
        let served = contents(&config, t0());
        let other = contents(&config, t0());
        let (ours, theirs) = (served.bundle(), other.bundle());
        let both = format!("{theirs}{ours}");
        let ok = Some(ours.as_str());
        let expired = t0() + config.serving_validity + time::Duration::SECOND;
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, Option<&'a str>)],
            &'a [(&'a str, Option<&'a str>)],
            bool,
            OffsetDateTime,
            bool,
        );
        let cases: [Case<'_>; 8] = [
            ("trusted everywhere", &[("v", ok), ("w", ok)], &[("m", ok)], true, t0(), true),
            ("trusted among others", &[("v", Some(both.as_str()))], &[("m", ok)], true, t0(), true),
            ("one webhook reset", &[("v", ok), ("w", None)], &[("m", ok)], true, t0(), false),
            ("another CA", &[("v", ok)], &[("m", Some(theirs.as_str()))], true, t0(), false),
            ("injection off: validity alone", &[("v", None)], &[("m", None)], false, t0(), true),
            ("expired", &[("v", ok)], &[("m", ok)], true, expired, false),
            (
                "not yet valid",
                &[("v", ok)],
                &[("m", ok)],
                true,
                t0() - time::Duration::hours(1),
                false,
            ),
            ("no webhooks at all", &[], &[], true, t0(), true),
        ];
        for (label, validating_bundles, mutating_bundles, inject, now, expected) in cases {
            let config = CertConfig { inject_ca_bundle: inject, ..CertConfig::default() };
            let resolver = CertResolver::empty();
            let mut state =
                serving_state(Some(secret(&served)), validating_bundles, mutating_bundles);
            assert_eq!(
                state.refresh(&config, now, &resolver, &Metrics::new()),
                expected,
                "{label}"
            );
        }
    }

    #[test]
    fn readiness_waits_for_a_certificate_and_for_every_watch_to_list() {
        let config = CertConfig::default();
        let metrics = Metrics::new();
        let resolver = CertResolver::empty();
        let mut state = serving_state(None, &[], &[]);
        assert!(!state.refresh(&config, t0(), &resolver, &metrics), "nothing to serve");

        let served = contents(&config, t0());
        let mut state = ServingState::default();
        state.secret.apply(Event::Apply(secret(&served)));
        assert!(!state.refresh(&config, t0(), &resolver, &metrics), "webhooks not listed yet");
        assert!(resolver.current_info().is_some(), "served as soon as it is known");
    }
}
