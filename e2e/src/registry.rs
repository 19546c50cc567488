//! A real OCI registry on loopback: CNCF Distribution's `registry` (built by
//! `e2e/build-tools.sh registry`), serving HTTPS with a CA of its own, filesystem storage in a
//! scratch folder. Images and multi-platform indexes are pushed through the distribution API
//! as any client pushes them (blob upload, then manifest PUT).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;

use crate::process::{Proc, Scratch, free_port};
use crate::token_service::{self, TokenService};
use crate::tools::tool;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A running registry; dropping it stops the process and removes its storage.
#[derive(Debug)]
pub struct Registry {
    process: Proc,
    /// `127.0.0.1:<port>`: the host part of image references.
    pub host: String,
    /// Path of the PEM CA certificate that signed the registry's serving certificate.
    pub ca_path: std::path::PathBuf,
    /// The user and password of a registry started with [`Registry::start_private`] or
    /// [`Registry::start_token`].
    pub credentials: Option<(String, String)>,
    /// The token service of a registry started with [`Registry::start_token`].
    pub token_service: Option<TokenService>,
    http: reqwest::Client,
    _scratch: Scratch,
}

/// How a registry authenticates its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    /// It does not: anyone may pull and push.
    None,
    /// Basic authorization against an htpasswd file.
    Htpasswd,
    /// Bearer tokens from a token service (distribution's token authentication).
    Token,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl Registry {
    /// Starts the registry on a free port and waits until `/v2/` answers.
    ///
    /// # Errors
    /// When the binary cannot be built, the certificates made, or the registry does not answer
    /// within a minute.
    pub async fn start() -> Result<Self> {
        Self::launch(Auth::None).await
    }

    /// Starts a registry that serves only authenticated clients (htpasswd, one user that the
    /// registry provisions and logs), as a private registry does.
    ///
    /// # Errors
    /// As [`Registry::start`], or when the provisioned password is not in the log.
    pub async fn start_private() -> Result<Self> {
        Self::launch(Auth::Htpasswd).await
    }

    /// Starts a registry that serves only clients with a token from its token service
    /// ([`TokenService`], on its own port, HTTPS with the registry's certificate), which grants
    /// tokens to one user: a private registry as Docker Hub, Harbor or a cloud registry run
    /// one. The registry's `401` names the service as its realm.
    ///
    /// # Errors
    /// As [`Registry::start`], or when the token service cannot start.
    pub async fn start_token() -> Result<Self> {
        Self::launch(Auth::Token).await
    }

    async fn launch(auth: Auth) -> Result<Self> {
        let private = auth != Auth::None;
        let binary = tool("registry")?;
        let scratch = Scratch::new("registry")?;
        let dir = scratch.path();
        let port = free_port()?;
        let host = format!("127.0.0.1:{port}");

        let ca_key = KeyPair::generate().context("registry CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, "arcguard e2e registry CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        ca_params.not_before = now - time::Duration::minutes(5);
        ca_params.not_after = now + time::Duration::days(2);
        let ca_cert = ca_params.self_signed(&ca_key).context("registry CA certificate")?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().context("registry key")?;
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, "registry");
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(2);
        let cert = params.signed_by(&key, &issuer).context("registry certificate")?;
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca_cert.pem())?;
        std::fs::write(dir.join("tls.crt"), cert.pem())?;
        std::fs::write(dir.join("tls.key"), key.serialize_pem())?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n  tls:\n    certificate: {crt}\n    key: {key}\n",
            data = dir.join("data").display(),
            crt = dir.join("tls.crt").display(),
            key = dir.join("tls.key").display(),
        );
        let mut token_service = None;
        match auth {
            Auth::None => {}
            // A missing htpasswd file is provisioned with user `docker` and a random password,
            // logged once (distribution registry/auth/htpasswd).
            Auth::Htpasswd => config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: arcguard-e2e\n    path: {}\n",
                dir.join("htpasswd").display()
            )),
            Auth::Token => {
                let password = digest(format!("{port} {:?}", Instant::now()).as_bytes());
                let service = TokenService::start(
                    &cert.pem(),
                    &key.serialize_pem(),
                    ("puller".to_owned(), password[7..39].to_owned()),
                )
                .await?;
                std::fs::write(dir.join("token-signer.crt"), &service.signer_pem)?;
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    service.realm,
                    token_service::SERVICE,
                    token_service::ISSUER,
                    dir.join("token-signer.crt").display()
                ));
                token_service = Some(service);
            }
        }
        std::fs::write(dir.join("config.yml"), config)?;

        let mut command = Command::new(binary);
        // No OpenTelemetry export (it would dial localhost:4318 every few seconds).
        command.arg("serve").arg(dir.join("config.yml")).env("OTEL_TRACES_EXPORTER", "none");
        let mut process = Proc::spawn("registry", command, &dir.join("registry.log"))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca_cert.pem().as_bytes())?)
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()?;
        let start = Instant::now();
        loop {
            if let Some(status) = process.exited() {
                bail!("the registry exited ({status})\n{}", process.log_tail(40));
            }
            let answered = http.get(format!("https://{host}/v2/")).send().await;
            // A private registry answers 401 until asked with credentials.
            if answered.is_ok_and(|r| r.status().is_success() || (private && r.status() == 401)) {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the registry did not answer /v2/\n{}", process.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let credentials = if let Some(service) = &token_service {
            Some(service.user())
        } else if private {
            let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
            let password = log
                .split_whitespace()
                .find_map(|field| field.strip_prefix("password="))
                .map(|p| p.trim_matches('"').to_owned())
                .context("the private registry logged no provisioned password")?;
            Some(("docker".to_owned(), password))
        } else {
            None
        };
        Ok(Self { process, host, ca_path, credentials, token_service, http, _scratch: scratch })
    }

    /// A request to the registry, with its credentials when it is private: a token for the
    /// repository `url` names (pull and push) from the token service, or Basic authorization.
    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let token = self.token_service.as_ref().and_then(|service| {
            let path = url.split_once("/v2/")?.1;
            let end = path.find("/blobs/").or_else(|| path.find("/manifests/"))?;
            service.mint(&path[..end], &["pull", "push"]).ok()
        });
        let request = self.http.request(method, url);
        match (&self.credentials, token) {
            (_, Some(token)) => request.bearer_auth(token),
            (Some((user, password)), None) => request.basic_auth(user, Some(password)),
            (None, None) => request,
        }
    }

    /// A `kubernetes.io/dockerconfigjson` Secret's `.dockerconfigjson` for this registry's
    /// credentials (`None` for a public registry).
    pub fn docker_config(&self) -> Option<String> {
        let (user, password) = self.credentials.as_ref()?;
        Some(
            serde_json::json!({"auths": {&self.host: {"username": user, "password": password}}})
                .to_string(),
        )
    }

    /// Uploads a blob (POST, then PUT with its digest) and returns its digest.
    ///
    /// # Errors
    /// When the registry refuses it.
    pub async fn push_blob(&self, repository: &str, bytes: Vec<u8>) -> Result<String> {
        let digest = digest(&bytes);
        let started = self
            .request(
                reqwest::Method::POST,
                format!("https://{}/v2/{repository}/blobs/uploads/", self.host),
            )
            .send()
            .await?;
        ensure!(started.status().as_u16() == 202, "blob upload start: {}", started.status());
        let location = started
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .context("the upload has no Location")?
            .to_owned();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("https://{}{location}", self.host)
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let done = self
            .request(reqwest::Method::PUT, format!("{location}{separator}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await?;
        ensure!(done.status().as_u16() == 201, "blob upload: {}", done.status());
        Ok(digest)
    }

    /// PUTs a manifest under `reference` (a tag or its digest) and returns its digest.
    ///
    /// # Errors
    /// When the registry refuses it.
    pub async fn push_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String> {
        let response = self
            .request(
                reqwest::Method::PUT,
                format!("https://{}/v2/{repository}/manifests/{reference}", self.host),
            )
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await?;
        let status = response.status();
        ensure!(status.as_u16() == 201, "manifest PUT: {status}: {}", response.text().await?);
        Ok(digest(body))
    }

    /// Pushes a single-platform image (a config naming `os`/`arch` and one small layer whose
    /// content is `marker`) under `tag` and returns the manifest's digest.
    ///
    /// # Errors
    /// When the registry refuses a part.
    pub async fn push_image(
        &self,
        repository: &str,
        tag: &str,
        (os, arch): (&str, &str),
        marker: &str,
    ) -> Result<String> {
        let manifest = self.image_manifest(repository, (os, arch), marker).await?;
        self.push_manifest(repository, tag, OCI_MANIFEST, &manifest).await
    }

    /// Pushes one image per platform (by digest) and an index of them under `tag`; returns the
    /// index's digest.
    ///
    /// # Errors
    /// When the registry refuses a part.
    pub async fn push_index(
        &self,
        repository: &str,
        tag: &str,
        platforms: &[(&str, &str)],
    ) -> Result<String> {
        let mut entries = Vec::new();
        for (os, arch) in platforms {
            let manifest = self.image_manifest(repository, (os, arch), tag).await?;
            let digest = digest(&manifest);
            self.push_manifest(repository, &digest, OCI_MANIFEST, &manifest).await?;
            entries.push(json!({"mediaType": OCI_MANIFEST, "digest": digest,
                "size": manifest.len(), "platform": {"os": os, "architecture": arch}}));
        }
        let index = serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
        )?;
        self.push_manifest(repository, tag, OCI_INDEX, &index).await
    }

    async fn image_manifest(
        &self,
        repository: &str,
        (os, arch): (&str, &str),
        marker: &str,
    ) -> Result<Vec<u8>> {
        let layer = format!("{repository} {os}/{arch} {marker}").into_bytes();
        let layer_size = layer.len();
        let layer_digest = self.push_blob(repository, layer).await?;
        let config = serde_json::to_vec(&json!({"architecture": arch, "os": os,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}))?;
        let config_size = config.len();
        let config_digest = self.push_blob(repository, config).await?;
        Ok(serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
        }))?)
    }

    /// A manifest and its media type.
    ///
    /// # Errors
    /// When the registry does not serve it.
    pub async fn manifest(&self, repository: &str, reference: &str) -> Result<(Vec<u8>, String)> {
        let response = self
            .request(
                reqwest::Method::GET,
                format!("https://{}/v2/{repository}/manifests/{reference}", self.host),
            )
            .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
            .send()
            .await?;
        ensure!(response.status().is_success(), "GET manifest {reference}: {}", response.status());
        let media_type = response
            .headers()
            .get("content-type")
            .and_then(|t| t.to_str().ok())
            .unwrap_or(OCI_MANIFEST)
            .to_owned();
        Ok((response.bytes().await?.to_vec(), media_type))
    }

    /// Copies a manifest and the blobs it names from one repository into another, under
    /// `tag`: what an attacker with push rights can do with a signature made for another image.
    ///
    /// # Errors
    /// When the registry refuses a part.
    pub async fn copy(
        &self,
        (from, reference): (&str, &str),
        (to, tag): (&str, &str),
    ) -> Result<()> {
        let (body, media_type) = self.manifest(from, reference).await?;
        let manifest: serde_json::Value = serde_json::from_slice(&body)?;
        let mut digests = Vec::new();
        if let Some(config) = manifest.get("config") {
            digests.extend(config["digest"].as_str().map(str::to_owned));
        }
        for layer in manifest["layers"].as_array().into_iter().flatten() {
            digests.extend(layer["digest"].as_str().map(str::to_owned));
        }
        for digest in digests {
            let blob = self
                .request(
                    reqwest::Method::GET,
                    format!("https://{}/v2/{from}/blobs/{digest}", self.host),
                )
                .send()
                .await?
                .bytes()
                .await?;
            self.push_blob(to, blob.to_vec()).await?;
        }
        self.push_manifest(to, tag, &media_type, &body).await?;
        Ok(())
    }

    /// The last lines of the registry's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
