//! An in-memory ring of the last log lines, for the console's `log` command.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

/// Lines kept.
pub const CAPACITY: usize = 400;

struct Ring {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

fn ring() -> &'static Mutex<Ring> {
    static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
    RING.get_or_init(|| {
        Mutex::new(Ring {
            lines: VecDeque::with_capacity(CAPACITY),
            partial: Vec::new(),
        })
    })
}

/// Append raw log output (split into lines; ANSI colour codes are kept out by the writer).
pub fn push_bytes(buf: &[u8]) {
    let mut r = match ring().lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    for &b in buf {
        if b == b'\n' {
            let line = String::from_utf8_lossy(&r.partial).into_owned();
            r.partial.clear();
            if r.lines.len() == CAPACITY {
                r.lines.pop_front();
            }
            r.lines.push_back(line);
        } else if r.partial.len() < 4096 {
            r.partial.push(b);
        }
    }
}

/// The last `n` complete lines, oldest first.
pub fn tail(n: usize) -> Vec<String> {
    let r = match ring().lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    let skip = r.lines.len().saturating_sub(n);
    r.lines.iter().skip(skip).cloned().collect()
}

/// A writer that copies everything to stderr (the console under PID 1) and to the ring.
#[derive(Debug, Default, Clone, Copy)]
pub struct TeeWriter;

impl std::io::Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        push_bytes(buf);
        // A console that went away must never stop logging or PID 1.
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_complete_lines() {
        push_bytes(b"logring-test one\nlogring-test tw");
        push_bytes(b"o\n");
        let t: Vec<String> = tail(CAPACITY)
            .into_iter()
            .filter(|l| l.starts_with("logring-test"))
            .collect();
        assert_eq!(t, vec!["logring-test one", "logring-test two"]);
    }
}
