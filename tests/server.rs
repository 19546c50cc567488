//! The standalone server over real TLS sockets: webhooks, probes, metrics, limits, and hot
//! reload of certificates and policies.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use arcguard::server::Limits;
use arcguard::server::Running;
use serde_json::Value;
use tokio::sync::oneshot;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

struct Harness {
    dir: tempfile::TempDir,
    running: Running,
    stop: Option<oneshot::Sender<()>>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(Limits::default()).await
    }

    async fn start_with(limits: Limits) -> Self {
        let common::Started { dir, running, stop } = common::start_server(limits).await;
        Self { dir, running, stop: Some(stop) }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn client_trusting(&self, ca: &Path) -> reqwest::Client {
        let pem = std::fs::read(ca).expect("ca file");
        let cert = reqwest::Certificate::from_pem(&pem).expect("ca pem");
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert)
            .use_rustls_tls()
            .build()
            .expect("client")
    }

    fn client(&self) -> reqwest::Client {
        self.client_trusting(&self.path("certs/ca.crt"))
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.running.webhook_addr.port())
    }

    fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.running.metrics_addr)
    }

    async fn post_fixture(
        &self,
        client: &reqwest::Client,
        path: &str,
        fixture: &str,
    ) -> reqwest::Result<reqwest::Response> {
        let body = std::fs::read(format!("{FIXTURES}/{fixture}.json")).expect("fixture");
        client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
    }

    async fn review(&self, path: &str, fixture: &str) -> Value {
        let response = self.post_fixture(&self.client(), path, fixture).await.expect("request");
        assert_eq!(response.status(), 200);
        response.json().await.expect("json review")
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.running.done)
            .await
            .expect("drains")
            .expect("joins");
    }
}

