//! A finished report: the tables at one moment, stacks symbolized and trimmed, rows merged
//! and ranked. Writers ([`crate::export`]) render it; they know nothing of how it was gathered.
//!
//! [`model`] holds the serializable types, [`build()`] makes a report from the trackers'
//! snapshots, `merge` merges, ranks and follows the trend of rows of every kind,
//! [`annotate`] names the pods and containers of a finished report's rows, [`verdict`]
//! judges each row's trend, and [`diff`] compares two reports stack by stack.
pub mod annotate;
mod build;
pub mod diff;
mod merge;
pub mod model;
pub mod verdict;

pub use build::{ReportInput, ReportOptions, TmpRow, build, growth_leaks, stack_frames};
pub use merge::{TREND_SAMPLES, Trend};
pub use model::{
    FdExhaustion, FdHolder, FdLeak, Frame, GrowthSample, HeapHolder, Leak, OomKill, Owner,
    ProbeSummary, Report, Summary, Tier2, TmpLeak, TracerUsage, WalkSummary,
};
