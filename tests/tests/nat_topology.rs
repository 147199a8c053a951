//! Reachability on real NAT topologies built from network namespaces (issue 4):
//!
//! ```text
//!   P1 11.0.0.100 ─┐                         ┌─ A1 10.0.1.10
//!   P2 11.0.0.101 ─┼─ internet ── router A ──┼─ A2 10.0.1.11     (MASQUERADE + miniupnpd)
//!                  │   11.0.0/24  11.0.0.2   └─ A3 10.0.1.12
//!                  └───────────── router B ──┬─ B1 10.0.2.10     (MASQUERADE, no UPnP)
//!                                 11.0.0.3   └─ B2 10.0.2.11
//! ```
//!
//! Real `borg node` processes (k = 2, so links cross the NATs) find their roles with no
//! configuration beyond the two public contacts: P1 and P2 `public`, one LAN A node `gateway`
//! holding a real miniupnpd mapping, the other two `relayed` through it, both LAN B nodes
//! `relayed` by a public peer. One tree forms and a broadcast from LAN B reaches LAN A. Then
//! the gateway is killed (SIGKILL): another LAN A node takes the role, the tree repairs and
//! broadcasts flow; that gateway is stopped (SIGTERM) and its mapping is gone from
//! miniupnpd. A second test: a LAN whose router maps nothing, with no public peer at all,
//! still runs as a working tree of its own.
//!
//! The "internet" is 11.0.0.0/24 only because miniupnpd refuses to map behind a private or
//! documentation WAN address; it exists only inside the test's namespaces. Set
//! `BORG_NETNS_TESTS=0` to skip (needs root, iproute2, iptables, miniupnpd-iptables, miniupnpc;
//! `ci/setup.sh` installs them).
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use borg_tests::natnet::NsNodes;
use borg_tests::netns::{self, Ns, Topology};
use borg_tests::wait_for;

const HB_MS: u64 = 500;
const K: u64 = 2;
const ROLE_WITHIN: Duration = Duration::from_secs(60);
const TREE_WITHIN: Duration = Duration::from_secs(60);
const DELIVER_WITHIN: Duration = Duration::from_secs(15);

fn roles_of(nodes: &NsNodes, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| nodes.role(n).unwrap_or_else(|| "?".into()))
        .collect()
}

/// Wait until LAN A has exactly one gateway and the rest relayed; returns the gateway's name.
fn wait_lan_a_gateway(nodes: &NsNodes, a: &[&str], within: Duration) -> String {
    let mut last = Vec::new();
    wait_for(within, Duration::from_millis(200), || {
        last = roles_of(nodes, a);
        let gateways: Vec<&str> = a
            .iter()
            .zip(&last)
            .filter(|(_, r)| *r == "gateway")
            .map(|(n, _)| *n)
            .collect();
        let relayed = last.iter().filter(|r| *r == "relayed").count();
        (gateways.len() == 1 && relayed == a.len() - 1).then(|| gateways[0].to_string())
    })
    .unwrap_or_else(|| panic!("LAN A roles never settled: {a:?} = {last:?}"))
}

/// Start the two public nodes: p1 alone, then p2 joining it (everyone else's contacts).
fn start_publics(nodes: &mut NsNodes, p1: &Ns, p2: &Ns) {
    nodes.spawn_answering("p1", p1, &[]);
    nodes.spawn("p2", p2, &[p1.ip.to_string()]);
}

