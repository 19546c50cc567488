//! The certificate controller's reconcile against a mocked apiserver: every expected request is
//! checked (method, path, body) and answered in order; a missing call times out, an extra one
//! fails the reconcile.

use std::time::Duration;

use arcguard::certs::CertInfo;
use arcguard::certs::plan::{
    CA_BUNDLE_KEY, CA_CERT_KEY, CA_KEY_KEY, REVOKE_ANNOTATION, REVOKE_HANDLED_ANNOTATION,
    TLS_CERT_KEY,
};
use std::sync::Arc;

use arcguard::cluster::certs::{
    CertApis, CertConfig, ControllerError, Outcome, reconcile_once, request_revoke, run_controller,
};
use arcguard::cluster::leader::Leadership;
use arcguard::cluster::objects::{Objects, Seen};
use arcguard::metrics::Metrics;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;
use tower_test::mock::{Handle, SendResponse};

type ApiServer = Handle<Request<Body>, Response<Body>>;

const SECRET_PATH: &str = "/api/v1/namespaces/arcguard-system/secrets/arcguard-tls";
const SECRETS_PATH: &str = "/api/v1/namespaces/arcguard-system/secrets";
const VALIDATING_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/arcguard";
const MUTATING_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/arcguard";

/// 2026-01-01T00:00:00Z.
fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
}

fn context() -> (CertApis, ApiServer) {
    let (service, server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "arcguard-system");
    (CertApis::new(client, "arcguard-system"), server)
}

/// A request as the mock apiserver received it.
struct Received {
    content_type: Option<String>,
    query: String,
    body: Value,
    send: SendResponse<Response<Body>>,
}

/// Takes the next request and checks its method and path.
async fn expect(server: &mut ApiServer, method: Method, path: &str) -> Received {
    let (request, send) = server.next_request().await.expect("the client sends a request");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query = request.uri().query().unwrap_or_default().to_owned();
    let bytes = request.into_body().collect_bytes().await.expect("request body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON request body")
    };
    Received { content_type, query, body, send }
}

fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    let bytes = serde_json::to_vec(body).expect("serializes");
    let response = Response::builder().status(status).body(Body::from(bytes)).expect("response");
    send.send_response(response);
}

fn ok(received: Received, body: &Value) {
    respond(received.send, StatusCode::OK, body);
}

fn fail(received: Received, code: u16, reason: &str) {
    let status = StatusCode::from_u16(code).expect("status code");
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("mock {reason}"), "reason": reason, "code": code,
    });
    respond(received.send, status, &body);
}

fn not_found(received: Received) {
    fail(received, 404, "NotFound");
}

/// One reconcile at `t0`; a reconcile that waits for an answer that never comes (e.g. a
/// retry the scenario does not expect) fails instead of hanging.
async fn reconcile(apis: &CertApis, config: &CertConfig) -> Result<Outcome, ControllerError> {
    tokio::time::timeout(Duration::from_secs(5), reconcile_once(apis, config, t0()))
        .await
        .expect("the reconcile finishes without further calls")
}

/// Waits for the scenario to finish: a call that never came fails here.
async fn finished(scenario: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(5), scenario)
        .await
        .expect("every expected call arrived")
        .expect("the scenario's assertions hold");
}

fn webhook(name: &str, bundle: Option<&str>) -> Value {
    let mut client_config = json!({"service": {"name": "arcguard", "namespace": "arcguard-system", "path": "/validate"}});
    if let Some(bundle) = bundle {
        client_config["caBundle"] = b64(bundle.as_bytes());
    }
    json!({
        "name": name, "clientConfig": client_config,
        "sideEffects": "None", "admissionReviewVersions": ["v1"],
    })
}

fn configuration(kind: &str, version: &str, webhooks: &[Value]) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
        "metadata": {"name": "arcguard", "resourceVersion": version},
        "webhooks": webhooks,
    })
}

fn validating(version: &str, webhooks: &[Value]) -> Value {
    configuration("ValidatingWebhookConfiguration", version, webhooks)
}

fn mutating(version: &str, webhooks: &[Value]) -> Value {
    configuration("MutatingWebhookConfiguration", version, webhooks)
}

