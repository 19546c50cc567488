//! The certificate planner: from the Secret, the CA bundles the webhooks carry and the clock,
//! to the one next step of provisioning, renewal, CA rotation or revocation.
//!
//! [`plan`] is a pure function: it reads nothing but its arguments and the clock is a
//! parameter. New keys come from a [`Generate`] implementation, so the decision never depends
//! on the randomness of a key. The controller in `crate::cluster::certs` applies one
//! [`Action`] at a time and plans again from what the API then holds.
//!
//! # The Secret
//!
//! | data key | holds |
//! |---|---|
//! | `ca.crt`, `ca.key` | the current CA, the only one that issues serving certificates |
//! | `tls.crt`, `tls.key` | the serving certificate, issued by the current CA, and its key |
//! | `ca-bundle.crt` | what every webhook's `caBundle` must hold: `previous-ca.crt`, `ca.crt`, `next-ca.crt`, each when present, oldest first |
//! | `next-ca.crt`, `next-ca.key` | during a CA rotation, the CA that takes over once every webhook trusts it |
//! | `previous-ca.crt` | after the switch, the CA that issued the serving certificate before, trusted until the overlap ends |
//!
//! | annotation | holds |
//! |---|---|
//! | `arcguard.io/next-ca-published-at` | when every webhook was first seen carrying `next-ca.crt` (RFC 3339) |
//! | `arcguard.io/ca-switched-at` | when the current CA took over (RFC 3339); present while `previous-ca.crt` is |
//! | `arcguard.io/revoke` | set by users (`arcguard certs revoke`, GitOps): a new non-empty value requests a revocation |
//! | `arcguard.io/revoke-handled` | the last `arcguard.io/revoke` value acted upon |
//!
//! Data keys other than these are left as they are.
//!
//! # Phases
//!
//! 1. No Secret, or no usable current CA (missing, unparsable, key mismatch, expired): a new CA
//!    and serving certificate; the bundle is the new CA alone.
//! 2. A revocation request: the same, at once, whatever else is going on.
//! 3. CA rotation, started [`PlanConfig::ca_rotate_before`] the CA expires: (a) a next CA
//!    joins the bundle beside the current one; (b) once every webhook's `caBundle` holds the
//!    next CA, that moment is recorded, and [`PlanConfig::ca_overlap`] later (so every
//!    apiserver instance has loaded the configuration) the next CA becomes current and issues a
//!    new serving certificate, while the old CA stays in the bundle; (c) `ca_overlap` after the
//!    switch (so every replica serves the new certificate) the old CA leaves.
//! 4. A serving certificate that is missing, broken, for other names, not issued by the current
//!    CA, or due for renewal is re-issued by the current CA.
//! 5. A webhook whose `caBundle` differs from `ca-bundle.crt` gets it injected.
//! 6. Otherwise: wait until the earliest time something above falls due.
//!
//! Because the bundle keeps its order (oldest CA first) across the switch, the switch itself
//! changes no published bundle.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;
use rustls_pki_types::DnsName;
use time::{Duration, OffsetDateTime};

use super::{
    CertError, CertInfo, CertificateAuthority, MAX_VALIDITY, ServingCert, bundle_certificates,
    bundle_contains, load_certified_key,
};

/// Data key of the current CA certificate.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Data key of the current CA private key.
pub const CA_KEY_KEY: &str = "ca.key";
/// Data key of the serving certificate.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Data key of the serving private key.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Data key of the CA bundle to publish in the webhooks.
pub const CA_BUNDLE_KEY: &str = "ca-bundle.crt";
/// Data key of the next CA certificate, during a rotation.
pub const NEXT_CA_CERT_KEY: &str = "next-ca.crt";
/// Data key of the next CA private key, during a rotation.
pub const NEXT_CA_KEY_KEY: &str = "next-ca.key";
/// Data key of the previous CA certificate, during the overlap after a switch.
pub const PREVIOUS_CA_CERT_KEY: &str = "previous-ca.crt";
/// Every data key the planner manages.
pub const MANAGED_DATA_KEYS: [&str; 8] = [
    CA_CERT_KEY,
    CA_KEY_KEY,
    TLS_CERT_KEY,
    TLS_KEY_KEY,
    CA_BUNDLE_KEY,
    NEXT_CA_CERT_KEY,
    NEXT_CA_KEY_KEY,
    PREVIOUS_CA_CERT_KEY,
];
/// Annotation users set to request a revocation; any new non-empty value does.
pub const REVOKE_ANNOTATION: &str = "arcguard.io/revoke";
/// Annotation recording the last revocation request acted upon.
pub const REVOKE_HANDLED_ANNOTATION: &str = "arcguard.io/revoke-handled";
/// Annotation recording when every webhook was first seen carrying the next CA.
pub const NEXT_CA_PUBLISHED_AT_ANNOTATION: &str = "arcguard.io/next-ca-published-at";
/// Annotation recording when the current CA took over from the previous one.
pub const CA_SWITCHED_AT_ANNOTATION: &str = "arcguard.io/ca-switched-at";

/// Default CA lifetime: five years (1826 days).
pub const DEFAULT_CA_VALIDITY: Duration = Duration::days(1826);
/// Default serving certificate lifetime: 90 days.
pub const DEFAULT_SERVING_VALIDITY: Duration = Duration::days(90);
/// Default time before its expiry at which a serving certificate is renewed: 30 days.
pub const DEFAULT_SERVING_RENEW_BEFORE: Duration = Duration::days(30);
/// Default time before its expiry at which a CA rotation starts: 180 days.
pub const DEFAULT_CA_ROTATE_BEFORE: Duration = Duration::days(180);
/// Default wait between publishing the next CA and switching to it, and between the switch and
/// dropping the old CA: 15 minutes, ample for every apiserver to load the webhook
/// configuration and for every replica's watch to swap in the new serving certificate.
pub const DEFAULT_CA_OVERLAP: Duration = Duration::minutes(15);
/// Common name prefix of generated CAs; the creation time follows, so CAs are told apart.
pub const CA_COMMON_NAME_PREFIX: &str = "arcguard webhook CA";

// === errors ===

/// Why no plan could be made. Neither is retryable as is: the settings need fixing, or key
/// generation is broken.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A setting is out of range.
    #[error("invalid certificate setting {setting}: {reason}")]
    InvalidConfig {
        /// The setting, as named in [`PlanConfig`].
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A CA or serving certificate could not be generated.
    #[error("failed to generate the {what}: {source}")]
    Generate {
        /// "CA" or "serving certificate".
        what: &'static str,
        /// The generation error.
        #[source]
        source: CertError,
    },
}

// === configuration ===

/// What the planner needs to know: names, lifetimes, windows and mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// DNS names of the serving certificate (see [`service_dns_names`]).
    pub dns_names: Vec<String>,
    /// IP addresses of the serving certificate (for webhooks reached by URL); usually none.
    pub ip_addresses: Vec<IpAddr>,
    /// Lifetime of a new CA; default [`DEFAULT_CA_VALIDITY`].
    pub ca_validity: Duration,
    /// Lifetime of a new serving certificate (cut short at the CA's end); default
    /// [`DEFAULT_SERVING_VALIDITY`].
    pub serving_validity: Duration,
    /// Renew the serving certificate this long before it expires; default
    /// [`DEFAULT_SERVING_RENEW_BEFORE`].
    pub serving_renew_before: Duration,
    /// Start a CA rotation this long before the CA expires; default
    /// [`DEFAULT_CA_ROTATE_BEFORE`].
    pub ca_rotate_before: Duration,
    /// Switch to the next CA this long after every webhook carries it, and keep the old CA in
    /// the bundle this long after the switch; default [`DEFAULT_CA_OVERLAP`].
    pub ca_overlap: Duration,
    /// The Secret is managed by someone else (cert-manager and the like): never write it.
    pub external: bool,
    /// Keep the webhooks' `caBundle` in step with the Secret.
    pub inject_ca_bundle: bool,
}

/// The four names a Service is reached by inside the cluster.
#[must_use]
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

