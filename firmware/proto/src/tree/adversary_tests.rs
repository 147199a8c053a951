//! Well-formed messages from keys that have no place in the tree (issue 9, items 1-4): the
//! topology changes only on the word of the entitled, and a claim on the wire is never
//! believed past what it can prove.

use serde_json::json;

use super::sim::{sim_key, sim_origin_proof, Sim, SimConfig, SimSeal};
use super::*;
use crate::identity::SecretKey;

const HB: u64 = 1000;

fn settled(n: usize, k: u64) -> Sim {
    let mut sim = Sim::new(SimConfig::default(), TreeConfig::new(k, HB));
    sim.add_node(&[]);
    for _ in 1..n {
        sim.add_node(&[0]);
    }
    for i in 0..n {
        sim.start(i);
    }
    let deadline = sim.now + 30 * HB;
    sim.run_until_converged(deadline).unwrap();
    let t = sim.now + 5 * HB;
    sim.run_until(t).unwrap();
    sim.check_tree().unwrap();
    sim
}

fn outsider() -> (SecretKey, Peer) {
    let key = sim_key(99, 12345);
    let peer = Peer {
        key: key.public(),
        addr: "sim:attacker".into(),
        mon: String::new(),
    };
    (key, peer)
}

fn run(sim: &mut Sim, ms: u64) {
    let t = sim.now + ms;
    sim.run_until(t).unwrap();
}

/// The tree is whole with `n` nodes and the same root as before.
fn whole(sim: &Sim, n: u64, root: usize) {
    let s = sim.check_tree().unwrap();
    assert_eq!(s.size, n);
    assert_eq!(s.root, root);
}

fn join_one_more(sim: &mut Sim) {
    let i = sim.add_node(&[0]);
    sim.start(i);
    let deadline = sim.now + 20 * HB;
    sim.run_until_converged(deadline).unwrap();
}

// ----- item 1: probe answers ---------------------------------------------------------------

#[test]
fn unsolicited_probe_ack_claiming_a_huge_tree_changes_nothing() {
    let mut sim = settled(12, 3);
    let root = sim.holder_of(1).unwrap();
    let (_, me) = outsider();
    for target in [root, sim.holder_of(5).unwrap()] {
        for re in [0u64, 1, u64::MAX] {
            let ack = TreeMsg::ProbeAck {
                root: Some(me.clone()),
                size: 1 << 40,
                peer: me.clone(),
                re,
            };
            sim.inject(target, me.key, ack);
        }
    }
    run(&mut sim, 10 * HB);
    whole(&sim, 12, root);
    assert!(sim.nodes[root].node.stats.rejected_unauthorized >= 3);
    join_one_more(&mut sim);
    whole(&sim, 13, root);
}

/// A lone root meets a stranger (as from a LAN beacon) and probes it: the stranger's
/// answers are believed only as far as they prove themselves.
fn lone_root_probing(stranger: &Peer) -> (TreeNode, u64) {
    let key = sim_key(7, 0);
    let me = Peer {
        key: key.public(),
        addr: "sim:0".into(),
        mon: String::new(),
    };
    let mut node = TreeNode::new(
        TreeConfig::new(3, HB),
        me,
        vec![],
        Box::new(SimSeal {
            signer: key.public(),
        }),
        1,
    );
    node.start(0);
    node.meet(0, stranger.clone());
    node.tick(1);
    let nonce = node
        .drain()
        .into_iter()
        .find_map(|a| match a {
            Action::Send {
                msg: TreeMsg::Probe { nonce, .. },
                ..
            } => Some(nonce),
            _ => None,
        })
        .expect("the lone root probes the stranger");
    (node, nonce)
}

fn dissolved(node: &mut TreeNode) -> bool {
    node.drain()
        .iter()
        .any(|a| matches!(a, Action::Event(TreeEvent::Dissolving)))
}

