#!/usr/bin/env bash
# containerd benchmark (issue 8): pull + run of a workload in a `ctr run`
# container, from a cold cache, with containerd's built-in overlayfs
# snapshotter (full pull) vs rmount's proxy snapshotter (lazy remote
# snapshots), same run, for the two Debian images scripts/make-images.sh
# builds: debian-python (python3 imports) and debian-nginx (time to nginx's
# first HTTP answer). All from a loopback registry (Debian's docker-registry).
#   (a) overlayfs: `ctr image pull --plain-http --snapshotter overlayfs REF`
#       (layers downloaded into the content store and unpacked), then
#       `ctr run --snapshotter overlayfs`
#   (b) rmount lazy: `ctr-remote image rpull --plain-http REF` (manifest and
#       config only; rmount's snapshotter mounts each layer lazily from the
#       registry, through the image's rmount index artifact), then
#       `ctr run --snapshotter stargz`. ctr-remote hardcodes the snapshotter
#       name `stargz`, so the private containerd config registers rmount's
#       snapshotter socket under both `rmount` and `stargz`
#   (c) when the binary has it: `rmount containerd pull --address SOCK
#       --namespace NS --snapshotter rmount REF` (the flags its --help
#       names), then `ctr run --snapshotter rmount`
# Workloads: python, `ctr run --rm … python3 -c 'import json, asyncio,
# email, http.server, sqlite3'` (bench-lazy.sh's); nginx, `ctr run -d …`
# nginx (foreground, 127.0.0.1:80 in the container's network namespace),
# then `nsenter -t PID -n curl http://127.0.0.1/` every 10 ms until it
# answers; the task is killed and deleted after the timer stops.
# Every run is cold and has its own environment, set up untimed: containerd
# stopped (tasks killed, shims gone, mounts undone) and the rmount daemon
# stopped, their roots removed (content, snapshots, metadata, rmount's store,
# index and chunk caches), page cache dropped, then a new rmount daemon and a
# new containerd (private config, root, state, socket) started. The timer
# runs from the start of the pull command to the workload's end. The
# variants alternate within each repetition.
# Prints a table of medians and writes it to its own section of
# docs/benchmarks.md. Needs root. RUNS=N sets the repetitions (default 3);
# RMOUNT_BIN=PATH benchmarks that binary instead of a fresh release build;
# IMAGES="debian-nginx" picks the images (default: both).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
bench_init
for tool in containerd ctr ctr-remote runc nsenter curl docker-registry skopeo; do
  command -v "$tool" > /dev/null || { echo "bench-containerd: $tool is missing" >&2; exit 1; }
done

NS=bench
R=$WORK/rmount   # the rmount daemon's root, new every run
CD=$WORK/ctrd    # containerd's config, root, state, socket, log; new every run
SOCK=$CD/containerd.sock
RUN_OPTS=(--runc-root="$WORK/runc" --fifo-dir="$WORK/fifo" --cgroup=) # runc state and fifos kept off the host
ctr_() { timeout 120 ctr --address "$SOCK" -n "$NS" "$@"; }
export RMOUNT_HOSTS_DIR=$WORK/hosts.d # no mirrors from the host
mkdir -p "$RMOUNT_HOSTS_DIR"

start_registry # kept for the whole run

# unmount_under DIR: unmounts everything mounted under DIR, deepest first.
unmount_under() {
  local m
  python3 - "$1" << 'PY' | while IFS= read -r m; do umount "$m" 2> /dev/null || umount -l "$m" 2> /dev/null || true; done
import sys
root = sys.argv[1].rstrip("/") + "/"
points = set()
for line in open("/proc/self/mountinfo"):
    p = line.split()[4].encode().decode("unicode_escape")
    if p.startswith(root):
        points.add(p)
for p in sorted(points, key=lambda p: -p.count("/")):
    print(p)
PY
}

