//! What `arcguard audit` prints, and its exit code: the findings of a one-off audit grouped by
//! object, as text (one line per object, one per finding, a summary) or as a JSON document.
//!
//! An object's verdict is its worst finding: `FAIL` when a Deny policy fails (admission would
//! refuse the object now; exit code 1), `AUDIT` when only an Audit policy fails (it would be
//! refused once that policy is switched to Deny), `WARN` when only a Warn policy fails, `PASS`
//! when every policy that applies passes. Objects no policy applies to are listed in the
//! totals only. Pure: the shell lists the objects and prints what this returns.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;

pub use super::findings::Verdict;
use super::findings::{Findings, Verdicts};
use super::{AuditResult, Finding, Subject, severity};
use crate::policy::Action;

/// Exit code when a Deny policy fails on some existing object.
pub const EXIT_DENIED: u8 = 1;
/// Exit code when the audit could not run (no cluster, bad flags, a failed list).
pub const EXIT_ERROR: u8 = 2;

/// One object and what every policy that applies to it concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectResult {
    /// The object.
    pub subject: Subject,
    /// Its verdict.
    pub verdict: Verdict,
    /// One per policy that applies, failures first, then by policy.
    pub findings: Vec<Finding>,
}

/// Counts of the audit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Objects listed (of every inspected kind).
    pub listed: usize,
    /// Objects at least one policy applies to (one result each).
    pub objects: usize,
    /// Objects whose verdict is `fail`.
    pub fail: usize,
    /// Objects whose verdict is `audit`.
    pub audit: usize,
    /// Objects whose verdict is `warn`.
    pub warn: usize,
    /// Objects whose verdict is `pass`.
    pub pass: usize,
    /// Failing findings (fail or warn) not listed in the results (beyond `--max-results` in
    /// their namespace); their objects are counted in these totals.
    pub omitted: usize,
}

/// The whole audit, ready to print.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditOutput {
    /// One per object a policy applies to, by namespace (cluster-scoped objects first), kind
    /// and name.
    pub results: Vec<ObjectResult>,
    /// The counts.
    pub totals: Totals,
}

/// Groups the listed findings of every scope by object and adds up every scope's counts;
/// `listed` is the number of objects listed. An object some of whose findings were not kept
/// (beyond its scope's limit) shows the findings kept and its verdict over all of them; the
/// totals count every object.
#[must_use]
pub fn summarise<'a>(scopes: impl IntoIterator<Item = &'a Findings>, listed: usize) -> AuditOutput {
    let mut by_object: BTreeMap<(Option<String>, String, String, String, String), ObjectResult> =
        BTreeMap::new();
    let mut verdicts = Verdicts::default();
    let mut omitted = 0;
    for scope in scopes {
        verdicts = verdicts.plus(scope.verdicts());
        omitted += scope.omitted_failures();
        for (subject, finding, verdict) in scope.entries() {
            let key = (
                subject.namespace.clone(),
                subject.kind.clone(),
                subject.name.clone(),
                subject.api_version.clone(),
                subject.uid.clone(),
            );
            by_object
                .entry(key)
                .or_insert_with(|| ObjectResult {
                    subject: subject.clone(),
                    verdict,
                    findings: Vec::new(),
                })
                .findings
                .push(finding.clone());
        }
    }
    let results: Vec<ObjectResult> = by_object
        .into_values()
        .map(|mut object| {
            object.findings.sort_by(|a, b| (a.result, &a.policy).cmp(&(b.result, &b.policy)));
            object
        })
        .collect();
    let totals = Totals {
        listed,
        objects: verdicts.objects,
        fail: verdicts.fail,
        audit: verdicts.audit,
        warn: verdicts.warn,
        pass: verdicts.pass,
        omitted,
    };
    AuditOutput { results, totals }
}

/// Whether a Deny policy fails on some object.
#[must_use]
pub fn any_denied(output: &AuditOutput) -> bool {
    output.totals.fail > 0
}

/// The exit code of an audit that ran: [`EXIT_DENIED`] when a Deny policy fails on some
/// object, 0 otherwise (Audit and Warn findings are printed but do not fail).
#[must_use]
pub fn exit_code(output: &AuditOutput) -> u8 {
    if any_denied(output) { EXIT_DENIED } else { 0 }
}

