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
use leaktrace_common::{AllocEvent, FreeEvent};

/// Identifies a stack: a hash of the pid and the frames, computed by the kernel side.
pub type StackId = u64;

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
    pub stack_id: StackId,
    pub outstanding_count: u64,
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
    /// Allocations returning an address that was still outstanding: its free was missed
    /// (a lost event or an unhooked release path). The old block counts as freed.
    pub replaced: u64,
}

#[derive(Debug, Default)]
struct ProcessHeap {
    blocks: HashMap<u64, Block>,
    stacks: Vec<StackCounters>,
    stack_index: HashMap<StackId, u32>,
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
    /// the oldest block.
    fn rows(&self, now_ms: u32, min_age_ms: u32) -> Vec<StackRow> {
        let mut rows: Vec<StackRow> = self
            .stacks
            .iter()
            .map(|c| StackRow {
                counters: *c,
                aged_count: 0,
                aged_bytes: 0,
                oldest_born_ms: None,
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
}

/// A stack's counters as of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackRow {
    pub counters: StackCounters,
    /// Outstanding blocks (and their bytes) at least `--min-age` old.
    pub aged_count: u64,
    pub aged_bytes: u64,
    /// Milliseconds since the table's epoch; `None` when nothing is outstanding.
    pub oldest_born_ms: Option<u32>,
}

/// What a process still held when it exited or exec'd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exited {
    pub pid: u32,
    /// Milliseconds since the table's epoch.
    pub at_ms: u32,
    /// True when the image was replaced by exec rather than the process exiting.
    pub by_exec: bool,
    /// Stacks that still held blocks.
    pub stacks: Vec<StackRow>,
}

/// One process's rows in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessRows {
    pub pid: u32,
    pub stacks: Vec<StackRow>,
}

/// The tables at one moment, for reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub totals: Totals,
    /// Milliseconds since the table's epoch.
    pub now_ms: u32,
    /// Processes still alive.
    pub live: Vec<ProcessRows>,
    /// What exited processes held at exit.
    pub exited: Vec<Exited>,
}

/// All outstanding allocations, per process.
#[derive(Debug)]
pub struct HeapTables {
    epoch_ns: u64,
    procs: HashMap<u32, ProcessHeap>,
    exited: Vec<Exited>,
    totals: Totals,
}

impl HeapTables {
    /// Empty tables; event times are measured from `epoch_ns` (CLOCK_MONOTONIC).
    pub fn new(epoch_ns: u64) -> Self {
        Self {
            epoch_ns,
            procs: HashMap::new(),
            exited: Vec::new(),
            totals: Totals::default(),
        }
    }

    /// Milliseconds since the epoch of a CLOCK_MONOTONIC time.
    pub fn ms_since_epoch(&self, ts_ns: u64) -> u32 {
        (ts_ns.saturating_sub(self.epoch_ns) / 1_000_000).min(u64::from(u32::MAX)) as u32
    }