# kill_shims: SIGKILL to the shims of our containerd (by its socket) and
# to what they run; removes their sockets from /run/containerd/s.
kill_shims() {
  python3 - "$SOCK" << 'PY'
import hashlib, os, signal, sys
sock = sys.argv[1]
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
def args(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return []
def ppid(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
for pid in pids:
    a = args(pid)
    if not a or "containerd-shim" not in a[0]:
        continue
    flag = lambda n: a[a.index(n) + 1] if n in a and a.index(n) + 1 < len(a) else None
    if flag("-address") != sock:
        continue
    for child in (p for p in pids if ppid(p) == pid):
        try: os.kill(child, signal.SIGKILL)
        except OSError: pass
    try: os.kill(pid, signal.SIGKILL)
    except OSError: pass
    if flag("-namespace") and flag("-id"):
        h = hashlib.sha256(f"{sock}/{flag('-namespace')}/{flag('-id')}".encode()).hexdigest()
        try: os.remove(f"/run/containerd/s/{h}")
        except OSError: pass
PY
}

# teardown: kills our tasks, stops containerd and the rmount daemon, undoes
# their mounts and removes their roots.
teardown() {
  local pid id i
  if [[ -f $CD/containerd.pid ]]; then
    pid=$(cat "$CD/containerd.pid")
    if kill -0 "$pid" 2> /dev/null; then
      for id in $(ctr_ task ls -q 2> /dev/null); do
        ctr_ task kill -s SIGKILL "$id" > /dev/null 2>&1 || true
        for i in $(seq 100); do ctr_ task rm "$id" > /dev/null 2>&1 && break; sleep 0.05; done
        ctr_ container rm "$id" > /dev/null 2>&1 || true
      done
      kill -TERM "$pid" 2> /dev/null || true
      for i in $(seq 200); do kill -0 "$pid" 2> /dev/null || break; sleep 0.05; done
      kill -KILL "$pid" 2> /dev/null || true
    fi
    rm -f "$CD/containerd.pid"
  fi
  kill_shims
  if [[ -d $R ]]; then "$RMOUNT" --root "$R" daemon stop > /dev/null 2>&1 || true; fi
  unmount_under "$CD"
  unmount_under "$WORK/runc"
  unmount_under "$R"
  if grep -qE " ($CD|$R)(/| )" /proc/self/mountinfo; then
    echo "bench-containerd: still mounted under $CD or $R; leaving them" >&2
    return 1
  fi
  rm -rf "$CD" "$R" "$WORK/runc" "$WORK/fifo"
}

# fresh_env: a cold start (see the header): returns once containerd answers
# with rmount's snapshotter registered.
fresh_env() {
  teardown
  sync
  echo 3 > /proc/sys/vm/drop_caches
  "$RMOUNT" --root "$R" daemon > "$WORK/daemon-start.out" 2>&1 || { cat "$WORK/daemon-start.out" >&2; return 1; }
  local snap
  snap=$("$RMOUNT" --root "$R" daemon status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshotterSocket"])')
  for _ in $(seq 100); do [[ -S $snap ]] && break; sleep 0.05; done
  mkdir -p "$CD"
  cat > "$CD/config.toml" << EOF
version = 2
root = "$CD/root"
state = "$CD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing", "io.containerd.internal.v1.opt"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[proxy_plugins.rmount]
  type = "snapshot"
  address = "$snap"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "$snap"
EOF
  containerd --config "$CD/config.toml" > "$CD/containerd.log" 2>&1 < /dev/null &
  echo $! > "$CD/containerd.pid"
  for _ in $(seq 200); do
    ctr --address "$SOCK" version > /dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "bench-containerd: containerd did not answer" >&2
  tail -20 "$CD/containerd.log" >&2
  return 1
}

trap 'teardown || true; stop_registry; bench_cleanup' EXIT

# rmount containerd pull, if this rmount has it (row (c)): its flags as
# its --help names them.
HAVE_RPULL=no
if "$RMOUNT" containerd pull --help > "$WORK/rpull-help" 2>&1; then
  HAVE_RPULL=yes
fi
rmount_pull() {
  local args=(containerd pull)
  grep -q -- '--address' "$WORK/rpull-help" && args+=(--address "$SOCK")
  grep -q -- '--namespace' "$WORK/rpull-help" && args+=(--namespace "$NS")
  grep -q -- '--plain-http' "$WORK/rpull-help" && args+=(--plain-http)
  grep -q -- '--snapshotter' "$WORK/rpull-help" && args+=(--snapshotter rmount)
  "$RMOUNT" --root "$R" "${args[@]}" "$1"
}

VARIANTS=(overlayfs lazy)
if [[ $HAVE_RPULL == yes ]]; then VARIANTS+=(rmountpull); fi

# pull VARIANT REF
pull() {
  case $1 in
    overlayfs) ctr_ image pull --plain-http --snapshotter overlayfs "$2" > /dev/null ;;
    lazy) timeout 120 ctr-remote --address "$SOCK" -n "$NS" image rpull --plain-http "$2" > /dev/null ;;
    rmountpull) rmount_pull "$2" > /dev/null ;;
  esac
}
snapshotter() { case $1 in overlayfs) echo overlayfs ;; lazy) echo stargz ;; rmountpull) echo rmount ;; esac; }

