//! Prometheus metrics: admission requests, policy results, policy and certificate reloads,
//! certificate rotations, CA bundle injections, leadership, the background audit, and the
//! registry reads of imageProvenance.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::pipeline::{Decision, Webhook};
use crate::policy::PolicySet;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Request-duration buckets in seconds: sub-millisecond resolution where arcguard lives,
/// up to the apiserver's webhook timeouts.
const DURATION_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    webhook: &'static str,
    kind: &'static str,
    operation: &'static str,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    webhook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyResultLabels {
    policy: String,
    rule: &'static str,
    action: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    rule: &'static str,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    certificate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigurationLabels {
    configuration: &'static str,
}

/// Registry-read durations in seconds: a cached answer costs nothing, a read on loopback about
/// a millisecond, one across the internet tens to hundreds, up to the deadline (30 s cap).
const REGISTRY_BUCKETS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 10.0];

/// Labels of a lookup for a request: what was looked up, where the answer came from, and
/// what it was.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    lookup: &'static str,
    source: &'static str,
    result: &'static str,
}

/// Labels of a registry read: what was read, and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    read: &'static str,
    result: &'static str,
}

/// Labels of registry-read durations: what was read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadKindLabels {
    read: &'static str,
}

/// Every metric arcguard exports, registered under the `arcguard` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<WebhookLabels, Histogram>,
    policy_results: Family<PolicyResultLabels, Counter>,
    policies: Family<PolicyLabels, Gauge>,
    policy_reloads: Family<ResultLabels, Counter>,
    certificate_reloads: Family<ResultLabels, Counter>,
    certificate_expiry: Family<CertificateLabels, Gauge<f64, AtomicU64>>,
    certificate_rotations: Family<ReasonLabels, Counter>,
    ca_bundle_injections: Family<ConfigurationLabels, Counter>,
    leader: Gauge,
    pods_unlabelled: Gauge,
    pods_labelled: Family<ResultLabels, Counter>,
    budget_rejections: Counter,
    webhooks_fail_open: Gauge,
    failure_policy_decisions: Counter,
    audit_results: Family<AuditLabels, Gauge>,
    audit_last_run: Gauge,
    audit_runs: Family<AuditRunLabels, Counter>,
    audit_interval: Gauge,
    audit_failed_scopes: Gauge,
    registry_lookups: Family<LookupLabels, Counter>,
    registry_reads: Family<ReadLabels, Counter>,
    registry_read_duration: Family<ReadKindLabels, Histogram>,
}

/// Labels of the audit's runs: how a run ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditRunLabels {
    outcome: &'static str,
}

