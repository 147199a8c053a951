//! The cell seam: what a cell type implements, sans-IO, and what the runtime gives it.
//!
//! The runtime ([`crate::node`]) owns the cell's tree, its links, envelope open/seal, the
//! replay cache, the receptor and monitor servers and every bound. A cell type only implements
//! [`Cell`]: events come in through `handle_*` (with the node's clocks as a [`CellTime`]),
//! actions go out through [`Cell::poll_action`], and [`Cell::poll_timeout`] says when to call
//! [`Cell::handle_timeout`] (quinn-proto's `Connection` shape). It never reads a clock or
//! touches a socket, so a cell is tested with a virtual clock.
//!
//! Routing: envelopes whose kind starts with [`Cell::kind_prefix`] (signer already checked to
//! be the link's TLS peer) go to [`Cell::handle_message`]; receptor requests whose kind is in
//! [`Cell::receptor_kinds`] go to [`Cell::handle_request`]. Tree messages, `ping`,
//! `broadcast` and `status` stay with the runtime.
//!
//! Bulk bytes (shards) do not go through envelopes: a frame whose first byte is below
//! [`BINARY_FRAME_MAX_FIRST_BYTE`] (never the start of JSON text) is a binary frame for the
//! link's cell ([`Cell::handle_binary`]), authenticated by the link's TLS peer key only. The cell
//! opens such transfers with signed envelopes and checks the bytes itself (a shard's integrity
//! is its SHA-256 address). A cell sends them with [`CellAction::SendBinary`], over an open link
//! only, within the link's outbound byte bound.

use std::sync::Arc;

use borg_proto::identity::PublicKey;
use borg_proto::tree::{Peer, Target, TreeState, TreeView};
use serde_json::Value;

use crate::clock::NetClock;

/// The node's clocks at the moment of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellTime {
    /// Monotonic milliseconds (timers).
    pub mono_ms: u64,
    /// The free-running local clock, µs since the epoch (never steps).
    pub local_us: u64,
    /// Network time, ms since the epoch (envelope `ts`).
    pub net_ms: u64,
}

impl CellTime {
    /// The clocks of `clock` now.
    pub fn of(clock: &NetClock) -> Self {
        let local_us = clock.local_us();
        Self {
            mono_ms: local_us / 1000,
            local_us,
            net_ms: clock.now_ms(),
        }
    }
}

/// What a cell asks the runtime to do.
#[derive(Debug, Clone, PartialEq)]
pub enum CellAction {
    /// Seal `kind`/`body` with the node key and network time and send it on this cell's tree
    /// port: to a key over an open link, to a peer (dialed if needed) or to an address.
    Send {
        to: Target,
        kind: String,
        body: Value,
    },
    /// Broadcast `payload` down this cell's tree (delivered to the cell on every node).
    Broadcast { payload: Value },
    /// Send `bytes` as one binary frame (see [`is_binary_frame`]) over the open link to `to`.
    /// Never dialed and never kept for later: with no link, or with the link's outbound bytes
    /// at their bound, it is dropped and counted (`borg_dropped_outbound_total`); the cell's
    /// own protocol asks again.
    SendBinary { to: PublicKey, bytes: Vec<u8> },
    /// The answer to a receptor request the cell deferred ([`Cell::handle_request_later`]
    /// returned `Ok(None)`). A ticket the runtime no longer waits for (answered, or past
    /// [`REPLY_DEADLINE_MS`]) is ignored.
    Reply {
        ticket: u64,
        result: Result<Value, CellError>,
    },
}

/// A deferred receptor request is answered within this long (ms), or the client gets
/// `timeout` (504); under the receptor's 30 s limit on a whole connection.
pub const REPLY_DEADLINE_MS: u64 = 25_000;
/// Deferred receptor requests one cell may hold at once; beyond it the receptor answers
/// `unavailable` without asking the cell.
pub const MAX_DEFERRED_REPLIES: usize = 256;

