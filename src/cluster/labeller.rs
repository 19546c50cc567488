//! The OS labeller: the leader gives pods that predate arcguard's webhooks (or that a webhook
//! never saw: a namespace opted out for a while) the OS label of every `calicoLinuxOnly` policy
//! that labels pods and applies to them, and corrects labels that are false, judged by the node
//! a pod runs on.
//!
//! Scoped network policies leave out pods labelled Windows only, so an unlabelled Windows pod
//! stays selected until it is labelled here. Pods are listed in pages (memory stays bounded
//! whatever the cluster size), patched at a bounded rate (the apiserver is never flooded), and
//! only when their label is missing or false (a pass over a labelled cluster writes nothing).
//! A pod whose OS cannot be known yet (not bound to a node, no OS signal, or on a node the
//! cache does not know) is left for a later pass and counted in
//! `arcguard_pods_unlabelled`. arcguard's own writes are exempt from its webhooks
//! (`not-arcguard-itself`), so they cannot deadlock on it.
//!
//! API calls (for RBAC; `tests/manifests.rs` checks the manifests grant exactly these):
//! - `list core/pods (cluster)`
//! - `patch core/pods (cluster)`

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use tokio::sync::watch;

use super::facts::ClusterFacts;
use crate::admission::objects::{Labels, PodTemplateSpec};
use crate::policy::Policy;
use crate::rules::os::{self, NodeOs, Os, PodOs};
use crate::rules::{Facts, Rule, StaticFacts};
use crate::server::AppState;

/// Pods per list page.
const PAGE_SIZE: u32 = 250;
/// Time between two label patches: at most 20 writes a second.
const PATCH_INTERVAL: Duration = Duration::from_millis(50);
/// How often the policies in force are checked for a new OS label key, which starts a pass.
const KEY_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Deadline of one list or patch call.
const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// What a pass should do to one pod's label `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelAction {
    /// The label is missing or false: set it to this OS.
    Set(Os),
    /// The label is true: nothing to do.
    Keep,
    /// The pod's OS cannot be known yet (unbound without a signal, node unknown, or
    /// contradictory signals): leave it for a later pass.
    Unknown,
}

/// Decides what to do with one pod's label `key`, from its signals and its node.
///
/// A value other than `linux` or `windows` is never overwritten: the key then belongs to
/// something else, and the pod is left as it is.
pub fn label_action(
    pod: &PodTemplateSpec,
    key: &str,
    node_os: &dyn Fn(&str) -> NodeOs,
) -> LabelAction {
    let current = pod.metadata.labels.get(key).map(String::as_str);
    if current.is_some_and(|value| Os::from_label(value).is_none()) {
        return LabelAction::Keep;
    }
    let os = match os::resolve(&pod.spec, node_os) {
        PodOs::Pinned { os, .. } => os,
        // Labelled at creation and not yet placed: nothing to correct yet.
        _ if current.is_some() => return LabelAction::Keep,
        PodOs::Unpinned | PodOs::Contradiction(_) | PodOs::UnknownNode(_) => {
            return LabelAction::Unknown;
        }
    };
    if current == Some(os.as_str()) { LabelAction::Keep } else { LabelAction::Set(os) }
}

/// The policies in force that label pods, each with its OS label key.
fn labelling_policies(state: &AppState) -> Vec<(Policy, String)> {
    state
        .snapshot
        .load()
        .policies
        .policies()
        .iter()
        .filter_map(|p| match &p.rule {
            Rule::CalicoLinuxOnly(rule) if rule.labels_pods() => {
                Some((p.clone(), rule.os_label_key().to_owned()))
            }
            _ => None,
        })
        .collect()
}

/// The OS label keys `policies` give a pod in `namespace` with `labels`: only policies that
/// apply to it, so a GuardPolicy labels pods of its own namespace and nothing else.
fn keys_for(
    policies: &[(Policy, String)],
    namespace: &str,
    labels: &Labels,
    facts: &dyn Facts,
) -> BTreeSet<String> {
    policies
        .iter()
        .filter(|(policy, _)| policy.applies_to(namespace, labels, facts))
        .map(|(_, key)| key.clone())
        .collect()
}

