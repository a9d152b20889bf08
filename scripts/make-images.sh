#!/usr/bin/env bash
# Builds the images the demo and the benchmarks use, once, as OCI layouts
# under $RMOUNT_IMAGE_CACHE (default /var/cache/rmount-images):
#   debian     bookworm minbase (mmdebstrap) + a layer that deletes and
#              replaces files, so it carries whiteouts   (tag: demo)
#   synthetic  50,000 small files in 500 dirs + a 1 GiB file, one gzip layer (tag: bench)
#   debian-tools  bookworm minbase + git and ca-certificates, then a layer that
#              deletes /usr/share/doc and replaces /etc/motd, so programs
#              run on a writable mount meet whiteouts   (tag: tools)
#   writebench a 1 GiB file /big.bin + /dir5k with 5,000 small files, one gzip
#              layer, no symlinks: the write benchmark's lower  (tag: write)
#   debian-python  bookworm minbase + python3, then the whiteout layer
#              (tag: python): the lazy benchmark's `import` workload
#   debian-nginx   bookworm minbase + nginx, then the whiteout layer
#              (tag: nginx): the lazy benchmark's HTTP workload
# Usage: scripts/make-images.sh debian|synthetic|debian-tools|writebench|debian-python|debian-nginx
#        (prints the layout path)
set -euo pipefail
CACHE=${RMOUNT_IMAGE_CACHE:-/var/cache/rmount-images}
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$CACHE"

# debian_layout NAME TAG MOTD [MMDEBSTRAP-ARGS…]: bookworm minbase (plus
# the args) as layer 1 (tag base), then a layer that deletes /usr/share/doc
# and replaces /etc/motd (tag TAG), so the image carries whiteouts.
debian_layout() {
  local name=$1 tag=$2 motd=$3
  shift 3
  local out=$CACHE/$name work=$CACHE/work-$name
  [[ -f $out/index.json ]] && return
  rm -rf "$work" && mkdir -p "$work"
  mmdebstrap --variant=minbase "$@" --quiet bookworm "$work/rootfs.tar" >&2
  umoci init --layout "$work/img"
  umoci new --image "$work/img:base"
  umoci unpack --image "$work/img:base" "$work/b1"
  tar -xf "$work/rootfs.tar" -C "$work/b1/rootfs"
  umoci repack --image "$work/img:base" "$work/b1"
  umoci unpack --image "$work/img:base" "$work/b2"
  rm -rf "$work/b2/rootfs/usr/share/doc" "$work/b2/rootfs/etc/motd"
  echo "$motd" > "$work/b2/rootfs/etc/motd"
  umoci repack --image "$work/img:$tag" "$work/b2"
  umoci config --image "$work/img:$tag" --config.cmd /bin/bash
  mv "$work/img" "$out"
  rm -rf "$work"
}

debian() { debian_layout debian demo "Welcome to an image mounted by rmount."; }

debian_tools() {
  debian_layout debian-tools tools "Welcome to a writable image mounted by rmount." \
    --include=git,ca-certificates
}

debian_python() {
  debian_layout debian-python python "Welcome to a lazily mounted python image." --include=python3
}

debian_nginx() {
  debian_layout debian-nginx nginx "Welcome to a lazily mounted nginx image." --include=nginx
}

# generated_layout NAME TAG: one gzip layer of files from fill-rootfs.py NAME.
generated_layout() {
  local name=$1 tag=$2
  local out=$CACHE/$name work=$CACHE/work-$name
  [[ -f $out/index.json ]] && return
  rm -rf "$work" && mkdir -p "$work"
  umoci init --layout "$work/img"
  umoci new --image "$work/img:$tag"
  umoci unpack --image "$work/img:$tag" "$work/b"
  python3 "$SCRIPTS/fill-rootfs.py" "$work/b/rootfs" "$name"
  umoci repack --image "$work/img:$tag" "$work/b"
  mv "$work/img" "$out"
  rm -rf "$work"
}

synthetic() { generated_layout synthetic bench; }

writebench() { generated_layout writebench write; }

case "${1:-}" in
  debian | synthetic) "$1"; echo "$CACHE/$1" ;;
  debian-tools) debian_tools; echo "$CACHE/$1" ;;
  writebench) writebench; echo "$CACHE/$1" ;;
  debian-python) debian_python; echo "$CACHE/$1" ;;
  debian-nginx) debian_nginx; echo "$CACHE/$1" ;;
  *) echo "usage: $0 debian|synthetic|debian-tools|writebench|debian-python|debian-nginx" >&2; exit 2 ;;
esac
