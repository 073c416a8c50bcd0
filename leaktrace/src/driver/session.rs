//! The session loop: set up the source and the pipeline, start or attach to the target,
//! then drain the ring buffer, watch the processes and write reports until the end.
use std::{os::fd::OwnedFd, time::Duration};

use leaktrace_common::traced_flags;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use super::{
    AsyncRings, FastExit, Outcome, Rings, SessionConfig, SessionError, Target, drain,
    pipeline::Pipeline,
    record::{Entry, Recorder, Recording},
    sink::Sink,
    tracer::Tracer,
};
use crate::{
    export::Format,
    source::{self, LoadOptions, Source},
    symbolize::Symbols,
    targets::{
        host::{Host, Live},
        preflight, procfs,
        spawn::{self, Child},
    },
    track::{fd_events::FdTracker, oom::OomWatch},
    unwind::Dwarf,
};

/// Records drained in one go before the loop looks at its other sources again.
const BUDGET: usize = 1 << 16;

/// Runs a session to its end.
pub async fn run(config: SessionConfig) -> Result<Outcome, SessionError> {
    preflight::check()?;
    let (mut tracer, rings, recorder) = setup(&config)?;
    let sink = Sink::of(&config);
    // Declared after the tracer so it runs first when `run` returns, on every path.
    let _fast_exit = FastExit;
    let mut ring = AsyncRings::register(rings)?;
    let child = attach(&config, &mut tracer)?;
    sink.status.started(&config, &tracer);
    let exit_code = event_loop(&config, &mut tracer, &sink, &mut ring, child.as_ref()).await?;
    let result = finish(
        &config,
        &mut tracer,
        &sink,
        &mut ring.get_mut(),
        child.is_some(),
    );
    if let Some(recorder) = recorder {
        let mut out = recorder;
        out.write(&Entry::Symbols {
            entries: tracer.pipeline.symbols.known(),
        });
        out.flush();
    }
    result.map(|()| Outcome { exit_code })
}

/// Loads the kernel side and makes the pipeline (recorded with `--record`).
pub(super) fn setup(
    config: &SessionConfig,
) -> Result<(Tracer, source::Rings, Option<Recorder>), SessionError> {
    let follow_forks = matches!(
        config.target,
        Target::Run {
            follow_forks: true,
            ..
        }
    );
    let (source, rings) = Source::load(
        &LoadOptions {
            ring_buffer_bytes: config.ring_buffer_bytes,
            follow_forks,
            unwind: config.unwind,
            unwind_rows: config.unwind_rows,
            measure_walks: config.measure_walks,
            features: config.features,
            sample_bytes: config.sample_bytes,
            bpf_log: config.bpf_log,
            attach: config.attach,
        },
        Box::new(Dwarf),
    )?;
    let recorder = match &config.record {
        Some(path) => {
            let mut r = Recorder::create(path)
                .map_err(|e| SessionError::Io("cannot create the recording", e))?;
            r.write(&Entry::Begin {
                options: config.report.clone(),
                features: config.features,
            });
            Some(r)
        }
        None => None,
    };
    let host: Box<dyn Host> = match &recorder {
        Some(r) => Box::new(Recording::new(Live::new(), r.clone())),
        None => Box::new(Live::new()),
    };
    let mut pipeline = Pipeline::new(
        host,
        config.report.clone(),
        FdTracker::new(config.features),
        OomWatch::new(config.oom_log.clone()),
        Symbols::new(),
    );
    pipeline.recorder = recorder.clone();
    let mut tracer = Tracer::new(source, pipeline);
    if let Some(dir) = &config.pod_logs {
        tracer.pods = crate::targets::pods::PodIndex::new(dir, true);
    }
    tracer.measure_walks = config.measure_walks;
    tracer.heap = config.heap;
    tracer.allocator_probes = config.allocator_probes;
    Ok((tracer, rings, recorder))
}