# fetched_bytes: compressed bytes rmount fetched over all its mounts (each
# layer counted once) and the compressed size of those layers: "FETCHED SIZE".
fetched_bytes() {
  local m
  for m in $("$RMOUNT" --root "$R" ps --json | python3 -c 'import json,sys; print("\n".join(x["mountpoint"] for x in json.load(sys.stdin)))'); do
    "$RMOUNT" --root "$R" stats "$m" --json
    echo
  done | python3 -c '
import json, sys
dec, text, layers = json.JSONDecoder(), sys.stdin.read(), {}
i = 0
while True:
    while i < len(text) and text[i].isspace(): i += 1
    if i >= len(text): break
    obj, i = dec.raw_decode(text, i)
    for l in obj.get("layers", []):
        f, s = layers.get(l["digest"], (0, 0))
        layers[l["digest"]] = (max(f, l["fetchedBytes"]), max(s, l["size"]))
print(sum(f for f, _ in layers.values()), sum(s for _, s in layers.values()))'
}

NGINX_CONF='pid /tmp/bench-nginx/nginx.pid; error_log stderr error; worker_processes 1; daemon off;
events { worker_connections 64; }
http { access_log off; include /etc/nginx/mime.types;
  client_body_temp_path /tmp/bench-nginx/body; proxy_temp_path /tmp/bench-nginx/proxy;
  fastcgi_temp_path /tmp/bench-nginx/fastcgi; uwsgi_temp_path /tmp/bench-nginx/uwsgi;
  scgi_temp_path /tmp/bench-nginx/scgi;
  server { listen 127.0.0.1:80; root /usr/share/nginx/html; } }'

now() { echo "$EPOCHREALTIME"; }
sub() { calc "'%.4f' % ($1 - $2)"; }

# one_run VARIANT KIND REF ID: a cold run; prints "TOTAL PULL RUN FETCHED SIZE"
# (seconds; bytes, "-" for overlayfs), or returns 1.
one_run() {
  local variant=$1 kind=$2 ref=$3 id=$4 snap t0 t1 t2 pid i ok=1 fetched="- -"
  fresh_env || return 1
  snap=$(snapshotter "$variant")
  t0=$(now)
  pull "$variant" "$ref" || return 1
  t1=$(now)
  case $kind in
    python)
      ctr_ run --rm --snapshotter "$snap" "${RUN_OPTS[@]}" "$ref" "$id" \
        /usr/bin/python3 -c 'import json, asyncio, email, http.server, sqlite3' < /dev/null || return 1
      t2=$(now)
      ;;
    nginx)
      ctr_ run -d --snapshotter "$snap" "${RUN_OPTS[@]}" "$ref" "$id" /bin/sh -c \
        'mkdir -p /tmp/bench-nginx && printf "%s\n" "$1" > /tmp/bench-nginx/nginx.conf && exec nginx -c /tmp/bench-nginx/nginx.conf' \
        sh "$NGINX_CONF" < /dev/null > /dev/null || return 1
      pid=$(ctr_ task ls | awk -v id="$id" '$1 == id { print $2 }')
      [[ -n $pid ]] || return 1
      for i in $(seq 3000); do
        if nsenter -t "$pid" -n curl -sf -o /dev/null http://127.0.0.1/; then ok=0 && break; fi
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.01
      done
      t2=$(now)
      ((ok == 0)) || return 1
      ;;
  esac
  if [[ $variant != overlayfs ]]; then fetched=$(fetched_bytes) || fetched="- -"; fi
  if [[ $kind == nginx ]]; then
    ctr_ task kill -s SIGKILL "$id" > /dev/null 2>&1 || true
    for i in $(seq 100); do ctr_ task rm "$id" > /dev/null 2>&1 && break; sleep 0.05; done
    ctr_ container rm "$id" > /dev/null 2>&1 || true
  fi
  echo "RESULT $(sub "$t2" "$t0") $(sub "$t1" "$t0") $(sub "$t2" "$t1") $fetched"
}

# med FILE COLUMN: median of a column of numbers ("FAILED" when there are none).
med() {
  python3 - "$1" "$2" << 'PY'
import statistics, sys
vals = []
for line in open(sys.argv[1]):
    f = line.split()
    try:
        vals.append(float(f[int(sys.argv[2]) - 1]))
    except (IndexError, ValueError):
        pass
print("%.3f" % statistics.median(vals) if vals else "FAILED")
PY
}
spread_of() { # FILE: " (min–max)" of the totals
  python3 -c '
import sys
v = [float(l.split()[0]) for l in open(sys.argv[1]) if l.split() and l.split()[0] != "FAILED"]
print(" (%.2f–%.2f)" % (min(v), max(v)) if len(v) > 1 else "")' "$1"
}
mb() { calc "'%.1f' % ($1 / 1e6)"; }

