//! What clients (`borg put`/`get`, later the browser conduit) ask the shard cell through its
//! receptor: `shard.put` stores a shard here and starts its replication, `shard.get` answers
//! it from here or fetches it from its holders first. Both answer later (a disk job, a
//! transfer), through receptor tickets.
//!
//! Bounds: at most [`MAX_PUTS_QUEUED`] puts wait for the disk and [`MAX_GETS`] shards are
//! looked for at once (each with at most [`MAX_TICKETS_PER_GET`] waiting clients); a shard no
//! holder offers within [`GET_DEADLINE_MS`] is `not_found`.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use borg_net::cell::{CellAction, CellError};
use borg_proto::identity::PublicKey;
use borg_proto::shard::placement::ShardAddr;
use borg_store::{Address, StoreError, MAX_SHARD_BYTES};
use serde_json::{json, Value};

use super::disk::Job;
use super::{wire, ShardCell};

/// Client puts waiting for the disk at most.
pub const MAX_PUTS_QUEUED: usize = 32;
/// Shards being looked for at once, at most.
pub const MAX_GETS: usize = 64;
/// Clients waiting for one shard, at most.
pub const MAX_TICKETS_PER_GET: usize = 16;
/// A get asks the top `r` ranks for a shard it lacks, then again every this long (ms) while
/// no pull brings it, the later rounds down to rank `r + spare`.
pub const GET_ASK_EVERY_MS: u64 = 1_500;
/// A shard no holder gave within this long (ms) is answered `not_found`.
pub const GET_DEADLINE_MS: u64 = 15_000;
/// A read that has the shard but saw fewer than `r` copies waits this long (ms) for the
/// other holders' offers before it answers, so the count it reports is right.
pub const GET_SETTLE_MS: u64 = 500;

/// Ranks `shard.locate` names per address beyond the `r` placed: where a copy may still be
/// while the set of members changes.
pub const LOCATE_SPARE: usize = 2;

/// One shard clients wait for.
#[derive(Debug)]
struct Wait {
    tickets: Vec<u64>,
    started: u64,
    /// Rounds of asks sent, and when the last one went.
    rounds: u32,
    last_ask: Option<u64>,
    /// When a pull of it last started.
    pull_started: Option<u64>,
    /// Holders that offered it (the copies this read saw).
    offered_by: Vec<PublicKey>,
    /// Set when the shard is here but fewer than `r` copies were seen: read it again then.
    settle_until: Option<u64>,
    /// A local read is queued.
    reading: bool,
}

impl Wait {
    /// When to ask again: a round after the last, unless a pull started since.
    fn next_ask(&self) -> Option<u64> {
        if self.reading {
            return None;
        }
        if let Some(t) = self.settle_until {
            return Some(t);
        }
        let last = self.last_ask?.max(self.pull_started.unwrap_or(0));
        Some(last + GET_ASK_EVERY_MS)
    }
}

/// Client requests in progress.
#[derive(Debug, Default)]
pub(super) struct Clients {
    waits: HashMap<ShardAddr, Wait>,
    puts_queued: usize,
    pub(super) puts: u64,
    pub(super) gets: u64,
    pub(super) gets_fetched: u64,
    pub(super) not_found: u64,
}

impl Clients {
    /// Whether a client waits for `addr` (its offer is taken whatever our rank).
    pub(super) fn wants(&self, addr: &ShardAddr) -> bool {
        self.waits.contains_key(addr)
    }

    /// Whether a pull of `addr` for a client started less than a round ago.
    pub(super) fn being_pulled(&self, addr: &ShardAddr, now: u64) -> bool {
        self.waits
            .get(addr)
            .and_then(|w| w.pull_started)
            .is_some_and(|t| now < t + GET_ASK_EVERY_MS)
    }

    /// `from` offered `addr` for a client: one copy seen.
    pub(super) fn offered(&mut self, addr: &ShardAddr, from: PublicKey) {
        if let Some(w) = self.waits.get_mut(addr) {
            if !w.offered_by.contains(&from) && w.offered_by.len() < 32 {
                w.offered_by.push(from);
            }
        }
    }

