//! Copy-up: bringing a lower object into the upper before it changes.
//!
//! Every copy is built under a temporary name in the work directory (same
//! filesystem) and renamed into place when complete, so a crash leaves
//! either the lower object or the whole copy, never half of one. Data is
//! streamed from the layer blob through the span cache, a chunk at a time.

use super::{key, Node, Overlay, State, Upper};
use crate::fs::error::FsError;
use crate::layer::SPAN_SIZE;
use crate::sys::upper::{Dir, Rename, SetTime};
use fuser::FileType;
use rustix::fs::{OFlags, XattrFlags};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

/// Bytes read from the lower per step of a data copy.
const COPY_CHUNK: u32 = 1 << 20;

/// What a file copy-up brings into the upper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Content {
    /// Metadata only (`metacopy`); the data stays in the lower.
    Metadata,
    /// Metadata and data.
    Data,
    /// Metadata and an empty file (an `O_TRUNC` open or truncate to 0).
    Empty,
}

/// Ownership, permissions, times and xattrs to give a copy.
pub(super) struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Meta {
    /// The metadata of `attr`, with `xattrs`.
    fn new(attr: &fuser::FileAttr, xattrs: Vec<(OsString, Vec<u8>)>) -> Self {
        Meta {
            mode: u32::from(attr.perm),
            uid: attr.uid,
            gid: attr.gid,
            atime: attr.atime,
            mtime: attr.mtime,
            xattrs,
        }
    }

    /// Applies to `name` in `dir`: owner first (a `chown` clears setuid),
    /// then mode, xattrs and times (last: the others change ctime only).
    pub fn apply(&self, dir: &Dir, name: &OsStr, kind: FileType) -> std::io::Result<()> {
        dir.chown(name, Some(self.uid), Some(self.gid))?;
        if kind != FileType::Symlink {
            dir.chmod(name, self.mode)?;
        }
        for (key, value) in &self.xattrs {
            dir.set_xattr(name, key, value, XattrFlags::empty())?;
        }
        dir.set_times(name, SetTime::from(self.atime), SetTime::from(self.mtime))
    }
}

impl Overlay {
    /// Metadata of the lower inode `lower`.
    fn lower_meta(&self, lower: u64) -> Result<(Meta, fuser::FileAttr), FsError> {
        let attr = self.lower.attr(lower)?;
        let names = self.lower.xattr_names(lower)?;
        let mut xattrs = Vec::new();
        for key in names.split(|b| *b == 0).filter(|k| !k.is_empty()) {
            let key = OsStr::new(std::str::from_utf8(key).map_err(|_| FsError::Invalid)?);
            xattrs.push((key.to_owned(), self.lower.xattr(lower, key)?.to_vec()));
        }
        Ok((Meta::new(&attr, xattrs), attr))
    }

    /// Metadata of the upper object `name` in `dir`, without overlay xattrs.
    fn upper_meta(&self, dir: &Dir, name: &OsStr) -> Result<Meta, FsError> {
        let stat = dir.stat(name)?;
        let attr = super::attr_of(&stat, 0);
        let mut xattrs = Vec::new();
        for key in dir.list_xattr(name)? {
            if !self.upper.is_private(&key) {
                if let Some(value) = dir.get_xattr(name, &key)? {
                    xattrs.push((key, value));
                }
            }
        }
        Ok(Meta::new(&attr, xattrs))
    }

    /// Makes directory `ino` exist in the upper (its ancestors first). The
    /// lower directory stays merged under it; its children stay below.
    pub(super) fn ensure_upper_dir(&self, st: &mut State, ino: u64) -> Result<(), FsError> {
        let node = st.node(ino)?.clone();
        if node.upper == Upper::Full {
            return Ok(());
        }
        if !node.is_dir {
            return Err(FsError::NotDir);
        }
        let (parent, name) = location(&node)?;
        self.ensure_upper_dir(st, parent)?;
        let (meta, _) = self.lower_meta(node.lower.ok_or(FsError::NotFound)?)?;
        let parent_dir = self.upper_dir(st, parent)?;
        let work = &self.upper.work;
        let temp = self.upper.temp_name();
        work.mkdir(&temp, 0o700)?;
        meta.apply(work, &temp, FileType::Directory)?;
        move_in_unseen(work, &temp, &parent_dir, &name, Rename::NoReplace)?;
        self.settle(st, ino, &parent_dir, &name, Upper::Full)
    }

