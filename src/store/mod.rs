//! The local content-addressed store, in OCI image-layout form so other
//! tools (`skopeo`, `umoci`) can read it directly:
//!
//! ```text
//! ROOT/oci-layout            {"imageLayoutVersion":"1.0.0"}
//! ROOT/index.json            one manifest descriptor per tag
//! ROOT/blobs/sha256/<hex>    manifests, configs, layers — each verified on the way in
//! ROOT/indexes/sha256/…      persisted layer indexes (see `layer`)
//! ROOT/mounts/*.json         live mounts (see [`MountRecord`])
//! ```
//!
//! A tag is an `index.json` entry whose `org.opencontainers.image.ref.name`
//! annotation holds the *full* normalised reference
//! (`docker.io/library/nginx:latest`): one layout holds many repositories,
//! so the tag alone would be ambiguous. An entry without that annotation is
//! an untagged image, kept alive until `rmi`. Blobs are written before the
//! ref that reaches them, so a crash leaves at worst unreferenced blobs,
//! which `prune` removes.

mod archive;
mod gc;
mod image;
mod layout;
mod mounts;
mod save;
mod tags;
mod write;

pub use archive::{ArchiveFormat, LoadedImage};
pub use gc::{DiskUsage, PruneReport};
pub use image::{Image, LayerDesc};
pub use layout::RefEntry;
pub use mounts::{process_alive, MountRecord};
pub use tags::Removal;
pub use write::BlobWriter;

use crate::digest::Digest;
use std::path::{Path, PathBuf};

/// The annotation holding an entry's full reference.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O under the store root or on an input file.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Content does not hash to the digest that names it.
    #[error("blob {expected} has digest {actual}: the content is corrupt or was modified")]
    DigestMismatch {
        /// The digest it was named by.
        expected: Digest,
        /// What its bytes hash to.
        actual: Digest,
    },
    /// A manifest, index or config names a blob that is not there.
    #[error("blob {digest} is missing ({what})")]
    MissingBlob {
        /// The missing blob.
        digest: Digest,
        /// Who refers to it.
        what: String,
    },
    /// JSON that is not a valid manifest, index or config.
    #[error("{what} is not valid: {reason}")]
    Invalid {
        /// Which document.
        what: String,
        /// Why.
        reason: String,
    },
    /// No image matches a reference.
    #[error("no such image: {0} (see `rmount images`)")]
    NotFound(String),
    /// An id prefix matches several images.
    #[error("{0} matches more than one image; use a longer id or a name")]
    Ambiguous(String),
    /// A reference string is malformed.
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    /// The image is in use by a mount.
    #[error("image {image} is mounted at {mountpoint}; unmount it first or use -f")]
    InUse {
        /// The image id.
        image: Digest,
        /// Where it is mounted.
        mountpoint: PathBuf,
    },
    /// An input is neither an OCI layout nor a docker-archive.
    #[error(
        "{0}: not an OCI layout (oci-layout + index.json) or a docker-archive (manifest.json)"
    )]
    UnknownArchive(PathBuf),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// The store rooted at a state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let store = Self { root: root.to_path_buf() };
        layout::init(&store)?;
        Ok(store)
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
}
