#!/usr/bin/env bash
# Everything a fresh Debian machine with rustup needs for the build and the tests (idempotent).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup first" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy
# curl is used by the demo to show the monitor; the appliance needs QEMU, cross tools, e2fsprogs...
if ! command -v curl >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq curl
fi
"$ROOT/ci/appliance-setup.sh"
