//! The union tree of a layer stack, the writable overlay on top of it, the
//! FUSE adapters and mount/umount.

pub mod error;
pub mod fuse;
pub mod lazy;
pub mod metered;
pub mod metrics;
pub mod mount;
pub mod overlay;
pub mod passthrough;
pub mod record;
pub mod union;
pub mod workers;
pub mod writable;

pub use error::FsError;
pub use fuse::ImageFs;
pub use lazy::{LayerSource, Prefetch, RemoteOptions};
pub use mount::{
    open_image, serve, unmount_image, Connection, LayerPool, Mount, MountError, MountOptions,
    OpenedImage, Server,
};
pub use overlay::{Overlay, UpperDirs};
pub use union::{EntryRef, Node, UnionTree, ROOT_INO};