/// Retries `probe` until it returns true; the deadline only bounds a failing test.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn webhooks_answer_with_the_request_uid_over_tls() {
    let h = Harness::start().await;
    let denied = h.review("/validate", "pod-create-untrusted").await;
    assert_eq!(denied["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(denied["kind"], "AdmissionReview");
    assert_eq!(denied["response"]["uid"], "2b1f6e3c-0002-4c1e-9a51-000000000002");
    assert_eq!(denied["response"]["allowed"], false);
    assert_eq!(denied["response"]["status"]["code"], 403);
    let message = denied["response"]["status"]["message"].as_str().expect("message");
    assert!(message.contains("contoso.azurecr.io"), "{message}");

    let allowed = h.review("/validate", "pod-create-trusted").await;
    assert_eq!(allowed["response"]["allowed"], true);

    let patched = h.review("/mutate", "pod-create-trusted").await;
    assert_eq!(patched["response"]["patchType"], "JSONPatch");
    assert!(patched["response"]["patch"].is_string());

    for probe in ["/healthz", "/readyz"] {
        let response = h.client().get(h.url(probe)).send().await.expect("probe");
        assert_eq!(response.status(), 200, "{probe}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let h = Harness::start_with(Limits { max_body_bytes: 64 * 1024, ..Limits::default() }).await;
    let client = h.client();
    let post = |body: Vec<u8>, content_type: &'static str| {
        client.post(h.url("/validate")).header("content-type", content_type).body(body).send()
    };
    let response =
        post(b"{\"apiVersion\": 1}".to_vec(), "application/json").await.expect("request");
    assert_eq!(response.status(), 400);
    let reason = response.text().await.expect("text");
    assert!(reason.contains("invalid AdmissionReview at `apiVersion`"), "{reason}");

    let response = post(b"{}".to_vec(), "text/plain").await.expect("request");
    assert_eq!(response.status(), 415);

    let response = post(vec![b' '; 128 * 1024], "application/json").await.expect("request");
    assert_eq!(response.status(), 413);

    let response = client.get(h.url("/validate")).send().await.expect("request");
    assert_eq!(response.status(), 405);

    // The server keeps serving everyone else.
    assert_eq!(h.review("/validate", "pod-create-trusted").await["response"]["allowed"], true);
    h.shutdown().await;
}

#[tokio::test]
async fn metrics_count_requests_and_policies() {
    let h = Harness::start().await;
    h.review("/validate", "pod-create-untrusted").await;
    h.review("/mutate", "pod-create-trusted").await;
    let text = reqwest::get(h.metrics_url()).await.expect("metrics").text().await.expect("text");
    for line in [
        r#"arcguard_admission_requests_total{webhook="validate",kind="Pod",operation="CREATE",decision="denied"} 1"#,
        r#"arcguard_admission_requests_total{webhook="mutate",kind="Pod",operation="CREATE",decision="patched"} 1"#,
        r#"arcguard_policy_results_total{policy="trusted-registries",rule="trustedRegistries",action="Deny",result="fail"} 1"#,
        r#"arcguard_policies{rule="gmsa",action="Deny"} 1"#,
        "arcguard_admission_request_duration_seconds_bucket",
        r#"arcguard_certificate_expiry_timestamp_seconds{certificate="serving"}"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn certificates_are_reloaded_without_a_restart() {
    let h = Harness::start().await;
    let old_client = h.client();
    assert!(old_client.get(h.url("/healthz")).send().await.is_ok());

    // Issue a new CA and serving certificate elsewhere, then move them into place.
    let fresh = h.path("fresh");
    arcguard::certs::write_bundle(
        &fresh,
        &["localhost".to_owned()],
        &["127.0.0.1".parse().expect("ip")],
        time::Duration::days(30),
        time::OffsetDateTime::now_utc(),
    )
    .expect("new bundle");
    std::fs::rename(fresh.join("tls.key"), h.path("certs/tls.key")).expect("key");
    std::fs::rename(fresh.join("tls.crt"), h.path("certs/tls.crt")).expect("cert");

    let new_client = h.client_trusting(&fresh.join("ca.crt"));
    eventually("the new certificate to be served", || async {
        new_client.get(h.url("/healthz")).send().await.is_ok()
    })
    .await;
    let stale = h.client_trusting(&h.path("certs/ca.crt"));
    assert!(
        stale.get(h.url("/healthz")).send().await.is_err(),
        "the old CA no longer verifies new connections"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn policy_edits_apply_live_and_bad_edits_keep_the_last_good_set() {
    let h = Harness::start().await;
    let file = h.path("policies/trusted-registries.yaml");
    let original = std::fs::read_to_string(&file).expect("policy");
    assert_eq!(h.review("/validate", "deployment-untrusted").await["response"]["allowed"], false);

    // Trust ghcr.io/acme: the Deployment's init image is then allowed.
    let edited =
        original.replace("- contoso.azurecr.io\n", "- contoso.azurecr.io\n      - ghcr.io/acme\n");
    assert_ne!(edited, original);
    std::fs::write(&file, edited).expect("write");
    eventually("the edited policy to apply", || async {
        h.review("/validate", "deployment-untrusted").await["response"]["allowed"] == true
    })
    .await;

    // A broken edit is refused and the last good set stays in force.
    std::fs::write(&file, original.replace("registries:", "registriez:")).expect("write");
    let metrics = reqwest::Client::new();
    eventually("the failed reload to be counted", || async {
        let text =
            metrics.get(h.metrics_url()).send().await.expect("metrics").text().await.expect("text");
        // At least one: a reload may also catch the file half written (empty), and count two.
        text.lines().any(|line| {
            line.strip_prefix(r#"arcguard_policy_reloads_total{result="failure"} "#)
                .and_then(|count| count.trim().parse::<u64>().ok())
                .is_some_and(|count| count >= 1)
        })
    })
    .await;
    assert_eq!(h.review("/validate", "deployment-untrusted").await["response"]["allowed"], true);
    assert_eq!(h.review("/validate", "pod-create-untrusted").await["response"]["allowed"], false);
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_turns_readiness_false_and_drains() {
    let h = Harness::start().await;
    let readiness = h.running.state.readiness.clone();
    assert!(readiness.is_ready());
    let addr = h.running.webhook_addr;
    h.shutdown().await;
    assert!(!readiness.is_ready());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn a_draining_server_tells_every_connection_to_leave_while_it_still_answers() {
    // A shutdown delay long enough for the checks below; they end it early by finishing.
    let delay = Duration::from_secs(5);
    let common::Started { dir, running, stop } =
        common::start_server_with(Limits::default(), delay).await;
    let h = Harness { dir, running, stop: Some(stop) };
    let h1 = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(h.path("certs/ca.crt")).expect("ca"))
                .expect("pem"),
        )
        .use_rustls_tls()
        .http1_only()
        .build()
        .expect("client");
    // Pooled connections made before the shutdown, as the apiserver holds them.
    let response = h.post_fixture(&h1, "/validate", "pod-create-trusted").await.expect("h1");
    assert_eq!(response.status(), 200);
    assert_ne!(response.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    let mut h2 = common::h2_idle(h.running.webhook_addr, &h.path("certs/ca.crt")).await;
    // The server's SETTINGS: the HTTP/2 connection is established.
    let (frames, _) = common::h2_frames(&mut h2, Duration::from_secs(20), Some(4)).await;
    assert_eq!(frames.first(), Some(&4), "no SETTINGS from the server: {frames:?}");

    // Load on pooled HTTP/1.1 connections across the start of the drain: no request may fail.
    let (stop_load, load_stopped) = tokio::sync::watch::channel(false);
    let mut load = Vec::new();
    for _ in 0..4 {
        let client = h1.clone();
        let url = h.url("/validate");
        let body = std::fs::read(format!("{FIXTURES}/pod-create-trusted.json")).expect("fixture");
        let stopped = load_stopped.clone();
        load.push(tokio::spawn(async move {
            let (mut sent, mut failed) = (0_u32, Vec::new());
            while !*stopped.borrow() {
                let result = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                sent += 1;
                match result {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failed.push(format!("status {}", r.status())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (sent, failed)
        }));
    }

    let readiness = h.running.state.readiness.clone();
    let addr = h.running.webhook_addr;
    let mut h = h;
    if let Some(stop) = h.stop.take() {
        let _ = stop.send(());
    }
    eventually("readiness to turn false", || {
        let readiness = readiness.clone();
        async move { !readiness.is_ready() }
    })
    .await;

    // HTTP/2: a GOAWAY arrives while the listener still accepts.
    let (frames, closed) =
        common::h2_frames(&mut h2, Duration::from_secs(20), Some(common::H2_GOAWAY)).await;
    assert_eq!(
        frames.last(),
        Some(&common::H2_GOAWAY),
        "no GOAWAY while draining: {frames:?}, closed: {closed}"
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok(), "the listener closed first");
    // HTTP/1.1: answered, and told to close the connection.
    let response = h.post_fixture(&h1, "/validate", "pod-create-trusted").await.expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "a response while draining must say Connection: close"
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok(), "the listener closed first");

    let _ = stop_load.send(true);
    let mut total = 0;
    for task in load {
        let (sent, failed) = task.await.expect("load task");
        assert!(failed.is_empty(), "requests failed while draining: {failed:?}");
        total += sent;
    }
    assert!(total > 0, "no load was sent");
    tokio::time::timeout(Duration::from_secs(30), h.running.done)
        .await
        .expect("drains")
        .expect("joins");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
}
