//! The writable union: an image's read-only layer stack ([`ImageFs`]) with a
//! copy-on-write upper directory on top, in kernel overlayfs's own format so
//! that `mount -t overlay` shows the same tree from the same upper:
//!
//! * a deleted lower name is a whiteout (char device 0/0) in the upper;
//! * a directory that must not show lower content carries `<prefix>opaque=y`;
//! * a renamed lower directory is an upper directory with
//!   `<prefix>redirect=/old/path` (the lower stays where it was);
//! * a metadata-only change (`chmod`, `chown`, times, xattrs) of a lower
//!   file makes a sparse upper file with `<prefix>metacopy`: its data is
//!   still read from the lower until the first write or truncate.
//!
//! `<prefix>` is `trusted.overlay.` as root, `user.overlay.` otherwise
//! ([`Caps`]). The disk is the source of truth: a lookup reads the upper
//! entry and its xattrs and applies overlayfs's rules, so a remount (or the
//! kernel) sees exactly what this mount showed. The node table only adds
//! identity: inode numbers (a lower object keeps its lower inode number
//! after copy-up, new objects get numbers above the lower ones), the names
//! an inode is known by, and which lower object each one merges with.
//!
//! A process may take over a FUSE connection from a previous one (a crash
//! or an upgrade) and rebuild the overlay from the same layers and upper:
//! the kernel then sends inode and handle numbers this process never
//! handed out. Inode numbers are the same in every process (see
//! [`Overlay`]), so an unknown one is found again on the disk and looked up
//! by name as the kernel would have (`adopt.rs`); an unknown handle is
//! opened again by inode (`files.rs`).
//!
//! Every namespace operation runs under one lock (like fuse-overlayfs's big
//! lock): copy-up, whiteout and rename sequences must not interleave. File
//! data moves outside it, through the open handles.

mod adopt;
mod copy_up;
mod files;
mod ops;
#[cfg(test)]
mod tests;

use super::error::FsError;
use super::union::ROOT_INO;
use super::ImageFs;
use crate::sys::upper::{is_whiteout, Caps, Dir};
use fuser::{FileAttr, FileType, INodeNo};
use rustix::fs::Stat;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use files::{Handle, SetAttr};
pub use ops::{Caller, NewObject};

/// The xattr (after the prefix) in which a copied-up file records its lower
/// inode number. Kernel overlayfs hides and ignores it.
const ORIGIN: &str = "rmount.origin";

/// Upper directories kept open at most; past this the cache starts over.
const MAX_OPEN_DIRS: usize = 4096;

/// How much of an object lives in the upper directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upper {
    /// Only in the lower layers.
    Absent,
    /// Metadata in the upper (a `metacopy` file), data still in the lower.
    Meta,
    /// Entirely in the upper (a directory there may still merge a lower one).
    Full,
}

/// One inode known to the kernel.
#[derive(Debug, Clone)]
struct Node {
    /// The names (parent inode, name) it is known by; the first is used to
    /// find it in the upper. Empty once every name is gone.
    links: Vec<(u64, OsString)>,
    /// The lower inode it shows (file) or merges under it (directory).
    lower: Option<u64>,
    upper: Upper,
    is_dir: bool,
}

impl Node {
    fn location(&self) -> Result<(u64, &OsStr), FsError> {
        self.links.first().map(|(p, n)| (*p, n.as_os_str())).ok_or(FsError::NotFound)
    }
}

/// The copyable part of a [`Node`]: all most requests need of it.
#[derive(Debug, Clone, Copy)]
struct Facts {
    lower: Option<u64>,
    upper: Upper,
    is_dir: bool,
}

/// The node table. Guarded by [`Overlay::state`].
struct State {
    nodes: HashMap<u64, Node>,
    /// Inode of each upper object by (st_dev, st_ino), so hardlinks and
    /// copied-up files keep one inode number.
    by_upper: HashMap<(u64, u64), u64>,
    /// Open upper directories by inode (a directory fd survives renames).
    dirs: HashMap<u64, Arc<Dir>>,
    /// Last inode number handed out when an upper inode number was taken.
    next_ino: u64,
    /// Inode numbers of a previous process found gone (`ESTALE`), so a
    /// kernel that keeps asking (`fstat` of an open, deleted file) costs no
    /// more walks of the upper. An object that comes back under such a
    /// number enters `nodes` through a lookup first, which is checked first.
    gone: HashSet<u64>,
}

