//! The findings of one scope (a namespace, or the cluster), held in bounded memory.
//!
//! A namespace can hold tens of thousands of objects, each judged by every policy that
//! applies. [`Findings`] keeps only the `limit` entries a report or `arcguard audit` lists,
//! failures first (a bounded max-heap: each new entry costs O(log limit) and evicts the one
//! ranked last), and counts every finding: by policy and result (a report's `summary`, a
//! policy's `status.audit`) and every object by its [`Verdict`] (`arcguard audit`'s totals).
//! Memory is `limit` entries, each at most a message of [`super::MAX_MESSAGE_BYTES`] and an
//! object reference, plus one counter triple per policy, whatever the namespace holds.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use serde::Serialize;

use super::{AuditResult, Finding, Subject};
use crate::policy::Action;

/// What became of one object, worst first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// A Deny policy fails.
    Fail,
    /// An Audit policy fails, no Deny policy does.
    Audit,
    /// A Warn policy fails, no Deny or Audit policy does.
    Warn,
    /// Every policy that applies passes.
    Pass,
}

impl Verdict {
    /// The verdict of an object with these findings.
    #[must_use]
    pub fn of(findings: &[Finding]) -> Self {
        findings.iter().filter(|f| f.result != AuditResult::Pass).fold(Self::Pass, |worst, f| {
            let this = match f.action {
                Action::Deny => Self::Fail,
                Action::Audit => Self::Audit,
                Action::Warn => Self::Warn,
            };
            worst.min(this)
        })
    }

    /// As the text output spells it.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Fail => "FAIL",
            Self::Audit => "AUDIT",
            Self::Warn => "WARN",
            Self::Pass => "PASS",
        }
    }
}

/// Findings counted by result, as a report's `summary` holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Passed.
    pub pass: usize,
    /// Failed (Deny and Audit policies).
    pub fail: usize,
    /// Warned (Warn policies).
    pub warn: usize,
}

impl Summary {
    fn add(&mut self, result: AuditResult) {
        match result {
            AuditResult::Pass => self.pass += 1,
            AuditResult::Fail => self.fail += 1,
            AuditResult::Warn => self.warn += 1,
        }
    }

    /// Every finding counted.
    #[must_use]
    pub fn total(&self) -> usize {
        self.pass + self.fail + self.warn
    }
}

/// Objects counted by verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdicts {
    /// Objects at least one policy applies to.
    pub objects: usize,
    /// Objects whose verdict is `fail`.
    pub fail: usize,
    /// Objects whose verdict is `audit`.
    pub audit: usize,
    /// Objects whose verdict is `warn`.
    pub warn: usize,
    /// Objects whose verdict is `pass`.
    pub pass: usize,
}

impl Verdicts {
    fn add(&mut self, verdict: Verdict) {
        self.objects += 1;
        *match verdict {
            Verdict::Fail => &mut self.fail,
            Verdict::Audit => &mut self.audit,
            Verdict::Warn => &mut self.warn,
            Verdict::Pass => &mut self.pass,
        } += 1;
    }

    /// The sum of `self` and `other`.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            objects: self.objects + other.objects,
            fail: self.fail + other.fail,
            audit: self.audit + other.audit,
            warn: self.warn + other.warn,
            pass: self.pass + other.pass,
        }
    }
}

/// One listed entry and its object's verdict, ordered as reports list them: failures, then
/// warnings, then passes; the cluster's policies (ClusterGuardPolicies) before namespaces'
/// (GuardPolicies, `ns/name`); failures of Deny policies before those of Audit policies; then
/// by policy and object, so the listed subset and its order are the same from one audit of an
/// unchanged scope to the next. So a tenant's GuardPolicy that fails everything cannot push
/// the cluster's findings out of a bounded report, nor an Audit policy a Deny policy's.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ranked(Subject, Finding, Verdict);

/// Deny first, then Audit, then Warn.
fn action_rank(action: Action) -> u8 {
    match action {
        Action::Deny => 0,
        Action::Audit => 1,
        Action::Warn => 2,
    }
}

