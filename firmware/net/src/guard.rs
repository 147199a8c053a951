//! Resource guards shared by the node's doors: connection slots per source IP and in total,
//! token buckets per source, and the counters the monitor shows for what they refused.
//!
//! Everything here is cheap and runs before any expensive work (TLS, signature checks), so a
//! flood costs the flooder more than the node. All bounds are named constants in the modules
//! that use them; this module only provides the mechanisms.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use borg_proto::identity::PublicKey;

/// Source addresses a [`RateLimiter`] remembers at most; when full, the entry idle longest
/// is forgotten (it is then treated as a fresh source, which costs at most one burst).
pub const MAX_TRACKED_SOURCES: usize = 4096;

/// Which door a connection or request came through (a label on the counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Door {
    Tree,
    Receptor,
    Monitor,
}

impl Door {
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Tree => "tree",
            Door::Receptor => "receptor",
            Door::Monitor => "monitor",
        }
    }

    pub const ALL: [Door; 3] = [Door::Tree, Door::Receptor, Door::Monitor];
}

/// Counters kept outside the actor (by the listeners, link tasks and the receptor), so that
/// refusals made before anything reaches the actor still show on `/metrics`.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Connections dropped at accept because their source IP held too many.
    pub refused_per_ip: [AtomicU64; 3],
    /// Connections dropped at accept because the door held too many in total.
    pub refused_total: [AtomicU64; 3],
    /// Failed TLS handshakes (including timeouts), per door.
    pub tls_failures: [AtomicU64; 3],
    /// Times a source was slowed down or refused by a rate limit, per door.
    pub rate_limited: [AtomicU64; 3],
    /// Failed TCP `accept` calls (e.g. out of file descriptors), each followed by a back-off.
    pub accept_errors: [AtomicU64; 3],
    /// Outgoing frames dropped because they were over the frame limit (the link stays up).
    pub oversize_outbound: AtomicU64,
    /// Log lines dropped instead of blocking (for the logging layer to bump).
    pub log_lines_dropped: AtomicU64,
    /// Receptor refusals by error code.
    receptor_rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl NetCounters {
    fn idx(door: Door) -> usize {
        match door {
            Door::Tree => 0,
            Door::Receptor => 1,
            Door::Monitor => 2,
        }
    }

    pub fn bump(counter: &[AtomicU64; 3], door: Door) {
        counter[Self::idx(door)].fetch_add(1, Relaxed);
    }

    pub fn get(counter: &[AtomicU64; 3], door: Door) -> u64 {
        counter[Self::idx(door)].load(Relaxed)
    }

    pub fn receptor_reject(&self, code: &'static str) {
        if let Ok(mut map) = self.receptor_rejected.lock() {
            *map.entry(code).or_insert(0) += 1;
        }
    }

    pub fn receptor_rejected(&self) -> BTreeMap<&'static str, u64> {
        self.receptor_rejected
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Prometheus text for these counters.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP borg_receptor_rejected_total Receptor requests refused, by reason.\n# TYPE borg_receptor_rejected_total counter\n");
        let map = self.receptor_rejected();
        for code in RECEPTOR_CODES {
            let v = map.get(code).copied().unwrap_or(0);
            out.push_str(&format!(
                "borg_receptor_rejected_total{{reason=\"{code}\"}} {v}\n"
            ));
        }
        let families: [(&str, &str, &[AtomicU64; 3]); 5] = [
            (
                "borg_connections_refused_per_ip_total",
                "Connections refused: their source IP held too many.",
                &self.refused_per_ip,
            ),
            (
                "borg_connections_refused_total",
                "Connections refused: the door held too many in total.",
                &self.refused_total,
            ),
            (
                "borg_tls_failures_total",
                "Failed or timed-out TLS handshakes.",
                &self.tls_failures,
            ),
            (
                "borg_rate_limited_total",
                "Times a source was slowed down or refused by a rate limit.",
                &self.rate_limited,
            ),
            (
                "borg_accept_errors_total",
                "Failed TCP accepts (each followed by a back-off).",
                &self.accept_errors,
            ),
        ];
        for (name, help, counter) in families {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for door in Door::ALL {
                out.push_str(&format!(
                    "{name}{{door=\"{}\"}} {}\n",
                    door.as_str(),
                    Self::get(counter, door)
                ));
            }
        }
        for (name, help, v) in [
            (
                "borg_outbound_oversize_dropped_total",
                "Outgoing messages dropped for being over the frame limit (links stay up).",
                self.oversize_outbound.load(Relaxed),
            ),
            (
                "borg_log_lines_dropped_total",
                "Log lines dropped instead of blocking the node.",
                self.log_lines_dropped.load(Relaxed),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        }
        out
    }
}

