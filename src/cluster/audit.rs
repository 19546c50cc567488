//! The background audit in cluster mode: the leader judges existing objects of every inspected
//! kind against the policies in force ([`crate::audit`]) and reports what it finds.
//!
//! When: when a replica starts leading (once policies and caches are loaded), when the policies
//! in force change (then only the namespaces a changed, added or removed policy may reach, once
//! the policies have stayed the same for one check, every 5 s, so a GitOps sync of many
//! policies makes one run; at most 30 s after the first change however often they
//! change), and every `--audit-interval` (default 1 h; 0 turns the audit off).
//!
//! How: one namespace at a time, each kind listed in pages (`limit` and `continue`): the first
//! of [`FIRST_PAGE`] objects, then about [`PAGE_BYTES`] of objects as large as the largest of
//! the page before (at most [`PAGE_SIZE`]). A page is read up to [`PAGE_MAX_BYTES`]; a larger one (a tenant's
//! objects larger than those before them) is dropped unread past that and asked again with a
//! quarter of the objects. Each object is parsed from the page's text only when it is judged;
//! a namespace's findings are held in [`Findings`], which keeps the `--audit-max-results`
//! entries its report lists and counts the rest. Memory is one page and one namespace's kept
//! entries whatever the cluster's size. The task yields to the runtime every [`YIELD_EVERY`]
//! objects or 256 KiB, so admission requests, served on the same runtime, never wait behind
//! it. Facts come from the same caches and SubjectAccessReviews as admission. The audit judges
//! every namespace a policy matches, those the webhooks skip (`kube-system`, arcguard's own)
//! included: what runs there is reported, though admission never judged it.
//!
//! Partial failure: a namespace whose list or report fails is logged (a warning naming it) and
//! retried after a back-off (30 s doubling to the interval) while the others are audited and
//! reported; the back-off delays only those retries, never the audit of a policy change. After
//! three failures in a row the run stops (the apiserver, not a namespace, is then at fault) and
//! the rest waits for the retry. An expired continue token (410) lists the namespace again from
//! the start, once. Calico's kinds are listed through whichever of its two API groups answers
//! (asked again every full run); a 503 from one (its aggregated API server down) tries the
//! other and fails the namespace if neither answers.
//!
//! What it writes:
//! - one OpenReports `Report` named `arcguard` per namespace (a `ClusterReport` for
//!   cluster-scoped objects), only when its content changed, by server-side apply (field
//!   manager `arcguard`); a namespace with nothing to report loses its report. A report of that
//!   name without arcguard's label and field manager is left alone, and its namespace counts
//!   as failed (so it is warned about at every retry).
//!   Without the OpenReports CRDs (`manifests/components/reports`) the audit still runs and
//!   says once that reports are off;
//! - each policy's `status.audit` (pass, fail and warn counts, `lastRun`), by server-side apply
//!   under its own field manager `arcguard-audit`, so it never contends with the policy status:
//!   after every full run, and after a policy-change run only where the counts changed;
//! - the gauges `arcguard_audit_results{policy,result}`,
//!   `arcguard_audit_last_run_timestamp_seconds` (complete runs only) and
//!   `arcguard_audit_interval_seconds`, the counter `arcguard_audit_runs_total{outcome}`, and a
//!   log line per run with its figures.
//!
//! `arcguard audit` runs the same listing and judging ([`ScopeAuditor`]) once from a
//! workstation ([`audit_once`], with the policies [`policies_in_force`] lists), with the
//! caller's credentials; it writes nothing, and the calls below are the leader's.
//!
//! API calls (for RBAC; `tests/manifests.rs` checks the manifests grant exactly these):
//! - `list core/pods (cluster)`
//! - `list core/replicationcontrollers (cluster)`
//! - `list core/podtemplates (cluster)`
//! - `list apps/deployments (cluster)`
//! - `list apps/replicasets (cluster)`
//! - `list apps/statefulsets (cluster)`
//! - `list apps/daemonsets (cluster)`
//! - `list batch/jobs (cluster)`
//! - `list batch/cronjobs (cluster)`
//! - `list networking.k8s.io/networkpolicies (cluster)`
//! - `list projectcalico.org/networkpolicies (cluster)`
//! - `list projectcalico.org/globalnetworkpolicies (cluster)`
//! - `list crd.projectcalico.org/networkpolicies (cluster)`
//! - `list crd.projectcalico.org/globalnetworkpolicies (cluster)`
//! - `get openreports.io/reports (all namespaces: by name)`
//! - `patch openreports.io/reports (all namespaces: by name)` (server-side apply)
//! - `create openreports.io/reports (all namespaces)` (a server-side apply that creates)
//! - `delete openreports.io/reports (all namespaces: by name)`
//! - `get openreports.io/clusterreports (cluster: by name)`
//! - `patch openreports.io/clusterreports (cluster: by name)` (server-side apply)
//! - `create openreports.io/clusterreports (cluster)` (a server-side apply that creates)
//! - `delete openreports.io/clusterreports (cluster: by name)`
//! - `patch arcguard.io/clusterguardpolicies/status (cluster)` (server-side apply, `status.audit`)
//! - `patch arcguard.io/guardpolicies/status (namespaced)` (server-side apply, `status.audit`)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;

use super::facts::ClusterFacts;
use super::policies;
use crate::audit::findings::Summary;
use crate::audit::report::{self, Findings, Timestamp};
use crate::audit::{Audit, judge};
use crate::policy::crd::{AuditStatus, ClusterGuardPolicy, GuardPolicy};
use crate::policy::{Policy, PolicySet, Scope};
use crate::rules::StaticFacts;
use crate::server::{AppState, FactSource};

/// Objects per list page at most.
pub const PAGE_SIZE: u32 = 250;
/// Objects in the first page of each kind: before any object's size is known.
pub const FIRST_PAGE: u32 = 50;
/// The size of list page aimed at, in bytes of JSON: after each page the next page's `limit`
/// is this divided by that page's largest object (objects range from 1 KiB to over 1 MiB),
/// so what a page costs does not depend on how large a namespace's objects are.
pub const PAGE_BYTES: usize = 2 * 1024 * 1024;
/// The most bytes of one list page read: a page that would be larger (a tenant's objects
/// larger than those before them) is dropped unread past this and asked again with a quarter of
/// the objects. Larger than any one object etcd stores (1.5 MiB by default).
pub const PAGE_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Bytes of objects judged between two yields to the runtime, whatever their count.
const YIELD_BYTES: usize = 256 * 1024;
/// Objects judged between two yields to the runtime.
pub const YIELD_EVERY: usize = 16;
/// Deadline of one API call.
const CALL_DEADLINE: Duration = Duration::from_secs(20);
/// How often the policies in force are compared with those last audited.
const POLICY_CHECK: Duration = Duration::from_secs(5);
/// The longest a policy change waits for the policies to stop changing before it is audited.
const DEBOUNCE_MAX: Duration = Duration::from_secs(30);
/// The first wait after a failed run; it doubles up to the audit interval.
const RETRY_MIN: Duration = Duration::from_secs(30);
/// The field manager of the audit's status writes.
pub const STATUS_FIELD_MANAGER: &str = "arcguard-audit";
/// The field manager of the reports.
const REPORT_FIELD_MANAGER: &str = "arcguard";

/// The audit's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// Time between two full audits; zero turns the audit off.
    pub interval: Duration,
    /// Entries listed per report (the summary counts them all).
    pub max_results: usize,
}

