//! Latency statistics for the benchmark harnesses: nearest-rank percentiles, medians with their
//! spread, and bootstrap intervals for the difference between two phases' percentiles, taken in
//! turn or at once.
//!
//! A p99 of 1,000 CREATEs rests on its 10 slowest, so the difference between two phases' p99s
//! moves from run to run by more than the 1 ms issue 14 asks arcguard to stay within. Whether
//! a measured difference is within a bound is therefore said with a 95 % interval: the
//! percentile bootstrap (Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993,
//! chapter 13), stratified by round. Each round's latencies are resampled with replacement on
//! their own and pooled, so a resample keeps the rounds' design (phases taken in turn, drift
//! reaching each alike) and only the sampling within a round varies.
//!
//! Phases taken in turn still meet different moments of the machine: a stall of the apiserver,
//! etcd or the VM's host that lands in one phase's seconds slows that phase's tail only, and
//! those moments, not the sampling, make most of a p99's spread on a shared 2-core VM. So
//! [`paired_percentile_difference`] takes the two configurations measured at once, their
//! CREATEs alternating, and resamples whole time blocks holding both (the moving-block idea of
//! Künsch, "The jackknife and the bootstrap for general stationary observations", *Annals of
//! Statistics* 17(3), 1989, here with fixed blocks): a stall reaches both sides of a resample
//! alike, and the interval measures what differs between them.

use std::time::Duration;

/// The nearest-rank `p`th percentile (0–100) of `sorted` latencies: the smallest value with at
/// least `p` % of the values at or below it; zero for no values.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[rank(sorted.len(), p)]
}

/// The index of the nearest-rank `p`th percentile among `len` (> 0) sorted values.
fn rank(len: usize, p: f64) -> usize {
    let rank = ((p / 100.0) * len as f64).ceil() as usize;
    rank.clamp(1, len) - 1
}

/// The median of sorted `values` (0 for none).
pub fn median(values: &[f64]) -> f64 {
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median of `values` with their spread, `m (min–max)`, at `decimals`; `m` for one value
/// and `–` for none.
pub fn spread(mut values: Vec<f64>, decimals: usize) -> String {
    values.sort_by(f64::total_cmp);
    let Some((&low, &high)) = values.first().zip(values.last()) else { return "–".to_owned() };
    let median = median(&values);
    if values.len() == 1 {
        return format!("{median:.decimals$}");
    }
    format!("{median:.decimals$} ({low:.decimals$}–{high:.decimals$})")
}

/// A difference between two phases at one percentile, in milliseconds, with its 95 % bootstrap
/// interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// The difference of the pooled percentiles (all rounds' latencies together), in ms.
    pub estimate: f64,
    /// The 2.5th percentile of the bootstrap differences, in ms.
    pub low: f64,
    /// The 97.5th percentile of the bootstrap differences, in ms.
    pub high: f64,
}

/// What an [`Interval`] says about a bound on the difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The whole interval is at or below the bound.
    Within,
    /// The whole interval is above the bound.
    Over,
    /// The interval holds the bound: these samples cannot tell.
    Undecided,
}

impl Interval {
    /// Whether the difference is within `at_most_ms`, over it, or undecided at these samples.
    pub fn against(&self, at_most_ms: f64) -> Verdict {
        if self.high <= at_most_ms {
            Verdict::Within
        } else if self.low > at_most_ms {
            Verdict::Over
        } else {
            Verdict::Undecided
        }
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} ms (95 % interval {:.2} to {:.2} ms)", self.estimate, self.low, self.high)
    }
}

