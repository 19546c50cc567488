//! Hostile input over the wire: each test starts its own standalone server on free ports with
//! real TLS, attacks it, then checks that it answered with a clear error or closed the
//! connection, that other clients are still served, and (where it matters) that memory stayed
//! bounded.
//!
//! Deadlines such as "closed within 10 s" bound a failing test; they are not timing
//! measurements.

mod common;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use arcguard::server::Limits;
use arcguard::server::Running;

use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{RwLock, oneshot};
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const MIB: usize = 1024 * 1024;
/// How long a connection may stay open after the timeout that should close it.
const CLOSE_BOUND: Duration = Duration::from_secs(10);

/// Tests that measure the process's memory hold this exclusively; the others share it, so their
/// allocations do not count against a measurement.
static MEMORY: RwLock<()> = RwLock::const_new(());

/// Limits small enough for each attack to hit them quickly.
fn small_limits() -> Limits {
    Limits {
        max_body_bytes: MIB,
        handshake_timeout: Duration::from_secs(1),
        header_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        max_connections: 8,
        ..Limits::default()
    }
}

struct Harness {
    dir: tempfile::TempDir,
    running: Running,
    stop: Option<oneshot::Sender<()>>,
}

impl Harness {
    async fn start(limits: Limits) -> Self {
        let common::Started { dir, running, stop } = common::start_server(limits).await;
        Self { dir, running, stop: Some(stop) }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("certs/ca.crt")
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.running.webhook_addr.port())
    }

    /// A reqwest client trusting the server's CA; `configure` picks the HTTP version.
    fn client_with(
        &self,
        configure: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
    ) -> reqwest::Client {
        let pem = std::fs::read(self.ca()).expect("ca file");
        let cert = reqwest::Certificate::from_pem(&pem).expect("ca pem");
        let builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert)
            .use_rustls_tls()
            .timeout(Duration::from_secs(20));
        configure(builder).build().expect("client")
    }

    fn client(&self) -> reqwest::Client {
        self.client_with(|b| b)
    }

    async fn post(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, String) {
        let response = self
            .client()
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// Another client is still served: a trusted pod is reviewed and allowed.
    async fn assert_still_serving(&self) {
        let body = std::fs::read(format!("{FIXTURES}/pod-create-trusted.json")).expect("fixture");
        let (status, text) = self.post("/validate", "application/json", body).await;
        assert_eq!(status, 200, "{text}");
        let review: Value = serde_json::from_str(&text).expect("json review");
        assert_eq!(review["response"]["allowed"], true, "{text}");
    }

    /// A rustls client configuration trusting the server's CA, offering `alpn`.
    fn tls_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        common::client_tls_config(&self.ca(), alpn)
    }

    async fn tcp(&self) -> TcpStream {
        TcpStream::connect(self.running.webhook_addr).await.expect("tcp connect")
    }

    /// A TLS connection offering HTTP/1.1 only, so raw HTTP/1.1 can be written to it.
    async fn tls(&self) -> io::Result<TlsStream<TcpStream>> {
        let connector = TlsConnector::from(self.tls_config(&[b"http/1.1"]));
        let name = ServerName::try_from("localhost").expect("name");
        connector.connect(name, self.tcp().await).await
    }

    /// An idle HTTP/2 connection: preface and SETTINGS sent, nothing more.
    async fn h2_idle(&self) -> TlsStream<TcpStream> {
        common::h2_idle(self.running.webhook_addr, &self.ca()).await
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(Duration::from_secs(30), self.running.done).await.expect("drains").expect("joins");
    }
}

