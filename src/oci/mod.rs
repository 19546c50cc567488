//! Reading images from OCI registries for imageProvenance: the adapter that gathers an
//! [`ImageFact`] for every image a request's policies ask about, through the OCI distribution
//! API (`oci-client`), within a deadline, from a bounded cache when it can.
//!
//! - **Transport**: HTTPS verified against the system roots plus the configured CA
//!   certificates; plain HTTP only for registries named for it (development).
//! - **Deadline**: each image is read within [`RegistryConfig::deadline`] (default 3 s, below
//!   the webhooks' `timeoutSeconds: 5`), all images of a request side by side. A read that
//!   misses it goes on in the background (up to [`READ_CAP`]) and fills the cache for the
//!   apiserver's retry; the request is answered at once with "could not be read".
//! - **Cache**: what a digest resolves to never changes, so a fact read by digest is kept
//!   [`DIGEST_TTL`]; a tag moves, so a fact read by tag is kept [`TAG_TTL`] (and seeds the
//!   digest's entry, which the validating webhook reads after the mutating one pinned it); a
//!   refusal is kept [`REFUSED_TTL`]; a registry that could not be read is not cached. At
//!   most [`CACHE_BYTES`] per cache, the least reused answers evicted first (S3-FIFO, so a
//!   flood of new images does not push out the ones reused, [`cache`]). Concurrent requests
//!   for one image share one read.
//! - **Access**: anonymous, or with the credential the kubelet would pick from the pod's
//!   imagePullSecrets; tokens and cached facts are kept per credential, so none answers for
//!   another credential.
//!
//! What the registry serves is checked against its digest (the body must hash to the
//! `Docker-Content-Digest` header and to a digest in the reference, [`fetch`]); the config
//! blob against its descriptor. Every request, the token handshake included, is made by
//! [`fetch`], each answer read to a cap; oci-client gives the reference grammar.

pub mod cache;
pub mod fetch;
mod json;
pub mod manifest;
pub mod signatures;
pub mod slots;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt as _};
use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use self::cache::{Flights, TtlCache};
use self::slots::{NoSlot, ReadSlots};
use crate::memory::MemoryPool;
use crate::metrics::Metrics;
use crate::pull_secrets::{self as credentials, RegistryCredential};
use crate::rules::provenance::{ImageFact, RegistryFacts, RegistryImage};
use crate::server::ImageSource;
use crate::signature::{self, SignatureVerdict, TrustId, TrustRef};

/// The identity of anonymous pulls in cache keys.
const ANONYMOUS: &str = "anonymous";

/// Default time one image may take to read.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3);
/// How long a read that missed its request's deadline may go on to fill the cache.
pub const READ_CAP: Duration = Duration::from_secs(30);
/// How long a fact read by digest is reused.
pub const DIGEST_TTL: Duration = Duration::from_secs(600);
/// How long a fact read by tag is reused: a tag moved in the registry is seen within this.
pub const TAG_TTL: Duration = Duration::from_secs(30);
/// How long a refusal (no such image, access denied) is reused.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);
/// About how many facts (or verdicts) a cache holds: its sizing hint, the bound is
/// [`CACHE_BYTES`].
pub const CACHE_LIMIT: usize = 10_000;
/// Bytes each cache (facts, verdicts) holds at most, as [`fact_weight`] and [`verdict_weight`]
/// estimate them; the least reused are evicted beyond (a fact is a few hundred bytes: tens of
/// thousands fit). The adapter's memory is bounded by these two, the fetcher's tokens
/// ([`fetch`], 2 MiB), and [`slots::MAX_READS`] reads each holding one manifest, config, token
/// answer or the signatures' payloads at a time (at most about 1.5 MiB each): about 35 MiB at
/// worst.
pub const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// The heaviest fact cached, in bytes: a sixty-fourth of [`CACHE_BYTES`]. An image with dozens
/// of platforms (Windows images list one per build) weighs a few KiB; one of 256 platforms
/// with 128-byte fields weighs 155 KiB, and 13 of them filled the cache.
pub const FACT_CACHED_MAX: usize = CACHE_BYTES / 64;

/// How registries are reached.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// PEM CA certificates trusted besides the system roots (a private registry's CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Registries (`host[:port]`) read over plain HTTP instead of HTTPS: development only.
    pub plain_http: Vec<String>,
    /// Time one image may take to read.
    pub deadline: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self { ca_pem: None, plain_http: Vec::new(), deadline: DEFAULT_DEADLINE }
    }
}

/// Why registry access cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The CA file holds no PEM certificate, or one that does not parse.
    #[error("the registry CA bundle holds no valid PEM certificate: {0}")]
    Ca(String),
    /// The HTTP client cannot be built.
    #[error("the registry HTTP client cannot be built: {0}")]
    Http(String),
}

/// Distinct images read for one request, at most; more are refused by name. A pod rarely
/// runs more than a handful, and each read holds a manifest in memory.
pub const MAX_IMAGES_PER_REQUEST: usize = 64;

/// Who pulls an image: the credential (or anonymous), and an identity for cache keys.
#[derive(Clone)]
pub(crate) struct Access {
    pub(crate) auth: RegistryAuth,
    /// `anonymous`, or the credential's [`RegistryCredential::identity`].
    pub(crate) identity: Arc<str>,
    /// The namespace whose request reads: what is kept for it is charged to it.
    pub(crate) owner: Arc<str>,
}

