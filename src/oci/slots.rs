//! Read slots: how many registry reads run at once, process-wide and for one namespace.
//!
//! A read holds a slot from before it starts until it ends (up to [`super::READ_CAP`]), so at
//! most [`MAX_READS`] reads' bytes are in memory at once, each one manifest, config or
//! signatures' payloads at a time ([`super::signatures::EVIDENCE_MAX_BYTES`]). One namespace's requests hold
//! at most [`NAMESPACE_READS`] of them: a tenant that creates pods naming many images never
//! seen before waits for its own slots, and every other namespace still finds one free. A
//! request waits for a slot within its own deadline and no longer; a read that never got one
//! leaves nothing behind (a queue of reads outliving their requests would grow with the load).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Registry reads (manifests, configs, signatures) in flight process-wide, at most. Each holds
/// one manifest ([`super::fetch::MANIFEST_MAX_BYTES`]), config or the signatures' payloads
/// at a time.
pub const MAX_READS: usize = 16;
/// Reads in flight for one namespace's requests, at most: a quarter of [`MAX_READS`].
pub const NAMESPACE_READS: usize = MAX_READS / 4;
/// Namespaces remembered without a read in flight, at most; beyond, idle ones are forgotten.
const IDLE_NAMESPACES: usize = 1024;

/// The slots of one process.
#[derive(Debug)]
pub struct ReadSlots {
    global: Arc<Semaphore>,
    namespaces: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A slot held: the namespace's and the process's.
#[derive(Debug)]
pub struct ReadSlot {
    _namespace: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

/// Why no slot was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoSlot {
    /// The slots are closed: the process is shutting down.
    #[error("arcguard is shutting down")]
    Closed,
}

impl Default for ReadSlots {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadSlots {
    /// [`MAX_READS`] slots, [`NAMESPACE_READS`] per namespace.
    pub fn new() -> Self {
        Self { global: Arc::new(Semaphore::new(MAX_READS)), namespaces: Mutex::new(HashMap::new()) }
    }

    /// A slot for a read on behalf of `namespace` (`""` for cluster-scoped objects and the
    /// CLI): first one of the namespace's, then one of the process's. Waits until both are
    /// free; callers bound the wait with their deadline (dropping the future gives up its
    /// place).
    ///
    /// # Errors
    /// [`NoSlot::Closed`] when the process is shutting down.
    pub async fn acquire(&self, namespace: &str) -> Result<ReadSlot, NoSlot> {
        let own = self.namespace(namespace).acquire_owned().await.map_err(|_| NoSlot::Closed)?;
        let global = Arc::clone(&self.global).acquire_owned().await.map_err(|_| NoSlot::Closed)?;
        Ok(ReadSlot { _namespace: own, _global: global })
    }

    /// Reads in flight now, process-wide.
    pub fn in_flight(&self) -> usize {
        MAX_READS - self.global.available_permits()
    }

    fn namespace(&self, namespace: &str) -> Arc<Semaphore> {
        // A panic while the map was held leaves it whole (each change is one insert or
        // retain): go on with it rather than refuse every read.
        let mut namespaces =
            self.namespaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(semaphore) = namespaces.get(namespace) {
            return Arc::clone(semaphore);
        }
        if namespaces.len() >= IDLE_NAMESPACES {
            // A namespace whose semaphore only the map holds has no read in flight or waiting.
            namespaces.retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
        }
        let semaphore = Arc::new(Semaphore::new(NAMESPACE_READS));
        namespaces.insert(namespace.to_owned(), Arc::clone(&semaphore));
        semaphore
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    #[tokio::test]
    async fn one_namespace_takes_at_most_its_share_and_others_still_read() {
        let slots = ReadSlots::new();
        let mut held = Vec::new();
        for _ in 0..NAMESPACE_READS {
            held.push(slots.acquire("noisy").await.expect("slot"));
        }
        // The noisy namespace's next read waits...
        assert!(
            slots.acquire("noisy").now_or_never().is_none(),
            "past its share a namespace waits"
        );
        // ...while every other namespace finds a slot at once, up to the process's limit.
        for i in 0..MAX_READS - NAMESPACE_READS {
            let namespace = format!("team-{}", i % 3);
            match slots.acquire(&namespace).now_or_never() {
                Some(Ok(slot)) => held.push(slot),
                other => panic!("{namespace}: {other:?}"),
            }
        }
        assert_eq!(slots.in_flight(), MAX_READS);
        assert!(slots.acquire("quiet").now_or_never().is_none(), "past MAX_READS every read waits");
        // A slot given back is taken by the next read.
        held.pop();
        assert!(matches!(slots.acquire("quiet").now_or_never(), Some(Ok(_))));
    }

    #[tokio::test]
    async fn idle_namespaces_are_forgotten() {
        let slots = ReadSlots::new();
        let busy = slots.acquire("busy").await.expect("slot");
        for i in 0..IDLE_NAMESPACES + 10 {
            drop(slots.acquire(&format!("ns-{i}")).await.expect("slot"));
        }
        let namespaces = slots.namespaces.lock().expect("map");
        assert!(namespaces.len() <= IDLE_NAMESPACES, "{}", namespaces.len());
        assert!(namespaces.contains_key("busy"), "a namespace with a read in flight is kept");
        drop(namespaces);
        drop(busy);
    }
}
