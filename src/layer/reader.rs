//! [`LayerReader`]: reads of the uncompressed tar stream served from the
//! compressed blob through its access map and the shared span cache.

use super::estargz::EstargzMap;
use super::source::{BlobSource, LocalBlob};
use super::zstd::{ZstdMap, ZstdSpan};
use super::{
    build_index, corrupt_reason, load_index, save_index, AccessMap, LayerError, LayerIndex,
};
use crate::cache::{SpanCache, SpanData, SpanKey};
use crate::digest::Digest;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Spans a sequential reader of a remote blob keeps in flight.
const REMOTE_READ_AHEAD: usize = 3;

/// Random access to the uncompressed tar stream of one layer blob.
///
/// Shared between threads (`&self` reads); holds the index. Clones are
/// cheap and share everything (a read-ahead runs on a clone).
#[derive(Clone)]
pub struct LayerReader {
    index: Arc<LayerIndex>,
    source: Arc<dyn BlobSource>,
    digest: Arc<Digest>,
    cache: Arc<SpanCache>,
    /// Uncompressed start of each span.
    span_starts: Arc<[u64]>,
    /// zstd only: the frame of each span.
    zstd_spans: Arc<[ZstdSpan]>,
    /// Read-aheads running on this layer (one locally, up to `REMOTE_READ_AHEAD` remotely).
    reading_ahead: Arc<AtomicUsize>,
}

impl LayerReader {
    /// Opens the layer blob at `blob_path`: loads its index from `index_dir`
    /// (keyed by `blob_digest`) or builds it with one pass over the blob
    /// (verifying the blob digest) and persists it there. Decompressed spans
    /// are kept in the shared `cache`.
    pub fn open(
        blob_path: &Path,
        blob_digest: &Digest,
        index_dir: &Path,
        cache: Arc<SpanCache>,
    ) -> Result<Self, LayerError> {
        let io_err = |source| LayerError::Io { digest: blob_digest.clone(), source };
        let blob = File::open(blob_path).map_err(io_err)?;
        let index = match load_index(index_dir, blob_digest) {
            Some(index) => index,
            None => {
                let index = build_index(&blob, blob_digest)?;
                if let Err(e) = save_index(index_dir, &index) {
                    tracing::warn!(layer = %blob_digest, "could not persist the layer index: {e}");
                }
                index
            }
        };
        Ok(Self::with_index(Arc::new(index), Arc::new(LocalBlob(blob)), cache))
    }

