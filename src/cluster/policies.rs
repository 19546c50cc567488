//! The policy controller: watches ClusterGuardPolicy and GuardPolicy, compiles them, swaps the
//! policy set atomically, and reports each policy's status.
//!
//! A generation that fails to compile never removes enforcement: the last good generation of
//! that policy stays in force, and its status says so.
//!
//! API calls (for RBAC; `tests/manifests.rs` checks the manifests grant exactly these):
//! - `list arcguard.io/clusterguardpolicies (cluster)`
//! - `watch arcguard.io/clusterguardpolicies (cluster)`
//! - `list arcguard.io/guardpolicies (all namespaces)`
//! - `watch arcguard.io/guardpolicies (all namespaces)`
//! - `patch arcguard.io/clusterguardpolicies/status (cluster)` (leader only)
//! - `patch arcguard.io/guardpolicies/status (namespaced)` (leader only)

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::Value;
use tokio::sync::watch;

use crate::policy::crd::{ClusterGuardPolicy, GuardPolicy, PolicyStatus};
use crate::policy::load::decode_spec;
use crate::policy::{Policy, PolicySet, Scope};
use crate::server::{AppState, Snapshot};

/// The condition type arcguard maintains on its policies.
pub const READY: &str = "Ready";

/// Identity of a policy object: its scope and name.
pub type Key = (Scope, String);

