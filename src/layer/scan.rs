//! The tar half of the indexing pass: reads an uncompressed tar stream once
//! and turns it into [`Entry`]s, applying PAX/GNU long names, PAX overrides
//! and xattrs, and OCI whiteouts, and rejecting entries that could escape the
//! layer root.

use super::{Entry, EntryKind, Xattr};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path};
use tar::EntryType;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Why a tar stream could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The tar stream itself is broken or truncated.
    #[error("malformed tar: {0}")]
    Tar(#[source] std::io::Error),
    /// An entry name is absolute or contains `..`.
    #[error("entry {0:?} escapes the layer root (absolute path or `..`)")]
    UnsafePath(String),
    /// A hardlink names a file that is not in the layer before it.
    #[error("hardlink {path:?} points to {target:?}, which is not earlier in the layer")]
    MissingLinkTarget {
        /// The link.
        path: String,
        /// What it points to.
        target: String,
    },
    /// An entry kind rmount cannot serve.
    #[error("entry {path:?}: {what} is not supported")]
    Unsupported {
        /// The entry.
        path: String,
        /// What is unsupported.
        what: &'static str,
    },
}

/// Reads every entry of the tar stream `reader` into a list, in tar order,
/// keeping only the last entry for a path.
pub fn scan_tar<R: Read>(reader: R) -> Result<Vec<Entry>, ScanError> {
    let mut archive = tar::Archive::new(reader);
    let mut entries = EntryList::default();
    for item in archive.entries().map_err(ScanError::Tar)? {
        let mut item = item.map_err(ScanError::Tar)?;
        if let Some(entry) = to_entry(&mut item)? {
            entries.push(entry)?;
        }
    }
    Ok(entries.into_vec())
}

/// Entries in archive order as the index keeps them: a later entry for a
/// path replaces the earlier one in place, and a hardlink must name an
/// entry that came before it. Shared by the tar scan and the eStargz TOC,
/// so both describe a layer the same way.
#[derive(Default)]
pub(super) struct EntryList {
    entries: Vec<Entry>,
    /// An opaque marker shares its directory's path, so it is keyed apart.
    by_path: HashMap<(Box<str>, bool), usize>,
}

impl EntryList {
    /// Adds `entry`, replacing an earlier one of the same path.
    pub(super) fn push(&mut self, entry: Entry) -> Result<(), ScanError> {
        if let EntryKind::Hardlink { target } = &entry.kind {
            if !self.by_path.contains_key(&(target.clone(), false)) {
                return Err(ScanError::MissingLinkTarget {
                    path: entry.path.to_string(),
                    target: target.to_string(),
                });
            }
        }
        let key = (entry.path.clone(), entry.kind == EntryKind::Opaque);
        match self.by_path.get(&key) {
            Some(&i) => self.entries[i] = entry,
            None => {
                self.by_path.insert(key, self.entries.len());
                self.entries.push(entry);
            }
        }
        Ok(())
    }

    /// The entries, in order.
    pub(super) fn into_vec(self) -> Vec<Entry> {
        self.entries
    }
}

/// The entry of one tar member, or `None` for members that carry nothing
/// to serve (global PAX headers, unknown types).
pub(super) fn to_entry<R: Read>(item: &mut tar::Entry<'_, R>) -> Result<Option<Entry>, ScanError> {
    let raw_path = item.path().map_err(ScanError::Tar)?.into_owned();
    let display = raw_path.to_string_lossy().into_owned();
    let path = normalize(&raw_path).ok_or_else(|| ScanError::UnsafePath(display.clone()))?;
    let header = item.header();
    let entry_type = header.entry_type();
    let mode = header.mode().map_err(ScanError::Tar)? & 0o7777;
    let mut uid = header.uid().map_err(ScanError::Tar)? as u32;
    let mut gid = header.gid().map_err(ScanError::Tar)? as u32;
    let mut mtime = header.mtime().map_err(ScanError::Tar)? as i64;
    let mut xattrs = Vec::new();
    if let Some(pax) = item.pax_extensions().map_err(ScanError::Tar)? {
        for ext in pax {
            let ext = ext.map_err(ScanError::Tar)?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let number = || std::str::from_utf8(value).ok().map(str::trim);
            match key {
                "uid" => uid = number().and_then(|v| v.parse().ok()).unwrap_or(uid),
                "gid" => gid = number().and_then(|v| v.parse().ok()).unwrap_or(gid),
                // PAX times may carry a fraction; stat granularity here is seconds.
                "mtime" => {
                    mtime = number()
                        .and_then(|v| v.split('.').next())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(mtime)
                }
                k if k.starts_with("GNU.sparse") => {
                    return Err(ScanError::Unsupported { path: display, what: "a GNU sparse file" })
                }
                k => {
                    if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                        xattrs.push(Xattr { name: name.into(), value: value.into() });
                    }
                }
            }
        }
    }
    xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    let link_target = || -> Result<String, ScanError> {
        let link = item.link_name().map_err(ScanError::Tar)?;
        Ok(link.map(|l| l.to_string_lossy().into_owned()).unwrap_or_default())
    };
    let (path, kind) = match entry_type {
        EntryType::Regular | EntryType::Continuous => match whiteout(&path) {
            Some(marker) => marker,
            None => (path, EntryKind::File { offset: item.raw_file_position(), size: item.size() }),
        },
        EntryType::Directory => (path, EntryKind::Dir),
        EntryType::Symlink => (path, EntryKind::Symlink { target: link_target()?.into() }),
        EntryType::Link => {
            (path, EntryKind::Hardlink { target: hardlink_target(&link_target()?)? })
        }
        EntryType::Char => (path, EntryKind::CharDevice { rdev: device(item.header())? }),
        EntryType::Block => (path, EntryKind::BlockDevice { rdev: device(item.header())? }),
        EntryType::Fifo => (path, EntryKind::Fifo),
        EntryType::GNUSparse => {
            return Err(ScanError::Unsupported { path: display, what: "a GNU sparse file" })
        }
        // Global PAX headers and unknown types carry nothing to serve.
        _ => return Ok(None),
    };
    let entry = Entry { path: path.into(), kind, mode, uid, gid, mtime, xattrs: xattrs.into() };
    checked(entry, &display).map(Some)
}

