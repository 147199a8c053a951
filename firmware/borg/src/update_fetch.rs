//! `borg update fetch`: fetch an approved release's image through the storage layer into a
//! slot (a partition, or any file standing in for one), resumably, and verify the slot by
//! reading it back (docs/OTA.md "Fetching the image"). PID 1 runs the same [`install`] for an
//! approved release; the command is for maintainers and tests.
//!
//! Order, so that nothing is written for a release this node must not run:
//! 1. the release is judged against the trust root ([`borg_ota::verify`]): fewer than k
//!    approvals, a downgrade, the wrong board or an expired release stop here;
//! 2. the chunk list named by the manifest's fetch id is fetched and checked against its
//!    address, and its size against the manifest's;
//! 3. each chunk: if the slot already holds it (its SHA-256 matches), it is kept (this is
//!    the resume: an interrupted fetch costs nothing twice); otherwise it is fetched through
//!    the node (`shard.get`), checked against its address, and written at its offset;
//! 4. the slot is fsynced and read back whole: its SHA-256 must be the manifest's image
//!    digest, or the install fails (and nothing asks the firmware to boot the slot).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_ota::chunks::{list_address, ChunkList};
use borg_ota::verify::NodeView;
use borg_ota::{verify, Board, ReleaseFile, Sha256Hex, TrustedRoot, Version};
use borg_proto::identity::SecretKey;
use clap::Args;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::task::JoinSet;

use crate::files_net::{self, CallError, Target, IN_FLIGHT};

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// The release file (manifest and approvals).
    #[arg(long, value_name = "FILE")]
    release: PathBuf,
    /// The trust root; repeat to walk a chain (v1, v2, ...), first is the anchor.
    #[arg(long = "root", value_name = "FILE", required = true)]
    roots: Vec<PathBuf>,
    /// A node's receptor, IP[:PORT] (its peerTreeNet port, 13305 by default).
    #[arg(long, value_name = "IP[:PORT]")]
    node: String,
    /// The slot to write: a partition, or a file standing in for one (never truncated).
    #[arg(long, value_name = "PATH")]
    slot: PathBuf,
    /// Where in --slot the image starts (bytes).
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Judge as a node running this version (default: this borg's).
    #[arg(long, value_name = "VERSION")]
    running: Option<String>,
    /// Judge as a node of this board.
    #[arg(long)]
    board: Option<String>,
    #[arg(long)]
    json: bool,
}

/// What an install did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub chunks: usize,
    pub fetched: usize,
    pub kept: usize,
    pub bytes_fetched: u64,
    pub fetch_s: f64,
    pub verify_s: f64,
    pub size: u64,
}

impl Summary {
    fn json(&self) -> Value {
        json!({
            "chunks": self.chunks, "fetched": self.fetched, "kept": self.kept,
            "bytes_fetched": self.bytes_fetched, "size": self.size,
            "fetch_seconds": self.fetch_s, "verify_seconds": self.verify_s,
            "fetch_mib_s": self.bytes_fetched as f64 / self.fetch_s.max(1e-9) / (1u64 << 20) as f64,
            "verify_mib_s": self.size as f64 / self.verify_s.max(1e-9) / (1u64 << 20) as f64,
        })
    }
}

