//! # Port mapping on the home router: UPnP-IGD, PCP, NAT-PMP
//!
//! A node behind a home router asks the router to forward one external TCP port to it, so that
//! peers on the internet can dial in (DESIGN §8, NAT roles). [`map_tcp`] tries the protocols in
//! the order home routers most often speak them:
//!
//! 1. UPnP-IGD: an SSDP search sent from the node's LAN address (so it leaves through the LAN
//!    interface even on a multi-homed node), then SOAP `GetExternalIPAddress` and
//!    `AddPortMapping`. Only an IGD that is our gateway or sits on our LAN is used: any device on
//!    the LAN can answer SSDP, and a mapping made on the wrong box maps nothing.
//! 2. PCP to the gateway's port 5351, falling back to NAT-PMP when the server answers that it
//!    only speaks NAT-PMP (both through `crab_nat`).
//!
//! When the wished external port is held by another host (UPnP error 718, typically the mapping
//! of a node that died and whose lease has not run out yet), UPnP tries the next few ports and
//! then lets the router choose (`AddAnyPortMapping`); PCP and NAT-PMP servers pick another port
//! themselves and we take what they answer. The caller reads the result from
//! [`PortMapping::external`].
//!
//! Every network wait is bounded by [`MapRequest::timeout`] per protocol attempt, so a router
//! without any mapping service costs about two timeouts (SSDP silence, then PCP silence or an
//! immediate ICMP port unreachable). When everything fails the error says what each protocol
//! answered ([`PortMapError::AllFailed`]).
//!
//! The decisions (search options, retry timings, which gateway to trust, which port to try
//! next, how a router's answer is classified) are plain functions tested below; the exchanges
//! themselves are tested against a real miniupnpd in network namespaces
//! (`tests/tests/portmap_miniupnpd.rs`).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::time::Duration;

use crab_nat::{natpmp, pcp, InternetProtocol, PortMappingOptions, PortMappingType, TimeoutConfig};
use igd_next::aio::tokio::{search_gateway, Tokio};
use igd_next::aio::Gateway;
use igd_next::{
    AddAnyPortError, AddPortError, GatewayIpVersion, GetExternalIpError, PortMappingProtocol,
    RemovePortError, RequestError, SearchError, SearchOptions,
};
use tokio::time::timeout;
use tracing::{debug, warn};

/// Port of the PCP and NAT-PMP servers on the gateway (RFC 6887, RFC 6886).
const PCP_PORT: u16 = crab_nat::GATEWAY_PORT;

/// How many ports after the wished one UPnP tries before letting the router choose: a few keep
/// the port close to the wished one (predictable for people reading logs and firewall rules)
/// without many round trips when a whole range is taken.
const UPNP_NEXT_PORTS: u16 = 3;

/// Labels naming the protocol(s) behind an error, as they appear in messages.
pub const UPNP: &str = "upnp";
/// PCP alone (see [`map_tcp_via`]).
pub const PCP: &str = "pcp";
/// NAT-PMP alone, or the NAT-PMP fallback after PCP.
pub const NATPMP: &str = "natpmp";
/// The port-5351 attempt of [`map_tcp`]: PCP, falling back to NAT-PMP. Used when nothing on
/// the port answered, so neither protocol is there.
pub const PCP_NATPMP: &str = "pcp/natpmp";

/// The protocol that made a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapProtocol {
    Upnp,
    Pcp,
    NatPmp,
}

impl fmt::Display for MapProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapProtocol::Upnp => UPNP,
            MapProtocol::Pcp => PCP,
            MapProtocol::NatPmp => NATPMP,
        })
    }
}

/// What to map: `gateway:external_port` (TCP) to `local_ip:internal_port`.
#[derive(Debug, Clone)]
pub struct MapRequest {
    /// The default gateway, the router expected to do the mapping.
    pub gateway: Ipv4Addr,
    /// This node's address on the LAN; the mapping points here and the SSDP search goes out
    /// from here.
    pub local_ip: Ipv4Addr,
    pub internal_port: u16,
    /// The external port we would like; the router may give another one. 0: any.
    pub external_port: u16,
    /// Lease asked for (whole seconds, at least one); the router may shorten or lengthen it
    /// (PCP and NAT-PMP say so, see [`PortMapping::lease`]).
    pub lease: Duration,
    /// Bound on each protocol attempt and on each later request to the router.
    pub timeout: Duration,
    /// Shown in the router's UPnP mapping list.
    pub description: String,
}

