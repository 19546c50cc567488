//! Notation signatures: a JWS or COSE envelope signed with an X.509 key whose certificate chain
//! ends in the policy's trust store, for a subject the policy trusts.
//!
//! Rules, from the notaryproject specifications (`signature-specification.md`,
//! `signature-envelope-jws.md`, `signature-envelope-cose.md`, `trust-store-trust-policy.md`),
//! at the `strict` verification level:
//! - **integrity**: the envelope is flattened JWS JSON with exactly `payload`, `protected`,
//!   `header` and `signature`, or a tagged COSE_Sign1 (coset) with the chain in `x5chain`; the
//!   content type is the Notation payload type; `alg` is the one the leaf key
//!   implies; every `crit` header is one arcguard understands (a verification plugin is
//!   refused); the signature verifies over `protected '.' payload`; the payload's
//!   `targetArtifact` names this image's digest, media type and size;
//! - **authenticity**: the `x5c` chain is ordered leaf to root, each certificate signed by the
//!   next; the last is in the trust store or signed by a certificate in it; CA certificates
//!   have basicConstraints CA and keyUsage keyCertSign; the leaf may sign (digitalSignature, no
//!   keyCertSign) and has no serverAuth, clientAuth, emailProtection, timeStamping or
//!   anyExtendedKeyUsage; no SHA-1 signatures; the leaf's subject matches a trusted identity;
//! - **expiry**: now is before `io.cncf.notary.expiry`;
//! - **authentic timestamp** (scheme `notary.x509`, no timestamp authority): every certificate
//!   of the chain is valid now.
//!
//! Not done: revocation (no CRL or OCSP is fetched at admission), RFC 3161 timestamps, and the
//! `notary.x509.signingAuthority` scheme, which is refused by name. JWS is read with serde_json
//! and base64 (no JOSE crate fits Notation's unprotected `x5c` header without OpenSSL or a second
//! crypto stack); COSE with coset; X.509 with x509-parser; signatures with ring.

use std::fmt::Write as _;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

use super::keys::PublicKey;

/// `artifactType` of a Notation signature manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.cncf.notary.signature";
/// Media type of a JWS envelope layer.
pub const JWS_MEDIA_TYPE: &str = "application/jose+json";
/// Media type of a COSE envelope layer.
pub const COSE_MEDIA_TYPE: &str = "application/cose";
/// `cty` of a Notation payload.
const PAYLOAD_CONTENT_TYPE: &str = "application/vnd.cncf.notary.payload.v1+json";
const SIGNING_SCHEME: &str = "io.cncf.notary.signingScheme";
const SIGNING_TIME: &str = "io.cncf.notary.signingTime";
const EXPIRY: &str = "io.cncf.notary.expiry";
const AUTHENTIC_SIGNING_TIME: &str = "io.cncf.notary.authenticSigningTime";
const VERIFICATION_PLUGIN: &str = "io.cncf.notary.verificationPlugin";
const VERIFICATION_PLUGIN_MIN_VERSION: &str = "io.cncf.notary.verificationPluginMinVersion";
/// Subject attributes a trusted identity may name, by OID.
const ATTRIBUTES: [(&str, &str); 6] = [
    ("2.5.4.3", "CN"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
];
/// Signature algorithms refused in chains (SHA-1).
const SHA1_SIGNATURES: [&str; 2] = ["1.2.840.113549.1.1.5", "1.2.840.10045.4.1"];

/// One signature envelope read from the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotationSignature {
    /// The envelope layer's media type.
    pub media_type: String,
    /// The envelope.
    pub envelope: Vec<u8>,
}

/// The image a signature must be for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// `sha256:<hex>`.
    pub digest: &'a str,
    /// The manifest's media type.
    pub media_type: &'a str,
    /// The manifest's size in bytes.
    pub size: u64,
}

/// Whose signatures are trusted: root certificates and subjects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotationTrust {
    /// DER root (or intermediate) certificates.
    roots: Vec<Vec<u8>>,
    /// `None`: any subject (`"*"`); else the leaf's subject must hold every attribute of one.
    identities: Option<Vec<Vec<(String, String)>>>,
}

/// A signature that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The leaf certificate's subject.
    pub signer: String,
    /// Unix seconds after which it no longer verifies (expiry, or a certificate's notAfter).
    pub valid_until: i64,
}

