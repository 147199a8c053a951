//! `borg release`: the maintainer's side of updates (docs/OTA.md). Keys, trust roots,
//! release manifests, approvals and the verify report, all as files; the trust logic is
//! in borg-ota, this file only reads and writes.
//!
//! A maintainer key is a key file (`borg-maintainer-key-v1:` + base64url of the P-256
//! scalar), mode 0600, made by `keygen` next to `FILE.pub` (the public key as text, which is
//! what maintainers exchange). Not a BIP39 phrase: a release key is a role, kept on the
//! maintainer's offline machine or stick, and must not be the maintainer's user identity
//! (`borg id`); a key file also makes hardware tokens a drop-in later.
//!
//! Files are never half written: new files go to a temporary name, are fsynced, then linked
//! to their name (which fails if it exists: nothing is overwritten); files changed in place
//! (`approve`, `root-sign`) are fsynced under a temporary name and renamed over the old one.
//!
//! `publish` and `log` talk to a node's receptor (release_net.rs).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_ota::chunks::ChunkList;
use borg_ota::release::ImageRef;
use borg_ota::verify::NodeView;
use borg_ota::{
    verify, Approval, Board, FetchId, Manifest, ReleaseFile, Root, SignedRoot, TrustedRoot, Version,
};
use borg_proto::identity::{PublicKey, SecretKey};
use clap::Subcommand;

const KEY_PREFIX: &str = "borg-maintainer-key-v1:";
const DAY_MS: u64 = 86_400_000;

