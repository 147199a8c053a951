//! The node's cells together: links routed to their cell by ALPN, and a non-base cell
//! following the base tree (peerTreeNet) for its address and its peers.
//!
//! Every tree listener of a node accepts the ALPN of every cell ([`crate::tls::alpn_of`]) and
//! hands the link to that cell's actor through the [`CellRouter`]. So a node reached only
//! through a mapped port or a relay (both lead to the base cell's port) is reached by all its
//! cells there: one forwarded port per LAN serves every cell (docs/NAT.md).

use super::*;

/// The link contexts of a node's cells, by cell name.
#[derive(Default)]
pub struct CellRouter {
    cells: std::sync::RwLock<HashMap<&'static str, LinkCtx>>,
}

impl std::fmt::Debug for CellRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = match self.cells.read() {
            Ok(c) => c.keys().copied().collect(),
            Err(_) => Vec::new(),
        };
        f.debug_struct("CellRouter").field("cells", &names).finish()
    }
}

impl CellRouter {
    pub(crate) fn register(&self, cell: &'static str, ctx: LinkCtx) {
        match self.cells.write() {
            Ok(mut c) => c.insert(cell, ctx),
            Err(p) => p.into_inner().insert(cell, ctx),
        };
    }

    /// The context of the actor of `cell`, if this node runs it.
    pub(crate) fn get(&self, cell: &str) -> Option<LinkCtx> {
        match self.cells.read() {
            Ok(c) => c.get(cell).cloned(),
            Err(p) => p.into_inner().get(cell).cloned(),
        }
    }
}

/// What a non-base cell follows of the node's base cell.
#[derive(Clone, Debug)]
pub struct BaseFollow {
    /// The base cell's reachability (its advertised address decides ours).
    pub nat: Option<NatHandle>,
    /// The base cell's tree.
    pub view: watch::Receiver<BaseView>,
}

pub(super) async fn base_changed(rx: Option<&mut watch::Receiver<BaseView>>) -> Option<BaseView> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Sleep until `at`; never wake with `None`.
pub(super) async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One line of the base cell's `cells` list, from a cell's status.
pub(super) fn cell_summary(status: &serde_json::Map<String, Value>) -> Value {
    let get = |k: &str| status.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "name": get("cell"),
        "state": get("state"),
        "size": get("size"),
        "position": get("position"),
        "net": get("addr"),
        "recp": get("recp"),
        "mon": get("mon"),
    })
}

impl Actor {
    /// The base tree changed: tell the cell, and join through it if we are alone.
    pub(super) fn on_base_view(&mut self, view: &BaseView) {
        self.host
            .cell
            .handle_base(crate::cell::CellTime::of(&self.cfg.clock), view);
        self.base_join_tick(view);
    }

