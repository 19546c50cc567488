//! Lean, borrow-free views of the Kubernetes objects the rules read.
//!
//! Only the fields a rule needs are decoded; everything else in an object (managedFields,
//! env, volumes, status, ...) is skipped by serde without being materialised. That keeps
//! decoding cost proportional to what the rules look at, not to object size.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::image::{self, ImageError, ImageParts, ImageSpans};

/// Label map of an object or pod template.
pub type Labels = BTreeMap<String, String>;

/// The part of `metadata` the rules read.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// `metadata.name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `metadata.generateName`, used for messages when the name is not yet set.
    #[serde(default)]
    pub generate_name: Option<String>,
    /// `metadata.namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// `metadata.labels`; `null` decodes as empty.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Labels,
    /// Whether the object carried a `metadata` object at all (patches must not assume it).
    #[serde(skip)]
    pub present: bool,
}

/// Decodes a `metadata` object, marking it present.
///
/// # Errors
/// The deserializer's error when `metadata` is not an object.
pub fn present_metadata<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<ObjectMeta, D::Error> {
    let mut metadata = ObjectMeta::deserialize(deserializer)?;
    metadata.present = true;
    Ok(metadata)
}

/// A `PodTemplateSpec`: metadata plus pod spec.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateSpec {
    /// Template metadata (labels).
    #[serde(default, deserialize_with = "present_metadata")]
    pub metadata: ObjectMeta,
    /// The pod spec.
    #[serde(default, deserialize_with = "present_spec")]
    pub spec: PodSpec,
}

/// The part of a `PodSpec` the rules read.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// `spec.containers`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub containers: Vec<Container>,
    /// `spec.initContainers` (including `restartPolicy: Always` sidecars).
    #[serde(default, deserialize_with = "null_as_default")]
    pub init_containers: Vec<Container>,
    /// `spec.ephemeralContainers`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ephemeral_containers: Vec<Container>,
    /// `spec.os`.
    #[serde(default)]
    pub os: Option<PodOs>,
    /// `spec.nodeSelector`; `None` when absent or null (a patch must then add the map).
    #[serde(default)]
    pub node_selector: Option<Labels>,
    /// `spec.nodeName`: set when the pod is created bound to a node (static and DaemonSet-like
    /// pods, or a user bypassing the scheduler).
    #[serde(default)]
    pub node_name: Option<String>,
    /// `spec.schedulingGates`: while any remain, the scheduler leaves the pod alone and its
    /// nodeSelector and affinity may still change.
    #[serde(default, deserialize_with = "null_as_default")]
    pub scheduling_gates: Vec<serde::de::IgnoredAny>,
    /// `spec.affinity`.
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// `spec.securityContext`.
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
    /// `spec.serviceAccountName`.
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// `spec.serviceAccount`, the deprecated alias the apiserver still honours.
    #[serde(default)]
    pub service_account: Option<String>,
    /// `spec.imagePullSecrets`: Secrets in the pod's namespace the kubelet pulls with.
    #[serde(default, deserialize_with = "null_as_default")]
    pub image_pull_secrets: Vec<NameReference>,
    /// Whether the object carried a `spec` object at all (patches must not assume it).
    #[serde(skip)]
    pub present: bool,
}

/// A reference to an object by name (`LocalObjectReference`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct NameReference {
    /// The name; empty when absent.
    #[serde(default)]
    pub name: String,
}

/// Decodes a pod `spec` object, marking it present.
///
/// # Errors
/// The deserializer's error when `spec` is not an object.
pub fn present_spec<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<PodSpec, D::Error> {
    let mut spec = PodSpec::deserialize(deserializer)?;
    spec.present = true;
    Ok(spec)
}

/// `spec.os`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct PodOs {
    /// `linux` or `windows`.
    #[serde(default)]
    pub name: String,
}

/// `spec.affinity`, reduced to required node affinity.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Affinity {
    /// `nodeAffinity`.
    #[serde(default)]
    pub node_affinity: Option<NodeAffinity>,
}

/// `nodeAffinity`, reduced to its required part.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAffinity {
    /// `requiredDuringSchedulingIgnoredDuringExecution`.
    #[serde(default)]
    pub required_during_scheduling_ignored_during_execution: Option<NodeSelector>,
}

