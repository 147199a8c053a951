//! Power loss, simulated below redb: a disk that keeps what was fsynced, and at the cut
//! keeps a random part of what was written since (each 512-byte sector of each write
//! independently, in any order), as a real disk with a write cache may.
#![allow(clippy::unwrap_used)]
use super::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

const SECTOR: usize = 512;

#[derive(Debug, Default)]
struct Disk {
    /// What the running process sees.
    current: Vec<u8>,
    /// What survives a power cut for sure: the image at the last fsync.
    durable: Vec<u8>,
    /// Writes since the last fsync.
    pending: Vec<(usize, Vec<u8>)>,
    ops: u64,
    cut_at: u64,
}

#[derive(Debug, Clone)]
struct FlakyDisk(Arc<Mutex<Disk>>);

impl FlakyDisk {
    fn new(image: Vec<u8>) -> FlakyDisk {
        FlakyDisk(Arc::new(Mutex::new(Disk {
            current: image.clone(),
            durable: image,
            cut_at: u64::MAX,
            ..Disk::default()
        })))
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.0.lock().unwrap()
    }

    /// Cut the power after `n` more writes or syncs.
    fn cut_after(&self, n: u64) {
        let mut d = self.disk();
        d.cut_at = d.ops + n;
    }

    fn is_cut(&self) -> bool {
        let d = self.disk();
        d.ops >= d.cut_at
    }

    /// The image a restart finds: the durable one plus a random part of the rest.
    fn after_cut(&self, rng: &mut StdRng) -> Vec<u8> {
        let d = self.disk();
        let mut image = d.durable.clone();
        let mut pending: Vec<&(usize, Vec<u8>)> = d.pending.iter().collect();
        pending.shuffle(rng);
        for (offset, data) in pending {
            for (i, sector) in data.chunks(SECTOR).enumerate() {
                if rng.gen_bool(0.5) {
                    let at = offset + i * SECTOR;
                    if image.len() < at + sector.len() {
                        image.resize(at + sector.len(), 0);
                    }
                    image[at..at + sector.len()].copy_from_slice(sector);
                }
            }
        }
        image
    }
}

fn cut() -> io::Error {
    io::Error::other("power cut")
}

impl Disk {
    fn tick(&mut self) -> io::Result<()> {
        if self.ops >= self.cut_at {
            return Err(cut());
        }
        self.ops += 1;
        Ok(())
    }
}

impl redb::StorageBackend for FlakyDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.disk().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let d = self.disk();
        let at = offset as usize;
        let src = d
            .current
            .get(at..at + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut d = self.disk();
        d.tick()?;
        // File length changes are taken as durable at once (the file system journals them).
        d.current.resize(len as usize, 0);
        d.durable.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut d = self.disk();
        d.tick()?;
        d.durable = d.current.clone();
        d.pending.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.disk();
        d.tick()?;
        let at = offset as usize;
        if d.current.len() < at + data.len() {
            d.current.resize(at + data.len(), 0);
        }
        d.current[at..at + data.len()].copy_from_slice(data);
        d.pending.push((at, data.to_vec()));
        Ok(())
    }
}

fn open(disk: &FlakyDisk) -> Result<RedbStore, StoreError> {
    let db = Database::builder().create_with_backend(disk.clone())?;
    RedbStore::from_db(db, PathBuf::from("flaky"), u64::MAX)
}

fn random_shard(rng: &mut StdRng) -> Vec<u8> {
    let len = if rng.gen_bool(0.3) {
        rng.gen_range(0..100)
    } else {
        rng.gen_range(0..=crate::MAX_SHARD_BYTES / 2)
    };
    let mut s = vec![0u8; len];
    rng.fill_bytes(&mut s);
    s
}

/// Cut the power at a random write or fsync during puts and deletes, many times: after
/// the restart every put and delete that returned is there, the one in flight is wholly
/// there or not at all, no shard reads back wrong, the counter matches, scrub is clean.
#[test]
fn power_cut_at_any_write_loses_nothing_acknowledged() {
    let seed: u64 = rand::random();
    eprintln!("power cut test seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cut_during_op = 0;
    for trial in 0..60 {
        let disk = FlakyDisk::new(Vec::new());
        let store = open(&disk).unwrap();
        let mut present: BTreeMap<Address, usize> = BTreeMap::new();
        for _ in 0..3 {
            let s = random_shard(&mut rng);
            present.insert(store.put(&s).unwrap(), s.len());
        }
        let mut gone = BTreeSet::new();
        disk.cut_after(rng.gen_range(1..120));
        for _ in 0..10 {
            if !present.is_empty() && rng.gen_bool(0.3) {
                let keys: Vec<Address> = present.keys().copied().collect();
                let addr = keys[rng.gen_range(0..keys.len())];
                // Cut during the delete: it may or may not have happened.
                present.remove(&addr);
                if store.delete(&addr).is_err() {
                    break;
                }
                gone.insert(addr);
            } else {
                let s = random_shard(&mut rng);
                match store.put(&s) {
                    Ok(a) => {
                        present.insert(a, s.len());
                        gone.remove(&a);
                    }
                    Err(_) => break,
                }
            }
        }
        if disk.is_cut() {
            cut_during_op += 1;
        }
        drop(store);
        let image = disk.after_cut(&mut rng);

        let store = open(&FlakyDisk::new(image))
            .unwrap_or_else(|e| panic!("trial {trial}: restart after power cut: {e}"));
        let addrs = store.addresses().unwrap();
        let mut bytes = 0u64;
        for addr in &addrs {
            match store.get(addr) {
                Ok(Some(b)) => bytes += b.len() as u64,
                other => panic!("trial {trial}: shard {addr} after power cut: {other:?}"),
            }
        }
        assert_eq!(
            store.usage().unwrap().bytes,
            bytes,
            "trial {trial}: counter"
        );
        for (addr, len) in &present {
            assert_eq!(
                store.get(addr).unwrap().map(|b| b.len()),
                Some(*len),
                "trial {trial}: acknowledged put lost"
            );
        }
        for addr in &gone {
            assert!(
                !store.has(addr).unwrap(),
                "trial {trial}: deleted shard is back"
            );
        }
        let extra = addrs.iter().filter(|a| !present.contains_key(a)).count();
        assert!(extra <= 1, "trial {trial}: {extra} unknown shards");
        assert!(store.scrub().unwrap().corrupt.is_empty(), "trial {trial}");
    }
    eprintln!("{cut_during_op} of 60 power cuts hit an operation");
    assert!(
        cut_during_op >= 30,
        "only {cut_during_op} of 60 cuts hit an operation"
    );
}
