//! The outstanding-allocation tables: pure bookkeeping, no BPF, files or formats.
//!
//! Per process, every *outstanding* block (allocated, not yet freed) maps its address to its
//! size, the stack that allocated it and when. Per stack, counters say how many blocks and
//! bytes it holds and how many it allocated and freed. When a process exits (or replaces its
//! image with exec) what it still held is kept as *in use at exit*.
//!
//! The invariant the tests hold us to: `allocs - frees == outstanding_count` (live plus in use
//! at exit), whatever the order of events, as long as none was lost.
use hashbrown::HashMap;
use leaktrace_common::{AllocEvent, FreeEvent, header_flags};

use crate::track::{Exited, ProcessRows, Snapshot, heaviest, held::Held};

/// Kept here too for the modules that name it `track::heap::StackId`.
pub use crate::track::StackId;

/// The heap tables at one moment, for reports.
pub type HeapSnapshot = Snapshot<StackRow, Totals>;

/// One outstanding block: 16 bytes, so a million cost ~25 MB with the map's overhead.
#[derive(Clone, Copy, Debug)]
struct Block {
    size: u64,
    /// Index into [`ProcessHeap::stacks`].
    stack: u32,
    /// Milliseconds since the table's epoch.
    born_ms: u32,
}

/// Counters of one stack in one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCounters {
    /// The stack.
    pub stack_id: StackId,
    /// Blocks it allocated that are still outstanding.
    pub outstanding_count: u64,
    /// Their bytes.
    pub outstanding_bytes: u64,
    /// Blocks this stack allocated (realloc counts as an allocation by its caller).
    pub allocs: u64,
    /// Of those, how many were freed (or moved by realloc).
    pub frees: u64,
}

/// Session-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Successful allocations seen.
    pub allocs: u64,
    /// Frees of blocks we saw allocated.
    pub frees: u64,
    /// Frees of blocks allocated before tracing started (or whose allocation was lost).
    pub unmatched_frees: u64,
    /// Frees of blocks never seen allocated made by threads on their way out: glibc freeing
    /// a thread's cache (see [`leaktrace_common::alloc_shape::THREAD_EXIT`]). Not unmatched:
    /// the program allocated none of them, or it freed them already.
    pub thread_exit_frees: u64,
    /// Allocations returning an address that was still outstanding: its free was missed
    /// (a lost event or an unhooked release path). The old block counts as freed.
    pub replaced: u64,
    /// Frees, in a forked child, of blocks its parent held at the fork: matched, neither
    /// unmatched nor the child's.
    pub inherited_frees: u64,
    /// Allocations not kept because the tables held their cap of blocks already (a free of
    /// one later counts as unmatched).
    pub table_full: u64,
}

#[derive(Debug, Default)]
struct ProcessHeap {
    blocks: HashMap<u64, Block>,
    stacks: Vec<StackCounters>,
    stack_index: HashMap<StackId, u32>,
    /// Blocks the parent held when it forked this process: a free of one is matched, and
    /// they are counted in the parent's rows only.
    inherited: hashbrown::HashSet<u64>,
}

impl ProcessHeap {
    fn stack_slot(&mut self, id: StackId) -> u32 {
        let stacks = &mut self.stacks;
        *self.stack_index.entry(id).or_insert_with(|| {
            stacks.push(StackCounters {
                stack_id: id,
                ..Default::default()
            });
            (stacks.len() - 1) as u32
        })
    }

    /// Removes a block this process allocated or inherited: `Some(true)` for its own,
    /// `Some(false)` for an inherited one, `None` when unknown.
    fn release_any(&mut self, addr: u64) -> Option<bool> {
        if self.release(addr) {
            Some(true)
        } else if self.inherited.remove(&addr) {
            Some(false)
        } else {
            None
        }
    }

    /// Removes a block, returning whether it was known.
    fn release(&mut self, addr: u64) -> bool {
        let Some(block) = self.blocks.remove(&addr) else {
            return false;
        };
        let s = &mut self.stacks[block.stack as usize];
        s.outstanding_count -= 1;
        s.outstanding_bytes -= block.size;
        s.frees += 1;
        true
    }

