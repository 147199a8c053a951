//! The cronoTree cell against the runtime's inputs, with a paused clock: two or more cells
//! wired to each other by a tiny in-memory harness (fixed one-way latency, no sockets).

use std::time::Duration;

use borg_net::cell::{BaseView, Cell, CellAction, CellInit, CellTime};
use borg_net::clock::NetClock;
use borg_proto::crono::msg::{Nonce, TimeAns, TimeMsg};
use borg_proto::identity::SecretKey;
use borg_proto::tree::{Peer, Target, TreeState, TreeView};
use serde_json::Value;

use super::*;

const YEAR_2026_US: u64 = 1_796_000_000_000_000;
const FLOOR_US: u64 = 1_790_000_000_000_000;

struct Node {
    key: PublicKey,
    addr: String,
    clock: Arc<NetClock>,
    cell: CronoCell,
}

fn node(i: u8, local_us: u64, contacts: Vec<String>) -> Node {
    let key = SecretKey::generate().public();
    let clock = NetClock::starting_at(local_us, FLOOR_US);
    let cell = CronoCell::new(CellInit {
        name: "cronoTree",
        key,
        clock: clock.clone(),
        contacts,
        data_dir: None,
    });
    Node {
        key,
        addr: format!("10.0.0.{i}:13300"),
        clock,
        cell,
    }
}

fn now(n: &Node) -> CellTime {
    CellTime::of(&n.clock)
}

fn view(n: &Node, state: TreeState, parent: Option<&Node>) -> TreeView {
    TreeView {
        state,
        key: n.key,
        addr: n.addr.clone(),
        position: Some(if parent.is_some() { 2 } else { 1 }),
        parent: parent.map(|p| borg_proto::tree::Placed {
            pos: 1,
            peer: Peer {
                key: p.key,
                addr: p.addr.clone(),
                mon: String::new(),
            },
        }),
        children: Vec::new(),
        root: None,
        size: 2,
        vacant: Vec::new(),
    }
}

/// Run the nodes until nothing is in flight and no timer is due before `until` (virtual),
/// delivering every send after `latency` (both ways, so the true offset is observable).
async fn run(nodes: &mut [Node], latency: Duration, until: Duration) {
    let end = tokio::time::Instant::now() + until;
    let mut in_flight: Vec<(tokio::time::Instant, usize, usize, String, Value)> = Vec::new();
    for _ in 0..1_000_000 {
        // Collect actions.
        for i in 0..nodes.len() {
            let t = now(&nodes[i]);
            while let Some(a) = nodes[i].cell.poll_action(t) {
                let CellAction::Send { to, kind, body } = a else {
                    continue;
                };
                let dest = nodes.iter().position(|n| match &to {
                    Target::Key(k) => n.key == *k,
                    Target::Peer(p) => n.key == p.key,
                    Target::Addr(a) => n.addr == *a,
                });
                if let Some(j) = dest {
                    in_flight.push((tokio::time::Instant::now() + latency, i, j, kind, body));
                }
            }
        }
        // Next event: a delivery or a timer.
        let next_msg = in_flight.iter().map(|m| m.0).min();
        let next_timer = nodes
            .iter()
            .filter_map(|n| {
                n.cell.poll_timeout().map(|ms| {
                    let now = n.clock.mono_ms();
                    tokio::time::Instant::now() + Duration::from_millis(ms.saturating_sub(now))
                })
            })
            .min();
        let next = match (next_msg, next_timer) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(end),
        };
        if next >= end {
            tokio::time::sleep_until(end).await;
            return;
        }
        tokio::time::sleep_until(next).await;
        let t_now = tokio::time::Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) = in_flight.into_iter().partition(|m| m.0 <= t_now);
        in_flight = rest;
        for (_, from, to, kind, body) in due {
            let from_key = nodes[from].key;
            let n = &mut nodes[to];
            let t = now(n);
            let _ = n.cell.handle_message(t, from_key, t.local_us, &kind, &body);
        }
        for n in nodes.iter_mut() {
            if n.cell
                .poll_timeout()
                .is_some_and(|ms| ms <= n.clock.mono_ms())
            {
                let t = now(n);
                n.cell.handle_timeout(t);
            }
        }
    }
    panic!("harness loop bound reached");
}

/// Network time of `a` minus `b`, in µs.
fn diff_us(a: &Node, b: &Node) -> i64 {
    a.clock.now_us() as i64 - b.clock.now_us() as i64
}

