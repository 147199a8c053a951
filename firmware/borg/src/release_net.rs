//! `borg release publish` and `borg release log`: the maintainer's side that talks to a node
//! (its peerTreeNet receptor, `release.publish` and `release.log`; docs/OTA.md "Publishing").
//!
//! A request is signed by a throwaway key: what gives a release its weight is the
//! maintainers' approvals inside the file, not who hands it to the node.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_ota::chunks::{ChunkList, IMAGE_CHUNK};
use borg_ota::Sha256Hex;
use borg_proto::dna::PEER_TREE_NET;
use borg_proto::identity::SecretKey;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::files_net::{self, CallError, Target, IN_FLIGHT};

/// `IP` or `IP:PORT` of a node's peerTreeNet receptor (13305 by default).
pub(crate) fn receptor(text: &str) -> Result<SocketAddr> {
    crate::cli::parse_endpoint(text, PEER_TREE_NET.recp_port).map_err(|e| anyhow!("--node {e}"))
}

fn call(addr: SocketAddr, kind: &'static str, body: Value) -> Result<Value> {
    let key = SecretKey::generate();
    files_net::runtime()?
        .block_on(files_net::with_retries(kind, || {
            files_net::call(addr, &key, kind, body.clone())
        }))
        .map_err(|e| explain(e, addr, kind))
}

fn explain(e: CallError, addr: SocketAddr, kind: &str) -> anyhow::Error {
    match e {
        CallError::Unreachable(err) => {
            anyhow!("{kind}: {err}: is a node running with its receptor on {addr}?")
        }
        CallError::Refused { code, message, .. } if code == "unknown_kind" => anyhow!(
            "{kind}: the node on {addr} does not take releases ({message}); is it running \
             borg with updates (this version or later)?"
        ),
        CallError::Refused {
            status,
            code,
            message,
        } => anyhow!("{kind}: the node on {addr} refused ({status} {code}): {message}"),
        other => anyhow!("{kind}: {other}"),
    }
}

/// Send a release file (manifest and approvals) to a node, which passes it on to every node.
pub fn publish(node: &str, path: &Path, json_out: bool) -> Result<()> {
    let addr = receptor(node)?;
    let release = super::release::read_release(path)?;
    let body = json!({ "release": release });
    let answer = call(addr, borg_cells::ota::PUBLISH_KIND, body)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let s = |k: &str| answer[k].as_str().map(files_net::clip).unwrap_or_default();
    let n = |k: &str| answer[k].as_u64().unwrap_or(0);
    println!(
        "release {} (manifest {}) published at {addr}: {} new approval(s) taken; {} of {} \
         counted on that node; {}",
        s("version"),
        s("manifest").chars().take(12).collect::<String>(),
        n("added"),
        n("counted"),
        n("threshold"),
        if answer["approved"] == true {
            "approved".to_string()
        } else {
            format!("not approved yet ({})", s("verdict"))
        },
    );
    if answer["broadcast"] == true {
        println!("the node is passing it on to every node of the network");
    } else {
        println!("the node knew all of this already; nothing new was sent on");
    }
    Ok(())
}

/// Store one shard at `target`, checking the address the node says it stored it under.
async fn put_shard(
    target: Target,
    key: Arc<SecretKey>,
    addr: Sha256Hex,
    bytes: Vec<u8>,
) -> Result<()> {
    let body = json!({ "data": URL_SAFE_NO_PAD.encode(&bytes) });
    let answer = files_net::with_retries("shard.put", || {
        files_net::call(target.addr, &key, "shard.put", body.clone())
    })
    .await
    .map_err(|e| {
        files_net::explain(
            e,
            &target,
            &format!("storing chunk {}", addr.short()),
            "not_found",
        )
    })?;
    if answer.get("addr").and_then(Value::as_str) != Some(addr.to_string().as_str()) {
        bail!(
            "the node stored chunk {} under another address",
            addr.short()
        );
    }
    Ok(())
}

fn check_image(
    m: &borg_ota::Manifest,
    list: &ChunkList,
    digest: &Sha256Hex,
    image: &Path,
) -> Result<()> {
    if m.image.sha256 != *digest || m.fetch.as_str() != list.fetch_id().as_str() {
        bail!(
            "{} is not the image of this release (its sha256 {}, fetch id {}; the release \
             names {} and {})",
            image.display(),
            digest.short(),
            list.fetch_id().as_str(),
            m.image.sha256.short(),
            m.fetch.as_str()
        );
    }
    Ok(())
}

