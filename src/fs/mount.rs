//! Mounting and unmounting: opening an image's layers (indexing those
//! without a persisted index), building the union tree, serving it over
//! FUSE, and recording the mount so `rmi` and `df` see it.

use super::lazy::{keep_stats, prefetch, prefetch_recorded, LayerSource, Prefetch, RemoteOptions};
use super::record::{save_list, Recorder};
use super::writable::WritableFs;
use super::{FsError, ImageFs, Overlay, UnionTree, UpperDirs};
use crate::cache::SpanCache;
use crate::layer::{load_index, LayerError, LayerReader, RemoteBlob};
use crate::reference::Reference;
use crate::registry::{Action, RegistryError};
use crate::store::{MountRecord, Store, StoreError};
use fuser::{Config, MountOption, SessionACL};
use rustix::mount::{unmount, UnmountFlags};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// Bytes of decompressed spans to keep in memory.
    pub cache_bytes: u64,
    /// FUSE worker threads.
    pub threads: usize,
    /// Where changes go; `None` mounts read-only.
    pub upper: Option<UpperDirs>,
    /// How to read layers that are not in the store (lazy mounts).
    pub remote: Option<RemoteOptions>,
    /// Where to save the list of files read, when the mount ends.
    pub record: Option<PathBuf>,
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

