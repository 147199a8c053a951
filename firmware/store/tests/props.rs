//! Property tests run against both implementations through the `ShardStore` trait.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use borg_store::{Address, AddressError, MemStore, RedbStore, ShardStore, MAX_SHARD_BYTES};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::{rngs::StdRng, RngCore, SeedableRng};

/// Run `check` against a fresh MemStore and a fresh RedbStore (in its own temp dir), both with
/// `budget`; a failure names the implementation.
fn each_store(
    budget: u64,
    check: impl Fn(&dyn ShardStore) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    check(&MemStore::new(budget)).map_err(|e| TestCaseError::fail(format!("MemStore: {e}")))?;
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path().join("shards.redb"), budget).unwrap();
    check(&redb).map_err(|e| TestCaseError::fail(format!("RedbStore: {e}")))
}

/// Pseudo-random bytes of `len` from `seed` (cheaper to generate and shrink than a
/// proptest `Vec<u8>` of up to 256 KiB).
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// Shard lengths over the whole allowed range, with the edges and small sizes well covered.
fn shard_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(MAX_SHARD_BYTES),
        0usize..64,
        0usize..=MAX_SHARD_BYTES,
    ]
}

fn shard() -> impl Strategy<Value = Vec<u8>> {
    (shard_len(), any::<u64>()).prop_map(|(len, seed)| bytes(len, seed))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any bytes up to the limit round-trip, under the address `Address::of` gives them, and
    /// storing them again changes nothing.
    #[test]
    fn any_shard_round_trips(shards in prop::collection::vec(shard(), 1..4)) {
        each_store(u64::MAX, |store| {
            for s in &shards {
                let addr = store.put(s)?;
                prop_assert_eq!(addr, Address::of(s));
                prop_assert!(store.has(&addr)?);
                prop_assert_eq!(store.len_of(&addr)?, Some(s.len() as u64));
                prop_assert_eq!(store.get(&addr)?, Some(s.clone()));
            }
            let before = store.usage()?;
            for s in &shards {
                prop_assert_eq!(store.put(s)?, Address::of(s));
                store.put_at(&Address::of(s), s)?;
            }
            prop_assert_eq!(store.usage()?, before);
            Ok(())
        })?;
    }

    /// `put_at` with an address that is not the bytes' hash is refused and stores nothing.
    #[test]
    fn put_at_wrong_address_stores_nothing(s in shard(), other in any::<[u8; 32]>()) {
        let wrong = Address::from_bytes(other);
        prop_assume!(wrong != Address::of(&s));
        each_store(u64::MAX, |store| {
            let e = store.put_at(&wrong, &s).unwrap_err();
            prop_assert_eq!(e.code(), "wrong_address");
            prop_assert_eq!(e.http_status(), 400);
            prop_assert!(!store.has(&wrong)?);
            prop_assert_eq!(store.len_of(&wrong)?, None);
            prop_assert!(!store.has(&Address::of(&s))?);
            prop_assert_eq!(store.get(&wrong)?, None);
            prop_assert_eq!(store.usage()?.shards, 0);
            prop_assert_eq!(store.usage()?.bytes, 0);
            prop_assert!(store.addresses()?.is_empty());
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// After any sequence of puts and deletes (some refused for the budget), usage, the address
    /// list and every shard's presence match a simple model.
    #[test]
    fn usage_follows_any_sequence(
        pool in prop::collection::vec((0usize..4096, any::<u64>()), 1..6),
        ops in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 0..20),
        budget in 0u64..16_384,
    ) {
        let pool: Vec<Vec<u8>> = pool.iter().map(|&(len, seed)| bytes(len, seed)).collect();
        each_store(budget, |store| {
            let mut model: BTreeMap<Address, usize> = BTreeMap::new();
            for (is_put, i) in &ops {
                let s = i.get(&pool);
                let addr = Address::of(s);
                let used: usize = model.values().sum();
                if *is_put {
                    let fits = model.contains_key(&addr) || (used + s.len()) as u64 <= budget;
                    match store.put(s) {
                        Ok(a) => {
                            prop_assert!(fits, "put over budget accepted");
                            prop_assert_eq!(a, addr);
                            model.insert(addr, s.len());
                        }
                        Err(e) => {
                            prop_assert!(!fits, "put within budget refused: {}", e);
                            prop_assert_eq!(e.code(), "full");
                        }
                    }
                } else {
                    store.delete(&addr)?;
                    model.remove(&addr);
                }
                let usage = store.usage()?;
                prop_assert_eq!(usage.shards, model.len() as u64);
                prop_assert_eq!(usage.bytes, model.values().sum::<usize>() as u64);
                prop_assert_eq!(usage.budget, budget);
                prop_assert!(usage.bytes <= budget);
            }
            prop_assert_eq!(store.addresses()?, model.keys().copied().collect::<Vec<_>>());
            for s in &pool {
                let addr = Address::of(s);
                let expect = model.contains_key(&addr).then(|| s.clone());
                prop_assert_eq!(store.get(&addr)?, expect);
            }
            Ok(())
        })?;
    }

    /// An address's text form is 64 lowercase hex characters and parses back to it.
    #[test]
    fn address_hex_round_trips(raw in any::<[u8; 32]>()) {
        let a = Address::from_bytes(raw);
        let text = a.to_string();
        prop_assert_eq!(text.len(), 64);
        prop_assert!(text.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        prop_assert_eq!(text.parse::<Address>(), Ok(a));
        let json = serde_json::to_string(&a).unwrap();
        prop_assert_eq!(serde_json::from_str::<Address>(&json).unwrap(), a);
    }

    /// Any text that is not exactly 64 characters of 0-9a-f is refused.
    #[test]
    fn bad_hex_is_refused(text in "\\PC{0,70}") {
        let good = text.len() == 64 && text.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
        prop_assume!(!good);
        let e = text.parse::<Address>().unwrap_err();
        prop_assert_eq!(e.code(), "bad_address");
    }

    /// One wrong character anywhere in a good address is refused at that position.
    #[test]
    fn one_bad_char_is_refused(raw in any::<[u8; 32]>(), at in 0usize..64, c in "[^0-9a-f]") {
        let mut text: Vec<char> = Address::from_bytes(raw).to_string().chars().collect();
        text[at] = c.chars().next().unwrap();
        let text: String = text.into_iter().collect();
        let e = text.parse::<Address>().unwrap_err();
        if c.len() == 1 {
            prop_assert_eq!(e, AddressError::NotHex(at));
        } else {
            prop_assert_eq!(e, AddressError::Length(text.len()));
        }
    }
}