#[test]
fn a_root_claiming_a_big_tree_needs_a_witness_and_a_bound() {
    let (_, stranger) = outsider();
    // Answered with the right nonce, as a root of 2^40: no witness, and beyond the bound.
    let (mut node, nonce) = lone_root_probing(&stranger);
    let ack = |size, re| TreeMsg::ProbeAck {
        root: Some(stranger.clone()),
        size,
        peer: stranger.clone(),
        re,
    };
    node.handle(2, stranger.key, ack(1 << 40, nonce));
    assert!(!dissolved(&mut node));
    assert_eq!(node.state(), TreeState::Alone);
    // The same nonce again: already used.
    node.handle(3, stranger.key, ack(5, nonce));
    assert!(!dissolved(&mut node));

    // A root of 5 answering its own probe, without a member naming it: not believed.
    let (mut node, nonce) = lone_root_probing(&stranger);
    node.handle(2, stranger.key, ack(5, nonce));
    assert!(!dissolved(&mut node));

    // A member names the root (witness); the root's own answer to our probe is believed
    // if bounded, and our tree of one merges into it.
    let member_key = sim_key(99, 777);
    let member = Peer {
        key: member_key.public(),
        addr: "sim:member".into(),
        mon: String::new(),
    };
    for (size, merges) in [(MAX_TREE_SIZE + 1, false), (5, true)] {
        let (mut node, nonce) = lone_root_probing(&member);
        let member_ack = TreeMsg::ProbeAck {
            root: Some(stranger.clone()),
            size,
            peer: member.clone(),
            re: nonce,
        };
        node.handle(2, member.key, member_ack);
        let root_nonce = node
            .drain()
            .into_iter()
            .find_map(|a| match a {
                Action::Send {
                    to: Target::Peer(p),
                    msg: TreeMsg::Probe { nonce, .. },
                } if p.key == stranger.key => Some(nonce),
                _ => None,
            })
            .expect("a member's answer leads to a probe of its root");
        // The member's word alone (an answer from the member's key again) moves nothing.
        node.handle(3, stranger.key, ack(size, root_nonce));
        assert_eq!(dissolved(&mut node), merges, "size {size}");
    }
}

/// One witnessed round: `member` (probed with `nonce`) names `root`, we probe the root, and
/// the root answers with `size`. Returns whether we dissolved, and the next member nonce.
fn witnessed_claim(
    node: &mut TreeNode,
    t: u64,
    nonce: u64,
    member: &Peer,
    root: &Peer,
    size: u64,
) -> bool {
    let ack = |peer: &Peer, re| TreeMsg::ProbeAck {
        root: Some(root.clone()),
        size,
        peer: peer.clone(),
        re,
    };
    node.handle(t, member.key, ack(member, nonce));
    let root_nonce = node
        .drain()
        .into_iter()
        .find_map(|a| match a {
            Action::Send {
                msg: TreeMsg::Probe { nonce, .. },
                ..
            } => Some(nonce),
            _ => None,
        })
        .expect("a member's answer leads to a probe of its root");
    node.handle(t + 1, root.key, ack(root, root_nonce));
    dissolved(node)
}

