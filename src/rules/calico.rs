//! calicoLinuxOnly: Calico and Kubernetes network policies apply to Linux pods only.
//!
//! Calico's Windows dataplane silently skips the rules it cannot render, so a policy that
//! selects Windows pods may leave them more open than it says. The rule labels each pod with
//! its OS (`osLabelKey`, from the signals [`os::detect`] trusts), scopes every policy's subject
//! selector to `osLabelKey == 'linux'` (or denies unscoped ones), denies policies written for
//! Windows pods, and keeps pods from falsifying or dropping the label.
//!
//! Policies with `preDNAT: true` or `doNotTrack: true` apply to host endpoints only, and host
//! endpoints never carry a pod OS label: they are neither scoped (that would make them select
//! nothing) nor judged on what they select; only their selector's syntax is checked.

pub mod selector;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::selector::Expr;
use super::{FieldError, Findings, Mutation, os};
use crate::admission::objects::{CalicoPolicySpec, LabelSelector, SelectorRequirement};
use crate::admission::review::Operation;
use crate::admission::view::{Kind, PodView, PolicySubject, RequestView, Subject};

/// The default OS label key.
pub const DEFAULT_OS_LABEL_KEY: &str = "arcguard.io/os";

/// The OS label value of Linux pods, the only ones Calico policy applies to.
const LINUX: &str = "linux";

/// Why Calico policy must not select Windows pods, for violation messages.
const LINUX_ONLY: &str = "Calico network policy applies to Linux pods only on this platform \
     (its Windows dataplane skips rules it cannot render)";

/// How network policies are scoped to Linux pods.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ScopePolicies {
    /// The mutating webhook appends the Linux clause to every policy's subject selector.
    #[default]
    Mutate,
    /// The validating webhook denies policies whose subject selector is not scoped to Linux.
    Validate,
}

/// The `calicoLinuxOnly` rule block.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoLinuxOnlySpec {
    /// The pod label that carries the pod's OS (`linux` or `windows`).
    #[serde(default = "default_os_label_key")]
    pub os_label_key: String,
    /// Whether the mutating webhook sets the OS label on pods.
    #[serde(default = "default_true")]
    pub label_pods: bool,
    /// How network policies are scoped to Linux pods.
    #[serde(default)]
    pub scope_policies: ScopePolicies,
}

impl Default for CalicoLinuxOnlySpec {
    fn default() -> Self {
        Self {
            os_label_key: default_os_label_key(),
            label_pods: true,
            scope_policies: ScopePolicies::default(),
        }
    }
}

fn default_os_label_key() -> String {
    DEFAULT_OS_LABEL_KEY.to_owned()
}

fn default_true() -> bool {
    true
}

/// A compiled `calicoLinuxOnly` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct CalicoLinuxOnly {
    spec: CalicoLinuxOnlySpec,
}

impl CalicoLinuxOnly {
    /// Compiles the rule block.
    ///
    /// # Errors
    /// [`FieldError`] naming the first invalid field: `osLabelKey` when it is not a valid
    /// Kubernetes label key.
    pub fn compile(spec: &CalicoLinuxOnlySpec) -> Result<Self, FieldError> {
        crate::names::check_label_key(&spec.os_label_key).map_err(|why| {
            FieldError::new(
                "osLabelKey",
                format!(
                    "{:?} is not a valid Kubernetes label key: {why}; use an optional DNS \
                     subdomain prefix, `/` and a name, e.g. {DEFAULT_OS_LABEL_KEY:?}",
                    spec.os_label_key
                ),
            )
        })?;
        Ok(Self { spec: spec.clone() })
    }

    /// The pod label that carries the pod's OS.
    pub fn os_label_key(&self) -> &str {
        &self.spec.os_label_key
    }

    /// Violations of the rule by the object under review.
    pub fn validate(&self, view: &RequestView) -> Findings {
        let violations = match &view.subject {
            Subject::Pod(pod) if view.kind == Kind::Pod => self.validate_pod(view.operation, pod),
            Subject::NetworkPolicy(PolicySubject::Calico { spec, .. }) => {
                self.validate_calico(spec)
            }
            Subject::NetworkPolicy(PolicySubject::Kubernetes { pod_selector }) => {
                self.validate_kubernetes(pod_selector.as_ref())
            }
            _ => None,
        };
        Findings { violations: violations.into_iter().collect(), advisories: Vec::new() }
    }

    /// The changes this rule makes to the object under review.
    pub fn mutate(&self, view: &RequestView) -> Vec<Mutation> {
        let key = &self.spec.os_label_key;
        let mutation = match &view.subject {
            // Only a live pod's creation: templates are labelled when their pods are created,
            // and a pod's OS signals (spec.os, nodeSelector, affinity) are immutable once
            // created, apart from scheduling-gated pods, which validation asks to relabel.
            Subject::Pod(pod)
                if self.spec.label_pods
                    && view.kind == Kind::Pod
                    && view.operation == Operation::Create =>
            {
                let value = os::detect(&pod.spec).as_str();
                (pod.labels.get(key).map(String::as_str) != Some(value)).then(|| {
                    Mutation::SetLabel {
                        labels_pointer: pod.labels_pointer(),
                        key: key.clone(),
                        value: value.to_owned(),
                    }
                })
            }
            Subject::NetworkPolicy(policy) if self.spec.scope_policies == ScopePolicies::Mutate => {
                match policy {
                    PolicySubject::Calico { spec, .. } => {
                        let current = spec.selector.as_deref().unwrap_or_default();
                        let unchanged = scope_selector(current, key) == current;
                        (!unchanged && !is_host_endpoint_only(spec))
                            .then(|| Mutation::ScopeCalicoSelector { key: key.clone() })
                    }
                    PolicySubject::Kubernetes { pod_selector } => {
                        let wanted = linux_selector_requirement(key);
                        let scoped = pod_selector
                            .as_ref()
                            .is_some_and(|s| s.match_expressions.contains(&wanted));
                        (!scoped).then(|| Mutation::ScopeKubeSelector { key: key.clone() })
                    }
                }
            }
            _ => None,
        };
        mutation.into_iter().collect()
    }

