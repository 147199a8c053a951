//! Typed tree messages. On the wire each is the `kind` and `body` of a signed envelope
//! (`kind` = `tree.<name>`); the sender is the envelope's verified `from` key, so no body
//! repeats it. Decoding is strict: unknown kinds and unknown fields are errors.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::geometry::Pos;
use crate::identity::PublicKey;

/// A node as others reach it: its key and advertised addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub key: PublicKey,
    /// Tree (net) address, `ip:port`.
    pub addr: String,
    /// Monitor address, `ip:port` (empty where there is none, e.g. in simulation).
    #[serde(default)]
    pub mon: String,
}

/// A peer at a position (children, siblings, root children lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placed {
    pub pos: Pos,
    pub peer: Peer,
}

/// What a parent tells its children every heartbeat (and in a welcome).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownInfo {
    /// The sender's position (the receiver's parent position).
    pub pos: Pos,
    pub root: Peer,
    /// Tree size as the sender knows it.
    pub size: u64,
    /// The sender's own parent, i.e. the receiver's grandparent.
    pub grandparent: Option<Peer>,
    /// The sender's children, i.e. the receiver and its siblings.
    pub siblings: Vec<Placed>,
    /// The root's children ("the root peer group"), used when the root fails.
    pub root_children: Vec<Placed>,
}

/// The messages of the PeerTree protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", deny_unknown_fields)]
pub enum TreeMsg {
    /// Newcomer to any contact: "let me in".
    #[serde(rename = "tree.join")]
    Join { peer: Peer },
    /// Contact to newcomer: not a member right now, try again or elsewhere.
    #[serde(rename = "tree.retry")]
    Retry { root: Option<Peer> },
    /// A routed message: forwarded hop by hop along tree links to position `dest`.
    #[serde(rename = "tree.route")]
    Route { dest: Pos, order: Routed },
    /// Parent to newcomer (after an attach): your position and surroundings. `via` is the
    /// seal of the contact the newcomer asked (see [`join_seal_bytes`]), passed along with
    /// the join request and the attach: the newcomer takes a welcome only with it.
    #[serde(rename = "tree.welcome")]
    Welcome {
        your_pos: Pos,
        parent: Peer,
        info: DownInfo,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<Voucher>,
    },
    /// Child to parent: take me at `pos`. `ticket` proves a root-issued move; `voucher`
    /// proves an adoption (the seal of whoever told us to adopt this parent, see
    /// [`adopt_seal_bytes`]). Without either, only the position's own holder is taken back.
    #[serde(rename = "tree.hello")]
    Hello {
        pos: Pos,
        ticket: Option<u64>,
        peer: Peer,
        children: Vec<Placed>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voucher: Option<Voucher>,
    },
    /// Parent to child, every heartbeat.
    #[serde(rename = "tree.down")]
    Down { info: DownInfo },
    /// Root to its children out of turn, after the size or its children changed (the same
    /// content as a heartbeat; counted as join/repair cost, not as a heartbeat).
    #[serde(rename = "tree.announce")]
    Announce { info: DownInfo },
    /// Child to parent, out of turn: the highest position in my subtree changed (a join or
    /// a move below). Keeps the root's view of the tree's end current within a few hops.
    #[serde(rename = "tree.max")]
    Max { pos: Pos, max_pos: Pos },
    /// Child to parent, every heartbeat.
    #[serde(rename = "tree.up")]
    Up {
        pos: Pos,
        children: Vec<Placed>,
        /// Highest position in the sender's subtree (lets a new root learn the true size).
        max_pos: Pos,
    },
    /// Parent of a failed position to its orphaned children: your new parent. `seal` is the
    /// sender's seal over [`adopt_seal_bytes`]; the orphan shows it to the new parent.
    #[serde(rename = "tree.adopt")]
    Adopt {
        parent_pos: Pos,
        parent: Peer,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<String>,
    },
    /// Orphan to its grandparent: who holds my parent's position now?
    #[serde(rename = "tree.orphan")]
    Orphan { pos: Pos, peer: Peer },
    /// Parent to a node that claims a position it does not hold: leave and join again.
    #[serde(rename = "tree.evict")]
    Evict { pos: Pos },
    /// A mover that became root, to the root child that coordinated the repair.
    #[serde(rename = "tree.in_place")]
    InPlace { pos: Pos, peer: Peer },
    /// Liveness and tree identity probe (used to find other trees to merge with). The
    /// answer goes back over the connection the probe came on and repeats `nonce`.
    #[serde(rename = "tree.probe")]
    Probe { peer: Peer, nonce: u64 },
    /// The answer to a probe: `re` is the probe's nonce (an answer to nothing we asked is
    /// dropped).
    #[serde(rename = "tree.probe_ack")]
    ProbeAck {
        root: Option<Peer>,
        size: u64,
        peer: Peer,
        re: u64,
    },
    /// Parent to children, passed down the whole tree: leave and join the tree at `contact`.
    #[serde(rename = "tree.dissolve")]
    Dissolve { contact: Peer },
    /// Broadcast, flooded along tree links with de-duplication by `id`.
    #[serde(rename = "tree.bcast")]
    Bcast {
        id: String,
        origin: PublicKey,
        payload: Value,
    },
}

