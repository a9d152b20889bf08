//! Filesystem operation sequences for the differential test
//! (`tests/differential.rs`): a seeded generator, an executor, and a tree
//! snapshot. All three touch a mount only through file descriptors.
//!
//! Images carry absolute symlinks (`lnk/abs -> /etc/passwd`). A path joined
//! onto the mountpoint and handed to the host's VFS would follow them onto
//! the host, so every path is resolved with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` from an `O_PATH` fd of the mount root: symlinks
//! are followed, but inside the mount. Operations on a name (`unlinkat`,
//! `renameat2`, `linkat`, `mknodat`, lchown- and lutimes-style calls) act on
//! the final component relative to its resolved parent. Operations that
//! follow the final symlink and have no fd form (chmod, chown, utimes,
//! xattrs) resolve the object inside the root first, then act on it through
//! `/proc/self/fd/N`, which names exactly that inode and nothing on the host.
//!
//! An outcome is one string: `ok …` with what the call returned, or the errno
//! name, followed by the state of the paths the op touched. Two mounts behave
//! the same exactly when the strings are equal. A timestamp is shown exactly
//! when it is older than the run (fixture times, times set by `utimes`), and
//! as `recent` otherwise, so "now" never makes two mounts differ.
//!
//! This file holds the op model; `gen` generates sequences from a seed,
//! `exec` runs them on a mount, `tree` snapshots and compares whole trees.

use std::fmt;

mod exec;
mod gen;
mod tree;

// Only tests/differential.rs uses these; every test binary compiles `common`.
#[allow(unused_imports)]
pub use exec::Session;
#[allow(unused_imports)]
pub use gen::{generate, Hint};
#[allow(unused_imports)]
pub use tree::{diff_trees, differing_fields, snapshot, TreeDiff};

/// splitmix64: tiny, seedable, and plenty to pick operations with.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Bytes to write, named by length and seed so a reproduction stays readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data {
    pub len: usize,
    pub seed: u8,
}

impl Data {
    pub fn bytes(&self) -> Vec<u8> {
        super::pseudo_random(self.len, 1000 + u64::from(self.seed))
    }
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}B#{}", self.len, self.seed)
    }
}

/// Where `Op::Write` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAt {
    /// `O_TRUNC`, then `write`.
    Trunc,
    /// `O_APPEND`, then `write`.
    Append,
    /// `pwrite` at this offset (may be past EOF).
    Offset(u64),
}

/// `fallocate` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Falloc {
    Allocate,
    KeepSize,
    PunchHole,
}

/// `renameat2` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameHow {
    Plain,
    NoReplace,
    Exchange,
}

/// `setxattr` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrHow {
    Any,
    Create,
    Replace,
}

/// How `Op::Hold` opens a file it keeps open across later ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldHow {
    Read,
    ReadWrite,
    Append,
}

/// Number of fd slots `Op::Hold` can fill.
pub const SLOTS: usize = 3;

/// One filesystem operation. Paths are relative to the mount root, never
/// empty (except the root for `Stat` and `ReadDir`), and their components
/// are never `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `open(O_CREAT|O_WRONLY[|O_EXCL], mode)`.
    Create {
        path: String,
        excl: bool,
        mode: u32,
    },
    Write {
        path: String,
        at: WriteAt,
        data: Data,
    },
    /// `pread` of a range; the bytes are compared (by digest).
    Read {
        path: String,
        off: u64,
        len: usize,
    },
    /// `ftruncate` (grow or shrink).
    Truncate {
        path: String,
        len: u64,
    },
    Fallocate {
        path: String,
        how: Falloc,
        off: u64,
        len: u64,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Mkfifo {
        path: String,
    },
    /// A char device `1:minor` (null, zero, full: harmless if opened).
    Mknod {
        path: String,
        minor: u32,
    },
    Symlink {
        target: String,
        path: String,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        how: RenameHow,
    },
    /// `chmod`, following a final symlink (inside the mount).
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: Option<u32>,
        gid: Option<u32>,
        follow: bool,
    },
    /// `utimensat` with fixed times; `atime: None` is `UTIME_OMIT`.
    Utimes {
        path: String,
        atime: Option<(i64, i64)>,
        mtime: (i64, i64),
        follow: bool,
    },
    SetXattr {
        path: String,
        name: String,
        value: Data,
        how: XattrHow,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    GetXattr {
        path: String,
        name: String,
    },
    /// `listxattr`; the `user.` names are shown with their values.
    ListXattr {
        path: String,
    },
    Fsync {
        path: String,
    },
    /// Open read-write, unlink the name, then write and read through the fd.
    OpenUnlinkWrite {
        path: String,
        off: u64,
        data: Data,
    },
    /// Open and keep the fd in `slot` (closing what was there).
    Hold {
        slot: usize,
        path: String,
        how: HoldHow,
    },
    FdWrite {
        slot: usize,
        off: u64,
        data: Data,
    },
    FdRead {
        slot: usize,
        off: u64,
        len: usize,
    },
    FdStat {
        slot: usize,
    },
    Close {
        slot: usize,
    },
    Stat {
        path: String,
        follow: bool,
    },
    ReadDir {
        path: String,
    },
    Readlink {
        path: String,
    },
}

