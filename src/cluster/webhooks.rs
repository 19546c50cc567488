//! The failure policy of arcguard's own webhooks: they fail closed only once a replica can
//! answer.
//!
//! A fail-closed webhook that nothing answers rejects every request it matches. Shipped with
//! `failurePolicy: Fail`, arcguard's webhooks would do that from the moment they are applied
//! until the first replica is ready (seconds, or for good when the image cannot be pulled).
//! So the manifests ship every webhook with `failurePolicy: Ignore` and put the failure policy
//! to enforce on the configuration, in the annotation [`FAILURE_POLICY_ANNOTATION`]
//! (`arcguard.io/failure-policy: Fail`); the leader sets every webhook's `failurePolicy` to the
//! annotated one once this replica is ready to answer: policies loaded, caches filled, and
//! serving a valid certificate that every webhook's injected `caBundle` trusts (the readiness
//! `/readyz` reports, [`crate::server::Readiness::is_ready_for`]). From then on the webhooks
//! fail closed, as they must: enforcement never relaxes by itself.
//!
//! - Without the annotation `failurePolicy` is the operator's: it is never touched.
//! - An annotation other than `Fail` or `Ignore` is refused with a logged error naming the
//!   configuration and the value, and nothing is changed (a typo must not decide enforcement).
//! - Before this replica is ready nothing is changed; a webhook without any `caBundle` is not
//!   made fail-closed either (a cainjector that has not run yet: the apiserver could not verify
//!   any replica).
//! - Once every webhook has the annotated policy, nothing is written: the decision is a pure
//!   function of the configuration and readiness ([`decide`]), and the patch is conditional on
//!   the configuration's `resourceVersion` and on each index still naming that webhook
//!   ([`failure_policy_patch`]), like the CA bundle's.
//!
//! Re-applying the manifests puts their `Ignore` back: client-side `kubectl apply` and `helm
//! upgrade` compute a three-way strategic merge whose delta runs from the live object to the
//! manifest, so a live field the manifest sets differently is overwritten (measured in the e2e
//! suite: both reset it, as does `kubectl apply --server-side --force-conflicts`). The leader,
//! which watches both configurations, sets it back at once (within 100 ms in the e2e suite).
//! While arcguard answers, that window changes nothing. GitOps tools should ignore
//! `/webhooks/*/failurePolicy` on these two objects, like `caBundle`, and not write it back.
//!
//! This runs as its own leader task rather than inside the certificate controller
//! ([`super::certs`]): it must wake on readiness changes (policies, caches, the served
//! certificate), which the certificate controller does not follow, and it also runs when the
//! CA bundle is injected by someone else (cert-manager).
//!
//! Being ready is not enough when a webhook calls arcguard through its Service: the apiserver
//! reaches a replica only once the replica's readiness probe has passed and its endpoint is
//! published (one probe period, 5 s in the Deployment, plus propagation). So a webhook that
//! names arcguard's own Service (`--service-name` in `--namespace`) is made fail-closed only
//! once that Service's EndpointSlices hold a ready endpoint (`conditions.ready` true or unset,
//! as the API defines it, and not terminating). A webhook with a `url`, or naming another
//! Service (a proxy arcguard cannot see), needs this replica's readiness only.
//!
//! # API calls (for RBAC)
//!
//! [`run`] (the leader; the configurations themselves come from the shared watches of
//! [`super::objects`]):
//! - `patch admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: by name)`
//! - `patch admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: by name)`
//! - `list discovery.k8s.io/endpointslices (namespaced: arcguard's namespace, labelSelector kubernetes.io/service-name)`
//! - `watch discovery.k8s.io/endpointslices (namespaced: arcguard's namespace, labelSelector kubernetes.io/service-name)`

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client};
use serde_json::json;

use super::certs::{Backoff, CertConfig};
use super::leader::Leadership;
use super::objects::Objects;
use crate::server::AppState;

/// The annotation on arcguard's webhook configurations naming the failure policy the leader
/// enforces once a replica can answer: `Fail` or `Ignore`. Absent: failurePolicy is left alone.
pub const FAILURE_POLICY_ANNOTATION: &str = "arcguard.io/failure-policy";
/// Field manager recorded on every write.
const FIELD_MANAGER: &str = "arcguard";
/// The label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Longest time one patch may take.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// Longest time between two decisions without any change, in case a wake-up was missed.
const RECHECK: Duration = Duration::from_secs(60);

