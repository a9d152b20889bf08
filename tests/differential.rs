//! Differential test of union-filesystem write semantics, with kernel
//! overlayfs as the oracle.
//!
//! A seeded generator (`common::ops`) makes sequences of filesystem
//! operations; each sequence runs on two fresh mounts over the same lower
//! layers: the oracle, kernel overlayfs (`redirect_dir=on,metacopy=on,
//! index=off`), and the candidate. After every op the outcomes (data or
//! errno, plus the state of the touched paths) must be equal; after the
//! sequence the whole trees must be equal. Then "upper compatibility": the
//! candidate is unmounted and kernel overlayfs is mounted over the
//! candidate's upper dir; it must show the tree the candidate showed.
//!
//! On a difference the test prints the seed, the op and both outcomes, then
//! shrinks the sequence (greedy delta debugging: drop ops while it still
//! fails the same way) and prints the minimal reproduction.
//!
//! Environment: `FUZZ_SEQUENCES` (300), `FUZZ_OPS` (60), `FUZZ_SEED` (1;
//! sequence `i` uses seed `FUZZ_SEED + i`), `RMOUNT_DIFF_CANDIDATE`
//! (`overlay` or `rmount`; see [`DEFAULT_CANDIDATE`]), `FUZZ_MAX_FAILURES` (1:
//! how many distinct kinds of difference to collect before stopping),
//! `FUZZ_JOBS` (2: sequences run on this many threads, each with its own
//! mounts), `FUZZ_IGNORE_MTIME` (1: show every mtime as `recent`),
//! `RMOUNT_DIFF_OVERLAY_OPTIONS` (see [`OVERLAY_OPTIONS`]).
//! `scripts/fuzz-ops.sh` runs longer campaigns.

mod common;

use common::ops::{self, Hint, Op, Session, TreeDiff};
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The filesystem the oracle is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Candidate {
    /// A second kernel overlayfs mount. Validates the harness: must show
    /// no difference at all.
    KernelOverlay,
    /// rmount's writable mount: `rmount mount REF MNT --upper U --work W`.
    Rmount,
}

// ============================================================================
// THE SWITCH: the candidate used when RMOUNT_DIFF_CANDIDATE is unset.
// `RMOUNT_DIFF_CANDIDATE=overlay` checks the harness itself: kernel overlayfs
// against kernel overlayfs must show no difference.
const DEFAULT_CANDIDATE: Candidate = Candidate::Rmount;
// ============================================================================

impl Candidate {
    fn from_env() -> Candidate {
        match std::env::var("RMOUNT_DIFF_CANDIDATE").as_deref() {
            Err(_) | Ok("") => DEFAULT_CANDIDATE,
            Ok("overlay") => Candidate::KernelOverlay,
            Ok("rmount") => Candidate::Rmount,
            Ok(other) => panic!("RMOUNT_DIFF_CANDIDATE={other}: expected overlay or rmount"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Candidate::KernelOverlay => "overlay",
            Candidate::Rmount => "rmount",
        }
    }
}

/// Options of every kernel overlayfs mount. `RMOUNT_DIFF_OVERLAY_OPTIONS`
/// overrides them for the oracle (and the overlay candidate), not for the
/// upper-compatibility mount.
///
/// `index=off`: nothing in the op set needs it (no hardlinks in the lower
/// layers), and it lets an upper be mounted again with a fresh workdir.
///
/// `metacopy=on` has a quirk a candidate without metadata-only copy-up will
/// trip over: an op that copies up only metadata (chmod, chown, utimes,
/// set/removexattr, link, rename of a lower file) followed by an open for
/// writing (the deferred data copy-up) sets mtime to the time of that open,
/// where `metacopy=off` keeps the lower file's mtime.
const OVERLAY_OPTIONS: &str = "redirect_dir=on,metacopy=on,index=off";

fn overlay_options() -> String {
    std::env::var("RMOUNT_DIFF_OVERLAY_OPTIONS").unwrap_or_else(|_| OVERLAY_OPTIONS.into())
}

const REFERENCE: &str = "localhost/differential:fixture";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: expected a number")))
}

// ---------------------------------------------------------------------------
// Fixture

fn d(path: &str, mode: u32) -> (Item, Meta) {
    (Item::Dir { path: path.into(), mode }, Meta::default())
}

