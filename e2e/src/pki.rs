//! Certificates of the test control plane: one CA that signs the apiserver's serving
//! certificate and the admin's client certificate, and the service-account signing key.

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

/// Everything the control plane needs: CA, apiserver serving pair, admin client pair and the
/// service-account key.
#[derive(Clone, Debug)]
pub struct ControlPlanePki {
    /// The CA (serving CA of the apiserver and `--client-ca-file`).
    pub ca: Pair,
    /// kube-apiserver's serving certificate (localhost, 127.0.0.1).
    pub apiserver: Pair,
    /// The admin's client certificate (CN=admin, O=system:masters).
    pub admin: Pair,
    /// The service-account token signing key (PKCS#8).
    pub service_account_key_pem: String,
    /// Its public key (SubjectPublicKeyInfo PEM), which verifies tokens.
    pub service_account_public_pem: String,
}

fn window(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(2);
}

impl ControlPlanePki {
    /// Generates a fresh set.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn generate() -> Result<Self> {
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, "arcguard e2e cluster CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        window(&mut ca_params);
        let ca_cert = ca_params.self_signed(&ca_key).context("CA certificate")?;
        let ca = Pair { cert_pem: ca_cert.pem(), key_pem: ca_key.serialize_pem() };
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |cn: &str, org: Option<&str>, sans: &[&str], usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().context("leaf key")?;
            let mut params =
                CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                    .context("leaf names")?;
            params.distinguished_name.push(DnType::CommonName, cn);
            if let Some(org) = org {
                params.distinguished_name.push(DnType::OrganizationName, org);
            }
            params.key_usages =
                vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            window(&mut params);
            let cert = params.signed_by(&key, &issuer).context("leaf certificate")?;
            anyhow::Ok(Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
        };
        let apiserver = leaf(
            "kube-apiserver",
            None,
            &[
                "localhost",
                "127.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let admin =
            leaf("admin", Some("system:masters"), &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        let service_account = KeyPair::generate().context("service-account key")?;
        Ok(Self {
            ca,
            apiserver,
            admin,
            service_account_key_pem: service_account.serialize_pem(),
            service_account_public_pem: service_account.public_key_pem(),
        })
    }
}

/// A TLS acceptor for a loopback test server serving `cert_pem` with `key_pem`, offering
/// HTTP/2 and HTTP/1.1 as arcguard's server does.
///
/// # Errors
/// When the certificate or key does not parse, or rustls refuses them.
pub fn tls_acceptor(cert_pem: &str, key_pem: &str) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("the serving key")?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}
