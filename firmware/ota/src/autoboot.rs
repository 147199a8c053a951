//! The boot firmware's slot choice, as files of exactly one 512-byte sector.
//!
//! **`autoboot.txt`** (Raspberry Pi firmware, on the small first FAT partition) names the
//! slot the firmware boots and the one it boots once after `reboot "0 tryboot"`:
//!
//! ```text
//! [all]
//! tryboot_a_b=1
//! boot_partition=2
//! [tryboot]
//! boot_partition=3
//! ```
//!
//! Committing slot B after a good trial boot is rewriting it with 3 and 2 swapped. The file
//! is always exactly [`SECTOR`] bytes (the text, then a comment line of padding), so the
//! commit is one in-place sector write of a file whose size and clusters never change: no
//! FAT table, directory entry or rename is touched, and a power cut leaves the old sector or
//! the new one on media that write a sector whole (SD cards usually do; the SD specification
//! does not promise it: docs/OTA.md lists this as a known risk).
//!
//! **`tryboot.txt`** is the QEMU stand-in for the Pi's one-shot tryboot flag (which the Pi
//! keeps in a power-management register set by `reboot(2)` with the argument `0 tryboot`):
//! the guest sets `tryboot=1` in place (one sector, the same way), and `image/qemu-firmware`
//! boots the `[tryboot]` partition once and resets it to `tryboot=0` before booting, as the
//! Pi firmware clears its register.
//!
//! Parsing is strict: only these keys, partitions 2 and 3, no duplicates. Anything else is
//! refused, so a damaged file is never taken for a valid choice.

use crate::OtaError;

/// Bytes in a sector, and in each of these files.
pub const SECTOR: usize = 512;
/// Partition of slot A (the Pi's MBR: 1 is the autoboot partition).
pub const SLOT_A: u8 = 2;
/// Partition of slot B.
pub const SLOT_B: u8 = 3;

/// Name of a slot partition for humans: `a` or `b`.
pub fn slot_name(partition: u8) -> &'static str {
    match partition {
        SLOT_A => "a",
        SLOT_B => "b",
        _ => "?",
    }
}

/// The other slot.
pub fn other_slot(partition: u8) -> u8 {
    if partition == SLOT_B {
        SLOT_A
    } else {
        SLOT_B
    }
}

fn malformed(reason: impl Into<String>) -> OtaError {
    OtaError::Malformed {
        what: "autoboot.txt",
        reason: reason.into(),
    }
}

/// Pad `text` to one sector with a comment line.
fn pad(text: &str) -> [u8; SECTOR] {
    let mut out = [b' '; SECTOR];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[text.len()] = b'#';
    out[SECTOR - 1] = b'\n';
    out
}

/// The slot choice of `autoboot.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoBoot {
    /// The committed slot: booted on every normal boot.
    pub boot_partition: u8,
    /// The slot booted once after a tryboot request.
    pub tryboot_partition: u8,
}

impl AutoBoot {
    /// `slot` committed, the other one to try.
    pub fn committed(slot: u8) -> Self {
        Self {
            boot_partition: slot,
            tryboot_partition: other_slot(slot),
        }
    }

    /// The file's bytes: exactly one sector.
    pub fn render(&self) -> [u8; SECTOR] {
        pad(&format!(
            "[all]\ntryboot_a_b=1\nboot_partition={}\n[tryboot]\nboot_partition={}\n",
            self.boot_partition, self.tryboot_partition
        ))
    }

