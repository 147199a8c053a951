//! cronoTree: network time, as a cell (DNA 13396/13397/13398, k=3).
//!
//! The sync math is `borg_proto::crono::TimeSync`; this cell wires it to the runtime:
//! - **bootstrap**: while unsynced, `time.req` to the node's contacts and the base tree's
//!   neighbours (up to [`BOOT_FANOUT`]); the median of their answers is the first time, so one
//!   liar among several moves it by no more than the honest spread;
//! - **follow the parent**: NTP-style exchanges with this cell's tree parent over the signed
//!   link, then slews (never backwards once synced);
//! - **answer** every `time.req` (bounded: [`ANSWERS_PER_S`]);
//! - **publish**: every change of the mapping goes to the node's [`NetClock`], which every
//!   cell of the node uses for envelope `ts` and the ±30 s window.
//!
//! `time.req`/`time.ans` are nonce-fresh: they skip the `ts` window (a clock at 1970 must still
//! get an answer) and the replay cache; an answer counts only for an outstanding nonce of ours,
//! sent to that key (or, for bootstrap, once per key), within the request timeout.

use std::collections::VecDeque;
use std::sync::Arc;

use borg_net::cell::{BaseView, Cell, CellAction, CellError, CellInit, CellTime};
use borg_net::clock::NetClock;
use borg_proto::crono::msg::{Nonce, TimeMsg};
use borg_proto::crono::{Mapping, SyncConfig, TimeSync};
use borg_proto::identity::PublicKey;
use borg_proto::tree::{Target, TreeState, TreeView};
use rand::{rngs::StdRng, RngCore, SeedableRng};
use serde_json::{json, Value};

#[cfg(test)]
mod tests;

/// Peers asked at once during a bootstrap.
pub const BOOT_FANOUT: usize = 5;
/// How long the bootstrap proper waits for the slowest warm-up after the first came back.
pub const WARM_WAIT_MS: u64 = 400;
/// Bootstrap rounds before a node with contacts falls back to its own clock.
pub const BOOT_ROUNDS: u32 = 4;
/// While unsynced, a new bootstrap round this often (ms).
pub const BOOT_RETRY_MS: u64 = 1_500;
/// Answers given per second, all askers together (each costs a signature); the rest wait
/// for the asker's retry. A tree neighbour asks about once a second.
pub const ANSWERS_PER_S: u32 = 200;

/// The cronoTree cell.
pub struct CronoCell {
    sync: TimeSync,
    clock: Arc<NetClock>,
    me: PublicKey,
    contacts: Vec<String>,
    base: BaseView,
    out: VecDeque<CellAction>,
    rng: StdRng,
    published: Option<Mapping>,
    was_synced: bool,
    /// Next bootstrap round while unsynced (mono ms).
    next_boot: u64,
    /// Warm-up requests of the current bootstrap round: nonce and when it was sent (mono
    /// ms). The first exchange with a peer carries the dial and TLS handshake on its forward
    /// leg, so its timing is lopsided; it only opens the link. The bootstrap proper is sent
    /// over the warm links once every warm-up came back or [`WARM_WAIT_MS`] passed.
    warm: Vec<(Nonce, u64)>,
    /// Peers whose link is warm, for the bootstrap proper.
    warm_keys: Vec<PublicKey>,
    /// When the bootstrap proper goes out (mono ms), once the first warm-up came back.
    boot_at: Option<u64>,
    /// A node with contacts asks them before it trusts its own clock as a root: set until a
    /// bootstrap succeeded or [`BOOT_ROUNDS`] rounds found nobody synced.
    boot_pending: bool,
    boot_rounds: u32,
    /// The last state of this cell's tree (re-applied when the bootstrap ends).
    tree_state: Option<TreeState>,
    /// Next periodic call of `handle_timeout` (mono ms).
    next_tick: u64,
    /// Answer budget: tokens and when it was last refilled (mono ms).
    tokens: u32,
    refilled: u64,
    answered: u64,
    refused: u64,
}

impl std::fmt::Debug for CronoCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CronoCell")
            .field("me", &self.me.short())
            .finish_non_exhaustive()
    }
}

impl CronoCell {
    pub fn new(init: CellInit) -> Self {
        Self::with_config(init, SyncConfig::default())
    }

    pub fn with_config(init: CellInit, cfg: SyncConfig) -> Self {
        init.clock.expect_source();
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        Self {
            sync: TimeSync::new(cfg, init.clock.floor_us()),
            clock: init.clock,
            me: init.key,
            contacts: init.contacts.clone(),
            base: BaseView::default(),
            out: VecDeque::new(),
            rng: StdRng::from_seed(seed),
            published: None,
            was_synced: false,
            next_boot: 0,
            next_tick: 0,
            warm: Vec::new(),
            warm_keys: Vec::new(),
            boot_at: None,
            boot_pending: !init.contacts.is_empty(),
            boot_rounds: 0,
            tree_state: None,
            tokens: ANSWERS_PER_S,
            refilled: 0,
            answered: 0,
            refused: 0,
        }
    }