    /// A reader of the blob behind `source`, described by `index`.
    pub fn with_index(
        index: Arc<LayerIndex>,
        source: Arc<dyn BlobSource>,
        cache: Arc<SpanCache>,
    ) -> Self {
        let (span_starts, zstd_spans) = match &index.access {
            AccessMap::Plain(map) => {
                let starts = (0..map.chunk_digests.len()).map(|i| map.chunk_range(i).start);
                (starts.collect::<Vec<u64>>(), Vec::new())
            }
            AccessMap::Gzip(map) => {
                ((0..map.span_count()).map(|i| map.span_start(i)).collect(), Vec::new())
            }
            AccessMap::Zstd(map) => {
                let spans = map.spans();
                (spans.iter().map(|s| s.out_start).collect(), spans)
            }
            AccessMap::Estargz(map) => {
                (map.chunks.iter().map(|c| c.out_offset).collect(), Vec::new())
            }
        };
        let digest = Arc::new(index.blob_digest.clone());
        Self {
            index,
            source,
            digest,
            cache,
            span_starts: span_starts.into(),
            zstd_spans: zstd_spans.into(),
            reading_ahead: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The layer's index.
    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// Reads up to `buf.len()` bytes of the uncompressed tar stream at
    /// `offset`; returns fewer only at the end of the stream.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, LayerError> {
        let size = self.index.uncompressed_size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let len = buf.len().min((size - offset) as usize);
        if let Some(file) = self.direct_file() {
            file.read_exact_at(&mut buf[..len], offset).map_err(|e| self.error(e))?;
            return Ok(len);
        }
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let span = self.span_starts.partition_point(|&start| start <= pos) - 1;
            let data = self.span(span)?;
            let within = (pos - self.span_starts[span]) as usize;
            let n = (len - done).min(data.len().saturating_sub(within));
            if n == 0 {
                return Err(self.error(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "span shorter than its index says",
                )));
            }
            buf[done..done + n].copy_from_slice(&data[within..within + n]);
            done += n;
            if within + n > data.len() / 2 {
                self.read_ahead(span + 1);
            }
        }
        Ok(len)
    }

    /// A plain blob in a local file is read directly, bypassing spans.
    fn direct_file(&self) -> Option<&File> {
        match self.index.access {
            AccessMap::Plain(_) => self.source.local_file(),
            _ => None,
        }
    }

    /// Loads span `i` in the background when a read has gone past the
    /// middle of the span before it: a sequential reader then finds it
    /// ready, and the inflating (or fetching, for a remote blob) runs
    /// meanwhile. Locally one read-ahead per layer runs at a time, so random
    /// reads cannot pile them up. A remote blob whose reads have been
    /// sequential (the span before was read too) keeps up to
    /// [`REMOTE_READ_AHEAD`] spans in flight, so a large file streams at the
    /// bandwidth of several requests instead of one round trip per span.
    fn read_ahead(&self, i: usize) {
        let remote = self.source.local_file().is_none();
        if !(remote || matches!(self.index.access, AccessMap::Gzip(_))) {
            return;
        }
        let sequential = i >= 2 && self.cache.has(&self.key(i - 2));
        let depth = if remote && sequential { REMOTE_READ_AHEAD } else { 1 };
        for next in i..(i + depth).min(self.span_starts.len()) {
            if self.cache.has(&self.key(next)) {
                continue;
            }
            // Take a read-ahead slot, or stop: enough are running.
            let taken = self.reading_ahead.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < depth).then_some(n + 1)
            });
            if taken.is_err() {
                return;
            }
            let reader = self.clone();
            std::thread::spawn(move || {
                if let Err(e) = reader.span(next) {
                    tracing::debug!("read-ahead of span {next}: {e}");
                }
                reader.reading_ahead.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    /// Can `len` bytes at `offset` be read without decompressing anything
    /// (plain blob, or every span under them cached)?
    pub fn is_ready(&self, offset: u64, len: u64) -> bool {
        let size = self.index.uncompressed_size;
        if self.direct_file().is_some() || offset >= size || len == 0 {
            return true;
        }
        let span_of = |pos: u64| self.span_starts.partition_point(|&start| start <= pos) - 1;
        let (first, last) = (span_of(offset), span_of((offset + len).min(size) - 1));
        (first..=last).all(|i| self.cache.is_cached(&self.key(i)))
    }

    /// Loads the spans under `offset..offset + len` of the tar stream into
    /// the cache on up to `threads` threads: one inflater runs at a few
    /// hundred MB/s, and a remote chunk takes a round trip, so a large copy
    /// is bound by them otherwise. (Local zstd frames and plain blobs gain
    /// nothing from this; they return.)
    pub fn prefetch(&self, offset: u64, len: u64, threads: usize) -> Result<(), LayerError> {
        let size = self.index.uncompressed_size;
        let remote = self.source.local_file().is_none();
        let worth_it = remote || matches!(self.index.access, AccessMap::Gzip(_));
        if !worth_it || offset >= size || len == 0 {
            return Ok(());
        }
        let span_of = |pos: u64| self.span_starts.partition_point(|&start| start <= pos) - 1;
        let (first, last) = (span_of(offset), span_of((offset + len).min(size) - 1));
        let next = std::sync::atomic::AtomicUsize::new(first);
        let take = || next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.clamp(1, last - first + 1))
                .map(|_| {
                    s.spawn(|| {
                        let mut i = take();
                        while i <= last {
                            self.span(i)?;
                            i = take();
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    fn span_len(&self, i: usize) -> usize {
        let end = self.span_starts.get(i + 1).copied().unwrap_or(self.index.uncompressed_size);
        (end - self.span_starts[i]) as usize
    }

    fn key(&self, span: usize) -> SpanKey {
        SpanKey { blob: self.digest.clone(), span: span as u32 }
    }

    fn span(&self, i: usize) -> Result<SpanData, LayerError> {
        self.cache.get_or_load(&self.key(i), || {
            let data = match &self.index.access {
                AccessMap::Plain(_) => self.chunk_bytes(i)?,
                AccessMap::Gzip(map) => {
                    let input = self.chunk_bytes(i)?;
                    map.decode_span(&input, i, self.span_len(i)).map_err(|e| self.error(e))?
                }
                AccessMap::Zstd(map) => self.decode_zstd(map, i)?,
                AccessMap::Estargz(map) => self.decode_estargz(map, i)?,
            };
            Ok(Arc::new(data))
        })
    }

    /// The verified bytes of chunk `i` from the source.
    fn chunk_bytes(&self, i: usize) -> Result<Vec<u8>, LayerError> {
        let (range, digest) = self.index.access.chunk(i);
        let len = (range.end - range.start) as usize;
        let mut data = Vec::with_capacity(len);
        self.source
            .open_chunk(i, range, digest)
            .and_then(|mut chunk| chunk.read_to_end(&mut data))
            .map_err(|e| self.error(e))?;
        if data.len() != len {
            return Err(self.error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("chunk {i} has {} bytes, the index says {len}", data.len()),
            )));
        }
        Ok(data)
    }

    fn decode_zstd(&self, map: &ZstdMap, target: usize) -> Result<Vec<u8>, LayerError> {
        let frame = self.zstd_spans[target].frame;
        let (range, digest) = self.index.access.chunk(frame);
        let mut input = self.source.open_chunk(frame, range, digest).map_err(|e| self.error(e))?;
        let mut wanted = None;
        map.decode_span(&mut input, &self.zstd_spans, target, &mut |i, data| {
            if i == target {
                wanted = Some(data);
            } else {
                self.cache.insert(self.key(i), Arc::new(data));
            }
        })
        .map_err(|e| self.error(e))?;
        wanted.ok_or_else(|| self.error(io::Error::other("zstd span was not decoded")))
    }

    /// eStargz: span `i` is chunk `i`, whose data is found (and verified)
    /// in its inflated gzip member.
    fn decode_estargz(&self, map: &EstargzMap, i: usize) -> Result<Vec<u8>, LayerError> {
        let input = self.chunk_bytes(i)?;
        map.chunks[i].decode(&input).map_err(|e| self.error(e))
    }

    fn error(&self, source: io::Error) -> LayerError {
        let digest = self.index.blob_digest.clone();
        match corrupt_reason(&source) {
            Some(reason) => LayerError::Corrupt { digest, reason },
            None => LayerError::Io { digest, source },
        }
    }
}