    fn validate_pod(&self, operation: Operation, pod: &PodView) -> Option<String> {
        let key = &self.spec.os_label_key;
        let os = os::detect(&pod.spec).as_str();
        let had_label =
            pod.old.as_ref().is_some_and(|old| old.metadata.labels.contains_key(key.as_str()));
        let updating_labelled = operation == Operation::Update && had_label;
        match pod.labels.get(key) {
            Some(value) if value != os && updating_labelled => Some(format!(
                "label {key} is managed by arcguard: this pod runs on {os}; set it to {os:?}"
            )),
            Some(value) if value != os => Some(format!(
                "label {key} is managed by arcguard: this pod runs on {os}; remove the label or \
                 set it to {os:?}"
            )),
            // Dropping the label would take the pod out of every policy scoped to its OS.
            None if updating_labelled => Some(format!(
                "label {key} is managed by arcguard and cannot be removed: this pod runs on {os} \
                 and network policies scoped with the label must keep applying to it; keep it \
                 set to {os:?}"
            )),
            _ => None,
        }
    }

    fn validate_calico(&self, spec: &CalicoPolicySpec) -> Option<String> {
        let key = &self.spec.os_label_key;
        let current = spec.selector.as_deref().unwrap_or_default();
        let expr = match selector::parse(current) {
            Ok(expr) => expr,
            Err(error) => {
                return Some(format!(
                    "spec.selector {current:?} is not a valid Calico selector: {error}; fix its \
                     syntax (e.g. \"app == 'web' && {key} == 'linux'\")"
                ));
            }
        };
        // preDNAT and doNotTrack policies apply to host endpoints only, and host endpoints
        // never carry a pod OS label: scoping them would make them select nothing.
        if is_host_endpoint_only(spec) {
            return None;
        }
        let written = selector::without_linux_requirement(&expr, key);
        if selector::targets_windows(&written, key) {
            return Some(format!(
                "spec.selector {} selects pods labelled {key}={}, but {LINUX_ONLY}; select Linux \
                 pods only: drop the {key} terms that admit {:?} or require {key} == 'linux'",
                describe_selector(authored_selector(current, key)),
                os::Os::Windows.as_str(),
                os::Os::Windows.as_str(),
            ));
        }
        (self.spec.scope_policies == ScopePolicies::Validate
            && !selector::is_scoped_to_linux(&expr, key))
        .then(|| {
            format!(
                "spec.selector {} is not scoped to Linux pods, and {LINUX_ONLY}; use selector {:?}",
                describe_selector(current),
                scope_selector(current, key),
            )
        })
    }

    fn validate_kubernetes(&self, pod_selector: Option<&LabelSelector>) -> Option<String> {
        let key = &self.spec.os_label_key;
        let expr = pod_selector.map(Expr::from_label_selector).unwrap_or(Expr::All);
        let requirement = format!("{{key: {key}, operator: In, values: [{LINUX}]}}");
        let written = selector::without_linux_requirement(&expr, key);
        if selector::targets_windows(&written, key) {
            return Some(format!(
                "spec.podSelector (as a Calico selector: {written}) selects pods labelled \
                 {key}={}, but NetworkPolicy is enforced by Calico and {LINUX_ONLY}; select Linux \
                 pods only: drop the {key} requirements that admit {:?} or require {requirement}",
                os::Os::Windows.as_str(),
                os::Os::Windows.as_str(),
            ));
        }
        (self.spec.scope_policies == ScopePolicies::Validate
            && !selector::is_scoped_to_linux(&expr, key))
        .then(|| {
            format!(
                "spec.podSelector is not scoped to Linux pods, and NetworkPolicy is enforced by \
                 Calico and {LINUX_ONLY}; add {requirement} to spec.podSelector.matchExpressions"
            )
        })
    }
}

/// Whether a Calico policy applies to host endpoints only (`preDNAT` or `doNotTrack`).
pub fn is_host_endpoint_only(spec: &CalicoPolicySpec) -> bool {
    spec.pre_dnat == Some(true) || spec.do_not_track == Some(true)
}

/// A selector for a message: quoted, or said to be empty (which Calico reads as `all()`).
fn describe_selector(selector: &str) -> String {
    if selector.trim_matches(BLANKS).is_empty() {
        "(empty, which selects all pods)".to_owned()
    } else {
        format!("{selector:?}")
    }
}