/// How a failing finding is introduced in the text output, by its policy's action.
fn finding_label(action: Action) -> &'static str {
    match action {
        Action::Deny => "deny",
        Action::Audit => "audit",
        Action::Warn => "warn",
    }
}

/// One line per object (`FAIL`, `AUDIT`, `WARN`, `PASS`, its kind and `namespace/name`), one
/// indented line per failing finding (`deny:`, `audit:`, `warn:`, the policy and what is
/// wrong), then a summary line.
#[must_use]
pub fn render_text(output: &AuditOutput) -> String {
    let mut out = String::new();
    for object in &output.results {
        let subject = &object.subject;
        let _ = writeln!(out, "{} {} {}", object.verdict.label(), subject.kind, subject.display());
        for finding in object.findings.iter().filter(|f| f.result != AuditResult::Pass) {
            let label = finding_label(finding.action);
            let _ = writeln!(out, "  {label}: {}: {}", finding.policy, finding.message);
        }
    }
    let t = &output.totals;
    if t.omitted > 0 {
        let _ = writeln!(
            out,
            "{} failing findings not shown (beyond --max-results in their namespace); the totals count their objects",
            t.omitted
        );
    }
    let _ = writeln!(
        out,
        "{} objects judged ({} listed): {} failed, {} failed an Audit policy, {} warned, {} passed",
        t.objects, t.listed, t.fail, t.audit, t.warn, t.pass
    );
    out
}

