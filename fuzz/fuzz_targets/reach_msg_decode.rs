//! Fuzz the reachability message decoder (probes, beacons, relay orders) and the beacon pre-check: arbitrary JSON bodies under every known kind (and unknown
//! ones) must decode or fail cleanly, and what decodes must re-encode to the same message.
#![no_main]

use borg_proto::reach::msg::{peek_beacon, ReachMsg, KINDS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The beacon pre-check reads raw datagrams from the LAN: never panics, whatever they are.
    let _ = peek_beacon(data);
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    let kind = KINDS
        .get(selector as usize % (KINDS.len() + 1))
        .copied()
        .unwrap_or("nat.unknown");
    if let Ok(msg) = ReachMsg::from_kind_body(kind, &body) {
        let (k, b) = msg.to_kind_body();
        assert_eq!(k, kind);
        let again = ReachMsg::from_kind_body(&k, &b).expect("re-encoded message must decode");
        assert_eq!(again, msg);
    }
});
