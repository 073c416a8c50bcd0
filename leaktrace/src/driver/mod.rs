//! A tracing session: the one loop that drains the ring buffer into the tables, reacts to
//! process lifecycle records (attaching probes, releasing gated processes) and writes reports
//! every interval and at the end.
//!
//! ```text
//! probes ─► ring buffer ─► decode ─► Tracer::handle ─┬─► HeapTables / StackStore
//!                                                    └─► attach probes, SIGCONT
//! interval / end ─► report::build ─► export::render ─► stdout or --output
//! ```
use std::{
    ffi::OsString,
    io::{self, Write as _},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use hashbrown::{HashMap, HashSet};
use leaktrace_common::{header_flags, traced_flags};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use crate::{
    decode::{Event, decode},
    export::{self, FoldedKind, FoldedWeight, Format},
    report::{
        self, FdExhaustion, FdHolder, HeapHolder, OomKill, Report, ReportInput, ReportOptions,
        Trend,
    },
    source::{AllocatorProbes, Detacher, LoadOptions, ProcessProbes, Source, SourceError},
    symbolize::Symbols,
    symbolize::stacks::{Stack, StackStore, normalize},
    targets::modules::{AddressSpace, Module, Modules},
    targets::preflight::{self, PreflightError},
    targets::procfs,
    targets::spawn::{self, Child, SpawnError},
    track::fd_events::{Exhausted, FdTracker},
    track::heap::HeapTables,
    track::oom::{self, OomWatch},
    unwind::{Dwarf, Unwind},
};

/// What to trace.
#[derive(Clone, Debug)]
pub enum Target {
    /// A running process.
    Pid(u32),
    /// A command leaktrace starts.
    Run {
        argv: Vec<OsString>,
        follow_forks: bool,
    },
}

/// Everything a session needs to know.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub target: Target,
    pub duration: Option<Duration>,
    pub interval: Option<Duration>,
    pub report: ReportOptions,
    pub format: Format,
    pub weight: FoldedWeight,
    pub output: Option<PathBuf>,
    pub ring_buffer_bytes: u32,
    pub unwind: Unwind,
    /// Capacity of the kernel-side unwind table (rows of 8 bytes, all modules together).
    pub unwind_rows: u32,
    /// Time every stack walk in the kernel and report it (for benchmarks).
    pub measure_walks: bool,
    /// Trace the heap (allocator probes).
    pub heap: bool,
    /// What the allocator probes do (benchmarks attach empty ones).
    pub allocator_probes: AllocatorProbes,
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
}

