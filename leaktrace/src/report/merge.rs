//! Rows that show the same stack merged into one, rows ranked, and how each leak trends
//! across reports. Written once for every kind of row (heap, descriptors, temp files).
use std::{
    cmp::Ordering,
    collections::VecDeque,
    hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash},
};

use hashbrown::{HashMap, hash_map::Entry};

use crate::report::model::{FdLeak, Frame, Leak, Owner, PIDS_SHOWN, TmpLeak};

/// Identifies a row, when merging and across reports: who holds it (a pid, or a hash of an
/// executable and its container with the top bit set), whether it is what was held at exit,
/// and the trimmed frames (addresses for one process; module and offset hashed across
/// processes, whose addresses differ).
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
    /// The trimmed frames, innermost first.
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

/// Remembers each leak's outstanding bytes across reports, to tell how fast it grows.
#[derive(Debug, Default)]
pub struct Trend {
    history: HashMap<LeakKey, VecDeque<(f64, u64)>>,
}

/// Samples a [`Trend`] keeps per leak.
const TREND_SAMPLES: usize = 32;

impl Trend {
    /// Records a sample and returns the least-squares slope in bytes per second over the
    /// recent samples, once there are at least two.
    pub(crate) fn observe(&mut self, key: &LeakKey, t: f64, bytes: u64) -> Option<f64> {
        let h = self.history.entry(key.clone()).or_default();
        if h.back().is_some_and(|&(last, _)| last >= t) {
            h.pop_back();
        }
        h.push_back((t, bytes));
        if h.len() > TREND_SAMPLES {
            h.pop_front();
        }
        slope(h.iter().copied())
    }

    /// Forgets leaks not seen in the latest report (bounded memory).
    pub(crate) fn retain(&mut self, seen: &[LeakKey]) {
        self.history.retain(|k, _| seen.contains(k));
    }
}

/// The least-squares slope of `(x, y)` points; `None` for fewer than two distinct `x`.
fn slope(points: impl Iterator<Item = (f64, u64)> + Clone) -> Option<f64> {
    let n = points.clone().count() as f64;
    if n < 2.0 {
        return None;
    }
    let (sx, sy) = points
        .clone()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y as f64));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y as f64 - my), den + (x - mx) * (x - mx))
    });
    (den > 0.0).then(|| num / den)
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
    fn trend_follows_a_leak_across_reports_and_forgets_gone_ones() {
        let mut g = Trend::default();
        let k: LeakKey = (1, false, vec![0x10]);
        assert_eq!(g.observe(&k, 0.0, 0), None);
        assert_eq!(g.observe(&k, 10.0, 1000), Some(100.0));
        assert_eq!(g.observe(&k, 20.0, 1000), Some(50.0));
        g.retain(&[]);
        assert_eq!(g.observe(&k, 30.0, 0), None);
    }
}
