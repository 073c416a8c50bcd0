//! What a session says on stderr while it runs: one line when tracing starts (what is
//! traced, how, how often it reports, how to stop), and on a terminal a status line kept up
//! to date between reports. Never in a report: stderr only, and not at all with `--quiet`.
use std::{
    cell::Cell,
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use leaktrace_common::features;

use super::{SessionConfig, Target, tracer::Tracer};
use crate::export::table::{bytes, count};

/// The session's voice on stderr.
#[derive(Debug)]
pub(super) struct Status {
    quiet: bool,
    /// A live status line is kept (stderr is a terminal).
    live: bool,
    /// The status line is on the screen now, to be wiped before anything else is written.
    shown: Cell<bool>,
    last: Cell<Option<(Instant, u64)>>,
}

impl Status {
    /// Speaks unless `--quiet`; keeps a status line when stderr is a terminal.
    pub(super) fn new(quiet: bool) -> Self {
        Self {
            quiet,
            live: !quiet && std::io::stderr().is_terminal(),
            shown: Cell::new(false),
            last: Cell::new(None),
        }
    }

    /// The line said when tracing starts.
    pub(super) fn started(&self, config: &SessionConfig, tracer: &Tracer) {
        if self.quiet {
            return;
        }
        eprintln!("leaktrace: {}", start_line(config, tracer));
    }

    /// Once a second: redraws the status line (a terminal only).
    pub(super) fn tick(&self, tracer: &Tracer) {
        if !self.live {
            return;
        }
        let now = Instant::now();
        let records = tracer.records;
        let rate = match self.last.replace(Some((now, records))) {
            Some((then, before)) => {
                let s = now.duration_since(then).as_secs_f64().max(1e-3);
                (records.saturating_sub(before) as f64 / s) as u64
            }
            None => 0,
        };
        let (blocks, held) = tracer.pipeline.outstanding();
        let lost: u64 = tracer.source.drops().iter().map(|(_, n)| n).sum();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2Kleaktrace: {} events/s, {} held in {} blocks, {} lost",
            count(rate),
            bytes(held),
            count(blocks),
            count(lost)
        );
        let _ = err.flush();
        self.shown.set(true);
    }

    /// Wipes the status line, before a report or a notice is written.
    pub(super) fn clear(&self) {
        if self.shown.replace(false) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// `tracing pid 1234 (svc): heap (12 uprobes in libc.so.6), descriptors, temp files, OOM
/// kills (tracepoints); a report every 10s; Ctrl-C stops with a final report`.
fn start_line(config: &SessionConfig, tracer: &Tracer) -> String {
    let root = tracer.root;
    let who = match &config.target {
        Target::Pid(pid) => format!("tracing pid {pid} ({})", tracer.pipeline.comm(*pid)),
        Target::Run { argv, .. } => format!(
            "running {} (pid {root})",
            argv.first()
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        Target::Node(_) => "watching the node".to_owned(),
    };
    let mut what = Vec::new();
    if tracer.heap {
        let (links, modules) = tracer.attached();
        what.push(if config.report.growth_mode {
            "heap growth (page-fault tracepoints, no probes)".to_owned()
        } else if modules.is_empty() {
            "heap (allocator probes once it maps an allocator)".to_owned()
        } else {
            let kind = match tracer.source.attach_mode().name() {
                "multi" => "uprobe_multi links",
                _ => "uprobes",
            };
            format!("heap (allocator in {}: {links} {kind})", modules.join(", "))
        });
    }
    let tracepoints: Vec<&str> = [(features::FD, "descriptors"), (features::TMP, "temp files")]
        .into_iter()
        .filter(|(f, _)| config.features & f != 0)
        .map(|(_, name)| name)
        .chain(std::iter::once("OOM kills"))
        .collect();
    what.push(format!("{} (tracepoints)", tracepoints.join(", ")));
    let when = match config.interval {
        Some(every) => format!("a report every {}", human(every)),
        None => "a report at the end".to_owned(),
    };
    let stop = match config.target {
        Target::Run { .. } => {
            "it ends when the command does; Ctrl-C stops both with a final report"
        }
        _ => "Ctrl-C stops with a final report",
    };
    format!("{who}: {}; {when}; {stop}", what.join(", "))
}

fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if !ms.is_multiple_of(60_000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}m", ms / 60_000)
    }
}
