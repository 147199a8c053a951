//! Deterministic simulations of gets: one [`Receiver`], holders each running a [`Sender`] over
//! a `HashMap` source, an in-memory network with seeded random delays (so answers arrive out
//! of order), a virtual clock and a file as a `Vec<u8>`.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::frame::{hex8, Addr, Frame, Shard, Want, MAX_STREAM_FRAME, REQUEST_LEN};
use super::progress::Progress;
use super::recv::{Plan, Receiver, RecvConfig, RecvError, WriteAt};
use super::send::{SendConfig, SendError, Sender, ShardSource};
use crate::identity::{PublicKey, SecretKey};

pub(super) fn key(n: u8) -> PublicKey {
    SecretKey::from_scalar_bytes(&[n; 32])
        .expect("small scalars are valid")
        .public()
}

pub(super) fn addr_of(bytes: &[u8]) -> Addr {
    Sha256::digest(bytes).into()
}

pub(super) struct MapSource {
    pub map: HashMap<Addr, Vec<u8>>,
    pub lookups: Cell<u64>,
}

impl ShardSource for MapSource {
    type Error = String;
    fn get(&self, addr: &Addr) -> Result<Option<Vec<u8>>, String> {
        self.lookups.set(self.lookups.get() + 1);
        Ok(self.map.get(addr).cloned())
    }
}

/// `n` shards of random length 1..3000 with distinct addresses.
pub(super) fn make_shards(seed: u64, n: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let shards: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let len = rng.gen_range(1..3000);
            (0..len).map(|_| rng.gen()).collect()
        })
        .collect();
    let distinct: HashSet<Addr> = shards.iter().map(|s| addr_of(s)).collect();
    assert_eq!(distinct.len(), n);
    shards
}

pub(super) fn plan_of(shards: &[Vec<u8>]) -> Plan {
    let mut id = Sha256::new();
    for s in shards {
        id.update(addr_of(s));
    }
    Plan::contiguous(
        id.finalize().into(),
        shards.iter().map(|s| (addr_of(s), s.len() as u32)),
    )
    .unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Honest,
    /// Never answers anything.
    Dead,
}

struct HolderSim {
    key: PublicKey,
    sender: Sender,
    source: MapSource,
    behaviour: Behaviour,
}

enum Dest {
    Holder(usize),
    Receiver(PublicKey),
}

enum Outcome {
    Done,
    Failed(RecvError),
    Stopped,
}

struct World {
    now: u64,
    rng: StdRng,
    /// (delivery time, send order) -> message: delivery in time order, ties in send order.
    net: BTreeMap<(u64, u64), (Dest, Vec<u8>)>,
    order: u64,
    holders: Vec<HolderSim>,
    file: Vec<u8>,
    writes: Vec<WriteAt>,
    /// Every request the receiver made, in order.
    wants: Vec<(PublicKey, Want)>,
    write_order: Vec<usize>,
    bad: Vec<RecvError>,
    max_total: usize,
    max_per_holder: usize,
}

impl World {
    /// Holders `keys`, each holding every shard of `shards`, stream 1 open on each.
    fn new(seed: u64, shards: &[Vec<u8>], keys: &[PublicKey], file_len: usize) -> Self {
        let holders = keys
            .iter()
            .map(|k| {
                let mut sender = Sender::new(SendConfig::default());
                sender.open(1, 0).unwrap();
                HolderSim {
                    key: *k,
                    sender,
                    source: MapSource {
                        map: shards.iter().map(|s| (addr_of(s), s.clone())).collect(),
                        lookups: Cell::new(0),
                    },
                    behaviour: Behaviour::Honest,
                }
            })
            .collect();
        Self {
            now: 1_000,
            rng: StdRng::seed_from_u64(seed),
            net: BTreeMap::new(),
            order: 0,
            holders,
            file: vec![0; file_len],
            writes: Vec::new(),
            wants: Vec::new(),
            write_order: Vec::new(),
            bad: Vec::new(),
            max_total: 0,
            max_per_holder: 0,
        }
    }

