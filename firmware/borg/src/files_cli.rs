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
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_files::{
    encrypt_reader, seal_delete, seal_manifest, wrap_key, Encrypted, FileId, FileKey, Manifest,
    ShardRef, WrappedKey, MAX_FILE_SIZE, SALT_LEN, TAG_LEN,
};
use borg_proto::identity::SecretKey;
use borg_store::{Address, StoreError};
use clap::Args;
use rand::rngs::OsRng;
use rand::RngCore;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub(crate) use crate::files_net::*;
pub(crate) use crate::files_progress::*;

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
    use borg_files::UserKeys;
    use borg_net::client::ClientError;
    use std::time::Duration;

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
