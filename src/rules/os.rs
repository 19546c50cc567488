//! Which operating system a pod runs on: from the signals the scheduler and kubelet enforce,
//! and, in cluster mode, from the node the pod is placed on.
//!
//! A pod can only run where every enforced signal agrees, so each signal narrows the set of
//! operating systems the pod may run on ([`OsSet`]); what remains decides:
//! - one OS: the pod is [`PodOs::Pinned`] to it;
//! - both: [`PodOs::Unpinned`]; the scheduler may place it on a Linux or a Windows node
//!   (`calicoLinuxOnly` pins such pods to Linux on creation, so its OS label is true);
//! - none: [`PodOs::Contradiction`], a pod that can never run (denied with the reason).
//!
//! The signals, as the scheduler and kubelet enforce them (Kubernetes docs, "Assigning Pods to
//! Nodes" and "Windows containers in Kubernetes"; the kubelet rejects a pod whose `spec.os.name`
//! or node selector does not match its node):
//! - `spec.os.name`;
//! - `spec.nodeSelector` on `kubernetes.io/os` or `beta.kubernetes.io/os` (RuntimeClass
//!   scheduling selectors are merged into it before admission webhooks run), or on
//!   `node.kubernetes.io/windows-build`, a label only Windows nodes carry;
//! - required node affinity: the terms are ORed, so the pod may run on the union of what each
//!   term admits; within a term the requirements on those labels narrow it;
//! - the node itself, in cluster mode: `spec.nodeName`, or required node affinity whose every
//!   term pins `metadata.name` (how DaemonSet pods are placed), judged by the node's
//!   `kubernetes.io/os` label from a watch-backed cache.
//!
//! `windowsOptions` alone is a hint the kubelet ignores on Linux nodes: counting it would let a
//! Linux pod opt out of Linux-only network policy, so it does not count.

use std::fmt;

use crate::admission::objects::{Labels, NodeSelectorTerm, PodSpec, SelectorRequirement};

/// The node label that carries a node's operating system (set by the kubelet).
pub const NODE_OS_LABEL: &str = "kubernetes.io/os";
/// The deprecated node label that still carries a node's operating system.
pub const BETA_NODE_OS_LABEL: &str = "beta.kubernetes.io/os";
/// The node label with the Windows build number, carried by Windows nodes only.
pub const WINDOWS_BUILD_LABEL: &str = "node.kubernetes.io/windows-build";

/// An operating system a pod runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Os {
    /// Linux.
    Linux,
    /// Windows.
    Windows,
}

impl Os {
    /// The label value: `linux` or `windows`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linux => "linux",
            Self::Windows => "windows",
        }
    }

    /// The OS a label value names, if any.
    pub fn from_label(value: &str) -> Option<Self> {
        match value {
            "linux" => Some(Self::Linux),
            "windows" => Some(Self::Windows),
            _ => None,
        }
    }

    /// `Linux` or `Windows`, for messages.
    pub fn title(self) -> &'static str {
        match self {
            Self::Linux => "Linux",
            Self::Windows => "Windows",
        }
    }
}

impl fmt::Display for Os {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operating systems a pod may still run on, after some signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsSet {
    /// Linux nodes are possible.
    pub linux: bool,
    /// Windows nodes are possible.
    pub windows: bool,
}

impl OsSet {
    /// Both operating systems: no signal yet.
    pub const ANY: Self = Self { linux: true, windows: true };
    /// Neither: the signals exclude every node of this cluster.
    pub const NONE: Self = Self { linux: false, windows: false };

    /// Just `os`.
    pub fn only(os: Os) -> Self {
        match os {
            Os::Linux => Self { linux: true, windows: false },
            Os::Windows => Self { linux: false, windows: true },
        }
    }

    fn and(self, other: Self) -> Self {
        Self { linux: self.linux && other.linux, windows: self.windows && other.windows }
    }

    fn or(self, other: Self) -> Self {
        Self { linux: self.linux || other.linux, windows: self.windows || other.windows }
    }