    fn send(&mut self, dest: Dest, bytes: Vec<u8>) {
        let at = self.now + self.rng.gen_range(1..=40);
        self.order += 1;
        self.net.insert((at, self.order), (dest, bytes));
    }

    fn check_window(&mut self, recv: &Receiver, cfg: &RecvConfig) {
        let total = recv.in_flight() + recv.writing();
        assert!(total <= cfg.window_total, "window exceeded: {total}");
        self.max_total = self.max_total.max(total);
        for h in &self.holders {
            let s = recv.holder_stats(&h.key).unwrap();
            assert!(s.in_flight <= s.limit && s.limit <= cfg.window_per_holder);
            self.max_per_holder = self.max_per_holder.max(s.in_flight);
        }
    }

    /// Drive the get until done, failed, or (with `stop_at`) that many shards are written.
    fn run(&mut self, recv: &mut Receiver, cfg: &RecvConfig, stop_at: Option<usize>) -> Outcome {
        for _ in 0..200_000 {
            // The disk: writes handed out in the last step land now, then are confirmed.
            for w in std::mem::take(&mut self.writes) {
                let at = w.offset as usize;
                self.file[at..at + w.bytes.len()].copy_from_slice(&w.bytes);
                assert!(recv.handle_written(w.index));
                self.write_order.push(w.index);
            }
            self.check_window(recv, cfg);
            if stop_at.is_some_and(|n| recv.progress().done_shards >= n) {
                return Outcome::Stopped;
            }
            if recv.is_done() {
                return Outcome::Done;
            }
            if let Some(e) = recv.failed() {
                return Outcome::Failed(e);
            }
            while let Some((to, want)) = recv.poll_request(self.now) {
                self.check_window(recv, cfg);
                self.wants.push((to, want));
                let i = self.holders.iter().position(|h| h.key == to).unwrap();
                self.send(Dest::Holder(i), Frame::Want(want).encode());
            }
            for i in 0..self.holders.len() {
                if self.holders[i].behaviour == Behaviour::Dead {
                    continue;
                }
                let h = &mut self.holders[i];
                let mut out = Vec::new();
                let mut room = MAX_STREAM_FRAME;
                while let Some(bytes) = h.sender.poll_transmit(room, &h.source) {
                    room -= bytes.len();
                    out.push(bytes);
                }
                let from = h.key;
                for bytes in out {
                    self.send(Dest::Receiver(from), bytes);
                }
            }
            let mut next = [self.net.keys().next().map(|(t, _)| *t), recv.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            if self.holders.iter().any(|h| h.sender.has_work()) || !self.writes.is_empty() {
                next = Some(next.map_or(self.now + 1, |t| t.min(self.now + 1)));
            }
            let next = next.expect("the get stalled: nothing in flight and nothing to do");
            self.now = self.now.max(next);
            while let Some(entry) = self.net.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let (dest, bytes) = entry.remove();
                self.deliver(recv, dest, &bytes);
            }
            recv.handle_timeout(self.now);
        }
        panic!("the get did not finish");
    }

    fn deliver(&mut self, recv: &mut Receiver, dest: Dest, bytes: &[u8]) {
        let frame = Frame::decode(bytes).expect("simulated peers send valid frames");
        match dest {
            Dest::Holder(i) => {
                let h = &mut self.holders[i];
                if h.behaviour == Behaviour::Dead {
                    return;
                }
                match frame {
                    Frame::Want(w) => {
                        let _ = h.sender.handle_want(w);
                    }
                    Frame::Close(c) => h.sender.close(c.stream),
                    other => panic!("holder got {other:?}"),
                }
            }
            Dest::Receiver(from) => match frame {
                Frame::Shard(s) => match recv.handle_shard(self.now, &from, s) {
                    Ok(Some(w)) => self.writes.push(w),
                    Ok(None) => {}
                    Err(e) => self.bad.push(e),
                },
                Frame::Missing(m) => recv.handle_missing(self.now, &from, m),
                Frame::Close(c) => recv.handle_close(&from, c),
                Frame::Want(_) => panic!("receiver got a Want"),
            },
        }
    }

