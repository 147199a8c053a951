//! Fuzz the ftreeFileMgr cell's envelope bodies (`file.index`, `file.fetch`, `file.list`,
//! `file.listed`, `file.unindex`, `file.sync`, `file.need`): arbitrary JSON must parse or fail
//! cleanly; what parses must respect the bounds, and id lists survive a re-encode unchanged.
#![no_main]

use borg_cells::ftree::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = wire::q_of(&body);
    let _ = wire::id_of(&body);
    if let Ok(text) = wire::envelope_field(&body, "manifest") {
        assert!(text.len() <= borg_proto::envelope::MAX_ENVELOPE_BYTES);
        let _ = borg_files::open_manifest(text.as_bytes());
    }
    if let (Ok(owner), Ok(ids)) = (wire::owner_of(&body), wire::ids_of(&body)) {
        assert!(ids.len() <= wire::MAX_SYNC_IDS);
        let again = wire::ids_body(&owner, &ids);
        assert_eq!(wire::ids_of(&again).unwrap(), ids);
        assert_eq!(wire::owner_of(&again).unwrap(), owner);
    }
    if let Ok(files) = wire::parse_listed(&body) {
        assert!(files.len() <= wire::MAX_LIST);
    }
});
