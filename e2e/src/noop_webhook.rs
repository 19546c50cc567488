//! A webhook that allows everything: the floor any admission webhook costs a pod CREATE (the
//! apiserver encoding the AdmissionReview, the call over TLS, decoding the answer), against
//! which `create_latency` measures what arcguard itself adds.
//!
//! It serves HTTPS on a loopback port (HTTP/2 or HTTP/1.1, as the apiserver chooses), reads
//! each review's `request.uid`, and answers `allowed: true`, with no patch unless one is set
//! ([`NoopWebhook::set_patch`]: the JSON Patch arcguard would answer, so that what the
//! apiserver spends applying a mutation is part of the floor too). Its certificate is
//! a fresh one from [`ControlPlanePki`] (SANs `localhost`, `127.0.0.1`); the configurations it
//! is registered with carry that CA as their caBundle.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::cluster::webhook_configurations;
use crate::pki::ControlPlanePki;

/// The name of the configurations [`NoopWebhook::configurations`] returns, so they never
/// collide with arcguard's (whose caBundle arcguard's leader rewrites).
pub const CONFIGURATION_NAME: &str = "noop-floor";

/// A running no-op webhook; stopped on drop.
#[derive(Debug)]
pub struct NoopWebhook {
    url: String,
    ca_pem: String,
    calls: Arc<AtomicU64>,
    /// The JSON Patch answered to reviews on `/mutate`, base64-encoded as the response carries it.
    patch: Arc<Mutex<Option<String>>>,
    server: tokio::task::JoinHandle<()>,
}

impl NoopWebhook {
    /// Starts it on a free loopback port.
    ///
    /// # Errors
    /// When certificates cannot be made or no port is free.
    pub async fn start() -> Result<Self> {
        let pki = ControlPlanePki::generate()?;
        let acceptor = crate::pki::tls_acceptor(&pki.apiserver.cert_pem, &pki.apiserver.key_pem)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let calls = Arc::new(AtomicU64::new(0));
        let patch = Arc::new(Mutex::new(None));
        let (counter, answered) = (calls.clone(), patch.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                // As arcguard's server does (src/server/tls.rs): without it, Nagle's algorithm
                // holds a response written in two parts until the apiserver's delayed ACK.
                let _ = tcp.set_nodelay(true);
                let (acceptor, counter, answered) =
                    (acceptor.clone(), counter.clone(), answered.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request| {
                        answer(request, counter.clone(), answered.clone())
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        Ok(Self { url, ca_pem: pki.ca.cert_pem, calls, patch, server })
    }

    /// The reviews answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Answers reviews on `/mutate` with this JSON Patch (an array of operations) from now on,
    /// or with none.
    pub fn set_patch(&self, patch: Option<&Value>) {
        let encoded =
            patch.map(|patch| base64::engine::general_purpose::STANDARD.encode(patch.to_string()));
        *self.patch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = encoded;
    }

    /// arcguard's two webhook configurations (same webhooks, rules and selectors, so the
    /// apiserver makes the same calls) renamed [`CONFIGURATION_NAME`], pointing here, trusting
    /// this server's CA, and failing closed.
    ///
    /// # Errors
    /// When arcguard's manifests cannot be read.
    pub fn configurations(&self) -> Result<Vec<Value>> {
        let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let mut configurations = webhook_configurations(&self.url)?;
        for configuration in &mut configurations {
            configuration["metadata"] = json!({"name": CONFIGURATION_NAME});
            let webhooks = configuration["webhooks"]
                .as_array_mut()
                .ok_or_else(|| anyhow!("a webhook configuration without webhooks"))?;
            for webhook in webhooks {
                webhook["clientConfig"]["caBundle"] = json!(ca_bundle);
                webhook["failurePolicy"] = json!("Fail");
            }
        }
        Ok(configurations)
    }
}

impl Drop for NoopWebhook {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Allows the review, echoing its uid, with the patch set for `/mutate`, if any.
async fn answer(
    request: Request<Incoming>,
    calls: Arc<AtomicU64>,
    patch: Arc<Mutex<Option<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mutate = request.uri().path() == "/mutate";
    #[derive(Deserialize)]
    struct Review {
        request: Option<Uid>,
    }
    #[derive(Deserialize)]
    struct Uid {
        uid: String,
    }
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let uid = serde_json::from_slice::<Review>(&body)
        .ok()
        .and_then(|review| review.request)
        .map(|request| request.uid)
        .unwrap_or_default();
    calls.fetch_add(1, Ordering::Relaxed);
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true},
    });
    let patch = if mutate {
        patch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    } else {
        None
    };
    if let Some(patch) = patch {
        review["response"]["patchType"] = json!("JSONPatch");
        review["response"]["patch"] = json!(patch);
    }
    let mut response = Response::new(Full::new(Bytes::from(review.to_string())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
