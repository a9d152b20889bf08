//! The bounded in-memory LRU of decompressed spans, shared by every file of a
//! mount (and later by every mount of the daemon).
//!
//! Keys are content addresses (blob digest + span number), so images that
//! share a layer share its cached spans. Loading is single-flight: when
//! several readers miss the same span at once, one decompresses it and the
//! others wait for the result; a failed load wakes them and the next one
//! tries again, so nobody waits forever. The map lock is never held while a
//! span is being decompressed: a hit is a hash lookup and an `Arc` clone.

mod disk;
pub use disk::{parse_size, DiskCache};

use crate::digest::Digest;
use lru::LruCache;
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Identifies one decompressed span of one blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpanKey {
    /// The (compressed) blob.
    pub blob: Arc<Digest>,
    /// Span number within the blob's access map.
    pub span: u32,
}

/// A decompressed span, shared by the cache and its readers.
/// (An `Arc<Vec>` rather than `Arc<[u8]>`: wrapping the decoder's buffer
/// must not copy 4 MiB.)
pub type SpanData = Arc<Vec<u8>>;

struct Inner {
    lru: LruCache<SpanKey, SpanData>,
    /// Sum of the lengths of the values in `lru`.
    bytes: u64,
    /// Keys some thread is loading right now.
    pending: HashSet<SpanKey>,
}

/// LRU of decompressed spans, bounded by bytes.
pub struct SpanCache {
    inner: Mutex<Inner>,
    loaded: Condvar,
    max_bytes: u64,
}

impl SpanCache {
    /// A cache holding at most `max_bytes` of decompressed data (always at
    /// least the most recent span, whatever the bound).
    pub fn new(max_bytes: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
                pending: HashSet::new(),
            }),
            loaded: Condvar::new(),
            max_bytes,
        }
    }

    /// The configured bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The span for `key`: from the cache, or from `load` (run by exactly one
    /// of the threads that miss it at the same time), which is then cached.
    pub fn get_or_load<E>(
        &self,
        key: &SpanKey,
        load: impl FnOnce() -> Result<SpanData, E>,
    ) -> Result<SpanData, E> {
        {
            let mut inner = self.lock();
            loop {
                if let Some(data) = inner.lru.get(key) {
                    return Ok(data.clone());
                }
                if inner.pending.insert(key.clone()) {
                    break;
                }
                inner = self.loaded.wait(inner).unwrap_or_else(|e| e.into_inner());
            }
        }
        let _pending = PendingGuard { cache: self, key };
        let data = load()?;
        self.insert(key.clone(), data.clone());
        Ok(data)
    }

    /// Is `key` cached (not just being loaded)?
    pub fn is_cached(&self, key: &SpanKey) -> bool {
        self.lock().lru.contains(key)
    }

    /// Is `key` cached or being loaded right now?
    pub fn has(&self, key: &SpanKey) -> bool {
        let inner = self.lock();
        inner.lru.contains(key) || inner.pending.contains(key)
    }

    /// Caches `data` under `key` (used for spans decoded on the way to another).
    pub fn insert(&self, key: SpanKey, data: SpanData) {
        let mut inner = self.lock();
        inner.bytes += data.len() as u64;
        if let Some(old) = inner.lru.put(key, data) {
            inner.bytes -= old.len() as u64;
        }
        while inner.bytes > self.max_bytes && inner.lru.len() > 1 {
            if let Some((_, evicted)) = inner.lru.pop_lru() {
                inner.bytes -= evicted.len() as u64;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every update is a few infallible steps), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Clears the pending mark of a load and wakes waiters, on success or failure.
struct PendingGuard<'a> {
    cache: &'a SpanCache,
    key: &'a SpanKey,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.cache.lock().pending.remove(self.key);
        self.cache.loaded.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(span: u32) -> SpanKey {
        SpanKey { blob: Arc::new(Digest::of(b"blob")), span }
    }

    fn data(len: usize) -> SpanData {
        Arc::new(vec![7u8; len])
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let cache = SpanCache::new(250);
        for i in 0..3 {
            cache.insert(key(i), data(100));
        }
        assert_eq!(cache.bytes(), 200);
        let loads = AtomicUsize::new(0);
        let load = || {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(data(100))
        };
        // span 0 was evicted when span 2 arrived; span 2 is still there.
        cache.get_or_load(&key(0), load).unwrap();
        cache.get_or_load(&key(2), load).unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn keeps_one_span_even_when_larger_than_bound() {
        let cache = SpanCache::new(10);
        cache.insert(key(0), data(100));
        assert_eq!(cache.bytes(), 100);
        cache.insert(key(1), data(100));
        assert_eq!(cache.bytes(), 100);
    }

    #[test]
    fn concurrent_misses_load_once() {
        let cache = SpanCache::new(1 << 20);
        let loads = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let got = cache
                        .get_or_load(&key(1), || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok::<_, ()>(data(10))
                        })
                        .unwrap();
                    assert_eq!(got.len(), 10);
                });
            }
        });
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failed_load_lets_the_next_reader_retry() {
        let cache = SpanCache::new(1 << 20);
        assert_eq!(cache.get_or_load(&key(3), || Err::<SpanData, _>("boom")), Err("boom"));
        let got = cache.get_or_load(&key(3), || Ok::<_, &str>(data(5))).unwrap();
        assert_eq!(got.len(), 5);
    }
}