/// Why a session failed. Each variant maps to a documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error(
        "pid {pid} ({comm}) has no allocator leaktrace can hook: {detail} (heap tracing hooks \
         malloc/free in libc or in a statically linked executable; Go and other runtimes with \
         their own allocator are not supported yet)"
    )]
    NoAllocator {
        pid: u32,
        comm: String,
        detail: String,
    },
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("{0}: {1}")]
    Io(&'static str, io::Error),
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
            SessionError::Source(_) | SessionError::Io(..) => 1,
        }
    }
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// For `run`: the command's exit status (128 + signal when killed). Otherwise 0.
    pub exit_code: i32,
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of the kernel side's timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Hands the probes' release to a child process when the session ends (see
/// [`crate::source::release_probes_after_exit`]).
struct FastExit;

impl Drop for FastExit {
    fn drop(&mut self) {
        crate::source::release_probes_after_exit();
    }
}

/// Where reports go.
struct Sink {
    format: Format,
    weight: FoldedWeight,
    folded_kind: FoldedKind,
    output: Option<PathBuf>,
}

impl Sink {
    fn emit(&self, report: &Report) -> Result<(), SessionError> {
        let text = export::render(report, self.format, self.weight, self.folded_kind);
        match &self.output {
            Some(path) => {
                export::to_path(path, &text).map_err(|e| SessionError::Io("cannot write report", e))
            }
            None => {
                let mut out = io::stdout().lock();
                let r = out.write_all(text.as_bytes()).and_then(|()| out.flush());
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

/// The state the loop mutates: tables, stacks, probes, processes.
struct Tracer {
    source: Source,
    modules: Modules,
    spaces: HashMap<u32, AddressSpace>,
    spaces_read: HashMap<u32, u64>,
    probes: HashMap<u32, ProcessProbes>,
    detacher: Detacher,
    tables: HeapTables,
    stacks: StackStore,
    symbols: Symbols,
    growth: Trend,
    comms: HashMap<u32, String>,
    /// Traced processes still alive.
    live: HashSet<u32>,
    /// Processes that ever had an allocator hooked.
    hooked: HashSet<u32>,
    /// A command we started, not yet exec'd: what it does with descriptors is our own
    /// spawning code's doing (stdout redirection), not the program's.
    before_exec: Option<u32>,
    decode_errors: u64,
    options: ReportOptions,
    /// The process the user named (pid mode) or started (run mode).
    root: u32,
    measure_walks: bool,
    /// Allocator probes are attached.
    heap: bool,
    allocator_probes: AllocatorProbes,
    sample_bytes: u32,
    /// Growth mode: each process's program break, to see it shrink.
    brk: HashMap<u32, u64>,
    fd: FdTracker,
    oom: OomWatch,
    /// Full descriptor tables, one record per (pid, failing stack).
    exhaustion: Vec<Exhaustion>,
    /// Where reports go; also written at once when an OOM kill happens.
    sink: Sink,
}

impl Tracer {
    fn new(source: Source, options: ReportOptions, sink: Sink) -> Self {
        Self {
            source,
            modules: Modules::default(),
            spaces: HashMap::new(),
            spaces_read: HashMap::new(),
            probes: HashMap::new(),
            detacher: Detacher::default(),
            tables: HeapTables::new(monotonic_ns()),
            stacks: StackStore::default(),
            symbols: Symbols::new(),
            growth: Trend::default(),
            comms: HashMap::new(),
            live: HashSet::new(),
            hooked: HashSet::new(),
            before_exec: None,
            decode_errors: 0,
            options,
            root: 0,
            measure_walks: false,
            heap: true,
            allocator_probes: AllocatorProbes::Full,
            sample_bytes: 0,
            brk: HashMap::new(),
            fd: FdTracker::default(),
            oom: OomWatch::default(),
            exhaustion: Vec::new(),
            sink,
        }
    }

    /// Reads where the process's code is, and hands the walker its unwind tables.
    fn read_space(&mut self, pid: u32) -> io::Result<()> {
        let space = AddressSpace::read(pid, &mut self.modules)?;
        tracing::trace!(
            "pid {pid}: maps read: {:x?}",
            space
                .ranges()
                .iter()
                .map(|r| (
                    r.start,
                    r.name.rsplit('/').next().unwrap_or_default().to_owned()
                ))
                .collect::<Vec<_>>()
        );
        if let Err(e) = self.source.publish_code(&space) {
            tracing::warn!("pid {pid}: stacks fall back to frame pointers: {e}");
        }
        self.spaces.insert(pid, space);
        self.spaces_read.insert(pid, monotonic_ns());
        Ok(())
    }

    /// Re-reads the process's maps and hooks every allocator and loader it maps that is not
    /// hooked yet. Returns how many of the modules it maps now have their allocator hooked.
    fn hook(&mut self, pid: u32) -> Result<usize, SessionError> {
        Ok(self.hook_modules(pid)?.0)
    }

    /// [`Self::hook`], also telling whether a loader it maps now is hooked.
    fn hook_modules(&mut self, pid: u32) -> Result<(usize, bool), SessionError> {
        if let Err(e) = self.read_space(pid) {
            tracing::debug!("pid {pid}: cannot read maps: {e}");
            let probes = self.probes.get(&pid);
            return Ok((
                probes.map_or(0, |p| p.allocator_modules.len()),
                probes.is_some_and(|p| !p.loader_modules.is_empty()),
            ));
        }
        let modules = self
            .spaces
            .get(&pid)
            .map(AddressSpace::modules)
            .unwrap_or_default();
        let probes = self.probes.entry(pid).or_default();
        for module in &modules {
            if self.heap && module.elf.is_allocator() {
                self.source
                    .attach_allocator(probes, pid, module, self.allocator_probes)?;
                tracing::debug!("pid {pid}: hooked the allocator in {}", module.path);
            }
            if module.elf.loader_state.is_some() {
                self.source.attach_loader(probes, pid, module)?;
            }
        }
        // Probes kept from an image the process exec'd away from count only where this image
        // maps the same module.
        let mapped = |hooked: &[Arc<Module>]| {
            modules
                .iter()
                .filter(|m| hooked.iter().any(|h| h.key == m.key))
                .count()
        };
        let n = mapped(&probes.allocator_modules);
        let loader = mapped(&probes.loader_modules) > 0;
        if n > 0 {
            self.hooked.insert(pid);
        }
        // Without heap tracing, any module will do: nothing is hooked, nothing is missing.
        Ok((if self.heap { n } else { modules.len() }, loader))
    }

    fn start_tracking(&mut self, pid: u32) {
        self.comms.insert(pid, procfs::comm(pid));
        self.fd.note_process(pid);
        self.live.insert(pid);
        self.oom.track(pid);
    }

    /// Forgets a process: detaches its probes, keeps what it held at exit.
    fn retire(&mut self, pid: u32, ts_ns: u64) {
        self.tables.exit(pid, ts_ns);
        self.brk.remove(&pid);
        self.fd.exit(pid, self.tables.ms_since_epoch(ts_ns));
        self.oom.forget(pid);
        if let Some(probes) = self.probes.remove(&pid) {
            self.detacher.detach(probes);
        }
        self.spaces.remove(&pid);
        self.spaces_read.remove(&pid);
        self.source.untrace(pid);
        self.source.unpublish_code(pid);
        self.live.remove(&pid);
        let snap_ids: HashSet<u64> = self
            .tables
            .snapshot(0, 0)
            .exited
            .iter()
            .filter(|e| e.pid == pid)
            .flat_map(|e| e.stacks.iter().map(|r| r.counters.stack_id))
            .collect();
        // Stacks that still hold descriptors or temp files, or are named in a record, stay.
        let fd_ids: HashSet<u64> = self
            .fd
            .fds
            .snapshot(0)
            .exited
            .iter()
            .filter(|e| e.pid == pid)
            .flat_map(|e| e.stacks.iter().map(|s| s.stack_id))
            .chain(
                self.fd
                    .tmp
                    .files()
                    .filter(|f| f.pid == pid)
                    .map(|f| f.stack_id),
            )
            .collect();
        self.stacks
            .forget_pid(pid, |id| snap_ids.contains(&id) || fd_ids.contains(&id));
    }

    fn on_stack(&mut self, s: &crate::decode::StackRecord<'_>) {
        if self.stacks.contains(s.stack_id) {
            return;
        }
        let pid = s.hdr.pid;
        // The innermost frame is always real code: if it is in no known mapping, the maps
        // are stale (dlopen, JIT) or were never read.
        let covered = |space: Option<&AddressSpace>| {
            space.is_some_and(|sp| {
                s.frames()
                    .next()
                    .is_none_or(|a| sp.range(a.saturating_sub(1)).is_some())
            })
        };
        if !covered(self.spaces.get(&pid)) {
            // New code (dlopen, JIT, a library the loader mapped since exec) or a process we
            // have not read yet. Read again when the maps we have predate the walk (they may
            // miss what it saw), else at most every 10 ms.
            let stale = self.spaces_read.get(&pid).is_none_or(|&read| {
                read <= s.hdr.ts_ns || monotonic_ns().saturating_sub(read) > 10_000_000
            });
            if stale {
                let _ = self.read_space(pid);
            }
        }
        if !covered(self.spaces.get(&pid)) {
            tracing::debug!(
                "pid {pid}: stack {:#x} starts at {:#x}, in no known mapping ({:x?})",
                s.stack_id,
                s.frames().next().unwrap_or_default(),
                self.spaces.get(&pid).map(|sp| sp
                    .ranges()
                    .iter()
                    .map(|r| (r.start, r.end, r.name.clone()))
                    .collect::<Vec<_>>())
            );
        }
        let mut flags = s.flags;
        let frames = match self.spaces.get(&pid) {
            Some(space) => normalize(space, &mut flags, s.frames()),
            None => normalize(&AddressSpace::default(), &mut flags, s.frames()),
        };
        self.stacks.insert(s.stack_id, Stack { pid, flags, frames });
    }

    /// Applies one event. Gated processes are released afterwards whatever happened.
    fn handle(&mut self, event: Event<'_>) -> Result<(), SessionError> {
        let hdr = *event.header();
        if !matches!(
            event,
            Event::Alloc(_) | Event::Free(_) | Event::Stack(_) | Event::Page(_) | Event::Release(_)
        ) {
            tracing::debug!("pid {}: {:?}", hdr.pid, event);
        }
        let result = match event {
            Event::Alloc(mut e) => {
                // A sampled block smaller than the sampling unit stands for `sample / size`
                // blocks like it: its estimated share of outstanding bytes is `sample`.
                let sample = u64::from(self.sample_bytes);
                if e.addr != 0 && e.size < sample {
                    e.size = sample;
                }
                tracing::trace!(
                    shape = e.shape,
                    addr = e.addr,
                    size = e.size,
                    stack = e.stack_id,
                    "alloc"
                );
                self.tables.alloc(&e);
                Ok(())
            }
            Event::Free(e) => {
                tracing::trace!(addr = e.addr, tid = e.hdr.tid, "free");
                self.tables.free(&e);
                Ok(())
            }
            Event::Stack(s) => {
                tracing::trace!(stack = s.stack_id, frames = ?s.frames().collect::<Vec<_>>(), "stack");
                self.on_stack(&s);
                Ok(())
            }
            Event::Exec(e) => self.on_exec(e.hdr.pid, e.hdr.ts_ns),
            Event::Loader(e) => self.hook(e.hdr.pid).map(drop),
            Event::Fork(e) => self.on_fork(e.hdr.pid, e.other_pid),
            Event::Exit(e) => {
                self.retire(e.hdr.pid, e.hdr.ts_ns);
                Ok(())
            }
            Event::Fd(r) if self.before_exec == Some(r.event.hdr.pid) => Ok(()),
            Event::Fd(r) => {
                let at_ms = self.tables.ms_since_epoch(r.event.hdr.ts_ns);
                if let Some(x) = self.fd.on_record(&r, at_ms) {
                    self.on_exhausted(x, at_ms);
                }
                Ok(())
            }
            Event::Oom(e) => {
                self.on_oom(&e);
                Ok(())
            }
            Event::Page(e) => {
                // What a fault added is a block allocated by the stack that first wrote there.
                self.tables.alloc(&leaktrace_common::AllocEvent {
                    hdr: e.hdr,
                    addr: e.addr,
                    size: e.size,
                    old_addr: 0,
                    stack_id: e.stack_id,
                    shape: leaktrace_common::alloc_shape::SIZE,
                    _pad: 0,
                });
                Ok(())
            }
            Event::Release(e) => {
                let pid = e.hdr.pid;
                let (start, end) = if e.op == leaktrace_common::release_op::BRK {
                    // The break moved: what lay between the new one and a higher old one is
                    // gone.
                    let old = self.brk.insert(pid, e.start).unwrap_or(e.start);
                    (e.start, old.max(e.start))
                } else {
                    (e.start, e.end)
                };
                self.tables.release_range(pid, start, end);
                Ok(())
            }
        };
        if hdr.flags & header_flags::STOPPED != 0 {
            // The kernel side stopped this process for us. A command we cannot trace at all
            // has not run a single instruction of its own yet: end it rather than let it run
            // unsupervised.
            let signal = if matches!(result, Err(SessionError::NoAllocator { .. })) {
                libc::SIGKILL
            } else {
                libc::SIGCONT
            };
            // SAFETY: plain kill(2).
            unsafe { libc::kill(hdr.pid as i32, signal) };
        }
        result
    }

    fn on_exec(&mut self, pid: u32, ts_ns: u64) -> Result<(), SessionError> {
        // The old image is gone; what it held is kept as in use at exit of that image.
        //
        // Its probes stay. A uprobe is placed on a file, scoped to the process, so a probe on
        // a module the new image maps again (libc, the loader) is exactly the probe the new
        // image needs, and `hook` will not attach a second one; a probe on a module it does
        // not map never fires. Detaching them instead takes ~90 ms a probe (see `Detacher`),
        // and until that is done the new image would run under both the old probes and the
        // new: every free reported twice.
        self.tables.exec(pid, ts_ns);
        self.brk.remove(&pid);
        self.fd.exec(pid);
        if self.before_exec == Some(pid) {
            self.before_exec = None;
        }
        self.comms.insert(pid, procfs::comm(pid));
        self.fd.note_process(pid);
        self.oom.track(pid);
        let (hooked, has_loader) = self.hook_modules(pid)?;
        if hooked == 0 && !has_loader && procfs::is_alive(pid) {
            // A static executable without malloc: nothing will ever be hooked.
            if pid != self.root {
                tracing::warn!(
                    "pid {pid} ({}) exec'd a program without a hookable allocator; not traced",
                    self.comm(pid)
                );
                self.retire(pid, ts_ns);
                return Ok(());
            }
            return Err(SessionError::NoAllocator {
                pid,
                comm: procfs::comm(pid),
                detail: "its statically linked executable defines no malloc/free".into(),
            });
        }
        Ok(())
    }

    fn on_fork(&mut self, child: u32, parent: u32) -> Result<(), SessionError> {
        self.start_tracking(child);
        self.fd.fork(parent, child);
        match self.hook(child) {
            Ok(_) => {}
            Err(e) => tracing::warn!("pid {child} (forked by {parent}) cannot be traced: {e}"),
        }
        Ok(())
    }

    /// Notes every traced process's outstanding heap bytes, for OOM records.
    fn sample_growth(&mut self) {
        let at_ms = self.tables.ms_since_epoch(monotonic_ns());
        for &pid in &self.live {
            self.oom
                .sample(pid, at_ms, self.tables.outstanding_of(pid).1);
        }
    }

    /// Symbolized, trimmed frames of a stack, for records written at once.
    fn frames(&mut self, id: u64) -> Vec<report::Frame> {
        report::stack_frames(&self.stacks, &mut self.symbols, id)
            .0
            .iter()
            .map(report::Frame::from)
            .collect()
    }

    fn holders(&mut self, pid: u32) -> Vec<FdHolder> {
        let top = self.fd.fds.top_holders(pid, 5);
        top.into_iter()
            .map(|h| FdHolder {
                outstanding: h.outstanding,
                fd_kind: h.kind.map_or("other", |k| k.name()),
                frames: self.frames(h.stack_id),
            })
            .collect()
    }

    /// A call failed because the descriptor table is full: reported at once, with the stacks
    /// holding the most descriptors right now.
    fn on_exhausted(&mut self, x: Exhausted, at_ms: u32) {
        if let Some(seen) = self
            .exhaustion
            .iter_mut()
            .find(|r| r.pid == x.pid && r.stack_id == x.stack_id)
        {
            seen.record.count += 1;
            return;
        }
        // The process may be gone already; then the last limit we saw it set.
        let limit = procfs::open_files_limit(x.pid).or_else(|| self.fd.limit(x.pid));
        let record = FdExhaustion {
            pid: x.pid,
            comm: self.comm(x.pid),
            errno: if x.errno == libc::ENFILE {
                "ENFILE"
            } else {
                "EMFILE"
            },
            limit,
            open: self.fd.fds.open_count(x.pid),
            count: 1,
            at_s: f64::from(at_ms) / 1e3,
            frames: self.frames(x.stack_id),
            top_holders: self.holders(x.pid),
        };
        eprint!("{}", export::table::exhaustion_notice(&record));
        self.exhaustion.push(Exhaustion {
            pid: x.pid,
            stack_id: x.stack_id,
            record,
        });
        self.report_now();
    }

    /// The OOM killer chose a victim: the record is made and written out now, while the
    /// victim's tables are still here.
    fn on_oom(&mut self, e: &leaktrace_common::OomEvent) {
        let pid = e.victim;
        let traced = self.live.contains(&pid);
        let at_ms = self.tables.ms_since_epoch(e.hdr.ts_ns);
        let comm = String::from_utf8_lossy(e.comm.split(|&b| b == 0).next().unwrap_or_default())
            .into_owned();
        let placement = self.oom.victim_placement(pid);
        let (mut heap_top, mut fd_top, mut growth, mut rate) =
            (Vec::new(), Vec::new(), Vec::new(), None);
        if traced {
            let (_, bytes) = self.tables.outstanding_of(pid);
            (growth, rate) = self.oom.growth(pid, at_ms, bytes);
            for c in self.tables.top_stacks(pid, 5) {
                let frames = self.frames(c.stack_id);
                heap_top.push(HeapHolder {
                    outstanding_bytes: c.outstanding_bytes,
                    outstanding_count: c.outstanding_count,
                    frames,
                });
            }
            fd_top = self.holders(pid);
        }
        let kill = OomKill {
            pid,
            comm,
            cgroup: placement.as_ref().map(|p| p.cgroup.clone()),
            container_id: placement.as_ref().and_then(|p| p.container_id.clone()),
            pod_uid: placement.as_ref().and_then(|p| p.pod_uid.clone()),
            rss_bytes: (e.anon_rss_kb + e.file_rss_kb + e.shmem_rss_kb) * 1024,
            anon_rss_bytes: e.anon_rss_kb * 1024,
            limit_bytes: placement.and_then(|p| p.limit_bytes),
            oom_score_adj: e.oom_score_adj,
            traced,
            time: oom::utc_now(),
            frames_top: heap_top
                .first()
                .map(|h| h.frames.clone())
                .unwrap_or_default(),
            heap_top,
            fd_top,
            growth,
            growth_bytes_per_s: rate,
        };
        eprint!("{}", export::table::oom_notice(&kill));
        self.oom.record(kill);
        self.report_now();
    }

    /// Writes a report at once, after an event that cannot wait for the interval (an OOM
    /// kill, a full descriptor table): a report file shows it even if leaktrace dies next,
    /// and a JSON stream gets it now. A table on the terminal has the notice on stderr.
    fn report_now(&mut self) {
        let wanted = self.sink.output.is_some() || self.sink.format == Format::Json;
        if wanted {
            let report = self.report(false);
            if let Err(err) = self.sink.emit(&report) {
                tracing::error!("{err}");
            }
        }
    }

    fn comm(&self, pid: u32) -> String {
        self.comms
            .get(&pid)
            .cloned()
            .unwrap_or_else(|| procfs::comm(pid))
    }

    fn report(&mut self, is_final: bool) -> Report {
        let snapshot = self
            .tables
            .snapshot(monotonic_ns(), self.options.min_age_ns);
        let mut lost = self.source.drops();
        lost.push(("undecodable", self.decode_errors));
        let fds = self.fd.fds.snapshot(snapshot.now_ms);
        let tmp = self.fd.tmp_rows();
        let exhaustion: Vec<FdExhaustion> =
            self.exhaustion.iter().map(|x| x.record.clone()).collect();
        let comms = &self.comms;
        let comm = |pid: u32| {
            comms
                .get(&pid)
                .cloned()
                .unwrap_or_else(|| procfs::comm(pid))
        };
        report::build(
            ReportInput {
                snapshot: &snapshot,
                stacks: &self.stacks,
                lost: &lost,
                comm: &comm,
                is_final,
                walks: self.measure_walks.then(|| {
                    let w = self.source.walk_stats();
                    let per = |x: u64| {
                        if w.walks == 0 {
                            0.0
                        } else {
                            x as f64 / w.walks as f64
                        }
                    };
                    report::WalkSummary {
                        walks: w.walks,
                        frames_per_walk: per(w.frames),
                        ns_per_walk: per(w.ns),
                        unwind_rows: self.source.unwind_rows_used().0 as u64,
                        bpf_map_bytes: crate::source::map_memory_bytes(),
                    }
                }),
                fds: &fds,
                tmp: &tmp,
                tmp_created: self.fd.tmp.created,
                tmp_unwatched: self.fd.tmp.unwatched,
                // Sampled, the frees of blocks not sampled are filtered too: not "unmatched".
                filtered_frees: if self.sample_bytes == 0 {
                    self.source
                        .counter(leaktrace_common::counter::FILTERED_FREES)
                } else {
                    0
                },
                tracer: report::TracerUsage::current(),
                stack_cache_hits: self
                    .source
                    .counter(leaktrace_common::counter::WALK_CACHE_HITS),
                stack_walks: self.source.counter(leaktrace_common::counter::WALKS),
                fd_exhaustion: &exhaustion,
                oom_kills: &self.oom.records,
            },
            &self.options,
            &mut self.symbols,
            &mut self.growth,
        )
    }
}

/// A full descriptor table, reported once per (process, failing stack).
struct Exhaustion {
    pid: u32,
    stack_id: u64,
    record: FdExhaustion,
}

/// Drains what the ring buffer holds, at most `budget` records. Returns how many were read.
fn drain(
    ring: &mut RingBuf<MapData>,
    tracer: &mut Tracer,
    budget: usize,
) -> Result<usize, SessionError> {
    let mut n = 0;
    while n < budget {
        let Some(item) = ring.next() else { break };
        n += 1;
        match decode(&item) {
            Ok(event) => tracer.handle(event)?,
            Err(e) => {
                if tracer.decode_errors == 0 {
                    tracing::warn!("undecodable record: {e}");
                }
                tracer.decode_errors += 1;
            }
        }
    }
    Ok(n)
}

/// Runs a session to its end.
pub async fn run(config: SessionConfig) -> Result<Outcome, SessionError> {
    preflight::check()?;
    let follow_forks = matches!(
        config.target,
        Target::Run {
            follow_forks: true,
            ..
        }
    );
    let (source, ring) = Source::load(
        &LoadOptions {
            ring_buffer_bytes: config.ring_buffer_bytes,
            follow_forks,
            unwind: config.unwind,
            unwind_rows: config.unwind_rows,
            measure_walks: config.measure_walks,
            features: config.features,
            sample_bytes: config.sample_bytes,
            bpf_log: config.bpf_log,
        },
        Box::new(Dwarf),
    )?;
    let sink = Sink {
        format: config.format,
        weight: config.weight,
        folded_kind: config.folded_kind,
        output: config.output.clone(),
    };
    let mut tracer = Tracer::new(source, config.report.clone(), sink);
    tracer.measure_walks = config.measure_walks;
    tracer.heap = config.heap;
    tracer.allocator_probes = config.allocator_probes;
    tracer.sample_bytes = config.sample_bytes;
    tracer.fd = FdTracker::new(config.features);
    tracer.oom = OomWatch::new(config.oom_log.clone());
    // Declared after the tracer so it runs first when `run` returns, on every path.
    let _fast_exit = FastExit;
    // SAFETY: the ring buffer owns its descriptor and is never closed while registered.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| SessionError::Io("ring buffer", e.into()))?;

    let child = match &config.target {
        Target::Pid(pid) => {
            let pid = *pid;
            if !procfs::is_alive(pid) {
                return Err(SessionError::NoSuchProcess(pid));
            }
            tracer.root = pid;
            tracer.source.trace(pid, 0)?;
            tracer.start_tracking(pid);
            if tracer.hook(pid)? == 0 {
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
            tracing::info!("tracing pid {pid} ({})", tracer.comm(pid));
            None
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
            tracer.before_exec = Some(pid);
            let child = Child::watch(pid).map_err(|e| SessionError::Io("pidfd_open", e))?;
            held.release()?;
            tracer.live.insert(pid);
            Some(child)
        }
    };
    let root = match &config.target {
        Target::Pid(pid) => *pid,
        Target::Run { .. } => child.as_ref().map_or(0, |c| c.pid),
    };
    let mut child_fd = match &child {
        Some(c) => {
            let fd = c
                .pidfd()
                .try_clone()
                .map_err(|e| SessionError::Io("pidfd", e))?;
            // SAFETY: `fd` is our own duplicate, closed only when the AsyncFd drops.
            Some(
                unsafe { AsyncFd::register(fd) }
                    .map_err(|e| SessionError::Io("pidfd", e.into()))?,
            )
        }
        None => None,
    };
    let mut exit_code = 0;

    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| SessionError::Io("signal", e))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| SessionError::Io("signal", e))?;
    let start = Instant::now();
    let deadline = config.duration.map(|d| start + d);
    let mut next_report = config.interval.map(|i| start + i);
    let mut liveness = tokio::time::interval(Duration::from_secs(1));
    // The kernel side wakes us only every few hundred records (wakeups are dear for the
    // traced threads); the rest is drained on this tick.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(10));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After Ctrl-C in run mode, the command gets a moment to exit by itself.
    let mut grace: Option<Instant> = None;
    const BUDGET: usize = 1 << 16;

    loop {
        let far = Instant::now() + Duration::from_secs(86_400);
        let wake = [deadline, next_report, grace]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(far);
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(|e| SessionError::Io("ring buffer", e))?;
                let n = drain(guard.get_inner_mut(), &mut tracer, BUDGET)?;
                if n < BUDGET { guard.clear_ready(); } else { guard.retain_ready(); }
            }
            ready = async { child_fd.as_ref().expect("guarded").readable().await }, if child_fd.is_some() => {
                if let Ok(mut g) = ready { g.clear_ready(); }
                tracing::debug!("pid {root}: pidfd readable");
                if let Some(code) = child.as_ref().and_then(|c| c.try_wait().ok().flatten()) {
                    exit_code = code;
                    child_fd = None;
                    // Its exit record is in the ring buffer by now: take it before deciding.
                    drain(ring.get_mut(), &mut tracer, usize::MAX)?;
                    if tracer.live.remove(&root) {
                        tracer.retire(root, monotonic_ns());
                    }
                }
            }
            _ = drain_tick.tick() => {
                drain(ring.get_mut(), &mut tracer, BUDGET)?;
            }
            _ = liveness.tick() => {
                tracer.sample_growth();
                let dead: Vec<u32> = tracer.live.iter().copied().filter(|&p| p != root || child.is_none()).filter(|&p| !procfs::is_alive(p)).collect();
                if !dead.is_empty() {
                    drain(ring.get_mut(), &mut tracer, usize::MAX)?;
                    for pid in dead {
                        if tracer.live.contains(&pid) {
                            tracer.retire(pid, monotonic_ns());
                        }
                    }
                }
            }
            _ = interrupt.recv() => {
                if child.is_some() && grace.is_none() && !tracer.live.is_empty() {
                    grace = Some(Instant::now() + Duration::from_secs(2));
                } else {
                    exit_code = if child.is_some() { 130 } else { 0 };
                    break;
                }
            }
            _ = terminate.recv() => {
                exit_code = if child.is_some() { 143 } else { 0 };
                break;
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) || grace.is_some_and(|g| now >= g) {
                    if grace.is_some() { exit_code = 130; }
                    break;
                }
                if let (Some(at), Some(every)) = (next_report, config.interval)
                    && now >= at
                {
                    drain(ring.get_mut(), &mut tracer, usize::MAX)?;
                    let report = tracer.report(false);
                    tracer.sink.emit(&report)?;
                    next_report = Some(at + every);
                }
            }
        }
        let root_done = child_fd.is_none();
        if root_done && tracer.live.is_empty() {
            break;
        }
    }

    drain(ring.get_mut(), &mut tracer, usize::MAX)?;
    if child.is_some() {
        // Stopping early (signal, --duration): a process we started may be held at a gate.
        for &pid in &tracer.live {
            // SAFETY: plain kill(2) on processes we started and gate.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }
    if let Target::Run { .. } = config.target
        && tracer.heap
        && tracer.hooked.is_empty()
        && tracer.tables.totals().allocs == 0
    {
        return Err(SessionError::NoAllocator {
            pid: root,
            comm: tracer.comm(root),
            detail: "it never mapped an object defining malloc and free".into(),
        });
    }
    let report = tracer.report(true);
    tracer.sink.emit(&report)?;
    Ok(Outcome { exit_code })
}
