//! Shared by the integration tests: a standalone server on free loopback ports, with the sample
//! policies copied into a temporary directory and development certificates generated there, and
//! a raw HTTP/2 client that reads frames as they come.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arcguard::serve::{ServeConfig, start};
use arcguard::server::Running;
use arcguard::server::{Addresses, Limits};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// HTTP/2 frame type PING (RFC 9113 section 6.7).
pub const H2_PING: u8 = 0x6;
/// HTTP/2 frame type GOAWAY (RFC 9113 section 6.8).
pub const H2_GOAWAY: u8 = 0x7;

/// A started server: its directory (policies/, certs/), the running handles, and the sender
/// that starts its shutdown.
pub struct Started {
    /// Holds `policies/` and `certs/`.
    pub dir: tempfile::TempDir,
    /// Addresses, state and the drain handle.
    pub running: Running,
    /// Send (or drop) to shut the server down.
    pub stop: oneshot::Sender<()>,
}

/// Starts `arcguard serve` in process with `limits`.
pub async fn start_server(limits: Limits) -> Started {
    start_server_with(limits, Duration::ZERO).await
}

/// Starts `arcguard serve` in process with `limits` and `--shutdown-delay`.
pub async fn start_server_with(limits: Limits, shutdown_delay: Duration) -> Started {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    let samples = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
    for entry in std::fs::read_dir(samples).expect("samples") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, policies.join(path.file_name().expect("name"))).expect("copy");
    }
    let certs = dir.path().join("certs");
    let config = ServeConfig {
        policies,
        addresses: Addresses {
            webhook: "127.0.0.1:0".parse().expect("addr"),
            metrics: "127.0.0.1:0".parse().expect("addr"),
        },
        tls_cert: certs.join("tls.crt"),
        tls_key: certs.join("tls.key"),
        ca_cert: certs.join("ca.crt"),
        generate_certs: true,
        limits,
        shutdown_delay,
        registries: arcguard::oci::RegistryConfig::default(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let running = start(config, async {
        let _ = stopped.await;
    })
    .await
    .expect("server starts");
    Started { dir, running, stop }
}

/// A TLS connection to `addr` trusting `ca`, negotiating HTTP/2 by ALPN, with the client preface
/// and an empty SETTINGS frame sent: an HTTP/2 connection that then does nothing.
pub async fn h2_idle(addr: std::net::SocketAddr, ca: &Path) -> TlsStream<TcpStream> {
    let connector = TlsConnector::from(client_tls_config(ca, &[b"h2"]));
    let name = ServerName::try_from("localhost").expect("name");
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let mut stream = connector.connect(name, tcp).await.expect("tls");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()), "ALPN h2");
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
    stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.expect("settings");
    stream.flush().await.expect("flush");
    stream
}

/// HTTP/2 frame types (RFC 9113 section 4.1) read until the peer closes, a frame of type `until`
/// arrives, or `bound` passes; and whether the peer closed. Nothing is answered: not SETTINGS,
/// not PING.
pub async fn h2_frames(
    stream: &mut (impl AsyncRead + Unpin),
    bound: Duration,
    until: Option<u8>,
) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + bound;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut types = Vec::new();
    let mut parsed = 0;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (types, false),
            Ok(Ok(0) | Err(_)) => return (types, true),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
        while received.len() >= parsed + 9 {
            let length = usize::from(received[parsed]) << 16
                | usize::from(received[parsed + 1]) << 8
                | usize::from(received[parsed + 2]);
            types.push(received[parsed + 3]);
            parsed += 9 + length;
            if until.is_some_and(|t| types.last() == Some(&t)) {
                return (types, false);
            }
        }
    }
}

/// A rustls client configuration trusting the CA in `ca`, offering `alpn`.
pub fn client_tls_config(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(cert.expect("ca pem")).expect("ca cert");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}
