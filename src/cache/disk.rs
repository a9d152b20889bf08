//! The disk tier of the chunk cache: verified compressed chunks of layer
//! blobs (one gzip span, one zstd frame or one 4 MiB piece of a plain layer),
//! kept so that a remount, or another image sharing the layer, need not fetch
//! them from the registry again.
//!
//! Layout, under the directory given to [`DiskCache::open`]:
//!
//! ```text
//! <dir>/<blob hex[0..2]>/<blob hex>/<chunk number in decimal>
//! <dir>/<blob hex[0..2]>/<blob hex>/.tmp-<chunk>-<pid>-<n>   (a write in progress)
//! ```
//!
//! Why it looks like this:
//!
//! - **Verified on every read.** The bytes are hashed against the chunk
//!   digest from the layer index each time they are read, and a file that
//!   does not match is deleted and counted as a miss. So a torn write after a
//!   crash, bit rot, a stray edit or a bug elsewhere can cost a refetch but
//!   never serve wrong data. This is also why writes are *not* fsynced
//!   (unlike [`crate::durable::AtomicFile`], whose commit fsyncs file and
//!   directory): they still go to a temp file in the same directory and are
//!   renamed into place, so no partial file is ever visible under a chunk's
//!   name, but whatever a crash loses is caught by verification.
//! - **Degrades to memory on write errors.** A full disk, a read-only or
//!   failing file system must not fail a `read(2)` on the mount: the first
//!   write error logs one warning and turns the disk tier off for the rest of
//!   the process (every call becomes a miss or a no-op); the in-memory span
//!   cache keeps working.
//! - **LRU by bytes, ordered by mtime across restarts.** Each hit sets the
//!   file's mtime to now (one `futimens` per 1–4 MiB chunk), and a store sets
//!   it too, so [`DiskCache::open`] rebuilds the use order from the mtimes
//!   and the bound holds from one run to the next.
//! - **The lock guards accounting only.** A `Mutex` around the LRU map is
//!   taken for a few map operations; reading, hashing, writing and deleting
//!   files happen outside it.
//!
//! Several processes (one per mount, until a daemon exists) may share the
//! directory. Each keeps its own accounting: what its scan found, what it
//! stored, and what it read from other processes' files (a hit adopts the
//! file). The bound is therefore per process view and only approximate across
//! concurrent processes. A file another process deleted is simply a miss; an
//! eviction racing with a store of the same chunk can at worst delete a fresh
//! file, which is then a miss too. Blob directories are removed when they
//! become empty; a store that finds its directory gone creates it again.

use crate::digest::Digest;
use lru::LruCache;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// A chunk: (blob digest, chunk number within the blob).
type Key = (Arc<Digest>, u32);

/// Prefix of temp files; never a valid chunk name.
const TMP_PREFIX: &str = ".tmp-";

/// Temp files older than this are leftovers of a crashed process (a live
/// write takes milliseconds) and are removed by [`DiskCache::open`].
const STALE_TMP: Duration = Duration::from_secs(3600);

struct Inner {
    /// Every chunk this process believes is on disk, with its file length,
    /// least recently used first.
    lru: LruCache<Key, u64>,
    /// Sum of the values in `lru`.
    bytes: u64,
}

/// Verified compressed chunks on disk, keyed by (blob digest, chunk number),
/// LRU-bounded by bytes. `Send + Sync`: share it via `Arc`.
pub struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    /// Set by the first write error; from then on the tier is off.
    disabled: AtomicBool,
}

