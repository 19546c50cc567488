//! The upstream windows-gmsa admission webhook's unit tests, ported as facts about arcguard's
//! `gmsa` rule.
//!
//! Source: kubernetes-sigs/windows-gmsa, `admission-webhook/webhook_test.go`
//! (`TestValidateCreateRequest`, `TestMutateCreateRequest`, `TestValidateUpdateRequest`) and its
//! helpers in `utils_test.go`. As upstream, every case runs with the gMSA settings at pod level
//! and at container level, next to 0 to 5 extra containers that carry correct settings of their
//! own. Upstream's webhook has no notion of a Windows pod; the rule is compiled with
//! `requireForWindows: false` so that only the checks both make are compared.
//!
//! Deliberate differences, each a row of the table in conformance/README.md:
//! - upstream's fake client returns the credential spec contents as an arbitrary string (the
//!   extra containers' `<name>-cred-spec-contents` is not JSON) and a byte-equal string passes.
//!   arcguard's facts hold the GMSACredentialSpec's `credspec` as a JSON value, as a real
//!   cluster does (upstream's real client `json.Marshal`s it), so those contents are modelled
//!   as JSON objects here, and the inlined content is Go's JSON of the value;
//! - an error retrieving the spec fails upstream's *mutating* webhook; arcguard's mutating
//!   webhook inlines nothing for a spec that does not exist and its validating webhook denies
//!   the pod ("does not exist"): the pod is refused either way;
//! - the random-hostname option (`WithRandomHostname`) is not an arcguard feature; its cases
//!   are not ported;
//! - upstream checks `containers` only; arcguard also checks init and ephemeral containers
//!   (not exercised by the ported cases).

use std::collections::BTreeMap;

use arcguard::admission::{Kind, Operation, RequestView};
use arcguard::rules::gmsa::content::to_go_json;
use arcguard::rules::gmsa::{Gmsa, GmsaSpec};
use arcguard::rules::{Access, Mutation, StaticFacts};
use serde_json::value::RawValue;
use serde_json::{Value, json};

// The constants of upstream's `utils_test.go`.
const DUMMY_CRED_SPEC_NAME: &str = "dummy-cred-spec-name";
const DUMMY_CRED_SPEC_CONTENTS: &str = r#"{"We don't need no": ["education", "thought control", "dark sarcasm in the classroom"], "All in all you're just another": {"brick": "in", "the": "wall"}}"#;
const DUMMY_SERVICE_ACCOUNT: &str = "dummy-service-account-name";
const DUMMY_NAMESPACE: &str = "dummy-namespace";
const DUMMY_POD_NAME: &str = "dummy-pod-name";
const DUMMY_CONTAINER_NAME: &str = "dummy-container-name";

/// Where the settings under test sit (upstream's `gmsaResourceKind`).
#[derive(Clone, Copy, Debug)]
enum Site {
    Pod,
    Container,
}

impl Site {
    /// How arcguard names the site in messages.
    fn described(self) -> &'static str {
        match self {
            Self::Pod => "the pod-level securityContext",
            Self::Container => "container \"dummy-container-name\"",
        }
    }
}

fn extra_container_name(i: usize) -> String {
    format!("extra-container-{i}")
}

/// Upstream's `buildWindowsOptions` / `setWindowsOptions`: an empty name or content is left
/// unset.
fn windows_options(name: &str, contents: &str) -> Value {
    let mut options = json!({});
    if !name.is_empty() {
        options["gmsaCredentialSpecName"] = json!(name);
    }
    if !contents.is_empty() {
        options["gmsaCredentialSpec"] = json!(contents);
    }
    options
}

/// The credential spec contents upstream's fake client returns for `name`, as a JSON value.
fn spec_contents(name: &str) -> Value {
    if name == DUMMY_CRED_SPEC_NAME {
        serde_json::from_str(DUMMY_CRED_SPEC_CONTENTS).expect("upstream's contents are JSON")
    } else {
        json!({"contents": format!("{name}-contents")})
    }
}