/// Opens every layer of `reference`'s image (in parallel) and merges them.
/// A layer whose blob is in the store is read from there (indexed now if
/// its index is missing); with `remote`, a layer that is not is read from
/// the registry, which needs its index in the index cache (a lazy pull put
/// it there).
pub fn open_image(
    store: &Store,
    reference: &str,
    cache: Arc<SpanCache>,
    remote: Option<&RemoteOptions>,
) -> Result<OpenedImage, MountError> {
    let image = store.resolve(reference)?;
    let index_dir = store.index_dir();
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
    let open_layer = |layer: &crate::store::LayerDesc| -> Result<(LayerReader, Option<Arc<RemoteBlob>>), MountError> {
        let path = store.blob_path(&layer.digest);
        let (Some(remote), Some(repository), false) = (remote, &repository, path.exists()) else {
            return Ok((LayerReader::open(&path, &layer.digest, &index_dir, cache.clone())?, None));
        };
        let index = load_index(&index_dir, &layer.digest).ok_or_else(|| StoreError::MissingBlob {
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
        let handles: Vec<_> =
            image.layers.iter().map(|layer| s.spawn(|| open_layer(layer))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut readers = Vec::new();
    let mut layers = Vec::new();
    for (desc, opened) in image.layers.iter().zip(opened) {
        let (reader, remote) = opened?;
        layers.push(LayerSource {
            digest: desc.digest.clone(),
            size: desc.size,
            index: reader.index().clone(),
            remote,
            reader: reader.clone(),
        });
        readers.push(reader);
    }
    let tree = UnionTree::build(readers.iter().map(|r| r.index().clone()).collect());
    Ok(OpenedImage { image, fs: ImageFs::new(tree, readers), layers })
}

fn fuse_config(reference: &str, threads: usize, read_only: bool) -> Config {
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
    config.clone_fd = true;
    config
}

/// Mounts `reference` at `mountpoint` and serves it until it is unmounted or
/// the process gets SIGTERM/SIGINT/SIGHUP (then it unmounts itself).
/// `ready` runs once the mount answers requests.
pub fn serve(
    store: &Store,
    reference: &str,
    mountpoint: &Path,
    options: &MountOptions,
    ready: impl FnOnce(),
) -> Result<(), MountError> {
    let mountpoint = canonical_dir(mountpoint)?;
    crate::sys::malloc::return_large_buffers_to_the_os();
    let cache = Arc::new(SpanCache::new(options.cache_bytes));
    let OpenedImage { image, mut fs, layers } =
        open_image(store, reference, cache, options.remote.as_ref())?;
    let layers = Arc::new(layers);
    let recorder = options.record.as_ref().map(|_| Arc::new(Recorder::default()));
    if let Some(recorder) = &recorder {
        fs.record_into(recorder.clone());
    }
    let fuse_err = |action, source| MountError::Fuse { action, path: mountpoint.clone(), source };
    let config = fuse_config(reference, options.threads, options.upper.is_none());
    let mount_err = |e| fuse_err("mounting at", e);
    let serve_err = |e| fuse_err("serving", e);
    let background = match &options.upper {
        None => fuser::Session::new(fs, &mountpoint, &config).map_err(mount_err)?.spawn(),
        Some(dirs) => {
            // Modes arrive already masked by the caller's umask; ours must
            // not mask them again.
            rustix::process::umask(rustix::fs::Mode::empty());
            let overlay = Overlay::new(fs, dirs)
                .map_err(|source| MountError::Upper { path: dirs.upper.clone(), source })?;
            let overlay = Arc::new(overlay);
            // One request thread (see `WritableFs`); the pool reads.
            let mut config = config;
            config.n_threads = Some(1);
            let fs = WritableFs::new(overlay.clone(), options.threads);
            let session = fuser::Session::new(fs, &mountpoint, &config).map_err(mount_err)?;
            overlay.set_notifier(session.notifier());
            session.spawn()
        }
    }
    .map_err(serve_err)?;
    let record = MountRecord {
        mountpoint: mountpoint.clone(),
        reference: image.reference.clone().unwrap_or_else(|| reference.to_string()),
        image_id: image.config_digest.clone(),
        pid: std::process::id(),
        read_only: options.upper.is_none(),
        upper: options.upper.as_ref().map(|d| d.upper.clone()),
        work: options.upper.as_ref().map(|d| d.work.clone()),
    };
    store.add_mount(&record)?;
    unmount_on_signal(mountpoint.clone());
    if layers.iter().any(|l| l.remote.is_some()) {
        let stats = store.mount_stats_path(&mountpoint);
        keep_stats(stats, record.reference.clone(), mountpoint.clone(), layers.clone());
        match options.remote.as_ref().map(|r| &r.prefetch) {
            Some(Prefetch::All) => {
                prefetch(layers.clone(), options.remote.as_ref().and_then(|r| r.prefetch_rate))
            }
            Some(Prefetch::Recorded(list)) => prefetch_recorded(layers.clone(), list.clone()),
            Some(Prefetch::None) | None => {}
        }
    }
    ready();
    let result = background.join().map_err(|e| fuse_err("serving", e));
    store.remove_mount(&mountpoint)?;
    if let (Some(recorder), Some(path)) = (&recorder, &options.record) {
        let list = recorder.list(|entry| LayerSource::recorded_file(&layers, entry));
        if let Err(e) = save_list(path, &list) {
            tracing::error!(path = %path.display(), error = %e, "cannot save the recorded file list");
        }
    }
    result
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

fn canonical_dir(path: &Path) -> Result<PathBuf, MountError> {
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
fn mountpoint_to_unmount(path: &Path) -> Result<PathBuf, MountError> {
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
    let fuse_err = |source: rustix::io::Errno| MountError::Fuse {
        action: "unmounting",
        path: mountpoint.clone(),
        source: source.into(),
    };
    let flags =
        if force { UnmountFlags::FORCE | UnmountFlags::DETACH } else { UnmountFlags::empty() };
    match unmount(&mountpoint, flags) {
        Err(rustix::io::Errno::BUSY) => {
            tracing::warn!("{} is busy; detaching it lazily", mountpoint.display());
            unmount(&mountpoint, UnmountFlags::DETACH).map_err(fuse_err)?;
        }
        other => other.map_err(fuse_err)?,
    }
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
        for dir in [upper, work] {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(MountError::Fuse { action: "discarding", path: dir, source: e })
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn wait_for_exit(pid: u32, limit: Duration) {
    let start = Instant::now();
    while crate::store::process_alive(pid) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Is `mountpoint` an rmount FUSE mount (per /proc/self/mountinfo)? Its
/// type is `fuse` or `fuse.rmount` and its source `rmount:REF`.
fn is_rmount_mount(mountpoint: &Path) -> bool {
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
