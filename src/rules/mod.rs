//! The rules, as pure functions from a request view (and cluster facts) to findings
//! and mutations.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::admission::objects::{Labels, PodTemplateSpec};
use crate::admission::view::RequestView;

use self::os::{NodeOs, Os};
use self::provenance::{ImageFact, ImageLookup};

pub mod calico;
pub mod gmsa;
pub mod os;
pub mod provenance;
pub mod registry;

/// A policy field that does not hold a valid value; `field` is relative to the rule block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `registries[1]`.
    pub field: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The same error with `prefix.` in front of the field path.
    #[must_use]
    pub fn within(self, prefix: &str) -> Self {
        let field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        Self { field, ..self }
    }
}

/// What a rule found wrong with an object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Violations: each says what is wrong and what to change. They deny, warn or audit
    /// according to the policy's action.
    pub violations: Vec<String>,
    /// Advice returned as a warning whatever the policy's action (e.g. gMSA on hostProcess).
    pub advisories: Vec<String>,
}

impl Findings {
    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty() && self.advisories.is_empty()
    }
}

/// A change the mutating webhook makes, expressed as intent so that changes from several
/// policies compose in an order-independent way into one JSON Patch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutation {
    /// Set `labels[key] = value` in the labels map at `labels_pointer`, creating it if absent.
    SetLabel {
        /// JSON pointer of the labels map.
        labels_pointer: String,
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
    /// Set `gmsaCredentialSpec` in the windowsOptions object at `windows_options_pointer`.
    InlineCredentialSpec {
        /// JSON pointer of the `windowsOptions` object.
        windows_options_pointer: String,
        /// The JSON text to inline.
        content: String,
    },
    /// Scope a Calico policy's `spec.selector` to pods whose `key` label is `linux`.
    ScopeCalicoSelector {
        /// The OS label key.
        key: String,
    },
    /// Add `{key, NotIn, [windows]}` to a Kubernetes NetworkPolicy's `spec.podSelector`
    /// (replacing the legacy `{key, In, [linux]}`).
    ScopeKubeSelector {
        /// The OS label key.
        key: String,
    },
    /// Pin a pod to nodes of `os`: `nodeSelector["kubernetes.io/os"] = os` in the pod spec at
    /// `spec_pointer`, so the scheduler and kubelet keep the pod where its OS label says.
    PinNodeOs {
        /// JSON pointer of the pod spec.
        spec_pointer: String,
        /// The OS.
        os: Os,
    },
    /// Set the `image` of the container at `container_pointer` to `image` (the image as
    /// written, with `@digest` appended).
    PinImageDigest {
        /// JSON pointer of the container.
        container_pointer: String,
        /// The pinned image reference.
        image: String,
    },
}

/// Whether a service account may `use` a GMSACredentialSpec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed by RBAC.
    Allowed,
    /// Not allowed by RBAC; the SubjectAccessReview's answer (its reason, or that no rule
    /// allows it).
    Denied(String),
    /// The check could not be made (the API failed); treated as denied, with the reason.
    Unknown(String),
    /// No authorizer is available (standalone mode): the check is skipped.
    NotChecked,
}

/// What the rules may know about the cluster beyond the request: looked up by the shell
/// (caches, SubjectAccessReviews) before evaluation, so that evaluation stays pure.
pub trait Facts {
    /// The `credspec` of the named GMSACredentialSpec, if it exists.
    fn credential_spec(&self, name: &str) -> Option<&Value>;
    /// Whether `system:serviceaccount:{namespace}:{service_account}` may `use` the named spec.
    fn may_use_credential_spec(&self, namespace: &str, service_account: &str, name: &str)
    -> Access;
    /// Labels of a namespace; `None` when unknown (standalone mode, or not cached).
    fn namespace_labels(&self, namespace: &str) -> Option<&Labels>;
    /// The operating system of a node, from the node cache.
    fn node_os(&self, node: &str) -> NodeOs;
    /// A pod as stored, for requests that do not carry it (a binding names its pod only).
    fn pod(&self, namespace: &str, name: &str) -> PodLookup<'_>;
    /// What the registry served for an image, by [`provenance::lookup_key`].
    fn image(&self, key: &str) -> ImageLookup<'_>;
    /// The verdict on an image's signatures under a trust; `None` when not judged.
    fn signature(
        &self,
        key: &str,
        trust: crate::signature::TrustId,
    ) -> Option<&crate::signature::SignatureVerdict>;
}