impl Op {
    /// Short name of the operation, for statistics and shrinking.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Truncate { .. } => "truncate",
            Op::Fallocate { .. } => "fallocate",
            Op::Mkdir { .. } => "mkdir",
            Op::Mkfifo { .. } => "mkfifo",
            Op::Mknod { .. } => "mknod",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Chmod { .. } => "chmod",
            Op::Chown { .. } => "chown",
            Op::Utimes { .. } => "utimes",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::GetXattr { .. } => "getxattr",
            Op::ListXattr { .. } => "listxattr",
            Op::Fsync { .. } => "fsync",
            Op::OpenUnlinkWrite { .. } => "open-unlink-write",
            Op::Hold { .. } => "hold",
            Op::FdWrite { .. } => "fd-write",
            Op::FdRead { .. } => "fd-read",
            Op::FdStat { .. } => "fd-stat",
            Op::Close { .. } => "close",
            Op::Stat { .. } => "stat",
            Op::ReadDir { .. } => "readdir",
            Op::Readlink { .. } => "readlink",
        }
    }

    /// Paths whose state is shown after the op: (path, follow the final
    /// symlink). Namespace ops show their parents too (mtime, copy-up).
    pub(super) fn touched(&self) -> Vec<(String, bool)> {
        let named = |p: &str| vec![(p.to_string(), false), (parent_of(p).to_string(), true)];
        match self {
            Op::Create { path, .. } => vec![(path.clone(), true), (parent_of(path).into(), true)],
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. }
            | Op::Chmod { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::Fsync { path } => vec![(path.clone(), true)],
            Op::Chown { path, follow, .. } | Op::Utimes { path, follow, .. } => {
                vec![(path.clone(), *follow)]
            }
            Op::Mkdir { path, .. }
            | Op::Mkfifo { path }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::OpenUnlinkWrite { path, .. } => named(path),
            Op::Link { from, to } => {
                vec![(from.clone(), false), (to.clone(), false), (parent_of(to).into(), true)]
            }
            Op::Rename { from, to, .. } => {
                let mut v = named(from);
                v.extend(named(to));
                v
            }
            Op::Read { .. }
            | Op::GetXattr { .. }
            | Op::ListXattr { .. }
            | Op::Hold { .. }
            | Op::FdWrite { .. }
            | Op::FdRead { .. }
            | Op::FdStat { .. }
            | Op::Close { .. }
            | Op::Stat { .. }
            | Op::ReadDir { .. }
            | Op::Readlink { .. } => Vec::new(),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let follow = |b: &bool| if *b { "" } else { " nofollow" };
        match self {
            Op::Create { path, excl, mode } => {
                write!(f, "create {path:?} mode={mode:04o}{}", if *excl { " O_EXCL" } else { "" })
            }
            Op::Write { path, at, data } => match at {
                WriteAt::Trunc => write!(f, "write {path:?} O_TRUNC {data}"),
                WriteAt::Append => write!(f, "write {path:?} O_APPEND {data}"),
                WriteAt::Offset(off) => write!(f, "pwrite {path:?} at {off} {data}"),
            },
            Op::Read { path, off, len } => write!(f, "read {path:?} at {off} len {len}"),
            Op::Truncate { path, len } => write!(f, "truncate {path:?} to {len}"),
            Op::Fallocate { path, how, off, len } => {
                write!(f, "fallocate {path:?} {how:?} at {off} len {len}")
            }
            Op::Mkdir { path, mode } => write!(f, "mkdir {path:?} mode={mode:04o}"),
            Op::Mkfifo { path } => write!(f, "mkfifo {path:?}"),
            Op::Mknod { path, minor } => write!(f, "mknod {path:?} char 1:{minor}"),
            Op::Symlink { target, path } => write!(f, "symlink {path:?} -> {target:?}"),
            Op::Link { from, to } => write!(f, "link {from:?} as {to:?}"),
            Op::Unlink { path } => write!(f, "unlink {path:?}"),
            Op::Rmdir { path } => write!(f, "rmdir {path:?}"),
            Op::Rename { from, to, how } => write!(f, "rename {from:?} to {to:?} {how:?}"),
            Op::Chmod { path, mode } => write!(f, "chmod {path:?} {mode:04o}"),
            Op::Chown { path, uid, gid, follow: fo } => {
                write!(f, "chown {path:?} {uid:?}:{gid:?}{}", follow(fo))
            }
            Op::Utimes { path, atime, mtime, follow: fo } => {
                write!(f, "utimes {path:?} atime={atime:?} mtime={mtime:?}{}", follow(fo))
            }
            Op::SetXattr { path, name, value, how } => {
                write!(f, "setxattr {path:?} {name}={value} {how:?}")
            }
            Op::RemoveXattr { path, name } => write!(f, "removexattr {path:?} {name}"),
            Op::GetXattr { path, name } => write!(f, "getxattr {path:?} {name}"),
            Op::ListXattr { path } => write!(f, "listxattr {path:?}"),
            Op::Fsync { path } => write!(f, "fsync {path:?}"),
            Op::OpenUnlinkWrite { path, off, data } => {
                write!(f, "open {path:?} O_RDWR, unlink it, pwrite at {off} {data}, read back")
            }
            Op::Hold { slot, path, how } => write!(f, "fd{slot} = open {path:?} {how:?}"),
            Op::FdWrite { slot, off, data } => write!(f, "pwrite fd{slot} at {off} {data}"),
            Op::FdRead { slot, off, len } => write!(f, "pread fd{slot} at {off} len {len}"),
            Op::FdStat { slot } => write!(f, "fstat fd{slot}"),
            Op::Close { slot } => write!(f, "close fd{slot}"),
            Op::Stat { path, follow: fo } => write!(f, "stat {path:?}{}", follow(fo)),
            Op::ReadDir { path } => write!(f, "readdir {path:?}"),
            Op::Readlink { path } => write!(f, "readlink {path:?}"),
        }
    }
}

pub(super) fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// `base/rel`, or `base` for an empty `rel`.
pub(super) fn under(base: &str, rel: &str) -> String {
    if rel.is_empty() {
        base.to_string()
    } else {
        format!("{base}/{rel}")
    }
}

pub(super) fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}
