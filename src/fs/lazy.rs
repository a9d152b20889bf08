//! The remote side of a lazy mount: layers whose blob is not in the store
//! are read from the registry through [`RemoteBlob`]s. This module opens
//! them, prefetches their chunks in the background when asked, and keeps
//! the statistics file `rmount stats` reads (rewritten about once a second
//! while something changes).

use super::record::{PrefetchList, RecordedFile};
use super::union::EntryRef;
use crate::cache::DiskCache;
use crate::digest::Digest;
use crate::layer::{EntryKind, FetchStats, LayerIndex, LayerReader, RemoteBlob};
use crate::registry::Client;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What a lazy mount needs to reach the registry.
#[derive(Clone)]
pub struct RemoteOptions {
    /// The registry client (credentials, mirrors, retries).
    pub client: Client,
    /// The disk tier of the chunk cache (`None`: memory only).
    pub disk: Option<Arc<DiskCache>>,
    /// How long a read keeps retrying a failed fetch before `EIO`.
    pub fetch_timeout: Duration,
    /// What to fetch in the background after mounting.
    pub prefetch: Prefetch,
    /// Bytes per second the prefetch may use (`None`: unlimited).
    pub prefetch_rate: Option<u64>,
}

/// What a lazy mount fetches before it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefetch {
    /// Only what is read.
    None,
    /// Every chunk, in the background.
    All,
    /// The chunks of these files first, in parallel.
    Recorded(PrefetchList),
}

/// The disk tier's default bound (`--cache-size`).
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;

/// The default fetch timeout (`--fetch-timeout`).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the disk tier of the chunk cache lives under the state directory.
pub fn chunk_cache_dir(root: &Path) -> PathBuf {
    root.join("cache/chunks")
}

/// Opens the disk tier, or warns and goes without it.
pub fn open_disk_cache(root: &Path, max_bytes: u64) -> Option<Arc<DiskCache>> {
    if max_bytes == 0 {
        return None;
    }
    let dir = chunk_cache_dir(root);
    match DiskCache::open(&dir, max_bytes) {
        Ok(cache) => Some(Arc::new(cache)),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "no disk cache; chunks are kept in memory only");
            None
        }
    }
}

impl RemoteOptions {
    /// The defaults, for reading a lazily pulled image outside a mount
    /// (commit, export): the user's registry configuration and the state
    /// directory's disk cache.
    pub fn defaults(root: &Path) -> Result<Self, crate::registry::RegistryError> {
        Ok(Self {
            client: Client::new(crate::registry::ClientOptions::default())?,
            disk: open_disk_cache(root, DEFAULT_CACHE_SIZE),
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            prefetch: Prefetch::None,
            prefetch_rate: None,
        })
    }
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("disk", &self.disk.as_ref().map(|d| d.max_bytes()))
            .field("fetch_timeout", &self.fetch_timeout)
            .field("prefetch", &std::mem::discriminant(&self.prefetch))
            .finish_non_exhaustive()
    }
}

/// One layer of a mount, as the statistics see it.
pub struct LayerSource {
    /// The blob.
    pub digest: Digest,
    /// Compressed size.
    pub size: u64,
    /// The chunks' byte ranges and digests.
    pub index: Arc<LayerIndex>,
    /// `None` for a layer read from the store.
    pub remote: Option<Arc<RemoteBlob>>,
    /// The layer's reader (shares the mount's span cache).
    pub reader: LayerReader,
    /// Tells the [`super::mount::LayerPool`] this layer is in use.
    pub in_use: Arc<super::mount::PooledLayer>,
}

