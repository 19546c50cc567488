//! The `check` and `certs` commands, run as a user would.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_arcguard");
const POLICIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");

fn check(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .arg("check")
        .arg("--policies")
        .arg(POLICIES)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("arcguard runs");
    if let Some(text) = stdin {
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("arcguard exits")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

const GOOD: &str = r"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: web, image: contoso.azurecr.io/shop/web:1.0}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {a: b}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: allow, namespace: shop}
spec:
  selector: app == 'web'
";

const BAD: &str = r"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: p, namespace: shop}
  spec:
    initContainers:
    - {name: init, image: docker.io/busybox}
    containers:
    - {name: web, image: nginx}
";

#[test]
fn passing_manifests_exit_zero_with_a_line_per_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(&dir, "good.yaml", GOOD);
    let out = check(&[&file], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("PASS Deployment shop/web"), "{stdout}");
    assert!(stdout.contains("SKIP ConfigMap default/cfg"), "{stdout}");
    assert!(stdout.contains("PASS NetworkPolicy shop/allow"), "{stdout}");
    assert!(
        stdout.contains("3 objects: 0 denied, 0 warned, 2 passed, 1 not inspected"),
        "{stdout}"
    );
}

#[test]
fn denied_objects_exit_one_and_list_every_violation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(&dir, "good.yaml", GOOD);
    let bad = write(&dir, "bad.yaml", BAD);
    let out = check(&[&good, &bad], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("DENY Pod shop/p"), "{stdout}");
    assert_eq!(stdout.matches("  deny: [trusted-registries]").count(), 2, "{stdout}");
    assert!(stdout.contains("docker.io/library/nginx:latest"), "{stdout}");
}

#[test]
fn standard_input_and_json_output() {
    let out = check(&["--output", "json", "-"], Some(BAD));
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(doc["denied"], true);
    assert_eq!(doc["results"][0]["verdict"], "deny");
    assert_eq!(doc["results"][0]["violations"].as_array().map(Vec::len), Some(2));
    assert!(doc["results"][0]["patch"].is_array(), "the OS label patch is reported");
}

#[test]
fn warn_policies_print_but_do_not_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    std::fs::write(
        policies.join("warn.yaml"),
        "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {name: registries}\nspec:\n  action: Warn\n  trustedRegistries: {registries: [contoso.azurecr.io]}\n",
    )
    .expect("write");
    let file = write(&dir, "bad.yaml", BAD);
    let out = Command::new(BIN)
        .args(["check", "--policies"])
        .arg(&policies)
        .arg(&file)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("WARN Pod shop/p"), "{stdout}");
    assert!(stdout.contains("  warn: [registries]"), "{stdout}");
}

#[test]
fn inlined_gmsa_content_is_what_the_cluster_would_store() {
    // A policy file's `Version: 1.0` reaches a cluster as `1` (kubectl sends JSON, the apiserver
    // stores Go's JSON); `check` inlines the same content, and a pod inlining `1.0` passes.
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    std::fs::write(
        policies.join("gmsa.yaml"),
        "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {name: gmsa}\nspec:\n  gmsa: {}\n---\napiVersion: windows.k8s.io/v1\nkind: GMSACredentialSpec\nmetadata: {name: webapp1}\ncredspec: {Version: 1.0, CmsPlugins: [ActiveDirectory]}\n",
    )
    .expect("write");
    let pod = |options: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: shop}}\nspec:\n  os: {{name: windows}}\n  securityContext: {{windowsOptions: {options}}}\n  containers:\n  - {{name: web, image: x}}\n"
        )
    };
    let run = |manifest: &str| {
        let file = write(&dir, "pod.yaml", manifest);
        let out = Command::new(BIN)
            .args(["check", "--output", "json", "--policies"])
            .arg(&policies)
            .arg(&file)
            .output()
            .expect("runs");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
        doc["results"][0].clone()
    };
    let named = run(&pod("{gmsaCredentialSpecName: webapp1}"));
    assert_eq!(named["verdict"], "pass", "{named}");
    let patch = named["patch"].as_array().expect("a patch");
    let inlined: Vec<&serde_json::Value> = patch
        .iter()
        .filter(|op| op["path"].as_str().is_some_and(|p| p.ends_with("/gmsaCredentialSpec")))
        .map(|op| &op["value"])
        .collect();
    assert_eq!(inlined, [r#"{"CmsPlugins":["ActiveDirectory"],"Version":1}"#], "{patch:?}");
    let written = run(&pod(
        r#"{gmsaCredentialSpecName: webapp1, gmsaCredentialSpec: '{"Version": 1.0, "CmsPlugins": ["ActiveDirectory"]}'}"#,
    ));
    assert_eq!(written["verdict"], "pass", "{written}");
    let empty = run(&pod("{gmsaCredentialSpecName: webapp1, gmsaCredentialSpec: ''}"));
    assert_eq!(empty["verdict"], "deny", "{empty}");
}

#[test]
fn bad_input_exits_two_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let invalid = write(&dir, "invalid.yaml", "kind: [unclosed\n");
    let out = check(&[&invalid], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid.yaml"));

    let out = check(&[&dir.path().join("missing.yaml").display().to_string()], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed to read"));

    let untyped = write(&dir, "untyped.yaml", "metadata: {name: x}\n");
    let out = check(&[&untyped], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("apiVersion and kind are required"));

    let policies = dir.path().join("bad-policies");
    std::fs::create_dir(&policies).expect("mkdir");
    std::fs::write(
        policies.join("p.yaml"),
        "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {name: p}\nspec:\n  action: Block\n  trustedRegistries: {registries: [a.io]}\n",
    )
    .expect("write");
    let good = write(&dir, "good.yaml", GOOD);
    let out = Command::new(BIN)
        .args(["check", "--policies"])
        .arg(&policies)
        .arg(&good)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.action"), "{stderr}");
}

#[test]
fn certs_writes_a_ca_and_serving_pair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["certs", "--out"])
        .arg(dir.path())
        .args(["--dns", "arcguard.test", "--ip", "127.0.0.1"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cert = std::fs::read_to_string(dir.path().join("tls.crt")).expect("tls.crt");
    let info = arcguard::certs::CertInfo::from_pem(cert.as_bytes()).expect("parses");
    assert_eq!(info.dns_names, vec!["arcguard.test".to_owned()]);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).expect("ca.crt");
    assert!(info.verifies_with(ca.as_bytes()).expect("CA parses"));
}

/// A policy directory holding one imageProvenance policy over a registry on `host`.
fn provenance_policies(host: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "provenance.yaml",
        &format!(
            "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {{name: provenance}}\nspec:\n  imageProvenance:\n    registries: [\"{host}\"]\n"
        ),
    );
    dir
}

