use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proptest::prelude::*;

use super::*;
use crate::identity::SecretKey;

fn key() -> PublicKey {
    SecretKey::generate().public()
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn sock(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(ip(a, b, c, d), port)
}

/// A node on 10.0.1.2/24 behind router 10.0.1.1.
fn lan_node(me: PublicKey) -> Reach {
    let net = LocalNet {
        addrs: vec![
            LocalAddr {
                ip: ip(127, 0, 0, 1),
                prefix: 8,
            },
            LocalAddr {
                ip: ip(10, 0, 1, 2),
                prefix: 24,
            },
        ],
        router: Some(ip(10, 0, 1, 1)),
    };
    Reach::new(ReachConfig::new(13300), me, net, 0)
}

/// A node with public address 198.51.100.5/24.
fn public_node(me: PublicKey) -> Reach {
    let net = LocalNet {
        addrs: vec![LocalAddr {
            ip: ip(198, 51, 100, 5),
            prefix: 24,
        }],
        router: Some(ip(198, 51, 100, 1)),
    };
    Reach::new(ReachConfig::new(13300), me, net, 0)
}

const FALLBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 13300);

fn seen(r: &mut Reach, now: u64, from: IpAddr, seen: SocketAddr) -> PublicKey {
    let k = key();
    r.observe(
        now,
        k,
        from,
        Evidence::Seen {
            seen,
            local_port: 13301,
        },
    );
    k
}

/// An observer at `from` reached us at `addr`; its (fresh) key.
fn reached(r: &mut Reach, now: u64, from: IpAddr, addr: SocketAddr) -> PublicKey {
    let k = key();
    r.observe(now, k, from, Evidence::Reached { addr });
    k
}

#[test]
fn public_needs_two_independent_observers() {
    let mut r = public_node(key());
    let me = sock(198, 51, 100, 5, 13300);
    reached(&mut r, 1, ip(203, 0, 113, 9), me);
    assert_eq!(
        r.decide(2, FALLBACK).role,
        Role::Probing,
        "one observer is not enough"
    );
    // A second key from the same IP is not independent.
    reached(&mut r, 3, ip(203, 0, 113, 9), me);
    assert_eq!(r.decide(4, FALLBACK).role, Role::Probing);
    reached(&mut r, 5, ip(192, 0, 2, 7), me);
    let d = r.decide(6, FALLBACK);
    assert_eq!(d.role, Role::Public);
    assert_eq!(d.advertise, PeerAddr::Direct(me));
    assert_eq!(d.external_ip, Some(me.ip()));
}

#[test]
fn observers_on_our_own_private_lan_do_not_count() {
    let mut r = lan_node(key());
    let me = sock(10, 0, 1, 2, 13300);
    reached(&mut r, 1, ip(10, 0, 1, 3), me);
    reached(&mut r, 1, ip(10, 0, 1, 4), me);
    reached(&mut r, 1, ip(127, 0, 0, 1), me);
    assert_eq!(r.decide(2, FALLBACK).role, Role::Probing);
}

#[test]
fn neighbours_on_a_public_subnet_are_witnesses() {
    let mut r = public_node(key());
    let me = sock(198, 51, 100, 5, 13300);
    reached(&mut r, 1, ip(198, 51, 100, 6), me);
    reached(&mut r, 1, ip(198, 51, 100, 7), me);
    assert_eq!(r.decide(2, FALLBACK).role, Role::Public);
}

#[test]
fn private_ranges() {
    for p in [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.1.1",
        "127.0.0.1",
        "fd00::1",
        "fe80::1",
    ] {
        assert!(is_private(p.parse().unwrap()), "{p}");
    }
    for p in [
        "11.0.0.1",
        "198.51.100.1",
        "100.128.0.1",
        "2001:db8::1",
        "8.8.8.8",
    ] {
        assert!(!is_private(p.parse().unwrap()), "{p}");
    }
}

#[test]
fn a_lying_observer_cannot_set_the_external_address() {
    let mut r = lan_node(key());
    seen(&mut r, 1, ip(198, 51, 100, 5), sock(203, 0, 113, 1, 13301));
    seen(&mut r, 1, ip(198, 51, 100, 6), sock(6, 6, 6, 6, 13301));
    let d = r.decide(2, FALLBACK);
    assert_eq!(d.role, Role::Probing);
    assert_eq!(d.external_ip, None);
}

