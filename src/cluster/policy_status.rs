//! Policy status: what each policy's status should say (a pure function of the policy
//! controller's cache), and the writer that puts it on the objects, off the enforcement path.
//!
//! The policy controller ([`super::policies`]) hands the writer the latest [`Pending`] map
//! (the statuses that differ from what the objects show) through a watch channel: the newest
//! map replaces an older one still waiting, so the writer never works through a backlog and a
//! slow or failing write never delays a policy change. The writer runs its writes on the
//! leader only, each by server-side apply on the status subresource (field manager
//! [`FIELD_MANAGER`], forced: arcguard owns its status) with a deadline of [`CALL_DEADLINE`];
//! a failed write is retried with back-off (1 s doubling to 30 s) until it lands or the
//! object moves on. When a write changes a policy's `Ready` condition, the writer records an
//! Event on the policy (`kubectl describe` and `kubectl events` show it): Normal `Enforced`,
//! or Warning `InvalidSpec` naming the field and the generation that stays enforced.
//!
//! API calls (for RBAC; `tests/manifests.rs` checks the manifests grant exactly these):
//! - `patch arcguard.io/clusterguardpolicies/status (cluster)` (leader only, server-side apply)
//! - `patch arcguard.io/guardpolicies/status (namespaced)` (leader only, server-side apply)
//! - `create events.k8s.io/events (all namespaces)` (leader only: an Event is created in the
//!   policy's namespace, in `default` for a ClusterGuardPolicy)
//!
//! Each Event is recorded by a new kube-runtime `Recorder`: a shared one would fold a second
//! `Enforced` for a later generation into a series of the first, keeping the first's note
//! (its cache key leaves the note out). Ready changes are rare, so no series is lost.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::watch;

use super::policies::{Entry, Key, PolicyObject};
use crate::policy::Scope;
use crate::policy::crd::PolicyStatus;

/// The condition type arcguard maintains on its policies.
pub const READY: &str = "Ready";

/// The field manager of arcguard's status writes (server-side apply).
pub const FIELD_MANAGER: &str = "arcguard";

/// The deadline of each status write and Event: below the watch back-off's reset and short
/// enough that a hung apiserver connection costs one retry, not a stuck writer.
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// The longest wait before a failed status write is retried.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// One status to write: the status, and the object's uid and resourceVersion it was computed
/// against (a write is redone when the object moved on; a new uid is a new object).
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// The status to apply.
    pub status: PolicyStatus,
    /// The `Ready` condition the object showed, for the Event on a change.
    pub previous_ready: Option<Condition>,
    /// `metadata.uid` of the object.
    pub uid: String,
    /// `metadata.resourceVersion` the status was computed against.
    pub resource_version: String,
}

/// The statuses to write, by policy.
pub type Pending = BTreeMap<Key, Target>;

/// The current time, as status timestamps take it.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The status a policy should show: `Ready` with its reason, the generation observed, and the
/// generation (and spec) enforced. `lastTransitionTime` moves only when the condition's status
/// does.
pub fn desired_status(entry: &Entry, existing: Option<&PolicyStatus>, now: &Time) -> PolicyStatus {
    let (status, reason, message) = match (&entry.error, &entry.enforced) {
        (None, _) => ("True", "Enforced", format!("generation {} is enforced", entry.generation)),
        (Some(error), Some(kept)) => (
            "False",
            "InvalidSpec",
            format!("{error}; generation {} stays enforced until this is fixed", kept.generation),
        ),
        (Some(error), None) => {
            ("False", "InvalidSpec", format!("{error}; the policy is not enforced"))
        }
    };
    let previous = existing.and_then(ready_condition);
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.clone(),
    };
    PolicyStatus {
        observed_generation: Some(entry.generation),
        rule: entry.enforced.as_ref().map(|e| e.policy.rule.name().to_owned()),
        conditions: vec![Condition {
            type_: READY.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: Some(entry.generation),
            last_transition_time,
        }],
        // With nothing enforced (a generation this version refuses, and no record it can
        // compile: after an upgrade with stricter validation, say) the record stays as it is,
        // never erased, so a downgrade or a fix finds it.
        enforced_generation: match &entry.enforced {
            Some(e) => Some(e.generation),
            None => existing.and_then(|s| s.enforced_generation),
        },
        enforced_spec: match &entry.enforced {
            Some(e) => Some(e.spec.clone()),
            None => existing.and_then(|s| s.enforced_spec.clone()),
        },
        audit: None,
    }
}