/// A `NodeSelector`: terms are ORed.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    /// `nodeSelectorTerms`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub node_selector_terms: Vec<NodeSelectorTerm>,
}

/// One `NodeSelectorTerm`: requirements are ANDed.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelectorTerm {
    /// `matchExpressions` on node labels.
    #[serde(default, deserialize_with = "null_as_default")]
    pub match_expressions: Vec<SelectorRequirement>,
    /// `matchFields` on node fields (only `metadata.name`): how DaemonSet pods are pinned to
    /// their node.
    #[serde(default, deserialize_with = "null_as_default")]
    pub match_fields: Vec<SelectorRequirement>,
}

/// A label selector requirement (`key`, `operator`, `values`), as used by node and label selectors.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct SelectorRequirement {
    /// The label key.
    #[serde(default)]
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist` (and `Gt`, `Lt` for nodes).
    #[serde(default)]
    pub operator: String,
    /// The values compared.
    #[serde(default, deserialize_with = "null_as_default")]
    pub values: Vec<String>,
}

/// A `metav1.LabelSelector`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// `matchLabels`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub match_labels: Labels,
    /// `matchExpressions`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// Pod- or container-level `securityContext`, reduced to `windowsOptions`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    /// `windowsOptions`.
    #[serde(default)]
    pub windows_options: Option<WindowsOptions>,
}

/// `windowsOptions`: where gMSA is configured.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WindowsOptions {
    /// `gmsaCredentialSpecName`: the GMSACredentialSpec resource to use.
    #[serde(default)]
    pub gmsa_credential_spec_name: Option<String>,
    /// `gmsaCredentialSpec`: the inlined JSON content of that resource's `credspec`.
    #[serde(default)]
    pub gmsa_credential_spec: Option<String>,
    /// `hostProcess`.
    #[serde(default)]
    pub host_process: Option<bool>,
}

/// The part of a container the rules read.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Image reference as written.
    #[serde(default)]
    pub image: Option<String>,
    /// Container-level `securityContext`.
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
    /// `image` parsed, once per request however many rules read it.
    #[serde(skip)]
    parsed_image: ParsedImage,
}

/// A container's image reference parsed when first asked for, with the address and length
/// of the string it was parsed from: a memo that no longer matches its `image` (the field is
/// public) is not used.
#[derive(Clone, Debug, Default)]
struct ParsedImage(OnceLock<(usize, usize, Result<ImageSpans, ImageError>)>);

/// Two containers are equal by what was decoded, whether or not their image was parsed yet.
impl PartialEq for ParsedImage {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Which list of a pod spec a container is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContainerList {
    /// `containers`.
    Containers,
    /// `initContainers`.
    InitContainers,
    /// `ephemeralContainers`.
    EphemeralContainers,
}

impl ContainerList {
    /// The field name in a pod spec.
    pub fn field(self) -> &'static str {
        match self {
            Self::Containers => "containers",
            Self::InitContainers => "initContainers",
            Self::EphemeralContainers => "ephemeralContainers",
        }
    }

    /// How a user would name a container of this list in a message.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Containers => "container",
            Self::InitContainers => "init container",
            Self::EphemeralContainers => "ephemeral container",
        }
    }
}

/// A container together with where it sits in its pod spec.
#[derive(Clone, Copy, Debug)]
pub struct ContainerRef<'a> {
    /// The list it is in.
    pub list: ContainerList,
    /// Its index in that list.
    pub index: usize,
    /// The container.
    pub container: &'a Container,
}

impl ContainerRef<'_> {
    /// JSON pointer of this container relative to the pod spec.
    pub fn pointer(&self) -> String {
        format!("/{}/{}", self.list.field(), self.index)
    }
}

impl PodSpec {
    /// Every container of the spec: containers, then initContainers, then ephemeralContainers.
    pub fn all_containers(&self) -> impl Iterator<Item = ContainerRef<'_>> {
        let lists = [
            (ContainerList::Containers, &self.containers),
            (ContainerList::InitContainers, &self.init_containers),
            (ContainerList::EphemeralContainers, &self.ephemeral_containers),
        ];
        lists.into_iter().flat_map(|(list, containers)| {
            containers.iter().enumerate().map(move |(index, container)| ContainerRef {
                list,
                index,
                container,
            })
        })
    }

    /// The container of the given list with the given name, if any.
    pub fn container(&self, list: ContainerList, name: &str) -> Option<&Container> {
        let containers = match list {
            ContainerList::Containers => &self.containers,
            ContainerList::InitContainers => &self.init_containers,
            ContainerList::EphemeralContainers => &self.ephemeral_containers,
        };
        containers.iter().find(|c| c.name == name)
    }

    /// The service account the pod runs as (`default` when unset, as the apiserver defaults it).
    pub fn service_account(&self) -> &str {
        self.service_account_name
            .as_deref()
            .or(self.service_account.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
    }

    /// Pod-level `windowsOptions`.
    pub fn windows_options(&self) -> Option<&WindowsOptions> {
        self.security_context.as_ref()?.windows_options.as_ref()
    }

    /// `spec.nodeSelector`, empty when absent.
    pub fn node_selector(&self) -> &Labels {
        static EMPTY: Labels = Labels::new();
        self.node_selector.as_ref().unwrap_or(&EMPTY)
    }

    /// Whether the pod still waits on scheduling gates.
    pub fn is_gated(&self) -> bool {
        !self.scheduling_gates.is_empty()
    }
}

impl Container {
    /// The image reference parsed ([`image::parse_parts`]), `None` when there is no image.
    /// The parse is kept with the container: every rule after the first reads it for free.
    ///
    /// # Errors
    /// The inner [`ImageError`] says why the image is not a valid reference.
    pub fn image_parts(&self) -> Option<Result<ImageParts<'_>, ImageError>> {
        let image = self.image.as_deref()?;
        let written = (image.as_ptr() as usize, image.len());
        let (address, len, parsed) =
            self.parsed_image.0.get_or_init(|| (written.0, written.1, image::parse_spans(image)));
        if (*address, *len) != written {
            return Some(image::parse_parts(image));
        }
        Some(parsed.as_ref().map(|spans| spans.parts(image)).map_err(Clone::clone))
    }

    /// Container-level `windowsOptions`.
    pub fn windows_options(&self) -> Option<&WindowsOptions> {
        self.security_context.as_ref()?.windows_options.as_ref()
    }
}

/// A `networking.k8s.io/v1` NetworkPolicy, reduced to its subject selector.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubeNetworkPolicySpec {
    /// `spec.podSelector`; absent or empty selects every pod in the namespace.
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
}

/// A Calico (Global)NetworkPolicy spec, reduced to what decides which endpoints it applies to.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CalicoPolicySpec {
    /// `spec.selector`; absent or empty means `all()`.
    #[serde(default)]
    pub selector: Option<String>,
    /// `spec.preDNAT`: such a policy applies to host endpoints only.
    #[serde(default, rename = "preDNAT")]
    pub pre_dnat: Option<bool>,
    /// `spec.doNotTrack`: such a policy applies to host endpoints only.
    #[serde(default)]
    pub do_not_track: Option<bool>,
}

/// Decodes `null` as the type's default, since the apiserver may send `"labels": null`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str) -> Container {
        Container { name: "app".into(), image: Some(image.into()), ..Container::default() }
    }

    fn normalised(container: &Container) -> Option<Result<String, ImageError>> {
        container.image_parts().map(|parts| parts.map(|parts| parts.to_image_ref().to_string()))
    }

    #[test]
    fn the_image_is_parsed_once_and_a_replaced_image_is_parsed_again() {
        let mut app = container("contoso.azurecr.io/app:1");
        assert_eq!(normalised(&app), Some(Ok("contoso.azurecr.io/app:1".into())));
        // The memo is filled; it holds for the same string...
        assert!(app.parsed_image.0.get().is_some());
        assert_eq!(normalised(&app), Some(Ok("contoso.azurecr.io/app:1".into())));
        // ...and is not used for another one written over it.
        app.image = Some("nginx".into());
        assert_eq!(normalised(&app), Some(Ok("docker.io/library/nginx:latest".into())));
        app.image = Some("Bad Image".into());
        assert_eq!(normalised(&app), Some(Err(ImageError::Whitespace)));
        app.image = None;
        assert_eq!(normalised(&app), None);
    }

    #[test]
    fn containers_compare_by_what_was_decoded_not_by_what_was_parsed() {
        let (parsed, fresh) = (container("nginx"), container("nginx"));
        let _ = parsed.image_parts();
        assert_eq!(parsed, fresh);
        assert_ne!(parsed, container("redis"));
    }
}
