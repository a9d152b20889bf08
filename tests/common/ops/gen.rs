//! The seeded generator of op sequences.

use super::{join, under, Data, Falloc, HoldHow, Op, RenameHow, Rng, WriteAt, XattrHow, SLOTS};

/// What a pool path is believed to be. Only a hint: ops change the tree and
/// the generator does not track them exactly (it never looks at a mount, so
/// a sequence depends on its seed alone and can be shrunk freely).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    Dir,
    File,
    /// Symlinks, fifos, devices.
    Other,
    /// Hidden by a whiteout, or never existed.
    Gone,
}

/// Names new entries get: few, so creates collide (EEXIST) and renames
/// replace.
const NEW_NAMES: &[&str] = &["n0", "n1", "n2", "n3", "n4"];

const MODES: &[u32] = &[0o644, 0o600, 0o755, 0o640, 0o4755, 0o2755, 0o1777, 0o000, 0o7777];
const IDS: &[u32] = &[0, 1000, 1234, 65534];
const SECS: &[i64] = &[1_000_000_000, 1_111_111_111, 1_234_567_890, 1_500_000_000];
const NSECS: &[i64] = &[0, 1, 500_000_000, 999_999_999];
const XATTRS: &[&str] = &["user.a", "user.b", "user.c", "user.new"];
const TARGETS: &[&str] =
    &["/etc/passwd", "/etc", "../etc/hosts", "sub/a", "missing", "/", ".", "/data/big.bin"];
/// Offsets and lengths around the fixture's sizes (4 KiB pages, the 5 MiB
/// file, its 4 MiB gzip span).
const OFFSETS: &[u64] = &[
    0,
    1,
    100,
    3000,
    4095,
    4096,
    12_000,
    65_536,
    1 << 20,
    (4 << 20) - 3,
    (5 << 20) - 7,
    (5 << 20) + 4321,
    7 << 20,
];

/// Weights of the op kinds.
const KINDS: &[(&str, u64)] = &[
    ("create", 8),
    ("write", 10),
    ("read", 8),
    ("truncate", 4),
    ("fallocate", 3),
    ("mkdir", 5),
    ("mkfifo", 1),
    ("mknod", 1),
    ("symlink", 3),
    ("link", 4),
    ("unlink", 7),
    ("rmdir", 4),
    ("rename", 10),
    ("chmod", 3),
    ("chown", 3),
    ("utimes", 3),
    ("setxattr", 3),
    ("removexattr", 2),
    ("getxattr", 2),
    ("listxattr", 2),
    ("fsync", 1),
    ("open-unlink-write", 2),
    ("hold", 3),
    ("fd-write", 2),
    ("fd-read", 2),
    ("fd-stat", 1),
    ("close", 1),
    ("stat", 4),
    ("readdir", 4),
    ("readlink", 1),
];

/// Generates `count` ops from `seed`, choosing paths mostly from `pool`
/// (the fixture's paths) and from paths earlier ops created.
pub fn generate(seed: u64, count: usize, pool: &[(String, Hint)]) -> Vec<Op> {
    let mut g = Generator {
        rng: Rng::new(seed),
        pool: pool.to_vec(),
        small_dirs: SMALL_DIRS.iter().map(|d| d.to_string()).collect(),
        with_xattrs: WITH_XATTRS.iter().map(|d| d.to_string()).collect(),
        held: [false; SLOTS],
    };
    (0..count)
        .map(|_| {
            let op = g.op();
            g.learn(&op);
            op
        })
        .collect()
}

struct Generator {
    rng: Rng,
    /// Paths and what they are believed to be; removed names turn `Gone`.
    pool: Vec<(String, Hint)>,
    /// Dirs likely (nearly) empty: rmdir candidates.
    small_dirs: Vec<String>,
    /// Paths likely to carry `user.` xattrs.
    with_xattrs: Vec<String>,
    /// Slots an earlier `Hold` filled.
    held: [bool; SLOTS],
}

/// Fixture dirs that are empty or hold one or two lower files.
const SMALL_DIRS: &[&str] = &["emptydir", "lowdel", "lowdel1", "f2d", "opq", "data/sub/deeper"];
/// Fixture paths with `user.` xattrs.
const WITH_XATTRS: &[&str] = &["x", "x/file", "x/file2"];

