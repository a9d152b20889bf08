//! The union tree of a layer stack, the FUSE adapter and mount/umount.

pub mod fuse;
pub mod mount;
pub mod union;

pub use fuse::{FsError, ImageFs};
pub use mount::{open_image, serve, unmount_image, MountError, MountOptions};
pub use union::{EntryRef, Node, UnionTree, ROOT_INO};
