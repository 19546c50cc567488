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
//!
//! It runs as its own process (the `noop_webhook` binary, [`serve`]), as arcguard does: a
//! server sharing the busy harness's process finds its threads awake and its caches warm,
//! where a webhook of its own pays, on every call at a trickle, the wake-up of an idle process
//! (on this project's 2-core VM, about 150–300 µs of CPU for any request to an idle server,
//! against 6 µs under load). The harness controls it over the same port: `GET /calls` answers
//! the reviews answered so far, `PUT /patch` sets the patch (its body, base64; empty for none).

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::cluster::webhook_configurations;
use crate::pki::ControlPlanePki;
use crate::process::{Proc, Scratch, free_port};

/// The name of the configurations [`NoopWebhook::configurations`] returns, so they never
/// collide with arcguard's (whose caBundle arcguard's leader rewrites).
pub const CONFIGURATION_NAME: &str = "noop-floor";

/// A running no-op webhook process; stopped on drop.
#[derive(Debug)]
pub struct NoopWebhook {
    url: String,
    ca_pem: String,
    /// The harness's client for `/calls` and `/patch`, trusting `ca_pem`.
    control: reqwest::Client,
    process: Proc,
    _scratch: Scratch,
}

impl NoopWebhook {
    /// Starts the `noop_webhook` binary (next to the running one, or `ARCGUARD_NOOP_WEBHOOK`)
    /// on a free loopback port and waits until it answers.
    ///
    /// # Errors
    /// When certificates cannot be made, no port is free, or the process does not answer
    /// within 10 s.
    pub async fn start() -> Result<Self> {
        let pki = ControlPlanePki::generate()?;
        let scratch = Scratch::new("noop-webhook")?;
        let (cert, key) = (scratch.path().join("tls.crt"), scratch.path().join("tls.key"));
        std::fs::write(&cert, &pki.apiserver.cert_pem)?;
        std::fs::write(&key, &pki.apiserver.key_pem)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let bin = match std::env::var_os("ARCGUARD_NOOP_WEBHOOK") {
            Some(bin) => PathBuf::from(bin),
            None => std::env::current_exe()?.with_file_name("noop_webhook"),
        };
        let mut command = Command::new(&bin);
        command.arg(&addr).arg(&cert).arg(&key);
        let process = Proc::spawn("noop_webhook", command, &scratch.path().join("noop.log"))
            .with_context(|| {
                format!("starting {} (built by bench/create-latency.sh)", bin.display())
            })?;
        let control = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.cert_pem.as_bytes())?)
            .timeout(Duration::from_secs(5))
            .build()?;
        let webhook = Self {
            url: format!("https://{addr}"),
            ca_pem: pki.ca.cert_pem,
            control,
            process,
            _scratch: scratch,
        };
        // Readiness: the first answer to /calls (connection refused until it listens).
        let ready = crate::cluster::eventually(Duration::from_secs(10), || webhook.calls()).await;
        if let Err(error) = ready {
            bail!("the no-op webhook did not answer: {error:#}\n{}", webhook.process.log_tail(20));
        }
        Ok(webhook)
    }

    /// The process id, for its CPU time.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The reviews answered so far.
    ///
    /// # Errors
    /// When the process does not answer.
    pub async fn calls(&self) -> Result<u64> {
        let response = self.control.get(format!("{}/calls", self.url)).send().await?;
        Ok(response.error_for_status()?.text().await?.trim().parse()?)
    }

    /// Answers reviews on `/mutate` with this JSON Patch (an array of operations) from now on,
    /// or with none.
    ///
    /// # Errors
    /// When the process does not take it.
    pub async fn set_patch(&self, patch: Option<&Value>) -> Result<()> {
        let encoded = patch
            .map(|patch| base64::engine::general_purpose::STANDARD.encode(patch.to_string()))
            .unwrap_or_default();
        self.control
            .put(format!("{}/patch", self.url))
            .body(encoded)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
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

/// Serves the no-op webhook and its control endpoints on `listener` until the process ends.
pub async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    let calls = Arc::new(AtomicU64::new(0));
    let patch: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        // As arcguard's server does (src/server/tls.rs): without it, Nagle's algorithm
        // holds a response written in two parts until the apiserver's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (acceptor, calls, patch) = (acceptor.clone(), calls.clone(), patch.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |request| {
                route(request, calls.clone(), patch.clone())
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

/// The control endpoints, or the webhook.
async fn route(
    request: Request<Incoming>,
    calls: Arc<AtomicU64>,
    patch: Arc<Mutex<Option<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/calls") => {
            Ok(Response::new(Full::new(Bytes::from(calls.load(Ordering::Relaxed).to_string()))))
        }
        (&Method::PUT, "/patch") => {
            let body =
                request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let encoded = String::from_utf8_lossy(&body).trim().to_owned();
            *patch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                (!encoded.is_empty()).then_some(encoded);
            Ok(Response::new(Full::new(Bytes::new())))
        }
        (&Method::POST, _) => answer(request, calls, patch).await,
        _ => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_FOUND;
            Ok(response)
        }
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
