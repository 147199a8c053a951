#!/usr/bin/env bash
# Everything a fresh Debian machine with rustup needs for the build and the tests (idempotent).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup first" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy
# What the build and the tests run on the host, beyond rustup (each checked in a clean root by
# ci/fresh-check.sh; a minimal Debian has none of them):
#   gcc, libc6-dev  rustc links with `cc`; ring (rustls) compiles C
#   ca-certificates cargo fetching crates over HTTPS
#   procps          `kill`, which the process tests exec (bash's builtin is not on PATH)
#   python3         image/modules.py and the PID-1 tests' stand-in monitor
#   curl            ci/demo.sh shows the monitor with it
#   util-linux      `prlimit`, which the fd-shortage test (adversarial_flood) runs on a node
host_pkgs=(gcc libc6-dev ca-certificates procps python3 curl util-linux)
# The netns NAT tests (tests/tests/portmap_miniupnpd.rs, nat_topology.rs) build home routers out of network
# namespaces and run the real miniupnpd in each. Only the daemon package: the `miniupnpd` package
# would add a debconf question and a system service that we do not want (the tests start their own
# miniupnpd per namespace with a config file in a temp dir). The -iptables variant: it writes its
# rules through libiptc into the legacy tables, where the tests prepare its chains (iptables-legacy).
netns_pkgs=(iproute2 iptables miniupnpd-iptables miniupnpc)
# The network-time test (tests/tests/time_netns.rs) needs python3 (its delaying switch,
# tests/src/netem_hub.py, above) and nothing more. `borg bench time` (not run by CI) also
# runs one chronyd per namespace: chrony. Its package enables chrony's own system service where
# systemd runs; that one does not disturb the bench (every chronyd there runs with -x on its
# own config, pid file and socket, and errors are measured against the shared clock).
# `borg bench store --netns` (not run by CI) measures iperf3 on the same links as a get:
# iperf3 (its debconf question, whether to run a system daemon, defaults to no).
bench_pkgs=(chrony iperf3)
missing=()
for p in "${host_pkgs[@]}" "${netns_pkgs[@]}" "${bench_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
"$ROOT/ci/appliance-setup.sh"