impl NotationTrust {
    /// The trust of a trust store (PEM texts, each holding one or more certificates) and
    /// trusted identities (`x509.subject: C=US, ST=WA, O=Contoso` or `*`). Errors name the
    /// field relative to the `notation` block.
    ///
    /// # Errors
    /// [`crate::rules::FieldError`] for a certificate that does not parse, or an identity that
    /// is not `*` or an `x509.subject` with C, ST and O.
    pub fn compile(
        trust_store: &[String],
        trusted_identities: &[String],
    ) -> Result<Self, crate::rules::FieldError> {
        use crate::rules::FieldError;
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = Vec::new();
        if trust_store.is_empty() {
            return Err(FieldError::new(
                "trustStore",
                "at least one PEM CA certificate is required (the root of the signing chain)",
            ));
        }
        for (i, pem) in trust_store.iter().enumerate() {
            let field = || format!("trustStore[{i}]");
            let before = roots.len();
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let der = der.map_err(|e| {
                    FieldError::new(field(), format!("the PEM does not parse: {e}"))
                })?;
                X509Certificate::from_der(der.as_ref()).map_err(|e| {
                    FieldError::new(field(), format!("not an X.509 certificate: {e}"))
                })?;
                roots.push(der.to_vec());
            }
            if roots.len() == before {
                return Err(FieldError::new(field(), "no PEM CERTIFICATE block"));
            }
        }
        if trusted_identities.is_empty() {
            return Err(FieldError::new(
                "trustedIdentities",
                "at least one is required: \"x509.subject: C=..., ST=..., O=...\", or \"*\" for any subject the trust store vouches for",
            ));
        }
        let identities = if trusted_identities.iter().any(|i| i.trim() == "*") {
            if trusted_identities.len() > 1 {
                return Err(FieldError::new("trustedIdentities", "\"*\" must be the only entry"));
            }
            None
        } else {
            let parsed = trusted_identities
                .iter()
                .enumerate()
                .map(|(i, identity)| {
                    parse_identity(identity)
                        .map_err(|why| FieldError::new(format!("trustedIdentities[{i}]"), why))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(parsed)
        };
        Ok(Self { roots, identities })
    }
}

/// Parses `x509.subject: C=US, ST=WA, O=Contoso` (`\,` and `\\` escape) into its attributes.
fn parse_identity(identity: &str) -> Result<Vec<(String, String)>, String> {
    let Some(subject) = identity.trim().strip_prefix("x509.subject:") else {
        return Err(format!(
            "{identity:?} is neither \"*\" nor \"x509.subject: <distinguished name>\""
        ));
    };
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = subject.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ',' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    let mut attributes = Vec::new();
    for part in parts {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("{:?} is not an attribute=value pair", part.trim()));
        };
        let key = match key.trim().to_ascii_uppercase().as_str() {
            "S" => "ST".to_owned(),
            key => key.to_owned(),
        };
        if !ATTRIBUTES.iter().any(|(_, name)| *name == key) {
            return Err(format!("unknown attribute {key:?}; use C, ST, L, O, OU or CN"));
        }
        attributes.push((key, value.trim().to_owned()));
    }
    for required in ["C", "ST", "O"] {
        if !attributes.iter().any(|(key, _)| key == required) {
            return Err(format!(
                "the subject must name {required}: Notation requires C, ST and O in a trusted identity"
            ));
        }
    }
    Ok(attributes)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Jws {
    payload: String,
    protected: String,
    header: Unprotected,
    signature: String,
}

#[derive(Deserialize)]
struct Unprotected {
    x5c: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    target_artifact: TargetArtifact,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TargetArtifact {
    media_type: String,
    digest: String,
    size: u64,
}

/// Most certificates an envelope's `x5c` may hold: real chains are a leaf, an intermediate or
/// two, and a root.
pub const MAX_CHAIN: usize = 10;

/// Verifies one envelope for `target` against `trust` at `now` (Unix seconds).
///
/// # Errors
/// Why it does not verify, for the denial message.
pub fn verify(
    signature: &NotationSignature,
    target: Target<'_>,
    trust: &NotationTrust,
    now: i64,
) -> Result<Verified, String> {
    let envelope = match signature.media_type.as_str() {
        JWS_MEDIA_TYPE => jws_envelope(&signature.envelope)?,
        COSE_MEDIA_TYPE => cose_envelope(&signature.envelope)?,
        other => return Err(format!("an envelope of media type {other:?}")),
    };
    let alg = envelope.alg;
    let mut valid_until = i64::MAX;
    if let Some(expiry) = envelope.expiry {
        if now >= expiry {
            return Err(format!("the signature expired at {}", rfc3339(expiry)));
        }
        valid_until = expiry;
    }

    // The chain: bounded, parsed, and anchored in the trust store before any other signature
    // is checked, so an envelope from a key the trust store does not vouch for costs one
    // signature check at most, however long its chain (a tenant's 376-certificate chain cost
    // 286 ms an envelope when every link was verified first).
    let ders = &envelope.x5c;
    if ders.len() > MAX_CHAIN {
        return Err(format!(
            "x5c holds {} certificates, more than the {MAX_CHAIN} arcguard verifies",
            ders.len()
        ));
    }
    let chain: Vec<X509Certificate<'_>> = ders
        .iter()
        .map(|der| X509Certificate::from_der(der).map(|(_, cert)| cert))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("an x5c certificate does not parse: {e}"))?;
    let Some(leaf) = chain.first() else { return Err("x5c holds no certificate".to_owned()) };
    let last_der = ders.last().ok_or("x5c holds no certificate")?;
    let Some(last) = chain.last() else { return Err("x5c holds no certificate".to_owned()) };
    let anchor = trust.roots.iter().find_map(|root| {
        if root == last_der {
            return Some(None);
        }
        let (_, root) = X509Certificate::from_der(root).ok()?;
        (root.subject() == last.issuer() && last.verify_signature(Some(root.public_key())).is_ok())
            .then_some(Some(root))
    });
    let anchor = match anchor {
        Some(anchor) => anchor,
        None => {
            return Err(format!(
                "the chain ends in {:?}, which is not in (or signed by) the trust store",
                last.subject().to_string()
            ));
        }
    };
    let key = PublicKey::from_spki(leaf.public_key()).map_err(|e| format!("the leaf's {e}"))?;
    match key.jws_algorithm() {
        Some(expected) if expected == alg => {}
        Some(expected) => {
            return Err(format!(
                "alg is {alg} but the leaf's {} key signs with {expected}",
                key.kind()
            ));
        }
        None => {
            return Err(format!("the leaf's {} key is not one Notation signs with", key.kind()));
        }
    }
    if !key.verify_jws(alg, &envelope.signed, &envelope.signature) {
        return Err(
            "the signature does not verify with the leaf certificate's key (tampered)".to_owned()
        );
    }
    let payload: Payload = serde_json::from_slice(&envelope.payload)
        .map_err(|_| "the payload is not a Notation payload".to_owned())?;
    let artifact = payload.target_artifact;
    if artifact.digest != target.digest {
        return Err(format!(
            "the signature is for {}, not for this image's digest",
            artifact.digest
        ));
    }
    if artifact.media_type != target.media_type || artifact.size != target.size {
        return Err(format!(
            "the signature is for a {} of {} bytes, but the image's manifest is a {} of {} bytes",
            artifact.media_type, artifact.size, target.media_type, target.size
        ));
    }

