//! # borg-net: networking of a BorgIOS node
//!
//! Nodes talk over long-lived TLS 1.3 connections (rustls with the `ring` provider). There is no
//! certificate authority: each node presents a self-signed certificate made from its own P-256
//! node key, a client accepts a server only if that certificate carries the key it expected
//! (pinning), and a server requires a client certificate and learns from it which node
//! connected. Messages travel as length-prefixed frames of at most [`frame::MAX_FRAME`] bytes.
//!
//! - [`cell`]: the cell seam, the sans-IO trait a cell type implements.
//! - [`clock`]: the node's local (monotonic) and network clocks, shared by its cells.
//! - [`tls`]: certificates from node keys, pinning verifiers, the rustls configurations (node to
//!   node with mutual authentication, the HTTPS receptor, command-line clients).
//! - [`guard`]: connection slots per IP and in total, token buckets, refusal counters.
//! - [`frame`]: the 4-byte big-endian length-prefixed framing over any async byte stream.
//! - [`conn`]: [`conn::connect`] and [`conn::Listener`], giving [`conn::PeerConn`]s whose
//!   halves send and receive frames.
//! - [`node`]: the actor that owns the `borg_proto::tree` state machine, opens every frame as a
//!   signed envelope and carries out the machine's actions (dial, send, deliver).
//! - [`nat`]: the reachability task: probes, LAN beacons, port mapping, the NAT role.
//! - [`relay`]: splicing connections for relayed nodes (TLS stays end to end).
//! - [`localnet`]: local addresses and the default gateway, from the kernel.
//! - [`portmap`]: UPnP-IGD, PCP and NAT-PMP port mapping on the home router.
//! - [`serve`]: the receptor (HTTPS `POST /`) and monitor (HTTP `GET /status`, `/metrics`).
//! - [`client`]: small clients for the CLI and tests.
#![forbid(unsafe_code)]

pub mod cell;
pub mod client;
pub mod clock;
pub mod conn;
pub mod frame;
pub mod guard;
pub mod localnet;
pub mod nat;
pub mod node;
pub mod page;
pub mod portmap;
pub mod relay;
pub mod serve;
pub mod tls;

pub use conn::{connect, Listener, PeerConn, PeerReader, PeerWriter, TransportError};
pub use frame::{FrameError, MAX_FRAME};
pub use tls::{TlsError, TlsIdentity};