fn ready_condition(status: &PolicyStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == READY)
}

/// The statuses that differ from what the objects show.
pub fn pending(cache: &BTreeMap<Key, Entry>, objects: &[PolicyObject], now: &Time) -> Pending {
    objects
        .iter()
        .filter_map(|object| {
            let entry = cache.get(&object.key)?;
            let mut status = desired_status(entry, object.status.as_ref(), now);
            // `audit` belongs to the audit's field manager: compared as it is, never written
            // here (absent from the applied status, so this manager does not own it).
            let audit = object.status.as_ref().and_then(|s| s.audit.clone());
            let differs = object.status.as_ref()
                != Some(&PolicyStatus { audit: audit.clone(), ..status.clone() });
            status.audit = None;
            differs.then(|| {
                let target = Target {
                    status,
                    previous_ready: object.status.as_ref().and_then(ready_condition).cloned(),
                    uid: object.uid.clone(),
                    resource_version: object.resource_version.clone(),
                };
                (object.key.clone(), target)
            })
        })
        .collect()
}

/// The Event a status change records, if its `Ready` condition changed (status, reason or
/// generation): `None` when only the timestamps or the rule moved.
pub fn event_for(target: &Target) -> Option<Event> {
    let next = ready_condition(&target.status)?;
    let unchanged = target.previous_ready.as_ref().is_some_and(|previous| {
        (&previous.status, &previous.reason, previous.observed_generation)
            == (&next.status, &next.reason, next.observed_generation)
    });
    if unchanged {
        return None;
    }
    let type_ = if next.status == "True" { EventType::Normal } else { EventType::Warning };
    Some(Event {
        type_,
        reason: next.reason.clone(),
        note: Some(truncate(&next.message, 1024)),
        action: "Compile".to_owned(),
        secondary: None,
    })
}

/// `text` cut to at most `max` bytes on a character boundary (an Event's note is limited to
/// 1 kB by the API).
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    format!("{}...", crate::text::prefix(text, max.saturating_sub(3)))
}

/// The status writer: applies [`Pending`] statuses on the leader (see the module doc).
pub struct StatusWriter {
    client: kube::Client,
    reporter: Reporter,
    cluster_resource: ApiResource,
    namespaced_resource: ApiResource,
}

/// What the writer last did for one policy.
struct Written {
    target: Target,
    /// Whether it landed; when it did not, the next attempt waits for `retry_at`.
    landed: bool,
    failures: u32,
    retry_at: tokio::time::Instant,
}

impl StatusWriter {
    /// A writer for the two policy kinds, recording Events as `identity`.
    pub fn new(
        client: kube::Client,
        identity: String,
        cluster_resource: ApiResource,
        namespaced_resource: ApiResource,
    ) -> Self {
        let reporter = Reporter { controller: "arcguard".to_owned(), instance: Some(identity) };
        Self { client, reporter, cluster_resource, namespaced_resource }
    }

