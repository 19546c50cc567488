//! Reading images from OCI registries for imageProvenance: the adapter that gathers an
//! [`ImageFact`] for every image a request's policies ask about, through the OCI distribution
//! API (`oci-client`), within a deadline, from a bounded cache when it can.
//!
//! - **Access**: anonymous pulls (a Bearer token challenge is answered anonymously); HTTPS
//!   verified against the system roots plus the configured CA certificates; plain HTTP only
//!   for registries named for it (development).
//! - **Deadline**: each image is read within [`RegistryConfig::deadline`] (default 3 s, below
//!   the webhooks' `timeoutSeconds: 5`), all images of a request side by side. A read that
//!   misses it goes on in the background (up to [`READ_CAP`]) and fills the cache for the
//!   apiserver's retry; the request is answered at once with "could not be read".
//! - **Cache**: what a digest resolves to never changes, so a fact read by digest is kept
//!   [`DIGEST_TTL`]; a tag moves, so a fact read by tag is kept [`TAG_TTL`] (and seeds the
//!   digest's entry, which the validating webhook reads after the mutating one pinned it); a
//!   refusal is kept [`REFUSED_TTL`]; a registry that could not be read is not cached. At
//!   most [`CACHE_LIMIT`] entries: beyond it the cache is emptied. Concurrent requests for
//!   one image share one read.
//!
//! What the registry serves is checked against its digest by oci-client (the body must hash
//! to the `Docker-Content-Digest` header and to a digest in the reference); the config blob
//! against its descriptor.

pub mod manifest;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::{BoxFuture, FutureExt as _, Shared};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::rules::provenance::{ImageFact, RegistryImage};
use crate::server::ImageSource;

/// Default time one image may take to read.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3);
/// How long a read that missed its request's deadline may go on to fill the cache.
pub const READ_CAP: Duration = Duration::from_secs(30);
/// How long a fact read by digest is reused.
pub const DIGEST_TTL: Duration = Duration::from_secs(600);
/// How long a fact read by tag is reused: a tag moved in the registry is seen within this.
pub const TAG_TTL: Duration = Duration::from_secs(30);
/// How long a refusal (no such image, access denied) is reused.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);
/// Cached facts kept at most; the cache is emptied beyond it.
pub const CACHE_LIMIT: usize = 10_000;

/// How registries are reached.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// PEM CA certificates trusted besides the system roots (a private registry's CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Registries (`host[:port]`) read over plain HTTP instead of HTTPS: development only.
    pub plain_http: Vec<String>,
    /// Time one image may take to read.
    pub deadline: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self { ca_pem: None, plain_http: Vec::new(), deadline: DEFAULT_DEADLINE }
    }
}

/// Why registry access cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The CA file holds no PEM certificate, or one that does not parse.
    #[error("the registry CA bundle holds no valid PEM certificate: {0}")]
    Ca(String),
    /// The HTTP client cannot be built.
    #[error("the registry client cannot be built: {0}")]
    Client(#[from] OciDistributionError),
}

