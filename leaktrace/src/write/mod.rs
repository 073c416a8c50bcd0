//! Writers: one module per output format. Each takes a finished [`Report`] and returns text.
use crate::report::Report;

pub mod folded;
pub mod json;
pub mod table;

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A ranked, human-readable report.
    Table,
    /// One JSON document per report (one line each).
    Json,
    /// Folded stacks for flamegraph.pl or inferno: `root;…;leaf weight`.
    Folded,
}

/// What folded lines are weighted by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FoldedWeight {
    /// Outstanding bytes.
    #[default]
    Bytes,
    /// Outstanding blocks.
    Count,
}

/// Renders a report in `format`.
pub fn render(report: &Report, format: Format, weight: FoldedWeight) -> String {
    match format {
        Format::Table => table::render(report),
        Format::Json => json::render(report),
        Format::Folded => folded::render(report, weight),
    }
}