/// Why a failure policy could not be decided or written.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The annotation holds something else than `Fail` or `Ignore`.
    #[error(
        "{configuration}: annotation {FAILURE_POLICY_ANNOTATION} is {value:?}, expected \"Fail\" or \"Ignore\"; failurePolicy is left as it is"
    )]
    InvalidAnnotation {
        /// E.g. `ValidatingWebhookConfiguration/arcguard`.
        configuration: String,
        /// The annotation's value.
        value: String,
    },
    /// The JSON patch could not be built (not expected: it is built from strings).
    #[error("failed to build the failurePolicy patch: {0}")]
    BuildPatch(#[source] serde_json::Error),
    /// The patch was refused or failed.
    #[error("failed to set failurePolicy in {configuration}: {source}")]
    Patch {
        /// E.g. `ValidatingWebhookConfiguration/arcguard`.
        configuration: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The patch did not answer within its deadline.
    #[error("setting failurePolicy in {configuration} did not answer within {after:?}")]
    Timeout {
        /// E.g. `ValidatingWebhookConfiguration/arcguard`.
        configuration: String,
        /// The deadline.
        after: Duration,
    },
}

/// A webhook failure policy, as the API spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Reject the request when the webhook cannot be called.
    Fail,
    /// Admit the request when the webhook cannot be called.
    Ignore,
}

impl FailurePolicy {
    /// `Fail` or `Ignore`; anything else (other case included, as the API) is `None`.
    #[must_use]
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "Fail" => Some(Self::Fail),
            "Ignore" => Some(Self::Ignore),
            _ => None,
        }
    }

    /// The API's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "Fail",
            Self::Ignore => "Ignore",
        }
    }
}

/// One webhook as the decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookView {
    /// Its name (`validate.arcguard.io`).
    pub name: String,
    /// Its `failurePolicy` (the API defaults it to `Fail` when it is written without one).
    pub failure_policy: Option<String>,
    /// Whether its `clientConfig.caBundle` is set and not empty.
    pub has_ca_bundle: bool,
    /// The Service its `clientConfig` names, if any (else it has a `url`).
    pub service: Option<ServiceRef>,
}

/// A Service, as a webhook's `clientConfig.service` names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// What decides whether arcguard can answer a webhook's calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reachability {
    /// This replica is ready ([`crate::server::Readiness::is_ready_for`]).
    pub ready: bool,
    /// arcguard's own Service, and whether its EndpointSlices hold a ready endpoint (false
    /// until they have been listed).
    pub service: (ServiceRef, bool),
}

impl Reachability {
    /// Whether calls through `webhook`'s client configuration reach a ready replica.
    fn reaches(&self, webhook: &WebhookView) -> bool {
        match &webhook.service {
            Some(service) if *service == self.service.0 => self.ready && self.service.1,
            _ => self.ready,
        }
    }
}

/// One webhook configuration as the decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigurationView {
    /// A name for logs and errors, e.g. `ValidatingWebhookConfiguration/arcguard`.
    pub reference: String,
    /// Its `metadata.resourceVersion`, which the patch is conditional on.
    pub resource_version: Option<String>,
    /// The value of [`FAILURE_POLICY_ANNOTATION`], if set.
    pub annotation: Option<String>,
    /// Its webhooks, in order (patches address them by index).
    pub webhooks: Vec<WebhookView>,
}

