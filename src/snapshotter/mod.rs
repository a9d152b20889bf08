//! The core of rmount's containerd snapshotter: containerd's Snapshots API
//! semantics over overlayfs, as a library; [`service`] serves it over gRPC
//! and [`remote`] adds lazily served (remote) snapshots.
//!
//! A snapshot has a key (Active, View) or a name (Committed), an optional
//! parent (always a Committed snapshot's name), labels and times. Metadata
//! lives in `root/metadata.redb`; each snapshot owns `root/snapshots/<id>/`
//! with `fs` (its upper layer, or its content once committed) and `work`
//! (overlayfs' workdir). Methods return [`Mount`] descriptions and never
//! mount, so the logic is tested as data.
//!
//! # Crash discipline
//!
//! Every operation is one redb write transaction; disk work is ordered
//! around it so that a crash leaves at worst an orphan directory, never a
//! record without its directory:
//!
//! - create (`prepare`/`view`): build `snapshots/new-<random>/{fs,work}`,
//!   insert the record, fsync and rename the dir to `snapshots/<id>`, then
//!   commit. A crash before the commit leaves a dir whose id the database
//!   never handed out; the id is handed out again, and the stale dir under
//!   it is removed first (ids come from a counter only a committed
//!   transaction advances, and the write lock is held meanwhile).
//! - `commit`: only the record changes (same id, same dir).
//! - `remove`: delete the record and commit, then rename the dir to
//!   `snapshots/rm-<id>` and delete it. A crash in between leaves an orphan.
//! - [`Snapshots::cleanup`] deletes every dir under `snapshots/` without a
//!   record (orphans, `new-*`, `rm-*`).
//!
//! A remote snapshot (see [`remote`]) is a committed snapshot whose `fs` is
//! a read-only mount of an image's bottom layers, made by rmount's daemon
//! after the record commits; its removal unmounts before the metadata
//! commit, and a daemon start mounts again any remote snapshot that lacks
//! its mount (a crash between commit and mount).

mod filter;
mod metadata;
mod mounts;
pub mod remote;
pub mod service;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use redb::{Database, ReadableTable};
use serde::{Deserialize, Serialize};

pub use filter::Filter;
use metadata::{Record, COUNTERS, SNAPSHOTS};
pub use mounts::Mount;
pub use remote::RemoteLayers;

/// A snapshotter error; the first four kinds map 1:1 to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The key, name or parent does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The key or name is taken.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the operation.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The request itself is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The metadata database failed (boxed: redb's error is large).
    #[error("metadata database: {0}")]
    Db(Box<redb::Error>),
    /// A metadata record does not decode (or encode).
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// A filesystem operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The path operated on.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// This module's result type.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for SnapshotError {
            fn from(e: $t) -> Self {
                SnapshotError::Db(Box::new(e.into()))
            }
        }
    )*};
}
db_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

/// A snapshot's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only, never committed.
    View,
    /// Writable, may be committed.
    Active,
    /// Immutable, may be a parent.
    Committed,
}

/// What [`Snapshots::stat`] tells about a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// The key (Active, View) or name (Committed).
    pub name: String,
    /// The committed parent's name.
    pub parent: Option<String>,
    /// The snapshot's kind.
    pub kind: Kind,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// When the snapshot (or, for Committed, the commit) was made.
    pub created: DateTime<Utc>,
    /// The last change to the snapshot's metadata.
    pub updated: DateTime<Utc>,
}

/// Disk usage of a snapshot's own layer (parents not included), counted as
/// containerd's `fs.DiskUsage` does: allocated blocks of every inode,
/// directories included, hard links once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated (`st_blocks` × 512).
    pub size: u64,
    /// Inodes, the `fs` dir itself included.
    pub inodes: u64,
}

/// An active snapshot on top of a lazily served image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveOnImage {
    /// Its full key.
    pub key: String,
    /// Its upper dir (kernel overlayfs' format).
    pub upper: PathBuf,
    /// The image layers below it.
    pub remote: RemoteLayers,
    /// Where the daemon serves it as a writable FUSE union, if it does (a
    /// commit pauses that mount while it reads the upper).
    #[serde(default)]
    pub fuse_union: Option<PathBuf>,
}

/// The snapshot store under one root directory.
pub struct Snapshots {
    root: PathBuf,
    db: Database,
}