#[test]
fn image_provenance_is_skipped_without_registry_and_read_with_it() {
    // A port nothing listens on: the registry cannot be read.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let host = format!("127.0.0.1:{port}");
    let policies = provenance_policies(&host);
    let manifests = tempfile::tempdir().expect("tempdir");
    let pod = write(
        &manifests,
        "pod.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  containers:\n  - {{name: app, image: \"{host}/team/app:1\"}}\n"
        ),
    );
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .arg("check")
            .arg("--policies")
            .arg(policies.path())
            .args(extra)
            .arg(&pod)
            .output()
            .expect("arcguard runs")
    };

    let skipped = run(&[]);
    let stdout = String::from_utf8_lossy(&skipped.stdout);
    assert_eq!(skipped.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("PASS Pod default/p"), "{stdout}");
    assert!(
        stdout.contains("note: imageProvenance policies were not checked: registries are read only with --registry"),
        "{stdout}"
    );
    let json = run(&["-o", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(doc["notes"][0].as_str().map(|n| n.contains("--registry")), Some(true), "{doc}");

    let read = run(&["--registry", "--registry-timeout", "2s"]);
    let stdout = String::from_utf8_lossy(&read.stdout);
    assert_eq!(read.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "uses image \"{host}/team/app:1\", whose registry could not be read"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("note:"), "{stdout}");

    // Registry flags that cannot work are usage errors naming the flag.
    for (flag, value, why) in [
        ("--registry-timeout", "0s", "outside 100ms..30s"),
        ("--registry-timeout", "1m", "outside 100ms..30s"),
        ("--registry-plain-http", "http://127.0.0.1:5000", "without a scheme or path"),
    ] {
        let refused = run(&["--registry", flag, value]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(why), "{flag} {value}: {stderr}");
    }

    // A CA file without a certificate is a usage error naming the flag.
    let bad_ca = write(&manifests, "ca.pem", "not a certificate\n");
    let refused = run(&["--registry", "--registry-ca", &bad_ca]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("registry CA bundle holds no valid PEM certificate"), "{stderr}");
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Enough objects that the output outgrows the pipe's buffer after the reader left.
    let many: String = (0..4000)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}, namespace: shop}}\n"
            )
        })
        .collect();
    let file = write(&dir, "many.yaml", &many);
    let mut child = Command::new(BIN)
        .args(["check", "--policies", POLICIES, &file])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("arcguard runs");
    // `| head -0`: the reader closes its end without reading.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("arcguard exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn one_object_is_counted_in_the_singular() {
    let out = check(&["-"], Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 object: 0 denied"), "{stdout}");
}

#[test]
fn an_output_that_cannot_be_written_fails_the_command() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        return; // Not Linux: no device that is always full.
    };
    let out = Command::new(BIN)
        .arg("crds")
        .stdout(Stdio::from(full))
        .stderr(Stdio::piped())
        .output()
        .expect("arcguard runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("error: writing the output"), "{stderr}");
}
