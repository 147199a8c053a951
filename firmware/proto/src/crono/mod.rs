//! Network time (cronoTree), sans-IO: typed `time.*` messages ([`msg`]) and the sync state
//! machine ([`TimeSync`]). Time enters as arguments (the node's free-running local clock in
//! µs); nothing here reads a clock or does I/O. See docs/PROTOCOL.md, "Network time".

mod filter;
pub mod msg;
pub mod sim;
mod sync;
#[cfg(test)]
mod tests;

pub use sync::{Mapping, SyncConfig, SyncError, TimeSource, TimeStatus, TimeSync};