/// The difference `treated − baseline` at percentile `p` (0–100), each phase given as its
/// rounds' sorted latencies, with a percentile-bootstrap interval of `resamples` stratified
/// resamples drawn from a generator seeded with `seed` (the same inputs and seed give the same
/// interval). A phase without latencies counts as zero.
pub fn percentile_difference(
    treated: &[&[Duration]],
    baseline: &[&[Duration]],
    p: f64,
    resamples: usize,
    seed: u64,
) -> Interval {
    let pooled = |rounds: &[&[Duration]]| {
        let mut all: Vec<Duration> =
            rounds.iter().flat_map(|round| round.iter().copied()).collect();
        all.sort_unstable();
        all
    };
    let estimate = ms(percentile(&pooled(treated), p)) - ms(percentile(&pooled(baseline), p));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buffer = Vec::new();
    let mut resampled = |rounds: &[&[Duration]], rng: &mut fastrand::Rng| {
        buffer.clear();
        for round in rounds.iter().filter(|round| !round.is_empty()) {
            buffer.extend((0..round.len()).map(|_| round[rng.usize(..round.len())]));
        }
        if buffer.is_empty() {
            return 0.0;
        }
        let at = rank(buffer.len(), p);
        ms(*buffer.select_nth_unstable(at).1)
    };
    let differences = (0..resamples)
        .map(|_| resampled(treated, &mut rng) - resampled(baseline, &mut rng))
        .collect();
    interval(estimate, differences)
}

/// One time block of a paired measurement: the latencies of the CREATEs sent in it to each of
/// the two configurations measured at once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Block {
    /// Latencies of the configuration under test.
    pub treated: Vec<Duration>,
    /// Latencies of the configuration it is compared with.
    pub baseline: Vec<Duration>,
}

/// The difference `treated − baseline` at percentile `p` (0–100) of two configurations measured
/// at once, given as rounds of time [`Block`]s, with a percentile-bootstrap interval of
/// `resamples` resamples drawn from a generator seeded with `seed`. Each resample draws, in
/// every round, as many blocks as it has, with replacement, and takes both sides of each drawn
/// block, so what slowed a moment of the machine slows both sides of a resample alike. The
/// estimate is the difference of the pooled percentiles; a side without latencies counts as
/// zero.
pub fn paired_percentile_difference(
    rounds: &[&[Block]],
    p: f64,
    resamples: usize,
    seed: u64,
) -> Interval {
    let pooled = |side: fn(&Block) -> &Vec<Duration>| {
        let mut all: Vec<Duration> =
            rounds.iter().flat_map(|blocks| blocks.iter().flat_map(side)).copied().collect();
        all.sort_unstable();
        all
    };
    let estimate =
        ms(percentile(&pooled(|b| &b.treated), p)) - ms(percentile(&pooled(|b| &b.baseline), p));
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut treated_buffer, mut baseline_buffer) = (Vec::new(), Vec::new());
    let at = |buffer: &mut Vec<Duration>| {
        if buffer.is_empty() {
            return 0.0;
        }
        let at = rank(buffer.len(), p);
        ms(*buffer.select_nth_unstable(at).1)
    };
    let differences = (0..resamples)
        .map(|_| {
            treated_buffer.clear();
            baseline_buffer.clear();
            for blocks in rounds.iter().filter(|blocks| !blocks.is_empty()) {
                for _ in 0..blocks.len() {
                    let block = &blocks[rng.usize(..blocks.len())];
                    treated_buffer.extend_from_slice(&block.treated);
                    baseline_buffer.extend_from_slice(&block.baseline);
                }
            }
            at(&mut treated_buffer) - at(&mut baseline_buffer)
        })
        .collect();
    interval(estimate, differences)
}

/// The 95 % percentile-bootstrap [`Interval`] around `estimate` from the resampled
/// `differences` (the estimate alone when there are none).
fn interval(estimate: f64, mut differences: Vec<f64>) -> Interval {
    differences.sort_by(f64::total_cmp);
    let bound = |q: f64| {
        if differences.is_empty() {
            return estimate;
        }
        differences[rank(differences.len(), q)]
    };
    Interval { estimate, low: bound(2.5), high: bound(97.5) }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
