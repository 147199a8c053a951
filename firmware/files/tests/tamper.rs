//! Property tests: any change to the shards of a file is detected, and shards alone reveal
//! nothing without the key. Chunks here are small (the construction does not depend on the
//! chunk size, only the manifest does), so many cases run quickly.
#![allow(clippy::unwrap_used)]

use borg_files::{Encryptor, FileKey, FilesError};
use proptest::prelude::*;

/// A file of 1..=5 chunks of up to 48 bytes, with its key and salt.
fn arb_file() -> impl Strategy<Value = (Vec<Vec<u8>>, [u8; 32], [u8; 16])> {
    (
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 1..=5),
        any::<[u8; 32]>(),
        any::<[u8; 16]>(),
    )
}

fn seal(chunks: &[Vec<u8>], key: &[u8; 32], salt: &[u8; 16]) -> Vec<Vec<u8>> {
    let enc = Encryptor::new(&FileKey::from_bytes(*key), salt);
    let n = chunks.len();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| enc.encrypt_chunk(i as u64, i + 1 == n, c).unwrap())
        .collect()
}

/// Open every shard as the file `key` + `salt` with `shards.len()` chunks.
fn open_all(
    shards: &[Vec<u8>],
    key: &[u8; 32],
    salt: &[u8; 16],
) -> Result<Vec<Vec<u8>>, FilesError> {
    let enc = Encryptor::new(&FileKey::from_bytes(*key), salt);
    let n = shards.len();
    shards
        .iter()
        .enumerate()
        .map(|(i, s)| enc.decrypt_chunk(i as u64, i + 1 == n, s))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn round_trip((chunks, key, salt) in arb_file()) {
        let shards = seal(&chunks, &key, &salt);
        prop_assert_eq!(open_all(&shards, &key, &salt).unwrap(), chunks);
    }

    #[test]
    fn any_flipped_bit_fails((chunks, key, salt) in arb_file(), pick in any::<prop::sample::Index>(), bit in 0usize..8) {
        let mut shards = seal(&chunks, &key, &salt);
        let i = pick.index(shards.len());
        let byte = pick.index(shards[i].len());
        shards[i][byte] ^= 1 << bit;
        prop_assert_eq!(open_all(&shards, &key, &salt), Err(FilesError::Corrupt { index: i as u64 }));
    }

    #[test]
    fn reordered_chunks_fail((chunks, key, salt) in arb_file(), a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
        let mut shards = seal(&chunks, &key, &salt);
        let (a, b) = (a.index(shards.len()), b.index(shards.len()));
        prop_assume!(shards[a] != shards[b]);
        shards.swap(a, b);
        prop_assert!(open_all(&shards, &key, &salt).is_err());
    }

    #[test]
    fn truncation_fails((chunks, key, salt) in arb_file()) {
        prop_assume!(chunks.len() >= 2);
        let mut shards = seal(&chunks, &key, &salt);
        shards.pop();
        let err = open_all(&shards, &key, &salt).unwrap_err();
        // The new final shard was not sealed as last.
        prop_assert_eq!(err, FilesError::Corrupt { index: shards.len() as u64 - 1 });
    }

    #[test]
    fn extension_fails((chunks, key, salt) in arb_file(), extra in prop::collection::vec(any::<u8>(), 0..48)) {
        let mut shards = seal(&chunks, &key, &salt);
        // Append a chunk sealed as a non-last chunk at the next index, or a last chunk:
        // either way the old last shard no longer opens at its place.
        let enc = Encryptor::new(&FileKey::from_bytes(key), &salt);
        shards.push(enc.encrypt_chunk(shards.len() as u64, true, &extra).unwrap());
        prop_assert!(open_all(&shards, &key, &salt).is_err());
    }

    #[test]
    fn chunk_moved_to_another_file_fails((chunks, key, salt) in arb_file(), other_salt in any::<[u8; 16]>(), pick in any::<prop::sample::Index>()) {
        prop_assume!(other_salt != salt);
        let shards = seal(&chunks, &key, &salt);
        // Even under the same key (keys are random per file, so this is the worst case).
        let other = seal(&chunks, &key, &other_salt);
        let i = pick.index(shards.len());
        let mut mixed = shards.clone();
        mixed[i] = other[i].clone();
        prop_assert_eq!(open_all(&mixed, &key, &salt), Err(FilesError::Corrupt { index: i as u64 }));
    }

    #[test]
    fn wrong_key_fails((chunks, key, salt) in arb_file(), other_key in any::<[u8; 32]>()) {
        prop_assume!(other_key != key);
        let shards = seal(&chunks, &key, &salt);
        prop_assert_eq!(open_all(&shards, &other_key, &salt), Err(FilesError::Corrupt { index: 0 }));
    }

    #[test]
    fn shards_are_not_the_plaintext((chunks, key, salt) in arb_file()) {
        let shards = seal(&chunks, &key, &salt);
        for (c, s) in chunks.iter().zip(&shards) {
            prop_assert_eq!(s.len(), c.len() + 16);
            if c.len() >= 8 {
                prop_assert_ne!(&s[..c.len()], &c[..]);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_decrypt_or_panic(bytes in prop::collection::vec(any::<u8>(), 0..80), index in any::<u64>(), last in any::<bool>()) {
        let enc = Encryptor::new(&FileKey::from_bytes([9; 32]), &[0; 16]);
        prop_assert_eq!(enc.decrypt_chunk(index, last, &bytes), Err(FilesError::Corrupt { index }));
    }
}

#[test]
fn a_shard_holder_without_the_key_learns_nothing_readable() {
    // A highly structured plaintext (all zeros) still gives uniform-looking shards.
    let plain = vec![0u8; 4096];
    let key = FileKey::from_bytes([42; 32]);
    let enc = Encryptor::new(&key, &[7; 16]);
    let shard = enc.encrypt_chunk(0, true, &plain).unwrap();
    let zeros = shard[..plain.len()].iter().filter(|b| **b == 0).count();
    assert!(zeros < 64, "{zeros} zero bytes of 4096 in the ciphertext");
    // Trying keys: each wrong key is refused, never yields a plaintext.
    let mut seed = 1u64;
    for _ in 0..64 {
        let mut k = [0u8; 32];
        for b in &mut k {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (seed >> 56) as u8;
        }
        let guess = Encryptor::new(&FileKey::from_bytes(k), &[7; 16]);
        assert_eq!(
            guess.decrypt_chunk(0, true, &shard),
            Err(FilesError::Corrupt { index: 0 })
        );
    }
    assert_eq!(enc.decrypt_chunk(0, true, &shard).unwrap(), plain);
}

#[test]
fn oversized_chunks_are_refused() {
    let enc = Encryptor::new(&FileKey::from_bytes([1; 32]), &[0; 16]);
    let too_big = vec![0u8; borg_files::CHUNK + 1];
    assert_eq!(
        enc.encrypt_chunk(0, true, &too_big).unwrap_err().code(),
        "too_large"
    );
    let shard = vec![0u8; borg_store::MAX_SHARD_BYTES + 1];
    assert!(enc.decrypt_chunk(0, true, &shard).is_err());
}