/// A pod looked up for a request that names it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PodLookup<'a> {
    /// The pod: its labels and spec.
    Found(&'a PodTemplateSpec),
    /// No such pod (the apiserver will refuse the request itself).
    NotFound,
    /// The lookup failed; the text says why.
    Failed(&'a str),
    /// Pods are not looked up (standalone mode).
    NotChecked,
}

/// A pod fact gathered for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum PodFact {
    /// The pod: its labels and spec.
    Found(Box<PodTemplateSpec>),
    /// No such pod.
    NotFound,
    /// The lookup failed, with the reason.
    Failed(String),
}

/// The cluster facts the policies that apply to one request need, so the shell looks up (and
/// asks the API for) only those. Each rule adds its own ([`Rule::needs`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FactNeeds {
    /// GMSACredentialSpecs to read from the cache.
    pub credential_specs: BTreeSet<String>,
    /// `use` checks to make: (namespace, service account, credential spec).
    pub authorizations: BTreeSet<(String, String, String)>,
    /// Nodes whose OS to read from the cache.
    pub nodes: BTreeSet<String>,
    /// A pod to read: (namespace, name).
    pub pod: Option<(String, String)>,
    /// Images to read from their registries, by [`provenance::lookup_key`].
    pub images: BTreeSet<String>,
    /// Signatures to judge: an image (by [`provenance::lookup_key`]) under a policy's trust.
    pub signatures: BTreeSet<(String, crate::signature::TrustRef)>,
    /// imagePullSecrets to read in the request's namespace, to pull the images above with.
    pub pull_secrets: BTreeSet<String>,
    /// The service account whose imagePullSecrets are read too.
    pub pull_service_account: Option<String>,
}

impl FactNeeds {
    /// Whether nothing beyond the request is needed.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Facts as plain data: in standalone mode the credential specs read from the policy
/// directory; in cluster mode what was looked up for one request before its evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StaticFacts {
    /// GMSACredentialSpec name to its `credspec`.
    pub credential_specs: BTreeMap<String, Value>,
    /// Namespace labels, when known.
    pub namespace_labels: BTreeMap<String, Labels>,
    /// Results of `use` checks by (namespace, service account, spec name); `None` when there
    /// is no authorizer (standalone mode), so the check is skipped.
    pub authorizations: Option<BTreeMap<(String, String, String), Access>>,
    /// Node name to its OS (`None` when the node carries no OS label arcguard knows); `None`
    /// when nodes are not looked up (standalone mode).
    pub nodes: Option<BTreeMap<String, Option<Os>>>,
    /// Pods looked up by (namespace, name); `None` when pods are not looked up.
    pub pods: Option<BTreeMap<(String, String), PodFact>>,
    /// What registries served, by [`provenance::lookup_key`]; `None` when registries are not
    /// read.
    pub images: Option<BTreeMap<String, ImageFact>>,
    /// Signature verdicts by image key and trust.
    pub signatures:
        BTreeMap<(String, crate::signature::TrustId), crate::signature::SignatureVerdict>,
    /// Registry credentials from the request's imagePullSecrets (the pod's, then its service
    /// account's), in that order; empty in standalone mode.
    pub registry_credentials: Vec<crate::pull_secrets::RegistryCredential>,
}

impl Facts for StaticFacts {
    fn credential_spec(&self, name: &str) -> Option<&Value> {
        self.credential_specs.get(name)
    }

    fn may_use_credential_spec(
        &self,
        namespace: &str,
        service_account: &str,
        name: &str,
    ) -> Access {
        let Some(authorizations) = &self.authorizations else { return Access::NotChecked };
        let key = (namespace.to_owned(), service_account.to_owned(), name.to_owned());
        authorizations
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Access::Unknown("the check was not made".to_owned()))
    }

    fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespace_labels.get(namespace)
    }

    fn node_os(&self, node: &str) -> NodeOs {
        match &self.nodes {
            None => NodeOs::NotChecked,
            Some(nodes) => match nodes.get(node) {
                Some(Some(os)) => NodeOs::Known(*os),
                _ => NodeOs::Unknown,
            },
        }
    }

    fn pod(&self, namespace: &str, name: &str) -> PodLookup<'_> {
        let Some(pods) = &self.pods else { return PodLookup::NotChecked };
        match pods.get(&(namespace.to_owned(), name.to_owned())) {
            Some(PodFact::Found(pod)) => PodLookup::Found(pod),
            Some(PodFact::NotFound) => PodLookup::NotFound,
            Some(PodFact::Failed(why)) => PodLookup::Failed(why),
            None => PodLookup::Failed("the pod was not looked up"),
        }
    }

    fn image(&self, key: &str) -> ImageLookup<'_> {
        let Some(images) = &self.images else { return ImageLookup::NotChecked };
        ImageLookup::of(images.get(key))
    }

    fn signature(
        &self,
        key: &str,
        trust: crate::signature::TrustId,
    ) -> Option<&crate::signature::SignatureVerdict> {
        self.signatures.get(&(key.to_owned(), trust))
    }
}

