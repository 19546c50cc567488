//! The request view: what an AdmissionRequest carries that the rules inspect, across kinds.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::objects::{
    CalicoPolicySpec, KubeNetworkPolicySpec, LabelSelector, Labels, ObjectMeta, PodSpec,
    PodTemplateSpec,
};
use super::review::{AdmissionRequest, Operation, ReviewError};

/// The kinds arcguard inspects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// v1 Pod (CREATE, UPDATE).
    Pod,
    /// The `pods/ephemeralcontainers` subresource (UPDATE of the whole Pod).
    PodEphemeralContainers,
    /// The `pods/status` subresource (UPDATE of the whole Pod): the apiserver keeps the spec
    /// as stored but persists label changes, so labels are judged as on a Pod UPDATE.
    PodStatus,
    /// A v1 Binding of a pod to a node: the `pods/binding` subresource the scheduler posts, or
    /// the older `bindings` resource (CREATE).
    PodBinding,
    /// apps/v1 Deployment.
    Deployment,
    /// apps/v1 ReplicaSet.
    ReplicaSet,
    /// apps/v1 StatefulSet.
    StatefulSet,
    /// apps/v1 DaemonSet.
    DaemonSet,
    /// batch/v1 Job.
    Job,
    /// batch/v1 CronJob.
    CronJob,
    /// v1 ReplicationController.
    ReplicationController,
    /// v1 PodTemplate.
    PodTemplate,
    /// networking.k8s.io/v1 NetworkPolicy.
    NetworkPolicy,
    /// Calico NetworkPolicy (projectcalico.org/v3 or crd.projectcalico.org/v1).
    CalicoNetworkPolicy,
    /// Calico GlobalNetworkPolicy (projectcalico.org/v3 or crd.projectcalico.org/v1).
    CalicoGlobalNetworkPolicy,
    /// arcguard's own ClusterGuardPolicy, validated before the apiserver stores it.
    ClusterGuardPolicy,
    /// arcguard's own GuardPolicy, validated before the apiserver stores it.
    GuardPolicy,
}

impl Kind {
    /// Recognises an inspected kind from the request's group, kind and subresource.
    pub fn recognise(group: &str, kind: &str, sub_resource: Option<&str>) -> Option<Self> {
        let sub_resource = sub_resource.filter(|s| !s.is_empty());
        let kind = match (group, kind, sub_resource) {
            ("", "Pod", None) => Self::Pod,
            ("", "Pod", Some("ephemeralcontainers")) => Self::PodEphemeralContainers,
            ("", "Pod", Some("status")) => Self::PodStatus,
            ("", "Binding", Some("binding") | None) => Self::PodBinding,
            (_, _, Some(_)) => return None,
            ("apps", "Deployment", _) => Self::Deployment,
            ("apps", "ReplicaSet", _) => Self::ReplicaSet,
            ("apps", "StatefulSet", _) => Self::StatefulSet,
            ("apps", "DaemonSet", _) => Self::DaemonSet,
            ("batch", "Job", _) => Self::Job,
            ("batch", "CronJob", _) => Self::CronJob,
            ("", "ReplicationController", _) => Self::ReplicationController,
            ("", "PodTemplate", _) => Self::PodTemplate,
            ("networking.k8s.io", "NetworkPolicy", _) => Self::NetworkPolicy,
            ("projectcalico.org" | "crd.projectcalico.org", "NetworkPolicy", _) => {
                Self::CalicoNetworkPolicy
            }
            ("projectcalico.org" | "crd.projectcalico.org", "GlobalNetworkPolicy", _) => {
                Self::CalicoGlobalNetworkPolicy
            }
            ("arcguard.io", "ClusterGuardPolicy", _) => Self::ClusterGuardPolicy,
            ("arcguard.io", "GuardPolicy", _) => Self::GuardPolicy,
            _ => return None,
        };
        Some(kind)
    }

