//! Diffs of the recorded session's report (what `--format json` wrote for it) against
//! hand-edited copies: a fix, growth, a new stack, moved lines, rebased addresses.
use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use super::*;
use crate::export::{self, FoldedKind, FoldedWeight, Format};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/driver/fixtures")
        .join(name)
}

/// The final report of the recorded session (`driver/fixtures/full.jsonl.gz`), as its live
/// session wrote it: 15 heap rows (546 blocks, 51,279,868 B), 4 descriptor rows (82), 3 temp
/// file rows (8 files, 525 B).
pub(crate) fn full() -> ReportView {
    let text = std::fs::read_to_string(fixture("full.live.json")).unwrap();
    Input::parse("full.live.json", &text).unwrap().report
}

pub(crate) fn input(path: &str, report: ReportView) -> Input {
    Input {
        path: path.to_owned(),
        reports: 1,
        report,
    }
}

/// The rows whose innermost frame is `symbol`.
fn rows_at<'a>(r: &'a mut ReportView, kind: Kind, symbol: &str) -> Vec<&'a mut Row> {
    r.rows
        .iter_mut()
        .filter(|row| {
            row.kind == kind
                && row.frames.get(row.site).and_then(|f| f.symbol.as_deref()) == Some(symbol)
        })
        .collect()
}

/// The one row whose innermost frame is `symbol` at `line`.
fn row_at<'a>(r: &'a mut ReportView, kind: Kind, symbol: &str, line: u32) -> &'a mut Row {
    let mut rows: Vec<&mut Row> = rows_at(r, kind, symbol)
        .into_iter()
        .filter(|row| row.frames[row.site].line == Some(line))
        .collect();
    assert_eq!(rows.len(), 1, "{symbol}:{line}");
    rows.pop().unwrap()
}

/// The stack whose innermost frame is `symbol` (at `line`, when given).
fn stack<'a>(d: &'a Diff, kind: Kind, symbol: &str, line: Option<u32>) -> &'a StackDiff {
    let found: Vec<&StackDiff> = d
        .stacks
        .iter()
        .filter(|s| {
            s.kind == kind
                && s.frames[s.site].symbol.as_deref() == Some(symbol)
                && line.is_none_or(|l| s.frames[s.site].line == Some(l))
        })
        .collect();
    assert_eq!(found.len(), 1, "{kind:?} {symbol}:{line:?} in {d:#?}");
    found[0]
}

fn total(d: &Diff, kind: Kind) -> &Total {
    d.totals.iter().find(|t| t.kind == kind).unwrap()
}

/// What another run looks like: the executables in another temporary directory; names,
/// lines and offsets as before (addresses, which ASLR moves, are not even read).
fn rerun(mut r: ReportView) -> ReportView {
    for row in &mut r.rows {
        for f in &mut row.frames {
            if let Some(m) = &mut f.module
                && let Some(name) = m.strip_prefix("/tmp/tmp.1xYHhoO0Tn/")
            {
                *m = format!("/tmp/tmp.Z9other/{name}");
            }
        }
    }
    r
}

#[test]
fn a_report_against_itself_is_all_unchanged() {
    let r = full();
    let d = diff(&input("a", r.clone()), &input("b", r), Sort::Bytes);
    assert_eq!(
        d.counts,
        Counts {
            unchanged: 22,
            ..Counts::default()
        }
    );
    assert!(
        d.stacks
            .iter()
            .all(|s| s.matched == Some(Matched::Frames) && s.delta_count == 0)
    );
    let heap = total(&d, Kind::Heap);
    assert_eq!(
        (
            heap.old_count,
            heap.new_count,
            heap.old_bytes,
            heap.new_bytes
        ),
        (546, 546, Some(51_279_868), Some(51_279_868))
    );
    assert_eq!((heap.delta_count, heap.delta_bytes), (0, Some(0)));
    let fd = total(&d, Kind::Fd);
    assert_eq!((fd.old_count, fd.new_count, fd.old_bytes), (82, 82, None));
    let tmp = total(&d, Kind::Tmp);
    assert_eq!((tmp.old_count, tmp.old_bytes), (8, Some(525)));
    // Kinds neither report holds have no totals.
    assert_eq!(
        d.totals.iter().map(|t| t.kind).collect::<Vec<_>>(),
        [Kind::Heap, Kind::Fd, Kind::Tmp]
    );
    // Unchanged stacks, most held first: grow_cache's 48 MiB.
    assert_eq!(
        d.stacks[0].frames[d.stacks[0].site].symbol.as_deref(),
        Some("grow_cache")
    );
    assert!(d.notes.is_empty(), "{:?}", d.notes);
}

