//! cosign signatures in the simple-signing format (cosign v2 `sign --key`).
//!
//! The signatures of an image at digest `sha256:<hex>` are the layers of the manifest tagged
//! `sha256-<hex>.sig` in the image's repository. Each layer's blob is a simple-signing payload
//! (`application/vnd.dev.cosign.simplesigning.v1+json`) whose
//! `critical.image.docker-manifest-digest` names the signed digest, and its annotation
//! `dev.cosignproject.cosign/signature` holds the base64 signature over the payload's exact
//! bytes (cosign `pkg/oci/static`, `pkg/types`; sigstore-rs `cosign::payload::simple_signing`).
//! Transparency-log bundles and keyless (Fulcio) certificates are not verified: a signature
//! verifies by one of the policy's public keys, offline.
//!
//! Own code rather than the sigstore crate: its cosign feature needs OpenSSL or aws-lc-rs and
//! brings the Fulcio, Rekor and OAuth clients; this is the part arcguard needs, over ring.

use base64::Engine as _;
use serde::Deserialize;

use super::keys::PublicKey;

/// The tag holding the cosign signatures of `digest` (`sha256:<hex>` → `sha256-<hex>.sig`).
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// Media type of a simple-signing payload layer.
pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Annotation holding a layer's base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The `critical.type` of an image signature.
const SIGNATURE_TYPE: &str = "cosign container image signature";

/// One signature layer read from the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CosignSignature {
    /// The layer's digest, as its manifest names it.
    pub layer_digest: String,
    /// The payload blob.
    pub payload: Vec<u8>,
    /// The base64 signature annotation; `None` when the layer has none.
    pub signature: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    #[serde(rename = "type")]
    kind: String,
    image: SignedImage,
}

#[derive(Deserialize)]
struct SignedImage {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

/// Verifies one signature layer for the image at `digest` with any of `keys`: the index of
/// the key that verified it.
///
/// # Errors
/// Why it does not verify, for the denial message.
pub fn verify(
    signature: &CosignSignature,
    digest: &str,
    keys: &[PublicKey],
) -> Result<usize, String> {
    if super::sha256(&signature.payload) != signature.layer_digest {
        return Err(format!(
            "the payload does not match its layer digest {}",
            signature.layer_digest
        ));
    }
    let Some(encoded) = &signature.signature else {
        return Err(format!(
            "layer {} has no {SIGNATURE_ANNOTATION} annotation",
            signature.layer_digest
        ));
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| format!("the signature is not base64: {e}"))?;
    let Some(index) = keys.iter().position(|key| key.verify_cosign(&signature.payload, &raw))
    else {
        return Err("signed by none of the policy's cosign public keys".to_owned());
    };
    let payload: Payload = serde_json::from_slice(&signature.payload)
        .map_err(|e| format!("the payload is not a simple-signing document: {e}"))?;
    if payload.critical.kind != SIGNATURE_TYPE {
        return Err(format!(
            "the payload's type is {:?}, not {SIGNATURE_TYPE:?}",
            payload.critical.kind
        ));
    }
    if payload.critical.image.digest != digest {
        return Err(format!(
            "the signature is for {}, not for this image's digest",
            payload.critical.image.digest
        ));
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use serde_json::json;

    use super::*;
    use crate::signature::keys;

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn payload(digest: &str, kind: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"critical": {"identity": {"docker-reference": "r.io/app"},
            "image": {"docker-manifest-digest": digest}, "type": kind}, "optional": null}))
        .expect("json")
    }

    fn signed(key: &rcgen::KeyPair, payload: Vec<u8>) -> CosignSignature {
        let signature = rcgen::SigningKey::sign(key, &payload).expect("signs");
        CosignSignature {
            layer_digest: crate::signature::sha256(&payload),
            signature: Some(base64::engine::general_purpose::STANDARD.encode(signature)),
            payload,
        }
    }

    #[test]
    fn a_denial_tells_a_missing_tag_from_a_tag_whose_payloads_were_unusable() {
        let key = rcgen::KeyPair::generate().expect("key");
        let trust = crate::signature::SignatureTrust::new(
            keys::from_pem(&key.public_key_pem()).expect("key"),
            None,
            b"t",
        );
        let target = crate::signature::Target { digest: DIGEST, media_type: "m", size: 1 };
        let tag = signature_tag(DIGEST);
        let judge = |evidence: crate::signature::Evidence| match crate::signature::judge(
            &evidence, target, &trust, 0,
        ) {
            crate::signature::SignatureVerdict::Rejected(why) => why,
            other => panic!("{other:?}"),
        };
        let unusable = |notes: &[&str]| crate::signature::Evidence {
            cosign_tag: true,
            cosign_unusable: notes.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        };
        for (evidence, want) in [
            (crate::signature::Evidence::default(), format!("cosign: no signature (no tag {tag})")),
            (unusable(&[]), format!("cosign: the tag {tag} holds no signature payload")),
            (
                unusable(&["payload sha256:aa: 70000 bytes, over the 65536 read"]),
                format!(
                    "cosign: the tag {tag} holds no usable signature (payload sha256:aa: 70000 bytes, over the 65536 read)"
                ),
            ),
            (
                unusable(&["payload sha256:aa: gone", "payload sha256:bb: gone"]),
                format!(
                    "cosign: the tag {tag} holds no usable signature (payload sha256:aa: gone; and 1 more)"
                ),
            ),
        ] {
            assert_eq!(judge(evidence), want);
        }
    }

    #[test]
    fn a_signature_verifies_for_its_digest_by_a_listed_key_only() {
        let key = rcgen::KeyPair::generate().expect("key");
        let other = rcgen::KeyPair::generate().expect("key");
        let trusted = keys::from_pem(&other.public_key_pem())
            .and_then(|mut k| {
                k.extend(keys::from_pem(&key.public_key_pem())?);
                Ok(k)
            })
            .expect("keys");
        let good = signed(&key, payload(DIGEST, SIGNATURE_TYPE));
        assert_eq!(verify(&good, DIGEST, &trusted), Ok(1));

        let other_digest =
            "sha256:2222222222222222222222222222222222222222222222222222222222222222";
        let cases: Vec<(CosignSignature, &str, &str)> = vec![
            (good.clone(), other_digest, "the signature is for sha256:1111"),
            (signed(&key, payload(DIGEST, "something else")), DIGEST, "the payload's type"),
            (
                CosignSignature { payload: payload(other_digest, SIGNATURE_TYPE), ..good.clone() },
                DIGEST,
                "does not match its layer digest",
            ),
            (
                CosignSignature {
                    layer_digest: crate::signature::sha256(&payload(other_digest, SIGNATURE_TYPE)),
                    payload: payload(other_digest, SIGNATURE_TYPE),
                    ..good.clone()
                },
                other_digest,
                "signed by none of the policy's cosign public keys",
            ),
            (
                CosignSignature { signature: None, ..good.clone() },
                DIGEST,
                "has no dev.cosignproject",
            ),
            (
                CosignSignature { signature: Some("%%%".into()), ..good.clone() },
                DIGEST,
                "not base64",
            ),
        ];
        for (signature, digest, why) in cases {
            let error = verify(&signature, digest, &trusted).expect_err("does not verify");
            assert!(error.contains(why), "{error}");
        }
        let untrusted = keys::from_pem(&other.public_key_pem()).expect("key");
        assert!(verify(&good, DIGEST, &untrusted).is_err());
        assert_eq!(
            signature_tag(DIGEST),
            "sha256-1111111111111111111111111111111111111111111111111111111111111111.sig"
        );
    }
}
