//! Generating a CA and the serving certificates it issues, as PEM.

use std::fmt;
use std::net::IpAddr;

use rcgen::string::{BmpString, UniversalString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, DnsName};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;
use x509_parser::x509::X509Name;

use super::*;
use crate::certs::plan::{CA_COMMON_NAME_PREFIX, CaMaterial, Generate, format_time};

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

/// The planner's [`Generate`]: ECDSA P-256 keys and certificates from rcgen.
#[derive(Clone, Copy, Debug, Default)]
pub struct RcgenGenerator;

impl Generate for RcgenGenerator {
    fn ca(&self, validity: Duration, now: OffsetDateTime) -> Result<CaMaterial, CertError> {
        let ca = CertificateAuthority::generate(
            &format!("{CA_COMMON_NAME_PREFIX} {}", format_time(now)),
            validity,
            now,
        )?;
        Ok(CaMaterial { cert_pem: ca.cert_pem().to_owned(), key_pem: ca.key_pem().to_owned() })
    }

    fn serving(
        &self,
        ca: &CaMaterial,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<ServingCert, CertError> {
        CertificateAuthority::from_pem(&ca.cert_pem, &ca.key_pem)?.issue_serving(
            dns_names,
            ip_addresses,
            validity,
            now,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::crypto::ring as ring_provider;
    use rustls_pki_types::ServerName;

    use super::*;
    use crate::certs::serve::certified_key;
    use crate::certs::test_support::*;

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
}
