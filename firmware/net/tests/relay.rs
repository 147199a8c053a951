//! Relaying keeps TLS end to end: through a real relay (listener + [`RelayHub`]) a client
//! reaches the relayed node pinned to its key and both sides authenticate each other; the bytes
//! the relay forwards never contain the plaintext; a relay that answers the handshake itself
//! (posing as the target) is refused by the client's pin.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use borg_net::conn::{self, Incoming, Listener};
use borg_net::relay::RelayHub;
use borg_net::TlsIdentity;
use borg_proto::identity::SecretKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(5);

fn identity() -> (SecretKey, Arc<TlsIdentity>) {
    let k = SecretKey::generate();
    let id = Arc::new(TlsIdentity::new(&k).unwrap());
    (k, id)
}

/// How the test relay forwards a spliced connection.
#[derive(Clone, Copy)]
enum Mode {
    /// Through the hub, as nodes do.
    Hub,
    /// Byte copy that records what passes (to look for plaintext).
    Tap,
    /// Terminate TLS itself with the relay's own key (an impostor).
    Impostor,
}

/// A relay on 127.0.0.1: hands relay tokens to the relayed node over `tokens` (standing in
/// for the `relay.open` frame on their link).
async fn run_relay(
    mut listener: Listener,
    relay_id: Arc<TlsIdentity>,
    tokens: mpsc::Sender<String>,
    mode: Mode,
    tap: Arc<Mutex<Vec<u8>>>,
) {
    let hub = Arc::new(RelayHub::default());
    let waiting: Arc<Mutex<Option<tokio::sync::oneshot::Sender<TcpStream>>>> =
        Arc::new(Mutex::new(None));
    loop {
        let Ok(inc) = listener.accept_incoming().await else {
            continue;
        };
        match inc {
            Incoming::RelayConnect { tcp, .. } => {
                let token = format!("tok{}", rand_u32());
                match mode {
                    Mode::Hub => {
                        tokens.send(token.clone()).await.unwrap();
                        let hub = hub.clone();
                        tokio::spawn(async move {
                            let _ = hub.splice(token, tcp, None).await;
                        });
                    }
                    Mode::Tap => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        *waiting.lock().unwrap() = Some(tx);
                        tokens.send(token).await.unwrap();
                        let tap = tap.clone();
                        tokio::spawn(async move {
                            let node = rx.await.unwrap();
                            tap_splice(tcp, node, tap).await;
                        });
                    }
                    Mode::Impostor => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(relay_id.server_config());
                        tokio::spawn(async move {
                            let _ = acceptor.accept(tcp).await;
                        });
                    }
                }
            }
            Incoming::RelayAccept { tcp, token, .. } => match mode {
                Mode::Hub => {
                    hub.answer(&token, tcp);
                }
                _ => {
                    if let Some(tx) = waiting.lock().unwrap().take() {
                        let _ = tx.send(tcp);
                    }
                }
            },
            _ => {}
        }
    }
}

fn rand_u32() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn tap_splice(a: TcpStream, b: TcpStream, tap: Arc<Mutex<Vec<u8>>>) {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let t1 = tap.clone();
    let up = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = ar.read(&mut buf).await {
            if n == 0 || bw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            t1.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let down = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = br.read(&mut buf).await {
            if n == 0 || aw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            tap.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let _ = tokio::join!(up, down);
}

/// The relayed node: answer each token, then echo frames.
async fn run_target(
    relay: std::net::SocketAddr,
    id: Arc<TlsIdentity>,
    mut tokens: mpsc::Receiver<String>,
    seen_client: mpsc::Sender<borg_proto::identity::PublicKey>,
) {
    while let Some(token) = tokens.recv().await {
        let mut c = conn::accept_via(relay, &token, &id, T).await.unwrap();
        seen_client.send(c.peer_key()).await.unwrap();
        tokio::spawn(async move {
            while let Ok(Some(f)) = c.recv().await {
                if c.send(&f).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn setup(
    mode: Mode,
) -> (
    std::net::SocketAddr,
    SecretKey,
    Arc<Mutex<Vec<u8>>>,
    mpsc::Receiver<borg_proto::identity::PublicKey>,
) {
    let (_, relay_id) = identity();
    let (target_key, target_id) = identity();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &relay_id)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tok_tx, tok_rx) = mpsc::channel(8);
    let (seen_tx, seen_rx) = mpsc::channel(8);
    let tap = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(run_relay(listener, relay_id, tok_tx, mode, tap.clone()));
    tokio::spawn(run_target(addr, target_id, tok_rx, seen_tx));
    (addr, target_key, tap, seen_rx)
}

#[tokio::test]
async fn a_relayed_connection_is_end_to_end_tls_with_the_target() {
    let (relay, target_key, _, mut seen) = setup(Mode::Hub).await;
    let (client_key, client_id) = identity();
    let mut c = conn::connect_via(relay, target_key.public(), &client_id, T)
        .await
        .unwrap();
    assert_eq!(
        c.peer_key(),
        target_key.public(),
        "client pinned the target"
    );
    assert_eq!(
        seen.recv().await.unwrap(),
        client_key.public(),
        "target authenticated the client"
    );
    for i in 0..10u8 {
        let frame = vec![i; 1000 * (i as usize + 1)];
        c.send(&frame).await.unwrap();
        assert_eq!(c.recv().await.unwrap().unwrap(), frame);
    }
}

#[tokio::test]
async fn the_relay_forwards_only_ciphertext() {
    let (relay, target_key, tap, _seen) = setup(Mode::Tap).await;
    let (_, client_id) = identity();
    let mut c = conn::connect_via(relay, target_key.public(), &client_id, T)
        .await
        .unwrap();
    let secret = b"the quick secret payload 0123456789".repeat(20);
    c.send(&secret).await.unwrap();
    assert_eq!(c.recv().await.unwrap().unwrap(), secret);
    let seen = tap.lock().unwrap().clone();
    assert!(
        seen.len() > secret.len(),
        "the relay did forward the traffic"
    );
    assert!(
        !seen.windows(16).any(|w| w == &secret[..16]),
        "plaintext visible to the relay"
    );
}

#[tokio::test]
async fn a_relay_posing_as_the_target_is_refused() {
    let (relay, target_key, _, _) = setup(Mode::Impostor).await;
    let (_, client_id) = identity();
    let err = conn::connect_via(relay, target_key.public(), &client_id, T)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("handshake") || text.contains("key"),
        "expected a pinning failure, got {text}"
    );
}

#[tokio::test]
async fn a_request_for_an_unregistered_node_gets_no_connection() {
    // A hub asked to splice a token nobody answers gives up within its bound.
    let hub = RelayHub::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
    let (server_side, _) = l.accept().await.unwrap();
    let _c = client.await.unwrap();
    let started = std::time::Instant::now();
    let r = hub.splice("nobody".into(), server_side, None).await;
    assert!(r.is_err());
    assert!(started.elapsed() <= borg_net::relay::ANSWER_TIMEOUT + Duration::from_secs(1));
    assert!(!hub.answer("nobody", TcpStream::connect(addr).await.unwrap()));
}
