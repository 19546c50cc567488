//! `arcguard serve` in standalone mode: policies and certificates from files, both hot-reloaded.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::certs::{self, CertResolver};
use crate::memory::MemoryPool;
use crate::policy::load;
use crate::server::{self, Addresses, AppState, Limits, Running, Snapshot, drain_on, listen};
use crate::watch::FileWatcher;

/// How often files are re-read even without a change notification, in case one was missed.
const RESCAN_INTERVAL: Duration = Duration::from_secs(60);

/// Settings of a standalone server.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Directory of policy files.
    pub policies: PathBuf,
    /// Listen addresses.
    pub addresses: Addresses,
    /// Serving certificate (PEM).
    pub tls_cert: PathBuf,
    /// Serving key (PEM).
    pub tls_key: PathBuf,
    /// Where the development CA is written when certificates are generated.
    pub ca_cert: PathBuf,
    /// Generate a development CA and certificate when neither certificate nor key exists.
    pub generate_certs: bool,
    /// Server limits.
    pub limits: Limits,
    /// Time between readiness turning false and the listeners closing on shutdown.
    pub shutdown_delay: Duration,
    /// How imageProvenance policies reach registries.
    pub registries: crate::oci::RegistryConfig,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The policies could not be loaded at start (there is no earlier set to keep).
    #[error("failed to load policies: {0}")]
    Policies(#[source] load::LoadError),
    /// The certificate could not be generated or loaded.
    #[error(transparent)]
    Certificate(#[from] certs::CertError),
    /// Registry access could not be set up.
    #[error(transparent)]
    Registry(#[from] crate::oci::RegistryError),
    /// A listener could not be bound.
    #[error(transparent)]
    Listen(#[from] server::ListenError),
    /// Files could not be watched.
    #[error("failed to watch {path}: {source}")]
    Watch {
        /// The path.
        path: PathBuf,
        /// The notify error.
        #[source]
        source: notify::Error,
    },
}

/// Starts the standalone server; it runs until `shutdown` completes.
///
/// # Errors
/// [`ServeError`] when policies, certificates or listeners cannot be set up.
pub async fn start(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    if config.generate_certs {
        let ensured = certs::ensure_dev_bundle(&config.tls_cert, &config.tls_key, &config.ca_cert)?;
        if ensured == certs::Ensured::Generated {
            tracing::info!(ca = %config.ca_cert.display(), cert = %config.tls_cert.display(), "generated a development CA and serving certificate for localhost, 127.0.0.1 and ::1");
        }
    }
    let loaded = load::load_dir(&config.policies).map_err(ServeError::Policies)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let (key, info) = certs::load_files(&config.tls_cert, &config.tls_key)?;
    let resolver = Arc::new(CertResolver::new(key, info.clone()));
    let tls = Arc::new(certs::server_config(resolver.clone())?);

    // Webhook requests and registry reads share one memory budget.
    let memory = MemoryPool::new(config.limits.request_budget());
    let state = AppState::new(Snapshot { policies: loaded.policies, facts: loaded.facts })
        .with_memory(memory.clone());
    let registries =
        crate::oci::Registries::new(&config.registries, memory, state.metrics.clone())?;
    let state = state.with_images(Arc::new(registries));
    let snapshot = state.snapshot.load();
    state.metrics.set_policies(&snapshot.policies);
    state.metrics.record_certificate("serving", Some(info.not_after.unix_timestamp()));
    log_policies(&config.policies, &snapshot.policies, snapshot.facts.credential_specs.len());
    drop(snapshot);
    state.readiness.set_policies_loaded();
    state.readiness.set_certificate_loaded();
    // Standalone facts come from the policy directory, loaded above.
    state.readiness.set_caches_synced();
    state.readiness.set_credential_specs_synced();

    let (stop_tx, stop_rx) = watch::channel(false);
    let listening =
        listen(&config.addresses, tls, state.clone(), &config.limits, stop_rx.clone()).await?;

    let watch_paths = watch_targets(&config);
    let watcher = FileWatcher::new(&watch_paths).map_err(|source| ServeError::Watch {
        path: watch_paths.first().map(|(p, _)| p.clone()).unwrap_or_default(),
        source,
    })?;
    let reloader =
        tokio::spawn(reload_loop(config.clone(), state.clone(), resolver, watcher, stop_rx));
    tracing::info!(webhook = %format!("https://{}", listening.webhook_addr), metrics = %format!("http://{}/metrics", listening.metrics_addr), ca = %config.ca_cert.display(), "arcguard is serving");

    let (webhook_addr, metrics_addr) = (listening.webhook_addr, listening.metrics_addr);
    let mut tasks = listening.tasks;
    tasks.push(reloader);
    let done = drain_on(shutdown, state.readiness.clone(), config.shutdown_delay, stop_tx, tasks);
    Ok(Running { webhook_addr, metrics_addr, state, done })
}

fn watch_targets(config: &ServeConfig) -> Vec<(PathBuf, bool)> {
    let parent = |p: &Path| match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut paths = vec![(config.policies.clone(), true)];
    for dir in [parent(&config.tls_cert), parent(&config.tls_key)] {
        if !paths.iter().any(|(p, _)| *p == dir) {
            paths.push((dir, false));
        }
    }
    paths
}

fn log_policies(dir: &Path, set: &crate::policy::PolicySet, credential_specs: usize) {
    let names: Vec<String> = set
        .policies()
        .iter()
        .map(|p| format!("{} ({}, {})", p.id(), p.rule.name(), p.action.as_str()))
        .collect();
    tracing::info!(dir = %dir.display(), count = set.len(), credential_specs, policies = %names.join(", "), "policies loaded");
}

/// Re-reads policies and certificates on change notifications (and on a slow timer, in case a
/// notification was missed); a bad edit is reported and the previous version stays in force.
async fn reload_loop(
    config: ServeConfig,
    state: AppState,
    resolver: Arc<CertResolver>,
    mut watcher: FileWatcher,
    mut stop: watch::Receiver<bool>,
) {
    // File reads block: they run on the blocking pool, never on the threads that serve
    // admission (a slow or hung volume must not stall requests).
    let initial = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            (
                fingerprint_policies(&config.policies),
                fingerprint_files(&[&config.tls_cert, &config.tls_key]),
            )
        })
        .await
    };
    let Ok((mut last_policies, mut last_cert)) = initial else { return };
    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    rescan.tick().await;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            change = watcher.changed() => if change.is_none() { return },
            _ = rescan.tick() => {}
        }
        let (config, state, resolver) = (config.clone(), state.clone(), resolver.clone());
        let reloaded = tokio::task::spawn_blocking(move || {
            let policies = fingerprint_policies(&config.policies);
            if policies != last_policies {
                reload_policies(&config.policies, &state);
            }
            let cert = fingerprint_files(&[&config.tls_cert, &config.tls_key]);
            if cert != last_cert {
                reload_certificate(&config, &resolver, &state);
            }
            (policies, cert)
        })
        .await;
        match reloaded {
            Ok((policies, cert)) => (last_policies, last_cert) = (policies, cert),
            Err(error) => tracing::error!(%error, "reloading policies and certificates failed"),
        }
    }
}

