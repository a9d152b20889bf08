//! The FUSE adapter: each kernel request calls one [`ImageFs`] method that
//! returns `Result<_, FsError>` and replies with its value or its errno.
//! The tree is immutable, so attributes and entries get long TTLs and file
//! pages stay in the kernel's cache across opens (`FOPEN_KEEP_CACHE`).
//!
//! Nothing here belongs to one process: inode numbers come from the tree,
//! which every process builds the same from the same layers, and there are
//! no handles (`open`/`opendir` answer `ENOSYS`, so the kernel sends `fh`
//! 0). A process taking over the connection from a previous one therefore
//! serves the kernel's old numbers as they are.

use super::error::FsError;
use super::record::Recorder;
use super::union::{Node, UnionTree};
use crate::layer::{Entry, EntryKind, LayerReader};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Generation, INodeNo, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and lookups: the tree never changes.
const TTL: Duration = Duration::from_secs(24 * 3600);
const BLOCK: u32 = 4096;

/// A mounted image: the union tree and a reader per layer.
pub struct ImageFs {
    tree: UnionTree,
    /// Parallel to the tree's layer stack.
    readers: Vec<LayerReader>,
    /// Answer xattr requests. False when no entry of any layer has an
    /// xattr: they are answered `ENOSYS`, after which the kernel stops
    /// sending them (`ls -l` asks for two xattrs of every file it lists) and
    /// tells callers `EOPNOTSUPP` (see [`ImageFs::answer_xattrs`]).
    serve_xattrs: bool,
    /// Notes which files are read (`--record`).
    recorder: Option<Arc<Recorder>>,
}

fn time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

impl ImageFs {
    /// Serves `tree` with one reader per layer of its stack (same order).
    pub fn new(tree: UnionTree, readers: Vec<LayerReader>) -> Self {
        let serve_xattrs =
            tree.layers().iter().any(|l| l.entries.iter().any(|e| !e.xattrs.is_empty()));
        Self { tree, readers, serve_xattrs, recorder: None }
    }

    /// Answers every xattr request as a kernel filesystem does (`ENODATA`
    /// for a missing one) even when no layer has xattrs: for tools that
    /// treat `EOPNOTSUPP` as fatal, such as containerd's differ.
    pub fn answer_xattrs(&mut self) {
        self.serve_xattrs = true;
    }

    /// Records every file whose data is read into `recorder`.
    pub fn record_into(&mut self, recorder: Arc<Recorder>) {
        self.recorder = Some(recorder);
    }

    /// The union tree.
    pub fn tree(&self) -> &UnionTree {
        &self.tree
    }

    /// The node of `ino`. The tree is complete and numbered the same way
    /// by every process (see [`UnionTree`]), so a number it lacks was never
    /// one of this image's, not even in a process that served the
    /// connection before this one: `ESTALE`.
    fn node(&self, ino: u64) -> Result<&Node, FsError> {
        self.tree.node(ino).ok_or(FsError::Stale)
    }

