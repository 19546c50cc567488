//! The background audit: what already exists, judged against the policies in force.
//!
//! Admission judges writes; an operator who adds or tightens a policy also asks what already
//! running breaks it. [`audit_object`] judges one existing object exactly as the validating
//! webhook would judge its creation (the same view, the same policies, the same facts), and
//! returns one [`Finding`] per policy that applies to it. [`findings`] holds a scope's findings
//! in bounded memory (the entries listed, counts of all). [`report`] turns the findings of a
//! namespace into one OpenReports `Report` (a `ClusterReport` for cluster-scoped objects).
//!
//! [`output`] groups findings by object and prints them for `arcguard audit`.
//!
//! Pure: no I/O and no clock. The shells list the objects (cluster mode's leader, `arcguard
//! audit`) and write what this returns.

pub mod findings;
pub mod output;
pub mod report;

use serde::Serialize;
use serde_json::{Value, json};

use crate::admission::view::RequestView;
use crate::admission::{self, Kind};
use crate::manifest;
use crate::policy::{Action, Outcome, PolicySet};
use crate::rules::Facts;

/// An OpenReports result value (`openreports.io/v1alpha1` `ReportResult.result`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditResult {
    /// A Deny or Audit policy found a violation.
    Fail,
    /// A Warn policy found a violation.
    Warn,
    /// No violation.
    Pass,
}

impl AuditResult {
    /// The value as OpenReports spells it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Warn => "warn",
            Self::Pass => "pass",
        }
    }
}

/// The severity of a finding (`ReportResult.severity`), from the policy's action: a violation
/// of a Deny policy is `high` (admission would refuse the object now), of an Audit policy
/// `medium` (it would be refused once the policy is switched to Deny), of a Warn policy `low`.
#[must_use]
pub fn severity(action: Action) -> &'static str {
    match action {
        Action::Deny => "high",
        Action::Audit => "medium",
        Action::Warn => "low",
    }
}

/// The object a finding is about, as an ObjectReference names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace`; `None` for cluster-scoped objects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid` (empty for a manifest that was never stored).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

impl Subject {
    /// `namespace/name`, or `name`.
    #[must_use]
    pub fn display(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// What one policy concluded about one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// The policy: `name`, or `namespace/name` for a GuardPolicy.
    pub policy: String,
    /// Its rule block (`trustedRegistries`, `gmsa`, `calicoLinuxOnly`).
    pub rule: &'static str,
    /// Its action.
    pub action: Action,
    /// The result.
    pub result: AuditResult,
    /// What is wrong and what to change (violations joined by `; `), or that it passed.
    pub message: String,
}

/// Why an object could not be audited.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The object has no apiVersion, kind or name.
    #[error("not a Kubernetes object: apiVersion, kind and metadata.name are required")]
    NotAnObject,
    /// The object does not decode as its kind (the message names the field).
    #[error("{subject}: {message}")]
    Invalid {
        /// `Kind namespace/name`.
        subject: String,
        /// What is wrong.
        message: String,
    },
}

/// The subject of `object`, and whether arcguard inspects its kind.
///
/// # Errors
/// [`AuditError::NotAnObject`] without apiVersion, kind or name.
pub fn subject_of(object: &Value) -> Result<(Subject, bool), AuditError> {
    let (api_version, kind) = manifest::type_of(object);
    let name = object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    if api_version.is_empty() || kind.is_empty() || name.is_empty() {
        return Err(AuditError::NotAnObject);
    }
    let (group, _) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .map(str::to_owned);
    let uid = object.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
    let subject = Subject {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        namespace,
        name: name.to_owned(),
        uid: uid.to_owned(),
    };
    let inspected = Kind::recognise(group, kind, None).is_some();
    Ok((subject, inspected))
}

/// One existing object, ready to be judged: its subject and the CREATE AdmissionReview the
/// validating webhook would receive for it.
#[derive(Clone, Debug)]
pub struct Audit {
    /// The object.
    pub subject: Subject,
    body: String,
}