/// A policy object as read from the API.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    /// Scope and name.
    pub key: Key,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.generation`.
    pub generation: i64,
    /// `spec`, undecoded: a spec the types cannot decode must not break the watch.
    pub spec: Value,
    /// The current status.
    pub status: Option<PolicyStatus>,
}

/// What the controller knows about one policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The object's uid; a new uid under the same name is a new policy.
    pub uid: String,
    /// The generation last seen.
    pub generation: i64,
    /// The last good compiled generation and its number.
    pub enforced: Option<(i64, Policy)>,
    /// Why the generation last seen does not compile.
    pub error: Option<String>,
}

/// Brings the cache in line with the objects: compiles new generations, keeps the last good
/// generation when a new one fails, and forgets deleted policies. Returns whether the set of
/// enforced policies changed.
pub fn reconcile(cache: &mut BTreeMap<Key, Entry>, objects: &[PolicyObject]) -> bool {
    let mut changed = false;
    let live: std::collections::BTreeSet<&Key> = objects.iter().map(|o| &o.key).collect();
    cache.retain(|key, _| {
        let keep = live.contains(key);
        changed |= !keep;
        keep
    });
    for object in objects {
        let entry = cache.get(&object.key);
        if entry.is_some_and(|e| e.uid == object.uid && e.generation == object.generation) {
            continue;
        }
        let kept = entry.filter(|e| e.uid == object.uid).and_then(|e| e.enforced.clone());
        let compiled = decode_spec(object.spec.clone())
            .map_err(|(field, message)| format!("{field}: {message}"))
            .and_then(|spec| {
                Policy::compile(&object.key.1, object.key.0.clone(), &spec)
                    .map_err(|e| e.source.to_string())
            });
        let entry = match compiled {
            Ok(policy) => {
                changed = true;
                Entry {
                    uid: object.uid.clone(),
                    generation: object.generation,
                    enforced: Some((object.generation, policy)),
                    error: None,
                }
            }
            Err(error) => {
                changed |= kept.is_none() && entry.is_some();
                Entry {
                    uid: object.uid.clone(),
                    generation: object.generation,
                    enforced: kept,
                    error: Some(error),
                }
            }
        };
        cache.insert(object.key.clone(), entry);
    }
    changed
}

/// The policy set the cache enforces.
pub fn policy_set(cache: &BTreeMap<Key, Entry>) -> PolicySet {
    PolicySet::new(
        cache.values().filter_map(|e| e.enforced.as_ref().map(|(_, p)| p.clone())).collect(),
    )
}

/// The status a policy should show; `lastTransitionTime` moves only when the condition's
/// status does.
pub fn desired_status(entry: &Entry, existing: Option<&PolicyStatus>, now: &Time) -> PolicyStatus {
    let (status, reason, message) = match (&entry.error, &entry.enforced) {
        (None, _) => ("True", "Enforced", format!("generation {} is enforced", entry.generation)),
        (Some(error), Some((kept, _))) => (
            "False",
            "InvalidSpec",
            format!("{error}; generation {kept} stays enforced until this is fixed"),
        ),
        (Some(error), None) => {
            ("False", "InvalidSpec", format!("{error}; the policy is not enforced"))
        }
    };
    let previous = existing.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.clone(),
    };
    PolicyStatus {
        observed_generation: Some(entry.generation),
        rule: entry.enforced.as_ref().map(|(_, p)| p.rule.name().to_owned()),
        conditions: vec![Condition {
            type_: READY.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: Some(entry.generation),
            last_transition_time,
        }],
    }
}

fn to_object(object: &DynamicObject, namespaced: bool) -> Option<PolicyObject> {
    let name = object.metadata.name.clone()?;
    let scope = if namespaced {
        Scope::Namespace(object.metadata.namespace.clone()?)
    } else {
        Scope::Cluster
    };
    Some(PolicyObject {
        key: (scope, name),
        uid: object.metadata.uid.clone().unwrap_or_default(),
        generation: object.metadata.generation.unwrap_or_default(),
        spec: object.data.get("spec").cloned().unwrap_or(Value::Null),
        status: object.data.get("status").cloned().and_then(|s| serde_json::from_value(s).ok()),
    })
}

/// Runs the controller until `stop` turns true. Every replica compiles and enforces; only the
/// leader (`leader` true) writes status.
pub async fn run(
    client: kube::Client,
    state: AppState,
    mut leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let cluster_resource = ApiResource::erase::<ClusterGuardPolicy>(&());
    let namespaced_resource = ApiResource::erase::<GuardPolicy>(&());
    let cluster_api: Api<DynamicObject> = Api::all_with(client.clone(), &cluster_resource);
    let namespaced_api: Api<DynamicObject> = Api::all_with(client.clone(), &namespaced_resource);
    let cluster_writer = reflector::store::Writer::new(cluster_resource.clone());
    let namespaced_writer = reflector::store::Writer::new(namespaced_resource.clone());
    let cluster_store = cluster_writer.as_reader();
    let namespaced_store = namespaced_writer.as_reader();
    let cluster_events = watcher(cluster_api, watcher::Config::default())
        .backoff(super::watch_backoff())
        .reflect(cluster_writer);
    let namespaced_events = watcher(namespaced_api, watcher::Config::default())
        .backoff(super::watch_backoff())
        .reflect(namespaced_writer);
    let mut events = Box::pin(futures::stream::select(
        cluster_events.map(|e| e.map(|_| ())),
        namespaced_events.map(|e| e.map(|_| ())),
    ));

    let mut cache = BTreeMap::new();
    let mut rejected = std::collections::BTreeSet::new();
    let mut ready = false;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            event = events.next() => match event {
                None => return,
                Some(Err(error)) => {
                    tracing::warn!(%error, "policy watch failed; retrying (the policies in force stay)");
                    continue;
                }
                Some(Ok(())) => {}
            },
            changed = leader.changed() => if changed.is_err() { return },
        }
        // Coalesce a burst of events into one recompute.
        while let Some(Some(_)) = events.next().now_or_never() {}
        if !ready {
            if cluster_store.wait_until_ready().now_or_never().is_none()
                || namespaced_store.wait_until_ready().now_or_never().is_none()
            {
                continue;
            }
            ready = true;
        }
        let objects = collect(&cluster_store, false)
            .chain(collect(&namespaced_store, true))
            .collect::<Vec<_>>();
        if reconcile(&mut cache, &objects) || !state.readiness.is_policies_loaded() {
            let set = policy_set(&cache);
            let names: Vec<String> = set.policies().iter().map(Policy::id).collect();
            tracing::info!(count = set.len(), policies = %names.join(", "), "policies in force");
            state.metrics.record_policy_reload(Some(&set));
            state.snapshot.store(Arc::new(Snapshot { policies: set, facts: Default::default() }));
            state.readiness.set_policies_loaded();
        }
        for (key, entry) in &cache {
            if let Some(error) = &entry.error {
                tracing::warn!(policy = ?key, %error, "policy generation rejected");
                // Counted once per rejected generation (ArcguardPolicyReloadFailing alerts on it).
                if rejected.insert((key.clone(), entry.generation)) {
                    state.metrics.record_policy_reload(None);
                }
            }
        }
        rejected.retain(|(key, generation)| {
            cache.get(key).is_some_and(|e| e.error.is_some() && e.generation == *generation)
        });
        if *leader.borrow() {
            write_statuses(&client, &cache, &objects, &cluster_resource, &namespaced_resource)
                .await;
        }
    }
}

fn collect(
    store: &Store<DynamicObject>,
    namespaced: bool,
) -> impl Iterator<Item = PolicyObject> + use<> {
    store
        .state()
        .into_iter()
        .filter_map(move |o| to_object(&o, namespaced))
        .collect::<Vec<_>>()
        .into_iter()
}

async fn write_statuses(
    client: &kube::Client,
    cache: &BTreeMap<Key, Entry>,
    objects: &[PolicyObject],
    cluster_resource: &ApiResource,
    namespaced_resource: &ApiResource,
) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    for object in objects {
        let Some(entry) = cache.get(&object.key) else { continue };
        let desired = desired_status(entry, object.status.as_ref(), &now);
        if object.status.as_ref() == Some(&desired) {
            continue;
        }
        let (scope, name) = &object.key;
        let api: Api<DynamicObject> = match scope {
            Scope::Cluster => Api::all_with(client.clone(), cluster_resource),
            Scope::Namespace(ns) => Api::namespaced_with(client.clone(), ns, namespaced_resource),
        };
        let patch = serde_json::json!({"status": desired});
        if let Err(error) =
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await
        {
            tracing::warn!(%error, policy = %name, "failed to update policy status; will retry on the next change");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(name: &str, uid: &str, generation: i64, spec: Value) -> PolicyObject {
        PolicyObject {
            key: (Scope::Cluster, name.to_owned()),
            uid: uid.to_owned(),
            generation,
            spec,
            status: None,
        }
    }

    fn registries(list: &[&str]) -> Value {
        json!({"trustedRegistries": {"registries": list}})
    }

    fn time(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid time"))
    }

    fn ready(status: &PolicyStatus) -> (&str, &str, &str) {
        let c = &status.conditions[0];
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    #[test]
    fn a_bad_generation_keeps_the_last_good_one_enforced() {
        let mut cache = BTreeMap::new();
        assert!(reconcile(&mut cache, &[object("p", "u1", 1, registries(&["a.io"]))]));
        assert_eq!(policy_set(&cache).len(), 1);

        // Generation 2 does not compile: generation 1 stays, and nothing changes.
        assert!(!reconcile(&mut cache, &[object("p", "u1", 2, registries(&["https://a.io"]))]));
        let entry = &cache[&(Scope::Cluster, "p".to_owned())];
        assert_eq!(entry.enforced.as_ref().map(|(g, _)| *g), Some(1));
        assert!(
            entry
                .error
                .as_deref()
                .is_some_and(|e| e.contains("spec.trustedRegistries.registries[0]"))
        );
        let status = desired_status(entry, None, &time(100));
        assert_eq!(ready(&status).0, "False");
        assert!(ready(&status).2.contains("generation 1 stays enforced"), "{status:?}");
        assert_eq!(status.observed_generation, Some(2));

        // Generation 3 fixes it.
        assert!(reconcile(&mut cache, &[object("p", "u1", 3, registries(&["b.io"]))]));
        let entry = &cache[&(Scope::Cluster, "p".to_owned())];
        let fixed = desired_status(entry, Some(&status), &time(200));
        assert_eq!(ready(&fixed), ("True", "Enforced", "generation 3 is enforced"));
        assert_eq!(fixed.conditions[0].last_transition_time, time(200));
        assert_eq!(fixed.rule.as_deref(), Some("trustedRegistries"));
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let mut cache = BTreeMap::new();
        reconcile(&mut cache, &[object("p", "u1", 1, registries(&["a.io"]))]);
        let entry = &cache[&(Scope::Cluster, "p".to_owned())];
        let first = desired_status(entry, None, &time(100));
        let again = desired_status(entry, Some(&first), &time(500));
        assert_eq!(first, again, "no change means no write");
    }

    #[test]
    fn a_new_policy_that_does_not_compile_is_not_enforced() {
        let mut cache = BTreeMap::new();
        reconcile(&mut cache, &[object("p", "u1", 1, json!({"gmsa": {}, "calicoLinuxOnly": {}}))]);
        assert!(policy_set(&cache).is_empty());
        let status = desired_status(&cache[&(Scope::Cluster, "p".to_owned())], None, &time(1));
        assert!(ready(&status).2.contains("the policy is not enforced"), "{status:?}");
        assert_eq!(status.rule, None);
    }

    #[test]
    fn deletion_and_recreation_under_the_same_name() {
        let mut cache = BTreeMap::new();
        reconcile(&mut cache, &[object("p", "u1", 1, registries(&["a.io"]))]);
        assert!(reconcile(&mut cache, &[]), "deleting changes the set");
        assert!(policy_set(&cache).is_empty());
        reconcile(&mut cache, &[object("p", "u1", 1, registries(&["a.io"]))]);
        // A new object (new uid) with a bad spec does not inherit the old one's enforcement.
        reconcile(&mut cache, &[object("p", "u2", 1, registries(&[]))]);
        assert!(policy_set(&cache).is_empty());
    }

    #[test]
    fn specs_the_types_cannot_decode_are_reported_not_fatal() {
        let mut cache = BTreeMap::new();
        let objects = [
            object("good", "u1", 1, registries(&["a.io"])),
            object("bad", "u2", 1, json!({"action": 7, "gmsa": {}})),
        ];
        reconcile(&mut cache, &objects);
        assert_eq!(policy_set(&cache).len(), 1);
        let error = cache[&(Scope::Cluster, "bad".to_owned())].error.clone().unwrap_or_default();
        assert!(error.starts_with("spec.action:"), "{error}");
    }
}
