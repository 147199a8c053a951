//! `put` then `get` of random files at the chunk boundaries, through a memory shard store.
#![allow(clippy::unwrap_used)]

mod common;

use borg_files::{
    decrypt_to_writer, encrypt_reader, unwrap_key, Encryptor, FileKey, FilesError, ShardRef, CHUNK,
    TAG_LEN,
};
use borg_store::{MemStore, ShardStore, MAX_SHARD_BYTES};
use common::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

fn get(p: &Put, user: &borg_files::UserKeys) -> Result<Vec<u8>, FilesError> {
    let key = unwrap_key(p.manifest().wrapped_key(), user.encryption())?;
    let mut out = Vec::new();
    decrypt_to_writer(
        p.manifest(),
        &key,
        |_, s| Ok(p.store.get(&s.addr)?.unwrap_or_default()),
        &mut out,
    )?;
    Ok(out)
}

#[test]
fn round_trip_at_chunk_boundaries_with_the_real_chunk_size() {
    assert_eq!(CHUNK + TAG_LEN, MAX_SHARD_BYTES);
    let mut rng = StdRng::seed_from_u64(10);
    let user = owner();
    for (seed, size) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(&mut rng, size);
        let p = put(seed as u64, &user, &data);
        let m = p.manifest();
        assert_eq!(m.size(), size as u64);
        assert_eq!(m.sha256(), &<[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(m.shards().len(), size.div_ceil(CHUNK).max(1), "size {size}");
        for s in m.shards() {
            assert!(s.len as usize <= MAX_SHARD_BYTES);
        }
        assert_eq!(
            m.shards().iter().map(|s| u64::from(s.len)).sum::<u64>(),
            size as u64 + 16 * m.shards().len() as u64
        );
        assert_eq!(p.store.usage().unwrap().shards, m.shards().len() as u64);
        assert_eq!(get(&p, &user).unwrap(), data, "size {size}");
        // Only the owner's m/1' key opens it.
        assert_eq!(get(&p, &stranger()).unwrap_err(), FilesError::WrongKey);
    }
}

#[test]
fn chunks_decrypt_independently_in_any_order() {
    let mut rng = StdRng::seed_from_u64(11);
    let data = random_bytes(&mut rng, 3 * CHUNK + 5);
    let p = put(1, &owner(), &data);
    let enc = Encryptor::new(&p.key, &p.salt);
    let n = p.manifest().shards().len();
    for i in (0..n).rev() {
        let plain = enc
            .decrypt_chunk(i as u64, i + 1 == n, &p.shard(i))
            .unwrap();
        let start = i * CHUNK;
        assert_eq!(plain, data[start..(start + CHUNK).min(data.len())]);
    }
}

#[test]
fn empty_file_is_one_empty_last_chunk() {
    let p = put(2, &owner(), b"");
    assert_eq!(p.manifest().shards().len(), 1);
    assert_eq!(p.manifest().shards()[0].len as usize, TAG_LEN);
    let enc = Encryptor::new(&p.key, &p.salt);
    assert_eq!(enc.decrypt_chunk(0, true, &p.shard(0)).unwrap(), b"");
    // An empty non-last chunk is a different ciphertext and does not open as last.
    let not_last = enc.encrypt_chunk(0, false, b"").unwrap();
    assert!(enc.decrypt_chunk(0, true, &not_last).is_err());
    assert_eq!(get(&p, &owner()).unwrap(), b"");
}

#[test]
fn encryption_is_deterministic_for_a_key_and_salt() {
    let mut rng = StdRng::seed_from_u64(12);
    let data = random_bytes(&mut rng, CHUNK + 100);
    let key = FileKey::from_bytes([5; 32]);
    let a = encrypt_reader(&data[..], &key, &[1; 16], &[], |_, _| Ok(())).unwrap();
    let b = encrypt_reader(&data[..], &key, &[1; 16], &[], |_, _| Ok(())).unwrap();
    assert_eq!(a, b);
    let c = encrypt_reader(&data[..], &key, &[2; 16], &[], |_, _| Ok(())).unwrap();
    assert_ne!(a.shards, c.shards);
}

/// A reader that hands out at most `step` bytes per call and is interrupted now and then.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    calls: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(7) {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn short_reads_give_the_same_shards() {
    let mut rng = StdRng::seed_from_u64(13);
    let data = random_bytes(&mut rng, 2 * CHUNK);
    let key = FileKey::from_bytes([6; 32]);
    let whole = encrypt_reader(&data[..], &key, &[0; 16], &[], |_, _| Ok(())).unwrap();
    let trickle = Trickle {
        data: &data,
        step: 10_007,
        calls: 0,
    };
    let pieces = encrypt_reader(trickle, &key, &[0; 16], &[], |_, _| Ok(())).unwrap();
    assert_eq!(whole, pieces);
    // Exactly 2 full chunks: the second is the last (no empty third chunk).
    assert_eq!(whole.shards.len(), 2);
}

#[test]
fn resume_skips_sent_shards_and_detects_a_changed_file() {
    let mut rng = StdRng::seed_from_u64(14);
    let data = random_bytes(&mut rng, 3 * CHUNK + 5);
    let key = FileKey::from_bytes([7; 32]);
    let salt = [3; 16];
    let full = encrypt_reader(&data[..], &key, &salt, &[], |_, _| Ok(())).unwrap();

    // Interrupted after two shards: resuming sends only the other two.
    let done: Vec<ShardRef> = full.shards[..2].to_vec();
    let mut sent = Vec::new();
    let resumed = encrypt_reader(&data[..], &key, &salt, &done, |a, _| {
        sent.push(*a);
        Ok(())
    })
    .unwrap();
    assert_eq!(resumed, full);
    assert_eq!(sent, vec![full.shards[2].addr, full.shards[3].addr]);

    // The file changed in chunk 1: refused before anything is sent.
    let mut changed = data.clone();
    changed[CHUNK + 3] ^= 1;
    let mut sent = 0;
    let err = encrypt_reader(&changed[..], &key, &salt, &done, |_, _| {
        sent += 1;
        Ok(())
    })
    .unwrap_err();
    assert_eq!(err, FilesError::Changed { index: 1 });
    assert_eq!(sent, 0);

    // The file shrank below what was sent.
    let err = encrypt_reader(&data[..CHUNK], &key, &salt, &done, |_, _| Ok(())).unwrap_err();
    assert!(matches!(err, FilesError::Changed { .. }), "{err:?}");
}

#[test]
fn store_errors_stop_the_upload() {
    let mut rng = StdRng::seed_from_u64(15);
    let data = random_bytes(&mut rng, 2 * CHUNK);
    let store = MemStore::new(MAX_SHARD_BYTES as u64); // room for one shard
    let err = encrypt_reader(
        &data[..],
        &FileKey::from_bytes([1; 32]),
        &[0; 16],
        &[],
        |a, b| store.put_at(a, b),
    )
    .unwrap_err();
    assert_eq!(err.code(), "full");
    assert_eq!(err.http_status(), 507);
}

#[test]
fn get_refuses_wrong_or_missing_shards() {
    let mut rng = StdRng::seed_from_u64(16);
    let data = random_bytes(&mut rng, CHUNK + 9);
    let p = put(3, &owner(), &data);
    let mut out = Vec::new();
    // A fetch that returns the other shard's bytes.
    let err =
        decrypt_to_writer(p.manifest(), &p.key, |i, _| Ok(p.shard(1 - i)), &mut out).unwrap_err();
    assert!(matches!(err, FilesError::Mismatch(_)), "{err:?}");
}