/// Upstream's `buildPod` through `runWebhookValidateOrMutateTests`: pod-level options,
/// `extra` containers with their own settings, then the dummy container; `target` holds the
/// options under test at `site`, the other site gets empty options.
fn build_pod(
    site: Site,
    target: &Value,
    extra: usize,
    extra_options: &dyn Fn(&str) -> Value,
) -> Value {
    let mut containers: Vec<Value> = (0..extra)
        .map(|i| {
            let name = extra_container_name(i);
            json!({"name": name, "image": "x", "securityContext": {"windowsOptions": extra_options(&name)}})
        })
        .collect();
    let (pod_options, container_options) = match site {
        Site::Pod => (target.clone(), json!({})),
        Site::Container => (json!({}), target.clone()),
    };
    containers.push(json!({"name": DUMMY_CONTAINER_NAME, "image": "x", "securityContext": {"windowsOptions": container_options}}));
    json!({
        "metadata": {"name": DUMMY_POD_NAME, "namespace": DUMMY_NAMESPACE},
        "spec": {
            "serviceAccountName": DUMMY_SERVICE_ACCOUNT,
            "securityContext": {"windowsOptions": pod_options},
            "containers": containers,
        }
    })
}

fn rule() -> Gmsa {
    Gmsa::compile(&GmsaSpec { require_for_windows: false, ..GmsaSpec::default() })
        .expect("the spec compiles")
}

/// Upstream's `dummyKubeClient`: every spec exists and may be used, except as `missing` and
/// `forbidden` say.
fn facts(extra: usize, missing: Option<&str>, forbidden: Option<&str>) -> StaticFacts {
    let mut names: Vec<String> =
        (0..extra).map(|i| format!("{}-cred-spec", extra_container_name(i))).collect();
    names.push(DUMMY_CRED_SPEC_NAME.to_owned());
    names.push("new-cred-spec-name".to_owned());
    let credential_specs = names
        .iter()
        .filter(|name| Some(name.as_str()) != missing)
        .map(|name| (name.clone(), spec_contents(name)))
        .collect();
    let authorizations = names
        .iter()
        .map(|name| {
            let access = if Some(name.as_str()) == forbidden {
                Access::Denied("no RBAC rule allows it".to_owned())
            } else {
                Access::Allowed
            };
            ((DUMMY_NAMESPACE.to_owned(), DUMMY_SERVICE_ACCOUNT.to_owned(), name.clone()), access)
        })
        .collect::<BTreeMap<_, _>>();
    StaticFacts { credential_specs, authorizations: Some(authorizations), ..StaticFacts::default() }
}

fn view(pod: &Value, old: Option<&Value>) -> RequestView {
    let raw = |v: &Value| RawValue::from_string(v.to_string()).expect("json");
    let operation = if old.is_some() { Operation::Update } else { Operation::Create };
    let old = old.map(raw);
    RequestView::build(
        Kind::Pod,
        operation,
        Some(DUMMY_NAMESPACE.to_owned()),
        &raw(pod),
        old.as_deref(),
    )
    .expect("the pod decodes")
}

/// The violations arcguard finds in the pod.
fn violations(pod: &Value, old: Option<&Value>, facts: &StaticFacts) -> Vec<String> {
    rule().validate(&view(pod, old), facts).violations
}

fn each_variant(mut test: impl FnMut(Site, usize, &str)) {
    for extra in 0..=5 {
        for site in [Site::Pod, Site::Container] {
            test(site, extra, &format!("{site:?}-level options and {extra} extra containers"));
        }
    }
}

/// One ported create case: its upstream name, the options under test, the spec the fake client
/// cannot find, the spec the service account may not use, and the violations expected.
type CreateCase<'a> = (&'a str, Value, Option<&'a str>, Option<&'a str>, &'a [&'a str]);

