//! The sans-IO core of one cell's runtime: its tree state machine, the cell, envelope
//! open/seal and the replay cache.
//!
//! Frames come in ([`Host::open`], then [`Host::dispatch`]), timers fire
//! ([`Host::handle_tick`], [`Host::handle_timeout`] when [`Host::poll_timeout`] is due),
//! receptor requests are answered ([`Host::handle_request`]); sealed frames go out through
//! [`Host::poll_transmit`]. It reads time only from the node's [`NetClock`] (which runs on
//! `tokio::time`, so it pauses with the test clock) and touches no socket: the actor around it
//! moves the bytes (links, dialing, NAT, relays); [`super::mem`] wires hosts together in
//! memory for tests.

use std::collections::VecDeque;
use std::sync::Arc;

use borg_proto::envelope::{self, Envelope, ReplayCache};
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::tree::{geometry, Action, Target, TreeMsg, TreeNode, TreeView};
use serde_json::{json, Value};

use super::{BCAST_ENVELOPE_OVERHEAD, CELL_BCAST_KIND, DELIVERED_LOG_TARGET};
use crate::cell::{is_binary_frame, Cell, CellAction, CellTime, Work, WorkDone};
use crate::clock::NetClock;
use crate::frame::MAX_FRAME;

/// Cell actions carried out per round at most: a cell cannot starve the actor.
const ACTIONS_PER_ROUND: usize = 1024;

/// What a receptor request to the runtime asks.
pub(crate) enum HostRequest {
    /// Originate a text broadcast vouched for by `origin`.
    Broadcast { text: String, origin: Envelope },
    /// A request of one of the cell's receptor kinds.
    Cell {
        from: PublicKey,
        kind: String,
        body: Value,
    },
}

