//! Image signature verification, pure: the signatures the registry adapter read for an image
//! ([`Evidence`]) judged against a policy's trust ([`SignatureTrust`]) at a given time, into a
//! [`SignatureVerdict`]. cosign (`cosign.rs`) and Notation (`notation.rs`) signatures; keys
//! and their algorithms in `keys.rs`.
//!
//! An image verifies when at least one of its signatures verifies by any verifier the policy
//! configures (a cosign public key, or the Notation trust store and identities).

pub mod cosign;
pub mod keys;
pub mod notation;

use std::sync::Arc;

pub use self::cosign::CosignSignature;
pub use self::notation::{NotationSignature, NotationTrust, Target};

/// At most this many signatures of each kind are read and judged per image; more are ignored.
pub const MAX_SIGNATURES: usize = 16;
/// Reasons quoted in a denial, at most.
const MAX_REASONS: usize = 4;

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut text = String::with_capacity(71);
    text.push_str("sha256:");
    for byte in hash.as_ref() {
        text.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        text.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    text
}

/// Identifies a trust configuration: the SHA-256 of its canonical JSON, so that verdicts
/// cached for one policy's keys are never read for another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustId(pub [u8; 32]);

/// The verifiers of one policy.
#[derive(Debug)]
pub struct SignatureTrust {
    id: TrustId,
    cosign: Vec<keys::PublicKey>,
    notation: Option<NotationTrust>,
}

impl PartialEq for SignatureTrust {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl SignatureTrust {
    /// A trust of cosign keys and a Notation trust, identified by `canonical` (the policy's
    /// `signatures` block as JSON).
    pub fn new(
        cosign: Vec<keys::PublicKey>,
        notation: Option<NotationTrust>,
        canonical: &[u8],
    ) -> Self {
        let hash = ring::digest::digest(&ring::digest::SHA256, canonical);
        let mut id = [0; 32];
        id.copy_from_slice(hash.as_ref());
        Self { id: TrustId(id), cosign, notation }
    }

    /// Its identity.
    pub fn id(&self) -> TrustId {
        self.id
    }

    /// Whether cosign signatures are looked for.
    pub fn wants_cosign(&self) -> bool {
        !self.cosign.is_empty()
    }

    /// Whether Notation signatures are looked for.
    pub fn wants_notation(&self) -> bool {
        self.notation.is_some()
    }
}

/// A trust shared by the rule and the facts it asks for, ordered by its identity.
#[derive(Clone, Debug)]
pub struct TrustRef(pub Arc<SignatureTrust>);

impl PartialEq for TrustRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}
impl Eq for TrustRef {}
impl PartialOrd for TrustRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TrustRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

/// The signatures the registry holds for one image digest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// cosign signature layers (the `sha256-<hex>.sig` tag's), empty when there is none.
    pub cosign: Vec<CosignSignature>,
    /// Notation envelopes (the referrers of type [`notation::ARTIFACT_TYPE`]), empty when
    /// there is none.
    pub notation: Vec<NotationSignature>,
    /// Why the registry's answer to the referrers listing (API or tag schema) was not usable:
    /// a refusal, an index over the size read or malformed. The registry answered, so this is
    /// a rejection, not an unreachable registry (which `onRegistryError: Warn` would admit).
    pub notation_unlisted: Option<String>,
    /// Whether the image's cosign signature tag (`sha256-<hex>.sig`) exists.
    pub cosign_tag: bool,
    /// Why layers of the cosign signature tag were not read (refused, over the size read).
    pub cosign_unusable: Vec<String>,
    /// Why referrers of the Notation signature type were not read or used.
    pub notation_unusable: Vec<String>,
}

/// Whether an image's signatures satisfy a trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureVerdict {
    /// A signature verified.
    Verified {
        /// Which verifier and signer, for logs.
        by: String,
        /// Unix seconds after which the verdict no longer holds (a signature's expiry or a
        /// certificate's notAfter; `i64::MAX` for cosign keys).
        valid_until: i64,
    },
    /// No signature verified; why, for each looked at.
    Rejected(String),
    /// The signatures could not be read from the registry; why.
    Unreachable(String),
    /// arcguard had no room to read them now (read slots, memory budget, shutting down);
    /// why. Under `onRegistryError`, as an outage, and never cached.
    Unchecked(String),
}

/// The first of `notes`, then how many more (notes of one kind are much alike).
fn listed(notes: &[String]) -> String {
    match notes {
        [] => String::new(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first}; and {} more", rest.len()),
    }
}

/// Judges `evidence` for the image `target` against `trust` at `now` (Unix seconds).
pub fn judge(
    evidence: &Evidence,
    target: Target<'_>,
    trust: &SignatureTrust,
    now: i64,
) -> SignatureVerdict {
    let mut reasons = Vec::new();
    if trust.wants_cosign() {
        if evidence.cosign.is_empty() {
            let tag = cosign::signature_tag(target.digest);
            reasons.push(match (evidence.cosign_tag, evidence.cosign_unusable.as_slice()) {
                (false, _) => format!("cosign: no signature (no tag {tag})"),
                (true, []) => format!("cosign: the tag {tag} holds no signature payload"),
                (true, unusable) => format!(
                    "cosign: the tag {tag} holds no usable signature ({})",
                    listed(unusable)
                ),
            });
        }
        for (i, signature) in evidence.cosign.iter().take(MAX_SIGNATURES).enumerate() {
            match cosign::verify(signature, target.digest, &trust.cosign) {
                Ok(key) => {
                    return SignatureVerdict::Verified {
                        by: format!(
                            "cosign, public key {} ({})",
                            key + 1,
                            trust.cosign[key].kind()
                        ),
                        valid_until: i64::MAX,
                    };
                }
                Err(why) => reasons.push(format!("cosign signature {}: {why}", i + 1)),
            }
        }
    }
    if let Some(notation_trust) = &trust.notation {
        if let Some(why) = &evidence.notation_unlisted {
            reasons.push(format!("Notation: the image's referrers could not be listed: {why}"));
        } else if evidence.notation.is_empty() {
            reasons.push(if evidence.notation_unusable.is_empty() {
                format!("Notation: no signature (no referrer of type {})", notation::ARTIFACT_TYPE)
            } else {
                format!("Notation: no usable signature ({})", listed(&evidence.notation_unusable))
            });
        }
        for (i, signature) in evidence.notation.iter().take(MAX_SIGNATURES).enumerate() {
            match notation::verify(signature, target, notation_trust, now) {
                Ok(verified) => {
                    return SignatureVerdict::Verified {
                        by: format!("Notation, signed by {}", verified.signer),
                        valid_until: verified.valid_until,
                    };
                }
                Err(why) => reasons.push(format!("Notation signature {}: {why}", i + 1)),
            }
        }
    }
    let more = reasons.len().saturating_sub(MAX_REASONS);
    reasons.truncate(MAX_REASONS);
    if more > 0 {
        reasons.push(format!("{more} more"));
    }
    SignatureVerdict::Rejected(reasons.join("; "))
}
