//! The shipped RBAC against the API calls arcguard really makes: a cluster is driven through
//! every path that calls the API (policy status, a policy only arcguard's compiler rejects, a
//! gMSA pod's access review, a binding, the labeller, certificate provisioning, revocation and
//! caBundle re-injection, the Lease), then the apiserver's audit log of arcguard's
//! ServiceAccount (`e2e/src/controlplane.rs` enables it) is compared with the ClusterRole and
//! Role in `manifests/base/rbac.yaml`: every call was allowed, every call is granted there,
//! and every grant was used (`tests/manifests.rs` checks the same manifests against the calls
//! the module docs list; this checks them against the calls made).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use arcguard::policy::crd::{ClusterGuardPolicy, GuardPolicy};
use arcguard_e2e::cluster::repo_root;
use arcguard_e2e::controlplane::ARCGUARD_USER;
use arcguard_e2e::{
    Cluster, ClusterOptions, apply, denial, eventually, install_report_crds, namespace, pod,
};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Deserialize as _;
use serde_json::{Value, json};

/// arcguard's namespace, where its Role applies.
const NS: &str = "arcguard-system";
/// Long enough for watches, the labeller (every 2 s here) and the leader's reconcile loops.
const PROPAGATION: Duration = Duration::from_secs(60);

/// Grants the scenario cannot exercise, as `("ClusterRole: verb group/resource [names]",
/// "why")`. A grant here is reported, not failed; a grant missing here that no call used fails
/// the test, and so does an entry here whose grant was used after all.
const NOT_EXERCISED: &[(&str, &str)] = &[
    (
        "ClusterRole: list crd.projectcalico.org/networkpolicies",
        "the audit lists Calico's CRD group only where its API server (projectcalico.org/v3) is not served; the stand-in CRDs here serve v3",
    ),
    (
        "ClusterRole: list crd.projectcalico.org/globalnetworkpolicies",
        "as above, for GlobalNetworkPolicies",
    ),
    (
        "ClusterRole: create openreports.io/reports",
        "checked by the authorizer inside the server-side apply that creates a report, which the audit log records as the patch it is",
    ),
    ("ClusterRole: create openreports.io/clusterreports", "as above, for the ClusterReport"),
    (
        "ClusterRole: delete openreports.io/reports [arcguard]",
        "a report is deleted once its namespace has nothing left to report (e2e/tests/audit.rs deletes one)",
    ),
    (
        "ClusterRole: patch openreports.io/clusterreports [arcguard]",
        "the ClusterReport holds cluster-scoped findings (GlobalNetworkPolicies), none here",
    ),
    ("ClusterRole: delete openreports.io/clusterreports [arcguard]", "as above"),
];

/// One API call as the authorizer saw it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    verb: String,
    group: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    /// `None` for cluster-scoped and all-namespaces requests.
    namespace: Option<String>,
    /// The name the authorizer matched `resourceNames` against: none for a create of a
    /// resource (the name is in the body), the field-selected name of a list or watch.
    name: Option<String>,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() { "core" } else { &self.group };
        let scope = self.namespace.as_deref().map_or("cluster".to_owned(), |ns| format!("ns {ns}"));
        let name = self.name.as_deref().map(|n| format!(", name {n}")).unwrap_or_default();
        write!(f, "{} {group}/{} ({scope}{name})", self.verb, self.resource)
    }
}

/// One (verb, group, resource) a ClusterRole or the Role grants, with its `resourceNames`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    /// `ClusterRole`, or `Role` in `namespace`.
    kind: String,
    namespace: Option<String>,
    group: String,
    resource: String,
    verb: String,
    names: Vec<String>,
}

impl Grant {
    fn allows(&self, call: &Call) -> bool {
        self.group == call.group
            && self.resource == call.resource
            && self.verb == call.verb
            && (self.names.is_empty() || call.name.as_ref().is_some_and(|n| self.names.contains(n)))
            && (self.kind == "ClusterRole" || self.namespace == call.namespace)
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() { "core" } else { &self.group };
        write!(f, "{}: {} {group}/{}", self.kind, self.verb, self.resource)?;
        if !self.names.is_empty() {
            write!(f, " [{}]", self.names.join(", "))?;
        }
        Ok(())
    }
}

