//! Fuzz the network-time message decoder (`time.req`, `time.ans`): arbitrary JSON bodies under
//! every known kind (and an unknown one) must decode or fail cleanly, what decodes must respect
//! the bounds and re-encode to the same message.
#![no_main]

use borg_proto::crono::msg::{TimeMsg, KINDS, MAX_HOLD_US, MAX_STRATUM, MAX_WIRE_INT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    let kind = KINDS
        .get(selector as usize % (KINDS.len() + 1))
        .copied()
        .unwrap_or("time.unknown");
    if let Ok(msg) = TimeMsg::from_kind_body(kind, &body) {
        if let TimeMsg::Ans(a) = &msg {
            assert!(a.rx_us <= a.tx_us && a.tx_us - a.rx_us <= MAX_HOLD_US);
            assert!(a.tx_us <= MAX_WIRE_INT && a.err_us <= MAX_WIRE_INT);
            assert!(a.stratum <= MAX_STRATUM);
        }
        let (k, b) = msg.to_kind_body();
        assert_eq!(k, kind);
        let again = TimeMsg::from_kind_body(&k, &b).expect("re-encoded message must decode");
        assert_eq!(again, msg);
    }
});