/// Orders and reports that travel along tree links to a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Routed {
    /// Up to the root: a newcomer asks for a position; `via` is the seal of the contact it
    /// asked, over [`join_seal_bytes`].
    JoinReq {
        peer: Peer,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<Voucher>,
    },
    /// Root down to the parent of `pos`: welcome `peer` as your child at `pos`.
    Attach {
        pos: Pos,
        peer: Peer,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<Voucher>,
    },
    /// Root (or, when the root failed, the coordinating root child) down to the node at
    /// `from_pos`: move to `to_pos`. It first visits the parent of `to_pos`, which records
    /// the ticket and names itself `new_parent`.
    Move {
        from_pos: Pos,
        to_pos: Pos,
        ticket: u64,
        new_parent: Option<Peer>,
        /// Who ordered the move (the root, or the coordinating root child) and their
        /// signature over [`move_seal_bytes`]: the mover checks it, because the order's last
        /// legs may travel up and down through nodes that are not entitled to give it.
        signer: PublicKey,
        seal: String,
        /// Set for a move to the root position: the tree size and the root's children.
        size: u64,
        root_children: Vec<Placed>,
        coordinator: Option<Peer>,
    },
    /// Up to the root: the position `pos` is vacant (its holder failed).
    Failed { pos: Pos },
    /// Up to the root: the attach for `pos` found it held; the size is at least `pos`.
    Taken { pos: Pos },
    /// Up to the root: our tree should merge into the tree reachable at `contact`.
    Merge {
        contact: Peer,
        their_size: u64,
        their_root: PublicKey,
    },
}

/// Proof, carried in a hello, that the sender was told to adopt this parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Voucher {
    /// Who gave the adopt order (the parent's parent, or a root child for the root).
    pub signer: PublicKey,
    /// `signer`'s seal over [`adopt_seal_bytes`].
    pub seal: String,
}

/// The bytes an adopt order's seal signs: the orphan at `child_pos` with key `child` is to
/// say hello to `parent`.
pub fn adopt_seal_bytes(child_pos: Pos, child: &PublicKey, parent: &PublicKey) -> Vec<u8> {
    format!(
        "borg-tree-adopt-v1|{child_pos}|{}|{}",
        child.to_b64(),
        parent.to_b64()
    )
    .into_bytes()
}

/// The bytes a contact's seal over a join request signs: it forwarded the join of `newcomer`.
pub fn join_seal_bytes(newcomer: &PublicKey) -> Vec<u8> {
    format!("borg-tree-join-v1|{}", newcomer.to_b64()).into_bytes()
}

/// Longest broadcast id accepted: ids are `<key short>-<16 hex digits>` (about 30 bytes);
/// 64 leaves room and keeps the de-duplication set's entries small.
pub const MAX_BCAST_ID_BYTES: usize = 64;

/// Longest list of placed peers a message may carry (children, siblings, root children):
/// a node has at most `max_children` children, and cells use k well below this; a longer
/// list is hostile and would only cost memory on every node that keeps it.
pub const MAX_PLACED_LIST: usize = 1024;

