//! The driver: wires the stages for one session (`--pid`, `run`) and nothing more.
//!
//! ```text
//! source ─► ring buffer ─► Tracer::handle ─► Pipeline::apply (decode → track)
//!                               │                  │
//!                               │   exec/fork/loader: attach probes, publish unwind tables
//!                               └─ SIGCONT a gated process
//! interval / alert / end ─► Pipeline::report (symbolize → report) ─► Sink (export)
//! ```
//!
//! - [`pipeline`](Pipeline): the unprivileged stages, fed record by record;
//! - `tracer`: the privileged half, the source and each process's probes;
//! - `session`: the event loop (ring buffer, pidfd, signals, timers);
//! - [`record`]: `--record` and replay;
//! - `sink`: where reports go;
//! - [`diff`]: `leaktrace diff`, two reports read and compared.
use std::{ffi::OsString, io, path::PathBuf, time::Duration};

use aya::maps::{MapData, RingBuf};

use crate::{
    export::{self, FoldedKind, FoldedWeight, Format},
    report::ReportOptions,
    source::{AllocatorProbes, AttachMode, SourceError},
    targets::{preflight::PreflightError, spawn::SpawnError},
    unwind::Unwind,
};

pub mod agent;
pub mod diff;
mod pipeline;
pub mod record;
mod reports;
pub mod serve;
mod session;
mod sink;
mod status;
mod tracer;

#[cfg(test)]
mod replay_tests;

pub use agent::{AgentConfig, Selector};
pub use pipeline::{Alert, Applied, Lifecycle, Pipeline};
pub use reports::KernelStats;

/// Runs a session (`--pid`, `run`) or the node agent to its end.
pub async fn run(config: SessionConfig) -> Result<Outcome, SessionError> {
    match config.target {
        Target::Node(_) => agent::run(config).await,
        _ => session::run(config).await,
    }
}
use sink::Sink;
use tracer::Tracer;

/// What to trace.
#[derive(Clone, Debug)]
pub enum Target {
    /// A running process.
    Pid(u32),
    /// A command leaktrace starts.
    Run {
        /// The command and its arguments; `argv[0]` is found as a shell would (along `PATH` unless it has a `/`).
        argv: Vec<OsString>,
        /// Trace the children it forks too.
        follow_forks: bool,
    },
    /// Every process on the node (`leaktrace agent`).
    Node(AgentConfig),
}

/// Everything a session needs to know.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// What to trace.
    pub target: Target,
    /// Stop after this long and print the final report; `None`: until the target exits or a signal.
    pub duration: Option<Duration>,
    /// Print a report this often; `None`: only the final report.
    pub interval: Option<Duration>,
    /// What reports show and how they are trimmed.
    pub report: ReportOptions,
    /// How reports are written.
    pub format: Format,
    /// What folded stacks are weighted by.
    pub weight: FoldedWeight,
    /// Write reports to this file (always the latest complete one) instead of stdout.
    pub output: Option<PathBuf>,
    /// Size of the kernel-to-user ring buffer, in bytes (a power of two).
    pub ring_buffer_bytes: u32,
    /// How the kernel side walks stacks.
    pub unwind: Unwind,
    /// Capacity of the kernel-side unwind table (rows of 8 bytes, all modules together).
    pub unwind_rows: u32,
    /// Time every stack walk in the kernel and report it (for benchmarks).
    pub measure_walks: bool,
    /// Trace the heap (allocator probes).
    pub heap: bool,
    /// What the allocator probes do (benchmarks attach empty ones).
    pub allocator_probes: AllocatorProbes,
    /// How uprobes are attached (uprobe_multi links or perf-event uprobes).
    pub attach: AttachMode,
    /// Sample allocations, one byte in this many on average (0: every allocation).
    pub sample_bytes: u32,
    /// Bits of [`leaktrace_common::features`]: descriptors, temp files.
    pub features: u32,
    /// Append each OOM-kill record here, as one JSON line, the moment it happens.
    pub oom_log: Option<PathBuf>,
    /// Which stacks folded output shows.
    pub folded_kind: FoldedKind,
    /// Forward the eBPF side's diagnostics to the log (`-vv`).
    pub bpf_log: bool,
    /// Record the session here, for replay (see [`record`]).
    pub record: Option<PathBuf>,
    /// Say nothing on stderr but errors, warnings and notices (no start line, no status
    /// line).
    pub quiet: bool,
    /// The kubelet's pod log directory, to name pods and containers (`None`:
    /// [`crate::targets::pods::DEFAULT_POD_LOGS`], and no warning when it is missing).
    pub pod_logs: Option<PathBuf>,
}

/// Why a session failed. Each variant maps to a documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    /// The host cannot trace (privileges, kernel features).
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    /// The eBPF programs could not be loaded or attached.
    Source(#[from] SourceError),
    #[error("no process with pid {0}")]
    /// `--pid` names no running process.
    NoSuchProcess(u32),
    #[error(
        "pid {pid} ({comm}) has no allocator leaktrace can hook: {detail} (heap tracing hooks \
         malloc/free in libc or in a statically linked executable; Go and other runtimes with \
         their own allocator are not supported yet)"
    )]
    /// The target links no allocator leaktrace knows how to probe.
    NoAllocator {
        /// The target process.
        pid: u32,
        /// Its command name.
        comm: String,
        /// Why: what its maps lacked, or that they could not be read.
        detail: String,
    },
    #[error(transparent)]
    /// The command could not be started.
    Spawn(#[from] SpawnError),
    #[error("{0}: {1}")]
    /// An I/O error; the string says what was being done.
    Io(&'static str, io::Error),
    #[error(transparent)]
    /// The agent cannot serve where `--listen` says.
    Serve(#[from] serve::ServeError),
}

impl SessionError {
    /// The process exit code for this error (see `leaktrace --help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            SessionError::Preflight(
                PreflightError::Capabilities(_) | PreflightError::ReadCapabilities(_),
            ) => 3,
            SessionError::Preflight(_) => 5,
            SessionError::NoSuchProcess(_) | SessionError::NoAllocator { .. } => 4,
            SessionError::Spawn(e) => e.exit_code(),
            SessionError::Source(_) | SessionError::Io(..) | SessionError::Serve(_) => 1,
        }
    }
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// For `run`: the command's exit status (128 + signal when killed). Otherwise 0.
    pub exit_code: i32,
}

