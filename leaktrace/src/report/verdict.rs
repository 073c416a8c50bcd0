//! A verdict per stack: from the series of what it held at each report (and the ages of what
//! it holds), is it a leak, a cache that levelled off, a sawtooth, churn, or too early to say.
//!
//! Pure functions of the samples, so every rule is tested on synthetic series. The rules, in
//! the order they are tried (an *interval* is the mean spacing of the samples):
//!
//! 1. **churn**: at least [`CHURN_INTERVALS`] samples, and at every one of them the oldest
//!    block held was younger than 1.5 intervals: what it takes, it gives back soon.
//! 2. **sawtooth**: at least two *releases* (a fall of a quarter of the window's peak or more
//!    from one sample to the next), unless the troughs between them keep rising (then the
//!    floor is a **leak**).
//! 3. **too-early**: fewer than [`MIN_INTERVALS`] samples since the stack first held
//!    something.
//! 4. **leak**: judged on the samples since its oldest block was made (its *generation*:
//!    at least [`MIN_INTERVALS`] of them): a least-squares slope above zero that fits
//!    (R² ≥ 0.8), still growing as fast over their recent half (at least 70% of the slope:
//!    not slowing down as a filling cache does), at its peak now (at least 90% of it), and,
//!    when the ages are known, blocks of every age: a median age of at least 20% of that
//!    window and at most 70% of the oldest. A cache that replaces its blocks never holds any
//!    as old as [`MIN_INTERVALS`] intervals once it is full, and a leak that starts after a
//!    phase of churn is judged from its start.
//! 5. **plateau**: the recent half of the window is flat (it moves by at most 20% of its
//!    peak), or the series fell and did not come back.
//! 6. anything else is still **too-early**: it grows, but not like a leak yet.
//!
//! A cache that is still filling looks like a leak; it is told apart once it levels off, and
//! not called a leak before [`MIN_INTERVALS`] samples.
use serde::Serialize;

/// Samples needed before any verdict but churn.
pub const MIN_INTERVALS: usize = 6;
/// Samples needed to call a stack churn.
pub const CHURN_INTERVALS: usize = 3;
/// Samples a full confidence needs.
const FULL_CONFIDENCE_INTERVALS: usize = 12;

/// What a stack's series looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Steady growth over the window.
    Leak,
    /// Grew, then levelled off (a cache, a pool).
    Plateau,
    /// Grows and is released, again and again.
    Sawtooth,
    /// Short-lived blocks: nothing is held for long.
    Churn,
    /// Not enough intervals yet (or not clear yet).
    TooEarly,
}

impl Shape {
    /// Every shape, in the order reports list them.
    pub const ALL: [Shape; 5] = [
        Shape::Leak,
        Shape::Plateau,
        Shape::Sawtooth,
        Shape::Churn,
        Shape::TooEarly,
    ];

    /// The name reports and metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Leak => "leak",
            Shape::Plateau => "plateau",
            Shape::Sawtooth => "sawtooth",
            Shape::Churn => "churn",
            Shape::TooEarly => "too-early",
        }
    }
}

/// One report's view of a stack: when, how much it held, and how old its oldest block was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since tracing started.
    pub t_s: f64,
    /// What it held: bytes (heap, growth), descriptors or temp files.
    pub value: u64,
    /// Age of its oldest block then, seconds (0 when it held nothing).
    pub oldest_s: f64,
}

/// The ages of what a stack holds now, when known (heap and growth rows).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ages {
    /// Median age, seconds.
    pub p50_s: f64,
    /// The oldest, seconds.
    pub max_s: f64,
}

