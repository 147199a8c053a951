//! Issue 12, fetching a release image through the storage layer, on 3 real `borg node`
//! processes (127.72.0.x): a maintainer stores the image as shards (`borg release upload`);
//! `borg update fetch` at another node writes it into a slot file and verifies it by reading
//! it back. A release with k-1 approvals is refused before the slot is touched; an
//! interrupted or damaged slot is completed by fetching only what is missing; a release
//! whose image does not match its chunks is not installed; the wrong image is refused by
//! `upload --release` before anything is stored.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use borg_tests::cli::{borg, fails, ok, text};
use borg_tests::Net;
use serde_json::Value;

fn release(d: &Path, image: &str, version: &str, out: &str, keys: &[&str], fetch: Option<&str>) {
    let mut args = vec![
        "release",
        "create",
        "--image",
        image,
        "--version",
        version,
        "--board",
        "qemu-virt",
        "--min-version",
        "0.1.0",
        "--expires-days",
        "30",
        "--out",
        out,
    ];
    if let Some(f) = fetch {
        args.extend(["--fetch-id", f]);
    }
    ok(d, &args);
    for k in keys {
        ok(d, &["release", "approve", out, "--key", k]);
    }
}

#[test]
fn an_approved_image_is_fetched_into_a_slot_resumably_and_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for k in ["a", "b", "c"] {
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
    for k in ["a", "b"] {
        ok(d, &["release", "root-sign", "root.json", "--key", k]);
    }
    // 2 MiB and 5 bytes: nine chunks, the last of 5 bytes.
    let image: Vec<u8> = (0..(2 << 20) + 5)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(d.join("img"), &image).unwrap();
    let other: Vec<u8> = image.iter().map(|b| b ^ 0x5a).collect();
    std::fs::write(d.join("other"), &other).unwrap();
    release(d, "img", "0.2.0", "good.json", &["a", "b"], None);
    release(d, "img", "0.2.1", "half.json", &["a"], None);

    let mut net = Net::new(72, 500, 3);
    net.env.push((
        "BORG_OTA_ROOT".into(),
        d.join("root.json").display().to_string(),
    ));
    net.env.push(("BORG_SHARD_QUICK".into(), "1".into()));
    net.spawn(0, None);
    net.wait_up(0);
    net.spawn(1, Some(0));
    net.spawn(2, Some(0));
    net.wait_tree(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no tree: {e}"));
    let ip = |i: usize| format!("127.72.0.{}", i + 2);

    // The wrong image for a release is refused before any of it is stored.
    let e = fails(
        d,
        &[
            "release",
            "upload",
            "--image",
            "other",
            "--node",
            &ip(0),
            "--release",
            "good.json",
        ],
    );
    assert!(e.contains("is not the image of this release"), "{e}");
    let out = ok(
        d,
        &[
            "release",
            "upload",
            "--image",
            "img",
            "--node",
            &ip(0),
            "--release",
            "good.json",
        ],
    );
    assert!(out.contains("as 9 chunks and their list"), "{out}");

    // A slot of 3 MiB filled with 0xAA, standing in for the inactive partition.
    let slot = d.join("slot");
    std::fs::write(&slot, vec![0xAA; 3 << 20]).unwrap();
    let fetch = |release: &str, json: bool| {
        let mut args = vec![
            "update",
            "fetch",
            "--release",
            release,
            "--root",
            "root.json",
            "--node",
            "",
            "--slot",
            "slot",
        ];
        let node = ip(2);
        args[7] = &node;
        if json {
            args.push("--json");
        }
        borg(d, &args)
    };

    // k-1 approvals: refused, and the slot is untouched.
    let o = fetch("half.json", false);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("refused before anything was written: not enough approvals: 1 of 2"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&slot).unwrap(), vec![0xAA; 3 << 20]);

    // Approved: fetched through node 2 (which holds none of it, or some), verified.
    let o = fetch("good.json", true);
    assert!(o.status.success(), "{}", text(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            j["chunks"].as_u64(),
            j["fetched"].as_u64(),
            j["kept"].as_u64()
        ),
        (Some(9), Some(9), Some(0)),
        "{j}"
    );
    eprintln!(
        "figure: image fetch {:.1} MiB/s, slot read-back {:.1} MiB/s",
        j["fetch_mib_s"], j["verify_mib_s"]
    );
    let written = std::fs::read(&slot).unwrap();
    assert_eq!(&written[..image.len()], &image[..]);
    assert!(
        written[image.len()..].iter().all(|b| *b == 0xAA),
        "beyond the image the slot is untouched"
    );

    // Interrupted or damaged: one chunk zeroed, one bit flipped in another. Only those two are
    // fetched again.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&slot).unwrap();
        f.write_all_at(&vec![0u8; 256 * 1024], 3 * 256 * 1024)
            .unwrap();
        f.write_all_at(&[written[5 * 256 * 1024 + 17] ^ 1], 5 * 256 * 1024 + 17)
            .unwrap();
    }
    let o = fetch("good.json", true);
    assert!(o.status.success(), "{}", text(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (j["fetched"].as_u64(), j["kept"].as_u64()),
        (Some(2), Some(7)),
        "{j}"
    );
    assert_eq!(&std::fs::read(&slot).unwrap()[..image.len()], &image[..]);

    // A slot too small for the image.
    std::fs::write(d.join("small"), vec![0u8; 1 << 20]).unwrap();
    let node = ip(1);
    let e = fails(
        d,
        &[
            "update",
            "fetch",
            "--release",
            "good.json",
            "--root",
            "root.json",
            "--node",
            &node,
            "--slot",
            "small",
        ],
    );
    assert!(e.contains("the image needs"), "{e}");

    // Maintainers approved a manifest whose digest is not that of the chunks it names: the
    // slot reads back wrong, and the release is not installed.
    let out = ok(
        d,
        &["release", "upload", "--image", "other", "--node", &ip(1)],
    );
    let fetch_id = out.rsplit("fetch id ").next().unwrap().trim().to_string();
    release(
        d,
        "img",
        "0.2.2",
        "mixed.json",
        &["a", "b"],
        Some(&fetch_id),
    );
    let o = fetch("mixed.json", false);
    assert!(!o.status.success());
    assert!(text(&o).contains("not installed"), "{}", text(&o));
}