/// Registry access with its caches; one per process.
pub struct Registries {
    /// The identity of anonymous pulls, the common case, shared.
    anonymous: Arc<str>,
    deadline: Duration,
    images: TtlCache<String, ImageFact>,
    image_reads: Arc<Flights<String, ImageFact>>,
    verdicts: TtlCache<(String, TrustId), SignatureVerdict>,
    verdict_reads: Arc<Flights<(String, TrustId), SignatureVerdict>>,
    slots: ReadSlots,
    fetcher: fetch::Fetcher,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

impl Registries {
    /// Registry access as configured, each read charged to `memory` (the pool webhook requests
    /// use: [`crate::server::AppState::with_memory`]), counting its lookups and reads in
    /// `metrics`.
    ///
    /// # Errors
    /// [`RegistryError`] for a CA bundle without certificates, or a client that cannot be built.
    pub fn new(
        config: &RegistryConfig,
        memory: MemoryPool,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RegistryError> {
        // reqwest takes the process's default rustls provider and panics without one; ring is
        // the only provider compiled in (an error means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        if memory.total_bytes() < slots::MIN_POOL_BYTES {
            tracing::warn!(
                budget_kib = memory.total_bytes() / 1024,
                read_kib = slots::READ_BYTES / 1024,
                "the memory budget cannot hold a registry read beside the webhook request that needs it: imageProvenance will find every image unchecked; raise --memory-limit to 12 MiB or more"
            );
        }
        // A configuration that cannot make a client fails at start, not on a request.
        let fetcher = fetch::Fetcher::new(
            http_client(config, true)?,
            http_client(config, false)?,
            config.plain_http.clone(),
        );
        Ok(Arc::new(Self {
            anonymous: Arc::from(ANONYMOUS),
            deadline: config.deadline,
            images: TtlCache::weighed(CACHE_LIMIT, CACHE_BYTES, fact_weight)
                .with_entry_limit(FACT_CACHED_MAX),
            image_reads: Arc::new(Flights::new(READ_CAP)),
            verdicts: TtlCache::weighed(CACHE_LIMIT, CACHE_BYTES, verdict_weight),
            verdict_reads: Arc::new(Flights::new(READ_CAP)),
            slots: ReadSlots::new(memory),
            fetcher,
            metrics,
        }))
    }

    /// The facts for `keys` ([`crate::rules::provenance::lookup_key`]s), read side by side,
    /// and the verdicts on their signatures under the trusts in `signatures`, all by the
    /// deadline counted from `arrived` (when the request arrived: the cluster lookups before
    /// this one do not add to it). An image read by tag is also
    /// answered under the digest it resolved to, the key its pinned form is read by.
    ///
    /// Reads not answered by the cache run in [`slots`]: `namespace` (the object's; `""` for
    /// none) names whose share they take.
    pub async fn lookup(
        self: &Arc<Self>,
        keys: &BTreeSet<String>,
        signatures: &BTreeSet<(String, TrustRef)>,
        credentials: &[RegistryCredential],
        namespace: &str,
        arrived: Instant,
    ) -> RegistryFacts {
        if let Some(cached) = self.cached(keys, signatures, credentials) {
            for (_, fact, verdicts) in &cached {
                self.metrics.record_registry_lookup("image", "cache", fact_result(fact));
                for (_, verdict) in verdicts {
                    self.metrics.record_registry_lookup(
                        "signatures",
                        "cache",
                        verdict_result(verdict),
                    );
                }
            }
            return assemble(cached);
        }
        // Every read of this request, signatures included, ends `deadline` after the request
        // arrived, whatever the cluster lookups before took.
        let until = tokio::time::Instant::from_std(arrived) + self.deadline;
        let owner: Arc<str> = Arc::from(namespace);
        let owner = &owner;
        let read = futures::future::join_all(keys.iter().enumerate().map(|(i, key)| async move {
            if i >= MAX_IMAGES_PER_REQUEST {
                let refused = ImageFact::Unread(format!(
                    "arcguard reads at most {MAX_IMAGES_PER_REQUEST} distinct images in scope for one pod, and this pod names more; use fewer distinct images"
                ));
                return (key.clone(), refused, Vec::new());
            }
            let pull = self.pull(key, credentials, owner);
            let fact = self.fact(&pull, key, namespace, until).await;
            let mut verdicts = Vec::new();
            if let ImageFact::Found(image) = &fact {
                let trusts = signatures.iter().filter(|(k, _)| k == key).map(|(_, t)| t);
                for trust in trusts {
                    let verdict = self.verdict(&pull, key, image, trust, namespace, until).await;
                    verdicts.push(((key.clone(), trust.0.id()), verdict));
                }
            }
            (key.clone(), fact, verdicts)
        }))
        .await;
        assemble(read)
    }

    /// What [`Self::lookup`] reads when every fact and verdict it asks for is cached (the
    /// common case, answered without a future per image); `None` when one is not.
    fn cached(
        &self,
        keys: &BTreeSet<String>,
        signatures: &BTreeSet<(String, TrustRef)>,
        credentials: &[RegistryCredential],
    ) -> Option<Vec<Read>> {
        if keys.len() > MAX_IMAGES_PER_REQUEST {
            return None;
        }
        keys.iter()
            .map(|key| {
                // Who reads does not matter for a cached answer.
                let pull = self.pull(key, credentials, &self.anonymous);
                let fact = self.images.get(&image_cache_key(&pull.identity, key))?;
                let mut verdicts = Vec::new();
                if let ImageFact::Found(image) = &fact {
                    for (_, trust) in signatures.iter().filter(|(k, _)| k == key) {
                        let cache_key = verdict_cache_key(&pull.identity, key, image, trust);
                        let verdict = self.verdicts.get(&cache_key)?;
                        verdicts.push(((key.clone(), cache_key.1), verdict));
                    }
                }
                Some((key.clone(), fact, verdicts))
            })
            .collect()
    }

    /// How `key` is pulled: with the credential of `credentials` the kubelet would pick for
    /// its registry and repository, else anonymously.
    fn pull(&self, key: &str, credentials: &[RegistryCredential], owner: &Arc<str>) -> Access {
        let owner = Arc::clone(owner);
        let (registry, rest) = key.split_once('/').unwrap_or((key, ""));
        let repository = split_tag(key)
            .map(|(name, _)| name)
            .or_else(|| key.split_once('@').map(|(name, _)| name))
            .and_then(|name| name.split_once('/').map(|(_, repository)| repository))
            .unwrap_or(rest);
        match credentials::for_image(registry, repository, credentials) {
            None => Access {
                auth: RegistryAuth::Anonymous,
                identity: Arc::clone(&self.anonymous),
                owner,
            },
            Some(credential) => Access {
                auth: RegistryAuth::Basic(credential.username.clone(), credential.password.clone()),
                identity: Arc::from(credential.identity()),
                owner,
            },
        }
    }