#[tokio::test(start_paused = true)]
async fn a_node_at_1970_bootstraps_from_its_contact_and_follows_its_parent() {
    let root = node(1, YEAR_2026_US, Vec::new());
    let pi = node(2, 0, vec![root.addr.clone()]);
    let mut nodes = vec![root, pi];
    let t = now(&nodes[0]);
    let v = view(&nodes[0], TreeState::Alone, None);
    nodes[0].cell.handle_tree(t, &v);
    assert!(
        nodes[0].clock.is_synced(),
        "a root with no contacts is its own reference"
    );
    let t = now(&nodes[1]);
    let v = view(&nodes[1], TreeState::Alone, None);
    nodes[1].cell.handle_tree(t, &v);
    assert!(
        !nodes[1].clock.is_synced(),
        "alone with contacts: not synced before asking them"
    );
    assert!(nodes[1].clock.now_us() >= FLOOR_US, "raised to the floor");

    run(
        &mut nodes,
        Duration::from_millis(10),
        Duration::from_secs(2),
    )
    .await;
    assert!(nodes[1].clock.is_synced());
    let d = diff_us(&nodes[1], &nodes[0]);
    assert!(d.abs() < 1_000, "bootstrap error {d} µs");

    // Joined under the root: samples from the parent keep it there; time never goes back.
    let t = now(&nodes[1]);
    let v = view(&nodes[1], TreeState::Joined, Some(&nodes[0]));
    nodes[1].cell.handle_tree(t, &v);
    let mut last = nodes[1].clock.now_us();
    for _ in 0..30 {
        run(
            &mut nodes,
            Duration::from_millis(10),
            Duration::from_secs(2),
        )
        .await;
        let n = nodes[1].clock.now_us();
        assert!(n >= last, "network time went back");
        last = n;
    }
    let d = diff_us(&nodes[1], &nodes[0]);
    assert!(d.abs() < 500, "error after a minute {d} µs");
    let st = nodes[1].clock.status_json();
    assert_eq!(st["synced"], true);
    assert_eq!(st["stratum"], 1);
    assert_eq!(st["source"], nodes[0].key.to_b64());
}

#[tokio::test(start_paused = true)]
async fn with_no_synced_peer_a_node_falls_back_to_its_own_clock() {
    let lonely = node(1, YEAR_2026_US, vec!["10.0.0.9:13300".into()]);
    let mut nodes = vec![lonely];
    let t = now(&nodes[0]);
    let v = view(&nodes[0], TreeState::Alone, None);
    nodes[0].cell.handle_tree(t, &v);
    run(
        &mut nodes,
        Duration::from_millis(10),
        Duration::from_secs(3),
    )
    .await;
    assert!(!nodes[0].clock.is_synced(), "still asking");
    run(
        &mut nodes,
        Duration::from_millis(10),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        nodes[0].clock.is_synced(),
        "a root of one is fully functional"
    );
    assert_eq!(nodes[0].clock.status_json()["stratum"], 0);
}

#[tokio::test(start_paused = true)]
async fn answers_nobody_asked_for_are_refused_and_change_nothing() {
    let mut n = node(1, YEAR_2026_US, vec!["10.0.0.2:13300".into()]);
    let t = now(&n);
    n.cell.handle_timeout(t);
    let before = n.clock.now_us();
    let outsider = SecretKey::generate().public();
    for i in 0..50u8 {
        let ans = TimeAns {
            nonce: Nonce::from_bytes([i; 16]),
            rx_us: 1_000_000,
            tx_us: 1_000_001,
            stratum: 0,
            synced: true,
            err_us: 0,
        };
        let (kind, body) = TimeMsg::Ans(ans).to_kind_body();
        let r = n.cell.handle_message(t, outsider, t.local_us, &kind, &body);
        assert_eq!(r.unwrap_err().code, "forbidden");
    }
    assert!(!n.clock.is_synced());
    assert!(n.clock.now_us() >= before);
    assert_eq!(n.clock.status_json()["rejected"], 50);
    // Malformed bodies are refused as such.
    let r = n.cell.handle_message(
        t,
        outsider,
        t.local_us,
        "time.ans",
        &serde_json::json!({"x": 1}),
    );
    assert_eq!(r.unwrap_err().code, "malformed");
}

