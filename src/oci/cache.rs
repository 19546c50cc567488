//! The registry adapter's two memories: a bounded cache of answers with per-entry expiry, and
//! the reads in flight that concurrent requests for the same thing share.
//!
//! The cache is `quick_cache`'s (S3-FIFO eviction, bounded by weight), with an expiry kept in
//! each entry: a new entry goes to a small queue and only one read again reaches the main
//! one, so a tenant's flood of images never seen before evicts its own entries, not those
//! every tenant reuses (a cache emptied when full, as this was, let it evict everything).
//! An answer may be charged to an owner (the namespace whose request read it), and an owner
//! holds at most a quarter of the cache: S3-FIFO alone lets a tenant that reads each of its
//! images twice move them all to the main queue, evicting every other tenant's. The cache is
//! one shard, so that quarter is of what is evicted together: quick_cache's default of four
//! shards per core, each evicting on its own, gives a 64-core node 256 shards of 16 KiB, which
//! one heavy answer empties. Lookups take the shard's read lock; inserts (registry reads) are
//! rare.
//! Reads in flight are own code: sharing a read needs a spawned task that outlives the
//! requests waiting on it, which the general-purpose caches do not do.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt as _, Shared};
use quick_cache::sync::Cache;
use quick_cache::{Lifecycle, OptionsBuilder, Weighter};

/// The part of a cache's bytes one owner may hold: a quarter, as a namespace's share of the
/// registry read slots.
const OWNER_SHARE: usize = 4;
/// How often, at most, the entries are swept of expired answers (and what owners hold
/// recounted) when an owner is at its share: a sweep visits every entry.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Answers kept until they expire; at most `byte_limit` bytes as `weigh` counts them (with
/// `TtlCache::new`, at most `limit` entries), the least reused evicted first. An answer
/// weighing more than its entry limit (a sixteenth of `byte_limit`, or
/// [`TtlCache::with_entry_limit`]'s) is not kept, nor one that would take its owner over a
/// quarter of `byte_limit` ([`TtlCache::insert_for`]).
pub struct TtlCache<K, V> {
    entries: Cache<K, Entry<V>, ByWeight, RandomState, Owners>,
    byte_limit: usize,
    /// The heaviest answer kept, in bytes.
    entry_limit: usize,
    weigh: fn(&K, &V) -> usize,
    /// The bytes each owner's answers weigh (the same map the cache's evictions release).
    owners: Owners,
    /// When the entries were last swept, if ever.
    swept: Mutex<Option<Instant>>,
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

/// A cached answer, its expiry, its weight (computed once, as the cache requires), and whom
/// it is charged to, if anyone.
#[derive(Clone)]
struct Entry<V> {
    expires: Instant,
    value: V,
    weight: u64,
    owner: Option<Arc<str>>,
}

/// The bytes each owner's answers weigh; released as the cache evicts them.
#[derive(Clone, Default)]
struct Owners(Arc<Mutex<HashMap<Arc<str>, u64>>>);

impl Owners {
    /// Charges `weight` to `owner` if that keeps it within `share`.
    fn charge(&self, owner: &Arc<str>, weight: u64, share: u64) -> bool {
        let Ok(mut held) = self.0.lock() else { return false };
        let now = held.get(owner).copied().unwrap_or(0);
        if now + weight > share {
            return false;
        }
        held.insert(Arc::clone(owner), now + weight);
        true
    }

    /// Releases what `entry` was charged.
    fn release<V>(&self, entry: &Entry<V>) {
        let Some(owner) = &entry.owner else { return };
        let Ok(mut held) = self.0.lock() else { return };
        if let Some(now) = held.get_mut(owner) {
            *now = now.saturating_sub(entry.weight);
            if *now == 0 {
                held.remove(owner);
            }
        }
    }

