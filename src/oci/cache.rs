//! The registry adapter's two memories: a bounded cache of answers with per-entry expiry, and
//! the reads in flight that concurrent requests for the same thing share.
//!
//! Own code rather than a caching crate: each is a mutex around a `HashMap` (emptied when full,
//! as the authorization cache in `cluster/facts.rs` is), and sharing a read needs a spawned
//! task that outlives the requests waiting on it, which the general-purpose caches do not do.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt as _, Shared};

/// Answers kept until they expire; at most `limit` entries and `byte_limit` bytes as `weigh`
/// counts them, emptied beyond. An answer weighing more than a sixteenth of `byte_limit` is
/// not kept (it would empty the cache for itself).
#[derive(Debug)]
pub struct TtlCache<K, V> {
    entries: Mutex<Entries<K, V>>,
    limit: usize,
    byte_limit: usize,
    weigh: fn(&K, &V) -> usize,
}

/// The entries of a [`TtlCache`] and their weight.
#[derive(Debug)]
struct Entries<K, V> {
    map: HashMap<K, (Instant, V, usize)>,
    bytes: usize,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache of at most `limit` entries, whatever their size.
    pub fn new(limit: usize) -> Self {
        Self::weighed(limit, usize::MAX, |_, _| 0)
    }

    /// An empty cache of at most `limit` entries and `byte_limit` bytes, an entry weighing
    /// what `weigh` says (an estimate of its heap bytes).
    pub fn weighed(limit: usize, byte_limit: usize, weigh: fn(&K, &V) -> usize) -> Self {
        Self {
            entries: Mutex::new(Entries { map: HashMap::new(), bytes: 0 }),
            limit,
            byte_limit,
            weigh,
        }
    }

    /// The answer for `key`, if one has not expired.
    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().ok()?;
        let (expires, value, _) = entries.map.get(key)?;
        (Instant::now() < *expires).then(|| value.clone())
    }

    /// Keeps `value` for `ttl`.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        let weight = (self.weigh)(&key, &value);
        if weight > self.byte_limit / 16 {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else { return };
        if entries.map.len() >= self.limit || entries.bytes + weight > self.byte_limit {
            entries.map.clear();
            entries.bytes = 0;
        }
        if let Some((_, _, replaced)) =
            entries.map.insert(key, (Instant::now() + ttl, value, weight))
        {
            entries.bytes -= replaced;
        }
        entries.bytes += weight;
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
    fn entries_expire_and_a_full_cache_is_emptied() {
        let cache = TtlCache::new(2);
        cache.insert("a", 1, Duration::from_secs(60));
        cache.insert("b", 2, Duration::ZERO);
        assert_eq!(cache.get(&"a"), Some(1));
        assert_eq!(cache.get(&"b"), None);
        cache.insert("c", 3, Duration::from_secs(60));
        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"c"), Some(3));
    }

    #[test]
    fn a_cache_past_its_bytes_is_emptied_and_a_heavy_answer_not_kept() {
        let cache: TtlCache<String, String> = TtlCache::weighed(100, 160, |_, v| v.len());
        let long = Duration::from_secs(60);
        cache.insert("a".into(), "x".repeat(8), long);
        cache.insert("a".into(), "x".repeat(9), long);
        cache.insert("b".into(), "y".repeat(10), long);
        // Replacing "a" counted its new weight only: 19 bytes held, so 14 more of 10 fit.
        for i in 0..14 {
            cache.insert(format!("k{i}"), "z".repeat(10), long);
        }
        assert_eq!(cache.get(&"a".to_owned()).map(|v| v.len()), Some(9));
        // The 15th would pass 160 bytes: the cache is emptied for it.
        cache.insert("last".into(), "z".repeat(10), long);
        assert_eq!(cache.get(&"a".to_owned()), None);
        assert_eq!(cache.get(&"last".to_owned()).map(|v| v.len()), Some(10));
        // Over a sixteenth of the bytes: never kept.
        cache.insert("heavy".into(), "w".repeat(11), long);
        assert_eq!(cache.get(&"heavy".to_owned()), None);
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
