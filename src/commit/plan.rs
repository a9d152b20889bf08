//! Plan: the walk of an upper directory (kernel overlayfs format) together
//! with the lower [`UnionTree`], returning the layer's entries as data, in
//! tar order. Nothing is written here; [`super::tar`] streams a plan.
//!
//! Two modes share one walk:
//!
//! * [`Mode::Diff`] (commit, `diff`): only what the upper changes. A
//!   whiteout of a name the merged lower has becomes `.wh.NAME`; an opaque
//!   directory gets `.wh..wh..opq`; a directory with a `redirect` (a renamed
//!   lower directory) is emitted **in full** under its new name, marked
//!   opaque, because the lower content it merges lives at another path in
//!   the layers below (its old name's whiteout is an ordinary whiteout in its
//!   old parent). A `metacopy` file is emitted with its lower data, so the
//!   layer stands on its own.
//! * [`Mode::Full`] (`export`): the whole merged tree, no markers at all.
//!
//! Order is deterministic: depth first, names sorted bytewise, a directory
//! before its content. The first name of an inode with several links (in
//! that order) carries the data; the others become tar hardlinks to it.

use crate::fs::{ImageFs, ROOT_INO};
use crate::layer::EntryKind;
use crate::sys::upper::{is_whiteout, Dir};
use rustix::fs::{FileType, Stat};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;

/// The overlay-private xattr prefixes: never part of a layer.
const PRIVATE_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

/// Xattrs that describe the host, not the image.
const HOST_XATTRS: [&str; 1] = ["security.selinux"];

/// Which entries a walk produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The changes of the upper, as an OCI layer with whiteouts.
    Diff,
    /// The whole merged tree, without whiteouts (`export`).
    Full,
}

/// Metadata of one entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Extended attributes (private ones removed), sorted by name.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Where a regular file's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// The upper file at this path (components from the upper root).
    Upper(Vec<OsString>),
    /// The lower file with this inode of the union tree.
    Lower(u64),
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file of `size` bytes.
    File {
        /// Where to read it.
        data: Data,
        /// Its length.
        size: u64,
    },
    /// A symlink.
    Symlink(OsString),
    /// A hard link to the earlier entry at this path.
    Hardlink(Vec<u8>),
    /// A character device.
    Char(u64),
    /// A block device.
    Block(u64),
    /// A fifo.
    Fifo,
    /// `.wh.NAME`: the entry's path is the hidden name.
    Whiteout,
    /// `.wh..wh..opq` in the directory at the entry's path.
    Opaque,
}

/// One entry of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// Relative path, `/`-separated; empty for the root.
    pub path: Vec<u8>,
    /// What it is.
    pub kind: Kind,
    /// Its metadata (unused for markers).
    pub meta: Meta,
}

/// The result of a walk.
#[derive(Debug, Default)]
pub struct Plan {
    /// Entries in tar order.
    pub entries: Vec<LayerEntry>,
    /// Objects that cannot be in a layer (sockets), by path.
    pub skipped: Vec<Vec<u8>>,
}

/// Walks `upper` (or nothing) over `lower`.
pub fn plan(upper: Option<&Dir>, lower: &ImageFs, mode: Mode) -> io::Result<Plan> {
    let mut walk = Walk { lower, plan: Plan::default(), links: HashMap::new() };
    match upper {
        Some(root) => {
            let stat = root.stat(OsStr::new(""))?;
            let opaque = is_opaque(root, OsStr::new(""))?;
            walk.push(Vec::new(), Kind::Dir, upper_meta(root, OsStr::new(""), &stat)?);
            let lower_root = (!opaque).then_some(ROOT_INO);
            if opaque && mode == Mode::Diff {
                walk.push(Vec::new(), Kind::Opaque, Meta::default());
            }
            walk.dir(Some(root), &mut Vec::new(), b"", lower_root, mode)?;
        }
        None => {
            walk.push(Vec::new(), Kind::Dir, lower_meta(lower, ROOT_INO));
            walk.dir(None, &mut Vec::new(), b"", Some(ROOT_INO), Mode::Full)?;
        }
    }
    Ok(walk.plan)
}

fn is_opaque(dir: &Dir, name: &OsStr) -> io::Result<bool> {
    for prefix in PRIVATE_PREFIXES {
        let key = OsString::from(format!("{prefix}opaque"));
        if dir.get_xattr(name, &key)?.as_deref() == Some(b"y") {
            return Ok(true);
        }
    }
    Ok(false)
}