#[test]
fn behind_nat_the_lowest_key_maps_and_becomes_gateway_once_reached() {
    let mut keys = [key(), key(), key()];
    keys.sort();
    let mut r = lan_node(keys[0]);
    let ext = sock(203, 0, 113, 1, 13301);
    seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    seen(&mut r, 1, ip(198, 51, 100, 6), ext);
    for (i, k) in keys[1..].iter().enumerate() {
        r.lan_peer(LanPeer {
            key: *k,
            lan_addr: sock(10, 0, 1, 3 + i as u8, 13300),
            router: Some(ip(10, 0, 1, 1)),
            role: Role::Probing,
            external: None,
            map_refused: false,
            vouched: false,
            at: 1,
        });
    }
    assert!(
        !r.decide(2, FALLBACK).want_mapping,
        "not before the LAN was heard"
    );
    let t = r.config().beacon_ttl_ms;
    for (i, k) in keys[1..].iter().enumerate() {
        r.lan_peer(LanPeer {
            key: *k,
            lan_addr: sock(10, 0, 1, 3 + i as u8, 13300),
            router: Some(ip(10, 0, 1, 1)),
            role: Role::Probing,
            external: None,
            map_refused: false,
            vouched: false,
            at: t,
        });
    }
    let d = r.decide(t, FALLBACK);
    assert_eq!(d.role, Role::Probing);
    assert!(d.want_mapping, "lowest key must map: {d:?}");
    assert_eq!(d.nat, NatKind::EndpointIndependent);
    assert_eq!(d.external_ip, Some(ext.ip()));

    let mapped = sock(203, 0, 113, 1, 13300);
    r.set_map(MapState::Mapped {
        external: mapped,
        protocol: "upnp".into(),
        since: 2,
    });
    assert_eq!(
        r.decide(t, FALLBACK).role,
        Role::Probing,
        "not verified yet"
    );
    reached(&mut r, t, ip(198, 51, 100, 5), mapped);
    let d = r.decide(t, FALLBACK);
    assert_eq!(d.role, Role::Gateway);
    assert_eq!(d.advertise, PeerAddr::Direct(mapped));
}

#[test]
fn others_on_the_lan_wait_for_the_candidate_then_relay_through_the_gateway() {
    let mut keys = [key(), key()];
    keys.sort();
    let (gw, me) = (keys[0], keys[1]);
    let mut r = lan_node(me);
    let ext = sock(203, 0, 113, 1, 40000);
    seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    seen(&mut r, 1, ip(198, 51, 100, 6), ext);
    let mut peer = LanPeer {
        key: gw,
        lan_addr: sock(10, 0, 1, 9, 13300),
        router: Some(ip(10, 0, 1, 1)),
        role: Role::Probing,
        external: None,
        map_refused: false,
        vouched: false,
        at: 1,
    };
    r.lan_peer(peer.clone());
    let d = r.decide(2, FALLBACK);
    assert!(!d.want_mapping);
    assert_eq!(d.role, Role::Probing);
    // After the settle time, a live candidate is still waited for...
    let patience = r.config().candidate_patience_ms;
    peer.at = patience - 1;
    r.lan_peer(peer.clone());
    let d = r.decide(patience - 1, FALLBACK);
    assert_eq!(d.role, Role::Probing);
    assert!(!d.want_mapping, "{d:?}");
    // ...but not for ever: one that never maps (a LAN device with the lowest key) would
    // keep the LAN unmapped. We map too; of two gateways the higher key yields.
    peer.at = 100_000;
    r.lan_peer(peer.clone());
    let d = r.decide(100_001, FALLBACK);
    assert_eq!(d.role, Role::Probing);
    assert!(d.want_mapping, "{d:?}");

    peer.role = Role::Gateway;
    peer.external = Some(sock(203, 0, 113, 1, 13300));
    peer.vouched = true;
    peer.at = 100_002;
    r.lan_peer(peer.clone());
    let d = r.decide(100_003, FALLBACK);
    assert_eq!(d.role, Role::Relayed);
    let relay = d.relay.expect("relay");
    assert_eq!(relay.key, gw);
    assert_eq!(relay.dial, peer.lan_addr);
    assert_eq!(
        d.advertise,
        PeerAddr::Relayed {
            relay: sock(203, 0, 113, 1, 13300),
            target: me
        }
    );

    // Two gateways at once (they mapped before hearing each other): the higher key yields.
    let mut mine = r_with_gateway_mapping(me);
    mine.lan_peer(peer.clone());
    assert_eq!(mine.decide(100_003, FALLBACK).role, Role::Relayed);

    // The gateway goes silent: after the beacon TTL we become the candidate.
    let later = 100_002 + r.config().beacon_ttl_ms + 1;
    let d = r.decide(later, FALLBACK);
    assert!(d.want_mapping, "{d:?}");
}

