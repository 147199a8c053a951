//! The file commands `borg put`, `borg ls` and `borg rm` (and what `borg get`, in
//! files_get.rs, shares with them): a user's files on the network, encrypted on this machine
//! with borg-files and sent to a node's shardTree and ftreeFileMgr receptors as envelopes
//! signed by the user's m/0' key (docs/FILES.md; the receptor kinds are `shard.put`,
//! `shard.get`, `file.put`, `file.get`, `file.ls`, `file.rm`).
//!
//! `--node IP[:PORT]` names the node's peerTreeNet receptor (13305 by default); each cell's
//! receptor sits at the same offset from its DNA port (shardTree 13355, ftreeFileMgr 13381).
//! Busy answers (429, 503) and connection failures are retried with a bounded backoff; every
//! other refusal ends the command with a message that says what to do.

use std::fs::File;
use std::future::Future;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_files::{
    encrypt_reader, seal_delete, seal_manifest, wrap_key, Encrypted, FileId, FileKey, Manifest,
    ShardRef, UserKeys, WrappedKey, MAX_FILE_SIZE, SALT_LEN, TAG_LEN,
};
use borg_net::client::{self, ClientError};
use borg_proto::dna::{self, PEER_TREE_NET};
use borg_proto::envelope;
use borg_proto::identity::SecretKey;
use borg_store::{Address, StoreError};
use clap::Args;
use rand::rngs::OsRng;
use rand::RngCore;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Requests in flight at once for the shards of one file.
pub(crate) const IN_FLIGHT: usize = 4;
/// Tries of one request before giving up (busy answers and connection failures).
pub(crate) const MAX_TRIES: u32 = 8;
/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(4);

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

fn cell_target(base: SocketAddr, cell: &'static str) -> Result<Target> {
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
    // One thread moves the bytes; encryption and file I/O run on their own threads.
    tokio::runtime::Builder::new_current_thread()
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
fn clip(text: &str) -> String {
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
fn refusal(status: u16, body: &[u8]) -> CallError {
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

/// The media type for a file name, from its extension; application/octet-stream if unknown.
pub(crate) fn guess_media_type(name: &str) -> &'static str {
    let ext = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => return "application/octet-stream",
    };
    match ext.as_str() {
        "txt" | "text" | "log" => "text/plain",
        "md" | "markdown" => "text/markdown",
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "csv" => "text/csv",
        "js" | "mjs" => "text/javascript",
        "json" => "application/json",
        "xml" => "application/xml",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "ogg" | "oga" => "audio/ogg",
        "wav" => "audio/wav",
        "flac" => "audio/flac",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        _ => "application/octet-stream",
    }
}

/// A one-line progress bar on stderr, redrawn at most ten times a second; silent unless
/// stderr is a terminal and the output is not JSON.
pub(crate) struct Progress {
    enabled: bool,
    label: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    pub(crate) fn new(label: &'static str, total: u64, json: bool) -> Progress {
        Progress {
            enabled: !json && std::io::stderr().is_terminal(),
            label,
            total,
            done: 0,
            start: Instant::now(),
            last_draw: None,
        }
    }

    pub(crate) fn add(&mut self, bytes: u64) {
        self.done = self.done.saturating_add(bytes);
        self.draw(false);
    }

    /// Count bytes already done before this run (they do not count towards the rate).
    pub(crate) fn skip(&mut self, bytes: u64) {
        self.total = self.total.saturating_sub(bytes);
    }

    fn draw(&mut self, force: bool) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last_draw
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        self.last_draw = Some(now);
        let line = progress_line(
            self.label,
            self.done,
            self.total,
            now.duration_since(self.start),
        );
        // \x1b[K clears what a longer previous line left.
        eprint!("\r{line}\x1b[K");
    }

    /// Draw the final state and end the line.
    pub(crate) fn finish(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            self.draw(true);
            eprintln!();
        }
    }

    /// End the line without a final draw (before an error message).
    pub(crate) fn abandon(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            eprintln!();
        }
    }
}

/// `put [########------------]  40%  10.0 MiB / 25.0 MiB  3.2 MiB/s`
pub(crate) fn progress_line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    const WIDTH: u64 = 20;
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = ((frac * WIDTH as f64) as u64).min(WIDTH) as usize;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    format!(
        "{label} [{}{}] {:>3}%  {} / {}  {}/s",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled),
        (frac * 100.0) as u64,
        human_bytes(done as f64),
        human_bytes(total as f64),
        human_bytes(rate)
    )
}

fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut n = n;
    let mut unit = 0;
    while n >= 1024.0 && unit + 1 < UNITS.len() {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0} {}", UNITS[unit])
    } else {
        format!("{n:.1} {}", UNITS[unit])
    }
}

// ---------------------------------------------------------------------------------------
// borg put

#[derive(Args, Debug)]
pub struct PutArgs {
    #[command(flatten)]
    pub user: NodeUser,
    /// The file to store. It is read and encrypted one 256 KiB chunk at a time, so any size
    /// up to about 2.8 GiB works without holding it in memory.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The name kept in the manifest (default: FILE's name). 1 to 255 bytes, no '/'.
    #[arg(long)]
    pub name: Option<String>,
    /// The media type kept in the manifest (default: guessed from the name's extension,
    /// else application/octet-stream).
    #[arg(long, value_name = "TYPE")]
    pub media_type: Option<String>,
    /// Print one JSON object {"id", "name", "size", "shards"} and no progress.
    #[arg(long)]
    pub json: bool,
}

pub fn put(args: PutArgs) -> Result<()> {
    let ends = parse_node(&args.user.node)?;
    let path = &args.file;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > MAX_FILE_SIZE {
        bail!(
            "{} is {} bytes; a file is at most {MAX_FILE_SIZE} bytes (about 2.8 GiB)",
            path.display(),
            meta.len()
        );
    }
    let name = match &args.name {
        Some(n) => n.clone(),
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow!(
                    "{} has no UTF-8 file name; give one with --name",
                    path.display()
                )
            })?,
    };
    let media_type = args
        .media_type
        .clone()
        .unwrap_or_else(|| guess_media_type(&name).to_string());
    let keys = args.user.keys()?;

    let mut rng = OsRng;
    let file_key = FileKey::generate(&mut rng);
    let mut salt = [0u8; SALT_LEN];
    rng.fill_bytes(&mut salt);
    let wrapped = wrap_key(&mut rng, &file_key, &keys.encryption_public())
        .context("wrapping the file key for your encryption key")?;
    precheck_names(&name, &media_type, salt, &wrapped)?;
    let created_ms = borg_net::node::now_ms();

    let rt = runtime()?;
    let mut progress = Progress::new("put", meta.len(), args.json);
    let uploaded = rt.block_on(upload_shards(
        ends.shard,
        Arc::new(keys.signing().clone()),
        file,
        path,
        file_key,
        salt,
        &mut progress,
    ));
    let encrypted = match uploaded {
        Ok(e) => {
            progress.finish();
            e
        }
        Err(e) => {
            progress.abandon();
            return Err(e);
        }
    };
    let size = encrypted.size;
    let n = encrypted.shards.len();
    let manifest = Manifest::new(&name, &media_type, created_ms, salt, encrypted, wrapped)
        .context("building the manifest")?;
    let (id, env) = seal_manifest(
        &mut rng,
        keys.signing(),
        &manifest,
        borg_net::node::now_ms(),
    )
    .context("signing the manifest")?;
    let text = String::from_utf8(env.to_bytes()).context("the manifest is not UTF-8")?;
    let body = json!({ "manifest": text });
    let answer = rt
        .block_on(with_retries("file.put", || {
            call(ends.files.addr, keys.signing(), "file.put", body.clone())
        }))
        .map_err(|e| {
            explain(
                e,
                &ends.files,
                "storing the manifest",
                "the node answered not_found",
            )
        })?;
    let stored_as = answer.get("id").and_then(Value::as_str);
    if stored_as != Some(id.to_string().as_str()) {
        bail!(
            "the node stored the manifest under id {}, not under its id {id}",
            clip(stored_as.unwrap_or("(none)"))
        );
    }
    if args.json {
        println!(
            "{}",
            json!({"id": id.to_string(), "name": name, "size": size, "shards": n})
        );
    } else {
        println!("stored {id} ({name}, {size} bytes, {n} shards)");
    }
    Ok(())
}

/// Refuse a bad name or media type before anything is sent (the manifest would refuse them
/// only after every shard was uploaded).
fn precheck_names(
    name: &str,
    media_type: &str,
    salt: [u8; SALT_LEN],
    wrapped: &WrappedKey,
) -> Result<()> {
    let empty = Encrypted {
        size: 0,
        sha256: [0; 32],
        shards: vec![ShardRef {
            addr: Address::of(&[]),
            len: TAG_LEN as u32,
        }],
    };
    Manifest::new(name, media_type, 0, salt, empty, wrapped.clone()).map_err(|e| {
        anyhow!("cannot store as {name:?} of type {media_type:?}: {e}; choose another with --name or --media-type")
    })?;
    Ok(())
}