    /// Writes pending statuses while this replica leads, until `pending`'s sender is dropped
    /// or `stop` turns true.
    pub async fn run(
        self,
        mut pending: watch::Receiver<Pending>,
        mut leader: watch::Receiver<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut written: BTreeMap<Key, Written> = BTreeMap::new();
        loop {
            let leading = *leader.borrow_and_update();
            let targets = pending.borrow_and_update().clone();
            // Forget what no longer waits: a policy whose object shows its status, or is gone.
            written.retain(|key, _| targets.contains_key(key));
            let mut next_retry = None;
            if leading {
                for (key, target) in &targets {
                    let now = tokio::time::Instant::now();
                    match written.get(key) {
                        Some(w) if w.target == *target && w.landed => continue,
                        Some(w) if w.target == *target && w.retry_at > now => {
                            next_retry =
                                Some(next_retry.map_or(w.retry_at, |t: tokio::time::Instant| {
                                    t.min(w.retry_at)
                                }));
                            continue;
                        }
                        _ => {}
                    }
                    let failures = written
                        .get(key)
                        .filter(|w| w.target.uid == target.uid && !w.landed)
                        .map_or(0, |w| w.failures);
                    let landed = self.write(key, target).await;
                    let failures = if landed { 0 } else { failures + 1 };
                    let retry_at = now + retry_delay(failures);
                    if !landed {
                        next_retry = Some(next_retry.map_or(retry_at, |t| t.min(retry_at)));
                    }
                    written.insert(
                        key.clone(),
                        Written { target: target.clone(), landed, failures, retry_at },
                    );
                }
            }
            let retry = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                changed = pending.changed() => if changed.is_err() { return },
                changed = leader.changed() => if changed.is_err() { return },
                () = retry => {}
            }
        }
    }

    /// Applies one status and records the Event its change calls for. Returns whether the
    /// status landed.
    async fn write(&self, (scope, name): &Key, target: &Target) -> bool {
        let (api, resource): (Api<DynamicObject>, _) = match scope {
            Scope::Cluster => {
                (Api::all_with(self.client.clone(), &self.cluster_resource), &self.cluster_resource)
            }
            Scope::Namespace(ns) => (
                Api::namespaced_with(self.client.clone(), ns, &self.namespaced_resource),
                &self.namespaced_resource,
            ),
        };
        // The uid precondition keeps a status computed for a deleted object off a new one of
        // the same name.
        let patch = serde_json::json!({
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": {"name": name, "uid": target.uid},
            "status": target.status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(&patch);
        let call = api.patch_status(name, &params, &patch);
        match tokio::time::timeout(CALL_DEADLINE, call).await {
            Ok(Ok(object)) => {
                if let Some(event) = event_for(target) {
                    let reference = kube::Resource::object_ref(&object, resource);
                    let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
                    match tokio::time::timeout(CALL_DEADLINE, recorder.publish(&event, &reference))
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            tracing::warn!(%error, policy = %name, "failed to record the policy's Event");
                        }
                        Err(_) => {
                            tracing::warn!(policy = %name, "recording the policy's Event timed out");
                        }
                    }
                }
                true
            }
            Ok(Err(kube::Error::Api(status))) if status.code == 404 || status.code == 409 => {
                // Gone, or replaced by a new object (uid mismatch): the watch brings the news.
                tracing::debug!(policy = %name, reason = %status.reason, "policy status not written: the object is gone or was replaced");
                false
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, policy = %name, "failed to write the policy status; retrying with back-off");
                false
            }
            Err(_) => {
                tracing::warn!(policy = %name, deadline_s = CALL_DEADLINE.as_secs(), "writing the policy status timed out; retrying with back-off");
                false
            }
        }
    }
}