impl Snapshots {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Snapshots> {
        let dir = root.join("snapshots");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let db = Database::create(root.join("metadata.redb"))?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Snapshots { root: root.to_path_buf(), db })
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn dir_of(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// Creates an Active snapshot `key` on top of committed `parent`.
    pub fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels, None, false).map(|(mounts, _)| mounts)
    }

    /// Creates an active snapshot `key` on the lazily served `parent`, to be
    /// served by rmount's writable FUSE union instead of kernel overlayfs.
    /// Returns its dir (holding `fs`, the union's upper, `work` and
    /// `rootfs`, where the union is to be mounted) and the parent's layers.
    pub fn prepare_fuse_union(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(Vec<Mount>, PathBuf, RemoteLayers)> {
        let remote = self.remote_of(parent)?.ok_or_else(|| {
            SnapshotError::InvalidArgument(format!("{parent} is not served lazily"))
        })?;
        let (mounts, dir) = self.create(Kind::Active, key, Some(parent), labels, None, true)?;
        Ok((mounts, dir, remote))
    }

    /// Where the daemon serves snapshot `key`, if it does: a remote
    /// snapshot's `fs`, or a FUSE-union active snapshot's `rootfs`.
    pub fn served_at(&self, key: &str) -> Result<Option<PathBuf>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        Ok(self.daemon_mount(&metadata::must_get(&table, key)?))
    }

    fn daemon_mount(&self, record: &Record) -> Option<PathBuf> {
        let dir = self.dir_of(record.id);
        match (&record.remote, record.fuse_union) {
            (Some(_), _) => Some(dir.join("fs")),
            (None, true) => Some(dir.join("rootfs")),
            (None, false) => None,
        }
    }

    /// Creates a read-only View snapshot `key` of committed `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels, None, false).map(|(mounts, _)| mounts)
    }

    /// Records committed snapshot `name` on top of `parent`, to be served
    /// lazily as `remote`; returns the (empty) `fs` dir to mount it at.
    pub fn create_remote(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        remote: RemoteLayers,
    ) -> Result<PathBuf> {
        let (_, dir) = self.create(Kind::Committed, name, parent, labels, Some(remote), false)?;
        Ok(dir.join("fs"))
    }

    /// How snapshot `key` is served lazily, if it is a remote snapshot.
    pub fn remote_of(&self, key: &str) -> Result<Option<RemoteLayers>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        Ok(metadata::must_get(&table, key)?.remote)
    }

    /// The active snapshot `key` — its full key, or the last `/` part of
    /// one (containerd's keys are `NAMESPACE/ID/KEY`) when that is unique —
    /// with its upper dir and the lazily served image it sits on: what
    /// `rmount commit --snapshot` turns into a new image.
    pub fn active_on_image(&self, key: &str) -> Result<ActiveOnImage> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let active: Vec<(String, Record)> = metadata::all(&table)?
            .into_iter()
            .filter(|(k, r)| {
                r.kind == Kind::Active && (k == key || k.rsplit('/').next() == Some(key))
            })
            .collect();
        let (full_key, record) = match <[_; 1]>::try_from(active) {
            Ok([found]) => found,
            Err(found) if found.is_empty() => {
                return Err(SnapshotError::NotFound(format!("active snapshot {key}")))
            }
            Err(found) => {
                let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
                return Err(SnapshotError::InvalidArgument(format!(
                    "{key} names several active snapshots: {}",
                    keys.join(", ")
                )));
            }
        };
        let remote = record
            .parent
            .as_deref()
            .map(|p| metadata::must_get(&table, p))
            .transpose()?
            .and_then(|parent| parent.remote)
            .ok_or_else(|| {
                SnapshotError::FailedPrecondition(format!(
                    "{full_key} does not sit directly on an image rmount serves lazily \
                     (pull the image with `rmount containerd pull` to commit with rmount)"
                ))
            })?;
        let dir = self.dir_of(record.id);
        let fuse_union = self.daemon_mount(&record);
        Ok(ActiveOnImage { key: full_key, upper: dir.join("fs"), remote, fuse_union })
    }

    /// Every remote snapshot: its name, `fs` dir and layers.
    pub fn remote_snapshots(&self) -> Result<Vec<(String, PathBuf, RemoteLayers)>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        Ok(metadata::all(&table)?
            .into_iter()
            .filter_map(|(k, r)| Some((k, self.dir_of(r.id).join("fs"), r.remote?)))
            .collect())
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        remote: Option<RemoteLayers>,
        fuse_union: bool,
    ) -> Result<(Vec<Mount>, PathBuf)> {
        check_key(key)?;
        let tx = self.db.begin_write()?;
        let (id, mounts) = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            if metadata::get(&table, key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {key}")));
            }
            if let Some(p) = parent {
                let rec = metadata::get(&table, p)?
                    .ok_or_else(|| SnapshotError::NotFound(format!("parent {p}")))?;
                if rec.kind != Kind::Committed {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "parent {p} is not committed"
                    )));
                }
            }
            let id = metadata::next_id(&mut tx.open_table(COUNTERS)?)?;
            let now = Utc::now();
            let record = Record {
                id,
                kind,
                parent: parent.map(str::to_owned),
                labels,
                created: now,
                updated: now,
                // A remote snapshot's layers take no local disk.
                usage: remote.as_ref().map(|_| Usage::default()),
                remote,
                fuse_union,
            };
            metadata::put(&mut table, key, &record)?;
            let mounts = match kind {
                Kind::Committed => Vec::new(),
                _ => self.mounts_of(&table, &record)?,
            };
            self.create_dir(id, fuse_union)?;
            (id, mounts)
        };
        if let Err(e) = tx.commit() {
            // Best effort: an orphan left here is harmless (see the module doc).
            let _ = fs::remove_dir_all(self.dir_of(id));
            return Err(e.into());
        }
        Ok((mounts, self.dir_of(id)))
    }

    /// Builds `snapshots/<id>/{fs,work}` (and `rootfs` for a FUSE union)
    /// via a temp dir and a rename.
    fn create_dir(&self, id: u64, with_rootfs: bool) -> Result<()> {
        let base = self.snapshots_dir();
        let tmp = base.join(format!("new-{id}-{}", fastrand::u64(..)));
        let subdirs: &[&str] =
            if with_rootfs { &["fs", "work", "rootfs"] } else { &["fs", "work"] };
        let build = || -> Result<()> {
            for sub in subdirs {
                let d = tmp.join(sub);
                fs::create_dir_all(&d).map_err(io_err(&d))?;
            }
            let dest = self.dir_of(id);
            // A dir under an id the database has not handed out yet is left
            // over from a transaction a crash cut short.
            if dest.exists() {
                fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
            }
            fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            sync_dir(&base)
        };
        build().inspect_err(|_| {
            let _ = fs::remove_dir_all(&tmp);
        })
    }

    /// The mounts of an Active or View snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let record = metadata::must_get(&table, key)?;
        if record.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed, not active or view"
            )));
        }
        self.mounts_of(&table, &record)
    }

    fn mounts_of(
        &self,
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        record: &Record,
    ) -> Result<Vec<Mount>> {
        let parents: Vec<PathBuf> =
            parent_ids(table, record)?.into_iter().map(|id| self.dir_of(id)).collect();
        let parents: Vec<&Path> = parents.iter().map(PathBuf::as_path).collect();
        let dir = self.dir_of(record.id);
        if record.fuse_union {
            return Ok(vec![mounts::bind(&dir.join("rootfs"), false)]);
        }
        Ok(mounts::mounts_for(record.kind, &dir, &parents))
    }

    /// Commits Active snapshot `key` as `name`; `key` disappears. Its usage
    /// is measured and kept.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        check_key(name)?;
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let record = metadata::must_get(&table, key)?;
            if record.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is {:?}, only an active one can be committed",
                    record.kind
                )));
            }
            if metadata::get(&table, name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {name}")));
            }
            let usage = disk_usage(&self.dir_of(record.id).join("fs"))?;
            let now = Utc::now();
            let committed = Record {
                kind: Kind::Committed,
                labels,
                created: now,
                updated: now,
                usage: Some(usage),
                fuse_union: false,
                ..record
            };
            table.remove(key)?;
            metadata::put(&mut table, name, &committed)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes snapshot `key`; refused while a snapshot has it as parent.
    /// What the daemon serves of it ([`Snapshots::served_at`]) is first
    /// handed to `unmount`; when that fails, nothing is removed.
    pub fn remove(&self, key: &str, unmount: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tx = self.db.begin_write()?;
        let id = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let record = metadata::must_get(&table, key)?;
            if let Some((child, _)) =
                metadata::all(&table)?.into_iter().find(|(_, r)| r.parent.as_deref() == Some(key))
            {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} has a child {child}"
                )));
            }
            if let Some(served) = self.daemon_mount(&record) {
                unmount(&served)?;
            }
            table.remove(key)?;
            record.id
        };
        tx.commit()?;
        // Metadata is gone; a crash from here on leaves an orphan `cleanup` removes.
        let dir = self.dir_of(id);
        let trash = self.snapshots_dir().join(format!("rm-{id}"));
        match fs::rename(&dir, &trash) {
            Ok(()) => fs::remove_dir_all(&trash).map_err(io_err(&trash)),
            // Already gone: the record was all that was left.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    /// What the store knows about snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<Info> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        Ok(info(key, metadata::must_get(&table, key)?))
    }

    /// Updates the labels of `info.name`: all of them when `fieldpaths` is
    /// empty or holds `labels`, else each `labels.<k>` given (set to
    /// `info.labels[k]`, or removed when absent there). Returns the new info.
    pub fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info> {
        let tx = self.db.begin_write()?;
        let updated = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let mut record = metadata::must_get(&table, &info.name)?;
            if info.kind != record.kind {
                return Err(SnapshotError::InvalidArgument(format!(
                    "snapshot {} is {:?}, not {:?}",
                    info.name, record.kind, info.kind
                )));
            }
            let mut labels = record.labels.clone();
            if fieldpaths.is_empty() {
                labels = info.labels.clone();
            }
            for path in fieldpaths {
                if *path == "labels" {
                    labels = info.labels.clone();
                } else if let Some(k) = path.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => labels.insert(k.to_owned(), v.clone()),
                        None => labels.remove(k),
                    };
                } else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update field {path:?}"
                    )));
                }
            }
            record.labels = labels;
            record.updated = Utc::now();
            metadata::put(&mut table, &info.name, &record)?;
            self::info(&info.name, record)
        };
        tx.commit()?;
        Ok(updated)
    }

    /// Disk usage of `key`'s own layer: measured now for Active and View,
    /// as measured at commit time for Committed.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let record = {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(SNAPSHOTS)?;
            metadata::must_get(&table, key)?
        };
        match record.usage {
            Some(usage) => Ok(usage),
            None => disk_usage(&self.dir_of(record.id).join("fs")),
        }
    }

    /// Every snapshot `filter` accepts, in key order.
    pub fn walk(&self, filter: impl Fn(&Info) -> bool) -> Result<Vec<Info>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        Ok(metadata::all(&table)?
            .into_iter()
            .map(|(k, r)| info(&k, r))
            .filter(|i| filter(i))
            .collect())
    }

    /// Deletes every dir under `snapshots/` without a metadata record:
    /// left by crashes mid-create or mid-remove. Returns the paths removed.
    pub fn cleanup(&self) -> Result<Vec<PathBuf>> {
        // The write transaction holds the write lock, so no create is in flight.
        let tx = self.db.begin_write()?;
        let ids: HashSet<String> = {
            let table = tx.open_table(SNAPSHOTS)?;
            metadata::all(&table)?.into_iter().map(|(_, r)| r.id.to_string()).collect()
        };
        let base = self.snapshots_dir();
        let mut removed = Vec::new();
        for entry in fs::read_dir(&base).map_err(io_err(&base))? {
            let entry = entry.map_err(io_err(&base))?;
            if ids.contains(entry.file_name().to_string_lossy().as_ref()) {
                continue;
            }
            let path = entry.path();
            let is_dir = entry.file_type().map_err(io_err(&path))?.is_dir();
            if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) }
                .map_err(io_err(&path))?;
            removed.push(path);
        }
        tx.abort()?;
        Ok(removed)
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument("empty snapshot key".to_owned()));
    }
    Ok(())
}

fn info(name: &str, r: Record) -> Info {
    Info {
        name: name.to_owned(),
        parent: r.parent,
        kind: r.kind,
        labels: r.labels,
        created: r.created,
        updated: r.updated,
    }
}

/// The ids of `record`'s ancestors whose dirs its mounts stack, nearest
/// first: up to and including the first remote one, whose `fs` already
/// holds every layer below it.
fn parent_ids(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    record: &Record,
) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut next = record.parent.clone();
    while let Some(name) = next {
        let parent = metadata::get(table, &name)?
            .ok_or_else(|| SnapshotError::Corrupt(format!("missing parent {name}")))?;
        if ids.contains(&parent.id) {
            return Err(SnapshotError::Corrupt(format!("parent cycle at {name}")));
        }
        ids.push(parent.id);
        next = match parent.remote {
            Some(_) => None,
            None => parent.parent,
        };
    }
    Ok(ids)
}

/// Walks `dir` without following symlinks, counting hard links once.
fn disk_usage(dir: &Path) -> Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += meta.blocks() * 512;
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(io_err(&path))? {
                stack.push(entry.map_err(io_err(&path))?.path());
            }
        }
    }
    Ok(usage)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_err(dir))
}

#[cfg(test)]
mod tests;
