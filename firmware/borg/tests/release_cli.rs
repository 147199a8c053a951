//! `borg release` end to end on the built binary: three maintainers, a 2-of-3 root, a
//! release approved one key at a time, duplicates, outsiders, tampering and a rotation.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn borg(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_borg"))
        .current_dir(dir)
        .env("BORG_LOG", "off")
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(dir: &Path, args: &[&str]) -> String {
    let o = borg(dir, args);
    assert!(o.status.success(), "borg {args:?} failed:\n{}", text(&o));
    text(&o)
}

#[track_caller]
fn fails(dir: &Path, args: &[&str]) -> String {
    let o = borg(dir, args);
    assert!(
        !o.status.success(),
        "borg {args:?} should fail:\n{}",
        text(&o)
    );
    text(&o)
}

const VERIFY: [&str; 5] = ["release", "verify", "m.json", "--root", "root.json"];

#[test]
fn maintainers_approve_a_release_two_of_three() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for k in ["a", "b", "c", "d"] {
        let out = ok(d, &["release", "keygen", "--out", k]);
        let public = fs::read_to_string(d.join(format!("{k}.pub"))).unwrap();
        assert!(out.contains(public.trim()));
        let mode = fs::metadata(d.join(k)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key {k}");
    }
    let before = fs::read(d.join("a")).unwrap();
    let e = fails(d, &["release", "keygen", "--out", "a"]);
    assert!(e.contains("not overwriting"), "{e}");
    assert_eq!(fs::read(d.join("a")).unwrap(), before);

    ok(
        d,
        &[
            "release",
            "root-init",
            "--keys",
            "a.pub,b.pub,c.pub",
            "--threshold",
            "2",
            "--out",
            "root.json",
        ],
    );
    // An image of 300 KB (more than one read buffer), then the manifest.
    let image: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    fs::write(d.join("img"), &image).unwrap();
    ok(
        d,
        &[
            "release",
            "create",
            "--image",
            "img",
            "--version",
            "1.1.0",
            "--board",
            "rpi4,qemu-virt",
            "--min-version",
            "1.0.0",
            "--expires-days",
            "30",
            "--notes",
            "first release",
            "--out",
            "m.json",
        ],
    );
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("m.json")).unwrap()).unwrap();
    assert_eq!(
        m["manifest"]["image"]["sha256"],
        borg_ota::Sha256Hex::of(&image).to_string()
    );
    assert_eq!(m["manifest"]["image"]["size"], 300_000);

    // The root is not trusted until k of its own keys signed it.
    ok(d, &["release", "root-sign", "root.json", "--key", "a"]);
    let e = fails(d, &VERIFY);
    assert!(e.contains("1 of 2 signatures"), "{e}");
    let e = fails(d, &["release", "root-sign", "root.json", "--key", "d"]);
    assert!(e.contains("not in this root"), "{e}");
    let out = ok(d, &["release", "root-sign", "root.json", "--key", "b"]);
    assert!(out.contains("2 of 2"), "{out}");

    // No approvals, then one.
    let e = fails(d, &VERIFY);
    assert!(e.contains("0 of 2"), "{e}");
    ok(d, &["release", "approve", "m.json", "--key", "a"]);
    let e = fails(d, &VERIFY);
    assert!(e.contains("approvals: 1 of 2 needed"), "{e}");
    assert!(e.contains("not enough approvals: 1 of 2"), "{e}");
    // The same key again: a duplicate, still one.
    let out = ok(d, &["release", "approve", "m.json", "--key", "a"]);
    assert!(out.contains("already approved"), "{out}");
    let e = fails(d, &VERIFY);
    assert!(e.contains("approvals: 1 of 2 needed"), "{e}");
    assert!(e.contains("duplicate key"), "{e}");
    // An outsider's approval does not count.
    ok(d, &["release", "approve", "m.json", "--key", "d"]);
    let e = fails(d, &VERIFY);
    assert!(e.contains("not a maintainer key"), "{e}");
    assert!(e.contains("1 of 2"), "{e}");
    // A second maintainer: approved, exit 0.
    ok(d, &["release", "approve", "m.json", "--key", "c"]);
    let out = ok(d, &VERIFY);
    assert!(out.contains("approvals: 2 of 2 needed"), "{out}");
    assert!(out.contains("verdict: approved"), "{out}");
    let json = ok(d, &[&VERIFY[..], &["--json"]].concat());
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["approved"], true);
    assert_eq!(report["counted"], 2);
    assert_eq!(report["approvals"][1]["status"], "duplicate_key");

    // As a node: a downgrade or another board is refused.
    let e = fails(d, &[&VERIFY[..], &["--running", "1.1.0"]].concat());
    assert!(e.contains("downgrade"), "{e}");
    let e = fails(d, &[&VERIFY[..], &["--board", "rpi5"]].concat());
    assert!(e.contains("not built for board rpi5"), "{e}");
    ok(
        d,
        &[&VERIFY[..], &["--running", "1.0.3", "--board", "rpi4"]].concat(),
    );
    // Judged after its expiry: refused.
    let late = (m["manifest"]["expires_ms"].as_u64().unwrap() + 1).to_string();
    let e = fails(d, &[&VERIFY[..], &["--now-ms", &late]].concat());
    assert!(e.contains("expired"), "{e}");

    // A key file others can read is refused.
    fs::set_permissions(d.join("b"), fs::Permissions::from_mode(0o644)).unwrap();
    let e = fails(d, &["release", "approve", "m.json", "--key", "b"]);
    assert!(e.contains("chmod 600"), "{e}");

    // Tampering: change the version, and no approval counts any more.
    let mut t = m.clone();
    let approved: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("m.json")).unwrap()).unwrap();
    t["approvals"] = approved["approvals"].clone();
    t["manifest"]["version"] = "1.9.0".into();
    fs::write(d.join("t.json"), serde_json::to_vec(&t).unwrap()).unwrap();
    let e = fails(d, &["release", "verify", "t.json", "--root", "root.json"]);
    assert!(e.contains("approvals: 0 of 2 needed"), "{e}");
    assert!(e.contains("approves another manifest"), "{e}");
    // No temporary files were left behind by the in-place edits.
    let leftovers: Vec<_> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn root_rotation_needs_both_thresholds() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for k in ["a", "b", "c", "d"] {
        ok(d, &["release", "keygen", "--out", k]);
    }
    ok(
        d,
        &[
            "release",
            "root-init",
            "--keys",
            "a.pub,b.pub,c.pub",
            "--threshold",
            "2",
            "--out",
            "root.json",
        ],
    );
    ok(d, &["release", "root-sign", "root.json", "--key", "a"]);
    ok(d, &["release", "root-sign", "root.json", "--key", "b"]);
    // Version 2: c and d, both needed.
    ok(
        d,
        &[
            "release",
            "root-rotate",
            "--from",
            "root.json",
            "--keys",
            "c.pub,d.pub",
            "--threshold",
            "2",
            "--out",
            "root2.json",
        ],
    );
    fs::write(d.join("img"), b"tiny").unwrap();
    ok(
        d,
        &[
            "release",
            "create",
            "--image",
            "img",
            "--version",
            "2.0.0",
            "--board",
            "rpi5",
            "--min-version",
            "1.0.0",
            "--expires-days",
            "1",
            "--out",
            "m.json",
        ],
    );
    ok(d, &["release", "approve", "m.json", "--key", "c"]);
    ok(d, &["release", "approve", "m.json", "--key", "d"]);
    let chain = [
        "release",
        "verify",
        "m.json",
        "--root",
        "root.json",
        "--root",
        "root2.json",
    ];
    // New keys only (2 of 2 own, 1 of 2 previous): refused.
    let args = ["--prev", "root.json"];
    ok(
        d,
        &[
            &["release", "root-sign", "root2.json", "--key", "c"][..],
            &args,
        ]
        .concat(),
    );
    let out = ok(
        d,
        &[
            &["release", "root-sign", "root2.json", "--key", "d"][..],
            &args,
        ]
        .concat(),
    );
    assert!(out.contains("its own keys: 2 of 2"), "{out}");
    assert!(out.contains("keys: 1 of 2"), "{out}");
    let e = fails(d, &chain);
    assert!(e.contains("by the previous root's keys"), "{e}");
    // A second old key signs: both thresholds met, and under root 2 c and d count.
    ok(
        d,
        &[
            &["release", "root-sign", "root2.json", "--key", "a"][..],
            &args,
        ]
        .concat(),
    );
    let out = ok(d, &chain);
    assert!(out.contains("root version 2"), "{out}");
    assert!(out.contains("verdict: approved"), "{out}");
    // Under root 1 alone, d is an outsider: 1 of 2.
    let e = fails(d, &["release", "verify", "m.json", "--root", "root.json"]);
    assert!(e.contains("1 of 2"), "{e}");
    // Skipping: root 2 alone is not an anchor (it is not signed by k of... itself it is,
    // but a node only anchors the root in its image); giving root2 twice skips nothing but
    // repeats, and is refused.
    let e = fails(
        d,
        &[
            "release",
            "verify",
            "m.json",
            "--root",
            "root.json",
            "--root",
            "root2.json",
            "--root",
            "root2.json",
        ],
    );
    assert!(e.contains("cannot follow"), "{e}");
}