type InFlight = (Instant, Shared<BoxFuture<'static, ImageFact>>);

/// Registry access with its cache; one per process.
pub struct Registries {
    client: Client,
    deadline: Duration,
    cache: Mutex<HashMap<String, (Instant, ImageFact)>>,
    in_flight: Mutex<HashMap<String, InFlight>>,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

impl Registries {
    /// Registry access as configured.
    ///
    /// # Errors
    /// [`RegistryError`] for a CA bundle without certificates, or a client that cannot be built.
    pub fn new(config: &RegistryConfig) -> Result<Arc<Self>, RegistryError> {
        // reqwest takes the process's default rustls provider and panics without one; ring is
        // the only provider compiled in (an error means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut extra_root_certificates = Vec::new();
        if let Some(pem) = &config.ca_pem {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| RegistryError::Ca(e.to_string()))?;
                extra_root_certificates
                    .push(Certificate { encoding: CertificateEncoding::Der, data: cert.to_vec() });
            }
            if extra_root_certificates.is_empty() {
                return Err(RegistryError::Ca("no CERTIFICATE block".to_owned()));
            }
        }
        let protocol = if config.plain_http.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(config.plain_http.clone())
        };
        let client = Client::try_from(ClientConfig {
            protocol,
            extra_root_certificates,
            // Manifests are read by digest or tag, never resolved to a platform by the client.
            platform_resolver: None,
            connect_timeout: Some(config.deadline),
            read_timeout: Some(config.deadline),
            user_agent: concat!("arcguard/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })?;
        Ok(Arc::new(Self {
            client,
            deadline: config.deadline,
            cache: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }))
    }

    /// The facts for `keys` ([`crate::rules::provenance::lookup_key`]s), read side by side,
    /// each within the deadline. An image read by tag is also answered under the digest it
    /// resolved to, the key its pinned form is read by.
    pub async fn lookup(self: &Arc<Self>, keys: &BTreeSet<String>) -> BTreeMap<String, ImageFact> {
        let read = futures::future::join_all(
            keys.iter().map(|key| async move { (key.clone(), self.fact(key).await) }),
        )
        .await;
        let mut facts = BTreeMap::new();
        for (key, fact) in read {
            if let ImageFact::Found(image) = &fact
                && let Some((name, _)) = split_tag(&key)
            {
                facts.insert(format!("{name}@{}", image.digest), fact.clone());
            }
            facts.insert(key, fact);
        }
        facts
    }

    /// One image's fact: from the cache, from a read already in flight, or from a new read.
    async fn fact(self: &Arc<Self>, key: &str) -> ImageFact {
        if let Some(fact) = self.cached(key) {
            return fact;
        }
        let read = self.shared_read(key);
        match tokio::time::timeout(self.deadline, read).await {
            Ok(fact) => fact,
            Err(_) => {
                ImageFact::Unreachable(format!("no answer within {} ms", self.deadline.as_millis()))
            }
        }
    }

    fn cached(&self, key: &str) -> Option<ImageFact> {
        let cache = self.cache.lock().ok()?;
        let (expires, fact) = cache.get(key)?;
        (Instant::now() < *expires).then(|| fact.clone())
    }

    /// The read in flight for `key`, or a new one spawned so that it completes (and fills the
    /// cache) even when every request waiting on it has given up.
    fn shared_read(self: &Arc<Self>, key: &str) -> Shared<BoxFuture<'static, ImageFact>> {
        let Ok(mut in_flight) = self.in_flight.lock() else {
            return futures::future::ready(ImageFact::Unreachable(
                "the registry cache is unavailable".to_owned(),
            ))
            .boxed()
            .shared();
        };
        if let Some((started, read)) = in_flight.get(key)
            && started.elapsed() < READ_CAP
        {
            return read.clone();
        }
        let this = Arc::clone(self);
        let owned = key.to_owned();
        let task = tokio::spawn(async move {
            let fact = match tokio::time::timeout(READ_CAP, this.read(&owned)).await {
                Ok(fact) => fact,
                Err(_) => {
                    ImageFact::Unreachable(format!("no answer within {} s", READ_CAP.as_secs()))
                }
            };
            this.remember(&owned, &fact);
            if let Ok(mut in_flight) = this.in_flight.lock() {
                in_flight.remove(&owned);
            }
            fact
        });
        let read = async move {
            task.await.unwrap_or_else(|error| {
                ImageFact::Unreachable(format!("the registry read failed: {error}"))
            })
        }
        .boxed()
        .shared();
        in_flight.insert(key.to_owned(), (Instant::now(), read.clone()));
        read
    }

    fn remember(&self, key: &str, fact: &ImageFact) {
        let ttl = match fact {
            ImageFact::Found(_) if key.contains('@') => DIGEST_TTL,
            ImageFact::Found(_) => TAG_TTL,
            ImageFact::Refused(_) => REFUSED_TTL,
            ImageFact::Unreachable(_) => return,
        };
        let Ok(mut cache) = self.cache.lock() else { return };
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        let now = Instant::now();
        cache.insert(key.to_owned(), (now + ttl, fact.clone()));
        // The digest a tag resolved to is what the mutating webhook pins: the validating
        // webhook then reads it by digest.
        if let ImageFact::Found(image) = fact
            && let Some((name, _tag)) = split_tag(key)
        {
            cache.insert(format!("{name}@{}", image.digest), (now + DIGEST_TTL, fact.clone()));
        }
    }

    /// Reads an image from its registry: its manifest (or index) and, for a single image,
    /// its config.
    async fn read(&self, key: &str) -> ImageFact {
        let reference: Reference = match key.parse() {
            Ok(reference) => reference,
            Err(error) => return ImageFact::Refused(format!("not a registry reference: {error}")),
        };
        let auth = RegistryAuth::Anonymous;
        let (body, digest) =
            match self.client.pull_manifest_raw(&reference, &auth, &manifest::ACCEPTED).await {
                Ok(pulled) => pulled,
                Err(error) => return classify(&error),
            };
        let platforms = match manifest::parse(&body) {
            Ok(manifest::Parsed::Index(platforms)) => platforms,
            Ok(manifest::Parsed::Image { config_digest, config_size }) => {
                match self.config(&reference, &config_digest, config_size).await {
                    Ok(platform) => vec![platform],
                    Err(fact) => return fact,
                }
            }
            Err(error) => return ImageFact::Refused(error.to_string()),
        };
        ImageFact::Found(RegistryImage { digest, platforms })
    }

    /// The platform named by a single image's config blob, read up to its declared size.
    async fn config(
        &self,
        reference: &Reference,
        digest: &str,
        size: u64,
    ) -> Result<crate::rules::provenance::Platform, ImageFact> {
        let sized =
            self.client.pull_blob_stream(reference, digest).await.map_err(|e| classify(&e))?;
        let mut body = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut stream = sized.stream;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ImageFact::Refused(format!("the image config {digest} does not verify: {e}"))
            })?;
            if (body.len() + chunk.len()) as u64 > size.min(manifest::CONFIG_MAX_BYTES) {
                return Err(ImageFact::Refused(format!(
                    "the image config {digest} is longer than the {size} bytes its manifest declares"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        manifest::config_platform(&body).map_err(|e| ImageFact::Refused(e.to_string()))
    }
}

impl ImageSource for Arc<Registries> {
    fn lookup<'a>(
        &'a self,
        keys: &'a BTreeSet<String>,
    ) -> BoxFuture<'a, BTreeMap<String, ImageFact>> {
        Box::pin(Registries::lookup(self, keys))
    }
}

/// `registry/repository` and the tag of a key read by tag; `None` for a key read by digest.
fn split_tag(key: &str) -> Option<(&str, &str)> {
    if key.contains('@') {
        return None;
    }
    let slash = key.rfind('/')?;
    let colon = key[slash..].find(':')? + slash;
    Some((&key[..colon], &key[colon + 1..]))
}

/// An error from the registry as a fact: an answer about the image (not found, access denied,
/// content that does not match its digest) is a refusal; no answer is unreachable.
fn classify(error: &OciDistributionError) -> ImageFact {
    use OciDistributionError as E;
    match error {
        E::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| {
                    // The code as the distribution spec spells it (MANIFEST_UNKNOWN).
                    let code = serde_json::to_value(&e.code)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| format!("{:?}", e.code));
                    if e.message.is_empty() { code } else { format!("{code} ({})", e.message) }
                })
                .collect();
            ImageFact::Refused(format!("the registry answered {}", codes.join("; ")))
        }
        E::ImageManifestNotFoundError(what) => {
            ImageFact::Refused(format!("the manifest was not found: {what}"))
        }
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => ImageFact::Refused(
            "the registry refused an anonymous pull (401 Unauthorized)".to_owned(),
        ),
        E::ServerError { code, .. } if (400..500).contains(code) => {
            ImageFact::Refused(format!("the registry answered HTTP {code}"))
        }
        E::ServerError { code, .. } => {
            ImageFact::Unreachable(format!("the registry answered HTTP {code}"))
        }
        E::DigestError(error) => ImageFact::Refused(format!(
            "the registry served content that does not match its digest: {error}"
        )),
        E::RequestError(error) => ImageFact::Unreachable(request_error(error)),
        other => ImageFact::Refused(other.to_string()),
    }
}

