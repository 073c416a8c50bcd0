//! Where reports go: stdout or the `--output` file, in the chosen format.
use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use super::{SessionError, status::Status};
use crate::{
    export::{self, FoldedKind, FoldedWeight, Format},
    report::Report,
};

/// Where reports go.
pub(super) struct Sink {
    pub(super) format: Format,
    pub(super) weight: FoldedWeight,
    pub(super) folded_kind: FoldedKind,
    pub(super) output: Option<PathBuf>,
    /// What the session says on stderr, wiped before a report is written.
    pub(super) status: Status,
}

impl Sink {
    /// Where and how a session's reports go.
    pub(super) fn of(config: &super::SessionConfig) -> Self {
        Self {
            format: config.format,
            weight: config.weight,
            folded_kind: config.folded_kind,
            output: config.output.clone(),
            status: Status::new(config.quiet),
        }
    }

    pub(super) fn emit(&self, report: &Report) -> Result<(), SessionError> {
        self.status.clear();
        let text = export::render_bytes(report, self.format, self.weight, self.folded_kind);
        match &self.output {
            Some(path) => {
                export::to_path(path, &text).map_err(|e| SessionError::Io("cannot write report", e))
            }
            None => {
                let mut out = io::stdout().lock();
                let r = out.write_all(&text).and_then(|()| out.flush());
                // A closed pipe (`| head`) is not an error worth failing for.
                match r {
                    Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                        Err(SessionError::Io("cannot write report", e))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}
