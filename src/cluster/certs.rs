//! The serving certificate in cluster mode: the leader provisions, renews, rotates and revokes
//! it in a Secret and keeps the webhooks' CA bundle in step ([`run_controller`]); every replica
//! serves what the Secret holds and reports whether the webhooks trust it ([`run_serving`]).
//!
//! The decisions are made by the pure planner in [`crate::certs::plan`]; this module reads the
//! API, applies one [`Action`] per [`reconcile_once`] and schedules the next. Writes are
//! conditional (`resourceVersion`; a `test` op in JSON patches); a lost race is re-read and
//! re-planned after a back-off, never retried in a loop. Only arcguard's own Secret and its two
//! named webhook configurations are ever read or written.
//!
//! # API calls (for RBAC)
//!
//! [`run_controller`] and [`reconcile_once`] (the leader):
//! - `get core/secrets (namespaced: the Secret, by name)`
//! - `list core/secrets (namespaced: fieldSelector metadata.name=the Secret)`
//! - `watch core/secrets (namespaced: fieldSelector metadata.name=the Secret)`
//! - `create core/secrets (namespaced)` (not with `external`)
//! - `update core/secrets (namespaced: the Secret, by name)` (not with `external`)
//! - `get admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: by name)`
//! - `list admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `watch admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `patch admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: by name)` (with `inject_ca_bundle`)
//! - `get admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: by name)`
//! - `list admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `watch admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `patch admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: by name)` (with `inject_ca_bundle`)
//!
//! [`run_serving`] (every replica):
//! - `list core/secrets (namespaced: fieldSelector metadata.name=the Secret)`
//! - `watch core/secrets (namespaced: fieldSelector metadata.name=the Secret)`
//! - `list admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `watch admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `list admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `watch admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//!
//! [`request_revoke`] (`arcguard certs revoke`):
//! - `patch core/secrets (namespaced: the Secret, by name)`
//!
//! RBAC can restrict `list`/`watch` with `resourceNames` only when the request carries the
//! `metadata.name` field selector, which every list and watch here does.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client};
use serde_json::json;
use time::OffsetDateTime;

use super::leader::Leadership;
use crate::certs::plan::{
    self, Action, CA_CERT_KEY, Observed, PlanConfig, PlanError, PublishedBundle, REVOKE_ANNOTATION,
    Reason, StoredSecret, TLS_CERT_KEY, TLS_KEY_KEY,
};
use crate::certs::{CertInfo, CertResolver, RcgenGenerator, load_pem};
use crate::metrics::Metrics;
use crate::server::Readiness;

/// Default namespace arcguard runs in.
pub const DEFAULT_NAMESPACE: &str = "arcguard-system";
/// Default name of the certificate Secret.
pub const DEFAULT_SECRET_NAME: &str = "arcguard-tls";
/// Default name of the Service the apiserver calls.
pub const DEFAULT_SERVICE_NAME: &str = "arcguard";
/// Default name of both webhook configurations.
pub const DEFAULT_WEBHOOK_CONFIGURATION_NAME: &str = "arcguard";
/// Type of a Secret the controller creates (tls.crt and tls.key are always present).
pub const SECRET_TYPE: &str = "kubernetes.io/tls";
/// Field manager recorded on every write.
const FIELD_MANAGER: &str = "arcguard";
/// Longest time between two plans even without changes, in case a watch event was missed.
const MAX_REQUEUE: std::time::Duration = std::time::Duration::from_secs(3600);
/// First delay after a conflict or error; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest delay after repeated conflicts or errors.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(300);
/// Writes in a row without the planner settling before the loop backs off: a normal sequence
/// (write, inject, switch) needs at most three.
const MAX_STEPS_IN_A_ROW: u32 = 6;
/// Re-injections closer together than this count as a fight with another writer and back off.
const INJECTION_FIGHT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest time between two readiness checks of the served certificate.
const READINESS_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

