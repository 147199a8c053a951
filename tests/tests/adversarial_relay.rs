//! Relay abuse against real `borg node` processes (issue 9 item 8), in network namespaces
//! (a relay needs a public node, and a relayed node behind a real NAT):
//!
//! ```text
//!   P1 203.0.113.10 (relay) ─┐
//!   N  203.0.113.12 ─────────┼─ internet ── router 203.0.113.1 ── L1 192.168.61.10 (relayed)
//!   A  203.0.113.66 ─────────┘  (attacker, a fresh outsider with no key in the tree)
//! ```
//!
//! `--max-children 1`, so the tree is a chain P1 - L1 - N and the newcomer N reaches its parent
//! L1 only through the relay P1. The attacker opens [`FLOOD`] plain TCP connections to P1 and
//! sends `BORG-RELAY <L1's key>` on each, holding them open: before the fix, each cost P1 a
//! signature and L1 a dial back and became a splice held for as long as the attacker liked.
//! Now P1 admits a burst of 8 per source IP and then 2 a second; the rest are dropped before
//! any cost. During the flood
//! N joins through the relay, the chain is whole, a broadcast reaches all three and P1's
//! resident memory stays under [`RSS_BOUND_KB`].
//!
//! A second test: the attacker registers [`FAKE_KEYS`] fresh keys with P1 as their relay (each
//! on its own TLS link, renewed every 10 s) to fill P1's 256 registrations. Before the fix
//! that locked real nodes out: a LAN node L2 started during the flood could not register, so
//! a newcomer whose parent is L2 could not reach it. Now one IP holds at most
//! [`MAX_FAKE_REGISTRATIONS`] of them, L2 registers and the chain P1 - L1 - L2 - N forms.
//!
//! Set `BORG_NETNS_TESTS=0` to skip (needs root, iproute2, iptables; `ci/setup.sh`).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use borg_net::conn;
use borg_net::node::now_ms;
use borg_net::tls::TlsIdentity;
use borg_proto::envelope;
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::reach::msg::ReachMsg;
use borg_tests::natnet::NsNodes;
use borg_tests::netns::{self, InNs, Topology};
use borg_tests::{metric, wait_for};

const HB_MS: u64 = 500;
const K: u64 = 1;
/// Relay requests the attacker sends, each on its own connection, all held open.
const FLOOD: usize = 200;
/// Relay requests P1 admits from one IP at once (`REQUEST_BURST` in relay.rs)...
const ATTACKER_BURST: f64 = 8.0;
/// ...and per second after that (`REQUESTS_PER_IP_PER_SEC`): what the attacker can get
/// spliced is bounded by burst + rate x the flood's duration, whatever the number it sends.
const ATTACKER_RATE: f64 = 2.0;
/// P1's resident memory during the flood: a node idles at ~20-30 MB (debug build); 200 held
/// sockets must not add much.
const RSS_BOUND_KB: u64 = 150 * 1024;
const ROLE_WITHIN: Duration = Duration::from_secs(45);
const TREE_WITHIN: Duration = Duration::from_secs(60);
const DELIVER_WITHIN: Duration = Duration::from_secs(15);
const ATTACKER_ENV: &str = "BORG_TEST_RELAY_FLOOD";
/// Fresh keys the attacker registers with the relay: more than its 256 places.
const FAKE_KEYS: usize = 300;
/// Registrations one source IP may hold at a relay (`MAX_RELAYED_PER_IP` in node.rs).
const MAX_FAKE_REGISTRATIONS: u64 = 16;
/// How often the attacker renews its registrations (a relayed node renews every 10 s; they
/// last 30 s).
const FAKE_RENEW: Duration = Duration::from_secs(10);

/// The attacker (runs inside A's namespace): `target_addr key` in the environment.
#[test]
fn relay_flood_role() {
    let Some(role) = netns::role() else { return };
    assert_eq!(role, "relay-flood");
    let spec = std::env::var(ATTACKER_ENV).unwrap();
    let (addr, key) = spec.split_once(' ').unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    let mut held = Vec::new();
    let mut sent = 0;
    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            continue;
        };
        if s.write_all(format!("BORG-RELAY {key}\n").as_bytes())
            .is_ok()
        {
            sent += 1;
        }
        held.push(s);
    }
    netns::role_say(&format!("flooded {sent} {}", started.elapsed().as_millis()));
    // Hold everything open until the test is done with us (stdin closes).
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(held);
}

