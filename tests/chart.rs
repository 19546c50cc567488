//! The Helm chart (`charts/arcguard`) against the kustomize tree (`manifests/`): for the same
//! settings both render the same objects, the chart's files are exact copies of the manifests,
//! `helm lint --strict` passes with every option, and `values.schema.json` types the values.
//! helm and kubectl are the pinned builds of `e2e/build-tools.sh` (`tests/tools`).

mod tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = "charts/arcguard";
const NAMESPACE: &str = "arcguard-system";

/// Labels and annotations that only Helm adds: release bookkeeping, not configuration.
const HELM_LABELS: &[&str] = &[
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];
const HELM_ANNOTATIONS: &[&str] = &["helm.sh/resource-policy"];

/// The chart's copies of the manifests it renders (`charts/sync-files.sh` writes them).
const COPIES: &[(&str, &str)] = &[
    ("files/namespace.yaml", "manifests/base/namespace.yaml"),
    ("files/crds.yaml", "manifests/base/crds.yaml"),
    ("files/rbac.yaml", "manifests/base/rbac.yaml"),
    ("files/service.yaml", "manifests/base/service.yaml"),
    ("files/deployment.yaml", "manifests/base/deployment.yaml"),
    ("files/webhooks.yaml", "manifests/base/webhooks.yaml"),
    ("files/networkpolicy.yaml", "manifests/components/networkpolicy/networkpolicy.yaml"),
    ("files/cert-manager/certificates.yaml", "manifests/overlays/cert-manager/certificates.yaml"),
    ("files/monitoring/servicemonitor.yaml", "manifests/components/monitoring/servicemonitor.yaml"),
    ("files/monitoring/prometheusrule.yaml", "manifests/components/monitoring/prometheusrule.yaml"),
    ("files/monitoring/dashboard.json", "manifests/components/monitoring/dashboard.json"),
    (
        "files/policies/calico-linux-only.yaml",
        "manifests/components/policies/calico-linux-only.yaml",
    ),
    (
        "files/policies/trusted-registries.yaml",
        "manifests/components/policies/trusted-registries.yaml",
    ),
    ("files/policies/windows-gmsa.yaml", "manifests/components/policies/windows-gmsa.yaml"),
    (
        "files/reports/openreports.io_reports.yaml",
        "manifests/components/reports/openreports.io_reports.yaml",
    ),
    (
        "files/reports/openreports.io_clusterreports.yaml",
        "manifests/components/reports/openreports.io_clusterreports.yaml",
    ),
];

fn path(relative: &str) -> PathBuf {
    Path::new(ROOT).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

#[test]
fn the_chart_files_are_exact_copies_of_the_manifests() {
    let mut stale = Vec::new();
    for (copy, source) in COPIES {
        if read(&format!("{CHART}/{copy}")) != read(source) {
            stale.push(format!("{CHART}/{copy} differs from {source}"));
        }
    }
    assert!(stale.is_empty(), "{stale:#?}\nrun `bash charts/sync-files.sh`");
    // And nothing else is there: every file the chart reads has its source.
    let mut listed: Vec<String> = COPIES.iter().map(|(c, _)| (*c).to_owned()).collect();
    listed.sort();
    let mut present = Vec::new();
    let files = path(CHART);
    let mut stack = vec![files.join("files")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").map(|e| e.expect("entry").path()) {
            if entry.is_dir() {
                stack.push(entry);
            } else {
                let relative = entry.strip_prefix(&files).expect("under the chart");
                present.push(relative.display().to_string());
            }
        }
    }
    present.sort();
    assert_eq!(present, listed);
    // The policies component lists exactly the policy copies.
    let component: serde_yaml::Value =
        serde_yaml::from_str(&read("manifests/components/policies/kustomization.yaml"))
            .expect("yaml");
    let resources = component["resources"].as_sequence().expect("resources").len();
    assert_eq!(resources, COPIES.iter().filter(|(c, _)| c.starts_with("files/policies/")).count());
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// The objects of a multi-document YAML text, by `kind namespace/name`, without Helm's own
/// labels and annotations.
fn objects(text: &str, origin: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let mut object =
            Value::deserialize(document).unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}"));
        if object.is_null() {
            continue;
        }
        let metadata = object["metadata"].as_object_mut().expect("metadata");
        for (field, helm_only) in [("labels", HELM_LABELS), ("annotations", HELM_ANNOTATIONS)] {
            if let Some(map) = metadata.get_mut(field).and_then(Value::as_object_mut) {
                map.retain(|k, _| !helm_only.contains(&k.as_str()));
                if map.is_empty() {
                    metadata.remove(field);
                }
            }
        }
        let key = format!(
            "{} {}/{}",
            object["kind"].as_str().expect("kind"),
            object["metadata"]["namespace"].as_str().unwrap_or(""),
            object["metadata"]["name"].as_str().expect("name")
        );
        assert!(out.insert(key.clone(), object).is_none(), "{origin}: {key} twice");
    }
    out
}

