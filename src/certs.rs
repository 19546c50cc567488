//! Serving certificates: generate a CA and serving certs, inspect them, store them as files and
//! serve them over TLS with a resolver that can be swapped without dropping connections.
//!
//! Generation and inspection work on PEM text only, so a controller can keep the same material
//! in a Secret; the file functions ([`write_bundle`], [`ensure_dev_bundle`], [`load_files`]) are
//! a thin adapter on top. [`plan`] decides, as a pure function of the stored certificates and
//! the clock, what the cluster controller does next.

pub mod plan;

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use rcgen::string::{BmpString, UniversalString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls::crypto::ring as ring_provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use rustls::{InconsistentKeys, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, DnsName, InvalidDnsNameError, PrivateKeyDer};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::x509::X509Name;

/// How far `not_before` is back-dated, so peers whose clock runs a little behind accept new certs.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);
/// Lifetime of a generated CA: ten years (3650 days).
pub const DEFAULT_CA_VALIDITY: Duration = Duration::days(3650);
/// Lifetime of a generated serving certificate: one year (365 days).
pub const DEFAULT_SERVING_VALIDITY: Duration = Duration::days(365);
/// Longest validity accepted for any certificate: one hundred years (36525 days).
pub const MAX_VALIDITY: Duration = Duration::days(36525);
/// Common name of the CA that [`write_bundle`] generates.
pub const BUNDLE_CA_COMMON_NAME: &str = "arcguard webhook CA";
/// Common name of the CA that [`ensure_dev_bundle`] generates.
pub const DEV_CA_COMMON_NAME: &str = "arcguard development CA";
/// DNS name the development serving certificate is valid for.
pub const DEV_DNS_NAME: &str = "localhost";
/// IP addresses the development serving certificate is valid for.
pub const DEV_IP_ADDRESSES: [IpAddr; 2] =
    [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
/// File name of the CA certificate in a bundle directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the serving certificate in a bundle directory.
pub const TLS_CERT_FILE: &str = "tls.crt";
/// File name of the serving private key in a bundle directory.
pub const TLS_KEY_FILE: &str = "tls.key";

/// ALPN protocols the server offers, most preferred first.
const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// Mode of private key files: readable by the owner only.
const KEY_FILE_MODE: u32 = 0o600;
/// Mode of certificate files: certificates are public.
const CERT_FILE_MODE: u32 = 0o644;
/// Latest year an X.509 `GeneralizedTime` can hold.
const MAX_CERT_YEAR: i32 = 9999;

// === errors ===

/// Where PEM material came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// PEM text handed over in memory (e.g. from a Secret).
    Pem,
    /// A file.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pem => f.write_str("the PEM data"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Why a certificate could not be generated, parsed, stored or served.
///
/// None is retryable as is: each needs different input (names, validity, PEM, files) or a
/// writable directory.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The requested validity is not positive, too long, or ends after year 9999.
    #[error("invalid certificate validity {validity}: {reason}")]
    InvalidValidity {
        /// The requested validity.
        validity: Duration,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A serving certificate was requested for no DNS name and no IP address.
    #[error("a serving certificate needs at least one DNS name or IP address")]
    NoSubjectNames,
    /// A requested DNS name is not a valid hostname.
    #[error("invalid DNS name {name:?} for a serving certificate: {source}")]
    InvalidDnsName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        #[source]
        source: InvalidDnsNameError,
    },
    /// The CA's validity ended before the requested issue time.
    #[error("the CA expired at {not_after}; generate a new CA")]
    CaExpired {
        /// When the CA expired.
        not_after: OffsetDateTime,
    },
    /// Key generation or signing failed.
    #[error("failed to generate the {what}: {source}")]
    Generate {
        /// What was being generated, e.g. "serving certificate".
        what: &'static str,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A freshly issued certificate did not verify against its CA (an unsupported CA subject).
    #[error(
        "the issued certificate does not verify against the CA; use a CA generated by arcguard"
    )]
    IssuedCertDoesNotVerify,
    /// PEM framing is broken.
    #[error("failed to read PEM from {origin}: {source}")]
    Pem {
        /// Where the PEM came from.
        origin: Origin,
        /// The PEM error.
        #[source]
        source: pem::Error,
    },
    /// The PEM holds no CERTIFICATE block.
    #[error("no certificate in {origin}")]
    NoCertificate {
        /// Where the PEM came from.
        origin: Origin,
    },
    /// The PEM holds no private key block.
    #[error("no private key in {origin}")]
    NoPrivateKey {
        /// Where the PEM came from.
        origin: Origin,
    },
    /// A CERTIFICATE block is not a valid X.509 certificate.
    #[error("failed to parse the certificate in {origin}: {source}")]
    ParseCertificate {
        /// Where the PEM came from.
        origin: Origin,
        /// The X.509 error.
        #[source]
        source: X509Error,
    },
    /// The private key is malformed or of a type the signer does not support.
    #[error("failed to load the private key in {origin}: {source}")]
    LoadKey {
        /// Where the PEM came from.
        origin: Origin,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The CA private key is malformed or of an unsupported type.
    #[error("failed to load the CA private key in {origin}: {source}")]
    LoadCaKey {
        /// Where the PEM came from.
        origin: Origin,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// The private key belongs to a different certificate.
    #[error("private key in {origin} does not match the certificate")]
    KeyMismatch {
        /// Where the key came from.
        origin: Origin,
    },
    /// The key could not be compared with the certificate.
    #[error("failed to check the private key in {origin} against the certificate: {source}")]
    CheckKey {
        /// Where the key came from.
        origin: Origin,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// A certificate given as a CA lacks `CA:TRUE`.
    #[error("the certificate in {origin} is not a CA certificate")]
    NotCa {
        /// Where the PEM came from.
        origin: Origin,
    },
    /// The CA subject uses a form that cannot be reproduced in the certs it issues.
    #[error("unsupported subject in the CA certificate in {origin}: {reason}")]
    UnsupportedCaSubject {
        /// Where the PEM came from.
        origin: Origin,
        /// What is unsupported.
        reason: &'static str,
    },
    /// The signature check itself failed (e.g. an algorithm ring does not support).
    #[error("failed to verify the certificate signature: {source}")]
    Verify {
        /// The X.509 error.
        #[source]
        source: X509Error,
    },
    /// A certificate or key file could not be read.
    #[error("failed to read {what} {path}: {source}")]
    Read {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("failed to write {path}: {source}")]
    Write {
        /// The file (or its directory, when syncing it failed).
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A directory could not be created.
    #[error("failed to create directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Whether a file exists could not be determined.
    #[error("failed to check whether {path} exists: {source}")]
    Stat {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file that must not be overwritten already exists.
    #[error("refusing to overwrite {path}; delete it to generate new certificates")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Only one of the serving certificate and key exists.
    #[error(
        "{present} exists but {missing} does not; provide both, or delete {present} to generate a new pair"
    )]
    IncompletePair {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// rustls rejected the server configuration.
    #[error("failed to build the TLS server configuration: {source}")]
    TlsConfig {
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
}

// === generation ===

/// A CA that issues serving certificates; its key never leaves this struct except via `key_pem`.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 CA valid from `now - 5 min` for `validity`.
    ///
    /// The CA may sign only end-entity certificates (path length 0) and has the key usages
    /// keyCertSign and cRLSign.
    ///
    /// # Errors
    ///
    /// [`CertError::InvalidValidity`] for a validity that is not positive or too long, and
    /// [`CertError::Generate`] if key generation or signing fails.
    pub fn generate(
        common_name: &str,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<Self, CertError> {
        let (not_before, not_after) = validity_window(validity, now)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CertError::Generate { what: "CA key", source })?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate { what: "CA certificate", source })?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem,
            not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and PKCS#8 private key, e.g. read back from a Secret.
    ///
    /// # Errors
    ///
    /// When either PEM is missing or malformed, the certificate is not a CA, the key does not
    /// belong to it, or its subject uses a form rcgen cannot reproduce.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let origin = Origin::Pem;
        let cert_der = first_certificate(cert_pem.as_bytes(), &origin)?;
        let cert = parse_x509(&cert_der, &origin)?;
        if !cert.is_ca() {
            return Err(CertError::NotCa { origin });
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|source| CertError::LoadCaKey { origin: origin.clone(), source })?;
        if key.der_bytes() != &*cert.public_key().subject_public_key.data {
            return Err(CertError::KeyMismatch { origin });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(cert.subject(), &origin)?;
        // The authority key identifier of issued certs must equal this CA's subject key
        // identifier, whatever method the CA's creator used to derive it.
        if let Some(ski) = cert.iter_extensions().find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        }) {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        }
        let not_after = cert.validity().not_after.to_datetime();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_der,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            not_after,
        })
    }

    /// The CA certificate as PEM (the webhook's `caBundle`, base64-encoded by the caller).
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key as PKCS#8 PEM.
    #[must_use]
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When the CA certificate expires.
    #[must_use]
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues an ECDSA P-256 serving certificate for `dns_names` and `ips`.
    ///
    /// The subject CN is the first DNS name (or the first IP when there is none). The cert is
    /// valid from `now - 5 min` for `validity`, cut short to end with the CA.
    ///
    /// # Errors
    ///
    /// When there are no names, a DNS name is invalid, the validity is not positive or too
    /// long, the CA has expired at `now`, or signing fails.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<ServingCert, CertError> {
        let common_name = match (dns_names.first(), ips.first()) {
            (Some(name), _) => name.clone(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => return Err(CertError::NoSubjectNames),
        };
        let (not_before, not_after) = validity_window(validity, now)?;
        if now >= self.not_after {
            return Err(CertError::CaExpired { not_after: self.not_after });
        }
        let mut subject_alt_names = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            DnsName::try_from(name.as_str())
                .map_err(|source| CertError::InvalidDnsName { name: name.clone(), source })?;
            let ia5 = name
                .as_str()
                .try_into()
                .map_err(|source| CertError::Generate { what: "serving certificate", source })?;
            subject_alt_names.push(SanType::DnsName(ia5));
        }
        subject_alt_names.extend(ips.iter().copied().map(SanType::IpAddress));

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CertError::Generate { what: "serving key", source })?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = subject_alt_names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after.min(self.not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertError::Generate { what: "serving certificate", source })?;

        // A CA loaded from PEM is re-encoded by rcgen; make sure the result still chains.
        let leaf = parse_x509(cert.der(), &Origin::Pem)?;
        let ca = parse_x509(&self.cert_der, &Origin::Pem)?;
        if !is_signed_by(&leaf, &ca)? {
            return Err(CertError::IssuedCertDoesNotVerify);
        }
        Ok(ServingCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A serving certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    /// The leaf certificate (no chain: the CA is the trust anchor).
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[secret key elided]")
            .finish()
    }
}

