//! `arcguard check`: evaluates manifests as the cluster would admit them, for CI.
//!
//! Every object goes through the same pipeline as a live request: a CREATE AdmissionReview
//! is built for it, the mutating webhook's patch is applied, and the patched object is
//! validated.
//!
//! imageProvenance policies read registries only when asked (`--registry`): [`registry_needs`]
//! says which images (and signatures) the objects ask about, the shell reads those, and the
//! check runs on what was read. Without it their checks are skipped and
//! [`SKIPPED_REGISTRIES`] says so.

use std::fmt::Write as _;

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};

use crate::admission;
use crate::manifest::{self, ManifestError};
use crate::pipeline::{self, Webhook};
use crate::policy::PolicySet;
use crate::rules::{FactNeeds, Facts, StaticFacts};

/// The note printed when imageProvenance policies were not checked against registries.
pub const SKIPPED_REGISTRIES: &str =
    "imageProvenance policies were not checked: registries are read only with --registry";

/// One input: a file name (or `-`) and its text.
#[derive(Clone, Debug)]
pub struct Input {
    /// File name, `-` for standard input.
    pub name: String,
    /// Its text.
    pub text: String,
}

/// Why an input could not be checked (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// An input is not valid YAML or JSON.
    #[error("{name}: {source}")]
    Manifest {
        /// The input.
        name: String,
        /// The parse error.
        #[source]
        source: ManifestError,
    },
    /// An object is not a Kubernetes object, or does not decode as its kind.
    #[error("{name}: object {index}: {message}")]
    Object {
        /// The input.
        name: String,
        /// 1-based index of the object in the input.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

/// What became of one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Admitted with no finding.
    Pass,
    /// Admitted with warnings.
    Warn,
    /// Denied.
    Deny,
    /// Not a kind arcguard inspects.
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Warn => "WARN",
            Self::Deny => "DENY",
            Self::Skip => "SKIP",
        }
    }
}

/// The result for one object.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The input it came from.
    pub file: String,
    /// 1-based index of the object in that input.
    pub index: usize,
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `namespace/name`, or `name`.
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Violations of Deny policies.
    pub violations: Vec<String>,
    /// Warnings (Warn policies and advisories).
    pub warnings: Vec<String>,
    /// Violations of Audit policies.
    pub audits: Vec<String>,
    /// The JSON Patch the mutating webhook would apply, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<Value>,
}

/// Checks every object of every input.
///
/// # Errors
/// [`CheckError`] for the first input or object that is not valid.
pub fn check(
    inputs: &[Input],
    policies: &PolicySet,
    facts: &dyn Facts,
) -> Result<Vec<Report>, CheckError> {
    let mut reports = Vec::new();
    for input in inputs {
        let objects = manifest::parse(&input.text)
            .map_err(|source| CheckError::Manifest { name: input.name.clone(), source })?;
        for (i, object) in objects.into_iter().enumerate() {
            let fail = |message: String| CheckError::Object {
                name: input.name.clone(),
                index: i + 1,
                message,
            };
            reports.push(check_object(&input.name, i + 1, object, policies, facts).map_err(fail)?);
        }
    }
    Ok(reports)
}

/// An object's type and name, as a review of it carries them.
struct Described {
    api_version: String,
    kind: String,
    group: String,
    version: String,
    name: String,
    namespace: String,
}

