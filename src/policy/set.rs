//! An immutable set of compiled policies and its evaluation against a request view.

use std::collections::{BTreeSet, HashMap};

use crate::admission::view::RequestView;
use crate::rules::{FactNeeds, Facts, Mutation};

use super::{Action, Policy, Scope};

/// The compiled policies in force, ordered by scope and name so results are deterministic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

/// What one policy concluded about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No violation.
    Pass,
    /// Violations, each saying what to change.
    Fail(Vec<String>),
}

/// One policy's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyResult<'p> {
    /// The policy.
    pub policy: &'p Policy,
    /// Its outcome.
    pub outcome: Outcome,
}

/// The outcome of every policy that applies to an object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation<'p> {
    /// One result per applicable policy, in set order.
    pub results: Vec<PolicyResult<'p>>,
    /// Advice returned as warnings whatever the actions, each prefixed with the policies that
    /// gave it (`[id, ...] text`), as violations are: which policy's `onRegistryError: Warn`
    /// admitted an image unchecked is worth knowing.
    pub advisories: Vec<String>,
}

/// Findings of one evaluation compared by scanning them, before they are indexed by text.
const SCANNED_FINDINGS: usize = 16;
/// Bytes a finding's line reserves for one policy id besides its name: a namespace (at most 63
/// bytes), its `/`, and the `, ` or the brackets around the list.
const ID_ROOM: usize = 66;

impl Evaluation<'_> {
    /// Violations of policies with `action`, each prefixed with the policies that found it: the
    /// same finding from several policies (a pod that can never run, say) is listed once, in
    /// the order first found. Linear in the number of violations (a pod may have thousands).
    fn failures(&self, action: Action) -> impl Iterator<Item = String> + '_ {
        // Each finding with the policy that found it first and any others after it: most are
        // found by one policy, so the others' list stays empty and unallocated.
        let mut found: Vec<(&str, &Policy, Vec<&Policy>)> = Vec::new();
        // Findings by text, once there are more than a scan is cheap for; a denial storm lists
        // a few per request, where hashing each (SipHash) cost more than comparing them.
        let mut index: HashMap<&str, usize> = HashMap::new();
        for result in self.results.iter().filter(|r| r.policy.action == action) {
            let Outcome::Fail(messages) = &result.outcome else { continue };
            for message in messages {
                let at = if found.len() <= SCANNED_FINDINGS {
                    found.iter().position(|(seen, ..)| *seen == message)
                } else {
                    index.get(message.as_str()).copied()
                };
                match at {
                    Some(at) => {
                        let (_, first, others) = &mut found[at];
                        let last = others.last().copied().unwrap_or(*first);
                        // A policy reporting the same finding twice is named once.
                        if !last.has_same_id(result.policy) {
                            others.push(result.policy);
                        }
                    }
                    None => {
                        if found.len() == SCANNED_FINDINGS {
                            index.extend(
                                found.iter().enumerate().map(|(at, (seen, ..))| (*seen, at)),
                            );
                        }
                        if found.len() >= SCANNED_FINDINGS {
                            index.insert(message, found.len());
                        }
                        found.push((message, result.policy, Vec::new()));
                    }
                }
            }
        }
        found.into_iter().map(|(message, first, others)| {
            let ids: usize = others.iter().map(|p| p.name.len() + ID_ROOM).sum();
            let mut line = String::with_capacity(first.name.len() + ID_ROOM + ids + message.len());
            line.push('[');
            first.push_id(&mut line);
            for policy in others {
                line.push_str(", ");
                policy.push_id(&mut line);
            }
            line.push_str("] ");
            line.push_str(message);
            line
        })
    }

    /// Whether a Deny policy failed.
    pub fn is_denied(&self) -> bool {
        self.results
            .iter()
            .any(|r| r.policy.action == Action::Deny && matches!(r.outcome, Outcome::Fail(_)))
    }

    /// Violations of Deny policies, each prefixed with the policy.
    pub fn denials(&self) -> Vec<String> {
        self.failures(Action::Deny).collect()
    }

    /// Violations of Warn policies, then advisories: the response's warnings.
    pub fn warnings(&self) -> Vec<String> {
        self.failures(Action::Warn).chain(self.advisories.iter().cloned()).collect()
    }

    /// Violations of Audit policies.
    pub fn audits(&self) -> Vec<String> {
        self.failures(Action::Audit).collect()
    }
}

impl PolicySet {
    /// A set of the given policies.
    pub fn new(mut policies: Vec<Policy>) -> Self {
        policies.sort_by(|a, b| (&a.scope, &a.name).cmp(&(&b.scope, &b.name)));
        Self { policies }
    }