impl Ranked {
    #[allow(clippy::type_complexity)]
    fn key(&self) -> (AuditResult, bool, u8, &str, &Subject, &str, &str) {
        let Self(subject, finding, _) = self;
        (
            finding.result,
            finding.policy.contains('/'),
            action_rank(finding.action),
            &finding.policy,
            subject,
            finding.rule,
            &finding.message,
        )
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The findings of one scope: the first `limit` entries in report order, and counts of all.
#[derive(Clone, Debug)]
pub struct Findings {
    limit: usize,
    /// A max-heap of the kept entries: its top is the first to go.
    kept: BinaryHeap<Ranked>,
    by_policy: BTreeMap<String, Summary>,
    summary: Summary,
    verdicts: Verdicts,
}

impl Default for Findings {
    /// Unbounded: every entry is kept (tests, and callers that bound elsewhere).
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl PartialEq for Findings {
    fn eq(&self, other: &Self) -> bool {
        self.limit == other.limit
            && self.by_policy == other.by_policy
            && self.verdicts == other.verdicts
            && self.entries() == other.entries()
    }
}

impl Eq for Findings {}

impl Findings {
    /// Findings that keep at most `limit` entries.
    #[must_use]
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            kept: BinaryHeap::new(),
            by_policy: BTreeMap::new(),
            summary: Summary::default(),
            verdicts: Verdicts::default(),
        }
    }

    /// Records what every policy that applies concluded about one object (nothing for an
    /// object no policy applies to).
    pub fn record(&mut self, subject: &Subject, findings: Vec<Finding>) {
        if findings.is_empty() {
            return;
        }
        let verdict = Verdict::of(&findings);
        self.verdicts.add(verdict);
        for finding in findings {
            self.summary.add(finding.result);
            match self.by_policy.get_mut(&finding.policy) {
                Some(counts) => counts.add(finding.result),
                None => {
                    let mut counts = Summary::default();
                    counts.add(finding.result);
                    self.by_policy.insert(finding.policy.clone(), counts);
                }
            }
            if self.limit == 0 {
                continue;
            }
            let entry = Ranked(subject.clone(), finding, verdict);
            if self.kept.len() < self.limit {
                self.kept.push(entry);
            } else if self.kept.peek().is_some_and(|last| entry < *last) {
                self.kept.pop();
                self.kept.push(entry);
            }
        }
    }

    /// The kept entries in report order (failures first, ClusterGuardPolicies before
    /// GuardPolicies, Deny before Audit), each with its object's verdict over all its findings,
    /// kept or not.
    #[must_use]
    pub fn entries(&self) -> Vec<(&Subject, &Finding, Verdict)> {
        let mut entries: Vec<&Ranked> = self.kept.iter().collect();
        entries.sort();
        entries
            .into_iter()
            .map(|Ranked(subject, finding, verdict)| (subject, finding, *verdict))
            .collect()
    }

    /// Every finding counted by result.
    #[must_use]
    pub fn summary(&self) -> Summary {
        self.summary
    }

    /// Every finding counted by policy (`name`, or `namespace/name`) and result.
    #[must_use]
    pub fn by_policy(&self) -> &BTreeMap<String, Summary> {
        &self.by_policy
    }

    /// Every object a policy applies to, counted by verdict.
    #[must_use]
    pub fn verdicts(&self) -> Verdicts {
        self.verdicts
    }

    /// Findings counted but not kept (beyond `limit`).
    #[must_use]
    pub fn omitted(&self) -> usize {
        self.summary.total() - self.kept.len()
    }

    /// Failing findings (fail or warn) counted but not kept.
    #[must_use]
    pub fn omitted_failures(&self) -> usize {
        let kept = self.kept.iter().filter(|Ranked(_, f, _)| f.result != AuditResult::Pass).count();
        self.summary.fail + self.summary.warn - kept
    }

    /// Whether nothing was recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.summary.total() == 0
    }

