//! The request layer of the file commands: where a node's cell receptors are, one signed
//! request and its verified answer, retries with a bounded backoff, and what to tell the user
//! when a request fails for good.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use borg_files::UserKeys;
use borg_net::client::{self, ClientError};
use borg_proto::dna::{self, PEER_TREE_NET};
use borg_proto::envelope;
use borg_proto::identity::SecretKey;
use clap::Args;
use serde_json::Value;

/// Requests in flight at once for the shards of one file.
pub(crate) const IN_FLIGHT: usize = 4;
/// Tries of one request before giving up (busy answers and connection failures).
pub(crate) const MAX_TRIES: u32 = 8;
/// Longest wait between two tries.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// A cell's receptor on the node: where requests go, and its name for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub cell: &'static str,
    pub addr: SocketAddr,
}

/// The receptors the file commands talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Endpoints {
    /// shardTree: `shard.put`, `shard.get`.
    pub shard: Target,
    /// ftreeFileMgr: `file.put`, `file.get`, `file.ls`, `file.rm`.
    pub files: Target,
}

/// `IP` or `IP:PORT` (PORT: the node's peerTreeNet receptor, 13305 by default) to the
/// shardTree and ftreeFileMgr receptors, each at the same offset from its DNA port.
pub(crate) fn parse_node(text: &str) -> Result<Endpoints> {
    let base = if let Ok(sa) = text.parse::<SocketAddr>() {
        sa
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        SocketAddr::new(ip, PEER_TREE_NET.recp_port)
    } else {
        bail!(
            "--node {text:?} is not an address: give IP or IP:PORT, e.g. 127.0.0.2 or \
             127.0.0.2:{}",
            PEER_TREE_NET.recp_port
        )
    };
    Ok(Endpoints {
        shard: cell_target(base, "shardTree")?,
        files: cell_target(base, "ftreeFileMgr")?,
    })
}

pub(crate) fn cell_target(base: SocketAddr, cell: &'static str) -> Result<Target> {
    let dna = dna::cell(cell).ok_or_else(|| anyhow!("the DNA table has no {cell} cell"))?;
    let port =
        i32::from(base.port()) - i32::from(PEER_TREE_NET.recp_port) + i32::from(dna.recp_port);
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            anyhow!(
                "receptor port {} puts the {cell} receptor (at {} + {}) outside 1..=65535",
                base.port(),
                base.port(),
                i32::from(dna.recp_port) - i32::from(PEER_TREE_NET.recp_port)
            )
        })?;
    Ok(Target {
        cell,
        addr: SocketAddr::new(base.ip(), port),
    })
}

/// What every file command needs: the node and the user's phrase.
#[derive(Args, Debug)]
pub struct NodeUser {
    /// The node, IP[:PORT]. PORT is its peerTreeNet receptor (13305 by default); the
    /// shardTree and ftreeFileMgr receptors are found from it (PORT + 50 and PORT + 76).
    #[arg(long, value_name = "IP[:PORT]")]
    pub node: String,
    /// File holding your phrase (24 words), e.g. on a USB stick. Without it: the phrase kept
    /// in $XDG_CONFIG_HOME/borg/phrase (else ~/.config/borg/phrase), made on first use.
    #[arg(long, value_name = "FILE")]
    pub phrase_file: Option<PathBuf>,
    /// File holding the optional BIP39 passphrase of your phrase.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl NodeUser {
    /// The user's two keys (m/0' signs, m/1' opens file keys).
    pub(crate) fn keys(&self) -> Result<UserKeys> {
        let user =
            crate::userkey::load(self.phrase_file.as_deref(), self.passphrase_file.as_deref())?;
        UserKeys::from_phrase(&user.phrase, &user.passphrase)
            .map_err(|e| anyhow!("invalid phrase in {}: {e}", user.source.display()))
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two threads move the bytes (a streamed get decrypts TLS from several holders while its
    // loop checks SHA-256); encryption and file I/O run on the blocking threads.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Why a request to a receptor did not give an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No HTTP answer: connection refused, TLS failure, timeout.
    #[error("{0}")]
    Unreachable(ClientError),
    /// An HTTP refusal with the node's `{"error", "message"}`.
    #[error("the node refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// A 200 answer that is not a valid answer to this request.
    #[error("the node's answer is not valid: {0}")]
    BadAnswer(String),
    /// Shard bytes that are not what was asked for (worth asking again).
    #[error("{0}")]
    BadData(String),
}

impl CallError {
    /// Worth another try: the node was busy or unreachable, or sent the wrong bytes.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            CallError::Unreachable(_) | CallError::BadData(_) => true,
            CallError::Refused { status, .. } => *status == 429 || *status == 503,
            CallError::BadAnswer(_) => false,
        }
    }
}