/// Blocking work a cell hands to the runtime, e.g. a store's durable write (an fsync takes
/// milliseconds, and the actor must never wait on a disk). The runtime runs it on a blocking
/// thread, at most [`MAX_WORK_IN_FLIGHT`] of one cell at a time, and hands what it returns to
/// [`Cell::handle_work_done`]. The cell itself stays sans-IO: the closure is the only part that
/// touches the disk, and in-memory tests run it inline.
pub type Work = Box<dyn FnOnce() -> WorkDone + Send>;
/// What a [`Work`] returns; the cell downcasts it to its own type.
pub type WorkDone = Box<dyn std::any::Any + Send>;
/// Given to [`Cell::handle_work_done`] in place of the result when the work panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkPanicked;
/// Blocking jobs of one cell running at once, at most.
pub const MAX_WORK_IN_FLIGHT: usize = 4;

/// Binary frames start with a byte below this one: 0x00-0x08 can never begin JSON text
/// (which starts with `{`, or whitespace before it), so the two kinds of frame cannot be
/// confused.
pub const BINARY_FRAME_MAX_FIRST_BYTE: u8 = 0x09;

/// Whether a link frame is a cell's binary frame rather than an envelope.
pub fn is_binary_frame(frame: &[u8]) -> bool {
    frame
        .first()
        .is_some_and(|b| *b < BINARY_FRAME_MAX_FIRST_BYTE)
}

/// The base tree (peerTreeNet) as a non-base cell sees it: where to find peers of its type.
/// Addresses are base-tree addresses; a cell dials them with its own ALPN and the base
/// listener there hands the link over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BaseView {
    pub state: Option<TreeState>,
    /// The base tree's size as this node knows it.
    pub size: u64,
    pub contacts: Vec<String>,
    pub root: Option<Peer>,
    pub parent: Option<Peer>,
    pub children: Vec<Peer>,
}

impl BaseView {
    /// Known peers with keys (root, parent, children), without duplicates.
    pub fn peers(&self) -> Vec<Peer> {
        let mut out: Vec<Peer> = Vec::new();
        for p in self
            .root
            .iter()
            .chain(self.parent.iter())
            .chain(self.children.iter())
        {
            if !out.iter().any(|o| o.key == p.key) {
                out.push(p.clone());
            }
        }
        out
    }
}

/// A refused receptor request or peer message: HTTP status, wire code and text (the codes of
/// DESIGN.md section 5).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CellError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl CellError {
    pub fn malformed(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: "malformed",
            message: message.into(),
        }
    }
    pub fn unknown_kind(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: "unknown_kind",
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            code: "unavailable",
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            code: "not_found",
            message: message.into(),
        }
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: 403,
            code: "forbidden",
            message: message.into(),
        }
    }
}

