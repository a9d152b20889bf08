//! Finding an inode this process never handed out.
//!
//! A process that takes over a FUSE connection (see the module doc of
//! [`super`]) starts with a node table holding only the root, while the
//! kernel still holds every inode the previous process looked up. Inode
//! numbers are the same in both processes (lower objects keep the lower
//! tree's numbers, which the same layers always give; upper-only objects
//! are `upper_base + st_ino`), so an unknown number says where to look:
//!
//! * below `upper_base`, a lower object: its paths in the lower tree are
//!   looked up from the root; if none leads to it, it may have moved (a
//!   renamed ancestor directory carries a `redirect` to the lower path, a
//!   renamed copied-up file its `origin`), so the upper is walked for the
//!   upper directories merging one of its lower ancestors and the files
//!   standing for it;
//! * from `upper_base` up to the spare numbers, an upper-only object: the
//!   upper is walked for an entry with that `st_ino`;
//! * a spare number (given in the order objects were met, which a new
//!   process cannot replay), or an object not found: `ESTALE`, after which
//!   the kernel walks the path again, revalidating every name
//!   (`LOOKUP_REVAL`), and learns the current inodes through ordinary
//!   lookups.
//!
//! A candidate path is accepted only if looking it up through the ordinary
//! lookup code ([`Overlay::resolve`]) leads to the very number, so whiteouts,
//! opaque directories, copy-ups and redirects are applied exactly as for the
//! kernel's own lookups, and the node table is filled the same way. The
//! walks cost a pass over the upper (a `stat` and a few `getxattr`s per
//! entry); they only happen for the inodes the kernel brings along after a
//! takeover, each once. Rejected: persisting the node table (one more
//! on-disk format to keep in step with the upper, and a crash loses the
//! last changes anyway); reverse maps kept in memory for every node (memory
//! for 100k+ nodes, for an event that rarely happens).

use super::{Overlay, State, SPARE_INOS};
use crate::fs::error::FsError;
use crate::fs::union::ROOT_INO;
use crate::sys::upper::{is_whiteout, Dir};
use rustix::fs::Stat;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};

/// An upper entry met by [`Overlay::walk_upper`].
struct Met<'a> {
    /// Names from the upper root down to the entry, its own last.
    path: &'a [OsString],
    /// The directory holding it.
    dir: &'a Dir,
    stat: &'a Stat,
    /// The lower object it shows or merges (when the walk merges).
    lower: Option<u64>,
}

impl Met<'_> {
    fn name(&self) -> &OsStr {
        self.path.last().map_or(OsStr::new(""), |n| n.as_os_str())
    }
}

fn is_dir(stat: &Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir()
}

fn is_file(stat: &Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file()
}

/// Upper walks may visit an entry through several routes; each path is
/// looked up once.
type Tried = HashSet<Vec<OsString>>;

impl Overlay {
    /// Puts inode `ino`, which the kernel holds but this process never
    /// handed out, into the node table, by looking up a path of it from the
    /// root as the kernel would have; `ESTALE` if it no longer exists.
    pub(super) fn resolve_unknown(&self, st: &mut State, ino: u64) -> Result<(), FsError> {
        if st.gone.contains(&ino) {
            return Err(FsError::Stale);
        }
        let found = if ino < self.upper_base {
            self.find_lower(st, ino)?
        } else if ino < SPARE_INOS {
            self.find_upper_only(st, ino)?
        } else {
            false
        };
        if found {
            tracing::debug!(ino, "found an inode of the previous process");
            Ok(())
        } else {
            tracing::debug!(ino, "an inode of the previous process is gone");
            st.gone.insert(ino);
            Err(FsError::Stale)
        }
    }

