//! Per-mount FUSE operation counters and latency histograms.
//!
//! One [`FsMetrics`] per mount: for every [`Op`] a latency histogram with
//! fixed buckets ([`BUCKET_BOUNDS_NS`]) and the sum of the latencies.
//! Everything is a relaxed atomic add, so recording never takes a lock and
//! never allocates; `daemon::metrics` renders a [`FsMetrics::snapshot`] in
//! the Prometheus text format.
//!
//! The request wrapper (`fs::metered`) holds an `Option<Arc<FsMetrics>>`
//! and starts an [`OpTimer`] (which borrows it: no reference count per
//! request) around each handler call; the timer records
//! when dropped, as the handler returns. So the time recorded is the
//! handler's: a request answered later from a worker thread counts up to
//! its hand-off, not up to its reply. With `None` the timer is an empty
//! value (no clock read, no atomic), so a mount without metrics pays
//! nothing.
//!
//! There are no error counts: the reply goes from the filesystem straight
//! to the kernel, so the wrapper cannot see whether a request failed.
//!
//! Invariant: the number of operations of a kind is the sum of its bucket
//! counts; no separate counter exists, so a snapshot taken while requests
//! run still has `count` equal to the `+Inf` bucket. (`sum_ns` may be one
//! request ahead or behind of the buckets in such a snapshot.)
//!
//! Rejected: the `prometheus`/`metrics` crates (a registry, label hashing
//! and locks per observation, for a fixed set of 30 × 15 counters).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A kind of FUSE request, one label value of the op metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each variant is the FUSE request of the same name
pub enum Op {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Releasedir,
    Statfs,
    Getxattr,
    Listxattr,
    Setxattr,
    Removexattr,
    Access,
    Create,
    Fallocate,
    Lseek,
    /// Any request without a variant of its own (`forget`, `ioctl`, `poll`, …).
    Other,
}

impl Op {
    /// Number of variants.
    pub const COUNT: usize = 30;

    /// Every variant, in declaration order (`ALL[op as usize] == op`).
    pub const ALL: [Op; Op::COUNT] = [
        Op::Lookup,
        Op::Getattr,
        Op::Setattr,
        Op::Readlink,
        Op::Mknod,
        Op::Mkdir,
        Op::Unlink,
        Op::Rmdir,
        Op::Symlink,
        Op::Rename,
        Op::Link,
        Op::Open,
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Release,
        Op::Fsync,
        Op::Opendir,
        Op::Readdir,
        Op::Releasedir,
        Op::Statfs,
        Op::Getxattr,
        Op::Listxattr,
        Op::Setxattr,
        Op::Removexattr,
        Op::Access,
        Op::Create,
        Op::Fallocate,
        Op::Lseek,
        Op::Other,
    ];

    /// The lowercase name used as the `op` label (`"getattr"`).
    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readlink => "readlink",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Release => "release",
            Op::Fsync => "fsync",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Releasedir => "releasedir",
            Op::Statfs => "statfs",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Setxattr => "setxattr",
            Op::Removexattr => "removexattr",
            Op::Access => "access",
            Op::Create => "create",
            Op::Fallocate => "fallocate",
            Op::Lseek => "lseek",
            Op::Other => "other",
        }
    }
}

/// Upper bounds (inclusive, nanoseconds) of the finite latency buckets:
/// 10µs … 1s. A last, implicit bucket (`+Inf`) takes everything slower.
pub const BUCKET_BOUNDS_NS: [u64; 14] = [
    10_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// Number of buckets including `+Inf`.
pub const BUCKETS: usize = BUCKET_BOUNDS_NS.len() + 1;

/// The counters of one op kind. Aligned to a cache line so that threads
/// serving different kinds (reads vs lookups) do not bounce one line.
#[repr(align(64))]
#[derive(Default)]
struct OpCounters {
    /// Sum of the latencies, in nanoseconds.
    sum_ns: AtomicU64,
    /// Requests per bucket (not cumulative); their sum is the count.
    buckets: [AtomicU64; BUCKETS],
}

/// FUSE op counts and latency histograms of one mount.
pub struct FsMetrics {
    ops: [OpCounters; Op::COUNT],
}

impl Default for FsMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: u64 = self.snapshot().ops.iter().map(|o| o.count).sum();
        f.debug_struct("FsMetrics").field("ops", &total).finish_non_exhaustive()
    }
}

impl FsMetrics {
    /// All counters at zero.
    pub fn new() -> Self {
        Self { ops: std::array::from_fn(|_| OpCounters::default()) }
    }

