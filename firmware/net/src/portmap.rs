//! Port mapping on the home router: UPnP-IGD, PCP and NAT-PMP (placeholder API; the real
//! client lands from the port-mapping branch).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapProtocol {
    Upnp,
    Pcp,
    NatPmp,
}

impl std::fmt::Display for MapProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MapProtocol::Upnp => "upnp",
            MapProtocol::Pcp => "pcp",
            MapProtocol::NatPmp => "natpmp",
        })
    }
}

#[derive(Debug)]
pub struct PortMapping {
    protocol: MapProtocol,
    external: SocketAddr,
    lease: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    #[error("no port-mapping service answered")]
    NoService,
}

#[derive(Debug, Clone)]
pub struct MapRequest {
    pub gateway: Ipv4Addr,
    pub local_ip: Ipv4Addr,
    pub internal_port: u16,
    pub external_port: u16,
    pub lease: Duration,
    pub timeout: Duration,
    pub description: String,
}

impl PortMapping {
    pub fn protocol(&self) -> MapProtocol {
        self.protocol
    }
    pub fn external(&self) -> SocketAddr {
        self.external
    }
    pub fn lease(&self) -> Duration {
        self.lease
    }
    pub async fn renew(&mut self) -> Result<(), PortMapError> {
        Err(PortMapError::NoService)
    }
    pub async fn remove(self) -> Result<(), PortMapError> {
        Ok(())
    }
}

pub async fn map_tcp(_req: &MapRequest) -> Result<PortMapping, PortMapError> {
    Err(PortMapError::NoService)
}