/// The wait before retry `failures` (1 s doubling to [`MAX_RETRY`]); zero after a success.
fn retry_delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cluster::policies::reconcile;

    fn policy(generation: i64, registry: &str, status: Option<PolicyStatus>) -> PolicyObject {
        PolicyObject {
            key: (Scope::Namespace("shop".to_owned()), "p".to_owned()),
            uid: "u1".to_owned(),
            generation,
            resource_version: format!("rv{generation}"),
            spec: json!({"trustedRegistries": {"registries": [registry]}}),
            status,
        }
    }

    fn time(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid time"))
    }

    /// The pending map for `objects` after the controller saw them.
    fn pending_for(objects: &[PolicyObject], at: i64) -> Pending {
        let mut cache = BTreeMap::new();
        reconcile(&mut cache, objects);
        pending(&cache, objects, &time(at))
    }

    #[test]
    fn a_record_this_version_cannot_compile_is_kept_not_erased() {
        // Generation 4 was recorded by a version that accepted it; this one refuses it.
        let mut status = PolicyStatus {
            enforced_generation: Some(4),
            enforced_spec: Some(json!({"trustedRegistries": {"registries": ["https://a.io"]}})),
            ..PolicyStatus::default()
        };
        status.observed_generation = Some(4);
        let object = PolicyObject {
            spec: json!({"trustedRegistries": {"registries": ["https://a.io"]}}),
            ..policy(4, "unused", Some(status.clone()))
        };
        let pending = pending_for(&[object], 5);
        let target = pending.values().next().expect("the condition changes");
        assert_eq!(target.status.enforced_generation, Some(4));
        assert_eq!(target.status.enforced_spec, status.enforced_spec);
        assert!(target.status.conditions[0].message.contains("the policy is not enforced"));
    }

    #[test]
    fn only_statuses_that_differ_are_pending_and_events_follow_ready_changes() {
        // A new policy: its status is pending, and writing it records Enforced.
        let fresh = pending_for(&[policy(1, "a.io", None)], 10);
        let target = fresh.values().next().expect("pending");
        assert_eq!(target.status.enforced_generation, Some(1));
        assert_eq!(target.resource_version, "rv1");
        let event = event_for(target).expect("an Event for the first Ready");
        assert_eq!((event.type_, event.reason.as_str()), (EventType::Normal, "Enforced"));

        // Once the object shows it, nothing is pending.
        let shown = policy(1, "a.io", Some(target.status.clone()));
        assert!(
            pending_for(std::slice::from_ref(&shown), 99).is_empty(),
            "no rewrite for the clock alone"
        );
        // The audit's totals (another field manager's) neither cause a write nor are written.
        let mut audited_status = target.status.clone();
        audited_status.audit =
            Some(crate::policy::crd::AuditStatus { fail: 3, ..Default::default() });
        let audited = policy(1, "a.io", Some(audited_status));
        assert!(pending_for(std::slice::from_ref(&audited), 99).is_empty(), "audit is not ours");
        let moved = policy(2, "b.io", audited.status.clone());
        let pending = pending_for(&[moved], 99);
        assert_eq!(pending.values().next().map(|t| t.status.audit.clone()), Some(None));

        // A bad generation 2 (seen by a replica that knows generation 1 from the status only):
        // pending, with a Warning naming the field and what stays.
        let bad = policy(2, "https://a.io", shown.status.clone());
        let pending = pending_for(&[bad], 20);
        let target = pending.values().next().expect("pending");
        let event = event_for(target).expect("Ready turned False");
        assert_eq!((event.type_, event.reason.as_str()), (EventType::Warning, "InvalidSpec"));
        let note = event.note.unwrap_or_default();
        assert!(note.contains("spec.trustedRegistries.registries[0]"), "{note}");
        assert!(note.contains("generation 1 stays enforced"), "{note}");
        assert_eq!(target.status.enforced_generation, Some(1), "the record survives");

        // The same Ready (status, reason, generation) with another message: no new Event.
        let mut same = target.clone();
        same.previous_ready = ready_condition(&target.status).cloned();
        assert!(event_for(&same).is_none());
    }

    #[test]
    fn retries_back_off_from_one_second_to_half_a_minute() {
        let waits: Vec<u64> = (0..9).map(|f| retry_delay(f).as_secs()).collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("short", 1024), "short");
        let long = "é".repeat(600);
        let cut = truncate(&long, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with("..."), "{}", cut.len());
    }
}
