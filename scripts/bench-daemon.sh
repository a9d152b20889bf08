#!/usr/bin/env bash
# Daemon benchmark (issue 7), all in one run on the Debian image
# (scripts/make-images.sh debian, tag demo), every mount read-only, ten
# mounts of the same image:
#   memory   RSS after reading every file under 1 MiB through each mount (in a
#            chroot: `find / -xdev -type f -size -1024k -exec cat {} +`): the
#            daemon's worker plus keeper with 1 mount and with 10, vs the sum
#            over the serving processes of 10 `--no-daemon` mounts and of 10
#            fuse-overlayfs mounts of the layers extracted to disk; the
#            10-mount / 1-mount ratio (target for the daemon: <= 1.3x)
#   mounting 10 `rmount mount` commands started in parallel, until all have
#            returned (a mount command returns once its mount serves) and
#            each root answers a stat: with the daemon running, with no
#            daemon yet (the first command starts it), with --no-daemon; and
#            10 parallel fuse-overlayfs mounts
#   restart  with 10 mounts up: from `kill -9` of the worker, and from the
#            start of `rmount daemon restart`, until every mount has answered
#            an lstat of a file it never looked up before
# RSS and restart numbers are medians over RUNS runs, mount times medians via
# hyperfine. Prints the table and writes it to its own section of
# docs/benchmarks.md. Needs root. RUNS=N sets the repetitions (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
bench_init

N=10
layout=$(scripts/make-images.sh debian)
state=$WORK/state
ref=$(rmount_load "$state" "$layout" demo)
lowers=$(extract_layers "$layout" demo "$WORK/layers")
R() { "$RMOUNT" --root "$state" "$@"; }
for i in $(seq 0 $((N - 1))); do
  mkdir -p "$WORK/daemon$i" "$WORK/nodaemon$i" "$WORK/fuse$i"
  MOUNTS+=("$WORK/daemon$i" "$WORK/nodaemon$i" "$WORK/fuse$i")
done
daemon_cleanup() {
  R daemon stop > /dev/null 2>&1 || true
  bench_cleanup
}
trap daemon_cleanup EXIT

# $WORK/mount10 SYSTEM / $WORK/umount10 SYSTEM: the 10 mounts of SYSTEM
# (daemon, nodaemon or fuse) at $WORK/SYSTEM0..9, made in parallel, failing
# unless every one is mounted; unmounted one after the other (if mounted).
cat > "$WORK/mount10" << EOF
#!/usr/bin/env bash
set -euo pipefail
sys=\$1
for i in \$(seq 0 $((N - 1))); do
  m=$WORK/\$sys\$i
  case \$sys in
    daemon) "$RMOUNT" --root "$state" mount "$ref" "\$m" --read-only & ;;
    nodaemon) "$RMOUNT" --root "$state" mount "$ref" "\$m" --read-only --no-daemon & ;;
    fuse) # (without its "unknown argument ignored: lazytime" chatter)
      { fuse-overlayfs -o "lowerdir=$lowers" "\$m" 2>&1 >&3 |
        { grep -v 'unknown argument ignored' || true; } >&2; } 3>&1 & ;;
  esac
done
ok=0
for job in \$(jobs -p); do wait "\$job" || ok=1; done
for i in \$(seq 0 $((N - 1))); do
  mountpoint -q "$WORK/\$sys\$i" && stat "$WORK/\$sys\$i/" > /dev/null || { echo "$WORK/\$sys\$i is not mounted" >&2; ok=1; }
done
exit \$ok
EOF
cat > "$WORK/umount10" << EOF
#!/usr/bin/env bash
set -euo pipefail
sys=\$1
for i in \$(seq 0 $((N - 1))); do
  m=$WORK/\$sys\$i
  mountpoint -q "\$m" || continue
  case \$sys in
    daemon | nodaemon) "$RMOUNT" --root "$state" umount "\$m" ;;
    fuse) umount "\$m" ;;
  esac
done
EOF
chmod +x "$WORK/mount10" "$WORK/umount10"

# A mount's first use builds the layer indexes: not measured.
"$WORK/mount10" daemon && "$WORK/umount10" daemon && R daemon stop

