//! # Real NAT topologies in network namespaces
//!
//! Builds small networks out of `ip netns`, veth pairs and bridges, with home routers that do
//! what home routers do (MASQUERADE, drop unsolicited inbound, optionally a real miniupnpd):
//!
//! ```text
//!  public host ns ─┐                                   ┌─ LAN host ns (10.0.1.10)
//!  public host ns ─┼─ "internet" ns: bridge ─ router ns ┤  LAN bridge 10.0.1.1/24
//!                  │                  (WAN veth,       └─ LAN host ns (10.0.1.11)
//!                  │                   MASQUERADE, miniupnpd)
//!                  └─ another router ns ─ its own LAN ...
//! ```
//!
//! - [`Topology::new`] then [`Topology::internet`], [`Topology::public_host`],
//!   [`Topology::home_lan`], [`Topology::lan_host`]. Every subnet is a /24.
//! - [`Ns::command`] runs a program inside a namespace; [`InNs`] runs a role of the current
//!   test binary there (tests/ forbids unsafe, so no `setns`: the binary is re-executed with
//!   `ip netns exec`) and talks to it in lines over stdin/stdout.
//! - Names are unique per process and topology (`bt<pid%10000>n<k>`, interfaces at most 15
//!   characters), so parallel tests and leftovers of a killed run do not clash. Dropping the
//!   [`Topology`], also while a test panics, kills the daemons and every process left in its
//!   namespaces and deletes the namespaces, which removes their veths and bridges. Nothing
//!   touches the root namespace's interfaces or firewall. A run killed with SIGKILL leaves its
//!   namespaces (and their miniupnpd) behind; remove them with
//!   `for n in $(ip netns list | grep -o '^bt[0-9]*n[0-9]*-[^ ]*'); do ip netns pids $n | xargs -r kill; ip netns del $n; done`.
//! - Router firewalls use `iptables-legacy`: Debian's `miniupnpd-iptables` programs the legacy
//!   tables through libiptc, so its chains (and the DNAT rules it adds to them) must live there.
//! - miniupnpd refuses to map anything while its WAN address is private or reserved (it checks
//!   against RFC 1918, 100.64/10, the documentation ranges 192.0.2/24, 198.51.100/24,
//!   203.0.113/24, 198.18/15, ...), so the "internet" of a UPnP test must use a public-looking
//!   subnet. It never leaves the namespaces.
//!
//! Tests call [`enabled`] first: it returns false only when `BORG_NETNS_TESTS=0`; missing root
//! or tools fail the test with a message saying what to install (`ci/setup.sh` does).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Set to `0` to skip the namespace tests (for machines where root is not available).
pub const SKIP_ENV: &str = "BORG_NETNS_TESTS";

/// miniupnpd's HTTP (UPnP description and control) port on every router: fixed, so the
/// mapping list can be read without an SSDP search.
pub const MINIUPNPD_HTTP_PORT: u16 = 5000;

/// How long one setup command (`ip`, `iptables-legacy-restore`, `upnpc`) may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(10);

/// How long a daemon may take to start listening.
const DAEMON_DEADLINE: Duration = Duration::from_secs(10);

/// The tools the topologies need, with the Debian package that brings each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("iptables-legacy", "iptables"),
    ("iptables-legacy-restore", "iptables"),
    ("miniupnpd", "miniupnpd-iptables"),
    ("upnpc", "miniupnpc"),
    ("sh", "dash"),
];

/// Where a tool lives: `PATH` first, then the sbin directories a non-login root shell may lack.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Whether this machine can build topologies: root, and the tools present.
pub fn available() -> Result<(), String> {
    let mut missing = Vec::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next());
    if uid != Some("0") {
        missing.push("root (network namespaces and firewall rules need CAP_NET_ADMIN)".to_string());
    }
    for (name, package) in TOOLS {
        if !tool(name).is_file() {
            missing.push(format!("{name} (Debian package {package})"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the netns tests need: {}; run ci/setup.sh as root, or set {SKIP_ENV}=0 to skip them",
            missing.join(", ")
        ))
    }
}