fn key_of(nodes: &NsNodes, name: &str) -> String {
    nodes.status(name).unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn seven_nodes_across_two_nats_form_one_tree_and_survive_the_gateway() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("nat7");
    topo.internet(Ipv4Addr::new(11, 0, 0, 0));
    let p1 = topo.public_host("p1", Ipv4Addr::new(11, 0, 0, 100));
    let p2 = topo.public_host("p2", Ipv4Addr::new(11, 0, 0, 101));
    let lan_a = topo.home_lan(
        "a",
        Ipv4Addr::new(11, 0, 0, 2),
        Ipv4Addr::new(10, 0, 1, 0),
        true,
    );
    let lan_b = topo.home_lan(
        "b",
        Ipv4Addr::new(11, 0, 0, 3),
        Ipv4Addr::new(10, 0, 2, 0),
        false,
    );
    let hosts_a = [
        topo.lan_host(&lan_a, "a1", 10),
        topo.lan_host(&lan_a, "a2", 11),
        topo.lan_host(&lan_a, "a3", 12),
    ];
    let hosts_b = [
        topo.lan_host(&lan_b, "b1", 10),
        topo.lan_host(&lan_b, "b2", 11),
    ];

    let mut nodes = NsNodes::new("nat7", HB_MS, K);
    // Build the binary before the clock starts.
    borg_tests::borg_bin();
    let contacts = vec![p1.ip.to_string(), p2.ip.to_string()];
    let started = Instant::now();
    start_publics(&mut nodes, &p1, &p2);
    for (i, h) in hosts_a.iter().enumerate() {
        nodes.spawn(&format!("a{}", i + 1), h, &contacts);
    }
    for (i, h) in hosts_b.iter().enumerate() {
        nodes.spawn(&format!("b{}", i + 1), h, &contacts);
    }
    let a = ["a1", "a2", "a3"];

    // Roles.
    let publics = wait_for(ROLE_WITHIN, Duration::from_millis(200), || {
        let r = roles_of(&nodes, &["p1", "p2", "b1", "b2"]);
        (r == ["public", "public", "relayed", "relayed"]).then_some(())
    });
    assert!(
        publics.is_some(),
        "roles of p1 p2 b1 b2: {:?}",
        roles_of(&nodes, &["p1", "p2", "b1", "b2"])
    );
    let gateway = wait_lan_a_gateway(&nodes, &a, ROLE_WITHIN);
    println!(
        "roles settled {:.1} s after the first start; gateway {gateway}",
        started.elapsed().as_secs_f64()
    );
    for n in ["p1", "p2", "a1", "a2", "a3", "b1", "b2"] {
        let st = nodes.status(n).unwrap();
        println!(
            "  {n}: {:8} decided after {:>5} ms, external {}, relay {}",
            st["nat_role"].as_str().unwrap(),
            st["nat_decided_after_ms"],
            st["external_addr"],
            st["relay"]["addr"]
        );
    }

    // Who relays for whom, and the gateway's real mapping.
    let gw = nodes.status(&gateway).unwrap();
    let gw_key = gw["public_key"].as_str().unwrap().to_string();
    let gw_ip = nodes.nodes[&gateway].ns.ip;
    let ext: std::net::SocketAddr = gw["external_addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(ext.ip(), lan_a.wan_ip, "gateway's external address");
    assert_eq!(gw["mapping"]["state"], "mapped");
    let mappings = lan_a.upnp_mappings();
    assert!(
        mappings.contains(&(ext.port(), gw_ip, 13300)),
        "miniupnpd should map {ext} to {gw_ip}:13300: {mappings:?}"
    );
    for n in a.iter().filter(|n| **n != gateway) {
        let st = nodes.status(n).unwrap();
        assert_eq!(
            st["relay"]["key"],
            gw_key.as_str(),
            "{n} relayed by the gateway"
        );
        let adv = st["external_addr"].as_str().unwrap();
        assert!(adv.starts_with(&format!("{ext}/")), "{n} advertises {adv}");
    }
    let public_keys = [key_of(&nodes, "p1"), key_of(&nodes, "p2")];
    for n in ["b1", "b2"] {
        let st = nodes.status(n).unwrap();
        let relay = st["relay"]["key"].as_str().unwrap().to_string();
        assert!(public_keys.contains(&relay), "{n} relayed by a public peer");
    }
    // LAN B's candidate asked its router, which refused; the other did not ask again.
    let refused = ["b1", "b2"]
        .iter()
        .filter(|n| nodes.status(n).unwrap()["mapping"]["state"] == "refused")
        .count();
    assert_eq!(refused, 1, "exactly one LAN B node asked the router");

    // One tree across both NATs; a broadcast from LAN B reaches LAN A.
    let took = nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("no tree: {e}"));
    let (size, depth) = nodes.check_tree().unwrap();
    assert_eq!((size, depth), (7, 2));
    println!("tree of 7 complete {:.1} s after roles", took.as_secs_f64());
    // The second cell type (cronoTree, k=3) forms its own tree over the same seven nodes,
    // its links to the LAN nodes entering through the gateway's one mapped port or a relay
    // (ALPN routing), and every node's network time is synced.
    let start = Instant::now();
    let mut last = String::new();
    let crono = wait_for(TREE_WITHIN, Duration::from_millis(300), || {
        match nodes.check_cell_tree(13398, 3) {
            Ok(v) => Some(v),
            Err(e) => {
                last = e;
                None
            }
        }
    })
    .unwrap_or_else(|| panic!("no cronoTree of 7: {last}"));
    assert_eq!(crono.0, 7);
    println!(
        "cronoTree of 7 (depth {}) {:.1} s after the base tree",
        crono.1,
        start.elapsed().as_secs_f64()
    );
    for n in ["a1", "a2", "a3", "b1", "b2", "p1", "p2"] {
        let st = nodes.cell_status(n, 13398).unwrap();
        assert_eq!(st["time"]["synced"], true, "{n}: {st}");
        let addr = st["addr"].as_str().unwrap_or_default();
        let base = nodes.status(n).unwrap();
        match base["nat_role"].as_str() {
            // Reached only through the mapped port or a relay: the cell advertises that.
            Some("gateway" | "relayed") => assert_eq!(addr, base["addr"], "{n}"),
            _ => assert!(addr.ends_with(":13396"), "{n}: {addr}"),
        }
        println!(
            "{n}: cronoTree {} via {addr}, error vs system clock {} ms",
            st["state"], st["time"]["system_offset_ms"]
        );
    }
    nodes.broadcast("b1", "hello-from-lan-b");
    let t = nodes
        .wait_delivered("hello-from-lan-b", DELIVER_WITHIN)
        .unwrap_or_else(|missing| panic!("not delivered at {missing:?}"));
    println!(
        "broadcast from b1 delivered everywhere within {} ms",
        t.as_millis()
    );
    let relaying: u64 = ["p1", "p2", gateway.as_str()]
        .iter()
        .map(|n| nodes.status(n).unwrap()["relaying_for"].as_u64().unwrap())
        .sum();
    assert!(
        relaying >= 4,
        "relays serve the 4 relayed nodes: {relaying}"
    );

    // Kill the gateway: another LAN A node takes the role, the tree repairs.
    let killed_at = Instant::now();
    nodes.kill9(&gateway);
    let rest: Vec<&str> = a.iter().copied().filter(|n| *n != gateway).collect();
    let gateway2 = wait_lan_a_gateway(&nodes, &rest, ROLE_WITHIN);
    let failover = killed_at.elapsed();
    let repaired = nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("no tree after the gateway died: {e}"));
    let (size, _) = nodes.check_tree().unwrap();
    assert_eq!(size, 6);
    println!(
        "gateway {gateway} killed: {gateway2} gateway after {:.1} s, tree of 6 after {:.1} s",
        failover.as_secs_f64(),
        killed_at
            .elapsed()
            .as_secs_f64()
            .max(repaired.as_secs_f64())
    );
    nodes.broadcast("b2", "after-the-gateway-died");
    nodes
        .wait_delivered("after-the-gateway-died", DELIVER_WITHIN)
        .unwrap_or_else(|missing| panic!("not delivered at {missing:?}"));

    // Stop the new gateway in order: its mapping leaves miniupnpd.
    let gw2_ip = nodes.nodes[&gateway2].ns.ip;
    let gw2_ext: std::net::SocketAddr = nodes.status(&gateway2).unwrap()["external_addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(lan_a
        .upnp_mappings()
        .contains(&(gw2_ext.port(), gw2_ip, 13300)));
    assert!(
        nodes.stop(&gateway2, Duration::from_secs(10)),
        "{gateway2} did not exit on SIGTERM"
    );
    let mappings = lan_a.upnp_mappings();
    assert!(
        !mappings.iter().any(|(_, ip, _)| *ip == gw2_ip),
        "mapping of the stopped gateway still there: {mappings:?}"
    );
    drop(nodes);
    drop(topo);
}