/// First of the inode numbers handed out when the natural one is taken.
const SPARE_INOS: u64 = 1 << 62;

impl State {
    fn node(&self, ino: u64) -> Result<&Node, FsError> {
        self.nodes.get(&ino).ok_or(FsError::NotFound)
    }

    fn facts(&self, ino: u64) -> Result<Facts, FsError> {
        let node = self.node(ino)?;
        Ok(Facts { lower: node.lower, upper: node.upper, is_dir: node.is_dir })
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, FsError> {
        self.nodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn alloc(&mut self) -> u64 {
        self.next_ino += 1;
        self.next_ino
    }

    /// Records that `ino` is (also) known as `name` in `parent`.
    fn add_link(&mut self, ino: u64, parent: u64, name: &OsStr) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            if !node.links.iter().any(|(p, n)| *p == parent && n == name) {
                node.links.push((parent, name.to_owned()));
            }
        }
    }

    /// Forgets the name `name` in `parent` of `ino`.
    fn drop_link(&mut self, ino: u64, parent: u64, name: &OsStr) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.links.retain(|(p, n)| !(*p == parent && n == name));
        }
    }
}

/// The upper and work directories and what their filesystem allows.
struct UpperLayer {
    root: Arc<Dir>,
    work: Dir,
    caps: Caps,
    temp_counter: AtomicU64,
}

impl UpperLayer {
    /// A fresh name for a temporary object in the work directory.
    fn temp_name(&self) -> OsString {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        format!("#rmount-{}-{n}", std::process::id()).into()
    }

    fn xattr(&self, what: &str) -> OsString {
        format!("{}{what}", self.caps.xattr_prefix).into()
    }

    /// Is `key` one of the overlay's own xattrs, hidden from users?
    fn is_private(&self, key: &OsStr) -> bool {
        key.as_bytes().starts_with(self.caps.xattr_prefix.as_bytes())
    }
}

/// A writable mount: the lower union and the upper directory.
///
/// Inode numbers: a lower object keeps its lower number (1..=N), also once
/// copied up (the copy records it in `<prefix>rmount.origin`); an object
/// made in the upper is N + 1 + its upper inode number. Both survive a
/// remount. Numbers from [`SPARE_INOS`] up are for an upper inode number
/// reused while the kernel may still hold the old object's. A process
/// taking over the FUSE connection numbers everything the same way, so the
/// numbers the kernel holds from its predecessor name the same objects
/// (spare numbers aside: they are `ESTALE`).
pub struct Overlay {
    lower: ImageFs,
    /// N + 1: upper objects are numbered from here.
    upper_base: u64,
    /// This process's uid and gid: what a new upper object gets unasked.
    own_ids: (u32, u32),
    upper: UpperLayer,
    state: Mutex<State>,
    handles: files::Handles,
    /// Tells the kernel when attributes change behind its back.
    notifier: OnceLock<fuser::Notifier>,
    /// Data copy-ups so far: lower handles recheck their file when it moves.
    data_copies: AtomicU64,
}

/// Where a mount keeps its changes.
#[derive(Debug, Clone)]
pub struct UpperDirs {
    /// The overlayfs `upperdir`.
    pub upper: std::path::PathBuf,
    /// The overlayfs `workdir` (same filesystem as `upper`).
    pub work: std::path::PathBuf,
}

fn time(t: rustix::fs::Timespec) -> SystemTime {
    let nanos = Duration::from_nanos(t.tv_nsec as u64);
    if t.tv_sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.tv_sec as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.tv_sec.unsigned_abs()) + nanos
    }
}