# ---------------------------------------------------------------- memory

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
mib() { calc "'%.0f' % ($1 / 1024)"; }
read_all() { chroot "$1" find / -xdev -type f -size -1024k -exec cat {} + > /dev/null; }
# pids of the daemon: "WORKER KEEPER"
daemon_pids() {
  R daemon status --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["pid"], d["keeperPid"])'
}
# The serving process of the --no-daemon mount at $1.
nodaemon_pid() {
  python3 - "$state" "$1" << 'PY'
import glob, json, sys
state, mnt = sys.argv[1:]
for path in glob.glob(f"{state}/mounts/*.json"):
    rec = json.load(open(path))
    if rec["mountpoint"] == mnt and not rec.get("daemon"):
        print(rec["pid"])
PY
}
# The fuse-overlayfs process serving $1 (its command line ends with it).
fuse_pid() { pgrep -n -f -- "^fuse-overlayfs .* $1\$"; }
# median N…: the median of the numbers.
med() { python3 -c 'import statistics, sys; print(statistics.median(float(a) for a in sys.argv[1:]))' "$@"; }

declare -A RSS=()
add() { RSS[$1]="${RSS[$1]:-} $2"; }
for run in $(seq "$RUNS"); do
  echo "memory, run $run/$RUNS"
  R daemon stop > /dev/null 2>&1
  R mount "$ref" "$WORK/daemon0" --read-only
  read_all "$WORK/daemon0"
  read -r w k < <(daemon_pids)
  add daemon1_worker "$(rss_kib "$w")"; add daemon1_keeper "$(rss_kib "$k")"
  R daemon stop > /dev/null
  "$WORK/mount10" daemon
  for i in $(seq 0 $((N - 1))); do read_all "$WORK/daemon$i"; done
  read -r w k < <(daemon_pids)
  add daemon10_worker "$(rss_kib "$w")"; add daemon10_keeper "$(rss_kib "$k")"
  R daemon stop > /dev/null

  for sys in nodaemon fuse; do
    "$WORK/mount10" "$sys"
    sum=0
    for i in $(seq 0 $((N - 1))); do
      read_all "$WORK/$sys$i"
      pid=$("${sys}_pid" "$WORK/$sys$i")
      [[ -n $pid ]] || { echo "bench-daemon: no process serves $WORK/$sys$i" >&2; exit 1; }
      rss=$(rss_kib "$pid")
      ((i > 0)) || add "${sys}1" "$rss"
      sum=$((sum + rss))
    done
    add "${sys}10" "$sum"
    "$WORK/umount10" "$sys"
  done
done
for key in "${!RSS[@]}"; do
  # shellcheck disable=SC2086
  RSS[$key]=$(med ${RSS[$key]})
done
d1=$(calc "${RSS[daemon1_worker]} + ${RSS[daemon1_keeper]}")
d10=$(calc "${RSS[daemon10_worker]} + ${RSS[daemon10_keeper]}")
daemon_ratio=$(ratio "$d10" "$d1")

# ---------------------------------------------------------------- mounting

echo "mounting"
t_running=$(median "$WORK/mount10 daemon" "$WORK/umount10 daemon; $RMOUNT --root $state daemon 2>/dev/null")
"$WORK/umount10" daemon
t_cold=$(median "$WORK/mount10 daemon" "$WORK/umount10 daemon; $RMOUNT --root $state daemon stop")
"$WORK/umount10" daemon
t_nodaemon=$(median "$WORK/mount10 nodaemon" "$WORK/umount10 nodaemon")
"$WORK/umount10" nodaemon
t_fuse=$(median "$WORK/mount10 fuse" "$WORK/umount10 fuse")
"$WORK/umount10" fuse

# ---------------------------------------------------------------- restart

# Files to stat, one per run and kind: nothing looks them up before.
(cd "$WORK/layers/layer0" && find usr/lib usr/share -type f ! -path 'usr/share/doc/*' | sort |
  awk -v n=$((2 * RUNS)) 'NR % 37 == 0 && c < n { print; c++ }') > "$WORK/fresh-files"
(($(wc -l < "$WORK/fresh-files") == 2 * RUNS)) || { echo "bench-daemon: too few files to stat" >&2; exit 1; }
cat > "$WORK/restart.py" << 'PY'
"""restart.py kill|restart RMOUNT STATE FILE MOUNT...: seconds from the kill -9
of the worker (or the start of `rmount daemon restart`) until every MOUNT has
answered an lstat of FILE, which it never looked up before."""
import json, os, subprocess, sys, threading, time

mode, rmount, state, rel, mounts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
def worker():
    out = subprocess.check_output([rmount, "--root", state, "daemon", "status", "--json"])
    return json.loads(out)["pid"]
def dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:  # reaped meanwhile (ENOENT, or ESRCH in the middle of the read)
        return True
old = worker()
start = time.monotonic()
if mode == "kill":
    os.kill(old, 9)
    while not dead(old):  # no lstat may reach the dying worker
        pass
else:
    subprocess.check_call([rmount, "--root", state, "daemon", "restart"], stderr=subprocess.DEVNULL)
answered, errors = [], []
def lstat(mount):
    try:
        os.lstat(os.path.join(mount, rel))
        answered.append(time.monotonic())
    except OSError as e:
        errors.append(f"{mount}: {e}")
