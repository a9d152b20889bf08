//! The only code that touches the writable upper (and work) directory of a
//! mount, which is kept in kernel overlayfs format.
//!
//! The upper directory is written by whoever uses the mount, so it can hold
//! any symlink, e.g. `etc -> /etc`. Code that joins path strings and calls
//! `open("upper/etc/passwd")` would follow it and write the host's files.
//! Everything here therefore works relative to an open directory handle
//! ([`Dir`]) with `*at()` syscalls, and every name passed in must be a
//! single component (not empty, no `/`, not `.` or `..`; checked, else
//! `InvalidInput`). No operation follows a symlink in its last component:
//!
//! - opens add `O_NOFOLLOW`; [`Dir::open_beneath`] walks one component at a
//!   time with `O_NOFOLLOW`, so a symlink anywhere on the way fails the walk;
//! - `stat`, `chown` and `utimensat` use `AT_SYMLINK_NOFOLLOW`; creation
//!   calls (`mkdir`, `mknod`, `symlink`, `O_CREAT|O_EXCL`) never follow;
//! - `chmod` and the xattr calls have no usable no-follow `*at()` form (the
//!   `fchmodat` syscall takes no flags; `fchmodat2` and `getxattrat` need
//!   Linux 6.6 and 6.13 and rustix has neither; `f*xattr` on an `O_PATH`
//!   descriptor is `EBADF`, even on 6.18). They pin the inode with an
//!   `O_PATH|O_NOFOLLOW` descriptor and act on `/proc/self/fd/N`, whose magic
//!   link resolves to exactly that inode, even a symlink, fifo or device,
//!   which are never opened for I/O. This needs `/proc` to be mounted.
//!
//! Rejected: `openat2(RESOLVE_BENEATH)` for every call. It covers path
//! walks only, not `chmod`/xattrs, and may be blocked by seccomp; walking
//! component by component is as safe and has a single code path.
//!
//! The process umask applies to created entries, as with the raw syscalls.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::time::SystemTime;

use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, RenameFlags, Stat, StatVfs, Timespec, Timestamps, XattrFlags,
    CWD, UTIME_NOW, UTIME_OMIT,
};
use rustix::io::Errno;

/// An open directory in the upper or work tree; all operations are relative
/// to it.
///
/// Invariant: `fd` is opened `O_RDONLY|O_DIRECTORY|O_CLOEXEC` (not `O_PATH`),
/// so it can be read with `getdents` and synced.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// How [`Dir::rename`] treats the destination and the source name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rename {
    /// Plain `rename`: an existing destination is replaced.
    Replace,
    /// Fail with `EEXIST` if the destination exists (`RENAME_NOREPLACE`).
    NoReplace,
    /// Atomically swap source and destination; both must exist
    /// (`RENAME_EXCHANGE`).
    Exchange,
    /// Replace the destination and leave an overlayfs whiteout at the
    /// source (`RENAME_WHITEOUT`). Where the filesystem refuses the flag
    /// (`EINVAL`) this falls back to a rename followed by [`Dir::whiteout`],
    /// which is not atomic: a crash in between leaves no whiteout.
    Whiteout,
}

/// A timestamp to set with [`Dir::set_times`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// Leave this timestamp unchanged (`UTIME_OMIT`).
    Omit,
    /// Set it to the current time (`UTIME_NOW`).
    Now,
    /// Set it to this time.
    At(Timespec),
}

impl From<SystemTime> for SetTime {
    fn from(t: SystemTime) -> SetTime {
        let ts = match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos().into() },
            Err(e) => {
                // Before the epoch: seconds round down, nanoseconds stay positive.
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec { tv_sec: sec, tv_nsec: nsec.into() }
            }
        };
        SetTime::At(ts)
    }
}

impl SetTime {
    fn timespec(self) -> Timespec {
        match self {
            SetTime::Omit => Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
            SetTime::Now => Timespec { tv_sec: 0, tv_nsec: UTIME_NOW },
            SetTime::At(ts) => ts,
        }
    }
}

/// This process's umask, read once. It is never changed: a server that
/// holds many mounts also writes its own files, which need it, so objects
/// created for callers (whose modes arrive already masked by *their*
/// umask) get their exact mode with a `chmod` when ours would mask it.
fn process_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or(0o022)
    })
}

/// Would our umask take bits off `mode`?
fn masked_by_umask(mode: u32) -> bool {
    mode & 0o7777 & process_umask() != 0
}

/// Whether `stat` describes an overlayfs whiteout: a character device with
/// device number 0/0.
pub fn is_whiteout(stat: &Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::CharacterDevice && stat.st_rdev == 0
}

/// Checks that `name` is one path component, so an `*at()` call on it cannot
/// leave the directory it is relative to.
fn component(name: &OsStr) -> io::Result<&OsStr> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a single path component: {name:?}"),
        ));
    }
    Ok(name)
}