    /// The single OS, when exactly one is possible.
    pub fn single(self) -> Option<Os> {
        match (self.linux, self.windows) {
            (true, false) => Some(Os::Linux),
            (false, true) => Some(Os::Windows),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match (self.linux, self.windows) {
            (true, false) => "Linux",
            (false, true) => "Windows",
            (true, true) => "Linux or Windows",
            (false, false) => "neither Linux nor Windows",
        }
    }
}

/// What the cluster knows of a node's operating system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeOs {
    /// The node exists and its `kubernetes.io/os` label names this OS.
    Known(Os),
    /// The node is not in the cache (not created yet, or just created), or carries no OS label
    /// arcguard knows.
    Unknown,
    /// Nodes are not looked up (standalone mode): only the pod's own signals count.
    NotChecked,
}

/// The operating system of a node, from its labels (`kubernetes.io/os`, else the beta label).
pub fn node_os(labels: &Labels) -> Option<Os> {
    labels
        .get(NODE_OS_LABEL)
        .or_else(|| labels.get(BETA_NODE_OS_LABEL))
        .and_then(|value| Os::from_label(value))
}

/// A pod's operating system, as far as the signals and the node decide it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodOs {
    /// Only nodes of `os` can run the pod; `by` names the signal that decided it.
    Pinned {
        /// The OS.
        os: Os,
        /// The signal that pinned it, for messages (`spec.os.name`, `node "n1"`, ...).
        by: String,
    },
    /// No signal pins the pod: Linux and Windows nodes can both run it.
    Unpinned,
    /// The signals exclude each other: the pod can never run. The text says which.
    Contradiction(String),
    /// The pod is placed on a node arcguard does not know (yet), and nothing else pins it.
    UnknownNode(String),
}

impl PodOs {
    /// The OS the pod is treated as: Windows only when pinned to Windows.
    pub fn os(&self) -> Os {
        match self {
            Self::Pinned { os, .. } => *os,
            _ => Os::Linux,
        }
    }

    /// Whether the pod is pinned to Windows.
    pub fn is_windows(&self) -> bool {
        self.os() == Os::Windows
    }

    /// Why a pod that cannot be judged is denied, with what to change; `None` when it can be
    /// judged.
    pub fn problem(&self) -> Option<String> {
        match self {
            Self::Contradiction(why) => Some(format!(
                "this pod can never run: {why}; make its operating system signals agree \
                 (spec.os.name, nodeSelector and required node affinity on kubernetes.io/os)"
            )),
            Self::UnknownNode(node) => Some(format!(
                "spec.nodeName (or node affinity on metadata.name) places this pod on node \
                 {node:?}, which arcguard does not know (yet) or which has no kubernetes.io/os \
                 label; retry once the node is registered, or set spec.os.name to the node's \
                 operating system"
            )),
            Self::Pinned { .. } | Self::Unpinned => None,
        }
    }
}

/// One constraint from one signal: its description and what it admits.
struct Constraint {
    by: String,
    admits: OsSet,
}

/// What one node-selector requirement admits, or `None` when it says nothing about the OS.
fn requirement_admits(req: &SelectorRequirement) -> Option<OsSet> {
    let values: Vec<Option<Os>> = req.values.iter().map(|v| Os::from_label(v)).collect();
    let set_of = |values: &[Option<Os>]| OsSet {
        linux: values.contains(&Some(Os::Linux)),
        windows: values.contains(&Some(Os::Windows)),
    };
    if req.key == NODE_OS_LABEL || req.key == BETA_NODE_OS_LABEL {
        return match req.operator.as_str() {
            "In" => Some(set_of(&values)),
            "NotIn" => {
                let excluded = set_of(&values);
                Some(OsSet { linux: !excluded.linux, windows: !excluded.windows })
            }
            // Every kubelet sets the label: no node of either OS lacks it.
            "DoesNotExist" => Some(OsSet::NONE),
            _ => None,
        };
    }
    if req.key == WINDOWS_BUILD_LABEL {
        return match req.operator.as_str() {
            "In" if !req.values.is_empty() => Some(OsSet::only(Os::Windows)),
            "Exists" | "Gt" | "Lt" => Some(OsSet::only(Os::Windows)),
            "DoesNotExist" => Some(OsSet::only(Os::Linux)),
            _ => None,
        };
    }
    None
}