/// The registration attacker (inside A's namespace): `relay_addr relay_key` in the
/// environment; registers [`FAKE_KEYS`] fresh keys and renews them until stdin closes.
#[test]
fn fake_registrations_role() {
    let Some(role) = netns::role() else { return };
    assert_eq!(role, "fake-registrations");
    let spec = std::env::var(ATTACKER_ENV).unwrap();
    let (addr, key) = spec.split_once(' ').unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    let relay = PublicKey::from_b64(key).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = done_tx.send(());
    });
    rt.block_on(async {
        let mut links = Vec::new();
        for _ in 0..FAKE_KEYS {
            let k = SecretKey::generate();
            let id = TlsIdentity::new(&k).unwrap();
            let Ok(c) = conn::connect(addr, relay, &id, Duration::from_secs(5)).await else {
                continue;
            };
            links.push((k, c));
        }
        let mut sent = 0;
        loop {
            for (k, c) in links.iter_mut() {
                let (kind, body) = ReachMsg::RelayRegister {}.to_kind_body();
                let adv = format!("{addr}/{}", k.public().to_b64());
                let frame = envelope::seal(k, &kind, Some(&adv), now_ms(), body).to_bytes();
                if c.send(&frame).await.is_ok() {
                    sent += 1;
                }
            }
            if sent > 0 && sent <= links.len() {
                netns::role_say(&format!("registered {sent}"));
            }
            tokio::select! {
                _ = &mut done_rx => break,
                _ = tokio::time::sleep(FAKE_RENEW) => {}
            }
        }
    });
}

#[test]
fn a_relay_request_flood_costs_the_flooder_and_the_relay_still_works() {
    if !netns::enabled() || netns::role().is_some() {
        return;
    }
    let mut topo = Topology::new("advrelay");
    topo.internet(Ipv4Addr::new(203, 0, 113, 0));
    let p1 = topo.public_host("p1", Ipv4Addr::new(203, 0, 113, 10));
    let n = topo.public_host("n", Ipv4Addr::new(203, 0, 113, 12));
    let a = topo.public_host("a", Ipv4Addr::new(203, 0, 113, 66));
    let lan = topo.home_lan(
        "r",
        Ipv4Addr::new(203, 0, 113, 1),
        Ipv4Addr::new(192, 168, 61, 0),
        false,
    );
    let l1 = topo.lan_host(&lan, "l1", 10);
    let mut nodes = NsNodes::new("advrelay", HB_MS, K);
    borg_tests::borg_bin();
    nodes.spawn_answering("p1", &p1, &[]);
    nodes.spawn("l1", &l1, &[p1.ip.to_string()]);
    // L1 relayed by P1 (tentatively: P1 is its only witness) and registered there.
    let want = |n: &str| if n == "p1" { "public" } else { "relayed" };
    nodes
        .wait_roles(ROLE_WITHIN, want)
        .unwrap_or_else(|roles| panic!("roles: {roles:?}"));
    wait_for(ROLE_WITHIN, Duration::from_millis(200), || {
        (nodes.status("p1")?["relaying_for"].as_u64()? == 1).then_some(())
    })
    .expect("L1 never registered with P1");
    nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("no tree of two: {e}"));
    let l1_key = nodes.status("l1").unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();

    // The flood, from a fresh outsider.
    let mut attacker = InNs::start(
        &a,
        "relay_flood_role",
        "relay-flood",
        &[(ATTACKER_ENV, format!("{}:13300 {l1_key}", p1.ip))],
    );
    let line = attacker.expect("flooded", Duration::from_secs(60));
    let mut words = line["flooded ".len()..].split(' ');
    let sent: usize = words.next().unwrap().parse().unwrap();
    let flood_ms: u64 = words.next().unwrap().parse().unwrap();
    assert!(
        sent >= FLOOD / 2,
        "the attacker got few requests out: {line}"
    );
    // What P1 may admit: the burst, then the rate over the flood (plus a second of slack for
    // the requests still in P1's listener when the attacker's clock stopped).
    let may_admit = (ATTACKER_BURST + ATTACKER_RATE * (flood_ms as f64 / 1000.0 + 1.0)) as u64;
    println!("flood of {sent} requests took {flood_ms} ms: P1 may admit {may_admit}");
    // P1 refused the rest before they cost anything: at the tree port's per-IP connection
    // cap (before the request line is even read), or by the relay's own request bounds.
    let refused = || {
        let limited = nodes.status("p1")?["relay_limited"].as_u64()?;
        let m = nodes.metrics("p1");
        let at_door = metric(&m, "borg_connections_refused_per_ip_total{door=\"tree\"}")?
            + metric(&m, "borg_connections_refused_total{door=\"tree\"}")?;
        Some((limited, at_door))
    };
    let got = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        let (l, d) = refused()?;
        (l + d + may_admit >= sent as u64).then_some((l, d))
    });
    let p1_status = nodes.status("p1").unwrap();
    assert!(
        got.is_some(),
        "P1 refused only {:?} (relay bounds, connection caps) of {sent} relay requests",
        refused()
    );
    if let Some((l, d)) = got {
        println!("refused: {l} by the relay's bounds, {d} at the tree port's connection caps");
    }
    let splices = p1_status["relay_splices_active"].as_u64().unwrap();
    assert!(
        splices <= may_admit,
        "P1 holds {splices} splices for one attacker"
    );

    // While the attacker holds its connections: a newcomer reaches L1 through the relay.
    nodes.spawn("n", &n, &[p1.ip.to_string()]);
    let took = nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("no chain of three during the flood: {e}"));
    let (size, depth) = nodes.check_tree().unwrap();
    assert_eq!((size, depth), (3, 2));
    let n_status = nodes.status("n").unwrap();
    assert_eq!(n_status["parent"]["key"], l1_key.as_str());
    println!(
        "flood of {sent} relay requests: {} refused, {splices} splices held; newcomer joined \
         through the relay in {:.1} s",
        p1_status["relay_limited"],
        took.as_secs_f64()
    );
    nodes.broadcast("n", "through-the-relay-under-flood");
    nodes
        .wait_delivered("through-the-relay-under-flood", DELIVER_WITHIN)
        .unwrap_or_else(|missing| panic!("not delivered at {missing:?}"));
    let rss = borg_tests::proc_rss_kib(nodes.nodes["p1"].child.id());
    println!("P1 RSS during the flood: {} KiB", rss);
    assert!(rss > 0 && rss < RSS_BOUND_KB, "P1 RSS {rss} KiB");
    assert!(
        attacker.finish(Duration::from_secs(10)),
        "attacker role failed"
    );
    drop(nodes);
    drop(topo);
}