/// Returns `(not_before, not_after)` for a cert issued at `now`, truncated to whole seconds as
/// X.509 stores them.
fn validity_window(
    validity: Duration,
    now: OffsetDateTime,
) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    let invalid = |reason| CertError::InvalidValidity { validity, reason };
    if !validity.is_positive() {
        return Err(invalid("it must be positive"));
    }
    if validity > MAX_VALIDITY {
        return Err(invalid("it must not exceed 100 years"));
    }
    let not_before = now.checked_sub(CLOCK_SKEW_ALLOWANCE).ok_or(invalid("start out of range"))?;
    let not_after = now.checked_add(validity).ok_or(invalid("end out of range"))?;
    if not_after.year() > MAX_CERT_YEAR {
        return Err(invalid("it must end before year 10000"));
    }
    Ok((whole_seconds(not_before), whole_seconds(not_after)))
}

/// Drops the sub-second part.
fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t - Duration::nanoseconds(i64::from(t.nanosecond()))
}

/// Converts an X.509 name into rcgen's form so issued certs carry it byte for byte.
fn distinguished_name(
    name: &X509Name<'_>,
    origin: &Origin,
) -> Result<DistinguishedName, CertError> {
    use x509_parser::asn1_rs::Tag;

    let unsupported = |reason| CertError::UnsupportedCaSubject { origin: origin.clone(), reason };
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attributes = rdn.iter();
        let (Some(attribute), None) = (attributes.next(), attributes.next()) else {
            return Err(unsupported("a relative name with other than one attribute"));
        };
        let oid = attribute.attr_type().iter().ok_or(unsupported("an oversized attribute OID"))?;
        let ty = DnType::from_oid(&oid.collect::<Vec<_>>());
        if dn.get(&ty).is_some() {
            return Err(unsupported("a repeated attribute type"));
        }
        let value = attribute.attr_value();
        let text = || std::str::from_utf8(value.data).map_err(|_| unsupported("a non-UTF-8 value"));
        let bad_string = |_| unsupported("a malformed string value");
        let dn_value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::PrintableString => {
                DnValue::PrintableString(text()?.try_into().map_err(bad_string)?)
            }
            Tag::Ia5String => DnValue::Ia5String(text()?.try_into().map_err(bad_string)?),
            Tag::T61String => DnValue::TeletexString(text()?.try_into().map_err(bad_string)?),
            Tag::BmpString => DnValue::BmpString(
                BmpString::from_utf16be(value.data.to_vec()).map_err(bad_string)?,
            ),
            Tag::UniversalString => DnValue::UniversalString(
                UniversalString::from_utf32be(value.data.to_vec()).map_err(bad_string)?,
            ),
            _ => return Err(unsupported("a value that is not a string")),
        };
        dn.push(ty, dn_value);
    }
    Ok(dn)
}

