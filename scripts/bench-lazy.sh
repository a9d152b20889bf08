#!/usr/bin/env bash
# Lazy-mount benchmark (issue 6), all in one run from a loopback registry
# (Debian's docker-registry), for the two Debian images scripts/make-images.sh
# builds: debian-python (python3) and debian-nginx (nginx). Every measurement
# is cold: page cache dropped, and an empty rmount root (no store, no index
# cache, no chunk cache) unless it measures the store.
#   (i)   mount usable: `rmount mount REF MNT` from command start until it
#         returns (it returns once the mount serves), with an rmount index
#         artifact in the registry, and without one (layers downloaded whole)
#   (ii)  startup workload from command start (python3 imports; nginx started
#         in a chroot, one HTTP answer on loopback, stopped) for a lazy mount,
#         `rmount pull` + mount, and `skopeo copy` + `umoci unpack` + chroot;
#         and the workload alone on a ready mount / unpacked rootfs. Also
#         "lazy + recorded prefetch": `rmount mount REF MNT --prefetch
#         recorded` + the workload, same boundaries as the lazy row. Its
#         list is prepared untimed: the workload recorded once on a lazy
#         mount (`--record LIST`), then `rmount index build --push
#         --prefetch-list LIST` into a second repository ($name-rec) holding
#         the same image, so the plain lazy runs (repository $name) never see
#         a list
#   (iii) bytes fetched (stats fetchedBytes: compressed bytes from the
#         registry) vs bytes the workload read (the sizes of the distinct
#         regular files it opened or executed inside the chroot, from strace),
#         for the plain lazy mount and for the recorded prefetch
#   (iv)  read every file (`tar -c /` in a chroot, piped to wc) lazily vs
#         from the store
# Prints a table of medians and writes it to its own section of
# docs/benchmarks.md. Needs root. RUNS=N sets the repetitions (default 3);
# RMOUNT_BIN=PATH benchmarks that binary instead of a fresh release build;
# IMAGES="debian-nginx" picks the images (default: both).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
bench_init
if ! command -v strace > /dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends strace > /dev/null ||
    { apt-get update > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends strace > /dev/null; } ||
    echo "bench-lazy: strace is missing; bytes read will show FAILED" >&2
fi

start_registry # kept for the whole run

export RMOUNT WORK
export RMOUNT_HOSTS_DIR=$WORK/hosts.d # no mirrors from the host
mkdir -p "$RMOUNT_HOSTS_DIR"
export NGINX_PORT
NGINX_PORT=$(free_port)
export TRACED=execve,open,openat,chroot
export NGINX_CONF="pid /tmp/bench-nginx/nginx.pid; error_log stderr error; worker_processes 1;
events { worker_connections 64; }
http { access_log off; include /etc/nginx/mime.types;
  client_body_temp_path /tmp/bench-nginx/body; proxy_temp_path /tmp/bench-nginx/proxy;
  fastcgi_temp_path /tmp/bench-nginx/fastcgi; uwsgi_temp_path /tmp/bench-nginx/uwsgi;
  scgi_temp_path /tmp/bench-nginx/scgi;
  server { listen 127.0.0.1:$NGINX_PORT; root /usr/share/nginx/html; } }"

# procs_in DIR: PIDs of the processes chrooted in DIR.
procs_in() {
  local p r
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2> /dev/null) || continue
    [[ $r == "$1" ]] && echo "${p#/proc/}"
  done
  return 0
}

# unmount MNT ROOT: stops what runs in MNT, unmounts it and drops its changes.
unmount() {
  local mnt=$1 root=$2 pids
  pids=$(procs_in "$mnt")
  [[ -z $pids ]] || kill -9 $pids 2> /dev/null || true
  mountpoint -q "$mnt" || return 0
  "$RMOUNT" --root "$root" umount --discard "$mnt" 2> /dev/null ||
    "$RMOUNT" --root "$root" umount "$mnt" 2> /dev/null || umount "$mnt" 2> /dev/null || umount -l "$mnt"
}

