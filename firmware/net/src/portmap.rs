//! Port mapping on the home router: UPnP-IGD, PCP and NAT-PMP (work in progress).