fn run(program: &Path, args: &[&str]) -> String {
    let output = Command::new(program)
        .current_dir(ROOT)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{} {args:?} failed:\n{stderr}", program.display());
    String::from_utf8(output.stdout).expect("utf-8")
}

/// `helm template` of the chart in arcguard-system with `--set` values.
fn helm_template(helm: &Path, set: &[&str]) -> BTreeMap<String, Value> {
    let mut args = vec!["template", "arcguard", CHART, "--namespace", NAMESPACE];
    for value in set {
        args.extend(["--set", value]);
    }
    objects(&run(helm, &args), &format!("helm template {set:?}"))
}

/// `kubectl kustomize` of a kustomization over `resource` with `components`, written next to
/// the test's target directory (kustomize takes relative paths only).
fn kustomize(kubectl: &Path, resource: &str, components: &[&str]) -> BTreeMap<String, Value> {
    let dir = tempfile::Builder::new()
        .prefix("chart-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let root = std::fs::canonicalize(ROOT).expect("root");
    let here = std::fs::canonicalize(dir.path()).expect("scratch");
    let to = |p: &Path| relative(&here, p).display().to_string();
    let yaml = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n{}",
        to(&root.join(resource)),
        components
            .iter()
            .map(|c| format!("  - {}\n", to(&root.join("manifests/components").join(c))))
            .collect::<String>()
    );
    std::fs::write(here.join("kustomization.yaml"), yaml).expect("write");
    let text = run(kubectl, &["kustomize", &here.display().to_string()]);
    objects(&text, &format!("kustomize {resource} {components:?}"))
}

/// The path from `from` to `to` (both absolute) with `..` steps.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
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

/// Where two JSON values differ, as `path: a != b` lines.
fn differences(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let at = format!("{at}/{key}");
                match (x.get(key), y.get(key)) {
                    (Some(p), Some(q)) => differences(p, q, &at, out),
                    (p, q) => out.push(format!("{at}: {p:?} != {q:?}")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                differences(p, q, &format!("{at}/{i}"), out);
            }
        }
        _ if a != b => {
            let show = |v: &Value| {
                let text = v.to_string();
                if text.len() > 300 { format!("{}...", &text[..300]) } else { text }
            };
            out.push(format!("{at}: kustomize {} != helm {}", show(a), show(b)));
        }
        _ => {}
    }
}

/// Every difference between kustomize's and Helm's objects.
fn drift(kustomize: &BTreeMap<String, Value>, helm: &BTreeMap<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for key in kustomize.keys().filter(|k| !helm.contains_key(*k)) {
        out.push(format!("{key}: only kustomize renders it"));
    }
    for key in helm.keys().filter(|k| !kustomize.contains_key(*k)) {
        out.push(format!("{key}: only helm renders it"));
    }
    for (key, object) in kustomize {
        if let Some(other) = helm.get(key) {
            differences(object, other, key, &mut out);
        }
    }
    out
}

