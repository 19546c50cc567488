//! One reconcile of the certificate objects: read the Secret and both webhook configurations,
//! plan, and apply the planner's one action (write the Secret or inject the CA bundle).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use time::OffsetDateTime;

use super::{CertApis, CertConfig, ControllerError, FIELD_MANAGER, SECRET_TYPE};
use crate::certs::RcgenGenerator;
use crate::certs::plan::{self, Action, Observed, PublishedBundle, Reason, StoredSecret};

/// A Secret as the planner sees it.
#[must_use]
pub fn stored_secret(secret: &Secret) -> StoredSecret {
    StoredSecret {
        data: secret
            .data
            .iter()
            .flatten()
            .map(|(key, value)| (key.clone(), value.0.clone()))
            .collect(),
        annotations: secret.metadata.annotations.clone().unwrap_or_default(),
    }
}

/// Every webhook's name and CA bundle, in order.
fn webhook_bundles<'a>(
    client_configs: impl Iterator<Item = (&'a str, &'a WebhookClientConfig)>,
    configuration: &str,
) -> Vec<PublishedBundle> {
    client_configs
        .map(|(name, client_config)| PublishedBundle {
            configuration: configuration.to_owned(),
            webhook: name.to_owned(),
            ca_bundle: client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
        })
        .collect()
}

fn validating_bundles(
    configuration: Option<&ValidatingWebhookConfiguration>,
    reference: &str,
) -> Vec<PublishedBundle> {
    let webhooks = configuration.and_then(|c| c.webhooks.as_deref()).unwrap_or_default();
    webhook_bundles(webhooks.iter().map(|w| (w.name.as_str(), &w.client_config)), reference)
}

fn mutating_bundles(
    configuration: Option<&MutatingWebhookConfiguration>,
    reference: &str,
) -> Vec<PublishedBundle> {
    let webhooks = configuration.and_then(|c| c.webhooks.as_deref()).unwrap_or_default();
    webhook_bundles(webhooks.iter().map(|w| (w.name.as_str(), &w.client_config)), reference)
}

/// What the planner sees in these objects.
#[must_use]
pub fn observe(
    config: &CertConfig,
    secret: Option<&Secret>,
    validating: Option<&ValidatingWebhookConfiguration>,
    mutating: Option<&MutatingWebhookConfiguration>,
) -> Observed {
    let mut webhooks = validating_bundles(validating, &config.validating_ref());
    webhooks.extend(mutating_bundles(mutating, &config.mutating_ref()));
    Observed { secret: secret.map(stored_secret), webhooks }
}

/// What one [`reconcile_once`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The Secret was created or updated; plan again at once.
    Wrote(Reason),
    /// The CA bundle was written into this many webhooks; plan again at once.
    Injected {
        /// Webhooks patched in the ValidatingWebhookConfiguration.
        validating: usize,
        /// Webhooks patched in the MutatingWebhookConfiguration.
        mutating: usize,
    },
    /// Someone else wrote first (409, or a failed patch `test`); re-read after a back-off.
    Conflict,
    /// Nothing to do until something changes, or until `until`.
    Idle {
        /// When something falls due without a change.
        until: Option<OffsetDateTime>,
    },
}

fn is_conflict(error: &kube::Error, also_unprocessable: bool) -> bool {
    matches!(error, kube::Error::Api(status)
        if status.code == 409 || (also_unprocessable && status.code == 422))
}

