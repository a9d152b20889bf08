//! Per-mount FUSE operation counters and latency histograms (filled in by
//! the observability work; see `daemon::metrics` for the exposition).
