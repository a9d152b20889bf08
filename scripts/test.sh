#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy and all tests (unit and
# integration with real FUSE and kernel overlayfs mounts; needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked -- --test-threads=2
