//! Fuzz the shardTree cell's envelope bodies (`shard.has`, `shard.have`, `shard.offer`,
//! `shard.stored`, `shard.ask`) and its member announcements: arbitrary JSON must parse or
//! fail cleanly; what parses must respect the bounds and survive a re-encode unchanged.
#![no_main]

use borg_cells::shard::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(addrs) = wire::parse_has(&body) {
        assert!(addrs.len() <= wire::MAX_QUERY_ADDRS);
        assert_eq!(wire::parse_has(&wire::has_body(&addrs)).unwrap(), addrs);
    }
    if let Ok(answers) = wire::parse_have(&body) {
        assert!(answers.len() <= wire::MAX_QUERY_ADDRS);
        assert_eq!(wire::parse_have(&wire::have_body(&answers)).unwrap(), answers);
    }
    if let Ok((stream, shards)) = wire::parse_offer(&body) {
        assert!(!shards.is_empty() && shards.len() <= wire::MAX_OFFER_SHARDS);
        assert!(shards.iter().all(|(_, l)| *l as usize <= 256 * 1024));
        let again = wire::parse_offer(&wire::offer_body(stream, &shards)).unwrap();
        assert_eq!(again, (stream, shards));
    }
    if let Ok((stream, stored, failed)) = wire::parse_stored(&body) {
        let again = wire::parse_stored(&wire::stored_body(stream, &stored, &failed)).unwrap();
        assert_eq!(again, (stream, stored, failed));
    }
    if let Ok(addrs) = wire::parse_ask(&body) {
        assert!(addrs.len() <= wire::MAX_OFFER_SHARDS);
    }
    if let Some((addr, epoch)) = wire::parse_member(&body) {
        assert!(addr.len() <= wire::MAX_ADDR_LEN);
        assert_eq!(
            wire::parse_member(&wire::member_payload(&addr, epoch)),
            Some((addr, epoch))
        );
    }
});