impl PlanConfig {
    /// The defaults for Service `service` in `namespace`.
    #[must_use]
    pub fn for_service(service: &str, namespace: &str) -> Self {
        Self {
            dns_names: service_dns_names(service, namespace),
            ip_addresses: Vec::new(),
            ca_validity: DEFAULT_CA_VALIDITY,
            serving_validity: DEFAULT_SERVING_VALIDITY,
            serving_renew_before: DEFAULT_SERVING_RENEW_BEFORE,
            ca_rotate_before: DEFAULT_CA_ROTATE_BEFORE,
            ca_overlap: DEFAULT_CA_OVERLAP,
            external: false,
            inject_ca_bundle: true,
        }
    }

    /// Checks names, lifetimes and windows; call once before planning.
    ///
    /// # Errors
    ///
    /// [`PlanError::InvalidConfig`] naming the first bad setting: no or invalid DNS names, a
    /// lifetime that is not positive or exceeds 100 years, a renewal or rotation window that is
    /// not positive or not shorter than the lifetime, or a negative overlap.
    pub fn validate(&self) -> Result<(), PlanError> {
        let invalid = |setting, reason: String| Err(PlanError::InvalidConfig { setting, reason });
        if self.dns_names.is_empty() {
            return invalid("dns_names", "at least one name is needed".to_owned());
        }
        for name in &self.dns_names {
            if let Err(error) = DnsName::try_from(name.as_str()) {
                return invalid("dns_names", format!("{name:?}: {error}"));
            }
        }
        for (setting, validity) in
            [("ca_validity", self.ca_validity), ("serving_validity", self.serving_validity)]
        {
            if !validity.is_positive() || validity > MAX_VALIDITY {
                return invalid(setting, format!("{validity} is not between 0 and 100 years"));
            }
        }
        for (setting, window, setting_of_validity, validity) in [
            (
                "serving_renew_before",
                self.serving_renew_before,
                "serving_validity",
                self.serving_validity,
            ),
            ("ca_rotate_before", self.ca_rotate_before, "ca_validity", self.ca_validity),
        ] {
            if !window.is_positive() || window >= validity {
                return invalid(
                    setting,
                    format!("{window} must be positive and shorter than {setting_of_validity}"),
                );
            }
        }
        if self.ca_overlap.is_negative() {
            return invalid("ca_overlap", format!("{} is negative", self.ca_overlap));
        }
        Ok(())
    }
}

// === what the planner sees ===

/// The Secret as stored; anything may be missing or malformed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredSecret {
    /// The data, decoded from base64.
    pub data: BTreeMap<String, Vec<u8>>,
    /// The annotations.
    pub annotations: BTreeMap<String, String>,
}

impl StoredSecret {
    /// A data value as UTF-8 text (PEM), if present and valid.
    #[must_use]
    pub fn text(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(|bytes| std::str::from_utf8(bytes).ok())
    }

    /// The pending revocation request: a non-empty `arcguard.io/revoke` value that differs
    /// from `arcguard.io/revoke-handled`.
    #[must_use]
    pub fn revoke_request(&self) -> Option<&str> {
        let request = self.annotations.get(REVOKE_ANNOTATION)?;
        let handled = self.annotations.get(REVOKE_HANDLED_ANNOTATION);
        (!request.trim().is_empty() && handled != Some(request)).then_some(request.as_str())
    }

    /// Replaces the managed data keys and annotations with `contents`, keeping everything else.
    pub fn apply(&mut self, contents: &SecretContents) {
        for key in MANAGED_DATA_KEYS {
            self.data.remove(key);
        }
        self.data.extend(contents.data());
        for (key, value) in contents.annotations() {
            match value {
                Some(value) => self.annotations.insert(key.to_owned(), value),
                None => self.annotations.remove(key),
            };
        }
    }
}

/// One webhook of arcguard's configurations and the CA bundle it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedBundle {
    /// The configuration, e.g. `ValidatingWebhookConfiguration/arcguard`.
    pub configuration: String,
    /// The webhook's name.
    pub webhook: String,
    /// Its `clientConfig.caBundle` (PEM), if set.
    pub ca_bundle: Option<Vec<u8>>,
}

impl PublishedBundle {
    /// Whether this webhook's bundle is exactly `bundle`.
    #[must_use]
    pub fn is(&self, bundle: &str) -> bool {
        self.ca_bundle.as_deref() == Some(bundle.as_bytes())
    }
}

/// Everything the planner reads besides settings and clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The Secret, or `None` when it does not exist.
    pub secret: Option<StoredSecret>,
    /// Every webhook of arcguard's Validating- and MutatingWebhookConfiguration.
    pub webhooks: Vec<PublishedBundle>,
}

// === what the planner decides ===

/// A CA certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// The CA certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[secret key elided]")
            .finish()
    }
}

/// Everything the planner keeps in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretContents {
    /// The current CA.
    pub ca: CaMaterial,
    /// The serving certificate, issued by `ca`.
    pub serving: ServingCert,
    /// The CA waiting to take over, during a rotation.
    pub next_ca: Option<CaMaterial>,
    /// When every webhook was first seen carrying `next_ca`.
    pub next_ca_published_at: Option<OffsetDateTime>,
    /// The CA that issued serving certificates before the switch, during the overlap.
    pub previous_ca_cert: Option<String>,
    /// When `ca` took over from `previous_ca_cert`.
    pub ca_switched_at: Option<OffsetDateTime>,
    /// The last revocation request acted upon.
    pub revoke_handled: Option<String>,
}

impl SecretContents {
    /// Contents with a new CA and serving certificate and no rotation under way.
    pub fn fresh(ca: CaMaterial, serving: ServingCert, revoke_handled: Option<String>) -> Self {
        Self {
            ca,
            serving,
            next_ca: None,
            next_ca_published_at: None,
            previous_ca_cert: None,
            ca_switched_at: None,
            revoke_handled,
        }
    }

    /// The CA bundle to publish: previous, current and next CA, each when present.
    #[must_use]
    pub fn bundle(&self) -> String {
        let mut bundle = String::new();
        let parts = [
            self.previous_ca_cert.as_deref(),
            Some(self.ca.cert_pem.as_str()),
            self.next_ca.as_ref().map(|ca| ca.cert_pem.as_str()),
        ];
        for pem in parts.into_iter().flatten() {
            bundle.push_str(pem.trim_end());
            bundle.push('\n');
        }
        bundle
    }

    /// The managed data keys and their values.
    #[must_use]
    pub fn data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut data = BTreeMap::new();
        let mut put = |key: &str, value: &str| {
            data.insert(key.to_owned(), value.as_bytes().to_vec());
        };
        put(CA_CERT_KEY, &self.ca.cert_pem);
        put(CA_KEY_KEY, &self.ca.key_pem);
        put(TLS_CERT_KEY, &self.serving.cert_pem);
        put(TLS_KEY_KEY, &self.serving.key_pem);
        put(CA_BUNDLE_KEY, &self.bundle());
        if let Some(next) = &self.next_ca {
            put(NEXT_CA_CERT_KEY, &next.cert_pem);
            put(NEXT_CA_KEY_KEY, &next.key_pem);
        }
        if let Some(previous) = &self.previous_ca_cert {
            put(PREVIOUS_CA_CERT_KEY, previous);
        }
        data
    }

    /// The managed annotations: `Some` to set, `None` to remove.
    #[must_use]
    pub fn annotations(&self) -> [(&'static str, Option<String>); 3] {
        [
            (NEXT_CA_PUBLISHED_AT_ANNOTATION, self.next_ca_published_at.map(format_time)),
            (CA_SWITCHED_AT_ANNOTATION, self.ca_switched_at.map(format_time)),
            (REVOKE_HANDLED_ANNOTATION, self.revoke_handled.clone()),
        ]
    }
}

/// Why the Secret is written; the `reason` label of `arcguard_certificate_rotations_total`.
///
/// Ordered by precedence: when one write does several things, the greatest names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Something was broken or inconsistent (serving certificate, bundle, rotation state) and
    /// was put right.
    Repaired,
    /// The serving certificate was due and was re-issued.
    Renewed,
    /// A next CA joined the bundle.
    CaRotationStarted,
    /// Every webhook was seen carrying the next CA; the switch follows after the overlap.
    CaPublished,
    /// The old CA left the bundle after the overlap.
    OldCaDropped,
    /// The next CA became current and issued a new serving certificate.
    CaSwitched,
    /// CA and serving certificate were created because there were none.
    Created,
    /// CA and serving certificate were replaced on request.
    Revoked,
}

