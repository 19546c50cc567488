//! The policy custom resources: ClusterGuardPolicy and GuardPolicy, and their CRDs.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::CustomResourceExt as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spec::PolicySpec;

/// CEL rule enforcing exactly one rule block, which the schema alone cannot say.
const ONE_RULE_BLOCK: &str = "has(self.spec) && [has(self.spec.trustedRegistries), has(self.spec.gmsa), has(self.spec.calicoLinuxOnly), has(self.spec.imageProvenance)].filter(b, b).size() == 1";
/// The message of [`ONE_RULE_BLOCK`].
const ONE_RULE_BLOCK_MESSAGE: &str = "spec: exactly one rule block is required: trustedRegistries, gmsa, calicoLinuxOnly or imageProvenance";

/// What the policy enforces: an action (Deny, Warn or Audit), an optional match, and exactly
/// one rule block (trustedRegistries, gmsa, calicoLinuxOnly or imageProvenance).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "arcguard.io",
    version = "v1alpha1",
    kind = "ClusterGuardPolicy",
    plural = "clusterguardpolicies",
    shortname = "cgp",
    category = "arcguard",
    status = "PolicyStatus",
    doc = "A cluster-wide arcguard policy: an action, an optional match and exactly one rule block.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Rule", type_ = "string", json_path = ".status.rule"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new(ONE_RULE_BLOCK).message(ONE_RULE_BLOCK_MESSAGE)
)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct ClusterGuardPolicySpec(pub PolicySpec);

/// What the policy enforces in its namespace: an action (Deny, Warn or Audit), an optional
/// match, and exactly one rule block (trustedRegistries, gmsa, calicoLinuxOnly or
/// imageProvenance).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "arcguard.io",
    version = "v1alpha1",
    kind = "GuardPolicy",
    plural = "guardpolicies",
    shortname = "gp",
    category = "arcguard",
    namespaced,
    status = "PolicyStatus",
    doc = "An arcguard policy for the objects of its own namespace: an action, an optional match and exactly one rule block.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Rule", type_ = "string", json_path = ".status.rule"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new(ONE_RULE_BLOCK).message(ONE_RULE_BLOCK_MESSAGE)
)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct GuardPolicySpec(pub PolicySpec);

/// What arcguard reports about a policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The policy's rule block, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `Ready`: True when the generation compiled and is enforced; False with the reason and
    /// the offending field otherwise (the last good generation, if any, stays enforced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation arcguard enforces: `observedGeneration` when it compiled, else the last
    /// good generation before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced_generation: Option<i64>,
    /// The spec of `enforcedGeneration`, as written then. The durable record of the last good
    /// spec: a replica started after a bad edit enforces this, as the replicas that saw the
    /// good generation do, so every replica enforces the same policy. Read only when the
    /// current spec does not compile, and only for a generation not newer than the object's.
    /// Whoever may write a policy's status may choose what it falls back to: grant status
    /// writes to arcguard alone. Kept undecoded (a spec one version of arcguard cannot decode
    /// must not hide the rest of the status); its schema is the spec's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<PolicySpec>")]
    pub enforced_spec: Option<serde_json::Value>,
    /// What the last background audit found for this policy (written by the audit under its
    /// own field manager, `arcguard-audit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditStatus>,
}

/// A policy's totals from the last background audit of existing objects.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuditStatus {
    /// Existing objects that pass.
    pub pass: u64,
    /// Existing objects that fail (Deny and Audit policies).
    pub fail: u64,
    /// Existing objects that warn (Warn policies).
    pub warn: u64,
    /// When the audit that counted them finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// Both CRDs, cluster-scoped first.
pub fn crds() -> [CustomResourceDefinition; 2] {
    [ClusterGuardPolicy::crd(), GuardPolicy::crd()]
}

/// Both CRDs as a multi-document YAML stream, as `arcguard crds` prints it.
///
/// # Errors
/// The YAML error if serialisation fails (it does not for these types).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Generated by `arcguard crds` from the Rust types in src/policy/; do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_hold_the_generated_crds() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/base/crds.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = crds_yaml().expect("crds serialise");
        assert!(
            committed == generated,
            "manifests/crds.yaml is out of date: run `cargo run -- crds > manifests/base/crds.yaml`"
        );
    }

    #[test]
    fn crds_are_structural_with_status_and_columns() {
        for crd in crds() {
            let version = &crd.spec.versions[0];
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
            assert_eq!(version.additional_printer_columns.as_ref().map(Vec::len), Some(4));
            let schema = serde_json::to_string(&version.schema).expect("json");
            assert!(
                !schema.contains("\"additionalProperties\":false"),
                "structural schemas forbid it"
            );
            assert!(schema.contains("x-kubernetes-validations"));
            assert!(
                schema.contains("Trusted registries"),
                "field descriptions feed kubectl explain"
            );
        }
    }

    #[test]
    fn custom_resources_decode_into_the_policy_spec() {
        let object = serde_json::json!({
            "apiVersion": "arcguard.io/v1alpha1", "kind": "GuardPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"action": "Warn", "trustedRegistries": {"registries": ["a.io"]}}
        });
        let policy: GuardPolicy = serde_json::from_value(object).expect("decodes");
        assert_eq!(policy.spec.0.action, super::super::Action::Warn);
    }
}