fn f(path: &str, data: &[u8]) -> (Item, Meta) {
    (Item::File { path: path.into(), mode: 0o644, data: data.to_vec() }, Meta::default())
}

fn fm(path: &str, mode: u32, data: &[u8]) -> (Item, Meta) {
    (Item::File { path: path.into(), mode, data: data.to_vec() }, Meta::default())
}

fn sym(path: &str, target: &str) -> (Item, Meta) {
    (Item::Symlink { path: path.into(), target: target.into() }, Meta::default())
}

fn wh(path: &str) -> (Item, Meta) {
    (Item::Whiteout { path: path.into() }, Meta::default())
}

fn owned(item: (Item, Meta), uid: u64, gid: u64) -> (Item, Meta) {
    (item.0, Meta { uid, gid, ..item.1 })
}

fn xattrs(item: (Item, Meta), pairs: &[(&str, &str)]) -> (Item, Meta) {
    let xattrs = pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
    (item.0, Meta { xattrs, ..item.1 })
}

/// Three layers (gzip, zstd, plain), a few dozen entries, so random ops hit
/// lower files often. No hardlinks: overlayfs breaks lower hardlinks on
/// copy-up, which is not a semantic to copy.
fn layers() -> Vec<(Vec<(Item, Meta)>, Compress)> {
    let l0 = vec![
        d("etc", 0o755),
        f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        f("etc/hosts", b"127.0.0.1 localhost\n"),
        f("etc/empty", b""),
        d("data", 0o755),
        f("data/small.txt", &pseudo_random(3000, 10)),
        f("data/mid.bin", &pseudo_random(12_000, 11)),
        // Spans rmount's 4 MiB gzip checkpoints.
        f("data/big.bin", &pseudo_random((5 << 20) + 12_345, 12)),
        d("data/sub", 0o755),
        f("data/sub/a", b"a in l0\n"),
        f("data/sub/b", b"b in l0, whited out in l1\n"),
        d("data/sub/deeper", 0o750),
        f("data/sub/deeper/c", &pseudo_random(5000, 13)),
        d("bin", 0o755),
        fm("bin/suid", 0o4755, b"#!/bin/sh\necho suid\n"),
        fm("bin/tool", 0o755, b"#!/bin/sh\necho tool\n"),
        d("tmp", 0o1777),
        f("tmp/keep", b"keep"),
        d("dev", 0o755),
        (Item::Char { path: "dev/null".into(), major: 1, minor: 3 }, Meta::default()),
        (Item::Fifo { path: "dev/fifo".into() }, Meta::default()),
        d("lnk", 0o755),
        sym("lnk/abs", "/etc/passwd"),
        sym("lnk/rel", "../etc/hosts"),
        sym("lnk/dangling", "/nonexistent/x"),
        sym("lnk/etcdir", "/etc"),
        sym("lnk/subdir", "../data/sub"),
        sym("lnk/loop", "loop"),
        owned(d("owned", 0o750), 1000, 1000),
        owned(fm("owned/file", 0o600, b"owned by 1000\n"), 1000, 1000),
        owned(f("owned/nobody", b"owned by 65534\n"), 65534, 65534),
        xattrs(d("x", 0o755), &[("user.dir", "on a dir")]),
        xattrs(f("x/file", b"has xattrs\n"), &[("user.a", "1"), ("user.b", "two")]),
        f("gone-file", b"whited out in l1\n"),
        d("gone-dir", 0o755),
        f("gone-dir/f1", b"hidden\n"),
        d("gone-dir/sub", 0o755),
        f("gone-dir/sub/f2", b"hidden\n"),
        d("opq", 0o755),
        f("opq/old", b"hidden by opaque\n"),
        d("opq/olddir", 0o755),
        f("opq/olddir/inner", b"hidden by opaque\n"),
        d("d2f", 0o755),
        f("d2f/child", b"hidden: d2f becomes a file\n"),
        f("f2d", b"becomes a dir\n"),
        d("lowdel", 0o755),
        f("lowdel/only1", b"1"),
        f("lowdel/only2", b"2"),
        d("lowdel1", 0o755),
        f("lowdel1/only", b"only"),
        d("emptydir", 0o755),
        d("merged", 0o755),
        f("merged/l0", b"from l0\n"),
        f("merged/l0b", b"from l0, hidden in l2\n"),
    ];
    let l1 = vec![
        wh("gone-file"),
        wh("gone-dir"),
        d("opq", 0o755),
        (Item::Opaque { path: "opq".into() }, Meta::default()),
        f("opq/new", b"only this survives\n"),
        f("d2f", b"now a file\n"),
        d("f2d", 0o755),
        f("f2d/child", b"child\n"),
        d("data", 0o755),
        d("data/sub", 0o755),
        f("data/sub/e", b"e in l1\n"),
        wh("data/sub/b"),
        d("merged", 0o755),
        f("merged/l1", b"from l1\n"),
        d("etc", 0o755),
        f("etc/passwd", b"root:x:0:0:changed in l1:/root:/bin/sh\n"),
    ];
    let l2 = vec![
        d("merged", 0o775),
        f("merged/l2", b"from l2\n"),
        wh("merged/l0b"),
        d("x", 0o755),
        xattrs(f("x/file2", b"more xattrs\n"), &[("user.c", "three")]),
        owned(d("sgid", 0o2775), 0, 1234),
        f("top.txt", b"top\n"),
    ];
    vec![(l0, Compress::Gzip), (l1, Compress::Zstd), (l2, Compress::None)]
}