impl DiskCache {
    /// Opens (creating) the cache at `dir`, bounded by `max_bytes`: scans the
    /// chunk files already there (ordering them by mtime for LRU), removes
    /// stale temp files and evicts down to the bound. Fails only if `dir`
    /// cannot be created or scanned; the caller then runs without a disk tier.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut found = scan(dir)?;
        // Oldest first, so the most recently used ends up most recent in the LRU.
        found.sort_by_key(|(mtime, _, _)| *mtime);
        let mut inner = Inner { lru: LruCache::unbounded(), bytes: 0 };
        for (_, key, len) in found {
            inner.bytes += len;
            inner.lru.put(key, len);
        }
        let victims = evict(&mut inner, max_bytes);
        let cache = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            inner: Mutex::new(inner),
            disabled: AtomicBool::new(false),
        };
        cache.remove_files(victims);
        Ok(cache)
    }

    /// The chunk's bytes if its file is present and their sha256 equals
    /// `expected`; re-verified on every read, so unverified bytes are never
    /// served. A file that fails verification is deleted (with a warning) and
    /// counts as absent. A hit refreshes the chunk's LRU position and its
    /// file's mtime.
    pub fn get(&self, blob: &Digest, chunk: u32, expected: &Digest) -> Option<Vec<u8>> {
        self.get_checked(blob, chunk, &|data| {
            let actual = Digest::of(data);
            if actual == *expected {
                Ok(())
            } else {
                Err(format!("expected {expected}, got {actual}"))
            }
        })
    }

    /// [`DiskCache::get`] with the check done by `verify`, which says what
    /// is wrong with bytes it refuses (an eStargz chunk is verified by
    /// inflating it).
    pub fn get_checked(
        &self,
        blob: &Digest,
        chunk: u32,
        verify: &dyn Fn(&[u8]) -> Result<(), String>,
    ) -> Option<Vec<u8>> {
        if self.is_disabled() {
            return None;
        }
        let path = self.chunk_path(blob, chunk);
        let (file, data) = match read_file(&path) {
            Ok(read) => read,
            Err(e) => {
                if e.kind() == io::ErrorKind::NotFound {
                    // Evicted by another process (or never stored).
                    self.forget(blob, chunk);
                } else {
                    tracing::debug!("cannot read cached chunk {}: {e}", path.display());
                }
                return None;
            }
        };
        if let Err(found) = verify(&data) {
            tracing::warn!(
                %found,
                "cached chunk {} failed verification; removing it", path.display()
            );
            drop(file);
            remove_file(&path);
            self.forget(blob, chunk);
            return None;
        }
        // Best effort: a failed touch only makes the order after a restart stale.
        if let Err(e) = file.set_modified(SystemTime::now()) {
            tracing::debug!("cannot touch cached chunk {}: {e}", path.display());
        }
        drop(file);
        self.record_use(blob, chunk, data.len() as u64);
        Some(data)
    }

    /// Stores `data` (already verified by the caller) as the chunk, then
    /// evicts least recently used chunks until the total is within the
    /// bound. A chunk larger than the bound is not stored. A write error
    /// never reaches the caller: it disables the disk tier for this process
    /// with one warning, and leaves no partial file behind.
    pub fn put(&self, blob: &Digest, chunk: u32, data: &[u8]) {
        let len = data.len() as u64;
        if self.is_disabled() || len > self.max_bytes {
            return;
        }
        let blob_dir = self.blob_dir(blob);
        let dest = blob_dir.join(chunk.to_string());
        if let Err(e) = write_chunk(&blob_dir, chunk, &dest, data) {
            self.disable(&dest, &e);
            return;
        }
        let victims = {
            let mut inner = self.lock();
            inner.bytes += len;
            if let Some(old) = inner.lru.put((Arc::new(blob.clone()), chunk), len) {
                inner.bytes -= old;
            }
            evict(&mut inner, self.max_bytes)
        };
        self.remove_files(victims);
    }

    /// Whether the chunk's file is present (not verified; for stats and
    /// prefetch planning). Always false once the tier is disabled.
    pub fn contains(&self, blob: &Digest, chunk: u32) -> bool {
        !self.is_disabled()
            && fs::symlink_metadata(self.chunk_path(blob, chunk)).is_ok_and(|m| m.is_file())
    }

    /// Bytes held now, per this process's accounting.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The configured bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    fn disable(&self, path: &Path, e: &io::Error) {
        if !self.disabled.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "disk cache disabled: cannot write {}: {e}; continuing with memory only",
                path.display()
            );
        }
    }

    fn blob_dir(&self, blob: &Digest) -> PathBuf {
        let hex = blob.hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    fn chunk_path(&self, blob: &Digest, chunk: u32) -> PathBuf {
        self.blob_dir(blob).join(chunk.to_string())
    }

    /// Drops a chunk whose file is gone from the accounting.
    fn forget(&self, blob: &Digest, chunk: u32) {
        let mut inner = self.lock();
        if let Some(len) = inner.lru.pop(&(Arc::new(blob.clone()), chunk)) {
            inner.bytes -= len;
        }
    }

    /// Marks a chunk just read as most recently used, adopting it into the
    /// accounting if another process stored it (unless it exceeds our bound).
    fn record_use(&self, blob: &Digest, chunk: u32, len: u64) {
        let key = (Arc::new(blob.clone()), chunk);
        let victims = {
            let mut inner = self.lock();
            if inner.lru.get(&key).is_some() || len > self.max_bytes {
                return;
            }
            inner.bytes += len;
            inner.lru.put(key, len);
            evict(&mut inner, self.max_bytes)
        };
        self.remove_files(victims);
    }

    /// Deletes evicted chunks' files (outside the lock), and their blob
    /// directories once empty.
    fn remove_files(&self, victims: Vec<Key>) {
        for (blob, chunk) in victims {
            remove_file(&self.chunk_path(&blob, chunk));
            // Fails (harmlessly) while other chunks of the blob remain.
            let _ = fs::remove_dir(self.blob_dir(&blob));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a few infallible steps, so a poisoned lock still
        // holds consistent accounting.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Pops least recently used chunks until `inner` fits in `max_bytes`; the
/// caller deletes their files once the lock is released.
fn evict(inner: &mut Inner, max_bytes: u64) -> Vec<Key> {
    let mut victims = Vec::new();
    while inner.bytes > max_bytes {
        let Some((key, len)) = inner.lru.pop_lru() else { break };
        inner.bytes -= len;
        victims.push(key);
    }
    victims
}

/// Reads a whole chunk file, keeping it open so its mtime can be bumped
/// through the same descriptor once it has been verified.
fn read_file(path: &Path) -> io::Result<(File, Vec<u8>)> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_end(&mut data)?;
    Ok((file, data))
}

/// Writes `data` to a temp file in `blob_dir` and renames it to `dest`.
/// A blob directory removed by a concurrent eviction (ours or another
/// process's) between creating it and creating the temp file is created
/// again.
fn write_chunk(blob_dir: &Path, chunk: u32, dest: &Path, data: &[u8]) -> io::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_write_chunk(blob_dir, chunk, dest, data) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 3 => continue,
            result => return result,
        }
    }
}