    /// The epoch, CLOCK_MONOTONIC nanoseconds.
    pub fn epoch_ns(&self) -> u64 {
        self.epoch_ns
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Applies an allocation (malloc, calloc, realloc, …) with C's realloc rules.
    pub fn alloc(&mut self, e: &AllocEvent) {
        let born_ms = self.ms_since_epoch(e.hdr.ts_ns);
        let heap = self.procs.entry(e.hdr.pid).or_default();
        if e.old_addr != 0 && (e.addr != 0 || e.size == 0) {
            // realloc moved or freed the old block (realloc(p, 0) returns NULL).
            if heap.release(e.old_addr) {
                self.totals.frees += 1;
            } else {
                self.totals.unmatched_frees += 1;
            }
        }
        if e.addr == 0 {
            return;
        }
        if heap.release(e.addr) {
            self.totals.replaced += 1;
            self.totals.frees += 1;
        }
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

    /// Applies a free. A block we never saw allocated counts as unmatched, not an error.
    pub fn free(&mut self, e: &FreeEvent) {
        let known = self
            .procs
            .get_mut(&e.hdr.pid)
            .is_some_and(|heap| heap.release(e.addr));
        if known {
            self.totals.frees += 1;
        } else {
            self.totals.unmatched_frees += 1;
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
        self.totals.frees += inside.len() as u64;
        inside.len() as u64
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
        let at_ms = self.ms_since_epoch(ts_ns);
        let stacks: Vec<StackRow> = heap
            .rows(u32::MAX, 0)
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

    /// The tables as of `now_ns`; rows also count the blocks at least `min_age_ns` old.
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

    pub fn snapshot(&self, now_ns: u64, min_age_ns: u64) -> Snapshot {
        let now_ms = self.ms_since_epoch(now_ns);
        let min_age_ms = (min_age_ns / 1_000_000).min(u64::from(u32::MAX)) as u32;
        let mut live: Vec<ProcessRows> = self
            .procs
            .iter()
            .map(|(&pid, heap)| ProcessRows {
                pid,
                stacks: heap.rows(now_ms, min_age_ms),
            })
            .collect();
        live.sort_by_key(|p| p.pid);
        Snapshot {
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
    use leaktrace_common::{Header, alloc_shape, kind};

    const MS: u64 = 1_000_000;

    fn hdr(kind: u16, pid: u32, ts_ns: u64) -> Header {
        Header {
            kind,
            flags: 0,
            pid,
            tid: pid,
            _pad: 0,
            ts_ns,
        }
    }

    fn alloc(pid: u32, addr: u64, size: u64, stack: u64) -> AllocEvent {
        AllocEvent {
            hdr: hdr(kind::ALLOC, pid, 0),
            addr,
            size,
            old_addr: 0,
            stack_id: stack,
            shape: alloc_shape::SIZE,
            _pad: 0,
        }
    }

    fn realloc(pid: u32, old: u64, new: u64, size: u64, stack: u64) -> AllocEvent {
        AllocEvent {
            old_addr: old,
            shape: alloc_shape::RESIZE,
            ..alloc(pid, new, size, stack)
        }
    }

    fn free(pid: u32, addr: u64) -> FreeEvent {
        FreeEvent {
            hdr: hdr(kind::FREE, pid, 0),
            addr,
        }
    }

    fn rows(t: &HeapTables, pid: u32) -> Vec<StackCounters> {
        let snap = t.snapshot(0, 0);
        let mut rows: Vec<_> = snap
            .live
            .iter()
            .filter(|p| p.pid == pid)
            .flat_map(|p| p.stacks.iter().map(|r| r.counters))
            .collect();
        rows.sort_by_key(|c| c.stack_id);
        rows
    }

    fn invariant(t: &HeapTables) {
        let snap = t.snapshot(u64::MAX, 0);
        let live: u64 = snap
            .live
            .iter()
            .flat_map(|p| &p.stacks)
            .map(|r| r.counters.outstanding_count)
            .sum();
        let exited: u64 = snap
            .exited
            .iter()
            .flat_map(|p| &p.stacks)
            .map(|r| r.counters.outstanding_count)
            .sum();
        assert_eq!(
            t.totals().allocs - t.totals().frees,
            live + exited,
            "{:?}",
            t.totals()
        );
    }

    #[test]
    fn malloc_then_free_leaves_nothing_outstanding() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 100, 7));
        t.alloc(&alloc(1, 0x2000, 50, 7));
        t.free(&free(1, 0x1000));
        let want = StackCounters {
            stack_id: 7,
            outstanding_count: 1,
            outstanding_bytes: 50,
            allocs: 2,
            frees: 1,
        };
        assert_eq!(rows(&t, 1), [want]);
        assert_eq!(
            t.totals(),
            Totals {
                allocs: 2,
                frees: 1,
                unmatched_frees: 0,
                replaced: 0
            }
        );
        invariant(&t);
    }

    #[test]
    fn free_of_unknown_block_is_unmatched_not_an_error() {
        let mut t = HeapTables::new(0);
        t.free(&free(1, 0xdead));
        t.alloc(&alloc(1, 0x1000, 8, 1));
        t.free(&free(2, 0x1000)); // same address, another process
        assert_eq!(t.totals().unmatched_frees, 2);
        assert_eq!(t.totals().frees, 0);
        assert_eq!(rows(&t, 1)[0].outstanding_count, 1);
        invariant(&t);
    }

    #[test]
    fn realloc_that_moves_frees_old_and_owns_new_at_its_own_stack() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 16, 1));
        t.alloc(&realloc(1, 0x1000, 0x2000, 64, 2));
        assert_eq!(
            rows(&t, 1),
            [
                StackCounters {
                    stack_id: 1,
                    outstanding_count: 0,
                    outstanding_bytes: 0,
                    allocs: 1,
                    frees: 1
                },
                StackCounters {
                    stack_id: 2,
                    outstanding_count: 1,
                    outstanding_bytes: 64,
                    allocs: 1,
                    frees: 0
                },
            ]
        );
        invariant(&t);
    }