impl ConfigurationView {
    fn new<'a>(
        reference: String,
        metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        webhooks: impl Iterator<
            Item = (
                &'a str,
                Option<&'a str>,
                &'a k8s_openapi::api::admissionregistration::v1::WebhookClientConfig,
            ),
        >,
    ) -> Self {
        Self {
            reference,
            resource_version: metadata.resource_version.clone(),
            annotation: metadata
                .annotations
                .as_ref()
                .and_then(|a: &BTreeMap<String, String>| a.get(FAILURE_POLICY_ANNOTATION))
                .cloned(),
            webhooks: webhooks
                .map(|(name, failure_policy, client_config)| WebhookView {
                    name: name.to_owned(),
                    failure_policy: failure_policy.map(str::to_owned),
                    has_ca_bundle: client_config
                        .ca_bundle
                        .as_ref()
                        .is_some_and(|b| !b.0.is_empty()),
                    service: client_config.service.as_ref().map(|s| ServiceRef {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                    }),
                })
                .collect(),
        }
    }

    /// How many webhooks are fail-open while the annotation asks for `Fail` (0 without the
    /// annotation or when it asks for `Ignore`): what `arcguard_webhooks_fail_open` exports.
    #[must_use]
    pub fn short_of_annotated(&self) -> usize {
        if self.annotation.as_deref() != Some(FailurePolicy::Fail.as_str()) {
            return 0;
        }
        self.webhooks.iter().filter(|w| w.failure_policy.as_deref() != Some("Fail")).count()
    }

    /// The view of a ValidatingWebhookConfiguration named `reference` in logs.
    #[must_use]
    pub fn validating(configuration: &ValidatingWebhookConfiguration, reference: String) -> Self {
        let webhooks = configuration.webhooks.iter().flatten();
        Self::new(
            reference,
            &configuration.metadata,
            webhooks.map(|w| (w.name.as_str(), w.failure_policy.as_deref(), &w.client_config)),
        )
    }

    /// The view of a MutatingWebhookConfiguration named `reference` in logs.
    #[must_use]
    pub fn mutating(configuration: &MutatingWebhookConfiguration, reference: String) -> Self {
        let webhooks = configuration.webhooks.iter().flatten();
        Self::new(
            reference,
            &configuration.metadata,
            webhooks.map(|w| (w.name.as_str(), w.failure_policy.as_deref(), &w.client_config)),
        )
    }
}

/// What to do with one configuration's failure policies.
#[derive(Debug)]
pub enum Decision {
    /// No annotation: the operator manages `failurePolicy`.
    Unmanaged,
    /// The annotation is neither `Fail` nor `Ignore`: nothing changes
    /// ([`WebhookError::InvalidAnnotation`]).
    Invalid(WebhookError),
    /// Every webhook already has the annotated policy.
    InForce(FailurePolicy),
    /// Some webhooks differ, but this replica cannot answer yet.
    NotReady(FailurePolicy),
    /// Some webhooks differ, and this replica is ready, but this one calls arcguard's Service,
    /// which has no ready endpoint yet: the apiserver could not reach any replica.
    NoEndpoint {
        /// The webhook's name.
        webhook: String,
    },
    /// Some webhooks differ, but this one has no `caBundle`: the apiserver could not verify
    /// any replica, so it is not made fail-closed yet.
    NoCaBundle {
        /// The webhook's name.
        webhook: String,
    },
    /// Set `policy` in these webhooks (index, name).
    Set {
        /// The annotated policy.
        policy: FailurePolicy,
        /// The webhooks whose policy differs, by index and name.
        webhooks: Vec<(usize, String)>,
    },
}

/// Decides what to do with `configuration` given what the apiserver can reach. Pure.
#[must_use]
pub fn decide(configuration: &ConfigurationView, reach: &Reachability) -> Decision {
    let Some(value) = configuration.annotation.as_deref() else {
        return Decision::Unmanaged;
    };
    let Some(policy) = FailurePolicy::parse(value) else {
        return Decision::Invalid(WebhookError::InvalidAnnotation {
            configuration: configuration.reference.clone(),
            value: value.to_owned(),
        });
    };
    let differing: Vec<(usize, &WebhookView)> = configuration
        .webhooks
        .iter()
        .enumerate()
        .filter(|(_, w)| w.failure_policy.as_deref() != Some(policy.as_str()))
        .collect();
    if differing.is_empty() {
        return Decision::InForce(policy);
    }
    if !reach.ready {
        return Decision::NotReady(policy);
    }
    if policy == FailurePolicy::Fail {
        if let Some((_, webhook)) = differing.iter().find(|(_, w)| !w.has_ca_bundle) {
            return Decision::NoCaBundle { webhook: webhook.name.clone() };
        }
        if let Some((_, webhook)) = differing.iter().find(|(_, w)| !reach.reaches(w)) {
            return Decision::NoEndpoint { webhook: webhook.name.clone() };
        }
    }
    Decision::Set {
        policy,
        webhooks: differing.into_iter().map(|(i, w)| (i, w.name.clone())).collect(),
    }
}