    /// The policies, in evaluation order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// How many policies are in force.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether no policy is in force.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies that apply to the object under review.
    pub fn applicable<'a>(
        &'a self,
        view: &'a RequestView,
        facts: &'a dyn Facts,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies.iter().filter(move |p| applies(p, view, facts))
    }

    /// Evaluates every applicable policy (the validating webhook).
    pub fn validate<'p>(&'p self, view: &RequestView, facts: &dyn Facts) -> Evaluation<'p> {
        let mut evaluation = Evaluation::default();
        // Each advice once, in the order first given, with every policy that gave it.
        let mut advised: Vec<(String, Vec<String>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for policy in self.policies.iter().filter(|p| applies(p, view, facts)) {
            let findings = policy.rule.validate(view, facts);
            for advisory in findings.advisories {
                let id = policy.id();
                match index.get(&advisory) {
                    Some(&at) if !advised[at].1.contains(&id) => advised[at].1.push(id),
                    Some(_) => {}
                    None => {
                        index.insert(advisory.clone(), advised.len());
                        advised.push((advisory, vec![id]));
                    }
                }
            }
            let outcome = if findings.violations.is_empty() {
                Outcome::Pass
            } else {
                Outcome::Fail(findings.violations)
            };
            evaluation.results.push(PolicyResult { policy, outcome });
        }
        evaluation.advisories = advised
            .into_iter()
            .map(|(advisory, ids)| format!("[{}] {advisory}", ids.join(", ")))
            .collect();
        evaluation
    }

    /// The cluster facts the policies that apply to the object need (given what `facts` already
    /// holds: namespace labels), for the shell to look up before evaluation.
    pub fn needs(&self, view: &RequestView, facts: &dyn Facts) -> FactNeeds {
        let mut needs = FactNeeds::default();
        for policy in self.applicable(view, facts) {
            policy.rule.needs(view, &mut needs);
        }
        needs
    }

    /// The registry facts (images, signatures, the credentials to read them with) the
    /// applicable imageProvenance policies need: [`Self::needs`] without the cluster facts,
    /// for the registry adapter, which runs after those are gathered.
    pub fn registry_needs(&self, view: &RequestView, facts: &dyn Facts) -> FactNeeds {
        let mut needs = FactNeeds::default();
        for policy in self.applicable(view, facts) {
            if let crate::rules::Rule::ImageProvenance(rule) = &policy.rule {
                rule.needs(view, &mut needs);
            }
        }
        needs
    }

    /// Whether a policy reads registries (imageProvenance), so requests may need registry facts.
    pub fn reads_registries(&self) -> bool {
        self.policies().iter().any(|p| matches!(p.rule, crate::rules::Rule::ImageProvenance(_)))
    }

    /// The changes every applicable policy makes (the mutating webhook), deduplicated and in a
    /// canonical order so the resulting patch does not depend on policy order.
    pub fn mutate(&self, view: &RequestView, facts: &dyn Facts) -> BTreeSet<Mutation> {
        self.applicable(view, facts).flat_map(|p| p.rule.mutate(view, facts)).collect()
    }
}