/// Why an audit run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum AuditRunError {
    /// A call failed. Its message is the apiserver's (not the client error's whole chain,
    /// which repeats it).
    #[error("{what}: {}", describe(.error))]
    Api {
        /// What was being done.
        what: String,
        /// The client error.
        error: kube::Error,
    },
    /// A report of arcguard's name is in the way that arcguard did not write.
    #[error(
        "{what}: a report named arcguard exists that arcguard did not write (no app.kubernetes.io/managed-by=arcguard label or no field manager arcguard); it is left alone and this namespace is not reported until it is deleted"
    )]
    ForeignReport {
        /// Which report.
        what: String,
    },
    /// One object of a list is larger than a whole page may be.
    #[error("{what}: one object is larger than {} MiB", PAGE_MAX_BYTES / (1024 * 1024))]
    PageTooLarge {
        /// What was being done.
        what: String,
    },
    /// A call took longer than its deadline.
    #[error("{what} took longer than {}s", CALL_DEADLINE.as_secs())]
    Timeout {
        /// What was being done.
        what: String,
    },
    /// This replica stopped leading.
    #[error("leadership moved")]
    NotLeading,
    /// `arcguard audit`: the namespace and node caches were not filled in time.
    #[error(
        "the namespaces and nodes could not be listed within {}s (is the cluster reachable, and may these credentials list and watch namespaces and nodes?)",
        .waited.as_secs()
    )]
    CachesNotFilled {
        /// How long it waited.
        waited: Duration,
    },
    /// `arcguard audit --namespace`: the namespace does not exist.
    #[error("namespace {0:?} does not exist")]
    NoSuchNamespace(String),
}

/// A client error as one line: the apiserver's message and code for an answer, the error's
/// text otherwise.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => {
            format!("{} ({})", status.message, status.code)
        }
        other => other.to_string(),
    }
}

/// One listable kind: its resource and whether it is namespaced.
#[derive(Clone, Debug)]
struct Listed {
    resource: ApiResource,
    namespaced: bool,
}

/// Every kind the audit lists, in the order it lists them. Calico's kinds are served either by
/// its API server (`projectcalico.org/v3`) or as CRDs (`crd.projectcalico.org/v1`), the same
/// objects either way: the first group that answers is used.
fn kinds() -> Vec<(Listed, Option<Listed>)> {
    let of = |group: &str, version: &str, kind: &str, plural: &str, namespaced: bool| Listed {
        resource: ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            plural,
        ),
        namespaced,
    };
    vec![
        (of("", "v1", "Pod", "pods", true), None),
        (of("", "v1", "ReplicationController", "replicationcontrollers", true), None),
        (of("", "v1", "PodTemplate", "podtemplates", true), None),
        (of("apps", "v1", "Deployment", "deployments", true), None),
        (of("apps", "v1", "ReplicaSet", "replicasets", true), None),
        (of("apps", "v1", "StatefulSet", "statefulsets", true), None),
        (of("apps", "v1", "DaemonSet", "daemonsets", true), None),
        (of("batch", "v1", "Job", "jobs", true), None),
        (of("batch", "v1", "CronJob", "cronjobs", true), None),
        (of("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", true), None),
        (
            of("projectcalico.org", "v3", "NetworkPolicy", "networkpolicies", true),
            Some(of("crd.projectcalico.org", "v1", "NetworkPolicy", "networkpolicies", true)),
        ),
        (
            of("projectcalico.org", "v3", "GlobalNetworkPolicy", "globalnetworkpolicies", false),
            Some(of(
                "crd.projectcalico.org",
                "v1",
                "GlobalNetworkPolicy",
                "globalnetworkpolicies",
                false,
            )),
        ),
    ]
}

/// The namespaces (and `None`, the cluster scope) a change from `before` to `after` may
/// affect: those any added, removed or changed policy may apply in.
#[must_use]
pub fn affected_scopes(
    before: &PolicySet,
    after: &PolicySet,
    namespaces: &[String],
    facts: &dyn crate::rules::Facts,
) -> BTreeSet<Option<String>> {
    let ids = |set: &PolicySet| -> BTreeMap<String, Policy> {
        set.policies().iter().map(|p| (p.id(), p.clone())).collect()
    };
    let (old, new) = (ids(before), ids(after));
    let changed: Vec<&Policy> = old
        .iter()
        .filter(|(id, p)| new.get(*id) != Some(*p))
        .map(|(_, p)| p)
        .chain(new.iter().filter(|(id, p)| old.get(*id) != Some(*p)).map(|(_, p)| p))
        .collect();
    let mut scopes = BTreeSet::new();
    for scope in namespaces.iter().map(|n| Some(n.clone())).chain([None]) {
        if changed.iter().any(|p| p.may_apply_in(scope.as_deref(), facts)) {
            scopes.insert(scope);
        }
    }
    scopes
}

/// Facts holding every namespace's labels from the cache: what deciding which namespaces a
/// policy may reach needs.
fn namespace_facts(facts: &ClusterFacts, namespaces: &[String]) -> StaticFacts {
    let mut labels = StaticFacts::default();
    for namespace in namespaces {
        if let Some(of) = facts.namespace_labels_of(namespace) {
            labels.namespace_labels.insert(namespace.clone(), of);
        }
    }
    labels
}

/// Runs the audit while this replica leads, until `stop` turns true.
pub async fn run(
    client: kube::Client,
    state: AppState,
    facts: Arc<ClusterFacts>,
    config: AuditConfig,
    mut leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    state.metrics.set_audit_interval(i64::try_from(config.interval.as_secs()).unwrap_or(i64::MAX));
    if config.interval.is_zero() {
        tracing::info!("background audit off (--audit-interval 0)");
        return;
    }
    let mut auditor = Auditor::new(client, config);
    // The policies last audited; `None`: audit everything next.
    let mut audited: Option<PolicySet> = None;
    // The policies at the previous check: a change is audited once they have stayed the same
    // for one check, so a GitOps sync applying many policies makes one run, not one each.
    let mut seen: Option<PolicySet> = None;
    // When the policies first differed from those audited, while that run waits to settle.
    let mut changed_at: Option<tokio::time::Instant> = None;
    let mut next_full = tokio::time::Instant::now();
    // After a run in which scopes failed: no retry of them before this (RETRY_MIN doubling to
    // the interval), so a lasting failure (RBAC, an apiserver in trouble) does not turn into a
    // run every few seconds.
    let mut retry_at = tokio::time::Instant::now();
    let mut retry_delay = RETRY_MIN;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            changed = leader.changed() => {
                if changed.is_err() { return }
                audited = None;
            }
            () = tokio::time::sleep(POLICY_CHECK) => {}
        }
        let now = tokio::time::Instant::now();
        if !*leader.borrow() || !state.readiness.is_policies_loaded() || !facts.nodes_synced() {
            continue;
        }
        let policies = state.snapshot.load().policies.clone();
        let settled = seen.as_ref() == Some(&policies);
        seen = Some(policies.clone());
        let namespaces = facts.namespace_names();
        let labels = namespace_facts(&facts, &namespaces);
        let full = audited.is_none() || now >= next_full;
        let scopes: Option<BTreeSet<Option<String>>> = match &audited {
            _ if full => None,
            Some(before) if *before != policies => {
                // Policies that keep changing (a tenant editing a GuardPolicy every few
                // seconds) delay a run at most DEBOUNCE_MAX, not forever.
                let first = *changed_at.get_or_insert(now);
                if !settled && now.duration_since(first) < DEBOUNCE_MAX {
                    continue;
                }
                let mut scopes = affected_scopes(before, &policies, &namespaces, &labels);
                scopes.extend(auditor.failed.iter().cloned());
                Some(scopes)
            }
            // Only retries of failed scopes wait for the back-off: a namespace that keeps
            // failing must not hold up the audit of policy changes everywhere else.
            _ if !auditor.failed.is_empty() && now >= retry_at => Some(auditor.failed.clone()),
            _ => continue,
        };
        changed_at = None;
        let run =
            auditor.run(&state, &facts, &labels, &policies, &namespaces, scopes.as_ref(), &leader);
        let outcome = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            outcome = run => outcome,
        };
        match outcome {
            Ok(outcome) => {
                if full {
                    next_full = tokio::time::Instant::now() + config.interval;
                }
                audited = Some(policies);
                if outcome == RunOutcome::Complete {
                    retry_delay = RETRY_MIN;
                } else {
                    retry_at = tokio::time::Instant::now() + retry_delay;
                    tracing::warn!(
                        failed = auditor.failed.len(),
                        retry_in = ?retry_delay,
                        "background audit: some scopes failed; retrying them"
                    );
                    retry_delay = (retry_delay * 2).min(config.interval.max(RETRY_MIN));
                }
            }
            Err(AuditRunError::NotLeading) => {}
            Err(error) => {
                tracing::warn!(%error, retry_in = ?retry_delay, "background audit failed; retrying");
                retry_at = tokio::time::Instant::now() + retry_delay;
                retry_delay = (retry_delay * 2).min(config.interval.max(RETRY_MIN));
            }
        }
    }
}