// === errors ===

/// Why the certificate controller, the serving side or a revocation request failed.
///
/// API errors are retryable (the loops retry after a back-off); settings errors are not.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The settings are invalid.
    #[error("invalid certificate settings: {0}")]
    Config(#[source] PlanError),
    /// The planner could not generate a certificate.
    #[error("failed to plan the certificates: {0}")]
    Plan(#[source] PlanError),
    /// An object could not be read.
    #[error("failed to read {object}: {source}")]
    Read {
        /// The object, e.g. `Secret arcguard-system/arcguard-tls`.
        object: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The Secret could not be created or updated.
    #[error("failed to write Secret {secret}: {source}")]
    WriteSecret {
        /// `namespace/name`.
        secret: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A webhook configuration could not be patched.
    #[error("failed to inject the CA bundle into {configuration}: {source}")]
    Inject {
        /// E.g. `ValidatingWebhookConfiguration/arcguard`.
        configuration: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The JSON patch could not be built (not expected: it is built from strings).
    #[error("failed to build the CA bundle patch: {0}")]
    BuildPatch(#[source] serde_json::Error),
    /// The Secret to annotate for revocation does not exist.
    #[error(
        "Secret {secret} does not exist; is arcguard installed in that namespace, or are its certificates named differently?"
    )]
    NoSecret {
        /// `namespace/name`.
        secret: String,
    },
    /// The revocation annotation could not be set.
    #[error("failed to request revocation on Secret {secret}: {source}")]
    Revoke {
        /// `namespace/name`.
        secret: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

// === configuration ===

/// Where the certificate lives, what it is for, its lifetimes, and who manages it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertConfig {
    /// arcguard's namespace (Secret, Service, Lease); default [`DEFAULT_NAMESPACE`].
    pub namespace: String,
    /// The Secret; default [`DEFAULT_SECRET_NAME`].
    pub secret_name: String,
    /// The Service the apiserver calls; default [`DEFAULT_SERVICE_NAME`]. The serving
    /// certificate is for `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc` and
    /// `<svc>.<ns>.svc.cluster.local`.
    pub service_name: String,
    /// DNS names the serving certificate carries besides the Service's; default none.
    pub extra_dns_names: Vec<String>,
    /// IP addresses the serving certificate carries (a webhook reached by
    /// `clientConfig.url: https://<ip>/...`); default none.
    pub extra_ip_addresses: Vec<std::net::IpAddr>,
    /// arcguard's ValidatingWebhookConfiguration; default
    /// [`DEFAULT_WEBHOOK_CONFIGURATION_NAME`].
    pub validating_webhook_configuration: String,
    /// arcguard's MutatingWebhookConfiguration; default
    /// [`DEFAULT_WEBHOOK_CONFIGURATION_NAME`].
    pub mutating_webhook_configuration: String,
    /// CA lifetime; default five years ([`plan::DEFAULT_CA_VALIDITY`]).
    pub ca_validity: time::Duration,
    /// Serving certificate lifetime; default 90 days ([`plan::DEFAULT_SERVING_VALIDITY`]).
    pub serving_validity: time::Duration,
    /// Renew the serving certificate this long before expiry; default 30 days
    /// ([`plan::DEFAULT_SERVING_RENEW_BEFORE`]).
    pub serving_renew_before: time::Duration,
    /// Start a CA rotation this long before the CA expires; default 180 days
    /// ([`plan::DEFAULT_CA_ROTATE_BEFORE`]).
    pub ca_rotate_before: time::Duration,
    /// Keep the old CA in the bundle this long after the switch; default 15 minutes
    /// ([`plan::DEFAULT_CA_OVERLAP`]).
    pub ca_overlap: time::Duration,
    /// The Secret is written by someone else (cert-manager and the like): never write it, only
    /// serve it and (with `inject_ca_bundle`) publish its `ca.crt`. Default false.
    pub external: bool,
    /// Keep every webhook's `caBundle` equal to the bundle; default true.
    pub inject_ca_bundle: bool,
}

impl Default for CertConfig {
    fn default() -> Self {
        Self::new(DEFAULT_NAMESPACE)
    }
}

impl CertConfig {
    /// The defaults in `namespace`.
    #[must_use]
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            secret_name: DEFAULT_SECRET_NAME.to_owned(),
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            extra_dns_names: Vec::new(),
            extra_ip_addresses: Vec::new(),
            validating_webhook_configuration: DEFAULT_WEBHOOK_CONFIGURATION_NAME.to_owned(),
            mutating_webhook_configuration: DEFAULT_WEBHOOK_CONFIGURATION_NAME.to_owned(),
            ca_validity: plan::DEFAULT_CA_VALIDITY,
            serving_validity: plan::DEFAULT_SERVING_VALIDITY,
            serving_renew_before: plan::DEFAULT_SERVING_RENEW_BEFORE,
            ca_rotate_before: plan::DEFAULT_CA_ROTATE_BEFORE,
            ca_overlap: plan::DEFAULT_CA_OVERLAP,
            external: false,
            inject_ca_bundle: true,
        }
    }

    /// What the planner needs.
    #[must_use]
    pub fn plan_config(&self) -> PlanConfig {
        let mut dns_names = plan::service_dns_names(&self.service_name, &self.namespace);
        dns_names.extend(self.extra_dns_names.iter().cloned());
        PlanConfig {
            dns_names,
            ip_addresses: self.extra_ip_addresses.clone(),
            ca_validity: self.ca_validity,
            serving_validity: self.serving_validity,
            serving_renew_before: self.serving_renew_before,
            ca_rotate_before: self.ca_rotate_before,
            ca_overlap: self.ca_overlap,
            external: self.external,
            inject_ca_bundle: self.inject_ca_bundle,
        }
    }

    /// Checks names, lifetimes and windows.
    ///
    /// # Errors
    ///
    /// [`ControllerError::Config`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), ControllerError> {
        self.plan_config().validate().map_err(ControllerError::Config)
    }

    fn secret_ref(&self) -> String {
        format!("{}/{}", self.namespace, self.secret_name)
    }

    fn validating_ref(&self) -> String {
        format!("ValidatingWebhookConfiguration/{}", self.validating_webhook_configuration)
    }

    fn mutating_ref(&self) -> String {
        format!("MutatingWebhookConfiguration/{}", self.mutating_webhook_configuration)
    }
}

// === reading ===

/// The three API handles the controller uses.
#[derive(Clone)]
pub struct CertApis {
    /// Secrets in arcguard's namespace.
    pub secrets: Api<Secret>,
    /// ValidatingWebhookConfigurations (cluster-scoped).
    pub validating: Api<ValidatingWebhookConfiguration>,
    /// MutatingWebhookConfigurations (cluster-scoped).
    pub mutating: Api<MutatingWebhookConfiguration>,
}

impl CertApis {
    /// Handles on `client` for `namespace`.
    #[must_use]
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            validating: Api::all(client.clone()),
            mutating: Api::all(client),
        }
    }
}

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

