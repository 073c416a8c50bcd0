//! The open-descriptor tables: pure bookkeeping, like [`crate::track::heap`] for the heap.
//!
//! Per process, every descriptor we saw created maps its number to the stack that created
//! it, its kind and whether it closes on exec. A number reused after a close belongs to its
//! new creator only: the close removed the old entry. Per stack, counters say how many are
//! still open and how many were opened and closed.
use hashbrown::HashMap;

use crate::track::{Exited, ProcessRows, Snapshot, StackId};

/// What a descriptor refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FdKind {
    /// Opened by a path (open, openat, openat2, creat).
    File,
    /// Made by socket, socketpair or accept.
    Socket,
    /// Made by pipe or pipe2.
    Pipe,
    /// Anything else (eventfd, memfd, epoll, ...).
    Other,
}

impl FdKind {
    /// The kind as reports write it.
    pub fn name(self) -> &'static str {
        match self {
            FdKind::File => "file",
            FdKind::Socket => "socket",
            FdKind::Pipe => "pipe",
            FdKind::Other => "other",
        }
    }
}

/// How many paths a stack keeps as examples.
pub const PATH_SAMPLES: usize = 5;

#[derive(Clone, Copy, Debug)]
struct Fd {
    /// Index into [`ProcessFds::stacks`].
    stack: u32,
    cloexec: bool,
    born_ms: u32,
}

/// How a descriptor came to be.
#[derive(Clone, Copy, Debug)]
pub struct Creation<'a> {
    /// The stack that created it.
    pub stack: StackId,
    /// What it refers to.
    pub kind: FdKind,
    /// Whether it closes on exec.
    pub cloexec: bool,
    /// The path opened (files only).
    pub path: Option<&'a str>,
    /// When it was created, ms since the epoch.
    pub born_ms: u32,
}

/// Counters of one creating stack in one process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdStackCounters {
    /// The stack.
    pub stack_id: StackId,
    /// The kind of the descriptors this stack creates (the first one's, in the rare stack
    /// that creates several kinds).
    pub kind: Option<FdKind>,
    /// Descriptors it created that are still open.
    pub outstanding: u64,
    /// Descriptors it created.
    pub opened: u64,
    /// Of those, how many were closed.
    pub closed: u64,
    /// Example paths (files only), first seen first.
    pub paths: Vec<String>,
    /// Birth of the oldest still-open descriptor, ms since the epoch.
    pub oldest_born_ms: Option<u32>,
}

/// Session-wide descriptor counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdTotals {
    /// Descriptors created (that we saw).
    pub opened: u64,
    /// Of those, how many were closed.
    pub closed: u64,
    /// Closes of descriptors we never saw created (inherited, or opened before tracing).
    pub unmatched_closes: u64,
    /// Creations of a number still open in our table: its close was missed.
    pub replaced: u64,
}

#[derive(Debug, Default)]
struct ProcessFds {
    fds: HashMap<i32, Fd>,
    stacks: Vec<FdStackCounters>,
    index: HashMap<StackId, u32>,
}

impl ProcessFds {
    fn slot(&mut self, id: StackId, kind: FdKind) -> u32 {
        let stacks = &mut self.stacks;
        let slot = *self.index.entry(id).or_insert_with(|| {
            stacks.push(FdStackCounters {
                stack_id: id,
                ..Default::default()
            });
            (stacks.len() - 1) as u32
        });
        let s = &mut self.stacks[slot as usize];
        s.kind.get_or_insert(kind);
        slot
    }

    fn release(&mut self, fd: i32) -> bool {
        let Some(entry) = self.fds.remove(&fd) else {
            return false;
        };
        let s = &mut self.stacks[entry.stack as usize];
        s.outstanding -= 1;
        s.closed += 1;
        true
    }

    fn kind_of(&self, fd: i32) -> Option<FdKind> {
        self.fds
            .get(&fd)
            .and_then(|e| self.stacks[e.stack as usize].kind)
    }