/// A stack's verdict and the numbers behind it (the JSON `trend` of a row).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    /// `leak`, `plateau`, `sawtooth`, `churn` or `too-early`.
    pub verdict: Shape,
    /// How sure, 0 to 1 (two decimals).
    pub confidence: f64,
    /// Least-squares slope of the series, units per second.
    pub slope_per_s: f64,
    /// How well a straight line fits the series, R² from 0 to 1 (1 for a flat series).
    pub r2: f64,
    /// Samples the verdict is drawn from.
    pub intervals: u32,
    /// Seconds they span.
    pub window_s: f64,
    /// Falls of a quarter of the peak or more from one sample to the next.
    pub releases: u32,
    /// What `value` counts: `bytes`, `descriptors` or `files`.
    pub unit: &'static str,
    /// The samples, oldest first (since the stack first held something, at most
    /// [`crate::report::merge::TREND_SAMPLES`]): `[t_s, value]` pairs for charts.
    #[serde(serialize_with = "pairs")]
    pub series: Vec<Sample>,
}

fn pairs<S: serde::Serializer>(series: &[Sample], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(series.iter().map(|p| (p.t_s, p.value)))
}

/// A least-squares line through `(t, value)`: slope and R² (`None` for fewer than two
/// distinct times). A flat series fits perfectly (R² 1).
pub fn fit(points: &[Sample]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.t_s).sum::<f64>() / n;
    let my = points.iter().map(|p| p.value as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for p in points {
        let (dx, dy) = (p.t_s - mx, p.value as f64 - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let r2 = if syy <= 0.0 {
        1.0
    } else {
        (sxy * sxy / (sxx * syy)).clamp(0.0, 1.0)
    };
    Some((slope, r2))
}

fn round2(x: f64) -> f64 {
    if x.is_finite() {
        (x * 100.0).round() / 100.0
    } else {
        0.0
    }
}

/// Judges a stack from its samples (oldest first) and, when known, the ages of what it
/// holds now. `unit` names what the values count.
pub fn judge(samples: &[Sample], ages: Option<Ages>, unit: &'static str) -> Verdict {
    // Before the stack first held anything, the samples say nothing about it.
    let start = samples
        .iter()
        .position(|p| p.value > 0)
        .unwrap_or(samples.len());
    let pts = &samples[start..];
    let n = pts.len();
    let window_s = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) => b.t_s - a.t_s,
        _ => 0.0,
    };
    let interval_s = if n >= 2 {
        window_s / (n - 1) as f64
    } else {
        0.0
    };
    let (shape, confidence, basis) = shape(pts, ages, interval_s);
    let basis = &pts[n - basis.min(n)..];
    let (slope, r2) = fit(basis).unwrap_or((0.0, 0.0));
    let grow = |c: f64| {
        c * (basis.len().min(FULL_CONFIDENCE_INTERVALS) as f64) / FULL_CONFIDENCE_INTERVALS as f64
    };
    let confidence = match shape {
        Shape::TooEarly => (n as f64 / MIN_INTERVALS as f64).min(0.99) * confidence,
        Shape::Churn | Shape::Sawtooth => confidence,
        Shape::Leak | Shape::Plateau => grow(confidence),
    };
    Verdict {
        verdict: shape,
        confidence: round2(confidence),
        slope_per_s: round2(slope),
        r2: round2(r2),
        intervals: basis.len() as u32,
        window_s: round2(match (basis.first(), basis.last()) {
            (Some(a), Some(b)) => b.t_s - a.t_s,
            _ => 0.0,
        }),
        releases: releases(pts).len() as u32,
        unit,
        series: pts.to_vec(),
    }
}

/// The samples after which the value fell by a quarter of the peak or more.
fn releases(pts: &[Sample]) -> Vec<usize> {
    let peak = pts.iter().map(|p| p.value).max().unwrap_or(0);
    let drop = (peak / 4).max(1);
    (1..pts.len())
        .filter(|&i| pts[i - 1].value >= pts[i].value.saturating_add(drop))
        .collect()
}