/// The rules of every ClusterRole and Role in `manifests/base/rbac*.yaml`, one per verb,
/// group and resource.
fn granted() -> Result<Vec<Grant>> {
    let mut grants = Vec::new();
    let dir = repo_root().join("manifests/base");
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if file.starts_with("rbac") && file.ends_with(".yaml") {
            grants.extend(rules(&std::fs::read_to_string(&path)?, &file)?);
        }
    }
    ensure!(grants.len() > 10, "too few grants found in {}: {grants:?}", dir.display());
    Ok(grants)
}

/// The rules of the ClusterRoles and Roles in one YAML stream, one per verb, group and resource.
fn rules(text: &str, file: &str) -> Result<Vec<Grant>> {
    let mut grants = Vec::new();
    {
        for document in serde_yaml::Deserializer::from_str(text) {
            let object = Value::deserialize(document).with_context(|| file.to_owned())?;
            let kind = object["kind"].as_str().unwrap_or_default();
            if kind != "ClusterRole" && kind != "Role" {
                continue;
            }
            let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
            ensure!(
                kind == "ClusterRole" || namespace.is_some(),
                "{file}: a Role without namespace"
            );
            let strings = |value: &Value| -> Vec<String> {
                value
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default()
            };
            for rule in object["rules"].as_array().into_iter().flatten() {
                ensure!(rule.get("nonResourceURLs").is_none(), "{file}: nonResourceURLs: {rule}");
                let names = strings(&rule["resourceNames"]);
                for group in strings(&rule["apiGroups"]) {
                    for resource in strings(&rule["resources"]) {
                        for verb in strings(&rule["verbs"]) {
                            grants.push(Grant {
                                kind: kind.to_owned(),
                                namespace: namespace.clone(),
                                group: group.clone(),
                                resource: resource.clone(),
                                verb,
                                names: names.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(grants)
}

/// arcguard's requests in the audit log: each call with how often it was made, and the
/// requests the authorizer did not allow.
fn recorded(log: &str) -> Result<(BTreeMap<Call, u32>, Vec<String>)> {
    let mut calls = BTreeMap::new();
    let mut refused = Vec::new();
    let mut seen = BTreeSet::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).context("an audit event")?;
        if event["user"]["username"].as_str() != Some(ARCGUARD_USER) {
            continue;
        }
        let uri = event["requestURI"].as_str().unwrap_or_default();
        let decision = event["annotations"]["authorization.k8s.io/decision"].as_str();
        if decision != Some("allow") {
            refused.push(format!(
                "{} {uri}: {decision:?} ({})",
                event["verb"], event["annotations"]["authorization.k8s.io/reason"]
            ));
        }
        // A request is logged at ResponseStarted (watches) and ResponseComplete: count it once.
        if !seen.insert(event["auditID"].as_str().unwrap_or_default().to_owned()) {
            continue;
        }
        let object = &event["objectRef"];
        let text = |value: &Value| value.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        let Some(resource) = text(&object["resource"]) else {
            // API discovery (`GET /apis/<group>/<version>`, the audit asking whether the
            // OpenReports CRDs are served) is granted to every authenticated user by the
            // built-in system:discovery role, not by arcguard's RBAC.
            ensure!(
                event["verb"] == "get" && uri.starts_with("/api"),
                "a non-resource request: {uri}"
            );
            continue;
        };
        let subresource = text(&object["subresource"]);
        let verb = event["verb"].as_str().unwrap_or_default().to_owned();
        let name =
            if verb == "create" && subresource.is_none() { None } else { text(&object["name"]) };
        let call = Call {
            verb,
            group: text(&object["apiGroup"]).unwrap_or_default(),
            resource: subresource.map_or(resource.clone(), |s| format!("{resource}/{s}")),
            namespace: text(&object["namespace"]),
            name,
        };
        *calls.entry(call).or_insert(0) += 1;
    }
    Ok((calls, refused))
}

#[tokio::test]
async fn the_shipped_rbac_grants_exactly_the_calls_arcguard_makes() {
    // The background audit is off by default; on here, so its calls are recorded.
    let options = ClusterOptions::with_args(&["--audit-interval=1h"]);
    let mut cluster = Cluster::start(options).await.expect("the cluster starts");
    let result = exercise(&cluster).await;
    // A graceful stop releases the Lease (one more call) and ends the watches.
    cluster.arcguard.stop().await;
    let result = result.and_then(|()| check_audit_log(&cluster));
    cluster.check(result);
}

/// Drives arcguard through every path that calls the API.
async fn exercise(cluster: &Cluster) -> Result<()> {
    let client = cluster.client().await?;
    // The OpenReports CRDs, so the audit writes its reports.
    install_report_crds(&client).await?;
    let ns = namespace(&client, "rbac", &[]).await?;
    // An object for the background audit to report on once the GuardPolicy below reaches
    // this namespace (a policy change re-audits the namespaces it may reach).
    let audited = pod("audited", "contoso.azurecr.io/team-a/app:1");
    Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &audited).await?;
    let (linux, windows) = (format!("lin-{ns}"), format!("win-{ns}"));
    for (node, os) in [(&linux, "linux"), (&windows, "windows")] {
        apply(
            &client,
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node,
                "labels": {"kubernetes.io/os": os, "beta.kubernetes.io/os": os}}}),
        )
        .await?;
    }

    // imageProvenance reads a pod's imagePullSecrets and its service account (get by name):
    // a registry nothing listens on, so the policy is in force once the pod is denied.
    apply(
        &client,
        &json!({"apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
            "metadata": {"name": format!("provenance-{ns}")},
            "spec": {"match": {"namespaces": [ns]},
                     "imageProvenance": {"registries": ["127.0.0.1:9/rbac"]}}}),
    )
    .await?;
    let private: Pod = serde_json::from_value(json!({"metadata": {"name": "private"}, "spec": {
        "imagePullSecrets": [{"name": "pull"}],
        "containers": [{"name": "app", "image": "127.0.0.1:9/rbac/app:1"}]}}))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    eventually(PROPAGATION, || async {
        let message = denial(&pods.create(&dry_run, &private).await);
        ensure!(message.contains("whose registry could not be read"), "private image: {message}");
        Ok(())
    })
    .await?;

    // Policy status, cluster-scoped (the samples) and namespaced.
    apply(
        &client,
        &json!({"apiVersion": "arcguard.io/v1alpha1", "kind": "GuardPolicy",
            "metadata": {"name": "team-a", "namespace": ns},
            "spec": {"trustedRegistries": {"registries": ["contoso.azurecr.io/team-a"]}}}),
    )
    .await?;
    let guard_policies: Api<GuardPolicy> = Api::namespaced(client.clone(), &ns);
    eventually(PROPAGATION, || async {
        let status = guard_policies.get("team-a").await?.status.unwrap_or_default();
        ensure!(
            status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
            "GuardPolicy status: {status:?}"
        );
        Ok(())
    })
    .await?;
    // The background audit (the new policy reaches this namespace) writes its Report, and the
    // policy's status.audit under its own field manager.
    let reports: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("openreports.io", "v1alpha1", "Report"),
            "reports",
        ),
    );
    eventually(PROPAGATION, || async {
        ensure!(reports.get_opt("arcguard").await?.is_some(), "no Report in {ns} yet");
        let status = guard_policies.get("team-a").await?.status.unwrap_or_default();
        ensure!(status.audit.is_some(), "no audit status yet: {status:?}");
        Ok(())
    })
    .await?;

    // A policy only arcguard's compiler rejects (a URL scheme in a registry) is stored while
    // its policies webhook is taken out, so arcguard reports InvalidSpec in its status; putting
    // the webhook back without a caBundle makes the leader inject it again.
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone());
    let without = json!({"webhooks": [{"name": "policies.arcguard.io", "$patch": "delete"}]});
    validating.patch("arcguard", &PatchParams::default(), &Patch::Strategic(&without)).await?;
    let rejected = json!({"apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
        "metadata": {"name": format!("e2e-{ns}-rejected")},
        "spec": {"match": {"namespaces": [ns]},
                 "trustedRegistries": {"registries": ["https://contoso.azurecr.io"]}}});
    eventually(PROPAGATION, || apply(&client, &rejected)).await?;
    let cluster_policies: Api<ClusterGuardPolicy> = Api::all(client.clone());
    eventually(PROPAGATION, || async {
        let status = cluster_policies.get(&format!("e2e-{ns}-rejected")).await?.status;
        let status = status.unwrap_or_default();
        ensure!(
            status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "False"),
            "rejected policy status: {status:?}"
        );
        Ok(())
    })
    .await?;
    for configuration in arcguard_e2e::webhook_configurations(&cluster.arcguard.url())? {
        apply(&client, &configuration).await?;
    }
    eventually(PROPAGATION, || async {
        let configuration = validating.get("arcguard").await?;
        let hooks = configuration.webhooks.unwrap_or_default();
        ensure!(
            hooks.len() == 2 && hooks.iter().all(|h| h.client_config.ca_bundle.is_some()),
            "the policies webhook has no caBundle yet"
        );
        Ok(())
    })
    .await?;

    // A gMSA pod: the `use` check is a LocalSubjectAccessReview (denied: no RoleBinding).
    apply(
        &client,
        &json!({"apiVersion": "windows.k8s.io/v1", "kind": "GMSACredentialSpec",
            "metadata": {"name": format!("webapp-{ns}")},
            "credspec": {"ActiveDirectoryConfig": {"GroupManagedServiceAccounts":
                [{"Name": "WebApp1", "Scope": "CONTOSO"}]}, "CmsPlugins": ["ActiveDirectory"],
                "DomainJoinConfig": {"DnsName": "contoso.com", "DnsTreeName": "contoso.com",
                    "Guid": "244818ae-87ac-4fcd-92ec-e79e5252348a", "MachineAccountName": "WebApp1",
                    "NetBiosName": "CONTOSO", "Sid": "S-1-5-21-2126449477-2524075714-3094792973"}}}),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let windows_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "gmsa"},
        "spec": {"os": {"name": "windows"}, "nodeSelector": {"kubernetes.io/os": "windows"},
            "securityContext": {"windowsOptions": {"gmsaCredentialSpecName": format!("webapp-{ns}")}},
            "containers": [{"name": "app", "image": "contoso.azurecr.io/team-a/win:1"}]}
    }))?;
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    eventually(PROPAGATION, || async {
        let message = denial(&pods.create(&dry_run, &windows_pod).await);
        ensure!(message.contains("may not use"), "gMSA pod: {message}");
        Ok(())
    })
    .await?;

    // A binding: arcguard reads the pod it names.
    pods.create(&PostParams::default(), &pod("web", "contoso.azurecr.io/team-a/web:1")).await?;
    let binding = json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "web", "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": linux}});
    pods.create_subresource::<Value, Value>("binding", "web", &PostParams::default(), &binding)
        .await?;

    // The labeller: a pod written where the webhooks do not look gets its node's OS label.
    let opted_out = namespace(&client, "rbac-before", &[("arcguard.io/ignore", "true")]).await?;
    let old_pods: Api<Pod> = Api::namespaced(client.clone(), &opted_out);
    let old: Pod = serde_json::from_value(json!({"metadata": {"name": "old"},
        "spec": {"nodeName": linux, "containers": [{"name": "app", "image": "example.com/app:1"}]}}))?;
    old_pods.create(&PostParams::default(), &old).await?;
    eventually(PROPAGATION, || async {
        let labels = old_pods.get("old").await?.metadata.labels.unwrap_or_default();
        ensure!(labels.get("arcguard.io/os").map(String::as_str) == Some("linux"), "{labels:?}");
        Ok(())
    })
    .await?;

    // Certificates: a revocation makes the leader replace the CA in the Secret (an update).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let revoke = json!({"metadata": {"annotations": {"arcguard.io/revoke": "rbac"}}});
    secrets.patch("arcguard-tls", &PatchParams::default(), &Patch::Merge(&revoke)).await?;
    eventually(PROPAGATION, || async {
        let secret = secrets.get("arcguard-tls").await?;
        let handled =
            secret.metadata.annotations.unwrap_or_default().remove("arcguard.io/revoke-handled");
        ensure!(handled.as_deref() == Some("rbac"), "revocation not handled yet: {handled:?}");
        Ok(())
    })
    .await?;
    Ok(())
}

