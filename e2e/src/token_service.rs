//! A registry token service on loopback, as a private registry's token authentication works
//! (CNCF Distribution's `docs/spec/auth/token.md`): the registry answers `401` naming this
//! service as its `realm`; a client GETs `/token?service=…&scope=repository:<name>:<actions>`
//! with its credential as Basic authorization and gets a JWT, which the registry verifies
//! against the certificate in its `rootcertbundle` (the `x5c` header of the token), the issuer
//! and the audience (the `service`).
//!
//! It grants what is asked to the one user it knows, and nothing to anyone else (a `401`), and
//! keeps the scopes asked for with whether a credential came with them, so a test can tell
//! what a client asked for. Tokens are signed with ES256 (ring) by a self-signed certificate of
//! its own; it serves HTTPS with the certificate and key it is given.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, DnType, KeyPair};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::json;
use tokio::net::TcpListener;

/// The `service` the registry names, and the audience of its tokens.
pub const SERVICE: &str = "arcguard-e2e-registry";
/// The issuer of the tokens, which the registry trusts.
pub const ISSUER: &str = "arcguard-e2e-token-service";
/// How long a token lives, in seconds (the spec's `expires_in`).
const LIFETIME: i64 = 300;

/// One request for a token: the `scope` parameters asked for, and the user of its Basic
/// authorization, if it had one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asked {
    /// The `scope` parameters, in order (`repository:<name>:<actions>`).
    pub scopes: Vec<String>,
    /// The Basic authorization's user, if any.
    pub user: Option<String>,
}

/// What signs tokens and knows the one user.
struct Issuer {
    key: EcdsaKeyPair,
    /// The signing certificate, DER, for the `x5c` header.
    certificate: Vec<u8>,
    user: (String, String),
    issued: AtomicU64,
    asked: Mutex<Vec<Asked>>,
}

/// A running token service; stopped on drop.
pub struct TokenService {
    /// `https://127.0.0.1:<port>/token`: the realm the registry names.
    pub realm: String,
    /// PEM of the certificate that signs tokens: the registry's `rootcertbundle`.
    pub signer_pem: String,
    issuer: Arc<Issuer>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService").field("realm", &self.realm).finish_non_exhaustive()
    }
}

impl TokenService {
    /// Starts it on a free loopback port, serving HTTPS with `cert_pem` and `key_pem` (a
    /// certificate for `127.0.0.1`), granting `user`.
    ///
    /// # Errors
    /// When the keys or certificates cannot be made or read, or no port is free.
    pub async fn start(cert_pem: &str, key_pem: &str, user: (String, String)) -> Result<Self> {
        let signer = KeyPair::generate().context("token signing key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "arcguard e2e token signer");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(2);
        let certificate = params.self_signed(&signer).context("token signing certificate")?;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &signer.serialize_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("the token signing key: {e}"))?;
        let issuer = Arc::new(Issuer {
            key,
            certificate: certificate.der().to_vec(),
            user,
            issued: AtomicU64::new(0),
            asked: Mutex::new(Vec::new()),
        });

        let acceptor = crate::pki::tls_acceptor(cert_pem, key_pem)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let realm = format!("https://{}/token", listener.local_addr()?);
        let serving = Arc::clone(&issuer);
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, issuer) = (acceptor.clone(), Arc::clone(&serving));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request| {
                        let issuer = Arc::clone(&issuer);
                        async move { Ok::<_, Infallible>(issuer.answer(&request)) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        Ok(Self { realm, signer_pem: certificate.pem(), issuer, server })
    }

    /// A token granting `actions` on `repository` to the user, as the service would issue it
    /// (for the suite's own pushes).
    ///
    /// # Errors
    /// When signing fails.
    pub fn mint(&self, repository: &str, actions: &[&str]) -> Result<String> {
        self.issuer
            .token(&[(repository.to_owned(), actions.iter().map(|a| (*a).to_owned()).collect())])
    }

    /// The user it grants tokens to, and its password.
    pub fn user(&self) -> (String, String) {
        self.issuer.user.clone()
    }

    /// The requests for tokens so far.
    pub fn asked(&self) -> Vec<Asked> {
        self.issuer.asked.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Issuer {
    /// A token for the user, granting each `(repository, actions)`.
    fn token(&self, access: &[(String, Vec<String>)]) -> Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let header =
            json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&self.certificate)]});
        let claims = json!({
            "iss": ISSUER, "sub": self.user.0, "aud": SERVICE,
            "exp": now + LIFETIME, "nbf": now - 5, "iat": now,
            "jti": format!("token-{}", self.issued.fetch_add(1, Ordering::Relaxed)),
            "access": access.iter().map(|(name, actions)| json!({
                "type": "repository", "name": name, "actions": actions,
            })).collect::<Vec<_>>(),
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&SystemRandom::new(), signed.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing a token: {e}"))?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref())))
    }

    /// The answer to a GET of the realm: a token for the scopes asked, to the user only.
    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        // The query decoded as the url crate decodes forms (reqwest's `Url`).
        let scopes: Vec<String> = reqwest::Url::parse(&format!("https://realm{}", request.uri()))
            .map(|url| {
                url.query_pairs()
                    .filter(|(key, _)| key == "scope")
                    .map(|(_, value)| value.into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let user = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|v| STANDARD.decode(v).ok())
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Asked { scopes: scopes.clone(), user: user.as_ref().map(|(u, _)| u.clone()) });
        if user.as_ref() != Some(&self.user) {
            return respond(
                StatusCode::UNAUTHORIZED,
                r#"{"details":"incorrect username or password"}"#.to_owned(),
            );
        }
        let access: Vec<(String, Vec<String>)> = scopes
            .iter()
            .filter_map(|scope| {
                let rest = scope.strip_prefix("repository:")?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some((name.to_owned(), actions.split(',').map(str::to_owned).collect()))
            })
            .collect();
        match self.token(&access) {
            Ok(token) => respond(
                StatusCode::OK,
                json!({"token": token, "access_token": token, "expires_in": LIFETIME}).to_string(),
            ),
            Err(error) => respond(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        }
    }
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
