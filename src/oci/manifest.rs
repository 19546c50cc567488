//! The parts of OCI and Docker manifests imageProvenance reads: an index's platforms, or a
//! single image's config descriptor and the platform its config names.
//!
//! Own minimal types rather than oci-client's `OciManifest`, whose untagged decoding picks
//! the variant by which fields happen to parse: here the `mediaType` decides, as the OCI image
//! spec says (image-spec v1.1 `manifest.md`, `image-index.md`, `config.md`), with Docker's
//! schema 2 manifest list and manifest as their equivalents.

use serde::Deserialize;

use crate::rules::provenance::Platform;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker schema 2 image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The manifest types asked for, in the `Accept` header.
pub const ACCEPTED: [&str; 4] = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Largest image config read, in bytes; real ones are a few KiB.
pub const CONFIG_MAX_BYTES: u64 = 1024 * 1024;
/// Longest platform field (`os`, `architecture`, `variant`, `os.version`) accepted, in bytes;
/// fields are letters, digits, `.`, `_`, `+` and `-` (GOOS and GOARCH values, `v8`,
/// `10.0.20348.2582`).
/// Real ones are under 32 (`10.0.20348.2582`); denial messages name the platforms an image
/// has, so a registry must not be able to put megabytes into them.
pub const PLATFORM_FIELD_MAX: usize = 128;
/// Most distinct platforms an index may list; real ones list a few dozen at most (Windows
/// images, one per build).
pub const INDEX_PLATFORMS_MAX: usize = 256;

/// What a manifest says about platforms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// An index: the platforms of its entries (entries without one are left out).
    Index(Vec<Platform>),
    /// A single image: its config blob, which names the platform.
    Image {
        /// The config's digest.
        config_digest: String,
        /// The config's size in bytes, as the manifest declares it.
        config_size: u64,
    },
}

/// Why a manifest or config cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("the manifest is not valid JSON for its media type: {0}")]
    Malformed(String),
    /// A media type arcguard does not read (schema 1, an artifact).
    #[error("the manifest has media type {0:?}, not an image or image index")]
    MediaType(String),
    /// The config is larger than [`CONFIG_MAX_BYTES`].
    #[error("the image config is {0} bytes, over the 1 MiB arcguard reads")]
    ConfigTooLarge(u64),
    /// The config is not JSON naming an os and architecture.
    #[error("the image config does not name an os and architecture: {0}")]
    Config(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default, deserialize_with = "super::json::optional_media_type")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<IndexPlatforms>,
    #[serde(default)]
    config: Option<Descriptor>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    platform: Option<WirePlatform>,
}

/// An index's `manifests`, read entry by entry into its distinct platforms in the order listed
/// (an index that repeats one says no more than one that lists it once), at most
/// [`INDEX_PLATFORMS_MAX`]. Nothing else is kept: a megabyte of entries must not become tens
/// of megabytes of decoded ones ([`super::json`]). After the first refusal the rest is skipped.
#[derive(Default)]
struct IndexPlatforms {
    platforms: Vec<Platform>,
    refused: Option<String>,
}

impl<'de> Deserialize<'de> for IndexPlatforms {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(IndexPlatformsVisitor)
    }
}

struct IndexPlatformsVisitor;

impl<'de> serde::de::Visitor<'de> for IndexPlatformsVisitor {
    type Value = IndexPlatforms;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("an array of manifest descriptors")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut index = IndexPlatforms::default();
        let mut seen = std::collections::BTreeSet::new();
        while index.refused.is_none() {
            let Some(entry) = seq.next_element::<Entry>()? else { return Ok(index) };
            let Some(wire) = entry.platform else { continue };
            match wire.checked() {
                Err(why) => index.refused = Some(why),
                Ok(platform) if seen.contains(&platform) => {}
                Ok(_) if index.platforms.len() == INDEX_PLATFORMS_MAX => {
                    index.refused = Some(format!(
                        "the index lists over {INDEX_PLATFORMS_MAX} distinct platforms"
                    ));
                }
                Ok(platform) => {
                    seen.insert(platform.clone());
                    index.platforms.push(platform);
                }
            }
        }
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(index)
    }
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(deserialize_with = "super::json::digest")]
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct WirePlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default, rename = "os.version")]
    os_version: Option<String>,
}