impl Audit {
    /// The audit of `object`; `None` for a kind arcguard does not inspect.
    ///
    /// # Errors
    /// [`AuditError::NotAnObject`] without apiVersion, kind or name.
    pub fn of(object: &Value) -> Result<Option<Self>, AuditError> {
        let (subject, inspected) = subject_of(object)?;
        if !inspected {
            return Ok(None);
        }
        let (group, version) =
            subject.api_version.rsplit_once('/').unwrap_or(("", &subject.api_version));
        let body = json!({
            "apiVersion": admission::review::API_VERSION,
            "kind": admission::review::KIND,
            "request": {
                "uid": "audit",
                "kind": {"group": group, "version": version, "kind": subject.kind},
                "operation": "CREATE",
                "namespace": subject.namespace.clone().unwrap_or_default(),
                "name": subject.name,
                "object": object,
            }
        })
        .to_string();
        Ok(Some(Self { subject, body }))
    }

    /// The request as the webhook would decode it (its view is what facts are gathered for).
    ///
    /// # Errors
    /// [`AuditError::Invalid`] when the object does not decode as its kind.
    pub fn prepare(&self) -> Result<admission::Prepared<'_>, AuditError> {
        admission::prepare(self.body.as_bytes()).map_err(|e| AuditError::Invalid {
            subject: format!("{} {}", self.subject.kind, self.subject.display()),
            message: e.to_string(),
        })
    }
}

/// The longest message a finding keeps, in bytes: a violation can quote a whole registry list,
/// and an object can have thousands of containers; what the audit holds and reports per
/// (policy, object) stays bounded.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `message` cut to [`MAX_MESSAGE_BYTES`] on a character boundary, saying it was cut.
fn capped(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_owned();
    }
    format!("{} [cut]", crate::text::prefix(message, MAX_MESSAGE_BYTES - 16))
}

/// Judges a view with every policy that applies to it: one [`Finding`] per policy.
#[must_use]
pub fn judge(view: &RequestView, policies: &PolicySet, facts: &dyn Facts) -> Vec<Finding> {
    let evaluation = policies.validate(view, facts);
    evaluation
        .results
        .iter()
        .map(|r| {
            let (result, message) = match &r.outcome {
                Outcome::Pass => (AuditResult::Pass, "passed".to_owned()),
                Outcome::Fail(messages) => {
                    let result = if r.policy.action == Action::Warn {
                        AuditResult::Warn
                    } else {
                        AuditResult::Fail
                    };
                    (result, capped(&messages.join("; ")))
                }
            };
            Finding {
                policy: r.policy.id(),
                rule: r.policy.rule.name(),
                action: r.policy.action,
                result,
                message,
            }
        })
        .collect()
}

