//! Fuzz the envelope decoder and the strict JSON parser on arbitrary bytes.
//!
//! Besides "never panics", it checks the invariants the signature scheme relies on:
//! - whatever `parse_strict` accepts has a canonical form that parses back to the same
//!   value and re-canonicalizes to the same text (the canonical form is injective and stable);
//! - `open` and `verify_signature_only` agree on signatures, and an accepted envelope
//!   re-encodes to bytes that open to the same envelope.
#![no_main]

use borg_proto::envelope::{self, ReplayCache, MAX_CLOCK_SKEW_MS};
use borg_proto::jcs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = jcs::parse_strict(data) {
        let canonical = jcs::to_string(&value);
        let again = jcs::parse_strict(canonical.as_bytes())
            .expect("canonical text of a parsed value must parse");
        assert_eq!(again, value, "canonical form must round-trip");
        assert_eq!(
            jcs::to_string(&again),
            canonical,
            "canonical form must be stable"
        );
    }

    // Use the envelope's own ts as "now" when there is one, so the time check passes and
    // the fuzzer can reach the replay cache; also try a clock far away.
    let signature_only = envelope::verify_signature_only(data);
    let now = signature_only.as_ref().map(|e| e.ts).unwrap_or(0);
    let mut cache = ReplayCache::new(8);
    let opened = envelope::open(data, now, &mut cache);
    assert_eq!(opened.is_ok(), signature_only.is_ok());
    if let Ok(env) = opened {
        let bytes = env.to_bytes();
        let reopened =
            envelope::verify_signature_only(&bytes).expect("re-encoded envelope verifies");
        assert_eq!(*reopened, *env);
        // The same envelope again is a replay; far from its ts it is stale.
        assert!(envelope::open(data, now, &mut cache).is_err());
        let far = now.wrapping_add(MAX_CLOCK_SKEW_MS + 1);
        assert!(envelope::open(data, far, &mut ReplayCache::new(8)).is_err());
    }
});