fn check_audit_log(cluster: &Cluster) -> Result<()> {
    let path = cluster.control_plane.audit_log();
    let log = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let (calls, _) = recorded(&log)?;
    eprintln!("[e2e] rbac: {} distinct calls by {ARCGUARD_USER}:", calls.len());
    for (call, count) in &calls {
        eprintln!("[e2e] rbac:   {count:>5}  {call}");
    }
    let unused = judge(&log, &granted()?, NOT_EXERCISED)?;
    eprintln!("[e2e] rbac: grants never exercised: {unused:?}");
    Ok(())
}

/// Checks the calls in `log` against `grants`: (a) every request was allowed, (b) every call
/// is granted, (c) every grant was used unless `not_exercised` names it (and then it must be
/// unused). Returns the unused grants.
fn judge(log: &str, grants: &[Grant], not_exercised: &[(&str, &str)]) -> Result<Vec<String>> {
    let (calls, refused) = recorded(log)?;
    ensure!(!calls.is_empty(), "no request of {ARCGUARD_USER} in the audit log");
    // (a) The authorizer allowed every request.
    ensure!(refused.is_empty(), "requests of arcguard's ServiceAccount refused: {refused:#?}");
    // (b) The manifests grant every call: nothing works only thanks to another role.
    let ungranted: Vec<String> = calls
        .keys()
        .filter(|call| !grants.iter().any(|g| g.allows(call)))
        .map(ToString::to_string)
        .collect();
    ensure!(ungranted.is_empty(), "calls manifests/base/rbac*.yaml does not grant: {ungranted:#?}");
    // (c) Every grant was used, but for those the scenario cannot reach.
    let unused: Vec<String> = grants
        .iter()
        .filter(|g| !calls.keys().any(|call| g.allows(call)))
        .map(ToString::to_string)
        .collect();
    let allowed: BTreeMap<&str, &str> = not_exercised.iter().copied().collect();
    let unexpected: Vec<&String> =
        unused.iter().filter(|key| !allowed.contains_key(key.as_str())).collect();
    ensure!(unexpected.is_empty(), "grants no recorded call used: {unexpected:#?}");
    let stale: Vec<&str> =
        allowed.keys().copied().filter(|key| !unused.iter().any(|g| g == key)).collect();
    ensure!(stale.is_empty(), "allow-listed grants that were exercised after all: {stale:?}");
    Ok(unused)
}