/// Lists and judges the objects of one scope (a namespace, or the cluster) at a time: the part
/// of the audit that the leader's task and `arcguard audit` share. It reads and writes nothing
/// else: what to do with the findings is the caller's.
#[derive(Clone)]
pub struct ScopeAuditor {
    client: kube::Client,
    /// Entries each scope's [`Findings`] keep.
    limit: usize,
    /// Which of a kind's alternatives answered last (Calico's two API groups), by kind.
    served: BTreeMap<String, Option<usize>>,
}

/// One page of a list, its items left as JSON text until each is judged: a page holds one
/// copy of its objects, not two.
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(default)]
    metadata: PageMeta,
    #[serde(borrow, default)]
    items: Vec<&'a RawValue>,
}

#[derive(Default, Deserialize)]
struct PageMeta {
    #[serde(rename = "continue", default)]
    continue_: Option<String>,
}

/// Whether `error` says a write was too large: 413, or etcd's gRPC limit surfacing as a 500
/// whose message says so (`trying to send message larger than max`, `request is too large`).
fn too_large(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            status.code == 413
                || status.message.contains("larger than max")
                || status.message.contains("too large")
        }
        _ => false,
    }
}

/// Whether `error` is a 503 Service Unavailable answer.
fn unavailable_status(error: &AuditRunError) -> bool {
    matches!(error, AuditRunError::Api { error: kube::Error::Api(status), .. } if status.code == 503)
}

/// The next page's `limit`: about [`PAGE_BYTES`] of objects as large as the largest seen.
fn next_limit(largest: usize) -> u32 {
    if largest == 0 {
        return PAGE_SIZE;
    }
    u32::try_from(PAGE_BYTES / largest).unwrap_or(PAGE_SIZE).clamp(1, PAGE_SIZE)
}

/// One list page's body, read up to [`PAGE_MAX_BYTES`]; `None` when it is larger (the rest is
/// not read). An error answer becomes [`kube::Error::Api`] with the apiserver's Status.
async fn read_page(
    client: &kube::Client,
    request: http::Request<Vec<u8>>,
) -> Result<Option<bytes::Bytes>, kube::Error> {
    use http_body_util::BodyExt as _;
    let response = client.send(request.map(kube::client::Body::from)).await?;
    let code = response.status();
    let body = http_body_util::Limited::new(response.into_body(), PAGE_MAX_BYTES);
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => return Ok(None),
        Err(error) => return Err(kube::Error::Service(error)),
    };
    if code.is_client_error() || code.is_server_error() {
        let status = serde_json::from_slice::<kube::core::Status>(&bytes).unwrap_or_else(|_| {
            kube::core::Status::failure(&String::from_utf8_lossy(&bytes), "")
                .with_code(code.as_u16())
        });
        return Err(kube::Error::Api(status.boxed()));
    }
    Ok(Some(bytes))
}

impl ScopeAuditor {
    /// A scope auditor calling the API with `client`, each scope's findings keeping at most
    /// `limit` entries (the counts cover all).
    #[must_use]
    pub fn new(client: kube::Client, limit: usize) -> Self {
        Self { client, limit, served: BTreeMap::new() }
    }

    /// Forgets which API group serves Calico's kinds, so the next scope asks again (Calico's
    /// API server installed, removed or replaced by its CRDs since).
    pub fn rediscover(&mut self) {
        self.served.clear();
    }

    /// Lists every object of one scope (`None`: the cluster scope) kind by kind, in pages of
    /// about [`PAGE_BYTES`], and judges each with the policies that apply to it, facts gathered
    /// from `facts`; `objects` counts the objects listed. A scope no policy may reach is not
    /// listed. When a page's continue token expires (410 Gone: the scope took longer than etcd
    /// keeps its compaction window), the scope is listed again from the start, once.
    ///
    /// # Errors
    /// [`AuditRunError`] when a list fails (but for a 404 of a kind that is not served, such
    /// as Calico's without Calico) or takes longer than its deadline.
    pub async fn audit_scope(
        &mut self,
        facts: &ClusterFacts,
        labels: &StaticFacts,
        policies: &PolicySet,
        namespace: Option<&str>,
        objects: &mut usize,
    ) -> Result<Findings, AuditRunError> {
        if !policies.policies().iter().any(|p| p.may_apply_in(namespace, labels)) {
            return Ok(Findings::new(self.limit));
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut listed = 0;
            match self.list_scope(facts, policies, namespace, &mut listed).await {
                Err(AuditRunError::Api { error: kube::Error::Api(status), .. })
                    if status.code == 410 && attempts < 2 =>
                {
                    tracing::info!(
                        namespace = namespace.unwrap_or(""),
                        "a list's continue token expired; listing the scope again"
                    );
                }
                outcome => {
                    *objects += listed;
                    return outcome;
                }
            }
        }
    }

    /// One listing of every kind of one scope.
    async fn list_scope(
        &mut self,
        facts: &ClusterFacts,
        policies: &PolicySet,
        namespace: Option<&str>,
        objects: &mut usize,
    ) -> Result<Findings, AuditRunError> {
        let mut findings = Findings::new(self.limit);
        for (index, (first, second)) in kinds().into_iter().enumerate() {
            if first.namespaced != namespace.is_some() {
                continue;
            }
            let label = index.to_string();
            let alternatives: Vec<Listed> = [Some(first), second].into_iter().flatten().collect();
            // Known to be served by one alternative, known to be served by none (no Calico:
            // a 404 each), or not tried yet.
            let order: Vec<usize> = match self.served.get(&label).copied() {
                Some(Some(i)) => vec![i],
                Some(None) => continue,
                None => (0..alternatives.len()).collect(),
            };
            let mut served = None;
            // An alternative that answered 503 (an aggregated API server, such as Calico's,
            // that is down): the other may serve the same objects; if none does, the scope
            // fails rather than pass as if the kind did not exist.
            let mut unavailable = None;
            for i in order {
                match self
                    .list_kind(&alternatives[i], namespace, facts, policies, &mut findings, objects)
                    .await
                {
                    Ok(()) => {
                        served = Some(i);
                        break;
                    }
                    Err(AuditRunError::Api { error: kube::Error::Api(status), .. })
                        if status.code == 404 => {}
                    Err(error) if unavailable_status(&error) => unavailable = Some(error),
                    Err(error) => return Err(error),
                }
            }
            match (served, unavailable) {
                (None, Some(error)) => return Err(error),
                (served, _) => {
                    self.served.entry(label).or_insert(served);
                }
            }
        }
        Ok(findings)
    }

