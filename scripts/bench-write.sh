#!/usr/bin/env bash
# Write-path benchmark, all in one run on the same lower layer: rmount's
# writable mount (lower straight from the compressed blob, upper dir in kernel
# overlayfs format) vs kernel overlayfs (redirect_dir=on, metacopy=on) and
# fuse-overlayfs over the layer extracted to disk. Every run, warmup included,
# starts on a fresh mount with an empty upper dir: hyperfine's --prepare
# unmounts, wipes the upper and work dirs, syncs and mounts again (not timed).
# The page cache stays warm; rmount's serving process is a new one each run.
# Prints a table of medians, ratios and the issue's targets, and writes it to
# its own section of docs/benchmarks.md. Needs root. RUNS=N sets the
# repetitions (default 3). UPPER=tmpfs puts the upper and work dirs on a tmpfs
# instead of the disk under /tmp (and writes a section of its own): file
# creation on this VM's ext4 costs 0.3-0.7 ms of kernel time each, which
# floors all three small-file numbers and hides the FUSE overhead.
#
# The workloads are host programs (python3, tar, dd, chmod, mv) acting on
# paths under the mountpoints, not run in a chroot: that is safe only because
# the writebench image has no symlinks (checked below) and the workloads'
# other paths are new, so nothing can resolve out of the mount onto the host.
# Write to an image with symlinks only from inside it (docs: TESTBED.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
bench_init

layout=$(scripts/make-images.sh writebench)
lowers=$(extract_layers "$layout" write "$WORK/layers")
lower=$WORK/layers/layer0
if [[ -n $(find "$WORK/layers" -type l -print -quit) ]]; then
  echo "bench-write: the image has symlinks; its workloads would have to run in a chroot" >&2
  exit 1
fi
state=$WORK/state
ref=$(rmount_load "$state" "$layout" write)
mkdir -p "$WORK/ro"
"$RMOUNT" --root "$state" mount "$ref" "$WORK/ro" --read-only  # first mount builds the layer index
"$RMOUNT" --root "$state" umount "$WORK/ro"

SYSTEMS=(kernel fuse rmount)
for s in "${SYSTEMS[@]}"; do MOUNTS+=("$WORK/$s/mnt"); done
UP=$WORK
case ${UPPER:-disk} in
  disk) UPPER_DESC="the disk (ext4 under /tmp, like the lower)" SECTION=bench-write TITLE="upper on disk" ;;
  tmpfs)
    UP=$WORK/tmpfs; mkdir -p "$UP"
    mount -t tmpfs -o size=6g tmpfs "$UP"; MOUNTS+=("$UP")  # after the overlays: unmounted last
    UPPER_DESC="a tmpfs (UPPER=tmpfs)" SECTION=bench-write-tmpfs TITLE="upper on tmpfs" ;;
  *) echo "bench-write: UPPER must be disk or tmpfs" >&2; exit 2 ;;
esac
# $WORK/remount SYSTEM: (re)mounts $WORK/SYSTEM/mnt over the lower with an
# empty upper dir $UP/SYSTEM/upper (and work dir $UP/SYSTEM/work).
cat > "$WORK/remount" <<EOF
#!/usr/bin/env bash
set -euo pipefail
sys=\$1 m=$WORK/\$1/mnt u=$UP/\$1/upper w=$UP/\$1/work
if mountpoint -q "\$m"; then
  if [[ \$sys == rmount ]]; then "$RMOUNT" --root "$state" umount "\$m"; else umount "\$m"; fi
fi
rm -rf "\$u" "\$w"
mkdir -p "\$u" "\$w" "\$m"
sync
case \$sys in
  kernel) mount -t overlay overlay -o "lowerdir=$lowers,upperdir=\$u,workdir=\$w,redirect_dir=on,metacopy=on" "\$m" ;;
  fuse) # (without its "unknown argument ignored: lazytime" chatter)
    { fuse-overlayfs -o "lowerdir=$lowers,upperdir=\$u,workdir=\$w" "\$m" 2>&1 >&3 |
      { grep -v 'unknown argument ignored' || true; } >&2; } 3>&1 ;;
  rmount) "$RMOUNT" --root "$state" mount "$ref" "\$m" --upper "\$u" --work "\$w" ;;