/// Cut node-supplied text short before it goes into a message.
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 300;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > MAX {
        out.push_str("...");
    }
    out
}

/// A refusal's `{"error": code, "message": text}`, or what can be made of another body.
pub(crate) fn refusal(status: u16, body: &[u8]) -> CallError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(clip)
    };
    CallError::Refused {
        status,
        code: field("error").unwrap_or_else(|| format!("http_{status}")),
        message: field("message").unwrap_or_else(|| clip(&String::from_utf8_lossy(body))),
    }
}

/// How long one request waits for its answer: the receptor's limit on a connection.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// One signed request to a receptor; the body of its verified `<kind>.ok` answer.
pub(crate) async fn call(
    addr: SocketAddr,
    key: &SecretKey,
    kind: &str,
    body: Value,
) -> Result<Value, CallError> {
    let env = envelope::seal(key, kind, None, borg_net::node::now_ms(), body);
    // A node may answer a shard it fetches from holders after up to 15 s (its own deadline
    // is 25 s): wait as long as the receptor keeps a connection.
    let (status, answer) = client::receptor_post_within(addr, env.to_bytes(), ANSWER_WITHIN)
        .await
        .map_err(CallError::Unreachable)?;
    if status != 200 {
        return Err(refusal(status, &answer));
    }
    let reply = envelope::verify_signature_only(&answer)
        .map_err(|e| CallError::BadAnswer(format!("it does not verify: {e}")))?;
    let want = format!("{kind}.ok");
    if reply.kind != want {
        return Err(CallError::BadAnswer(format!(
            "it is of kind {:?}, not {want:?}",
            clip(&reply.kind)
        )));
    }
    if reply.body.get("re").and_then(Value::as_str) != Some(env.nonce.as_str()) {
        return Err(CallError::BadAnswer("it is not for this request".into()));
    }
    Ok(reply.into_inner().body)
}

/// The wait before try `attempt + 1` (attempt counts from 1): doubling from 200 ms up to
/// [`MAX_BACKOFF`], with up to half of it random so that clients do not retry in step.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let full = (100u64 << attempt.min(6)).min(MAX_BACKOFF.as_millis() as u64);
    let half = full / 2;
    Duration::from_millis(half + rand::random::<u64>() % (half + 1))
}

/// Run `attempt` until it succeeds, fails for good, or [`MAX_TRIES`] tries were made.
pub(crate) async fn with_retries<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(e) if e.retryable() && tries < MAX_TRIES => {
                tracing::debug!("{what}: try {tries} of {MAX_TRIES} failed: {e}");
                tokio::time::sleep(backoff(tries)).await;
            }
            other => return other,
        }
    }
}

/// A user-facing error for a failed request: what failed, why, and what to do about it.
/// `not_found` is what a 404 means for this request.
pub(crate) fn explain(e: CallError, at: &Target, what: &str, not_found: &str) -> anyhow::Error {
    let addr = at.addr;
    let cell = at.cell;
    match e {
        CallError::Unreachable(err) => anyhow!(
            "{what}: {err} (after {MAX_TRIES} tries): is a node running with its {cell} \
             receptor on {addr}?"
        ),
        CallError::BadData(msg) => {
            anyhow!("{what}: {msg} (after {MAX_TRIES} tries); try another node with --node")
        }
        CallError::BadAnswer(msg) => {
            anyhow!("{what}: the answer from {addr} is not valid: {msg}")
        }
        CallError::Refused {
            status,
            code,
            message,
        } => match (status, code.as_str()) {
            (404, _) | (_, "not_found") => anyhow!("{what}: {not_found} ({message})"),
            (507, _) | (_, "full") => anyhow!(
                "{what}: the node's shard store is full ({message}); free space on it or \
                 use another node with --node"
            ),
            (429, _) | (503, _) => anyhow!(
                "{what}: the node on {addr} stayed busy ({code}: {message}) for {MAX_TRIES} \
                 tries; try again in a minute"
            ),
            (413, _) => anyhow!("{what}: too large for the node ({message})"),
            (_, "unknown_kind") => anyhow!(
                "{what}: the receptor on {addr} does not answer this request ({message}): \
                 does that node run the {cell} cell, and is --node its peerTreeNet receptor?"
            ),
            (_, "stale") => anyhow!(
                "{what}: the node refused the request's time stamp ({message}): check this \
                 computer's clock"
            ),
            (401, _) | (_, "bad_signature") => {
                anyhow!("{what}: the node did not accept your signature ({message})")
            }
            (403, _) => anyhow!(
                "{what}: the node refused ({message}): is this your file? check \
                 --phrase-file and --passphrase-file"
            ),
            _ => anyhow!("{what}: the node on {addr} refused ({status} {code}): {message}"),
        },
    }
}