/// Call first in a namespace test: false (and a note) when `BORG_NETNS_TESTS=0`, true when the
/// machine is ready; panics with what is missing otherwise, so a CI machine without the tools
/// fails loudly instead of passing by skipping.
pub fn enabled() -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "0") {
        eprintln!("skipped: {SKIP_ENV}=0");
        return false;
    }
    if let Err(e) = available() {
        panic!("{e}");
    }
    true
}

/// Run `cmd` to completion within `within` (killing it if it overruns), feeding it `stdin`.
/// Ok with its output if it exited successfully; otherwise what went wrong, with its stderr.
pub fn run_with_deadline(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    within: Duration,
) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small inputs (rule sets) fit the pipe; the pipe closes when `pipe` drops.
        pipe.write_all(input)
            .map_err(|e| format!("{what}: writing stdin: {e}"))?;
    }
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + within;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: still running after {within:?}, killed"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let output = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{what}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `ip <args>`, which must succeed.
fn ip(args: &[&str]) {
    let mut cmd = Command::new(tool("ip"));
    cmd.args(args);
    if let Err(e) = run_with_deadline(&mut cmd, None, COMMAND_DEADLINE) {
        panic!("{e}");
    }
}

/// The address `last` in the /24 of `subnet`.
fn host_in(subnet: Ipv4Addr, last: u8) -> Ipv4Addr {
    let [a, b, c, _] = subnet.octets();
    Ipv4Addr::new(a, b, c, last)
}

/// A network namespace of a topology.
#[derive(Debug, Clone)]
pub struct Ns {
    pub name: String,
    /// Its address: a host's only address; a router's LAN address (its hosts' gateway).
    pub ip: Ipv4Addr,
}

impl Ns {
    /// `program` to be run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(tool("ip"));
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Run `program args` here to completion (bounded); its stdout. Panics if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let mut cmd = self.command(tool(program));
        cmd.args(args);
        match run_with_deadline(&mut cmd, None, COMMAND_DEADLINE) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => panic!("in {}: {e}", self.name),
        }
    }

    /// Whether something listens on `port` here (`tcp` or `udp`).
    pub fn listening(&self, proto: &str, port: u16) -> bool {
        let flag = if proto == "udp" { "-Hlnu" } else { "-Hlnt" };
        let suffix = format!(":{port}");
        self.run("ss", &[flag])
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .any(|local| local.ends_with(&suffix))
    }
}

/// A home router and its LAN.
#[derive(Debug, Clone)]
pub struct Lan {
    /// The router's namespace; `router.ip` is its LAN address, the hosts' default gateway.
    pub router: Ns,
    /// The router's address on the internet.
    pub wan_ip: Ipv4Addr,
    /// The LAN's network address (a /24).
    pub subnet: Ipv4Addr,
    /// Whether a miniupnpd (UPnP-IGD, PCP, NAT-PMP) runs on the router.
    pub upnp: bool,
    bridge: String,
    wan: String,
}

impl Lan {
    pub fn gateway(&self) -> Ipv4Addr {
        self.router.ip
    }

    /// The LAN's broadcast address, where nodes send their beacons.
    pub fn broadcast(&self) -> Ipv4Addr {
        host_in(self.subnet, 255)
    }

    /// Forward TCP `port` on the WAN address to `host` (the same port), as a user does by
    /// hand in a router's web page.
    pub fn forward_port(&self, port: u16, host: Ipv4Addr) {
        let p = port.to_string();
        let to = format!("{host}:{port}");
        self.router.run(
            "iptables-legacy",
            &[
                "-t",
                "nat",
                "-I",
                "PREROUTING",
                "1",
                "-i",
                &self.wan,
                "-p",
                "tcp",
                "--dport",
                &p,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ],
        );
        let h = host.to_string();
        self.router.run(
            "iptables-legacy",
            &[
                "-I", "FORWARD", "1", "-i", &self.wan, "-p", "tcp", "-d", &h, "--dport", &p, "-j",
                "ACCEPT",
            ],
        );
    }

