//! # borg-proto: the sans-IO core of BorgIOS
//!
//! Everything here is pure logic: no sockets, no tokio, no clock reads. Time enters as an
//! argument (`now_ms`), randomness through an explicit RNG, and state machines return the
//! actions the I/O layer must carry out. That makes every rule testable in a deterministic
//! simulation (see `tree::sim` tests).
//!
//! - [`identity`]: node and user keys (P-256), address encoding, key files.
//! - [`mnemonic`]: BIP39 phrases and SLIP-0010 NIST P-256 derivation for user identities.
//! - [`envelope`]: the one signed message format and its one verify function.
//! - [`tree`]: the PeerTree state machine (positions, joins, repairs, merges, broadcast).
//! - [`reach`]: reachability: NAT roles from peers' evidence, LAN gateway choice, relayed addresses.
//! - [`build`]: the build time, the floor of network time.
//! - [`crono`]: network time (cronoTree): `time.*` messages and the sans-IO sync state machine.
//! - [`stream`]: windowed streaming of shards (DStream): binary frames, the pulling receiver,
//!   the holder's sender, resume records.
//! - [`dna`]: the compiled-in cell table (names, ports, max children).
//! - [`shard`]: shard placement (rendezvous hashing), the member directory, repair planning.
#![forbid(unsafe_code)]

pub mod bitmap;
pub mod build;
pub mod crono;
pub mod dna;
pub mod envelope;
pub mod identity;
pub mod jcs;
pub mod mnemonic;
pub mod reach;
pub mod shard;
pub mod stream;
pub mod tree;
