//! The background audit in cluster mode: the leader judges existing objects of every inspected
//! kind against the policies in force ([`crate::audit`]) and reports what it finds.
//!
//! When: when a replica starts leading (once policies and caches are loaded), when the policies
//! in force change (then only the namespaces a changed, added or removed policy may reach), and
//! every `--audit-interval` (default 1 h; 0 turns the audit off).
//!
//! How: one namespace at a time, each kind listed in pages of [`PAGE_SIZE`] (`limit` and
//! `continue`), so memory holds one page and one namespace's findings whatever the cluster's
//! size; the task yields to the runtime every [`YIELD_EVERY`] objects, so admission requests,
//! served on the same runtime, never wait behind it. Facts come from the same caches and
//! SubjectAccessReviews as admission.
//!
//! What it writes:
//! - one OpenReports `Report` named `arcguard` per namespace (a `ClusterReport` for
//!   cluster-scoped objects), only when its content changed, by server-side apply (field
//!   manager `arcguard`); a namespace with nothing to report loses its report. Without the
//!   OpenReports CRDs (`manifests/components/reports`) the audit still runs and says once that
//!   reports are off;
//! - each policy's `status.audit` (pass, fail and warn counts, `lastRun`), by server-side apply
//!   under its own field manager `arcguard-audit`, so it never contends with the policy status;
//! - the gauges `arcguard_audit_results{policy,result}` and
//!   `arcguard_audit_last_run_timestamp_seconds`, and a log line per run with its figures.
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
use tokio::sync::watch;

use super::facts::ClusterFacts;
use super::policies;
use crate::audit::report::{self, Findings, Timestamp};
use crate::audit::{Audit, AuditResult, judge};
use crate::policy::crd::{AuditStatus, ClusterGuardPolicy, GuardPolicy};
use crate::policy::{Policy, PolicySet, Scope};
use crate::rules::StaticFacts;
use crate::server::{AppState, FactSource};