    // Authenticity: the chain, its end in the trust store, the certificates' uses and times.
    check_leaf(leaf)?;
    for (i, pair) in chain.windows(2).enumerate() {
        let (child, issuer) = (&pair[0], &pair[1]);
        check_ca(issuer)?;
        check_algorithm(child)?;
        child
            .verify_signature(Some(issuer.public_key()))
            .map_err(|_| format!("certificate {} of x5c is not signed by the next one", i + 1))?;
    }
    if let Some(root) = &anchor {
        check_ca(root)?;
        check_algorithm(last)?;
    }
    for cert in chain.iter().chain(anchor.iter()) {
        let validity = cert.validity();
        let (from, until) = (validity.not_before.timestamp(), validity.not_after.timestamp());
        if now < from {
            return Err(format!(
                "certificate {:?} is not valid before {}",
                cert.subject().to_string(),
                rfc3339(from)
            ));
        }
        if now >= until {
            return Err(format!(
                "certificate {:?} expired at {}",
                cert.subject().to_string(),
                rfc3339(until)
            ));
        }
        valid_until = valid_until.min(until);
    }
    if let Some(identities) = &trust.identities {
        let subject = subject_attributes(leaf);
        // Notation refuses a subject naming an attribute twice (`O=Contoso, O=Evil` would
        // otherwise match `O=Contoso`).
        let mut names: Vec<&str> = subject.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(format!(
                "signed by {:?}, whose subject names an attribute twice",
                leaf.subject().to_string()
            ));
        }
        let trusted = identities.iter().any(|identity| {
            identity.iter().all(|(key, value)| subject.iter().any(|(k, v)| k == key && v == value))
        });
        if !trusted {
            return Err(format!(
                "signed by {:?}, which is not a trusted identity",
                leaf.subject().to_string()
            ));
        }
    }
    Ok(Verified { signer: leaf.subject().to_string(), valid_until })
}

/// What an envelope says, whatever its format: the headers checked, the bytes signed, the
/// signature, the payload and the certificate chain (DER, leaf first).
struct Envelope {
    /// The algorithm, by its JWS name (COSE's are mapped).
    alg: &'static str,
    /// `io.cncf.notary.expiry`, Unix seconds.
    expiry: Option<i64>,
    payload: Vec<u8>,
    x5c: Vec<Vec<u8>>,
    signed: Vec<u8>,
    signature: Vec<u8>,
}

/// The algorithms Notation signs with, by JWS name.
const ALGORITHMS: [&str; 6] = ["ES256", "ES384", "ES512", "PS256", "PS384", "PS512"];

