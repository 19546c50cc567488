//! The policy controller: watches ClusterGuardPolicy and GuardPolicy, compiles them, swaps the
//! policy set atomically, and hands each policy's status to the status writer
//! ([`super::policy_status`]), which writes it off this loop.
//!
//! A generation that fails to compile never removes enforcement: the last good generation of
//! that policy stays in force, and its status says so. The last good spec is recorded in the
//! policy's status (`enforcedGeneration`, `enforcedSpec`), so a replica started after a bad
//! edit enforces the same last good generation as the replicas that saw it: every replica
//! enforces the same policies, whatever restarted when.
//!
//! API calls (for RBAC; `tests/manifests.rs` checks the manifests grant exactly these):
//! - `list arcguard.io/clusterguardpolicies (cluster)`
//! - `watch arcguard.io/clusterguardpolicies (cluster)`
//! - `list arcguard.io/guardpolicies (all namespaces)`
//! - `watch arcguard.io/guardpolicies (all namespaces)`

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::{FutureExt as _, StreamExt as _};
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::Value;
use tokio::sync::watch;

use super::policy_status::{self, Pending, StatusWriter};
use crate::policy::crd::{ClusterGuardPolicy, GuardPolicy, PolicyStatus};
use crate::policy::load::decode_spec;
use crate::policy::{Policy, PolicySet, Scope};
use crate::server::{AppState, Snapshot};

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
    /// `metadata.resourceVersion`: a status write is redone when the object moved on.
    pub resource_version: String,
    /// `spec`, undecoded: a spec the types cannot decode must not break the watch.
    pub spec: Value,
    /// The current status.
    pub status: Option<PolicyStatus>,
}

impl PolicyObject {
    /// The last good generation and spec the status records, if it is older than the object:
    /// a record is only read when the current generation does not compile, so one claiming the
    /// current generation (or a future one) is not a last good generation arcguard recorded.
    fn recorded(&self) -> Option<(i64, &Value)> {
        let status = self.status.as_ref()?;
        let generation = status.enforced_generation?;
        let spec = status.enforced_spec.as_ref()?;
        (generation < self.generation).then_some((generation, spec))
    }
}

/// A compiled generation in force: its number, the policy, and the spec it was compiled from
/// (recorded in status).
#[derive(Clone, Debug, PartialEq)]
pub struct Enforced {
    /// `metadata.generation` of the spec.
    pub generation: i64,
    /// The compiled policy.
    pub policy: Policy,
    /// The spec as written.
    pub spec: Value,
}

/// What the controller knows about one policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The object's uid; a new uid under the same name is a new policy.
    pub uid: String,
    /// The generation last seen.
    pub generation: i64,
    /// The recorded last good generation last seen in status (see [`PolicyObject`]).
    pub recorded: Option<i64>,
    /// The last good generation.
    pub enforced: Option<Enforced>,
    /// Why the generation last seen does not compile.
    pub error: Option<String>,
}

fn compile(key: &Key, spec: &Value) -> Result<Policy, String> {
    decode_spec(spec.clone()).map_err(|(field, message)| format!("{field}: {message}")).and_then(
        |decoded| {
            Policy::compile(&key.1, key.0.clone(), &decoded).map_err(|e| e.source.to_string())
        },
    )
}

