//! trustedRegistries: every container image comes from a trusted registry.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{FieldError, Findings};
use crate::admission::objects::ContainerRef;
use crate::admission::view::{PodView, RequestView, Subject};
use crate::image::{self, ImageParts, ImageRef};
use crate::text;

/// The `trustedRegistries` rule block.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustedRegistriesSpec {
    /// Trusted registries: `host[:port]`, optionally followed by a repository prefix
    /// (`mcr.microsoft.com/oss`). A host matches exactly; a prefix only at a `/` boundary.
    /// Docker Hub is `docker.io` (or `index.docker.io`); its official images are under
    /// `docker.io/library`.
    pub registries: Vec<String>,
    /// Require every image to be pinned by digest (`@sha256:<64 hex>`).
    #[serde(default)]
    pub require_digest: bool,
    /// Image references always allowed, compared after normalisation.
    #[serde(default)]
    pub exempt_images: Vec<String>,
}

/// What a valid `registries` entry looks like, for error messages.
pub(crate) const VALID_ENTRY: &str = "a valid entry is host[:port] optionally followed by /repository-prefix, e.g. contoso.azurecr.io, localhost:5000 or mcr.microsoft.com/oss";
/// Longest image reference echoed back in a message; longer ones are cut.
const SHOWN_MAX: usize = 300;

/// Bytes a violation's buffer reserves besides the name, the images and the trusted list: the
/// longest fixed text (an ephemeral container's untrusted image written in another form, 97
/// bytes) and the escapes of a short quoted name.
const VIOLATION_ROOM: usize = 112;

/// A compiled `trustedRegistries` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct TrustedRegistries {
    trusted: Vec<RegistryPrefix>,
    require_digest: bool,
    exempt: Vec<ImageRef>,
    /// The trusted entries as shown in messages.
    listed: String,
}

/// A `registries` entry: a host and an optional repository prefix. `imageProvenance` scopes
/// itself with the same entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RegistryPrefix {
    /// `host[:port]`, lowercase, `docker.io` for Docker Hub.
    host: String,
    /// Repository prefix; matches whole path components only.
    prefix: Option<String>,
}

