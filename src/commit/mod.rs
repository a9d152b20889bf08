//! Commit, diff and export: a mount's upper layer becomes a new image
//! (`docker commit`), a list of changes (`docker diff`) or, merged with its
//! image, one flat tar (`docker export`).
//!
//! Plan, then act: [`plan::plan`] walks the upper dir with the lower
//! [`UnionTree`](crate::fs::UnionTree) and returns the layer's entries as
//! data; [`tar::write_tar`] streams them; [`layer::write_layer`] compresses
//! and stores the blob, hashing the tar (`diff_id`) and the blob (digest)
//! in the same pass; [`image`] makes the config and manifest.
//!
//! Everything runs in the calling process, never through the mountpoint:
//! the image's layers are opened from the store as a mount opens them, the
//! upper dir is read directly (`sys::upper::Dir`), and the serving process
//! is paused meanwhile ([`pause::Pause`]).
//!
//! Crash safety follows the store's rule: the layer blob, then the config,
//! then the manifest are written (each durable, under its digest), and only
//! then the ref. A crash before the ref leaves unreferenced blobs (or a
//! `.tmp-*` file), which `prune` removes; no ref ever names a missing blob.

pub mod change;
pub mod image;
pub mod layer;
pub mod pause;
pub mod pgzip;
pub mod plan;
pub mod tar;

pub use change::{Change, ChangeError};
pub use layer::{Compression, WrittenLayer};
pub use plan::{Kind, LayerEntry, Mode, Plan};