pub use crate::targets::host::monotonic_ns;

/// Hands the probes' release to a child process when the session ends (see
/// [`crate::source::release_probes_after_exit`]).
struct FastExit;

impl Drop for FastExit {
    fn drop(&mut self) {
        crate::source::release_probes_after_exit();
    }
}

/// Drains what the ring buffers hold, at most about `budget` records. Returns how many were
/// read.
fn drain(
    rings: &mut Rings<'_>,
    tracer: &mut Tracer,
    sink: &Sink,
    budget: usize,
) -> Result<usize, SessionError> {
    drain_in_order(rings, budget, |item| {
        if let Some(alert) = tracer.handle(item)? {
            on_alert(tracer, sink, &alert);
        }
        Ok(())
    })
}

/// Hands every record the ring buffers hold to `apply` in the order the tables rely on: the
/// allocator's ring first, and again before a fork, exec, exit or loader record (what the
/// process allocated came before it). Stops past `budget` records (a lifecycle record's
/// allocator records all go first, whatever the budget). Returns how many were read.
pub(super) fn drain_in_order(
    rings: &mut Rings<'_>,
    budget: usize,
    mut apply: impl FnMut(&[u8]) -> Result<(), SessionError>,
) -> Result<usize, SessionError> {
    let mut n = drain_ring(rings.heap, budget, &mut apply)?;
    while n < budget {
        let Some(item) = rings.events.next() else {
            break;
        };
        n += 1;
        if lifecycle(&item) {
            n += drain_ring(rings.heap, usize::MAX, &mut apply)?;
        }
        apply(&item)?;
    }
    Ok(n)
}

/// Hands one ring buffer's records to `apply`, at most `budget`.
fn drain_ring(
    ring: &mut RingBuf<MapData>,
    budget: usize,
    apply: &mut impl FnMut(&[u8]) -> Result<(), SessionError>,
) -> Result<usize, SessionError> {
    let mut n = 0;
    while n < budget {
        let Some(item) = ring.next() else { break };
        n += 1;
        apply(&item)?;
    }
    Ok(n)
}

/// A fork, exec, exit or loader record: what a process did before it, in the allocator's
/// ring buffer, must be applied before it (a stack walked through a library is named with
/// the maps read before the `dlclose` that unmaps it; a fork's child inherits the blocks
/// its parent allocated before the fork).
fn lifecycle(record: &[u8]) -> bool {
    use leaktrace_common::kind::{EXEC, EXIT, FORK, LOADER};
    crate::decode::peek_header(record).is_ok_and(|h| matches!(h.kind, FORK | EXEC | EXIT | LOADER))
}

/// The ring buffers of a session, registered with the runtime for readiness.
pub(super) struct AsyncRings {
    pub(super) events: tokio::io::unix::AsyncFd<RingBuf<MapData>>,
    pub(super) heap: tokio::io::unix::AsyncFd<RingBuf<MapData>>,
}

impl AsyncRings {
    pub(super) fn register(rings: crate::source::Rings) -> Result<Self, SessionError> {
        let register = |ring| {
            // SAFETY: each ring buffer owns its descriptor and is never closed while
            // registered.
            unsafe { tokio::io::unix::AsyncFd::register(ring) }
                .map_err(|e| SessionError::Io("ring buffer", e.into()))
        };
        Ok(Self {
            events: register(rings.events)?,
            heap: register(rings.heap)?,
        })
    }

    /// Both, to drain.
    pub(super) fn get_mut(&mut self) -> Rings<'_> {
        Rings {
            events: self.events.get_mut(),
            heap: self.heap.get_mut(),
        }
    }
}

/// The ring buffers of a session, borrowed from where the event loop keeps them.
pub(super) struct Rings<'a> {
    /// Every record but the allocator's.
    pub(super) events: &'a mut RingBuf<MapData>,
    /// The allocator probes' records.
    pub(super) heap: &'a mut RingBuf<MapData>,
}

/// An OOM kill or a full descriptor table: the notice on stderr at once, and a report
/// written now, so a report file shows it even if leaktrace dies next and a JSON stream gets
/// it now (a table on the terminal has the notice).
fn on_alert(tracer: &mut Tracer, sink: &Sink, alert: &Alert) {
    sink.status.clear();
    match alert {
        Alert::Oom(kill) => eprint!("{}", export::table::oom_notice(&tracer.named(kill))),
        Alert::Exhausted(x) => eprint!("{}", export::table::exhaustion_notice(x)),
    }
    if sink.output.is_some() || sink.format == Format::Json {
        let report = tracer.report(false);
        if let Err(err) = sink.emit(&report) {
            tracing::error!("{err}");
        }
    }
}
