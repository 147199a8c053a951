#!/usr/bin/env bash
# Install what the appliance image build and tests need (idempotent, safe to re-run).
# Debian packages: QEMU for aarch64, the aarch64 cross C toolchain (for crates with C, e.g.
# ring), e2fsprogs/cpio/file/kmod, and the tools of the Pi SD image (mtools, dosfstools, fdisk).
# python3 runs image/modules.py. Rust: the aarch64-unknown-linux-musl target.
set -euo pipefail

pkgs=(qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu
      e2fsprogs cpio file kmod gzip xz-utils zstd mtools dosfstools fdisk util-linux coreutils
      python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  # apt-get update only when something is missing: keeps re-runs offline and fast.
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx aarch64-unknown-linux-musl \
    || rustup target add aarch64-unknown-linux-musl
fi
echo "appliance-setup: ok"
