//! `borg bench flood`: what floods cost a node. Starts a root and one child as real `borg
//! node` processes on 127.54.0.x, then attacks the root from outsider addresses 127.54.9.x
//! with fresh keys:
//!
//! 1. an envelope flood: `--links` authenticated links offering `--rate` validly signed
//!    envelopes per second in total (pre-signed, so the attacker's signing is not the limit)
//!    for `--secs` seconds;
//! 2. a connection flood: `--sockets` silent TCP connections spread over the tree port,
//!    receptor and monitor from `--sources` addresses.
//!
//! During each it prints the root's CPU use (from /proc, utime+stime over the window), its
//! peak RSS, the descriptors it holds, how many envelopes it took in, and how long a
//! legitimate newcomer's authenticated link and a receptor ping take to get through.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use borg_net::{client, conn, node::now_ms, TlsIdentity};
use borg_proto::envelope;
use borg_proto::identity::{PublicKey, SecretKey};
use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct FloodBenchArgs {
    /// Envelopes per second offered in total.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds the envelope flood lasts.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Attacking links (one fresh key and one source address each).
    #[arg(long, default_value_t = 8)]
    links: u8,
    /// Silent sockets in the connection flood.
    #[arg(long, default_value_t = 600)]
    sockets: usize,
    /// Source addresses of the connection flood.
    #[arg(long, default_value_t = 8)]
    sources: u8,
}

const SUBNET: u8 = 54;

fn ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, SUBNET, 0, i + 2)
}

fn outsider(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, SUBNET, 9, n))
}

/// utime + stime of a process, in clock ticks, and its VmRSS in KiB.
fn proc_stat(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            get(11) + get(12)
        })
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Clock ticks per second of /proc times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

