//! Rows that show the same stack merged into one, rows ranked, and how each leak trends
//! across reports. Written once for every kind of row (heap, descriptors, temp files).
use std::{
    cmp::Ordering,
    collections::VecDeque,
    hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash},
};

use hashbrown::{HashMap, hash_map::Entry};

use crate::report::{
    model::{FdLeak, Frame, Leak, Owner, PIDS_SHOWN, TmpLeak},
    verdict::Sample,
};

/// Identifies a row, when merging and across reports: who holds it (a pid, or a hash of an
/// executable and its container with the top bit set), whether it is what was held at exit,
/// and the whole stack (addresses for one process; module and offset hashed across
/// processes, whose addresses differ). The whole stack, not the frames from its site on:
/// two stacks that reach one site by different paths inside the runtime (the loader's six
/// places for one `dlopen`) stay two rows, each counted on its own side of the runtime's
/// line.
pub(crate) type LeakKey = (u64, bool, Vec<u64>);

/// A hash that is the same in every report of a session (and every run).
fn stable_hash(value: impl Hash) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// The same code in any process that maps the same module: module and offset, hashed.
fn frame_identity(f: &Frame) -> u64 {
    match (&f.module, f.offset) {
        (Some(module), Some(offset)) => stable_hash((module, offset)),
        _ => f.addr,
    }
}

/// A report row: merged with the rows of the same [`LeakKey`], then ranked.
pub(crate) trait Row {
    /// The process (merged: the first).
    fn pid(&self) -> u32;
    /// Who the process is.
    fn owner(&self) -> &Owner;
    /// The pids merged into this row (one before merging).
    fn pids_mut(&mut self) -> &mut Vec<u32>;
    /// How many processes hold this row.
    fn processes_mut(&mut self) -> &mut u32;
    /// Whether this is what the process held at exit.
    fn at_exit(&self) -> bool;
    /// The whole stack, innermost first.
    fn frames(&self) -> &[Frame];
    /// What ranks the row, heaviest first: the main weight, then one for its ties.
    fn weight(&self) -> (u64, u64);
    /// Adds a row of the same key to this one (which keeps its other fields).
    fn absorb(&mut self, other: Self);

    /// The row's [`LeakKey`]: per process when `by_pid` or when the executable is unknown,
    /// else per executable and container.
    fn key(&self, by_pid: bool) -> LeakKey {
        let owner = self.owner();
        match &owner.exe {
            Some(exe) if !by_pid => {
                let group = stable_hash((exe, &owner.container_id)) | 1 << 63;
                let frames = self.frames().iter().map(frame_identity).collect();
                (group, self.at_exit(), frames)
            }
            _ => {
                let addrs = self.frames().iter().map(|f| f.addr).collect();
                (u64::from(self.pid()), self.at_exit(), addrs)
            }
        }
    }
}

/// Merges the rows of each [`LeakKey`] into the first one seen, in the order first seen,
/// and counts the processes each merged row holds.
pub(crate) fn merge<R: Row>(rows: impl IntoIterator<Item = R>, by_pid: bool) -> Vec<R> {
    let mut index: HashMap<LeakKey, usize> = HashMap::new();
    let mut merged: Vec<R> = Vec::new();
    for mut row in rows {
        match index.entry(row.key(by_pid)) {
            Entry::Occupied(at) => {
                let into = &mut merged[*at.get()];
                let pids = std::mem::take(row.pids_mut());
                into.pids_mut().extend(pids);
                into.absorb(row);
            }
            Entry::Vacant(at) => {
                at.insert(merged.len());
                merged.push(row);
            }
        }
    }
    for row in &mut merged {
        let pids = row.pids_mut();
        pids.sort_unstable();
        pids.dedup();
        let n = pids.len().max(1) as u32;
        pids.truncate(PIDS_SHOWN);
        *row.processes_mut() = n;
    }
    merged
}

/// Heaviest first; ties by pid, then by frame addresses (see [`by_address_text`]), so
/// reports are deterministic.
pub(crate) fn rank<R: Row>(rows: &mut [R]) {
    rows.sort_by(|a, b| {
        b.weight()
            .cmp(&a.weight())
            .then_with(|| a.pid().cmp(&b.pid()))
            .then_with(|| by_address_text(a.frames(), b.frames()))
    });
}