/// The JSON patch that sets `policy` in `webhooks` (index, name), conditional on the
/// configuration's `resourceVersion` and on each index still holding that webhook.
///
/// # Errors
/// [`WebhookError::BuildPatch`] (not expected: the patch is built from strings).
pub fn failure_policy_patch(
    resource_version: Option<&str>,
    webhooks: &[(usize, String)],
    policy: FailurePolicy,
) -> Result<json_patch::Patch, WebhookError> {
    let mut ops = Vec::with_capacity(1 + 2 * webhooks.len());
    if let Some(version) = resource_version {
        ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": version}));
    }
    for (index, name) in webhooks {
        ops.push(json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": name}));
        ops.push(json!({
            "op": "add",
            "path": format!("/webhooks/{index}/failurePolicy"),
            "value": policy.as_str(),
        }));
    }
    serde_json::from_value(serde_json::Value::Array(ops)).map_err(WebhookError::BuildPatch)
}

/// Whether a patch went through or lost a race (a 409, or a failed `test`: 422).
#[derive(Debug, PartialEq, Eq)]
enum Written {
    Done,
    Conflict,
}

/// Sends `patch` to the configuration `name` within [`CALL_DEADLINE`].
async fn send<K>(
    api: &Api<K>,
    name: &str,
    reference: &str,
    patch: json_patch::Patch,
) -> Result<Written, WebhookError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params =
        PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PatchParams::default() };
    let patch = Patch::Json::<()>(patch);
    match tokio::time::timeout(CALL_DEADLINE, api.patch(name, &params, &patch)).await {
        Ok(Ok(_)) => Ok(Written::Done),
        Ok(Err(kube::Error::Api(status))) if status.code == 409 || status.code == 422 => {
            Ok(Written::Conflict)
        }
        Ok(Err(source)) => Err(WebhookError::Patch { configuration: reference.to_owned(), source }),
        Err(_) => {
            Err(WebhookError::Timeout { configuration: reference.to_owned(), after: CALL_DEADLINE })
        }
    }
}

/// What was last logged for one configuration, so each state is logged once.
#[derive(Debug, Default)]
struct Reported(Option<String>);

impl Reported {
    /// Whether `state` differs from the last one reported (and remembers it).
    fn changed(&mut self, state: String) -> bool {
        if self.0.as_deref() == Some(state.as_str()) {
            return false;
        }
        self.0 = Some(state);
        true
    }
}

/// Acts on one configuration: decides and, when needed, patches. Returns whether it must be
/// retried after a back-off (an error or a lost race).
async fn enforce<K>(
    api: &Api<K>,
    name: &str,
    view: &ConfigurationView,
    reach: &Reachability,
    reported: &mut Reported,
    leading_since: tokio::time::Instant,
) -> bool
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let reference = view.reference.as_str();
    match decide(view, reach) {
        Decision::Unmanaged => {
            if reported.changed("unmanaged".to_owned()) {
                tracing::info!(
                    configuration = reference,
                    "no {FAILURE_POLICY_ANNOTATION} annotation: failurePolicy is left to the operator"
                );
            }
            false
        }
        Decision::Invalid(error) => {
            if reported.changed(format!("invalid {:?}", view.annotation)) {
                tracing::error!(%error, "refusing an invalid failure policy annotation");
            }
            false
        }
        Decision::InForce(policy) => {
            if reported.changed(format!("in force {}", policy.as_str())) {
                tracing::info!(
                    configuration = reference,
                    policy = policy.as_str(),
                    "every webhook has the annotated failurePolicy"
                );
            }
            false
        }
        Decision::NotReady(policy) => {
            if reported.changed(format!("not ready {}", policy.as_str())) {
                tracing::info!(
                    configuration = reference,
                    policy = policy.as_str(),
                    "failurePolicy waits until this replica is ready to answer"
                );
            }
            false
        }
        Decision::NoEndpoint { webhook } => {
            if reported.changed(format!("no endpoint {webhook}")) {
                tracing::info!(
                    configuration = reference,
                    webhook,
                    service = %format!("{}/{}", reach.service.0.namespace, reach.service.0.name),
                    "failurePolicy Fail waits until the Service has a ready endpoint"
                );
            }
            false
        }
        Decision::NoCaBundle { webhook } => {
            if reported.changed(format!("no caBundle {webhook}")) {
                tracing::warn!(
                    configuration = reference,
                    webhook,
                    "failurePolicy Fail waits until the webhook has a caBundle"
                );
            }
            false
        }
        Decision::Set { policy, webhooks } => {
            let patch =
                match failure_policy_patch(view.resource_version.as_deref(), &webhooks, policy) {
                    Ok(patch) => patch,
                    Err(error) => {
                        tracing::error!(%error, "failurePolicy not set");
                        return true;
                    }
                };
            match send(api, name, reference, patch).await {
                Ok(Written::Done) => {
                    let names: Vec<&str> = webhooks.iter().map(|(_, n)| n.as_str()).collect();
                    tracing::info!(
                        configuration = reference,
                        policy = policy.as_str(),
                        webhooks = %names.join(", "),
                        since_leading_ms = leading_since.elapsed().as_millis(),
                        "set the annotated failurePolicy: this replica is ready to answer"
                    );
                    false
                }
                Ok(Written::Conflict) => {
                    tracing::info!(
                        configuration = reference,
                        "the configuration changed first; deciding again on its new version"
                    );
                    true
                }
                Err(error) => {
                    tracing::error!(%error, "failurePolicy not set; retrying after a back-off");
                    true
                }
            }
        }
    }
}

