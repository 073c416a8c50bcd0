//! The pipeline after the kernel boundary, without privileges: recorded sessions (see
//! `fixtures/record.sh`) replayed through decode → track → symbolize → report → every
//! exporter, against what the live session wrote and against golden files.
use std::{io::Read as _, path::PathBuf};

use super::record::replay;
use crate::{
    export::{self, FoldedKind, FoldedWeight, Format},
    report::{Leak, Report},
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/driver/fixtures")
        .join(name)
}

fn replayed(name: &str) -> Vec<Report> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(fixture(name)).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    replay(&text).unwrap()
}

fn check(name: &str, got: &str) {
    let path = fixture("golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        got, want,
        "{name} differs from its golden file (UPDATE_GOLDEN=1 to accept)"
    );
}

/// The function at a row's site.
fn top_symbol(frames: &[crate::report::Frame], site: usize) -> Option<&str> {
    frames.get(site).and_then(|f| f.symbol.as_deref())
}

fn leaks_at<'a>(leaks: &'a [Leak], symbol: &str) -> Vec<&'a Leak> {
    leaks
        .iter()
        .filter(|l| top_symbol(&l.frames, l.site) == Some(symbol))
        .collect()
}

#[test]
fn a_replayed_session_writes_what_the_live_one_wrote() {
    for (recording, live) in [
        ("full.jsonl.gz", "full.live.json"),
        ("growth.jsonl.gz", "growth.live.json"),
    ] {
        let reports = replayed(recording);
        let last = reports.last().unwrap();
        assert!(last.is_final);
        let want = std::fs::read_to_string(fixture(live)).unwrap();
        let got = export::render(last, Format::Json, FoldedWeight::Bytes, FoldedKind::Heap);
        assert_eq!(got, want, "{recording} replayed differs from {live}");
    }
}

/// Every report of both recorded sessions: the summary is the sum of its rows, the program's
/// and the runtime's apart, and no stack is on two rows (each block is counted once).
#[test]
fn the_summary_is_the_sum_of_the_rows_on_each_side_of_the_runtime() {
    for recording in ["full.jsonl.gz", "growth.jsonl.gz"] {
        for (i, r) in replayed(recording).iter().enumerate() {
            let total = |rows: &[Leak]| {
                rows.iter().fold((0, 0), |(c, b), l| {
                    (c + l.outstanding_count, b + l.outstanding_bytes)
                })
            };
            let s = &r.summary;
            let at = format!("{recording}, report {i}");
            assert_eq!(
                total(&r.leaks),
                (s.outstanding_count, s.outstanding_bytes),
                "{at}"
            );
            assert_eq!(
                total(&r.runtime),
                (s.runtime_outstanding_count, s.runtime_outstanding_bytes),
                "{at}"
            );
            let mut stacks = std::collections::HashSet::new();
            for l in r.leaks.iter().chain(&r.runtime) {
                let addrs: Vec<u64> = l.frames.iter().map(|f| f.addr).collect();
                assert!(stacks.insert((l.pid, l.at_exit, addrs)), "{at}: {l:?}");
                assert!(l.site < l.frames.len().max(1), "{at}: {l:?}");
            }
        }
    }
    // The runtime's rows are there to be counted.
    let full = replayed("full.jsonl.gz");
    assert!(!full.last().unwrap().runtime.is_empty());
}

#[test]
fn every_exporter_renders_the_replayed_session() {
    let full = replayed("full.jsonl.gz");
    let last = full.last().unwrap();
    let render = |format, weight, kind| export::render(last, format, weight, kind);
    use FoldedKind::{Fd, Heap, Tmp};
    use FoldedWeight::{Bytes, Count};
    check("full.txt", &render(Format::Table, Bytes, Heap));
    check("full.heap.folded", &render(Format::Folded, Bytes, Heap));
    check(
        "full.heap-count.folded",
        &render(Format::Folded, Count, Heap),
    );
    check("full.fd.folded", &render(Format::Folded, Bytes, Fd));
    check("full.tmp.folded", &render(Format::Folded, Bytes, Tmp));
    let growth = replayed("growth.jsonl.gz");
    let last = growth.last().unwrap();
    check(
        "growth.txt",
        &export::render(last, Format::Table, Bytes, Heap),
    );
    check(
        "growth.folded",
        &export::render(last, Format::Folded, Bytes, Heap),
    );
}