/// What one node-selector term admits (its requirements are ANDed). A term with no
/// requirement at all matches no node (Kubernetes API docs, NodeSelectorTerm).
fn term_admits(term: &NodeSelectorTerm) -> OsSet {
    if term.match_expressions.is_empty() && term.match_fields.is_empty() {
        return OsSet::NONE;
    }
    term.match_expressions.iter().filter_map(requirement_admits).fold(OsSet::ANY, OsSet::and)
}

fn required_terms(spec: &PodSpec) -> &[NodeSelectorTerm] {
    spec.affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .map(|s| s.node_selector_terms.as_slice())
        .unwrap_or_default()
}

/// The pod's own signals, in the order messages name them.
fn own_constraints(spec: &PodSpec) -> Vec<Constraint> {
    let mut constraints = Vec::new();
    if let Some(os) = &spec.os {
        let admits = Os::from_label(&os.name).map_or(OsSet::NONE, OsSet::only);
        constraints.push(Constraint { by: format!("spec.os.name {:?}", os.name), admits });
    }
    for key in [NODE_OS_LABEL, BETA_NODE_OS_LABEL] {
        if let Some(value) = spec.node_selector().get(key) {
            let admits = Os::from_label(value).map_or(OsSet::NONE, OsSet::only);
            constraints.push(Constraint { by: format!("nodeSelector {key}={value}"), admits });
        }
    }
    if spec.node_selector().contains_key(WINDOWS_BUILD_LABEL) {
        constraints.push(Constraint {
            by: format!("nodeSelector {WINDOWS_BUILD_LABEL}"),
            admits: OsSet::only(Os::Windows),
        });
    }
    let terms = required_terms(spec);
    if !terms.is_empty() {
        let admits = terms.iter().map(term_admits).fold(OsSet::NONE, OsSet::or);
        if admits != OsSet::ANY {
            constraints.push(Constraint { by: "required node affinity".to_owned(), admits });
        }
    }
    constraints
}

/// The nodes the pod is placed on: `spec.nodeName`, or the names every required affinity term
/// pins through `matchFields` on `metadata.name`.
pub fn placement(spec: &PodSpec) -> Vec<&str> {
    if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        return vec![node];
    }
    let terms = required_terms(spec);
    let pinned = |term: &&NodeSelectorTerm| {
        term.match_fields.iter().any(|f| f.key == "metadata.name" && f.operator == "In")
    };
    if terms.is_empty() || !terms.iter().all(|t| pinned(&t)) {
        return Vec::new();
    }
    let mut nodes: Vec<&str> = terms
        .iter()
        .flat_map(|t| t.match_fields.iter())
        .filter(|f| f.key == "metadata.name" && f.operator == "In")
        .flat_map(|f| f.values.iter().map(String::as_str))
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// The pod's operating system from its own signals and the nodes it is placed on, as
/// `node_os` reports them.
pub fn resolve(spec: &PodSpec, node_os: &dyn Fn(&str) -> NodeOs) -> PodOs {
    let mut constraints = own_constraints(spec);
    let own_pinned = constraints.iter().fold(OsSet::ANY, |acc, c| acc.and(c.admits)).single();
    let nodes = placement(spec);
    if !nodes.is_empty() {
        let mut admits = OsSet::NONE;
        let mut unknown = None;
        for node in &nodes {
            match node_os(node) {
                NodeOs::Known(os) => admits = admits.or(OsSet::only(os)),
                NodeOs::Unknown => unknown = unknown.or(Some(*node)),
                NodeOs::NotChecked => admits = OsSet::ANY,
            }
        }
        match unknown {
            // The kubelet enforces the pod's own signals on whatever node it lands on.
            Some(_) if own_pinned.is_some() => {}
            Some(node) => return PodOs::UnknownNode(node.to_owned()),
            None => {
                let by = match nodes.as_slice() {
                    [node] => format!("node {node:?}"),
                    _ => format!("nodes {}", nodes.join(", ")),
                };
                // The node first: it is the truth, and a nodeSelector arcguard itself added
                // on creation should not be named as what made the pod Windows.
                constraints.insert(0, Constraint { by, admits });
            }
        }
    }
    let mut admitted = OsSet::ANY;
    let mut pinned_by: Option<&str> = None;
    for (i, constraint) in constraints.iter().enumerate() {
        let next = admitted.and(constraint.admits);
        if next == OsSet::NONE {
            let earlier: Vec<&str> = constraints[..i].iter().map(|c| c.by.as_str()).collect();
            return PodOs::Contradiction(if earlier.is_empty() {
                format!("{} admits {}", constraint.by, constraint.admits.describe())
            } else {
                format!(
                    "{} admits {} only, but {} admits {}",
                    earlier.join(" and "),
                    admitted.describe(),
                    constraint.by,
                    constraint.admits.describe()
                )
            });
        }
        if pinned_by.is_none() && next.single().is_some() {
            pinned_by = Some(&constraint.by);
        }
        admitted = next;
    }
    match (admitted.single(), pinned_by) {
        (Some(os), Some(by)) => PodOs::Pinned { os, by: by.to_owned() },
        _ => PodOs::Unpinned,
    }
}