fn b64(bytes: &[u8]) -> Value {
    serde_json::to_value(ByteString(bytes.to_vec())).expect("encodes")
}

/// A data value of a Secret as JSON, decoded.
fn data(secret: &Value, key: &str) -> String {
    let decoded: ByteString =
        serde_json::from_value(secret["data"][key].clone()).expect("base64 data");
    String::from_utf8(decoded.0).expect("UTF-8")
}

/// The Secret the apiserver returns after storing `body`.
fn stored(mut body: Value, version: &str) -> Value {
    body["metadata"]["resourceVersion"] = json!(version);
    body["metadata"]["uid"] = json!("5e1c7e75-0000-4000-8000-000000000001");
    body
}

/// Creates the Secret from nothing at `t0` and returns it as stored (resourceVersion "1").
async fn created_secret(config: &CertConfig) -> Value {
    created_secret_at(config, t0()).await
}

/// Creates the Secret from nothing at `now` and returns it as stored (resourceVersion "1").
async fn created_secret_at(config: &CertConfig, now: OffsetDateTime) -> Value {
    let (apis, mut server) = context();
    let scenario = tokio::spawn(async move {
        not_found(expect(&mut server, Method::GET, SECRET_PATH).await);
        not_found(expect(&mut server, Method::GET, VALIDATING_PATH).await);
        not_found(expect(&mut server, Method::GET, MUTATING_PATH).await);
        let post = expect(&mut server, Method::POST, SECRETS_PATH).await;
        let secret = stored(post.body.clone(), "1");
        ok(post, &secret);
        secret
    });
    let outcome = tokio::time::timeout(Duration::from_secs(5), reconcile_once(&apis, config, now))
        .await
        .expect("the reconcile finishes without further calls")
        .expect("reconciles");
    assert_eq!(outcome, Outcome::Wrote(arcguard::certs::plan::Reason::Created));
    tokio::time::timeout(Duration::from_secs(5), scenario)
        .await
        .expect("every expected call arrived")
        .expect("the scenario's assertions hold")
}

/// The leader's loop, not one reconcile: a change that lands while a plan is reading (here a
/// revocation request just after the Secret was read, as when a new leader's first plan races
/// the request) wakes another plan at once. It must not be folded into the plan that missed
/// it, or the request waits for the next due time (weeks away).
#[tokio::test]
async fn a_change_that_lands_during_a_plan_wakes_the_next_plan() {
    let config = CertConfig::default();
    let secret = created_secret_at(&config, OffsetDateTime::now_utc()).await;
    let bundle = data(&secret, CA_BUNDLE_KEY);
    let vwc = validating(
        "10",
        &[
            webhook("validate.arcguard.io", Some(&bundle)),
            webhook("policies.arcguard.io", Some(&bundle)),
        ],
    );
    let mwc = mutating("20", &[webhook("mutate.arcguard.io", Some(&bundle))]);
    let mut revoked = secret.clone();
    revoked["metadata"]["annotations"] = json!({REVOKE_ANNOTATION: "rotate-now"});
    revoked["metadata"]["resourceVersion"] = json!("2");

    let (secret_events, secret_seen) = watch::channel(Seen::<Secret>::NotListed);
    let (_validating_events, validating_seen) = watch::channel(Seen::NotListed);
    let (_mutating_events, mutating_seen) = watch::channel(Seen::NotListed);
    let objects = Objects::from_channels(secret_seen, validating_seen, mutating_seen);
    let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "arcguard-system");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run_controller(
        client,
        objects,
        config,
        Leadership::fixed(true),
        Arc::new(Metrics::new()),
        async {
            let _ = stopped.await;
        },
    ));

    // The first plan reads a settled state; the revocation's watch event arrives mid-plan.
    ok(expect(&mut server, Method::GET, SECRET_PATH).await, &secret);
    let event: Secret = serde_json::from_value(revoked.clone()).expect("a Secret");
    secret_events.send_replace(Seen::Present(Arc::new(event)));
    ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
    ok(expect(&mut server, Method::GET, MUTATING_PATH).await, &mwc);

    // The next plan comes at once, reads the request and acts on it.
    let next =
        tokio::time::timeout(Duration::from_secs(5), expect(&mut server, Method::GET, SECRET_PATH))
            .await
            .expect("a change during the plan wakes the next plan");
    ok(next, &revoked);
    ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
    ok(expect(&mut server, Method::GET, MUTATING_PATH).await, &mwc);
    let write = expect(&mut server, Method::PUT, SECRET_PATH).await;
    assert_eq!(write.body["metadata"]["annotations"][REVOKE_HANDLED_ANNOTATION], "rotate-now");
    assert_ne!(data(&write.body, CA_CERT_KEY), data(&secret, CA_CERT_KEY));

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), controller)
        .await
        .expect("the controller stops on shutdown")
        .expect("the controller task")
        .expect("the controller's configuration is valid");
}