#[test]
fn heap_leaks_are_counted_exactly_at_their_sites() {
    let reports = replayed("full.jsonl.gz");
    let r = reports.last().unwrap();
    // oom_victim's cache: 1 MiB blocks, kept until the OOM killer ended it.
    let grow = leaks_at(&r.leaks, "grow_cache");
    assert_eq!(grow.len(), 1);
    assert_eq!(grow[0].outstanding_bytes, grow[0].outstanding_count << 20);
    assert_eq!(grow[0].outstanding_count, 48);
    assert!(grow[0].at_exit);
    // demo's response cache never evicts: a key and a value per request, all still held.
    let cache: Vec<(u64, u64)> = leaks_at(&r.leaks, "cache_insert")
        .iter()
        .map(|l| (l.outstanding_count, l.allocs))
        .collect();
    assert_eq!(cache, [(226, 226), (226, 226)]);
    // Request buffers are freed: not a leak.
    assert!(leaks_at(&r.leaks, "handle_request").is_empty(), "{r:#?}");
    let s = &r.summary;
    assert_eq!(s.allocs - s.frees, s.outstanding_count);
    assert_eq!(s.lost_events, 0);
}

#[test]
fn descriptors_temp_files_and_alerts_are_named_by_their_stack() {
    let reports = replayed("full.jsonl.gz");
    let r = reports.last().unwrap();
    let fd = |symbol: &str| {
        r.fd_leaks
            .iter()
            .filter(|l| top_symbol(&l.frames, l.site) == Some(symbol))
            .map(|l| l.outstanding)
            .sum::<u64>()
    };
    // demo forgets every 50th config check's descriptor; fd_exhaust hoards up to its limit.
    assert_eq!(fd("check_config"), 19);
    assert_eq!(fd("hoard"), 60);
    assert_eq!(fd("one_more"), 0, "the failed open holds nothing");
    let tmp = |symbol: &str| {
        r.tmp_leaks
            .iter()
            .filter(|l| top_symbol(&l.frames, l.site) == Some(symbol))
            .map(|l| l.files)
            .sum::<u64>()
    };
    assert_eq!(tmp("leak_mkstemp"), 5);
    assert_eq!(tmp("cleaned_up"), 0);
    assert_eq!(tmp("renamed_away"), 0);
    // The full descriptor table: once at the failing stack, with the limit it hit.
    let x: Vec<_> = r
        .fd_exhaustion
        .iter()
        .filter(|x| top_symbol(&x.frames, 0) == Some("one_more"))
        .collect();
    assert_eq!(x.len(), 1, "{:#?}", r.fd_exhaustion);
    assert_eq!((x[0].errno, x[0].limit), ("EMFILE", Some(64)));
    assert_eq!(top_symbol(&x[0].top_holders[0].frames, 0), Some("hoard"));
    // The OOM kill, merged with what its victim held.
    assert_eq!(r.oom_kills.len(), 1);
    let k = &r.oom_kills[0];
    assert_eq!(k.comm, "oom_victim");
    assert!(k.traced);
    assert_eq!(k.cgroup.as_deref(), Some("/leaktrace-record"));
    assert_eq!(k.limit_bytes, Some(48 << 20));
    assert_eq!(top_symbol(&k.frames_top, 0), Some("grow_cache"));
    assert!(!k.growth.is_empty());
}

#[test]
fn a_leak_seen_across_reports_has_a_growth_slope() {
    let reports = replayed("full.jsonl.gz");
    assert!(reports.len() > 3, "reports every 300 ms");
    let slopes: Vec<f64> = reports
        .iter()
        .flat_map(|r| leaks_at(&r.leaks, "cache_insert"))
        .filter(|l| !l.at_exit)
        .filter_map(|l| l.growth_bytes_per_s)
        .collect();
    assert!(!slopes.is_empty());
    assert!(slopes.iter().all(|&s| s > 0.0), "{slopes:?}");
    // At exit a leak no longer grows: no slope.
    let last = reports.last().unwrap();
    assert!(
        leaks_at(&last.leaks, "cache_insert")
            .iter()
            .all(|l| l.growth_bytes_per_s.is_none())
    );
}

#[test]
fn growth_mode_charges_the_pages_each_stack_keeps() {
    let reports = replayed("growth.jsonl.gz");
    let r = reports.last().unwrap();
    assert_eq!(r.summary.mode, "growth");
    let kept = |symbol: &str| {
        leaks_at(&r.leaks, symbol)
            .iter()
            .map(|l| l.outstanding_bytes)
            .sum::<u64>()
    };
    // 40 blocks of 256 KiB written and kept: 65 pages each with malloc's header page, and
    // one page of malloc's own state (as tests/growth.rs holds the live run to).
    assert_eq!(kept("leak_pages"), (40 * 65 + 1) * 4096);
    assert_eq!(kept("churn_big"), 0, "freed with munmap");
    assert_eq!(
        r.leaks.first().and_then(|l| top_symbol(&l.frames, l.site)),
        Some("leak_pages")
    );
}

