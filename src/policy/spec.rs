//! The policy API (`arcguard.io/v1alpha1`): the documents operators write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::calico::CalicoLinuxOnlySpec;
use crate::rules::gmsa::GmsaSpec;
use crate::rules::provenance::ImageProvenanceSpec;
use crate::rules::registry::TrustedRegistriesSpec;

/// API group of arcguard's policies.
pub const GROUP: &str = "arcguard.io";
/// API version of arcguard's policies.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of arcguard's policies.
pub const API_VERSION: &str = "arcguard.io/v1alpha1";
/// Kind of the cluster-scoped policy.
pub const CLUSTER_KIND: &str = "ClusterGuardPolicy";
/// Kind of the namespaced policy.
pub const NAMESPACED_KIND: &str = "GuardPolicy";

/// What a failing policy does to the request.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Deserialize,
    Serialize,
    JsonSchema,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum Action {
    /// Reject the request, telling the user what to change.
    #[default]
    Deny,
    /// Admit the request with a warning shown to the client.
    Warn,
    /// Admit the request; log and count the violation.
    Audit,
}

impl Action {
    /// The spelling used in policies, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "Deny",
            Self::Warn => "Warn",
            Self::Audit => "Audit",
        }
    }
}

/// Which objects a policy applies to. Every field that is set must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// If set, only objects in these namespaces. A trailing `*` matches a prefix (`team-*`).
    /// Cluster-scoped objects are not restricted by namespace fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Objects in these namespaces are never checked. A trailing `*` matches a prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_namespaces: Vec<String>,
    /// Only objects in namespaces whose labels match (cluster mode; in standalone mode
    /// namespace labels are unknown and the policy applies to every namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Only objects whose own labels match (on UPDATE, the old or the new labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_selector: Option<LabelSelector>,
}

/// The spec of a ClusterGuardPolicy or GuardPolicy: an action, a match and exactly one rule block.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// What a violation does: `Deny` (default), `Warn` or `Audit`.
    #[serde(default)]
    pub action: Action,
    /// Which objects the policy applies to; all inspected objects when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<Match>,
    /// Rule: every container image comes from a trusted registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_registries: Option<TrustedRegistriesSpec>,
    /// Rule: Windows pods use a gMSA credential spec that exists and that they may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gmsa: Option<GmsaSpec>,
    /// Rule: Calico and Kubernetes network policies apply to Linux pods only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calico_linux_only: Option<CalicoLinuxOnlySpec>,
    /// Rule: images are served by their registry, for a platform the pod can run, and Pods
    /// are pinned to the digest that was checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_provenance: Option<ImageProvenanceSpec>,
}
