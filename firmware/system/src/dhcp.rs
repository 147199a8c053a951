//! A small DHCPv4 client (RFC 2131), sans-IO.
//!
//! [`Client`] is a state machine: feed it the current time, received packets, timer expiries
//! and link changes; it returns [`Action`]s (send this packet, configure this lease, remove the
//! address). It covers the whole lease lifecycle: INIT -> SELECTING -> REQUESTING -> BOUND,
//! RENEWING at T1 (unicast to the server), REBINDING at T2 (broadcast), expiry, NAK, and link
//! loss and return (INIT-REBOOT: ask for the old address again). The I/O side is in
//! [`crate::net`].
//!
//! [`Message`] encodes and decodes the wire format; decoding arbitrary bytes never panics.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Errors decoding a DHCP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhcpError {
    /// Shorter than the fixed header + magic cookie.
    #[error("packet too short ({0} bytes)")]
    TooShort(usize),
    /// Wrong magic cookie.
    #[error("not a DHCP packet (bad magic cookie)")]
    BadMagic,
    /// An option ran past the end of the packet.
    #[error("truncated option {0}")]
    TruncatedOption(u8),
    /// No message type option.
    #[error("no DHCP message type")]
    NoMessageType,
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl MessageType {
    fn code(self) -> u8 {
        match self {
            MessageType::Discover => 1,
            MessageType::Offer => 2,
            MessageType::Request => 3,
            MessageType::Decline => 4,
            MessageType::Ack => 5,
            MessageType::Nak => 6,
            MessageType::Release => 7,
            MessageType::Inform => 8,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }
}

const MAGIC: [u8; 4] = [99, 130, 83, 99];
const HEADER_LEN: usize = 236;
const OPT_PAD: u8 = 0;
const OPT_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_HOSTNAME: u8 = 12;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MSG_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMS: u8 = 55;
const OPT_T1: u8 = 58;
const OPT_T2: u8 = 59;
const OPT_CLIENT_ID: u8 = 61;
const OPT_END: u8 = 255;

/// A decoded (or to-be-encoded) DHCP message: the fields this client uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// 1 = request (client), 2 = reply (server).
    pub op: u8,
    /// Transaction id.
    pub xid: u32,
    /// Ask the server to broadcast its reply.
    pub broadcast: bool,
    /// Client's current address (RENEWING/REBINDING).
    pub ciaddr: Ipv4Addr,
    /// "Your" address (server's offer).
    pub yiaddr: Ipv4Addr,
    /// Client hardware address.
    pub chaddr: [u8; 6],
    /// Message type.
    pub msg_type: MessageType,
    /// Subnet mask.
    pub mask: Option<Ipv4Addr>,
    /// Routers (first = default gateway).
    pub routers: Vec<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Requested address (option 50).
    pub requested_ip: Option<Ipv4Addr>,
    /// Server identifier (option 54).
    pub server_id: Option<Ipv4Addr>,
    /// Lease time in seconds.
    pub lease_secs: Option<u32>,
    /// Renewal time T1 in seconds.
    pub t1_secs: Option<u32>,
    /// Rebinding time T2 in seconds.
    pub t2_secs: Option<u32>,
    /// Host name (option 12).
    pub hostname: Option<String>,
}

impl Message {
    fn request_base(msg_type: MessageType, xid: u32, mac: [u8; 6]) -> Self {
        Message {
            op: 1,
            xid,
            broadcast: true,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: mac,
            msg_type,
            mask: None,
            routers: vec![],
            dns: vec![],
            requested_ip: None,
            server_id: None,
            lease_secs: None,
            t1_secs: None,
            t2_secs: None,
            hostname: None,
        }
    }