impl Described {
    fn of(object: &Value) -> Result<Self, String> {
        let (api_version, kind) = manifest::type_of(object);
        let (api_version, kind) = (api_version.to_owned(), kind.to_owned());
        if api_version.is_empty() || kind.is_empty() {
            return Err("not a Kubernetes object: apiVersion and kind are required".into());
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
        let (group, version) = (group.to_owned(), version.to_owned());
        let name =
            object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
        let namespace = if kind == "GlobalNetworkPolicy" {
            String::new()
        } else {
            let ns =
                object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
            ns.to_owned()
        };
        Ok(Self { api_version, kind, group, version, name, namespace })
    }

    /// Whether arcguard inspects the kind.
    fn inspected(&self) -> bool {
        admission::Kind::recognise(&self.group, &self.kind, None).is_some()
    }

    /// A CREATE AdmissionReview of `object`.
    fn review(&self, index: usize, object: &Value) -> String {
        json!({
            "apiVersion": admission::review::API_VERSION,
            "kind": admission::review::KIND,
            "request": {
                "uid": format!("check-{index}"),
                "kind": {"group": self.group, "version": self.version, "kind": self.kind},
                "operation": "CREATE",
                "namespace": self.namespace,
                "name": self.name,
                "object": object,
            }
        })
        .to_string()
    }
}

fn check_object(
    file: &str,
    index: usize,
    mut object: Value,
    policies: &PolicySet,
    facts: &dyn Facts,
) -> Result<Report, String> {
    let described = Described::of(&object)?;
    let display = if described.namespace.is_empty() {
        described.name.clone()
    } else {
        format!("{}/{}", described.namespace, described.name)
    };
    let mut report = Report {
        file: file.to_owned(),
        index,
        api_version: described.api_version.clone(),
        kind: described.kind.clone(),
        name: display,
        verdict: Verdict::Skip,
        violations: Vec::new(),
        warnings: Vec::new(),
        audits: Vec::new(),
        patch: None,
    };
    if !described.inspected() {
        return Ok(report);
    }
    let mutated = pipeline::review(
        Webhook::Mutate,
        described.review(index, &object).as_bytes(),
        policies,
        facts,
    )
    .map_err(|e| e.to_string())?;
    if let Some(encoded) = &mutated.response.patch {
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|e| e.to_string())?;
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        json_patch::patch(&mut object, &patch).map_err(|e| format!("patch does not apply: {e}"))?;
        report.patch = serde_json::to_value(&patch).ok();
    }
    let validated = pipeline::review(
        Webhook::Validate,
        described.review(index, &object).as_bytes(),
        policies,
        facts,
    )
    .map_err(|e| e.to_string())?;
    report.warnings = validated.response.warnings.clone();
    report.audits = validated.summary.audits.clone();
    report.violations = validated.summary.denials.clone();
    report.verdict = if !validated.response.allowed {
        Verdict::Deny
    } else if report.warnings.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Warn
    };
    Ok(report)
}

/// Whether any object was denied (exit code 1).
pub fn any_denied(reports: &[Report]) -> bool {
    reports.iter().any(|r| r.verdict == Verdict::Deny)
}

/// What each object of `inputs` needs read from registries under `policies` (images and their
/// signatures), as a CREATE of it asks for it: one entry per object that needs any, each read
/// as one admission request would be (its own deadline, its own 64-image bound).
///
/// # Errors
/// [`CheckError`] as [`check`].
pub fn registry_needs(
    inputs: &[Input],
    policies: &PolicySet,
    facts: &StaticFacts,
) -> Result<Vec<FactNeeds>, CheckError> {
    let mut each = Vec::new();
    for input in inputs {
        let objects = manifest::parse(&input.text)
            .map_err(|source| CheckError::Manifest { name: input.name.clone(), source })?;
        for (i, object) in objects.into_iter().enumerate() {
            let fail = |message: String| CheckError::Object {
                name: input.name.clone(),
                index: i + 1,
                message,
            };
            let described = Described::of(&object).map_err(fail)?;
            if !described.inspected() {
                continue;
            }
            let review = described.review(i + 1, &object);
            let prepared =
                admission::prepare(review.as_bytes()).map_err(|e| fail(e.to_string()))?;
            if let Some(view) = &prepared.view {
                let found = policies.needs(view, facts);
                if !found.images.is_empty() {
                    each.push(FactNeeds {
                        images: found.images,
                        signatures: found.signatures,
                        ..FactNeeds::default()
                    });
                }
            }
        }
    }
    Ok(each)
}

/// One line per object, then one indented line per finding, then the notes (what was not
/// checked).
pub fn render_text(reports: &[Report], notes: &[&str]) -> String {
    let mut out = String::new();
    for r in reports {
        let _ =
            writeln!(out, "{} {} {} ({}#{})", r.verdict.label(), r.kind, r.name, r.file, r.index);
        for v in &r.violations {
            let _ = writeln!(out, "  deny: {v}");
        }
        for w in &r.warnings {
            let _ = writeln!(out, "  warn: {w}");
        }
        for a in &r.audits {
            let _ = writeln!(out, "  audit: {a}");
        }
    }
    let count = |v| reports.iter().filter(|r| r.verdict == v).count();
    let _ = writeln!(
        out,
        "{} {}: {} denied, {} warned, {} passed, {} not inspected",
        reports.len(),
        if reports.len() == 1 { "object" } else { "objects" },
        count(Verdict::Deny),
        count(Verdict::Warn),
        count(Verdict::Pass),
        count(Verdict::Skip)
    );
    for note in notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

/// The reports as a JSON document: `{"results": [...], "denied": bool, "notes": [...]}`.
pub fn render_json(reports: &[Report], notes: &[&str]) -> String {
    let doc = json!({"results": reports, "denied": any_denied(reports), "notes": notes});
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}
