//! calicoLinuxOnly: Calico and Kubernetes network policies apply to Linux pods only.
//!
//! Calico's Windows dataplane silently skips the rules it cannot render, so a policy that
//! selects Windows pods may leave them more open than it says. The rule:
//! - labels each pod with its OS (`osLabelKey`), as [`os::resolve`] decides it from the pod's
//!   signals and, in cluster mode, its node; a pod without any OS signal is pinned to Linux
//!   (`nodeSelector kubernetes.io/os: linux`) as it is labelled, so the label is true by
//!   construction. Scheduling-gated pods are labelled but not pinned (their placement may still
//!   be decided by a later update), and a later update that re-pins them is relabelled;
//! - keeps the label true: a pod cannot be created, updated (through any subresource that
//!   persists labels, `pods/status` included) or bound to a node with a label that differs
//!   from where it runs;
//! - scopes every policy's subject selector so it no longer selects pods labelled Windows,
//!   and nothing else: `(<selector>) && <key> != 'windows'`, and `{key, NotIn, [windows]}` for
//!   Kubernetes NetworkPolicy. Pods without the label (created before arcguard was installed,
//!   in excluded namespaces, mirror pods) and host endpoints stay selected;
//! - denies policies written for Windows pods (their subject reads the label and admits
//!   `windows`).
//!
//! Selectors scoped by earlier versions (`(<selector>) && <key> == 'linux'`, `{key, In,
//! [linux]}`), which dropped every unlabelled pod, are brought to the new form when next
//! written. Policies with `preDNAT: true` or `doNotTrack: true` apply to host endpoints only:
//! they are not scoped (nothing to scope: host endpoints carry no pod OS label) nor judged on
//! what they select; only their selector's syntax is checked.

pub mod selector;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::selector::Expr;
use super::os::{self, NodeOs, Os, PodOs};
use super::{Facts, FieldError, Findings, Mutation, PodLookup};
use crate::admission::objects::{CalicoPolicySpec, LabelSelector, SelectorRequirement};
use crate::admission::review::Operation;
use crate::admission::view::{BindingView, Kind, PodView, PolicySubject, RequestView, Subject};

/// The default OS label key.
pub const DEFAULT_OS_LABEL_KEY: &str = "arcguard.io/os";

