//! Size-capped reads of manifests and referrers indexes over the OCI distribution API.
//!
//! oci-client reads a manifest or a referrers index whole, however large the registry says it
//! is: a registry in a policy's scope could make each of the 16 reads in flight hold gigabytes.
//! These reads stop at [`MANIFEST_MAX_BYTES`] and check what they read against its digest as
//! oci-client does.
//!
//! Authorization follows the distribution spec's token flow: a request goes out with the
//! Bearer token cached for its credential and repository, or none; a `401` makes oci-client's
//! `Client::auth` answer the challenge (a Bearer token for the pull scope, or the credential's
//! Basic authorization for a registry that asks for Basic), and the request is sent once more.
//! Tokens are reused for [`TOKEN_TTL`]; one that expires sooner costs one `401`.
//!
//! What oci-client still does: the token handshake, blobs (streamed, capped by the caller).

use std::time::Duration;

use bytes::Bytes;
use oci_client::errors::OciEnvelope;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use registry_http::StatusCode;
use registry_http::header::{ACCEPT, HeaderValue};
use serde::Deserialize;

use super::cache::TtlCache;
use super::json::{self, Kept};
use super::{Access, Failure, transport_failure};

/// The largest manifest or referrers index read, in bytes. Real ones are kilobytes (an image
/// of 100 layers, an index of 20 platforms: under 30 KiB); registries store up to 4 MiB (CNCF
/// Distribution's `maxManifestBodySize`). 1 MiB keeps the 16 reads in flight within 16 MiB,
/// which the memory budget's margin holds (README, "Memory budget").
pub const MANIFEST_MAX_BYTES: u64 = 1024 * 1024;
/// The most of an error answer read for its message.
const ERROR_MAX_BYTES: u64 = 64 * 1024;
/// How long a Bearer token is reused for one credential and repository.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Tokens kept at most; emptied beyond.
const TOKEN_LIMIT: usize = 1024;
/// The header in which a registry names the digest of what it served.
const DIGEST_HEADER: &str = "docker-content-digest";

/// How a request to one repository is authorized.
#[derive(Clone, Debug)]
enum Authorization {
    /// A token from the registry's token service.
    Bearer(String),
    /// The credential's username and password, for a registry that asks for Basic.
    Basic(String, String),
}

/// The capped reader: one HTTP client (connections pooled across credentials; the credential
/// is in each request's headers) and the tokens it was given.
pub struct Fetcher {
    http: registry_http::Client,
    plain_http: Vec<String>,
    tokens: TtlCache<String, Authorization>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("plain_http", &self.plain_http).finish_non_exhaustive()
    }
}

/// One entry of a referrers index (`application/vnd.oci.image.index.v1+json`).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Referrer {
    /// The referrer's manifest digest.
    #[serde(deserialize_with = "json::digest")]
    pub digest: String,
    /// Its artifact type, when the index lists it.
    #[serde(default, deserialize_with = "json::optional_media_type")]
    pub artifact_type: Option<String>,
}

/// Referrers of a referrers index kept (the rest are skipped as read, [`super::json`]): a tag
/// schema index lists every artifact of the image (SBOMs, attestations, signatures), the API's
/// is filtered by type; only the first [`crate::signature::MAX_SIGNATURES`] Notation ones are
/// read.
const REFERRERS_KEPT: usize = 256;

#[derive(Deserialize)]
struct ReferrersIndex {
    #[serde(default)]
    manifests: Kept<Referrer, REFERRERS_KEPT>,
}

impl Fetcher {
    /// A reader over `http` (built as oci-client's clients are: the same roots, timeouts and
    /// user agent), reading the registries in `plain_http` over plain HTTP.
    pub fn new(http: registry_http::Client, plain_http: Vec<String>) -> Self {
        Self { http, plain_http, tokens: TtlCache::new(TOKEN_LIMIT) }
    }

    /// The manifest `reference` names (by digest, or by tag), in one of the `accepted` media
    /// types, and its digest: the registry's `Docker-Content-Digest`, checked against the body,
    /// as is the reference's own digest.
    ///
    /// # Errors
    /// [`Failure::Refused`] for an answer that is not the manifest (not found, denied, over
    /// [`MANIFEST_MAX_BYTES`], not matching its digest); [`Failure::Unreachable`] when the
    /// registry cannot be read.
    pub(crate) async fn manifest(
        &self,
        access: &Access,
        reference: &Reference,
        accepted: &[&str],
    ) -> Result<(Bytes, String), Failure> {
        Ok(self.manifest_get(access, reference, accepted).await?)
    }

