#!/usr/bin/env bash
# Runs the differential test of write semantics (tests/differential.rs: the
# same random op sequences on kernel overlayfs and on the candidate) for longer
# than `cargo test` does, and prints the failing seed and the minimal
# reproduction. Needs root and /dev/fuse.
#
# Usage: scripts/fuzz-ops.sh [--long N] [--seed S] [--ops N]
#                            [--candidate overlay|rmount] [--max-failures N]
#                            [--ignore-mtime]
#   --long N          run N sequences (default 3000)
#   --seed S          seed of the first sequence (default: random); sequence i
#                     uses S+i, so a failure prints the one seed to rerun
#   --ops N           ops per sequence (default 60)
#   --candidate C     overlay (a second kernel overlayfs: must show nothing)
#                     or rmount; default: the test's DEFAULT_CANDIDATE
#   --max-failures N  keep going until N distinct kinds of difference (default 1)
#   --ignore-mtime    show every mtime as `recent` (look past mtime differences)
set -euo pipefail
cd "$(dirname "$0")/.."

sequences=3000
seed=""
ops=60
max_failures=1
while (($#)); do
  case "$1" in
    --long) sequences=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --candidate) export RMOUNT_DIFF_CANDIDATE=$2; shift 2 ;;
    --max-failures) max_failures=$2; shift 2 ;;
    --ignore-mtime) export FUZZ_IGNORE_MTIME=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz-ops: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
[[ -n $seed ]] || seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')

[[ $(id -u) -eq 0 ]] || { echo "fuzz-ops: needs root (mounts kernel overlayfs)" >&2; exit 1; }
modprobe overlay 2>/dev/null || true
modprobe fuse 2>/dev/null || true

echo "fuzz-ops: $sequences sequences x $ops ops from seed $seed" \
  "(candidate ${RMOUNT_DIFF_CANDIDATE:-default})"
log=$(mktemp -t fuzz-ops.XXXXXX.log)
start=$SECONDS
status=0
FUZZ_SEQUENCES=$sequences FUZZ_OPS=$ops FUZZ_SEED=$seed FUZZ_MAX_FAILURES=$max_failures \
  CI=true cargo test --test differential -- --nocapture --test-threads=1 2>&1 | tee "$log" \
  || status=$?
echo "fuzz-ops: $((SECONDS - start)) s, log in $log"
if ((status != 0)); then
  echo
  echo "fuzz-ops: FAILED. Failing seeds and minimal reproductions:"
  grep -E '^DIFFERENCE: seed' "$log" || true
  awk '/^minimal reproduction/{p=1} p&&/^$/{p=0; print ""} p' "$log"
  echo "rerun one sequence: FUZZ_SEED=<seed> FUZZ_SEQUENCES=1 FUZZ_OPS=$ops" \
    "cargo test --test differential -- --nocapture"
fi
exit "$status"
