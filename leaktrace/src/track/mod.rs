//! Trackers: pure bookkeeping of what is outstanding, per process and stack. They know
//! nothing of BPF, files or formats; the driver feeds them decoded events.
//!
//! The heap and descriptor trackers share one [`Snapshot`] type: per-stack rows of live
//! processes and of processes that exited, plus the tracker's totals.
pub mod fd;
pub mod fd_events;
pub mod heap;
pub mod held;
pub mod oom;
pub mod tmp;

/// Identifies a stack: a hash of the pid and the frames, computed by the kernel side.
pub type StackId = u64;

/// Which of `weights` are among the heaviest `limit` (all when `None`); ties go to the
/// first. Reports list these rows, and heap snapshots describe what they hold.
pub fn heaviest(weights: &[u64], limit: Option<usize>) -> Vec<bool> {
    let Some(limit) = limit.filter(|&l| l < weights.len()) else {
        return vec![true; weights.len()];
    };
    let mut keep = vec![false; weights.len()];
    if limit == 0 {
        return keep;
    }
    // A total order (heaviest, then first), so the chosen set is the same as a full sort's;
    // selecting instead of sorting keeps it linear in the rows.
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.select_nth_unstable_by(limit - 1, |&a, &b| {
        weights[b].cmp(&weights[a]).then(a.cmp(&b))
    });
    for &i in &order[..limit] {
        keep[i] = true;
    }
    keep
}

/// One process's per-stack rows in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessRows<R> {
    /// The process.
    pub pid: u32,
    /// Its rows, one per stack.
    pub stacks: Vec<R>,
}

/// What a process still held when it exited or exec'd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exited<R> {
    /// The process.
    pub pid: u32,
    /// Milliseconds since the table's epoch.
    pub at_ms: u32,
    /// True when the image was replaced by exec rather than the process exiting.
    pub by_exec: bool,
    /// Stacks that still held something.
    pub stacks: Vec<R>,
}

/// A tracker's tables at one moment, for reports: per-stack rows `R`, totals `T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot<R, T> {
    /// Session-wide counters.
    pub totals: T,
    /// Milliseconds since the table's epoch.
    pub now_ms: u32,
    /// Processes still alive, by pid.
    pub live: Vec<ProcessRows<R>>,
    /// What exited processes held at exit.
    pub exited: Vec<Exited<R>>,
}

impl<R, T: Default> Default for Snapshot<R, T> {
    fn default() -> Self {
        Self {
            totals: T::default(),
            now_ms: 0,
            live: Vec::new(),
            exited: Vec::new(),
        }
    }
}

/// A row of a [`Snapshot`] with where it stands.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotRow<'a, R> {
    /// The process.
    pub pid: u32,
    /// True for what a process held when it exited (or exec'd).
    pub at_exit: bool,
    /// The time the row is as of: the snapshot's for live processes, else the exit's.
    pub at_ms: u32,
    /// The row.
    pub row: &'a R,
}

impl<R, T> Snapshot<R, T> {
    /// Every row, live processes' first, then what exited processes held.
    pub fn rows(&self) -> impl Iterator<Item = SnapshotRow<'_, R>> + Clone {
        let now_ms = self.now_ms;
        let live = self.live.iter().flat_map(move |p| {
            p.stacks.iter().map(move |row| SnapshotRow {
                pid: p.pid,
                at_exit: false,
                at_ms: now_ms,
                row,
            })
        });
        let exited = self.exited.iter().flat_map(|e| {
            e.stacks.iter().map(move |row| SnapshotRow {
                pid: e.pid,
                at_exit: true,
                at_ms: e.at_ms,
                row,
            })
        });
        live.chain(exited)
    }
}

#[cfg(test)]
mod tests {
    use super::heaviest;

    #[test]
    fn the_heaviest_are_chosen_first_come_on_ties() {
        let w = [5, 9, 5, 1, 9, 5];
        assert_eq!(heaviest(&w, None), vec![true; 6]);
        assert_eq!(heaviest(&w, Some(0)), vec![false; 6]);
        assert_eq!(
            heaviest(&w, Some(2)),
            [false, true, false, false, true, false]
        );
        assert_eq!(
            heaviest(&w, Some(3)),
            [true, true, false, false, true, false]
        );
        assert_eq!(
            heaviest(&w, Some(4)),
            [true, true, true, false, true, false]
        );
        assert_eq!(heaviest(&w, Some(9)), vec![true; 6]);
        assert!(heaviest(&[], Some(3)).is_empty());
    }
}
