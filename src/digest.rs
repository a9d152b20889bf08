//! Content digests (`sha256:<64 hex>`), the names of every blob, and
//! readers/writers that hash what passes through them, on the caller's
//! thread or, for the long streams of the indexing pass, on one of their own.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

/// A validated `sha256:<hex>` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    /// The 64 lowercase hex characters.
    hex: String,
}

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// Only sha256 is supported.
    #[error("unsupported digest algorithm in {0:?}: only sha256 is supported")]
    Algorithm(String),
    /// Wrong length or non-hex characters.
    #[error("invalid sha256 digest {0:?}: expected 64 lowercase hex characters")]
    Hex(String),
}

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(data))
    }

    /// Finishes a hasher into a digest.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self { hex: hex::encode(hasher.finalize()) }
    }

    /// The hex part, as used in `blobs/sha256/<hex>`.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex characters, as Docker shows image ids.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(DigestError::Algorithm(s.to_string()));
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Hex(s.to_string()));
        }
        Ok(Self { hex: hex.to_string() })
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, DigestError> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// A reader that hashes and counts every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new(), count: 0 }
    }
    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// The digest and length of everything read.
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_hasher(self.hasher), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that hashes and counts every byte written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), count: 0 }
    }
    /// The digest and length of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (Digest::from_hasher(self.hasher), self.count, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes a [`HashingThread`] receives at a time: large enough that handing
/// a buffer over costs nothing next to hashing it.
const CHUNK: usize = 1 << 20;
/// Full buffers queued for a [`HashingThread`]: enough to ride out
/// scheduling hiccups, few enough to keep its memory at a few chunks.
const DEPTH: usize = 4;

/// A sink that hashes and counts what is written to it on a thread of its
/// own, so the writer's core stays free for other work: the indexing pass
/// is bound by inflating, which cannot be split, while the compressed and
/// the uncompressed stream can each be hashed on another core.
///
/// Writes are gathered into [`CHUNK`]-byte buffers that cross a bounded
/// channel, so a slow hasher throttles the writer, and come back to be
/// reused. Dropping it unfinished stops the thread.
pub struct HashingThread {
    /// The buffer being filled; sent when full.
    pending: Vec<u8>,
    full: SyncSender<Vec<u8>>,
    /// Buffers the thread has hashed, for reuse.
    empty: Receiver<Vec<u8>>,
    worker: JoinHandle<Sha256>,
    count: u64,
}

impl HashingThread {
    /// Starts the thread.
    pub fn spawn() -> io::Result<Self> {
        let (full, to_hash) = mpsc::sync_channel::<Vec<u8>>(DEPTH);
        let (hashed, empty) = mpsc::channel();
        let worker = thread::Builder::new().name("sha256".into()).spawn(move || {
            let mut hasher = Sha256::new();
            for mut chunk in to_hash {
                hasher.update(&chunk);
                chunk.clear();
                // Fails only once the writer is gone; the buffer is freed then.
                let _ = hashed.send(chunk);
            }
            hasher
        })?;
        Ok(Self { pending: Vec::with_capacity(CHUNK), full, empty, worker, count: 0 })
    }

    fn send_pending(&mut self) -> io::Result<()> {
        let next = self.empty.try_recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let chunk = std::mem::replace(&mut self.pending, next);
        self.full.send(chunk).map_err(|_| io::Error::other("the hashing thread stopped"))
    }

    /// The digest and length of everything written.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        if !self.pending.is_empty() {
            self.send_pending()?;
        }
        let Self { full, worker, count, .. } = self;
        drop(full);
        let hasher = worker.join().map_err(|_| io::Error::other("the hashing thread panicked"))?;
        Ok((Digest::from_hasher(hasher), count))
    }
}

impl Write for HashingThread {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        self.count += n as u64;
        if self.pending.len() == CHUNK {
            self.send_pending()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that passes bytes through while a [`HashingThread`] hashes them.
pub struct ThreadHashingReader<R> {
    inner: R,
    hasher: HashingThread,
}

impl<R: Read> ThreadHashingReader<R> {
    /// Wraps `inner`, starting the hashing thread.
    pub fn new(inner: R) -> io::Result<Self> {
        Ok(Self { inner, hasher: HashingThread::spawn()? })
    }
    /// The digest and length of everything read.
    pub fn finish(self) -> io::Result<(Digest, u64)> {
        self.hasher.finish()
    }
}

impl<R: Read> Read for ThreadHashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(d.short(), "e3b0c44298fc");
    }

    #[test]
    fn rejects_bad_digests() {
        assert!(matches!("md5:abc".parse::<Digest>(), Err(DigestError::Algorithm(_))));
        assert!(matches!("sha256:abc".parse::<Digest>(), Err(DigestError::Hex(_))));
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(matches!(upper.parse::<Digest>(), Err(DigestError::Hex(_))));
    }

    #[test]
    fn hashing_reader_matches_of() {
        let mut r = HashingReader::new(&b"hello"[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(r.finish(), (Digest::of(b"hello"), 5));
    }

    #[test]
    fn hashing_thread_matches_of_across_chunk_boundaries() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, (DEPTH + 3) * CHUNK] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut r = ThreadHashingReader::new(&data[..]).unwrap();
            let mut buf = vec![0u8; 300_000];
            while r.read(&mut buf).unwrap() > 0 {}
            assert_eq!(r.finish().unwrap(), (Digest::of(&data), len as u64), "length {len}");
        }
    }
}