/// One cell type's behaviour. Every method is called from the cell's actor task, in order;
/// none may block.
pub trait Cell: Send + 'static {
    /// Kind prefix of this cell's peer messages, e.g. `"time."`.
    fn kind_prefix(&self) -> &'static str;
    /// Receptor kinds this cell answers (beyond the runtime's ping, broadcast, status).
    fn receptor_kinds(&self) -> &'static [&'static str] {
        &[]
    }
    /// Kinds whose freshness comes from a nonce echoed in the answer rather than the ±30 s
    /// `ts` window (they must work while a clock is wrong); the cell matches answers to its
    /// own outstanding nonces.
    fn nonce_fresh(&self, _kind: &str) -> bool {
        false
    }
    /// This cell's tree changed (position, parent, root, children, size).
    fn handle_tree(&mut self, _now: CellTime, _view: &TreeView) {}
    /// The base tree changed (non-base cells only).
    fn handle_base(&mut self, _now: CellTime, _base: &BaseView) {}
    /// A broadcast of this cell's tree was delivered here.
    fn handle_broadcast(
        &mut self,
        _now: CellTime,
        _id: &str,
        _origin: &PublicKey,
        _payload: &Value,
    ) {
    }
    /// A verified envelope of this cell's kind prefix from `from`, read off the link at local
    /// time `rx_local_us`.
    fn handle_message(
        &mut self,
        now: CellTime,
        from: PublicKey,
        rx_local_us: u64,
        kind: &str,
        body: &Value,
    ) -> Result<(), CellError>;
    /// A binary frame (see [`is_binary_frame`]) from the link whose TLS peer is `from`. No
    /// signature: only the link's authentication, so the cell accepts only what it asked for.
    /// The default refuses every binary frame.
    fn handle_binary(
        &mut self,
        _now: CellTime,
        _from: PublicKey,
        _bytes: &[u8],
    ) -> Result<(), CellError> {
        Err(CellError::unknown_kind("this cell takes no binary frames"))
    }
    /// A verified receptor request of one of [`Cell::receptor_kinds`].
    fn handle_request(
        &mut self,
        _now: CellTime,
        _from: &PublicKey,
        kind: &str,
        _body: &Value,
    ) -> Result<Value, CellError> {
        Err(CellError::unknown_kind(format!(
            "this cell does not answer {kind:?}"
        )))
    }
    /// A receptor request that the cell may answer later (it needs the network or the disk):
    /// `Ok(None)` means the cell will push [`CellAction::Reply`] with `ticket` (within
    /// [`REPLY_DEADLINE_MS`]). The default answers at once through [`Cell::handle_request`].
    fn handle_request_later(
        &mut self,
        now: CellTime,
        from: &PublicKey,
        kind: &str,
        body: &Value,
        _ticket: u64,
    ) -> Result<Option<Value>, CellError> {
        self.handle_request(now, from, kind, body).map(Some)
    }
    /// The next blocking job to run off the actor (see [`Work`]); asked only while fewer than
    /// [`MAX_WORK_IN_FLIGHT`] of this cell's jobs run.
    fn poll_work(&mut self) -> Option<Work> {
        None
    }
    /// A job from [`Cell::poll_work`] finished: what it returned, or [`WorkPanicked`].
    fn handle_work_done(&mut self, _now: CellTime, _done: WorkDone) {}
    /// Timers: called at or after [`Cell::poll_timeout`].
    fn handle_timeout(&mut self, _now: CellTime) {}
    /// The next monotonic ms at which to call [`Cell::handle_timeout`].
    fn poll_timeout(&self) -> Option<u64> {
        None
    }
    /// The next action, until `None`.
    fn poll_action(&mut self, _now: CellTime) -> Option<CellAction> {
        None
    }
    /// Fields merged into the cell's `/status` (an object).
    fn status(&self, _now: CellTime) -> Value {
        Value::Object(Default::default())
    }
    /// Lines of Prometheus text added to the cell's `/metrics`.
    fn metrics(&self, _now: CellTime) -> String {
        String::new()
    }
}

/// What a cell type's constructor gets.
#[derive(Debug, Clone)]
pub struct CellInit {
    pub name: &'static str,
    pub key: PublicKey,
    pub clock: Arc<NetClock>,
    /// The node's contacts (`--join`, base-tree addresses).
    pub contacts: Vec<String>,
    /// The node's data directory, where a cell keeps what must survive a restart (the
    /// appliance's data partition). `None` in in-memory tests: keep state in memory.
    pub data_dir: Option<std::path::PathBuf>,
}

/// A cell type with no behaviour of its own: the base tree (peerTreeNet) is all runtime.
#[derive(Debug, Default)]
pub struct NoCell;

impl Cell for NoCell {
    fn kind_prefix(&self) -> &'static str {
        // No peer kind starts with a NUL.
        "\0"
    }
    fn handle_message(
        &mut self,
        _now: CellTime,
        _from: PublicKey,
        _rx: u64,
        kind: &str,
        _body: &Value,
    ) -> Result<(), CellError> {
        Err(CellError::malformed(format!("unexpected kind {kind:?}")))
    }
}