impl TrustedRegistries {
    /// Compiles the rule block.
    ///
    /// # Errors
    /// [`FieldError`] naming the first invalid field.
    pub fn compile(spec: &TrustedRegistriesSpec) -> Result<Self, FieldError> {
        if spec.registries.is_empty() {
            return Err(FieldError::new(
                "registries",
                format!("at least one trusted registry is required; {VALID_ENTRY}"),
            ));
        }
        let trusted = spec
            .registries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                RegistryPrefix::parse(entry).map_err(|why| {
                    FieldError::new(format!("registries[{i}]"), format!("{why}; {VALID_ENTRY}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exempt = spec
            .exempt_images
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                image::parse(entry).map_err(|why| {
                    FieldError::new(
                        format!("exemptImages[{i}]"),
                        format!("{entry:?} is not an image reference: {why}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut listed: Vec<String> = Vec::with_capacity(trusted.len());
        for entry in &trusted {
            let shown = entry.to_string();
            if !listed.contains(&shown) {
                listed.push(shown);
            }
        }
        Ok(Self { trusted, require_digest: spec.require_digest, exempt, listed: listed.join(", ") })
    }

    /// Violations of the rule by the object under review.
    pub fn validate(&self, view: &RequestView) -> Findings {
        let mut findings = Findings::default();
        let Subject::Pod(pod) = &view.subject else {
            return findings;
        };
        for container in pod.spec.all_containers() {
            // The apiserver itself requires an image on pods; an absent one has nothing to check.
            let Some(image) = container.container.image.as_deref() else {
                continue;
            };
            if is_unchanged(pod, container, image) {
                continue;
            }
            self.check(container, image, &mut findings.violations);
        }
        findings
    }

    /// Checks one image; the passing path allocates nothing: messages are built only for a
    /// violation.
    fn check(&self, container: ContainerRef<'_>, image: &str, violations: &mut Vec<String>) {
        let subject = || format!("{} {:?}", container.list.noun(), container.container.name);
        let parsed = match container.container.image_parts() {
            Some(Ok(parsed)) => parsed,
            // `image` is the container's, so there is one to parse.
            None => return,
            Some(Err(why)) => {
                violations.push(format!(
                    "{} has an invalid image reference {:?}: {why}",
                    subject(),
                    shown(image)
                ));
                return;
            }
        };
        if self.exempt.iter().any(|exempt| parsed.pulls_same_as(exempt)) {
            return;
        }
        let trusted = self.trusted.iter().any(|trusted| trusted.admits(&parsed));
        let unpinned = if self.require_digest { unpinned(&parsed) } else { None };
        if trusted && unpinned.is_none() {
            return;
        }
        let normalized = parsed.to_image_ref();
        // One buffer for the subject and the image, which an untrusted image's violation takes
        // over when it is the only one: a denial storm builds these for every container
        // (BENCHMARKS.md, issue 14, step 5).
        let shown_image = shown(image);
        let name = &container.container.name;
        let mut uses = String::with_capacity(
            VIOLATION_ROOM
                + name.len()
                + shown_image.len()
                + normalized.as_str().len()
                + self.listed.len(),
        );
        uses.push_str(container.list.noun());
        uses.push(' ');
        text::push_quoted(&mut uses, name);
        uses.push_str(" uses image ");
        text::push_quoted(&mut uses, &shown_image);
        // The normal form says where a short name really pulls from; repeating an image that
        // is already written in it only lengthens the message.
        if normalized.as_str() != image {
            uses.push_str(" (");
            uses.push_str(normalized.as_str());
            uses.push(')');
        }
        let untrusted = |mut uses: String| {
            uses.push_str(", which is not from a trusted registry; use an image from ");
            uses.push_str(&self.listed);
            uses
        };
        let Some(unpinned) = unpinned else {
            violations.push(untrusted(uses));
            return;
        };
        if !trusted {
            violations.push(untrusted(uses.clone()));
        }
        let pinned = format!("{}@sha256:<digest>", normalized.name());
        violations.push(match unpinned {
            Unpinned::Algorithm(algorithm) => format!(
                "{uses}, which is pinned by a {algorithm} digest but only sha256 digests are accepted; use {pinned}"
            ),
            Unpinned::NoDigest => format!("{uses}, which is not pinned by digest; use {pinned}"),
        });
    }
}

/// Why an image does not meet `requireDigest`.
enum Unpinned<'a> {
    /// Pinned by a digest of another algorithm than sha256.
    Algorithm(&'a str),
    /// Not pinned by digest at all.
    NoDigest,
}

/// Why the image is not pinned by a sha256 digest, if it is not.
fn unpinned<'a>(image: &ImageParts<'a>) -> Option<Unpinned<'a>> {
    match image.digest().and_then(|digest| digest.split_once(':')) {
        Some(("sha256", _)) => None,
        Some((algorithm, _)) => Some(Unpinned::Algorithm(algorithm)),
        None => Some(Unpinned::NoDigest),
    }
}

/// Whether a container kept the same list, name and image string across an UPDATE: such a
/// container was admitted before (or predates the policy), so label and finalizer updates of
/// running pods pass, and the ephemeral-containers subresource checks only new containers.
pub(crate) fn is_unchanged(pod: &PodView, container: ContainerRef<'_>, image: &str) -> bool {
    pod.old
        .as_ref()
        .and_then(|old| old.spec.container(container.list, &container.container.name))
        .and_then(|old| old.image.as_deref())
        .is_some_and(|old| old == image)
}

/// The image as written, cut to a length that keeps messages readable.
pub(crate) fn shown(image: &str) -> std::borrow::Cow<'_, str> {
    // No more bytes than the limit's characters: nothing to count.
    if image.len() <= SHOWN_MAX {
        return std::borrow::Cow::Borrowed(image);
    }
    match image.char_indices().nth(SHOWN_MAX) {
        Some((cut, _)) => std::borrow::Cow::Owned(format!("{}...", &image[..cut])),
        None => std::borrow::Cow::Borrowed(image),
    }
}

impl RegistryPrefix {
    /// Parses a `registries` entry; the error says what is wrong with it.
    pub(crate) fn parse(entry: &str) -> Result<Self, String> {
        if entry.trim().is_empty() {
            return Err("the entry is empty".to_owned());
        }
        if entry.chars().any(char::is_whitespace) {
            return Err(format!("{entry:?} contains whitespace"));
        }
        if let Some((scheme, _)) = entry.split_once("://") {
            return Err(format!("{entry:?} has a URL scheme; remove `{scheme}://`"));
        }
        // Brackets belong only around an IPv6 host (`[fd00::1]:5000`).
        let host_end = match entry.strip_prefix('[') {
            Some(rest) => rest.find(']').map_or(0, |end| end + 2),
            None => 0,
        };
        if entry.contains(['*', '?', '{', '}']) || entry[host_end..].contains(['[', ']']) {
            return Err(format!(
                "{entry:?} has a wildcard; wildcards are not supported: a host matches exactly and a prefix matches whole path components, so write the host or prefix itself"
            ));
        }
        if entry.contains('@') {
            return Err(format!(
                "{entry:?} has a digest; an entry names a registry or repository prefix, not an image (list single images in exemptImages)"
            ));
        }
        if entry.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("{entry:?} has uppercase letters; write it in lowercase"));
        }
        if entry.ends_with('/') {
            return Err(format!(
                "{entry:?} ends with `/`; remove it (a prefix already matches only whole path components)"
            ));
        }
        let (host, prefix) = match entry.split_once('/') {
            Some((host, prefix)) => (host, Some(prefix)),
            None => (entry, None),
        };
        let tagged = match prefix {
            Some(prefix) => prefix.contains(':'),
            None => image::split_port(host)
                .1
                .is_some_and(|port| !port.bytes().all(|b| b.is_ascii_digit())),
        };
        if tagged {
            return Err(format!(
                "{entry:?} has a tag; an entry names a registry or repository prefix, not an image (list single images in exemptImages)"
            ));
        }
        if !image::is_host(host) {
            return Err(format!(
                "{host:?} is not a registry host: dot-separated labels of lowercase letters, digits and inner `-`, or a bracketed IPv6 address, with an optional `:port`"
            ));
        }
        // An image's first path element names a registry only if it has a `.` or `:` or is
        // `localhost`; any other host could never match an image.
        if !host.contains(['.', ':']) && host != "localhost" {
            return Err(format!(
                "{host:?} is not a registry host: an image names a registry only when its host contains a `.` or a `:port`, or is `localhost`"
            ));
        }
        if let Some(prefix) = prefix
            && !prefix.split('/').all(image::is_path_component)
        {
            return Err(format!(
                "the repository prefix {prefix:?} is invalid: path components are lowercase letters and digits separated by `.`, `_`, `__` or `-`, joined by `/`"
            ));
        }
        // `index.docker.io` is the legacy name of Docker Hub; images normalise it to docker.io.
        let host = if host == "index.docker.io" { "docker.io" } else { host };
        Ok(Self { host: host.to_owned(), prefix: prefix.map(str::to_owned) })
    }

    /// Whether the image comes from this registry (and, with a prefix, from under it).
    pub(crate) fn admits(&self, image: &ImageParts<'_>) -> bool {
        image.registry_is(&self.host)
            && self.prefix.as_deref().is_none_or(|prefix| image.repository_is_under(prefix))
    }
}

impl std::fmt::Display for RegistryPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.prefix {
            Some(prefix) => write!(f, "{}/{prefix}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    use super::*;
    use crate::admission::review::Operation;
    use crate::admission::view::Kind;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const SHA512: &str = "sha512:00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";

    fn rule(registries: &[&str]) -> TrustedRegistries {
        rule_with(registries, false, &[])
    }

    fn rule_with(registries: &[&str], require_digest: bool, exempt: &[&str]) -> TrustedRegistries {
        TrustedRegistries::compile(&TrustedRegistriesSpec {
            registries: registries.iter().map(|s| (*s).to_owned()).collect(),
            require_digest,
            exempt_images: exempt.iter().map(|s| (*s).to_owned()).collect(),
        })
        .expect("test rule compiles")
    }

    fn raw(value: &Value) -> Box<RawValue> {
        RawValue::from_string(value.to_string()).expect("valid json")
    }

    fn view(kind: Kind, object: &Value, old: Option<&Value>) -> RequestView {
        let operation = if old.is_some() { Operation::Update } else { Operation::Create };
        let old = old.map(raw);
        RequestView::build(kind, operation, Some("ns".into()), &raw(object), old.as_deref())
            .expect("test object decodes")
    }

    fn pod(spec: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": spec})
    }

    fn pod_with_image(image: &str) -> RequestView {
        view(Kind::Pod, &pod(json!({"containers": [{"name": "app", "image": image}]})), None)
    }

    fn violations(rule: &TrustedRegistries, view: &RequestView) -> Vec<String> {
        let findings = rule.validate(view);
        assert!(findings.advisories.is_empty());
        findings.violations
    }

    #[test]
    fn known_bypasses_are_denied_and_trusted_images_admitted() {
        let rule = rule(&[
            "contoso.azurecr.io",
            "mcr.microsoft.com/oss",
            "localhost:5000",
            "[fd00::1]:5000",
        ]);
        let cases = [
            ("contoso.azurecr.io/app:1.0", true),
            ("contoso.azurecr.io/team/app", true),
            ("CONTOSO.azurecr.io/app", true),
            ("mcr.microsoft.com/oss/nginx/nginx:1.25", true),
            ("mcr.microsoft.com/oss", true),
            ("localhost:5000/app", true),
            ("LOCALHOST:5000/app", true),
            ("[fd00::1]:5000/app", true),
            ("[FD00::1]:5000/app", true),
            // Raw prefix matches.
            ("contoso.azurecr.io.evil.com/x", false),
            ("contoso.azurecr.ioevil/x", false),
            ("evil.io/contoso.azurecr.io/x", false),
            ("mcr.microsoft.com/ossevil/x", false),
            ("mcr.microsoft.com/ossevil", false),
            ("mcr.microsoft.com/other/oss/x", false),
            ("mcr.microsoft.com/x", false),
            // A trusted host without a `/` is a Docker Hub name (and, with `:`, a tag).
            ("contoso.azurecr.io", false),
            ("contoso.azurecr.io:5000", false),
            ("contoso/azurecr.io/x", false),
            // Ports are part of the registry.
            ("contoso.azurecr.io:443/x", false),
            ("localhost/app", false),
            ("localhost:5001/app", false),
            ("[fd00::1]/app", false),
            ("[fd00::2]:5000/app", false),
            // Addresses are compared as written: another spelling is not the trusted entry.
            ("[fd00:0::1]:5000/app", false),
            ("[fd00::1]:5000", false),
            ("nginx", false),
        ];
        for (image, admitted) in cases {
            let found = violations(&rule, &pod_with_image(image));
            assert_eq!(found.is_empty(), admitted, "{image}: {found:?}");
        }
    }

    #[test]
    fn docker_hub_spellings_match_as_one_image() {
        let official = [
            "nginx",
            "library/nginx",
            "docker.io/nginx",
            "index.docker.io/library/nginx",
            "index.docker.io/nginx:latest",
        ];
        for entry in ["docker.io/library", "index.docker.io/library"] {
            let rule = rule(&[entry]);
            for image in official {
                assert_eq!(
                    violations(&rule, &pod_with_image(image)),
                    Vec::<String>::new(),
                    "{entry} {image}"
                );
            }
            assert_eq!(violations(&rule, &pod_with_image("bitnami/nginx")).len(), 1, "{entry}");
        }
        let hub = rule(&["docker.io"]);
        for image in official.iter().chain(&["bitnami/nginx"]) {
            assert!(violations(&hub, &pod_with_image(image)).is_empty(), "{image}");
        }
        assert_eq!(rule(&["index.docker.io"]), hub);
    }

    #[test]
    fn untrusted_image_message_names_container_image_normal_form_and_registries() {
        let rule = rule(&["contoso.azurecr.io", "mcr.microsoft.com/oss"]);
        assert_eq!(
            violations(&rule, &pod_with_image("nginx:1.25")),
            [
                "container \"app\" uses image \"nginx:1.25\" (docker.io/library/nginx:1.25), which is not from a trusted registry; use an image from contoso.azurecr.io, mcr.microsoft.com/oss"
            ]
        );
        assert_eq!(
            violations(&rule, &pod_with_image("evil.example/shop/web:1.4.2")),
            [
                "container \"app\" uses image \"evil.example/shop/web:1.4.2\", which is not from a trusted registry; use an image from contoso.azurecr.io, mcr.microsoft.com/oss"
            ],
            "an image already in its normal form is not repeated"
        );
    }

    #[test]
    fn every_container_list_is_checked() {
        let rule = rule(&["contoso.azurecr.io"]);
        let object = pod(json!({
            "containers": [{"name": "app", "image": "contoso.azurecr.io/app"}, {"name": "side", "image": "evil.io/side"}],
            "initContainers": [{"name": "init", "image": "busybox"}, {"name": "sidecar", "image": "evil.io/s", "restartPolicy": "Always"}],
            "ephemeralContainers": [{"name": "debug", "image": "alpine"}],
        }));
        let found = violations(&rule, &view(Kind::Pod, &object, None));
        let subjects: Vec<&str> =
            found.iter().map(|v| v.split(" uses ").next().unwrap_or_default()).collect();
        assert_eq!(
            subjects,
            [
                "container \"side\"",
                "init container \"init\"",
                "init container \"sidecar\"",
                "ephemeral container \"debug\""
            ]
        );
    }

    #[test]
    fn workload_templates_are_checked() {
        let rule = rule(&["contoso.azurecr.io"]);
        let template = json!({"metadata": {"labels": {"app": "a"}}, "spec": {"initContainers": [{"name": "init", "image": "evil.io/x"}]}});
        let cases = [
            (Kind::Deployment, json!({"spec": {"template": template}})),
            (Kind::ReplicaSet, json!({"spec": {"template": template}})),
            (Kind::StatefulSet, json!({"spec": {"template": template}})),
            (Kind::DaemonSet, json!({"spec": {"template": template}})),
            (Kind::Job, json!({"spec": {"template": template}})),
            (Kind::ReplicationController, json!({"spec": {"template": template}})),
            (Kind::CronJob, json!({"spec": {"jobTemplate": {"spec": {"template": template}}}})),
            (Kind::PodTemplate, json!({"template": template})),
        ];
        for (kind, object) in cases {
            let found = violations(&rule, &view(kind, &object, None));
            assert_eq!(found.len(), 1, "{kind:?}: {found:?}");
            assert!(
                found[0].starts_with("init container \"init\" uses image \"evil.io/x\""),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn update_rechecks_only_new_or_changed_images() {
        let rule = rule(&["contoso.azurecr.io"]);
        let old = pod(json!({
            "containers": [{"name": "app", "image": "nginx"}],
            "initContainers": [{"name": "init", "image": "busybox"}],
        }));
        let cases = [
            // A label or finalizer update of a pod admitted before the policy.
            (
                json!({"containers": [{"name": "app", "image": "nginx"}], "initContainers": [{"name": "init", "image": "busybox"}]}),
                vec![],
            ),
            // An image change is checked, even to an equivalent spelling.
            (
                json!({"containers": [{"name": "app", "image": "nginx:1.25"}]}),
                vec!["container \"app\""],
            ),
            (
                json!({"containers": [{"name": "app", "image": "docker.io/library/nginx"}]}),
                vec!["container \"app\""],
            ),
            (
                json!({"initContainers": [{"name": "init", "image": "evil.io/b"}]}),
                vec!["init container \"init\""],
            ),
            // A renamed container or one moved to another list is new.
            (
                json!({"containers": [{"name": "app2", "image": "nginx"}]}),
                vec!["container \"app2\""],
            ),
            (
                json!({"initContainers": [{"name": "app", "image": "nginx"}]}),
                vec!["init container \"app\""],
            ),
            (
                json!({"containers": [{"name": "app", "image": "nginx"}, {"name": "new", "image": "evil.io/n"}]}),
                vec!["container \"new\""],
            ),
            (json!({"containers": [{"name": "app", "image": "contoso.azurecr.io/app"}]}), vec![]),
        ];
        for (spec, expected) in cases {
            let found = violations(&rule, &view(Kind::Pod, &pod(spec.clone()), Some(&old)));
            let subjects: Vec<&str> =
                found.iter().map(|v| v.split(" uses ").next().unwrap_or_default()).collect();
            assert_eq!(subjects, expected, "{spec}");
        }
    }

    #[test]
    fn update_of_a_workload_template_rechecks_only_changed_images() {
        let rule = rule(&["contoso.azurecr.io"]);
        let deployment = |image: &str, replicas: u32| json!({"spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "app", "image": image}]}}}});
        let scaled = view(Kind::Deployment, &deployment("nginx", 3), Some(&deployment("nginx", 1)));
        assert!(violations(&rule, &scaled).is_empty());
        let changed =
            view(Kind::Deployment, &deployment("nginx:2", 1), Some(&deployment("nginx", 1)));
        assert_eq!(violations(&rule, &changed).len(), 1);
    }

    #[test]
    fn ephemeral_subresource_checks_only_new_ephemeral_containers() {
        let rule = rule(&["contoso.azurecr.io"]);
        let old = pod(json!({
            "containers": [{"name": "app", "image": "nginx"}],
            "ephemeralContainers": [{"name": "debug1", "image": "busybox"}],
        }));
        let with = |debug2: &str| {
            pod(json!({
                "containers": [{"name": "app", "image": "nginx"}],
                "ephemeralContainers": [{"name": "debug1", "image": "busybox"}, {"name": "debug2", "image": debug2}],
            }))
        };
        let found =
            violations(&rule, &view(Kind::PodEphemeralContainers, &with("alpine"), Some(&old)));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with(
            "ephemeral container \"debug2\" uses image \"alpine\" (docker.io/library/alpine:latest)"
        ));
        let trusted =
            view(Kind::PodEphemeralContainers, &with("contoso.azurecr.io/debug"), Some(&old));
        assert!(violations(&rule, &trusted).is_empty());
    }

    #[test]
    fn require_digest_demands_a_sha256_digest() {
        let rule = rule_with(&["contoso.azurecr.io"], true, &[]);
        let cases = [
            (format!("contoso.azurecr.io/app@{SHA}"), vec![]),
            (format!("contoso.azurecr.io/app:1.0@{SHA}"), vec![]),
            (
                "contoso.azurecr.io/app:1.0".to_owned(),
                vec!["container \"app\" uses image \"contoso.azurecr.io/app:1.0\", which is not pinned by digest; use contoso.azurecr.io/app@sha256:<digest>".to_owned()],
            ),
            (
                format!("contoso.azurecr.io/app@{SHA512}"),
                vec![format!("container \"app\" uses image \"contoso.azurecr.io/app@{SHA512}\", which is pinned by a sha512 digest but only sha256 digests are accepted; use contoso.azurecr.io/app@sha256:<digest>")],
            ),
        ];
        for (image, expected) in cases {
            assert_eq!(violations(&rule, &pod_with_image(&image)), expected, "{image}");
        }
        let both = violations(&rule, &pod_with_image("nginx"));
        assert_eq!(both.len(), 2, "{both:?}");
        assert!(both[0].contains("not from a trusted registry"));
        assert!(
            both[1].ends_with("not pinned by digest; use docker.io/library/nginx@sha256:<digest>")
        );
        assert!(
            violations(
                &self::rule(&["contoso.azurecr.io"]),
                &pod_with_image("contoso.azurecr.io/app:1.0")
            )
            .is_empty()
        );
    }

    #[test]
    fn exempt_images_are_compared_in_normal_form() {
        let exempt = ["nginx:1.25".to_owned(), format!("busybox:1.36@{SHA}")];
        let exempt: Vec<&str> = exempt.iter().map(String::as_str).collect();
        let rule = rule_with(&["contoso.azurecr.io"], true, &exempt);
        let cases = [
            ("nginx:1.25".to_owned(), true),
            ("docker.io/library/nginx:1.25".to_owned(), true),
            ("index.docker.io/nginx:1.25".to_owned(), true),
            ("nginx:1.26".to_owned(), false),
            ("nginx".to_owned(), false),
            (format!("nginx:1.25@{SHA}"), false),
            ("evil.io/library/nginx:1.25".to_owned(), false),
            // Pulled by digest, the tag does not matter.
            (format!("busybox@{SHA}"), true),
            (format!("docker.io/library/busybox:other@{SHA}"), true),
            ("busybox:1.36".to_owned(), false),
        ];
        for (image, admitted) in cases {
            let found = violations(&rule, &pod_with_image(&image));
            assert_eq!(found.is_empty(), admitted, "{image}: {found:?}");
        }
    }

    #[test]
    fn unparsable_images_are_violations_and_absent_images_are_skipped() {
        let rule = rule(&["contoso.azurecr.io"]);
        let object = pod(json!({
            "containers": [{"name": "none"}, {"name": "empty", "image": ""}, {"name": "upper", "image": "contoso.azurecr.io/App"}],
            "initContainers": [{"name": "scheme", "image": "https://contoso.azurecr.io/app"}],
        }));
        let found = violations(&rule, &view(Kind::Pod, &object, None));
        assert_eq!(
            found,
            [
                format!(
                    "container \"empty\" has an invalid image reference \"\": {}",
                    image::ImageError::Empty
                ),
                format!(
                    "container \"upper\" has an invalid image reference \"contoso.azurecr.io/App\": {}",
                    image::ImageError::Uppercase
                ),
                format!(
                    "init container \"scheme\" has an invalid image reference \"https://contoso.azurecr.io/app\": {}",
                    image::ImageError::Scheme
                ),
            ]
        );
    }

    #[test]
    fn an_untrusted_unpinned_image_gets_both_violations_in_full() {
        let rule = rule_with(&["contoso.azurecr.io"], true, &[]);
        let untrusted =
            "which is not from a trusted registry; use an image from contoso.azurecr.io";
        let cases = [
            (
                pod(json!({"containers": [{"name": "app", "image": "nginx"}]})),
                vec![
                    format!("container \"app\" uses image \"nginx\" (docker.io/library/nginx:latest), {untrusted}"),
                    "container \"app\" uses image \"nginx\" (docker.io/library/nginx:latest), which is not pinned by digest; use docker.io/library/nginx@sha256:<digest>".to_owned(),
                ],
            ),
            (
                pod(json!({"containers": [{"name": "app", "image": "c"}],
                           "ephemeralContainers": [{"name": "debug", "image": format!("Evil.IO/tools@{SHA512}")}]})),
                vec![
                    format!("container \"app\" uses image \"c\" (docker.io/library/c:latest), {untrusted}"),
                    "container \"app\" uses image \"c\" (docker.io/library/c:latest), which is not pinned by digest; use docker.io/library/c@sha256:<digest>".to_owned(),
                    format!("ephemeral container \"debug\" uses image \"Evil.IO/tools@{SHA512}\" (evil.io/tools@{SHA512}), {untrusted}"),
                    format!("ephemeral container \"debug\" uses image \"Evil.IO/tools@{SHA512}\" (evil.io/tools@{SHA512}), which is pinned by a sha512 digest but only sha256 digests are accepted; use evil.io/tools@sha256:<digest>"),
                ],
            ),
            (
                pod(json!({"initContainers": [{"name": "in\"it", "image": "evil.io/x:1"}]})),
                vec![format!("init container \"in\\\"it\" uses image \"evil.io/x:1\", {untrusted}"), "init container \"in\\\"it\" uses image \"evil.io/x:1\", which is not pinned by digest; use evil.io/x@sha256:<digest>".to_owned()],
            ),
        ];
        for (object, expected) in cases {
            assert_eq!(violations(&rule, &view(Kind::Pod, &object, None)), expected);
        }
    }

    #[test]
    fn images_are_shown_up_to_300_characters() {
        let cases = [
            ("a".repeat(300), "a".repeat(300)),
            ("a".repeat(301), format!("{}...", "a".repeat(300))),
            ("é".repeat(300), "é".repeat(300)),
            ("é".repeat(301), format!("{}...", "é".repeat(300))),
            ("".to_owned(), "".to_owned()),
        ];
        for (image, expected) in cases {
            assert_eq!(shown(&image), expected, "{} bytes", image.len());
        }
    }

    #[test]
    fn long_images_are_cut_in_messages() {
        let rule = rule(&["contoso.azurecr.io"]);
        let image = format!("evil.io/{}", "a/".repeat(400));
        let found = violations(&rule, &pod_with_image(&image));
        assert_eq!(found.len(), 1);
        assert!(found[0].len() < 600, "{}", found[0]);
        assert!(found[0].contains("...\""));
    }

    #[test]
    fn objects_without_pod_specs_have_no_findings() {
        let rule = rule(&["contoso.azurecr.io"]);
        let policy = view(Kind::NetworkPolicy, &json!({"spec": {"podSelector": {}}}), None);
        let no_template = view(Kind::ReplicationController, &json!({"spec": {}}), None);
        assert!(rule.validate(&policy).is_empty());
        assert_eq!(no_template.subject, Subject::Empty);
        assert!(rule.validate(&no_template).is_empty());
    }

    #[test]
    fn compile_errors_name_the_field_and_say_what_is_valid() {
        let cases: &[(&[&str], &[&str], &str, &str)] = &[
            (&[], &[], "registries", "at least one"),
            (&[""], &[], "registries[0]", "empty"),
            (&["contoso.azurecr.io", " "], &[], "registries[1]", "empty"),
            (&["contoso.azurecr.io "], &[], "registries[0]", "whitespace"),
            (&["https://contoso.azurecr.io"], &[], "registries[0]", "remove `https://`"),
            (&["contoso.azurecr.io/app:1.0"], &[], "registries[0]", "has a tag"),
            (&["contoso.azurecr.io:latest"], &[], "registries[0]", "has a tag"),
            (&["nginx:latest"], &[], "registries[0]", "has a tag"),
            (&["contoso.azurecr.io/app@sha256:abc"], &[], "registries[0]", "has a digest"),
            (&["Contoso.azurecr.io"], &[], "registries[0]", "uppercase"),
            (&["mcr.microsoft.com/OSS"], &[], "registries[0]", "uppercase"),
            (&["contoso.azurecr.io/"], &[], "registries[0]", "ends with `/`"),
            (&["mcr.microsoft.com/oss/"], &[], "registries[0]", "ends with `/`"),
            (&["*.azurecr.io"], &[], "registries[0]", "wildcard"),
            (&["mcr.microsoft.com/oss/*"], &[], "registries[0]", "wildcard"),
            (&["contoso.azurecr.io", "mcr.microsoft.com/oss?"], &[], "registries[1]", "wildcard"),
            (&["contoso.azurecr.io/[a]"], &[], "registries[0]", "wildcard"),
            (&["[::1"], &[], "registries[0]", "wildcard"),
            (&["[::1]]"], &[], "registries[0]", "wildcard"),
            (&["[fd00::1]:latest"], &[], "registries[0]", "has a tag"),
            (&["[1:2:3:4:5:6:7:8:9]"], &[], "registries[0]", "not a registry host"),
            (&["[fd00::1]x"], &[], "registries[0]", "not a registry host"),
            (&["[FD00::1]"], &[], "registries[0]", "uppercase"),
            (&["myregistry"], &[], "registries[0]", "not a registry host"),
            (&["contoso_acr.io"], &[], "registries[0]", "not a registry host"),
            (&["contoso.azurecr.io:"], &[], "registries[0]", "not a registry host"),
            (&["/oss"], &[], "registries[0]", "not a registry host"),
            (&["mcr.microsoft.com//oss"], &[], "registries[0]", "repository prefix"),
            (&["mcr.microsoft.com/-oss"], &[], "registries[0]", "repository prefix"),
            (&["contoso.azurecr.io"], &["nginx", ""], "exemptImages[1]", "empty"),
            (&["contoso.azurecr.io"], &["Nginx"], "exemptImages[0]", "lowercase"),
        ];
        for (registries, exempt, field, fragment) in cases {
            let spec = TrustedRegistriesSpec {
                registries: registries.iter().map(|s| (*s).to_owned()).collect(),
                require_digest: false,
                exempt_images: exempt.iter().map(|s| (*s).to_owned()).collect(),
            };
            let error = TrustedRegistries::compile(&spec).expect_err("invalid spec");
            assert_eq!(error.field, *field, "{registries:?} {exempt:?}");
            assert!(error.message.contains(fragment), "{registries:?}: {}", error.message);
            if field.starts_with("registries") {
                assert!(error.message.contains("host[:port]"), "{}", error.message);
            }
        }
    }

    #[test]
    fn valid_entries_compile() {
        for entry in [
            "contoso.azurecr.io",
            "localhost",
            "localhost:5000/team",
            "registry:5000",
            "10.0.0.1:5000",
            "[::1]",
            "[fd00::1]:5000/team",
            "mcr.microsoft.com/oss/a_b/c-d",
            "docker.io/library",
        ] {
            let spec = TrustedRegistriesSpec {
                registries: vec![entry.to_owned()],
                ..TrustedRegistriesSpec::default()
            };
            assert!(TrustedRegistries::compile(&spec).is_ok(), "{entry}");
        }
    }
}
