//! Leader election against a mocked apiserver: create, renew, lose a race, take over an
//! expired Lease, step down when renewals fail, release on shutdown.

use std::time::Duration;

use arcguard::cluster::leader::{LeaderElector, Leadership, LeaseConfig, Tick};
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower_test::mock::{Handle, SendResponse};

type ApiServer = Handle<Request<Body>, Response<Body>>;

const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/arcguard-system/leases";
const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/arcguard-system/leases/arcguard-leader";

/// 2026-01-01T00:00:00Z.
fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
}

fn at(seconds: i64) -> OffsetDateTime {
    t0() + time::Duration::seconds(seconds)
}

fn elector() -> (LeaderElector, Leadership, ApiServer) {
    let (service, server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "arcguard-system");
    let (elector, leadership) =
        LeaderElector::new(client, LeaseConfig::new("arcguard-system", "arcguard-0"));
    (elector, leadership, server)
}

async fn expect(
    server: &mut ApiServer,
    method: Method,
    path: &str,
) -> (Value, SendResponse<Response<Body>>) {
    let (request, send) = server.next_request().await.expect("the client sends a request");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    let bytes = request.into_body().collect_bytes().await.expect("request body");
    let body =
        if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON") };
    (body, send)
}

fn respond(send: SendResponse<Response<Body>>, code: u16, body: &Value) {
    let status = StatusCode::from_u16(code).expect("status code");
    let bytes = serde_json::to_vec(body).expect("serializes");
    send.send_response(
        Response::builder().status(status).body(Body::from(bytes)).expect("response"),
    );
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("mock {reason}"), "reason": reason, "code": code})
}

fn lease(holder: Option<&str>, version: &str) -> Value {
    let mut spec = json!({"leaseDurationSeconds": 15, "renewTime": "2026-01-01T00:00:00.000000Z",
                          "leaseTransitions": 3});
    if let Some(holder) = holder {
        spec["holderIdentity"] = json!(holder);
    }
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "arcguard-leader", "namespace": "arcguard-system",
                        "resourceVersion": version},
           "spec": spec})
}

/// The stored Lease after a write of `body`.
fn stored(mut body: Value, version: &str) -> Value {
    body["metadata"]["resourceVersion"] = json!(version);
    body
}

async fn tick(
    elector: &mut LeaderElector,
    now: OffsetDateTime,
) -> Result<Tick, arcguard::cluster::leader::LeaderError> {
    tokio::time::timeout(Duration::from_secs(5), elector.tick(now))
        .await
        .expect("the tick finishes without further calls")
}

async fn finished<T>(scenario: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), scenario)
        .await
        .expect("every expected call arrived")
        .expect("the scenario's assertions hold")
}

/// An elector that created the Lease at `t0` and leads; the server and the stored Lease.
async fn leading() -> (LeaderElector, Leadership, ApiServer, Value) {
    let (mut elector, leadership, mut server) = elector();
    let scenario = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, LEASE_PATH).await;
        respond(send, 404, &status(404, "NotFound"));
        let (body, send) = expect(&mut server, Method::POST, LEASES_PATH).await;
        assert_eq!(body["spec"]["holderIdentity"], "arcguard-0");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(body["spec"]["leaseTransitions"], 0);
        assert_eq!(body["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z");
        assert_eq!(body["spec"]["renewTime"], "2026-01-01T00:00:00.000000Z");
        let lease = stored(body, "1");
        respond(send, 201, &lease);
        (server, lease)
    });
    assert_eq!(tick(&mut elector, t0()).await.expect("ticks"), Tick::Leading);
    let (server, lease) = finished(scenario).await;
    assert!(leadership.is_leader());
    (elector, leadership, server, lease)
}

