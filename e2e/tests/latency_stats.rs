//! The latency statistics of the benchmark harnesses (`src/latency.rs`): percentiles, medians
//! and the bootstrap interval `create_latency` judges issue 14's p99 target with. Pure
//! functions: no cluster.

use std::time::Duration;

use arcguard_e2e::latency::{
    Block, Interval, Verdict, median, paired_percentile_difference, percentile,
    percentile_difference, spread,
};

fn micros(values: impl IntoIterator<Item = u64>) -> Vec<Duration> {
    let mut v: Vec<Duration> = values.into_iter().map(Duration::from_micros).collect();
    v.sort_unstable();
    v
}

/// Latencies shaped like a phase's: 4–6 ms, and 3 % of them up to `tail_us` slower.
fn phase_like(seed: u64, n: usize, tail_us: u64, shift_us: u64) -> Vec<Duration> {
    let mut rng = fastrand::Rng::with_seed(seed);
    micros((0..n).map(|_| {
        let body = 4_000 + rng.u64(..2_000);
        let tail = if rng.u8(..100) < 3 { rng.u64(..tail_us) } else { 0 };
        body + tail + shift_us
    }))
}

#[test]
fn nearest_rank_percentiles() {
    let hundred = micros(1..=100);
    for (p, want) in [(0.0, 1), (1.0, 1), (50.0, 50), (99.0, 99), (99.5, 100), (100.0, 100)] {
        assert_eq!(percentile(&hundred, p), Duration::from_micros(want), "p{p}");
    }
    assert_eq!(percentile(&micros([7]), 99.0), Duration::from_micros(7));
    assert_eq!(percentile(&[], 50.0), Duration::ZERO);
}

#[test]
fn medians_and_spreads() {
    assert_eq!(median(&[]), 0.0);
    assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
    assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    assert_eq!(spread(vec![9.0, 1.0, 2.0], 1), "2.0 (1.0–9.0)");
    assert_eq!(spread(vec![3.0], 2), "3.00");
    assert_eq!(spread(vec![], 2), "–");
}

#[test]
fn a_phase_against_itself_differs_by_nothing() {
    let rounds: Vec<Vec<Duration>> = (0..3).map(|r| phase_like(r, 1_000, 25_000, 0)).collect();
    let rounds: Vec<&[Duration]> = rounds.iter().map(Vec::as_slice).collect();
    let interval = percentile_difference(&rounds, &rounds, 99.0, 500, 1);
    assert_eq!(interval.estimate, 0.0);
    assert!(interval.low < 0.0 && interval.high > 0.0, "{interval}");
    assert_eq!(interval.against(1.0), Verdict::Undecided, "{interval}");
}

#[test]
fn a_shift_is_found_and_judged_against_the_bound() {
    // A tail of up to 4 ms: with the 25 ms tail of a busy machine, 3,000 samples leave a
    // p99 too unsteady to see even 5 ms (the test above).
    let baseline: Vec<Vec<Duration>> = (0..3).map(|r| phase_like(r, 1_000, 4_000, 0)).collect();
    let baseline: Vec<&[Duration]> = baseline.iter().map(Vec::as_slice).collect();
    for (shift_us, bound_ms, verdict) in [
        // Every CREATE 5 ms slower: the p99 is clearly more than 1 ms slower.
        (5_000, 1.0, Verdict::Over),
        // The same 5 ms against a bound of 10 ms: clearly within.
        (5_000, 10.0, Verdict::Within),
    ] {
        // Other draws of the same distribution, shifted: sampling noise as in a real run.
        let treated: Vec<Vec<Duration>> =
            (10..13).map(|r| phase_like(r, 1_000, 4_000, shift_us)).collect();
        let treated: Vec<&[Duration]> = treated.iter().map(Vec::as_slice).collect();
        let interval = percentile_difference(&treated, &baseline, 99.0, 500, 7);
        assert!(
            interval.low <= interval.estimate && interval.estimate <= interval.high,
            "{interval}"
        );
        assert!(interval.low > 0.0, "a 5 ms shift is seen: {interval}");
        assert_eq!(interval.against(bound_ms), verdict, "{shift_us} µs: {interval}");
    }
}

#[test]
fn the_same_seed_gives_the_same_interval() {
    let a = phase_like(1, 500, 4_000, 300);
    let b = phase_like(2, 500, 4_000, 0);
    let run = |seed| percentile_difference(&[&a], &[&b], 99.0, 200, seed);
    assert_eq!(run(3), run(3));
    // Another seed draws other resamples (an interval may still coincide: the data are discrete).
    assert!((4..20).any(|seed| run(seed) != run(3)));
}

