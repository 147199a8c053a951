//! # borg-cells: the cell runtime
//!
//! A cell type is its DNA (name, ports, max children; see `borg_proto::dna`). Running a cell
//! means: load the node key, start the tree node on the net port, the receptor on the recp
//! port and the monitor on the mon port, then run until told to stop. `peerTreeNet` is the
//! base cell; later cell types add their receptor kinds on top of the same runtime.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use borg_net::node::{self, NodeConfig, NodeError};
use borg_proto::dna::{self, CellDna};

/// Errors starting a cell.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error("unknown cell type {0:?}; known: {1}")]
    UnknownCell(String, String),
    #[error("cell {0} is not implemented in this build yet")]
    NotImplemented(String),
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Everything needed to run one cell.
#[derive(Debug, Clone)]
pub struct CellOptions {
    pub dna: CellDna,
    pub data_dir: PathBuf,
    pub ip: IpAddr,
    pub net_port: u16,
    pub recp_port: u16,
    pub mon_port: u16,
    pub join: Vec<SocketAddr>,
    pub max_children: u64,
    pub heartbeat_ms: u64,
    /// Reachability (NAT role, port mapping, relaying, LAN beacons): peerTreeNet's job.
    pub nat: bool,
    pub port_mapping: bool,
    /// Test only: the local clock reads the system clock plus this many seconds.
    pub clock_offset_s: i64,
}

impl CellOptions {
    /// Defaults from the DNA of `name`, listening on `ip`.
    pub fn from_dna(name: &str, ip: IpAddr, data_dir: PathBuf) -> Result<Self, CellError> {
        let dna = *dna::cell(name).ok_or_else(|| {
            let known: Vec<&str> = dna::CELLS.iter().map(|c| c.name).collect();
            CellError::UnknownCell(name.to_string(), known.join(", "))
        })?;
        if !dna.implemented {
            return Err(CellError::NotImplemented(name.to_string()));
        }
        Ok(Self {
            dna,
            data_dir,
            ip,
            net_port: dna.net_port,
            recp_port: dna.recp_port,
            mon_port: dna.mon_port,
            join: Vec::new(),
            max_children: dna.max_children as u64,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            nat: dna.name == dna::PEER_TREE_NET.name,
            port_mapping: true,
            clock_offset_s: 0,
        })
    }
}

/// Heartbeat period of a real node.
pub const DEFAULT_HEARTBEAT_MS: u64 = 1000;

/// Start a cell and return its node handle; the servers run on the current runtime.
pub async fn start(opts: &CellOptions) -> Result<Arc<node::NodeHandle>, CellError> {
    let cfg = NodeConfig {
        cell: opts.dna.name.to_string(),
        data_dir: opts.data_dir.clone(),
        listen: SocketAddr::new(opts.ip, opts.net_port),
        recp: SocketAddr::new(opts.ip, opts.recp_port),
        mon: SocketAddr::new(opts.ip, opts.mon_port),
        join: opts.join.clone(),
        advertise: if opts.ip.is_unspecified() {
            wait_for_primary_ip(std::time::Duration::from_secs(60)).await
        } else {
            None
        },
        max_children: opts.max_children,
        heartbeat_ms: opts.heartbeat_ms,
        nat: opts.nat,
        port_mapping: opts.port_mapping,
        clock: borg_net::clock::NetClock::new(
            opts.clock_offset_s,
            borg_proto::build::BUILD_UNIX_S * 1_000_000,
        ),
    };
    let handle = Arc::new(node::start(cfg.clone()).await?);
    borg_net::serve::serve_receptor(handle.clone(), cfg.recp, cfg.cell.clone()).await?;
    borg_net::serve::serve_monitor(handle.clone(), cfg.mon).await?;
    tracing::info!(
        cell = %cfg.cell,
        key = %handle.key.public(),
        tree = %cfg.listen,
        receptor = %format!("https://{}", cfg.recp),
        monitor = %format!("http://{}", cfg.mon),
        "cell started"
    );
    Ok(handle)
}

/// The address of the interface that holds the default route, found by "connecting" a UDP
/// socket to the default gateway (no packet is sent). Used as the advertised address when a
/// cell listens on 0.0.0.0, as on the appliance.
pub fn primary_ip() -> Option<IpAddr> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let gateway = routes.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Destination 00000000 = default route; the gateway is little-endian hex.
        if f.len() > 2 && f[1] == "00000000" {
            let g = u32::from_str_radix(f[2], 16).ok()?;
            Some(std::net::Ipv4Addr::from(g.swap_bytes()))
        } else {
            None
        }
    })?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(SocketAddr::new(IpAddr::V4(gateway), 9)).ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Wait (polling, bounded) until the machine has an address on its default route: on the
/// appliance the supervisor starts cells while DHCP may still be running, and a node must
/// not advertise 0.0.0.0 to its peers. Without one in time, the node runs on loopback only.
async fn wait_for_primary_ip(limit: std::time::Duration) -> Option<IpAddr> {
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        if let Some(ip) = primary_ip() {
            return Some(ip);
        }
        if start.elapsed() >= limit {
            tracing::warn!("no default route after {limit:?}: advertising loopback only");
            return Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        }
        if !said {
            tracing::info!("waiting for a network address (DHCP) before joining");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Run a cell until SIGTERM or SIGINT.
pub async fn run(opts: CellOptions) -> Result<(), CellError> {
    let handle = start(&opts).await?;
    wait_for_stop().await;
    tracing::info!(cell = %opts.dna.name, "stopping");
    // Give the router its port back before exiting (bounded).
    handle.shutdown().await;
    tracing::info!(cell = %opts.dna.name, "stopped");
    Ok(())
}

async fn wait_for_stop() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
