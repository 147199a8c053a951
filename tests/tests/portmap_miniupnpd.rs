//! `borg_net::portmap` against a real miniupnpd, in network namespaces (no mocks): a node on a
//! home LAN maps a TCP port with UPnP-IGD, PCP and NAT-PMP; the mapping shows in miniupnpd's
//! list, carries a connection from a public host to the node, renews and goes away on removal.
//! A port held by a dead node's lingering mapping makes the replacement take another port.
//! Behind a router without any mapping service, `map_tcp` fails within a few seconds and says
//! what each protocol answered. Timings are printed.
//!
//! The node side runs inside the LAN host's namespace: the test binary re-executes itself
//! there (`netns::InNs`, role test `in_namespace_role`) and is driven line by line.
//! Set `BORG_NETNS_TESTS=0` to skip (needs root, iproute2, iptables, miniupnpd-iptables,
//! miniupnpc).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use borg_net::portmap::{map_tcp, map_tcp_via, MapProtocol, MapRequest, PortMapping};
use borg_tests::netns::{self, InNs, Lan, Ns, Topology, MINIUPNPD_HTTP_PORT};
use borg_tests::wait_for;

/// The "internet". Not a documentation range, unlike the rest of our test addresses:
/// miniupnpd 2.3 refuses to map while its WAN address is private or reserved (198.51.100/24
/// included), and 11.0.0.0/8 is the example of a public address in miniupnpd's own tests. It
/// exists only inside the test's namespaces.
const INTERNET: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 0);
const WAN: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 2);
const WAN_PLAIN: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 3);
const PUBLIC: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 100);
const LAN_UPNP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 0);
const LAN_PLAIN: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);

/// Per protocol attempt, as a node would use it.
const ATTEMPT: Duration = Duration::from_millis(1500);
/// What a router without any mapping service may cost at most (two attempts and slack).
const FAIL_BOUND: Duration = Duration::from_millis(4000);
const ROLE_TEST: &str = "in_namespace_role";
const ROLE_WAIT: Duration = Duration::from_secs(20);

fn env(
    gateway: Ipv4Addr,
    host: &Ns,
    internal: u16,
    wished: u16,
    via: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("BT_GATEWAY", gateway.to_string()),
        ("BT_LOCAL", host.ip.to_string()),
        ("BT_INTERNAL", internal.to_string()),
        ("BT_WISHED", wished.to_string()),
        ("BT_VIA", via.to_string()),
    ]
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set for the role"))
}

/// The node side, run inside a namespace by `InNs`; a no-op in a normal test run.
#[test]
fn in_namespace_role() {
    let Some(role) = netns::role() else { return };
    match role.as_str() {
        "map" => role_map(),
        "connect" => role_connect(),
        "udp_listen" => role_udp_listen(),
        "udp_broadcast" => role_udp_broadcast(),
        other => panic!("unknown role {other}"),
    }
}

/// Listen on the internal port, map it, report, then renew / remove on command.
fn role_map() {
    let local: Ipv4Addr = var("BT_LOCAL").parse().unwrap();
    let internal: u16 = var("BT_INTERNAL").parse().unwrap();
    let listener = TcpListener::bind((local, internal)).unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            let _ = writeln!(s, "hello from {local}:{internal}");
        }
    });
    let req = MapRequest {
        gateway: var("BT_GATEWAY").parse().unwrap(),
        local_ip: local,
        internal_port: internal,
        external_port: var("BT_WISHED").parse().unwrap(),
        lease: Duration::from_secs(600),
        timeout: ATTEMPT,
        description: format!("borg test {local}"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    let mapped = rt.block_on(async {
        match var("BT_VIA").as_str() {
            "upnp" => map_tcp_via(&req, MapProtocol::Upnp).await,
            "pcp" => map_tcp_via(&req, MapProtocol::Pcp).await,
            "natpmp" => map_tcp_via(&req, MapProtocol::NatPmp).await,
            _ => map_tcp(&req).await,
        }
    });
    let ms = start.elapsed().as_millis();
    let mut m: PortMapping = match mapped {
        Ok(m) => m,
        Err(e) => return netns::role_say(&format!("failed {ms} {e}")),
    };
    netns::role_say(&format!(
        "mapped {} {} {} {ms}",
        m.protocol(),
        m.external(),
        m.lease().as_secs()
    ));
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let start = Instant::now();
        match line.trim() {
            "renew" => match rt.block_on(m.renew()) {
                Ok(()) => netns::role_say(&format!(
                    "renewed {} {} {}",
                    m.external(),
                    m.lease().as_secs(),
                    start.elapsed().as_millis()
                )),
                Err(e) => netns::role_say(&format!("error {e}")),
            },
            "remove" => {
                match rt.block_on(m.remove()) {
                    Ok(()) => netns::role_say(&format!("removed {}", start.elapsed().as_millis())),
                    Err(e) => netns::role_say(&format!("error {e}")),
                }
                return;
            }
            other => panic!("unknown command {other}"),
        }
    }
}

