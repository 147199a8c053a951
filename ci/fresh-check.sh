#!/usr/bin/env bash
# Does the README's test command work on a machine that has only Debian and rustup?
#
# Builds a minimal Debian root (debootstrap --variant=minbase, the same release and mirrors as
# this machine), runs ci/setup.sh inside it, then checks that every external tool the tests and
# the image build run starts for real there: QEMU with exactly the devices image/qemu-run passes,
# ip netns + veth, iptables-legacy NAT rules, miniupnpd answering upnpc, unshare, the C
# toolchains, python3, the image tools. A tool that is on this machine but that no setup script
# installs shows up here as a failure, which is the class of bug this script exists for (QEMU's
# NIC ROM once passed here only because the machine already had it).
#
#   ci/fresh-check.sh           # clean root + ci/setup.sh + tool checks (~3-5 min)
#   ci/fresh-check.sh --full    # also the whole ci/test.sh inside the clean root (~40+ min)
#   BORG_FRESH_KEEP=1 ...       # keep the root afterwards (out/fresh-root) to look around
#
# Needs root and the Debian mirror (package registry). Rust comes from this machine's rustup
# (bind-mounted: the README assumes "Debian with rustup"); everything else must come from
# ci/setup.sh. The debootstrap output (Debian's packages only, nothing of ours) is cached in
# out/fresh-cache/ so that re-runs do not download the base system again; the root itself is
# made anew from it every run. Exit status 0 only when every check passed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# ---- inside the clean root: the checks -------------------------------------------------------
if [ "${1:-}" = "--inside" ]; then
  cd "$ROOT"
  pass=0; fail=0
  ok() { echo "PASS $1"; pass=$((pass + 1)); }
  bad() { echo "FAIL $1"; fail=$((fail + 1)); }
  check() { # check NAME COMMAND...: passes when the command exits 0 (output shown on failure)
    local name=$1; shift
    local out
    if out=$("$@" 2>&1); then ok "$name"; else bad "$name"; printf '%s\n' "$out" | tail -15 | sed 's/^/    /'; fi
  }
  owner() { # the Debian package that ships program $1 (merged /usr: try the path and its target)
    local p; p=$(type -P "$1") || return 0
    case "$p" in /opt/cargo/*|"$HOME"/.cargo/*) echo rustup; return 0 ;; esac
    { dpkg -S "$p" 2>/dev/null || dpkg -S "$(readlink -f "$p")" 2>/dev/null || dpkg -S "${p#/usr}" 2>/dev/null || echo "?: none"; } |
      grep -v '^diversion' | head -1 | cut -d: -f1
  }
  T=$(mktemp -d)
  NS=fc$$
  cleanup() {
    [ -n "${MPID:-}" ] && kill "$MPID" 2>/dev/null
    for n in "${NS}r" "${NS}h" "${NS}p"; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$T"
  }
  trap cleanup EXIT

  # 1. Every program the tests, the image build and the demo execute, with the package owning it.
  for t in cargo cc gcc aarch64-linux-gnu-gcc aarch64-linux-gnu-ar qemu-system-aarch64 ip ss \
           iptables-legacy iptables-legacy-restore miniupnpd upnpc unshare nsenter kill sh date id sleep \
           python3 curl mke2fs cpio file depmod gzip xz zstd mcopy mkfs.vfat sfdisk truncate \
           dpkg-deb apt-get dd; do
    # type -P: the program on PATH, not a shell builtin (the tests exec `kill`, not bash's).
    if type -P "$t" >/dev/null; then ok "found $t ($(owner "$t"))"; else bad "found $t: not on PATH"; fi
  done
  check "rustup has the aarch64-unknown-linux-musl target" \
    sh -c 'rustup target list --installed | grep -qx aarch64-unknown-linux-musl'

  # 2. The C toolchains link a program (host: Rust's linker and ring; cross: ring for aarch64).
  printf 'int main(void){return 0;}\n' > "$T/t.c"
  check "cc links a host program" sh -c "cc -o '$T/t' '$T/t.c' && '$T/t'"
  check "aarch64-linux-gnu-gcc compiles for aarch64" aarch64-linux-gnu-gcc -c -o "$T/t.o" "$T/t.c"

  # 3. QEMU with exactly image/qemu-run's machine and devices. -S: start with the CPU stopped
  #    (devices, ROMs and the kernel are all loaded by then), then Ctrl-A c quit on the monitor.
  #    A missing ROM or device makes QEMU exit non-zero before it reads the monitor.
  head -c 4096 /dev/zero > "$T/kernel"; head -c 4096 /dev/zero > "$T/initrd"
  truncate -s 1M "$T/data"
  check "QEMU starts with image/qemu-run's devices" sh -c \
    "printf '\001cquit\n' | BORG_KERNEL='$T/kernel' BORG_INITRD='$T/initrd' BORG_DATA_IMG='$T/data' \
     timeout 60 '$ROOT/image/qemu-run' -S"
  if [ -f /usr/share/qemu/efi-virtio.rom ]; then
    echo "note: efi-virtio.rom is present here (some package pulled in ipxe-qemu)"
  else
    ok "qemu-run needs no NIC ROM (efi-virtio.rom absent, QEMU started anyway)"
  fi

  # 4. Namespaces, veth, a MASQUERADE router's rules, miniupnpd answering upnpc: what
  #    tests/src/netns.rs builds for the NAT tests. The addresses live only in these namespaces
  #    (11.0.0.0/24 is the tests' "internet": miniupnpd refuses a reserved WAN address).
  check "ip netns + veth" sh -c "
    ip netns add ${NS}r && ip netns add ${NS}h &&
    ip link add ${NS}a netns ${NS}r type veth peer name ${NS}b netns ${NS}h &&
    ip -n ${NS}r addr add 192.0.2.1/24 dev ${NS}a && ip -n ${NS}r link set ${NS}a up &&
    ip -n ${NS}h addr add 192.0.2.2/24 dev ${NS}b && ip -n ${NS}h link set ${NS}b up &&
    ip -n ${NS}r link set lo up && ip -n ${NS}h link set lo up &&
    ip netns add ${NS}p &&
    ip link add ${NS}w netns ${NS}r type veth peer name ${NS}x netns ${NS}p &&
    ip -n ${NS}r addr add 11.0.0.1/24 dev ${NS}w && ip -n ${NS}r link set ${NS}w up &&
    ip -n ${NS}p addr add 11.0.0.2/24 dev ${NS}x && ip -n ${NS}p link set ${NS}x up &&
    ip -n ${NS}h route add default via 192.0.2.1 &&
    ip netns exec ${NS}r sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'"
  cat > "$T/rules" <<RULES
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:MINIUPNPD - [0:0]
:MINIUPNPD-POSTROUTING - [0:0]
-A PREROUTING -i ${NS}w -j MINIUPNPD
-A POSTROUTING -o ${NS}w -j MINIUPNPD-POSTROUTING
-A POSTROUTING -o ${NS}w -j MASQUERADE
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:MINIUPNPD - [0:0]
-A PREROUTING -i ${NS}w -j MINIUPNPD
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MINIUPNPD - [0:0]
-A FORWARD -i ${NS}w ! -o ${NS}w -j MINIUPNPD
-A FORWARD -i ${NS}w -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i ${NS}w -j DROP
COMMIT
RULES
  check "iptables-legacy-restore: MASQUERADE, conntrack and miniupnpd chains" \
    ip netns exec ${NS}r iptables-legacy-restore "$T/rules"
  cat > "$T/miniupnpd.conf" <<CONF
ext_ifname=${NS}w
listening_ip=${NS}a
http_port=5000
enable_upnp=yes
enable_natpmp=yes
secure_mode=yes
system_uptime=no
uuid=b0a9b0a9-0000-4000-8000-00000000f00d
lease_file=$T/leases
allow 1024-65535 192.0.2.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
  ip netns exec ${NS}r miniupnpd -d -f "$T/miniupnpd.conf" -P "$T/miniupnpd.pid" >"$T/miniupnpd.log" 2>&1 &
  MPID=$!
  up=""
  for _ in $(seq 1 100); do  # at most 10 s
    kill -0 "$MPID" 2>/dev/null || break
    if ip netns exec ${NS}r ss -Hltn 'sport = :5000' | grep -q . &&
       ip netns exec ${NS}r ss -Hlun 'sport = :5351' | grep -q .; then up=1; break; fi
    sleep 0.1
  done
  if [ -n "$up" ]; then ok "miniupnpd listens (UPnP 5000, PCP/NAT-PMP 5351)"; else
    bad "miniupnpd listens"; tail -15 "$T/miniupnpd.log" | sed 's/^/    /'; fi
  check "upnpc maps a port through miniupnpd" sh -c "
    ip netns exec ${NS}h timeout 20 upnpc -u http://192.0.2.1:5000/rootDesc.xml -a 192.0.2.2 4000 4000 TCP 60 &&
    ip netns exec ${NS}h timeout 20 upnpc -u http://192.0.2.1:5000/rootDesc.xml -l | grep -q '4000->192.0.2.2:4000'"
  # The mapping carries a connection from the "internet" host to the LAN host (DNAT + FORWARD).
  echo borg-fresh-check > "$T/index.html"
  ip netns exec ${NS}h python3 -m http.server 4000 --bind 192.0.2.2 --directory "$T" >/dev/null 2>&1 &
  HPID=$!
  check "a connection from outside comes in through the mapping" sh -c "
    for i in \$(seq 1 50); do
      ip netns exec ${NS}p curl -s -m 2 http://11.0.0.1:4000/index.html | grep -q borg-fresh-check && exit 0
      sleep 0.1
    done; exit 1"
  kill "$HPID" 2>/dev/null || true

  # 5. PID namespaces (tests/tests/appliance_pid1.rs) and the image build's helpers.
  check "unshare --pid --fork --mount-proc" unshare --pid --fork --mount-proc sh -c 'test $$ -eq 1'
  check "python3 runs (image/modules.py, the PID-1 tests' stand-in monitor)" python3 -c 'import json, http.server'
  check "mke2fs + mcopy + mkfs.vfat + sfdisk make a disk image" sh -c "
    truncate -s 40M '$T/disk' && printf 'label: dos\n,16M,c\n,,83\n' | sfdisk -q '$T/disk' &&
    truncate -s 16M '$T/vfat' && mkfs.vfat -n T '$T/vfat' >/dev/null && mcopy -i '$T/vfat' '$T/t.c' ::t.c &&
    truncate -s 16M '$T/ext4' && mke2fs -q -t ext4 -F '$T/ext4'"
  check "curl runs (ci/demo.sh)" curl --version

  echo "fresh-check: $pass passed, $fail failed"
  [ "$fail" -eq 0 ]
  exit
fi

# ---- outside: make the clean root, run setup and the checks in it -----------------------------
[ "$(id -u)" -eq 0 ] || { echo "fresh-check: needs root (debootstrap, chroot, namespaces)" >&2; exit 1; }
# Run in a mount namespace of our own: the clean root's mounts never show on this machine and
# vanish with this process, however it ends.
if [ -z "${BORG_FRESH_NS:-}" ]; then
  exec env BORG_FRESH_NS=1 unshare --mount --propagation private bash "$0" "$@"
fi
FULL=""; [ "${1:-}" = "--full" ] && FULL=1
OUTD=$ROOT/out
NEWROOT=$OUTD/fresh-root
CACHE=$OUTD/fresh-cache
SUITE=$(. /etc/os-release && echo "$VERSION_CODENAME")
MIRROR=http://deb.debian.org/debian
mkdir -p "$CACHE"
if ! command -v debootstrap >/dev/null; then
  echo "== installing debootstrap on this machine (only for this check)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
fi

MOUNTS=()
# Delete the root only when nothing is mounted below it any more: the repository itself is
# bind-mounted in there, and rm -rf through that mount would delete it.
remove_root() {
  if grep -q " $NEWROOT[/ ]" /proc/self/mounts; then
    echo "fresh-check: something is still mounted below $NEWROOT; not deleting it" >&2
    return 1
  fi
  rm -rf --one-file-system "$NEWROOT"
}
umount_all() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
  MOUNTS=()
  if [ -z "${BORG_FRESH_KEEP:-}" ]; then remove_root || true; fi
}
trap umount_all EXIT
bind() { mkdir -p "$NEWROOT$2"; mount --bind "$1" "$NEWROOT$2"; MOUNTS+=("$NEWROOT$2"); }

remove_root
TARBALL=$CACHE/$SUITE-minbase.tgz
if [ ! -f "$TARBALL" ]; then
  echo "== debootstrap $SUITE (minbase) into a tarball, once"
  debootstrap --variant=minbase --make-tarball="$TARBALL.part" "$SUITE" "$CACHE/work" "$MIRROR"
  mv "$TARBALL.part" "$TARBALL"; rm -rf "$CACHE/work"
fi
echo "== a clean $SUITE root in $NEWROOT"
debootstrap --variant=minbase --unpack-tarball="$TARBALL" "$SUITE" "$NEWROOT" "$MIRROR" >/dev/null
# The same package sources as this machine (release, updates, security), nothing else.
rm -f "$NEWROOT/etc/apt/sources.list"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  cp /etc/apt/sources.list.d/debian.sources "$NEWROOT/etc/apt/sources.list.d/"
else
  echo "deb $MIRROR $SUITE main" > "$NEWROOT/etc/apt/sources.list"
fi
cp /etc/resolv.conf "$NEWROOT/etc/resolv.conf"

# The root is a mount point of its own, so that `ip netns` and `unshare` inside it can change
# the propagation of "/" as they do on a real machine.
mount --bind "$NEWROOT" "$NEWROOT"; MOUNTS+=("$NEWROOT")
mkdir -p "$NEWROOT/proc" "$NEWROOT/sys"
mount -t proc proc "$NEWROOT/proc"; MOUNTS+=("$NEWROOT/proc")
bind /sys /sys
bind /dev /dev
bind /dev/pts /dev/pts
mount -t tmpfs tmpfs "$NEWROOT/run"; MOUNTS+=("$NEWROOT/run")
# Rust from this machine's rustup, the repository at the same path (so paths in messages match).
RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}; CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
bind "$RUSTUP_HOME" /opt/rustup
bind "$CARGO_HOME" /opt/cargo
bind "$ROOT" "$ROOT"

ENVV=(env -i HOME=/root TERM=dumb LANG=C.UTF-8 RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo
      PATH=/opt/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
echo "== ci/setup.sh in the clean root"
chroot "$NEWROOT" "${ENVV[@]}" bash -c "cd '$ROOT' && ci/setup.sh"
echo "== tool checks in the clean root"
status=0
chroot "$NEWROOT" "${ENVV[@]}" bash "$ROOT/ci/fresh-check.sh" --inside || status=$?
if [ -n "$FULL" ] && [ "$status" -eq 0 ]; then
  echo "== ci/test.sh in the clean root (own target dir: out/fresh-target)"
  chroot "$NEWROOT" "${ENVV[@]}" CI=true CARGO_TARGET_DIR="$OUTD/fresh-target" \
    bash -c "cd '$ROOT' && ci/test.sh" || status=$?
fi
[ "$status" -eq 0 ] && echo "fresh-check: ok" || echo "fresh-check: FAILED (status $status)"
exit "$status"
