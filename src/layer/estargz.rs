//! eStargz layers indexed from their table of contents, so a lazy mount
//! needs two small range reads of the blob instead of all of it.
//!
//! An eStargz blob (stargz-snapshotter's format) is an ordinary gzip layer
//! cut into many gzip members: each regular file's data starts a new member
//! (a large file starts one every chunk, 4 MiB by default), the TOC
//! `stargz.index.json` is the last tar entry in a member of its own, and a
//! 51-byte footer — an empty member whose header EXTRA field (subfield
//! `SG`) holds `%016x` of the TOC's compressed offset and `STARGZ` — ends
//! the blob. The TOC lists every tar entry's metadata and, per data chunk,
//! the compressed offset of its member and the sha256 of its *uncompressed*
//! bytes (`chunkDigest`). The layer descriptor's
//! `containerd.io/snapshot/stargz/toc.digest` annotation is the sha256 of
//! the TOC JSON: the (verified) manifest vouches for the TOC, and the TOC
//! for every chunk.
//!
//! [`index_from_toc`] turns the TOC into a [`LayerIndex`] the rest of rmount
//! cannot tell from one built by a tar scan:
//!
//! * entries go through the tar scan's own rules (path normalisation,
//!   whiteouts, hardlinks naming earlier entries, last entry wins, mode
//!   bits, sorted xattrs), and the TOC's own tar entry `stargz.index.json`
//!   is listed too — it is a file of the layer's tar, and a mount of the
//!   same image from the store (indexed by a tar scan) shows it;
//! * the "uncompressed stream" the index addresses is *virtual*: the file
//!   data of every chunk, concatenated in TOC order, without tar headers
//!   or padding. `EntryKind::File::offset` points into it and
//!   `uncompressed_size` is its length. The real tar stream's length is
//!   unknown without inflating the whole blob, and so is its sha256: the
//!   index's `diff_id` is taken from the image config by the caller;
//! * each TOC data chunk is one [`EstargzChunk`], fetched as the bytes from
//!   its member's offset to the next member offset of any chunk (or the
//!   TOC's). Unlike gzip spans, zstd frames and plain pieces, whose digest
//!   covers the *compressed* bytes, a chunk's digest covers the file bytes
//!   it inflates to: [`super::ChunkCheck::Inflated`] verifies a fetched
//!   chunk by inflating it.
//!
//! Where a chunk's bytes sit in its inflated member: stargz-snapshotter
//! starts the member at the data (the file's tar header ends the member
//! before), so at `innerOffset` (0 unless several small files share a
//! member); other writers may put the header, and the previous file's
//! padding, in front of the data. [`EstargzChunk::decode`] tries
//! `innerOffset`, then every position right after a tar header block near
//! the start, and keeps the one whose sha256 is `chunkDigest`. Nothing else
//! is ever served. Chunks that share a member (`innerOffset`) each fetch
//! and cache the whole member.
//!
//! Not supported (the layer is then indexed from the whole blob): the
//! legacy 47-byte stargz footer, zstd:chunked, TOCs outside the blob.
//! TOC mtimes are whole seconds rounded by the writer, where a tar scan
//! truncates a PAX mtime's fraction: sub-second mtimes may differ by one.