impl Generator {
    fn op(&mut self) -> Op {
        let total: u64 = KINDS.iter().map(|(_, w)| w).sum();
        let mut r = self.rng.below(total);
        let kind = KINDS
            .iter()
            .find(|(_, w)| {
                let hit = r < *w;
                r = r.saturating_sub(*w);
                hit
            })
            .map_or("stat", |(k, _)| *k);
        let file = Some(Hint::File);
        let dir = Some(Hint::Dir);
        match kind {
            "create" => Op::Create {
                path: self.path(file),
                excl: self.rng.percent(50),
                mode: *self.rng.pick(&[0o644, 0o600, 0o755, 0o4755]),
            },
            "write" => {
                let at = match self.rng.below(3) {
                    0 => WriteAt::Trunc,
                    1 => WriteAt::Append,
                    _ => WriteAt::Offset(self.offset()),
                };
                Op::Write { path: self.path(file), at, data: self.data() }
            }
            "read" => Op::Read { path: self.path(file), off: self.offset(), len: self.length() },
            "truncate" => Op::Truncate { path: self.path(file), len: self.offset() },
            "fallocate" => Op::Fallocate {
                path: self.path(file),
                how: *self.rng.pick(&[Falloc::Allocate, Falloc::KeepSize, Falloc::PunchHole]),
                off: self.offset(),
                len: *self.rng.pick(&[1, 4096, 10_000, 1 << 20]),
            },
            "mkdir" => Op::Mkdir {
                path: self.fresh(),
                mode: *self.rng.pick(&[0o755, 0o700, 0o1777, 0o2775]),
            },
            "mkfifo" => Op::Mkfifo { path: self.fresh() },
            "mknod" => Op::Mknod { path: self.fresh(), minor: *self.rng.pick(&[3, 5, 7]) },
            "symlink" => {
                let target = if self.rng.percent(30) {
                    format!("/{}", self.existing(None))
                } else {
                    self.rng.pick(TARGETS).to_string()
                };
                Op::Symlink { target, path: self.fresh() }
            }
            "link" => Op::Link { from: self.path(file), to: self.fresh() },
            "unlink" => Op::Unlink { path: self.path(None) },
            "rmdir" => Op::Rmdir {
                path: if self.rng.percent(60) {
                    self.rng.pick(&self.small_dirs).clone()
                } else {
                    self.path(dir)
                },
            },
            "rename" => {
                let from = if self.rng.percent(80) { self.existing(None) } else { self.path(None) };
                let to = match self.rng.below(10) {
                    0..=3 => self.new_name(),
                    4..=7 => self.existing(self.hint_of(&from)),
                    _ => self.path(None),
                };
                let how = match self.rng.below(10) {
                    0..=5 => RenameHow::Plain,
                    6 | 7 => RenameHow::NoReplace,
                    _ => RenameHow::Exchange,
                };
                Op::Rename { from, to, how }
            }
            "chmod" => Op::Chmod { path: self.path(None), mode: *self.rng.pick(MODES) },
            "chown" => Op::Chown {
                path: self.path(None),
                uid: self.id(),
                gid: self.id(),
                follow: self.rng.percent(50),
            },
            "utimes" => Op::Utimes {
                path: self.path(None),
                atime: if self.rng.percent(30) { None } else { Some(self.time()) },
                mtime: self.time(),
                follow: self.rng.percent(50),
            },
            "setxattr" => Op::SetXattr {
                path: self.path(None),
                name: self.rng.pick(XATTRS).to_string(),
                value: Data { len: self.rng.below(300) as usize, seed: self.rng.below(256) as u8 },
                how: *self.rng.pick(&[
                    XattrHow::Any,
                    XattrHow::Any,
                    XattrHow::Create,
                    XattrHow::Replace,
                ]),
            },
            "removexattr" => {
                Op::RemoveXattr { path: self.xattr_path(), name: self.rng.pick(XATTRS).to_string() }
            }
            "getxattr" => {
                Op::GetXattr { path: self.xattr_path(), name: self.rng.pick(XATTRS).to_string() }
            }
            "listxattr" => Op::ListXattr { path: self.xattr_path() },
            "fsync" => Op::Fsync { path: self.path(file) },
            "open-unlink-write" => {
                Op::OpenUnlinkWrite { path: self.path(file), off: self.offset(), data: self.data() }
            }
            "hold" => Op::Hold {
                slot: self.rng.below(SLOTS as u64) as usize,
                path: self.path(file),
                how: *self.rng.pick(&[HoldHow::Read, HoldHow::ReadWrite, HoldHow::Append]),
            },
            "fd-write" => Op::FdWrite { slot: self.slot(), off: self.offset(), data: self.data() },
            "fd-read" => Op::FdRead { slot: self.slot(), off: self.offset(), len: self.length() },
            "fd-stat" => Op::FdStat { slot: self.slot() },
            "close" => Op::Close { slot: self.slot() },
            "readdir" => Op::ReadDir {
                path: if self.rng.percent(10) { String::new() } else { self.path(dir) },
            },
            "readlink" => Op::Readlink { path: self.path(Some(Hint::Other)) },
            _ => Op::Stat { path: self.path(None), follow: self.rng.percent(50) },
        }
    }