    /// The registry's constructor.
    pub fn boxed(init: CellInit) -> Box<dyn Cell> {
        Box::new(Self::new(init))
    }

    fn nonce(&mut self) -> [u8; 16] {
        let mut n = [0u8; 16];
        self.rng.fill_bytes(&mut n);
        n
    }

    fn send(&mut self, to: Target, msg: &TimeMsg) {
        let (kind, body) = msg.to_kind_body();
        self.out.push_back(CellAction::Send { to, kind, body });
    }

    /// Whom a bootstrap asks: base-tree neighbours (by key) first, then contact addresses.
    fn boot_targets(&self) -> Vec<Target> {
        let mut out: Vec<Target> = self
            .base
            .peers()
            .into_iter()
            .filter(|p| p.key != self.me)
            .map(Target::Peer)
            .collect();
        for c in self.contacts.iter().chain(self.base.contacts.iter()) {
            let known = out
                .iter()
                .any(|t| matches!(t, Target::Peer(p) if p.addr == *c))
                || out.iter().any(|t| matches!(t, Target::Addr(a) if a == c));
            if !known {
                out.push(Target::Addr(c.clone()));
            }
        }
        out.truncate(BOOT_FANOUT);
        out
    }

    fn maybe_bootstrap(&mut self, now: CellTime) {
        if self.sync.status(now.local_us).synced {
            self.boot_pending = false;
            return;
        }
        if now.mono_ms < self.next_boot {
            return;
        }
        if self.boot_pending && self.boot_rounds >= BOOT_ROUNDS {
            // Nobody synced answered: run on our own clock (a root of one is fully
            // functional) until a parent gives us better.
            tracing::info!(
                "no synced peer answered {BOOT_ROUNDS} time requests: using the local clock"
            );
            self.boot_pending = false;
            if matches!(self.tree_state, Some(TreeState::Alone | TreeState::Root)) {
                self.sync.set_root(now.local_us);
            }
        }
        let targets = self.boot_targets();
        if targets.is_empty() {
            return;
        }
        self.boot_rounds = self.boot_rounds.saturating_add(1);
        self.next_boot = now.mono_ms + BOOT_RETRY_MS;
        self.warm.clear();
        self.warm_keys.clear();
        self.boot_at = None;
        for t in targets {
            let nonce = Nonce::from_bytes(self.nonce());
            self.warm.push((nonce, now.mono_ms));
            self.send(t, &TimeMsg::Req { nonce });
        }
    }

    /// A warm-up answer came back from `from`: its link is up.
    fn warmed(&mut self, now: CellTime, from: PublicKey) {
        if !self.warm_keys.contains(&from) {
            self.warm_keys.push(from);
        }
        self.boot_at.get_or_insert(now.mono_ms + WARM_WAIT_MS);
        if self.warm.is_empty() {
            self.boot_at = Some(now.mono_ms);
        }
        self.send_boot(now);
    }

    /// The bootstrap proper, over the warm links, all at once (so their answers are
    /// collected together).
    fn send_boot(&mut self, now: CellTime) {
        if self.boot_at.is_none_or(|t| now.mono_ms < t) {
            return;
        }
        self.boot_at = None;
        self.warm.clear();
        for key in std::mem::take(&mut self.warm_keys) {
            let nonce = self.nonce();
            let msg = self.sync.bootstrap_request(now.local_us, nonce);
            self.send(Target::Key(key), &msg);
        }
    }

    fn poll_sync(&mut self, now: CellTime) {
        loop {
            let nonce = self.nonce();
            match self.sync.poll_transmit(now.local_us, nonce) {
                Some((parent, msg)) => self.send(Target::Key(parent), &msg),
                None => break,
            }
        }
    }

    /// Hand the node clock the current mapping and status.
    fn publish(&mut self, now: CellTime) {
        let st = self.sync.status(now.local_us);
        if st.synced {
            let m = self.sync.mapping();
            if self.published != Some(m) {
                self.published = Some(m);
                self.clock
                    .set_mapping(Box::new(move |local| m.net_at(local)));
            }
            if !self.was_synced {
                self.was_synced = true;
                tracing::info!(
                    "network time synced: offset {:.3} ms from the local clock, source {:?}, stratum {}",
                    st.offset_us as f64 / 1000.0,
                    st.source,
                    st.stratum
                );
            }
        }
        self.clock.publish_status(st);
    }