    /// Finds lower object `ino` where the lower has it, or where it moved.
    fn find_lower(&self, st: &mut State, ino: u64) -> Result<bool, FsError> {
        let paths = self.lower.tree().paths_of(ino);
        let names = |steps: &[(&str, u64)]| -> Vec<OsString> {
            steps.iter().map(|(name, _)| OsString::from(*name)).collect()
        };
        let mut tried = Tried::new();
        for path in &paths {
            if self.try_path(st, &mut tried, names(path), ino)? {
                return Ok(true);
            }
        }
        if paths.is_empty() {
            return Ok(false);
        }
        let root_lower = st.node(ROOT_INO)?.lower;
        self.walk_upper(root_lower, true, &mut |met| {
            let mut candidates = Vec::new();
            match met.lower {
                // A directory merging one of its lower ancestors (or itself):
                // it is below that directory's upper path.
                Some(lower) if is_dir(met.stat) => {
                    for path in &paths {
                        if let Some(i) = path.iter().position(|(_, step)| *step == lower) {
                            let mut candidate = met.path.to_vec();
                            candidate.extend(names(&path[i + 1..]));
                            candidates.push(candidate);
                        }
                    }
                }
                // A metacopy file of it.
                Some(lower) if lower == ino => candidates.push(met.path.to_vec()),
                // A copy of it (only regular files record their origin).
                _ if is_file(met.stat) && self.origin(met.dir, met.name())? == Some(ino) => {
                    candidates.push(met.path.to_vec())
                }
                _ => {}
            }
            for candidate in candidates {
                if self.try_path(st, &mut tried, candidate, ino)? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    /// Finds upper-only object `ino` by its upper inode number.
    fn find_upper_only(&self, st: &mut State, ino: u64) -> Result<bool, FsError> {
        let upper_ino = ino - self.upper_base;
        let mut tried = Tried::new();
        self.walk_upper(None, false, &mut |met| {
            if met.stat.st_ino != upper_ino {
                return Ok(false);
            }
            self.try_path(st, &mut tried, met.path.to_vec(), ino)
        })
    }

    /// Looks `path` up from the root (unless it was tried already): does it
    /// lead to `ino`? Names on the way enter the node table as in any lookup.
    fn try_path(
        &self,
        st: &mut State,
        tried: &mut Tried,
        path: Vec<OsString>,
        ino: u64,
    ) -> Result<bool, FsError> {
        if !tried.insert(path.clone()) {
            return Ok(false);
        }
        let mut current = ROOT_INO;
        for name in &path {
            current = match self.resolve(st, current, name) {
                Ok(child) => child,
                Err(FsError::NotFound | FsError::NotDir) => return Ok(false),
                Err(e) => return Err(e),
            };
        }
        Ok(current == ino)
    }

    /// Visits the entries of the upper directory depth first (not
    /// whiteouts; not below another filesystem mounted inside), with
    /// `*at()` calls that never follow a symlink, until `visit` says it is
    /// done (then `true`). With `merge`, each entry comes with the lower
    /// object it shows or merges (its xattrs are read); the root merges
    /// `root_lower`.
    fn walk_upper(
        &self,
        root_lower: Option<u64>,
        merge: bool,
        visit: &mut dyn FnMut(&Met<'_>) -> Result<bool, FsError>,
    ) -> Result<bool, FsError> {
        let dev = self.upper.root.stat(OsStr::new(""))?.st_dev;
        let walk = Walk { dev, merge };
        self.walk_dir(&walk, &self.upper.root, root_lower, &mut Vec::new(), visit)
    }

    fn walk_dir(
        &self,
        walk: &Walk,
        dir: &Dir,
        dir_lower: Option<u64>,
        path: &mut Vec<OsString>,
        visit: &mut dyn FnMut(&Met<'_>) -> Result<bool, FsError>,
    ) -> Result<bool, FsError> {
        for (name, _) in dir.entries()? {
            let stat = match dir.stat(&name) {
                Ok(stat) => stat,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            if is_whiteout(&stat) {
                continue;
            }
            let lower = if walk.merge {
                let lower_child = self.lower_child(dir_lower, &name);
                self.upper_merge(dir, &name, &stat, dir_lower, lower_child)?.0
            } else {
                None
            };
            path.push(name);
            let mut done = visit(&Met { path, dir, stat: &stat, lower })?;
            if !done && is_dir(&stat) && stat.st_dev == walk.dev {
                let name = path.last().map(|n| n.as_os_str()).unwrap_or_default();
                match dir.open_dir(name) {
                    Ok(sub) => done = self.walk_dir(walk, &sub, lower, path, visit)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            path.pop();
            if done {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// What an upper walk keeps for its whole length.
struct Walk {
    /// The upper's filesystem: the walk does not leave it.
    dev: u64,
    merge: bool,
}