impl WirePlatform {
    /// The platform, or which field is over [`PLATFORM_FIELD_MAX`].
    fn checked(self) -> Result<Platform, String> {
        let fields = [
            ("os", Some(&self.os)),
            ("architecture", Some(&self.architecture)),
            ("variant", self.variant.as_ref()),
            ("os.version", self.os_version.as_ref()),
        ];
        for (name, value) in fields {
            let Some(value) = value else { continue };
            if value.len() > PLATFORM_FIELD_MAX {
                return Err(format!("a platform's {name} is over {PLATFORM_FIELD_MAX} bytes"));
            }
            // Denials and logs quote platforms: a line break would forge a log line.
            if !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)) {
                return Err(format!(
                    "a platform's {name} holds a character other than letters, digits, '.', '_', '+' and '-'"
                ));
            }
        }
        Ok(Platform {
            os: self.os,
            architecture: self.architecture,
            variant: self.variant.filter(|v| !v.is_empty()),
            os_version: self.os_version.filter(|v| !v.is_empty()),
        })
    }
}

/// The media type of a manifest: its `mediaType`, or, without one (the OCI image spec makes it
/// optional), the OCI type its shape says.
///
/// # Errors
/// [`ManifestError::Malformed`] when it is not JSON.
pub fn media_type(body: &[u8]) -> Result<String, ManifestError> {
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    Ok(match envelope.media_type {
        Some(media_type) if !media_type.is_empty() => media_type,
        _ if envelope.manifests.is_some() => OCI_INDEX.to_owned(),
        _ => OCI_MANIFEST.to_owned(),
    })
}

/// Reads a manifest by its `mediaType`; without one (the OCI image spec makes it optional),
/// an index is told by its `manifests` field.
///
/// # Errors
/// [`ManifestError`] when it is not an image or an index, or an index lists a platform field
/// over [`PLATFORM_FIELD_MAX`] or more than [`INDEX_PLATFORMS_MAX`] distinct platforms.
pub fn parse(body: &[u8]) -> Result<Parsed, ManifestError> {
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    let is_index = match envelope.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        None | Some("") => envelope.manifests.is_some(),
        Some(other) => return Err(ManifestError::MediaType(other.to_owned())),
    };
    if is_index {
        let index = envelope
            .manifests
            .ok_or_else(|| ManifestError::Malformed("an index without `manifests`".to_owned()))?;
        if let Some(why) = index.refused {
            return Err(ManifestError::Malformed(why));
        }
        return Ok(Parsed::Index(index.platforms));
    }
    let config = envelope
        .config
        .ok_or_else(|| ManifestError::Malformed("an image manifest without `config`".to_owned()))?;
    if config.size > CONFIG_MAX_BYTES {
        return Err(ManifestError::ConfigTooLarge(config.size));
    }
    Ok(Parsed::Image { config_digest: config.digest, config_size: config.size })
}