use super::scan::{checked, hardlink_target, normalize, to_entry, whiteout, EntryList, ScanError};
use super::{AccessMap, Compression, Entry, EntryKind, LayerError, LayerIndex, Xattr};
use crate::digest::Digest;
use base64::Engine as _;
use flate2::read::{GzDecoder, MultiGzDecoder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::Path;

/// Size of the eStargz footer.
pub const FOOTER_SIZE: u64 = 51;
/// Name of the TOC's tar entry.
pub const TOC_NAME: &str = "stargz.index.json";
/// The layer descriptor annotation holding the TOC JSON's digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Largest TOC JSON accepted (a layer of a million files stays below it).
const MAX_TOC_SIZE: u64 = 512 << 20;
/// How far into an inflated member a chunk's data may start when its tar
/// header (and the previous file's padding) come first.
const HEADER_SCAN: u64 = 256 << 10;
const BLOCK: usize = 512;

/// Why a TOC (or its footer) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TocError {
    /// The blob does not end with an eStargz footer.
    #[error("no eStargz footer: {0}")]
    Footer(String),
    /// The TOC's gzip member or tar entry is broken.
    #[error("TOC member: {0}")]
    Member(String),
    /// The TOC is not the JSON eStargz specifies.
    #[error("malformed TOC JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// An entry the TOC lists is inconsistent.
    #[error("entry {name:?}: {reason}")]
    Entry {
        /// The entry's name in the TOC.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TOC's offsets do not fit the blob.
    #[error("{0}")]
    Layout(String),
}

/// The random-access map of an eStargz layer: one chunk per TOC data chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EstargzMap {
    /// In virtual offset order (TOC order), the TOC's own data last.
    pub chunks: Vec<EstargzChunk>,
    /// Compressed offset of the TOC's gzip member.
    pub toc_offset: u64,
}

/// One chunk of file data: where its gzip member is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EstargzChunk {
    /// Compressed offset of the gzip member holding the chunk (TOC `offset`).
    pub in_offset: u64,
    /// End of the bytes fetched: the next member offset of any chunk, or
    /// the TOC's (the TOC chunk: the footer's).
    pub in_end: u64,
    /// Where the data starts in the inflated bytes (TOC `innerOffset`).
    pub inner_offset: u64,
    /// Start of the data in the index's virtual uncompressed stream.
    pub out_offset: u64,
    /// Length of the data (non-zero).
    pub len: u64,
    /// sha256 of the data: of the file bytes, not the compressed bytes.
    pub digest: Digest,
}

impl EstargzChunk {
    /// The chunk's data from `input`, its bytes `in_offset..in_end`:
    /// inflated, then found by digest (see the module doc). Fails as
    /// corrupt data unless some placement hashes to `digest`.
    pub fn decode(&self, input: &[u8]) -> io::Result<Vec<u8>> {
        let limit = self.inner_offset.saturating_add(self.len).saturating_add(HEADER_SCAN);
        let mut out = Vec::with_capacity(limit.min(input.len() as u64 * 4) as usize);
        let inflated = MultiGzDecoder::new(input).take(limit).read_to_end(&mut out);
        if let Some(at) = self.place(&out) {
            return Ok(out[at..at + self.len as usize].to_vec());
        }
        Err(super::corrupt(match inflated {
            Err(e) => format!("eStargz chunk at {}: gzip: {e}", self.in_offset),
            Ok(_) => format!(
                "eStargz chunk at {}: no {} bytes of its {} inflated bytes have digest {}",
                self.in_offset,
                self.len,
                out.len(),
                self.digest
            ),
        }))
    }

    /// Where in `out` the chunk's data is: at `inner_offset`, else right
    /// after a tar header block within [`HEADER_SCAN`].
    fn place(&self, out: &[u8]) -> Option<usize> {
        let len = usize::try_from(self.len).ok()?;
        let fits = |at: usize| at.checked_add(len).is_some_and(|end| end <= out.len());
        let matches = |at: usize| fits(at) && Digest::of(&out[at..at + len]) == self.digest;
        if let Ok(inner) = usize::try_from(self.inner_offset) {
            if matches(inner) {
                return Some(inner);
            }
        }
        let last = out.len().checked_sub(len)?.min(HEADER_SCAN as usize);
        (BLOCK..=last).find(|&at| is_tar_header(&out[at - BLOCK..at]) && matches(at))
    }
}

/// A ustar/GNU header block with a valid checksum.
fn is_tar_header(block: &[u8]) -> bool {
    if block.len() != BLOCK || &block[257..262] != b"ustar" {
        return false;
    }
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| if (148..156).contains(&i) { u32::from(b' ') } else { u32::from(b) })
        .sum();
    stored == Some(sum)
}

