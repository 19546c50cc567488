//! Serving: loading a certificate and key for rustls, and a resolver swapped per handshake.

use std::fmt;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::crypto::ring as ring_provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use rustls::{InconsistentKeys, ServerConfig};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::{self, PemObject};

use super::*;

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
pub(crate) fn certified_key(
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

    use rustls::ClientConfig;
    use rustls_pki_types::ServerName;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::certs::test_support::*;

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
