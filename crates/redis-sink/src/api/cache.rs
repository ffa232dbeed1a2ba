//! What the read API has read from Redis, reused by every request for a
//! short while: thousands of page views a second cost Redis one read per
//! view and `--cache-ms`, not one per view.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Values by key, each read at most once per `ttl` however many ask: the
/// first to find a value stale reads it again while the others wait for
/// that read (one Redis read per key and period, never a stampede).
pub struct Cache<K, V> {
    ttl: Duration,
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

/// Keys kept before stale ones are dropped.
const MAX_KEYS: usize = 1_024;

type Slot<V> = tokio::sync::Mutex<Option<Read<V>>>;

/// The last read of a key.
struct Read<V> {
    /// When the read began (what it returned is at least that fresh).
    at: Instant,
    outcome: Result<Arc<V>, String>,
    /// The last value read successfully: served while Redis fails.
    last_good: Option<Arc<V>>,
}

/// A value, and whether it is older than the cache promises (Redis failed
/// since).
#[derive(Debug)]
pub struct Cached<V> {
    /// The value.
    pub value: Arc<V>,
    /// True when the last read failed and this is the read before it.
    pub stale: bool,
}

impl<K: Eq + Hash + Clone, V> Cache<K, V> {
    /// Values reused for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The value of `key`, read with `read` if none was read in the last
    /// `ttl`. A failed read is also kept for `ttl` (Redis down is not asked
    /// again by every request); meanwhile the last good value is served,
    /// marked stale, and without one the error is returned.
    pub async fn get<F, Fut>(&self, key: &K, read: F) -> Result<Cached<V>, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, String>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if slots.len() >= MAX_KEYS && !slots.contains_key(key) {
                // Bounded: keys asked for once (a client cycling through
                // every window) are forgotten once stale and not in use.
                let ttl = self.ttl;
                slots.retain(|_, slot| {
                    Arc::strong_count(slot) > 1
                        || slot.try_lock().map_or(true, |last| {
                            last.as_ref().is_some_and(|l| l.at.elapsed() < ttl)
                        })
                });
            }
            Arc::clone(slots.entry(key.clone()).or_default())
        };
        let asked = Instant::now();
        let mut slot = slot.lock().await;
        // A read that began after this request came is as fresh as one it
        // would make: requests that waited for it share it, even with a
        // zero `ttl`.
        let fresh = slot
            .as_ref()
            .is_some_and(|last| last.at.elapsed() < self.ttl || last.at >= asked);
        if !fresh {
            let started = Instant::now();
            let outcome = read().await.map(Arc::new);
            let last_good = match (&outcome, slot.take()) {
                (Ok(value), _) => Some(Arc::clone(value)),
                (Err(_), previous) => previous.and_then(|p| p.last_good),
            };
            *slot = Some(Read {
                at: started,
                outcome,
                last_good,
            });
        }
        let last = slot.as_ref().ok_or("no read")?;
        match (&last.outcome, &last.last_good) {
            (Ok(value), _) => Ok(Cached {
                value: Arc::clone(value),
                stale: false,
            }),
            (Err(_), Some(good)) => Ok(Cached {
                value: Arc::clone(good),
                stale: true,
            }),
            (Err(err), None) => Err(err.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn many_readers_share_one_read_per_period() {
        let cache: Arc<Cache<&str, usize>> = Arc::new(Cache::new(Duration::from_secs(60)));
        let reads = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, reads) = (Arc::clone(&cache), Arc::clone(&reads));
                tokio::spawn(async move {
                    cache
                        .get(&"k", || async move {
                            tokio::task::yield_now().await;
                            Ok(reads.fetch_add(1, Ordering::SeqCst) + 7)
                        })
                        .await
                        .map(|c| *c.value)
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.ok().and_then(Result::ok), Some(7));
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn requests_waiting_for_a_read_share_the_next_even_without_a_ttl() {
        let cache: Arc<Cache<&str, usize>> = Arc::new(Cache::new(Duration::ZERO));
        let reads = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, reads) = (Arc::clone(&cache), Arc::clone(&reads));
                tokio::spawn(async move {
                    let read = || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(reads.fetch_add(1, Ordering::SeqCst))
                    };
                    cache.get(&"k", read).await.map(|c| *c.value)
                })
            })
            .collect();
        let mut got = Vec::new();
        for task in tasks {
            got.push(task.await.ok().and_then(Result::ok));
        }
        // The first request reads; those that came while it ran share the
        // one read begun after them (the first read may be older than they
        // are), not one each.
        let mut want = vec![Some(1); 20];
        want[0] = Some(0);
        assert_eq!(got, want);
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        // A request after that read reads again.
        let later = cache.get(&"k", || async { Ok(9) }).await.map(|c| *c.value);
        assert_eq!(later, Ok(9));
    }

    #[tokio::test]
    async fn a_failed_read_serves_the_last_good_value_as_stale() {
        let cache: Cache<&str, u32> = Cache::new(Duration::ZERO);
        let first = cache.get(&"k", || async { Ok(1) }).await;
        assert!(matches!(first, Ok(Cached { stale: false, .. })));
        let failed = cache.get(&"k", || async { Err("down".to_owned()) }).await;
        assert!(matches!(failed, Ok(Cached { stale: true, ref value }) if **value == 1));
        let other = cache
            .get(&"other", || async { Err("down".to_owned()) })
            .await;
        assert_eq!(other.err().as_deref(), Some("down"));
        let back = cache.get(&"k", || async { Ok(2) }).await;
        assert!(matches!(back, Ok(Cached { stale: false, ref value }) if **value == 2));
    }
}
