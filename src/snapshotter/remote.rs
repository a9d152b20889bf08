//! Remote (lazy) snapshots, the protocol stargz, SOCI and Nydus use with
//! containerd: when `Prepare` carries the target snapshot's name
//! (`containerd.io/snapshot.ref`) and the labels that say which image layer
//! it is (added by CRI, nerdctl and `rmount containerd pull`, or under
//! stargz's own names by `ctr-remote image rpull`), rmount mounts the image's layers up to that
//! one lazily, commits the target itself and answers `ALREADY_EXISTS`:
//! containerd then neither downloads nor unpacks the layer.
//!
//! A lazily served snapshot's `fs` holds the union of every layer below it
//! too, so the mounts of a snapshot on top stop at it (see `parent_ids`).
//! That is why a layer is served lazily only when its parent is (or it has
//! none) and an index for it exists (rmount never downloads a layer whole
//! for containerd); anything else falls back to containerd's ordinary
//! unpacking.

use super::{Mount, Result, SnapshotError, Snapshots};
use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The label naming the snapshot to commit (containerd's unpacker sets it).
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// The image the layer belongs to.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The layer's blob digest.
pub const LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// Every layer of the image, comma-separated (informational here).
pub const IMAGE_LAYERS_LABEL: &str = "containerd.io/snapshot/cri.image-layers";
/// The image, as stargz-snapshotter's `ctr-remote image rpull` names it.
pub const STARGZ_REFERENCE_LABEL: &str = "containerd.io/snapshot/remote/stargz.reference";
/// The layer's digest, as `ctr-remote image rpull` names it.
pub const STARGZ_DIGEST_LABEL: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Set on the snapshots rmount commits itself.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";

/// What a remote snapshot's `fs` mounts: the bottom `layers` layers of
/// `image`, a digest-pinned reference in rmount's store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayers {
    /// `NAME@sha256:…` of the image's manifest.
    pub image: String,
    /// How many layers, from the bottom.
    pub layers: usize,
}

/// A `Prepare` that asks for a layer to be served lazily.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LazyRequest {
    /// The committed snapshot to create.
    pub target: String,
    /// The image reference.
    pub image: String,
    /// The layer's digest.
    pub layer: Digest,
}

impl LazyRequest {
    /// The request these labels make, if they make one.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<LazyRequest> {
        let either = |ours: &str, stargz: &str| labels.get(ours).or_else(|| labels.get(stargz));
        Some(LazyRequest {
            target: labels.get(TARGET_LABEL)?.clone(),
            image: either(IMAGE_REF_LABEL, STARGZ_REFERENCE_LABEL)?.clone(),
            layer: either(LAYER_DIGEST_LABEL, STARGZ_DIGEST_LABEL)?.parse().ok()?,
        })
    }
}

/// What serves layers lazily: rmount's daemon (its store, registry client,
/// shared layer pool and mount table).
pub trait LazyLayers: Send + Sync {
    /// Where `layer` sits in `image` (fetching the image's metadata and
    /// layer indexes as a lazy mount does); `None` when it is not there.
    fn locate(
        &self,
        image: &str,
        layer: &Digest,
    ) -> std::result::Result<Option<RemoteLayers>, String>;
    /// Mounts `remote` at `at`: read-only, or writable over `upper` (its
    /// upper and work dirs, in kernel overlayfs' format).
    fn mount(
        &self,
        remote: &RemoteLayers,
        at: &Path,
        upper: Option<(PathBuf, PathBuf)>,
    ) -> std::result::Result<(), String>;
    /// Unmounts what [`LazyLayers::mount`] mounted at `at`; fine if nothing is.
    fn unmount(&self, at: &Path) -> std::result::Result<(), String>;
    /// Whether something serves `at`.
    fn is_mounted(&self, at: &Path) -> bool;
}

