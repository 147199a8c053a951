//! Networking with no configuration file: loopback, the first Ethernet link, DHCP.
//!
//! [`run`] is the network thread: it watches the link's carrier and drives the sans-IO
//! [`crate::dhcp::Client`] over a UDP socket bound to port 68 on that interface.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::dhcp::{Action, Client, Dest, Lease, Message};
use crate::state::Shared;
use crate::sys::{self, IfCtl};

/// Errors of the network setup.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No Ethernet interface exists.
    #[error("no Ethernet interface found")]
    NoInterface,
    /// An interface or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// Bring loopback up with 127.0.0.1/8.
pub fn loopback_up(ctl: &IfCtl) -> Result<(), NetError> {
    ctl.set_addr("lo", Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0))
        .map_err(io("address on lo"))?;
    ctl.up("lo").map_err(io("bring lo up"))
}

/// The first Ethernet interface under `sys_class_net` (`/sys/class/net`): type 1 (ARPHRD_ETHER),
/// not wireless, not a bridge/virtual device without a `device` link; sorted by name.
pub fn first_ethernet(sys_class_net: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_class_net)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let d = sys_class_net.join(n);
            let ty = std::fs::read_to_string(d.join("type")).unwrap_or_default();
            n != "lo"
                && ty.trim() == "1"
                && !d.join("wireless").exists()
                && d.join("device").exists()
        })
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The DHCP transaction-id seed of this boot: 64 bits from the kernel's RNG (getrandom(2)),
/// so a LAN device cannot predict our xids from the MAC (the old seed was the MAC plus a
/// time that was always about zero, the same every boot). Without a working RNG (it never
/// fails on Linux >= 3.17 once seeded) the MAC, pid and the wall clock's nanoseconds are
/// mixed instead.
pub fn boot_seed(mac: [u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    match getrandom::getrandom(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(e) => {
            tracing::warn!(error = %e, "getrandom failed; DHCP xids seeded from the clock");
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
                ^ (u64::from(std::process::id()) << 48)
                ^ nanos
        }
    }
}

fn apply(ctl: &IfCtl, ifname: &str, lease: &Lease) -> Result<(), NetError> {
    ctl.set_addr(ifname, lease.addr, lease.mask)
        .map_err(io(format!(
            "set {}/{} on {ifname}",
            lease.addr,
            lease.prefix_len()
        )))?;
    if let Some(gw) = lease.router {
        ctl.add_default_route(ifname, gw)
            .map_err(io(format!("default route via {gw}")))?;
    }
    if !lease.dns.is_empty() {
        let text: String = lease
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        let _ = std::fs::write("/etc/resolv.conf", text);
    }
    Ok(())
}

fn unapply(ctl: &IfCtl, ifname: &str, lease: &Lease) {
    if let Some(gw) = lease.router {
        let _ = ctl.del_default_route(ifname, gw);
    }
    let _ = ctl.set_addr(ifname, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
}

fn open_socket(ifname: &str) -> Result<UdpSocket, NetError> {
    let s =
        UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 68))).map_err(io("bind UDP port 68"))?;
    sys::bind_to_device(&s, ifname).map_err(io(format!("bind to device {ifname}")))?;
    s.set_broadcast(true).map_err(io("SO_BROADCAST"))?;
    Ok(s)
}