    /// Lists one kind in `namespace` page by page, judging each object.
    async fn list_kind(
        &self,
        kind: &Listed,
        namespace: Option<&str>,
        facts: &ClusterFacts,
        policies: &PolicySet,
        findings: &mut Findings,
        objects: &mut usize,
    ) -> Result<(), AuditRunError> {
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &kind.resource),
            None => Api::all_with(self.client.clone(), &kind.resource),
        };
        let request = kube::core::Request::new(api.resource_url());
        let what =
            format!("listing {} in {}", kind.resource.plural, namespace.unwrap_or("the cluster"));
        let mut limit = FIRST_PAGE;
        let mut token: Option<String> = None;
        let mut since_yield = 0usize;
        loop {
            let mut params = ListParams::default().limit(limit);
            if let Some(token) = &token {
                params = params.continue_token(token);
            }
            let call = match request.list(&params) {
                Ok(call) => call,
                Err(error) => {
                    let error = kube::Error::BuildRequest(error);
                    return Err(AuditRunError::Api { what, error });
                }
            };
            let bytes =
                match tokio::time::timeout(CALL_DEADLINE, read_page(&self.client, call)).await {
                    Ok(Ok(Some(bytes))) => bytes,
                    Ok(Ok(None)) if limit > 1 => {
                        limit = (limit / 4).max(1);
                        continue;
                    }
                    Ok(Ok(None)) => return Err(AuditRunError::PageTooLarge { what }),
                    Ok(Err(error)) => return Err(AuditRunError::Api { what, error }),
                    Err(_) => return Err(AuditRunError::Timeout { what }),
                };
            let page: Page<'_> = match serde_json::from_slice(&bytes) {
                Ok(page) => page,
                Err(error) => {
                    let error = kube::Error::SerdeError(error);
                    return Err(AuditRunError::Api { what, error });
                }
            };
            // The next page is sized by this page's largest object only: one large object
            // must not turn the rest of a namespace into pages of one (the byte cap, not this
            // estimate, is what bounds memory).
            let mut largest = 0usize;
            for raw in &page.items {
                *objects += 1;
                since_yield += raw.get().len();
                largest = largest.max(raw.get().len());
                if (*objects).is_multiple_of(YIELD_EVERY) || since_yield >= YIELD_BYTES {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
                let mut value: serde_json::Value = match serde_json::from_str(raw.get()) {
                    Ok(value) => value,
                    Err(error) => {
                        tracing::warn!(%error, "an object does not parse; skipped");
                        continue;
                    }
                };
                // Items of a list carry no apiVersion and kind of their own.
                value["apiVersion"] = serde_json::json!(kind.resource.api_version);
                value["kind"] = serde_json::json!(kind.resource.kind);
                let audit = match Audit::of(&value) {
                    Ok(Some(audit)) => audit,
                    Ok(None) => continue,
                    Err(error) => {
                        tracing::warn!(%error, "an object cannot be audited; skipped");
                        continue;
                    }
                };
                drop(value);
                let prepared = match audit.prepare() {
                    Ok(prepared) => prepared,
                    Err(error) => {
                        tracing::warn!(%error, "an object does not decode; skipped");
                        continue;
                    }
                };
                let Some(view) = prepared.view.as_ref() else { continue };
                let gathered = facts.gather(view, policies).await;
                findings.record(&audit.subject, judge(view, policies, &gathered));
            }
            limit = next_limit(largest);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => token = Some(next),
                None => return Ok(()),
            }
        }
    }
}

/// A policy whose current generation does not compile, as [`policies_in_force`] found it: the
/// controller keeps that generation out, enforcing the last good one its status records, if
/// any.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// The policy: `name`, or `namespace/name` for a GuardPolicy.
    pub policy: String,
    /// The generation that does not compile.
    pub generation: i64,
    /// The last good generation enforced instead, if any.
    pub kept: Option<i64>,
    /// Why it does not compile.
    pub error: String,
}

/// The ClusterGuardPolicies and GuardPolicies in force, from one list of each, compiled as the
/// controller compiles them ([`policies::reconcile`]), and the generations it keeps out.
///
/// # Errors
/// [`AuditRunError`] when a list fails or takes longer than its deadline.
pub async fn policies_in_force(
    client: &kube::Client,
) -> Result<(PolicySet, Vec<Rejected>), AuditRunError> {
    let mut objects = Vec::new();
    for (resource, namespaced) in [
        (ApiResource::erase::<ClusterGuardPolicy>(&()), false),
        (ApiResource::erase::<GuardPolicy>(&()), true),
    ] {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let what = format!("listing {}", resource.plural);
        let list = match tokio::time::timeout(CALL_DEADLINE, api.list(&ListParams::default())).await
        {
            Ok(Ok(list)) => list,
            Ok(Err(source)) => return Err(AuditRunError::Api { what, error: source }),
            Err(_) => return Err(AuditRunError::Timeout { what }),
        };
        objects.extend(list.items.iter().filter_map(|o| policies::to_object(o, namespaced)));
    }
    let mut cache = BTreeMap::new();
    policies::reconcile(&mut cache, &objects);
    let rejected = cache
        .iter()
        .filter_map(|((scope, name), entry)| {
            let policy = match scope {
                Scope::Cluster => name.clone(),
                Scope::Namespace(ns) => format!("{ns}/{name}"),
            };
            Some(Rejected {
                policy,
                generation: entry.generation,
                kept: entry.enforced.as_ref().map(|e| e.generation),
                error: entry.error.clone()?,
            })
        })
        .collect();
    Ok((policies::policy_set(&cache), rejected))
}

/// What one run of [`audit_once`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OnceAudit {
    /// The findings of each scope audited (`None`: the cluster scope), in order.
    pub scopes: Vec<(Option<String>, Findings)>,
    /// Objects listed.
    pub listed: usize,
}

/// `arcguard audit`: one audit of `namespaces` (every namespace when `None`) and the cluster
/// scope with `policies`, listing and judging as the leader does ([`ScopeAuditor`]), facts
/// from the same caches ([`ClusterFacts`], filled within `wait`); each scope keeps at most
/// `max_results` entries (the counts cover all). It writes nothing: no reports, no status, no
/// metrics.
///
/// # Errors
/// [`AuditRunError`] when the caches are not filled within `wait`, a namespace named does not
/// exist, or a list fails.
pub async fn audit_once(
    client: kube::Client,
    policies: &PolicySet,
    namespaces: Option<&[String]>,
    max_results: usize,
    wait: Duration,
) -> Result<OnceAudit, AuditRunError> {
    let deadline = tokio::time::Instant::now() + wait;
    let facts = ClusterFacts::start(client.clone());
    if tokio::time::timeout_at(deadline, facts.synced()).await.is_err() {
        return Err(AuditRunError::CachesNotFilled { waited: wait });
    }
    if policies.policies().iter().any(|p| matches!(p.rule, crate::rules::Rule::Gmsa(_)))
        && tokio::time::timeout_at(deadline, facts.credential_specs_synced()).await.is_err()
    {
        tracing::warn!(
            "GMSACredentialSpecs could not be listed (is the windows.k8s.io CRD installed, and may these credentials list it?): gMSA policies fail pods whose credential spec cannot be seen"
        );
    }
    let all = facts.namespace_names();
    let namespaces: Vec<String> = match namespaces {
        None => all.clone(),
        Some(named) => {
            if let Some(missing) = named.iter().find(|n| !all.contains(n)) {
                return Err(AuditRunError::NoSuchNamespace(missing.clone()));
            }
            named.iter().collect::<BTreeSet<_>>().into_iter().cloned().collect()
        }
    };
    let labels = namespace_facts(&facts, &all);
    let mut auditor = ScopeAuditor::new(client, max_results);
    let mut run = OnceAudit::default();
    for scope in namespaces.into_iter().map(Some).chain([None]) {
        let findings = auditor
            .audit_scope(&facts, &labels, policies, scope.as_deref(), &mut run.listed)
            .await?;
        run.scopes.push((scope, findings));
    }
    Ok(run)
}

/// How a run of the leader's audit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunOutcome {
    /// Every scope it set out to audit was listed, judged and reported.
    Complete,
    /// Some scopes failed; the others were audited.
    Partial,
    /// Every scope it tried failed.
    Failed,
}

impl RunOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Partial => "partial",
            Self::Failed => "failed",
        }
    }
}