    fn wants_to(&self, key: &PublicKey) -> Vec<Want> {
        self.wants
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, w)| *w)
            .collect()
    }
}

fn keys3() -> Vec<PublicKey> {
    vec![key(1), key(2), key(3)]
}

/// Every shard held by all of `keys`, preference order rotated per shard.
fn rotated(keys: &[PublicKey], n: usize) -> Vec<Vec<PublicKey>> {
    (0..n)
        .map(|i| {
            (0..keys.len())
                .map(|j| keys[(i + j) % keys.len()])
                .collect()
        })
        .collect()
}

fn cfg() -> RecvConfig {
    RecvConfig {
        window_total: 8,
        window_per_holder: 4,
        timeout_ms: 1_000,
        max_strikes: 2,
    }
}

fn setup(seed: u64, n: usize) -> (Vec<Vec<u8>>, Plan, World) {
    let shards = make_shards(seed, n);
    let plan = plan_of(&shards);
    let world = World::new(seed, &shards, &keys3(), plan.total_bytes() as usize);
    (shards, plan, world)
}

#[test]
fn get_of_40_shards_from_3_holders_out_of_order() {
    let (shards, plan, mut w) = setup(11, 40);
    let mut recv = Receiver::new(1, plan, rotated(&keys3(), 40), cfg(), None).unwrap();
    assert!(matches!(w.run(&mut recv, &cfg(), None), Outcome::Done));
    assert_eq!(w.file, shards.concat());
    let c = recv.progress();
    assert_eq!((c.done_shards, c.total_shards), (40, 40));
    assert_eq!(
        c.done_bytes,
        shards.iter().map(|s| s.len() as u64).sum::<u64>()
    );
    assert_eq!(recv.stats().requests, 40, "no shard asked twice");
    // Several holders at once, and answers written out of order.
    for k in keys3() {
        assert!(
            recv.holder_stats(&k).unwrap().good >= 5,
            "{k:?} barely used"
        );
    }
    assert!(
        w.write_order.windows(2).any(|p| p[0] > p[1]),
        "arrival was in order"
    );
    assert_eq!(w.max_total, 8, "the window was never full");
}

#[test]
fn window_is_respected_at_all_times() {
    let shards = make_shards(12, 60);
    let plan = plan_of(&shards);
    let mut w = World::new(12, &shards, &keys3(), plan.total_bytes() as usize);
    let cfg = RecvConfig {
        window_total: 5,
        window_per_holder: 2,
        ..cfg()
    };
    let mut recv = Receiver::new(1, plan, rotated(&keys3(), 60), cfg, None).unwrap();
    assert!(matches!(w.run(&mut recv, &cfg, None), Outcome::Done));
    assert_eq!(w.file, shards.concat());
    // check_window asserted the bounds at every step; they were also reached.
    assert_eq!(w.max_total, 5);
    assert_eq!(w.max_per_holder, 2);
}

#[test]
fn a_corrupted_shard_is_refused_and_fetched_from_another_holder() {
    let (shards, plan, mut w) = setup(13, 40);
    let liar = key(1);
    // Holder 1 has wrong bytes under shard 0's address; it is shard 0's first choice, and the
    // first request of the get goes to it.
    let a0 = addr_of(&shards[0]);
    let mut wrong = shards[0].clone();
    wrong[0] ^= 0xff;
    w.holders[0].source.map.insert(a0, wrong);
    let mut recv = Receiver::new(1, plan, rotated(&keys3(), 40), cfg(), None).unwrap();
    assert!(matches!(w.run(&mut recv, &cfg(), None), Outcome::Done));
    assert_eq!(
        w.file,
        shards.concat(),
        "the wrong bytes were never written"
    );
    assert_eq!(recv.stats().bad, 1);
    assert_eq!(recv.holder_stats(&liar).unwrap().bad, 1);
    assert!(matches!(&w.bad[..], [RecvError::BadShard { index: 0, .. }]));
    let asks: Vec<PublicKey> = w
        .wants
        .iter()
        .filter(|(_, want)| want.addr == a0)
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(asks.len(), 2);
    assert_eq!(asks[0], liar);
    assert_ne!(asks[1], liar);
}

