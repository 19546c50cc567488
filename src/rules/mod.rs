//! The three rules, as pure functions from a request view (and cluster facts) to findings
//! and mutations.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::admission::objects::Labels;
use crate::admission::view::RequestView;

pub mod calico;
pub mod gmsa;
pub mod image;
pub mod os;
pub mod registry;

/// A policy field that does not hold a valid value; `field` is relative to the rule block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `registries[1]`.
    pub field: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The same error with `prefix.` in front of the field path.
    #[must_use]
    pub fn within(self, prefix: &str) -> Self {
        let field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        Self { field, ..self }
    }
}

/// What a rule found wrong with an object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Violations: each says what is wrong and what to change. They deny, warn or audit
    /// according to the policy's action.
    pub violations: Vec<String>,
    /// Advice returned as a warning whatever the policy's action (e.g. gMSA on hostProcess).
    pub advisories: Vec<String>,
}

impl Findings {
    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty() && self.advisories.is_empty()
    }
}

/// A change the mutating webhook makes, expressed as intent so that changes from several
/// policies compose in an order-independent way into one JSON Patch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutation {
    /// Set `labels[key] = value` in the labels map at `labels_pointer`, creating it if absent.
    SetLabel {
        /// JSON pointer of the labels map.
        labels_pointer: String,
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
    /// Set `gmsaCredentialSpec` in the windowsOptions object at `windows_options_pointer`.
    InlineCredentialSpec {
        /// JSON pointer of the `windowsOptions` object.
        windows_options_pointer: String,
        /// The JSON text to inline.
        content: String,
    },
    /// Scope a Calico policy's `spec.selector` to pods whose `key` label is `linux`.
    ScopeCalicoSelector {
        /// The OS label key.
        key: String,
    },
    /// Add `{key, In, [linux]}` to a Kubernetes NetworkPolicy's `spec.podSelector`.
    ScopeKubeSelector {
        /// The OS label key.
        key: String,
    },
}

/// Whether a service account may `use` a GMSACredentialSpec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed by RBAC.
    Allowed,
    /// Not allowed by RBAC.
    Denied,
    /// The check could not be made (the API failed); treated as denied, with the reason.
    Unknown(String),
    /// No authorizer is available (standalone mode): the check is skipped.
    NotChecked,
}

/// What the rules may know about the cluster beyond the request: looked up by the shell
/// (caches, SubjectAccessReviews) before evaluation, so that evaluation stays pure.
pub trait Facts {
    /// The `credspec` of the named GMSACredentialSpec, if it exists.
    fn credential_spec(&self, name: &str) -> Option<&Value>;
    /// Whether `system:serviceaccount:{namespace}:{service_account}` may `use` the named spec.
    fn may_use_credential_spec(&self, namespace: &str, service_account: &str, name: &str)
    -> Access;
    /// Labels of a namespace; `None` when unknown (standalone mode, or not cached).
    fn namespace_labels(&self, namespace: &str) -> Option<&Labels>;
}

/// Facts as plain data: in standalone mode the credential specs read from the policy
/// directory; in cluster mode what was looked up for one request before its evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StaticFacts {
    /// GMSACredentialSpec name to its `credspec`.
    pub credential_specs: BTreeMap<String, Value>,
    /// Namespace labels, when known.
    pub namespace_labels: BTreeMap<String, Labels>,
    /// Results of `use` checks by (namespace, service account, spec name); `None` when there
    /// is no authorizer (standalone mode), so the check is skipped.
    pub authorizations: Option<BTreeMap<(String, String, String), Access>>,
}

impl Facts for StaticFacts {
    fn credential_spec(&self, name: &str) -> Option<&Value> {
        self.credential_specs.get(name)
    }

    fn may_use_credential_spec(
        &self,
        namespace: &str,
        service_account: &str,
        name: &str,
    ) -> Access {
        let Some(authorizations) = &self.authorizations else { return Access::NotChecked };
        let key = (namespace.to_owned(), service_account.to_owned(), name.to_owned());
        authorizations
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Access::Unknown("the check was not made".to_owned()))
    }

    fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespace_labels.get(namespace)
    }
}

/// One compiled rule block of a policy.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// `trustedRegistries`.
    TrustedRegistries(registry::TrustedRegistries),
    /// `gmsa`.
    Gmsa(gmsa::Gmsa),
    /// `calicoLinuxOnly`.
    CalicoLinuxOnly(calico::CalicoLinuxOnly),
}

impl Rule {
    /// The rule block's field name, used in messages and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::TrustedRegistries(_) => "trustedRegistries",
            Self::Gmsa(_) => "gmsa",
            Self::CalicoLinuxOnly(_) => "calicoLinuxOnly",
        }
    }

    /// What is wrong with the object under this rule.
    pub fn validate(&self, view: &RequestView, facts: &dyn Facts) -> Findings {
        match self {
            Self::TrustedRegistries(rule) => rule.validate(view),
            Self::Gmsa(rule) => rule.validate(view, facts),
            Self::CalicoLinuxOnly(rule) => rule.validate(view),
        }
    }

    /// The changes this rule makes to the object.
    pub fn mutate(&self, view: &RequestView, facts: &dyn Facts) -> Vec<Mutation> {
        match self {
            Self::TrustedRegistries(_) => Vec::new(),
            Self::Gmsa(rule) => rule.mutate(view, facts),
            Self::CalicoLinuxOnly(rule) => rule.mutate(view),
        }
    }
}