    /// What each owner holds, counted afresh.
    fn reset(&self, counted: HashMap<Arc<str>, u64>) {
        if let Ok(mut held) = self.0.lock() {
            *held = counted;
        }
    }
}

impl<K, V> Lifecycle<K, Entry<V>> for Owners {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: K, entry: Entry<V>) {
        self.release(&entry);
    }
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
        let owners = Owners::default();
        let options = OptionsBuilder::new()
            .shards(1)
            .estimated_items_capacity(items)
            .weight_capacity(byte_limit as u64)
            .build();
        let entries = match options {
            Ok(options) => {
                Cache::with_options(options, ByWeight, RandomState::new(), owners.clone())
            }
            // Not for these options (it refuses only out-of-range allocations); the default
            // sharding is the fallback.
            Err(_) => {
                Cache::with(items, byte_limit as u64, ByWeight, RandomState::new(), owners.clone())
            }
        };
        Self {
            entries,
            byte_limit,
            entry_limit: byte_limit / 16,
            weigh,
            owners,
            swept: Mutex::new(None),
        }
    }

    /// The same cache, keeping no answer heavier than `bytes` (at most a sixteenth of its
    /// bytes).
    #[must_use]
    pub fn with_entry_limit(mut self, bytes: usize) -> Self {
        self.entry_limit = bytes.min(self.byte_limit / 16);
        self
    }

    /// The answer for `key`, if one has not expired (an expired one is dropped).
    pub fn get(&self, key: &K) -> Option<V> {
        let entry = self.entries.get(key)?;
        let now = Instant::now();
        if now < entry.expires {
            return Some(entry.value);
        }
        if let Some((_, gone)) = self.entries.remove_if(key, |entry| entry.expires <= now) {
            self.owners.release(&gone);
        }
        None
    }

    /// Forgets every answer (tests: as evictions would).
    #[cfg(test)]
    pub fn clear(&self) {
        self.entries.clear();
        self.owners.reset(HashMap::new());
    }

    /// Keeps `value` for `ttl`, charged to no one.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        self.keep(None, key, value, ttl);
    }

    /// Keeps `value` for `ttl`, charged to `owner`: not kept if that would take what `owner`'s
    /// answers weigh over a quarter of the cache's bytes (after expired answers are swept,
    /// at most once every [`SWEEP_EVERY`]).
    pub fn insert_for(&self, owner: &str, key: K, value: V, ttl: Duration) {
        self.keep(Some(Arc::from(owner)), key, value, ttl);
    }

    fn keep(&self, owner: Option<Arc<str>>, key: K, value: V, ttl: Duration) {
        // Never zero: the cache never evicts an entry of no weight.
        let weight = (self.weigh)(&key, &value).max(1) as u64;
        if weight > self.entry_limit as u64 {
            if let Some((_, gone)) = self.entries.remove(&key) {
                self.owners.release(&gone);
            }
            return;
        }
        // Charged before anything is replaced: an owner at its share changes nothing, not
        // even another owner's entry under the same key.
        if let Some(owner) = &owner {
            let share = (self.byte_limit / OWNER_SHARE) as u64;
            let charged = self.owners.charge(owner, weight, share)
                || (self.sweep() && self.owners.charge(owner, weight, share));
            if !charged {
                return;
            }
        }
        if let Some((_, replaced)) = self.entries.remove(&key) {
            self.owners.release(&replaced);
        }
        let entry = Entry { expires: Instant::now() + ttl, value, weight, owner };
        self.entries.insert(key, entry);
    }

    /// Drops every expired answer and counts afresh what each owner holds, unless that was
    /// done less than [`SWEEP_EVERY`] ago; whether it was done now. The count is the truth
    /// even where two inserts of one key raced (the second replaces the first unreleased).
    fn sweep(&self) -> bool {
        let now = Instant::now();
        {
            let Ok(mut swept) = self.swept.lock() else { return false };
            if swept.is_some_and(|at| now.duration_since(at) < SWEEP_EVERY) {
                return false;
            }
            *swept = Some(now);
        }
        let counted = RefCell::new(HashMap::<Arc<str>, u64>::new());
        self.entries.retain(|_, entry| {
            let live = entry.expires > now;
            if live && let Some(owner) = &entry.owner {
                *counted.borrow_mut().entry(Arc::clone(owner)).or_default() += entry.weight;
            }
            live
        });
        self.owners.reset(counted.into_inner());
        true
    }

    /// The bytes `owner`'s answers weigh.
    #[cfg(test)]
    fn held_by(&self, owner: &str) -> u64 {
        self.owners.0.lock().map_or(0, |held| held.get(owner).copied().unwrap_or(0))
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

    #[test]
    fn an_owner_holds_a_quarter_of_the_cache_and_evicts_no_one_else_s_answers() {
        let cache: TtlCache<String, String> = TtlCache::weighed(1000, 160_000, |_, v| v.len());
        let long = Duration::from_secs(60);
        let others: Vec<String> = (0..100).map(|i| format!("other-{i}")).collect();
        for key in &others {
            cache.insert_for("quiet", key.clone(), "x".repeat(100), long);
            // Read once more: in the main queue, as an answer used twice.
            assert!(cache.get(key).is_some());
        }
        // A tenant's answers, each read twice, fifty times what the cache holds.
        for i in 0..80_000 {
            let key = format!("noisy-{i}");
            cache.insert_for("noisy", key.clone(), "y".repeat(100), long);
            let _ = (cache.get(&key), cache.get(&key));
        }
        let kept = others.iter().filter(|key| cache.get(key).is_some()).count();
        assert_eq!(kept, others.len(), "the other owner's answers survive");
        assert!(cache.held_by("noisy") <= 40_000, "{}", cache.held_by("noisy"));
        assert_eq!(cache.held_by("quiet"), 100 * 100);
        // An owner at its share replaces nothing, not even another owner's answer of the
        // same key.
        let noisy_held = cache.held_by("noisy");
        assert!(noisy_held + 100 > 40_000, "{noisy_held}");
        cache.insert_for("noisy", others[1].clone(), "y".repeat(100), long);
        assert_eq!(cache.get(&others[1]), Some("x".repeat(100)));
        assert_eq!((cache.held_by("noisy"), cache.held_by("quiet")), (noisy_held, 100 * 100));
        // Replacing an answer releases what it held; answers charged to no one are not limited.
        cache.insert_for("quiet", others[0].clone(), "x".repeat(10), long);
        assert_eq!(cache.held_by("quiet"), 99 * 100 + 10);
        cache.insert("unowned".into(), "z".repeat(5000), long);
        assert!(cache.get(&"unowned".to_owned()).is_some());
    }

    #[test]
    fn expired_answers_make_room_in_their_owner_s_share() {
        let cache: TtlCache<String, String> = TtlCache::weighed(100, 1600, |_, v| v.len());
        let long = Duration::from_secs(60);
        for i in 0..4 {
            cache.insert_for("a", format!("brief-{i}"), "b".repeat(100), Duration::ZERO);
        }
        assert_eq!(cache.held_by("a"), 400);
        // At its share: the expired answers are swept, and the new one is kept.
        cache.insert_for("a", "kept".into(), "k".repeat(100), long);
        assert!(cache.get(&"kept".to_owned()).is_some());
        assert_eq!(cache.held_by("a"), 100);
        for i in 0..3 {
            cache.insert_for("a", format!("more-{i}"), "m".repeat(100), long);
        }
        // At its share of live answers: the next is not kept (and no second sweep runs).
        cache.insert_for("a", "over".into(), "o".repeat(100), long);
        assert_eq!(cache.get(&"over".to_owned()), None);
        assert_eq!(cache.held_by("a"), 400);
        // Evicted or expired answers release their owner's bytes.
        cache.clear();
        assert_eq!(cache.held_by("a"), 0);
    }

    #[test]
    fn the_cache_is_one_shard_whatever_the_cores() {
        let cache: TtlCache<String, String> = TtlCache::weighed(10_000, 4 << 20, |_, v| v.len());
        assert_eq!(cache.entries.num_shards(), 1);
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