// === inspection ===

/// What a certificate says about itself: names, validity, CA flag.
#[derive(Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, RFC 4514 style (e.g. `CN=localhost`).
    pub subject: String,
    /// The issuer, RFC 4514 style.
    pub issuer: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// DNS subject alternative names, in certificate order.
    pub dns_names: Vec<String>,
    /// IP subject alternative names, in certificate order (malformed lengths are skipped).
    pub ip_addresses: Vec<IpAddr>,
    /// Whether basic constraints say `CA:TRUE`.
    pub is_ca: bool,
    der: CertificateDer<'static>,
}

impl fmt::Debug for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertInfo")
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("dns_names", &self.dns_names)
            .field("ip_addresses", &self.ip_addresses)
            .field("is_ca", &self.is_ca)
            .finish_non_exhaustive()
    }
}

impl CertInfo {
    /// Reads the first certificate in `cert_pem`.
    ///
    /// # Errors
    ///
    /// When the PEM holds no certificate or it is not valid X.509.
    pub fn from_pem(cert_pem: impl AsRef<[u8]>) -> Result<Self, CertError> {
        let origin = Origin::Pem;
        let der = first_certificate(cert_pem.as_ref(), &origin)?;
        Self::from_der(der, &origin)
    }

    /// Reads one DER certificate.
    fn from_der(der: CertificateDer<'static>, origin: &Origin) -> Result<Self, CertError> {
        let cert = parse_x509(&der, origin)?;
        let parse_error = |source| CertError::ParseCertificate { origin: origin.clone(), source };
        let mut dns_names = Vec::new();
        let mut ip_addresses = Vec::new();
        if let Some(san) = cert.subject_alternative_name().map_err(parse_error)? {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    GeneralName::IPAddress(bytes) => ip_addresses.extend(ip_from_san(bytes)),
                    _ => {}
                }
            }
        }
        let validity = cert.validity();
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
            dns_names,
            ip_addresses,
            is_ca: cert.is_ca(),
            der,
        })
    }

    /// Whether `now` lies within the validity period.
    #[must_use]
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// Time left until expiry at `now` (negative once expired).
    #[must_use]
    pub fn remaining(&self, now: OffsetDateTime) -> Duration {
        self.not_after - now
    }

    /// Whether this certificate was signed by the first certificate in `ca_pem`.
    ///
    /// Checks that the issuer name equals the CA's subject and that the signature verifies
    /// with the CA's public key (x509-parser's `verify` feature, backed by ring). It does not
    /// check validity periods or path constraints; TLS peers do that.
    ///
    /// # Errors
    ///
    /// When `ca_pem` holds no valid certificate, or the signature algorithm is unsupported.
    pub fn verifies_with(&self, ca_pem: impl AsRef<[u8]>) -> Result<bool, CertError> {
        let origin = Origin::Pem;
        let ca_der = first_certificate(ca_pem.as_ref(), &origin)?;
        let ca = parse_x509(&ca_der, &origin)?;
        let leaf = parse_x509(&self.der, &origin)?;
        is_signed_by(&leaf, &ca)
    }
}

impl CertInfo {
    /// Whether some certificate in the PEM bundle `bundle_pem` signed this certificate, as a
    /// webhook's `caBundle` must for the apiserver to trust it. A malformed bundle trusts
    /// nothing.
    #[must_use]
    pub fn is_issued_by_any(&self, bundle_pem: &[u8]) -> bool {
        let Ok(leaf) = parse_x509(&self.der, &Origin::Pem) else {
            return false;
        };
        bundle_certificates(bundle_pem).unwrap_or_default().iter().any(|ca_der| {
            parse_x509(ca_der, &Origin::Pem)
                .is_ok_and(|ca| is_signed_by(&leaf, &ca).unwrap_or(false))
        })
    }
}

/// Every certificate in a PEM bundle, in order; `None` when the PEM framing is broken.
#[must_use]
pub fn bundle_certificates(bundle_pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(bundle_pem).collect::<Result<Vec<_>, _>>().ok()
}

/// Whether the PEM bundle `bundle_pem` holds the first certificate of `cert_pem`, byte for
/// byte. Nothing is contained in a malformed bundle, and a `cert_pem` without a certificate is
/// contained nowhere.
#[must_use]
pub fn bundle_contains(bundle_pem: &[u8], cert_pem: &[u8]) -> bool {
    let Ok(wanted) = CertificateDer::from_pem_slice(cert_pem) else {
        return false;
    };
    bundle_certificates(bundle_pem).unwrap_or_default().contains(&wanted)
}

/// Whether `leaf` names `ca` as issuer and carries a valid signature by `ca`'s key.
fn is_signed_by(leaf: &X509Certificate<'_>, ca: &X509Certificate<'_>) -> Result<bool, CertError> {
    if leaf.issuer().as_raw() != ca.subject().as_raw() {
        return Ok(false);
    }
    match leaf.verify_signature(Some(ca.public_key())) {
        Ok(()) => Ok(true),
        Err(X509Error::SignatureVerificationError) => Ok(false),
        Err(source) => Err(CertError::Verify { source }),
    }
}

/// An IP SAN is 4 or 16 bytes; anything else is malformed and no TLS client would match it.
fn ip_from_san(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// All certificates in `pem`, in order (leaf first for a chain).
fn certificate_chain(
    pem: &[u8],
    origin: &Origin,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem { origin: origin.clone(), source })
}

/// The first certificate in `pem`.
fn first_certificate(pem: &[u8], origin: &Origin) -> Result<CertificateDer<'static>, CertError> {
    match CertificateDer::from_pem_slice(pem) {
        Ok(der) => Ok(der),
        Err(pem::Error::NoItemsFound) => Err(CertError::NoCertificate { origin: origin.clone() }),
        Err(source) => Err(CertError::Pem { origin: origin.clone(), source }),
    }
}

/// Parses DER into x509-parser's view.
fn parse_x509<'a>(der: &'a [u8], origin: &Origin) -> Result<X509Certificate<'a>, CertError> {
    use x509_parser::nom;

    x509_parser::parse_x509_certificate(der).map(|(_, cert)| cert).map_err(|err| {
        let source = match err {
            nom::Err::Error(e) | nom::Err::Failure(e) => e,
            nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
        };
        CertError::ParseCertificate { origin: origin.clone(), source }
    })
}

// === files ===

