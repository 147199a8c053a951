//! Typed reachability messages. Like tree messages, each travels as the `kind` and `body` of
//! a signed envelope; decoding is strict (unknown kinds and fields are errors).
//!
//! - `nat.probe`, `nat.seen`, `nat.reached`: the probe exchange on a `borg-probe/1`
//!   connection (docs/NAT.md): the prober says where it reached the observer and may ask for a
//!   dial-back; the observer says where the connection came from and who it is; a dial-back
//!   carries the prober's token to the address under test.
//! - `nat.beacon`: a node's LAN presence, sent by UDP broadcast on the link.
//! - `relay.register`, `relay.open`: a relayed node keeps a registration with its relay; the
//!   relay asks it to open a connection back when somebody wants to reach it.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{PeerAddr, Role};
use crate::identity::PublicKey;

/// Witnesses one `nat.seen` may name at most. A small network has few nodes outside any one
/// LAN; four more than covers the second witness a node needs, and keeps what one observer
/// can make a prober dial (the prober probes at most six peers a round anyway) small.
pub const MAX_REFERRALS: usize = 4;

/// Proofs one beacon may carry at most: `nat.reached` envelopes from outside observers that
/// came in through the gateway's mapping (one per observer; two let a LAN node that probed
/// other observers than the gateway's first one still check a claim).
pub const MAX_BEACON_PROOFS: usize = 2;

/// Bytes of one proof at most (a sealed `nat.reached` is about 400).
pub const MAX_PROOF_BYTES: usize = 1024;

/// Errors decoding a reachability message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReachMsgError {
    #[error("not a reachability message kind: {0:?}")]
    UnknownKind(String),
    #[error("malformed {kind}: {reason}")]
    Malformed { kind: String, reason: String },
    #[error("nat.seen names {0} witnesses, more than {MAX_REFERRALS}")]
    TooManyReferrals(usize),
    #[error("nat.beacon carries {0} proofs, more than {MAX_BEACON_PROOFS}")]
    TooManyProofs(usize),
    #[error("a nat.beacon proof of {0} bytes, more than {MAX_PROOF_BYTES}")]
    ProofTooLarge(usize),
}

/// Another node an observer reached directly at `addr`: somebody else a prober can ask, so
/// that a node whose only contact is one public node still finds a second witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Referral {
    pub key: PublicKey,
    pub addr: SocketAddr,
}

/// The port-mapping state a beacon reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BeaconMap {
    None,
    Trying,
    Mapped,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", deny_unknown_fields)]
pub enum ReachMsg {
    /// Prober to observer: "I reached you at `reached`; please dial me back at `dialback`
    /// with this token".
    #[serde(rename = "nat.probe")]
    Probe {
        reached: SocketAddr,
        dialback: Option<SocketAddr>,
        token: String,
    },
    /// Observer to prober: "your connection came from `seen`; I am `role` at `addr`; these
    /// `peers` (at most [`MAX_REFERRALS`]) could witness for you too".
    #[serde(rename = "nat.seen")]
    Seen {
        seen: SocketAddr,
        role: Role,
        addr: PeerAddr,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        peers: Vec<Referral>,
    },
    /// Observer to prober, on the dial-back connection to `addr`, where TLS showed it the
    /// key `to`. Signed by the observer, it is also the prober's proof for its LAN that its
    /// mapping is reached from outside (carried in its beacons, [`super::proof`]).
    #[serde(rename = "nat.reached")]
    Reached {
        addr: SocketAddr,
        token: String,
        to: PublicKey,
    },
    /// LAN presence, every beacon interval.
    #[serde(rename = "nat.beacon")]
    Beacon {
        cell: String,
        lan: SocketAddr,
        router: Option<IpAddr>,
        role: Role,
        external: Option<SocketAddr>,
        map: BeaconMap,
        /// A gateway's evidence: sealed `nat.reached` envelopes naming its key and
        /// `external` (at most [`MAX_BEACON_PROOFS`] of [`MAX_PROOF_BYTES`] each).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        proofs: Vec<String>,
    },
    /// Relayed node to its relay, periodically over their link.
    #[serde(rename = "relay.register")]
    RelayRegister {},
    /// Relay to relayed node: connect back with this token, somebody is waiting.
    #[serde(rename = "relay.open")]
    RelayOpen { token: String },
}

pub const KINDS: [&str; 6] = [
    "nat.probe",
    "nat.seen",
    "nat.reached",
    "nat.beacon",
    "relay.register",
    "relay.open",
];

impl ReachMsg {
    /// Whether an envelope kind belongs here (the rest go to the tree).
    pub fn is_reach_kind(kind: &str) -> bool {
        KINDS.contains(&kind)
    }

    /// Split into an envelope's `kind` and `body`.
    pub fn to_kind_body(&self) -> (String, Value) {
        crate::envelope::split_kind_body(self)
    }

