//! Writers of a [`Diff`] (`leaktrace diff`): a table for people, JSON for scripts, and folded
//! lines with both weights (`stack old new`) for a differential flame graph: inferno's
//! `inferno-flamegraph` and flamegraph.pl read them as they read `difffolded.pl`'s output,
//! draw the new report's widths and colour what grew red and what shrank blue (a gone stack
//! has no width there: the table and the JSON name those).
use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    export::table::{bytes, count},
    report::diff::{Change, Diff, FrameView, Kind, Side, Sort, StackDiff},
};

/// `leaktrace diff --format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffFormat {
    /// Totals per kind, then the stacks that grew, are new, shrank, are gone, and are
    /// unchanged, the largest changes first.
    #[default]
    Table,
    /// One JSON document (one line): totals, counts, and every stack with its change.
    Json,
    /// `stack old new` lines for a differential flame graph, of one kind (--folded-kind),
    /// weighted by --sort.
    Folded,
}

/// `1 block`, `12 blocks`.
fn units(n: u64, kind: Kind) -> String {
    let unit = kind.unit();
    if n == 1 {
        format!("{} {}", count(n), &unit[..unit.len() - 1])
    } else {
        format!("{} {unit}", count(n))
    }
}

/// `1.0 KiB in 10 blocks`, or `3 descriptors`.
fn amount(kind: Kind, n: u64, b: Option<u64>) -> String {
    match b {
        Some(b) if kind.has_bytes() => format!("{} in {}", bytes(b), units(n, kind)),
        _ => units(n, kind),
    }
}

/// `+1.0 KiB`, `-512 B`.
fn signed_bytes(d: i64) -> String {
    let sign = if d < 0 { "-" } else { "+" };
    format!("{sign}{}", bytes(d.unsigned_abs()))
}

/// `+3 blocks`, `-1 descriptor`.
fn signed_units(d: i64, kind: Kind) -> String {
    let sign = if d < 0 { "-" } else { "+" };
    format!("{sign}{}", units(d.unsigned_abs(), kind))
}

/// `+1.0 KiB, +10 blocks`, `-3 descriptors`, or `no change`.
fn change(kind: Kind, d_count: i64, d_bytes: Option<i64>) -> String {
    match d_bytes {
        _ if d_count == 0 && d_bytes.unwrap_or(0) == 0 => "no change".to_owned(),
        Some(b) => format!("{}, {}", signed_bytes(b), signed_units(d_count, kind)),
        None => signed_units(d_count, kind),
    }
}

fn side(s: &Side) -> String {
    let what = if s.is_final {
        format!("final report after {:.1}s", s.elapsed_s)
    } else {
        format!("report at {:.1}s", s.elapsed_s)
    };
    let mut text = format!("{}: {what}, {} mode", s.path, s.mode);
    if s.reports > 1 {
        let _ = write!(text, " (the last of {} reports in the file)", s.reports);
    }
    text
}

/// `leak_optional at diff_fix.c:12 in diff_fix`, or `?? in libfoo.so+0x1a2b`.
fn frame(f: &FrameView) -> String {
    let mut text = f.symbol.clone().unwrap_or_else(|| "??".to_owned());
    if f.inlined {
        text.push_str(" (inlined)");
    }
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let _ = write!(text, " at {file}:{line}");
    }
    match (f.module_name(), f.offset) {
        (Some(m), Some(o)) if f.symbol.is_none() => {
            let _ = write!(text, " in {m}+{o:#x}");
        }
        (Some(m), _) => {
            let _ = write!(text, " in {m}");
        }
        _ => {}
    }
    text
}

fn heading(change: Change, diff: &Diff) -> String {
    let (old, new) = (&diff.old.path, &diff.new.path);
    let what = match change {
        Change::Grew => format!("Grew: held more in {new} than in {old}"),
        Change::New => format!("New: held in {new}, not in {old}"),
        Change::Shrank => format!("Shrank: held less in {new} than in {old}"),
        Change::Gone => format!("Gone: held in {old}, not in {new}"),
        Change::Unchanged => return "Unchanged: held the same in both".to_owned(),
    };
    let by = match diff.sort {
        Sort::Bytes => "bytes",
        Sort::Count => "count",
    };
    format!("{what} (largest change first, by {by})")
}

fn stack(out: &mut String, rank: usize, s: &StackDiff) {
    let (old, new) = (
        amount(s.kind, s.old_count, s.old_bytes),
        amount(s.kind, s.new_count, s.new_bytes),
    );
    let was = match s.change {
        Change::New => format!("now {new}"),
        Change::Gone => format!("was {old}"),
        _ => format!("{old} → {new}"),
    };
    let _ = writeln!(
        out,
        "#{rank} {} {} ({was}) — {}",
        s.kind.name(),
        change(s.kind, s.delta_count, s.delta_bytes),
        s.comm,
    );
    let old_frames = s.old_frames.as_deref();
    if old_frames.is_some() {
        out.push_str("    matched by its functions: lines moved\n");
    }
    for (i, f) in s.frames.iter().enumerate() {
        let _ = write!(out, "    {i:>2} {}", frame(f));
        if let Some(line) = old_frames
            .and_then(|o| o.get(i))
            .and_then(|o| o.line)
            .filter(|&l| Some(l) != f.line)
        {
            let _ = write!(out, " (was line {line})");
        }
        out.push('\n');
    }
}

