//! `borg get`'s fast path: pull a file's shards straight from their holders, as binary
//! frames over TLS links of the shard tree (DStream; docs/STORAGE.md, "Client streams").
//!
//! For each batch of at most [`BATCH`] missing chunks:
//!
//! 1. `shard.locate` at the `--node` names, per shard, the members best placed to hold it
//!    (their keys and tree addresses);
//! 2. the client dials each of them (pinned to its key, the user's key as its own TLS
//!    identity) and sends a signed `shard.open {stream, addrs}`; each answers `shard.opened`
//!    with a bitmap of the shards it holds (or `Close busy`);
//! 3. a [`Receiver`] spreads `Want` frames over the holders that hold each shard, at most a
//!    window at a time, checks every shard's SHA-256 before it is decrypted and written at its
//!    offset, asks another holder after a bad, missing or late shard, and stops asking a holder
//!    whose link went away.
//!
//! A get of fewer than [`MIN_STREAMED`] chunks skips all this (a locate and a handshake per
//! holder cost more than a few `shard.get`s). Chunks no holder could give are left for the
//! receptor path (`shard.get` at `--node`),
//! which the caller runs next. Progress is saved as on that path (fsync, then the state).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use borg_cells::shard::wire::{self, open_body};
use borg_files::{Manifest, CHUNK};
use borg_net::conn::{self, PeerReader, PeerWriter};
use borg_net::tls::TlsIdentity;
use borg_proto::dna::SHARD_TREE;
use borg_proto::envelope;
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::stream::frame::{Close, CloseCode, Frame};
use borg_proto::stream::{Plan, Receiver, RecvConfig};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::files_cli::{call, with_retries, Progress, Target};
use crate::files_get::{save_progress, Fetch, GetState};

/// Chunks per batch: one stream per holder per batch (the node's bound on one stream).
pub(crate) const BATCH: usize = wire::MAX_OPEN_ADDRS;
/// Fewer missing chunks than this go through the receptor (small files).
const MIN_STREAMED: usize = 4;
/// Addresses per `shard.locate`.
const LOCATE_CHUNK: usize = wire::MAX_LOCATE_ADDRS;
/// Dialing a holder and its `shard.opened`, each at most.
const DIAL_TIMEOUT: Duration = Duration::from_secs(4);
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Shards requested or being written at once, in all and from one holder. The holder
/// closes a stream with more than 16 Wants waiting for its disk: stay below.
const WINDOW_TOTAL: usize = 96;
const WINDOW_PER_HOLDER: usize = 16;
/// A Want unanswered this long is asked again (elsewhere if possible).
const WANT_TIMEOUT_MS: u64 = 20_000;
/// Nothing arriving for this long ends the batch (what is left goes the receptor way).
const STALL: Duration = Duration::from_secs(45);
/// Chunks written between two state saves, and the longest time between two saves.
const SAVE_EVERY_CHUNKS: usize = 64;
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// What the streamed part of a get did.
#[derive(Debug, Default)]
pub(crate) struct Streamed {
    /// Chunks written by this path.
    pub chunks: usize,
    /// The fewest holders found with a shard this path fetched.
    pub min_replicas: Option<u64>,
    /// Holders that answered `shard.opened` (summed over batches).
    pub holders: usize,
    /// Time spent locating, opening and streaming.
    pub seconds: f64,
}

/// One holder of a batch: where to dial it.
#[derive(Debug, Clone, Copy)]
struct Located {
    key: PublicKey,
    addr: SocketAddr,
}

enum Event {
    Frame(usize, Vec<u8>),
    Gone(usize),
    Written(usize, Result<u64>),
}

