//! The union tree of a layer stack, the FUSE adapter and mount/umount.

pub mod union;

pub use union::{EntryRef, Node, UnionTree, ROOT_INO};