/// Keeps the failure policy of arcguard's two webhook configurations at the annotated one while
/// this replica leads and is ready, until `shutdown` completes ([module docs](self)).
pub async fn run(
    client: Client,
    objects: Objects,
    config: CertConfig,
    mut leadership: Leadership,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            waited = leadership.wait_for(true) => if waited.is_err() {
                shutdown.await;
                return;
            },
        }
        let mut follower = leadership.clone();
        tokio::select! {
            () = &mut shutdown => return,
            _ = follower.wait_for(false) => {}
            () = lead(&client, objects.clone(), &config, &state) => {}
        }
        // Only the leader's figure means anything.
        state.metrics.set_webhooks_fail_open(0);
    }
}

/// The loop of a leader; runs until dropped. The configurations come from the shared watches
/// of [`super::objects`]; the Service's EndpointSlices from a watch of this leader's.
async fn lead(client: &Client, mut objects: Objects, config: &CertConfig, state: &AppState) {
    let validating_api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mutating_api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating_name = config.validating_webhook_configuration.as_str();
    let mutating_name = config.mutating_webhook_configuration.as_str();
    let slices_api: Api<EndpointSlice> = Api::namespaced(client.clone(), &config.namespace);
    let (slices, slices_writer) = reflector::store();
    let of_service = format!("{SERVICE_NAME_LABEL}={}", config.service_name);
    let mut slice_events = Box::pin(
        watcher(slices_api, watcher::Config::default().labels(&of_service))
            .backoff(super::watch_backoff())
            .reflect(slices_writer),
    );
    let service =
        ServiceRef { namespace: config.namespace.clone(), name: config.service_name.clone() };
    let mut readiness = state.readiness.changes();
    let (mut validating_reported, mut mutating_reported) =
        (Reported::default(), Reported::default());
    let mut backoff = Backoff::default();
    let mut retry_in = RECHECK;
    let leading_since = tokio::time::Instant::now();
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                event = slice_events.next() => match event {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => tracing::warn!(%error, "watching the Service's EndpointSlices failed; retrying (failurePolicy stays as it is meanwhile)"),
                    None => return,
                },
                changed = objects.changed() => if !changed {
                    return;
                },
                changed = readiness.changed() => if changed.is_err() {
                    return;
                },
                () = tokio::time::sleep(retry_in) => {}
            }
        }
        first = false;
        let (validating, mutating) = (objects.validating(), objects.mutating());
        let reach = Reachability {
            ready: state.readiness.is_ready_for(&state.snapshot.load().policies),
            service: (service.clone(), has_ready_endpoint(&slices.state())),
        };
        let mut retry = false;
        let mut fail_open = 0usize;
        if let Some(configuration) = validating.get() {
            let view = ConfigurationView::validating(
                configuration,
                format!("ValidatingWebhookConfiguration/{validating_name}"),
            );
            fail_open += view.short_of_annotated();
            retry |= enforce(
                &validating_api,
                validating_name,
                &view,
                &reach,
                &mut validating_reported,
                leading_since,
            )
            .await;
        }
        if let Some(configuration) = mutating.get() {
            let view = ConfigurationView::mutating(
                configuration,
                format!("MutatingWebhookConfiguration/{mutating_name}"),
            );
            fail_open += view.short_of_annotated();
            retry |= enforce(
                &mutating_api,
                mutating_name,
                &view,
                &reach,
                &mut mutating_reported,
                leading_since,
            )
            .await;
        }
        state.metrics.set_webhooks_fail_open(i64::try_from(fail_open).unwrap_or(i64::MAX));
        state.metrics.record_failure_policy_decision();
        retry_in = if retry {
            backoff.next_delay()
        } else {
            backoff.reset();
            RECHECK
        };
    }
}

