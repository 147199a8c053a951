#!/usr/bin/env python3
"""A user-space delay switch between network namespaces (this kernel may have no sch_netem).

    netem_hub.py net --prefix P --nodes N [--leg-ms 7.5:12.5] [--seed S] [--loss PCT]
                     [--rate-mbit R] [--queue-ms Q]
        Creates namespaces P-n0 .. P-n{N-1}, each with lo and a TAP device `tap0` at
        10.77.0.(10+i)/24 (IPv6 off), and switches Ethernet frames between the TAPs (a learning
        switch). Every frame is held for two independent uniform delays drawn from --leg-ms (one
        per leg: sender -> switch, switch -> receiver), so every pair of namespaces sees a
        one-way delay of 15-25 ms (mean 20 ms) with the defaults. Order is not preserved (like
        netem with jitter). --loss drops each frame with probability PCT/100 (netem's loss, once
        per crossing: every one-way trip). --rate-mbit gives every namespace an access link of
        R Mbit/s each way (its uplink to the switch and its downlink from it serialize frames at
        that rate, as tc's rate/tbf would); a frame that would wait more than --queue-ms (default
        100) behind others on a link is dropped (a drop-tail router buffer). Prints one JSON line {"ready": true, "namespaces": [...],
        "ips": [...]} once the network is up, then runs until its stdin closes (its parent ended,
        also by SIGKILL), SIGTERM or SIGINT; then kills every process left in its namespaces,
        deletes them (and so their devices) and prints {"frames": .., "bytes": ..}.
    netem_hub.py echo-server IP PORT [--secs S]     UDP echo, ends after S seconds (default 30)
    netem_hub.py ping IP PORT [--count 300] [--interval-ms 5]
        UDP echoes to an echo server: one JSON line with min/p50/p99/max RTT in ms.
    netem_hub.py sntp HOST [--port 123] [--tries 5]
        SNTP queries; the least-delayed one as JSON {"offset_ms", "delay_ms", "leap",
        "stratum"}; offset = server time minus this host's CLOCK_REALTIME (RFC 5905 on-wire).

Nothing here sends to an address outside the namespaces it creates.
"""
import argparse
import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SUBNET = "10.77.0."


def ip(*args):
    subprocess.run(["ip", *args], check=True, timeout=10, stdin=subprocess.DEVNULL)


class Netns:
    """Enter a namespace on this thread, and come back."""

    libc = ctypes.CDLL(None, use_errno=True)

    def __init__(self, name):
        self.fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)

    def __enter__(self):
        if self.libc.setns(self.fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        return self

    def __exit__(self, *exc):
        if self.libc.setns(self.home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(self.fd)
        os.close(self.home)


def mac(i):
    return f"02:77:00:00:{i // 256:02x}:{i % 256:02x}"


def cleanup(names):
    for ns in reversed(names):
        try:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                 timeout=10).stdout.split()
            for pid in out:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], timeout=10, capture_output=True)
        except Exception as e:  # keep deleting the others
            print(f"netem_hub cleanup {ns}: {e}", file=sys.stderr)


