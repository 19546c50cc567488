//! Turning mutation intents into one JSON Patch against the object under review.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::{PointerBuf, Token};
use json_patch::{AddOperation, PatchOperation};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::admission::view::{PolicySubject, RequestView, Subject};
use crate::rules::os::NODE_OS_LABEL;
use crate::rules::{Mutation, calico};

/// Applies mutations, in their canonical order, to a JSON object.
///
/// Intents whose target no longer exists in the object are skipped: they came from a view of
/// this same object, so that only happens for objects the view decoded leniently.
pub fn apply(object: &mut Value, mutations: &BTreeSet<Mutation>) {
    for mutation in mutations {
        match mutation {
            Mutation::SetLabel { labels_pointer, key, value } => {
                let (parent, field) = split_pointer(labels_pointer);
                let Some(Value::Object(parent)) = object.pointer_mut(parent) else { continue };
                let labels =
                    parent.entry(field).or_insert_with(|| Value::Object(Default::default()));
                if labels.is_null() {
                    *labels = Value::Object(Default::default());
                }
                if let Value::Object(labels) = labels {
                    labels.insert(key.clone(), Value::String(value.clone()));
                }
            }
            Mutation::InlineCredentialSpec { windows_options_pointer, content } => {
                if let Some(Value::Object(options)) = object.pointer_mut(windows_options_pointer) {
                    options.insert("gmsaCredentialSpec".into(), Value::String(content.clone()));
                }
            }
            Mutation::ScopeCalicoSelector { key } => {
                let Some(spec) = spec_of(object) else { continue };
                let current = spec.get("selector").and_then(Value::as_str).unwrap_or_default();
                let scoped = calico::scope_selector(current, key);
                spec.insert("selector".into(), Value::String(scoped));
            }
            Mutation::ScopeKubeSelector { key } => {
                let Some(spec) = spec_of(object) else { continue };
                let selector =
                    spec.entry("podSelector").or_insert_with(|| Value::Object(Default::default()));
                if selector.is_null() {
                    *selector = Value::Object(Default::default());
                }
                let Value::Object(selector) = selector else { continue };
                let expressions =
                    selector.entry("matchExpressions").or_insert_with(|| Value::Array(Vec::new()));
                if expressions.is_null() {
                    *expressions = Value::Array(Vec::new());
                }
                let Value::Array(expressions) = expressions else { continue };
                expressions.retain(|e| !calico::is_legacy_requirement_json(e, key));
                let wanted = calico::linux_requirement(key);
                if !expressions.contains(&wanted) {
                    expressions.push(wanted);
                }
            }
            Mutation::PinNodeOs { spec_pointer, os } => {
                let Some(Value::Object(spec)) = object.pointer_mut(spec_pointer) else { continue };
                let selector =
                    spec.entry("nodeSelector").or_insert_with(|| Value::Object(Default::default()));
                if selector.is_null() {
                    *selector = Value::Object(Default::default());
                }
                if let Value::Object(selector) = selector {
                    selector.insert(NODE_OS_LABEL.into(), Value::String(os.as_str().to_owned()));
                }
            }
            Mutation::PinImageDigest { container_pointer, image } => {
                if let Some(Value::Object(container)) = object.pointer_mut(container_pointer) {
                    container.insert("image".into(), Value::String(image.clone()));
                }
            }
        }
    }
}

/// The object's `spec`, created when absent: an absent spec selects every endpoint.
fn spec_of(object: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    let spec =
        object.as_object_mut()?.entry("spec").or_insert_with(|| Value::Object(Default::default()));
    if spec.is_null() {
        *spec = Value::Object(Default::default());
    }
    spec.as_object_mut()
}

fn split_pointer(pointer: &str) -> (&str, String) {
    match pointer.rsplit_once('/') {
        Some((parent, field)) => (parent, field.replace("~1", "/").replace("~0", "~")),
        None => ("", pointer.to_owned()),
    }
}

