//! The registry adapter's two memories: a bounded cache of answers with per-entry expiry, and
//! the reads in flight that concurrent requests for the same thing share.
//!
//! The cache is `quick_cache`'s (S3-FIFO eviction, bounded by weight), with an expiry kept in
//! each entry: a new entry goes to a small queue and only one read again reaches the main
//! one, so a tenant's flood of images never seen before evicts its own entries, not those
//! every tenant reuses (a cache emptied when full, as this was, let it evict everything).
//! Reads in flight are own code: sharing a read needs a spawned task that outlives the
//! requests waiting on it, which the general-purpose caches do not do.

use std::collections::HashMap;
use std::hash::{Hash, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt as _, Shared};
use quick_cache::Weighter;
use quick_cache::sync::{Cache, DefaultLifecycle};

/// Answers kept until they expire; at most `byte_limit` bytes as `weigh` counts them (with
/// `TtlCache::new`, at most `limit` entries), the least reused evicted first. An answer
/// weighing more than a sixteenth of `byte_limit` is not kept.
pub struct TtlCache<K, V> {
    entries: Cache<K, Entry<V>, ByWeight, RandomState, DefaultLifecycle<K, Entry<V>>>,
    byte_limit: usize,
    weigh: fn(&K, &V) -> usize,
}

impl<K: Eq + Hash, V: Clone> std::fmt::Debug for TtlCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlCache")
            .field("entries", &self.entries.len())
            .field("bytes", &self.entries.weight())
            .field("byte_limit", &self.byte_limit)
            .finish()
    }
}

/// A cached answer, its expiry, and its weight (computed once, as the cache requires).
#[derive(Clone)]
struct Entry<V> {
    expires: Instant,
    value: V,
    weight: u64,
}

/// Weighs an [`Entry`] by the weight it carries.
#[derive(Clone, Copy)]
struct ByWeight;

impl<K, V> Weighter<K, Entry<V>> for ByWeight {
    fn weight(&self, _: &K, entry: &Entry<V>) -> u64 {
        entry.weight
    }
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache of at most `limit` entries, whatever their size.
    pub fn new(limit: usize) -> Self {
        Self::build(limit, limit, |_, _| 1)
    }

    /// An empty cache of at most `byte_limit` bytes, an entry weighing what `weigh` says (an
    /// estimate of its heap bytes); `items` is about how many entries that makes.
    pub fn weighed(items: usize, byte_limit: usize, weigh: fn(&K, &V) -> usize) -> Self {
        Self::build(items, byte_limit, weigh)
    }

    fn build(items: usize, byte_limit: usize, weigh: fn(&K, &V) -> usize) -> Self {
        Self {
            entries: Cache::with(
                items,
                byte_limit as u64,
                ByWeight,
                RandomState::new(),
                DefaultLifecycle::default(),
            ),
            byte_limit,
            weigh,
        }
    }

    /// The answer for `key`, if one has not expired (an expired one is dropped).
    pub fn get(&self, key: &K) -> Option<V> {
        let entry = self.entries.get(key)?;
        let now = Instant::now();
        if now < entry.expires {
            return Some(entry.value);
        }
        self.entries.remove_if(key, |entry| entry.expires <= now);
        None
    }

    /// Forgets every answer.
    pub fn clear(&self) {
        self.entries.clear();
    }

    /// Keeps `value` for `ttl`.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        // Never zero: the cache never evicts an entry of no weight.
        let weight = (self.weigh)(&key, &value).max(1);
        if weight > self.byte_limit / 16 {
            self.entries.remove(&key);
            return;
        }
        let entry = Entry { expires: Instant::now() + ttl, value, weight: weight as u64 };
        self.entries.insert(key, entry);
    }
}

