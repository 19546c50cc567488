//! `arcguard certs revoke`: ask the leader, through an annotation on the Secret, to replace
//! the CA and the serving certificate.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use time::OffsetDateTime;

use super::{ControllerError, FIELD_MANAGER};
use crate::certs::plan::REVOKE_ANNOTATION;

/// Asks the controller to revoke: sets `arcguard.io/revoke` on the Secret to the current time
/// (a new value each call) and returns that value. The leader replaces CA and serving
/// certificate on its next plan.
///
/// # Errors
///
/// [`ControllerError::NoSecret`] when the Secret does not exist, [`ControllerError::Revoke`]
/// when the patch fails.
pub async fn request_revoke(
    client: Client,
    namespace: &str,
    secret: &str,
) -> Result<String, ControllerError> {
    let now = OffsetDateTime::now_utc();
    let value = Timestamp::from_nanosecond(now.unix_timestamp_nanos())
        .map_or_else(|_| now.unix_timestamp().to_string(), |ts| ts.to_string());
    let patch = json!({"metadata": {"annotations": {REVOKE_ANNOTATION: value}}});
    let params =
        PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PatchParams::default() };
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let reference = format!("{namespace}/{secret}");
    match api.patch(secret, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(value),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            Err(ControllerError::NoSecret { secret: reference })
        }
        Err(source) => Err(ControllerError::Revoke { secret: reference, source }),
    }
}
