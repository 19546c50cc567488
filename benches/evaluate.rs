//! In-process benchmarks: policy evaluation, AdmissionReview decode and encode, the pure
//! pipeline bytes-in/bytes-out, and the axum router without sockets or TLS.
//!
//! Run with `cargo bench --bench evaluate`; BENCHMARKS.md records the results and the machine.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use arcguard::admission::{self, RequestView, review};
use arcguard::image;
use arcguard::pipeline::{self, Webhook, patch};
use arcguard::policy::PolicySet;
use arcguard::policy::load::{Loaded, load_dir, load_sources};
use arcguard::rules::StaticFacts;
use arcguard::server::{AppState, Limits, Snapshot, webhook_router};
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::Value;
use tower::ServiceExt as _;

/// Policy counts of the scaling benchmark: enough points to see the trend is linear.
const POLICY_COUNTS: [usize; 3] = [10, 50, 100];
/// Containers in the large pod.
const LARGE_CONTAINERS: usize = 20;

fn sample_policies() -> Loaded {
    load_dir(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies")))
        .expect("the sample policies load")
}

/// The realistic pod review (a Deployment's pod: managedFields, env, volumes, tolerations,
/// owner reference), compacted as the apiserver sends it.
fn typical_body() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pod-create-trusted.json");
    let text = std::fs::read(path).expect("the fixture is readable");
    let review: Value = serde_json::from_slice(&text).expect("the fixture is JSON");
    serde_json::to_vec(&review).expect("JSON re-encodes")
}

/// The typical review with every image moved to a registry no sample policy trusts (what
/// `bench/load.sh` sends as `denied`): the same bytes to decode, and each container a violation
/// to word.
fn denied_body() -> Vec<u8> {
    let mut review: Value = serde_json::from_slice(&typical_body()).expect("JSON");
    let spec = &mut review["request"]["object"]["spec"];
    for group in ["initContainers", "containers", "ephemeralContainers"] {
        if let Some(containers) = spec.get_mut(group).and_then(Value::as_array_mut) {
            for container in containers {
                let image = container["image"].as_str().unwrap_or_default();
                let path = image.split_once('/').map_or(image, |(_, path)| path);
                container["image"] = Value::String(format!("untrusted.example.com/{path}"));
            }
        }
    }
    serde_json::to_vec(&review).expect("JSON re-encodes")
}

/// The typical review with its containers repeated up to `count`, each renamed.
fn large_body(count: usize) -> Vec<u8> {
    let mut review: Value = serde_json::from_slice(&typical_body()).expect("JSON");
    let containers = review["request"]["object"]["spec"]["containers"]
        .as_array()
        .expect("the fixture has containers")
        .clone();
    let repeated: Vec<Value> = (0..count)
        .map(|i| {
            let mut container = containers[i % containers.len()].clone();
            container["name"] = Value::String(format!("c{i}"));
            container
        })
        .collect();
    review["request"]["object"]["spec"]["containers"] = Value::Array(repeated);
    serde_json::to_vec(&review).expect("JSON re-encodes")
}

/// `count` valid policies, a rotation of the three rule kinds, actions and match styles,
/// every one of which applies to the fixture pod (namespace `shop`, label `app: web`).
fn generated_policies(count: usize) -> Loaded {
    let text: String = (0..count)
        .map(|i| {
            let action = ["Deny", "Warn", "Audit"][(i / 3) % 3];
            let matcher = match i % 4 {
                0 => "",
                1 => "  match: {excludedNamespaces: [kube-system, arcguard-system]}\n",
                2 => "  match: {namespaces: [shop, default]}\n",
                _ => "  match: {objectSelector: {matchLabels: {app: web}}}\n",
            };
            let rule = match i % 3 {
                0 => format!(
                    "  trustedRegistries:\n    registries: [registry{i}.example.com, contoso.azurecr.io, mcr.microsoft.com/oss]\n"
                ),
                1 => "  gmsa: {requireForWindows: true, resolveCredentialSpecs: true, authorizeServiceAccount: false}\n".to_owned(),
                _ => format!(
                    "  calicoLinuxOnly: {{osLabelKey: bench.arcguard.io/os-{i}, labelPods: true, scopePolicies: Mutate}}\n"
                ),
            };
            format!(
                "---\napiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {{name: bench-{i:03}}}\nspec:\n  action: {action}\n{matcher}{rule}"
            )
        })
        .collect();
    let loaded = load_sources(&[("generated.yaml".to_owned(), text)])
        .expect("the generated policies are valid");
    assert_eq!(loaded.policies.len(), count);
    loaded
}

fn view_of(body: &[u8]) -> RequestView {
    admission::prepare(body).expect("the review decodes").view.expect("a pod is inspected")
}

/// Checks a policy set applies in full to the view, so the benchmark measures real work.
fn assert_all_apply(policies: &PolicySet, view: &RequestView, facts: &StaticFacts) {
    let applicable = policies.applicable(view, facts).count();
    assert_eq!(applicable, policies.len(), "every policy must match the benchmark pod");
}

fn configure() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

