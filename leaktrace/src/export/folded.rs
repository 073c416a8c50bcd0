//! Folded stacks, the input of flamegraph.pl and inferno: one line per stack, frames from the
//! root to the leaf joined by `;`, a space, then the weight. Lines are merged when their text
//! is equal and sorted, so the output is deterministic. Frame names carry no offsets, which
//! would split aggregation; a frame without a symbol shows its module as `[libfoo.so]`.
use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    export::{Exporter, FoldedKind, FoldedWeight},
    report::{Frame, Leak, Report},
};

fn name(f: &Frame) -> String {
    let text = match (&f.symbol, &f.module) {
        (Some(s), _) => s.clone(),
        (None, Some(m)) => format!("[{}]", m.rsplit('/').next().unwrap_or(m)),
        (None, None) => "[unknown]".to_owned(),
    };
    // `;` separates frames and a space ends the stack in this format.
    text.replace(';', ":").replace(' ', "\u{a0}")
}

fn stack(frames: &[Frame]) -> String {
    if frames.is_empty() {
        return "[lost stack]".to_owned();
    }
    frames.iter().rev().map(name).collect::<Vec<_>>().join(";")
}

/// Folded lines of the stacks of `kind`: heap leaks weighted by bytes or blocks, descriptor
/// leaks by descriptors, temp files by bytes on disk or files.
#[derive(Clone, Copy, Debug, Default)]
pub struct Folded {
    /// What heap and temp file lines are weighted by.
    pub weight: FoldedWeight,
    /// Which stacks are shown.
    pub kind: FoldedKind,
}

impl Exporter for Folded {
    fn export(&self, report: &Report) -> Vec<u8> {
        render(report, self.weight, self.kind).into_bytes()
    }
}

fn render(report: &Report, weight: FoldedWeight, kind: FoldedKind) -> String {
    fold(rows(report, weight, kind))
}

/// The stacks folded output shows for `kind` (innermost frame first), each with its weight:
/// heap leaks by bytes or blocks, descriptor leaks by descriptors, temp files by bytes on disk
/// or files. Flame graphs are drawn from the same rows.
pub(crate) fn rows(
    report: &Report,
    weight: FoldedWeight,
    kind: FoldedKind,
) -> Vec<(&[Frame], u64)> {
    match kind {
        FoldedKind::Heap => leak_rows(&report.leaks, weight).collect(),
        FoldedKind::Fd => report
            .fd_leaks
            .iter()
            .map(|l| (l.frames.as_slice(), l.outstanding))
            .collect(),
        FoldedKind::Tmp => report
            .tmp_leaks
            .iter()
            .map(|l| {
                let w = match weight {
                    FoldedWeight::Bytes => l.bytes,
                    FoldedWeight::Count => l.files,
                };
                (l.frames.as_slice(), w)
            })
            .collect(),
    }
}

/// Heap (or growth) rows, weighted by outstanding bytes or blocks (pages).
pub(crate) fn leak_rows<'a>(
    leaks: impl IntoIterator<Item = &'a Leak>,
    weight: FoldedWeight,
) -> impl Iterator<Item = (&'a [Frame], u64)> {
    leaks.into_iter().map(move |l| {
        let w = match weight {
            FoldedWeight::Bytes => l.outstanding_bytes,
            FoldedWeight::Count => l.outstanding_count,
        };
        (l.frames.as_slice(), w)
    })
}

/// Folded lines of `rows`: merged when their text is equal, sorted.
pub(crate) fn fold<'a>(rows: impl IntoIterator<Item = (&'a [Frame], u64)>) -> String {
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for (frames, w) in rows {
        *lines.entry(stack(frames)).or_default() += w;
    }
    let mut out = String::new();
    for (stack, w) in lines {
        let _ = writeln!(out, "{stack} {w}");
    }
    out
}