    /// `stat` of inode `ino`.
    pub fn attr(&self, ino: u64) -> Result<FileAttr, FsError> {
        let node = self.node(ino)?;
        let (kind, size, rdev) = match self.tree.entry(node).map(|e| &e.kind) {
            None | Some(EntryKind::Dir) => (FileType::Directory, u64::from(BLOCK), 0),
            Some(EntryKind::File { size, .. }) => (FileType::RegularFile, *size, 0),
            Some(EntryKind::Symlink { target }) => (FileType::Symlink, target.len() as u64, 0),
            Some(EntryKind::CharDevice { rdev }) => (FileType::CharDevice, 0, *rdev),
            Some(EntryKind::BlockDevice { rdev }) => (FileType::BlockDevice, 0, *rdev),
            Some(EntryKind::Fifo) => (FileType::NamedPipe, 0, 0),
            // Hardlinks are resolved and markers hidden when the tree is built.
            Some(EntryKind::Hardlink { .. } | EntryKind::Whiteout | EntryKind::Opaque) => {
                return Err(FsError::NotFound)
            }
        };
        let (perm, uid, gid, mtime) = match self.tree.entry(node) {
            Some(e) => (e.mode, e.uid, e.gid, e.mtime),
            None => (0o755, 0, 0, 0),
        };
        let t = time(mtime);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: perm as u16,
            nlink: node.nlink,
            uid,
            gid,
            rdev: rdev as u32,
            blksize: BLOCK,
            flags: 0,
        })
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, FsError> {
        if !self.node(parent)?.is_dir {
            return Err(FsError::NotDir);
        }
        let name = std::str::from_utf8(name.as_bytes()).map_err(|_| FsError::NotFound)?;
        let ino = self.tree.lookup(parent, name).ok_or(FsError::NotFound)?;
        self.attr(ino)
    }

    fn entry(&self, ino: u64) -> Result<&Entry, FsError> {
        self.tree.entry(self.node(ino)?).ok_or(FsError::Invalid)
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<&[u8], FsError> {
        match &self.entry(ino)?.kind {
            EntryKind::Symlink { target } => Ok(target.as_bytes()),
            _ => Err(FsError::Invalid),
        }
    }

    /// Reads up to `size` bytes of regular file `ino` at `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let node = self.node(ino)?;
        let source = node.source.ok_or(FsError::Invalid)?;
        let layer = source.layer as usize;
        let EntryKind::File { offset: start, size: len } = self.entry(ino)?.kind else {
            return Err(FsError::Invalid);
        };
        if let Some(recorder) = &self.recorder {
            recorder.read(source);
        }
        if offset >= len {
            return Ok(Vec::new());
        }
        let n = (u64::from(size)).min(len - offset) as usize;
        let mut buf = vec![0; n];
        let reader = self.readers.get(layer).ok_or(FsError::Invalid)?;
        let got = reader.read_at(start + offset, &mut buf)?;
        buf.truncate(got);
        Ok(buf)
    }

    /// Can `size` bytes of file `ino` at `offset` be read without
    /// decompressing anything? (Unknown inodes: yes; the read fails fast.)
    pub fn is_ready(&self, ino: u64, offset: u64, size: u32) -> bool {
        let Ok(node) = self.node(ino) else { return true };
        let (Some(source), Ok(entry)) = (node.source, self.entry(ino)) else { return true };
        let EntryKind::File { offset: start, size: len } = entry.kind else { return true };
        let len = u64::from(size).min(len.saturating_sub(offset));
        self.readers.get(source.layer as usize).is_none_or(|r| r.is_ready(start + offset, len))
    }

    /// Decompresses the part `offset..offset + len` of regular file `ino`
    /// ahead of reading it, on up to `threads` threads.
    pub fn prefetch(&self, ino: u64, offset: u64, len: u64, threads: usize) -> Result<(), FsError> {
        let node = self.node(ino)?;
        let layer = node.source.ok_or(FsError::Invalid)?.layer as usize;
        let EntryKind::File { offset: start, size } = self.entry(ino)?.kind else {
            return Err(FsError::Invalid);
        };
        let len = len.min(size.saturating_sub(offset));
        let reader = self.readers.get(layer).ok_or(FsError::Invalid)?;
        Ok(reader.prefetch(start + offset, len, threads)?)
    }

    /// The value of extended attribute `name` of `ino`.
    pub fn xattr(&self, ino: u64, name: &OsStr) -> Result<&[u8], FsError> {
        let node = self.node(ino)?;
        let entry = self.tree.entry(node).ok_or(FsError::NoAttr)?;
        entry
            .xattrs
            .iter()
            .find(|x| x.name.as_bytes() == name.as_bytes())
            .map(|x| &*x.value)
            .ok_or(FsError::NoAttr)
    }

    /// The NUL-separated names of `ino`'s extended attributes.
    pub fn xattr_names(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let node = self.node(ino)?;
        let mut out = Vec::new();
        for x in self.tree.entry(node).map(|e| &*e.xattrs).unwrap_or_default() {
            out.extend_from_slice(x.name.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// Directory entries of `ino` from `offset`: (next offset, inode, name).
    fn dir_entries(&self, ino: u64, offset: u64) -> Result<Vec<(u64, u64, &str)>, FsError> {
        let node = self.node(ino)?;
        if !node.is_dir {
            return Err(FsError::NotDir);
        }
        let dots = [(ino, "."), (node.parent, "..")];
        let all = dots.into_iter().chain(node.children.iter().map(|(n, i)| (*i, &**n)));
        Ok(all
            .enumerate()
            .skip(offset as usize)
            .map(|(i, (child, name))| (i as u64 + 1, child, name))
            .collect())
    }
}

fn reply_xattr(value: Result<&[u8], FsError>, size: u32, reply: ReplyXattr) {
    match value {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(FsError::Range.errno()),
        Ok(v) => reply.data(v),
        Err(e) => reply.error(e.errno()),
    }
}

/// Asks the kernel for what both adapters want: attributes with directory
/// listings (one round trip per batch, not a lookup per name), cached
/// symlinks, concurrent lookups in one directory, 4 MiB readahead, and
/// `extra`.
pub(super) fn request_capabilities(config: &mut fuser::KernelConfig, extra: &[fuser::InitFlags]) {
    use fuser::InitFlags as F;
    let common = [
        F::FUSE_DO_READDIRPLUS,
        F::FUSE_READDIRPLUS_AUTO,
        F::FUSE_CACHE_SYMLINKS,
        F::FUSE_PARALLEL_DIROPS,
    ];
    for &flag in common.iter().chain(extra) {
        if config.add_capabilities(flag).is_err() {
            tracing::debug!("kernel lacks {flag:?}");
        }
    }
    let _ = config.set_max_readahead(4 << 20);
}

impl fuser::Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        request_capabilities(config, &[]);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.readlink(ino.0) {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(e.errno()),
        }
    }

    // No open/opendir/release round trips at all: answering `ENOSYS` once
    // makes the kernel stop sending them and treat every open as
    // `FOPEN_KEEP_CACHE` (dirs also `FOPEN_CACHE_DIR`). The mount is `ro`, so
    // the kernel itself refuses opens for writing with `EROFS`.
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e.errno()),
        }
    }

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
        let entries = match self.dir_entries(ino.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e.errno()),
        };
        for (next, child, name) in entries {
            let kind = self.attr(child).map_or(FileType::RegularFile, |a| a.kind);
            if reply.add(INodeNo(child), next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.dir_entries(ino.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e.errno()),
        };
        for (next, child, name) in entries {
            let Ok(attr) = self.attr(child) else { continue };
            if reply.add(INodeNo(child), next, name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self.tree.layers().iter().map(|l| l.uncompressed_size).sum();
        let files = self.tree.len() as u64;
        reply.statfs(bytes.div_ceil(u64::from(BLOCK)), 0, 0, files, 0, BLOCK, 255, BLOCK);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.serve_xattrs {
            return reply.error(Errno::ENOSYS);
        }
        reply_xattr(self.xattr(ino.0, name), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.serve_xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let names = self.xattr_names(ino.0);
        reply_xattr(
            names.as_ref().map(|n| n.as_slice()).map_err(|_| FsError::NotFound),
            size,
            reply,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (`default_permissions`).
        match self.node(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(FsError::ReadOnly.errno()),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::layer::{AccessMap, Compression, LayerIndex};

    fn image() -> ImageFs {
        let entry = |path: &str, kind| Entry {
            path: path.into(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1,
            xattrs: Box::default(),
        };
        let layer = LayerIndex {
            blob_digest: Digest::of(b"x"),
            diff_id: Digest::of(b"x"),
            compression: Compression::None,
            uncompressed_size: 0,
            entries: vec![
                entry("z", EntryKind::File { offset: 0, size: 3 }),
                entry("d", EntryKind::Dir),
                entry("d/f", EntryKind::Symlink { target: "../z".into() }),
                entry("a", EntryKind::Fifo),
            ],
            access: AccessMap::Plain(Default::default()),
        };
        ImageFs::new(UnionTree::build(vec![Arc::new(layer)]), Vec::new())
    }

    #[test]
    fn every_process_serves_the_same_inodes() {
        let (first, second) = (image(), image());
        assert_eq!(first.tree().len(), second.tree().len());
        for ino in 1..=first.tree().len() as u64 {
            let (a, b) = (first.attr(ino).unwrap(), second.attr(ino).unwrap());
            assert_eq!((a.ino, a.kind, a.size), (b.ino, b.kind, b.size));
        }
        let d = second.lookup(ROOT, OsStr::new("d")).unwrap().ino.0;
        assert_eq!(first.lookup(d, OsStr::new("f")).unwrap().ino, second.attr(d + 1).unwrap().ino);
    }

    #[test]
    fn an_inode_the_tree_lacks_is_stale() {
        let fs = image();
        let missing = fs.tree().len() as u64 + 1;
        for ino in [0, missing, u64::MAX] {
            assert_eq!(fs.attr(ino).unwrap_err().errno(), Errno::ESTALE);
            assert_eq!(fs.lookup(ino, OsStr::new("d")).unwrap_err().errno(), Errno::ESTALE);
            assert_eq!(fs.dir_entries(ino, 0).unwrap_err().errno(), Errno::ESTALE);
        }
        // A missing name is still just missing.
        assert_eq!(fs.lookup(ROOT, OsStr::new("nope")).unwrap_err().errno(), Errno::ENOENT);
    }

    const ROOT: u64 = crate::fs::union::ROOT_INO;
}