/// One encrypted shard on its way from the encrypting thread to an upload task.
struct ShardOut {
    index: usize,
    addr: Address,
    bytes: Vec<u8>,
}

/// Encrypt `file` on a thread of its own and upload its shards, [`IN_FLIGHT`] at a time.
/// Memory stays bounded: the channel holds [`IN_FLIGHT`] shards, the uploads as many more.
async fn upload_shards(
    target: Target,
    key: Arc<SecretKey>,
    file: File,
    path: &Path,
    file_key: FileKey,
    salt: [u8; SALT_LEN],
    progress: &mut Progress,
) -> Result<Encrypted> {
    let (tx, mut rx) = mpsc::channel::<ShardOut>(IN_FLIGHT);
    let encrypting = std::thread::Builder::new()
        .name("borg-put-encrypt".into())
        .spawn(move || {
            let mut index = 0;
            encrypt_reader(file, &file_key, &salt, &[], |addr, bytes| {
                let shard = ShardOut {
                    index,
                    addr: *addr,
                    bytes: bytes.to_vec(),
                };
                index += 1;
                tx.blocking_send(shard)
                    .map_err(|_| StoreError::Io("the upload stopped".into()))
            })
        })
        .context("starting the encryption thread")?;

    let mut uploads = JoinSet::new();
    let mut open = true;
    let mut failure: Option<anyhow::Error> = None;
    while open || !uploads.is_empty() {
        tokio::select! {
            next = rx.recv(), if open && uploads.len() < IN_FLIGHT => match next {
                Some(shard) => {
                    uploads.spawn(upload_one(target, key.clone(), shard));
                }
                None => open = false,
            },
            Some(joined) = uploads.join_next(), if !uploads.is_empty() => match joined {
                Ok(Ok(plain)) => progress.add(plain),
                Ok(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                Err(e) => {
                    failure = Some(anyhow!("an upload task failed: {e}"));
                    break;
                }
            },
        }
    }
    // On a failure, closing the channel stops the encrypting thread at its next shard.
    drop(rx);
    uploads.abort_all();
    let encrypted = encrypting
        .join()
        .map_err(|_| anyhow!("the encryption thread panicked"))?;
    if let Some(e) = failure {
        return Err(e);
    }
    encrypted.with_context(|| format!("encrypting {}", path.display()))
}

/// Upload one shard; the plaintext bytes it carries.
async fn upload_one(target: Target, key: Arc<SecretKey>, shard: ShardOut) -> Result<u64> {
    let index = shard.index;
    let body = json!({ "data": URL_SAFE_NO_PAD.encode(&shard.bytes) });
    let answer = with_retries("shard.put", || {
        call(target.addr, &key, "shard.put", body.clone())
    })
    .await
    .map_err(|e| {
        explain(
            e,
            &target,
            &format!("uploading chunk {index}"),
            "the node answered not_found",
        )
    })?;
    let want = shard.addr.to_string();
    let got = answer.get("addr").and_then(Value::as_str);
    if got != Some(want.as_str()) {
        bail!(
            "the node stored chunk {index} under {}, not under its address {want}; \
             it cannot be trusted with this file",
            clip(got.unwrap_or("(none)"))
        );
    }
    if let Some(len) = answer.get("len").and_then(Value::as_u64) {
        if len != shard.bytes.len() as u64 {
            bail!(
                "the node stored {len} bytes of chunk {index}, not {}",
                shard.bytes.len()
            );
        }
    }
    Ok((shard.bytes.len() - TAG_LEN) as u64)
}

// ---------------------------------------------------------------------------------------
// borg ls

#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub user: NodeUser,
    /// Print the node's answer as JSON: {"files": [{"id", "name", "size", "media_type",
    /// "created_ms", "shards"}]}.
    #[arg(long)]
    pub json: bool,
}

pub fn ls(args: LsArgs) -> Result<()> {
    let ends = parse_node(&args.user.node)?;
    let keys = args.user.keys()?;
    let answer = runtime()?
        .block_on(with_retries("file.ls", || {
            call(ends.files.addr, keys.signing(), "file.ls", json!({}))
        }))
        .map_err(|e| {
            explain(
                e,
                &ends.files,
                "listing your files",
                "the node answered not_found",
            )
        })?;
    let files = answer
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the node's file list has no \"files\" array"))?;
    if args.json {
        println!("{}", json!({ "files": files }));
        return Ok(());
    }
    print!("{}", ls_table(files));
    Ok(())
}

