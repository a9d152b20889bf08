//! A layer blob that stays in the registry: each chunk a read needs comes
//! from the disk tier of the chunk cache, or else from one `Range` request,
//! and is verified against its digest in the layer index before anyone sees
//! a byte of it (for eStargz chunks: the digest of the bytes it inflates to,
//! see [`ChunkCheck`]). A fetch that fails keeps retrying until the fetch timeout
//! (the registry may be restarting), then fails the read with `EIO`; the
//! mount stays up and later reads try again. Bytes that do not match their
//! digest are fetched once more (in case the damage happened in transit)
//! and then refused, with a log line naming the layer and chunk.

use super::source::BlobSource;
use super::ChunkCheck;
use crate::cache::DiskCache;
use crate::digest::Digest;
use crate::registry::Repository;
use std::io::{self, Read};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many fetch latencies [`FetchStats`] keeps for its percentiles.
const LATENCY_SAMPLES: usize = 4096;

/// Counters of one remote layer, for `rmount stats`.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Compressed bytes fetched from the registry.
    pub fetched_bytes: AtomicU64,
    /// Range requests that delivered a verified chunk.
    pub fetches: AtomicU64,
    /// Chunks served from the disk tier.
    pub disk_hits: AtomicU64,
    /// Chunks that had to be fetched (or failed to be).
    pub misses: AtomicU64,
    /// Chunks refused because they did not match their digest.
    pub corrupt: AtomicU64,
    /// The latest fetch latencies in milliseconds (a ring).
    latencies_ms: Mutex<Vec<u32>>,
    next_sample: AtomicU64,
}

impl FetchStats {
    fn record_latency(&self, latency: Duration) {
        let ms = latency.as_millis().min(u128::from(u32::MAX)) as u32;
        let slot = self.next_sample.fetch_add(1, Ordering::Relaxed) as usize % LATENCY_SAMPLES;
        let mut samples = self.latencies_ms.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < LATENCY_SAMPLES {
            samples.push(ms);
        } else {
            samples[slot] = ms;
        }
    }

    /// The recorded latencies (milliseconds), for percentiles.
    pub fn latencies_ms(&self) -> Vec<u32> {
        self.latencies_ms.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A blob read chunk by chunk from a registry.
pub struct RemoteBlob {
    repository: Repository,
    digest: Digest,
    disk: Option<Arc<DiskCache>>,
    fetch_timeout: Duration,
    stats: Arc<FetchStats>,
}

impl RemoteBlob {
    /// Blob `digest` of `repository`, with verified chunks kept in `disk`.
    pub fn new(
        repository: Repository,
        digest: Digest,
        disk: Option<Arc<DiskCache>>,
        fetch_timeout: Duration,
    ) -> Self {
        Self { repository, digest, disk, fetch_timeout, stats: Arc::default() }
    }

    /// The counters of this blob.
    pub fn stats(&self) -> Arc<FetchStats> {
        self.stats.clone()
    }

    /// Whether chunk `index` is on disk (no network needed).
    pub fn has_chunk(&self, index: usize) -> bool {
        self.disk.as_ref().is_some_and(|d| d.contains(&self.digest, index as u32))
    }

    /// The verified bytes of chunk `index`: from disk, or fetched and kept.
    pub fn chunk(
        &self,
        index: usize,
        range: Range<u64>,
        check: ChunkCheck<'_>,
    ) -> io::Result<Vec<u8>> {
        let verify = |data: &[u8]| check.verify(data);
        if let Some(data) =
            self.disk.as_ref().and_then(|d| d.get_checked(&self.digest, index as u32, &verify))
        {
            self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(data);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let data = self.fetch(index, range, check)?;
        if let Some(disk) = &self.disk {
            disk.put(&self.digest, index as u32, &data);
        }
        Ok(data)
    }

    fn fetch(&self, index: usize, range: Range<u64>, check: ChunkCheck<'_>) -> io::Result<Vec<u8>> {
        let started = Instant::now();
        let deadline = started + self.fetch_timeout;
        let mut mismatches = 0;
        loop {
            let error = match self.repository.read_range(
                &self.digest,
                range.start,
                range.end - range.start,
            ) {
                Ok(data) => {
                    let verified = check.verify(&data);
                    if let Ok(()) = verified {
                        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                        self.stats.fetched_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        self.stats.record_latency(started.elapsed());
                        return Ok(data);
                    }
                    mismatches += 1;
                    let actual = verified.err().unwrap_or_default();
                    tracing::error!(
                        layer = %self.digest, chunk = index, expected = %check.digest(), %actual,
                        "chunk from {} does not match its digest in the layer index{}",
                        self.repository.full_name(),
                        if mismatches < 2 { "; fetching it again" } else { "; refusing it (EIO)" }
                    );
                    if mismatches >= 2 {
                        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "chunk {index} of layer {} does not match its digest: the registry's copy is corrupt",
                                self.digest
                            ),
                        ));
                    }
                    continue;
                }
                Err(e) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                tracing::error!(layer = %self.digest, chunk = index, error = %error, "giving up on the read after {:?}", self.fetch_timeout);
                return Err(io::Error::other(format!(
                    "chunk {index} of layer {}: {error} (gave up after {:?})",
                    self.digest, self.fetch_timeout
                )));
            }
            tracing::warn!(layer = %self.digest, chunk = index, error = %error, "fetch failed; retrying");
            std::thread::sleep((deadline - now).min(Duration::from_secs(1)));
        }
    }
}

impl BlobSource for RemoteBlob {
    fn open_chunk(
        &self,
        index: usize,
        range: Range<u64>,
        check: ChunkCheck<'_>,
    ) -> io::Result<Box<dyn Read + Send + '_>> {
        Ok(Box::new(io::Cursor::new(self.chunk(index, range, check)?)))
    }
}
