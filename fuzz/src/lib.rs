//! Fuzz checks for arcguard: each takes the fuzzer's bytes and panics only when an invariant
//! is broken (a panic inside arcguard counts the same), so the fuzzer reports it as a crash.

use std::sync::OnceLock;

use arcguard::image;
use arcguard::pipeline::{self, Webhook};
use arcguard::policy::load::{Loaded, load_sources};
use arcguard::rules::calico::{scope_selector, selector};
use base64::Engine as _;
use serde_json::Value;

/// The bundled sample policies, compiled once per process.
fn samples() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let sources = SAMPLE_POLICIES
            .iter()
            .map(|(name, text)| ((*name).to_owned(), (*text).to_owned()))
            .collect::<Vec<_>>();
        load_sources(&sources).expect("the sample policies load")
    })
}

/// The files of policies/, built in so a target needs no working directory.
const SAMPLE_POLICIES: [(&str, &str); 4] = [
    ("calico-linux-only.yaml", include_str!("../../policies/calico-linux-only.yaml")),
    ("gmsa-credspec-webapp1.yaml", include_str!("../../policies/gmsa-credspec-webapp1.yaml")),
    ("trusted-registries.yaml", include_str!("../../policies/trusted-registries.yaml")),
    ("windows-gmsa.yaml", include_str!("../../policies/windows-gmsa.yaml")),
];

/// OS label keys the selector target scopes with: the default and the Kubernetes one.
const OS_KEYS: [&str; 2] = ["arcguard.io/os", "kubernetes.io/os"];

/// AdmissionReview decoding and both webhooks: never panics; a patch is a JSON Patch that
/// applies to the request's object.
pub fn review(data: &[u8]) {
    let loaded = samples();
    for webhook in [Webhook::Validate, Webhook::Mutate] {
        let Ok(decision) = pipeline::review(webhook, data, &loaded.policies, &loaded.facts) else {
            continue;
        };
        let Some(patch) = decision.response.patch else { continue };
        assert_eq!(webhook, Webhook::Mutate, "only the mutating webhook patches");
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(&patch).expect("the patch is base64");
        let patch: json_patch::Patch =
            serde_json::from_slice(&bytes).expect("the patch is a JSON Patch");
        // serde_json skips ignored strings without checking their UTF-8, so a body arcguard
        // reviewed may still not decode as a `Value`; the apply check needs one.
        let Ok(review) = serde_json::from_slice::<Value>(data) else { continue };
        let mut object = review["request"]["object"].clone();
        json_patch::patch(&mut object, &patch)
            .unwrap_or_else(|e| panic!("the patch applies to the object: {e}"));
    }
}

/// Image references: never panics; both parsers agree; the normalised form parses back to the
/// same reference and pulls the same image.
pub fn image(data: &[u8]) {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let parsed = image::parse(input);
    let parts = image::parse_parts(input);
    match (&parsed, &parts) {
        (Ok(reference), Ok(parts)) => {
            assert_eq!(&parts.to_image_ref(), reference, "parse and parse_parts agree");
            assert!(parts.pulls_same_as(reference), "parts pull the same as the reference");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "parse and parse_parts fail alike"),
        _ => panic!("parse and parse_parts disagree: {parsed:?} vs {parts:?}"),
    }
    let (Ok(reference), Ok(parts)) = (parsed, parts) else { return };
    let normalized = reference.normalized();
    let again = image::parse(&normalized)
        .unwrap_or_else(|e| panic!("normalised {normalized:?} parses: {e}"));
    assert_eq!(again, reference, "parse(normalized) round-trips");
    assert_eq!(again.normalized(), normalized, "normalisation is idempotent");
    assert!(reference.pulls_same_as(&again), "a reference pulls the same as itself");
    assert!(parts.registry_is(reference.registry()), "matches its own registry");
    assert!(parts.repository_is_under(reference.repository()), "under its own repository");
    // Matching against prefixes cut from the input must not panic.
    for cut in (0..=input.len()).filter(|&i| input.is_char_boundary(i)) {
        let _ = parts.registry_is(&input[..cut]);
        let _ = parts.repository_is_under(&input[cut..]);
    }
}

/// Calico selectors: never panics; printing round-trips; scoping is idempotent, and a
/// selector that parses stays parseable and leaves out pods labelled Windows once scoped.
pub fn selector(data: &[u8]) {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let parsed = selector::parse(input);
    if let Ok(expr) = &parsed {
        let printed = expr.to_string();
        let reparsed =
            selector::parse(&printed).unwrap_or_else(|e| panic!("printed {printed:?} parses: {e}"));
        assert_eq!(&reparsed, expr, "printing {printed:?} round-trips");
    }
    for key in OS_KEYS {
        let once = scope_selector(input, key);
        let twice = scope_selector(&once, key);
        assert_eq!(once, twice, "scoping with {key} is idempotent");
        if parsed.is_ok() {
            let scoped =
                selector::parse(&once).unwrap_or_else(|e| panic!("scoped {once:?} parses: {e}"));
            assert!(
                selector::has_scope_term(&scoped, key)
                    && selector::is_scoped_to_linux(&scoped, key),
                "scoped {once:?} leaves out pods labelled {key}=windows"
            );
        }
    }
}

/// Policy documents: never panics. The bytes are one source; a NUL splits them into two, so
/// duplicates across files are exercised too.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let sources = text
        .splitn(2, '\0')
        .enumerate()
        .map(|(i, part)| (format!("fuzz-{i}.yaml"), part.to_owned()))
        .collect::<Vec<_>>();
    let _ = load_sources(&sources);
}

/// Registry manifests and image configs, as a registry in scope may serve them: never panics;
/// an index's platforms are distinct and at most `INDEX_PLATFORMS_MAX`; every platform field
/// arcguard keeps (and quotes in denials and logs) is at most `PLATFORM_FIELD_MAX` bytes of
/// letters, digits and `._+-`.
pub fn manifest(data: &[u8]) {
    use arcguard::oci::manifest::{
        INDEX_PLATFORMS_MAX, PLATFORM_FIELD_MAX, Parsed, config_platform, media_type, parse,
    };
    use arcguard::rules::provenance::Platform;
    let field_ok = |field: &str| {
        field.len() <= PLATFORM_FIELD_MAX
            && field.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    };
    let check = |platform: &Platform| {
        let fields = [
            Some(platform.os.as_str()),
            Some(platform.architecture.as_str()),
            platform.variant.as_deref(),
            platform.os_version.as_deref(),
        ];
        for field in fields.into_iter().flatten() {
            assert!(field_ok(field), "a kept platform field breaks its bounds: {field:?}");
        }
    };
    let _ = media_type(data);
    if let Ok(Parsed::Index(platforms)) = parse(data) {
        assert!(platforms.len() <= INDEX_PLATFORMS_MAX, "{} platforms kept", platforms.len());
        let distinct: std::collections::BTreeSet<&Platform> = platforms.iter().collect();
        assert_eq!(distinct.len(), platforms.len(), "platforms are kept once each");
        platforms.iter().for_each(check);
    }
    if let Ok(platform) = config_platform(data) {
        check(&platform);
    }
}
