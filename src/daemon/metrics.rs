//! Prometheus text exposition of the daemon's per-mount metrics.