/// Connect to BT_TARGET and report the first line it sends.
fn role_connect() {
    let target: SocketAddr = var("BT_TARGET").parse().unwrap();
    let reply = TcpStream::connect_timeout(&target, Duration::from_secs(3)).and_then(|s| {
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    });
    match reply {
        Ok(line) => netns::role_say(&format!("reply {}", line.trim())),
        Err(e) => netns::role_say(&format!("refused {e}")),
    }
}

/// Wait for one datagram on BT_PORT (any address, so broadcasts count) and report it.
fn role_udp_listen() {
    let port: u16 = var("BT_PORT").parse().unwrap();
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    netns::role_say("ready");
    let mut buf = [0u8; 512];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => netns::role_say(&format!(
            "heard {} {}",
            from.ip(),
            String::from_utf8_lossy(&buf[..n])
        )),
        Err(e) => netns::role_say(&format!("silence {e}")),
    }
}

/// Send one datagram from BT_LOCAL to BT_TARGET (a broadcast address).
fn role_udp_broadcast() {
    let local: Ipv4Addr = var("BT_LOCAL").parse().unwrap();
    let target: SocketAddr = var("BT_TARGET").parse().unwrap();
    let sock = UdpSocket::bind((local, 0)).unwrap();
    sock.set_broadcast(true).unwrap();
    sock.send_to(format!("beacon from {local}").as_bytes(), target)
        .unwrap();
    netns::role_say("sent");
}

/// What a public host gets when it dials `target`: "reply ..." or "refused ...".
fn dial(public: &Ns, target: SocketAddr) -> String {
    let mut c = InNs::start(
        public,
        ROLE_TEST,
        "connect",
        &[("BT_TARGET", target.to_string())],
    );
    let line = c.expect("", ROLE_WAIT);
    assert!(c.finish(Duration::from_secs(5)), "connect role failed");
    line
}

/// A mapping as a role reported it.
struct Mapped {
    protocol: String,
    external: SocketAddr,
    lease_s: u64,
    ms: u64,
}

fn parse_mapped(line: &str) -> Mapped {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(f.len() == 5 && f[0] == "mapped", "not a mapping: {line}");
    Mapped {
        protocol: f[1].into(),
        external: f[2].parse().unwrap(),
        lease_s: f[3].parse().unwrap(),
        ms: f[4].parse().unwrap(),
    }
}

/// Wait (bounded) until miniupnpd's list does or does not hold `row`.
fn await_listed(lan: &Lan, row: (u16, Ipv4Addr, u16), listed: bool) {
    let ok = wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        (lan.upnp_mappings().contains(&row) == listed).then_some(())
    });
    assert!(
        ok.is_some(),
        "miniupnpd list should {}hold {row:?}: {:?}",
        if listed { "" } else { "not " },
        lan.upnp_mappings()
    );
}