/// Every code the receptor can refuse with (rendered even when zero).
pub const RECEPTOR_CODES: [&str; 10] = [
    "malformed",
    "bad_signature",
    "stale",
    "replay",
    "too_large",
    "unknown_kind",
    "rate_limited",
    "unavailable",
    "timeout",
    "handshake",
];

/// Connection slots, at most `per_ip` per source address and `total` in all; `reserved`
/// more slots are kept for sources the owner trusts (see [`ConnLimiter::try_acquire`]).
///
/// When all `total` slots are taken, a newcomer from an address that holds fewer than the
/// heaviest address takes that address's oldest slot ([`ConnSlot::evicted`] fires for it),
/// so a flood from a few addresses cannot keep out one from another address.
#[derive(Debug)]
pub struct ConnLimiter {
    per_ip: usize,
    total: usize,
    reserved: usize,
    state: Mutex<LimiterState>,
}

#[derive(Debug, Default)]
struct LimiterState {
    /// Slots per address, oldest first: id and the eviction signal.
    by_ip: HashMap<IpAddr, std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>>,
    total: usize,
    next_id: u64,
}

impl LimiterState {
    fn remove(&mut self, ip: &IpAddr, id: u64) -> bool {
        let Some(q) = self.by_ip.get_mut(ip) else {
            return false;
        };
        let Some(at) = q.iter().position(|(i, _)| *i == id) else {
            return false;
        };
        q.remove(at);
        if q.is_empty() {
            self.by_ip.remove(ip);
        }
        self.total = self.total.saturating_sub(1);
        true
    }
}

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerIp,
    Total,
}

/// One held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
    id: u64,
    evict: Arc<tokio::sync::Notify>,
}

impl ConnSlot {
    /// Completes when a newcomer from a lighter address took this slot over: the holder
    /// must close its connection.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl ConnLimiter {
    pub fn new(per_ip: usize, total: usize, reserved: usize) -> Arc<Self> {
        Arc::new(Self {
            per_ip,
            total,
            reserved,
            state: Mutex::new(LimiterState::default()),
        })
    }

