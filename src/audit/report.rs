//! OpenReports reports of the audit: one `Report` per namespace (one `ClusterReport` for
//! cluster-scoped objects), never one per object.
//!
//! The format is `openreports.io/v1alpha1` (module `github.com/openreports/reports-api`,
//! `apis/openreports.io/v1alpha1/report_types.go`): `source`, `summary` (pass, fail, warn,
//! error, skip) and `results`, each with `policy`, `rule`, `result`, `severity`, `message`,
//! `timestamp` and the object in `resources`. A report lists at most `max_results` entries
//! (failures first, then warnings, then passes) taking at most [`MAX_RESULTS_BYTES`], while its
//! summary counts every finding, and says so in `configuration.limits.maxResults`: a namespace with ten thousand pods costs one
//! bounded object in etcd, not ten thousand.
//!
//! A report is written only when its content changed ([`same_content`]): an entry that is
//! unchanged since the previous report keeps its timestamp, so re-auditing an unchanged
//! namespace yields the same object.

use std::collections::BTreeMap;

use serde_json::{Value, json};

pub use super::findings::{Findings, Summary};
use super::severity;

/// `apiVersion` of the reports.
pub const API_VERSION: &str = "openreports.io/v1alpha1";
/// `source` of the reports and their results.
pub const SOURCE: &str = "arcguard";
/// The name of arcguard's report in each namespace, and of its ClusterReport.
pub const REPORT_NAME: &str = "arcguard";
/// The label marking arcguard's reports.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "arcguard");
/// Entries listed per report by default.
pub const DEFAULT_MAX_RESULTS: usize = 1000;
/// The most bytes the listed entries of one report take (as JSON). etcd refuses objects over
/// 1.5 MiB (`--max-request-bytes`); a thousand entries of long messages could reach that, so
/// a report lists fewer entries rather than fail to be written.
pub const MAX_RESULTS_BYTES: usize = 1024 * 1024;

/// A report's timestamp: seconds and nanoseconds since the Unix epoch
/// (`metav1.Timestamp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    /// Seconds.
    pub seconds: i64,
    /// Nanoseconds within the second.
    pub nanos: i32,
}

/// The identity of an entry across reports: an unchanged entry keeps its timestamp.
fn entry_key(entry: &Value) -> String {
    let pick = |path: &str| entry.pointer(path).map(Value::to_string).unwrap_or_default();
    [
        pick("/policy"),
        pick("/result"),
        pick("/message"),
        pick("/resources/0/uid"),
        pick("/resources/0/kind"),
        pick("/resources/0/namespace"),
        pick("/resources/0/name"),
    ]
    .join("\u{1f}")
}

/// The length of `json` as the apiserver stores it: Go's encoding/json writes `<`, `>`, `&`,
/// U+2028 and U+2029 as six-byte `\u` escapes, so a message full of them takes up to six
/// times its length in etcd.
#[must_use]
pub fn stored_len(json: &str) -> usize {
    json.chars()
        .map(|c| match c {
            '<' | '>' | '&' => 6,
            '\u{2028}' | '\u{2029}' => 6,
            other => other.len_utf8(),
        })
        .sum()
}