    /// Stacks with their oldest open descriptor filled in.
    fn rows(&self) -> Vec<FdStackCounters> {
        let mut rows = self.stacks.clone();
        for fd in self.fds.values() {
            let r = &mut rows[fd.stack as usize];
            r.oldest_born_ms = Some(r.oldest_born_ms.map_or(fd.born_ms, |b| b.min(fd.born_ms)));
        }
        rows
    }
}

/// The descriptor tables at one moment. What a process had open when it exec'd is not
/// kept apart: only what exec closed is gone, the rest lives on.
pub type FdSnapshot = Snapshot<FdStackCounters, FdTotals>;

/// All open descriptors we saw created, per process.
#[derive(Debug, Default)]
pub struct FdTables {
    procs: HashMap<u32, ProcessFds>,
    exited: Vec<Exited<FdStackCounters>>,
    totals: FdTotals,
}

impl FdTables {
    /// The session-wide counters.
    pub fn totals(&self) -> FdTotals {
        self.totals
    }

    /// `fd` was created.
    pub fn open(&mut self, pid: u32, fd: i32, how: &Creation<'_>) {
        let Creation {
            stack,
            kind,
            cloexec,
            path,
            born_ms,
        } = *how;
        let p = self.procs.entry(pid).or_default();
        if p.release(fd) {
            self.totals.replaced += 1;
            self.totals.closed += 1;
        }
        let slot = p.slot(stack, kind);
        let s = &mut p.stacks[slot as usize];
        s.opened += 1;
        s.outstanding += 1;
        if let Some(path) = path
            && s.paths.len() < PATH_SAMPLES
            && !s.paths.iter().any(|p| p == path)
        {
            s.paths.push(path.to_owned());
        }
        p.fds.insert(
            fd,
            Fd {
                stack: slot,
                cloexec,
                born_ms,
            },
        );
        self.totals.opened += 1;
    }

    /// `new` became a duplicate of `old` (dup2/dup3 first closed `new` if it was open);
    /// `how.kind` is replaced by `old`'s.
    pub fn dup(&mut self, pid: u32, new: i32, old: i32, how: &Creation<'_>) {
        let kind = self
            .procs
            .get(&pid)
            .and_then(|p| p.kind_of(old))
            .unwrap_or(FdKind::Other);
        if new == old {
            return; // dup2(fd, fd) changes nothing
        }
        self.open(pid, new, &Creation { kind, ..*how });
    }

    /// The kind of an open descriptor, if we saw it created.
    pub fn kind_of(&self, pid: u32, fd: i32) -> Option<FdKind> {
        self.procs.get(&pid).and_then(|p| p.kind_of(fd))
    }

    /// `fd` was closed.
    pub fn close(&mut self, pid: u32, fd: i32) {
        if self.procs.get_mut(&pid).is_some_and(|p| p.release(fd)) {
            self.totals.closed += 1;
        } else {
            self.totals.unmatched_closes += 1;
        }
    }

