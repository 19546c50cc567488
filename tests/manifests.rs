//! The installation manifests (`manifests/`) and the container image (`Dockerfile`): what they
//! must guarantee, checked on the files as written and, when `kubectl` is on PATH, on what
//! kustomize renders from them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use arcguard::admission::Kind;
use arcguard::cli::{Cli, parse_duration};
use clap::Parser as _;
use serde::Deserialize as _;
use serde_yaml::Value;

mod tools;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The namespace everything is installed into (base/kustomization.yaml).
const NAMESPACE: &str = "arcguard-system";
/// arcguard's own service account, as the apiserver names it in userInfo.username.
const SELF_USER: &str = "system:serviceaccount:arcguard-system:arcguard";

// ---------------------------------------------------------------------------------------------
// Loading

fn path(relative: &str) -> PathBuf {
    Path::new(ROOT).join(relative)
}

/// Every `.rs` file under `dir`, subdirectories included (a module split into a directory
/// keeps its docs in several files), sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").map(|e| e.expect("entry").path()) {
        if entry.is_dir() {
            files.extend(rust_files(&entry));
        } else if entry.extension().is_some_and(|e| e == "rs") {
            files.push(entry);
        }
    }
    files.sort();
    files
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// Every non-empty YAML document of a multi-document text.
fn documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The `resources` a kustomization lists.
fn kustomization_resources(dir: &str) -> Vec<String> {
    let file = format!("{dir}/kustomization.yaml");
    let docs = documents(&read(&file), &file);
    strings(&docs[0]["resources"])
}

/// The base's objects as written (without kustomize's labels and namespace).
fn base_documents() -> Vec<Value> {
    kustomization_resources("manifests/base")
        .iter()
        .flat_map(|r| {
            let file = format!("manifests/base/{r}");
            documents(&read(&file), &file)
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name:?}"))
}

fn of_kind<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    docs.iter().filter(move |d| d["kind"].as_str() == Some(kind))
}

/// Every webhook of both configurations, by name.
fn webhooks(docs: &[Value]) -> BTreeMap<String, (String, Value)> {
    let mut all = BTreeMap::new();
    for kind in ["ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"] {
        for config in of_kind(docs, kind) {
            for hook in config["webhooks"].as_sequence().into_iter().flatten() {
                let name = hook["name"].as_str().expect("webhook name").to_owned();
                let previous = all.insert(name.clone(), (kind.to_owned(), hook.clone()));
                assert!(previous.is_none(), "webhook {name} is defined twice");
            }
        }
    }
    all
}

fn webhook<'a>(hooks: &'a BTreeMap<String, (String, Value)>, name: &str) -> &'a Value {
    &hooks.get(name).unwrap_or_else(|| panic!("no webhook {name}")).1
}

fn deployment(docs: &[Value]) -> &Value {
    find(docs, "Deployment", "arcguard")
}

/// The flags of a command line: `--flag value` pairs, `--flag=value` and bare `--switch`es.
fn parse_flags(args: &[String]) -> BTreeMap<String, String> {
    let mut flags = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if let Some((flag, value)) = arg.split_once('=') {
            flags.insert(flag.to_owned(), value.to_owned());
        } else if arg.starts_with("--") {
            let value = args.get(i + 1).filter(|v| !v.starts_with("--"));
            flags.insert(arg.clone(), value.cloned().unwrap_or_default());
            i += usize::from(value.is_some());
        }
        i += 1;
    }
    flags
}

/// The flags of a container's args.
fn flags(container: &Value) -> BTreeMap<String, String> {
    parse_flags(&strings(&container["args"]))
}

// ---------------------------------------------------------------------------------------------
// Pod Security "restricted"

/// Every way the pod spec falls short of the "restricted" Pod Security Standard (plus a
/// read-only root filesystem, which arcguard asks of itself).
fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[field].as_bool() == Some(true) {
            problems.push(format!("{field} is true"));
        }
    }
    for volume in pod["volumes"].as_sequence().into_iter().flatten() {
        if !volume["hostPath"].is_null() {
            problems.push(format!("volume {:?} is a hostPath", volume["name"].as_str()));
        }
    }
    let pod_security = &pod["securityContext"];
    if pod_security["runAsUser"].as_u64() == Some(0) {
        problems.push("pod runAsUser is 0".into());
    }
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|list| pod[*list].as_sequence().into_iter().flatten());
    for container in containers {
        let name = container["name"].as_str().unwrap_or("?");
        let sc = &container["securityContext"];
        let non_root = sc["runAsNonRoot"]
            .as_bool()
            .or_else(|| pod_security["runAsNonRoot"].as_bool())
            .unwrap_or(false);
        if !non_root {
            problems.push(format!("container {name}: runAsNonRoot is not true"));
        }
        if sc["runAsUser"].as_u64() == Some(0) {
            problems.push(format!("container {name}: runAsUser is 0"));
        }
        if sc["allowPrivilegeEscalation"].as_bool() != Some(false) {
            problems.push(format!("container {name}: allowPrivilegeEscalation is not false"));
        }
        if sc["privileged"].as_bool() == Some(true) {
            problems.push(format!("container {name}: privileged"));
        }
        if !strings(&sc["capabilities"]["drop"]).iter().any(|c| c == "ALL") {
            problems.push(format!("container {name}: capabilities do not drop ALL"));
        }
        let added = strings(&sc["capabilities"]["add"]);
        if !added.is_empty() {
            problems.push(format!("container {name}: capabilities add {added:?}"));
        }
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or_else(|| pod_security["seccompProfile"]["type"].as_str());
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            problems.push(format!("container {name}: seccompProfile is {seccomp:?}"));
        }
        if sc["readOnlyRootFilesystem"].as_bool() != Some(true) {
            problems.push(format!("container {name}: readOnlyRootFilesystem is not true"));
        }
        for port in container["ports"].as_sequence().into_iter().flatten() {
            if !port["hostPort"].is_null() {
                problems.push(format!("container {name}: hostPort"));
            }
        }
    }
    problems
}

#[test]
fn the_arcguard_pod_meets_the_restricted_pod_security_standard() {
    let docs = base_documents();
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    assert_eq!(restricted_violations(pod), Vec::<String>::new());
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(65532));
    assert_eq!(pod["securityContext"]["runAsGroup"].as_u64(), Some(65532));

    let namespace = find(&docs, "Namespace", NAMESPACE);
    let labels = &namespace["metadata"]["labels"];
    assert_eq!(labels["pod-security.kubernetes.io/enforce"].as_str(), Some("restricted"));
}