fn reload_policies(dir: &Path, state: &AppState) {
    match load::load_dir(dir) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                tracing::warn!("{warning}");
            }
            log_policies(dir, &loaded.policies, loaded.facts.credential_specs.len());
            state.metrics.record_policy_reload(Some(&loaded.policies));
            state
                .snapshot
                .store(Arc::new(Snapshot { policies: loaded.policies, facts: loaded.facts }));
        }
        Err(error) => {
            state.metrics.record_policy_reload(None);
            tracing::error!(%error, "policy reload failed; the previous policies stay in force");
        }
    }
}

fn reload_certificate(config: &ServeConfig, resolver: &CertResolver, state: &AppState) {
    match certs::load_files(&config.tls_cert, &config.tls_key) {
        Ok((key, info)) => {
            let not_after = info.not_after.unix_timestamp();
            resolver.swap(key, info);
            state.metrics.record_certificate("serving", Some(not_after));
            tracing::info!(cert = %config.tls_cert.display(), not_after, "serving certificate reloaded");
        }
        Err(error) => {
            state.metrics.record_certificate("serving", None);
            tracing::warn!(%error, "serving certificate reload failed; the previous certificate stays in use");
        }
    }
}

/// A content fingerprint of the policy files: changes when any file, or the file list, does.
fn fingerprint_policies(dir: &Path) -> Option<u64> {
    let files = load::policy_files(dir).ok()?;
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    fingerprint_files(&refs)
}

fn fingerprint_files(paths: &[&Path]) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        path.hash(&mut hasher);
        std::fs::read(path).ok()?.hash(&mut hasher);
    }
    Some(hasher.finish())
}
