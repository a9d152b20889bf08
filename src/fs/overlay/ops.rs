//! Namespace changes: creating, linking, removing and renaming names, each
//! written to the upper the way kernel overlayfs writes it (whiteouts for
//! deleted lower names, opaque directories over them, redirects for moved
//! lower directories), with temporary objects in the work directory where
//! a step must appear atomically.

use super::copy_up::Content;
use super::{key, Node, Overlay, State, Upper};
use crate::fs::error::FsError;
use crate::sys::upper::{is_whiteout, Dir, Rename};
use fuser::FileAttr;
use rustix::fs::{OFlags, XattrFlags};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

/// Who asks: new objects belong to the caller.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// fsuid of the calling process.
    pub uid: u32,
    /// fsgid of the calling process.
    pub gid: u32,
}

/// What to create.
#[derive(Debug, Clone)]
pub enum NewObject {
    /// A regular file, opened with `flags`.
    File {
        /// Permission bits.
        mode: u32,
        /// `open(2)` flags.
        flags: i32,
    },
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A fifo, socket or device.
    Node {
        /// Type and permission bits.
        mode: u32,
        /// Device number.
        rdev: u32,
    },
    /// A symbolic link.
    Symlink {
        /// What it points to, stored as given.
        target: OsString,
    },
}

impl NewObject {
    fn is_dir(&self) -> bool {
        matches!(self, NewObject::Dir { .. })
    }

    fn mode(&self) -> u32 {
        match self {
            NewObject::File { mode, .. }
            | NewObject::Dir { mode }
            | NewObject::Node { mode, .. } => *mode & 0o7777,
            NewObject::Symlink { .. } => 0o777,
        }
    }

    /// Makes the object `name` in `dir` (permissions are fixed afterwards).
    fn make(&self, dir: &Dir, name: &OsStr) -> std::io::Result<Option<std::fs::File>> {
        match self {
            NewObject::File { mode, flags } => {
                let flags = OFlags::from_bits_retain(*flags as u32)
                    & (OFlags::ACCMODE | OFlags::APPEND | OFlags::SYNC | OFlags::DSYNC);
                let file =
                    dir.open_file(name, flags | OFlags::CREATE | OFlags::EXCL, mode & 0o777)?;
                Ok(Some(file))
            }
            NewObject::Dir { mode } => dir.mkdir(name, mode & 0o777).map(|()| None),
            NewObject::Node { mode, rdev } => {
                let kind = rustix::fs::FileType::from_raw_mode(*mode);
                dir.mknod(name, kind, mode & 0o777, u64::from(*rdev)).map(|()| None)
            }
            NewObject::Symlink { target } => dir.symlink(target, name).map(|()| None),
        }
    }
}