#[tokio::test(start_paused = true)]
async fn a_request_flood_is_answered_at_a_bounded_rate() {
    let mut n = node(1, YEAR_2026_US, Vec::new());
    let t = now(&n);
    let v = view(&n, TreeState::Alone, None);
    n.cell.handle_tree(t, &v);
    let outsider = SecretKey::generate().public();
    let (mut ok, mut limited) = (0, 0);
    for i in 0..1000u32 {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&i.to_le_bytes());
        let (kind, body) = TimeMsg::Req {
            nonce: Nonce::from_bytes(b),
        }
        .to_kind_body();
        match n.cell.handle_message(t, outsider, t.local_us, &kind, &body) {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!(e.code, "rate_limited");
                limited += 1;
            }
        }
    }
    assert_eq!(ok, ANSWERS_PER_S as usize);
    assert_eq!(limited, 1000 - ANSWERS_PER_S as usize);
    let mut sent = 0;
    while let Some(a) = n.cell.poll_action(t) {
        assert!(matches!(a, CellAction::Send { to: Target::Key(k), .. } if k == outsider));
        sent += 1;
    }
    assert_eq!(sent, ok);
    // A second later the budget is back.
    tokio::time::advance(Duration::from_secs(1)).await;
    let t = now(&n);
    let (kind, body) = TimeMsg::Req {
        nonce: Nonce::from_bytes([9; 16]),
    }
    .to_kind_body();
    assert!(n
        .cell
        .handle_message(t, outsider, t.local_us, &kind, &body)
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn bootstrap_takes_the_median_so_one_liar_does_not_move_it() {
    let honest1 = node(1, YEAR_2026_US, Vec::new());
    let honest2 = node(2, YEAR_2026_US + 2_000, Vec::new());
    let liar = node(3, YEAR_2026_US + 3_600_000_000, Vec::new());
    let base = BaseView {
        state: Some(TreeState::Joining),
        size: 0,
        contacts: Vec::new(),
        root: None,
        parent: None,
        children: Vec::new(),
    };
    let newcomer = node(
        4,
        0,
        vec![
            honest1.addr.clone(),
            honest2.addr.clone(),
            liar.addr.clone(),
        ],
    );
    let mut nodes = vec![honest1, honest2, liar, newcomer];
    for n in nodes.iter_mut().take(3) {
        let t = now(n);
        let v = view(n, TreeState::Alone, None);
        n.cell.handle_tree(t, &v);
    }
    let t = now(&nodes[3]);
    nodes[3].cell.handle_base(t, &base);
    run(
        &mut nodes,
        Duration::from_millis(10),
        Duration::from_secs(2),
    )
    .await;
    assert!(nodes[3].clock.is_synced());
    let d0 = diff_us(&nodes[3], &nodes[0]);
    assert!(
        (-1_000..=3_000).contains(&d0),
        "within the honest spread: {d0} µs"
    );
}

#[tokio::test(start_paused = true)]
async fn strangers_spending_the_shared_budget_do_not_starve_our_children() {
    let mut n = node(1, YEAR_2026_US, Vec::new());
    let child = SecretKey::generate().public();
    let t = now(&n);
    let mut v = view(&n, TreeState::Root, None);
    v.children = vec![borg_proto::tree::Placed {
        pos: 2,
        peer: Peer {
            key: child,
            addr: "10.0.0.7:13300".into(),
            mon: String::new(),
        },
    }];
    n.cell.handle_tree(t, &v);
    let stranger = SecretKey::generate().public();
    let req = |i: u32| {
        let mut b = [1u8; 16];
        b[..4].copy_from_slice(&i.to_le_bytes());
        TimeMsg::Req {
            nonce: Nonce::from_bytes(b),
        }
        .to_kind_body()
    };
    for i in 0..ANSWERS_PER_S + 50 {
        let (kind, body) = req(i);
        let _ = n.cell.handle_message(t, stranger, t.local_us, &kind, &body);
    }
    let (kind, body) = req(9_999);
    assert!(n
        .cell
        .handle_message(t, stranger, t.local_us, &kind, &body)
        .is_err());
    for i in 0..CHILD_ANSWERS_PER_S {
        let (kind, body) = req(20_000 + i);
        assert!(
            n.cell
                .handle_message(t, child, t.local_us, &kind, &body)
                .is_ok(),
            "child answer {i}"
        );
    }
    let (kind, body) = req(30_000);
    assert!(
        n.cell
            .handle_message(t, child, t.local_us, &kind, &body)
            .is_err(),
        "a child has a bound too"
    );
}