/// Why a mapping could not be made, renewed or removed.
#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    /// Nothing answered for this protocol: the router has no such service, or it is turned off,
    /// or only some other device on the LAN answered.
    #[error("{protocol}: {reason}")]
    NoService {
        protocol: &'static str,
        reason: String,
    },
    /// The router's service answered but would not do it. `code` is the router's own: the UPnP
    /// error code (606 not authorized, 718 conflict, ...) or the PCP / NAT-PMP result code.
    #[error("{protocol}: router refused: {}", refusal_text(*code, reason))]
    Refused {
        protocol: &'static str,
        code: Option<u16>,
        reason: String,
    },
    /// A service that had answered did not answer this request in time.
    #[error("{protocol}: no answer to {what} from {peer} within {after:?}")]
    Timeout {
        protocol: &'static str,
        what: &'static str,
        peer: SocketAddr,
        after: Duration,
    },
    /// A local socket or transport failure, or an answer that could not be understood.
    #[error("{protocol}: {what}: {source}")]
    Io {
        protocol: &'static str,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// No protocol made a mapping: what each one answered, in the order tried.
    #[error("no port mapping ({})", join_errors(.0))]
    AllFailed(Vec<PortMapError>),
    /// The request cannot be sent as it is.
    #[error("invalid port-mapping request: {0}")]
    InvalidRequest(&'static str),
}

impl PortMapError {
    /// True when no mapping service answered at all (on every protocol tried): asking again
    /// soon is pointless, unlike after a timeout or a refusal that names a passing condition.
    pub fn is_no_service(&self) -> bool {
        match self {
            PortMapError::NoService { .. } => true,
            PortMapError::AllFailed(all) => all.iter().all(PortMapError::is_no_service),
            _ => false,
        }
    }
}

fn refusal_text(code: Option<u16>, reason: &str) -> String {
    match code {
        Some(c) => format!("{c} {reason}"),
        None => reason.to_string(),
    }
}

fn join_errors(errors: &[PortMapError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A port mapping held on the router. Renew it before [`PortMapping::lease`] runs out; remove
/// it when the node stops serving.
#[derive(Debug)]
pub struct PortMapping {
    protocol: MapProtocol,
    gateway: Ipv4Addr,
    internal: SocketAddrV4,
    external: SocketAddr,
    lease: Duration,
    timeout: Duration,
    description: String,
    handle: Handle,
}

/// What each protocol needs to talk about the mapping again.
#[derive(Debug)]
enum Handle {
    Upnp(Gateway<Tokio>),
    /// crab_nat keeps the PCP nonce, the NAT-PMP state and the retry timings.
    Port5351(crab_nat::PortMapping),
}

impl PortMapping {
    pub fn protocol(&self) -> MapProtocol {
        self.protocol
    }

    /// The router's external address and the mapped port, as the protocol reported them.
    pub fn external(&self) -> SocketAddr {
        self.external
    }

    /// The lease the router granted (for UPnP: the one asked for, which the protocol does not
    /// echo). Zero means permanent: only for IGDs that accept nothing else.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Where the mapping points: this node's LAN address and internal port.
    pub fn internal(&self) -> SocketAddrV4 {
        self.internal
    }

    /// The router that holds the mapping (for UPnP: the host of its control URL).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Refresh the lease, keeping the external port. Should the router move a PCP / NAT-PMP
    /// mapping to another port (it lost its state, and the port went to someone else),
    /// [`PortMapping::external`] reports the new one. After an error, map anew with
    /// [`map_tcp`]: a restarted router may have lost the mapping or moved its control URL.
    pub async fn renew(&mut self) -> Result<(), PortMapError> {
        let t = self.timeout;
        match &mut self.handle {
            Handle::Upnp(gw) => {
                let peer = gw.addr;
                let add = gw.add_port(
                    PortMappingProtocol::TCP,
                    self.external.port(),
                    self.internal.into(),
                    lease_secs(self.lease),
                    &self.description,
                );
                match bounded(t, add).await {
                    None => Err(timeout_error(UPNP, "AddPortMapping (renew)", peer, t)),
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(classify_add(e).into_error(peer, t)),
                }
            }
            Handle::Port5351(m) => {
                let label = label_of(m.mapping_type());
                let peer = pcp_peer(self.gateway);
                match bounded(t, m.renew()).await {
                    None => Err(timeout_error(label, "renewal", peer, t)),
                    Some(Err(f)) => Err(classify_port5351(label, f, peer, t, Phase::Later)),
                    Some(Ok(())) => {
                        let ip = match m.mapping_type() {
                            PortMappingType::Pcp { external_ip, .. } => external_ip,
                            PortMappingType::NatPmp => self.external.ip(),
                        };
                        let external = SocketAddr::new(ip, m.external_port().get());
                        if external != self.external {
                            warn!(old = %self.external, new = %external, "router moved the mapping");
                        }
                        self.external = external;
                        self.lease = Duration::from_secs(u64::from(m.lifetime()));
                        Ok(())
                    }
                }
            }
        }
    }

    /// Delete the mapping on the router. A UPnP mapping that is already gone (lease ran out,
    /// router restarted) counts as removed.
    pub async fn remove(self) -> Result<(), PortMapError> {
        let t = self.timeout;
        match self.handle {
            Handle::Upnp(gw) => {
                let peer = gw.addr;
                let del = gw.remove_port(PortMappingProtocol::TCP, self.external.port());
                match bounded(t, del).await {
                    None => Err(timeout_error(UPNP, "DeletePortMapping", peer, t)),
                    Some(Ok(())) | Some(Err(RemovePortError::NoSuchPortMapping)) => Ok(()),
                    Some(Err(RemovePortError::ActionNotAuthorized)) => Err(PortMapError::Refused {
                        protocol: UPNP,
                        code: Some(606),
                        reason: "Action not authorized".into(),
                    }),
                    Some(Err(RemovePortError::RequestError(e))) => {
                        Err(upnp_request_error("DeletePortMapping", peer, t, e))
                    }
                }
            }
            Handle::Port5351(m) => {
                let label = label_of(m.mapping_type());
                let peer = pcp_peer(self.gateway);
                match bounded(t, m.try_drop()).await {
                    None => Err(timeout_error(label, "deletion", peer, t)),
                    Some(Ok(())) => Ok(()),
                    Some(Err((f, _))) => Err(classify_port5351(label, f, peer, t, Phase::Later)),
                }
            }
        }
    }
}

/// Map a TCP port on the router: UPnP-IGD first, then PCP with NAT-PMP fallback.
pub async fn map_tcp(req: &MapRequest) -> Result<PortMapping, PortMapError> {
    validate(req)?;
    let upnp = match upnp_map(req).await {
        Ok(m) => return Ok(m),
        Err(e) => e,
    };
    debug!(error = %upnp, "UPnP mapping failed, trying PCP / NAT-PMP");
    let port5351 = match port5351_map(req, Port5351::PcpThenNatPmp).await {
        Ok(m) => return Ok(m),
        Err(e) => e,
    };
    Err(PortMapError::AllFailed(vec![upnp, port5351]))
}

/// Map a TCP port with one protocol only (PCP without the NAT-PMP fallback). For diagnostics
/// and for testing each protocol against a router that speaks them all.
pub async fn map_tcp_via(
    req: &MapRequest,
    protocol: MapProtocol,
) -> Result<PortMapping, PortMapError> {
    validate(req)?;
    match protocol {
        MapProtocol::Upnp => upnp_map(req).await,
        MapProtocol::Pcp => port5351_map(req, Port5351::Pcp).await,
        MapProtocol::NatPmp => port5351_map(req, Port5351::NatPmp).await,
    }
}

fn validate(req: &MapRequest) -> Result<(), PortMapError> {
    if req.internal_port == 0 {
        return Err(PortMapError::InvalidRequest("internal port 0"));
    }
    if req.local_ip.is_unspecified() || req.gateway.is_unspecified() {
        return Err(PortMapError::InvalidRequest(
            "local address and gateway must be given",
        ));
    }
    Ok(())
}

/// `fut` bounded by `t`; `None` if it did not finish in time.
async fn bounded<T>(t: Duration, fut: impl Future<Output = T>) -> Option<T> {
    timeout(t, fut).await.ok()
}

fn timeout_error(
    protocol: &'static str,
    what: &'static str,
    peer: SocketAddr,
    after: Duration,
) -> PortMapError {
    PortMapError::Timeout {
        protocol,
        what,
        peer,
        after,
    }
}

/// The lease in whole seconds for the wire: rounded up, at least 1 (0 would mean "permanent" to
/// UPnP and "delete" to PCP / NAT-PMP), at most what the field holds.
fn lease_secs(lease: Duration) -> u32 {
    let secs = lease.as_secs() + u64::from(lease.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// UPnP-IGD

/// SSDP search options: from the LAN address (the multicast then leaves through the interface
/// that holds it), IPv4 gateways only, bounded by the attempt's timeout.
fn search_options(req: &MapRequest) -> SearchOptions {
    let mut o = SearchOptions::default();
    o.bind_addr = SocketAddr::new(req.local_ip.into(), 0);
    o.timeout = Some(req.timeout);
    o.single_search_timeout = Some(req.timeout);
    o.gateway_ip_version = GatewayIpVersion::V4;
    o
}

/// The host of a control URL, which is either a path on the device (`/ctl/IPConn`, host is
/// the device `device`) or an absolute `http://host[:port]/path`.
fn control_host(device: SocketAddr, control_url: &str) -> Option<IpAddr> {
    let Some(rest) = control_url.strip_prefix("http://") else {
        return control_url.starts_with('/').then_some(device.ip());
    };
    let authority = rest.split('/').next()?;
    if let Ok(sa) = authority.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    authority
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Whether to use an IGD whose control URL lives at `host`: our gateway, or a box on our LAN
/// (`lan`: our address and prefix length, if known).
fn acceptable_gateway(host: IpAddr, gateway: Ipv4Addr, lan: Option<(Ipv4Addr, u8)>) -> bool {
    let IpAddr::V4(host) = host else {
        return false;
    };
    if host == gateway {
        return true;
    }
    match lan {
        Some((ip, prefix)) if (1..=32).contains(&prefix) => {
            let mask = u32::MAX << (32 - u32::from(prefix));
            host != ip && u32::from(host) & mask == u32::from(ip) & mask
        }
        _ => false,
    }
}

/// Our LAN address with its prefix length, from the interface that holds `local_ip`.
fn lan_of(local_ip: Ipv4Addr) -> Option<(Ipv4Addr, u8)> {
    let ifaces = if_addrs::get_if_addrs().ok()?;
    ifaces.into_iter().find_map(|i| match i.addr {
        if_addrs::IfAddr::V4(a) if a.ip == local_ip => Some((a.ip, a.prefixlen)),
        _ => None,
    })
}

/// External ports to ask for, in order, before letting the router choose: the wished one and
/// the next few. Empty when any port will do.
fn port_candidates(wished: u16) -> Vec<u16> {
    if wished == 0 {
        return Vec::new();
    }
    (0..=UPNP_NEXT_PORTS)
        .filter_map(|i| wished.checked_add(i))
        .collect()
}

/// What an `AddPortMapping` failure means for the next step.
#[derive(Debug)]
enum AddOutcome {
    /// 718 ConflictInMappingEntry: another host holds the port.
    Conflict,
    /// 724 SamePortValuesRequired: the IGD maps a port only to the same internal port.
    SamePortRequired,
    /// 725 OnlyPermanentLeasesSupported: an IGDv1 that takes only lease 0.
    PermanentOnly,
    Failed(UpnpFailure),
}

/// A UPnP failure not yet tied to a peer address (the SOAP layer loses it).
#[derive(Debug)]
enum UpnpFailure {
    Refused(u16, &'static str),
    Request(RequestError),
}

impl AddOutcome {
    fn into_error(self, peer: SocketAddr, t: Duration) -> PortMapError {
        let refused = |code: u16, reason: &str| PortMapError::Refused {
            protocol: UPNP,
            code: Some(code),
            reason: reason.to_string(),
        };
        match self {
            AddOutcome::Conflict => refused(718, "ConflictInMappingEntry"),
            AddOutcome::SamePortRequired => refused(724, "SamePortValuesRequired"),
            AddOutcome::PermanentOnly => refused(725, "OnlyPermanentLeasesSupported"),
            AddOutcome::Failed(UpnpFailure::Refused(code, reason)) => refused(code, reason),
            AddOutcome::Failed(UpnpFailure::Request(e)) => {
                upnp_request_error("AddPortMapping", peer, t, e)
            }
        }
    }
}

/// igd-next turns the router's error codes into variants; put the codes back, because the
/// caller (and the person reading the log) knows them from the router's documentation.
fn classify_add(e: AddPortError) -> AddOutcome {
    match e {
        AddPortError::PortInUse => AddOutcome::Conflict,
        AddPortError::SamePortValuesRequired => AddOutcome::SamePortRequired,
        AddPortError::OnlyPermanentLeasesSupported => AddOutcome::PermanentOnly,
        AddPortError::ActionNotAuthorized => {
            AddOutcome::Failed(UpnpFailure::Refused(606, "Action not authorized"))
        }
        AddPortError::DescriptionTooLong => {
            AddOutcome::Failed(UpnpFailure::Refused(605, "String argument too long"))
        }
        AddPortError::InternalPortZeroInvalid | AddPortError::ExternalPortZeroInvalid => {
            AddOutcome::Failed(UpnpFailure::Refused(402, "Invalid args (port 0)"))
        }
        AddPortError::RequestError(e) => AddOutcome::Failed(UpnpFailure::Request(e)),
    }
}

fn classify_add_any(e: AddAnyPortError, peer: SocketAddr, t: Duration) -> PortMapError {
    let refused = |code: u16, reason: &str| PortMapError::Refused {
        protocol: UPNP,
        code: Some(code),
        reason: reason.to_string(),
    };
    match e {
        AddAnyPortError::ActionNotAuthorized => refused(606, "Action not authorized"),
        AddAnyPortError::NoPortsAvailable => refused(728, "NoPortMapsAvailable"),
        AddAnyPortError::ExternalPortInUse => refused(718, "ConflictInMappingEntry"),
        AddAnyPortError::OnlyPermanentLeasesSupported => {
            refused(725, "OnlyPermanentLeasesSupported")
        }
        AddAnyPortError::DescriptionTooLong => refused(605, "String argument too long"),
        AddAnyPortError::InternalPortZeroInvalid => refused(402, "Invalid args (port 0)"),
        AddAnyPortError::RequestError(e) => upnp_request_error("AddAnyPortMapping", peer, t, e),
    }
}

/// A SOAP exchange failure: the router's own error code, a timeout, or transport trouble.
fn upnp_request_error(
    what: &'static str,
    peer: SocketAddr,
    t: Duration,
    e: RequestError,
) -> PortMapError {
    match e {
        RequestError::ErrorCode(code, reason) => PortMapError::Refused {
            protocol: UPNP,
            code: Some(code),
            reason,
        },
        RequestError::UnsupportedAction(action) => PortMapError::Refused {
            protocol: UPNP,
            code: Some(401),
            reason: format!("Invalid Action: the IGD does not offer {action}"),
        },
        RequestError::IoError(e) if e.kind() == io::ErrorKind::TimedOut => {
            timeout_error(UPNP, what, peer, t)
        }
        RequestError::IoError(source) => PortMapError::Io {
            protocol: UPNP,
            what,
            source,
        },
        RequestError::InvalidResponse(text) => PortMapError::Io {
            protocol: UPNP,
            what,
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid answer: {}", excerpt(&text)),
            ),
        },
        other => PortMapError::Io {
            protocol: UPNP,
            what,
            source: io::Error::other(other.to_string()),
        },
    }
}

/// The start of a router's answer, for an error message (answers can be whole XML documents).
fn excerpt(text: &str) -> String {
    const MAX: usize = 160;
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &flat[..i]),
        None => flat,
    }
}

async fn upnp_map(req: &MapRequest) -> Result<PortMapping, PortMapError> {
    let t = req.timeout;
    let found = bounded(t, search_gateway(search_options(req))).await;
    let gw = match found {
        None | Some(Err(SearchError::NoResponseWithinTimeout)) => {
            return Err(PortMapError::NoService {
                protocol: UPNP,
                reason: format!("no IGD answered within {t:?} (SSDP from {})", req.local_ip),
            })
        }
        Some(Err(SearchError::IoError(source))) => {
            return Err(PortMapError::Io {
                protocol: UPNP,
                what: "SSDP search",
                source,
            })
        }
        Some(Err(e)) => {
            return Err(PortMapError::NoService {
                protocol: UPNP,
                reason: format!("no usable IGD answered: {e}"),
            })
        }
        Some(Ok(gw)) => gw,
    };
    let peer = gw.addr;
    let host = control_host(gw.addr, &gw.control_url);
    let lan = lan_of(req.local_ip);
    let gateway = match host {
        Some(IpAddr::V4(h)) if acceptable_gateway(IpAddr::V4(h), req.gateway, lan) => h,
        _ => {
            return Err(PortMapError::NoService {
                protocol: UPNP,
                reason: format!(
                    "the IGD that answered ({}) is neither our gateway {} nor on our LAN",
                    gw.control_url, req.gateway
                ),
            })
        }
    };
    debug!(%peer, control = %gw.control_url, "found IGD");

    // Ask for the external address first: a router that has none (it sits behind another NAT,
    // or is not connected) cannot map anything useful, and says so here more clearly than in
    // AddPortMapping.
    let ip = match bounded(t, gw.get_external_ip()).await {
        None => return Err(timeout_error(UPNP, "GetExternalIPAddress", peer, t)),
        Some(Ok(ip)) if !ip.is_unspecified() => ip,
        Some(Ok(_))
        | Some(Err(GetExternalIpError::RequestError(RequestError::InvalidResponse(_)))) => {
            return Err(PortMapError::Refused {
                protocol: UPNP,
                code: None,
                reason: "the router reports no usable external address".into(),
            })
        }
        Some(Err(GetExternalIpError::ActionNotAuthorized)) => {
            return Err(PortMapError::Refused {
                protocol: UPNP,
                code: Some(606),
                reason: "Action not authorized".into(),
            })
        }
        Some(Err(GetExternalIpError::RequestError(e))) => {
            return Err(upnp_request_error("GetExternalIPAddress", peer, t, e))
        }
    };

    let internal = SocketAddrV4::new(req.local_ip, req.internal_port);
    let mut lease = lease_secs(req.lease);
    let mut queue: std::collections::VecDeque<u16> = port_candidates(req.external_port).into();
    let mut tried_internal = false;
    let mut tried_permanent = false;
    let mut port = None;
    // Bounded: each outcome either ends the loop or consumes a queued port; the two retries
    // that re-queue (same port, permanent lease) happen at most once each.
    while let Some(p) = queue.pop_front() {
        let add = gw.add_port(
            PortMappingProtocol::TCP,
            p,
            internal.into(),
            lease,
            &req.description,
        );
        let outcome = match bounded(t, add).await {
            None => return Err(timeout_error(UPNP, "AddPortMapping", peer, t)),
            Some(Ok(())) => {
                port = Some(p);
                break;
            }
            Some(Err(e)) => classify_add(e),
        };
        debug!(port = p, ?outcome, "AddPortMapping failed");
        match outcome {
            AddOutcome::Conflict => continue,
            AddOutcome::SamePortRequired if !tried_internal && p != req.internal_port => {
                tried_internal = true;
                queue.clear();
                queue.push_back(req.internal_port);
            }
            AddOutcome::PermanentOnly if !tried_permanent => {
                tried_permanent = true;
                lease = 0;
                queue.push_front(p);
            }
            other => return Err(other.into_error(peer, t)),
        }
    }
    let port = match port {
        Some(p) => p,
        // Every port we asked for is taken (or we wished for none): let the router choose.
        None => {
            let any = gw.add_any_port(
                PortMappingProtocol::TCP,
                internal.into(),
                lease,
                &req.description,
            );
            match bounded(t, any).await {
                None => return Err(timeout_error(UPNP, "AddAnyPortMapping", peer, t)),
                Some(Ok(p)) => p,
                Some(Err(e)) => return Err(classify_add_any(e, peer, t)),
            }
        }
    };
    Ok(PortMapping {
        protocol: MapProtocol::Upnp,
        gateway,
        internal,
        external: SocketAddr::new(ip, port),
        lease: Duration::from_secs(u64::from(lease)),
        timeout: t,
        description: req.description.clone(),
        handle: Handle::Upnp(gw),
    })
}

// ---------------------------------------------------------------------------------------------
// PCP and NAT-PMP (port 5351)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port5351 {
    PcpThenNatPmp,
    Pcp,
    NatPmp,
}

impl Port5351 {
    fn label(self) -> &'static str {
        match self {
            Port5351::PcpThenNatPmp => PCP_NATPMP,
            Port5351::Pcp => PCP,
            Port5351::NatPmp => NATPMP,
        }
    }
}

/// Whether the error happens while mapping (silence means: no such service) or on a mapping
/// already made (silence means: the router stopped answering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Map,
    Later,
}

fn pcp_peer(gateway: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(gateway.into(), PCP_PORT)
}

fn label_of(t: PortMappingType) -> &'static str {
    match t {
        PortMappingType::Pcp { .. } => PCP,
        PortMappingType::NatPmp => NATPMP,
    }
}