/// The last checks every entry passes, whatever it was read from: only a
/// directory (or opaque marker) may be the layer root, and whiteout
/// markers carry no metadata of their own.
pub(super) fn checked(mut entry: Entry, display: &str) -> Result<Entry, ScanError> {
    if entry.path.is_empty() && entry.kind != EntryKind::Dir && entry.kind != EntryKind::Opaque {
        return Err(ScanError::UnsafePath(display.to_string()));
    }
    if matches!(entry.kind, EntryKind::Whiteout | EntryKind::Opaque) {
        (entry.mode, entry.uid, entry.gid, entry.mtime) = (0, 0, 0, 0);
        entry.xattrs = Box::default();
    }
    Ok(entry)
}

/// The normalised, non-root target of a hardlink.
pub(super) fn hardlink_target(target: &str) -> Result<Box<str>, ScanError> {
    normalize(Path::new(target))
        .filter(|t| !t.is_empty())
        .map(Into::into)
        .ok_or_else(|| ScanError::UnsafePath(target.to_string()))
}

fn device(header: &tar::Header) -> Result<u64, ScanError> {
    let major = header.device_major().map_err(ScanError::Tar)?.unwrap_or(0);
    let minor = header.device_minor().map_err(ScanError::Tar)?.unwrap_or(0);
    Ok(libc::makedev(major, minor))
}

/// `dir/.wh.NAME` → (`dir/NAME`, Whiteout); `dir/.wh..wh..opq` → (`dir`, Opaque).
pub(super) fn whiteout(path: &str) -> Option<(String, EntryKind)> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    };
    if name == OPAQUE_MARKER {
        return Some((dir.to_string(), EntryKind::Opaque));
    }
    let hidden = name.strip_prefix(WHITEOUT_PREFIX)?;
    let joined = if dir.is_empty() { hidden.to_string() } else { format!("{dir}/{hidden}") };
    Some((joined, EntryKind::Whiteout))
}

/// The normalised relative form of a tar path, or `None` if it escapes the root.
pub(super) fn normalize(path: &Path) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize(Path::new("./a/b/")), Some("a/b".into()));
        assert_eq!(normalize(Path::new("./")), Some("".into()));
        assert_eq!(normalize(Path::new("a/./b")), Some("a/b".into()));
        assert_eq!(normalize(Path::new("../../etc/passwd")), None);
        assert_eq!(normalize(Path::new("a/../b")), None);
        assert_eq!(normalize(Path::new("/abs")), None);
    }

    #[test]
    fn recognises_whiteouts() {
        assert_eq!(whiteout("a/.wh.b"), Some(("a/b".into(), EntryKind::Whiteout)));
        assert_eq!(whiteout(".wh.top"), Some(("top".into(), EntryKind::Whiteout)));
        assert_eq!(whiteout("a/b/.wh..wh..opq"), Some(("a/b".into(), EntryKind::Opaque)));
        assert_eq!(whiteout(".wh..wh..opq"), Some(("".into(), EntryKind::Opaque)));
        assert_eq!(whiteout("a/b.wh.c"), None);
    }
}