/// Whether a stored report is arcguard's: it carries arcguard's label and was written by its
/// field manager. Anything else named `arcguard` is left alone. Not a security boundary (a
/// writer may set both): only arcguard and cluster administrators should be able to write
/// OpenReports objects.
fn owned(stored: &serde_json::Value) -> bool {
    let labelled = stored
        .pointer(&format!("/metadata/labels/{}", report::MANAGED_BY.0.replace('/', "~1")))
        .and_then(serde_json::Value::as_str)
        == Some(report::MANAGED_BY.1);
    let managed = stored
        .pointer("/metadata/managedFields")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|fields| {
            fields.iter().any(|f| {
                f.get("manager").and_then(serde_json::Value::as_str) == Some(REPORT_FIELD_MANAGER)
            })
        });
    labelled && managed
}

/// Scopes failing one after the other after which a run stops: the apiserver, not a
/// namespace, is then likely at fault, and each further scope would only wait for its deadline.
const FAILED_IN_A_ROW: usize = 3;

/// The audit's state across runs.
struct Auditor {
    client: kube::Client,
    config: AuditConfig,
    /// The listing and judging of each scope.
    scopes: ScopeAuditor,
    /// Whether the OpenReports CRDs are served, as this run's discovery said (every run asks
    /// again, so installing them later turns reports on without a restart).
    reports_on: Option<bool>,
    /// Whether "reports are off" has been logged (once, until they are on again).
    said_off: bool,
    /// Totals by policy from the last audit of every scope.
    totals: BTreeMap<Option<String>, BTreeMap<String, Summary>>,
    /// Scopes whose last audit failed: audited again at the next retry.
    failed: BTreeSet<Option<String>>,
    /// The counts each policy's `status.audit` last got.
    statuses: BTreeMap<String, [u64; 3]>,
}

impl Auditor {
    fn new(client: kube::Client, config: AuditConfig) -> Self {
        Self {
            scopes: ScopeAuditor::new(client.clone(), config.max_results),
            client,
            config,
            reports_on: None,
            said_off: false,
            totals: BTreeMap::new(),
            failed: BTreeSet::new(),
            statuses: BTreeMap::new(),
        }
    }