// === one reconcile ===

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

// === the controller loop ===

/// Doubling delays for conflicts and errors, from one second to five minutes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt; each call doubles it.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let delay = MIN_BACKOFF.saturating_mul(1 << self.failures.min(16)).min(MAX_BACKOFF);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Changes to any of the three objects, as wake-ups (a watch error also wakes: the next
/// reconcile reads afresh and reports what is wrong).
fn changes(apis: &CertApis, config: &CertConfig) -> SelectAll<BoxStream<'static, ()>> {
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    futures::stream::select_all([
        watcher(apis.secrets.clone(), by_name(&config.secret_name))
            .backoff(super::watch_backoff())
            .map(drop)
            .boxed(),
        watcher(apis.validating.clone(), by_name(&config.validating_webhook_configuration))
            .backoff(super::watch_backoff())
            .map(drop)
            .boxed(),
        watcher(apis.mutating.clone(), by_name(&config.mutating_webhook_configuration))
            .backoff(super::watch_backoff())
            .map(drop)
            .boxed(),
    ])
}

/// Manages the certificate while this replica leads, until `shutdown` completes.
///
/// Plans on every change of the Secret or either webhook configuration and at the planner's
/// due time (at least hourly); after a write it plans again at once, after a conflict or error
/// it backs off (1 s doubling to 5 min), and it backs off too when writes do not settle or
/// another writer keeps resetting the CA bundle.
///
/// # Errors
///
/// [`ControllerError::Config`] for invalid settings; everything else is logged and retried.
pub async fn run_controller(
    client: Client,
    config: CertConfig,
    mut leadership: Leadership,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    config.validate()?;
    let apis = CertApis::new(client, &config.namespace);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            waited = leadership.wait_for(true) => if waited.is_err() {
                // The elector stopped: this replica will not lead again.
                shutdown.await;
                return Ok(());
            },
        }
        tracing::info!(secret = %config.secret_ref(), external = config.external, "leading: managing the serving certificate");
        let mut follower = leadership.clone();
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = follower.wait_for(false) => tracing::info!("no longer leading: stopped managing the serving certificate"),
            () = lead(&apis, &config, &metrics) => {}
        }
    }
}

