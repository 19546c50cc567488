//! imageProvenance: what the registry holds for each image a pod runs. In its scope, every
//! image must be served by its registry, its index must list a platform the pod's operating
//! system (and the architecture its `nodeSelector` pins) can run, it must carry a signature
//! the policy trusts (cosign or Notation, when `signatures` is set), and the mutating webhook
//! pins a Pod's tag to the digest that was checked, so that what the kubelet pulls is what
//! was checked (a tag moved afterwards changes nothing).
//!
//! Pure: the registry is read before evaluation by an adapter (`crate::oci`), which reports
//! an [`ImageFact`] for every [`lookup_key`] the rule asked for ([`ImageProvenance::needs`]).
//! A pod's operating system is the one [`os::resolve`] decides (the node's, when the pod is
//! placed on one); a pod that nothing pins is treated as Linux, as everywhere in arcguard.

use std::fmt;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::os::{self, PodOs};
use super::registry::{self, RegistryPrefix};
use super::{FactNeeds, Facts, FieldError, Findings, Mutation};
use crate::admission::objects::ContainerRef;
use crate::admission::view::{PodView, RequestView, Subject};
use crate::image::{self, ImageParts};
use crate::signature::{self, SignatureTrust, SignatureVerdict, TrustRef};

/// Node label naming a node's CPU architecture, as the kubelet sets it (`amd64`, `arm64`).
pub const NODE_ARCH_LABEL: &str = "kubernetes.io/arch";

/// The `imageProvenance` rule block.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageProvenanceSpec {
    /// The registries (and repository prefixes) whose images are checked, written as in
    /// `trustedRegistries.registries`: `host[:port]`, optionally followed by a repository
    /// prefix. Images from elsewhere are not looked up. Hosts are compared as images write
    /// them (`host:443`, an IP address or `registry-1.docker.io` are other registries), so
    /// pair the rule with a `trustedRegistries` policy listing the same entries, which denies
    /// every other spelling.
    pub registries: Vec<String>,
    /// Require the image (its index, or its config for a single-platform image) to list a
    /// platform for the pod's operating system, and for the architecture its `nodeSelector`
    /// pins with `kubernetes.io/arch`. Default true.
    #[serde(default = "enabled")]
    pub require_platform: bool,
    /// The mutating webhook rewrites each Pod image written by tag to `tag@digest`, with the
    /// digest the registry served when it was checked. Workload templates are checked but not
    /// rewritten (their Pods are), so GitOps tools see no drift. Default true.
    #[serde(default = "enabled")]
    pub pin_digest: bool,
    /// What an image does when its registry cannot be read (no answer within the deadline,
    /// a TLS or server error): `Deny` (default) or `Warn`. A registry that answers that the
    /// image does not exist, refuses access, or serves content that does not match its
    /// digest always counts as a violation.
    #[serde(default)]
    pub on_registry_error: OnRegistryError,
    /// Require a signature the policy trusts on the digest checked: at least one signature,
    /// by any verifier listed here, must verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signatures: Option<SignaturesSpec>,
}

/// Who may sign the images in scope.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignaturesSpec {
    /// cosign signatures (`cosign sign --key`): the `sha256-<hex>.sig` tag's simple-signing
    /// layers, verified with these public keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cosign: Option<CosignSpec>,
    /// Notation signatures (`notation sign`): the image's referrers of type
    /// `application/vnd.cncf.notary.signature` (the referrers API, or the referrers tag schema),
    /// JWS envelopes whose X.509 chain ends in the trust store, for a trusted identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notation: Option<NotationSpec>,
}

/// cosign verifiers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CosignSpec {
    /// PEM public keys (`cosign.pub`: ECDSA P-256 or P-384, RSA, Ed25519); a signature by any
    /// of them verifies.
    pub public_keys: Vec<String>,
}

/// Notation verifiers: the trust store and trust policy of this policy's scope.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotationSpec {
    /// PEM root CA certificates (a Notation `x509/ca` trust store).
    pub trust_store: Vec<String>,
    /// Leaf subjects trusted to sign, as in a Notation trust policy:
    /// `x509.subject: C=US, ST=WA, O=Contoso` (C, ST and O required), or `*` for any subject
    /// the trust store vouches for.
    pub trusted_identities: Vec<String>,
}

fn enabled() -> bool {
    true
}

/// What an image whose registry cannot be read does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum OnRegistryError {
    /// A violation: the policy's action applies (fail closed).
    #[default]
    Deny,
    /// A warning to the client; the request is admitted unchecked (fail open).
    Warn,
}

/// A platform an image lists: from its index entries, or a single image's config.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Platform {
    /// `linux`, `windows`, ... (`unknown` for attestation manifests).
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// The CPU variant (`v8`), if listed.
    pub variant: Option<String>,
    /// The Windows build (`10.0.20348.2582`), if listed.
    pub os_version: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        if let Some(version) = &self.os_version {
            write!(f, " ({version})")?;
        }
        Ok(())
    }
}

/// What a registry served for an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryImage {
    /// The digest of the manifest (or index) the reference resolves to, `sha256:<hex>`.
    pub digest: String,
    /// The manifest's media type.
    pub media_type: String,
    /// The manifest's size in bytes.
    pub size: u64,
    /// The platforms it lists; empty when it names none.
    pub platforms: Vec<Platform>,
}

/// What the adapter found for one [`lookup_key`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageFact {
    /// The registry served the image (shared: a cached fact is answered to every request
    /// without copying its platforms).
    Found(Arc<RegistryImage>),
    /// The registry answered, but not with a usable image: no such manifest or repository,
    /// access refused, content that does not hash to its digest, a manifest that does not
    /// parse. The text says which.
    Refused(String),
    /// The registry could not be read: no answer within the deadline, a connection, TLS or
    /// server error. The text says which.
    Unreachable(String),
    /// arcguard did not read it, by its own bounds (more distinct images than it reads for
    /// one pod; a manifest, config or token answer larger than it reads). Like a refusal, a
    /// violation whatever `onRegistryError` says: the image itself is what is out of bounds.
    /// The text says which bound and what to change.
    Unread(String),
    /// arcguard had no room to read it now (its read slots or memory budget were taken, it
    /// was shutting down, or the request's registry time was spent before a read could
    /// start). Like an outage, under `onRegistryError`, never cached.
    Unchecked(String),
}

