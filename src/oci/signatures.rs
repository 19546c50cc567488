//! Reading an image's signatures from its registry, for [`crate::signature::judge`]:
//! - cosign: the manifest tagged `sha256-<hex>.sig` in the image's repository, and its layers'
//!   payload blobs with their signature annotations;
//! - Notation: the image's referrers of type `application/vnd.cncf.notary.signature`, through
//!   the OCI referrers API or, where the registry lacks it (CNCF Distribution 3.1 does), the
//!   referrers tag schema (`sha256-<hex>`); each signature manifest's one envelope blob.
//!
//! At most [`MAX_SIGNATURES`] signatures of each kind are read, each blob at most
//! [`ENVELOPE_MAX_BYTES`] and all of them together at most [`EVIDENCE_MAX_BYTES`], one manifest
//! held at a time, each manifest and referrers index at most
//! [`super::fetch::MANIFEST_MAX_BYTES`], and only manifests whose `subject` is the image.

use oci_client::Reference;
use serde::Deserialize;

use super::fetch::Fetcher;
use super::json::{self, Kept};
use super::{Access, Failure, manifest};
use crate::signature::{
    CosignSignature, Evidence, MAX_SIGNATURES, NotationSignature, SignatureTrust, cosign, notation,
};

/// Largest signature payload or envelope read, in bytes; real ones are a few KiB (a cosign
/// payload under 1 KiB, a Notation envelope with its certificate chain under 16 KiB).
pub const ENVELOPE_MAX_BYTES: u64 = 64 * 1024;
/// Most bytes of payloads and envelopes one signatures read holds, all verifiers together:
/// with [`super::slots::MAX_READS`] reads at once, this (and the one manifest a read holds at
/// a time) is what a registry in scope can make arcguard hold for signatures.
pub const EVIDENCE_MAX_BYTES: u64 = 512 * 1024;

/// What is left of [`EVIDENCE_MAX_BYTES`] for one signatures read.
struct Budget(u64);

impl Budget {
    /// Takes `size` bytes, or says why a blob that large is not read.
    fn take(&mut self, size: u64) -> Result<(), String> {
        if size > self.0 {
            return Err(format!(
                "not read: the signatures of this image are over the {} KiB arcguard reads in all",
                EVIDENCE_MAX_BYTES / 1024
            ));
        }
        self.0 -= size;
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignatureManifest {
    #[serde(default, deserialize_with = "json::optional_media_type")]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    /// A cosign signature manifest has a layer per signature, a Notation one a single layer.
    #[serde(default)]
    layers: Kept<Descriptor, LAYERS_KEPT>,
    #[serde(default)]
    subject: Option<Descriptor>,
}

/// A descriptor; its strings are bounded ([`json`]): a media type of a megabyte, kept by each
/// of 16 signatures and quoted in each reason, held 16 MiB for one read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default, deserialize_with = "json::media_type")]
    media_type: String,
    #[serde(deserialize_with = "json::digest")]
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: Annotations,
}

/// The one annotation read from a layer; the others are skipped unread, however many.
#[derive(Default, Deserialize)]
struct Annotations {
    /// [`cosign::SIGNATURE_ANNOTATION`] (serde takes only a literal).
    #[serde(
        rename = "dev.cosignproject.cosign/signature",
        default,
        deserialize_with = "json::optional_signature"
    )]
    signature: Option<String>,
}

/// Layers of a signature manifest kept (the rest are skipped as read, [`super::json`]): four
/// times the signatures judged, so a few layers of other types do not hide a signature.
const LAYERS_KEPT: usize = 4 * MAX_SIGNATURES;

/// The signatures `trust` looks for on the image `name@digest`.
///
/// # Errors
/// Why the registry could not be read.
pub(crate) async fn evidence(
    fetcher: &Fetcher,
    access: &Access,
    name: &str,
    digest: &str,
    trust: &SignatureTrust,
) -> Result<Evidence, String> {
    let mut evidence = Evidence::default();
    let mut budget = Budget(EVIDENCE_MAX_BYTES);
    if trust.wants_cosign() {
        cosign_signatures(fetcher, access, name, digest, &mut budget, &mut evidence).await?;
    }
    if trust.wants_notation() {
        notation_signatures(fetcher, access, name, digest, &mut budget, &mut evidence).await?;
    }
    Ok(evidence)
}