/// Reads and discards until the peer closes (end of stream or a reset); false when the
/// connection is still open after `bound`.
async fn closed_within(stream: &mut (impl AsyncRead + Unpin), bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads until the peer closes or `bound` passes; returns what arrived and whether it closed.
async fn read_until_closed(
    stream: &mut (impl AsyncRead + Unpin),
    bound: Duration,
) -> (String, bool) {
    let deadline = Instant::now() + bound;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let closed = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    };
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

/// The status code of an HTTP/1.1 response text, if it has one.
fn status_of(response: &str) -> Option<u16> {
    response.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Bytes of a `/proc/self/status` field given in kB.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with(field)).expect("field in /proc/self/status");
    let kib: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().expect("kB");
    kib * 1024
}

/// Peak resident memory growth of the process since [`Peak::start`].
struct Peak {
    baseline: u64,
    /// Whether the kernel's high-water mark was reset, so transient peaks count.
    tracks_peak: bool,
}

impl Peak {
    fn start() -> Self {
        // Writing 5 resets VmHWM to the current RSS (Linux 4.0+).
        let tracks_peak = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        Self { baseline: proc_status_bytes("VmRSS:"), tracks_peak }
    }

    fn growth(&self) -> u64 {
        let now = proc_status_bytes(if self.tracks_peak { "VmHWM:" } else { "VmRSS:" });
        now.saturating_sub(self.baseline)
    }
}

/// A deterministic xorshift byte stream, so "random" input is the same on every run.
fn pseudo_random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()[0]
        })
        .collect()
}

/// An AdmissionReview of a CREATE of `group`/`kind` in namespace `shop` with `object` spliced
/// in as raw JSON text.
fn review_with_raw_object(group: &str, kind: &str, object: &str) -> Vec<u8> {
    format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"hostile-1","kind":{{"group":"{group}","version":"v1","kind":"{kind}"}},"operation":"CREATE","namespace":"shop","name":"victim","object":{object}}}}}"#
    )
    .into_bytes()
}

/// An AdmissionReview of a CREATE of a Pod with `count` containers, container `i` running
/// `image(i)`.
fn crowded_pod_review(count: usize, image: impl Fn(usize) -> String) -> Vec<u8> {
    let containers: Vec<Value> =
        (0..count).map(|i| json!({"name": format!("c{i}"), "image": image(i)})).collect();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "many-containers",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "shop",
            "name": "crowd",
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "crowd", "namespace": "shop"},
                "spec": {"containers": containers},
            },
        },
    });
    serde_json::to_vec(&review).expect("encode")
}

/// A review of a Windows pod whose `count` containers each name the sample credential spec
/// `webapp1`, which the mutating webhook inlines into every one.
fn windows_gmsa_pod_review(count: usize) -> Vec<u8> {
    let options = json!({"windowsOptions": {"gmsaCredentialSpecName": "webapp1"}});
    let containers: Vec<Value> = (0..count)
        .map(|i| json!({"name": format!("c{i}"), "image": "mcr.microsoft.com/windows/nanoserver:ltsc2022", "securityContext": options}))
        .collect();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "many-windows-containers",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "shop",
            "name": "iis",
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "iis", "namespace": "shop"},
                "spec": {"os": {"name": "windows"}, "containers": containers},
            },
        },
    });
    serde_json::to_vec(&review).expect("encode")
}

/// Writes a request head and then `body_len` bytes of body, in `chunked` encoding or with a
/// Content-Length, reusing one buffer so the client itself stays small; stops at the first
/// write error (the server closed).
async fn send_large_body(
    mut writer: impl AsyncWrite + Unpin,
    body_len: usize,
    chunked: bool,
) -> usize {
    let framing = if chunked {
        "transfer-encoding: chunked".to_owned()
    } else {
        format!("content-length: {body_len}")
    };
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"
    );
    if writer.write_all(head.as_bytes()).await.is_err() {
        return 0;
    }
    let piece = vec![b' '; 64 * 1024];
    let chunk_head = format!("{:x}\r\n", piece.len());
    let mut sent = 0;
    while sent < body_len {
        let written = if chunked {
            async {
                writer.write_all(chunk_head.as_bytes()).await?;
                writer.write_all(&piece).await?;
                writer.write_all(b"\r\n").await
            }
            .await
        } else {
            writer.write_all(&piece).await
        };
        if written.is_err() {
            return sent;
        }
        sent += piece.len();
    }
    if chunked {
        let _ = writer.write_all(b"0\r\n\r\n").await;
    }
    let _ = writer.flush().await;
    sent
}