    /// One image's fact: from the cache, from a read already in flight, or from a new read
    /// in one of `namespace`'s slots, all within the deadline.
    async fn fact(
        self: &Arc<Self>,
        pull: &Access,
        key: &str,
        namespace: &str,
        until: tokio::time::Instant,
    ) -> ImageFact {
        // Who may read an image is the registry's to say: facts are kept per credential.
        let cache_key = image_cache_key(&pull.identity, key);
        if let Some(fact) = self.images.get(&cache_key) {
            self.metrics.record_registry_lookup("image", "cache", fact_result(&fact));
            return fact;
        }
        let fact = match self.image_reads.joined(&cache_key) {
            Some(read) => {
                within(until, read, self.deadline).await.unwrap_or_else(ImageFact::Unreachable)
            }
            None => match self.slot(namespace, key, until).await {
                Err(why) => ImageFact::Unchecked(why),
                Ok(slot) => {
                    let began = Instant::now();
                    let this = Arc::clone(self);
                    let (owned, owned_pull) = (key.to_owned(), pull.clone());
                    let remember = Arc::clone(self);
                    let (remembered, identity) = (key.to_owned(), pull.identity.clone());
                    let owner = namespace.to_owned();
                    let read = self.image_reads.join(
                        &cache_key,
                        move || {
                            async move {
                                let _slot = slot;
                                bounded_fact(this.read(&owned_pull, &owned).await)
                            }
                            .boxed()
                        },
                        move |fact| {
                            remember.metrics.record_registry_read(
                                "image",
                                fact_result(fact),
                                began.elapsed(),
                            );
                            remember.remember(&owner, &identity, &remembered, fact);
                        },
                        ImageFact::Unreachable,
                    );
                    within(until, read, self.deadline).await.unwrap_or_else(ImageFact::Unreachable)
                }
            },
        };
        self.metrics.record_registry_lookup("image", "read", fact_result(&fact));
        fact
    }

    /// A read slot of `namespace`'s for the registry of `key`, waited for until `until`; else
    /// why there is none.
    async fn slot(
        &self,
        namespace: &str,
        key: &str,
        until: tokio::time::Instant,
    ) -> Result<slots::ReadSlot, String> {
        let registry = key.split('/').next().unwrap_or_default();
        if until <= tokio::time::Instant::now() {
            return Err(format!(
                "the {} ms of this request's registry reads were spent before they could start (reading its imagePullSecrets took that long); retry",
                self.deadline.as_millis()
            ));
        }
        self.slots.acquire(namespace, registry, until).await.map_err(|refused| match refused {
            NoSlot::Closed | NoSlot::TooSmall { .. } => refused.to_string(),
            NoSlot::Busy(_) | NoSlot::Memory { .. } => format!(
                "no registry read could start within {} ms: {refused}",
                self.deadline.as_millis()
            ),
        })
    }

    /// Keeps `fact`, read for `namespace` with `identity`'s credential, for as long as its
    /// kind says, charged to `namespace`'s share of the cache.
    fn remember(&self, namespace: &str, identity: &str, key: &str, fact: &ImageFact) {
        let ttl = match fact {
            ImageFact::Found(_) if key.contains('@') => DIGEST_TTL,
            ImageFact::Found(_) => TAG_TTL,
            ImageFact::Refused(_) | ImageFact::Unread(_) => REFUSED_TTL,
            ImageFact::Unreachable(_) | ImageFact::Unchecked(_) => return,
        };
        let cache_key = image_cache_key(identity, key);
        // A fact over FACT_CACHED_MAX is not kept (the cache's entry limit): read again each
        // time, in its namespace's slots.
        self.images.insert_for(namespace, cache_key, fact.clone(), ttl);
        // The digest a tag resolved to is what the mutating webhook pins: the validating
        // webhook then reads it by digest.
        if let ImageFact::Found(image) = fact
            && let Some((name, _tag)) = split_tag(key)
        {
            self.images.insert_for(
                namespace,
                image_cache_key(identity, &format!("{name}@{}", image.digest)),
                fact.clone(),
                DIGEST_TTL,
            );
        }
    }

    /// The verdict on an image's signatures under `trust`, within `left`, read (if it must
    /// be) in one of `namespace`'s slots.
    async fn verdict(
        self: &Arc<Self>,
        pull: &Access,
        key: &str,
        image: &RegistryImage,
        trust: &TrustRef,
        namespace: &str,
        until: tokio::time::Instant,
    ) -> SignatureVerdict {
        let name = repository_name(key);
        let cache_key = verdict_cache_key(&pull.identity, key, image, trust);
        if let Some(verdict) = self.verdicts.get(&cache_key) {
            self.metrics.record_registry_lookup("signatures", "cache", verdict_result(&verdict));
            return verdict;
        }
        let verdict = match self.verdict_reads.joined(&cache_key) {
            Some(read) => within(until, read, self.deadline)
                .await
                .unwrap_or_else(SignatureVerdict::Unreachable),
            None => match self.slot(namespace, key, until).await {
                Err(why) => SignatureVerdict::Unchecked(why),
                Ok(slot) => {
                    let began = Instant::now();
                    let (reader, owned_pull) = (Arc::clone(self), pull.clone());
                    let (name, image_owned, trust_owned) =
                        (name.to_owned(), image.clone(), trust.clone());
                    let this = Arc::clone(self);
                    let (remembered, owner) = (cache_key.clone(), namespace.to_owned());
                    let read = self.verdict_reads.join(
                        &cache_key,
                        move || {
                            async move {
                                let _slot = slot;
                                let verdict = match signatures::evidence(
                                    &reader.fetcher,
                                    &owned_pull,
                                    &name,
                                    &image_owned.digest,
                                    &trust_owned.0,
                                )
                                .await
                                {
                                    // Verifying is CPU (chains, envelopes of up to 16
                                    // signatures): off the async workers.
                                    Ok(evidence) => tokio::task::spawn_blocking(move || {
                                        signature::judge(
                                            &evidence,
                                            signature::Target {
                                                digest: &image_owned.digest,
                                                media_type: &image_owned.media_type,
                                                size: image_owned.size,
                                            },
                                            &trust_owned.0,
                                            unix_now(),
                                        )
                                    })
                                    .await
                                    .unwrap_or_else(|_| {
                                        SignatureVerdict::Unreachable(
                                            "the signature check failed unexpectedly".to_owned(),
                                        )
                                    }),
                                    Err(why) => SignatureVerdict::Unreachable(why),
                                };
                                bounded_verdict(verdict)
                            }
                            .boxed()
                        },
                        move |verdict| {
                            this.metrics.record_registry_read(
                                "signatures",
                                verdict_result(verdict),
                                began.elapsed(),
                            );
                            let ttl = match verdict {
                                SignatureVerdict::Verified { valid_until, .. } => {
                                    let left =
                                        u64::try_from(valid_until.saturating_sub(unix_now()))
                                            .unwrap_or(0);
                                    DIGEST_TTL.min(Duration::from_secs(left))
                                }
                                SignatureVerdict::Rejected(_) => REFUSED_TTL,
                                SignatureVerdict::Unreachable(_)
                                | SignatureVerdict::Unchecked(_) => return,
                            };
                            this.verdicts.insert_for(&owner, remembered, verdict.clone(), ttl);
                        },
                        SignatureVerdict::Unreachable,
                    );
                    within(until, read, self.deadline)
                        .await
                        .unwrap_or_else(SignatureVerdict::Unreachable)
                }
            },
        };
        self.metrics.record_registry_lookup("signatures", "read", verdict_result(&verdict));
        verdict
    }