#[test]
fn a_holder_that_corrupts_everything_cannot_spoil_the_file() {
    let (shards, plan, mut w) = setup(14, 40);
    for bytes in w.holders[1].source.map.values_mut() {
        bytes[0] ^= 1;
    }
    let liar = key(2);
    let mut recv = Receiver::new(1, plan, rotated(&keys3(), 40), cfg(), None).unwrap();
    assert!(matches!(w.run(&mut recv, &cfg(), None), Outcome::Done));
    assert_eq!(w.file, shards.concat());
    let asked = w.wants_to(&liar);
    assert!(!asked.is_empty());
    assert_eq!(recv.holder_stats(&liar).unwrap().good, 0);
    assert_eq!(recv.stats().bad, asked.len() as u64);
    let distinct: HashSet<Addr> = asked.iter().map(|w| w.addr).collect();
    assert_eq!(
        distinct.len(),
        asked.len(),
        "a liar was asked twice for one shard"
    );
}

#[test]
fn a_dead_holder_times_out_and_the_get_completes_from_the_others() {
    let (shards, plan, mut w) = setup(15, 40);
    let dead = key(3);
    w.holders[2].behaviour = Behaviour::Dead;
    let mut recv = Receiver::new(1, plan, rotated(&keys3(), 40), cfg(), None).unwrap();
    assert!(matches!(w.run(&mut recv, &cfg(), None), Outcome::Done));
    assert_eq!(w.file, shards.concat());
    let asked = w.wants_to(&dead);
    let s = recv.holder_stats(&dead).unwrap();
    assert!(s.timeouts >= 1);
    assert_eq!(s.timeouts as usize, asked.len());
    assert_eq!(
        s.limit, 1,
        "a holder that keeps timing out keeps a window of one"
    );
    assert!(
        asked.len() < 20,
        "the dead holder got {} requests",
        asked.len()
    );
    // Each request that timed out was asked again from someone else next.
    for want in &asked {
        let next = w
            .wants
            .iter()
            .skip_while(|(_, x)| x.seq != want.seq)
            .skip(1)
            .find(|(_, x)| x.addr == want.addr)
            .expect("asked again");
        assert_ne!(next.0, dead);
    }
}

#[test]
fn a_shard_no_holder_has_fails_the_get_and_is_named() {
    let (shards, plan, mut w) = setup(16, 40);
    let a7 = addr_of(&shards[7]);
    for h in &mut w.holders {
        h.source.map.remove(&a7);
    }
    let mut recv = Receiver::new(1, plan, rotated(&keys3(), 40), cfg(), None).unwrap();
    let Outcome::Failed(e) = w.run(&mut recv, &cfg(), None) else {
        panic!("the get cannot complete");
    };
    assert_eq!(
        e,
        RecvError::NoHolder {
            index: 7,
            addr: hex8(&a7)
        }
    );
    assert_eq!(e.code(), "no_holder");
    assert!(e.to_string().contains(&hex8(&a7)));
    // Each holder was asked exactly once for it.
    for k in keys3() {
        assert_eq!(w.wants_to(&k).iter().filter(|x| x.addr == a7).count(), 1);
    }
    assert_eq!(recv.stats().missing, 3);
}

