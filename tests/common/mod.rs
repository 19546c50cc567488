//! Shared by the integration tests: a standalone server on free loopback ports, with the sample
//! policies copied into a temporary directory and development certificates generated there.

use std::path::Path;
use std::time::Duration;

use arcguard::serve::{Running, ServeConfig, start};
use arcguard::server::{Addresses, Limits};
use tokio::sync::oneshot;

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
        shutdown_delay: Duration::ZERO,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let running = start(config, async {
        let _ = stopped.await;
    })
    .await
    .expect("server starts");
    Started { dir, running, stop }
}