    /// A non-base cell alone in its tree joins through the base tree's parent and root
    /// (their base addresses; the listener there hands our link to their cell); the root of
    /// a tree of the cell whose root is not the base root meets the base root, so the trees
    /// merge. So the cell's tree spans the base tree's nodes.
    pub(super) fn base_join_tick(&mut self, view: &BaseView) {
        if self.join_after.is_some() {
            return;
        }
        let now = self.cfg.clock.mono_ms();
        if now.saturating_sub(self.last_base_join) < BASE_JOIN_EVERY_MS && self.last_base_join != 0
        {
            return;
        }
        let me = self.key.public();
        let neighbours: Vec<borg_proto::tree::Peer> = view
            .parent
            .iter()
            .chain(view.root.iter())
            .chain(view.children.iter())
            .filter(|p| p.key != me)
            .cloned()
            .collect();
        let mine = self.host.tree.view();
        if self.host.tree.state() == borg_proto::tree::TreeState::Root {
            // The root of a tree that is smaller than the base tree, or whose root is not the
            // base root, meets the base tree's nodes around it: where one of them is in
            // another tree of this cell, the two merge (the smaller into the larger, on a
            // member's witness, as trees that meet do). Roots of both trees do this, so
            // whichever is smaller dissolves.
            let root_differs = view
                .root
                .as_ref()
                .is_some_and(|r| mine.root.as_ref().map(|m| m.key) != Some(r.key));
            if mine.size < view.size || root_differs {
                self.last_base_join = now;
                for p in neighbours {
                    self.host.tree.meet(now, p);
                }
            }
            return;
        }
        if self.host.tree.state() != borg_proto::tree::TreeState::Alone {
            return;
        }
        // The base root's cell is the anchor: it never joins (others come to it), so two
        // lone nodes never try to join each other. Everyone else joins through the base root
        // first (it places newcomers breadth-first), then its base parent.
        if view.root.as_ref().is_some_and(|r| r.key == me) {
            return;
        }
        // Last, the node's own contacts: a base root's advertised address may be one we
        // cannot reach (a host node on loopback seen from a VM), its contact address we can.
        let contacts: Vec<String> = view
            .root
            .iter()
            .chain(view.parent.iter())
            .filter(|p| p.key != me)
            .map(|p| p.addr.clone())
            .chain(view.contacts.iter().cloned())
            .collect();
        if contacts.is_empty() {
            return;
        }
        self.last_base_join = now;
        tracing::debug!(cell = %self.cfg.cell, "alone: joining through the base tree {contacts:?}");
        self.host.tree.join_through(now, &contacts);
    }

    /// The address a non-base cell advertises, from the base cell's decision: its own port
    /// where the node is reached directly, the base cell's address (a mapped port or a
    /// relay) where it is not, since only that port is reachable from outside.
    pub(super) fn cell_addr(&self, st: &NatStatus) -> String {
        match st.decision.role {
            Role::Gateway | Role::Relayed => st.decision.advertise.to_string(),
            _ => match st.decision.advertise.to_string().parse::<PeerAddr>() {
                Ok(PeerAddr::Direct(sock)) => {
                    SocketAddr::new(sock.ip(), self.cfg.listen.port()).to_string()
                }
                _ => self.host.my_addr.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{broadcast_origin_ok, cell_broadcast_origin_ok, CELL_BCAST_KIND};
    use borg_proto::envelope;
    use borg_proto::identity::SecretKey;
    use serde_json::json;

    #[test]
    fn broadcasts_carry_their_origin_proof() {
        let k = SecretKey::generate();
        let other = SecretKey::generate();
        let req = envelope::seal(&k, "broadcast", None, 1, json!({"text": "hi"}));
        let env = String::from_utf8(req.to_bytes()).unwrap();
        assert!(broadcast_origin_ok(
            &json!({"text": "hi", "origin_env": env})
        ));
        assert!(!broadcast_origin_ok(
            &json!({"text": "ho", "origin_env": env})
        ));
        assert!(!broadcast_origin_ok(
            &json!({"text": "hi", "origin_env": env, "x": 1})
        ));
        assert!(!broadcast_origin_ok(&json!({"text": 5, "origin_env": env})));

        let cell = envelope::seal(&k, CELL_BCAST_KIND, None, 1, json!({"data": {"a": 1}}));
        let env = String::from_utf8(cell.to_bytes()).unwrap();
        let payload = json!({"data": {"a": 1}, "origin_env": env});
        assert!(cell_broadcast_origin_ok(&k.public(), &payload));
        assert!(
            !cell_broadcast_origin_ok(&other.public(), &payload),
            "signer is the origin"
        );
        assert!(!cell_broadcast_origin_ok(
            &k.public(),
            &json!({"data": {"a": 2}, "origin_env": env})
        ));
        assert!(
            !broadcast_origin_ok(&payload),
            "a cell broadcast is not a text broadcast"
        );
        let mut bad = env.into_bytes();
        let n = bad.len() - 5;
        bad[n] ^= 1;
        let bad = String::from_utf8_lossy(&bad).into_owned();
        assert!(!cell_broadcast_origin_ok(
            &k.public(),
            &json!({"data": {"a": 1}, "origin_env": bad})
        ));
    }
}
