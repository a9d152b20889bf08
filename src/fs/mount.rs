//! Mounting and unmounting: opening an image's layers (indexing those
//! without a persisted index; shared between the mounts of one process
//! through a [`LayerPool`]), building the union tree, serving it over FUSE
//! (a new mount, or one adopted from a previous server), and recording the
//! mount so `rmi`, `df` and `commit` see it.

use super::lazy::{keep_stats, prefetch, prefetch_recorded, LayerSource, Prefetch, RemoteOptions};
use super::metered::Metered;
use super::metrics::FsMetrics;
use super::record::{save_list, Recorder};
use super::writable::WritableFs;
use super::{FsError, ImageFs, Overlay, UnionTree, UpperDirs};
use crate::cache::SpanCache;
use crate::digest::Digest;
use crate::layer::{load_index, LayerError, LayerReader, RemoteBlob};
use crate::reference::Reference;
use crate::registry::{Action, RegistryError};
use crate::store::{MountRecord, Store, StoreError};
use crate::sys::fuse_takeover::{adopt_session, resend_pending};
use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::mount::{unmount, UnmountFlags};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors of mount and umount.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The store failed (image not found, blob missing…).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A layer could not be indexed or opened.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The registry of a lazily mounted image is unusable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The upper directory is unusable.
    #[error("upper directory {path}: {source}")]
    Upper {
        /// The upper directory.
        path: PathBuf,
        /// The cause.
        source: FsError,
    },
    /// The mountpoint is unusable.
    #[error("mountpoint {path}: {reason}")]
    Mountpoint {
        /// The mountpoint.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The FUSE mount or unmount itself failed.
    #[error("{action} {path}: {source}")]
    Fuse {
        /// What was attempted.
        action: &'static str,
        /// The mountpoint.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// FUSE worker threads.
    pub threads: usize,
    /// Where changes go; `None` mounts read-only.
    pub upper: Option<UpperDirs>,
    /// How to read layers that are not in the store (lazy mounts).
    pub remote: Option<RemoteOptions>,
    /// Where to save the list of files read, when the mount ends.
    pub record: Option<PathBuf>,
    /// Where to count and time the FUSE requests served.
    pub metrics: Option<Arc<FsMetrics>>,
    /// Mount only the image's bottom this many layers (a containerd
    /// snapshot of one layer and those below it); `None`: all.
    pub layers: Option<usize>,
    /// Answer xattr requests even for an image without xattrs (see
    /// [`ImageFs::answer_xattrs`]); slower for `ls -l`.
    pub answer_xattrs: bool,
}

/// What the mounts of one process share: one bounded cache of
/// decompressed spans, and each layer opened once (its index in memory, its
/// blob source and, for a remote layer, its fetch state), whichever images
/// it belongs to.
pub struct LayerPool {
    cache: Arc<SpanCache>,
    open: Mutex<HashMap<Digest, Arc<PooledLayer>>>,
}

/// One opened layer: its reader and, when read from the registry, its
/// remote blob.
pub type PooledLayer = (LayerReader, Option<Arc<RemoteBlob>>);

impl LayerPool {
    /// A pool whose span cache keeps at most `cache_bytes`.
    pub fn new(cache_bytes: u64) -> Self {
        Self { cache: Arc::new(SpanCache::new(cache_bytes)), open: Mutex::new(HashMap::new()) }
    }

    /// The shared span cache.
    pub fn cache(&self) -> &Arc<SpanCache> {
        &self.cache
    }

    /// The opened layer `digest`, opened with `open` unless it already is.
    /// Two callers racing to open the same layer both open it; the first
    /// to finish is kept, so everyone ends up sharing one.
    fn get_or_open(
        &self,
        digest: &Digest,
        open: impl FnOnce() -> Result<PooledLayer, MountError>,
    ) -> Result<Arc<PooledLayer>, MountError> {
        if let Some(layer) = self.lock().get(digest) {
            return Ok(layer.clone());
        }
        let opened = Arc::new(open()?);
        Ok(self.lock().entry(digest.clone()).or_insert(opened).clone())
    }

    /// Forgets the layers no mount uses any more.
    pub fn prune(&self) {
        self.lock().retain(|_, layer| Arc::strong_count(layer) > 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<PooledLayer>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An image opened for mounting: its union filesystem and where each layer
/// is read from.
pub struct OpenedImage {
    /// The image.
    pub image: crate::store::Image,
    /// The merged read-only tree.
    pub fs: ImageFs,
    /// One per layer, bottom first.
    pub layers: Vec<LayerSource>,
}

/// Opens every layer of `reference`'s image (in parallel, each through the
/// pool) and merges them. A layer whose blob is in the store is read from
/// there (indexed now if its index is missing); with `remote`, a layer that
/// is not is read from the registry, which needs its index in the index
/// cache (a lazy pull put it there). `layers` keeps only the bottom ones.
pub fn open_image(
    store: &Store,
    reference: &str,
    pool: &LayerPool,
    remote: Option<&RemoteOptions>,
    layers: Option<usize>,
) -> Result<OpenedImage, MountError> {
    let mut image = store.resolve(reference)?;
    if let Some(count) = layers {
        image.layers.truncate(count);
    }
    let index_dir = store.index_dir();
    let cache = pool.cache();
    let repository = match remote {
        Some(remote) if !image.layers.iter().all(|l| store.blob_path(&l.digest).exists()) => {
            let name = image.reference.as_deref().unwrap_or(reference);
            let parsed = name.parse::<Reference>().map_err(StoreError::from)?;
            Some(remote.client.repository(&parsed, Action::Pull)?)
        }
        _ => {
            store.check_complete(&image)?;
            None
        }
    };
    let open_layer = |layer: &crate::store::LayerDesc| -> Result<PooledLayer, MountError> {
        let path = store.blob_path(&layer.digest);
        let (Some(remote), Some(repository), false) = (remote, &repository, path.exists()) else {
            return Ok((LayerReader::open(&path, &layer.digest, &index_dir, cache.clone())?, None));
        };
        let index =
            load_index(&index_dir, &layer.digest).ok_or_else(|| StoreError::MissingBlob {
                digest: layer.digest.clone(),
                what: "layer without a local index; pull the image".into(),
            })?;
        let blob = Arc::new(RemoteBlob::new(
            repository.clone(),
            layer.digest.clone(),
            remote.disk.clone(),
            remote.fetch_timeout,
        ));
        let reader = LayerReader::with_index(Arc::new(index), blob.clone(), cache.clone());
        Ok((reader, Some(blob)))
    };
    let opened: Vec<Result<_, MountError>> = std::thread::scope(|s| {
        let handles: Vec<_> = image
            .layers
            .iter()
            .map(|layer| s.spawn(|| pool.get_or_open(&layer.digest, || open_layer(layer))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut readers = Vec::new();
    let mut layers = Vec::new();
    for (desc, opened) in image.layers.iter().zip(opened) {
        let pooled = opened?;
        let (reader, remote) = &*pooled;
        layers.push(LayerSource {
            digest: desc.digest.clone(),
            size: desc.size,
            index: reader.index().clone(),
            remote: remote.clone(),
            reader: reader.clone(),
            in_use: pooled.clone(),
        });
        readers.push(reader.clone());
    }
    let tree = UnionTree::build(readers.iter().map(|r| r.index().clone()).collect());
    Ok(OpenedImage { image, fs: ImageFs::new(tree, readers), layers })
}

fn fuse_config(reference: &str, threads: usize, read_only: bool, clone_fd: bool) -> Config {
    let root = rustix::process::geteuid().is_root();
    let mut config = Config::default();
    config.mount_options = vec![
        if read_only { MountOption::RO } else { MountOption::RW },
        MountOption::FSName(format!("rmount:{reference}")),
        MountOption::Subtype("rmount".into()),
        MountOption::Suid,
        MountOption::Dev,
        MountOption::DefaultPermissions,
    ];
    config.acl = if root { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(threads.max(1));
    config.clone_fd = clone_fd;
    config
}

/// How a mount reaches the kernel.
pub enum Connection {
    /// Mount anew at the mountpoint.
    New,
    /// Serve this `/dev/fuse` fd of a mount that is already there, whose
    /// previous server stopped or died (the daemon's restart).
    Adopt(OwnedFd),
}

/// Who serves a mount, for its record.
#[derive(Debug, Clone)]
pub struct Server {
    /// The process whose life the mount's life follows (the daemon's
    /// keeper, which outlives restarts of the process that serves).
    pub pid: u32,
    /// The daemon's control socket; `None` for a mount served by its own
    /// process (`--no-daemon`).
    pub daemon_socket: Option<PathBuf>,
}

impl Server {
    /// This process, serving one mount.
    pub fn this_process() -> Self {
        Self { pid: std::process::id(), daemon_socket: None }
    }
}

/// A mount being served.
pub struct Mount {
    /// Its record (as `rmount df`, `rmi` and `commit` see it).
    pub record: MountRecord,
    background: BackgroundSession,
    /// A duplicate of the connection's `/dev/fuse` fd (see [`Mount::device`]).
    device: OwnedFd,
    layers: Arc<Vec<LayerSource>>,
    overlay: Option<Arc<Overlay>>,
    recorder: Option<(Arc<Recorder>, PathBuf)>,
}

impl Mount {
    /// Opens `reference` and serves it at `mountpoint` (absolute and
    /// canonical) through `connection`, sharing `pool`'s layers and cache.
    pub fn start(
        store: &Store,
        reference: &str,
        mountpoint: &Path,
        options: &MountOptions,
        pool: &LayerPool,
        connection: Connection,
        server: &Server,
    ) -> Result<Mount, MountError> {
        let mountpoint = mountpoint.to_path_buf();
        let OpenedImage { image, mut fs, layers } =
            open_image(store, reference, pool, options.remote.as_ref(), options.layers)?;
        let layers = Arc::new(layers);
        let recorder = options.record.as_ref().map(|_| Arc::new(Recorder::default()));
        if let Some(recorder) = &recorder {
            fs.record_into(recorder.clone());
        }
        if options.answer_xattrs {
            fs.answer_xattrs();
        }
        // Threads of a daemon share one fd: per-thread cloned fds would die
        // with the process, aborting the requests in flight on them.
        let clone_fd = server.daemon_socket.is_none();
        let mut config = fuse_config(reference, options.threads, options.upper.is_none(), clone_fd);
        let mut overlay = None;
        let (background, device) = match &options.upper {
            None => {
                let fs = Metered::new(fs, options.metrics.clone());
                launch(fs, &mountpoint, &config, connection, |_| {})?
            }
            Some(dirs) => {
                let upper = Overlay::new(fs, dirs)
                    .map_err(|source| MountError::Upper { path: dirs.upper.clone(), source })?;
                let upper = Arc::new(upper);
                // One request thread (see `WritableFs`); the pool reads.
                config.n_threads = Some(1);
                let fs = Metered::new(
                    WritableFs::new(upper.clone(), options.threads),
                    options.metrics.clone(),
                );
                let notify = upper.clone();
                let launched =
                    launch(fs, &mountpoint, &config, connection, move |n| notify.set_notifier(n))?;
                overlay = Some(upper);
                launched
            }
        };
        let record = MountRecord {
            mountpoint: mountpoint.clone(),
            reference: image.reference.clone().unwrap_or_else(|| reference.to_string()),
            image_id: image.config_digest.clone(),
            pid: server.pid,
            read_only: options.upper.is_none(),
            upper: options.upper.as_ref().map(|d| d.upper.clone()),
            work: options.upper.as_ref().map(|d| d.work.clone()),
            daemon: server.daemon_socket.clone(),
        };
        if let Err(e) = store.add_mount(&record) {
            let _ = unmount(&mountpoint, UnmountFlags::DETACH);
            return Err(e.into());
        }
        if layers.iter().any(|l| l.remote.is_some()) {
            let stats = store.mount_stats_path(&mountpoint);
            keep_stats(
                stats,
                record.reference.clone(),
                mountpoint.clone(),
                Arc::downgrade(&layers),
            );
            match options.remote.as_ref().map(|r| &r.prefetch) {
                Some(Prefetch::All) => {
                    prefetch(layers.clone(), options.remote.as_ref().and_then(|r| r.prefetch_rate))
                }
                Some(Prefetch::Recorded(list)) => prefetch_recorded(layers.clone(), list.clone()),
                Some(Prefetch::None) | None => {}
            }
        }
        let recorder = recorder.zip(options.record.clone());
        Ok(Mount { record, background, device, layers, overlay, recorder })
    }

    /// The connection's `/dev/fuse` fd: whoever holds a duplicate keeps the
    /// mount alive (answering) if this process dies.
    pub fn device(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// The layers, with their fetch statistics.
    pub fn layers(&self) -> &Arc<Vec<LayerSource>> {
        &self.layers
    }

    /// The writable union, if the mount is writable.
    pub fn overlay(&self) -> Option<&Arc<Overlay>> {
        self.overlay.as_ref()
    }

    /// Has the session ended (the mount was unmounted, by us or anyone)?
    pub fn has_ended(&self) -> bool {
        self.background.guard.is_finished()
    }

    /// Waits for the session to end, then forgets the mount and saves the
    /// recorded file list (`--record`).
    pub fn wait(self, store: &Store) -> Result<(), MountError> {
        let Mount { record, background, layers, recorder, .. } = self;
        let mountpoint = record.mountpoint;
        let result = background.join().map_err(|source| MountError::Fuse {
            action: "serving",
            path: mountpoint.clone(),
            source,
        });
        store.remove_mount(&mountpoint)?;
        if let Some((recorder, path)) = recorder {
            let list = recorder.list(|entry| LayerSource::recorded_file(&layers, entry));
            if let Err(e) = save_list(&path, &list) {
                tracing::error!(path = %path.display(), error = %e, "cannot save the recorded file list");
            }
        }
        result
    }
}

/// Starts serving `fs` through `connection`, handing the session's notifier
/// to `notifier` before it starts; returns the running session and a
/// duplicate of its device fd.
fn launch<FS: fuser::Filesystem + Send + 'static>(
    fs: FS,
    mountpoint: &Path,
    config: &Config,
    connection: Connection,
    notifier: impl FnOnce(fuser::Notifier),
) -> Result<(BackgroundSession, OwnedFd), MountError> {
    let fuse_err =
        |action, source| MountError::Fuse { action, path: mountpoint.to_path_buf(), source };
    let adopted = matches!(connection, Connection::Adopt(_));
    let session = match connection {
        Connection::New => {
            fuser::Session::new(fs, mountpoint, config).map_err(|e| fuse_err("mounting at", e))?
        }
        Connection::Adopt(device) => adopt_session(fs, device, config.acl, config.clone())
            .map_err(|e| fuse_err("taking over", e))?,
    };
    let device = session.as_fd().try_clone_to_owned().map_err(|e| fuse_err("serving", e))?;
    notifier(session.notifier());
    let background = session.spawn().map_err(|e| fuse_err("serving", e))?;
    if adopted {
        // Requests the previous server read but never answered.
        resend_pending(device.as_fd()).map_err(|e| fuse_err("taking over", e))?;
    }
    Ok((background, device))
}

/// Mounts `reference` at `mountpoint` in this process and serves it until
/// it is unmounted or the process gets SIGTERM/SIGINT/SIGHUP (then it
/// unmounts itself), keeping at most `cache_bytes` of decompressed spans.
/// `ready` runs once the mount answers requests.
pub fn serve(
    store: &Store,
    reference: &str,
    mountpoint: &Path,
    options: &MountOptions,
    cache_bytes: u64,
    ready: impl FnOnce(),
) -> Result<(), MountError> {
    let mountpoint = canonical_dir(mountpoint)?;
    crate::sys::malloc::return_large_buffers_to_the_os();
    let pool = LayerPool::new(cache_bytes);
    let server = Server::this_process();
    let mount =
        Mount::start(store, reference, &mountpoint, options, &pool, Connection::New, &server)?;
    unmount_on_signal(mountpoint);
    ready();
    mount.wait(store)
}

/// A thread that detaches the mount on a termination signal, which ends the
/// session loop and lets `serve` clean up.
fn unmount_on_signal(mountpoint: PathBuf) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = unmount(&mountpoint, UnmountFlags::DETACH);
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle termination signals: {e}"),
    }
}

/// `path` made absolute and canonical, which must be a directory.
pub fn canonical_dir(path: &Path) -> Result<PathBuf, MountError> {
    let bad = |reason: String| MountError::Mountpoint { path: path.to_path_buf(), reason };
    let canonical = path.canonicalize().map_err(|e| bad(e.to_string()))?;
    if !canonical.is_dir() {
        return Err(bad("not a directory".into()));
    }
    Ok(canonical)
}

/// The absolute path of a mountpoint to unmount. A mount whose serving
/// process died answers every `stat` with `ENOTCONN`; its path is then made
/// absolute from its parent instead.
pub fn mountpoint_to_unmount(path: &Path) -> Result<PathBuf, MountError> {
    let bad = |reason: String| MountError::Mountpoint { path: path.to_path_buf(), reason };
    let dead = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    let absolute = match path.canonicalize() {
        Ok(absolute) => absolute,
        Err(e) if dead(&e) => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent.unwrap_or(Path::new("."));
            let parent = parent.canonicalize().map_err(|e| bad(e.to_string()))?;
            parent.join(path.file_name().unwrap_or_default())
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    match std::fs::metadata(&absolute) {
        Ok(meta) if meta.is_dir() => Ok(absolute),
        Ok(_) => Err(bad("not a directory".into())),
        Err(e) if dead(&e) => Ok(absolute),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Unmounts an rmount mount: a plain unmount, a lazy detach when it is busy
/// (or at once with `force`), then waits for the serving process to exit.
/// With `discard`, the mount's upper and work directories are deleted.
pub fn unmount_image(
    store: &Store,
    mountpoint: &Path,
    force: bool,
    discard: bool,
) -> Result<(), MountError> {
    let mountpoint = mountpoint_to_unmount(mountpoint)?;
    let record = store.mount_at(&mountpoint)?;
    if record.is_none() && !is_rmount_mount(&mountpoint) {
        return Err(MountError::Mountpoint {
            path: mountpoint,
            reason: "not mounted by rmount (see /proc/self/mountinfo)".into(),
        });
    }
    detach(&mountpoint, force)?;
    if let Some(record) = &record {
        wait_for_exit(record.pid, Duration::from_secs(10));
        store.remove_mount(&mountpoint)?;
    }
    if discard {
        let (upper, work) =
            match record.as_ref().and_then(|r| Some((r.upper.clone()?, r.work.clone()?))) {
                Some(dirs) => dirs,
                None => store.default_upper(&mountpoint),
            };
        discard_changes(&upper, &work)?;
    }
    Ok(())
}

/// Unmounts `mountpoint` (absolute): a plain unmount, or a lazy detach when
/// it is busy (at once with `force`). Its server's session then ends.
pub fn detach(mountpoint: &Path, force: bool) -> Result<(), MountError> {
    let fuse_err = |source: rustix::io::Errno| MountError::Fuse {
        action: "unmounting",
        path: mountpoint.to_path_buf(),
        source: source.into(),
    };
    let flags =
        if force { UnmountFlags::FORCE | UnmountFlags::DETACH } else { UnmountFlags::empty() };
    match unmount(mountpoint, flags) {
        Err(rustix::io::Errno::BUSY) => {
            tracing::warn!("{} is busy; detaching it lazily", mountpoint.display());
            unmount(mountpoint, UnmountFlags::DETACH).map_err(fuse_err)
        }
        other => other.map_err(fuse_err),
    }
}

/// Deletes a mount's upper and work directories (`umount --discard`).
pub fn discard_changes(upper: &Path, work: &Path) -> Result<(), MountError> {
    for dir in [upper, work] {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(MountError::Fuse {
                    action: "discarding",
                    path: dir.to_path_buf(),
                    source: e,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Waits up to `limit` for process `pid` to exit.
pub fn wait_for_exit(pid: u32, limit: Duration) {
    let start = Instant::now();
    while crate::store::process_alive(pid) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Is `mountpoint` an rmount FUSE mount (per /proc/self/mountinfo)? Its
/// type is `fuse` or `fuse.rmount` and its source `rmount:REF`.
pub fn is_rmount_mount(mountpoint: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let target = mountpoint.to_string_lossy();
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { return false };
        let (fstype, source) = (fields.get(dash + 1), fields.get(dash + 2));
        fields.get(4) == Some(&&*target)
            && fstype.is_some_and(|t| t.starts_with("fuse"))
            && source.is_some_and(|s| s.starts_with("rmount:"))
    })
}