    /// `close_range(first, last)`: closes them, or with `cloexec_only` marks them.
    pub fn close_range(&mut self, pid: u32, first: i32, last: i32, cloexec_only: bool) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let in_range: Vec<i32> = p
            .fds
            .keys()
            .copied()
            .filter(|&fd| fd >= first && fd <= last)
            .collect();
        for fd in in_range {
            if cloexec_only {
                if let Some(e) = p.fds.get_mut(&fd) {
                    e.cloexec = true;
                }
            } else if p.release(fd) {
                self.totals.closed += 1;
            }
        }
    }

    /// `fcntl(fd, F_SETFD, ...)` turned close-on-exec on or off.
    pub fn set_cloexec(&mut self, pid: u32, fd: i32, on: bool) {
        if let Some(e) = self.procs.get_mut(&pid).and_then(|p| p.fds.get_mut(&fd)) {
            e.cloexec = on;
        }
    }

    /// The process exec'd: close-on-exec descriptors are closed; the others live on into
    /// the new program.
    pub fn exec(&mut self, pid: u32) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let gone: Vec<i32> = p
            .fds
            .iter()
            .filter(|(_, e)| e.cloexec)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in gone {
            if p.release(fd) {
                self.totals.closed += 1;
            }
        }
    }

    /// The stacks of what `pid` had open when it exited.
    pub fn exited_stacks(&self, pid: u32) -> impl Iterator<Item = u64> + '_ {
        self.exited
            .iter()
            .filter(move |e| e.pid == pid)
            .flat_map(|e| e.stacks.iter().map(|s| s.stack_id))
    }

    /// Forgets a process without keeping what it had open.
    pub fn discard(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// The process exited: what it still had open is kept as open at exit.
    pub fn exit(&mut self, pid: u32, at_ms: u32) {
        let Some(p) = self.procs.remove(&pid) else {
            return;
        };
        let stacks: Vec<FdStackCounters> =
            p.rows().into_iter().filter(|s| s.outstanding > 0).collect();
        if !stacks.is_empty() {
            self.exited.push(Exited {
                pid,
                at_ms,
                by_exec: false,
                stacks,
            });
        }
    }

    /// The stacks of `pid` holding the most open descriptors, most first.
    pub fn top_holders(&self, pid: u32, n: usize) -> Vec<FdStackCounters> {
        let mut rows: Vec<FdStackCounters> = self
            .procs
            .get(&pid)
            .map(|p| p.rows().into_iter().filter(|s| s.outstanding > 0).collect())
            .unwrap_or_default();
        rows.sort_by(|a, b| {
            b.outstanding
                .cmp(&a.outstanding)
                .then(a.stack_id.cmp(&b.stack_id))
        });
        rows.truncate(n);
        rows
    }

    /// Open descriptors of a live process.
    pub fn open_count(&self, pid: u32) -> u64 {
        self.procs.get(&pid).map_or(0, |p| p.fds.len() as u64)
    }

    /// The tables as of `now_ms` (ms since the heap tables' epoch, which creation and exit
    /// times are measured from).
    pub fn snapshot(&self, now_ms: u32) -> FdSnapshot {
        let mut live: Vec<ProcessRows<FdStackCounters>> = self
            .procs
            .iter()
            .map(|(&pid, p)| ProcessRows {
                pid,
                stacks: p.rows(),
            })
            .collect();
        live.sort_by_key(|p| p.pid);
        FdSnapshot {
            totals: self.totals,
            now_ms,
            live,
            exited: self.exited.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn how(
        stack: StackId,
        kind: FdKind,
        cloexec: bool,
        path: Option<&str>,
        born_ms: u32,
    ) -> Creation<'_> {
        Creation {
            stack,
            kind,
            cloexec,
            path,
            born_ms,
        }
    }

    fn row(t: &FdTables, pid: u32, stack: StackId) -> FdStackCounters {
        t.snapshot(0)
            .live
            .into_iter()
            .filter(|p| p.pid == pid)
            .flat_map(|p| p.stacks)
            .find(|s| s.stack_id == stack)
            .unwrap_or_default()
    }

    #[test]
    fn open_close_and_reuse_of_a_number_by_another_stack() {
        let mut t = FdTables::default();
        t.open(1, 3, &how(10, FdKind::File, false, Some("/etc/hosts"), 0));
        t.close(1, 3);
        t.open(1, 3, &how(20, FdKind::Socket, false, None, 5));
        let a = row(&t, 1, 10);
        assert_eq!(
            (a.outstanding, a.opened, a.closed),
            (0, 1, 1),
            "the old stack keeps nothing"
        );
        let b = row(&t, 1, 20);
        assert_eq!(
            (b.outstanding, b.kind, b.oldest_born_ms),
            (1, Some(FdKind::Socket), Some(5))
        );
        assert_eq!(
            t.totals(),
            FdTotals {
                opened: 2,
                closed: 1,
                unmatched_closes: 0,
                replaced: 0
            }
        );
        assert_eq!(a.paths, ["/etc/hosts"]);
    }

    #[test]
    fn a_missed_close_is_counted_when_the_number_comes_back() {
        let mut t = FdTables::default();
        t.open(1, 5, &how(10, FdKind::File, false, None, 0));
        t.open(1, 5, &how(11, FdKind::File, false, None, 0));
        assert_eq!(t.totals().replaced, 1);
        assert_eq!(
            (row(&t, 1, 10).outstanding, row(&t, 1, 11).outstanding),
            (0, 1)
        );
    }

    #[test]
    fn closes_of_unknown_descriptors_are_unmatched() {
        let mut t = FdTables::default();
        t.close(1, 0);
        t.close(2, 7);
        assert_eq!(t.totals().unmatched_closes, 2);
    }

    #[test]
    fn dup_takes_the_kind_of_its_source_and_dup2_replaces() {
        let mut t = FdTables::default();
        t.open(1, 4, &how(10, FdKind::Pipe, false, None, 0));
        t.open(1, 6, &how(11, FdKind::File, false, None, 0));
        t.dup(1, 6, 4, &how(12, FdKind::Other, false, None, 0)); // dup2(4, 6): 6 was open, closed first
        assert_eq!(row(&t, 1, 11).outstanding, 0);
        assert_eq!(row(&t, 1, 12).kind, Some(FdKind::Pipe));
        t.dup(1, 4, 4, &how(13, FdKind::Other, false, None, 0));
        assert_eq!(row(&t, 1, 13).opened, 0, "dup2(fd, fd) is a no-op");
        assert_eq!(t.kind_of(1, 6), Some(FdKind::Pipe));
    }

    #[test]
    fn exec_closes_only_close_on_exec_descriptors() {
        let mut t = FdTables::default();
        t.open(1, 3, &how(10, FdKind::File, true, None, 0));
        t.open(1, 4, &how(11, FdKind::File, false, None, 0));
        t.open(1, 5, &how(12, FdKind::File, false, None, 0));
        t.set_cloexec(1, 5, true);
        t.exec(1);
        assert_eq!(
            (
                row(&t, 1, 10).outstanding,
                row(&t, 1, 11).outstanding,
                row(&t, 1, 12).outstanding
            ),
            (0, 1, 0)
        );
    }

    #[test]
    fn close_range_closes_or_marks() {
        let mut t = FdTables::default();
        for fd in 3..10 {
            t.open(1, fd, &how(10, FdKind::Other, false, None, 0));
        }
        t.close_range(1, 3, 4, false);
        t.close_range(1, 5, i32::MAX, true);
        assert_eq!(row(&t, 1, 10).outstanding, 5);
        t.exec(1);
        assert_eq!(row(&t, 1, 10).outstanding, 0);
        assert_eq!(t.totals().closed, 7);
    }

    #[test]
    fn exit_keeps_what_was_open_and_ranks_holders() {
        let mut t = FdTables::default();
        for fd in 3..8 {
            t.open(1, fd, &how(10, FdKind::Socket, false, None, 0));
        }
        t.open(1, 8, &how(11, FdKind::File, false, None, 0));
        let top = t.top_holders(1, 1);
        assert_eq!((top.len(), top[0].stack_id, top[0].outstanding), (1, 10, 5));
        assert_eq!(t.open_count(1), 6);
        t.exit(1, 42);
        let snap = t.snapshot(0);
        assert!(snap.live.is_empty());
        assert_eq!(snap.exited[0].at_ms, 42);
        assert_eq!(
            snap.exited[0]
                .stacks
                .iter()
                .map(|s| s.outstanding)
                .sum::<u64>(),
            6
        );
    }

    #[test]
    fn paths_are_sampled_without_duplicates() {
        let mut t = FdTables::default();
        for i in 0..10 {
            let path = format!("/data/{}", i % 7);
            t.open(1, 3 + i, &how(10, FdKind::File, false, Some(&path), 0));
        }
        t.open(1, 20, &how(10, FdKind::File, false, Some("/data/0"), 0));
        assert_eq!(row(&t, 1, 10).paths.len(), PATH_SAMPLES);
    }
}
