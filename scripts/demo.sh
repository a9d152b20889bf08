#!/usr/bin/env bash
# End to end on a fresh machine: install packages, build rmount, build a
# Debian image with mmdebstrap + umoci (once, cached by scripts/make-images.sh),
# load it, mount it, look inside, change it (copy-on-write), unmount, remount
# and see the change kept, commit the changes as a new image, drop them from
# the mount and mount the new image; then push that image to a local registry
# (Debian's docker-registry on a loopback port), pull it into a second, empty
# store and mount it from there. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked
RMOUNT=$PWD/target/release/rmount

LAYOUT=$(scripts/make-images.sh debian)

echo "== rmount load -i $LAYOUT"
"$RMOUNT" load -i "$LAYOUT"
"$RMOUNT" images

MNT=$(mktemp -d /tmp/rmount-demo.XXXXXX)
echo "== rmount localhost/debian:demo $MNT"
time "$RMOUNT" localhost/debian:demo "$MNT"
trap '"$RMOUNT" umount "$MNT" 2>/dev/null || true; rmdir "$MNT"' EXIT
ls "$MNT"
echo "== inside the image (chroot, so its absolute symlinks resolve inside it)"
chroot "$MNT" /bin/cat /etc/os-release /etc/motd
chroot "$MNT" /bin/sh -c 'ls /usr/share/doc 2>&1 | head -1; dpkg -l | wc -l'
echo "== change it: writes land in the upper dir, the image layers stay untouched"
chroot "$MNT" /bin/sh -c 'echo "changed by the rmount demo" > /etc/motd; useradd -m demo; rm -rf /usr/share/man; mv /usr/games /usr/old-games'
"$RMOUNT" df
echo "== rmount umount $MNT, then mount again: the changes are kept"
"$RMOUNT" umount "$MNT"
"$RMOUNT" localhost/debian:demo "$MNT"
chroot "$MNT" /bin/sh -c 'cat /etc/motd; ls -d /home/demo /usr/old-games; ls /usr/share/man 2>&1 | head -1'
echo "== the upper dir, in kernel overlayfs format (whiteouts are char devices 0/0)"
UPPER=$("$RMOUNT" ps --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["upper"])' 2>/dev/null || true)
[[ -n $UPPER ]] && ls -la "$UPPER/usr" "$UPPER/usr/share" | head -20
echo "== one daemon serves every mount: rmount ps, then restart it under a running reader"
"$RMOUNT" ps
chroot "$MNT" /bin/sh -c 'i=0 f=0; while [ $i -lt 2000 ]; do cat /etc/motd >/dev/null || f=$((f+1)); i=$((i+1)); done; echo "2000 reads across the restart, $f failed"' &
READER=$!
"$RMOUNT" daemon restart
wait $READER
echo "== rmount diff $MNT, then commit the changes as a new image"
"$RMOUNT" diff "$MNT" | head -8
"$RMOUNT" commit "$MNT" localhost/debian:changed -m "rmount demo" -c 'CMD ["cat", "/etc/motd"]'
echo "== rmount umount --discard $MNT: the changes are dropped from the mount…"
"$RMOUNT" umount --discard "$MNT"
echo "== …but kept in the committed image, mounted read-only"
"$RMOUNT" images
"$RMOUNT" localhost/debian:changed "$MNT" --read-only
chroot "$MNT" /bin/sh -c 'cat /etc/motd; ls -d /home/demo /usr/old-games'
"$RMOUNT" umount "$MNT"

echo "== a local registry on 127.0.0.1 (plain HTTP is used for loopback registries)"
REG_DIR=$(mktemp -d /tmp/rmount-demo-registry.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$REG_DIR/config.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $REG_DIR/data}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$PORT}
YML
docker-registry serve "$REG_DIR/config.yml" > "$REG_DIR/log" 2>&1 &
REG_PID=$!
stop_demo_daemons() {
    for store in "$REG_DIR/store" "$REG_DIR/lazy"; do
        [[ ! -d $store ]] || "$RMOUNT" --root "$store" daemon stop 2>/dev/null || true
    done
    kill $REG_PID 2>/dev/null || true
    rm -rf "$REG_DIR"
    rmdir "$MNT" 2>/dev/null || true
}
trap stop_demo_daemons EXIT
until curl -s -o /dev/null "http://127.0.0.1:$PORT/v2/"; do sleep 0.1; done
echo "== rmount push localhost/debian:changed 127.0.0.1:$PORT/demo/debian:changed"
"$RMOUNT" push localhost/debian:changed "127.0.0.1:$PORT/demo/debian:changed"
skopeo inspect --tls-verify=false "docker://127.0.0.1:$PORT/demo/debian:changed" | grep -E '"(Digest|Cmd)"' -A1
echo "== rmount pull into an empty store, then mount what came from the registry"
"$RMOUNT" --root "$REG_DIR/store" pull "127.0.0.1:$PORT/demo/debian:changed"
"$RMOUNT" --root "$REG_DIR/store" "127.0.0.1:$PORT/demo/debian:changed" "$MNT" --read-only
chroot "$MNT" /bin/cat /etc/motd
"$RMOUNT" --root "$REG_DIR/store" umount "$MNT"
echo "== publish the layers' random-access indexes next to the image (an OCI artifact)"
"$RMOUNT" index build localhost/debian:changed --dest "127.0.0.1:$PORT/demo/debian:changed" --push
echo "== a lazy mount from another empty store: ready at once, data fetched on first read"
time "$RMOUNT" --root "$REG_DIR/lazy" "127.0.0.1:$PORT/demo/debian:changed" "$MNT" --read-only
chroot "$MNT" /bin/cat /etc/motd
sleep 1.2   # the daemon refreshes its statistics every second
"$RMOUNT" --root "$REG_DIR/lazy" stats "$MNT"
"$RMOUNT" --root "$REG_DIR/lazy" umount "$MNT"

echo "== containerd on rmount: a private containerd whose snapshotter is the same daemon"
SNAP_SOCK=$("$RMOUNT" --root "$REG_DIR/lazy" daemon status --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshotterSocket"])')
CTRD=$REG_DIR/containerd
mkdir -p "$CTRD"
cat > "$CTRD/config.toml" <<TOML
version = 2
root = "$CTRD/root"
state = "$CTRD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CTRD/containerd.sock"
[ttrpc]
  address = "$CTRD/containerd.sock.ttrpc"
[proxy_plugins.rmount]
  type = "snapshot"
  address = "$SNAP_SOCK"
TOML
containerd --config "$CTRD/config.toml" > "$CTRD/log" 2>&1 &
CTRD_PID=$!
stop_demo_containerd() {
    kill $CTRD_PID 2>/dev/null && wait $CTRD_PID 2>/dev/null || true
    stop_demo_daemons
}
trap stop_demo_containerd EXIT
CTR=(ctr --address "$CTRD/containerd.sock" --namespace rmount-demo)
until "${CTR[@]}" version > /dev/null 2>&1; do sleep 0.1; done
echo "== rmount containerd pull: containerd gets the image; its layers stay in the registry"
time "$RMOUNT" --root "$REG_DIR/lazy" containerd pull --address "$CTRD/containerd.sock" \
    --namespace rmount-demo "127.0.0.1:$PORT/demo/debian:changed"
"${CTR[@]}" run --rm --snapshotter rmount --runc-root "$CTRD/runc" --fifo-dir "$CTRD/fifo" --cgroup= \
    "127.0.0.1:$PORT/demo/debian:changed" rmount-demo cat /etc/motd
"$RMOUNT" --root "$REG_DIR/lazy" ps
echo "demo done"