    /// [`Self::manifest`], its registry's status kept for the caller to tell a missing
    /// manifest from a failure.
    async fn manifest_get(
        &self,
        access: &Access,
        reference: &Reference,
        accepted: &[&str],
    ) -> Result<(Bytes, String), GetError> {
        let target = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = self.url(reference, &format!("manifests/{target}"));
        let (body, digest) = self.get(access, reference, &url, &accepted.join(", ")).await?;
        let digest = verified_digest(&body, digest.as_deref(), reference.digest())?;
        Ok((body, digest))
    }

    /// The referrers of the image `reference` (by digest) of `artifact_type`: from the
    /// referrers API, or, where the registry has none (`404`), from the referrers tag schema
    /// (`<algorithm>-<hex>`) as the distribution spec's fallback. No referrers is empty.
    ///
    /// # Errors
    /// As [`Self::manifest`].
    pub(crate) async fn referrers(
        &self,
        access: &Access,
        reference: &Reference,
        artifact_type: &str,
    ) -> Result<Vec<Referrer>, Failure> {
        let Some(digest) = reference.digest() else {
            return Err(Failure::Refused("referrers are read for a digest".to_owned()));
        };
        let url = self.url(reference, &format!("referrers/{digest}"));
        let index = match self.get(access, reference, &url, OCI_INDEX).await {
            Ok((body, _)) => body,
            Err(GetError::Status(StatusCode::NOT_FOUND, _)) => {
                let tag = digest.replacen(':', "-", 1);
                let fallback = Reference::with_tag(
                    reference.registry().to_owned(),
                    reference.repository().to_owned(),
                    tag,
                );
                match self.manifest_get(access, &fallback, &[OCI_INDEX]).await {
                    Ok((body, _)) => body,
                    // No tag either: no referrers.
                    Err(GetError::Status(StatusCode::NOT_FOUND, _)) => return Ok(Vec::new()),
                    Err(error) => return Err(error.into()),
                }
            }
            Err(error) => return Err(error.into()),
        };
        let index: ReferrersIndex = serde_json::from_slice(&index)
            .map_err(|e| Failure::Refused(format!("the referrers index does not parse: {e}")))?;
        // A registry may ignore the filter (the spec lets it); filter again.
        Ok(index
            .manifests
            .items
            .into_iter()
            .filter(|r| r.artifact_type.as_deref().is_none_or(|t| t == artifact_type))
            .collect())
    }

    fn url(&self, reference: &Reference, path: &str) -> String {
        let registry = reference.resolve_registry();
        let scheme = if self.plain_http.iter().any(|r| r == registry) { "http" } else { "https" };
        format!("{scheme}://{registry}/v2/{}/{path}", reference.repository())
    }

    /// GETs `url` with the authorization cached for `access` and the repository, answering a
    /// `401` challenge once; the body is read up to [`MANIFEST_MAX_BYTES`].
    async fn get(
        &self,
        access: &Access,
        reference: &Reference,
        url: &str,
        accept: &str,
    ) -> Result<(Bytes, Option<String>), GetError> {
        let key = format!(
            "{} {}/{}",
            access.identity,
            reference.resolve_registry(),
            reference.repository()
        );
        let cached = self.tokens.get(&key);
        let mut response = self.send(url, accept, cached.as_ref()).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let authorization =
                match access.client.auth(reference, &access.auth, RegistryOperation::Pull).await {
                    Ok(Some(token)) => Some(Authorization::Bearer(token)),
                    Ok(None) => match &access.auth {
                        RegistryAuth::Basic(user, password) => {
                            Some(Authorization::Basic(user.clone(), password.clone()))
                        }
                        _ => None,
                    },
                    Err(error) => return Err(GetError::Failure(super::classify(&error))),
                };
            let Some(authorization) = authorization else {
                return Err(GetError::Failure(Failure::Refused(ANONYMOUS_REFUSED.to_owned())));
            };
            self.tokens.insert(key, authorization.clone(), TOKEN_TTL);
            response = self.send(url, accept, Some(&authorization)).await?;
        }
        let status = response.status();
        if status != StatusCode::OK {
            let body = read_capped(&mut response, ERROR_MAX_BYTES).await.unwrap_or_default();
            return Err(GetError::Status(status, body));
        }
        let digest = response
            .headers()
            .get(DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        if response.content_length().is_some_and(|len| len > MANIFEST_MAX_BYTES) {
            return Err(GetError::Failure(too_large()));
        }
        let body = read_capped(&mut response, MANIFEST_MAX_BYTES).await?;
        Ok((body, digest))
    }

