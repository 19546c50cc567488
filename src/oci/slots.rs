//! Read slots: how many registry reads run at once, process-wide, for one namespace and for
//! one registry.
//!
//! A read holds a slot from before it starts until it ends (up to [`super::READ_CAP`]), so at
//! most [`MAX_READS`] reads' bytes are in memory at once, each one manifest, config or
//! signatures' payloads at a time ([`super::signatures::EVIDENCE_MAX_BYTES`]). One namespace's requests hold
//! at most [`NAMESPACE_READS`] of them: a tenant that creates pods naming many images never
//! seen before waits for its own slots, and every other namespace still finds one free. One
//! registry's reads hold at most [`REGISTRY_READS`]: a read that misses its deadline goes on
//! (to fill the cache) and keeps its slot, so a registry that hangs would otherwise take every
//! slot once four namespaces read from it, and no other registry could be read. A
//! request waits for a slot within its own deadline and no longer; a read that never got one
//! leaves nothing behind (a queue of reads outliving their requests would grow with the load).
//!
//! Each read is also charged [`READ_BYTES`] to the process's [`MemoryPool`], which webhook
//! requests in flight share: when requests fill the container's budget, reads wait (within the
//! deadline) instead of adding their bytes on top, and a flood of reads leaves requests less
//! room instead of pushing the process past its limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::memory::{MemoryCharge, MemoryPool, Refusal};

/// Registry reads (manifests, configs, signatures) in flight process-wide, at most. Each holds
/// one manifest ([`super::fetch::MANIFEST_MAX_BYTES`]), config or the signatures' payloads
/// at a time.
pub const MAX_READS: usize = 16;
/// Reads in flight for one namespace's requests, at most: a quarter of [`MAX_READS`].
pub const NAMESPACE_READS: usize = MAX_READS / 4;
/// Reads in flight from one registry (`host[:port]`), at most: half of [`MAX_READS`].
pub const REGISTRY_READS: usize = MAX_READS / 2;
/// Namespaces (or registries) remembered without a read in flight, at most; beyond, idle ones
/// are forgotten.
const IDLE_NAMESPACES: usize = 1024;
/// What one read is charged to the memory pool: the most it holds at once. That is one
/// manifest, referrers index or config ([`super::fetch::MANIFEST_MAX_BYTES`], 1 MiB; what is
/// parsed from it is bounded by entries kept, not by its length, [`super::json`]) or an
/// image's signatures ([`super::signatures::EVIDENCE_MAX_BYTES`], 512 KiB), with the HTTP
/// client's buffers and a token answer, rounded up.
pub const READ_BYTES: usize = 2 * 1024 * 1024;
/// The smallest pool reads are charged to: one read beside the webhook request that needs it,
/// whose body is charged to the same pool. A `--memory-limit` under 12 MiB makes a smaller one
/// (half the limit, less 16 connection slots' 2 MiB).
pub const MIN_POOL_BYTES: usize = 2 * READ_BYTES;

/// The slots of one process.
#[derive(Debug)]
pub struct ReadSlots {
    global: Arc<Semaphore>,
    namespaces: Shares,
    registries: Shares,
    memory: MemoryPool,
}

/// A slot held: the namespace's, the registry's and the process's, and the read's memory
/// charge.
#[derive(Debug)]
pub struct ReadSlot {
    _namespace: OwnedSemaphorePermit,
    _registry: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
    _memory: MemoryCharge,
}

/// Whose slots were all taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// The namespace's [`NAMESPACE_READS`].
    Namespace,
    /// The registry's [`REGISTRY_READS`].
    Registry,
    /// The process's [`MAX_READS`].
    All,
}

impl std::fmt::Display for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Namespace => {
                write!(f, "this namespace's {NAMESPACE_READS} read slots were busy")
            }
            Self::Registry => write!(
                f,
                "this registry's {REGISTRY_READS} read slots were busy (its reads are slow or hang)"
            ),
            Self::All => write!(f, "all {MAX_READS} read slots were busy"),
        }
    }
}

/// Why no slot was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoSlot {
    /// The slots are closed: the process is shutting down.
    #[error("arcguard is shutting down")]
    Closed,
    /// The namespace's, the registry's or the process's slots stayed busy until the deadline.
    #[error("{0}")]
    Busy(Taken),
    /// The memory pool had no room for a read until the deadline.
    #[error(
        "arcguard's memory budget ({budget_mib} MiB, shared by webhook requests and registry reads in flight) had no room for a read"
    )]
    Memory {
        /// The whole pool, in MiB.
        budget_mib: usize,
    },
    /// The memory pool cannot hold a read beside the request that needs it: no read can
    /// ever start.
    #[error(
        "arcguard's memory budget ({budget_kib} KiB) cannot hold a registry read ({} KiB) beside the webhook request that needs it; raise --memory-limit to 12 MiB or more",
        READ_BYTES / 1024
    )]
    TooSmall {
        /// The whole pool, in KiB.
        budget_kib: usize,
    },
}