#[test]
fn a_lan_with_no_mapping_and_no_public_peer_runs_its_own_tree() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("natlan");
    topo.internet(Ipv4Addr::new(11, 0, 0, 0));
    let lan = topo.home_lan(
        "c",
        Ipv4Addr::new(11, 0, 0, 4),
        Ipv4Addr::new(10, 0, 3, 0),
        false,
    );
    let c1 = topo.lan_host(&lan, "c1", 10);
    let c2 = topo.lan_host(&lan, "c2", 11);
    let c3 = topo.lan_host(&lan, "c3", 12);
    let mut nodes = NsNodes::new("natlan", HB_MS, K);
    // No contacts at all: they find each other by their LAN beacons.
    nodes.spawn("c1", &c1, &[]);
    nodes.spawn("c2", &c2, &[]);
    nodes.spawn("c3", &c3, &[]);
    let took = nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("the LAN's nodes never formed one tree: {e}"));
    println!("LAN-only tree of 3 after {:.1} s", took.as_secs_f64());
    nodes.broadcast("c3", "lan-only");
    nodes
        .wait_delivered("lan-only", DELIVER_WITHIN)
        .unwrap_or_else(|missing| panic!("not delivered at {missing:?}"));
    let roles = nodes.wait_roles(ROLE_WITHIN, |_| "local");
    assert!(roles.is_ok(), "roles: {roles:?}");
    drop(nodes);
    drop(topo);
}

