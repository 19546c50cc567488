//! Public keys that verify image signatures: parsed from SubjectPublicKeyInfo (a PEM
//! `PUBLIC KEY`, or a certificate's), verified with ring.
//!
//! Which algorithm a key verifies with follows from the key and the signature format:
//! - cosign signs the payload with the key's default scheme (sigstore `signature` package):
//!   ECDSA with SHA-256 (P-256) or SHA-384 (P-384) as ASN.1 DER, RSA PKCS#1 v1.5 with SHA-256,
//!   Ed25519;
//! - a Notation JWS names its algorithm (`alg`), which must be the one the leaf key implies
//!   (notaryproject specifications, `signature-specification.md`, "Algorithm selection"):
//!   EC P-256 → ES256, P-384 → ES384, RSA 2048 → PS256, 3072 → PS384, 4096 → PS512; JWS ECDSA
//!   signatures are the fixed-width `r || s`.
//!
//! P-521 (ES512) is not supported by ring: such keys are refused by name.

use ring::signature::{self as ring_sig, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The kind of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// RSA with a modulus of this many bits.
    Rsa(usize),
    /// Ed25519.
    Ed25519,
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EcP256 => f.write_str("ECDSA P-256"),
            Self::EcP384 => f.write_str("ECDSA P-384"),
            Self::Rsa(bits) => write!(f, "RSA {bits}"),
            Self::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

/// A public key that can verify signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    kind: KeyKind,
    /// The `subjectPublicKey` bits: an uncompressed EC point, a DER `RSAPublicKey`, or the 32
    /// Ed25519 bytes, as ring takes them.
    raw: Vec<u8>,
}

/// Why a key cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not DER SubjectPublicKeyInfo.
    #[error("not a SubjectPublicKeyInfo: {0}")]
    Malformed(String),
    /// A key type or curve arcguard cannot verify with.
    #[error(
        "unsupported key: {0} (supported: ECDSA P-256 and P-384, RSA of 2048 to 8192 bits, Ed25519)"
    )]
    Unsupported(String),
}