# reset MNT ROOT [DIR…]: unmount, then remove ROOT and the DIRs, drop caches.
reset() {
  local mnt=$1 root=$2
  shift 2
  unmount "$mnt" "$root"
  rm -rf "$root" "$@"
  sync
  echo 3 > /proc/sys/vm/drop_caches
}

# cold_mount MNT ROOT REF [OPTS…]: unmount MNT, drop caches, mount REF from ROOT (kept).
cold_mount() {
  local mnt=$1 root=$2 ref=$3
  shift 3
  unmount "$mnt" "$root"
  sync
  echo 3 > /proc/sys/vm/drop_caches
  "$RMOUNT" --root "$root" mount "$ref" "$mnt" "$@" > /dev/null
}

wl_python() { chroot "$1" python3 -c 'import json, asyncio, email, http.server, sqlite3'; }

# wl_nginx ROOTFS [STRACE-OUT]: starts nginx chrooted in ROOTFS on a loopback
# port, waits for one answer to GET /, stops it and waits until it is gone.
wl_nginx() {
  local r=$1 trace=${2:-} ok=1 i tracer=
  local start=(chroot "$r" /bin/sh -c 'mkdir -p /tmp/bench-nginx && printf "%s\n" "$1" > /tmp/bench-nginx/nginx.conf && exec nginx -c /tmp/bench-nginx/nginx.conf' sh "$NGINX_CONF")
  if [[ -n $trace ]]; then
    strace -f -qq -s 4096 -o "$trace" -e trace="$TRACED" "${start[@]}" &
    tracer=$!
  else
    "${start[@]}" || return 1
  fi
  for i in $(seq 1000); do
    if curl -sf -o /dev/null "http://127.0.0.1:$NGINX_PORT/"; then ok=0 && break; fi
    sleep 0.01
  done
  chroot "$r" /bin/sh -c 'kill $(cat /tmp/bench-nginx/nginx.pid)' 2> /dev/null || true
  for i in $(seq 500); do [[ -z $(procs_in "$r") ]] && break; sleep 0.01; done
  [[ -z $tracer ]] || wait "$tracer" || ok=1
  return $ok
}

# wl_trace KIND ROOTFS OUT: the workload under strace (execve/open/openat/chroot, children followed).
wl_trace() {
  case $1 in
    python) strace -f -qq -s 4096 -o "$3" -e trace="$TRACED" \
      chroot "$2" python3 -c 'import json, asyncio, email, http.server, sqlite3' ;;
    nginx) wl_nginx "$2" "$3" ;;
  esac
}

readall() { chroot "$1" tar -C / --one-file-system -cf - . | wc -c; }

export -f procs_in unmount reset cold_mount wl_python wl_nginx readall