/// The JSON Patch that applies `mutations` to the object under review, written straight from
/// the intents and the view, so the object is not decoded again (managedFields and all).
///
/// `Some(None)` when there is nothing to change; `None` when the view cannot tell where an
/// operation goes (a parent the object may lack): then use [`build`].
pub fn direct(
    view: &RequestView,
    mutations: &BTreeSet<Mutation>,
) -> Option<Option<json_patch::Patch>> {
    if mutations.is_empty() {
        return Some(None);
    }
    let operations = direct_operations(view, mutations)?;
    Some((!operations.is_empty()).then_some(json_patch::Patch(operations)))
}

fn add(path: &str, tokens: &[&str], value: Value) -> Option<PatchOperation> {
    let mut path = PointerBuf::parse(path).ok()?;
    for token in tokens {
        path.push_back(Token::new(*token));
    }
    Some(PatchOperation::Add(AddOperation { path, value }))
}

/// The operations for `mutations`, or `None` when the view cannot tell whether a parent
/// object exists.
fn direct_operations(
    view: &RequestView,
    mutations: &BTreeSet<Mutation>,
) -> Option<Vec<PatchOperation>> {
    let mut operations = Vec::new();
    // Labels for a map the object may lack (or hold as `{}` or null) go in one `add` of the map.
    let mut new_maps: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
    let mut selector: Option<String> = None;
    let mut new_expressions = Vec::new();
    for mutation in mutations {
        match mutation {
            Mutation::SetLabel { labels_pointer, key, value } => {
                let pod = view.pod()?;
                if pod.labels_pointer() != *labels_pointer {
                    return None;
                }
                if pod.labels.is_empty() {
                    if !pod.metadata_present {
                        return None;
                    }
                    new_maps
                        .entry(labels_pointer)
                        .or_default()
                        .insert(key.clone(), Value::String(value.clone()));
                } else {
                    operations.push(add(labels_pointer, &[key], Value::String(value.clone()))?);
                }
            }
            Mutation::InlineCredentialSpec { windows_options_pointer, content } => {
                // The rule only inlines where a windowsOptions names a spec, so it exists.
                operations.push(add(
                    windows_options_pointer,
                    &["gmsaCredentialSpec"],
                    Value::String(content.clone()),
                )?);
            }
            Mutation::ScopeCalicoSelector { key } => {
                let Subject::NetworkPolicy(PolicySubject::Calico { spec, .. }) = &view.subject
                else {
                    return None;
                };
                let current = selector.take().or_else(|| spec.selector.clone())?;
                selector = Some(calico::scope_selector(&current, key));
            }
            Mutation::ScopeKubeSelector { key } => {
                let Subject::NetworkPolicy(PolicySubject::Kubernetes { pod_selector }) =
                    &view.subject
                else {
                    return None;
                };
                let existing = &pod_selector.as_ref()?.match_expressions;
                if existing.iter().any(|e| calico::is_legacy_requirement(e, key)) {
                    // Replacing the legacy entry needs its index: diff against the object.
                    return None;
                }
                let wanted = calico::linux_requirement(key);
                let present = existing
                    .iter()
                    .any(|e| e.key == *key && e.operator == "NotIn" && e.values == ["windows"]);
                if !present && !new_expressions.contains(&wanted) {
                    new_expressions.push(wanted);
                }
            }
            Mutation::PinNodeOs { spec_pointer, os } => {
                let pod = view.pod()?;
                if pod.spec_pointer() != *spec_pointer || !pod.root.is_empty() {
                    return None;
                }
                let value = Value::String(os.as_str().to_owned());
                let selector = || {
                    Value::Object([(NODE_OS_LABEL.to_owned(), value.clone())].into_iter().collect())
                };
                operations.push(match (&pod.spec.node_selector, pod.spec.present) {
                    (Some(_), _) => add(spec_pointer, &["nodeSelector", NODE_OS_LABEL], value)?,
                    (None, true) => add(spec_pointer, &["nodeSelector"], selector())?,
                    // A pod sent without a spec (the apiserver will refuse it anyway).
                    (None, false) => add(
                        spec_pointer,
                        &[],
                        Value::Object(
                            [("nodeSelector".to_owned(), selector())].into_iter().collect(),
                        ),
                    )?,
                });
            }
            Mutation::PinImageDigest { container_pointer, image } => {
                // The rule pins only containers that have an image, so the member exists and
                // `add` replaces it.
                operations.push(add(container_pointer, &["image"], Value::String(image.clone()))?);
            }
        }
    }
    for (pointer, labels) in new_maps {
        operations.push(add(pointer, &[], Value::Object(labels))?);
    }
    if let Some(selector) = selector {
        operations.push(add("/spec/selector", &[], Value::String(selector))?);
    }
    if !new_expressions.is_empty() {
        let Subject::NetworkPolicy(PolicySubject::Kubernetes { pod_selector: Some(selector) }) =
            &view.subject
        else {
            return None;
        };
        if selector.match_expressions.is_empty() {
            operations.push(add(
                "/spec/podSelector/matchExpressions",
                &[],
                Value::Array(new_expressions),
            )?);
        } else {
            for expression in new_expressions {
                operations.push(add("/spec/podSelector/matchExpressions", &["-"], expression)?);
            }
        }
    }
    Some(operations)
}