#[tokio::test]
async fn oversized_bodies_get_413_without_being_buffered() {
    let _exclusive = MEMORY.write().await;
    let h = Harness::start(small_limits()).await;
    h.assert_still_serving().await;
    for chunked in [false, true] {
        let peak = Peak::start();
        let stream = h.tls().await.expect("tls");
        let (mut reader, writer) = tokio::io::split(stream);
        let sending = tokio::spawn(send_large_body(writer, 20 * MIB, chunked));
        let (response, closed) = read_until_closed(&mut reader, Duration::from_secs(20)).await;
        let sent = sending.await.expect("sender");
        assert!(closed, "chunked: {chunked}: still open after sending {sent} bytes");
        let growth = peak.growth();
        assert_eq!(status_of(&response), Some(413), "chunked: {chunked}; sent {sent}: {response}");
        // A server that buffered the 20 MiB body would grow by at least that much.
        assert!(
            growth < 16 * MIB as u64,
            "chunked: {chunked}; memory grew by {} MiB",
            growth / MIB as u64
        );
        h.assert_still_serving().await;
    }
    h.shutdown().await;
}

#[tokio::test]
async fn clients_that_stop_before_the_end_of_their_headers_are_disconnected() {
    let _shared = MEMORY.read().await;
    let h = Harness::start(small_limits()).await;
    let partial_heads: [&[u8]; 4] = [
        b"",
        b"POST /validate HTTP/1.1\r\nhost: localhost\r\ncontent-ty",
        b"POST /valid",
        // The start of the HTTP/2 preface: the server cannot yet tell which protocol it is.
        b"PRI * HTTP/2.0\r\n",
    ];
    for head in partial_heads {
        let mut stream = h.tls().await.expect("tls");
        stream.write_all(head).await.expect("write");
        stream.flush().await.expect("flush");
        assert!(
            closed_within(&mut stream, CLOSE_BOUND).await,
            "still open {CLOSE_BOUND:?} after sending {:?}",
            String::from_utf8_lossy(head)
        );
        h.assert_still_serving().await;
    }
    h.shutdown().await;
}

#[tokio::test]
async fn clients_that_trickle_their_body_get_408_or_are_disconnected() {
    let _shared = MEMORY.read().await;
    let h = Harness::start(small_limits()).await;
    let stream = h.tls().await.expect("tls");
    let (mut reader, mut writer) = tokio::io::split(stream);
    let trickle = tokio::spawn(async move {
        let head = "POST /validate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{";
        if writer.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        // One byte every 100 ms: the body would take minutes to arrive.
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            if writer.write_all(b" ").await.is_err() || writer.flush().await.is_err() {
                return;
            }
        }
    });
    let (response, closed) = read_until_closed(&mut reader, CLOSE_BOUND).await;
    trickle.abort();
    assert!(closed, "still open after {CLOSE_BOUND:?}: {response:?}");
    assert!(
        response.is_empty() || status_of(&response) == Some(408),
        "expected 408 or a closed connection, got {response:?}"
    );
    h.assert_still_serving().await;
    h.shutdown().await;
}