/// Brings the cache in line with the objects: compiles new generations; when one fails,
/// enforces the last good generation the status records (the leader's, so every replica
/// enforces the same one), or, before any is recorded, the last good generation this replica
/// compiled (the leader then records its own); forgets deleted policies. Returns whether the
/// set of enforced policies changed.
pub fn reconcile(cache: &mut BTreeMap<Key, Entry>, objects: &[PolicyObject]) -> bool {
    let mut changed = false;
    let live: BTreeSet<&Key> = objects.iter().map(|o| &o.key).collect();
    cache.retain(|key, _| {
        let keep = live.contains(key);
        changed |= !keep;
        keep
    });
    for object in objects {
        let recorded = object.recorded();
        let entry = cache.get(&object.key);
        if entry.is_some_and(|e| {
            e.uid == object.uid
                && e.generation == object.generation
                && e.recorded == recorded.map(|(g, _)| g)
        }) {
            continue;
        }
        let before = entry.and_then(|e| e.enforced.as_ref()).map(|e| (e.generation, &e.spec));
        let kept = entry.filter(|e| e.uid == object.uid).and_then(|e| e.enforced.clone());
        let next = match compile(&object.key, &object.spec) {
            Ok(policy) => Entry {
                uid: object.uid.clone(),
                generation: object.generation,
                recorded: recorded.map(|(g, _)| g),
                enforced: Some(Enforced {
                    generation: object.generation,
                    policy,
                    spec: object.spec.clone(),
                }),
                error: None,
            },
            Err(error) => {
                let from_status = recorded
                    .and_then(|(generation, spec)| match compile(&object.key, spec) {
                        Ok(policy) => Some(Enforced { generation, policy, spec: spec.clone() }),
                        Err(error) => {
                            tracing::warn!(policy = ?object.key, generation, %error, "the last good spec recorded in status does not compile; ignoring it");
                            None
                        }
                    });
                Entry {
                    uid: object.uid.clone(),
                    generation: object.generation,
                    recorded: recorded.map(|(g, _)| g),
                    enforced: from_status.or(kept),
                    error: Some(error),
                }
            }
        };
        changed |= before != next.enforced.as_ref().map(|e| (e.generation, &e.spec));
        cache.insert(object.key.clone(), next);
    }
    changed
}

/// The policy set the cache enforces.
pub fn policy_set(cache: &BTreeMap<Key, Entry>) -> PolicySet {
    PolicySet::new(
        cache.values().filter_map(|e| e.enforced.as_ref().map(|e| e.policy.clone())).collect(),
    )
}

pub(super) fn to_object(object: &DynamicObject, namespaced: bool) -> Option<PolicyObject> {
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
        resource_version: object.metadata.resource_version.clone().unwrap_or_default(),
        spec: object.data.get("spec").cloned().unwrap_or(Value::Null),
        status: object.data.get("status").cloned().and_then(|s| serde_json::from_value(s).ok()),
    })
}