    /// Encode to wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0] = self.op;
        b[1] = 1; // Ethernet
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        if self.broadcast {
            b[10] = 0x80;
        }
        b[12..16].copy_from_slice(&self.ciaddr.octets());
        b[16..20].copy_from_slice(&self.yiaddr.octets());
        b[28..34].copy_from_slice(&self.chaddr);
        b.extend_from_slice(&MAGIC);
        let mut opt = |code: u8, data: &[u8]| {
            b.push(code);
            b.push(data.len().min(255) as u8);
            b.extend_from_slice(&data[..data.len().min(255)]);
        };
        opt(OPT_MSG_TYPE, &[self.msg_type.code()]);
        let mut cid = vec![1u8];
        cid.extend_from_slice(&self.chaddr);
        opt(OPT_CLIENT_ID, &cid);
        if let Some(ip) = self.requested_ip {
            opt(OPT_REQUESTED_IP, &ip.octets());
        }
        if let Some(ip) = self.server_id {
            opt(OPT_SERVER_ID, &ip.octets());
        }
        if let Some(m) = self.mask {
            opt(OPT_MASK, &m.octets());
        }
        if !self.routers.is_empty() {
            let v: Vec<u8> = self.routers.iter().flat_map(|r| r.octets()).collect();
            opt(OPT_ROUTER, &v);
        }
        if !self.dns.is_empty() {
            let v: Vec<u8> = self.dns.iter().flat_map(|r| r.octets()).collect();
            opt(OPT_DNS, &v);
        }
        for (code, v) in [
            (OPT_LEASE_TIME, self.lease_secs),
            (OPT_T1, self.t1_secs),
            (OPT_T2, self.t2_secs),
        ] {
            if let Some(v) = v {
                opt(code, &v.to_be_bytes());
            }
        }
        if let Some(h) = &self.hostname {
            opt(OPT_HOSTNAME, h.as_bytes());
        }
        if self.op == 1 {
            opt(
                OPT_PARAMS,
                &[
                    OPT_MASK,
                    OPT_ROUTER,
                    OPT_DNS,
                    OPT_LEASE_TIME,
                    OPT_T1,
                    OPT_T2,
                ],
            );
        }
        b.push(OPT_END);
        // Some servers drop requests shorter than a BOOTP packet (300 bytes).
        if b.len() < 300 {
            b.resize(300, OPT_PAD);
        }
        b
    }

    /// Decode wire bytes. Never panics.
    pub fn decode(b: &[u8]) -> Result<Self, DhcpError> {
        if b.len() < HEADER_LEN + 4 {
            return Err(DhcpError::TooShort(b.len()));
        }
        if b[HEADER_LEN..HEADER_LEN + 4] != MAGIC {
            return Err(DhcpError::BadMagic);
        }
        let ip = |s: &[u8]| Ipv4Addr::new(s[0], s[1], s[2], s[3]);
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&b[28..34]);
        let mut m = Message {
            op: b[0],
            xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            broadcast: b[10] & 0x80 != 0,
            ciaddr: ip(&b[12..16]),
            yiaddr: ip(&b[16..20]),
            chaddr,
            msg_type: MessageType::Discover,
            mask: None,
            routers: vec![],
            dns: vec![],
            requested_ip: None,
            server_id: None,
            lease_secs: None,
            t1_secs: None,
            t2_secs: None,
            hostname: None,
        };
        let mut msg_type = None;
        let mut i = HEADER_LEN + 4;
        while i < b.len() {
            let code = b[i];
            if code == OPT_END {
                break;
            }
            if code == OPT_PAD {
                i += 1;
                continue;
            }
            let len = *b.get(i + 1).ok_or(DhcpError::TruncatedOption(code))? as usize;
            let data = b
                .get(i + 2..i + 2 + len)
                .ok_or(DhcpError::TruncatedOption(code))?;
            let addrs = || data.chunks_exact(4).map(ip).collect::<Vec<_>>();
            let one = || (len == 4).then(|| ip(data));
            let secs =
                || (len == 4).then(|| u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
            match code {
                OPT_MSG_TYPE if len == 1 => msg_type = MessageType::from_code(data[0]),
                OPT_MASK => m.mask = one(),
                OPT_ROUTER => m.routers = addrs(),
                OPT_DNS => m.dns = addrs(),
                OPT_REQUESTED_IP => m.requested_ip = one(),
                OPT_SERVER_ID => m.server_id = one(),
                OPT_LEASE_TIME => m.lease_secs = secs(),
                OPT_T1 => m.t1_secs = secs(),
                OPT_T2 => m.t2_secs = secs(),
                OPT_HOSTNAME => m.hostname = Some(String::from_utf8_lossy(data).into_owned()),
                _ => {}
            }
            i += 2 + len;
        }
        m.msg_type = msg_type.ok_or(DhcpError::NoMessageType)?;
        Ok(m)
    }
}