fn try_write_chunk(blob_dir: &Path, chunk: u32, dest: &Path, data: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    fs::create_dir_all(blob_dir)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = blob_dir.join(format!("{TMP_PREFIX}{chunk}-{}-{n}", std::process::id()));
    let mut file = File::options().write(true).create_new(true).open(&tmp)?;
    let result = (|| {
        file.write_all(data)?;
        // Explicit (nanosecond) time rather than the kernel's coarse clock, so
        // stores and hits order consistently; best effort like in `get`.
        let _ = file.set_modified(SystemTime::now());
        drop(file);
        // No fsync: see the module doc (reads verify, so a lost write is a miss).
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes a file; one already gone is fine, other failures are only logged
/// (the accounting has already dropped it).
fn remove_file(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::debug!("cannot remove cached chunk {}: {e}", path.display());
        }
    }
}

/// Every chunk file under `dir` as (mtime, key, length). Unknown names are
/// ignored; temp files older than [`STALE_TMP`] are removed. Entries that
/// vanish mid-scan (another process evicting) are skipped.
fn scan(dir: &Path) -> io::Result<Vec<(SystemTime, Key, u64)>> {
    let now = SystemTime::now();
    let mut found = Vec::new();
    for shard in read_dir(dir)? {
        let shard = shard?;
        let Some(prefix) = shard.file_name().to_str().map(str::to_owned) else { continue };
        if prefix.len() != 2 || !shard.file_type()?.is_dir() {
            continue;
        }
        for blob in read_dir(&shard.path())? {
            let blob = blob?;
            let Some(hex) = blob.file_name().to_str().map(str::to_owned) else { continue };
            let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else { continue };
            if !hex.starts_with(&prefix) || !blob.file_type()?.is_dir() {
                continue;
            }
            let digest = Arc::new(digest);
            for file in read_dir(&blob.path())? {
                let file = file?;
                let meta = match file.metadata() {
                    Ok(meta) if meta.is_file() => meta,
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => continue,
                };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let name = file.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with(TMP_PREFIX) {
                    if now.duration_since(mtime).is_ok_and(|age| age > STALE_TMP) {
                        let _ = fs::remove_file(file.path());
                    }
                    continue;
                }
                // Canonical decimal only ("7", not "07"), so one chunk has one name.
                match name.parse::<u32>() {
                    Ok(chunk) if chunk.to_string() == name => {
                        found.push((mtime, (digest.clone(), chunk), meta.len()));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(found)
}

/// Lists a directory; one removed meanwhile (by another process) is empty.
fn read_dir(dir: &Path) -> io::Result<Vec<io::Result<fs::DirEntry>>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Parses a size for flags like `--cache-size 10G`: a whole number of bytes,
/// optionally followed by `K`, `M`, `G` or `T` (powers of 1024), each
/// optionally followed by `i`, `iB` or `B`; case-insensitive, with optional
/// space before the unit. `B` alone means bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const HINT: &str = "expected a whole number of bytes, optionally followed by K, M, G or T \
                        (powers of 1024), e.g. 10G or 512MiB";
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    if number.is_empty() {
        return Err(format!("invalid size {s:?}: {HINT}"));
    }
    let unit = unit.trim_start();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kb" | "kib" => 10,
        "m" | "mi" | "mb" | "mib" => 20,
        "g" | "gi" | "gb" | "gib" => 30,
        "t" | "ti" | "tb" | "tib" => 40,
        _ if unit.starts_with(['.', ',']) => {
            return Err(format!(
                "invalid size {s:?}: no fractions; use a smaller unit (1536M, not 1.5G)"
            ))
        }
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?}; {HINT}")),
    };
    let too_big = || format!("invalid size {s:?}: more than {} bytes", u64::MAX);
    let n: u64 = number.parse().map_err(|_| too_big())?;
    n.checked_mul(1 << shift).ok_or_else(too_big)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;

    fn blob() -> Digest {
        Digest::of(b"blob")
    }

    fn chunk_data(i: u32, len: usize) -> Vec<u8> {
        vec![i as u8; len]
    }

    /// Stores chunk `i` of [`blob`] (`len` bytes of `i`).
    fn put(cache: &DiskCache, i: u32, len: usize) {
        cache.put(&blob(), i, &chunk_data(i, len));
    }

    fn get(cache: &DiskCache, i: u32, len: usize) -> Option<Vec<u8>> {
        cache.get(&blob(), i, &Digest::of(&chunk_data(i, len)))
    }

    /// Every file under `dir`, relative, sorted.
    fn files(dir: &Path) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(base, &path, out);
                } else {
                    out.push(path.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<DiskCache>();
    }

    #[test]
    fn put_get_round_trip_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        assert_eq!(get(&cache, 3, 100), None);
        assert!(!cache.contains(&blob(), 3));
        put(&cache, 3, 100);
        assert!(cache.contains(&blob(), 3));
        assert_eq!(get(&cache, 3, 100), Some(chunk_data(3, 100)));
        assert_eq!(cache.bytes(), 100);
        assert_eq!(cache.max_bytes(), 1000);
        let hex = blob().hex().to_string();
        assert_eq!(files(dir.path()), vec![format!("{}/{hex}/3", &hex[..2])]);
        // Storing again replaces, without double counting.
        put(&cache, 3, 100);
        assert_eq!(cache.bytes(), 100);
    }

    #[test]
    fn wrong_expected_digest_misses_and_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        put(&cache, 0, 100);
        assert_eq!(cache.get(&blob(), 0, &Digest::of(b"something else")), None);
        assert!(!cache.contains(&blob(), 0));
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn corrupted_file_misses_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        put(&cache, 1, 100);
        let path = cache.chunk_path(&blob(), 1);
        let mut bytes = fs::read(&path).unwrap();
        bytes[50] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(get(&cache, 1, 100), None);
        assert!(!path.exists());
        // Truncation is caught the same way.
        put(&cache, 1, 100);
        fs::write(&path, &bytes[..10]).unwrap();
        assert_eq!(get(&cache, 1, 100), None);
        assert!(!path.exists());
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 250).unwrap();
        for i in 0..3 {
            put(&cache, i, 100);
        }
        assert_eq!(cache.bytes(), 200);
        assert!(!cache.contains(&blob(), 0));
        assert!(cache.contains(&blob(), 1) && cache.contains(&blob(), 2));
        // A hit on 1 makes 2 the least recently used.
        assert!(get(&cache, 1, 100).is_some());
        put(&cache, 3, 100);
        assert!(cache.contains(&blob(), 1) && cache.contains(&blob(), 3));
        assert!(!cache.contains(&blob(), 2));
        assert_eq!(cache.bytes(), 200);
        // Bytes, not entries: one larger chunk pushes out both others.
        put(&cache, 4, 200);
        assert_eq!(cache.bytes(), 200);
        assert_eq!(files(dir.path()).len(), 1);
    }

    #[test]
    fn reopen_restores_lru_order_from_mtimes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = DiskCache::open(dir.path(), 1000).unwrap();
            for i in 0..3 {
                put(&cache, i, 100);
                sleep(Duration::from_millis(20));
            }
            // 0 becomes the most recently used; 1 is now the oldest.
            assert!(get(&cache, 0, 100).is_some());
        }
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        assert_eq!(cache.bytes(), 300);
        drop(cache);
        let cache = DiskCache::open(dir.path(), 250).unwrap();
        assert_eq!(cache.bytes(), 200);
        assert!(!cache.contains(&blob(), 1));
        assert!(cache.contains(&blob(), 0) && cache.contains(&blob(), 2));
        // The rebuilt order continues: 2 is older than 0.
        put(&cache, 3, 100);
        assert!(!cache.contains(&blob(), 2));
        assert!(cache.contains(&blob(), 0));
    }

    #[test]
    fn chunk_larger_than_bound_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 100).unwrap();
        put(&cache, 0, 60);
        put(&cache, 1, 101);
        assert!(!cache.contains(&blob(), 1));
        assert!(cache.contains(&blob(), 0), "nothing evicted for a chunk that is not stored");
        assert_eq!(cache.bytes(), 60);
        put(&cache, 2, 100);
        assert_eq!(cache.bytes(), 100);
    }

    #[test]
    fn write_error_disables_the_tier() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        put(&cache, 0, 10);
        // A regular file where the blob's shard directory should be: creating
        // the blob directory fails even for root (which ignores chmod 0555).
        let other = Digest::of(b"other blob");
        fs::write(dir.path().join(&other.hex()[..2]), b"").unwrap();
        cache.put(&other, 0, b"data");
        assert!(cache.is_disabled());
        // Memory only from now on: misses and no-ops, never a panic.
        assert!(!cache.contains(&blob(), 0));
        assert_eq!(get(&cache, 0, 10), None);
        put(&cache, 1, 10);
        assert_eq!(cache.bytes(), 10);
        let hex = blob().hex().to_string();
        let mut expected = vec![other.hex()[..2].to_string(), format!("{}/{hex}/0", &hex[..2])];
        expected.sort();
        assert_eq!(files(dir.path()), expected, "no temp or partial file left");
    }

    #[test]
    fn file_removed_by_another_process_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        put(&cache, 0, 100);
        fs::remove_file(cache.chunk_path(&blob(), 0)).unwrap();
        assert!(!cache.contains(&blob(), 0));
        assert_eq!(get(&cache, 0, 100), None);
        assert_eq!(cache.bytes(), 0);
        assert!(!cache.is_disabled());
        // Even the blob directory removed (by another process's eviction).
        fs::remove_dir(cache.blob_dir(&blob())).unwrap();
        put(&cache, 1, 100);
        assert_eq!(get(&cache, 1, 100), Some(chunk_data(1, 100)));
    }

    #[test]
    fn another_processes_chunks_are_hits_and_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskCache::open(dir.path(), 1000).unwrap();
        let b = DiskCache::open(dir.path(), 1000).unwrap();
        put(&a, 0, 100);
        assert_eq!(b.bytes(), 0);
        assert!(b.contains(&blob(), 0));
        assert_eq!(get(&b, 0, 100), Some(chunk_data(0, 100)));
        assert_eq!(b.bytes(), 100);
    }

    #[test]
    fn scan_ignores_strangers_and_removes_stale_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = DiskCache::open(dir.path(), 1000).unwrap();
            put(&cache, 0, 100);
        }
        let blob_dir = dir.path().join(&blob().hex()[..2]).join(blob().hex());
        fs::write(blob_dir.join("07"), b"not canonical").unwrap();
        fs::write(blob_dir.join("notes"), b"?").unwrap();
        fs::write(dir.path().join("README"), b"?").unwrap();
        fs::write(blob_dir.join(".tmp-1-1-1"), b"live write").unwrap();
        let stale = blob_dir.join(".tmp-2-1-1");
        let file = File::create(&stale).unwrap();
        file.set_modified(SystemTime::now() - 2 * STALE_TMP).unwrap();
        drop(file);
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        assert_eq!(cache.bytes(), 100);
        assert!(!stale.exists());
        assert!(blob_dir.join(".tmp-1-1-1").exists());
    }

    #[test]
    fn concurrent_readers_and_writers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 2000).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let cache = &cache;
                s.spawn(move || {
                    for i in 0..50 {
                        let chunk = (i * 7 + t) % 40;
                        put(cache, chunk, 100);
                        if let Some(data) = get(cache, chunk, 100) {
                            assert_eq!(data, chunk_data(chunk, 100));
                        }
                    }
                });
            }
        });
        assert!(cache.bytes() <= 2000);
        assert!(!cache.is_disabled());
    }

    #[test]
    fn parses_sizes() {
        let ok = [
            ("0", 0),
            ("4096", 4096),
            (" 12 ", 12),
            ("10B", 10),
            ("1k", 1 << 10),
            ("1K", 1 << 10),
            ("2KiB", 2 << 10),
            ("3kb", 3 << 10),
            ("512M", 512 << 20),
            ("512 MiB", 512 << 20),
            ("10G", 10 << 30),
            ("10gi", 10 << 30),
            ("10GB", 10 << 30),
            ("1T", 1 << 40),
            ("1TiB", 1 << 40),
        ];
        for (s, want) in ok {
            assert_eq!(parse_size(s), Ok(want), "{s:?}");
        }
        for s in ["", "G", "-1", "+1", "1.5G", "10X", "10 GiBs", "1e9", "99999999999999999999"] {
            assert!(parse_size(s).is_err(), "{s:?} should be rejected");
        }
        assert!(parse_size("1.5G").unwrap_err().contains("no fractions"));
        assert!(parse_size("10X").unwrap_err().contains("unknown unit \"X\""));
        assert!(parse_size("16777216T").unwrap_err().contains("more than"));
    }
}