/// Whether any of the Service's EndpointSlices holds an endpoint the apiserver may be routed
/// to: `conditions.ready` true or unset ("a nil value should be interpreted as true", the
/// EndpointConditions API) and not terminating.
#[must_use]
pub fn has_ready_endpoint(slices: &[std::sync::Arc<EndpointSlice>]) -> bool {
    slices.iter().flat_map(|slice| slice.endpoints.iter().flatten()).any(|endpoint| {
        endpoint
            .conditions
            .as_ref()
            .is_none_or(|c| c.ready != Some(false) && c.terminating != Some(true))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn view(
        annotation: Option<&str>,
        webhooks: &[(&str, Option<&str>, bool)],
    ) -> ConfigurationView {
        ConfigurationView {
            reference: "ValidatingWebhookConfiguration/arcguard".to_owned(),
            resource_version: Some("7".to_owned()),
            annotation: annotation.map(str::to_owned),
            webhooks: webhooks
                .iter()
                .map(|(name, policy, bundle)| WebhookView {
                    name: (*name).to_owned(),
                    failure_policy: policy.map(str::to_owned),
                    has_ca_bundle: *bundle,
                    service: None,
                })
                .collect(),
        }
    }

    fn own_service() -> ServiceRef {
        ServiceRef { namespace: "arcguard-system".to_owned(), name: "arcguard".to_owned() }
    }

    /// This replica `ready` or not; the Service's endpoints not ready.
    fn reach(ready: bool) -> Reachability {
        Reachability { ready, service: (own_service(), false) }
    }

    /// The decision, written as a short string for the table.
    fn summary(decision: &Decision) -> String {
        match decision {
            Decision::Unmanaged => "unmanaged".to_owned(),
            Decision::Invalid(_) => "invalid".to_owned(),
            Decision::InForce(p) => format!("in force {}", p.as_str()),
            Decision::NotReady(p) => format!("not ready {}", p.as_str()),
            Decision::NoCaBundle { webhook } => format!("no caBundle {webhook}"),
            Decision::NoEndpoint { webhook } => format!("no endpoint {webhook}"),
            Decision::Set { policy, webhooks } => {
                let names: Vec<String> = webhooks.iter().map(|(i, n)| format!("{i}:{n}")).collect();
                format!("set {} {}", policy.as_str(), names.join(","))
            }
        }
    }

    #[test]
    fn the_annotated_failure_policy_is_set_only_once_ready_and_only_where_it_differs() {
        let ignore = Some("Ignore");
        let fail = Some("Fail");
        type Case<'a> =
            (&'a str, Option<&'a str>, &'a [(&'a str, Option<&'a str>, bool)], bool, &'a str);
        let cases: [Case<'_>; 14] = [
            ("no annotation: operator-managed", None, &[("v", ignore, true)], true, "unmanaged"),
            ("no annotation, not ready", None, &[("v", ignore, true)], false, "unmanaged"),
            ("garbage", Some("Closed"), &[("v", ignore, true)], true, "invalid"),
            ("wrong case", Some("fail"), &[("v", ignore, true)], true, "invalid"),
            ("empty", Some(""), &[("v", ignore, true)], true, "invalid"),
            ("Fail, not ready", fail, &[("v", ignore, true)], false, "not ready Fail"),
            (
                "Fail, ready",
                fail,
                &[("v", ignore, true), ("p", ignore, true)],
                true,
                "set Fail 0:v,1:p",
            ),
            (
                "Fail, ready, one already Fail",
                fail,
                &[("v", fail, true), ("p", ignore, true)],
                true,
                "set Fail 1:p",
            ),
            ("Fail, ready, unset", fail, &[("v", None, true)], true, "set Fail 0:v"),
            ("already Fail", fail, &[("v", fail, true), ("p", fail, true)], true, "in force Fail"),
            ("already Fail, not ready", fail, &[("v", fail, false)], false, "in force Fail"),
            (
                "Fail without caBundle",
                fail,
                &[("v", fail, true), ("p", ignore, false)],
                true,
                "no caBundle p",
            ),
            ("Ignore, ready", ignore, &[("v", fail, false)], true, "set Ignore 0:v"),
            ("Ignore, already", ignore, &[("v", ignore, true)], true, "in force Ignore"),
        ];
        for (label, annotation, webhooks, ready, expected) in cases {
            let decision = decide(&view(annotation, webhooks), &reach(ready));
            assert_eq!(summary(&decision), expected, "{label}");
        }
        assert_eq!(
            summary(&decide(&view(fail, &[]), &reach(true))),
            "in force Fail",
            "no webhooks"
        );
    }

    #[test]
    fn a_webhook_through_arcguards_service_fails_closed_only_once_the_service_has_a_ready_endpoint()
    {
        let through = |service: ServiceRef| {
            let mut configuration = view(Some("Fail"), &[("v", Some("Ignore"), true)]);
            configuration.webhooks[0].service = Some(service);
            configuration
        };
        let other = ServiceRef { namespace: "proxy".to_owned(), name: "arcguard".to_owned() };
        let with_endpoint = |ready| Reachability { ready, service: (own_service(), true) };
        let cases = [
            (
                "own Service, no ready endpoint",
                through(own_service()),
                reach(true),
                "no endpoint v",
            ),
            (
                "own Service, ready endpoint",
                through(own_service()),
                with_endpoint(true),
                "set Fail 0:v",
            ),
            (
                "own Service, endpoint, replica not ready",
                through(own_service()),
                with_endpoint(false),
                "not ready Fail",
            ),
            ("another Service: readiness only", through(other), reach(true), "set Fail 0:v"),
            (
                "a url: readiness only",
                view(Some("Fail"), &[("v", Some("Ignore"), true)]),
                reach(true),
                "set Fail 0:v",
            ),
        ];
        for (label, configuration, reachability, expected) in cases {
            assert_eq!(summary(&decide(&configuration, &reachability)), expected, "{label}");
        }
        // What the fail-open gauge counts: webhooks short of an annotated Fail.
        assert_eq!(through(own_service()).short_of_annotated(), 1);
        let mixed = view(Some("Fail"), &[("v", Some("Fail"), true), ("p", None, true)]);
        assert_eq!(mixed.short_of_annotated(), 1, "unset is not Fail yet");
        assert_eq!(view(Some("Ignore"), &[("v", Some("Ignore"), true)]).short_of_annotated(), 0);
        assert_eq!(view(None, &[("v", Some("Ignore"), true)]).short_of_annotated(), 0);
        // Relaxing to Ignore never waits for an endpoint.
        let mut relax = through(own_service());
        relax.annotation = Some("Ignore".to_owned());
        relax.webhooks[0].failure_policy = Some("Fail".to_owned());
        assert_eq!(summary(&decide(&relax, &reach(true))), "set Ignore 0:v");
    }

    #[test]
    fn ready_endpoints_are_ready_or_unset_and_not_terminating() {
        let slice = |conditions: Value| -> std::sync::Arc<EndpointSlice> {
            std::sync::Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": "arcguard-x"},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": ["10.0.0.7"], "conditions": conditions}],
                }))
                .expect("valid EndpointSlice"),
            )
        };
        let empty: std::sync::Arc<EndpointSlice> = std::sync::Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "e"}, "addressType": "IPv4"}))
                .expect("valid"),
        );
        assert!(!has_ready_endpoint(&[]), "no slice yet");
        assert!(!has_ready_endpoint(std::slice::from_ref(&empty)), "a slice without endpoints");
        assert!(has_ready_endpoint(&[slice(json!({"ready": true}))]));
        assert!(has_ready_endpoint(&[slice(json!({}))]), "unset means ready (API docs)");
        assert!(!has_ready_endpoint(&[slice(json!({"ready": false}))]));
        assert!(!has_ready_endpoint(&[slice(json!({"ready": true, "terminating": true}))]));
        assert!(has_ready_endpoint(&[empty, slice(json!({"ready": false})), slice(json!({}))]));
    }

    #[test]
    fn a_garbage_annotation_is_refused_naming_the_configuration_and_the_value() {
        let Decision::Invalid(error) =
            decide(&view(Some("Closed"), &[("v", None, true)]), &reach(true))
        else {
            panic!("garbage must be refused");
        };
        assert_eq!(
            error.to_string(),
            "ValidatingWebhookConfiguration/arcguard: annotation arcguard.io/failure-policy is \"Closed\", expected \"Fail\" or \"Ignore\"; failurePolicy is left as it is"
        );
    }

    #[test]
    fn the_patch_is_conditional_on_the_version_and_on_each_webhook_name() {
        let webhooks = [(1, "policies.arcguard.io".to_owned())];
        let patch =
            failure_policy_patch(Some("7"), &webhooks, FailurePolicy::Fail).expect("builds");
        assert_eq!(
            serde_json::to_value(&patch).expect("serializes"),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "test", "path": "/webhooks/1/name", "value": "policies.arcguard.io"},
                {"op": "add", "path": "/webhooks/1/failurePolicy", "value": "Fail"},
            ])
        );
        let mut configuration = json!({
            "metadata": {"name": "arcguard", "resourceVersion": "7"},
            "webhooks": [{"name": "validate.arcguard.io"}, {"name": "policies.arcguard.io", "failurePolicy": "Ignore"}],
        });
        json_patch::patch(&mut configuration, &patch).expect("applies");
        assert_eq!(configuration["webhooks"][1]["failurePolicy"], "Fail");
        assert!(configuration["webhooks"][0].get("failurePolicy").is_none());
        let mut moved = json!({
            "metadata": {"resourceVersion": "7"},
            "webhooks": [{"name": "validate.arcguard.io"}, {"name": "other"}],
        });
        assert!(json_patch::patch(&mut moved, &patch).is_err(), "another webhook at that index");
    }

    #[test]
    fn views_read_the_annotation_the_policies_and_the_bundles_of_both_kinds() {
        let validating: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "arcguard", "resourceVersion": "3",
                         "annotations": {FAILURE_POLICY_ANNOTATION: "Fail"}},
            "webhooks": [
                {"name": "v", "failurePolicy": "Ignore", "sideEffects": "None", "admissionReviewVersions": ["v1"],
                 "clientConfig": {"url": "https://127.0.0.1/validate", "caBundle": "UEVN"}},
                {"name": "p", "sideEffects": "None", "admissionReviewVersions": ["v1"],
                 "clientConfig": {"url": "https://127.0.0.1/validate", "caBundle": ""}},
            ],
        }))
        .expect("valid");
        let view = ConfigurationView::validating(&validating, "V".to_owned());
        assert_eq!(view.annotation.as_deref(), Some("Fail"));
        assert_eq!(view.resource_version.as_deref(), Some("3"));
        let seen: Vec<_> = view
            .webhooks
            .iter()
            .map(|w| (w.name.as_str(), w.failure_policy.as_deref(), w.has_ca_bundle))
            .collect();
        assert_eq!(seen, [("v", Some("Ignore"), true), ("p", None, false)]);
        let mutating: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "arcguard"},
            "webhooks": [{"name": "m", "failurePolicy": "Fail", "sideEffects": "None",
                          "admissionReviewVersions": ["v1"], "clientConfig": {}}],
        }))
        .expect("valid");
        let view = ConfigurationView::mutating(&mutating, "M".to_owned());
        assert_eq!((view.annotation, view.webhooks.len()), (None, 1));
    }
}