    fn take_token(&mut self, mono_ms: u64) -> bool {
        let elapsed = mono_ms.saturating_sub(self.refilled);
        if elapsed >= 1000 / u64::from(ANSWERS_PER_S).max(1) {
            let add = elapsed.saturating_mul(u64::from(ANSWERS_PER_S)) / 1000;
            self.tokens = u32::try_from(u64::from(self.tokens).saturating_add(add))
                .unwrap_or(u32::MAX)
                .min(ANSWERS_PER_S);
            self.refilled = mono_ms;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

impl Cell for CronoCell {
    fn kind_prefix(&self) -> &'static str {
        "time."
    }

    fn nonce_fresh(&self, kind: &str) -> bool {
        borg_proto::crono::msg::is_time_kind(kind)
    }

    fn handle_tree(&mut self, now: CellTime, view: &TreeView) {
        self.tree_state = Some(view.state);
        match view.state {
            // Alone before the bootstrap is over: our clock may be 1970, do not serve it.
            TreeState::Alone if self.boot_pending => {}
            TreeState::Alone | TreeState::Root => self.sync.set_root(now.local_us),
            TreeState::Joined => {
                let parent = view.parent.as_ref().map(|p| p.peer.key);
                self.sync.set_parent(now.local_us, parent);
            }
            TreeState::Joining => {}
        }
        self.poll_sync(now);
        self.publish(now);
    }

    fn handle_base(&mut self, now: CellTime, base: &BaseView) {
        self.base = base.clone();
        self.maybe_bootstrap(now);
    }

    fn handle_message(
        &mut self,
        now: CellTime,
        from: PublicKey,
        rx_local_us: u64,
        kind: &str,
        body: &Value,
    ) -> Result<(), CellError> {
        let msg =
            TimeMsg::from_kind_body(kind, body).map_err(|e| CellError::malformed(e.to_string()))?;
        match msg {
            TimeMsg::Req { nonce } => {
                if !self.take_token(now.mono_ms) {
                    self.refused += 1;
                    return Err(CellError {
                        status: 429,
                        code: "rate_limited",
                        message: "time answers are rate-limited".into(),
                    });
                }
                let ans = self.sync.answer(rx_local_us, now.local_us, nonce);
                self.answered += 1;
                self.send(Target::Key(from), &TimeMsg::Ans(ans));
                Ok(())
            }
            TimeMsg::Ans(ans) => {
                if let Some(i) = self.warm.iter().position(|(n, _)| *n == ans.nonce) {
                    self.warm.swap_remove(i);
                    if ans.synced {
                        self.warmed(now, from);
                    }
                    return Ok(());
                }
                let r = self.sync.handle_answer(rx_local_us, &from, &ans);
                self.poll_sync(now);
                self.publish(now);
                r.map_err(|e| CellError::forbidden(e.to_string()))
            }
        }
    }

    fn handle_timeout(&mut self, now: CellTime) {
        // Publish at least once a second (the error bound grows between samples); while
        // unsynced, come back soon for the next bootstrap round.
        let synced = self.sync.status(now.local_us).synced;
        self.next_tick = now.mono_ms + if synced { 1000 } else { 250 };
        self.sync.handle_timeout(now.local_us);
        self.warm
            .retain(|(_, at)| now.mono_ms.saturating_sub(*at) < BOOT_RETRY_MS);
        self.send_boot(now);
        self.maybe_bootstrap(now);
        self.poll_sync(now);
        self.publish(now);
    }

    fn poll_timeout(&self) -> Option<u64> {
        let sync = self.sync.poll_timeout().map(|us| us.div_ceil(1000));
        let next = self
            .boot_at
            .map_or(self.next_tick, |b| b.min(self.next_tick));
        Some(sync.map_or(next, |s| s.min(next)))
    }

    fn poll_action(&mut self, _now: CellTime) -> Option<CellAction> {
        self.out.pop_front()
    }

    fn status(&self, now: CellTime) -> Value {
        let st = self.sync.status(now.local_us);
        json!({
            "time_answers": self.answered,
            "time_refused": self.refused,
            "time_samples": st.samples,
            "time_rejected": st.rejected,
        })
    }

    fn metrics(&self, _now: CellTime) -> String {
        format!(
            "# HELP borg_time_answers_total Time requests answered.\n# TYPE borg_time_answers_total counter\nborg_time_answers_total {}\n\
             # HELP borg_time_answers_refused_total Time requests not answered (rate limit).\n# TYPE borg_time_answers_refused_total counter\nborg_time_answers_refused_total {}\n",
            self.answered, self.refused
        )
    }
}
