//! Throughput figures of file encryption, not a timed test (ignored by default):
//!
//! ```sh
//! cargo test -p borg-files --release --test figures -- --ignored --nocapture
//! ```
//!
//! A 64 MiB file: `encrypt_reader` (ChaCha20-Poly1305 + the plaintext SHA-256 + each shard's
//! SHA-256 address, shards dropped) and `decrypt_to_writer` (address check + decrypt +
//! plaintext SHA-256), the bare cipher per chunk both ways, and SHA-256 alone for comparison.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use borg_files::{
    decrypt_to_writer, encrypt_reader, Encryptor, FileKey, Manifest, ShardRef, CHUNK,
};
use rand::{rngs::StdRng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const SIZE: usize = 64 << 20;

fn mbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

#[test]
#[ignore = "figures for docs, run with --release --ignored --nocapture"]
fn files_figures() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut data = vec![0u8; SIZE];
    rng.fill_bytes(&mut data);
    let key = FileKey::generate(&mut rng);
    let salt = [9u8; 16];

    let t = Instant::now();
    let digest = Sha256::digest(&data);
    let sha = t.elapsed().as_secs_f64();
    assert_ne!(digest[..], [0u8; 32]);

    let mut shards: Vec<Vec<u8>> = Vec::new();
    let t = Instant::now();
    let encrypted = encrypt_reader(&data[..], &key, &salt, &[], |_, b| {
        shards.push(b.to_vec());
        Ok(())
    })
    .unwrap();
    let enc = t.elapsed().as_secs_f64();
    assert_eq!(encrypted.shards.len(), SIZE.div_ceil(CHUNK));

    let wrapped = borg_files::wrap_key(
        &mut rng,
        &key,
        &borg_files::UserKeys::from_seed(&[1; 64])
            .unwrap()
            .encryption_public(),
    )
    .unwrap();
    let manifest = Manifest::new(
        "big.bin",
        "application/octet-stream",
        0,
        salt,
        encrypted,
        wrapped,
    )
    .unwrap();
    let mut out = Vec::with_capacity(SIZE);
    let t = Instant::now();
    decrypt_to_writer(
        &manifest,
        &key,
        |i, _: &ShardRef| Ok(shards[i].clone()),
        &mut out,
    )
    .unwrap();
    let dec = t.elapsed().as_secs_f64();
    assert!(out == data);

    let cipher = Encryptor::new(&key, &salt);
    let n = shards.len();
    let t = Instant::now();
    for (i, c) in data.chunks(CHUNK).enumerate() {
        std::hint::black_box(cipher.encrypt_chunk(i as u64, i + 1 == n, c).unwrap());
    }
    let bare_enc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (i, s) in shards.iter().enumerate() {
        std::hint::black_box(cipher.decrypt_chunk(i as u64, i + 1 == n, s).unwrap());
    }
    let bare_dec = t.elapsed().as_secs_f64();

    println!(
        "files figures, 64 MiB, {n} shards: encrypt_reader {:.0} MB/s, decrypt_to_writer {:.0} MB/s, \
         bare ChaCha20-Poly1305 encrypt {:.0} MB/s / decrypt {:.0} MB/s, SHA-256 {:.0} MB/s",
        mbs(SIZE, enc),
        mbs(SIZE, dec),
        mbs(SIZE, bare_enc),
        mbs(SIZE, bare_dec),
        mbs(SIZE, sha)
    );
}