/// The TOC's compressed offset from the blob's last [`FOOTER_SIZE`] bytes
/// (`tail` may be longer; its end is used).
pub fn read_footer(tail: &[u8]) -> Result<u64, TocError> {
    let footer = tail
        .len()
        .checked_sub(FOOTER_SIZE as usize)
        .map(|start| &tail[start..])
        .ok_or_else(|| TocError::Footer(format!("the blob has only {} bytes", tail.len())))?;
    let mut decoder = GzDecoder::new(footer);
    let mut rest = Vec::new();
    decoder
        .read_to_end(&mut rest)
        .map_err(|e| TocError::Footer(format!("not an empty gzip member: {e}")))?;
    if !rest.is_empty() {
        return Err(TocError::Footer("the last gzip member is not empty".into()));
    }
    let extra = decoder.header().and_then(|h| h.extra()).unwrap_or_default();
    let field = match extra {
        [b'S', b'G', lo, hi, field @ ..] if u16::from_le_bytes([*lo, *hi]) == 22 => field,
        _ => {
            return Err(TocError::Footer("no `SG` subfield of 22 bytes in the EXTRA field".into()))
        }
    };
    let (hex, magic) = field.split_at(16);
    if magic != b"STARGZ" {
        return Err(TocError::Footer("the `SG` subfield does not end with STARGZ".into()));
    }
    std::str::from_utf8(hex).ok().and_then(|h| u64::from_str_radix(h, 16).ok()).ok_or_else(|| {
        TocError::Footer(format!("bad TOC offset {:?}", String::from_utf8_lossy(hex)))
    })
}

/// A layer's table of contents, read from its gzip member.
#[derive(Debug, Clone)]
pub struct Toc {
    /// The JSON as stored; its sha256 is the `toc.digest` annotation.
    pub json: Vec<u8>,
    /// The TOC's own tar entry, as a tar scan describes it.
    entry: Entry,
    /// Where the JSON starts in the member's inflated bytes.
    data_offset: u64,
}

impl Toc {
    /// The sha256 of the JSON (to compare with the annotation).
    pub fn digest(&self) -> Digest {
        Digest::of(&self.json)
    }
}

/// Reads the TOC from `member`, the blob's bytes from the TOC offset to
/// the footer: one gzip member holding the tar entry `stargz.index.json`.
pub fn read_toc(member: &[u8]) -> Result<Toc, TocError> {
    let bad = |e: io::Error| TocError::Member(e.to_string());
    let mut archive = tar::Archive::new(GzDecoder::new(member).take(MAX_TOC_SIZE + 64 * 1024));
    let mut entries = archive.entries().map_err(bad)?;
    let mut item =
        entries.next().ok_or_else(|| TocError::Member("no tar entry".into()))?.map_err(bad)?;
    let entry = to_entry(&mut item)
        .map_err(|e| TocError::Member(e.to_string()))?
        .filter(|e| &*e.path == TOC_NAME && matches!(e.kind, EntryKind::File { .. }))
        .ok_or_else(|| TocError::Member(format!("the first tar entry is not {TOC_NAME}")))?;
    if item.size() > MAX_TOC_SIZE {
        return Err(TocError::Member(format!("{} bytes of TOC is too many", item.size())));
    }
    let data_offset = item.raw_file_position();
    let mut json = Vec::with_capacity(item.size() as usize);
    item.read_to_end(&mut json).map_err(bad)?;
    Ok(Toc { json, entry, data_offset })
}

/// The TOC JSON (only the fields rmount uses).
#[derive(Deserialize)]
struct Jtoc {
    version: u32,
    entries: Vec<TocEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    modtime: String,
    #[serde(default)]
    link_name: String,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    dev_major: u32,
    #[serde(default)]
    dev_minor: u32,
    /// Values are base64 (Go's encoding of `[]byte`).
    #[serde(default)]
    xattrs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    inner_offset: u64,
    #[serde(default)]
    chunk_offset: u64,
    #[serde(default)]
    chunk_size: u64,
    #[serde(default)]
    chunk_digest: Option<String>,
}

