#!/usr/bin/env bash
# End to end on a fresh machine: install packages, build rmount, build a
# Debian image with mmdebstrap + umoci (once, cached by scripts/make-images.sh),
# load it, mount it, look inside, unmount. Needs root.
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
"$RMOUNT" df
echo "== rmount umount $MNT"
"$RMOUNT" umount "$MNT"
trap 'rmdir "$MNT"' EXIT
echo "demo done"