/// The image's cosign signatures into `evidence` (and why layers of its `.sig` tag were not
/// usable).
///
/// # Errors
/// Why the registry could not be read.
async fn cosign_signatures(
    fetcher: &Fetcher,
    access: &Access,
    name: &str,
    digest: &str,
    budget: &mut Budget,
    evidence: &mut Evidence,
) -> Result<(), String> {
    let reference: Reference = format!("{name}:{}", cosign::signature_tag(digest))
        .parse()
        .map_err(|e| format!("the signature tag is not a reference: {e}"))?;
    let accepted = [manifest::OCI_MANIFEST, manifest::DOCKER_MANIFEST];
    let body = match fetcher.manifest(access, &reference, &accepted).await {
        Ok((body, _)) => body,
        // No such tag: the image has no cosign signature.
        Err(Failure::Refused(_)) => return Ok(()),
        Err(Failure::Unreachable(why)) => return Err(why),
        // The tag is there, but its manifest is larger than arcguard reads.
        Err(Failure::Unread(why)) => {
            evidence.cosign_tag = true;
            evidence.cosign_unusable.push(format!("its manifest was not read: {why}"));
            return Ok(());
        }
    };
    evidence.cosign_tag = true;
    // Parsed, the manifest's bytes are let go before any payload is read.
    let parsed = serde_json::from_slice::<SignatureManifest>(&body);
    drop(body);
    let signatures = match parsed {
        Ok(signatures) => signatures,
        Err(e) => {
            evidence.cosign_unusable.push(format!("its manifest does not parse: {e}"));
            return Ok(());
        }
    };
    let payloads = signatures
        .layers
        .items
        .into_iter()
        .filter(|layer| layer.media_type == cosign::PAYLOAD_MEDIA_TYPE)
        .take(MAX_SIGNATURES);
    for layer in payloads {
        if let Err(why) = budget.take(layer.size) {
            evidence.cosign_unusable.push(format!("payload {}: {why}", layer.digest));
            break;
        }
        let payload = match fetcher
            .blob(access, &reference, &layer.digest, layer.size, ENVELOPE_MAX_BYTES)
            .await
        {
            Ok(payload) => payload,
            Err(Failure::Unreachable(why)) => return Err(why),
            Err(Failure::Refused(why) | Failure::Unread(why)) => {
                evidence.cosign_unusable.push(format!("payload {}: {why}", layer.digest));
                continue;
            }
        };
        evidence.cosign.push(CosignSignature {
            signature: layer.annotations.signature,
            layer_digest: layer.digest,
            payload,
        });
    }
    Ok(())
}