/// Map, check from outside, renew, remove, check gone: the life of one mapping.
fn full_cycle(lan: &Lan, public: &Ns, host: &Ns, internal: u16, via: &str, expect: &str) -> Mapped {
    let mut node = InNs::start(
        host,
        ROLE_TEST,
        "map",
        &env(lan.gateway(), host, internal, internal, via),
    );
    let line = node.expect("", ROLE_WAIT);
    let m = parse_mapped(&line);
    println!(
        "timing: {via} -> {} mapping of {}:{internal} took {} ms (lease {} s)",
        m.protocol, host.ip, m.ms, m.lease_s
    );
    assert_eq!(m.protocol, expect);
    assert_eq!(
        m.external,
        SocketAddr::new(WAN.into(), internal),
        "the wished port was free"
    );
    let row = (m.external.port(), host.ip, internal);
    await_listed(lan, row, true);

    let reply = dial(public, m.external);
    assert_eq!(
        reply,
        format!("reply hello from {}:{internal}", host.ip),
        "inbound connection through the mapping"
    );

    node.send("renew");
    let renewed = node.expect("renewed", ROLE_WAIT);
    let f: Vec<&str> = renewed.split_whitespace().collect();
    assert_eq!(f[1], m.external.to_string(), "renewal keeps the port");
    println!("timing: {via} renewal took {} ms", f[3]);
    await_listed(lan, row, true);

    node.send("remove");
    let removed = node.expect("removed", ROLE_WAIT);
    println!(
        "timing: {via} removal took {} ms",
        removed.split_whitespace().nth(1).unwrap_or("?")
    );
    await_listed(lan, row, false);
    assert!(node.finish(Duration::from_secs(5)), "map role failed");
    assert!(
        dial(public, m.external).starts_with("refused"),
        "nothing maps the port any more"
    );
    m
}

#[test]
fn upnp_mapping_reaches_the_lan_host_renews_and_goes_away() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("upnp");
    topo.internet(INTERNET);
    let public = topo.public_host("pub", PUBLIC);
    let lan = topo.home_lan("home", WAN, LAN_UPNP, true);
    let host = topo.lan_host(&lan, "node", 10);
    let before = dial(&public, SocketAddr::new(WAN.into(), 13300));
    assert!(
        before.starts_with("refused"),
        "nothing is mapped yet: {before}"
    );
    // map_tcp itself: UPnP answers first.
    full_cycle(&lan, &public, &host, 13300, "any", "upnp");
}

#[test]
fn pcp_and_natpmp_map_renew_and_remove() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("pcp");
    topo.internet(INTERNET);
    let public = topo.public_host("pub", PUBLIC);
    let lan = topo.home_lan("home", WAN, LAN_UPNP, true);
    let host = topo.lan_host(&lan, "node", 10);
    let m = full_cycle(&lan, &public, &host, 13310, "pcp", "pcp");
    assert!(m.lease_s >= 120, "PCP reports the granted lease");
    full_cycle(&lan, &public, &host, 13320, "natpmp", "natpmp");
}

#[test]
fn a_port_held_by_a_dead_node_makes_the_replacement_take_another() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("conflict");
    topo.internet(INTERNET);
    let public = topo.public_host("pub", PUBLIC);
    let lan = topo.home_lan("home", WAN, LAN_UPNP, true);
    let dead = topo.lan_host(&lan, "dead", 10);
    let next = topo.lan_host(&lan, "next", 11);

    // The dead gateway node's mappings linger until their lease ends (made with upnpc, so
    // they do not depend on the code under test): 13300 for the UPnP case, 13301 for the
    // PCP and NAT-PMP cases, which must each find the port taken too.
    let url = format!(
        "http://{}:{MINIUPNPD_HTTP_PORT}/rootDesc.xml",
        lan.gateway()
    );
    let ip = dead.ip.to_string();
    dead.run(
        "upnpc",
        &[
            "-u",
            &url,
            "-e",
            "dead node",
            "-a",
            &ip,
            "13300",
            "13300",
            "TCP",
            "600",
        ],
    );
    dead.run(
        "upnpc",
        &[
            "-u",
            &url,
            "-e",
            "dead node",
            "-a",
            &ip,
            "13301",
            "13301",
            "TCP",
            "600",
        ],
    );
    await_listed(&lan, (13300, dead.ip, 13300), true);
    await_listed(&lan, (13301, dead.ip, 13301), true);

    for (via, internal, expect) in [
        ("any", 13300, "upnp"),
        ("pcp", 13301, "pcp"),
        ("natpmp", 13301, "natpmp"),
    ] {
        let mut node = InNs::start(
            &next,
            ROLE_TEST,
            "map",
            &env(lan.gateway(), &next, internal, internal, via),
        );
        let m = parse_mapped(&node.expect("", ROLE_WAIT));
        println!(
            "timing: {via} mapping with the wished port {internal} taken took {} ms, got {}",
            m.ms, m.external
        );
        assert_eq!(m.protocol, expect);
        assert_eq!(m.external.ip(), std::net::IpAddr::from(WAN));
        assert_ne!(
            m.external.port(),
            internal,
            "{via}: the dead node's port is not ours"
        );
        await_listed(&lan, (m.external.port(), next.ip, internal), true);
        assert_eq!(
            dial(&public, m.external),
            format!("reply hello from {}:{internal}", next.ip)
        );
        node.send("remove");
        node.expect("removed", ROLE_WAIT);
        assert!(node.finish(Duration::from_secs(5)));
    }
    // The dead node's mappings were left alone.
    await_listed(&lan, (13300, dead.ip, 13300), true);
    await_listed(&lan, (13301, dead.ip, 13301), true);
}

