//! FUSE passthrough (kernel ≥ 6.9, root): a file open on an upper file is
//! handed to the kernel as a backing file, so its reads, writes and mmaps
//! go straight to the upper filesystem at kernel speed, never through this
//! process.
//!
//! The kernel's rules shape the bookkeeping: all passthrough opens of one
//! inode share one backing id, and an inode cannot be open in passthrough
//! and in cached mode at once (the open would fail). So an inode with a
//! cached-mode handle (a lower file open for reading) gets no passthrough
//! until that handle is closed, and the reverse cannot happen: once a file
//! is in the upper, every open of it is an upper open.
//!
//! After a takeover (a new process serving the connection of a previous
//! one), files the kernel opened in passthrough keep working without us:
//! the kernel holds their backing files. The backing ids the previous
//! process registered stay in the kernel's table until the connection ends
//! (nobody knows their numbers to close them; each pins one upper file
//! open). This process knows none of the old handles: releasing one is a
//! no-op here. What it cannot see either is the kernel's per-inode mode: a
//! new passthrough open of an inode still open through an old passthrough
//! handle fails (`EBUSY`: another backing id), and one of an inode still
//! open in cached mode through an old handle fails too (`ETXTBSY`), until
//! those old handles are closed.

use fuser::BackingId;
use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex, Weak};

/// Backing ids by handle and inode, and the cached-mode handles per inode.
#[derive(Default)]
pub struct Passthrough {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Set at `init` when the kernel offers passthrough; cleared if opening
    /// a backing file is refused (not root).
    enabled: bool,
    /// Keeps each passthrough handle's backing id alive, with its inode.
    by_handle: HashMap<u64, (u64, Arc<BackingId>)>,
    /// The backing id of an inode while any of its handles uses it.
    by_inode: HashMap<u64, Weak<BackingId>>,
    /// Handles open in cached mode, per inode, and the inode of each.
    cached: HashMap<u64, usize>,
    cached_handles: HashMap<u64, u64>,
}

impl Passthrough {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Turns passthrough on (the kernel agreed to it).
    pub fn enable(&self) {
        self.lock().enabled = true;
    }

    /// Decides how handle `fh` of inode `ino` is served: passthrough to
    /// `file` (its backing id is returned; `make` registers a new one with
    /// the kernel) or cached mode (`None`; also when `file` is `None`).
    pub fn open(
        &self,
        ino: u64,
        fh: u64,
        file: Option<&File>,
        make: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut inner = self.lock();
        let cached_mode = |inner: &mut Inner| {
            *inner.cached.entry(ino).or_default() += 1;
            inner.cached_handles.insert(fh, ino);
            None
        };
        let file = match file {
            Some(file) if inner.enabled && !inner.cached.contains_key(&ino) => file,
            _ => return cached_mode(&mut inner),
        };
        let id = match inner.by_inode.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => match make(file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    inner.by_inode.insert(ino, Arc::downgrade(&id));
                    id
                }
                Err(e) => {
                    tracing::info!("no FUSE passthrough ({e}); serving file data in-process");
                    inner.enabled = false;
                    return cached_mode(&mut inner);
                }
            },
        };
        inner.by_handle.insert(fh, (ino, id.clone()));
        Some(id)
    }

    /// Forgets handle `fh` (closed). A handle it never saw (cached mode,
    /// or opened by a previous process serving the connection) changes
    /// nothing.
    pub fn release(&self, fh: u64) {
        let mut inner = self.lock();
        if let Some((ino, id)) = inner.by_handle.remove(&fh) {
            if Arc::strong_count(&id) == 1 {
                inner.by_inode.remove(&ino);
            }
        }
        if let Some(ino) = inner.cached_handles.remove(&fh) {
            if let Some(count) = inner.cached.get_mut(&ino) {
                *count -= 1;
                if *count == 0 {
                    inner.cached.remove(&ino);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never_called(_: &File) -> std::io::Result<BackingId> {
        unreachable!("no file, no backing id")
    }

    #[test]
    fn releasing_an_unknown_handle_changes_nothing() {
        let passthrough = Passthrough::default();
        passthrough.enable();
        assert!(passthrough.open(5, 1, None, never_called).is_none());
        // A handle of a previous process, and one released twice.
        passthrough.release(99);
        passthrough.release(99);
        {
            let inner = passthrough.lock();
            assert_eq!(inner.cached.get(&5), Some(&1));
            assert_eq!(inner.cached_handles.get(&1), Some(&5));
        }
        passthrough.release(1);
        passthrough.release(1);
        let inner = passthrough.lock();
        assert!(inner.cached.is_empty() && inner.cached_handles.is_empty());
        assert!(inner.enabled);
    }
}