/// One line for an unchanged stack: what it holds, its site and the site's caller.
fn unchanged(out: &mut String, s: &StackDiff) {
    let mut site = s
        .frames
        .get(s.site)
        .map(frame)
        .unwrap_or_else(|| "[lost stack]".into());
    if let Some(caller) = s.frames.get(s.site + 1) {
        match &caller.symbol {
            Some(name) => {
                let _ = write!(site, " ← {name}");
            }
            None => {
                let _ = write!(site, " ← {}", frame(caller));
            }
        }
    }
    let _ = writeln!(
        out,
        "   {} {} — {} — {site}",
        s.kind.name(),
        amount(s.kind, s.new_count, s.new_bytes),
        s.comm,
    );
}

/// The diff as people read it.
pub fn table(diff: &Diff) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "leaktrace diff: {} → {}", diff.old.path, diff.new.path);
    let _ = writeln!(out, "  old {}", side(&diff.old));
    let _ = writeln!(out, "  new {}", side(&diff.new));
    for note in &diff.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    out.push('\n');
    if diff.totals.is_empty() {
        out.push_str("Neither report holds a stack.\n");
        return out;
    }
    let rows: Vec<[String; 5]> = diff
        .totals
        .iter()
        .map(|t| {
            [
                t.kind.name().to_owned(),
                format!("{} → {}", t.old_stacks, t.new_stacks),
                amount(t.kind, t.old_count, t.old_bytes),
                amount(t.kind, t.new_count, t.new_bytes),
                change(t.kind, t.delta_count, t.delta_bytes),
            ]
        })
        .collect();
    let header = ["kind", "stacks", "old", "new", "change"].map(str::to_owned);
    let mut widths = [0; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = w - cell.chars().count();
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let c = &diff.counts;
    let _ = writeln!(
        out,
        "\nstacks: {} grew, {} new, {} shrank, {} gone, {} unchanged",
        c.grew, c.new, c.shrank, c.gone, c.unchanged
    );
    for change in Change::ALL {
        let total = c.of(change);
        if total == 0 {
            continue;
        }
        let _ = writeln!(out, "\n{}", heading(change, diff));
        let shown: Vec<&StackDiff> = diff.stacks.iter().filter(|s| s.change == change).collect();
        for (i, s) in shown.iter().enumerate() {
            if change == Change::Unchanged {
                unchanged(&mut out, s);
            } else {
                if i > 0 {
                    out.push('\n');
                }
                stack(&mut out, i + 1, s);
            }
        }
        let left = total.saturating_sub(shown.len() as u64);
        if left > 0 {
            let _ = writeln!(out, "   … and {left} more (--top)");
        }
    }
    out
}

/// The diff as one line of JSON.
pub fn json(diff: &Diff) -> String {
    // Serializing plain data with string keys cannot fail.
    let mut out = serde_json::to_string(diff).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    out.push('\n');
    out
}

/// A folded frame name: the function, or `[module]` (see [`crate::export::folded`]).
fn folded_name(f: &FrameView) -> String {
    let text = match (&f.symbol, f.module_name()) {
        (Some(s), _) => s.clone(),
        (None, Some(m)) => format!("[{m}]"),
        (None, None) => "[unknown]".to_owned(),
    };
    text.replace(';', ":").replace(' ', "\u{a0}")
}

/// `root;…;leaf old new` lines of the stacks of `kind`, weighted by `sort` (descriptors by
/// their count), merged when their text is equal and sorted: what inferno's and
/// flamegraph.pl's differential flame graphs read.
pub fn folded(diff: &Diff, kind: Kind) -> String {
    let mut lines: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in diff.stacks.iter().filter(|s| s.kind == kind) {
        let (old, new) = match (diff.sort, s.old_bytes, s.new_bytes) {
            (Sort::Bytes, Some(o), Some(n)) => (o, n),
            _ => (s.old_count, s.new_count),
        };
        let text = if s.frames.is_empty() {
            "[lost stack]".to_owned()
        } else {
            s.frames
                .iter()
                .rev()
                .map(folded_name)
                .collect::<Vec<_>>()
                .join(";")
        };
        let line = lines.entry(text).or_default();
        line.0 = line.0.saturating_add(old);
        line.1 = line.1.saturating_add(new);
    }
    let mut out = String::new();
    for (stack, (old, new)) in lines {
        let _ = writeln!(out, "{stack} {old} {new}");
    }
    out
}

