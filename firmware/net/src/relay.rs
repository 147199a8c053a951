//! Relaying for nodes that cannot be dialed (DESIGN.md section 8, docs/NAT.md).
//!
//! A relayed node keeps a tree-protocol link to its relay and registers on it
//! (`relay.register`). Somebody who wants the relayed node connects to the relay and sends one
//! line, `BORG-RELAY <key>`; the relay sends `relay.open {token}` over the registered link,
//! the relayed node connects back with `BORG-ACCEPT <token>`, and the relay splices the two TCP
//! streams. The TLS handshake that follows runs between the two ends, pinned to the relayed
//! node's key: the relay forwards ciphertext it cannot read or forge.
//!
//! [`RelayHub`] pairs waiting requests with the connections that answer them and counts what
//! it forwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// How long a relay request waits for the relayed node to connect back.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Splices in progress at once; further requests are refused.
pub const MAX_SPLICES: u64 = 256;

/// Waiting relay requests and relay counters.
#[derive(Debug, Default)]
pub struct RelayHub {
    waiting: Mutex<HashMap<String, oneshot::Sender<TcpStream>>>,
    pub active: AtomicU64,
    pub spliced_total: AtomicU64,
    pub failed_total: AtomicU64,
    pub bytes_total: AtomicU64,
}

/// Errors of one relay request.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("too many relayed connections in progress")]
    Busy,
    #[error("the relayed node did not connect back within {0:?}")]
    NoAnswer(Duration),
    #[error("splice: {0}")]
    Io(#[from] std::io::Error),
}

impl RelayHub {
    /// Wait for the answer carrying `token`, then forward bytes both ways until both sides
    /// close. Returns the bytes forwarded (client to node, node to client).
    pub async fn splice(
        &self,
        token: String,
        mut client: TcpStream,
    ) -> Result<(u64, u64), RelayError> {
        if self.active.load(Ordering::Relaxed) >= MAX_SPLICES {
            self.failed_total.fetch_add(1, Ordering::Relaxed);
            return Err(RelayError::Busy);
        }
        let (tx, rx) = oneshot::channel();
        self.lock().insert(token.clone(), tx);
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
        self.lock().remove(&token);
        let Ok(Ok(mut node)) = answer else {
            self.failed_total.fetch_add(1, Ordering::Relaxed);
            return Err(RelayError::NoAnswer(ANSWER_TIMEOUT));
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        self.spliced_total.fetch_add(1, Ordering::Relaxed);
        let result = tokio::io::copy_bidirectional(&mut client, &mut node).await;
        self.active.fetch_sub(1, Ordering::Relaxed);
        let (up, down) = result?;
        self.bytes_total.fetch_add(up + down, Ordering::Relaxed);
        Ok((up, down))
    }

    /// A relayed node connected back with `token`: hand its stream to the waiting request.
    /// Unknown tokens are dropped (closing the connection).
    pub fn answer(&self, token: &str, stream: TcpStream) -> bool {
        match self.lock().remove(token) {
            Some(tx) => tx.send(stream).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<TcpStream>>> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}