    /// Makes non-directory `ino` exist in the upper with at least `content`.
    /// Anything but a regular file is copied whole (it has no data to defer).
    pub(super) fn copy_up(
        &self,
        st: &mut State,
        ino: u64,
        content: Content,
    ) -> Result<(), FsError> {
        let node = st.node(ino)?.clone();
        if node.is_dir {
            return self.ensure_upper_dir(st, ino);
        }
        match (node.upper, content) {
            (Upper::Full, _) | (Upper::Meta, Content::Metadata) => return Ok(()),
            (Upper::Meta, _) => return self.fill_metacopy(st, ino, content),
            _ => {}
        }
        let (parent, name) = location(&node)?;
        self.ensure_upper_dir(st, parent)?;
        let parent_dir = self.upper_dir(st, parent)?;
        let lower = node.lower.ok_or(FsError::NotFound)?;
        let (lower_meta, attr) = self.lower_meta(lower)?;
        // A metacopy file already holds the current metadata.
        let meta = match node.upper {
            Upper::Meta => self.upper_meta(&parent_dir, &name)?,
            _ => lower_meta,
        };
        let work = &self.upper.work;
        let temp = self.upper.temp_name();
        let mut upper = Upper::Full;
        match attr.kind {
            FileType::RegularFile => {
                let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
                let mut file = work.open_file(&temp, flags, 0o600)?;
                let origin = self.upper.xattr(super::ORIGIN);
                work.set_xattr(&temp, &origin, lower.to_string().as_bytes(), XattrFlags::empty())?;
                match content {
                    Content::Metadata => {
                        file.set_len(attr.size)?;
                        let key = self.upper.xattr("metacopy");
                        work.set_xattr(&temp, &key, b"", XattrFlags::empty())?;
                        upper = Upper::Meta;
                    }
                    Content::Empty => {}
                    Content::Data => {
                        self.copy_lower_data(lower, attr.size, &mut file)?;
                        file.sync_data()?;
                    }
                }
            }
            FileType::Symlink => {
                let target = self.lower.readlink(lower)?;
                work.symlink(OsStr::from_bytes(target), &temp)?;
            }
            kind => {
                let file_type = match kind {
                    FileType::NamedPipe => rustix::fs::FileType::Fifo,
                    FileType::CharDevice => rustix::fs::FileType::CharacterDevice,
                    FileType::BlockDevice => rustix::fs::FileType::BlockDevice,
                    FileType::Socket => rustix::fs::FileType::Socket,
                    _ => return Err(FsError::Invalid),
                };
                work.mknod(&temp, file_type, 0o600, u64::from(attr.rdev))?;
            }
        }
        meta.apply(work, &temp, attr.kind)?;
        move_in_unseen(work, &temp, &parent_dir, &name, Rename::Replace)?;
        if upper == Upper::Full {
            self.data_copies.fetch_add(1, Ordering::Release);
        }
        self.settle(st, ino, &parent_dir, &name, upper)
    }

    /// Brings the data of metacopy file `ino` into its upper file, in place
    /// (other names may link to it), then drops the `metacopy` mark. A crash
    /// before the mark goes leaves a file still read from the lower. Like
    /// overlayfs, this counts as a write: the file's mtime moves.
    fn fill_metacopy(&self, st: &mut State, ino: u64, content: Content) -> Result<(), FsError> {
        let lower = st.node(ino)?.lower.ok_or(FsError::NotFound)?;
        let (dir, name) = self.upper_location(st, ino)?;
        let mut file = dir.open_file(&name, OFlags::WRONLY, 0)?;
        if content == Content::Data {
            let size = self.lower.attr(lower)?.size;
            self.copy_lower_data(lower, size, &mut file)?;
        } else {
            file.set_len(0)?;
        }
        file.sync_data()?;
        for mark in ["metacopy", "redirect"] {
            match dir.remove_xattr(&name, &self.upper.xattr(mark)) {
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                r => r?,
            }
        }
        st.node_mut(ino)?.upper = Upper::Full;
        self.data_copies.fetch_add(1, Ordering::Release);
        // Its mtime moved while the kernel was asking for something else.
        self.attributes_changed(ino);
        Ok(())
    }

    /// Streams `size` bytes of lower file `lower` into `file`, a window of
    /// spans decompressed in parallel ahead of the copy.
    fn copy_lower_data(
        &self,
        lower: u64,
        size: u64,
        file: &mut std::fs::File,
    ) -> Result<(), FsError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let window = (threads * SPAN_SIZE) as u64;
        let mut offset = 0;
        while offset < size {
            if offset % window == 0 {
                self.lower.prefetch(lower, offset, window, threads)?;
            }
            let chunk = self.lower.read(lower, offset, COPY_CHUNK)?;
            if chunk.is_empty() {
                break;
            }
            file.write_all_at(&chunk, offset)?;
            offset += chunk.len() as u64;
        }
        file.flush()?;
        Ok(())
    }

    /// Records that `ino` is now `name` in `dir` of the upper, as `upper`.
    fn settle(
        &self,
        st: &mut State,
        ino: u64,
        dir: &Dir,
        name: &OsStr,
        upper: Upper,
    ) -> Result<(), FsError> {
        let stat = dir.stat(name)?;
        st.by_upper.insert(key(&stat), ino);
        let node = st.node_mut(ino)?;
        node.upper = upper;
        Ok(())
    }
}

/// Renames a finished copy from the work dir into `dir`, then restores
/// `dir`'s times: a copy-up changes nothing visible, so the parent's mtime
/// must not move (overlayfs does the same).
fn move_in_unseen(
    work: &Dir,
    temp: &OsStr,
    dir: &Dir,
    name: &OsStr,
    how: Rename,
) -> std::io::Result<()> {
    let before = dir.stat(OsStr::new(""))?;
    work.rename(temp, dir, name, how)?;
    let time = |sec, nsec| SetTime::At(rustix::fs::Timespec { tv_sec: sec, tv_nsec: nsec });
    let atime = time(before.st_atime, before.st_atime_nsec as _);
    let mtime = time(before.st_mtime, before.st_mtime_nsec as _);
    dir.set_times(OsStr::new(""), atime, mtime)
}

fn location(node: &Node) -> Result<(u64, OsString), FsError> {
    let (parent, name) = node.location()?;
    Ok((parent, name.to_owned()))
}
