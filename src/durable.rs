//! Durable writes: every file the store, the index cache or a copy-up
//! creates is written to a temp file in the same directory, fsynced, then
//! renamed into place, so a crash never leaves a half-written file visible
//! under its final name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file being written next to its final path; [`AtomicFile::commit`] makes
/// it visible. Dropping it uncommitted removes the temp file.
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Starts writing `dest` (its parent directory is created if missing).
    pub fn create(dest: &Path) -> io::Result<Self> {
        let dir = dest.parent().unwrap_or_else(|| Path::new("."));
        fs::create_dir_all(dir)?;
        let name = dest.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let tmp = dir.join(format!(".tmp-{}-{}-{}", name, std::process::id(), unique()));
        let file = File::options().read(true).write(true).create_new(true).open(&tmp)?;
        Ok(Self { file: Some(file), tmp, dest: dest.to_path_buf() })
    }

    /// The open temp file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file present until commit")
    }

    /// fsyncs the data, renames it over the destination and fsyncs the directory.
    pub fn commit(self) -> io::Result<()> {
        let dest = self.dest.clone();
        self.commit_to(&dest)
    }

    /// Like [`AtomicFile::commit`], but to `dest` (in the same directory or
    /// file system): for content whose name is known only once written.
    pub fn commit_to(mut self, dest: &Path) -> io::Result<()> {
        let file = self.file.take().expect("file present until commit");
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, dest)?;
        if let Some(dir) = dest.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `data` to `dest` durably and atomically.
pub fn write_atomic(dest: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = AtomicFile::create(dest)?;
    f.write_all(data)?;
    f.commit()
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a");
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"half").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn commit_replaces_destination() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sub/a");
        write_atomic(&dest, b"one").unwrap();
        write_atomic(&dest, b"two").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        assert_eq!(fs::read_dir(dest.parent().unwrap()).unwrap().count(), 1);
    }
}
