//! Crash safety for real: a writer process stores random shards in a loop and is killed with
//! SIGKILL at a random moment, twenty times over the same database file. Every shard the
//! writer reported stored (it reports only after `put` returned) must read back and verify,
//! every delete it reported finished must have stuck, whatever was in flight at the kill must
//! be either fully there or not at all, and the byte counter must match the shards.
//!
//! The writer is this test binary run again (`current_exe() --exact <test>`) with
//! [`ROLE_ENV`] set, the same trick as `InNs` in tests/src/netns.rs.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use borg_store::{Address, RedbStore, ShardStore, MAX_SHARD_BYTES};
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};

const TEST_NAME: &str = "kill_9_during_writes_loses_no_reported_shard";
const ROLE_ENV: &str = "BORG_STORE_CRASH_ROLE";
const DB_ENV: &str = "BORG_STORE_CRASH_DB";
const SEED_ENV: &str = "BORG_STORE_CRASH_SEED";
/// Lines of the writer start with this, so they stand out of libtest's own output.
const MARK: &str = "@@ ";
const ROUNDS: usize = 20;
/// The writer deletes instead of storing once the store holds this much, to bound the file.
const WRITER_SOFT_CAP: u64 = 24 * 1024 * 1024;
/// A writer that was never killed stops by itself after this (a lost parent).
const WRITER_LIFETIME: Duration = Duration::from_secs(30);

#[test]
fn kill_9_during_writes_loses_no_reported_shard() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("writer") => writer(),
        Ok(other) => panic!("unknown role {other:?}"),
        Err(_) => parent(),
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // One write per line, so a kill leaves at most one unfinished line, which has no newline.
    out.write_all(format!("{MARK}{line}\n").as_bytes()).unwrap();
    out.flush().unwrap();
}

/// The writer role: store random shards (and now and then delete one) until killed, saying
/// each address only after the call returned.
fn writer() {
    let path = std::env::var(DB_ENV).unwrap();
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let store = RedbStore::open(&path, u64::MAX).unwrap();
    let mut present = store.addresses().unwrap();
    say("ready");
    let until = Instant::now() + WRITER_LIFETIME;
    while Instant::now() < until {
        let full = store.usage().unwrap().bytes > WRITER_SOFT_CAP;
        if !present.is_empty() && (full || rng.gen_ratio(1, 5)) {
            let addr = present.swap_remove(rng.gen_range(0..present.len()));
            say(&format!("deleting {addr}"));
            store.delete(&addr).unwrap();
            say(&format!("deleted {addr}"));
        } else {
            let mut shard = vec![0u8; rng.gen_range(0..=MAX_SHARD_BYTES)];
            rng.fill_bytes(&mut shard);
            let addr = store.put(&shard).unwrap();
            present.push(addr);
            say(&format!("stored {addr} {}", shard.len()));
        }
    }
    say("lifetime over");
}