    #[test]
    fn realloc_in_place_resizes() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 16, 1));
        t.alloc(&realloc(1, 0x1000, 0x1000, 32, 1));
        let r = rows(&t, 1);
        assert_eq!(
            (
                r[0].outstanding_count,
                r[0].outstanding_bytes,
                r[0].allocs,
                r[0].frees
            ),
            (1, 32, 2, 1)
        );
        assert_eq!(t.totals().replaced, 0);
        invariant(&t);
    }

    #[test]
    fn realloc_of_null_is_malloc() {
        let mut t = HeapTables::new(0);
        t.alloc(&realloc(1, 0, 0x1000, 10, 1));
        assert_eq!(rows(&t, 1)[0].outstanding_bytes, 10);
        assert_eq!(
            t.totals(),
            Totals {
                allocs: 1,
                ..Default::default()
            }
        );
        invariant(&t);
    }

    #[test]
    fn realloc_to_zero_frees() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 10, 1));
        t.alloc(&realloc(1, 0x1000, 0, 0, 2));
        assert_eq!(rows(&t, 1)[0].outstanding_count, 0);
        assert_eq!(
            t.totals(),
            Totals {
                allocs: 1,
                frees: 1,
                ..Default::default()
            }
        );
        invariant(&t);
    }

    #[test]
    fn failed_realloc_keeps_the_old_block() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 10, 1));
        t.alloc(&realloc(1, 0x1000, 0, 1 << 60, 2));
        assert_eq!(rows(&t, 1)[0].outstanding_bytes, 10);
        assert_eq!(
            t.totals(),
            Totals {
                allocs: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn realloc_of_unknown_block_counts_an_unmatched_free() {
        let mut t = HeapTables::new(0);
        t.alloc(&realloc(1, 0x9000, 0x1000, 10, 1));
        assert_eq!(
            t.totals(),
            Totals {
                allocs: 1,
                unmatched_frees: 1,
                ..Default::default()
            }
        );
        invariant(&t);
    }

    #[test]
    fn reused_address_without_free_is_counted_as_replaced() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 10, 1));
        t.alloc(&alloc(1, 0x1000, 20, 2));
        assert_eq!(t.totals().replaced, 1);
        let r = rows(&t, 1);
        assert_eq!(
            (
                r[0].outstanding_count,
                r[1].outstanding_count,
                r[1].outstanding_bytes
            ),
            (0, 1, 20)
        );
        invariant(&t);
    }

    #[test]
    fn exit_keeps_what_was_in_use_and_releases_the_process() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 10, 1));
        t.alloc(&alloc(1, 0x2000, 20, 2));
        t.free(&free(1, 0x2000));
        t.alloc(&alloc(2, 0x1000, 30, 3));
        t.exit(1, 5 * MS);
        let snap = t.snapshot(6 * MS, 0);
        assert_eq!(snap.live.iter().map(|p| p.pid).collect::<Vec<_>>(), [2]);
        assert_eq!(snap.exited.len(), 1);
        let ex = &snap.exited[0];
        assert_eq!((ex.pid, ex.at_ms, ex.by_exec), (1, 5, false));
        assert_eq!(ex.stacks.len(), 1, "only stacks still holding blocks");
        assert_eq!(ex.stacks[0].counters.outstanding_bytes, 10);
        // A later free with the dead pid's number is unmatched (the pid may be reused).
        t.free(&free(1, 0x1000));
        assert_eq!(t.totals().unmatched_frees, 1);
        invariant(&t);
    }

    #[test]
    fn exec_retires_the_old_image() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 10, 1));
        t.exec(1, 0);
        t.alloc(&alloc(1, 0x1000, 99, 2));
        let snap = t.snapshot(0, 0);
        assert!(snap.exited[0].by_exec);
        assert_eq!(snap.live[0].stacks[0].counters.outstanding_bytes, 99);
        assert_eq!(
            t.totals().replaced,
            0,
            "the new image's block is not a replacement"
        );
        invariant(&t);
    }

    #[test]
    fn per_process_totals_and_top_stacks() {
        let mut t = HeapTables::new(0);
        t.alloc(&alloc(1, 0x1000, 10, 1));
        t.alloc(&alloc(1, 0x2000, 300, 2));
        t.alloc(&alloc(1, 0x3000, 20, 1));
        t.alloc(&alloc(2, 0x1000, 5, 3));
        assert_eq!(t.outstanding_of(1), (3, 330));
        let top = t.top_stacks(1, 1);
        assert_eq!(
            (top.len(), top[0].stack_id, top[0].outstanding_bytes),
            (1, 2, 300)
        );
        assert_eq!(t.outstanding_of(9), (0, 0));
    }

    #[test]
    fn min_age_filters_young_blocks_and_oldest_is_tracked() {
        let mut t = HeapTables::new(1000 * MS);
        let mut a = alloc(1, 0x1000, 10, 1);
        a.hdr.ts_ns = 1010 * MS;
        t.alloc(&a);
        a.addr = 0x2000;
        a.hdr.ts_ns = 1050 * MS;
        t.alloc(&a);
        let snap = t.snapshot(1060 * MS, 20 * MS);
        let row = snap.live[0].stacks[0];
        assert_eq!((row.aged_count, row.aged_bytes), (1, 10));
        assert_eq!(
            (row.counters.outstanding_count, row.counters.allocs),
            (2, 2),
            "counters are never filtered"
        );
        assert_eq!(row.oldest_born_ms, Some(10));
        let all = t.snapshot(1060 * MS, 0).live[0].stacks[0];
        assert_eq!((all.aged_count, all.aged_bytes), (2, 20));
    }

    #[test]
    fn many_events_in_any_order_keep_the_invariant() {
        // A deterministic shuffle of allocs, frees, reallocs over a small address space.
        let mut t = HeapTables::new(0);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let addr = 0x1000 + (x % 64) * 16;
            match x % 5 {
                0 | 1 => t.alloc(&alloc(1 + (x % 2) as u32, addr, x % 100, x % 3)),
                2 | 3 => t.free(&free(1 + (x % 2) as u32, addr)),
                _ => t.alloc(&realloc(1, addr, 0x1000 + ((x >> 8) % 64) * 16, x % 50, 4)),
            }
        }
        invariant(&t);
        t.exit(1, 0);
        invariant(&t);
    }
}
