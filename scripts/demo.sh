#!/usr/bin/env bash
# End to end on a fresh machine: install packages, build rmount, build a
# Debian image with mmdebstrap + umoci (cached), load it, mount it, look
# inside, unmount. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked
RMOUNT=$PWD/target/release/rmount

CACHE=${RMOUNT_DEMO_CACHE:-/var/cache/rmount-demo}
LAYOUT=$CACHE/debian
if [[ ! -f $LAYOUT/index.json ]]; then
  echo "== building a Debian bookworm image (once; cached in $CACHE)"
  rm -rf "$CACHE/work" && mkdir -p "$CACHE/work"
  mmdebstrap --variant=minbase --quiet bookworm "$CACHE/work/rootfs.tar"
  umoci init --layout "$CACHE/work/debian"
  umoci new --image "$CACHE/work/debian:base"
  umoci unpack --image "$CACHE/work/debian:base" "$CACHE/work/b1"
  tar -xf "$CACHE/work/rootfs.tar" -C "$CACHE/work/b1/rootfs"
  umoci repack --image "$CACHE/work/debian:base" "$CACHE/work/b1"
  # A second layer that deletes and replaces, so the image carries whiteouts.
  umoci unpack --image "$CACHE/work/debian:base" "$CACHE/work/b2"
  rm -rf "$CACHE/work/b2/rootfs/usr/share/doc" "$CACHE/work/b2/rootfs/etc/motd"
  echo "Welcome to an image mounted by rmount." > "$CACHE/work/b2/rootfs/etc/motd"
  umoci repack --image "$CACHE/work/debian:demo" "$CACHE/work/b2"
  umoci config --image "$CACHE/work/debian:demo" --config.cmd /bin/bash
  mv "$CACHE/work/debian" "$LAYOUT"
  rm -rf "$CACHE/work"
fi

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
"$RMOUNT" df
echo "== rmount umount $MNT"
"$RMOUNT" umount "$MNT"
trap 'rmdir "$MNT"' EXIT
echo "demo done"
