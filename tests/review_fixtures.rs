//! Every fixture AdmissionReview through the whole pipeline with the bundled sample policies.

use std::path::Path;

use arcguard::pipeline::{self, Webhook};
use arcguard::policy::load::{Loaded, load_dir};
use base64::Engine as _;
use serde_json::Value;

fn policies() -> Loaded {
    load_dir(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies")))
        .expect("sample policies load")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn uid_of(body: &[u8]) -> String {
    let review: Value = serde_json::from_slice(body).expect("fixture is json");
    review["request"]["uid"].as_str().expect("uid").to_owned()
}

/// Reviews a fixture and returns (allowed, message, warnings, decoded patch).
fn run(
    webhook: Webhook,
    name: &str,
    loaded: &Loaded,
) -> (bool, String, Vec<String>, Option<Value>) {
    let body = fixture(name);
    let decision = pipeline::review(webhook, &body, &loaded.policies, &loaded.facts)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(decision.response.uid, uid_of(&body), "{name}: uid echoed");
    let response = decision.response;
    let patch = response.patch.map(|p| {
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).expect("base64 patch");
        serde_json::from_slice(&bytes).expect("patch is json")
    });
    let message = response.status.map(|s| s.message).unwrap_or_default();
    (response.allowed, message, response.warnings, patch)
}

#[test]
fn validation_of_every_fixture_matches_the_sample_policies() {
    let loaded = policies();
    let cases: &[(&str, bool, &[&str])] = &[
        ("pod-create-trusted", true, &[]),
        (
            "pod-create-untrusted",
            false,
            &[
                "[trusted-registries]",
                "container \"web\"",
                "docker.io/library/nginx:1.25",
                "init container \"init\"",
                "contoso.azurecr.io.evil.com/tools/init:1",
            ],
        ),
        ("pod-update-untrusted-image", false, &["docker.io/library/nginx:1.25"]),
        ("pod-ephemeral-untrusted", false, &["ephemeral container \"debugger\"", "busybox:1.36"]),
        ("deployment-untrusted", false, &["Deployment shop/web", "ghcr.io/acme/migrate:2"]),
        ("replicaset-untrusted", false, &["ghcr.io/acme/migrate:2"]),
        ("statefulset-untrusted", false, &["ghcr.io/acme/migrate:2"]),
        ("daemonset-untrusted", false, &["ghcr.io/acme/migrate:2"]),
        ("job-untrusted", false, &["ghcr.io/acme/migrate:2"]),
        ("cronjob-untrusted", false, &["CronJob shop/nightly", "ghcr.io/acme/migrate:2"]),
        ("replicationcontroller-untrusted", false, &["ghcr.io/acme/migrate:2"]),
        ("podtemplate-untrusted", false, &["ghcr.io/acme/migrate:2"]),
        ("networkpolicy-create", true, &[]),
        ("calico-networkpolicy-create", true, &[]),
        ("calico-networkpolicy-windows", false, &["[calico-linux-only]"]),
        ("calico-globalnetworkpolicy-create", true, &[]),
        ("windows-pod-gmsa", true, &[]),
        ("windows-pod-no-gmsa", false, &["[windows-gmsa]", "Windows pod"]),
        ("configmap-create", true, &[]),
        ("pod-delete", true, &[]),
        ("excluded-namespace-pod", true, &[]),
        ("clusterguardpolicy-valid", true, &[]),
        ("clusterguardpolicy-invalid", false, &["spec.trustedRegistries.registries[1]"]),
        ("guardpolicy-two-rules", false, &["found gmsa and calicoLinuxOnly"]),
    ];
    for (name, allowed, fragments) in cases {
        let (got, message, _, patch) = run(Webhook::Validate, name, &loaded);
        assert_eq!(got, *allowed, "{name}: {message}");
        assert!(patch.is_none(), "{name}: validation never patches");
        for fragment in *fragments {
            assert!(message.contains(fragment), "{name}: {message:?} should contain {fragment:?}");
        }
    }
}

#[test]
fn mutation_of_every_fixture_matches_the_sample_policies() {
    let loaded = policies();
    let cases: &[(&str, Option<&str>)] = &[
        (
            "pod-create-trusted",
            Some(r#"{"op":"add","path":"/metadata/labels/arcguard.io~1os","value":"linux"}"#),
        ),
        (
            "windows-pod-gmsa",
            Some(r#""path":"/spec/securityContext/windowsOptions/gmsaCredentialSpec""#),
        ),
        ("windows-pod-no-gmsa", Some(r#""value":"windows""#)),
        (
            "networkpolicy-create",
            Some(r#"{"key":"arcguard.io/os","operator":"NotIn","values":["windows"]}"#),
        ),
        (
            "calico-networkpolicy-create",
            Some(r#""value":"(app == 'web') && arcguard.io/os != 'windows'""#),
        ),
        ("calico-globalnetworkpolicy-create", Some(r#""value":"arcguard.io/os != 'windows'""#)),
        ("deployment-untrusted", None),
        ("configmap-create", None),
        ("pod-delete", None),
        ("excluded-namespace-pod", None),
    ];
    for (name, fragment) in cases {
        let (allowed, _, _, patch) = run(Webhook::Mutate, name, &loaded);
        assert!(allowed, "{name}: the mutating webhook never denies");
        match (fragment, patch) {
            (None, None) => {}
            (Some(fragment), Some(patch)) => {
                let text = patch.to_string();
                assert!(text.contains(fragment), "{name}: {text} should contain {fragment}");
            }
            (want, got) => panic!("{name}: expected patch {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn mutated_objects_pass_validation_and_mutate_idempotently() {
    let loaded = policies();
    for name in [
        "pod-create-trusted",
        "windows-pod-gmsa",
        "networkpolicy-create",
        "calico-networkpolicy-create",
        "calico-globalnetworkpolicy-create",
    ] {
        let mut review: Value = serde_json::from_slice(&fixture(name)).expect("json");
        let (_, _, _, patch) = run(Webhook::Mutate, name, &loaded);
        let patch: json_patch::Patch =
            serde_json::from_value(patch.expect("a patch")).expect("patch");
        json_patch::patch(&mut review["request"]["object"], &patch).expect("patch applies");
        let body = serde_json::to_vec(&review).expect("json");
        let validated = pipeline::review(Webhook::Validate, &body, &loaded.policies, &loaded.facts)
            .expect("valid");
        assert!(validated.response.allowed, "{name}: {:?}", validated.response.status);
        let again = pipeline::review(Webhook::Mutate, &body, &loaded.policies, &loaded.facts)
            .expect("valid");
        assert_eq!(again.response.patch, None, "{name}: a second mutation changes nothing");
    }
}

#[test]
fn invalid_reviews_are_rejected_with_a_reason() {
    let loaded = policies();
    let cases: &[(&str, &str)] = &[
        ("not json", "invalid AdmissionReview"),
        (
            r#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}"#,
            "expected apiVersion admission.k8s.io/v1",
        ),
        (r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "no request"),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{"kind":"Pod"},"operation":"CREATE"}}"#,
            "uid",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"","kind":{"kind":"Pod"},"operation":"CREATE"}}"#,
            "uid is empty",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"1","kind":{"kind":"Pod","version":"v1"},"operation":"CREATE"}}"#,
            "request.object is missing",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"1","kind":{"kind":"Pod","version":"v1"},"operation":"CREATE","object":{"spec":{"containers":"x"}}}}"#,
            "at `request.object.spec.containers`",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"object":{"spec":{"containers":"x"}},"uid":"1","kind":{"kind":"Pod","version":"v1"},"operation":"CREATE"}}"#,
            "request.object is not a valid Pod",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"1","kind":{"kind":"Pod"},"operation":"PATCH"}}"#,
            "request.operation",
        ),
    ];
    for (body, fragment) in cases {
        let error =
            pipeline::review(Webhook::Validate, body.as_bytes(), &loaded.policies, &loaded.facts)
                .expect_err("invalid review");
        assert!(
            error.to_string().contains(fragment),
            "{body}: {error} should contain {fragment:?}"
        );
    }
}

