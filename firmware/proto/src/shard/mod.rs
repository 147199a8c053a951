//! Shard placement and self-healing, sans-IO (issue 11, items 3, 4 and 7).
//!
//! - [`placement`]: rendezvous hashing: the `r` holders of a shard, checkable by any node.
//! - [`members`]: the member directory a node keeps (announcements, TTL, deaths, flood bounds).
//! - [`repair`]: the per-node repair planner (coordinator rule, rate-limited pushes, safe drops,
//!   scrub schedule) and the replica count a read reports.
//!
//! The `sim` tests run 100 to 1,000 nodes on a virtual clock. See docs/PLACEMENT.md.

pub mod members;
pub mod placement;
pub mod repair;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use members::{Announced, DirConfig, DirError, MemberDir};
pub use placement::{
    holders, holders_many, rank_of, score, Members, PlaceError, Ranked, ShardAddr, MAX_MEMBERS,
    MAX_REPLICAS,
};
pub use repair::{
    replica_count, RepairAction, RepairConfig, RepairError, RepairPlanner, RepairStats,
    ReplicaCount,
};
