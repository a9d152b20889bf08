#!/usr/bin/env bash
# Installs the system packages rmount's build, tests, demo and benchmarks use.
# Runs `apt-get update` once, and only when something is missing.
set -euo pipefail

PACKAGES=(fuse3 fuse-overlayfs passwd util-linux skopeo umoci mmdebstrap hyperfine attr zstd xz-utils docker-registry apache2-utils openssl curl containerd stargz-snapshotter)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