#[test]
fn objects_before_their_kind_and_policies_without_spec_take_the_slow_paths() {
    let loaded = policies();
    // The object precedes `kind`, so it cannot be decoded in the first pass.
    let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"object":{"metadata":{"name":"p","namespace":"shop"},"spec":{"containers":[{"name":"c","image":"nginx"}]}},"uid":"u1","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE","namespace":"shop"}}"#;
    let decision =
        pipeline::review(Webhook::Validate, body, &loaded.policies, &loaded.facts).expect("valid");
    assert!(!decision.response.allowed);
    let decision =
        pipeline::review(Webhook::Mutate, body, &loaded.policies, &loaded.facts).expect("valid");
    assert!(decision.response.patch.is_some(), "the OS label is added");

    // A Calico policy without `spec` selects everything: the patch must create it.
    let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u2","kind":{"group":"projectcalico.org","version":"v3","kind":"GlobalNetworkPolicy"},"operation":"CREATE","object":{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkPolicy","metadata":{"name":"g"}}}}"#;
    let decision =
        pipeline::review(Webhook::Mutate, body, &loaded.policies, &loaded.facts).expect("valid");
    let patch = decision.response.patch.expect("a patch");
    let bytes = base64::engine::general_purpose::STANDARD.decode(patch).expect("base64");
    let text = String::from_utf8(bytes).expect("utf8");
    assert!(
        text.contains(r#""path":"/spec","value":{"selector":"arcguard.io/os != 'windows'"}"#),
        "{text}"
    );
}
