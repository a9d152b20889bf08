#!/usr/bin/env bash
# Read-path benchmark, all in one run on the same layers: rmount (from the
# compressed blobs) vs kernel overlayfs and fuse-overlayfs (over the layers
# extracted to disk). Prints a table of medians and ratios and writes it to
# its own section of docs/benchmarks.md. Needs root. RUNS=N sets the repetitions (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/bench-lib.sh
bench_init

bench_image() { # label layout tag has-big-file
  local label=$1 layout=$2 tag=$3 big=$4
  local dir=$WORK/$label K=$WORK/$label/kernel F=$WORK/$label/fuse R=$WORK/$label/rmount
  mkdir -p "$K" "$F" "$R"
  local lowers; lowers=$(extract_layers "$layout" "$tag" "$dir")
  mount -t overlay overlay -o "lowerdir=$lowers" "$K"; MOUNTS+=("$K")
  fuse-overlayfs -o "lowerdir=$lowers" "$F"; MOUNTS+=("$F")
  local state=$dir/state ref
  ref=$(rmount_load "$state" "$layout" "$tag")
  "$RMOUNT" --root "$state" mount "$ref" "$R" --read-only  # first mount builds the layer indexes
  "$RMOUNT" --root "$state" umount "$R"
  local mnt="$RMOUNT --root $state mount $ref $R --read-only"
  local umnt="$RMOUNT --root $state umount $R"
  $mnt; MOUNTS+=("$R")
  echo "## $label ($(find "$K" | wc -l) entries)"
  ROWS+=("" "### $label" "" "| workload | kernel overlayfs | fuse-overlayfs | rmount | rmount / kernel | rmount / fuse-overlayfs |" "| --- | --- | --- | --- | --- | --- |")
  row "find, warm (s)" "$(median "find $K >/dev/null")" "$(median "find $F >/dev/null")" "$(median "find $R >/dev/null")"
  row "ls -lR, warm (s)" "$(median "ls -lR $K >/dev/null")" "$(median "ls -lR $F >/dev/null")" "$(median "ls -lR $R >/dev/null")"
  row "ls -lR, cold (s)" "$(median "ls -lR $K >/dev/null" "$DROP" 0)" "$(median "ls -lR $F >/dev/null" "$DROP" 0)" "$(median "ls -lR $R >/dev/null" "$DROP" 0)"
  local readall="find MNT -type f -print0 | xargs -0 cat >/dev/null"
  row "read every file, warm (s)" "$(median "${readall//MNT/$K}")" "$(median "${readall//MNT/$F}")" "$(median "${readall//MNT/$R}")"
  # Cold for rmount also means a fresh process: no decompressed spans in memory.
  row "read every file, cold (s)" "$(median "${readall//MNT/$K}" "$DROP" 0)" "$(median "${readall//MNT/$F}" "$DROP" 0)" \
    "$(median "${readall//MNT/$R}" "$umnt; $DROP; $mnt" 0)"
  if [[ $big == yes ]]; then
    local k f r
    k=$(median "cat $K/big.bin >/dev/null"); f=$(median "cat $F/big.bin >/dev/null"); r=$(median "cat $R/big.bin >/dev/null")
    row "1 GiB sequential read, warm (GB/s; ratio inverted)" "$(gib "$k")" "$(gib "$f")" "$(gib "$r")"
    k=$(median "cat $K/big.bin >/dev/null" "$DROP" 0); f=$(median "cat $F/big.bin >/dev/null" "$DROP" 0)
    r=$(median "cat $R/big.bin >/dev/null" "$umnt; $DROP; $mnt" 0)
    row "1 GiB sequential read, cold (s)" "$k" "$f" "$r"
  fi
  local mount_time
  mount_time=$(median "$mnt && stat $R >/dev/null" "$umnt" 1)
  ROWS+=("| rmount: mount, command start to first stat of / (s) | | | $mount_time | | |")
  echo "${ROWS[-1]}"
  bash -c "${readall//MNT/$R}"
  local pid rss index_kib
  pid=$(python3 -c 'import json,glob,sys; print(json.load(open(glob.glob(sys.argv[1]+"/mounts/*.json")[0]))["pid"])' "$state")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  index_kib=$(du -sk "$state/indexes" | cut -f1)
  ROWS+=("| rmount: RSS after reading every file, default --cache-mem 256 (MiB) / persisted index (MiB) | | | $((rss / 1024)) / $((index_kib / 1024)) | budget 64 + 2×index = $((64 + 2 * index_kib / 1024)) | |")
  echo "${ROWS[-1]}"
  $umnt
  # The span cache is bounded by --cache-mem; with a small one the rest of
  # the process (tree, indexes, buffers) shows.
  $mnt --cache-mem 16
  bash -c "${readall//MNT/$R}"
  pid=$(python3 -c 'import json,glob,sys; print(json.load(open(glob.glob(sys.argv[1]+"/mounts/*.json")[0]))["pid"])' "$state")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  ROWS+=("| rmount: same with --cache-mem 16 (MiB) | | | $((rss / 1024)) | budget 64 + 2×index = $((64 + 2 * index_kib / 1024)) | |")
  echo "${ROWS[-1]}"
  $umnt
}

bench_image synthetic "$(scripts/make-images.sh synthetic)" bench yes
bench_image debian "$(scripts/make-images.sh debian)" demo no

{
  echo "## Read path"
  echo
  echo "Produced by \`scripts/bench-read.sh\` (RUNS=$RUNS, medians via hyperfine) on $(date -u +%Y-%m-%d),"
  echo "$(nproc) cores, kernel $(uname -r). All three mount the same layers in the same run:"
  echo "kernel overlayfs and fuse-overlayfs over the layers extracted to disk, rmount straight from"
  echo "the compressed blobs. Lower is better except where the unit is GB/s. \"Cold\" drops the page"
  echo "cache first; for rmount it also restarts the serving process (empty span cache)."
  printf '%s\n' "${ROWS[@]}"
} | write_section bench-read
