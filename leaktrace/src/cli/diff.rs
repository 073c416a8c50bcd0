//! `leaktrace diff OLD.json NEW.json`: which stacks grew, shrank, appeared or vanished.
use std::path::PathBuf;

use clap::Args;
use leaktrace::{
    driver::diff::DiffConfig,
    export::diff::DiffFormat,
    report::diff::{Kind, Sort},
};

const DIFF_HELP: &str = "\
Stacks are matched by what symbolization said of them, never by address or pid: each
frame's function, file and line (a frame without a symbol, by its module and offset), the
kind of row and the command name. Stacks left over whose functions alone agree are paired
too (an edit moves the lines below it). Rows of one stack in one report are summed.

A file holding several reports, one a line (a session writing to stdout with --interval),
is read to its last report. The C/C++ runtime's own blocks (`runtime`) are not compared.

Exit codes:
  0    the comparison was written
  1    it could not be written
  2    invalid command line, or an input that is not a leaktrace JSON report

Examples:
  sudo leaktrace run --format json -o before.json -- ./service --selftest
  sudo leaktrace run --format json -o after.json -- ./service --selftest
  leaktrace diff before.json after.json
  leaktrace diff before.json after.json --format folded | inferno-flamegraph > diff.svg";

/// Compare two JSON reports (written by --format json): which stacks grew, shrank, appeared
/// (new) or vanished (gone), with the totals of each kind (heap, growth, fd, tmp). Did the
/// fix work?
#[derive(Debug, Args)]
#[command(after_help = DIFF_HELP)]
pub struct DiffArgs {
    /// The report before (the last report in the file).
    #[arg(value_name = "OLD.json")]
    pub old: PathBuf,

    /// The report after (the last report in the file).
    #[arg(value_name = "NEW.json")]
    pub new: PathBuf,

    /// Rank stacks by the change in bytes or in count (blocks, pages, descriptors, files);
    /// folded lines are weighted by it too. Descriptors have no bytes: always by count.
    #[arg(long, value_enum, default_value_t = Sort::Bytes)]
    pub sort: Sort,

    /// Output format.
    #[arg(long, value_enum, default_value_t = DiffFormat::Table)]
    pub format: DiffFormat,

    /// Show at most N stacks of each change [default: 10 for table, all for json and
    /// folded].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub top: Option<u64>,

    /// Which stacks folded lines show.
    #[arg(long, value_enum, default_value_t = Kind::Heap)]
    pub folded_kind: Kind,

    /// Write to FILE instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

impl DiffArgs {
    /// What `leaktrace diff` is asked for.
    pub fn config(self) -> DiffConfig {
        let top = match (self.top, self.format) {
            (Some(n), _) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            (None, DiffFormat::Table) => Some(10),
            (None, _) => None,
        };
        DiffConfig {
            old: self.old,
            new: self.new,
            sort: self.sort,
            format: self.format,
            top,
            folded_kind: self.folded_kind,
            output: self.output,
        }
    }
}