/// A running writer and the complete lines it printed.
struct Writer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Writer {
    fn start(path: &Path, seed: u64) -> Writer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(ROLE_ENV, "writer")
            .env(DB_ENV, path)
            .env(SEED_ENV, seed.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                // A line cut by the kill has no newline: it was never fully said.
                if buf.last() != Some(&b'\n') {
                    break;
                }
                let line = String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned();
                // libtest may print "test name ... " on the same line before the writer's text.
                if let Some(i) = line.find(MARK) {
                    if tx.send(line[i + MARK.len()..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Writer { child, lines }
    }

    fn died(&mut self) -> String {
        format!("{:?}", self.child.try_wait())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the parent knows the store must hold.
#[derive(Default)]
struct Model {
    /// Reported stored (or found intact after a crash): must be there, with this length.
    present: BTreeMap<Address, usize>,
    /// Reported deleted: must not be there.
    gone: BTreeSet<Address>,
    /// Delete started but not reported finished: either way is right.
    unsure: BTreeSet<Address>,
}

#[derive(Default)]
struct Tally {
    puts: usize,
    deletes: usize,
    in_flight_found: usize,
}

impl Model {
    fn apply(&mut self, line: &str, tally: &mut Tally) {
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("stored"), Some(addr), Some(len)) => {
                let addr: Address = addr.parse().unwrap();
                self.present.insert(addr, len.parse().unwrap());
                self.gone.remove(&addr);
                tally.puts += 1;
            }
            (Some("deleting"), Some(addr), None) => {
                let addr: Address = addr.parse().unwrap();
                self.present.remove(&addr);
                self.unsure.insert(addr);
            }
            (Some("deleted"), Some(addr), None) => {
                let addr: Address = addr.parse().unwrap();
                self.unsure.remove(&addr);
                self.gone.insert(addr);
                tally.deletes += 1;
            }
            _ => panic!("writer said {line:?}"),
        }
    }

    /// Reopen the store and check it against the model; then take in what the crash decided
    /// (a put or delete in flight), so the model is exact for the next round.
    fn check(&mut self, path: &Path, round: usize, tally: &mut Tally) {
        let store = RedbStore::open(path, u64::MAX)
            .unwrap_or_else(|e| panic!("round {round}: reopen after kill -9: {e}"));
        let addrs = store.addresses().unwrap();
        let mut bytes = 0u64;
        for addr in &addrs {
            // get re-hashes: Ok(Some) means the bytes are exactly the shard's.
            match store.get(addr) {
                Ok(Some(b)) => bytes += b.len() as u64,
                other => panic!("round {round}: shard {addr} after kill -9: {other:?}"),
            }
        }
        let usage = store.usage().unwrap();
        assert_eq!(usage.shards, addrs.len() as u64, "round {round}");
        assert_eq!(usage.bytes, bytes, "round {round}: byte counter");

        let stored: BTreeSet<Address> = addrs.iter().copied().collect();
        for (addr, len) in &self.present {
            assert!(
                stored.contains(addr),
                "round {round}: reported shard {addr} lost"
            );
            assert_eq!(
                store.get(addr).unwrap().map(|b| b.len()),
                Some(*len),
                "round {round}"
            );
        }
        for addr in &self.gone {
            assert!(
                !stored.contains(addr),
                "round {round}: deleted {addr} is back"
            );
        }
        // What is stored but not known: a put that committed before its line was printed, or
        // a delete that did not commit. The writer does one thing at a time, so at most one.
        let extra: Vec<Address> = stored
            .iter()
            .filter(|a| !self.present.contains_key(a))
            .copied()
            .collect();
        assert!(
            extra.len() <= 1,
            "round {round}: unexpected shards {extra:?}"
        );
        for addr in extra {
            let len = store.get(&addr).unwrap().unwrap().len();
            if !self.unsure.contains(&addr) {
                tally.in_flight_found += 1;
            }
            self.present.insert(addr, len);
        }
        self.gone
            .extend(self.unsure.iter().filter(|a| !stored.contains(a)));
        self.unsure.clear();
    }
}

fn parent() {
    let seed: u64 = match std::env::var(SEED_ENV) {
        Ok(s) => s.parse().unwrap(),
        Err(_) => rand::random(),
    };
    eprintln!("crash test seed {seed} (set {SEED_ENV} to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shards.redb");
    let mut model = Model::default();
    let mut tally = Tally::default();
    let started = Instant::now();

    for round in 0..ROUNDS {
        let mut w = Writer::start(&path, rng.gen());
        match w.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line == "ready" => {}
            other => panic!("round {round}: writer not ready: {other:?} ({})", w.died()),
        }
        let kill_at = Instant::now() + Duration::from_millis(rng.gen_range(10..=300));
        loop {
            let left = kill_at.saturating_duration_since(Instant::now());
            match w.lines.recv_timeout(left) {
                Ok(line) => model.apply(&line, &mut tally),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("round {round}: writer died before the kill: {}", w.died())
                }
            }
        }
        w.child.kill().unwrap();
        let status = w.child.wait().unwrap();
        assert!(!status.success(), "round {round}: writer was not killed");
        // The lines it completed before dying are still in the pipe.
        let drain_until = Instant::now() + Duration::from_secs(10);
        loop {
            let left = drain_until.saturating_duration_since(Instant::now());
            match w.lines.recv_timeout(left) {
                Ok(line) => model.apply(&line, &mut tally),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("round {round}: writer's output not closed")
                }
            }
        }
        drop(w);
        model.check(&path, round, &mut tally);
    }

    let store = RedbStore::open(&path, u64::MAX).unwrap();
    let report = store.scrub().unwrap();
    assert!(
        report.corrupt.is_empty(),
        "scrub found {:?}",
        report.corrupt
    );
    assert_eq!(report.checked, model.present.len() as u64);
    assert!(
        tally.puts > 0,
        "the writer never stored anything before being killed"
    );
    eprintln!(
        "{ROUNDS} kills in {:.1} s: {} puts and {} deletes reported, {} unreported puts found \
         committed, {} shards ({} bytes) at the end, scrub clean",
        started.elapsed().as_secs_f64(),
        tally.puts,
        tally.deletes,
        tally.in_flight_found,
        report.checked,
        store.usage().unwrap().bytes
    );
}