    /// Reads an image from its registry: its manifest (or index) and, for a single image,
    /// its config.
    async fn read(&self, access: &Access, key: &str) -> ImageFact {
        let reference: Reference = match key.parse() {
            Ok(reference) => reference,
            Err(error) => return ImageFact::Refused(format!("not a registry reference: {error}")),
        };
        let (body, digest) =
            match self.fetcher.manifest(access, &reference, &manifest::ACCEPTED).await {
                Ok(pulled) => pulled,
                Err(failure) => return failure.into(),
            };
        let media_type = manifest::media_type(&body).unwrap_or_default();
        let size = body.len() as u64;
        // Parsed, the manifest's bytes are let go before the config is read: a read holds one
        // of them at a time.
        let parsed = manifest::parse(&body);
        drop(body);
        let platforms = match parsed {
            Ok(manifest::Parsed::Index(platforms)) => platforms,
            Ok(manifest::Parsed::Image { config_digest, config_size }) => {
                let config = self
                    .fetcher
                    .blob(
                        access,
                        &reference,
                        &config_digest,
                        config_size,
                        manifest::CONFIG_MAX_BYTES,
                    )
                    .await
                    .map_err(|error| match error {
                        Failure::Unreachable(why) => ImageFact::Unreachable(why),
                        Failure::Refused(why) => {
                            ImageFact::Refused(format!("the image config {config_digest}: {why}"))
                        }
                        Failure::Unread(why) => {
                            ImageFact::Unread(format!("the image config {config_digest}: {why}"))
                        }
                    })
                    .and_then(|body| {
                        manifest::config_platform(&body)
                            .map_err(|e| ImageFact::Refused(e.to_string()))
                    });
                match config {
                    Ok(platform) => vec![platform],
                    Err(fact) => return fact,
                }
            }
            Err(error) => return ImageFact::Refused(error.to_string()),
        };
        ImageFact::Found(Arc::new(RegistryImage { digest, media_type, size, platforms }))
    }
}

/// What `read` answers by `until`; else that the registry gave no answer within `deadline`
/// (the read goes on in the background and fills the cache).
async fn within<V>(
    until: tokio::time::Instant,
    read: impl std::future::Future<Output = V>,
    deadline: Duration,
) -> Result<V, String> {
    tokio::time::timeout_at(until, read)
        .await
        .map_err(|_| format!("no answer within {} ms", deadline.as_millis()))
}

/// Longest reason kept from a read, in bytes: a registry's error texts (and serde's, which
/// quote what they could not read) reach denial messages, the caches and the log.
pub const REASON_MAX_BYTES: usize = 1024;

/// `why` cut to [`REASON_MAX_BYTES`] and escaped ([`crate::text::clipped`]): a registry's
/// text with a line break would otherwise forge a line of arcguard's log.
fn bounded(why: String) -> String {
    match crate::text::clipped(&why, REASON_MAX_BYTES) {
        std::borrow::Cow::Borrowed(_) => why,
        std::borrow::Cow::Owned(clipped) => clipped,
    }
}

/// A fact whose reason is [`bounded`].
fn bounded_fact(fact: ImageFact) -> ImageFact {
    match fact {
        ImageFact::Refused(why) => ImageFact::Refused(bounded(why)),
        ImageFact::Unreachable(why) => ImageFact::Unreachable(bounded(why)),
        ImageFact::Unread(why) => ImageFact::Unread(bounded(why)),
        ImageFact::Unchecked(why) => ImageFact::Unchecked(bounded(why)),
        found @ ImageFact::Found(_) => found,
    }
}

/// A verdict whose reason is [`bounded`].
fn bounded_verdict(verdict: SignatureVerdict) -> SignatureVerdict {
    match verdict {
        SignatureVerdict::Rejected(why) => SignatureVerdict::Rejected(bounded(why)),
        SignatureVerdict::Unreachable(why) => SignatureVerdict::Unreachable(bounded(why)),
        SignatureVerdict::Unchecked(why) => SignatureVerdict::Unchecked(bounded(why)),
        verified @ SignatureVerdict::Verified { .. } => verified,
    }
}

/// What one image of a request was found to be: its key, its fact, and the verdicts on its
/// signatures by (key, trust).
type Read = (String, ImageFact, Vec<((String, TrustId), SignatureVerdict)>);

/// The facts of a request from what was read for each of its images; an image read by tag is
/// also answered under the digest it resolved to, the key its pinned form is read by.
fn assemble(read: Vec<Read>) -> RegistryFacts {
    let mut facts = RegistryFacts::default();
    for (key, fact, verdicts) in read {
        if let ImageFact::Found(image) = &fact
            && let Some((name, _)) = split_tag(&key)
        {
            let pinned = format!("{name}@{}", image.digest);
            for ((_, trust), verdict) in &verdicts {
                facts.signatures.insert((pinned.clone(), *trust), verdict.clone());
            }
            facts.images.insert(pinned, fact.clone());
        }
        facts.signatures.extend(verdicts);
        facts.images.insert(key, fact);
    }
    facts
}

/// What a cached entry costs besides its strings: the map's slot, the expiry, the headers of
/// its strings and vectors.
const ENTRY_OVERHEAD: usize = 160;

/// The bytes a cached image fact holds, estimated.
#[allow(clippy::ptr_arg, reason = "the cache's weigh is fn(&K, &V), K = String")]
fn fact_weight(key: &String, fact: &ImageFact) -> usize {
    let held = match fact {
        ImageFact::Found(image) => {
            image.digest.len()
                + image.media_type.len()
                + image
                    .platforms
                    .iter()
                    .map(|p| {
                        96 + p.os.len()
                            + p.architecture.len()
                            + p.variant.as_ref().map_or(0, String::len)
                            + p.os_version.as_ref().map_or(0, String::len)
                    })
                    .sum::<usize>()
        }
        ImageFact::Refused(why)
        | ImageFact::Unreachable(why)
        | ImageFact::Unread(why)
        | ImageFact::Unchecked(why) => why.len(),
    };
    ENTRY_OVERHEAD + key.len() + held
}

/// The bytes a cached signature verdict holds, estimated.
fn verdict_weight(key: &(String, TrustId), verdict: &SignatureVerdict) -> usize {
    let held = match verdict {
        SignatureVerdict::Verified { by, .. } => by.len(),
        SignatureVerdict::Rejected(why)
        | SignatureVerdict::Unreachable(why)
        | SignatureVerdict::Unchecked(why) => why.len(),
    };
    ENTRY_OVERHEAD + key.0.len() + held
}

/// An image fact's result label in the metrics.
fn fact_result(fact: &ImageFact) -> &'static str {
    match fact {
        ImageFact::Found(_) => "found",
        ImageFact::Refused(_) | ImageFact::Unread(_) => "refused",
        ImageFact::Unreachable(_) | ImageFact::Unchecked(_) => "unreachable",
    }
}