impl ReadSlots {
    /// [`MAX_READS`] slots, [`NAMESPACE_READS`] per namespace, [`REGISTRY_READS`] per
    /// registry, each read charged [`READ_BYTES`] to `memory`.
    pub fn new(memory: MemoryPool) -> Self {
        Self {
            global: Arc::new(Semaphore::new(MAX_READS)),
            namespaces: Shares::new(NAMESPACE_READS),
            registries: Shares::new(REGISTRY_READS),
            memory,
        }
    }

    /// A slot for a read from `registry` (`host[:port]`) on behalf of `namespace` (`""` for
    /// cluster-scoped objects and the CLI): first one of the namespace's, then one of the
    /// registry's, then one of the process's, then the read's memory charge, waiting for each
    /// until `until` at the latest (dropping the future gives up its place in every queue).
    ///
    /// # Errors
    /// [`NoSlot::Busy`] (naming whose slots) or [`NoSlot::Memory`] when the wait reached
    /// `until`, [`NoSlot::TooSmall`] at once when the pool is under [`MIN_POOL_BYTES`],
    /// [`NoSlot::Closed`] when the process is shutting down.
    pub async fn acquire(
        &self,
        namespace: &str,
        registry: &str,
        until: Instant,
    ) -> Result<ReadSlot, NoSlot> {
        if self.memory.total_bytes() < MIN_POOL_BYTES {
            return Err(NoSlot::TooSmall { budget_kib: self.memory.total_bytes() / 1024 });
        }
        let take = |semaphore: Arc<Semaphore>, taken: Taken| async move {
            match tokio::time::timeout_at(until, semaphore.acquire_owned()).await {
                Ok(Ok(permit)) => Ok(permit),
                Ok(Err(_)) => Err(NoSlot::Closed),
                Err(_) => Err(NoSlot::Busy(taken)),
            }
        };
        let own = take(self.namespaces.of(namespace), Taken::Namespace).await?;
        let from = take(self.registries.of(registry), Taken::Registry).await?;
        let global = take(Arc::clone(&self.global), Taken::All).await?;
        let budget_mib = self.memory.total_bytes() / (1024 * 1024);
        let memory =
            self.memory.charge(READ_BYTES, until).await.map_err(|refusal| match refusal {
                Refusal::Full => NoSlot::Memory { budget_mib },
                Refusal::TooLarge => {
                    NoSlot::TooSmall { budget_kib: self.memory.total_bytes() / 1024 }
                }
            })?;
        Ok(ReadSlot { _namespace: own, _registry: from, _global: global, _memory: memory })
    }

    /// Reads in flight now, process-wide.
    pub fn in_flight(&self) -> usize {
        MAX_READS - self.global.available_permits()
    }
}

