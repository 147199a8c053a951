//! `borg bench relay`: what relaying costs. On loopback, in one process, a client talks to a
//! node once directly and once through a relay (a real listener and `RelayHub` splice, the
//! relayed node connecting back with its token as it does after a `relay.open`). Printed:
//! connection setup time, echo round trip of small frames, and bulk throughput, each direct
//! and relayed. Loopback has no network latency, so the difference is the relay's own cost
//! (one more TCP connection, the token round trip, a second copy of every byte); on a real
//! network add one round trip to the relay for the setup and the relay's path for each hop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use borg_net::conn::{self, Incoming, Listener, PeerConn};
use borg_net::relay::RelayHub;
use borg_net::TlsIdentity;
use borg_proto::identity::SecretKey;
use clap::Args;
use tokio::sync::mpsc;

#[derive(Args, Debug)]
pub struct RelayBenchArgs {
    /// Connections to time (setup).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Echo round trips of 1 KiB frames.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// MiB sent one way in 64 KiB frames for the throughput figure.
    #[arg(long, default_value_t = 256)]
    mebibytes: usize,
}

const T: Duration = Duration::from_secs(10);

pub fn run(args: RelayBenchArgs) -> Result<()> {
    // One thread, like a node: client, relay and target share it, so the throughput figure
    // is the CPU cost of the extra copy as much as anything.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    rt.block_on(bench(args))
}

fn identity() -> Result<Arc<TlsIdentity>> {
    Ok(Arc::new(TlsIdentity::new(&SecretKey::generate())?))
}

/// The target node: a listener of its own (direct path) and answers to relay tokens.
async fn serve_target(mut listener: Listener) {
    while let Ok(inc) = listener.accept_incoming().await {
        if let Incoming::Peer(c) = inc {
            tokio::spawn(echo(c));
        }
    }
}

async fn echo(mut c: PeerConn) {
    while let Ok(Some(f)) = c.recv().await {
        // Bulk frames are only counted; small ones are echoed.
        if f.len() <= 1024 && c.send(&f).await.is_err() {
            break;
        }
        if f.len() == 1 {
            // End of a bulk run: acknowledge.
            if c.send(&[1]).await.is_err() {
                break;
            }
        }
    }
}

async fn serve_relay(mut listener: Listener, tokens: mpsc::Sender<String>) {
    let hub = Arc::new(RelayHub::default());
    let mut n = 0u64;
    while let Ok(inc) = listener.accept_incoming().await {
        match inc {
            Incoming::RelayConnect { tcp, .. } => {
                n += 1;
                let token = format!("t{n}");
                if tokens.send(token.clone()).await.is_err() {
                    return;
                }
                let hub = hub.clone();
                tokio::spawn(async move {
                    let _ = hub.splice(token, tcp, None).await;
                });
            }
            Incoming::RelayAccept { tcp, token, .. } => {
                hub.answer(&token, tcp);
            }
            _ => {}
        }
    }
}

async fn answer_tokens(
    relay: SocketAddr,
    id: Arc<TlsIdentity>,
    mut tokens: mpsc::Receiver<String>,
) {
    while let Some(token) = tokens.recv().await {
        let id = id.clone();
        tokio::spawn(async move {
            if let Ok(c) = conn::accept_via(relay, &token, &id, T).await {
                echo(c).await;
            }
        });
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Figures {
    setup_p50_ms: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    mib_s: f64,
}

async fn measure(
    args: &RelayBenchArgs,
    dial: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<PeerConn>> + Send>>,
) -> Result<Figures> {
    // Warm up (first handshakes pay for lazy initialisation).
    for _ in 0..10 {
        drop(dial().await?);
    }
    let mut setups = Vec::new();
    for _ in 0..args.connections {
        let t = Instant::now();
        let c = dial().await?;
        setups.push(t.elapsed().as_secs_f64() * 1e3);
        drop(c);
    }
    setups.sort_by(f64::total_cmp);
    let mut c = dial().await?;
    let frame = vec![7u8; 1024];
    let mut rtts = Vec::new();
    for _ in 0..args.round_trips {
        let t = Instant::now();
        c.send(&frame).await?;
        c.recv().await?.context("closed")?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    let bulk = vec![9u8; 64 * 1024];
    let t = Instant::now();
    for _ in 0..args.mebibytes * 16 {
        c.send(&bulk).await?;
    }
    c.send(&[1]).await?;
    // Wait for the acknowledgement (skipping nothing: bulk frames are not echoed).
    c.recv().await?.context("closed")?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Figures {
        setup_p50_ms: pct(&setups, 0.5),
        rtt_p50_us: pct(&rtts, 0.5),
        rtt_p99_us: pct(&rtts, 0.99),
        mib_s: args.mebibytes as f64 / secs,
    })
}

/// Bulk throughput (MiB/s) of one direct TLS link on loopback in this process: the ceiling
/// other benchmarks compare with (`borg bench store`).
pub(crate) async fn tls_link_mib_s(mebibytes: usize) -> Result<f64> {
    let target_id = identity()?;
    let client_id = identity()?;
    let target_l = Listener::bind("127.0.0.1:0".parse()?, &target_id).await?;
    let target_addr = target_l.local_addr()?;
    tokio::spawn(serve_target(target_l));
    let key = target_id.public_key();
    let args = RelayBenchArgs {
        connections: 1,
        round_trips: 1,
        mebibytes,
    };
    let f = measure(&args, || {
        let cid = client_id.clone();
        Box::pin(async move { Ok(conn::connect(target_addr, key, &cid, T).await?) })
    })
    .await?;
    Ok(f.mib_s)
}

async fn bench(args: RelayBenchArgs) -> Result<()> {
    let target_id = identity()?;
    let client_id = identity()?;
    let relay_id = identity()?;
    let target_l = Listener::bind("127.0.0.1:0".parse()?, &target_id).await?;
    let target_addr = target_l.local_addr()?;
    tokio::spawn(serve_target(target_l));
    let relay_l = Listener::bind("127.0.0.1:0".parse()?, &relay_id).await?;
    let relay_addr = relay_l.local_addr()?;
    let (tok_tx, tok_rx) = mpsc::channel(64);
    tokio::spawn(serve_relay(relay_l, tok_tx));
    tokio::spawn(answer_tokens(relay_addr, target_id.clone(), tok_rx));
    let key = target_id.public_key();
    println!(
        "== relay cost on loopback: {} connections, {} echo round trips of 1 KiB, {} MiB bulk",
        args.connections, args.round_trips, args.mebibytes
    );
    let cid = client_id.clone();
    let direct = measure(&args, || {
        let cid = cid.clone();
        Box::pin(async move { Ok(conn::connect(target_addr, key, &cid, T).await?) })
    })
    .await?;
    let cid = client_id.clone();
    let relayed = measure(&args, || {
        let cid = cid.clone();
        Box::pin(async move { Ok(conn::connect_via(relay_addr, key, &cid, T).await?) })
    })
    .await?;
    for (name, f) in [("direct", &direct), ("relayed", &relayed)] {
        println!(
            "{name:8} setup p50 {:.2} ms | echo RTT p50 {:.0} us p99 {:.0} us | throughput {:.0} MiB/s",
            f.setup_p50_ms, f.rtt_p50_us, f.rtt_p99_us, f.mib_s
        );
    }
    println!(
        "relay adds: setup +{:.2} ms, RTT p50 +{:.0} us, throughput {:.0}% of direct",
        relayed.setup_p50_ms - direct.setup_p50_ms,
        relayed.rtt_p50_us - direct.rtt_p50_us,
        100.0 * relayed.mib_s / direct.mib_s
    );
    Ok(())
}
