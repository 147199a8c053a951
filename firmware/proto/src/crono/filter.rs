//! The sample filter of [`super::TimeSync`]: what the exchanges with the parent say about
//! the offset (parent net - our local) now, and about the frequency between the two clocks.
//!
//! Each exchange gives hard bounds on the offset at its mid time: `lo = t3 - t4 <= offset <=
//! t2 - t1 = up` (both legs take >= 0 s). Three things come from the window of samples:
//! - **bounds**: the intersection of every sample's bounds, detrended with the frequency.
//!   True for a steady parent, so the error bound and the consistency check use it. Its
//!   centre is set by the single fastest exchange each way: sharp when links have a hard
//!   minimum delay, slow to improve when jitter piles up in the middle (20 ± 5 ms made of two
//!   queues: ±0.3 ms typical after 64 samples).
//! - **offset**: the mean of the midpoints of the faster half of the last [`OFFSET_SAMPLES`],
//!   carried to now with the frequency, and the intersection's centre, weighted by their variances, clamped into
//!   the bounds. The mean averages out the jitter of both legs.
//! - **frequency**: the least-squares slope through block means (one point per [`BLOCK_US`]
//!   of samples, up to [`BLOCKS`] points, used from six on): means of means do not depend on
//!   the frequency used for detrending, so nothing rings, and the long baseline makes it
//!   precise; before that, the least-squares slope of the samples. A slope within two
//!   standard errors of zero is taken as zero: it would only carry noise into the offset.
//!
//! Figures (simulation, `cargo test -p borg-proto --lib tree14_figures -- --ignored
//! --nocapture`) are in docs/BENCHMARKS.md.

use std::collections::VecDeque;

const PPB: i128 = 1_000_000_000;
/// Samples averaged for the offset (the most recent ones; the whole window).
pub const OFFSET_SAMPLES: usize = 64;
/// One frequency point per this much local time of samples.
pub const BLOCK_US: i128 = 16_000_000;
/// Frequency points kept (16 x 16 s = a 256 s baseline).
pub const BLOCKS: usize = 16;

/// One exchange with the parent: bounds on the offset (net - local) at local time `t`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub t: i128,
    /// Upper bound: t2 - t1 (the forward leg's latency is >= 0).
    pub up: i128,
    /// Lower bound: t3 - t4.
    pub lo: i128,
    pub perr: u64,
    pub stratum: u8,
}

impl Sample {
    fn mid(&self) -> i128 {
        (self.up + self.lo) / 2
    }
}

/// The window of samples from one parent and the estimates made from it.
#[derive(Debug, Clone)]
pub(super) struct Filter {
    window: usize,
    max_freq_ppb: i128,
    drift_allowance_ppm: i128,
    samples: VecDeque<Sample>,
    /// Block means (t, offset) for the frequency.
    blocks: VecDeque<(i128, i128)>,
    /// Local time the current block started (its samples are the newest ones from there).
    block_from: Option<i128>,
    freq_ppb: i64,
    /// Windows restarted because the parent's bounds stopped intersecting ours.
    restarts: u64,
}

impl Filter {
    pub fn new(window: usize, max_freq_ppm: i64, drift_allowance_ppm: u64) -> Self {
        Self {
            window: window.clamp(1, 64),
            max_freq_ppb: i128::from(max_freq_ppm) * 1000,
            drift_allowance_ppm: i128::from(drift_allowance_ppm),
            samples: VecDeque::new(),
            blocks: VecDeque::new(),
            block_from: None,
            freq_ppb: 0,
            restarts: 0,
        }
    }

    /// Forget the samples (a new parent, or one that stepped); the frequency stays: it is
    /// mostly our own oscillator's.
    pub fn clear(&mut self) {
        self.samples.clear();
        self.blocks.clear();
        self.block_from = None;
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.samples.len() >= self.window
    }

    pub fn freq_ppb(&self) -> i64 {
        self.freq_ppb
    }

    /// Windows restarted because a sample did not fit the bounds (the parent stepped, or
    /// our frequency estimate was off).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Local time between the oldest and the newest sample.
    pub fn span(&self) -> i128 {
        match (self.samples.front(), self.samples.back()) {
            (Some(a), Some(b)) => b.t - a.t,
            _ => 0,
        }
    }

