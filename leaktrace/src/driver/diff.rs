//! `leaktrace diff`: reads two JSON reports, compares them ([`crate::report::diff`]) and
//! writes the comparison ([`crate::export::diff`]). No tracing, no privileges.
use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use crate::{
    export::{self, diff::DiffFormat},
    report::diff::{self, Input, Kind, ReadError, Sort},
};

/// What `leaktrace diff` is asked for.
#[derive(Clone, Debug)]
pub struct DiffConfig {
    /// The report before (its file's last report).
    pub old: PathBuf,
    /// The report after.
    pub new: PathBuf,
    /// What stacks are ranked (and folded lines weighted) by.
    pub sort: Sort,
    /// How the comparison is written.
    pub format: DiffFormat,
    /// Show at most this many stacks of each change (`None`: all).
    pub top: Option<usize>,
    /// Which stacks folded lines show.
    pub folded_kind: Kind,
    /// Write to this file instead of stdout.
    pub output: Option<PathBuf>,
}

/// Why `leaktrace diff` failed.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// An input is not a report (exit code 2, as for a bad command line).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The comparison could not be written.
    #[error("cannot write the diff: {0}")]
    Write(#[source] io::Error),
}

impl DiffError {
    /// The process exit code: 2 for an input that is not a report, 1 for a failed write.
    pub fn exit_code(&self) -> i32 {
        match self {
            DiffError::Read(_) => 2,
            DiffError::Write(_) => 1,
        }
    }
}

/// Reads both reports, compares them and writes the comparison.
pub fn run(config: &DiffConfig) -> Result<(), DiffError> {
    let old = Input::read(&config.old)?;
    let new = Input::read(&config.new)?;
    let mut d = diff::diff(&old, &new, config.sort);
    if let (Some(n), false) = (config.top, config.format == DiffFormat::Folded) {
        d.keep_top(n);
    }
    let text = export::diff::render(&d, config.format, config.folded_kind);
    match &config.output {
        Some(path) => export::to_path(path, text).map_err(DiffError::Write),
        None => {
            let mut out = io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                // A closed pipe (`| head`) is not an error worth failing for.
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(DiffError::Write(e)),
                _ => Ok(()),
            }
        }
    }
}