pub fn run(args: FetchArgs) -> Result<()> {
    let root = crate::release::walk_roots(&args.roots)?;
    let release = crate::release::read_release(&args.release)?;
    let running: Version = match &args.running {
        Some(v) => v.parse()?,
        None => borg_cells::ota::image_version(),
    };
    let view = NodeView {
        now_ms: borg_net::node::now_ms(),
        floor_ms: 0,
        running: Some(running),
        board: args.board.as_deref().map(Board::new).transpose()?,
        refused: Default::default(),
    };
    let target = files_net::parse_node(&args.node)?.shard;
    let summary = install(target, &release, &root, &view, &args.slot, args.offset)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary.json())?);
    } else {
        let j = summary.json();
        println!(
            "release {} written to {} and verified: {} chunks, {} fetched ({:.1} MiB/s), {} \
             already there; read back at {:.1} MiB/s",
            release.manifest.version,
            args.slot.display(),
            summary.chunks,
            summary.fetched,
            j["fetch_mib_s"].as_f64().unwrap_or(0.0),
            summary.kept,
            j["verify_mib_s"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// Judge, fetch, write and verify (see the module doc). Nothing is written unless the release
/// is approved for `view`.
pub fn install(
    target: Target,
    release: &ReleaseFile,
    root: &TrustedRoot,
    view: &NodeView,
    slot: &Path,
    offset: u64,
) -> Result<Summary> {
    let m = &release.manifest;
    let report = verify(root, m, &release.approvals, view);
    if !report.approved {
        let why: Vec<String> = report.refusals.iter().map(|r| r.explain()).collect();
        bail!(
            "release {} refused before anything was written: {}",
            m.version,
            why.join("; ")
        );
    }
    let list_addr = list_address(&m.fetch).ok_or_else(|| {
        anyhow!(
            "release {} names its image by {:?}; this node fetches `chunks:` images only",
            m.version,
            m.fetch.as_str()
        )
    })?;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(slot)
        .with_context(|| format!("opening the slot {}", slot.display()))?;
    let room = f.seek(SeekFrom::End(0))?;
    if room < offset.saturating_add(m.image.size) {
        bail!(
            "the slot {} has {room} bytes; the image needs {} from offset {offset}",
            slot.display(),
            m.image.size
        );
    }
    let slot_file = Arc::new(f);
    let rt = files_net::runtime()?;
    let key = Arc::new(SecretKey::generate());
    let started = Instant::now();
    let list_bytes = rt.block_on(get_shard(target, key.clone(), list_addr))?;
    let list = ChunkList::decode(&list_bytes)?;
    if list.size != m.image.size {
        bail!(
            "the chunk list is of a {}-byte image; the release says {} bytes",
            list.size,
            m.image.size
        );
    }
    let list = Arc::new(list);
    let mut summary = Summary {
        chunks: list.addrs.len(),
        size: list.size,
        ..Summary::default()
    };
    rt.block_on(async {
        let mut tasks = JoinSet::new();
        let mut next = 0;
        while next < list.addrs.len() || !tasks.is_empty() {
            while next < list.addrs.len() && tasks.len() < IN_FLIGHT {
                tasks.spawn(chunk(
                    target,
                    key.clone(),
                    list.clone(),
                    next,
                    slot_file.clone(),
                    offset,
                ));
                next += 1;
            }
            if let Some(done) = tasks.join_next().await {
                match done.map_err(|e| anyhow!("a fetch task failed: {e}"))?? {
                    Some(n) => {
                        summary.fetched += 1;
                        summary.bytes_fetched += n;
                    }
                    None => summary.kept += 1,
                }
            }
        }
        Ok::<(), anyhow::Error>(())
    })?;
    slot_file.sync_all().context("syncing the slot")?;
    // The read-back checks the device, not the page cache.
    borg_system::sys::drop_cached(&slot_file);
    summary.fetch_s = started.elapsed().as_secs_f64();
    let t = Instant::now();
    let got = digest_range(&slot_file, offset, m.image.size)?;
    summary.verify_s = t.elapsed().as_secs_f64();
    if got != m.image.sha256 {
        bail!(
            "the slot reads back as sha256 {}, not the release's {}: not installed",
            got.short(),
            m.image.sha256.short()
        );
    }
    Ok(summary)
}

/// SHA-256 of `len` bytes of `f` from `offset`, read in 1 MiB pieces.
fn digest_range(f: &File, offset: u64, len: u64) -> Result<Sha256Hex> {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset + at)
            .context("reading the slot back")?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(Sha256Hex::from_bytes(h.finalize().into()))
}

/// One chunk: kept if the slot has it already (None), else fetched and written (Some(bytes)).
async fn chunk(
    target: Target,
    key: Arc<SecretKey>,
    list: Arc<ChunkList>,
    i: usize,
    slot: Arc<File>,
    offset: u64,
) -> Result<Option<u64>> {
    let (start, len) = list.span(i);
    let addr = list.addrs[i];
    let at = offset + start;
    let have = {
        let slot = slot.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            slot.read_exact_at(&mut buf, at)
                .map(|()| Sha256Hex::of(&buf))
        })
        .await??
    };
    if have == addr {
        return Ok(None);
    }
    let bytes = get_shard(target, key, addr).await?;
    if bytes.len() != len {
        bail!("chunk {i} is {} bytes; the list says {len}", bytes.len());
    }
    tokio::task::spawn_blocking(move || slot.write_all_at(&bytes, at))
        .await?
        .with_context(|| format!("writing chunk {i} to the slot"))?;
    Ok(Some(len as u64))
}

/// A shard by address through the node's receptor, checked against the address (asked
/// again, with backoff, if a holder sent other bytes).
async fn get_shard(target: Target, key: Arc<SecretKey>, addr: Sha256Hex) -> Result<Vec<u8>> {
    let text = addr.to_string();
    files_net::with_retries("shard.get", || {
        let key = key.clone();
        let text = text.clone();
        async move {
            let answer =
                files_net::call(target.addr, &key, "shard.get", json!({ "addr": text })).await?;
            let data = answer
                .get("data")
                .and_then(Value::as_str)
                .ok_or_else(|| CallError::BadAnswer("no \"data\" in shard.get".into()))?;
            let bytes = URL_SAFE_NO_PAD
                .decode(data)
                .map_err(|e| CallError::BadData(format!("not base64url: {e}")))?;
            if Sha256Hex::of(&bytes) != addr {
                return Err(CallError::BadData(format!(
                    "the node sent bytes that are not shard {}",
                    addr.short()
                )));
            }
            Ok(bytes)
        }
    })
    .await
    .map_err(|e| {
        files_net::explain(
            e,
            &target,
            &format!("fetching image shard {}", addr.short()),
            &format!(
                "no node holds shard {addr}: was the image stored with `borg release upload`?"
            ),
        )
    })
}
