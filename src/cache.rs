//! The bounded in-memory LRU of decompressed spans, shared by every file of a
//! mount (and later by every mount of the daemon). Single-flight: one
//! decompression per span however many readers wait for it.

/// LRU of decompressed spans, bounded by bytes. (Layer helper: implement.)
pub struct SpanCache {
    max_bytes: u64,
}

impl SpanCache {
    /// A cache holding at most `max_bytes` of decompressed data.
    pub fn new(max_bytes: u64) -> Self {
        Self { max_bytes }
    }

    /// The configured bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}