/// A configured lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our address.
    pub addr: Ipv4Addr,
    /// Subnet mask.
    pub mask: Ipv4Addr,
    /// Default gateway (the router).
    pub router: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// The server that granted it.
    pub server: Ipv4Addr,
    /// Lease duration.
    pub lease: Duration,
    /// When it was granted (or last renewed).
    pub granted_at: Instant,
    /// Renew at this time (T1).
    pub t1: Instant,
    /// Rebind at this time (T2).
    pub t2: Instant,
    /// Expires at this time.
    pub expires: Instant,
}

impl Lease {
    /// Prefix length of the mask.
    pub fn prefix_len(&self) -> u32 {
        u32::from(self.mask).leading_ones()
    }
}

/// Where to send a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// 255.255.255.255:67 on the interface.
    Broadcast,
    /// The server's address, port 67 (renewing).
    Unicast(Ipv4Addr),
}

/// What the I/O layer must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message.
    Send(Message, Dest),
    /// Configure the interface with this lease (address, mask, default route).
    Configure(Lease),
    /// Remove the address and default route of this lease.
    Deconfigure(Lease),
}

/// Client states (RFC 2131 figure 5, plus link down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No lease; about to discover.
    Init,
    /// DISCOVER sent, waiting for offers.
    Selecting,
    /// REQUEST sent for an offer.
    Requesting,
    /// Link returned with a still-valid lease; REQUEST for it sent.
    Rebooting,
    /// Lease configured.
    Bound,
    /// Past T1: unicast REQUEST to the server.
    Renewing,
    /// Past T2: broadcast REQUEST to any server.
    Rebinding,
    /// No carrier.
    LinkDown,
}

/// The DHCP client state machine.
#[derive(Debug)]
pub struct Client {
    mac: [u8; 6],
    hostname: Option<String>,
    state: State,
    xid: u32,
    rng: u64,
    lease: Option<Lease>,
    offer: Option<Message>,
    deadline: Option<Instant>,
    tries: u32,
}

/// First retransmission interval while selecting (doubles up to [`MAX_RETRY`]).
pub const FIRST_RETRY: Duration = Duration::from_secs(2);
/// Cap of the retransmission interval.
pub const MAX_RETRY: Duration = Duration::from_secs(32);
/// Requests (REQUESTING/REBOOTING) tried this many times before starting over.
pub const REQUEST_TRIES: u32 = 4;
/// Minimum interval between renew/rebind retransmissions (RFC 2131: 60 s; we use less).
pub const MIN_RENEW_RETRY: Duration = Duration::from_secs(10);