/// Audits one existing object with facts known up front: every policy that applies to it,
/// judged as the validating webhook judges a CREATE of it. Empty for a kind arcguard does not
/// inspect and for an object no policy applies to.
///
/// # Errors
/// [`AuditError`] when the object is not a Kubernetes object or does not decode as its kind.
pub fn audit_object(
    object: &Value,
    policies: &PolicySet,
    facts: &dyn Facts,
) -> Result<(Subject, Vec<Finding>), AuditError> {
    let Some(audit) = Audit::of(object)? else {
        return Ok((subject_of(object)?.0, Vec::new()));
    };
    if policies.is_empty() {
        return Ok((audit.subject, Vec::new()));
    }
    let prepared = audit.prepare()?;
    let findings = prepared.view.as_ref().map(|v| judge(v, policies, facts)).unwrap_or_default();
    Ok((audit.subject.clone(), findings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load::cluster_policies as policies;
    use crate::rules::StaticFacts;

    fn pod(namespace: &str, name: &str, image: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
               "spec": {"containers": [{"name": "app", "image": image}]}})
    }

    #[test]
    fn each_action_reports_as_its_result_with_the_violation() {
        let set = policies(&[
            ("deny", "  action: Deny\n  trustedRegistries: {registries: [a.io]}\n"),
            ("audit", "  action: Audit\n  trustedRegistries: {registries: [a.io]}\n"),
            ("warn", "  action: Warn\n  trustedRegistries: {registries: [a.io]}\n"),
        ]);
        let facts = StaticFacts::default();
        let (subject, findings) =
            audit_object(&pod("shop", "web", "b.io/app:1"), &set, &facts).expect("audits");
        assert_eq!(subject.display(), "shop/web");
        assert_eq!(subject.uid, "uid-web");
        let seen: Vec<(&str, AuditResult)> =
            findings.iter().map(|f| (f.policy.as_str(), f.result)).collect();
        assert_eq!(
            seen,
            [
                ("audit", AuditResult::Fail),
                ("deny", AuditResult::Fail),
                ("warn", AuditResult::Warn)
            ]
        );
        assert!(findings[0].message.contains("\"b.io/app:1\""), "{:?}", findings[0]);
        assert_eq!(
            [severity(Action::Deny), severity(Action::Audit), severity(Action::Warn)],
            ["high", "medium", "low"]
        );

        let (_, clean) = audit_object(&pod("shop", "ok", "a.io/app:1"), &set, &facts).expect("ok");
        assert!(clean.iter().all(|f| f.result == AuditResult::Pass && f.message == "passed"));
    }

    #[test]
    fn only_inspected_kinds_that_a_policy_matches_have_findings() {
        let set = policies(&[(
            "scoped",
            "  match: {namespaces: [shop]}\n  trustedRegistries: {registries: [a.io]}\n",
        )]);
        let facts = StaticFacts::default();
        let (_, elsewhere) =
            audit_object(&pod("other", "web", "b.io/x:1"), &set, &facts).expect("ok");
        assert!(elsewhere.is_empty(), "not matched: {elsewhere:?}");
        let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "shop"}});
        let (subject, none) = audit_object(&config, &set, &facts).expect("ok");
        assert!(none.is_empty());
        assert_eq!(subject.kind, "ConfigMap");
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "shop"},
            "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "image": "b.io/x:1"}]}}}});
        let (_, findings) = audit_object(&deployment, &set, &facts).expect("ok");
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].result, AuditResult::Fail, "a workload's template is audited");
    }

    #[test]
    fn a_long_message_is_cut_on_a_character_boundary() {
        assert_eq!(capped("short"), "short");
        let cut = capped(&"é".repeat(2000));
        assert!(cut.len() <= MAX_MESSAGE_BYTES && cut.ends_with(" [cut]"), "{}", cut.len());
        let set = policies(&[("p", "  trustedRegistries: {registries: [a.io]}\n")]);
        let containers: Vec<Value> = (0..200)
            .map(|i| json!({"name": format!("c{i}"), "image": format!("z.io/app-{i}:1")}))
            .collect();
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "big", "namespace": "n"},
                         "spec": {"containers": containers}});
        let (_, findings) = audit_object(&pod, &set, &StaticFacts::default()).expect("audits");
        assert!(findings[0].message.len() <= MAX_MESSAGE_BYTES, "{}", findings[0].message.len());
    }

    #[test]
    fn objects_that_are_not_kubernetes_objects_or_do_not_decode_are_errors() {
        let set = policies(&[("p", "  trustedRegistries: {registries: [a.io]}\n")]);
        let facts = StaticFacts::default();
        assert!(matches!(
            audit_object(&json!({"kind": "Pod"}), &set, &facts),
            Err(AuditError::NotAnObject)
        ));
        let broken = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "n"},
                            "spec": {"containers": "not a list"}});
        let error = audit_object(&broken, &set, &facts).expect_err("does not decode");
        assert!(error.to_string().starts_with("Pod n/x: "), "{error}");
    }
}