/// Fetch what `state` lacks straight from the holders (see the module docs). Chunks left
/// undone are for the receptor path. Errors only for what that path could not fix either
/// (a write or fsync of OUT.part failed, or a shard that decrypts wrong).
pub(crate) async fn stream_missing(
    f: &Fetch<'_>,
    state: &mut GetState,
    progress: &mut Progress,
) -> Result<Streamed> {
    let identity = Arc::new(
        TlsIdentity::new(&f.key)
            .map_err(|e| anyhow!("making the TLS identity of your key: {e}"))?,
    );
    let mut out = Streamed::default();
    let missing = state.missing();
    if missing.len() < MIN_STREAMED {
        // A locate and a TLS handshake per holder cost more than a few shard.get requests.
        return Ok(out);
    }
    let started = Instant::now();
    for batch in missing.chunks(BATCH) {
        let Ok(located) = locate(&f.target, &f.key, f.manifest, batch).await else {
            // A node without shard.locate, or one too busy: the receptor path does it all.
            break;
        };
        let b = Batch {
            f,
            identity: identity.clone(),
            chunks: batch,
        };
        b.run(located, state, progress, &mut out).await?;
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// `shard.locate` for the chunks of a batch, [`LOCATE_CHUNK`] addresses a call, all calls at
/// once (each is a TLS handshake away: on an 80 ms link four in a row cost a second): each
/// chunk's candidate holders, best first.
async fn locate(
    target: &Target,
    key: &Arc<SecretKey>,
    manifest: &Manifest,
    chunks: &[usize],
) -> Result<Vec<Vec<Located>>> {
    let shards = manifest.shards();
    let mut calls = JoinSet::new();
    for (k, part) in chunks.chunks(LOCATE_CHUNK).enumerate() {
        let addrs: Vec<String> = part.iter().map(|&i| shards[i].addr.to_string()).collect();
        let (addr, key, n) = (target.addr, key.clone(), part.len());
        calls.spawn(async move {
            let answer = with_retries("shard.locate", || {
                call(addr, &key, "shard.locate", json!({ "addrs": addrs }))
            })
            .await
            .map_err(|e| anyhow!("shard.locate: {e}"))?;
            Ok::<_, anyhow::Error>((k, parse_located(&answer, n)?))
        });
    }
    let mut parts = Vec::new();
    while let Some(joined) = calls.join_next().await {
        parts.push(joined.map_err(|e| anyhow!("a locate task failed: {e}"))??);
    }
    parts.sort_by_key(|(k, _)| *k);
    Ok(parts.into_iter().flat_map(|(_, p)| p).collect())
}

/// The answer of `shard.locate` for `n` addresses.
fn parse_located(answer: &Value, n: usize) -> Result<Vec<Vec<Located>>> {
    let holders: Vec<Located> = answer
        .get("holders")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("shard.locate answered without holders"))?
        .iter()
        .map(|h| {
            let key = h.get("key").and_then(Value::as_str).unwrap_or_default();
            let addr = h.get("addr").and_then(Value::as_str).unwrap_or_default();
            Ok(Located {
                key: PublicKey::from_b64(key).map_err(|e| anyhow!("a holder's key: {e}"))?,
                addr: addr
                    .parse()
                    .map_err(|e| anyhow!("a holder's address {addr:?}: {e}"))?,
            })
        })
        .collect::<Result<_>>()?;
    let ranks = answer
        .get("ranks")
        .and_then(Value::as_array)
        .filter(|r| r.len() == n)
        .ok_or_else(|| anyhow!("shard.locate answered {n} addresses with another count"))?;
    ranks
        .iter()
        .map(|row| {
            row.as_array()
                .ok_or_else(|| anyhow!("a rank row is not a list"))?
                .iter()
                .map(|i| {
                    i.as_u64()
                        .and_then(|i| holders.get(i as usize).copied())
                        .ok_or_else(|| anyhow!("a rank names no holder"))
                })
                .collect()
        })
        .collect()
}

/// A link to one holder that accepted the stream.
struct Open {
    key: PublicKey,
    held: Vec<bool>,
    reader: PeerReader,
    writer: PeerWriter,
}

/// Dial `h`, open `stream` for `addrs` and wait for its `shard.opened`.
async fn open_at(
    h: Located,
    identity: Arc<TlsIdentity>,
    key: Arc<SecretKey>,
    stream: u32,
    addrs: Vec<[u8; 32]>,
) -> Result<Open> {
    let conn = conn::connect_cell(
        h.addr,
        Some(h.key),
        SHARD_TREE.name,
        &identity,
        DIAL_TIMEOUT,
    )
    .await
    .map_err(|e| anyhow!("dialing {}: {e}", h.addr))?;
    let (mut reader, mut writer) = conn.into_split();
    let env = envelope::seal(
        &key,
        "shard.open",
        None,
        borg_net::node::now_ms(),
        open_body(stream, &addrs),
    );
    writer
        .send(&env.to_bytes())
        .await
        .map_err(|e| anyhow!("sending shard.open to {}: {e}", h.addr))?;
    let held = tokio::time::timeout(OPEN_TIMEOUT, async {
        loop {
            let Some(bytes) = reader.recv().await? else {
                return Err(anyhow!("{} closed the link", h.addr));
            };
            if let Ok(Frame::Close(c)) = Frame::decode(&bytes) {
                if c.stream == stream {
                    return Err(anyhow!("{} refused the stream: {:?}", h.addr, c.code));
                }
                continue;
            }
            let Ok(env) = envelope::verify_signature_only(&bytes) else {
                continue;
            };
            if env.from != h.key || env.kind != "shard.opened" {
                continue;
            }
            let (s, held) = wire::parse_opened(&env.body, addrs.len())
                .map_err(|e| anyhow!("{}'s shard.opened: {e}", h.addr))?;
            if s == stream {
                return Ok(held);
            }
        }
    })
    .await
    .map_err(|_| anyhow!("{} did not answer shard.open", h.addr))??;
    Ok(Open {
        key: h.key,
        held,
        reader,
        writer,
    })
}

struct Batch<'a> {
    f: &'a Fetch<'a>,
    identity: Arc<TlsIdentity>,
    /// The chunk indices of this batch.
    chunks: &'a [usize],
}

