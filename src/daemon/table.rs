//! The worker's table of mounts: mounting, unmounting, listing, adopting
//! the mounts the keeper hands over, and the durable record of each mount
//! (`ROOT/daemon/mounts/<key>.json`) that lets a new daemon serve it again.

use super::keeper::{HeldMount, KeeperLink};
use super::metrics::MountMetrics;
use super::protocol::{ErrorKind, MountInfo, MountSpec};
use super::{DaemonError, DaemonPaths};
use crate::cache::DiskCache;
use crate::fs::metrics::FsMetrics;
use crate::fs::mount::{canonical_dir, detach, discard_changes, is_rmount_mount};
use crate::fs::{Connection, LayerPool, Mount, MountOptions, Overlay, Server};
use crate::store::Store;
use rustix::fd::OwnedFd;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the daemon shares between its mounts.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Bytes of decompressed spans kept in memory, for all mounts together.
    pub cache_bytes: u64,
    /// Bound of the disk tier of the chunk cache.
    pub disk_bytes: u64,
    /// Threads per mount that read data.
    pub threads: usize,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<super::metrics::MetricsAddr>,
    /// What mounts containerd's active snapshots over lazily served layers.
    pub active_union: crate::snapshotter::service::ActiveUnion,
}

/// A mount's durable record.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recorded {
    spec: MountSpec,
    mounted_at: u64,
}

struct Live {
    spec: MountSpec,
    mounted_at: u64,
    mount: Mount,
    metrics: Arc<FsMetrics>,
}

#[derive(Default)]
struct Mounts {
    live: BTreeMap<PathBuf, Live>,
    /// Mountpoints being mounted right now (mounting runs unlocked).
    pending: HashSet<PathBuf>,
}

/// The worker's state.
pub struct Daemon {
    store: Store,
    paths: DaemonPaths,
    pool: LayerPool,
    disk: Option<Arc<DiskCache>>,
    link: KeeperLink,
    server: Server,
    threads: usize,
    mounts: Mutex<Mounts>,
}

/// A request that was valid but failed.
fn failed(message: String) -> DaemonError {
    DaemonError::Refused { kind: ErrorKind::Failed, message }
}