    /// One run over `scopes` (all namespaces and the cluster scope when `None`: a full run).
    /// A scope that fails is logged, kept in `failed` and skipped: the others are still
    /// audited and reported.
    ///
    /// # Errors
    /// [`AuditRunError::NotLeading`] when leadership moves during the run.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        state: &AppState,
        facts: &ClusterFacts,
        labels: &StaticFacts,
        policies: &PolicySet,
        namespaces: &[String],
        scopes: Option<&BTreeSet<Option<String>>>,
        leader: &watch::Receiver<bool>,
    ) -> Result<RunOutcome, AuditRunError> {
        let started = tokio::time::Instant::now();
        self.probe_reports().await;
        if scopes.is_none() {
            self.scopes.rediscover();
        }
        let all: Vec<Option<String>> =
            namespaces.iter().map(|n| Some(n.clone())).chain([None]).collect();
        let todo: Vec<Option<String>> = match scopes {
            Some(scopes) => all.into_iter().filter(|s| scopes.contains(s)).collect(),
            None => all,
        };
        // Scopes that no longer exist (a deleted namespace) drop out.
        let live: BTreeSet<Option<String>> =
            namespaces.iter().map(|n| Some(n.clone())).chain([None]).collect();
        self.totals.retain(|scope, _| live.contains(scope));
        self.failed.retain(|scope| live.contains(scope));
        let mut objects = 0usize;
        let mut written = 0usize;
        let mut failed = 0usize;
        let mut in_a_row = 0usize;
        let mut first_error = None;
        for (index, scope) in todo.iter().enumerate() {
            if !*leader.borrow() {
                return Err(AuditRunError::NotLeading);
            }
            if in_a_row >= FAILED_IN_A_ROW {
                // The rest is retried with the failed ones.
                failed += todo.len() - index;
                self.failed.extend(todo[index..].iter().cloned());
                break;
            }
            let outcome = match self
                .scopes
                .audit_scope(facts, labels, policies, scope.as_deref(), &mut objects)
                .await
            {
                Ok(findings) => {
                    self.totals.insert(scope.clone(), findings.by_policy().clone());
                    self.write_report(scope.as_deref(), &findings).await
                }
                Err(error) => Err(error),
            };
            match outcome {
                Ok(wrote) => {
                    written += usize::from(wrote);
                    self.failed.remove(scope);
                    in_a_row = 0;
                }
                Err(error) => {
                    tracing::warn!(%error, namespace = scope.as_deref().unwrap_or(""), "the audit of a namespace failed; it is retried");
                    first_error.get_or_insert_with(|| error.to_string());
                    self.failed.insert(scope.clone());
                    failed += 1;
                    in_a_row += 1;
                }
            }
        }
        let outcome = match failed {
            0 => RunOutcome::Complete,
            n if n == todo.len() => RunOutcome::Failed,
            _ => RunOutcome::Partial,
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        let by_policy = self.by_policy();
        state.metrics.set_audit_results(
            policies.policies().iter().map(|p| {
                let counts = by_policy.get(&p.id()).copied().unwrap_or_default();
                (p.id(), counts)
            }),
            (outcome == RunOutcome::Complete).then(|| now.as_second()),
        );
        state.metrics.record_audit_run(outcome.as_str());
        state.metrics.set_audit_failed_namespaces(self.failed.len());
        self.write_statuses(policies, &by_policy, &Time(now), scopes.is_none()).await;
        tracing::info!(
            scopes = todo.len(),
            failed,
            first_error = first_error.as_deref().unwrap_or(""),
            objects,
            reports_written = written,
            reports = self.reports_on.unwrap_or(false),
            outcome = outcome.as_str(),
            duration_ms = started.elapsed().as_millis(),
            "background audit done"
        );
        Ok(outcome)
    }

    /// Totals by policy over every scope, as `[pass, fail, warn]`.
    fn by_policy(&self) -> BTreeMap<String, [u64; 3]> {
        let mut out: BTreeMap<String, [u64; 3]> = BTreeMap::new();
        for totals in self.totals.values() {
            for (policy, counts) in totals {
                let slot = out.entry(policy.clone()).or_default();
                for (sum, n) in slot.iter_mut().zip([counts.pass, counts.fail, counts.warn]) {
                    *sum += n as u64;
                }
            }
        }
        out
    }

    /// Asks API discovery whether the OpenReports CRDs are served (a read of an absent report
    /// and of an absent resource type both answer 404 NotFound, so only discovery tells them
    /// apart), and says so once when that changes. Discovery needs no RBAC rule.
    async fn probe_reports(&mut self) {
        let probe = self.client.list_api_group_resources(report::API_VERSION);
        let on = match tokio::time::timeout(CALL_DEADLINE, probe).await {
            Ok(Ok(list)) => list.resources.iter().any(|r| r.name == "reports"),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => false,
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not tell whether the OpenReports CRDs are installed; trying again next run");
                false
            }
            Err(_) => false,
        };
        if on && self.said_off {
            tracing::info!("OpenReports CRDs found: the audit writes Reports and ClusterReports");
            self.said_off = false;
        }
        if !on && !self.said_off {
            tracing::info!(
                "the OpenReports CRDs (openreports.io) are not installed: the audit reports through policy status, metrics and logs only (install manifests/components/reports for Reports)"
            );
            self.said_off = true;
        }
        self.reports_on = Some(on);
    }

    /// Writes the scope's report when its content changed (deletes it when there is nothing
    /// to report). Returns whether it wrote.
    async fn write_report(
        &mut self,
        namespace: Option<&str>,
        findings: &Findings,
    ) -> Result<bool, AuditRunError> {
        if self.reports_on != Some(true) {
            return Ok(false);
        }
        let (kind, plural) = match namespace {
            Some(_) => ("Report", "reports"),
            None => ("ClusterReport", "clusterreports"),
        };
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("openreports.io", "v1alpha1", kind),
            plural,
        );
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let what = format!("the {kind} in {}", namespace.unwrap_or("the cluster"));
        let stored =
            match tokio::time::timeout(CALL_DEADLINE, api.get_opt(report::REPORT_NAME)).await {
                Ok(Ok(stored)) => stored.and_then(|s| serde_json::to_value(s).ok()),
                Ok(Err(source)) => return Err(AuditRunError::Api { what, error: source }),
                Err(_) => return Err(AuditRunError::Timeout { what }),
            };
        if let Some(stored) = &stored
            && !owned(stored)
        {
            // Left alone, and the scope counts as failed: the run is partial, the warning
            // comes back at every retry and ArcguardAuditStale fires if it stays.
            return Err(AuditRunError::ForeignReport { what });
        }
        if findings.is_empty() {
            if stored.is_some() {
                let params = DeleteParams::default();
                let call = api.delete(report::REPORT_NAME, &params);
                match tokio::time::timeout(CALL_DEADLINE, call).await {
                    Ok(Ok(_)) => return Ok(true),
                    Ok(Err(kube::Error::Api(status))) if status.code == 404 => return Ok(false),
                    Ok(Err(source)) => return Err(AuditRunError::Api { what, error: source }),
                    Err(_) => return Err(AuditRunError::Timeout { what }),
                }
            }
            return Ok(false);
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let now = Timestamp { seconds: now.as_second(), nanos: now.subsec_nanosecond() };
        // A report the apiserver refuses as too large (etcd's request limit, or a proxy's) is
        // written again with half the entries' bytes, down to a summary with none.
        let mut max_bytes = report::MAX_RESULTS_BYTES;
        loop {
            let next = report::build(
                namespace,
                findings,
                self.config.max_results,
                max_bytes,
                stored.as_ref(),
                now,
            );
            if stored.as_ref().is_some_and(|s| report::same_content(s, &next)) {
                return Ok(false);
            }
            let params = PatchParams::apply(REPORT_FIELD_MANAGER).force();
            let patch = Patch::Apply(&next);
            let call = api.patch(report::REPORT_NAME, &params, &patch);
            match tokio::time::timeout(CALL_DEADLINE, call).await {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(error)) if too_large(&error) && max_bytes > 0 => {
                    tracing::warn!(
                        namespace = namespace.unwrap_or(""),
                        max_bytes,
                        error = %describe(&error),
                        "a report was refused as too large; writing it with fewer entries"
                    );
                    max_bytes /= 2;
                    if max_bytes < 1024 {
                        max_bytes = 0;
                    }
                }
                Ok(Err(error)) => return Err(AuditRunError::Api { what, error }),
                Err(_) => return Err(AuditRunError::Timeout { what }),
            }
        }
    }

    /// Writes the `status.audit` of every policy whose counts changed, and after a full run
    /// (`full`) of every policy, for its `lastRun`; failures are logged (the next run writes
    /// again).
    async fn write_statuses(
        &mut self,
        policies: &PolicySet,
        by_policy: &BTreeMap<String, [u64; 3]>,
        now: &Time,
        full: bool,
    ) {
        self.statuses.retain(|id, _| policies.policies().iter().any(|p| p.id() == *id));
        for policy in policies.policies() {
            let counts = by_policy.get(&policy.id()).copied().unwrap_or_default();
            if !full && self.statuses.get(&policy.id()) == Some(&counts) {
                continue;
            }
            let [pass, fail, warn] = counts;
            let status = AuditStatus { pass, fail, warn, last_run: Some(now.clone()) };
            let (api, api_version, kind): (Api<DynamicObject>, _, _) = match &policy.scope {
                Scope::Cluster => {
                    let resource = ApiResource::erase::<ClusterGuardPolicy>(&());
                    (
                        Api::all_with(self.client.clone(), &resource),
                        resource.api_version,
                        resource.kind,
                    )
                }
                Scope::Namespace(ns) => {
                    let resource = ApiResource::erase::<GuardPolicy>(&());
                    (
                        Api::namespaced_with(self.client.clone(), ns, &resource),
                        resource.api_version,
                        resource.kind,
                    )
                }
            };
            let patch = serde_json::json!({
                "apiVersion": api_version, "kind": kind,
                "metadata": {"name": policy.name},
                "status": {"audit": status},
            });
            let params = PatchParams::apply(STATUS_FIELD_MANAGER).force();
            let patch = Patch::Apply(&patch);
            match tokio::time::timeout(
                CALL_DEADLINE,
                api.patch_status(&policy.name, &params, &patch),
            )
            .await
            {
                Ok(Ok(_)) => {
                    self.statuses.insert(policy.id(), counts);
                }
                Ok(Err(error)) => {
                    self.statuses.remove(&policy.id());
                    tracing::warn!(%error, policy = %policy.id(), "failed to write the policy's audit status")
                }
                Err(_) => {
                    self.statuses.remove(&policy.id());
                    tracing::warn!(policy = %policy.id(), "writing the policy's audit status timed out")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load::cluster_policies as set;

    /// A list answer of `kind` holding `items`.
    fn list(kind: &str, items: &[serde_json::Value]) -> http::Response<kube::client::Body> {
        let body = serde_json::json!({
            "apiVersion": "arcguard.io/v1alpha1", "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": "1"}, "items": items,
        });
        let bytes = serde_json::to_vec(&body).expect("JSON");
        http::Response::builder().body(kube::client::Body::from(bytes)).expect("response")
    }

    fn object(
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        generation: i64,
        registries: &[&str],
    ) -> serde_json::Value {
        let mut object = serde_json::json!({
            "apiVersion": "arcguard.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": generation},
            "spec": {"trustedRegistries": {"registries": registries}},
        });
        if let Some(ns) = namespace {
            object["metadata"]["namespace"] = serde_json::json!(ns);
        }
        object
    }

    #[tokio::test]
    async fn the_policies_in_force_compile_as_the_controller_compiles_them() {
        let (service, mut server) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "default");
        let apiserver = async {
            let (request, send) = server.next_request().await.expect("a list");
            assert_eq!(request.uri().path(), "/apis/arcguard.io/v1alpha1/clusterguardpolicies");
            // Generation 2 of `kept` does not compile; its status records generation 1.
            let mut kept = object("ClusterGuardPolicy", None, "kept", 2, &["https://a.io"]);
            kept["status"] = serde_json::json!({
                "enforcedGeneration": 1,
                "enforcedSpec": {"trustedRegistries": {"registries": ["a.io"]}},
            });
            send.send_response(list(
                "ClusterGuardPolicy",
                &[
                    object("ClusterGuardPolicy", None, "good", 1, &["a.io"]),
                    kept,
                    object("ClusterGuardPolicy", None, "broken", 1, &["https://b.io"]),
                ],
            ));
            let (request, send) = server.next_request().await.expect("a list");
            assert_eq!(request.uri().path(), "/apis/arcguard.io/v1alpha1/guardpolicies");
            send.send_response(list(
                "GuardPolicy",
                &[object("GuardPolicy", Some("shop"), "team", 3, &["c.io"])],
            ));
        };
        let (listed, ()) = tokio::join!(policies_in_force(&client), apiserver);
        let (set, rejected) = listed.expect("listed");
        let mut ids: Vec<String> = set.policies().iter().map(Policy::id).collect();
        ids.sort();
        assert_eq!(ids, ["good", "kept", "shop/team"], "the broken one is kept out");
        let rejected: Vec<(&str, i64, Option<i64>)> =
            rejected.iter().map(|r| (r.policy.as_str(), r.generation, r.kept)).collect();
        assert_eq!(rejected, [("broken", 1, None), ("kept", 2, Some(1))]);
    }

    #[test]
    fn a_policy_change_reaudits_only_the_scopes_it_may_reach() {
        let namespaces: Vec<String> = ["shop", "team-a", "team-b"].map(str::to_owned).to_vec();
        let facts = StaticFacts::default();
        let shop = "  match: {namespaces: [shop]}\n  trustedRegistries: {registries: [a.io]}\n";
        let teams = "  match: {namespaces: [team-*]}\n  trustedRegistries: {registries: [a.io]}\n";
        let before = set(&[("shop", shop), ("teams", teams)]);
        // Nothing changed: nothing to do.
        assert!(affected_scopes(&before, &before, &namespaces, &facts).is_empty());
        // The teams policy tightened: the team namespaces only.
        let tightened = "  match: {namespaces: [team-*]}\n  trustedRegistries: {registries: [a.io], requireDigest: true}\n";
        let after = set(&[("shop", shop), ("teams", tightened)]);
        let scopes = affected_scopes(&before, &after, &namespaces, &facts);
        // A cluster policy's namespace match does not exclude cluster-scoped objects
        // (GlobalNetworkPolicies), so the cluster scope is re-judged too.
        let teams_and_cluster = [None, Some("team-a".to_owned()), Some("team-b".to_owned())];
        assert_eq!(scopes, teams_and_cluster.into());
        // The shop policy deleted: its namespace, whose entries must go.
        let after = set(&[("teams", teams)]);
        assert_eq!(
            affected_scopes(&before, &after, &namespaces, &facts),
            [None, Some("shop".to_owned())].into()
        );
        // A new unscoped policy: every namespace and the cluster scope.
        let after = set(&[("shop", shop), ("teams", teams), ("all", "  calicoLinuxOnly: {}\n")]);
        assert_eq!(affected_scopes(&before, &after, &namespaces, &facts).len(), 4);
    }

    /// An answer with `status` and a Kubernetes Status body.
    fn status(code: u16) -> http::Response<kube::client::Body> {
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": format!("answered {code}"), "code": code,
            "reason": if code == 404 { "NotFound" } else { "" },
        });
        http::Response::builder()
            .status(code)
            .body(kube::client::Body::from(serde_json::to_vec(&body).expect("JSON")))
            .expect("response")
    }

    fn pod(namespace: &str, name: &str, image: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
            "spec": {"containers": [{"name": "app", "image": image}]},
        })
    }

    /// Serves requests from `answer(path, query)` until the client side is dropped; returns
    /// every `path?query` asked, in order.
    async fn apiserver(
        mut server: tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
        mut answer: impl FnMut(&str, &str) -> http::Response<kube::client::Body>,
    ) -> Vec<String> {
        let mut asked = Vec::new();
        while let Some((request, send)) = server.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            asked.push(format!("{} {path}?{query}", request.method()));
            send.send_response(answer(&path, &query));
        }
        asked
    }

    fn mock() -> (
        kube::Client,
        tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
    ) {
        let (service, server) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        (kube::Client::new(service, "default"), server)
    }

    #[tokio::test]
    async fn an_expired_continue_token_lists_the_scope_again_and_calico_falls_back_to_its_crds() {
        let (client, server) = mock();
        let facts = ClusterFacts::empty(client.clone());
        let policies = set(&[("registries", "  trustedRegistries: {registries: [a.io]}\n")]);
        let mut pod_lists = 0;
        let answer = move |path: &str, query: &str| match path {
            "/api/v1/namespaces/shop/pods" => {
                pod_lists += 1;
                match (pod_lists, query.contains("continue=")) {
                    // The first listing: page one, then its token has expired.
                    (1, false) => {
                        let mut page = list("Pod", &[pod("shop", "a", "b.io/x:1")]);
                        *page.body_mut() = kube::client::Body::from(
                            serde_json::to_vec(&serde_json::json!({
                                "metadata": {"continue": "token-1"},
                                "items": [pod("shop", "a", "b.io/x:1")],
                            }))
                            .expect("JSON"),
                        );
                        page
                    }
                    (2, true) => status(410),
                    // The second listing, in one page.
                    (_, false) => {
                        list("Pod", &[pod("shop", "a", "b.io/x:1"), pod("shop", "b", "a.io/y:1")])
                    }
                    other => panic!("unexpected pod list {other:?}"),
                }
            }
            // Calico's API server is down; its CRDs serve the same objects.
            p if p.starts_with("/apis/projectcalico.org/") => status(503),
            _ => list("Any", &[]),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let served = tokio::spawn(async move {
            let asked = apiserver(server, answer).await;
            let _ = tx.send(());
            asked
        });
        let mut auditor = ScopeAuditor::new(client, 10);
        let mut objects = 0;
        let labels = StaticFacts::default();
        let findings = auditor
            .audit_scope(&facts, &labels, &policies, Some("shop"), &mut objects)
            .await
            .expect("audited");
        // Counted once: the second listing replaced the first.
        assert_eq!(findings.verdicts().objects, 2);
        assert_eq!(findings.summary().fail, 1);
        assert_eq!(findings.summary().pass, 1);
        assert_eq!(objects, 2);
        assert_eq!(auditor.served.get("10").copied(), Some(Some(1)), "Calico via its CRDs");
        drop((auditor, facts));
        let _ = rx.await;
        let asked = served.await.expect("served");
        assert!(
            asked.contains(
                &"GET /apis/crd.projectcalico.org/v1/namespaces/shop/networkpolicies?&limit=50"
                    .to_owned()
            ),
            "{asked:#?}"
        );
    }

    #[tokio::test]
    async fn a_kind_no_group_serves_for_a_503_fails_the_scope() {
        let (client, server) = mock();
        let facts = ClusterFacts::empty(client.clone());
        let policies = set(&[("registries", "  trustedRegistries: {registries: [a.io]}\n")]);
        let answer = |path: &str, _: &str| {
            if path.contains("projectcalico.org/") { status(503) } else { list("Any", &[]) }
        };
        tokio::spawn(apiserver(server, answer));
        let mut auditor = ScopeAuditor::new(client, 10);
        let error = auditor
            .audit_scope(&facts, &StaticFacts::default(), &policies, Some("shop"), &mut 0)
            .await
            .expect_err("Calico's policies cannot be listed");
        assert!(error.to_string().contains("networkpolicies"), "{error}");
        assert!(!auditor.served.contains_key("10"), "not remembered as absent");
    }

    #[tokio::test]
    async fn a_failing_namespace_is_retried_while_the_others_are_audited_and_counted() {
        let (client, server) = mock();
        let facts = ClusterFacts::empty(client.clone());
        let policies = set(&[("registries", "  trustedRegistries: {registries: [a.io]}\n")]);
        let answer = |path: &str, _: &str| match path {
            "/apis/openreports.io/v1alpha1" => status(404),
            "/api/v1/namespaces/broken/pods" => status(500),
            "/api/v1/namespaces/shop/pods" => list("Pod", &[pod("shop", "a", "b.io/x:1")]),
            p if p.ends_with("/status") => list("Any", &[]),
            _ => list("Any", &[]),
        };
        let asked = tokio::spawn(apiserver(server, answer));
        let state = AppState::new(crate::server::Snapshot::default());
        let config = AuditConfig { interval: Duration::from_secs(3600), max_results: 10 };
        let mut auditor = Auditor::new(client, config);
        let namespaces = vec!["broken".to_owned(), "shop".to_owned()];
        let (_, leader) = watch::channel(true);
        let labels = StaticFacts::default();
        let outcome = auditor
            .run(&state, &facts, &labels, &policies, &namespaces, None, &leader)
            .await
            .expect("ran");
        assert_eq!(outcome, RunOutcome::Partial);
        assert_eq!(auditor.failed, [Some("broken".to_owned())].into());
        assert_eq!(auditor.by_policy()["registries"], [0, 1, 0]);
        let metrics = state.metrics.encode();
        assert!(metrics.contains("arcguard_audit_runs_total{outcome=\"partial\"} 1"), "{metrics}");
        assert!(metrics.contains("arcguard_audit_failed_namespaces 1"), "{metrics}");
        assert!(
            metrics.contains("arcguard_audit_last_run_timestamp_seconds 0"),
            "a partial run is not a complete one"
        );
        // The next run retries the failed namespace only; the apiserver answers now.
        drop(asked);
        let (client, server) = mock();
        auditor.client = client.clone();
        auditor.scopes = ScopeAuditor::new(client, 10);
        let answer = |path: &str, _: &str| match path {
            "/apis/openreports.io/v1alpha1" => status(404),
            "/api/v1/namespaces/shop/pods" => panic!("shop is not listed again"),
            _ => list("Any", &[]),
        };
        tokio::spawn(apiserver(server, answer));
        let retry = auditor.failed.clone();
        let outcome = auditor
            .run(&state, &facts, &labels, &policies, &namespaces, Some(&retry), &leader)
            .await
            .expect("ran");
        assert_eq!(outcome, RunOutcome::Complete);
        assert!(auditor.failed.is_empty());
        assert_eq!(auditor.by_policy()["registries"], [0, 1, 0], "shop's totals are kept");
    }

    #[tokio::test]
    async fn a_report_arcguard_did_not_write_is_left_alone_and_the_run_is_partial() {
        let (client, server) = mock();
        let facts = ClusterFacts::empty(client.clone());
        let policies = set(&[("registries", "  trustedRegistries: {registries: [a.io]}\n")]);
        let json = |value: serde_json::Value| {
            http::Response::builder()
                .body(kube::client::Body::from(serde_json::to_vec(&value).expect("JSON")))
                .expect("response")
        };
        let answer = move |path: &str, _: &str| match path {
            "/apis/openreports.io/v1alpha1" => json(serde_json::json!({
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "openreports.io/v1alpha1",
                "resources": [
                    {"name": "reports", "singularName": "report", "namespaced": true, "kind": "Report", "verbs": ["get"]},
                    {"name": "clusterreports", "singularName": "clusterreport", "namespaced": false, "kind": "ClusterReport", "verbs": ["get"]},
                ],
            })),
            "/api/v1/namespaces/shop/pods" => list("Pod", &[pod("shop", "a", "b.io/x:1")]),
            // A tenant's forged report: no label, another field manager.
            "/apis/openreports.io/v1alpha1/namespaces/shop/reports/arcguard" => {
                json(serde_json::json!({
                    "apiVersion": "openreports.io/v1alpha1", "kind": "Report",
                    "metadata": {"name": "arcguard", "namespace": "shop",
                        "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
                    "summary": {"pass": 1, "fail": 0},
                }))
            }
            p if p.contains("/reports/") || p.contains("/clusterreports/") => status(404),
            p if p.starts_with("/apis/openreports.io/") => panic!("wrote a report: {p}"),
            _ => list("Any", &[]),
        };
        let asked = tokio::spawn(apiserver(server, answer));
        let state = AppState::new(crate::server::Snapshot::default());
        let config = AuditConfig { interval: Duration::from_secs(3600), max_results: 10 };
        let mut auditor = Auditor::new(client, config);
        let (_, leader) = watch::channel(true);
        let outcome = auditor
            .run(
                &state,
                &facts,
                &StaticFacts::default(),
                &policies,
                &["shop".to_owned()],
                None,
                &leader,
            )
            .await
            .expect("ran");
        assert_eq!(auditor.failed, [Some("shop".to_owned())].into());
        assert_eq!(outcome, RunOutcome::Partial);
        assert_eq!(auditor.by_policy()["registries"], [0, 1, 0], "counted all the same");
        drop((auditor, facts));
        let asked = asked.await.expect("served");
        assert!(
            !asked.iter().any(|a| a.contains("openreports.io/v1alpha1/")
                && (a.starts_with("PATCH") || a.starts_with("DELETE"))),
            "{asked:#?}"
        );
    }

    #[tokio::test]
    async fn scopes_failing_in_a_row_end_the_run_and_wait_for_the_retry() {
        let (client, server) = mock();
        let facts = ClusterFacts::empty(client.clone());
        let policies = set(&[("registries", "  trustedRegistries: {registries: [a.io]}\n")]);
        let answer = |path: &str, _: &str| {
            if path == "/apis/openreports.io/v1alpha1" { status(404) } else { status(500) }
        };
        let asked = tokio::spawn(apiserver(server, answer));
        let state = AppState::new(crate::server::Snapshot::default());
        let config = AuditConfig { interval: Duration::from_secs(3600), max_results: 10 };
        let mut auditor = Auditor::new(client, config);
        let namespaces: Vec<String> = (0..10).map(|i| format!("ns-{i}")).collect();
        let (_, leader) = watch::channel(true);
        let outcome = auditor
            .run(&state, &facts, &StaticFacts::default(), &policies, &namespaces, None, &leader)
            .await
            .expect("ran");
        assert_eq!(outcome, RunOutcome::Failed);
        assert_eq!(auditor.failed.len(), 11, "every scope is retried, the cluster's too");
        drop((auditor, facts));
        let asked = asked.await.expect("served");
        let lists = asked.iter().filter(|a| a.contains("/pods")).count();
        assert_eq!(lists, FAILED_IN_A_ROW, "{asked:#?}");
    }

    #[tokio::test]
    async fn a_page_over_the_byte_cap_is_asked_again_with_fewer_objects() {
        let (client, server) = mock();
        let facts = ClusterFacts::empty(client.clone());
        let policies = set(&[("registries", "  trustedRegistries: {registries: [a.io]}\n")]);
        // Objects of 1 MiB each: fifty of them would be a 50 MiB page.
        let big = |name: &str| {
            let mut pod = pod("shop", name, "a.io/x:1");
            pod["metadata"]["annotations"] = serde_json::json!({"pad": "x".repeat(1 << 20)});
            pod
        };
        let answer = move |path: &str, query: &str| match path {
            "/api/v1/namespaces/shop/pods" => {
                let limit: usize = query
                    .split('&')
                    .find_map(|p| p.strip_prefix("limit="))
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(500);
                let items: Vec<serde_json::Value> =
                    (0..limit.min(20)).map(|i| big(&format!("p{i}"))).collect();
                list("Pod", &items)
            }
            _ => list("Any", &[]),
        };
        let asked = tokio::spawn(apiserver(server, answer));
        let mut auditor = ScopeAuditor::new(client, 10);
        let mut objects = 0;
        let findings = auditor
            .audit_scope(&facts, &StaticFacts::default(), &policies, Some("shop"), &mut objects)
            .await
            .expect("audited");
        assert_eq!(objects, 3, "the page that fitted: three 1 MiB objects");
        assert_eq!(findings.verdicts().objects, 3);
        drop((auditor, facts));
        let asked = asked.await.expect("served");
        let pods: Vec<&String> = asked.iter().filter(|a| a.contains("/pods")).collect();
        assert_eq!(
            pods,
            [
                "GET /api/v1/namespaces/shop/pods?&limit=50",
                "GET /api/v1/namespaces/shop/pods?&limit=12",
                "GET /api/v1/namespaces/shop/pods?&limit=3",
            ]
        );
    }

    #[test]
    fn a_page_holds_about_page_bytes_whatever_the_object_size() {
        assert_eq!(next_limit(0), PAGE_SIZE);
        assert_eq!(next_limit(2048), PAGE_SIZE, "2 KiB objects: the most");
        assert_eq!(next_limit(64 * 1024), 32, "64 KiB objects: 2 MiB pages");
        assert_eq!(next_limit(1536 * 1024), 1, "objects as large as etcd holds: one a page");
    }

    #[test]
    fn only_a_report_with_arcguards_label_and_field_manager_is_arcguards() {
        let report = |labels: serde_json::Value, manager: &str| {
            serde_json::json!({"metadata": {"name": "arcguard", "labels": labels,
                "managedFields": [{"manager": manager, "operation": "Apply"}]}})
        };
        let ours = serde_json::json!({"app.kubernetes.io/managed-by": "arcguard"});
        assert!(owned(&report(ours.clone(), "arcguard")));
        assert!(!owned(&report(ours, "kubectl")), "labelled by someone else");
        assert!(!owned(&report(serde_json::json!({}), "arcguard")), "no label");
        assert!(!owned(&serde_json::json!({"metadata": {"name": "arcguard"}})));
    }
}
