//! Early mounts, kernel modules and the persistent data partition.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::sys::{self, mflags};

/// Errors of the mount step.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount failed.
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        target: PathBuf,
        fstype: String,
        source: std::io::Error,
    },
    /// The data device never appeared.
    #[error("data device {0} not found")]
    NoDevice(PathBuf),
    /// The data partition holds something we cannot mount; it is left untouched.
    #[error("data partition {dev} is damaged or not ext2/3/4 ({reason}); NOT formatting it")]
    Damaged { dev: PathBuf, reason: String },
    /// Formatting the empty partition failed.
    #[error("formatting {dev} failed: {reason}")]
    Mkfs { dev: PathBuf, reason: String },
    /// Reading the device failed.
    #[error("reading {dev}: {source}")]
    Read {
        dev: PathBuf,
        source: std::io::Error,
    },
}

fn mount_one(
    src: &str,
    target: &str,
    fstype: &str,
    flags: u64,
    data: Option<&str>,
) -> Result<(), MountError> {
    let t = Path::new(target);
    let _ = std::fs::create_dir_all(t);
    match sys::mount(src, t, fstype, flags, data) {
        Ok(()) => Ok(()),
        // Already mounted (e.g. by the kernel or a previous attempt): fine.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(source) => Err(MountError::Mount {
            target: t.to_path_buf(),
            fstype: fstype.to_string(),
            source,
        }),
    }
}

/// Mount /proc, /sys, /dev (devtmpfs), /dev/pts, /run, /tmp. Returns the failures (each is
/// logged by the caller; PID 1 goes on with what it has).
pub fn mount_system() -> Vec<MountError> {
    use mflags::*;
    let table: [(&str, &str, &str, u64, Option<&str>); 7] = [
        ("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, None),
        ("sysfs", "/sys", "sysfs", NOSUID | NODEV | NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", NOSUID, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            NOSUID | NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            NOSUID | NODEV,
            Some("mode=1777"),
        ),
        ("tmpfs", "/run", "tmpfs", NOSUID | NODEV, Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, Some("mode=1777")),
    ];
    table
        .iter()
        .filter_map(|(src, tgt, fs, fl, data)| mount_one(src, tgt, fs, *fl, *data).err())
        .collect()
}

/// Load the kernel modules listed (one path per line, dependencies first) in `list`, paths
/// relative to the list's directory. Returns (loaded, errors).
pub fn load_modules(list: &Path) -> (usize, Vec<String>) {
    let Ok(text) = std::fs::read_to_string(list) else {
        return (0, vec![]);
    };
    let base = list.parent().unwrap_or(Path::new("/"));
    let mut loaded = 0;
    let mut errors = vec![];
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match sys::finit_module(&base.join(line)) {
            Ok(true) => loaded += 1,
            Ok(false) => {}
            Err(e) => errors.push(format!("{line}: {e}")),
        }
    }
    (loaded, errors)
}

/// Candidate data devices when `borg.data=` is not given: the Pi SD card's 4th partition
/// (A/B layout: boot, root A, root B, data), then the first virtio disk (QEMU).
pub const DATA_CANDIDATES: &[&str] = &["/dev/mmcblk0p4", "/dev/vda"];

/// How the data partition was made available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataOutcome {
    /// Mounted an existing filesystem.
    Mounted(PathBuf),
    /// The partition was empty; formatted it, then mounted it.
    Formatted(PathBuf),
}

/// Wait up to `timeout` for one of `candidates` to appear (block drivers probe asynchronously).
pub fn wait_for_device(candidates: &[PathBuf], timeout: Duration) -> Option<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(d) = candidates.iter().find(|d| d.exists()) {
            return Some(d.clone());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True if the first MiB of the device is all zeros: a never-used partition.
pub fn is_blank(dev: &Path) -> Result<bool, MountError> {
    let mut f = std::fs::File::open(dev).map_err(|source| MountError::Read {
        dev: dev.to_path_buf(),
        source,
    })?;
    let mut buf = vec![0u8; 1 << 20];
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(source) => {
                return Err(MountError::Read {
                    dev: dev.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(buf[..filled].iter().all(|b| *b == 0))
}

/// Mount the data partition `dev` on `target` (ext4 driver; ext2/3 too). A blank partition is
/// formatted with `mkfs` first (`mkfs` is a command line, e.g. `["/bin/busybox", "mke2fs"]`).
/// A partition that is not blank and does not mount is reported, never wiped.
pub fn mount_data(dev: &Path, target: &Path, mkfs: &[String]) -> Result<DataOutcome, MountError> {
    let _ = std::fs::create_dir_all(target);
    let devs = dev.to_string_lossy().into_owned();
    let try_mount = || sys::mount(&devs, target, "ext4", mflags::NOATIME | mflags::NODEV, None);
    let first = match try_mount() {
        Ok(()) => return Ok(DataOutcome::Mounted(dev.to_path_buf())),
        Err(e) => e,
    };
    if !is_blank(dev)? {
        return Err(MountError::Damaged {
            dev: dev.to_path_buf(),
            reason: first.to_string(),
        });
    }
    let Some((prog, args)) = mkfs.split_first() else {
        return Err(MountError::Mkfs {
            dev: dev.to_path_buf(),
            reason: "no mkfs program configured".into(),
        });
    };
    let out = Command::new(prog)
        .args(args)
        .args(["-L", "borgdata"])
        .arg(dev)
        .output()
        .map_err(|e| MountError::Mkfs {
            dev: dev.to_path_buf(),
            reason: format!("{prog}: {e}"),
        })?;
    if !out.status.success() {
        return Err(MountError::Mkfs {
            dev: dev.to_path_buf(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    try_mount().map_err(|source| MountError::Mount {
        target: target.to_path_buf(),
        fstype: "ext4".into(),
        source,
    })?;
    Ok(DataOutcome::Formatted(dev.to_path_buf()))
}

/// Flush and detach the data partition for power-off: unmount, or at least remount read-only.
pub fn release_data(target: &Path) -> Result<(), std::io::Error> {
    sys::sync();
    match sys::umount(target, false) {
        Ok(()) => Ok(()),
        Err(_) => {
            let r = sys::mount("", target, "", mflags::REMOUNT | mflags::RDONLY, None);
            sys::sync();
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        std::fs::write(&p, vec![0u8; 3 << 20]).unwrap();
        assert!(is_blank(&p).unwrap());
        let mut data = vec![0u8; 3 << 20];
        data[1080] = 0x53;
        std::fs::write(&p, &data).unwrap();
        assert!(!is_blank(&p).unwrap());
        std::fs::write(&p, b"").unwrap();
        assert!(is_blank(&p).unwrap());
        assert!(is_blank(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn module_list_missing_is_empty() {
        assert_eq!(load_modules(Path::new("/nonexistent/load-order")).0, 0);
    }
}