/// Attaches to the running process, or starts the command held at its first instruction.
fn attach(config: &SessionConfig, tracer: &mut Tracer) -> Result<Option<Child>, SessionError> {
    match &config.target {
        Target::Node(_) => unreachable!("the agent attaches in `agent::run`"),
        Target::Pid(pid) => {
            let pid = *pid;
            if !procfs::is_alive(pid) {
                return Err(SessionError::NoSuchProcess(pid));
            }
            tracer.root = pid;
            tracer.source.trace(pid, 0)?;
            tracer.pipeline.start(pid, false);
            if tracer.hook(pid)?.0 == 0 {
                let detail = match procfs::read_maps(pid) {
                    Ok(_) => "none of its mapped objects defines malloc and free".to_owned(),
                    Err(e) => format!("cannot read /proc/{pid}/maps: {e}"),
                };
                return Err(SessionError::NoAllocator {
                    pid,
                    comm: procfs::comm(pid),
                    detail,
                });
            }
            tracing::info!("tracing pid {pid} ({})", tracer.pipeline.comm(pid));
            let mut target = format!("pid {pid} ({})", tracer.pipeline.comm(pid));
            if let Some(cmdline) = procfs::cmdline(pid) {
                target = format!("{target}: {cmdline}");
            }
            tracer.about.target(target);
            Ok(None)
        }
        Target::Run { argv, follow_forks } => {
            // With a machine-readable report on stdout, the command's output goes to stderr.
            let redirect = config.output.is_none() && config.format != Format::Table;
            let held = spawn::hold(argv, redirect)?;
            let mut flags = traced_flags::GATE;
            if *follow_forks {
                flags |= traced_flags::FOLLOW_FORKS;
            }
            if let Err(e) = tracer.source.trace(held.pid, flags) {
                held.abandon();
                return Err(e.into());
            }
            let pid = held.pid;
            tracer.root = pid;
            let command: Vec<String> = argv
                .iter()
                .map(|a| super::tracer::quoted(&a.to_string_lossy()))
                .collect();
            tracer
                .about
                .target(format!("{} (pid {pid})", command.join(" ")));
            tracer.pipeline.start(pid, true);
            let child = Child::watch(pid).map_err(|e| SessionError::Io("pidfd_open", e))?;
            held.release()?;
            Ok(Some(child))
        }
    }
}

/// When the loop wakes for a timer, and what for.
struct Timers {
    /// `--duration` runs out.
    deadline: Option<Instant>,
    /// The next periodic report (`--interval`).
    next_report: Option<Instant>,
    /// After Ctrl-C in run mode, the command gets a moment to exit by itself.
    grace: Option<Instant>,
}

impl Timers {
    /// The earliest timer (or a day away).
    fn wake(&self) -> Instant {
        [self.deadline, self.next_report, self.grace]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400))
    }
}

/// A pidfd of the command we started, to learn of its exit without polling.
fn watch_exit(child: Option<&Child>) -> Result<Option<AsyncFd<OwnedFd>>, SessionError> {
    let Some(c) = child else { return Ok(None) };
    let fd = c
        .pidfd()
        .try_clone()
        .map_err(|e| SessionError::Io("pidfd", e))?;
    // SAFETY: `fd` is our own duplicate, closed only when the AsyncFd drops.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| SessionError::Io("pidfd", e.into()))?;
    Ok(Some(fd))
}

/// Drains the ring buffer and watches the processes until the session ends; returns the
/// exit code.
async fn event_loop(
    config: &SessionConfig,
    tracer: &mut Tracer,
    sink: &Sink,
    ring: &mut AsyncRings,
    child: Option<&Child>,
) -> Result<i32, SessionError> {
    let mut child_fd = watch_exit(child)?;
    let mut exit_code = 0;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| SessionError::Io("signal", e))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| SessionError::Io("signal", e))?;
    let start = Instant::now();
    let mut timers = Timers {
        deadline: config.duration.map(|d| start + d),
        next_report: config.interval.map(|i| start + i),
        grace: None,
    };
    let mut liveness = tokio::time::interval(Duration::from_secs(1));
    // The kernel side wakes us only every few hundred records (wakeups are dear for the
    // traced threads); the rest is drained on this tick.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(10));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.events.readable_mut() => {
                let mut guard = guard.map_err(|e| SessionError::Io("ring buffer", e))?;
                let mut rings = Rings { events: guard.get_inner_mut(), heap: ring.heap.get_mut() };
                let n = drain(&mut rings, tracer, sink, BUDGET)?;
                if n < BUDGET { guard.clear_ready(); } else { guard.retain_ready(); }
            }
            guard = ring.heap.readable_mut() => {
                let mut guard = guard.map_err(|e| SessionError::Io("ring buffer", e))?;
                let mut rings = Rings { events: ring.events.get_mut(), heap: guard.get_inner_mut() };
                let n = drain(&mut rings, tracer, sink, BUDGET)?;
                if n < BUDGET { guard.clear_ready(); } else { guard.retain_ready(); }
            }
            ready = async { child_fd.as_ref().expect("guarded").readable().await }, if child_fd.is_some() => {
                if let Ok(mut g) = ready { g.clear_ready(); }
                if let Some(code) = on_child_ready(tracer, sink, &mut ring.get_mut(), child)? {
                    exit_code = code;
                    child_fd = None;
                }
            }
            _ = drain_tick.tick() => {
                drain(&mut ring.get_mut(), tracer, sink, BUDGET)?;
                tracer.source.flush_log();
            }
            _ = liveness.tick() => {
                on_liveness_tick(tracer, sink, &mut ring.get_mut(), child.is_some())?;
                sink.status.tick(tracer);
            }
            _ = interrupt.recv() => {
                if child.is_some() && timers.grace.is_none() && tracer.pipeline.tracked().next().is_some() {
                    timers.grace = Some(Instant::now() + Duration::from_secs(2));
                } else {
                    exit_code = if child.is_some() { 130 } else { 0 };
                    break;
                }
            }
            _ = terminate.recv() => {
                exit_code = if child.is_some() { 143 } else { 0 };
                break;
            }
            () = tokio::time::sleep_until(timers.wake()) => {
                if let Some(code) = on_timer(config, tracer, sink, &mut ring.get_mut(), &mut timers)? {
                    exit_code = code.unwrap_or(exit_code);
                    break;
                }
            }
        }
        if child_fd.is_none() && tracer.pipeline.tracked().next().is_none() {
            break;
        }
    }
    Ok(exit_code)
}

