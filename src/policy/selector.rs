//! Kubernetes label selectors, compiled once and matched against label maps.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::admission::objects::Labels;
use crate::rules::FieldError;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A compiled `metav1.LabelSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Compiles a label selector.
    ///
    /// # Errors
    /// [`FieldError`] (relative to the selector) for an unknown operator, or values that do not
    /// fit the operator.
    pub fn compile(selector: &LabelSelector) -> Result<Self, FieldError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In(key.clone(), vec![value.clone()]));
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let field = |f: &str| format!("matchExpressions[{i}].{f}");
            if expr.key.is_empty() {
                return Err(FieldError::new(field("key"), "must not be empty"));
            }
            let values = expr.values.clone().unwrap_or_default();
            let key = expr.key.clone();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(FieldError::new(
                        field("values"),
                        format!("must be non-empty for operator {}", expr.operator),
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(FieldError::new(
                        field("values"),
                        format!("must be empty for operator {}", expr.operator),
                    ));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(FieldError::new(
                        field("operator"),
                        format!(
                            "unknown operator {other:?}: use In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether the labels satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(json: serde_json::Value) -> Result<Selector, FieldError> {
        Selector::compile(&serde_json::from_value(json).expect("selector decodes"))
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn matches_labels_and_expressions() {
        let cases = [
            (serde_json::json!({}), vec![], true),
            (serde_json::json!({"matchLabels": {"a": "1"}}), vec![("a", "1")], true),
            (serde_json::json!({"matchLabels": {"a": "1"}}), vec![("a", "2")], false),
            (
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}),
                vec![("a", "2")],
                true,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}),
                vec![],
                true,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}),
                vec![("a", "1")],
                false,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Exists"}]}),
                vec![("a", "")],
                true,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}),
                vec![("a", "")],
                false,
            ),
        ];
        for (json, pairs, want) in cases {
            let s = selector(json.clone()).expect("valid selector");
            assert_eq!(s.matches(&labels(&pairs)), want, "{json} on {pairs:?}");
        }
    }

    #[test]
    fn rejects_bad_expressions_naming_the_field() {
        let err = selector(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["1"]}]}))
            .expect_err("unknown operator");
        assert_eq!(err.field, "matchExpressions[0].operator");
        let err =
            selector(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In"}]}))
                .expect_err("In without values");
        assert_eq!(err.field, "matchExpressions[0].values");
    }
}
