//! Folded stacks, the input of flamegraph.pl and inferno: one line per stack, frames from the
//! root to the leaf joined by `;`, a space, then the weight. Lines are merged when their text
//! is equal and sorted, so the output is deterministic. Frame names carry no offsets, which
//! would split aggregation; a frame without a symbol shows its module as `[libfoo.so]`.
use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    report::{Frame, Report},
    write::FoldedWeight,
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

pub fn render(report: &Report, weight: FoldedWeight) -> String {
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for leak in &report.leaks {
        let stack = if leak.frames.is_empty() {
            "[lost stack]".to_owned()
        } else {
            leak.frames
                .iter()
                .rev()
                .map(name)
                .collect::<Vec<_>>()
                .join(";")
        };
        let w = match weight {
            FoldedWeight::Bytes => leak.outstanding_bytes,
            FoldedWeight::Count => leak.outstanding_count,
        };
        *lines.entry(stack).or_default() += w;
    }
    let mut out = String::new();
    for (stack, w) in lines {
        let _ = writeln!(out, "{stack} {w}");
    }
    out
}