    /// Per-stack rows: the counters, the blocks at least `min_age_ms` old, and the birth of
    /// the oldest block (what they hold is filled in by [`Self::hold`]).
    fn rows(&self, now_ms: u32, min_age_ms: u32) -> Vec<StackRow> {
        let mut rows: Vec<StackRow> = self
            .stacks
            .iter()
            .map(|c| StackRow {
                counters: *c,
                aged_count: 0,
                aged_bytes: 0,
                oldest_born_ms: None,
                held: None,
            })
            .collect();
        for block in self.blocks.values() {
            let row = &mut rows[block.stack as usize];
            row.oldest_born_ms = Some(
                row.oldest_born_ms
                    .map_or(block.born_ms, |b| b.min(block.born_ms)),
            );
            if now_ms.saturating_sub(block.born_ms) >= min_age_ms {
                row.aged_count += 1;
                row.aged_bytes += block.size;
            }
        }
        rows
    }

    /// Fills in the ages and sizes of the blocks at least `min_age_ms` old of the rows
    /// `wanted` says (by stack slot): a second walk over the blocks, histograms only for
    /// those rows, so a report of a few hundred rows costs a few hundred histograms whatever
    /// the number of stacks.
    fn hold(&self, rows: &mut [StackRow], now_ms: u32, min_age_ms: u32, wanted: &[bool]) {
        for block in self.blocks.values() {
            let i = block.stack as usize;
            if !wanted.get(i).copied().unwrap_or(false) {
                continue;
            }
            let age = now_ms.saturating_sub(block.born_ms);
            if age >= min_age_ms {
                rows[i]
                    .held
                    .get_or_insert_with(Box::default)
                    .record(age, block.size);
            }
        }
    }
}

/// A stack's counters as of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackRow {
    /// The stack's counters.
    pub counters: StackCounters,
    /// Outstanding blocks (and their bytes) at least `--min-age` old.
    pub aged_count: u64,
    /// Their bytes.
    pub aged_bytes: u64,
    /// Milliseconds since the table's epoch; `None` when nothing is outstanding.
    pub oldest_born_ms: Option<u32>,
    /// The ages and sizes of the blocks counted in `aged_count`; `None` when none is, or
    /// when the row was not among those a snapshot was asked to describe.
    pub held: Option<Box<Held>>,
}

/// All outstanding allocations, per process.
#[derive(Debug)]
pub struct HeapTables {
    epoch_ns: u64,
    procs: HashMap<u32, ProcessHeap>,
    exited: Vec<Exited<StackRow>>,
    totals: Totals,
    /// Outstanding blocks of live processes, all together.
    blocks: usize,
    /// At most this many are kept.
    max_blocks: usize,
}

impl HeapTables {
    /// Empty tables; event times are measured from `epoch_ns` (CLOCK_MONOTONIC).
    pub fn new(epoch_ns: u64) -> Self {
        Self {
            epoch_ns,
            procs: HashMap::new(),
            exited: Vec::new(),
            totals: Totals::default(),
            blocks: 0,
            max_blocks: usize::MAX,
        }
    }

    /// Keeps at most `max` outstanding blocks of live processes; allocations past it are
    /// counted ([`Totals::table_full`]) and not kept, so memory stays bounded whatever the
    /// traced processes hold.
    pub fn set_max_blocks(&mut self, max: usize) {
        self.max_blocks = max;
    }

    /// Outstanding blocks kept now, of live processes.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Milliseconds since the epoch of a CLOCK_MONOTONIC time.
    pub fn ms_since_epoch(&self, ts_ns: u64) -> u32 {
        (ts_ns.saturating_sub(self.epoch_ns) / 1_000_000).min(u64::from(u32::MAX)) as u32
    }

    /// The epoch, CLOCK_MONOTONIC nanoseconds.
    pub fn epoch_ns(&self) -> u64 {
        self.epoch_ns
    }