#[tokio::test]
async fn from_nothing_the_secret_is_created_then_every_webhook_gets_the_bundle_then_all_is_quiet() {
    let config = CertConfig::default();
    let (apis, mut server) = context();

    // 1. Nothing exists: the Secret is created (POST, never an update).
    let scenario = tokio::spawn(async move {
        not_found(expect(&mut server, Method::GET, SECRET_PATH).await);
        let vwc = validating(
            "10",
            &[webhook("validate.arcguard.io", None), webhook("policies.arcguard.io", None)],
        );
        ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
        let mwc = mutating("20", &[webhook("mutate.arcguard.io", Some("stale"))]);
        ok(expect(&mut server, Method::GET, MUTATING_PATH).await, &mwc);
        let post = expect(&mut server, Method::POST, SECRETS_PATH).await;
        assert!(post.query.contains("fieldManager=arcguard"), "{}", post.query);
        let secret = stored(post.body.clone(), "1");
        ok(post, &secret);
        (server, secret, vwc, mwc)
    });
    let outcome = reconcile(&apis, &config).await.expect("reconciles");
    assert_eq!(outcome, Outcome::Wrote(arcguard::certs::plan::Reason::Created));
    let (mut server, secret, vwc, mwc) =
        tokio::time::timeout(Duration::from_secs(5), scenario).await.expect("calls").expect("ok");

    assert_eq!(secret["metadata"]["name"], "arcguard-tls");
    assert_eq!(secret["metadata"]["namespace"], "arcguard-system");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(secret["metadata"]["labels"]["app.kubernetes.io/managed-by"], "arcguard");
    let ca = data(&secret, CA_CERT_KEY);
    let serving = CertInfo::from_pem(data(&secret, TLS_CERT_KEY)).expect("serving cert");
    assert!(serving.verifies_with(&ca).expect("checks"));
    assert_eq!(
        serving.dns_names,
        [
            "arcguard",
            "arcguard.arcguard-system",
            "arcguard.arcguard-system.svc",
            "arcguard.arcguard-system.svc.cluster.local"
        ]
    );
    assert!(data(&secret, CA_KEY_KEY).contains("PRIVATE KEY"));
    let bundle = data(&secret, CA_BUNDLE_KEY);

    // 2. The bundle goes into every webhook, one conditional JSON patch per configuration.
    let expected_bundle = bundle.clone();
    let scenario = tokio::spawn(async move {
        ok(expect(&mut server, Method::GET, SECRET_PATH).await, &secret);
        ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
        ok(expect(&mut server, Method::GET, MUTATING_PATH).await, &mwc);
        let encoded = b64(expected_bundle.as_bytes());
        let patch = expect(&mut server, Method::PATCH, VALIDATING_PATH).await;
        assert_eq!(patch.content_type.as_deref(), Some("application/json-patch+json"));
        assert_eq!(
            patch.body,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "10"},
                {"op": "test", "path": "/webhooks/0/name", "value": "validate.arcguard.io"},
                {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": encoded},
                {"op": "test", "path": "/webhooks/1/name", "value": "policies.arcguard.io"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": encoded},
            ])
        );
        let vwc = validating(
            "11",
            &[
                webhook("validate.arcguard.io", Some(&expected_bundle)),
                webhook("policies.arcguard.io", Some(&expected_bundle)),
            ],
        );
        ok(patch, &vwc);
        let patch = expect(&mut server, Method::PATCH, MUTATING_PATH).await;
        assert_eq!(
            patch.body,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "20"},
                {"op": "test", "path": "/webhooks/0/name", "value": "mutate.arcguard.io"},
                {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": encoded},
            ])
        );
        let mwc = mutating("21", &[webhook("mutate.arcguard.io", Some(&expected_bundle))]);
        ok(patch, &mwc);
        (server, secret, vwc, mwc)
    });
    let outcome = reconcile(&apis, &config).await.expect("reconciles");
    assert_eq!(outcome, Outcome::Injected { validating: 2, mutating: 1 });
    let (mut server, secret, vwc, mwc) =
        tokio::time::timeout(Duration::from_secs(5), scenario).await.expect("calls").expect("ok");

    // 3. Reads only, and the next plan is when the serving certificate is due.
    let scenario = tokio::spawn(async move {
        ok(expect(&mut server, Method::GET, SECRET_PATH).await, &secret);
        ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
        ok(expect(&mut server, Method::GET, MUTATING_PATH).await, &mwc);
    });
    let outcome = reconcile(&apis, &config).await.expect("reconciles");
    let renew = t0() + config.serving_validity - config.serving_renew_before;
    assert_eq!(outcome, Outcome::Idle { until: Some(renew) });
    finished(scenario).await;
}