#[test]
fn a_refusing_router_sends_everyone_to_a_public_relay_chosen_by_rendezvous() {
    let me = key();
    let mut r = lan_node(me);
    let ext = sock(203, 0, 113, 2, 5000);
    let p1 = seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    let p2 = seen(&mut r, 1, ip(198, 51, 100, 6), ext);
    r.observer_role(1, p1, sock(198, 51, 100, 5, 13300), Role::Public);
    r.observer_role(1, p2, sock(198, 51, 100, 6, 13300), Role::Public);
    r.set_map(MapState::Refused {
        reason: "no IGD".into(),
        at: 1,
    });
    let d = r.decide(2, FALLBACK);
    assert_eq!(d.role, Role::Relayed, "{d:?}");
    let relay = d.relay.expect("relay");
    let expected = if rendezvous(&me, &p1) < rendezvous(&me, &p2) {
        p1
    } else {
        p2
    };
    assert_eq!(relay.key, expected);
    assert_eq!(
        r.decide(3, FALLBACK).relay,
        d.relay,
        "same answer every time"
    );
}

#[test]
fn a_lan_peer_reporting_refusal_counts_for_the_whole_lan() {
    let me = key();
    let mut r = lan_node(me);
    let ext = sock(203, 0, 113, 2, 5000);
    let p1 = seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    seen(&mut r, 1, ip(198, 51, 100, 6), ext);
    r.observer_role(1, p1, sock(198, 51, 100, 5, 13300), Role::Public);
    r.lan_peer(LanPeer {
        key: key(),
        lan_addr: sock(10, 0, 1, 9, 13300),
        router: Some(ip(10, 0, 1, 1)),
        role: Role::Relayed,
        external: None,
        map_refused: true,
        vouched: false,
        at: 1,
    });
    let d = r.decide(2, FALLBACK);
    assert!(!d.want_mapping);
    assert_eq!(d.role, Role::Relayed);
}

#[test]
fn with_no_outside_evidence_the_node_settles_as_local() {
    let r = lan_node(key());
    let d = r.decide(1, FALLBACK);
    assert_eq!(d.role, Role::Probing);
    assert_eq!(d.advertise, PeerAddr::Direct(sock(10, 0, 1, 2, 13300)));
    let d = r.decide(r.config().settle_ms, FALLBACK);
    assert_eq!(d.role, Role::Local);
}

#[test]
fn behind_nat_with_no_mapping_and_no_public_peer_is_local() {
    let mut r = lan_node(key());
    let ext = sock(203, 0, 113, 2, 5000);
    seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    seen(&mut r, 1, ip(198, 51, 100, 6), ext);
    r.set_map(MapState::Refused {
        reason: "no IGD".into(),
        at: 1,
    });
    assert_eq!(r.decide(2, FALLBACK).role, Role::Probing);
    assert_eq!(r.decide(r.config().settle_ms, FALLBACK).role, Role::Local);
}

#[test]
fn symmetric_nat_is_recognised_from_one_local_port() {
    let mut r = lan_node(key());
    seen(&mut r, 1, ip(198, 51, 100, 5), sock(203, 0, 113, 1, 1111));
    seen(&mut r, 1, ip(198, 51, 100, 6), sock(203, 0, 113, 1, 2222));
    assert_eq!(r.decide(2, FALLBACK).nat, NatKind::Symmetric);
}

