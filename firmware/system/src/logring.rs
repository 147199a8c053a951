//! PID 1's log path: an in-memory ring of the last log lines (the console's `log` command)
//! and a console writer that never blocks the thread that logs.
//!
//! Under PID 1 stderr is a 115200-baud serial console (about 11.5 KB/s). A thread that
//! writes there directly blocks in write(2) once the UART buffer is full; if that thread is a
//! cell's log forwarder, the cell's stderr pipe fills next and the cell itself blocks. So
//! [`TeeWriter`] only copies a line into a bounded queue; one writer thread drains it to
//! stderr, and a line that does not fit is dropped and counted ([`dropped`]). Cell output is
//! read by [`forward_cell_output`] with a per-line and a per-second bound.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines kept.
pub const CAPACITY: usize = 400;

/// Longest line kept in the ring or queued for the console; longer lines are cut. One screen
/// line of a serial console is 80 columns; 2 KiB keeps a whole structured log event readable
/// while a cell that writes one endless line cannot grow PID 1's memory.
pub const MAX_LINE_BYTES: usize = 2048;

/// Bytes waiting for the console at most. At 115200 baud this is about 6 s of output: enough
/// to ride out a burst (boot, a cell restart), small enough that a flood costs PID 1 at most
/// this much memory; beyond it lines are dropped and counted.
pub const CONSOLE_QUEUE_BYTES: usize = 64 * 1024;

/// Queued writes at most (a second bound, so many tiny writes cannot make the channel large).
pub const CONSOLE_QUEUE_WRITES: usize = 1024;

/// Lines per second one cell may put into PID 1's log (burst allowance the same). A healthy
/// cell logs a few lines per event; more than this is a flood, and forwarding it would only
/// push every other line out of the 400-line ring and the console.
pub const CELL_LINES_PER_SEC: u32 = 100;

/// How long the forwarder waits between "lines dropped" notes for one cell, so the notes
/// themselves cannot become a flood.
pub const DROP_NOTE_EVERY: Duration = Duration::from_secs(5);

/// Read size of the cell output forwarder.
const READ_CHUNK: usize = 8192;

static DROPPED_CONSOLE: AtomicU64 = AtomicU64::new(0);
static DROPPED_RATE: AtomicU64 = AtomicU64::new(0);
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Log lines PID 1 dropped instead of blocking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Writes dropped because the console was slower than the log (queue full).
    pub console: u64,
    /// Cell lines dropped because the cell wrote more than [`CELL_LINES_PER_SEC`].
    pub rate: u64,
}

/// The drop counters so far.
pub fn dropped() -> Dropped {
    Dropped {
        console: DROPPED_CONSOLE.load(Ordering::Relaxed),
        rate: DROPPED_RATE.load(Ordering::Relaxed),
    }
}

struct Ring {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

fn ring() -> &'static Mutex<Ring> {
    static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
    RING.get_or_init(|| {
        Mutex::new(Ring {
            lines: VecDeque::with_capacity(CAPACITY),
            partial: Vec::new(),
        })
    })
}

/// Append raw log output (split into lines; ANSI colour codes are kept out by the writer).
pub fn push_bytes(buf: &[u8]) {
    let mut r = match ring().lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    for &b in buf {
        if b == b'\n' {
            let line = String::from_utf8_lossy(&r.partial).into_owned();
            r.partial.clear();
            if r.lines.len() == CAPACITY {
                r.lines.pop_front();
            }
            r.lines.push_back(line);
        } else if r.partial.len() < MAX_LINE_BYTES {
            r.partial.push(b);
        }
    }
}

/// The last `n` complete lines, oldest first.
pub fn tail(n: usize) -> Vec<String> {
    let r = match ring().lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    let skip = r.lines.len().saturating_sub(n);
    r.lines.iter().skip(skip).cloned().collect()
}

/// A bounded queue in front of a sink that may be slow: `offer` never blocks.
pub struct Queue {
    tx: SyncSender<Vec<u8>>,
    queued: &'static AtomicUsize,
    limit: usize,
    dropped: &'static AtomicU64,
}