#[tokio::test]
async fn a_webhook_someone_reset_gets_the_bundle_again_and_nothing_else_is_touched() {
    let config = CertConfig::default();
    let secret = created_secret(&config).await;
    let bundle = data(&secret, CA_BUNDLE_KEY);
    let (apis, mut server) = context();
    let scenario = tokio::spawn(async move {
        ok(expect(&mut server, Method::GET, SECRET_PATH).await, &secret);
        let vwc = validating(
            "30",
            &[
                webhook("validate.arcguard.io", Some(&bundle)),
                webhook("policies.arcguard.io", None),
            ],
        );
        ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
        let mwc = mutating("40", &[webhook("mutate.arcguard.io", Some(&bundle))]);
        ok(expect(&mut server, Method::GET, MUTATING_PATH).await, &mwc);
        let patch = expect(&mut server, Method::PATCH, VALIDATING_PATH).await;
        assert_eq!(
            patch.body,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "30"},
                {"op": "test", "path": "/webhooks/1/name", "value": "policies.arcguard.io"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": b64(bundle.as_bytes())},
            ])
        );
        ok(patch, &vwc);
        // No PATCH of the mutating configuration: its webhook already carries the bundle.
    });
    let outcome = reconcile(&apis, &config).await.expect("reconciles");
    assert_eq!(outcome, Outcome::Injected { validating: 1, mutating: 0 });
    finished(scenario).await;
}

#[tokio::test]
async fn a_conflict_on_the_secret_is_reported_once_and_the_next_reconcile_reads_afresh() {
    let config = CertConfig::default();
    let secret = created_secret(&config).await;
    let mut renamed = config.clone();
    renamed.service_name = "guard".to_owned();
    let (apis, mut server) = context();
    let ours = secret.clone();
    let scenario = tokio::spawn(async move {
        ok(expect(&mut server, Method::GET, SECRET_PATH).await, &ours);
        not_found(expect(&mut server, Method::GET, VALIDATING_PATH).await);
        not_found(expect(&mut server, Method::GET, MUTATING_PATH).await);
        let put = expect(&mut server, Method::PUT, SECRET_PATH).await;
        assert_eq!(put.body["metadata"]["resourceVersion"], "1", "conditional on what was read");
        fail(put, 409, "Conflict");
        // Nothing more: no retry inside the reconcile.
        server
    });
    let outcome = reconcile(&apis, &renamed).await.expect("a conflict is no error");
    assert_eq!(outcome, Outcome::Conflict);
    let mut server =
        tokio::time::timeout(Duration::from_secs(5), scenario).await.expect("calls").expect("ok");

    // Meanwhile the other writer stored a certificate for the new name: re-read, nothing to do.
    let theirs = created_secret(&renamed).await;
    let scenario = tokio::spawn(async move {
        ok(expect(&mut server, Method::GET, SECRET_PATH).await, &stored(theirs, "2"));
        not_found(expect(&mut server, Method::GET, VALIDATING_PATH).await);
        not_found(expect(&mut server, Method::GET, MUTATING_PATH).await);
    });
    let outcome = reconcile(&apis, &renamed).await.expect("reconciles");
    assert!(matches!(outcome, Outcome::Idle { .. }), "{outcome:?}");
    finished(scenario).await;
}

