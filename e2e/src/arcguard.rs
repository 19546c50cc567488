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
    extra_args: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
    /// The HTTPS webhook port on 127.0.0.1.
    pub webhook_port: u16,
    /// The plain-HTTP metrics and probe port on 127.0.0.1.
    pub metrics_port: u16,
    http: reqwest::Client,
}

impl Arcguard {
    /// Picks the ports; [`Arcguard::start`] runs it as replica `identity` (its pod name).
    /// `extra_args` are appended to the command line.
    ///
    /// # Errors
    /// When no port is free or arcguard cannot be built.
    pub fn new(
        identity: &str,
        kubeconfig: PathBuf,
        log: PathBuf,
        extra_args: &[String],
    ) -> Result<Self> {
        let (webhook_port, metrics_port) = (free_port()?, free_port()?);
        let mut command: Vec<String> = [
            bins::arcguard_bin()?.display().to_string(),
            "serve".to_owned(),
            "--cluster".to_owned(),
            format!("--namespace={NAMESPACE}"),
            format!("--pod-name={identity}"),
            format!("--addr=127.0.0.1:{webhook_port}"),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            // The apiserver dials https://127.0.0.1:<port>, not the Service.
            "--cert-extra-san=127.0.0.1".to_owned(),
        ]
        .into();
        // Scenarios wait on the pod labeller; a pass over a test cluster costs little. A caller
        // that sets its own interval (a benchmark, at the shipped default) keeps it.
        if !extra_args.iter().any(|a| a.starts_with("--label-pods-interval")) {
            command.push("--label-pods-interval=2s".to_owned());
        }
        command.extend(extra_args.iter().cloned());
        let extra_args = extra_args.to_vec();
        // No pooled connections: a pooled connection belongs to the runtime that opened it, and
        // each test has its own runtime.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(Self {
            process: None,
            command,
            extra_args,
            kubeconfig,
            log,
            webhook_port,
            metrics_port,
            http,
        })
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

    /// The process id while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Proc::pid)
    }

    /// The file its output goes to.
    #[must_use]
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// Whether the process runs (started and not exited).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.exited().is_none())
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

    /// Opens a new TLS connection to the webhook port trusting only the CAs in `ca_pem`, as
    /// the apiserver does with a `caBundle`, and asks for `/healthz`.
    ///
    /// # Errors
    /// When the handshake fails (the error says why, e.g. an expired certificate).
    pub async fn handshake_trusting(&self, ca_pem: &[u8]) -> Result<()> {
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5));
        for certificate in reqwest::Certificate::from_pem_bundle(ca_pem)? {
            builder = builder.add_root_certificate(certificate);
        }
        let response = builder.build()?.get(format!("{}/healthz", self.url())).send().await?;
        if !response.status().is_success() {
            bail!("healthz over TLS answered {}", response.status());
        }
        Ok(())
    }

    /// The whole log so far (of every start).
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the log.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.as_ref().map(|p| p.log_tail(lines)).unwrap_or_default()
    }

    /// Another replica with the same credentials and arguments, its own ports and `identity`,
    /// logging next to this one. Not started.
    ///
    /// # Errors
    /// When no port is free.
    pub fn replica(&self, identity: &str) -> Result<Self> {
        let log = self.log.with_file_name(format!("arcguard-{identity}.log"));
        Self::new(identity, self.kubeconfig.clone(), log, &self.extra_args)
    }

    /// The HTTPS webhook base URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.webhook_port)
    }
}
