//! Folded stacks, the input of flamegraph.pl and inferno: one line per stack, frames from the
//! root to the leaf joined by `;`, a space, then the weight. Lines are merged when their text
//! is equal and sorted, so the output is deterministic. Frame names carry no offsets, which
//! would split aggregation; a frame without a symbol shows its module as `[libfoo.so]`.
use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    export::{Exporter, FoldedKind, FoldedWeight},
    report::{Frame, Report},
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
    let rows: Vec<(String, u64)> = match kind {
        FoldedKind::Heap => report
            .leaks
            .iter()
            .map(|l| {
                let w = match weight {
                    FoldedWeight::Bytes => l.outstanding_bytes,
                    FoldedWeight::Count => l.outstanding_count,
                };
                (stack(&l.frames), w)
            })
            .collect(),
        FoldedKind::Fd => report
            .fd_leaks
            .iter()
            .map(|l| (stack(&l.frames), l.outstanding))
            .collect(),
        FoldedKind::Tmp => report
            .tmp_leaks
            .iter()
            .map(|l| {
                let w = match weight {
                    FoldedWeight::Bytes => l.bytes,
                    FoldedWeight::Count => l.files,
                };
                (stack(&l.frames), w)
            })
            .collect(),
    };
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for (stack, w) in rows {
        *lines.entry(stack).or_default() += w;
    }
    let mut out = String::new();
    for (stack, w) in lines {
        let _ = writeln!(out, "{stack} {w}");
    }
    out
}