#[test]
fn a_port_forwarded_by_hand_makes_its_node_the_gateway() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("natfwd");
    topo.internet(Ipv4Addr::new(11, 0, 0, 0));
    let p1 = topo.public_host("p1", Ipv4Addr::new(11, 0, 0, 100));
    let p2 = topo.public_host("p2", Ipv4Addr::new(11, 0, 0, 101));
    let lan = topo.home_lan(
        "f",
        Ipv4Addr::new(11, 0, 0, 5),
        Ipv4Addr::new(10, 0, 4, 0),
        false,
    );
    let f1 = topo.lan_host(&lan, "f1", 10);
    let f2 = topo.lan_host(&lan, "f2", 11);
    // What the seed asks of a user: forward one port to one node.
    lan.forward_port(13300, f1.ip);
    let mut nodes = NsNodes::new("natfwd", HB_MS, K);
    borg_tests::borg_bin();
    let contacts = vec![p1.ip.to_string(), p2.ip.to_string()];
    start_publics(&mut nodes, &p1, &p2);
    nodes.spawn("f1", &f1, &contacts);
    nodes.spawn("f2", &f2, &contacts);
    let want = |n: &str| match n {
        "f1" => "gateway",
        "f2" => "relayed",
        _ => "public",
    };
    let took = nodes
        .wait_roles(ROLE_WITHIN, want)
        .unwrap_or_else(|roles| panic!("roles: {roles:?}"));
    println!(
        "roles with a hand-forwarded port settled in {:.1} s",
        took.as_secs_f64()
    );
    let f1_status = nodes.status("f1").unwrap();
    assert_eq!(f1_status["external_addr"], "11.0.0.5:13300");
    assert_ne!(f1_status["mapping"]["state"], "mapped");
    let f2_status = nodes.status("f2").unwrap();
    assert_eq!(f2_status["relay"]["key"], f1_status["public_key"]);
    nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("no tree: {e}"));
    nodes.broadcast("p2", "through-the-forwarded-port");
    nodes
        .wait_delivered("through-the-forwarded-port", DELIVER_WITHIN)
        .unwrap_or_else(|missing| panic!("not delivered at {missing:?}"));
}