/// The reconcile loop of a leader; runs until dropped.
async fn lead(apis: &CertApis, config: &CertConfig, metrics: &Metrics) {
    let mut changes = changes(apis, config);
    let mut backoff = Backoff::default();
    let mut injection_fight = Backoff::default();
    let mut last_injection: Option<tokio::time::Instant> = None;
    // An injection that follows our own Secret write publishes a bundle we changed; only a
    // re-injection of an unchanged bundle means someone else reset it.
    let mut wrote_since_injection = false;
    let mut steps = 0u32;
    loop {
        let now = OffsetDateTime::now_utc();
        // Some(delay): sleep through changes; None with a deadline: wake on a change too.
        let (delay, wake_on_change) = match reconcile_once(apis, config, now).await {
            Ok(Outcome::Wrote(reason)) => {
                wrote_since_injection = true;
                tracing::info!(%reason, secret = %config.secret_ref(), "wrote the certificate Secret");
                metrics.record_certificate_rotation(reason.as_str());
                backoff.reset();
                steps += 1;
                (std::time::Duration::ZERO, false)
            }
            Ok(Outcome::Injected { validating, mutating }) => {
                tracing::info!(
                    validating,
                    mutating,
                    "injected the CA bundle into arcguard's webhooks"
                );
                if validating > 0 {
                    metrics.record_ca_bundle_injection("validating");
                }
                if mutating > 0 {
                    metrics.record_ca_bundle_injection("mutating");
                }
                backoff.reset();
                steps += 1;
                let fighting = !wrote_since_injection
                    && last_injection.is_some_and(|at| at.elapsed() < INJECTION_FIGHT_WINDOW);
                wrote_since_injection = false;
                last_injection = Some(tokio::time::Instant::now());
                if fighting {
                    let delay = injection_fight.next_delay();
                    tracing::warn!(
                        ?delay,
                        "the webhooks' CA bundle keeps being reset by someone else; backing off"
                    );
                    (delay, false)
                } else {
                    injection_fight.reset();
                    (std::time::Duration::ZERO, false)
                }
            }
            Ok(Outcome::Conflict) => {
                let delay = backoff.next_delay();
                tracing::info!(
                    ?delay,
                    "another writer changed the certificate objects first; re-reading after a back-off"
                );
                steps += 1;
                (delay, false)
            }
            Ok(Outcome::Idle { until }) => {
                backoff.reset();
                steps = 0;
                let wait = until
                    .map(|until| std::time::Duration::try_from(until - now).unwrap_or_default())
                    .unwrap_or(MAX_REQUEUE)
                    .min(MAX_REQUEUE);
                (wait, true)
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::error!(%error, ?delay, "certificate reconcile failed; retrying after a back-off");
                (delay, false)
            }
        };
        let delay = if steps > MAX_STEPS_IN_A_ROW {
            steps = 0;
            let delay = backoff.next_delay();
            tracing::error!(?delay, "the certificate plan does not settle; backing off");
            delay
        } else {
            delay
        };
        // Events caused by our own writes are folded into the next plan, which reads afresh.
        while changes.next().now_or_never().flatten().is_some() {}
        if wake_on_change {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = changes.next() => {}
            }
        } else if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

// === serving ===

/// The newest state of one object watched by name, following watcher events (a re-list
/// replaces it atomically at `InitDone`).
#[derive(Clone, Debug)]
pub struct Latest<K> {
    current: Option<K>,
    relisting: Option<Option<K>>,
    synced: bool,
}

impl<K> Default for Latest<K> {
    fn default() -> Self {
        Self { current: None, relisting: None, synced: false }
    }
}

impl<K: Clone> Latest<K> {
    /// Applies one watcher event.
    pub fn apply(&mut self, event: Event<K>) {
        match event {
            Event::Apply(object) => {
                self.current = Some(object);
                self.synced = true;
            }
            Event::Delete(_) => {
                self.current = None;
                self.synced = true;
            }
            Event::Init => self.relisting = Some(None),
            Event::InitApply(object) => self.relisting = Some(Some(object)),
            Event::InitDone => {
                self.current = self.relisting.take().flatten();
                self.synced = true;
            }
        }
    }

    /// The object, if it exists (as of the last complete list or event).
    #[must_use]
    pub fn get(&self) -> Option<&K> {
        self.current.as_ref()
    }

    /// Whether the first list has completed.
    #[must_use]
    pub fn is_synced(&self) -> bool {
        self.synced
    }
}

/// The serving side's view: the Secret and the webhooks, and the pair last loaded.
#[derive(Debug, Default)]
pub struct ServingState {
    /// The Secret.
    pub secret: Latest<Secret>,
    /// arcguard's ValidatingWebhookConfiguration.
    pub validating: Latest<ValidatingWebhookConfiguration>,
    /// arcguard's MutatingWebhookConfiguration.
    pub mutating: Latest<MutatingWebhookConfiguration>,
    /// The `tls.crt` and `tls.key` last tried, loaded or not, so a bad pair is reported once.
    tried: Option<(Vec<u8>, Vec<u8>)>,
    /// The `ca.crt` last reported.
    ca: Option<Vec<u8>>,
}

impl ServingState {
    /// Swaps a changed pair into `resolver` (a pair that fails to load is reported and the
    /// previous one stays), updates the expiry metrics, and returns whether the served
    /// certificate is ready: valid at `now` and, with `inject_ca_bundle`, issued by a CA in
    /// every one of arcguard's webhooks' `caBundle`. Not ready before all three watches have
    /// listed once.
    pub fn refresh(
        &mut self,
        config: &CertConfig,
        now: OffsetDateTime,
        resolver: &CertResolver,
        metrics: &Metrics,
    ) -> bool {
        let secret = self.secret.get().map(stored_secret);
        let data = |key: &str| secret.as_ref().and_then(|s| s.data.get(key)).cloned();
        if let (Some(cert), Some(key)) = (data(TLS_CERT_KEY), data(TLS_KEY_KEY)) {
            let pair = (cert, key);
            if self.tried.as_ref() != Some(&pair) {
                match load_pem(&pair.0, &pair.1) {
                    Ok((certified, info)) => {
                        let not_after = info.not_after.unix_timestamp();
                        tracing::info!(subject = %info.subject, issuer = %info.issuer, not_after, "serving the certificate from the Secret");
                        resolver.swap(certified, info);
                        metrics.record_certificate("serving", Some(not_after));
                    }
                    Err(error) => {
                        metrics.record_certificate("serving", None);
                        tracing::warn!(%error, secret = %config.secret_ref(), "the Secret's certificate does not load; the previous one stays in use");
                    }
                }
                self.tried = Some(pair);
            }
        }
        let ca = data(CA_CERT_KEY);
        if ca != self.ca {
            let not_after =
                ca.as_deref().and_then(|pem| CertInfo::from_pem(pem).ok()).map(|i| i.not_after);
            metrics.set_certificate_expiry("ca", not_after.map(OffsetDateTime::unix_timestamp));
            self.ca = ca;
        }
        self.is_ready(config, now, resolver)
    }

    fn is_ready(&self, config: &CertConfig, now: OffsetDateTime, resolver: &CertResolver) -> bool {
        let synced =
            self.secret.is_synced() && self.validating.is_synced() && self.mutating.is_synced();
        let Some(served) = resolver.current_info().filter(|_| synced) else {
            return false;
        };
        if !served.is_valid_at(now) {
            return false;
        }
        if !config.inject_ca_bundle {
            return true;
        }
        let observed = observe(config, None, self.validating.get(), self.mutating.get());
        observed.webhooks.iter().all(|webhook| {
            webhook.ca_bundle.as_deref().is_some_and(|bundle| served.is_issued_by_any(bundle))
        })
    }
}

/// A watch event for one of the three objects.
enum Change {
    Secret(Event<Secret>),
    Validating(Event<ValidatingWebhookConfiguration>),
    Mutating(Event<MutatingWebhookConfiguration>),
}

/// Serves the Secret's certificate on this replica until `shutdown` completes, and keeps
/// readiness in step.
///
/// Watches the Secret and both webhook configurations through the API (no volume, so no
/// kubelet delay), swaps a changed `tls.crt`/`tls.key` into `resolver` atomically, and sets
/// `readiness.set_certificate_ready` on every change and at least every minute (certificates
/// expire without any event).
pub async fn run_serving(
    client: Client,
    config: CertConfig,
    resolver: Arc<CertResolver>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let apis = CertApis::new(client, &config.namespace);
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = futures::stream::select_all([
        watcher(apis.secrets, by_name(&config.secret_name))
            .backoff(super::watch_backoff())
            .map(|event| event.map(Change::Secret))
            .boxed(),
        watcher(apis.validating, by_name(&config.validating_webhook_configuration))
            .backoff(super::watch_backoff())
            .map(|event| event.map(Change::Validating))
            .boxed(),
        watcher(apis.mutating, by_name(&config.mutating_webhook_configuration))
            .backoff(super::watch_backoff())
            .map(|event| event.map(Change::Mutating))
            .boxed(),
    ]);
    let mut state = ServingState::default();
    let mut was_ready = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = events.next() => match event {
                Some(Ok(Change::Secret(event))) => state.secret.apply(event),
                Some(Ok(Change::Validating(event))) => state.validating.apply(event),
                Some(Ok(Change::Mutating(event))) => state.mutating.apply(event),
                Some(Err(error)) => tracing::warn!(%error, "watching the certificate objects failed; retrying"),
                None => break,
            },
            () = tokio::time::sleep(READINESS_RECHECK) => {}
        }
        let ready = state.refresh(&config, OffsetDateTime::now_utc(), &resolver, &metrics);
        readiness.set_certificate_ready(ready);
        if was_ready != Some(ready) {
            if ready {
                tracing::info!("the served certificate is valid and trusted by every webhook");
            } else {
                tracing::warn!(
                    "not ready: no certificate served yet, it is not valid now, or a webhook's caBundle does not trust it"
                );
            }
            was_ready = Some(ready);
        }
    }
}