#[test]
fn a_fixed_stack_is_gone_with_its_bytes_and_a_rerun_changes_nothing_else() {
    let old = full();
    let mut new = rerun(old.clone());
    new.rows
        .retain(|r| r.frames[r.site].symbol.as_deref() != Some("grow_cache"));
    let d = diff(&input("old", old), &input("new", new), Sort::Bytes);
    assert_eq!(
        d.counts,
        Counts {
            gone: 1,
            unchanged: 21,
            ..Counts::default()
        }
    );
    let gone = stack(&d, Kind::Heap, "grow_cache", Some(11));
    assert_eq!(gone.change, Change::Gone);
    assert_eq!(
        (gone.old_count, gone.new_count, gone.delta_count),
        (48, 0, -48)
    );
    assert_eq!(
        (gone.old_bytes, gone.new_bytes, gone.delta_bytes),
        (Some(50_331_648), Some(0), Some(-50_331_648))
    );
    assert_eq!(gone.matched, None);
    assert_eq!(gone.comm, "oom_victim");
    let heap = total(&d, Kind::Heap);
    assert_eq!(
        (
            heap.old_stacks,
            heap.new_stacks,
            heap.delta_count,
            heap.delta_bytes
        ),
        (15, 14, -48, Some(-50_331_648))
    );
    // Listed first after the (absent) grew and new groups.
    assert_eq!(d.stacks[0].change, Change::Gone);
}

#[test]
fn grew_shrank_and_new_are_told_apart_with_exact_deltas() {
    let old = full();
    let mut new = rerun(old.clone());
    // The response cache kept 74 more entries of 4 KiB.
    let r = row_at(&mut new, Kind::Heap, "cache_insert", 35);
    (r.count, r.bytes) = (300, 925_696 + 74 * 4096);
    // hoard() keeps 10 descriptors instead of 60.
    rows_at(&mut new, Kind::Fd, "hoard")[0].count = 10;
    // As many bytes in one more block: grew, by count.
    let r = row_at(&mut new, Kind::Heap, "leak_tmpfile", 56);
    (r.count, r.bytes) = (3, 944);
    // More bytes in fewer blocks: grew, bytes first.
    let r = row_at(&mut new, Kind::Heap, "cache_insert", 33);
    (r.count, r.bytes) = (200, 12_000);
    // A temp file stack that was not there.
    let mut added = rows_at(&mut new, Kind::Tmp, "leak_mkstemp")[0].clone();
    added.frames[added.site].symbol = Some("leak_mkdtemp".into());
    (added.count, added.bytes) = (2, 64);
    new.rows.push(added);
    let d = diff(&input("old", old), &input("new", new), Sort::Bytes);
    assert_eq!(
        d.counts,
        Counts {
            grew: 3,
            new: 1,
            shrank: 1,
            gone: 0,
            unchanged: 18,
        }
    );
    let s = stack(&d, Kind::Heap, "cache_insert", Some(35));
    assert_eq!(s.change, Change::Grew);
    assert_eq!((s.delta_count, s.delta_bytes), (74, Some(303_104)));
    let s = stack(&d, Kind::Heap, "cache_insert", Some(33));
    assert_eq!(s.change, Change::Grew);
    assert_eq!((s.delta_count, s.delta_bytes), (-26, Some(1152)));
    let s = stack(&d, Kind::Heap, "leak_tmpfile", Some(56));
    assert_eq!(s.change, Change::Grew);
    assert_eq!((s.delta_count, s.delta_bytes), (1, Some(0)));
    let s = stack(&d, Kind::Fd, "hoard", None);
    assert_eq!(s.change, Change::Shrank);
    assert_eq!((s.old_count, s.new_count, s.delta_count), (60, 10, -50));
    assert_eq!((s.old_bytes, s.delta_bytes), (None, None));
    let s = stack(&d, Kind::Tmp, "leak_mkdtemp", None);
    assert_eq!(s.change, Change::New);
    assert_eq!((s.old_count, s.new_count, s.new_bytes), (0, 2, Some(64)));
    // Grew, ranked by the change in bytes, then the rest in order.
    let order: Vec<(Change, Option<&str>)> = d
        .stacks
        .iter()
        .take(5)
        .map(|s| (s.change, s.frames[s.site].symbol.as_deref()))
        .collect();
    assert_eq!(
        order,
        [
            (Change::Grew, Some("cache_insert")),
            (Change::Grew, Some("cache_insert")),
            (Change::Grew, Some("leak_tmpfile")),
            (Change::New, Some("leak_mkdtemp")),
            (Change::Shrank, Some("hoard")),
        ]
    );
    assert_eq!(d.stacks[0].delta_bytes, Some(303_104));
    // By count, the 26 blocks cache_insert:33 lost outrank the 1 leak_tmpfile gained.
    let old = full();
    let by_count = diff(
        &input("old", old),
        &input("new", d_new_for_count()),
        Sort::Count,
    );
    let grew: Vec<i64> = by_count
        .stacks
        .iter()
        .filter(|s| s.change == Change::Grew)
        .map(|s| s.delta_count)
        .collect();
    assert_eq!(grew, [74, -26, 1]);
    let fd = total(&d, Kind::Fd);
    assert_eq!((fd.old_count, fd.new_count, fd.delta_count), (82, 32, -50));
    let tmp = total(&d, Kind::Tmp);
    assert_eq!(
        (
            tmp.old_stacks,
            tmp.new_stacks,
            tmp.delta_count,
            tmp.delta_bytes
        ),
        (3, 4, 2, Some(64))
    );
}