#[test]
fn helm_and_kustomize_render_the_same_objects_for_the_same_settings() {
    let (Some(helm), Some(kubectl)) = (tools::tool("helm"), tools::tool("kubectl")) else { return };
    eprintln!("helm {}, kubectl {}", helm.display(), kubectl.display());
    // (what, helm --set values, kustomize resource, kustomize components)
    let cases: &[(&str, &[&str], &str, &[&str])] = &[
        ("defaults", &["namespace.create=true"], "manifests", &[]),
        (
            "monitoring",
            &["namespace.create=true", "monitoring.enabled=true"],
            "manifests",
            &["monitoring"],
        ),
        (
            "network policy",
            &["namespace.create=true", "networkPolicy.enabled=true"],
            "manifests",
            &["networkpolicy"],
        ),
        (
            "sample policies",
            &["namespace.create=true", "policies.samples=true"],
            "manifests",
            &["policies"],
        ),
        ("reports", &["namespace.create=true", "reports.enabled=true"], "manifests", &["reports"]),
        (
            "cert-manager",
            &["namespace.create=true", "certManager.enabled=true"],
            "manifests/overlays/cert-manager",
            &[],
        ),
        (
            "everything",
            &[
                "namespace.create=true",
                "monitoring.enabled=true",
                "networkPolicy.enabled=true",
                "policies.samples=true",
                "reports.enabled=true",
                "certManager.enabled=true",
            ],
            "manifests/overlays/cert-manager",
            &["monitoring", "networkpolicy", "policies", "reports"],
        ),
    ];
    let mut problems = Vec::new();
    for (what, set, resource, components) in cases {
        let expected = kustomize(&kubectl, resource, components);
        let rendered = helm_template(&helm, set);
        assert!(expected.len() >= 12, "{what}: {:?}", expected.keys());
        problems.extend(drift(&expected, &rendered).into_iter().map(|p| format!("{what}: {p}")));
    }
    assert!(problems.is_empty(), "the chart drifted from manifests/:\n{}", problems.join("\n"));
}

#[test]
fn by_default_the_chart_leaves_the_namespace_to_helm_and_renders_everything_else() {
    let (Some(helm), Some(kubectl)) = (tools::tool("helm"), tools::tool("kubectl")) else { return };
    let mut expected = kustomize(&kubectl, "manifests", &[]);
    assert!(expected.remove(&format!("Namespace /{NAMESPACE}")).is_some());
    let rendered = helm_template(&helm, &[]);
    assert_eq!(drift(&expected, &rendered), Vec::<String>::new());
    let kinds: Vec<_> = rendered.keys().map(|k| k.split(' ').next().expect("kind")).collect();
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    // The CRDs outlive the release unless asked otherwise (deleting them deletes every policy).
    let text = run(&helm, &["template", "arcguard", CHART, "--namespace", NAMESPACE]);
    assert_eq!(text.matches("helm.sh/resource-policy: keep").count(), 2);
    // The OpenReports CRDs only when asked for, kept likewise (deleting them would delete every
    // tool's reports), and independent of crds.install, which is about arcguard's own CRDs.
    assert!(
        !text.contains("name: reports.openreports.io")
            && !text.contains("name: clusterreports.openreports.io"),
        "no OpenReports CRD by default"
    );
    let keep = |set: &str| {
        let args = ["template", "arcguard", CHART, "--namespace", NAMESPACE, "--set", set];
        let text = run(&helm, &args);
        let crds: Vec<String> = objects(&text, set)
            .into_keys()
            .filter(|k| k.starts_with("CustomResourceDefinition "))
            .collect();
        (crds, text.matches("helm.sh/resource-policy: keep").count())
    };
    let reports = [
        "CustomResourceDefinition /clusterreports.openreports.io",
        "CustomResourceDefinition /reports.openreports.io",
    ];
    let (crds, kept) = keep("reports.enabled=true");
    assert_eq!((crds.len(), kept), (4, 4), "{crds:?}");
    assert!(reports.iter().all(|r| crds.iter().any(|c| c == r)), "{crds:?}");
    assert_eq!(keep("reports.enabled=true,crds.keep=false").1, 0);
    assert_eq!(
        keep("reports.enabled=true,crds.install=false"),
        (reports.map(String::from).to_vec(), 2)
    );
}