/// A regular file whose chunks are still being listed.
struct OpenFile {
    name: String,
    size: u64,
    /// File offset the next chunk must start at.
    next: u64,
}

/// Builds the index of an eStargz blob (`blob_digest`, `blob_size` bytes,
/// TOC member at `toc_offset`) from its verified `toc`. `diff_id` comes
/// from the image config: the index cannot compute it (see the module doc).
pub fn index_from_toc(
    toc: &Toc,
    blob_digest: &Digest,
    blob_size: u64,
    toc_offset: u64,
    diff_id: Digest,
) -> Result<LayerIndex, LayerError> {
    let toc_err = |source| LayerError::Toc { digest: blob_digest.clone(), source };
    let tar_err = |source| LayerError::Tar { digest: blob_digest.clone(), source };
    let footer_start =
        blob_size.checked_sub(FOOTER_SIZE).filter(|&end| toc_offset < end).ok_or_else(|| {
            toc_err(TocError::Layout(format!(
                "TOC offset {toc_offset} does not fit a blob of {blob_size} bytes"
            )))
        })?;
    let jtoc: Jtoc = serde_json::from_slice(&toc.json).map_err(|e| toc_err(TocError::Json(e)))?;
    if jtoc.version != 1 {
        let reason = format!("TOC version {} (only 1 is known)", jtoc.version);
        return Err(toc_err(TocError::Layout(reason)));
    }
    let mut list = EntryList::default();
    let mut chunks: Vec<EstargzChunk> = Vec::new();
    let mut open: Option<OpenFile> = None;
    let mut out = 0u64;
    for e in &jtoc.entries {
        let entry_err = |reason: String| toc_err(TocError::Entry { name: e.name.clone(), reason });
        if e.kind == "chunk" {
            let file = open.as_mut().filter(|f| f.next == e.chunk_offset).ok_or_else(|| {
                entry_err(format!("chunk at file offset {} follows no file", e.chunk_offset))
            })?;
            let chunk = data_chunk(e, file, toc_offset, out).map_err(entry_err)?;
            out += chunk.len;
            chunks.push(chunk);
            if file.next == file.size {
                open = None;
            }
            continue;
        }
        if let Some(file) = open.take() {
            let reason = format!("chunks cover {} of its {} bytes", file.next, file.size);
            return Err(toc_err(TocError::Entry { name: file.name, reason }));
        }
        let path = normalize(Path::new(&e.name))
            .ok_or_else(|| tar_err(ScanError::UnsafePath(e.name.clone())))?;
        let placed = match e.kind.as_str() {
            "reg" => match whiteout(&path) {
                Some((hidden, marker)) => (hidden, marker),
                None => (path, EntryKind::File { offset: out, size: e.size }),
            },
            "dir" => (path, EntryKind::Dir),
            "symlink" => (path, EntryKind::Symlink { target: e.link_name.as_str().into() }),
            "hardlink" => (
                path,
                EntryKind::Hardlink { target: hardlink_target(&e.link_name).map_err(tar_err)? },
            ),
            "char" => {
                (path, EntryKind::CharDevice { rdev: libc::makedev(e.dev_major, e.dev_minor) })
            }
            "block" => {
                (path, EntryKind::BlockDevice { rdev: libc::makedev(e.dev_major, e.dev_minor) })
            }
            "fifo" => (path, EntryKind::Fifo),
            other => return Err(entry_err(format!("unknown type {other:?}"))),
        };
        if e.kind == "reg" && e.size > 0 {
            if e.chunk_offset != 0 {
                return Err(entry_err(format!("first chunk at file offset {}", e.chunk_offset)));
            }
            let mut file = OpenFile { name: e.name.clone(), size: e.size, next: 0 };
            let chunk = data_chunk(e, &mut file, toc_offset, out).map_err(entry_err)?;
            out += chunk.len;
            chunks.push(chunk);
            if file.next < file.size {
                open = Some(file);
            }
        }
        let entry = to_index_entry(e, placed).map_err(entry_err)?;
        list.push(checked(entry, &e.name).map_err(tar_err)?).map_err(tar_err)?;
    }
    if let Some(file) = open {
        let reason = format!("chunks cover {} of its {} bytes", file.next, file.size);
        return Err(toc_err(TocError::Entry { name: file.name, reason }));
    }
    // Each chunk's bytes end where the next member of any chunk starts.
    let mut starts: Vec<u64> = chunks.iter().map(|c| c.in_offset).collect();
    starts.push(toc_offset);
    starts.sort_unstable();
    starts.dedup();
    for chunk in &mut chunks {
        let next = starts.partition_point(|&s| s <= chunk.in_offset);
        chunk.in_end = starts[next];
    }
    // The TOC's own entry, whose data is the JSON in the TOC member.
    let len = toc.json.len() as u64;
    let mut entry = toc.entry.clone();
    entry.kind = EntryKind::File { offset: out, size: len };
    if len > 0 {
        chunks.push(EstargzChunk {
            in_offset: toc_offset,
            in_end: footer_start,
            inner_offset: toc.data_offset,
            out_offset: out,
            len,
            digest: toc.digest(),
        });
        out += len;
    }
    list.push(entry).map_err(tar_err)?;
    Ok(LayerIndex {
        blob_digest: blob_digest.clone(),
        diff_id,
        compression: Compression::Gzip,
        uncompressed_size: out,
        entries: list.into_vec(),
        access: AccessMap::Estargz(EstargzMap { chunks, toc_offset }),
    })
}