/// The file list as a table, oldest first.
pub(crate) fn ls_table(files: &[Value]) -> String {
    if files.is_empty() {
        return "no files stored under your key on that node\n".into();
    }
    let mut rows: Vec<&Value> = files.iter().collect();
    rows.sort_by_key(|f| f.get("created_ms").and_then(Value::as_u64).unwrap_or(0));
    let mut out = format!(
        "{:<64}  {:>12}  {:<20}  {:>6}  NAME\n",
        "ID", "SIZE", "CREATED (UTC)", "SHARDS"
    );
    for f in rows {
        let s = |k: &str| f.get(k).and_then(Value::as_str).map(clip);
        let n = |k: &str| f.get(k).and_then(Value::as_u64);
        let created = n("created_ms")
            .map(|ms| {
                let full = borg_system::hwclock::utc_string(ms);
                // YYYY-MM-DDTHH:MM:SS.mmmZ -> YYYY-MM-DDTHH:MM:SSZ
                format!("{}Z", full.get(..19).unwrap_or(&full))
            })
            .unwrap_or_else(|| "?".into());
        out.push_str(&format!(
            "{:<64}  {:>12}  {:<20}  {:>6}  {}\n",
            s("id").unwrap_or_else(|| "?".into()),
            n("size").map_or("?".into(), |v| v.to_string()),
            created,
            n("shards").map_or("?".into(), |v| v.to_string()),
            s("name").unwrap_or_else(|| "?".into()),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------
// borg rm

#[derive(Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    pub user: NodeUser,
    /// The file's id (64 hex characters, as `borg put` and `borg ls` print it).
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the node's answer as JSON: {"id", "removed"}.
    #[arg(long)]
    pub json: bool,
}

/// A file id from the command line, with a message that says what one looks like.
pub(crate) fn parse_id(text: &str) -> Result<FileId> {
    text.trim().parse::<FileId>().map_err(|e| {
        anyhow!(
            "{:?} is not a file id (64 hex characters, as `borg put` and `borg ls` print): {e}",
            clip(text)
        )
    })
}

pub fn rm(args: RmArgs) -> Result<()> {
    let id = parse_id(&args.id)?;
    let ends = parse_node(&args.user.node)?;
    let keys = args.user.keys()?;
    let answer = runtime()?
        .block_on(with_retries("file.rm", || {
            // A fresh delete each try: the node keeps the nonces it has seen.
            let delete = seal_delete(&mut OsRng, keys.signing(), &id, borg_net::node::now_ms());
            let text = String::from_utf8_lossy(&delete.to_bytes()).into_owned();
            call(
                ends.files.addr,
                keys.signing(),
                "file.rm",
                json!({ "delete": text }),
            )
        }))
        .map_err(|e| {
            explain(
                e,
                &ends.files,
                &format!("removing {id}"),
                &format!(
                    "no node holds file {id} of yours (check the id with `borg ls`, and that \
                     --phrase-file and --passphrase-file are the ones you stored it with)"
                ),
            )
        })?;
    let removed = answer.get("removed").and_then(Value::as_bool);
    if args.json {
        println!(
            "{}",
            json!({"id": id.to_string(), "removed": removed.unwrap_or(false)})
        );
    }
    match removed {
        Some(true) => {
            if !args.json {
                println!("removed {id}");
            }
            Ok(())
        }
        Some(false) => bail!(
            "no file {id} is stored under your key on that node; nothing was removed \
             (check the id with `borg ls`)"
        ),
        None => bail!("the node's answer to file.rm has no \"removed\""),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn node_endpoints_follow_the_receptor_port() {
        let e = parse_node("127.0.0.5").unwrap();
        assert_eq!(e.shard.addr, "127.0.0.5:13355".parse().unwrap());
        assert_eq!(e.files.addr, "127.0.0.5:13381".parse().unwrap());
        assert_eq!((e.shard.cell, e.files.cell), ("shardTree", "ftreeFileMgr"));
        let e = parse_node("127.0.0.5:14305").unwrap();
        assert_eq!(e.shard.addr, "127.0.0.5:14355".parse().unwrap());
        assert_eq!(e.files.addr, "127.0.0.5:14381".parse().unwrap());
        let e = parse_node("[::1]:13305").unwrap();
        assert_eq!(e.files.addr, "[::1]:13381".parse().unwrap());
        assert!(parse_node("localhost").is_err());
        assert!(parse_node("127.0.0.5:65500").is_err());
        assert!(parse_node("127.0.0.5:1").is_ok()); // 1 - 13305 + 13355 = 51
    }

    #[test]
    fn only_busy_unreachable_and_bad_data_are_retried() {
        let refused = |status: u16, code: &str| CallError::Refused {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(refused(429, "rate_limited").retryable());
        assert!(refused(503, "unavailable").retryable());
        assert!(!refused(507, "full").retryable());
        assert!(!refused(404, "not_found").retryable());
        assert!(!refused(400, "malformed").retryable());
        assert!(CallError::BadData("x".into()).retryable());
        assert!(!CallError::BadAnswer("x".into()).retryable());
        for attempt in 1..20 {
            assert!(backoff(attempt) <= MAX_BACKOFF);
            assert!(backoff(attempt) >= Duration::from_millis(100));
        }
    }

    #[test]
    fn refusals_are_parsed_and_explained() {
        let e = refusal(507, br#"{"error":"full","message":"store is full"}"#);
        let at = Target {
            cell: "shardTree",
            addr: "127.0.0.5:13355".parse().unwrap(),
        };
        let text = explain(e, &at, "uploading chunk 3", "x").to_string();
        assert!(text.contains("full") && text.contains("--node"), "{text}");
        let e = refusal(502, b"\x01not json");
        assert!(
            matches!(&e, CallError::Refused { code, message, .. } if code == "http_502" && message == "?not json")
        );
        let unreachable = CallError::Unreachable(ClientError::Timeout { addr: at.addr });
        let text = explain(unreachable, &at, "uploading chunk 0", "x").to_string();
        assert!(
            text.contains("is a node running with its shardTree receptor on 127.0.0.5:13355?"),
            "{text}"
        );
        let nf = refusal(404, br#"{"error":"not_found","message":"m"}"#);
        let text = explain(nf, &at, "w", "no node holds shard X").to_string();
        assert!(text.contains("no node holds shard X"), "{text}");
    }

    #[test]
    fn media_types_from_extensions() {
        assert_eq!(guess_media_type("photo.JPG"), "image/jpeg");
        assert_eq!(guess_media_type("a.tar.gz"), "application/gzip");
        assert_eq!(guess_media_type("notes.txt"), "text/plain");
        assert_eq!(guess_media_type("README"), "application/octet-stream");
        assert_eq!(guess_media_type(".bashrc"), "application/octet-stream");
        assert_eq!(guess_media_type("x.unknown"), "application/octet-stream");
    }

    #[test]
    fn bad_names_are_refused_before_upload() {
        let mut rng = OsRng;
        let keys = UserKeys::from_keys(SecretKey::generate(), SecretKey::generate());
        let key = FileKey::generate(&mut rng);
        let wrapped = wrap_key(&mut rng, &key, &keys.encryption_public()).unwrap();
        assert!(precheck_names("ok.txt", "text/plain", [0; SALT_LEN], &wrapped).is_ok());
        assert!(precheck_names("a/b", "text/plain", [0; SALT_LEN], &wrapped).is_err());
        assert!(precheck_names("ok", "not a type", [0; SALT_LEN], &wrapped).is_err());
    }

    #[test]
    fn progress_line_and_ls_table() {
        let line = progress_line("get", 512 * 1024, 1024 * 1024, Duration::from_secs(1));
        assert!(line.contains(" 50%"), "{line}");
        assert!(line.contains("512.0 KiB / 1.0 MiB"), "{line}");
        assert!(line.contains("512.0 KiB/s"), "{line}");
        assert!(progress_line("put", 5, 0, Duration::ZERO).contains("100%"));
        let table = ls_table(&[json!({"id": "ab", "name": "x\u{1b}y", "size": 3,
            "media_type": "text/plain", "created_ms": 1_700_000_000_123u64, "shards": 1})]);
        assert!(table.contains("2023-11-14T22:13:20Z"), "{table}");
        assert!(table.contains("x?y"), "{table}");
        assert!(ls_table(&[]).contains("no files"));
    }

    #[test]
    fn file_ids_parse_with_a_clear_message() {
        let id = "ab".repeat(32);
        assert_eq!(parse_id(&id).unwrap().to_string(), id);
        let err = parse_id("xyz").unwrap_err().to_string();
        assert!(err.contains("64 hex"), "{err}");
    }
}