/// Facts with what registries served layered over them: the request's other facts are read
/// from `base` as they are, without a copy.
#[derive(Debug)]
pub struct RegistryLayer<'a> {
    /// Every other fact.
    pub base: &'a StaticFacts,
    /// What the registry adapter read for this request.
    pub registry: &'a provenance::RegistryFacts,
}

impl Facts for RegistryLayer<'_> {
    fn credential_spec(&self, name: &str) -> Option<&Value> {
        self.base.credential_spec(name)
    }

    fn may_use_credential_spec(
        &self,
        namespace: &str,
        service_account: &str,
        name: &str,
    ) -> Access {
        self.base.may_use_credential_spec(namespace, service_account, name)
    }

    fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.base.namespace_labels(namespace)
    }

    fn node_os(&self, node: &str) -> NodeOs {
        self.base.node_os(node)
    }

    fn pod(&self, namespace: &str, name: &str) -> PodLookup<'_> {
        self.base.pod(namespace, name)
    }

    fn image(&self, key: &str) -> ImageLookup<'_> {
        ImageLookup::of(self.registry.images.get(key))
    }

    fn signature(
        &self,
        key: &str,
        trust: crate::signature::TrustId,
    ) -> Option<&crate::signature::SignatureVerdict> {
        // A request holds a handful: a scan, without building an owned key.
        self.registry
            .signatures
            .iter()
            .find(|((k, t), _)| k == key && *t == trust)
            .map(|(_, verdict)| verdict)
    }
}

/// One compiled rule block of a policy.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// `trustedRegistries`.
    TrustedRegistries(registry::TrustedRegistries),
    /// `gmsa`.
    Gmsa(gmsa::Gmsa),
    /// `calicoLinuxOnly`.
    CalicoLinuxOnly(calico::CalicoLinuxOnly),
    /// `imageProvenance`.
    ImageProvenance(provenance::ImageProvenance),
}

impl Rule {
    /// The rule block's field name, used in messages and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::TrustedRegistries(_) => "trustedRegistries",
            Self::Gmsa(_) => "gmsa",
            Self::CalicoLinuxOnly(_) => "calicoLinuxOnly",
            Self::ImageProvenance(_) => "imageProvenance",
        }
    }

    /// What is wrong with the object under this rule.
    pub fn validate(&self, view: &RequestView, facts: &dyn Facts) -> Findings {
        match self {
            Self::TrustedRegistries(rule) => rule.validate(view),
            Self::Gmsa(rule) => rule.validate(view, facts),
            Self::CalicoLinuxOnly(rule) => rule.validate(view, facts),
            Self::ImageProvenance(rule) => rule.validate(view, facts),
        }
    }

    /// Adds the cluster facts this rule needs to judge the object under review.
    pub fn needs(&self, view: &RequestView, needs: &mut FactNeeds) {
        match self {
            Self::TrustedRegistries(_) => {}
            Self::Gmsa(rule) => {
                rule.needs(view, needs);
                os_needs(view, needs);
            }
            Self::CalicoLinuxOnly(_) => os_needs(view, needs),
            Self::ImageProvenance(rule) => {
                rule.needs(view, needs);
                os_needs(view, needs);
            }
        }
    }

    /// The changes this rule makes to the object.
    pub fn mutate(&self, view: &RequestView, facts: &dyn Facts) -> Vec<Mutation> {
        match self {
            Self::TrustedRegistries(_) => Vec::new(),
            Self::Gmsa(rule) => rule.mutate(view, facts),
            Self::CalicoLinuxOnly(rule) => rule.mutate(view, facts),
            Self::ImageProvenance(rule) => rule.mutate(view, facts),
        }
    }
}

/// The facts deciding a pod's OS: the nodes it is placed on, or, for a binding, the pod and
/// its target node.
fn os_needs(view: &RequestView, needs: &mut FactNeeds) {
    use crate::admission::view::Subject;
    match &view.subject {
        Subject::Pod(pod) => {
            needs.nodes.extend(os::placement(&pod.spec).into_iter().map(str::to_owned));
        }
        Subject::Binding(binding) => {
            needs.nodes.insert(binding.node.clone());
            let namespace = view.namespace.clone().unwrap_or_default();
            needs.pod = Some((namespace, view.name.clone()));
        }
        _ => {}
    }
}
