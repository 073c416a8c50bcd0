//! Verdicts on the real kernel: fixture programs of known shapes, traced with reports every
//! 200 ms, must get their verdict within a stated number of intervals (see README, "What a
//! report says"), and the cache must never be called a leak.
mod common;

use common::{Report, c_fixture, privileged, run};
use serde_json::Value;

/// Reports every this often: short, so the tests are quick.
const INTERVAL: &str = "200ms";

/// The interval reports (not the final one) of `leaktrace run` on a fixture.
fn reports(fixture: &str, extra: &[&str], args: &[&str]) -> Vec<Report> {
    let prog = c_fixture(fixture);
    let mut all = vec!["run", "--format", "json", "--interval", INTERVAL];
    all.extend_from_slice(extra);
    all.push("--");
    all.push(prog.to_str().unwrap());
    all.extend_from_slice(args);
    let run = run(&all);
    assert!(run.status.success(), "{}", run.stderr);
    let reports: Vec<Report> = run
        .reports()
        .into_iter()
        .filter(|r| r.0["final"] == false)
        .collect();
    assert!(reports.len() >= 10, "too few reports:\n{}", run.stdout);
    reports
}

/// In each report, the heaviest live row whose stack passes through `function`, if any.
fn rows<'a>(reports: &'a [Report], function: &str) -> Vec<Option<&'a Value>> {
    rows_of(reports, "leaks", function)
}

/// [`rows`] of the list `list` (`leaks`, `fd_leaks`, `tmp_leaks`).
fn rows_of<'a>(reports: &'a [Report], list: &str, function: &str) -> Vec<Option<&'a Value>> {
    reports
        .iter()
        .map(|r| {
            r.0[list]
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| l["at_exit"] == false)
                .find(|l| {
                    l["frames"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|f| f["symbol"].as_str() == Some(function))
                })
        })
        .collect()
}

fn verdict(row: Option<&Value>) -> &str {
    row.map_or("-", |r| r["trend"]["verdict"].as_str().unwrap_or("?"))
}

