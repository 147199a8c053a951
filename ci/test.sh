#!/usr/bin/env bash
# The whole test suite, as CI runs it (bash .ci/run calls this). On a fresh machine it installs
# what it needs first. Stages print their wall time; the suite aims to stay under 25 minutes.
#   ci/test.sh                 # everything, including the aarch64 image booted in QEMU
#   BORG_SKIP_QEMU=1 ci/test.sh   # skip the image build and QEMU boots
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TERM_COLOR=never
stage() { echo; echo "=== $* ($(date +%T))"; }

stage setup
ci/setup.sh

stage "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

stage "build"
cargo build -p borg

stage "unit, simulation, property and multi-process tests"
# The process tests use distinct 127.x subnets, so test binaries may run side by side.
# --no-fail-fast: one run reports every failing test binary, not only the first.
cargo test --workspace --no-fail-fast -- --test-threads=2

if [ -z "${BORG_SKIP_QEMU:-}" ]; then
  stage "aarch64 image (kernel + initramfs + data disk, and the Pi 4 SD image)"
  BORG_IMAGE_NO_SETUP=1 BORG_PI_IMAGE=1 image/build
  stage "the same image as release 0.2.0 (what the QEMU update test installs)"
  OUT=out/image-v2 BORG_RELEASE_VERSION=0.2.0 BORG_IMAGE_NO_SETUP=1 image/build
  stage "QEMU boots of the image"
  BORG_QEMU_TESTS=1 BORG_QEMU_EXPECT_NODE=1 cargo test -p borg-tests --test appliance_qemu --test appliance_ab -- --test-threads=2
fi
stage done
