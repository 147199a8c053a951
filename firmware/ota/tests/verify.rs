//! The verify report and the persisted state, end to end through the public API.
#![allow(clippy::unwrap_used)]

use borg_ota::release::ImageRef;
use borg_ota::verify::NodeView;
use borg_ota::{
    verify, Approval, ApprovalStatus, Board, FetchId, Manifest, OtaState, Refusal, Root, Sha256Hex,
    SignedRoot, TimeFloor, TrustedRoot, Version,
};
use borg_proto::identity::{PublicKey, SecretKey};
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000_000;
const DAY: u64 = 86_400_000;

fn key(i: u8) -> SecretKey {
    let mut scalar = [0u8; 32];
    scalar[0] = 0x17;
    scalar[31] = i + 1;
    SecretKey::from_scalar_bytes(&scalar).expect("small scalars are valid")
}

fn pubs(ids: &[u8]) -> Vec<PublicKey> {
    ids.iter().map(|&i| key(i).public()).collect()
}

/// n maintainers (keys 0..n), threshold k, self-signed by the first k.
fn root(n: u8, k: u32) -> TrustedRoot {
    let ids: Vec<u8> = (0..n).collect();
    let mut s = SignedRoot::unsigned(Root::new(1, pubs(&ids), k).unwrap());
    for i in 0..k as u8 {
        s.sign(&key(i));
    }
    TrustedRoot::anchor(&s).unwrap()
}

fn v(text: &str) -> Version {
    text.parse().unwrap()
}

fn rpi4() -> Board {
    Board::new("rpi4").unwrap()
}

fn manifest(version: &str) -> Manifest {
    let digest = Sha256Hex::of(version.as_bytes());
    Manifest {
        tag: Default::default(),
        version: v(version),
        boards: vec![rpi4()],
        image: ImageRef {
            sha256: digest,
            size: 1 << 20,
        },
        min_version: v("1.0.0"),
        expires_ms: NOW + 30 * DAY,
        notes: "test release".into(),
        fetch: FetchId::content(&digest),
    }
}

fn approvals(m: &Manifest, signers: &[u8]) -> Vec<Approval> {
    signers
        .iter()
        .map(|&i| Approval::sign(&key(i), m, m.expires_ms))
        .collect()
}

fn node(running: &str) -> NodeView {
    NodeView {
        now_ms: NOW,
        floor_ms: 0,
        running: Some(v(running)),
        board: Some(rpi4()),
        refused: Default::default(),
    }
}

fn codes(r: &borg_ota::Report) -> Vec<&'static str> {
    r.refusals.iter().map(Refusal::code).collect()
}

#[test]
fn k_minus_one_refused_k_accepted() {
    let root = root(5, 3);
    let m = manifest("1.1.0");
    let r = verify(&root, &m, &approvals(&m, &[0, 1]), &node("1.0.0"));
    assert!(!r.approved);
    assert_eq!(
        r.refusals,
        [Refusal::NotEnoughApprovals {
            counted: 2,
            threshold: 3
        }]
    );
    assert!(r.refusals[0].explain().contains("2 of 3"));
    let r = verify(&root, &m, &approvals(&m, &[0, 1, 4]), &node("1.0.0"));
    assert!(r.approved, "{r:?}");
    assert_eq!(r.verdict_code(), "approved");
    assert_eq!((r.counted, r.threshold), (3, 3));
}

#[test]
fn a_duplicate_key_counts_once_and_an_outsider_is_ignored() {
    let root = root(3, 2);
    let m = manifest("1.1.0");
    // Key 0 three times (identical and re-signed copies) and outsider 9.
    let mut list = approvals(&m, &[0, 0, 9]);
    list.push(Approval::sign(&key(0), &m, m.expires_ms - 1));
    let r = verify(&root, &m, &list, &node("1.0.0"));
    let statuses: Vec<_> = r.approvals.iter().map(|a| a.status.code()).collect();
    assert_eq!(
        statuses,
        ["counts", "duplicate_key", "unknown_key", "duplicate_key"]
    );
    assert_eq!(r.counted, 1);
    assert!(!r.approved);
    list.extend(approvals(&m, &[1]));
    assert!(verify(&root, &m, &list, &node("1.0.0")).approved);
}