/// The bytes a move order's seal signs: everything the mover acts on.
pub fn move_seal_bytes(from_pos: Pos, to_pos: Pos, ticket: u64, size: u64) -> Vec<u8> {
    format!("borg-tree-move-v1|{from_pos}|{to_pos}|{ticket}|{size}").into_bytes()
}

/// Errors decoding a tree message from an envelope's kind and body.
#[derive(Debug, thiserror::Error)]
pub enum TreeMsgError {
    #[error("unknown tree message kind {0:?}")]
    UnknownKind(String),
    #[error("malformed {kind} body: {reason}")]
    Malformed { kind: String, reason: String },
}

impl TreeMsg {
    /// Split into the envelope's `kind` and `body`.
    pub fn to_kind_body(&self) -> (String, Value) {
        crate::envelope::split_kind_body(self)
    }

    /// Decode from an envelope's `kind` and `body`.
    pub fn from_kind_body(kind: &str, body: &Value) -> Result<Self, TreeMsgError> {
        if !KINDS.contains(&kind) {
            return Err(TreeMsgError::UnknownKind(kind.to_string()));
        }
        let msg: Self = crate::envelope::join_kind_body(kind, body).map_err(|reason| {
            TreeMsgError::Malformed {
                kind: kind.to_string(),
                reason,
            }
        })?;
        msg.check_bounds()
            .map_err(|reason| TreeMsgError::Malformed {
                kind: kind.to_string(),
                reason: reason.to_string(),
            })?;
        Ok(msg)
    }

    /// Size bounds checked at decode time, before anything keeps a copy.
    fn check_bounds(&self) -> Result<(), &'static str> {
        let long = |l: &[Placed]| l.len() > MAX_PLACED_LIST;
        match self {
            TreeMsg::Bcast { id, .. } if id.len() > MAX_BCAST_ID_BYTES => {
                Err("broadcast id too long")
            }
            TreeMsg::Hello { children, .. } | TreeMsg::Up { children, .. } if long(children) => {
                Err("too many children")
            }
            TreeMsg::Welcome { info, .. } | TreeMsg::Down { info } | TreeMsg::Announce { info }
                if long(&info.siblings) || long(&info.root_children) =>
            {
                Err("too many siblings")
            }
            TreeMsg::Route {
                order: Routed::Move { root_children, .. },
                ..
            } if long(root_children) => Err("too many root children"),
            _ => Ok(()),
        }
    }

    /// The envelope kind of this message.
    pub fn kind(&self) -> &'static str {
        match self {
            TreeMsg::Join { .. } => "tree.join",
            TreeMsg::Retry { .. } => "tree.retry",
            TreeMsg::Route { .. } => "tree.route",
            TreeMsg::Welcome { .. } => "tree.welcome",
            TreeMsg::Hello { .. } => "tree.hello",
            TreeMsg::Down { .. } => "tree.down",
            TreeMsg::Up { .. } => "tree.up",
            TreeMsg::Announce { .. } => "tree.announce",
            TreeMsg::Max { .. } => "tree.max",
            TreeMsg::Adopt { .. } => "tree.adopt",
            TreeMsg::Orphan { .. } => "tree.orphan",
            TreeMsg::Evict { .. } => "tree.evict",
            TreeMsg::InPlace { .. } => "tree.in_place",
            TreeMsg::Probe { .. } => "tree.probe",
            TreeMsg::ProbeAck { .. } => "tree.probe_ack",
            TreeMsg::Dissolve { .. } => "tree.dissolve",
            TreeMsg::Bcast { .. } => "tree.bcast",
        }
    }

    /// Whether this message belongs to the cost of joins and repairs (not heartbeats,
    /// probes or broadcast payload); the simulation counts these per join.
    pub fn is_topology(&self) -> bool {
        !matches!(
            self,
            TreeMsg::Down { .. }
                | TreeMsg::Up { .. }
                | TreeMsg::Probe { .. }
                | TreeMsg::ProbeAck { .. }
                | TreeMsg::Bcast { .. }
        )
    }
}

