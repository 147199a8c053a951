//! `borg get`: fetch a file's manifest and shards, check and decrypt each chunk, and write it
//! in place into `OUT.part`; resumable.
//!
//! Progress is kept beside the data in `OUT.part.state` (JSON, see [`GetState`]). A chunk is
//! marked done only after its bytes were written and `OUT.part` was fsynced, and the state is
//! replaced atomically (temporary file, fsync, rename), so after a crash or a kill the state
//! never claims a chunk whose bytes are not on disk. A second `borg get` of the same id to the
//! same OUT fetches only the chunks not done; a state of another file is refused.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_files::{
    open_manifest, unwrap_key, Encryptor, FileId, Manifest, ShardRef, CHUNK, MAX_FILE_SIZE,
    MAX_SHARDS,
};
use borg_proto::identity::SecretKey;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use crate::files_cli::{
    call, explain, parse_id, parse_node, runtime, with_retries, CallError, NodeUser, Progress,
    Target, IN_FLIGHT,
};
use crate::files_stream::{stream_missing, Streamed};

/// Format version of the state file.
const STATE_VERSION: u32 = 1;
/// Chunks written between two state saves (each save fsyncs the data first).
const SAVE_EVERY_CHUNKS: usize = 8;
/// Longest time between two state saves while chunks keep arriving.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// Why a state file cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StateError {
    /// Not a state this version wrote: truncated, edited or of another format.
    #[error("not a valid download state: {0}")]
    Corrupt(String),
    /// The state of another file's download.
    #[error("it is the download state of file {found}, not of {wanted}")]
    OtherFile { found: FileId, wanted: FileId },
    /// The same id with another size or shard count (cannot happen unless edited).
    #[error("it does not match the manifest of {0} (size or shard count differ)")]
    Mismatch(FileId),
}

/// Where a download of one file stands: which chunks are written and durable in `OUT.part`.
///
/// On disk (`OUT.part.state`), one JSON object:
///
/// ```text
/// {"v":1, "id":"<64 hex file id>", "size":<plaintext bytes>, "shards":<n>, "chunk":262128,
///  "done":"<hex bitmap>"}
/// ```
///
/// `done` is `ceil(n / 8)` bytes in lowercase hex; chunk `i` is bit `i % 8` (least
/// significant first) of byte `i / 8`; the bits past `n` are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GetState {
    id: FileId,
    size: u64,
    shards: usize,
    done: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateWire {
    v: u32,
    id: FileId,
    size: u64,
    shards: u64,
    chunk: u64,
    done: String,
}

/// Shards a file of `size` bytes has: `max(1, ceil(size / CHUNK))`.
fn shards_for(size: u64) -> u64 {
    size.div_ceil(CHUNK as u64).max(1)
}

impl GetState {
    /// A download of `shards` chunks with none done yet.
    pub(crate) fn new(id: FileId, size: u64, shards: usize) -> GetState {
        GetState {
            id,
            size,
            shards,
            done: vec![0; shards.div_ceil(8)],
        }
    }

    pub(crate) fn is_done(&self, index: usize) -> bool {
        index < self.shards && self.done[index / 8] & (1 << (index % 8)) != 0
    }

    /// Mark chunk `index` done; only after its bytes are durable.
    pub(crate) fn mark_done(&mut self, index: usize) {
        if index < self.shards {
            self.done[index / 8] |= 1 << (index % 8);
        }
    }