/// Checks the headers every envelope carries: `crit` (given as the names it lists, `present`
/// saying whether a header is there), the signing scheme and the signing time.
fn check_headers(
    critical: &[&str],
    present: &dyn Fn(&str) -> bool,
    scheme: Option<&str>,
) -> Result<(), String> {
    if !critical.contains(&SIGNING_SCHEME) {
        return Err(format!("{SIGNING_SCHEME} is not marked critical"));
    }
    for name in critical {
        match *name {
            SIGNING_SCHEME | EXPIRY | AUTHENTIC_SIGNING_TIME => {}
            VERIFICATION_PLUGIN | VERIFICATION_PLUGIN_MIN_VERSION => {
                return Err(
                    "the signature requires a verification plugin, which arcguard does not run"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown critical header {other:?}")),
        }
        if !present(name) {
            return Err(format!("critical header {name:?} is missing"));
        }
    }
    for name in [EXPIRY, AUTHENTIC_SIGNING_TIME] {
        if present(name) && !critical.contains(&name) {
            return Err(format!("{name} is present but not marked critical"));
        }
    }
    match scheme {
        Some("notary.x509") => {}
        Some(other) => {
            return Err(format!(
                "signing scheme {other:?} (only notary.x509 is verified: no timestamp authority is consulted)"
            ));
        }
        None => return Err(format!("no {SIGNING_SCHEME}")),
    }
    if !present(SIGNING_TIME) {
        return Err(format!("no {SIGNING_TIME}"));
    }
    Ok(())
}

/// A flattened JWS JSON envelope (`signature-envelope-jws.md`).
fn jws_envelope(bytes: &[u8]) -> Result<Envelope, String> {
    let jws: Jws = serde_json::from_slice(bytes)
        .map_err(|e| format!("the envelope is not flattened JWS JSON: {e}"))?;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let protected: Map<String, Value> = url
        .decode(&jws.protected)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or("the protected header is not base64url JSON")?;
    let text = |name: &str| protected.get(name).and_then(Value::as_str);
    let alg = text("alg").ok_or("the protected header has no alg")?;
    let alg = ALGORITHMS
        .iter()
        .find(|known| **known == alg)
        .ok_or_else(|| format!("alg {alg:?} is not one Notation signs with"))?;
    if text("cty") != Some(PAYLOAD_CONTENT_TYPE) {
        return Err(format!("the payload content type is not {PAYLOAD_CONTENT_TYPE}"));
    }
    let critical: Vec<&str> = protected
        .get("crit")
        .and_then(Value::as_array)
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    check_headers(&critical, &|name| protected.contains_key(name), text(SIGNING_SCHEME))?;
    let expiry = match protected.get(EXPIRY) {
        Some(expiry) => Some(
            expiry
                .as_str()
                .and_then(|e| OffsetDateTime::parse(e, &Rfc3339).ok())
                .ok_or("the expiry is not an RFC 3339 time")?
                .unix_timestamp(),
        ),
        None => None,
    };
    let standard = base64::engine::general_purpose::STANDARD;
    let x5c = jws
        .header
        .x5c
        .iter()
        .map(|c| standard.decode(c))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("an x5c certificate is not base64: {e}"))?;
    Ok(Envelope {
        alg,
        expiry,
        payload: url
            .decode(&jws.payload)
            .map_err(|e| format!("the payload is not base64url: {e}"))?,
        x5c,
        signed: format!("{}.{}", jws.protected, jws.payload).into_bytes(),
        signature: url
            .decode(&jws.signature)
            .map_err(|e| format!("the signature is not base64url: {e}"))?,
    })
}

/// A `COSE_Sign1_Tagged` envelope (`signature-envelope-cose.md`): times are CBOR tag 1 epochs,
/// the chain is label 33 (x5chain), the bytes signed are the `Signature1` structure.
fn cose_envelope(bytes: &[u8]) -> Result<Envelope, String> {
    use coset::{ContentType, Label, RegisteredLabelWithPrivate, TaggedCborSerializable as _};
    let sign1 = coset::CoseSign1::from_tagged_slice(bytes)
        .map_err(|e| format!("the envelope is not a tagged COSE_Sign1: {e}"))?;
    let header = &sign1.protected.header;
    let alg = match &header.alg {
        Some(RegisteredLabelWithPrivate::Assigned(alg)) => match *alg as i64 {
            -7 => "ES256",
            -35 => "ES384",
            -36 => "ES512",
            -37 => "PS256",
            -38 => "PS384",
            -39 => "PS512",
            other => return Err(format!("COSE alg {other} is not one Notation signs with")),
        },
        _ => return Err("the protected header has no alg".to_owned()),
    };
    match &header.content_type {
        Some(ContentType::Text(content)) if content == PAYLOAD_CONTENT_TYPE => {}
        _ => return Err(format!("the payload content type is not {PAYLOAD_CONTENT_TYPE}")),
    }
    let text_label = |name: &str| {
        header.rest.iter().find(|(label, _)| *label == Label::Text(name.to_owned())).map(|(_, v)| v)
    };
    let mut critical = Vec::new();
    for label in &header.crit {
        match label {
            RegisteredLabelWithPrivate::Text(name) => critical.push(name.as_str()),
            other => return Err(format!("unknown critical header {other:?}")),
        }
    }
    let scheme = text_label(SIGNING_SCHEME).and_then(|v| v.as_text());
    check_headers(&critical, &|name| text_label(name).is_some(), scheme)?;
    let epoch = |value: &coset::cbor::Value| match value {
        coset::cbor::Value::Tag(1, inner) => {
            inner.as_integer().and_then(|i| i64::try_from(i128::from(i)).ok())
        }
        _ => None,
    };
    if text_label(SIGNING_TIME).and_then(epoch).is_none() {
        return Err(format!("{SIGNING_TIME} is not a CBOR epoch time"));
    }
    let expiry = match text_label(EXPIRY) {
        Some(value) => Some(epoch(value).ok_or("the expiry is not a CBOR epoch time")?),
        None => None,
    };
    let x5chain = Label::Int(33);
    let chain = sign1
        .unprotected
        .rest
        .iter()
        .chain(&header.rest)
        .find(|(label, _)| *label == x5chain)
        .map(|(_, value)| value)
        .ok_or("the envelope has no x5chain")?;
    let x5c = match chain {
        coset::cbor::Value::Bytes(der) => vec![der.clone()],
        coset::cbor::Value::Array(items) => items
            .iter()
            .map(|item| item.as_bytes().cloned())
            .collect::<Option<Vec<_>>>()
            .ok_or("x5chain holds something other than certificates")?,
        _ => return Err("x5chain holds something other than certificates".to_owned()),
    };
    let payload = sign1.payload.clone().ok_or("the envelope has no payload")?;
    Ok(Envelope {
        alg,
        expiry,
        payload,
        x5c,
        signed: sign1.tbs_data(&[]),
        signature: sign1.signature.clone(),
    })
}

fn check_leaf(leaf: &X509Certificate<'_>) -> Result<(), String> {
    check_algorithm(leaf)?;
    if let Ok(Some(constraints)) = leaf.basic_constraints()
        && constraints.value.ca
    {
        return Err("the leaf certificate is a CA".to_owned());
    }
    match leaf.key_usage() {
        Ok(Some(usage)) if usage.value.digital_signature() && !usage.value.key_cert_sign() => {}
        Ok(Some(_)) => return Err("the leaf certificate's keyUsage does not allow signing (digitalSignature, without keyCertSign)".to_owned()),
        Ok(None) => return Err("the leaf certificate has no keyUsage".to_owned()),
        Err(e) => return Err(format!("the leaf certificate's keyUsage does not parse: {e}")),
    }
    // Notation: when present, extendedKeyUsage must allow code signing and nothing that
    // would make the certificate one issued for another purpose.
    if let Ok(Some(usage)) = leaf.extended_key_usage() {
        let usage = usage.value;
        if !usage.code_signing
            || usage.ocsp_signing
            || usage.any
            || usage.server_auth
            || usage.client_auth
            || usage.email_protection
            || usage.time_stamping
        {
            return Err(
                "the leaf certificate's extendedKeyUsage is not for code signing".to_owned()
            );
        }
    }
    Ok(())
}

fn check_ca(cert: &X509Certificate<'_>) -> Result<(), String> {
    let subject = cert.subject().to_string();
    match cert.basic_constraints() {
        Ok(Some(constraints)) if constraints.value.ca => {}
        _ => return Err(format!("issuer {subject:?} is not a CA (basicConstraints)")),
    }
    match cert.key_usage() {
        Ok(Some(usage)) if usage.value.key_cert_sign() => Ok(()),
        _ => Err(format!("issuer {subject:?} may not sign certificates (keyUsage keyCertSign)")),
    }
}

fn check_algorithm(cert: &X509Certificate<'_>) -> Result<(), String> {
    let algorithm = cert.signature_algorithm.algorithm.to_id_string();
    if SHA1_SIGNATURES.contains(&algorithm.as_str()) {
        return Err(format!("certificate {:?} is signed with SHA-1", cert.subject().to_string()));
    }
    Ok(())
}

/// The leaf subject's attributes arcguard matches identities against.
fn subject_attributes(cert: &X509Certificate<'_>) -> Vec<(String, String)> {
    cert.subject()
        .iter_attributes()
        .filter_map(|attribute| {
            let oid = attribute.attr_type().to_id_string();
            let (_, name) = ATTRIBUTES.iter().find(|(id, _)| *id == oid)?;
            Some(((*name).to_owned(), attribute.as_str().ok()?.to_owned()))
        })
        .collect()
}

/// A Unix time as RFC 3339, for messages.
fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| {
            let mut text = String::new();
            let _ = write!(text, "{unix} (Unix time)");
            text
        })
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use serde_json::json;

    use super::*;

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// 2026-11-30T00:00:00Z: every certificate below is valid a day either side of it.
    const NOW: i64 = 1_796_083_200;

    fn dn(params: &mut CertificateParams, org: &str, cn: &str) {
        params.distinguished_name.push(DnType::CountryName, "US");
        params.distinguished_name.push(DnType::StateOrProvinceName, "WA");
        params.distinguished_name.push(DnType::OrganizationName, org);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = OffsetDateTime::from_unix_timestamp(NOW - 86_400).expect("time");
        params.not_after = OffsetDateTime::from_unix_timestamp(NOW + 86_400).expect("time");
    }

    struct Pki {
        root_der: Vec<u8>,
        root_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn pki(name: &str) -> Pki {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        dn(&mut params, "Contoso", name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).expect("root");
        Pki {
            root_der: cert.der().to_vec(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf of `pki`, adjusted by `edit`: its DER and key.
    fn leaf(pki: &Pki, edit: impl FnOnce(&mut CertificateParams)) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        dn(&mut params, "Contoso", "signer");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        edit(&mut params);
        let cert = params.signed_by(&key, &pki.issuer).expect("leaf");
        (cert.der().to_vec(), key)
    }

    /// A JWS envelope over `payload` with `protected`, signed by `key`, carrying `x5c`.
    fn envelope(
        protected: &Value,
        payload: &Value,
        key: &KeyPair,
        x5c: &[&[u8]],
    ) -> NotationSignature {
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let protected = url.encode(serde_json::to_vec(protected).expect("json"));
        let payload = url.encode(serde_json::to_vec(payload).expect("json"));
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .expect("p-256 key");
        let signature =
            signer.sign(&rng, format!("{protected}.{payload}").as_bytes()).expect("signs");
        let standard = base64::engine::general_purpose::STANDARD;
        let envelope = json!({
            "payload": payload,
            "protected": protected,
            "header": {"x5c": x5c.iter().map(|der| standard.encode(der)).collect::<Vec<_>>(),
                       "io.cncf.notary.signingAgent": "arcguard tests"},
            "signature": url.encode(signature.as_ref()),
        });
        NotationSignature {
            media_type: JWS_MEDIA_TYPE.into(),
            envelope: serde_json::to_vec(&envelope).expect("json"),
        }
    }

    fn protected() -> Value {
        json!({"alg": "ES256", "cty": PAYLOAD_CONTENT_TYPE, "crit": [SIGNING_SCHEME],
               SIGNING_SCHEME: "notary.x509", SIGNING_TIME: "2026-11-30T00:00:00Z"})
    }

    fn payload(digest: &str) -> Value {
        json!({"targetArtifact": {"mediaType": INDEX, "digest": digest, "size": 500}})
    }

    fn target() -> Target<'static> {
        Target { digest: DIGEST, media_type: INDEX, size: 500 }
    }

    fn trust(pki: &Pki, identities: &[&str]) -> NotationTrust {
        let identities: Vec<String> = identities.iter().map(|i| (*i).to_owned()).collect();
        NotationTrust::compile(std::slice::from_ref(&pki.root_pem), &identities).expect("trust")
    }

    #[test]
    fn a_signature_verifies_only_when_every_notation_rule_holds() {
        let ca = pki("root");
        let other_ca = pki("other root");
        let (leaf_der, key) = leaf(&ca, |_| {});
        let good = envelope(&protected(), &payload(DIGEST), &key, &[&leaf_der, &ca.root_der]);
        let trusted = trust(&ca, &["x509.subject: C=US, ST=WA, O=Contoso"]);
        let verified = verify(&good, target(), &trusted, NOW).expect("verifies");
        assert_eq!(verified.signer, "CN=signer, C=US, ST=WA, O=Contoso");
        assert_eq!(verified.valid_until, NOW + 86_400);
        // Without the root in x5c: the leaf is signed by the trust store's root.
        let short = envelope(&protected(), &payload(DIGEST), &key, &[&leaf_der]);
        assert!(verify(&short, target(), &trust(&ca, &["*"]), NOW).is_ok());

        let mut tampered: Value = serde_json::from_slice(&good.envelope).expect("json");
        tampered["payload"] = json!(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&payload("sha256:22")).expect("json"))
        );
        let tampered = NotationSignature {
            envelope: serde_json::to_vec(&tampered).expect("json"),
            ..good.clone()
        };
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut header = protected();
            edit(&mut header);
            envelope(&header, &payload(DIGEST), &key, &[&leaf_der, &ca.root_der])
        };
        let (server_der, server_key) =
            leaf(&ca, |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]);
        let (ca_use_der, ca_use_key) =
            leaf(&ca, |p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]);
        let (ocsp_der, ocsp_key) =
            leaf(&ca, |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::OcspSigning]);
        let cases: Vec<(NotationSignature, Target<'_>, NotationTrust, i64, &str)> = vec![
            (
                good.clone(),
                Target { digest: "sha256:33", ..target() },
                trusted.clone(),
                NOW,
                "the signature is for sha256:1111",
            ),
            (
                good.clone(),
                Target { size: 501, ..target() },
                trusted.clone(),
                NOW,
                "of 500 bytes, but the image's manifest is",
            ),
            (
                tampered,
                target(),
                trusted.clone(),
                NOW,
                "does not verify with the leaf certificate's key (tampered)",
            ),
            (
                good.clone(),
                target(),
                trust(&other_ca, &["*"]),
                NOW,
                "which is not in (or signed by) the trust store",
            ),
            (
                good.clone(),
                target(),
                trust(&ca, &["x509.subject: C=US, ST=WA, O=Fabrikam"]),
                NOW,
                "which is not a trusted identity",
            ),
            (
                good.clone(),
                target(),
                trusted.clone(),
                NOW + 2 * 86_400,
                "certificate \"CN=signer, C=US, ST=WA, O=Contoso\" expired at",
            ),
            (good.clone(), target(), trusted.clone(), NOW - 2 * 86_400, "is not valid before"),
            (
                with(&|h| {
                    h[EXPIRY] = json!("2026-11-29T00:00:00Z");
                    h["crit"] = json!([SIGNING_SCHEME, EXPIRY]);
                }),
                target(),
                trusted.clone(),
                NOW,
                "the signature expired at 2026-11-29T00:00:00Z",
            ),
            (
                with(&|h| h[EXPIRY] = json!("2027-01-01T00:00:00Z")),
                target(),
                trusted.clone(),
                NOW,
                "present but not marked critical",
            ),
            (
                with(&|h| h["crit"] = json!([SIGNING_SCHEME, "x.custom"])),
                target(),
                trusted.clone(),
                NOW,
                "unknown critical header \"x.custom\"",
            ),
            (
                with(&|h| {
                    h[VERIFICATION_PLUGIN] = json!("acme");
                    h["crit"] = json!([SIGNING_SCHEME, VERIFICATION_PLUGIN]);
                }),
                target(),
                trusted.clone(),
                NOW,
                "requires a verification plugin",
            ),
            (
                with(&|h| h["crit"] = json!([])),
                target(),
                trusted.clone(),
                NOW,
                "is not marked critical",
            ),
            (
                with(&|h| h["alg"] = json!("ES384")),
                target(),
                trusted.clone(),
                NOW,
                "alg is ES384 but the leaf's ECDSA P-256 key signs with ES256",
            ),
            (
                with(&|h| h[SIGNING_SCHEME] = json!("notary.x509.signingAuthority")),
                target(),
                trusted.clone(),
                NOW,
                "signing scheme",
            ),
            (
                with(&|h| h["cty"] = json!("text/plain")),
                target(),
                trusted.clone(),
                NOW,
                "payload content type",
            ),
            (
                envelope(&protected(), &payload(DIGEST), &server_key, &[&server_der, &ca.root_der]),
                target(),
                trusted.clone(),
                NOW,
                "extendedKeyUsage is not for code signing",
            ),
            (
                envelope(&protected(), &payload(DIGEST), &ocsp_key, &[&ocsp_der, &ca.root_der]),
                target(),
                trusted.clone(),
                NOW,
                "extendedKeyUsage is not for code signing",
            ),
            (
                envelope(&protected(), &payload(DIGEST), &ca_use_key, &[&ca_use_der, &ca.root_der]),
                target(),
                trusted.clone(),
                NOW,
                "keyUsage does not allow signing",
            ),
            (
                NotationSignature { media_type: COSE_MEDIA_TYPE.into(), ..good.clone() },
                target(),
                trusted.clone(),
                NOW,
                "not a tagged COSE_Sign1",
            ),
            (
                NotationSignature { envelope: b"{}".to_vec(), ..good.clone() },
                target(),
                trusted.clone(),
                NOW,
                "not flattened JWS JSON",
            ),
        ];
        for (signature, target, trust, now, why) in cases {
            let error = verify(&signature, target, &trust, now).expect_err(why);
            assert!(error.contains(why), "expected {why:?} in {error:?}");
        }
    }

    /// A COSE_Sign1 envelope as notation-go writes one, signed by `key`; `expiry` adds the
    /// critical expiry header.
    fn cose(
        payload: &Value,
        key: &KeyPair,
        x5c: &[&[u8]],
        expiry: Option<i64>,
    ) -> NotationSignature {
        use coset::cbor::Value as Cbor;
        use coset::{CoseSign1Builder, HeaderBuilder, TaggedCborSerializable as _, iana};
        let mut protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES256)
            .content_type(PAYLOAD_CONTENT_TYPE.to_owned())
            .add_critical_label(coset::RegisteredLabelWithPrivate::Text(SIGNING_SCHEME.into()))
            .text_value(SIGNING_SCHEME.into(), Cbor::Text("notary.x509".into()))
            .text_value(SIGNING_TIME.into(), Cbor::Tag(1, Box::new(Cbor::Integer(NOW.into()))));
        if let Some(expiry) = expiry {
            protected = protected
                .add_critical_label(coset::RegisteredLabelWithPrivate::Text(EXPIRY.into()))
                .text_value(EXPIRY.into(), Cbor::Tag(1, Box::new(Cbor::Integer(expiry.into()))));
        }
        let chain = Cbor::Array(x5c.iter().map(|der| Cbor::Bytes(der.to_vec())).collect());
        let unprotected = HeaderBuilder::new().value(33, chain).build();
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .expect("p-256 key");
        let sign1 = CoseSign1Builder::new()
            .protected(protected.build())
            .unprotected(unprotected)
            .payload(serde_json::to_vec(payload).expect("json"))
            .create_signature(&[], |tbs| signer.sign(&rng, tbs).expect("signs").as_ref().to_vec())
            .build();
        NotationSignature {
            media_type: COSE_MEDIA_TYPE.into(),
            envelope: sign1.to_tagged_vec().expect("cbor"),
        }
    }

    #[test]
    fn cose_envelopes_verify_as_jws_ones_do() {
        let ca = pki("root");
        let (leaf_der, key) = leaf(&ca, |_| {});
        let trusted = trust(&ca, &["x509.subject: C=US, ST=WA, O=Contoso"]);
        let good = cose(&payload(DIGEST), &key, &[&leaf_der, &ca.root_der], None);
        let verified = verify(&good, target(), &trusted, NOW).expect("verifies");
        assert_eq!(verified.signer, "CN=signer, C=US, ST=WA, O=Contoso");
        let cases = [
            (
                cose(&payload("sha256:22"), &key, &[&leaf_der], None),
                NOW,
                "the signature is for sha256:22",
            ),
            (
                cose(&payload(DIGEST), &key, &[&leaf_der], Some(NOW - 1)),
                NOW,
                "the signature expired at",
            ),
            (good.clone(), NOW + 2 * 86_400, "expired at"),
        ];
        for (signature, now, why) in cases {
            let error = verify(&signature, target(), &trusted, now).expect_err(why);
            assert!(error.contains(why), "expected {why:?} in {error:?}");
        }
        let mut tampered = good.envelope.clone();
        let at = tampered.len() - 10;
        tampered[at] ^= 1;
        let tampered = NotationSignature { envelope: tampered, ..good };
        assert!(verify(&tampered, target(), &trusted, NOW).is_err());
    }

    #[test]
    fn a_chain_is_bounded_and_anchored_before_its_signatures_are_checked() {
        let ca = pki("root");
        let stranger = pki("stranger");
        let (leaf_der, key) = leaf(&ca, |_| {});
        let trusted = trust(&ca, &["*"]);
        // Past MAX_CHAIN certificates: refused before any is parsed or checked.
        let long: Vec<&[u8]> = std::iter::once(leaf_der.as_slice())
            .chain(std::iter::repeat_n(ca.root_der.as_slice(), MAX_CHAIN))
            .collect();
        let refused =
            verify(&envelope(&protected(), &payload(DIGEST), &key, &long), target(), &trusted, NOW);
        assert_eq!(
            refused.err(),
            Some(format!(
                "x5c holds {} certificates, more than the {MAX_CHAIN} arcguard verifies",
                MAX_CHAIN + 1
            ))
        );
        // A stranger's chain is refused for its anchor, even with a signature that would not
        // verify either: the envelope's signature is not checked for it.
        let (stranger_der, stranger_key) = leaf(&stranger, |_| {});
        let mut forged = envelope(
            &protected(),
            &payload(DIGEST),
            &stranger_key,
            &[&stranger_der, &stranger.root_der],
        );
        let mut value: Value = serde_json::from_slice(&forged.envelope).expect("json");
        value["signature"] = json!("AAAA");
        forged.envelope = serde_json::to_vec(&value).expect("json");
        let why = verify(&forged, target(), &trusted, NOW).expect_err("refused");
        assert!(why.contains("not in (or signed by) the trust store"), "{why}");
    }

    #[test]
    fn referrers_the_registry_would_not_list_are_a_rejection_not_an_outage() {
        let ca = pki("root");
        let notation = NotationTrust::compile(&[ca.root_pem], &["*".to_owned()]).expect("trust");
        let trust = crate::signature::SignatureTrust::new(Vec::new(), Some(notation), b"t");
        let target = Target { digest: DIGEST, media_type: INDEX, size: 1 };
        let unlisted = crate::signature::Evidence {
            notation_unlisted: Some("arcguard reads manifests of at most 1 MiB".into()),
            ..Default::default()
        };
        assert_eq!(
            crate::signature::judge(&unlisted, target, &trust, NOW),
            crate::signature::SignatureVerdict::Rejected(
                "Notation: the image's referrers could not be listed: arcguard reads manifests of at most 1 MiB".into()
            )
        );
        assert_eq!(
            crate::signature::judge(&crate::signature::Evidence::default(), target, &trust, NOW),
            crate::signature::SignatureVerdict::Rejected(format!(
                "Notation: no signature (no referrer of type {ARTIFACT_TYPE})"
            ))
        );
    }

    #[test]
    fn trusted_identities_and_stores_are_checked_when_compiled() {
        let ca = pki("root");
        let store = [ca.root_pem.clone()];
        let field = |identities: &[&str]| {
            let identities: Vec<String> = identities.iter().map(|i| (*i).to_owned()).collect();
            NotationTrust::compile(&store, &identities).map(|_| ()).map_err(|e| e.field)
        };
        assert_eq!(field(&["*"]), Ok(()));
        assert_eq!(field(&["x509.subject: C=US, S=WA, O=A\\, Inc., CN=x"]), Ok(()));
        assert_eq!(field(&[]), Err("trustedIdentities".to_owned()));
        assert_eq!(
            field(&["*", "x509.subject: C=US, ST=WA, O=A"]),
            Err("trustedIdentities".to_owned())
        );
        assert_eq!(field(&["x509.subject: C=US, O=A"]), Err("trustedIdentities[0]".to_owned()));
        assert_eq!(
            field(&["x509.subject: C=US, ST=WA, O=A", "subject: x"]),
            Err("trustedIdentities[1]".to_owned())
        );
        assert_eq!(
            field(&["x509.subject: C=US, ST=WA, O=A, E=x@y"]),
            Err("trustedIdentities[0]".to_owned())
        );
        let compiled = NotationTrust::compile(&["not pem".to_owned()], &["*".to_owned()]);
        assert_eq!(compiled.map_err(|e| e.field), Err("trustStore[0]".to_owned()));
        assert_eq!(
            NotationTrust::compile(&[], &["*".to_owned()]).map_err(|e| e.field),
            Err("trustStore".to_owned())
        );
        assert_eq!(
            parse_identity("x509.subject: C=US, ST=WA, O=A\\, Inc."),
            Ok(vec![
                ("C".into(), "US".into()),
                ("ST".into(), "WA".into()),
                ("O".into(), "A, Inc.".into())
            ])
        );
    }
}
