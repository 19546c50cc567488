//! etcd and kube-apiserver on free loopback ports, with their own certificates and an admin
//! kubeconfig.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::bins;
use crate::pki::ControlPlanePki;
use crate::process::{Proc, Scratch, free_port};

/// How long etcd and kube-apiserver get to become ready (cold starts on 2 busy cores are slow).
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// The audit log's file name in the scratch folder.
const AUDIT_LOG: &str = "audit.log";

/// The user the apiserver names arcguard's ServiceAccount token as.
pub const ARCGUARD_USER: &str = "system:serviceaccount:arcguard-system:arcguard";

/// The audit policy: every request of arcguard's ServiceAccount at Metadata level (verb,
/// resource, namespace, name, the authorizer's decision; no bodies), nothing else. So
/// `tests/rbac.rs` can check the shipped RBAC against the calls arcguard really makes. The
/// RequestReceived stage is left out: ResponseStarted (watches) and ResponseComplete carry the
/// same request with its decision.
fn audit_policy() -> String {
    format!(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n  users: [\"{ARCGUARD_USER}\"]\n- level: None\n"
    )
}

/// A running etcd and kube-apiserver. Dropping it stops both and removes their data.
#[derive(Debug)]
pub struct ControlPlane {
    apiserver: Proc,
    /// kube-apiserver's program and arguments, to start it again on the same port.
    apiserver_command: (PathBuf, Vec<String>),
    etcd: Proc,
    /// kube-apiserver's secure port on 127.0.0.1.
    pub port: u16,
    /// The admin kubeconfig (CN=admin, O=system:masters).
    pub kubeconfig: PathBuf,
    /// The certificates.
    pub pki: ControlPlanePki,
    // Last: removed after both processes have stopped.
    scratch: Scratch,
}

impl ControlPlane {
    /// Starts etcd, then kube-apiserver, and waits until the apiserver is ready and the
    /// `default` namespace exists.
    ///
    /// # Errors
    /// When a binary is missing, a process exits, or readiness times out (the message carries
    /// the end of the process's log).
    pub async fn start() -> Result<Self> {
        let bin = bins::controlplane_dir()?;
        let scratch = Scratch::new("cluster")?;
        let dir = scratch.path().to_owned();
        let pki = ControlPlanePki::generate()?;
        let pki_dir = dir.join("pki");
        std::fs::create_dir_all(&pki_dir)?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = pki_dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let ca = write("ca.crt", &pki.ca.cert_pem)?;
        let serving_cert = write("apiserver.crt", &pki.apiserver.cert_pem)?;
        let serving_key = write("apiserver.key", &pki.apiserver.key_pem)?;
        let sa_key = write("sa.key", &pki.service_account_key_pem)?;
        let sa_public = write("sa.pub", &pki.service_account_public_pem)?;
        let audit_policy_file = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy_file, audit_policy())
            .with_context(|| format!("writing {}", audit_policy_file.display()))?;

        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.args([
            "--name=e2e",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls={etcd_url}"),
            &format!("--advertise-client-urls={etcd_url}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=e2e={peer_url}"),
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]);
        let mut etcd = Proc::spawn("etcd", etcd, &dir.join("etcd.log"))?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
        wait_http(&mut etcd, START_TIMEOUT, || async {
            http.get(format!("{etcd_url}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await?;

        let port = free_port()?;
        let advertise = advertise_address();
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", serving_cert.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", ca.display()),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--advertise-address={advertise}"),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--allow-privileged=true".to_owned(),
            // No controller-manager creates default ServiceAccounts.
            "--disable-admission-plugins=ServiceAccount".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            format!("--service-account-issuer=https://127.0.0.1:{port}/"),
            format!("--service-account-key-file={}", sa_public.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            format!("--audit-policy-file={}", audit_policy_file.display()),
            format!("--audit-log-path={}", dir.join(AUDIT_LOG).display()),
            // Each event is written before the request completes: the log is whole when a
            // test reads it.
            "--audit-log-mode=blocking".to_owned(),
        ];
        let apiserver_command = (bin.join("kube-apiserver"), apiserver_args);
        let mut apiserver = spawn_apiserver(&apiserver_command, &dir)?;
        wait_apiserver(&mut apiserver, &pki, port).await?;

        let base = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&base, &pki))?;
        Ok(Self { apiserver, apiserver_command, etcd, port, kubeconfig, pki, scratch })
    }

    /// Kills kube-apiserver (SIGKILL: unavailable at once, no graceful drain); etcd keeps
    /// running with the data.
    pub fn stop_apiserver(&mut self) {
        self.apiserver.kill();
    }

    /// Pauses kube-apiserver with SIGSTOP: hung, not dead. Its connections stay open and
    /// nothing answers, as with an apiserver stuck on a dead etcd or starved of CPU, so clients
    /// see timeouts rather than refused connections. [`ControlPlane::resume_apiserver`]
    /// continues it; dropping the control plane (a failed test) resumes and kills it.
    pub fn pause_apiserver(&mut self) {
        self.apiserver.pause();
    }

    /// Continues a paused kube-apiserver (SIGCONT); does nothing when it is not paused.
    pub fn resume_apiserver(&mut self) {
        self.apiserver.resume();
    }

    /// Starts kube-apiserver again with the same arguments (same port, certificates and
    /// etcd) and waits until it is ready.
    ///
    /// # Errors
    /// When it cannot be started or does not become ready.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.exited().is_none() {
            return Ok(());
        }
        self.apiserver = spawn_apiserver(&self.apiserver_command, self.scratch.path())?;
        wait_apiserver(&mut self.apiserver, &self.pki, self.port).await
    }

    /// A client with the admin kubeconfig. Make one per test: a client's connections belong
    /// to the runtime it was first used on.
    ///
    /// # Errors
    /// When the kubeconfig cannot be read.
    pub async fn client(&self) -> Result<kube::Client> {
        client_for(&self.kubeconfig).await
    }

    /// The audit log (JSON lines, one `audit.k8s.io/v1` Event each) of arcguard's requests;
    /// restarts of kube-apiserver append to it.
    #[must_use]
    pub fn audit_log(&self) -> PathBuf {
        self.scratch.path().join(AUDIT_LOG)
    }

    /// The scratch folder (logs, data, kubeconfig).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    /// The end of the apiserver's and etcd's logs.
    #[must_use]
    pub fn diagnostics(&self, lines: usize) -> String {
        format!("{}{}", self.apiserver.log_tail(lines), self.etcd.log_tail(lines / 4))
    }

    /// Whether both processes still run.
    pub fn is_running(&mut self) -> bool {
        self.apiserver.exited().is_none() && self.etcd.exited().is_none()
    }
}