fn not_found_ok<T>(r: Result<T, FsError>) -> Result<Option<T>, FsError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(FsError::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

fn stat_opt(dir: &Dir, name: &OsStr) -> Result<Option<rustix::fs::Stat>, FsError> {
    match dir.stat(name) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Overlay {
    /// Creates `name` in `parent`; returns its attributes and, for a file,
    /// the open handle.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        what: NewObject,
        caller: Caller,
    ) -> Result<(FileAttr, Option<u64>), FsError> {
        let mut st = self.lock_known(&[parent])?;
        let dir_node = st.facts(parent)?;
        if !dir_node.is_dir {
            return Err(FsError::NotDir);
        }
        self.ensure_upper_dir(&mut st, parent)?;
        let dir = self.upper_dir(&mut st, parent)?;
        let over_whiteout = match stat_opt(&dir, name)? {
            Some(stat) if is_whiteout(&stat) => true,
            Some(_) => return Err(FsError::Exists),
            None if self.lower_child(dir_node.lower, name).is_some() => {
                return Err(FsError::Exists)
            }
            None => false,
        };
        let parent_stat = dir.stat(OsStr::new(""))?;
        // A setgid directory gives its group to new objects (and its setgid
        // bit to new directories), as the kernel does.
        let setgid = parent_stat.st_mode & 0o2000 != 0;
        let gid = if setgid { parent_stat.st_gid } else { caller.gid };
        let mode = what.mode() | if setgid && what.is_dir() { 0o2000 } else { 0 };
        let work = &self.upper.work;
        let (target, target_name) =
            if over_whiteout { (work, self.upper.temp_name()) } else { (&*dir, name.to_owned()) };
        let file = what.make(target, &target_name)?;
        // The object belongs to this process now; what it would get by
        // itself is predictable, so only a difference costs a syscall.
        let (own_uid, own_gid) = self.own_ids;
        let made_gid = if setgid { parent_stat.st_gid } else { own_gid };
        if (caller.uid, gid) != (own_uid, made_gid) {
            target.chown(&target_name, Some(caller.uid), Some(gid))?;
        }
        if !matches!(what, NewObject::Symlink { .. }) && mode & 0o7000 != 0 {
            target.chmod(&target_name, mode)?;
        }
        if over_whiteout {
            if what.is_dir() {
                // The lower name this whiteout hid must stay hidden: the new
                // directory is opaque, swapped in for the whiteout.
                let opaque = self.upper.xattr("opaque");
                work.set_xattr(&target_name, &opaque, b"y", XattrFlags::empty())?;
                work.rename(&target_name, &dir, name, Rename::Exchange)?;
                work.unlink(&target_name)?;
            } else {
                work.rename(&target_name, &dir, name, Rename::Replace)?;
            }
        }
        let stat = match &file {
            Some(file) => rustix::fs::fstat(file)?,
            None => dir.stat(name)?,
        };
        let ino = self.fresh_ino(&mut st, &stat);
        st.by_upper.insert(key(&stat), ino);
        st.nodes.insert(
            ino,
            Node {
                links: vec![(parent, name.to_owned())],
                lower: None,
                upper: Upper::Full,
                is_dir: what.is_dir(),
            },
        );
        let handle =
            file.map(|f| self.handles.add(ino, super::files::Handle::Upper(Arc::new(f)), 0));
        Ok((super::attr_of(&stat, ino), handle))
    }

    /// Hard-links `ino` as `name` in `parent` (a lower file is copied up first).
    pub fn link(&self, ino: u64, parent: u64, name: &OsStr) -> Result<FileAttr, FsError> {
        let mut st = self.lock_known(&[ino, parent])?;
        if st.node(ino)?.is_dir {
            return Err(FsError::NotPermitted);
        }
        if not_found_ok(self.resolve(&mut st, parent, name))?.is_some() {
            return Err(FsError::Exists);
        }
        // Like overlayfs: the data stays below; the other name finds it
        // through a redirect.
        self.copy_up(&mut st, ino, Content::Metadata)?;
        self.redirect_metacopy(&mut st, ino)?;
        self.ensure_upper_dir(&mut st, parent)?;
        let (src_dir, src_name) = self.upper_location(&mut st, ino)?;
        let dir = self.upper_dir(&mut st, parent)?;
        if stat_opt(&dir, name)?.is_some_and(|s| is_whiteout(&s)) {
            let temp = self.upper.temp_name();
            src_dir.link(&src_name, &self.upper.work, &temp)?;
            self.upper.work.rename(&temp, &dir, name, Rename::Replace)?;
        } else {
            src_dir.link(&src_name, &dir, name)?;
        }
        st.add_link(ino, parent, name);
        self.attr_locked(&mut st, ino)
    }

    /// Does a lower name show through at `name` in `parent` (so removing the
    /// name needs a whiteout)?
    fn needs_whiteout(&self, st: &State, parent: u64, name: &OsStr) -> Result<bool, FsError> {
        Ok(self.lower_child(st.node(parent)?.lower, name).is_some())
    }

    /// Removes the non-directory `name` from `parent`.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        let mut st = self.lock_known(&[parent])?;
        let ino = self.resolve(&mut st, parent, name)?;
        if st.node(ino)?.is_dir {
            return Err(FsError::IsDir);
        }
        self.remove_name(&mut st, parent, name, ino)
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        let mut st = self.lock_known(&[parent])?;
        let ino = self.resolve(&mut st, parent, name)?;
        if !st.node(ino)?.is_dir {
            return Err(FsError::NotDir);
        }
        if !self.names(&mut st, ino)?.is_empty() {
            return Err(FsError::NotEmpty);
        }
        self.remove_name(&mut st, parent, name, ino)
    }

    /// Removes `name` (inode `ino`) from `parent`: the upper object goes
    /// (a directory of whiteouts with it), and a whiteout takes its place
    /// where a lower name would show through.
    fn remove_name(
        &self,
        st: &mut State,
        parent: u64,
        name: &OsStr,
        ino: u64,
    ) -> Result<(), FsError> {
        let whiteout = self.needs_whiteout(st, parent, name)?;
        self.ensure_upper_dir(st, parent)?;
        let dir = self.upper_dir(st, parent)?;
        match stat_opt(&dir, name)?.filter(|s| !is_whiteout(s)) {
            Some(stat) => {
                let is_dir = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir();
                if is_dir || whiteout {
                    let temp = self.upper.temp_name();
                    let how = if whiteout { Rename::Whiteout } else { Rename::NoReplace };
                    dir.rename(name, &self.upper.work, &temp, how)?;
                    self.upper.work.remove_all(&temp)?;
                } else {
                    dir.unlink(name)?;
                }
                if is_dir || stat.st_nlink <= 1 {
                    st.by_upper.remove(&key(&stat));
                }
            }
            None if whiteout => dir.whiteout(name)?,
            None => return Err(FsError::NotFound),
        }
        st.drop_link(ino, parent, name);
        if st.node(ino)?.is_dir {
            st.dirs.remove(&ino);
        }
        Ok(())
    }

    /// Prepares `ino` to move to `name` in `parent`: it is copied up whole
    /// (a directory: itself, its lower content stays merged through a
    /// `redirect`; a directory without lower content turns opaque where a
    /// lower name would otherwise merge with it).
    fn prepare_move(
        &self,
        st: &mut State,
        ino: u64,
        parent: u64,
        name: &OsStr,
    ) -> Result<(), FsError> {
        let node = st.facts(ino)?;
        if !node.is_dir {
            self.copy_up(st, ino, Content::Metadata)?;
            return self.redirect_metacopy(st, ino);
        }
        self.ensure_upper_dir(st, ino)?;
        let (dir, own_name) = self.upper_location(st, ino)?;
        match node.lower {
            Some(lower) => {
                let path = self.lower_path(lower).ok_or(FsError::NotFound)?;
                let redirect = self.upper.xattr("redirect");
                dir.set_xattr(&own_name, &redirect, path.as_bytes(), XattrFlags::empty())?;
            }
            None if self.needs_whiteout(st, parent, name)? => {
                let opaque = self.upper.xattr("opaque");
                dir.set_xattr(&own_name, &opaque, b"y", XattrFlags::empty())?;
            }
            None => {}
        }
        Ok(())
    }

    /// Gives metacopy file `ino` a `redirect` to its lower data, so it is
    /// found under any name (after a rename or link). Other files: nothing.
    fn redirect_metacopy(&self, st: &mut State, ino: u64) -> Result<(), FsError> {
        let node = st.facts(ino)?;
        let (Upper::Meta, Some(lower)) = (node.upper, node.lower) else { return Ok(()) };
        let (dir, name) = self.upper_location(st, ino)?;
        let path = self.lower_path(lower).ok_or(FsError::NotFound)?;
        let redirect = self.upper.xattr("redirect");
        dir.set_xattr(&name, &redirect, path.as_bytes(), XattrFlags::empty())?;
        Ok(())
    }

    /// Renames `name` in `parent` to `new_name` in `new_parent`.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: fuser::RenameFlags,
    ) -> Result<(), FsError> {
        use fuser::RenameFlags as F;
        if flags.contains(F::RENAME_WHITEOUT)
            || flags.contains(F::RENAME_EXCHANGE | F::RENAME_NOREPLACE)
        {
            return Err(FsError::Invalid);
        }
        let mut st = self.lock_known(&[parent, new_parent])?;
        let ino = self.resolve(&mut st, parent, name)?;
        let target = not_found_ok(self.resolve(&mut st, new_parent, new_name))?;
        let exchange = flags.contains(F::RENAME_EXCHANGE);
        let is_dir = st.node(ino)?.is_dir;
        match target {
            None if exchange => return Err(FsError::NotFound),
            Some(_) if flags.contains(F::RENAME_NOREPLACE) => return Err(FsError::Exists),
            Some(t) if t == ino => return Ok(()),
            Some(t) if !exchange => {
                let target_is_dir = st.node(t)?.is_dir;
                if is_dir && !target_is_dir {
                    return Err(FsError::NotDir);
                }
                if !is_dir && target_is_dir {
                    return Err(FsError::IsDir);
                }
                if target_is_dir && !self.names(&mut st, t)?.is_empty() {
                    return Err(FsError::NotEmpty);
                }
            }
            _ => {}
        }
        self.prepare_move(&mut st, ino, new_parent, new_name)?;
        if let (Some(t), true) = (target, exchange) {
            self.prepare_move(&mut st, t, parent, name)?;
        }
        self.ensure_upper_dir(&mut st, new_parent)?;
        let dir = self.upper_dir(&mut st, parent)?;
        let new_dir = self.upper_dir(&mut st, new_parent)?;
        if exchange {
            dir.rename(name, &new_dir, new_name, Rename::Exchange)?;
        } else {
            self.move_over(&mut st, &dir, parent, name, &new_dir, new_name, is_dir)?;
        }
        st.drop_link(ino, parent, name);
        if let Some(t) = target {
            st.drop_link(t, new_parent, new_name);
            if exchange {
                st.add_link(t, parent, name);
            } else if st.node(t)?.is_dir {
                st.dirs.remove(&t);
            }
        }
        let node = st.node_mut(ino)?;
        node.links.insert(0, (new_parent, new_name.to_owned()));
        Ok(())
    }

    /// The upper part of a non-exchanging rename: clears what is at the
    /// destination (a whiteout, an empty upper directory, a file), moves the
    /// source there and leaves a whiteout if a lower name shows through.
    #[allow(clippy::too_many_arguments)]
    fn move_over(
        &self,
        st: &mut State,
        dir: &Arc<Dir>,
        parent: u64,
        name: &OsStr,
        new_dir: &Arc<Dir>,
        new_name: &OsStr,
        is_dir: bool,
    ) -> Result<(), FsError> {
        let whiteout = self.needs_whiteout(st, parent, name)?;
        let work = &self.upper.work;
        let existing = stat_opt(new_dir, new_name)?;
        let mut removed_dir = None;
        if let Some(stat) = &existing {
            if rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir() {
                // An empty-looking directory may still hold whiteouts.
                let temp = self.upper.temp_name();
                new_dir.rename(new_name, work, &temp, Rename::NoReplace)?;
                st.by_upper.remove(&key(stat));
                removed_dir = Some(temp);
            } else if !is_whiteout(stat) && stat.st_nlink <= 1 {
                st.by_upper.remove(&key(stat));
            }
        }
        let onto_whiteout = existing.as_ref().is_some_and(is_whiteout);
        if is_dir && onto_whiteout {
            // A directory cannot replace a device node: swap them, which
            // leaves the whiteout at the old name.
            dir.rename(name, new_dir, new_name, Rename::Exchange)?;
            if !whiteout {
                dir.unlink(name)?;
            }
        } else {
            let how = if whiteout { Rename::Whiteout } else { Rename::Replace };
            dir.rename(name, new_dir, new_name, how)?;
        }
        if let Some(temp) = removed_dir {
            work.remove_all(&temp)?;
        }
        Ok(())
    }
}