/// Compares stacks frame by frame, each address as its `0x…` text compares: the order
/// reports have always broken ties in (`0x10` before `0x9`), kept so output does not change.
fn by_address_text(a: &[Frame], b: &[Frame]) -> Ordering {
    let text = |f: &Frame| AddressText(f.addr);
    a.iter().map(text).cmp(b.iter().map(text))
}

/// An address ordered as its `0x…` text orders, without formatting it: the hex digits
/// left-aligned, then the shorter (a prefix of the other) first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AddressText(u64);

impl AddressText {
    fn key(self) -> (u64, u32) {
        let digits = (64 - self.0.leading_zeros()).div_ceil(4).max(1);
        (self.0 << (4 * (16 - digits)), digits)
    }
}

impl Ord for AddressText {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for AddressText {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Row for Leak {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn owner(&self) -> &Owner {
        &self.owner
    }
    fn pids_mut(&mut self) -> &mut Vec<u32> {
        &mut self.pids
    }
    fn processes_mut(&mut self) -> &mut u32 {
        &mut self.processes
    }
    fn at_exit(&self) -> bool {
        self.at_exit
    }
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
    fn weight(&self) -> (u64, u64) {
        (self.outstanding_bytes, self.outstanding_count)
    }
    fn absorb(&mut self, o: Self) {
        self.outstanding_count += o.outstanding_count;
        self.outstanding_bytes += o.outstanding_bytes;
        self.allocs += o.allocs;
        self.frees += o.frees;
        self.oldest_age_s = self.oldest_age_s.max(o.oldest_age_s);
        self.truncated |= o.truncated;
        match (&mut self.held, o.held) {
            (Some(into), Some(from)) => into.add(&from),
            (into @ None, from) => *into = from,
            (Some(_), None) => {}
        }
    }
}

impl Row for FdLeak {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn owner(&self) -> &Owner {
        &self.owner
    }
    fn pids_mut(&mut self) -> &mut Vec<u32> {
        &mut self.pids
    }
    fn processes_mut(&mut self) -> &mut u32 {
        &mut self.processes
    }
    fn at_exit(&self) -> bool {
        self.at_exit
    }
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
    fn weight(&self) -> (u64, u64) {
        (self.outstanding, 0)
    }
    fn absorb(&mut self, o: Self) {
        // `fd_kind` and `truncated` stay the first row's, as they always have.
        self.outstanding += o.outstanding;
        self.opened += o.opened;
        self.closed += o.closed;
        self.oldest_age_s = self.oldest_age_s.max(o.oldest_age_s);
        merge_paths(&mut self.paths, &o.paths);
    }
}

impl Row for TmpLeak {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn owner(&self) -> &Owner {
        &self.owner
    }
    fn pids_mut(&mut self) -> &mut Vec<u32> {
        &mut self.pids
    }
    fn processes_mut(&mut self) -> &mut u32 {
        &mut self.processes
    }
    fn at_exit(&self) -> bool {
        false
    }
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
    fn weight(&self) -> (u64, u64) {
        (self.bytes, self.files)
    }
    fn absorb(&mut self, o: Self) {
        // `truncated` stays the first row's, as it always has.
        self.files += o.files;
        self.bytes += o.bytes;
        self.oldest_age_s = self.oldest_age_s.max(o.oldest_age_s);
        merge_paths(&mut self.paths, &o.paths);
    }
}

/// Adds example paths not yet present, up to [`crate::track::fd::PATH_SAMPLES`].
pub(crate) fn merge_paths(into: &mut Vec<String>, from: &[String]) {
    for p in from {
        if into.len() < crate::track::fd::PATH_SAMPLES && !into.contains(p) {
            into.push(p.clone());
        }
    }
}

/// Remembers what each row held across reports, to tell how it trends (see
/// [`crate::report::verdict`]): heap (or growth) rows, descriptor rows and temp file rows
/// apart.
#[derive(Debug, Default)]
pub struct Trend {
    pub(crate) heap: History,
    pub(crate) fds: History,
    pub(crate) tmp: History,
}

/// Samples kept per row: the window a verdict is drawn from.
pub const TREND_SAMPLES: usize = 32;

/// Reports a row may be missing from (it held nothing old enough, or fell out of the rows
/// listed) before its samples are forgotten.
const FORGET_AFTER: u64 = 8;

/// The samples of each row of one kind.
#[derive(Debug, Default)]
pub struct History {
    rows: HashMap<LeakKey, Samples>,
    /// Reports seen (each [`History::retain`] is one).
    reports: u64,
}

#[derive(Debug, Default)]
struct Samples {
    samples: VecDeque<Sample>,
    /// The report it was last seen in.
    seen: u64,
}

impl History {
    /// Records a row's sample and returns its samples, oldest first (the latest
    /// [`TREND_SAMPLES`]). A sample at or before the last one replaces it.
    pub(crate) fn observe(&mut self, key: &LeakKey, sample: Sample) -> Vec<Sample> {
        let h = self.rows.entry(key.clone()).or_default();
        h.seen = self.reports;
        let s = &mut h.samples;
        if s.back().is_some_and(|last| last.t_s >= sample.t_s) {
            s.pop_back();
        }
        s.push_back(sample);
        if s.len() > TREND_SAMPLES {
            s.pop_front();
        }
        s.iter().copied().collect()
    }