fn not_mounted(mountpoint: &Path) -> DaemonError {
    DaemonError::Refused {
        kind: ErrorKind::NotFound,
        message: format!(
            "{} is not mounted by this daemon (see `rmount ps`)",
            mountpoint.display()
        ),
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Daemon {
    /// The worker's state for `store`, reporting to the keeper over `link`.
    pub fn new(
        store: Store,
        paths: DaemonPaths,
        link: KeeperLink,
        keeper_pid: u32,
        options: &DaemonOptions,
    ) -> Self {
        let disk = crate::fs::lazy::open_disk_cache(store.root(), options.disk_bytes);
        let server = Server { pid: keeper_pid, daemon_socket: Some(paths.socket.clone()) };
        Self {
            pool: LayerPool::new(options.cache_bytes),
            store,
            paths,
            disk,
            link,
            server,
            threads: options.threads,
            mounts: Mutex::new(Mounts::default()),
        }
    }

    /// Where this daemon keeps its sockets and state.
    pub fn paths(&self) -> &DaemonPaths {
        &self.paths
    }

    /// The store this daemon serves.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, Mounts> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts `spec` anew.
    pub fn mount(&self, spec: MountSpec) -> Result<MountInfo, DaemonError> {
        let mountpoint = canonical_dir(&spec.mountpoint).map_err(|e| failed(e.to_string()))?;
        if mountpoint != spec.mountpoint {
            return Err(failed(format!(
                "mountpoint {} must be absolute and canonical ({})",
                spec.mountpoint.display(),
                mountpoint.display()
            )));
        }
        let mounted_elsewhere = self.store.mount_at(&mountpoint)?.is_some();
        {
            let mut mounts = self.lock();
            if mounted_elsewhere
                || mounts.live.contains_key(&mountpoint)
                || !mounts.pending.insert(mountpoint.clone())
            {
                return Err(failed(format!("{} is already an rmount mount", mountpoint.display())));
            }
        }
        let result = self.start(spec, Connection::New, unix_now());
        let mut mounts = self.lock();
        mounts.pending.remove(&mountpoint);
        let live = result?;
        let info = self.info(&live);
        mounts.live.insert(mountpoint, live);
        Ok(info)
    }

    /// Starts serving `spec` and records it (with the keeper and on disk).
    fn start(
        &self,
        spec: MountSpec,
        connection: Connection,
        mounted_at: u64,
    ) -> Result<Live, DaemonError> {
        let adopted = matches!(connection, Connection::Adopt(_));
        let metrics = Arc::new(FsMetrics::new());
        let options = MountOptions {
            metrics: Some(metrics.clone()),
            ..spec.options(&self.store, self.threads, self.disk.clone()).map_err(failed)?
        };
        let mount = Mount::start(
            &self.store,
            &spec.reference,
            &spec.mountpoint,
            &options,
            &self.pool,
            connection,
            &self.server,
        )
        .map_err(|e| failed(format!("mounting {}: {e}", spec.reference)))?;
        let key = Store::mount_key(&spec.mountpoint);
        let recorded = Recorded { spec: spec.clone(), mounted_at };
        let durable = serde_json::to_vec_pretty(&recorded).unwrap_or_default();
        let record_path = self.record_path(&key);
        let kept = match adopted {
            true => Ok(()),
            false => self.link.hold(&key, &spec.mountpoint, mount.device()),
        }
        .and_then(|()| {
            crate::durable::write_atomic(&record_path, &durable)
                .map_err(DaemonError::io(format!("writing {}", record_path.display())))
        });
        if let Err(e) = kept {
            let _ = detach(&spec.mountpoint, true);
            let _ = self.link.forget(&key);
            let _ = mount.wait(&self.store);
            return Err(e);
        }
        tracing::info!(mountpoint = %spec.mountpoint.display(), reference = %spec.reference, adopted, "serving");
        Ok(Live { spec, mounted_at, mount, metrics })
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.paths.mounts_dir().join(format!("{key}.json"))
    }

    /// Unmounts `mountpoint`; with `discard`, deletes its changes too.
    pub fn unmount(
        &self,
        mountpoint: &Path,
        force: bool,
        discard: bool,
    ) -> Result<(), DaemonError> {
        let live = self.lock().live.remove(mountpoint).ok_or_else(|| not_mounted(mountpoint))?;
        let upper = live.spec.upper.clone();
        if let Err(e) = detach(mountpoint, force) {
            self.lock().live.insert(mountpoint.to_path_buf(), live);
            return Err(failed(e.to_string()));
        }
        self.finish(live);
        if let (true, Some((upper, work))) = (discard, upper) {
            discard_changes(&upper, &work).map_err(|e| failed(e.to_string()))?;
        }
        Ok(())
    }

    /// Forgets an unmounted mount: its durable record, the keeper's fd, and
    /// (within a few seconds; a lazily detached mount ends when its last
    /// user leaves) its session.
    fn finish(&self, live: Live) {
        let key = Store::mount_key(&live.spec.mountpoint);
        let _ = std::fs::remove_file(self.record_path(&key));
        if let Err(e) = self.link.forget(&key) {
            tracing::warn!("{e}");
        }
        let (done, waited) = std::sync::mpsc::channel();
        let store = self.store.clone();
        std::thread::spawn(move || {
            let mountpoint = live.mount.record.mountpoint.clone();
            if let Err(e) = live.mount.wait(&store) {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "mount ended with an error");
            }
            let _ = done.send(());
        });
        let _ = waited.recv_timeout(Duration::from_secs(5));
        self.pool.prune();
    }

    /// Blocks until the keeper is gone (see [`KeeperLink::wait_keeper_gone`]).
    pub fn wait_keeper_gone(&self) {
        self.link.wait_keeper_gone()
    }

    /// Duplicates of every mount's `/dev/fuse` fd, with its key and
    /// mountpoint: what a new keeper must hold.
    pub fn devices(&self) -> Vec<(String, PathBuf, OwnedFd)> {
        self.lock()
            .live
            .values()
            .filter_map(|live| {
                let mountpoint = live.spec.mountpoint.clone();
                let fd = live.mount.device().try_clone_to_owned().ok()?;
                Some((Store::mount_key(&mountpoint), mountpoint, fd))
            })
            .collect()
    }

    /// Whether this daemon serves a mount at `mountpoint`.
    pub fn serves(&self, mountpoint: &Path) -> bool {
        self.lock().live.contains_key(mountpoint)
    }

    /// Every mount, sorted by mountpoint.
    pub fn list(&self) -> Vec<MountInfo> {
        self.lock().live.values().map(|live| self.info(live)).collect()
    }

    fn info(&self, live: &Live) -> MountInfo {
        let layers = live.mount.layers();
        let lazy = layers.iter().any(|l| l.remote.is_some());
        let fetched_percent = match lazy {
            false => 100.0,
            // Live: the stats file is only saved now and then.
            true => crate::fs::lazy::stats_now(&live.spec.reference, &live.spec.mountpoint, layers)
                ["fetchedPercent"]
                .as_f64()
                .unwrap_or(0.0),
        };
        let record = &live.mount.record;
        MountInfo {
            mountpoint: record.mountpoint.clone(),
            reference: record.reference.clone(),
            image_id: record.image_id.to_string(),
            read_only: record.read_only,
            upper: record.upper.clone(),
            lazy,
            fetched_percent,
            mounted_at: live.mounted_at,
            uptime_secs: unix_now().saturating_sub(live.mounted_at),
        }
    }

    /// The fetch statistics of the lazy mount at `mountpoint`.
    pub fn stats(&self, mountpoint: &Path) -> Result<serde_json::Value, DaemonError> {
        let mounts = self.lock();
        let live = mounts.live.get(mountpoint).ok_or_else(|| not_mounted(mountpoint))?;
        let layers = live.mount.layers();
        if layers.iter().all(|l| l.remote.is_none()) {
            return Err(failed(format!(
                "{} reads every layer from the store: there is nothing fetched to show",
                mountpoint.display()
            )));
        }
        Ok(crate::fs::lazy::stats_now(&live.mount.record.reference, mountpoint, layers))
    }

    /// What the metrics endpoint shows of each mount.
    pub fn metrics(&self) -> Vec<MountMetrics> {
        self.lock()
            .live
            .values()
            .map(|live| MountMetrics {
                mountpoint: live.spec.mountpoint.clone(),
                image: live.mount.record.reference.clone(),
                ops: live.metrics.clone(),
                layers: live
                    .mount
                    .layers()
                    .iter()
                    .filter_map(|l| l.remote.as_ref())
                    .map(|r| r.stats())
                    .collect(),
            })
            .collect()
    }

    /// The writable union of the mount at `mountpoint`.
    pub fn overlay(&self, mountpoint: &Path) -> Option<Arc<Overlay>> {
        self.lock().live.get(mountpoint).and_then(|l| l.mount.overlay().cloned())
    }

    /// Forgets the mounts someone unmounted behind our back (`umount DIR`).
    pub fn reap(&self) {
        let ended: Vec<Live> = {
            let mut mounts = self.lock();
            let gone: Vec<PathBuf> = mounts
                .live
                .iter()
                .filter(|(_, l)| l.mount.has_ended())
                .map(|(p, _)| p.clone())
                .collect();
            gone.iter().filter_map(|p| mounts.live.remove(p)).collect()
        };
        for live in ended {
            tracing::info!(mountpoint = %live.spec.mountpoint.display(), "unmounted from outside");
            self.finish(live);
        }
    }

    /// Unmounts everything; `forget` also deletes the durable records (a
    /// `daemon stop`), else a later start mounts them again (`SIGTERM`).
    pub fn shutdown(&self, forget: bool) {
        let all: Vec<Live> = std::mem::take(&mut self.lock().live).into_values().collect();
        for live in all {
            let mountpoint = live.spec.mountpoint.clone();
            let key = Store::mount_key(&mountpoint);
            let record = std::fs::read(self.record_path(&key)).ok();
            if let Err(e) = detach(&mountpoint, false) {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot unmount");
            }
            self.finish(live);
            if let (false, Some(record)) = (forget, record) {
                let _ = crate::durable::write_atomic(&self.record_path(&key), &record);
            }
        }
    }

    /// Serves again every recorded mount: over its held connection when
    /// the keeper has one (nothing was ever unmounted), else mounted anew
    /// at the same place (after a reboot, or when both processes died).
    pub fn reattach(&self, held: Vec<(HeldMount, OwnedFd)>) {
        let mut held: HashMap<String, (HeldMount, OwnedFd)> =
            held.into_iter().map(|(h, fd)| (h.key.clone(), (h, fd))).collect();
        let recorded = self.recorded();
        for (key, (mount, _)) in
            held.iter().filter(|(k, _)| !recorded.iter().any(|(rk, _)| rk == *k))
        {
            tracing::warn!(mountpoint = %mount.mountpoint.display(), "a held mount has no record; unmounting it");
            let _ = detach(&mount.mountpoint, true);
            let _ = self.link.forget(key);
        }
        let work: Vec<(String, Recorded, Option<OwnedFd>)> = recorded
            .into_iter()
            .map(|(key, rec)| {
                let fd = held.remove(&key).map(|(_, fd)| fd);
                (key, rec, fd)
            })
            .collect();
        std::thread::scope(|s| {
            for (key, recorded, fd) in work {
                s.spawn(move || {
                    let mountpoint = recorded.spec.mountpoint.clone();
                    let connection = match fd {
                        Some(fd) => Connection::Adopt(fd),
                        None => {
                            clear_dead_mount(&mountpoint);
                            Connection::New
                        }
                    };
                    match self.start(recorded.spec, connection, recorded.mounted_at) {
                        Ok(live) => {
                            self.lock().live.insert(mountpoint, live);
                        }
                        Err(e) => {
                            tracing::error!(mountpoint = %mountpoint.display(), error = %e, "cannot serve a recorded mount again; forgetting it");
                            let _ = detach(&mountpoint, true);
                            let _ = std::fs::remove_file(self.record_path(&key));
                            let _ = self.link.forget(&key);
                        }
                    }
                });
            }
        });
    }

    /// The durable records, by key.
    fn recorded(&self) -> Vec<(String, Recorded)> {
        let Ok(entries) = std::fs::read_dir(self.paths.mounts_dir()) else { return Vec::new() };
        let mut recorded = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(key) =
                path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Recorded>(&b).map_err(|e| e.to_string()))
            {
                Ok(rec) => recorded.push((key.to_string(), rec)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable mount record; ignoring it")
                }
            }
        }
        recorded
    }
}

/// Detaches what is left at `mountpoint` of a mount whose server died (it
/// answers `ENOTCONN`, though the kernel may still answer a `stat` of its
/// root from its cache, so mountinfo decides), so it can be mounted again.
fn clear_dead_mount(mountpoint: &Path) {
    while is_rmount_mount(mountpoint) {
        if let Err(e) = detach(mountpoint, true) {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot detach a dead mount");
            return;
        }
    }
}
