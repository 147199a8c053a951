//! NAT roles in a small network (issue 14): the first days of any network, or a user with one
//! rented server and two Pis at home.
//!
//! ```text
//!   P1 203.0.113.10 ─┐
//!   P2 203.0.113.11 ─┼─ internet ── router 203.0.113.1 ──┬─ L1 192.168.60.10
//!                    │  203.0.113/24  (MASQUERADE only:   └─ L2 192.168.60.11
//!                                      no UPnP, no forwarded port)
//! ```
//!
//! One namespace per host; P1 starts first, one second later the others start with
//! `--join 203.0.113.10` (P1 is everybody's only contact), `--max-children 3`.
//! - With P2: P1 and P2 end `public`, L1 and L2 `relayed` by a public node with the router's
//!   203.0.113.1 as their external IP; one tree of four, and a broadcast from L2 reaches all.
//! - Without P2: P1 is the only node outside the LAN, so every node has one independent
//!   witness at most. P1 ends `public` (tentatively) and L1 and L2 `relayed` by P1, not
//!   `local`; the tree of three forms and L2's broadcast reaches all.
//!
//! Set `BORG_NETNS_TESTS=0` to skip (needs root, iproute2, iptables; `ci/setup.sh`).
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use borg_tests::natnet::NsNodes;
use borg_tests::netns::{self, Lan, Ns, Topology};
use borg_tests::wait_for;

/// Heartbeat of the test nodes: fast enough that repairs and joins settle in seconds.
const HB_MS: u64 = 500;
/// The issue's `--max-children 3`: P1 holds every other node as its child.
const K: u64 = 3;
/// Roles must settle within this: the join waits 10 s for a role, the settle time is 20 s;
/// a role that needs longer than twice that is a failure, not slowness.
const ROLE_WITHIN: Duration = Duration::from_secs(45);
const TREE_WITHIN: Duration = Duration::from_secs(45);
const DELIVER_WITHIN: Duration = Duration::from_secs(15);
/// The issue's start order: the others one second after P1.
const OTHERS_AFTER: Duration = Duration::from_secs(1);

struct Small {
    topo: Topology,
    p1: Ns,
    p2: Option<Ns>,
    lan: Lan,
    l1: Ns,
    l2: Ns,
}

fn build(tag: &str, with_p2: bool) -> Small {
    let mut topo = Topology::new(tag);
    topo.internet(Ipv4Addr::new(203, 0, 113, 0));
    let p1 = topo.public_host("p1", Ipv4Addr::new(203, 0, 113, 10));
    let p2 = with_p2.then(|| topo.public_host("p2", Ipv4Addr::new(203, 0, 113, 11)));
    let lan = topo.home_lan(
        "r",
        Ipv4Addr::new(203, 0, 113, 1),
        Ipv4Addr::new(192, 168, 60, 0),
        false,
    );
    let l1 = topo.lan_host(&lan, "l1", 10);
    let l2 = topo.lan_host(&lan, "l2", 11);
    Small {
        topo,
        p1,
        p2,
        lan,
        l1,
        l2,
    }
}

/// P1 alone, then (one second later) everyone else with P1 as their only contact.
fn start(s: &Small, nodes: &mut NsNodes) -> Instant {
    // Build the binary before the clock starts.
    borg_tests::borg_bin();
    let started = Instant::now();
    nodes.spawn("p1", &s.p1, &[]);
    // The others start once P1 has run for a second (its own uptime, not a sleep).
    wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
        let up = nodes.status("p1")?["uptime_s"].as_u64()?;
        (up >= OTHERS_AFTER.as_secs()).then_some(())
    })
    .expect("p1 never answered");
    let contact = vec![s.p1.ip.to_string()];
    if let Some(p2) = s.p2.as_ref() {
        nodes.spawn("p2", p2, &contact);
    }
    nodes.spawn("l1", &s.l1, &contact);
    nodes.spawn("l2", &s.l2, &contact);
    started
}

fn print_roles(nodes: &NsNodes) {
    for n in nodes.nodes.keys() {
        let Some(st) = nodes.status(n) else {
            println!("  {n}: no answer");
            continue;
        };
        println!(
            "  {n}: {:8} after {:>5} ms, external_ip {}, external_addr {}, relay {}: {}",
            st["nat_role"].as_str().unwrap_or("?"),
            st["nat_decided_after_ms"],
            st["external_ip"],
            st["external_addr"],
            st["relay"]["addr"],
            st["nat_reason"]
        );
    }
}

