//! Evidence for a gateway claim (issue 9 item 8). A LAN node whose beacon says it is the
//! LAN's gateway carries the `nat.reached` envelopes that outside observers sent it through
//! its mapping (the dial-back that made it a gateway). Another LAN node believes the claim
//! only when one of them names the claimant's key and external address, is recent, verifies,
//! and is signed by an observer that node reached itself: keys are free, so an envelope from
//! any other key proves nothing. A LAN device can still copy a real gateway's proof, but it
//! names the real gateway's key, and the TLS of every link is pinned to that key.

use std::net::SocketAddr;

use serde::Deserialize;

use super::msg::ReachMsg;
use crate::envelope::{self, MAX_CLOCK_SKEW_MS};
use crate::identity::PublicKey;

/// Why a proof does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("not an envelope")]
    Malformed,
    #[error("signed by a key this node has not reached as an observer")]
    UnknownObserver,
    #[error("signature: {0}")]
    Signature(String),
    #[error("not a nat.reached")]
    WrongKind,
    #[error("names another key than the claimant's")]
    OtherKey,
    #[error("names {0}, not the claimed external address")]
    OtherAddr(SocketAddr),
    #[error("{0} ms old")]
    Stale(u64),
    #[error("dated {0} ms ahead")]
    Future(u64),
}

/// The fields read before the signature check (untrusted until it passes).
#[derive(Deserialize)]
struct Peek {
    from: PublicKey,
    kind: String,
    ts: u64,
    body: serde_json::Value,
}

/// The observer whose proof shows that `claimant` is reached from outside at `external`, at
/// net time `now_ms`. Every cheap check (signer one of ours, kind, key, address, age) comes
/// before the signature check, so a copied or made-up proof costs a JSON parse only.
pub fn check(
    proof: &str,
    claimant: &PublicKey,
    external: SocketAddr,
    now_ms: u64,
    max_age_ms: u64,
    is_observer: impl Fn(&PublicKey) -> bool,
) -> Result<PublicKey, ProofError> {
    let peek: Peek = serde_json::from_str(proof).map_err(|_| ProofError::Malformed)?;
    if !is_observer(&peek.from) {
        return Err(ProofError::UnknownObserver);
    }
    if peek.ts > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(ProofError::Future(peek.ts - now_ms));
    }
    let age = now_ms.saturating_sub(peek.ts);
    if age > max_age_ms {
        return Err(ProofError::Stale(age));
    }
    match ReachMsg::from_kind_body(&peek.kind, &peek.body) {
        Ok(ReachMsg::Reached { to, .. }) if to != *claimant => return Err(ProofError::OtherKey),
        Ok(ReachMsg::Reached { addr, .. }) if addr != external => {
            return Err(ProofError::OtherAddr(addr))
        }
        Ok(ReachMsg::Reached { .. }) => {}
        _ => return Err(ProofError::WrongKind),
    }
    // What was read above is what the signature covers, or the check fails here.
    let env = envelope::verify_signature_only(proof.as_bytes())
        .map_err(|e| ProofError::Signature(e.to_string()))?
        .into_inner();
    if env.from != peek.from || env.ts != peek.ts || env.kind != peek.kind || env.body != peek.body
    {
        return Err(ProofError::Malformed);
    }
    Ok(env.from)
}

/// Seal a proof as an observer does after a dial-back (tests and tools).
pub fn seal(
    observer: &crate::identity::SecretKey,
    to: PublicKey,
    addr: SocketAddr,
    ts_ms: u64,
) -> String {
    let (kind, body) = ReachMsg::Reached {
        addr,
        token: "00".into(),
        to,
    }
    .to_kind_body();
    String::from_utf8_lossy(&envelope::seal(observer, &kind, None, ts_ms, body).to_bytes())
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    const NOW: u64 = 1_800_000_000_000;
    const TTL: u64 = 600_000;

    fn ext() -> SocketAddr {
        "11.0.0.2:13300".parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn a_proof_counts_only_from_our_observer_for_the_claimant_and_its_address() {
        let obs = SecretKey::generate();
        let gw = SecretKey::generate().public();
        let liar = SecretKey::generate().public();
        let ours = |k: &PublicKey| *k == obs.public();
        let p = seal(&obs, gw, ext(), NOW - 1000);
        assert_eq!(check(&p, &gw, ext(), NOW, TTL, ours), Ok(obs.public()));
        // Copied by another LAN device: it names the real gateway.
        assert_eq!(
            check(&p, &liar, ext(), NOW, TTL, ours),
            Err(ProofError::OtherKey)
        );
        let other: SocketAddr = "11.0.0.2:13301".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(
            check(&p, &gw, other, NOW, TTL, ours),
            Err(ProofError::OtherAddr(ext()))
        );
        // Signed by a fresh key: no signature check is spent on it.
        let fresh = seal(&SecretKey::generate(), liar, ext(), NOW);
        assert_eq!(
            check(&fresh, &liar, ext(), NOW, TTL, ours),
            Err(ProofError::UnknownObserver)
        );
        // Old, or dated ahead.
        let old = seal(&obs, gw, ext(), NOW - TTL - 1);
        assert_eq!(
            check(&old, &gw, ext(), NOW, TTL, ours),
            Err(ProofError::Stale(TTL + 1))
        );
        let ahead = seal(&obs, gw, ext(), NOW + MAX_CLOCK_SKEW_MS + 5);
        assert!(matches!(
            check(&ahead, &gw, ext(), NOW, TTL, ours),
            Err(ProofError::Future(_))
        ));
        // Tampered: the observer's key with another body.
        let tampered = p.replace("11.0.0.2:13300", "11.0.0.9:13300");
        assert!(matches!(
            check(
                &tampered,
                &gw,
                "11.0.0.9:13300".parse().unwrap_or_else(|_| unreachable!()),
                NOW,
                TTL,
                ours
            ),
            Err(ProofError::Signature(_))
        ));
        assert_eq!(
            check("not json", &gw, ext(), NOW, TTL, ours),
            Err(ProofError::Malformed)
        );
        // Another kind signed by the observer.
        let (kind, body) = ReachMsg::RelayRegister {}.to_kind_body();
        let wrong =
            String::from_utf8_lossy(&envelope::seal(&obs, &kind, None, NOW, body).to_bytes())
                .into_owned();
        assert_eq!(
            check(&wrong, &gw, ext(), NOW, TTL, ours),
            Err(ProofError::WrongKind)
        );
    }

    proptest::proptest! {
        #[test]
        fn checking_any_text_never_panics(text in ".{0,600}") {
            let k = SecretKey::generate().public();
            let _ = check(&text, &k, ext(), NOW, TTL, |_| true);
        }
    }
}
