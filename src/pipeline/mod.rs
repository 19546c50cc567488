//! The review pipeline: from an AdmissionReview body to its response, through the request
//! view, the policies that apply and their verdicts and patches.
//!
//! Pure: AdmissionReview -> [`RequestView`] -> matching policies -> verdicts and patches ->
//! AdmissionResponse. The shells (HTTP server, `check`, cluster controllers) call it with the
//! policies in force and the facts they gathered.

pub mod patch;

use std::fmt::Write as _;

use base64::Engine as _;

use crate::admission::review::{self, AdmissionResponse, Operation, ReviewError};
use crate::admission::view::{self, RequestView};
use crate::admission::{Prepared, prepare};
use crate::policy::{Action, Outcome, PolicySet};
use crate::rules::Facts;

/// The two webhooks arcguard serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Webhook {
    /// `/validate`: allows or denies.
    Validate,
    /// `/mutate`: patches.
    Mutate,
}

impl Webhook {
    /// `validate` or `mutate`, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validate => "validate",
            Self::Mutate => "mutate",
        }
    }
}

/// One policy's result, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// `name` or `namespace/name`.
    pub policy: String,
    /// The rule block.
    pub rule: &'static str,
    /// The policy's action.
    pub action: Action,
    /// Whether it passed.
    pub passed: bool,
}

/// What was decided about a request, besides the response itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Kind label: an inspected kind, or `other`.
    pub kind: &'static str,
    /// Operation.
    pub operation: Operation,
    /// `namespace/name` of the object.
    pub object: String,
    /// Whether the response allows the request.
    pub allowed: bool,
    /// Whether the response carries a patch.
    pub patched: bool,
    /// Each applicable policy's result (validation only).
    pub results: Vec<PolicyOutcome>,
    /// Violations of Deny policies (validation only).
    pub denials: Vec<String>,
    /// Violations of Audit policies, to be logged.
    pub audits: Vec<String>,
}

/// The response to an AdmissionReview and its summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The response to send.
    pub response: AdmissionResponse,
    /// What happened, for logs and metrics.
    pub summary: Summary,
}

/// Reviews an AdmissionReview body with the policies in force.
///
/// # Errors
/// [`ReviewError`] when the body is not a valid AdmissionReview; the server answers 400.
pub fn review(
    webhook: Webhook,
    body: &[u8],
    policies: &PolicySet,
    facts: &dyn Facts,
) -> Result<Decision, ReviewError> {
    decide(webhook, &prepare(body)?, policies, facts)
}

