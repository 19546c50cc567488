//! An immutable set of compiled policies and its evaluation against a request view.

use std::collections::BTreeSet;

use crate::admission::view::RequestView;
use crate::rules::{Facts, Mutation};

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
    /// Advice returned as warnings whatever the actions.
    pub advisories: Vec<String>,
}

impl Evaluation<'_> {
    fn failures(&self, action: Action) -> impl Iterator<Item = String> + '_ {
        self.results.iter().filter(move |r| r.policy.action == action).flat_map(|r| {
            let messages = match &r.outcome {
                Outcome::Pass => &[][..],
                Outcome::Fail(messages) => messages.as_slice(),
            };
            messages.iter().map(|m| format!("[{}] {m}", r.policy.id()))
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
        for policy in self.policies.iter().filter(|p| applies(p, view, facts)) {
            let findings = policy.rule.validate(view, facts);
            for advisory in findings.advisories {
                if !evaluation.advisories.contains(&advisory) {
                    evaluation.advisories.push(advisory);
                }
            }
            let outcome = if findings.violations.is_empty() {
                Outcome::Pass
            } else {
                Outcome::Fail(findings.violations)
            };
            evaluation.results.push(PolicyResult { policy, outcome });
        }
        evaluation
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