    /// Take a slot for `ip`. A `trusted` source (a tree neighbour, the local console) is not
    /// held to the per-IP cap and may use the reserved slots above `total`, so a flood from
    /// strangers cannot lock it out. An untrusted source finding all slots taken evicts the
    /// oldest slot of the address holding the most, if that holds at least two more.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, trusted: bool) -> Result<ConnSlot, Refusal> {
        let Ok(mut st) = self.state.lock() else {
            return Err(Refusal::Total);
        };
        let held = st.by_ip.get(&ip).map(|q| q.len()).unwrap_or(0);
        if !trusted && held >= self.per_ip {
            return Err(Refusal::PerIp);
        }
        let cap = if trusted {
            self.total + self.reserved
        } else {
            self.total
        };
        if st.total >= cap {
            let heaviest = st
                .by_ip
                .iter()
                .filter(|(other, _)| **other != ip)
                .max_by_key(|(_, q)| q.len())
                .map(|(other, q)| (*other, q.len()));
            match heaviest {
                Some((other, n)) if n >= held + 2 => {
                    let victim = st.by_ip.get(&other).and_then(|q| q.front().cloned());
                    if let Some((id, signal)) = victim {
                        st.remove(&other, id);
                        signal.notify_one();
                    }
                }
                _ => return Err(Refusal::Total),
            }
        }
        st.total += 1;
        st.next_id += 1;
        let id = st.next_id;
        let evict = Arc::new(tokio::sync::Notify::new());
        st.by_ip
            .entry(ip)
            .or_default()
            .push_back((id, evict.clone()));
        Ok(ConnSlot {
            limiter: self.clone(),
            ip,
            id,
            evict,
        })
    }

    /// Slots held now, in total.
    pub fn held(&self) -> usize {
        self.state.lock().map(|s| s.total).unwrap_or(0)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Ok(mut st) = self.limiter.state.lock() {
            // An evicted slot was already taken out.
            st.remove(&self.ip, self.id);
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = now;
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Take one token, returning how long to wait before it is available (zero if now). The
    /// token is spent either way: the caller must wait that long before going on.
    pub fn take_or_wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Token buckets per source IP, at most [`MAX_TRACKED_SOURCES`] of them.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u32,
    burst: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` may make one more request now.
    pub fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let Ok(mut map) = self.buckets.lock() else {
            return false;
        };
        if !map.contains_key(&ip) && map.len() >= MAX_TRACKED_SOURCES {
            // Forget the source that has been quiet longest.
            if let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.entry(ip)
            .or_insert_with(|| Bucket::new(self.rate, self.burst, now))
            .try_take(now)
    }
}

/// Keys and addresses the actor currently counts as its tree neighbourhood (root, parent,
/// grandparent, children, grandchildren): their connections use the reserved slots and the
/// higher per-link rate.
#[derive(Debug, Default)]
pub struct Trusted {
    inner: RwLock<(HashSet<PublicKey>, HashSet<IpAddr>)>,
}

impl Trusted {
    pub fn set(&self, keys: HashSet<PublicKey>, ips: HashSet<IpAddr>) {
        if let Ok(mut g) = self.inner.write() {
            *g = (keys, ips);
        }
    }

    pub fn has_key(&self, key: &PublicKey) -> bool {
        self.inner
            .read()
            .map(|g| g.0.contains(key))
            .unwrap_or(false)
    }

    /// A neighbour's address, or the node's own loopback/console traffic.
    pub fn has_ip(&self, ip: &IpAddr) -> bool {
        self.inner.read().map(|g| g.1.contains(ip)).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_ip_total_and_reserved() {
        let l = ConnLimiter::new(2, 3, 1);
        let a: IpAddr = "127.50.9.1".parse().unwrap();
        let b: IpAddr = "127.50.9.2".parse().unwrap();
        let s1 = l.try_acquire(a, false).unwrap();
        let _s2 = l.try_acquire(a, false).unwrap();
        assert_eq!(l.try_acquire(a, false).unwrap_err(), Refusal::PerIp);
        let _s3 = l.try_acquire(b, false).unwrap();
        assert_eq!(l.try_acquire(b, false).unwrap_err(), Refusal::Total);
        // A trusted source gets the reserved slot, and only that one.
        let _t = l.try_acquire(b, true).unwrap();
        assert_eq!(l.try_acquire(b, true).unwrap_err(), Refusal::Total);
        drop(s1);
        assert_eq!(l.held(), 3);
        assert!(l.try_acquire(a, true).is_ok());
    }

    #[tokio::test]
    async fn a_lighter_address_evicts_the_heaviest_when_full() {
        let l = ConnLimiter::new(4, 4, 0);
        let flood: IpAddr = "127.50.9.1".parse().unwrap();
        let other: IpAddr = "127.50.9.2".parse().unwrap();
        let slots: Vec<ConnSlot> = (0..4)
            .map(|_| l.try_acquire(flood, false).unwrap())
            .collect();
        let newcomer = l.try_acquire(other, false).unwrap();
        assert_eq!(l.held(), 4);
        // The flood's oldest slot is told to go; dropping it then frees nothing twice.
        tokio::time::timeout(Duration::from_secs(5), slots[0].evicted())
            .await
            .unwrap();
        drop(slots);
        assert_eq!(l.held(), 1);
        // Equal holders do not evict each other.
        let l = ConnLimiter::new(4, 2, 0);
        let _a = l.try_acquire(flood, false).unwrap();
        let _b = l.try_acquire(other, false).unwrap();
        let third: IpAddr = "127.50.9.3".parse().unwrap();
        assert_eq!(l.try_acquire(third, false).unwrap_err(), Refusal::Total);
        drop(newcomer);
    }

    #[test]
    fn bucket_limits_rate_and_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 2, t0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        let mut w = Bucket::new(10, 1, t0);
        assert_eq!(w.take_or_wait(t0), Duration::ZERO);
        let wait = w.take_or_wait(t0);
        assert!(wait >= Duration::from_millis(99) && wait <= Duration::from_millis(101));
    }

    #[test]
    fn rate_limiter_forgets_the_quietest_source_when_full() {
        let r = RateLimiter::new(1, 1);
        for i in 0..MAX_TRACKED_SOURCES + 10 {
            let ip = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            assert!(r.allow(ip));
        }
        assert!(r.buckets.lock().unwrap().len() <= MAX_TRACKED_SOURCES);
    }
}