    /// Parse the file (as written by [`AutoBoot::render`] or by hand: blank lines and `#`
    /// comments are allowed, nothing else beyond the keys above).
    pub fn parse(bytes: &[u8]) -> Result<Self, OtaError> {
        if bytes.len() > SECTOR {
            return Err(malformed(format!(
                "{} bytes, more than a sector",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8"))?;
        let mut section = "";
        let (mut boot, mut try_, mut ab) = (None, None, false);
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = match name {
                    "all" => "all",
                    "tryboot" => "tryboot",
                    other => return Err(malformed(format!("unknown section [{other}]"))),
                };
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| malformed(format!("not key=value: {line:?}")))?;
            let slot = || -> Result<u8, OtaError> {
                match v.trim() {
                    "2" => Ok(SLOT_A),
                    "3" => Ok(SLOT_B),
                    other => Err(malformed(format!("boot_partition={other}: must be 2 or 3"))),
                }
            };
            let dup = |set: bool| {
                if set {
                    Err(malformed(format!("{k} twice in [{section}]")))
                } else {
                    Ok(())
                }
            };
            match (section, k.trim()) {
                ("all", "tryboot_a_b") if v.trim() == "1" => ab = true,
                ("all", "boot_partition") => {
                    dup(boot.is_some())?;
                    boot = Some(slot()?);
                }
                ("tryboot", "boot_partition") => {
                    dup(try_.is_some())?;
                    try_ = Some(slot()?);
                }
                _ => return Err(malformed(format!("unexpected {line:?} in [{section}]"))),
            }
        }
        match (ab, boot, try_) {
            (true, Some(b), Some(t)) if b != t => Ok(Self {
                boot_partition: b,
                tryboot_partition: t,
            }),
            (false, ..) => Err(malformed("tryboot_a_b=1 missing")),
            _ => Err(malformed(
                "needs boot_partition in [all] and a different one in [tryboot]",
            )),
        }
    }
}

/// The QEMU stand-in's one-shot tryboot flag file (`tryboot.txt`), one sector.
pub fn tryboot_flag(set: bool) -> [u8; SECTOR] {
    pad(if set { "tryboot=1\n" } else { "tryboot=0\n" })
}

/// Whether a `tryboot.txt` asks for a trial boot (anything but `tryboot=1` says no).
pub fn tryboot_requested(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.lines().next())
        .is_some_and(|l| l.trim() == "tryboot=1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_files_are_one_sector_and_parse_back() {
        for slot in [SLOT_A, SLOT_B] {
            let a = AutoBoot::committed(slot);
            let bytes = a.render();
            assert_eq!(bytes.len(), SECTOR);
            assert_eq!(AutoBoot::parse(&bytes).unwrap(), a);
            assert_eq!(a.tryboot_partition, other_slot(slot));
        }
        let text = String::from_utf8(AutoBoot::committed(SLOT_A).render().to_vec()).unwrap();
        assert!(text
            .starts_with("[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n#"));
        assert!(text.ends_with(" \n"));
    }

    #[test]
    fn damaged_or_strange_files_are_refused() {
        for bad in [
            "",
            "[all]\nboot_partition=2\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=2\n",
            "[all]\ntryboot_a_b=1\nboot_partition=4\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\nboot_partition=2\nboot_partition=3\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\nboot_partition=2\n[pi4]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\nkernel=x\n",
            "[all]\ntryboot_a_b=1\nboot_partit",
        ] {
            assert!(AutoBoot::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(AutoBoot::parse(&[0xff; 10]).is_err());
        assert!(AutoBoot::parse(&[b'\n'; 513]).is_err());
        // Hand-written, with comments and blank lines: fine.
        let hand =
            "# BorgIOS\n[all]\ntryboot_a_b=1\n\nboot_partition=3\n[tryboot]\nboot_partition=2\n";
        assert_eq!(
            AutoBoot::parse(hand.as_bytes()).unwrap(),
            AutoBoot::committed(SLOT_B)
        );
    }

    #[test]
    fn the_tryboot_flag_is_one_sector_and_only_an_exact_one_counts() {
        assert!(tryboot_requested(&tryboot_flag(true)));
        assert!(!tryboot_requested(&tryboot_flag(false)));
        assert_eq!(tryboot_flag(true).len(), SECTOR);
        assert!(!tryboot_requested(b"tryboot=11\n"));
        assert!(!tryboot_requested(&[0u8; 512]));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = AutoBoot::parse(&bytes);
            let _ = tryboot_requested(&bytes);
        }
    }
}