/// [`resolve`] from the pod's own signals alone (standalone mode, templates).
pub fn detect(spec: &PodSpec) -> PodOs {
    resolve(spec, &|_| NodeOs::NotChecked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> PodSpec {
        serde_json::from_value(json).expect("test spec decodes")
    }

    fn affinity(terms: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}})
    }

    fn nodes(name: &str) -> NodeOs {
        match name {
            "lin1" | "lin2" => NodeOs::Known(Os::Linux),
            "win1" | "win2" => NodeOs::Known(Os::Windows),
            _ => NodeOs::Unknown,
        }
    }

    /// `Some(Some(os))` pinned, `Some(None)` unpinned, `None` contradiction.
    fn outcome(pod: &PodOs) -> &'static str {
        match pod {
            PodOs::Pinned { os: Os::Linux, .. } => "linux",
            PodOs::Pinned { os: Os::Windows, .. } => "windows",
            PodOs::Unpinned => "unpinned",
            PodOs::Contradiction(_) => "contradiction",
            PodOs::UnknownNode(_) => "unknown-node",
        }
    }

    #[test]
    fn each_signal_and_each_combination_decides_the_os() {
        use serde_json::json;
        let os_in = |key: &str, op: &str, values: &[&str]| json!([{"matchExpressions": [{"key": key, "operator": op, "values": values}]}]);
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("no signal", json!({}), "unpinned"),
            ("spec.os windows", json!({"os": {"name": "windows"}}), "windows"),
            ("spec.os linux", json!({"os": {"name": "linux"}}), "linux"),
            (
                "nodeSelector os",
                json!({"nodeSelector": {"kubernetes.io/os": "windows"}}),
                "windows",
            ),
            (
                "nodeSelector os linux",
                json!({"nodeSelector": {"kubernetes.io/os": "linux"}}),
                "linux",
            ),
            (
                "nodeSelector beta os",
                json!({"nodeSelector": {"beta.kubernetes.io/os": "windows"}}),
                "windows",
            ),
            (
                "nodeSelector beta os linux",
                json!({"nodeSelector": {"beta.kubernetes.io/os": "linux"}}),
                "linux",
            ),
            (
                "nodeSelector windows-build",
                json!({"nodeSelector": {"node.kubernetes.io/windows-build": "10.0.20348"}}),
                "windows",
            ),
            (
                "nodeSelector other os",
                json!({"nodeSelector": {"kubernetes.io/os": "plan9"}}),
                "contradiction",
            ),
            ("nodeSelector unrelated", json!({"nodeSelector": {"zone": "a"}}), "unpinned"),
            (
                "affinity In windows",
                affinity(os_in("kubernetes.io/os", "In", &["windows"])),
                "windows",
            ),
            (
                "affinity beta In windows",
                affinity(os_in("beta.kubernetes.io/os", "In", &["windows"])),
                "windows",
            ),
            ("affinity In linux", affinity(os_in("kubernetes.io/os", "In", &["linux"])), "linux"),
            (
                "affinity NotIn linux",
                affinity(os_in("kubernetes.io/os", "NotIn", &["linux"])),
                "windows",
            ),
            (
                "affinity NotIn windows",
                affinity(os_in("kubernetes.io/os", "NotIn", &["windows"])),
                "linux",
            ),
            (
                "affinity In both",
                affinity(os_in("kubernetes.io/os", "In", &["linux", "windows"])),
                "unpinned",
            ),
            ("affinity os Exists", affinity(os_in("kubernetes.io/os", "Exists", &[])), "unpinned"),
            (
                "affinity os DoesNotExist",
                affinity(os_in("kubernetes.io/os", "DoesNotExist", &[])),
                "contradiction",
            ),
            (
                "affinity windows-build Exists",
                affinity(os_in("node.kubernetes.io/windows-build", "Exists", &[])),
                "windows",
            ),
            (
                "affinity windows-build In",
                affinity(os_in("node.kubernetes.io/windows-build", "In", &["10.0.17763"])),
                "windows",
            ),
            (
                "affinity windows-build DoesNotExist",
                affinity(os_in("node.kubernetes.io/windows-build", "DoesNotExist", &[])),
                "linux",
            ),
            (
                "affinity: one term of two pins windows",
                affinity(json!([
                    {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}])),
                "unpinned",
            ),
            (
                "affinity: every term pins windows",
                affinity(json!([
                    {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]},
                    {"matchExpressions": [{"key": "beta.kubernetes.io/os", "operator": "In", "values": ["windows"]}, {"key": "zone", "operator": "In", "values": ["a"]}]}])),
                "windows",
            ),
            (
                "affinity: terms pin different OSes",
                affinity(json!([
                    {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]},
                    {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}])),
                "unpinned",
            ),
            // An empty term matches no node: the other term alone decides.
            (
                "affinity: windows term and an empty term",
                affinity(json!([
                    {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]},
                    {}])),
                "windows",
            ),
            ("affinity: only an empty term", affinity(json!([{}])), "contradiction"),
            (
                "affinity: one term contradicts itself",
                affinity(json!([{"matchExpressions": [
                    {"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]},
                    {"key": "beta.kubernetes.io/os", "operator": "In", "values": ["linux"]}]}])),
                "contradiction",
            ),
            // windowsOptions alone is only a hint.
            (
                "windowsOptions only",
                json!({"securityContext": {"windowsOptions": {"gmsaCredentialSpecName": "x"}}}),
                "unpinned",
            ),
            // Combinations.
            (
                "spec.os linux + nodeSelector windows",
                json!({"os": {"name": "linux"}, "nodeSelector": {"kubernetes.io/os": "windows"}}),
                "contradiction",
            ),
            (
                "spec.os windows + beta nodeSelector linux",
                json!({"os": {"name": "windows"}, "nodeSelector": {"beta.kubernetes.io/os": "linux"}}),
                "contradiction",
            ),
            (
                "nodeSelector os linux + beta windows",
                json!({"nodeSelector": {"kubernetes.io/os": "linux", "beta.kubernetes.io/os": "windows"}}),
                "contradiction",
            ),
            (
                "nodeSelector linux + windows-build",
                json!({"nodeSelector": {"kubernetes.io/os": "linux", "node.kubernetes.io/windows-build": "10.0.20348"}}),
                "contradiction",
            ),
            (
                "spec.os windows + nodeSelector windows + affinity windows",
                {
                    let mut v = affinity(os_in("kubernetes.io/os", "In", &["windows"]));
                    v["os"] = json!({"name": "windows"});
                    v["nodeSelector"] = json!({"kubernetes.io/os": "windows"});
                    v
                },
                "windows",
            ),
            (
                "nodeSelector windows + affinity linux",
                {
                    let mut v = affinity(os_in("kubernetes.io/os", "In", &["linux"]));
                    v["nodeSelector"] = json!({"kubernetes.io/os": "windows"});
                    v
                },
                "contradiction",
            ),
            // Placement on a node, judged by the node's OS.
            ("nodeName windows node", json!({"nodeName": "win1"}), "windows"),
            ("nodeName linux node", json!({"nodeName": "lin1"}), "linux"),
            ("nodeName unknown node", json!({"nodeName": "new"}), "unknown-node"),
            (
                "nodeName unknown node, pinned by spec.os",
                json!({"nodeName": "new", "os": {"name": "windows"}}),
                "windows",
            ),
            (
                "nodeName linux node, spec.os windows",
                json!({"nodeName": "lin1", "os": {"name": "windows"}}),
                "contradiction",
            ),
            (
                "nodeName windows node, nodeSelector linux",
                json!({"nodeName": "win1", "nodeSelector": {"kubernetes.io/os": "linux"}}),
                "contradiction",
            ),
            (
                "DaemonSet-style matchFields on a windows node",
                affinity(
                    json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["win1"]}]}]),
                ),
                "windows",
            ),
            (
                "matchFields on nodes of both OSes",
                affinity(
                    json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["win1", "lin1"]}]}]),
                ),
                "unpinned",
            ),
            (
                "matchFields in one term only: not a placement",
                affinity(json!([
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["win1"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}])),
                "unpinned",
            ),
        ];
        for (name, json, want) in cases {
            let resolved = resolve(&spec(json.clone()), &nodes);
            assert_eq!(outcome(&resolved), want, "{name}: {json} -> {resolved:?}");
        }
    }

    #[test]
    fn contradictions_name_both_signals_and_pins_name_the_signal() {
        let pod = spec(
            serde_json::json!({"os": {"name": "linux"}, "nodeSelector": {"beta.kubernetes.io/os": "windows"}}),
        );
        let PodOs::Contradiction(why) = detect(&pod) else { panic!("contradiction expected") };
        assert_eq!(
            why,
            "spec.os.name \"linux\" admits Linux only, but nodeSelector beta.kubernetes.io/os=windows admits Windows"
        );
        let pod = spec(serde_json::json!({"nodeName": "lin1", "os": {"name": "windows"}}));
        let PodOs::Contradiction(why) = resolve(&pod, &nodes) else { panic!("contradiction") };
        assert_eq!(
            why,
            "node \"lin1\" admits Linux only, but spec.os.name \"windows\" admits Windows"
        );
        let pod = spec(serde_json::json!({"nodeName": "win2"}));
        assert_eq!(
            resolve(&pod, &nodes),
            PodOs::Pinned { os: Os::Windows, by: "node \"win2\"".to_owned() }
        );
        let problem = PodOs::UnknownNode("n9".into()).problem().expect("a problem");
        assert!(problem.contains("node \"n9\", which arcguard does not know"), "{problem}");
    }

    #[test]
    fn standalone_mode_ignores_the_node() {
        let pod = spec(serde_json::json!({"nodeName": "win1"}));
        assert_eq!(detect(&pod), PodOs::Unpinned);
        let pod = spec(serde_json::json!({"nodeName": "win1", "os": {"name": "windows"}}));
        assert_eq!(outcome(&detect(&pod)), "windows");
    }

    #[test]
    fn node_os_reads_the_label_then_the_beta_label() {
        let labels = |pairs: &[(&str, &str)]| -> Labels {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert_eq!(node_os(&labels(&[("kubernetes.io/os", "windows")])), Some(Os::Windows));
        assert_eq!(node_os(&labels(&[("beta.kubernetes.io/os", "linux")])), Some(Os::Linux));
        assert_eq!(
            node_os(&labels(&[
                ("kubernetes.io/os", "linux"),
                ("beta.kubernetes.io/os", "windows")
            ])),
            Some(Os::Linux)
        );
        assert_eq!(node_os(&labels(&[("kubernetes.io/os", "plan9")])), None);
        assert_eq!(node_os(&labels(&[])), None);
    }
}