/// Runs the labeller until `stop` turns true; it works only while `leader` is true, with a
/// pass over every pod when it starts leading, when a policy brings a new OS label key, and
/// every `interval`.
pub async fn run(
    client: kube::Client,
    state: AppState,
    facts: Arc<ClusterFacts>,
    interval: Duration,
    mut leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut done: Vec<(Policy, String)> = Vec::new();
    let mut next_pass = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            changed = leader.changed() => {
                if changed.is_err() { return }
                // A new leader starts with a pass.
                done.clear();
                next_pass = tokio::time::Instant::now();
            }
            () = tokio::time::sleep(KEY_CHECK_INTERVAL.min(interval)) => {}
        }
        if !*leader.borrow() {
            // Only the leader's figure means anything.
            state.metrics.set_pods_unlabelled(0);
            continue;
        }
        let policies = labelling_policies(&state);
        if policies.is_empty() {
            state.metrics.set_pods_unlabelled(0);
            continue;
        }
        if policies == done && tokio::time::Instant::now() < next_pass {
            continue;
        }
        if !facts.nodes_synced() {
            continue;
        }
        let pass = pass(&client, &state, &facts, &policies, &leader);
        let outcome = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            outcome = pass => outcome,
        };
        match outcome {
            Ok(unlabelled) => {
                state.metrics.set_pods_unlabelled(unlabelled);
                done = policies;
                next_pass = tokio::time::Instant::now() + interval;
            }
            Err(error) => {
                tracing::warn!(%error, "labelling existing pods failed; retrying");
                next_pass = tokio::time::Instant::now() + KEY_CHECK_INTERVAL;
            }
        }
    }
}