impl Reason {
    /// The metric label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Repaired => "repaired",
            Self::Renewed => "renewed",
            Self::CaRotationStarted => "ca-rotation-started",
            Self::CaPublished => "ca-published",
            Self::OldCaDropped => "old-ca-dropped",
            Self::CaSwitched => "ca-switched",
            Self::Created => "created",
            Self::Revoked => "revoked",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one next step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these contents into the Secret (creating it if absent).
    Write {
        /// The new contents.
        contents: Box<SecretContents>,
        /// Why.
        reason: Reason,
    },
    /// Set `caBundle` to this PEM bundle in every webhook that does not carry it yet.
    Inject {
        /// The bundle.
        bundle: String,
    },
    /// Nothing to do until something changes, or until `until` at the latest.
    Wait {
        /// When something falls due without any change; `None` when nothing will.
        until: Option<OffsetDateTime>,
    },
}

// === generation ===

/// Makes new keys and certificates; the only non-deterministic part of planning. The
/// production implementation is [`super::RcgenGenerator`]; the planner never names it, so its
/// decisions are tested with any generator.
pub trait Generate {
    /// A new self-signed CA, valid from `now` for `validity`.
    ///
    /// # Errors
    ///
    /// When generation fails.
    fn ca(&self, validity: Duration, now: OffsetDateTime) -> Result<CaMaterial, CertError>;