/// The edits of the test above, again (a diff borrows nothing from its inputs).
fn d_new_for_count() -> ReportView {
    let mut new = full();
    let r = row_at(&mut new, Kind::Heap, "cache_insert", 35);
    (r.count, r.bytes) = (300, 925_696 + 74 * 4096);
    let r = row_at(&mut new, Kind::Heap, "leak_tmpfile", 56);
    (r.count, r.bytes) = (3, 944);
    let r = row_at(&mut new, Kind::Heap, "cache_insert", 33);
    (r.count, r.bytes) = (200, 12_000);
    new
}

/// demo.c edited above its functions: every line of demo's frames moved down by 3.
fn lines_moved(mut r: ReportView) -> ReportView {
    for row in r.rows.iter_mut().filter(|r| r.comm == "demo") {
        for f in &mut row.frames {
            if f.file.as_deref() == Some("demo.c") {
                f.line = f.line.map(|l| l + 3);
            }
        }
    }
    r
}

#[test]
fn moved_lines_are_matched_by_functions_in_source_order() {
    let old = full();
    let mut new = lines_moved(old.clone());
    // The value copies (line 35, now 38) grew by one 4 KiB block; the entries did not.
    let r = row_at(&mut new, Kind::Heap, "cache_insert", 38);
    (r.count, r.bytes) = (227, 925_696 + 4096);
    let d = diff(&input("old", old), &input("new", new), Sort::Bytes);
    assert_eq!(
        d.counts,
        Counts {
            grew: 1,
            unchanged: 21,
            ..Counts::default()
        }
    );
    let grew = stack(&d, Kind::Heap, "cache_insert", Some(38));
    assert_eq!(grew.change, Change::Grew);
    assert_eq!(grew.matched, Some(Matched::Functions));
    assert_eq!((grew.delta_count, grew.delta_bytes), (1, Some(4096)));
    let was: Vec<Option<u32>> = grew.old_frames.as_ref().unwrap()[grew.site..grew.site + 3]
        .iter()
        .map(|f| f.line)
        .collect();
    assert_eq!(was, [Some(35), Some(44), Some(57)]);
    let same = stack(&d, Kind::Heap, "cache_insert", Some(36));
    assert_eq!(
        (same.change, same.matched, same.new_bytes),
        (Change::Unchanged, Some(Matched::Functions), Some(10_848))
    );
    let fd = stack(&d, Kind::Fd, "check_config", None);
    assert_eq!(
        (fd.change, fd.matched, fd.frames[fd.site].line),
        (Change::Unchanged, Some(Matched::Functions), Some(21))
    );
    // Stacks that did not move still match on their lines.
    let other = stack(&d, Kind::Heap, "grow_cache", None);
    assert_eq!(other.matched, Some(Matched::Frames));
    assert_eq!(other.old_frames, None);
}