VERDICTS=()
add_row() { local line="| $1 |" cell; shift; for cell in "$@"; do line+=" $cell |"; done; ROWS+=("$line"); echo "$line"; }

bench_image() { # NAME TAG KIND
  local name=$1 tag=$2 kind=$3 layout ref=$reg/$1:$2 S=$WORK/$1/store v run out
  mkdir -p "$WORK/$name"
  if ! layout=$(scripts/make-images.sh "$name"); then
    echo "FAILED: scripts/make-images.sh $name" | tee -a "$WORK/failures" >&2
    ROWS+=("" "### $name: FAILED (image build)")
    return
  fi
  # Publish (untimed): the image, and its rmount index artifact.
  skopeo copy -q --dest-tls-verify=false "oci:$layout:$tag" "docker://$ref" &&
    "$RMOUNT" --root "$S" pull -q "$ref" > /dev/null &&
    "$RMOUNT" --root "$S" index build "$ref" --push > /dev/null ||
    echo "FAILED: publishing $name (see above)" | tee -a "$WORK/failures" >&2
  "$RMOUNT" --root "$S" daemon stop > /dev/null 2>&1 || true
  rm -rf "$S"
  local mib
  mib=$(calc "'%.0f' % ($(du -sb "$layout/blobs" | cut -f1) / 1048576)")
  echo "## $name ($mib MiB compressed)"
  for v in "${VARIANTS[@]}"; do : > "$WORK/$name/$v.runs"; done
  for run in $(seq "$RUNS"); do
    for v in "${VARIANTS[@]}"; do
      if out=$(one_run "$v" "$kind" "$ref" "bench-$kind-$v-$run") && out=$(sed -n 's/^RESULT //p' <<< "$out") && [[ -n $out ]]; then
        echo "$name $v run $run: total pull run fetched size = $out"
        echo "$out" >> "$WORK/$name/$v.runs"
      else
        echo "FAILED" >> "$WORK/$name/$v.runs"
        {
          echo "FAILED: $name $v run $run"
          echo "  containerd.log tail:"
          tail -8 "$CD/containerd.log" 2> /dev/null | cut -c1-400 | sed 's/^/    /'
          echo "  rmount daemon.log tail:"
          tail -8 "$R/daemon/daemon.log" 2> /dev/null | cut -c1-400 | sed 's/^/    /'
        } | tee -a "$WORK/failures" >&2
      fi
    done
  done
  local o=$WORK/$name/overlayfs.runs l=$WORK/$name/lazy.runs c=$WORK/$name/rmountpull.runs
  local head="| measurement | overlayfs: ctr image pull | rmount lazy: ctr-remote rpull (stargz name)"
  local sep="| --- | --- | ---"
  if [[ $HAVE_RPULL == yes ]]; then head+=" | rmount lazy: rmount containerd pull" && sep+=" | ---"; fi
  if [[ $HAVE_RPULL == yes ]]; then head+=" | rmount lazy / overlayfs (rpull / rmount containerd pull)"; else head+=" | rmount lazy / overlayfs"; fi
  head+=" | target |"
  sep+=" | --- | --- |"
  ROWS+=("" "### $name ($mib MiB compressed)" "" "$head" "$sep")
  local what="python3 imports done"
  if [[ $kind == nginx ]]; then what="nginx's first HTTP answer"; fi
  local cells=() extra=() col label r
  for col in 1 2 3; do
    case $col in
      1) label="pull + run to $what, cold (s)" ;;
      2) label="of which the pull command (s)" ;;
      3) label="of which \`ctr run\` to $what (s)" ;;
    esac
    cells=("$(med "$o" "$col")" "$(med "$l" "$col")")
    if [[ $col == 1 ]]; then cells=("${cells[0]}$(spread_of "$o")" "${cells[1]}$(spread_of "$l")"); fi
    r="$(ratio "$(med "$l" "$col")" "$(med "$o" "$col")")×"
    if [[ $HAVE_RPULL == yes ]]; then
      cells+=("$(med "$c" "$col")")
      if [[ $col == 1 ]]; then cells[2]+=$(spread_of "$c"); fi
      r+=" / $(ratio "$(med "$c" "$col")" "$(med "$o" "$col")")×"
    fi
    if [[ $col == 1 ]]; then
      add_row "$label" "${cells[@]}" "$r" "≤ 0.3×"
      VERDICTS+=("$name, ctr-remote rpull: $(ratio "$(med "$l" 1)" "$(med "$o" 1)")× of overlayfs (≤ 0.3×) $(calc "'met' if $(med "$l" 1) <= 0.3 * $(med "$o" 1) else 'missed'")")
      if [[ $HAVE_RPULL == yes ]]; then VERDICTS+=("$name, rmount containerd pull: $(ratio "$(med "$c" 1)" "$(med "$o" 1)")× of overlayfs (≤ 0.3×) $(calc "'met' if $(med "$c" 1) <= 0.3 * $(med "$o" 1) else 'missed'")"); fi
    else
      add_row "$label" "${cells[@]}" "$r" ""
    fi
  done
  cells=("" "$(mb "$(med "$l" 4)") / $(mb "$(med "$l" 5)")")
  if [[ $HAVE_RPULL == yes ]]; then cells+=("$(mb "$(med "$c" 4)") / $(mb "$(med "$c" 5)")"); fi
  add_row "rmount: fetched / compressed layers (MB)" "${cells[@]}" "$(ratio "$(med "$l" 4)" "$(med "$l" 5)")× fetched" ""
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for name in ${IMAGES:-debian-python debian-nginx}; do
  bench_image "$name" "${name#debian-}" "${name#debian-}"
