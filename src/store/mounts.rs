//! Records of live mounts, so `rmi` can refuse to remove a mounted image and
//! `df` can count mounts. One JSON file per mountpoint under `ROOT/mounts/`;
//! a record whose serving process is gone is stale and dropped.

use super::{io_err, Store, StoreError};
use crate::digest::Digest;
use crate::durable::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A live mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    /// Absolute mountpoint.
    pub mountpoint: PathBuf,
    /// The reference the user mounted.
    pub reference: String,
    /// Image id (config digest).
    pub image_id: Digest,
    /// PID of the process the mount lives with: its own serving process,
    /// or the daemon's keeper.
    pub pid: u32,
    /// Mounted read-only.
    pub read_only: bool,
    /// The upper (changes) directory of a writable mount.
    #[serde(default)]
    pub upper: Option<PathBuf>,
    /// Its work directory.
    #[serde(default)]
    pub work: Option<PathBuf>,
    /// The control socket of the daemon serving it; `None` when the mount
    /// has a process of its own (`pid`).
    #[serde(default)]
    pub daemon: Option<PathBuf>,
}

impl Store {
    fn mounts_dir(&self) -> PathBuf {
        self.root().join("mounts")
    }

    fn record_path(&self, mountpoint: &Path) -> PathBuf {
        self.mounts_dir().join(format!("{}.json", Self::mount_key(mountpoint)))
    }

    /// A short stable name for `mountpoint` (file names of its records).
    pub fn mount_key(mountpoint: &Path) -> String {
        let key = Digest::of(mountpoint.as_os_str().as_encoded_bytes());
        key.hex()[..16].to_string()
    }

    /// The upper and work directories a writable mount at `mountpoint`
    /// gets unless told otherwise: `ROOT/containers/<key>/{upper,work}`.
    pub fn default_upper(&self, mountpoint: &Path) -> (PathBuf, PathBuf) {
        let dir = self.root().join("containers").join(Self::mount_key(mountpoint));
        (dir.join("upper"), dir.join("work"))
    }

    /// The default upper of `mountpoint` for `image`: refuses when it holds
    /// changes made on another image, else records that it is `image`'s.
    pub fn claim_default_upper(
        &self,
        mountpoint: &Path,
        image: &Digest,
    ) -> Result<(PathBuf, PathBuf), StoreError> {
        let (upper, work) = self.default_upper(mountpoint);
        let owner = upper.with_file_name("image");
        if let Ok(previous) = std::fs::read_to_string(&owner) {
            let has_changes = std::fs::read_dir(&upper).is_ok_and(|mut d| d.next().is_some());
            if previous.trim() != image.to_string() && has_changes {
                return Err(StoreError::Invalid {
                    what: format!("the changes at {}", upper.display()),
                    reason: format!(
                        "they were made on image {}; unmount with --discard to drop them, \
                         or mount with --upper DIR",
                        previous.trim()
                    ),
                });
            }
        }
        std::fs::create_dir_all(&upper).map_err(io_err(&upper))?;
        write_atomic(&owner, image.to_string().as_bytes()).map_err(io_err(&owner))?;
        Ok((upper, work))
    }

    /// Where the serving process of `mountpoint` writes its log.
    pub fn mount_log_path(&self, mountpoint: &Path) -> PathBuf {
        self.record_path(mountpoint).with_extension("log")
    }

    /// Where the serving process of `mountpoint` writes its fetch statistics
    /// (lazy mounts; read by `rmount stats`).
    pub fn mount_stats_path(&self, mountpoint: &Path) -> PathBuf {
        self.record_path(mountpoint).with_extension("stats.json")
    }

    /// Records a live mount.
    pub fn add_mount(&self, record: &MountRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.mountpoint);
        let json = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Invalid {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &json).map_err(io_err(&path))
    }

    /// Forgets the mount at `mountpoint`.
    pub fn remove_mount(&self, mountpoint: &Path) -> Result<(), StoreError> {
        let path = self.record_path(mountpoint);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// The record of the mount at `mountpoint`, if it is live.
    pub fn mount_at(&self, mountpoint: &Path) -> Result<Option<MountRecord>, StoreError> {
        Ok(self.mounts()?.into_iter().find(|m| m.mountpoint == mountpoint))
    }

    /// Live mounts (records whose serving process is gone are dropped).
    pub fn mounts(&self) -> Result<Vec<MountRecord>, StoreError> {
        let dir = self.mounts_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut live = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(data) = std::fs::read(&path) else { continue };
            let Ok(record) = serde_json::from_slice::<MountRecord>(&data) else { continue };
            if process_alive(record.pid) {
                live.push(record);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        live.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        Ok(live)
    }
}

/// Is process `pid` running? A zombie (exited, not yet reaped by init,
/// which can take a second) is not.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
