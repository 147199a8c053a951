//! The sender: the holder's side of the streams on one link.
//!
//! Streams are opened by a signed `stream.open` envelope (the IO layer checks it and calls
//! [`Sender::open`]). Each `Want` joins its stream's queue; [`Sender::poll_transmit`] serves
//! the queues round-robin, one frame at a time, and only when the link's writer has room for
//! it. A shard is looked up in the [`ShardSource`] only when it is about to be sent, so a slow
//! receiver (a full writer) slows the sender and memory stays bounded:
//!
//! - per stream at most `max_queue` Wants (43 bytes each on the wire, a few dozen in memory);
//!   one more is a misbehaving receiver (its window is `max_queue`): the stream is closed with
//!   `Close busy` and its queue dropped;
//! - at most `max_streams_per_peer` streams on a link, and the caller's node-wide count is
//!   checked against `max_streams_total` at open;
//! - at most one shard frame looked up and waiting for room ([`MAX_STREAM_FRAME`] bytes), and
//!   a bounded queue of control frames (`Close`).
//!
//! [`Sender::memory_bytes`] reports the current footprint; it never exceeds
//! [`Sender::memory_bound`].

use std::collections::{HashMap, VecDeque};

use super::frame::{
    Addr, Close, CloseCode, Frame, Missing, Shard, Want, CLOSE_LEN, MAX_SHARD_LEN, MAX_STREAM_FRAME,
};

/// Control frames (`Close`) waiting at most; more are dropped and counted.
pub const MAX_CONTROL_QUEUE: usize = 16;

/// Where the holder's shards come from (the shard store, in the node).
pub trait ShardSource {
    type Error: std::fmt::Display;
    /// The shard's bytes, `Ok(None)` if not held.
    fn get(&self, addr: &Addr) -> Result<Option<Vec<u8>>, Self::Error>;
}

/// Errors of the sender side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("stream {0} is already open on this link")]
    StreamExists(u32),
    #[error("too many streams (limit {limit})")]
    TooManyStreams { limit: usize },
    #[error("stream {0} is not open on this link")]
    UnknownStream(u32),
    #[error("stream {stream}: more than {limit} requests queued; stream closed")]
    QueueFull { stream: u32, limit: usize },
}

impl SendError {
    pub fn code(&self) -> &'static str {
        match self {
            SendError::StreamExists(_) => "malformed",
            SendError::TooManyStreams { .. } | SendError::QueueFull { .. } => "busy",
            SendError::UnknownStream(_) => "unknown_stream",
        }
    }
}

/// Bounds of the sender side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendConfig {
    /// Wants queued per stream (the receiver's window as announced in `stream.open`).
    pub max_queue: usize,
    pub max_streams_per_peer: usize,
    pub max_streams_total: usize,
}

impl Default for SendConfig {
    fn default() -> Self {
        Self {
            max_queue: 16,
            max_streams_per_peer: 4,
            max_streams_total: 64,
        }
    }
}

/// Counters of one link's sender.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendStats {
    pub shards_sent: u64,
    pub shard_bytes_sent: u64,
    pub missing_sent: u64,
    pub source_errors: u64,
    pub refused_busy: u64,
    pub unknown_stream: u64,
    pub control_dropped: u64,
    /// Shard lookups made (never more than frames produced).
    pub lookups: u64,
}

/// The holder's side of one link. See the module docs.
#[derive(Debug)]
pub struct Sender {
    cfg: SendConfig,
    queues: HashMap<u32, VecDeque<Want>>,
    /// Streams with queued Wants, in serving order (each at most once).
    ready: VecDeque<u32>,
    staged: Option<Vec<u8>>,
    control: VecDeque<Vec<u8>>,
    stats: SendStats,
}

impl Sender {
    pub fn new(cfg: SendConfig) -> Self {
        Self {
            cfg,
            queues: HashMap::new(),
            ready: VecDeque::new(),
            staged: None,
            control: VecDeque::new(),
            stats: SendStats::default(),
        }
    }

    /// Open `stream` after its `stream.open` envelope verified. `open_total` is the number of
    /// streams open on the whole node right now (all links).
    pub fn open(&mut self, stream: u32, open_total: usize) -> Result<(), SendError> {
        if self.queues.contains_key(&stream) {
            return Err(SendError::StreamExists(stream));
        }
        if self.queues.len() >= self.cfg.max_streams_per_peer {
            return Err(SendError::TooManyStreams {
                limit: self.cfg.max_streams_per_peer,
            });
        }
        if open_total >= self.cfg.max_streams_total {
            return Err(SendError::TooManyStreams {
                limit: self.cfg.max_streams_total,
            });
        }
        self.queues.insert(stream, VecDeque::new());
        Ok(())
    }

    /// Streams open on this link.
    pub fn open_streams(&self) -> usize {
        self.queues.len()
    }

