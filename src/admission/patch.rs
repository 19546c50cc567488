//! Turning mutation intents into one JSON Patch against the object under review.

use std::collections::BTreeSet;

use serde_json::Value;
use serde_json::value::RawValue;

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
                let Some(Value::Object(spec)) = object.pointer_mut("/spec") else { continue };
                let current = spec.get("selector").and_then(Value::as_str).unwrap_or_default();
                let scoped = calico::scope_selector(current, key);
                spec.insert("selector".into(), Value::String(scoped));
            }
            Mutation::ScopeKubeSelector { key } => {
                let Some(Value::Object(spec)) = object.pointer_mut("/spec") else { continue };
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
                let wanted = calico::linux_requirement(key);
                if !expressions.contains(&wanted) {
                    expressions.push(wanted);
                }
            }
        }
    }
}

fn split_pointer(pointer: &str) -> (&str, String) {
    match pointer.rsplit_once('/') {
        Some((parent, field)) => (parent, field.replace("~1", "/").replace("~0", "~")),
        None => ("", pointer.to_owned()),
    }
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