#[test]
fn empty_phases_count_as_zero() {
    let a = phase_like(1, 100, 4_000, 0);
    let interval = percentile_difference(&[&a], &[&[]], 50.0, 50, 1);
    assert!(interval.estimate > 4.0 && interval.low > 4.0, "{interval}");
    let none = percentile_difference(&[], &[], 99.0, 0, 1);
    assert_eq!(none, Interval { estimate: 0.0, low: 0.0, high: 0.0 });
}

/// Rounds of one-second blocks of two configurations measured at once, 25 CREATEs each a
/// block, as `create_latency --paired` sends them at 50 a second: 4–6 ms each, the treated
/// side `shift_us` slower, and in 5 % of the blocks a stall of the machine of up to 20 ms that
/// slows every CREATE of the block, on both sides.
fn paired_rounds(seed: u64, rounds: usize, shift_us: u64) -> Vec<Vec<Block>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..rounds)
        .map(|_| {
            (0..300)
                .map(|_| {
                    let stall = if rng.u8(..100) < 5 { rng.u64(..20_000) } else { 0 };
                    let mut side = |shift: u64| {
                        micros((0..25).map(|_| 4_000 + rng.u64(..2_000) + stall + shift))
                    };
                    Block { treated: side(shift_us), baseline: side(0) }
                })
                .collect()
        })
        .collect()
}

#[test]
fn pairing_sees_through_stalls_that_reach_both_sides() {
    let rounds = paired_rounds(5, 3, 300);
    let blocks: Vec<&[Block]> = rounds.iter().map(Vec::as_slice).collect();
    let paired = paired_percentile_difference(&blocks, 99.0, 500, 11);
    // The same CREATEs taken as if the sides had been measured in turn.
    let side = |pick: fn(&Block) -> &Vec<Duration>| -> Vec<Vec<Duration>> {
        rounds
            .iter()
            .map(|round| {
                let mut all: Vec<Duration> = round.iter().flat_map(pick).copied().collect();
                all.sort_unstable();
                all
            })
            .collect()
    };
    let (treated, baseline) = (side(|b| &b.treated), side(|b| &b.baseline));
    let treated: Vec<&[Duration]> = treated.iter().map(Vec::as_slice).collect();
    let baseline: Vec<&[Duration]> = baseline.iter().map(Vec::as_slice).collect();
    let unpaired = percentile_difference(&treated, &baseline, 99.0, 500, 11);
    assert_eq!(paired.estimate, unpaired.estimate, "the same pooled percentiles");
    assert!(paired.low <= paired.estimate && paired.estimate <= paired.high, "{paired}");
    assert!(
        (paired.high - paired.low) * 4.0 < unpaired.high - unpaired.low,
        "paired {paired} against unpaired {unpaired}"
    );
    assert_eq!(paired.against(1.0), Verdict::Within, "{paired}");
    assert_eq!(unpaired.against(1.0), Verdict::Undecided, "{unpaired}");
    // A 3 ms shift under the same stalls is over the bound.
    let slower = paired_rounds(5, 3, 3_000);
    let slower: Vec<&[Block]> = slower.iter().map(Vec::as_slice).collect();
    let over = paired_percentile_difference(&slower, 99.0, 500, 11);
    assert_eq!(over.against(1.0), Verdict::Over, "{over}");
}

#[test]
fn sides_alike_in_every_block_differ_by_nothing_in_every_resample() {
    let mut rounds = paired_rounds(9, 2, 0);
    for block in rounds.iter_mut().flatten() {
        block.treated = block.baseline.clone();
    }
    let blocks: Vec<&[Block]> = rounds.iter().map(Vec::as_slice).collect();
    let interval = paired_percentile_difference(&blocks, 99.0, 300, 2);
    assert_eq!(interval, Interval { estimate: 0.0, low: 0.0, high: 0.0 });
}

#[test]
fn paired_empty_sides_count_as_zero() {
    let none = paired_percentile_difference(&[], 99.0, 10, 1);
    assert_eq!(none, Interval { estimate: 0.0, low: 0.0, high: 0.0 });
    let one_side = [Block { treated: micros([5_000, 6_000]), baseline: Vec::new() }];
    let interval = paired_percentile_difference(&[&one_side], 50.0, 20, 1);
    assert_eq!(interval, Interval { estimate: 5.0, low: 5.0, high: 5.0 });
}