/// The files [`write_bundle`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundlePaths {
    /// The CA certificate (`ca.crt`).
    pub ca_cert: PathBuf,
    /// The serving certificate (`tls.crt`).
    pub cert: PathBuf,
    /// The serving private key (`tls.key`, mode 0600).
    pub key: PathBuf,
}

impl BundlePaths {
    /// The standard file names inside `dir`.
    #[must_use]
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            cert: dir.join(TLS_CERT_FILE),
            key: dir.join(TLS_KEY_FILE),
        }
    }
}

/// Generates a new CA and a serving certificate and writes `ca.crt`, `tls.crt` and `tls.key`
/// into `dir`, creating it.
///
/// The serving certificate lives for `validity`; the CA for [`DEFAULT_CA_VALIDITY`] or
/// `validity`, whichever is longer. The CA key is not written: re-run to rotate, and update
/// the webhook's `caBundle`. Each file is replaced atomically (temp file + rename), so a reader
/// never sees a half-written file, though it may briefly see a new key with the old cert.
///
/// # Errors
///
/// When generation fails (see [`CertificateAuthority::issue_serving`]) or a directory or file
/// cannot be created or written.
pub fn write_bundle(
    dir: &Path,
    dns: &[String],
    ips: &[IpAddr],
    validity: Duration,
    now: OffsetDateTime,
) -> Result<BundlePaths, CertError> {
    let ca = CertificateAuthority::generate(
        BUNDLE_CA_COMMON_NAME,
        DEFAULT_CA_VALIDITY.max(validity),
        now,
    )?;
    let serving = ca.issue_serving(dns, ips, validity, now)?;
    create_dir(dir)?;
    let paths = BundlePaths::in_dir(dir);
    let staged = [
        stage(&paths.key, serving.key_pem.as_bytes(), KEY_FILE_MODE)?,
        stage(&paths.cert, serving.cert_pem.as_bytes(), CERT_FILE_MODE)?,
        stage(&paths.ca_cert, ca.cert_pem().as_bytes(), CERT_FILE_MODE)?,
    ];
    for file in staged {
        file.replace()?;
    }
    sync_dir(dir)?;
    Ok(paths)
}

/// What [`ensure_dev_bundle`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    /// Certificate and key were already there and were left alone.
    Existing,
    /// A development CA and serving certificate were generated and written.
    Generated,
}

/// Makes sure a serving certificate and key exist, generating a development set if neither does.
///
/// With neither file present it writes a CA ([`DEFAULT_CA_VALIDITY`]) to `ca_path` and a
/// serving cert ([`DEFAULT_SERVING_VALIDITY`]) for `localhost`, `127.0.0.1` and `::1` to
/// `cert_path`/`key_path` (mode 0600), creating parent directories. Existing files are never
/// overwritten: with both present nothing happens; with one present, or a leftover `ca_path`,
/// it fails and names the file.
///
/// # Errors
///
/// [`CertError::IncompletePair`] or [`CertError::AlreadyExists`] as above; otherwise when a
/// file cannot be checked, created or written.
pub fn ensure_dev_bundle(
    cert_path: &Path,
    key_path: &Path,
    ca_path: &Path,
) -> Result<Ensured, CertError> {
    match (exists(cert_path)?, exists(key_path)?) {
        (true, true) => return Ok(Ensured::Existing),
        (true, false) => {
            return Err(CertError::IncompletePair {
                present: cert_path.to_path_buf(),
                missing: key_path.to_path_buf(),
            });
        }
        (false, true) => {
            return Err(CertError::IncompletePair {
                present: key_path.to_path_buf(),
                missing: cert_path.to_path_buf(),
            });
        }
        (false, false) => {}
    }
    if exists(ca_path)? {
        return Err(CertError::AlreadyExists { path: ca_path.to_path_buf() });
    }

    let now = OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate(DEV_CA_COMMON_NAME, DEFAULT_CA_VALIDITY, now)?;
    let serving = ca.issue_serving(
        &[DEV_DNS_NAME.to_owned()],
        &DEV_IP_ADDRESSES,
        DEFAULT_SERVING_VALIDITY,
        now,
    )?;
    for path in [key_path, cert_path, ca_path] {
        if let Some(parent) = non_empty_parent(path) {
            create_dir(parent)?;
        }
    }
    let staged = [
        stage(key_path, serving.key_pem.as_bytes(), KEY_FILE_MODE)?,
        stage(cert_path, serving.cert_pem.as_bytes(), CERT_FILE_MODE)?,
        stage(ca_path, ca.cert_pem().as_bytes(), CERT_FILE_MODE)?,
    ];
    let mut created: Vec<PathBuf> = Vec::with_capacity(staged.len());
    for file in staged {
        let dest = file.dest.clone();
        if let Err(err) = file.create_new() {
            // Leave no half-set behind: it would make the next start fail as an incomplete pair.
            for path in &created {
                let _ = fs::remove_file(path);
            }
            return Err(err);
        }
        created.push(dest);
    }
    for path in &created {
        if let Some(parent) = non_empty_parent(path) {
            sync_dir(parent)?;
        }
    }
    Ok(Ensured::Generated)
}

/// `path.parent()`, or `None` for a bare file name (the current directory).
fn non_empty_parent(path: &Path) -> Option<&Path> {
    path.parent().filter(|parent| !parent.as_os_str().is_empty())
}

/// Whether `path` exists, distinguishing "no" from "cannot tell".
fn exists(path: &Path) -> Result<bool, CertError> {
    path.try_exists().map_err(|source| CertError::Stat { path: path.to_path_buf(), source })
}

/// Creates `dir` and its parents.
fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir)
        .map_err(|source| CertError::CreateDir { path: dir.to_path_buf(), source })
}

/// Makes completed renames durable.
fn sync_dir(dir: &Path) -> Result<(), CertError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| CertError::Write { path: dir.to_path_buf(), source })?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Distinguishes temp files of concurrent writers in one process.
static STAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// File contents written and synced to a temp file beside `dest`; removed on drop unless moved
/// into place.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
}