#[tokio::test]
async fn an_absent_lease_is_created_and_then_renewed_without_reading_it_again() {
    let (mut elector, leadership, mut server, _) = leading().await;
    let scenario = tokio::spawn(async move {
        // No GET: the leader writes conditionally on the version it wrote last.
        let (body, send) = expect(&mut server, Method::PUT, LEASE_PATH).await;
        assert_eq!(body["metadata"]["resourceVersion"], "1");
        assert_eq!(body["spec"]["holderIdentity"], "arcguard-0");
        assert_eq!(body["spec"]["renewTime"], "2026-01-01T00:00:05.000000Z");
        assert_eq!(body["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z", "unchanged");
        respond(send, 200, &stored(body, "2"));
    });
    assert_eq!(tick(&mut elector, at(5)).await.expect("ticks"), Tick::Leading);
    finished(scenario).await;
    assert!(leadership.is_leader());
}

#[tokio::test]
async fn a_live_lease_of_another_replica_is_followed_and_taken_over_only_after_it_expires() {
    let (mut elector, leadership, mut server) = elector();
    let scenario = tokio::spawn(async move {
        // First sight: follow, no write.
        let (_, send) = expect(&mut server, Method::GET, LEASE_PATH).await;
        respond(send, 200, &lease(Some("arcguard-1"), "7"));
        // 14 s later, same version: still live on our clock, whatever its renewTime says.
        let (_, send) = expect(&mut server, Method::GET, LEASE_PATH).await;
        respond(send, 200, &lease(Some("arcguard-1"), "7"));
        // 15 s after first sight, still unrenewed: take over, conditionally.
        let (_, send) = expect(&mut server, Method::GET, LEASE_PATH).await;
        respond(send, 200, &lease(Some("arcguard-1"), "7"));
        let (body, send) = expect(&mut server, Method::PUT, LEASE_PATH).await;
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        assert_eq!(body["spec"]["holderIdentity"], "arcguard-0");
        assert_eq!(body["spec"]["leaseTransitions"], 4);
        assert_eq!(body["spec"]["acquireTime"], "2026-01-01T00:00:15.000000Z");
        respond(send, 200, &stored(body, "8"));
    });
    let following = Tick::Following { holder: Some("arcguard-1".to_owned()) };
    assert_eq!(tick(&mut elector, t0()).await.expect("ticks"), following);
    assert!(!leadership.is_leader());
    assert_eq!(tick(&mut elector, at(14)).await.expect("ticks"), following);
    assert_eq!(tick(&mut elector, at(15)).await.expect("ticks"), Tick::Leading);
    assert!(leadership.is_leader());
    finished(scenario).await;
}

#[tokio::test]
async fn a_lost_race_makes_a_follower_without_retrying() {
    let (mut elector, leadership, mut server) = elector();
    let scenario = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::GET, LEASE_PATH).await;
        respond(send, 200, &lease(None, "7"));
        let (_, send) = expect(&mut server, Method::PUT, LEASE_PATH).await;
        respond(send, 409, &status(409, "Conflict"));
        // Nothing more in this tick; the next one reads afresh.
        let (_, send) = expect(&mut server, Method::GET, LEASE_PATH).await;
        respond(send, 200, &lease(Some("arcguard-1"), "8"));
    });
    assert_eq!(tick(&mut elector, t0()).await.expect("ticks"), Tick::Following { holder: None });
    assert!(!leadership.is_leader());
    let next = tick(&mut elector, at(2)).await.expect("ticks");
    assert_eq!(next, Tick::Following { holder: Some("arcguard-1".to_owned()) });
    finished(scenario).await;
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down_at_the_renew_deadline() {
    let (mut elector, leadership, mut server, _) = leading().await;
    let scenario = tokio::spawn(async move {
        for _ in 0..2 {
            let (_, send) = expect(&mut server, Method::PUT, LEASE_PATH).await;
            respond(send, 500, &status(500, "InternalError"));
        }
    });
    tick(&mut elector, at(5)).await.expect_err("renewal fails");
    assert!(leadership.is_leader(), "within the deadline it still leads");
    let err = tick(&mut elector, at(10)).await.expect_err("renewal fails");
    assert!(
        err.to_string().contains("failed to update Lease arcguard-system/arcguard-leader"),
        "{err}"
    );
    assert!(!leadership.is_leader(), "stepped down before the Lease can expire");
    finished(scenario).await;
}

#[tokio::test]
async fn release_turns_leadership_off_first_and_empties_the_holder() {
    let (mut elector, mut leadership, mut server, _) = leading().await;
    let mut watcher = leadership.clone();
    let scenario = tokio::spawn(async move {
        let (body, send) = expect(&mut server, Method::PUT, LEASE_PATH).await;
        // Leadership was already off when the release was sent.
        assert!(!watcher.is_leader());
        watcher.wait_for(false).await.expect("observed");
        assert_eq!(body["metadata"]["resourceVersion"], "1");
        assert!(body["spec"]["holderIdentity"].as_str().unwrap_or_default().is_empty(), "{body}");
        respond(send, 200, &stored(body, "2"));
    });
    tokio::time::timeout(Duration::from_secs(5), elector.release(at(3)))
        .await
        .expect("one call")
        .expect("releases");
    finished(scenario).await;
    leadership.wait_for(false).await.expect("not leading");
}

#[tokio::test]
async fn a_follower_releases_nothing() {
    let (mut elector, _, _server) = elector();
    // No scenario: any call would hang and time out.
    tokio::time::timeout(Duration::from_secs(5), elector.release(t0()))
        .await
        .expect("no call")
        .expect("nothing to release");
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewal_hangs_steps_down_at_its_renew_deadline() {
    let (mut elector, leadership, mut server, _) = leading().await;
    // The apiserver accepts the renewal and never answers (hung, not down).
    let scenario = tokio::spawn(async move {
        let (_, send) = expect(&mut server, Method::PUT, LEASE_PATH).await;
        (server, send)
    });
    // Renewed at t0; the renew deadline is 10 s: this round gets the 5 s left, not forever.
    let started = tokio::time::Instant::now();
    let result = elector.tick(at(5)).await;
    let waited = started.elapsed();
    assert!(
        matches!(result, Err(arcguard::cluster::leader::LeaderError::Timeout { .. })),
        "{result:?}"
    );
    assert_eq!(waited, Duration::from_secs(5), "gave up exactly at the renew deadline");
    assert!(!leadership.is_leader(), "a leader cut off from the apiserver keeps leading");
    let (_server, _hung) = finished(scenario).await;
}
