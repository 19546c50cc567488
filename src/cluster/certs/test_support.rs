//! Test helpers shared by the certificate controller's unit tests: a fixed clock, fresh
//! certificate material, and the Secret and webhook configurations that hold it.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::CertConfig;
use crate::certs::RcgenGenerator;
use crate::certs::plan::{Generate, SecretContents, StoredSecret};

/// 2026-01-01T00:00:00Z.
pub(super) fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
}

pub(super) fn contents(config: &CertConfig, now: OffsetDateTime) -> SecretContents {
    let plan_config = config.plan_config();
    let ca = RcgenGenerator.ca(plan_config.ca_validity, now).expect("CA");
    let serving = RcgenGenerator
        .serving(
            &ca,
            &plan_config.dns_names,
            &plan_config.ip_addresses,
            plan_config.serving_validity,
            now,
        )
        .expect("serving");
    SecretContents::fresh(ca, serving, None)
}

pub(super) fn secret(contents: &SecretContents) -> Secret {
    let mut stored = StoredSecret::default();
    stored.apply(contents);
    Secret {
        data: Some(stored.data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    }
}

fn webhook(name: &str, bundle: Option<&str>) -> Value {
    let mut client_config =
        json!({"service": {"name": "arcguard", "namespace": "arcguard-system"}});
    if let Some(bundle) = bundle {
        client_config["caBundle"] =
            serde_json::to_value(ByteString(bundle.as_bytes().to_vec())).expect("encodes");
    }
    json!({
        "name": name,
        "clientConfig": client_config,
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
    })
}

pub(super) fn validating(bundles: &[(&str, Option<&str>)]) -> ValidatingWebhookConfiguration {
    serde_json::from_value(json!({
        "metadata": {"name": "arcguard", "resourceVersion": "7"},
        "webhooks": bundles.iter().map(|(n, b)| webhook(n, *b)).collect::<Vec<_>>(),
    }))
    .expect("valid configuration")
}

pub(super) fn mutating(bundles: &[(&str, Option<&str>)]) -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "metadata": {"name": "arcguard", "resourceVersion": "8"},
        "webhooks": bundles.iter().map(|(n, b)| webhook(n, *b)).collect::<Vec<_>>(),
    }))
    .expect("valid configuration")
}
