//! The command-line front end: argument types and the thin functions behind each command.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use borg_cells::CellOptions;
use borg_net::client;
use borg_proto::dna::PEER_TREE_NET;
use borg_proto::envelope;
use borg_proto::identity::SecretKey;
use borg_proto::mnemonic;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// `IP` or `IP:PORT`; the port defaults per command.
pub(crate) fn parse_endpoint(text: &str, default_port: u16) -> Result<SocketAddr> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    bail!("{text:?} is not an address: give IP or IP:PORT, e.g. 127.0.0.2 or 127.0.0.2:{default_port}")
}

/// Raise the fd soft limit before a node opens its doors (the connection caps assume it),
/// and keep the allocator's arenas few (a node's memory stays flat while it streams).
fn prepare_node_process() {
    borg_system::sys::limit_malloc_arenas(2);
    match borg_system::sys::raise_nofile_limit(borg_system::sys::WANTED_NOFILE) {
        Ok(n) => tracing::debug!("file descriptor soft limit: {n}"),
        Err(e) => tracing::warn!("cannot raise the file descriptor limit: {e}"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // One thread: a node is small, and a single-threaded runtime keeps its memory low.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Address to listen on, IP[:PORT]; PORT defaults to 13300, and the receptor (13305) and
    /// monitor (13310) listen on the same IP.
    #[arg(long, value_name = "IP[:PORT]")]
    listen: String,
    /// A node to join through, IP[:PORT] (port 13300 by default); repeat for more contacts.
    /// With none, this node starts as the root of a tree of one.
    #[arg(long = "join", value_name = "IP[:PORT]")]
    join: Vec<String>,
    /// Data directory (the node key lives here, created on first start).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Children per node (k); all nodes of one tree must agree.
    #[arg(long, default_value_t = PEER_TREE_NET.max_children as u64)]
    max_children: u64,
    /// Heartbeat period in milliseconds; failures are repaired within two periods.
    #[arg(long, default_value_t = borg_cells::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// Receptor port (HTTPS).
    #[arg(long, default_value_t = PEER_TREE_NET.recp_port)]
    recp_port: u16,
    /// Monitor port (HTTP, read-only).
    #[arg(long, default_value_t = PEER_TREE_NET.mon_port)]
    mon_port: u16,
    /// Do not work out reachability: no probes, LAN beacons, port mapping or relaying; the
    /// node advertises its listen address as it is (e.g. for loopback-only networks).
    #[arg(long)]
    no_nat: bool,
    /// Never ask the router for a port mapping (UPnP-IGD, PCP, NAT-PMP); the node still
    /// finds its role and can be relayed.
    #[arg(long)]
    no_port_mapping: bool,
    /// Test only: run the node's local clock this many seconds off the system clock (e.g.
    /// -1700000000 for a board without RTC that booted at 1970).
    #[arg(long, hide = true, default_value_t = 0, allow_hyphen_values = true)]
    clock_offset_s: i64,
}

pub fn node(args: NodeArgs) -> Result<()> {
    let listen = parse_endpoint(&args.listen, PEER_TREE_NET.net_port)?;
    let mut opts = CellOptions::from_dna(PEER_TREE_NET.name, listen.ip(), args.data)?;
    opts.net_port = listen.port();
    opts.recp_port = args.recp_port;
    opts.mon_port = args.mon_port;
    opts.max_children = args.max_children.max(1);
    opts.heartbeat_ms = args.heartbeat_ms.max(50);
    opts.nat = !args.no_nat;
    opts.port_mapping = !args.no_port_mapping;
    opts.clock_offset_s = args.clock_offset_s;
    opts.join = args
        .join
        .iter()
        .map(|j| parse_endpoint(j, PEER_TREE_NET.net_port))
        .collect::<Result<_>>()?;
    prepare_node_process();
    runtime()?.block_on(borg_cells::run_node(opts))?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct CellArgs {
    /// Cell type name from the DNA table, e.g. peerTreeNet.
    name: String,
    /// Data directory of this cell.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// IP to listen on (ports come from the DNA).
    #[arg(long, default_value = "0.0.0.0")]
    listen: IpAddr,
    /// Nodes to join through, IP[:PORT].
    #[arg(long = "join", value_name = "IP[:PORT]")]
    join: Vec<String>,
    /// Test only: run the local clock this many seconds off the system clock.
    #[arg(long, hide = true, default_value_t = 0, allow_hyphen_values = true)]
    clock_offset_s: i64,
}

pub fn cell(args: CellArgs) -> Result<()> {
    let mut opts = CellOptions::from_dna(&args.name, args.listen, args.data)?;
    opts.clock_offset_s = args.clock_offset_s;
    opts.join = args
        .join
        .iter()
        .map(|j| parse_endpoint(j, opts.net_port))
        .collect::<Result<_>>()?;
    prepare_node_process();
    runtime()?.block_on(borg_cells::run(opts))?;
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum IdCommand {
    /// Print a fresh 24-word BIP39 phrase and the public key derived from it (m/0').
    /// Write the phrase down and keep it secret: it is the identity.
    New {
        #[arg(long)]
        json: bool,
    },
    /// Print the public key of your phrase (SLIP-0010 NIST P-256 at m/0'). Without
    /// --phrase-file: the phrase kept in your config dir ($XDG_CONFIG_HOME/borg/phrase, else
    /// ~/.config/borg/phrase), made on first use with a warning to write it down.
    Show {
        /// File holding the phrase (24 words), e.g. on a USB stick.
        #[arg(long, value_name = "FILE")]
        phrase_file: Option<PathBuf>,
        /// File holding the optional BIP39 passphrase.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn id(cmd: IdCommand) -> Result<()> {
    match cmd {
        IdCommand::New { json } => {
            let phrase = mnemonic::generate_phrase();
            let key = mnemonic::user_key(&phrase, "")?;
            if json {
                println!(
                    "{}",
                    json!({"phrase": phrase, "public_key": key.public().to_b64(), "path": "m/0'"})
                );
            } else {
                println!("phrase:     {phrase}");
                println!("public key: {}", key.public());
                println!("Write the phrase down and keep it secret: anyone who has it is you.");
            }
        }
        IdCommand::Show {
            phrase_file,
            passphrase_file,
            json,
        } => {
            let user = crate::userkey::load(phrase_file.as_deref(), passphrase_file.as_deref())?;
            let key = mnemonic::user_key(&user.phrase, &user.passphrase)
                .map_err(|e| anyhow!("invalid phrase in {}: {e}", user.source.display()))?;
            if json {
                println!(
                    "{}",
                    json!({"public_key": key.public().to_b64(), "path": "m/0'"})
                );
            } else {
                println!("{}", key.public());
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The node's monitor, IP[:PORT] (port 13310 by default).
    #[arg(long, value_name = "IP[:MONPORT]")]
    node: String,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs) -> Result<()> {
    let addr = parse_endpoint(&args.node, PEER_TREE_NET.mon_port)?;
    let st = runtime()?
        .block_on(client::status(addr))
        .with_context(|| format!("is a node running with its monitor on {addr}?"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    let s = |k: &str| st.get(k).map(|v| v.to_string()).unwrap_or_default();
    println!("node        {}", st["public_key"].as_str().unwrap_or("?"));
    println!("state       {}", st["state"].as_str().unwrap_or("?"));
    println!("position    {}  (depth {})", s("position"), s("depth"));
    println!("tree size   {}", s("size"));
    if let Some(p) = st["parent"].as_object() {
        println!(
            "parent      {} at {}",
            p["pos"],
            p["addr"].as_str().unwrap_or("?")
        );
    }
    let children: Vec<String> = st["children"]
        .as_array()
        .map(|a| a.iter().map(|c| c["pos"].to_string()).collect())
        .unwrap_or_default();
    println!(
        "children    {}",
        if children.is_empty() {
            "-".into()
        } else {
            children.join(" ")
        }
    );
    if let Some(r) = st["root"].as_object() {
        println!(
            "root        {} at {}",
            short(r["key"].as_str().unwrap_or("?")),
            r["addr"].as_str().unwrap_or("?")
        );
    }
    println!("uptime      {} s", s("uptime_s"));
    println!("broadcasts  {} delivered", s("delivered_broadcasts"));
    if let Some(role) = st["nat_role"].as_str() {
        let reason = st["nat_reason"].as_str().unwrap_or("");
        println!("nat role    {role} ({reason})");
        let ext = st["external_addr"].as_str().unwrap_or("-");
        println!("external    {ext}");
        if let Some(r) = st["relay"]["addr"].as_str() {
            println!("relay       {r}");
        }
        let m = &st["mapping"];
        if let Some(state) = m["state"].as_str().filter(|s| *s != "none") {
            let detail = m["external"]
                .as_str()
                .or(m["reason"].as_str())
                .unwrap_or("");
            println!("mapping     {state} {detail}");
        }
    }
    println!("time        {}", time_line(&st["time"]));
    if let Some(cells) = st["cells"].as_array() {
        for c in cells {
            println!(
                "cell        {:<12} {:<8} size {:<5} net {}",
                c["name"].as_str().unwrap_or("?"),
                c["state"].as_str().unwrap_or("?"),
                c["size"],
                c["net"].as_str().unwrap_or("?"),
            );
        }
    }
    Ok(())
}

/// One line on network time, from a status' `time` object.
fn time_line(t: &Value) -> String {
    if t["synced"].as_bool() != Some(true) {
        return "not synced (local clock, raised to the build time)".into();
    }
    let source = match t["source"].as_str() {
        Some(s @ ("local" | "bootstrap")) => s.to_string(),
        Some(k) => format!("parent {}", short(k)),
        None => "?".into(),
    };
    format!(
        "synced, stratum {}, error bound {} ms, {source}, network - local clock {} ms",
        t["stratum"], t["error_bound_ms"], t["offset_ms"]
    )
}

fn short(key: &str) -> String {
    key.chars().take(8).collect()
}

#[derive(Args, Debug)]
pub struct TreeArgs {
    /// Any node's monitor, IP[:PORT] (port 13310 by default).
    #[arg(long, value_name = "IP[:MONPORT]")]
    node: String,
    /// Print the tree as JSON instead of a drawing.
    #[arg(long)]
    json: bool,
}

/// Walk the tree from its root through every node's monitor and collect statuses.
pub async fn collect_tree(start: SocketAddr) -> Result<Vec<Value>> {
    let first = client::status(start).await?;
    let root_mon = first["root"]["mon"]
        .as_str()
        .and_then(|m| m.parse::<SocketAddr>().ok())
        .unwrap_or(start);
    let mut out = Vec::new();
    let mut queue = VecDeque::from([root_mon]);
    let mut seen = std::collections::HashSet::new();
    while let Some(addr) = queue.pop_front() {
        if !seen.insert(addr) || seen.len() > 100_000 {
            continue;
        }
        let st = match client::status(addr).await {
            Ok(st) => st,
            Err(e) => {
                out.push(json!({"mon": addr.to_string(), "error": e.to_string()}));
                continue;
            }
        };
        if let Some(children) = st["children"].as_array() {
            for c in children {
                if let Some(m) = c["mon"].as_str().and_then(|m| m.parse().ok()) {
                    queue.push_back(m);
                }
            }
        }
        out.push(st);
    }
    Ok(out)
}

pub fn tree(args: TreeArgs) -> Result<()> {
    let addr = parse_endpoint(&args.node, PEER_TREE_NET.mon_port)?;
    let nodes = runtime()?
        .block_on(collect_tree(addr))
        .with_context(|| format!("is a node running with its monitor on {addr}?"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    print!("{}", draw_tree(&nodes));
    Ok(())
}

/// Draw statuses as an indented tree by position.
pub fn draw_tree(nodes: &[Value]) -> String {
    use std::collections::BTreeMap;
    let by_pos: BTreeMap<u64, &Value> = nodes
        .iter()
        .filter_map(|n| n["position"].as_u64().map(|p| (p, n)))
        .collect();
    let mut out = String::new();
    let size = by_pos
        .values()
        .next()
        .and_then(|r| r["size"].as_u64())
        .unwrap_or(0);
    out.push_str(&format!(
        "tree of {} nodes (root says size {size})\n",
        by_pos.len()
    ));
    fn walk(
        pos: u64,
        by_pos: &BTreeMap<u64, &Value>,
        prefix: &str,
        last: bool,
        out: &mut String,
        top: bool,
    ) {
        let Some(n) = by_pos.get(&pos) else { return };
        let branch = if top {
            ""
        } else if last {
            "└── "
        } else {
            "├── "
        };
        out.push_str(&format!(
            "{prefix}{branch}{pos} {} {} [{}]\n",
            n["key"]
                .as_str()
                .or(n["public_key"].as_str())
                .map(short)
                .unwrap_or_default(),
            n["addr"].as_str().unwrap_or("?"),
            n["state"].as_str().unwrap_or("?")
        ));
        let kids: Vec<u64> = n["children"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["pos"].as_u64()).collect())
            .unwrap_or_default();
        let child_prefix = if top {
            String::new()
        } else {
            format!("{prefix}{}", if last { "    " } else { "│   " })
        };
        for (i, c) in kids.iter().enumerate() {
            walk(*c, by_pos, &child_prefix, i + 1 == kids.len(), out, false);
        }
    }
    walk(1, &by_pos, "", true, &mut out, true);
    for n in nodes.iter().filter(|n| n.get("error").is_some()) {
        out.push_str(&format!("unreachable: {} ({})\n", n["mon"], n["error"]));
    }
    out
}

#[derive(Args, Debug)]
pub struct BroadcastArgs {
    /// The node's receptor, IP[:PORT] (port 13305 by default).
    #[arg(long, value_name = "IP[:RECPPORT]")]
    node: String,
    /// The text to send to every node.
    text: String,
}

pub fn broadcast(args: BroadcastArgs) -> Result<()> {
    let addr = parse_endpoint(&args.node, PEER_TREE_NET.recp_port)?;
    // A throwaway client key signs the request; the node then originates the broadcast.
    let key = SecretKey::generate();
    let env = envelope::seal(
        &key,
        "broadcast",
        None,
        borg_net::node::now_ms(),
        json!({"text": args.text}),
    );
    let (status, body) = runtime()?
        .block_on(client::receptor_post(addr, env.to_bytes()))
        .with_context(|| format!("is a node running with its receptor on {addr}?"))?;
    if status != 200 {
        bail!(
            "node refused the broadcast ({status}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    let reply = envelope::verify_signature_only(&body)
        .map_err(|e| anyhow!("node's answer does not verify: {e}"))?;
    if reply.body.get("re").and_then(|v| v.as_str()) != Some(env.nonce.as_str()) {
        bail!("node's answer is not for this request");
    }
    println!(
        "broadcast {} sent from {}",
        reply.body["id"].as_str().unwrap_or("?"),
        reply.from
    );
    Ok(())
}