#[tokio::test]
async fn a_failed_patch_test_is_a_conflict_not_an_error() {
    let config = CertConfig::default();
    let secret = created_secret(&config).await;
    let (apis, mut server) = context();
    let scenario = tokio::spawn(async move {
        ok(expect(&mut server, Method::GET, SECRET_PATH).await, &secret);
        let vwc = validating("50", &[webhook("validate.arcguard.io", None)]);
        ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
        not_found(expect(&mut server, Method::GET, MUTATING_PATH).await);
        // The configuration changed after it was read: the `test` op fails with 422.
        fail(expect(&mut server, Method::PATCH, VALIDATING_PATH).await, 422, "Invalid");
    });
    let outcome = reconcile(&apis, &config).await.expect("a conflict is no error");
    assert_eq!(outcome, Outcome::Conflict);
    finished(scenario).await;
}

#[tokio::test]
async fn other_api_failures_are_errors_that_name_the_object() {
    let config = CertConfig::default();
    let (apis, mut server) = context();
    let scenario = tokio::spawn(async move {
        fail(expect(&mut server, Method::GET, SECRET_PATH).await, 403, "Forbidden");
    });
    let err = reconcile(&apis, &config).await.expect_err("forbidden");
    assert!(matches!(err, ControllerError::Read { .. }), "{err}");
    assert!(err.to_string().contains("Secret arcguard-system/arcguard-tls"), "{err}");
    finished(scenario).await;
}

#[tokio::test]
async fn an_external_secret_is_never_written_and_only_its_ca_is_injected() {
    let config = CertConfig { external: true, ..CertConfig::default() };
    // Absent: nothing to do (cert-manager has not issued yet), and no write.
    let (apis, mut server) = context();
    let scenario = tokio::spawn(async move {
        not_found(expect(&mut server, Method::GET, SECRET_PATH).await);
        let vwc = validating("60", &[webhook("validate.arcguard.io", None)]);
        ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
        not_found(expect(&mut server, Method::GET, MUTATING_PATH).await);
        server
    });
    let outcome = reconcile(&apis, &config).await.expect("reconciles");
    assert_eq!(outcome, Outcome::Idle { until: None });
    let mut server =
        tokio::time::timeout(Duration::from_secs(5), scenario).await.expect("calls").expect("ok");

    // A cert-manager Secret, even with a revoke request and an odd layout: inject ca.crt only.
    let managed = created_secret(&CertConfig::default()).await;
    let ca = data(&managed, CA_CERT_KEY);
    let mut cert_manager = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "arcguard-tls", "namespace": "arcguard-system", "resourceVersion": "9",
                     "annotations": {REVOKE_ANNOTATION: "please", "cert-manager.io/issuer-name": "ca"}},
        "data": {"ca.crt": managed["data"]["ca.crt"], "tls.crt": managed["data"]["tls.crt"],
                 "tls.key": managed["data"]["tls.key"]},
    });
    cert_manager["metadata"]["uid"] = json!("c3a7e7e0-0000-4000-8000-000000000002");
    let expected = ca.clone();
    let scenario = tokio::spawn(async move {
        ok(expect(&mut server, Method::GET, SECRET_PATH).await, &cert_manager);
        let vwc = validating("60", &[webhook("validate.arcguard.io", None)]);
        ok(expect(&mut server, Method::GET, VALIDATING_PATH).await, &vwc);
        not_found(expect(&mut server, Method::GET, MUTATING_PATH).await);
        let patch = expect(&mut server, Method::PATCH, VALIDATING_PATH).await;
        assert_eq!(patch.body[2]["value"], b64(expected.as_bytes()));
        ok(patch, &vwc);
    });
    let outcome = reconcile(&apis, &config).await.expect("reconciles");
    assert_eq!(outcome, Outcome::Injected { validating: 1, mutating: 0 });
    finished(scenario).await;
}

