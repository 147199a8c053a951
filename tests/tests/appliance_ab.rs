//! A/B slots and the trial boot, in QEMU through image/qemu-firmware (the stand-in for the
//! Pi firmware's autoboot.txt/tryboot choice; docs/OTA.md "A/B boot").
//!
//! Each test has its own copy of the image's boot disk. The host stands in for the installer
//! (which is not built yet): it writes slot B and sets the one-shot tryboot flag with
//! image/abdisk.py, exactly the two writes the installer will make. Then the guest's PID 1
//! must commit a healthy slot B by itself, fall back to slot A by itself when slot B's node
//! cannot start or its PID 1 hangs (watchdog), and a power cut during the trial must leave
//! slot A committed.
//!
//! Opt-in like appliance_qemu.rs: `BORG_QEMU_TESTS=1` after image/build.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use borg_tests::appliance::{workspace_root, Console};
use borg_tests::qemu::{boot_disk, enabled, power_off, qemu_run, step, BOOT, RTC_1970, STEP};

fn abdisk(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(workspace_root().join("image/abdisk.py"))
        .args(args)
        .output()
        .expect("run image/abdisk.py");
    assert!(
        out.status.success(),
        "abdisk.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn show(dir: &Path) -> String {
    abdisk(&["show", dir.join("boot.img").to_str().unwrap()])
}

/// The test's disks (blank data, a copy of the boot disk) and a Console on qemu-firmware.
fn start(img: &Path, dir: &Path, append: &str) -> Console {
    let data = dir.join("data.img");
    if !data.exists() {
        std::fs::File::create(&data)
            .and_then(|f| f.set_len(256 << 20))
            .expect("data disk");
    }
    let mut cmd = qemu_run(img, dir);
    cmd.env("BORG_APPEND", append).args(RTC_1970);
    Console::spawn(cmd).expect("start QEMU")
}

/// Prepare slot B: the image's slot, or one whose kernel command line adds `extra`; then ask
/// for one trial boot of it.
fn stage_slot_b(img: &Path, dir: &Path, extra: &str) {
    let boot = boot_disk(img, dir);
    let slot = dir.join("slot-b.vfat");
    std::fs::copy(img.join("slot.vfat"), &slot).expect("copy slot image");
    if !extra.is_empty() {
        let cmdline = dir.join("cmdline.txt");
        std::fs::write(&cmdline, format!("console=ttyAMA0 panic=-1 {extra}\n")).unwrap();
        let st = Command::new("mcopy")
            .arg("-o")
            .arg("-i")
            .arg(&slot)
            .arg(&cmdline)
            .arg("::/cmdline.txt")
            .status()
            .expect("mcopy");
        assert!(st.success());
    }
    abdisk(&[
        "write-slot",
        boot.to_str().unwrap(),
        "3",
        slot.to_str().unwrap(),
    ]);
    abdisk(&["tryboot", boot.to_str().unwrap(), "1"]);
    assert_eq!(show(dir), "committed=2 tryboot=3 flag=1");
}

/// Ask the console which slot this boot is (the prompt itself may have printed before the
/// boot line).
fn slot_is(c: &mut Console, want: &str) {
    c.send("update").expect("type update");
    step(c, &format!("slot:      {want}"), STEP);
}

#[test]
fn qemu_ab_a_healthy_trial_slot_commits_itself_and_stays() {
    let Some(img) = enabled("qemu_ab_a_healthy_trial_slot_commits_itself_and_stays") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    stage_slot_b(&img, dir.path(), "");
    let mut c = start(&img, dir.path(), "");
    step(
        &mut c,
        "qemu-firmware: boot 1: partition 3 (slot b) tryboot",
        STEP,
    );
    step(
        &mut c,
        "boot: slot b (partition 3) on trial; committed slot a",
        BOOT,
    );
    step(&mut c, "update: trial boot of slot b", STEP);
    step(
        &mut c,
        "update: slot b passed the health check",
        Duration::from_secs(200),
    );
    step(&mut c, "committed", STEP);
    // The commit is on the disk before anything else happens: read it from the host now,
    // with the guest still running.
    assert_eq!(show(dir.path()), "committed=3 tryboot=2 flag=0");
    slot_is(&mut c, "b (partition 3), committed");
    power_off(&mut c);

    // The next boot is slot B, no longer on trial.
    let mut c = start(&img, dir.path(), "");
    step(
        &mut c,
        "qemu-firmware: boot 1: partition 3 (slot b)\n",
        STEP,
    );
    step(&mut c, "boot: slot b (partition 3); committed slot b", BOOT);
    slot_is(&mut c, "b (partition 3)\n");
    let text = c.text();
    assert!(!text.contains("update: trial"), "not a trial boot:\n{text}");
    power_off(&mut c);
    assert_eq!(show(dir.path()), "committed=3 tryboot=2 flag=0");
}

#[test]
fn qemu_ab_a_trial_slot_whose_node_cannot_start_falls_back_by_itself() {
    let Some(img) = enabled("qemu_ab_a_trial_slot_whose_node_cannot_start_falls_back_by_itself")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    stage_slot_b(&img, dir.path(), "borg.fault=node borg.trial_s=20");
    let mut c = start(&img, dir.path(), "");
    step(
        &mut c,
        "qemu-firmware: boot 1: partition 3 (slot b) tryboot",
        STEP,
    );
    step(
        &mut c,
        "update: trial boot of slot b: health check within 20 s",
        BOOT,
    );
    step(
        &mut c,
        "update: slot b failed its trial",
        Duration::from_secs(90),
    );
    step(&mut c, "rebooting into slot a", STEP);
    // Nothing was written: the firmware's next boot is the committed slot A.
    step(
        &mut c,
        "qemu-firmware: boot 2: partition 2 (slot a)\n",
        STEP,
    );
    step(&mut c, "boot: slot a (partition 2); committed slot a", BOOT);
    slot_is(&mut c, "a (partition 2)\n");
    assert_eq!(show(dir.path()), "committed=2 tryboot=3 flag=0");
    power_off(&mut c);
}

#[test]
fn qemu_ab_a_hung_trial_is_reset_by_the_watchdog_into_slot_a() {
    let Some(img) = enabled("qemu_ab_a_hung_trial_is_reset_by_the_watchdog_into_slot_a") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    stage_slot_b(&img, dir.path(), "borg.fault=trial_hang");
    let mut c = start(&img, dir.path(), "");
    step(
        &mut c,
        "qemu-firmware: boot 1: partition 3 (slot b) tryboot",
        STEP,
    );
    step(&mut c, "borg.fault=trial_hang", BOOT);
    // softdog's default margin is 60 s; then the guest resets and the firmware boots slot A.
    step(
        &mut c,
        "qemu-firmware: boot 2: partition 2 (slot a)\n",
        Duration::from_secs(120),
    );
    step(&mut c, "boot: slot a (partition 2); committed slot a", BOOT);
    slot_is(&mut c, "a (partition 2)\n");
    assert_eq!(show(dir.path()), "committed=2 tryboot=3 flag=0");
    power_off(&mut c);
}

#[test]
fn qemu_ab_a_power_cut_during_the_trial_leaves_slot_a_committed() {
    let Some(img) = enabled("qemu_ab_a_power_cut_during_the_trial_leaves_slot_a_committed") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    stage_slot_b(&img, dir.path(), "");
    let mut c = start(&img, dir.path(), "");
    step(
        &mut c,
        "qemu-firmware: boot 1: partition 3 (slot b) tryboot",
        STEP,
    );
    step(&mut c, "update: trial boot of slot b", BOOT);
    // Pull the plug: QEMU (and the firmware stand-in) die at once.
    c.kill();
    assert_eq!(show(dir.path()), "committed=2 tryboot=3 flag=0");
    let mut c = start(&img, dir.path(), "");
    step(
        &mut c,
        "qemu-firmware: boot 1: partition 2 (slot a)\n",
        STEP,
    );
    step(&mut c, "boot: slot a (partition 2); committed slot a", BOOT);
    slot_is(&mut c, "a (partition 2)\n");
    power_off(&mut c);
}

/// The whole update, end to end: a host node holds release 0.2.0's image (out/image-v2, the
/// same image built as 0.2.0) as shards; two of the development root's three maintainers
/// approve it and publish it at the host node. The guest (running 0.1.0, joined to the host
/// node) gathers the approvals, its PID 1 judges the release again, fetches the image into
/// slot B, verifies it, boots it on trial, commits it, and runs 0.2.0 from then on.
#[test]
fn qemu_ab_an_approved_release_installs_itself_and_commits() {
    let test = "qemu_ab_an_approved_release_installs_itself_and_commits";
    let Some(img) = enabled(test) else { return };
    let v2 = img.with_file_name("image-v2");
    let maintainers = img.with_file_name("maintainers");
    if !v2.join("slot.vfat").is_file() || !maintainers.join("root.json").is_file() {
        borg_tests::appliance::missing(
            test,
            "no release image: run `OUT=out/image-v2 BORG_RELEASE_VERSION=0.2.0 image/build` \
             after image/build (ci/test.sh does)",
        );
        return;
    }
    let borg = borg_tests::appliance::borg_bin().expect("host borg binary");
    let host_dir = tempfile::tempdir().expect("tempdir");
    let mut host = Console::spawn({
        let mut c = Command::new(&borg);
        c.args(["node", "--listen", "127.0.0.1", "--data"])
            .arg(host_dir.path())
            .env("BORG_OTA_ROOT", maintainers.join("root.json"))
            .env("BORG_SHARD_QUICK", "1");
        c
    })
    .expect("start host node");
    let up = borg_tests::appliance::wait_for(STEP, || {
        std::net::TcpStream::connect("127.0.0.1:13310").ok()
    });
    assert!(up.is_some(), "host node never answered:\n{}", host.text());
    let run = |args: &[&str]| {
        let out = Command::new(&borg)
            .current_dir(host_dir.path())
            .env("BORG_LOG", "off")
            .args(args)
            .output()
            .expect("run borg");
        assert!(
            out.status.success(),
            "borg {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let slot = v2.join("slot.vfat");
    let slot = slot.to_str().unwrap();
    let rel = |name: &str| host_dir.path().join(name).display().to_string();
    // A release file of `slot` as `version`, approved by `keys`, optionally naming other chunks.
    let make = |name: &str, version: &str, keys: &[&str], fetch: Option<&str>| {
        let out = rel(name);
        let mut args = vec![
            "release",
            "create",
            "--image",
            slot,
            "--version",
            version,
            "--board",
            "qemu-virt",
            "--min-version",
            "0.1.0",
            "--expires-days",
            "7",
            "--out",
            &out,
        ];
        if let Some(f) = fetch {
            args.extend(["--fetch-id", f]);
        }
        run(&args);
        for k in keys {
            let key = maintainers.join(k);
            run(&["release", "approve", &out, "--key", key.to_str().unwrap()]);
        }
        out
    };
    let good = make("good.json", "0.2.0", &["m1", "m2"], None);
    run(&[
        "release",
        "upload",
        "--image",
        slot,
        "--node",
        "127.0.0.1",
        "--release",
        &good,
    ]);
    // k-1 approvals: never approved, never installed.
    let half = make("half.json", "0.3.0", &["m1"], None);
    // Approved by k, but naming the chunks of another image (the running 0.1.0 slot): it
    // reads back wrong and is not installed; being higher, it is tried first.
    let v1_slot = img.join("slot.vfat");
    let up = run(&[
        "release",
        "upload",
        "--image",
        v1_slot.to_str().unwrap(),
        "--node",
        "127.0.0.1",
    ]);
    let v1_fetch = up.rsplit("fetch id ").next().unwrap().trim().to_string();
    let bad = make("bad.json", "0.2.5", &["m1", "m2"], Some(&v1_fetch));

    let dir = tempfile::tempdir().expect("tempdir");
    let append = "borg.join=10.0.2.2:13300 borg.update_via=10.0.2.2";
    let mut c = start(&img, dir.path(), append);
    step(&mut c, "qemu-firmware: boot 1: partition 2 (slot a)", STEP);
    step(&mut c, "node state: joined", Duration::from_secs(180));
    for r in [&half, &bad] {
        run(&["release", "publish", r, "--node", "127.0.0.1"]);
    }
    step(
        &mut c,
        "update: release 0.2.5 is approved; installing it into slot b",
        Duration::from_secs(60),
    );
    step(
        &mut c,
        "update: installing release 0.2.5 failed",
        Duration::from_secs(300),
    );
    step(&mut c, "not installed", STEP);
    assert_eq!(
        show(dir.path()),
        "committed=2 tryboot=3 flag=0",
        "nothing asked of the firmware"
    );

    let t0 = std::time::Instant::now();
    run(&["release", "publish", &good, "--node", "127.0.0.1"]);
    step(
        &mut c,
        "update: release 0.2.0 is approved; installing it into slot b",
        Duration::from_secs(60),
    );
    // Pull the plug during the fetch: the next boot is slot A, and the install starts again,
    // keeping what slot B already holds.
    let text = c.text();
    assert!(
        !text.contains("release 0.3.0 is approved"),
        "k-1 approvals:\n{text}"
    );
    c.kill();
    assert_eq!(show(dir.path()), "committed=2 tryboot=3 flag=0");
    let mut c = start(&img, dir.path(), append);
    step(&mut c, "qemu-firmware: boot 1: partition 2 (slot a)", STEP);
    step(
        &mut c,
        "update: release 0.2.0 is approved; installing it into slot b",
        Duration::from_secs(300),
    );
    let t_start = t0.elapsed();
    step(
        &mut c,
        "update: release 0.2.0 written to slot b and verified",
        Duration::from_secs(300),
    );
    let t_written = t0.elapsed();
    step(
        &mut c,
        "qemu-firmware: boot 2: partition 3 (slot b) tryboot",
        STEP,
    );
    step(&mut c, "borg init starting version=\"0.2.0\"", BOOT);
    step(
        &mut c,
        "update: slot b passed the health check",
        Duration::from_secs(240),
    );
    eprintln!(
        "FIGURE ota_qemu publish_to_install_start_after_power_cut_s={:.1} \
         publish_to_slot_verified_s={:.1} publish_to_committed_s={:.1}",
        t_start.as_secs_f64(),
        t_written.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(show(dir.path()), "committed=3 tryboot=2 flag=0");
    c.send("status").expect("type status");
    step(&mut c, "borg 0.2.0 pid 1", STEP);
    let text = c.text();
    assert!(
        !text.contains("release 0.3.0 is approved"),
        "k-1 approvals installed:\n{text}"
    );
    power_off(&mut c);

    // From now on the firmware boots slot B, and the node runs 0.2.0.
    let mut c = start(&img, dir.path(), "");
    step(
        &mut c,
        "qemu-firmware: boot 1: partition 3 (slot b)\n",
        STEP,
    );
    step(&mut c, "borg init starting version=\"0.2.0\"", BOOT);
    step(&mut c, "boot: slot b (partition 3); committed slot b", BOOT);
    slot_is(&mut c, "b (partition 3)\n");
    power_off(&mut c);
    host.kill();
}