    /// Decode from an envelope's `kind` and `body`.
    pub fn from_kind_body(kind: &str, body: &Value) -> Result<Self, ReachMsgError> {
        if !Self::is_reach_kind(kind) {
            return Err(ReachMsgError::UnknownKind(kind.to_string()));
        }
        let msg: Self = crate::envelope::join_kind_body(kind, body).map_err(|reason| {
            ReachMsgError::Malformed {
                kind: kind.to_string(),
                reason,
            }
        })?;
        match &msg {
            ReachMsg::Seen { peers, .. } if peers.len() > MAX_REFERRALS => {
                return Err(ReachMsgError::TooManyReferrals(peers.len()));
            }
            ReachMsg::Beacon { proofs, .. } => {
                if proofs.len() > MAX_BEACON_PROOFS {
                    return Err(ReachMsgError::TooManyProofs(proofs.len()));
                }
                if let Some(p) = proofs.iter().find(|p| p.len() > MAX_PROOF_BYTES) {
                    return Err(ReachMsgError::ProofTooLarge(p.len()));
                }
            }
            _ => {}
        }
        Ok(msg)
    }
}

/// The few beacon fields a receiver checks before paying for a signature check.
#[derive(Deserialize)]
struct PeekEnvelope {
    kind: String,
    body: PeekBeacon,
}

#[derive(Deserialize)]
struct PeekBeacon {
    cell: String,
    lan: SocketAddr,
}