/// The verdicts in order, for messages: `too-early too-early - leak …`.
fn story(rows: &[Option<&Value>]) -> String {
    rows.iter()
        .map(|r| verdict(*r))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How many intervals after `from` (counted from 1) the row first got `want`.
fn latency(rows: &[Option<&Value>], from: usize, want: &str) -> Option<usize> {
    rows[from..]
        .iter()
        .position(|r| verdict(*r) == want)
        .map(|i| i + 1)
}

/// The first report in which the row appears.
fn first_seen(rows: &[Option<&Value>]) -> usize {
    rows.iter()
        .position(Option::is_some)
        .unwrap_or_else(|| panic!("the row never appears: {}", story(rows)))
}

/// Asserts the row gets `want` within `within` intervals of `from` and keeps it.
#[track_caller]
fn settles(rows: &[Option<&Value>], from: usize, want: &str, within: usize) -> usize {
    let story = story(rows);
    let at = latency(rows, from, want).unwrap_or_else(|| panic!("never {want}: {story}"));
    assert!(
        at <= within,
        "{want} after {at} intervals, not within {within}: {story}"
    );
    let after = &rows[from + at..];
    assert!(
        after.iter().all(|r| r.is_none() || verdict(*r) == want),
        "{want}, then something else: {story}"
    );
    at
}

#[test]
fn a_linear_leak_is_a_leak_within_seven_intervals() {
    if !privileged() {
        return;
    }
    let reports = reports("verdict_leak", &[], &["4000"]);
    let rows = rows(&reports, "leak_site");
    let at = settles(&rows, first_seen(&rows), "leak", 7);
    eprintln!("leak after {at} intervals: {}", story(&rows));
    let row = rows.last().unwrap().unwrap();
    let trend = &row["trend"];
    // 1 KiB every 10 ms: ~100 KiB/s, a straight line.
    let slope = trend["slope_per_s"].as_f64().unwrap();
    assert!((50_000.0..150_000.0).contains(&slope), "{trend}");
    assert!(trend["r2"].as_f64().unwrap() >= 0.95, "{trend}");
    assert!(trend["confidence"].as_f64().unwrap() >= 0.5, "{trend}");
    assert_eq!(trend["unit"], "bytes");
    // Blocks of every age up to the window: the median about half the oldest.
    let held = &row["held"];
    assert_eq!(held["blocks"], row["outstanding_count"], "{held}");
    let (p50, max) = (
        held["age_s"]["p50"].as_f64().unwrap(),
        held["age_s"]["max"].as_f64().unwrap(),
    );
    assert!(max >= 2.5 && p50 >= 0.3 * max && p50 <= 0.7 * max, "{held}");
    assert_eq!(held["size_bytes"]["max"], 1024, "{held}");
}

#[test]
fn a_bounded_lru_cache_levels_off_and_is_never_a_leak() {
    if !privileged() {
        return;
    }
    let reports = reports("verdict_cache", &[], &["4000"]);
    let rows = rows(&reports, "cache_insert");
    assert!(
        rows.iter().all(|r| verdict(*r) != "leak"),
        "the cache was called a leak: {}",
        story(&rows)
    );
    let at = settles(&rows, first_seen(&rows), "plateau", 8);
    eprintln!("plateau after {at} intervals: {}", story(&rows));
    // 64 entries, replaced: none as old as the run.
    let row = rows.last().unwrap().unwrap();
    assert_eq!(row["outstanding_count"], 64);
    assert!(row["held"]["age_s"]["max"].as_f64().unwrap() < 3.0, "{row}");
}

#[test]
fn a_sawtooth_is_a_sawtooth_within_twelve_intervals() {
    if !privileged() {
        return;
    }
    // Freed every 800 ms: every 4 intervals.
    let reports = reports("verdict_sawtooth", &[], &["5000", "800"]);
    let rows = rows(&reports, "batch_add");
    assert!(
        rows.iter().all(|r| verdict(*r) != "leak"),
        "a sawtooth was called a leak: {}",
        story(&rows)
    );
    let at = settles(&rows, first_seen(&rows), "sawtooth", 12);
    eprintln!("sawtooth after {at} intervals: {}", story(&rows));
    assert!(
        rows.last().unwrap().unwrap()["trend"]["releases"]
            .as_u64()
            .unwrap()
            >= 2
    );
}

#[test]
fn churn_is_churn_within_five_intervals() {
    if !privileged() {
        return;
    }
    let reports = reports("verdict_churn", &[], &["3000"]);
    let rows = rows(&reports, "churn_site");
    assert!(
        rows.iter().all(|r| verdict(*r) != "leak"),
        "churn was called a leak: {}",
        story(&rows)
    );
    let at = settles(&rows, first_seen(&rows), "churn", 5);
    eprintln!("churn after {at} intervals: {}", story(&rows));
}

#[test]
fn a_leak_that_starts_late_is_a_leak_within_eight_intervals_of_its_start() {
    if !privileged() {
        return;
    }
    let reports = reports("verdict_late", &[], &["5000", "1500"]);
    let rows = rows(&reports, "late_site");
    // The leak has started once the row holds a block older than a churned one (2 ms).
    let start = rows
        .iter()
        .position(|r| r.is_some_and(|r| r["oldest_age_s"].as_f64().unwrap() >= 0.05))
        .unwrap_or_else(|| panic!("the leak never starts: {}", story(&rows)));
    assert!(start >= 4, "the leak started too early: {}", story(&rows));
    assert!(
        rows[..start].iter().all(|r| verdict(*r) != "leak"),
        "a leak before it started: {}",
        story(&rows)
    );
    let at = settles(&rows, start, "leak", 8);
    eprintln!("leak {at} intervals after it started: {}", story(&rows));
}

#[test]
fn growth_mode_pages_get_the_same_verdicts() {
    if !privileged() {
        return;
    }
    let leak = reports("verdict_leak", &["--mode", "growth"], &["4000"]);
    let rows_leak = rows(&leak, "leak_site");
    let at = settles(&rows_leak, first_seen(&rows_leak), "leak", 8);
    eprintln!("growth: leak after {at} intervals: {}", story(&rows_leak));
    let last = rows_leak.last().unwrap().unwrap();
    assert_eq!(last["kind"], "growth");
    assert_eq!(last["held"]["size_bytes"]["max"], 4096, "{last}");
    let cache = reports("verdict_cache", &["--mode", "growth"], &["4000"]);
    let rows_cache = rows(&cache, "cache_insert");
    assert!(
        rows_cache.iter().all(|r| verdict(*r) != "leak"),
        "the cache's pages were called a leak: {}",
        story(&rows_cache)
    );
}

#[test]
fn descriptors_get_the_same_verdicts() {
    if !privileged() {
        return;
    }
    let reports = reports("verdict_fd", &["--only", "fd"], &["4000"]);
    let leak = rows_of(&reports, "fd_leaks", "open_leak");
    let at = settles(&leak, first_seen(&leak), "leak", 8);
    eprintln!("descriptors: leak after {at} intervals: {}", story(&leak));
    let trend = &leak.last().unwrap().unwrap()["trend"];
    assert_eq!(trend["unit"], "descriptors");
    // One every 20 ms.
    let slope = trend["slope_per_s"].as_f64().unwrap();
    assert!((25.0..75.0).contains(&slope), "{trend}");
    let pool = rows_of(&reports, "fd_leaks", "open_pool");
    let at = settles(&pool, first_seen(&pool), "plateau", 8);
    eprintln!(
        "descriptors: plateau after {at} intervals: {}",
        story(&pool)
    );
    assert_eq!(pool.last().unwrap().unwrap()["outstanding"], 8);
}