# bytes_read TRACE ROOTFS: total size of the distinct regular files that
# processes chrooted in ROOTFS opened or executed (successfully).
bytes_read() {
  python3 - "$1" "$2" << 'PY'
import os, re, stat, sys
trace, root = sys.argv[1:]
first = None          # the `chroot` process: outside until its chroot() returns 0
inside = set()
pending = {}          # pid -> path of an <unfinished ...> call
paths = set()
call = re.compile(r'(?:openat\([^,]+, |open\(|execve\()"((?:[^"\\]|\\.)*)"')
for line in open(trace, errors="replace"):
    m = re.match(r'(\d+)\s+(.*)', line)
    if not m:
        continue
    pid, rest = int(m[1]), m[2].rstrip()
    if first is None:
        first = pid
    if pid == first and pid not in inside:
        if rest.startswith("chroot(") and re.search(r"= 0$", rest):
            inside.add(pid)
        continue
    if rest.endswith("<unfinished ...>"):
        c = call.match(rest)
        if c:
            pending[pid] = c[1]
        continue
    if rest.startswith("<... "):
        path = pending.pop(pid, None)
    else:
        c = call.match(rest)
        path = c[1] if c else None
    if path is None:
        continue
    r = re.search(r"= (-?\d+)", rest)
    if r and int(r[1]) >= 0:
        paths.add(path)
# Undo strace's escapes before the chroot (codecs load lazily from the host).
paths = {p.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1") for p in paths}
os.chroot(root)
os.chdir("/")
seen, total = set(), 0
for p in paths:
    try:
        st = os.stat(p)
    except OSError:
        continue
    if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
        seen.add((st.st_dev, st.st_ino))
        total += st.st_size
print(total)
PY
}

# stat_field ROOT MNT FIELD: a number from `rmount stats --json`.
stat_field() {
  "$RMOUNT" --root "$1" stats "$2" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$3"
}

mb() { calc "'%.1f' % ($1 / 1e6)"; }

# spread: " (min–max)" of the runs of the latest median (its hyperfine JSON).
spread() {
  python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["results"][0]["times"]; print(" (%.2f–%.2f)" % (min(t), max(t)))' \
    "$WORK/h.json" 2> /dev/null || true
}

# settled_fetched ROOT MNT: fetchedBytes once it stops growing (a prefetch
# may still be fetching after the workload ends; stats refresh about once a
# second), at most ~15 s.
settled_fetched() {
  local last=-1 now i
  sleep 1.5
  for i in $(seq 12); do
    now=$(stat_field "$1" "$2" fetchedBytes) || return 1
    [[ $now == "$last" ]] && break
    last=$now
    sleep 1.2
  done
  echo "$now"
}

# verdict WHAT VALUE LIMIT UNIT: notes whether VALUE ≤ LIMIT, for the summary.
VERDICTS=()
NOTES=() # per image, what the (ii) and (iii) numbers come to
verdict() {
  local v
  v=$(calc "'met' if $2 <= $3 else 'missed'")
  [[ $v == - ]] && v="not measured"
  VERDICTS+=("$1: $2$4 (≤ $3$4) $v")
}

add_row() { # measurement lazy pull skopeo ratio target
  local line="| $1 | $2 | $3 | $4 | $5 | $6 |"
  ROWS+=("$line")
  echo "$line"
}

bench_image() { # NAME TAG KIND(python|nginx)
  local name=$1 tag=$2 kind=$3
  local D=$WORK/$name M=$WORK/$name/mnt R=$WORK/$name/lazy S=$WORK/$name/store
  mkdir -p "$D" "$M"
  MOUNTS+=("$M")
  local layout
  if ! layout=$(scripts/make-images.sh "$name"); then
    echo "FAILED: scripts/make-images.sh $name" | tee -a "$WORK/failures" >&2
    ROWS+=("" "### $name: FAILED (image build)")
    return
  fi
  local ref=$reg/$name:$tag plain=$reg/$name-noindex:$tag recref=$reg/$name-rec:$tag mib
  mib=$(calc "'%.0f' % ($(du -sb "$layout/blobs" | cut -f1) / 1048576)")
  # The workload needs a writable rootfs for nginx (logs, pid, temp dirs).
  local opts="--read-only" wl=wl_python
  [[ $kind == nginx ]] && opts="" wl=wl_nginx

  # Publish: the image three times (with an index artifact, without one, and
  # for the recorded prefetch: its artifact, with the list, comes later); the
  # store's copy (pulled, indexed, artifact pushed); an unpacked rootfs.
  local setup_ok=yes
  skopeo copy -q --dest-tls-verify=false "oci:$layout:$tag" "docker://$ref" || setup_ok=no
  skopeo copy -q --dest-tls-verify=false "oci:$layout:$tag" "docker://$plain" || setup_ok=no
  skopeo copy -q --dest-tls-verify=false "oci:$layout:$tag" "docker://$recref" || setup_ok=no
  "$RMOUNT" --root "$S" pull -q "$ref" > /dev/null || setup_ok=no
  "$RMOUNT" --root "$S" index build "$ref" --push > /dev/null || setup_ok=no
  skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$D/oci:$tag" || setup_ok=no
  umoci unpack --image "$D/oci:$tag" "$D/bundle" > /dev/null 2>&1 || setup_ok=no
  [[ $setup_ok == yes ]] || echo "FAILED: setup of $name (see above)" | tee -a "$WORK/failures" >&2
  local U=$D/bundle/rootfs
  echo "## $name ($mib MiB compressed)"
  ROWS+=("" "### $name ($mib MiB compressed)" ""
    "| measurement | lazy mount | rmount pull + mount | skopeo copy + umoci unpack | lazy / pull | target |"
    "| --- | --- | --- | --- | --- | --- |")

  # (i) mount usable.
  local t_i t_i_plain
  t_i=$(median "'$RMOUNT' --root '$R' mount '$ref' '$M' $opts > /dev/null" "reset '$M' '$R'" 0)
  t_i_plain=$(median "'$RMOUNT' --root '$R' mount '$plain' '$M' $opts > /dev/null" "reset '$M' '$R'" 0)
  add_row "(i) mount usable, index artifact (s)" "$t_i" "" "" "" "≤ 0.3 s"
  verdict "$name (i) mount usable" "$t_i" 0.3 " s"
  add_row "(i) mount usable, no index artifact: layers downloaded (s)" "$t_i_plain" "" "" "" ""

  # (ii) the workload from command start, and alone.
  local lazy pull sk lazy_sp pull_sp rec_sp=""
  lazy=$(median "'$RMOUNT' --root '$R' mount '$ref' '$M' $opts > /dev/null && $wl '$M'" "reset '$M' '$R'" 0)
  lazy_sp=$(spread)
  pull=$(median "'$RMOUNT' --root '$R' pull -q '$ref' > /dev/null && '$RMOUNT' --root '$R' mount '$ref' '$M' $opts > /dev/null && $wl '$M'" \
    "reset '$M' '$R'" 0)
  pull_sp=$(spread)
  sk=$(median "skopeo copy -q --src-tls-verify=false docker://$ref oci:$D/sk:$tag && umoci unpack --image $D/sk:$tag $D/skb > /dev/null 2>&1 && $wl $D/skb/rootfs" \
    "reset '$D/skb/rootfs' '$D/sk' '$D/skb'" 0)
  add_row "(ii) $kind workload done, from command start (s)" "$lazy$lazy_sp" "$pull$pull_sp" "$sk" "$(ratio "$lazy" "$pull")×" "≤ 0.3×"
  verdict "$name (ii) lazy" "$(ratio "$lazy" "$pull")" 0.3 "×"

  # (ii) lazy + recorded prefetch. Preparation, not timed: record the
  # workload on a lazy mount, publish the list with the indexes in $recref.
  local list=$D/prefetch-list.json nfiles=FAILED rec
  rm -f "$list"
  if reset "$M" "$R" && "$RMOUNT" --root "$R" mount "$ref" "$M" $opts --record "$list" > /dev/null &&
    $wl "$M" > /dev/null 2>&1 && unmount "$M" "$R" && [[ -s $list ]] &&
    "$RMOUNT" --root "$S" index build "$ref" --dest "$recref" --push --prefetch-list "$list" > "$D/index-build.out" 2>&1; then
    nfiles=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["files"]))' "$list")
    echo "recorded prefetch list of $name: $nfiles files, published in $recref"
    rec=$(median "'$RMOUNT' --root '$R' mount '$recref' '$M' $opts --prefetch recorded > /dev/null && $wl '$M'" "reset '$M' '$R'" 0)
    rec_sp=$(spread)
  else
    echo "FAILED: recording or publishing the prefetch list of $name" | tee -a "$WORK/failures" >&2
    tail -5 "$D/index-build.out" >&2 2> /dev/null || true
    rec=FAILED
  fi
  add_row "(ii) $kind workload done, lazy + recorded prefetch ($nfiles files), from command start (s)" \
    "$rec$rec_sp" "$pull$pull_sp" "$sk" "$(ratio "$rec" "$pull")×" "≤ 0.3×"
  verdict "$name (ii) lazy + recorded prefetch" "$(ratio "$rec" "$pull")" 0.3 "×"
  local lazy_ii=$lazy pull_ii=$pull floor
  lazy=$(median "$wl '$M'" "reset '$M' '$R' && '$RMOUNT' --root '$R' mount '$ref' '$M' $opts > /dev/null" 0)
  pull=$(median "$wl '$M'" "cold_mount '$M' '$S' '$ref' $opts" 0)
  sk=$(median "$wl '$U'" "unmount '$U' none; sync; echo 3 > /proc/sys/vm/drop_caches" 0)
  add_row "$kind workload alone, on a ready mount / rootfs, cold (s)" "$lazy" "$pull" "$sk" "$(ratio "$lazy" "$pull")×" ""
  floor=$(calc "'%.2f' % ($t_i + $pull)")
  NOTES+=("$name: the recorded prefetch takes (ii) from $lazy_ii s ($(ratio "$lazy_ii" "$pull_ii")×) to $rec s ($(ratio "$rec" "$pull_ii")×); the target, 0.3× of pull + mount, is $(calc "'%.2f' % (0.3 * $pull_ii)") s. For scale: making the lazy mount usable ((i)) plus the workload alone on a cold mount of the local store, where nothing is fetched at all, is $t_i + $pull = $floor s ($(ratio "$floor" "$pull_ii")×).")

  # (iii) fetched vs read, one run under strace, plain lazy and with the
  # recorded prefetch.
  local fetched read fetches variant label vref vopts lazy_fetched lazy_fetches
  for variant in lazy recorded; do
    fetched=FAILED read=FAILED fetches=FAILED
    case $variant in
      lazy) label="" vref=$ref vopts="" ;;
      recorded) label=", lazy + recorded prefetch" vref=$recref vopts="--prefetch recorded" ;;
    esac
    if reset "$M" "$R" && "$RMOUNT" --root "$R" mount "$vref" "$M" $opts $vopts > /dev/null &&
      wl_trace "$kind" "$M" "$D/trace" > "$D/trace.out" 2>&1; then
      fetched=$(settled_fetched "$R" "$M") || fetched=FAILED
      fetches=$(stat_field "$R" "$M" fetches) || fetches=FAILED
      read=$(bytes_read "$D/trace" "$M") || read=FAILED
      # The list must have come with the artifact, or the variant measured nothing new.
      if [[ $variant == recorded ]] && ! compgen -G "$R/indexes/prefetch/*.json" > /dev/null; then
        echo "FAILED: the lazy pull of $recref saved no prefetch list" | tee -a "$WORK/failures" >&2
        fetched=FAILED
      fi
    else
      echo "FAILED: traced $kind workload on a lazy mount of $vref" | tee -a "$WORK/failures" >&2
      tail -5 "$D/trace.out" >&2 || true
    fi
    add_row "(iii) fetched / read by the workload$label (MB; chunk fetches)" "$(mb "$fetched") / $(mb "$read") ($fetches)" "" "" \
      "$(ratio "$fetched" "$read")× (fetched / read)" "≤ 1.5×"
    verdict "$name (iii) fetched / read${label:+ with the recorded prefetch}" "$(ratio "$fetched" "$read")" 1.5 "×"
    case $variant in
      lazy) lazy_fetched=$fetched lazy_fetches=$fetches ;;
      recorded) NOTES+=("$name: with the recorded prefetch the workload fetched $(mb "$fetched") MB in $fetches chunks, without it $(mb "$lazy_fetched") MB in $lazy_fetches chunks.") ;;
    esac
  done

  # (iv) read every file, lazily vs from the store.
  local bytes t_lazy t_store
  bytes=$( (cold_mount "$M" "$S" "$ref" --read-only && readall "$M") 2> /dev/null) || bytes=0
  t_lazy=$(median "readall '$M' > /dev/null" "reset '$M' '$R' && '$RMOUNT' --root '$R' mount '$ref' '$M' --read-only > /dev/null" 0)
  t_store=$(median "readall '$M' > /dev/null" "cold_mount '$M' '$S' '$ref' --read-only" 0)
  add_row "(iv) read every file ($(mb "$bytes") MB as tar), cold (s)" "$t_lazy" "$t_store (store)" "" \
    "$(ratio "$t_lazy" "$t_store")× (lazy / store)" "≤ 1.5×"
  verdict "$name (iv) read all, lazy / store" "$(ratio "$t_lazy" "$t_store")" 1.5 "×"
  add_row "(iv) read-every-file throughput (MB/s)" "$(calc "'%.0f' % ($bytes / 1e6 / $t_lazy)")" \
    "$(calc "'%.0f' % ($bytes / 1e6 / $t_store)") (store)" "" "" ""
  unmount "$M" "$R"
  unmount "$M" "$S"
}