    /// A pull of `addr` for a client starts.
    pub(super) fn pulling(&mut self, addr: &ShardAddr, now: u64) {
        if let Some(w) = self.waits.get_mut(addr) {
            w.pull_started = Some(now);
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<u64> {
        self.waits
            .values()
            .map(|w| {
                let end = w.started + GET_DEADLINE_MS;
                w.next_ask().map_or(end, |t| t.min(end))
            })
            .min()
    }

    pub(super) fn status(&self) -> Value {
        json!({
            "puts": self.puts, "gets": self.gets, "gets_fetched": self.gets_fetched,
            "not_found": self.not_found, "waiting": self.waits.len(),
        })
    }
}

fn reply(ticket: u64, result: Result<Value, CellError>) -> CellAction {
    CellAction::Reply { ticket, result }
}

fn store_error(e: &StoreError) -> CellError {
    CellError {
        status: e.http_status(),
        code: e.code(),
        message: e.to_string(),
    }
}

fn not_found(addr: &Address) -> CellError {
    CellError::not_found(format!(
        "no holder of shard {addr} answered within {GET_DEADLINE_MS} ms"
    ))
}

fn busy(what: &str) -> CellError {
    CellError::unavailable(format!(
        "too many {what} in progress here; try again shortly"
    ))
}

/// `{"data": base64url}` of a `shard.put`, bounded before it is decoded.
fn parse_put(body: &Value) -> Result<Vec<u8>, CellError> {
    let text = body
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| CellError::malformed("shard.put needs body.data (base64url)"))?;
    if text.len() > MAX_SHARD_BYTES.div_ceil(3) * 4 {
        return Err(CellError {
            status: 413,
            code: "too_large",
            message: format!("a shard is at most {MAX_SHARD_BYTES} bytes"),
        });
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| CellError::malformed(format!("body.data is not base64url: {e}")))?;
    if bytes.len() > MAX_SHARD_BYTES {
        return Err(CellError {
            status: 413,
            code: "too_large",
            message: format!("a shard is at most {MAX_SHARD_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

fn parse_addr(body: &Value) -> Result<Address, CellError> {
    body.get("addr")
        .and_then(Value::as_str)
        .ok_or_else(|| CellError::malformed("shard.get needs body.addr (64 hex)"))?
        .parse::<Address>()
        .map_err(|e| CellError::malformed(format!("body.addr: {e}")))
}

impl ShardCell {
    /// `shard.locate`: for each address the members best placed to hold it (best first,
    /// `r` + [`LOCATE_SPARE`] of those whose address is known), so that a client can pull
    /// from them directly (`shard.open`). O(addresses x members) hashing, both bounded.
    pub(super) fn locate(&self, body: &Value) -> Result<Value, CellError> {
        let addrs = wire::parse_locate(body).map_err(|e| CellError::malformed(e.0))?;
        let members = self.members.dir.members();
        let mut holders: Vec<Value> = Vec::new();
        let mut index: HashMap<PublicKey, usize> = HashMap::new();
        let mut ranks = Vec::with_capacity(addrs.len());
        for a in &addrs {
            let mut row = Vec::new();
            for r in members.top(a, self.replicas + LOCATE_SPARE) {
                let Some(addr) = self.members.addr_of(&r.key) else {
                    continue;
                };
                let i = *index.entry(r.key).or_insert_with(|| {
                    holders.push(json!({"key": r.key.to_b64(), "addr": addr}));
                    holders.len() - 1
                });
                row.push(i);
            }
            ranks.push(row);
        }
        Ok(json!({"holders": holders, "ranks": ranks}))
    }

    /// `shard.put` / `shard.get` from a client: `Ok(None)` is answered later on `ticket`.
    pub(super) fn client_request(
        &mut self,
        now: u64,
        kind: &str,
        body: &Value,
        ticket: u64,
    ) -> Result<Option<Value>, CellError> {
        self.store_ready()?;
        match kind {
            "shard.put" => {
                let bytes = parse_put(body)?;
                if self.clients.puts_queued >= MAX_PUTS_QUEUED {
                    return Err(busy("puts"));
                }
                if self.planner.tracked() >= super::MAX_HELD_SHARDS {
                    return Err(CellError {
                        status: 507,
                        code: "full",
                        message: "this node tracks as many shards as it may".into(),
                    });
                }
                self.clients.puts_queued += 1;
                let addr = Address::of(&bytes);
                self.job_always(Job::Put {
                    ticket,
                    addr,
                    bytes,
                });
                Ok(None)
            }
            "shard.get" => {
                let addr = parse_addr(body)?;
                let key = *addr.as_bytes();
                self.clients.gets += 1;
                let full = self.clients.waits.len() >= MAX_GETS;
                match self.clients.waits.get_mut(&key) {
                    Some(w) if w.tickets.len() >= MAX_TICKETS_PER_GET => Err(busy("gets of it")),
                    Some(w) => {
                        w.tickets.push(ticket);
                        Ok(None)
                    }
                    None if full => Err(busy("gets")),
                    None => {
                        self.clients.waits.insert(
                            key,
                            Wait {
                                tickets: vec![ticket],
                                started: now,
                                rounds: 0,
                                last_ask: None,
                                pull_started: None,
                                offered_by: Vec::new(),
                                settle_until: None,
                                reading: true,
                            },
                        );
                        self.job_always(Job::Read(addr));
                        Ok(None)
                    }
                }
            }
            _ => Err(CellError::unknown_kind(format!(
                "shardTree answers shard.stat, shard.put and shard.get, not {kind:?}"
            ))),
        }
    }

    /// A client's put reached the disk (or did not).
    pub(super) fn client_put_done(
        &mut self,
        now: u64,
        ticket: u64,
        addr: Address,
        len: u64,
        result: Result<(), StoreError>,
    ) {
        self.clients.puts_queued = self.clients.puts_queued.saturating_sub(1);
        let answer = match result {
            Ok(()) => {
                self.clients.puts += 1;
                self.planner.hold(now, *addr.as_bytes(), len);
                // Replicate now, not after the new-shard check delay.
                self.planner.handle_hint(now, addr.as_bytes());
                self.usage_soon(now);
                Ok(json!({ "addr": addr.to_string(), "len": len }))
            }
            Err(e) => Err(store_error(&e)),
        };
        self.out.push_back(reply(ticket, answer));
    }

    /// A local read for waiting clients finished.
    pub(super) fn client_read_done(
        &mut self,
        now: u64,
        addr: Address,
        result: Result<Option<Vec<u8>>, StoreError>,
    ) {
        let key = *addr.as_bytes();
        if let Err(StoreError::Corrupt { addr }) = &result {
            self.found_corrupt(now, addr);
        }
        let Some(w) = self.clients.waits.get_mut(&key) else {
            return;
        };
        w.reading = false;
        match result {
            Ok(Some(bytes)) => {
                // Copies seen: the holders that offered it to this read, else what the
                // planner knows (this node's own copy and fresh reports).
                let copies = w
                    .offered_by
                    .len()
                    .max(self.planner.copies(now, &key))
                    .max(1);
                if copies < self.replicas && w.settle_until.is_none() {
                    // Other holders' offers may still be on their way, or this node's reports
                    // are stale: the planner asks the holders now, and the read answers after.
                    w.settle_until = Some(now + GET_SETTLE_MS);
                    self.planner.handle_hint(now, &key);
                    self.run_planner(now);
                    return;
                }
                let body = json!({
                    "addr": addr.to_string(),
                    "data": URL_SAFE_NO_PAD.encode(&bytes),
                    "replicas": copies,
                });
                if let Some(w) = self.clients.waits.remove(&key) {
                    for t in w.tickets {
                        self.out.push_back(reply(t, Ok(body.clone())));
                    }
                }
            }
            // Not here (or corrupt, and removed): ask its holders.
            Ok(None) | Err(_) => {
                if w.rounds == 0 {
                    self.clients.gets_fetched += 1;
                    self.ask_holders(now, key);
                }
            }
        }
    }

    /// Ask the ranks of `addr` (but us) to offer it: the top `r` in the first round, down to
    /// `r + spare` in later ones.
    fn ask_holders(&mut self, now: u64, addr: ShardAddr) {
        let Some(w) = self.clients.waits.get_mut(&addr) else {
            return;
        };
        w.rounds += 1;
        w.last_ask = Some(now);
        let depth = if w.rounds == 1 {
            self.replicas
        } else {
            self.depth
        };
        self.sync_members(now);
        let asked: Vec<_> = self
            .members
            .dir
            .members()
            .top(&addr, depth)
            .into_iter()
            .filter(|r| r.key != self.me)
            .map(|r| r.key)
            .collect();
        for key in &asked {
            self.send(key, "shard.ask", wire::has_body(&[addr]));
        }
    }

    /// A pulled shard was stored: read it for the clients waiting for it.
    pub(super) fn client_shard_arrived(&mut self, addr: &Address) {
        if let Some(w) = self.clients.waits.get_mut(addr.as_bytes()) {
            if !w.reading {
                w.reading = true;
                self.job_always(Job::Read(*addr));
            }
        }
    }

    /// Ask again, or give up, as the deadlines pass.
    pub(super) fn clients_timeout(&mut self, now: u64) {
        let (mut ask, mut reread, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for (addr, w) in &self.clients.waits {
            if now >= w.started + GET_DEADLINE_MS {
                gone.push(*addr);
            } else if w.next_ask().is_some_and(|t| now >= t) {
                // A settling read reads again; any other asks the holders again.
                match w.settle_until {
                    Some(_) => reread.push(*addr),
                    None => ask.push(*addr),
                }
            }
        }
        for addr in reread {
            if let Some(w) = self.clients.waits.get_mut(&addr) {
                w.reading = true;
            }
            self.job_always(Job::Read(Address::from_bytes(addr)));
        }
        for addr in ask {
            self.ask_holders(now, addr);
        }
        for addr in gone {
            if let Some(w) = self.clients.waits.remove(&addr) {
                self.clients.not_found += 1;
                let e = not_found(&Address::from_bytes(addr));
                for t in w.tickets {
                    self.out.push_back(reply(t, Err(e.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_body_is_bounded_before_decoding() {
        let big = "A".repeat(MAX_SHARD_BYTES.div_ceil(3) * 4 + 4);
        assert_eq!(
            parse_put(&json!({ "data": big })).unwrap_err().code,
            "too_large"
        );
        assert_eq!(parse_put(&json!({})).unwrap_err().code, "malformed");
        assert_eq!(
            parse_put(&json!({"data": "!!"})).unwrap_err().code,
            "malformed"
        );
        let ok = URL_SAFE_NO_PAD.encode(vec![7u8; MAX_SHARD_BYTES]);
        assert_eq!(
            parse_put(&json!({ "data": ok })).unwrap().len(),
            MAX_SHARD_BYTES
        );
        let over = URL_SAFE_NO_PAD.encode(vec![7u8; MAX_SHARD_BYTES + 1]);
        assert_eq!(
            parse_put(&json!({ "data": over })).unwrap_err().code,
            "too_large"
        );
    }
}