/// Slots by name (a namespace, a registry), `size` for each; the names without a read in
/// flight are forgotten past [`IDLE_NAMESPACES`].
#[derive(Debug)]
struct Shares {
    size: usize,
    by_name: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Shares {
    fn new(size: usize) -> Self {
        Self { size, by_name: Mutex::new(HashMap::new()) }
    }

    fn of(&self, name: &str) -> Arc<Semaphore> {
        // A panic while the map was held leaves it whole (each change is one insert or
        // retain): go on with it rather than refuse every read.
        let mut by_name = self.by_name.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(semaphore) = by_name.get(name) {
            return Arc::clone(semaphore);
        }
        if by_name.len() >= IDLE_NAMESPACES {
            // A name whose semaphore only the map holds has no read in flight or waiting.
            by_name.retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
        }
        let semaphore = Arc::new(Semaphore::new(self.size));
        by_name.insert(name.to_owned(), Arc::clone(&semaphore));
        semaphore
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    /// A pool with room for every slot's charge.
    fn slots() -> ReadSlots {
        ReadSlots::new(MemoryPool::new(MAX_READS * READ_BYTES))
    }

    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn one_namespace_takes_at_most_its_share_and_others_still_read() {
        let slots = slots();
        let mut held = Vec::new();
        for _ in 0..NAMESPACE_READS {
            held.push(slots.acquire("noisy", "r0", later()).await.expect("slot"));
        }
        // The noisy namespace's next read waits...
        assert!(
            slots.acquire("noisy", "r1", later()).now_or_never().is_none(),
            "past its share a namespace waits"
        );
        // ...while every other namespace finds a slot at once, up to the process's limit.
        for i in 0..MAX_READS - NAMESPACE_READS {
            let namespace = format!("team-{}", i % 3);
            match slots.acquire(&namespace, &format!("other-{i}"), later()).now_or_never() {
                Some(Ok(slot)) => held.push(slot),
                other => panic!("{namespace}: {other:?}"),
            }
        }
        assert_eq!(slots.in_flight(), MAX_READS);
        assert!(
            slots.acquire("quiet", "r2", later()).now_or_never().is_none(),
            "past MAX_READS every read waits"
        );
        // A slot given back is taken by the next read.
        held.pop();
        assert!(matches!(slots.acquire("quiet", "r2", later()).now_or_never(), Some(Ok(_))));
    }

    #[tokio::test]
    async fn idle_namespaces_are_forgotten() {
        let slots = slots();
        let busy = slots.acquire("busy", "r", later()).await.expect("slot");
        for i in 0..IDLE_NAMESPACES + 10 {
            drop(slots.acquire(&format!("ns-{i}"), &format!("r{i}"), later()).await.expect("slot"));
        }
        let registries = slots.registries.by_name.lock().expect("map");
        assert!(registries.len() <= IDLE_NAMESPACES, "{}", registries.len());
        assert!(registries.contains_key("r"), "a registry with a read in flight is kept");
        drop(registries);
        let namespaces = slots.namespaces.by_name.lock().expect("map");
        assert!(namespaces.len() <= IDLE_NAMESPACES, "{}", namespaces.len());
        assert!(namespaces.contains_key("busy"), "a namespace with a read in flight is kept");
        drop(namespaces);
        drop(busy);
    }

    #[tokio::test]
    async fn reads_are_charged_to_the_pool_requests_share() {
        let pool = MemoryPool::new(3 * READ_BYTES);
        let slots = ReadSlots::new(pool.clone());
        let now = Instant::now();
        let first = slots.acquire("a", "r", now).await.expect("room for a read");
        assert_eq!(pool.available_bytes(), 2 * READ_BYTES);
        // Requests in flight take most of what is left: the next read finds no room and says
        // so, and gives its slot back.
        let requests = pool.charge(READ_BYTES + 1, now).await.expect("a request's charge");
        assert_eq!(
            slots.acquire("b", "r", now).await.err(),
            Some(NoSlot::Memory { budget_mib: 3 * READ_BYTES / (1024 * 1024) })
        );
        assert_eq!(slots.in_flight(), 1);
        // A read that ends gives its bytes back to the requests' side.
        drop(first);
        assert_eq!(pool.available_bytes(), 2 * READ_BYTES - 1024);
        drop(requests);
        let second = slots.acquire("b", "r", now).await.expect("room again");
        assert_eq!(pool.available_bytes(), 2 * READ_BYTES);
        drop(second);
    }

    #[tokio::test]
    async fn a_pool_that_cannot_hold_a_read_beside_a_request_refuses_at_once() {
        for (bytes, refused) in
            [(READ_BYTES, true), (MIN_POOL_BYTES - 1024, true), (MIN_POOL_BYTES, false)]
        {
            let slots = ReadSlots::new(MemoryPool::new(bytes));
            let got = slots.acquire("a", "r", later()).await.err();
            let want = refused.then_some(NoSlot::TooSmall { budget_kib: bytes / 1024 });
            assert_eq!(got, want, "{bytes}");
        }
        // What a 12 MiB --memory-limit leaves for requests and reads.
        let limits = crate::server::Limits {
            memory_budget: 6 * 1024 * 1024,
            ..crate::server::Limits::default()
        };
        assert_eq!(limits.request_budget(), MIN_POOL_BYTES);
    }

    #[tokio::test]
    async fn a_slot_not_free_by_the_deadline_is_busy() {
        let slots = slots();
        let mut held = Vec::new();
        for _ in 0..NAMESPACE_READS {
            held.push(slots.acquire("noisy", "r", later()).await.expect("slot"));
        }
        assert_eq!(
            slots.acquire("noisy", "r", Instant::now()).await.err(),
            Some(NoSlot::Busy(Taken::Namespace))
        );
    }

    #[tokio::test]
    async fn one_registry_takes_at_most_half_the_slots_and_others_still_read() {
        let slots = slots();
        // Reads of a registry that hangs, from enough namespaces to take every slot.
        let mut held = Vec::new();
        for i in 0..REGISTRY_READS {
            let namespace = format!("team-{}", i / NAMESPACE_READS);
            held.push(slots.acquire(&namespace, "hung.example", later()).await.expect("slot"));
        }
        assert_eq!(
            slots.acquire("team-9", "hung.example", Instant::now()).await.err(),
            Some(NoSlot::Busy(Taken::Registry))
        );
        // Every other registry is still read, up to the process's limit.
        for i in 0..MAX_READS - REGISTRY_READS {
            let namespace = format!("other-{}", i / NAMESPACE_READS);
            held.push(slots.acquire(&namespace, "ok.example", later()).await.expect("slot"));
        }
        assert_eq!(
            slots.acquire("other-9", "third.example", Instant::now()).await.err(),
            Some(NoSlot::Busy(Taken::All))
        );
    }
}
