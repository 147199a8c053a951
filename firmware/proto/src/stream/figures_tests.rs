//! Figures for docs/BENCHMARKS.md (ignored; run in release):
//! `cargo test --release -p borg-proto --lib stream::figures -- --ignored --nocapture`

use std::time::Instant;

use super::frame::{Frame, Shard, Want, MAX_SHARD_LEN};
use super::recv::{Receiver, RecvConfig};
use super::sim_tests::{addr_of, key, plan_of};

fn per_second(n: u64, f: impl FnMut(u64)) -> f64 {
    let mut f = f;
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    n as f64 / t.elapsed().as_secs_f64()
}

#[test]
#[ignore = "figures; run in release with --ignored --nocapture"]
fn stream_figures() {
    let want_rate = per_second(2_000_000, |i| {
        let enc = Frame::Want(Want {
            stream: 1,
            seq: i as u32,
            addr: [7; 32],
        })
        .encode();
        std::hint::black_box(Frame::decode(std::hint::black_box(&enc)).unwrap());
    });
    let bytes = vec![0x5a; MAX_SHARD_LEN];
    let shard_rate = per_second(5_000, |i| {
        let enc = Frame::Shard(Shard {
            stream: 1,
            seq: i as u32,
            addr: [7; 32],
            bytes: bytes.clone(),
        })
        .encode();
        std::hint::black_box(Frame::decode(std::hint::black_box(&enc)).unwrap());
    });
    println!("want frames encoded+decoded: {want_rate:.0}/s");
    println!(
        "256 KiB shard frames encoded+decoded: {shard_rate:.0}/s ({:.0} MiB/s; includes the copy of the bytes into the frame)",
        shard_rate / 4.0
    );

    // Receiver bookkeeping: 100,000 shards of 8 bytes (so SHA-256 costs little), 3 holders,
    // every request answered at once and every write confirmed at once.
    let n = 100_000usize;
    let shards: Vec<Vec<u8>> = (0..n as u64).map(|i| i.to_be_bytes().to_vec()).collect();
    let plan = plan_of(&shards);
    let keys = [key(1), key(2), key(3)];
    let holders = (0..n)
        .map(|i| (0..3).map(|j| keys[(i + j) % 3]).collect())
        .collect();
    let cfg = RecvConfig {
        window_total: 64,
        window_per_holder: 32,
        ..RecvConfig::default()
    };
    let mut recv = Receiver::new(1, plan, holders, cfg, None).unwrap();
    let t = Instant::now();
    let mut batch = Vec::with_capacity(64);
    while !recv.is_done() {
        while let Some(req) = recv.poll_request(0) {
            batch.push(req);
        }
        for (from, want) in batch.drain(..) {
            let bytes = shards[(want.seq as usize).min(n - 1)].clone();
            // seq == index here: every request is the first for its shard, in order.
            debug_assert_eq!(addr_of(&bytes), want.addr);
            let w = recv
                .handle_shard(
                    0,
                    &from,
                    Shard {
                        stream: 1,
                        seq: want.seq,
                        addr: want.addr,
                        bytes,
                    },
                )
                .unwrap()
                .unwrap();
            recv.handle_written(w.index);
        }
    }
    let per_shard = t.elapsed().as_nanos() as f64 / n as f64;
    let hash = {
        let t = Instant::now();
        for s in &shards {
            std::hint::black_box(addr_of(s));
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    println!(
        "receiver per shard (poll_request + handle_shard + handle_written, 8-byte shards): {per_shard:.0} ns, of which SHA-256 of 8 bytes {hash:.0} ns"
    );
    assert_eq!(recv.stats().requests, n as u64);
}
