//! arcguard's own named objects, each watched once per process and shared: the certificate
//! Secret and the two webhook configurations.
//!
//! Three parts of cluster mode follow them: every replica's serving side (the Secret's
//! certificate, and whether the webhooks' `caBundle` trusts it), the leader's certificate
//! controller (a wake-up on any change) and the leader's failure-policy task (the webhooks'
//! `failurePolicy`). Each used to run its own watches, so a leader held eight watches on three
//! objects; now each object has one. Each watch is kube-runtime's [`watch_object`] (a watch
//! by `metadata.name` field selector that yields the object, or `None` when a list shows it
//! absent) with arcguard's back-off ([`super::watch_backoff`]); the latest state is published
//! on a tokio watch channel, which is all a subscriber of one object needs. kube-runtime's
//! shared reflectors (`reflect_shared`) would also fan a watch out, but they sit behind its
//! `unstable-runtime` feature and keep a store of many objects; for one object a watch channel
//! says the same with stable API.
//!
//! API calls (for RBAC; `tests/manifests.rs` checks the manifests grant exactly these):
//! - `list core/secrets (namespaced: fieldSelector metadata.name=the Secret)`
//! - `watch core/secrets (namespaced: fieldSelector metadata.name=the Secret)`
//! - `list admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `watch admissionregistration.k8s.io/validatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `list admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: fieldSelector metadata.name)`
//! - `watch admissionregistration.k8s.io/mutatingwebhookconfigurations (cluster: fieldSelector metadata.name)`

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::watch_object;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::certs::CertConfig;

/// What is known of one object.
#[derive(Debug)]
pub enum Seen<K> {
    /// Not listed yet (the watch has not answered).
    NotListed,
    /// Listed, and it does not exist.
    Absent,
    /// It exists; this is its latest version.
    Present(Arc<K>),
}

impl<K> Clone for Seen<K> {
    fn clone(&self) -> Self {
        match self {
            Self::NotListed => Self::NotListed,
            Self::Absent => Self::Absent,
            Self::Present(object) => Self::Present(Arc::clone(object)),
        }
    }
}

impl<K> Seen<K> {
    /// The object, if it exists.
    #[must_use]
    pub fn get(&self) -> Option<&K> {
        match self {
            Self::Present(object) => Some(object),
            _ => None,
        }
    }

    /// Whether it has been listed once (present or absent).
    #[must_use]
    pub fn is_listed(&self) -> bool {
        !matches!(self, Self::NotListed)
    }
}

/// Subscriptions to the three objects; clone one per subscriber.
#[derive(Clone, Debug)]
pub struct Objects {
    secret: watch::Receiver<Seen<Secret>>,
    validating: watch::Receiver<Seen<ValidatingWebhookConfiguration>>,
    mutating: watch::Receiver<Seen<MutatingWebhookConfiguration>>,
}

impl Objects {
    /// Starts one watch per object (named in `config`); each runs until `stop` turns true.
    /// Returns the subscriptions and the watch tasks.
    pub fn watch(
        client: &Client,
        config: &CertConfig,
        stop: &watch::Receiver<bool>,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
        let (secret, task_secret) = follow(secrets, &config.secret_name, stop.clone());
        let (validating, task_validating) = follow(
            Api::all(client.clone()),
            &config.validating_webhook_configuration,
            stop.clone(),
        );
        let (mutating, task_mutating) =
            follow(Api::all(client.clone()), &config.mutating_webhook_configuration, stop.clone());
        (Self { secret, validating, mutating }, vec![task_secret, task_validating, task_mutating])
    }

    /// Subscriptions fed by the caller, for tests.
    #[must_use]
    pub fn from_channels(
        secret: watch::Receiver<Seen<Secret>>,
        validating: watch::Receiver<Seen<ValidatingWebhookConfiguration>>,
        mutating: watch::Receiver<Seen<MutatingWebhookConfiguration>>,
    ) -> Self {
        Self { secret, validating, mutating }
    }

    /// The certificate Secret, as last seen.
    #[must_use]
    pub fn secret(&self) -> Seen<Secret> {
        self.secret.borrow().clone()
    }

    /// arcguard's ValidatingWebhookConfiguration, as last seen.
    #[must_use]
    pub fn validating(&self) -> Seen<ValidatingWebhookConfiguration> {
        self.validating.borrow().clone()
    }

    /// arcguard's MutatingWebhookConfiguration, as last seen.
    #[must_use]
    pub fn mutating(&self) -> Seen<MutatingWebhookConfiguration> {
        self.mutating.borrow().clone()
    }

    /// Marks every object's current state as seen by this subscriber: [`Self::changed`] then
    /// waits for a newer one.
    pub fn mark_seen(&mut self) {
        self.secret.mark_unchanged();
        self.validating.mark_unchanged();
        self.mutating.mark_unchanged();
    }

    /// Completes when any of the three objects changed since this subscriber last looked
    /// ([`Self::mark_seen`], or the previous `changed`); returns false when the watches have
    /// stopped.
    pub async fn changed(&mut self) -> bool {
        let changed = tokio::select! {
            changed = self.secret.changed() => changed,
            changed = self.validating.changed() => changed,
            changed = self.mutating.changed() => changed,
        };
        if changed.is_ok() {
            self.mark_seen();
        }
        changed.is_ok()
    }
}

/// Watches the object `name` through `api` until `stop` turns true, publishing each state.
fn follow<K>(
    api: Api<K>,
    name: &str,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Seen<K>>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let (sender, receiver) = watch::channel(Seen::NotListed);
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let name = name.to_owned();
    let task = tokio::spawn(async move {
        let mut states = Box::pin(watch_object(api, &name).backoff(super::watch_backoff()));
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                state = states.next() => match state {
                    Some(Ok(Some(object))) => {
                        sender.send_replace(Seen::Present(Arc::new(object)));
                    }
                    Some(Ok(None)) => {
                        sender.send_replace(Seen::Absent);
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, kind, name, "watching the object failed; retrying");
                    }
                    None => return,
                },
            }
        }
    });
    (receiver, task)
}