#[derive(Subcommand, Debug)]
pub enum ReleaseCommand {
    /// Make a maintainer key: FILE (secret, mode 0600) and FILE.pub (public key as text).
    /// Never overwrites.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Write trust root version 1 (unsigned: each maintainer then runs root-sign).
    RootInit {
        /// Maintainer public keys: base64url text or .pub files, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        keys: Vec<String>,
        /// k: approvals needed, by distinct keys.
        #[arg(long)]
        threshold: u32,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Add your signature to a root file (in place). Version 1 needs k of its own keys;
    /// a rotated root needs k of the previous root's keys and k of its own.
    RootSign {
        root: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The previous root, to report both counts of a rotation.
        #[arg(long, value_name = "FILE")]
        prev: Option<PathBuf>,
    },
    /// Write the next root version (unsigned) with new keys and threshold.
    RootRotate {
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        #[arg(long, value_delimiter = ',', required = true)]
        keys: Vec<String>,
        #[arg(long)]
        threshold: u32,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Write a release manifest for an image (digest and size computed, streaming).
    // Its --version is the release's, not the binary's.
    #[command(disable_version_flag = true)]
    Create {
        #[arg(long, value_name = "FILE")]
        image: PathBuf,
        #[arg(long, value_name = "MAJOR.MINOR.PATCH")]
        version: String,
        /// Target boards, comma-separated (rpi4, rpi5, qemu-virt).
        #[arg(long, value_delimiter = ',', required = true)]
        board: Vec<String>,
        /// The oldest running version that may update to this one.
        #[arg(long, value_name = "VERSION")]
        min_version: String,
        #[arg(long, value_name = "DAYS")]
        expires_days: u64,
        #[arg(long, default_value = "")]
        notes: String,
        /// What nodes fetch the image by; default `chunks:<address of its chunk list>` (the
        /// image stored as shards by `borg release upload`).
        #[arg(long)]
        fetch_id: Option<String>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Add your approval to a release file (in place, atomically).
    Approve {
        manifest: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Your approval expires sooner than the release (default: with the release).
        #[arg(long, value_name = "DAYS")]
        expires_days: Option<u64>,
    },
    /// Say which approvals count and why not, the count against k, and the verdict.
    /// Exit status 0 only when the release is approved.
    Verify {
        manifest: PathBuf,
        /// The trust root; repeat to walk a chain (v1, v2, ...), first is the anchor.
        #[arg(long = "root", value_name = "FILE", required = true)]
        roots: Vec<PathBuf>,
        /// Judge as a node running this version.
        #[arg(long, value_name = "VERSION")]
        running: Option<String>,
        /// Judge as a node of this board.
        #[arg(long)]
        board: Option<String>,
        #[arg(long)]
        json: bool,
        /// Test only: the time to judge at (ms since the epoch).
        #[arg(long, hide = true)]
        now_ms: Option<u64>,
    },
    /// Send a release file (manifest and approvals) to a node: it keeps the approvals that
    /// verify and passes the release on to every node by signed broadcast. Each maintainer
    /// can publish their own approval at any node; every node gathers them all.
    Publish {
        manifest: PathBuf,
        /// The node's receptor, IP[:PORT] (port 13305 by default).
        #[arg(long, value_name = "IP[:PORT]")]
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// Store an image in the network as shards (its chunks and their list), so nodes can
    /// fetch it by the release's `chunks:` fetch id. Give --release to check that the image
    /// is the one the release names.
    Upload {
        #[arg(long, value_name = "FILE")]
        image: PathBuf,
        /// The node's receptor, IP[:PORT] (its peerTreeNet port, 13305 by default).
        #[arg(long, value_name = "IP[:PORT]")]
        node: String,
        #[arg(long, value_name = "FILE")]
        release: Option<PathBuf>,
    },
    /// Show a node's update audit log (releases, approvals, roots, refusals, installs) and
    /// the releases it is gathering, with their approval counts.
    Log {
        /// The node's receptor, IP[:PORT] (port 13305 by default).
        #[arg(long, value_name = "IP[:PORT]")]
        node: String,
        /// The last N entries (1 to 512; default 100).
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ReleaseCommand) -> Result<()> {
    match cmd {
        ReleaseCommand::Keygen { out } => keygen(&out),
        ReleaseCommand::RootInit {
            keys,
            threshold,
            out,
        } => {
            let root = Root::new(1, parse_keys(&keys)?, threshold)?;
            write_new(&out, &pretty(&SignedRoot::unsigned(root))?, 0o644)?;
            println!(
                "wrote root version 1 ({} keys, threshold {threshold}) to {}; \
                 now {threshold} maintainers run `borg release root-sign`",
                keys.len(),
                out.display()
            );
            Ok(())
        }
        ReleaseCommand::RootSign { root, key, prev } => root_sign(&root, &key, prev.as_deref()),
        ReleaseCommand::RootRotate {
            from,
            keys,
            threshold,
            out,
        } => {
            let old = read_root(&from)?;
            let version = old.signed.version + 1;
            let root = Root::new(version, parse_keys(&keys)?, threshold)?;
            write_new(&out, &pretty(&SignedRoot::unsigned(root))?, 0o644)?;
            println!(
                "wrote root version {version} to {}; it needs {} signatures by keys of \
                 version {} and {threshold} by its own (root-sign --prev {})",
                out.display(),
                old.signed.threshold,
                old.signed.version,
                from.display()
            );
            Ok(())
        }
        ReleaseCommand::Create {
            image,
            version,
            board,
            min_version,
            expires_days,
            notes,
            fetch_id,
            out,
        } => {
            let file = fs::File::open(&image)
                .with_context(|| format!("opening image {}", image.display()))?;
            let (list, sha256) = ChunkList::build(std::io::BufReader::new(file), |_, _| Ok(()))?;
            let size = list.size;
            let fetch = match fetch_id {
                Some(f) => FetchId::new(&f)?,
                None => list.fetch_id(),
            };
            let manifest = Manifest {
                tag: Default::default(),
                version: version.parse()?,
                boards: board
                    .iter()
                    .map(|b| Board::new(b))
                    .collect::<Result<_, _>>()?,
                image: ImageRef { sha256, size },
                min_version: min_version.parse()?,
                expires_ms: now_ms()?.saturating_add(expires_days.saturating_mul(DAY_MS)),
                notes,
                fetch,
            };
            let release = ReleaseFile {
                manifest,
                approvals: Vec::new(),
            };
            // Refuse here what nodes would refuse on decode.
            release.manifest.check()?;
            write_new(&out, &pretty(&release)?, 0o644)?;
            println!(
                "wrote release {version} ({size} bytes, sha256 {sha256}) to {}; manifest {}",
                out.display(),
                release.manifest.digest()
            );
            Ok(())
        }
        ReleaseCommand::Approve {
            manifest,
            key,
            expires_days,
        } => approve(&manifest, &key, expires_days),
        ReleaseCommand::Verify {
            manifest,
            roots,
            running,
            board,
            json,
            now_ms: at,
        } => verify_cmd(&manifest, &roots, running, board, json, at),
        ReleaseCommand::Publish {
            manifest,
            node,
            json,
        } => crate::release_net::publish(&node, &manifest, json),
        ReleaseCommand::Log { node, limit, json } => crate::release_net::log(&node, limit, json),
        ReleaseCommand::Upload {
            image,
            node,
            release,
        } => crate::release_net::upload(&node, &image, release.as_deref()),
    }
}

fn now_ms() -> Result<u64> {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| anyhow!("the system clock is before 1970"))?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn pretty<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn keygen(out: &Path) -> Result<()> {
    let key = SecretKey::generate();
    let public = key.public().to_b64();
    let pub_path = pub_path(out);
    if pub_path.exists() {
        bail!("{} exists; not overwriting it", pub_path.display());
    }
    let body = format!(
        "# BorgIOS maintainer key (release signing). Never share this file.\n\
         # public: {public}\n{KEY_PREFIX}{}\n",
        URL_SAFE_NO_PAD.encode(key.scalar_bytes())
    );
    write_new(out, body.as_bytes(), 0o600)?;
    write_new(&pub_path, format!("{public}\n").as_bytes(), 0o644)?;
    println!("{public}");
    eprintln!(
        "maintainer key written to {} (mode 0600), public key to {}",
        out.display(),
        pub_path.display()
    );
    Ok(())
}

fn pub_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Read a maintainer key file; refused when others can read it (as ssh refuses a key).
fn read_key(path: &Path) -> Result<SecretKey> {
    let meta = fs::metadata(path).with_context(|| format!("reading key {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} can be read by others (mode {mode:o}); chmod 600 it and try again",
            path.display()
        );
    }
    let text =
        fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(KEY_PREFIX))
        .ok_or_else(|| anyhow!("{} is not a maintainer key file", path.display()))?;
    let scalar: [u8; 32] = URL_SAFE_NO_PAD
        .decode(line.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow!("{}: the key is corrupt", path.display()))?;
    SecretKey::from_scalar_bytes(&scalar)
        .ok_or_else(|| anyhow!("{}: not a valid P-256 key", path.display()))
}

/// Public keys given as base64url text or as files holding it (e.g. `keygen`'s FILE.pub).
fn parse_keys(items: &[String]) -> Result<Vec<PublicKey>> {
    items
        .iter()
        .map(|item| {
            if let Ok(k) = PublicKey::from_b64(item) {
                return Ok(k);
            }
            let text = fs::read_to_string(item)
                .with_context(|| format!("{item:?} is neither a public key nor a readable file"))?;
            PublicKey::from_b64(text.trim())
                .map_err(|e| anyhow!("{item}: not a public key file: {e}"))
        })
        .collect()
}

pub(crate) fn read_root(path: &Path) -> Result<SignedRoot> {
    let bytes = fs::read(path).with_context(|| format!("reading root {}", path.display()))?;
    SignedRoot::decode(&bytes).with_context(|| format!("root {}", path.display()))
}

pub(crate) fn read_release(path: &Path) -> Result<ReleaseFile> {
    let bytes = fs::read(path).with_context(|| format!("reading release {}", path.display()))?;
    ReleaseFile::decode(&bytes).with_context(|| format!("release {}", path.display()))
}

fn root_sign(path: &Path, key: &Path, prev: Option<&Path>) -> Result<()> {
    let mut root = read_root(path)?;
    let key = read_key(key)?;
    let prev = prev.map(read_root).transpose()?;
    let known = root.signed.has_key(&key.public())
        || prev
            .as_ref()
            .is_some_and(|p| p.signed.has_key(&key.public()));
    if !known {
        bail!(
            "key {} is not in this root{}; its signature would not count",
            key.public().short(),
            if prev.is_some() {
                " nor in the previous one"
            } else {
                " (give --prev for a rotation)"
            }
        );
    }
    let again = root.sign(&key);
    replace(path, &pretty(&root)?)?;
    let own = root.tally(&root.signed.keys, root.signed.threshold);
    println!(
        "{} {}; its own keys: {} of {}",
        if again { "re-signed" } else { "signed" },
        path.display(),
        own.counted,
        own.threshold
    );
    if let Some(p) = prev {
        let old = root.tally(&p.signed.keys, p.signed.threshold);
        println!(
            "previous root (version {}) keys: {} of {}",
            p.signed.version, old.counted, old.threshold
        );
    }
    Ok(())
}

fn approve(path: &Path, key: &Path, expires_days: Option<u64>) -> Result<()> {
    let mut release = read_release(path)?;
    let key = read_key(key)?;
    let m = &release.manifest;
    let expires_ms = match expires_days {
        Some(d) => now_ms()?
            .saturating_add(d.saturating_mul(DAY_MS))
            .min(m.expires_ms),
        None => m.expires_ms,
    };
    let approval = Approval::sign(&key, m, expires_ms);
    let version = m.version;
    if release.add_approval(approval)? {
        eprintln!(
            "warning: key {} had already approved this release; the duplicate will not count",
            key.public().short()
        );
    }
    replace(path, &pretty(&release)?)?;
    println!(
        "approved release {version} with key {} ({} approvals in the file)",
        key.public().short(),
        release.approvals.len()
    );
    Ok(())
}

/// The trusted root from `--root` files: the first is the anchor (k of its own signatures),
/// the rest are walked in order.
pub(crate) fn walk_roots(roots: &[PathBuf]) -> Result<TrustedRoot> {
    let (anchor, chain) = roots.split_first().ok_or_else(|| anyhow!("give --root"))?;
    let anchor = TrustedRoot::anchor(&read_root(anchor)?)
        .with_context(|| format!("trust root {}", anchor.display()))?;
    let chain = chain
        .iter()
        .map(|p| read_root(p))
        .collect::<Result<Vec<_>>>()?;
    anchor.walk(&chain).context("walking the root chain")
}

fn verify_cmd(
    path: &Path,
    roots: &[PathBuf],
    running: Option<String>,
    board: Option<String>,
    json: bool,
    at: Option<u64>,
) -> Result<()> {
    let root = walk_roots(roots)?;
    let release = read_release(path)?;
    let now = match at {
        Some(t) => t,
        None => now_ms()?,
    };
    let node = NodeView {
        now_ms: now,
        floor_ms: 0,
        running: running.map(|r| r.parse::<Version>()).transpose()?,
        board: board.map(|b| Board::new(&b)).transpose()?,
        refused: Default::default(),
    };
    let report = verify(&root, &release.manifest, &release.approvals, &node);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let m = &release.manifest;
        let boards: Vec<&str> = m.boards.iter().map(Board::as_str).collect();
        println!(
            "release {} for {} (image sha256 {}, {} bytes), manifest {}, root version {}",
            m.version,
            boards.join(","),
            m.image.sha256.short(),
            m.image.size,
            report.manifest.short(),
            report.root_version
        );
        for (i, a) in report.approvals.iter().enumerate() {
            println!(
                "  approval {} by {}: {}",
                i + 1,
                a.key.short(),
                a.status.explain()
            );
        }
        println!(
            "approvals: {} of {} needed",
            report.counted, report.threshold
        );
        if report.approved {
            println!("verdict: approved");
        } else {
            for r in &report.refusals {
                println!("verdict: refused: {}", r.explain());
            }
        }
    }
    if !report.approved {
        bail!("release not approved ({})", report.verdict_code());
    }
    Ok(())
}

/// Write a file that must not exist yet: temporary name, fsync, link (fails if the name
/// exists), fsync the directory.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if path.exists() {
        bail!("{} exists; not overwriting it", path.display());
    }
    let tmp = temp_name(path)?;
    write_synced(&tmp, bytes, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} exists; not overwriting it", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("writing {}", path.display())),
    }
}

/// Replace a file atomically: temporary name, fsync, rename over, fsync the directory.
fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o644);
    let tmp = temp_name(path)?;
    write_synced(&tmp, bytes, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("replacing {}", path.display()));
    }
    sync_dir(path)
}

fn temp_name(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file name", path.display()))?;
    Ok(path.with_file_name(format!(
        ".{}.{}.{:016x}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    )))
}

fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(path);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
