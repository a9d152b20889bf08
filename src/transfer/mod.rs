//! Moving images between a registry and the local store: `pull` (manifest,
//! platform choice, config and layers in parallel, each layer indexed while
//! it streams in) and `push` (blobs that are missing upstream, then the
//! manifest). Progress is reported through [`Progress`], so the CLI can draw
//! bars and library callers can ignore it. `index_artifact` publishes and
//! fetches layer indexes as an OCI artifact referring to the image;
//! `estargz` makes them from eStargz layers' tables of contents.

mod estargz;
mod index_artifact;
mod pipe;
mod pull;
mod push;

pub use index_artifact::{
    build_index_artifact, fetch_index_artifact, IndexArtifactReport, IndexedLayer, ListBlob,
    INDEX_ARTIFACT_TYPE, LAYER_DIGEST_ANNOTATION, LAYER_INDEX_MEDIA_TYPE,
};
pub use pull::{pull, LayerData, PullOptions, Pulled};
pub use push::{push, PushOptions, Pushed};

use crate::digest::Digest;

/// How one blob got to where it had to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobOutcome {
    /// Its bytes were sent or received.
    Transferred,
    /// The destination had it already.
    Existing,
    /// The registry linked it from another repository (`from`).
    Mounted {
        /// The source repository.
        from: String,
    },
}

/// Progress of a transfer, one blob at a time (several run in parallel).
pub trait Progress: Sync {
    /// A blob of `size` bytes is about to move.
    fn blob_started(&self, _digest: &Digest, _size: u64) {}
    /// `bytes` more bytes of the blob moved.
    fn blob_advanced(&self, _digest: &Digest, _bytes: u64) {}
    /// The blob is done.
    fn blob_finished(&self, _digest: &Digest, _outcome: &BlobOutcome) {}
}

/// Progress that nobody watches.
pub struct NoProgress;

impl Progress for NoProgress {}

/// Why a pull or push failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Talking to the registry failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A layer could not be indexed (corrupt, wrong digest, not a tar).
    #[error(transparent)]
    Layer(#[from] crate::layer::LayerError),
    /// A malformed reference.
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    /// A manifest, index or config that is not what it should be.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which document.
        what: String,
        /// Why.
        reason: String,
    },
}