impl PublicKey {
    /// The key of a DER SubjectPublicKeyInfo.
    ///
    /// # Errors
    /// [`KeyError`] for malformed or unsupported keys.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let (_, spki) =
            SubjectPublicKeyInfo::from_der(der).map_err(|e| KeyError::Malformed(e.to_string()))?;
        Self::from_spki(&spki)
    }

    /// The key of a parsed SubjectPublicKeyInfo (a certificate's).
    ///
    /// # Errors
    /// [`KeyError`] for unsupported keys.
    pub fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, KeyError> {
        let raw = spki.subject_public_key.data.to_vec();
        let algorithm = &spki.algorithm.algorithm;
        let kind =
            if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
                let curve =
                    spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).ok_or_else(
                        || KeyError::Malformed("an EC key without a named curve".into()),
                    )?;
                if curve == OID_EC_P256 {
                    KeyKind::EcP256
                } else if curve == OID_NIST_EC_P384 {
                    KeyKind::EcP384
                } else {
                    return Err(KeyError::Unsupported(format!("EC curve {curve}")));
                }
            } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
                let bits = match spki.parsed() {
                    Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa.key_size(),
                    _ => return Err(KeyError::Malformed("an RSA key that does not parse".into())),
                };
                if !(2048..=8192).contains(&bits) {
                    return Err(KeyError::Unsupported(format!("RSA {bits}")));
                }
                KeyKind::Rsa(bits)
            } else if *algorithm == OID_SIG_ED25519 {
                KeyKind::Ed25519
            } else {
                return Err(KeyError::Unsupported(format!("key algorithm {algorithm}")));
            };
        Ok(Self { kind, raw })
    }

    /// The kind of key.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// Whether `signature` (DER for ECDSA) signs `message` under cosign's scheme for this key.
    pub fn verify_cosign(&self, message: &[u8], signature: &[u8]) -> bool {
        let algorithm: &dyn VerificationAlgorithm = match self.kind {
            KeyKind::EcP256 => &ring_sig::ECDSA_P256_SHA256_ASN1,
            KeyKind::EcP384 => &ring_sig::ECDSA_P384_SHA384_ASN1,
            KeyKind::Rsa(_) => &ring_sig::RSA_PKCS1_2048_8192_SHA256,
            KeyKind::Ed25519 => &ring_sig::ED25519,
        };
        UnparsedPublicKey::new(algorithm, &self.raw).verify(message, signature).is_ok()
    }

    /// The JWS `alg` this key signs Notation envelopes with.
    pub fn jws_algorithm(&self) -> Option<&'static str> {
        match self.kind {
            KeyKind::EcP256 => Some("ES256"),
            KeyKind::EcP384 => Some("ES384"),
            KeyKind::Rsa(2048) => Some("PS256"),
            KeyKind::Rsa(3072) => Some("PS384"),
            KeyKind::Rsa(4096) => Some("PS512"),
            KeyKind::Rsa(_) | KeyKind::Ed25519 => None,
        }
    }

    /// Whether `signature` signs `message` under JWS algorithm `alg` with this key.
    pub fn verify_jws(&self, alg: &str, message: &[u8], signature: &[u8]) -> bool {
        let algorithm: &dyn VerificationAlgorithm = match (alg, self.kind) {
            ("ES256", KeyKind::EcP256) => &ring_sig::ECDSA_P256_SHA256_FIXED,
            ("ES384", KeyKind::EcP384) => &ring_sig::ECDSA_P384_SHA384_FIXED,
            ("PS256", KeyKind::Rsa(_)) => &ring_sig::RSA_PSS_2048_8192_SHA256,
            ("PS384", KeyKind::Rsa(_)) => &ring_sig::RSA_PSS_2048_8192_SHA384,
            ("PS512", KeyKind::Rsa(_)) => &ring_sig::RSA_PSS_2048_8192_SHA512,
            _ => return false,
        };
        UnparsedPublicKey::new(algorithm, &self.raw).verify(message, signature).is_ok()
    }
}

/// The keys of a PEM text holding one or more `PUBLIC KEY` blocks.
///
/// # Errors
/// Why the text holds no usable key.
pub fn from_pem(pem: &str) -> Result<Vec<PublicKey>, String> {
    use rustls_pki_types::SubjectPublicKeyInfoDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut keys = Vec::new();
    for der in SubjectPublicKeyInfoDer::pem_slice_iter(pem.as_bytes()) {
        let der = der.map_err(|e| format!("the PEM does not parse: {e}"))?;
        keys.push(PublicKey::from_spki_der(der.as_ref()).map_err(|e| e.to_string())?);
    }
    if keys.is_empty() {
        return Err("no PEM `PUBLIC KEY` block (cosign.pub holds one)".to_owned());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_of(key: &rcgen::KeyPair) -> String {
        key.public_key_pem()
    }

    #[test]
    fn keys_verify_what_they_signed_and_nothing_else() {
        let cases = [
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyKind::EcP256, Some("ES256")),
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcP384, Some("ES384")),
            (&rcgen::PKCS_ED25519, KeyKind::Ed25519, None),
        ];
        for (algorithm, kind, jws) in cases {
            let pair = rcgen::KeyPair::generate_for(algorithm).expect("key");
            let keys = from_pem(&pem_of(&pair)).expect("parses");
            assert_eq!(keys.len(), 1);
            assert_eq!(keys[0].kind(), kind);
            assert_eq!(keys[0].jws_algorithm(), jws);
            // rcgen signs as X.509 does: ECDSA in ASN.1 DER, as cosign does.
            let signature = rcgen::SigningKey::sign(&pair, b"payload").expect("signs");
            assert!(keys[0].verify_cosign(b"payload", &signature), "{kind}");
            assert!(!keys[0].verify_cosign(b"other payload", &signature), "{kind}");
            assert!(!keys[0].verify_cosign(b"payload", b"not a signature"), "{kind}");
        }
        assert!(from_pem("no key here").is_err());
        assert!(from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
    }
}