/// The selector as its author wrote it, before [`scope_selector`] wrapped it; or `selector`
/// itself when it does not have that form.
fn authored_selector<'a>(selector: &'a str, key: &str) -> &'a str {
    let suffix = format!(") && {key} == '{LINUX}'");
    selector
        .trim_matches(BLANKS)
        .strip_prefix('(')
        .and_then(|rest| rest.strip_suffix(suffix.as_str()))
        .filter(|inner| selector::parse(inner).is_ok())
        .unwrap_or(selector)
}

/// The blanks Calico skips between tokens.
const BLANKS: [char; 2] = [' ', '\t'];

/// `selector` scoped to pods whose `key` label is `linux`: `(<selector>) && <key> == 'linux'`,
/// or `<key> == 'linux'` for an empty or `all()` selector.
///
/// Unchanged when the top-level `&&` chain already requires `key == 'linux'` (or
/// `key in {'linux'}`), so applying it again changes nothing. A selector that does not parse
/// is wrapped all the same (validation reports the parse error), unless it already ends with
/// the clause or the wrapping would make it parse (an unbalanced `a) || (b`): then it is
/// unchanged.
pub fn scope_selector(selector: &str, key: &str) -> String {
    let trimmed = selector.trim_matches(BLANKS);
    let clause = format!("{key} == '{LINUX}'");
    match selector::parse(trimmed) {
        Ok(expr) if selector::has_linux_requirement(&expr, key) => selector.to_owned(),
        Ok(Expr::All) => clause,
        Err(_) if trimmed.ends_with(&format!("&& {clause}")) => selector.to_owned(),
        Ok(_) => format!("({trimmed}) && {clause}"),
        Err(_) => {
            let wrapped = format!("({trimmed}) && {clause}");
            // An unbalanced selector such as `a == 'x') || (b == 'y'` closes the added
            // parenthesis itself, and the result would parse as a different selector that is
            // not scoped; it stays as written, for validation to report.
            if selector::parse(&wrapped).is_ok() { selector.to_owned() } else { wrapped }
        }
    }
}

/// The `matchExpressions` entry that scopes a Kubernetes NetworkPolicy to Linux pods.
pub fn linux_requirement(key: &str) -> serde_json::Value {
    serde_json::json!({"key": key, "operator": "In", "values": [LINUX]})
}