/// Labels of the audit's results: the policy (bounded by the policies in force) and the result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditLabels {
    policy: String,
    result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("arcguard");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "AdmissionReview requests by webhook, kind, operation and decision (allowed, denied, patched, invalid)",
            requests.clone(),
        );
        let duration = Family::<WebhookLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(DURATION_BUCKETS)
        });
        registry.register(
            "admission_request_duration_seconds",
            "Time from a complete request body to its encoded response, by webhook",
            duration.clone(),
        );
        let policy_results = Family::<PolicyResultLabels, Counter>::default();
        registry.register(
            "policy_results",
            "Policy evaluations by policy, rule, action and result (pass or fail)",
            policy_results.clone(),
        );
        let policies = Family::<PolicyLabels, Gauge>::default();
        registry.register("policies", "Policies in force by rule and action", policies.clone());
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy set reloads by result; on failure the previous set stays in force",
            policy_reloads.clone(),
        );
        let certificate_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificate_reloads",
            "Serving certificate reloads by result; on failure the previous certificate stays in use",
            certificate_reloads.clone(),
        );
        let certificate_expiry = Family::<CertificateLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Unix time at which a certificate in use expires",
            certificate_expiry.clone(),
        );
        let certificate_rotations = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "certificate_rotations",
            "Writes of the certificate Secret by reason (created, renewed, ca-rotation-started, ca-switched, old-ca-dropped, revoked, repaired)",
            certificate_rotations.clone(),
        );
        let ca_bundle_injections = Family::<ConfigurationLabels, Counter>::default();
        registry.register(
            "ca_bundle_injections",
            "CA bundle writes into arcguard's webhook configurations (validating or mutating); repeated ones mean someone resets them",
            ca_bundle_injections.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and writes certificates, else 0",
            leader.clone(),
        );
        let pods_unlabelled = Gauge::default();
        registry.register(
            "pods_unlabelled",
            "Pods the last labeller pass could not give a true OS label yet (unbound without an OS signal, on an unknown node, or a failed write); 0 when no policy labels pods",
            pods_unlabelled.clone(),
        );
        let pods_labelled = Family::<ResultLabels, Counter>::default();
        registry.register(
            "pods_labelled",
            "OS label writes to existing pods by the leader's labeller, by result (labelled, failed)",
            pods_labelled.clone(),
        );
        let budget_rejections = Counter::default();
        registry.register(
            "memory_budget_rejections",
            "Webhook requests refused with 503 because the in-flight memory budget stayed full for the wait",
            budget_rejections.clone(),
        );
        let webhooks_fail_open = Gauge::default();
        registry.register(
            "webhooks_fail_open",
            "On the leader: arcguard's webhooks whose failurePolicy is not yet the annotated one (Fail), because the leader is not ready, a caBundle is missing or the Service has no ready endpoint; 0 on followers",
            webhooks_fail_open.clone(),
        );
        let failure_policy_decisions = Counter::default();
        registry.register(
            "webhook_failure_policy_decisions",
            "Decisions the leader took about its webhooks' failurePolicy (one per configuration and wake-up)",
            failure_policy_decisions.clone(),
        );
        let audit_results = Family::<AuditLabels, Gauge>::default();
        registry.register(
            "audit_results",
            "On the leader: existing objects by policy and result (pass, fail, warn) in the last background audit",
            audit_results.clone(),
        );
        let audit_last_run = Gauge::default();
        registry.register(
            "audit_last_run_timestamp_seconds",
            "On the leader: Unix time at which the last background audit that judged every scope it set out to finished",
            audit_last_run.clone(),
        );
        let audit_runs = Family::<AuditRunLabels, Counter>::default();
        // Every outcome from 0, so increase() sees the first partial or failed run.
        for outcome in ["complete", "partial", "failed"] {
            let _ = audit_runs.get_or_create(&AuditRunLabels { outcome });
        }
        registry.register(
            "audit_runs",
            "Background audit runs by outcome: complete, partial (some namespaces could not be listed or reported; the others were) or failed",
            audit_runs.clone(),
        );
        let audit_interval = Gauge::default();
        registry.register(
            "audit_interval_seconds",
            "The background audit's --audit-interval in seconds; 0 when the audit is off",
            audit_interval.clone(),
        );
        let audit_failed_scopes = Gauge::default();
        registry.register(
            "audit_failed_namespaces",
            "On the leader: namespaces (and the cluster scope) whose last audit failed and waits for a retry; the leader's log names each",
            audit_failed_scopes.clone(),
        );
        let registry_lookups = Family::<LookupLabels, Counter>::default();
        let registry_read_duration =
            Family::<ReadKindLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(REGISTRY_BUCKETS)
            });
        // Every series from 0 (a dashboard and increase() see them before the first image);
        // an unreachable answer is never cached.
        for (lookup, results) in [
            ("image", ["found", "refused", "unreachable"]),
            ("signatures", ["verified", "rejected", "unreachable"]),
        ] {
            for source in ["cache", "read"] {
                for result in results {
                    if source == "cache" && result == "unreachable" {
                        continue;
                    }
                    let _ =
                        registry_lookups.get_or_create(&LookupLabels { lookup, source, result });
                }
            }
        }
        for read in ["image", "signatures"] {
            let _ = registry_read_duration.get_or_create(&ReadKindLabels { read });
        }
        registry.register(
            "registry_lookups",
            "imageProvenance: lookups for admission requests by what was looked up (image, signatures), source (cache, or read: a registry read the request started or joined, unreachable when it did not end within --registry-timeout) and result (found, refused or unreachable for images; verified, rejected or unreachable for signatures)",
            registry_lookups.clone(),
        );
        let registry_reads = Family::<ReadLabels, Counter>::default();
        // Every outcome from 0, so increase() sees the first unreachable registry.
        for (read, results) in [
            ("image", ["found", "refused", "unreachable"]),
            ("signatures", ["verified", "rejected", "unreachable"]),
        ] {
            for result in results {
                let _ = registry_reads.get_or_create(&ReadLabels { read, result });
            }
        }
        registry.register(
            "registry_reads",
            "imageProvenance: reads from registries by what was read (image: its manifest and config; signatures: what a trust looks for) and result; concurrent requests for one image share one read",
            registry_reads.clone(),
        );
        registry.register(
            "registry_read_duration_seconds",
            "imageProvenance: time a registry read took, by what was read; a read that misses a request's deadline goes on (up to 30 s) to fill the cache",
            registry_read_duration.clone(),
        );
        Self {
            registry_lookups,
            registry_reads,
            registry_read_duration,
            audit_runs,
            audit_interval,
            audit_failed_scopes,
            webhooks_fail_open,
            failure_policy_decisions,
            audit_results,
            audit_last_run,
            registry,
            requests,
            duration,
            policy_results,
            policies,
            policy_reloads,
            certificate_reloads,
            certificate_expiry,
            certificate_rotations,
            ca_bundle_injections,
            leader,
            pods_unlabelled,
            pods_labelled,
            budget_rejections,
        }
    }

    /// Counts one lookup for a request: `lookup` is `image` or `signatures`, `source` is
    /// `cache` or `read`.
    pub fn record_registry_lookup(
        &self,
        lookup: &'static str,
        source: &'static str,
        result: &'static str,
    ) {
        self.registry_lookups.get_or_create(&LookupLabels { lookup, source, result }).inc();
    }

    /// Counts one registry read (`image` or `signatures`) and its duration.
    pub fn record_registry_read(&self, read: &'static str, result: &'static str, took: Duration) {
        self.registry_reads.get_or_create(&ReadLabels { read, result }).inc();
        self.registry_read_duration
            .get_or_create(&ReadKindLabels { read })
            .observe(took.as_secs_f64());
    }

    /// Sets how many of arcguard's webhooks are not yet at their annotated failurePolicy.
    pub fn set_webhooks_fail_open(&self, count: i64) {
        self.webhooks_fail_open.set(count);
    }

    /// Counts one failurePolicy decision of the leader.
    pub fn record_failure_policy_decision(&self) {
        self.failure_policy_decisions.inc();
    }

    /// Replaces the audit's results: `(policy, [pass, fail, warn])` for every policy in force;
    /// `complete`: the time a run that judged every scope it set out to finished (Unix
    /// seconds).
    pub fn set_audit_results(
        &self,
        results: impl IntoIterator<Item = (String, [u64; 3])>,
        complete: Option<i64>,
    ) {
        self.audit_results.clear();
        for (policy, counts) in results {
            for (result, count) in ["pass", "fail", "warn"].into_iter().zip(counts) {
                self.audit_results
                    .get_or_create(&AuditLabels { policy: policy.clone(), result })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
        if let Some(finished) = complete {
            self.audit_last_run.set(finished);
        }
    }

    /// Counts one audit run by `outcome` (`complete`, `partial` or `failed`).
    pub fn record_audit_run(&self, outcome: &'static str) {
        self.audit_runs.get_or_create(&AuditRunLabels { outcome }).inc();
    }

    /// Sets the number of scopes whose last audit failed.
    pub fn set_audit_failed_namespaces(&self, count: usize) {
        self.audit_failed_scopes.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Sets the audit interval gauge (seconds; 0: off).
    pub fn set_audit_interval(&self, seconds: i64) {
        self.audit_interval.set(seconds);
    }

    /// Counts one request refused for the memory budget.
    pub fn record_budget_rejection(&self) {
        self.budget_rejections.inc();
    }

    /// Records one reviewed request.
    pub fn record_decision(&self, webhook: Webhook, decision: &Decision, elapsed: Duration) {
        let summary = &decision.summary;
        let outcome = match (summary.allowed, summary.patched) {
            (false, _) => "denied",
            (true, true) => "patched",
            (true, false) => "allowed",
        };
        self.requests
            .get_or_create(&RequestLabels {
                webhook: webhook.as_str(),
                kind: summary.kind,
                operation: summary.operation.as_str(),
                decision: outcome,
            })
            .inc();
        for result in &summary.results {
            self.policy_results
                .get_or_create(&PolicyResultLabels {
                    policy: result.policy.clone(),
                    rule: result.rule,
                    action: result.action.as_str(),
                    result: if result.passed { "pass" } else { "fail" },
                })
                .inc();
        }
        self.observe_duration(webhook, elapsed);
    }

    /// Records a request that was not a valid AdmissionReview.
    pub fn record_invalid(&self, webhook: Webhook, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                webhook: webhook.as_str(),
                kind: "unknown",
                operation: "unknown",
                decision: "invalid",
            })
            .inc();
        self.observe_duration(webhook, elapsed);
    }

    fn observe_duration(&self, webhook: Webhook, elapsed: Duration) {
        self.duration
            .get_or_create(&WebhookLabels { webhook: webhook.as_str() })
            .observe(elapsed.as_secs_f64());
    }

    /// Records a policy reload and, on success, the set now in force.
    pub fn record_policy_reload(&self, loaded: Option<&PolicySet>) {
        let result = if loaded.is_some() { "success" } else { "failure" };
        self.policy_reloads.get_or_create(&ResultLabels { result }).inc();
        if let Some(set) = loaded {
            self.set_policies(set);
        }
    }

    /// Sets the policies-in-force gauge from a set.
    pub fn set_policies(&self, set: &PolicySet) {
        self.policies.clear();
        for policy in set.policies() {
            self.policies
                .get_or_create(&PolicyLabels {
                    rule: policy.rule.name(),
                    action: policy.action.as_str(),
                })
                .inc();
        }
    }

    /// Records a certificate reload; on success, `not_after` is the new certificate's expiry.
    pub fn record_certificate(&self, certificate: &'static str, not_after: Option<i64>) {
        let result = if not_after.is_some() { "success" } else { "failure" };
        self.certificate_reloads.get_or_create(&ResultLabels { result }).inc();
        if let Some(not_after) = not_after {
            // Unix timestamps fit exactly in an f64 for the next 285 million years.
            #[allow(clippy::cast_precision_loss)]
            let ts = not_after as f64;
            self.certificate_expiry.get_or_create(&CertificateLabels { certificate }).set(ts);
        }
    }

    /// Sets (or, with `None`, removes) the expiry of `certificate` (`ca` or `serving`) without
    /// counting a reload.
    pub fn set_certificate_expiry(&self, certificate: &'static str, not_after: Option<i64>) {
        let labels = CertificateLabels { certificate };
        match not_after {
            // Unix timestamps fit exactly in an f64 for the next 285 million years.
            #[allow(clippy::cast_precision_loss)]
            Some(not_after) => {
                self.certificate_expiry.get_or_create(&labels).set(not_after as f64);
            }
            None => {
                self.certificate_expiry.remove(&labels);
            }
        }
    }

    /// Counts one write of the certificate Secret, by reason.
    pub fn record_certificate_rotation(&self, reason: &'static str) {
        self.certificate_rotations.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts one CA bundle write into a webhook configuration (`validating` or `mutating`).
    pub fn record_ca_bundle_injection(&self, configuration: &'static str) {
        self.ca_bundle_injections.get_or_create(&ConfigurationLabels { configuration }).inc();
    }

    /// Sets how many pods the last labeller pass left without a true OS label.
    pub fn set_pods_unlabelled(&self, count: i64) {
        self.pods_unlabelled.set(count);
    }

    /// Counts one OS label write to an existing pod (`labelled` or `failed`).
    pub fn record_pod_labelled(&self, result: &'static str) {
        self.pods_labelled.get_or_create(&ResultLabels { result }).inc();
    }

    /// Sets whether this replica is the leader.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_every_family_with_conventional_names() {
        let metrics = Metrics::new();
        metrics.record_invalid(Webhook::Validate, Duration::from_micros(30));
        metrics.record_policy_reload(None);
        metrics.record_certificate("serving", Some(1_900_000_000));
        metrics.set_certificate_expiry("ca", Some(2_000_000_000));
        metrics.record_certificate_rotation("ca-switched");
        metrics.record_ca_bundle_injection("mutating");
        metrics.set_leader(true);
        let text = metrics.encode();
        for line in [
            "arcguard_admission_requests_total{webhook=\"validate\",kind=\"unknown\",operation=\"unknown\",decision=\"invalid\"} 1",
            "arcguard_admission_request_duration_seconds_bucket{le=\"0.00005\",webhook=\"validate\"} 1",
            "arcguard_policy_reloads_total{result=\"failure\"} 1",
            "arcguard_certificate_expiry_timestamp_seconds{certificate=\"serving\"} 1900000000.0",
            "arcguard_certificate_expiry_timestamp_seconds{certificate=\"ca\"} 2000000000.0",
            "arcguard_certificate_rotations_total{reason=\"ca-switched\"} 1",
            "arcguard_ca_bundle_injections_total{configuration=\"mutating\"} 1",
            "arcguard_leader 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn leadership_and_expiry_can_be_taken_back() {
        let metrics = Metrics::new();
        metrics.set_leader(true);
        metrics.set_leader(false);
        metrics.set_certificate_expiry("serving", Some(1));
        metrics.set_certificate_expiry("serving", None);
        let text = metrics.encode();
        assert!(text.contains("arcguard_leader 0"), "{text}");
        assert!(!text.contains("certificate=\"serving\""), "{text}");
        assert!(!text.contains("arcguard_certificate_reloads_total{"), "no reload counted: {text}");
    }
}
