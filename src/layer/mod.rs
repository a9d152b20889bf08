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
//!   keeps only that one. (An `Opaque` marker and its directory's own entry
//!   share a path and are both kept.)
//!
//! An eStargz layer can also be indexed from its table of contents alone
//! ([`index_from_toc`]), without reading the blob; its "uncompressed
//! stream" is then a virtual one (see [`EstargzMap`]).

mod build;
mod estargz;
mod gzip;
mod persist;
mod plain;
mod reader;
mod remote;
mod scan;
mod source;
mod zstd;

pub use build::build_index;
pub use estargz::{
    index_from_toc, read_footer, read_toc, EstargzChunk, EstargzMap, Toc, TocError,
    FOOTER_SIZE as ESTARGZ_FOOTER_SIZE, TOC_DIGEST_ANNOTATION,
};
pub use gzip::GzipMap;
pub use persist::{decode_index, encode_index, has_index, index_path, load_index, save_index};
pub use plain::PlainMap;
pub use reader::LayerReader;
pub use remote::{FetchStats, RemoteBlob};
pub use scan::ScanError;
pub use source::{BlobSource, LocalBlob};
pub use zstd::ZstdMap;

use crate::digest::Digest;
use serde::{Deserialize, Serialize};

/// Uncompressed bytes between checkpoints: the unit of decompression and caching.
pub const SPAN_SIZE: usize = 4 << 20;

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
    /// How to find an uncompressed offset in the blob.
    pub access: AccessMap,
}

/// The random-access map of a blob: one type per format.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AccessMap {
    /// Uncompressed offsets are blob offsets; chunk digests for remote reads.
    Plain(PlainMap),
    /// gzip checkpoints.
    Gzip(GzipMap),
    /// zstd frames.
    Zstd(ZstdMap),
    /// eStargz chunks, from the layer's table of contents.
    Estargz(EstargzMap),
}

impl AccessMap {
    /// Number of chunks: the units a remote read fetches and verifies (a
    /// gzip span, a zstd frame, a [`SPAN_SIZE`] piece of a plain blob, an
    /// eStargz file chunk).
    pub fn chunk_count(&self) -> usize {
        match self {
            AccessMap::Plain(map) => map.chunk_digests.len(),
            AccessMap::Gzip(map) => map.checkpoints.len(),
            AccessMap::Zstd(map) => map.frames.len(),
            AccessMap::Estargz(map) => map.chunks.len(),
        }
    }

    /// The blob bytes of chunk `i` and how to verify them.
    pub fn chunk(&self, i: usize) -> (std::ops::Range<u64>, ChunkCheck<'_>) {
        match self {
            AccessMap::Plain(map) => (map.chunk_range(i), ChunkCheck::Blob(&map.chunk_digests[i])),
            AccessMap::Gzip(map) => {
                (map.span_input_range(i), ChunkCheck::Blob(&map.checkpoints[i].span_digest))
            }
            AccessMap::Zstd(map) => (map.frame_range(i), ChunkCheck::Blob(&map.frames[i].digest)),
            AccessMap::Estargz(map) => {
                let chunk = &map.chunks[i];
                (chunk.in_offset..chunk.in_end, ChunkCheck::Inflated(chunk))
            }
        }
    }
}

/// What a chunk's digest covers, so that whoever fetches the chunk can
/// verify it before anyone sees a byte of it.
#[derive(Debug, Clone, Copy)]
pub enum ChunkCheck<'a> {
    /// The sha256 of the chunk's bytes in the blob (gzip spans, zstd
    /// frames, plain pieces): indexes built from the whole blob know it.
    Blob(&'a Digest),
    /// eStargz: the table of contents only knows the sha256 of the file
    /// bytes a chunk inflates to, so the compressed bytes are verified by
    /// inflating them and finding those file bytes.
    Inflated(&'a EstargzChunk),
}

impl ChunkCheck<'_> {
    /// The digest the chunk is checked against.
    pub fn digest(&self) -> &Digest {
        match self {
            ChunkCheck::Blob(digest) => digest,
            ChunkCheck::Inflated(chunk) => &chunk.digest,
        }
    }

    /// Whether `data` (the chunk's blob bytes) is what the index describes;
    /// if not, what was found instead (a digest, or why nothing matched).
    pub fn verify(&self, data: &[u8]) -> Result<(), String> {
        match self {
            ChunkCheck::Blob(expected) => {
                let actual = Digest::of(data);
                if &actual == *expected {
                    Ok(())
                } else {
                    Err(actual.to_string())
                }
            }
            ChunkCheck::Inflated(chunk) => chunk.decode(data).map(drop).map_err(|e| e.to_string()),
        }
    }
}

/// Errors from indexing or reading a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// I/O on the blob, or corrupt compressed data.
    #[error("layer {digest}: {source}")]
    Io {
        /// The blob.
        digest: Digest,
        /// The cause.
        source: std::io::Error,
    },
    /// The blob's content does not match its digest.
    #[error("layer {expected}: content has digest {actual}; the blob is corrupt, remove it and load the image again")]
    DigestMismatch {
        /// The digest the blob is stored under.
        expected: Digest,
        /// What its bytes hash to.
        actual: Digest,
    },
    /// The compressed data is corrupt or truncated.
    #[error("layer {digest}: {reason}; the blob is damaged, load or pull the image again")]
    Corrupt {
        /// The blob.
        digest: Digest,
        /// What the decompressor found.
        reason: String,
    },
    /// The tar stream inside the blob is unusable.
    #[error("layer {digest}: {source}")]
    Tar {
        /// The blob.
        digest: Digest,
        /// The cause.
        source: ScanError,
    },
    /// An eStargz table of contents (or its footer) is unusable.
    #[error("layer {digest}: eStargz table of contents: {source}")]
    Toc {
        /// The blob.
        digest: Digest,
        /// The cause.
        source: TocError,
    },
}

/// Raised (inside an `io::Error`) by the decompressors, so corrupt
/// compression can be told apart from a malformed tar.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CorruptData(String);

pub(crate) fn corrupt(reason: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, CorruptData(reason.into()))
}

/// The decompressor's complaint somewhere in `error`'s chain, if any.
pub(crate) fn corrupt_reason(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<CorruptData>() {
            return Some(found.0.clone());
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = inner.downcast_ref::<CorruptData>() {
                return Some(found.0.clone());
            }
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests;