/// Retransmissions within one attempt: the RFCs double the wait each time (PCP and NAT-PMP
/// start at 250 ms); three sends with waits t/7, 2t/7, 4t/7 fill the attempt's `t` exactly, so
/// a lost datagram is resent without the attempt outlasting its bound.
fn timeout_config(t: Duration) -> TimeoutConfig {
    TimeoutConfig {
        initial_timeout: (t / 7).max(Duration::from_millis(10)),
        max_retries: 2,
        max_retry_timeout: Some(t),
    }
}

fn pcp_options(req: &MapRequest) -> PortMappingOptions {
    PortMappingOptions {
        external_port: NonZeroU16::new(req.external_port),
        lifetime_seconds: Some(lease_secs(req.lease)),
        timeout_config: Some(timeout_config(req.timeout)),
    }
}

/// The router's result code of a PCP failure (RFC 6887 §7.4), if it answered with one.
fn pcp_code(f: &pcp::Failure) -> Option<u16> {
    use pcp::Failure as F;
    Some(match f {
        F::UnsupportedVersion(_) => 1,
        F::NotAuthorized(_) => 2,
        F::MalformedRequest => 3,
        F::UnsupportedOpcode => 4,
        F::UnsupportedOption => 5,
        F::MalformedOption => 6,
        F::NetworkFailure(_) => 7,
        F::NoResources(_) => 8,
        F::UnsupportedProtocol => 9,
        F::UserExceededQuota(_) => 10,
        F::CannotProvideExternal(_) => 11,
        F::AddressMismatch => 12,
        F::ExcessiveRemotePeers => 13,
        F::Socket(_) | F::Timeout | F::Nonce | F::InvalidResponse(_) => return None,
    })
}