#[test]
fn a_network_change_forgets_old_evidence() {
    let mut r = public_node(key());
    let me = sock(198, 51, 100, 5, 13300);
    reached(&mut r, 1, ip(203, 0, 113, 9), me);
    reached(&mut r, 1, ip(192, 0, 2, 7), me);
    assert_eq!(r.decide(2, FALLBACK).role, Role::Public);
    let mut net = r.net().clone();
    net.addrs[0].ip = ip(198, 51, 100, 50);
    r.set_net(net, 3);
    assert_eq!(r.decide(4, FALLBACK).role, Role::Probing);
}

#[test]
fn evidence_expires() {
    let mut r = public_node(key());
    let me = sock(198, 51, 100, 5, 13300);
    reached(&mut r, 1, ip(203, 0, 113, 9), me);
    reached(&mut r, 1, ip(192, 0, 2, 7), me);
    let later = 2 + r.config().evidence_ttl_ms;
    r.expire(later);
    assert_ne!(r.decide(later, FALLBACK).role, Role::Public);
}

#[test]
fn peer_addr_text_forms() {
    let k = key();
    let direct: PeerAddr = "203.0.113.7:13300".parse().expect("direct");
    assert_eq!(direct, PeerAddr::Direct(sock(203, 0, 113, 7, 13300)));
    let relayed = PeerAddr::Relayed {
        relay: sock(203, 0, 113, 7, 13300),
        target: k,
    };
    assert_eq!(relayed.to_string().parse::<PeerAddr>(), Ok(relayed));
    assert!("203.0.113.7".parse::<PeerAddr>().is_err());
    assert!("203.0.113.7:1/notakey".parse::<PeerAddr>().is_err());
    assert!("".parse::<PeerAddr>().is_err());
}

proptest! {
    #[test]
    fn peer_addr_parse_never_panics(s in ".{0,120}") {
        let _ = s.parse::<PeerAddr>();
    }

    #[test]
    fn peer_addr_round_trips(a in any::<[u8; 4]>(), port in any::<u16>(), relayed in any::<bool>()) {
        let relay = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port);
        let addr = if relayed {
            PeerAddr::Relayed { relay, target: key() }
        } else {
            PeerAddr::Direct(relay)
        };
        prop_assert_eq!(addr.to_string().parse::<PeerAddr>(), Ok(addr));
    }

    /// Whatever one observer says, the role never leaves probing on its word alone before the
    /// tentative wait (a small network's rule, tested above, starts after it).
    #[test]
    fn one_observer_decides_nothing(
        seen_ip in any::<[u8; 4]>(), port in any::<u16>(), reached in any::<bool>()
    ) {
        let mut r = lan_node(key());
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(seen_ip)), port);
        let k = key();
        let ev = if reached { Evidence::Reached { addr } } else { Evidence::Seen { seen: addr, local_port: 13301 } };
        r.observe(1, k, ip(198, 51, 100, 5), ev);
        let d = r.decide(2, FALLBACK);
        prop_assert_eq!(d.role, Role::Probing);
        prop_assert_eq!(d.external_ip, None);
    }
}

/// After the tentative wait: the time at which one witness may decide.
fn tentative_at(r: &Reach) -> u64 {
    r.config().tentative_ms
}

#[test]
fn one_witness_at_our_own_public_address_makes_a_tentative_public_node() {
    let mut r = public_node(key());
    let me = sock(198, 51, 100, 5, 13300);
    // Two LAN nodes behind one router: two keys, one IP, one witness.
    reached(&mut r, 1, ip(203, 0, 113, 1), me);
    reached(&mut r, 1, ip(203, 0, 113, 1), me);
    assert_eq!(r.decide(2, FALLBACK).role, Role::Probing, "waits first");
    let d = r.decide(tentative_at(&r), FALLBACK);
    assert_eq!(d.role, Role::Public, "{d:?}");
    assert!(d.tentative);
    assert_eq!(d.advertise, PeerAddr::Direct(me));
    // A second independent witness confirms it.
    reached(&mut r, 5, ip(192, 0, 2, 7), me);
    let d = r.decide(tentative_at(&r), FALLBACK);
    assert_eq!(d.role, Role::Public);
    assert!(!d.tentative);
}

#[test]
fn one_witness_never_makes_a_private_address_public() {
    let mut r = lan_node(key());
    // An outsider came in at our LAN address: somebody's port forward, not a public address.
    reached(&mut r, 1, ip(198, 51, 100, 5), sock(10, 0, 1, 2, 13300));
    let d = r.decide(r.config().settle_ms, FALLBACK);
    assert_ne!(d.role, Role::Public, "{d:?}");
}

