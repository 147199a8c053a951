//! A tiny HTTP/1.0 client for the local cell monitor (`GET /status`, `GET /metrics`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Errors querying a monitor.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Could not connect / read / write.
    #[error("monitor {addr} unreachable: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Not an HTTP 200 answer.
    #[error("monitor answered: {0}")]
    Status(String),
    /// The body was not the expected JSON.
    #[error("monitor sent bad JSON: {0}")]
    Json(String),
}

/// Default monitor address of the base cell.
pub fn base_monitor() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], borg_proto::dna::PEER_TREE_NET.mon_port))
}

/// `GET path` and return the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, MonitorError> {
    let io = |source| MonitorError::Io { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.take(4 << 20).read_to_end(&mut raw).map_err(io)?;
    parse_response(&raw)
}

/// Split an HTTP response into status and body (handles chunked bodies). Works on bytes, so
/// no input can make it slice inside a UTF-8 character.
pub fn parse_response(raw: &[u8]) -> Result<String, MonitorError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| MonitorError::Status("no HTTP header".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(MonitorError::Status(status_line.to_string()));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok(String::from_utf8_lossy(body).into_owned());
    }
    let mut out: Vec<u8> = Vec::new();
    let mut rest = body;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..eol]);
        let n = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| MonitorError::Status("bad chunk size".into()))?;
        let data = &rest[eol + 2..];
        if n == 0 || data.len() < n {
            break;
        }
        out.extend_from_slice(&data[..n]);
        rest = data[n..].strip_prefix(b"\r\n").unwrap_or(&data[n..]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `GET /status` as JSON.
pub fn status(addr: SocketAddr, timeout: Duration) -> Result<serde_json::Value, MonitorError> {
    let body = get(addr, "/status", timeout)?;
    serde_json::from_str(&body).map_err(|e| MonitorError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r).unwrap(), "{}");
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), "{\"a\":1}");
        assert!(parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(parse_response(b"garbage").is_err());
        // Multi-byte characters across a chunk boundary must not panic.
        let r = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\n\u{e9}\r\n0\r\n\r\n";
        assert!(parse_response(r.as_bytes()).is_err());
        let r = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n\u{e9}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r.as_bytes()).unwrap(), "\u{e9}");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            raw.extend_from_slice(&bytes);
            let _ = parse_response(&raw);
            let _ = parse_response(&bytes);
        }
    }

    #[test]
    fn talks_to_a_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /status HTTP/1.0"));
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\n{\"state\":\"root\"}")
                .unwrap();
        });
        let v = status(addr, Duration::from_secs(5)).unwrap();
        assert_eq!(v["state"], "root");
        t.join().unwrap();
    }
}