/// An error answer: HTTP status, wire code, message.
pub(crate) type HostError = (u16, &'static str, String);

/// One cell's tree, the cell and the envelope layer, without I/O.
pub(crate) struct Host {
    pub(crate) tree: TreeNode,
    pub(crate) cell: Box<dyn Cell>,
    key: SecretKey,
    /// The address we advertise in every envelope.
    pub(crate) my_addr: String,
    cell_name: String,
    k: u64,
    clock: Arc<NetClock>,
    replay: ReplayCache,
    /// The tree view the cell last saw.
    last_view: Option<TreeView>,
    /// Id and network time (ms) of the last broadcast delivered.
    last_broadcast: Option<(String, u64)>,
    out: VecDeque<(Target, Vec<u8>)>,
    /// Answers to deferred receptor requests, for the actor to hand back.
    replies: VecDeque<(u64, Result<Value, HostError>)>,
    /// Cell broadcasts dropped as too large and binary frames refused since the last
    /// [`Host::take_dropped`].
    dropped: u64,
}

impl Host {
    pub(crate) fn new(
        key: SecretKey,
        my_addr: String,
        cell_name: String,
        k: u64,
        clock: Arc<NetClock>,
        tree: TreeNode,
        cell: Box<dyn Cell>,
    ) -> Self {
        Self {
            tree,
            cell,
            key,
            my_addr,
            cell_name,
            k,
            clock,
            replay: ReplayCache::default(),
            last_view: None,
            last_broadcast: None,
            out: VecDeque::new(),
            replies: VecDeque::new(),
            dropped: 0,
        }
    }

    /// A new advertised address (the NAT role changed).
    pub(crate) fn set_my_addr(&mut self, addr: String) {
        self.my_addr = addr.clone();
        self.tree.set_my_addr(addr);
    }

    /// Open a frame read from `link_key`'s link: size, syntax, signature, the ±30 s window
    /// (unless the cell calls the kind nonce-fresh), replay, and the signer must be the link's
    /// TLS peer. Err is the wire code to count.
    pub(crate) fn open(
        &mut self,
        link_key: &PublicKey,
        bytes: &[u8],
    ) -> Result<Envelope, &'static str> {
        let cell = &self.cell;
        let env = envelope::open_with(bytes, self.clock.now_ms(), &mut self.replay, |k| {
            cell.nonce_fresh(k)
        })
        .map_err(|e| {
            tracing::debug!("rejected frame from {}: {e}", link_key.short());
            e.code()
        })?
        .into_inner();
        if env.from != *link_key {
            // Tree messages are re-signed by every hop: the signer must be the TLS peer.
            tracing::debug!(
                "frame signed by {} on {}'s link",
                env.from.short(),
                link_key.short()
            );
            return Err("forbidden");
        }
        Ok(env)
    }

    /// Hand an opened envelope to the cell (its kind prefix) or the tree; `rx_local_us` is
    /// when its frame was read. Err is the wire code to count.
    pub(crate) fn dispatch(
        &mut self,
        env: &Envelope,
        rx_local_us: u64,
    ) -> Result<(), &'static str> {
        if env.kind.starts_with(self.cell.kind_prefix()) {
            let t = CellTime::of(&self.clock);
            return self
                .cell
                .handle_message(t, env.from, rx_local_us, &env.kind, &env.body)
                .map_err(|e| {
                    tracing::debug!(cell = %self.cell_name, "{} from {}: {e}", env.kind, env.from.short());
                    e.code
                });
        }
        let msg = match TreeMsg::from_kind_body(&env.kind, &env.body) {
            Ok(m) => m,
            Err(borg_proto::tree::msg::TreeMsgError::UnknownKind(_)) => return Err("unknown_kind"),
            Err(e) => {
                tracing::debug!("malformed tree message: {e}");
                return Err("malformed");
            }
        };
        let before = self.tree.stats.rejected_unauthorized + self.tree.stats.rejected_invalid;
        self.tree.handle(self.clock.mono_ms(), env.from, msg);
        if self.tree.stats.rejected_unauthorized + self.tree.stats.rejected_invalid > before {
            return Err("forbidden");
        }
        Ok(())
    }

    /// Hand a binary frame from `link_key`'s link to the cell. Err is the wire code to count.
    pub(crate) fn dispatch_binary(
        &mut self,
        link_key: &PublicKey,
        bytes: &[u8],
    ) -> Result<(), &'static str> {
        let t = CellTime::of(&self.clock);
        self.cell.handle_binary(t, *link_key, bytes).map_err(|e| {
            tracing::debug!(cell = %self.cell_name, "binary frame from {}: {e}", link_key.short());
            e.code
        })
    }

    /// A receptor request for the runtime (broadcast) or the cell (its receptor kinds).
    /// `Ok(None)`: the cell answers later, through [`Host::poll_reply`] with `ticket`.
    pub(crate) fn handle_request(
        &mut self,
        req: HostRequest,
        ticket: u64,
    ) -> Result<Option<Value>, HostError> {
        match req {
            HostRequest::Broadcast { text, origin } => {
                let payload = json!({
                    "text": text,
                    "origin_env": String::from_utf8_lossy(&origin.to_bytes()),
                });
                // Escaping the origin envelope into the payload can double its size (or
                // more): refuse here what could not travel as one frame.
                let size = payload.to_string().len() + BCAST_ENVELOPE_OVERHEAD;
                if size > envelope::MAX_ENVELOPE_BYTES.min(MAX_FRAME) {
                    return Err((
                        413,
                        "too_large",
                        format!(
                            "this broadcast would be a {size}-byte message; the limit is {}",
                            envelope::MAX_ENVELOPE_BYTES
                        ),
                    ));
                }
                let id = self.tree.broadcast(payload);
                Ok(Some(json!({ "id": id })))
            }
            HostRequest::Cell { from, kind, body } => {
                let t = CellTime::of(&self.clock);
                self.cell
                    .handle_request_later(t, &from, &kind, &body, ticket)
                    .map_err(|e| (e.status, e.code, e.message))
            }
        }
    }

    /// The cell's next blocking job, if it has one.
    pub(crate) fn poll_work(&mut self) -> Option<Work> {
        self.cell.poll_work()
    }

    /// A blocking job of the cell finished.
    pub(crate) fn handle_work_done(&mut self, done: WorkDone) {
        self.cell.handle_work_done(CellTime::of(&self.clock), done);
    }

    /// The tree's periodic tick (heartbeats, failure detection).
    pub(crate) fn handle_tick(&mut self) {
        self.tree.tick(self.clock.mono_ms());
    }

    /// The cell's timer (call when [`Host::poll_timeout`] is due).
    pub(crate) fn handle_timeout(&mut self) {
        self.cell.handle_timeout(CellTime::of(&self.clock));
    }

    /// When the cell wants [`Host::handle_timeout`] (mono ms).
    pub(crate) fn poll_timeout(&self) -> Option<u64> {
        self.cell.poll_timeout()
    }

    /// The next answer to a deferred receptor request.
    pub(crate) fn poll_reply(&mut self) -> Option<(u64, Result<Value, HostError>)> {
        self.replies.pop_front()
    }

    /// The next sealed frame to send.
    pub(crate) fn poll_transmit(&mut self) -> Option<(Target, Vec<u8>)> {
        self.out.pop_front()
    }

    /// Cell broadcasts and binary frames dropped as unsendable since the last call.
    pub(crate) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Carry out what the tree and the cell asked for: frames to [`Host::poll_transmit`],
    /// deliveries to the cell, tree changes to the cell.
    pub(crate) fn carry_out(&mut self) {
        self.drain_tree();
        let view = self.tree.view();
        if self.last_view.as_ref() != Some(&view) {
            self.cell.handle_tree(CellTime::of(&self.clock), &view);
            self.last_view = Some(view);
        }
        for _ in 0..ACTIONS_PER_ROUND {
            let Some(action) = self.cell.poll_action(CellTime::of(&self.clock)) else {
                break;
            };
            match action {
                CellAction::Send { to, kind, body } => {
                    let frame = self.seal_kind_body(&kind, body);
                    self.out.push_back((to, frame));
                }
                CellAction::Broadcast { payload } => {
                    // Vouched for by our signature, so every hop can check the origin.
                    let origin = envelope::seal(
                        &self.key,
                        CELL_BCAST_KIND,
                        None,
                        self.clock.now_ms(),
                        json!({ "data": payload }),
                    );
                    let wrapped = json!({
                        "data": payload,
                        "origin_env": String::from_utf8_lossy(&origin.to_bytes()),
                    });
                    if wrapped.to_string().len() * 2 + BCAST_ENVELOPE_OVERHEAD > MAX_FRAME {
                        self.dropped += 1;
                        continue;
                    }
                    self.tree.broadcast(wrapped);
                }
                CellAction::SendBinary { to, bytes } => {
                    // A binary frame that could be read as JSON, or one the framing refuses,
                    // is the cell's bug: never sent.
                    if !is_binary_frame(&bytes) || bytes.len() > MAX_FRAME {
                        self.dropped += 1;
                        continue;
                    }
                    self.out.push_back((Target::Key(to), bytes));
                }
                CellAction::Reply { ticket, result } => {
                    self.replies
                        .push_back((ticket, result.map_err(|e| (e.status, e.code, e.message))));
                }
            }
        }
        // Broadcasts the cell itself started are sent now, not a tick later.
        self.drain_tree();
    }

    /// Send, deliver and log what the tree state machine produced so far.
    fn drain_tree(&mut self) {
        for action in self.tree.drain() {
            match action {
                Action::Send { to, msg } => {
                    let (kind, body) = msg.to_kind_body();
                    let frame = self.seal_kind_body(&kind, body);
                    self.out.push_back((to, frame));
                }
                Action::Deliver {
                    id,
                    origin,
                    payload,
                } => self.deliver(id, origin, payload),
                Action::Event(e @ borg_proto::tree::TreeEvent::Rejected { .. }) => {
                    tracing::debug!(cell = %self.cell_name, "tree: {e:?}")
                }
                Action::Event(e) => tracing::info!(cell = %self.cell_name, "tree: {e:?}"),
            }
        }
    }

    fn deliver(&mut self, id: String, origin: PublicKey, payload: Value) {
        self.last_broadcast = Some((id.clone(), self.clock.now_ms()));
        // A cell's own broadcasts reach it as the data it sent; text broadcasts as they are.
        let data = payload.get("data").unwrap_or(&payload);
        self.cell
            .handle_broadcast(CellTime::of(&self.clock), &id, &origin, data);
        // (The tree checked the origin envelope before delivering or forwarding it.)
        let text = payload.get("text").and_then(|t| t.as_str()).unwrap_or("");
        // Peer-supplied text: debug only, truncated, under its own target so that tests and the
        // demo can turn on exactly this line (BORG_LOG=info,borg::delivered=debug).
        tracing::debug!(target: DELIVERED_LOG_TARGET, cell = %self.cell_name, "broadcast {id:.64} from {}: {text:.80}", origin.short());
    }

    /// Seal `kind`/`body` with our key, our advertised address and network time.
    pub(crate) fn seal_kind_body(&self, kind: &str, body: Value) -> Vec<u8> {
        envelope::seal(
            &self.key,
            kind,
            Some(&self.my_addr),
            self.clock.now_ms(),
            body,
        )
        .to_bytes()
    }

    /// The tree's and the cell's part of `/status` (the actor adds links, ports, NAT), from
    /// `view`, the tree's view now (the caller has it at hand).
    pub(crate) fn status(&self, view: &TreeView) -> Value {
        let k = self.k;
        let placed = |p: &borg_proto::tree::Placed| json!({"pos": p.pos, "key": p.peer.key.to_b64(), "addr": p.peer.addr, "mon": p.peer.mon});
        let mut status = json!({
            "cell": self.cell_name,
            "state": view.state.as_str(),
            "public_key": self.key.public().to_b64(),
            "addr": self.my_addr,
            "position": view.position,
            "parent": view.parent.as_ref().map(placed),
            "children": view.children.iter().map(placed).collect::<Vec<_>>(),
            "root": view.root.as_ref().map(|r| json!({"key": r.key.to_b64(), "addr": r.addr, "mon": r.mon})),
            "size": view.size,
            "depth": view.position.map(|p| geometry::depth_of(p, k)),
            "tree_depth": geometry::tree_depth(view.size, k),
            "max_children": k,
            "delivered_broadcasts": self.tree.stats.delivered_broadcasts,
            "last_broadcast": self.last_broadcast.as_ref().map(|(id, at)| json!({"id": id, "at_ms": at})),
            "vacant": view.vacant,
        });
        let t = CellTime::of(&self.clock);
        if let (Some(obj), Value::Object(extra)) = (status.as_object_mut(), self.cell.status(t)) {
            obj.extend(extra);
            obj.insert("time".into(), self.clock.status_json());
        }
        status
    }

    /// The cell's lines for `/metrics`.
    pub(crate) fn cell_metrics(&self) -> String {
        self.cell.metrics(CellTime::of(&self.clock))
    }
}