/// The report for `namespace` (`None`: the ClusterReport) holding `findings`, listing at most
/// `max_results` entries in at most `max_bytes` (and [`MAX_RESULTS_BYTES`]) as the apiserver
/// stores them ([`stored_len`]). Entries equal to one in `previous` (the report as stored) keep its
/// timestamp; new ones get `now`.
#[must_use]
pub fn build(
    namespace: Option<&str>,
    findings: &Findings,
    max_results: usize,
    max_bytes: usize,
    previous: Option<&Value>,
    now: Timestamp,
) -> Value {
    let summary = findings.summary();
    let stamps: BTreeMap<String, Value> = previous
        .and_then(|p| p.get("results"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| Some((entry_key(r), r.get("timestamp")?.clone())))
        .collect();
    let mut bytes = 0usize;
    let budget = max_bytes.min(MAX_RESULTS_BYTES);
    let results: Vec<Value> = findings
        .entries()
        .into_iter()
        .take(max_results)
        .map(|(subject, finding, _)| {
            let mut resource = json!({
                "apiVersion": subject.api_version,
                "kind": subject.kind,
                "name": subject.name,
            });
            if let Some(ns) = &subject.namespace {
                resource["namespace"] = json!(ns);
            }
            if !subject.uid.is_empty() {
                resource["uid"] = json!(subject.uid);
            }
            let mut entry = json!({
                "source": SOURCE,
                "policy": finding.policy,
                "rule": finding.rule,
                "category": "arcguard",
                "severity": severity(finding.action),
                "result": finding.result.as_str(),
                "scored": true,
                "message": finding.message,
                "properties": {"action": finding.action.as_str()},
                "resources": [resource],
            });
            entry["timestamp"] = stamps
                .get(&entry_key(&entry))
                .cloned()
                .unwrap_or_else(|| json!({"seconds": now.seconds, "nanos": now.nanos}));
            entry
        })
        .take_while(|entry| {
            bytes += stored_len(&entry.to_string()) + 1;
            bytes <= budget
        })
        .collect();
    let kind = if namespace.is_some() { "Report" } else { "ClusterReport" };
    let mut metadata = json!({
        "name": REPORT_NAME,
        "labels": {MANAGED_BY.0: MANAGED_BY.1},
    });
    if let Some(ns) = namespace {
        metadata["namespace"] = json!(ns);
    }
    json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": metadata,
        "source": SOURCE,
        "configuration": {"limits": {"maxResults": max_results}},
        "summary": {
            "pass": summary.pass,
            "fail": summary.fail,
            "warn": summary.warn,
            "error": 0,
            "skip": 0,
        },
        "results": results,
    })
}