#[test]
fn resume_after_a_restart_asks_only_for_missing_shards() {
    let (shards, plan, mut w) = setup(17, 40);
    let mut recv = Receiver::new(1, plan.clone(), rotated(&keys3(), 40), cfg(), None).unwrap();
    assert!(matches!(
        w.run(&mut recv, &cfg(), Some(20)),
        Outcome::Stopped
    ));
    let record = recv.progress_record().encode();
    let done: HashSet<Addr> = (0..40)
        .filter(|&i| recv.progress_record().is_done(i))
        .map(|i| plan.shards()[i].addr)
        .collect();
    assert!(done.len() >= 20 && done.len() < 40);
    // The restart: the receiver, the links, the holders' queues and everything in flight are
    // gone; the file and the progress record survive.
    let file = std::mem::take(&mut w.file);
    drop(recv);
    let mut w = World::new(18, &shards, &keys3(), 0);
    w.file = file;
    let resumed = Progress::decode(&record).unwrap();
    let mut recv =
        Receiver::new(1, plan.clone(), rotated(&keys3(), 40), cfg(), Some(resumed)).unwrap();
    assert_eq!(recv.progress().done_shards, done.len());
    assert!(matches!(w.run(&mut recv, &cfg(), None), Outcome::Done));
    assert_eq!(w.file, shards.concat());
    for (_, want) in &w.wants {
        assert!(!done.contains(&want.addr), "asked again for a done shard");
    }
    assert_eq!(w.wants.len(), 40 - done.len());

    // A record of another file, or a damaged one, is never trusted.
    let other = Progress::new([0; 32], 40).unwrap();
    assert_eq!(
        Receiver::new(1, plan, rotated(&keys3(), 40), cfg(), Some(other)).unwrap_err(),
        RecvError::ProgressMismatch
    );
    assert!(Progress::decode(&record[..record.len() - 1]).is_err());
}

#[test]
fn unsolicited_duplicate_and_stale_frames_are_never_written() {
    let shards = make_shards(19, 3);
    let plan = plan_of(&shards);
    let (a, stranger) = (key(1), key(9));
    let mut recv = Receiver::new(7, plan, vec![vec![a]; 3], cfg(), None).unwrap();
    let (to, want) = recv.poll_request(0).unwrap();
    assert_eq!(to, a);
    let good = Shard {
        stream: 7,
        seq: want.seq,
        addr: want.addr,
        bytes: shards[0].clone(),
    };
    // From someone it was not asked of.
    assert_eq!(recv.handle_shard(1, &stranger, good.clone()), Ok(None));
    // Another stream, a seq never issued, a shard nobody asked for.
    let other_stream = Shard {
        stream: 8,
        ..good.clone()
    };
    assert_eq!(recv.handle_shard(1, &a, other_stream), Ok(None));
    let future_seq = Shard {
        seq: 1000,
        ..good.clone()
    };
    assert_eq!(recv.handle_shard(1, &a, future_seq), Ok(None));
    assert_eq!(recv.stats().unsolicited, 3);
    assert_eq!(recv.in_flight(), 1, "strangers did not cancel the request");
    // The real answer is written once; the same frame again is stale.
    let w = recv.handle_shard(2, &a, good.clone()).unwrap().unwrap();
    assert_eq!((w.index, w.offset), (0, 0));
    assert_eq!(recv.handle_shard(3, &a, good), Ok(None));
    assert_eq!(recv.stats().stale, 1);
    assert_eq!(recv.writing(), 1);
    assert_eq!(
        recv.progress().done_shards,
        0,
        "not done before the write is confirmed"
    );
    assert!(recv.handle_written(0));
    assert!(!recv.handle_written(0));
    assert!(!recv.handle_written(1), "never handed out");
    assert_eq!(recv.progress().done_shards, 1);
    // A late answer after a timeout is stale too, and the re-request stays outstanding.
    let (_, want1) = recv.poll_request(10).unwrap();
    assert_eq!(recv.handle_timeout(10 + cfg().timeout_ms), 1);
    let (_, again) = recv.poll_request(10 + cfg().timeout_ms).unwrap();
    assert_eq!(again.addr, want1.addr);
    let late = Shard {
        stream: 7,
        seq: want1.seq,
        addr: want1.addr,
        bytes: shards
            .iter()
            .find(|s| addr_of(s) == want1.addr)
            .unwrap()
            .clone(),
    };
    assert_eq!(recv.handle_shard(2000, &a, late), Ok(None));
    assert_eq!(recv.stats().stale, 2);
    assert_eq!(recv.in_flight(), 1);
}