/// The flags for a no-follow `*at()` call on `name`, where the empty name
/// means the directory itself.
fn at_flags(name: &OsStr) -> io::Result<AtFlags> {
    if name.is_empty() {
        Ok(AtFlags::EMPTY_PATH)
    } else {
        component(name).map(|_| AtFlags::SYMLINK_NOFOLLOW)
    }
}

/// An inode held by an `O_PATH` descriptor, with the magic link through
/// which path-only syscalls reach exactly that inode (even a symlink)
/// without following anything further. `path` is valid while `fd` is open.
struct Pinned {
    fd: OwnedFd,
    path: String,
}

impl Pinned {
    fn new(fd: OwnedFd) -> Pinned {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        Pinned { fd, path }
    }
}

fn is_errno(e: &io::Error, errno: Errno) -> bool {
    Errno::from_io_error(e) == Some(errno)
}

impl Dir {
    /// Opens the root of an upper or work tree. This is the only entry point
    /// taking a path; symlinks in `path` are followed, as it is trusted.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        Ok(Dir { fd: rustix::fs::openat(CWD, path, flags, Mode::empty())? })
    }

    /// Opens the subdirectory `name`; fails if it is a symlink.
    pub fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(Dir { fd: rustix::fs::openat(&self.fd, component(name)?, flags, Mode::empty())? })
    }

    /// Opens the directory reached by walking `components` down from this
    /// one. Every component is checked first and then opened without
    /// following symlinks, so the result is always below `self` (mount points
    /// are crossed, as in a plain walk). An empty
    /// slice gives a new handle to this directory.
    pub fn open_beneath(&self, components: &[&OsStr]) -> io::Result<Dir> {
        for name in components {
            component(name)?;
        }
        let Some((first, rest)) = components.split_first() else {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            return Ok(Dir { fd: rustix::fs::openat(&self.fd, ".", flags, Mode::empty())? });
        };
        let mut dir = self.open_dir(first)?;
        for name in rest {
            dir = dir.open_dir(name)?;
        }
        Ok(dir)
    }

    /// `lstat` of `name`; the empty name stats this directory itself.
    pub fn stat(&self, name: &OsStr) -> io::Result<Stat> {
        Ok(rustix::fs::statat(&self.fd, name, at_flags(name)?)?)
    }

    /// Opens or creates the file `name`. `O_NOFOLLOW`, `O_CLOEXEC` and
    /// `O_NOCTTY` are always added, so a symlink fails with `ELOOP`. `mode`
    /// is used with `O_CREAT`, exactly (see [`masked_by_umask`]). Opening a
    /// fifo for I/O can block: callers must check the type first.
    pub fn open_file(&self, name: &OsStr, flags: OFlags, mode: u32) -> io::Result<File> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
        let fd = rustix::fs::openat(&self.fd, component(name)?, flags, Mode::from_raw_mode(mode))?;
        if flags.contains(OFlags::CREATE) && masked_by_umask(mode) {
            // Only a file we just created may have its mode fixed: an
            // existing one (no O_EXCL) keeps its own.
            let stat = rustix::fs::fstat(&fd)?;
            if stat.st_mode & 0o7777 == mode & 0o7777 & !process_umask() {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))?;
            }
        }
        Ok(File::from(fd))
    }

    /// Creates the directory `name` with exactly `mode`.
    pub fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        rustix::fs::mkdirat(&self.fd, component(name)?, Mode::from_raw_mode(mode))?;
        match masked_by_umask(mode) {
            true => self.chmod(name, mode),
            false => Ok(()),
        }
    }

    /// Creates a special file `name` of type `kind` (fifo, socket, character
    /// or block device; regular files work too) with exactly `mode`. `rdev`
    /// is used for devices.
    pub fn mknod(&self, name: &OsStr, kind: FileType, mode: u32, rdev: u64) -> io::Result<()> {
        let raw = Mode::from_raw_mode(mode);
        rustix::fs::mknodat(&self.fd, component(name)?, kind, raw, rdev)?;
        match masked_by_umask(mode) {
            true => self.chmod(name, mode),
            false => Ok(()),
        }
    }

    /// Creates an overlayfs whiteout `name`: a character device 0/0, mode 0.
    pub fn whiteout(&self, name: &OsStr) -> io::Result<()> {
        self.mknod(name, FileType::CharacterDevice, 0, 0)
    }

    /// Creates the symlink `name` pointing at `target`. The target is stored
    /// as is and never resolved here.
    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::symlinkat(target, &self.fd, component(name)?)?)
    }

    /// Hard-links `name` as `to_name` in `to_dir`. A symlink is linked
    /// itself, not its target.
    pub fn link(&self, name: &OsStr, to_dir: &Dir, to_name: &OsStr) -> io::Result<()> {
        let (from, to) = (component(name)?, component(to_name)?);
        Ok(rustix::fs::linkat(&self.fd, from, &to_dir.fd, to, AtFlags::empty())?)
    }

    /// Removes the non-directory `name`.
    pub fn unlink(&self, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, component(name)?, AtFlags::empty())?)
    }

    /// Removes the empty directory `name`.
    pub fn rmdir(&self, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, component(name)?, AtFlags::REMOVEDIR)?)
    }

    /// Renames `name` to `to_name` in `to_dir` (`renameat2`); see [`Rename`].
    pub fn rename(
        &self,
        name: &OsStr,
        to_dir: &Dir,
        to_name: &OsStr,
        how: Rename,
    ) -> io::Result<()> {
        let flags = match how {
            Rename::Replace => RenameFlags::empty(),
            Rename::NoReplace => RenameFlags::NOREPLACE,
            Rename::Exchange => RenameFlags::EXCHANGE,
            Rename::Whiteout => RenameFlags::WHITEOUT,
        };
        match self.rename_raw(name, to_dir, to_name, flags) {
            Err(e) if how == Rename::Whiteout && is_errno(&e, Errno::INVAL) => {
                self.rename_raw(name, to_dir, to_name, RenameFlags::empty())?;
                self.whiteout(name)
            }
            r => r,
        }
    }

    fn rename_raw(
        &self,
        name: &OsStr,
        to_dir: &Dir,
        to_name: &OsStr,
        flags: RenameFlags,
    ) -> io::Result<()> {
        let (from, to) = (component(name)?, component(to_name)?);
        Ok(rustix::fs::renameat_with(&self.fd, from, &to_dir.fd, to, flags)?)
    }

    /// The target of the symlink `name`.
    pub fn readlink(&self, name: &OsStr) -> io::Result<OsString> {
        let target = rustix::fs::readlinkat(&self.fd, component(name)?, Vec::new())?;
        Ok(OsString::from_vec(target.into_bytes()))
    }

    /// Sets the permission bits (`mode & 0o7777`) of `name`, or of this
    /// directory for the empty name. Like Linux `lchmod`, a symlink gives
    /// `EOPNOTSUPP` and its target is left alone.
    pub fn chmod(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        let pinned = self.pin(name)?;
        if FileType::from_raw_mode(rustix::fs::fstat(&pinned.fd)?.st_mode) == FileType::Symlink {
            return Err(Errno::OPNOTSUPP.into());
        }
        // The magic link resolves to the non-symlink inode pinned by `fd`.
        let mode = Mode::from_raw_mode(mode & 0o7777);
        Ok(rustix::fs::chmodat(CWD, &pinned.path, mode, AtFlags::empty())?)
    }

    /// Changes the owner and/or group of `name` (a symlink itself, not its
    /// target), or of this directory for the empty name. `None` keeps one.
    pub fn chown(&self, name: &OsStr, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let (uid, gid) = (uid.map(rustix::fs::Uid::from_raw), gid.map(rustix::fs::Gid::from_raw));
        Ok(rustix::fs::chownat(&self.fd, name, uid, gid, at_flags(name)?)?)
    }

    /// Sets the access and modification times of `name` (a symlink itself,
    /// not its target), or of this directory for the empty name.
    pub fn set_times(&self, name: &OsStr, atime: SetTime, mtime: SetTime) -> io::Result<()> {
        let times =
            Timestamps { last_access: atime.timespec(), last_modification: mtime.timespec() };
        Ok(rustix::fs::utimensat(&self.fd, name, &times, at_flags(name)?)?)
    }

    /// The extended attribute `key` of `name` (or of this directory for the
    /// empty name), `None` if it is not set. Works on symlinks and special
    /// files without opening them for I/O.
    pub fn get_xattr(&self, name: &OsStr, key: &OsStr) -> io::Result<Option<Vec<u8>>> {
        let pinned = self.pin(name)?;
        let path = pinned.path.as_str();
        loop {
            let size = match rustix::fs::getxattr_query(path, key) {
                Err(Errno::NODATA) => return Ok(None),
                r => r?,
            };
            if size == 0 {
                return Ok(Some(Vec::new()));
            }
            let mut value = vec![0; size];
            match rustix::fs::getxattr(path, key, &mut value[..]) {
                Ok(len) => {
                    value.truncate(len);
                    return Ok(Some(value));
                }
                Err(Errno::NODATA) => return Ok(None),
                // Grew between the two calls: ask for the size again.
                Err(Errno::RANGE) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sets the extended attribute `key` of `name` (or of this directory for
    /// the empty name). `flags` may ask for `CREATE`-only or `REPLACE`-only.
    pub fn set_xattr(
        &self,
        name: &OsStr,
        key: &OsStr,
        value: &[u8],
        flags: XattrFlags,
    ) -> io::Result<()> {
        let pinned = self.pin(name)?;
        let path = pinned.path.as_str();
        Ok(rustix::fs::setxattr(path, key, value, flags)?)
    }

    /// Removes the extended attribute `key` of `name` (or of this directory
    /// for the empty name); `ENODATA` if it is not set.
    pub fn remove_xattr(&self, name: &OsStr, key: &OsStr) -> io::Result<()> {
        let pinned = self.pin(name)?;
        let path = pinned.path.as_str();
        Ok(rustix::fs::removexattr(path, key)?)
    }

    /// The names of the extended attributes of `name` (or of this directory
    /// for the empty name) that this process may see.
    pub fn list_xattr(&self, name: &OsStr) -> io::Result<Vec<OsString>> {
        let pinned = self.pin(name)?;
        let path = pinned.path.as_str();
        let list = loop {
            let size = rustix::fs::listxattr_query(path)?;
            if size == 0 {
                return Ok(Vec::new());
            }
            let mut list = vec![0; size];
            match rustix::fs::listxattr(path, &mut list[..]) {
                Ok(len) => {
                    list.truncate(len);
                    break list;
                }
                Err(Errno::RANGE) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let names = list.split(|&b| b == 0).filter(|k| !k.is_empty());
        Ok(names.map(|k| OsStr::from_bytes(k).to_owned()).collect())
    }

    /// Pins the inode `name` (never following it), or this directory for
    /// the empty name.
    fn pin(&self, name: &OsStr) -> io::Result<Pinned> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let name = if name.is_empty() { OsStr::new(".") } else { component(name)? };
        Ok(Pinned::new(rustix::fs::openat(&self.fd, name, flags, Mode::empty())?))
    }

    /// The entries of this directory without `.` and `..`, in no particular
    /// order. Types the filesystem does not report are filled in by `lstat`.
    pub fn entries(&self) -> io::Result<Vec<(OsString, FileType)>> {
        // `read_from` reopens ".", so reading does not move `self.fd`.
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let mut kind = entry.file_type();
            if kind == FileType::Unknown {
                kind = FileType::from_raw_mode(self.stat(name)?.st_mode);
            }
            out.push((name.to_owned(), kind));
        }
        Ok(out)
    }

    /// Flushes this directory's entries to disk, e.g. after a rename.
    pub fn fsync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }

    /// Deletes `name` and, if it is a directory, everything below it, never
    /// following symlinks. Like `rm -rf`, a name that is already gone is not
    /// an error. Meant for temporary trees in the work directory.
    pub fn remove_all(&self, name: &OsStr) -> io::Result<()> {
        let result = match self.unlink(name) {
            // Linux reports a directory as `EISDIR`, which saves an lstat.
            Err(e) if is_errno(&e, Errno::ISDIR) => {
                let dir = self.open_dir(name)?;
                for (child, _) in dir.entries()? {
                    dir.remove_all(&child)?;
                }
                self.rmdir(name)
            }
            r => r,
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Statistics of the filesystem holding this directory.
    pub fn statvfs(&self) -> io::Result<StatVfs> {
        Ok(rustix::fs::fstatvfs(&self.fd)?)
    }
}

/// Kernel and filesystem features of one upper/work tree, probed once per
/// mount by [`Caps::probe`] and passed to whoever needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Prefix of the overlayfs xattrs (`opaque`, `redirect`, ...):
    /// `"trusted.overlay."` if `trusted.*` xattrs can be set (needs
    /// `CAP_SYS_ADMIN`), else `"user.overlay."` as for overlayfs'
    /// `userxattr` option.
    pub xattr_prefix: &'static str,
}

impl Caps {
    /// Probes by trying each feature in a scratch directory created in
    /// `work`, which is removed again. Fails only if the scratch directory
    /// cannot be created or removed.
    pub fn probe(work: &Dir) -> io::Result<Caps> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let scratch = OsString::from(format!(".rmount-probe-{}-{nanos}", std::process::id()));
        work.mkdir(&scratch, 0o700)?;
        let caps = work.open_dir(&scratch).map(|dir| Caps {
            xattr_prefix: if probe_trusted_xattr(&dir) {
                "trusted.overlay."
            } else {
                "user.overlay."
            },
        });
        let removed = work.remove_all(&scratch);
        let caps = caps?;
        removed?;
        Ok(caps)
    }
}

fn probe_trusted_xattr(dir: &Dir) -> bool {
    let key = OsStr::new("trusted.overlay.rmount-probe");
    dir.set_xattr(OsStr::new(""), key, b"y", XattrFlags::empty()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn n(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn skip_unless_root(what: &str) -> bool {
        if !is_root() {
            eprintln!("SKIPPED: {what} needs root");
        }
        !is_root()
    }

    fn setup() -> (tempfile::TempDir, Dir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        (tmp, dir)
    }

    fn kind(st: &Stat) -> FileType {
        FileType::from_raw_mode(st.st_mode)
    }

    fn create(dir: &Dir, name: &str, data: &[u8]) {
        let mut f =
            dir.open_file(n(name), OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, 0o644).unwrap();
        f.write_all(data).unwrap();
    }

    fn errno(e: &io::Error) -> Option<Errno> {
        Errno::from_io_error(e)
    }

    #[test]
    fn names_must_be_single_components() {
        let (_tmp, dir) = setup();
        for bad in ["", ".", "..", "a/b", "/", "/etc", "a/"] {
            let err = |r: io::Result<()>| r.unwrap_err().kind();
            assert_eq!(err(dir.mkdir(n(bad), 0o755)), io::ErrorKind::InvalidInput, "{bad}");
            assert_eq!(err(dir.unlink(n(bad))), io::ErrorKind::InvalidInput, "{bad}");
            assert_eq!(err(dir.symlink(n("x"), n(bad))), io::ErrorKind::InvalidInput);
            assert_eq!(err(dir.remove_all(n(bad))), io::ErrorKind::InvalidInput);
            let open = dir.open_file(n(bad), OFlags::RDONLY, 0).unwrap_err();
            assert_eq!(open.kind(), io::ErrorKind::InvalidInput);
            let walk = dir.open_beneath(&[n("ok"), n(bad)]).unwrap_err();
            assert_eq!(walk.kind(), io::ErrorKind::InvalidInput);
        }
        // The empty name means the directory itself only for metadata calls.
        assert_eq!(kind(&dir.stat(n("")).unwrap()), FileType::Directory);
        for bad in [".", "..", "a/b"] {
            assert_eq!(dir.stat(n(bad)).unwrap_err().kind(), io::ErrorKind::InvalidInput);
            assert_eq!(dir.chmod(n(bad), 0o700).unwrap_err().kind(), io::ErrorKind::InvalidInput);
            let xattr = dir.get_xattr(n(bad), n("user.x")).unwrap_err();
            assert_eq!(xattr.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn directories_and_entries() {
        let (tmp, dir) = setup();
        dir.mkdir(n("a"), 0o755).unwrap();
        assert_eq!(errno(&dir.mkdir(n("a"), 0o755).unwrap_err()), Some(Errno::EXIST));
        let a = dir.open_dir(n("a")).unwrap();
        a.mkdir(n("b"), 0o700).unwrap();
        create(&a, "file", b"x");
        a.symlink(n("b"), n("link")).unwrap();
        let b = dir.open_beneath(&[n("a"), n("b")]).unwrap();
        create(&b, "deep", b"");
        assert!(tmp.path().join("a/b/deep").exists());
        assert_eq!(
            dir.open_beneath(&[]).unwrap().stat(n("")).unwrap().st_ino,
            tmp.path().metadata().unwrap().ino()
        );

        let mut entries = a.entries().unwrap();
        entries.sort_by(|x, y| x.0.cmp(&y.0));
        let expected = [
            (OsString::from("b"), FileType::Directory),
            (OsString::from("file"), FileType::RegularFile),
            (OsString::from("link"), FileType::Symlink),
        ];
        assert_eq!(entries, expected);
        // Listing twice works: iteration does not consume the handle.
        assert_eq!(a.entries().unwrap().len(), 3);
        assert!(b.entries().unwrap().iter().all(|(name, _)| name == "deep"));
        assert!(dir.open_dir(n("a")).unwrap().open_dir(n("file")).is_err());
        assert_eq!(errno(&a.rmdir(n("b")).unwrap_err()), Some(Errno::NOTEMPTY));
        b.unlink(n("deep")).unwrap();
        a.rmdir(n("b")).unwrap();
        assert_eq!(errno(&a.unlink(n("missing")).unwrap_err()), Some(Errno::NOENT));
        a.fsync().unwrap();
        assert!(dir.statvfs().unwrap().f_bsize > 0);
    }

    #[test]
    fn files_symlinks_and_links() {
        let (tmp, dir) = setup();
        create(&dir, "f", b"hello");
        let excl = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
        assert_eq!(errno(&dir.open_file(n("f"), excl, 0o644).unwrap_err()), Some(Errno::EXIST));
        let mut s = String::new();
        dir.open_file(n("f"), OFlags::RDONLY, 0).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");

        dir.symlink(n("../some/where"), n("sl")).unwrap();
        assert_eq!(dir.readlink(n("sl")).unwrap(), "../some/where");
        assert_eq!(kind(&dir.stat(n("sl")).unwrap()), FileType::Symlink);
        assert_eq!(errno(&dir.readlink(n("f")).unwrap_err()), Some(Errno::INVAL));

        // A hard link of a symlink is the symlink itself.
        dir.mkdir(n("d"), 0o755).unwrap();
        let d = dir.open_dir(n("d")).unwrap();
        dir.link(n("sl"), &d, n("sl2")).unwrap();
        let st = d.stat(n("sl2")).unwrap();
        assert_eq!(kind(&st), FileType::Symlink);
        assert_eq!(st.st_nlink, 2);
        dir.link(n("f"), &d, n("f2")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("d/f2")).unwrap(), b"hello");
    }

    #[test]
    fn special_files_and_whiteouts() {
        let (_tmp, dir) = setup();
        dir.mknod(n("fifo"), FileType::Fifo, 0o644, 0).unwrap();
        dir.mknod(n("sock"), FileType::Socket, 0o644, 0).unwrap();
        assert_eq!(kind(&dir.stat(n("fifo")).unwrap()), FileType::Fifo);
        assert_eq!(kind(&dir.stat(n("sock")).unwrap()), FileType::Socket);
        assert!(!is_whiteout(&dir.stat(n("fifo")).unwrap()));
        if skip_unless_root("mknod of devices and whiteouts") {
            return;
        }
        dir.whiteout(n("wh")).unwrap();
        let st = dir.stat(n("wh")).unwrap();
        assert!(is_whiteout(&st));
        assert_eq!(st.st_mode & 0o7777, 0);
        let dev = rustix::fs::makedev(1, 3);
        dir.mknod(n("null"), FileType::CharacterDevice, 0o666, dev).unwrap();
        let st = dir.stat(n("null")).unwrap();
        assert_eq!(st.st_rdev, dev);
        assert!(!is_whiteout(&st));
        dir.mknod(n("blk"), FileType::BlockDevice, 0o600, rustix::fs::makedev(7, 0)).unwrap();
        assert_eq!(kind(&dir.stat(n("blk")).unwrap()), FileType::BlockDevice);
    }

    #[test]
    fn rename_flags() {
        let (tmp, dir) = setup();
        dir.mkdir(n("d"), 0o755).unwrap();
        let d = dir.open_dir(n("d")).unwrap();
        create(&dir, "a", b"A");
        create(&dir, "b", b"B");
        let read = |p: &str| std::fs::read(tmp.path().join(p)).unwrap();

        let e = dir.rename(n("a"), &dir, n("b"), Rename::NoReplace).unwrap_err();
        assert_eq!(errno(&e), Some(Errno::EXIST));
        dir.rename(n("a"), &dir, n("b"), Rename::Exchange).unwrap();
        assert_eq!((read("a"), read("b")), (b"B".to_vec(), b"A".to_vec()));
        let e = dir.rename(n("a"), &dir, n("missing"), Rename::Exchange).unwrap_err();
        assert_eq!(errno(&e), Some(Errno::NOENT));
        dir.rename(n("a"), &d, n("moved"), Rename::NoReplace).unwrap();
        dir.rename(n("b"), &d, n("moved"), Rename::Replace).unwrap();
        assert_eq!(read("d/moved"), b"A");
        assert!(!tmp.path().join("b").exists());

        if skip_unless_root("RENAME_WHITEOUT") {
            return;
        }
        d.rename(n("moved"), &dir, n("back"), Rename::Whiteout).unwrap();
        assert!(is_whiteout(&d.stat(n("moved")).unwrap()));
        assert_eq!(read("back"), b"A");
    }

    #[test]
    fn modes_owners_times() {
        let (tmp, dir) = setup();
        create(&dir, "f", b"");
        dir.chmod(n("f"), 0o4710).unwrap();
        assert_eq!(dir.stat(n("f")).unwrap().st_mode & 0o7777, 0o4710);
        dir.chmod(n(""), 0o750).unwrap();
        assert_eq!(tmp.path().metadata().unwrap().permissions().mode() & 0o7777, 0o750);
        dir.symlink(n("f"), n("sl")).unwrap();
        assert_eq!(errno(&dir.chmod(n("sl"), 0o777).unwrap_err()), Some(Errno::OPNOTSUPP));
        assert_eq!(dir.stat(n("f")).unwrap().st_mode & 0o7777, 0o4710);

        let t = |sec| SetTime::At(Timespec { tv_sec: sec, tv_nsec: 5 });
        dir.set_times(n("f"), t(1000), t(2000)).unwrap();
        let st = dir.stat(n("f")).unwrap();
        assert_eq!((st.st_atime, st.st_atime_nsec, st.st_mtime), (1000, 5, 2000));
        dir.set_times(n("f"), SetTime::Omit, SetTime::Now).unwrap();
        let st = dir.stat(n("f")).unwrap();
        assert_eq!(st.st_atime, 1000);
        assert!(st.st_mtime > 1_600_000_000);
        // On a symlink only the link's times change.
        dir.set_times(n("sl"), t(3000), t(4000)).unwrap();
        assert_eq!(dir.stat(n("sl")).unwrap().st_mtime, 4000);
        assert_eq!(dir.stat(n("f")).unwrap().st_atime, 1000);
        dir.set_times(n(""), t(5000), t(6000)).unwrap();
        assert_eq!(dir.stat(n("")).unwrap().st_mtime, 6000);
        let before_epoch = SystemTime::UNIX_EPOCH - std::time::Duration::from_millis(1500);
        let want = SetTime::At(Timespec { tv_sec: -2, tv_nsec: 500_000_000 });
        assert_eq!(SetTime::from(before_epoch), want);

        if skip_unless_root("chown") {
            return;
        }
        dir.chown(n("f"), Some(1234), None).unwrap();
        let st = dir.stat(n("f")).unwrap();
        assert_eq!((st.st_uid, st.st_gid), (1234, 0));
        dir.chown(n("sl"), Some(42), Some(43)).unwrap();
        let st = dir.stat(n("sl")).unwrap();
        assert_eq!((st.st_uid, st.st_gid), (42, 43));
        assert_eq!(dir.stat(n("f")).unwrap().st_uid, 1234);
        dir.chown(n(""), None, Some(77)).unwrap();
        assert_eq!(tmp.path().metadata().unwrap().gid(), 77);
    }

    #[test]
    fn xattrs_on_files_and_dirs() {
        let (_tmp, dir) = setup();
        create(&dir, "f", b"");
        let key = n("user.rmount.test");
        assert_eq!(dir.get_xattr(n("f"), key).unwrap(), None);
        dir.set_xattr(n("f"), key, b"value", XattrFlags::CREATE).unwrap();
        assert_eq!(dir.get_xattr(n("f"), key).unwrap().as_deref(), Some(&b"value"[..]));
        let e = dir.set_xattr(n("f"), key, b"v2", XattrFlags::CREATE).unwrap_err();
        assert_eq!(errno(&e), Some(Errno::EXIST));
        let e = dir.set_xattr(n("f"), n("user.other"), b"", XattrFlags::REPLACE).unwrap_err();
        assert_eq!(errno(&e), Some(Errno::NODATA));
        dir.set_xattr(n("f"), n("user.empty"), b"", XattrFlags::empty()).unwrap();
        assert_eq!(dir.get_xattr(n("f"), n("user.empty")).unwrap(), Some(Vec::new()));
        let big = vec![7u8; 3000];
        dir.set_xattr(n("f"), key, &big, XattrFlags::REPLACE).unwrap();
        assert_eq!(dir.get_xattr(n("f"), key).unwrap(), Some(big));
        let mut keys = dir.list_xattr(n("f")).unwrap();
        keys.retain(|k| k.as_bytes().starts_with(b"user."));
        keys.sort();
        assert_eq!(keys, [OsString::from("user.empty"), OsString::from("user.rmount.test")]);
        dir.remove_xattr(n("f"), key).unwrap();
        assert_eq!(dir.get_xattr(n("f"), key).unwrap(), None);
        assert_eq!(errno(&dir.remove_xattr(n("f"), key).unwrap_err()), Some(Errno::NODATA));
        assert_eq!(dir.get_xattr(n("missing"), key).unwrap_err().kind(), io::ErrorKind::NotFound);

        // The directory itself, by the empty name and from its parent.
        dir.mkdir(n("d"), 0o755).unwrap();
        let d = dir.open_dir(n("d")).unwrap();
        d.set_xattr(n(""), n("user.overlay.opaque"), b"y", XattrFlags::empty()).unwrap();
        let got = dir.get_xattr(n("d"), n("user.overlay.opaque")).unwrap();
        assert_eq!(got.as_deref(), Some(&b"y"[..]));
    }

    #[test]
    fn xattrs_on_symlinks_and_special_files() {
        let (_tmp, dir) = setup();
        create(&dir, "target", b"");
        dir.symlink(n("target"), n("sl")).unwrap();
        dir.mknod(n("fifo"), FileType::Fifo, 0o644, 0).unwrap();
        // The kernel forbids user.* on symlinks (EPERM) and acts on the link,
        // never on its target.
        let e = dir.set_xattr(n("sl"), n("user.x"), b"1", XattrFlags::empty()).unwrap_err();
        assert_eq!(errno(&e), Some(Errno::PERM));
        assert_eq!(dir.get_xattr(n("target"), n("user.x")).unwrap(), None);
        assert_eq!(dir.get_xattr(n("sl"), n("user.x")).unwrap(), None);
        // A fifo is not opened (that would block without a writer).
        let e = dir.set_xattr(n("fifo"), n("user.x"), b"1", XattrFlags::empty()).unwrap_err();
        assert_eq!(errno(&e), Some(Errno::PERM));
        assert_eq!(dir.get_xattr(n("fifo"), n("user.x")).unwrap(), None);

        if skip_unless_root("trusted.* xattrs") {
            return;
        }
        dir.whiteout(n("wh")).unwrap();
        for name in ["sl", "fifo", "wh"] {
            let key = n("trusted.overlay.test");
            dir.set_xattr(n(name), key, name.as_bytes(), XattrFlags::empty()).unwrap();
            assert_eq!(dir.get_xattr(n(name), key).unwrap().as_deref(), Some(name.as_bytes()));
            assert!(dir.list_xattr(n(name)).unwrap().iter().any(|k| k == key));
            dir.remove_xattr(n(name), key).unwrap();
            assert_eq!(dir.get_xattr(n(name), key).unwrap(), None);
        }
        dir.set_xattr(n("sl"), n("trusted.overlay.x"), b"1", XattrFlags::empty()).unwrap();
        assert_eq!(dir.get_xattr(n("target"), n("trusted.overlay.x")).unwrap(), None);
    }

    /// A symlink inside the upper must never make an operation land outside.
    #[test]
    fn symlinks_never_lead_outside() {
        let (tmp, dir) = setup();
        let outside = tempfile::tempdir().unwrap();
        let out = outside.path();
        std::fs::write(out.join("file"), b"precious").unwrap();
        std::fs::set_permissions(out.join("file"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let out_mode = out.metadata().unwrap().permissions().mode();
        dir.symlink(out.as_os_str(), n("evil")).unwrap();
        dir.symlink(out.join("file").as_os_str(), n("evil_file")).unwrap();
        dir.symlink(out.join("new").as_os_str(), n("dangling")).unwrap();
        dir.mkdir(n("sub"), 0o755).unwrap();
        dir.open_dir(n("sub")).unwrap().symlink(n(".."), n("up")).unwrap();

        assert!(dir.open_dir(n("evil")).is_err());
        assert!(dir.open_beneath(&[n("evil")]).is_err());
        assert!(dir.open_beneath(&[n("sub"), n("up")]).is_err());
        let write = OFlags::WRONLY | OFlags::CREATE;
        for name in ["evil", "evil_file", "dangling"] {
            let e = dir.open_file(n(name), write | OFlags::TRUNC, 0o644).unwrap_err();
            assert_eq!(errno(&e), Some(Errno::LOOP), "{name}");
            let e = dir.open_file(n(name), OFlags::RDONLY, 0).unwrap_err();
            assert_eq!(errno(&e), Some(Errno::LOOP), "{name}");
            assert_eq!(errno(&dir.mkdir(n(name), 0o755).unwrap_err()), Some(Errno::EXIST));
            let e = dir.mknod(n(name), FileType::Fifo, 0o644, 0).unwrap_err();
            assert_eq!(errno(&e), Some(Errno::EXIST));
            assert_eq!(errno(&dir.chmod(n(name), 0o777).unwrap_err()), Some(Errno::OPNOTSUPP));
            assert_eq!(errno(&dir.symlink(n("x"), n(name)).unwrap_err()), Some(Errno::EXIST));
            let at = SetTime::At(Timespec { tv_sec: 1, tv_nsec: 0 });
            dir.set_times(n(name), at, at).unwrap();
            assert!(dir.set_xattr(n(name), n("user.x"), b"1", XattrFlags::empty()).is_err());
            if is_root() {
                dir.chown(n(name), Some(4242), Some(4242)).unwrap();
                let key = n("trusted.overlay.x");
                dir.set_xattr(n(name), key, b"1", XattrFlags::empty()).unwrap();
            }
        }
        dir.link(n("evil_file"), &dir, n("hard")).unwrap();
        assert_eq!(kind(&dir.stat(n("hard")).unwrap()), FileType::Symlink);
        dir.rename(n("evil"), &dir, n("evil2"), Rename::NoReplace).unwrap();
        dir.remove_all(n("evil2")).unwrap();
        dir.remove_all(n("sub")).unwrap();

        // Nothing outside changed.
        assert_eq!(std::fs::read(out.join("file")).unwrap(), b"precious");
        let meta = out.join("file").metadata().unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        assert_ne!(meta.mtime(), 1);
        assert_ne!(meta.uid(), 4242);
        assert!(xattr_keys(&out.join("file")).is_empty());
        assert!(xattr_keys(out).is_empty());
        assert_eq!(out.metadata().unwrap().permissions().mode(), out_mode);
        assert_ne!(out.metadata().unwrap().uid(), 4242);
        assert!(!out.join("new").exists());
        let mut names: Vec<_> =
            std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [OsString::from("file")]);
        assert!(tmp.path().join("evil_file").symlink_metadata().is_ok());
    }

    fn xattr_keys(path: &Path) -> Vec<OsString> {
        let dir = Dir::open(path.parent().unwrap()).unwrap();
        dir.list_xattr(path.file_name().unwrap())
            .unwrap()
            .into_iter()
            .filter(|k| !k.as_bytes().starts_with(b"security."))
            .collect()
    }

    #[test]
    fn remove_all_trees() {
        let (tmp, dir) = setup();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"").unwrap();
        std::fs::create_dir_all(tmp.path().join("t/a/b/c")).unwrap();
        std::fs::write(tmp.path().join("t/a/b/c/f"), b"").unwrap();
        std::fs::write(tmp.path().join("t/a/g"), b"").unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("t/a/out")).unwrap();
        dir.remove_all(n("t")).unwrap();
        assert!(!tmp.path().join("t").exists());
        assert!(outside.path().join("keep").exists());
        dir.remove_all(n("t")).unwrap();
        create(&dir, "plain", b"");
        dir.remove_all(n("plain")).unwrap();
        assert!(dir.entries().unwrap().is_empty());
    }

    #[test]
    fn caps_probe() {
        let (_tmp, dir) = setup();
        let caps = Caps::probe(&dir).unwrap();
        assert!(dir.entries().unwrap().is_empty(), "probe left files behind");
        if skip_unless_root("trusted xattr probe") {
            return;
        }
        // ext4/tmpfs as root support everything.
        assert_eq!(caps, Caps { xattr_prefix: "trusted.overlay." });
    }
}