    /// The kind's name, for messages, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::PodEphemeralContainers => "Pod/ephemeralcontainers",
            Self::PodStatus => "Pod/status",
            Self::PodBinding => "Binding",
            Self::Deployment => "Deployment",
            Self::ReplicaSet => "ReplicaSet",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
            Self::ReplicationController => "ReplicationController",
            Self::PodTemplate => "PodTemplate",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::CalicoNetworkPolicy => "CalicoNetworkPolicy",
            Self::CalicoGlobalNetworkPolicy => "CalicoGlobalNetworkPolicy",
            Self::ClusterGuardPolicy => "ClusterGuardPolicy",
            Self::GuardPolicy => "GuardPolicy",
        }
    }

    /// JSON pointer of the PodTemplateSpec-shaped part (metadata + spec) of this kind's
    /// objects, `""` for a Pod; `None` for kinds without a pod spec.
    pub fn pod_root(self) -> Option<&'static str> {
        match self {
            Self::Pod | Self::PodEphemeralContainers | Self::PodStatus => Some(""),
            Self::Deployment
            | Self::ReplicaSet
            | Self::StatefulSet
            | Self::DaemonSet
            | Self::Job
            | Self::ReplicationController => Some("/spec/template"),
            Self::CronJob => Some("/spec/jobTemplate/spec/template"),
            Self::PodTemplate => Some("/template"),
            Self::PodBinding
            | Self::NetworkPolicy
            | Self::CalicoNetworkPolicy
            | Self::CalicoGlobalNetworkPolicy
            | Self::ClusterGuardPolicy
            | Self::GuardPolicy => None,
        }
    }

    /// Whether objects of both kinds decode the same way.
    pub fn same_shape(self, other: Self) -> bool {
        self == other || (self.is_pod() && other.is_pod())
    }

    /// Whether objects of this kind are live pods (rather than templates for pods).
    pub fn is_pod(self) -> bool {
        matches!(self, Self::Pod | Self::PodEphemeralContainers | Self::PodStatus)
    }
}

/// A pod spec under review with its labels, where it sits, and its previous state on UPDATE.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// JSON pointer of the template root (`""` for a Pod): metadata is at `{root}/metadata`,
    /// the spec at `{root}/spec`.
    pub root: &'static str,
    /// Pod labels (the template's labels for workloads).
    pub labels: Labels,
    /// The pod spec.
    pub spec: PodSpec,
    /// Labels and spec before an UPDATE.
    pub old: Option<Box<PodTemplateSpec>>,
    /// Whether the pod (or template) carries a `metadata` object.
    pub metadata_present: bool,
}

impl PodView {
    /// JSON pointer of the pod spec.
    pub fn spec_pointer(&self) -> String {
        format!("{}/spec", self.root)
    }

    /// JSON pointer of the pod labels map.
    pub fn labels_pointer(&self) -> String {
        format!("{}/metadata/labels", self.root)
    }
}

/// A network policy under review, reduced to what decides which pods it applies to.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicySubject {
    /// A Kubernetes NetworkPolicy and its `spec.podSelector`.
    Kubernetes {
        /// `spec.podSelector`; `None` when absent.
        pod_selector: Option<LabelSelector>,
    },
    /// A Calico NetworkPolicy or GlobalNetworkPolicy.
    Calico {
        /// Whether it is a GlobalNetworkPolicy.
        global: bool,
        /// The fields that decide its subject.
        spec: CalicoPolicySpec,
    },
}

/// A binding under review: the pod (named by the request) goes to `node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingView {
    /// `target.name`: the node.
    pub node: String,
    /// The Binding's own `metadata.labels`: the apiserver copies them onto the pod
    /// (PodTopologyLabelsAdmission, on by default since Kubernetes 1.35), overwriting.
    pub labels: Labels,
}

/// What an inspected object carries for the rules.
#[derive(Clone, Debug, PartialEq)]
pub enum Subject {
    /// A pod's binding to a node; the pod itself is a cluster fact.
    Binding(BindingView),
    /// A pod, or a workload's pod template.
    Pod(Box<PodView>),
    /// A network policy.
    NetworkPolicy(PolicySubject),
    /// An arcguard policy document and its `spec`, as sent.
    GuardPolicy(Box<serde_json::Value>),
    /// An inspected kind that carries nothing to check (a ReplicationController without a template).
    Empty,
}

/// A decoded request: who, what, and the pod specs or network policy it carries.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestView {
    /// Operation (CREATE or UPDATE: nothing else is inspected).
    pub operation: Operation,
    /// Recognised kind.
    pub kind: Kind,
    /// Namespace; `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    /// Name, or generateName, or empty.
    pub name: String,
    /// The object's own labels (`metadata.labels`), for objectSelector.
    pub labels: Labels,
    /// The old object's labels on UPDATE.
    pub old_labels: Option<Labels>,
    /// What the rules inspect.
    pub subject: Subject,
}

