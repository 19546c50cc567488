//! Size-capped reads over the OCI distribution API: manifests, referrers indexes and blobs, and
//! the token handshake that authorizes them.
//!
//! oci-client reads each answer whole, however large the registry (or the token service the
//! registry names) makes it: manifests, token answers, error bodies. Every namespace's
//! GuardPolicy picks its registries, so one policy author could make each of the 16 reads in
//! flight hold gigabytes (a 32 MiB token answer took a replica from 42 to 623 MB), and
//! oci-client has no hook to bound a body. So arcguard makes these requests itself, with the
//! reqwest oci-client is built on, and reads every body to a cap: manifests and referrers
//! indexes to [`MANIFEST_MAX_BYTES`], blobs to the size their descriptor declares, token
//! answers to [`TOKEN_ANSWER_MAX_BYTES`], error bodies to 64 KiB. Each is checked against its
//! digest as oci-client does. oci-client still gives the reference grammar ([`Reference`]) and
//! the credential ([`RegistryAuth`]).
//!
//! Authorization follows the distribution spec's token flow (distribution's
//! `docs/spec/auth/token.md`): a request goes out with the authorization cached for its
//! credential and repository, or none; a `401` names what it wants in `WWW-Authenticate`
//! (RFC 7235): a Bearer token from the token service at its `realm`, asked for the
//! `repository:<name>:pull` scope with the credential as Basic authorization, or the
//! credential itself as Basic. The request is then sent once more. Tokens are reused for
//! [`TOKEN_TTL`] (or less when the service says they expire sooner); one revoked sooner costs
//! one `401`.

use std::time::Duration;