fn applies(policy: &Policy, view: &RequestView, facts: &dyn Facts) -> bool {
    let in_scope = match &policy.scope {
        Scope::Cluster => true,
        Scope::Namespace(ns) => view.namespace.as_deref() == Some(ns.as_str()),
    };
    in_scope && policy.matcher.matches(view, facts)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use serde_json::value::RawValue;

    use super::*;
    use crate::admission::review::Operation;
    use crate::admission::view::Kind;
    use crate::pipeline::patch;
    use crate::policy::load::load_sources;
    use crate::rules::StaticFacts;

    fn set(policies: &[&str]) -> PolicySet {
        let sources: Vec<_> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("{i}.yaml"), (*p).to_owned()))
            .collect();
        load_sources(&sources).expect("valid policies").policies
    }

    fn cluster(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"
        )
    }

    fn pod(namespace: &str, labels: serde_json::Value, image: &str) -> RequestView {
        let object = json!({"metadata": {"name": "p", "namespace": namespace, "labels": labels}, "spec": {"containers": [{"name": "c", "image": image}]}});
        let raw = RawValue::from_string(object.to_string()).expect("json");
        RequestView::build(Kind::Pod, Operation::Create, Some(namespace.into()), &raw, None)
            .expect("view")
    }

    #[test]
    fn a_finding_of_several_policies_is_listed_once_naming_them_all() {
        let policies =
            set(&[&cluster("calico", "  calicoLinuxOnly: {}\n"), &cluster("gmsa", "  gmsa: {}\n")]);
        let object = json!({"metadata": {"name": "p", "namespace": "x"},
            "spec": {"os": {"name": "linux"}, "nodeSelector": {"kubernetes.io/os": "windows"},
                     "containers": [{"name": "c", "image": "a.io/app:1"}]}});
        let raw = RawValue::from_string(object.to_string()).expect("json");
        let view = RequestView::build(Kind::Pod, Operation::Create, Some("x".into()), &raw, None)
            .expect("view");
        let denials = policies.validate(&view, &StaticFacts::default()).denials();
        assert_eq!(denials.len(), 1, "{denials:?}");
        assert!(denials[0].starts_with("[calico, gmsa] this pod can never run"), "{denials:?}");
    }

    #[test]
    fn advice_is_listed_once_naming_every_policy_that_gave_it() {
        let policies = set(&[
            &cluster("audit-gmsa", "  action: Audit\n  gmsa: {}\n"),
            &cluster("gmsa", "  gmsa: {}\n"),
        ]);
        let object = json!({"metadata": {"name": "p", "namespace": "x"},
            "spec": {"os": {"name": "windows"},
                     "securityContext": {"windowsOptions": {"hostProcess": true, "gmsaCredentialSpecName": "spec"}},
                     "hostNetwork": true,
                     "containers": [{"name": "c", "image": "a.io/app:1"}]}});
        let raw = RawValue::from_string(object.to_string()).expect("json");
        let view = RequestView::build(Kind::Pod, Operation::Create, Some("x".into()), &raw, None)
            .expect("view");
        let advisories = policies.validate(&view, &StaticFacts::default()).advisories;
        assert!(!advisories.is_empty(), "{advisories:?}");
        for advisory in &advisories {
            assert!(advisory.starts_with("[audit-gmsa, gmsa] "), "{advisories:?}");
        }
        let unique: BTreeSet<&String> = advisories.iter().collect();
        assert_eq!(unique.len(), advisories.len(), "{advisories:?}");
    }

    /// The denials of two Deny policies, `a` and `b`, that found `of_a` and `of_b`.
    fn denials_of(of_a: Vec<String>, of_b: Vec<String>) -> Vec<String> {
        let policies = set(&[
            &cluster("a", "  trustedRegistries: {registries: [a.io]}\n"),
            &cluster("b", "  trustedRegistries: {registries: [a.io]}\n"),
        ]);
        let [a, b] = policies.policies() else { panic!("two policies") };
        let evaluation = Evaluation {
            results: vec![
                PolicyResult { policy: a, outcome: Outcome::Fail(of_a) },
                PolicyResult { policy: b, outcome: Outcome::Fail(of_b) },
            ],
            advisories: Vec::new(),
        };
        evaluation.denials()
    }

    #[test]
    fn thousands_of_findings_are_deduplicated_in_order_each_naming_its_policies() {
        let count = 50_000;
        let messages: Vec<String> = (0..count).map(|i| format!("finding {i}")).collect();
        // Policy a finds every one (one of them twice), b every other one.
        let mut of_a = messages.clone();
        of_a.push("finding 7".into());
        let of_b: Vec<String> = messages.iter().step_by(2).cloned().collect();
        let denials = denials_of(of_a, of_b);
        assert_eq!(denials.len(), count);
        assert_eq!(denials[0], "[a, b] finding 0");
        assert_eq!(denials[1], "[a] finding 1");
        assert_eq!(denials[7], "[a] finding 7");
        assert_eq!(denials[count - 2], format!("[a, b] finding {}", count - 2));
    }

    #[test]
    fn findings_are_deduplicated_alike_below_at_and_past_the_scanned_count() {
        for count in [1, 15, 16, 17, 18, 40] {
            let messages: Vec<String> = (0..count).map(|i| format!("finding {i}")).collect();
            // a finds each, then the first and the last again; b finds each, in reverse.
            let mut of_a = messages.clone();
            of_a.extend([messages[0].clone(), messages[count - 1].clone()]);
            let of_b: Vec<String> = messages.iter().rev().cloned().collect();
            let expected: Vec<String> = (0..count).map(|i| format!("[a, b] finding {i}")).collect();
            assert_eq!(denials_of(of_a, of_b), expected, "{count} findings");
        }
    }

    #[test]
    fn a_cluster_policy_and_a_namespaced_one_of_the_same_id_are_named_once() {
        // Files may name a cluster policy `shop/p`; its id then reads as namespace shop's `p`.
        let policies = set(&[
            &cluster("shop/p", "  trustedRegistries: {registries: [a.io]}\n"),
            "apiVersion: arcguard.io/v1alpha1\nkind: GuardPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  trustedRegistries: {registries: [a.io]}\n",
        ]);
        let denials = policies
            .validate(&pod("shop", json!({}), "c.io/app:1"), &StaticFacts::default())
            .denials();
        assert_eq!(denials.len(), 1, "{denials:?}");
        assert!(denials[0].starts_with("[shop/p] container"), "{denials:?}");
    }

    #[test]
    fn actions_decide_what_a_failure_does() {
        let policies = set(&[
            &cluster("deny", "  action: Deny\n  trustedRegistries: {registries: [a.io]}\n"),
            &cluster("warn", "  action: Warn\n  trustedRegistries: {registries: [b.io]}\n"),
            &cluster("audit", "  action: Audit\n  trustedRegistries: {registries: [c.io]}\n"),
        ]);
        let facts = StaticFacts::default();
        let evaluation = policies.validate(&pod("x", json!({}), "d.io/app:1"), &facts);
        assert!(evaluation.is_denied());
        assert_eq!(evaluation.results.len(), 3);
        assert!(evaluation.denials()[0].starts_with("[deny] "), "{:?}", evaluation.denials());
        assert!(evaluation.warnings()[0].starts_with("[warn] "));
        assert!(evaluation.audits()[0].starts_with("[audit] "));

        let evaluation = policies.validate(&pod("x", json!({}), "a.io/app:1"), &facts);
        assert!(!evaluation.is_denied());
        assert_eq!(evaluation.warnings().len(), 1);
    }

    #[test]
    fn every_failing_deny_policy_is_reported() {
        let policies = set(&[
            &cluster("one", "  trustedRegistries: {registries: [a.io]}\n"),
            &cluster("two", "  trustedRegistries: {registries: [b.io], requireDigest: true}\n"),
        ]);
        let denials = policies
            .validate(&pod("x", json!({}), "c.io/app:1"), &StaticFacts::default())
            .denials();
        assert_eq!(denials.len(), 3, "{denials:?}");
    }

    #[test]
    fn matching_and_scope_select_policies() {
        let ns_policy = "apiVersion: arcguard.io/v1alpha1\nkind: GuardPolicy\nmetadata: {name: local, namespace: team-a}\nspec:\n  trustedRegistries: {registries: [a.io]}\n";
        let policies = set(&[
            ns_policy,
            &cluster(
                "prefixed",
                "  match: {namespaces: ['team-*'], excludedNamespaces: [team-b]}\n  trustedRegistries: {registries: [a.io]}\n",
            ),
            &cluster(
                "labelled",
                "  match: {objectSelector: {matchLabels: {tier: web}}}\n  trustedRegistries: {registries: [a.io]}\n",
            ),
        ]);
        let facts = StaticFacts::default();
        let names = |view: &RequestView| {
            policies.applicable(view, &facts).map(Policy::id).collect::<Vec<_>>()
        };
        assert_eq!(names(&pod("team-a", json!({}), "x")), ["prefixed", "team-a/local"]);
        assert_eq!(names(&pod("team-b", json!({}), "x")), Vec::<String>::new());
        assert_eq!(names(&pod("other", json!({"tier": "web"}), "x")), ["labelled"]);
    }

    #[test]
    fn namespace_selectors_apply_where_labels_are_known() {
        let policies = set(&[&cluster(
            "prod",
            "  match: {namespaceSelector: {matchLabels: {env: prod}}}\n  trustedRegistries: {registries: [a.io]}\n",
        )]);
        let mut facts = StaticFacts::default();
        let view = pod("shop", json!({}), "x");
        assert_eq!(policies.applicable(&view, &facts).count(), 1, "unknown labels: enforce");
        facts.namespace_labels.insert("shop".into(), [("env".to_owned(), "dev".to_owned())].into());
        assert_eq!(policies.applicable(&view, &facts).count(), 0);
    }

    #[test]
    fn patches_do_not_depend_on_policy_order() {
        let a = cluster("a", "  calicoLinuxOnly: {osLabelKey: a.io/os}\n");
        let b = cluster("b", "  calicoLinuxOnly: {osLabelKey: b.io/os}\n");
        let object = json!({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy", "metadata": {"name": "n", "namespace": "x"}, "spec": {"selector": "app == 'web'"}});
        let raw = RawValue::from_string(object.to_string()).expect("json");
        let view = RequestView::build(
            Kind::CalicoNetworkPolicy,
            Operation::Create,
            Some("x".into()),
            &raw,
            None,
        )
        .expect("view");
        let facts = StaticFacts::default();
        let forward = patch::build(&raw, &set(&[&a, &b]).mutate(&view, &facts)).expect("patch");
        let backward = patch::build(&raw, &set(&[&b, &a]).mutate(&view, &facts)).expect("patch");
        assert_eq!(forward, backward);
        assert!(forward.is_some());
    }
}
