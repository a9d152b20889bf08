//! The FUSE adapter of a writable mount: each kernel request calls one
//! [`Overlay`] method and replies with its value or its errno.
//!
//! Every change reaches the upper through this mount, so the kernel's
//! caches stay right by themselves (it updates or drops what a reply
//! changes); attributes and entries keep long TTLs. Directories are never
//! opened (`ENOSYS` on `opendir`): the kernel then caches listings and
//! revalidates them when a directory changes.
//!
//! Nothing here is per process beyond the overlay's tables, so a process
//! that takes over the connection from a previous one serves the kernel's
//! old inode and handle numbers through the overlay, which finds them again
//! (see [`Overlay`]): directories never had handles (the kernel sends
//! `fh` 0 and lists by inode, and remembers `ENOSYS` for `opendir` per
//! connection), file handles are opened again by inode on first use, and
//! closing one this process never issued is a no-op.

use super::overlay::{Caller, NewObject, Overlay, SetAttr};
use super::passthrough::Passthrough;
use super::workers::Workers;
use crate::sys::upper::SetTime;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::from_secs(24 * 3600);

/// Serves an [`Overlay`] over FUSE.
///
/// One thread serves the FUSE requests (handing a request from thread to
/// thread costs more than most requests: 10k small-file creates take 0.8 s
/// on one thread, 1.5 s on four). Reads that must decompress a lower span
/// first go to `workers` with their reply, so they never hold up the rest.
pub struct WritableFs {
    overlay: Arc<Overlay>,
    passthrough: Passthrough,
    workers: Workers,
}

impl WritableFs {
    /// Serves `overlay`, with `io_threads` threads for slow reads.
    pub fn new(overlay: Arc<Overlay>, io_threads: usize) -> Self {
        Self { overlay, passthrough: Passthrough::default(), workers: Workers::new(io_threads) }
    }
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::from(t),
    })
}

fn reply_entry(result: Result<FileAttr, super::FsError>, reply: ReplyEntry) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e.errno()),
    }
}

fn reply_empty(result: Result<(), super::FsError>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e.errno()),
    }
}

fn reply_xattr(value: Result<Vec<u8>, super::FsError>, size: u32, reply: ReplyXattr) {
    match value {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(e.errno()),
    }
}

impl WritableFs {
    fn make(&self, req: &Request, parent: INodeNo, name: &OsStr, what: NewObject) -> ReplyResult {
        self.overlay.create(parent.0, name, what, caller(req))
    }
}

type ReplyResult = Result<(FileAttr, Option<u64>), super::FsError>;

impl fuser::Filesystem for WritableFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        use fuser::InitFlags as F;
        // `O_TRUNC` arrives with `open`, so a truncating open copies up no
        // data at all.
        super::fuse::request_capabilities(config, &[F::FUSE_ATOMIC_O_TRUNC]);
        // Passthrough to upper files; depth 1: the upper is a plain filesystem.
        if config.add_capabilities(F::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.enable();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(self.overlay.lookup(parent.0, name), reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.overlay.attr(ino.0, fh.map(|f| f.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        match self.overlay.set_attr(ino.0, fh.map(|f| f.0), set) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.overlay.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let made = self.make(req, parent, name, NewObject::Node { mode, rdev });
        reply_entry(made.map(|(attr, _)| attr), reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.make(req, parent, name, NewObject::Dir { mode });
        reply_entry(made.map(|(attr, _)| attr), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.overlay.unlink(parent.0, name), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.overlay.rmdir(parent.0, name), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let what = NewObject::Symlink { target: target.as_os_str().to_owned() };
        reply_entry(self.make(req, parent, link_name, what).map(|(attr, _)| attr), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.overlay.rename(parent.0, name, newparent.0, newname, flags), reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(self.overlay.link(ino.0, newparent.0, newname), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fh = match self.overlay.open(ino.0, flags.0) {
            Ok(fh) => fh,
            Err(e) => return reply.error(e.errno()),
        };
        let file = self.overlay.upper_file(fh);
        match self.passthrough.open(ino.0, fh, file.as_deref(), |f| reply.open_backing(f)) {
            Some(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
            None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let answer = move |overlay: &Overlay, reply: ReplyData| match overlay
            .read(ino.0, fh.0, offset, size)
        {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e.errno()),
        };
        if self.overlay.read_is_ready(fh.0, offset, size) {
            return answer(&self.overlay, reply);
        }
        let overlay = self.overlay.clone();
        self.workers.run(move || answer(&overlay, reply));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.overlay.write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes go straight to the upper file; nothing is buffered here.
        // `ENOSYS` once tells the kernel to stop sending flushes at all (for
        // the connection: a process taking it over gets none either).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Either may never have seen `fh` (opened by a previous process
        // serving this connection): then both do nothing.
        self.passthrough.release(fh.0);
        self.overlay.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.overlay.fsync(ino.0, fh.0, datasync), reply);
    }

    // Directories have no handles: `readdir` lists by inode whatever `fh`
    // says (0), so a listing survives a takeover, and `releasedir` (never
    // sent after this `ENOSYS`) keeps fuser's default `ok`.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.overlay.dir_entries(ino.0, offset) {
            Ok(entries) => {
                for (next, name, attr) in entries {
                    if reply.add(attr.ino, next, attr.kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.overlay.dir_entries(ino.0, offset) {
            Ok(entries) => {
                for (next, name, attr) in entries {
                    if reply.add(attr.ino, next, name, &TTL, &attr, Generation(0)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e.errno()),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.overlay.fsync_dir(ino.0), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.overlay.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.overlay.set_xattr(ino.0, name, Some((value, flags))), reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(self.overlay.xattr(ino.0, name), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(self.overlay.xattr_names(ino.0), size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.overlay.set_xattr(ino.0, name, None), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (`default_permissions`).
        reply_empty(self.overlay.attr(ino.0, None).map(|_| ()), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (attr, fh) = match self.make(req, parent, name, NewObject::File { mode, flags }) {
            Ok((attr, Some(fh))) => (attr, fh),
            Ok((_, None)) => return reply.error(Errno::EIO),
            Err(e) => return reply.error(e.errno()),
        };
        let file = self.overlay.upper_file(fh);
        let (ino, generation) = (attr.ino.0, Generation(0));
        match self.passthrough.open(ino, fh, file.as_deref(), |f| reply.open_backing(f)) {
            Some(id) => reply.created_passthrough(
                &TTL,
                &attr,
                generation,
                FileHandle(fh),
                FopenFlags::empty(),
                &id,
            ),
            None => reply.created(&TTL, &attr, generation, FileHandle(fh), FopenFlags::empty()),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.overlay.fallocate(ino.0, fh.0, offset, length, mode), reply);
    }
}