#[tokio::test]
async fn revoke_annotates_the_secret_and_the_next_reconcile_replaces_everything_at_once() {
    let config = CertConfig::default();

    // `arcguard certs revoke`: a merge patch of the annotation only.
    let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "arcguard-system");
    let secret = created_secret(&config).await;
    let annotated = secret.clone();
    let scenario = tokio::spawn(async move {
        let patch = expect(&mut server, Method::PATCH, SECRET_PATH).await;
        assert_eq!(patch.content_type.as_deref(), Some("application/merge-patch+json"));
        let value = patch.body["metadata"]["annotations"][REVOKE_ANNOTATION].clone();
        assert!(value.as_str().is_some_and(|v| v.starts_with("20")), "a timestamp: {value}");
        assert_eq!(patch.body.as_object().map(|o| o.len()), Some(1), "metadata only");
        let mut annotated = annotated;
        annotated["metadata"]["annotations"] = json!({REVOKE_ANNOTATION: value});
        ok(patch, &annotated);
        annotated
    });
    let value = tokio::time::timeout(
        Duration::from_secs(5),
        request_revoke(client, "arcguard-system", "arcguard-tls"),
    )
    .await
    .expect("one call")
    .expect("requests");
    let annotated =
        tokio::time::timeout(Duration::from_secs(5), scenario).await.expect("calls").expect("ok");
    assert_eq!(annotated["metadata"]["annotations"][REVOKE_ANNOTATION], value.as_str());

    // The leader replaces CA and serving certificate; the bundle holds the new CA alone.
    let old_ca = data(&secret, CA_CERT_KEY);
    let (apis, mut server) = context();
    let request = value.clone();
    let scenario = tokio::spawn(async move {
        ok(expect(&mut server, Method::GET, SECRET_PATH).await, &annotated);
        not_found(expect(&mut server, Method::GET, VALIDATING_PATH).await);
        not_found(expect(&mut server, Method::GET, MUTATING_PATH).await);
        let put = expect(&mut server, Method::PUT, SECRET_PATH).await;
        let annotations = &put.body["metadata"]["annotations"];
        assert_eq!(annotations[REVOKE_HANDLED_ANNOTATION], request.as_str());
        assert_eq!(annotations[REVOKE_ANNOTATION], request.as_str(), "the request stays");
        let new_ca = data(&put.body, CA_CERT_KEY);
        assert_ne!(new_ca, old_ca);
        assert_eq!(data(&put.body, CA_BUNDLE_KEY), format!("{}\n", new_ca.trim_end()));
        let body = put.body.clone();
        ok(put, &stored(body, "2"));
    });
    let outcome = reconcile(&apis, &config).await.expect("reconciles");
    assert_eq!(outcome, Outcome::Wrote(arcguard::certs::plan::Reason::Revoked));
    finished(scenario).await;
}

#[tokio::test]
async fn revoking_without_a_secret_says_what_is_missing() {
    let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "arcguard-system");
    let scenario = tokio::spawn(async move {
        not_found(expect(&mut server, Method::PATCH, SECRET_PATH).await);
    });
    let err = request_revoke(client, "arcguard-system", "arcguard-tls").await.expect_err("absent");
    assert!(matches!(err, ControllerError::NoSecret { .. }), "{err}");
    assert!(err.to_string().contains("arcguard-system/arcguard-tls does not exist"), "{err}");
    finished(scenario).await;
}

/// Keeps the `Secret` import honest: the Secret JSON the mock returns is a valid Secret.
#[tokio::test]
async fn the_created_secret_is_a_valid_secret_object() {
    let secret = created_secret(&CertConfig::default()).await;
    let parsed: Secret = serde_json::from_value(secret).expect("a Secret");
    let keys: Vec<&str> = parsed.data.iter().flatten().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["ca-bundle.crt", "ca.crt", "ca.key", "tls.crt", "tls.key"]);
}