/// The JSON Patch that applies `mutations` to `object`, or `None` when nothing changes.
///
/// # Errors
/// The JSON error when `object` is not valid JSON.
pub fn build(
    object: &RawValue,
    mutations: &BTreeSet<Mutation>,
) -> Result<Option<json_patch::Patch>, serde_json::Error> {
    if mutations.is_empty() {
        return Ok(None);
    }
    let original: Value = serde_json::from_str(object.get())?;
    let mut mutated = original.clone();
    apply(&mut mutated, mutations);
    let patch = json_patch::diff(&original, &mutated);
    Ok((!patch.0.is_empty()).then_some(patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: &Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).expect("valid json")
    }

    #[test]
    fn label_keys_with_slashes_are_escaped_in_paths() {
        let pod = serde_json::json!({"metadata": {"name": "p"}, "spec": {}});
        let mutations = BTreeSet::from([Mutation::SetLabel {
            labels_pointer: "/metadata/labels".into(),
            key: "arcguard.io/os".into(),
            value: "linux".into(),
        }]);
        let patch = build(&raw(&pod), &mutations).expect("valid").expect("changes");
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).expect("patch applies");
        assert_eq!(patched["metadata"]["labels"]["arcguard.io/os"], "linux");
        let with_labels = serde_json::json!({"metadata": {"labels": {"app": "x"}}, "spec": {}});
        let patch = build(&raw(&with_labels), &mutations).expect("valid").expect("changes");
        let text = serde_json::to_string(&patch).expect("serialises");
        assert!(text.contains("/metadata/labels/arcguard.io~1os"), "{text}");
    }

    #[test]
    fn direct_operations_match_applying_the_intents() {
        use crate::admission::review::Operation;
        use crate::admission::view::Kind;
        let label = |key: &str| Mutation::SetLabel {
            labels_pointer: "/metadata/labels".into(),
            key: key.into(),
            value: "linux".into(),
        };
        let cases: Vec<(Kind, Value, BTreeSet<Mutation>)> = vec![
            (
                Kind::Pod,
                serde_json::json!({"metadata": {"name": "p"}, "spec": {}}),
                BTreeSet::from([label("a.io/os"), label("b.io/os")]),
            ),
            (
                Kind::Pod,
                serde_json::json!({"metadata": {"labels": null}, "spec": {}}),
                BTreeSet::from([label("a.io/os")]),
            ),
            (
                Kind::Pod,
                serde_json::json!({"metadata": {"labels": {"app": "x", "a.io/os": "windows"}}}),
                BTreeSet::from([label("a.io/os"), label("b.io/os")]),
            ),
            (
                Kind::Pod,
                serde_json::json!({"metadata": {}, "spec": {"securityContext": {"windowsOptions": {"gmsaCredentialSpecName": "w"}}, "containers": [{"name": "c", "securityContext": {"windowsOptions": {"gmsaCredentialSpecName": "w"}}}]}}),
                BTreeSet::from([
                    Mutation::InlineCredentialSpec {
                        windows_options_pointer: "/spec/securityContext/windowsOptions".into(),
                        content: "{}".into(),
                    },
                    Mutation::InlineCredentialSpec {
                        windows_options_pointer:
                            "/spec/containers/0/securityContext/windowsOptions".into(),
                        content: "{\"a\":1}".into(),
                    },
                ]),
            ),
            (
                Kind::CalicoNetworkPolicy,
                serde_json::json!({"metadata": {}, "spec": {"selector": "app == 'x'"}}),
                BTreeSet::from([
                    Mutation::ScopeCalicoSelector { key: "b.io/os".into() },
                    Mutation::ScopeCalicoSelector { key: "a.io/os".into() },
                ]),
            ),
            (
                Kind::CalicoGlobalNetworkPolicy,
                serde_json::json!({"metadata": {}, "spec": {"types": ["Egress"]}}),
                BTreeSet::from([Mutation::ScopeCalicoSelector { key: "a.io/os".into() }]),
            ),
            (
                Kind::CalicoNetworkPolicy,
                serde_json::json!({"metadata": {}}),
                BTreeSet::from([Mutation::ScopeCalicoSelector { key: "a.io/os".into() }]),
            ),
            (
                Kind::NetworkPolicy,
                serde_json::json!({"metadata": {}, "spec": {"podSelector": {}}}),
                BTreeSet::from([
                    Mutation::ScopeKubeSelector { key: "a.io/os".into() },
                    Mutation::ScopeKubeSelector { key: "b.io/os".into() },
                ]),
            ),
            (
                Kind::NetworkPolicy,
                serde_json::json!({"metadata": {}, "spec": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}}),
                BTreeSet::from([Mutation::ScopeKubeSelector { key: "a.io/os".into() }]),
            ),
            (
                Kind::NetworkPolicy,
                serde_json::json!({"metadata": {}, "spec": {}}),
                BTreeSet::from([Mutation::ScopeKubeSelector { key: "a.io/os".into() }]),
            ),
            (
                Kind::Pod,
                serde_json::json!({"metadata": {}, "spec": {
                    "containers": [{"name": "a", "image": "r.io/a:1"}, {"name": "b", "image": "r.io/b"}],
                    "initContainers": [{"name": "i", "image": "r.io/i:2"}]}}),
                BTreeSet::from([
                    Mutation::PinImageDigest {
                        container_pointer: "/spec/containers/1".into(),
                        image: "r.io/b@sha256:bb".into(),
                    },
                    Mutation::PinImageDigest {
                        container_pointer: "/spec/initContainers/0".into(),
                        image: "r.io/i:2@sha256:ii".into(),
                    },
                ]),
            ),
        ];
        for (kind, object, mutations) in cases {
            let raw = raw(&object);
            let view = RequestView::build(kind, Operation::Create, Some("ns".into()), &raw, None)
                .expect("view");
            let patch = match direct(&view, &mutations) {
                Some(patch) => patch,
                None => build(&raw, &mutations).expect("valid"),
            }
            .expect("changes");
            let mut patched = object.clone();
            json_patch::patch(&mut patched, &patch).expect("patch applies");
            let mut expected = object.clone();
            apply(&mut expected, &mutations);
            assert_eq!(patched, expected, "{object}");
        }
    }

    #[test]
    fn a_pod_without_metadata_gets_no_patch_it_cannot_apply() {
        use crate::admission::review::Operation;
        use crate::admission::view::Kind;
        let pod = serde_json::json!({"spec": {"containers": [{"name": "c", "image": "x"}]}});
        let raw = raw(&pod);
        let view =
            RequestView::build(Kind::Pod, Operation::Create, None, &raw, None).expect("view");
        let mutations = BTreeSet::from([Mutation::SetLabel {
            labels_pointer: "/metadata/labels".into(),
            key: "arcguard.io/os".into(),
            value: "linux".into(),
        }]);
        assert_eq!(direct(&view, &mutations), None, "the view cannot place the label");
        if let Some(patch) = build(&raw, &mutations).expect("valid") {
            let mut patched = pod.clone();
            json_patch::patch(&mut patched, &patch).expect("whatever is returned applies");
        }
    }

    #[test]
    fn no_change_means_no_patch() {
        let pod = serde_json::json!({"metadata": {"labels": {"arcguard.io/os": "linux"}}});
        let mutations = BTreeSet::from([Mutation::SetLabel {
            labels_pointer: "/metadata/labels".into(),
            key: "arcguard.io/os".into(),
            value: "linux".into(),
        }]);
        assert_eq!(build(&raw(&pod), &mutations).expect("valid"), None);
    }
}