#[test]
fn a_bad_signature_does_not_count_nor_block_the_key() {
    let root = root(3, 2);
    let m = manifest("1.1.0");
    let mut forged = Approval::sign(&key(0), &m, m.expires_ms);
    forged.sig = Approval::sign(&key(1), &m, m.expires_ms).sig;
    let mut list = vec![forged];
    list.extend(approvals(&m, &[0]));
    let r = verify(&root, &m, &list, &node("1.0.0"));
    assert_eq!(r.approvals[0].status, ApprovalStatus::BadSignature);
    assert_eq!(r.approvals[1].status, ApprovalStatus::Counts);
    assert_eq!(r.counted, 1);
}

#[test]
fn a_changed_manifest_loses_its_approvals() {
    let root = root(3, 2);
    let m = manifest("1.1.0");
    let list = approvals(&m, &[0, 1]);
    assert!(verify(&root, &m, &list, &node("1.0.0")).approved);
    let mut tampered = m.clone();
    tampered.version = v("9.0.0");
    let r = verify(&root, &tampered, &list, &node("1.0.0"));
    assert!(r
        .approvals
        .iter()
        .all(|a| a.status == ApprovalStatus::WrongManifest));
    assert_eq!(codes(&r), ["not_enough_approvals"]);
    // Rewriting the approvals' digest does not help: the signature covers it.
    let mut rewritten = list.clone();
    for a in &mut rewritten {
        a.manifest = tampered.digest();
    }
    let r = verify(&root, &tampered, &rewritten, &node("1.0.0"));
    assert!(r
        .approvals
        .iter()
        .all(|a| a.status == ApprovalStatus::BadSignature));
}

#[test]
fn expired_is_refused_even_with_the_clock_set_back_below_the_floor() {
    let root = root(3, 2);
    let m = manifest("1.1.0");
    let list = approvals(&m, &[0, 1]);
    let mut floor = TimeFloor::new(0);
    // The node saw network time after the expiry...
    floor.observe(m.expires_ms + 1);
    // ...then its clock was set back to a time where the release looks fresh.
    let mut view = node("1.0.0");
    view.now_ms = NOW;
    view.floor_ms = floor.get();
    assert_eq!(
        floor.observe(NOW),
        m.expires_ms + 1,
        "the floor never goes down"
    );
    let r = verify(&root, &m, &list, &view);
    assert!(!r.approved);
    assert!(codes(&r).contains(&"expired"), "{r:?}");
    assert!(r
        .approvals
        .iter()
        .all(|a| matches!(a.status, ApprovalStatus::Expired { .. })));
    // Without the floor the set-back clock would have accepted it: the floor is what refuses.
    view.floor_ms = 0;
    assert!(verify(&root, &m, &list, &view).approved);
    // Expiry is inclusive: valid at expires_ms, expired one ms later.
    view.now_ms = m.expires_ms;
    assert!(verify(&root, &m, &list, &view).approved);
}

#[test]
fn an_expired_approval_does_not_count_on_an_unexpired_release() {
    let root = root(3, 2);
    let m = manifest("1.1.0");
    let list = vec![
        Approval::sign(&key(0), &m, NOW - 1),
        Approval::sign(&key(1), &m, m.expires_ms),
    ];
    let r = verify(&root, &m, &list, &node("1.0.0"));
    assert_eq!(
        r.approvals[0].status,
        ApprovalStatus::Expired {
            expires_ms: NOW - 1
        }
    );
    assert_eq!(codes(&r), ["not_enough_approvals"]);
}

