//! The indexing pass: one streaming read of a layer blob that verifies its
//! digest, detects the compression from magic bytes, records the random
//! access map, hashes the uncompressed stream (the diff_id) and scans the tar.
//!
//! Inflating bounds the pass and cannot be split, so it keeps the caller's
//! thread; the blob digest and the diff_id are each computed on a thread of
//! their own ([`ThreadHashingReader`]), which lets a second core take over
//! two of the three sha256 passes (the third, per span, is the indexer's).

use super::gzip::GzipIndexer;
use super::plain::PlainIndexer;
use super::scan::scan_tar;
use super::zstd::ZstdIndexer;
use super::{corrupt_reason, AccessMap, Compression, LayerError, LayerIndex};
use crate::digest::{Digest, ThreadHashingReader};
use std::io::{self, BufRead, BufReader, Read};

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Indexes the blob read from `blob`, which must hash to `digest`.
pub fn build_index(blob: impl Read, digest: &Digest) -> Result<LayerIndex, LayerError> {
    let io_err = |source: io::Error| LayerError::Io { digest: digest.clone(), source };
    let stream_err = |source: io::Error| match corrupt_reason(&source) {
        Some(reason) => LayerError::Corrupt { digest: digest.clone(), reason },
        None => io_err(source),
    };
    // The indexers read 256 KiB at a time, which the BufReader passes
    // straight through once the magic bytes are consumed.
    let blob = ThreadHashingReader::new(blob).map_err(io_err)?;
    let mut compressed = BufReader::with_capacity(256 * 1024, blob);
    let magic = compressed.fill_buf().map_err(io_err)?;
    let compression = if magic.starts_with(GZIP_MAGIC) {
        Compression::Gzip
    } else if magic.starts_with(ZSTD_MAGIC) {
        Compression::Zstd
    } else {
        Compression::None
    };
    let scan = |stream: &mut dyn Read| -> Result<_, LayerError> {
        let mut uncompressed = ThreadHashingReader::new(stream).map_err(io_err)?;
        let entries =
            scan_tar(&mut uncompressed).map_err(|source| match corrupt_reason(&source) {
                Some(reason) => LayerError::Corrupt { digest: digest.clone(), reason },
                None => LayerError::Tar { digest: digest.clone(), source },
            })?;
        // The tar may end before the stream does (padding): hash all of it.
        io::copy(&mut uncompressed, &mut io::sink()).map_err(&stream_err)?;
        Ok((entries, uncompressed.finish().map_err(io_err)?))
    };
    let (entries, (diff_id, uncompressed_size), access, mut rest) = match compression {
        Compression::None => {
            let mut indexer = PlainIndexer::new(compressed);
            let (entries, diff) = scan(&mut indexer)?;
            let (map, rest) = indexer.finish();
            (entries, diff, AccessMap::Plain(map), rest)
        }
        Compression::Gzip => {
            let mut indexer = GzipIndexer::new(compressed).map_err(io_err)?;
            let (entries, diff) = scan(&mut indexer)?;
            let (map, rest) = indexer.finish();
            (entries, diff, AccessMap::Gzip(map), rest)
        }
        Compression::Zstd => {
            let mut indexer = ZstdIndexer::new(compressed).map_err(io_err)?;
            let (entries, diff) = scan(&mut indexer)?;
            let (map, rest) = indexer.finish();
            (entries, diff, AccessMap::Zstd(map), rest)
        }
    };
    io::copy(&mut rest, &mut io::sink()).map_err(stream_err)?;
    let (actual, _) = rest.into_inner().finish().map_err(io_err)?;
    if &actual != digest {
        return Err(LayerError::DigestMismatch { expected: digest.clone(), actual });
    }
    Ok(LayerIndex {
        blob_digest: digest.clone(),
        diff_id,
        compression,
        uncompressed_size,
        entries,
        access,
    })
}