/// A signature verdict's result label in the metrics.
fn verdict_result(verdict: &SignatureVerdict) -> &'static str {
    match verdict {
        SignatureVerdict::Verified { .. } => "verified",
        SignatureVerdict::Rejected(_) => "rejected",
        SignatureVerdict::Unreachable(_) | SignatureVerdict::Unchecked(_) => "unreachable",
    }
}

/// The image cache's key: facts are kept per credential identity, since who may read an image
/// is the registry's to say.
fn image_cache_key(identity: &str, key: &str) -> String {
    let mut cache_key = String::with_capacity(identity.len() + 1 + key.len());
    cache_key.push_str(identity);
    cache_key.push(' ');
    cache_key.push_str(key);
    cache_key
}

/// The verdict cache's key: the image by repository and digest (a tag and its digest share
/// one verdict) under a credential identity, and the trust judged by.
fn verdict_cache_key(
    identity: &str,
    key: &str,
    image: &RegistryImage,
    trust: &TrustRef,
) -> (String, TrustId) {
    let name = repository_name(key);
    let mut cache_key = String::with_capacity(identity.len() + 2 + name.len() + image.digest.len());
    cache_key.push_str(identity);
    cache_key.push(' ');
    cache_key.push_str(name);
    cache_key.push('@');
    cache_key.push_str(&image.digest);
    (cache_key, trust.0.id())
}

/// The repository part (`registry/repository`) of a lookup key.
fn repository_name(key: &str) -> &str {
    split_tag(key)
        .map_or_else(|| key.split_once('@').map_or(key, |(name, _)| name), |(name, _)| name)
}

/// Now, in Unix seconds (the pure verification takes the time as an argument).
fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl ImageSource for Arc<Registries> {
    fn lookup<'a>(
        &'a self,
        keys: &'a BTreeSet<String>,
        signatures: &'a BTreeSet<(String, TrustRef)>,
        credentials: &'a [RegistryCredential],
        namespace: &'a str,
        arrived: Instant,
    ) -> BoxFuture<'a, RegistryFacts> {
        Box::pin(Registries::lookup(self, keys, signatures, credentials, namespace, arrived))
    }
}

/// `registry/repository` and the tag of a key read by tag; `None` for a key read by digest.
fn split_tag(key: &str) -> Option<(&str, &str)> {
    if key.contains('@') {
        return None;
    }
    let slash = key.rfind('/')?;
    let colon = key[slash..].find(':')? + slash;
    Some((&key[..colon], &key[colon + 1..]))
}

/// Why the registry did not serve what was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// It answered about the content: not found, access denied, content that does not match
    /// its digest.
    Refused(String),
    /// It did not answer: connection, TLS, 5xx.
    Unreachable(String),
    /// Its answer was larger than arcguard reads: a manifest, blob or token answer.
    Unread(String),
}

impl From<Failure> for ImageFact {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Refused(why) => Self::Refused(why),
            Failure::Unreachable(why) => Self::Unreachable(why),
            Failure::Unread(why) => Self::Unread(why),
        }
    }
}

/// A request that got no answer: the registry is unreachable, and for the two causes that are
/// configuration rather than availability, the message says which flag fixes them.
pub(crate) fn transport_failure(error: &dyn std::error::Error) -> Failure {
    let text = request_error(error);
    let hint = if text.contains("InvalidContentType") {
        " (a plain-HTTP registry? list it in --registry-plain-http)"
    } else if text.contains("UnknownIssuer") || text.contains("certificate") {
        " (is the registry's CA in --registry-ca?)"
    } else {
        ""
    };
    Failure::Unreachable(format!("{text}{hint}"))
}

