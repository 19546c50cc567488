//! Steady admission load for install and uninstall scenarios: a paced stream of dry-run creates
//! of a trusted pod in a namespace arcguard inspects, on its own thread and runtime (so the
//! scenario may block on kubectl or helm meanwhile), recording every failed request.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::cluster::pod;
use crate::controlplane::client_for;

/// A trusted image (the sample policies trust `contoso.azurecr.io`): arcguard admits it, so
/// every failure is the webhooks' plumbing, never a policy decision.
pub const TRUSTED_IMAGE: &str = "contoso.azurecr.io/app:1";

/// One request that did not succeed.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Since the load started.
    pub at: Duration,
    /// The apiserver's answer.
    pub message: String,
}

/// What a [`Load`] did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Requests made.
    pub requests: u64,
    /// Requests that failed, in order.
    pub failures: Vec<Failure>,
    /// How long it ran.
    pub duration: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests in {:.1}s, {} failed",
            self.requests,
            self.duration.as_secs_f64(),
            self.failures.len()
        )?;
        for failure in self.failures.iter().take(5) {
            write!(f, "\n  at {:.2}s: {}", failure.at.as_secs_f64(), failure.message)?;
        }
        Ok(())
    }
}

/// A running load; [`Load::stop`] ends it and returns its [`Report`].
#[derive(Debug)]
pub struct Load {
    stop: watch::Sender<bool>,
    report: Arc<Mutex<Report>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Load {
    /// Starts creating (dry-run) a trusted pod in `namespace` every `interval`, as the admin
    /// of `kubeconfig`. Each request waits for the previous one (a hung webhook call slows the
    /// pace rather than piling up requests).
    #[must_use]
    pub fn start(kubeconfig: &Path, namespace: &str, interval: Duration) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let report = Arc::new(Mutex::new(Report::default()));
        let (kubeconfig, namespace): (PathBuf, String) = (kubeconfig.into(), namespace.into());
        let shared = report.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let client = client_for(&kubeconfig).await?;
                let pods: Api<Pod> = Api::namespaced(client, &namespace);
                let params = PostParams { dry_run: true, ..PostParams::default() };
                let probe = pod("load", TRUSTED_IMAGE);
                let started = Instant::now();
                // Pacing for load generation, not synchronisation.
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => break,
                        _ = ticks.tick() => {}
                    }
                    let result = pods.create(&params, &probe).await;
                    let mut report = shared.lock().map_err(|_| anyhow!("poisoned"))?;
                    report.requests += 1;
                    report.duration = started.elapsed();
                    if let Err(error) = result {
                        let message = match error {
                            kube::Error::Api(status) => status.message,
                            other => other.to_string(),
                        };
                        report.failures.push(Failure { at: started.elapsed(), message });
                    }
                }
                Ok(())
            })
        });
        Self { stop, report, thread: Some(thread) }
    }

    /// Requests made so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.report.lock().map(|r| r.requests).unwrap_or_default()
    }

    /// Ends the load (after the request in flight) and returns what it did.
    ///
    /// # Errors
    /// When the load could not run (no client) or its thread panicked.
    pub fn stop(mut self) -> Result<Report> {
        self.stop.send_replace(true);
        if let Some(thread) = self.thread.take() {
            thread.join().map_err(|_| anyhow!("the load thread panicked"))??;
        }
        let report = self.report.lock().map_err(|_| anyhow!("poisoned"))?.clone();
        Ok(report)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
