//! Which objects a policy applies to (`spec.match`).

use crate::admission::objects::Labels;
use crate::admission::view::{RequestView, Subject};
use crate::rules::{Facts, FieldError, PodLookup};

use super::selector::Selector;
use super::spec::Match;

/// A namespace name, or a prefix written with a trailing `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NamePattern {
    Exact(String),
    Prefix(String),
}

impl NamePattern {
    fn compile(pattern: &str) -> Result<Self, String> {
        let (body, prefix) = match pattern.strip_suffix('*') {
            Some(body) => (body, true),
            None => (pattern, false),
        };
        // A prefix may end anywhere a name may continue: `team-*` is a valid pattern.
        let checked = if prefix && !body.is_empty() { format!("{body}a") } else { body.to_owned() };
        let valid = (prefix && body.is_empty()) || crate::names::check_dns_label(&checked).is_ok();
        if !valid {
            return Err(format!(
                "{pattern:?} is not a namespace name (lowercase letters, digits and '-', at most 63) optionally ending in '*'"
            ));
        }
        Ok(if prefix { Self::Prefix(body.to_owned()) } else { Self::Exact(body.to_owned()) })
    }

    fn matches(&self, namespace: &str) -> bool {
        match self {
            Self::Exact(name) => name == namespace,
            Self::Prefix(prefix) => namespace.starts_with(prefix.as_str()),
        }
    }
}

/// A compiled `spec.match`; the default matches every inspected object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matcher {
    namespaces: Vec<NamePattern>,
    excluded_namespaces: Vec<NamePattern>,
    namespace_selector: Option<Selector>,
    object_selector: Option<Selector>,
}

impl Matcher {
    /// Compiles `spec.match`.
    ///
    /// # Errors
    /// [`FieldError`] relative to `spec.match`.
    pub fn compile(spec: &Match) -> Result<Self, FieldError> {
        let patterns = |field: &str, names: &[String]| {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    NamePattern::compile(n).map_err(|m| FieldError::new(format!("{field}[{i}]"), m))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let selector = |field: &str, s: &Option<_>| {
            s.as_ref().map(|s| Selector::compile(s).map_err(|e| e.within(field))).transpose()
        };
        Ok(Self {
            namespaces: patterns("namespaces", &spec.namespaces)?,
            excluded_namespaces: patterns("excludedNamespaces", &spec.excluded_namespaces)?,
            namespace_selector: selector("namespaceSelector", &spec.namespace_selector)?,
            object_selector: selector("objectSelector", &spec.object_selector)?,
        })
    }

    /// Whether a namespaceSelector is set (it can only be applied where namespace labels are known).
    pub fn has_namespace_selector(&self) -> bool {
        self.namespace_selector.is_some()
    }

    /// Whether the policy applies to the object under review.
    ///
    /// A namespaceSelector whose namespace labels are unknown matches: missing facts must not
    /// switch enforcement off. The same holds for a binding's objectSelector, which reads the
    /// labels of the pod being bound.
    pub fn matches(&self, view: &RequestView, facts: &dyn Facts) -> bool {
        if let Some(selector) = &self.object_selector
            && let Subject::Binding(_) = &view.subject
        {
            // A binding is judged as its pod: the pod's labels, when they could be read.
            let namespace = view.namespace.as_deref().unwrap_or_default();
            if let PodLookup::Found(pod) = facts.pod(namespace, &view.name)
                && !selector.matches(&pod.metadata.labels)
            {
                return false;
            }
            let no_labels = Labels::new();
            let unselected = Self { object_selector: None, ..self.clone() };
            return unselected.matches_object(view.namespace.as_deref(), &no_labels, None, facts);
        }
        self.matches_object(
            view.namespace.as_deref(),
            &view.labels,
            view.old_labels.as_ref(),
            facts,
        )
    }

    /// Whether the policy may apply to some object in `namespace` (`None`: cluster-scoped):
    /// [`Self::matches_object`] without the objectSelector, which depends on each object.
    pub fn may_match_in(&self, namespace: Option<&str>, facts: &dyn Facts) -> bool {
        let unselected = Self { object_selector: None, ..self.clone() };
        unselected.matches_object(namespace, &Labels::new(), None, facts)
    }

    /// Whether the policy applies to an object in `namespace` (`None`: cluster-scoped) with
    /// `labels` (and `old_labels` before an UPDATE).
    pub fn matches_object(
        &self,
        namespace: Option<&str>,
        labels: &Labels,
        old_labels: Option<&Labels>,
        facts: &dyn Facts,
    ) -> bool {
        if let Some(ns) = namespace {
            if !self.namespaces.is_empty() && !self.namespaces.iter().any(|p| p.matches(ns)) {
                return false;
            }
            if self.excluded_namespaces.iter().any(|p| p.matches(ns)) {
                return false;
            }
            if let (Some(selector), Some(labels)) =
                (&self.namespace_selector, facts.namespace_labels(ns))
                && !selector.matches(labels)
            {
                return false;
            }
        }
        let Some(selector) = &self.object_selector else { return true };
        selector.matches(labels) || old_labels.is_some_and(|old| selector.matches(old))
    }
}