#[tokio::test]
async fn clients_that_do_not_read_their_response_are_disconnected() {
    let _exclusive = MEMORY.write().await;
    // One connection slot: while the slow reader holds it, nobody else is served.
    let limits = Limits {
        max_body_bytes: 8 * MIB,
        // Also how long a write may stall; long enough to decide 12 000 containers.
        request_timeout: Duration::from_secs(4),
        max_connections: 1,
        ..small_limits()
    };
    let h = Harness::start(limits).await;
    // A patch of several MiB (the gMSA credential spec inlined into 8 000 Windows containers):
    // more than the socket buffers of both ends hold.
    let body = windows_gmsa_pod_review(8_000);
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("receive buffer");
    let tcp = socket.connect(h.running.webhook_addr).await.expect("tcp connect");
    let name = ServerName::try_from("localhost").expect("name");
    let mut slow =
        TlsConnector::from(h.tls_config(&[b"http/1.1"])).connect(name, tcp).await.expect("tls");
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.expect("head");
    slow.write_all(&body).await.expect("body");
    slow.flush().await.expect("flush");

    // The slot is taken while the server answers the slow reader...
    let refused = h.client().get(h.url("/healthz")).send().await;
    assert!(refused.is_err(), "a second client was served beside the slow reader: {refused:?}");
    // ...and freed once the server gives up writing to it: a review is served again.
    let trusted = std::fs::read(format!("{FIXTURES}/pod-create-trusted.json")).expect("fixture");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = h
            .client()
            .post(h.url("/validate"))
            .header("content-type", "application/json")
            .body(trusted.clone())
            .send()
            .await;
        if let Ok(response) = attempt {
            let review: Value = response.json().await.expect("json review");
            assert_eq!(review["response"]["allowed"], true);
            break;
        }
        assert!(Instant::now() < deadline, "the slow reader still holds the only connection slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (response, closed) = read_until_closed(&mut slow, CLOSE_BOUND).await;
    assert!(closed, "the slow reader's connection is still open");
    assert_eq!(status_of(&response), Some(200), "{}", &response[..response.len().min(300)]);
    let length: usize = response
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let received = response.len() - response.find("\r\n\r\n").expect("end of head") - 4;
    // A complete response would mean it fit the buffers and the server never had to wait.
    assert!(received < length, "the whole {length} byte response was delivered");
    h.shutdown().await;
}

#[tokio::test]
async fn idle_connections_beyond_the_limit_are_closed_and_idle_ones_time_out() {
    let _shared = MEMORY.read().await;
    // Timeouts long enough that no idle connection times out while the excess is tried.
    let limits = Limits {
        handshake_timeout: Duration::from_secs(3),
        header_timeout: Duration::from_secs(3),
        ..small_limits()
    };
    let max = limits.max_connections;
    let h = Harness::start(limits).await;
    // Half never start TLS, half complete the handshake and send nothing.
    let mut raw_idle = Vec::new();
    for _ in 0..max / 2 {
        raw_idle.push(h.tcp().await);
    }
    let mut tls_idle = Vec::new();
    for _ in max / 2..max {
        tls_idle.push(h.tls().await.expect("an idle connection within the limit"));
    }
    for excess in 0..4 {
        let refused = timeout(CLOSE_BOUND, h.tls()).await.expect("excess connection answered");
        assert!(refused.is_err(), "excess connection {excess} was served");
    }
    let refused = h.client().get(h.url("/healthz")).send().await;
    assert!(refused.is_err(), "a client beyond the limit was served: {refused:?}");

    for (i, stream) in raw_idle.iter_mut().enumerate() {
        assert!(closed_within(stream, CLOSE_BOUND).await, "idle TCP connection {i} still open");
    }
    for (i, stream) in tls_idle.iter_mut().enumerate() {
        assert!(closed_within(stream, CLOSE_BOUND).await, "idle TLS connection {i} still open");
    }
    h.assert_still_serving().await;
    h.shutdown().await;
}

#[tokio::test]
async fn malformed_tls_handshakes_are_closed_and_the_server_keeps_serving() {
    let _shared = MEMORY.read().await;
    let h = Harness::start(small_limits()).await;
    let mut client_hello = Vec::new();
    let name = ServerName::try_from("localhost").expect("name");
    let mut hello = rustls::ClientConnection::new(h.tls_config(&[b"h2", b"http/1.1"]), name)
        .expect("client connection");
    hello.write_tls(&mut client_hello).expect("client hello");
    assert!(client_hello.len() > 100, "a ClientHello is a few hundred bytes");
    let truncated = client_hello[..client_hello.len() / 2].to_vec();
    let mut garbage_after_hello = client_hello.clone();
    garbage_after_hello.extend(pseudo_random_bytes(4096, 7));
    let cases: [(&str, Vec<u8>); 5] = [
        ("random bytes", pseudo_random_bytes(4096, 0x9e37_79b9_7f4a_7c15)),
        ("random bytes in a handshake record", {
            let mut record = vec![0x16, 0x03, 0x01, 0x10, 0x00];
            record.extend(pseudo_random_bytes(4096, 42));
            record
        }),
        ("a truncated ClientHello", truncated),
        ("a ClientHello followed by garbage", garbage_after_hello),
        (
            "plain HTTP",
            b"POST /validate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let mut stream = h.tcp().await;
        // The server may close (and reset) before everything is written.
        let _ = stream.write_all(&bytes).await;
        assert!(closed_within(&mut stream, CLOSE_BOUND).await, "{what}: connection still open");
        h.assert_still_serving().await;
    }
    h.shutdown().await;
}

#[tokio::test]
async fn http1_and_http2_give_the_same_review() {
    let _shared = MEMORY.read().await;
    let h = Harness::start(small_limits()).await;
    let clients = [
        (h.client_with(reqwest::ClientBuilder::http1_only), reqwest::Version::HTTP_11),
        (h.client_with(reqwest::ClientBuilder::http2_prior_knowledge), reqwest::Version::HTTP_2),
        // Offers h2 and http/1.1 over ALPN, as the apiserver does: the server picks h2.
        (h.client(), reqwest::Version::HTTP_2),
    ];
    for (path, fixture) in [
        ("/validate", "pod-create-untrusted"),
        ("/validate", "pod-create-trusted"),
        ("/mutate", "pod-create-trusted"),
        ("/mutate", "windows-pod-no-gmsa"),
    ] {
        let body = std::fs::read(format!("{FIXTURES}/{fixture}.json")).expect("fixture");
        let mut answers = Vec::new();
        for (client, version) in &clients {
            let response = client
                .post(h.url(path))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .expect("request");
            assert_eq!(response.version(), *version, "{path} {fixture}");
            let status = response.status().as_u16();
            let review: Value = response.json().await.expect("json review");
            answers.push((status, review));
        }
        assert_eq!(answers[0].0, 200, "{path} {fixture}: {:?}", answers[0].1);
        assert!(
            answers.windows(2).all(|pair| pair[0] == pair[1]),
            "{path} {fixture}: answers differ between HTTP versions: {answers:#?}"
        );
    }
    h.assert_still_serving().await;
    h.shutdown().await;
}

#[tokio::test]
async fn bodies_that_are_not_admission_reviews_get_a_4xx_with_a_reason() {
    let _shared = MEMORY.read().await;
    let h = Harness::start(small_limits()).await;
    let trusted = std::fs::read(format!("{FIXTURES}/pod-create-trusted.json")).expect("fixture");
    let cases: [(&str, &str, Vec<u8>, u16, &str); 8] = [
        (
            "not JSON",
            "application/json",
            b"hello, webhook".to_vec(),
            400,
            "invalid AdmissionReview at `.`: expected value",
        ),
        ("an empty body", "application/json", Vec::new(), 400, "EOF while parsing"),
        ("a JSON array", "application/json", b"[1, 2]".to_vec(), 400, "invalid AdmissionReview"),
        ("truncated JSON", "application/json", trusted[..trusted.len() / 2].to_vec(), 400, "EOF"),
        (
            "invalid UTF-8",
            "application/json",
            b"{\"kind\": \"\xff\xfe\"}".to_vec(),
            400,
            "invalid unicode",
        ),
        (
            "text/plain",
            "text/plain",
            trusted.clone(),
            415,
            "expected content-type application/json",
        ),
        (
            "form data",
            "application/x-www-form-urlencoded",
            trusted.clone(),
            415,
            "expected content-type application/json",
        ),
        ("YAML", "application/yaml", b"apiVersion: v1\n".to_vec(), 415, "application/json"),
    ];
    for (what, content_type, body, status, reason) in cases {
        for path in ["/validate", "/mutate"] {
            let (got, text) = h.post(path, content_type, body.clone()).await;
            assert_eq!(got, status, "{what} to {path}: {text}");
            assert!(text.contains(reason), "{what} to {path}: {text:?} lacks {reason:?}");
        }
    }
    // No content type at all.
    let response = h.client().post(h.url("/validate")).body(trusted).send().await.expect("request");
    assert_eq!(response.status(), 415);
    h.assert_still_serving().await;
    h.shutdown().await;
}

#[tokio::test]
async fn deeply_nested_json_is_refused_without_overflowing_the_stack() {
    let _exclusive = MEMORY.write().await;
    let h = Harness::start(small_limits()).await;
    h.assert_still_serving().await;
    let depth = 100_000;
    let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    let pod_with = |extra: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"victim","namespace":"shop"}},"spec":{{"containers":[{{"name":"app","image":"contoso.azurecr.io/app:1"}}],"extra":{extra}}}}}"#
        )
    };
    // (what, group, kind, object, expected status for /validate and /mutate, and reason)
    let cases: [(&str, &str, &str, String, u16, &str); 7] = [
        ("the object is nested arrays", "", "Pod", arrays.clone(), 400, "`request.object[0][0]`"),
        (
            "the Pod's metadata is nested arrays",
            "",
            "Pod",
            format!(r#"{{"metadata":{arrays}}}"#),
            400,
            "`request.object.metadata[0]`",
        ),
        (
            "a label of the Pod is nested objects",
            "",
            "Pod",
            format!(r#"{{"metadata":{{"labels":{{"app":{objects}}}}}}}"#),
            400,
            "`request.object.metadata.labels.app`",
        ),
        // Read as a JSON value: serde_json's recursion limit refuses it.
        (
            "a policy's spec is nested arrays",
            "arcguard.io",
            "ClusterGuardPolicy",
            format!(r#"{{"metadata":{{"name":"victim"}},"spec":{arrays}}}"#),
            400,
            "recursion limit exceeded",
        ),
        // Fields arcguard does not read are skipped without recursion: the object is reviewed.
        ("an unread field of the Pod is nested arrays", "", "Pod", pod_with(&arrays), 200, ""),
        (
            "the Pod's unread fields are nested objects",
            "",
            "Pod",
            format!(r#"{{"metadata":{{"name":"deep"}},"x":{objects}}}"#),
            200,
            "",
        ),
        ("an uninspected kind's object is nested objects", "", "ConfigMap", objects, 200, ""),
    ];
    let peak = Peak::start();
    for (what, group, kind, object, status, reason) in &cases {
        let body = review_with_raw_object(group, kind, object);
        for path in ["/validate", "/mutate"] {
            let (got, text) = h.post(path, "application/json", body.clone()).await;
            assert_eq!(got, *status, "{what} to {path}: {text}");
            if got == 200 {
                let review: Value = serde_json::from_str(&text).expect("json review");
                assert_eq!(review["response"]["allowed"], true, "{what} to {path}: {text}");
            } else {
                assert!(text.contains(reason), "{what} to {path}: {text:?} lacks {reason:?}");
                // The reason names where, without echoing the input back.
                assert!(text.len() < 4096, "{what} to {path}: a {} byte reason", text.len());
            }
        }
        h.assert_still_serving().await;
    }
    let growth = peak.growth();
    assert!(growth < 64 * MIB as u64, "memory grew by {} MiB", growth / MIB as u64);
    h.shutdown().await;
}

#[tokio::test]
async fn a_pod_with_thousands_of_untrusted_containers_is_denied_in_time() {
    let _exclusive = MEMORY.write().await;
    let limits = Limits { request_timeout: Duration::from_secs(10), ..small_limits() };
    let request_timeout = limits.request_timeout;
    let h = Harness::start(limits).await;
    h.assert_still_serving().await;
    let count = 5_000;
    let body = crowded_pod_review(count, |i| format!("registry.evil.example/app{i}:1"));
    assert!(body.len() < MIB, "the review fits the body limit: {} bytes", body.len());
    let peak = Peak::start();
    let started = Instant::now();
    let (status, text) = h.post("/validate", "application/json", body).await;
    let elapsed = started.elapsed();
    let growth = peak.growth();
    assert_eq!(status, 200, "{}", &text[..text.len().min(500)]);
    assert!(elapsed < request_timeout, "answered after {elapsed:?}");
    let answer: Value = serde_json::from_str(&text).expect("json review");
    assert_eq!(answer["response"]["uid"], "many-containers");
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 403);
    let message = answer["response"]["status"]["message"].as_str().expect("message");
    for first in ["c0", "c1", "c2"] {
        assert!(message.contains(&format!("container \"{first}\"")), "{first} not named");
    }
    // The message lists the first violations and counts the rest, so it stays readable.
    let listed = message.lines().filter(|l| l.starts_with("- [")).count();
    assert_eq!(listed, arcguard::pipeline::MAX_LISTED, "{}", &message[..message.len().min(500)]);
    let more = format!("and {} more violations", count - listed);
    assert!(message.contains(&more), "no count of the rest");
    assert!(text.len() < 64 * 1024, "the response is {} bytes", text.len());
    assert!(growth < 64 * MIB as u64, "memory grew by {} MiB", growth / MIB as u64);
    h.assert_still_serving().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_request_without_a_uid_gets_400_naming_the_uid() {
    let _shared = MEMORY.read().await;
    let h = Harness::start(small_limits()).await;
    let trusted = std::fs::read(format!("{FIXTURES}/pod-create-trusted.json")).expect("fixture");
    let mut missing: Value = serde_json::from_slice(&trusted).expect("fixture json");
    missing["request"].as_object_mut().expect("request").remove("uid");
    let mut empty = missing.clone();
    empty["request"]["uid"] = json!("");
    let mut null = missing.clone();
    null["request"]["uid"] = Value::Null;
    for (what, review) in [("missing", missing), ("empty", empty), ("null", null)] {
        let body = serde_json::to_vec(&review).expect("encode");
        for path in ["/validate", "/mutate"] {
            let (status, text) = h.post(path, "application/json", body.clone()).await;
            assert_eq!(status, 400, "{what} uid to {path}: {text}");
            assert!(text.contains("uid"), "{what} uid to {path}: {text}");
        }
    }
    h.assert_still_serving().await;
    h.shutdown().await;
}

#[tokio::test]
async fn idle_http2_connections_are_closed_with_a_goaway() {
    let _shared = MEMORY.read().await;
    // Pings far apart, so only the idle timeout can close the connection.
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        keep_alive_interval: Duration::from_secs(3600),
        ..small_limits()
    };
    let h = Harness::start(limits).await;
    let mut stream = h.h2_idle().await;
    let (frames, closed) = common::h2_frames(&mut stream, CLOSE_BOUND, None).await;
    assert!(closed, "an idle HTTP/2 connection is still open after {CLOSE_BOUND:?}: {frames:?}");
    assert!(frames.contains(&common::H2_GOAWAY), "closed without a GOAWAY: frames {frames:?}");
    h.assert_still_serving().await;
    h.shutdown().await;
}

#[tokio::test]
async fn http2_peers_that_stop_answering_pings_are_dropped() {
    let _shared = MEMORY.read().await;
    // No idle timeout to speak of: only unanswered PINGs can close the connection.
    let limits = Limits {
        idle_timeout: Duration::from_secs(3600),
        keep_alive_interval: Duration::from_millis(300),
        keep_alive_timeout: Duration::from_millis(300),
        ..small_limits()
    };
    let h = Harness::start(limits).await;
    let mut stream = h.h2_idle().await;
    let (frames, closed) = common::h2_frames(&mut stream, CLOSE_BOUND, None).await;
    assert!(frames.contains(&common::H2_PING), "no keep-alive PING was sent: frames {frames:?}");
    assert!(closed, "a peer that never answered a PING is still connected: {frames:?}");
    h.assert_still_serving().await;
    h.shutdown().await;
}

#[tokio::test]
async fn idle_http1_keep_alive_connections_close_after_the_header_timeout() {
    let _shared = MEMORY.read().await;
    // The HTTP/2 idle timeout is far longer: HTTP/1.1 keeps its own, shorter one.
    let limits = Limits { idle_timeout: Duration::from_secs(3600), ..small_limits() };
    let h = Harness::start(limits).await;
    let mut stream = h.tls().await.expect("tls");
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").await.expect("request");
    let (response, closed) = read_until_closed(&mut stream, CLOSE_BOUND).await;
    assert_eq!(status_of(&response), Some(200), "{response}");
    assert!(!response.to_ascii_lowercase().contains("connection: close"), "{response}");
    assert!(closed, "an idle HTTP/1.1 keep-alive connection is still open: {response}");
    h.shutdown().await;
}

#[tokio::test]
async fn concurrent_near_limit_reviews_stay_within_the_memory_budget() {
    // Alone: the measurement must not count other tests' allocations.
    let _exclusive = MEMORY.write().await;
    let budget = 24 * MIB;
    let limits = Limits {
        max_body_bytes: 3 * MIB,
        request_timeout: Duration::from_secs(10),
        max_connections: 256,
        memory_budget: budget,
        ..Limits::default()
    };
    let h = Harness::start(limits).await;
    // A pod review of nearly 3 MiB (the apiserver's request size limit), the bulk in an
    // annotation arcguard never decodes: what anyone who may create pods can send.
    let filler = "a".repeat(3 * MIB - 4096);
    let object = format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"big","namespace":"shop","annotations":{{"x":"{filler}"}}}},"spec":{{"containers":[{{"name":"app","image":"contoso.azurecr.io/shop/web:1.0"}}]}}}}"#
    );
    let body = axum::body::Bytes::from(review_with_raw_object("", "Pod", &object));
    drop(filler);
    drop(object);
    let client = h.client_with(|b| b.http1_only());
    let concurrency = 48;
    let peak = Peak::start();
    let requests = (0..concurrency).map(|_| {
        let request = client
            .post(h.url("/validate"))
            .header("content-type", "application/json")
            .body(body.clone());
        async move {
            let response = request.send().await.expect("answered");
            let status = response.status().as_u16();
            (status, response.text().await.expect("body"))
        }
    });
    let answers = futures::future::join_all(requests).await;
    let growth = peak.growth();
    let admitted = answers.iter().filter(|(status, _)| *status == 200).count();
    for (status, text) in &answers {
        match status {
            200 => assert!(text.contains("\"allowed\":true"), "{text}"),
            503 => assert!(text.contains("arcguard is at its memory budget"), "{text}"),
            other => panic!("answered {other}: {text}"),
        }
    }
    assert!(admitted > 0, "every request was refused");
    // The budget bounds what the server holds; the rest is the client's shared body and the
    // connections' buffers.
    assert!(
        growth < (budget + 16 * MIB) as u64,
        "memory grew by {} MiB for a {} MiB budget ({admitted} of {concurrency} admitted)",
        growth / MIB as u64,
        budget / MIB
    );
    h.assert_still_serving().await;
    h.shutdown().await;
}
