//! The on-disk progress record of one get, so that an interrupted get resumes where it stopped,
//! also after the client restarts.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! 0..4          magic "BSPR"
//! 4             version 1
//! 5..37         file id [32]   (the manifest address the plan was derived from)
//! 37..41        total u32      (shards in the plan, at most MAX_PROGRESS_SHARDS)
//! 41..41+B      bitmap, B = ceil(total / 8); bit i (byte i/8, mask 1 << (i%8)) = shard i is
//!               on disk; bits past `total` must be zero
//! 41+B..57+B    check: the first 16 bytes of SHA-256 over everything before it
//! ```
//!
//! A record that is torn, has a wrong check, another version, a bitmap of the wrong length or
//! stray bits is an error, and the caller starts the get over: a progress record is never
//! trusted in part. A record for another file (or another shard count) is refused by
//! `Receiver::new`.
//!
//! ## How the IO layer writes it (crash safety)
//!
//! A bit may be set only for a shard whose bytes are durably in the data file. So, after every
//! N shards confirmed by `Receiver::handle_written` (N = 64 or 16 MiB, whichever first, and at
//! the end):
//!
//! 1. `fsync` the data file (the shards the record is about to claim are on disk);
//! 2. write the encoded record to `<name>.progress.tmp`, `fsync` it;
//! 3. `rename` it over `<name>.progress`, then `fsync` the directory.
//!
//! A crash at any point leaves either the old record (claims less than is on disk: those
//! shards are fetched again) or the new one (everything it claims was fsynced in step 1). The
//! data file is pre-allocated to the plan's total size at the start, so writes at offsets
//! never extend it. When the get is complete and verified, the record is deleted.

use sha2::{Digest, Sha256};

/// Magic bytes at the start of a progress record.
pub const PROGRESS_MAGIC: [u8; 4] = *b"BSPR";
/// The record version this module reads and writes.
pub const PROGRESS_VERSION: u8 = 1;
/// The largest plan a record (and a `Receiver`) accepts: 2^22 shards, i.e. up to 1 TiB of
/// 256 KiB shards, a 512 KiB bitmap.
pub const MAX_PROGRESS_SHARDS: usize = 1 << 22;
const CHECK_LEN: usize = 16;
const FIXED_LEN: usize = 4 + 1 + 32 + 4;

/// Errors decoding a progress record. Every one means "start over".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    #[error("progress record of {len} bytes is too short")]
    TooShort { len: usize },
    #[error("not a progress record (bad magic)")]
    BadMagic,
    #[error("unsupported progress record version {0}")]
    BadVersion(u8),
    #[error("progress record for {total} shards, more than {MAX_PROGRESS_SHARDS}")]
    TooManyShards { total: usize },
    #[error("progress record is {actual} bytes, {expected} expected for its shard count")]
    BadLength { expected: usize, actual: usize },
    #[error("progress record has bits set past its shard count")]
    StrayBits,
    #[error("progress record check does not match (torn or damaged)")]
    BadCheck,
}

impl ProgressError {
    pub fn code(&self) -> &'static str {
        "bad_progress"
    }
}

/// Which shards of one planned file are durably written.
#[derive(Clone, PartialEq, Eq)]
pub struct Progress {
    file_id: [u8; 32],
    total: usize,
    bits: Vec<u8>,
    done: usize,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Progress({}: {}/{})",
            super::frame::hex8(&self.file_id),
            self.done,
            self.total
        )
    }
}

impl Progress {
    /// Nothing done yet. `total` above [`MAX_PROGRESS_SHARDS`] is refused.
    pub fn new(file_id: [u8; 32], total: usize) -> Result<Self, ProgressError> {
        if total > MAX_PROGRESS_SHARDS {
            return Err(ProgressError::TooManyShards { total });
        }
        Ok(Self {
            file_id,
            total,
            bits: vec![0; total.div_ceil(8)],
            done: 0,
        })
    }

