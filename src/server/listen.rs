//! Running the two servers: binding the HTTPS webhook and plain-HTTP metrics listeners, and
//! the drain on shutdown. Shared by standalone mode (`serve`) and cluster mode, which differ
//! only in where policies, facts and certificates come from.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{Addresses, AppState, Limits, Readiness};

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("failed to listen on {addr}: {source}")]
pub struct ListenError {
    /// The address.
    pub addr: std::net::SocketAddr,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// A started server: where it listens and how to await it.
pub struct Running {
    /// The bound HTTPS address (useful when port 0 was asked for).
    pub webhook_addr: std::net::SocketAddr,
    /// The bound metrics address.
    pub metrics_addr: std::net::SocketAddr,
    /// Shared state (metrics, readiness, snapshot).
    pub state: AppState,
    /// Completes when both servers have drained after shutdown.
    pub done: tokio::task::JoinHandle<()>,
}

/// Both servers, bound and serving.
pub struct Listening {
    /// The bound HTTPS address.
    pub webhook_addr: std::net::SocketAddr,
    /// The bound metrics address.
    pub metrics_addr: std::net::SocketAddr,
    /// The server tasks; they end after `stop` turns true and in-flight requests finish.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds the HTTPS webhook and plain-HTTP metrics listeners and serves them until `stop`
/// turns true.
///
/// # Errors
/// [`ListenError`] when an address cannot be bound.
pub async fn listen(
    addresses: &Addresses,
    tls: Arc<rustls::ServerConfig>,
    state: AppState,
    limits: &Limits,
    stop: watch::Receiver<bool>,
) -> Result<Listening, ListenError> {
    let bind = |addr| async move {
        let listener =
            TcpListener::bind(addr).await.map_err(|source| ListenError { addr, source })?;
        let local = listener.local_addr().map_err(|source| ListenError { addr, source })?;
        Ok::<_, ListenError>((listener, local))
    };
    let (webhook_listener, webhook_addr) = bind(addresses.webhook).await?;
    let (metrics_listener, metrics_addr) = bind(addresses.metrics).await?;
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let webhook_app = super::webhook_router(state.clone(), limits);
    let webhook = tokio::spawn(super::serve_tls(
        webhook_listener,
        tls,
        webhook_app,
        limits.clone(),
        state.readiness.draining(),
        stopped(stop.clone()),
    ));
    let metrics_app = super::metrics_router(state);
    let metrics = tokio::spawn(async move {
        let serve =
            axum::serve(metrics_listener, metrics_app).with_graceful_shutdown(stopped(stop));
        if let Err(error) = serve.await {
            tracing::error!(%error, "metrics server failed");
        }
    });
    Ok(Listening { webhook_addr, metrics_addr, tasks: vec![webhook, metrics] })
}

/// On `shutdown`: readiness turns false, `delay` passes (so endpoints stop routing here),
/// `stop` is sent, and the returned task completes when every task has finished.
pub fn drain_on(
    shutdown: impl Future<Output = ()> + Send + 'static,
    readiness: Arc<Readiness>,
    delay: Duration,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        shutdown.await;
        readiness.set_shutting_down();
        tracing::info!(?delay, "shutting down: readiness is false; draining in-flight requests");
        tokio::time::sleep(delay).await;
        let _ = stop.send(true);
        futures::future::join_all(tasks).await;
        tracing::info!("shut down");
    })
}
