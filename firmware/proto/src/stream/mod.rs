//! Windowed streaming of shards (DStream), sans-IO. See docs/STREAM-draft.md.
//!
//! A get pulls the shards of one file from their holders over existing TLS links. The stream
//! is opened by a signed `stream.open` envelope; after that shards move as binary frames
//! ([`frame`]) whose integrity is their SHA-256 address.
//!
//! - [`frame`]: the binary frame codec (`Want`, `Shard`, `Missing`, `Close`), strict decoding.
//! - [`recv`]: [`Receiver`], the pulling side of one get: window, spreading over holders,
//!   check-before-write, timeouts and re-requests, failure.
//! - [`progress`]: [`Progress`], the on-disk record of written shards, for resume.
//! - [`send`]: [`Sender`], the holder's side of one link: bounded queues served only as fast
//!   as the link's writer has room (backpressure).
//!
//! Nothing here reads a clock or touches a socket or a file: time comes in as `now_ms`, frames
//! in and out as bytes, writes go out as [`recv::WriteAt`] and come back as
//! [`Receiver::handle_written`].

#[cfg(test)]
mod figures_tests;
pub mod frame;
pub mod progress;
pub mod recv;
pub mod send;
#[cfg(test)]
mod sim_tests;

pub use frame::{Addr, Frame, StreamFrameError, MAX_SHARD_LEN};
pub use progress::{Progress, ProgressError};
pub use recv::{Plan, Receiver, RecvConfig, RecvError, WriteAt};
pub use send::{SendConfig, SendError, Sender, ShardSource};
