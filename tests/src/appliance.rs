//! Helpers for the appliance tests: skip rules, the borg binary, /proc inspection, and a
//! serial-console driver for QEMU boots (read with deadlines, never sleep-and-hope).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Print why a test is skipped. Written to the stderr handle directly (not `eprintln!`) so the
/// line shows in `cargo test` output and CI logs even though libtest captures test output.
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// A test cannot run because something it needs is missing. On a developer's machine that is a
/// SKIP line; under CI (`CI` set, as .ci/run is called) it is a failure, because there the setup
/// scripts must have installed everything and a quiet skip would hide a missing install step.
pub fn missing(test: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false") {
        panic!("{test}: {why} (a missing prerequisite fails under CI: fix ci/setup.sh)");
    }
    skip(test, why);
}

/// True when running as root (uid 0), read from /proc/self/status.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Find a program on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Workspace root (the tests crate's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The host `borg` binary: `$BORG_BIN`, else next to this test executable
/// (`target/<profile>/borg`; CI runs `cargo build -p borg` first).
pub fn borg_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BORG_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let p = profile_dir.join("borg");
    p.is_file().then_some(p)
}

/// Direct children of `pid` as (pid, state, comm), from /proc.
pub fn children_of(pid: u32) -> Vec<(u32, char, String)> {
    let mut out = vec![];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.filter_map(|e| e.ok()) {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == pid {
            out.push((child, state, comm));
        }
    }
    out
}

/// Poll `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for a child process to exit, with a deadline.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    wait_for(timeout, || child.try_wait().ok().flatten())
}

/// Send a signal with the `kill` utility (the tests crate has no unsafe code).
pub fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Decode the complete UTF-8 prefix of `buf` (invalid bytes become U+FFFD) and leave in it only
/// an incomplete character at its end, to be completed by the next read.
pub fn take_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (ok, after) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{fffd}');
                        rest = &after[bad..];
                    }
                    // An incomplete character at the end: keep it.
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.to_vec();
    *buf = keep;
    out
}

/// A process whose output (stdout+stderr, e.g. a QEMU serial console) is collected by a
/// background thread so the test can wait for text with a deadline.
pub struct Console {
    /// The process.
    pub child: Child,
    stdin: Option<ChildStdin>,
    buf: Arc<Mutex<String>>,
    seen: usize,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Console {
    /// Start `cmd` with piped stdio.
    pub fn spawn(mut cmd: Command) -> std::io::Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let buf = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let b = Arc::clone(&buf);
            readers.push(std::thread::spawn(move || {
                let mut stream = stream;
                let mut chunk = [0u8; 4096];
                // Bytes of a UTF-8 character split across two reads (a serial line delivers
                // a few bytes at a time), kept for the next read instead of turned into U+FFFD.
                let mut pending: Vec<u8> = Vec::new();
                let echo = std::env::var_os("BORG_TEST_ECHO").is_some();
                while let Ok(n) = stream.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    pending.extend_from_slice(&chunk[..n]);
                    let text = take_utf8(&mut pending).replace('\r', "");
                    if echo {
                        eprint!("{text}");
                    }
                    if let Ok(mut g) = b.lock() {
                        g.push_str(&text);
                    }
                }
            }));
        }
        let stdin = child.stdin.take();
        Ok(Console {
            child,
            stdin,
            buf,
            seen: 0,
            readers,
        })
    }

    /// Everything received so far.
    pub fn text(&self) -> String {
        self.buf.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Wait until `needle` appears after the current read position; on success the position
    /// moves past it and the text up to and including it is returned. Fails at once (not at the
    /// timeout) when the process has exited without printing `needle`, with its exit status and
    /// its last output (e.g. QEMU's own error).
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let start = self.seen;
        let deadline = Instant::now() + timeout;
        let find = |t: &str| {
            t.get(start..)
                .and_then(|s| s.find(needle))
                .map(|i| start + i + needle.len())
        };
        let failure = loop {
            let t = self.text();
            if let Some(end) = find(&t) {
                self.seen = end;
                return Ok(t[start..end].to_string());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The readers may still hold the process's last bytes: wait for both pipes to
                // close (bounded) and look once more.
                self.drain(Duration::from_secs(2));
                let t = self.text();
                if let Some(end) = find(&t) {
                    self.seen = end;
                    return Ok(t[start..end].to_string());
                }
                break format!("the process exited ({status}) before printing {needle:?}");
            }
            if Instant::now() >= deadline {
                break format!("timed out after {timeout:?} waiting for {needle:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let t = self.text();
        let tail: String = t
            .get(start..)
            .unwrap_or_default()
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!("{failure}; output since then:\n{tail}"))
    }

    /// Wait (at most `bound`) until both output readers have seen end of file.
    fn drain(&mut self, bound: Duration) {
        let deadline = Instant::now() + bound;
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Type a line.
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        match &mut self.stdin {
            Some(s) => {
                s.write_all(line.as_bytes())?;
                s.write_all(b"\n")?;
                s.flush()
            }
            None => Err(std::io::Error::other("stdin closed")),
        }
    }

    /// Type raw bytes (e.g. Ctrl-A c to reach the QEMU monitor on a -nographic console).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.stdin {
            Some(s) => {
                s.write_all(bytes)?;
                s.flush()
            }
            None => Err(std::io::Error::other("stdin closed")),
        }
    }

    /// Kill the process (cleanup after a failure).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utf8_split_across_reads_is_kept_whole() {
        let mut buf = b"time=synced s1 \xc2".to_vec();
        assert_eq!(super::take_utf8(&mut buf), "time=synced s1 ");
        assert_eq!(buf, b"\xc2");
        buf.extend_from_slice(b"\xb11.2ms \xff!");
        assert_eq!(super::take_utf8(&mut buf), "\u{b1}1.2ms \u{fffd}!");
        assert!(buf.is_empty());
    }
}