/// Whether `stored` (as read from the API) already says what `next` says: the same summary,
/// limits and results. Fields the API adds (metadata, defaults) are not compared.
#[must_use]
pub fn same_content(stored: &Value, next: &Value) -> bool {
    ["summary", "results", "configuration", "source"].iter().all(|field| {
        stored.get(*field).unwrap_or(&Value::Null) == next.get(*field).unwrap_or(&Value::Null)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditResult, Finding, Subject};
    use crate::policy::Action;

    fn subject(ns: &str, name: &str) -> Subject {
        Subject {
            api_version: "v1".to_owned(),
            kind: "Pod".to_owned(),
            namespace: Some(ns.to_owned()),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
        }
    }

    fn finding(policy: &str, action: Action, result: AuditResult, message: &str) -> Finding {
        Finding {
            policy: policy.to_owned(),
            rule: "trustedRegistries",
            action,
            result,
            message: message.to_owned(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    /// `count` pods judged by a Deny and a Warn policy; every third fails both, in `order`.
    fn findings_in(order: impl Iterator<Item = usize>) -> Findings {
        let mut findings = Findings::default();
        for i in order {
            let name = format!("pod-{i:03}");
            let (result, warn, message) = if i % 3 == 0 {
                (AuditResult::Fail, AuditResult::Warn, "bad image")
            } else {
                (AuditResult::Pass, AuditResult::Pass, "passed")
            };
            findings.record(
                &subject("shop", &name),
                vec![
                    finding("registries", Action::Deny, result, message),
                    finding("registries-warn", Action::Warn, warn, message),
                ],
            );
        }
        findings
    }

    fn findings(count: usize) -> Findings {
        findings_in(0..count)
    }

    #[test]
    fn one_report_per_namespace_in_the_openreports_format() {
        let report = build(Some("shop"), &findings(3), 100, MAX_RESULTS_BYTES, None, at(100));
        assert_eq!(report["apiVersion"], "openreports.io/v1alpha1");
        assert_eq!(report["kind"], "Report");
        assert_eq!(report["metadata"]["namespace"], "shop");
        assert_eq!(report["metadata"]["name"], "arcguard");
        assert_eq!(report["source"], "arcguard");
        assert_eq!(
            report["summary"],
            json!({"pass": 4, "fail": 1, "warn": 1, "error": 0, "skip": 0})
        );
        let first = &report["results"][0];
        assert_eq!(first["result"], "fail");
        assert_eq!(first["severity"], "high");
        assert_eq!(first["policy"], "registries");
        assert_eq!(first["message"], "bad image");
        assert_eq!(first["timestamp"], json!({"seconds": 100, "nanos": 0}));
        assert_eq!(
            first["resources"],
            json!([{"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "pod-000", "uid": "uid-pod-000"}])
        );
        assert_eq!(report["results"][1]["result"], "warn");
        assert_eq!(report["results"][1]["severity"], "low");
        let cluster = build(None, &Findings::default(), 100, MAX_RESULTS_BYTES, None, at(1));
        assert_eq!(cluster["kind"], "ClusterReport");
        assert!(cluster["metadata"].get("namespace").is_none());
    }

    #[test]
    fn a_report_lists_a_bounded_number_of_entries_failures_first_and_counts_them_all() {
        let report = build(Some("shop"), &findings(900), 50, MAX_RESULTS_BYTES, None, at(1));
        let results = report["results"].as_array().expect("results");
        assert_eq!(results.len(), 50);
        assert!(results.iter().all(|r| r["result"] == "fail"), "300 failures come first");
        assert_eq!(report["summary"]["fail"], 300);
        assert_eq!(report["summary"]["warn"], 300);
        assert_eq!(report["summary"]["pass"], 1200);
        assert_eq!(report["configuration"]["limits"]["maxResults"], 50);
    }

    #[test]
    fn an_unchanged_audit_yields_the_same_report_and_only_new_entries_get_a_new_time() {
        let first = build(Some("shop"), &findings(6), 100, MAX_RESULTS_BYTES, None, at(100));
        // The same findings in another order, an hour later: the same content, nothing to write.
        let shuffled = findings_in((0..6).rev());
        let again = build(Some("shop"), &shuffled, 100, MAX_RESULTS_BYTES, Some(&first), at(3700));
        assert!(same_content(&first, &again));
        // A fixed pod: its entry changes (and gets the new time); the others keep theirs.
        let mut fixed = findings_in(1..6);
        fixed.record(
            &subject("shop", "pod-000"),
            vec![
                finding("registries", Action::Deny, AuditResult::Pass, "passed"),
                finding("registries-warn", Action::Warn, AuditResult::Warn, "bad image"),
            ],
        );
        let next = build(Some("shop"), &fixed, 100, MAX_RESULTS_BYTES, Some(&first), at(7300));
        assert!(!same_content(&first, &next));
        let stamps: Vec<i64> = next["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["timestamp"]["seconds"].as_i64().unwrap_or_default())
            .collect();
        assert_eq!(stamps.iter().filter(|s| **s == 7300).count(), 1, "{stamps:?}");
        assert_eq!(next["summary"]["fail"], 1);
        // Stored with what the API adds: still the same content.
        let mut stored = first.clone();
        stored["metadata"]["resourceVersion"] = json!("42");
        stored["metadata"]["uid"] = json!("u");
        assert!(same_content(&stored, &again));
    }

    #[test]
    fn a_report_of_long_messages_stays_within_its_byte_bound() {
        let mut findings = Findings::default();
        let long = "x".repeat(crate::audit::MAX_MESSAGE_BYTES);
        for i in 0..2000 {
            findings.record(
                &subject("shop", &format!("pod-{i:04}")),
                vec![finding("registries", Action::Deny, AuditResult::Fail, &long)],
            );
        }
        let report = build(Some("shop"), &findings, 1000, MAX_RESULTS_BYTES, None, at(1));
        let results = report["results"].as_array().expect("results");
        let bytes: usize = results.iter().map(|r| r.to_string().len() + 1).sum();
        assert!(bytes <= MAX_RESULTS_BYTES, "{bytes}");
        assert!(results.len() > 500 && results.len() < 1000, "{}", results.len());
        assert_eq!(report["summary"]["fail"], 2000, "the summary counts every finding");
        assert!(report.to_string().len() < 1536 * 1024, "under etcd's request limit");

        // Messages of `<` (a Calico selector quoted back): six bytes each once stored.
        let mut escaped = Findings::default();
        let angles = "<".repeat(crate::audit::MAX_MESSAGE_BYTES);
        for i in 0..2000 {
            escaped.record(
                &subject("shop", &format!("pod-{i:04}")),
                vec![finding("registries", Action::Deny, AuditResult::Fail, &angles)],
            );
        }
        let report = build(Some("shop"), &escaped, 1000, MAX_RESULTS_BYTES, None, at(1));
        let stored = stored_len(&report.to_string());
        assert!(stored < 1536 * 1024, "under etcd's request limit as stored: {stored}");
        assert!(report["results"].as_array().is_some_and(|r| r.len() > 100), "still lists");
        // A smaller budget (a write that was refused as too large): fewer entries.
        let half = build(Some("shop"), &escaped, 1000, MAX_RESULTS_BYTES / 2, None, at(1));
        let listed = |r: &Value| r["results"].as_array().map_or(0, Vec::len);
        assert!(listed(&half) < listed(&report) && listed(&half) > 0);
        assert_eq!(stored_len("a<é\u{2028}"), 1 + 6 + 2 + 6);
    }
}