    pub fn file_id(&self) -> &[u8; 32] {
        &self.file_id
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// How many shards are marked done.
    pub fn done_count(&self) -> usize {
        self.done
    }

    pub fn is_done(&self, index: usize) -> bool {
        index < self.total && self.bits[index / 8] & (1 << (index % 8)) != 0
    }

    /// Mark shard `index` done (out-of-range indexes are ignored).
    pub fn set_done(&mut self, index: usize) {
        if index < self.total && !self.is_done(index) {
            self.bits[index / 8] |= 1 << (index % 8);
            self.done += 1;
        }
    }

    pub fn encoded_len(&self) -> usize {
        FIXED_LEN + self.bits.len() + CHECK_LEN
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&PROGRESS_MAGIC);
        out.push(PROGRESS_VERSION);
        out.extend_from_slice(&self.file_id);
        // total <= MAX_PROGRESS_SHARDS (checked in `new` and `decode`), so it fits a u32.
        out.extend_from_slice(&(self.total as u32).to_be_bytes());
        out.extend_from_slice(&self.bits);
        let check = Sha256::digest(&out);
        out.extend_from_slice(&check[..CHECK_LEN]);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProgressError> {
        if bytes.len() < FIXED_LEN + CHECK_LEN {
            return Err(ProgressError::TooShort { len: bytes.len() });
        }
        if bytes[..4] != PROGRESS_MAGIC {
            return Err(ProgressError::BadMagic);
        }
        if bytes[4] != PROGRESS_VERSION {
            return Err(ProgressError::BadVersion(bytes[4]));
        }
        let mut file_id = [0u8; 32];
        file_id.copy_from_slice(&bytes[5..37]);
        let total = u32::from_be_bytes([bytes[37], bytes[38], bytes[39], bytes[40]]) as usize;
        if total > MAX_PROGRESS_SHARDS {
            return Err(ProgressError::TooManyShards { total });
        }
        let expected = FIXED_LEN + total.div_ceil(8) + CHECK_LEN;
        if bytes.len() != expected {
            return Err(ProgressError::BadLength {
                expected,
                actual: bytes.len(),
            });
        }
        let (body, check) = bytes.split_at(expected - CHECK_LEN);
        if Sha256::digest(body)[..CHECK_LEN] != *check {
            return Err(ProgressError::BadCheck);
        }
        let bits = body[FIXED_LEN..].to_vec();
        if !total.is_multiple_of(8) {
            if let Some(last) = bits.last() {
                if last >> (total % 8) != 0 {
                    return Err(ProgressError::StrayBits);
                }
            }
        }
        let done = bits.iter().map(|b| b.count_ones() as usize).sum();
        Ok(Self {
            file_id,
            total,
            bits,
            done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_layout() {
        let mut p = Progress::new([7; 32], 13).unwrap();
        p.set_done(0);
        p.set_done(12);
        p.set_done(12);
        p.set_done(99);
        assert_eq!(p.done_count(), 2);
        let enc = p.encode();
        assert_eq!(enc.len(), 41 + 2 + 16);
        assert_eq!(&enc[..5], b"BSPR\x01");
        assert_eq!(&enc[37..41], &[0, 0, 0, 13]);
        assert_eq!(&enc[41..43], &[0b0000_0001, 0b0001_0000]);
        let back = Progress::decode(&enc).unwrap();
        assert_eq!(back, p);
        assert!(back.is_done(0) && back.is_done(12) && !back.is_done(1));
    }

    #[test]
    fn torn_or_damaged_records_are_refused() {
        let mut p = Progress::new([1; 32], 20).unwrap();
        for i in (0..20).step_by(3) {
            p.set_done(i);
        }
        let enc = p.encode();
        for cut in 0..enc.len() {
            assert!(Progress::decode(&enc[..cut]).is_err(), "torn at {cut}");
        }
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            assert!(Progress::decode(&bad).is_err(), "flip at {i}");
        }
        let mut long = enc.clone();
        long.push(0);
        assert!(matches!(
            Progress::decode(&long),
            Err(ProgressError::BadLength { .. })
        ));
    }

    #[test]
    fn bounds_are_refused() {
        assert_eq!(
            Progress::new([0; 32], MAX_PROGRESS_SHARDS + 1),
            Err(ProgressError::TooManyShards {
                total: MAX_PROGRESS_SHARDS + 1
            })
        );
        // A record claiming too many shards is refused before its length is even looked at.
        let mut enc = Progress::new([0; 32], 8).unwrap().encode();
        enc[37..41].copy_from_slice(&((MAX_PROGRESS_SHARDS as u32) + 1).to_be_bytes());
        assert!(matches!(
            Progress::decode(&enc),
            Err(ProgressError::TooManyShards { .. })
        ));
        // A stray bit past `total`, with a correct check, is refused.
        let p = Progress::new([0; 32], 3).unwrap();
        let mut enc = p.encode();
        enc[41] = 0b1000_0000;
        let n = enc.len() - 16;
        let check = Sha256::digest(&enc[..n]);
        enc[n..].copy_from_slice(&check[..16]);
        assert_eq!(Progress::decode(&enc), Err(ProgressError::StrayBits));
        let mut bad = p.encode();
        bad[4] = 2;
        assert_eq!(Progress::decode(&bad), Err(ProgressError::BadVersion(2)));
        bad[0] = b'X';
        assert_eq!(Progress::decode(&bad), Err(ProgressError::BadMagic));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(id in proptest::array::uniform32(any::<u8>()),
                                    done in proptest::collection::vec(any::<bool>(), 0..300)) {
            let mut p = Progress::new(id, done.len()).unwrap();
            for (i, d) in done.iter().enumerate() {
                if *d { p.set_done(i); }
            }
            let back = Progress::decode(&p.encode()).unwrap();
            prop_assert_eq!(back.done_count(), done.iter().filter(|d| **d).count());
            prop_assert_eq!(back, p);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(p) = Progress::decode(&bytes) {
                prop_assert_eq!(p.encode(), bytes);
            }
        }
    }
}
