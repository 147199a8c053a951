//! Moving shards between nodes: offers, pulls and serving, over one link each.
//!
//! A node that wants another to hold shards (a repair push, or an answer to `shard.ask`)
//! *offers* them: `shard.offer {stream, shards}` with the exact lengths from its store. The
//! receiver pulls the ones it lacks with `Want` binary frames, at most a window at a time
//! ([`borg_proto::stream::Receiver`]); the holder answers each from its store (a blocking job)
//! with a `Shard` frame, or `Missing`. The receiver checks each shard against its address and
//! length before it stores it, stores it durably, and only then counts it; at the end it says
//! what it stored (`shard.stored`). Memory stays bounded on both sides:
//!
//! - receiver: at most [`MAX_PULLS`] pulls at once ([`MAX_PULLS_PER_PEER`] per offerer), each
//!   with at most [`PULL_WINDOW`] shards in flight or waiting for the disk;
//! - holder: only streams it offered are served, at most [`MAX_WANTS_PER_STREAM`] Wants
//!   queued per stream and [`MAX_SERVE_QUEUE`] in all ([`MAX_SERVING`] reads at once); beyond
//!   that the stream is closed `busy`. A Want for a stream it did not offer gets
//!   `Close unknown_stream`, for an address it did not offer `Missing`.
//!
//! Offers expire after [`OFFER_TIMEOUT_MS`] without `shard.stored` (the planner retries), and
//! pulls after [`PULL_TIMEOUT_MS`], or [`PULL_IDLE_MS`] without a stored shard (what was stored
//! is reported, the rest failed). Every way an offer of a repair push ends without `stored`
//! tells the planner it failed, so it tries again.
//!
//! Only placeable members of the shard tree may offer, ask or query (checked by the caller),
//! and a node takes only shards it ranks within `r + spare` for, up to [`super::MAX_HELD_SHARDS`].
//!
//! Stream ids are chosen by the offerer, with a parity fixed per pair of keys (the smaller key
//! uses even ids, the larger odd), so a frame's stream id says whose offer it belongs to; they
//! start at a random value, so a restarted node does not reuse the ids of its last life.

use std::collections::{HashMap, VecDeque};

use borg_net::cell::{CellAction, CellError};
use borg_proto::identity::PublicKey;
use borg_proto::shard::placement::{self, ShardAddr};
use borg_proto::stream::frame::{Close, CloseCode, Frame, Missing, Shard, Want};
use borg_proto::stream::{Plan, Receiver, RecvConfig};
use borg_store::{Address, StoreError};
use serde_json::{json, Value};

use super::disk::{Job, PullSlot};
use super::{wire, ShardCell};

/// Pulls running at once, in all and from one offerer.
pub const MAX_PULLS: usize = 4;
pub const MAX_PULLS_PER_PEER: usize = 2;
/// Pulls of shards a client here waits for (answers to our `shard.ask`), counted apart from
/// the planner's so that repairs and gets do not starve each other: in all and per holder.
pub const MAX_CLIENT_PULLS: usize = 8;
pub const MAX_CLIENT_PULLS_PER_PEER: usize = 4;
/// Shards of one pull requested or waiting for the disk at once.
pub const PULL_WINDOW: usize = 8;
/// A request unanswered this long is asked again (ms).
pub const WANT_TIMEOUT_MS: u64 = 10_000;
/// A pull ends after this long whatever is left (ms).
pub const PULL_TIMEOUT_MS: u64 = 5 * 60_000;
/// A pull that stores nothing for this long ends (ms): a silent offerer cannot hold a slot.
pub const PULL_IDLE_MS: u64 = 30_000;
/// Times one offered shard is served per offer (a lost frame is asked again once).
pub const SERVES_PER_SHARD: u8 = 2;
/// An offer not answered with `shard.stored` within this is given up (ms).
pub const OFFER_TIMEOUT_MS: u64 = 5 * 60_000;
/// Offers of ours waiting for their pull, at most (to one peer: a quarter).
pub const MAX_OFFERS: usize = 64;
/// Holder side: Wants queued per stream, in all, and reads at once.
pub const MAX_WANTS_PER_STREAM: usize = PULL_WINDOW * 2;
pub const MAX_SERVE_QUEUE: usize = 64;
pub const MAX_SERVING: usize = 4;