/// The LAN nodes are relayed by one of `relays` (keys), name the router as their external IP
/// and advertise `relay_addr/<own key>`.
fn check_relayed(nodes: &NsNodes, lan: &Lan, relays: &[(String, String)]) {
    for n in ["l1", "l2"] {
        let st = nodes.status(n).unwrap();
        let relay_key = st["relay"]["key"].as_str().unwrap_or_default();
        let Some((_, relay_addr)) = relays.iter().find(|(k, _)| k == relay_key) else {
            panic!("{n} relayed by {relay_key:?}, not by a public node: {st}");
        };
        assert_eq!(
            st["external_ip"],
            lan.wan_ip.to_string(),
            "{n}'s external IP is the router's"
        );
        let own = st["public_key"].as_str().unwrap();
        assert_eq!(
            st["external_addr"].as_str().unwrap_or_default(),
            format!("{relay_addr}/{own}"),
            "{n} advertises its relay's address and its own key"
        );
    }
}

fn key_addr(nodes: &NsNodes, name: &str) -> (String, String) {
    let st = nodes.status(name).unwrap();
    (
        st["public_key"].as_str().unwrap().to_string(),
        st["external_addr"].as_str().unwrap_or_default().to_string(),
    )
}

fn tree_and_broadcast(nodes: &NsNodes, size: usize, text: &str) {
    let took = nodes
        .wait_tree(TREE_WITHIN)
        .unwrap_or_else(|e| panic!("no tree: {e}"));
    let (n, _) = nodes.check_tree().unwrap();
    assert_eq!(n, size);
    println!(
        "tree of {size} complete {:.1} s after roles",
        took.as_secs_f64()
    );
    nodes.broadcast("l2", text);
    let t = nodes
        .wait_delivered(text, DELIVER_WITHIN)
        .unwrap_or_else(|missing| panic!("not delivered at {missing:?}"));
    println!(
        "broadcast from l2 delivered everywhere within {} ms",
        t.as_millis()
    );
}

#[test]
fn two_public_nodes_and_a_plain_nat_give_public_public_relayed_relayed() {
    if !netns::enabled() {
        return;
    }
    let s = build("small2p", true);
    let mut nodes = NsNodes::new("small2p", HB_MS, K);
    let started = start(&s, &mut nodes);
    let want = |n: &str| match n {
        "p1" | "p2" => "public",
        _ => "relayed",
    };
    let roles = nodes.wait_roles(ROLE_WITHIN, want);
    print_roles(&nodes);
    roles.unwrap_or_else(|roles| panic!("roles: {roles:?}"));
    println!(
        "roles settled {:.1} s after P1 started",
        started.elapsed().as_secs_f64()
    );
    // Two independent witnesses each (P2 found through P1's referral): no role stays
    // tentative in this network.
    let mut last = Vec::new();
    let confirmed = wait_for(ROLE_WITHIN, Duration::from_millis(200), || {
        last = ["p1", "p2", "l1", "l2"]
            .iter()
            .map(|n| {
                nodes
                    .status(n)
                    .map(|st| (st["nat_role"].clone(), st["nat_tentative"].clone()))
            })
            .collect();
        last.iter()
            .all(|st| st.as_ref().is_some_and(|(_, t)| *t == false))
            .then_some(())
    });
    print_roles(&nodes);
    assert!(confirmed.is_some(), "roles still tentative: {last:?}");
    println!(
        "roles confirmed {:.1} s after P1 started",
        started.elapsed().as_secs_f64()
    );
    nodes
        .wait_roles(Duration::from_secs(10), want)
        .unwrap_or_else(|roles| panic!("roles changed on confirmation: {roles:?}"));
    let relays = [key_addr(&nodes, "p1"), key_addr(&nodes, "p2")];
    assert_eq!(relays[0].1, "203.0.113.10:13300");
    assert_eq!(relays[1].1, "203.0.113.11:13300");
    check_relayed(&nodes, &s.lan, &relays);
    tree_and_broadcast(&nodes, 4, "small-net-from-l2");
    drop(nodes);
    drop(s.topo);
}

#[test]
fn with_one_public_node_the_lan_is_relayed_by_it() {
    if !netns::enabled() {
        return;
    }
    let s = build("small1p", false);
    let mut nodes = NsNodes::new("small1p", HB_MS, K);
    let started = start(&s, &mut nodes);
    let want = |n: &str| match n {
        "p1" => "public",
        _ => "relayed",
    };
    let roles = nodes.wait_roles(ROLE_WITHIN, want);
    print_roles(&nodes);
    roles.unwrap_or_else(|roles| panic!("roles: {roles:?}"));
    println!(
        "roles settled {:.1} s after P1 started",
        started.elapsed().as_secs_f64()
    );
    let p1 = key_addr(&nodes, "p1");
    assert_eq!(p1.1, "203.0.113.10:13300");
    check_relayed(&nodes, &s.lan, std::slice::from_ref(&p1));
    // One independent witness each (L1 and L2 share the router's IP): the roles say so.
    for n in ["p1", "l1", "l2"] {
        let st = nodes.status(n).unwrap();
        assert_eq!(st["nat_tentative"], true, "{n}: {}", st["nat_reason"]);
    }
    tree_and_broadcast(&nodes, 3, "one-public-from-l2");
    drop(nodes);
    drop(s.topo);
}
