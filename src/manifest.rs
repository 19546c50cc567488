//! Reading Kubernetes manifests: multi-document YAML or JSON, with `kind: List` flattened.

use serde::Deserialize;
use serde_json::Value;

/// A manifest that is not valid YAML or JSON.
#[derive(Debug, thiserror::Error)]
#[error("document {document}: {source}")]
pub struct ManifestError {
    /// 1-based index of the document in the stream.
    pub document: usize,
    /// The parse error, with line and column.
    #[source]
    pub source: serde_yaml::Error,
}

/// Parses every document of a YAML (or JSON) stream; empty documents are skipped and
/// `kind: List` documents (as `kubectl get -o yaml` prints them) are replaced by their items.
///
/// # Errors
/// [`ManifestError`] for the first document that does not parse.
pub fn parse(text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut objects = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document)
            .map_err(|source| ManifestError { document: i + 1, source })?;
        flatten(value, &mut objects);
    }
    Ok(objects)
}

fn flatten(value: Value, out: &mut Vec<Value>) {
    match value {
        Value::Null => {}
        Value::Object(mut map) if is_list(&map) => {
            if let Some(Value::Array(items)) = map.remove("items") {
                for item in items {
                    flatten(item, out);
                }
            }
        }
        other => out.push(other),
    }
}

fn is_list(map: &serde_json::Map<String, Value>) -> bool {
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default();
    (kind == "List" || kind.ends_with("List")) && map.get("items").is_some_and(Value::is_array)
}

/// `apiVersion` and `kind` of an object, empty when absent.
pub fn type_of(object: &Value) -> (&str, &str) {
    let field = |f| object.get(f).and_then(Value::as_str).unwrap_or_default();
    (field("apiVersion"), field("kind"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_yaml_lists_and_json() {
        let text = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: b}}\n- {apiVersion: v1, kind: Pod, metadata: {name: c}}\n";
        let objects = parse(text).expect("valid yaml");
        let names: Vec<_> =
            objects.iter().map(|o| o["metadata"]["name"].as_str().unwrap_or("")).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let json = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j"}}"#;
        assert_eq!(parse(json).expect("json is yaml").len(), 1);
    }

    #[test]
    fn reports_the_failing_document() {
        let err = parse("kind: Pod\n---\nkind: [unclosed\n").expect_err("invalid yaml");
        assert_eq!(err.document, 2);
    }
}