#[test]
fn sender_memory_stays_bounded_under_a_receiver_that_never_reads() {
    let shards = make_shards(20, 64);
    let source = MapSource {
        map: shards.iter().map(|s| (addr_of(s), s.clone())).collect(),
        lookups: Cell::new(0),
    };
    let cfg = SendConfig::default();
    let mut sender = Sender::new(cfg);
    for s in 0..cfg.max_streams_per_peer as u32 {
        sender.open(s, 0).unwrap();
    }
    assert!(matches!(
        sender.open(99, 0),
        Err(SendError::TooManyStreams { .. })
    ));
    assert!(matches!(sender.open(0, 0), Err(SendError::StreamExists(0))));
    let mut other = Sender::new(cfg);
    assert!(
        other.open(0, cfg.max_streams_total).is_err(),
        "node-wide cap"
    );
    let bound = sender.memory_bound();
    assert!(bound < MAX_STREAM_FRAME + 64 * 1024);
    let mut rng = StdRng::seed_from_u64(20);
    let mut refused = 0;
    for seq in 0..10_000u32 {
        let want = Want {
            stream: rng.gen_range(0..6),
            seq,
            addr: addr_of(&shards[rng.gen_range(0..64)]),
        };
        if sender.handle_want(want).is_err() {
            refused += 1;
        }
        // The writer is full: nothing goes out, nothing is looked up.
        assert_eq!(sender.poll_transmit(0, &source), None);
        assert!(sender.memory_bytes() <= bound);
    }
    assert_eq!(source.lookups.get(), 0);
    assert!(refused > 9_000);
    assert_eq!(sender.stats().refused_busy, cfg.max_streams_per_peer as u64);
    // The writer has a little room, not enough for a shard: the Close frames go out, and of
    // a freshly opened stream's full queue exactly one shard is looked up and waits.
    assert_eq!(sender.open_streams(), 0, "every stream was closed busy");
    sender.open(10, 0).unwrap();
    for seq in 0..cfg.max_queue as u32 {
        let addr = addr_of(&shards[seq as usize]);
        sender
            .handle_want(Want {
                stream: 10,
                seq,
                addr,
            })
            .unwrap();
    }
    let mut closes = 0;
    for _ in 0..100 {
        if let Some(f) = sender.poll_transmit(REQUEST_LEN, &source) {
            assert!(matches!(Frame::decode(&f).unwrap(), Frame::Close(_)));
            closes += 1;
        }
        assert!(sender.memory_bytes() <= bound);
    }
    assert!(closes >= cfg.max_streams_per_peer);
    assert_eq!(source.lookups.get(), 1);
    assert!(
        sender.memory_bytes() > shards[0].len(),
        "the looked-up shard waits"
    );
}

#[test]
fn a_slow_writer_slows_the_sender() {
    let shards = make_shards(21, 16);
    let source = MapSource {
        map: shards.iter().map(|s| (addr_of(s), s.clone())).collect(),
        lookups: Cell::new(0),
    };
    let mut sender = Sender::new(SendConfig::default());
    sender.open(1, 0).unwrap();
    for (seq, s) in shards.iter().enumerate() {
        let want = Want {
            stream: 1,
            seq: seq as u32,
            addr: addr_of(s),
        };
        sender.handle_want(want).unwrap();
    }
    // One frame's worth of room per tick: exactly one frame per tick, in request order.
    let mut sent = Vec::new();
    for shard in &shards {
        let room = shard.len() + super::frame::SHARD_HEADER_LEN;
        assert_eq!(
            sender.poll_transmit(room - 1, &source),
            None,
            "does not fit yet"
        );
        let f = sender
            .poll_transmit(room, &source)
            .expect("room for this shard");
        assert_eq!(sender.poll_transmit(0, &source), None);
        sent.push(f);
    }
    assert!(!sender.has_work());
    for (i, f) in sent.iter().enumerate() {
        let Frame::Shard(s) = Frame::decode(f).unwrap() else {
            panic!("not a shard");
        };
        assert_eq!((s.seq as usize, &s.bytes), (i, &shards[i]));
    }
    assert_eq!(source.lookups.get(), 16);
}