struct OfferOut {
    addrs: Vec<ShardAddr>,
    /// Times each of `addrs` was served (parallel to it).
    served: Vec<u8>,
    deadline: u64,
    queued: usize,
    /// Still waiting for the store to say which shards it holds (the slot is taken).
    looking_up: bool,
    /// A client's stream (`shard.open`), not a push of ours: its end tells the planner
    /// nothing, and each Want keeps it open for another [`CLIENT_STREAM_IDLE_MS`].
    client: bool,
}

/// Client streams (`shard.open`) open at once, in all and per key.
pub const MAX_CLIENT_STREAMS: usize = 64;
pub const MAX_CLIENT_STREAMS_PER_KEY: usize = 4;
/// Shards one client stream may name.
pub const MAX_CLIENT_STREAM_SHARDS: usize = 1024;
/// A client stream without a Want for this long is closed (ms).
pub const CLIENT_STREAM_IDLE_MS: u64 = 30_000;

struct Pull {
    rx: Receiver,
    stored: Vec<ShardAddr>,
    failed: Vec<ShardAddr>,
    /// Shards offered that we held already: reported stored.
    had: Vec<ShardAddr>,
    deadline: u64,
    /// When a shard of this pull was last stored (or it started).
    last_progress: u64,
    /// Pulled for clients waiting here (counted against [`MAX_CLIENT_PULLS`]).
    for_client: bool,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    offers_sent: u64,
    offers_expired: u64,
    pulls: u64,
    pulls_refused: u64,
    shards_in: u64,
    bad_shards: u64,
    unsolicited: u64,
    shards_out: u64,
    missing_out: u64,
    closes_out: u64,
    wants_dropped: u64,
    offers_refused: u64,
    client_streams: u64,
    client_streams_refused: u64,
}

/// The transfer state of one node.
pub(super) struct Transfers {
    next_stream: u32,
    offers: HashMap<(PublicKey, u32), OfferOut>,
    pulls: HashMap<(PublicKey, u32), Pull>,
    serve_q: VecDeque<(PublicKey, Want)>,
    serving: usize,
    counts: Counts,
}

impl Transfers {
    pub(super) fn new() -> Self {
        Self {
            next_stream: rand::random::<u32>(),
            offers: HashMap::new(),
            pulls: HashMap::new(),
            serve_q: VecDeque::new(),
            serving: 0,
            counts: Counts::default(),
        }
    }

    /// The offer `stream` to `from` was answered: each offered shard and whether it is stored
    /// there now.
    pub(super) fn offer_answered(
        &mut self,
        from: PublicKey,
        stream: u32,
        stored: &[ShardAddr],
        _failed: &[ShardAddr],
    ) -> Vec<(ShardAddr, bool)> {
        let Some(offer) = self.offers.remove(&(from, stream)) else {
            return Vec::new();
        };
        if offer.looking_up {
            // An answer before the offer was sent is forged or stale; keep the slot's fate.
            self.offers.insert((from, stream), offer);
            return Vec::new();
        }
        offer
            .addrs
            .into_iter()
            .map(|a| (a, stored.contains(&a)))
            .collect()
    }

    /// A Serve job finished: answer the Want.
    pub(super) fn served(
        &mut self,
        to: PublicKey,
        want: Want,
        bytes: Option<Vec<u8>>,
        out: &mut VecDeque<CellAction>,
    ) {
        self.serving = self.serving.saturating_sub(1);
        if let Some(o) = self.offers.get_mut(&(to, want.stream)) {
            o.queued = o.queued.saturating_sub(1);
        }
        let frame = match bytes {
            Some(bytes) => {
                self.counts.shards_out += 1;
                Frame::Shard(Shard {
                    stream: want.stream,
                    seq: want.seq,
                    addr: want.addr,
                    bytes,
                })
            }
            None => {
                self.counts.missing_out += 1;
                Frame::Missing(Missing {
                    stream: want.stream,
                    seq: want.seq,
                    addr: want.addr,
                })
            }
        };
        out.push_back(CellAction::SendBinary {
            to,
            bytes: frame.encode(),
        });
    }