#[test]
fn fake_registrations_do_not_lock_real_nodes_out_of_a_relay() {
    if !netns::enabled() || netns::role().is_some() {
        return;
    }
    let mut topo = Topology::new("advreg");
    topo.internet(Ipv4Addr::new(203, 0, 113, 0));
    let p1 = topo.public_host("p1", Ipv4Addr::new(203, 0, 113, 10));
    let n = topo.public_host("n", Ipv4Addr::new(203, 0, 113, 12));
    let a = topo.public_host("a", Ipv4Addr::new(203, 0, 113, 66));
    let lan = topo.home_lan(
        "r",
        Ipv4Addr::new(203, 0, 113, 1),
        Ipv4Addr::new(192, 168, 62, 0),
        false,
    );
    let l1 = topo.lan_host(&lan, "l1", 10);
    let l2 = topo.lan_host(&lan, "l2", 11);
    let mut nodes = NsNodes::new("advreg", HB_MS, K);
    borg_tests::borg_bin();
    nodes.spawn_answering("p1", &p1, &[]);
    nodes.spawn("l1", &l1, &[p1.ip.to_string()]);
    let want = |n: &str| if n == "p1" { "public" } else { "relayed" };
    nodes
        .wait_roles(ROLE_WITHIN, want)
        .unwrap_or_else(|roles| panic!("roles: {roles:?}"));
    nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("no tree of two: {e}"));
    let p1_key = nodes.status("p1").unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();

    let mut attacker = InNs::start(
        &a,
        "fake_registrations_role",
        "fake-registrations",
        &[(ATTACKER_ENV, format!("{}:13300 {p1_key}", p1.ip))],
    );
    let line = attacker.expect("registered", Duration::from_secs(120));
    let sent: usize = line["registered ".len()..].parse().unwrap();
    assert!(sent > 256, "the attacker registered too few keys: {line}");
    // Give P1 the frames: its count stops growing at its bound (or, before the fix, at 256).
    let held = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        let r = nodes.status("p1")?["relaying_for"].as_u64()?;
        (r > MAX_FAKE_REGISTRATIONS).then_some(r)
    });
    let relaying = nodes.status("p1").unwrap()["relaying_for"]
        .as_u64()
        .unwrap();
    println!("after {sent} fake registrations P1 relays for {relaying} ({held:?})");
    assert!(
        relaying <= 1 + MAX_FAKE_REGISTRATIONS,
        "one IP holds {relaying} registrations"
    );

    // During the flood: L2 registers, and a newcomer reaches it through the relay.
    nodes.spawn("l2", &l2, &[p1.ip.to_string()]);
    nodes
        .wait_roles(ROLE_WITHIN, want)
        .unwrap_or_else(|roles| panic!("roles with l2: {roles:?}"));
    nodes.spawn("n", &n, &[p1.ip.to_string()]);
    nodes
        .wait_roles(ROLE_WITHIN, |x| match x {
            "l1" | "l2" => "relayed",
            _ => "public",
        })
        .unwrap_or_else(|roles| panic!("roles with n: {roles:?}"));
    let took = nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("no chain of four during the flood: {e}"));
    assert_eq!(nodes.check_tree().unwrap(), (4, 3));
    println!(
        "chain of four through the relay during the flood after {:.1} s",
        took.as_secs_f64()
    );
    nodes.broadcast("n", "past-the-fake-registrations");
    nodes
        .wait_delivered("past-the-fake-registrations", DELIVER_WITHIN)
        .unwrap_or_else(|missing| panic!("not delivered at {missing:?}"));
    let rss = borg_tests::proc_rss_kib(nodes.nodes["p1"].child.id());
    println!("P1 RSS with {sent} fake registrations held: {rss} KiB");
    assert!(rss > 0 && rss < RSS_BOUND_KB, "P1 RSS {rss} KiB");
    drop(attacker);
    drop(nodes);
    drop(topo);
}