/// `borg release upload`: store the image's chunks and chunk list as shards at `node`.
pub fn upload(node: &str, image: &Path, release: Option<&Path>) -> Result<()> {
    let target = files_net::parse_node(node)?.shard;
    let want = release
        .map(|p| super::release::read_release(p).map(|r| r.manifest))
        .transpose()?;
    let open =
        || std::fs::File::open(image).with_context(|| format!("opening {}", image.display()));
    if let Some(m) = &want {
        // Refuse the wrong image before storing any of it.
        let (list, digest) = ChunkList::build(std::io::BufReader::new(open()?), |_, _| Ok(()))?;
        check_image(m, &list, &digest, image)?;
    }
    let file = open()?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let key = Arc::new(SecretKey::generate());
    let start = Instant::now();
    let (tx, mut rx) = mpsc::channel::<(Sha256Hex, Vec<u8>)>(IN_FLIGHT);
    let reader = std::thread::Builder::new()
        .name("borg-upload-read".into())
        .spawn(move || {
            ChunkList::build(std::io::BufReader::new(file), |addr, chunk| {
                tx.blocking_send((*addr, chunk.to_vec()))
                    .map_err(|_| borg_ota::OtaError::Io("the upload stopped".into()))
            })
        })
        .context("starting the reading thread")?;
    let rt = files_net::runtime()?;
    let sent = rt.block_on(async {
        let mut uploads = JoinSet::new();
        let mut open = true;
        let mut done = 0u64;
        while open || !uploads.is_empty() {
            tokio::select! {
                next = rx.recv(), if open && uploads.len() < IN_FLIGHT => match next {
                    Some((addr, bytes)) => {
                        uploads.spawn(put_shard(target, key.clone(), addr, bytes));
                    }
                    None => open = false,
                },
                Some(joined) = uploads.join_next(), if !uploads.is_empty() => {
                    joined.map_err(|e| anyhow!("an upload task failed: {e}"))??;
                    done += 1;
                    if done.is_multiple_of(16) {
                        eprint!("\ruploaded {} of {} MiB", (done * IMAGE_CHUNK as u64) >> 20, total >> 20);
                    }
                }
            }
        }
        Ok::<u64, anyhow::Error>(done)
    });
    drop(rx);
    let built = reader
        .join()
        .map_err(|_| anyhow!("the reading thread panicked"))?;
    let sent = sent?;
    let (list, digest) = built.with_context(|| format!("reading {}", image.display()))?;
    if let Some(m) = &want {
        // The file changed while it was read.
        check_image(m, &list, &digest, image)?;
    }
    rt.block_on(put_shard(
        target,
        key.clone(),
        list.address(),
        list.encode(),
    ))?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!();
    println!(
        "stored {} ({} bytes, sha256 {}) as {sent} chunks and their list in {secs:.1} s \
         ({:.1} MiB/s); fetch id {}",
        image.display(),
        list.size,
        digest,
        list.size as f64 / secs.max(1e-9) / (1 << 20) as f64,
        list.fetch_id().as_str()
    );
    Ok(())
}

/// Print a node's update audit log and the releases it is gathering.
pub fn log(node: &str, limit: Option<u64>, json_out: bool) -> Result<()> {
    let addr = receptor(node)?;
    let body = match limit {
        Some(n) => json!({ "limit": n }),
        None => json!({}),
    };
    let answer = call(addr, borg_cells::ota::LOG_KIND, body)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    print!("{}", render_log(&answer));
    Ok(())
}

/// The human form of a `release.log` answer (node-supplied text clipped and cleaned).
fn render_log(a: &Value) -> String {
    let s = |v: &Value| {
        v.as_str()
            .map(files_net::clip)
            .unwrap_or_else(|| v.to_string())
    };
    let mut out = format!(
        "running {}, trust root version {} (k = {}), time floor {} ms\n",
        s(&a["running"]),
        a["root_version"],
        a["threshold"],
        a["floor_ms"]
    );
    let pending = a["pending"].as_array().cloned().unwrap_or_default();
    if pending.is_empty() {
        out.push_str("no release being gathered\n");
    }
    for p in &pending {
        out.push_str(&format!(
            "release {} (manifest {}): {} of {} approvals, {}\n",
            s(&p["version"]),
            s(&p["manifest"]).chars().take(12).collect::<String>(),
            p["counted"],
            p["threshold"],
            if p["approved"] == true {
                "approved".to_string()
            } else {
                s(&p["verdict"])
            }
        ));
    }
    for e in a["entries"].as_array().into_iter().flatten() {
        let ev = &e["event"];
        let what = match ev["event"].as_str().unwrap_or("") {
            "approval_seen" => format!(
                "approval of {} by {}",
                s(&ev["version"]),
                s(&ev["key"]).chars().take(12).collect::<String>()
            ),
            "release_seen" => format!(
                "release {}: {} of {}, {}",
                s(&ev["version"]),
                ev["counted"],
                ev["threshold"],
                s(&ev["verdict"])
            ),
            "root_trusted" => format!("trust root version {} trusted", ev["version"]),
            "root_refused" => format!(
                "trust root version {} refused: {}",
                ev["version"],
                s(&ev["reason"])
            ),
            "refused" => format!(
                "release {} refused: {}",
                s(&ev["version"]),
                s(&ev["reason"])
            ),
            "installed" => format!("running {}", s(&ev["version"])),
            other => files_net::clip(other),
        };
        out.push_str(&format!("{} {what}\n", e["at_ms"]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_reads_as_sentences_and_node_text_is_cleaned() {
        let a = json!({
            "running": "0.1.0", "root_version": 1, "threshold": 2, "floor_ms": 5,
            "pending": [{"version": "0.2.0", "manifest": "ab".repeat(32), "counted": 1,
                         "threshold": 2, "approved": false, "verdict": "not_enough_approvals"}],
            "entries": [
                {"at_ms": 7, "event": {"event": "approval_seen", "version": "0.2.0",
                 "manifest": "ab".repeat(32), "key": "Akey\u{1b}[2J"}},
                {"at_ms": 8, "event": {"event": "installed", "version": "0.1.0"}},
            ],
        });
        let text = render_log(&a);
        assert!(text.contains("release 0.2.0 (manifest abababababab): 1 of 2 approvals"));
        assert!(text.contains("7 approval of 0.2.0 by Akey?[2J"), "{text}");
        assert!(text.contains("8 running 0.1.0"));
        assert!(!text.contains('\u{1b}'));
    }

    #[test]
    fn a_bad_node_address_is_explained() {
        let e = receptor("node-1").unwrap_err().to_string();
        assert!(e.contains("is not an address"), "{e}");
        assert_eq!(receptor("127.0.0.9").unwrap().port(), 13305);
    }
}