    /// The receiver closed `stream` (or the open failed later): drop its queue.
    pub fn close(&mut self, stream: u32) {
        self.queues.remove(&stream);
        self.ready.retain(|s| *s != stream);
    }

    /// A `Want` from the peer. Refused (and answered with a `Close`) for a stream that is not
    /// open, or when the stream's queue is full (the stream is closed then).
    pub fn handle_want(&mut self, want: Want) -> Result<(), SendError> {
        let Some(queue) = self.queues.get_mut(&want.stream) else {
            self.stats.unknown_stream += 1;
            self.push_control(want.stream, CloseCode::UnknownStream);
            return Err(SendError::UnknownStream(want.stream));
        };
        if queue.len() >= self.cfg.max_queue {
            self.stats.refused_busy += 1;
            self.close(want.stream);
            self.push_control(want.stream, CloseCode::Busy);
            return Err(SendError::QueueFull {
                stream: want.stream,
                limit: self.cfg.max_queue,
            });
        }
        if queue.is_empty() {
            self.ready.push_back(want.stream);
        }
        queue.push_back(want);
        Ok(())
    }

    /// The next frame to write, if the link's writer can take `can_send_bytes` more bytes and
    /// the frame fits. The writer's buffer must hold at least [`MAX_STREAM_FRAME`] bytes when
    /// empty, or a large shard would never fit. Looks up at most one shard per call, and only
    /// when nothing is already waiting.
    pub fn poll_transmit<S: ShardSource>(
        &mut self,
        can_send_bytes: usize,
        source: &S,
    ) -> Option<Vec<u8>> {
        if can_send_bytes == 0 {
            return None;
        }
        if let Some(frame) = self.control.front() {
            return if frame.len() <= can_send_bytes {
                self.control.pop_front()
            } else {
                None
            };
        }
        if self.staged.is_none() {
            let want = self.next_want()?;
            self.staged = Some(self.lookup(want, source).encode());
        }
        if self
            .staged
            .as_ref()
            .is_some_and(|f| f.len() <= can_send_bytes)
        {
            self.staged.take()
        } else {
            None
        }
    }

    /// Whether a frame is waiting (queued Wants, a staged shard or a control frame).
    pub fn has_work(&self) -> bool {
        self.staged.is_some() || !self.control.is_empty() || !self.ready.is_empty()
    }

    pub fn stats(&self) -> &SendStats {
        &self.stats
    }

    /// Bytes held now: queued Wants, the staged frame and control frames.
    pub fn memory_bytes(&self) -> usize {
        let wants: usize = self.queues.values().map(VecDeque::len).sum();
        wants * std::mem::size_of::<Want>()
            + self.staged.as_ref().map_or(0, Vec::len)
            + self.control.iter().map(Vec::len).sum::<usize>()
    }

    /// The most [`Self::memory_bytes`] can ever be with this config.
    pub fn memory_bound(&self) -> usize {
        self.cfg.max_streams_per_peer * self.cfg.max_queue * std::mem::size_of::<Want>()
            + MAX_STREAM_FRAME
            + MAX_CONTROL_QUEUE * CLOSE_LEN
    }

    fn next_want(&mut self) -> Option<Want> {
        while let Some(stream) = self.ready.pop_front() {
            let Some(queue) = self.queues.get_mut(&stream) else {
                continue;
            };
            let Some(want) = queue.pop_front() else {
                continue;
            };
            if !queue.is_empty() {
                self.ready.push_back(stream);
            }
            return Some(want);
        }
        None
    }

    fn lookup<S: ShardSource>(&mut self, want: Want, source: &S) -> Frame {
        self.stats.lookups += 1;
        let missing = Frame::Missing(Missing {
            stream: want.stream,
            seq: want.seq,
            addr: want.addr,
        });
        match source.get(&want.addr) {
            Ok(Some(bytes)) if bytes.len() <= MAX_SHARD_LEN => {
                self.stats.shards_sent += 1;
                self.stats.shard_bytes_sent += bytes.len() as u64;
                Frame::Shard(Shard {
                    stream: want.stream,
                    seq: want.seq,
                    addr: want.addr,
                    bytes,
                })
            }
            Ok(None) => {
                self.stats.missing_sent += 1;
                missing
            }
            Ok(Some(_)) | Err(_) => {
                self.stats.source_errors += 1;
                self.stats.missing_sent += 1;
                missing
            }
        }
    }

    fn push_control(&mut self, stream: u32, code: CloseCode) {
        let frame = Frame::Close(Close { stream, code }).encode();
        if self.control.len() >= MAX_CONTROL_QUEUE || self.control.contains(&frame) {
            self.stats.control_dropped += 1;
            return;
        }
        self.control.push_back(frame);
    }
}