use bytes::Bytes;
use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use registry_http::StatusCode;
use registry_http::header::{ACCEPT, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
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
/// The most of a token service's answer read, in bytes. Real answers are a few KiB: a JWT,
/// sometimes twice (`token` and `access_token`), its expiry and time of issue.
pub const TOKEN_ANSWER_MAX_BYTES: u64 = 64 * 1024;
/// The longest token used, in bytes. Real ones are 1–4 KiB; a longer one would not pass the
/// 8 KiB header line of nginx's defaults, in front of many registries, either.
pub const TOKEN_MAX_BYTES: usize = 16 * 1024;
/// How long a Bearer token is reused for one credential and repository, at most.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Tokens kept at most; emptied beyond.
const TOKEN_LIMIT: usize = 1024;
/// Bytes of tokens kept, all credentials and repositories together, the least reused evicted
/// beyond (which costs that repository one `401` more).
const TOKEN_CACHE_BYTES: usize = 2 * 1024 * 1024;
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
    /// The token services' client: it follows no redirect.
    token_http: registry_http::Client,
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
    /// A reader over `http` (registries) and `token_http` (token services, following no
    /// redirect), reading the registries in `plain_http` over plain HTTP.
    pub fn new(
        http: registry_http::Client,
        token_http: registry_http::Client,
        plain_http: Vec<String>,
    ) -> Self {
        Self {
            http,
            token_http,
            plain_http,
            tokens: TtlCache::weighed(TOKEN_LIMIT, TOKEN_CACHE_BYTES, token_weight),
        }
    }

    /// Forgets every authorization kept, as evictions would.
    #[cfg(test)]
    pub(crate) fn forget_tokens(&self) {
        self.tokens.clear();
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
        let (body, digest) =
            self.get(access, reference, &url, &accepted.join(", "), MANIFEST_MAX_BYTES).await?;
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
        let index = match self.get(access, reference, &url, OCI_INDEX, MANIFEST_MAX_BYTES).await {
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

    /// The blob `digest` of the repository `reference` names, of the `size` its descriptor
    /// declares, read whole only if that is at most `cap` bytes, and checked against its digest.
    ///
    /// # Errors
    /// [`Failure::Refused`] for a blob over `cap`, longer than declared, not found or not
    /// matching its digest (worded to follow "the blob …: "); [`Failure::Unreachable`] when
    /// the registry cannot be read.
    pub(crate) async fn blob(
        &self,
        access: &Access,
        reference: &Reference,
        digest: &str,
        size: u64,
        cap: u64,
    ) -> Result<Vec<u8>, Failure> {
        if size > cap {
            return Err(Failure::Unread(format!(
                "{size} bytes, over the {cap} arcguard reads of such a blob"
            )));
        }
        let url = self.url(reference, &format!("blobs/{digest}"));
        let body = match self.get(access, reference, &url, "*/*", size).await {
            Ok((body, _)) => body,
            Err(GetError::TooLarge) => {
                return Err(Failure::Refused(format!("longer than the {size} bytes declared")));
            }
            Err(error) => return Err(error.into()),
        };
        if verified_digest(&body, None, Some(digest)).is_err() {
            return Err(Failure::Refused("does not match its digest".to_owned()));
        }
        Ok(Vec::from(body))
    }

    fn url(&self, reference: &Reference, path: &str) -> String {
        let registry = reference.resolve_registry();
        format!("{}://{registry}/v2/{}/{path}", self.scheme(registry), reference.repository())
    }

    /// `http` for the registries read over plain HTTP, else `https`.
    fn scheme(&self, registry: &str) -> &'static str {
        if self.plain_http.iter().any(|r| r == registry) { "http" } else { "https" }
    }

    /// GETs `url` with the authorization cached for `access` and the repository, answering a
    /// `401` challenge once; the body is read up to `cap` bytes.
    async fn get(
        &self,
        access: &Access,
        reference: &Reference,
        url: &str,
        accept: &str,
        cap: u64,
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
            let (authorization, ttl) =
                self.authorize(access, reference, response.headers()).await?;
            self.tokens.insert_for(&access.owner, key, authorization.clone(), ttl);
            response = self.send(url, accept, Some(&authorization)).await?;
        }
        let status = response.status();
        // What an HTTPS server answers a plain-HTTP request (Go's: "Client sent an HTTP
        // request to an HTTPS server"): a configuration error, said as one.
        if status == StatusCode::BAD_REQUEST && url.starts_with("http:") {
            return Err(GetError::Failure(Failure::Unreachable(
                "the registry answered HTTP 400 to plain HTTP (an HTTPS registry? remove it from --registry-plain-http)"
                    .to_owned(),
            )));
        }
        if status != StatusCode::OK {
            // Quoted only from the registry itself: a redirect may have taken the request to
            // any address the registry named.
            let same_origin = registry_http::Url::parse(url)
                .is_ok_and(|asked| asked.origin() == response.url().origin());
            let body = if same_origin {
                read_capped(&mut response, ERROR_MAX_BYTES).await.unwrap_or_default()
            } else {
                Bytes::new()
            };
            // Refused though authorized as well as this access can be (a token service may
            // give anonymous clients a token that reads no private repository).
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(GetError::Failure(pull_refused(status, &body, &access.auth)));
            }
            return Err(GetError::Status(status, body));
        }
        let digest = response
            .headers()
            .get(DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        if response.content_length().is_some_and(|len| len > cap) {
            return Err(GetError::TooLarge);
        }
        let body = read_capped(&mut response, cap).await?;
        Ok((body, digest))
    }

    /// How to answer a registry's `401` for `access` (whose headers are `challenge`), and for
    /// how long: a token from the token service it names, the credential as Basic
    /// authorization, or nothing (refused).
    async fn authorize(
        &self,
        access: &Access,
        reference: &Reference,
        challenge: &HeaderMap,
    ) -> Result<(Authorization, Duration), GetError> {
        // A credential that is a token already (an identity token) is sent as it is.
        if let RegistryAuth::Bearer(token) = &access.auth {
            return Ok((Authorization::Bearer(token.clone()), TOKEN_TTL));
        }
        match Challenge::of(challenge) {
            Challenge::Bearer { realm, service } => {
                let (token, ttl) =
                    self.token(access, reference, &realm, service.as_deref()).await?;
                Ok((Authorization::Bearer(token), ttl))
            }
            // A registry that asks for Basic (or names no scheme arcguard knows) gets the
            // credential, as oci-client and Docker's client answer it.
            Challenge::Basic | Challenge::Other => match &access.auth {
                RegistryAuth::Basic(user, password) => {
                    Ok((Authorization::Basic(user.clone(), password.clone()), TOKEN_TTL))
                }
                _ => Err(GetError::Failure(Failure::Refused(ANONYMOUS_REFUSED.to_owned()))),
            },
        }
    }

    /// A token for pulling `reference`'s repository from the token service at `realm`
    /// (distribution's token authentication spec), and how long to reuse it. The service's
    /// answer is read to [`TOKEN_ANSWER_MAX_BYTES`] and never quoted: `realm` is the
    /// registry's to name, and may be any address arcguard can reach.
    ///
    /// # Errors
    /// [`Failure::Refused`] for a realm that is not HTTPS (credentials go over HTTPS only,
    /// unless the registry itself is read over plain HTTP), a service that refuses the
    /// credential or answers no usable token; [`Failure::Unreachable`] for one that cannot
    /// be read, is rate-limited (408, 425, 429) or fails (5xx).
    async fn token(
        &self,
        access: &Access,
        reference: &Reference,
        realm: &str,
        service: Option<&str>,
    ) -> Result<(String, Duration), GetError> {
        let refused = |why: String| GetError::Failure(Failure::Refused(why));
        // Plain HTTP only for a registry itself read over plain HTTP (development): it would
        // carry a credential, and without one it still reaches the plain-HTTP services inside
        // the cluster, whose answer's `token` would be relayed to the registry.
        let plain_allowed = self.scheme(reference.resolve_registry()) == "http";
        let url =
            token_url(realm, reference.repository(), service, plain_allowed).map_err(refused)?;
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let mut request = self.token_http.get(url);
        if let RegistryAuth::Basic(user, password) = &access.auth {
            request = request.basic_auth(user, Some(password));
        }
        let mut response = request.send().await.map_err(|e| {
            let (Failure::Unreachable(why) | Failure::Refused(why) | Failure::Unread(why)) =
                transport_failure(&e);
            GetError::Failure(Failure::Unreachable(format!(
                "the registry's token service at {host} could not be read: {why}"
            )))
        })?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(GetError::Failure(token_refusal(status, &access.auth, &host)));
        }
        if response.content_length().is_some_and(|len| len > TOKEN_ANSWER_MAX_BYTES) {
            return Err(GetError::Failure(Failure::Unread(token_too_large())));
        }
        let body = match read_capped(&mut response, TOKEN_ANSWER_MAX_BYTES).await {
            Ok(body) => body,
            Err(GetError::TooLarge) => {
                return Err(GetError::Failure(Failure::Unread(token_too_large())));
            }
            Err(error) => return Err(error),
        };
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
            refused(format!(
                "the registry's token service at {host} answered something other than a token"
            ))
        })?;
        let token =
            answer.token.or(answer.access_token).filter(|t| !t.is_empty()).ok_or_else(|| {
                refused(format!("the registry's token service at {host} answered no token"))
            })?;
        if token.len() > TOKEN_MAX_BYTES || HeaderValue::from_str(&token).is_err() {
            return Err(refused(format!(
                "the registry's token service at {host} answered a token arcguard does not send: over {} KiB or not a header value",
                TOKEN_MAX_BYTES / 1024
            )));
        }
        // The spec's default lifetime is 60 s; a token is reused no longer than it says.
        let ttl = answer.expires_in.map_or(TOKEN_TTL, |s| TOKEN_TTL.min(Duration::from_secs(s)));
        Ok((token, ttl))
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