/// An HTTP client of the registry reads: the system roots plus the configured CA, [`READ_CAP`]
/// as connect and read timeouts (a request waits at most its deadline; the read may go on to
/// fill the cache for the apiserver's retry), arcguard's user agent, following redirects
/// (blobs live behind them) or not (token services: a realm is the registry's to name, and a
/// redirect would take a plain-HTTP or internal address past its checks).
///
/// No connection is kept idle: a namespaced policy's registries, and the token services and
/// redirect targets they name, are hosts a tenant picks, and reqwest keeps idle connections
/// per host without a total bound (7,000 token services one namespace named held 6,000
/// connections and 130 MB). Registry reads are the first-seen path; each request opens its
/// own connection.
///
/// # Errors
/// [`RegistryError::Ca`] for a CA bundle without a certificate, or one that does not parse;
/// [`RegistryError::Http`] for a client reqwest cannot build.
fn http_client(
    config: &RegistryConfig,
    redirects: bool,
) -> Result<registry_http::Client, RegistryError> {
    let mut roots = Vec::new();
    if let Some(pem) = &config.ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| RegistryError::Ca(e.to_string()))?;
            roots.push(
                registry_http::Certificate::from_der(&cert)
                    .map_err(|e| RegistryError::Ca(e.to_string()))?,
            );
        }
        if roots.is_empty() {
            return Err(RegistryError::Ca("no CERTIFICATE block".to_owned()));
        }
    }
    let redirect = if redirects {
        registry_http::redirect::Policy::default()
    } else {
        registry_http::redirect::Policy::none()
    };
    registry_http::Client::builder()
        .tls_certs_merge(roots)
        .connect_timeout(READ_CAP)
        .read_timeout(READ_CAP)
        .pool_max_idle_per_host(0)
        .redirect(redirect)
        .user_agent(concat!("arcguard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| RegistryError::Http(e.to_string()))
}

/// A transport error with its causes (the TLS or connection reason is in the source chain).
fn request_error(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    use crate::signature::sha256;

    /// A plain-HTTP registry serving one index as `team/app:1` (and by digest), counting the
    /// manifest requests it answers; with `hang`, it accepts connections and never answers.
    async fn mock_registry(hang: bool) -> (String, Arc<AtomicUsize>, String, u64) {
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX,
            "manifests": [{"mediaType": manifest::OCI_MANIFEST, "digest": "sha256:aa", "size": 1,
                           "platform": {"os": "windows", "architecture": "amd64"}}]})
        .to_string();
        let digest = sha256(index.as_bytes());
        let size = index.len() as u64;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let served = Arc::new(AtomicUsize::new(0));
        let (count, body, served_digest) = (Arc::clone(&served), index, digest.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                if hang {
                    held.push(socket);
                    continue;
                }
                let (count, body, digest) =
                    (Arc::clone(&count), body.clone(), served_digest.clone());
                tokio::spawn(async move {
                    let mut buffer = vec![0; 8192];
                    loop {
                        let Ok(n) = socket.read(&mut buffer).await else { return };
                        if n == 0 {
                            return;
                        }
                        let head = String::from_utf8_lossy(&buffer[..n]).to_string();
                        let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                        let response = if path.starts_with("/v2/team/app/manifests/") {
                            count.fetch_add(1, Ordering::SeqCst);
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ndocker-content-digest: {digest}\r\ncontent-length: {}\r\n\r\n{body}",
                                manifest::OCI_INDEX,
                                body.len()
                            )
                        } else if path == "/v2/" {
                            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_owned()
                        } else if path.starts_with("/v2/team/loud/") {
                            // A registry that puts 60 KiB into its error message.
                            let error = format!(
                                r#"{{"errors":[{{"code":"NAME_UNKNOWN","message":"{}"}}]}}"#,
                                "é".repeat(30 * 1024)
                            );
                            format!(
                                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{error}",
                                error.len()
                            )
                        } else {
                            let error = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
                            format!(
                                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{error}",
                                error.len()
                            )
                        };
                        if socket.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (host, served, digest, size)
    }

    fn registries(host: &str, deadline: Duration) -> Arc<Registries> {
        Registries::new(
            &RegistryConfig { ca_pem: None, plain_http: vec![host.to_owned()], deadline },
            MemoryPool::new(slots::MAX_READS * slots::READ_BYTES),
            Arc::new(Metrics::new()),
        )
        .expect("client")
    }

    #[tokio::test]
    async fn no_connection_is_kept_idle_for_the_next_read() {
        // A registry that keeps every connection open and counts them.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = [0; 4096];
                    while let Ok(read) = socket.read(&mut buffer).await {
                        if read == 0 {
                            return;
                        }
                        let answer = "HTTP/1.1 404 Not Found\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n";
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let registries = registries(&host, DEFAULT_DEADLINE);
        for i in 0..3 {
            let key = format!("{host}/team/app{i}:1");
            let facts = registries
                .lookup(
                    &BTreeSet::from([key.clone()]),
                    &BTreeSet::new(),
                    &[],
                    "apps",
                    Instant::now(),
                )
                .await;
            assert!(matches!(facts.images.get(&key), Some(ImageFact::Refused(_))), "{facts:?}");
        }
        // Hosts a tenant names (registries, token services, redirect targets) cannot pile up
        // idle connections: each read opened its own.
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// A found Windows index of digest `n` listing `platforms` platforms with long fields (a
    /// heavy fact: about 350 bytes of weight each).
    fn windows_index(n: usize, platforms: usize) -> ImageFact {
        ImageFact::Found(Arc::new(RegistryImage {
            digest: format!("sha256:{n:064x}"),
            media_type: manifest::OCI_INDEX.into(),
            size: 1,
            platforms: (0..platforms)
                .map(|i| crate::rules::provenance::Platform {
                    os: "windows".into(),
                    architecture: "amd64".into(),
                    variant: Some("v".repeat(120)),
                    os_version: Some(format!("10.0.{i}.{}", "1".repeat(110))),
                })
                .collect(),
        }))
    }

    #[test]
    fn a_fact_too_heavy_for_its_share_of_the_cache_is_not_cached() {
        let registries = registries("registry.example", DEFAULT_DEADLINE);
        let image = |platforms: usize| windows_index(platforms, platforms);
        let (light, heavy) = ("registry.example/team/light:1", "registry.example/team/heavy:1");
        registries.remember("apps", ANONYMOUS, light, &image(24));
        registries.remember("apps", ANONYMOUS, heavy, &image(256));
        assert!(registries.images.get(&image_cache_key(ANONYMOUS, light)).is_some());
        assert!(registries.images.get(&image_cache_key(ANONYMOUS, heavy)).is_none());
        assert!(fact_weight(&heavy.to_owned(), &image(256)) > FACT_CACHED_MAX);
    }

    #[test]
    fn one_namespace_s_heavy_facts_do_not_evict_another_s() {
        let registries = registries("registry.example", DEFAULT_DEADLINE);
        let fact = windows_index;
        // Another namespace's images, each read once more after it was kept (so in the
        // cache's main queue), by digest.
        let quiet: Vec<String> =
            (0..200).map(|i| format!("registry.example/quiet/app@sha256:{i:064x}")).collect();
        for (i, key) in quiet.iter().enumerate() {
            registries.remember("quiet", ANONYMOUS, key, &fact(i, 2));
            assert!(registries.images.get(&image_cache_key(ANONYMOUS, key)).is_some());
        }
        // A tenant's images of 180 long platforms each, just under the heaviest fact kept,
        // each read twice: twenty times what the whole cache holds.
        let heavy = fact(0, 180);
        let weight = fact_weight(&"k".to_owned(), &heavy);
        assert!((FACT_CACHED_MAX * 3 / 4..FACT_CACHED_MAX).contains(&weight), "{weight}");
        for i in 0..(20 * CACHE_BYTES / FACT_CACHED_MAX) {
            let key = format!("registry.example/noisy/app@sha256:{i:064x}");
            registries.remember("noisy", ANONYMOUS, &key, &heavy);
            for _ in 0..2 {
                let _ = registries.images.get(&image_cache_key(ANONYMOUS, &key));
            }
        }
        let kept = quiet
            .iter()
            .filter(|key| registries.images.get(&image_cache_key(ANONYMOUS, key)).is_some())
            .count();
        assert_eq!(kept, quiet.len(), "the other namespace's facts survive");
    }

    #[tokio::test]
    async fn facts_are_read_once_and_answered_under_tag_and_digest() {
        let (host, served, digest, size) = mock_registry(false).await;
        let registries = registries(&host, DEFAULT_DEADLINE);
        let tag = format!("{host}/team/app:1");
        let missing = format!("{host}/team/missing:1");
        let keys = BTreeSet::from([tag.clone(), missing.clone()]);
        let facts =
            registries.lookup(&keys, &BTreeSet::new(), &[], "apps", Instant::now()).await.images;
        let found = ImageFact::Found(Arc::new(RegistryImage {
            digest: digest.clone(),
            media_type: manifest::OCI_INDEX.into(),
            size,
            platforms: vec![crate::rules::provenance::Platform {
                os: "windows".into(),
                architecture: "amd64".into(),
                variant: None,
                os_version: None,
            }],
        }));
        assert_eq!(facts.get(&tag), Some(&found));
        // The pinned form's key is answered from the same read.
        assert_eq!(facts.get(&format!("{host}/team/app@{digest}")), Some(&found));
        assert_eq!(
            facts.get(&missing),
            Some(&ImageFact::Refused(
                "the registry answered MANIFEST_UNKNOWN (manifest unknown)".into()
            ))
        );
        assert_eq!(served.load(Ordering::SeqCst), 1);
        // A registry's error text is kept to REASON_MAX_BYTES, whatever it sends.
        let loud = format!("{host}/team/loud:1");
        let facts = registries
            .lookup(&BTreeSet::from([loud.clone()]), &BTreeSet::new(), &[], "apps", Instant::now())
            .await;
        match facts.images.get(&loud) {
            Some(ImageFact::Refused(why)) => {
                assert!(why.starts_with("the registry answered NAME_UNKNOWN (éé"), "{why}");
                assert!(
                    why.ends_with(" bytes]") && why.len() <= REASON_MAX_BYTES + 24,
                    "{}",
                    why.len()
                );
            }
            other => panic!("{other:?}"),
        }
        // Both keys again, and the digest's: all from the cache.
        let again = BTreeSet::from([tag.clone(), format!("{host}/team/app@{digest}")]);
        let facts =
            registries.lookup(&again, &BTreeSet::new(), &[], "apps", Instant::now()).await.images;
        assert!(facts.values().all(|fact| *fact == found), "{facts:?}");
        assert_eq!(served.load(Ordering::SeqCst), 1);
        // Three reads (one found, two refused), and five lookups: three read, two from the cache.
        let metrics = registries.metrics.encode();
        for line in [
            r#"arcguard_registry_reads_total{read="image",result="found"} 1"#,
            r#"arcguard_registry_reads_total{read="image",result="refused"} 2"#,
            r#"arcguard_registry_reads_total{read="image",result="unreachable"} 0"#,
            r#"arcguard_registry_read_duration_seconds_count{read="image"} 3"#,
            r#"arcguard_registry_lookups_total{lookup="image",source="read",result="found"} 1"#,
            r#"arcguard_registry_lookups_total{lookup="image",source="read",result="refused"} 2"#,
            r#"arcguard_registry_lookups_total{lookup="image",source="cache",result="found"} 2"#,
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
    }

    #[tokio::test]
    async fn config_reads_carry_the_pull_secret_whether_its_authorization_is_kept_or_not() {
        use base64::Engine as _;
        let config = br#"{"os":"linux","architecture":"amd64","rootfs":{}}"#.to_vec();
        let config_digest = sha256(&config);
        let image = serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config.len()}, "layers": []})
        .to_string();
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("u:p"));
        let answer = Arc::new(move |path: &str, authorization: Option<&str>| {
            let ok = |kind: &str, body: &[u8]| {
                (
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ndocker-content-digest: {}\r\ncontent-length: {}\r\n\r\n",
                        sha256(body),
                        body.len()
                    ),
                    vec![body.to_vec()],
                )
            };
            if authorization != Some(basic.as_str()) {
                let head = "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"r\"\r\ncontent-length: 0\r\n\r\n";
                return (head.to_owned(), Vec::new());
            }
            if path == "/v2/" {
                ok("application/json", b"{}")
            } else if path.starts_with("/v2/team/solo/manifests/") {
                ok(manifest::OCI_MANIFEST, image.as_bytes())
            } else if path == format!("/v2/team/solo/blobs/{config_digest}") {
                ok("application/octet-stream", &config)
            } else {
                ("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned(), Vec::new())
            }
        });
        let (host, _) = fetch::tests::registry(answer).await;
        let registries = registries(&host, DEFAULT_DEADLINE);
        let secret =
            [RegistryCredential { key: host.clone(), username: "u".into(), password: "p".into() }];
        let linux = vec![crate::rules::provenance::Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
            os_version: None,
        }];
        for (tag, forget) in [("1", false), ("2", false), ("3", true)] {
            // Kept authorizations evicted: the blob's 401 is answered again, with the secret.
            if forget {
                registries.fetcher.forget_tokens();
            }
            let key = format!("{host}/team/solo:{tag}");
            let facts = registries
                .lookup(
                    &BTreeSet::from([key.clone()]),
                    &BTreeSet::new(),
                    &secret,
                    "apps",
                    Instant::now(),
                )
                .await;
            match facts.images.get(&key) {
                Some(ImageFact::Found(found)) => assert_eq!(found.platforms, linux, "{tag}"),
                other => panic!("{tag}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_namespace_reading_a_hung_registry_leaves_read_slots_to_the_others() {
        let (hung, _, _, _) = mock_registry(true).await;
        let (working, _, _, _) = mock_registry(false).await;
        let registries = Registries::new(
            &RegistryConfig {
                ca_pem: None,
                plain_http: vec![hung.clone(), working.clone()],
                deadline: Duration::from_millis(300),
            },
            MemoryPool::new(slots::MAX_READS * slots::READ_BYTES),
            Arc::new(Metrics::new()),
        )
        .expect("client");
        // More images never seen before than there are read slots, all on a registry that
        // never answers: the namespace's share of reads hangs, the rest are told it is busy.
        let noisy: BTreeSet<String> = (0..20).map(|i| format!("{hung}/team/app{i}:1")).collect();
        let facts =
            registries.lookup(&noisy, &BTreeSet::new(), &[], "noisy", Instant::now()).await.images;
        let busy = facts
            .values()
            .filter(|fact| matches!(fact, ImageFact::Unchecked(why) if why.contains("read slots were busy")))
            .count();
        assert_eq!(busy, 20 - slots::NAMESPACE_READS, "{facts:?}");
        assert_eq!(registries.slots.in_flight(), slots::NAMESPACE_READS);
        // Another namespace's pod is read at once.
        let key = format!("{working}/team/app:1");
        let facts = registries
            .lookup(&BTreeSet::from([key.clone()]), &BTreeSet::new(), &[], "quiet", Instant::now())
            .await;
        assert!(matches!(facts.images.get(&key), Some(ImageFact::Found(_))), "{facts:?}");
    }

    #[tokio::test]
    async fn a_memory_budget_full_of_requests_leaves_reads_unreadable_and_says_why() {
        let (host, served, _, _) = mock_registry(false).await;
        let pool = MemoryPool::new(slots::MIN_POOL_BYTES);
        let registries = Registries::new(
            &RegistryConfig {
                ca_pem: None,
                plain_http: vec![host.clone()],
                deadline: Duration::from_millis(200),
            },
            pool.clone(),
            Arc::new(Metrics::new()),
        )
        .expect("client");
        let key = format!("{host}/team/app:1");
        let keys = BTreeSet::from([key.clone()]);
        // Webhook requests in flight leave less than a read for longer than the deadline.
        let requests =
            pool.charge(slots::READ_BYTES + 1, tokio::time::Instant::now()).await.expect("room");
        let facts = registries.lookup(&keys, &BTreeSet::new(), &[], "apps", Instant::now()).await;
        match facts.images.get(&key) {
            Some(ImageFact::Unchecked(why)) => assert!(
                why.contains("no registry read could start within 200 ms")
                    && why.contains("memory budget (4 MiB, shared by webhook requests and registry reads in flight)"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing was read");
        // Once they end, the read runs.
        drop(requests);
        let facts = registries.lookup(&keys, &BTreeSet::new(), &[], "apps", Instant::now()).await;
        assert!(matches!(facts.images.get(&key), Some(ImageFact::Found(_))), "{facts:?}");
    }

    #[tokio::test]
    async fn the_deadline_counts_from_the_request_s_arrival() {
        let (host, served, _, _) = mock_registry(false).await;
        let registries = registries(&host, Duration::from_millis(300));
        let key = format!("{host}/team/app:1");
        // The cluster lookups before took the whole deadline: no read starts.
        let late = Instant::now().checked_sub(Duration::from_millis(300)).expect("uptime");
        let facts = registries
            .lookup(&BTreeSet::from([key.clone()]), &BTreeSet::new(), &[], "apps", late)
            .await;
        match facts.images.get(&key) {
            Some(ImageFact::Unchecked(why)) => {
                assert!(why.contains("were spent before"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(served.load(Ordering::SeqCst), 0);
        let facts = registries
            .lookup(&BTreeSet::from([key.clone()]), &BTreeSet::new(), &[], "apps", Instant::now())
            .await;
        assert!(matches!(facts.images.get(&key), Some(ImageFact::Found(_))), "{facts:?}");
    }

    #[tokio::test]
    async fn a_registry_that_never_answers_is_unreachable_after_the_deadline() {
        let (host, _, _, _) = mock_registry(true).await;
        let registries = registries(&host, Duration::from_millis(300));
        let key = format!("{host}/team/app:1");
        let facts = tokio::time::timeout(
            Duration::from_secs(20),
            registries.lookup(
                &BTreeSet::from([key.clone()]),
                &BTreeSet::new(),
                &[],
                "apps",
                Instant::now(),
            ),
        )
        .await
        .expect("the lookup ends at its deadline, not when the registry answers")
        .images;
        assert!(matches!(facts.get(&key), Some(ImageFact::Unreachable(_))), "{facts:?}");
    }

    #[test]
    fn splits_keys_read_by_tag() {
        assert_eq!(
            split_tag("localhost:5000/team/app:1.0"),
            Some(("localhost:5000/team/app", "1.0"))
        );
        assert_eq!(
            split_tag("docker.io/library/nginx:latest"),
            Some(("docker.io/library/nginx", "latest"))
        );
        assert_eq!(split_tag("localhost:5000/app@sha256:ab"), None);
    }
}
