//! Where the update cell's trust root comes from and how its state survives a power cut.
//!
//! - **The image root**: `$BORG_OTA_ROOT`, else `/etc/borg/ota-root.json` (put there by the
//!   image builder). Read once at start; without it the node has no maintainers and takes no
//!   release (status `update.enabled: false`, with the reason).
//! - **`<data>/ota.json`**: the persisted [`OtaState`] (root chain head, running version,
//!   refused versions, time floor, audit ring).
//! - **`<data>/ota-pending.json`**: the releases being gathered, each with only the
//!   approvals that verified here: `{"type":"borg.ota.pending","releases":[<release file>…]}`.
//!   At start each goes through the book again, so a root rotated since is applied.
//!
//! Both are written the same way, so a power cut at any instant leaves the old or the new
//! file, never a mix: write `NAME.tmp`, fsync it, rename it over `NAME`, fsync the directory.
//! The data partition is ext4 (rename is atomic there; on FAT it would not be).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use borg_net::cell::{Work, WorkDone};
use borg_ota::{OtaState, ReleaseFile, SignedRoot};
use serde_json::{json, Value};

/// Where the image's trust root is when `$BORG_OTA_ROOT` is not set.
pub const IMAGE_ROOT_PATH: &str = "/etc/borg/ota-root.json";
/// Environment variable naming another trust root file (tests, development images).
pub const ROOT_ENV: &str = "BORG_OTA_ROOT";
const STATE_FILE: &str = "ota.json";
const PENDING_FILE: &str = "ota-pending.json";
/// Largest pending file read: eight releases of at most 64 KiB each, with room.
const MAX_PENDING_FILE: u64 = 1 << 20;
const PENDING_TYPE: &str = "borg.ota.pending";

/// The image root's path: `$BORG_OTA_ROOT` or [`IMAGE_ROOT_PATH`].
pub fn image_root_path() -> PathBuf {
    std::env::var_os(ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(IMAGE_ROOT_PATH))
}

/// Read and decode the image root. Err is a sentence for the status and the log.
pub fn read_image_root(path: &Path) -> Result<SignedRoot, String> {
    let bytes = read_bounded(path, borg_ota::MAX_DOC_BYTES as u64)
        .map_err(|e| format!("no trust root at {}: {e}", path.display()))?;
    SignedRoot::decode(&bytes).map_err(|e| format!("trust root {}: {e}", path.display()))
}

fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let len = fs::metadata(path)?.len();
    if len > max {
        return Err(std::io::Error::other(format!(
            "{len} bytes, more than the {max} allowed"
        )));
    }
    fs::read(path)
}

/// The saved state, if there is one. Err: it exists but cannot be read or decoded.
pub fn read_state(dir: &Path) -> Result<Option<OtaState>, String> {
    let path = dir.join(STATE_FILE);
    match read_bounded(&path, borg_ota::MAX_STATE_BYTES as u64) {
        Ok(bytes) => OtaState::decode(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The saved pending releases (each decoded with every bound); a bad file reads as none.
pub fn read_pending(dir: &Path) -> Result<Vec<ReleaseFile>, String> {
    let path = dir.join(PENDING_FILE);
    let bytes = match read_bounded(&path, MAX_PENDING_FILE) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let value =
        borg_proto::jcs::parse_strict(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if value.get("type").and_then(Value::as_str) != Some(PENDING_TYPE) {
        return Err(format!("{}: not a pending-releases file", path.display()));
    }
    let list = value
        .get("releases")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{}: no releases list", path.display()))?;
    list.iter()
        .take(super::book::MAX_PENDING)
        .map(|v| {
            ReleaseFile::decode(v.to_string().as_bytes())
                .map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}

/// The bytes of the pending file for `releases`.
pub fn pending_bytes<'a>(releases: impl Iterator<Item = &'a ReleaseFile>) -> Vec<u8> {
    let list: Vec<Value> = releases
        .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        .collect();
    borg_proto::jcs::to_vec(&json!({"type": PENDING_TYPE, "releases": list}))
}

/// What a save job returns to the cell.
#[derive(Debug)]
pub struct Saved(pub Result<(), String>);

/// A job writing both files (each atomically; the state first).
pub fn save_job(dir: PathBuf, state: Vec<u8>, pending: Vec<u8>) -> Work {
    Box::new(move || -> WorkDone {
        let result = write_atomic(&dir, STATE_FILE, &state)
            .and_then(|()| write_atomic(&dir, PENDING_FILE, &pending))
            .map_err(|e| format!("saving update state in {}: {e}", dir.display()));
        Box::new(Saved(result))
    })
}

/// Write `dir/name` so that a crash leaves the old or the new bytes.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

/// This board's name for releases, from the device tree: `rpi4`, `rpi5`, `qemu-virt`; `None`
/// elsewhere (a development machine), where the board rule is not applied.
pub fn detect_board() -> Option<borg_ota::Board> {
    let compat = fs::read("/proc/device-tree/compatible").ok()?;
    let has = |needle: &[u8]| compat.split(|b| *b == 0).any(|c| c == needle);
    let name = if has(b"raspberrypi,4-model-b") || has(b"brcm,bcm2711") {
        "rpi4"
    } else if has(b"raspberrypi,5-model-b") || has(b"brcm,bcm2712") {
        "rpi5"
    } else if has(b"linux,dummy-virt") {
        "qemu-virt"
    } else {
        return None;
    };
    borg_ota::Board::new(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_files_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_pending(dir.path()).unwrap(), Vec::new());
        write_atomic(dir.path(), PENDING_FILE, &pending_bytes([].iter())).unwrap();
        assert_eq!(read_pending(dir.path()).unwrap(), Vec::new());
        write_atomic(dir.path(), PENDING_FILE, b"{\"type\":\"x\"}").unwrap();
        assert!(read_pending(dir.path()).is_err());
        assert!(!dir.path().join("ota-pending.json.tmp").exists());
    }
}