/// The audit as a JSON document: `{"results": [...], "totals": {...}, "denied": bool}`, each
/// result the object (`apiVersion`, `kind`, `namespace`, `name`, `uid`), its `verdict` and its
/// `findings` (`policy`, `rule`, `action`, `result`, `severity`, `message`), passes included.
#[must_use]
pub fn render_json(output: &AuditOutput) -> String {
    let results: Vec<serde_json::Value> = output
        .results
        .iter()
        .map(|object| {
            let findings: Vec<serde_json::Value> = object
                .findings
                .iter()
                .map(|f| {
                    json!({
                        "policy": f.policy,
                        "rule": f.rule,
                        "action": f.action.as_str(),
                        "result": f.result.as_str(),
                        "severity": severity(f.action),
                        "message": f.message,
                    })
                })
                .collect();
            let mut value = serde_json::to_value(&object.subject).unwrap_or_default();
            value["verdict"] = json!(object.verdict);
            value["findings"] = json!(findings);
            value
        })
        .collect();
    let doc = json!({"results": results, "totals": output.totals, "denied": any_denied(output)});
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn subject(namespace: Option<&str>, kind: &str, name: &str) -> Subject {
        Subject {
            api_version: "v1".to_owned(),
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
        }
    }

    fn finding(policy: &str, action: Action, fails: bool) -> Finding {
        let result = match (fails, action) {
            (false, _) => AuditResult::Pass,
            (true, Action::Warn) => AuditResult::Warn,
            (true, _) => AuditResult::Fail,
        };
        let message = if fails { format!("{policy} is broken") } else { "passed".to_owned() };
        Finding { policy: policy.to_owned(), rule: "trustedRegistries", action, result, message }
    }

    /// A namespace with a pod failing each kind of policy and one passing, and a cluster
    /// scope with one passing object.
    fn scopes() -> Vec<Findings> {
        let shop = |name: &str| subject(Some("shop"), "Pod", name);
        let shop_entries = vec![
            (shop("denied"), finding("deny", Action::Deny, true)),
            (shop("denied"), finding("warn", Action::Warn, true)),
            (shop("denied"), finding("audit", Action::Audit, true)),
            (shop("audited"), finding("deny", Action::Deny, false)),
            (shop("audited"), finding("audit", Action::Audit, true)),
            (shop("audited"), finding("warn", Action::Warn, true)),
            (shop("warned"), finding("deny", Action::Deny, false)),
            (shop("warned"), finding("warn", Action::Warn, true)),
            (shop("clean"), finding("deny", Action::Deny, false)),
        ];
        let cluster = vec![(
            subject(None, "GlobalNetworkPolicy", "global"),
            finding("calico", Action::Deny, false),
        )];
        [cluster, shop_entries]
            .into_iter()
            .map(|entries| {
                let mut findings = Findings::default();
                let mut entries = entries.into_iter().peekable();
                while let Some((subject, first)) = entries.next() {
                    let mut of_object = vec![first];
                    while let Some((_, next)) = entries.next_if(|(s, _)| *s == subject) {
                        of_object.push(next);
                    }
                    findings.record(&subject, of_object);
                }
                findings
            })
            .collect()
    }

    #[test]
    fn an_objects_verdict_is_its_worst_failing_policy_action() {
        let output = summarise(&scopes(), 12);
        let verdicts: Vec<(String, Verdict)> =
            output.results.iter().map(|r| (r.subject.display(), r.verdict)).collect();
        assert_eq!(
            verdicts,
            [
                ("global".to_owned(), Verdict::Pass),
                ("shop/audited".to_owned(), Verdict::Audit),
                ("shop/clean".to_owned(), Verdict::Pass),
                ("shop/denied".to_owned(), Verdict::Fail),
                ("shop/warned".to_owned(), Verdict::Warn),
            ]
        );
        assert_eq!(
            output.totals,
            Totals { listed: 12, objects: 5, fail: 1, audit: 1, warn: 1, pass: 2, omitted: 0 }
        );
        assert_eq!(Verdict::of(&[]), Verdict::Pass);
    }

    #[test]
    fn the_exit_code_is_one_only_when_a_deny_policy_fails() {
        assert_eq!(exit_code(&summarise(&scopes(), 12)), EXIT_DENIED);
        // The same objects without the pod a Deny policy fails on: Audit and Warn findings
        // are printed, but do not fail.
        let mut without = scopes();
        let shop = &mut without[1];
        *shop = Findings::default();
        let s = |name: &str| subject(Some("shop"), "Pod", name);
        shop.record(
            &s("audited"),
            vec![finding("deny", Action::Deny, false), finding("audit", Action::Audit, true)],
        );
        shop.record(&s("warned"), vec![finding("warn", Action::Warn, true)]);
        let output = summarise(&without, 11);
        assert!(!any_denied(&output));
        assert_eq!(exit_code(&output), 0);
        assert_eq!(exit_code(&summarise(&[], 0)), 0, "nothing to judge: nothing denied");
        assert_ne!(EXIT_ERROR, EXIT_DENIED);
    }

    #[test]
    fn text_names_each_failing_policy_under_its_object_and_ends_with_the_totals() {
        let text = render_text(&summarise(&scopes(), 12));
        let expected = "\
PASS GlobalNetworkPolicy global
AUDIT Pod shop/audited
  audit: audit: audit is broken
  warn: warn: warn is broken
PASS Pod shop/clean
FAIL Pod shop/denied
  audit: audit: audit is broken
  deny: deny: deny is broken
  warn: warn: warn is broken
WARN Pod shop/warned
  warn: warn: warn is broken
5 objects judged (12 listed): 1 failed, 1 failed an Audit policy, 1 warned, 2 passed
";
        assert_eq!(text, expected);
        assert_eq!(
            render_text(&AuditOutput::default()),
            "0 objects judged (0 listed): 0 failed, 0 failed an Audit policy, 0 warned, 0 passed\n"
        );
    }

    #[test]
    fn json_holds_every_finding_with_its_severity_and_the_totals() {
        let doc: Value =
            serde_json::from_str(&render_json(&summarise(&scopes(), 12))).expect("JSON");
        assert_eq!(doc["denied"], true);
        assert_eq!(
            doc["totals"],
            json!({"listed": 12, "objects": 5, "fail": 1, "audit": 1, "warn": 1, "pass": 2, "omitted": 0})
        );
        let denied = &doc["results"][3];
        assert_eq!(denied["kind"], "Pod");
        assert_eq!(denied["namespace"], "shop");
        assert_eq!(denied["name"], "denied");
        assert_eq!(denied["uid"], "uid-denied");
        assert_eq!(denied["verdict"], "fail");
        let deny = denied["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .find(|f| f["policy"] == "deny")
            .expect("the Deny policy's finding");
        assert_eq!(
            *deny,
            json!({"policy": "deny", "rule": "trustedRegistries", "action": "Deny",
                   "result": "fail", "severity": "high", "message": "deny is broken"})
        );
        let global = &doc["results"][0];
        assert!(global.get("namespace").is_none(), "{global}");
        assert_eq!(global["findings"][0]["result"], "pass");
    }
}
