//! Uncompressed (plain tar) blobs. Local reads go straight to the file, but a
//! remote read must be verifiable like a gzip span or zstd frame is: the
//! indexing pass records the sha256 of every [`SPAN_SIZE`] piece of the
//! blob, and those pieces are the chunks fetched from a registry.

use super::SPAN_SIZE;
use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};
use std::ops::Range;

/// Chunk digests of a plain blob.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PlainMap {
    /// sha256 of bytes `[i * SPAN_SIZE, (i + 1) * SPAN_SIZE)` (the last one shorter).
    pub chunk_digests: Vec<Digest>,
    /// Blob size.
    pub size: u64,
}

impl PlainMap {
    /// Byte range of chunk `i`.
    pub fn chunk_range(&self, i: usize) -> Range<u64> {
        let start = (i * SPAN_SIZE) as u64;
        start..(start + SPAN_SIZE as u64).min(self.size)
    }
}

/// A reader that passes its input through and hashes it in chunks.
pub struct PlainIndexer<R> {
    source: R,
    hasher: Sha256,
    /// Bytes hashed into `hasher` so far.
    in_chunk: usize,
    map: PlainMap,
}

impl<R: Read> PlainIndexer<R> {
    /// Starts hashing `source`.
    pub fn new(source: R) -> Self {
        Self { source, hasher: Sha256::new(), in_chunk: 0, map: PlainMap::default() }
    }

    /// The map, once everything has been read, and the source.
    pub fn finish(mut self) -> (PlainMap, R) {
        if self.in_chunk > 0 {
            let hasher = std::mem::take(&mut self.hasher);
            self.map.chunk_digests.push(Digest::from_hasher(hasher));
        }
        (self.map, self.source)
    }
}

impl<R: Read> Read for PlainIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.source.read(buf)?;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let take = rest.len().min(SPAN_SIZE - self.in_chunk);
            self.hasher.update(&rest[..take]);
            self.in_chunk += take;
            rest = &rest[take..];
            if self.in_chunk == SPAN_SIZE {
                let hasher = std::mem::take(&mut self.hasher);
                self.map.chunk_digests.push(Digest::from_hasher(hasher));
                self.in_chunk = 0;
            }
        }
        self.map.size += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_hashed_at_span_boundaries_whatever_the_read_sizes() {
        let data: Vec<u8> = (0..(2 * SPAN_SIZE + 100)).map(|i| (i % 251) as u8).collect();
        let mut indexer = PlainIndexer::new(&data[..]);
        let mut buf = vec![0u8; 3333];
        while indexer.read(&mut buf).unwrap() > 0 {}
        let (map, _) = indexer.finish();
        assert_eq!(map.size, data.len() as u64);
        assert_eq!(map.chunk_digests.len(), 3);
        for (i, digest) in map.chunk_digests.iter().enumerate() {
            let range = map.chunk_range(i);
            assert_eq!(digest, &Digest::of(&data[range.start as usize..range.end as usize]));
        }
        let (empty, _) = PlainIndexer::new(&[][..]).finish();
        assert!(empty.chunk_digests.is_empty());
    }
}