/// Why a pass stopped early.
#[derive(Debug, thiserror::Error)]
enum PassError {
    /// Listing pods failed.
    #[error("failed to list pods: {0}")]
    List(#[source] kube::Error),
    /// A call took longer than its deadline.
    #[error("a pod list took longer than {}s", CALL_DEADLINE.as_secs())]
    Timeout,
}

/// One pass over every pod: returns how many pods still lack a true label.
async fn pass(
    client: &kube::Client,
    state: &AppState,
    facts: &ClusterFacts,
    policies: &[(Policy, String)],
    leader: &watch::Receiver<bool>,
) -> Result<i64, PassError> {
    let api: Api<Pod> = Api::all(client.clone());
    let mut params = ListParams::default().limit(PAGE_SIZE);
    let mut unlabelled = 0_i64;
    let mut labelled = 0_u64;
    let node_os = |name: &str| facts.node_os_of(name);
    loop {
        let page = tokio::time::timeout(CALL_DEADLINE, api.list(&params))
            .await
            .map_err(|_| PassError::Timeout)?
            .map_err(PassError::List)?;
        for pod in &page.items {
            if !*leader.borrow() {
                return Ok(unlabelled);
            }
            let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace)
            else {
                continue;
            };
            let Ok(template) =
                serde_json::to_value(pod).and_then(serde_json::from_value::<PodTemplateSpec>)
            else {
                continue;
            };
            let mut namespace_facts = StaticFacts::default();
            if let Some(labels) = facts.namespace_labels_of(namespace) {
                namespace_facts.namespace_labels.insert(namespace.clone(), labels);
            }
            let keys = keys_for(policies, namespace, &template.metadata.labels, &namespace_facts);
            let mut labels = serde_json::Map::new();
            let mut unknown = false;
            for key in &keys {
                match label_action(&template, key, &node_os) {
                    LabelAction::Keep => {}
                    LabelAction::Unknown => unknown = true,
                    LabelAction::Set(os) => {
                        labels.insert(key.clone(), os.as_str().into());
                    }
                }
            }
            unlabelled += i64::from(unknown);
            if labels.is_empty() {
                continue;
            }
            let patch = serde_json::json!({"metadata": {"labels": labels}});
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
            match tokio::time::timeout(CALL_DEADLINE, pods.patch(name, &params, &patch)).await {
                Ok(Ok(_)) => {
                    labelled += 1;
                    state.metrics.record_pod_labelled("labelled");
                }
                Ok(Err(kube::Error::Api(status))) if status.code == 404 => {}
                Ok(Err(error)) => {
                    unlabelled += 1;
                    state.metrics.record_pod_labelled("failed");
                    tracing::warn!(%error, pod = %format!("{namespace}/{name}"), "could not label pod");
                }
                Err(_) => {
                    unlabelled += 1;
                    state.metrics.record_pod_labelled("failed");
                }
            }
            tokio::time::sleep(PATCH_INTERVAL).await;
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    if labelled > 0 || unlabelled > 0 {
        tracing::info!(labelled, unlabelled, "labelled existing pods with their OS");
    }
    Ok(unlabelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> PodTemplateSpec {
        serde_json::from_value(json).expect("pod decodes")
    }

    fn nodes(name: &str) -> NodeOs {
        match name {
            "lin1" => NodeOs::Known(Os::Linux),
            "win1" => NodeOs::Known(Os::Windows),
            _ => NodeOs::Unknown,
        }
    }

    #[test]
    fn pods_get_the_label_of_where_they_run_and_false_labels_are_corrected() {
        let key = "arcguard.io/os";
        let cases = [
            (serde_json::json!({"spec": {"nodeName": "win1"}}), LabelAction::Set(Os::Windows)),
            (serde_json::json!({"spec": {"nodeName": "lin1"}}), LabelAction::Set(Os::Linux)),
            (
                serde_json::json!({"metadata": {"labels": {key: "linux"}}, "spec": {"nodeName": "win1"}}),
                LabelAction::Set(Os::Windows),
            ),
            (
                serde_json::json!({"metadata": {"labels": {key: "windows"}}, "spec": {"nodeName": "win1"}}),
                LabelAction::Keep,
            ),
            (
                serde_json::json!({"spec": {"nodeSelector": {"beta.kubernetes.io/os": "windows"}}}),
                LabelAction::Set(Os::Windows),
            ),
            // A value that is not an OS: the key belongs to something else.
            (
                serde_json::json!({"metadata": {"labels": {key: "db"}}, "spec": {"nodeName": "win1"}}),
                LabelAction::Keep,
            ),
            // Labelled at creation, not yet placed.
            (
                serde_json::json!({"metadata": {"labels": {key: "linux"}}, "spec": {}}),
                LabelAction::Keep,
            ),
            // Pending without a signal, or on a node not known yet: a later pass decides.
            (serde_json::json!({"spec": {}}), LabelAction::Unknown),
            (serde_json::json!({"spec": {"nodeName": "new"}}), LabelAction::Unknown),
        ];
        for (json, want) in cases {
            assert_eq!(label_action(&pod(json.clone()), key, &nodes), want, "{json}");
        }
    }
}

#[cfg(test)]
mod scope_tests {
    use super::*;
    use crate::policy::{PolicySpec, Scope};

    fn policy(name: &str, scope: Scope, key: &str) -> (Policy, String) {
        let spec: PolicySpec = serde_json::from_value(serde_json::json!({
            "action": "Audit", "calicoLinuxOnly": {"osLabelKey": key}
        }))
        .expect("spec");
        (Policy::compile(name, scope, &spec).expect("compiles"), key.to_owned())
    }

    #[test]
    fn a_guard_policy_labels_pods_of_its_own_namespace_only() {
        let policies = vec![
            policy("cluster", Scope::Cluster, "arcguard.io/os"),
            policy("tenant", Scope::Namespace("tenant-a".into()), "app"),
        ];
        let facts = StaticFacts::default();
        let labels = Labels::new();
        let keys = |ns: &str| keys_for(&policies, ns, &labels, &facts);
        assert_eq!(
            keys("tenant-a"),
            BTreeSet::from(["app".to_owned(), "arcguard.io/os".to_owned()])
        );
        assert_eq!(keys("kube-system"), BTreeSet::from(["arcguard.io/os".to_owned()]));
    }
}
