//! The serving certificate in cluster mode: the leader provisions, renews, rotates and revokes
//! it in a Secret and keeps the webhooks' CA bundle in step ([`run_controller`]); every replica
//! serves what the Secret holds and reports whether the webhooks trust it ([`run_serving`]).
//!
//! The decisions are made by the pure planner in [`crate::certs::plan`]; this module reads the
//! API, applies one [`Action`](plan::Action) per [`reconcile_once`] and schedules the next.
//! Writes are conditional (`resourceVersion`; a `test` op in JSON patches); a lost race is
//! re-read and re-planned after a back-off, never retried in a loop. Only arcguard's own Secret
//! and its two named webhook configurations are ever read or written.
//!
//! One file per concern: `reconcile.rs` reads the objects and applies one action,
//! `controller.rs` is the leader's loop around it, `serving.rs` serves the Secret's certificate
//! on every replica and gates readiness, `revoke.rs` asks the leader to revoke; this file holds
//! the settings, the errors and the API handles they share.
//!
//! # API calls (for RBAC)
//!
//! [`run_controller`] and [`reconcile_once`] (the leader):
//! - `get core/secrets (namespaced: the Secret, by name)`
//! - `create core/secrets (namespaced)` (not with `external`)
//! - `update core/secrets (namespaced: the Secret, by name)` (not with `external`)
//! - `get admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: by name)`
//! - `patch admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: by name)` (with `inject_ca_bundle`)
//! - `get admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: by name)`
//! - `patch admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: by name)` (with `inject_ca_bundle`)
//!
//! [`run_serving`] (every replica) and the controller's wake-ups follow the shared watches of
//! [`crate::cluster::objects`], which lists those calls.
//!
//! [`request_revoke`] (`arcguard certs revoke`):
//! - `patch core/secrets (namespaced: the Secret, by name)`
//!
//! RBAC can restrict `list`/`watch` with `resourceNames` only when the request carries the
//! `metadata.name` field selector, which every list and watch of these objects does.

mod controller;
mod reconcile;
mod revoke;
mod serving;
#[cfg(test)]
mod test_support;

pub use controller::{Backoff, run_controller};
pub use reconcile::{Outcome, observe, reconcile_once, stored_secret};
pub use revoke::request_revoke;
pub use serving::{ServingState, run_serving};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::certs::plan::{self, PlanConfig, PlanError};

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

#[cfg(test)]
mod tests {
    use super::test_support::{contents, secret, t0};
    use super::*;
    use crate::certs::plan::CA_BUNDLE_KEY;

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
