#!/usr/bin/env bash
# Read-path benchmark, all in one run on the same layers: rmount (from the
# compressed blobs) vs kernel overlayfs and fuse-overlayfs (over the layers
# extracted to disk). Prints a table of medians and ratios and writes it to
# docs/benchmarks.md. Needs root. RUNS=N sets the repetitions (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked
RMOUNT=$PWD/target/release/rmount
RUNS=${RUNS:-3}
WORK=$(mktemp -d /tmp/rmount-bench.XXXXXX)
MOUNTS=()
cleanup() {
  for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
ROWS=()

DROP="sync; echo 3 > /proc/sys/vm/drop_caches"

# median WORKLOAD-CMD [PREPARE-CMD] [WARMUP]: median seconds over $RUNS runs.
median() {
  local cmd=$1 prepare=${2:-true} warmup=${3:-1}
  hyperfine --runs "$RUNS" --warmup "$warmup" --prepare "$prepare" --export-json "$WORK/h.json" \
    --shell=bash "$cmd" > /dev/null 2>&1
  python3 -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["results"][0]["median"])' "$WORK/h.json"
}

row() { # name kernel fuse-overlayfs rmount [unit]
  local ratio_k ratio_f
  ratio_k=$(python3 -c "print('%.2f' % ($4/$2))" 2>/dev/null || echo "-")
  ratio_f=$(python3 -c "print('%.2f' % ($4/$3))" 2>/dev/null || echo "-")
  ROWS+=("| $1 | $2 | $3 | $4 | ${ratio_k}× | ${ratio_f}× |")
  echo "${ROWS[-1]}"
}

# Extracts every layer of LAYOUT:TAG for overlayfs (whiteouts converted);
# prints the lowerdir option, top layer first.
extract_layers() {
  local layout=$1 tag=$2 out=$3 lowers=""
  local digests
  digests=$(python3 - "$layout" "$tag" <<'PY'
import json, sys
layout, tag = sys.argv[1:]
index = json.load(open(f"{layout}/index.json"))
desc = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
manifest = json.load(open(f"{layout}/blobs/sha256/{desc['digest'][7:]}"))
print("\n".join(l["digest"][7:] for l in manifest["layers"]))
PY
)
  local i=0
  for d in $digests; do
    local dir=$out/layer$i
    mkdir -p "$dir"
    tar -xf "$layout/blobs/sha256/$d" -C "$dir" --xattrs --xattrs-include='*' --numeric-owner -p
    find "$dir" -name '.wh..wh..opq' -print0 | while IFS= read -r -d '' f; do
      setfattr -n trusted.overlay.opaque -v y "$(dirname "$f")"; rm "$f"; done
    find "$dir" -name '.wh.*' -print0 | while IFS= read -r -d '' f; do
      local name; name=$(basename "$f"); rm "$f"; mknod "$(dirname "$f")/${name#.wh.}" c 0 0; done
    lowers="$dir${lowers:+:$lowers}"
    i=$((i + 1))
  done
  # overlayfs needs two lowerdirs without an upperdir: add an empty bottom one.
  mkdir -p "$out/empty"
  echo "$lowers:$out/empty"
}

bench_image() { # label layout tag has-big-file
  local label=$1 layout=$2 tag=$3 big=$4
  local dir=$WORK/$label K=$WORK/$label/kernel F=$WORK/$label/fuse R=$WORK/$label/rmount
  mkdir -p "$K" "$F" "$R"
  local lowers; lowers=$(extract_layers "$layout" "$tag" "$dir")
  mount -t overlay overlay -o "lowerdir=$lowers" "$K"; MOUNTS+=("$K")
  fuse-overlayfs -o "lowerdir=$lowers" "$F"; MOUNTS+=("$F")
  local state=$dir/state ref
  ref=$("$RMOUNT" --root "$state" load -i "$layout" | sed -n 's/^Loaded image: //p' | grep ":$tag\$" | head -1)
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
    local gib k f r
    k=$(median "cat $K/big.bin >/dev/null"); f=$(median "cat $F/big.bin >/dev/null"); r=$(median "cat $R/big.bin >/dev/null")
    gib() { python3 -c "print('%.2f' % (1.073741824 / $1))"; }
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
  ROWS+=("| rmount: RSS after reading every file (MiB) / persisted index (MiB) | | | $((rss / 1024)) / $((index_kib / 1024)) | budget 64 + 2×index = $((64 + 2 * index_kib / 1024)) | |")
  echo "${ROWS[-1]}"
  $umnt
}

bench_image synthetic "$(scripts/make-images.sh synthetic)" bench yes
bench_image debian "$(scripts/make-images.sh debian)" demo no

{
  echo "# Benchmarks"
  echo
  echo "Produced by \`scripts/bench-read.sh\` (RUNS=$RUNS, medians via hyperfine) on $(date -u +%Y-%m-%d),"
  echo "$(nproc) cores, kernel $(uname -r). All three mount the same layers in the same run:"
  echo "kernel overlayfs and fuse-overlayfs over the layers extracted to disk, rmount straight from"
  echo "the compressed blobs. Lower is better except where the unit is GB/s. \"Cold\" drops the page"
  echo "cache first; for rmount it also restarts the serving process (empty span cache)."
  printf '%s\n' "${ROWS[@]}"
} > docs/benchmarks.md
echo "written docs/benchmarks.md"
