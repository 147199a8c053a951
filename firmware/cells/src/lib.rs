//! # borg-cells: the cell types and the node that hosts them
//!
//! A cell type is its DNA (name, ports, max children; see `borg_proto::dna`) plus a sans-IO
//! implementation of [`borg_net::cell::Cell`], registered in one line of [`REGISTRY`]. A node
//! ([`run_node`]) runs every registered cell in one process, sharing one key and one network
//! clock: each cell gets its own tree on its DNA net port, its receptor and its monitor.
//! `peerTreeNet` is the base cell (the tree is all runtime; its cell logic is [`ota`], the
//! node's updates); [`crono`] is network time.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use borg_net::cell::{Cell, CellInit};
use borg_net::clock::NetClock;
use borg_net::node::{self, BaseFollow, CellRouter, NodeConfig, NodeError, NodeHandle};
use borg_proto::dna::{self, CellDna};

pub mod crono;
pub mod ftree;
pub mod members;
pub mod ota;
pub mod shard;

/// One cell type: its DNA and how to make its behaviour.
#[derive(Debug, Clone, Copy)]
pub struct CellType {
    pub dna: CellDna,
    pub make: fn(CellInit) -> Box<dyn Cell>,
}

/// Every cell type this build runs, the base cell first. Adding a cell type is one line here
/// (and its module): the node actor, the receptor, the monitor and PID 1 need no edit.
pub const REGISTRY: &[CellType] = &[
    CellType {
        dna: dna::PEER_TREE_NET,
        make: ota::OtaCell::boxed,
    },
    CellType {
        dna: dna::CRONO_TREE,
        make: crono::CronoCell::boxed,
    },
    CellType {
        dna: dna::SHARD_TREE,
        make: shard::ShardCell::boxed,
    },
    CellType {
        dna: dna::FTREE_FILE_MGR,
        make: ftree::FtreeCell::boxed,
    },
];

/// The registered cell type called `name`.
pub fn registered(name: &str) -> Option<&'static CellType> {
    REGISTRY.iter().find(|c| c.dna.name == name)
}

/// Errors starting a cell.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error("unknown cell type {0:?}; known: {1}")]
    UnknownCell(String, String),
    #[error("cell {0} is not implemented in this build yet")]
    NotImplemented(String),
    #[error("cell {0} finds its peers through peerTreeNet: run it with `borg node`")]
    NeedsNode(String),
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
        if registered(name).is_none() {
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

/// Start one cell on `clock` and return its handle; the servers run on the current runtime.
/// `base` is set for every cell but the base cell (which it follows).
async fn start_cell(
    opts: &CellOptions,
    clock: Arc<NetClock>,
    router: Arc<CellRouter>,
    base: Option<BaseFollow>,
    cell: Box<dyn Cell>,
) -> Result<Arc<NodeHandle>, CellError> {
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
        clock,
        router,
        base,
    };
    let handle = Arc::new(node::start(cfg.clone(), cell).await?);
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

/// The node's clock: the system clock (plus the test offset), never below the build time.
fn node_clock(opts: &CellOptions) -> Arc<NetClock> {
    NetClock::new(
        opts.clock_offset_s,
        borg_proto::build::BUILD_UNIX_S * 1_000_000,
    )
}

fn init_for(
    ty: &CellType,
    opts: &CellOptions,
    key: borg_proto::identity::PublicKey,
    clock: &Arc<NetClock>,
) -> CellInit {
    CellInit {
        name: ty.dna.name,
        key,
        clock: clock.clone(),
        contacts: opts.join.iter().map(|a| a.to_string()).collect(),
        data_dir: Some(opts.data_dir.clone()),
    }
}

/// Start one registered cell on its own (`borg cell NAME`): only the base cell can run
/// alone, since every other cell finds its peers through the base tree.
pub async fn start(opts: &CellOptions) -> Result<Arc<NodeHandle>, CellError> {
    let ty = registered(opts.dna.name)
        .ok_or_else(|| CellError::NotImplemented(opts.dna.name.to_string()))?;
    if ty.dna.name != dna::PEER_TREE_NET.name {
        return Err(CellError::NeedsNode(ty.dna.name.to_string()));
    }
    let clock = node_clock(opts);
    let key = borg_proto::identity::SecretKey::load_or_create(&opts.data_dir)
        .map_err(NodeError::from)?
        .public();
    let cell = (ty.make)(init_for(ty, opts, key, &clock));
    start_cell(opts, clock, Arc::new(CellRouter::default()), None, cell).await
}

/// Start a whole node: every registered cell, each on its DNA ports on `opts.ip` (the base
/// cell on `opts`' ports), sharing the key in `opts.data_dir` and one network clock. Returns
/// the handles, the base cell first.
pub async fn start_node(opts: &CellOptions) -> Result<Vec<Arc<NodeHandle>>, CellError> {
    start_node_with(opts, REGISTRY).await
}

/// [`start_node`] with another registry (tests register toy cells); its first entry must be
/// the base cell.
pub async fn start_node_with(
    opts: &CellOptions,
    registry: &[CellType],
) -> Result<Vec<Arc<NodeHandle>>, CellError> {
    let clock = node_clock(opts);
    let key = borg_proto::identity::SecretKey::load_or_create(&opts.data_dir)
        .map_err(NodeError::from)?
        .public();
    let router = Arc::new(CellRouter::default());
    // Make every cell first: a time cell announces itself to the clock, and the base cell
    // then waits (bounded) for network time before it joins.
    let mut made: Vec<(&CellType, Box<dyn Cell>)> = registry
        .iter()
        .map(|ty| (ty, (ty.make)(init_for(ty, opts, key, &clock))))
        .collect();
    let mut handles: Vec<Arc<NodeHandle>> = Vec::new();
    let mut follow: Option<BaseFollow> = None;
    for (ty, cell) in made.drain(..) {
        let mut o = opts.clone();
        if follow.is_some() {
            o.dna = ty.dna;
            o.net_port = ty.dna.net_port;
            o.recp_port = ty.dna.recp_port;
            o.mon_port = ty.dna.mon_port;
            o.max_children = ty.dna.max_children as u64;
            o.nat = false;
            o.port_mapping = false;
            // Its peers come from the base tree.
            o.join = Vec::new();
        }
        let h = start_cell(&o, clock.clone(), router.clone(), follow.clone(), cell).await?;
        if follow.is_none() {
            follow = Some(BaseFollow {
                nat: h.nat.clone(),
                view: h.base_view.clone(),
            });
        }
        handles.push(h);
    }
    if let Some(base) = handles.first() {
        let sibs = handles
            .iter()
            .skip(1)
            .map(|h| {
                let name = h.status()["cell"].as_str().unwrap_or("").to_string();
                (name, h.snapshot.clone())
            })
            .collect();
        let _ = base.siblings.set(sibs);
    }
    Ok(handles)
}

/// Run a whole node until SIGTERM or SIGINT.
pub async fn run_node(opts: CellOptions) -> Result<(), CellError> {
    let handles = start_node(&opts).await?;
    wait_for_stop().await;
    tracing::info!("stopping");
    for h in &handles {
        h.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
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
