//! Unit tests of the heap tables (a sibling file to keep `heap.rs` short).
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
            thread_exit_frees: 0,
            replaced: 0,
            inherited_frees: 0,
            table_full: 0,
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
fn a_thread_on_its_way_out_freeing_unknown_blocks_is_not_unmatched() {
    let mut t = HeapTables::new(0);
    t.alloc(&alloc(1, 0x1000, 8, 1));
    t.free(&free(1, 0x1000));
    let exiting = |addr| FreeEvent {
        hdr: Header {
            flags: header_flags::THREAD_EXIT,
            ..hdr(kind::FREE, 1, 0)
        },
        addr,
    };
    // glibc's tcache shutdown frees the block parked in the cache (freed already) and the
    // cache itself (never seen): neither is the program's.
    t.free(&exiting(0x1000));
    t.free(&exiting(0x2000));
    // A block the exiting thread really held is still matched.
    t.alloc(&alloc(1, 0x3000, 8, 1));
    t.free(&exiting(0x3000));
    // An unknown block freed before the thread was on its way out is unmatched.
    t.free(&free(1, 0x4000));
    let totals = t.totals();
    assert_eq!(
        (
            totals.frees,
            totals.unmatched_frees,
            totals.thread_exit_frees
        ),
        (2, 1, 2)
    );
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
    let row = &snap.live[0].stacks[0];
    assert_eq!((row.aged_count, row.aged_bytes), (1, 10));
    assert_eq!(
        (row.counters.outstanding_count, row.counters.allocs),
        (2, 2),
        "counters are never filtered"
    );
    assert_eq!(row.oldest_born_ms, Some(10));
    let all = t.snapshot(1060 * MS, 0);
    let all = &all.live[0].stacks[0];
    assert_eq!((all.aged_count, all.aged_bytes), (2, 20));
    // What it holds describes the same blocks as its counts: the young one only when aged.
    let held = row.held.as_deref().unwrap();
    assert_eq!((held.blocks(), held.age_ms().max), (1, 50));
    let held = all.held.as_deref().unwrap();
    assert_eq!(held.blocks(), 2);
    assert_eq!((held.age_ms().p50, held.age_ms().max), (10, 50));
}

/// `n` blocks of `size` bytes at stack `stack` of `pid`, born at `born_ms`.
fn hold(t: &mut HeapTables, pid: u32, stack: u64, n: u64, size: u64, born_ms: u64) {
    for i in 0..n {
        let mut a = alloc(pid, (stack << 32) + i * 0x100, size, stack);
        a.hdr.ts_ns = born_ms * MS;
        t.alloc(&a);
    }
}

#[test]
fn snapshots_describe_the_heaviest_rows_only_when_asked() {
    let mut t = HeapTables::new(0);
    hold(&mut t, 1, 1, 10, 100, 0); // 1,000 B
    hold(&mut t, 1, 2, 1, 10, 500); // 10 B
    hold(&mut t, 2, 3, 3, 1000, 900); // 3,000 B
    let described = |snap: &HeapSnapshot| -> Vec<(u32, u64, Option<u64>)> {
        snap.rows()
            .map(|r| {
                let held = r.row.held.as_deref();
                (r.pid, r.row.counters.stack_id, held.map(Held::blocks))
            })
            .collect()
    };
    let all = t.snapshot(1000 * MS, 0);
    assert_eq!(
        described(&all),
        vec![(1, 1, Some(10)), (1, 2, Some(1)), (2, 3, Some(3))]
    );
    let two = t.snapshot_described(1000 * MS, 0, Some(2));
    assert_eq!(
        described(&two),
        vec![(1, 1, Some(10)), (1, 2, None), (2, 3, Some(3))]
    );
    // Counts are the same either way; ages are as of the snapshot.
    assert_eq!(
        all.live[1].stacks[0].aged_bytes,
        two.live[1].stacks[0].aged_bytes
    );
    let held = two.live[1].stacks[0].held.as_deref().unwrap();
    assert_eq!(held.age_ms().max, 100);
    assert_eq!(held.size().max, 1000);
    // What an exited process held is described at its exit, ages as of then.
    t.exit(1, 2000 * MS);
    let snap = t.snapshot_described(5000 * MS, 0, Some(0));
    let ex = &snap.exited[0].stacks;
    let ages: Vec<u64> = ex
        .iter()
        .map(|r| r.held.as_deref().unwrap().age_ms().max)
        .collect();
    assert_eq!(ages, vec![2000, 1500]);
    assert!(snap.live[0].stacks[0].held.is_none(), "none asked for");
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

#[test]
fn a_forked_child_frees_what_it_inherited_without_unmatched_frees() {
    let mut t = HeapTables::new(0);
    t.alloc(&alloc(1, 0x1000, 100, 7));
    t.alloc(&alloc(1, 0x2000, 200, 7));
    t.fork(1, 2);
    // The child frees an inherited block, reallocs the other, and allocates its own.
    t.free(&free(2, 0x1000));
    t.alloc(&realloc(2, 0x2000, 0x3000, 300, 8));
    t.alloc(&alloc(2, 0x4000, 40, 9));
    t.free(&free(2, 0x4000));
    let totals = t.totals();
    assert_eq!(totals.unmatched_frees, 0);
    assert_eq!(totals.inherited_frees, 2);
    // The parent still holds its two blocks; the child holds only what it allocated.
    assert_eq!(t.outstanding_of(1), (2, 300));
    assert_eq!(t.outstanding_of(2), (1, 300));
    invariant(&t);
    // Freed once in the child, the inherited block is no longer known there.
    t.free(&free(2, 0x1000));
    assert_eq!(t.totals().unmatched_frees, 1);
}

#[test]
fn a_full_table_keeps_its_cap_and_counts_what_it_turned_away() {
    let mut t = HeapTables::new(0);
    t.set_max_blocks(3);
    for (pid, addr) in [(1, 0x10), (1, 0x20), (2, 0x10), (2, 0x20), (2, 0x30)] {
        t.alloc(&alloc(pid, addr, 8, 0xa));
    }
    assert_eq!(t.blocks(), 3);
    assert_eq!(t.totals().table_full, 2);
    assert_eq!(rows(&t, 2)[0].outstanding_count, 1);
    // A free of a block turned away is unmatched; a freed slot takes the next one.
    t.free(&free(2, 0x20));
    assert_eq!(t.totals().unmatched_frees, 1);
    t.free(&free(1, 0x10));
    t.alloc(&alloc(2, 0x40, 8, 0xa));
    assert_eq!((t.blocks(), t.totals().table_full), (3, 2));
    // realloc in place of a kept block moves it without needing room.
    t.alloc(&realloc(2, 0x40, 0x50, 16, 0xa));
    assert_eq!((t.blocks(), t.totals().table_full), (3, 2));
    invariant(&t);
    // A process gone gives its blocks back.
    t.discard(2);
    assert_eq!(t.blocks(), 1);
    t.exit(1, 0);
    assert_eq!(t.blocks(), 0);
    t.alloc(&alloc(3, 0x1000, 4096, 0xa));
    assert_eq!(t.release_range(3, 0x1000, 0x1001), 1);
    assert_eq!(t.blocks(), 0);
}