    /// The most entries kept.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(name: &str) -> Subject {
        Subject {
            api_version: "v1".to_owned(),
            kind: "Pod".to_owned(),
            namespace: Some("shop".to_owned()),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
        }
    }

    fn finding(policy: &str, action: Action, result: AuditResult) -> Finding {
        Finding {
            policy: policy.to_owned(),
            rule: "trustedRegistries",
            action,
            result,
            message: if result == AuditResult::Pass { "passed" } else { "bad image" }.to_owned(),
        }
    }

    /// Pod i fails the Deny policy when i % 3 == 0 and warns when i % 5 == 0.
    fn record(findings: &mut Findings, order: impl Iterator<Item = usize>) {
        for i in order {
            let deny = if i % 3 == 0 { AuditResult::Fail } else { AuditResult::Pass };
            let warn = if i % 5 == 0 { AuditResult::Warn } else { AuditResult::Pass };
            findings.record(
                &subject(&format!("pod-{i:04}")),
                vec![finding("deny", Action::Deny, deny), finding("warn", Action::Warn, warn)],
            );
        }
    }

    #[test]
    fn a_bounded_scope_keeps_the_first_entries_in_report_order_and_counts_every_finding() {
        let mut bounded = Findings::new(50);
        record(&mut bounded, 0..3000);
        let mut all = Findings::default();
        record(&mut all, 0..3000);

        let kept = bounded.entries();
        assert_eq!(kept.len(), 50);
        assert_eq!(kept, all.entries()[..50].to_vec(), "the same first 50 as unbounded");
        assert!(kept.iter().all(|(_, f, _)| f.result == AuditResult::Fail), "failures first");
        assert_eq!(kept[0].0.name, "pod-0000");
        assert_eq!(kept[49].0.name, "pod-0147");
        assert_eq!(bounded.summary(), Summary { pass: 4400, fail: 1000, warn: 600 });
        assert_eq!(bounded.omitted(), 6000 - 50);
        assert_eq!(bounded.omitted_failures(), 1600 - 50);
        assert_eq!(bounded.by_policy()["deny"], Summary { pass: 2000, fail: 1000, warn: 0 });
        assert_eq!(bounded.by_policy()["warn"], Summary { pass: 2400, fail: 0, warn: 600 });
        assert_eq!(
            bounded.verdicts(),
            Verdicts { objects: 3000, fail: 1000, audit: 0, warn: 400, pass: 1600 }
        );
        assert_eq!(bounded.summary(), all.summary());
    }

    #[test]
    fn what_is_kept_does_not_depend_on_the_order_objects_are_listed_in() {
        let mut forward = Findings::new(20);
        record(&mut forward, 0..500);
        let mut backward = Findings::new(20);
        record(&mut backward, (0..500).rev());
        assert_eq!(forward, backward);
        let mut warnings_only = Findings::new(3);
        record(&mut warnings_only, [25, 5, 1, 20, 2, 10].into_iter());
        let names: Vec<&str> =
            warnings_only.entries().iter().map(|(s, _, _)| s.name.as_str()).collect();
        assert_eq!(names, ["pod-0005", "pod-0010", "pod-0020"], "warnings before passes");
    }

    #[test]
    fn a_zero_limit_keeps_nothing_but_counts_and_no_findings_is_empty() {
        let mut none = Findings::new(0);
        record(&mut none, 0..10);
        assert!(none.entries().is_empty());
        assert_eq!(none.summary().total(), 20);
        assert!(!none.is_empty());
        let mut empty = Findings::new(10);
        empty.record(&subject("x"), Vec::new());
        assert!(empty.is_empty());
        assert_eq!(empty.verdicts(), Verdicts::default(), "no policy applies: not an object");
    }

    #[test]
    fn an_objects_verdict_is_its_worst_failing_policy_action() {
        let of = |pairs: &[(Action, AuditResult)]| {
            Verdict::of(&pairs.iter().map(|(a, r)| finding("p", *a, *r)).collect::<Vec<_>>())
        };
        assert_eq!(of(&[(Action::Deny, AuditResult::Pass)]), Verdict::Pass);
        assert_eq!(
            of(&[(Action::Warn, AuditResult::Warn), (Action::Audit, AuditResult::Fail)]),
            Verdict::Audit
        );
        assert_eq!(
            of(&[(Action::Audit, AuditResult::Fail), (Action::Deny, AuditResult::Fail)]),
            Verdict::Fail
        );
        assert_eq!(of(&[(Action::Warn, AuditResult::Warn)]), Verdict::Warn);
    }

    #[test]
    fn cluster_policies_outrank_a_namespaces_and_deny_failures_outrank_audit_ones() {
        let mut findings = Findings::new(2);
        // A tenant's GuardPolicy and an Audit policy, both failing everything, alphabetically
        // before the Deny policy, on many objects.
        for i in 0..100 {
            findings.record(
                &subject(&format!("noise-{i:03}")),
                vec![
                    finding("aaa-audit", Action::Audit, AuditResult::Fail),
                    finding("evil/trigger", Action::Deny, AuditResult::Fail),
                ],
            );
        }
        findings.record(
            &subject("legacy"),
            vec![finding("trusted-registries", Action::Deny, AuditResult::Fail)],
        );
        let kept: Vec<(&str, &str)> = findings
            .entries()
            .iter()
            .map(|(s, f, _)| (s.name.as_str(), f.policy.as_str()))
            .collect();
        assert_eq!(kept, [("legacy", "trusted-registries"), ("noise-000", "aaa-audit")]);
    }

    #[test]
    fn a_kept_entry_carries_its_objects_verdict_over_every_finding() {
        let mut findings = Findings::new(1);
        findings.record(
            &subject("bad"),
            vec![
                finding("audit", Action::Audit, AuditResult::Fail),
                finding("deny", Action::Deny, AuditResult::Pass),
                finding("warn", Action::Warn, AuditResult::Warn),
            ],
        );
        let kept = findings.entries();
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].1.policy.as_str(), kept[0].2), ("audit", Verdict::Audit));
        let mut denied = Findings::new(1);
        denied.record(
            &subject("worse"),
            vec![
                finding("a-warn", Action::Warn, AuditResult::Warn),
                finding("z-deny", Action::Deny, AuditResult::Fail),
            ],
        );
        assert_eq!(denied.entries()[0].2, Verdict::Fail);
    }
}