/// The platform an image config names (`os`, `architecture`, `variant`, `os.version`).
///
/// # Errors
/// [`ManifestError::Config`] when it names none, or a field over [`PLATFORM_FIELD_MAX`].
pub fn config_platform(body: &[u8]) -> Result<Platform, ManifestError> {
    serde_json::from_slice::<WirePlatform>(body)
        .map_err(|e| ManifestError::Config(e.to_string()))?
        .checked()
        .map_err(ManifestError::Config)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn platform(os: &str, arch: &str, variant: Option<&str>, version: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
            os_version: version.map(Into::into),
        }
    }

    #[test]
    fn reads_platforms_of_indexes_and_configs_of_images() {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": "sha256:aa", "size": 1,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": "sha256:bb", "size": 1,
                 "platform": {"os": "windows", "architecture": "amd64", "os.version": "10.0.20348.2582"}},
                // An entry without a platform (an artifact) is left out.
                {"mediaType": OCI_MANIFEST, "digest": "sha256:cc", "size": 1},
            ]
        });
        let cases: Vec<(serde_json::Value, Result<Parsed, ManifestError>)> = vec![
            (
                index,
                Ok(Parsed::Index(vec![
                    platform("linux", "arm64", Some("v8"), None),
                    platform("windows", "amd64", None, Some("10.0.20348.2582")),
                ])),
            ),
            (
                json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
                    {"digest": "sha256:aa", "size": 1, "platform": {"os": "linux", "architecture": "amd64"}}]}),
                Ok(Parsed::Index(vec![platform("linux", "amd64", None, None)])),
            ),
            // Without a media type, the `manifests` field tells an index.
            (json!({"schemaVersion": 2, "manifests": []}), Ok(Parsed::Index(vec![]))),
            (
                json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:dd", "size": 300},
                       "layers": []}),
                Ok(Parsed::Image { config_digest: "sha256:dd".into(), config_size: 300 }),
            ),
            (
                json!({"schemaVersion": 2, "config": {"digest": "sha256:dd", "size": 2_000_000}, "layers": []}),
                Err(ManifestError::ConfigTooLarge(2_000_000)),
            ),
            (
                json!({"schemaVersion": 2, "mediaType": "application/vnd.cncf.notary.signature"}),
                Err(ManifestError::MediaType("application/vnd.cncf.notary.signature".into())),
            ),
            (
                json!({"schemaVersion": 2, "mediaType": OCI_INDEX}),
                Err(ManifestError::Malformed("an index without `manifests`".into())),
            ),
            (
                json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []}),
                Err(ManifestError::Malformed("an image manifest without `config`".into())),
            ),
        ];
        for (body, want) in cases {
            let body = serde_json::to_vec(&body).expect("json");
            assert_eq!(parse(&body), want, "{}", String::from_utf8_lossy(&body));
        }
        assert!(matches!(parse(b"{"), Err(ManifestError::Malformed(_))));
    }

    #[test]
    fn bounds_what_a_registry_can_put_into_platforms() {
        let index = |entries: Vec<serde_json::Value>| {
            serde_json::to_vec(&json!({"mediaType": OCI_INDEX, "manifests": entries}))
                .expect("json")
        };
        let entry = |os: &str, version: &str| {
            json!({"digest": "sha256:aa", "size": 1,
                   "platform": {"os": os, "architecture": "amd64", "os.version": version}})
        };
        let long = "x".repeat(PLATFORM_FIELD_MAX + 1);
        assert_eq!(
            parse(&index(vec![entry("linux", ""), entry(&long, "")])),
            Err(ManifestError::Malformed(format!(
                "a platform's os is over {PLATFORM_FIELD_MAX} bytes"
            )))
        );
        assert!(
            matches!(parse(&index(vec![entry("windows", &long)])), Err(ManifestError::Malformed(m)) if m.contains("os.version"))
        );
        // Only the characters platform values use: a line break would forge a log line.
        for forged in ["amd64\n2026-12-01T00:00:00Z INFO admission", "amd64 x", "amd64\u{1b}[0m"] {
            assert!(
                matches!(parse(&index(vec![entry("windows", forged)])), Err(ManifestError::Malformed(m)) if m == "a platform's os.version holds a character other than letters, digits, '.', '_', '+' and '-'"),
                "{forged:?}"
            );
        }
        assert!(parse(&index(vec![entry("windows", "10.0.20348.2582")])).is_ok());
        let config = format!(r#"{{"os":"linux","architecture":"{long}"}}"#);
        assert!(
            matches!(config_platform(config.as_bytes()), Err(ManifestError::Config(m)) if m.contains("architecture"))
        );
        // Repeated platforms count once; past the cap of distinct ones the index is refused.
        let repeated: Vec<_> = (0..5000).map(|_| entry("linux", "")).collect();
        assert_eq!(
            parse(&index(repeated)),
            Ok(Parsed::Index(vec![platform("linux", "amd64", None, None)]))
        );
        let distinct: Vec<_> =
            (0..=INDEX_PLATFORMS_MAX).map(|i| entry("windows", &format!("10.0.{i}"))).collect();
        assert!(
            matches!(parse(&index(distinct[..INDEX_PLATFORMS_MAX].to_vec())), Ok(Parsed::Index(p)) if p.len() == INDEX_PLATFORMS_MAX)
        );
        assert!(
            matches!(parse(&index(distinct)), Err(ManifestError::Malformed(m)) if m.contains("distinct platforms"))
        );
    }

    #[test]
    fn reads_the_platform_of_a_config() {
        let config =
            br#"{"architecture":"amd64","os":"windows","os.version":"10.0.17763.1","rootfs":{}}"#;
        assert_eq!(
            config_platform(config),
            Ok(platform("windows", "amd64", None, Some("10.0.17763.1")))
        );
        assert!(matches!(config_platform(br#"{"rootfs":{}}"#), Err(ManifestError::Config(_))));
    }
}