#[test]
fn the_restricted_check_names_each_violation_it_finds() {
    let docs = base_documents();
    let good = deployment(&docs)["spec"]["template"]["spec"].clone();
    let edit = |yaml: &str| -> Value {
        let mut pod = good.clone();
        let patch: Value = serde_yaml::from_str(yaml).expect("patch");
        for (key, value) in patch.as_mapping().expect("mapping") {
            if key.as_str() == Some("container") {
                let c = &mut pod["containers"][0]["securityContext"];
                for (k, v) in value.as_mapping().expect("mapping") {
                    c[k.as_str().expect("key")] = v.clone();
                }
            } else {
                pod[key.as_str().expect("key")] = value.clone();
            }
        }
        pod
    };
    let cases = [
        ("hostNetwork: true", "hostNetwork is true"),
        ("hostPID: true", "hostPID is true"),
        ("volumes: [{name: h, hostPath: {path: /}}]", "hostPath"),
        ("container: {privileged: true}", "privileged"),
        ("container: {allowPrivilegeEscalation: true}", "allowPrivilegeEscalation"),
        ("container: {capabilities: {drop: [NET_RAW]}}", "do not drop ALL"),
        ("container: {capabilities: {drop: [ALL], add: [NET_ADMIN]}}", "capabilities add"),
        ("container: {runAsNonRoot: false}", "runAsNonRoot"),
        ("container: {readOnlyRootFilesystem: false}", "readOnlyRootFilesystem"),
        ("securityContext: {runAsNonRoot: true, runAsUser: 65532}", "seccompProfile is None"),
    ];
    for (patch, expected) in cases {
        let problems = restricted_violations(&edit(patch));
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{patch}: expected a problem containing {expected:?}, got {problems:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes API schema

/// Where `actual` differs from `expected`, as JSON pointers.
fn differences(expected: &serde_json::Value, actual: &serde_json::Value, at: &str) -> Vec<String> {
    use serde_json::Value as J;
    match (expected, actual) {
        (J::Object(a), J::Object(b)) => a
            .keys()
            .chain(b.keys().filter(|k| !a.contains_key(*k)))
            .flat_map(|k| {
                let null = J::Null;
                differences(
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    &format!("{at}/{k}"),
                )
            })
            .collect(),
        (J::Array(a), J::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .flat_map(|(i, (x, y))| differences(x, y, &format!("{at}/{i}")))
            .collect(),
        _ if expected == actual => Vec::new(),
        _ => vec![format!("{at}: {expected} became {actual}")],
    }
}

/// Decodes `doc` as the Kubernetes type `T` and encodes it again: a misspelt or misplaced
/// field is dropped on the way and shows up as a difference.
fn schema_differences<T>(doc: &Value) -> Vec<String>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let json = serde_json::to_value(doc).expect("YAML as JSON");
    match serde_json::from_value::<T>(json.clone()) {
        Ok(typed) => differences(&json, &serde_json::to_value(&typed).expect("encode"), ""),
        Err(e) => vec![format!("does not decode: {e}")],
    }
}

/// The schema problems of a built-in Kubernetes object; None for other kinds.
fn kubernetes_schema_problems(doc: &Value) -> Option<Vec<String>> {
    use k8s_openapi::api::admissionregistration::v1 as admission;
    use k8s_openapi::api::{apps, core, policy, rbac};
    Some(match doc["kind"].as_str()? {
        "Namespace" => schema_differences::<core::v1::Namespace>(doc),
        "ServiceAccount" => schema_differences::<core::v1::ServiceAccount>(doc),
        "Service" => schema_differences::<core::v1::Service>(doc),
        "ClusterRole" => schema_differences::<rbac::v1::ClusterRole>(doc),
        "ClusterRoleBinding" => schema_differences::<rbac::v1::ClusterRoleBinding>(doc),
        "Role" => schema_differences::<rbac::v1::Role>(doc),
        "RoleBinding" => schema_differences::<rbac::v1::RoleBinding>(doc),
        "Deployment" => schema_differences::<apps::v1::Deployment>(doc),
        "PodDisruptionBudget" => schema_differences::<policy::v1::PodDisruptionBudget>(doc),
        "ValidatingWebhookConfiguration" => {
            schema_differences::<admission::ValidatingWebhookConfiguration>(doc)
        }
        "MutatingWebhookConfiguration" => {
            schema_differences::<admission::MutatingWebhookConfiguration>(doc)
        }
        _ => return None,
    })
}

#[test]
fn every_kubernetes_object_uses_only_fields_the_kubernetes_api_knows() {
    let mut checked = 0;
    for doc in base_documents() {
        let kind = doc["kind"].as_str().expect("kind");
        // CRDs are generated from the Rust types and checked where they are generated.
        if kind == "CustomResourceDefinition" {
            continue;
        }
        let problems = kubernetes_schema_problems(&doc)
            .unwrap_or_else(|| panic!("{kind}: add it to this schema check"));
        assert_eq!(problems, Vec::<String>::new(), "{kind}");
        checked += 1;
    }
    assert_eq!(checked, 11);
}

// ---------------------------------------------------------------------------------------------
// Webhooks

/// `group/version/resource OPERATION` for every rule of a webhook.
fn coverage(hook: &Value) -> BTreeSet<String> {
    let mut covered = BTreeSet::new();
    for rule in hook["rules"].as_sequence().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for version in strings(&rule["apiVersions"]) {
                for resource in strings(&rule["resources"]) {
                    for operation in strings(&rule["operations"]) {
                        covered.insert(format!("{group}/{version}/{resource} {operation}"));
                    }
                }
            }
        }
    }
    covered
}

fn expand(entries: &[(&str, &str, &[&str], &[&str])]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (group, version, resources, operations) in entries {
        for resource in *resources {
            for operation in *operations {
                out.insert(format!("{group}/{version}/{resource} {operation}"));
            }
        }
    }
    out
}

const CU: &[&str] = &["CREATE", "UPDATE"];
const NETPOLS: &[&str] = &["networkpolicies", "globalnetworkpolicies"];

/// The resource each webhook resource name stands for, as arcguard recognises requests.
fn kind_of(group: &str, resource: &str) -> (&'static str, Option<&'static str>) {
    match resource {
        "pods" => ("Pod", None),
        "pods/ephemeralcontainers" => ("Pod", Some("ephemeralcontainers")),
        "pods/status" => ("Pod", Some("status")),
        "pods/binding" => ("Binding", Some("binding")),
        "bindings" => ("Binding", None),
        "deployments" => ("Deployment", None),
        "replicasets" => ("ReplicaSet", None),
        "statefulsets" => ("StatefulSet", None),
        "daemonsets" => ("DaemonSet", None),
        "jobs" => ("Job", None),
        "cronjobs" => ("CronJob", None),
        "replicationcontrollers" => ("ReplicationController", None),
        "podtemplates" => ("PodTemplate", None),
        "networkpolicies" => ("NetworkPolicy", None),
        "globalnetworkpolicies" => ("GlobalNetworkPolicy", None),
        other => panic!("{group}/{other}: not a resource arcguard inspects"),
    }
}

#[test]
fn the_webhooks_cover_every_inspected_resource_and_nothing_else() {
    let hooks = webhooks(&base_documents());
    let validate = expand(&[
        (
            "",
            "v1",
            &["pods", "pods/ephemeralcontainers", "replicationcontrollers", "podtemplates"],
            CU,
        ),
        // Label changes persist through pods/status; bindings place pods on nodes.
        ("", "v1", &["pods/status"], &["UPDATE"]),
        ("", "v1", &["pods/binding", "bindings"], &["CREATE"]),
        ("apps", "v1", &["deployments", "replicasets", "statefulsets", "daemonsets"], CU),
        ("batch", "v1", &["jobs", "cronjobs"], CU),
        ("networking.k8s.io", "v1", &["networkpolicies"], CU),
        ("projectcalico.org", "v3", NETPOLS, CU),
        ("crd.projectcalico.org", "v1", NETPOLS, CU),
    ]);
    let mutate = expand(&[
        // UPDATE: a scheduling-gated pod re-pinned to another OS is relabelled.
        ("", "v1", &["pods"], CU),
        ("", "v1", &["pods/ephemeralcontainers"], &["UPDATE"]),
        ("networking.k8s.io", "v1", &["networkpolicies"], CU),
        ("projectcalico.org", "v3", NETPOLS, CU),
        ("crd.projectcalico.org", "v1", NETPOLS, CU),
    ]);
    let policies =
        expand(&[("arcguard.io", "v1alpha1", &["clusterguardpolicies", "guardpolicies"], CU)]);
    assert_eq!(coverage(webhook(&hooks, "validate.arcguard.io")), validate);
    assert_eq!(coverage(webhook(&hooks, "mutate.arcguard.io")), mutate);
    assert_eq!(coverage(webhook(&hooks, "policies.arcguard.io")), policies);
    assert_eq!(hooks.len(), 3, "unexpected webhooks: {:?}", hooks.keys());

    // Every resource sent to the enforcement webhooks is one arcguard actually inspects.
    for hook in ["validate.arcguard.io", "mutate.arcguard.io"] {
        for rule in webhook(&hooks, hook)["rules"].as_sequence().into_iter().flatten() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    let (kind, sub) = kind_of(&group, &resource);
                    assert!(
                        Kind::recognise(&group, kind, sub).is_some(),
                        "{hook}: arcguard does not inspect {group}/{resource}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_webhook_fails_closed_once_arcguard_answers_quickly_speaks_v1_and_has_no_side_effects() {
    let docs = base_documents();
    // Installed failing open; the leader sets the annotated Fail once a replica can answer
    // (src/cluster/webhooks.rs), so applying the manifests never blocks anything by itself.
    for kind in ["ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"] {
        let config = find(&docs, kind, "arcguard");
        assert_eq!(
            config["metadata"]["annotations"]
                [arcguard::cluster::webhooks::FAILURE_POLICY_ANNOTATION]
                .as_str(),
            Some("Fail"),
            "{kind}"
        );
    }
    let hooks = webhooks(&docs);
    for (name, (kind, hook)) in &hooks {
        assert_eq!(strings(&hook["admissionReviewVersions"]), ["v1"], "{name}");
        assert_eq!(hook["sideEffects"].as_str(), Some("None"), "{name}");
        assert_eq!(hook["failurePolicy"].as_str(), Some("Ignore"), "{name}");
        assert_eq!(hook["matchPolicy"].as_str(), Some("Equivalent"), "{name}");
        let timeout = hook["timeoutSeconds"].as_u64().expect("timeoutSeconds set");
        assert!((1..=10).contains(&timeout), "{name}: timeoutSeconds {timeout}");

        let client = &hook["clientConfig"];
        assert!(client.get("caBundle").is_none(), "{name}: caBundle must be left to arcguard");
        assert!(client["url"].is_null(), "{name}: must call the Service");
        assert_eq!(client["service"]["name"].as_str(), Some("arcguard"), "{name}");
        assert_eq!(client["service"]["namespace"].as_str(), Some(NAMESPACE), "{name}");
        assert_eq!(client["service"]["port"].as_u64(), Some(443), "{name}");
        let expected_path =
            if kind == "MutatingWebhookConfiguration" { "/mutate" } else { "/validate" };
        assert_eq!(client["service"]["path"].as_str(), Some(expected_path), "{name}");
        if kind == "MutatingWebhookConfiguration" {
            assert_eq!(hook["reinvocationPolicy"].as_str(), Some("IfNeeded"), "{name}");
        }
    }
}

/// The namespace names a webhook's namespaceSelector excludes with `NotIn`.
fn excluded_namespaces(hook: &Value) -> BTreeSet<String> {
    hook["namespaceSelector"]["matchExpressions"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["key"].as_str() == Some("kubernetes.io/metadata.name")
                && e["operator"].as_str() == Some("NotIn")
        })
        .flat_map(|e| strings(&e["values"]))
        .collect()
}

#[test]
fn enforcement_webhooks_skip_system_namespaces_and_honour_the_opt_out_label() {
    let docs = base_documents();
    let hooks = webhooks(&docs);
    for name in ["validate.arcguard.io", "mutate.arcguard.io"] {
        let hook = webhook(&hooks, name);
        let excluded = excluded_namespaces(hook);
        for ns in ["kube-system", NAMESPACE] {
            assert!(excluded.contains(ns), "{name} does not exclude {ns}: {excluded:?}");
        }
        let opt_out =
            hook["namespaceSelector"]["matchExpressions"].as_sequence().into_iter().flatten().any(
                |e| {
                    e["key"].as_str() == Some("arcguard.io/ignore")
                        && e["operator"].as_str() == Some("NotIn")
                        && strings(&e["values"]) == ["true"]
                },
            );
        assert!(opt_out, "{name} does not honour arcguard.io/ignore=true");
        assert!(hook["objectSelector"].is_null(), "{name}: authors must not be able to opt out");
    }
    // The two enforcement webhooks exempt the same identities; beyond that, each skips only
    // requests it has nothing to do with: validation pods/status writes that change no label,
    // mutation pod UPDATEs of pods no longer gated.
    let validate = webhook(&hooks, "validate.arcguard.io");
    let mutate = webhook(&hooks, "mutate.arcguard.io");
    assert_eq!(validate["namespaceSelector"], mutate["namespaceSelector"]);
    let conditions = |hook: &Value, own: &str| -> Vec<Value> {
        hook["matchConditions"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|c| c["name"].as_str() != Some(own))
            .cloned()
            .collect()
    };
    assert_eq!(
        conditions(validate, "pod-status-only-when-labels-change"),
        conditions(mutate, "pod-update-only-while-gated")
    );
    let names = |hook: &Value| -> Vec<String> {
        hook["matchConditions"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(names(validate).contains(&"pod-status-only-when-labels-change".to_owned()));
    assert!(names(mutate).contains(&"pod-update-only-while-gated".to_owned()));

    let labels = &find(&docs, "Namespace", NAMESPACE)["metadata"]["labels"];
    assert_eq!(labels["arcguard.io/ignore"].as_str(), Some("true"));
}

#[test]
fn match_conditions_exempt_arcguard_itself_and_only_identities_of_excluded_namespaces() {
    let hooks = webhooks(&base_documents());
    for (name, (_, hook)) in &hooks {
        let conditions = hook["matchConditions"].as_sequence().cloned().unwrap_or_default();
        assert!(conditions.len() <= 64, "{name}: the apiserver allows 64 matchConditions");
        let names: BTreeSet<_> = conditions.iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names.len(), conditions.len(), "{name}: matchCondition names must be unique");
        let expressions: Vec<&str> =
            conditions.iter().map(|c| c["expression"].as_str().expect("expression")).collect();
        for expression in &expressions {
            // A cheap syntax check: CEL is compiled by the apiserver only.
            let opens = expression.matches('(').count();
            assert_eq!(opens, expression.matches(')').count(), "{name}: {expression}");
            assert_eq!(expression.matches('[').count(), expression.matches(']').count());
            assert_eq!(expression.matches('"').count() % 2, 0, "{name}: {expression}");
            // Optional request fields are tested with has() first: an evaluation error
            // would reject the request under failurePolicy Fail.
            for field in ["request.userInfo.username", "request.userInfo.groups"] {
                if expression.contains(field) {
                    assert!(
                        expression.contains(&format!("has({field})")),
                        "{name}: {field} used without has(): {expression}"
                    );
                }
            }
        }
        assert!(
            expressions.iter().any(|e| e.contains(SELF_USER)),
            "{name}: arcguard's own requests must never wait on arcguard"
        );
        if name != "policies.arcguard.io" {
            assert!(expressions.iter().any(|e| e.contains("\"system:nodes\"")), "{name}");
        }
        // Service-account groups exempted by identity are only those of namespaces the
        // namespaceSelector already excludes: the identity exemption opens nothing new.
        let excluded = excluded_namespaces(hook);
        for expression in &expressions {
            for part in expression.split("system:serviceaccounts:").skip(1) {
                let namespace: String =
                    part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                assert!(
                    excluded.contains(&namespace),
                    "{name}: exempts service accounts of {namespace}, which is not excluded"
                );
            }
            for part in expression.split("system:serviceaccount:").skip(1) {
                let namespace: String =
                    part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                assert!(
                    excluded.contains(&namespace) || name == "policies.arcguard.io",
                    "{name}: exempts a service account of {namespace}, which is not excluded"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RBAC

fn walk_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Sequence(items) => items.iter().for_each(|v| walk_strings(v, out)),
        Value::Mapping(map) => map.iter().for_each(|(k, v)| {
            walk_strings(k, out);
            walk_strings(v, out);
        }),
        Value::Tagged(tagged) => walk_strings(&tagged.value, out),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// One RBAC rule, order-insensitive, as a comparable line.
fn rule_key(
    kind: &str,
    groups: &[&str],
    resources: &[&str],
    names: &[&str],
    verbs: &[&str],
) -> String {
    let sorted = |items: &[&str]| {
        let mut items: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
        items.sort();
        items
    };
    format!(
        "{kind} groups={:?} resources={:?} names={:?} verbs={:?}",
        sorted(groups),
        sorted(resources),
        sorted(names),
        sorted(verbs)
    )
}

fn refs(items: &[String]) -> Vec<&str> {
    items.iter().map(String::as_str).collect()
}

fn rule_set(docs: &[Value]) -> BTreeSet<String> {
    let mut rules = BTreeSet::new();
    for kind in ["ClusterRole", "Role"] {
        for role in of_kind(docs, kind) {
            for rule in role["rules"].as_sequence().into_iter().flatten() {
                let field = |name: &str| strings(&rule[name]);
                let (groups, resources) = (field("apiGroups"), field("resources"));
                let (names, verbs) = (field("resourceNames"), field("verbs"));
                for group in &groups {
                    for resource in &resources {
                        for verb in &verbs {
                            rules.insert(rule_key(
                                kind,
                                &[group],
                                &[resource],
                                &refs(&names),
                                &[verb],
                            ));
                        }
                    }
                }
            }
        }
    }
    rules
}

/// The API calls the ServiceAccount makes, from the `- \`verb group/resource (scope)\``
/// lines in the module docs of src/cluster/**/*.rs: (role kind, group, resource, resource
/// names, verb). Calls under a heading about `certs revoke` are made by the user, not arcguard.
fn documented_api_calls() -> BTreeSet<(&'static str, String, String, Vec<&'static str>, String)> {
    let mut calls = BTreeSet::new();
    for file in rust_files(&path("src/cluster")) {
        let text = std::fs::read_to_string(&file).expect("source");
        let mut by_user = false;
        for line in text.lines().filter_map(|l| l.strip_prefix("//!")).map(str::trim) {
            let Some(item) = line.strip_prefix("- `") else {
                if !line.is_empty() {
                    by_user = line.contains("certs revoke");
                }
                continue;
            };
            let Some((call, _)) = item.split_once('`') else { continue };
            let Some((verb, rest)) = call.split_once(' ') else { continue };
            let Some((target, scope)) = rest.split_once(" (") else { continue };
            let Some((group, resource)) = target.split_once('/') else { continue };
            if by_user {
                continue;
            }
            let group = if group == "core" { String::new() } else { group.to_owned() };
            let resource_name = |name| {
                if scope.contains("by name") || scope.contains("metadata.name") {
                    vec![name]
                } else {
                    vec![]
                }
            };
            let (kind, names) = match resource {
                "secrets" if scope.contains("imagePullSecrets") => ("ClusterRole", vec![]),
                "secrets" => ("Role", resource_name("arcguard-tls")),
                "leases" => ("Role", resource_name("arcguard")),
                "endpointslices" => ("Role", vec![]),
                "reports" | "clusterreports" => ("ClusterRole", resource_name("arcguard")),
                "validatingwebhookconfigurations" | "mutatingwebhookconfigurations" => {
                    ("ClusterRole", resource_name("arcguard"))
                }
                _ => ("ClusterRole", vec![]),
            };
            calls.insert((kind, group, resource.to_owned(), names, verb.to_owned()));
        }
    }
    assert!(calls.len() > 10, "found too few documented API calls: {calls:?}");
    calls
}

#[test]
fn rbac_grants_exactly_what_the_code_uses_and_no_wildcards() {
    let docs = base_documents();
    for kind in ["ClusterRole", "Role"] {
        for role in of_kind(&docs, kind) {
            let mut all = Vec::new();
            walk_strings(&role["rules"], &mut all);
            assert!(!all.iter().any(|s| s.contains('*')), "{kind} has a wildcard: {all:?}");
        }
    }
    // Every call the cluster code documents, expanded to one rule line per verb, must be
    // exactly what the roles grant (expanded the same way).
    let expected: BTreeSet<String> = documented_api_calls()
        .into_iter()
        .map(|(kind, group, resource, names, verb)| {
            rule_key(kind, &[group.as_str()], &[resource.as_str()], &names, &[verb.as_str()])
        })
        .collect();
    assert_eq!(
        rule_set(&docs),
        expected,
        "manifests/base/rbac.yaml and the API calls in src/cluster/**/*.rs differ"
    );

    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let binding = find(&docs, kind, "arcguard");
        let role_kind = kind.trim_end_matches("Binding");
        assert_eq!(binding["roleRef"]["kind"].as_str(), Some(role_kind));
        assert_eq!(binding["roleRef"]["name"].as_str(), Some("arcguard"));
        let subjects = binding["subjects"].as_sequence().expect("subjects");
        assert_eq!(subjects.len(), 1, "{kind}");
        assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"));
        assert_eq!(subjects[0]["name"].as_str(), Some("arcguard"));
        assert_eq!(subjects[0]["namespace"].as_str(), Some(NAMESPACE));
    }
    assert_eq!(
        SELF_USER,
        format!(
            "system:serviceaccount:{NAMESPACE}:{}",
            find(&docs, "ServiceAccount", "arcguard")["metadata"]["name"].as_str().expect("name")
        )
    );
}

#[test]
fn every_rbac_rule_says_which_code_path_uses_it() {
    let text = read("manifests/base/rbac.yaml");
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            rules += 1;
            let previous = lines[..i].iter().rev().find(|l| !l.trim().is_empty());
            assert!(
                previous.is_some_and(|l| l.trim_start().starts_with('#')),
                "rbac.yaml line {}: rule without a comment",
                i + 1
            );
        }
    }
    assert_eq!(rules, 22);
}

// ---------------------------------------------------------------------------------------------
// Deployment, Service, PodDisruptionBudget

fn port_of(address: &str) -> u64 {
    address.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("host:port")
}

#[test]
fn the_deployment_agrees_with_the_service_secret_webhooks_and_rbac_it_names() {
    let docs = base_documents();
    let deploy = deployment(&docs);
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let flags = flags(container);
    let flag = |name: &str| flags.get(name).map(String::as_str);

    assert!(flags.contains_key("--cluster"), "{flags:?}");
    assert_eq!(strings(&container["args"]).first().map(String::as_str), Some("serve"));
    assert_eq!(flag("--namespace"), Some("$(POD_NAMESPACE)"));
    assert_eq!(flag("--pod-name"), Some("$(POD_NAME)"));
    let env: BTreeMap<_, _> = container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()))
        .collect();
    assert_eq!(env.get(&Some("POD_NAMESPACE")), Some(&Some("metadata.namespace")));
    assert_eq!(env.get(&Some("POD_NAME")), Some(&Some("metadata.name")));

    // The names arcguard is told to manage are the ones the other manifests define.
    let service = find(&docs, "Service", flag("--service-name").expect("--service-name"));
    let webhook_config = flag("--webhook-config-name").expect("--webhook-config-name");
    find(&docs, "ValidatingWebhookConfiguration", webhook_config);
    find(&docs, "MutatingWebhookConfiguration", webhook_config);
    let secret = flag("--cert-secret").expect("--cert-secret");
    let rules = rule_set(&docs);
    assert!(rules.iter().any(|r| r.starts_with("Role ")
        && r.contains(r#"resources=["secrets"]"#)
        && r.contains(&format!(r#"names=["{secret}"]"#))));
    assert!(rules.iter().any(|r| r.starts_with("ClusterRole ")
        && r.contains("webhookconfigurations")
        && r.contains(&format!(r#"names=["{webhook_config}"]"#))));
    for (_, (_, hook)) in webhooks(&docs) {
        assert_eq!(
            hook["clientConfig"]["service"]["name"].as_str(),
            service["metadata"]["name"].as_str()
        );
    }

    // Ports: the Service reaches the container ports the flags open; probes use metrics.
    let container_ports: BTreeMap<_, _> = container["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| (p["name"].as_str().expect("port name"), p["containerPort"].as_u64()))
        .collect();
    let webhook_port = port_of(flag("--addr").expect("--addr"));
    let metrics_port = port_of(flag("--metrics-addr").expect("--metrics-addr"));
    assert_eq!(container_ports.get("https-webhook"), Some(&Some(webhook_port)));
    assert_eq!(container_ports.get("http-metrics"), Some(&Some(metrics_port)));
    let service_ports: BTreeMap<_, _> = service["spec"]["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| (p["name"].as_str().expect("name"), (p["port"].as_u64(), p["targetPort"].clone())))
        .collect();
    assert_eq!(
        service_ports.get("https-webhook"),
        Some(&(Some(443), Value::from("https-webhook")))
    );
    assert_eq!(
        service_ports.get("http-metrics"),
        Some(&(Some(metrics_port), Value::from("http-metrics")))
    );
    for (probe, path) in
        [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
    {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(get["port"].as_str(), Some("http-metrics"), "{probe}");
    }

    // Shutdown: the kubelet waits longer than arcguard's delay plus grace.
    let delay = parse_duration(flag("--shutdown-delay").expect("--shutdown-delay")).expect("d");
    let grace = parse_duration(flag("--shutdown-grace").unwrap_or("20s")).expect("duration");
    let termination = pod["terminationGracePeriodSeconds"].as_u64().expect("grace period");
    assert!(
        termination > (delay + grace).as_secs(),
        "terminationGracePeriodSeconds {termination} <= {delay:?} + {grace:?}"
    );

    // Resources: requests and a memory limit, never a CPU limit (throttling is latency).
    let resources = &container["resources"];
    assert_eq!(resources["requests"]["cpu"].as_str(), Some("50m"));
    assert_eq!(resources["requests"]["memory"].as_str(), Some("32Mi"));
    assert_eq!(resources["limits"]["memory"].as_str(), Some("128Mi"));
    assert!(resources["limits"]["cpu"].is_null(), "no CPU limit");

    // Availability: two replicas spread over nodes, one always left by drains.
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(2));
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"].as_str(), Some("linux"));
    assert_eq!(pod["serviceAccountName"].as_str(), Some("arcguard"));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(true));
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let selects_pods = |labels: &Value| {
        let labels = labels.as_mapping().expect("a label map");
        !labels.is_empty() && labels.iter().all(|(k, v)| &pod_labels[k.as_str().expect("k")] == v)
    };
    assert!(selects_pods(&deploy["spec"]["selector"]["matchLabels"]));
    assert!(selects_pods(&service["spec"]["selector"]));
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"].as_str(), Some("kubernetes.io/hostname"));
    assert_eq!(spread["whenUnsatisfiable"].as_str(), Some("ScheduleAnyway"));
    assert!(selects_pods(&spread["labelSelector"]["matchLabels"]));
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert!(selects_pods(&anti["podAffinityTerm"]["labelSelector"]["matchLabels"]));
    let pdb = find(&docs, "PodDisruptionBudget", "arcguard");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
    assert!(selects_pods(&pdb["spec"]["selector"]["matchLabels"]));
}

#[test]
fn the_deployment_args_parse_with_the_binarys_command_line() {
    let docs = base_documents();
    let args = strings(&deployment(&docs)["spec"]["template"]["spec"]["containers"][0]["args"]);
    let parsed = Cli::try_parse_from(std::iter::once("arcguard".to_owned()).chain(args));
    assert!(parsed.is_ok(), "{}", parsed.err().map(|e| e.to_string()).unwrap_or_default());
}

#[test]
fn the_image_is_the_one_kustomize_lets_users_override() {
    let docs = base_documents();
    let image = deployment(&docs)["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("image");
    let kustomization = documents(&read("manifests/base/kustomization.yaml"), "base");
    let names: Vec<_> = kustomization[0]["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str())
        .collect();
    let repository = image.split(':').next().expect("repository");
    assert!(names.contains(&repository), "images: {names:?} does not name {repository}");
    assert_eq!(kustomization[0]["namespace"].as_str(), Some(NAMESPACE));
}

// ---------------------------------------------------------------------------------------------
// CRDs, components

#[test]
fn crds_are_generated_into_the_base_where_kustomize_reads_them() {
    assert!(kustomization_resources("manifests/base").contains(&"crds.yaml".to_owned()));
    // A stray `arcguard crds > manifests/crds.yaml` would be silently left out of the install.
    assert!(!path("manifests/crds.yaml").exists(), "CRDs belong in manifests/base/crds.yaml");
    assert_eq!(kustomization_resources("manifests"), ["base"]);
}

#[test]
fn the_policies_component_holds_exact_copies_of_every_sample_policy() {
    let component = "manifests/components/policies";
    let listed: BTreeSet<String> = kustomization_resources(component).into_iter().collect();
    let mut expected = BTreeSet::new();
    let entries = std::fs::read_dir(path("policies")).expect("policies/");
    for entry in entries {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") || name.starts_with("kustomization") {
            continue;
        }
        let original = std::fs::read_to_string(entry.path()).expect("read policy");
        let kinds: Vec<String> = documents(&original, &name)
            .iter()
            .filter_map(|d| d["kind"].as_str().map(str::to_owned))
            .collect();
        if kinds.iter().all(|k| k == "GMSACredentialSpec") {
            assert!(!listed.contains(&name), "{name}: credential specs stay out of the component");
            continue;
        }
        let copy = read(&format!("{component}/{name}"));
        assert_eq!(
            copy, original,
            "{component}/{name} differs from policies/{name}: copy it again"
        );
        expected.insert(name);
    }
    assert_eq!(listed, expected);
}

// ---------------------------------------------------------------------------------------------
// OpenReports CRDs (components/reports)

/// The Go module the OpenReports CRDs come from, and the version and module hash (go.sum's `h1:`
/// line) the component pins. `manifests/components/reports/update.sh` rewrites the two `const`
/// lines below with the kustomization's go.sum line; keep each on one line.
const OPENREPORTS_MODULE: &str = "github.com/openreports/reports-api";
const OPENREPORTS_VERSION: &str = "v0.2.1";
const OPENREPORTS_SUM: &str = "h1:g9KS3yle9Y1elmww4TK9EkD1rl6inIaiIJPX6e+u680=";
/// The component, and the module's files it holds (under `config/crd/` in the module).
const REPORTS_COMPONENT: &str = "manifests/components/reports";
const OPENREPORTS_FILES: [&str; 2] =
    ["openreports.io_reports.yaml", "openreports.io_clusterreports.yaml"];

#[test]
fn the_reports_component_holds_the_openreports_crds_arcguard_writes_and_records_their_pin() {
    // Exactly the two CRDs, listed by their upstream names, plus the kustomization and update.sh.
    assert_eq!(kustomization_resources(REPORTS_COMPONENT), OPENREPORTS_FILES);
    let mut present: Vec<String> = std::fs::read_dir(path(REPORTS_COMPONENT))
        .expect("component")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    let mut expected: Vec<String> = OPENREPORTS_FILES.iter().map(|f| (*f).to_owned()).collect();
    expected.extend(["kustomization.yaml".to_owned(), "update.sh".to_owned()]);
    expected.sort();
    assert_eq!(present, expected);

    // The pin the comments record is the one the download test checks (update.sh moves both).
    let kustomization = read(&format!("{REPORTS_COMPONENT}/kustomization.yaml"));
    let pins: Vec<&str> = kustomization
        .lines()
        .filter(|l| l.starts_with(&format!("# {OPENREPORTS_MODULE} ")))
        .collect();
    assert_eq!(pins, [format!("# {OPENREPORTS_MODULE} {OPENREPORTS_VERSION} {OPENREPORTS_SUM}")]);
    let docs = documents(&kustomization, "reports kustomization");
    assert_eq!(docs[0]["kind"].as_str(), Some("Component"));

    // They define the kinds arcguard writes (src/audit/report.rs), at the scope it writes them,
    // and serve and store the version it writes.
    let (group, version) = arcguard::audit::report::API_VERSION.split_once('/').expect("group/v");
    let crds: Vec<Value> = OPENREPORTS_FILES
        .iter()
        .flat_map(|f| documents(&read(&format!("{REPORTS_COMPONENT}/{f}")), f))
        .collect();
    let defined: Vec<(&str, &str, &str)> = crds
        .iter()
        .map(|crd| {
            assert_eq!(crd["kind"].as_str(), Some("CustomResourceDefinition"));
            assert_eq!(crd["spec"]["group"].as_str(), Some(group));
            let versions = crd["spec"]["versions"].as_sequence().expect("versions");
            let ours = versions
                .iter()
                .find(|v| v["name"].as_str() == Some(version))
                .unwrap_or_else(|| panic!("{:?} does not define {version}", crd["metadata"]));
            assert_eq!(ours["served"].as_bool(), Some(true), "{version} not served");
            assert_eq!(ours["storage"].as_bool(), Some(true), "{version} not stored");
            (
                crd["metadata"]["name"].as_str().expect("name"),
                crd["spec"]["names"]["kind"].as_str().expect("kind"),
                crd["spec"]["scope"].as_str().expect("scope"),
            )
        })
        .collect();
    assert_eq!(
        defined,
        [
            ("reports.openreports.io", "Report", "Namespaced"),
            ("clusterreports.openreports.io", "ClusterReport", "Cluster"),
        ]
    );
}

/// Runs `go mod download -json` of the pinned module in an empty folder (outside any module or
/// workspace): the Go module proxy (`GOPROXY`, proxy.golang.org by default) serves it, and `go`
/// checks it against the checksum database, unless the module cache already holds it. None when
/// `go` is not installed.
fn download_openreports() -> Option<serde_json::Value> {
    if Command::new("go").arg("version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "go is missing in CI: it is needed to check {REPORTS_COMPONENT} against \
             {OPENREPORTS_MODULE}@{OPENREPORTS_VERSION}"
        );
        eprintln!(
            "note: no go on PATH; skipping the check of {REPORTS_COMPONENT} against \
             {OPENREPORTS_MODULE}@{OPENREPORTS_VERSION} (it needs go and the Go module proxy)"
        );
        return None;
    }
    let scratch = tempfile::tempdir().expect("temp dir");
    let output = Command::new("go")
        .args(["mod", "download", "-json", &format!("{OPENREPORTS_MODULE}@{OPENREPORTS_VERSION}")])
        .current_dir(scratch.path())
        .env("GOFLAGS", "-mod=mod")
        .env("GOWORK", "off")
        .output()
        .expect("run go");
    // On failure `go mod download -json` prints the error in the JSON's "Error" too.
    assert!(
        output.status.success(),
        "go mod download {OPENREPORTS_MODULE}@{OPENREPORTS_VERSION} failed (it needs the Go \
         module proxy, GOPROXY, or the module in the Go module cache):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(serde_json::from_slice(&output.stdout).expect("go mod download -json prints JSON"))
}

#[test]
fn the_reports_crds_are_the_pinned_modules_files_byte_for_byte() {
    let Some(module) = download_openreports() else { return };
    assert_eq!(module["Version"].as_str(), Some(OPENREPORTS_VERSION), "{module}");
    assert_eq!(
        module["Sum"].as_str(),
        Some(OPENREPORTS_SUM),
        "{OPENREPORTS_MODULE}@{OPENREPORTS_VERSION} is not the module pinned: {module}"
    );
    let dir = PathBuf::from(module["Dir"].as_str().expect("Dir"));
    for file in OPENREPORTS_FILES {
        let upstream = dir.join("config/crd").join(file);
        let upstream =
            std::fs::read(&upstream).unwrap_or_else(|e| panic!("{}: {e}", upstream.display()));
        let committed = std::fs::read(path(&format!("{REPORTS_COMPONENT}/{file}"))).expect("copy");
        assert!(
            committed == upstream,
            "{REPORTS_COMPONENT}/{file} differs from config/crd/{file} of \
             {OPENREPORTS_MODULE}@{OPENREPORTS_VERSION}: run \
             `bash {REPORTS_COMPONENT}/update.sh {OPENREPORTS_VERSION}`"
        );
    }
}

/// Every `arcguard_...` metric name in `text`, without the suffixes Prometheus adds.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("arcguard_") {
        if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String =
            text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        names.insert(base.to_owned());
    }
    names
}

fn rust_sources(dir: &Path, out: &mut String) {
    for file in rust_files(dir) {
        out.push_str(&std::fs::read_to_string(&file).expect("read source"));
    }
}

#[test]
fn the_alerts_use_metrics_arcguard_exports_and_scrape_the_metrics_port() {
    let dir = "manifests/components/monitoring";
    let rule_text = read(&format!("{dir}/prometheusrule.yaml"));
    let mut sources = String::new();
    rust_sources(&path("src"), &mut sources);
    let names = metric_names(&rule_text);
    assert!(names.len() >= 4, "{names:?}");
    for name in names {
        let registered = format!("\"{}\"", name.trim_start_matches("arcguard_"));
        assert!(sources.contains(&registered), "{name} is not a metric arcguard registers");
    }

    let rules = documents(&rule_text, "prometheusrule.yaml");
    let alerts: BTreeSet<_> = rules[0]["spec"]["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .inspect(|r| {
            assert!(r["expr"].as_str().is_some_and(|e| !e.trim().is_empty()));
            assert!(r["labels"]["severity"].as_str().is_some(), "{r:?}");
            assert!(r["annotations"]["summary"].as_str().is_some(), "{r:?}");
        })
        .filter_map(|r| r["alert"].as_str())
        .collect();
    let expected: BTreeSet<_> = [
        "ArcguardCertificateExpiringSoon",
        "ArcguardWebhookErrors",
        "ArcguardHighLatency",
        "ArcguardPolicyReloadFailing",
        "ArcguardDown",
        "ArcguardNoLeader",
        "ArcguardMemoryBudgetExhausted",
        "ArcguardWebhooksFailOpen",
        "ArcguardAuditViolations",
        "ArcguardAuditStale",
        "ArcguardRegistryUnreachable",
    ]
    .into_iter()
    .collect();
    assert_eq!(alerts, expected);

    let monitor = documents(&read(&format!("{dir}/servicemonitor.yaml")), "servicemonitor.yaml");
    let port = monitor[0]["spec"]["endpoints"][0]["port"].as_str().expect("port");
    let base = base_documents();
    let service = find(&base, "Service", "arcguard");
    let service_ports: Vec<_> = service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(service_ports.contains(&port), "ServiceMonitor port {port} not in {service_ports:?}");
    assert_eq!(
        monitor[0]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
        Some("arcguard")
    );
}

// ---------------------------------------------------------------------------------------------
// Rendering with kubectl (kustomize)

fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to[common..] {
        out.push(part.as_os_str());
    }
    out
}

/// `kubectl kustomize dir` with the pinned kubectl (`tests/tools`): None when there is none.
fn kustomize(dir: &Path) -> Option<Vec<Value>> {
    let kubectl = tools::tool("kubectl")?;
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", kubectl.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl kustomize {}: {stderr}", dir.display());
    assert!(
        !stderr.to_lowercase().contains("warning") && !stderr.to_lowercase().contains("deprecat"),
        "kubectl kustomize {} is not clean: {stderr}",
        dir.display()
    );
    let text = String::from_utf8(output.stdout).expect("utf-8");
    Some(documents(&text, &dir.display().to_string()))
}

#[test]
fn kustomize_renders_the_install_every_overlay_and_every_component_cleanly() {
    let Some(install) = kustomize(&path("manifests")) else {
        eprintln!("note: no kubectl; skipping the kustomize rendering checks");
        return;
    };
    // What kustomize adds keeps every guarantee the files make.
    let pod = &deployment(&install)["spec"]["template"]["spec"];
    assert_eq!(restricted_violations(pod), Vec::<String>::new());
    for doc in &install {
        let kind = doc["kind"].as_str().expect("kind");
        let cluster_scoped = matches!(
            kind,
            "Namespace"
                | "CustomResourceDefinition"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "ValidatingWebhookConfiguration"
                | "MutatingWebhookConfiguration"
        );
        let namespace = doc["metadata"]["namespace"].as_str();
        assert_eq!(namespace, (!cluster_scoped).then_some(NAMESPACE), "{kind}");
        assert_eq!(
            doc["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str(),
            Some("arcguard"),
            "{kind}"
        );
    }
    assert_eq!(rule_set(&install), rule_set(&base_documents()));
    for doc in &install {
        let problems = kubernetes_schema_problems(doc).unwrap_or_default();
        assert_eq!(problems, Vec::<String>::new(), "{:?}", doc["kind"]);
    }
    assert_eq!(webhooks(&install).len(), 3);

    // The cert-manager overlay: cert-manager owns the Secret and the bundle.
    let overlay = kustomize(&path("manifests/overlays/cert-manager")).expect("kubectl");
    let container = &deployment(&overlay)["spec"]["template"]["spec"]["containers"][0];
    let args = flags(container);
    assert!(args.contains_key("--external-certs"), "{args:?}");
    assert_eq!(args.get("--inject-ca-bundle").map(String::as_str), Some("false"));
    for kind in ["ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"] {
        let config = find(&overlay, kind, "arcguard");
        assert_eq!(
            config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str(),
            Some("arcguard-system/arcguard-serving"),
            "{kind}"
        );
    }
    let serving = find(&overlay, "Certificate", "arcguard-serving");
    assert_eq!(
        serving["spec"]["secretName"].as_str(),
        args.get("--cert-secret").map(String::as_str)
    );
    let overlay_rules = rule_set(&overlay);
    assert!(
        !overlay_rules.iter().any(|r| r.contains(r#"resources=["secrets"]"#)
            && (r.contains("\"create\"") || r.contains("\"update\"") || r.contains("\"patch\""))),
        "with external certificates arcguard must not write the Secret: {overlay_rules:?}"
    );
    // ...but still sets its webhooks' failurePolicy once a replica can answer.
    for resource in ["validatingwebhookconfigurations", "mutatingwebhookconfigurations"] {
        let patch = rule_key(
            "ClusterRole",
            &["admissionregistration.k8s.io"],
            &[resource],
            &["arcguard"],
            &["patch"],
        );
        assert!(overlay_rules.contains(&patch), "{patch} missing: {overlay_rules:?}");
    }
    assert_eq!(webhooks(&overlay), webhooks(&install));
    for doc in &overlay {
        let problems = kubernetes_schema_problems(doc).unwrap_or_default();
        assert_eq!(problems, Vec::<String>::new(), "{:?}", doc["kind"]);
    }

    // Components are used from a kustomization of the user's; build one next to the target dir.
    let scratch = tempfile::Builder::new()
        .prefix("manifests-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let root = std::fs::canonicalize(ROOT).expect("root");
    let here = std::fs::canonicalize(scratch.path()).expect("scratch");
    let to = |p: &str| relative(&here, &root.join(p)).display().to_string();
    let cases: [(&str, &[&str]); 5] = [
        ("monitoring", &["manifests/components/monitoring"]),
        ("policies", &["manifests/components/policies"]),
        ("networkpolicy", &["manifests/components/networkpolicy"]),
        ("reports", &["manifests/components/reports"]),
        (
            "all",
            &[
                "manifests/components/monitoring",
                "manifests/components/policies",
                "manifests/components/networkpolicy",
                "manifests/components/reports",
            ],
        ),
    ];
    for (case, components) in cases {
        let dir = here.join(case);
        std::fs::create_dir(&dir).expect("mkdir");
        let from = |p: &str| format!("../{}", to(p));
        let yaml = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources:\n  - {}\ncomponents:\n{}",
            from("manifests"),
            components.iter().map(|c| format!("  - {}\n", from(c))).collect::<String>()
        );
        std::fs::write(dir.join("kustomization.yaml"), yaml).expect("write");
        let rendered = kustomize(&dir).expect("kubectl");
        let kinds: BTreeSet<_> = rendered.iter().filter_map(|d| d["kind"].as_str()).collect();
        if components.iter().any(|c| c.ends_with("monitoring")) {
            assert!(kinds.contains("ServiceMonitor") && kinds.contains("PrometheusRule"), "{case}");
            let dashboard = find(&rendered, "ConfigMap", "arcguard-dashboard");
            assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"].as_str(), Some("1"));
            let json = dashboard["data"]["arcguard.json"].as_str().expect("dashboard data");
            assert_eq!(json, read("manifests/components/monitoring/dashboard.json"));
        }
        if components.iter().any(|c| c.ends_with("networkpolicy")) {
            let policy = find(&rendered, "NetworkPolicy", "arcguard");
            let ports: Vec<_> = policy["spec"]["ingress"]
                .as_sequence()
                .expect("ingress")
                .iter()
                .map(|rule| rule["ports"][0]["port"].as_str().expect("a named port"))
                .collect();
            assert_eq!(ports, ["https-webhook", "http-metrics"], "{case}");
        }
        for doc in &rendered {
            assert_eq!(
                doc["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str(),
                Some("arcguard"),
                "{case}: {:?} {:?}",
                doc["kind"],
                doc["metadata"]["name"]
            );
        }
        let reports = of_kind(&rendered, "CustomResourceDefinition")
            .filter(|d| d["spec"]["group"].as_str() == Some("openreports.io"))
            .collect::<Vec<_>>();
        if components.iter().any(|c| c.ends_with("reports")) {
            // The upstream CRDs as they are, plus arcguard's labels (checked above).
            for file in OPENREPORTS_FILES {
                let mut upstream = documents(&read(&format!("{REPORTS_COMPONENT}/{file}")), file);
                assert_eq!(upstream.len(), 1, "{file}");
                let mut upstream = upstream.remove(0);
                let name = upstream["metadata"]["name"].as_str().expect("name").to_owned();
                let mut rendered = find(&rendered, "CustomResourceDefinition", &name).clone();
                rendered["metadata"].as_mapping_mut().expect("metadata").remove("labels");
                upstream["metadata"].as_mapping_mut().expect("metadata").remove("labels");
                assert_eq!(rendered, upstream, "{case}: kustomize changed {file}");
            }
            assert_eq!(reports.len(), 2, "{case}");
        } else {
            assert_eq!(reports.len(), 0, "{case}");
        }
        if components.iter().any(|c| c.ends_with("policies")) {
            let policies = of_kind(&rendered, "ClusterGuardPolicy").count();
            assert_eq!(policies, 3, "{case}");
            assert!(
                of_kind(&rendered, "ClusterGuardPolicy")
                    .all(|p| p["metadata"]["namespace"].is_null())
            );
            assert!(!kinds.contains("GMSACredentialSpec"), "{case}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// The instructions of a Dockerfile, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (word, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((word.to_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

fn version(text: &str) -> (u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().expect("version number"));
    (parts.next().expect("major"), parts.next().expect("minor"))
}

#[test]
fn the_image_builds_with_a_supported_toolchain_and_runs_like_the_deployment() {
    let dockerfile = instructions(&read("Dockerfile"));
    let all = |word: &str| -> Vec<&str> {
        dockerfile.iter().filter(|(w, _)| w == word).map(|(_, r)| r.as_str()).collect()
    };
    let from = all("FROM");
    assert_eq!(from.len(), 2, "{from:?}");
    let toolchain = from[0]
        .strip_prefix("rust:")
        .and_then(|r| r.split('-').next())
        .expect("build stage is rust:<version>-<debian>");
    let msrv = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version in Cargo.toml");
    assert!(version(toolchain) >= version(&msrv), "rust:{toolchain} is older than MSRV {msrv}");
    assert!(from[0].contains("bookworm") && from[1].contains("debian12"), "same glibc: {from:?}");
    assert!(from[1].starts_with("gcr.io/distroless/cc-debian12:nonroot"), "{from:?}");
    assert!(all("RUN").iter().all(|r| !r.contains("cargo build") || r.contains("--locked")));

    let docs = base_documents();
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    let user = format!(
        "{}:{}",
        pod["securityContext"]["runAsUser"].as_u64().expect("uid"),
        pod["securityContext"]["runAsGroup"].as_u64().expect("gid")
    );
    assert_eq!(all("USER"), [user.as_str()]);
    let exposed: BTreeSet<u64> = all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.parse().expect("port"))
        .collect();
    let ports: BTreeSet<u64> = pod["containers"][0]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert_eq!(exposed, ports);

    let json_array = |text: &str| -> Vec<String> { serde_json::from_str(text).expect("exec form") };
    assert_eq!(all("ENTRYPOINT").len(), 1);
    assert_eq!(json_array(all("ENTRYPOINT")[0]), ["/usr/local/bin/arcguard"]);
    // The default command is one the binary accepts, serving on every interface.
    let cmd = json_array(all("CMD")[0]);
    let parsed = Cli::try_parse_from(std::iter::once("arcguard".to_owned()).chain(cmd.clone()));
    assert!(
        parsed.is_ok(),
        "CMD {cmd:?}: {}",
        parsed.err().map(|e| e.to_string()).unwrap_or_default()
    );
    let cmd_flags = parse_flags(&cmd);
    let cmd_flag = |name: &str| cmd_flags.get(name).map(String::as_str);
    assert_eq!(cmd.first().map(String::as_str), Some("serve"));
    assert_eq!(cmd_flag("--addr"), Some("0.0.0.0:8443"));
    assert_eq!(cmd_flag("--metrics-addr"), Some("0.0.0.0:9090"));
    // The policies the image ships, and certificates somewhere user 65532 can write.
    let copied = all("COPY");
    let policies = cmd_flag("--policies").expect("--policies");
    assert!(
        copied.iter().any(|c| c.starts_with("policies/") && c.ends_with(&format!("{policies}/")))
    );
    for flag in ["--tls-cert", "--tls-key", "--ca-cert"] {
        assert!(cmd_flag(flag).is_some_and(|p| p.starts_with("/tmp/")), "{flag}: {cmd_flags:?}");
    }

    // Development keys under certs/ and the multi-gigabyte target/ never reach the context.
    let ignore = read(".dockerignore");
    let patterns: Vec<&str> =
        ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert_eq!(patterns.first(), Some(&"*"), "an allow-list");
    assert!(
        !patterns
            .iter()
            .any(|p| p.starts_with('!') && (p.contains("certs") || p.contains("target")))
    );
    for needed in ["!Cargo.toml", "!Cargo.lock", "!src", "!policies"] {
        assert!(patterns.contains(&needed), "{needed} missing from .dockerignore");
    }
}