/// The report with each row's frames from its site on: the demo's two cache_insert stacks
/// then have the same functions (one reaches malloc through strdup, the other does not).
fn from_sites(mut r: ReportView) -> ReportView {
    for row in &mut r.rows {
        row.frames.drain(..row.site);
        row.site = 0;
    }
    r
}

#[test]
fn stacks_with_the_same_functions_in_unequal_numbers_are_not_guessed_at() {
    let old = from_sites(full());
    let mut new = lines_moved(old.clone());
    // One of the two cache_insert stacks fixed, and the lines moved: which one is left is a
    // guess, so neither is paired.
    new.rows.retain(|r| {
        !(r.kind == Kind::Heap
            && r.frames[r.site].symbol.as_deref() == Some("cache_insert")
            && r.frames[r.site].line == Some(36))
    });
    let d = diff(&input("old", old), &input("new", new), Sort::Bytes);
    assert_eq!(
        d.counts,
        Counts {
            new: 1,
            gone: 2,
            unchanged: 20,
            ..Counts::default()
        }
    );
    let gone: Vec<Option<u32>> = d
        .stacks
        .iter()
        .filter(|s| s.change == Change::Gone)
        .map(|s| s.frames[s.site].line)
        .collect();
    assert_eq!(gone, [Some(35), Some(33)]);
    let new = stack(&d, Kind::Heap, "cache_insert", Some(38));
    assert_eq!((new.change, new.new_count), (Change::New, 226));
}

#[test]
fn rows_of_one_stack_in_one_report_are_summed() {
    let old = full();
    let mut new = old.clone();
    // The same stack in a second demo process: merged rows, or --by-pid.
    let mut twin = rows_at(&mut new, Kind::Heap, "cache_insert")[0].clone();
    (twin.count, twin.bytes) = (5, 20_480);
    let line = twin.frames[twin.site].line;
    new.rows.push(twin);
    let d = diff(&input("old", old), &input("new", new), Sort::Bytes);
    assert_eq!(
        (d.counts.grew, d.counts.new, d.counts.unchanged),
        (1, 0, 21)
    );
    let s = stack(&d, Kind::Heap, "cache_insert", line);
    assert_eq!(
        (s.old_count, s.new_count, s.delta_bytes),
        (226, 231, Some(20_480))
    );
    assert_eq!(total(&d, Kind::Heap).new_stacks, 15);
}

#[test]
fn frames_without_a_symbol_match_by_module_and_offset_not_address() {
    let old = full();
    // dash's own frames: the shell oom_victim's script ran in, with no symbols.
    let unsymbolized = |r: &Row| r.frames.get(r.site).is_some_and(|f| f.symbol.is_none());
    assert_eq!(old.rows.iter().filter(|r| unsymbolized(r)).count(), 12);
    let mut new = old.clone();
    // Another run: dash mapped elsewhere, at another path; the offsets are the same.
    for row in new.rows.iter_mut().filter(|r| unsymbolized(r)) {
        for f in row.frames.iter_mut().filter(|f| f.symbol.is_none()) {
            assert_eq!(f.module.as_deref(), Some("/usr/bin/dash"));
            f.module = Some("/bin/dash".into());
        }
    }
    let d = diff(
        &input("old", old.clone()),
        &input("new", new.clone()),
        Sort::Bytes,
    );
    assert_eq!(d.counts.unchanged, 22);
    // A rebuilt dash: one offset differs, and a frame without a symbol has nothing else to
    // be known by.
    let row = new
        .rows
        .iter_mut()
        .find(|r| unsymbolized(r) && r.bytes == 8192)
        .unwrap();
    row.frames[3].offset = Some(0x1234);
    let d = diff(&input("old", old), &input("new", new), Sort::Bytes);
    assert_eq!(
        (d.counts.gone, d.counts.new, d.counts.unchanged),
        (1, 1, 21)
    );
}