/// A read in flight: when it started, and its answer for every caller waiting on it.
type Flight<V> = (Instant, Shared<BoxFuture<'static, V>>);

/// Reads in flight by key, shared by every caller asking for the same key.
pub struct Flights<K, V: Clone> {
    reads: Mutex<HashMap<K, Flight<V>>>,
    /// A read older than this is not joined (it is stuck; its task ends at this cap anyway).
    cap: Duration,
}

impl<K, V: Clone> std::fmt::Debug for Flights<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").field("cap", &self.cap).finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone + Send + 'static, V: Clone + Send + Sync + 'static> Flights<K, V> {
    /// No reads; a read is joined for at most `cap`.
    pub fn new(cap: Duration) -> Self {
        Self { reads: Mutex::new(HashMap::new()), cap }
    }

    /// The read in flight for `key`, if one is (and is younger than the cap).
    pub fn joined(&self, key: &K) -> Option<Shared<BoxFuture<'static, V>>> {
        let reads = self.reads.lock().ok()?;
        let (started, read) = reads.get(key)?;
        (started.elapsed() < self.cap).then(|| read.clone())
    }

    /// The read in flight for `key`, or `start()` spawned as a new one. The task runs to its
    /// end even when every caller gives up, then calls `done` (to fill a cache) and leaves.
    /// `failed` answers when the task panics or the map is unusable.
    pub fn join(
        self: &std::sync::Arc<Self>,
        key: &K,
        start: impl FnOnce() -> BoxFuture<'static, V>,
        done: impl FnOnce(&V) + Send + 'static,
        failed: fn(String) -> V,
    ) -> Shared<BoxFuture<'static, V>> {
        let Ok(mut reads) = self.reads.lock() else {
            return futures::future::ready(failed("the read registry is unavailable".to_owned()))
                .boxed()
                .shared();
        };
        if let Some((started, read)) = reads.get(key)
            && started.elapsed() < self.cap
        {
            return read.clone();
        }
        let flights = std::sync::Arc::clone(self);
        let owned = key.clone();
        let cap = self.cap;
        let read = start();
        let task = tokio::spawn(async move {
            let value = match tokio::time::timeout(cap, read).await {
                Ok(value) => value,
                Err(_) => failed(format!("no answer within {} s", cap.as_secs())),
            };
            done(&value);
            if let Ok(mut reads) = flights.reads.lock() {
                reads.remove(&owned);
            }
            value
        });
        let shared = async move {
            task.await.unwrap_or_else(|error| failed(format!("the read failed: {error}")))
        }
        .boxed()
        .shared();
        reads.insert(key.clone(), (Instant::now(), shared.clone()));
        shared
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn entries_expire_and_a_full_cache_keeps_to_its_limit() {
        let cache = TtlCache::new(100);
        cache.insert("a", 1, Duration::from_secs(60));
        cache.insert("b", 2, Duration::ZERO);
        assert_eq!(cache.get(&"a"), Some(1));
        assert_eq!(cache.get(&"b"), None);
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let cache = TtlCache::new(100);
        for key in &keys {
            cache.insert(key.clone(), 0, Duration::from_secs(60));
        }
        let held = keys.iter().filter(|key| cache.get(key).is_some()).count();
        assert!((50..=100).contains(&held), "{held} of 1000 held in a cache of 100");
    }

    #[test]
    fn a_flood_of_new_answers_does_not_evict_the_ones_reused() {
        let cache: TtlCache<String, String> = TtlCache::weighed(1000, 160_000, |_, v| v.len());
        let long = Duration::from_secs(60);
        let reused: Vec<String> = (0..100).map(|i| format!("reused-{i}")).collect();
        for key in &reused {
            cache.insert(key.clone(), "x".repeat(100), long);
            assert!(cache.get(key).is_some());
        }
        // A tenant's images never seen before: fifty times what the cache holds.
        for i in 0..80_000 {
            cache.insert(format!("flood-{i}"), "y".repeat(100), long);
            if i % 1000 == 0 {
                // Everyone else's pods keep reading theirs.
                for key in &reused {
                    let _ = cache.get(key);
                }
            }
        }
        let kept = reused.iter().filter(|key| cache.get(key).is_some()).count();
        assert_eq!(kept, reused.len(), "the reused answers survive the flood");
        assert!(cache.entries.weight() <= 160_000, "{}", cache.entries.weight());
    }

    #[test]
    fn a_heavy_answer_is_not_kept() {
        let cache: TtlCache<String, String> = TtlCache::weighed(100, 1600, |_, v| v.len());
        let long = Duration::from_secs(60);
        cache.insert("fits".into(), "w".repeat(100), long);
        assert!(cache.get(&"fits".to_owned()).is_some());
        // Over a sixteenth of the bytes: never kept, and it drops what the key held.
        cache.insert("fits".into(), "w".repeat(101), long);
        assert_eq!(cache.get(&"fits".to_owned()), None);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_read_that_outlives_them() {
        let flights: Arc<Flights<&str, u32>> = Arc::new(Flights::new(Duration::from_secs(30)));
        let started = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (filled, was_filled) = tokio::sync::oneshot::channel::<u32>();
        let count = Arc::clone(&started);
        let first = flights.join(
            &"k",
            move || {
                count.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = released.await;
                    7
                }
                .boxed()
            },
            move |value| {
                let _ = filled.send(*value);
            },
            |_| 0,
        );
        let second = flights.join(&"k", || async { 9 }.boxed(), |_| {}, |_| 0);
        assert_eq!(started.load(Ordering::SeqCst), 1);
        // Both callers give up; the read goes on and fills the cache when it ends.
        drop((first, second));
        let _ = release.send(());
        assert_eq!(was_filled.await.ok(), Some(7));
    }
}