#[test]
fn downgrade_same_version_wrong_board_and_min_version_are_refused() {
    let root = root(3, 2);
    let m = manifest("1.1.0");
    let list = approvals(&m, &[0, 1]);
    for running in ["1.1.0", "1.2.0", "2.0.0"] {
        let r = verify(&root, &m, &list, &node(running));
        assert_eq!(codes(&r), ["downgrade"], "running {running}");
    }
    let mut view = node("1.0.0");
    view.board = Some(Board::new("rpi5").unwrap());
    assert_eq!(codes(&verify(&root, &m, &list, &view)), ["wrong_board"]);
    let mut old_min = m.clone();
    old_min.min_version = v("1.0.5");
    let list2 = approvals(&old_min, &[0, 1]);
    let r = verify(&root, &old_min, &list2, &node("1.0.0"));
    assert_eq!(codes(&r), ["bad_min_version"]);
    assert!(verify(&root, &old_min, &list2, &node("1.0.5")).approved);
    // A maintainer's view (no running version, no board) skips the node rules.
    let free = NodeView {
        now_ms: NOW,
        ..Default::default()
    };
    assert!(verify(&root, &m, &list, &free).approved);
}

#[test]
fn a_version_once_refused_is_refused_again() {
    let root = root(3, 2);
    let mut state = OtaState::new(&root, v("1.0.0"), NOW);
    let m = manifest("1.1.0");
    let list = approvals(&m, &[0, 1]);
    // Seen approved by k but already expired: refused for good.
    let late = m.expires_ms + 1;
    state.observe_time(late);
    let r = verify(&root, &m, &list, &state.node_view(late, Some(rpi4())));
    assert_eq!(codes(&r), ["expired", "not_enough_approvals"]);
    assert_eq!((r.counted, r.signed), (0, 2));
    state.note_report(&r, late);
    assert!(state.is_refused(&v("1.1.0")));
    // A fresh manifest with the same version and a later expiry is still refused.
    let mut again = manifest("1.1.0");
    again.expires_ms = late + 30 * DAY;
    let list = approvals(&again, &[0, 1, 2]);
    let r = verify(&root, &again, &list, &state.node_view(late, Some(rpi4())));
    assert_eq!(codes(&r), ["refused_before"]);
    // Surviving a restart: encode, decode, same answer.
    let reloaded = OtaState::decode(&state.encode()).unwrap();
    assert_eq!(reloaded, state);
    let r = verify(
        &root,
        &again,
        &list,
        &reloaded.node_view(late, Some(rpi4())),
    );
    assert_eq!(codes(&r), ["refused_before"]);
    // A higher version is fine.
    let next = manifest("1.2.0");
    let mut next = next;
    next.expires_ms = late + DAY;
    let l = approvals(&next, &[0, 1]);
    assert!(verify(&root, &next, &l, &state.node_view(late, Some(rpi4()))).approved);
}

#[test]
fn an_unapproved_expired_manifest_cannot_block_a_version() {
    let root = root(3, 2);
    let mut state = OtaState::new(&root, v("1.0.0"), m_expired_floor());
    let mut m = manifest("5.0.0");
    m.expires_ms = NOW - 1;
    // An attacker without k keys sends an expired 5.0.0 with one approval (their own key).
    let list = approvals(&m, &[9, 0]);
    let r = verify(&root, &m, &list, &state.node_view(NOW, Some(rpi4())));
    assert!(!r.signed_by_threshold());
    assert_eq!(r.signed, 1);
    state.note_report(&r, NOW);
    assert!(!state.is_refused(&v("5.0.0")));
    assert_eq!(state.audit.len(), 1, "but it is in the audit log");
}

fn m_expired_floor() -> u64 {
    NOW - DAY
}