/// The rules of the module's documentation, in order: the shape, a raw confidence, and how
/// many of the latest samples the verdict rests on (its slope and fit are theirs).
fn shape(pts: &[Sample], ages: Option<Ages>, interval_s: f64) -> (Shape, f64, usize) {
    let n = pts.len();
    let peak = pts.iter().map(|p| p.value).max().unwrap_or(0);
    if n >= CHURN_INTERVALS && pts.iter().all(|p| p.oldest_s < 1.5 * interval_s) {
        let most = pts.iter().map(|p| p.oldest_s).fold(0.0, f64::max);
        let confidence = (1.0 - most / (1.5 * interval_s)).clamp(0.5, 1.0);
        return (Shape::Churn, confidence, n);
    }
    let releases = releases(pts);
    if releases.len() >= 2 {
        // The lowest point after each release: a floor that keeps rising is a leak under
        // the sawtooth (a GC'd heap that still leaks).
        let troughs: Vec<u64> = releases
            .iter()
            .map(|&i| {
                let next = releases.iter().find(|&&j| j > i).copied().unwrap_or(n);
                pts[i..next].iter().map(|p| p.value).min().unwrap_or(0)
            })
            .collect();
        let rising = troughs.len() >= 3
            && troughs.windows(2).all(|w| w[1] > w[0])
            && troughs[troughs.len() - 1] - troughs[0] >= peak / 5;
        if rising {
            return (Shape::Leak, 0.6, n);
        }
        return (Shape::Sawtooth, (releases.len() as f64 / 4.0).min(1.0), n);
    }
    if n < MIN_INTERVALS {
        return (Shape::TooEarly, 1.0, n);
    }
    // A leak is judged on the samples since its oldest block was made: what it held before
    // is gone (a phase of churn before the leak began), and a cache that replaces its blocks
    // never has enough of them.
    let last = pts[n - 1];
    let born = last.t_s - last.oldest_s - 0.5 * interval_s;
    let kept = pts.iter().rev().take_while(|p| p.t_s >= born).count();
    let since = &pts[n - kept..];
    if since.len() >= MIN_INTERVALS
        && let Some((slope, r2)) = fit(since)
    {
        let since_peak = since.iter().map(|p| p.value).max().unwrap_or(0);
        let span = since[since.len() - 1].t_s - since[0].t_s;
        let (recent_slope, _) = fit(&since[since.len() / 2..]).unwrap_or((0.0, 0.0));
        // A leak holds blocks of every age up to its window: neither only young ones (a
        // cache replacing them) nor only old ones (pages a cache or a pool made once).
        let skewed = ages.is_some_and(|a| a.p50_s < 0.2 * span || a.p50_s > 0.7 * a.max_s);
        if slope > 0.0
            && r2 >= 0.8
            && recent_slope >= 0.7 * slope
            && last.value as f64 >= 0.9 * since_peak as f64
            && !skewed
        {
            return (Shape::Leak, r2, since.len());
        }
    }
    let half = &pts[n / 2..];
    let recent_peak = half.iter().map(|p| p.value).max().unwrap_or(0);
    let recent_low = half.iter().map(|p| p.value).min().unwrap_or(0);
    let moved = (recent_peak - recent_low) as f64 / recent_peak.max(1) as f64;
    if moved <= 0.2 {
        return (Shape::Plateau, 1.0 - moved, n);
    }
    if releases.len() == 1 && (last.value as f64) < 0.75 * peak as f64 {
        return (Shape::Plateau, 0.5, n);
    }
    (Shape::TooEarly, 0.5, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every `dt` seconds of `values`; the oldest block is as old as the run of
    /// non-zero values before it (a stack that keeps what it takes).
    fn kept(dt: f64, values: &[u64]) -> Vec<Sample> {
        let mut since = None;
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let t_s = i as f64 * dt;
                since = if v == 0 { None } else { since.or(Some(t_s)) };
                Sample {
                    t_s,
                    value: v,
                    oldest_s: since.map_or(0.0, |s| t_s - s + dt),
                }
            })
            .collect()
    }

    /// Samples whose oldest block is `age` seconds old whatever the value (replaced blocks).
    fn aged(dt: f64, values: &[u64], age: f64) -> Vec<Sample> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| Sample {
                t_s: i as f64 * dt,
                value: v,
                oldest_s: if v == 0 { 0.0 } else { age },
            })
            .collect()
    }

    fn linear(n: usize, step: u64) -> Vec<u64> {
        (1..=n as u64).map(|i| i * step).collect()
    }

    #[test]
    fn a_straight_line_is_a_leak_once_there_are_enough_intervals() {
        for n in 1..MIN_INTERVALS {
            let v = judge(&kept(0.2, &linear(n, 1000)), None, "bytes");
            assert_eq!(v.verdict, Shape::TooEarly, "{n} intervals: {v:?}");
        }
        let v = judge(&kept(0.2, &linear(MIN_INTERVALS, 1000)), None, "bytes");
        assert_eq!(v.verdict, Shape::Leak);
        assert_eq!(v.slope_per_s, 5000.0);
        assert_eq!(v.r2, 1.0);
        assert_eq!(v.intervals, MIN_INTERVALS as u32);
        assert_eq!(v.window_s, 1.0);
        assert_eq!(v.confidence, 0.5);
        let v = judge(&kept(0.2, &linear(20, 1000)), None, "bytes");
        assert_eq!((v.verdict, v.confidence), (Shape::Leak, 1.0));
    }

    #[test]
    fn a_leak_that_starts_late_is_judged_from_its_start() {
        let mut values = vec![0; 10];
        values.extend(linear(MIN_INTERVALS, 4096));
        let v = judge(&kept(0.2, &values), None, "bytes");
        assert_eq!(v.verdict, Shape::Leak);
        assert_eq!(v.intervals, MIN_INTERVALS as u32);
        assert_eq!(v.series.len(), MIN_INTERVALS);
    }

    #[test]
    fn a_cache_that_filled_is_a_plateau_and_never_a_leak() {
        // Fills in 3 intervals, then replaces its entries: the oldest is 0.6 s old at most.
        let mut values = vec![30_000, 60_000, 90_000];
        for n in 4..=32 {
            values.push(100_000 + (n % 3) * 500);
            let v = judge(
                &aged(0.2, &values, 0.6),
                Some(Ages {
                    p50_s: 0.3,
                    max_s: 0.6,
                }),
                "bytes",
            );
            assert_ne!(v.verdict, Shape::Leak, "{n} intervals: {v:?}");
            if n >= MIN_INTERVALS as u64 {
                assert_eq!(v.verdict, Shape::Plateau, "{n} intervals: {v:?}");
            }
        }
    }

    #[test]
    fn a_growing_cache_of_young_blocks_is_not_a_leak() {
        // Growing in bytes (its entries get bigger) but every block is young: replaced.
        let v = judge(&aged(0.2, &linear(12, 1000), 0.3), None, "bytes");
        assert_ne!(v.verdict, Shape::Leak, "{v:?}");
        let v = judge(
            &kept(0.2, &linear(12, 1000)),
            Some(Ages {
                p50_s: 0.01,
                max_s: 2.4,
            }),
            "bytes",
        );
        assert_ne!(v.verdict, Shape::Leak, "{v:?}");
    }

    #[test]
    fn pages_made_once_and_a_late_step_are_not_a_leak() {
        // A cache's pages in growth mode: made while it filled, then a few more: it fits a
        // line well enough, but its pages are nearly all as old as the oldest.
        let values = [40, 70, 90, 100, 100, 100, 110, 140];
        let pts = kept(0.2, &values);
        let line = judge(&pts, None, "bytes");
        assert_eq!(
            line.verdict,
            Shape::Leak,
            "without ages it is one: {line:?}"
        );
        let old = Ages {
            p50_s: 1.3,
            max_s: 1.6,
        };
        assert_ne!(judge(&pts, Some(old), "bytes").verdict, Shape::Leak);
        // A leak's blocks: the median half the oldest.
        let every = Ages {
            p50_s: 0.8,
            max_s: 1.6,
        };
        assert_eq!(judge(&pts, Some(every), "bytes").verdict, Shape::Leak);
    }

    #[test]
    fn a_pool_allocated_up_front_is_a_plateau() {
        let v = judge(
            &kept(10.0, &[1 << 20; 8]),
            Some(Ages {
                p50_s: 80.0,
                max_s: 80.0,
            }),
            "bytes",
        );
        assert_eq!(v.verdict, Shape::Plateau);
        assert_eq!((v.slope_per_s, v.r2, v.confidence), (0.0, 1.0, 0.67));
    }

    #[test]
    fn releases_again_and_again_are_a_sawtooth() {
        // Grows for 3 intervals, frees everything, again.
        let values = [100, 200, 300, 0, 100, 200, 300, 0, 100, 200];
        let mut since = 0.0;
        let pts: Vec<Sample> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let t_s = i as f64 * 0.2;
                if v == 100 {
                    since = t_s - 0.1;
                }
                Sample {
                    t_s,
                    value: v,
                    oldest_s: if v == 0 { 0.0 } else { t_s - since },
                }
            })
            .collect();
        assert_eq!(judge(&pts[..4], None, "bytes").verdict, Shape::TooEarly);
        let v = judge(&pts[..8], None, "bytes");
        assert_eq!((v.verdict, v.releases), (Shape::Sawtooth, 2));
        assert_eq!(judge(&pts, None, "bytes").verdict, Shape::Sawtooth);
    }

    #[test]
    fn a_sawtooth_whose_floor_rises_is_a_leak() {
        let values = [100, 200, 50, 150, 250, 100, 200, 300, 150, 250, 350, 200];
        let v = judge(&kept(1.0, &values), None, "bytes");
        assert_eq!(v.verdict, Shape::Leak, "{v:?}");
        assert_eq!(v.releases, 4);
    }

    #[test]
    fn short_lived_blocks_are_churn() {
        // Whatever it holds at a report is younger than the interval, even when it is
        // sometimes nothing.
        let values = [10, 0, 30, 20, 0, 40];
        let pts = aged(0.2, &values, 0.05);
        assert_eq!(judge(&pts[..2], None, "bytes").verdict, Shape::TooEarly);
        let v = judge(&pts, None, "bytes");
        assert_eq!(v.verdict, Shape::Churn, "{v:?}");
        assert!(v.confidence >= 0.5);
    }

    #[test]
    fn a_shrinking_stack_is_a_plateau_not_a_leak() {
        let v = judge(
            &kept(1.0, &[100, 200, 300, 400, 100, 100, 90, 80]),
            None,
            "bytes",
        );
        assert_eq!(v.verdict, Shape::Plateau, "{v:?}");
    }

    #[test]
    fn nothing_or_garbage_does_not_panic() {
        let v = judge(&[], None, "bytes");
        assert_eq!(
            (v.verdict, v.intervals, v.confidence),
            (Shape::TooEarly, 0, 0.0)
        );
        let same_time = [Sample {
            t_s: 1.0,
            value: 5,
            oldest_s: f64::NAN,
        }; 8];
        let v = judge(&same_time, None, "files");
        assert!(v.slope_per_s.is_finite() && v.confidence.is_finite());
        let huge = aged(1.0, &[u64::MAX, 1, u64::MAX, 1, u64::MAX, 1], 5.0);
        assert_eq!(judge(&huge, None, "bytes").verdict, Shape::Sawtooth);
        assert_eq!(
            serde_json::to_string(&judge(&kept(1.0, &[1, 2]), None, "fds")).unwrap(),
            r#"{"verdict":"too-early","confidence":0.33,"slope_per_s":1.0,"r2":1.0,"intervals":2,"window_s":1.0,"releases":0,"unit":"fds","series":[[0.0,1],[1.0,2]]}"#
        );
    }
}
