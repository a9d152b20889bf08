//! The layer blob: tar → (diff_id hash) → compressor → (digest hash) →
//! store, one streaming pass. gzip runs on every core ([`super::pgzip`]),
//! with a fixed header and an output independent of the thread count, so
//! the blob is as reproducible as the tar.

use super::pgzip::ParallelGzip;
use super::plan::Plan;
use super::tar::write_tar;
use super::CommitError;
use crate::digest::{Digest, HashingWriter};
use crate::fs::ImageFs;
use crate::store::{BlobWriter, Store};
use crate::sys::upper::Dir;
use std::io::{self, Write};

/// How the layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip, level 0–9.
    Gzip(u32),
    /// zstd, level 1–22.
    Zstd(i32),
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip(_) => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd(_) => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// A stored layer blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayer {
    /// Digest of the blob (compressed).
    pub digest: Digest,
    /// Size of the blob.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
    /// Its media type.
    pub media_type: &'static str,
}

enum Compressor {
    None(BlobWriter),
    Gzip(ParallelGzip<BlobWriter>),
    Zstd(zstd::stream::write::Encoder<'static, BlobWriter>),
}

impl Compressor {
    fn new(blob: BlobWriter, how: Compression) -> io::Result<Self> {
        Ok(match how {
            Compression::None => Compressor::None(blob),
            Compression::Gzip(level) => Compressor::Gzip(ParallelGzip::new(blob, level, threads())),
            Compression::Zstd(level) => {
                let mut encoder = zstd::stream::write::Encoder::new(blob, level)?;
                // With one or more workers the output is the same for any
                // number of them (zstd's guarantee), so it stays reproducible.
                encoder.multithread(threads() as u32)?;
                Compressor::Zstd(encoder)
            }
        })
    }

    fn finish(self) -> io::Result<BlobWriter> {
        match self {
            Compressor::None(b) => Ok(b),
            Compressor::Gzip(e) => e.finish(),
            Compressor::Zstd(e) => e.finish(),
        }
    }
}

impl Write for Compressor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Gzip(w) => w.write(buf),
            Compressor::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Gzip(w) => w.flush(),
            Compressor::Zstd(w) => w.flush(),
        }
    }
}

/// Compression threads: one per core.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Streams `plan` as a layer blob into `store`.
pub fn write_layer(
    store: &Store,
    plan: &Plan,
    upper: Option<&Dir>,
    lower: &ImageFs,
    how: Compression,
) -> Result<WrittenLayer, CommitError> {
    let blob = store.blob_writer()?;
    let compressor = Compressor::new(blob, how).map_err(CommitError::Write)?;
    let mut tar = HashingWriter::new(io::BufWriter::with_capacity(1 << 20, compressor));
    write_tar(plan, upper, lower, &mut tar).map_err(CommitError::Write)?;
    let (diff_id, tar_size, buffered) = tar.finish();
    let compressor = buffered.into_inner().map_err(|e| CommitError::Write(e.into_error()))?;
    let blob = compressor.finish().map_err(CommitError::Write)?;
    let (digest, size) = blob.finish()?;
    Ok(WrittenLayer { digest, size, diff_id, tar_size, media_type: how.media_type() })
}

#[cfg(test)]
mod tests {
    #[test]
    fn zstd_output_does_not_depend_on_workers() {
        let data: Vec<u8> = (0..24_000_000u32).map(|i| (i % 251) as u8 ^ (i >> 13) as u8).collect();
        let compress = |workers| {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            e.multithread(workers).unwrap();
            std::io::Write::write_all(&mut e, &data).unwrap();
            e.finish().unwrap()
        };
        let one = compress(1);
        assert_eq!(compress(2), one);
        assert_eq!(compress(4), one);
        assert_eq!(zstd::decode_all(&one[..]).unwrap(), data);
    }
}
