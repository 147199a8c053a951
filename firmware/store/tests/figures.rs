//! Figures of the shard store for docs/BENCHMARKS.md, not a timed test (ignored by default):
//!
//! ```sh
//! cargo test -p borg-store --release --test figures -- --ignored --nocapture
//! ```
//!
//! Small shards (4 KiB, the issue's "small files") and full ones (256 KiB) into a `RedbStore`
//! on the temp dir's disk: puts and gets per second, MB/s, the file's size against the bytes
//! stored, a scrub of everything, and this process's resident memory holding 10,000 shards.
//! Every put is durable (two fsyncs), so puts measure the disk's sync latency more than redb.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use borg_store::{Address, RedbStore, ShardStore};
use rand::{rngs::StdRng, RngCore, SeedableRng};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Put `n` random shards of `len` bytes; (addresses, seconds).
fn put_many(store: &RedbStore, rng: &mut StdRng, n: usize, len: usize) -> (Vec<Address>, f64) {
    let mut buf = vec![0u8; len];
    let t = Instant::now();
    let addrs = (0..n)
        .map(|_| {
            rng.fill_bytes(&mut buf);
            store.put(&buf).unwrap()
        })
        .collect();
    (addrs, t.elapsed().as_secs_f64())
}

fn get_all(store: &RedbStore, addrs: &[Address]) -> f64 {
    let t = Instant::now();
    for a in addrs {
        assert!(store.get(a).unwrap().is_some());
    }
    t.elapsed().as_secs_f64()
}

#[test]
#[ignore = "figures for docs/BENCHMARKS.md (run with --release)"]
fn store_figures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shards.redb");
    let store = RedbStore::open(&path, u64::MAX).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let rss0 = rss_kib();

    let (small, put_s) = put_many(&store, &mut rng, 10_000, 4096);
    let get_s = get_all(&store, &small);
    let rss_small = rss_kib();
    println!(
        "4 KiB shards: {} puts in {put_s:.1} s ({:.0}/s, each durable), {} gets in {get_s:.2} s \
         ({:.0}/s, each re-hashed); RSS {rss0} -> {rss_small} KiB holding 10,000",
        small.len(),
        small.len() as f64 / put_s,
        small.len(),
        small.len() as f64 / get_s
    );

    let (big, put_s) = put_many(&store, &mut rng, 200, 256 * 1024);
    let get_s = get_all(&store, &big);
    let mb = 200.0 * 256.0 / 1024.0;
    println!(
        "256 KiB shards: 200 puts {:.1} MB/s, 200 gets {:.1} MB/s; RSS {} KiB",
        mb / put_s,
        mb / get_s,
        rss_kib()
    );

    let usage = store.usage().unwrap();
    let file = std::fs::metadata(&path).unwrap().len();
    let t = Instant::now();
    let report = store.scrub().unwrap();
    let scrub_s = t.elapsed().as_secs_f64();
    assert!(report.corrupt.is_empty());
    println!(
        "stored {} shards, {:.1} MB of shard bytes in a {:.1} MB file ({:.2}x); scrub of all \
         in {scrub_s:.2} s ({:.0} MB/s)",
        usage.shards,
        usage.bytes as f64 / 1e6,
        file as f64 / 1e6,
        file as f64 / usage.bytes as f64,
        usage.bytes as f64 / 1e6 / scrub_s
    );
}