/// Reads the Secret and both webhook configurations, plans, and applies one action.
///
/// # Errors
///
/// [`ControllerError`] when a read or write fails for another reason than a lost race, or a
/// certificate cannot be generated.
pub async fn reconcile_once(
    apis: &CertApis,
    config: &CertConfig,
    now: OffsetDateTime,
) -> Result<Outcome, ControllerError> {
    let secret = apis.secrets.get_opt(&config.secret_name).await.map_err(|source| {
        ControllerError::Read { object: format!("Secret {}", config.secret_ref()), source }
    })?;
    let validating = apis
        .validating
        .get_opt(&config.validating_webhook_configuration)
        .await
        .map_err(|source| ControllerError::Read { object: config.validating_ref(), source })?;
    let mutating = apis
        .mutating
        .get_opt(&config.mutating_webhook_configuration)
        .await
        .map_err(|source| ControllerError::Read { object: config.mutating_ref(), source })?;
    let observed = observe(config, secret.as_ref(), validating.as_ref(), mutating.as_ref());
    let action = plan::plan(&observed, &config.plan_config(), now, &RcgenGenerator)
        .map_err(ControllerError::Plan)?;
    match action {
        // The planner never writes an external Secret; this guard keeps it so by construction.
        Action::Write { .. } if config.external => Ok(Outcome::Idle { until: None }),
        Action::Write { contents, reason } => {
            let written = write_secret(apis, config, secret, &contents).await;
            match written {
                Ok(()) => Ok(Outcome::Wrote(reason)),
                Err(source) if is_conflict(&source, false) => Ok(Outcome::Conflict),
                Err(source) => {
                    Err(ControllerError::WriteSecret { secret: config.secret_ref(), source })
                }
            }
        }
        Action::Inject { bundle } => {
            inject(apis, config, validating.as_ref(), mutating.as_ref(), &bundle).await
        }
        Action::Wait { until } => Ok(Outcome::Idle { until }),
    }
}

/// Creates the Secret, or updates it conditionally on the `resourceVersion` it was read at.
async fn write_secret(
    apis: &CertApis,
    config: &CertConfig,
    existing: Option<Secret>,
    contents: &plan::SecretContents,
) -> Result<(), kube::Error> {
    let params =
        PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PostParams::default() };
    let mut secret = existing.unwrap_or_else(|| Secret {
        metadata: ObjectMeta {
            name: Some(config.secret_name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "arcguard".to_owned()),
                ("app.kubernetes.io/managed-by".to_owned(), "arcguard".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        ..Secret::default()
    });
    let mut stored = stored_secret(&secret);
    stored.apply(contents);
    secret.data =
        Some(stored.data.into_iter().map(|(key, value)| (key, ByteString(value))).collect());
    secret.metadata.annotations = Some(stored.annotations).filter(|a| !a.is_empty());
    secret.metadata.managed_fields = None;
    if secret.metadata.resource_version.is_some() {
        apis.secrets.replace(&config.secret_name, &params, &secret).await?;
    } else {
        apis.secrets.create(&params, &secret).await?;
    }
    Ok(())
}

/// The JSON patch that sets `caBundle` in the webhooks at `stale` (index, name), conditional on
/// the configuration's `resourceVersion` and on each index still holding that webhook.
fn bundle_patch(
    resource_version: Option<&str>,
    stale: &[(usize, &str)],
    bundle: &str,
) -> Result<json_patch::Patch, ControllerError> {
    let encoded = serde_json::to_value(ByteString(bundle.as_bytes().to_vec()))
        .map_err(ControllerError::BuildPatch)?;
    let mut ops = Vec::with_capacity(1 + 2 * stale.len());
    if let Some(version) = resource_version {
        ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": version}));
    }
    for (index, name) in stale {
        ops.push(json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": name}));
        ops.push(json!({
            "op": "add",
            "path": format!("/webhooks/{index}/clientConfig/caBundle"),
            "value": encoded,
        }));
    }
    serde_json::from_value(serde_json::Value::Array(ops)).map_err(ControllerError::BuildPatch)
}

/// The webhooks (index, name) whose bundle is not `bundle`.
fn stale_webhooks<'a>(bundles: &'a [PublishedBundle], bundle: &str) -> Vec<(usize, &'a str)> {
    bundles
        .iter()
        .enumerate()
        .filter(|(_, webhook)| !webhook.is(bundle))
        .map(|(index, webhook)| (index, webhook.webhook.as_str()))
        .collect()
}

/// Writes `bundle` into every webhook of the two configurations that lacks it.
async fn inject(
    apis: &CertApis,
    config: &CertConfig,
    validating: Option<&ValidatingWebhookConfiguration>,
    mutating: Option<&MutatingWebhookConfiguration>,
    bundle: &str,
) -> Result<Outcome, ControllerError> {
    let params =
        PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PatchParams::default() };
    let validating_bundles = validating_bundles(validating, &config.validating_ref());
    let validating_stale = stale_webhooks(&validating_bundles, bundle);
    let target =
        validating.map(|c| (c.metadata.resource_version.as_deref(), config.validating_ref()));
    let name = &config.validating_webhook_configuration;
    if inject_into(&apis.validating, name, target, &validating_stale, bundle, &params).await?
        == Injection::Conflict
    {
        return Ok(Outcome::Conflict);
    }
    let mutating_bundles = mutating_bundles(mutating, &config.mutating_ref());
    let mutating_stale = stale_webhooks(&mutating_bundles, bundle);
    let target = mutating.map(|c| (c.metadata.resource_version.as_deref(), config.mutating_ref()));
    let name = &config.mutating_webhook_configuration;
    if inject_into(&apis.mutating, name, target, &mutating_stale, bundle, &params).await?
        == Injection::Conflict
    {
        return Ok(Outcome::Conflict);
    }
    Ok(Outcome::Injected { validating: validating_stale.len(), mutating: mutating_stale.len() })
}