/// The image's Notation signatures into `evidence`, or why its referrers could not be listed
/// though the registry answered (refused, over the size read, malformed), and why referrers
/// were not usable.
///
/// # Errors
/// Why the registry could not be read.
async fn notation_signatures(
    fetcher: &Fetcher,
    access: &Access,
    name: &str,
    digest: &str,
    budget: &mut Budget,
    evidence: &mut Evidence,
) -> Result<(), String> {
    let image: Reference = format!("{name}@{digest}")
        .parse()
        .map_err(|e| format!("the image is not a reference: {e}"))?;
    // Empty when neither the referrers API nor the tag schema has an index.
    let referrers = match fetcher.referrers(access, &image, notation::ARTIFACT_TYPE).await {
        Ok(referrers) => referrers,
        Err(Failure::Unreachable(why)) => return Err(why),
        Err(Failure::Refused(why) | Failure::Unread(why)) => {
            evidence.notation_unlisted = Some(why);
            return Ok(());
        }
    };
    for entry in referrers.into_iter().take(MAX_SIGNATURES) {
        let reference: Reference = match format!("{name}@{}", entry.digest).parse() {
            Ok(reference) => reference,
            Err(_) => continue,
        };
        let unusable = |why: String| format!("referrer {}: {why}", entry.digest);
        let body = match fetcher.manifest(access, &reference, &[manifest::OCI_MANIFEST]).await {
            Ok((body, _)) => body,
            Err(Failure::Unreachable(why)) => return Err(why),
            Err(Failure::Refused(why) | Failure::Unread(why)) => {
                evidence.notation_unusable.push(unusable(why));
                continue;
            }
        };
        let parsed = serde_json::from_slice::<SignatureManifest>(&body);
        drop(body);
        let signature = match parsed {
            Ok(signature) => signature,
            Err(e) => {
                evidence.notation_unusable.push(unusable(format!("does not parse: {e}")));
                continue;
            }
        };
        let is_notation = signature.artifact_type.as_deref() == Some(notation::ARTIFACT_TYPE)
            || signature.config.as_ref().is_some_and(|c| c.media_type == notation::ARTIFACT_TYPE);
        let for_image = signature.subject.as_ref().is_some_and(|s| s.digest == digest);
        let [envelope] = signature.layers.items.as_slice() else {
            evidence.notation_unusable.push(unusable("not one envelope layer".to_owned()));
            continue;
        };
        if !is_notation || !for_image {
            let why = if is_notation { "signs another digest" } else { "not a Notation signature" };
            evidence.notation_unusable.push(unusable(why.to_owned()));
            continue;
        }
        if let Err(why) = budget.take(envelope.size) {
            evidence.notation_unusable.push(unusable(why));
            break;
        }
        let bytes = match fetcher
            .blob(access, &reference, &envelope.digest, envelope.size, ENVELOPE_MAX_BYTES)
            .await
        {
            Ok(bytes) => bytes,
            Err(Failure::Unreachable(why)) => return Err(why),
            Err(Failure::Refused(why) | Failure::Unread(why)) => {
                evidence.notation_unusable.push(unusable(format!("its envelope: {why}")));
                continue;
            }
        };
        evidence
            .notation
            .push(NotationSignature { media_type: envelope.media_type.clone(), envelope: bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_signature_manifest_keeps_its_first_layers_and_the_signature_annotation_only() {
        let layer = |i: usize| {
            json!({
                "mediaType": cosign::PAYLOAD_MEDIA_TYPE,
                "digest": format!("sha256:{i:064x}"),
                "size": 200,
                "annotations": {
                    "org.example/other": "x",
                    cosign::SIGNATURE_ANNOTATION: format!("sig-{i}"),
                    "dev.sigstore.cosign/bundle": "{}",
                },
            })
        };
        let body = json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:00", "size": 2},
            "layers": (0..1000).map(layer).collect::<Vec<_>>(),
        });
        let parsed: SignatureManifest = serde_json::from_value(body).expect("parses");
        assert_eq!(parsed.layers.items.len(), LAYERS_KEPT);
        assert_eq!(parsed.layers.skipped, 1000 - LAYERS_KEPT);
        assert_eq!(parsed.layers.items[3].annotations.signature.as_deref(), Some("sig-3"));
        assert_eq!(parsed.layers.items[3].digest, format!("sha256:{:064x}", 3));
    }

    #[test]
    fn descriptor_strings_over_their_bound_fail_the_manifest_unquoted() {
        let long = "x".repeat(1024 * 1024);
        let with = |field: &str, value: &str| {
            let mut layer =
                json!({"mediaType": notation::ARTIFACT_TYPE, "digest": "sha256:00", "size": 2});
            layer[field] = json!(value);
            json!({"artifactType": notation::ARTIFACT_TYPE, "layers": [layer]})
        };
        for field in ["mediaType", "digest"] {
            let error = serde_json::from_value::<SignatureManifest>(with(field, &long))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.starts_with("a string of 1048576 bytes, over the"), "{field}: {error}");
        }
        let artifact = json!({"artifactType": long, "layers": []});
        assert!(serde_json::from_value::<SignatureManifest>(artifact).is_err());
        let mut signed = with("mediaType", cosign::PAYLOAD_MEDIA_TYPE);
        signed["layers"][0]["annotations"] = json!({cosign::SIGNATURE_ANNOTATION: long});
        assert!(serde_json::from_value::<SignatureManifest>(signed).is_err());
    }
}