/// The chunk a `reg` or `chunk` TOC entry describes, next in `file`.
fn data_chunk(
    e: &TocEntry,
    file: &mut OpenFile,
    toc_offset: u64,
    out_offset: u64,
) -> Result<EstargzChunk, String> {
    let rest = file.size - file.next;
    // chunkSize 0 means "to the end of the file".
    let len = if e.chunk_size == 0 { rest } else { e.chunk_size.min(rest) };
    if len == 0 || e.chunk_size > rest {
        return Err(format!("chunk of {} bytes at {} overruns the file", e.chunk_size, file.next));
    }
    if e.offset >= toc_offset {
        return Err(format!("data offset {} is not before the TOC at {toc_offset}", e.offset));
    }
    let digest = e
        .chunk_digest
        .as_deref()
        .ok_or("no chunkDigest")?
        .parse::<Digest>()
        .map_err(|err| err.to_string())?;
    file.next += len;
    Ok(EstargzChunk {
        in_offset: e.offset,
        in_end: toc_offset,
        inner_offset: e.inner_offset,
        out_offset,
        len,
        digest,
    })
}

/// The index entry of a non-chunk TOC entry whose path and kind are known.
fn to_index_entry(e: &TocEntry, (path, kind): (String, EntryKind)) -> Result<Entry, String> {
    let mtime = match e.modtime.as_str() {
        "" => 0,
        s => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|err| format!("modtime {s:?}: {err}"))?
            .timestamp(),
    };
    let mut xattrs = Vec::new();
    for (name, value) in e.xattrs.iter().flatten() {
        let value = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|err| format!("xattr {name}: {err}"))?;
        xattrs.push(Xattr { name: name.as_str().into(), value: value.into() });
    }
    xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Entry {
        path: path.into(),
        kind,
        mode: (e.mode & 0o7777) as u32,
        uid: e.uid,
        gid: e.gid,
        mtime,
        xattrs: xattrs.into(),
    })
}

#[cfg(test)]
mod tests;