async fn metric(mon: SocketAddr, name: &str) -> u64 {
    let text = client::monitor_get(mon, "/metrics")
        .await
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Time a legitimate newcomer's authenticated link (TCP + TLS 1.3 with its own fresh key).
async fn legit_link(target: SocketAddr, key: PublicKey) -> Option<Duration> {
    let me = SecretKey::generate();
    let identity = TlsIdentity::new(&me).ok()?;
    let bind = SocketAddr::new(IpAddr::V4(ip(9)), 0);
    let t = Instant::now();
    conn::connect_from(target, bind, key, &identity, Duration::from_secs(10))
        .await
        .ok()?;
    Some(t.elapsed())
}

async fn legit_ping(recp: SocketAddr) -> Option<Duration> {
    let me = SecretKey::generate();
    let env = envelope::seal(&me, "ping", None, now_ms(), json!({}));
    let t = Instant::now();
    match client::receptor_post(recp, env.to_bytes()).await {
        Ok((200, _)) => Some(t.elapsed()),
        _ => None,
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "FAILED".into())
}

pub fn run(args: FloodBenchArgs) -> Result<()> {
    let mut procs = crate::bench::NodeProcs::new("flood")?;
    let node_args = ["--no-nat".to_string()];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mon = SocketAddr::new(ip(0).into(), 13310);
    let recp = SocketAddr::new(ip(0).into(), 13305);
    let target = SocketAddr::new(ip(0).into(), 13300);
    let pid = procs.spawn(0, ip(0), None, &node_args)?.id();
    let up = Instant::now();
    while rt.block_on(client::status(mon)).is_err() {
        if up.elapsed() > Duration::from_secs(20) {
            bail!("root did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    procs.spawn(1, ip(1), Some(ip(0)), &node_args)?;
    let st = rt.block_on(client::status(mon))?;
    let key = PublicKey::from_b64(st["public_key"].as_str().unwrap_or(""))
        .map_err(|e| anyhow::anyhow!("root key: {e}"))?;
    while rt
        .block_on(client::status(mon))
        .ok()
        .and_then(|s| s["size"].as_u64())
        != Some(2)
    {
        if up.elapsed() > Duration::from_secs(30) {
            bail!("child did not join");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, rss0) = proc_stat(pid);
    println!(
        "== root 127.{SUBNET}.0.2 + one child (debug or release as built), idle: RSS {rss0} KiB, {} fds",
        fds(pid)
    );
    println!(
        "   idle: newcomer link {}, receptor ping {}",
        ms(rt.block_on(legit_link(target, key))),
        ms(rt.block_on(legit_ping(recp)))
    );

    // 1. envelope flood
    let links = args.links.max(1);
    let per_link = (args.rate * args.secs / u64::from(links)).max(1);
    println!(
        "== envelope flood: {links} links, {} envelopes/s offered for {} s (pre-signing {} envelopes)",
        args.rate,
        args.secs,
        per_link * u64::from(links)
    );
    let mut pools = Vec::new();
    for _ in 0..links {
        let k = SecretKey::generate();
        let frames: Vec<Vec<u8>> = (0..per_link)
            .map(|i| {
                // The clock window is 30 s: stamp them for the middle of the flood.
                envelope::seal(
                    &k,
                    "flood.x",
                    None,
                    now_ms() + args.secs * 500,
                    json!({ "i": i }),
                )
                .to_bytes()
            })
            .collect();
        pools.push((k, frames));
    }
    let frames_before = rt.block_on(metric(mon, "borg_frames_in_total"));
    let written = Arc::new(AtomicU64::new(0));
    let (t0, rss_start) = proc_stat(pid);
    let started = Instant::now();
    let per_link_rate = (args.rate / u64::from(links)).max(1);
    let (t1, rss_end, window, peak, fds_peak, link_during, ping_during) = rt.block_on(async {
        let mut tasks = Vec::new();
        for (n, (k, frames)) in pools.into_iter().enumerate() {
            let written = written.clone();
            let secs = args.secs;
            tasks.push(tokio::spawn(async move {
                let Ok(identity) = TlsIdentity::new(&k) else {
                    return;
                };
                let src = SocketAddr::new(outsider(n as u8 + 1), 0);
                let Ok(conn) =
                    conn::connect_from(target, src, key, &identity, Duration::from_secs(5)).await
                else {
                    return;
                };
                let (_r, mut w) = conn.into_split();
                let end = started + Duration::from_secs(secs);
                for (i, f) in frames.iter().enumerate() {
                    // Pace at the offered rate; a write that blocks is the node's backpressure.
                    let due = started + Duration::from_secs_f64(i as f64 / per_link_rate as f64);
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    if Instant::now() >= end {
                        break;
                    }
                    match tokio::time::timeout_at(end.into(), w.send(f)).await {
                        Ok(Ok(())) => {
                            written.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => break,
                    }
                }
            }));
        }
        // Legitimate traffic during the flood.
        tokio::time::sleep(Duration::from_secs(args.secs / 2)).await;
        let link_during = legit_link(target, key).await;
        let ping_during = legit_ping(recp).await;
        let mut peak = rss_start;
        let mut fds_peak = 0;
        while started.elapsed() < Duration::from_secs(args.secs) {
            peak = peak.max(proc_stat(pid).1);
            fds_peak = fds_peak.max(fds(pid));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (t1, rss_end) = proc_stat(pid);
        let window = started.elapsed().as_secs_f64();
        for t in tasks {
            let _ = t.await;
        }
        (
            t1,
            rss_end,
            window,
            peak,
            fds_peak,
            link_during,
            ping_during,
        )
    });
    let frames_after = rt.block_on(metric(mon, "borg_frames_in_total"));
    let limited = rt.block_on(metric(mon, "borg_rate_limited_total{door=\"tree\"}"));
    let w = written.load(Ordering::Relaxed);
    println!(
        "   written {w} ({:.0}/s), taken in by the root {} ({:.0}/s), rate-limit waits {limited}",
        w as f64 / window,
        frames_after.saturating_sub(frames_before),
        frames_after.saturating_sub(frames_before) as f64 / window
    );
    println!(
        "   root CPU {:.0}% of one core, RSS {rss_start} -> peak {} -> {rss_end} KiB, fds peak {fds_peak}",
        (t1.saturating_sub(t0)) as f64 / USER_HZ / window * 100.0,
        peak.max(rss_end)
    );
    println!(
        "   during the flood: newcomer link {}, receptor ping {}",
        ms(link_during),
        ms(ping_during)
    );

    // 2. connection flood
    let sources = args.sources.max(1);
    println!(
        "== connection flood: {} silent sockets from {sources} addresses over tree port, receptor, monitor",
        args.sockets
    );
    let fds_before = fds(pid);
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..args.sockets {
            let src = outsider(50 + (i % usize::from(sources)) as u8);
            let port = [13300u16, 13305, 13310][i % 3];
            let s = tokio::net::TcpSocket::new_v4();
            let Ok(s) = s else { continue };
            if s.bind(SocketAddr::new(src, 0)).is_err() {
                continue;
            }
            if let Ok(c) = s.connect(SocketAddr::new(ip(0).into(), port)).await {
                held.push(c);
            }
        }
        held
    });
    std::thread::sleep(Duration::from_millis(500));
    let fds_flood = fds(pid);
    let link = rt.block_on(legit_link(target, key));
    let ping = rt.block_on(legit_ping(recp));
    let mon_t = Instant::now();
    let mon_ok = rt.block_on(client::status(mon)).is_ok();
    let mon_ms = mon_t.elapsed();
    let (_, rss_c) = proc_stat(pid);
    println!(
        "   {} sockets connected; root fds {fds_before} -> {fds_flood}, RSS {rss_c} KiB",
        held.len()
    );
    println!(
        "   during the flood: newcomer link {}, receptor ping {}, monitor {}",
        ms(link),
        ms(ping),
        if mon_ok {
            format!("{:.1} ms", mon_ms.as_secs_f64() * 1000.0)
        } else {
            "FAILED".into()
        }
    );
    let refused: u64 = ["tree", "receptor", "monitor"]
        .iter()
        .map(|d| {
            rt.block_on(metric(
                mon,
                &format!("borg_connections_refused_per_ip_total{{door=\"{d}\"}}"),
            ))
        })
        .sum();
    println!("   connections refused per IP: {refused}");
    drop(held);
    drop(procs);
    Ok(())
}
