//! Authenticated node-to-node connections: TCP + TLS 1.3 ([`crate::tls`]) + frames
//! ([`crate::frame`]).
//!
//! [`connect`] dials a peer whose key we expect and fails unless the server proves it holds that
//! key. [`Listener::accept`] yields connections from any node together with the key the client
//! proved it holds. TLS handshakes on the listener run in their own tasks, bounded in number and
//! time, so a slow or hostile client delays nobody else; a failed handshake is returned as an
//! error for that connection only and the listener keeps working.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use borg_proto::identity::PublicKey;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::frame::{write_frame, FrameError, FrameReader};
use crate::guard::{ConnLimiter, ConnSlot, Door, NetCounters, Refusal, Trusted};
use crate::tls::{peer_key, TlsError, TlsIdentity, ALPN_PEER, ALPN_PROBE};

/// How long an incoming connection may take to finish its TLS handshake (or relay line). A
/// handshake is a few round trips and about 2 ms of CPU on a Pi; 5 s covers a slow mobile
/// link several times over while a silent socket holds its slot for little time.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Incoming handshakes in progress at once from untrusted sources; more are refused at accept
/// (closed at once) rather than left in the kernel backlog, where they would queue up in
/// front of a child that reconnects.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// Handshakes in progress at once from one source IP: one address cannot take more than an
/// eighth of [`MAX_PENDING_HANDSHAKES`]. A relay or a NAT shares one IP among several
/// honest nodes, and 8 lets that many reconnect at the same instant.
pub const MAX_HANDSHAKES_PER_IP: usize = 8;

/// Handshake slots above [`MAX_PENDING_HANDSHAKES`] kept for addresses of tree neighbours
/// ([`crate::guard::Trusted`]), so children and parents reconnect while a flood is on. 16 is
/// more than a node's neighbours reconnecting at once (k children + parent + grandparent).
pub const RESERVED_HANDSHAKES: usize = 16;

/// First back-off after a failed TCP `accept` (typically EMFILE); doubled per failure in a
/// row up to [`ACCEPT_BACKOFF_MAX`], so an fd shortage does not become a busy loop.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest back-off after failed accepts: short enough that service resumes within a second
/// of fds being free again.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

type PeerStream = TlsStream<TcpStream>;

/// Errors from establishing connections.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("accept: {0}")]
    Accept(io::Error),
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: io::Error },
    #[error("{addr}: no authenticated connection within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("{addr}: peer did not negotiate the BorgIOS peer protocol (ALPN)")]
    Alpn { addr: SocketAddr },
    #[error("{addr}: {source}")]
    PeerKey { addr: SocketAddr, source: TlsError },
    #[error("handshake task ended abnormally: {0}")]
    Task(String),
    #[error("{addr}: handshake slot given to a newcomer from a lighter address")]
    Evicted { addr: SocketAddr },
}

impl TransportError {
    /// The TLS-level reason of a failed handshake, if there is one (e.g.
    /// `InvalidCertificate(..)` for a pin mismatch seen during the handshake).
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            Self::Handshake { source, .. } => source.get_ref()?.downcast_ref::<rustls::Error>(),
            _ => None,
        }
    }
}

/// An authenticated connection to a peer node, carrying frames.
#[derive(Debug)]
pub struct PeerConn {
    reader: PeerReader,
    writer: PeerWriter,
    /// The cell whose tree this link belongs to (negotiated by ALPN, [`crate::tls::alpn_of`]).
    cell: &'static str,
}

/// Receiving half of a [`PeerConn`].
#[derive(Debug)]
pub struct PeerReader {
    frames: FrameReader<ReadHalf<PeerStream>>,
    peer: PublicKey,
    remote: SocketAddr,
    /// A connection slot held as long as this half lives (see [`PeerReader::hold`]).
    slot: Option<ConnSlot>,
}

/// Sending half of a [`PeerConn`].
#[derive(Debug)]
pub struct PeerWriter {
    stream: WriteHalf<PeerStream>,
    peer: PublicKey,
    remote: SocketAddr,
}

