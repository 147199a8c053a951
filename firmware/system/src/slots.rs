//! A/B boot slots on the boot disk: which slot this boot came from, and the one-sector
//! writes that commit a slot or request a trial boot (docs/OTA.md "A/B boot").
//!
//! The boot disk is MBR-partitioned: partition 1 is a small FAT holding `autoboot.txt` (and,
//! under QEMU, `tryboot.txt`), partitions 2 and 3 are slots A and B. The files' formats are
//! `borg_ota::autoboot`; here they are found and written:
//!
//! - [`locate`] reads the MBR and the FAT's boot sector and root directory (FAT12/16/32) to
//!   find the byte offset of a file's one data sector. Nothing is mounted: the kernel's FAT
//!   driver would update directory entries (times) on a write; we change exactly one sector.
//! - [`write_sector`] writes that sector in place and fsyncs the device, then reads it back.
//! - [`BootInfo::read`]: on the Pi the firmware tells the kernel which partition it booted and
//!   whether this is a trial (`/proc/device-tree/chosen/bootloader/{partition,tryboot}`, big
//!   endian u32); under QEMU `image/qemu-firmware` passes the same facts on the kernel command
//!   line (`borg.boot=DISK borg.partition=N borg.tryboot=0|1`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use borg_ota::autoboot::SECTOR;

/// Errors of slot handling.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("{path}: the sector at {offset} reads back different from what was written")]
    ReadBack { path: PathBuf, offset: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SlotError + '_ {
    move |source| SlotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn layout(path: &Path, reason: impl Into<String>) -> SlotError {
    SlotError::Layout {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_at(f: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, SlotError> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).map_err(io(path))?;
    Ok(buf)
}

fn u16le(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}

fn u32le(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as u64
}

/// Byte offset and length of MBR partition `n` (1-4) of the disk at `path`.
pub fn partition(path: &Path, n: u8) -> Result<(u64, u64), SlotError> {
    let f = File::open(path).map_err(io(path))?;
    let mbr = read_at(&f, path, 0, SECTOR)?;
    if mbr[510..512] != [0x55, 0xAA] || !(1..=4).contains(&n) {
        return Err(layout(path, "no MBR partition table"));
    }
    let e = 446 + 16 * (n as usize - 1);
    let (start, sectors) = (u32le(&mbr, e + 8), u32le(&mbr, e + 12));
    if sectors == 0 {
        return Err(layout(path, format!("partition {n} is empty")));
    }
    Ok((start * SECTOR as u64, sectors * SECTOR as u64))
}

/// Where a file of the FAT at byte `part` of `path` keeps its first (and for our files,
/// only) data sector: (byte offset on the disk, file size). `name` is the 8.3 name as
/// stored, e.g. `b"AUTOBOOTTXT"`. Only the root directory's first cluster is searched (our
/// files are the first ones written to a fresh FAT).
pub fn locate(path: &Path, part: u64, name: &[u8; 11]) -> Result<(u64, u64), SlotError> {
    let f = File::open(path).map_err(io(path))?;
    let bs = read_at(&f, path, part, SECTOR)?;
    let bps = u16le(&bs, 11);
    let spc = bs[13] as u64;
    let reserved = u16le(&bs, 14);
    let fats = bs[16] as u64;
    let root_entries = u16le(&bs, 17);
    let fat16_size = u16le(&bs, 22);
    let sane = bs[510..512] == [0x55, 0xAA]
        && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && spc <= 128
        && reserved > 0
        && (1..=2).contains(&fats);
    if !sane {
        return Err(layout(path, "partition 1 is not a FAT file system"));
    }
    let fat_size = if fat16_size != 0 {
        fat16_size
    } else {
        u32le(&bs, 36)
    };
    let root_dir_sectors = (root_entries * 32).div_ceil(bps);
    let data_start = reserved + fats * fat_size + root_dir_sectors;
    let cluster_offset = |cluster: u64| part + (data_start + (cluster - 2) * spc) * bps;
    // FAT12/16: a fixed root directory after the FATs; FAT32: a cluster chain.
    let (dir_offset, dir_len) = if root_entries != 0 {
        (part + (reserved + fats * fat_size) * bps, root_entries * 32)
    } else {
        let root_cluster = u32le(&bs, 44);
        if root_cluster < 2 {
            return Err(layout(path, "FAT32 root cluster below 2"));
        }
        (cluster_offset(root_cluster), spc * bps)
    };
    let dir = read_at(&f, path, dir_offset, dir_len.min(64 * 1024) as usize)?;
    for entry in dir.chunks_exact(32) {
        match entry[0] {
            0x00 => break,
            0xE5 => continue,
            _ => {}
        }
        let attr = entry[11];
        if attr == 0x0F || attr & 0x18 != 0 {
            continue; // long-name part, volume label or directory
        }
        if &entry[..11] == name {
            let cluster = (u16le(entry, 20) << 16) | u16le(entry, 26);
            let size = u32le(entry, 28);
            if cluster < 2 {
                return Err(layout(path, "file has no data cluster"));
            }
            return Ok((cluster_offset(cluster), size));
        }
    }
    Err(layout(
        path,
        format!("no {} in the boot partition", String::from_utf8_lossy(name)),
    ))
}

/// The offset of a one-sector file `name` in partition 1 of the boot disk `path`.
pub fn sector_file(path: &Path, name: &[u8; 11]) -> Result<u64, SlotError> {
    let (part, part_len) = partition(path, 1)?;
    let (offset, size) = locate(path, part, name)?;
    // A damaged FAT must not send the write anywhere else on the disk.
    if offset < part || offset.saturating_add(SECTOR as u64) > part.saturating_add(part_len) {
        return Err(layout(
            path,
            format!(
                "{} would be outside partition 1",
                String::from_utf8_lossy(name)
            ),
        ));
    }
    if size != SECTOR as u64 {
        return Err(layout(
            path,
            format!(
                "{} is {size} bytes; it must be exactly {SECTOR} to be rewritten in place",
                String::from_utf8_lossy(name)
            ),
        ));
    }
    Ok(offset)
}

/// Read one sector at `offset`.
pub fn read_sector(path: &Path, offset: u64) -> Result<[u8; SECTOR], SlotError> {
    let f = File::open(path).map_err(io(path))?;
    let mut buf = [0u8; SECTOR];
    f.read_exact_at(&mut buf, offset).map_err(io(path))?;
    Ok(buf)
}

/// Write one sector at `offset` in place, fsync the device, and read it back.
pub fn write_sector(path: &Path, offset: u64, bytes: &[u8; SECTOR]) -> Result<(), SlotError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all_at(bytes, offset).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    // Read back from the device, not from the page cache.
    crate::sys::drop_cached(&f);
    drop(f);
    if read_sector(path, offset)? != *bytes {
        return Err(SlotError::ReadBack {
            path: path.to_path_buf(),
            offset,
        });
    }
    Ok(())
}

/// The 8.3 names of our one-sector files.
pub const AUTOBOOT: &[u8; 11] = b"AUTOBOOTTXT";
pub const TRYBOOT: &[u8; 11] = b"TRYBOOT TXT";

/// Which slot this boot came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// The boot disk (whole disk, MBR).
    pub disk: PathBuf,
    /// The partition booted (2 = slot A, 3 = slot B).
    pub partition: u8,
    /// This is a trial boot (tryboot).
    pub tryboot: bool,
}

