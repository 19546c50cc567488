//! Policies: the API operators write, compiled into matchers and rules, gathered into an
//! immutable set that is evaluated against request views.

pub mod crd;
pub mod load;
pub mod matching;
pub mod selector;
pub mod set;
pub mod spec;

use crate::admission::objects::Labels;
use crate::admission::view::{Kind, RequestView, Subject};
use crate::rules::calico::CalicoLinuxOnly;
use crate::rules::gmsa::Gmsa;
use crate::rules::provenance::ImageProvenance;
use crate::rules::registry::TrustedRegistries;
use crate::rules::{Facts, FieldError, Rule};

pub use matching::Matcher;
pub use set::{Evaluation, Outcome, PolicyResult, PolicySet};
pub use spec::{Action, PolicySpec};

/// Where a policy applies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// A ClusterGuardPolicy: every namespace and cluster-scoped objects.
    Cluster,
    /// A GuardPolicy: objects in this namespace only.
    Namespace(String),
}

/// A policy that failed to compile, naming the field (`spec.trustedRegistries.registries[0]`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?} is invalid: {source}")]
pub struct InvalidPolicy {
    /// `ClusterGuardPolicy` or `GuardPolicy`.
    pub kind: &'static str,
    /// `name` or `namespace/name`.
    pub name: String,
    /// The offending field and why.
    #[source]
    pub source: FieldError,
}

/// A compiled policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// Cluster-wide or namespaced.
    pub scope: Scope,
    /// What a violation does.
    pub action: Action,
    /// Which objects it applies to.
    pub matcher: Matcher,
    /// Its rule.
    pub rule: Rule,
}

impl Policy {
    /// Compiles a policy spec.
    ///
    /// # Errors
    /// [`InvalidPolicy`] naming the first invalid field under `spec`.
    pub fn compile(name: &str, scope: Scope, spec: &PolicySpec) -> Result<Self, InvalidPolicy> {
        let invalid = |source: FieldError| InvalidPolicy {
            kind: match scope {
                Scope::Cluster => spec::CLUSTER_KIND,
                Scope::Namespace(_) => spec::NAMESPACED_KIND,
            },
            name: match &scope {
                Scope::Cluster => name.to_owned(),
                Scope::Namespace(ns) => format!("{ns}/{name}"),
            },
            source,
        };
        if name.is_empty() {
            return Err(invalid(FieldError::new("metadata.name", "must not be empty")));
        }
        let rule = compile_rule(spec).map_err(|e| invalid(e.within("spec")))?;
        let matcher = match &spec.match_ {
            Some(m) => Matcher::compile(m).map_err(|e| invalid(e.within("spec.match")))?,
            None => Matcher::default(),
        };
        Ok(Self { name: name.to_owned(), scope, action: spec.action, matcher, rule })
    }

    /// Whether the policy applies to an object in `namespace` with `labels`: its scope (a
    /// GuardPolicy only in its own namespace) and its `match`.
    pub fn applies_to(&self, namespace: &str, labels: &Labels, facts: &dyn Facts) -> bool {
        let in_scope = match &self.scope {
            Scope::Cluster => true,
            Scope::Namespace(ns) => ns == namespace,
        };
        in_scope && self.matcher.matches_object(Some(namespace), labels, None, facts)
    }

    /// Whether the policy may apply to some object in `namespace` (`None`: cluster-scoped
    /// objects, which only cluster policies reach): its scope and `spec.match` without the
    /// objectSelector. The audit re-judges only the namespaces a changed policy may reach.
    pub fn may_apply_in(&self, namespace: Option<&str>, facts: &dyn Facts) -> bool {
        let in_scope = match (&self.scope, namespace) {
            (Scope::Cluster, _) => true,
            (Scope::Namespace(ns), Some(namespace)) => ns == namespace,
            (Scope::Namespace(_), None) => false,
        };
        in_scope && self.matcher.may_match_in(namespace, facts)
    }

    /// `name` for cluster policies, `namespace/name` for namespaced ones.
    pub fn id(&self) -> String {
        let mut id = String::new();
        self.push_id(&mut id);
        id
    }

    /// Appends [`Policy::id`] to `out`.
    pub fn push_id(&self, out: &mut String) {
        if let Scope::Namespace(ns) = &self.scope {
            out.push_str(ns);
            out.push('/');
        }
        out.push_str(&self.name);
    }

    /// Whether [`Policy::id`] reads the same for both, compared without writing either.
    pub fn has_same_id(&self, other: &Self) -> bool {
        fn id_bytes(policy: &Policy) -> impl Iterator<Item = u8> + '_ {
            let namespace = match &policy.scope {
                Scope::Cluster => None,
                Scope::Namespace(ns) => Some(ns.bytes().chain(std::iter::once(b'/'))),
            };
            namespace.into_iter().flatten().chain(policy.name.bytes())
        }
        id_bytes(self).eq(id_bytes(other))
    }
}

/// Checks an arcguard policy document under review: its spec must decode and compile.
///
/// # Errors
/// `field: what is wrong` for the first problem.
pub fn check_document(view: &RequestView) -> Result<Policy, String> {
    let Subject::GuardPolicy(spec) = &view.subject else {
        return Err("not an arcguard policy".to_owned());
    };
    let spec = load::decode_spec((**spec).clone())
        .map_err(|(field, message)| format!("{field}: {message}"))?;
    let scope = match (view.kind, &view.namespace) {
        (Kind::GuardPolicy, Some(ns)) => Scope::Namespace(ns.clone()),
        (Kind::GuardPolicy, None) => {
            return Err("metadata.namespace: is required for a GuardPolicy".to_owned());
        }
        _ => Scope::Cluster,
    };
    Policy::compile(&view.name, scope, &spec).map_err(|e| e.source.to_string())
}

fn compile_rule(spec: &PolicySpec) -> Result<Rule, FieldError> {
    let mut blocks = Vec::new();
    if spec.trusted_registries.is_some() {
        blocks.push("trustedRegistries");
    }
    if spec.gmsa.is_some() {
        blocks.push("gmsa");
    }
    if spec.calico_linux_only.is_some() {
        blocks.push("calicoLinuxOnly");
    }
    if spec.image_provenance.is_some() {
        blocks.push("imageProvenance");
    }
    if blocks.len() != 1 {
        let found = if blocks.is_empty() { "none".to_owned() } else { blocks.join(" and ") };
        return Err(FieldError::new(
            "",
            format!(
                "exactly one rule block is required (trustedRegistries, gmsa, calicoLinuxOnly or imageProvenance); found {found}"
            ),
        ));
    }
    if let Some(rule) = &spec.trusted_registries {
        return TrustedRegistries::compile(rule)
            .map(Rule::TrustedRegistries)
            .map_err(|e| e.within("trustedRegistries"));
    }
    if let Some(rule) = &spec.gmsa {
        return Gmsa::compile(rule).map(Rule::Gmsa).map_err(|e| e.within("gmsa"));
    }
    if let Some(rule) = &spec.image_provenance {
        return ImageProvenance::compile(rule)
            .map(Rule::ImageProvenance)
            .map_err(|e| e.within("imageProvenance"));
    }
    match &spec.calico_linux_only {
        Some(rule) => CalicoLinuxOnly::compile(rule)
            .map(Rule::CalicoLinuxOnly)
            .map_err(|e| e.within("calicoLinuxOnly")),
        None => Err(FieldError::new("", "exactly one rule block is required")),
    }
}