/// The command's pidfd is readable: when it has exited, its exit status (and it is
/// retired once its last records are in).
fn on_child_ready(
    tracer: &mut Tracer,
    sink: &Sink,
    ring: &mut Rings<'_>,
    child: Option<&Child>,
) -> Result<Option<i32>, SessionError> {
    let root = tracer.root;
    tracing::debug!("pid {root}: pidfd readable");
    let Some(code) = child.and_then(|c| c.try_wait().ok().flatten()) else {
        return Ok(None);
    };
    // Its exit record is in the ring buffer by now: take it before deciding.
    drain(ring, tracer, sink, usize::MAX)?;
    if tracer.pipeline.is_tracked(root) {
        let now = tracer.pipeline.now_ns();
        tracer.retire(root, now);
    }
    Ok(Some(code))
}

/// A timer went off: the session ends (`Some`, with the exit code to use if any), or a
/// periodic report is due.
fn on_timer(
    config: &SessionConfig,
    tracer: &mut Tracer,
    sink: &Sink,
    ring: &mut Rings<'_>,
    timers: &mut Timers,
) -> Result<Option<Option<i32>>, SessionError> {
    let now = Instant::now();
    if timers.deadline.is_some_and(|d| now >= d) || timers.grace.is_some_and(|g| now >= g) {
        return Ok(Some(timers.grace.is_some().then_some(130)));
    }
    if let (Some(at), Some(every)) = (timers.next_report, config.interval)
        && now >= at
    {
        drain(ring, tracer, sink, usize::MAX)?;
        let report = tracer.report(false);
        sink.emit(&report)?;
        timers.next_report = Some(at + every);
    }
    Ok(None)
}

/// Once a second: samples heap growth for OOM records, and retires processes gone without
/// an exit record.
fn on_liveness_tick(
    tracer: &mut Tracer,
    sink: &Sink,
    ring: &mut Rings<'_>,
    spawned: bool,
) -> Result<(), SessionError> {
    let mut pids: Vec<u32> = tracer.pipeline.tracked().collect();
    pids.sort_unstable();
    tracer.pipeline.tick(&pids);
    let root = tracer.root;
    let dead: Vec<u32> = pids
        .into_iter()
        .filter(|&p| p != root || !spawned)
        .filter(|&p| !procfs::is_alive(p))
        .collect();
    if !dead.is_empty() {
        drain(ring, tracer, sink, usize::MAX)?;
        for pid in dead {
            if tracer.pipeline.is_tracked(pid) {
                let now = tracer.pipeline.now_ns();
                tracer.retire(pid, now);
            }
        }
    }
    Ok(())
}

/// The last drain, the checks that only the end can make, and the final report.
fn finish(
    config: &SessionConfig,
    tracer: &mut Tracer,
    sink: &Sink,
    ring: &mut Rings<'_>,
    spawned: bool,
) -> Result<(), SessionError> {
    drain(ring, tracer, sink, usize::MAX)?;
    if spawned {
        // Stopping early (signal, --duration): a process we started may be held at a gate.
        for pid in tracer.pipeline.tracked() {
            // SAFETY: plain kill(2) on processes we started and gate.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }
    let root = tracer.root;
    if let Target::Run { .. } = config.target
        && tracer.heap
        && tracer.hooked.is_empty()
        && tracer.pipeline.allocs() == 0
    {
        return Err(SessionError::NoAllocator {
            pid: root,
            comm: tracer.pipeline.comm(root),
            detail: "it never mapped an object defining malloc and free".into(),
        });
    }
    let report = tracer.report(true);
    sink.emit(&report)
}