fn file_type(mode: u32) -> FileType {
    match rustix::fs::FileType::from_raw_mode(mode) {
        rustix::fs::FileType::Directory => FileType::Directory,
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
        rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
        rustix::fs::FileType::Fifo => FileType::NamedPipe,
        rustix::fs::FileType::Socket => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// `stat` of an upper object, reported as inode `ino`.
fn attr_of(stat: &Stat, ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: stat.st_size as u64,
        blocks: stat.st_blocks as u64,
        atime: time(rustix::fs::Timespec {
            tv_sec: stat.st_atime,
            tv_nsec: stat.st_atime_nsec as _,
        }),
        mtime: time(rustix::fs::Timespec {
            tv_sec: stat.st_mtime,
            tv_nsec: stat.st_mtime_nsec as _,
        }),
        ctime: time(rustix::fs::Timespec {
            tv_sec: stat.st_ctime,
            tv_nsec: stat.st_ctime_nsec as _,
        }),
        crtime: UNIX_EPOCH,
        kind: file_type(stat.st_mode),
        perm: (stat.st_mode & 0o7777) as u16,
        nlink: stat.st_nlink as u32,
        uid: stat.st_uid,
        gid: stat.st_gid,
        rdev: stat.st_rdev as u32,
        blksize: stat.st_blksize as u32,
        flags: 0,
    }
}

fn key(stat: &Stat) -> (u64, u64) {
    (stat.st_dev, stat.st_ino)
}

impl Overlay {
    /// Puts the upper directory `dirs.upper` (created if missing) over
    /// `lower`. An upper left by an earlier mount continues where it was.
    pub fn new(lower: ImageFs, dirs: &UpperDirs) -> Result<Self, FsError> {
        std::fs::create_dir_all(&dirs.upper)?;
        std::fs::create_dir_all(&dirs.work)?;
        let root = Arc::new(Dir::open(&dirs.upper)?);
        let work = Dir::open(&dirs.work)?;
        clear_work_dir(&work)?;
        let caps = Caps::probe(&work)?;
        let upper = UpperLayer { root, work, caps, temp_counter: AtomicU64::new(0) };
        let opaque_root =
            upper.root.get_xattr(OsStr::new(""), &upper.xattr("opaque"))?.as_deref() == Some(b"y");
        let next_ino = SPARE_INOS;
        let mut state = State {
            nodes: HashMap::new(),
            by_upper: HashMap::new(),
            dirs: HashMap::new(),
            next_ino,
            gone: HashSet::new(),
        };
        state.nodes.insert(
            ROOT_INO,
            Node {
                links: vec![(ROOT_INO, OsString::new())],
                lower: (!opaque_root).then_some(ROOT_INO),
                upper: Upper::Full,
                is_dir: true,
            },
        );
        state.dirs.insert(ROOT_INO, upper.root.clone());
        let upper_base = lower.tree().len() as u64 + 1;
        let own_ids = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
        Ok(Self {
            lower,
            upper_base,
            own_ids,
            upper,
            state: Mutex::new(state),
            handles: files::Handles::default(),
            notifier: OnceLock::new(),
            data_copies: AtomicU64::new(0),
        })
    }

    /// Lets the overlay tell the kernel about changes it did not ask for.
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// Drops the kernel's cached attributes of `ino` (not its pages).
    fn attributes_changed(&self, ino: u64) {
        if let Some(notifier) = self.notifier.get() {
            // ENOENT: the kernel does not hold the inode; nothing to drop.
            if let Err(e) = notifier.inval_inode(INodeNo(ino), -1, 0) {
                tracing::warn!("invalidating inode {ino}: {e}");
            }
        }
    }

    /// Holds every namespace operation of this mount until the returned
    /// guard is dropped, so a commit reads one consistent upper.
    pub fn freeze(&self) -> impl Sized + '_ {
        self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves the table as consistent as the disk
        // operations it wraps; keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The node table, holding `inos`: inode numbers the kernel sent. One
    /// this process never handed out (the kernel got it from the process
    /// that served the connection before) is found again first
    /// ([`Overlay::resolve_unknown`]); `ESTALE` if it no longer exists.
    /// Every request naming an inode takes the lock through here.
    fn lock_known(&self, inos: &[u64]) -> Result<MutexGuard<'_, State>, FsError> {
        let mut st = self.lock();
        for &ino in inos {
            if !st.nodes.contains_key(&ino) {
                self.resolve_unknown(&mut st, ino)?;
            }
        }
        Ok(st)
    }

    /// The lower inode named `name` in `dir_lower`, the lower directory
    /// merged under a directory.
    fn lower_child(&self, dir_lower: Option<u64>, name: &OsStr) -> Option<u64> {
        let name = std::str::from_utf8(name.as_bytes()).ok()?;
        self.lower.tree().lookup(dir_lower?, name)
    }

    fn lower_is_dir(&self, ino: u64) -> bool {
        self.lower.tree().node(ino).is_some_and(|n| n.is_dir)
    }

    /// The lower object a `redirect` xattr names: an absolute path from the
    /// layer root, or a name in the parent's lower directory. It must be a
    /// directory for a directory (`want_dir`), a non-directory otherwise.
    fn lower_by_redirect(
        &self,
        parent_lower: Option<u64>,
        redirect: &[u8],
        want_dir: bool,
    ) -> Option<u64> {
        let target = match redirect.strip_prefix(b"/") {
            Some(path) => {
                let path = std::str::from_utf8(path).ok()?;
                path.split('/')
                    .filter(|c| !c.is_empty())
                    .try_fold(ROOT_INO, |dir, name| self.lower.tree().lookup(dir, name))
            }
            None => self.lower_child(parent_lower, OsStr::from_bytes(redirect)),
        }?;
        (self.lower_is_dir(target) == want_dir).then_some(target)
    }

    /// The absolute path of lower inode `ino` (for a `redirect` xattr).
    fn lower_path(&self, ino: u64) -> Option<String> {
        let steps = self.lower.tree().path_of(ino)?;
        let names: Vec<&str> = steps.iter().map(|(name, _)| *name).collect();
        Some(format!("/{}", names.join("/")))
    }

    /// The open upper directory of directory `ino` (which must be in the upper).
    fn upper_dir(&self, st: &mut State, ino: u64) -> Result<Arc<Dir>, FsError> {
        if let Some(dir) = st.dirs.get(&ino) {
            return Ok(dir.clone());
        }
        let (parent, name) = {
            let (p, n) = st.node(ino)?.location()?;
            (p, n.to_owned())
        };
        let dir = Arc::new(self.upper_dir(st, parent)?.open_dir(&name)?);
        if st.dirs.len() >= MAX_OPEN_DIRS {
            st.dirs.retain(|&i, _| i == ROOT_INO);
        }
        st.dirs.insert(ino, dir.clone());
        Ok(dir)
    }

    /// The upper directory holding `ino` and its name there.
    fn upper_location(&self, st: &mut State, ino: u64) -> Result<(Arc<Dir>, OsString), FsError> {
        if ino == ROOT_INO {
            return Ok((self.upper.root.clone(), OsString::new()));
        }
        let (parent, name) = {
            let (p, n) = st.node(ino)?.location()?;
            (p, n.to_owned())
        };
        Ok((self.upper_dir(st, parent)?, name))
    }

    /// Resolves `name` in directory `parent` the way overlayfs does and
    /// returns its inode, adding it to the node table.
    fn resolve(&self, st: &mut State, parent: u64, name: &OsStr) -> Result<u64, FsError> {
        let dir_node = st.facts(parent)?;
        if !dir_node.is_dir {
            return Err(FsError::NotDir);
        }
        let lower_child = self.lower_child(dir_node.lower, name);
        if dir_node.upper == Upper::Full {
            let dir = self.upper_dir(st, parent)?;
            match dir.stat(name) {
                Ok(stat) if is_whiteout(&stat) => return Err(FsError::NotFound),
                Ok(stat) => {
                    return self.resolve_upper(
                        st,
                        parent,
                        name,
                        &dir,
                        &stat,
                        dir_node.lower,
                        lower_child,
                    )
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let ino = lower_child.ok_or(FsError::NotFound)?;
        match st.nodes.get(&ino) {
            Some(node) if node.upper != Upper::Absent => {}
            Some(_) => st.add_link(ino, parent, name),
            None => {
                let is_dir = self.lower_is_dir(ino);
                let node = Node {
                    links: vec![(parent, name.to_owned())],
                    lower: Some(ino),
                    upper: Upper::Absent,
                    is_dir,
                };
                st.nodes.insert(ino, node);
            }
        }
        Ok(ino)
    }

    /// The node of an upper entry, merged with the lower as its xattrs say.
    #[allow(clippy::too_many_arguments)]
    fn resolve_upper(
        &self,
        st: &mut State,
        parent: u64,
        name: &OsStr,
        dir: &Dir,
        stat: &Stat,
        dir_lower: Option<u64>,
        lower_child: Option<u64>,
    ) -> Result<u64, FsError> {
        let is_dir = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir();
        let (lower, upper) = self.upper_merge(dir, name, stat, dir_lower, lower_child)?;
        let ino = match lower {
            Some(l) => st.by_upper.get(&key(stat)).copied().unwrap_or(l),
            None => self.upper_ino(st, dir, name, stat)?,
        };
        st.by_upper.insert(key(stat), ino);
        let node =
            st.nodes.entry(ino).or_insert_with(|| Node { links: Vec::new(), lower, upper, is_dir });
        node.lower = lower;
        node.upper = upper;
        node.is_dir = is_dir;
        // The name that was just found in the upper goes first: it is where
        // the object is certainly found again.
        node.links.retain(|(p, n)| !(*p == parent && n == name));
        node.links.insert(0, (parent, name.to_owned()));
        Ok(ino)
    }

    /// What upper entry `name` in `dir` (`stat`) merges, as its xattrs say:
    /// the lower inode it shows or merges, and how much of it is in the
    /// upper. `dir_lower` is the lower directory merged under `dir`,
    /// `lower_child` the lower object of the same name in it.
    fn upper_merge(
        &self,
        dir: &Dir,
        name: &OsStr,
        stat: &Stat,
        dir_lower: Option<u64>,
        lower_child: Option<u64>,
    ) -> Result<(Option<u64>, Upper), FsError> {
        let is_dir = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir();
        let redirect = |this: &Self| dir.get_xattr(name, &this.upper.xattr("redirect"));
        let merged = if is_dir {
            let lower =
                if dir.get_xattr(name, &self.upper.xattr("opaque"))?.as_deref() == Some(b"y") {
                    None
                } else if let Some(redirect) = redirect(self)? {
                    self.lower_by_redirect(dir_lower, &redirect, true)
                } else {
                    lower_child.filter(|&l| self.lower_is_dir(l))
                };
            (lower, Upper::Full)
        } else if dir.get_xattr(name, &self.upper.xattr("metacopy"))?.is_some() {
            let lower = match redirect(self)? {
                Some(redirect) => self.lower_by_redirect(dir_lower, &redirect, false),
                None => lower_child.filter(|&l| !self.lower_is_dir(l)),
            };
            (lower, if lower.is_some() { Upper::Meta } else { Upper::Full })
        } else {
            (None, Upper::Full)
        };
        Ok(merged)
    }

    /// The inode number of upper object `name` in `dir` that merges no lower
    /// one (see [`Overlay`]).
    fn upper_ino(
        &self,
        st: &mut State,
        dir: &Dir,
        name: &OsStr,
        stat: &Stat,
    ) -> Result<u64, FsError> {
        if let Some(&ino) = st.by_upper.get(&key(stat)) {
            return Ok(ino);
        }
        let is_file = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file();
        if is_file {
            let origin = self.origin(dir, name)?;
            // A lower inode still shown by another (lower) name is not free.
            let free = |ino: &u64| {
                *ino < self.upper_base
                    && !self.lower_is_dir(*ino)
                    && st.nodes.get(ino).is_none_or(|n| n.upper != Upper::Absent)
            };
            if let Some(ino) = origin.filter(free) {
                return Ok(ino);
            }
        }
        Ok(self.fresh_ino(st, stat))
    }

    /// The lower inode a copied-up file `name` in `dir` records as its
    /// origin, if any.
    fn origin(&self, dir: &Dir, name: &OsStr) -> Result<Option<u64>, FsError> {
        let origin = dir.get_xattr(name, &self.upper.xattr(ORIGIN))?;
        Ok(origin.and_then(|o| std::str::from_utf8(&o).ok()?.parse::<u64>().ok()))
    }

    /// The inode number of a new upper object: N + 1 + its upper inode
    /// number, unless that is still taken (the upper inode was reused), also
    /// by a gone object the kernel still holds from a previous process.
    fn fresh_ino(&self, st: &mut State, stat: &Stat) -> u64 {
        let natural = self.upper_base + stat.st_ino;
        if st.nodes.contains_key(&natural) || st.gone.contains(&natural) {
            st.alloc()
        } else {
            natural
        }
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, FsError> {
        let mut st = self.lock_known(&[parent])?;
        let ino = self.resolve(&mut st, parent, name)?;
        self.attr_locked(&mut st, ino)
    }

    /// `stat` of inode `ino`; `fh` (an open handle) answers for a file that
    /// has no name left.
    pub fn attr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, FsError> {
        let found = self.lock_known(&[ino]).and_then(|mut st| self.attr_locked(&mut st, ino));
        match found {
            Err(FsError::NotFound) => self.handles.attr_of_open(ino, fh, &self.lower),
            // Unknown and gone: only a handle this process opened could
            // still know it.
            Err(e) if matches!(e, FsError::Stale) => {
                self.handles.attr_of_open(ino, fh, &self.lower).map_err(|_| e)
            }
            other => other,
        }
    }

    fn attr_locked(&self, st: &mut State, ino: u64) -> Result<FileAttr, FsError> {
        let node = st.facts(ino)?;
        match node.upper {
            Upper::Absent => self.lower.attr(node.lower.ok_or(FsError::NotFound)?),
            Upper::Meta | Upper::Full => {
                let (dir, name) = self.upper_location(st, ino)?;
                let stat = dir.stat(&name)?;
                let mut attr = attr_of(&stat, ino);
                if node.is_dir && node.lower.is_some() {
                    // overlayfs does not count the links of a merged directory.
                    attr.nlink = 1;
                }
                if node.upper == Upper::Meta {
                    attr.blocks = attr.size.div_ceil(512);
                }
                Ok(attr)
            }
        }
    }

    /// The names directory `ino` shows, sorted: its upper entries that are
    /// not whiteouts, then the merged lower's entries not hidden by them.
    fn names(&self, st: &mut State, ino: u64) -> Result<Vec<OsString>, FsError> {
        let node = st.facts(ino)?;
        if !node.is_dir {
            return Err(FsError::NotDir);
        }
        let mut names = BTreeSet::new();
        let mut hidden = HashSet::new();
        if node.upper == Upper::Full {
            let dir = self.upper_dir(st, ino)?;
            for (name, kind) in dir.entries()? {
                if kind == rustix::fs::FileType::CharacterDevice && is_whiteout(&dir.stat(&name)?) {
                    hidden.insert(name);
                } else {
                    names.insert(name);
                }
            }
        }
        if let Some(lower) = node.lower.and_then(|l| self.lower.tree().node(l)) {
            for (name, _) in lower.children.iter() {
                let name = OsStr::new(&**name);
                if !hidden.contains(name) {
                    names.insert(name.to_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Entries of directory `ino` from `offset` with their attributes:
    /// (next offset, name, attr), `.` and `..` first.
    pub fn dir_entries(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<Vec<(u64, OsString, FileAttr)>, FsError> {
        let mut st = self.lock_known(&[ino])?;
        let names = self.names(&mut st, ino)?;
        let (parent, _) = st.node(ino)?.location()?;
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let position = i as u64 + 2;
            if position < offset {
                continue;
            }
            let Ok(child) = self.resolve(&mut st, ino, name) else { continue };
            let Ok(attr) = self.attr_locked(&mut st, child) else { continue };
            out.push((position + 1, name.clone(), attr));
        }
        let mut dots = Vec::new();
        for (position, name, dot) in [(0, ".", ino), (1, "..", parent)] {
            if position >= offset {
                if let Ok(attr) = self.attr_locked(&mut st, dot) {
                    dots.push((position + 1, OsString::from(name), attr));
                }
            }
        }
        dots.extend(out);
        Ok(dots)
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let mut st = self.lock_known(&[ino])?;
        let node = st.facts(ino)?;
        match node.upper {
            Upper::Absent => {
                Ok(self.lower.readlink(node.lower.ok_or(FsError::NotFound)?)?.to_vec())
            }
            _ => {
                let (dir, name) = self.upper_location(&mut st, ino)?;
                Ok(dir.readlink(&name)?.into_encoded_bytes())
            }
        }
    }

    /// `statfs` of the upper directory's filesystem.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs, FsError> {
        Ok(self.upper.root.statvfs()?)
    }
}

/// Removes what an interrupted operation left in the work directory: a
/// half-made copy-up is never visible, so it is simply dropped.
fn clear_work_dir(work: &Dir) -> Result<(), FsError> {
    for (name, _) in work.entries()? {
        work.remove_all(&name)?;
    }
    Ok(())
}