def net(args):
    lo, hi = (float(x) / 1000.0 for x in args.leg_ms.split(":"))
    rng = random.Random(args.seed)
    names = [f"{args.prefix}-n{i}" for i in range(args.nodes)]
    for ns in names:
        if os.path.exists(f"/run/netns/{ns}"):
            sys.exit(f"namespace {ns} exists (a leftover?)")
    created = []
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    taps = []
    try:
        for i, ns in enumerate(names):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            with Netns(ns):
                for k in ("all", "default"):
                    with open(f"/proc/sys/net/ipv6/conf/{k}/disable_ipv6", "w") as f:
                        f.write("1")
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tap0", IFF_TAP | IFF_NO_PI))
            taps.append(fd)
            ip("-n", ns, "link", "set", "tap0", "address", mac(i))
            ip("-n", ns, "addr", "add", f"{SUBNET}{10 + i}/24", "dev", "tap0")
            ip("-n", ns, "link", "set", "tap0", "up")
        # Fixed neighbours: no ARP round trip (40 ms here) in front of a first packet.
        for i, ns in enumerate(names):
            batch = "".join(f"neigh replace {SUBNET}{10 + j} lladdr {mac(j)} dev tap0 nud permanent\n"
                            for j in range(len(names)) if j != i)
            subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True,
                           timeout=10)
        try:
            # The switch is the network, not a guest of the machine's load: keep its timing.
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        except OSError:
            pass
        print(json.dumps({"ready": True, "namespaces": names,
                          "ips": [f"{SUBNET}{10 + i}" for i in range(len(names))]}), flush=True)
        link = Link(args.loss / 100.0, args.rate_mbit * 1e6 / 8.0, args.queue_ms / 1000.0,
                    len(taps))
        frames, nbytes = switch(taps, lo, hi, rng, stop, link)
    finally:
        for fd in taps:
            os.close(fd)
        cleanup(created)
    try:
        print(json.dumps({"frames": frames, "bytes": nbytes, "lost": link.lost,
                          "queue_drops": link.queue_drops}), flush=True)
    except BrokenPipeError:
        pass  # the parent stopped reading


class Link:
    """Loss, and per-namespace access links of a fixed rate (0: unlimited) with a bounded
    queue: when a frame leaves its sender and when it reaches its receiver."""

    def __init__(self, loss, bytes_per_s, queue_s, ports):
        self.loss = loss
        self.rate = bytes_per_s
        self.queue_s = queue_s
        self.up_free = [0.0] * ports
        self.down_free = [0.0] * ports
        self.lost = 0
        self.queue_drops = 0

    def uplink(self, src, t, size):
        """When a frame from `src` reaching the switch at `t` has crossed its uplink, or None."""
        if not self.rate:
            return t
        start = max(t, self.up_free[src])
        if start - t > self.queue_s:
            self.queue_drops += 1
            return None
        self.up_free[src] = start + size / self.rate
        return self.up_free[src]

    def downlink(self, dst, t, size, rng):
        """When a frame due at `dst`'s downlink at `t` arrives, or None (lost or queue full)."""
        if self.loss and rng.random() < self.loss:
            self.lost += 1
            return None
        if not self.rate:
            return t
        start = max(t, self.down_free[dst])
        if start - t > self.queue_s:
            self.queue_drops += 1
            return None
        self.down_free[dst] = start + size / self.rate
        return self.down_free[dst]


def switch(taps, lo, hi, rng, stop, link):
    port_of = {fd: i for i, fd in enumerate(taps)}
    mac_port = {}
    pending = []  # (due, seq, port, frame)
    seq = 0
    frames = nbytes = 0
    stdin = sys.stdin.fileno()
    watch = taps + [stdin]
    while not stop:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, port, frame = heapq.heappop(pending)
            try:
                os.write(taps[port], frame)
            except OSError:
                pass  # interface down or queue full: a lost frame, as on a real link
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else 1.0
        try:
            ready, _, _ = select.select(watch, [], [], timeout)
        except InterruptedError:
            continue
        for fd in ready:
            if fd == stdin:
                if not os.read(stdin, 4096):
                    return frames, nbytes
                continue
            src = port_of[fd]
            for _ in range(64):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(frame) < 14:
                    continue
                frames += 1
                nbytes += len(frame)
                mac_port[frame[6:12]] = src
                dst = frame[0:6]
                out = [mac_port[dst]] if dst in mac_port and not dst[0] & 1 else \
                    [p for p in range(len(taps)) if p != src]
                t = link.uplink(src, time.monotonic(), len(frame))
                if t is None:
                    continue
                for p in out:
                    if p == src:
                        continue
                    due = link.downlink(p, t + rng.uniform(lo, hi) + rng.uniform(lo, hi),
                                        len(frame), rng)
                    if due is None:
                        continue
                    seq += 1
                    heapq.heappush(pending, (due, seq, p, frame))
    return frames, nbytes