/// Writes `contents` to a new temp file in `dest`'s directory with `mode` (on unix).
fn stage(dest: &Path, contents: &[u8], mode: u32) -> Result<Staged, CertError> {
    let write_error = |source| CertError::Write { path: dest.to_path_buf(), source };
    let file_name = dest.file_name().ok_or_else(|| {
        write_error(io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        STAGE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dest.with_file_name(tmp_name);

    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(write_error)?;
    let staged = Staged { tmp, dest: dest.to_path_buf() };
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(write_error)?;
    Ok(staged)
}

impl Staged {
    /// Moves the file into place, replacing any existing file atomically.
    fn replace(self) -> Result<(), CertError> {
        fs::rename(&self.tmp, &self.dest)
            .map_err(|source| CertError::Write { path: self.dest.clone(), source })
    }

    /// Moves the file into place only if nothing is there; hard-linking makes the check and
    /// the creation one atomic step, unlike a rename.
    fn create_new(self) -> Result<(), CertError> {
        match fs::hard_link(&self.tmp, &self.dest) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                Err(CertError::AlreadyExists { path: self.dest.clone() })
            }
            Err(source) => Err(CertError::Write { path: self.dest.clone(), source }),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Best effort: after a rename the temp name is gone and this fails harmlessly; after a
        // hard link it removes the extra name.
        let _ = fs::remove_file(&self.tmp);
    }
}

// === serving ===

/// Builds a rustls signing key from a PEM certificate chain (leaf first) and private key.
///
/// # Errors
///
/// When either is missing or malformed, or the key is not the certificate's key.
pub fn load_certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, CertError> {
    certified_key(cert_pem, key_pem, &Origin::Pem, &Origin::Pem).map(|(key, _)| key)
}

/// Builds a rustls signing key from a PEM certificate chain (leaf first) and private key, with
/// the leaf's [`CertInfo`] (e.g. read from a Secret).
///
/// # Errors
///
/// As [`load_certified_key`].
pub fn load_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Arc<CertifiedKey>, CertInfo), CertError> {
    certified_key(cert_pem, key_pem, &Origin::Pem, &Origin::Pem)
}

/// Reads a PEM certificate chain and private key from files: the key for serving and the
/// leaf's [`CertInfo`].
///
/// # Errors
///
/// When a file cannot be read, or as [`load_certified_key`], naming the file.
pub fn load_files(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Arc<CertifiedKey>, CertInfo), CertError> {
    let read = |what, path: &Path| {
        fs::read(path).map_err(|source| CertError::Read { what, path: path.to_path_buf(), source })
    };
    let cert_pem = read("certificate", cert_path)?;
    let key_pem = read("private key", key_path)?;
    certified_key(
        &cert_pem,
        &key_pem,
        &Origin::File(cert_path.to_path_buf()),
        &Origin::File(key_path.to_path_buf()),
    )
}

/// Shared body of [`load_certified_key`] and [`load_files`].
fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_origin: &Origin,
    key_origin: &Origin,
) -> Result<(Arc<CertifiedKey>, CertInfo), CertError> {
    let chain = certificate_chain(cert_pem, cert_origin)?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate { origin: cert_origin.clone() });
    };
    let info = CertInfo::from_der(leaf.clone(), cert_origin)?;
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(CertError::NoPrivateKey { origin: key_origin.clone() });
        }
        Err(source) => return Err(CertError::Pem { origin: key_origin.clone(), source }),
    };
    let signer = ring_provider::sign::any_supported_type(&key)
        .map_err(|source| CertError::LoadKey { origin: key_origin.clone(), source })?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => Ok((Arc::new(certified), info)),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(CertError::KeyMismatch { origin: key_origin.clone() })
        }
        Err(source) => Err(CertError::CheckKey { origin: key_origin.clone(), source }),
    }
}

/// The key and info served right now; swapped as one so they never disagree.
struct Served {
    key: Arc<CertifiedKey>,
    info: Arc<CertInfo>,
}

/// A rustls certificate resolver whose certificate can be replaced at runtime.
///
/// Every handshake reads the current key, so [`swap`](Self::swap) affects new connections only
/// and never drops established ones. A resolver created [`empty`](Self::empty) fails
/// handshakes (the client sees a TLS alert) until a certificate is swapped in, so a server can
/// listen before its certificate exists.
pub struct CertResolver {
    current: ArcSwapOption<Served>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        f.debug_struct("CertResolver").field("info", &current.as_ref().map(|s| &s.info)).finish()
    }
}

impl CertResolver {
    /// Starts serving `key`, described by `info`.
    #[must_use]
    pub fn new(key: Arc<CertifiedKey>, info: CertInfo) -> Self {
        Self { current: ArcSwapOption::from_pointee(Served { key, info: Arc::new(info) }) }
    }

    /// Serves nothing yet: handshakes fail until [`swap`](Self::swap) is called.
    #[must_use]
    pub fn empty() -> Self {
        Self { current: ArcSwapOption::empty() }
    }

    /// Serves `key` to all handshakes from now on.
    pub fn swap(&self, key: Arc<CertifiedKey>, info: CertInfo) {
        self.current.store(Some(Arc::new(Served { key, info: Arc::new(info) })));
    }

    /// What the certificate being served says about itself (e.g. for expiry metrics), or
    /// `None` while nothing is served.
    #[must_use]
    pub fn current_info(&self) -> Option<Arc<CertInfo>> {
        self.current.load().as_ref().map(|served| Arc::clone(&served.info))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|served| Arc::clone(&served.key))
    }
}