/// The checker itself, on a synthetic log: it must catch what it is there to catch.
#[test]
fn the_audit_check_catches_refused_ungranted_and_unused() {
    let rbac = r#"
kind: ClusterRole
rules:
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get"]
---
kind: Role
metadata: {namespace: arcguard-system}
rules:
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    resourceNames: ["arcguard"]
    verbs: ["update"]
"#;
    let grants = rules(rbac, "test").expect("the rules parse");
    let event = |id: &str,
                 verb: &str,
                 group: &str,
                 resource: &str,
                 ns: &str,
                 name: &str,
                 decision: &str| {
        json!({"auditID": id, "stage": "ResponseComplete", "verb": verb, "requestURI": "/x",
            "user": {"username": ARCGUARD_USER},
            "objectRef": {"apiGroup": group, "resource": resource, "namespace": ns, "name": name},
            "annotations": {"authorization.k8s.io/decision": decision}})
        .to_string()
    };
    let get_pod = event("1", "get", "", "pods", "team", "web", "allow");
    let renew = event(
        "2",
        "update",
        "coordination.k8s.io",
        "leases",
        "arcguard-system",
        "arcguard",
        "allow",
    );
    let someone_else = get_pod.replace(ARCGUARD_USER, "admin").replace("\"get\"", "\"delete\"");
    let all = format!("{get_pod}\n{renew}\n{someone_else}\n");
    assert_eq!(judge(&all, &grants, &[]).expect("all granted and used"), Vec::<String>::new());

    let refused = format!("{all}{}\n", event("3", "get", "", "pods", "team", "db", "forbid"));
    let error = format!("{:#}", judge(&refused, &grants, &[]).expect_err("a refusal"));
    assert!(error.contains("refused"), "{error}");
    // Granted by some other role, not by these manifests: a Role's rule outside its namespace,
    // a name outside resourceNames, a verb not listed.
    for (verb, ns, name) in [
        ("update", "other", "arcguard"),
        ("update", "arcguard-system", "x"),
        ("get", "arcguard-system", "arcguard"),
    ] {
        let line = event("4", verb, "coordination.k8s.io", "leases", ns, name, "allow");
        let error =
            format!("{:#}", judge(&format!("{all}{line}\n"), &grants, &[]).expect_err("ungranted"));
        assert!(error.contains("does not grant"), "{verb} {ns} {name}: {error}");
    }
    let error = format!("{:#}", judge(&format!("{get_pod}\n"), &grants, &[]).expect_err("unused"));
    assert!(error.contains("Role: update coordination.k8s.io/leases [arcguard]"), "{error}");
    let reason = [("Role: update coordination.k8s.io/leases [arcguard]", "test")];
    assert_eq!(judge(&format!("{get_pod}\n"), &grants, &reason).expect("allow-listed").len(), 1);
    let error = format!("{:#}", judge(&all, &grants, &reason).expect_err("stale entry"));
    assert!(error.contains("exercised after all"), "{error}");
}