/// Objects per list page.
pub const PAGE_SIZE: u32 = 250;
/// Objects judged between two yields to the runtime.
pub const YIELD_EVERY: usize = 16;
/// Deadline of one API call.
const CALL_DEADLINE: Duration = Duration::from_secs(20);
/// How often the policies in force are compared with those last audited.
const POLICY_CHECK: Duration = Duration::from_secs(5);
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
    /// A call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
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
    if config.interval.is_zero() {
        tracing::info!("background audit off (--audit-interval 0)");
        return;
    }
    let mut auditor = Auditor::new(client, config);
    // The policies last audited; `None`: audit everything next.
    let mut audited: Option<PolicySet> = None;
    let mut next_full = tokio::time::Instant::now();
    // After a failed run: no new run before this (RETRY_MIN doubling to the interval), so a
    // lasting failure (RBAC, an apiserver in trouble) does not turn into a full audit every
    // few seconds.
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
        if !*leader.borrow()
            || !state.readiness.is_policies_loaded()
            || !facts.nodes_synced()
            || tokio::time::Instant::now() < retry_at
        {
            continue;
        }
        let policies = state.snapshot.load().policies.clone();
        let namespaces = facts.namespace_names();
        let labels = namespace_facts(&facts, &namespaces);
        let scopes: Option<BTreeSet<Option<String>>> = match &audited {
            _ if tokio::time::Instant::now() >= next_full => None,
            None => None,
            Some(before) if *before == policies => continue,
            Some(before) => Some(affected_scopes(before, &policies, &namespaces, &labels)),
        };
        let run =
            auditor.run(&state, &facts, &labels, &policies, &namespaces, scopes.as_ref(), &leader);
        let outcome = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            outcome = run => outcome,
        };
        match outcome {
            Ok(()) => {
                if scopes.is_none() {
                    next_full = tokio::time::Instant::now() + config.interval;
                }
                audited = Some(policies);
                retry_delay = RETRY_MIN;
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
    /// Which of a kind's alternatives answered last (Calico's two API groups), by kind.
    served: BTreeMap<String, Option<usize>>,
}

impl ScopeAuditor {
    /// A scope auditor calling the API with `client`.
    #[must_use]
    pub fn new(client: kube::Client) -> Self {
        Self { client, served: BTreeMap::new() }
    }

    /// Lists every object of one scope (`None`: the cluster scope) kind by kind, in pages of
    /// [`PAGE_SIZE`], and judges each with the policies that apply to it, facts gathered from
    /// `facts`; `objects` counts the objects listed. A scope no policy may reach is not listed.
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
        let mut findings = Findings::default();
        if !policies.policies().iter().any(|p| p.may_apply_in(namespace, labels)) {
            return Ok(findings);
        }
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
            for i in order {
                match self
                    .list_kind(&alternatives[i], namespace, facts, policies, &mut findings, objects)
                    .await
                {
                    Ok(()) => {
                        served = Some(i);
                        break;
                    }
                    Err(AuditRunError::Api { source: kube::Error::Api(status), .. })
                        if status.code == 404 => {}
                    Err(error) => return Err(error),
                }
            }
            self.served.entry(label).or_insert(served);
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
        let what =
            format!("listing {} in {}", kind.resource.plural, namespace.unwrap_or("the cluster"));
        let mut params = ListParams::default().limit(PAGE_SIZE);
        loop {
            let page = match tokio::time::timeout(CALL_DEADLINE, api.list(&params)).await {
                Ok(Ok(page)) => page,
                Ok(Err(source)) => return Err(AuditRunError::Api { what, source }),
                Err(_) => return Err(AuditRunError::Timeout { what }),
            };
            for object in page.items {
                *objects += 1;
                if (*objects).is_multiple_of(YIELD_EVERY) {
                    tokio::task::yield_now().await;
                }
                let mut value = match serde_json::to_value(&object) {
                    Ok(value) => value,
                    Err(error) => {
                        tracing::warn!(%error, "an object does not serialise; skipped");
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
                let prepared = match audit.prepare() {
                    Ok(prepared) => prepared,
                    Err(error) => {
                        tracing::warn!(%error, "an object does not decode; skipped");
                        continue;
                    }
                };
                let Some(view) = prepared.view.as_ref() else { continue };
                let gathered = facts.gather(view, policies).await;
                for finding in judge(view, policies, &gathered) {
                    findings.entries.push((audit.subject.clone(), finding));
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
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
            Ok(Err(source)) => return Err(AuditRunError::Api { what, source }),
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
/// from the same caches ([`ClusterFacts`], filled within `wait`). It writes nothing: no
/// reports, no status, no metrics.
///
/// # Errors
/// [`AuditRunError`] when the caches are not filled within `wait`, a namespace named does not
/// exist, or a list fails.
pub async fn audit_once(
    client: kube::Client,
    policies: &PolicySet,
    namespaces: Option<&[String]>,
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
    let mut auditor = ScopeAuditor::new(client);
    let mut run = OnceAudit::default();
    for scope in namespaces.into_iter().map(Some).chain([None]) {
        let findings = auditor
            .audit_scope(&facts, &labels, policies, scope.as_deref(), &mut run.listed)
            .await?;
        run.scopes.push((scope, findings));
    }
    Ok(run)
}

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
    /// Totals by policy and result from the last run of every scope.
    totals: BTreeMap<Option<String>, BTreeMap<String, [u64; 3]>>,
}

impl Auditor {
    fn new(client: kube::Client, config: AuditConfig) -> Self {
        Self {
            scopes: ScopeAuditor::new(client.clone()),
            client,
            config,
            reports_on: None,
            said_off: false,
            totals: BTreeMap::new(),
        }
    }

    /// One run over `scopes` (all namespaces and the cluster scope when `None`).
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
    ) -> Result<(), AuditRunError> {
        let started = tokio::time::Instant::now();
        self.probe_reports().await;
        let all: Vec<Option<String>> =
            namespaces.iter().map(|n| Some(n.clone())).chain([None]).collect();
        let todo: Vec<Option<String>> = match scopes {
            Some(scopes) => all.into_iter().filter(|s| scopes.contains(s)).collect(),
            None => all,
        };
        // Scopes that no longer exist (a deleted namespace) drop out of the totals.
        let live: BTreeSet<Option<String>> =
            namespaces.iter().map(|n| Some(n.clone())).chain([None]).collect();
        self.totals.retain(|scope, _| live.contains(scope));
        let mut objects = 0usize;
        let mut written = 0usize;
        for scope in &todo {
            if !*leader.borrow() {
                return Err(AuditRunError::NotLeading);
            }
            let findings = self
                .scopes
                .audit_scope(facts, labels, policies, scope.as_deref(), &mut objects)
                .await?;
            let mut totals: BTreeMap<String, [u64; 3]> = BTreeMap::new();
            for (_, finding) in &findings.entries {
                let slot = match finding.result {
                    AuditResult::Pass => 0,
                    AuditResult::Fail => 1,
                    AuditResult::Warn => 2,
                };
                totals.entry(finding.policy.clone()).or_default()[slot] += 1;
            }
            self.totals.insert(scope.clone(), totals);
            if self.write_report(scope.as_deref(), &findings).await? {
                written += 1;
            }
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let by_policy = self.by_policy();
        state.metrics.set_audit_results(
            policies.policies().iter().map(|p| {
                let counts = by_policy.get(&p.id()).copied().unwrap_or_default();
                (p.id(), counts)
            }),
            now.as_second(),
        );
        self.write_statuses(policies, &by_policy, &Time(now)).await;
        tracing::info!(
            scopes = todo.len(),
            objects,
            reports_written = written,
            reports = self.reports_on.unwrap_or(false),
            duration_ms = started.elapsed().as_millis(),
            "background audit done"
        );
        Ok(())
    }

    /// Totals by policy over every scope.
    fn by_policy(&self) -> BTreeMap<String, [u64; 3]> {
        let mut out: BTreeMap<String, [u64; 3]> = BTreeMap::new();
        for totals in self.totals.values() {
            for (policy, counts) in totals {
                let slot = out.entry(policy.clone()).or_default();
                for (sum, n) in slot.iter_mut().zip(counts) {
                    *sum += n;
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
                Ok(Err(source)) => return Err(AuditRunError::Api { what, source }),
                Err(_) => return Err(AuditRunError::Timeout { what }),
            };
        if findings.entries.is_empty() {
            if stored.is_some() {
                let params = DeleteParams::default();
                let call = api.delete(report::REPORT_NAME, &params);
                match tokio::time::timeout(CALL_DEADLINE, call).await {
                    Ok(Ok(_)) => return Ok(true),
                    Ok(Err(kube::Error::Api(status))) if status.code == 404 => return Ok(false),
                    Ok(Err(source)) => return Err(AuditRunError::Api { what, source }),
                    Err(_) => return Err(AuditRunError::Timeout { what }),
                }
            }
            return Ok(false);
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let now = Timestamp { seconds: now.as_second(), nanos: now.subsec_nanosecond() };
        let next =
            report::build(namespace, findings, self.config.max_results, stored.as_ref(), now);
        if stored.as_ref().is_some_and(|s| report::same_content(s, &next)) {
            return Ok(false);
        }
        let params = PatchParams::apply(REPORT_FIELD_MANAGER).force();
        let patch = Patch::Apply(&next);
        match tokio::time::timeout(CALL_DEADLINE, api.patch(report::REPORT_NAME, &params, &patch))
            .await
        {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(source)) => Err(AuditRunError::Api { what, source }),
            Err(_) => Err(AuditRunError::Timeout { what }),
        }
    }

    /// Writes every policy's `status.audit`; failures are logged (the next run writes again).
    async fn write_statuses(
        &self,
        policies: &PolicySet,
        by_policy: &BTreeMap<String, [u64; 3]>,
        now: &Time,
    ) {
        for policy in policies.policies() {
            let [pass, fail, warn] = by_policy.get(&policy.id()).copied().unwrap_or_default();
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
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, policy = %policy.id(), "failed to write the policy's audit status")
                }
                Err(_) => {
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
}