/// The router's result code of a NAT-PMP failure (RFC 6886 §3.5), if it answered with one.
fn natpmp_code(f: &natpmp::Failure) -> Option<u16> {
    use natpmp::Failure as F;
    Some(match f {
        F::UnsupportedVersion(_) => 1,
        F::NotAuthorized => 2,
        F::NetworkFailure => 3,
        F::OutOfResources => 4,
        F::UnsupportedOpcode => 5,
        F::Socket(_) | F::Timeout | F::InvalidResponse(_) => return None,
    })
}

/// What went wrong underneath a crab_nat failure.
enum Cause {
    Socket(io::Error),
    Silence,
    Invalid(String),
    Code(u16, String),
}

fn cause_of(f: crab_nat::MappingFailure) -> Cause {
    // crab_nat words refusals as "Server responded with code: X"; keep only X.
    let reason = |s: String| {
        s.strip_prefix("Server responded with code: ")
            .map(str::to_string)
            .unwrap_or(s)
    };
    match f {
        crab_nat::MappingFailure::Pcp(pcp::Failure::Socket(e))
        | crab_nat::MappingFailure::NatPmp(natpmp::Failure::Socket(e)) => Cause::Socket(e),
        crab_nat::MappingFailure::Pcp(pcp::Failure::Timeout)
        | crab_nat::MappingFailure::NatPmp(natpmp::Failure::Timeout) => Cause::Silence,
        crab_nat::MappingFailure::Pcp(f) => match pcp_code(&f) {
            Some(c) => Cause::Code(c, reason(f.to_string())),
            None => Cause::Invalid(f.to_string()),
        },
        crab_nat::MappingFailure::NatPmp(f) => match natpmp_code(&f) {
            Some(c) => Cause::Code(c, reason(f.to_string())),
            None => Cause::Invalid(f.to_string()),
        },
    }
}

