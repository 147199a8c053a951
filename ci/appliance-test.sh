#!/usr/bin/env bash
# Appliance CI: tools, image, host binary, then the appliance tests for real.
#   ci/appliance-test.sh            # everything: ~2.5 min warm (measured), ~8-10 min cold on 2 cores
#   BORG_SKIP_QEMU=1 ci/appliance-test.sh   # only unit + PID-namespace tests
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

"$ROOT/ci/appliance-setup.sh"
cargo build -p borg                       # host binary used by tests/tests/appliance_*.rs
cargo test -p borg-system -p borg         # unit tests: DHCP, supervisor policy, LEDs, console
cargo test -p borg-tests --test appliance_pid1
if [ -z "${BORG_SKIP_QEMU:-}" ]; then
  BORG_IMAGE_NO_SETUP=1 BORG_PI_IMAGE=1 "$ROOT/image/build"   # QEMU image + Pi 4 SD image
  BORG_QEMU_TESTS=1 cargo test -p borg-tests --test appliance_qemu -- --test-threads=2
fi
echo "appliance tests: ok"