    /// The session-wide counters.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Applies an allocation (malloc, calloc, realloc, …) with C's realloc rules.
    pub fn alloc(&mut self, e: &AllocEvent) {
        let born_ms = self.ms_since_epoch(e.hdr.ts_ns);
        let heap = self.procs.entry(e.hdr.pid).or_default();
        if e.old_addr != 0 && (e.addr != 0 || e.size == 0) {
            // realloc moved or freed the old block (realloc(p, 0) returns NULL).
            match heap.release_any(e.old_addr) {
                Some(true) => {
                    self.totals.frees += 1;
                    self.blocks -= 1;
                }
                Some(false) => self.totals.inherited_frees += 1,
                None => self.totals.unmatched_frees += 1,
            }
        }
        if e.addr == 0 {
            return;
        }
        if heap.release(e.addr) {
            self.totals.replaced += 1;
            self.totals.frees += 1;
            self.blocks -= 1;
        }
        if self.blocks >= self.max_blocks {
            self.totals.table_full += 1;
            return;
        }
        self.blocks += 1;
        let stack = heap.stack_slot(e.stack_id);
        let s = &mut heap.stacks[stack as usize];
        s.allocs += 1;
        s.outstanding_count += 1;
        s.outstanding_bytes += e.size;
        heap.blocks.insert(
            e.addr,
            Block {
                size: e.size,
                stack,
                born_ms,
            },
        );
        self.totals.allocs += 1;
    }

    /// Applies a free. A block we never saw allocated counts as unmatched, not an error, or,
    /// freed by a thread on its way out, as a thread-exit free.
    pub fn free(&mut self, e: &FreeEvent) {
        let known = self
            .procs
            .get_mut(&e.hdr.pid)
            .and_then(|heap| heap.release_any(e.addr));
        match known {
            Some(true) => {
                self.totals.frees += 1;
                self.blocks -= 1;
            }
            Some(false) => self.totals.inherited_frees += 1,
            None if e.hdr.flags & header_flags::THREAD_EXIT != 0 => {
                self.totals.thread_exit_frees += 1;
            }
            None => self.totals.unmatched_frees += 1,
        }
    }

    /// Releases every block lying in `[start, end)`, counted as freed: growth mode's pages
    /// given back by `munmap`, `madvise` or a lower `brk`. Returns how many.
    pub fn release_range(&mut self, pid: u32, start: u64, end: u64) -> u64 {
        const PAGE: u64 = 4096;
        let Some(heap) = self.procs.get_mut(&pid) else {
            return 0;
        };
        let start = start & !(PAGE - 1);
        let end = end.saturating_add(PAGE - 1) & !(PAGE - 1);
        let pages = end.saturating_sub(start) / PAGE;
        // Whichever is fewer: the range's pages, or the blocks held.
        let inside: Vec<u64> = if pages <= heap.blocks.len() as u64 {
            (0..pages)
                .map(|i| start + i * PAGE)
                .filter(|a| heap.blocks.contains_key(a))
                .collect()
        } else {
            heap.blocks
                .keys()
                .copied()
                .filter(|&a| a >= start && a < end)
                .collect()
        };
        for &addr in &inside {
            heap.release(addr);
        }
        self.blocks -= inside.len();
        self.totals.frees += inside.len() as u64;
        inside.len() as u64
    }

    /// `parent` forked `child`: the child starts knowing the parent's outstanding blocks as
    /// inherited, so its frees of them match instead of counting as unmatched. They stay
    /// in the parent's rows only (the pages are shared copy-on-write until written).
    pub fn fork(&mut self, parent: u32, child: u32) {
        let Some(p) = self.procs.get(&parent) else {
            return;
        };
        let inherited: hashbrown::HashSet<u64> =
            p.blocks.keys().chain(&p.inherited).copied().collect();
        self.procs.entry(child).or_default().inherited = inherited;
    }