impl Client {
    /// A client for interface hardware address `mac`; `seed` varies the transaction ids.
    pub fn new(mac: [u8; 6], hostname: Option<String>, seed: u64) -> Self {
        Client {
            mac,
            hostname,
            state: State::LinkDown,
            xid: 0,
            rng: seed | 1,
            lease: None,
            offer: None,
            deadline: None,
            tries: 0,
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The configured lease, if any.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// When [`Client::on_timeout`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn next_xid(&mut self) -> u32 {
        // xorshift64: transaction ids only need to differ between exchanges.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.xid = (self.rng >> 16) as u32;
        self.xid
    }

    fn msg(&self, t: MessageType) -> Message {
        let mut m = Message::request_base(t, self.xid, self.mac);
        m.hostname = self.hostname.clone();
        m
    }

    fn retry_interval(&self) -> Duration {
        let shift = self.tries.saturating_sub(1).min(5);
        (FIRST_RETRY * (1u32 << shift)).min(MAX_RETRY)
    }

    fn discover(&mut self, now: Instant) -> Vec<Action> {
        self.state = State::Selecting;
        self.offer = None;
        self.next_xid();
        self.tries = 1;
        self.deadline = Some(now + self.retry_interval());
        vec![Action::Send(
            self.msg(MessageType::Discover),
            Dest::Broadcast,
        )]
    }

    fn drop_lease(&mut self) -> Vec<Action> {
        self.lease
            .take()
            .map(Action::Deconfigure)
            .into_iter()
            .collect()
    }

    /// Carrier appeared. With a still-valid lease, ask for it again (INIT-REBOOT); else discover.
    pub fn link_up(&mut self, now: Instant) -> Vec<Action> {
        match &self.lease {
            Some(l) if l.expires > now => {
                let addr = l.addr;
                self.state = State::Rebooting;
                self.next_xid();
                self.tries = 1;
                self.deadline = Some(now + self.retry_interval());
                let mut m = self.msg(MessageType::Request);
                m.requested_ip = Some(addr);
                vec![Action::Send(m, Dest::Broadcast)]
            }
            _ => {
                let mut a = self.drop_lease();
                a.extend(self.discover(now));
                a
            }
        }
    }

    /// Carrier lost. The lease (and address) are kept until they expire or the link returns.
    pub fn link_down(&mut self, _now: Instant) -> Vec<Action> {
        self.state = State::LinkDown;
        self.deadline = self.lease.as_ref().map(|l| l.expires);
        vec![]
    }

    /// A packet arrived on port 68.
    pub fn on_packet(&mut self, m: &Message, now: Instant) -> Vec<Action> {
        if m.op != 2 || m.xid != self.xid || m.chaddr != self.mac {
            return vec![];
        }
        match (self.state, m.msg_type) {
            (State::Selecting, MessageType::Offer) => {
                let Some(server) = m.server_id else {
                    return vec![];
                };
                self.state = State::Requesting;
                self.tries = 1;
                self.deadline = Some(now + self.retry_interval());
                let mut r = self.msg(MessageType::Request);
                r.requested_ip = Some(m.yiaddr);
                r.server_id = Some(server);
                self.offer = Some(m.clone());
                vec![Action::Send(r, Dest::Broadcast)]
            }
            (
                State::Requesting | State::Rebooting | State::Renewing | State::Rebinding,
                MessageType::Ack | MessageType::Nak,
            ) if !self.is_expected_answer(m) => vec![],
            (
                State::Requesting | State::Rebooting | State::Renewing | State::Rebinding,
                MessageType::Ack,
            ) => self.bind(m, now),
            (
                State::Requesting | State::Rebooting | State::Renewing | State::Rebinding,
                MessageType::Nak,
            ) => {
                let mut a = self.drop_lease();
                a.extend(self.discover(now));
                a
            }
            _ => vec![],
        }
    }

    /// May this ACK/NAK be acted on? In REQUESTING only the server whose offer we chose may
    /// answer (its server identifier), and an ACK must grant the address it offered; in
    /// RENEWING (a unicast to our lease's server) only that server. REBOOTING and REBINDING
    /// are broadcasts any server may answer (RFC 2131 4.3.2). The xid and hardware address
    /// were checked before.
    fn is_expected_answer(&self, m: &Message) -> bool {
        match self.state {
            State::Requesting => self.offer.as_ref().is_some_and(|o| {
                o.server_id.is_some()
                    && m.server_id == o.server_id
                    && (m.msg_type != MessageType::Ack || m.yiaddr == o.yiaddr)
            }),
            State::Renewing => match self.lease.as_ref().map(|l| l.server) {
                Some(s) if s != Ipv4Addr::BROADCAST => m.server_id == Some(s),
                _ => true,
            },
            _ => true,
        }
    }

    fn bind(&mut self, m: &Message, now: Instant) -> Vec<Action> {
        let secs = m.lease_secs.unwrap_or(3600).max(10);
        let lease_d = Duration::from_secs(u64::from(secs));
        let t1 = m
            .t1_secs
            .map(|s| Duration::from_secs(u64::from(s)))
            .filter(|d| *d < lease_d)
            .unwrap_or(lease_d / 2);
        let t2 = m
            .t2_secs
            .map(|s| Duration::from_secs(u64::from(s)))
            .filter(|d| *d < lease_d && *d > t1)
            .unwrap_or(lease_d * 7 / 8);
        let server = m
            .server_id
            .or_else(|| self.lease.as_ref().map(|l| l.server))
            .unwrap_or(Ipv4Addr::BROADCAST);
        let addr = if m.yiaddr.is_unspecified() {
            m.ciaddr
        } else {
            m.yiaddr
        };
        let mask = m.mask.unwrap_or_else(|| default_mask(addr));
        let lease = Lease {
            addr,
            mask,
            router: m.routers.first().copied(),
            dns: m.dns.clone(),
            server,
            lease: lease_d,
            granted_at: now,
            t1: now + t1,
            t2: now + t2,
            expires: now + lease_d,
        };
        let mut actions = vec![];
        // Reconfigure only when something the kernel holds changed; a plain renewal that
        // keeps the address needs no interface change.
        let same = self.lease.as_ref().is_some_and(|old| {
            old.addr == lease.addr && old.mask == lease.mask && old.router == lease.router
        });
        if let Some(old) = self.lease.take() {
            if !same {
                actions.push(Action::Deconfigure(old));
            }
        }
        self.state = State::Bound;
        self.deadline = Some(lease.t1);
        self.tries = 0;
        self.offer = None;
        if !same {
            actions.push(Action::Configure(lease.clone()));
        }
        self.lease = Some(lease);
        actions
    }

    /// The deadline passed: retransmit, move to RENEWING/REBINDING, or expire the lease.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        match self.deadline {
            Some(d) if d <= now => {}
            _ => return vec![],
        }
        if let Some(l) = &self.lease {
            if l.expires <= now {
                let mut a = self.drop_lease();
                if self.state == State::LinkDown {
                    self.deadline = None;
                } else {
                    a.extend(self.discover(now));
                }
                return a;
            }
        }
        match self.state {
            State::Init => self.discover(now),
            State::Selecting => {
                self.tries += 1;
                self.deadline = Some(now + self.retry_interval());
                vec![Action::Send(
                    self.msg(MessageType::Discover),
                    Dest::Broadcast,
                )]
            }
            State::Requesting | State::Rebooting => {
                if self.tries >= REQUEST_TRIES {
                    let mut a = if self.state == State::Rebooting {
                        self.drop_lease()
                    } else {
                        vec![]
                    };
                    a.extend(self.discover(now));
                    return a;
                }
                self.tries += 1;
                self.deadline = Some(now + self.retry_interval());
                let mut r = self.msg(MessageType::Request);
                if self.state == State::Requesting {
                    if let Some(o) = &self.offer {
                        r.requested_ip = Some(o.yiaddr);
                        r.server_id = o.server_id;
                    }
                } else {
                    r.requested_ip = self.lease.as_ref().map(|l| l.addr);
                }
                vec![Action::Send(r, Dest::Broadcast)]
            }
            State::Bound | State::Renewing | State::Rebinding => {
                let Some(l) = self.lease.clone() else {
                    return self.discover(now);
                };
                let rebinding = now >= l.t2;
                if self.state == State::Bound || (rebinding && self.state == State::Renewing) {
                    self.next_xid();
                }
                self.state = if rebinding {
                    State::Rebinding
                } else {
                    State::Renewing
                };
                let limit = if rebinding { l.expires } else { l.t2 };
                let half = limit.saturating_duration_since(now) / 2;
                self.deadline = Some((now + half.max(MIN_RENEW_RETRY)).min(limit));
                let mut r = self.msg(MessageType::Request);
                r.ciaddr = l.addr;
                r.broadcast = false;
                let dest = if rebinding || l.server == Ipv4Addr::BROADCAST {
                    Dest::Broadcast
                } else {
                    Dest::Unicast(l.server)
                };
                vec![Action::Send(r, dest)]
            }
            State::LinkDown => {
                self.deadline = None;
                vec![]
            }
        }
    }
}