    /// Ends a report: forgets rows missing from the last [`FORGET_AFTER`] reports (bounded
    /// memory). A row missing for fewer keeps its samples, with a gap.
    pub(crate) fn end_report(&mut self) {
        let now = self.reports;
        self.rows.retain(|_, h| now - h.seen < FORGET_AFTER);
        self.reports += 1;
    }
}

/// The least-squares slope of `(x, y)` points; `None` for fewer than two distinct `x`.
#[cfg(test)]
fn slope(points: impl Iterator<Item = (f64, u64)> + Clone) -> Option<f64> {
    let samples: Vec<Sample> = points
        .map(|(t_s, value)| Sample {
            t_s,
            value,
            oldest_s: 0.0,
        })
        .collect();
    crate::report::verdict::fit(&samples).map(|(slope, _)| slope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_tie_break_as_their_text_did() {
        let addrs = [
            0,
            1,
            9,
            0xa,
            0xf,
            0x10,
            0x1f,
            0x90,
            0x100,
            0x1000,
            0x5555_0000_1234,
            0x5555_0000_1290,
            0x7f00_0000_4321,
            0x8000_0000_0000_0000,
            u64::MAX,
        ];
        for &a in &addrs {
            for &b in &addrs {
                assert_eq!(
                    AddressText(a).cmp(&AddressText(b)),
                    format!("{a:#x}").cmp(&format!("{b:#x}")),
                    "{a:#x} vs {b:#x}"
                );
            }
        }
    }

    #[test]
    fn slope_of_a_straight_line() {
        let pts = [(0.0, 100), (1.0, 300), (2.0, 500)];
        assert_eq!(slope(pts.iter().copied()), Some(200.0));
        assert_eq!(slope([(0.0, 1)].iter().copied()), None);
        assert_eq!(slope([(1.0, 1), (1.0, 5)].iter().copied()), None);
    }

    #[test]
    fn history_follows_a_row_across_reports_and_forgets_gone_ones() {
        let mut h = History::default();
        let k: LeakKey = (1, false, vec![0x10]);
        let at = |t_s: f64, value: u64| Sample {
            t_s,
            value,
            oldest_s: 0.0,
        };
        assert_eq!(h.observe(&k, at(0.0, 0)).len(), 1);
        h.end_report();
        assert_eq!(h.observe(&k, at(10.0, 1000)).len(), 2);
        // The same moment again replaces the sample.
        let s = h.observe(&k, at(10.0, 2000));
        assert_eq!(s, vec![at(0.0, 0), at(10.0, 2000)]);
        h.end_report();
        // Missing from a few reports: kept, with a gap.
        for _ in 0..FORGET_AFTER - 1 {
            h.end_report();
        }
        assert_eq!(h.observe(&k, at(100.0, 5)).len(), 3);
        for _ in 0..FORGET_AFTER + 1 {
            h.end_report();
        }
        assert_eq!(h.observe(&k, at(200.0, 7)), vec![at(200.0, 7)]);
        // At most TREND_SAMPLES.
        for i in 0..100 {
            h.observe(&k, at(300.0 + f64::from(i), 1));
        }
        assert_eq!(h.observe(&k, at(1000.0, 1)).len(), TREND_SAMPLES);
    }
}
