//! The no-op webhook of `create_latency` as a process of its own (see
//! [`arcguard_e2e::noop_webhook`]), so that the floor it measures pays what arcguard pays as a
//! separate server.
//!
//! Usage: `noop_webhook ADDR CERT_PEM_FILE KEY_PEM_FILE`; started and stopped by
//! [`arcguard_e2e::noop_webhook::NoopWebhook`].

use anyhow::{Context as _, Result};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, cert, key] = args.as_slice() else {
        anyhow::bail!("usage: noop_webhook ADDR CERT_PEM_FILE KEY_PEM_FILE");
    };
    let cert = std::fs::read_to_string(cert).with_context(|| format!("reading {cert}"))?;
    let key = std::fs::read_to_string(key).with_context(|| format!("reading {key}"))?;
    let acceptor = arcguard_e2e::pki::tls_acceptor(&cert, &key)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    arcguard_e2e::noop_webhook::serve(listener, acceptor).await;
    Ok(())
}