impl PeerConn {
    fn new(stream: PeerStream, peer: PublicKey, remote: SocketAddr) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self {
            cell: borg_proto::dna::PEER_TREE_NET.name,
            reader: PeerReader {
                frames: FrameReader::new(r),
                peer,
                remote,
                slot: None,
            },
            writer: PeerWriter {
                stream: w,
                peer,
                remote,
            },
        }
    }

    /// The peer's authenticated key.
    pub fn peer_key(&self) -> PublicKey {
        self.reader.peer
    }

    /// The cell whose tree this link belongs to.
    pub fn cell(&self) -> &'static str {
        self.cell
    }

    fn for_cell(mut self, cell: &'static str) -> Self {
        self.cell = cell;
        self
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.reader.remote
    }

    /// Separate halves, e.g. for a reader task and a writer task.
    pub fn into_split(self) -> (PeerReader, PeerWriter) {
        (self.reader, self.writer)
    }

    /// See [`PeerWriter::send`].
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        self.writer.send(frame).await
    }

    /// See [`PeerReader::recv`].
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        self.reader.recv().await
    }
}

impl PeerReader {
    /// The next frame; `Ok(None)` when the peer closed the connection cleanly. Cancel-safe.
    /// After any error the connection is finished: drop both halves.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        self.frames.read_frame().await
    }

    pub fn peer_key(&self) -> PublicKey {
        self.peer
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// Whether a frame has begun to arrive and is not complete yet.
    pub fn frame_in_progress(&self) -> bool {
        self.frames.in_progress()
    }

    /// Keep `slot` taken until this reader is dropped (the link task ends).
    pub fn hold(&mut self, slot: ConnSlot) {
        self.slot = Some(slot);
    }

    /// The slot this reader holds, if any (the caller keeps it alive and watches it).
    pub fn take_slot(&mut self) -> Option<ConnSlot> {
        self.slot.take()
    }
}

impl PeerWriter {
    /// Send one frame and flush it. Not cancel-safe (a cancelled send leaves half a frame on the
    /// wire). A frame over [`crate::frame::MAX_FRAME`] is refused without sending anything.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        write_frame(&mut self.stream, frame).await
    }

    /// Close the sending direction (TLS close_notify, then TCP FIN); the peer's reader sees a
    /// clean end of stream.
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        tokio::io::AsyncWriteExt::shutdown(&mut self.stream).await?;
        Ok(())
    }

    pub fn peer_key(&self) -> PublicKey {
        self.peer
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
}