    async fn send(
        &self,
        url: &str,
        accept: &str,
        authorization: Option<&Authorization>,
    ) -> Result<registry_http::Response, GetError> {
        let accept = HeaderValue::from_str(accept)
            .map_err(|_| GetError::Failure(Failure::Refused("a bad Accept header".to_owned())))?;
        let mut request = self.http.get(url).header(ACCEPT, accept);
        request = match authorization {
            Some(Authorization::Bearer(token)) => request.bearer_auth(token),
            Some(Authorization::Basic(user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        };
        request.send().await.map_err(|e| GetError::Failure(transport_failure(&e)))
    }
}

/// Why an anonymous pull was refused, and what fixes it.
pub(crate) const ANONYMOUS_REFUSED: &str = "the registry refused an anonymous pull (401 Unauthorized): give the pod, or its service account, an imagePullSecret for this registry (arcguard reads with the credentials the kubelet would use; `serve` on files and `check` read anonymously)";

/// The OCI image index media type, in which referrers are listed.
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Why a GET did not give a body.
#[derive(Debug)]
enum GetError {
    /// The registry answered with a status other than 200, and this (capped) body.
    Status(StatusCode, Bytes),
    /// It could not be read, or its answer was refused already.
    Failure(Failure),
}

impl From<Failure> for GetError {
    fn from(failure: Failure) -> Self {
        Self::Failure(failure)
    }
}

impl From<GetError> for Failure {
    fn from(error: GetError) -> Self {
        match error {
            GetError::Failure(failure) => failure,
            GetError::Status(status, body) => status_failure(status, &body),
        }
    }
}

/// A registry's answer other than 200, as oci-client words it: the distribution spec's error
/// codes when the body carries them; a 4xx is a refusal, except the transient ones
/// ([`is_transient`]), which like a 5xx mean unreachable (never cached, under
/// `onRegistryError`).
fn status_failure(status: StatusCode, body: &[u8]) -> Failure {
    let text = envelope_text(body);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Failure::Refused(format!(
            "the registry refused the pull ({status}){}",
            text.map(|t| format!(": {t}")).unwrap_or_default()
        ));
    }
    let code = status.as_u16();
    if status.is_client_error() && !is_transient(code) {
        return Failure::Refused(match text {
            Some(text) => format!("the registry answered {text}"),
            None => format!("the registry answered HTTP {code}"),
        });
    }
    Failure::Unreachable(match text {
        Some(text) => format!("the registry answered HTTP {code}: {text}"),
        None => format!("the registry answered HTTP {code}"),
    })
}

/// Whether a 4xx status says "not now" rather than "not this": 408 Request Timeout, 425 Too
/// Early and 429 Too Many Requests (a pull rate limit, as Docker Hub's). Counted as refusals,
/// they were violations even under `onRegistryError: Warn` and were cached, so one namespace
/// that spent a registry's shared anonymous quota got every namespace's pods denied.
pub(crate) fn is_transient(status: u16) -> bool {
    matches!(status, 408 | 425 | 429)
}

/// The error codes and messages of a distribution error body (`MANIFEST_UNKNOWN (manifest
/// unknown)`), if it is one.
///
/// Read into its codes and messages only (not oci-client's `OciEnvelope`, whose `detail` is any
/// JSON value), at most [`ERRORS_KEPT`] of them: 64 KiB of tiny values would decode to a
/// megabyte.
fn envelope_text(body: &[u8]) -> Option<String> {
    let envelope: ErrorBody = serde_json::from_slice(body).ok()?;
    let codes: Vec<String> = envelope
        .errors
        .items
        .into_iter()
        .map(|e| if e.message.is_empty() { e.code } else { format!("{} ({})", e.code, e.message) })
        .collect();
    (!codes.is_empty()).then(|| codes.join("; "))
}

/// Errors of an error body quoted, at most.
const ERRORS_KEPT: usize = 8;

/// A distribution error body (`{"errors": [{"code", "message", "detail"}]}`).
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Kept<ErrorEntry, ERRORS_KEPT>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// The codes of a distribution error envelope as the spec spells them, with their messages.
pub(crate) fn envelope_codes(envelope: &OciEnvelope) -> String {
    let codes: Vec<String> = envelope
        .errors
        .iter()
        .map(|e| {
            let code = serde_json::to_value(&e.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{:?}", e.code));
            if e.message.is_empty() { code } else { format!("{code} ({})", e.message) }
        })
        .collect();
    codes.join("; ")
}

fn too_large() -> Failure {
    Failure::Refused(format!(
        "arcguard reads manifests of at most {} MiB, and this one is larger (real manifests are kilobytes)",
        MANIFEST_MAX_BYTES / (1024 * 1024)
    ))
}

/// The body of `response`, at most `cap` bytes, in one allocation of its declared length.
async fn read_capped(response: &mut registry_http::Response, cap: u64) -> Result<Bytes, GetError> {
    let declared = response.content_length().unwrap_or(0).min(cap);
    let mut body = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
    while let Some(chunk) =
        response.chunk().await.map_err(|e| GetError::Failure(transport_failure(&e)))?
    {
        if (body.len() + chunk.len()) as u64 > cap {
            return Err(GetError::Failure(too_large()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// The digest of a manifest: the body must match the registry's digest header and the
/// reference's digest, each in its own algorithm and in lowercase hex; the reference's is the
/// answer, else the header's, else the body's sha256.
fn verified_digest(
    body: &[u8],
    header: Option<&str>,
    reference: Option<&str>,
) -> Result<String, Failure> {
    for digest in [reference, header].into_iter().flatten() {
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return Err(Failure::Refused(format!("{digest:?} is not a digest")));
        };
        let computed = match algorithm {
            "sha256" => ring::digest::digest(&ring::digest::SHA256, body),
            "sha384" => ring::digest::digest(&ring::digest::SHA384, body),
            "sha512" => ring::digest::digest(&ring::digest::SHA512, body),
            other => {
                return Err(Failure::Refused(format!("the digest algorithm {other} is not read")));
            }
        };
        // Digests are lowercase hex (OCI image spec, descriptor.md): another spelling is not
        // the digest, and would not parse when pinned.
        if hex != hex_of(computed.as_ref()) {
            return Err(Failure::Refused(format!(
                "the registry served content that does not match its digest {digest}"
            )));
        }
    }
    // What was asked for by digest is answered by that digest (the distribution spec has the
    // client verify against it); a tag by the registry's digest.
    Ok(reference.or(header).map_or_else(|| crate::signature::sha256(body), str::to_owned))
}

/// `bytes` in lowercase hex.
fn hex_of(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use oci_client::Client;
    use oci_client::client::{ClientConfig, ClientProtocol};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::signature::sha256;

    #[test]
    fn answers_other_than_200_are_refusals_or_outages_with_the_registry_s_words() {
        let envelope = |code: &str, message: &str| {
            serde_json::to_vec(&serde_json::json!({"errors": [{"code": code, "message": message, "detail": [[[]]]}]}))
                .expect("json")
        };
        let refused = |s: &str| Failure::Refused(s.to_owned());
        let unreachable = |s: &str| Failure::Unreachable(s.to_owned());
        let cases = [
            (
                404,
                envelope("MANIFEST_UNKNOWN", "manifest unknown"),
                refused("the registry answered MANIFEST_UNKNOWN (manifest unknown)"),
            ),
            (404, b"not json".to_vec(), refused("the registry answered HTTP 404")),
            (
                401,
                envelope("UNAUTHORIZED", ""),
                refused("the registry refused the pull (401 Unauthorized): UNAUTHORIZED"),
            ),
            // Rate limits and timeouts are "not now": outages, never cached, under onRegistryError.
            (
                429,
                envelope("TOOMANYREQUESTS", "pull rate limit"),
                unreachable("the registry answered HTTP 429: TOOMANYREQUESTS (pull rate limit)"),
            ),
            (408, Vec::new(), unreachable("the registry answered HTTP 408")),
            (
                503,
                envelope("UNAVAILABLE", "maintenance"),
                unreachable("the registry answered HTTP 503: UNAVAILABLE (maintenance)"),
            ),
            (500, Vec::new(), unreachable("the registry answered HTTP 500")),
        ];
        for (status, body, want) in cases {
            let status = StatusCode::from_u16(status).expect("status");
            assert_eq!(status_failure(status, &body), want, "{status}");
        }
    }

    /// What the mock registry answers: (path, Authorization header) to the response's head and
    /// body chunks, written one after the other.
    pub(crate) type Answer = dyn Fn(&str, Option<&str>) -> (String, Vec<Vec<u8>>) + Send + Sync;

    /// A registry on loopback answering with `answer`; its host and the requests it served.
    pub(crate) async fn registry(answer: Arc<Answer>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let served = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&served);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (answer, count) = (Arc::clone(&answer), Arc::clone(&count));
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0; 1];
                    loop {
                        head.clear();
                        while !head.ends_with(b"\r\n\r\n") {
                            match socket.read(&mut byte).await {
                                Ok(1) => head.push(byte[0]),
                                _ => return,
                            }
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        let head = String::from_utf8_lossy(&head).to_string();
                        let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                        let authorization = head.lines().find_map(|l| {
                            l.strip_prefix("authorization: ")
                                .or_else(|| l.strip_prefix("Authorization: "))
                                .map(str::to_owned)
                        });
                        let (response, chunks) = answer(&path, authorization.as_deref());
                        if socket.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                        for chunk in chunks {
                            if socket.write_all(&chunk).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (host, served)
    }

    fn reader(host: &str) -> (Fetcher, Access) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(vec![host.to_owned()]),
            ..ClientConfig::default()
        })
        .expect("client");
        let http = registry_http::Client::builder().build().expect("http");
        let access = Access {
            client: Arc::new(client),
            auth: RegistryAuth::Anonymous,
            identity: Arc::from("anonymous"),
        };
        (Fetcher::new(http, vec![host.to_owned()]), access)
    }

    fn ok(body: &str, digest: &str) -> (String, Vec<Vec<u8>>) {
        (
            format!(
                "HTTP/1.1 200 OK\r\ndocker-content-digest: {digest}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            ),
            vec![body.as_bytes().to_vec()],
        )
    }

    fn not_found() -> (String, Vec<Vec<u8>>) {
        let error = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        (
            format!("HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n", error.len()),
            vec![error.as_bytes().to_vec()],
        )
    }

    const MANIFEST: &str = r#"{"schemaVersion":2}"#;

    fn reference(host: &str, tail: &str) -> Reference {
        format!("{host}/team/app{tail}").parse().expect("reference")
    }

    #[tokio::test]
    async fn a_manifest_is_read_and_checked_against_its_digest() {
        let digest = sha256(MANIFEST.as_bytes());
        let served = digest.clone();
        let (host, _) = registry(Arc::new(move |path, _| match path {
            "/v2/team/app/manifests/1" => ok(MANIFEST, &served),
            "/v2/team/app/manifests/lying" => ok(MANIFEST, &sha256(b"something else")),
            _ => not_found(),
        }))
        .await;
        let (fetcher, access) = reader(&host);
        let (body, got) =
            fetcher.manifest(&access, &reference(&host, ":1"), &[OCI_INDEX]).await.expect("read");
        assert_eq!((body.as_ref(), got.as_str()), (MANIFEST.as_bytes(), digest.as_str()));
        // By digest: the body must also hash to the reference's digest.
        let pinned = reference(&host, &format!("@{}", sha256(b"other")));
        let wrong = fetcher.manifest(&access, &pinned, &[OCI_INDEX]).await;
        assert!(
            matches!(wrong, Err(Failure::Refused(ref why)) if why.contains("MANIFEST_UNKNOWN")),
            "{wrong:?}"
        );
        let lying = fetcher.manifest(&access, &reference(&host, ":lying"), &[OCI_INDEX]).await;
        assert!(
            matches!(lying, Err(Failure::Refused(ref why)) if why.contains("does not match its digest")),
            "{lying:?}"
        );
        let missing = fetcher.manifest(&access, &reference(&host, ":2"), &[OCI_INDEX]).await;
        assert_eq!(
            missing.err(),
            Some(Failure::Refused(
                "the registry answered MANIFEST_UNKNOWN (manifest unknown)".into()
            ))
        );
    }

    #[tokio::test]
    async fn a_manifest_over_the_cap_is_refused_whether_declared_or_streamed() {
        let (host, _) = registry(Arc::new(|path, _| match path {
            // Declared larger than the cap: refused without reading a byte of it.
            "/v2/team/app/manifests/declared" => (
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", MANIFEST_MAX_BYTES + 1),
                Vec::new(),
            ),
            // Streamed without a length: cut at the cap (64 chunks of 128 KiB = 8 MiB).
            "/v2/team/app/manifests/streamed" => {
                let chunk = vec![b' '; 128 * 1024];
                let framed =
                    [format!("{:x}\r\n", chunk.len()).into_bytes(), chunk, b"\r\n".to_vec()]
                        .concat();
                let mut chunks = vec![framed; 64];
                chunks.push(b"0\r\n\r\n".to_vec());
                ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(), chunks)
            }
            _ => not_found(),
        }))
        .await;
        let (fetcher, access) = reader(&host);
        for tag in [":declared", ":streamed"] {
            let read = fetcher.manifest(&access, &reference(&host, tag), &[OCI_INDEX]).await;
            assert_eq!(read.err(), Some(too_large()), "{tag}");
        }
    }

    #[tokio::test]
    async fn a_bearer_challenge_is_answered_once_and_its_token_reused() {
        let digest = sha256(MANIFEST.as_bytes());
        let tokens = Arc::new(AtomicUsize::new(0));
        let issued = Arc::clone(&tokens);
        let host_cell = Arc::new(std::sync::OnceLock::<String>::new());
        let realm = Arc::clone(&host_cell);
        let (host, _) = registry(Arc::new(move |path, authorization| {
            let challenge = format!(
                "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"http://{}/token\",service=\"mock\",scope=\"repository:team/app:pull\"\r\ncontent-length: 0\r\n\r\n",
                realm.get().map_or("", String::as_str)
            );
            if path.starts_with("/token") {
                issued.fetch_add(1, Ordering::SeqCst);
                let token = r#"{"token":"t0ken"}"#;
                return (
                    format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", token.len()),
                    vec![token.as_bytes().to_vec()],
                );
            }
            match (path, authorization) {
                ("/v2/team/app/manifests/1", Some("Bearer t0ken")) => ok(MANIFEST, &digest),
                _ => (challenge, Vec::new()),
            }
        }))
        .await;
        host_cell.set(host.clone()).expect("once");
        let (fetcher, access) = reader(&host);
        for _ in 0..3 {
            let read = fetcher.manifest(&access, &reference(&host, ":1"), &[OCI_INDEX]).await;
            assert!(read.is_ok(), "{read:?}");
        }
        assert_eq!(tokens.load(Ordering::SeqCst), 1);
        // Without a token service to answer, an anonymous pull is refused.
        let (other, _) = registry(Arc::new(|_, _| {
            ("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n".to_owned(), Vec::new())
        }))
        .await;
        let (fetcher, access) = reader(&other);
        let read = fetcher.manifest(&access, &reference(&other, ":1"), &[OCI_INDEX]).await;
        assert!(matches!(read, Err(Failure::Refused(_))), "{read:?}");
    }

    #[tokio::test]
    async fn referrers_come_from_the_api_or_the_tag_schema_filtered_by_type() {
        let subject = sha256(b"image");
        let tag = subject.replacen(':', "-", 1);
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"digest": "sha256:11", "artifactType": "application/vnd.cncf.notary.signature"},
            {"digest": "sha256:22", "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json"},
        ]})
        .to_string();
        let index_digest = sha256(index.as_bytes());
        let (api_subject, api_index) = (subject.clone(), index.clone());
        let (api, _) = registry(Arc::new(move |path, _| {
            if path.starts_with(&format!("/v2/team/app/referrers/{api_subject}")) {
                ok(&api_index, &sha256(api_index.as_bytes()))
            } else {
                not_found()
            }
        }))
        .await;
        let (tag_path, tag_index) = (format!("/v2/team/app/manifests/{tag}"), index.clone());
        let (schema, _) = registry(Arc::new(move |path, _| {
            if path == tag_path { ok(&tag_index, &index_digest) } else { not_found() }
        }))
        .await;
        let (none, _) = registry(Arc::new(|_, _| not_found())).await;
        for (host, expected) in
            [(&api, vec!["sha256:11"]), (&schema, vec!["sha256:11"]), (&none, vec![])]
        {
            let (fetcher, access) = reader(host);
            let image = reference(host, &format!("@{subject}"));
            let found = fetcher
                .referrers(&access, &image, "application/vnd.cncf.notary.signature")
                .await
                .expect("referrers");
            let digests: Vec<&str> = found.iter().map(|r| r.digest.as_str()).collect();
            assert_eq!(digests, expected, "{host}");
        }
    }
}
