//! [`Metered`]: a FUSE filesystem wrapped so that every request it handles
//! is counted and timed into a [`FsMetrics`] (the daemon's Prometheus
//! endpoint shows them). Every method of fuser's `Filesystem` trait is
//! passed through, so wrapping never changes behaviour.
//!
//! The time is the handler's: a request a filesystem answers later from a
//! worker thread (a writable mount's read that must decompress) counts up
//! to its hand-off. Whether a request failed is not visible here: the
//! reply goes straight from the inner filesystem to the kernel.

use super::metrics::{FsMetrics, Op, OpTimer};
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, FileHandle, Filesystem, INodeNo, IoctlFlags,
    KernelConfig, LockOwner, OpenFlags, PollEvents, PollNotifier, RenameFlags, ReplyAttr,
    ReplyBmap, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// `inner`, with its requests counted and timed (`metrics: None` records
/// nothing and costs nothing).
pub struct Metered<F> {
    inner: F,
    metrics: Option<Arc<FsMetrics>>,
}

impl<F> Metered<F> {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: F, metrics: Option<Arc<FsMetrics>>) -> Self {
        Self { inner, metrics }
    }
}

/// Each listed method times itself as `$op` and calls the inner one.
macro_rules! timed {
    ($( $op:ident => fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?); )*) => {
        $(
            fn $name(&self $(, $arg: $ty)*) {
                let _timer = OpTimer::start(self.metrics.as_deref(), Op::$op);
                self.inner.$name($($arg),*)
            }
        )*
    };
}

impl<F: Filesystem> Filesystem for Metered<F> {
    fn init(&mut self, req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.inner.init(req, config)
    }

    fn destroy(&mut self) {
        self.inner.destroy()
    }

    // fuser's `batch_forget` (whose argument type is private) calls this
    // once per inode.
    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.forget(req, ino, nlookup)
    }

    timed! {
        Lookup => fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry);
        Getattr => fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr);
        Setattr => fn setattr(
            &self, req: &Request, ino: INodeNo, mode: Option<u32>, uid: Option<u32>,
            gid: Option<u32>, size: Option<u64>, atime: Option<TimeOrNow>,
            mtime: Option<TimeOrNow>, ctime: Option<SystemTime>, fh: Option<FileHandle>,
            crtime: Option<SystemTime>, chgtime: Option<SystemTime>,
            bkuptime: Option<SystemTime>, flags: Option<BsdFileFlags>, reply: ReplyAttr,
        );
        Readlink => fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData);
        Mknod => fn mknod(
            &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32,
            rdev: u32, reply: ReplyEntry,
        );
        Mkdir => fn mkdir(
            &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32,
            reply: ReplyEntry,
        );
        Unlink => fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty);
        Rmdir => fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty);
        Symlink => fn symlink(
            &self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path,
            reply: ReplyEntry,
        );
        Rename => fn rename(
            &self, req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo,
            newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty,
        );
        Link => fn link(
            &self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr,
            reply: ReplyEntry,
        );
        Open => fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen);
        Read => fn read(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, size: u32,
            flags: OpenFlags, lock_owner: Option<LockOwner>, reply: ReplyData,
        );
        Write => fn write(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, data: &[u8],
            write_flags: WriteFlags, flags: OpenFlags, lock_owner: Option<LockOwner>,
            reply: ReplyWrite,
        );
        Flush => fn flush(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner,
            reply: ReplyEmpty,
        );
        Release => fn release(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, flags: OpenFlags,
            lock_owner: Option<LockOwner>, flush: bool, reply: ReplyEmpty,
        );
        Fsync => fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty);
        Opendir => fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen);
        Readdir => fn readdir(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64,
            reply: ReplyDirectory,
        );
        Readdir => fn readdirplus(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64,
            reply: ReplyDirectoryPlus,
        );
        Releasedir => fn releasedir(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, flags: OpenFlags,
            reply: ReplyEmpty,
        );
        Fsync => fn fsyncdir(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool,
            reply: ReplyEmpty,
        );
        Statfs => fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs);
        Setxattr => fn setxattr(
            &self, req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32,
            position: u32, reply: ReplyEmpty,
        );
        Getxattr => fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr);
        Listxattr => fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr);
        Removexattr => fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty);
        Access => fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty);
        Create => fn create(
            &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32,
            flags: i32, reply: ReplyCreate,
        );
        Other => fn getlk(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner,
            start: u64, end: u64, typ: i32, pid: u32, reply: ReplyLock,
        );
        Other => fn setlk(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner,
            start: u64, end: u64, typ: i32, pid: u32, sleep: bool, reply: ReplyEmpty,
        );
        Other => fn bmap(&self, req: &Request, ino: INodeNo, blocksize: u32, idx: u64, reply: ReplyBmap);
        Other => fn ioctl(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, flags: IoctlFlags, cmd: u32,
            in_data: &[u8], out_size: u32, reply: ReplyIoctl,
        );
        Other => fn poll(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, ph: PollNotifier,
            events: PollEvents, flags: fuser::PollFlags, reply: ReplyPoll,
        );
        Fallocate => fn fallocate(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, length: u64,
            mode: i32, reply: ReplyEmpty,
        );
        Lseek => fn lseek(
            &self, req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32,
            reply: ReplyLseek,
        );
        Other => fn copy_file_range(
            &self, req: &Request, ino_in: INodeNo, fh_in: FileHandle, offset_in: u64,
            ino_out: INodeNo, fh_out: FileHandle, offset_out: u64, len: u64,
            flags: CopyFileRangeFlags, reply: ReplyWrite,
        );
    }
}