impl RequestView {
    /// Builds the view of a request, or `None` when arcguard does not inspect it (other kinds,
    /// other subresources, DELETE, CONNECT).
    ///
    /// # Errors
    /// [`ReviewError`] when the object is missing or does not decode as its kind.
    pub fn from_request(request: &mut AdmissionRequest<'_>) -> Result<Option<Self>, ReviewError> {
        if !matches!(request.operation, Operation::Create | Operation::Update) {
            return Ok(None);
        }
        let Some(kind) = Kind::recognise(
            &request.kind.group,
            &request.kind.kind,
            request.sub_resource.as_deref(),
        ) else {
            return Ok(None);
        };
        let namespace = request.namespace.clone().filter(|n| !n.is_empty());
        let is_update = request.operation == Operation::Update;
        let old =
            request.decoded_old_object.take().filter(|o| is_update && o.kind.same_shape(kind));
        if let Some(mut object) = request.decoded_object.take().filter(|o| o.kind.same_shape(kind))
        {
            // Decoded before the subresource was read: a pod decodes the same either way, but
            // the kind is the subresource's.
            object.kind = kind;
            return Ok(Some(Self::from_decoded(request.operation, namespace, object, old)));
        }
        let object = request.object.ok_or_else(|| ReviewError::MissingObject {
            operation: request.operation,
            kind: request.kind.kind.clone(),
        })?;
        let old_object = if is_update { request.old_object } else { None };
        Self::build(kind, request.operation, namespace, object, old_object).map(Some)
    }

    /// Builds the view of an object as a request of the given kind would carry it.
    ///
    /// # Errors
    /// [`ReviewError::InvalidObject`] when an object does not decode as the kind.
    pub fn build(
        kind: Kind,
        operation: Operation,
        namespace: Option<String>,
        object: &RawValue,
        old_object: Option<&RawValue>,
    ) -> Result<Self, ReviewError> {
        let object = decode_object(kind, object, "object")?;
        let old = old_object.map(|old| decode_object(kind, old, "oldObject")).transpose()?;
        Ok(Self::from_decoded(operation, namespace, object, old))
    }

    /// Builds the view from decoded objects.
    pub fn from_decoded(
        operation: Operation,
        namespace: Option<String>,
        object: DecodedObject,
        old: Option<DecodedObject>,
    ) -> Self {
        let DecodedObject { kind, metadata, mut subject } = object;
        let old_labels = old.as_ref().map(|o| o.metadata.labels.clone());
        if let (Subject::Pod(pod), Some(DecodedObject { subject: Subject::Pod(old_pod), .. })) =
            (&mut subject, old)
        {
            let old_pod = *old_pod;
            pod.old = Some(Box::new(PodTemplateSpec {
                metadata: ObjectMeta { labels: old_pod.labels, ..ObjectMeta::default() },
                spec: old_pod.spec,
            }));
        }
        Self::assemble(kind, operation, namespace, metadata, old_labels, subject)
    }

    fn assemble(
        kind: Kind,
        operation: Operation,
        namespace: Option<String>,
        metadata: ObjectMeta,
        old_labels: Option<Labels>,
        subject: Subject,
    ) -> Self {
        let namespace = namespace.or(metadata.namespace).filter(|n| !n.is_empty());
        // The apiserver may send `name: ""` with generateName on CREATE (it names the object in
        // storage, after admission), so an empty name falls back to generateName like none.
        let name = metadata.name.filter(|n| !n.is_empty()).or(metadata.generate_name);
        let name = name.unwrap_or_default();
        Self { operation, kind, namespace, name, labels: metadata.labels, old_labels, subject }
    }

    /// The pod view, if the object carries a pod spec.
    pub fn pod(&self) -> Option<&PodView> {
        match &self.subject {
            Subject::Pod(pod) => Some(pod),
            _ => None,
        }
    }

    /// `namespace/name` (or `name` for cluster-scoped objects), for messages and logs.
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// An object decoded into the parts the rules read.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedObject {
    /// The kind it was decoded as.
    pub kind: Kind,
    /// Its metadata.
    pub metadata: ObjectMeta,
    /// What the rules inspect.
    pub subject: Subject,
}

/// Decodes `object` or `oldObject` straight from the AdmissionReview stream as `kind`, so the
/// object is read once; `null` decodes as `None`.
#[derive(Clone, Copy, Debug)]
pub struct ObjectSeed(pub Kind);

impl<'de> serde::de::DeserializeSeed<'de> for ObjectSeed {
    type Value = Option<DecodedObject>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        struct OptionVisitor(Kind);
        impl<'de> serde::de::Visitor<'de> for OptionVisitor {
            type Value = Option<DecodedObject>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a {} object or null", self.0.as_str())
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                decode_with(self.0, d).map(Some)
            }
        }
        deserializer.deserialize_option(OptionVisitor(self.0))
    }
}

fn decode_object(
    kind: Kind,
    raw: &RawValue,
    field: &'static str,
) -> Result<DecodedObject, ReviewError> {
    let mut deserializer = serde_json::Deserializer::from_str(raw.get());
    decode_with(kind, &mut deserializer).map_err(|source| ReviewError::InvalidObject {
        field,
        kind: kind.as_str().to_owned(),
        source,
    })
}

