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

/// Errors decoding a reachability message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReachMsgError {
    #[error("not a reachability message kind: {0:?}")]
    UnknownKind(String),
    #[error("malformed {kind}: {reason}")]
    Malformed { kind: String, reason: String },
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
    /// Observer to prober: "your connection came from `seen`; I am `role` at `addr`".
    #[serde(rename = "nat.seen")]
    Seen {
        seen: SocketAddr,
        role: Role,
        addr: PeerAddr,
    },
    /// Observer to prober, on the dial-back connection to `addr`.
    #[serde(rename = "nat.reached")]
    Reached { addr: SocketAddr, token: String },
    /// LAN presence, every beacon interval.
    #[serde(rename = "nat.beacon")]
    Beacon {
        cell: String,
        lan: SocketAddr,
        router: Option<IpAddr>,
        role: Role,
        external: Option<SocketAddr>,
        map: BeaconMap,
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
        crate::envelope::join_kind_body(kind, body).map_err(|reason| ReachMsgError::Malformed {
            kind: kind.to_string(),
            reason,
        })
    }
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
            },
            ReachMsg::Reached {
                addr: a,
                token: "1".into(),
            },
            ReachMsg::Beacon {
                cell: "peerTreeNet".into(),
                lan: a,
                router: Some(a.ip()),
                role: Role::Gateway,
                external: None,
                map: BeaconMap::Mapped,
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

    proptest! {
        #[test]
        fn decoding_never_panics(kind in prop::sample::select(KINDS.to_vec()), body in ".{0,200}") {
            let value = serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body));
            let _ = ReachMsg::from_kind_body(kind, &value);
        }
    }
}