impl Batch<'_> {
    async fn run(
        &self,
        located: Vec<Vec<Located>>,
        state: &mut GetState,
        progress: &mut Progress,
        out: &mut Streamed,
    ) -> Result<()> {
        let shards = self.f.manifest.shards();
        let stream: u32 = rand::random();
        // Every candidate holder, with the shards of the batch it may hold.
        let mut wanted: HashMap<PublicKey, (Located, Vec<usize>)> = HashMap::new();
        for (pos, cands) in located.iter().enumerate() {
            for c in cands {
                wanted.entry(c.key).or_insert((*c, Vec::new())).1.push(pos);
            }
        }
        let mut opening = JoinSet::new();
        for (h, positions) in wanted.values() {
            let addrs = positions
                .iter()
                .map(|&p| *shards[self.chunks[p]].addr.as_bytes())
                .collect();
            let (h, positions) = (*h, positions.clone());
            let (identity, key) = (self.identity.clone(), self.f.key.clone());
            opening
                .spawn(async move { (open_at(h, identity, key, stream, addrs).await, positions) });
        }
        // Holders that hold something, and for each position of the batch who holds it.
        let mut links: Vec<Open> = Vec::new();
        let mut holders_of: Vec<Vec<usize>> = vec![Vec::new(); self.chunks.len()];
        while let Some(joined) = opening.join_next().await {
            let Ok((Ok(open), positions)) = joined else {
                continue;
            };
            let li = links.len();
            for (j, &p) in positions.iter().enumerate() {
                if open.held.get(j) == Some(&true) {
                    holders_of[p].push(li);
                }
            }
            links.push(open);
        }
        out.holders += links.len();
        // Prefer the best-ranked holder of each shard: `located` is in rank order.
        for (p, hs) in holders_of.iter_mut().enumerate() {
            let rank = |li: &usize| {
                located[p]
                    .iter()
                    .position(|c| c.key == links[*li].key)
                    .unwrap_or(usize::MAX)
            };
            hs.sort_by_key(rank);
        }
        // The plan: the positions some holder has.
        let positions: Vec<usize> = (0..self.chunks.len())
            .filter(|&p| !holders_of[p].is_empty())
            .collect();
        if positions.is_empty() {
            return Ok(());
        }
        let plan = Plan::contiguous(
            [0u8; 32],
            positions.iter().map(|&p| {
                let s = shards[self.chunks[p]];
                (*s.addr.as_bytes(), s.len)
            }),
        )
        .map_err(|e| anyhow!("planning the stream: {e}"))?;
        let keys: Vec<Vec<PublicKey>> = positions
            .iter()
            .map(|&p| holders_of[p].iter().map(|&li| links[li].key).collect())
            .collect();
        let cfg = RecvConfig {
            window_total: WINDOW_TOTAL,
            window_per_holder: WINDOW_PER_HOLDER,
            timeout_ms: WANT_TIMEOUT_MS,
            max_strikes: 2,
        };
        let mut rx = Receiver::new(stream, plan, keys, cfg, None)
            .map_err(|e| anyhow!("starting the stream: {e}"))?;

        // One reader and one writer task per link.
        let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(256);
        let mut writers: HashMap<PublicKey, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut writer_tasks = JoinSet::new();
        let mut link_keys = Vec::new();
        for (li, open) in links.into_iter().enumerate() {
            link_keys.push(open.key);
            let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(WINDOW_PER_HOLDER * 2);
            writers.insert(open.key, wtx);
            let mut writer = open.writer;
            writer_tasks.spawn(async move {
                while let Some(frame) = wrx.recv().await {
                    if writer.send(&frame).await.is_err() {
                        break;
                    }
                }
                let _ = writer.shutdown().await;
            });
            let mut reader = open.reader;
            let tx = ev_tx.clone();
            tasks.spawn(async move {
                while let Ok(Some(bytes)) = reader.recv().await {
                    if tx.send(Event::Frame(li, bytes)).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Event::Gone(li)).await;
            });
        }

        let start = Instant::now();
        let now_ms = || start.elapsed().as_millis() as u64;
        let mut written: Vec<usize> = Vec::new();
        let mut last_save = Instant::now();
        let mut last_event = Instant::now();
        let mut failure: Option<anyhow::Error> = None;
        loop {
            while let Some((to, want)) = rx.poll_request(now_ms()) {
                let frame = Frame::Want(want).encode();
                let sent = writers.get(&to).is_some_and(|w| w.try_send(frame).is_ok());
                if !sent {
                    // Its writer is gone or (cannot be: the window) full: ask elsewhere.
                    rx.handle_close(
                        &to,
                        Close {
                            stream,
                            code: CloseCode::Busy,
                        },
                    );
                }
            }
            if rx.is_done() || (rx.in_flight() == 0 && rx.writing() == 0) {
                break;
            }
            if last_event.elapsed() >= STALL {
                break;
            }
            let wake = rx
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| {
                    Duration::from_millis(t.saturating_sub(now_ms()))
                })
                .min(Duration::from_secs(1));
            let ev = tokio::select! {
                ev = ev_rx.recv() => ev,
                () = tokio::time::sleep(wake) => None,
            };
            let Some(ev) = ev else {
                rx.handle_timeout(now_ms());
                continue;
            };
            last_event = Instant::now();
            match ev {
                Event::Frame(li, bytes) => {
                    let from = link_keys[li];
                    match Frame::decode(&bytes) {
                        Ok(Frame::Shard(shard)) => match rx.handle_shard(now_ms(), &from, shard) {
                            Ok(Some(w)) => {
                                let chunk = self.chunks[positions[w.index]];
                                self.write(chunk, w.index, w.bytes, ev_tx.clone());
                            }
                            Ok(None) => {}
                            Err(e) => tracing::debug!("{e}"),
                        },
                        Ok(Frame::Missing(m)) => rx.handle_missing(now_ms(), &from, m),
                        Ok(Frame::Close(c)) => rx.handle_close(&from, c),
                        // Envelopes (none expected now) and Wants: not for a client.
                        _ => {}
                    }
                }
                Event::Gone(li) => {
                    let code = CloseCode::Busy;
                    rx.handle_close(&link_keys[li], Close { stream, code });
                }
                Event::Written(index, result) => match result {
                    Ok(plain) => {
                        rx.handle_written(index);
                        let p = positions[index];
                        written.push(self.chunks[p]);
                        out.chunks += 1;
                        let copies = holders_of[p].len() as u64;
                        out.min_replicas = Some(out.min_replicas.map_or(copies, |m| m.min(copies)));
                        progress.add(plain);
                        if written.len() >= SAVE_EVERY_CHUNKS || last_save.elapsed() >= SAVE_EVERY {
                            save_progress(&self.f.data, state, &mut written, self.f.state_file)
                                .await?;
                            last_save = Instant::now();
                        }
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                },
            }
        }
        // Say goodbye to each holder (its stream slot frees at once), then stop the tasks.
        for w in writers.values() {
            let _ = w.try_send(
                Frame::Close(Close {
                    stream,
                    code: CloseCode::Done,
                })
                .encode(),
            );
        }
        drop(writers);
        // Writes still running finish (their bytes are kept if they complete).
        while rx.writing() > 0 {
            match tokio::time::timeout(Duration::from_secs(30), ev_rx.recv()).await {
                Ok(Some(Event::Written(index, Ok(_)))) => {
                    rx.handle_written(index);
                    written.push(self.chunks[positions[index]]);
                    out.chunks += 1;
                }
                Ok(Some(Event::Written(index, Err(e)))) => {
                    rx.handle_written(index);
                    failure.get_or_insert(e);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        tasks.abort_all();
        // The writers send their Close and end (the senders are dropped): the holders free
        // the streams now rather than after their idle timeout.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while writer_tasks.join_next().await.is_some() {}
        })
        .await;
        writer_tasks.abort_all();
        save_progress(&self.f.data, state, &mut written, self.f.state_file).await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Decrypt chunk `chunk` (checked against its address already) and write it at its
    /// offset, off the async threads; the result comes back as [`Event::Written`].
    fn write(&self, chunk: usize, index: usize, bytes: Vec<u8>, tx: mpsc::Sender<Event>) {
        let (enc, data) = (self.f.enc.clone(), self.f.data.clone());
        let last = chunk + 1 == self.f.manifest.shards().len();
        tokio::task::spawn_blocking(move || {
            let result = enc
                .decrypt_chunk(chunk as u64, last, &bytes)
                .map_err(|e| {
                    anyhow!("{e}: the shard matches its address, so the file was stored damaged")
                })
                .and_then(|plain| {
                    data.write_all_at(&plain, chunk as u64 * CHUNK as u64)
                        .map_err(|e| anyhow!("writing chunk {chunk}: {e}"))?;
                    Ok(plain.len() as u64)
                });
            let _ = tx.blocking_send(Event::Written(index, result));
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn located_answers_are_checked() {
        let k = SecretKey::generate().public().to_b64();
        let good = json!({"holders": [{"key": k, "addr": "127.0.0.1:13350"}], "ranks": [[0], []]});
        let got = parse_located(&good, 2).unwrap();
        assert_eq!(got[0].len(), 1);
        assert!(got[1].is_empty());
        assert!(parse_located(&good, 3).is_err(), "a count that differs");
        let bad_rank = json!({"holders": [], "ranks": [[0]]});
        assert!(parse_located(&bad_rank, 1).is_err(), "a rank naming nobody");
        let bad_addr = json!({"holders": [{"key": k, "addr": "nowhere"}], "ranks": [[0]]});
        assert!(parse_located(&bad_addr, 1).is_err());
    }
}
