//! The local content-addressed store in OCI image-layout form.
//! (Store helper: implement; the signatures below are used by `fs` and `cli`.)

use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O under the store root.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The store rooted at a state directory.
pub struct Store {
    root: PathBuf,
}

/// A stored image: manifest, config and layer descriptors.
pub struct Image {
    /// The normalised reference it was resolved from, if it was a name.
    pub reference: Option<String>,
    /// Digest of the manifest.
    pub manifest_digest: Digest,
    /// Digest of the config = the image id.
    pub config_digest: Digest,
    /// Parsed config.
    pub config: oci_spec::image::ImageConfiguration,
    /// Layer blobs, bottom first.
    pub layers: Vec<LayerDesc>,
}

/// One layer blob of an image.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    /// Blob digest.
    pub digest: Digest,
    /// Media type as written in the manifest.
    pub media_type: String,
    /// Compressed size.
    pub size: u64,
}

/// A live mount, recorded so `rmi` can refuse and `df` can count it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    /// Absolute mountpoint.
    pub mountpoint: PathBuf,
    /// The reference the user mounted.
    pub reference: String,
    /// Image id (config digest).
    pub image_id: Digest,
    /// PID of the process serving the mount.
    pub pid: u32,
    /// Mounted read-only.
    pub read_only: bool,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Ok(Self { root: root.to_path_buf() })
    }
    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }
    /// Directory of persisted layer indexes.
    pub fn index_dir(&self) -> PathBuf {
        self.root.join("indexes")
    }
    /// Resolves a reference (name[:tag], name@digest, image id or id prefix).
    pub fn resolve(&self, reference: &str) -> Result<Image, StoreError> {
        let _ = reference;
        todo!("store helper")
    }
    /// Records a live mount.
    pub fn add_mount(&self, record: &MountRecord) -> Result<(), StoreError> {
        let _ = record;
        todo!("store helper")
    }
    /// Forgets the mount at `mountpoint`.
    pub fn remove_mount(&self, mountpoint: &Path) -> Result<(), StoreError> {
        let _ = mountpoint;
        todo!("store helper")
    }
    /// Live mounts (records whose serving process is gone are dropped).
    pub fn mounts(&self) -> Result<Vec<MountRecord>, StoreError> {
        todo!("store helper")
    }
}