/// Runs the controller until `stop` turns true. Every replica compiles and enforces; only the
/// leader (`leader` true) writes status, through a [`StatusWriter`] task so that a slow or
/// failing status write never delays a policy change.
pub async fn run(
    client: kube::Client,
    state: AppState,
    identity: String,
    leader: watch::Receiver<bool>,
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
    let (pending_tx, pending_rx) = watch::channel(Pending::new());
    let writer = StatusWriter::new(client, identity, cluster_resource, namespaced_resource);
    let writer = tokio::spawn(writer.run(pending_rx, leader, stop.clone()));

    let mut cache = BTreeMap::new();
    let mut rejected = BTreeSet::new();
    let mut ready = false;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            event = events.next() => match event {
                None => break,
                Some(Err(error)) => {
                    tracing::warn!(%error, "policy watch failed; retrying (the policies in force stay)");
                    continue;
                }
                Some(Ok(())) => {}
            },
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
            if let Some(error) = &entry.error
                && rejected.insert((key.clone(), entry.generation))
            {
                // Logged and counted once per rejected generation (ArcguardPolicyReloadFailing
                // alerts on the count), however many events arrive while it stays rejected.
                let kept = entry.enforced.as_ref().map(|e| e.generation);
                tracing::warn!(policy = ?key, generation = entry.generation, kept_generation = ?kept, %error, "policy generation rejected");
                state.metrics.record_policy_reload(None);
            }
        }
        rejected.retain(|(key, generation)| {
            cache.get(key).is_some_and(|e| e.error.is_some() && e.generation == *generation)
        });
        pending_tx.send_replace(policy_status::pending(&cache, &objects, &policy_status::now()));
    }
    drop(pending_tx);
    if let Err(error) = writer.await {
        tracing::warn!(%error, "the policy status writer ended abnormally");
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::cluster::policy_status::desired_status;

    fn object(name: &str, uid: &str, generation: i64, spec: Value) -> PolicyObject {
        PolicyObject {
            key: (Scope::Cluster, name.to_owned()),
            uid: uid.to_owned(),
            generation,
            resource_version: format!("{generation}"),
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
        assert_eq!(entry.enforced.as_ref().map(|e| e.generation), Some(1));
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

    fn recording(mut object: PolicyObject, generation: i64, spec: Value) -> PolicyObject {
        object.status = Some(PolicyStatus {
            enforced_generation: Some(generation),
            enforced_spec: Some(spec),
            ..PolicyStatus::default()
        });
        object
    }

    fn enforced(cache: &BTreeMap<Key, Entry>) -> Option<(i64, Value)> {
        cache[&(Scope::Cluster, "p".to_owned())]
            .enforced
            .as_ref()
            .map(|e| (e.generation, e.spec.clone()))
    }

    #[test]
    fn a_replica_started_after_a_bad_edit_enforces_the_last_good_spec_in_status() {
        // The leader enforced generation 1 and recorded it; generation 2 is bad. A new replica
        // (empty cache) enforces generation 1 too, not nothing.
        let bad = registries(&["https://a.io"]);
        let mut cache = BTreeMap::new();
        let object = recording(object("p", "u1", 2, bad), 1, registries(&["a.io"]));
        assert!(reconcile(&mut cache, &[object]));
        assert_eq!(enforced(&cache), Some((1, registries(&["a.io"]))));
        let status = desired_status(&cache[&(Scope::Cluster, "p".to_owned())], None, &time(1));
        assert_eq!(status.enforced_generation, Some(1), "the record is kept, not dropped");
        assert_eq!(status.enforced_spec, Some(registries(&["a.io"])));
        assert!(ready(&status).2.contains("generation 1 stays enforced"), "{status:?}");
    }

    #[test]
    fn the_recorded_last_good_generation_wins_over_this_replicas_memory() {
        let bad = registries(&[]);
        // This replica saw generation 3 (good); the leader never compiled it (events merged,
        // a relist) and recorded generation 2: every replica enforces the record, 2, so they
        // agree; this one too.
        let mut cache = BTreeMap::new();
        reconcile(&mut cache, &[object("p", "u1", 3, registries(&["c.io"]))]);
        let recorded = recording(object("p", "u1", 4, bad.clone()), 2, registries(&["b.io"]));
        assert!(reconcile(&mut cache, &[recorded]), "3 gives way to the record");
        assert_eq!(enforced(&cache), Some((2, registries(&["b.io"]))));

        // Before any record (the leader's write has not landed), memory is kept; the record's
        // arrival alone (same object generation) is enough to recompute.
        let mut cache = BTreeMap::new();
        reconcile(&mut cache, &[object("p", "u1", 1, registries(&["a.io"]))]);
        reconcile(&mut cache, &[object("p", "u1", 4, bad.clone())]);
        assert_eq!(enforced(&cache).map(|(g, _)| g), Some(1));
        let newer = recording(object("p", "u1", 4, bad), 3, registries(&["c.io"]));
        assert!(reconcile(&mut cache, &[newer]), "the recorded generation 3 replaces 1");
        assert_eq!(enforced(&cache), Some((3, registries(&["c.io"]))));
    }

    #[test]
    fn a_record_that_is_not_arcguards_is_ignored() {
        let bad = registries(&[]);
        // A status claiming a generation newer than the object (not written by arcguard for
        // this object), and a recorded spec that does not compile, are both ignored.
        for object in [
            recording(object("p", "u1", 2, bad.clone()), 3, registries(&["a.io"])),
            // Claiming the current generation: never a record arcguard reads (it reads one
            // only when the current generation does not compile).
            recording(object("p", "u1", 2, bad.clone()), 2, registries(&["docker.io"])),
            recording(object("p", "u1", 2, bad.clone()), 1, json!({"gmsa": {}, "x": 1})),
        ] {
            let mut cache = BTreeMap::new();
            reconcile(&mut cache, &[object]);
            assert_eq!(enforced(&cache), None);
        }
        // A good current generation is enforced whatever the status records.
        let mut cache = BTreeMap::new();
        let good = recording(object("p", "u1", 5, registries(&["e.io"])), 2, registries(&["b.io"]));
        reconcile(&mut cache, &[good]);
        assert_eq!(enforced(&cache), Some((5, registries(&["e.io"]))));
    }
}