/// Dial `addr` and authenticate it as `expected`; `timeout` bounds TCP connect and handshake
/// together.
pub async fn connect(
    addr: SocketAddr,
    expected: PublicKey,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<PeerConn, TransportError> {
    dial_pinned(addr, None, expected, identity, timeout).await
}

/// [`connect`] from the fixed local address `bind` (e.g. one loopback IP of several, as a
/// test's outsider uses to look like one source).
pub async fn connect_from(
    addr: SocketAddr,
    bind: SocketAddr,
    expected: PublicKey,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<PeerConn, TransportError> {
    dial_pinned(addr, Some(bind), expected, identity, timeout).await
}

async fn dial_pinned(
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    expected: PublicKey,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<PeerConn, TransportError> {
    let connector = TlsConnector::from(identity.client_config(expected));
    bounded(addr, timeout, async {
        let tcp = tcp_connect(addr, bind).await?;
        tls_client(tcp, addr, Some(expected), connector, ALPN_PEER).await
    })
    .await
}

/// Dial `addr` for the tree of `cell` (its ALPN), pinned to `expected` or, with `None`, as a
/// first contact (see [`connect_unpinned`]). `addr` may be the node's own port of that cell
/// or any of its tree ports: the listener hands the link to the cell the ALPN names.
pub async fn connect_cell(
    addr: SocketAddr,
    expected: Option<PublicKey>,
    cell: &'static str,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<PeerConn, TransportError> {
    let connector = TlsConnector::from(identity.cell_client_config(expected, cell));
    let alpn = crate::tls::alpn_of(cell);
    bounded(addr, timeout, async {
        let tcp = tcp_connect(addr, None).await?;
        let conn = tls_client(tcp, addr, expected, connector, &alpn).await?;
        Ok(conn.for_cell(cell))
    })
    .await
}

/// [`connect_via`] for the tree of `cell`.
pub async fn connect_via_cell(
    relay: SocketAddr,
    target: PublicKey,
    cell: &'static str,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<PeerConn, TransportError> {
    let connector = TlsConnector::from(identity.cell_client_config(Some(target), cell));
    let alpn = crate::tls::alpn_of(cell);
    bounded(relay, timeout, async {
        let line = format!("{RELAY_CONNECT} {}\n", target.to_b64());
        let tcp = tcp_connect_with_line(relay, &line).await?;
        let conn = tls_client(tcp, relay, Some(target), connector, &alpn).await?;
        Ok(conn.for_cell(cell))
    })
    .await
}

/// Dial `addr` for a first contact, when only its address is known (`--join IP`): the
/// server may present any node key, which is returned in the connection. Everything after
/// the handshake is authenticated by that key (signed envelopes), and from then on the peer is
/// dialed pinned.
pub async fn connect_unpinned(
    addr: SocketAddr,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<PeerConn, TransportError> {
    let connector = TlsConnector::from(identity.client_config_unpinned());
    bounded(addr, timeout, async {
        let tcp = tcp_connect(addr, None).await?;
        tls_client(tcp, addr, None, connector, ALPN_PEER).await
    })
    .await
}

/// Dial the node `target` through the relay at `relay`: the relay reads one line naming the
/// target, then only splices bytes. TLS runs end to end with `target` (pinned), so the relay
/// can neither read the traffic nor pose as the target.
pub async fn connect_via(
    relay: SocketAddr,
    target: PublicKey,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<PeerConn, TransportError> {
    let connector = TlsConnector::from(identity.client_config(target));
    bounded(relay, timeout, async {
        let line = format!("{RELAY_CONNECT} {}\n", target.to_b64());
        let tcp = tcp_connect_with_line(relay, &line).await?;
        tls_client(tcp, relay, Some(target), connector, ALPN_PEER).await
    })
    .await
}

/// Answer a relay's `relay.open`: connect to the relay, hand it `token`, then act as the TLS
/// server for whoever is waiting on the other side (any node; its key is returned).
pub async fn accept_via(
    relay: SocketAddr,
    token: &str,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<PeerConn, TransportError> {
    let acceptor = TlsAcceptor::from(identity.server_config());
    bounded(relay, timeout, async {
        let tcp = tcp_connect_with_line(relay, &format!("{RELAY_ACCEPT} {token}\n")).await?;
        match tls_server(acceptor, tcp, relay).await? {
            (conn, Alpn::Peer(cell)) => Ok(conn.for_cell(cell)),
            (_, Alpn::Probe) => Err(TransportError::Alpn { addr: relay }),
        }
    })
    .await
}

/// Open a probe connection (ALPN `borg-probe/1`) to `addr`, optionally from the fixed local
/// address `bind` (so that several observers report on the same source port), pinned to
/// `expected` if given. Returns the connection and the local address it used.
pub async fn connect_probe(
    addr: SocketAddr,
    expected: Option<PublicKey>,
    bind: Option<SocketAddr>,
    identity: &TlsIdentity,
    timeout: Duration,
) -> Result<(PeerConn, SocketAddr), TransportError> {
    let connector = TlsConnector::from(identity.probe_client_config(expected));
    bounded(addr, timeout, async {
        let tcp = tcp_connect(addr, bind).await?;
        let local = tcp
            .local_addr()
            .map_err(|source| TransportError::Connect { addr, source })?;
        let conn = tls_client(tcp, addr, expected, connector, ALPN_PROBE).await?;
        Ok((conn, local))
    })
    .await
}

/// Connect and send one relay request line before anything else.
async fn tcp_connect_with_line(addr: SocketAddr, line: &str) -> Result<TcpStream, TransportError> {
    let mut tcp = tcp_connect(addr, None).await?;
    tcp.write_all(line.as_bytes())
        .await
        .map_err(|source| TransportError::Connect { addr, source })?;
    Ok(tcp)
}

async fn bounded<T>(
    addr: SocketAddr,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| TransportError::Timeout {
            addr,
            after: timeout,
        })?
}

async fn tcp_connect(
    addr: SocketAddr,
    bind: Option<SocketAddr>,
) -> Result<TcpStream, TransportError> {
    let err = |source| TransportError::Connect { addr, source };
    let tcp = match bind {
        None => TcpStream::connect(addr).await.map_err(err)?,
        Some(local) => {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(err)?;
            // Several probes share the source port, one destination each.
            socket.set_reuseaddr(true).map_err(err)?;
            socket.set_reuseport(true).map_err(err)?;
            socket.bind(local).map_err(err)?;
            socket.connect(addr).await.map_err(err)?
        }
    };
    tcp.set_nodelay(true).map_err(err)?;
    prefer_bbr(&tcp);
    Ok(tcp)
}

/// Ask for BBR congestion control on `tcp` where the kernel has it (best effort: the
/// kernel's default stays otherwise). Loss-based control (cubic) reads a home link's random
/// loss as congestion: at 1% loss and 80 ms RTT one cubic flow gets a few Mbit/s of a
/// 100 Mbit/s link, BBR nearly all of it (docs/BENCHMARKS.md, `bench store --netns`).
pub fn prefer_bbr(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_congestion(b"bbr");
}

async fn tls_client(
    tcp: TcpStream,
    addr: SocketAddr,
    expected: Option<PublicKey>,
    connector: TlsConnector,
    alpn: &[u8],
) -> Result<PeerConn, TransportError> {
    // The name is not checked (the key is pinned); an IP name also means no SNI is sent.
    let tls = connector
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .map_err(|source| TransportError::Handshake { addr, source })?;
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(alpn) {
        return Err(TransportError::Alpn { addr });
    }
    // The verifier already pinned the key; checking the outcome again costs one parse.
    let found = peer_key(session).map_err(|source| TransportError::PeerKey { addr, source })?;
    if let Some(expected) = expected {
        if found != expected {
            return Err(TransportError::PeerKey {
                addr,
                source: TlsError::PinMismatch { expected, found },
            });
        }
    }
    Ok(PeerConn::new(TlsStream::Client(tls), found, addr))
}

/// First word of a relay request line ("connect me to this key").
pub const RELAY_CONNECT: &str = "BORG-RELAY";
/// First word of a relayed node's answer to `relay.open`.
pub const RELAY_ACCEPT: &str = "BORG-ACCEPT";
/// Longest request line accepted before TLS.
const MAX_PREAMBLE: usize = 128;

/// Which protocol an accepted TLS connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// A tree link of the named cell.
    Peer(&'static str),
    Probe,
}

/// What arrived on the tree port.
#[derive(Debug)]
pub enum Incoming {
    /// A node-to-node connection.
    Peer(PeerConn),
    /// A reachability probe or dial-back: one exchange, never a tree link.
    Probe(PeerConn),
    /// Somebody asks this node to relay them to `target`. The stream continues with their TLS
    /// handshake, meant for the target.
    RelayConnect {
        tcp: TcpStream,
        target: PublicKey,
        from: SocketAddr,
    },
    /// A node this node relays for, answering a `relay.open` with its token.
    RelayAccept {
        tcp: TcpStream,
        token: String,
        from: SocketAddr,
    },
}

/// Accepts authenticated connections from any node, and relay requests.
pub struct Listener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    handshakes: JoinSet<Result<Incoming, TransportError>>,
    slots: Arc<ConnLimiter>,
    trusted: Arc<Trusted>,
    counters: Arc<NetCounters>,
    /// After a failed TCP accept: no accepting until then.
    backoff_until: Option<tokio::time::Instant>,
    backoff: Duration,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local_addr", &self.tcp.local_addr().ok())
            .field("pending_handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl Listener {
    pub async fn bind(addr: SocketAddr, identity: &TlsIdentity) -> Result<Self, TransportError> {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| TransportError::Bind { addr, source })?;
        Ok(Self {
            tcp,
            acceptor: TlsAcceptor::from(identity.server_config()),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            handshakes: JoinSet::new(),
            slots: ConnLimiter::new(
                MAX_HANDSHAKES_PER_IP,
                MAX_PENDING_HANDSHAKES,
                RESERVED_HANDSHAKES,
            ),
            trusted: Arc::default(),
            counters: Arc::default(),
            backoff_until: None,
            backoff: ACCEPT_BACKOFF_MIN,
        })
    }

    /// Share the node's neighbour list (reserved handshake slots) and counters.
    pub fn with_guards(mut self, trusted: Arc<Trusted>, counters: Arc<NetCounters>) -> Self {
        self.trusted = trusted;
        self.counters = counters;
        self
    }

    /// Change the time an incoming handshake may take (default [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next authenticated node-to-node connection, with the client's key and address
    /// (probes and relay requests are dropped; see [`Self::accept_incoming`]).
    pub async fn accept(&mut self) -> Result<(PeerConn, PublicKey, SocketAddr), TransportError> {
        loop {
            if let Incoming::Peer(conn) = self.accept_incoming().await? {
                let (key, addr) = (conn.peer_key(), conn.remote_addr());
                return Ok((conn, key, addr));
            }
        }
    }

    /// The next thing to arrive: a node connection, a probe or a relay request. An `Err`
    /// concerns one connection or one failed TCP `accept` (e.g. out of file descriptors: back
    /// off briefly before calling again); keep calling. Cancel-safe. Dropping the listener
    /// abandons the handshakes in progress.
    pub async fn accept_incoming(&mut self) -> Result<Incoming, TransportError> {
        loop {
            let backing_off = self.backoff_until;
            // Never are all branches disabled (select! would panic): either we back off (the
            // sleep branch) or we accept.
            tokio::select! {
                biased;
                Some(done) = self.handshakes.join_next() => {
                    let done = done.unwrap_or_else(|e| Err(TransportError::Task(e.to_string())));
                    if done.is_err() {
                        NetCounters::bump(&self.counters.tls_failures, Door::Tree);
                    }
                    return done;
                }
                () = sleep_until_opt(backing_off), if backing_off.is_some() => {
                    self.backoff_until = None;
                }
                accepted = self.tcp.accept(), if backing_off.is_none() => {
                    let (tcp, addr) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            NetCounters::bump(&self.counters.accept_errors, Door::Tree);
                            self.backoff_until = Some(tokio::time::Instant::now() + self.backoff);
                            self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                            return Err(TransportError::Accept(e));
                        }
                    };
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    let trusted = self.trusted.has_ip(&addr.ip());
                    let slot = match self.slots.try_acquire(addr.ip(), trusted) {
                        Ok(slot) => slot,
                        Err(refusal) => {
                            // Closed at once: costs the sender a TCP handshake, us nothing.
                            let c = match refusal {
                                Refusal::PerIp => &self.counters.refused_per_ip,
                                Refusal::Total => &self.counters.refused_total,
                            };
                            NetCounters::bump(c, Door::Tree);
                            drop(tcp);
                            continue;
                        }
                    };
                    let acceptor = self.acceptor.clone();
                    let timeout = self.handshake_timeout;
                    self.handshakes.spawn(async move {
                        tokio::select! {
                            res = bounded(addr, timeout, classify(acceptor, tcp, addr)) => res,
                            () = slot.evicted() => Err(TransportError::Evicted { addr }),
                        }
                    });
                }
            }
        }
    }

    /// Handshakes in progress now.
    pub fn pending_handshakes(&self) -> usize {
        self.slots.held()
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// TLS (a ClientHello starts with 0x16) or a relay line (starts with "BORG-").
async fn classify(
    acceptor: TlsAcceptor,
    mut tcp: TcpStream,
    addr: SocketAddr,
) -> Result<Incoming, TransportError> {
    let err = |source| TransportError::Handshake { addr, source };
    tcp.set_nodelay(true).map_err(err)?;
    prefer_bbr(&tcp);
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.map_err(err)?;
    if n == 1 && first[0] == b'B' {
        let line = read_line(&mut tcp).await.map_err(err)?;
        let bad = || {
            err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad relay request line",
            ))
        };
        let (word, arg) = line.split_once(' ').ok_or_else(bad)?;
        return match word {
            RELAY_CONNECT => Ok(Incoming::RelayConnect {
                target: PublicKey::from_b64(arg).map_err(|_| bad())?,
                tcp,
                from: addr,
            }),
            RELAY_ACCEPT if !arg.is_empty() && arg.len() <= 64 => Ok(Incoming::RelayAccept {
                token: arg.to_string(),
                tcp,
                from: addr,
            }),
            _ => Err(bad()),
        };
    }
    match tls_server(acceptor, tcp, addr).await? {
        (conn, Alpn::Peer(cell)) => Ok(Incoming::Peer(conn.for_cell(cell))),
        (conn, Alpn::Probe) => Ok(Incoming::Probe(conn)),
    }
}

/// One `\n`-terminated ASCII line, read byte by byte so nothing after it is consumed (the
/// TLS handshake that follows belongs to somebody else).
async fn read_line(tcp: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::with_capacity(64);
    loop {
        let mut b = [0u8; 1];
        if tcp.read(&mut b).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_PREAMBLE || !b[0].is_ascii_graphic() && b[0] != b' ' {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request line",
            ));
        }
        line.push(b[0]);
    }
    String::from_utf8(line).map_err(|_| io::ErrorKind::InvalidData.into())
}