    /// A new serving certificate for `dns_names` and `ip_addresses`, issued by `ca` at `now`
    /// for `validity`.
    ///
    /// # Errors
    ///
    /// When `ca` cannot be loaded or issuing fails.
    fn serving(
        &self,
        ca: &CaMaterial,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<ServingCert, CertError>;
}

// === planning ===

/// Decides the one next step. Pure: same arguments (and generator output), same action.
///
/// # Errors
///
/// [`PlanError::Generate`] when a needed certificate cannot be generated. Settings are assumed
/// [validated](PlanConfig::validate).
pub fn plan<G: Generate + ?Sized>(
    observed: &Observed,
    config: &PlanConfig,
    now: OffsetDateTime,
    generator: &G,
) -> Result<Action, PlanError> {
    if config.external {
        return Ok(plan_external(observed, config));
    }
    let Some(secret) = &observed.secret else {
        return fresh(config, now, generator, None, Reason::Created);
    };
    if let Some(request) = secret.revoke_request() {
        return fresh(config, now, generator, Some(request.to_owned()), Reason::Revoked);
    }
    let handled = secret.annotations.get(REVOKE_HANDLED_ANNOTATION).cloned();
    let Some(current) = Ca::read(secret, CA_CERT_KEY, CA_KEY_KEY, now) else {
        let anything = MANAGED_DATA_KEYS.iter().any(|key| secret.data.contains_key(*key));
        let reason = if anything { Reason::Repaired } else { Reason::Created };
        return fresh(config, now, generator, handled, reason);
    };
    plan_managed(observed, secret, current, handled, config, now, generator)
}

/// With an external Secret: only inject its `ca.crt`, when asked to and when it holds
/// certificates.
fn plan_external(observed: &Observed, config: &PlanConfig) -> Action {
    let idle = Action::Wait { until: None };
    if !config.inject_ca_bundle {
        return idle;
    }
    let Some(ca) = observed.secret.as_ref().and_then(|s| s.text(CA_CERT_KEY)) else {
        return idle;
    };
    if bundle_certificates(ca.as_bytes()).is_none_or(|certs| certs.is_empty()) {
        return idle;
    }
    if observed.webhooks.iter().all(|w| w.is(ca)) {
        return idle;
    }
    Action::Inject { bundle: ca.to_owned() }
}

/// A new CA and serving certificate, nothing else in the bundle.
fn fresh<G: Generate + ?Sized>(
    config: &PlanConfig,
    now: OffsetDateTime,
    generator: &G,
    revoke_handled: Option<String>,
    reason: Reason,
) -> Result<Action, PlanError> {
    let ca = new_ca(config, now, generator)?;
    let serving = issue(&ca, config, now, generator)?;
    let contents = SecretContents::fresh(ca, serving, revoke_handled);
    Ok(Action::Write { contents: Box::new(contents), reason })
}

fn new_ca<G: Generate + ?Sized>(
    config: &PlanConfig,
    now: OffsetDateTime,
    generator: &G,
) -> Result<CaMaterial, PlanError> {
    generator
        .ca(config.ca_validity, now)
        .map_err(|source| PlanError::Generate { what: "CA", source })
}

fn issue<G: Generate + ?Sized>(
    ca: &CaMaterial,
    config: &PlanConfig,
    now: OffsetDateTime,
    generator: &G,
) -> Result<ServingCert, PlanError> {
    generator
        .serving(ca, &config.dns_names, &config.ip_addresses, config.serving_validity, now)
        .map_err(|source| PlanError::Generate { what: "serving certificate", source })
}

/// A CA that loads (certificate, matching key) and has not expired.
struct Ca {
    material: CaMaterial,
    info: CertInfo,
}

impl Ca {
    fn read(
        secret: &StoredSecret,
        cert_key: &str,
        key_key: &str,
        now: OffsetDateTime,
    ) -> Option<Self> {
        let cert_pem = secret.text(cert_key)?;
        let key_pem = secret.text(key_key)?;
        CertificateAuthority::from_pem(cert_pem, key_pem).ok()?;
        let info = CertInfo::from_pem(cert_pem).ok()?;
        (now < info.not_after).then(|| Self {
            material: CaMaterial { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() },
            info,
        })
    }
}

/// The previous CA: only its certificate is kept.
struct PreviousCa {
    cert_pem: String,
    info: CertInfo,
}

/// Keeps the reason of highest precedence.
fn note(reason: &mut Option<Reason>, new: Reason) {
    *reason = (*reason).max(Some(new));
}

/// Whether every webhook's bundle holds `cert_pem` (vacuously true without webhooks: then no
/// admission can fail).
fn all_published(webhooks: &[PublishedBundle], cert_pem: &str) -> bool {
    webhooks.iter().all(|webhook| {
        webhook.ca_bundle.as_deref().is_some_and(|b| bundle_contains(b, cert_pem.as_bytes()))
    })
}

/// Plans with a usable current CA: rotation phases, serving certificate, bundle, injection.
fn plan_managed<G: Generate + ?Sized>(
    observed: &Observed,
    secret: &StoredSecret,
    mut current: Ca,
    revoke_handled: Option<String>,
    config: &PlanConfig,
    now: OffsetDateTime,
    generator: &G,
) -> Result<Action, PlanError> {
    let mut reason = None;

    let has = |key| secret.data.contains_key(key);
    let mut next = None;
    if has(NEXT_CA_CERT_KEY) || has(NEXT_CA_KEY_KEY) {
        next = Ca::read(secret, NEXT_CA_CERT_KEY, NEXT_CA_KEY_KEY, now);
        if next.is_none() {
            // A broken or expired next CA is dropped; the rotation starts over.
            note(&mut reason, Reason::Repaired);
        }
    }
    let mut previous = None;
    if let Some(pem) = secret.text(PREVIOUS_CA_CERT_KEY) {
        previous = CertInfo::from_pem(pem)
            .ok()
            .filter(|info| info.is_ca && now < info.not_after)
            .map(|info| PreviousCa { cert_pem: pem.to_owned(), info });
    }
    if has(PREVIOUS_CA_CERT_KEY) && previous.is_none() {
        note(&mut reason, Reason::Repaired);
    }
    let stored_switch = secret.annotations.get(CA_SWITCHED_AT_ANNOTATION);
    let mut switched_at = stored_switch.and_then(|text| parse_time(text));
    match (&previous, switched_at) {
        (Some(_), None) => {
            // Unknown switch time: the overlap starts now, erring on the side of trust.
            switched_at = Some(now);
            note(&mut reason, Reason::Repaired);
        }
        (None, _) if stored_switch.is_some() => {
            switched_at = None;
            note(&mut reason, Reason::Repaired);
        }
        _ => {}
    }

    // (c) The overlap is over: the old CA leaves the bundle.
    if previous.is_some() && switched_at.is_some_and(|at| now >= at + config.ca_overlap) {
        previous = None;
        switched_at = None;
        note(&mut reason, Reason::OldCaDropped);
    }

    // (b) Every webhook trusts the next CA: note when that was first seen; once every
    // apiserver has had time to load it, the next CA takes over and issues the serving
    // certificate.
    let stored_published = secret.annotations.get(NEXT_CA_PUBLISHED_AT_ANNOTATION);
    let mut published_at = stored_published.and_then(|text| parse_time(text));
    if next.is_none() && stored_published.is_some() {
        published_at = None;
        note(&mut reason, Reason::Repaired);
    }
    let mut reissue = false;
    if let Some(candidate) = &next {
        let everywhere = all_published(&observed.webhooks, &candidate.material.cert_pem);
        match (everywhere, published_at) {
            (true, None) => {
                published_at = Some(now);
                note(&mut reason, Reason::CaPublished);
            }
            (false, Some(_)) => {
                // Someone reset a webhook: the wait starts over once it is re-published.
                published_at = None;
                note(&mut reason, Reason::Repaired);
            }
            (true, Some(at)) if previous.is_none() && now >= at + config.ca_overlap => {
                if let Some(ready) = next.take() {
                    let old = std::mem::replace(&mut current, ready);
                    previous = Some(PreviousCa { cert_pem: old.material.cert_pem, info: old.info });
                    switched_at = Some(now);
                    published_at = None;
                    reissue = true;
                    note(&mut reason, Reason::CaSwitched);
                }
            }
            _ => {}
        }
    }

    // (a) The CA nears its end: a next CA joins the bundle, issuing nothing yet.
    if next.is_none()
        && previous.is_none()
        && current.info.remaining(now) <= config.ca_rotate_before
    {
        let material = new_ca(config, now, generator)?;
        let info = CertInfo::from_pem(&material.cert_pem)
            .map_err(|source| PlanError::Generate { what: "CA", source })?;
        next = Some(Ca { material, info });
        note(&mut reason, Reason::CaRotationStarted);
    }

    let stored_serving = read_serving(secret);
    let serving_problem = match &stored_serving {
        _ if reissue => None,
        None => Some(Reason::Repaired),
        Some((_, info)) => serving_problem(info, &current, config, now),
    };
    let (serving, serving_info) = match stored_serving {
        Some(stored) if !reissue && serving_problem.is_none() => stored,
        _ => {
            if let Some(problem) = serving_problem {
                note(&mut reason, problem);
            }
            let serving = issue(&current.material, config, now, generator)?;
            let info = CertInfo::from_pem(&serving.cert_pem)
                .map_err(|source| PlanError::Generate { what: "serving certificate", source })?;
            (serving, info)
        }
    };

    let contents = SecretContents {
        ca: current.material,
        serving,
        next_ca: next.as_ref().map(|n| n.material.clone()),
        next_ca_published_at: published_at,
        previous_ca_cert: previous.as_ref().map(|p| p.cert_pem.clone()),
        ca_switched_at: switched_at,
        revoke_handled,
    };
    let bundle = contents.bundle();
    if secret.text(CA_BUNDLE_KEY) != Some(bundle.as_str()) {
        note(&mut reason, Reason::Repaired);
    }
    if let Some(reason) = reason {
        return Ok(Action::Write { contents: Box::new(contents), reason });
    }

    if config.inject_ca_bundle && !observed.webhooks.iter().all(|w| w.is(&bundle)) {
        return Ok(Action::Inject { bundle });
    }

    let ca_end = current.info.not_after;
    let mut due = vec![ca_end];
    if serving_info.not_after < ca_end {
        due.push(serving_info.not_after - config.serving_renew_before);
    }
    if next.is_none() && previous.is_none() {
        due.push(ca_end - config.ca_rotate_before);
    }
    if let Some(next) = &next {
        due.push(next.info.not_after);
    }
    if let Some(previous) = &previous {
        due.push(previous.info.not_after);
    }
    if let Some(at) = switched_at {
        due.push(at + config.ca_overlap);
    }
    if let Some(at) = published_at {
        due.push(at + config.ca_overlap);
    }
    Ok(Action::Wait { until: due.into_iter().filter(|t| *t > now).min() })
}

/// The serving certificate and key, if present, matching and parseable.
fn read_serving(secret: &StoredSecret) -> Option<(ServingCert, CertInfo)> {
    let cert_pem = secret.text(TLS_CERT_KEY)?;
    let key_pem = secret.text(TLS_KEY_KEY)?;
    load_certified_key(cert_pem.as_bytes(), key_pem.as_bytes()).ok()?;
    let info = CertInfo::from_pem(cert_pem).ok()?;
    Some((ServingCert { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() }, info))
}

/// What, if anything, requires re-issuing a loadable serving certificate.
fn serving_problem(
    info: &CertInfo,
    ca: &Ca,
    config: &PlanConfig,
    now: OffsetDateTime,
) -> Option<Reason> {
    let mut have = info.dns_names.clone();
    have.sort();
    let mut want = config.dns_names.clone();
    want.sort();
    let mut have_ips = info.ip_addresses.clone();
    have_ips.sort();
    let mut want_ips = config.ip_addresses.clone();
    want_ips.sort();
    if have != want || have_ips != want_ips {
        return Some(Reason::Repaired);
    }
    if !info.verifies_with(&ca.material.cert_pem).unwrap_or(false) {
        return Some(Reason::Repaired);
    }
    // A certificate that already ends with its CA cannot get longer: renewing it would loop.
    let due = info.remaining(now) <= config.serving_renew_before;
    (due && info.not_after < ca.info.not_after).then_some(Reason::Renewed)
}

/// RFC 3339 in UTC, whole seconds (as annotations and CA names carry it).
pub(crate) fn format_time(t: OffsetDateTime) -> String {
    Timestamp::from_second(t.unix_timestamp())
        .map_or_else(|_| t.unix_timestamp().to_string(), |ts| ts.to_string())
}

/// Parses [`format_time`]'s output (any RFC 3339 time).
fn parse_time(text: &str) -> Option<OffsetDateTime> {
    let ts: Timestamp = text.trim().parse().ok()?;
    OffsetDateTime::from_unix_timestamp(ts.as_second()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::RcgenGenerator;

    /// 2026-01-01T00:00:00Z.
    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
    }

    fn config() -> PlanConfig {
        PlanConfig::for_service("arcguard", "arcguard-system")
    }

    fn info(pem: &str) -> CertInfo {
        CertInfo::from_pem(pem).expect("parses")
    }

    fn certs_in(bundle: &[u8]) -> Vec<Vec<u8>> {
        bundle_certificates(bundle).expect("bundle parses").iter().map(|c| c.to_vec()).collect()
    }

    /// The Secret and webhooks as the apiserver would hold them, and a clock.
    struct World {
        config: PlanConfig,
        now: OffsetDateTime,
        secret: Option<StoredSecret>,
        webhooks: Vec<PublishedBundle>,
    }

    impl World {
        fn new(config: PlanConfig) -> Self {
            let webhook = |configuration: &str, webhook: &str| PublishedBundle {
                configuration: configuration.to_owned(),
                webhook: webhook.to_owned(),
                ca_bundle: None,
            };
            Self {
                config,
                now: t0(),
                secret: None,
                webhooks: vec![
                    webhook("ValidatingWebhookConfiguration/arcguard", "validate.arcguard.io"),
                    webhook("ValidatingWebhookConfiguration/arcguard", "policies.arcguard.io"),
                    webhook("MutatingWebhookConfiguration/arcguard", "mutate.arcguard.io"),
                ],
            }
        }

        /// A world that has been created and published at `t0`.
        fn settled(config: PlanConfig) -> Self {
            let mut world = Self::new(config);
            let reasons = world.settle();
            assert_eq!(reasons, [Reason::Created]);
            world
        }

        fn observed(&self) -> Observed {
            Observed { secret: self.secret.clone(), webhooks: self.webhooks.clone() }
        }

        fn plan(&self) -> Action {
            plan(&self.observed(), &self.config, self.now, &RcgenGenerator).expect("plans")
        }

        fn apply(&mut self, action: &Action) {
            match action {
                Action::Write { contents, .. } => {
                    self.secret.get_or_insert_default().apply(contents);
                }
                Action::Inject { bundle } => {
                    for webhook in &mut self.webhooks {
                        webhook.ca_bundle = Some(bundle.as_bytes().to_vec());
                    }
                }
                Action::Wait { .. } => {}
            }
        }

        /// Plans and applies until the planner waits; the reasons written, in order.
        fn settle(&mut self) -> Vec<Reason> {
            let mut reasons = Vec::new();
            for _ in 0..8 {
                let action = self.plan();
                if let Action::Write { reason, .. } = &action {
                    reasons.push(*reason);
                }
                if matches!(action, Action::Wait { .. }) {
                    return reasons;
                }
                self.apply(&action);
            }
            panic!("the planner did not settle: {reasons:?}");
        }

        fn secret(&self) -> &StoredSecret {
            self.secret.as_ref().expect("secret exists")
        }

        fn secret_mut(&mut self) -> &mut StoredSecret {
            self.secret.as_mut().expect("secret exists")
        }

        fn text(&self, key: &str) -> String {
            self.secret().text(key).expect("key present").to_owned()
        }

        fn annotate(&mut self, key: &str, value: &str) {
            self.secret_mut().annotations.insert(key.to_owned(), value.to_owned());
        }

        fn put(&mut self, key: &str, value: &str) {
            self.secret_mut().data.insert(key.to_owned(), value.as_bytes().to_vec());
        }
    }

    fn write(action: Action) -> (SecretContents, Reason) {
        match action {
            Action::Write { contents, reason } => (*contents, reason),
            other => panic!("expected a write, got {other:?}"),
        }
    }

    fn other_ca(now: OffsetDateTime) -> CaMaterial {
        RcgenGenerator.ca(Duration::days(1000), now).expect("generates")
    }

    // --- creation ---

    #[test]
    fn an_absent_secret_gets_a_ca_and_a_serving_certificate_for_the_four_service_names() {
        let world = World::new(config());
        let (contents, reason) = write(world.plan());
        assert_eq!(reason, Reason::Created);
        let ca = info(&contents.ca.cert_pem);
        assert!(ca.is_ca);
        assert!(ca.subject.starts_with("CN=arcguard webhook CA 2026-01-01T00:00:00Z"), "{ca:?}");
        assert_eq!(ca.not_after, t0() + DEFAULT_CA_VALIDITY);
        let serving = info(&contents.serving.cert_pem);
        assert_eq!(
            serving.dns_names,
            [
                "arcguard",
                "arcguard.arcguard-system",
                "arcguard.arcguard-system.svc",
                "arcguard.arcguard-system.svc.cluster.local"
            ]
        );
        assert_eq!(serving.not_after, t0() + DEFAULT_SERVING_VALIDITY);
        assert!(serving.verifies_with(&contents.ca.cert_pem).expect("checks"));
        assert!(contents.ca.key_pem.contains("PRIVATE KEY"));
        assert_eq!(
            certs_in(contents.bundle().as_bytes()),
            certs_in(contents.ca.cert_pem.as_bytes())
        );
        assert_eq!(
            (contents.next_ca, contents.previous_ca_cert, contents.ca_switched_at),
            (None, None, None)
        );
    }

    #[test]
    fn after_creation_the_bundle_is_injected_and_the_planner_waits_for_the_serving_renewal() {
        let mut world = World::new(config());
        world.apply(&world.plan());
        let bundle = world.text(CA_BUNDLE_KEY);
        assert_eq!(world.plan(), Action::Inject { bundle: bundle.clone() });
        world.apply(&world.plan());
        assert!(world.webhooks.iter().all(|w| w.is(&bundle)));
        let renew_at = t0() + DEFAULT_SERVING_VALIDITY - DEFAULT_SERVING_RENEW_BEFORE;
        assert_eq!(world.plan(), Action::Wait { until: Some(renew_at) });
    }

    #[test]
    fn a_secret_without_a_usable_current_ca_is_provisioned_afresh() {
        type Breakage = fn(&mut World);
        let cases: [(&str, Breakage, Reason); 6] = [
            ("empty secret", |w| w.secret_mut().data.clear(), Reason::Created),
            ("garbage ca.crt", |w| w.put(CA_CERT_KEY, "garbage"), Reason::Repaired),
            ("missing ca.key", |w| drop(w.secret_mut().data.remove(CA_KEY_KEY)), Reason::Repaired),
            (
                "ca.key of another CA",
                |w| w.put(CA_KEY_KEY, &other_ca(t0()).key_pem),
                Reason::Repaired,
            ),
            (
                "serving certificate given as the CA",
                |w| {
                    let (cert, key) = (w.text(TLS_CERT_KEY), w.text(TLS_KEY_KEY));
                    w.put(CA_CERT_KEY, &cert);
                    w.put(CA_KEY_KEY, &key);
                },
                Reason::Repaired,
            ),
            ("expired CA", |w| w.now = t0() + DEFAULT_CA_VALIDITY, Reason::Repaired),
        ];
        for (label, break_it, expected) in cases {
            let mut world = World::settled(config());
            world.annotate(REVOKE_ANNOTATION, "r1");
            world.annotate(REVOKE_HANDLED_ANNOTATION, "r1");
            let old_ca = world.text(CA_CERT_KEY);
            break_it(&mut world);
            let (contents, reason) = write(world.plan());
            assert_eq!(reason, expected, "{label}");
            assert_ne!(contents.ca.cert_pem, old_ca, "{label}");
            assert_eq!(
                contents.bundle(),
                format!("{}\n", contents.ca.cert_pem.trim_end()),
                "{label}"
            );
            assert!(
                info(&contents.serving.cert_pem)
                    .verifies_with(&contents.ca.cert_pem)
                    .expect("checks"),
                "{label}"
            );
            assert_eq!(contents.revoke_handled.as_deref(), Some("r1"), "{label}: handled kept");
        }
    }

    // --- serving certificate ---

    #[test]
    fn serving_certificate_problems_are_fixed_by_the_current_ca_alone() {
        type Breakage = fn(&mut World);
        let cases: [(&str, Breakage, Reason); 8] = [
            (
                "missing tls.key",
                |w| drop(w.secret_mut().data.remove(TLS_KEY_KEY)),
                Reason::Repaired,
            ),
            ("garbage tls.crt", |w| w.put(TLS_CERT_KEY, "garbage"), Reason::Repaired),
            (
                "key of another certificate",
                |w| {
                    let other = RcgenGenerator
                        .serving(&other_ca(t0()), &w.config.dns_names, &[], Duration::days(9), t0())
                        .expect("issues");
                    w.put(TLS_KEY_KEY, &other.key_pem);
                },
                Reason::Repaired,
            ),
            (
                "issued by another CA",
                |w| {
                    let other = RcgenGenerator
                        .serving(&other_ca(t0()), &w.config.dns_names, &[], Duration::days(9), t0())
                        .expect("issues");
                    w.put(TLS_CERT_KEY, &other.cert_pem);
                    w.put(TLS_KEY_KEY, &other.key_pem);
                },
                Reason::Repaired,
            ),
            (
                "the service was renamed",
                |w| w.config.dns_names = service_dns_names("guard", "arcguard-system"),
                Reason::Repaired,
            ),
            (
                "an IP address was added (a webhook reached by URL)",
                |w| w.config.ip_addresses = vec![IpAddr::from([127, 0, 0, 1])],
                Reason::Repaired,
            ),
            (
                "renewal window reached",
                |w| w.now = t0() + DEFAULT_SERVING_VALIDITY - DEFAULT_SERVING_RENEW_BEFORE,
                Reason::Renewed,
            ),
            ("expired", |w| w.now = t0() + DEFAULT_SERVING_VALIDITY, Reason::Renewed),
        ];
        for (label, break_it, expected) in cases {
            let mut world = World::settled(config());
            let (ca, bundle) = (world.text(CA_CERT_KEY), world.text(CA_BUNDLE_KEY));
            break_it(&mut world);
            let (contents, reason) = write(world.plan());
            assert_eq!(reason, expected, "{label}");
            assert_eq!(contents.ca.cert_pem, ca, "{label}: same CA");
            assert_eq!(contents.bundle(), bundle, "{label}: same bundle");
            let serving = info(&contents.serving.cert_pem);
            assert!(serving.verifies_with(&ca).expect("checks"), "{label}");
            assert_eq!(serving.dns_names, world.config.dns_names, "{label}");
            assert_eq!(serving.ip_addresses, world.config.ip_addresses, "{label}");
            assert_eq!(serving.not_after, world.now + DEFAULT_SERVING_VALIDITY, "{label}");
            world.apply(&Action::Write { contents: Box::new(contents), reason });
            assert_eq!(world.settle(), [], "{label}: settled after one write");
        }
    }

    #[test]
    fn a_serving_certificate_cut_short_by_its_ca_is_renewed_once_not_in_a_loop() {
        let mut config = config();
        config.ca_validity = Duration::days(100);
        config.ca_rotate_before = Duration::days(10);
        let mut world = World::settled(config);
        world.now = t0() + Duration::days(60);
        assert_eq!(world.settle(), [Reason::Renewed]);
        let serving = info(&world.text(TLS_CERT_KEY));
        assert_eq!(serving.not_after, t0() + Duration::days(100), "cut short at the CA's end");
        world.now = t0() + Duration::days(75);
        assert_eq!(world.plan(), Action::Wait { until: Some(t0() + Duration::days(90)) });
    }

    // --- CA rotation ---

    /// The zero-failure property: every certificate a replica may still serve is trusted by
    /// every webhook.
    fn assert_trusted(world: &World, serving_pem: &str, what: &str) {
        let serving = info(serving_pem);
        for webhook in &world.webhooks {
            let bundle = webhook.ca_bundle.as_deref().unwrap_or_default();
            assert!(
                serving.is_issued_by_any(bundle),
                "at {}: {what} ({}) is not trusted by {}",
                world.now,
                serving.issuer,
                webhook.webhook
            );
        }
    }

    #[test]
    fn a_full_ca_rotation_keeps_every_served_certificate_trusted_and_drops_the_old_ca_after_the_overlap()
     {
        let mut world = World::settled(config());
        let first_ca = world.text(CA_CERT_KEY);
        let mut reasons = Vec::new();
        // A replaced serving certificate may be served until every replica's watch swaps it.
        let mut retiring: Option<(String, OffsetDateTime)> = None;
        let (mut published_at, mut switched_at) = (None, None);
        for _ in 0..200 {
            let action = world.plan();
            match &action {
                Action::Write { contents, reason } => {
                    reasons.push(*reason);
                    // Issued only by a CA every webhook already trusts.
                    assert_trusted(&world, &contents.serving.cert_pem, "the new serving cert");
                    let old_bundle = certs_in(world.text(CA_BUNDLE_KEY).as_bytes());
                    let new_bundle = certs_in(contents.bundle().as_bytes());
                    if old_bundle.iter().any(|ca| !new_bundle.contains(ca)) {
                        assert_eq!(*reason, Reason::OldCaDropped);
                        let since = world.now - switched_at.expect("switched before");
                        assert!(
                            since >= DEFAULT_CA_OVERLAP,
                            "old CA dropped {since} after the switch"
                        );
                    }
                    match reason {
                        Reason::CaPublished => {
                            let next = contents.next_ca.as_ref().expect("a next CA");
                            assert!(all_published(&world.webhooks, &next.cert_pem));
                            published_at = Some(world.now);
                        }
                        Reason::CaSwitched => {
                            let since = world.now - published_at.expect("published before");
                            assert!(
                                since >= DEFAULT_CA_OVERLAP,
                                "switched {since} after publishing"
                            );
                            switched_at = Some(world.now);
                        }
                        _ => {}
                    }
                    if contents.serving.cert_pem != world.text(TLS_CERT_KEY) {
                        retiring = Some((world.text(TLS_CERT_KEY), world.now));
                    }
                }
                Action::Inject { .. } => {}
                Action::Wait { until } => {
                    if reasons.last() == Some(&Reason::OldCaDropped) {
                        break;
                    }
                    let until = until.expect("something is always due");
                    let overlap_ends =
                        [published_at, switched_at].map(|at| at.map(|at| at + DEFAULT_CA_OVERLAP));
                    if overlap_ends.contains(&Some(until)) {
                        // A second before the wait ends, nothing happens yet.
                        world.now = until - Duration::SECOND;
                        assert_eq!(world.plan(), Action::Wait { until: Some(until) });
                    }
                    world.now = until;
                }
            }
            world.apply(&action);
            assert_trusted(&world, &world.text(TLS_CERT_KEY), "the stored serving cert");
            if let Some((pem, since)) = &retiring
                && world.now < *since + DEFAULT_CA_OVERLAP
            {
                assert_trusted(&world, pem, "the replaced serving cert");
            }
        }

        let rotation: Vec<Reason> =
            reasons.iter().copied().filter(|r| *r != Reason::Renewed).collect();
        assert_eq!(
            rotation,
            [
                Reason::CaRotationStarted,
                Reason::CaPublished,
                Reason::CaSwitched,
                Reason::OldCaDropped
            ]
        );
        let renewals = reasons.iter().filter(|r| **r == Reason::Renewed).count();
        assert_eq!(renewals, 27, "every 60 days for 1646 days");
        let started = t0() + DEFAULT_CA_VALIDITY - DEFAULT_CA_ROTATE_BEFORE;
        assert_eq!(published_at, Some(started), "injected and seen at once");
        assert_eq!(switched_at, Some(started + DEFAULT_CA_OVERLAP));
        let new_ca = info(&world.text(CA_CERT_KEY));
        assert_ne!(world.text(CA_CERT_KEY), first_ca);
        assert_eq!(new_ca.not_after, started + DEFAULT_CA_VALIDITY);
        assert_eq!(world.text(CA_BUNDLE_KEY), format!("{}\n", world.text(CA_CERT_KEY).trim_end()));
        for key in [NEXT_CA_CERT_KEY, NEXT_CA_KEY_KEY, PREVIOUS_CA_CERT_KEY] {
            assert!(!world.secret().data.contains_key(key), "{key} left behind");
        }
        for key in [CA_SWITCHED_AT_ANNOTATION, NEXT_CA_PUBLISHED_AT_ANNOTATION] {
            assert!(!world.secret().annotations.contains_key(key), "{key} left behind");
        }
        assert!(world.webhooks.iter().all(|w| w.is(&world.text(CA_BUNDLE_KEY))));
    }

    /// A world whose rotation has started: the next CA is in the Secret's bundle only.
    fn rotation_started(config: PlanConfig) -> World {
        let mut world = World::settled(config);
        world.now = t0() + DEFAULT_CA_VALIDITY - DEFAULT_CA_ROTATE_BEFORE;
        let (contents, reason) = write(world.plan());
        assert_eq!(reason, Reason::CaRotationStarted);
        let old = world.text(CA_CERT_KEY);
        let next = contents.next_ca.clone().expect("next CA");
        assert_eq!(contents.ca.cert_pem, old, "the current CA still issues");
        // The serving cert expired long ago here: renewed in the same write, by the old CA.
        assert!(info(&contents.serving.cert_pem).verifies_with(&old).expect("checks"));
        assert_eq!(
            contents.bundle(),
            format!("{}\n{}\n", old.trim_end(), next.cert_pem.trim_end())
        );
        world.apply(&Action::Write { contents: Box::new(contents), reason });
        world
    }

    /// A world just after the switch: the previous CA is in the bundle for the overlap.
    fn switched(config: PlanConfig) -> World {
        let mut world = rotation_started(config);
        assert_eq!(world.settle(), [Reason::CaPublished]);
        world.now += DEFAULT_CA_OVERLAP;
        assert_eq!(world.settle(), [Reason::CaSwitched]);
        assert!(world.secret().data.contains_key(PREVIOUS_CA_CERT_KEY));
        world
    }

    #[test]
    fn the_switch_waits_until_every_webhook_has_carried_the_next_ca_for_the_overlap() {
        let mut config = config();
        config.inject_ca_bundle = false;
        let mut world = rotation_started(config);
        let bundle = world.text(CA_BUNDLE_KEY);
        let next = world.text(NEXT_CA_CERT_KEY);
        assert!(matches!(world.plan(), Action::Wait { .. }), "nothing published yet");

        world.webhooks[0].ca_bundle = Some(bundle.clone().into_bytes());
        world.webhooks[1].ca_bundle = Some(bundle.clone().into_bytes());
        assert!(matches!(world.plan(), Action::Wait { .. }), "one webhook lags");

        // Containment counts, not equality: order and extra certificates do not matter.
        let extra = other_ca(world.now).cert_pem;
        let lagging = Some(format!("{extra}{next}{}", world.text(CA_CERT_KEY)).into_bytes());
        world.webhooks[2].ca_bundle = lagging.clone();
        let (contents, reason) = write(world.plan());
        assert_eq!((reason, contents.next_ca_published_at), (Reason::CaPublished, Some(world.now)));
        assert_eq!(contents.ca.cert_pem, world.text(CA_CERT_KEY), "no switch yet");
        world.apply(&Action::Write { contents: Box::new(contents), reason });
        let switch_at = world.now + DEFAULT_CA_OVERLAP;
        assert_eq!(world.plan(), Action::Wait { until: Some(switch_at) });

        // A reset restarts the wait.
        world.webhooks[2].ca_bundle = None;
        assert_eq!(world.settle(), [Reason::Repaired]);
        assert!(!world.secret().annotations.contains_key(NEXT_CA_PUBLISHED_AT_ANNOTATION));
        world.webhooks[2].ca_bundle = lagging;
        world.now += Duration::minutes(1);
        assert_eq!(world.settle(), [Reason::CaPublished]);
        world.now = switch_at;
        assert!(matches!(world.plan(), Action::Wait { .. }), "the wait started over");

        world.now += Duration::minutes(1);
        let (contents, reason) = write(world.plan());
        assert_eq!(reason, Reason::CaSwitched);
        assert_eq!(contents.ca.cert_pem, next);
        assert!(info(&contents.serving.cert_pem).verifies_with(&next).expect("checks"));
        assert_eq!(contents.bundle(), bundle, "same bundle, same order: nothing to re-inject");
        assert_eq!(contents.ca_switched_at, Some(world.now));
        assert_eq!(contents.next_ca_published_at, None);
    }

    #[test]
    fn without_webhooks_a_rotation_runs_on_the_clock_alone() {
        let mut world = rotation_started(config());
        world.webhooks.clear();
        assert_eq!(world.settle(), [Reason::CaPublished]);
        world.now += DEFAULT_CA_OVERLAP;
        assert_eq!(world.settle(), [Reason::CaSwitched]);
        world.now += DEFAULT_CA_OVERLAP;
        assert_eq!(world.settle(), [Reason::OldCaDropped]);
    }

    #[test]
    fn a_stalled_rotation_renews_from_the_old_ca_and_provisions_afresh_at_its_expiry() {
        let mut config = config();
        config.inject_ca_bundle = false;
        let mut world = rotation_started(config);
        let old_ca = world.text(CA_CERT_KEY);
        let mut reasons = Vec::new();
        for _ in 0..20 {
            let action = world.plan();
            match &action {
                Action::Write { reason, contents } => {
                    reasons.push(*reason);
                    if *reason == Reason::Renewed {
                        assert_eq!(
                            contents.ca.cert_pem, old_ca,
                            "the next CA never issues unpublished"
                        );
                    }
                }
                Action::Wait { until } => match until {
                    Some(until) if reasons.last() != Some(&Reason::Repaired) => world.now = *until,
                    _ => break,
                },
                Action::Inject { .. } => panic!("injection is off"),
            }
            world.apply(&action);
        }
        // 180 days left at the start: renewed at +60 and +120 days (then cut short at the CA's
        // end, so not again), and provisioned afresh when the CA expires at +180 days.
        assert_eq!(reasons, [Reason::Renewed, Reason::Renewed, Reason::Repaired]);
        assert_eq!(world.now, t0() + DEFAULT_CA_VALIDITY);
        assert_ne!(world.text(CA_CERT_KEY), old_ca);
    }

    #[test]
    fn a_broken_next_ca_is_dropped_and_the_rotation_starts_over() {
        let mut world = rotation_started(config());
        world.put(NEXT_CA_KEY_KEY, &other_ca(world.now).key_pem);
        let (contents, reason) = write(world.plan());
        assert_eq!(reason, Reason::CaRotationStarted);
        let next = contents.next_ca.expect("a new next CA");
        assert_ne!(next.cert_pem, world.text(NEXT_CA_CERT_KEY));

        let mut world = World::settled(config());
        world.put(NEXT_CA_CERT_KEY, "garbage");
        let (contents, reason) = write(world.plan());
        assert_eq!((reason, contents.next_ca), (Reason::Repaired, None), "not due: just dropped");
    }

    #[test]
    fn overlap_bookkeeping_is_repaired_on_the_side_of_trust() {
        // A previous CA without a switch time gets an overlap that starts now.
        let mut world = switched(config());
        world.secret_mut().annotations.remove(CA_SWITCHED_AT_ANNOTATION);
        world.now += Duration::hours(1);
        let (contents, reason) = write(world.plan());
        assert_eq!(reason, Reason::Repaired);
        assert_eq!(contents.ca_switched_at, Some(world.now));
        assert!(contents.previous_ca_cert.is_some(), "kept for the overlap");

        // A switch time without a previous CA is removed.
        let mut world = World::settled(config());
        world.annotate(CA_SWITCHED_AT_ANNOTATION, "2026-01-01T00:00:00Z");
        let (contents, reason) = write(world.plan());
        assert_eq!((reason, contents.ca_switched_at), (Reason::Repaired, None));
        world.apply(&Action::Write { contents: Box::new(contents), reason });
        assert!(!world.secret().annotations.contains_key(CA_SWITCHED_AT_ANNOTATION));

        // A publication time without a next CA is removed.
        let mut world = World::settled(config());
        world.annotate(NEXT_CA_PUBLISHED_AT_ANNOTATION, "2026-01-01T00:00:00Z");
        assert_eq!(world.settle(), [Reason::Repaired]);
        assert!(!world.secret().annotations.contains_key(NEXT_CA_PUBLISHED_AT_ANNOTATION));

        // A bundle edited by hand is rewritten.
        let mut world = World::settled(config());
        world.put(CA_BUNDLE_KEY, "");
        let (contents, reason) = write(world.plan());
        assert_eq!(reason, Reason::Repaired);
        assert_eq!(contents.bundle(), format!("{}\n", contents.ca.cert_pem.trim_end()));
    }

    // --- revocation ---

    #[test]
    fn a_revocation_replaces_ca_and_serving_certificate_at_once_even_mid_rotation() {
        let worlds = [
            ("settled", World::settled(config())),
            ("rotation started", rotation_started(config())),
            ("overlap after the switch", switched(config())),
        ];
        for (label, mut world) in worlds {
            let old: Vec<Vec<u8>> = certs_in(world.text(CA_BUNDLE_KEY).as_bytes());
            world.annotate(REVOKE_ANNOTATION, "2026-02-01T10:00:00Z");
            let (contents, reason) = write(world.plan());
            assert_eq!(reason, Reason::Revoked, "{label}");
            let bundle = certs_in(contents.bundle().as_bytes());
            assert_eq!(bundle, certs_in(contents.ca.cert_pem.as_bytes()), "{label}: new CA only");
            assert!(old.iter().all(|ca| !bundle.contains(ca)), "{label}: old CAs gone at once");
            assert_eq!(contents.revoke_handled.as_deref(), Some("2026-02-01T10:00:00Z"));
            assert_eq!((contents.next_ca, contents.previous_ca_cert), (None, None), "{label}");
            assert_eq!((contents.next_ca_published_at, contents.ca_switched_at), (None, None));
        }
    }

    #[test]
    fn a_revocation_request_is_acted_upon_once_per_value() {
        let mut world = World::settled(config());
        world.annotate(REVOKE_ANNOTATION, "1");
        assert_eq!(world.settle(), [Reason::Revoked]);
        assert_eq!(world.secret().annotations[REVOKE_HANDLED_ANNOTATION], "1");
        assert_eq!(world.settle(), [], "same value: handled");
        world.annotate(REVOKE_ANNOTATION, " ");
        assert_eq!(world.settle(), [], "a blank value requests nothing");
        world.annotate(REVOKE_ANNOTATION, "2");
        assert_eq!(world.settle(), [Reason::Revoked]);
    }

    // --- injection and waiting ---

    #[test]
    fn a_reset_webhook_gets_the_bundle_again_unless_injection_is_off() {
        type Reset = fn(&mut PublishedBundle);
        let resets: [(&str, Reset); 3] = [
            ("removed", |w| w.ca_bundle = None),
            ("emptied", |w| w.ca_bundle = Some(Vec::new())),
            ("another CA", |w| w.ca_bundle = Some(other_ca(t0()).cert_pem.into_bytes())),
        ];
        for (label, reset) in resets {
            let mut world = World::settled(config());
            reset(&mut world.webhooks[2]);
            assert_eq!(
                world.plan(),
                Action::Inject { bundle: world.text(CA_BUNDLE_KEY) },
                "{label}"
            );
            world.config.inject_ca_bundle = false;
            assert!(matches!(world.plan(), Action::Wait { .. }), "{label}");
        }
    }

    #[test]
    fn the_planner_waits_until_the_earliest_due_time() {
        let overlap_end = |w: &World| w.now + DEFAULT_CA_OVERLAP;
        let mut steady = World::settled(config());
        steady.now += Duration::days(1);
        let renew = t0() + DEFAULT_SERVING_VALIDITY - DEFAULT_SERVING_RENEW_BEFORE;
        assert_eq!(steady.plan(), Action::Wait { until: Some(renew) });

        let overlap = switched(config());
        assert_eq!(overlap.plan(), Action::Wait { until: Some(overlap_end(&overlap)) });

        let mut long_serving = config();
        long_serving.serving_validity = Duration::days(1000);
        long_serving.serving_renew_before = Duration::days(100);
        let world = World::settled(long_serving);
        let rotate = t0() + DEFAULT_CA_VALIDITY - DEFAULT_CA_ROTATE_BEFORE;
        assert_eq!(world.plan(), Action::Wait { until: Some(t0() + Duration::days(900)) });
        let mut world = world;
        world.now = t0() + Duration::days(900);
        assert_eq!(world.settle(), [Reason::Renewed]);
        assert_eq!(world.plan(), Action::Wait { until: Some(rotate) }, "rotation comes first");
    }

    // --- external certificates ---

    #[test]
    fn an_external_secret_is_never_written_and_only_its_ca_is_injected() {
        let mut config = config();
        config.external = true;
        let ca = other_ca(t0());
        let serving = RcgenGenerator
            .serving(&ca, &config.dns_names, &[], Duration::days(9), t0())
            .expect("issues");
        let cert_manager = StoredSecret {
            data: BTreeMap::from([
                (CA_CERT_KEY.to_owned(), ca.cert_pem.clone().into_bytes()),
                (TLS_CERT_KEY.to_owned(), serving.cert_pem.into_bytes()),
                (TLS_KEY_KEY.to_owned(), serving.key_pem.into_bytes()),
            ]),
            annotations: BTreeMap::from([(REVOKE_ANNOTATION.to_owned(), "1".to_owned())]),
        };
        let mut garbage = cert_manager.clone();
        garbage.data.insert(CA_CERT_KEY.to_owned(), b"garbage".to_vec());
        let mut expired = cert_manager.clone();
        expired.data.clear();
        let inject = Action::Inject { bundle: ca.cert_pem.clone() };
        let idle = Action::Wait { until: None };
        let cases: [(&str, Option<StoredSecret>, bool, bool, &Action); 6] = [
            ("absent", None, true, false, &idle),
            ("cert-manager secret", Some(cert_manager.clone()), true, false, &inject),
            ("already published", Some(cert_manager.clone()), true, true, &idle),
            ("injection off", Some(cert_manager), false, false, &idle),
            ("garbage ca.crt", Some(garbage), true, false, &idle),
            ("no ca.crt", Some(expired), true, false, &idle),
        ];
        for (label, secret, inject_on, published, expected) in cases {
            let mut world = World::new(config.clone());
            world.config.inject_ca_bundle = inject_on;
            world.secret = secret;
            if published {
                for webhook in &mut world.webhooks {
                    webhook.ca_bundle = Some(ca.cert_pem.clone().into_bytes());
                }
            }
            assert_eq!(&world.plan(), expected, "{label}");
        }
    }

    // --- the Secret ---

    #[test]
    fn writing_keeps_unmanaged_data_and_annotations() {
        let mut world = World::settled(config());
        world.put("extra", "kept");
        world.annotate("team", "platform");
        world.now = t0() + Duration::days(61);
        assert_eq!(world.settle(), [Reason::Renewed]);
        assert_eq!(world.text("extra"), "kept");
        assert_eq!(world.secret().annotations["team"], "platform");
    }

    #[test]
    fn switch_times_round_trip_through_the_annotation() {
        let at = t0() + Duration::seconds(3_723);
        assert_eq!(format_time(at), "2026-01-01T01:02:03Z");
        assert_eq!(parse_time(&format_time(at)), Some(at));
        assert_eq!(parse_time("2026-01-01T02:02:03+01:00"), Some(at));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn settings_are_validated_and_the_first_bad_one_is_named() {
        type Edit = fn(&mut PlanConfig);
        let cases: [(Edit, Option<&str>); 9] = [
            (|_| {}, None),
            (|c| c.dns_names.clear(), Some("dns_names")),
            (|c| c.dns_names = service_dns_names("Bad_Name!", "ns"), Some("dns_names")),
            (|c| c.ca_validity = Duration::ZERO, Some("ca_validity")),
            (|c| c.serving_validity = MAX_VALIDITY + Duration::DAY, Some("serving_validity")),
            (|c| c.serving_renew_before = c.serving_validity, Some("serving_renew_before")),
            (|c| c.serving_renew_before = Duration::ZERO, Some("serving_renew_before")),
            (|c| c.ca_rotate_before = Duration::days(5000), Some("ca_rotate_before")),
            (|c| c.ca_overlap = -Duration::SECOND, Some("ca_overlap")),
        ];
        for (edit, expected) in cases {
            let mut config = config();
            edit(&mut config);
            match (config.validate(), expected) {
                (Ok(()), None) => {}
                (Err(PlanError::InvalidConfig { setting, .. }), Some(want)) => {
                    assert_eq!(setting, want);
                }
                (result, want) => panic!("expected {want:?}, got {result:?}"),
            }
        }
    }

    #[test]
    fn reasons_have_their_metric_labels_and_precedence() {
        let labels: Vec<&str> = [
            Reason::Repaired,
            Reason::Renewed,
            Reason::CaRotationStarted,
            Reason::CaPublished,
            Reason::OldCaDropped,
            Reason::CaSwitched,
            Reason::Created,
            Reason::Revoked,
        ]
        .iter()
        .map(|r| r.as_str())
        .collect();
        assert_eq!(
            labels,
            [
                "repaired",
                "renewed",
                "ca-rotation-started",
                "ca-published",
                "old-ca-dropped",
                "ca-switched",
                "created",
                "revoked"
            ]
        );
        let mut reason = None;
        for r in [Reason::Repaired, Reason::CaSwitched, Reason::Renewed] {
            note(&mut reason, r);
        }
        assert_eq!(reason, Some(Reason::CaSwitched));
    }

    #[test]
    fn debug_output_never_contains_private_keys() {
        let (contents, _) = write(World::new(config()).plan());
        let debug = format!("{contents:?}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    }
}
