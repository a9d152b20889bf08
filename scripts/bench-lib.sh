# Shared by the scripts/bench-*.sh scripts; sourced, not run.
# The caller has `cd`ed to the repository root and set `set -euo pipefail`.

# Installs what the benchmarks use, builds rmount (or takes the binary at
# $RMOUNT_BIN), makes the scratch dir $WORK (removed on exit, after
# unmounting everything listed in MOUNTS).
bench_init() {
  scripts/setup.sh
  if [[ -n ${RMOUNT_BIN:-} ]]; then
    RMOUNT=$(realpath "$RMOUNT_BIN")
  else
    cargo build --release --locked
    RMOUNT=$PWD/target/release/rmount
  fi
  RUNS=${RUNS:-3}
  WORK=$(mktemp -d /tmp/rmount-bench.XXXXXX)
  MOUNTS=()
  ROWS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  local m state
  # Each store under $WORK has its own daemon (started by its first mount).
  while read -r state; do
    "$RMOUNT" --root "$(dirname "$state")" daemon stop 2>/dev/null || true
  done < <(find "$WORK" -maxdepth 4 -type d -name daemon -path '*/daemon' 2>/dev/null)
  for m in "${MOUNTS[@]}"; do
    mountpoint -q "$m" || continue
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  # Never rm -rf through a mount: it would reach into layers or an upper dir.
  if grep -q " $WORK/" /proc/self/mountinfo; then
    echo "bench: something under $WORK is still mounted; leaving it in place" >&2
  else
    rm -rf "$WORK"
  fi
}

DROP="sync; echo 3 > /proc/sys/vm/drop_caches"

# free_port: a free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry: Debian's docker-registry on a free loopback port, storing
# under $WORK/registry, kept for the whole run; sets $reg (HOST:PORT). The
# caller's EXIT trap calls stop_registry.
start_registry() {
  reg=127.0.0.1:$(free_port)
  cat > "$WORK/registry.yml" << YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $WORK/registry}, delete: {enabled: true}}
http: {addr: $reg}
YML
  docker-registry serve "$WORK/registry.yml" > "$WORK/registry.log" 2>&1 < /dev/null &
  echo $! > "$WORK/registry.pid"
  for _ in $(seq 100); do curl -s -o /dev/null "http://$reg/v2/" && break; sleep 0.05; done
}

stop_registry() { [[ -f $WORK/registry.pid ]] && kill "$(cat "$WORK/registry.pid")" 2> /dev/null || true; }

# median WORKLOAD-CMD [PREPARE-CMD] [WARMUP]: median seconds over $RUNS runs.
# Prints FAILED (and the command's last output lines on stderr, also kept in
# $WORK/failures) when the workload or the prepare command fails.
median() {
  local cmd=$1 prepare=${2:-true} warmup=${3:-1}
  rm -f "$WORK/h.json"
  if ! hyperfine --runs "$RUNS" --warmup "$warmup" --prepare "$prepare" --export-json "$WORK/h.json" \
    --show-output --shell=bash "$cmd" > "$WORK/h.out" 2>&1; then
    {
      echo "FAILED: $cmd"
      [[ $prepare == true ]] || echo "  (prepare: $prepare)"
      grep -v '^\s*$' "$WORK/h.out" | tail -8 | sed 's/^/  /'
    } | tee -a "$WORK/failures" >&2
    echo FAILED
    return 0
  fi
  python3 -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["results"][0]["median"])' "$WORK/h.json"
}

# calc PY-EXPR: evaluates a number (or prints "-" when an operand is not one).
calc() { python3 -c "print($1)" 2>/dev/null || echo "-"; }

# ratio A B: A/B with two decimals (one significant digit below 0.01).
ratio() { calc "(lambda v: '%.2f' % v if v >= 0.01 else '%.1g' % v)($1 / $2)"; }

row() { # name kernel fuse-overlayfs rmount [extra column]
  local ratio_k ratio_f line
  ratio_k=$(ratio "$4" "$2")
  ratio_f=$(ratio "$4" "$3")
  line="| $1 | $2 | $3 | $4 | ${ratio_k}× | ${ratio_f}× |"
  (($# < 5)) || line+=" $5 |"
  ROWS+=("$line")
  echo "$line"
}

# gib SECONDS: GB/s for 1 GiB moved in SECONDS.
gib() { calc "'%.2f' % (1.073741824 / $1)"; }

# rmount_load STATE LAYOUT TAG: loads the OCI layout into rmount's store at
# STATE; prints the reference to mount.
rmount_load() {
  "$RMOUNT" --root "$1" load -i "$2" | sed -n 's/^Loaded image: //p' | grep ":$3\$" | head -1
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

# write_section NAME [FILE]: replaces FILE's (default docs/benchmarks.md) part
# between `<!-- NAME -->` and `<!-- /NAME -->` with stdin, leaving the other
# scripts' sections alone; appends the section if it is not there yet.
write_section() {
  local name=$1 file=${2:-docs/benchmarks.md}
  cat > "$WORK/section.md"
  python3 - "$name" "$file" "$WORK/section.md" <<'PY'
import sys
name, path, body_path = sys.argv[1:]
begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
block = f"{begin}\n{open(body_path).read().strip()}\n{end}\n"
try:
    doc = open(path).read()
except FileNotFoundError:
    doc = "# Benchmarks\n"
i, j = doc.find(begin), doc.find(end)
if i >= 0 and j > i:
    rest = doc[j + len(end):].lstrip("\n")
    doc = doc[:i] + block + ("\n" + rest if rest else "")
else:
    doc = doc.rstrip("\n") + "\n\n" + block
open(path, "w").write(doc)
PY
  echo "written section $name of $file"
}