#[test]
fn without_a_mapping_service_map_tcp_fails_fast_naming_each_protocol() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("nomap");
    topo.internet(INTERNET);
    topo.public_host("pub", PUBLIC);
    // A UPnP router next door, on the same internet: its services must not be found.
    topo.home_lan("upnp", WAN, LAN_UPNP, true);
    let lan = topo.home_lan("plain", WAN_PLAIN, LAN_PLAIN, false);
    let host = topo.lan_host(&lan, "node", 10);

    let attempt = |what: &str| -> String {
        let mut node = InNs::start(
            &host,
            ROLE_TEST,
            "map",
            &env(lan.gateway(), &host, 13300, 13300, "any"),
        );
        let line = node.expect("failed", ROLE_WAIT);
        let (ms, err) = line["failed ".len()..].split_once(' ').unwrap();
        let ms: u64 = ms.parse().unwrap();
        println!("timing: failed attempt ({what}) took {ms} ms: {err}");
        assert!(
            Duration::from_millis(ms) < FAIL_BOUND,
            "{what}: took {ms} ms"
        );
        assert!(err.contains("upnp: no IGD answered"), "{err}");
        assert!(node.finish(Duration::from_secs(5)));
        err.to_string()
    };
    // The router answers PCP with ICMP port unreachable: fails about when SSDP gives up.
    let err = attempt("port unreachable");
    assert!(
        err.contains("pcp/natpmp: nothing listens on 10.0.2.1:5351"),
        "{err}"
    );
    // A router that drops instead: the PCP retransmissions run out too.
    lan.router.run(
        "iptables-legacy",
        &["-I", "INPUT", "-p", "udp", "--dport", "5351", "-j", "DROP"],
    );
    let err = attempt("silent drop");
    assert!(
        err.contains("pcp/natpmp: no answer from 10.0.2.1:5351"),
        "{err}"
    );
}

#[test]
fn lan_hosts_hear_each_others_broadcasts_and_only_they() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("bcast");
    topo.internet(INTERNET);
    let lan = topo.home_lan("home", WAN, LAN_UPNP, false);
    let other = topo.home_lan("other", WAN_PLAIN, LAN_PLAIN, false);
    let a = topo.lan_host(&lan, "a", 10);
    let b = topo.lan_host(&lan, "b", 11);
    let stranger = topo.lan_host(&other, "stranger", 10);
    let listen = |ns: &Ns| {
        let mut l = InNs::start(ns, ROLE_TEST, "udp_listen", &[("BT_PORT", "13399".into())]);
        l.expect("ready", ROLE_WAIT);
        l
    };
    let mut hears = listen(&b);
    let mut deaf = listen(&stranger);
    let target = SocketAddr::new(lan.broadcast().into(), 13399);
    let env = [
        ("BT_LOCAL", a.ip.to_string()),
        ("BT_TARGET", target.to_string()),
    ];
    let mut sender = InNs::start(&a, ROLE_TEST, "udp_broadcast", &env);
    sender.expect("sent", ROLE_WAIT);
    assert_eq!(
        hears.expect("", ROLE_WAIT),
        format!("heard {} beacon from {}", a.ip, a.ip)
    );
    assert!(
        deaf.expect("", ROLE_WAIT).starts_with("silence"),
        "a broadcast stays on its LAN"
    );
}