/// Decides a prepared request with the policies in force and the facts gathered for it.
///
/// # Errors
/// [`ReviewError::InvalidObject`] when the object cannot be patched (it is not valid JSON).
pub fn decide(
    webhook: Webhook,
    prepared: &Prepared<'_>,
    policies: &PolicySet,
    facts: &dyn Facts,
) -> Result<Decision, ReviewError> {
    let request = &prepared.request;
    let view = prepared.view.as_ref();
    let mut summary = Summary {
        kind: view.map_or("other", |v| v.kind.as_str()),
        operation: request.operation,
        object: match (&request.namespace, &request.name) {
            (Some(ns), Some(name)) if !ns.is_empty() => format!("{ns}/{name}"),
            (_, Some(name)) => name.clone(),
            _ => String::new(),
        },
        allowed: true,
        patched: false,
        results: Vec::new(),
        denials: Vec::new(),
        audits: Vec::new(),
    };
    let mut response = AdmissionResponse::allow(request.uid.clone());
    let Some(view) = view else {
        return Ok(Decision { response, summary });
    };
    if summary.object.is_empty() || summary.object.ends_with('/') {
        summary.object = view.display_name();
    }
    match webhook {
        Webhook::Validate if matches!(view.subject, view::Subject::GuardPolicy(_)) => {
            // arcguard's own policies: refuse what would not compile, naming the field, so a
            // bad edit never reaches the controller.
            if let Err(problem) = crate::policy::check_document(view) {
                summary.denials = vec![problem];
                deny(&mut response, view, &summary.denials, 422, "Invalid");
            }
        }
        Webhook::Validate => {
            let evaluation = policies.validate(view, facts);
            summary.results = evaluation
                .results
                .iter()
                .map(|r| PolicyOutcome {
                    policy: r.policy.id(),
                    rule: r.policy.rule.name(),
                    action: r.policy.action,
                    passed: r.outcome == Outcome::Pass,
                })
                .collect();
            summary.audits = evaluation.audits();
            response.audit_annotations = audit_annotations(&evaluation, &summary.audits);
            response.warnings = capped(evaluation.warnings());
            summary.denials = evaluation.denials();
            if evaluation.is_denied() {
                deny(&mut response, view, &summary.denials, 403, "Forbidden");
                // The message is in the audit event's responseStatus; which policies denied
                // is said here, so the audit log answers "what does arcguard deny" per policy
                // even when arcguard's own log summarises a denial storm.
                let mut denying: Vec<String> = evaluation
                    .results
                    .iter()
                    .filter(|r| {
                        r.policy.action == Action::Deny && matches!(r.outcome, Outcome::Fail(_))
                    })
                    .map(|r| r.policy.id())
                    .collect();
                denying.dedup();
                response.audit_annotations.insert(
                    "denied-policies",
                    crate::text::prefix(&denying.join(","), MAX_AUDIT_ANNOTATION_BYTES).to_owned(),
                );
            }
        }
        Webhook::Mutate => {
            let mutations = policies.mutate(view, facts);
            let invalid = |source| ReviewError::InvalidObject {
                field: "object",
                kind: request.kind.kind.clone(),
                source,
            };
            let patch = match patch::direct(view, &mutations) {
                Some(patch) => patch,
                // The view cannot tell where the operations go: diff against the object.
                None => match review::raw_object(prepared.body, request.object).map_err(invalid)? {
                    Some(object) => patch::build(object, &mutations).map_err(invalid)?,
                    None => None,
                },
            };
            if let Some(patch) = patch {
                // Serialising a JSON Patch of strings and values cannot fail.
                let bytes = serde_json::to_vec(&patch).unwrap_or_default();
                response.patch_type = Some("JSONPatch");
                response.patch = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
        }
    }
    summary.allowed = response.allowed;
    summary.patched = response.patch.is_some();
    Ok(Decision { response, summary })
}

/// Turns `response` into a denial with the message listing `denials`.
fn deny(
    response: &mut AdmissionResponse,
    view: &RequestView,
    denials: &[String],
    code: u16,
    reason: &'static str,
) {
    response.allowed = false;
    response.status = Some(review::Status { code, message: denial_message(view, denials), reason });
}

/// Violations listed in one denial message, and warnings in one response: the message goes to
/// kubectl, the audit log and events, so a pod with thousands of bad containers must not make
/// it megabytes long.
pub const MAX_LISTED: usize = 50;

/// The message a denied user reads: what was denied, then each violation and what to change
/// (at most [`MAX_LISTED`], then how many more).
pub fn denial_message(view: &RequestView, denials: &[String]) -> String {
    let listed: usize =
        denials.iter().take(MAX_LISTED).map(|denial| denial.len().min(MAX_ITEM_BYTES) + 12).sum();
    let mut message = String::with_capacity(64 + listed);
    // Writing into a String cannot fail.
    let _ = write!(
        message,
        "arcguard denied {} {} {}:",
        view.operation.as_str().to_lowercase(),
        view.kind.as_str(),
        view.display_name()
    );
    for denial in denials.iter().take(MAX_LISTED) {
        message.push_str("\n- ");
        message.push_str(&item(denial));
    }
    if denials.len() > MAX_LISTED {
        let _ = write!(message, "\n- and {} more violations", denials.len() - MAX_LISTED);
    }
    message
}

/// The longest value of an audit annotation, in bytes: the apiserver keeps audit events in
/// memory and writes them to every audit backend, so a pod with thousands of violations must
/// not make each event megabytes long.
pub const MAX_AUDIT_ANNOTATION_BYTES: usize = 4096;

/// The AdmissionResponse's `auditAnnotations` for violations of Audit policies (the request is
/// admitted; the apiserver's audit log then says what an Audit policy found, next to who made
/// the request): `audit-policies`, the policies that failed, comma-separated, and
/// `audit-violations`, the violations (`[policy] message`) separated by `; `, cut at
/// [`MAX_AUDIT_ANNOTATION_BYTES`] with a count of what was left out. Empty when no Audit policy
/// failed. A denial adds `denied-policies`, the Deny policies that failed.
fn audit_annotations(
    evaluation: &crate::policy::Evaluation<'_>,
    audits: &[String],
) -> std::collections::BTreeMap<&'static str, String> {
    let mut annotations = std::collections::BTreeMap::new();
    if audits.is_empty() {
        return annotations;
    }
    let mut policies: Vec<String> = evaluation
        .results
        .iter()
        .filter(|r| r.policy.action == Action::Audit && matches!(r.outcome, Outcome::Fail(_)))
        .map(|r| r.policy.id())
        .collect();
    policies.dedup();
    annotations.insert(
        "audit-policies",
        crate::text::prefix(&policies.join(","), MAX_AUDIT_ANNOTATION_BYTES).to_owned(),
    );
    let mut violations = String::new();
    for (listed, audit) in audits.iter().enumerate() {
        let separator = if violations.is_empty() { "" } else { "; " };
        let left = audits.len() - listed;
        // Room for this one, and for the note that would follow if it is not the last.
        let note = format!("; and {left} more");
        if violations.len() + separator.len() + audit.len() + note.len()
            > MAX_AUDIT_ANNOTATION_BYTES
        {
            violations.push_str(if violations.is_empty() { &note[2..] } else { &note });
            break;
        }
        violations.push_str(separator);
        violations.push_str(audit);
    }
    annotations.insert("audit-violations", violations);
    annotations
}