fn deployment(objects: &BTreeMap<String, Value>, namespace: &str) -> Value {
    objects[&format!("Deployment {namespace}/arcguard")].clone()
}

#[test]
fn the_chart_options_change_what_they_say_and_follow_the_release_namespace() {
    let Some(helm) = tools::tool("helm") else { return };
    let digest = format!("sha256:{}", "a".repeat(64));
    let rendered = objects(
        &run(
            &helm,
            &[
                "template",
                "arcguard",
                CHART,
                "--namespace",
                "guard",
                "--set",
                "image.repository=contoso.azurecr.io/arcguard,image.tag=0.1.0",
                "--set",
                &format!("image.digest={digest}"),
                "--set",
                "replicas=3,labelExistingPods=false,labelPodsInterval=10m,podDisruptionBudget.enabled=false,audit.interval=30m,audit.maxResults=200",
                "--set",
                "webhooks.url=https://127.0.0.1:9443,crds.install=false",
                "--set-json",
                r#"extraArgs=["--log","debug"]"#,
            ],
        ),
        "helm template with options",
    );
    let deployment = deployment(&rendered, "guard");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], format!("contoso.azurecr.io/arcguard:0.1.0@{digest}"));
    let args: Vec<&str> =
        container["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    assert!(
        args.ends_with(&[
            "--label-existing-pods=false",
            "--label-pods-interval",
            "10m",
            "--audit-interval",
            "30m",
            "--audit-max-results",
            "200",
            "--log",
            "debug"
        ]),
        "{args:?}"
    );
    assert!(!rendered.keys().any(|k| k.starts_with("PodDisruptionBudget ")));
    assert!(!rendered.keys().any(|k| k.starts_with("CustomResourceDefinition ")));
    // Without the labeller, the ClusterRole keeps `get` on pods (bindings name a pod) and
    // `list` for the audit; without the audit too, only `get`.
    let pods_verbs = |rendered: &BTreeMap<String, Value>| {
        rendered["ClusterRole /arcguard"]["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .find(|r| r["resources"] == serde_json::json!(["pods"]))
            .expect("a pods rule")["verbs"]
            .clone()
    };
    assert_eq!(pods_verbs(&rendered), serde_json::json!(["get", "list"]));
    let no_audit = objects(
        &run(
            &helm,
            &[
                "template",
                "arcguard",
                CHART,
                "--namespace",
                "guard",
                "--set",
                "labelExistingPods=false,audit.interval=0s",
            ],
        ),
        "helm template without labeller and audit",
    );
    assert_eq!(pods_verbs(&no_audit), serde_json::json!(["get"]));
    // Everything that names the namespace names the release's.
    for kind in ["ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"] {
        for webhook in
            rendered[&format!("{kind} /arcguard")]["webhooks"].as_array().expect("webhooks")
        {
            let url = webhook["clientConfig"]["url"].as_str().expect("url");
            assert!(url.starts_with("https://127.0.0.1:9443/"), "{url}");
            let text = webhook.to_string();
            assert!(!text.contains("arcguard-system"), "{text}");
            if webhook["name"] != "policies.arcguard.io" {
                assert!(text.contains(r#""guard""#), "{text}");
            }
            assert!(text.contains("system:serviceaccount:guard:arcguard"), "{text}");
        }
    }
    for binding in ["ClusterRoleBinding /arcguard", "RoleBinding guard/arcguard"] {
        assert_eq!(rendered[binding]["subjects"][0]["namespace"], "guard", "{binding}");
    }
}

#[test]
fn helm_lint_passes_with_every_option_and_the_schema_refuses_bad_values() {
    let Some(helm) = tools::tool("helm") else { return };
    for set in [
        "namespace.create=false",
        "namespace.create=true,monitoring.enabled=true,networkPolicy.enabled=true,policies.samples=true,reports.enabled=true,certManager.enabled=true",
        "labelExistingPods=false,labelPodsInterval=1h,webhooks.url=https://arcguard.example:8443,crds.keep=false",
    ] {
        let output =
            run(&helm, &["lint", "--strict", CHART, "--namespace", NAMESPACE, "--set", set]);
        assert!(output.contains("0 chart(s) failed"), "{set}: {output}");
    }
    for (flag, set, complaint) in [
        ("--set", "replicas=two", "replicas"),
        ("--set", "image.digest=latest", "digest"),
        ("--set", "webhooks.url=http://127.0.0.1:9443", "url"),
        ("--set", "labelPodsInterval=soon", "labelPodsInterval"),
        ("--set-json", "networkPolicy.webhookFrom=[]", "webhookFrom"),
        ("--set-json", r#"networkPolicy.metricsFrom=[{"ipblock":{}}]"#, "metricsFrom"),
        ("--set", "unknownOption=1", "unknownOption"),
        ("--set", "reports.enabled=yes", "reports"),
        ("--set", "audit.interval=hourly", "interval"),
        ("--set", "audit.maxResults=-1", "maxResults"),
        // At least two replicas, a memory limit (the in-flight budget is half of it), and a
        // labeller that pauses between passes.
        ("--set", "replicas=1", "replicas"),
        ("--set", "resources.limits=null", "limits"),
        ("--set", "labelPodsInterval=0s", "labelPodsInterval"),
        // No namespace given: Helm's `default`, which the webhooks would exempt.
        ("--set", "replicas=2", "namespace of its own"),
    ] {
        let output = Command::new(&helm)
            .current_dir(ROOT)
            .args(["template", "arcguard", CHART, flag, set])
            .output()
            .expect("helm");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{set} was accepted");
        assert!(stderr.contains(complaint), "{set}: {stderr}");
    }
}

#[test]
fn the_chart_refuses_a_shared_namespace_and_broken_combinations() {
    let Some(helm) = tools::tool("helm") else { return };
    for (namespace, set, complaint) in [
        ("kube-system", "replicas=2", "namespace of its own"),
        ("y", "replicas=2", "YAML boolean"),
        ("9lives", "replicas=2", "DNS label that starts with a letter"),
        (
            "arcguard-system",
            "certManager.enabled=true,webhooks.url=https://x.example:8443",
            "use one or the other",
        ),
    ] {
        let output = Command::new(&helm)
            .current_dir(ROOT)
            .args(["template", "arcguard", CHART, "--namespace", namespace, "--set", set])
            .output()
            .expect("helm");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{namespace} {set} was accepted");
        assert!(stderr.contains(complaint), "{namespace} {set}: {stderr}");
    }
}

#[test]
fn every_value_is_typed_and_described_by_the_schema() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read(&format!("{CHART}/values.yaml"))).expect("values");
    let values: Value = serde_json::to_value(values).expect("json");
    let schema: Value =
        serde_json::from_str(&read(&format!("{CHART}/values.schema.json"))).expect("schema");
    fn walk(value: &Value, schema: &Value, at: &str, out: &mut Vec<String>) {
        if schema.get("type").is_none() && schema.get("anyOf").is_none() {
            out.push(format!("{at}: no type"));
        }
        let Value::Object(map) = value else { return };
        if schema["type"] != "object" || schema.get("properties").is_none() {
            return;
        }
        for (key, child) in map {
            let child_schema = &schema["properties"][key];
            if child_schema.is_null() {
                out.push(format!("{at}.{key}: not in the schema"));
                continue;
            }
            if child_schema["description"].as_str().is_none_or(str::is_empty) {
                out.push(format!("{at}.{key}: no description"));
            }
            walk(child, child_schema, &format!("{at}.{key}"), out);
        }
    }
    let mut problems = Vec::new();
    walk(&values, &schema, "", &mut problems);
    assert_eq!(problems, Vec::<String>::new());
}