    /// The stacks of what `pid` held when it exited or exec'd.
    pub fn exited_stacks(&self, pid: u32) -> impl Iterator<Item = u64> + '_ {
        self.exited
            .iter()
            .filter(move |e| e.pid == pid)
            .flat_map(|e| e.stacks.iter().map(|r| r.counters.stack_id))
    }

    /// Forgets a live process's tables without keeping anything (tracing of it stopped).
    pub fn discard(&mut self, pid: u32) {
        if let Some(heap) = self.procs.remove(&pid) {
            self.blocks -= heap.blocks.len();
        }
    }

    /// The process exited: what it still held becomes *in use at exit*.
    pub fn exit(&mut self, pid: u32, ts_ns: u64) {
        self.retire(pid, ts_ns, false);
    }

    /// The process replaced its image: the old image's blocks are gone with it, and what it
    /// still held is kept as in use at exit of that image.
    pub fn exec(&mut self, pid: u32, ts_ns: u64) {
        self.retire(pid, ts_ns, true);
    }

    fn retire(&mut self, pid: u32, ts_ns: u64, by_exec: bool) {
        let Some(heap) = self.procs.remove(&pid) else {
            return;
        };
        self.blocks -= heap.blocks.len();
        let at_ms = self.ms_since_epoch(ts_ns);
        let mut rows = heap.rows(at_ms, 0);
        let wanted: Vec<bool> = rows.iter().map(|r| r.aged_count > 0).collect();
        heap.hold(&mut rows, at_ms, 0, &wanted);
        let stacks: Vec<StackRow> = rows
            .into_iter()
            .filter(|r| r.counters.outstanding_count > 0)
            .collect();
        if !stacks.is_empty() {
            self.exited.push(Exited {
                pid,
                at_ms,
                by_exec,
                stacks,
            });
        }
    }

    /// Outstanding blocks in live processes.
    pub fn live_outstanding(&self) -> (u64, u64) {
        self.procs
            .values()
            .flat_map(|h| &h.stacks)
            .fold((0, 0), |(c, b), s| {
                (c + s.outstanding_count, b + s.outstanding_bytes)
            })
    }

    /// The pids with tables.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.procs.keys().copied()
    }

    /// Outstanding (count, bytes) of one live process.
    pub fn outstanding_of(&self, pid: u32) -> (u64, u64) {
        self.procs.get(&pid).map_or((0, 0), |h| {
            h.stacks.iter().fold((0, 0), |(c, b), s| {
                (c + s.outstanding_count, b + s.outstanding_bytes)
            })
        })
    }

    /// The stacks of a live process holding the most bytes, most first.
    pub fn top_stacks(&self, pid: u32, n: usize) -> Vec<StackCounters> {
        let mut top: Vec<StackCounters> = self
            .procs
            .get(&pid)
            .map(|h| {
                h.stacks
                    .iter()
                    .filter(|s| s.outstanding_count > 0)
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        top.sort_by(|a, b| {
            b.outstanding_bytes
                .cmp(&a.outstanding_bytes)
                .then(a.stack_id.cmp(&b.stack_id))
        });
        top.truncate(n);
        top
    }

    /// The tables as of `now_ns`; rows also count the blocks at least `min_age_ns` old, and
    /// describe what they hold (every row: see [`Self::snapshot_described`]).
    pub fn snapshot(&self, now_ns: u64, min_age_ns: u64) -> HeapSnapshot {
        self.snapshot_described(now_ns, min_age_ns, None)
    }

    /// [`Self::snapshot`], with the ages and sizes of what they hold for the heaviest
    /// `described` rows only (by bytes at least `min_age_ns` old; `None`: all), chosen as
    /// reports choose the rows they list ([`heaviest`], over [`Snapshot::rows`] that hold or
    /// allocated something).
    pub fn snapshot_described(
        &self,
        now_ns: u64,
        min_age_ns: u64,
        described: Option<usize>,
    ) -> HeapSnapshot {
        let now_ms = self.ms_since_epoch(now_ns);
        let min_age_ms = (min_age_ns / 1_000_000).min(u64::from(u32::MAX)) as u32;
        let mut live: Vec<ProcessRows<StackRow>> = self
            .procs
            .iter()
            .map(|(&pid, heap)| ProcessRows {
                pid,
                stacks: heap.rows(now_ms, min_age_ms),
            })
            .collect();
        live.sort_by_key(|p| p.pid);
        // The same candidates, in the same order, as a report's listing (live, then exited).
        let listed = |r: &StackRow| r.counters.outstanding_count > 0 || r.counters.allocs > 0;
        let weights: Vec<u64> = live
            .iter()
            .flat_map(|p| &p.stacks)
            .chain(self.exited.iter().flat_map(|e| &e.stacks))
            .filter(|r| listed(r))
            .map(|r| r.aged_bytes)
            .collect();
        let mut chosen = heaviest(&weights, described).into_iter();
        for p in &mut live {
            let wanted: Vec<bool> = p
                .stacks
                .iter()
                .map(|r| listed(r) && chosen.next().unwrap_or(false) && r.aged_count > 0)
                .collect();
            if let Some(heap) = wanted
                .contains(&true)
                .then(|| self.procs.get(&p.pid))
                .flatten()
            {
                heap.hold(&mut p.stacks, now_ms, min_age_ms, &wanted);
            }
        }
        Snapshot {
            totals: self.totals,
            now_ms,
            live,
            exited: self.exited.clone(),
        }
    }
}

#[cfg(test)]
#[path = "heap_tests.rs"]
mod tests;