// === revocation ===

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

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::certs::plan::{CA_BUNDLE_KEY, Generate, SecretContents};

    /// 2026-01-01T00:00:00Z.
    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
    }

    fn contents(config: &CertConfig, now: OffsetDateTime) -> SecretContents {
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

    fn secret(contents: &SecretContents) -> Secret {
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

    fn validating(bundles: &[(&str, Option<&str>)]) -> ValidatingWebhookConfiguration {
        serde_json::from_value(json!({
            "metadata": {"name": "arcguard", "resourceVersion": "7"},
            "webhooks": bundles.iter().map(|(n, b)| webhook(n, *b)).collect::<Vec<_>>(),
        }))
        .expect("valid configuration")
    }

    fn mutating(bundles: &[(&str, Option<&str>)]) -> MutatingWebhookConfiguration {
        serde_json::from_value(json!({
            "metadata": {"name": "arcguard", "resourceVersion": "8"},
            "webhooks": bundles.iter().map(|(n, b)| webhook(n, *b)).collect::<Vec<_>>(),
        }))
        .expect("valid configuration")
    }

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

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes_and_starts_over_after_a_success() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..12).map(|_| backoff.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.next_delay().as_secs(), 1);
    }

    #[test]
    fn latest_follows_events_and_replaces_its_object_only_when_a_relist_completes() {
        let mut latest = Latest::<u32>::default();
        assert!(!latest.is_synced());
        latest.apply(Event::Init);
        latest.apply(Event::InitApply(1));
        assert_eq!((latest.get(), latest.is_synced()), (None, false), "not before InitDone");
        latest.apply(Event::InitDone);
        assert_eq!((latest.get(), latest.is_synced()), (Some(&1), true));
        latest.apply(Event::Apply(2));
        assert_eq!(latest.get(), Some(&2));
        latest.apply(Event::Init);
        assert_eq!(latest.get(), Some(&2), "kept while relisting");
        latest.apply(Event::InitDone);
        assert_eq!(latest.get(), None, "a relist without it means it is gone");
        latest.apply(Event::Apply(3));
        latest.apply(Event::Delete(3));
        assert_eq!(latest.get(), None);
    }

    fn listed<K: Clone>(latest: &mut Latest<K>, object: K) {
        for event in [Event::Init, Event::InitApply(object), Event::InitDone] {
            latest.apply(event);
        }
    }

    /// A serving state whose three watches have listed: the Secret, and both configurations
    /// with the given bundles.
    fn serving_state(
        secret: Option<Secret>,
        validating_bundles: &[(&str, Option<&str>)],
        mutating_bundles: &[(&str, Option<&str>)],
    ) -> ServingState {
        let mut state = ServingState::default();
        match secret {
            Some(secret) => listed(&mut state.secret, secret),
            None => state.secret.apply(Event::InitDone),
        }
        listed(&mut state.validating, validating(validating_bundles));
        listed(&mut state.mutating, mutating(mutating_bundles));
        state
    }

    #[test]
    fn the_serving_side_swaps_in_a_new_pair_and_keeps_the_old_one_when_a_pair_is_broken() {
        let config = CertConfig::default();
        let first = contents(&config, t0());
        let bundle = first.bundle();
        let trusted = [("v.arcguard.io", Some(bundle.as_str()))];
        let resolver = CertResolver::empty();
        let metrics = Metrics::new();
        let mut state = serving_state(Some(secret(&first)), &trusted, &trusted);
        assert!(state.refresh(&config, t0(), &resolver, &metrics));
        let served = resolver.current_info().expect("serving");
        assert_eq!(served.not_after, t0() + config.serving_validity);

        let mut broken = secret(&first);
        if let Some(data) = broken.data.as_mut() {
            data.insert(TLS_KEY_KEY.to_owned(), ByteString(b"garbage".to_vec()));
        }
        state.secret.apply(Event::Apply(broken));
        assert!(state.refresh(&config, t0(), &resolver, &metrics), "the old pair is still good");
        assert_eq!(resolver.current_info().expect("serving"), served, "previous pair stays");
        let text = metrics.encode();
        assert!(
            text.contains("arcguard_certificate_reloads_total{result=\"failure\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("arcguard_certificate_expiry_timestamp_seconds{certificate=\"ca\"}"),
            "{text}"
        );

        let second = contents(&config, t0() + time::Duration::days(1));
        state.secret.apply(Event::Apply(secret(&second)));
        state.refresh(&config, t0(), &resolver, &metrics);
        assert_ne!(resolver.current_info().expect("serving"), served, "new pair swapped in");
    }

    #[test]
    fn readiness_needs_a_valid_certificate_whose_ca_every_webhook_trusts() {
        let config = CertConfig::default();
        let served = contents(&config, t0());
        let other = contents(&config, t0());
        let (ours, theirs) = (served.bundle(), other.bundle());
        let both = format!("{theirs}{ours}");
        let ok = Some(ours.as_str());
        let expired = t0() + config.serving_validity + time::Duration::SECOND;
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, Option<&'a str>)],
            &'a [(&'a str, Option<&'a str>)],
            bool,
            OffsetDateTime,
            bool,
        );
        let cases: [Case<'_>; 8] = [
            ("trusted everywhere", &[("v", ok), ("w", ok)], &[("m", ok)], true, t0(), true),
            ("trusted among others", &[("v", Some(both.as_str()))], &[("m", ok)], true, t0(), true),
            ("one webhook reset", &[("v", ok), ("w", None)], &[("m", ok)], true, t0(), false),
            ("another CA", &[("v", ok)], &[("m", Some(theirs.as_str()))], true, t0(), false),
            ("injection off: validity alone", &[("v", None)], &[("m", None)], false, t0(), true),
            ("expired", &[("v", ok)], &[("m", ok)], true, expired, false),
            (
                "not yet valid",
                &[("v", ok)],
                &[("m", ok)],
                true,
                t0() - time::Duration::hours(1),
                false,
            ),
            ("no webhooks at all", &[], &[], true, t0(), true),
        ];
        for (label, validating_bundles, mutating_bundles, inject, now, expected) in cases {
            let config = CertConfig { inject_ca_bundle: inject, ..CertConfig::default() };
            let resolver = CertResolver::empty();
            let mut state =
                serving_state(Some(secret(&served)), validating_bundles, mutating_bundles);
            assert_eq!(
                state.refresh(&config, now, &resolver, &Metrics::new()),
                expected,
                "{label}"
            );
        }
    }

    #[test]
    fn readiness_waits_for_a_certificate_and_for_every_watch_to_list() {
        let config = CertConfig::default();
        let metrics = Metrics::new();
        let resolver = CertResolver::empty();
        let mut state = serving_state(None, &[], &[]);
        assert!(!state.refresh(&config, t0(), &resolver, &metrics), "nothing to serve");

        let served = contents(&config, t0());
        let mut state = ServingState::default();
        state.secret.apply(Event::Apply(secret(&served)));
        assert!(!state.refresh(&config, t0(), &resolver, &metrics), "webhooks not listed yet");
        assert!(resolver.current_info().is_some(), "served as soon as it is known");
    }

    #[test]
    fn settings_map_onto_the_planner_and_are_validated() {
        let config = CertConfig::default();
        let plan_config = config.plan_config();
        assert_eq!(plan_config.dns_names[3], "arcguard.arcguard-system.svc.cluster.local");
        assert_eq!(plan_config.ca_overlap, time::Duration::minutes(15));
        assert!(plan_config.inject_ca_bundle && !plan_config.external);
        assert!(config.validate().is_ok());
        let bad = CertConfig { service_name: "no such name!".to_owned(), ..CertConfig::default() };
        let err = bad.validate().expect_err("invalid service name");
        assert!(err.to_string().starts_with("invalid certificate settings: "), "{err}");
        assert_eq!(
            stored_secret(&secret(&contents(&config, t0()))).data.len(),
            5,
            "{CA_BUNDLE_KEY} too"
        );
    }
}
