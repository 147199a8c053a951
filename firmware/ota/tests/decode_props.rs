//! Decoders of untrusted input (root files, release files, the state file) never panic,
//! and what they accept re-encodes to something that decodes to the same value.
#![allow(clippy::unwrap_used)]

use borg_ota::release::ImageRef;
use borg_ota::{
    Approval, Board, FetchId, Manifest, OtaState, ReleaseFile, Root, Sha256Hex, SignedRoot,
    TrustedRoot, Version,
};
use borg_proto::identity::SecretKey;
use proptest::prelude::*;

fn key(i: u8) -> SecretKey {
    let mut scalar = [0u8; 32];
    scalar[0] = 0x23;
    scalar[31] = i + 1;
    SecretKey::from_scalar_bytes(&scalar).expect("small scalars are valid")
}

fn sample_root() -> SignedRoot {
    let keys = (0..3).map(|i| key(i).public()).collect();
    let mut s = SignedRoot::unsigned(Root::new(1, keys, 2).unwrap());
    s.sign(&key(0));
    s.sign(&key(1));
    s
}

fn sample_release() -> ReleaseFile {
    let digest = Sha256Hex::of(b"img");
    let manifest = Manifest {
        tag: Default::default(),
        version: Version::new(1, 2, 3),
        boards: vec![Board::new("rpi4").unwrap()],
        image: ImageRef {
            sha256: digest,
            size: 3,
        },
        min_version: Version::new(1, 0, 0),
        expires_ms: 1_900_000_000_000,
        notes: "notes \u{e9}\u{1}\"".into(),
        fetch: FetchId::content(&digest),
    };
    let approvals = vec![
        Approval::sign(&key(0), &manifest, manifest.expires_ms),
        Approval::sign(&key(1), &manifest, manifest.expires_ms),
    ];
    ReleaseFile {
        manifest,
        approvals,
    }
}

fn sample_state() -> OtaState {
    let root = TrustedRoot::anchor(&sample_root()).unwrap();
    let mut s = OtaState::new(&root, Version::new(1, 0, 0), 1_800_000_000_000);
    s.refuse(Version::new(1, 1, 0), "trial_failed", 1_800_000_000_001);
    s
}

/// Decode all three ways; whatever decodes must survive encode/decode unchanged.
fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(r) = SignedRoot::decode(bytes) {
        prop_assert_eq!(SignedRoot::decode(&r.encode()).unwrap(), r);
    }
    if let Ok(f) = ReleaseFile::decode(bytes) {
        prop_assert_eq!(ReleaseFile::decode(&f.encode()).unwrap(), f);
    }
    if let Ok(s) = OtaState::decode(bytes) {
        prop_assert_eq!(OtaState::decode(&s.encode()).unwrap(), s);
    }
    Ok(())
}

#[test]
fn samples_round_trip() {
    let r = sample_root();
    assert_eq!(SignedRoot::decode(&r.encode()).unwrap(), r);
    let f = sample_release();
    assert_eq!(ReleaseFile::decode(&f.encode()).unwrap(), f);
    let s = sample_state();
    assert_eq!(OtaState::decode(&s.encode()).unwrap(), s);
    // Pretty-printed (whitespace, other key order) decodes to the same value.
    let pretty = serde_json::to_vec_pretty(&f).unwrap();
    assert_eq!(ReleaseFile::decode(&pretty).unwrap(), f);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        decode_all(&bytes)?;
    }

    /// Cut, splice and insert inside real documents: deeper into the decoders than noise.
    #[test]
    fn prop_mutated_documents_never_panic(
        which in 0usize..3,
        cut in any::<prop::sample::Index>(),
        len in 0usize..24,
        insert in prop::collection::vec(any::<u8>(), 0..12),
    ) {
        let mut bytes = match which {
            0 => sample_root().encode(),
            1 => sample_release().encode(),
            _ => sample_state().encode(),
        };
        let at = cut.index(bytes.len());
        let end = (at + len).min(bytes.len());
        bytes.splice(at..end, insert);
        decode_all(&bytes)?;
    }

    /// Versions: text round trip, and the order is the numeric order of the triple.
    #[test]
    fn prop_version_text_round_trip(a in any::<u64>(), b in any::<u64>(), c in any::<u64>(),
                                    d in any::<u64>()) {
        let x = Version::new(a, b, c);
        prop_assert_eq!(x.to_string().parse::<Version>().unwrap(), x);
        let y = Version::new(a, b, d);
        prop_assert_eq!(x.cmp(&y), c.cmp(&d));
    }

}

proptest! {
    // Bounds: each case encodes and decodes a whole document; 64 cases cover the ranges.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Notes of any length: accepted up to the bound, refused above it.
    #[test]
    fn prop_notes_bound(len in 0usize..(2 * borg_ota::MAX_NOTES_BYTES)) {
        let mut f = sample_release();
        f.manifest.notes = "x".repeat(len);
        let decoded = ReleaseFile::decode(&f.encode());
        prop_assert_eq!(decoded.is_ok(), len <= borg_ota::MAX_NOTES_BYTES);
    }

    /// Boards: 1 to MAX_BOARDS accepted, none or more refused.
    #[test]
    fn prop_boards_bound(n in 0usize..(2 * borg_ota::MAX_BOARDS)) {
        let mut f = sample_release();
        f.manifest.boards = (0..n).map(|i| Board::new(&format!("b{i}")).unwrap()).collect();
        let ok = ReleaseFile::decode(&f.encode()).is_ok();
        prop_assert_eq!(ok, (1..=borg_ota::MAX_BOARDS).contains(&n));
    }

    /// Approvals on a release and signatures on a root: up to MAX_SIGNATURES.
    #[test]
    fn prop_signature_count_bounds(n in 0usize..(2 * borg_ota::MAX_SIGNATURES)) {
        let mut f = sample_release();
        f.approvals = vec![f.approvals[0].clone(); n];
        prop_assert_eq!(ReleaseFile::decode(&f.encode()).is_ok(), n <= borg_ota::MAX_SIGNATURES);
        let mut r = sample_root();
        r.signatures = vec![r.signatures[0].clone(); n];
        prop_assert_eq!(SignedRoot::decode(&r.encode()).is_ok(), n <= borg_ota::MAX_SIGNATURES);
    }
}

/// Root keys: up to MAX_ROOT_KEYS distinct keys (every count, not sampled: keys are slow).
#[test]
fn root_key_count_bound() {
    let keys: Vec<_> = (0..=borg_ota::MAX_ROOT_KEYS as u8)
        .map(|i| key(i).public())
        .collect();
    for n in 1..=keys.len() {
        let mut r = sample_root();
        r.signed.keys = keys[..n].to_vec();
        r.signed.threshold = 1;
        let decoded = SignedRoot::decode(&r.encode());
        assert_eq!(decoded.is_ok(), n <= borg_ota::MAX_ROOT_KEYS, "{n} keys");
    }
}