#[test]
fn behind_nat_one_witness_leads_to_a_tentative_relay_instead_of_local() {
    let mut r = lan_node(key());
    let relay = sock(203, 0, 113, 10, 13300);
    let p1 = seen(&mut r, 1, relay.ip(), sock(203, 0, 113, 1, 40000));
    r.observer_role(1, p1, relay, Role::Public);
    // Before the tentative wait nothing is decided; the router then refuses a mapping.
    assert_eq!(r.decide(2, FALLBACK).role, Role::Probing);
    let d = r.decide(tentative_at(&r), FALLBACK);
    assert!(
        d.want_mapping,
        "the lone LAN node is the mapping candidate: {d:?}"
    );
    assert!(d.tentative);
    assert_eq!(d.external_ip, Some(ip(203, 0, 113, 1)));
    r.set_map(MapState::Refused {
        reason: "no IGD".into(),
        at: 5,
    });
    for now in [tentative_at(&r), r.config().settle_ms * 2] {
        let d = r.decide(now, FALLBACK);
        assert_eq!(d.role, Role::Relayed, "{d:?}");
        assert!(d.tentative);
        assert_eq!(d.relay.map(|c| c.key), Some(p1));
        assert_eq!(
            d.advertise,
            PeerAddr::Relayed {
                relay,
                target: r.me
            }
        );
    }
}

#[test]
fn single_witnesses_that_disagree_cancel_out_but_a_public_peer_still_relays() {
    let mut r = lan_node(key());
    let p1_addr = sock(203, 0, 113, 10, 13300);
    let p1 = seen(&mut r, 1, p1_addr.ip(), sock(203, 0, 113, 1, 40000));
    r.observer_role(1, p1, p1_addr, Role::Public);
    seen(&mut r, 1, ip(198, 51, 100, 6), sock(6, 6, 6, 6, 40000));
    let d = r.decide(tentative_at(&r), FALLBACK);
    assert_eq!(d.external_ip, None, "a liar cancels the honest witness out");
    let d = r.decide(r.config().settle_ms, FALLBACK);
    assert_eq!(d.role, Role::Relayed, "not local: {d:?}");
    assert_eq!(d.relay.map(|c| c.key), Some(p1));
}

#[test]
fn one_witness_cannot_make_a_gateway_by_forward() {
    let mut r = lan_node(key());
    let ext = sock(203, 0, 113, 1, 40000);
    seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    r.set_map(MapState::Refused {
        reason: "no IGD".into(),
        at: 1,
    });
    reached(&mut r, 2, ip(198, 51, 100, 5), sock(203, 0, 113, 1, 13300));
    let d = r.decide(r.config().settle_ms, FALLBACK);
    assert_ne!(d.role, Role::Gateway, "{d:?}");
}

proptest! {
    /// One lying witness never overturns two honest ones, whatever it claims, however late.
    #[test]
    fn one_liar_never_beats_two_honest_witnesses(
        lie in any::<[u8; 4]>(), port in any::<u16>(), reached_claim in any::<bool>(), late in any::<bool>()
    ) {
        let mut r = lan_node(key());
        let ext = sock(203, 0, 113, 1, 40000);
        let t = if late { 3 } else { 1 };
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(lie)), port);
        let liar_ev = if reached_claim { Evidence::Reached { addr } } else { Evidence::Seen { seen: addr, local_port: 13301 } };
        if !late {
            r.observe(t, key(), ip(192, 0, 2, 66), liar_ev);
        }
        seen(&mut r, 2, ip(198, 51, 100, 5), ext);
        seen(&mut r, 2, ip(198, 51, 100, 6), ext);
        if late {
            r.observe(t, key(), ip(192, 0, 2, 66), liar_ev);
        }
        let d = r.decide(r.config().settle_ms, FALLBACK);
        prop_assert_eq!(d.external_ip, Some(ext.ip()));
        prop_assert!(!d.tentative);
        prop_assert_ne!(d.role, Role::Public);
    }

    /// One witness alone never makes a node on a private address public or a gateway.
    #[test]
    fn one_witness_never_makes_a_lan_node_public_or_gateway(
        seen_ip in any::<[u8; 4]>(), port in any::<u16>(), reached in any::<bool>(), now in 0u64..100_000
    ) {
        let mut r = lan_node(key());
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(seen_ip)), port);
        let ev = if reached { Evidence::Reached { addr } } else { Evidence::Seen { seen: addr, local_port: 13301 } };
        r.observe(0, key(), ip(198, 51, 100, 5), ev);
        let d = r.decide(now, FALLBACK);
        prop_assert!(d.role != Role::Public && d.role != Role::Gateway, "{:?}", d);
    }
}

