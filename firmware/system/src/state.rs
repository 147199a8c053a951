//! State shared between PID 1's threads (init loop, network, LEDs, console).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::hwclock::{ClockInfo, TimeStatus};
use crate::leds::{LedState, NodeState};
use crate::supervisor::CellReport;

/// Network facts, written by the network thread.
#[derive(Debug, Clone, Default)]
pub struct NetInfo {
    /// Interface in use.
    pub iface: Option<String>,
    /// Its MAC address.
    pub mac: Option<String>,
    /// Carrier present.
    pub link: bool,
    /// DHCP client state.
    pub dhcp_state: String,
    /// Leased address with prefix, e.g. `10.0.2.15/24`.
    pub addr: Option<String>,
    /// Default gateway (the router).
    pub router: Option<String>,
    /// DNS servers.
    pub dns: Vec<String>,
    /// DHCP server.
    pub server: Option<String>,
    /// Seconds of lease left.
    pub lease_left_s: Option<u64>,
    /// Leases acquired or renewed.
    pub leases: u32,
    /// Networking disabled or failed to start, with why.
    pub note: Option<String>,
}

/// Everything the console and LEDs show.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When PID 1 started.
    pub started: Instant,
    /// Early boot done.
    pub booted: bool,
    /// Host name.
    pub hostname: String,
    /// Where cell data lives.
    pub data_dir: String,
    /// How the data partition came up (or why not).
    pub data_note: String,
    /// Network facts.
    pub net: NetInfo,
    /// Cells.
    pub cells: Vec<CellReport>,
    /// Last node state from the base cell's monitor.
    pub node: Option<NodeState>,
    /// When the base cell's monitor last answered (for the liveness check).
    pub monitor_ok_at: Option<Instant>,
    /// LED state shown.
    pub led: LedState,
    /// LED backend name.
    pub led_backend: String,
    /// Active faults.
    pub faults: Vec<String>,
    /// Installing an update.
    pub updating: bool,
    /// The A/B slot this boot came from, and its trial state.
    pub slot: Option<String>,
    /// Shutting down.
    pub stopping: bool,
    /// The node's network time (`time` of the base monitor's last answer).
    pub time: Option<TimeStatus>,
    /// The clock keeper's facts (floor, settings, saved network time).
    pub clock: ClockInfo,
}

/// Shared handle.
#[derive(Debug, Clone)]
pub struct Shared(Arc<Mutex<Snapshot>>);

impl Shared {
    /// A fresh state.
    pub fn new(hostname: String, data_dir: String) -> Self {
        Shared(Arc::new(Mutex::new(Snapshot {
            started: Instant::now(),
            booted: false,
            hostname,
            data_dir,
            data_note: String::new(),
            net: NetInfo::default(),
            cells: vec![],
            node: None,
            monitor_ok_at: None,
            led: LedState::Booting,
            led_backend: "none".into(),
            faults: vec![],
            updating: false,
            slot: None,
            stopping: false,
            time: None,
            clock: ClockInfo::default(),
        })))
    }

    /// Lock (a poisoned lock is still used: the data is plain values).
    pub fn lock(&self) -> MutexGuard<'_, Snapshot> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A copy of the current state.
    pub fn get(&self) -> Snapshot {
        self.lock().clone()
    }
}