/// The token service's URL for a pull of `repository`: `realm` with the `scope` and `service`
/// query parameters of distribution's token spec (`repository:<name>:pull`).
///
/// # Errors
/// Why `realm` is not used: not a URL, or not HTTPS (plain HTTP only when `plain_allowed`,
/// the registry itself being read over plain HTTP): credentials are sent to it.
fn token_url(
    realm: &str,
    repository: &str,
    service: Option<&str>,
    plain_allowed: bool,
) -> Result<registry_http::Url, String> {
    let mut url = registry_http::Url::parse(realm)
        .map_err(|_| "the registry names a token service whose realm is not a URL".to_owned())?;
    match url.scheme() {
        "https" => {}
        "http" if plain_allowed => {}
        other => {
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            return Err(format!(
                "the registry names a token service at {other}://{}{port}, which is not HTTPS: arcguard sends credentials over HTTPS only",
                url.host_str().unwrap_or_default()
            ));
        }
    }
    url.query_pairs_mut().append_pair("scope", &format!("repository:{repository}:pull"));
    if let Some(service) = service {
        url.query_pairs_mut().append_pair("service", service);
    }
    Ok(url)
}

/// What a registry's `401` asks for, from its `WWW-Authenticate` headers (RFC 7235).
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    /// A token from the token service at `realm`, for `service`.
    Bearer { realm: String, service: Option<String> },
    /// Basic authorization.
    Basic,
    /// No challenge arcguard can parse or answer.
    Other,
}