/// Names the fixture hides (whiteouts, opaque dir, dir replaced by a file).
const HIDDEN: &[&str] = &[
    "gone-file",
    "gone-dir",
    "gone-dir/f1",
    "gone-dir/sub",
    "opq/old",
    "opq/olddir",
    "d2f/child",
    "data/sub/b",
    "merged/l0b",
    "missing",
];

/// The generator's starting pool: every visible path, the hidden names, and
/// paths reaching through symlinks (resolved inside the mount).
fn initial_pool(tree: &BTreeMap<String, String>) -> Vec<(String, Hint)> {
    let mut pool: Vec<(String, Hint)> = tree
        .iter()
        .filter(|(p, _)| p.as_str() != "/")
        .map(|(p, line)| {
            let hint = match line.split(' ').next() {
                Some("dir") => Hint::Dir,
                Some("file") => Hint::File,
                _ => Hint::Other,
            };
            (p.clone(), hint)
        })
        .collect();
    pool.extend(HIDDEN.iter().map(|p| (p.to_string(), Hint::Gone)));
    for (p, hint) in [
        ("lnk/etcdir/passwd", Hint::File),
        ("lnk/subdir/a", Hint::File),
        ("lnk/subdir", Hint::Dir),
        ("lnk/etcdir", Hint::Dir),
    ] {
        pool.push((p.to_string(), hint));
    }
    pool
}

// ---------------------------------------------------------------------------
// Runner

/// Why a sequence failed.
#[derive(Clone, Debug)]
enum Failure {
    /// Op `index` had different outcomes.
    Op { index: usize, oracle: String, candidate: String },
    /// The trees differ after the sequence.
    Tree(Vec<TreeDiff>),
    /// Kernel overlayfs over the candidate's upper shows another tree than
    /// the candidate did.
    Upper(Vec<TreeDiff>),
}

impl Failure {
    /// The kind of difference: what must stay the same while shrinking,
    /// and how failures are told apart (`FUZZ_MAX_FAILURES`).
    fn key(&self, ops: &[Op]) -> String {
        let first = |diffs: &[TreeDiff]| {
            let d = &diffs[0];
            ops::differing_fields(d.a.as_deref(), d.b.as_deref())
        };
        match self {
            Failure::Op { index, oracle, candidate } => format!(
                "{}: {}",
                ops[*index].kind(),
                ops::differing_fields(Some(oracle), Some(candidate))
            ),
            Failure::Tree(diffs) => format!("tree: {}", first(diffs)),
            Failure::Upper(diffs) => format!("upper: {}", first(diffs)),
        }
    }

    fn describe(&self, ops: &[Op], candidate: &str) -> String {
        match self {
            Failure::Op { index, oracle, candidate: got } => format!(
                "op #{index} {}\n    oracle:    {oracle}\n    {candidate:<10} {got}",
                ops[*index],
                candidate = format!("{candidate}:")
            ),
            Failure::Tree(diffs) => format!(
                "trees differ after the sequence:\n{}",
                show_diffs(diffs, "oracle", candidate)
            ),
            Failure::Upper(diffs) => format!(
                "kernel overlayfs over the {candidate} upper dir differs from what {candidate} showed:\n{}",
                show_diffs(diffs, candidate, "overlay")
            ),
        }
    }
}