#[test]
fn a_damaged_recording_is_an_error_not_a_panic() {
    assert!(
        replay("{\"op\":\"record\",\"hex\":\"00\"}\n").is_err(),
        "no settings"
    );
    let begin = r#"{"op":"begin","options":{"min_age_ns":0,"growth_mode":false,"sample_bytes":0,"top":null},"features":0}"#;
    assert!(replay(&format!("{begin}\n{{\"op\":\"record\",\"hex\":\"0g\"}}\n")).is_err());
    assert!(replay(&format!("{begin}\nnot json\n")).is_err());
    // A record too short to decode is counted, not fatal.
    let r = replay(&format!(
        "{begin}\n{{\"op\":\"record\",\"hex\":\"0100\"}}\n{{\"op\":\"report\",\"is_final\":true,\"kernel\":{{\"lost\":[],\"filtered_frees\":0,\"stack_cache_hits\":0,\"stack_walks\":0,\"walks\":null}}}}\n"
    ))
    .unwrap();
    assert_eq!(r[0].summary.lost_by_cause.get("undecodable"), Some(&1));
}

/// Node-wide, a process can exec, open, and exit before the agent adopts it: its exit must
/// take everything its records left in the pipeline (the agent's RSS grew ~8 KiB a process
/// under process churn before it did).
#[test]
fn node_wide_a_process_gone_before_adoption_leaves_nothing_behind() {
    use leaktrace_common::{
        AllocEvent, FdEvent, Header, ProcEvent, alloc_shape, fd_call, fd_op, features, kind,
    };

    use super::Pipeline;
    use crate::{
        decode::encode,
        driver::record::Replayed,
        report::ReportOptions,
        symbolize::Symbols,
        track::{fd_events::FdTracker, oom::OomWatch},
    };

    let options = ReportOptions {
        min_age_ns: 0,
        growth_mode: false,
        sample_bytes: 0,
        top: None,
        by_pid: false,
        row_limit: None,
        oom_traced_only: false,
    };
    let mut p = Pipeline::new(
        Box::new(Replayed::default()),
        options,
        FdTracker::new(features::FD | features::TMP),
        OomWatch::new(None),
        Symbols::recorded([]),
    );
    p.keep_growth_apart();
    p.forget_exited();
    let hdr = |kind| Header {
        kind,
        flags: 0,
        pid: 77,
        tid: 77,
        _pad: 0,
        ts_ns: 1_000_000,
    };
    let proc = |kind| {
        encode::proc(&ProcEvent {
            hdr: hdr(kind),
            other_pid: 0,
            _pad: 0,
        })
    };
    p.apply(&proc(kind::EXEC));
    p.apply(&encode::stack(&hdr(kind::STACK), 5, 0, &[0x1000, 0x2000]));
    let open = FdEvent {
        hdr: hdr(kind::FD),
        op: fd_op::OPEN,
        syscall: fd_call::OPENAT,
        fd: 3,
        fd2: 0,
        flags: 0,
        errno: 0,
        dirfd: 0,
        stack_id: 5,
        value: 0,
    };
    p.apply(&encode::fd(&open, None));
    assert!(!p.owners.is_empty(), "the exec was noted");
    // What an image held is forgotten when it execs another: kept as "in use at exit",
    // every `sh -c` on the node would pile up.
    p.apply(&encode::alloc(&AllocEvent {
        hdr: hdr(kind::ALLOC),
        addr: 0x5000,
        size: 64,
        old_addr: 0,
        stack_id: 5,
        shape: alloc_shape::SIZE,
        _pad: 0,
    }));
    assert_eq!(p.heap.outstanding_of(77), (1, 64));
    p.apply(&proc(kind::EXEC));
    let snap = p.heap.snapshot(2_000_000, 0);
    assert!(snap.exited.is_empty() && snap.live.is_empty(), "{snap:?}");
    let applied = p.apply(&proc(kind::EXIT));
    assert_eq!(applied.lifecycle, Some(super::Lifecycle::Exit(77)));
    assert!(p.owners.is_empty(), "{:?}", p.owners);
    assert!(p.space(77).is_none());
    assert!(p.stacks.is_empty());
    assert_eq!(p.fd.fds.open_count(77), 0);
    assert_eq!(
        p.heap.pids().count() + p.pages.as_ref().unwrap().pids().count(),
        0
    );
}