    /// A Store job finished for `slot`.
    pub(super) fn written(&mut self, now: u64, slot: PullSlot, ok: bool) {
        let (from, stream, index) = slot;
        if let Some(p) = self.pulls.get_mut(&(from, stream)) {
            p.last_progress = now;
            let addr = p.rx.plan().shards().get(index).map(|s| s.addr);
            // Marked written either way: a refused write (store full) is a failed shard,
            // never one requested again.
            p.rx.handle_written(index);
            if let Some(a) = addr {
                if ok {
                    p.stored.push(a);
                } else {
                    p.failed.push(a);
                }
            }
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<u64> {
        let offers = self.offers.values().map(|o| o.deadline);
        let pulls = self
            .pulls
            .values()
            .flat_map(|p| {
                [
                    Some(p.deadline),
                    Some(p.last_progress + PULL_IDLE_MS),
                    p.rx.poll_timeout(),
                ]
            })
            .flatten();
        offers.chain(pulls).min()
    }

    pub(super) fn status(&self) -> Value {
        let c = &self.counts;
        json!({
            "offers_open": self.offers.len(),
            "pulls_open": self.pulls.len(),
            "serve_queue": self.serve_q.len(),
            "offers_sent": c.offers_sent,
            "offers_expired": c.offers_expired,
            "pulls": c.pulls,
            "pulls_refused": c.pulls_refused,
            "shards_in": c.shards_in,
            "bad_shards": c.bad_shards,
            "unsolicited": c.unsolicited,
            "shards_out": c.shards_out,
            "missing_out": c.missing_out,
            "closes_out": c.closes_out,
            "wants_dropped": c.wants_dropped,
            "offers_refused": c.offers_refused,
            "client_streams_open": self.offers.values().filter(|o| o.client).count(),
            "client_streams": c.client_streams,
            "client_streams_refused": c.client_streams_refused,
        })
    }

    pub(super) fn metrics(&self) -> String {
        let c = &self.counts;
        format!(
            "borg_shard_offers_sent_total {}\nborg_shard_pulls_total {}\n\
             borg_shard_pulls_refused_total {}\nborg_shard_frames_in_total {}\n\
             borg_shard_bad_frames_total {}\nborg_shard_unsolicited_frames_total {}\n\
             borg_shard_frames_out_total {}\n",
            c.offers_sent,
            c.pulls,
            c.pulls_refused,
            c.shards_in,
            c.bad_shards,
            c.unsolicited,
            c.shards_out
        )
    }
}

fn close(to: PublicKey, stream: u32, code: CloseCode) -> CellAction {
    CellAction::SendBinary {
        to,
        bytes: Frame::Close(Close { stream, code }).encode(),
    }
}

impl ShardCell {
    /// Offer `addrs` to `to` (their lengths come from the store first). The slot is taken
    /// now, so lookups still queued count against the bounds.
    pub(super) fn offer(&mut self, now: u64, to: PublicKey, addrs: Vec<ShardAddr>) {
        let t = &mut self.transfers;
        let pushes = || t.offers.iter().filter(|(_, o)| !o.client);
        let to_peer = pushes().filter(|((k, _), _)| *k == to).count();
        if pushes().count() >= MAX_OFFERS || to_peer >= MAX_OFFERS / 4 {
            t.counts.offers_refused += 1;
            return self.offer_failed(now, to, &addrs);
        }
        let stream = self.next_stream_to(&to);
        let jobs = addrs.iter().copied().map(Address::from_bytes).collect();
        if !self.job(Job::Offer {
            to,
            stream,
            addrs: jobs,
        }) {
            return self.offer_failed(now, to, &addrs);
        }
        self.transfers.offers.insert(
            (to, stream),
            OfferOut {
                served: vec![0; addrs.len()],
                addrs,
                deadline: now + OFFER_TIMEOUT_MS,
                queued: 0,
                looking_up: true,
                client: false,
            },
        );
    }

    /// A client (any key) opens `stream` to pull `addrs` from this node with Wants. No store
    /// lookup: a Want for a shard not held here is answered `Missing` at once. Refused with
    /// `Close busy` beyond [`MAX_CLIENT_STREAMS`] ([`MAX_CLIENT_STREAMS_PER_KEY`] per key),
    /// or when `stream` is in use between us.
    pub(super) fn open_client_stream(
        &mut self,
        now: u64,
        from: PublicKey,
        stream: u32,
        addrs: Vec<ShardAddr>,
    ) {
        let t = &mut self.transfers;
        let clients = || t.offers.iter().filter(|(_, o)| o.client);
        let of_key = clients().filter(|((k, _), _)| *k == from).count();
        if clients().count() >= MAX_CLIENT_STREAMS
            || of_key >= MAX_CLIENT_STREAMS_PER_KEY
            || t.offers.contains_key(&(from, stream))
            || t.pulls.contains_key(&(from, stream))
        {
            t.counts.client_streams_refused += 1;
            t.counts.closes_out += 1;
            return self.out.push_back(close(from, stream, CloseCode::Busy));
        }
        t.counts.client_streams += 1;
        let held: Vec<bool> = addrs.iter().map(|a| self.planner.holds(a)).collect();
        self.send(&from, "shard.opened", wire::opened_body(stream, &held));
        self.transfers.offers.insert(
            (from, stream),
            OfferOut {
                served: vec![0; addrs.len()],
                addrs,
                deadline: now + CLIENT_STREAM_IDLE_MS,
                queued: 0,
                looking_up: false,
                client: true,
            },
        );
    }

    /// End the offer or client stream `key` and drop its queued Wants. A push of ours that
    /// ends this way failed: the planner tries again.
    fn end_offer(&mut self, now: u64, key: (PublicKey, u32)) {
        let Some(o) = self.transfers.offers.remove(&key) else {
            return;
        };
        self.transfers
            .serve_q
            .retain(|(k, w)| !(*k == key.0 && w.stream == key.1));
        if !o.client {
            self.offer_failed(now, key.0, &o.addrs);
        }
    }

    /// The next stream id for an offer to `to`: the parity of our side of the pair.
    fn next_stream_to(&mut self, to: &PublicKey) -> u32 {
        let parity = u32::from(self.me > *to);
        let t = &mut self.transfers;
        t.next_stream = t.next_stream.wrapping_add(1);
        if t.next_stream & 1 != parity {
            t.next_stream = t.next_stream.wrapping_add(1);
        }
        t.next_stream
    }

    /// Whether `stream` from `peer` names one of our offers (else one of theirs).
    fn is_ours(&self, peer: &PublicKey, stream: u32) -> bool {
        stream & 1 == u32::from(self.me > *peer)
    }

    /// An offer of `addrs` to `to` ended without `shard.stored`: a repair push failed, and
    /// the planner tries again after its retry time.
    fn offer_failed(&mut self, now: u64, to: PublicKey, addrs: &[ShardAddr]) {
        for a in addrs {
            self.planner.handle_push_done(now, a, to, false);
        }
    }

    /// The store said which offered shards it holds and their lengths: send the offer.
    pub(super) fn offer_looked_up(
        &mut self,
        now: u64,
        to: PublicKey,
        stream: u32,
        found: Result<Vec<(Address, Option<u64>)>, StoreError>,
    ) {
        let Some(slot) = self.transfers.offers.remove(&(to, stream)) else {
            return;
        };
        let Ok(found) = found else {
            return self.offer_failed(now, to, &slot.addrs);
        };
        let (held, absent): (Vec<_>, Vec<_>) = found.into_iter().partition(|(_, l)| l.is_some());
        if !absent.is_empty() {
            let gone: Vec<ShardAddr> = absent.iter().map(|(a, _)| *a.as_bytes()).collect();
            self.offer_failed(now, to, &gone);
            let answers: Vec<_> = gone.iter().map(|a| (*a, false)).collect();
            self.send(&to, "shard.have", wire::have_body(&answers));
        }
        if held.is_empty() {
            return;
        }
        let shards: Vec<(ShardAddr, u32)> = held
            .iter()
            .map(|(a, l)| (*a.as_bytes(), l.unwrap_or(0) as u32))
            .collect();
        self.transfers.offers.insert(
            (to, stream),
            OfferOut {
                addrs: shards.iter().map(|(a, _)| *a).collect(),
                served: vec![0; shards.len()],
                deadline: now + OFFER_TIMEOUT_MS,
                queued: 0,
                looking_up: false,
                client: false,
            },
        );
        self.transfers.counts.offers_sent += 1;
        self.send(&to, "shard.offer", wire::offer_body(stream, &shards));
    }

    /// `from` offers `shards` on `stream`: pull those we lack.
    pub(super) fn accept_offer(
        &mut self,
        now: u64,
        from: PublicKey,
        stream: u32,
        shards: Vec<(ShardAddr, u32)>,
    ) -> Result<(), CellError> {
        let full = self.planner.tracked() >= super::MAX_HELD_SHARDS;
        let theirs = !self.is_ours(&from, stream);
        let for_client = !shards.is_empty() && shards.iter().all(|(a, _)| self.clients.wants(a));
        if for_client {
            for (a, _) in &shards {
                self.clients.offered(a, from);
            }
        }
        let (max, max_per_peer) = if for_client {
            (MAX_CLIENT_PULLS, MAX_CLIENT_PULLS_PER_PEER)
        } else {
            (MAX_PULLS, MAX_PULLS_PER_PEER)
        };
        let t = &mut self.transfers;
        let same = |p: &Pull| p.for_client == for_client;
        let running = t.pulls.values().filter(|p| same(p)).count();
        let from_peer = t
            .pulls
            .iter()
            .filter(|((k, _), p)| *k == from && same(p))
            .count();
        if !theirs
            || full
            || t.pulls.contains_key(&(from, stream))
            || running >= max
            || from_peer >= max_per_peer
        {
            t.counts.pulls_refused += 1;
            let all: Vec<ShardAddr> = shards.iter().map(|(a, _)| *a).collect();
            self.send(&from, "shard.stored", wire::stored_body(stream, &[], &all));
            return Ok(());
        }
        // Only shards this node ranks within r + spare for: nobody can make it keep others.
        // And those a client here waits for (a get: cached until the planner drops it).
        let (mine, not_mine): (Vec<_>, Vec<_>) = shards.into_iter().partition(|(a, _)| {
            self.clients.wants(a)
                || placement::rank_of(a, self.members.dir.members(), &self.me)
                    .is_some_and(|r| r < self.depth)
        });
        let not_mine: Vec<ShardAddr> = not_mine.into_iter().map(|(a, _)| a).collect();
        let (had, want): (Vec<_>, Vec<_>) =
            mine.into_iter().partition(|(a, _)| self.planner.holds(a));
        let had: Vec<ShardAddr> = had.into_iter().map(|(a, _)| a).collect();
        // A shard a client waits for that another holder's pull is bringing already: not twice.
        let (want, not_mine) = if for_client {
            let (dup, want): (Vec<_>, Vec<_>) = want
                .into_iter()
                .partition(|(a, _)| self.clients.being_pulled(a, now));
            let mut not_mine = not_mine;
            not_mine.extend(dup.into_iter().map(|(a, _)| a));
            (want, not_mine)
        } else {
            (want, not_mine)
        };
        if for_client {
            for (a, _) in &want {
                self.clients.pulling(a, now);
            }
        }
        if want.is_empty() {
            self.send(
                &from,
                "shard.stored",
                wire::stored_body(stream, &had, &not_mine),
            );
            return Ok(());
        }
        let n = want.len();
        let plan =
            Plan::contiguous([0u8; 32], want).map_err(|e| CellError::malformed(e.to_string()))?;
        let cfg = RecvConfig {
            window_total: PULL_WINDOW,
            window_per_holder: PULL_WINDOW,
            timeout_ms: WANT_TIMEOUT_MS,
            max_strikes: 2,
        };
        let rx = Receiver::new(stream, plan, vec![vec![from]; n], cfg, None)
            .map_err(|e| CellError::malformed(e.to_string()))?;
        self.transfers.counts.pulls += 1;
        self.transfers.pulls.insert(
            (from, stream),
            Pull {
                rx,
                stored: Vec::new(),
                failed: not_mine,
                had,
                deadline: now + PULL_TIMEOUT_MS,
                last_progress: now,
                for_client,
            },
        );
        self.drive_pull(now, (from, stream));
        Ok(())
    }

    /// Send what the pull may request now; report and end it when nothing is left to do.
    fn drive_pull(&mut self, now: u64, key: (PublicKey, u32)) {
        let Some(p) = self.transfers.pulls.get_mut(&key) else {
            return;
        };
        while let Some((holder, want)) = p.rx.poll_request(now) {
            self.out.push_back(CellAction::SendBinary {
                to: holder,
                bytes: Frame::Want(want).encode(),
            });
        }
        let idle = p.rx.in_flight() == 0 && p.rx.writing() == 0;
        let over = p.rx.is_done() || p.rx.failed().is_some();
        let stalled = now >= p.deadline || now >= p.last_progress + PULL_IDLE_MS;
        let finished = idle && over;
        let given_up = stalled && p.rx.writing() == 0;
        if !(finished || given_up) {
            return;
        }
        if let Some(p) = self.transfers.pulls.remove(&key) {
            let mut stored = p.had;
            stored.extend(p.stored);
            let mut failed = p.failed;
            for s in p.rx.plan().shards() {
                if !stored.contains(&s.addr) && !failed.contains(&s.addr) {
                    failed.push(s.addr);
                }
            }
            self.send(
                &key.0,
                "shard.stored",
                wire::stored_body(key.1, &stored, &failed),
            );
        }
    }

    /// Serve queued Wants within the read bound.
    pub(super) fn pump(&mut self, now: u64) {
        self.pump_serving();
        let keys: Vec<(PublicKey, u32)> = self.transfers.pulls.keys().copied().collect();
        for k in keys {
            self.drive_pull(now, k);
        }
    }

    /// A binary frame on a link of this cell.
    pub(super) fn on_frame(
        &mut self,
        now: u64,
        from: PublicKey,
        bytes: &[u8],
    ) -> Result<(), CellError> {
        let frame = Frame::decode(bytes).map_err(|e| CellError::malformed(e.to_string()))?;
        match frame {
            Frame::Want(want) => self.on_want(now, from, want),
            Frame::Shard(shard) => {
                let key = (from, shard.stream);
                let Some(p) = self.transfers.pulls.get_mut(&key) else {
                    self.transfers.counts.unsolicited += 1;
                    return Ok(());
                };
                match p.rx.handle_shard(now, &from, shard) {
                    Ok(Some(w)) => {
                        self.transfers.counts.shards_in += 1;
                        let addr = p.rx.plan().shards()[w.index].addr;
                        let slot = (from, key.1, w.index);
                        // Bounded by the pulls' windows (MAX_PULLS x PULL_WINDOW).
                        self.job_always(Job::Store {
                            slot,
                            addr: Address::from_bytes(addr),
                            bytes: w.bytes,
                        });
                    }
                    Ok(None) => self.transfers.counts.unsolicited += 1,
                    Err(e) => {
                        self.transfers.counts.bad_shards += 1;
                        tracing::debug!("shard from {}: {e}", from.short());
                    }
                }
                self.drive_pull(now, key);
            }
            Frame::Missing(m) => {
                if let Some(p) = self.transfers.pulls.get_mut(&(from, m.stream)) {
                    p.rx.handle_missing(now, &from, m);
                }
                self.drive_pull(now, (from, m.stream));
            }
            Frame::Close(c) => {
                let key = (from, c.stream);
                let client = self.transfers.offers.get(&key).is_some_and(|o| o.client);
                if client || self.is_ours(&from, c.stream) {
                    self.end_offer(now, key);
                } else if let Some(p) = self.transfers.pulls.get_mut(&key) {
                    p.rx.handle_close(&from, c);
                    self.drive_pull(now, key);
                }
            }
        }
        Ok(())
    }

    fn on_want(&mut self, now: u64, from: PublicKey, want: Want) {
        let t = &mut self.transfers;
        let offer = t
            .offers
            .get_mut(&(from, want.stream))
            .filter(|o| !o.looking_up);
        let Some(offer) = offer else {
            t.counts.closes_out += 1;
            self.out
                .push_back(close(from, want.stream, CloseCode::UnknownStream));
            return;
        };
        if offer.client {
            offer.deadline = now + CLIENT_STREAM_IDLE_MS;
        }
        let index = offer.addrs.iter().position(|a| *a == want.addr);
        // A client may name shards this node does not hold: no disk read for those.
        let held = !offer.client || self.planner.holds(&want.addr);
        let Some(index) = index.filter(|&i| held && offer.served[i] < SERVES_PER_SHARD) else {
            // Not offered, or asked for too often: no more reads of it on this offer.
            t.counts.missing_out += 1;
            self.out.push_back(CellAction::SendBinary {
                to: from,
                bytes: Frame::Missing(Missing {
                    stream: want.stream,
                    seq: want.seq,
                    addr: want.addr,
                })
                .encode(),
            });
            return;
        };
        if offer.queued >= MAX_WANTS_PER_STREAM {
            // More than the window it was offered: a misbehaving puller.
            t.counts.closes_out += 1;
            self.out
                .push_back(close(from, want.stream, CloseCode::Busy));
            return self.end_offer(now, (from, want.stream));
        }
        let from_peer = t.serve_q.iter().filter(|(k, _)| *k == from).count();
        if t.serve_q.len() >= MAX_SERVE_QUEUE || from_peer >= MAX_SERVE_QUEUE / 4 {
            // Busy now: the puller asks again after its timeout.
            t.counts.wants_dropped += 1;
            return;
        }
        offer.served[index] += 1;
        offer.queued += 1;
        t.serve_q.push_back((from, want));
        self.pump_serving();
    }

    fn pump_serving(&mut self) {
        while self.transfers.serving < MAX_SERVING {
            let Some((to, want)) = self.transfers.serve_q.pop_front() else {
                break;
            };
            if self.job(Job::Serve { to, want }) {
                self.transfers.serving += 1;
            } else {
                self.transfers.serve_q.push_front((to, want));
                break;
            }
        }
    }

    /// Expire offers and pulls; time out Wants.
    pub(super) fn transfers_timeout(&mut self, now: u64) {
        let expired: Vec<(PublicKey, u32)> = self
            .transfers
            .offers
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if self.transfers.offers.get(&k).is_some_and(|o| o.client) {
                self.end_offer(now, k);
                continue;
            }
            if let Some(o) = self.transfers.offers.remove(&k) {
                self.transfers.counts.offers_expired += 1;
                for a in o.addrs {
                    self.planner.handle_push_done(now, &a, k.0, false);
                }
            }
        }
        let keys: Vec<(PublicKey, u32)> = self.transfers.pulls.keys().copied().collect();
        for k in keys {
            if let Some(p) = self.transfers.pulls.get_mut(&k) {
                if p.rx.poll_timeout().is_some_and(|t| t <= now) {
                    p.rx.handle_timeout(now);
                }
            }
            self.drive_pull(now, k);
        }
    }
}
