//! Booting the appliance image in QEMU for the tests: opt-in rules, the per-test disks, and
//! console steps with deadlines (tests/tests/appliance_qemu.rs, appliance_ab.rs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::appliance::{borg_bin, skip, which, workspace_root, Console};

pub const BOOT: Duration = Duration::from_secs(120);
pub const STEP: Duration = Duration::from_secs(60);

pub fn image_dir() -> PathBuf {
    std::env::var_os("OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("out/image"))
}

/// None (with a SKIP line) unless the QEMU tests are enabled and can run.
pub fn enabled(test: &str) -> Option<PathBuf> {
    if std::env::var("BORG_QEMU_TESTS").as_deref() != Ok("1") {
        skip(
            test,
            "set BORG_QEMU_TESTS=1 (after image/build) to boot the image in QEMU",
        );
        return None;
    }
    let img = image_dir();
    assert!(
        img.join("vmlinuz").is_file() && img.join("initramfs.cpio.gz").is_file(),
        "BORG_QEMU_TESTS=1 but no image in {}: run image/build",
        img.display()
    );
    assert!(
        which("qemu-system-aarch64").is_some(),
        "BORG_QEMU_TESTS=1 but qemu-system-aarch64 is missing: run ci/appliance-setup.sh"
    );
    Some(img)
}

/// Does the host borg implement `borg node`? If so, so does the image's.
pub fn node_available() -> bool {
    let has = borg_bin()
        .and_then(|b| Command::new(b).args(["node", "--help"]).output().ok())
        .is_some_and(|o| o.status.success());
    if !has && std::env::var("BORG_QEMU_EXPECT_NODE").as_deref() == Ok("1") {
        panic!("BORG_QEMU_EXPECT_NODE=1 but `borg node` is not available");
    }
    has
}

/// QEMU arguments for a guest without a real-time clock: it boots at 1970-01-01.
pub const RTC_1970: [&str; 2] = ["-rtc", "base=1970-01-01T00:00:00"];

/// Start QEMU with a fresh blank data disk (first boot formats it), extra kernel args and
/// extra QEMU args (image/qemu-run passes them on).
pub fn boot(img: &Path, append: &str, data: &tempfile::TempDir, qemu: &[&str]) -> Console {
    let disk = data.path().join("data.img");
    let f = std::fs::File::create(&disk).expect("data disk");
    f.set_len(256 << 20).expect("size data disk");
    let mut cmd = qemu_run(img, data.path());
    cmd.env("BORG_APPEND", append).args(qemu);
    Console::spawn(cmd).expect("start QEMU")
}

/// The test's own copy of the image's A/B boot disk, `dir/boot.img` (made on first use).
pub fn boot_disk(img: &Path, dir: &Path) -> PathBuf {
    let boot = dir.join("boot.img");
    if !boot.exists() && img.join("boot.img").exists() {
        let ok = Command::new("cp")
            .arg("--sparse=always")
            .arg(img.join("boot.img"))
            .arg(&boot)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "copying the A/B boot disk");
    }
    boot
}

/// `image/qemu-run` for the test whose disks live in `dir`: `dir/data.img`, and `dir/boot.img`,
/// the test's own copy of the image's A/B boot disk (made on first use; QEMU locks a disk
/// image, and a trial boot writes to it, so no two tests may share one).
pub fn qemu_run(img: &Path, dir: &Path) -> Command {
    let boot = boot_disk(img, dir);
    let mut cmd = Command::new(workspace_root().join("image/qemu-run"));
    cmd.env("OUT", img)
        .env("BORG_DATA_IMG", dir.join("data.img"))
        .env("BORG_BOOT_IMG", &boot);
    cmd
}

/// The host's UTC date (YYYY-MM-DD) now.
pub fn host_date() -> String {
    let out = Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .expect("run date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn step(c: &mut Console, needle: &str, t: Duration) -> String {
    match c.expect(needle, t) {
        Ok(s) => s,
        Err(e) => {
            c.kill();
            panic!("{e}");
        }
    }
}

/// The `[ seconds]` timestamp of the kernel line containing `needle`.
pub fn kernel_time(text: &str, needle: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(needle))?;
    let inner = line.strip_prefix('[')?.split(']').next()?;
    inner.trim().parse().ok()
}

pub fn power_off(c: &mut Console) {
    c.send("poweroff").expect("type poweroff");
    step(c, "all cells stopped", STEP);
    step(c, "reboot(2)", STEP);
    step(c, "reboot: Power down", STEP);
    let exited = crate::appliance::wait_exit(&mut c.child, STEP);
    let text = c.text();
    assert!(exited.is_some(), "QEMU did not exit after power-off");
    assert!(!text.contains("Kernel panic"), "kernel panic:\n{text}");
    assert!(!text.contains("BUG: panic"), "borg panicked:\n{text}");
}
