//! Blobs whose digest is known only once written (a commit's layer): a
//! temp file in `blobs/sha256/`, hashed while written, renamed to its
//! digest on [`BlobWriter::finish`]. A crash leaves a `.tmp-*` file, which
//! `prune` removes; dropping the writer unfinished removes it at once.

use super::{io_err, Store, StoreError};
use crate::digest::{Digest, HashingWriter};
use crate::durable::AtomicFile;
use std::io::{self, BufWriter, Write};

/// A new blob being written; see the module doc.
pub struct BlobWriter {
    inner: HashingWriter<BufWriter<AtomicFile>>,
    store_blobs: std::path::PathBuf,
}

impl Store {
    /// Starts a blob whose digest is computed from what is written.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let dir = self.root().join("blobs/sha256");
        let file = AtomicFile::create(&dir.join("new")).map_err(io_err(&dir))?;
        Ok(BlobWriter {
            inner: HashingWriter::new(BufWriter::with_capacity(1 << 20, file)),
            store_blobs: dir,
        })
    }
}

impl BlobWriter {
    /// Makes the blob durable under its digest; returns the digest and size.
    pub fn finish(self) -> Result<(Digest, u64), StoreError> {
        let (digest, size, buffered) = self.inner.finish();
        let dest = self.store_blobs.join(digest.hex());
        let file = buffered.into_inner().map_err(|e| io_err(&dest)(e.into_error()))?;
        file.commit_to(&dest).map_err(io_err(&dest))?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_blob_is_named_by_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"hello").unwrap();
        let (digest, size) = w.finish().unwrap();
        assert_eq!((digest.clone(), size), (Digest::of(b"hello"), 5));
        assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), b"hello");
        // An unfinished writer leaves nothing behind.
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"half").unwrap();
        drop(w);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }
}