#[test]
fn growth_rows_compare_as_pages() {
    let text = std::fs::read_to_string(fixture("growth.live.json")).unwrap();
    let old = Input::parse("growth.live.json", &text).unwrap().report;
    let mut new = old.clone();
    let r = row_at(&mut new, Kind::Growth, "leak_pages", 24);
    (r.count, r.bytes) = (2560 + 512, 10_485_760 + (2 << 20));
    let d = diff(&input("old", old), &input("new", new), Sort::Count);
    let t = total(&d, Kind::Growth);
    assert_eq!(
        (t.unit, t.old_count, t.new_count, t.delta_bytes),
        ("pages", 2885, 3397, Some(2 << 20))
    );
    assert_eq!(d.totals.len(), 1, "{:?}", d.totals);
    let s = &d.stacks[0];
    assert_eq!(
        (s.change, s.kind, s.delta_count, s.unit),
        (Change::Grew, Kind::Growth, 512, "pages")
    );
}

#[test]
fn reports_that_do_not_compare_say_so() {
    let old = full();
    let mut new = old.clone();
    new.summary.mode = "growth".into();
    new.summary.lost_events = 7;
    let d = diff(&input("a.json", old), &input("b.json", new), Sort::Bytes);
    assert_eq!(
        d.notes,
        [
            "a.json traced the heap in full mode and b.json in growth mode: heap and growth rows \
             do not compare",
            "b.json lost 7 events: its counts are lower bounds",
        ]
    );
}

#[test]
fn keep_top_keeps_the_largest_changes_of_each_kind_of_change_and_counts_them_all() {
    let old = full();
    let mut new = old.clone();
    new.rows.retain(|r| r.kind != Kind::Fd);
    let mut d = diff(&input("a", old), &input("b", new), Sort::Bytes);
    d.keep_top(2);
    let kept: Vec<(Change, u64)> = d.stacks.iter().map(|s| (s.change, s.old_count)).collect();
    assert_eq!(
        kept,
        [
            (Change::Gone, 60),
            (Change::Gone, 19),
            (Change::Unchanged, 48),
            (Change::Unchanged, 226),
        ]
    );
    assert_eq!((d.counts.gone, d.counts.unchanged), (4, 18));
}

