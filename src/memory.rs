//! The memory pool: the bytes that work in flight may hold, one pool per process, shared by
//! webhook requests ([`crate::server::budget`] charges each request's body and what deciding it
//! can cost) and registry reads ([`crate::oci::slots`] charges each read the most it can hold).
//!
//! One pool, not one per consumer, so that the bound is the container's limit whatever the mix:
//! a namespace that names many images never seen before takes room from requests in flight
//! (which then wait, or get 503) rather than adding its reads on top of a full budget and
//! getting every replica OOM-killed. The pool is a tokio [`Semaphore`] counted in KiB, so any
//! budget fits its permit count; waits are FIFO, so a large charge is not starved by small ones.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Bytes per permit.
pub const UNIT: usize = 1024;

/// A pool of bytes; clones share it.
#[derive(Clone, Debug)]
pub struct MemoryPool {
    permits: Arc<Semaphore>,
    /// The whole pool, in units.
    total: u32,
}

/// Bytes held against a [`MemoryPool`] until dropped.
pub type MemoryCharge = OwnedSemaphorePermit;

/// Why a charge could not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The pool stayed full until the deadline.
    #[error("the memory budget had no room in time")]
    Full,
    /// More than the whole pool.
    #[error("more than the whole memory budget")]
    TooLarge,
}

impl MemoryPool {
    /// A pool of `bytes` (rounded down to KiB, at least one).
    pub fn new(bytes: usize) -> Self {
        let total = u32::try_from((bytes / UNIT).max(1)).unwrap_or(u32::MAX);
        Self { permits: Arc::new(Semaphore::new(total as usize)), total }
    }

    /// The whole pool, in bytes.
    pub fn total_bytes(&self) -> usize {
        self.total as usize * UNIT
    }

    /// The bytes not charged now.
    pub fn available_bytes(&self) -> usize {
        self.permits.available_permits() * UNIT
    }

    /// Units for `bytes`, at least one; `None` beyond the whole pool.
    pub fn units(&self, bytes: usize) -> Option<u32> {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).ok()?;
        (units <= self.total).then_some(units)
    }

    /// Grows `held` to cover `bytes`, waiting until `deadline` for room (dropping the future
    /// gives up its place in the queue).
    ///
    /// # Errors
    /// [`Refusal::TooLarge`] beyond the whole pool, [`Refusal::Full`] when there was no room by
    /// the deadline; `held` is unchanged then.
    pub async fn grow(
        &self,
        held: &mut Option<MemoryCharge>,
        bytes: usize,
        deadline: Instant,
    ) -> Result<(), Refusal> {
        let units = self.units(bytes).ok_or(Refusal::TooLarge)?;
        let have = held.as_ref().map_or(0, |p| u32::try_from(p.num_permits()).unwrap_or(0));
        if units <= have {
            return Ok(());
        }
        let acquire = self.permits.clone().acquire_many_owned(units - have);
        let Ok(Ok(more)) = tokio::time::timeout_at(deadline, acquire).await else {
            return Err(Refusal::Full);
        };
        match held {
            Some(permit) => permit.merge(more),
            None => *held = Some(more),
        }
        Ok(())
    }

    /// A charge of `bytes`, waiting until `deadline` for room.
    ///
    /// # Errors
    /// As [`Self::grow`].
    pub async fn charge(&self, bytes: usize, deadline: Instant) -> Result<MemoryCharge, Refusal> {
        let mut held = None;
        self.grow(&mut held, bytes, deadline).await?;
        held.ok_or(Refusal::Full)
    }

    /// The least charge there is (one unit), if there is room now.
    ///
    /// # Errors
    /// [`Refusal::Full`] when the pool is full.
    pub fn try_charge_least(&self) -> Result<MemoryCharge, Refusal> {
        self.permits.clone().try_acquire_owned().map_err(|_| Refusal::Full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_counted_in_kib() {
        let pool = MemoryPool::new(10 * 1024 * 1024);
        assert_eq!(pool.total_bytes(), 10 * 1024 * 1024);
        assert_eq!(pool.units(0), Some(1));
        assert_eq!(pool.units(1), Some(1));
        assert_eq!(pool.units(1024 * 1024), Some(1024));
        assert_eq!(pool.units(10 * 1024 * 1024), Some(10 * 1024));
        assert_eq!(pool.units(10 * 1024 * 1024 + 1), None);
        assert_eq!(pool.units(usize::MAX), None);
        assert_eq!(MemoryPool::new(0).total_bytes(), UNIT);
    }

    #[tokio::test]
    async fn charges_grow_to_what_they_cover_and_refuse_beyond_the_pool() {
        let pool = MemoryPool::new(1024 * 1024);
        let deadline = Instant::now();
        let mut held = None;
        assert!(pool.grow(&mut held, 100 * 1024, deadline).await.is_ok());
        assert_eq!(held.as_ref().map(OwnedSemaphorePermit::num_permits), Some(100));
        assert!(pool.grow(&mut held, 50 * 1024, deadline).await.is_ok());
        assert_eq!(held.as_ref().map(OwnedSemaphorePermit::num_permits), Some(100));
        assert!(pool.grow(&mut held, 1024 * 1024, deadline).await.is_ok());
        assert_eq!(pool.available_bytes(), 0);
        let mut other = None;
        assert_eq!(pool.grow(&mut other, 1, deadline).await, Err(Refusal::Full));
        assert_eq!(pool.grow(&mut other, 1024 * 1024 + 1, deadline).await, Err(Refusal::TooLarge));
        assert!(other.is_none());
        assert_eq!(pool.try_charge_least().err(), Some(Refusal::Full));
        drop(held);
        assert_eq!(pool.available_bytes(), 1024 * 1024);
        // Clones share the pool.
        let charge = pool.clone().charge(512 * 1024, deadline).await.expect("room");
        assert_eq!(pool.available_bytes(), 512 * 1024);
        drop(charge);
        assert_eq!(pool.available_bytes(), 1024 * 1024);
    }
}
