//! Runs ops on a mount through fds of it (see the `ops` module doc).

use std::fs::{File, Metadata};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use rustix::fs::{
    self as rfs, AtFlags, FallocateFlags, FileType, Gid, Mode, OFlags, RenameFlags, ResolveFlags,
    Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use super::{Falloc, HoldHow, Op, RenameHow, WriteAt, XattrHow, SLOTS};
use crate::common::kind_name;

/// Why an op produced no `ok`: an errno, or a note (no fd in a slot, a
/// special file the harness will not open).
pub(super) enum Fail {
    Errno(Errno),
    Note(String),
}

impl From<Errno> for Fail {
    fn from(e: Errno) -> Fail {
        Fail::Errno(e)
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        match Errno::from_io_error(&e) {
            Some(errno) => Fail::Errno(errno),
            None => Fail::Note(e.to_string()),
        }
    }
}

pub(super) type R<T> = Result<T, Fail>;

/// Ops executed against one mount: an `O_PATH` fd of its root and the fds
/// `Op::Hold` keeps open. Drop it before unmounting (its fds pin the mount).
pub struct Session {
    root: OwnedFd,
    fds: Vec<Option<File>>,
    /// Times at or after this (seconds) show as `recent`.
    recent: i64,
}

impl Session {
    pub fn new(mountpoint: &Path, recent: i64) -> Session {
        let root = rfs::open(
            mountpoint,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", mountpoint.display()));
        Session { root, fds: (0..SLOTS).map(|_| None).collect(), recent }
    }

    /// Runs `op`; returns its outcome followed by the state of the paths it
    /// touched.
    pub fn apply(&mut self, op: &Op) -> String {
        let mut out = match self.exec(op) {
            Ok(s) if s.is_empty() => "ok".to_string(),
            Ok(s) => format!("ok {s}"),
            Err(Fail::Errno(e)) => errno_name(e),
            Err(Fail::Note(s)) => s,
        };
        for (path, follow) in op.touched() {
            let state = match self.metadata(&path, follow) {
                Ok(m) => describe_meta(&m, self.recent),
                Err(Fail::Errno(e)) => errno_name(e),
                Err(Fail::Note(s)) => s,
            };
            let shown = if path.is_empty() { "/" } else { &path };
            out += &format!(" | {shown}: {state}");
        }
        out
    }

    fn exec(&mut self, op: &Op) -> R<String> {
        match op {
            Op::Create { path, excl, mode } => {
                let mut flags = OFlags::CREATE | OFlags::WRONLY;
                if *excl {
                    flags |= OFlags::EXCL;
                }
                self.open_data(path, flags, *mode)?;
                Ok(String::new())
            }
            Op::Write { path, at, data } => {
                let flags = OFlags::WRONLY
                    | match at {
                        WriteAt::Trunc => OFlags::TRUNC,
                        WriteAt::Append => OFlags::APPEND,
                        WriteAt::Offset(_) => OFlags::empty(),
                    };
                let file = self.open_data(path, flags, 0)?;
                let bytes = data.bytes();
                let n = match at {
                    WriteAt::Offset(off) => file.write_at(&bytes, *off)?,
                    _ => (&file).write(&bytes)?,
                };
                Ok(format!("wrote {n}"))
            }
            Op::Read { path, off, len } => {
                let file = self.open_data(path, OFlags::RDONLY, 0)?;
                Ok(show_bytes(&read_range(&file, *off, *len)?))
            }
            Op::Truncate { path, len } => {
                self.open_data(path, OFlags::WRONLY, 0)?.set_len(*len)?;
                Ok(String::new())
            }
            Op::Fallocate { path, how, off, len } => {
                let file = self.open_data(path, OFlags::WRONLY, 0)?;
                let flags = match how {
                    Falloc::Allocate => FallocateFlags::empty(),
                    Falloc::KeepSize => FallocateFlags::KEEP_SIZE,
                    Falloc::PunchHole => FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                };
                rfs::fallocate(&file, flags, *off, *len)?;
                Ok(String::new())
            }
            Op::Mkdir { path, mode } => {
                let (dir, name) = self.parent(path)?;
                rfs::mkdirat(&dir, name, Mode::from_raw_mode(*mode))?;
                Ok(String::new())
            }
            Op::Mkfifo { path } => {
                let (dir, name) = self.parent(path)?;
                rfs::mknodat(&dir, name, FileType::Fifo, Mode::from_raw_mode(0o644), 0)?;
                Ok(String::new())
            }
            Op::Mknod { path, minor } => {
                let (dir, name) = self.parent(path)?;
                let dev = rfs::makedev(1, *minor);
                rfs::mknodat(
                    &dir,
                    name,
                    FileType::CharacterDevice,
                    Mode::from_raw_mode(0o600),
                    dev,
                )?;
                Ok(String::new())
            }
            Op::Symlink { target, path } => {
                let (dir, name) = self.parent(path)?;
                rfs::symlinkat(target.as_str(), &dir, name)?;
                Ok(String::new())
            }
            Op::Link { from, to } => {
                let (from_dir, from_name) = self.parent(from)?;
                let (to_dir, to_name) = self.parent(to)?;
                rfs::linkat(&from_dir, from_name, &to_dir, to_name, AtFlags::empty())?;
                Ok(String::new())
            }
            Op::Unlink { path } | Op::Rmdir { path } => {
                let (dir, name) = self.parent(path)?;
                let flags = if matches!(op, Op::Rmdir { .. }) {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                rfs::unlinkat(&dir, name, flags)?;
                Ok(String::new())
            }
            Op::Rename { from, to, how } => {
                let (from_dir, from_name) = self.parent(from)?;
                let (to_dir, to_name) = self.parent(to)?;
                let flags = match how {
                    RenameHow::Plain => RenameFlags::empty(),
                    RenameHow::NoReplace => RenameFlags::NOREPLACE,
                    RenameHow::Exchange => RenameFlags::EXCHANGE,
                };
                rfs::renameat_with(&from_dir, from_name, &to_dir, to_name, flags)?;
                Ok(String::new())
            }
            Op::Chmod { path, mode } => {
                let fd = self.resolve(path, OFlags::PATH, Mode::empty())?;
                rfs::chmod(proc_path(&fd), Mode::from_raw_mode(*mode))?;
                Ok(String::new())
            }
            Op::Chown { path, uid, gid, follow } => {
                let uid = uid.map(Uid::from_raw);
                let gid = gid.map(Gid::from_raw);
                if *follow {
                    let fd = self.resolve(path, OFlags::PATH, Mode::empty())?;
                    rfs::chown(proc_path(&fd), uid, gid)?;
                } else {
                    let (dir, name) = self.parent(path)?;
                    rfs::chownat(&dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)?;
                }
                Ok(String::new())
            }
            Op::Utimes { path, atime, mtime, follow } => {
                let spec = |(s, ns): (i64, i64)| Timespec { tv_sec: s, tv_nsec: ns };
                let times = Timestamps {
                    last_access: atime
                        .map_or(Timespec { tv_sec: 0, tv_nsec: rfs::UTIME_OMIT }, spec),
                    last_modification: spec(*mtime),
                };
                if *follow {
                    let fd = self.resolve(path, OFlags::PATH, Mode::empty())?;
                    rfs::utimensat(rfs::CWD, proc_path(&fd), &times, AtFlags::empty())?;
                } else {
                    let (dir, name) = self.parent(path)?;
                    rfs::utimensat(&dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
                }
                Ok(String::new())
            }
            Op::SetXattr { path, name, value, how } => {
                let fd = self.resolve(path, OFlags::PATH, Mode::empty())?;
                let flags = match how {
                    XattrHow::Any => XattrFlags::empty(),
                    XattrHow::Create => XattrFlags::CREATE,
                    XattrHow::Replace => XattrFlags::REPLACE,
                };
                rfs::setxattr(proc_path(&fd), name.as_str(), &value.bytes(), flags)?;
                Ok(String::new())
            }
            Op::RemoveXattr { path, name } => {
                let fd = self.resolve(path, OFlags::PATH, Mode::empty())?;
                rfs::removexattr(proc_path(&fd), name.as_str())?;
                Ok(String::new())
            }
            Op::GetXattr { path, name } => {
                let fd = self.resolve(path, OFlags::PATH, Mode::empty())?;
                let mut buf = vec![0u8; 64 * 1024];
                let n = rfs::getxattr(proc_path(&fd), name.as_str(), &mut buf[..])?;
                Ok(show_bytes(&buf[..n]))
            }
            Op::ListXattr { path } => {
                let fd = self.resolve(path, OFlags::PATH, Mode::empty())?;
                let proc = proc_path(&fd);
                let mut names = vec![0u8; 64 * 1024];
                let n = rfs::listxattr(&proc, &mut names[..])?;
                let mut shown = Vec::new();
                for name in user_xattr_names(&names[..n]) {
                    let mut value = vec![0u8; 64 * 1024];
                    let v = match rfs::getxattr(&proc, name.as_str(), &mut value[..]) {
                        Ok(len) => hex::encode(&value[..len]),
                        Err(e) => errno_name(e),
                    };
                    shown.push(format!("{name}={v}"));
                }
                Ok(format!("[{}]", shown.join(",")))
            }
            Op::Fsync { path } => {
                self.open_data(path, OFlags::RDONLY, 0)?.sync_all()?;
                Ok(String::new())
            }
            Op::OpenUnlinkWrite { path, off, data } => {
                let file = self.open_data(path, OFlags::RDWR, 0)?;
                let (dir, name) = self.parent(path)?;
                rfs::unlinkat(&dir, name, AtFlags::empty())?;
                let n = file.write_at(&data.bytes(), *off)?;
                let back = read_range(&file, 0, *off as usize + data.len)?;
                let m = file.metadata()?;
                Ok(format!(
                    "wrote {n}, read {}, fstat {}",
                    show_bytes(&back),
                    describe_meta(&m, self.recent)
                ))
            }
            Op::Hold { slot, path, how } => {
                self.fds[*slot] = None;
                let flags = match how {
                    HoldHow::Read => OFlags::RDONLY,
                    HoldHow::ReadWrite => OFlags::RDWR,
                    HoldHow::Append => OFlags::WRONLY | OFlags::APPEND,
                };
                self.fds[*slot] = Some(self.open_data(path, flags, 0)?);
                Ok(String::new())
            }
            Op::FdWrite { slot, off, data } => {
                let n = self.held(*slot)?.write_at(&data.bytes(), *off)?;
                Ok(format!("wrote {n}"))
            }
            Op::FdRead { slot, off, len } => {
                Ok(show_bytes(&read_range(self.held(*slot)?, *off, *len)?))
            }
            Op::FdStat { slot } => Ok(describe_meta(&self.held(*slot)?.metadata()?, self.recent)),
            Op::Close { slot } => match self.fds[*slot].take() {
                Some(_) => Ok(String::new()),
                None => Err(Fail::Note("no-fd".into())),
            },
            Op::Stat { path, follow } => {
                Ok(describe_meta(&self.metadata(path, *follow)?, self.recent))
            }
            Op::ReadDir { path } => {
                let fd = self.resolve(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
                let mut names = Vec::new();
                for entry in rfs::Dir::read_from(&fd)? {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name != "." && name != ".." {
                        names.push(format!("{name}:{}", type_name(entry.file_type())));
                    }
                }
                names.sort();
                Ok(format!("[{}]", names.join(",")))
            }
            Op::Readlink { path } => {
                let (dir, name) = self.parent(path)?;
                let target = rfs::readlinkat(&dir, name, Vec::new())?;
                Ok(format!("{:?}", target.to_string_lossy()))
            }
        }
    }

    fn held(&self, slot: usize) -> R<&File> {
        self.fds[slot].as_ref().ok_or_else(|| Fail::Note("no-fd".into()))
    }

    /// `openat2` of `path` beneath the mount root; symlinks (absolute ones
    /// too) resolve inside the mount, and `/proc` magic links are refused.
    fn resolve(&self, path: &str, flags: OFlags, mode: Mode) -> R<OwnedFd> {
        let path = if path.is_empty() { "." } else { path };
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        let mut tries = 0;
        loop {
            // EAGAIN: a concurrent rename or mount raced the lookup; retry.
            match rfs::openat2(&self.root, path, flags | OFlags::CLOEXEC, mode, resolve) {
                Err(Errno::AGAIN) if tries < 10 => tries += 1,
                other => return Ok(other?),
            }
        }
    }

    /// The resolved parent directory of `path` and its final component.
    fn parent<'p>(&self, path: &'p str) -> R<(OwnedFd, &'p str)> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        Ok((self.resolve(dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?, name))
    }

    fn metadata(&self, path: &str, follow: bool) -> R<Metadata> {
        let flags = if follow { OFlags::PATH } else { OFlags::PATH | OFlags::NOFOLLOW };
        Ok(File::from(self.resolve(path, flags, Mode::empty())?).metadata()?)
    }

    /// Opens `path` for data I/O, following symlinks inside the mount. Only
    /// regular files and directories are opened: a fifo would block and a
    /// device node is the host's device.
    fn open_data(&self, path: &str, flags: OFlags, mode: u32) -> R<File> {
        if !flags.contains(OFlags::EXCL) {
            if let Ok(fd) = self.resolve(path, OFlags::PATH, Mode::empty()) {
                let ft = File::from(fd).metadata()?.file_type();
                if !ft.is_file() && !ft.is_dir() {
                    return Err(Fail::Note(format!("not-opened:{}", kind_name(&ft))));
                }
            }
        }
        Ok(File::from(self.resolve(path, flags, Mode::from_raw_mode(mode))?))
    }
}

/// `/proc/self/fd/N`: names the object `fd` refers to (following it acts on
/// that inode, even if it is a symlink), never anything outside the mount.
fn proc_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// `pread` until `len` bytes or EOF.
fn read_range(file: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], off + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    buf.truncate(done);
    Ok(buf)
}

fn show_bytes(data: &[u8]) -> String {
    let head = String::from_utf8_lossy(&data[..data.len().min(12)]).into_owned();
    format!("{}B {head:?} sha256:{}", data.len(), &crate::common::sha256_hex(data)[..16])
}

pub(super) fn user_xattr_names(list: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = list
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user."))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    names
}

pub fn errno_name(e: Errno) -> String {
    let known = [
        (Errno::NOENT, "ENOENT"),
        (Errno::EXIST, "EEXIST"),
        (Errno::NOTDIR, "ENOTDIR"),
        (Errno::ISDIR, "EISDIR"),
        (Errno::NOTEMPTY, "ENOTEMPTY"),
        (Errno::INVAL, "EINVAL"),
        (Errno::PERM, "EPERM"),
        (Errno::ACCESS, "EACCES"),
        (Errno::XDEV, "EXDEV"),
        (Errno::NODATA, "ENODATA"),
        (Errno::RANGE, "ERANGE"),
        (Errno::OPNOTSUPP, "EOPNOTSUPP"),
        (Errno::LOOP, "ELOOP"),
        (Errno::BADF, "EBADF"),
        (Errno::NXIO, "ENXIO"),
        (Errno::FBIG, "EFBIG"),
        (Errno::NOSPC, "ENOSPC"),
        (Errno::MLINK, "EMLINK"),
        (Errno::BUSY, "EBUSY"),
        (Errno::NAMETOOLONG, "ENAMETOOLONG"),
        (Errno::TXTBSY, "ETXTBSY"),
        (Errno::IO, "EIO"),
        (Errno::ROFS, "EROFS"),
        (Errno::NOSYS, "ENOSYS"),
        (Errno::STALE, "ESTALE"),
        (Errno::NOTSUP, "ENOTSUP"),
    ];
    known
        .iter()
        .find(|(k, _)| *k == e)
        .map_or_else(|| format!("errno {}", e.raw_os_error()), |(_, n)| n.to_string())
}

fn type_name(ft: FileType) -> &'static str {
    match ft {
        FileType::Directory => "dir",
        FileType::RegularFile => "file",
        FileType::Symlink => "link",
        FileType::CharacterDevice => "chr",
        FileType::BlockDevice => "blk",
        FileType::Fifo => "fifo",
        FileType::Socket => "sock",
        _ => "unknown",
    }
}

/// `secs.nanos` if older than `recent`, else `recent`.
fn time_class(secs: i64, nsecs: i64, recent: i64) -> String {
    if secs < recent {
        format!("{secs}.{nsecs:09}")
    } else {
        "recent".to_string()
    }
}

/// Type, permission bits (setuid, setgid, sticky included), owner, and for
/// non-directories size and nlink, device numbers, and the mtime class.
/// Directory size and nlink are left out: they depend on the backing file
/// system, and overlayfs reports nlink 1 for merged dirs.
pub fn describe_meta(m: &Metadata, recent: i64) -> String {
    let ft = m.file_type();
    let mut s = format!("{} {:04o} {}:{}", kind_name(&ft), m.mode() & 0o7777, m.uid(), m.gid());
    if !ft.is_dir() {
        s += &format!(" size={} nlink={}", m.size(), m.nlink());
    }
    if ft.is_char_device() || ft.is_block_device() {
        s += &format!(" rdev={}:{}", rfs::major(m.rdev()), rfs::minor(m.rdev()));
    }
    s + &format!(" mtime={}", time_class(m.mtime(), m.mtime_nsec(), recent))
}