/// Serves `request` lazily if it can: creates and mounts the committed
/// target on `parent` and returns true (the caller answers
/// `ALREADY_EXISTS`). False means "unpack it the ordinary way"; why is
/// logged.
pub fn try_lazy(
    snapshots: &Snapshots,
    lazy: &dyn LazyLayers,
    parent: Option<&str>,
    request: &LazyRequest,
    labels: BTreeMap<String, String>,
) -> Result<bool> {
    let below = match parent {
        None => 0,
        Some(parent) => match snapshots.remote_of(parent)? {
            Some(remote) => remote.layers,
            None => {
                tracing::debug!(parent, "parent is not lazy; unpacking {}", request.layer);
                return Ok(false);
            }
        },
    };
    let remote = match lazy.locate(&request.image, &request.layer) {
        Ok(Some(remote)) if remote.layers == below + 1 => remote,
        Ok(found) => {
            tracing::warn!(image = %request.image, layer = %request.layer, ?found, below, "layer not where its parent says; unpacking it");
            return Ok(false);
        }
        Err(e) => {
            tracing::warn!(image = %request.image, error = %e, "cannot serve the image lazily; unpacking it");
            return Ok(false);
        }
    };
    let mut labels = labels;
    labels.insert(REMOTE_LABEL.to_owned(), "rmount".to_owned());
    let fs = snapshots.create_remote(&request.target, parent, labels, remote.clone())?;
    if let Err(e) = lazy.mount(&remote, &fs, None) {
        tracing::warn!(image = %remote.image, error = %e, "lazy mount failed; unpacking the layer");
        snapshots.remove(&request.target, |_| Ok(()))?;
        return Ok(false);
    }
    tracing::info!(target = %request.target, image = %remote.image, layers = remote.layers, "serving a layer lazily");
    Ok(true)
}

/// Mounts every remote snapshot that has no mount (a crash between its
/// commit and its mount, or a store moved to a new machine).
pub fn mount_missing(snapshots: &Snapshots, lazy: &dyn LazyLayers) -> Result<()> {
    for (name, fs, remote) in snapshots.remote_snapshots()? {
        if lazy.is_mounted(&fs) {
            continue;
        }
        lazy.mount(&remote, &fs, None).map_err(|e| {
            SnapshotError::FailedPrecondition(format!("mounting remote snapshot {name}: {e}"))
        })?;
    }
    Ok(())
}

/// Prepares active snapshot `key` on the lazily served `parent` as rmount's
/// writable FUSE union (for kernels whose overlayfs refuses a FUSE lower):
/// the daemon mounts the parent's layers with the snapshot's `fs` as upper
/// at its `rootfs`, which containerd bind-mounts.
pub fn prepare_fuse_union(
    snapshots: &Snapshots,
    lazy: &dyn LazyLayers,
    key: &str,
    parent: &str,
    labels: BTreeMap<String, String>,
) -> Result<Vec<Mount>> {
    let (mounts, dir, remote) = snapshots.prepare_fuse_union(key, parent, labels)?;
    let upper = Some((dir.join("fs"), dir.join("work")));
    if let Err(e) = lazy.mount(&remote, &dir.join("rootfs"), upper) {
        snapshots.remove(key, |_| Ok(()))?;
        return Err(SnapshotError::FailedPrecondition(format!("mounting {key}: {e}")));
    }
    Ok(mounts)
}

/// Commits active snapshot `key` as `name`, first unmounting its FUSE
/// union if it has one (its upper is then still).
pub fn commit(
    snapshots: &Snapshots,
    lazy: Option<&dyn LazyLayers>,
    name: &str,
    key: &str,
    labels: BTreeMap<String, String>,
) -> Result<()> {
    if let (Some(served), Some(lazy)) = (snapshots.served_at(key)?, lazy) {
        lazy.unmount(&served)
            .map_err(|e| SnapshotError::FailedPrecondition(format!("unmounting {key}: {e}")))?;
    }
    snapshots.commit(name, key, labels)
}

/// Removes `key`, unmounting it first when it is served lazily.
pub fn remove(snapshots: &Snapshots, lazy: Option<&dyn LazyLayers>, key: &str) -> Result<()> {
    snapshots.remove(key, |fs| match lazy {
        Some(lazy) => lazy
            .unmount(fs)
            .map_err(|e| SnapshotError::FailedPrecondition(format!("unmounting {key}: {e}"))),
        None => Err(SnapshotError::FailedPrecondition(format!(
            "{key} is served lazily and this snapshotter cannot unmount it"
        ))),
    })
}