fn default_mask(a: Ipv4Addr) -> Ipv4Addr {
    match a.octets()[0] {
        0..=127 => Ipv4Addr::new(255, 0, 0, 0),
        128..=191 => Ipv4Addr::new(255, 255, 0, 0),
        _ => Ipv4Addr::new(255, 255, 255, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn reply(xid: u32, t: MessageType, lease: u32) -> Message {
        let mut m = Message::request_base(t, xid, MAC);
        m.op = 2;
        m.yiaddr = ADDR;
        m.server_id = Some(SERVER);
        m.mask = Some(Ipv4Addr::new(255, 255, 255, 0));
        m.routers = vec![SERVER];
        m.dns = vec![Ipv4Addr::new(10, 0, 2, 3)];
        m.lease_secs = Some(lease);
        // Through the wire format, as the I/O layer would.
        Message::decode(&m.encode()).unwrap()
    }

    fn sent(a: &[Action]) -> Vec<(MessageType, Dest)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Send(m, d) => Some((m.msg_type, *d)),
                _ => None,
            })
            .collect()
    }

    fn bound(now: Instant, lease: u32) -> Client {
        let mut c = Client::new(MAC, Some("borg-test".into()), 7);
        let a = c.link_up(now);
        assert_eq!(sent(&a), vec![(MessageType::Discover, Dest::Broadcast)]);
        let a = c.on_packet(&reply(c.xid, MessageType::Offer, lease), now);
        assert_eq!(sent(&a), vec![(MessageType::Request, Dest::Broadcast)]);
        let Action::Send(req, _) = &a[0] else {
            panic!()
        };
        assert_eq!(req.requested_ip, Some(ADDR));
        assert_eq!(req.server_id, Some(SERVER));
        let a = c.on_packet(&reply(c.xid, MessageType::Ack, lease), now);
        assert!(
            matches!(&a[..], [Action::Configure(l)] if l.addr == ADDR && l.router == Some(SERVER) && l.prefix_len() == 24)
        );
        assert_eq!(c.state(), State::Bound);
        c
    }

    #[test]
    fn acquires_a_lease() {
        let now = Instant::now();
        let c = bound(now, 3600);
        let l = c.lease().unwrap();
        assert_eq!(l.t1, now + Duration::from_secs(1800));
        assert_eq!(l.t2, now + Duration::from_secs(3150));
        assert_eq!(c.deadline(), Some(l.t1));
    }

    #[test]
    fn ignores_foreign_packets() {
        let now = Instant::now();
        let mut c = Client::new(MAC, None, 1);
        c.link_up(now);
        let mut other = reply(c.xid.wrapping_add(1), MessageType::Offer, 60);
        assert!(c.on_packet(&other, now).is_empty());
        other.xid = c.xid;
        other.chaddr = [9; 6];
        assert!(c.on_packet(&other, now).is_empty());
        assert_eq!(c.state(), State::Selecting);
    }

    const ROGUE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 66);

    /// A client in REQUESTING for SERVER's offer.
    fn requesting(now: Instant) -> Client {
        let mut c = Client::new(MAC, None, 11);
        c.link_up(now);
        c.on_packet(&reply(c.xid, MessageType::Offer, 600), now);
        assert_eq!(c.state(), State::Requesting);
        c
    }

    #[test]
    fn ack_only_from_the_chosen_server() {
        let now = Instant::now();
        let mut c = requesting(now);
        // A rogue server's ACK (same xid and MAC: it saw our broadcast) is ignored ...
        let mut rogue = reply(c.xid, MessageType::Ack, 600);
        rogue.server_id = Some(ROGUE);
        rogue.yiaddr = Ipv4Addr::new(10, 0, 2, 99);
        rogue.routers = vec![ROGUE];
        assert!(c.on_packet(&rogue, now).is_empty());
        // ... as is one without a server identifier ...
        rogue.server_id = None;
        assert!(c.on_packet(&rogue, now).is_empty());
        // ... and one that claims to be our server but grants another address.
        let mut odd = reply(c.xid, MessageType::Ack, 600);
        odd.yiaddr = Ipv4Addr::new(10, 0, 2, 99);
        assert!(c.on_packet(&odd, now).is_empty());
        assert_eq!(c.state(), State::Requesting);
        assert!(c.lease().is_none());
        // A rogue NAK does not make us start over either.
        let mut nak = reply(c.xid, MessageType::Nak, 0);
        nak.server_id = Some(ROGUE);
        assert!(c.on_packet(&nak, now).is_empty());
        assert_eq!(c.state(), State::Requesting);
        // The chosen server's ACK binds.
        let a = c.on_packet(&reply(c.xid, MessageType::Ack, 600), now);
        assert!(matches!(&a[..], [Action::Configure(l)] if l.addr == ADDR && l.server == SERVER));
    }

    #[test]
    fn ack_with_another_xid_is_ignored() {
        let now = Instant::now();
        let mut c = requesting(now);
        let a = reply(c.xid ^ 1, MessageType::Ack, 600);
        assert!(c.on_packet(&a, now).is_empty());
        assert_eq!(c.state(), State::Requesting);
    }

    #[test]
    fn renewal_ack_only_from_the_lease_server() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        let t1 = c.lease().unwrap().t1;
        c.on_timeout(t1);
        assert_eq!(c.state(), State::Renewing);
        let mut rogue = reply(c.xid, MessageType::Ack, 1000);
        rogue.server_id = Some(ROGUE);
        rogue.yiaddr = Ipv4Addr::new(10, 0, 2, 99);
        assert!(c.on_packet(&rogue, t1).is_empty());
        assert_eq!(c.state(), State::Renewing);
        assert_eq!(c.lease().unwrap().addr, ADDR);
    }

    #[test]
    fn different_seeds_give_different_xids() {
        let now = Instant::now();
        let xids: std::collections::BTreeSet<u32> = (0..64u64)
            .map(|seed| {
                let mut c = Client::new(MAC, None, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                c.link_up(now);
                c.xid
            })
            .collect();
        assert!(xids.len() >= 60, "{} distinct of 64", xids.len());
    }

    #[test]
    fn discover_backs_off() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 3);
        c.link_up(t0);
        let mut t = t0;
        let mut gaps = vec![];
        for _ in 0..7 {
            let d = c.deadline().unwrap();
            gaps.push((d - t).as_secs());
            t = d;
            assert_eq!(
                sent(&c.on_timeout(t)),
                vec![(MessageType::Discover, Dest::Broadcast)]
            );
        }
        assert_eq!(gaps, vec![2, 4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn renews_by_unicast_then_rebinds_by_broadcast_then_expires() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        let l = c.lease().unwrap().clone();
        // Early timeouts do nothing.
        assert!(c.on_timeout(t0 + Duration::from_secs(1)).is_empty());
        let a = c.on_timeout(l.t1);
        assert_eq!(
            sent(&a),
            vec![(MessageType::Request, Dest::Unicast(SERVER))]
        );
        let Action::Send(req, _) = &a[0] else {
            panic!()
        };
        assert_eq!(req.ciaddr, ADDR);
        assert_eq!(req.requested_ip, None);
        assert_eq!(c.state(), State::Renewing);
        // No answer: retransmit until T2, then rebind by broadcast.
        let mut n = 0;
        while c.deadline().unwrap() < l.t2 {
            let d = c.deadline().unwrap();
            assert_eq!(
                sent(&c.on_timeout(d)),
                vec![(MessageType::Request, Dest::Unicast(SERVER))]
            );
            n += 1;
            assert!(n < 20);
        }
        let a = c.on_timeout(l.t2);
        assert_eq!(sent(&a), vec![(MessageType::Request, Dest::Broadcast)]);
        assert_eq!(c.state(), State::Rebinding);
        while c.deadline().unwrap() < l.expires {
            let d = c.deadline().unwrap();
            c.on_timeout(d);
        }
        let a = c.on_timeout(l.expires);
        assert!(matches!(a[0], Action::Deconfigure(_)));
        assert_eq!(
            sent(&a[1..]),
            vec![(MessageType::Discover, Dest::Broadcast)]
        );
        assert_eq!(c.state(), State::Selecting);
        assert!(c.lease().is_none());
    }

    #[test]
    fn renewal_ack_extends_without_reconfiguring() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        let t1 = c.lease().unwrap().t1;
        c.on_timeout(t1);
        let a = c.on_packet(&reply(c.xid, MessageType::Ack, 1000), t1);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(c.state(), State::Bound);
        assert_eq!(c.lease().unwrap().expires, t1 + Duration::from_secs(1000));
    }

    #[test]
    fn rebind_ack_from_another_server_with_new_address_reconfigures() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        let t2 = c.lease().unwrap().t2;
        c.on_timeout(c.lease().unwrap().t1);
        c.on_timeout(t2);
        let mut ack = reply(c.xid, MessageType::Ack, 1000);
        ack.yiaddr = Ipv4Addr::new(10, 0, 2, 16);
        ack.server_id = Some(Ipv4Addr::new(10, 0, 2, 4));
        let a = c.on_packet(&ack, t2);
        assert!(
            matches!(&a[..], [Action::Deconfigure(o), Action::Configure(n)] if o.addr == ADDR && n.addr == Ipv4Addr::new(10, 0, 2, 16))
        );
        assert_eq!(c.lease().unwrap().server, Ipv4Addr::new(10, 0, 2, 4));
    }

    #[test]
    fn nak_starts_over() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        let t1 = c.lease().unwrap().t1;
        c.on_timeout(t1);
        let a = c.on_packet(&reply(c.xid, MessageType::Nak, 0), t1);
        assert!(matches!(a[0], Action::Deconfigure(_)));
        assert_eq!(
            sent(&a[1..]),
            vec![(MessageType::Discover, Dest::Broadcast)]
        );
    }

    #[test]
    fn link_loss_and_return_reuses_the_lease() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        assert!(c.link_down(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(c.state(), State::LinkDown);
        assert!(c.lease().is_some(), "address kept while the cable is out");
        let back = t0 + Duration::from_secs(60);
        let a = c.link_up(back);
        assert_eq!(sent(&a), vec![(MessageType::Request, Dest::Broadcast)]);
        let Action::Send(req, _) = &a[0] else {
            panic!()
        };
        assert_eq!(req.requested_ip, Some(ADDR));
        assert_eq!(req.server_id, None);
        assert_eq!(c.state(), State::Rebooting);
        let a = c.on_packet(&reply(c.xid, MessageType::Ack, 1000), back);
        assert!(a.is_empty(), "same address: nothing to reconfigure");
        assert_eq!(c.state(), State::Bound);
    }

    #[test]
    fn link_return_after_expiry_discovers() {
        let t0 = Instant::now();
        let mut c = bound(t0, 100);
        c.link_down(t0);
        let exp = c.lease().unwrap().expires;
        assert_eq!(c.deadline(), Some(exp));
        let a = c.on_timeout(exp);
        assert!(matches!(&a[..], [Action::Deconfigure(_)]));
        let a = c.link_up(exp + Duration::from_secs(1));
        assert_eq!(sent(&a), vec![(MessageType::Discover, Dest::Broadcast)]);
    }

    #[test]
    fn reboot_without_answer_falls_back_to_discover() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        c.link_down(t0);
        c.link_up(t0);
        let mut last = vec![];
        for _ in 0..REQUEST_TRIES {
            let d = c.deadline().unwrap();
            last = c.on_timeout(d);
        }
        assert!(matches!(last[0], Action::Deconfigure(_)));
        assert_eq!(c.state(), State::Selecting);
    }

    #[test]
    fn encode_decode_roundtrip() {
        let m = reply(0xdeadbeef, MessageType::Ack, 86400);
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        assert_eq!(Message::decode(&[0; 10]), Err(DhcpError::TooShort(10)));
        let mut b = m.encode();
        b[HEADER_LEN] = 0;
        assert_eq!(Message::decode(&b), Err(DhcpError::BadMagic));
    }

    proptest! {
        /// In REQUESTING, a crafted ACK binds exactly when it carries our xid, our MAC, the
        /// chosen server's identifier and the offered address; anything else changes nothing.
        #[test]
        fn only_the_chosen_servers_ack_binds(
            xid_flip in prop_oneof![Just(0u32), any::<u32>()],
            server in prop_oneof![Just(Some(SERVER)), Just(None), any::<[u8; 4]>().prop_map(|o| Some(Ipv4Addr::from(o)))],
            addr in prop_oneof![Just(ADDR), any::<[u8; 4]>().prop_map(Ipv4Addr::from)],
            nak in any::<bool>(),
        ) {
            let now = Instant::now();
            let mut c = requesting(now);
            let kind = if nak { MessageType::Nak } else { MessageType::Ack };
            let mut m = reply(c.xid ^ xid_flip, kind, 600);
            m.server_id = server;
            m.yiaddr = addr;
            let m = Message::decode(&m.encode()).unwrap();
            let a = c.on_packet(&m, now);
            let ours = xid_flip == 0 && server == Some(SERVER);
            if ours && nak {
                prop_assert_eq!(c.state(), State::Selecting);
            } else if ours && addr == ADDR {
                prop_assert_eq!(c.state(), State::Bound);
                prop_assert!(c.lease().is_some_and(|l| l.addr == ADDR && l.server == SERVER));
            } else {
                prop_assert!(a.is_empty(), "{:?}", a);
                prop_assert_eq!(c.state(), State::Requesting);
                prop_assert!(c.lease().is_none());
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_after_magic(opts in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = vec![0u8; HEADER_LEN];
            b.extend_from_slice(&MAGIC);
            b.extend_from_slice(&opts);
            let _ = Message::decode(&b);
        }
    }
}