/// A client for `kubeconfig`.
///
/// # Errors
/// When the kubeconfig cannot be read or used.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

impl ControlPlane {
    /// Writes a kubeconfig that authenticates with `token` (a ServiceAccount's) to `path`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_token_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {}\nusers:\n- name: token\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: token\ncurrent-context: e2e\n",
            self.port,
            STANDARD.encode(&self.pki.ca.cert_pem),
        );
        std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
    }
}

fn kubeconfig_yaml(server: &str, pki: &ControlPlanePki) -> String {
    let b64 = |text: &str| STANDARD.encode(text);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: admin\n    namespace: default\ncurrent-context: e2e\n",
        b64(&pki.ca.cert_pem),
        b64(&pki.admin.cert_pem),
        b64(&pki.admin.key_pem),
    )
}

fn spawn_apiserver(command: &(PathBuf, Vec<String>), dir: &Path) -> Result<Proc> {
    let mut apiserver = Command::new(&command.0);
    apiserver.args(&command.1);
    Proc::spawn("kube-apiserver", apiserver, &dir.join("apiserver.log"))
}

/// Waits until the apiserver is ready and serves the `default` namespace.
async fn wait_apiserver(apiserver: &mut Proc, pki: &ControlPlanePki, port: u16) -> Result<()> {
    let identity = reqwest::Identity::from_pem(
        format!("{}{}", pki.admin.cert_pem, pki.admin.key_pem).as_bytes(),
    )?;
    let https = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.cert_pem.as_bytes())?)
        .identity(identity)
        .build()?;
    let base = format!("https://127.0.0.1:{port}");
    wait_http(apiserver, START_TIMEOUT, || async {
        let ready = https.get(format!("{base}/readyz")).send().await;
        let ready = ready.is_ok_and(|r| r.status().is_success());
        ready
            && https
                .get(format!("{base}/api/v1/namespaces/default"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
    })
    .await
}

/// Polls `ready` until it holds, failing early (with the log) when the process exits.
async fn wait_http<F, Fut>(process: &mut Proc, timeout: Duration, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if let Some(status) = process.exited() {
            bail!("the process exited ({status}) before it was ready\n{}", process.log_tail(60));
        }
        if ready().await {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("not ready after {timeout:?}\n{}", process.log_tail(60));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The address kube-apiserver advertises: `$ARCGUARD_E2E_ADVERTISE_ADDRESS`, else the first
/// non-loopback IPv4 address of this host. Without one it cannot pick an address itself
/// ("Unable to find suitable network address"); nothing dials the advertised address here (no
/// kubelet, no kube-proxy), so any address outside the service range serves, and a
/// documentation address (RFC 5737) stands in.
#[must_use]
pub fn advertise_address() -> IpAddr {
    if let Some(ip) =
        std::env::var("ARCGUARD_E2E_ADVERTISE_ADDRESS").ok().and_then(|v| v.parse().ok())
    {
        return ip;
    }
    host_ipv4().map_or(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 123)), IpAddr::V4)
}

fn host_ipv4() -> Option<Ipv4Addr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that freeifaddrs releases; we only read it in between.
    unsafe {
        if libc::getifaddrs(&raw mut addrs) != 0 {
            return None;
        }
        let mut found = None;
        let mut cursor = addrs;
        while !cursor.is_null() {
            let addr = (*cursor).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let sin = &*addr.cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified() {
                    found = Some(ip);
                    break;
                }
            }
            cursor = (*cursor).ifa_next;
        }
        libc::freeifaddrs(addrs);
        found
    }
}