/// The OS label value of Windows pods, the ones scoped policies no longer select.
const WINDOWS: &str = "windows";
/// The OS label value of Linux pods, as the legacy scoping term required it.
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
    /// Kubernetes label key; `labelPods` when it is off while `scopePolicies` is `Mutate`.
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
        if !spec.label_pods && spec.scope_policies == ScopePolicies::Mutate {
            // Scoping drops only pods labelled Windows: with no pod labelled, every scoped
            // policy would go on selecting Windows pods while looking scoped.
            return Err(FieldError::new(
                "labelPods",
                "must be true when scopePolicies is Mutate: scoped policies leave out only pods \
                 labelled windows, and with labelPods false arcguard labels no pod, so Windows \
                 pods would stay selected; set labelPods: true, or scopePolicies: Validate if \
                 another tool labels pods",
            ));
        }
        Ok(Self { spec: spec.clone() })
    }

    /// The pod label that carries the pod's OS.
    pub fn os_label_key(&self) -> &str {
        &self.spec.os_label_key
    }

    /// Whether the rule labels pods.
    pub fn labels_pods(&self) -> bool {
        self.spec.label_pods
    }

    /// Violations of the rule by the object under review.
    pub fn validate(&self, view: &RequestView, facts: &dyn Facts) -> Findings {
        let violations = match &view.subject {
            Subject::Pod(pod) if matches!(view.kind, Kind::Pod | Kind::PodStatus) => {
                self.validate_pod(view.operation, pod, facts)
            }
            // A workload's template: its pods will be judged on their label, so a false one is
            // refused now rather than on every pod the controller makes.
            Subject::Pod(pod) if !view.kind.is_pod() => self.validate_template(pod, facts),
            Subject::Binding(binding) => self.validate_binding(view, binding, facts),
            Subject::NetworkPolicy(PolicySubject::Calico { spec, global }) => {
                self.validate_calico(spec, *global)
            }
            Subject::NetworkPolicy(PolicySubject::Kubernetes { pod_selector }) => {
                self.validate_kubernetes(pod_selector.as_ref())
            }
            _ => None,
        };
        Findings { violations: violations.into_iter().collect(), advisories: Vec::new() }
    }

    /// The changes this rule makes to the object under review.
    pub fn mutate(&self, view: &RequestView, facts: &dyn Facts) -> Vec<Mutation> {
        let key = &self.spec.os_label_key;
        match &view.subject {
            Subject::Pod(pod) if self.spec.label_pods && view.kind == Kind::Pod => {
                self.mutate_pod(view.operation, pod, facts)
            }
            Subject::NetworkPolicy(policy) if self.spec.scope_policies == ScopePolicies::Mutate => {
                let scope = match policy {
                    PolicySubject::Calico { spec, global } => {
                        let current = spec.selector.as_deref().unwrap_or_default();
                        let unchanged = scope_selector(current, key) == current;
                        (!unchanged && !is_host_endpoint_only(spec, *global))
                            .then(|| Mutation::ScopeCalicoSelector { key: key.clone() })
                    }
                    PolicySubject::Kubernetes { pod_selector } => {
                        let expressions =
                            pod_selector.as_ref().map(|s| s.match_expressions.as_slice());
                        let scoped = expressions.is_some_and(|e| {
                            e.contains(&scope_selector_requirement(key))
                                && !e.iter().any(|r| is_legacy_requirement(r, key))
                        });
                        (!scoped).then(|| Mutation::ScopeKubeSelector { key: key.clone() })
                    }
                };
                scope.into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// The label (and, for an unpinned new pod, the pin) that makes a pod's OS label true:
    /// on creation, and on an update that re-pins a scheduling-gated pod.
    fn mutate_pod(&self, operation: Operation, pod: &PodView, facts: &dyn Facts) -> Vec<Mutation> {
        let key = &self.spec.os_label_key;
        let node_os = |node: &str| facts.node_os(node);
        if placed_where_unseen(pod, facts) {
            return Vec::new();
        }
        let resolved = os::resolve(&pod.spec, &node_os);
        if resolved.problem().is_some() {
            // Validation denies it, saying why.
            return Vec::new();
        }
        let os = resolved.os();
        let label = Mutation::SetLabel {
            labels_pointer: pod.labels_pointer(),
            key: key.clone(),
            value: os.as_str().to_owned(),
        };
        match operation {
            Operation::Create => {
                let mut mutations = Vec::new();
                // A label the author set is judged, never rewritten: a rewrite would take a
                // controller's pod out of its selector, and the controller would make another.
                if !pod.labels.contains_key(key.as_str()) {
                    mutations.push(label);
                }
                // Pinned by its own signals or not at all, the pod gets the nodeSelector the
                // scheduler honours, so it lands where its label says. Gated pods are left
                // alone: a queueing controller may still set their placement, and a pin would
                // contradict it.
                let selector_pins = pod.spec.node_selector().contains_key(os::NODE_OS_LABEL);
                if !pod.spec.is_gated() && !selector_pins {
                    mutations.push(Mutation::PinNodeOs { spec_pointer: pod.spec_pointer(), os });
                }
                mutations
            }
            // An UPDATE that re-pins a scheduling-gated pod to another OS: the label arcguard
            // set at creation follows.
            Operation::Update => {
                let repinned = pod.old.as_deref().is_some_and(|old| {
                    old.spec.is_gated() && os::resolve(&old.spec, &node_os).os() != os
                });
                let current = pod.labels.get(key.as_str()).map(String::as_str);
                if repinned && current != Some(os.as_str()) { vec![label] } else { Vec::new() }
            }
            _ => Vec::new(),
        }
    }

    fn validate_pod(
        &self,
        operation: Operation,
        pod: &PodView,
        facts: &dyn Facts,
    ) -> Option<String> {
        let key = &self.spec.os_label_key;
        // A pod placed on a node arcguard cannot see (standalone mode) is judged by its own
        // signals: a `windows` label needs them to pin Windows.
        let node_os = |node: &str| facts.node_os(node);
        let resolved = os::resolve(&pod.spec, &node_os);
        let old = pod.old.as_deref();
        let repinned = old.is_some_and(|old| {
            old.spec.is_gated() && os::resolve(&old.spec, &node_os).os() != resolved.os()
        });
        let as_create = operation == Operation::Create || repinned;
        if let Some(problem) = resolved.problem() {
            if as_create {
                return Some(problem);
            }
            // An existing pod whose node arcguard cannot see: its label may not change, since
            // whether the new value is true cannot be checked.
            let old_label = old.and_then(|o| o.metadata.labels.get(key.as_str()));
            return (pod.labels.get(key.as_str()) != old_label).then(|| {
                format!("label {key} is managed by arcguard and cannot be changed now: {problem}")
            });
        }
        let os = resolved.os();
        let had_label = old.is_some_and(|old| old.metadata.labels.contains_key(key.as_str()));
        let updating_labelled = operation == Operation::Update && had_label;
        match pod.labels.get(key).map(String::as_str) {
            Some(WINDOWS) if resolved == PodOs::Unpinned => Some(format!(
                "label {key}={WINDOWS} is managed by arcguard, and this pod is not pinned to \
                 Windows (no spec.os.name, nodeSelector or required node affinity for windows, \
                 and no Windows node): pin it with spec.os.name: windows and nodeSelector \
                 kubernetes.io/os: windows, or {}",
                if updating_labelled {
                    format!("set the label to {:?}", os.as_str())
                } else {
                    "remove the label".to_owned()
                }
            )),
            Some(value) if value != os.as_str() && updating_labelled => Some(format!(
                "label {key} is managed by arcguard: this pod runs on {os}; set it to {:?}",
                os.as_str()
            )),
            Some(value) if value != os.as_str() => Some(format!(
                "label {key} is managed by arcguard: this pod runs on {os}; remove the label or \
                 set it to {:?}",
                os.as_str()
            )),
            // Dropping the label would take the pod out of every policy scoped to its OS.
            None if updating_labelled => Some(format!(
                "label {key} is managed by arcguard and cannot be removed: this pod runs on {os} \
                 and network policies scoped with the label must keep applying to it as they \
                 do; keep it set to {:?}",
                os.as_str()
            )),
            _ => None,
        }
    }

    /// A template's OS label must be what its pods' signals make true: each pod is created with
    /// it and denied when it is false.
    fn validate_template(&self, pod: &PodView, facts: &dyn Facts) -> Option<String> {
        let key = &self.spec.os_label_key;
        let value = pod.labels.get(key.as_str())?;
        // Decided as for the pods it makes (a template placed on a node: that node).
        let resolved = os::resolve(&pod.spec, &|node| facts.node_os(node));
        let fits = match &resolved {
            PodOs::Pinned { os, .. } => value == os.as_str(),
            PodOs::Unpinned => value == LINUX,
            PodOs::Contradiction(_) | PodOs::UnknownNode(_) => true,
        };
        (!fits).then(|| {
            let truth = resolved.os();
            format!(
                "the pod template's label {key}={value} is false: its pods run on {truth}, and \
                 arcguard would deny each one; remove the label from the template (arcguard sets \
                 it on every pod) or pin the template to the operating system it names"
            )
        })
    }

    /// A binding must not put a pod on a node whose OS differs from the pod's label (or, for an
    /// unlabelled pod, from what its own signals pin).
    fn validate_binding(
        &self,
        view: &RequestView,
        binding: &BindingView,
        facts: &dyn Facts,
    ) -> Option<String> {
        let key = &self.spec.os_label_key;
        let node = &binding.node;
        let pod_name = view.display_name();
        let node_os = match facts.node_os(node) {
            NodeOs::NotChecked if binding.labels.contains_key(key.as_str()) => {
                return Some(format!(
                    "this binding sets label {key} on pod {pod_name}, which arcguard manages; \
                     remove the label from the binding"
                ));
            }
            NodeOs::NotChecked => return None,
            NodeOs::Unknown => {
                return Some(format!(
                    "node {node:?} is not known to arcguard (yet) or has no kubernetes.io/os \
                     label, so the OS label of pod {pod_name} cannot be checked against it; the \
                     binding is retried once the node is registered with that label"
                ));
            }
            NodeOs::Known(os) => os,
        };
        // The apiserver copies a Binding's labels onto the pod, overwriting: one carrying the
        // OS label would set it without any pod write arcguard sees.
        if let Some(value) = binding.labels.get(key.as_str())
            && value != node_os.as_str()
        {
            return Some(format!(
                "this binding sets label {key}={value} on pod {pod_name}, but node {node:?} runs \
                 {node_os}; remove the label from the binding (arcguard manages it)"
            ));
        }
        let namespace = view.namespace.as_deref().unwrap_or_default();
        let pod = match facts.pod(namespace, &view.name) {
            PodLookup::NotChecked => return None,
            // Refused rather than let through: a pod of that name created between this check
            // and the binding's storage would otherwise be bound unchecked.
            PodLookup::NotFound => {
                return Some(format!(
                    "pod {pod_name} was not found to check its OS label against node {node:?}; \
                     retry once it exists"
                ));
            }
            PodLookup::Failed(why) => {
                return Some(format!(
                    "pod {pod_name} could not be read to check its OS label against node \
                     {node:?}: {why}; retry"
                ));
            }
            PodLookup::Found(pod) => pod,
        };
        let claimed = match pod.metadata.labels.get(key.as_str()) {
            Some(value) => Os::from_label(value),
            // Unlabelled: what its own signals pin, if anything.
            None => match os::detect(&pod.spec) {
                PodOs::Pinned { os, .. } => Some(os),
                _ => None,
            },
        };
        match claimed {
            Some(os) if os != node_os => Some(format!(
                "pod {pod_name} is {} ({key}={os}) but node {node:?} runs {node_os}: bind it to a \
                 {} node; to run it on {}, delete it and create it with spec.os.name: {node_os}",
                os.title(),
                os.title(),
                node_os.title(),
            )),
            _ => None,
        }
    }

    fn validate_calico(&self, spec: &CalicoPolicySpec, global: bool) -> Option<String> {
        let key = &self.spec.os_label_key;
        let current = spec.selector.as_deref().unwrap_or_default();
        let expr = match selector::parse(current) {
            Ok(expr) => expr,
            Err(error) => {
                // Columns count in what the user wrote, not in arcguard's wrapping of it.
                let authored = authored_text(current, key);
                let error = selector::parse(authored).err().unwrap_or(error);
                return Some(format!(
                    "spec.selector {authored:?} is not a valid Calico selector: {error}; fix its \
                     syntax (e.g. \"app == 'web'\")"
                ));
            }
        };
        // preDNAT and doNotTrack policies apply to host endpoints only, and host endpoints
        // never carry a pod OS label.
        if is_host_endpoint_only(spec, global) {
            return None;
        }
        let written = selector::without_scope_terms(&expr, key);
        if selector::targets_windows(&written, key) {
            return Some(format!(
                "spec.selector {} selects pods labelled {key}={WINDOWS}, but {LINUX_ONLY}; \
                 select Linux pods only: drop the {key} terms that admit {WINDOWS:?}",
                describe_selector(authored_selector(current, key)),
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
        let requirement = format!("{{key: {key}, operator: NotIn, values: [{WINDOWS}]}}");
        let written = selector::without_scope_terms(&expr, key);
        if selector::targets_windows(&written, key) {
            return Some(format!(
                "spec.podSelector (as a Calico selector: {written}) selects pods labelled \
                 {key}={WINDOWS}, but NetworkPolicy is enforced by Calico and {LINUX_ONLY}; \
                 select Linux pods only: drop the {key} requirements that admit {WINDOWS:?}",
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

/// Whether the pod is placed on a node (`spec.nodeName`, DaemonSet-style affinity) that
/// arcguard cannot see (standalone mode): its OS is then unknown, and it is neither labelled
/// nor judged on its label.
fn placed_where_unseen(pod: &PodView, facts: &dyn Facts) -> bool {
    os::placement(&pod.spec).into_iter().any(|node| facts.node_os(node) == NodeOs::NotChecked)
}

/// Whether a Calico policy applies to host endpoints only (`preDNAT` or `doNotTrack`).
///
/// Calico defines both fields on GlobalNetworkPolicy only; on a namespaced NetworkPolicy they
/// mean nothing and exempt nothing, so callers pass `global`.
pub fn is_host_endpoint_only(spec: &CalicoPolicySpec, global: bool) -> bool {
    global && (spec.pre_dnat == Some(true) || spec.do_not_track == Some(true))
}

/// A selector for a message: quoted, or said to be empty (which Calico reads as `all()`).
fn describe_selector(selector: &str) -> String {
    if selector.trim_matches(BLANKS).is_empty() {
        "(empty, which selects all pods)".to_owned()
    } else {
        format!("{selector:?}")
    }
}

/// The scoping clause arcguard appends: pods labelled Windows drop out, nothing else does.
fn scope_clause(key: &str) -> String {
    format!("{key} != '{WINDOWS}'")
}

/// The scoping clause earlier versions appended, which also dropped unlabelled pods.
fn legacy_clause(key: &str) -> String {
    format!("{key} == '{LINUX}'")
}

/// What the author wrote inside `(<inner>) && <clause>`, for either clause; `None` when the
/// selector does not have that form.
fn strip_clause<'a>(trimmed: &'a str, clause: &str) -> Option<&'a str> {
    trimmed.strip_prefix('(')?.strip_suffix(clause)?.trim_end_matches(BLANKS).strip_suffix(") &&")
}

/// The selector as its author wrote it, before [`scope_selector`] wrapped it (in either the
/// current or the legacy form); or `selector` itself when it does not have that form.
fn authored_selector<'a>(selector: &'a str, key: &str) -> &'a str {
    let trimmed = selector.trim_matches(BLANKS);
    [scope_clause(key), legacy_clause(key)]
        .iter()
        .find_map(|clause| strip_clause(trimmed, clause))
        .filter(|inner| selector::parse(inner).is_ok())
        .unwrap_or(selector)
}

/// [`authored_selector`] for a selector that does not parse: the text inside the wrapping,
/// whatever it holds, so a syntax error quotes what the user wrote.
fn authored_text<'a>(selector: &'a str, key: &str) -> &'a str {
    let trimmed = selector.trim_matches(BLANKS);
    [scope_clause(key), legacy_clause(key)]
        .iter()
        .find_map(|clause| strip_clause(trimmed, clause))
        .unwrap_or(selector)
}

/// The blanks Calico skips between tokens.
const BLANKS: [char; 2] = [' ', '\t'];

/// `selector` scoped so that it no longer selects pods labelled `key: windows`, and selects
/// everything else it selected: `(<selector>) && <key> != 'windows'`, or `<key> != 'windows'`
/// for an empty or `all()` selector. Calico's `!=` also holds for endpoints without the label,
/// so unlabelled pods and host endpoints stay selected.
///
/// Unchanged when the top-level `&&` chain already excludes Windows pods with
/// `key != 'windows'` (or `key not in {'windows'}`), so applying it again changes nothing.
/// A selector in the legacy form `(<inner>) && key == 'linux'` (or just `key == 'linux'`) is
/// rewritten to the current form around `<inner>`. A selector that does not parse is wrapped
/// all the same (validation reports the parse error), unless it already ends with the clause
/// or the wrapping would make it parse (an unbalanced `a) || (b`): then it is unchanged.
pub fn scope_selector(selector: &str, key: &str) -> String {
    let trimmed = selector.trim_matches(BLANKS);
    let clause = scope_clause(key);
    let wrap = |inner: &str| match selector::parse(inner) {
        Ok(Expr::All) => clause.clone(),
        _ => format!("({inner}) && {clause}"),
    };
    if trimmed == legacy_clause(key) {
        return clause;
    }
    match selector::parse(trimmed) {
        Ok(expr) if selector::has_scope_term(&expr, key) => selector.to_owned(),
        Ok(_) => match strip_clause(trimmed, &legacy_clause(key)) {
            Some(inner) if selector::parse(inner).is_ok() => wrap(inner),
            _ => wrap(trimmed),
        },
        Err(_) if trimmed.ends_with(&format!("&& {clause}")) => selector.to_owned(),
        Err(_) => {
            let wrapped = format!("({trimmed}) && {clause}");
            // An unbalanced selector such as `a == 'x') || (b == 'y'` closes the added
            // parenthesis itself, and the result would parse as a different selector that is
            // not scoped; it stays as written, for validation to report.
            if selector::parse(&wrapped).is_ok() { selector.to_owned() } else { wrapped }
        }
    }
}

/// The `matchExpressions` entry that scopes a Kubernetes NetworkPolicy: `{key, NotIn,
/// [windows]}`, which (like Calico's `!=`) also holds for pods without the label.
pub fn linux_requirement(key: &str) -> serde_json::Value {
    serde_json::json!({"key": key, "operator": "NotIn", "values": [WINDOWS]})
}

/// [`linux_requirement`] as the typed requirement the request view decodes.
fn scope_selector_requirement(key: &str) -> SelectorRequirement {
    SelectorRequirement {
        key: key.to_owned(),
        operator: "NotIn".to_owned(),
        values: vec![WINDOWS.to_owned()],
    }
}

/// Whether a `matchExpressions` entry is the legacy scoping `{key, In, [linux]}`, replaced by
/// [`linux_requirement`] when the policy is next written.
pub fn is_legacy_requirement(requirement: &SelectorRequirement, key: &str) -> bool {
    requirement.key == key && requirement.operator == "In" && requirement.values == [LINUX]
}

/// [`is_legacy_requirement`] on a JSON `matchExpressions` entry.
pub fn is_legacy_requirement_json(entry: &serde_json::Value, key: &str) -> bool {
    entry.get("key").and_then(|k| k.as_str()) == Some(key)
        && entry.get("operator").and_then(|o| o.as_str()) == Some("In")
        && entry.get("values") == Some(&serde_json::json!([LINUX]))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    use super::*;
    use crate::pipeline::patch;
    use crate::rules::StaticFacts;

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
            ("", "arcguard.io/os != 'windows'"),
            ("  ", "arcguard.io/os != 'windows'"),
            ("all()", "arcguard.io/os != 'windows'"),
            ("app == 'web'", "(app == 'web') && arcguard.io/os != 'windows'"),
            (" app == 'web'\t", "(app == 'web') && arcguard.io/os != 'windows'"),
            ("a == 'x' || b == 'y'", "(a == 'x' || b == 'y') && arcguard.io/os != 'windows'"),
            // Host endpoints carry no OS label: `!=` keeps them selected.
            ("has(kubernetes-host)", "(has(kubernetes-host)) && arcguard.io/os != 'windows'"),
            (
                "arcguard.io/os == 'windows'",
                "(arcguard.io/os == 'windows') && arcguard.io/os != 'windows'",
            ),
            (
                "arcguard.io/os != 'windows' || a == 'x'",
                "(arcguard.io/os != 'windows' || a == 'x') && arcguard.io/os != 'windows'",
            ),
            // Already scoped: unchanged, byte for byte.
            ("arcguard.io/os != 'windows'", "arcguard.io/os != 'windows'"),
            ("arcguard.io/os!=\"windows\"", "arcguard.io/os!=\"windows\""),
            ("arcguard.io/os not in {'windows'}", "arcguard.io/os not in {'windows'}"),
            (
                "(app == 'web') && arcguard.io/os != 'windows'",
                "(app == 'web') && arcguard.io/os != 'windows'",
            ),
            (
                "app == 'web' && arcguard.io/os != 'windows' && b == 'y'",
                "app == 'web' && arcguard.io/os != 'windows' && b == 'y'",
            ),
            // The legacy clause (which left unlabelled pods out) is replaced.
            ("arcguard.io/os == 'linux'", "arcguard.io/os != 'windows'"),
            (
                "(app == 'web') && arcguard.io/os == 'linux'",
                "(app == 'web') && arcguard.io/os != 'windows'",
            ),
            (
                "(a == 'x' || b == 'y') && arcguard.io/os == 'linux'",
                "(a == 'x' || b == 'y') && arcguard.io/os != 'windows'",
            ),
            ("(all()) && arcguard.io/os == 'linux'", "arcguard.io/os != 'windows'"),
            // A legacy term the author wrote elsewhere in the chain: scoped around it.
            (
                "app == 'web' && arcguard.io/os == 'linux'",
                "(app == 'web' && arcguard.io/os == 'linux') && arcguard.io/os != 'windows'",
            ),
            // Does not parse: wrapped anyway, once.
            ("app ==", "(app ==) && arcguard.io/os != 'windows'"),
            ("(app ==) && arcguard.io/os != 'windows'", "(app ==) && arcguard.io/os != 'windows'"),
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
            "((app == 'web') && arcguard.io/os != 'windows') && example.com/os != 'windows'"
        );
        assert_eq!(once, scope_selector(&scope_selector("app == 'web'", KEY), other));
        assert_eq!(scope_selector(&once, KEY), once);
        assert_eq!(scope_selector(&once, other), once);
        let expr = selector::parse(&once).expect("scoped selector parses");
        assert!(selector::is_scoped_to_linux(&expr, KEY));
        assert!(selector::is_scoped_to_linux(&expr, other));
    }

    /// A pod spec pinned to Linux by nodeSelector.
    fn pinned_linux_spec() -> Value {
        json!({"nodeSelector": {"kubernetes.io/os": "linux"}, "containers": [{"name": "app", "image": "mcr.microsoft.com/app:1"}]})
    }

    /// Facts knowing nodes `lin1` (Linux) and `win1` (Windows).
    fn node_facts() -> StaticFacts {
        StaticFacts {
            nodes: Some(BTreeMap::from([
                ("lin1".to_owned(), Some(Os::Linux)),
                ("win1".to_owned(), Some(Os::Windows)),
            ])),
            ..StaticFacts::default()
        }
    }

    fn set_label(value: &str) -> Mutation {
        Mutation::SetLabel {
            labels_pointer: "/metadata/labels".into(),
            key: KEY.into(),
            value: value.into(),
        }
    }

    fn pin_linux() -> Mutation {
        Mutation::PinNodeOs { spec_pointer: "/spec".into(), os: Os::Linux }
    }

    #[test]
    fn mutate_labels_live_pods_on_create_with_their_os_and_pins_unpinned_ones() {
        let gated =
            json!({"schedulingGates": [{"name": "queue"}], "containers": [{"name": "app"}]});
        let on_windows_node = json!({"nodeName": "win1", "containers": [{"name": "app"}]});
        let on_linux_node = json!({"nodeName": "lin1", "containers": [{"name": "app"}]});
        let on_unknown_node = json!({"nodeName": "new", "containers": [{"name": "app"}]});
        let contradiction =
            json!({"os": {"name": "linux"}, "nodeSelector": {"beta.kubernetes.io/os": "windows"}});
        let beta_windows = json!({"nodeSelector": {"beta.kubernetes.io/os": "windows"}});
        let pin_windows = Mutation::PinNodeOs { spec_pointer: "/spec".into(), os: Os::Windows };
        let create = Operation::Create;
        let cases = [
            (Kind::Pod, create, json!({}), linux_spec(), vec![set_label("linux"), pin_linux()]),
            (Kind::Pod, create, Value::Null, linux_spec(), vec![set_label("linux"), pin_linux()]),
            (Kind::Pod, create, json!({}), pinned_linux_spec(), vec![set_label("linux")]),
            // Pinned by spec.os.name alone (which the scheduler ignores): the nodeSelector too.
            (
                Kind::Pod,
                create,
                json!({"app": "web"}),
                windows_spec(),
                vec![set_label("windows"), pin_windows.clone()],
            ),
            (
                Kind::Pod,
                create,
                json!({}),
                beta_windows,
                vec![set_label("windows"), pin_windows.clone()],
            ),
            // A label the author set is judged by validation, never rewritten.
            (Kind::Pod, create, json!({KEY: "windows"}), pinned_linux_spec(), vec![]),
            (Kind::Pod, create, json!({KEY: "linux"}), linux_spec(), vec![pin_linux()]),
            (Kind::Pod, create, json!({KEY: "linux"}), pinned_linux_spec(), vec![]),
            (Kind::Pod, create, json!({KEY: "windows"}), windows_spec(), vec![pin_windows.clone()]),
            // Gated pods are labelled but left unpinned: their placement may still be set.
            (Kind::Pod, create, json!({}), gated, vec![set_label("linux")]),
            // The node decides; the pin agrees with it.
            (
                Kind::Pod,
                create,
                json!({}),
                on_windows_node,
                vec![set_label("windows"), pin_windows],
            ),
            (Kind::Pod, create, json!({}), on_linux_node, vec![set_label("linux"), pin_linux()]),
            // Validation denies these, saying why.
            (Kind::Pod, create, json!({}), on_unknown_node, vec![]),
            (Kind::Pod, create, json!({}), contradiction, vec![]),
            (Kind::Pod, Operation::Update, json!({}), linux_spec(), vec![]),
            (Kind::PodEphemeralContainers, Operation::Update, json!({}), linux_spec(), vec![]),
            (Kind::PodStatus, Operation::Update, json!({}), linux_spec(), vec![]),
        ];
        let rule = rule(ScopePolicies::Mutate);
        for (kind, operation, labels, spec, want) in cases {
            let object = pod(labels.clone(), spec.clone());
            let view = view_of(kind, operation, &object, None);
            assert_eq!(
                rule.mutate(&view, &node_facts()),
                want,
                "{kind:?} {operation:?} {labels} {spec}"
            );
        }
        // Standalone mode does not know nodes: a pod placed on one is neither labelled nor
        // pinned, and its label is judged by its own signals.
        let placed = pod(json!({KEY: "windows"}), json!({"nodeName": "win1"}));
        let view = view_of(Kind::Pod, Operation::Create, &placed, None);
        assert_eq!(rule.mutate(&view, &StaticFacts::default()), vec![]);
        let findings = rule.validate(&view, &StaticFacts::default());
        assert!(findings.violations[0].contains("is not pinned to Windows"), "{findings:?}");
        let placed = pod(json!({KEY: "linux"}), json!({"nodeName": "lin1"}));
        let view = view_of(Kind::Pod, Operation::Create, &placed, None);
        assert!(rule.validate(&view, &StaticFacts::default()).is_empty());
    }

    #[test]
    fn a_gated_pod_re_pinned_by_an_update_is_relabelled_to_its_new_os() {
        let rule = rule(ScopePolicies::Mutate);
        let gated = |extra: Value| {
            let mut spec =
                json!({"schedulingGates": [{"name": "queue"}], "containers": [{"name": "app"}]});
            if let (Value::Object(spec), Value::Object(extra)) = (&mut spec, extra) {
                spec.extend(extra);
            }
            spec
        };
        let old = pod(json!({KEY: "linux"}), gated(json!({})));
        let cases = [
            (
                gated(json!({"nodeSelector": {"beta.kubernetes.io/os": "windows"}})),
                vec![set_label("windows")],
            ),
            (
                gated(json!({"nodeSelector": {"node.kubernetes.io/windows-build": "10.0.20348"}})),
                vec![set_label("windows")],
            ),
            (gated(json!({"nodeSelector": {"kubernetes.io/os": "linux"}})), vec![]),
            (gated(json!({"nodeSelector": {"zone": "a"}})), vec![]),
        ];
        for (spec, want) in cases {
            let new = pod(json!({KEY: "linux"}), spec.clone());
            let view = view_of(Kind::Pod, Operation::Update, &new, Some(&old));
            assert_eq!(rule.mutate(&view, &node_facts()), want, "{spec}");
            // Validation asks for the new label, and the mutated update passes it.
            let expect_label =
                want.is_empty().then_some(()).map_or(Some("set it to \"windows\""), |()| None);
            assert_finding(&rule, &view, expect_label, &format!("{spec}"));
        }
        // An ungated pod is not relabelled by an update (its signals are immutable).
        let ungated_old = pod(json!({KEY: "linux"}), linux_spec());
        let new = pod(json!({KEY: "linux"}), windows_spec());
        let view = view_of(Kind::Pod, Operation::Update, &new, Some(&ungated_old));
        assert_eq!(rule.mutate(&view, &node_facts()), vec![]);
    }

    #[test]
    fn mutate_leaves_templates_alone_and_honours_label_pods_off() {
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": windows_spec()}}});
        let view = view_of(Kind::Deployment, Operation::Create, &deployment, None);
        assert_eq!(rule(ScopePolicies::Mutate).mutate(&view, &StaticFacts::default()), vec![]);

        let spec = CalicoLinuxOnlySpec {
            label_pods: false,
            scope_policies: ScopePolicies::Validate,
            ..Default::default()
        };
        let rule = CalicoLinuxOnly::compile(&spec).expect("compiles");
        let view = view_of(Kind::Pod, Operation::Create, &pod(json!({}), windows_spec()), None);
        assert_eq!(rule.mutate(&view, &StaticFacts::default()), vec![]);
    }

    #[test]
    fn label_pods_off_with_mutated_scoping_is_refused() {
        let spec = CalicoLinuxOnlySpec { label_pods: false, ..Default::default() };
        let error = CalicoLinuxOnly::compile(&spec).expect_err("refused");
        assert_eq!(error.field, "labelPods");
        assert!(error.message.contains("Windows pods would stay selected"), "{}", error.message);
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
            // Legacy scoping is brought to the current form.
            (Some("(app == 'web') && arcguard.io/os == 'linux'"), json!({}), true),
            (Some("arcguard.io/os in {'linux'}"), json!({}), true),
            (Some("(app == 'web') && arcguard.io/os != 'windows'"), json!({}), false),
            (Some("arcguard.io/os not in {'windows'}"), json!({}), false),
            // An ordinary (not preDNAT) host-endpoint policy is scoped: `!=` keeps host endpoints.
            (Some("has(kubernetes-host)"), json!({}), true),
            // Host-endpoint-only, on a GlobalNetworkPolicy (the only kind that has the
            // fields; a namespaced NetworkPolicy is scoped whatever it says).
            (Some("has(host)"), json!({"preDNAT": true, "applyOnForward": true}), false),
            (Some("has(host)"), json!({"doNotTrack": true, "applyOnForward": true}), false),
            (Some("has(host)"), json!({"preDNAT": false, "doNotTrack": false}), true),
        ];
        let mutate = rule(ScopePolicies::Mutate);
        let validate = rule(ScopePolicies::Validate);
        for (selector, extra, want) in cases {
            for (kind, object) in calico_policies(&calico_spec(selector, &extra)) {
                let host_only_ignored = kind == Kind::CalicoNetworkPolicy && extra != json!({});
                let want = want || host_only_ignored;
                for operation in [Operation::Create, Operation::Update] {
                    let view = view_of(kind, operation, &object, Some(&object));
                    let want = if want {
                        vec![Mutation::ScopeCalicoSelector { key: KEY.into() }]
                    } else {
                        vec![]
                    };
                    assert_eq!(
                        mutate.mutate(&view, &StaticFacts::default()),
                        want,
                        "{kind:?} {operation:?} {selector:?} {extra}"
                    );
                    assert_eq!(
                        validate.mutate(&view, &StaticFacts::default()),
                        vec![],
                        "validate mode never mutates"
                    );
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
            // The legacy requirement is replaced.
            (
                Some(
                    json!({"matchExpressions": [{"key": KEY, "operator": "In", "values": ["linux"]}]}),
                ),
                true,
            ),
            (
                Some(json!({"matchExpressions": [
                    {"key": KEY, "operator": "In", "values": ["linux"]},
                    {"key": KEY, "operator": "NotIn", "values": ["windows"]}]})),
                true,
            ),
            (
                Some(
                    json!({"matchExpressions": [{"key": KEY, "operator": "NotIn", "values": ["windows"]}]}),
                ),
                false,
            ),
            (
                Some(json!({"matchLabels": {"app": "web"}, "matchExpressions": [
                    {"key": "tier", "operator": "Exists"},
                    {"key": KEY, "operator": "NotIn", "values": ["windows"]}]})),
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
                assert_eq!(mutate.mutate(&view, &StaticFacts::default()), want, "{selector:?}");
                assert_eq!(
                    rule(ScopePolicies::Validate).mutate(&view, &StaticFacts::default()),
                    vec![]
                );
            }
        }
    }

    /// Runs `rule.validate` and checks it found exactly the expected violation (by fragment).
    fn assert_finding(rule: &CalicoLinuxOnly, view: &RequestView, want: Option<&str>, case: &str) {
        let findings = rule.validate(view, &node_facts());
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
                Some("drop the arcguard.io/os terms that admit \"windows\""),
            ),
            (ScopePolicies::Mutate, Some("has(arcguard.io/os)"), &none, Some(targets)),
            (ScopePolicies::Mutate, Some("!(arcguard.io/os == 'linux')"), &none, Some(targets)),
            (
                ScopePolicies::Mutate,
                Some("(app ==) && arcguard.io/os == 'linux'"),
                &none,
                Some(
                    "spec.selector \"app ==\" is not a valid Calico selector: expected a quoted string at column 7, found the end of the selector; fix its syntax",
                ),
            ),
            // Validation mode: unscoped policies are denied with the selector to use.
            (
                ScopePolicies::Validate,
                Some("app == 'web'"),
                &none,
                Some(
                    "spec.selector \"app == 'web'\" is not scoped to Linux pods, and Calico network policy applies to Linux pods only on this platform (its Windows dataplane skips rules it cannot render); use selector \"(app == 'web') && arcguard.io/os != 'windows'\"",
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
                Some("use selector \"arcguard.io/os != 'windows'\""),
            ),
            (ScopePolicies::Validate, Some("arcguard.io/os != 'windows'"), &none, None),
            (
                ScopePolicies::Validate,
                Some("has(app) && arcguard.io/os not in {'windows'}"),
                &none,
                None,
            ),
            (
                ScopePolicies::Validate,
                Some("arcguard.io/os != 'windows' || app == 'x'"),
                &none,
                Some(targets),
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
                // preDNAT and doNotTrack exist on GlobalNetworkPolicy only.
                if kind == Kind::CalicoNetworkPolicy && *extra != none {
                    continue;
                }
                for operation in [Operation::Create, Operation::Update] {
                    let view = view_of(kind, operation, &object, Some(&object));
                    let case = format!("{scope:?} {kind:?} {operation:?} {selector:?} {extra}");
                    assert_finding(&rule, &view, want, &case);
                }
            }
        }
        // On a namespaced NetworkPolicy they exempt nothing.
        for (kind, object) in calico_policies(&calico_spec(Some("has(host)"), &no_track)) {
            if kind == Kind::CalicoNetworkPolicy {
                let view = view_of(kind, Operation::Create, &object, None);
                assert_finding(&rule(ScopePolicies::Validate), &view, Some("is not scoped"), "ns");
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
                Some("drop the arcguard.io/os requirements that admit \"windows\""),
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
                    "spec.podSelector is not scoped to Linux pods, and NetworkPolicy is enforced by Calico and Calico network policy applies to Linux pods only on this platform (its Windows dataplane skips rules it cannot render); add {key: arcguard.io/os, operator: NotIn, values: [windows]} to spec.podSelector.matchExpressions",
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
        let not_pinned = "label arcguard.io/os=windows is managed by arcguard, and this pod is \
                          not pinned to Windows";
        let beta_windows = json!({"nodeSelector": {"beta.kubernetes.io/os": "windows"}, "containers": [{"name": "app"}]});
        let on_windows_node = json!({"nodeName": "win1", "containers": [{"name": "app"}]});
        let on_unknown_node = json!({"nodeName": "new", "containers": [{"name": "app"}]});
        let contradiction =
            json!({"os": {"name": "linux"}, "nodeSelector": {"kubernetes.io/os": "windows"}});
        let cases = [
            (Operation::Create, json!({}), linux_spec(), None, None),
            (Operation::Create, json!({KEY: "linux"}), linux_spec(), None, None),
            (Operation::Create, json!({KEY: "linux"}), pinned_linux_spec(), None, None),
            (Operation::Create, json!({KEY: "windows"}), windows_spec(), None, None),
            (Operation::Create, json!({KEY: "windows"}), beta_windows.clone(), None, None),
            (Operation::Create, json!({KEY: "windows"}), on_windows_node.clone(), None, None),
            (Operation::Create, json!({KEY: "windows"}), linux_spec(), None, Some(not_pinned)),
            (
                Operation::Create,
                json!({KEY: "windows"}),
                pinned_linux_spec(),
                None,
                Some(falsified),
            ),
            (Operation::Create, json!({KEY: ""}), linux_spec(), None, Some(falsified)),
            (
                Operation::Create,
                json!({KEY: "linux"}),
                windows_spec(),
                None,
                Some("this pod runs on windows; remove the label or set it to \"windows\""),
            ),
            (
                Operation::Create,
                json!({KEY: "linux"}),
                beta_windows.clone(),
                None,
                Some("this pod runs on windows"),
            ),
            (
                Operation::Create,
                json!({KEY: "linux"}),
                on_windows_node.clone(),
                None,
                Some("this pod runs on windows"),
            ),
            (
                Operation::Create,
                json!({}),
                on_unknown_node.clone(),
                None,
                Some("places this pod on node \"new\", which arcguard does not know"),
            ),
            (
                Operation::Create,
                json!({}),
                contradiction.clone(),
                None,
                Some(
                    "this pod can never run: spec.os.name \"linux\" admits Linux only, but nodeSelector kubernetes.io/os=windows admits Windows",
                ),
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
                pinned_linux_spec(),
                Some(json!({KEY: "linux"})),
                Some("this pod runs on linux; set it to \"linux\""),
            ),
            (
                Operation::Update,
                json!({KEY: "windows"}),
                linux_spec(),
                Some(json!({KEY: "linux"})),
                Some(
                    "pin it with spec.os.name: windows and nodeSelector kubernetes.io/os: windows, or set the label to \"linux\"",
                ),
            ),
            (
                Operation::Update,
                json!({KEY: "windows"}),
                pinned_linux_spec(),
                Some(json!({})),
                Some(falsified),
            ),
            // A pod created before arcguard, pinned to Windows by the beta label: correcting
            // its label is admitted, falsifying it is not.
            (
                Operation::Update,
                json!({KEY: "windows"}),
                beta_windows.clone(),
                Some(json!({})),
                None,
            ),
            (
                Operation::Update,
                json!({KEY: "linux"}),
                beta_windows,
                Some(json!({})),
                Some("this pod runs on windows; remove the label or set it to \"windows\""),
            ),
            // Bound to a Windows node: the node is the truth.
            (
                Operation::Update,
                json!({KEY: "windows"}),
                on_windows_node.clone(),
                Some(json!({})),
                None,
            ),
            (
                Operation::Update,
                json!({KEY: "linux"}),
                on_windows_node,
                Some(json!({KEY: "windows"})),
                Some("this pod runs on windows; set it to \"windows\""),
            ),
            // A node arcguard cannot see: the label may not change, other updates pass.
            (
                Operation::Update,
                json!({KEY: "linux", "a": "b"}),
                on_unknown_node.clone(),
                Some(json!({KEY: "linux"})),
                None,
            ),
            (
                Operation::Update,
                json!({KEY: "windows"}),
                on_unknown_node,
                Some(json!({KEY: "linux"})),
                Some("label arcguard.io/os is managed by arcguard and cannot be changed now"),
            ),
        ];
        for rule in [rule(ScopePolicies::Mutate), rule(ScopePolicies::Validate)] {
            for (operation, labels, spec, old_labels, want) in &cases {
                let object = pod(labels.clone(), spec.clone());
                let old = old_labels.as_ref().map(|l| pod(l.clone(), spec.clone()));
                // A pods/status write is judged like an UPDATE of the pod.
                let kinds: &[Kind] = match operation {
                    Operation::Update => &[Kind::Pod, Kind::PodStatus],
                    _ => &[Kind::Pod],
                };
                for kind in kinds {
                    let view = view_of(*kind, *operation, &object, old.as_ref());
                    assert_finding(
                        &rule,
                        &view,
                        *want,
                        &format!("{kind:?} {operation:?} {labels} {spec} {old_labels:?}"),
                    );
                }
            }
        }
    }

    fn binding_view(pod_name: &str, node: &str) -> RequestView {
        labelled_binding_view(pod_name, node, json!({}))
    }

    fn labelled_binding_view(pod_name: &str, node: &str, labels: Value) -> RequestView {
        let object = json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": pod_name, "namespace": "default", "labels": labels},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        view_of(Kind::PodBinding, Operation::Create, &object, None)
    }

    fn with_pod(mut facts: StaticFacts, name: &str, object: &Value) -> StaticFacts {
        let pod: crate::admission::objects::PodTemplateSpec =
            serde_json::from_value(object.clone()).expect("pod decodes");
        facts.pods.get_or_insert_with(BTreeMap::new).insert(
            ("default".to_owned(), name.to_owned()),
            crate::rules::PodFact::Found(Box::new(pod)),
        );
        facts
    }

    #[test]
    fn bindings_may_not_put_a_pod_on_a_node_of_another_os_than_its_label() {
        let rule = rule(ScopePolicies::Mutate);
        let cases = [
            (json!({KEY: "linux"}), pinned_linux_spec(), "lin1", None),
            (json!({KEY: "windows"}), windows_spec(), "win1", None),
            // Unlabelled and unpinned (created before arcguard): the labeller will label it.
            (json!({}), linux_spec(), "win1", None),
            (
                json!({KEY: "linux"}),
                linux_spec(),
                "win1",
                Some(
                    "pod default/p is Linux (arcguard.io/os=linux) but node \"win1\" runs windows: bind it to a Linux node",
                ),
            ),
            (
                json!({KEY: "windows"}),
                windows_spec(),
                "lin1",
                Some("but node \"lin1\" runs linux: bind it to a Windows node"),
            ),
            (json!({}), windows_spec(), "lin1", Some("pod default/p is Windows")),
            (
                json!({KEY: "linux"}),
                linux_spec(),
                "new",
                Some("node \"new\" is not known to arcguard (yet)"),
            ),
        ];
        for (labels, spec, node, want) in cases {
            let facts = with_pod(node_facts(), "p", &pod(labels.clone(), spec.clone()));
            let view = binding_view("p", node);
            let findings = rule.validate(&view, &facts);
            match want {
                None => assert_eq!(findings.violations, Vec::<String>::new(), "{labels} {node}"),
                Some(want) => {
                    assert_eq!(findings.violations.len(), 1, "{labels} {node}");
                    assert!(
                        findings.violations[0].contains(want),
                        "{labels} {node}: {:?}",
                        findings.violations
                    );
                }
            }
        }
        // A pod that could not be read: refused, to be retried; one that does not exist: the
        // apiserver answers; standalone mode: not judged.
        let mut facts = node_facts();
        facts.pods = Some(BTreeMap::from([(
            ("default".to_owned(), "p".to_owned()),
            crate::rules::PodFact::Failed("timed out".to_owned()),
        )]));
        let findings = rule.validate(&binding_view("p", "win1"), &facts);
        assert!(findings.violations[0].contains("could not be read"), "{findings:?}");
        let mut facts = node_facts();
        facts.pods = Some(BTreeMap::from([(
            ("default".to_owned(), "p".to_owned()),
            crate::rules::PodFact::NotFound,
        )]));
        let findings = rule.validate(&binding_view("p", "win1"), &facts);
        assert!(findings.violations[0].contains("was not found"), "{findings:?}");
        assert!(rule.validate(&binding_view("p", "win1"), &StaticFacts::default()).is_empty());

        // The apiserver copies a binding's labels onto the pod: the OS label may not ride along.
        let facts = with_pod(node_facts(), "p", &pod(json!({KEY: "linux"}), pinned_linux_spec()));
        for (node, labels, refused) in [
            ("lin1", json!({KEY: "windows"}), true),
            ("win1", json!({KEY: "linux"}), true),
            ("lin1", json!({KEY: "linux", "topology.kubernetes.io/zone": "a"}), false),
            ("lin1", json!({"topology.kubernetes.io/zone": "a"}), false),
        ] {
            let findings = rule.validate(&labelled_binding_view("p", node, labels.clone()), &facts);
            assert_eq!(
                findings.violations.len(),
                usize::from(refused),
                "{node} {labels}: {findings:?}"
            );
            if refused {
                assert!(
                    findings.violations[0].contains("remove the label from the binding"),
                    "{findings:?}"
                );
            }
        }
        let standalone = labelled_binding_view("p", "lin1", json!({KEY: "windows"}));
        assert!(!rule.validate(&standalone, &StaticFacts::default()).is_empty());
    }

    #[test]
    fn validate_ignores_templates_and_the_ephemeral_containers_subresource() {
        let rule = rule(ScopePolicies::Validate);
        let falsified = pod(json!({KEY: "windows"}), linux_spec());
        let view =
            view_of(Kind::PodEphemeralContainers, Operation::Update, &falsified, Some(&falsified));
        assert_finding(&rule, &view, None, "ephemeral containers");
        // A template's OS label is judged against the template's own signals.
        let deployment = |labels: Value, spec: Value| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                "spec": {"template": {"metadata": {"labels": labels}, "spec": spec}}})
        };
        let false_label =
            "the pod template's label arcguard.io/os=windows is false: its pods run on linux";
        let cases = [
            (json!({KEY: "windows"}), linux_spec(), Some(false_label)),
            (json!({KEY: "windows"}), pinned_linux_spec(), Some(false_label)),
            (json!({KEY: "linux"}), windows_spec(), Some("label arcguard.io/os=linux is false")),
            (json!({KEY: "linux"}), linux_spec(), None),
            (json!({KEY: "windows"}), windows_spec(), None),
            (json!({"app": "web"}), windows_spec(), None),
        ];
        for (labels, spec, want) in cases {
            let object = deployment(labels.clone(), spec.clone());
            let view = view_of(Kind::Deployment, Operation::Create, &object, None);
            assert_finding(&rule, &view, want, &format!("deployment {labels} {spec}"));
        }
    }

    /// Mutates `object`, applies the patch, and returns the patched object and its view.
    fn mutated(rule: &CalicoLinuxOnly, kind: Kind, object: &Value) -> (Value, RequestView) {
        let view = view_of(kind, Operation::Create, object, None);
        let mutations: BTreeSet<Mutation> =
            rule.mutate(&view, &StaticFacts::default()).into_iter().collect();
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
            let again: BTreeSet<Mutation> =
                mutating.mutate(&view, &StaticFacts::default()).into_iter().collect();
            assert_eq!(patch::build(&raw(&patched), &again).expect("json"), None, "{patched}");
            match kind {
                Kind::Pod => {
                    let pod = view.pod().expect("pod view");
                    assert_eq!(
                        pod.labels.get(KEY).map(String::as_str),
                        Some(os::detect(&pod.spec).os().as_str())
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
                "(arcguard.io/os == 'windows') && arcguard.io/os != 'windows'"
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