/// `TestValidateCreateRequest`.
#[test]
fn validate_create_request() {
    // "with empty GMSA settings" and "with no GMSA settings": allowed.
    for options in [json!({}), Value::Null] {
        let pod = json!({"metadata": {"name": DUMMY_POD_NAME}, "spec": {
            "serviceAccountName": DUMMY_SERVICE_ACCOUNT,
            "securityContext": {"windowsOptions": options},
            "containers": [{"name": DUMMY_CONTAINER_NAME, "image": "x", "securityContext": {"windowsOptions": options}}]}});
        assert_eq!(
            violations(&pod, None, &facts(0, None, None)),
            Vec::<String>::new(),
            "{options}"
        );
    }
    let equivalent = r#"{"All in all you're just another":      {"the":"wall","brick":   "in"},"We don't need no":["education", "thought control","dark sarcasm in the classroom"]}"#;
    let different = r#"{"We don't need no": ["money"], "All in all you're just another": {"brick": "in", "the": "wall"}}"#;
    let cases: &[CreateCase<'_>] = &[
        (
            "with matching name & content, it passes",
            windows_options(DUMMY_CRED_SPEC_NAME, DUMMY_CRED_SPEC_CONTENTS),
            None,
            None,
            &[],
        ),
        (
            "if the cred spec contents are not byte-to-byte equal to that of the one named, but still represent equivalent JSONs, it passes",
            windows_options(DUMMY_CRED_SPEC_NAME, equivalent),
            None,
            None,
            &[],
        ),
        (
            "if the cred spec contents are not that of the one named, it fails",
            windows_options(DUMMY_CRED_SPEC_NAME, different),
            None,
            None,
            &[
                "inlines gMSA credential spec content that differs from GMSACredentialSpec \"dummy-cred-spec-name\"",
            ],
        ),
        (
            "if the cred spec contents are not byte-to-byte equal to that of the one named, and are not even a valid JSON object, it fails",
            windows_options(DUMMY_CRED_SPEC_NAME, "i ain't no JSON object"),
            None,
            None,
            &["differs from GMSACredentialSpec \"dummy-cred-spec-name\""],
        ),
        (
            "if the contents are set, but the name one isn't provided, it fails",
            windows_options("", DUMMY_CRED_SPEC_CONTENTS),
            None,
            None,
            &["sets windowsOptions.gmsaCredentialSpec without gmsaCredentialSpecName"],
        ),
        (
            "if the service account is not authorized to use the cred-spec, it fails",
            windows_options(DUMMY_CRED_SPEC_NAME, DUMMY_CRED_SPEC_CONTENTS),
            None,
            Some(DUMMY_CRED_SPEC_NAME),
            &[
                "service account dummy-namespace/dummy-service-account-name may not use GMSACredentialSpec \"dummy-cred-spec-name\"",
            ],
        ),
        (
            "if there is an error when retrieving the cred-spec's contents, it fails",
            windows_options(DUMMY_CRED_SPEC_NAME, DUMMY_CRED_SPEC_CONTENTS),
            Some(DUMMY_CRED_SPEC_NAME),
            None,
            &["names GMSACredentialSpec \"dummy-cred-spec-name\", which does not exist"],
        ),
        // Not in upstream's table, decided with upstream's code (`credSpecContents != nil`):
        // an empty string is content, compared and never filled in.
        (
            "an empty gmsaCredentialSpec with a name fails",
            json!({"gmsaCredentialSpecName": DUMMY_CRED_SPEC_NAME, "gmsaCredentialSpec": ""}),
            None,
            None,
            &["sets windowsOptions.gmsaCredentialSpec to an empty string"],
        ),
        (
            "an empty gmsaCredentialSpec without a name fails",
            json!({"gmsaCredentialSpec": ""}),
            None,
            None,
            &["sets windowsOptions.gmsaCredentialSpec without gmsaCredentialSpecName"],
        ),
    ];
    // Extra containers carry the name and (Go's JSON of) the contents of their own spec.
    let extra_options = |name: &str| {
        let spec = format!("{name}-cred-spec");
        windows_options(&spec, &to_go_json(&spec_contents(&spec)))
    };
    for (case, options, missing, forbidden, want) in cases {
        each_variant(|site, extra, variant| {
            let pod = build_pod(site, options, extra, &extra_options);
            let found = violations(&pod, None, &facts(extra, *missing, *forbidden));
            assert_eq!(found.len(), want.len(), "{case} ({variant}): {found:?}");
            for (found, want) in found.iter().zip(*want) {
                assert!(
                    found.contains(want),
                    "{case} ({variant}): {found:?} should contain {want:?}"
                );
                assert!(
                    found.contains(site.described()),
                    "{case} ({variant}): {found:?} names the site"
                );
            }
        });
    }
}

