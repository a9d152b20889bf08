//! Layer blobs: one streaming pass over a tar layer (plain, gzip or zstd,
//! detected by magic bytes) builds a [`LayerIndex`] — the file table plus the
//! random-access map of the compressed blob — and [`LayerReader`] serves reads
//! of the uncompressed tar stream from the blob through that map.
//!
//! CONTRACT shared with `fs` (do not change field meanings without updating it):
//! * `Entry::path` is relative, normalised (no `.`/`..`/empty components, no
//!   leading or trailing `/`); the root directory of the layer is `""`.
//! * A `.wh.NAME` tar entry becomes `EntryKind::Whiteout` with path `dir/NAME`;
//!   `.wh..wh..opq` becomes `EntryKind::Opaque` with path `dir`. Whiteout and
//!   opaque markers never appear as real files.
//! * `EntryKind::File::offset` is the byte offset of the file's data in the
//!   *uncompressed* tar stream; read it with [`LayerReader::read_at`].
//! * `EntryKind::Hardlink::target` is a normalised path inside the same layer
//!   that names an earlier `File` entry (indexing fails otherwise).
//! * When a path appears twice in one layer, the last entry wins; the index
//!   keeps only that one.

use crate::digest::Digest;
use serde::{Deserialize, Serialize};

/// One entry of a layer, after PAX/GNU long names and xattrs are applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Normalised relative path (see the module contract).
    pub path: Box<str>,
    /// What the entry is.
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes from PAX `SCHILY.xattr.*` records, sorted by name.
    pub xattrs: Box<[Xattr]>,
}

/// One extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Full name, e.g. `user.foo` or `security.capability`.
    pub name: Box<str>,
    /// Raw value.
    pub value: Box<[u8]>,
}

/// The kind of an entry and the data that only that kind has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file whose data starts at `offset` in the uncompressed tar stream.
    File {
        /// Offset of the data in the uncompressed tar stream.
        offset: u64,
        /// Length of the data.
        size: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink {
        /// Link target exactly as stored (may be absolute or contain `..`).
        target: Box<str>,
    },
    /// A hard link to an earlier file of the same layer.
    Hardlink {
        /// Normalised path of the linked-to file.
        target: Box<str>,
    },
    /// A character device.
    CharDevice {
        /// Device number (`makedev(major, minor)`).
        rdev: u64,
    },
    /// A block device.
    BlockDevice {
        /// Device number (`makedev(major, minor)`).
        rdev: u64,
    },
    /// A named pipe.
    Fifo,
    /// `.wh.NAME`: hides `NAME` of lower layers.
    Whiteout,
    /// `.wh..wh..opq`: the directory at `path` hides all lower content.
    Opaque,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

/// A layer's file table and the map for random access into its blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerIndex {
    /// Digest of the (compressed) blob this index describes.
    pub blob_digest: Digest,
    /// Digest of the uncompressed tar (the config's `diff_id`).
    pub diff_id: Digest,
    /// Compression detected from the blob's magic bytes.
    pub compression: Compression,
    /// Size of the uncompressed tar stream.
    pub uncompressed_size: u64,
    /// Entries in tar order (later duplicates removed).
    pub entries: Vec<Entry>,
}

/// Errors from indexing or reading a layer. (Layer helper: extend freely.)
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// I/O on the blob or the index cache.
    #[error("layer {digest}: {source}")]
    Io {
        /// The blob.
        digest: Digest,
        /// The cause.
        source: std::io::Error,
    },
}

/// Random access to the uncompressed tar stream of one layer blob.
///
/// Cheap to share between threads (`&self` reads); holds the index.
pub struct LayerReader {
    index: std::sync::Arc<LayerIndex>,
}

impl LayerReader {
    /// Opens the layer blob at `blob_path`: loads its index from
    /// `index_dir` (keyed by `blob_digest`) or builds it with one pass over the
    /// blob (verifying the blob digest) and persists it there. Decompressed
    /// spans are kept in the shared `cache`.
    pub fn open(
        blob_path: &std::path::Path,
        blob_digest: &Digest,
        index_dir: &std::path::Path,
        cache: std::sync::Arc<crate::cache::SpanCache>,
    ) -> Result<Self, LayerError> {
        let _ = (blob_path, blob_digest, index_dir, cache);
        todo!("layer helper")
    }

    /// The layer's index.
    pub fn index(&self) -> &std::sync::Arc<LayerIndex> {
        &self.index
    }

    /// Reads up to `buf.len()` bytes of the uncompressed tar stream at
    /// `offset`; returns fewer only at the end of the stream.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, LayerError> {
        let _ = (offset, buf);
        todo!("layer helper")
    }
}
