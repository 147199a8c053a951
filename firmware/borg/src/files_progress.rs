//! The progress bar of `borg put` and `borg get`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// A one-line progress bar on stderr, redrawn at most ten times a second; silent unless
/// stderr is a terminal and the output is not JSON.
pub(crate) struct Progress {
    enabled: bool,
    label: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    pub(crate) fn new(label: &'static str, total: u64, json: bool) -> Progress {
        Progress {
            enabled: !json && std::io::stderr().is_terminal(),
            label,
            total,
            done: 0,
            start: Instant::now(),
            last_draw: None,
        }
    }

    pub(crate) fn add(&mut self, bytes: u64) {
        self.done = self.done.saturating_add(bytes);
        self.draw(false);
    }

    /// Count bytes already done before this run (they do not count towards the rate).
    pub(crate) fn skip(&mut self, bytes: u64) {
        self.total = self.total.saturating_sub(bytes);
    }

    fn draw(&mut self, force: bool) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last_draw
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        self.last_draw = Some(now);
        let line = progress_line(
            self.label,
            self.done,
            self.total,
            now.duration_since(self.start),
        );
        // \x1b[K clears what a longer previous line left.
        eprint!("\r{line}\x1b[K");
    }

    /// Draw the final state and end the line.
    pub(crate) fn finish(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            self.draw(true);
            eprintln!();
        }
    }

    /// End the line without a final draw (before an error message).
    pub(crate) fn abandon(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            eprintln!();
        }
    }
}

/// `put [########------------]  40%  10.0 MiB / 25.0 MiB  3.2 MiB/s`
pub(crate) fn progress_line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    const WIDTH: u64 = 20;
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = ((frac * WIDTH as f64) as u64).min(WIDTH) as usize;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    format!(
        "{label} [{}{}] {:>3}%  {} / {}  {}/s",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled),
        (frac * 100.0) as u64,
        human_bytes(done as f64),
        human_bytes(total as f64),
        human_bytes(rate)
    )
}

pub(crate) fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut n = n;
    let mut unit = 0;
    while n >= 1024.0 && unit + 1 < UNITS.len() {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0} {}", UNITS[unit])
    } else {
        format!("{n:.1} {}", UNITS[unit])
    }
}
