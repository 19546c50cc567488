//! Serving on every replica: follow the Secret and both webhook configurations, swap a changed
//! certificate into the resolver, and report whether the webhooks trust what is served.

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use time::OffsetDateTime;

use super::CertConfig;
use super::reconcile::{observe, stored_secret};
use crate::certs::plan::{CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
use crate::certs::{CertInfo, CertResolver, load_pem};
use crate::cluster::objects::{Objects, Seen};
use crate::metrics::Metrics;
use crate::server::Readiness;

/// Longest time between two readiness checks of the served certificate.
const READINESS_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// The serving side's view: the Secret and the webhooks, and the pair last loaded.
#[derive(Debug)]
pub struct ServingState {
    /// The Secret.
    pub secret: Seen<Secret>,
    /// arcguard's ValidatingWebhookConfiguration.
    pub validating: Seen<ValidatingWebhookConfiguration>,
    /// arcguard's MutatingWebhookConfiguration.
    pub mutating: Seen<MutatingWebhookConfiguration>,
    /// The `tls.crt` and `tls.key` last tried, loaded or not, so a bad pair is reported once.
    tried: Option<(Vec<u8>, Vec<u8>)>,
    /// The `ca.crt` last reported.
    ca: Option<Vec<u8>>,
}

impl Default for ServingState {
    fn default() -> Self {
        Self {
            secret: Seen::NotListed,
            validating: Seen::NotListed,
            mutating: Seen::NotListed,
            tried: None,
            ca: None,
        }
    }
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
            self.secret.is_listed() && self.validating.is_listed() && self.mutating.is_listed();
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

/// Serves the Secret's certificate on this replica until `shutdown` completes, and keeps
/// readiness in step.
///
/// Follows the Secret and both webhook configurations through the API (the shared watches of
/// [`crate::cluster::objects`]; no volume, so no kubelet delay), swaps a changed
/// `tls.crt`/`tls.key` into `resolver` atomically, and sets `readiness.set_certificate_ready`
/// on every change and at least every minute (certificates expire without any event).
pub async fn run_serving(
    mut objects: Objects,
    config: CertConfig,
    resolver: Arc<CertResolver>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let mut state = ServingState::default();
    let mut was_ready = None;
    tokio::pin!(shutdown);
    loop {
        state.secret = objects.secret();
        state.validating = objects.validating();
        state.mutating = objects.mutating();
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
        tokio::select! {
            () = &mut shutdown => break,
            changed = objects.changed() => if !changed { break },
            () = tokio::time::sleep(READINESS_RECHECK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;

    use super::super::test_support::{contents, mutating, secret, t0, validating};
    use super::*;

    fn listed<K>(object: K) -> Seen<K> {
        Seen::Present(Arc::new(object))
    }

    /// A serving state whose three watches have listed: the Secret, and both configurations
    /// with the given bundles.
    fn serving_state(
        secret: Option<Secret>,
        validating_bundles: &[(&str, Option<&str>)],
        mutating_bundles: &[(&str, Option<&str>)],
    ) -> ServingState {
        ServingState {
            secret: secret.map_or(Seen::Absent, listed),
            validating: listed(validating(validating_bundles)),
            mutating: listed(mutating(mutating_bundles)),
            ..ServingState::default()
        }
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
        state.secret = listed(broken);
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
        state.secret = listed(secret(&second));
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
        let mut state = ServingState { secret: listed(secret(&served)), ..ServingState::default() };
        assert!(!state.refresh(&config, t0(), &resolver, &metrics), "webhooks not listed yet");
        assert!(resolver.current_info().is_some(), "served as soon as it is known");
    }
}