    pub(crate) fn done_count(&self) -> usize {
        self.done.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// The chunks still to fetch, in order.
    pub(crate) fn missing(&self) -> Vec<usize> {
        (0..self.shards).filter(|&i| !self.is_done(i)).collect()
    }

    pub(crate) fn complete(&self) -> bool {
        self.done_count() == self.shards
    }

    /// Refuse a state that is not for this file as the manifest describes it.
    pub(crate) fn check_for(&self, id: FileId, size: u64, shards: usize) -> Result<(), StateError> {
        if self.id != id {
            return Err(StateError::OtherFile {
                found: self.id,
                wanted: id,
            });
        }
        if self.size != size || self.shards != shards {
            return Err(StateError::Mismatch(id));
        }
        Ok(())
    }

    pub(crate) fn to_json(&self) -> String {
        let done = borg_proto::bitmap::to_hex(&self.done);
        json!({
            "v": STATE_VERSION,
            "id": self.id.to_string(),
            "size": self.size,
            "shards": self.shards,
            "chunk": CHUNK,
            "done": done,
        })
        .to_string()
    }

    /// Parse and check a state file's text: every field present and consistent.
    pub(crate) fn from_json(text: &str) -> Result<GetState, StateError> {
        let wire: StateWire =
            serde_json::from_str(text).map_err(|e| StateError::Corrupt(e.to_string()))?;
        if wire.v != STATE_VERSION {
            return Err(StateError::Corrupt(format!("version {}", wire.v)));
        }
        if wire.chunk != CHUNK as u64 {
            return Err(StateError::Corrupt(format!("chunk size {}", wire.chunk)));
        }
        if wire.size > MAX_FILE_SIZE || wire.shards != shards_for(wire.size) {
            return Err(StateError::Corrupt(format!(
                "{} bytes do not make {} shards",
                wire.size, wire.shards
            )));
        }
        // Invariant: shards <= MAX_SHARDS here, since size <= MAX_FILE_SIZE.
        let shards = wire.shards as usize;
        debug_assert!(shards <= MAX_SHARDS);
        let done = borg_proto::bitmap::from_hex(&wire.done, shards).ok_or_else(|| {
            StateError::Corrupt(format!(
                "\"done\" must be {} lowercase hex digits, no bit past the last chunk",
                shards.div_ceil(8) * 2
            ))
        })?;
        Ok(GetState {
            id: wire.id,
            size: wire.size,
            shards,
            done,
        })
    }
}

/// `OUT.part`: the data being downloaded.
pub(crate) fn part_path(out: &Path) -> PathBuf {
    with_suffix(out, ".part")
}

/// `OUT.part.state`: the download state.
pub(crate) fn state_path(out: &Path) -> PathBuf {
    with_suffix(out, ".part.state")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// The state at `path`; `Ok(None)` if there is none.
pub(crate) fn load_state(path: &Path) -> Result<Option<GetState>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(GetState::from_json(&text)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replace the state at `path` atomically.
pub(crate) fn save_state(path: &Path, state: &GetState) -> io::Result<()> {
    write_atomic_with(path, state.to_json().as_bytes(), |f, bytes| {
        f.write_all(bytes)
    })
}

/// Write `bytes` to `path` through a temporary file (`write` fills it), fsync it, rename it
/// over `path` and fsync the directory. On any failure `path` is untouched and the temporary
/// file removed.
fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    write: impl FnOnce(&mut File, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = with_suffix(path, ".tmp");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        write(&mut f, bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Fsync the directory holding `path`, so that a rename in it is durable (best effort: not
/// every file system can).
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    pub user: NodeUser,
    /// The file's id (64 hex characters, as `borg put` and `borg ls` print it).
    #[arg(value_name = "ID")]
    pub id: String,
    /// Where to write the file. While it downloads, the data is in OUT.part and the progress
    /// in OUT.part.state; run the same command again to resume after an interruption.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub out: PathBuf,
    /// Overwrite OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object {"id", "name", "size", "shards", "out", "fetched", "skipped",
    /// "streamed", "via_node", "holders", "stream_seconds", "min_replicas"} and no progress.
    #[arg(long)]
    pub json: bool,
    /// Fetch every shard through the --node's receptor (`shard.get`, one HTTPS request per
    /// shard) instead of streaming them from their holders: slower, but it needs only the
    /// one node reachable. Without it, shards no holder could stream go this way anyway.
    #[arg(long)]
    pub via_node: bool,
}

pub fn get(args: GetArgs) -> Result<()> {
    let id = parse_id(&args.id)?;
    let ends = parse_node(&args.user.node)?;
    let out = &args.out;
    if out.is_dir() {
        bail!(
            "{} is a directory; give the file to write with -o",
            out.display()
        );
    }
    if out.exists() && !args.force {
        bail!("{} exists; give --force to overwrite it", out.display());
    }
    let keys = args.user.keys()?;
    let rt = runtime()?;

    let answer = rt
        .block_on(with_retries("file.get", || {
            call(
                ends.files.addr,
                keys.signing(),
                "file.get",
                json!({ "id": id.to_string() }),
            )
        }))
        .map_err(|e| {
            explain(
                e,
                &ends.files,
                "fetching the manifest",
                &format!(
                    "no node holds file {id} of yours (check the id with `borg ls`, and that \
                     --phrase-file and --passphrase-file are the ones you stored it with)"
                ),
            )
        })?;
    let text = answer
        .get("manifest")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the node's answer to file.get has no manifest"))?;
    let opened = open_manifest(text.as_bytes())
        .map_err(|e| anyhow!("the node's manifest for {id} does not open: {e}"))?;
    if opened.id() != id {
        bail!(
            "the node answered with the manifest of another file ({}), not {id}",
            opened.id()
        );
    }
    if opened.owner() != keys.owner() {
        bail!(
            "file {id} belongs to key {}, not to yours ({}): check --phrase-file and \
             --passphrase-file",
            opened.owner(),
            keys.owner()
        );
    }
    let manifest = opened.manifest();
    let file_key = unwrap_key(manifest.wrapped_key(), keys.encryption()).map_err(|_| {
        anyhow!(
            "the key of file {id} does not open with your encryption key: wrong phrase or \
             passphrase?"
        )
    })?;
    let enc = Arc::new(Encryptor::new(&file_key, manifest.salt()));
    drop(file_key);

    let part = part_path(out);
    let state_file = state_path(out);
    let (mut state, data) = prepare(out, id, manifest)?;
    let n = manifest.shards().len();
    let skipped = state.done_count();
    if skipped > 0 && !args.json {
        eprintln!(
            "resuming {}: {skipped} of {n} chunks are already here, fetching the other {}",
            part.display(),
            n - skipped
        );
    }
    let mut progress = Progress::new("get", manifest.size(), args.json);
    progress.skip(done_bytes(&state, manifest));
    let data = Arc::new(data);
    let fetch = Fetch {
        target: ends.shard,
        key: Arc::new(keys.signing().clone()),
        enc,
        manifest,
        data: data.clone(),
        state_file: &state_file,
    };
    let resume_hint = |state: &GetState| {
        format!(
            "{} of {n} chunks are saved in {}; run the same command again to resume",
            state.done_count(),
            part.display()
        )
    };
    let streamed = if args.via_node {
        Ok(Streamed::default())
    } else {
        rt.block_on(stream_missing(&fetch, &mut state, &mut progress))
    };
    let streamed = match streamed {
        Ok(s) => s,
        Err(e) => {
            progress.abandon();
            return Err(e.context(resume_hint(&state)));
        }
    };
    let fetched = rt.block_on(fetch_missing(&fetch, &mut state, &mut progress));
    let min_replicas = match fetched {
        Ok(r) => {
            progress.finish();
            match (r, streamed.min_replicas) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Err(e) => {
            progress.abandon();
            return Err(e.context(resume_hint(&state)));
        }
    };
    if !state.complete() {
        bail!(
            "{} of {n} chunks are done after fetching every missing one; run the same \
             command again",
            state.done_count()
        );
    }
    finish(out, &part, &state_file, &data, manifest, args.force)?;

    let fetched_count = n - skipped;
    let replicas = min_replicas.map_or(Value::Null, Value::from);
    if args.json {
        println!(
            "{}",
            json!({
                "id": id.to_string(),
                "name": manifest.name(),
                "size": manifest.size(),
                "shards": n,
                "out": out.display().to_string(),
                "fetched": fetched_count,
                "skipped": skipped,
                "streamed": streamed.chunks,
                "via_node": fetched_count - streamed.chunks,
                "holders": streamed.holders,
                "stream_seconds": (streamed.seconds * 1000.0).round() / 1000.0,
                "min_replicas": replicas,
            })
        );
    } else {
        let replicas = match min_replicas {
            Some(r) => format!("lowest replica count seen {r}"),
            None => "no shard fetched in this run".into(),
        };
        println!(
            "got {id} -> {} ({}, {} bytes, {n} shards; {fetched_count} fetched, {skipped} \
             skipped as already here; {replicas})",
            out.display(),
            manifest.name(),
            manifest.size()
        );
    }
    Ok(())
}

/// Plaintext bytes of the chunks a state marks done.
fn done_bytes(state: &GetState, manifest: &Manifest) -> u64 {
    manifest
        .shards()
        .iter()
        .enumerate()
        .filter(|(i, _)| state.is_done(*i))
        .map(|(_, s)| u64::from(s.len).saturating_sub(borg_files::TAG_LEN as u64))
        .sum()
}

/// The state and data file to continue with: the existing ones if they are this file's
/// download, else a fresh `OUT.part` of the file's size and a state with nothing done.
fn prepare(out: &Path, id: FileId, manifest: &Manifest) -> Result<(GetState, File)> {
    let part = part_path(out);
    let state_file = state_path(out);
    let size = manifest.size();
    let n = manifest.shards().len();
    let start_over = |what: String| {
        anyhow!(
            "{}: {what}; delete {}* to start over",
            state_file.display(),
            part.display()
        )
    };
    if let Some(state) = load_state(&state_file).map_err(|e| start_over(format!("{e:#}")))? {
        state
            .check_for(id, size, n)
            .map_err(|e| start_over(e.to_string()))?;
        match OpenOptions::new().read(true).write(true).open(&part) {
            Ok(f) if f.metadata().map(|m| m.len()).ok() == Some(size) => return Ok((state, f)),
            Ok(_) => eprintln!(
                "{} is not {size} bytes long; starting the download over",
                part.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                eprintln!("{} is missing; starting the download over", part.display())
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", part.display())),
        }
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&part)
        .with_context(|| format!("creating {}", part.display()))?;
    f.set_len(size)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("making {} {size} bytes long", part.display()))?;
    let state = GetState::new(id, size, n);
    save_state(&state_file, &state).with_context(|| format!("writing {}", state_file.display()))?;
    Ok((state, f))
}

/// One chunk fetched, checked, decrypted and written (not yet fsynced).
struct ChunkDone {
    index: usize,
    plain: u64,
    replicas: Option<u64>,
}

/// What fetching a file's missing chunks works with, by either path (streamed from the
/// holders, or through the node's receptor).
pub(crate) struct Fetch<'a> {
    pub target: Target,
    pub key: Arc<SecretKey>,
    pub enc: Arc<Encryptor>,
    pub manifest: &'a Manifest,
    pub data: Arc<File>,
    pub state_file: &'a Path,
}

/// Fetch, check, decrypt and write every chunk `state` lacks, [`IN_FLIGHT`] at a time,
/// saving the state every few chunks (after an fsync of the data). Returns the lowest
/// replica count the node reported. On an error the chunks already written are saved first.
async fn fetch_missing(
    f: &Fetch<'_>,
    state: &mut GetState,
    progress: &mut Progress,
) -> Result<Option<u64>> {
    let shards: Arc<[ShardRef]> = f.manifest.shards().into();
    let mut todo = state.missing().into_iter();
    let mut tasks = JoinSet::new();
    let mut written: Vec<usize> = Vec::new();
    let mut last_save = Instant::now();
    let mut min_replicas: Option<u64> = None;
    let mut failure: Option<anyhow::Error> = None;
    loop {
        while tasks.len() < IN_FLIGHT {
            let Some(index) = todo.next() else { break };
            tasks.spawn(fetch_chunk(
                f.target,
                f.key.clone(),
                f.enc.clone(),
                shards.clone(),
                index,
                f.data.clone(),
            ));
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        match joined {
            Ok(Ok(done)) => {
                written.push(done.index);
                progress.add(done.plain);
                if let Some(r) = done.replicas {
                    min_replicas = Some(min_replicas.map_or(r, |m| m.min(r)));
                }
                if written.len() >= SAVE_EVERY_CHUNKS || last_save.elapsed() >= SAVE_EVERY {
                    save_progress(&f.data, state, &mut written, f.state_file).await?;
                    last_save = Instant::now();
                }
            }
            Ok(Err(e)) => {
                failure = Some(e);
                break;
            }
            Err(e) => {
                failure = Some(anyhow!("a fetch task failed: {e}"));
                break;
            }
        }
    }
    if failure.is_some() {
        // Let the chunks in flight finish or fail: what they wrote is kept if it completed.
        tasks.abort_all();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Ok(done)) = joined {
                written.push(done.index);
            }
        }
    }
    let saved = save_progress(&f.data, state, &mut written, f.state_file).await;
    match (failure, saved) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Ok(min_replicas),
    }
}

/// Make the chunks in `written` durable (fsync the data), then mark them done and save the
/// state atomically.
pub(crate) async fn save_progress(
    data: &Arc<File>,
    state: &mut GetState,
    written: &mut Vec<usize>,
    state_file: &Path,
) -> Result<()> {
    if written.is_empty() {
        return Ok(());
    }
    let f = data.clone();
    tokio::task::spawn_blocking(move || f.sync_data())
        .await
        .map_err(|e| anyhow!("the fsync task failed: {e}"))?
        .context("fsyncing the downloaded data")?;
    for i in written.drain(..) {
        state.mark_done(i);
    }
    let snapshot = state.clone();
    let path = state_file.to_path_buf();
    tokio::task::spawn_blocking(move || save_state(&path, &snapshot))
        .await
        .map_err(|e| anyhow!("the state task failed: {e}"))?
        .with_context(|| format!("writing {}", state_file.display()))
}

/// Fetch chunk `index`, check it hashes to its address (asking again if not), decrypt it
/// and write its plaintext at `index * CHUNK`.
async fn fetch_chunk(
    target: Target,
    key: Arc<SecretKey>,
    enc: Arc<Encryptor>,
    shards: Arc<[ShardRef]>,
    index: usize,
    data: Arc<File>,
) -> Result<ChunkDone> {
    let shard = shards[index];
    let n = shards.len();
    let addr = shard.addr.to_string();
    let (bytes, replicas) = with_retries("shard.get", || {
        let addr = addr.clone();
        let key = key.clone();
        async move {
            let answer = call(target.addr, &key, "shard.get", json!({ "addr": addr })).await?;
            let text = answer
                .get("data")
                .and_then(Value::as_str)
                .ok_or_else(|| CallError::BadAnswer("no \"data\" in shard.get".into()))?;
            let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|e| {
                CallError::BadData(format!("chunk {index}: the data is not base64url: {e}"))
            })?;
            if bytes.len() != shard.len as usize || !shard.addr.matches(&bytes) {
                return Err(CallError::BadData(format!(
                    "chunk {index}: the node sent {} bytes that are not shard {addr}",
                    bytes.len()
                )));
            }
            Ok((bytes, answer.get("replicas").and_then(Value::as_u64)))
        }
    })
    .await
    .map_err(|e| {
        explain(
            e,
            &target,
            &format!("fetching chunk {index} of {n}"),
            &format!("no node holds shard {} (chunk {index})", shard.addr),
        )
    })?;
    let plain = tokio::task::spawn_blocking(move || -> Result<u64> {
        let plain = enc
            .decrypt_chunk(index as u64, index + 1 == n, &bytes)
            .map_err(|e| {
                anyhow!("{e}: the shard matches its address, so the file was stored damaged")
            })?;
        data.write_all_at(&plain, index as u64 * CHUNK as u64)
            .with_context(|| format!("writing chunk {index}"))?;
        Ok(plain.len() as u64)
    })
    .await
    .map_err(|e| anyhow!("the decrypt task failed: {e}"))??;
    Ok(ChunkDone {
        index,
        plain,
        replicas,
    })
}

/// Every chunk is here: check the whole file's SHA-256 against the manifest, then move
/// `OUT.part` to OUT and remove the state.
fn finish(
    out: &Path,
    part: &Path,
    state_file: &Path,
    data: &File,
    manifest: &Manifest,
    force: bool,
) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    // A handle of its own reads from the start, whatever the shared one's position.
    let mut fresh = File::open(part).with_context(|| format!("reading {}", part.display()))?;
    loop {
        let got = match fresh.read(&mut buf) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", part.display())),
        };
        hasher.update(&buf[..got]);
        size += got as u64;
    }
    if size != manifest.size() || <[u8; 32]>::from(hasher.finalize()) != *manifest.sha256() {
        bail!(
            "{} does not match the manifest's size and SHA-256 although every chunk \
             verified (a disk error?); delete {}* and try again",
            part.display(),
            part.display()
        );
    }
    data.sync_all()
        .with_context(|| format!("fsyncing {}", part.display()))?;
    if !force && out.exists() {
        bail!(
            "{} appeared during the download; give --force to overwrite it (the file is \
             complete in {})",
            out.display(),
            part.display()
        );
    }
    fs::rename(part, out)
        .with_context(|| format!("renaming {} to {}", part.display(), out.display()))?;
    sync_dir(out);
    match fs::remove_file(state_file) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", state_file.display())),
    }
    sync_dir(out);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(b: u8) -> FileId {
        format!("{b:02x}").repeat(32).parse().unwrap()
    }

    #[test]
    fn state_round_trips_and_keeps_done_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.part.state");
        let size = 10 * CHUNK as u64 + 5;
        let mut st = GetState::new(id(1), size, 11);
        assert_eq!(st.missing().len(), 11);
        save_state(&path, &st).unwrap();
        assert_eq!(load_state(&path).unwrap().unwrap(), st);
        st.mark_done(0);
        st.mark_done(9);
        st.mark_done(10);
        st.mark_done(11); // out of range: ignored
        save_state(&path, &st).unwrap();
        let back = load_state(&path).unwrap().unwrap();
        assert_eq!(back, st);
        assert!(back.is_done(9) && back.is_done(10) && !back.is_done(1));
        assert_eq!(back.done_count(), 3);
        assert_eq!(back.missing(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(back.check_for(id(1), size, 11).is_ok());
        for i in back.missing() {
            st.mark_done(i);
        }
        assert!(st.complete());
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.part.state"]);
        assert!(load_state(&dir.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn a_state_for_another_file_is_refused() {
        let st = GetState::new(id(1), 3, 1);
        let err = st.check_for(id(2), 3, 1).unwrap_err();
        assert_eq!(
            err,
            StateError::OtherFile {
                found: id(1),
                wanted: id(2)
            }
        );
        assert!(err.to_string().contains(&id(2).to_string()));
        assert_eq!(
            st.check_for(id(1), 4, 1).unwrap_err(),
            StateError::Mismatch(id(1))
        );
    }

    #[test]
    fn truncated_or_edited_states_are_rejected() {
        let mut st = GetState::new(id(3), 20 * CHUNK as u64, 20);
        st.mark_done(19);
        let text = st.to_json();
        for cut in [0, 1, text.len() / 2, text.len() - 1] {
            assert!(
                matches!(
                    GetState::from_json(&text[..cut]),
                    Err(StateError::Corrupt(_))
                ),
                "cut at {cut}"
            );
        }
        let v: Value = serde_json::from_str(&text).unwrap();
        let edit = |k: &str, val: Value| {
            let mut v = v.clone();
            v[k] = val;
            GetState::from_json(&v.to_string())
        };
        assert!(edit("shards", 21.into()).is_err());
        assert!(edit("chunk", 1000.into()).is_err());
        assert!(edit("v", 2.into()).is_err());
        assert!(edit("done", "00".into()).is_err());
        assert!(edit("done", "0000F0".into()).is_err()); // upper case
        assert!(edit("done", "0000f0".into()).is_err()); // bits past chunk 19
        assert!(edit("done", "000008".into()).is_ok()); // chunk 19
        assert!(edit("id", "zz".into()).is_err());
        let mut extra = v.clone();
        extra["x"] = 1.into();
        assert!(GetState::from_json(&extra.to_string()).is_err());
    }

    #[test]
    fn a_failed_save_leaves_the_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.part.state");
        let mut st = GetState::new(id(4), 2 * CHUNK as u64, 2);
        st.mark_done(0);
        save_state(&path, &st).unwrap();
        let mut newer = st.clone();
        newer.mark_done(1);
        let text = newer.to_json();
        let failed = write_atomic_with(&path, text.as_bytes(), |f, bytes| {
            f.write_all(&bytes[..bytes.len() / 2])?;
            Err(io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(load_state(&path).unwrap().unwrap(), st);
        assert!(!with_suffix(&path, ".tmp").exists());
        // A state file cut short by other means is refused, not half-read.
        fs::write(&path, &text[..text.len() / 2]).unwrap();
        let err = format!("{:#}", load_state(&path).unwrap_err());
        assert!(err.contains("not a valid download state"), "{err}");
    }

    #[test]
    fn part_and_state_names() {
        let out = Path::new("dir/photo.jpg");
        assert_eq!(part_path(out), PathBuf::from("dir/photo.jpg.part"));
        assert_eq!(state_path(out), PathBuf::from("dir/photo.jpg.part.state"));
        assert_eq!(shards_for(0), 1);
        assert_eq!(shards_for(CHUNK as u64), 1);
        assert_eq!(shards_for(CHUNK as u64 + 1), 2);
    }
}
