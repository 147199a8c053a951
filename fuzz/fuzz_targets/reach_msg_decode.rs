//! Fuzz the reachability message decoder (probes, beacons, relay orders), the beacon pre-check and
//! the gateway proof check: arbitrary JSON bodies under every known kind (and unknown
//! ones) must decode or fail cleanly, and what decodes must re-encode to the same message.
#![no_main]

use std::sync::OnceLock;

use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::reach::msg::{peek_beacon, ReachMsg, KINDS};
use borg_proto::reach::proof;
use libfuzzer_sys::fuzz_target;

fn key() -> PublicKey {
    static K: OnceLock<PublicKey> = OnceLock::new();
    *K.get_or_init(|| SecretKey::generate().public())
}

fuzz_target!(|data: &[u8]| {
    // The beacon pre-check reads raw datagrams from the LAN: never panics, whatever they are.
    let _ = peek_beacon(data);
    // A gateway's proof, as a beacon carries it: any text, checked as if its signer were an
    // observer of ours (so the signature path runs too).
    if let Ok(text) = std::str::from_utf8(data) {
        let ext = "11.0.0.2:13300".parse().expect("a literal address");
        let _ = proof::check(text, &key(), ext, 1_800_000_000_000, 600_000, |_| true);
    }
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