def echo_server(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((args.ip, args.port))
    end = time.monotonic() + args.secs
    print(json.dumps({"listening": True}), flush=True)
    while time.monotonic() < end:
        s.settimeout(max(0.01, end - time.monotonic()))
        try:
            data, peer = s.recvfrom(2048)
        except socket.timeout:
            break
        s.sendto(data, peer)


def ping(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    sent = {}
    rtts = []
    start = time.monotonic()
    next_send = start
    i = 0
    deadline = start + args.count * args.interval_ms / 1000.0 + 2.0
    while time.monotonic() < deadline and len(rtts) < args.count:
        now = time.monotonic()
        if i < args.count and now >= next_send:
            s.sendto(struct.pack("!Id", i, now), (args.ip, args.port))
            sent[i] = now
            i += 1
            next_send += args.interval_ms / 1000.0
        wait = max(0.0, next_send - time.monotonic()) if i < args.count else 0.05
        r, _, _ = select.select([s], [], [], wait)
        if r:
            data, _ = s.recvfrom(2048)
            n, t0 = struct.unpack("!Id", data[:12])
            rtts.append((time.monotonic() - t0) * 1000.0)
    rtts.sort()

    def q(p):
        return round(rtts[min(len(rtts) - 1, int(p * len(rtts)))], 2) if rtts else None

    print(json.dumps({"sent": i, "received": len(rtts), "min_ms": q(0.0), "p50_ms": q(0.5),
                      "p99_ms": q(0.99), "max_ms": q(1.0)}), flush=True)


NTP_EPOCH = 2208988800


def ntp_to_ns(b):
    sec, frac = struct.unpack("!II", b)
    return (sec - NTP_EPOCH) * 1_000_000_000 + (frac * 1_000_000_000 >> 32)


def sntp_once(s, host, port):
    t1 = time.time_ns()
    sec, rem = divmod(t1, 1_000_000_000)
    xmt = struct.pack("!II", sec + NTP_EPOCH, (rem << 32) // 1_000_000_000)
    pkt = bytes([0x23]) + bytes(39) + xmt  # LI 0, version 4, mode 3
    s.sendto(pkt, (host, port))
    try:
        data, _ = s.recvfrom(512)
    except socket.timeout:
        return None
    t4 = time.time_ns()
    if len(data) < 48 or data[24:32] != xmt:
        return None
    t2 = ntp_to_ns(data[32:40])
    t3 = ntp_to_ns(data[40:48])
    return {"offset_ms": ((t2 - t1) + (t3 - t4)) / 2e6, "delay_ms": ((t4 - t1) - (t3 - t2)) / 1e6,
            "leap": data[0] >> 6, "stratum": data[1]}


def sntp(args):
    """The least-delayed of --tries queries: a query this process was descheduled in shows a
    long delay, and its offset error is at most half of it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    best = None
    for _ in range(args.tries):
        r = sntp_once(s, args.host, args.port)
        if r and (best is None or r["delay_ms"] < best["delay_ms"]):
            best = r
    print(json.dumps(best or {"error": "no answer"}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("net")
    n.add_argument("--prefix", required=True)
    n.add_argument("--nodes", type=int, required=True)
    n.add_argument("--leg-ms", default="7.5:12.5")
    n.add_argument("--seed", type=int, default=None)
    n.add_argument("--loss", type=float, default=0.0, help="percent of frames lost")
    n.add_argument("--rate-mbit", type=float, default=0.0, help="access link rate, 0: none")
    n.add_argument("--queue-ms", type=float, default=100.0, help="longest wait on a link")
    e = sub.add_parser("echo-server")
    e.add_argument("ip")
    e.add_argument("port", type=int)
    e.add_argument("--secs", type=float, default=30.0)
    g = sub.add_parser("ping")
    g.add_argument("ip")
    g.add_argument("port", type=int)
    g.add_argument("--count", type=int, default=300)
    g.add_argument("--interval-ms", type=float, default=5.0)
    t = sub.add_parser("sntp")
    t.add_argument("host")
    t.add_argument("--port", type=int, default=123)
    t.add_argument("--tries", type=int, default=5)
    a = p.parse_args()
    {"net": net, "echo-server": echo_server, "ping": ping, "sntp": sntp}[a.cmd](a)


if __name__ == "__main__":
    main()