fn evaluation(c: &mut Criterion) {
    let loaded = sample_policies();
    let view = view_of(&typical_body());
    assert_all_apply(&loaded.policies, &view, &loaded.facts);
    let mut group = c.benchmark_group("evaluate/typical");
    group.bench_function("validate", |b| {
        b.iter(|| black_box(loaded.policies.validate(black_box(&view), &loaded.facts)))
    });
    group.bench_function("mutate", |b| {
        b.iter(|| black_box(loaded.policies.mutate(black_box(&view), &loaded.facts)))
    });
    group.finish();

    let view = view_of(&large_body(LARGE_CONTAINERS));
    let mut group = c.benchmark_group("evaluate/large-pod");
    for count in POLICY_COUNTS {
        let loaded = generated_policies(count);
        assert_all_apply(&loaded.policies, &view, &loaded.facts);
        // Per-policy throughput makes linear scaling read as a flat elements/s figure.
        group.throughput(Throughput::Elements(count as u64));
        group.bench_with_input(BenchmarkId::new("validate", count), &loaded, |b, loaded| {
            b.iter(|| black_box(loaded.policies.validate(black_box(&view), &loaded.facts)))
        });
        group.bench_with_input(BenchmarkId::new("mutate", count), &loaded, |b, loaded| {
            b.iter(|| black_box(loaded.policies.mutate(black_box(&view), &loaded.facts)))
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let loaded = sample_policies();
    let body = typical_body();
    let mut group = c.benchmark_group("review");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("decode", |b| {
        b.iter(|| black_box(admission::prepare(black_box(&body)).expect("decodes").view))
    });
    group.throughput(Throughput::Elements(1));
    for webhook in [Webhook::Validate, Webhook::Mutate] {
        let decision =
            pipeline::review(webhook, &body, &loaded.policies, &loaded.facts).expect("reviews");
        group.bench_with_input(
            BenchmarkId::new("encode", webhook.as_str()),
            &decision.response,
            |b, response| b.iter(|| black_box(review::encode(black_box(response)))),
        );
    }
    group.finish();
}

/// The two hot spots the profile names (see BENCHMARKS.md), measured alone so a fix shows.
fn parts(c: &mut Criterion) {
    let loaded = sample_policies();
    let body = typical_body();
    let view = view_of(&body);
    let images: Vec<String> = view
        .pod()
        .expect("a pod")
        .spec
        .all_containers()
        .filter_map(|c| c.container.image.clone())
        .collect();
    let mut group = c.benchmark_group("parts");
    group.throughput(Throughput::Elements(images.len() as u64));
    group.bench_function("image-parse", |b| {
        b.iter(|| {
            for image in &images {
                black_box(image::parse(black_box(image)).expect("a valid image"));
            }
        })
    });
    let object = review::raw_object(&body, None).expect("json").expect("an object");
    let mutations = loaded.policies.mutate(&view, &loaded.facts);
    assert!(!mutations.is_empty(), "the typical pod is mutated");
    group.throughput(Throughput::Elements(1));
    // What /mutate does: operations straight from the intents and the view.
    group.bench_function("patch-direct", |b| {
        b.iter(|| black_box(patch::direct(black_box(&view), &mutations).expect("direct")))
    });
    // The fallback, for objects whose view cannot tell where an operation goes.
    group.bench_function("patch-diff", |b| {
        b.iter(|| black_box(patch::build(black_box(object), &mutations).expect("a patch")))
    });
    group.finish();
}

fn pipeline(c: &mut Criterion) {
    let loaded = sample_policies();
    let body = typical_body();
    let validated = pipeline::review(Webhook::Validate, &body, &loaded.policies, &loaded.facts)
        .expect("reviews");
    assert!(validated.response.allowed, "the typical pod is allowed");
    let mutated =
        pipeline::review(Webhook::Mutate, &body, &loaded.policies, &loaded.facts).expect("reviews");
    assert!(mutated.response.patch.is_some(), "the typical pod is patched");
    let denied_body = denied_body();
    let denied = pipeline::review(Webhook::Validate, &denied_body, &loaded.policies, &loaded.facts)
        .expect("reviews");
    assert!(!denied.response.allowed, "the untrusted pod is denied");
    let mut group = c.benchmark_group("pipeline");
    for (name, webhook, body) in [
        ("validate", Webhook::Validate, &body),
        ("mutate", Webhook::Mutate, &body),
        ("validate-denied", Webhook::Validate, &denied_body),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let decision =
                    pipeline::review(webhook, black_box(body), &loaded.policies, &loaded.facts)
                        .expect("reviews");
                black_box(review::encode(&decision.response))
            })
        });
    }
    group.finish();

    // What the memory budget reads before decoding: the body's structural tokens.
    let mut group = c.benchmark_group("budget");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("cost", |b| {
        b.iter(|| black_box(arcguard::server::budget::cost(black_box(&body))))
    });
    group.finish();
}

fn router(c: &mut Criterion) {
    let loaded = sample_policies();
    let state = AppState::new(Snapshot { policies: loaded.policies, facts: loaded.facts });
    state.readiness.set_policies_loaded();
    state.readiness.set_certificate_loaded();
    let app = webhook_router(state, &Limits::default());
    let allowed = axum::body::Bytes::from(typical_body());
    let denied = axum::body::Bytes::from(denied_body());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let request = |method: Method, path: &str, body: Body| {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("a valid request")
    };
    let call = |req: Request<Body>| {
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await.expect("the router is infallible");
            assert_eq!(response.status(), StatusCode::OK);
            axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("a body")
        }
    };
    let mut group = c.benchmark_group("router");
    for (name, method, path, body) in [
        ("validate", Method::POST, "/validate", &allowed),
        ("validate-denied", Method::POST, "/validate", &denied),
        ("mutate", Method::POST, "/mutate", &allowed),
        ("healthz", Method::GET, "/healthz", &allowed),
    ] {
        group.bench_function(name, |b| {
            // One runtime entry per batch, so the figure is the router's, not block_on's.
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let body = if method == Method::GET {
                            Body::empty()
                        } else {
                            Body::from(body.clone())
                        };
                        black_box(call(request(method.clone(), path, body)).await);
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = configure();
    targets = evaluation, codec, parts, pipeline, router
}
criterion_main!(benches);