impl LayerSource {
    /// Names an entry a [`super::record::Recorder`] saw.
    pub fn recorded_file(layers: &[LayerSource], entry: EntryRef) -> Option<RecordedFile> {
        let layer = layers.get(entry.layer as usize)?;
        let path = layer.index.entries.get(entry.entry as usize)?.path.to_string();
        Some(RecordedFile { layer: layer.digest.clone(), path })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LayerStats {
    digest: String,
    size: u64,
    remote: bool,
    chunks: usize,
    chunks_cached: usize,
    fetched_bytes: u64,
    fetched_percent: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Latency {
    p50: u32,
    p90: u32,
    p99: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MountStats {
    mountpoint: PathBuf,
    reference: String,
    fetched_bytes: u64,
    fetches: u64,
    cache_hits: u64,
    cache_misses: u64,
    corrupt_chunks: u64,
    fetch_latency_ms: Latency,
    fetched_percent: f64,
    layers: Vec<LayerStats>,
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        (part as f64 * 1000.0 / whole as f64).round() / 10.0
    }
}

fn percentile(sorted: &[u32], p: usize) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// The statistics `rmount stats` shows (the same JSON as the file
/// [`keep_stats`] writes), taken now.
pub fn stats_now(reference: &str, mountpoint: &Path, layers: &[LayerSource]) -> serde_json::Value {
    serde_json::to_value(snapshot(reference, mountpoint, layers)).unwrap_or_default()
}

fn snapshot(reference: &str, mountpoint: &Path, layers: &[LayerSource]) -> MountStats {
    let counter = |f: fn(&FetchStats) -> u64| -> u64 {
        layers.iter().filter_map(|l| l.remote.as_ref()).map(|r| f(&r.stats())).sum()
    };
    let mut latencies: Vec<u32> = layers
        .iter()
        .filter_map(|l| l.remote.as_ref())
        .flat_map(|r| r.stats().latencies_ms())
        .collect();
    latencies.sort_unstable();
    let (mut cached_bytes, mut total_bytes) = (0u64, 0u64);
    let layer_stats = layers
        .iter()
        .map(|layer| {
            let chunks = layer.index.access.chunk_count();
            let (mut cached, mut cached_size) = (0, 0);
            for i in 0..chunks {
                let (range, _) = layer.index.access.chunk(i);
                if layer.remote.as_ref().is_none_or(|r| r.has_chunk(i)) {
                    cached += 1;
                    cached_size += range.end - range.start;
                }
            }
            let size = layer.size.max(cached_size);
            cached_bytes += cached_size;
            total_bytes += size;
            LayerStats {
                digest: layer.digest.to_string(),
                size: layer.size,
                remote: layer.remote.is_some(),
                chunks,
                chunks_cached: cached,
                fetched_bytes: layer
                    .remote
                    .as_ref()
                    .map_or(0, |r| r.stats().fetched_bytes.load(Ordering::Relaxed)),
                fetched_percent: percent(cached_size, size),
            }
        })
        .collect();
    MountStats {
        mountpoint: mountpoint.to_path_buf(),
        reference: reference.to_string(),
        fetched_bytes: counter(|s| s.fetched_bytes.load(Ordering::Relaxed)),
        fetches: counter(|s| s.fetches.load(Ordering::Relaxed)),
        cache_hits: counter(|s| s.disk_hits.load(Ordering::Relaxed)),
        cache_misses: counter(|s| s.misses.load(Ordering::Relaxed)),
        corrupt_chunks: counter(|s| s.corrupt.load(Ordering::Relaxed)),
        fetch_latency_ms: Latency {
            p50: percentile(&latencies, 50),
            p90: percentile(&latencies, 90),
            p99: percentile(&latencies, 99),
        },
        fetched_percent: percent(cached_bytes, total_bytes),
        layers: layer_stats,
    }
}

/// Writes the statistics of `layers` to `path` now and then about once a
/// second whenever they changed, on a thread that lives as long as the
/// mount (as long as someone holds `layers`).
pub fn keep_stats(
    path: PathBuf,
    reference: String,
    mountpoint: PathBuf,
    layers: std::sync::Weak<Vec<LayerSource>>,
) {
    std::thread::spawn(move || {
        let mut last = String::new();
        let mut last_activity = None;
        while let Some(layers) = layers.upgrade() {
            // Recount cached chunks (a stat per chunk) only when a counter moved.
            let activity: u64 = layers
                .iter()
                .filter_map(|l| l.remote.as_ref())
                .map(|r| {
                    let s = r.stats();
                    [&s.misses, &s.disk_hits, &s.fetches, &s.corrupt]
                        .iter()
                        .map(|c| c.load(Ordering::Relaxed))
                        .sum::<u64>()
                })
                .sum();
            if last_activity == Some(activity) {
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            last_activity = Some(activity);
            let stats = snapshot(&reference, &mountpoint, &layers);
            if let Ok(json) = serde_json::to_string_pretty(&stats) {
                if json != last {
                    if let Err(e) = crate::durable::write_atomic(&path, json.as_bytes()) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot write mount statistics");
                    }
                    last = json;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

/// Fetches every chunk of the remote layers that is not on disk yet, one at
/// a time on a background thread (on-demand reads run beside it on their
/// own threads), at most `rate` bytes per second.
pub fn prefetch(layers: Arc<Vec<LayerSource>>, rate: Option<u64>) {
    std::thread::spawn(move || {
        for layer in layers.iter() {
            let Some(remote) = &layer.remote else { continue };
            for i in 0..layer.index.access.chunk_count() {
                if remote.has_chunk(i) {
                    continue;
                }
                let (range, digest) = layer.index.access.chunk(i);
                let started = std::time::Instant::now();
                let len = range.end - range.start;
                if let Err(e) = remote.chunk(i, range, digest) {
                    tracing::warn!(layer = %layer.digest, chunk = i, error = %e, "prefetch failed");
                }
                if let Some(rate) = rate.filter(|r| *r > 0) {
                    let budget = Duration::from_secs_f64(len as f64 / rate as f64);
                    if let Some(rest) = budget.checked_sub(started.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            }
        }
        tracing::info!("prefetch done");
    });
}

/// Threads that fetch a recorded list's chunks.
const RECORDED_PREFETCH_THREADS: usize = 4;

/// Loads the data of the files in `list` (those of this image's layers) on a
/// few background threads, in list order, so the workload that was
/// recorded finds its chunks ready.
pub fn prefetch_recorded(layers: Arc<Vec<LayerSource>>, list: PrefetchList) {
    std::thread::spawn(move || {
        // (layer, path) → position in the list, which is the fetch order.
        let rank: std::collections::HashMap<(&Digest, &str), usize> =
            list.files.iter().enumerate().map(|(i, f)| ((&f.layer, f.path.as_str()), i)).collect();
        let mut work = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            for entry in &layer.index.entries {
                let (Some(&rank), EntryKind::File { offset, size }) =
                    (rank.get(&(&layer.digest, &*entry.path)), &entry.kind)
                else {
                    continue;
                };
                work.push((rank, i, *offset, *size));
            }
        }
        work.sort_unstable();
        let queue = std::sync::Mutex::new(work.into_iter());
        std::thread::scope(|s| {
            for _ in 0..RECORDED_PREFETCH_THREADS {
                s.spawn(|| loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((_, layer, offset, size)) = next else { break };
                    if let Err(e) = layers[layer].reader.prefetch(offset, size, 1) {
                        tracing::warn!(layer = %layers[layer].digest, error = %e, "recorded prefetch failed");
                    }
                });
            }
        });
        tracing::info!(files = list.files.len(), "recorded prefetch done");
    });
}