/// Decodes an object of `kind` from any deserializer.
///
/// # Errors
/// The deserializer's error when the object does not have the kind's shape.
pub fn decode_with<'de, D: serde::Deserializer<'de>>(
    kind: Kind,
    deserializer: D,
) -> Result<DecodedObject, D::Error> {
    #[derive(Deserialize)]
    struct Pod {
        #[serde(default, deserialize_with = "super::objects::present_metadata")]
        metadata: ObjectMeta,
        #[serde(default, deserialize_with = "super::objects::present_spec")]
        spec: PodSpec,
    }
    #[derive(Deserialize)]
    struct Workload {
        #[serde(default)]
        metadata: ObjectMeta,
        #[serde(default)]
        spec: WorkloadSpec,
    }
    #[derive(Deserialize, Default)]
    struct WorkloadSpec {
        #[serde(default)]
        template: Option<PodTemplateSpec>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct CronJob {
        #[serde(default)]
        metadata: ObjectMeta,
        #[serde(default)]
        spec: CronJobSpec,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct CronJobSpec {
        #[serde(default)]
        job_template: JobTemplate,
    }
    #[derive(Deserialize, Default)]
    struct JobTemplate {
        #[serde(default)]
        spec: WorkloadSpec,
    }
    #[derive(Deserialize)]
    struct PodTemplate {
        #[serde(default)]
        metadata: ObjectMeta,
        #[serde(default)]
        template: Option<PodTemplateSpec>,
    }
    #[derive(Deserialize)]
    struct Policy<S> {
        #[serde(default)]
        metadata: ObjectMeta,
        #[serde(default)]
        spec: S,
    }

    let template = |root: &'static str, template: Option<PodTemplateSpec>| match template {
        Some(t) => Subject::Pod(Box::new(PodView {
            root,
            metadata_present: t.metadata.present,
            labels: t.metadata.labels,
            spec: t.spec,
            old: None,
        })),
        None => Subject::Empty,
    };
    #[derive(Deserialize)]
    struct Binding {
        #[serde(default)]
        metadata: ObjectMeta,
        #[serde(default)]
        target: Target,
    }
    #[derive(Deserialize, Default)]
    struct Target {
        #[serde(default)]
        name: String,
    }

    let root = kind.pod_root().unwrap_or("");
    let (metadata, subject) = match kind {
        Kind::PodBinding => {
            let mut b = <Binding>::deserialize(deserializer)?;
            // objectSelector reads the pod's labels; the binding's own are what it would write
            // onto the pod.
            let labels = std::mem::take(&mut b.metadata.labels);
            (b.metadata, Subject::Binding(BindingView { node: b.target.name, labels }))
        }
        Kind::Pod | Kind::PodEphemeralContainers | Kind::PodStatus => {
            let pod = <Pod>::deserialize(deserializer)?;
            let labels = pod.metadata.labels.clone();
            let metadata_present = pod.metadata.present;
            (
                pod.metadata,
                Subject::Pod(Box::new(PodView {
                    root,
                    labels,
                    spec: pod.spec,
                    old: None,
                    metadata_present,
                })),
            )
        }
        Kind::Deployment
        | Kind::ReplicaSet
        | Kind::StatefulSet
        | Kind::DaemonSet
        | Kind::Job
        | Kind::ReplicationController => {
            let w = <Workload>::deserialize(deserializer)?;
            (w.metadata, template(root, w.spec.template))
        }
        Kind::CronJob => {
            let c = <CronJob>::deserialize(deserializer)?;
            (c.metadata, template(root, c.spec.job_template.spec.template))
        }
        Kind::PodTemplate => {
            let p = <PodTemplate>::deserialize(deserializer)?;
            (p.metadata, template(root, p.template))
        }
        Kind::NetworkPolicy => {
            let p = <Policy<KubeNetworkPolicySpec>>::deserialize(deserializer)?;
            let subject = PolicySubject::Kubernetes { pod_selector: p.spec.pod_selector };
            (p.metadata, Subject::NetworkPolicy(subject))
        }
        Kind::CalicoNetworkPolicy | Kind::CalicoGlobalNetworkPolicy => {
            let p = <Policy<CalicoPolicySpec>>::deserialize(deserializer)?;
            let global = kind == Kind::CalicoGlobalNetworkPolicy;
            (p.metadata, Subject::NetworkPolicy(PolicySubject::Calico { global, spec: p.spec }))
        }
        Kind::ClusterGuardPolicy | Kind::GuardPolicy => {
            let p = <Policy<serde_json::Value>>::deserialize(deserializer)?;
            (p.metadata, Subject::GuardPolicy(Box::new(p.spec)))
        }
    };
    Ok(DecodedObject { kind, metadata, subject })
}
