//! arcguard in cluster mode, out of cluster, with the admin kubeconfig.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::bins;
use crate::process::{Proc, free_port};

/// arcguard's namespace (its Secret and Lease live there).
pub const NAMESPACE: &str = "arcguard-system";

/// A running (or stopped) `arcguard serve --cluster`.
#[derive(Debug)]
pub struct Arcguard {
    process: Option<Proc>,
    command: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
    /// The HTTPS webhook port on 127.0.0.1.
    pub webhook_port: u16,
    /// The plain-HTTP metrics and probe port on 127.0.0.1.
    pub metrics_port: u16,
    http: reqwest::Client,
}

impl Arcguard {
    /// Picks the ports; [`Arcguard::start`] runs it. `extra_args` are appended to the
    /// command line.
    ///
    /// # Errors
    /// When no port is free or arcguard cannot be built.
    pub fn new(kubeconfig: PathBuf, log: PathBuf, extra_args: &[String]) -> Result<Self> {
        let (webhook_port, metrics_port) = (free_port()?, free_port()?);
        let mut command: Vec<String> = [
            bins::arcguard_bin()?.display().to_string(),
            "serve".to_owned(),
            "--cluster".to_owned(),
            format!("--namespace={NAMESPACE}"),
            "--pod-name=e2e-0".to_owned(),
            format!("--addr=127.0.0.1:{webhook_port}"),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            // The apiserver dials https://127.0.0.1:<port>, not the Service.
            "--cert-extra-san=127.0.0.1".to_owned(),
        ]
        .into();
        command.extend(extra_args.iter().cloned());
        // No pooled connections: a pooled connection belongs to the runtime that opened it, and
        // each test has its own runtime.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(Self { process: None, command, kubeconfig, log, webhook_port, metrics_port, http })
    }

    /// Starts the process and waits until it answers `/healthz`.
    ///
    /// # Errors
    /// When it exits or does not answer within a minute.
    pub async fn start(&mut self) -> Result<()> {
        if self.process.as_mut().is_some_and(|p| p.exited().is_none()) {
            return Ok(());
        }
        let mut command = Command::new(&self.command[0]);
        command
            .args(&self.command[1..])
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "ARCGUARD_LOG",
                std::env::var("ARCGUARD_E2E_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            // Plain text in the log files.
            .env("NO_COLOR", "1")
            .env_remove("ARCGUARD_NAMESPACE")
            .env_remove("ARCGUARD_CLUSTER");
        let process = self.process.insert(Proc::spawn("arcguard", command, &self.log)?);
        let start = Instant::now();
        loop {
            if let Some(status) = process.exited() {
                bail!("arcguard exited ({status})\n{}", process.log_tail(60));
            }
            let url = format!("http://127.0.0.1:{}/healthz", self.metrics_port);
            if self.http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("arcguard did not answer /healthz\n{}", process.log_tail(60));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops it with SIGTERM (SIGKILL after 30 s).
    pub async fn stop(&mut self) {
        if let Some(process) = self.process.as_mut() {
            process.stop(Duration::from_secs(30)).await;
        }
    }

    /// Kills it with SIGKILL (a crash: no graceful shutdown).
    pub fn kill(&mut self) {
        if let Some(process) = self.process.as_mut() {
            process.kill();
        }
    }

    /// Whether `/readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        self.http.get(url).send().await.is_ok_and(|r| r.status().is_success())
    }

    /// Waits until `/readyz` answers 200.
    ///
    /// # Errors
    /// After `timeout`, with the end of the log.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.is_ready().await {
            if start.elapsed() > timeout {
                bail!("arcguard not ready after {timeout:?}\n{}", self.log_tail(80));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The `/metrics` text.
    ///
    /// # Errors
    /// When it is not reachable.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        Ok(self.http.get(url).send().await?.error_for_status()?.text().await?)
    }

    /// The value of the first metric line starting with `prefix` (name and labels), 0 when absent.
    ///
    /// # Errors
    /// When the metrics are not reachable.
    pub async fn metric(&self, prefix: &str) -> Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .filter(|line| line.starts_with(prefix))
            .find_map(|line| line.rsplit(' ').next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0))
    }

    /// The end of the log.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.as_ref().map(|p| p.log_tail(lines)).unwrap_or_default()
    }

    /// The HTTPS webhook base URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.webhook_port)
    }
}