    /// Records one `op` request that took `elapsed`.
    pub fn record(&self, op: Op, elapsed: Duration) {
        let counters = &self.ops[op as usize];
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKET_BOUNDS_NS.partition_point(|&bound| bound < ns);
        counters.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        counters.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The current values of every op kind (30 small structs, no locks).
    pub fn snapshot(&self) -> FsSnapshot {
        let ops = Op::ALL
            .iter()
            .map(|&op| {
                let counters = &self.ops[op as usize];
                let mut buckets = [0u64; BUCKETS];
                let mut running = 0u64;
                for (cumulative, bucket) in buckets.iter_mut().zip(&counters.buckets) {
                    running += bucket.load(Ordering::Relaxed);
                    *cumulative = running;
                }
                OpSnapshot {
                    op,
                    count: running,
                    sum_ns: counters.sum_ns.load(Ordering::Relaxed),
                    buckets,
                }
            })
            .collect();
        FsSnapshot { ops }
    }
}

/// The values of one [`FsMetrics`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsSnapshot {
    /// One entry per op kind, in [`Op::ALL`] order (including zero counts).
    pub ops: Vec<OpSnapshot>,
}

impl FsSnapshot {
    /// The values of `op`.
    pub fn get(&self, op: Op) -> &OpSnapshot {
        &self.ops[op as usize]
    }
}

/// The values of one op kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpSnapshot {
    /// Which op.
    pub op: Op,
    /// Requests recorded (equals `buckets[BUCKETS - 1]`).
    pub count: u64,
    /// Sum of their latencies in nanoseconds.
    pub sum_ns: u64,
    /// Cumulative bucket counts: `buckets[i]` requests took at most
    /// `BUCKET_BOUNDS_NS[i]`; the last entry is `+Inf`.
    pub buckets: [u64; BUCKETS],
}

/// Times one request from [`start`](Self::start) until it is dropped, and
/// records it then. Inert when made without metrics.
#[must_use = "a timer records when dropped; dropping it at once records ~0s"]
pub struct OpTimer<'a> {
    /// Where to record and when the request started; `None`: metrics are
    /// off and nothing is recorded.
    recording: Option<(&'a FsMetrics, Instant)>,
    op: Op,
}

impl std::fmt::Debug for OpTimer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpTimer")
            .field("op", &self.op)
            .field("enabled", &self.recording.is_some())
            .finish()
    }
}

impl<'a> OpTimer<'a> {
    /// A timer for `op` recording into `metrics`, or an inert one for
    /// `None` (no clock read). It borrows: a request's handler outlives it.
    pub fn start(metrics: Option<&'a FsMetrics>, op: Op) -> OpTimer<'a> {
        OpTimer { recording: metrics.map(|m| (m, Instant::now())), op }
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if let Some((metrics, started)) = self.recording {
            metrics.record(self.op, started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn all_is_in_declaration_order_and_names_are_unique() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        let mut names: Vec<_> = Op::ALL.iter().map(|o| o.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Op::COUNT);
        assert!(BUCKET_BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        let m = FsMetrics::new();
        m.record(Op::Read, Duration::ZERO);
        m.record(Op::Read, Duration::from_micros(10)); // on the bound: first bucket
        m.record(Op::Read, Duration::from_nanos(10_001)); // second
        m.record(Op::Read, Duration::from_secs(1)); // last finite
        m.record(Op::Read, Duration::from_secs(2)); // +Inf
        m.record(Op::Read, Duration::MAX); // saturates, +Inf
        let s = m.snapshot();
        let read = s.get(Op::Read);
        assert_eq!(read.count, 6);
        assert_eq!(read.buckets[0], 2);
        assert_eq!(read.buckets[1], 3);
        assert_eq!(read.buckets[BUCKETS - 3], 3);
        assert_eq!(read.buckets[BUCKETS - 2], 4);
        assert_eq!(read.buckets[BUCKETS - 1], 6);
        assert_eq!(s.get(Op::Write).count, 0);
    }

    #[test]
    fn timer_records_on_drop() {
        let m = Arc::new(FsMetrics::new());
        {
            let _t = OpTimer::start(Some(&*m), Op::Lookup);
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = OpTimer::start(Some(&*m), Op::Lookup);
        let timer = OpTimer::start(Some(&*m), Op::Getattr);
        std::thread::scope(|s| s.spawn(move || drop(timer)).join().unwrap());
        let s = m.snapshot();
        assert_eq!(s.get(Op::Lookup).count, 2);
        assert!(s.get(Op::Lookup).sum_ns >= 2_000_000, "{}", s.get(Op::Lookup).sum_ns);
        assert_eq!(s.get(Op::Getattr).count, 1);
        assert_eq!(Arc::strong_count(&m), 1, "timers release their reference");
    }

    #[test]
    fn timer_without_metrics_is_inert() {
        let t = OpTimer::start(None, Op::Read);
        assert!(t.recording.is_none());
        drop(t);
    }

    #[test]
    fn concurrent_records_add_up() {
        let m = Arc::new(FsMetrics::new());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for j in 0..1000u64 {
                        m.record(Op::Read, Duration::from_micros(j * (i + 1)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let read = m.snapshot().get(Op::Read).clone();
        assert_eq!(read.count, 4000);
        assert!(read.buckets.windows(2).all(|w| w[0] <= w[1]));
        let expected_sum: u64 = (1..=4u64).map(|i| (0..1000u64).sum::<u64>() * i * 1000).sum();
        assert_eq!(read.sum_ns, expected_sum);
    }
}
