//! Open files and attribute changes: opening for writing copies a file up
//! (data and all, or nothing but metadata with `O_TRUNC`); metadata changes
//! copy up metadata only; data moves through handles, outside the
//! namespace lock.
//!
//! After a takeover (see the module doc of [`super`]) the kernel sends
//! handle numbers the previous process issued. Such a handle is opened again
//! by inode on first use and kept under the kernel's number
//! ([`Overlay::handle`]); closing or flushing one this process never knew is
//! a no-op.

use super::copy_up::Content;
use super::{attr_of, Overlay, State, Upper};
use crate::fs::error::FsError;
use crate::fs::ImageFs;
use crate::sys::upper::SetTime;
use fuser::FileAttr;
use rustix::fs::{OFlags, XattrFlags};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// What an open file handle reads from and writes to.
#[derive(Debug, Clone)]
pub enum Handle {
    /// The upper file, opened with the caller's access mode.
    Upper(Arc<File>),
    /// A lower (or metacopy) file opened read-only: reads come from this
    /// lower inode.
    Lower(u64),
}

/// Open handles by number, with the inode each belongs to and the count
/// of data copy-ups when it was last checked.
pub(super) struct Handles {
    open: Mutex<HashMap<u64, (u64, Handle, u64)>>,
    /// The last number handed out. It starts at the wall clock in
    /// nanoseconds when the overlay is made, not at 0: a process taking
    /// over a FUSE connection must never issue a number the kernel still
    /// holds from its predecessor, which counted up by one per open from its
    /// own start time. It cannot have opened more files than nanoseconds
    /// passed between the two starts (an open is a round trip through the
    /// kernel: microseconds), so the two ranges never meet. Assumes the wall
    /// clock does not step back across a takeover by more than the time
    /// between the two starts. Rejected: counting from 0 in each process
    /// (collides at once), a random start (collisions only unlikely, and
    /// numbers that say nothing in a log).
    next: AtomicU64,
}

impl Default for Handles {
    fn default() -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let start = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX / 2);
        Handles { open: Mutex::default(), next: AtomicU64::new(start) }
    }
}

impl Handles {
    /// Registers `handle` of inode `ino`, opened when `copies` data
    /// copy-ups had happened.
    pub fn add(&self, ino: u64, handle: Handle, copies: u64) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(fh, (ino, handle, copies));
        fh
    }

    /// Registers `handle` of inode `ino` under `fh`, a number the kernel
    /// got from a previous process, unless another thread just did: the
    /// registered entry is returned either way.
    fn adopt(&self, fh: u64, ino: u64, handle: Handle, copies: u64) -> (u64, Handle, u64) {
        self.lock().entry(fh).or_insert((ino, handle, copies)).clone()
    }

    /// Is `fh` a handle this process knows?
    fn knows(&self, fh: u64) -> bool {
        self.lock().contains_key(&fh)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, Handle, u64)>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, fh: u64) -> Result<Handle, FsError> {
        self.entry(fh).map(|(_, h, _)| h)
    }

    fn entry(&self, fh: u64) -> Result<(u64, Handle, u64), FsError> {
        self.lock().get(&fh).cloned().ok_or(FsError::Invalid)
    }

    fn replace(&self, fh: u64, handle: Handle, copies: u64) {
        if let Some(entry) = self.lock().get_mut(&fh) {
            entry.1 = handle;
            entry.2 = copies;
        }
    }

    fn remove(&self, fh: u64) {
        self.lock().remove(&fh);
    }

    /// `stat` through an open handle of `ino` (`fh` first), for a file
    /// that has no name left.
    pub fn attr_of_open(
        &self,
        ino: u64,
        fh: Option<u64>,
        lower: &ImageFs,
    ) -> Result<FileAttr, FsError> {
        let handle = {
            let open = self.lock();
            let by_fh = fh.and_then(|fh| open.get(&fh)).filter(|(i, _, _)| *i == ino);
            // An upper handle knows the file as it is now; a lower one only
            // as it was before the copy-up.
            let upper =
                || open.values().find(|(i, h, _)| *i == ino && matches!(h, Handle::Upper(_)));
            let any = || open.values().find(|(i, _, _)| *i == ino);
            by_fh.or_else(upper).or_else(any).map(|(_, h, _)| h.clone())
        };
        let mut attr = match handle.ok_or(FsError::NotFound)? {
            Handle::Upper(file) => attr_of(&rustix::fs::fstat(&*file)?, ino),
            Handle::Lower(lower_ino) => lower.attr(lower_ino)?,
        };
        attr.ino = fuser::INodeNo(ino);
        attr.nlink = 0;
        Ok(attr)
    }
}