    /// The parent's largest error bound over the window, and its latest stratum.
    pub fn parent_err(&self) -> Option<(u64, u8)> {
        let last = self.samples.back()?;
        let perr = self.samples.iter().map(|s| s.perr).max().unwrap_or(0);
        Some((perr, last.stratum))
    }

    pub fn add(&mut self, s: Sample) {
        // A parent that stepped (or a path change) makes the bounds inconsistent: start over.
        if let Some((lo, up)) = self.bounds_at(s.t) {
            let tol = 1000 + self.drift_allowance_ppm * self.span() / 1_000_000;
            if s.lo > up + tol || s.up < lo - tol {
                self.clear();
                self.restarts = self.restarts.saturating_add(1);
            }
        }
        while self.samples.len() >= self.window {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
        let from = *self.block_from.get_or_insert(s.t);
        if s.t - from >= BLOCK_US {
            let block: Vec<Sample> = self
                .samples
                .iter()
                .filter(|x| x.t >= from)
                .copied()
                .collect();
            if let Some((t, m, _)) = window_mean(&block) {
                while self.blocks.len() >= BLOCKS {
                    self.blocks.pop_front();
                }
                self.blocks.push_back((t, m));
            }
            self.block_from = None;
        }
        self.freq_ppb = self.estimate_freq();
    }

    fn estimate_freq(&self) -> i64 {
        let slope = if self.blocks.len() >= 6 {
            // A parent still slewing out its own first error when our blocks began (at up
            // to 500 ppm) bends the oldest points; a line through them would carry that
            // transient as a frequency for minutes (seen: -100 ppm, 3-5 ms off, on a loaded
            // bench). Drop the oldest points while they sit off the line the others make.
            let mut pts: Vec<(i128, i128)> = self.blocks.iter().copied().collect();
            while pts.len() > 4 && front_is_off(&pts) {
                pts.remove(0);
            }
            slope(pts.into_iter())
        } else if self.samples.len() >= 16 && self.span() >= 30_000_000 {
            slope(self.samples.iter().map(|s| (s.t, s.mid())))
        } else {
            None
        };
        match slope {
            Some(f) => i64::try_from(f.clamp(-self.max_freq_ppb, self.max_freq_ppb)).unwrap_or(0),
            None => self.freq_ppb,
        }
    }

    /// Intersection of the detrended bounds at local time `t`: (max lower, min upper).
    pub fn bounds_at(&self, t: i128) -> Option<(i128, i128)> {
        let f = i128::from(self.freq_ppb);
        let mut lo = None::<i128>;
        let mut up = None::<i128>;
        for s in &self.samples {
            let d = (t - s.t) * f / PPB;
            lo = Some(lo.map_or(s.lo + d, |v| v.max(s.lo + d)));
            up = Some(up.map_or(s.up + d, |v| v.min(s.up + d)));
        }
        Some((lo?, up?))
    }

    /// The offset at local time `t`: the low-round-trip mean of the recent samples, carried
    /// to `t` with the frequency, inside the bounds.
    pub fn offset_at(&self, t: i128) -> Option<(i128, i128, i128)> {
        let (lo, up) = self.bounds_at(t)?;
        let skip = self.samples.len().saturating_sub(OFFSET_SAMPLES);
        let recent: Vec<Sample> = self.samples.iter().skip(skip).copied().collect();
        let (tm, m, var_m) = window_mean(&recent)?;
        // Until the blocks give the frequency, a mean over many seconds would lag a drifting
        // clock (100 ppm x 15 s = 1.5 ms): fit the line through the samples instead.
        let f = if self.blocks.len() < 6 && recent.len() >= 8 {
            slope(recent.iter().map(|s| (s.t, s.mid())))
                .unwrap_or(0)
                .clamp(-self.max_freq_ppb, self.max_freq_ppb)
        } else {
            i128::from(self.freq_ppb)
        };
        let mean = m + (t - tm) * f / PPB;
        // The two estimates weighted by their variances: the intersection's centre (the true
        // offset is somewhere in it, ~uniform) wins when links have a sharp minimum delay,
        // the mean when their jitter piles up near the middle.
        let half = ((up - lo).max(0) / 2) as f64;
        let var_c = (half * half).max(1.0);
        let var_m = var_m.max(1.0);
        let centre = ((lo + up) / 2) as f64;
        let w = var_m / (var_m + var_c);
        let est = (centre * w + mean as f64 * (1.0 - w)) as i128;
        Some((est.clamp(lo.min(up), up.max(lo)), lo, up))
    }
}

/// (mean t, mean midpoint, variance of that mean in µs²) of the samples whose round trip is
/// at most the median of `samples`. A sample's midpoint is off by at most half its round
/// trip's excess over the true minimum: the slower half adds little but the tails of a loaded
/// machine (a leg held up by scheduling or by TCP behind another segment), which one-sidedly
/// move a mean. In the simulation, without such tails, the plain mean of all samples was
/// somewhat better (3-hop max 1.1 vs 1.9 ms); on the loaded netns bench the selection was much
/// better (3-hop p50 1.9 vs 8.6 ms; docs/BENCHMARKS.md).
fn window_mean(samples: &[Sample]) -> Option<(i128, i128, f64)> {
    let mut rtt: Vec<i128> = samples.iter().map(|s| s.up - s.lo).collect();
    rtt.sort_unstable();
    let cut = *rtt.get(rtt.len().checked_sub(1)? / 2)?;
    let samples: Vec<Sample> = samples
        .iter()
        .filter(|s| s.up - s.lo <= cut)
        .copied()
        .collect();
    let n = i128::try_from(samples.len()).ok().filter(|&n| n > 0)?;
    let tm = samples.iter().map(|s| s.t).sum::<i128>() / n;
    let mm = samples.iter().map(Sample::mid).sum::<i128>() / n;
    let var = samples
        .iter()
        .map(|s| ((s.mid() - mm) as f64).powi(2))
        .sum::<f64>()
        / (n as f64 - 1.0).max(1.0);
    Some((tm, mm, var / n as f64))
}

/// A least-squares line through `(t, offset)` points, in µs relative to the first point.
struct Line {
    /// The first point (the origin of the fit's coordinates).
    origin: (i128, i128),
    /// Mean t and mean offset, relative to `origin`.
    tm: f64,
    mm: f64,
    /// Slope (µs per µs), sum of squared t deviations, residual standard deviation.
    b: f64,
    den: f64,
    sd: f64,
}

impl Line {
    /// The fit, if there are at least three points spanning any time.
    fn fit(points: impl Iterator<Item = (i128, i128)> + Clone) -> Option<Self> {
        let origin = points.clone().next()?;
        let pts: Vec<(f64, f64)> = points
            .map(|(t, m)| ((t - origin.0) as f64, (m - origin.1) as f64))
            .collect();
        let n = pts.len() as f64;
        if n < 3.0 {
            return None;
        }
        let tm = pts.iter().map(|p| p.0).sum::<f64>() / n;
        let mm = pts.iter().map(|p| p.1).sum::<f64>() / n;
        let den: f64 = pts.iter().map(|p| (p.0 - tm).powi(2)).sum();
        if den <= 0.0 {
            return None;
        }
        let b = pts.iter().map(|p| (p.0 - tm) * (p.1 - mm)).sum::<f64>() / den;
        let rss: f64 = pts
            .iter()
            .map(|p| (p.1 - mm - b * (p.0 - tm)).powi(2))
            .sum();
        let sd = (rss / (n - 2.0).max(1.0)).sqrt();
        Some(Self {
            origin,
            tm,
            mm,
            b,
            den,
            sd,
        })
    }

    /// How far `(t, m)` lies from the line (µs).
    fn residual(&self, (t, m): (i128, i128)) -> f64 {
        let x = (t - self.origin.0) as f64;
        (m - self.origin.1) as f64 - (self.mm + self.b * (x - self.tm))
    }
}

/// Least-squares slope (ppb) of `(t, offset)` points, if they span any time, taken as 0 when
/// it is within two standard errors of 0: a slope the points cannot tell from none would only
/// carry their noise into the offset (at 100 ppm real drift it is always significant).
fn slope(points: impl Iterator<Item = (i128, i128)> + Clone) -> Option<i128> {
    let line = Line::fit(points)?;
    let se = line.sd / line.den.sqrt();
    Some(if line.b.abs() < 2.0 * se {
        0
    } else {
        (line.b * 1e9) as i128
    })
}

/// Whether the oldest point is off the least-squares line through the others by more than
/// four times their residual spread (at least 0.25 ms).
fn front_is_off(pts: &[(i128, i128)]) -> bool {
    let Some((first, rest)) = pts.split_first() else {
        return false;
    };
    Line::fit(rest.iter().copied())
        .is_some_and(|line| line.residual(*first).abs() > 4.0 * line.sd.max(250.0))
}
