//! A report built from recorded tables, against the output it has always given: merging
//! rows of one trimmed stack, ranking (ties too), trends, exits, descriptors and temp files.
use leaktrace_common::{AllocEvent, FreeEvent, Header, alloc_shape, kind, stack_flags};

use crate::{
    report::{ReportInput, ReportOptions, TmpRow, Trend},
    symbolize::{
        Symbols,
        stacks::{PlacedFrame, Stack, StackStore},
    },
    track::{
        fd::{Creation, FdKind, FdTables},
        heap::HeapTables,
    },
};

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

fn alloc(t: &mut HeapTables, pid: u32, addr: u64, size: u64, stack: u64, ts_ns: u64) {
    t.alloc(&AllocEvent {
        hdr: hdr(kind::ALLOC, pid, ts_ns),
        addr,
        size,
        old_addr: 0,
        stack_id: stack,
        shape: alloc_shape::SIZE,
        _pad: 0,
    });
}

fn free(t: &mut HeapTables, pid: u32, addr: u64) {
    t.free(&FreeEvent {
        hdr: hdr(kind::FREE, pid, 0),
        addr,
    });
}

/// A stack of frames outside any file: `(address, mapping name)`, innermost first.
fn stack(pid: u32, flags: u32, frames: &[(u64, &str)]) -> Stack {
    Stack {
        pid,
        flags,
        frames: frames
            .iter()
            .map(|&(addr, mapping)| PlacedFrame {
                addr,
                place: None,
                mapping: Some(mapping.to_owned()),
            })
            .collect(),
    }
}

fn stacks() -> StackStore {
    let (app, libc) = ("/app/bin", "libc.so.6");
    let mut s = StackStore::default();
    // 1 and 2 differ only in the runtime frame trimmed off: one row.
    s.insert(1, stack(1, 0, &[(0x7000, libc), (0x10, app), (0x20, app)]));
    s.insert(2, stack(1, 0, &[(0x7004, libc), (0x10, app), (0x20, app)]));
    // 3 and 4 tie on weight and pid: their addresses' text decides (0x10 before 0x9).
    s.insert(3, stack(1, 0, &[(0x9, app), (0x30, app)]));
    s.insert(4, stack(1, 0, &[(0x10, app), (0x30, app)]));
    s.insert(5, stack(1, stack_flags::TRUNCATED, &[(0x40, app)]));
    // 6 is never delivered.
    s.insert(7, stack(2, 0, &[(0x50, app), (0x60, app)]));
    s.insert(8, stack(3, 0, &[(0x70, app)]));
    s.insert(9, stack(3, 0, &[(0x7008, libc), (0x70, app)]));
    s
}

fn report(
    heap: &HeapTables,
    fds: &FdTables,
    now_ns: u64,
    trend: &mut Trend,
    symbols: &mut Symbols,
    stacks: &StackStore,
) -> String {
    let snapshot = heap.snapshot(now_ns, 0);
    let fds = fds.snapshot(snapshot.now_ms);
    let tmp = [
        TmpRow {
            pid: 1,
            stack_id: 1,
            path: "/tmp/a".into(),
            bytes: 10,
            created_ms: 1,
        },
        TmpRow {
            pid: 1,
            stack_id: 2,
            path: "/tmp/b".into(),
            bytes: 20,
            created_ms: 2,
        },
        TmpRow {
            pid: 1,
            stack_id: 3,
            path: "/tmp/c".into(),
            bytes: 30,
            created_ms: 3,
        },
    ];
    let owner = |pid: u32| crate::report::Owner::named(format!("p{pid}"));
    let r = crate::report::build(
        &ReportInput {
            snapshot: &snapshot,
            stacks,
            lost: &[("ring_full", 2), ("stack_ring_full", 1), ("other", 0)],
            owner: &owner,
            is_final: false,
            walks: None,
            fds: &fds,
            tmp: &tmp,
            tmp_created: 4,
            tmp_unwatched: 1,
            fd_exhaustion: &[],
            oom_kills: &[],
            filtered_frees: 5,
            thread_exit_frees: 2,
            tracer: Default::default(),
            stack_cache_hits: 6,
            stack_walks: 7,
            probes: None,
        },
        &ReportOptions {
            min_age_ns: 0,
            growth_mode: false,
            sample_bytes: 0,
            top: None,
            by_pid: false,
            row_limit: None,
            oom_traced_only: false,
        },
        symbols,
        trend,
    );
    serde_json::to_string_pretty(&r).unwrap()
}

fn creation(stack: u64, kind: FdKind, path: Option<&str>, born_ms: u32) -> Creation<'_> {
    Creation {
        stack,
        kind,
        cloexec: false,
        path,
        born_ms,
    }
}

#[test]
fn a_report_from_recorded_tables_is_what_it_always_was() {
    let stacks = stacks();
    let mut symbols = Symbols::new();
    let mut trend = Trend::default();
    let mut heap = HeapTables::new(0);
    alloc(&mut heap, 1, 0x1000, 100, 1, MS);
    alloc(&mut heap, 1, 0x2000, 50, 2, 2 * MS);
    alloc(&mut heap, 1, 0x3000, 64, 3, 3 * MS);
    alloc(&mut heap, 1, 0x4000, 64, 4, 4 * MS);
    alloc(&mut heap, 1, 0x5000, 8, 5, 5 * MS);
    alloc(&mut heap, 1, 0x5008, 8, 5, 5 * MS);
    free(&mut heap, 1, 0x5008);
    alloc(&mut heap, 1, 0x6000, 16, 6, 6 * MS);
    alloc(&mut heap, 2, 0x1000, 300, 7, 7 * MS);
    heap.exec(2, 8 * MS);
    alloc(&mut heap, 2, 0x1000, 200, 7, 9 * MS);
    alloc(&mut heap, 3, 0x1000, 1, 8, 9 * MS);
    free(&mut heap, 3, 0x1000);
    free(&mut heap, 3, 0xdead);
    let mut fds = FdTables::default();
    fds.open(1, 3, &creation(1, FdKind::File, Some("/etc/a"), 1));
    fds.open(1, 4, &creation(2, FdKind::Socket, None, 2));
    fds.open(1, 5, &creation(3, FdKind::Pipe, None, 3));
    fds.open(3, 3, &creation(8, FdKind::File, Some("/etc/b"), 4));
    fds.open(3, 4, &creation(9, FdKind::File, Some("/etc/c"), 5));
    fds.open(3, 5, &creation(9, FdKind::File, Some("/etc/c"), 5));
    fds.close(1, 5);
    fds.exit(3, 6);
    let first = report(&heap, &fds, 10 * MS, &mut trend, &mut symbols, &stacks);
    alloc(&mut heap, 1, 0x1100, 1000, 1, 1000 * MS);
    let second = report(&heap, &fds, 2000 * MS, &mut trend, &mut symbols, &stacks);
    let got = format!("{first}\n{second}\n");
    // Written by the code before merging and ranking were shared by every kind of row, then
    // rewritten when rows kept their whole stacks (UPDATE_GOLDEN=1 rewrites it).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/report/golden/two_reports.json"
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    assert_eq!(got, std::fs::read_to_string(path).unwrap());
}