/// Every report a session can write, read back from its JSON, is the view taken of it in
/// memory: the view reads what the model writes, under the names it writes.
#[test]
fn the_json_of_a_report_reads_back_as_its_view() {
    let mut reports = vec![export::golden::sample()];
    // The agent's growth list and a growth-mode report's rows.
    let mut agent = export::golden::sample();
    agent.growth = agent.leaks.clone();
    for l in &mut agent.growth {
        l.kind = "growth";
    }
    reports.push(agent);
    for recording in ["full.jsonl.gz", "growth.jsonl.gz"] {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(fixture(recording)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        reports.extend(crate::driver::record::replay(&text).unwrap());
    }
    assert!(reports.len() > 4);
    for r in &reports {
        let json = export::render(r, Format::Json, FoldedWeight::Bytes, FoldedKind::Heap);
        let read = Input::parse("r.json", &json).unwrap();
        let view = ReportView::from(r);
        assert_eq!(read.report, view);
        let rows = r.leaks.len() + r.growth.len() + r.fd_leaks.len() + r.tmp_leaks.len();
        assert_eq!(view.rows.len(), rows);
    }
    // Nothing is lost that the diff reads: a frame without a symbol keeps its offset.
    let sample = ReportView::from(&reports[0]);
    let unknown = &sample.rows[1].frames[sample.rows[1].site];
    assert_eq!(
        (unknown.symbol.as_deref(), unknown.offset),
        (None, Some(0x4321))
    );
    assert!(reports[1].growth.iter().all(|l| l.kind == "growth"));
    let agent = ReportView::from(&reports[1]);
    assert_eq!(
        agent.rows.iter().filter(|r| r.kind == Kind::Growth).count(),
        2
    );
}

#[test]
fn the_last_of_several_reports_is_read() {
    let report = |elapsed: f64| {
        format!("{{\"summary\":{{\"elapsed_s\":{elapsed}}},\"leaks\":[],\"final\":false}}\n")
    };
    let text = format!("{}{}\n{}", report(10.0), report(20.0), report(30.0));
    let read = Input::parse("r.json", &text).unwrap();
    assert_eq!(read.reports, 3);
    assert_eq!(read.report.summary.elapsed_s, 30.0);
    // A pretty-printed report is one report.
    let pretty = serde_json::to_string_pretty(
        &serde_json::from_str::<serde_json::Value>(&report(5.0)).unwrap(),
    )
    .unwrap();
    let read = Input::parse("r.json", &pretty).unwrap();
    assert_eq!((read.reports, read.report.summary.elapsed_s), (1, 5.0));
}

#[test]
fn what_is_not_a_report_is_named_in_one_line() {
    let err = |text: &str| Input::parse("x.json", text).unwrap_err().to_string();
    for empty in ["", " \n\n"] {
        assert_eq!(
            err(empty),
            "x.json: empty: no report in it (write one with `--format json -o FILE`)"
        );
    }
    assert_eq!(
        err("leaktrace final report after 5.7s\n"),
        "x.json: not JSON: expected value at line 1 column 1"
    );
    assert_eq!(
        err("{\"summary\": {\"elapsed_s\": 1.0}, \"leaks\": ["),
        "x.json: not JSON: EOF while parsing a list at line 1 column 42"
    );
    assert_eq!(
        err("{\"pid\": 1, \"comm\": \"x\"}"),
        "x.json: not a leaktrace JSON report: missing field `summary` at line 1 column 23"
    );
    assert_eq!(
        err("[1, 2]"),
        "x.json: not a leaktrace JSON report: invalid type: sequence, expected a leaktrace \
         JSON report (an object with `summary` and `leaks`) at line 1 column 0"
    );
    let bad_offset = "{\"summary\":{\"elapsed_s\":1},\"leaks\":[{\"kind\":\"heap\",\"comm\":\"x\",\
        \"outstanding_count\":1,\"outstanding_bytes\":1,\"frames\":[{\"symbol\":null,\
        \"module\":\"m\",\"file\":null,\"line\":null,\"offset\":\"0xzz\"}]}]}";
    assert!(
        err(bad_offset).starts_with(
            "x.json: not a leaktrace JSON report: `0xzz` is not an offset like 0x1a2b"
        ),
        "{}",
        err(bad_offset)
    );
    // The second of two lines is broken: its line is named.
    let text = "{\"summary\":{\"elapsed_s\":1},\"leaks\":[]}\n{\"summary\":1}\n";
    assert_eq!(
        err(text),
        "x.json: not a leaktrace JSON report: invalid type: integer `1`, expected the \
         report's summary (an object) at line 2 column 12"
    );
    let missing = Input::read(Path::new("/nonexistent/old.json"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        missing,
        "/nonexistent/old.json: cannot read: No such file or directory (os error 2)"
    );
}

/// A fix and its side effects, for the writers' tests: grow_cache's leak fixed (gone), demo.c
/// edited (its lines moved) with its value cache 74 entries larger (grew), hoard() holding 50
/// fewer descriptors (shrank), and a temp file stack that was not there (new).
pub(crate) fn before_and_after() -> (Input, Input) {
    let old = full();
    let mut new = lines_moved(rerun(old.clone()));
    new.rows
        .retain(|r| r.frames[r.site].symbol.as_deref() != Some("grow_cache"));
    let r = row_at(&mut new, Kind::Heap, "cache_insert", 38);
    (r.count, r.bytes) = (300, 925_696 + 74 * 4096);
    rows_at(&mut new, Kind::Fd, "hoard")[0].count = 10;
    let mut added = rows_at(&mut new, Kind::Tmp, "leak_mkstemp")[0].clone();
    added.frames[added.site].symbol = Some("leak_mkdtemp".into());
    (added.count, added.bytes) = (2, 64);
    new.rows.push(added);
    (input("before.json", old), input("after.json", new))
}