/// A transport error with its causes (the TLS or connection reason is in the source chain).
fn request_error(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    fn sha256(bytes: &[u8]) -> String {
        let hash = ring::digest::digest(&ring::digest::SHA256, bytes);
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    /// A plain-HTTP registry serving one index as `team/app:1` (and by digest), counting the
    /// manifest requests it answers; with `hang`, it accepts connections and never answers.
    async fn mock_registry(hang: bool) -> (String, Arc<AtomicUsize>, String) {
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX,
            "manifests": [{"mediaType": manifest::OCI_MANIFEST, "digest": "sha256:aa", "size": 1,
                           "platform": {"os": "windows", "architecture": "amd64"}}]})
        .to_string();
        let digest = sha256(index.as_bytes());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let served = Arc::new(AtomicUsize::new(0));
        let (count, body, served_digest) = (Arc::clone(&served), index, digest.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                if hang {
                    held.push(socket);
                    continue;
                }
                let (count, body, digest) =
                    (Arc::clone(&count), body.clone(), served_digest.clone());
                tokio::spawn(async move {
                    let mut buffer = vec![0; 8192];
                    loop {
                        let Ok(n) = socket.read(&mut buffer).await else { return };
                        if n == 0 {
                            return;
                        }
                        let head = String::from_utf8_lossy(&buffer[..n]).to_string();
                        let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                        let response = if path.starts_with("/v2/team/app/manifests/") {
                            count.fetch_add(1, Ordering::SeqCst);
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ndocker-content-digest: {digest}\r\ncontent-length: {}\r\n\r\n{body}",
                                manifest::OCI_INDEX,
                                body.len()
                            )
                        } else if path == "/v2/" {
                            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_owned()
                        } else {
                            let error = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
                            format!(
                                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{error}",
                                error.len()
                            )
                        };
                        if socket.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (host, served, digest)
    }

    fn registries(host: &str, deadline: Duration) -> Arc<Registries> {
        Registries::new(&RegistryConfig {
            ca_pem: None,
            plain_http: vec![host.to_owned()],
            deadline,
        })
        .expect("client")
    }

    #[tokio::test]
    async fn facts_are_read_once_and_answered_under_tag_and_digest() {
        let (host, served, digest) = mock_registry(false).await;
        let registries = registries(&host, DEFAULT_DEADLINE);
        let tag = format!("{host}/team/app:1");
        let missing = format!("{host}/team/missing:1");
        let keys = BTreeSet::from([tag.clone(), missing.clone()]);
        let facts = registries.lookup(&keys).await;
        let found = ImageFact::Found(RegistryImage {
            digest: digest.clone(),
            platforms: vec![crate::rules::provenance::Platform {
                os: "windows".into(),
                architecture: "amd64".into(),
                variant: None,
                os_version: None,
            }],
        });
        assert_eq!(facts.get(&tag), Some(&found));
        // The pinned form's key is answered from the same read.
        assert_eq!(facts.get(&format!("{host}/team/app@{digest}")), Some(&found));
        assert_eq!(
            facts.get(&missing),
            Some(&ImageFact::Refused(
                "the registry answered MANIFEST_UNKNOWN (manifest unknown)".into()
            ))
        );
        assert_eq!(served.load(Ordering::SeqCst), 1);
        // Both keys again, and the digest's: all from the cache.
        let again = BTreeSet::from([tag.clone(), format!("{host}/team/app@{digest}")]);
        let facts = registries.lookup(&again).await;
        assert!(facts.values().all(|fact| *fact == found), "{facts:?}");
        assert_eq!(served.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_registry_that_never_answers_is_unreachable_after_the_deadline() {
        let (host, _, _) = mock_registry(true).await;
        let registries = registries(&host, Duration::from_millis(300));
        let key = format!("{host}/team/app:1");
        let facts = tokio::time::timeout(
            Duration::from_secs(20),
            registries.lookup(&BTreeSet::from([key.clone()])),
        )
        .await
        .expect("the lookup ends at its deadline, not when the registry answers");
        assert!(matches!(facts.get(&key), Some(ImageFact::Unreachable(_))), "{facts:?}");
    }

    #[test]
    fn splits_keys_read_by_tag() {
        assert_eq!(
            split_tag("localhost:5000/team/app:1.0"),
            Some(("localhost:5000/team/app", "1.0"))
        );
        assert_eq!(
            split_tag("docker.io/library/nginx:latest"),
            Some(("docker.io/library/nginx", "latest"))
        );
        assert_eq!(split_tag("localhost:5000/app@sha256:ab"), None);
    }
}