fn show_diffs(diffs: &[TreeDiff], a: &str, b: &str) -> String {
    let side = |line: &Option<String>| line.clone().unwrap_or_else(|| "(missing)".into());
    let width = a.len().max(b.len()) + 1;
    diffs
        .iter()
        .map(|d| {
            format!(
                "  {}\n      {:width$} {}\n      {:width$} {}",
                d.path,
                format!("{a}:"),
                side(&d.a),
                format!("{b}:"),
                side(&d.b)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Outcome counts per op kind (first word of the oracle's outcome), to show
/// what the generator exercises.
type Stats = BTreeMap<String, BTreeMap<String, u64>>;

struct Harness {
    /// Fixture, lowers, rmount store, and a scratch dir per run.
    tmp: tempfile::TempDir,
    /// Extracted layers in overlayfs's format, top first.
    lowers: Vec<PathBuf>,
    candidate: Candidate,
    /// rmount's state dir (the fixture is loaded once, for all runs).
    store: PathBuf,
    /// Times at or after this show as `recent`.
    recent: i64,
    /// Mount options of every kernel overlayfs mount.
    options: String,
    /// Numbers the scratch dirs of runs.
    runs: AtomicU64,
}

impl Harness {
    fn new(candidate: Candidate) -> Harness {
        let tmp = tempdir();
        let mut blobs = Vec::new();
        let mut lowers = Vec::new();
        for (i, (items, how)) in layers().iter().enumerate() {
            let tar = layer_tar(items);
            let lower = tmp.path().join(format!("lower{i}"));
            extract_for_overlay(&tar, &lower);
            lowers.push(lower);
            let (blob, media_type) = compress(&tar, *how);
            blobs.push((blob, media_type, tar));
        }
        lowers.reverse();
        let store = tmp.path().join("store");
        if candidate == Candidate::Rmount {
            let layout = tmp.path().join("layout");
            write_oci_layout(&layout, REFERENCE, &blobs);
            rmount_ok(&store, &["load", "-i", layout.to_str().unwrap()]);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        // FUZZ_IGNORE_MTIME=1: every mtime shows as `recent`, to look past
        // mtime differences.
        let recent = if env_u64("FUZZ_IGNORE_MTIME", 0) == 1 { i64::MIN } else { now - 3600 };
        let options = overlay_options();
        Harness { tmp, lowers, candidate, store, recent, options, runs: 0.into() }
    }

    fn mount_candidate(&self, upper: &Path, work: &Path, mnt: &Path) -> Mounted {
        match self.candidate {
            Candidate::KernelOverlay => {
                Mounted::overlay_rw(&self.lowers, upper, work, &self.options, mnt)
            }
            Candidate::Rmount => Mounted::rmount_rw(&self.store, REFERENCE, mnt, upper, work),
        }
    }

    /// Snapshot of the fixture as the oracle shows it, before any write.
    fn pristine(&self) -> BTreeMap<String, String> {
        let mnt = Mounted::overlay(&self.lowers, &self.tmp.path().join("pristine"));
        ops::snapshot(&mnt.path, self.recent)
    }

    /// Runs `ops` on a fresh oracle and a fresh candidate. Returns the first
    /// difference or, with a `target` key, the first difference of that
    /// kind (ops keep running past others), else the first one seen.
    fn run(
        &self,
        ops: &[Op],
        stats: Option<&mut Stats>,
        target: Option<&str>,
    ) -> Result<(), Failure> {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let dir = self.tmp.path().join(format!("run{n}"));
        let sub = |name: &str| {
            let p = dir.join(name);
            std::fs::create_dir_all(&p).unwrap();
            // The upper root's attributes are the merged root's.
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            p
        };
        let oracle = Mounted::overlay_rw(
            &self.lowers,
            &sub("oracle-upper"),
            &sub("oracle-work"),
            &self.options,
            &sub("oracle"),
        );
        let upper = sub("cand-upper");
        let candidate = self.mount_candidate(&upper, &sub("cand-work"), &sub("cand"));
        let result = self.compare(&oracle.path, candidate, &upper, &dir, ops, stats, target);
        drop(oracle);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn compare(
        &self,
        oracle: &Path,
        candidate: Mounted,
        upper: &Path,
        dir: &Path,
        ops: &[Op],
        mut stats: Option<&mut Stats>,
        target: Option<&str>,
    ) -> Result<(), Failure> {
        // The first difference not of the `target` kind.
        let mut other: Option<Failure> = None;
        let mut found = |f: Failure| -> Result<(), Failure> {
            match target {
                Some(key) if f.key(ops) != key => {
                    other.get_or_insert(f);
                    Ok(())
                }
                _ => Err(f),
            }
        };
        {
            let mut a = Session::new(oracle, self.recent);
            let mut b = Session::new(&candidate.path, self.recent);
            for (index, op) in ops.iter().enumerate() {
                let (want, got) = (a.apply(op), b.apply(op));
                if let Some(stats) = stats.as_deref_mut() {
                    let head = want.split([' ', '|']).next().unwrap_or("").to_string();
                    let kind = match op {
                        Op::Rename { how, .. } => format!("rename {how:?}"),
                        _ => op.kind().to_string(),
                    };
                    *stats.entry(kind).or_default().entry(head).or_default() += 1;
                }
                if want != got {
                    found(Failure::Op { index, oracle: want, candidate: got })?;
                }
            }
        }
        let want = ops::snapshot(oracle, self.recent);
        let got = ops::snapshot(&candidate.path, self.recent);
        let diffs = ops::diff_trees(&want, &got);
        if !diffs.is_empty() {
            found(Failure::Tree(diffs))?;
        }
        drop(candidate);
        let work = dir.join("again-work");
        std::fs::create_dir_all(&work).unwrap();
        let again =
            Mounted::overlay_rw(&self.lowers, upper, &work, OVERLAY_OPTIONS, &dir.join("again"));
        let seen = ops::snapshot(&again.path, self.recent);
        let diffs = ops::diff_trees(&got, &seen);
        if !diffs.is_empty() {
            found(Failure::Upper(diffs))?;
        }
        other.map_or(Ok(()), Err)
    }

    /// Greedy delta debugging: drop chunks of ops (halving the chunk size
    /// down to single ops) while the sequence still fails the same way.
    fn shrink(&self, ops: &[Op], failure: &Failure) -> (Vec<Op>, Failure) {
        let key = failure.key(ops);
        let mut ops = ops.to_vec();
        let mut last = failure.clone();
        if let Failure::Op { index, .. } = failure {
            ops.truncate(index + 1);
        }
        let mut chunk = ops.len().div_ceil(2).max(1);
        let mut budget = 3000;
        loop {
            let mut removed = false;
            let mut i = 0;
            while i < ops.len() && budget > 0 {
                budget -= 1;
                let end = (i + chunk).min(ops.len());
                let trial: Vec<Op> = ops[..i].iter().chain(&ops[end..]).cloned().collect();
                match self.run(&trial, None, Some(&key)) {
                    Err(f) if f.key(&trial) == key => {
                        ops = trial;
                        if let Failure::Op { index, .. } = f {
                            ops.truncate(index + 1);
                        }
                        last = f;
                        removed = true;
                    }
                    _ => i += chunk,
                }
            }
            if budget == 0 || (chunk == 1 && !removed) {
                return (ops, last);
            }
            chunk = (chunk / 2).max(1);
        }
    }
}

fn report(h: &Harness, seed: u64, ops: &[Op], failure: &Failure) -> String {
    let name = h.candidate.name();
    let mut out = format!(
        "DIFFERENCE: seed {seed}, candidate {name}, {} ops\n{}\n",
        ops.len(),
        failure.describe(ops, name)
    );
    match h.run(ops, None, Some(&failure.key(ops))) {
        Ok(()) => {
            out += "\nthe difference did not reproduce on a fresh mount (flaky); not shrinking\n";
            return out;
        }
        Err(again) if again.key(ops) != failure.key(ops) => {
            out += &format!(
                "\non a fresh mount it failed differently:\n{}\n",
                again.describe(ops, name)
            );
        }
        Err(_) => {}
    }
    let (small, last) = h.shrink(ops, failure);
    out += &format!(
        "\nminimal reproduction ({} ops; the full sequence: FUZZ_SEED={seed} FUZZ_SEQUENCES=1 FUZZ_OPS={}):\n",
        small.len(),
        ops.len()
    );
    for (i, op) in small.iter().enumerate() {
        out += &format!("  {i:3}: {op}\n");
    }
    out += &format!("{}\n", last.describe(&small, name));
    out
}

/// A failing sequence found by a worker.
struct Found {
    seed: u64,
    ops: Vec<Op>,
    failure: Failure,
}

#[test]
fn write_semantics_match_kernel_overlayfs() {
    if !require_root_fuse(&["tar", "mount", "umount"]) {
        return;
    }
    let sequences = env_u64("FUZZ_SEQUENCES", 300);
    let count = env_u64("FUZZ_OPS", 60) as usize;
    let base = env_u64("FUZZ_SEED", 1);
    // Distinct kinds of difference to collect before stopping.
    let max_failures = env_u64("FUZZ_MAX_FAILURES", 1) as usize;
    let jobs = env_u64("FUZZ_JOBS", 2).max(1);
    let candidate = Candidate::from_env();
    let started = Instant::now();
    let h = Harness::new(candidate);
    let lowers_before: Vec<_> = h.lowers.iter().map(|l| ops::snapshot(l, h.recent)).collect();
    let pristine = h.pristine();
    assert!(pristine.len() > 40, "fixture tree is suspiciously small: {pristine:#?}");
    for hidden in HIDDEN {
        assert!(!pristine.contains_key(*hidden), "{hidden} is visible in the oracle");
    }
    let pool = initial_pool(&pristine);
    eprintln!(
        "differential: candidate {}, {sequences} sequences x {count} ops from seed {base}, {jobs} jobs",
        candidate.name()
    );

    // Run the sequences on `jobs` threads, each with its own mounts.
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let stats = Mutex::new(Stats::new());
    let found: Mutex<Vec<Found>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= sequences {
                        break;
                    }
                    let seed = base.wrapping_add(i);
                    let ops = ops::generate(seed, count, &pool);
                    let mut mine = Stats::new();
                    let result = h.run(&ops, Some(&mut mine), None);
                    for (kind, outcomes) in mine {
                        let mut stats = stats.lock().unwrap();
                        for (outcome, n) in outcomes {
                            *stats.entry(kind.clone()).or_default().entry(outcome).or_default() +=
                                n;
                        }
                    }
                    if let Err(failure) = result {
                        let mut found = found.lock().unwrap();
                        found.push(Found { seed, ops, failure });
                        let kinds: std::collections::BTreeSet<String> =
                            found.iter().map(|f| f.failure.key(&f.ops)).collect();
                        if kinds.len() >= max_failures {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    if (i + 1) % 50 == 0 {
                        eprintln!("  {} sequences, {:.1?}", i + 1, started.elapsed());
                    }
                }
            });
        }
    });
    let lowers_after: Vec<_> = h.lowers.iter().map(|l| ops::snapshot(l, h.recent)).collect();
    assert!(lowers_before == lowers_after, "a lower layer changed");
    eprintln!("outcomes per op (oracle):");
    for (kind, outcomes) in stats.into_inner().unwrap() {
        let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        eprintln!("  {kind:18} {}", parts.join(", "));
    }
    eprintln!("differential: sequences done in {:.1?}", started.elapsed());

    // Report and shrink one failure per kind, lowest seed first.
    let mut found = found.into_inner().unwrap();
    found.sort_by_key(|f| f.seed);
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for f in &found {
        let key = f.failure.key(&f.ops);
        if let Some(first) = kinds.get(&key) {
            eprintln!("seed {}: again {key} (as seed {first})", f.seed);
            continue;
        }
        kinds.insert(key, f.seed);
        eprintln!("{}", report(&h, f.seed, &f.ops, &f.failure));
        if kinds.len() >= max_failures {
            break;
        }
    }
    eprintln!("differential: done in {:.1?}", started.elapsed());
    assert!(
        kinds.is_empty(),
        "{} kind(s) of difference, see above (first seen: {})",
        kinds.len(),
        kinds.keys().cloned().collect::<Vec<_>>().join("; ")
    );
}
