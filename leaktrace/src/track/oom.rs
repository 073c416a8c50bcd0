//! OOM kills: what leaktrace remembers so that, when the OOM killer strikes, the record says
//! more than `Exit Code: 137` — where the victim lived, how fast its heap grew before, and
//! (built by the session) which stacks held its memory. Records are written out at once,
//! to a log that survives the victim and the tracer.
use std::{collections::VecDeque, fs::OpenOptions, io::Write as _, path::PathBuf};

use hashbrown::HashMap;

use crate::{
    report::{GrowthSample, OomKill},
    targets::{cgroup::Attribution, host::Host},
};

/// How far back growth is kept, and how often it is sampled (by the session's tick).
const HISTORY_MS: u32 = 10 * 60 * 1000;

/// Per traced process: outstanding heap bytes over time, and where it lives.
#[derive(Debug, Default)]
pub struct OomWatch {
    history: HashMap<u32, VecDeque<(u32, u64)>>,
    attributions: HashMap<u32, Attribution>,
    /// Every OOM kill seen, oldest first.
    pub records: Vec<OomKill>,
    log: Option<PathBuf>,
}

impl OomWatch {
    /// Records are also appended, one JSON line each, to `log`.
    pub fn new(log: Option<PathBuf>) -> Self {
        Self {
            log,
            ..Default::default()
        }
    }

    /// Remembers where a traced process lives, while it certainly exists.
    pub fn track(&mut self, host: &dyn Host, pid: u32) {
        if let Some(p) = host.attribution(pid) {
            self.attributions.insert(pid, p);
        }
    }

    /// Forgets a process that is gone.
    pub fn forget(&mut self, pid: u32) {
        self.history.remove(&pid);
        self.attributions.remove(&pid);
    }

    /// Notes a process's outstanding heap bytes at `at_ms`.
    pub fn sample(&mut self, pid: u32, at_ms: u32, bytes: u64) {
        let h = self.history.entry(pid).or_default();
        h.push_back((at_ms, bytes));
        while h
            .front()
            .is_some_and(|&(t, _)| at_ms.saturating_sub(t) > HISTORY_MS)
        {
            h.pop_front();
        }
    }

    /// Where the victim `pid` of the kill just seen lived (see [`Host::victim_attribution`]).
    pub fn victim_attribution(&self, host: &dyn Host, pid: u32) -> Option<Attribution> {
        host.victim_attribution(pid, self.attributions.get(&pid))
    }

    /// The growth before `at_ms`: a sample about every 30 s over the last 10 minutes, now
    /// included, and the rate over the last minute.
    pub fn growth(&self, pid: u32, at_ms: u32, now_bytes: u64) -> (Vec<GrowthSample>, Option<f64>) {
        let Some(h) = self.history.get(&pid) else {
            return (
                vec![GrowthSample {
                    t_s: 0.0,
                    outstanding_bytes: now_bytes,
                }],
                None,
            );
        };
        let mut samples: Vec<GrowthSample> = Vec::new();
        let mut next_ms = 0u32;
        for &(t, bytes) in h.iter().rev() {
            let ago = at_ms.saturating_sub(t);
            if ago >= next_ms {
                samples.push(GrowthSample {
                    t_s: -f64::from(ago) / 1e3,
                    outstanding_bytes: bytes,
                });
                next_ms = ago + 30_000;
            }
        }
        samples.reverse();
        samples.push(GrowthSample {
            t_s: 0.0,
            outstanding_bytes: now_bytes,
        });
        let minute_ago = h.iter().find(|&&(t, _)| at_ms.saturating_sub(t) <= 60_000);
        let rate = minute_ago.and_then(|&(t, bytes)| {
            let dt = f64::from(at_ms.saturating_sub(t)) / 1e3;
            (dt >= 1.0).then(|| (now_bytes as f64 - bytes as f64) / dt)
        });
        (samples, rate)
    }

    /// Keeps a record and writes it to the log at once (appended and synced).
    pub fn record(&mut self, kill: OomKill) {
        if let Some(path) = &self.log {
            let line = serde_json::to_string(&kill).unwrap_or_default();
            let written = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| {
                    f.write_all(line.as_bytes())?;
                    f.write_all(b"\n")?;
                    f.sync_data()
                });
            if let Err(e) = written {
                tracing::error!("cannot append the OOM record to {}: {e}", path.display());
            }
        }
        self.records.push(kill);
    }
}

/// Now as RFC 3339 UTC, to the second.
/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_478_400 + 3_723), "2026-11-24T01:02:03Z");
    }

    #[test]
    fn growth_before_a_kill() {
        let mut w = OomWatch::default();
        for s in 0..=120u32 {
            w.sample(7, s * 1000, u64::from(s) * 1_000_000);
        }
        let (samples, rate) = w.growth(7, 121_000, 121_000_000);
        assert_eq!(samples.last().unwrap().outstanding_bytes, 121_000_000);
        assert!(samples.first().unwrap().t_s <= -100.0, "{samples:?}");
        assert!(samples.windows(2).all(|p| p[0].t_s < p[1].t_s));
        assert!((rate.unwrap() - 1e6).abs() < 1.0, "{rate:?}");
        let (only_now, none) = w.growth(8, 0, 5);
        assert_eq!((only_now.len(), none), (1, None));
    }

    #[test]
    fn history_is_bounded() {
        let mut w = OomWatch::default();
        for s in 0..2000u32 {
            w.sample(1, s * 1000, 1);
        }
        assert!(w.history[&1].len() <= 601);
    }
}