esac
EOF
chmod +x "$WORK/remount"

# Inputs made once on the host: the small-file writer and a 10k-file tree.
cat > "$WORK/create.py" <<'PY'
import os, sys
root, data = sys.argv[1], b"x" * 4096
os.mkdir(root)
for d in range(100):
    os.mkdir(f"{root}/d{d:02}")
    for f in range(100):
        fd = os.open(f"{root}/d{d:02}/f{f:02}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
PY
python3 - "$WORK/tree10k" <<'PY'
import os, random, sys
root, rng = sys.argv[1], random.Random(3)
for d in range(100):
    os.makedirs(f"{root}/d{d:02}")
    for f in range(100):
        with open(f"{root}/d{d:02}/f{f:02}", "wb") as fh:
            fh.write(rng.randbytes(rng.randrange(0, 8192)))
PY
tar -cf "$WORK/tree10k.tar" -C "$WORK" tree10k
tar_mib=$(($(du -sk --apparent-size "$WORK/tree10k" | cut -f1) / 1024))

NOTES=()
note() { NOTES+=("- $*"); echo "  $*"; }
# measure CMD: median seconds of CMD (MNT stands for the mountpoint) on each
# system, each run on a fresh mount; prints "kernel fuse rmount".
measure() {
  local s out=()
  for s in "${SYSTEMS[@]}"; do out+=("$(median "${1//MNT/$WORK/$s/mnt}" "$WORK/remount $s" 1)"); done
  echo "${out[*]}"
}
# check DESCRIPTION CMD: runs CMD (MNT, UPPER, LOWER substituted) on each
# system's mount as the last measured run left it; notes the ones it fails on.
check() {
  local s bad=()
  for s in "${SYSTEMS[@]}"; do
    local c=${2//MNT/$WORK/$s/mnt}; c=${c//UPPER/$UP/$s/upper}; c=${c//LOWER/$lower}
    bash -c "$c" > /dev/null 2>&1 || bad+=("$s")
  done
  ((${#bad[@]} == 0)) || note "CHECK FAILED on ${bad[*]}: $1"
}
# upper_usage LABEL: the upper dirs' disk usage after the last run.
upper_usage() {
  local s u=()
  for s in "${SYSTEMS[@]}"; do u+=("$(du -sk "$UP/$s/upper" | cut -f1)"); done
  note "$1: upper dir after the run, KiB on disk: kernel ${u[0]}, fuse-overlayfs ${u[1]}, rmount ${u[2]}"
}
verdict() { # PY-CONDITION
  case $(calc "$1") in True) echo "met" ;; False) echo "**missed**" ;; *) echo "n/a" ;; esac
}

echo "## writebench: /big.bin 1 GiB, /dir5k 5,000 entries (one gzip layer); tar tree ${tar_mib} MiB; upper dirs on $UPPER_DESC"
ROWS+=("| workload | kernel overlayfs | fuse-overlayfs | rmount | rmount / kernel | rmount / fuse-overlayfs | target (from the issue) |"
  "| --- | --- | --- | --- | --- | --- | --- |")

read -r k f r < <(measure "python3 $WORK/create.py MNT/small")
row "create+write+close 10k 4 KiB files in 100 new dirs, python3 (s)" "$k" "$f" "$r" \
  "≤ 2× kernel and ≤ 0.5× fuse-overlayfs: $(verdict "$r <= 2 * $k and $r <= 0.5 * $f")"
check "10k files of 4 KiB" '[[ $(find MNT/small -type f -size 4k | wc -l) == 10000 ]]'
upper_usage "small files"

read -r k f r < <(measure "tar -xf $WORK/tree10k.tar -C MNT")
row "tar -x of a 10k-file tree, 100 dirs, $tar_mib MiB (s)" "$k" "$f" "$r" ""
check "extracted tree equals the source" "diff -r $WORK/tree10k MNT/tree10k"

read -r k f r < <(measure "printf x >> MNT/big.bin")
row "append 1 byte to the 1 GiB lower file: full copy-up (s)" "$k" "$f" "$r" \
  "≤ 1.5× kernel: $(verdict "$r <= 1.5 * $k")"
check "big.bin is the lower file plus 'x'" \
  '[[ $(stat -c %s MNT/big.bin) == 1073741825 && $(tail -c 1 MNT/big.bin) == x ]] && cmp -n 1073741824 MNT/big.bin LOWER/big.bin'
upper_usage "append (copy-up)"

read -r k f r < <(measure "chmod 600 MNT/big.bin")
ms() { calc "'%.1f' % ($1 * 1000)"; }
k=$(ms "$k") f=$(ms "$f") r=$(ms "$r")
row "chmod of the 1 GiB lower file: metadata only (ms)" "$k" "$f" "$r" "≤ 10 ms: $(verdict "$r <= 10")"
check "big.bin mode 600, size and content unchanged" \
  '[[ $(stat -c %a MNT/big.bin) == 600 && $(stat -c %s MNT/big.bin) == 1073741824 ]] && cmp <(head -c 1M MNT/big.bin) <(head -c 1M LOWER/big.bin)'
upper_usage "chmod (metacopy)"

read -r k f r < <(measure "dd if=/dev/zero of=MNT/new.bin bs=1M count=1024 conv=fsync status=none")
row "1 GiB sequential write to a new file, dd bs=1M conv=fsync (GB/s; ratio inverted)" \
  "$(gib "$k")" "$(gib "$f")" "$(gib "$r")" "≥ 0.5× kernel: $(verdict "$r <= 2 * $k")"
check "new.bin is 1 GiB" '[[ $(stat -c %s MNT/new.bin) == 1073741824 ]]'

read -r k f r < <(measure "mv MNT/dir5k MNT/dir5k.moved")
row "mv of a lower dir with 5,000 entries (/dir5k) (s)" "$k" "$f" "$r" ""
check "dir5k.moved has the 5,000 lower files, dir5k is gone" \
  '[[ ! -e MNT/dir5k && $(ls MNT/dir5k.moved | wc -l) == 5000 ]] && cmp MNT/dir5k.moved/f4999 LOWER/dir5k/f4999'
upper_usage "mv of dir5k"

for s in "${SYSTEMS[@]}"; do
  if [[ $s == rmount ]]; then "$RMOUNT" --root "$state" umount "$WORK/$s/mnt"; else umount "$WORK/$s/mnt"; fi
done
if [[ -s $WORK/failures ]]; then
  NOTES+=("- Failed measurements:")
  while IFS= read -r l; do NOTES+=("  $l"); done < "$WORK/failures"
fi

{
  echo "## Write path, $TITLE"
  echo
  echo "Produced by \`scripts/bench-write.sh\` (RUNS=$RUNS, medians via hyperfine) on $(date -u +%Y-%m-%d),"
  echo "$(nproc) cores, kernel $(uname -r). Lower: the \`writebench\` image (\`scripts/make-images.sh\`),"
  echo "one gzip layer with a 1 GiB \`/big.bin\` and \`/dir5k\` (5,000 small files). rmount mounts it"
  echo "writable straight from the compressed blob; kernel overlayfs (\`redirect_dir=on,metacopy=on\`)"
  echo "and fuse-overlayfs mount it extracted to disk. The upper dirs are on $UPPER_DESC. Each run,"
  echo "warmup included, gets a fresh mount with an empty upper dir (not timed); the page cache stays"
  echo "warm, rmount's serving process is new each run. Writes are not synced except by \`dd\`."
  echo "Lower is better except where the unit is GB/s."
  echo
  printf '%s\n' "${ROWS[@]}"
  if ((${#NOTES[@]})); then echo; printf '%s\n' "${NOTES[@]}"; fi
} | write_section "$SECTION"