    /// Updates the pool as if the op succeeded (a guess: it may not have).
    fn learn(&mut self, op: &Op) {
        match op {
            Op::Create { path, .. } => self.set(path, Hint::File),
            Op::Mkdir { path, .. } => {
                self.set(path, Hint::Dir);
                self.small_dirs.push(path.clone());
            }
            Op::Mkfifo { path } | Op::Mknod { path, .. } | Op::Symlink { path, .. } => {
                self.set(path, Hint::Other)
            }
            Op::Link { to, .. } => self.set(to, Hint::File),
            Op::Unlink { path } | Op::Rmdir { path } | Op::OpenUnlinkWrite { path, .. } => {
                self.set(path, Hint::Gone)
            }
            Op::Rename { from, to, how } => {
                let (a, b) = (self.subtree(from), self.subtree(to));
                if *how == RenameHow::Exchange {
                    self.put(&b, from);
                } else {
                    for (rel, _) in &a {
                        self.set(&under(from, rel), Hint::Gone);
                    }
                }
                self.put(&a, to);
            }
            Op::SetXattr { path, .. } => self.with_xattrs.push(path.clone()),
            Op::Hold { slot, .. } => self.held[*slot] = true,
            Op::Close { slot } => self.held[*slot] = false,
            _ => {}
        }
    }

    /// `path` ("" for itself) and the paths below it, relative to it.
    fn subtree(&self, path: &str) -> Vec<(String, Hint)> {
        let prefix = format!("{path}/");
        self.pool
            .iter()
            .filter_map(|(p, h)| {
                if p == path {
                    Some((String::new(), *h))
                } else {
                    p.strip_prefix(&prefix).map(|rest| (rest.to_string(), *h))
                }
            })
            .filter(|(_, h)| *h != Hint::Gone)
            .collect()
    }

    /// Puts a subtree (from `subtree`) at `to`.
    fn put(&mut self, subtree: &[(String, Hint)], to: &str) {
        for (rel, hint) in subtree {
            self.set(&under(to, rel), *hint);
        }
    }

    fn set(&mut self, path: &str, hint: Hint) {
        match self.pool.iter_mut().find(|(p, _)| p == path) {
            Some(entry) => entry.1 = hint,
            None => self.pool.push((path.to_string(), hint)),
        }
    }

    fn xattr_path(&mut self) -> String {
        if self.rng.percent(60) {
            self.rng.pick(&self.with_xattrs).clone()
        } else {
            self.path(None)
        }
    }

    fn hint_of(&self, path: &str) -> Option<Hint> {
        self.pool.iter().find(|(p, _)| p == path).map(|(_, h)| *h)
    }

    /// Mostly a known path (of the wanted kind), sometimes a new name in a
    /// known dir, sometimes something that cannot exist or is hidden.
    fn path(&mut self, want: Option<Hint>) -> String {
        match self.rng.below(100) {
            0..=69 => self.existing(want),
            70..=89 => self.new_name(),
            _ => match self.rng.below(3) {
                0 => join(&self.existing(Some(Hint::File)), "x"),
                1 => join(&self.existing(Some(Hint::Gone)), self.rng.pick::<&str>(NEW_NAMES)),
                _ => self.existing(Some(Hint::Gone)),
            },
        }
    }

    /// For ops that create a name: mostly a new one.
    fn fresh(&mut self) -> String {
        if self.rng.percent(60) {
            self.new_name()
        } else {
            self.path(None)
        }
    }

    fn existing(&mut self, want: Option<Hint>) -> String {
        let matching: Vec<&String> = self
            .pool
            .iter()
            .filter(|(_, h)| match want {
                None => *h != Hint::Gone,
                Some(w) => *h == w,
            })
            .map(|(p, _)| p)
            .collect();
        if matching.is_empty() {
            return self.rng.pick(&self.pool).0.clone();
        }
        self.rng.pick(&matching).to_string()
    }

    fn new_name(&mut self) -> String {
        let dir = if self.rng.percent(20) { String::new() } else { self.existing(Some(Hint::Dir)) };
        join(&dir, self.rng.pick::<&str>(NEW_NAMES))
    }

    fn offset(&mut self) -> u64 {
        let base = *self.rng.pick(OFFSETS);
        if self.rng.percent(30) {
            base + self.rng.below(5000)
        } else {
            base
        }
    }

    fn length(&mut self) -> usize {
        *self.rng.pick(&[0, 1, 17, 4096, 10_000, 200_000, 6 << 20])
    }

    fn data(&mut self) -> Data {
        let len = match self.rng.below(10) {
            0 => 0,
            1..=5 => 1 + self.rng.below(64),
            6..=8 => 1 + self.rng.below(6000),
            _ => 1 + self.rng.below(70_000),
        };
        Data { len: len as usize, seed: self.rng.below(256) as u8 }
    }

    fn id(&mut self) -> Option<u32> {
        if self.rng.percent(15) {
            None
        } else {
            Some(*self.rng.pick(IDS))
        }
    }

    fn time(&mut self) -> (i64, i64) {
        (*self.rng.pick(SECS), *self.rng.pick(NSECS))
    }

    /// Mostly a slot an earlier `Hold` filled.
    fn slot(&mut self) -> usize {
        let held: Vec<usize> = (0..SLOTS).filter(|s| self.held[*s]).collect();
        if !held.is_empty() && self.rng.percent(90) {
            *self.rng.pick(&held)
        } else {
            self.rng.below(SLOTS as u64) as usize
        }
    }
}