use crate::digest::Digest;
use crate::fs::LayerPool;
use crate::fs::{ImageFs, MountError, OpenedImage, RemoteOptions};
use crate::reference::Reference;
use crate::store::{Image, RefEntry, Store, StoreError};
use crate::sys::upper::Dir;
use pause::Pause;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of commit, diff and export.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image's layers could not be opened.
    #[error(transparent)]
    Open(#[from] MountError),
    /// No rmount mount is recorded at this path.
    #[error("{0} is not an rmount mount (see `rmount df`)")]
    NotMounted(PathBuf),
    /// Reading the upper dir failed.
    #[error("reading the upper directory {path}: {source}")]
    Upper {
        /// The upper dir.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Pausing the serving process failed.
    #[error("pausing the serving process {pid}: {source}")]
    Pause {
        /// Its pid.
        pid: u32,
        /// The cause.
        source: std::io::Error,
    },
    /// The daemon serving the mount would not pause it.
    #[error("pausing the mount through the daemon: {0}")]
    DaemonPause(#[from] crate::daemon::DaemonError),
    /// Writing the layer or the output failed.
    #[error("writing the layer: {0}")]
    Write(std::io::Error),
    /// A bad `--change`.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// A bad input (SOURCE_DATE_EPOCH, an output inside the mount…).
    #[error("{0}")]
    Invalid(String),
}

/// What to commit, diff or export: an image and maybe a mount's upper dir,
/// with the mount's server paused while this lives.
pub struct Source {
    /// The image (the lower layers).
    pub image: Image,
    /// Its layers, opened as a mount opens them.
    pub lower: ImageFs,
    /// The upper dir, for a writable mount.
    pub upper: Option<Dir>,
    /// Where the upper dir is.
    pub upper_path: Option<PathBuf>,
    /// Keeps the mount still; dropped last.
    _pause: Option<Hold>,
}

/// What keeps a live mount still while its upper is read.
/// Each variant is held for its `Drop`.
enum Hold {
    /// Its own serving process, stopped.
    Process { _stopped: Pause },
    /// A daemon's mount, frozen while this connection stays open (the
    /// daemon resumes it however we exit).
    Daemon { _lease: crate::daemon::client::DaemonClient },
}

fn pause_through_daemon(
    socket: &Path,
    mountpoint: &Path,
) -> Result<crate::daemon::client::DaemonClient, crate::daemon::DaemonError> {
    use crate::daemon::protocol::Request;
    let limit = std::time::Duration::from_secs(15);
    let (mut client, _) = crate::daemon::client::DaemonClient::wait_ready(socket, limit)?;
    client.call(Request::Pause { mountpoint: mountpoint.to_path_buf() })?;
    Ok(client)
}

/// Bytes of decompressed spans the commit process keeps: it reads each
/// lower file once, front to back.
const CACHE_BYTES: u64 = 64 << 20;

impl Source {
    /// The image `reference`, without changes.
    pub fn image(store: &Store, reference: &str) -> Result<Source, CommitError> {
        let pool = LayerPool::new(CACHE_BYTES);
        // A lazily pulled image reads its missing layers from the registry.
        let remote = RemoteOptions::defaults(store.root()).ok();
        let OpenedImage { image, fs: lower, .. } =
            crate::fs::open_image(store, reference, &pool, remote.as_ref(), None)?;
        Ok(Source { image, lower, upper: None, upper_path: None, _pause: None })
    }

    /// An active containerd snapshot on an image rmount serves lazily: the
    /// image and the snapshot's upper dir. A snapshot served by the daemon's
    /// FUSE union (`daemon` is its control socket) is paused while this
    /// lives; over kernel overlayfs, like `docker commit --pause=false`,
    /// nothing stops the container meanwhile.
    pub fn snapshot(
        store: &Store,
        snapshot: &crate::snapshotter::ActiveOnImage,
        daemon: &Path,
    ) -> Result<Source, CommitError> {
        let source = Source::image(store, &snapshot.remote.image)?;
        if source.image.layers.len() != snapshot.remote.layers {
            return Err(CommitError::Invalid(format!(
                "snapshot {} sits on {} of the {} layers of {}; only a snapshot on a whole image can be committed",
                snapshot.key,
                snapshot.remote.layers,
                source.image.layers.len(),
                snapshot.remote.image
            )));
        }
        let pause = match &snapshot.fuse_union {
            Some(union) => Some(Hold::Daemon { _lease: pause_through_daemon(daemon, union)? }),
            None => None,
        };
        source.with_upper(snapshot.upper.clone(), pause)
    }

    /// The live mount at `mountpoint` (absolute, canonical), with its serving
    /// process paused until this is dropped. Nothing here touches the mount.
    pub fn mount(store: &Store, mountpoint: &Path) -> Result<Source, CommitError> {
        let record = store
            .mount_at(mountpoint)?
            .ok_or_else(|| CommitError::NotMounted(mountpoint.to_path_buf()))?;
        let source = Source::image(store, &record.image_id.to_string())?;
        let Some(upper) = record.upper else { return Ok(source) };
        // A relative --upper is relative to the server's working directory.
        let upper = match upper.is_absolute() {
            true => upper,
            false => std::fs::read_link(format!("/proc/{}/cwd", record.pid))
                .map_err(|source| CommitError::Upper { path: upper.clone(), source })?
                .join(&upper),
        };
        let pause = match &record.daemon {
            Some(socket) => Hold::Daemon { _lease: pause_through_daemon(socket, mountpoint)? },
            None => Hold::Process {
                _stopped: Pause::stop(record.pid)
                    .map_err(|source| CommitError::Pause { pid: record.pid, source })?,
            },
        };
        source.with_upper(upper, Some(pause))
    }

    /// This source with the changes in `upper`, kept still by `pause`.
    fn with_upper(mut self, upper: PathBuf, pause: Option<Hold>) -> Result<Source, CommitError> {
        let dir = Dir::open(&upper)
            .map_err(|source| CommitError::Upper { path: upper.clone(), source })?;
        self.upper = Some(dir);
        self.upper_path = Some(upper);
        self._pause = pause;
        Ok(self)
    }

    /// The entries of a layer of this source's changes ([`Mode::Diff`]) or
    /// of its whole merged tree ([`Mode::Full`]).
    pub fn plan(&self, mode: Mode) -> Result<Plan, CommitError> {
        if self.upper.is_none() && mode == Mode::Diff {
            return Ok(Plan::default());
        }
        plan::plan(self.upper.as_ref(), &self.lower, mode).map_err(|source| CommitError::Upper {
            path: self.upper_path.clone().unwrap_or_default(),
            source,
        })
    }

    /// Writes the merged tree as one tar (`export`).
    pub fn export(&self, out: &mut dyn Write) -> Result<Plan, CommitError> {
        let plan = self.plan(Mode::Full)?;
        tar::write_tar(&plan, self.upper.as_ref(), &self.lower, out).map_err(CommitError::Write)?;
        Ok(plan)
    }
}

/// How to commit.
#[derive(Debug, Clone)]
pub struct CommitOptions {
    /// The new name (`None`: an untagged image).
    pub reference: Option<String>,
    /// Layer compression.
    pub compression: Compression,
    /// Author, message, changes, time.
    pub describe: image::Describe,
}

/// A committed image.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The image id (config digest).
    pub id: Digest,
    /// The manifest digest.
    pub manifest: Digest,
    /// The new layer.
    pub layer: WrittenLayer,
    /// The normalised name it was tagged with.
    pub reference: Option<String>,
    /// Paths skipped (sockets).
    pub skipped: Vec<String>,
}

/// The normalised name a commit will tag, checked before any work.
pub fn normalise_reference(reference: &str) -> Result<String, CommitError> {
    let parsed = reference.parse::<Reference>().map_err(StoreError::from)?;
    Ok(parsed.without_digest().to_string())
}

/// Commits `source`'s changes as a new image in `store`.
pub fn commit(
    store: &Store,
    source: &Source,
    options: &CommitOptions,
) -> Result<Committed, CommitError> {
    let name = options.reference.as_deref().map(normalise_reference).transpose()?;
    let plan = source.plan(Mode::Diff)?;
    let layer = layer::write_layer(
        store,
        &plan,
        source.upper.as_ref(),
        &source.lower,
        options.compression,
    )?;
    let config = image::new_config(&source.image.raw_config, &layer, &options.describe);
    let config_bytes =
        serde_json::to_vec(&config).map_err(|e| CommitError::Invalid(e.to_string()))?;
    let config_digest = store.put_blob_bytes(&config_bytes)?;
    let parents = source
        .image
        .layers
        .iter()
        .map(|l| image::descriptor(image::oci_layer_media_type(&l.media_type), &l.digest, l.size))
        .collect();
    let manifest = image::new_manifest(&config_digest, config_bytes.len() as u64, parents, &layer);
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| CommitError::Invalid(e.to_string()))?;
    let manifest_digest = store.put_blob_bytes(&manifest_bytes)?;
    store.set_ref(RefEntry {
        name: name.clone(),
        manifest: manifest_digest.clone(),
        media_type: image::MANIFEST_MEDIA_TYPE.to_string(),
        size: manifest_bytes.len() as u64,
    })?;
    let skipped = plan.skipped.iter().map(|p| format!("/{}", String::from_utf8_lossy(p))).collect();
    Ok(Committed { id: config_digest, manifest: manifest_digest, layer, reference: name, skipped })
}