/// The nonce of a fresh probe of `to` by `node`.
fn probe_nonce(node: &mut TreeNode, t: u64, to: &Peer) -> u64 {
    node.send_probe(t, Target::Peer(to.clone()), false);
    node.drain()
        .into_iter()
        .find_map(|a| match a {
            Action::Send {
                msg: TreeMsg::Probe { nonce, .. },
                ..
            } => Some(nonce),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_foreign_tree_size_may_not_grow_faster_than_trees_grow() {
    let member = Peer {
        key: sim_key(99, 778).public(),
        addr: "sim:member".into(),
        mon: String::new(),
    };
    let (_, stranger) = outsider();
    let (mut node, nonce) = lone_root_probing(&member);
    // Pretend our tree has 100 nodes, so a claim of 50 is no reason to merge.
    node.size = 100;
    assert!(!witnessed_claim(
        &mut node, 1_000, nonce, &member, &stranger, 50
    ));
    // One second later the same root claims 50,000: faster than any tree grows.
    let n = probe_nonce(&mut node, 2_000, &member);
    let before = node.stats.rejected_invalid;
    assert!(!witnessed_claim(
        &mut node, 2_000, n, &member, &stranger, 50_000
    ));
    assert_eq!(node.stats.rejected_invalid, before + 1);
    // A minute later that size is possible, and our smaller tree merges.
    let n = probe_nonce(&mut node, 62_000, &member);
    assert!(witnessed_claim(
        &mut node, 62_000, n, &member, &stranger, 50_000
    ));
}

// ----- item 2: hellos, reports and sizes ---------------------------------------------------

#[test]
fn hello_without_ticket_or_voucher_from_an_outsider_is_refused() {
    // k=2 and 2 nodes: the root's slot 3 is empty, the one an outsider would take.
    let mut sim = settled(2, 2);
    let root = sim.holder_of(1).unwrap();
    let (key, me) = outsider();
    let hello = |voucher| TreeMsg::Hello {
        pos: 3,
        ticket: None,
        peer: me.clone(),
        children: vec![],
        voucher,
    };
    sim.inject(root, me.key, hello(None));
    // A voucher sealed by the outsider itself proves nothing.
    let seal = SimSeal {
        signer: key.public(),
    }
    .seal(&adopt_seal_bytes(3, &me.key, &me.key));
    sim.inject(
        root,
        me.key,
        hello(Some(Voucher {
            signer: me.key,
            seal,
        })),
    );
    // A made-up ticket neither.
    sim.inject(
        root,
        me.key,
        TreeMsg::Hello {
            pos: 3,
            ticket: Some(42),
            peer: me.clone(),
            children: vec![],
            voucher: None,
        },
    );
    let view = sim.nodes[root].node.view();
    assert!(view.children.iter().all(|c| c.peer.key != me.key));
    // Not a child, so its reports go nowhere.
    sim.inject(
        root,
        me.key,
        TreeMsg::Route {
            dest: 1,
            order: Routed::Taken { pos: u64::MAX },
        },
    );
    sim.inject(
        root,
        me.key,
        TreeMsg::Max {
            pos: 3,
            max_pos: u64::MAX,
        },
    );
    run(&mut sim, 5 * HB);
    whole(&sim, 2, root);
    join_one_more(&mut sim);
    whole(&sim, 3, root);
}

#[test]
fn reports_from_a_real_child_cannot_push_the_size_past_the_tree() {
    let mut sim = settled(4, 2);
    let root = sim.holder_of(1).unwrap();
    let child = sim.holder_of(2).unwrap();
    let ck = sim.nodes[child].key;
    sim.inject(
        root,
        ck,
        TreeMsg::Route {
            dest: 1,
            order: Routed::Taken { pos: u64::MAX },
        },
    );
    sim.inject(
        root,
        ck,
        TreeMsg::Max {
            pos: 2,
            max_pos: u64::MAX,
        },
    );
    sim.inject(
        root,
        ck,
        TreeMsg::Up {
            pos: 2,
            children: vec![],
            max_pos: 1 << 62,
        },
    );
    assert_eq!(sim.nodes[root].node.view().size, 4);
    assert!(sim.nodes[root].node.stats.rejected_invalid >= 3);
    run(&mut sim, 3 * HB);
    whole(&sim, 4, root);
    join_one_more(&mut sim);
    whole(&sim, 5, root);
}

#[test]
fn a_full_tree_refuses_joins_instead_of_wrapping() {
    let mut sim = settled(1, 2);
    sim.nodes[0].node.size = MAX_TREE_SIZE;
    let (_, me) = outsider();
    sim.inject(0, me.key, TreeMsg::Join { peer: me.clone() });
    assert_eq!(sim.nodes[0].node.view().size, MAX_TREE_SIZE);
    sim.nodes[0].node.size = u64::MAX;
    sim.inject(0, me.key, TreeMsg::Join { peer: me.clone() });
    assert_eq!(sim.nodes[0].node.view().size, u64::MAX);
}

// ----- item 3: welcomes and probes ----------------------------------------------------------

#[test]
fn a_newcomer_takes_a_welcome_only_through_the_contact_it_asked() {
    let key = sim_key(7, 1);
    let me = Peer {
        key: key.public(),
        addr: "sim:1".into(),
        mon: String::new(),
    };
    let mut node = TreeNode::new(
        TreeConfig::new(2, HB),
        me.clone(),
        vec!["sim:contact".into()],
        Box::new(SimSeal {
            signer: key.public(),
        }),
        1,
    );
    node.start(0);
    assert_eq!(node.state(), TreeState::Joining);
    let contact = sim_key(7, 2).public();
    let (okey, outsider) = outsider();
    let welcome = |via| TreeMsg::Welcome {
        your_pos: 2,
        parent: outsider.clone(),
        info: DownInfo {
            pos: 1,
            root: outsider.clone(),
            size: 2,
            grandparent: None,
            siblings: vec![],
            root_children: vec![],
        },
        via,
    };
    // No seal, or the outsider's own seal: refused.
    node.handle(1, outsider.key, welcome(None));
    let own = Voucher {
        signer: okey.public(),
        seal: SimSeal {
            signer: okey.public(),
        }
        .seal(&join_seal_bytes(&me.key)),
    };
    node.handle(2, outsider.key, welcome(Some(own)));
    assert_eq!(node.state(), TreeState::Joining);
    // The contact's seal, but we never reached that contact: refused.
    let by_contact = Voucher {
        signer: contact,
        seal: SimSeal { signer: contact }.seal(&join_seal_bytes(&me.key)),
    };
    node.handle(3, outsider.key, welcome(Some(by_contact.clone())));
    assert_eq!(node.state(), TreeState::Joining);
    // Once our dial to the contact showed its key, a welcome it vouches for is taken.
    node.contact_answered("sim:contact", contact);
    node.handle(4, outsider.key, welcome(Some(by_contact)));
    assert_eq!(node.state(), TreeState::Joined);
}

#[test]
fn a_probe_is_answered_over_its_own_connection_not_at_the_address_it_names() {
    let mut sim = settled(3, 2);
    let (_, mut me) = outsider();
    me.addr = "sim:2".into(); // names another node's address
    sim.nodes[0].node.handle(
        sim.now,
        me.key,
        TreeMsg::Probe {
            peer: me.clone(),
            nonce: 9,
        },
    );
    let sends: Vec<Action> = sim.nodes[0].node.drain();
    assert!(sends.iter().all(|a| match a {
        Action::Send { to, .. } => *to == Target::Key(me.key),
        _ => true,
    }));
    assert!(sends.iter().any(|a| matches!(
        a,
        Action::Send {
            msg: TreeMsg::ProbeAck { re: 9, .. },
            ..
        }
    )));
}

// ----- item 4: broadcasts ----------------------------------------------------------------

#[test]
fn broadcasts_come_only_over_tree_links_with_a_valid_origin() {
    let mut sim = settled(10, 3);
    let leaf = sim.holder_of(10).unwrap();
    let (_, me) = outsider();
    // An outsider's broadcast, even with a valid origin proof of its own: not a tree link.
    sim.inject(
        leaf,
        me.key,
        TreeMsg::Bcast {
            id: "outsider-1".into(),
            origin: me.key,
            payload: json!({"text": "x", "origin_env": sim_origin_proof(&me.key)}),
        },
    );
    run(&mut sim, 2 * HB);
    assert_eq!(sim.delivery_count("outsider-1").0, 0);
    // From the real parent, but with a forged origin proof: not delivered, not forwarded.
    let parent_pos = geometry::parent_of(10, 3).unwrap();
    let parent = sim.holder_of(parent_pos).unwrap();
    let grandparent = sim
        .holder_of(geometry::parent_of(parent_pos, 3).unwrap())
        .unwrap();
    let origin = sim.nodes[parent].key;
    sim.inject(
        parent,
        sim.nodes[grandparent].key,
        TreeMsg::Bcast {
            id: "forged-1".into(),
            origin,
            payload: json!({"text": "x", "origin_env": "not a proof"}),
        },
    );
    run(&mut sim, 2 * HB);
    assert_eq!(sim.delivery_count("forged-1").0, 0);
    assert!(sim.nodes[parent].node.stats.rejected_broadcast_origin >= 1);
    // A proper one, checked at every hop, reaches everyone once.
    let good = sim.broadcast_from(
        parent,
        json!({"text": "x", "origin_env": sim_origin_proof(&origin)}),
    );
    run(&mut sim, 2 * HB);
    assert_eq!(sim.delivery_count(&good), (10, 1));
}

#[test]
fn a_long_broadcast_id_is_refused_at_decode() {
    let (_, me) = outsider();
    let long = TreeMsg::Bcast {
        id: "x".repeat(msg::MAX_BCAST_ID_BYTES + 1),
        origin: me.key,
        payload: json!({}),
    };
    let (kind, body) = long.to_kind_body();
    assert!(TreeMsg::from_kind_body(&kind, &body).is_err());
    let ok = TreeMsg::Bcast {
        id: "x".repeat(msg::MAX_BCAST_ID_BYTES),
        origin: me.key,
        payload: json!({}),
    };
    let (kind, body) = ok.to_kind_body();
    assert!(TreeMsg::from_kind_body(&kind, &body).is_ok());
}