done

{
  echo "## containerd snapshotters (\`scripts/bench-containerd.sh\`)"
  echo
  echo "From a loopback registry (Debian's \`docker-registry\` 2.8), containerd $(containerd --version | awk '{print $3}') with a"
  echo "private config, medians of $RUNS runs (the first row also gives the fastest and slowest run)."
  echo "Every run is cold and gets its own environment, set up untimed: containerd and the rmount"
  echo "daemon stopped and their roots removed (image, content, snapshots, rmount's store and"
  echo "caches), page cache dropped, then a new rmount daemon and a new containerd started (both"
  echo "running before the timer starts; the rmount daemon idles in the overlayfs runs). Timed: from"
  echo "the start of the pull command to the workload's end; the variants alternate within each repetition."
  echo "*overlayfs*: \`ctr image pull --plain-http --snapshotter overlayfs REF\` (every layer"
  echo "downloaded and unpacked), then \`ctr run --snapshotter overlayfs\`. *rmount lazy*:"
  echo "\`ctr-remote image rpull --plain-http REF\` (stargz-snapshotter's client; it hardcodes the"
  echo "snapshotter name \`stargz\`, so the config registers rmount's snapshotter socket as both"
  echo "\`[proxy_plugins.rmount]\` and \`[proxy_plugins.stargz]\`), then \`ctr run --snapshotter stargz\`;"
  echo "the image has an rmount index artifact in the registry (\`rmount index build --push\`), so"
  echo "rmount mounts each layer lazily and containerd neither downloads nor unpacks it."
  if [[ $HAVE_RPULL == yes ]]; then
    echo "*rmount containerd pull*: \`rmount containerd pull REF\`, then \`ctr run --snapshotter rmount\`."
  fi
  echo "Workloads: python, \`ctr run --rm … python3 -c 'import json, asyncio, email, http.server, sqlite3'\`;"
  echo "nginx, \`ctr run -d …\` nginx in the foreground on 127.0.0.1:80 of the container's network"
  echo "namespace, polled every 10 ms with \`nsenter -t PID -n curl http://127.0.0.1/\` until it"
  echo "answers (the task is killed and removed after the timer stops). The \"of which\" rows are"
  echo "medians of their own, so they need not add up to the first row. Fetched: \`rmount stats\`"
  echo "fetchedBytes (compressed bytes from the registry), each layer counted once over the layer"
  echo "mounts, at the workload's end. Target (issue 8): ≤ 0.3× the overlayfs time."
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Against the target in this run:"
  echo
  printf -- '- %s\n' "${VERDICTS[@]}"
  echo
  if [[ -s $WORK/failures ]]; then
    echo "FAILED runs: see the run's output (\`$(grep -c '^FAILED' "$WORK/failures")\` failures)."
    echo
  fi
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, kernel $(uname -r)${RMOUNT_BIN:+, with the binary $RMOUNT_BIN (RMOUNT_BIN; not built by the script)};"
  echo "load average (1, 5, 15 min) $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
} | write_section bench-containerd