/// A rustls server configuration using `resolver`: ring provider, TLS 1.3 and 1.2, ALPN `h2`
/// then `http/1.1`, no client authentication.
///
/// # Errors
///
/// When rustls rejects the protocol versions for the provider (not expected with ring).
pub fn server_config(resolver: Arc<CertResolver>) -> Result<ServerConfig, CertError> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(ring_provider::default_provider()))
            .with_protocol_versions(&[&TLS13, &TLS12])
            .map_err(|source| CertError::TlsConfig { source })?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rustls::{ClientConfig, RootCertStore};
    use rustls_pki_types::ServerName;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// 2026-01-01T00:00:00Z: generation tests use a fixed clock.
    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn ca(common_name: &str, validity: Duration, now: OffsetDateTime) -> CertificateAuthority {
        CertificateAuthority::generate(common_name, validity, now).expect("CA generates")
    }

    fn localhost_cert(ca: &CertificateAuthority, now: OffsetDateTime) -> ServingCert {
        ca.issue_serving(&names(&["localhost"]), &[], Duration::days(1), now).expect("issues")
    }

    // --- generation and inspection ---

    #[test]
    fn generated_ca_parses_back_as_a_ca_with_skewed_start() {
        let ca = ca("test CA", Duration::days(10), t0());
        let info = CertInfo::from_pem(ca.cert_pem()).expect("parses");
        assert!(info.is_ca);
        assert_eq!(info.subject, "CN=test CA");
        assert_eq!(info.issuer, "CN=test CA");
        assert_eq!(info.not_before, t0() - CLOCK_SKEW_ALLOWANCE);
        assert_eq!(info.not_after, t0() + Duration::days(10));
        assert_eq!(ca.not_after(), info.not_after);
        assert!(info.verifies_with(ca.cert_pem()).expect("verifies"), "self-signed");
    }

    #[test]
    fn serving_cert_parses_back_with_its_names_validity_and_no_ca_flag() {
        let ca = ca("test CA", DEFAULT_CA_VALIDITY, t0());
        let cases: [(&[&str], &[IpAddr], &str); 3] = [
            (&["svc.ns.svc", "svc"], &[], "CN=svc.ns.svc"),
            (&["localhost"], &DEV_IP_ADDRESSES, "CN=localhost"),
            (&[], &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))], "CN=10.0.0.7"),
        ];
        for (dns, ips, subject) in cases {
            let cert =
                ca.issue_serving(&names(dns), ips, Duration::days(30), t0()).expect("issues");
            let info = CertInfo::from_pem(&cert.cert_pem).expect("parses");
            assert_eq!(info.dns_names, names(dns), "{subject}");
            assert_eq!(info.ip_addresses, ips, "{subject}");
            assert_eq!(info.subject, subject);
            assert_eq!(info.issuer, "CN=test CA");
            assert!(!info.is_ca, "{subject}");
            assert_eq!(info.not_before, t0() - CLOCK_SKEW_ALLOWANCE, "{subject}");
            assert_eq!(info.not_after, t0() + Duration::days(30), "{subject}");
            assert!(info.is_valid_at(t0()));
            assert!(!info.is_valid_at(t0() + Duration::days(31)));
            assert_eq!(info.remaining(t0()), Duration::days(30));
        }
    }

    #[test]
    fn serving_cert_verifies_with_its_own_ca_but_not_with_another() {
        let own = ca("own CA", Duration::days(10), t0());
        let other = ca("other CA", Duration::days(10), t0());
        // Same subject as `own`, different key: the name matches but the signature must not.
        let twin = ca("own CA", Duration::days(10), t0());
        let info = CertInfo::from_pem(localhost_cert(&own, t0()).cert_pem).expect("parses");
        assert!(info.verifies_with(own.cert_pem()).expect("checks"));
        assert!(!info.verifies_with(other.cert_pem()).expect("checks"));
        assert!(!info.verifies_with(twin.cert_pem()).expect("checks"));
    }

    #[test]
    fn serving_cert_validity_is_clamped_to_the_ca() {
        let ca = ca("short CA", Duration::days(10), t0());
        let later = t0() + Duration::days(5);
        let cert = ca.issue_serving(&names(&["x"]), &[], Duration::days(365), later).expect("ok");
        let info = CertInfo::from_pem(&cert.cert_pem).expect("parses");
        assert_eq!(info.not_after, ca.not_after());
        assert_eq!(info.not_before, later - CLOCK_SKEW_ALLOWANCE);
    }

    #[test]
    fn invalid_issue_requests_are_rejected_with_the_reason() {
        let ca = ca("test CA", Duration::days(10), t0());
        let ok = Duration::days(1);
        let cases: [(&str, Vec<String>, Duration, OffsetDateTime); 6] = [
            ("no names", vec![], ok, t0()),
            ("zero validity", names(&["a"]), Duration::ZERO, t0()),
            ("negative validity", names(&["a"]), Duration::days(-1), t0()),
            ("too long", names(&["a"]), MAX_VALIDITY + Duration::SECOND, t0()),
            ("bad DNS name", names(&["not a name"]), ok, t0()),
            ("expired CA", names(&["a"]), ok, t0() + Duration::days(10)),
        ];
        for (label, dns, validity, now) in cases {
            let err = ca.issue_serving(&dns, &[], validity, now).expect_err(label);
            let matched = match label {
                "no names" => matches!(err, CertError::NoSubjectNames),
                "bad DNS name" => matches!(err, CertError::InvalidDnsName { .. }),
                "expired CA" => matches!(err, CertError::CaExpired { .. }),
                _ => matches!(err, CertError::InvalidValidity { .. }),
            };
            assert!(matched, "{label}: {err}");
        }
    }

    #[test]
    fn ca_loaded_from_pem_issues_certs_that_chain_to_the_original() {
        let original = ca("round trip CA", Duration::days(10), t0());
        let loaded =
            CertificateAuthority::from_pem(original.cert_pem(), original.key_pem()).expect("loads");
        assert_eq!(loaded.not_after(), original.not_after());
        let cert = localhost_cert(&loaded, t0());
        let info = CertInfo::from_pem(&cert.cert_pem).expect("parses");
        assert!(info.verifies_with(original.cert_pem()).expect("checks"));
        // rustls (webpki) must build the chain too, which needs matching key identifiers.
        let (key, _) = certified_key(
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
            &Origin::Pem,
            &Origin::Pem,
        )
        .expect("loads");
        let roots = roots(original.cert_pem());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(ring_provider::default_provider()),
        )
        .build()
        .expect("verifier");
        let server_name = ServerName::try_from("localhost").expect("name");
        let now = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(t0().unix_timestamp()).expect("positive"),
        ));
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &*verifier,
            &key.cert[0],
            &[],
            &server_name,
            &[],
            now,
        )
        .expect("chains to the original CA");
    }

    #[test]
    fn ca_from_pem_rejects_a_leaf_a_foreign_key_and_garbage() {
        let ca_a = ca("A", Duration::days(10), t0());
        let ca_b = ca("B", Duration::days(10), t0());
        let leaf = localhost_cert(&ca_a, t0());
        let cases: [(&str, &str, &str); 4] = [
            ("leaf as CA", &leaf.cert_pem, &leaf.key_pem),
            ("foreign key", ca_a.cert_pem(), ca_b.key_pem()),
            ("garbage cert", "garbage", ca_a.key_pem()),
            ("garbage key", ca_a.cert_pem(), "garbage"),
        ];
        for (label, cert, key) in cases {
            let err = CertificateAuthority::from_pem(cert, key).expect_err(label);
            let matched = match label {
                "leaf as CA" => matches!(err, CertError::NotCa { .. }),
                "foreign key" => matches!(err, CertError::KeyMismatch { .. }),
                "garbage cert" => matches!(err, CertError::NoCertificate { .. }),
                _ => matches!(err, CertError::LoadCaKey { .. }),
            };
            assert!(matched, "{label}: {err}");
        }
    }

    #[test]
    fn bundles_are_searched_by_certificate_content() {
        let a = ca("A", Duration::days(10), t0());
        let b = ca("B", Duration::days(10), t0());
        let twin = ca("A", Duration::days(10), t0());
        let bundle = format!("{}{}", a.cert_pem(), b.cert_pem());
        let leaf_a = CertInfo::from_pem(localhost_cert(&a, t0()).cert_pem).expect("parses");
        let leaf_twin = CertInfo::from_pem(localhost_cert(&twin, t0()).cert_pem).expect("parses");
        let cases: [(&str, &[u8], bool, bool); 4] = [
            ("both CAs", bundle.as_bytes(), true, true),
            ("only B", b.cert_pem().as_bytes(), false, false),
            ("garbage", b"garbage", false, false),
            ("broken PEM", b"-----BEGIN CERTIFICATE-----\n!!\n", false, false),
        ];
        for (label, bundle, contains_a, trusts_leaf_a) in cases {
            assert_eq!(bundle_contains(bundle, a.cert_pem().as_bytes()), contains_a, "{label}");
            assert_eq!(leaf_a.is_issued_by_any(bundle), trusts_leaf_a, "{label}");
            assert!(!leaf_twin.is_issued_by_any(bundle), "{label}: same name, other key");
        }
        assert!(!bundle_contains(bundle.as_bytes(), b"no certificate"));
        assert_eq!(bundle_certificates(bundle.as_bytes()).map(|c| c.len()), Some(2));
    }

    #[test]
    fn debug_output_never_contains_private_keys() {
        let ca = ca("A", Duration::days(10), t0());
        let leaf = localhost_cert(&ca, t0());
        for debug in [format!("{ca:?}"), format!("{leaf:?}")] {
            assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        }
    }

    // --- files ---

    #[test]
    fn write_bundle_writes_the_three_files_and_a_private_key_only_the_owner_can_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nested").join("out");
        let paths =
            write_bundle(&dir, &names(&["svc.ns.svc"]), &[], DEFAULT_SERVING_VALIDITY, t0())
                .expect("writes");
        assert_eq!(paths, BundlePaths::in_dir(&dir));
        let (_, info) = load_files(&paths.cert, &paths.key).expect("loads");
        assert_eq!(info.dns_names, names(&["svc.ns.svc"]));
        let ca_pem = fs::read(&paths.ca_cert).expect("ca.crt");
        assert!(info.verifies_with(&ca_pem).expect("checks"));
        let ca_info = CertInfo::from_pem(&ca_pem).expect("parses");
        assert_eq!(ca_info.not_after, t0() + DEFAULT_CA_VALIDITY);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("lists")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode(&paths.key), 0o600);
            assert_eq!(mode(&paths.cert) & 0o022, 0, "cert is not group or world writable");
        }
    }

    #[test]
    fn write_bundle_replaces_an_existing_bundle() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first =
            write_bundle(tmp.path(), &names(&["a"]), &[], Duration::days(1), t0()).expect("writes");
        let old_key = fs::read(&first.key).expect("key");
        write_bundle(tmp.path(), &names(&["b"]), &[], Duration::days(1), t0()).expect("rewrites");
        assert_ne!(fs::read(&first.key).expect("key"), old_key);
        let (_, info) = load_files(&first.cert, &first.key).expect("new pair matches");
        assert_eq!(info.dns_names, names(&["b"]));
    }

    #[test]
    fn ensure_dev_bundle_generates_once_and_never_overwrites() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let paths = BundlePaths::in_dir(&tmp.path().join("certs"));
        let first = ensure_dev_bundle(&paths.cert, &paths.key, &paths.ca_cert).expect("generates");
        assert_eq!(first, Ensured::Generated);
        let before: Vec<Vec<u8>> = [&paths.cert, &paths.key, &paths.ca_cert]
            .iter()
            .map(|p| fs::read(p).expect("reads"))
            .collect();

        let second = ensure_dev_bundle(&paths.cert, &paths.key, &paths.ca_cert).expect("keeps");
        assert_eq!(second, Ensured::Existing);
        let after: Vec<Vec<u8>> = [&paths.cert, &paths.key, &paths.ca_cert]
            .iter()
            .map(|p| fs::read(p).expect("reads"))
            .collect();
        assert_eq!(before, after);

        let (_, info) = load_files(&paths.cert, &paths.key).expect("loads");
        assert_eq!(info.dns_names, names(&[DEV_DNS_NAME]));
        assert_eq!(info.ip_addresses, DEV_IP_ADDRESSES);
        assert!(info.verifies_with(&before[2]).expect("checks"));
        let now = OffsetDateTime::now_utc();
        assert!(info.is_valid_at(now));
        assert!(info.remaining(now) <= DEFAULT_SERVING_VALIDITY);
        assert!(info.remaining(now) > DEFAULT_SERVING_VALIDITY - Duration::days(1));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&paths.key).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn ensure_dev_bundle_names_the_missing_half_of_a_pair_and_writes_nothing() {
        for present in [TLS_CERT_FILE, TLS_KEY_FILE] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let paths = BundlePaths::in_dir(tmp.path());
            fs::write(tmp.path().join(present), b"kept").expect("writes");
            let err = ensure_dev_bundle(&paths.cert, &paths.key, &paths.ca_cert)
                .expect_err("incomplete pair");
            let CertError::IncompletePair { present: p, missing } = &err else {
                panic!("{present}: unexpected {err}");
            };
            assert_eq!(p, &tmp.path().join(present));
            assert_ne!(missing, p);
            assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
            assert!(!missing.exists(), "{present}: nothing generated");
            assert!(!paths.ca_cert.exists(), "{present}: nothing generated");
            assert_eq!(fs::read(p).expect("reads"), b"kept");
        }
    }

    #[test]
    fn ensure_dev_bundle_refuses_to_overwrite_a_leftover_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let paths = BundlePaths::in_dir(tmp.path());
        fs::write(&paths.ca_cert, b"old ca").expect("writes");
        let err = ensure_dev_bundle(&paths.cert, &paths.key, &paths.ca_cert).expect_err("refuses");
        assert!(
            matches!(&err, CertError::AlreadyExists { path } if *path == paths.ca_cert),
            "{err}"
        );
        assert_eq!(fs::read(&paths.ca_cert).expect("reads"), b"old ca");
        assert!(!paths.cert.exists() && !paths.key.exists());
    }

    #[test]
    fn create_new_never_replaces_a_file_that_appeared_meanwhile() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("tls.key");
        let staged = stage(&dest, b"new", KEY_FILE_MODE).expect("stages");
        fs::write(&dest, b"raced").expect("writes");
        let err = staged.create_new().expect_err("refuses");
        assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
        assert_eq!(fs::read(&dest).expect("reads"), b"raced");
        assert_eq!(fs::read_dir(tmp.path()).expect("lists").count(), 1, "temp file removed");
    }

    // --- loading ---

    #[test]
    fn load_certified_key_accepts_a_matching_pair() {
        let ca = ca("A", Duration::days(10), t0());
        let cert = localhost_cert(&ca, t0());
        let key =
            load_certified_key(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).expect("loads");
        assert_eq!(key.cert.len(), 1);
    }

    #[test]
    fn load_certified_key_rejects_mismatched_pairs_and_garbage() {
        let ca = ca("A", Duration::days(10), t0());
        let one = localhost_cert(&ca, t0());
        let two = localhost_cert(&ca, t0());
        let broken_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let cases: [(&str, &str, &str); 6] = [
            ("mismatched key", &one.cert_pem, &two.key_pem),
            ("garbage cert", "garbage", &one.key_pem),
            ("garbage key", &one.cert_pem, "garbage"),
            ("key given as cert", &one.key_pem, &one.key_pem),
            ("cert given as key", &one.cert_pem, &one.cert_pem),
            ("undecodable cert", broken_pem, &one.key_pem),
        ];
        for (label, cert, key) in cases {
            let err = load_certified_key(cert.as_bytes(), key.as_bytes()).expect_err(label);
            let matched = match label {
                "mismatched key" => matches!(err, CertError::KeyMismatch { .. }),
                "garbage cert" | "key given as cert" => {
                    matches!(err, CertError::NoCertificate { .. })
                }
                "garbage key" | "cert given as key" => {
                    matches!(err, CertError::NoPrivateKey { .. })
                }
                _ => matches!(err, CertError::ParseCertificate { .. }),
            };
            assert!(matched, "{label}: {err}");
        }
    }

    #[test]
    fn load_files_errors_name_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let paths =
            write_bundle(tmp.path(), &names(&["a"]), &[], Duration::days(1), t0()).expect("writes");
        let missing = tmp.path().join("absent.crt");
        let err = load_files(&missing, &paths.key).expect_err("missing cert");
        assert!(matches!(err, CertError::Read { what: "certificate", .. }), "{err}");
        assert!(err.to_string().contains("absent.crt"), "{err}");

        let other =
            write_bundle(&tmp.path().join("b"), &names(&["b"]), &[], Duration::days(1), t0())
                .expect("writes");
        let err = load_files(&paths.cert, &other.key).expect_err("mismatch");
        assert_eq!(
            err.to_string(),
            format!("private key in {} does not match the certificate", other.key.display())
        );
    }

    // --- serving ---

    fn roots(ca_pem: &str) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca pem"))
            .expect("adds");
        roots
    }

    fn resolver_for(ca: &CertificateAuthority) -> (Arc<CertifiedKey>, CertInfo) {
        let cert = localhost_cert(ca, OffsetDateTime::now_utc());
        certified_key(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), &Origin::Pem, &Origin::Pem)
            .expect("loads")
    }

    /// Accepts connections forever, completing handshakes and dropping them.
    async fn serve(listener: TcpListener, acceptor: TlsAcceptor) {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A failed handshake is what some tests expect; the client reports it.
                let _ = acceptor.accept(tcp).await;
            });
        }
    }

    /// What a completed client handshake negotiated.
    #[derive(Debug)]
    struct Negotiated {
        alpn: Option<Vec<u8>>,
        version: Option<rustls::ProtocolVersion>,
    }

    /// Handshakes with `addr` as `localhost`, trusting only `ca_pem`, offering `versions`.
    async fn handshake(
        addr: SocketAddr,
        ca_pem: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> io::Result<Negotiated> {
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(ring_provider::default_provider()))
                .with_protocol_versions(versions)
                .expect("versions")
                .with_root_certificates(roots(ca_pem))
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("name");
        let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
        let conn = tls.get_ref().1;
        Ok(Negotiated {
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: conn.protocol_version(),
        })
    }

    fn is_unknown_issuer(err: &io::Error) -> bool {
        matches!(
            err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
        )
    }

    /// Starts a TLS server on 127.0.0.1 serving a localhost cert from `ca`.
    async fn start_server(ca: &CertificateAuthority) -> (Arc<CertResolver>, SocketAddr) {
        let (key, info) = resolver_for(ca);
        let resolver = Arc::new(CertResolver::new(key, info));
        let config = server_config(Arc::clone(&resolver)).expect("config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        // The runtime drops the task at the end of the test.
        tokio::spawn(serve(listener, TlsAcceptor::from(Arc::new(config))));
        (resolver, addr)
    }

    const BOTH: &[&rustls::SupportedProtocolVersion] = &[&TLS13, &TLS12];

    #[tokio::test]
    async fn tls_handshakes_follow_a_swapped_certificate() {
        let now = OffsetDateTime::now_utc();
        let first_ca = ca("first CA", Duration::days(1), now);
        let second_ca = ca("second CA", Duration::days(1), now);
        let (resolver, addr) = start_server(&first_ca).await;

        handshake(addr, first_ca.cert_pem(), BOTH).await.expect("first CA trusted");
        let err = handshake(addr, second_ca.cert_pem(), BOTH).await.expect_err("not yet");
        assert!(is_unknown_issuer(&err), "{err}");

        let (key, info) = resolver_for(&second_ca);
        resolver.swap(key, info);
        assert_eq!(resolver.current_info().expect("serving").issuer, "CN=second CA");

        handshake(addr, second_ca.cert_pem(), BOTH).await.expect("second CA trusted after swap");
        let err = handshake(addr, first_ca.cert_pem(), BOTH).await.expect_err("first CA no longer");
        assert!(is_unknown_issuer(&err), "{err}");
    }

    #[tokio::test]
    async fn an_empty_resolver_fails_handshakes_until_a_certificate_is_swapped_in() {
        let ca = ca("A", Duration::days(1), OffsetDateTime::now_utc());
        let resolver = Arc::new(CertResolver::empty());
        assert!(resolver.current_info().is_none());
        let config = server_config(Arc::clone(&resolver)).expect("config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, TlsAcceptor::from(Arc::new(config))));

        handshake(addr, ca.cert_pem(), BOTH).await.expect_err("no certificate yet");
        let (key, info) = resolver_for(&ca);
        resolver.swap(key, info);
        assert_eq!(resolver.current_info().expect("serving").issuer, "CN=A");
        handshake(addr, ca.cert_pem(), BOTH).await.expect("served after the swap");
    }

    #[tokio::test]
    async fn tls_server_speaks_tls13_and_tls12_and_prefers_h2() {
        let ca = ca("A", Duration::days(1), OffsetDateTime::now_utc());
        let (_, addr) = start_server(&ca).await;
        let cases: [(&[&rustls::SupportedProtocolVersion], rustls::ProtocolVersion); 2] = [
            (&[&TLS13], rustls::ProtocolVersion::TLSv1_3),
            (&[&TLS12], rustls::ProtocolVersion::TLSv1_2),
        ];
        for (offered, expected) in cases {
            let negotiated = handshake(addr, ca.cert_pem(), offered).await.expect("handshakes");
            assert_eq!(negotiated.version, Some(expected));
            assert_eq!(negotiated.alpn.as_deref(), Some(&b"h2"[..]), "{expected:?}");
        }
    }
}