trap 'stop_registry; bench_cleanup' EXIT
for name in ${IMAGES:-debian-python debian-nginx}; do
  bench_image "$name" "${name#debian-}" "${name#debian-}"
done

{
  echo "## Lazy mounts (\`scripts/bench-lazy.sh\`)"
  echo
  echo "From a loopback registry (Debian's \`docker-registry\` 2.8), medians of $RUNS runs (the (ii) rows"
  echo "also give the fastest and slowest run in parentheses), every"
  echo "run cold: page cache dropped and an empty rmount root (no store, index cache or chunk cache)."
  echo "*Lazy mount*: \`rmount mount REF MNT\` of an image not in the store, whose rmount index"
  echo "artifact is in the registry (\`rmount index build --push\`); the mount returns once it serves."
  echo "*rmount pull + mount*: \`rmount pull\`, then a mount from the store. *skopeo + umoci*:"
  echo "\`skopeo copy docker://… oci:…\`, \`umoci unpack\`, then \`chroot\`. Workloads: python,"
  echo "\`chroot MNT python3 -c 'import json, asyncio, email, http.server, sqlite3'\`; nginx, started"
  echo "in a chroot (writable mount) on a loopback port until \`curl\` gets \`/\`, then stopped."
  echo "Fetched: \`rmount stats\` fetchedBytes (compressed bytes from the registry) after the"
  echo "workload; read: the sizes of the distinct regular files the workload opened or executed"
  echo "(\`strace -f -e trace=$TRACED\`), uncompressed. Read every file: \`chroot MNT tar -cf - /\` into"
  echo "\`wc -c\`. Targets (issue 6): (i) ≤ 300 ms with an index artifact; (ii) ≤ 0.3× the"
  echo "full-pull path; (iii) fetched ≤ 1.5× read; (iv) read-all ≤ 1.5× the time from the store."
  echo
  echo "*Lazy + recorded prefetch* (docs/lazy.md, Prefetch): the lazy mount with"
  echo "\`--prefetch recorded\`, which fetches the chunks of the files a recorded run of the same"
  echo "workload read, on four threads, as soon as the mount serves, so that the workload's chunk"
  echo "fetches overlap instead of following one another. Prepared once per image, untimed: the"
  echo "workload run on a lazy mount with \`--record LIST\`, the mount unmounted, then"
  echo "\`rmount index build REF --dest REPO-rec --push --prefetch-list LIST\`, REPO-rec being a second"
  echo "repository holding the same image. Timed like the lazy row: cold, from the start of"
  echo "\`rmount mount REPO-rec:TAG MNT --prefetch recorded\` (which fetches the list with the indexes)"
  echo "to the end of the workload. Its pull and skopeo cells repeat the row above (not measured"
  echo "again). The plain lazy rows mount the first repository, whose artifact has no list, and"
  echo "without \`--prefetch\`. Chunk fetches: \`rmount stats\` fetches (prefetched chunks included);"
  echo "fetched bytes are read once they stop growing, so they count the whole prefetch. A chunk"
  echo "is a whole compressed span (~4 MiB of output), so scattered small files fetch more than"
  echo "they read (docs/lazy.md, Not yet)."
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Against the targets in this run:"
  echo
  printf -- '- %s\n' "${VERDICTS[@]}"
  echo
  echo "What they come to:"
  echo
  printf -- '- %s\n' "${NOTES[@]}"
  echo
  if [[ -s $WORK/failures ]]; then
    echo "FAILED cells: see the run's output (\`$(grep -c '^FAILED' "$WORK/failures")\` failures)."
    echo
  fi
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, kernel $(uname -r)${RMOUNT_BIN:+, with the binary $RMOUNT_BIN (RMOUNT_BIN; not built by the script)}."
} | write_section bench-lazy
