//! Where a layer's compressed bytes come from. A [`LayerReader`] asks for
//! *chunks* — the units the access map can decode from and verify: a gzip
//! span's input, a zstd frame, a 4 MiB piece of a plain blob, an eStargz
//! file chunk — and does not care whether they come from the local store or
//! from a registry.
//!
//! [`LayerReader`]: super::LayerReader

use super::ChunkCheck;
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// A source of a blob's bytes, chunk by chunk.
pub trait BlobSource: Send + Sync {
    /// A reader of chunk `index`: bytes `range` of the blob, which `check`
    /// verifies. Bytes from outside the local store must have passed
    /// `check` before the reader yields any of them.
    fn open_chunk(
        &self,
        index: usize,
        range: Range<u64>,
        check: ChunkCheck<'_>,
    ) -> io::Result<Box<dyn Read + Send + '_>>;

    /// The whole blob as a local file, when there is one: plain blobs are
    /// then read directly, without chunking or caching.
    fn local_file(&self) -> Option<&File> {
        None
    }
}

/// A blob in the local store (verified when it was stored).
pub struct LocalBlob(pub File);

impl BlobSource for LocalBlob {
    fn open_chunk(
        &self,
        _index: usize,
        range: Range<u64>,
        _check: ChunkCheck<'_>,
    ) -> io::Result<Box<dyn Read + Send + '_>> {
        Ok(Box::new(FileRange { file: &self.0, pos: range.start, end: range.end }))
    }

    fn local_file(&self) -> Option<&File> {
        Some(&self.0)
    }
}

/// Sequential reads of `[pos, end)` of a file, by offset (no shared cursor).
struct FileRange<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob is shorter than its index",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}