    /// The TCP mappings miniupnpd holds, as (external port, internal address, internal port),
    /// whichever protocol made them. Asked of miniupnpd itself (`upnpc -l`, which reads its
    /// GetGenericPortMappingEntry list) rather than read from the firewall: the list is its own
    /// state, and `iptables-legacy -L` cannot even print the DNAT targets miniupnpd writes
    /// ("unsupported revision"). Empty without UPnP.
    pub fn upnp_mappings(&self) -> Vec<(u16, Ipv4Addr, u16)> {
        if !self.upnp {
            return Vec::new();
        }
        let url = format!(
            "http://{}:{MINIUPNPD_HTTP_PORT}/rootDesc.xml",
            self.gateway()
        );
        let out = self.router.run("upnpc", &["-u", &url, "-l"]);
        parse_upnpc_list(&out)
    }
}

/// The TCP rows of `upnpc -l`, e.g. ` 0 TCP 13300->10.0.1.10:13300 'borg' '' 600`.
fn parse_upnpc_list(out: &str) -> Vec<(u16, Ipv4Addr, u16)> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            f.next()?.parse::<u32>().ok()?;
            if f.next()? != "TCP" {
                return None;
            }
            let (ext, int) = f.next()?.split_once("->")?;
            let (ip, port) = int.split_once(':')?;
            Some((ext.parse().ok()?, ip.parse().ok()?, port.parse().ok()?))
        })
        .collect()
}

struct Daemon {
    what: String,
    child: Child,
    log: PathBuf,
}

struct Internet {
    ns: String,
    bridge: String,
    subnet: Ipv4Addr,
}

/// A set of namespaces forming one network; everything goes away on drop.
pub struct Topology {
    prefix: String,
    tag: String,
    dir: tempfile::TempDir,
    /// In creation order; deleted in reverse.
    namespaces: Vec<String>,
    daemons: Vec<Daemon>,
    next_link: u32,
    internet: Option<Internet>,
}