/// Whether a bundle patch went through.
#[derive(Debug, PartialEq, Eq)]
enum Injection {
    Done,
    Conflict,
}

/// Patches `bundle` into the `stale` webhooks of one configuration (`target`: its
/// resourceVersion and a name for errors), conditional on its resourceVersion.
async fn inject_into<K>(
    api: &Api<K>,
    name: &str,
    target: Option<(Option<&str>, String)>,
    stale: &[(usize, &str)],
    bundle: &str,
    params: &PatchParams,
) -> Result<Injection, ControllerError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some((resource_version, configuration)) = target.filter(|_| !stale.is_empty()) else {
        return Ok(Injection::Done);
    };
    let patch = bundle_patch(resource_version, stale, bundle)?;
    match api.patch(name, params, &Patch::Json::<()>(patch)).await {
        Ok(_) => Ok(Injection::Done),
        Err(source) if is_conflict(&source, true) => Ok(Injection::Conflict),
        Err(source) => Err(ControllerError::Inject { configuration, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{mutating, validating};
    use super::*;

    #[test]
    fn observe_lists_every_webhook_of_both_configurations_in_order() {
        let config = CertConfig::default();
        let observed = observe(
            &config,
            None,
            Some(&validating(&[("a.arcguard.io", Some("A")), ("b.arcguard.io", None)])),
            Some(&mutating(&[("m.arcguard.io", Some("M"))])),
        );
        let seen: Vec<(&str, &str, Option<&[u8]>)> = observed
            .webhooks
            .iter()
            .map(|w| (w.configuration.as_str(), w.webhook.as_str(), w.ca_bundle.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                ("ValidatingWebhookConfiguration/arcguard", "a.arcguard.io", Some(&b"A"[..])),
                ("ValidatingWebhookConfiguration/arcguard", "b.arcguard.io", None),
                ("MutatingWebhookConfiguration/arcguard", "m.arcguard.io", Some(&b"M"[..])),
            ]
        );
        assert_eq!(observed.secret, None);
        assert!(observe(&config, None, None, None).webhooks.is_empty());
    }

    #[test]
    fn the_bundle_patch_is_conditional_on_the_version_and_on_each_webhook_name() {
        let patch = bundle_patch(Some("7"), &[(1, "b.arcguard.io")], "PEM").expect("builds");
        assert_eq!(
            serde_json::to_value(&patch).expect("serializes"),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "test", "path": "/webhooks/1/name", "value": "b.arcguard.io"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "UEVN"},
            ])
        );
    }
}