/// One line of `diff`, as Docker prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// `/`-rooted path.
    #[serde(rename = "Path")]
    pub path: String,
    /// Docker's kind: 0 changed, 1 added, 2 deleted.
    #[serde(rename = "Kind")]
    pub kind: u8,
}

impl Difference {
    /// Docker's letter for the kind.
    pub fn letter(&self) -> char {
        ['C', 'A', 'D'][usize::from(self.kind.min(2))]
    }
}

/// The changes of `source` against its image, Docker's way: a path that the
/// image has is changed (C), one it lacks is added (A), a whiteout deletes (D).
pub fn diff(source: &Source) -> Result<Vec<Difference>, CommitError> {
    let plan = source.plan(Mode::Diff)?;
    let tree = source.lower.tree();
    let in_lower = |path: &[u8]| {
        std::str::from_utf8(path).ok().is_some_and(|p| {
            p.split('/').try_fold(crate::fs::ROOT_INO, |dir, name| tree.lookup(dir, name)).is_some()
        })
    };
    let mut out = Vec::new();
    for entry in &plan.entries {
        if entry.path.is_empty() || entry.kind == Kind::Opaque {
            continue;
        }
        let kind = match entry.kind {
            Kind::Whiteout => 2,
            _ if in_lower(&entry.path) => 0,
            _ => 1,
        };
        out.push(Difference { path: format!("/{}", String::from_utf8_lossy(&entry.path)), kind });
    }
    Ok(out)
}