/// [`linux_requirement`] as the typed requirement the request view decodes.
fn linux_selector_requirement(key: &str) -> SelectorRequirement {
    SelectorRequirement {
        key: key.to_owned(),
        operator: "In".to_owned(),
        values: vec![LINUX.to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    use super::*;
    use crate::pipeline::patch;

    const KEY: &str = DEFAULT_OS_LABEL_KEY;

    fn rule(scope_policies: ScopePolicies) -> CalicoLinuxOnly {
        let spec = CalicoLinuxOnlySpec { scope_policies, ..CalicoLinuxOnlySpec::default() };
        CalicoLinuxOnly::compile(&spec).expect("default spec compiles")
    }

    fn raw(value: &Value) -> Box<RawValue> {
        RawValue::from_string(value.to_string()).expect("valid json")
    }

    fn view_of(
        kind: Kind,
        operation: Operation,
        object: &Value,
        old: Option<&Value>,
    ) -> RequestView {
        let old = old.map(raw);
        RequestView::build(kind, operation, Some("default".into()), &raw(object), old.as_deref())
            .expect("test object decodes")
    }

    fn linux_spec() -> Value {
        json!({"containers": [{"name": "app", "image": "mcr.microsoft.com/app:1"}]})
    }

    fn windows_spec() -> Value {
        json!({"os": {"name": "windows"}, "containers": [{"name": "app", "image": "mcr.microsoft.com/app:1"}]})
    }

    fn pod(labels: Value, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "p", "namespace": "default", "labels": labels}, "spec": spec})
    }

    /// Every Calico kind in both API groups, with an object of that kind carrying `spec`.
    fn calico_policies(spec: &Value) -> Vec<(Kind, Value)> {
        let mut out = Vec::new();
        for (group, api_version) in [
            ("projectcalico.org", "projectcalico.org/v3"),
            ("crd.projectcalico.org", "crd.projectcalico.org/v1"),
        ] {
            for kind_name in ["NetworkPolicy", "GlobalNetworkPolicy"] {
                let kind = Kind::recognise(group, kind_name, None).expect("calico kind");
                let mut metadata = json!({"name": "default.policy"});
                if kind_name == "NetworkPolicy" {
                    metadata["namespace"] = json!("default");
                }
                let object = json!({"apiVersion": api_version, "kind": kind_name,
                                    "metadata": metadata, "spec": spec});
                out.push((kind, object));
            }
        }
        out
    }

    fn calico_spec(selector: Option<&str>, extra: &Value) -> Value {
        let mut spec = json!({"types": ["Ingress"], "ingress": [{"action": "Deny"}]});
        if let Some(selector) = selector {
            spec["selector"] = json!(selector);
        }
        if let (Value::Object(spec), Value::Object(extra)) = (&mut spec, extra) {
            spec.extend(extra.clone());
        }
        spec
    }

    fn kube_policy(pod_selector: Option<Value>) -> Value {
        let mut spec = json!({"policyTypes": ["Ingress"]});
        if let Some(selector) = pod_selector {
            spec["podSelector"] = selector;
        }
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "deny", "namespace": "default"}, "spec": spec})
    }

    #[test]
    fn os_label_key_must_be_a_valid_kubernetes_label_key() {
        let long_prefix = format!("{}.io", "a".repeat(250));
        let too_long_prefix = format!("{}.io", "a".repeat(251));
        let cases: Vec<(String, Option<&str>)> = vec![
            (KEY.into(), None),
            ("os".into(), None),
            ("kubernetes.io/os".into(), None),
            ("example.com/Node_OS-1.x".into(), None),
            (format!("{long_prefix}/{}", "n".repeat(63)), None),
            (String::new(), Some("the name is empty")),
            ("arcguard.io/".into(), Some("the name is empty")),
            ("/os".into(), Some("the prefix before `/` is empty")),
            ("Arcguard.io/os".into(), Some("is not a DNS subdomain")),
            ("arcguard..io/os".into(), Some("is not a DNS subdomain")),
            ("-arcguard.io/os".into(), Some("is not a DNS subdomain")),
            (format!("{too_long_prefix}/os"), Some("(at most 253)")),
            (format!("os{}", "n".repeat(62)), Some("(at most 63)")),
            ("a/b/c".into(), Some("the name \"b/c\" must be")),
            ("-os".into(), Some("starting and ending with a letter or digit")),
            ("os.".into(), Some("starting and ending with a letter or digit")),
            ("arcguard.io/o s".into(), Some("must be letters, digits")),
            ("os!".into(), Some("must be letters, digits")),
        ];
        for (key, want) in cases {
            let spec = CalicoLinuxOnlySpec { os_label_key: key.clone(), ..Default::default() };
            match (CalicoLinuxOnly::compile(&spec), want) {
                (Ok(rule), None) => assert_eq!(rule.os_label_key(), key),
                (Err(err), Some(want)) => {
                    assert_eq!(err.field, "osLabelKey", "{key:?}");
                    assert!(err.message.contains(want), "{key:?}: {}", err.message);
                    assert!(err.message.contains("e.g. \"arcguard.io/os\""), "{}", err.message);
                }
                (got, want) => panic!("{key:?}: got {got:?}, want error {want:?}"),
            }
        }
    }

    #[test]
    fn spec_defaults_label_pods_and_scope_by_mutation() {
        let spec: CalicoLinuxOnlySpec = serde_json::from_value(json!({})).expect("empty block");
        assert_eq!(spec, CalicoLinuxOnlySpec::default());
        assert_eq!(spec.os_label_key, KEY);
        assert!(spec.label_pods);
        assert_eq!(spec.scope_policies, ScopePolicies::Mutate);
        let err = serde_json::from_value::<CalicoLinuxOnlySpec>(json!({"osLabel": "x"}));
        assert!(err.is_err(), "unknown fields are rejected");
    }

    #[test]
    fn scope_selector_appends_the_linux_clause_once() {
        let cases = [
            ("", "arcguard.io/os == 'linux'"),
            ("  ", "arcguard.io/os == 'linux'"),
            ("all()", "arcguard.io/os == 'linux'"),
            ("app == 'web'", "(app == 'web') && arcguard.io/os == 'linux'"),
            (" app == 'web'\t", "(app == 'web') && arcguard.io/os == 'linux'"),
            ("a == 'x' || b == 'y'", "(a == 'x' || b == 'y') && arcguard.io/os == 'linux'"),
            (
                "arcguard.io/os == 'windows'",
                "(arcguard.io/os == 'windows') && arcguard.io/os == 'linux'",
            ),
            (
                "arcguard.io/os == 'linux' || a == 'x'",
                "(arcguard.io/os == 'linux' || a == 'x') && arcguard.io/os == 'linux'",
            ),
            // Already scoped: unchanged, byte for byte.
            ("arcguard.io/os == 'linux'", "arcguard.io/os == 'linux'"),
            ("arcguard.io/os==\"linux\"", "arcguard.io/os==\"linux\""),
            ("arcguard.io/os in {'linux'}", "arcguard.io/os in {'linux'}"),
            (
                "(app == 'web') && arcguard.io/os == 'linux'",
                "(app == 'web') && arcguard.io/os == 'linux'",
            ),
            (
                "app == 'web' && arcguard.io/os == 'linux' && b == 'y'",
                "app == 'web' && arcguard.io/os == 'linux' && b == 'y'",
            ),
            // Does not parse: wrapped anyway, once.
            ("app ==", "(app ==) && arcguard.io/os == 'linux'"),
            ("(app ==) && arcguard.io/os == 'linux'", "(app ==) && arcguard.io/os == 'linux'"),
            // Does not parse, but would once wrapped (found by fuzzing): left as written.
            ("b == 'y') || (a == 'x'", "b == 'y') || (a == 'x'"),
            ("a == 'x') || (has(b)", "a == 'x') || (has(b)"),
        ];
        for (input, want) in cases {
            let scoped = scope_selector(input, KEY);
            assert_eq!(scoped, want, "{input:?}");
            assert_eq!(scope_selector(&scoped, KEY), scoped, "{input:?} twice");
        }
    }

    #[test]
    fn scoping_with_two_keys_is_deterministic_and_idempotent() {
        let other = "example.com/os";
        let once = scope_selector(&scope_selector("app == 'web'", KEY), other);
        assert_eq!(
            once,
            "((app == 'web') && arcguard.io/os == 'linux') && example.com/os == 'linux'"
        );
        assert_eq!(once, scope_selector(&scope_selector("app == 'web'", KEY), other));
        assert_eq!(scope_selector(&once, KEY), once);
        assert_eq!(scope_selector(&once, other), once);
        let expr = selector::parse(&once).expect("scoped selector parses");
        assert!(selector::is_scoped_to_linux(&expr, KEY));
        assert!(selector::is_scoped_to_linux(&expr, other));
    }

    #[test]
    fn mutate_labels_live_pods_on_create_with_their_detected_os() {
        let cases = [
            (Kind::Pod, Operation::Create, json!({}), linux_spec(), Some("linux")),
            (Kind::Pod, Operation::Create, Value::Null, linux_spec(), Some("linux")),
            (Kind::Pod, Operation::Create, json!({"app": "web"}), windows_spec(), Some("windows")),
            (Kind::Pod, Operation::Create, json!({KEY: "windows"}), linux_spec(), Some("linux")),
            (Kind::Pod, Operation::Create, json!({KEY: "linux"}), linux_spec(), None),
            (Kind::Pod, Operation::Create, json!({KEY: "windows"}), windows_spec(), None),
            (Kind::Pod, Operation::Update, json!({}), linux_spec(), None),
            (Kind::PodEphemeralContainers, Operation::Update, json!({}), linux_spec(), None),
        ];
        let rule = rule(ScopePolicies::Mutate);
        for (kind, operation, labels, spec, want) in cases {
            let object = pod(labels.clone(), spec);
            let view = view_of(kind, operation, &object, None);
            let want: Vec<Mutation> = want
                .map(|value| Mutation::SetLabel {
                    labels_pointer: "/metadata/labels".into(),
                    key: KEY.into(),
                    value: value.into(),
                })
                .into_iter()
                .collect();
            assert_eq!(rule.mutate(&view), want, "{kind:?} {operation:?} {labels}");
        }
    }

    #[test]
    fn mutate_leaves_templates_alone_and_honours_label_pods_off() {
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": windows_spec()}}});
        let view = view_of(Kind::Deployment, Operation::Create, &deployment, None);
        assert_eq!(rule(ScopePolicies::Mutate).mutate(&view), vec![]);

        let spec = CalicoLinuxOnlySpec { label_pods: false, ..Default::default() };
        let rule = CalicoLinuxOnly::compile(&spec).expect("compiles");
        let view = view_of(Kind::Pod, Operation::Create, &pod(json!({}), windows_spec()), None);
        assert_eq!(rule.mutate(&view), vec![]);
    }

    #[test]
    fn mutate_scopes_calico_policies_unless_already_scoped_or_host_endpoint_only() {
        let cases = [
            (None, json!({}), true),
            (Some(""), json!({}), true),
            (Some("all()"), json!({}), true),
            (Some("app == 'web'"), json!({}), true),
            (Some("arcguard.io/os == 'windows'"), json!({}), true),
            (Some("app =="), json!({}), true),
            (Some("(app == 'web') && arcguard.io/os == 'linux'"), json!({}), false),
            (Some("arcguard.io/os in {'linux'}"), json!({}), false),
            (Some("has(host)"), json!({"preDNAT": true, "applyOnForward": true}), false),
            (Some("has(host)"), json!({"doNotTrack": true, "applyOnForward": true}), false),
            (Some("has(host)"), json!({"preDNAT": false, "doNotTrack": false}), true),
        ];
        let mutate = rule(ScopePolicies::Mutate);
        let validate = rule(ScopePolicies::Validate);
        for (selector, extra, want) in cases {
            for (kind, object) in calico_policies(&calico_spec(selector, &extra)) {
                for operation in [Operation::Create, Operation::Update] {
                    let view = view_of(kind, operation, &object, Some(&object));
                    let want = if want {
                        vec![Mutation::ScopeCalicoSelector { key: KEY.into() }]
                    } else {
                        vec![]
                    };
                    assert_eq!(
                        mutate.mutate(&view),
                        want,
                        "{kind:?} {operation:?} {selector:?} {extra}"
                    );
                    assert_eq!(validate.mutate(&view), vec![], "validate mode never mutates");
                }
            }
        }
    }

    #[test]
    fn mutate_scopes_kubernetes_policies_unless_the_requirement_is_present() {
        let cases = [
            (None, true),
            (Some(json!({})), true),
            (Some(json!(null)), true),
            (Some(json!({"matchLabels": {"app": "web"}})), true),
            (Some(json!({"matchLabels": {KEY: "linux"}})), true),
            (
                Some(
                    json!({"matchExpressions": [{"key": KEY, "operator": "In", "values": ["linux", "windows"]}]}),
                ),
                true,
            ),
            (
                Some(
                    json!({"matchExpressions": [{"key": KEY, "operator": "In", "values": ["linux"]}]}),
                ),
                false,
            ),
            (
                Some(json!({"matchLabels": {"app": "web"}, "matchExpressions": [
                    {"key": "tier", "operator": "Exists"},
                    {"key": KEY, "operator": "In", "values": ["linux"]}]})),
                false,
            ),
        ];
        let mutate = rule(ScopePolicies::Mutate);
        for (selector, want) in cases {
            let object = kube_policy(selector.clone());
            for operation in [Operation::Create, Operation::Update] {
                let view = view_of(Kind::NetworkPolicy, operation, &object, Some(&object));
                let want = if want {
                    vec![Mutation::ScopeKubeSelector { key: KEY.into() }]
                } else {
                    vec![]
                };
                assert_eq!(mutate.mutate(&view), want, "{selector:?}");
                assert_eq!(rule(ScopePolicies::Validate).mutate(&view), vec![]);
            }
        }
    }

    /// Runs `rule.validate` and checks it found exactly the expected violation (by fragment).
    fn assert_finding(rule: &CalicoLinuxOnly, view: &RequestView, want: Option<&str>, case: &str) {
        let findings = rule.validate(view);
        assert!(findings.advisories.is_empty(), "{case}");
        match want {
            None => assert_eq!(findings.violations, Vec::<String>::new(), "{case}"),
            Some(want) => {
                assert_eq!(findings.violations.len(), 1, "{case}: {:?}", findings.violations);
                let message = &findings.violations[0];
                assert!(message.contains(want), "{case}: {message:?} should contain {want:?}");
            }
        }
    }

    #[test]
    fn validate_judges_calico_policy_selectors() {
        let targets = "selects pods labelled arcguard.io/os=windows, but Calico network policy \
                       applies to Linux pods only on this platform";
        let none = json!({});
        let pre_dnat = json!({"preDNAT": true, "applyOnForward": true});
        let no_track = json!({"doNotTrack": true, "applyOnForward": true});
        let cases = [
            // Mutation mode: the validating webhook sees the mutated selector.
            (ScopePolicies::Mutate, Some("app == 'web'"), &none, None),
            (
                ScopePolicies::Mutate,
                Some("(app == 'web') && arcguard.io/os == 'linux'"),
                &none,
                None,
            ),
            (ScopePolicies::Mutate, Some("arcguard.io/os == 'linux'"), &none, None),
            (ScopePolicies::Mutate, Some("arcguard.io/os == 'windows'"), &none, Some(targets)),
            (
                ScopePolicies::Mutate,
                Some("(arcguard.io/os == 'windows') && arcguard.io/os == 'linux'"),
                &none,
                Some("spec.selector \"arcguard.io/os == 'windows'\" selects pods labelled"),
            ),
            (
                ScopePolicies::Mutate,
                Some("(app == 'x' || arcguard.io/os != 'linux') && arcguard.io/os == 'linux'"),
                &none,
                Some("spec.selector \"app == 'x' || arcguard.io/os != 'linux'\" selects"),
            ),
            (
                ScopePolicies::Mutate,
                Some("(arcguard.io/os in {'linux', 'windows'}) && arcguard.io/os == 'linux'"),
                &none,
                Some(
                    "drop the arcguard.io/os terms that admit \"windows\" or require arcguard.io/os == 'linux'",
                ),
            ),
            (ScopePolicies::Mutate, Some("has(arcguard.io/os)"), &none, Some(targets)),
            (ScopePolicies::Mutate, Some("!(arcguard.io/os == 'linux')"), &none, Some(targets)),
            (
                ScopePolicies::Mutate,
                Some("(app ==) && arcguard.io/os == 'linux'"),
                &none,
                Some(
                    "spec.selector \"(app ==) && arcguard.io/os == 'linux'\" is not a valid Calico selector: expected a quoted string at column 8, found `)`; fix its syntax",
                ),
            ),
            // Validation mode: unscoped policies are denied with the selector to use.
            (
                ScopePolicies::Validate,
                Some("app == 'web'"),
                &none,
                Some(
                    "spec.selector \"app == 'web'\" is not scoped to Linux pods, and Calico network policy applies to Linux pods only on this platform (its Windows dataplane skips rules it cannot render); use selector \"(app == 'web') && arcguard.io/os == 'linux'\"",
                ),
            ),
            (
                ScopePolicies::Validate,
                None,
                &none,
                Some("spec.selector (empty, which selects all pods) is not scoped to Linux pods"),
            ),
            (
                ScopePolicies::Validate,
                Some("all()"),
                &none,
                Some("use selector \"arcguard.io/os == 'linux'\""),
            ),
            (
                ScopePolicies::Validate,
                Some("arcguard.io/os != 'windows'"),
                &none,
                Some("is not scoped"),
            ),
            (ScopePolicies::Validate, Some("arcguard.io/os in {'linux'}"), &none, None),
            (
                ScopePolicies::Validate,
                Some("(app == 'web') && arcguard.io/os == 'linux'"),
                &none,
                None,
            ),
            (ScopePolicies::Validate, Some("arcguard.io/os == 'windows'"), &none, Some(targets)),
            (
                ScopePolicies::Validate,
                Some("a == 'x' ||"),
                &none,
                Some("is not a valid Calico selector"),
            ),
            // Host-endpoint-only policies: exempt, except from syntax errors.
            (ScopePolicies::Validate, Some("has(host)"), &pre_dnat, None),
            (ScopePolicies::Validate, Some("has(host)"), &no_track, None),
            (ScopePolicies::Mutate, Some("arcguard.io/os == 'windows'"), &pre_dnat, None),
            (ScopePolicies::Validate, Some("arcguard.io/os == 'windows'"), &no_track, None),
            (
                ScopePolicies::Mutate,
                Some("has(host"),
                &pre_dnat,
                Some("is not a valid Calico selector"),
            ),
        ];
        for (scope, selector, extra, want) in cases {
            let rule = rule(scope);
            for (kind, object) in calico_policies(&calico_spec(selector, extra)) {
                for operation in [Operation::Create, Operation::Update] {
                    let view = view_of(kind, operation, &object, Some(&object));
                    let case = format!("{scope:?} {kind:?} {operation:?} {selector:?} {extra}");
                    assert_finding(&rule, &view, want, &case);
                }
            }
        }
    }

    #[test]
    fn validate_judges_kubernetes_policy_pod_selectors() {
        let targets = "selects pods labelled arcguard.io/os=windows, but NetworkPolicy is enforced \
                       by Calico and Calico network policy applies to Linux pods only";
        let linux = json!({"key": KEY, "operator": "In", "values": ["linux"]});
        let cases = [
            (ScopePolicies::Mutate, Some(json!({})), None),
            (ScopePolicies::Mutate, None, None),
            (ScopePolicies::Mutate, Some(json!({"matchLabels": {"app": "web"}})), None),
            (ScopePolicies::Mutate, Some(json!({"matchLabels": {KEY: "windows"}})), Some(targets)),
            (
                ScopePolicies::Mutate,
                Some(
                    json!({"matchExpressions": [{"key": KEY, "operator": "In", "values": ["windows"]}, linux]}),
                ),
                Some(
                    "spec.podSelector (as a Calico selector: arcguard.io/os in {'windows'}) selects",
                ),
            ),
            (
                ScopePolicies::Mutate,
                Some(json!({"matchLabels": {"app": "web"},
                    "matchExpressions": [{"key": KEY, "operator": "NotIn", "values": ["linux"]}, linux]})),
                Some("require {key: arcguard.io/os, operator: In, values: [linux]}"),
            ),
            (
                ScopePolicies::Mutate,
                Some(json!({"matchExpressions": [{"key": KEY, "operator": "Exists"}]})),
                Some(targets),
            ),
            (
                ScopePolicies::Mutate,
                Some(json!({"matchExpressions": [{"key": KEY, "operator": "DoesNotExist"}]})),
                None,
            ),
            (ScopePolicies::Mutate, Some(json!({"matchExpressions": [linux]})), None),
            (
                ScopePolicies::Validate,
                Some(json!({})),
                Some(
                    "spec.podSelector is not scoped to Linux pods, and NetworkPolicy is enforced by Calico and Calico network policy applies to Linux pods only on this platform (its Windows dataplane skips rules it cannot render); add {key: arcguard.io/os, operator: In, values: [linux]} to spec.podSelector.matchExpressions",
                ),
            ),
            (ScopePolicies::Validate, None, Some("is not scoped to Linux pods")),
            (
                ScopePolicies::Validate,
                Some(json!({"matchLabels": {"app": "web"}})),
                Some("is not scoped"),
            ),
            (ScopePolicies::Validate, Some(json!({"matchLabels": {KEY: "linux"}})), None),
            (
                ScopePolicies::Validate,
                Some(json!({"matchLabels": {"app": "web"}, "matchExpressions": [linux]})),
                None,
            ),
            (
                ScopePolicies::Validate,
                Some(json!({"matchLabels": {KEY: "windows"}})),
                Some(targets),
            ),
        ];
        for (scope, selector, want) in cases {
            let object = kube_policy(selector.clone());
            let view = view_of(Kind::NetworkPolicy, Operation::Create, &object, None);
            assert_finding(&rule(scope), &view, want, &format!("{scope:?} {selector:?}"));
        }
    }

    #[test]
    fn validate_keeps_pods_from_falsifying_or_dropping_the_os_label() {
        let falsified = "label arcguard.io/os is managed by arcguard: this pod runs on linux; \
                         remove the label or set it to \"linux\"";
        let cases = [
            (Operation::Create, json!({}), linux_spec(), None, None),
            (Operation::Create, json!({KEY: "linux"}), linux_spec(), None, None),
            (Operation::Create, json!({KEY: "windows"}), windows_spec(), None, None),
            (Operation::Create, json!({KEY: "windows"}), linux_spec(), None, Some(falsified)),
            (Operation::Create, json!({KEY: ""}), linux_spec(), None, Some(falsified)),
            (
                Operation::Create,
                json!({KEY: "linux"}),
                windows_spec(),
                None,
                Some("this pod runs on windows; remove the label or set it to \"windows\""),
            ),
            (
                Operation::Update,
                json!({KEY: "linux"}),
                linux_spec(),
                Some(json!({KEY: "linux"})),
                None,
            ),
            (Operation::Update, json!({}), linux_spec(), Some(json!({})), None),
            (
                Operation::Update,
                json!({"app": "web"}),
                linux_spec(),
                Some(json!({KEY: "linux", "app": "web"})),
                Some(
                    "label arcguard.io/os is managed by arcguard and cannot be removed: this pod runs on linux",
                ),
            ),
            (
                Operation::Update,
                json!({KEY: "windows"}),
                linux_spec(),
                Some(json!({KEY: "linux"})),
                Some("this pod runs on linux; set it to \"linux\""),
            ),
            (
                Operation::Update,
                json!({KEY: "windows"}),
                linux_spec(),
                Some(json!({})),
                Some(falsified),
            ),
        ];
        for rule in [rule(ScopePolicies::Mutate), rule(ScopePolicies::Validate)] {
            for (operation, labels, spec, old_labels, want) in &cases {
                let object = pod(labels.clone(), spec.clone());
                let old = old_labels.as_ref().map(|l| pod(l.clone(), spec.clone()));
                let view = view_of(Kind::Pod, *operation, &object, old.as_ref());
                assert_finding(
                    &rule,
                    &view,
                    *want,
                    &format!("{operation:?} {labels} {old_labels:?}"),
                );
            }
        }
    }

    #[test]
    fn validate_ignores_templates_and_the_ephemeral_containers_subresource() {
        let rule = rule(ScopePolicies::Validate);
        let falsified = pod(json!({KEY: "windows"}), linux_spec());
        let view =
            view_of(Kind::PodEphemeralContainers, Operation::Update, &falsified, Some(&falsified));
        assert_finding(&rule, &view, None, "ephemeral containers");
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"template": {"metadata": {"labels": {KEY: "windows"}}, "spec": linux_spec()}}});
        let view = view_of(Kind::Deployment, Operation::Create, &deployment, None);
        assert_finding(&rule, &view, None, "deployment");
    }

    /// Mutates `object`, applies the patch, and returns the patched object and its view.
    fn mutated(rule: &CalicoLinuxOnly, kind: Kind, object: &Value) -> (Value, RequestView) {
        let view = view_of(kind, Operation::Create, object, None);
        let mutations: BTreeSet<Mutation> = rule.mutate(&view).into_iter().collect();
        let mut patched = object.clone();
        if let Some(p) = patch::build(&raw(object), &mutations).expect("object is json") {
            json_patch::patch(&mut patched, &p).expect("patch applies");
        }
        let view = view_of(kind, Operation::Create, &patched, None);
        (patched, view)
    }

    #[test]
    fn mutated_objects_pass_validation_and_mutate_no_further() {
        let mutating = rule(ScopePolicies::Mutate);
        let validating = rule(ScopePolicies::Validate);
        let mut objects = vec![
            (Kind::Pod, pod(json!({}), linux_spec())),
            (Kind::Pod, pod(Value::Null, windows_spec())),
            (Kind::Pod, pod(json!({KEY: "windows", "app": "web"}), linux_spec())),
            (Kind::NetworkPolicy, kube_policy(None)),
            (Kind::NetworkPolicy, kube_policy(Some(json!({})))),
            (Kind::NetworkPolicy, kube_policy(Some(json!({"matchLabels": {"app": "web"}})))),
            (
                Kind::NetworkPolicy,
                kube_policy(Some(
                    json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
                )),
            ),
        ];
        for selector in [
            None,
            Some("all()"),
            Some("app == 'web'"),
            Some("a == 'x' || b in {'y'}"),
            Some("arcguard.io/os != 'windows'"),
        ] {
            objects.extend(calico_policies(&calico_spec(selector, &json!({}))));
        }
        objects.extend(calico_policies(&calico_spec(
            Some("has(host)"),
            &json!({"preDNAT": true, "applyOnForward": true}),
        )));
        for (kind, object) in objects {
            let (patched, view) = mutated(&mutating, kind, &object);
            assert_finding(&mutating, &view, None, &format!("{kind:?} {patched}"));
            assert_finding(&validating, &view, None, &format!("validate mode {patched}"));
            let again: BTreeSet<Mutation> = mutating.mutate(&view).into_iter().collect();
            assert_eq!(patch::build(&raw(&patched), &again).expect("json"), None, "{patched}");
            match kind {
                Kind::Pod => {
                    let pod = view.pod().expect("pod view");
                    assert_eq!(
                        pod.labels.get(KEY).map(String::as_str),
                        Some(os::detect(&pod.spec).as_str())
                    );
                }
                Kind::NetworkPolicy => {
                    let expressions = &patched["spec"]["podSelector"]["matchExpressions"];
                    assert!(
                        expressions.as_array().is_some_and(|e| e.contains(&linux_requirement(KEY))),
                        "{patched}"
                    );
                }
                _ => {}
            }
        }
    }

    #[test]
    fn policies_written_for_windows_pods_are_denied_after_mutation() {
        let rule = rule(ScopePolicies::Mutate);
        for (kind, object) in
            calico_policies(&calico_spec(Some("arcguard.io/os == 'windows'"), &json!({})))
        {
            let (patched, view) = mutated(&rule, kind, &object);
            assert_eq!(
                patched["spec"]["selector"],
                "(arcguard.io/os == 'windows') && arcguard.io/os == 'linux'"
            );
            assert_finding(
                &rule,
                &view,
                Some(
                    "spec.selector \"arcguard.io/os == 'windows'\" selects pods labelled arcguard.io/os=windows",
                ),
                &format!("{kind:?}"),
            );
        }
        let object = kube_policy(Some(json!({"matchLabels": {KEY: "windows"}})));
        let (_, view) = mutated(&rule, Kind::NetworkPolicy, &object);
        assert_finding(
            &rule,
            &view,
            Some("arcguard.io/os == 'windows') selects pods labelled"),
            "kube",
        );
    }
}
