//! Inspecting certificates: names, validity, issuer, and CA bundles.

use std::fmt;
use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{self, PemObject};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

use super::*;

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
    pub(crate) fn from_der(
        der: CertificateDer<'static>,
        origin: &Origin,
    ) -> Result<Self, CertError> {
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
pub(crate) fn is_signed_by(
    leaf: &X509Certificate<'_>,
    ca: &X509Certificate<'_>,
) -> Result<bool, CertError> {
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
pub(crate) fn certificate_chain(
    pem: &[u8],
    origin: &Origin,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem { origin: origin.clone(), source })
}

/// The first certificate in `pem`.
pub(crate) fn first_certificate(
    pem: &[u8],
    origin: &Origin,
) -> Result<CertificateDer<'static>, CertError> {
    match CertificateDer::from_pem_slice(pem) {
        Ok(der) => Ok(der),
        Err(pem::Error::NoItemsFound) => Err(CertError::NoCertificate { origin: origin.clone() }),
        Err(source) => Err(CertError::Pem { origin: origin.clone(), source }),
    }
}

/// Parses DER into x509-parser's view.
pub(crate) fn parse_x509<'a>(
    der: &'a [u8],
    origin: &Origin,
) -> Result<X509Certificate<'a>, CertError> {
    use x509_parser::nom;

    x509_parser::parse_x509_certificate(der).map(|(_, cert)| cert).map_err(|err| {
        let source = match err {
            nom::Err::Error(e) | nom::Err::Failure(e) => e,
            nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
        };
        CertError::ParseCertificate { origin: origin.clone(), source }
    })
}