fn private_xattr(dir: &Dir, name: &OsStr, what: &str) -> io::Result<Option<Vec<u8>>> {
    for prefix in PRIVATE_PREFIXES {
        let key = OsString::from(format!("{prefix}{what}"));
        if let Some(v) = dir.get_xattr(name, &key)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn is_private(key: &OsStr) -> bool {
    let k = key.as_bytes();
    PRIVATE_PREFIXES.iter().any(|p| k.starts_with(p.as_bytes()))
        || HOST_XATTRS.iter().any(|h| k == h.as_bytes())
}

fn upper_meta(dir: &Dir, name: &OsStr, stat: &Stat) -> io::Result<Meta> {
    let mut xattrs = Vec::new();
    for key in dir.list_xattr(name)? {
        if is_private(&key) {
            continue;
        }
        if let Some(value) = dir.get_xattr(name, &key)? {
            xattrs.push((key, value));
        }
    }
    xattrs.sort();
    Ok(Meta {
        mode: stat.st_mode & 0o7777,
        uid: stat.st_uid,
        gid: stat.st_gid,
        mtime: stat.st_mtime,
        xattrs,
    })
}

fn lower_meta(lower: &ImageFs, ino: u64) -> Meta {
    let tree = lower.tree();
    match tree.node(ino).and_then(|n| tree.entry(n)) {
        Some(e) => Meta {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            xattrs: e
                .xattrs
                .iter()
                .map(|x| (OsString::from(&*x.name), x.value.to_vec()))
                .filter(|(k, _)| !is_private(k))
                .collect(),
        },
        None => Meta { mode: 0o755, ..Meta::default() },
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

/// Identity of an inode with several names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LinkKey {
    Upper(u64, u64),
    Lower(u64),
}

struct Walk<'a> {
    lower: &'a ImageFs,
    plan: Plan,
    /// First path emitted for each multiply-linked inode.
    links: HashMap<LinkKey, Vec<u8>>,
}

/// One name of a directory being walked: its upper entry and/or lower inode.
#[derive(Default)]
struct Slot {
    upper: Option<Stat>,
    lower: Option<u64>,
}

impl Walk<'_> {
    fn push(&mut self, path: Vec<u8>, kind: Kind, meta: Meta) {
        self.plan.entries.push(LayerEntry { path, kind, meta });
    }

    fn lower_child(&self, dir: Option<u64>, name: &OsStr) -> Option<u64> {
        let name = std::str::from_utf8(name.as_bytes()).ok()?;
        self.lower.tree().lookup(dir?, name)
    }

    fn lower_is_dir(&self, ino: u64) -> bool {
        self.lower.tree().node(ino).is_some_and(|n| n.is_dir)
    }

    /// The lower object a `redirect` value names (see `fs::overlay`).
    fn by_redirect(&self, parent: Option<u64>, redirect: &[u8], want_dir: bool) -> Option<u64> {
        let target = match redirect.strip_prefix(b"/") {
            Some(path) => std::str::from_utf8(path)
                .ok()?
                .split('/')
                .filter(|c| !c.is_empty())
                .try_fold(ROOT_INO, |dir, name| self.lower.tree().lookup(dir, name)),
            None => self.lower_child(parent, OsStr::from_bytes(redirect)),
        }?;
        (self.lower_is_dir(target) == want_dir).then_some(target)
    }

    /// Takes the first-name role for a multiply-linked inode: `Some(first)`
    /// if an earlier name already carries its data.
    fn link(&mut self, key: LinkKey, path: &[u8]) -> Option<Vec<u8>> {
        match self.links.get(&key) {
            Some(first) => Some(first.clone()),
            None => {
                self.links.insert(key, path.to_vec());
                None
            }
        }
    }

    /// Walks one directory: `upper` is its upper dir (if any; `comps` its
    /// path from the upper root), `lower` the lower directory it merges.
    fn dir(
        &mut self,
        upper: Option<&Dir>,
        comps: &mut Vec<OsString>,
        path: &[u8],
        lower: Option<u64>,
        mode: Mode,
    ) -> io::Result<()> {
        let mut slots: BTreeMap<OsString, Slot> = BTreeMap::new();
        if let Some(dir) = upper {
            for (name, _) in dir.entries()? {
                let stat = dir.stat(&name)?;
                slots.entry(name).or_default().upper = Some(stat);
            }
        }
        if let Some(node) = lower.and_then(|l| self.lower.tree().node(l)) {
            for (name, ino) in node.children.iter() {
                slots.entry(OsString::from(&**name)).or_default().lower = Some(*ino);
            }
        }
        for (name, slot) in slots {
            let child_path = join(path, name.as_bytes());
            match (upper, slot.upper) {
                (Some(dir), Some(stat)) => {
                    comps.push(name.clone());
                    let r =
                        self.upper_entry(dir, comps, &name, &stat, child_path, &slot, lower, mode);
                    comps.pop();
                    r?;
                }
                _ if mode == Mode::Full => {
                    if let Some(ino) = slot.lower {
                        self.lower_subtree(ino, child_path)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn upper_entry(
        &mut self,
        dir: &Dir,
        comps: &mut Vec<OsString>,
        name: &OsStr,
        stat: &Stat,
        path: Vec<u8>,
        slot: &Slot,
        parent_lower: Option<u64>,
        mode: Mode,
    ) -> io::Result<()> {
        if is_whiteout(stat) {
            if mode == Mode::Diff && slot.lower.is_some() {
                self.push(path, Kind::Whiteout, Meta::default());
            }
            return Ok(());
        }
        let kind = FileType::from_raw_mode(stat.st_mode);
        let meta = upper_meta(dir, name, stat)?;
        match kind {
            FileType::Directory => {
                let redirect = private_xattr(dir, name, "redirect")?;
                let (lower, child_mode, opaque) = if is_opaque(dir, name)? {
                    (None, mode, true)
                } else if let Some(r) = redirect {
                    (self.by_redirect(parent_lower, &r, true), Mode::Full, true)
                } else {
                    (slot.lower.filter(|&l| self.lower_is_dir(l)), mode, false)
                };
                self.push(path.clone(), Kind::Dir, meta);
                if opaque && mode == Mode::Diff {
                    self.push(path.clone(), Kind::Opaque, Meta::default());
                }
                let sub = dir.open_dir(name)?;
                self.dir(Some(&sub), comps, &path, lower, child_mode)
            }
            FileType::RegularFile => {
                let metacopy = private_xattr(dir, name, "metacopy")?.is_some();
                let lower = if metacopy {
                    match private_xattr(dir, name, "redirect")? {
                        Some(r) => self.by_redirect(parent_lower, &r, false),
                        None => slot.lower.filter(|&l| !self.lower_is_dir(l)),
                    }
                } else {
                    None
                };
                if stat.st_nlink > 1 {
                    if let Some(first) = self.link(LinkKey::Upper(stat.st_dev, stat.st_ino), &path)
                    {
                        self.push(path, Kind::Hardlink(first), meta);
                        return Ok(());
                    }
                }
                let data = match lower {
                    Some(ino) => Data::Lower(ino),
                    None => Data::Upper(comps.clone()),
                };
                self.push(path, Kind::File { data, size: stat.st_size as u64 }, meta);
                Ok(())
            }
            FileType::Symlink => {
                let target = dir.readlink(name)?;
                self.push(path, Kind::Symlink(target), meta);
                Ok(())
            }
            FileType::CharacterDevice => {
                self.push(path, Kind::Char(stat.st_rdev), meta);
                Ok(())
            }
            FileType::BlockDevice => {
                self.push(path, Kind::Block(stat.st_rdev), meta);
                Ok(())
            }
            FileType::Fifo => {
                self.push(path, Kind::Fifo, meta);
                Ok(())
            }
            _ => {
                // Reported by the caller once the mount runs again: a log
                // line now could block on a stderr that lives on the mount.
                self.plan.skipped.push(path);
                Ok(())
            }
        }
    }

    /// Emits lower inode `ino` and everything below it at `path`.
    fn lower_subtree(&mut self, ino: u64, path: Vec<u8>) -> io::Result<()> {
        let tree = self.lower.tree();
        let Some(node) = tree.node(ino) else { return Ok(()) };
        let meta = lower_meta(self.lower, ino);
        if node.is_dir {
            self.push(path.clone(), Kind::Dir, meta);
            return self.dir(None, &mut Vec::new(), &path, Some(ino), Mode::Full);
        }
        if node.nlink > 1 {
            if let Some(first) = self.link(LinkKey::Lower(ino), &path) {
                self.push(path, Kind::Hardlink(first), meta);
                return Ok(());
            }
        }
        let kind = match tree.entry(node).map(|e| &e.kind) {
            Some(EntryKind::File { size, .. }) => {
                Kind::File { data: Data::Lower(ino), size: *size }
            }
            Some(EntryKind::Symlink { target }) => Kind::Symlink(OsString::from(&**target)),
            Some(EntryKind::CharDevice { rdev }) => Kind::Char(*rdev),
            Some(EntryKind::BlockDevice { rdev }) => Kind::Block(*rdev),
            Some(EntryKind::Fifo) => Kind::Fifo,
            _ => return Ok(()),
        };
        self.push(path, kind, meta);
        Ok(())
    }
}