fn classify_port5351(
    label: &'static str,
    f: crab_nat::MappingFailure,
    peer: SocketAddr,
    t: Duration,
    phase: Phase,
) -> PortMapError {
    // A NAT-PMP failure in the combined attempt means PCP answered "use NAT-PMP" first.
    let label = match (&f, label) {
        (crab_nat::MappingFailure::NatPmp(_), PCP_NATPMP) => NATPMP,
        _ => label,
    };
    match (cause_of(f), phase) {
        (Cause::Socket(e), Phase::Map) if e.kind() == io::ErrorKind::ConnectionRefused => {
            PortMapError::NoService {
                protocol: label,
                reason: format!("nothing listens on {peer} (port unreachable)"),
            }
        }
        (Cause::Socket(source), _) => PortMapError::Io {
            protocol: label,
            what: "exchange with the gateway",
            source,
        },
        (Cause::Silence, Phase::Map) => PortMapError::NoService {
            protocol: label,
            reason: format!("no answer from {peer} within {t:?}"),
        },
        (Cause::Silence, Phase::Later) => timeout_error(label, "request", peer, t),
        (Cause::Invalid(text), _) => PortMapError::Io {
            protocol: label,
            what: "answer from the gateway",
            source: io::Error::new(io::ErrorKind::InvalidData, text),
        },
        (Cause::Code(code, reason), _) => PortMapError::Refused {
            protocol: label,
            code: Some(code),
            reason,
        },
    }
}