/// Run the network thread forever: configure loopback, wait for an Ethernet interface, then
/// keep a DHCP lease on it across link loss and return. Errors are logged and retried.
pub fn run(shared: Shared, hostname: String) {
    let ctl = match IfCtl::new() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot open interface control socket; no networking");
            shared.lock().net.note = Some(format!("no networking: {e}"));
            return;
        }
    };
    if let Err(e) = loopback_up(&ctl) {
        tracing::error!(error = %e, "loopback");
    }
    let sys_net = Path::new("/sys/class/net");
    let mut warned = false;
    let ifname = loop {
        if let Some(n) = first_ethernet(sys_net) {
            break n;
        }
        if !warned {
            tracing::warn!("no Ethernet interface yet; waiting");
            shared.lock().net.note = Some("no Ethernet interface".into());
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mac_text =
        std::fs::read_to_string(sys_net.join(&ifname).join("address")).unwrap_or_default();
    let mac = parse_mac(&mac_text).unwrap_or([0x02, 0, 0, 0, 0, 1]);
    {
        let mut s = shared.lock();
        s.net.iface = Some(ifname.clone());
        s.net.mac = Some(mac_text.trim().to_string());
        s.net.note = None;
    }
    tracing::info!(iface = %ifname, mac = %mac_text.trim(), "using Ethernet interface");
    if let Err(e) = ctl.up(&ifname) {
        tracing::error!(iface = %ifname, error = %e, "cannot bring interface up");
    }
    let seed = boot_seed(mac);
    let mut client = Client::new(mac, Some(hostname), seed);
    let mut sock: Option<UdpSocket> = None;
    let mut link = false;
    let mut last_granted = None;
    let mut last_state = None;
    let mut buf = vec![0u8; 1500];
    loop {
        let now = Instant::now();
        let carrier = ctl.has_carrier(&ifname).unwrap_or(false);
        let mut actions = vec![];
        if carrier != link {
            link = carrier;
            if link {
                tracing::info!(iface = %ifname, "link up");
                actions.extend(client.link_up(now));
            } else {
                tracing::warn!(iface = %ifname, "link down");
                actions.extend(client.link_down(now));
            }
        }
        if client.deadline().is_some_and(|d| d <= now) {
            actions.extend(client.on_timeout(now));
        }
        if sock.is_none() && link {
            match open_socket(&ifname) {
                Ok(s) => sock = Some(s),
                Err(e) => tracing::error!(error = %e, "DHCP socket"),
            }
        }
        handle_now(&ctl, &ifname, sock.as_ref(), actions);
        let granted = client.lease().map(|l| l.granted_at);
        if granted.is_some() && granted != last_granted {
            shared.lock().net.leases += 1;
        }
        last_granted = granted;
        if last_state != Some(client.state()) {
            last_state = Some(client.state());
            tracing::info!(
                "DHCP state {}",
                format!("{:?}", client.state()).to_lowercase()
            );
        }
        publish(&shared, &client, link, now);
        // Wait for a packet until the next deadline (at most 250 ms, to watch the carrier).
        let wait = client
            .deadline()
            .map_or(Duration::from_millis(250), |d| {
                d.saturating_duration_since(Instant::now())
            })
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        match &sock {
            Some(s) => {
                let _ = s.set_read_timeout(Some(wait));
                if let Ok((n, _from)) = s.recv_from(&mut buf) {
                    if let Ok(m) = Message::decode(&buf[..n]) {
                        let acts = client.on_packet(&m, Instant::now());
                        handle_now(&ctl, &ifname, sock.as_ref(), acts);
                    }
                }
            }
            None => std::thread::sleep(wait),
        }
    }
}

fn handle_now(ctl: &IfCtl, ifname: &str, sock: Option<&UdpSocket>, acts: Vec<Action>) {
    for a in acts {
        match a {
            Action::Send(m, dest) => {
                let to = match dest {
                    Dest::Broadcast => SocketAddr::from((Ipv4Addr::BROADCAST, 67)),
                    Dest::Unicast(ip) => SocketAddr::from((ip, 67)),
                };
                if let Some(s) = sock {
                    if let Err(e) = s.send_to(&m.encode(), to) {
                        tracing::warn!(error = %e, %to, "DHCP send failed");
                    }
                }
            }
            Action::Configure(l) => match apply(ctl, ifname, &l) {
                Ok(()) => tracing::info!(
                    addr = %format!("{}/{}", l.addr, l.prefix_len()),
                    router = ?l.router, lease_s = l.lease.as_secs(),
                    "DHCP lease configured"),
                Err(e) => tracing::error!(error = %e, "cannot configure lease"),
            },
            Action::Deconfigure(l) => {
                tracing::warn!(addr = %l.addr, "DHCP lease removed");
                unapply(ctl, ifname, &l);
            }
        }
    }
}

fn publish(shared: &Shared, client: &Client, link: bool, now: Instant) {
    let mut s = shared.lock();
    s.net.link = link;
    s.net.dhcp_state = format!("{:?}", client.state()).to_lowercase();
    match client.lease() {
        Some(l) => {
            s.net.addr = Some(format!("{}/{}", l.addr, l.prefix_len()));
            s.net.router = l.router.map(|r| r.to_string());
            s.net.dns = l.dns.iter().map(|d| d.to_string()).collect();
            s.net.server = Some(l.server.to_string());
            s.net.lease_left_s = Some(l.expires.saturating_duration_since(now).as_secs());
        }
        None => {
            s.net.addr = None;
            s.net.router = None;
            s.net.lease_left_s = None;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_seed_differs_per_boot() {
        // Same MAC, as after every reboot of one board: the seeds must still differ.
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let seeds: std::collections::BTreeSet<u64> =
            (0..16).map(|_| super::boot_seed(mac)).collect();
        assert_eq!(seeds.len(), 16);
    }

    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56\n"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
    }

    #[test]
    fn finds_first_wired_interface() {
        let d = tempfile::tempdir().unwrap();
        let mk = |n: &str, ty: &str, wireless: bool, device: bool| {
            let p = d.path().join(n);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("type"), ty).unwrap();
            if wireless {
                std::fs::create_dir(p.join("wireless")).unwrap();
            }
            if device {
                std::fs::create_dir(p.join("device")).unwrap();
            }
        };
        mk("lo", "772\n", false, false);
        mk("wlan0", "1\n", true, true);
        mk("eth1", "1\n", false, true);
        mk("eth0", "1\n", false, true);
        mk("docker0", "1\n", false, false);
        assert_eq!(first_ethernet(d.path()).as_deref(), Some("eth0"));
        assert_eq!(first_ethernet(&d.path().join("none")), None);
    }
}