/// Changes `setattr` asks for.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
}

impl Overlay {
    /// Opens `ino` with `flags`; returns the handle number.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64, FsError> {
        let flags = OFlags::from_bits_retain(flags as u32);
        let writes = flags.intersects(OFlags::WRONLY | OFlags::RDWR);
        let truncates = flags.contains(OFlags::TRUNC);
        let mut st = self.lock_known(&[ino])?;
        let node = st.facts(ino)?;
        if node.is_dir {
            return Err(FsError::IsDir);
        }
        if writes || truncates {
            let content = if truncates { Content::Empty } else { Content::Data };
            self.copy_up(&mut st, ino, content)?;
        } else if node.upper != Upper::Full {
            let lower = node.lower.ok_or(FsError::NotFound)?;
            let copies = self.data_copies.load(Ordering::Acquire);
            return Ok(self.handles.add(ino, Handle::Lower(lower), copies));
        }
        let (dir, name) = self.upper_location(&mut st, ino)?;
        drop(st);
        let keep = OFlags::ACCMODE | OFlags::APPEND | OFlags::TRUNC | OFlags::SYNC | OFlags::DSYNC;
        let file = dir.open_file(&name, flags & keep, 0)?;
        Ok(self.handles.add(ino, Handle::Upper(Arc::new(file)), 0))
    }

    /// The upper file behind handle `fh`, if it has one.
    pub fn upper_file(&self, fh: u64) -> Option<Arc<File>> {
        match self.handles.get(fh) {
            Ok(Handle::Upper(file)) => Some(file),
            _ => None,
        }
    }

    /// Closes handle `fh` (one this process never issued: nothing to do).
    pub fn release(&self, fh: u64) {
        self.handles.remove(fh);
    }

    /// Handle `fh` of inode `ino`: (inode, handle, data copy-ups when it was
    /// last checked). A number this process never issued is one the kernel
    /// got from the previous process serving the connection: `ino` is
    /// opened again, the upper file read-write when it is in the upper (the
    /// kernel checked the caller's access when it opened it), else its
    /// lower data read-only, and kept under that number until `release`.
    fn handle(&self, ino: u64, fh: u64) -> Result<(u64, Handle, u64), FsError> {
        if let Ok(entry) = self.handles.entry(fh) {
            return Ok(entry);
        }
        let mut st = self.lock_known(&[ino])?;
        self.reopen(&mut st, ino, fh)
    }

    /// [`handle`](Self::handle) under the namespace lock.
    fn handle_locked(&self, st: &mut State, ino: u64, fh: u64) -> Result<Handle, FsError> {
        match self.handles.entry(fh) {
            Ok((_, handle, _)) => Ok(handle),
            Err(_) => Ok(self.reopen(st, ino, fh)?.1),
        }
    }

    fn reopen(&self, st: &mut State, ino: u64, fh: u64) -> Result<(u64, Handle, u64), FsError> {
        let node = st.facts(ino)?;
        if node.is_dir {
            return Err(FsError::IsDir);
        }
        let copies = self.data_copies.load(Ordering::Acquire);
        let handle = match node.upper {
            Upper::Full => {
                let (dir, name) = self.upper_location(st, ino)?;
                // Only regular files are opened through FUSE; opening
                // anything else (a fifo, a device) could block or act.
                if !rustix::fs::FileType::from_raw_mode(dir.stat(&name)?.st_mode).is_file() {
                    return Err(FsError::Invalid);
                }
                let file = match dir.open_file(&name, OFlags::RDWR, 0) {
                    // Not writable here (immutable, executing, read-only
                    // filesystem): reads still work.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EACCES | libc::EPERM | libc::ETXTBSY | libc::EROFS)
                        ) =>
                    {
                        dir.open_file(&name, OFlags::RDONLY, 0)?
                    }
                    other => other?,
                };
                Handle::Upper(Arc::new(file))
            }
            Upper::Meta | Upper::Absent => Handle::Lower(node.lower.ok_or(FsError::NotFound)?),
        };
        tracing::debug!(ino, fh, "reopened a handle of the previous process");
        Ok(self.handles.adopt(fh, ino, handle, copies))
    }

    /// The handle `fh` of `ino` as it reads now: a lower handle whose file
    /// has since been copied up reads the upper copy (as overlayfs does),
    /// and keeps doing so. Only checked when some data copy-up happened
    /// since.
    fn reading_handle(&self, ino: u64, fh: u64) -> Result<Handle, FsError> {
        let (ino, handle, copies) = self.handle(ino, fh)?;
        let Handle::Lower(_) = handle else { return Ok(handle) };
        let now = self.data_copies.load(Ordering::Acquire);
        if copies == now {
            return Ok(handle);
        }
        let mut st = self.lock();
        if st.node(ino).is_ok_and(|n| n.upper == Upper::Full && !n.links.is_empty()) {
            let (dir, name) = self.upper_location(&mut st, ino)?;
            let upper = Handle::Upper(Arc::new(dir.open_file(&name, OFlags::RDONLY, 0)?));
            self.handles.replace(fh, upper.clone(), now);
            return Ok(upper);
        }
        self.handles.replace(fh, handle.clone(), now);
        Ok(handle)
    }

    /// Can this read be answered without decompressing lower data? A
    /// handle still to be opened again (after a takeover) may need to:
    /// no.
    pub fn read_is_ready(&self, fh: u64, offset: u64, size: u32) -> bool {
        match self.handles.get(fh) {
            Ok(Handle::Lower(lower)) => self.lower.is_ready(lower, offset, size),
            Ok(Handle::Upper(_)) => true,
            Err(_) => false,
        }
    }

    /// Reads up to `size` bytes at `offset` through handle `fh` of `ino`.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        match self.reading_handle(ino, fh)? {
            Handle::Lower(lower) => self.lower.read(lower, offset, size),
            Handle::Upper(file) => {
                let mut buf = vec![0; size as usize];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read_at(&mut buf[filled..], offset + filled as u64)? {
                        0 => break,
                        n => filled += n,
                    }
                }
                buf.truncate(filled);
                Ok(buf)
            }
        }
    }

    /// Writes `data` at `offset` through handle `fh` of `ino`.
    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        match self.handle(ino, fh)?.1 {
            Handle::Upper(file) => {
                file.write_all_at(data, offset)?;
                Ok(data.len() as u32)
            }
            Handle::Lower(_) => Err(FsError::Io(rustix::io::Errno::BADF.into())),
        }
    }

    /// Flushes handle `fh` of `ino` to disk.
    pub fn fsync(&self, ino: u64, fh: u64, data_only: bool) -> Result<(), FsError> {
        match self.handle(ino, fh)?.1 {
            Handle::Upper(file) if data_only => file.sync_data()?,
            Handle::Upper(file) => file.sync_all()?,
            Handle::Lower(_) => {}
        }
        Ok(())
    }

    /// Flushes directory `ino`'s upper copy to disk, if it has one.
    pub fn fsync_dir(&self, ino: u64) -> Result<(), FsError> {
        let mut st = self.lock_known(&[ino])?;
        if st.node(ino)?.upper == Upper::Full {
            self.upper_dir(&mut st, ino)?.fsync()?;
        }
        Ok(())
    }

    /// `fallocate` through handle `fh` of `ino`.
    pub fn fallocate(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        match self.handle(ino, fh)?.1 {
            Handle::Upper(file) => {
                let flags = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
                Ok(rustix::fs::fallocate(&*file, flags, offset, len)?)
            }
            Handle::Lower(_) => Err(FsError::Io(rustix::io::Errno::BADF.into())),
        }
    }

    /// Changes attributes of `ino`. Only a size change copies data up.
    pub fn set_attr(&self, ino: u64, fh: Option<u64>, set: SetAttr) -> Result<FileAttr, FsError> {
        let mut st = match self.lock_known(&[ino]) {
            Ok(st) => st,
            // Gone, but this process may have it open.
            Err(e)
                if matches!(e, FsError::Stale) && fh.is_some_and(|fh| self.handles.knows(fh)) =>
            {
                return self.set_attr_unlinked(ino, fh, set)
            }
            Err(e) => return Err(e),
        };
        if st.node(ino)?.links.is_empty() {
            drop(st);
            return self.set_attr_unlinked(ino, fh, set);
        }
        let content = match set.size {
            Some(0) => Content::Empty,
            Some(_) => Content::Data,
            None => Content::Metadata,
        };
        self.copy_up(&mut st, ino, content)?;
        let (dir, name) = self.upper_location(&mut st, ino)?;
        if set.uid.is_some() || set.gid.is_some() {
            dir.chown(&name, set.uid, set.gid)?;
        }
        if let Some(mode) = set.mode {
            dir.chmod(&name, mode)?;
        }
        if let Some(size) = set.size {
            let handle = fh.map(|fh| self.handle_locked(&mut st, ino, fh)).transpose()?;
            match handle {
                Some(Handle::Upper(file)) => file.set_len(size)?,
                _ => dir.open_file(&name, OFlags::WRONLY, 0)?.set_len(size)?,
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let (atime, mtime) =
                (set.atime.unwrap_or(SetTime::Omit), set.mtime.unwrap_or(SetTime::Omit));
            dir.set_times(&name, atime, mtime)?;
        }
        self.attr_locked(&mut st, ino)
    }

    /// `setattr` of an open file whose names are all gone: through its handle.
    fn set_attr_unlinked(
        &self,
        ino: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> Result<FileAttr, FsError> {
        let Some(Handle::Upper(file)) = fh.map(|fh| self.handles.get(fh)).transpose()? else {
            return Err(FsError::NotFound);
        };
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.map(rustix::fs::Uid::from_raw);
            let gid = set.gid.map(rustix::fs::Gid::from_raw);
            rustix::fs::fchown(&*file, uid, gid)?;
        }
        if let Some(mode) = set.mode {
            rustix::fs::fchmod(&*file, rustix::fs::Mode::from_raw_mode(mode))?;
        }
        if let Some(size) = set.size {
            file.set_len(size)?;
        }
        self.handles.attr_of_open(ino, fh, &self.lower)
    }

    /// The value of xattr `key` of `ino`.
    pub fn xattr(&self, ino: u64, key: &OsStr) -> Result<Vec<u8>, FsError> {
        if self.upper.is_private(key) {
            return Err(FsError::NoAttr);
        }
        let mut st = self.lock_known(&[ino])?;
        let node = st.facts(ino)?;
        if node.upper == Upper::Absent {
            return Ok(self.lower.xattr(node.lower.ok_or(FsError::NotFound)?, key)?.to_vec());
        }
        let (dir, name) = self.upper_location(&mut st, ino)?;
        dir.get_xattr(&name, key)?.ok_or(FsError::NoAttr)
    }

    /// The names of `ino`'s xattrs, NUL-separated.
    pub fn xattr_names(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let mut st = self.lock_known(&[ino])?;
        let node = st.facts(ino)?;
        if node.upper == Upper::Absent {
            return self.lower.xattr_names(node.lower.ok_or(FsError::NotFound)?);
        }
        let (dir, name) = self.upper_location(&mut st, ino)?;
        let mut out = Vec::new();
        for key in dir.list_xattr(&name)? {
            if !self.upper.is_private(&key) {
                out.extend_from_slice(key.as_encoded_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }

    /// Sets (`Some`) or removes (`None`) xattr `key` of `ino`.
    pub fn set_xattr(
        &self,
        ino: u64,
        key: &OsStr,
        value: Option<(&[u8], i32)>,
    ) -> Result<(), FsError> {
        if self.upper.is_private(key) {
            return Err(FsError::NotPermitted);
        }
        let mut st = self.lock_known(&[ino])?;
        let node = st.facts(ino)?;
        if let (None, Upper::Absent, Some(lower)) = (value, node.upper, node.lower) {
            // Removing what is not there must not copy anything up.
            self.lower.xattr(lower, key)?;
        }
        self.copy_up(&mut st, ino, Content::Metadata)?;
        let (dir, name): (_, OsString) = self.upper_location(&mut st, ino)?;
        match value {
            Some((value, flags)) => {
                let flags = XattrFlags::from_bits_retain(flags as u32);
                dir.set_xattr(&name, key, value, flags)?;
            }
            None => match dir.remove_xattr(&name, key) {
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Err(FsError::NoAttr),
                r => r?,
            },
        }
        Ok(())
    }
}