/// A verified gateway with key `me`, for the yield rule.
fn r_with_gateway_mapping(me: PublicKey) -> Reach {
    let mut r = lan_node(me);
    let ext = sock(203, 0, 113, 1, 40000);
    seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    seen(&mut r, 1, ip(198, 51, 100, 6), ext);
    let mapped = sock(203, 0, 113, 1, 13301);
    r.set_map(MapState::Mapped {
        external: mapped,
        protocol: "pcp".into(),
        since: 1,
    });
    reached(&mut r, 2, ip(198, 51, 100, 5), mapped);
    assert_eq!(r.decide(3, FALLBACK).role, Role::Gateway);
    r
}

#[test]
fn a_port_forwarded_by_hand_makes_a_gateway_without_any_mapping() {
    let mut r = lan_node(key());
    let ext = sock(203, 0, 113, 1, 40000);
    seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    seen(&mut r, 1, ip(198, 51, 100, 6), ext);
    r.set_map(MapState::Refused {
        reason: "no IGD".into(),
        at: 1,
    });
    let forwarded = sock(203, 0, 113, 1, 13300);
    reached(&mut r, 2, ip(198, 51, 100, 5), forwarded);
    let d = r.decide(3, FALLBACK);
    assert_eq!(d.role, Role::Gateway, "{d:?}");
    assert_eq!(d.advertise, PeerAddr::Direct(forwarded));
    assert!(!d.want_mapping);
}

/// A LAN device with a lower key says it is the gateway, without a proof an observer of ours
/// signed (issue 9 item 8): the real gateway keeps its mapping, the others keep relaying
/// through it, and with no real gateway yet the claimant is not waited for as the candidate.
#[test]
fn a_gateway_claim_without_proof_is_not_believed() {
    let mut keys = [key(), key(), key()];
    keys.sort();
    let (liar, gw, me) = (keys[0], keys[1], keys[2]);
    let claim = LanPeer {
        key: liar,
        lan_addr: sock(10, 0, 1, 66, 13300),
        router: Some(ip(10, 0, 1, 1)),
        role: Role::Gateway,
        external: Some(sock(203, 0, 113, 1, 13300)),
        map_refused: false,
        vouched: false,
        at: 100_000,
    };
    // The real gateway does not yield to it.
    let mut real = r_with_gateway_mapping(gw);
    real.lan_peer(claim.clone());
    assert_eq!(real.decide(100_001, FALLBACK).role, Role::Gateway);
    // With proof, it would (two gateways that mapped at once: the higher key yields).
    real.lan_peer(LanPeer {
        vouched: true,
        ..claim.clone()
    });
    assert_eq!(real.decide(100_001, FALLBACK).role, Role::Relayed);

    // A node behind the same router relays through the real gateway, not the claimant.
    let mut r = lan_node(me);
    let ext = sock(203, 0, 113, 1, 40000);
    seen(&mut r, 1, ip(198, 51, 100, 5), ext);
    seen(&mut r, 1, ip(198, 51, 100, 6), ext);
    r.lan_peer(claim.clone());
    // No real gateway yet: the claimant is not the candidate to wait for.
    let d = r.decide(100_001, FALLBACK);
    assert!(d.want_mapping, "{d:?}");
    r.lan_peer(LanPeer {
        key: gw,
        lan_addr: sock(10, 0, 1, 10, 13300),
        router: Some(ip(10, 0, 1, 1)),
        role: Role::Gateway,
        external: Some(sock(203, 0, 113, 1, 13301)),
        map_refused: false,
        vouched: true,
        at: 100_000,
    });
    let d = r.decide(100_001, FALLBACK);
    assert_eq!(d.role, Role::Relayed);
    assert_eq!(d.relay.map(|x| x.key), Some(gw));
}