/// Per-process counter behind unique prefixes.
static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// An empty topology; `tag` (the test's name, shortened) appears in namespace names so a
    /// leftover can be traced to its test.
    pub fn new(tag: &str) -> Topology {
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        let pid = std::process::id() % 10_000;
        // The first namespace doubles as the claim on the prefix: `ip netns add` fails if the
        // name exists, e.g. left over by a killed run whose pid matched ours modulo 10000.
        for _ in 0..100 {
            let n = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
            let prefix = format!("bt{pid}n{n}");
            let anchor = format!("{prefix}-{tag}-inet");
            if Path::new("/run/netns").join(&anchor).exists() {
                continue;
            }
            ip(&["netns", "add", &anchor]);
            ip(&["-n", &anchor, "link", "set", "lo", "up"]);
            return Topology {
                prefix,
                tag,
                dir: tempfile::tempdir().expect("temporary directory for the topology"),
                namespaces: vec![anchor],
                daemons: Vec::new(),
                next_link: 0,
                internet: None,
            };
        }
        panic!("no free namespace prefix for bt{pid}n*: leftovers? (see the module notes)");
    }

    /// Where daemons' configuration and logs go.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn add_ns(&mut self, name: &str) -> String {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "namespace name {name:?}: letters, digits and '-' only"
        );
        let ns = format!("{}-{}-{name}", self.prefix, self.tag);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A fresh interface name (at most 15 characters, the kernel's limit).
    fn ifname(&mut self, kind: char) -> String {
        let name = format!("{}{kind}{}", self.prefix, self.next_link);
        self.next_link += 1;
        assert!(name.len() <= 15, "interface name {name} too long");
        name
    }

    /// A veth pair with one end in each namespace; returns (end in `a`, end in `b`).
    fn veth(&mut self, a: &str, b: &str) -> (String, String) {
        let end_a = self.ifname('v');
        let end_b = format!("{end_a}p");
        assert!(end_b.len() <= 15, "interface name {end_b} too long");
        ip(&[
            "link", "add", &end_a, "netns", a, "type", "veth", "peer", "name", &end_b, "netns", b,
        ]);
        (end_a, end_b)
    }

    fn internet_ref(&self) -> &Internet {
        self.internet
            .as_ref()
            .expect("call Topology::internet before attaching hosts or routers to it")
    }

    /// The internet: a bridge in its own namespace that public hosts and routers' WAN sides
    /// attach to. `subnet` is a /24; for a miniupnpd router it must not be a private or
    /// reserved range (see the module notes).
    pub fn internet(&mut self, subnet: Ipv4Addr) {
        let ns = self.namespaces[0].clone();
        let bridge = self.ifname('b');
        ip(&["-n", &ns, "link", "add", &bridge, "type", "bridge"]);
        ip(&["-n", &ns, "link", "set", &bridge, "up"]);
        self.internet = Some(Internet { ns, bridge, subnet });
    }

    /// Attach `ns` to the internet with `ip`; returns its interface there.
    fn attach_to_internet(&mut self, ns: &str, ip_addr: Ipv4Addr) -> String {
        let (inet_ns, bridge, subnet) = {
            let i = self.internet_ref();
            (i.ns.clone(), i.bridge.clone(), i.subnet)
        };
        assert_eq!(
            host_in(subnet, 0),
            host_in(ip_addr, 0),
            "{ip_addr} is not in the internet's {subnet}/24"
        );
        let (inside, port) = self.veth(ns, &inet_ns);
        ip(&[
            "-n", &inet_ns, "link", "set", &port, "master", &bridge, "up",
        ]);
        let cidr = format!("{ip_addr}/24");
        ip(&["-n", ns, "addr", "add", &cidr, "brd", "+", "dev", &inside]);
        ip(&["-n", ns, "link", "set", &inside, "up"]);
        inside
    }

    /// A host on the internet at `ip`.
    pub fn public_host(&mut self, name: &str, ip_addr: Ipv4Addr) -> Ns {
        let ns = self.add_ns(name);
        self.attach_to_internet(&ns, ip_addr);
        Ns {
            name: ns,
            ip: ip_addr,
        }
    }

    /// A home router at `wan_ip` on the internet with the LAN `lan_subnet`/24 behind it (router
    /// at .1). It forwards, MASQUERADEs what leaves through the WAN and drops unsolicited
    /// inbound. With `upnp`, a real miniupnpd (UPnP-IGD, PCP, NAT-PMP; secure mode; ports
    /// 1024-65535 for the LAN only) runs on the LAN bridge, and this returns once it listens.
    pub fn home_lan(
        &mut self,
        name: &str,
        wan_ip: Ipv4Addr,
        lan_subnet: Ipv4Addr,
        upnp: bool,
    ) -> Lan {
        let ns = self.add_ns(name);
        let wan = self.attach_to_internet(&ns, wan_ip);
        let bridge = self.ifname('b');
        let gateway = host_in(lan_subnet, 1);
        ip(&["-n", &ns, "link", "add", &bridge, "type", "bridge"]);
        // Without a multicast querier, IGMP snooping could stop SSDP multicast between the
        // hosts and the router's own socket; a home LAN floods multicast anyway.
        ip(&[
            "-n",
            &ns,
            "link",
            "set",
            &bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        let cidr = format!("{gateway}/24");
        ip(&["-n", &ns, "addr", "add", &cidr, "brd", "+", "dev", &bridge]);
        ip(&["-n", &ns, "link", "set", &bridge, "up"]);
        let router = Ns {
            name: ns.clone(),
            ip: gateway,
        };
        router.run("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        let rules = router_rules(&wan, upnp);
        let mut restore = router.command(tool("iptables-legacy-restore"));
        if let Err(e) = run_with_deadline(&mut restore, Some(rules.as_bytes()), COMMAND_DEADLINE) {
            panic!("router {name} firewall: {e}\nrules:\n{rules}");
        }
        let lan = Lan {
            router,
            wan_ip,
            subnet: host_in(lan_subnet, 0),
            upnp,
            bridge,
            wan: wan.clone(),
        };
        if upnp {
            self.start_miniupnpd(name, &lan, &wan);
        }
        lan
    }

    fn start_miniupnpd(&mut self, name: &str, lan: &Lan, wan: &str) {
        let dir = self.dir.path();
        let conf = dir.join(format!("{name}-miniupnpd.conf"));
        let log = dir.join(format!("{name}-miniupnpd.log"));
        let pid = dir.join(format!("{name}-miniupnpd.pid"));
        let leases = dir.join(format!("{name}-miniupnpd.leases"));
        let uuid = format!(
            "b0a9b0a9-{:04x}-4000-8000-{:012x}",
            self.next_link,
            u64::from(std::process::id())
        );
        let text = miniupnpd_conf(wan, &lan.bridge, lan.subnet, &uuid, &leases);
        std::fs::write(&conf, text).expect("writing miniupnpd.conf");
        let logf = std::fs::File::create(&log).expect("creating the miniupnpd log");
        let mut cmd = lan.router.command(tool("miniupnpd"));
        // -d: stay in the foreground, log to stderr (our log file); -P: a pid file of our own,
        // since miniupnpd refuses to start when the default one names a live process.
        cmd.arg("-d")
            .arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(&pid)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log file handle"))
            .stderr(logf);
        let child = cmd.spawn().expect("starting miniupnpd");
        self.daemons.push(Daemon {
            what: format!("miniupnpd on {name}"),
            child,
            log: log.clone(),
        });
        // Ready when its three sockets are bound: UPnP HTTP, SSDP and PCP/NAT-PMP (bound last).
        let deadline = Instant::now() + DAEMON_DEADLINE;
        loop {
            if let Some(d) = self.daemons.last_mut() {
                if let Ok(Some(status)) = d.child.try_wait() {
                    panic!(
                        "miniupnpd on {name} exited ({status}); log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
            let r = &lan.router;
            if r.listening("tcp", MINIUPNPD_HTTP_PORT)
                && r.listening("udp", 1900)
                && r.listening("udp", 5351)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "miniupnpd on {name} not listening after {DAEMON_DEADLINE:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A host on `lan` at `.ip_last_octet`, default route via the router.
    pub fn lan_host(&mut self, lan: &Lan, name: &str, ip_last_octet: u8) -> Ns {
        let ns = self.add_ns(name);
        let (inside, port) = self.veth(&ns, &lan.router.name);
        ip(&[
            "-n",
            &lan.router.name,
            "link",
            "set",
            &port,
            "master",
            &lan.bridge,
            "up",
        ]);
        let addr = host_in(lan.subnet, ip_last_octet);
        let cidr = format!("{addr}/24");
        ip(&["-n", &ns, "addr", "add", &cidr, "brd", "+", "dev", &inside]);
        ip(&["-n", &ns, "link", "set", &inside, "up"]);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &lan.gateway().to_string(),
        ]);
        Ns { name: ns, ip: addr }
    }

    /// The log of the daemons started so far (for a failing test's message).
    pub fn daemon_logs(&self) -> String {
        self.daemons
            .iter()
            .map(|d| {
                format!(
                    "--- {} ---\n{}",
                    d.what,
                    std::fs::read_to_string(&d.log).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.daemon_logs());
        }
        for d in &mut self.daemons {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            // Processes a test started in the namespace (Ns::command) would keep it, and its
            // veths, alive after `ip netns del`.
            let mut pids = Command::new(tool("ip"));
            pids.args(["netns", "pids", ns]);
            if let Ok(out) = run_with_deadline(&mut pids, None, COMMAND_DEADLINE) {
                let pids = String::from_utf8_lossy(&out.stdout);
                let pids: Vec<&str> = pids.split_whitespace().collect();
                if !pids.is_empty() {
                    let mut kill = Command::new(tool("sh"));
                    kill.arg("-c").arg(format!("kill -9 {}", pids.join(" ")));
                    let _ = run_with_deadline(&mut kill, None, COMMAND_DEADLINE);
                }
            }
            let mut del = Command::new(tool("ip"));
            del.args(["netns", "del", ns]);
            if let Err(e) = run_with_deadline(&mut del, None, COMMAND_DEADLINE) {
                eprintln!("netns cleanup: {e}");
            }
        }
    }
}

/// The router's firewall, for `iptables-legacy-restore`. The MINIUPNPD chains are the ones
/// Debian's iptables_init.sh creates (nat and mangle PREROUTING from the WAN, filter FORWARD
/// from the WAN, nat POSTROUTING to the WAN); miniupnpd fills them. Inbound from the WAN is
/// dropped unless it belongs to a connection from inside or miniupnpd let it in.
fn router_rules(wan: &str, upnp: bool) -> String {
    let mut r = String::new();
    let mut line = |s: String| {
        r.push_str(&s);
        r.push('\n');
    };
    line("*nat".into());
    for c in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        line(format!(":{c} ACCEPT [0:0]"));
    }
    if upnp {
        line(":MINIUPNPD - [0:0]".into());
        line(":MINIUPNPD-POSTROUTING - [0:0]".into());
        line(format!("-A PREROUTING -i {wan} -j MINIUPNPD"));
        line(format!("-A POSTROUTING -o {wan} -j MINIUPNPD-POSTROUTING"));
    }
    line(format!("-A POSTROUTING -o {wan} -j MASQUERADE"));
    line("COMMIT".into());
    if upnp {
        line("*mangle".into());
        for c in ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"] {
            line(format!(":{c} ACCEPT [0:0]"));
        }
        line(":MINIUPNPD - [0:0]".into());
        line(format!("-A PREROUTING -i {wan} -j MINIUPNPD"));
        line("COMMIT".into());
    }
    line("*filter".into());
    for c in ["INPUT", "FORWARD", "OUTPUT"] {
        line(format!(":{c} ACCEPT [0:0]"));
    }
    if upnp {
        line(":MINIUPNPD - [0:0]".into());
        line(format!("-A FORWARD -i {wan} ! -o {wan} -j MINIUPNPD"));
    }
    line(format!(
        "-A FORWARD -i {wan} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    ));
    line(format!("-A FORWARD -i {wan} -j DROP"));
    line("COMMIT".into());
    r
}

/// miniupnpd's configuration: UPnP-IGD and NAT-PMP/PCP on the LAN bridge, mapping only to the
/// asking host (secure mode), unprivileged ports for the LAN only.
fn miniupnpd_conf(wan: &str, bridge: &str, subnet: Ipv4Addr, uuid: &str, leases: &Path) -> String {
    format!(
        "ext_ifname={wan}\n\
         listening_ip={bridge}\n\
         http_port={MINIUPNPD_HTTP_PORT}\n\
         enable_upnp=yes\n\
         enable_natpmp=yes\n\
         secure_mode=yes\n\
         system_uptime=no\n\
         notify_interval=60\n\
         uuid={uuid}\n\
         lease_file={}\n\
         allow 1024-65535 {subnet}/24 1024-65535\n\
         deny 0-65535 0.0.0.0/0 0-65535\n",
        leases.display()
    )
}

/// Environment variable naming the role an [`InNs`] process plays.
pub const ROLE_ENV: &str = "BORG_NETNS_ROLE";

/// Lines an [`InNs`] role prints start with this, so they stand out of libtest's own output.
pub const ROLE_MARK: &str = "@@ ";

/// The role this process was started for, if any: a test binary's role helper test calls this
/// and does nothing when it is `None` (a normal test run).
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// Print a line for the parent (see [`InNs::expect`]).
pub fn role_say(line: &str) {
    println!("{ROLE_MARK}{line}");
    let _ = std::io::stdout().flush();
}

/// The current test binary running one of its tests inside a namespace, as a role (an
/// environment variable the test reads), talking in lines: the role prints with [`role_say`]
/// and reads commands from stdin. Killed on drop.
pub struct InNs {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl InNs {
    /// Start `test_name` of the current test binary in `ns` with [`ROLE_ENV`] = `role` and
    /// the extra `env`.
    pub fn start(ns: &Ns, test_name: &str, role: &str, env: &[(&str, String)]) -> InNs {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut cmd = ns.command(exe);
        cmd.args(["--exact", test_name, "--nocapture", "--test-threads=1"])
            .env(ROLE_ENV, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .expect("re-executing the test binary in a namespace");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print "test name ... " on the same line before the role's text.
                if let Some(i) = line.find(ROLE_MARK) {
                    if tx.send(line[i + ROLE_MARK.len()..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        InNs {
            child,
            stdin,
            lines,
            what: format!("role {role} in {}", ns.name),
        }
    }

    /// The role's next line, which must start with `prefix` and come within `within`.
    pub fn expect(&mut self, prefix: &str, within: Duration) -> String {
        match self.lines.recv_timeout(within) {
            Ok(line) if line.starts_with(prefix) => line,
            Ok(line) => panic!("{}: expected {prefix:?}, got {line:?}", self.what),
            Err(_) => panic!(
                "{}: no {prefix:?} line within {within:?} (exited: {:?})",
                self.what,
                self.child.try_wait().ok().flatten()
            ),
        }
    }

    /// Send the role one line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("role stdin");
        writeln!(stdin, "{line}").expect("writing to the role");
        stdin.flush().expect("writing to the role");
    }

    /// Close the role's stdin and wait (bounded) for it to exit; whether it succeeded.
    pub fn finish(mut self, within: Duration) -> bool {
        self.stdin = None;
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return false,
            }
        }
    }
}

impl Drop for InNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upnpc_list_rows() {
        let out = "ExternalIPAddress = 11.0.0.2\n \
                   i protocol exPort->inAddr:inPort description remoteHost leaseTime\n \
                   0 TCP 13300->10.0.1.10:13300 'borg node' '' 600\n \
                   1 UDP 5000->10.0.1.11:5000 'x' '' 0\n \
                   2 TCP 13301->10.0.1.11:13300 'NAT-PMP 13301 tcp' '' 590\n\
                   GetGenericPortMappingEntry() returned 713 (SpecifiedArrayIndexInvalid)\n";
        assert_eq!(
            parse_upnpc_list(out),
            vec![
                (13300, Ipv4Addr::new(10, 0, 1, 10), 13300),
                (13301, Ipv4Addr::new(10, 0, 1, 11), 13300)
            ]
        );
    }

    #[test]
    fn router_rules_jump_to_miniupnpd_chains_only_with_upnp() {
        let with = router_rules("wan0", true);
        assert!(with.contains("-A PREROUTING -i wan0 -j MINIUPNPD"));
        assert!(with.contains("*mangle"));
        let without = router_rules("wan0", false);
        assert!(!without.contains("MINIUPNPD"));
        assert!(without.contains("-A POSTROUTING -o wan0 -j MASQUERADE"));
        assert_eq!(without.matches("COMMIT").count(), 2);
    }
}