/// The diff in `format`; folded lines show the stacks of `folded_kind`.
pub fn render(diff: &Diff, format: DiffFormat, folded_kind: Kind) -> String {
    match format {
        DiffFormat::Table => table(diff),
        DiffFormat::Json => json(diff),
        DiffFormat::Folded => folded(diff, folded_kind),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::report::diff::{diff, tests::before_and_after};

    fn check(name: &str, got: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/export/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            got, want,
            "{name} differs from its golden file (UPDATE_GOLDEN=1 to accept)"
        );
    }

    fn sample(sort: Sort) -> Diff {
        let (old, new) = before_and_after();
        diff(&old, &new, sort)
    }

    #[test]
    fn table() {
        let mut d = sample(Sort::Bytes);
        d.keep_top(10);
        let text = super::table(&d);
        check("diff.txt", &text);
        // The fixed stack, by name, with its exact bytes and blocks.
        assert!(
            text.contains("#1 heap -48.0 MiB, -48 blocks (was 48.0 MiB in 48 blocks) — oom_victim\n     0 grow_cache at oom_victim.c:11 in oom_victim\n"),
            "{text}"
        );
        assert!(text.contains("stacks: 1 grew, 1 new, 1 shrank, 1 gone, 19 unchanged\n"));
        assert!(text.contains("… and 9 more (--top)"), "{text}");
        assert!(text.contains("cache_insert at demo.c:38 in demo (was line 35)"));
    }

    #[test]
    fn json() {
        let d = sample(Sort::Bytes);
        let text = super::json(&d);
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["sort"], "bytes");
        assert_eq!(v["old"]["path"], "before.json");
        assert_eq!(v["new"]["final"], true);
        assert_eq!(v["counts"]["gone"], 1);
        assert_eq!(v["counts"]["unchanged"], 19);
        let stacks = v["stacks"].as_array().unwrap();
        assert_eq!(stacks.len(), 23);
        let gone: Vec<&serde_json::Value> =
            stacks.iter().filter(|s| s["change"] == "gone").collect();
        assert_eq!(gone.len(), 1);
        let g = gone[0];
        assert_eq!(g["kind"], "heap");
        let site = g["site"].as_u64().unwrap() as usize;
        assert_eq!(g["frames"][site]["symbol"], "grow_cache");
        assert_eq!(g["frames"][site]["line"], 11);
        assert_eq!(g["frames"][site]["offset"], "0x116a");
        assert_eq!(
            (g["old_bytes"].as_u64(), g["new_bytes"].as_u64()),
            (Some(50_331_648), Some(0))
        );
        assert_eq!(
            (g["delta_bytes"].as_i64(), g["delta_count"].as_i64()),
            (Some(-50_331_648), Some(-48))
        );
        assert!(g["matched"].is_null());
        let fd = stacks
            .iter()
            .find(|s| s["kind"] == "fd" && s["change"] == "shrank");
        let fd = fd.unwrap();
        assert_eq!(fd["unit"], "descriptors");
        assert!(fd["old_bytes"].is_null() && fd["delta_bytes"].is_null());
        assert_eq!(fd["delta_count"], -50);
        let moved = stacks.iter().find(|s| s["change"] == "grew").unwrap();
        assert_eq!(moved["matched"], "functions");
        let site = moved["site"].as_u64().unwrap() as usize;
        assert_eq!(moved["old_frames"][site]["line"], 35);
        let heap = &v["totals"][0];
        assert_eq!(heap["kind"], "heap");
        assert_eq!(
            (heap["old_bytes"].as_u64(), heap["new_bytes"].as_u64()),
            (Some(51_279_868), Some(51_279_868 - 50_331_648 + 74 * 4096))
        );
    }

    #[test]
    fn folded_heap_and_descriptors() {
        let d = sample(Sort::Bytes);
        let heap = folded(&d, Kind::Heap);
        let lines: Vec<&str> = heap.lines().collect();
        let start = "_start;__libc_start_main_impl;__libc_start_call_main;main";
        assert!(
            lines.contains(&format!("{start};grow_cache 50331648 0").as_str()),
            "{heap}"
        );
        // Folded by names, not lines; the value copies reach malloc through strdup, whose
        // frame the stack keeps, so the two cache_insert stacks fold to two lines.
        for line in [
            format!("{start};handle_request;cache_insert 10848 10848"),
            format!(
                "{start};handle_request;cache_insert;__GI___strdup {} {}",
                925_696,
                925_696 + 74 * 4096
            ),
        ] {
            assert!(lines.contains(&line.as_str()), "{heap}");
        }
        assert!(lines.iter().all(|l| l.split(' ').count() == 3), "{heap}");
        let mut sorted = lines.clone();
        sorted.sort_unstable();
        assert_eq!(lines, sorted);
        let fd = folded(&d, Kind::Fd);
        assert!(
            fd.lines()
                .any(|l| l.ends_with(";main;hoard;__libc_open64 60 10")),
            "{fd}"
        );
        // By count, heap lines weigh blocks.
        let by_count = folded(&sample(Sort::Count), Kind::Heap);
        assert!(
            by_count.contains(&format!("{start};grow_cache 48 0\n")),
            "{by_count}"
        );
    }
}