/// The longest violation or warning listed, in bytes; longer ones are cut. A rule's own text is
/// far shorter; this bounds what a rule quotes (a registry's answer, an object's field) even
/// if its own cap is missed.
pub const MAX_ITEM_BYTES: usize = 4096;

/// `text` cut to [`MAX_ITEM_BYTES`] on a character boundary, marked when cut.
fn item(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_ITEM_BYTES {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(format!("{}… (cut)", crate::text::prefix(text, MAX_ITEM_BYTES)))
}

/// At most [`MAX_LISTED`] warnings, each at most [`MAX_ITEM_BYTES`], then one saying how many
/// more.
fn capped(mut warnings: Vec<String>) -> Vec<String> {
    for warning in &mut warnings {
        if warning.len() > MAX_ITEM_BYTES {
            *warning = item(warning).into_owned();
        }
    }
    if warnings.len() > MAX_LISTED {
        let more = warnings.len() - MAX_LISTED;
        warnings.truncate(MAX_LISTED);
        warnings.push(format!("and {more} more warnings"));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load::cluster_policies as policies;

    #[test]
    fn warnings_beyond_the_cap_are_counted_not_listed() {
        let few: Vec<String> = (0..3).map(|i| format!("w{i}")).collect();
        assert_eq!(capped(few.clone()), few);
        let many: Vec<String> = (0..MAX_LISTED + 7).map(|i| format!("w{i}")).collect();
        let capped = capped(many);
        assert_eq!(capped.len(), MAX_LISTED + 1);
        assert_eq!(capped[MAX_LISTED], "and 7 more warnings");
        // Each is cut to MAX_ITEM_BYTES, on a character boundary.
        let long = vec!["ü".repeat(MAX_ITEM_BYTES)];
        let cut = super::capped(long);
        assert!(
            cut[0].ends_with("… (cut)") && cut[0].len() <= MAX_ITEM_BYTES + 10,
            "{}",
            cut[0].len()
        );
    }

    #[test]
    fn a_denial_names_a_pod_by_its_generate_name_when_its_name_is_empty() {
        let set = policies(&[("trusted", "  trustedRegistries: {registries: [a.io]}\n")]);
        let facts = crate::rules::StaticFacts::default();
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pod-create-untrusted.json"
        ))
        .expect("fixture");
        let mut document: serde_json::Value = serde_json::from_slice(&body).expect("json");
        for (name, shown) in [
            (serde_json::json!(""), "Pod shop/web-7c9d8f6b5d-:"),
            (serde_json::Value::Null, "Pod shop/web-7c9d8f6b5d-:"),
            (serde_json::json!("web-1"), "Pod shop/web-1:"),
        ] {
            let metadata = &mut document["request"]["object"]["metadata"];
            metadata["name"] = name;
            metadata["generateName"] = serde_json::json!("web-7c9d8f6b5d-");
            let body = serde_json::to_vec(&document).expect("json");
            let decision = review(Webhook::Validate, &body, &set, &facts).expect("reviews");
            let message = decision.response.status.expect("denied").message;
            assert!(message.contains(shown), "{shown}: {message}");
        }
    }

    fn pod_review(images: &[String]) -> Vec<u8> {
        let containers: Vec<serde_json::Value> = images
            .iter()
            .enumerate()
            .map(|(i, image)| serde_json::json!({"name": format!("c{i}"), "image": image}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u1", "operation": "CREATE", "namespace": "shop",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "userInfo": {"username": "alice"},
                "object": {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": "web", "namespace": "shop"},
                           "spec": {"containers": containers}}
            }
        }))
        .expect("json")
    }

    #[test]
    fn audit_violations_reach_the_apiservers_audit_log_as_audit_annotations() {
        let set = policies(&[
            ("audit-a", "  action: Audit\n  trustedRegistries: {registries: [a.io]}\n"),
            ("audit-b", "  action: Audit\n  trustedRegistries: {registries: [b.io]}\n"),
            ("warn-c", "  action: Warn\n  trustedRegistries: {registries: [c.io]}\n"),
        ]);
        let facts = crate::rules::StaticFacts::default();
        let decision =
            review(Webhook::Validate, &pod_review(&["d.io/app:1".to_owned()]), &set, &facts)
                .expect("reviews");
        assert!(decision.response.allowed);
        let annotations = &decision.response.audit_annotations;
        assert_eq!(annotations.get("audit-policies").map(String::as_str), Some("audit-a,audit-b"));
        let violations = &annotations["audit-violations"];
        assert!(violations.starts_with("[audit-a] container \"c0\""), "{violations}");
        assert!(violations.contains("; [audit-b] "), "{violations}");
        assert!(
            !violations.contains("warn-c"),
            "Warn findings are warnings, not audit: {violations}"
        );
        let body =
            String::from_utf8(crate::admission::review::encode(&decision.response)).expect("utf-8");
        assert!(body.contains("\"auditAnnotations\":{\"audit-policies\":"), "{body}");
        assert!(!annotations.contains_key("denied-policies"), "admitted");

        // A denial names the Deny policies that denied, next to the status message.
        let with_deny = policies(&[
            ("audit-a", "  action: Audit\n  trustedRegistries: {registries: [a.io]}\n"),
            ("deny-e", "  trustedRegistries: {registries: [e.io]}\n"),
            ("deny-f", "  trustedRegistries: {registries: [d.io]}\n"),
        ]);
        let denied =
            review(Webhook::Validate, &pod_review(&["d.io/app:1".to_owned()]), &with_deny, &facts)
                .expect("reviews");
        assert!(!denied.response.allowed);
        assert_eq!(
            denied.response.audit_annotations.get("denied-policies").map(String::as_str),
            Some("deny-e")
        );
        assert_eq!(
            denied.response.audit_annotations.get("audit-policies").map(String::as_str),
            Some("audit-a")
        );

        // Nothing to say: no field at all.
        let clean = review(
            Webhook::Validate,
            &pod_review(&["a.io/x:1".to_owned()]),
            &policies(&[(
                "audit-a",
                "  action: Audit\n  trustedRegistries: {registries: [a.io]}\n",
            )]),
            &facts,
        )
        .expect("reviews");
        assert!(clean.response.audit_annotations.is_empty());
        let body =
            String::from_utf8(crate::admission::review::encode(&clean.response)).expect("utf-8");
        assert!(!body.contains("auditAnnotations"), "{body}");
    }

    #[test]
    fn audit_annotations_are_cut_with_a_count_of_what_was_left_out() {
        let set =
            policies(&[("audit", "  action: Audit\n  trustedRegistries: {registries: [a.io]}\n")]);
        let images: Vec<String> = (0..500).map(|i| format!("z.io/app-{i}:1")).collect();
        let decision = review(
            Webhook::Validate,
            &pod_review(&images),
            &set,
            &crate::rules::StaticFacts::default(),
        )
        .expect("reviews");
        let violations = &decision.response.audit_annotations["audit-violations"];
        assert!(violations.len() <= MAX_AUDIT_ANNOTATION_BYTES, "{}", violations.len());
        let (listed, rest) = violations.rsplit_once("; and ").expect("a count of the rest");
        let more: usize = rest.trim_end_matches(" more").parse().expect("a count");
        assert_eq!(
            listed.matches("[audit]").count() + more,
            500,
            "every violation listed or counted"
        );
    }
}