#[test]
fn state_bounds_audit_ring_and_refused_set() {
    let root = root(3, 2);
    let mut state = OtaState::new(&root, v("1.0.0"), 0);
    for i in 0..(borg_ota::MAX_AUDIT as u64 + 50) {
        state.refuse(Version::new(2, i, 0), "trial_failed", i);
    }
    assert_eq!(state.audit.len(), borg_ota::MAX_AUDIT);
    assert_eq!(state.refused.len(), borg_ota::MAX_REFUSED);
    // The lowest versions went first; the newest refusal is kept.
    let newest = Version::new(2, borg_ota::MAX_AUDIT as u64 + 49, 0);
    assert!(state.is_refused(&newest));
    assert!(!state.is_refused(&Version::new(2, 0, 0)));
    let bytes = state.encode();
    assert_eq!(OtaState::decode(&bytes).unwrap(), state);
    // A state file over the bounds is refused.
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let one = value["refused"][0].clone();
    value["refused"] = serde_json::Value::Array(
        (0..=borg_ota::MAX_REFUSED as u64)
            .map(|i| {
                let mut e = one.clone();
                e["version"] = format!("3.{i}.0").into();
                e
            })
            .collect(),
    );
    let err = OtaState::decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert_eq!(err.code(), "over_bound");
    // Unsorted or repeated refused versions would break the binary search: refused.
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let list = value["refused"].as_array_mut().unwrap();
    list.swap(0, 1);
    let err = OtaState::decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert!(err.to_string().contains("strictly increasing"), "{err}");
    let list = value["refused"].as_array_mut().unwrap();
    list[0] = list[1].clone();
    assert!(OtaState::decode(&serde_json::to_vec(&value).unwrap()).is_err());
}

#[test]
fn state_keeps_the_root_chain_head() {
    let v1 = root(3, 2);
    let mut state = OtaState::new(&v1, v("1.0.0"), NOW);
    let mut r2 = SignedRoot::unsigned(Root::new(2, pubs(&[1, 2, 3]), 2).unwrap());
    // Only the new threshold: refused and audited.
    r2.sign(&key(3));
    r2.sign(&key(2));
    let err = state
        .advance_root(&v1, std::slice::from_ref(&r2), NOW)
        .unwrap_err();
    assert_eq!(err.code(), "root_threshold");
    assert_eq!(state.root.signed.version, 1);
    r2.sign(&key(1));
    let head = state.advance_root(&v1, &[r2], NOW).unwrap();
    assert_eq!(head.version(), 2);
    let reloaded = OtaState::decode(&state.encode()).unwrap();
    assert_eq!(reloaded.trusted_root(&v1).unwrap(), head);
    let events: Vec<String> = reloaded
        .audit
        .iter()
        .map(|e| serde_json::to_value(&e.event).unwrap()["event"].to_string())
        .collect();
    assert_eq!(events, ["\"root_refused\"", "\"root_trusted\""]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any mix of signers (maintainers, repeats, outsiders, any order): the count is the
    /// number of distinct maintainers among them, and the release is approved iff that
    /// reaches k.
    #[test]
    fn prop_count_is_distinct_maintainers(
        n in 1u8..6,
        k_seed in any::<u32>(),
        signers in prop::collection::vec(0u8..9, 0..12),
    ) {
        let k = k_seed % u32::from(n) + 1;
        let root = root(n, k);
        let m = manifest("1.1.0");
        let r = verify(&root, &m, &approvals(&m, &signers), &node("1.0.0"));
        let distinct: std::collections::BTreeSet<u8> =
            signers.iter().copied().filter(|&i| i < n).collect();
        prop_assert_eq!(r.counted, distinct.len());
        prop_assert_eq!(r.approved, distinct.len() >= k as usize);
        let counts = r.approvals.iter().filter(|a| a.status == ApprovalStatus::Counts).count();
        prop_assert_eq!(counts, distinct.len());
    }

    /// The floor never goes down, and the effective time is never below any time observed.
    #[test]
    fn prop_floor_is_monotonic(times in prop::collection::vec(any::<u64>(), 1..50)) {
        let mut floor = TimeFloor::new(0);
        let mut max = 0;
        for t in times {
            let before = floor.get();
            let eff = floor.observe(t);
            max = max.max(t);
            prop_assert!(floor.get() >= before);
            prop_assert_eq!(eff, max);
            prop_assert_eq!(floor.effective(0), max);
        }
    }
}