/// Cell name and LAN address of what claims to be a `nat.beacon` envelope, read without
/// verifying anything (other fields are ignored here; [`crate::envelope::open`] and
/// [`ReachMsg::from_kind_body`] check them after). Lets a receiver drop a beacon of another
/// cell, or one that speaks for another address than it came from, for the cost of a JSON
/// parse instead of an ECDSA verification (issue 9 item 8).
pub fn peek_beacon(bytes: &[u8]) -> Option<(String, SocketAddr)> {
    let e: PeekEnvelope = serde_json::from_slice(bytes).ok()?;
    (e.kind == "nat.beacon").then_some((e.body.cell, e.body.lan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn every_message_round_trips() {
        let a: SocketAddr = "203.0.113.7:13300"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let msgs = vec![
            ReachMsg::Probe {
                reached: a,
                dialback: Some(a),
                token: "00ff".into(),
            },
            ReachMsg::Seen {
                seen: a,
                role: Role::Public,
                addr: PeerAddr::Relayed {
                    relay: a,
                    target: SecretKey::generate().public(),
                },
                peers: vec![],
            },
            ReachMsg::Seen {
                seen: a,
                role: Role::Probing,
                addr: PeerAddr::Direct(a),
                peers: vec![Referral {
                    key: SecretKey::generate().public(),
                    addr: a,
                }],
            },
            ReachMsg::Reached {
                addr: a,
                token: "1".into(),
                to: SecretKey::generate().public(),
            },
            ReachMsg::Beacon {
                cell: "peerTreeNet".into(),
                lan: a,
                router: Some(a.ip()),
                role: Role::Gateway,
                external: None,
                map: BeaconMap::Mapped,
                proofs: vec![],
            },
            ReachMsg::Beacon {
                cell: "peerTreeNet".into(),
                lan: a,
                router: Some(a.ip()),
                role: Role::Gateway,
                external: Some(a),
                map: BeaconMap::Mapped,
                proofs: vec!["{}".into(), "x".repeat(MAX_PROOF_BYTES)],
            },
            ReachMsg::RelayRegister {},
            ReachMsg::RelayOpen { token: "ab".into() },
        ];
        for m in msgs {
            let (kind, body) = m.to_kind_body();
            assert!(KINDS.contains(&kind.as_str()));
            assert_eq!(ReachMsg::from_kind_body(&kind, &body), Ok(m));
        }
    }

    #[test]
    fn strict_decoding() {
        assert!(matches!(
            ReachMsg::from_kind_body("tree.join", &json!({})),
            Err(ReachMsgError::UnknownKind(_))
        ));
        assert!(ReachMsg::from_kind_body("relay.open", &json!({"token": "a", "x": 1})).is_err());
        assert!(ReachMsg::from_kind_body(
            "nat.seen",
            &json!({"seen": "nope", "role": "public", "addr": "1.2.3.4:5"})
        )
        .is_err());
        assert!(ReachMsg::from_kind_body(
            "nat.seen",
            &json!({"seen": "1.2.3.4:5", "role": "king", "addr": "1.2.3.4:5"})
        )
        .is_err());
    }

    #[test]
    fn a_seen_without_peers_decodes_and_too_many_peers_are_refused() {
        let k = SecretKey::generate().public().to_b64();
        let seen = json!({"seen": "1.2.3.4:5", "role": "public", "addr": "1.2.3.4:5"});
        assert!(ReachMsg::from_kind_body("nat.seen", &seen).is_ok());
        let peer = json!({"key": k, "addr": "5.6.7.8:13300"});
        let mut body = seen.clone();
        body["peers"] = json!(vec![peer.clone(); MAX_REFERRALS]);
        assert!(ReachMsg::from_kind_body("nat.seen", &body).is_ok());
        body["peers"] = json!(vec![peer.clone(); MAX_REFERRALS + 1]);
        assert_eq!(
            ReachMsg::from_kind_body("nat.seen", &body),
            Err(ReachMsgError::TooManyReferrals(MAX_REFERRALS + 1))
        );
        body["peers"] = json!([{"key": k, "addr": "5.6.7.8:13300", "x": 1}]);
        assert!(ReachMsg::from_kind_body("nat.seen", &body).is_err());
    }

    #[test]
    fn peek_beacon_reads_a_sealed_beacon_and_nothing_else() {
        let a: SocketAddr = "192.168.60.10:13300"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let key = SecretKey::generate();
        let beacon = ReachMsg::Beacon {
            cell: "peerTreeNet".into(),
            lan: a,
            router: None,
            role: Role::Local,
            external: None,
            map: BeaconMap::None,
            proofs: vec![],
        };
        let (kind, body) = beacon.to_kind_body();
        let bytes = crate::envelope::seal(&key, &kind, None, 1, body).to_bytes();
        assert_eq!(peek_beacon(&bytes), Some(("peerTreeNet".to_string(), a)));
        let (kind, body) = ReachMsg::RelayRegister {}.to_kind_body();
        let other = crate::envelope::seal(&key, &kind, None, 1, body).to_bytes();
        assert_eq!(peek_beacon(&other), None);
        assert_eq!(peek_beacon(b"BORG-RELAY x"), None);
    }

    proptest! {
        #[test]
        fn peek_beacon_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), cell in "[a-zA-Z]{0,12}", port in any::<u16>()) {
            let _ = peek_beacon(&bytes);
            let text = format!(r#"{{"kind":"nat.beacon","body":{{"cell":"{cell}","lan":"10.0.0.1:{port}"}}}}"#);
            prop_assert_eq!(peek_beacon(text.as_bytes()).map(|(c, a)| (c, a.port())), Some((cell, port)));
        }

        /// Whatever list of witnesses a `nat.seen` carries, decoding never panics and never
        /// yields more than the bound; what decodes re-encodes to the same message.
        #[test]
        fn referrals_are_bounded_at_decode(
            n in 0usize..12,
            ports in prop::collection::vec(any::<u16>(), 12),
            junk in ".{0,40}",
        ) {
            let k = SecretKey::generate().public().to_b64();
            let peers: Vec<Value> = (0..n)
                .map(|i| if i == 7 { json!(junk.clone()) } else { json!({"key": k, "addr": format!("9.9.9.9:{}", ports[i])}) })
                .collect();
            let body = json!({"seen": "1.2.3.4:5", "role": "relayed", "addr": "1.2.3.4:5", "peers": peers});
            if let Ok(m) = ReachMsg::from_kind_body("nat.seen", &body) {
                let ReachMsg::Seen { peers, .. } = &m else { unreachable!() };
                prop_assert!(peers.len() <= MAX_REFERRALS);
                let (kind, b) = m.to_kind_body();
                prop_assert_eq!(ReachMsg::from_kind_body(&kind, &b), Ok(m.clone()));
            }
        }

        /// Whatever proofs a beacon carries, what decodes holds at most the bounds.
        #[test]
        fn beacon_proofs_are_bounded_at_decode(n in 0usize..5, len in 0usize..1100) {
            let body = json!({"cell": "peerTreeNet", "lan": "10.0.0.1:13300", "router": null,
                              "role": "gateway", "external": "11.0.0.2:13300", "map": "mapped",
                              "proofs": vec!["p".repeat(len); n]});
            match ReachMsg::from_kind_body("nat.beacon", &body) {
                Ok(ReachMsg::Beacon { proofs, .. }) => {
                    prop_assert!(proofs.len() <= MAX_BEACON_PROOFS);
                    prop_assert!(proofs.iter().all(|p| p.len() <= MAX_PROOF_BYTES));
                }
                Ok(_) => prop_assert!(false),
                Err(e) => prop_assert!(n > MAX_BEACON_PROOFS || len > MAX_PROOF_BYTES, "{e}"),
            }
        }

        #[test]
        fn decoding_never_panics(kind in prop::sample::select(KINDS.to_vec()), body in ".{0,200}") {
            let value = serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body));
            let _ = ReachMsg::from_kind_body(kind, &value);
        }
    }
}