#[test]
fn numbers_in_the_spec_compare_as_go_decodes_them() {
    // `check` and the cluster agree: content with `1.0` matches a spec holding `1`.
    let facts = StaticFacts {
        credential_specs: [(DUMMY_CRED_SPEC_NAME.to_owned(), json!({"Version": 1, "Ratio": 0.5}))]
            .into(),
        ..StaticFacts::default()
    };
    for (content, allowed) in
        [(r#"{"Version": 1.0, "Ratio": 5e-1}"#, true), (r#"{"Version": 1.5, "Ratio": 0.5}"#, false)]
    {
        let pod =
            build_pod(
                Site::Pod,
                &windows_options(DUMMY_CRED_SPEC_NAME, content),
                0,
                &|_| json!({}),
            );
        assert_eq!(violations(&pod, None, &facts).is_empty(), allowed, "{content}");
    }
}

/// `TestMutateCreateRequest` (without the random-hostname cases).
#[test]
fn mutate_create_request() {
    // "with empty GMSA settings" and "with no GMSA settings, it passes and does nothing".
    for options in [json!({}), Value::Null] {
        let pod = json!({"metadata": {"name": DUMMY_POD_NAME}, "spec": {
            "securityContext": {"windowsOptions": options},
            "containers": [{"name": DUMMY_CONTAINER_NAME, "image": "x", "securityContext": {"windowsOptions": options}}]}});
        assert!(rule().mutate(&view(&pod, None), &facts(0, None, None)).is_empty(), "{options}");
    }
    // Extra containers name their spec without contents: each gets it inlined.
    let extra_options = |name: &str| windows_options(&format!("{name}-cred-spec"), "");
    let inlined = |pointer: String, spec: &str| Mutation::InlineCredentialSpec {
        windows_options_pointer: pointer,
        content: to_go_json(&spec_contents(spec)),
    };
    let site_pointer = |site: Site, extra: usize| match site {
        Site::Pod => "/spec/securityContext/windowsOptions".to_owned(),
        // The dummy container comes after the extra ones.
        Site::Container => format!("/spec/containers/{extra}/securityContext/windowsOptions"),
    };
    each_variant(|site, extra, variant| {
        let expected_extra = (0..extra).map(|i| {
            inlined(
                format!("/spec/containers/{i}/securityContext/windowsOptions"),
                &format!("{}-cred-spec", extra_container_name(i)),
            )
        });

        // "with a GMSA cred spec name, it passes and inlines the cred-spec's contents".
        let pod =
            build_pod(site, &windows_options(DUMMY_CRED_SPEC_NAME, ""), extra, &extra_options);
        let mut found = rule().mutate(&view(&pod, None), &facts(extra, None, None));
        found.sort();
        let mut want: Vec<Mutation> = expected_extra.clone().collect();
        want.push(inlined(site_pointer(site, extra), DUMMY_CRED_SPEC_NAME));
        want.sort();
        assert_eq!(found, want, "inlines ({variant})");

        // "it the cred spec's contents are already set, along with its name, it passes and
        // doesn't overwrite the provided contents".
        let preset = windows_options(DUMMY_CRED_SPEC_NAME, r#"{"pre-set GMSA": "cred contents"}"#);
        let pod = build_pod(site, &preset, extra, &extra_options);
        let mut found = rule().mutate(&view(&pod, None), &facts(extra, None, None));
        found.sort();
        let mut want: Vec<Mutation> = expected_extra.clone().collect();
        want.sort();
        assert_eq!(found, want, "does not overwrite ({variant})");

        // "if there is an error when retrieving the cred-spec's contents, it fails": nothing is
        // inlined for it, and validation refuses the pod.
        let pod =
            build_pod(site, &windows_options(DUMMY_CRED_SPEC_NAME, ""), extra, &extra_options);
        let facts = facts(extra, Some(DUMMY_CRED_SPEC_NAME), None);
        let mut found = rule().mutate(&view(&pod, None), &facts);
        found.sort();
        let mut want: Vec<Mutation> = expected_extra.collect();
        want.sort();
        assert_eq!(found, want, "spec missing ({variant})");
        let refused = violations(&pod, None, &facts);
        assert!(
            refused.iter().any(|v| v.contains("which does not exist")),
            "{variant}: {refused:?}"
        );

        // An empty gmsaCredentialSpec is content: not filled in (upstream: `!= nil`).
        let empty =
            json!({"gmsaCredentialSpecName": DUMMY_CRED_SPEC_NAME, "gmsaCredentialSpec": ""});
        let pod = build_pod(site, &empty, extra, &extra_options);
        let found = rule().mutate(&view(&pod, None), &facts);
        assert!(
            !found.iter().any(|m| matches!(m, Mutation::InlineCredentialSpec { windows_options_pointer, .. } if *windows_options_pointer == site_pointer(site, extra))),
            "empty content is not filled in ({variant}): {found:?}"
        );
    });
}

/// `TestValidateUpdateRequest`.
#[test]
fn validate_update_request() {
    for options in [json!({}), Value::Null] {
        let pod = json!({"metadata": {"name": DUMMY_POD_NAME}, "spec": {
            "securityContext": {"windowsOptions": options},
            "containers": [{"name": DUMMY_CONTAINER_NAME, "image": "x", "securityContext": {"windowsOptions": options}}]}});
        assert_eq!(violations(&pod, Some(&pod), &facts(0, None, None)), Vec::<String>::new());
    }
    let extra_options = |name: &str| {
        windows_options(&format!("{name}-cred-spec"), &format!("{name}-cred-spec-contents"))
    };
    // (case, new options, old options, denied)
    let cases = [
        (
            "if there was no changes to GMSA settings, it passes",
            windows_options(DUMMY_CRED_SPEC_NAME, DUMMY_CRED_SPEC_CONTENTS),
            windows_options(DUMMY_CRED_SPEC_NAME, DUMMY_CRED_SPEC_CONTENTS),
            false,
        ),
        (
            "if there was a change to a GMSA name, it fails",
            windows_options("new-cred-spec-name", DUMMY_CRED_SPEC_CONTENTS),
            windows_options(DUMMY_CRED_SPEC_NAME, ""),
            true,
        ),
        (
            "if there was a change to a GMSA contents, it fails",
            windows_options(DUMMY_CRED_SPEC_NAME, "new-cred-spec-contents"),
            windows_options("", DUMMY_CRED_SPEC_CONTENTS),
            true,
        ),
        (
            "if there were changes to both GMSA name & contents, it fails",
            windows_options("new-cred-spec-name", "new-cred-spec-contents"),
            windows_options(DUMMY_CRED_SPEC_NAME, DUMMY_CRED_SPEC_CONTENTS),
            true,
        ),
        (
            "setting an empty gmsaCredentialSpec is a change (upstream compares the pointers)",
            json!({"gmsaCredentialSpecName": DUMMY_CRED_SPEC_NAME, "gmsaCredentialSpec": ""}),
            windows_options(DUMMY_CRED_SPEC_NAME, ""),
            true,
        ),
    ];
    for (case, new, old, denied) in cases {
        each_variant(|site, extra, variant| {
            let pod = build_pod(site, &new, extra, &extra_options);
            let old_pod = build_pod(site, &old, extra, &extra_options);
            let found = violations(&pod, Some(&old_pod), &facts(extra, None, None));
            if denied {
                assert_eq!(found.len(), 1, "{case} ({variant}): {found:?}");
                assert!(
                    found[0].contains("cannot change on update"),
                    "{case} ({variant}): {found:?}"
                );
                assert!(found[0].contains(site.described()), "{case} ({variant}): {found:?}");
            } else {
                assert_eq!(found, Vec::<String>::new(), "{case} ({variant})");
            }
        });
    }
}
