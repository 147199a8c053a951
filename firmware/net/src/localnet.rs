//! The local network as the kernel describes it: our addresses and prefixes (getifaddrs via
//! `if-addrs`) and the default gateway (`/proc/net/route`). Read again every few seconds by
//! the reachability task, so a new lease, a moved cable or a new router is noticed.

use std::net::{IpAddr, Ipv4Addr};

use borg_proto::reach::{LocalAddr, LocalNet};

/// Read the current local network. Errors reading either source give an empty part.
pub fn read() -> LocalNet {
    let mut addrs: Vec<LocalAddr> = if_addrs::get_if_addrs()
        .map(|ifs| {
            ifs.into_iter()
                .filter_map(|i| match i.addr {
                    if_addrs::IfAddr::V4(v4) => Some(LocalAddr {
                        ip: IpAddr::V4(v4.ip),
                        prefix: u32::from(v4.netmask).count_ones() as u8,
                    }),
                    // IPv6 is not covered yet (docs/NAT.md).
                    if_addrs::IfAddr::V6(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    addrs.sort_by_key(|a| (a.ip, a.prefix));
    addrs.dedup();
    let router = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| default_gateway(&t))
        .map(IpAddr::V4);
    LocalNet { addrs, router }
}

/// The subnet broadcast addresses of our non-loopback IPv4 links (for LAN beacons).
pub fn broadcast_addrs() -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .map(|ifs| {
            ifs.into_iter()
                .filter(|i| !i.is_loopback())
                .filter_map(|i| match i.addr {
                    if_addrs::IfAddr::V4(v4) => v4.broadcast,
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// The gateway of the default route in `/proc/net/route` text (fields are little-endian hex).
pub fn default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        (gw != 0).then(|| Ipv4Addr::from(gw.swap_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_gateway_from_proc_route() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_gateway(table), Some(Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
        assert_eq!(default_gateway(""), None);
    }

    #[test]
    fn reads_this_machine() {
        let net = read();
        assert!(net.addrs.iter().any(|a| a.ip.is_loopback()), "{net:?}");
    }
}