impl Queue {
    /// Queue `buf` unless that would exceed the byte bound; returns false (and counts) if
    /// dropped.
    pub fn offer(&self, buf: &[u8]) -> bool {
        let len = buf.len().min(MAX_LINE_BYTES);
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before + len > self.limit {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut v = buf[..len].to_vec();
        if len < buf.len() {
            // Cut lines still end the line on the console.
            if let Some(last) = v.last_mut() {
                *last = b'\n';
            }
        }
        match self.tx.try_send(v) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(len, Ordering::AcqRel);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Start the thread that drains a queue into `sink` (blocking there is fine: it is the only
/// thread that waits for the console). Returns the queue.
fn start_drain(
    mut sink: impl Write + Send + 'static,
    queued: &'static AtomicUsize,
    limit: usize,
    dropped: &'static AtomicU64,
) -> Queue {
    let (tx, rx): (SyncSender<Vec<u8>>, Receiver<Vec<u8>>) = sync_channel(CONSOLE_QUEUE_WRITES);
    let spawned = std::thread::Builder::new()
        .name("log-console".into())
        .spawn(move || {
            let mut reported = 0u64;
            for buf in rx {
                queued.fetch_sub(buf.len(), Ordering::AcqRel);
                // A console that went away must never stop logging or PID 1.
                let _ = sink.write_all(&buf);
                let now = dropped.load(Ordering::Relaxed);
                if now != reported && queued.load(Ordering::Acquire) == 0 {
                    let _ = writeln!(
                        sink,
                        "borg: console too slow: {} log lines dropped so far",
                        now
                    );
                    reported = now;
                }
                let _ = sink.flush();
            }
        });
    if spawned.is_err() {
        // No writer thread: the receiver is gone, so every offer is dropped and counted.
        // Logging still reaches the ring, and nothing blocks.
    }
    Queue {
        tx,
        queued,
        limit,
        dropped,
    }
}

fn console_queue() -> &'static Queue {
    static Q: OnceLock<Queue> = OnceLock::new();
    Q.get_or_init(|| {
        start_drain(
            std::io::stderr(),
            &QUEUED_BYTES,
            CONSOLE_QUEUE_BYTES,
            &DROPPED_CONSOLE,
        )
    })
}

/// A writer that copies everything to the ring and, through the bounded queue, to stderr (the
/// console under PID 1). It never blocks on the console.
#[derive(Debug, Default, Clone, Copy)]
pub struct TeeWriter;

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        push_bytes(buf);
        console_queue().offer(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A token bucket: `rate` tokens per second, at most `rate` saved up.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: u32,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(rate: u32, now: Instant) -> Self {
        RateLimit {
            rate,
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Take one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * f64::from(self.rate)).min(f64::from(self.rate));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`] (the rest of a longer line
/// is discarded up to its newline), so memory per stream is bounded whatever the cell writes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    line: Vec<u8>,
    cut: bool,
}

impl LineSplitter {
    /// Feed bytes; `emit(line, was_cut)` is called for every complete line.
    pub fn feed(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        for &b in bytes {
            if b == b'\n' {
                emit(&self.line, self.cut);
                self.line.clear();
                self.cut = false;
            } else if self.line.len() < MAX_LINE_BYTES {
                self.line.push(b);
            } else {
                self.cut = true;
            }
        }
    }

    /// The stream ended: emit what is left.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8], bool)) {
        if !self.line.is_empty() {
            emit(&self.line, self.cut);
            self.line.clear();
        }
    }
}

/// Read a cell's stdout or stderr until it closes and log each line as `[name] line`. The
/// read side never waits for the console (see [`TeeWriter`]), so the cell's pipe keeps
/// draining; a cell writing more than [`CELL_LINES_PER_SEC`] has the excess dropped and
/// counted here, with a note at most every [`DROP_NOTE_EVERY`].
pub fn forward_cell_output(name: &str, mut stream: impl Read) {
    let mut split = LineSplitter::default();
    let mut limit = RateLimit::new(CELL_LINES_PER_SEC, Instant::now());
    let mut dropped_here = 0u64;
    let mut noted_at: Option<Instant> = None;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut emit = |line: &[u8], cut: bool| {
        let now = Instant::now();
        if !limit.allow(now) {
            dropped_here += 1;
            DROPPED_RATE.fetch_add(1, Ordering::Relaxed);
            if noted_at.is_none_or(|t| now.saturating_duration_since(t) >= DROP_NOTE_EVERY) {
                noted_at = Some(now);
                tracing::warn!(target: "cell", "[{name}] writes too fast: {dropped_here} lines dropped");
            }
            return;
        }
        let text = String::from_utf8_lossy(line);
        let more = if cut { " [cut]" } else { "" };
        tracing::info!(target: "cell", "[{name}] {}{more}", text.trim_end());
    };
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => split.feed(&buf[..n], &mut emit),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    split.finish(&mut emit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_complete_lines() {
        push_bytes(b"logring-test one\nlogring-test tw");
        push_bytes(b"o\n");
        let t: Vec<String> = tail(CAPACITY)
            .into_iter()
            .filter(|l| l.starts_with("logring-test"))
            .collect();
        assert_eq!(t, vec!["logring-test one", "logring-test two"]);
    }

    /// A sink that blocks until the test lets it go, like a full serial console.
    struct Stuck(std::sync::mpsc::Receiver<()>);
    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_console_drops_and_counts_instead_of_blocking() {
        static Q: AtomicUsize = AtomicUsize::new(0);
        static D: AtomicU64 = AtomicU64::new(0);
        let (release, rx) = std::sync::mpsc::channel();
        let q = start_drain(Stuck(rx), &Q, 1000, &D);
        let line = [b'x'; 100];
        let start = Instant::now();
        let mut taken = 0;
        for _ in 0..10_000 {
            if q.offer(&line) {
                taken += 1;
            }
        }
        // 10,000 offers against a console that takes nothing return at once ...
        assert!(start.elapsed() < Duration::from_secs(5));
        // ... with at most the byte bound queued (plus the one write the sink is stuck in).
        assert!(taken <= 11, "{taken}");
        assert_eq!(D.load(Ordering::Relaxed), 10_000 - taken);
        assert!(Q.load(Ordering::Relaxed) <= 1000);
        drop(release);
    }

    #[test]
    fn long_lines_are_cut_and_bounded() {
        let mut s = LineSplitter::default();
        let mut out = vec![];
        let big = vec![b'a'; MAX_LINE_BYTES * 3];
        s.feed(&big, |l, c| out.push((l.len(), c)));
        s.feed(b"\nshort\n", |l, c| out.push((l.len(), c)));
        s.feed(b"tail", |l, c| out.push((l.len(), c)));
        s.finish(|l, c| out.push((l.len(), c)));
        assert_eq!(out, vec![(MAX_LINE_BYTES, true), (5, false), (4, false)]);
    }

    #[test]
    fn rate_limit_allows_the_rate_and_no_more() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, t0);
        let burst = (0..100).filter(|_| r.allow(t0)).count();
        assert_eq!(burst, 10);
        let later = t0 + Duration::from_millis(500);
        let refill = (0..100).filter(|_| r.allow(later)).count();
        assert_eq!(refill, 5);
    }
}
