//! Which operating system a pod runs on, from the signals the scheduler and kubelet enforce.

use crate::admission::objects::PodSpec;

/// The node label that carries a node's operating system.
pub const NODE_OS_LABEL: &str = "kubernetes.io/os";

/// A pod's operating system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Os {
    /// Linux (also any pod with no OS signal).
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
}

/// The operating system a pod spec can only run on.
///
/// Only signals that the scheduler and kubelet enforce count, strongest first: `spec.os.name`,
/// `nodeSelector["kubernetes.io/os"]` (RuntimeClass selectors are merged into it before
/// admission), and required node affinity whose every term pins `kubernetes.io/os` to
/// `windows`. `windowsOptions` alone is a hint the kubelet ignores on Linux nodes: counting it
/// would let a Linux pod opt out of Linux-only network policy, so it does not count.
pub fn detect(spec: &PodSpec) -> Os {
    if let Some(os) = &spec.os {
        match os.name.as_str() {
            "windows" => return Os::Windows,
            "linux" => return Os::Linux,
            _ => {}
        }
    }
    if let Some(value) = spec.node_selector.get(NODE_OS_LABEL) {
        return if value == "windows" { Os::Windows } else { Os::Linux };
    }
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .map(|s| s.node_selector_terms.as_slice())
        .unwrap_or_default();
    let pins_windows = |term: &crate::admission::objects::NodeSelectorTerm| {
        term.match_expressions.iter().any(|e| {
            e.key == NODE_OS_LABEL
                && e.operator == "In"
                && !e.values.is_empty()
                && e.values.iter().all(|v| v == "windows")
        })
    };
    if !terms.is_empty() && terms.iter().all(pins_windows) {
        return Os::Windows;
    }
    Os::Linux
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> PodSpec {
        serde_json::from_value(json).expect("test spec decodes")
    }

    #[test]
    fn detects_each_signal_and_defaults_to_linux() {
        let cases = [
            (serde_json::json!({}), Os::Linux),
            (serde_json::json!({"os": {"name": "windows"}}), Os::Windows),
            (
                serde_json::json!({"os": {"name": "linux"}, "nodeSelector": {"kubernetes.io/os": "windows"}}),
                Os::Linux,
            ),
            (serde_json::json!({"nodeSelector": {"kubernetes.io/os": "windows"}}), Os::Windows),
            (serde_json::json!({"nodeSelector": {"kubernetes.io/os": "linux"}}), Os::Linux),
            (
                serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]}]}}}}),
                Os::Windows,
            ),
            // One term that does not pin Windows lets the pod land on Linux.
            (
                serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}),
                Os::Linux,
            ),
            (
                serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows", "linux"]}]}]}}}}),
                Os::Linux,
            ),
            (
                serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "NotIn", "values": ["windows"]}]}]}}}}),
                Os::Linux,
            ),
            // windowsOptions alone is only a hint.
            (
                serde_json::json!({"securityContext": {"windowsOptions": {"gmsaCredentialSpecName": "x"}}}),
                Os::Linux,
            ),
        ];
        for (json, want) in cases {
            assert_eq!(detect(&spec(json.clone())), want, "{json}");
        }
    }
}