impl Challenge {
    /// The first Bearer challenge with a realm in `headers`, else Basic if one asks for it.
    fn of(headers: &HeaderMap) -> Self {
        let mut basic = false;
        for value in headers.get_all(WWW_AUTHENTICATE) {
            let Ok(value) = value.to_str() else { continue };
            for challenge in http_auth::parser::ChallengeParser::new(value).map_while(Result::ok) {
                if challenge.scheme.eq_ignore_ascii_case("Bearer") {
                    let param = |name: &str| {
                        challenge
                            .params
                            .iter()
                            .find(|(key, _)| key.eq_ignore_ascii_case(name))
                            .map(|(_, value)| value.to_unescaped())
                    };
                    if let Some(realm) = param("realm") {
                        return Self::Bearer { realm, service: param("service") };
                    }
                } else if challenge.scheme.eq_ignore_ascii_case("Basic") {
                    basic = true;
                }
            }
        }
        if basic { Self::Basic } else { Self::Other }
    }
}

/// A token service's answer (distribution's token spec: `token`, or OAuth 2's `access_token`,
/// and `expires_in` seconds); other fields are skipped.
#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A token service's answer other than 200, for `auth`: its body is not quoted (the realm may
/// be any address), its status is. Rate limits, timeouts and 5xx are outages, as for the
/// registry ([`is_transient`]); 401 and 403 are a refused credential.
fn token_refusal(status: StatusCode, auth: &RegistryAuth, host: &str) -> Failure {
    let code = status.as_u16();
    if status.is_server_error() || is_transient(code) {
        return Failure::Unreachable(format!(
            "the registry's token service at {host} answered HTTP {code}"
        ));
    }
    match (status, auth) {
        (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, RegistryAuth::Anonymous) => {
            Failure::Refused(ANONYMOUS_REFUSED.to_owned())
        }
        (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => Failure::Refused(format!(
            "the registry's token service at {host} refused the imagePullSecret's credential ({status}): check its username and password, and that it may pull this repository"
        )),
        _ => {
            Failure::Refused(format!("the registry's token service at {host} answered HTTP {code}"))
        }
    }
}

fn token_too_large() -> String {
    format!(
        "the registry's token service answered more than the {} KiB arcguard reads of a token answer (real ones are a few KiB)",
        TOKEN_ANSWER_MAX_BYTES / 1024
    )
}

/// The bytes a cached authorization holds, estimated.
#[allow(clippy::ptr_arg, reason = "the cache's weigh is fn(&K, &V), K = String")]
fn token_weight(key: &String, authorization: &Authorization) -> usize {
    let held = match authorization {
        Authorization::Bearer(token) => token.len(),
        Authorization::Basic(user, password) => user.len() + password.len(),
    };
    64 + key.len() + held
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
    /// Its body is longer than the cap of the read.
    TooLarge,
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
            GetError::TooLarge => too_large(),
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

/// A pull the registry refused (401 or 403) to `auth`: an anonymous pull it wants
/// credentials for (401), what to add; one it forbids (403, as a vulnerability policy does),
/// its words; for a credential, what to check; with the registry's error codes when it gave
/// some.
fn pull_refused(status: StatusCode, body: &[u8], auth: &RegistryAuth) -> Failure {
    match auth {
        RegistryAuth::Anonymous if status == StatusCode::UNAUTHORIZED => {
            return Failure::Refused(ANONYMOUS_REFUSED.to_owned());
        }
        RegistryAuth::Anonymous => return status_failure(status, body),
        _ => {}
    }
    Failure::Refused(format!(
        "the registry refused the pull with the imagePullSecret's credential ({status}){}: check that it may pull this repository",
        envelope_text(body).map(|t| format!(": {t}")).unwrap_or_default()
    ))
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

fn too_large() -> Failure {
    Failure::Unread(format!(
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
            return Err(GetError::TooLarge);
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
        let http = registry_http::Client::builder().build().expect("http");
        let token_http = registry_http::Client::builder()
            .redirect(registry_http::redirect::Policy::none())
            .build()
            .expect("http");
        let access = Access {
            auth: RegistryAuth::Anonymous,
            identity: Arc::from("anonymous"),
            owner: Arc::from("apps"),
        };
        (Fetcher::new(http, token_http, vec![host.to_owned()]), access)
    }

    fn with_secret() -> Access {
        Access {
            auth: RegistryAuth::Basic("u".into(), "p".into()),
            identity: Arc::from("u@secret"),
            owner: Arc::from("apps"),
        }
    }

    fn answer(status: &str, body: &[u8]) -> (String, Vec<Vec<u8>>) {
        (
            format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n", body.len()),
            vec![body.to_vec()],
        )
    }

    /// `chunks` chunks of `size` bytes of `byte`, chunked, after an HTTP 200 head: a body of
    /// no declared length.
    fn streamed(byte: u8, size: usize, chunks: usize) -> (String, Vec<Vec<u8>>) {
        let chunk = vec![byte; size];
        let framed = [format!("{size:x}\r\n").into_bytes(), chunk, b"\r\n".to_vec()].concat();
        let mut body = vec![framed; chunks];
        body.push(b"0\r\n\r\n".to_vec());
        ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(), body)
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
            "/v2/team/app/manifests/tls" => {
                answer("400 Bad Request", b"Client sent an HTTP request to an HTTPS server.\n")
            }
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
        // An HTTPS registry listed as plain HTTP: a configuration error, said as one.
        let tls = fetcher.manifest(&access, &reference(&host, ":tls"), &[OCI_INDEX]).await;
        assert!(
            matches!(tls, Err(Failure::Unreachable(ref why)) if why.contains("remove it from --registry-plain-http")),
            "{tls:?}"
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
    async fn a_manifest_over_the_cap_is_not_read_whether_declared_or_streamed() {
        let (host, _) = registry(Arc::new(|path, _| match path {
            // Declared larger than the cap: refused without reading a byte of it.
            "/v2/team/app/manifests/declared" => (
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", MANIFEST_MAX_BYTES + 1),
                Vec::new(),
            ),
            // Streamed without a length: cut at the cap (64 chunks of 128 KiB = 8 MiB).
            "/v2/team/app/manifests/streamed" => streamed(b' ', 128 * 1024, 64),
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
    async fn an_error_from_where_the_registry_redirected_is_not_quoted() {
        let (elsewhere, _) = registry(Arc::new(|_, _| {
            answer(
                "404 Not Found",
                br#"{"errors":[{"code":"INTERNAL_SECRET","message":"db-password=hunter2"}]}"#,
            )
        }))
        .await;
        let target = format!("http://{elsewhere}/internal");
        let (host, _) = registry(Arc::new(move |path, _| match path {
            "/v2/team/app/manifests/moved" => (
                format!("HTTP/1.1 302 Found\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"),
                Vec::new(),
            ),
            _ => not_found(),
        }))
        .await;
        let (fetcher, access) = reader(&host);
        let read = fetcher.manifest(&access, &reference(&host, ":moved"), &[OCI_INDEX]).await;
        assert_eq!(read.err(), Some(Failure::Refused("the registry answered HTTP 404".into())));
        // The registry's own errors are quoted.
        let read = fetcher.manifest(&access, &reference(&host, ":other"), &[OCI_INDEX]).await;
        assert_eq!(
            read.err(),
            Some(Failure::Refused(
                "the registry answered MANIFEST_UNKNOWN (manifest unknown)".into()
            ))
        );
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

    #[test]
    fn a_challenge_names_a_token_service_or_asks_for_basic() {
        let challenge = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(WWW_AUTHENTICATE, HeaderValue::from_str(value).expect("value"));
            }
            Challenge::of(&headers)
        };
        let bearer = |realm: &str, service: Option<&str>| Challenge::Bearer {
            realm: realm.to_owned(),
            service: service.map(str::to_owned),
        };
        let cases = [
            (
                vec![
                    r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
                ],
                bearer("https://auth.docker.io/token", Some("registry.docker.io")),
            ),
            // Scheme and parameter names are case-insensitive; quoted values unescaped.
            (
                vec![r#"bearer Realm="https://a.example/t\"x",SERVICE=reg"#],
                bearer("https://a.example/t\"x", Some("reg")),
            ),
            (vec![r#"Basic realm="Registry Realm""#], Challenge::Basic),
            // One header listing two challenges, or two headers: the Bearer one is answered.
            (
                vec![r#"Basic realm="r", Bearer realm="https://t.example/token""#],
                bearer("https://t.example/token", None),
            ),
            (
                vec![r#"Basic realm="r""#, r#"Bearer realm="https://t.example/token""#],
                bearer("https://t.example/token", None),
            ),
            // A Bearer challenge without a realm names no service to ask.
            (vec![r#"Bearer service="reg""#, r#"Basic realm="r""#], Challenge::Basic),
            (vec![r#"Bearer service="reg""#], Challenge::Other),
            (vec!["Negotiate"], Challenge::Other),
            (vec![r#"Bearer realm="unterminated"#], Challenge::Other),
            (vec![], Challenge::Other),
        ];
        for (values, want) in cases {
            assert_eq!(challenge(&values), want, "{values:?}");
        }
    }

    #[test]
    fn a_token_service_is_asked_for_a_pull_over_https_only() {
        let url = |realm: &str, plain: bool| {
            token_url(realm, "team/app", Some("reg istry"), plain).map(|u| u.to_string())
        };
        assert_eq!(
            url("https://auth.example/token", false).as_deref(),
            Ok("https://auth.example/token?scope=repository%3Ateam%2Fapp%3Apull&service=reg+istry")
        );
        // A realm's own query is kept.
        assert_eq!(
            url("https://auth.example/token?x=1", false).as_deref(),
            Ok(
                "https://auth.example/token?x=1&scope=repository%3Ateam%2Fapp%3Apull&service=reg+istry"
            )
        );
        // Credentials go over plain HTTP only to a registry read over plain HTTP itself.
        assert!(url("http://auth.example/token", true).is_ok());
        for (realm, why) in [
            ("http://auth.example/token", "http://auth.example, which is not HTTPS"),
            ("file:///etc/passwd", "file://, which is not HTTPS"),
            ("ftp://auth.example/", "ftp://auth.example, which is not HTTPS"),
            ("/token", "realm is not a URL"),
        ] {
            let refused = url(realm, false).expect_err(realm);
            assert!(refused.contains(why), "{realm}: {refused}");
        }
    }

    /// A registry whose repository `team/<name>` asks for a token from its own `/token`, which
    /// answers as `service` says for `<name>`; the token `t0ken` reads `manifests/1`. The
    /// token requests' paths and authorizations are kept.
    async fn token_registry(
        service: fn(&str) -> (String, Vec<Vec<u8>>),
    ) -> (String, Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>) {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = Arc::clone(&asked);
        let host_cell = Arc::new(std::sync::OnceLock::<String>::new());
        let realm = Arc::clone(&host_cell);
        let digest = sha256(MANIFEST.as_bytes());
        let (host, _) = registry(Arc::new(move |path, authorization| {
            if let Some(query) = path.strip_prefix("/token?") {
                kept.lock().expect("lock").push((path.to_owned(), authorization.map(str::to_owned)));
                let name = query
                    .split('&')
                    .find_map(|p| p.strip_prefix("scope=repository%3Ateam%2F"))
                    .and_then(|p| p.strip_suffix("%3Apull"))
                    .unwrap_or_default();
                return service(name);
            }
            if authorization == Some("Bearer t0ken") && path.ends_with("/manifests/1") {
                return ok(MANIFEST, &digest);
            }
            if authorization == Some("Bearer forbidden") {
                return answer(
                    "403 Forbidden",
                    br#"{"errors":[{"code":"DENIED","message":"12 critical vulnerabilities"}]}"#,
                );
            }
            (
                format!(
                    "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"http://{}/token\",service=\"mock\"\r\ncontent-length: 0\r\n\r\n",
                    realm.get().map_or("", String::as_str)
                ),
                Vec::new(),
            )
        }))
        .await;
        host_cell.set(host.clone()).expect("once");
        (host, asked)
    }

    #[tokio::test]
    async fn token_answers_are_read_to_a_cap_and_only_their_status_is_quoted() {
        const INSIDE: &[u8] = b"an internal service's page";
        let (host, asked) = token_registry(|name| match name {
            "ok" => answer("200 OK", br#"{"token":"t0ken","issued_at":"2026-12-01T00:00:00Z"}"#),
            // 32 MiB declared, or streamed without a length: cut at the cap either way.
            "declared" => (
                "HTTP/1.1 200 OK\r\ncontent-length: 33554432\r\n\r\n".to_owned(),
                vec![b"{\"token\":\"".to_vec()],
            ),
            "streamed" => {
                let (head, mut body) = streamed(b'a', 64 * 1024, 512);
                body.insert(0, b"a\r\n{\"token\":\"\r\n".to_vec());
                (head, body)
            }
            "long" => answer(
                "200 OK",
                format!(r#"{{"token":"{}"}}"#, "a".repeat(TOKEN_MAX_BYTES + 1)).as_bytes(),
            ),
            "newline" => answer("200 OK", br#"{"token":"t0\nken"}"#),
            "empty" => answer("200 OK", br#"{"token":""}"#),
            "page" => answer("200 OK", INSIDE),
            // A token service that redirects (to an internal address, or plain HTTP) is not
            // followed.
            "moved" => (
                "HTTP/1.1 302 Found\r\nlocation: /token?scope=repository%3Ateam%2Fok%3Apull\r\ncontent-length: 0\r\n\r\n".to_owned(),
                Vec::new(),
            ),
            // A token for a repository the registry forbids (as a vulnerability policy does).
            "forbidden" => answer("200 OK", br#"{"token":"forbidden"}"#),
            // A token that reads nothing here, as a token service gives anonymous clients.
            "weak" => answer("200 OK", br#"{"token":"weak"}"#),
            "denied" => answer("401 Unauthorized", INSIDE),
            "limited" => answer("429 Too Many Requests", INSIDE),
            "down" => answer("503 Service Unavailable", INSIDE),
            _ => answer("404 Not Found", INSIDE),
        })
        .await;
        let (fetcher, anonymous) = reader(&host);
        let secret = with_secret();
        let refused = |s: &str| Err(Failure::Refused(s.to_owned()));
        let token = |why: &str| format!("the registry's token service at {host} {why}");
        let cases = [
            ("ok", &anonymous, Ok(())),
            ("declared", &anonymous, Err(Failure::Unread(token_too_large()))),
            ("streamed", &anonymous, Err(Failure::Unread(token_too_large()))),
            (
                "long",
                &anonymous,
                refused(&token(
                    "answered a token arcguard does not send: over 16 KiB or not a header value",
                )),
            ),
            (
                "newline",
                &anonymous,
                refused(&token(
                    "answered a token arcguard does not send: over 16 KiB or not a header value",
                )),
            ),
            ("empty", &anonymous, refused(&token("answered no token"))),
            ("page", &anonymous, refused(&token("answered something other than a token"))),
            ("denied", &anonymous, refused(ANONYMOUS_REFUSED)),
            (
                "denied",
                &secret,
                refused(&token(
                    "refused the imagePullSecret's credential (401 Unauthorized): check its username and password, and that it may pull this repository",
                )),
            ),
            ("missing", &anonymous, refused(&token("answered HTTP 404"))),
            ("moved", &anonymous, refused(&token("answered HTTP 302"))),
            // Forbidden, not unauthenticated: the registry's words, not a call for a secret.
            (
                "forbidden",
                &anonymous,
                refused(
                    "the registry refused the pull (403 Forbidden): DENIED (12 critical vulnerabilities)",
                ),
            ),
            // The registry refuses the token it was given: said as for who pulled.
            ("weak", &anonymous, refused(ANONYMOUS_REFUSED)),
            (
                "weak",
                &secret,
                refused(
                    "the registry refused the pull with the imagePullSecret's credential (401 Unauthorized): check that it may pull this repository",
                ),
            ),
            // Rate limits and failures of the token service are outages, as the registry's.
            ("limited", &anonymous, Err(Failure::Unreachable(token("answered HTTP 429")))),
            ("down", &anonymous, Err(Failure::Unreachable(token("answered HTTP 503")))),
        ];
        for (name, access, want) in cases {
            let image = format!("{host}/team/{name}:1").parse().expect("reference");
            let read = fetcher.manifest(access, &image, &[OCI_INDEX]).await.map(|_| ());
            assert_eq!(read, want, "{name}");
        }
        // Asked for a pull of the repository, for the service named, with the secret as Basic.
        let asked = asked.lock().expect("lock").clone();
        let basic = format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "u:p")
        );
        assert!(
            asked.iter().any(|(path, authorization)| path
                == "/token?scope=repository%3Ateam%2Fdenied%3Apull&service=mock"
                && authorization.as_deref() == Some(basic.as_str())),
            "{asked:?}"
        );
        assert!(asked.iter().all(|(path, _)| path.contains("service=mock")), "{asked:?}");
    }

    #[tokio::test]
    async fn a_token_is_kept_no_longer_than_it_says_it_lives() {
        let (host, _) = token_registry(|name| match name {
            "brief" => answer("200 OK", br#"{"access_token":"t0ken","expires_in":5}"#),
            _ => answer("200 OK", br#"{"token":"t0ken","expires_in":3600}"#),
        })
        .await;
        let (fetcher, anonymous) = reader(&host);
        for (name, ttl) in [("brief", Duration::from_secs(5)), ("long", TOKEN_TTL)] {
            let image: Reference = format!("{host}/team/{name}:1").parse().expect("reference");
            let realm = format!("http://{host}/token");
            let got = fetcher.token(&anonymous, &image, &realm, Some("mock")).await;
            assert!(matches!(got, Ok((ref t, d)) if t == "t0ken" && d == ttl), "{name}: {got:?}");
        }
    }

    #[tokio::test]
    async fn a_blob_is_read_to_its_declared_size_behind_a_token_and_checked_against_its_digest() {
        const BLOB: &[u8] = br#"{"os":"linux"}"#;
        let digest = sha256(BLOB);
        let size = BLOB.len() as u64;
        let host_cell = Arc::new(std::sync::OnceLock::<String>::new());
        let realm = Arc::clone(&host_cell);
        let (host, _) = registry(Arc::new(move |path, authorization| {
            if path.starts_with("/token?") {
                return answer("200 OK", br#"{"token":"t0ken"}"#);
            }
            if authorization != Some("Bearer t0ken") {
                let head = format!(
                    "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"http://{}/token\"\r\ncontent-length: 0\r\n\r\n",
                    realm.get().map_or("", String::as_str)
                );
                return (head, Vec::new());
            }
            let repository = path.split('/').nth(3).unwrap_or_default();
            match repository {
                "right" => answer("200 OK", BLOB),
                "longer" => answer("200 OK", &[BLOB, b"   "].concat()),
                "streamed" => streamed(b' ', 1024, 4),
                "tampered" => answer("200 OK", &BLOB.to_ascii_uppercase()),
                "down" => answer("502 Bad Gateway", b""),
                _ => not_found(),
            }
        }))
        .await;
        host_cell.set(host.clone()).expect("once");
        let (fetcher, access) = reader(&host);
        let refused = |s: &str| Err(Failure::Refused(s.to_owned()));
        let cases = [
            ("right", size, Ok(BLOB.to_vec())),
            (
                "right",
                1 << 20,
                Err(Failure::Unread(
                    "1048576 bytes, over the 65536 arcguard reads of such a blob".into(),
                )),
            ),
            ("longer", size, refused(&format!("longer than the {size} bytes declared"))),
            ("streamed", size, refused(&format!("longer than the {size} bytes declared"))),
            ("tampered", size, refused("does not match its digest")),
            ("missing", size, refused("the registry answered MANIFEST_UNKNOWN (manifest unknown)")),
            ("down", size, Err(Failure::Unreachable("the registry answered HTTP 502".to_owned()))),
        ];
        for (repository, declared, want) in cases {
            let image = format!("{host}/team/{repository}@{digest}").parse().expect("reference");
            let got = fetcher.blob(&access, &image, &digest, declared, 64 * 1024).await;
            assert_eq!(got, want, "{repository} ({declared} bytes)");
        }
    }
}
