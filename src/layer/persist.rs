//! The on-disk form of a [`LayerIndex`], so a second mount does not re-read
//! the blob: `MAGIC`, a format version, then the index in postcard. An index
//! file that is unreadable, of another version, or for another blob is
//! treated as absent (the caller rebuilds it), never trusted.

use super::LayerIndex;
use crate::digest::Digest;
use crate::durable::write_atomic;
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 6] = b"RMIDX\0";
/// Bump when the index layout changes; older files are then rebuilt.
const VERSION: u16 = 3;

/// Where the index of `blob` lives under `index_dir`.
pub fn index_path(index_dir: &Path, blob: &Digest) -> PathBuf {
    index_dir.join("sha256").join(format!("{}.idx", blob.hex()))
}

/// The index as bytes: `MAGIC`, version, postcard. Also the payload of
/// index artifacts in registries.
pub fn encode_index(index: &LayerIndex) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64 * 1024);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    match postcard::to_extend(index, bytes) {
        Ok(bytes) => bytes,
        // Serializing into a Vec fails only on types postcard cannot encode.
        Err(e) => unreachable!("LayerIndex always encodes: {e}"),
    }
}

/// Decodes [`encode_index`]'s bytes; `None` unless they are a current-version
/// index of `blob`.
pub fn decode_index(bytes: &[u8], blob: &Digest) -> Option<LayerIndex> {
    let body = bytes.strip_prefix(MAGIC.as_slice())?;
    let (version, body) = body.split_at_checked(2)?;
    if version != VERSION.to_le_bytes() {
        return None;
    }
    let index: LayerIndex = postcard::from_bytes(body).ok()?;
    (&index.blob_digest == blob).then_some(index)
}

/// Whether a current-version index of `blob` is persisted (header check only).
pub fn has_index(index_dir: &Path, blob: &Digest) -> bool {
    use std::io::Read;
    let mut header = [0u8; MAGIC.len() + 2];
    std::fs::File::open(index_path(index_dir, blob))
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok_and(|()| {
            header[..MAGIC.len()] == MAGIC[..] && header[MAGIC.len()..] == VERSION.to_le_bytes()
        })
}

/// Writes `index` durably under `index_dir`.
pub fn save_index(index_dir: &Path, index: &LayerIndex) -> io::Result<()> {
    write_atomic(&index_path(index_dir, &index.blob_digest), &encode_index(index))
}

/// The persisted index of `blob`, or `None` if there is no usable one.
pub fn load_index(index_dir: &Path, blob: &Digest) -> Option<LayerIndex> {
    decode_index(&std::fs::read(index_path(index_dir, blob)).ok()?, blob)
}