/// Every tree message kind, for decoding and for the receptor's unknown-kind check.
pub const KINDS: &[&str] = &[
    "tree.join",
    "tree.retry",
    "tree.route",
    "tree.welcome",
    "tree.hello",
    "tree.down",
    "tree.up",
    "tree.announce",
    "tree.max",
    "tree.adopt",
    "tree.orphan",
    "tree.evict",
    "tree.in_place",
    "tree.probe",
    "tree.probe_ack",
    "tree.dissolve",
    "tree.bcast",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    fn peer() -> Peer {
        Peer {
            key: SecretKey::generate().public(),
            addr: "127.0.0.2:13300".into(),
            mon: "127.0.0.2:13310".into(),
        }
    }

    #[test]
    fn kind_body_round_trip() {
        let msgs = vec![
            TreeMsg::Join { peer: peer() },
            TreeMsg::Route {
                dest: 7,
                order: Routed::Move {
                    from_pos: 40,
                    to_pos: 7,
                    ticket: 99,
                    new_parent: Some(peer()),
                    signer: peer().key,
                    seal: "x".into(),
                    size: 0,
                    root_children: vec![],
                    coordinator: None,
                },
            },
            TreeMsg::Up {
                pos: 3,
                max_pos: 9,
                children: vec![Placed {
                    pos: 9,
                    peer: peer(),
                }],
            },
        ];
        for m in msgs {
            let (kind, body) = m.to_kind_body();
            assert_eq!(kind, m.kind());
            assert_eq!(TreeMsg::from_kind_body(&kind, &body).unwrap(), m);
        }
    }

    proptest::proptest! {
        /// The decoder never panics on arbitrary JSON under any kind, and whatever it accepts
        /// re-encodes to the same message.
        #[test]
        fn decoder_is_total_and_round_trips(
            kind_ix in 0usize..KINDS.len() + 1,
            body in proptest::arbitrary::any::<Vec<(String, i64)>>(),
            pos in 0u64..1000,
        ) {
            let kind = KINDS.get(kind_ix).copied().unwrap_or("tree.other");
            let mut map = serde_json::Map::new();
            for (k, v) in body {
                map.insert(k, Value::from(v));
            }
            map.insert("pos".into(), Value::from(pos));
            let body = Value::Object(map);
            if let Ok(msg) = TreeMsg::from_kind_body(kind, &body) {
                let (k, b) = msg.to_kind_body();
                proptest::prop_assert_eq!(TreeMsg::from_kind_body(&k, &b).unwrap(), msg);
            }
        }
    }

    proptest::proptest! {
        /// Decode-time bounds: a broadcast id is taken up to MAX_BCAST_ID_BYTES and refused
        /// beyond, and so is a list of placed peers beyond MAX_PLACED_LIST.
        #[test]
        fn decode_bounds_hold(id_len in 0usize..200, list_len in 0usize..1100) {
            let origin = SecretKey::generate().public();
            let bcast = TreeMsg::Bcast { id: "i".repeat(id_len), origin, payload: Value::Null };
            let (k, b) = bcast.to_kind_body();
            proptest::prop_assert_eq!(
                TreeMsg::from_kind_body(&k, &b).is_ok(),
                id_len <= MAX_BCAST_ID_BYTES
            );
            let one = Placed { pos: 2, peer: peer() };
            let up = TreeMsg::Up { pos: 1, max_pos: 1, children: vec![one; list_len] };
            let (k, b) = up.to_kind_body();
            proptest::prop_assert_eq!(
                TreeMsg::from_kind_body(&k, &b).is_ok(),
                list_len <= MAX_PLACED_LIST
            );
        }
    }

    #[test]
    fn unknown_kind_and_fields_are_rejected() {
        assert!(matches!(
            TreeMsg::from_kind_body("tree.nope", &Value::Null),
            Err(TreeMsgError::UnknownKind(_))
        ));
        let body = serde_json::json!({"pos": 3, "extra": 1});
        assert!(TreeMsg::from_kind_body("tree.evict", &body).is_err());
    }
}