const DT_BOOTLOADER: &str = "/proc/device-tree/chosen/bootloader";

fn dt_u32(name: &str) -> Option<u32> {
    let b = std::fs::read(Path::new(DT_BOOTLOADER).join(name)).ok()?;
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

impl BootInfo {
    /// From the Pi firmware's device tree, else from the command line (QEMU stand-in).
    /// `None` when this boot did not come from an A/B disk (a development machine, or an
    /// image booted without the firmware stand-in): then no update can be installed.
    pub fn read(cmdline: &crate::cmdline::Cmdline) -> Option<Self> {
        // `borg.boot` may list candidates (the Pi 4's SD card is mmcblk1 with the upstream
        // device tree, mmcblk0 otherwise): the first that exists.
        let disk = |list: &str| -> PathBuf {
            let all: Vec<&str> = list.split(',').filter(|d| !d.is_empty()).collect();
            all.iter()
                .find(|d| Path::new(d).exists())
                .or(all.first())
                .map(PathBuf::from)
                .unwrap_or_default()
        };
        if let Some(partition) = dt_u32("partition") {
            let list = cmdline
                .boot
                .as_deref()
                .unwrap_or("/dev/mmcblk1,/dev/mmcblk0");
            return Some(Self {
                disk: disk(list),
                partition: u8::try_from(partition).ok()?,
                tryboot: dt_u32("tryboot") == Some(1),
            });
        }
        Some(Self {
            disk: disk(cmdline.boot.as_deref()?),
            partition: cmdline.partition?,
            tryboot: cmdline.tryboot.unwrap_or(false),
        })
    }

    pub fn slot(&self) -> &'static str {
        borg_ota::autoboot::slot_name(self.partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use borg_ota::autoboot::{AutoBoot, SLOT_A, SLOT_B};
    use std::process::Command;

    /// A boot disk as image/build makes it: MBR, partition 1 a FAT16 with the two files.
    fn boot_disk(dir: &Path, fat: &str) -> Option<PathBuf> {
        let have = |t: &str| Command::new(t).arg("--help").output().is_ok();
        if !(have("mkfs.vfat") || Path::new("/usr/sbin/mkfs.vfat").exists()) || !have("mcopy") {
            eprintln!("SKIP: mkfs.vfat/mcopy missing (ci/setup.sh installs dosfstools, mtools)");
            return None;
        }
        let part = dir.join("p1.vfat");
        let mkfs = if Path::new("/usr/sbin/mkfs.vfat").exists() {
            "/usr/sbin/mkfs.vfat"
        } else {
            "mkfs.vfat"
        };
        let ok = Command::new(mkfs)
            .args(["-F", fat, "-n", "BORGBOOT", "-C"])
            .arg(&part)
            .arg(if fat == "32" { "40000" } else { "16384" })
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "mkfs.vfat -F {fat}");
        std::fs::write(
            dir.join("autoboot.txt"),
            AutoBoot::committed(SLOT_A).render(),
        )
        .unwrap();
        std::fs::write(
            dir.join("tryboot.txt"),
            borg_ota::autoboot::tryboot_flag(false),
        )
        .unwrap();
        for f in ["autoboot.txt", "tryboot.txt"] {
            let st = Command::new("mcopy")
                .arg("-i")
                .arg(&part)
                .arg(dir.join(f))
                .arg(format!("::/{f}"))
                .status()
                .unwrap();
            assert!(st.success());
        }
        // MBR: partition 1 at sector 2048.
        let disk = dir.join("boot.img");
        let p = std::fs::read(&part).unwrap();
        let mut img = vec![0u8; 2048 * 512];
        let e = 446;
        img[e + 4] = 0x0e;
        img[e + 8..e + 12].copy_from_slice(&2048u32.to_le_bytes());
        img[e + 12..e + 16].copy_from_slice(&((p.len() / 512) as u32).to_le_bytes());
        img[510] = 0x55;
        img[511] = 0xAA;
        img.extend_from_slice(&p);
        std::fs::write(&disk, img).unwrap();
        Some(disk)
    }

    #[test]
    fn commit_rewrites_exactly_the_autoboot_sector_on_fat16_and_fat32() {
        for fat in ["16", "32"] {
            let dir = tempfile::tempdir().unwrap();
            let Some(disk) = boot_disk(dir.path(), fat) else {
                return;
            };
            let before = std::fs::read(&disk).unwrap();
            let at = sector_file(&disk, AUTOBOOT).unwrap();
            assert_eq!(
                AutoBoot::parse(&read_sector(&disk, at).unwrap()).unwrap(),
                AutoBoot::committed(SLOT_A)
            );
            write_sector(&disk, at, &AutoBoot::committed(SLOT_B).render()).unwrap();
            let after = std::fs::read(&disk).unwrap();
            let changed: Vec<usize> = (0..before.len() / 512)
                .filter(|s| before[s * 512..(s + 1) * 512] != after[s * 512..(s + 1) * 512])
                .collect();
            assert_eq!(changed, vec![(at / 512) as usize], "FAT{fat}");
            // mtools, reading the FAT as the firmware would, sees the new file.
            let out = Command::new("mtype")
                .arg("-i")
                .arg(format!("{}@@{}", disk.display(), 2048 * 512))
                .arg("::/autoboot.txt")
                .output()
                .unwrap();
            assert_eq!(
                AutoBoot::parse(&out.stdout).unwrap(),
                AutoBoot::committed(SLOT_B),
                "FAT{fat}"
            );
            let t = sector_file(&disk, TRYBOOT).unwrap();
            assert_ne!(t, at);
        }
    }

    #[test]
    fn a_disk_without_the_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blank");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(matches!(partition(&p, 1), Err(SlotError::Layout { .. })));
        let Some(disk) = boot_disk(dir.path(), "16") else {
            return;
        };
        assert!(matches!(
            sector_file(&disk, b"MISSING TXT"),
            Err(SlotError::Layout { .. })
        ));
    }
}