async fn tls_server(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Result<(PeerConn, Alpn), TransportError> {
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|source| TransportError::Handshake { addr, source })?;
    let (_, session) = tls.get_ref();
    let alpn = match session.alpn_protocol() {
        Some(p) if p == ALPN_PROBE => Alpn::Probe,
        Some(p) => match crate::tls::cell_of_alpn(p) {
            Some(cell) => Alpn::Peer(cell),
            None => return Err(TransportError::Alpn { addr }),
        },
        None => return Err(TransportError::Alpn { addr }),
    };
    let key = peer_key(session).map_err(|source| TransportError::PeerKey { addr, source })?;
    Ok((PeerConn::new(TlsStream::Server(tls), key, addr), alpn))
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Arc;

    use borg_proto::identity::SecretKey;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::frame::MAX_FRAME;
    use crate::tls::self_signed_cert;

    /// Upper bound for anything a test waits for; reaching it is a failure, not a pass.
    const LIMIT: Duration = Duration::from_secs(20);

    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(LIMIT, f)
            .await
            .expect("test step timed out")
    }

    struct Node {
        key: SecretKey,
        tls: TlsIdentity,
    }

    fn node() -> Node {
        let key = SecretKey::generate();
        let tls = TlsIdentity::new(&key).unwrap();
        Node { key, tls }
    }

    async fn listen(node: &Node) -> (Listener, SocketAddr) {
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &node.tls)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    /// Connect `client` to `server`'s listener and accept on the other side.
    async fn pair(
        client: &Node,
        server: &Node,
        listener: &mut Listener,
        addr: SocketAddr,
    ) -> (PeerConn, (PeerConn, PublicKey, SocketAddr)) {
        let (c, s) = within(async {
            tokio::join!(
                connect(addr, server.key.public(), &client.tls, LIMIT),
                listener.accept()
            )
        })
        .await;
        (c.unwrap(), s.unwrap())
    }

    /// Accepts any server certificate; only for clients that must get far enough to be refused.
    #[derive(Debug)]
    struct AcceptAnything;

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ECDSA_NISTP256_SHA256]
        }
    }

    #[tokio::test]
    async fn mutual_auth_and_frames_both_ways() {
        let (a, b) = (node(), node());
        let (mut listener, addr) = listen(&a).await;
        let (mut client, (mut server, client_key, client_addr)) =
            pair(&b, &a, &mut listener, addr).await;

        assert_eq!(client.peer_key(), a.key.public());
        assert_eq!(
            client_key,
            b.key.public(),
            "server must see the client's key"
        );
        assert_eq!(server.peer_key(), b.key.public());
        assert_eq!(client_addr.ip(), addr.ip());

        within(client.send(b"ping from b")).await.unwrap();
        assert_eq!(
            within(server.recv()).await.unwrap().unwrap(),
            b"ping from b"
        );
        within(server.send(b"pong from a")).await.unwrap();
        assert_eq!(
            within(client.recv()).await.unwrap().unwrap(),
            b"pong from a"
        );

        // A clean close is a clean end of stream on the other side.
        let (_, mut writer) = client.into_split();
        within(writer.shutdown()).await.unwrap();
        assert!(within(server.recv()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn client_refuses_server_with_another_key() {
        let (a, b, c) = (node(), node(), node());
        let (mut listener, addr) = listen(&a).await;
        // b expects c at a's address.
        let (client, server) = within(async {
            tokio::join!(
                connect(addr, c.key.public(), &b.tls, LIMIT),
                listener.accept()
            )
        })
        .await;
        let err = client.unwrap_err();
        let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
            err.tls_error()
        else {
            panic!("expected a certificate rejection, got {err}");
        };
        let reason = other.0.downcast_ref::<TlsError>();
        assert!(
            matches!(reason, Some(TlsError::PinMismatch { expected, found })
                if *expected == c.key.public() && *found == a.key.public()),
            "{err}"
        );
        assert!(server.is_err(), "server must not yield a connection");
    }

    /// A certificate copied from `owner` paired with `holder`'s private key: what an attacker
    /// who saw `owner`'s certificate (it is public) but lacks its key can present.
    fn stolen_cert(owner: &Node, holder: &Node) -> Arc<rustls::sign::SingleCertAndKey> {
        let (cert, _) = self_signed_cert(&owner.key).unwrap();
        let (_, key) = self_signed_cert(&holder.key).unwrap();
        let signer = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)
            .unwrap();
        Arc::new(rustls::sign::CertifiedKey::new(vec![cert], signer).into())
    }

    fn ring() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[tokio::test]
    async fn server_with_a_copied_certificate_is_refused() {
        let (a, b, mallory) = (node(), node(), node());
        let mut config = rustls::ServerConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(stolen_cert(&a, &mallory));
        config.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();

        let (client, _server) = within(async {
            tokio::join!(connect(addr, a.key.public(), &b.tls, LIMIT), async {
                let (s, _) = tcp.accept().await.unwrap();
                acceptor.accept(s).await
            })
        })
        .await;
        let err = client.unwrap_err();
        assert!(
            matches!(
                err.tls_error(),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::BadSignature
                ))
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_with_a_copied_certificate_is_refused() {
        let (a, victim, mallory) = (node(), node(), node());
        let (mut listener, addr) = listen(&a).await;
        let mut config = rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_client_cert_resolver(stolen_cert(&victim, &mallory));
        config.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let connector = TlsConnector::from(Arc::new(config));

        let (_client, server) = within(async {
            tokio::join!(
                async {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    connector.connect(ServerName::from(addr.ip()), tcp).await
                },
                listener.accept()
            )
        })
        .await;
        let err = server.unwrap_err();
        assert!(
            matches!(
                err.tls_error(),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::BadSignature
                ))
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tls12_only_client_is_refused() {
        let (a, b) = (node(), node());
        let (mut listener, addr) = listen(&a).await;
        let (cert, key) = self_signed_cert(&b.key).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_client_auth_cert(vec![cert], key)
            .unwrap();
        config.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let connector = TlsConnector::from(Arc::new(config));

        let (client, server) = within(async {
            tokio::join!(
                async {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    connector.connect(ServerName::from(addr.ip()), tcp).await
                },
                listener.accept()
            )
        })
        .await;
        assert!(client.is_err(), "TLS 1.2 handshake must fail");
        let err = server.unwrap_err();
        assert!(
            matches!(
                err.tls_error(),
                Some(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
                ))
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let a = node();
        let (mut listener, addr) = listen(&a).await;
        let mut config = (*crate::tls::cli_client_config(Some(a.key.public())).unwrap()).clone();
        config.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let connector = TlsConnector::from(Arc::new(config));
        let (_client, server) = within(async {
            tokio::join!(
                async {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    // In TLS 1.3 the client may believe it is connected before the server
                    // has judged its (missing) certificate; only the server's view matters.
                    connector.connect(ServerName::from(addr.ip()), tcp).await
                },
                listener.accept()
            )
        })
        .await;
        let err = server.unwrap_err();
        assert!(
            matches!(
                err.tls_error(),
                Some(rustls::Error::NoCertificatesPresented)
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_and_silent_clients_do_not_stop_the_listener() {
        let (a, b) = (node(), node());
        let (mut listener, addr) = listen(&a).await;

        let mut garbage = within(TcpStream::connect(addr)).await.unwrap();
        within(garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
            .await
            .unwrap();
        let err = within(listener.accept()).await.unwrap_err();
        assert!(matches!(err, TransportError::Handshake { .. }), "{err}");

        // A client that connects and says nothing holds a handshake slot but blocks no one.
        let _silent = within(TcpStream::connect(addr)).await.unwrap();

        let (mut client, (mut server, key, _)) = pair(&b, &a, &mut listener, addr).await;
        assert_eq!(key, b.key.public());
        within(client.send(b"still works")).await.unwrap();
        assert_eq!(
            within(server.recv()).await.unwrap().unwrap(),
            b"still works"
        );
    }

    #[tokio::test]
    async fn silent_client_times_out_without_blocking_accept() {
        let a = node();
        let (listener, addr) = listen(&a).await;
        let mut listener = listener.with_handshake_timeout(Duration::from_millis(200));
        let _silent = within(TcpStream::connect(addr)).await.unwrap();
        let err = within(listener.accept()).await.unwrap_err();
        assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn connect_times_out_against_a_silent_server() {
        let a = node();
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let (res, _held) = within(async {
            tokio::join!(
                connect(addr, a.key.public(), &a.tls, Duration::from_millis(200)),
                silent.accept()
            )
        })
        .await;
        assert!(
            matches!(res, Err(TransportError::Timeout { .. })),
            "{res:?}"
        );
    }

    #[tokio::test]
    async fn peer_connection_to_a_receptor_port_is_refused() {
        let (a, b) = (node(), node());
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(a.tls.receptor_server_config());
        let (client, _server) = within(async {
            tokio::join!(connect(addr, a.key.public(), &b.tls, LIMIT), async {
                let (s, _) = tcp.accept().await.unwrap();
                acceptor.accept(s).await
            })
        })
        .await;
        assert!(
            matches!(client, Err(TransportError::Alpn { .. })),
            "{client:?}"
        );
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_by_sender_and_receiver() {
        let (a, b) = (node(), node());
        let (mut listener, addr) = listen(&a).await;

        // Sender side: refused before anything is written; the connection stays usable.
        let (mut client, (mut server, _, _)) = pair(&b, &a, &mut listener, addr).await;
        let err = within(client.send(&vec![0u8; MAX_FRAME + 1]))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        within(client.send(b"next")).await.unwrap();
        assert_eq!(within(server.recv()).await.unwrap().unwrap(), b"next");

        // Receiver side: a peer announcing an oversized frame over an authenticated connection.
        let connector = TlsConnector::from(b.tls.client_config(a.key.public()));
        let (raw, accepted) = within(async {
            tokio::join!(
                async {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    connector.connect(ServerName::from(addr.ip()), tcp).await
                },
                listener.accept()
            )
        })
        .await;
        let mut raw = raw.unwrap();
        let (mut server, _, _) = accepted.unwrap();
        let len = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
        within(async {
            raw.write_all(&len).await.unwrap();
            raw.write_all(&[0u8; 1024]).await.unwrap();
            raw.flush().await.unwrap();
        })
        .await;
        let err = within(server.recv()).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(matches!(
            within(server.recv()).await,
            Err(FrameError::Failed)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_frames_in_order_both_ways_at_once() {
        const N: u32 = 2000;
        let (a, b) = (node(), node());
        let (mut listener, addr) = listen(&a).await;
        let (client, (server, _, _)) = pair(&b, &a, &mut listener, addr).await;

        async fn pump(conn: PeerConn, tag: u8) -> Vec<Vec<u8>> {
            let (mut reader, mut writer) = conn.into_split();
            let send = tokio::spawn(async move {
                for i in 0..N {
                    // Sizes vary so frames straddle TLS records and reads.
                    let mut frame = vec![tag; (i as usize * 37) % 3000];
                    frame.splice(0..0, i.to_be_bytes());
                    writer.send(&frame).await.unwrap();
                }
                writer.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            while let Some(frame) = reader.recv().await.unwrap() {
                got.push(frame);
            }
            send.await.unwrap();
            got
        }

        let (from_a, from_b) =
            within(async { tokio::join!(pump(client, b'b'), pump(server, b'a')) }).await;
        for (got, tag) in [(from_a, b'a'), (from_b, b'b')] {
            assert_eq!(got.len(), N as usize);
            for (i, frame) in got.iter().enumerate() {
                assert_eq!(frame[..4], (i as u32).to_be_bytes());
                assert_eq!(frame.len(), 4 + (i * 37) % 3000);
                assert!(frame[4..].iter().all(|&x| x == tag));
            }
        }
    }
}