async fn port5351_map(req: &MapRequest, which: Port5351) -> Result<PortMapping, PortMapError> {
    let t = req.timeout;
    let label = which.label();
    let peer = pcp_peer(req.gateway);
    let internal_port = NonZeroU16::new(req.internal_port)
        .ok_or(PortMapError::InvalidRequest("internal port 0"))?;
    let gw = crab_nat::GatewayAddress::IpV4(req.gateway);
    let client = IpAddr::V4(req.local_ip);
    let opts = pcp_options(req);
    let attempt = async {
        match which {
            Port5351::PcpThenNatPmp => {
                crab_nat::PortMapping::new(gw, client, InternetProtocol::Tcp, internal_port, opts)
                    .await
            }
            Port5351::Pcp => pcp::port_mapping(
                pcp::BaseMapRequest::new(gw, client, InternetProtocol::Tcp, internal_port),
                None,
                None,
                opts,
            )
            .await
            .map_err(Into::into),
            Port5351::NatPmp => {
                natpmp::port_mapping(gw, InternetProtocol::Tcp, internal_port, opts)
                    .await
                    .map_err(Into::into)
            }
        }
    };
    // The retransmission schedule already fits in `t` per protocol; the PCP-then-NAT-PMP
    // attempt may hold two of them, and the outer bound only guards against a schedule that
    // overruns (crab_nat adds up to 5 % jitter).
    let cap = match which {
        Port5351::PcpThenNatPmp => t * 2,
        _ => t + t / 4,
    };
    let m = match bounded(cap, attempt).await {
        None => {
            return Err(PortMapError::NoService {
                protocol: label,
                reason: format!("no answer from {peer} within {cap:?}"),
            })
        }
        Some(Err(f)) => return Err(classify_port5351(label, f, peer, t, Phase::Map)),
        Some(Ok(m)) => m,
    };
    let (protocol, ip) = match m.mapping_type() {
        PortMappingType::Pcp { external_ip, .. } => (MapProtocol::Pcp, external_ip),
        PortMappingType::NatPmp => {
            // NAT-PMP's mapping answer carries no address; ask for it separately. Without it
            // the mapping is useless to peers, so give it back rather than leave it behind.
            let ask = natpmp::external_address(gw, Some(timeout_config(t)));
            let got = match bounded(cap, ask).await {
                Some(Ok(ip)) if !ip.is_unspecified() => Ok(ip),
                Some(Ok(_)) => Err(PortMapError::Refused {
                    protocol: NATPMP,
                    code: None,
                    reason: "the router reports no usable external address".into(),
                }),
                Some(Err(f)) => Err(classify_port5351(NATPMP, f.into(), peer, t, Phase::Later)),
                None => Err(timeout_error(NATPMP, "external address request", peer, t)),
            };
            match got {
                Ok(ip) => (MapProtocol::NatPmp, IpAddr::V4(ip)),
                Err(e) => {
                    if let Some(Err((drop_err, _))) = bounded(cap, m.try_drop()).await {
                        warn!(error = %drop_err, "could not give back a NAT-PMP mapping");
                    }
                    return Err(e);
                }
            }
        }
    };
    Ok(PortMapping {
        protocol,
        gateway: req.gateway,
        internal: SocketAddrV4::new(req.local_ip, req.internal_port),
        external: SocketAddr::new(ip, m.external_port().get()),
        lease: Duration::from_secs(u64::from(m.lifetime())),
        timeout: t,
        description: req.description.clone(),
        handle: Handle::Port5351(m),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> MapRequest {
        MapRequest {
            gateway: Ipv4Addr::new(10, 0, 2, 1),
            local_ip: Ipv4Addr::new(10, 0, 2, 10),
            internal_port: 13300,
            external_port: 13300,
            lease: Duration::from_secs(600),
            timeout: Duration::from_millis(1500),
            description: "borg".into(),
        }
    }

    #[test]
    fn all_failed_says_what_each_protocol_answered() {
        let e = PortMapError::AllFailed(vec![
            PortMapError::NoService {
                protocol: UPNP,
                reason: "no IGD answered within 2s (SSDP from 10.0.2.10)".into(),
            },
            PortMapError::NoService {
                protocol: PCP_NATPMP,
                reason: "no answer from 10.0.2.1:5351 within 1.5s".into(),
            },
        ]);
        assert_eq!(
            e.to_string(),
            "no port mapping (upnp: no IGD answered within 2s (SSDP from 10.0.2.10); \
             pcp/natpmp: no answer from 10.0.2.1:5351 within 1.5s)"
        );
        assert!(e.is_no_service());
    }

    #[test]
    fn refusals_carry_the_routers_code() {
        let e = PortMapError::Refused {
            protocol: UPNP,
            code: Some(606),
            reason: "Action not authorized".into(),
        };
        assert_eq!(
            e.to_string(),
            "upnp: router refused: 606 Action not authorized"
        );
        assert!(!e.is_no_service());
        let mixed = PortMapError::AllFailed(vec![
            e,
            PortMapError::NoService {
                protocol: PCP_NATPMP,
                reason: "x".into(),
            },
        ]);
        assert!(!mixed.is_no_service());
        let bare = PortMapError::Refused {
            protocol: NATPMP,
            code: None,
            reason: "the router reports no usable external address".into(),
        };
        assert_eq!(
            bare.to_string(),
            "natpmp: router refused: the router reports no usable external address"
        );
    }

    #[test]
    fn protocol_names() {
        assert_eq!(MapProtocol::Upnp.to_string(), "upnp");
        assert_eq!(MapProtocol::Pcp.to_string(), "pcp");
        assert_eq!(MapProtocol::NatPmp.to_string(), "natpmp");
    }

    #[test]
    fn search_goes_out_from_the_lan_address_and_is_bounded() {
        let o = search_options(&req());
        assert_eq!(o.bind_addr, "10.0.2.10:0".parse::<SocketAddr>().unwrap());
        assert_eq!(o.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(o.single_search_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(o.gateway_ip_version, GatewayIpVersion::V4);
        assert_eq!(
            o.broadcast_address,
            "239.255.255.250:1900".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn retransmissions_fit_in_the_attempt() {
        let t = Duration::from_millis(1400);
        let c = timeout_config(t);
        let mut total = Duration::ZERO;
        let mut wait = c.initial_timeout;
        for _ in 0..=c.max_retries {
            total += wait;
            wait = (wait * 2).min(c.max_retry_timeout.unwrap());
        }
        assert_eq!(total, t);
        assert_eq!(
            timeout_config(Duration::ZERO).initial_timeout,
            Duration::from_millis(10)
        );
    }

    #[test]
    fn pcp_options_carry_wish_lease_and_timings() {
        let o = pcp_options(&req());
        assert_eq!(o.external_port.map(NonZeroU16::get), Some(13300));
        assert_eq!(o.lifetime_seconds, Some(600));
        assert!(o.timeout_config.is_some());
        let any = pcp_options(&MapRequest {
            external_port: 0,
            ..req()
        });
        assert_eq!(any.external_port, None);
    }

    #[test]
    fn leases_round_up_and_never_mean_delete() {
        assert_eq!(lease_secs(Duration::ZERO), 1);
        assert_eq!(lease_secs(Duration::from_millis(1)), 1);
        assert_eq!(lease_secs(Duration::from_millis(1001)), 2);
        assert_eq!(lease_secs(Duration::from_secs(600)), 600);
        assert_eq!(lease_secs(Duration::from_secs(u64::MAX)), u32::MAX);
    }

    #[test]
    fn wished_port_then_the_next_few() {
        assert_eq!(port_candidates(13300), vec![13300, 13301, 13302, 13303]);
        assert_eq!(port_candidates(65534), vec![65534, 65535]);
        assert!(port_candidates(0).is_empty());
    }

    #[test]
    fn control_url_hosts() {
        let dev: SocketAddr = "10.0.1.1:5000".parse().unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(control_host(dev, "/ctl/IPConn"), ip("10.0.1.1"));
        assert_eq!(
            control_host(dev, "http://10.0.1.254:49000/upnp/control"),
            ip("10.0.1.254")
        );
        assert_eq!(control_host(dev, "http://10.0.1.7/x"), ip("10.0.1.7"));
        assert_eq!(control_host(dev, "http://[fe80::1]:80/x"), ip("fe80::1"));
        assert_eq!(control_host(dev, "http://router.lan/x"), None);
        assert_eq!(control_host(dev, "ctl"), None);
    }

    #[test]
    fn only_our_gateway_or_lan_boxes_are_trusted() {
        let gw = Ipv4Addr::new(10, 0, 1, 1);
        let lan = Some((Ipv4Addr::new(10, 0, 1, 10), 24));
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        assert!(acceptable_gateway(v4(10, 0, 1, 1), gw, None));
        assert!(acceptable_gateway(v4(10, 0, 1, 254), gw, lan));
        assert!(!acceptable_gateway(v4(10, 0, 2, 1), gw, lan));
        assert!(!acceptable_gateway(v4(10, 0, 1, 254), gw, None));
        assert!(!acceptable_gateway(v4(10, 0, 1, 10), gw, lan), "ourselves");
        assert!(!acceptable_gateway("::1".parse().unwrap(), gw, lan));
        assert!(!acceptable_gateway(v4(11, 0, 0, 1), gw, Some((gw, 0))));
    }

    #[test]
    fn upnp_conflicts_and_refusals() {
        let peer: SocketAddr = "10.0.1.1:5000".parse().unwrap();
        let t = Duration::from_secs(1);
        assert!(matches!(
            classify_add(AddPortError::PortInUse),
            AddOutcome::Conflict
        ));
        let e = classify_add(AddPortError::ActionNotAuthorized).into_error(peer, t);
        assert!(matches!(
            e,
            PortMapError::Refused {
                code: Some(606),
                ..
            }
        ));
        let e = classify_add(AddPortError::RequestError(RequestError::ErrorCode(
            501,
            "ActionFailed".into(),
        )))
        .into_error(peer, t);
        assert_eq!(e.to_string(), "upnp: router refused: 501 ActionFailed");
        let e = upnp_request_error(
            "AddPortMapping",
            peer,
            t,
            RequestError::IoError(io::Error::new(io::ErrorKind::TimedOut, "x")),
        );
        assert!(matches!(e, PortMapError::Timeout { .. }));
        let e = classify_add_any(AddAnyPortError::NoPortsAvailable, peer, t);
        assert_eq!(
            e.to_string(),
            "upnp: router refused: 728 NoPortMapsAvailable"
        );
    }

    #[test]
    fn port5351_answers_are_classified() {
        let peer: SocketAddr = "10.0.2.1:5351".parse().unwrap();
        let t = Duration::from_millis(1500);
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let e = classify_port5351(
            PCP_NATPMP,
            pcp::Failure::Socket(refused).into(),
            peer,
            t,
            Phase::Map,
        );
        assert_eq!(
            e.to_string(),
            "pcp/natpmp: nothing listens on 10.0.2.1:5351 (port unreachable)"
        );
        assert!(e.is_no_service());
        let e = classify_port5351(
            PCP_NATPMP,
            pcp::Failure::Timeout.into(),
            peer,
            t,
            Phase::Map,
        );
        assert_eq!(
            e.to_string(),
            "pcp/natpmp: no answer from 10.0.2.1:5351 within 1.5s"
        );
        let e = classify_port5351(PCP, pcp::Failure::Timeout.into(), peer, t, Phase::Later);
        assert!(matches!(e, PortMapError::Timeout { protocol: PCP, .. }));
        let e = classify_port5351(
            PCP_NATPMP,
            pcp::Failure::NotAuthorized(0).into(),
            peer,
            t,
            Phase::Map,
        );
        assert_eq!(
            e.to_string(),
            "pcp/natpmp: router refused: 2 Not authorized"
        );
        let e = classify_port5351(
            PCP_NATPMP,
            natpmp::Failure::OutOfResources.into(),
            peer,
            t,
            Phase::Map,
        );
        assert_eq!(e.to_string(), "natpmp: router refused: 4 Out of resources");
    }

    #[test]
    fn excerpts_are_short_and_flat() {
        let long = "<a>\n  x </a>".repeat(100);
        let e = excerpt(&long);
        assert!(e.ends_with("..."));
        assert!(!e.contains('\n'));
        assert!(e.chars().count() <= 163);
        assert_eq!(excerpt(" short\n"), "short");
    }

    #[test]
    fn requests_without_port_or_addresses_are_rejected() {
        assert!(validate(&req()).is_ok());
        let bad = MapRequest {
            internal_port: 0,
            ..req()
        };
        assert!(matches!(
            validate(&bad),
            Err(PortMapError::InvalidRequest(_))
        ));
        let bad = MapRequest {
            local_ip: Ipv4Addr::UNSPECIFIED,
            ..req()
        };
        assert!(validate(&bad).is_err());
    }
}