threads = [threading.Thread(target=lstat, args=(m,)) for m in mounts]
for t in threads: t.start()
for t in threads: t.join()
if errors or len(answered) != len(mounts):
    sys.exit("lstat failed: " + "; ".join(errors))
if worker() == old:
    sys.exit("the worker did not change")
print("%.4f" % (max(answered) - start))
PY
R daemon stop > /dev/null
"$WORK/mount10" daemon
daemon_mounts=()
for i in $(seq 0 $((N - 1))); do daemon_mounts+=("$WORK/daemon$i"); done
kills=() restarts=()
for run in $(seq "$RUNS"); do
  echo "restart, run $run/$RUNS"
  file=$(sed -n "$((2 * run - 1))p" "$WORK/fresh-files")
  kills+=("$(python3 "$WORK/restart.py" kill "$RMOUNT" "$state" "$file" "${daemon_mounts[@]}")")
  file=$(sed -n "$((2 * run))p" "$WORK/fresh-files")
  restarts+=("$(python3 "$WORK/restart.py" restart "$RMOUNT" "$state" "$file" "${daemon_mounts[@]}")")
done
t_kill=$(med "${kills[@]}")
t_restart=$(med "${restarts[@]}")
"$WORK/umount10" daemon
R daemon stop > /dev/null

# ---------------------------------------------------------------- table

verdict() { case $(calc "$1") in True) echo "met" ;; False) echo "**missed**" ;; *) echo "n/a" ;; esac; }
ms() { calc "'%.0f' % ($1 * 1000)"; }
ROWS+=("| measurement | rmount daemon | rmount --no-daemon | fuse-overlayfs | target |"
  "| --- | --- | --- | --- | --- |"
  "| RSS, 1 mount, after reading every file < 1 MiB (MiB) | $(mib "$d1") (worker $(mib "${RSS[daemon1_worker]}") + keeper $(mib "${RSS[daemon1_keeper]}")) | $(mib "${RSS[nodaemon1]}") | $(mib "${RSS[fuse1]}") | |"
  "| RSS, $N mounts, each read the same way (MiB; sum over the serving processes) | $(mib "$d10") (worker $(mib "${RSS[daemon10_worker]}") + keeper $(mib "${RSS[daemon10_keeper]}")) | $(mib "${RSS[nodaemon10]}") | $(mib "${RSS[fuse10]}") | |"
  "| RSS, $N mounts / 1 mount | ${daemon_ratio}× | $(ratio "${RSS[nodaemon10]}" "${RSS[nodaemon1]}")× | $(ratio "${RSS[fuse10]}" "${RSS[fuse1]}")× | daemon ≤ 1.3×: $(verdict "$d10 <= 1.3 * $d1") |"
  "| $N parallel mounts until all serve, daemon already running (ms) | $(ms "$t_running") | $(ms "$t_nodaemon") | $(ms "$t_fuse") | |"
  "| $N parallel mounts until all serve, no daemon running yet (ms) | $(ms "$t_cold") | | | |"
  "| \`kill -9\` of the worker until all $N mounts answer an lstat of a new file (ms) | $(ms "$t_kill") | | | |"
  "| \`rmount daemon restart\` until all $N mounts answer an lstat of a new file (ms) | $(ms "$t_restart") | | | |")
printf '%s\n' "${ROWS[@]}"

{
  echo "## Daemon (issue 7)"
  echo
  echo "Produced by \`RUNS=$RUNS scripts/bench-daemon.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores,"
  echo "kernel $(uname -r). The Debian image (\`scripts/make-images.sh debian\`), mounted read-only $N times"
  echo "at once: by one rmount daemon, by $N \`--no-daemon\` rmount processes, and by $N fuse-overlayfs"
  echo "processes over its layers extracted to disk, all in the same run. RSS is VmRSS after reading"
  echo "every file under 1 MiB through each mount (in a chroot), the median of RUNS runs, each on fresh"
  echo "mounts and a fresh daemon (default \`--cache-mem 256\`). Mount times are hyperfine medians of $N"
  echo "mount commands started in parallel, until all have returned and each root answers a stat."
  echo "Restart times are medians of RUNS runs with $N mounts up, until each mount answered an lstat of"
  echo "a file it had never looked up (so the new worker serves it). rmount's RSS is mostly its cache"
  echo "of decompressed spans (bounded by \`--cache-mem\`, shared by all the daemon's mounts); fuse-overlayfs"
  echo "reads the extracted files through the kernel's page cache, which no process's RSS counts."
  echo
  printf '%s\n' "${ROWS[@]}"
} | write_section bench-daemon
