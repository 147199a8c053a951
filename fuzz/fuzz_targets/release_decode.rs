//! Fuzz the OTA decoders (trust root files, release files, the node's state file, image chunk
//! lists, autoboot.txt): arbitrary
//! bytes must decode or fail cleanly, what decodes must respect the bounds, re-encode to
//! canonical bytes that decode to the same value.
#![no_main]

use borg_ota::{
    OtaState, ReleaseFile, SignedRoot, TrustedRoot, MAX_BOARDS, MAX_NOTES_BYTES, MAX_ROOT_KEYS,
    MAX_SIGNATURES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = SignedRoot::decode(data) {
        assert!(root.signed.keys.len() <= MAX_ROOT_KEYS);
        assert!(root.signatures.len() <= MAX_SIGNATURES);
        let t = root.signed.threshold as usize;
        assert!(t >= 1 && t <= root.signed.keys.len());
        let again = SignedRoot::decode(&root.encode()).expect("re-encoded root must decode");
        assert_eq!(again, root);
        let _ = TrustedRoot::anchor(&root);
    }
    if let Ok(release) = ReleaseFile::decode(data) {
        let m = &release.manifest;
        assert!(!m.boards.is_empty() && m.boards.len() <= MAX_BOARDS);
        assert!(m.notes.len() <= MAX_NOTES_BYTES);
        assert!(m.min_version <= m.version);
        assert!(release.approvals.len() <= MAX_SIGNATURES);
        let again = ReleaseFile::decode(&release.encode()).expect("re-encoded release must decode");
        assert_eq!(again, release);
    }
    if let Ok(list) = borg_ota::chunks::ChunkList::decode(data) {
        assert!(list.addrs.len() <= borg_ota::chunks::MAX_CHUNKS);
        assert_eq!(
            borg_ota::chunks::ChunkList::count_for(list.size),
            list.addrs.len() as u64
        );
        assert_eq!(list.encode(), data, "a chunk list has one encoding");
    }
    if let Ok(a) = borg_ota::autoboot::AutoBoot::parse(data) {
        assert_ne!(a.boot_partition, a.tryboot_partition);
        assert_eq!(borg_ota::autoboot::AutoBoot::parse(&a.render()).ok(), Some(a));
    }
    if let Ok(state) = OtaState::decode(data) {
        let again = OtaState::decode(&state.encode()).expect("re-encoded state must decode");
        assert_eq!(again, state);
    }
});