/// What the registry adapter read for one request: image facts by [`lookup_key`], and
/// signature verdicts by key and trust.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryFacts {
    /// What registries served.
    pub images: std::collections::BTreeMap<String, ImageFact>,
    /// Signature verdicts.
    pub signatures: std::collections::BTreeMap<(String, signature::TrustId), SignatureVerdict>,
}

/// An [`ImageFact`] borrowed from the facts of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageLookup<'a> {
    /// The registry served the image.
    Found(&'a RegistryImage),
    /// The registry refused it; why.
    Refused(&'a str),
    /// The registry could not be read; why.
    Unreachable(&'a str),
    /// arcguard's own bounds kept it from being read; why.
    Unread(&'a str),
    /// arcguard had no room to read it now; why.
    Unchecked(&'a str),
    /// Registries are not read (`arcguard check` without `--registry`): nothing is judged.
    NotChecked,
}

impl<'a> ImageLookup<'a> {
    /// The lookup of a gathered fact; one that was not gathered (a shell bug) fails closed as
    /// unreadable.
    pub fn of(fact: Option<&'a ImageFact>) -> Self {
        match fact {
            Some(ImageFact::Found(image)) => Self::Found(image.as_ref()),
            Some(ImageFact::Refused(why)) => Self::Refused(why),
            Some(ImageFact::Unreachable(why)) => Self::Unreachable(why),
            Some(ImageFact::Unread(why)) => Self::Unread(why),
            Some(ImageFact::Unchecked(why)) => Self::Unchecked(why),
            None => Self::Unreachable("the image was not looked up"),
        }
    }
}

/// The key a registry fact is gathered and read under: the normalised
/// `registry/repository@digest` when the image is pinned (the runtime pulls by digest, so a
/// tag next to it does not matter), else `registry/repository:tag`.
pub fn lookup_key(image: &ImageParts<'_>) -> String {
    image.pull_reference()
}

/// A compiled `imageProvenance` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProvenance {
    scope: Vec<RegistryPrefix>,
    require_platform: bool,
    pin_digest: bool,
    on_registry_error: OnRegistryError,
    signatures: Option<Arc<SignatureTrust>>,
}

impl ImageProvenance {
    /// Compiles the rule block.
    ///
    /// # Errors
    /// [`FieldError`] naming the first invalid field.
    pub fn compile(spec: &ImageProvenanceSpec) -> Result<Self, FieldError> {
        if spec.registries.is_empty() {
            return Err(FieldError::new(
                "registries",
                format!(
                    "at least one registry is required: the rule checks images from these only; {}",
                    registry::VALID_ENTRY
                ),
            ));
        }
        let scope = spec
            .registries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                RegistryPrefix::parse(entry).map_err(|why| {
                    FieldError::new(
                        format!("registries[{i}]"),
                        format!("{why}; {}", registry::VALID_ENTRY),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let signatures = match &spec.signatures {
            Some(signatures) => {
                Some(Arc::new(compile_signatures(signatures).map_err(|e| e.within("signatures"))?))
            }
            None => None,
        };
        Ok(Self {
            scope,
            require_platform: spec.require_platform,
            pin_digest: spec.pin_digest,
            on_registry_error: spec.on_registry_error,
            signatures,
        })
    }

    /// The images of the object under review to read from their registries: every container
    /// image in scope that is new or changed (an UPDATE's unchanged images were judged before,
    /// unless the UPDATE moved the pod).
    pub fn needs(&self, view: &RequestView, needs: &mut FactNeeds) {
        let Subject::Pod(pod) = &view.subject else { return };
        let mut any = false;
        for (_, parts) in self.checked_images(pod) {
            if let Ok(parts) = parts {
                let key = lookup_key(&parts);
                if let Some(trust) = &self.signatures {
                    needs.signatures.insert((key.clone(), TrustRef(Arc::clone(trust))));
                }
                needs.images.insert(key);
                any = true;
            }
        }
        // The images are read with the credentials the kubelet would pull them with: the pod's
        // imagePullSecrets and its service account's (which the ServiceAccount admission
        // plugin copies onto pods, but not onto workload templates).
        if any {
            needs.pull_secrets.extend(
                pod.spec
                    .image_pull_secrets
                    .iter()
                    .filter(|secret| !secret.name.is_empty())
                    .map(|secret| secret.name.clone()),
            );
            needs.pull_service_account = Some(pod.spec.service_account().to_owned());
        }
    }

    /// Violations of the rule by the object under review: one finding per problem of each
    /// distinct image (containers that share an image share its findings, and the message
    /// names them), so a pod of many containers of one image is told once.
    pub fn validate(&self, view: &RequestView, facts: &dyn Facts) -> Findings {
        let mut findings = Findings::default();
        let Subject::Pod(pod) = &view.subject else { return findings };
        let mut pod_os: Option<PodOs> = None;
        for judged in self.judged_images(pod, &mut findings) {
            let uses = || judged.uses();
            let parts = &judged.parts;
            let unreachable = |findings: &mut Findings, text: String| match self.on_registry_error {
                OnRegistryError::Deny => findings.violations.push(text),
                OnRegistryError::Warn => findings
                    .advisories
                    .push(format!("{text} (admitted unchecked: onRegistryError is Warn)")),
            };
            match facts.image(&judged.key) {
                ImageLookup::NotChecked => {}
                ImageLookup::Unreachable(why) => unreachable(
                    &mut findings,
                    format!(
                        "{}, whose registry could not be read: {why}; retry when the registry answers",
                        uses()
                    ),
                ),
                ImageLookup::Unchecked(why) => unreachable(
                    &mut findings,
                    format!("{}, which could not be checked: {why}; retry", uses()),
                ),
                ImageLookup::Refused(why) => findings.violations.push(refused(&uses(), why)),
                ImageLookup::Unread(why) => {
                    findings.violations.push(format!("{}, which was not read: {why}", uses()));
                }
                ImageLookup::Found(served) => {
                    // The digest checked, when the image does not already say it.
                    let uses_digest = || match parts.digest() {
                        Some(_) => uses(),
                        None => format!("{} ({})", uses(), served.digest),
                    };
                    if let Some(pinned) = parts.digest()
                        && pinned != served.digest
                    {
                        findings.violations.push(format!(
                            "{}, pinned to {pinned}, but its registry served {}; pin the digest that was checked",
                            uses(),
                            served.digest
                        ));
                        continue;
                    }
                    // What the kubelet pulls must be what was checked: a Pod image in scope
                    // reaches validation pinned (by the mutating webhook, or its author). One
                    // that is not was never pinned (the mutating webhook's read did not complete,
                    // or an UPDATE changed it without reaching that webhook), and by tag the
                    // registry may serve other content to the kubelet than to arcguard.
                    if self.pin_digest && pod.root.is_empty() && parts.digest().is_none() {
                        findings.violations.push(format!(
                            "{}, which is not pinned to the digest that was checked ({}); retry (arcguard's mutating webhook pins it), or write the image as {}@{}",
                            uses(),
                            served.digest,
                            parts.to_image_ref().name(),
                            served.digest
                        ));
                        // What else is known about the digest is said too, so that pinning
                        // it is not followed by a second denial.
                    }
                    if self.require_platform {
                        let resolved = pod_os.get_or_insert_with(|| {
                            os::resolve(&pod.spec, &|node| facts.node_os(node))
                        });
                        if let Some(problem) = platform_problem(served, resolved, arch(pod)) {
                            findings.violations.push(format!("{}, {problem}", uses_digest()));
                        }
                    }
                    let Some(trust) = &self.signatures else { continue };
                    match facts.signature(&judged.key, trust.id()) {
                        Some(SignatureVerdict::Verified { .. }) => {}
                        Some(SignatureVerdict::Rejected(why)) => {
                            let tools = match (trust.wants_cosign(), trust.wants_notation()) {
                                (true, true) => "cosign sign --key, notation sign",
                                (true, false) => "cosign sign --key",
                                _ => "notation sign",
                            };
                            findings.violations.push(format!(
                                "{}, which has no signature this policy trusts: {why}; sign this digest with a key or certificate the policy lists ({tools})",
                                uses_digest()
                            ));
                        }
                        Some(SignatureVerdict::Unreachable(why)) => unreachable(
                            &mut findings,
                            format!(
                                "{}, whose registry could not be read: reading its signatures: {why}; retry when the registry answers",
                                uses()
                            ),
                        ),
                        Some(SignatureVerdict::Unchecked(why)) => unreachable(
                            &mut findings,
                            format!(
                                "{}, whose signatures could not be checked: {why}; retry",
                                uses()
                            ),
                        ),
                        None => unreachable(
                            &mut findings,
                            format!(
                                "{}, whose signatures could not be checked: they were not looked up; retry",
                                uses()
                            ),
                        ),
                    }
                }
            }
        }
        findings
    }

    /// The distinct images this rule judges in `pod`, each with the containers that use it,
    /// in the order first used. An image reference that does not parse is a violation of its
    /// container, pushed to `findings` (its scope cannot be told: fail closed).
    fn judged_images<'a>(&'a self, pod: &'a PodView, findings: &mut Findings) -> Vec<Judged<'a>> {
        let mut judged: Vec<Judged<'a>> = Vec::new();
        let mut by_key: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (container, parts) in self.checked_images(pod) {
            let image = container.container.image.as_deref().unwrap_or_default();
            match parts {
                Ok(parts) => {
                    let key = lookup_key(&parts);
                    match by_key.get(&key) {
                        Some(&at) => judged[at].containers.push(container),
                        None => {
                            by_key.insert(key.clone(), judged.len());
                            judged.push(Judged { key, parts, image, containers: vec![container] });
                        }
                    }
                }
                Err(why) => findings.violations.push(format!(
                    "{} {:?} has an invalid image reference {:?}: {why}",
                    container.list.noun(),
                    container.container.name,
                    registry::shown(image)
                )),
            }
        }
        judged
    }

    /// The changes this rule makes: each Pod image in scope written by tag becomes
    /// `tag@digest`, with the digest its registry served.
    pub fn mutate(&self, view: &RequestView, facts: &dyn Facts) -> Vec<Mutation> {
        let Subject::Pod(pod) = &view.subject else { return Vec::new() };
        // Templates are left as written: their Pods are pinned when created.
        if !self.pin_digest || !pod.root.is_empty() {
            return Vec::new();
        }
        self.checked_images(pod)
            .filter_map(|(container, parts)| {
                let parts = parts.ok()?;
                if parts.digest().is_some() {
                    return None;
                }
                let ImageLookup::Found(served) = facts.image(&lookup_key(&parts)) else {
                    return None;
                };
                let image = container.container.image.as_deref()?;
                Some(Mutation::PinImageDigest {
                    container_pointer: format!("{}{}", pod.spec_pointer(), container.pointer()),
                    image: format!("{image}@{}", served.digest),
                })
            })
            .collect()
    }

    /// The containers whose images this rule judges, with their parsed references: new or
    /// changed images in scope (every image, when an UPDATE moved the pod: [`moved`]), and
    /// images that do not parse (their scope cannot be told).
    fn checked_images<'a>(
        &'a self,
        pod: &'a PodView,
    ) -> impl Iterator<Item = (ContainerRef<'a>, Result<ImageParts<'a>, image::ImageError>)> + 'a
    {
        let moved = moved(pod);
        pod.spec.all_containers().filter_map(move |container| {
            let image = container.container.image.as_deref()?;
            if !moved && registry::is_unchanged(pod, container, image) {
                return None;
            }
            match container.container.image_parts()? {
                Ok(parts) => self
                    .scope
                    .iter()
                    .any(|prefix| prefix.admits(&parts))
                    .then_some((container, Ok(parts))),
                Err(why) => Some((container, Err(why))),
            }
        })
    }
}

/// Containers named in one message, at most; the rest are counted.
const USERS_NAMED: usize = 5;

/// One distinct image of a pod and the containers that use it.
struct Judged<'a> {
    /// Its [`lookup_key`].
    key: String,
    /// Its parsed reference (the first container's, as written there).
    parts: ImageParts<'a>,
    /// The image as the first container writes it.
    image: &'a str,
    /// The containers using it, in pod order; never empty.
    containers: Vec<ContainerRef<'a>>,
}

impl Judged<'_> {
    /// `container "app" uses image "…"`, or for several containers
    /// `container "a", init container "b" and 3 more use image "…"`.
    fn uses(&self) -> String {
        let named: Vec<String> = self
            .containers
            .iter()
            .take(USERS_NAMED)
            .map(|c| format!("{} {:?}", c.list.noun(), c.container.name))
            .collect();
        let image = registry::shown(self.image);
        match (self.containers.len(), named.split_last()) {
            (1, _) | (_, None) => format!("{} uses image {image:?}", named.join("")),
            (n, Some((last, first))) if n <= USERS_NAMED => {
                format!("{} and {last} use image {image:?}", first.join(", "))
            }
            (n, _) => {
                format!("{} and {} more use image {image:?}", named.join(", "), n - USERS_NAMED)
            }
        }
    }
}

/// Compiles a `signatures` block; errors name the field within it.
fn compile_signatures(spec: &SignaturesSpec) -> Result<SignatureTrust, FieldError> {
    if spec.cosign.is_none() && spec.notation.is_none() {
        return Err(FieldError::new("", "name a verifier: cosign, notation or both"));
    }
    let mut keys = Vec::new();
    if let Some(cosign) = &spec.cosign {
        if cosign.public_keys.is_empty() {
            return Err(FieldError::new(
                "cosign.publicKeys",
                "at least one PEM public key is required",
            ));
        }
        for (i, pem) in cosign.public_keys.iter().enumerate() {
            keys.extend(
                signature::keys::from_pem(pem)
                    .map_err(|why| FieldError::new(format!("cosign.publicKeys[{i}]"), why))?,
            );
        }
    }
    let notation = match &spec.notation {
        Some(notation) => Some(
            signature::NotationTrust::compile(&notation.trust_store, &notation.trusted_identities)
                .map_err(|e| e.within("notation"))?,
        ),
        None => None,
    };
    let canonical = serde_json::to_vec(spec).unwrap_or_default();
    Ok(SignatureTrust::new(keys, notation, &canonical))
}

/// Whether an UPDATE changed what decides where the pod runs (`spec.os`, `nodeSelector`,
/// `affinity`, `nodeName`): an image admitted for one operating system or architecture may have
/// no platform for the other, so every image is judged again. A scheduling-gated pod may gain
/// a nodeSelector or affinity by UPDATE; judged by changed images only, a Linux-only image
/// kept its admission when the pod was pinned to Windows nodes.
fn moved(pod: &PodView) -> bool {
    pod.old.as_ref().is_some_and(|old| {
        old.spec.os != pod.spec.os
            || old.spec.node_selector != pod.spec.node_selector
            || old.spec.affinity != pod.spec.affinity
            || old.spec.node_name != pod.spec.node_name
    })
}

/// The registry's refusal, with the advice to check the reference only where it said it has
/// no such image (a pull refused for want of credentials says what to add).
fn refused(uses: &str, why: &str) -> String {
    let not_found =
        ["MANIFEST_UNKNOWN", "NAME_UNKNOWN", "the registry answered HTTP 404", "was not found"]
            .iter()
            .any(|sign| why.contains(sign));
    let advice =
        if not_found { "; check the reference, and that the image was pushed" } else { "" };
    format!("{uses}, which its registry does not serve: {why}{advice}")
}

/// The architecture the pod's `nodeSelector` pins, if any.
fn arch(pod: &PodView) -> Option<&str> {
    pod.spec.node_selector.as_ref()?.get(NODE_ARCH_LABEL).map(String::as_str)
}

/// Platforms named in a denial, at most; the rest are counted.
const PLATFORMS_LISTED: usize = 12;

/// Why the served image cannot run where the pod runs, or `None` when it can (or when the
/// pod's OS cannot be told: the OS rules say so for such pods).
fn platform_problem(served: &RegistryImage, pod_os: &PodOs, arch: Option<&str>) -> Option<String> {
    let (os, why) = match pod_os {
        PodOs::Pinned { os, by } => (*os, format!("this pod runs on {} nodes ({by})", os.as_str())),
        PodOs::Unpinned => (
            os::Os::Linux,
            "nothing pins this pod to an operating system, so it is treated as linux (set \
             spec.os.name: windows for a Windows pod)"
                .to_owned(),
        ),
        PodOs::Contradiction(_) | PodOs::UnknownNode(_) => return None,
    };
    let wanted = match arch {
        Some(arch) => format!("{}/{arch}", os.as_str()),
        None => os.as_str().to_owned(),
    };
    let runs = served.platforms.iter().any(|platform| {
        platform.os == os.as_str() && arch.is_none_or(|arch| platform.architecture == arch)
    });
    if runs {
        return None;
    }
    let real: Vec<&Platform> =
        served.platforms.iter().filter(|platform| platform.os != "unknown").collect();
    let listed: Vec<String> = real.iter().take(PLATFORMS_LISTED).map(ToString::to_string).collect();
    let has = match real.len() {
        0 => "it lists no platform".to_owned(),
        n if n <= PLATFORMS_LISTED => format!("it has {}", listed.join(", ")),
        n => format!("it has {} and {} more", listed.join(", "), n - PLATFORMS_LISTED),
    };
    let arch_why = match arch {
        Some(arch) => format!("; its nodeSelector pins {NODE_ARCH_LABEL}: {arch}"),
        None => String::new(),
    };
    Some(format!(
        "which has no {wanted} platform ({has}); {why}{arch_why}; use an image built for {wanted}"
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    use super::*;
    use crate::admission::review::Operation;
    use crate::admission::view::Kind;
    use crate::rules::StaticFacts;

    #[test]
    fn refusals_and_outages_are_worded_for_who_refused_and_what_to_do() {
        let uses = r#"container "app" uses image "reg.example.com/team/x:1""#;
        let deny = rule(json!({"registries": ["reg.example.com/team"], "pinDigest": false}));
        let warn = rule(json!({"registries": ["reg.example.com/team"], "pinDigest": false,
            "onRegistryError": "Warn"}));
        // (fact, the finding's text after "<uses>, ", whether Warn admits it)
        let cases = [
            (
                ImageFact::Refused("the registry answered MANIFEST_UNKNOWN (manifest unknown)".into()),
                "which its registry does not serve: the registry answered MANIFEST_UNKNOWN (manifest unknown); check the reference, and that the image was pushed",
                false,
            ),
            (
                ImageFact::Refused("the registry refused an anonymous pull (401 Unauthorized): give the pod an imagePullSecret".into()),
                "which its registry does not serve: the registry refused an anonymous pull (401 Unauthorized): give the pod an imagePullSecret",
                false,
            ),
            // arcguard's own bounds: the image is out of them, whatever onRegistryError says.
            (
                ImageFact::Unread("arcguard reads at most 64 distinct images in scope for one pod, and this pod names more; use fewer distinct images".into()),
                "which was not read: arcguard reads at most 64 distinct images in scope for one pod, and this pod names more; use fewer distinct images",
                false,
            ),
            (
                ImageFact::Unread("the image config sha256:ab: 2097152 bytes, over the 1048576 arcguard reads of such a blob".into()),
                "which was not read: the image config sha256:ab: 2097152 bytes, over the 1048576 arcguard reads of such a blob",
                false,
            ),
            (
                ImageFact::Unreachable("no answer within 3000 ms".into()),
                "whose registry could not be read: no answer within 3000 ms; retry when the registry answers",
                true,
            ),
            (
                ImageFact::Unreachable("the registry answered HTTP 429: TOOMANYREQUESTS (rate limit)".into()),
                "whose registry could not be read: the registry answered HTTP 429: TOOMANYREQUESTS (rate limit); retry when the registry answers",
                true,
            ),
            // arcguard's capacity: worded as its own, under onRegistryError.
            (
                ImageFact::Unchecked("no registry read could start within 3000 ms: this namespace's 4 or all 16 read slots were busy".into()),
                "which could not be checked: no registry read could start within 3000 ms: this namespace's 4 or all 16 read slots were busy; retry",
                true,
            ),
            (
                ImageFact::Unchecked("arcguard's memory budget (2048 KiB) cannot hold a registry read (2048 KiB) beside the webhook request that needs it; raise --memory-limit to 12 MiB or more".into()),
                "which could not be checked: arcguard's memory budget (2048 KiB) cannot hold a registry read (2048 KiB) beside the webhook request that needs it; raise --memory-limit to 12 MiB or more; retry",
                true,
            ),
        ];
        let object = pod("reg.example.com/team/x:1", json!({}));
        let view = view(Kind::Pod, &object, None);
        for (fact, want, warn_admits) in cases {
            let mut facts = facts();
            if let Some(images) = facts.images.as_mut() {
                images.insert("reg.example.com/team/x:1".into(), fact.clone());
            }
            let denied = deny.validate(&view, &facts);
            assert_eq!(denied.violations, [format!("{uses}, {want}")], "{fact:?}");
            let warned = warn.validate(&view, &facts);
            if warn_admits {
                assert!(warned.violations.is_empty(), "{fact:?}: {warned:?}");
                assert_eq!(
                    warned.advisories,
                    [format!("{uses}, {want} (admitted unchecked: onRegistryError is Warn)")]
                );
            } else {
                assert_eq!(warned.violations, denied.violations, "{fact:?}");
            }
        }
    }

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn rule(spec: Value) -> ImageProvenance {
        let spec: ImageProvenanceSpec = serde_json::from_value(spec).expect("spec");
        ImageProvenance::compile(&spec).expect("compiles")
    }

    fn platform(os: &str, arch: &str) -> Platform {
        Platform { os: os.into(), architecture: arch.into(), variant: None, os_version: None }
    }

    /// The registry: `linux` (linux/amd64, linux/arm64 and an attestation entry),
    /// `windows` (windows/amd64), `missing` (refused) and `down` (unreachable).
    fn facts() -> StaticFacts {
        let found = |platforms: Vec<Platform>| {
            ImageFact::Found(Arc::new(RegistryImage {
                digest: DIGEST.into(),
                media_type: "application/vnd.oci.image.index.v1+json".into(),
                size: 500,
                platforms,
            }))
        };
        let linux = found(vec![
            platform("linux", "amd64"),
            platform("linux", "arm64"),
            platform("unknown", "unknown"),
        ]);
        let images = BTreeMap::from([
            ("reg.example.com/team/linux:1".to_owned(), linux.clone()),
            (format!("reg.example.com/team/linux@{DIGEST}"), linux),
            (
                "reg.example.com/team/windows:1".to_owned(),
                found(vec![platform("windows", "amd64")]),
            ),
            (
                "reg.example.com/team/missing:1".to_owned(),
                ImageFact::Refused("the registry answered MANIFEST_UNKNOWN".into()),
            ),
            (
                "reg.example.com/team/down:1".to_owned(),
                ImageFact::Unreachable("no answer within 3000 ms".into()),
            ),
        ]);
        StaticFacts { images: Some(images), nodes: Some(BTreeMap::new()), ..StaticFacts::default() }
    }

    fn view(kind: Kind, object: &Value, old: Option<&Value>) -> RequestView {
        let raw = RawValue::from_string(object.to_string()).expect("json");
        let old = old.map(|o| RawValue::from_string(o.to_string()).expect("json"));
        let op = if old.is_some() { Operation::Update } else { Operation::Create };
        RequestView::build(kind, op, Some("apps".into()), &raw, old.as_deref()).expect("view")
    }

    fn pod(image: &str, spec: Value) -> Value {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "app", "image": image}]);
        json!({"metadata": {"name": "p", "namespace": "apps"}, "spec": spec})
    }

    #[test]
    fn judges_what_the_registry_served_against_the_pod() {
        // Without pinning, so that images by tag reach the platform checks (pinning is
        // judged below, and in `an_unpinned_pod_image_is_denied_when_pinning_is_on`).
        let deny = rule(json!({"registries": ["reg.example.com/team"], "pinDigest": false}));
        let warn = rule(json!({"registries": ["reg.example.com/team"], "onRegistryError": "Warn",
            "pinDigest": false}));
        let no_platform = rule(json!({"registries": ["reg.example.com/team"],
            "requirePlatform": false, "pinDigest": false}));
        let windows = json!({"os": {"name": "windows"}});
        let arm = json!({"nodeSelector": {"kubernetes.io/arch": "arm64"}});
        let riscv = json!({"nodeSelector": {"kubernetes.io/arch": "riscv64"}});
        // (rule, image, pod spec, violation contains, advisory contains)
        type Case<'a> = (&'a ImageProvenance, String, Value, Option<&'a str>, Option<&'a str>);
        let cases: Vec<Case<'_>> = vec![
            (&deny, "reg.example.com/team/linux:1".into(), json!({}), None, None),
            (&deny, "reg.example.com/team/linux:1".into(), arm.clone(), None, None),
            (
                &deny,
                "reg.example.com/team/linux:1".into(),
                riscv,
                Some("has no linux/riscv64 platform (it has linux/amd64, linux/arm64)"),
                None,
            ),
            (
                &deny,
                "reg.example.com/team/linux:1".into(),
                windows.clone(),
                Some(
                    "has no windows platform (it has linux/amd64, linux/arm64); this pod runs on windows nodes (spec.os.name",
                ),
                None,
            ),
            (&no_platform, "reg.example.com/team/linux:1".into(), windows.clone(), None, None),
            (&deny, "reg.example.com/team/windows:1".into(), windows, None, None),
            (
                &deny,
                "reg.example.com/team/windows:1".into(),
                json!({}),
                Some("has no linux platform (it has windows/amd64); nothing pins this pod"),
                None,
            ),
            // Pinned: read by digest, whatever the tag says.
            (&deny, format!("reg.example.com/team/linux:9@{DIGEST}"), json!({}), None, None),
            (
                &deny,
                "reg.example.com/team/missing:1".into(),
                json!({}),
                Some("which its registry does not serve: the registry answered MANIFEST_UNKNOWN"),
                None,
            ),
            (
                &deny,
                "reg.example.com/team/down:1".into(),
                json!({}),
                Some("whose registry could not be read: no answer within 3000 ms"),
                None,
            ),
            (
                &warn,
                "reg.example.com/team/down:1".into(),
                json!({}),
                None,
                Some("admitted unchecked: onRegistryError is Warn"),
            ),
            // Out of scope: never looked up, never judged.
            (&deny, "reg.example.com/other/app:1".into(), json!({}), None, None),
            (&deny, "docker.io/library/nginx".into(), json!({}), None, None),
            // Unparsable: its scope cannot be told.
            (
                &deny,
                "Reg.Example.com/TEAM/x:1".into(),
                json!({}),
                Some("invalid image reference"),
                None,
            ),
            // In scope but not gathered (a shell bug): fails closed.
            (
                &deny,
                "reg.example.com/team/unasked:1".into(),
                json!({}),
                Some("the image was not looked up"),
                None,
            ),
        ];
        let facts = facts();
        for (rule, image, spec, violation, advisory) in cases {
            let findings =
                rule.validate(&view(Kind::Pod, &pod(&image, spec.clone()), None), &facts);
            let context = format!("{image} {spec}: {findings:?}");
            match violation {
                Some(text) => {
                    assert_eq!(findings.violations.len(), 1, "{context}");
                    assert!(findings.violations[0].contains(text), "{context}");
                    assert!(findings.violations[0].starts_with("container \"app\""), "{context}");
                }
                None => assert!(findings.violations.is_empty(), "{context}"),
            }
            match advisory {
                Some(text) => assert!(
                    findings.advisories.len() == 1 && findings.advisories[0].contains(text),
                    "{context}"
                ),
                None => assert!(findings.advisories.is_empty(), "{context}"),
            }
        }
    }

    #[test]
    fn an_unpinned_pod_image_is_denied_when_pinning_is_on() {
        let pinning = rule(json!({"registries": ["reg.example.com/team"]}));
        let facts = facts();
        let by_tag = pod("reg.example.com/team/linux:1", json!({}));
        let findings = pinning.validate(&view(Kind::Pod, &by_tag, None), &facts);
        assert_eq!(findings.violations.len(), 1, "{findings:?}");
        assert!(
            findings.violations[0].contains(&format!(
                "which is not pinned to the digest that was checked ({DIGEST}); retry (arcguard's mutating webhook pins it), or write the image as reg.example.com/team/linux@{DIGEST}"
            )),
            "{findings:?}"
        );
        // Pinned (by the mutating webhook: tag and digest), it passes.
        let pinned = pod(&format!("reg.example.com/team/linux:1@{DIGEST}"), json!({}));
        assert!(pinning.validate(&view(Kind::Pod, &pinned, None), &facts).is_empty());
        // Templates are never pinned, so never denied for it.
        let deployment = json!({"metadata": {"name": "d"}, "spec": {"template": by_tag}});
        assert!(pinning.validate(&view(Kind::Deployment, &deployment, None), &facts).is_empty());
        // An UPDATE that changes the image without reaching the mutating webhook is denied.
        let old = pod(&format!("reg.example.com/team/linux:0@{DIGEST}"), json!({}));
        let update = pinning.validate(&view(Kind::Pod, &by_tag, Some(&old)), &facts);
        assert_eq!(update.violations.len(), 1, "{update:?}");
    }

    #[test]
    fn an_update_that_moves_the_pod_judges_its_unchanged_images_again() {
        let rule = rule(json!({"registries": ["reg.example.com/team"], "pinDigest": false}));
        let facts = facts();
        let image = "reg.example.com/team/linux:1";
        let gated = json!({"schedulingGates": [{"name": "wait"}]});
        let old = pod(image, gated.clone());
        // Labels and the like: an unchanged image is not read again.
        let same = rule.validate(&view(Kind::Pod, &old, Some(&old)), &facts);
        assert!(same.is_empty(), "{same:?}");
        // A scheduling-gated pod pinned to Windows nodes by UPDATE: its Linux-only image is
        // judged for the new placement.
        let mut windows = gated;
        windows["nodeSelector"] = json!({"kubernetes.io/os": "windows"});
        let moved = rule.validate(&view(Kind::Pod, &pod(image, windows), Some(&old)), &facts);
        assert_eq!(moved.violations.len(), 1, "{moved:?}");
        assert!(moved.violations[0].contains("has no windows platform"), "{moved:?}");
    }

    #[test]
    fn a_digest_other_than_the_one_served_is_denied() {
        let mut facts = facts();
        let images = facts.images.as_mut().expect("images");
        images.insert(
            format!("reg.example.com/team/linux@{OTHER}"),
            ImageFact::Found(Arc::new(RegistryImage {
                digest: DIGEST.into(),
                media_type: "application/vnd.oci.image.index.v1+json".into(),
                size: 500,
                platforms: vec![platform("linux", "amd64")],
            })),
        );
        let rule = rule(json!({"registries": ["reg.example.com"]}));
        let object = pod(&format!("reg.example.com/team/linux:1@{OTHER}"), json!({}));
        let findings = rule.validate(&view(Kind::Pod, &object, None), &facts);
        assert_eq!(findings.violations.len(), 1, "{findings:?}");
        assert!(
            findings.violations[0]
                .contains(&format!("pinned to {OTHER}, but its registry served {DIGEST}"))
        );
    }

    #[test]
    fn needs_only_new_images_in_scope() {
        let rule = rule(json!({"registries": ["reg.example.com/team"]}));
        let object = json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "init", "image": "reg.example.com/team/linux:1"}],
            "containers": [
                {"name": "a", "image": format!("reg.example.com/team/linux:2@{DIGEST}")},
                {"name": "b", "image": "nginx"},
            ],
            "ephemeralContainers": [{"name": "debug", "image": "reg.example.com/team/tools"}],
        }});
        let mut needs = FactNeeds::default();
        rule.needs(&view(Kind::Pod, &object, None), &mut needs);
        assert_eq!(
            needs.images.into_iter().collect::<Vec<_>>(),
            vec![
                "reg.example.com/team/linux:1".to_owned(),
                format!("reg.example.com/team/linux@{DIGEST}"),
                "reg.example.com/team/tools:latest".to_owned(),
            ]
        );
        // An UPDATE that keeps the images asks for nothing.
        let mut needs = FactNeeds::default();
        rule.needs(&view(Kind::Pod, &object, Some(&object)), &mut needs);
        assert!(needs.images.is_empty());
    }

    #[test]
    fn pins_pod_tags_to_the_served_digest_but_not_templates() {
        let rule = rule(json!({"registries": ["reg.example.com/team"]}));
        let facts = facts();
        let object = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [
                {"name": "a", "image": "reg.example.com/team/linux:1"},
                {"name": "b", "image": format!("reg.example.com/team/linux:1@{DIGEST}")},
                {"name": "c", "image": "reg.example.com/team/missing:1"},
            ],
        }});
        assert_eq!(
            rule.mutate(&view(Kind::Pod, &object, None), &facts),
            vec![Mutation::PinImageDigest {
                container_pointer: "/spec/containers/0".into(),
                image: format!("reg.example.com/team/linux:1@{DIGEST}"),
            }]
        );
        let deployment = json!({"metadata": {"name": "d"}, "spec": {"template": object}});
        assert!(rule.mutate(&view(Kind::Deployment, &deployment, None), &facts).is_empty());
        let off = super::ImageProvenance { pin_digest: false, ..rule };
        assert!(off.mutate(&view(Kind::Pod, &object, None), &facts).is_empty());
    }

    #[test]
    fn an_image_shared_by_containers_is_judged_once_and_platforms_listed_are_capped() {
        let deny = rule(json!({"registries": ["reg.example.com/team"], "pinDigest": false}));
        let mut facts = facts();
        let many: Vec<Platform> = (0..PLATFORMS_LISTED + 3)
            .map(|i| Platform {
                os_version: Some(format!("10.0.{i}")),
                ..platform("windows", "amd64")
            })
            .collect();
        facts.images.get_or_insert_default().insert(
            "reg.example.com/team/builds:1".to_owned(),
            ImageFact::Found(Arc::new(RegistryImage {
                digest: DIGEST.into(),
                media_type: "application/vnd.oci.image.index.v1+json".into(),
                size: 500,
                platforms: many,
            })),
        );
        let windows = "reg.example.com/team/windows:1";
        // (containers, init containers, the one violation's start)
        let cases: Vec<(usize, usize, String)> = vec![
            (2, 0, format!("container \"c0\" and container \"c1\" use image {windows:?}")),
            (
                2,
                1,
                format!(
                    "container \"c0\", container \"c1\" and init container \"i0\" use image {windows:?}"
                ),
            ),
            (
                7,
                1,
                format!(
                    "container \"c0\", container \"c1\", container \"c2\", container \"c3\", container \"c4\" and 3 more use image {windows:?}"
                ),
            ),
        ];
        for (containers, inits, start) in cases {
            let list = |prefix: &str, n: usize| -> Vec<Value> {
                (0..n).map(|i| json!({"name": format!("{prefix}{i}"), "image": windows})).collect()
            };
            let object = json!({"metadata": {"name": "p"}, "spec": {
                "containers": list("c", containers), "initContainers": list("i", inits)}});
            let findings = deny.validate(&view(Kind::Pod, &object, None), &facts);
            assert_eq!(findings.violations.len(), 1, "{findings:?}");
            assert!(findings.violations[0].starts_with(&start), "{findings:?}");
            assert!(findings.violations[0].contains("has no linux platform"), "{findings:?}");
        }
        let findings = deny.validate(
            &view(Kind::Pod, &pod("reg.example.com/team/builds:1", json!({})), None),
            &facts,
        );
        assert_eq!(findings.violations.len(), 1, "{findings:?}");
        let last = format!("windows/amd64 (10.0.{}) and 3 more)", PLATFORMS_LISTED - 1);
        assert!(findings.violations[0].contains(&last), "{findings:?}");
        assert!(
            !findings.violations[0].contains(&format!("10.0.{PLATFORMS_LISTED})")),
            "{findings:?}"
        );
    }

    #[test]
    fn judges_signature_verdicts_under_the_policy_trust() {
        let key = rcgen::KeyPair::generate().expect("key");
        let signed = |on_error: &str| {
            rule(json!({"registries": ["reg.example.com/team"], "onRegistryError": on_error,
                "signatures": {"cosign": {"publicKeys": [key.public_key_pem()]}}}))
        };
        let (deny, warn) = (signed("Deny"), signed("Warn"));
        let trust = deny.signatures.as_ref().expect("trust").id();
        assert_eq!(trust, warn.signatures.as_ref().expect("trust").id(), "same keys, same trust");
        let image = format!("reg.example.com/team/linux@{DIGEST}");
        let image = image.as_str();
        let object = pod(image, json!({}));
        let view = view(Kind::Pod, &object, None);
        let mut needs = FactNeeds::default();
        deny.needs(&view, &mut needs);
        assert_eq!(needs.signatures.len(), 1);

        let judged = |rule: &ImageProvenance, verdict: Option<SignatureVerdict>| {
            let mut facts = facts();
            if let Some(verdict) = verdict {
                facts.signatures.insert((image.to_owned(), trust), verdict);
            }
            rule.validate(&view, &facts)
        };
        let verified = SignatureVerdict::Verified { by: "cosign".into(), valid_until: i64::MAX };
        assert!(judged(&deny, Some(verified)).is_empty());
        let rejected =
            judged(&deny, Some(SignatureVerdict::Rejected("cosign: no signature".into())));
        assert_eq!(rejected.violations.len(), 1, "{rejected:?}");
        assert!(rejected.violations[0].contains(&format!(
            "uses image \"{image}\", which has no signature this policy trusts: cosign: no signature; sign this digest with a key or certificate the policy lists (cosign sign --key)"
        )), "only the verifier the policy names is suggested: {rejected:?}");
        let unread = SignatureVerdict::Unreachable("connection refused".into());
        let denied = judged(&deny, Some(unread.clone()));
        assert!(
            denied.violations[0].contains("reading its signatures: connection refused"),
            "{denied:?}"
        );
        let warned = judged(&warn, Some(unread));
        assert!(warned.violations.is_empty() && warned.advisories.len() == 1, "{warned:?}");
        // arcguard's own capacity is worded as its own, and under onRegistryError too.
        let busy =
            SignatureVerdict::Unchecked("no registry read could start within 3000 ms".into());
        let denied = judged(&deny, Some(busy.clone()));
        assert_eq!(
            denied.violations,
            [format!(
                "container \"app\" uses image \"{image}\", whose signatures could not be checked: no registry read could start within 3000 ms; retry"
            )]
        );
        let warned = judged(&warn, Some(busy));
        assert!(warned.violations.is_empty() && warned.advisories.len() == 1, "{warned:?}");
        let missing = judged(&deny, None);
        assert!(
            missing.violations[0]
                .contains("whose signatures could not be checked: they were not looked up; retry"),
            "{missing:?}"
        );
        // A different key is a different trust: its verdicts are never read for this one.
        let other = rcgen::KeyPair::generate().expect("key");
        let other = rule(json!({"registries": ["reg.example.com/team"],
            "signatures": {"cosign": {"publicKeys": [other.public_key_pem()]}}}));
        assert_ne!(other.signatures.as_ref().expect("trust").id(), trust);
    }

    #[test]
    fn rejects_invalid_scopes_naming_the_field() {
        let cases = [
            (json!({"registries": []}), "registries"),
            (json!({"registries": ["reg.example.com", "https://x.io"]}), "registries[1]"),
        ];
        let more = [
            (json!({"registries": ["a.io"], "signatures": {}}), "signatures"),
            (
                json!({"registries": ["a.io"], "signatures": {"cosign": {"publicKeys": []}}}),
                "signatures.cosign.publicKeys",
            ),
            (
                json!({"registries": ["a.io"], "signatures": {"cosign": {"publicKeys": ["x"]}}}),
                "signatures.cosign.publicKeys[0]",
            ),
            (
                json!({"registries": ["a.io"], "signatures": {"notation": {"trustStore": [], "trustedIdentities": ["*"]}}}),
                "signatures.notation.trustStore",
            ),
        ];
        for (spec, field) in cases.into_iter().chain(more) {
            let spec: ImageProvenanceSpec = serde_json::from_value(spec).expect("spec");
            assert_eq!(ImageProvenance::compile(&spec).expect_err("invalid").field, field);
        }
        let unknown = serde_json::from_value::<ImageProvenanceSpec>(
            json!({"registries": ["a.io"], "pinDigests": true}),
        );
        assert!(unknown.is_err());
    }
}
