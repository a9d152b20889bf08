#!/usr/bin/env bash
# End to end on a fresh machine: install packages, build rmount, build a
# Debian image with mmdebstrap + umoci (once, cached by scripts/make-images.sh),
# load it, mount it, look inside, change it (copy-on-write), unmount, remount
# and see the change kept, commit the changes as a new image, drop them from
# the mount and mount the new image. Needs root.
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
UPPER=$(python3 -c 'import json,glob; print(json.load(open(glob.glob("/var/lib/rmount/mounts/*.json")[0]))["upper"])' 2>/dev/null || true)
[[ -n $UPPER ]] && ls -la "$UPPER/usr" "$UPPER/usr/share" | head -20
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
trap 'rmdir "$MNT"' EXIT
echo "demo done"
