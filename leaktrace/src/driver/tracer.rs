//! The privileged half of a session: the kernel source and each process's probes, kept in
//! step with what the pipeline learns about processes (exec, fork, loader changes, exit).
use std::{collections::VecDeque, sync::Arc};

use hashbrown::{HashMap, HashSet};
use leaktrace_common::header_flags;

use super::{
    SessionError,
    pipeline::{Alert, Lifecycle, Pipeline},
    reports::KernelStats,
};
use crate::{
    report::{
        OomKill, ProbeSummary, Report, Summary, WalkSummary, annotate,
        model::{HISTORY, Totals},
    },
    source::{AllocatorProbes, Detacher, ProcessProbes, Source},
    targets::{
        host,
        modules::Module,
        pods::{DEFAULT_POD_LOGS, PodIndex},
        procfs,
        seccomp::{KernelRelease, SeccompState, uretprobe_risk},
    },
};

/// Hook latencies kept for the p50 (the latest).
const HOOK_LATENCIES: usize = 4096;

/// The source, the probes, and the pipeline they feed.
pub(super) struct Tracer {
    pub(super) source: Source,
    pub(super) pipeline: Pipeline,
    probes: HashMap<u32, ProcessProbes>,
    detacher: Detacher,
    /// Processes that ever had an allocator hooked.
    pub(super) hooked: HashSet<u32>,
    /// The process the user named (pid mode) or started (run mode).
    pub(super) root: u32,
    /// Allocator probes are attached.
    pub(super) heap: bool,
    pub(super) allocator_probes: AllocatorProbes,
    pub(super) measure_walks: bool,
    /// The node agent: only these processes get allocator (and loader) probes, the rest are
    /// traced by tracepoints alone. `None`: every traced process (`--pid`, `run`).
    pub(super) full: Option<HashSet<u32>>,
    /// The header of the record handled last.
    pub(super) last: Option<leaktrace_common::Header>,
    /// Nanoseconds from each fork or exec record to the process's probes in place.
    hook_latencies: VecDeque<u64>,
    /// Fork and exec records hooked, and the longest latency: over the whole session, where
    /// `hook_latencies` keeps the latest [`HOOK_LATENCIES`] (bounded, for the p50).
    hook_events: u64,
    hook_max_ns: u64,
    /// Links attached over the session.
    links_attached: u64,
    /// Records handled.
    pub(super) records: u64,
    /// The running kernel, when its uretprobes return through a system call seccomp filters
    /// still see (see `targets::seccomp`).
    uretprobe_syscall_filtered: Option<KernelRelease>,
    /// Processes already checked for that risk (warned at most once each).
    seccomp_checked: HashSet<u32>,
    /// The names of the node's pods and containers, for the rows of reports.
    pub(super) pods: PodIndex,
    /// What every report says about the session.
    pub(super) about: About,
    /// What the traced processes held at each report (the last [`HISTORY`]).
    history: VecDeque<Totals>,
}

/// What every report says about the session: what is traced, how leaktrace was started, on
/// which kernel and host.
#[derive(Clone, Debug, Default)]
pub(super) struct About {
    target: Option<String>,
    command: Option<String>,
    kernel: Option<String>,
    host: Option<String>,
}

impl About {
    /// This process's command line, and the kernel and host it runs on; the target is said
    /// with [`About::target`].
    pub(super) fn of_this_process() -> Self {
        let (kernel, host) = host::system().unzip();
        let command = std::env::args_os()
            .map(|a| quoted(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            target: None,
            command: Some(command),
            kernel,
            host,
        }
    }

    /// Says what is traced.
    pub(super) fn target(&mut self, target: String) {
        self.target = Some(target);
    }
}

/// An argument as a shell would need it: quoted when it holds anything but plain characters.
pub(super) fn quoted(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

impl Tracer {
    pub(super) fn new(source: Source, pipeline: Pipeline) -> Self {
        Self {
            source,
            pipeline,
            probes: HashMap::new(),
            detacher: Detacher::default(),
            hooked: HashSet::new(),
            root: 0,
            heap: true,
            allocator_probes: AllocatorProbes::Full,
            measure_walks: false,
            full: None,
            last: None,
            hook_latencies: VecDeque::new(),
            hook_events: 0,
            hook_max_ns: 0,
            links_attached: 0,
            records: 0,
            uretprobe_syscall_filtered: KernelRelease::running()
                .filter(|k| k.uretprobe_syscall_filtered()),
            seccomp_checked: HashSet::new(),
            pods: PodIndex::new(DEFAULT_POD_LOGS, false),
            about: About::of_this_process(),
            history: VecDeque::new(),
        }
    }

    /// Warns, once per process, when its allocator's return probes may kill it: a kernel
    /// whose uretprobes return through a system call its seccomp filter may not allow.
    fn warn_uretprobe_seccomp(&mut self, pid: u32) {
        let Some(kernel) = self.uretprobe_syscall_filtered else {
            return;
        };
        if !self.seccomp_checked.insert(pid) {
            return;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(why) = uretprobe_risk(kernel, SeccompState::from_status(&status)) {
            tracing::warn!(
                "pid {pid}: exact heap tracing may kill this process: {why}; if it dies of \
                 SIGILL or SIGSYS, allow syscall 335 in its seccomp profile or use --mode growth"
            );
        }
    }

    /// Starts exact heap tracing of `pid` (the agent's second tier): returns how many of
    /// its modules have their allocator hooked.
    pub(super) fn promote(&mut self, pid: u32) -> Result<usize, SessionError> {
        if let Some(full) = &mut self.full {
            full.insert(pid);
        }
        self.hook(pid).map(|(n, _)| n)
    }

    /// Ends exact heap tracing of `pid`: its probes go, and its heap tables with them (frees
    /// would no longer be seen); tracepoint tracing goes on.
    pub(super) fn demote(&mut self, pid: u32) {
        if let Some(full) = &mut self.full {
            full.remove(&pid);
        }
        if let Some(probes) = self.probes.remove(&pid) {
            self.detacher.detach(probes);
        }
        self.hooked.remove(&pid);
        self.pipeline.discard_heap(pid);
    }

    /// Detaches every process's probes (on the detach thread): the session is ending.
    pub(super) fn detach_all(&mut self) {
        for (_, probes) in self.probes.drain() {
            self.detacher.detach(probes);
        }
    }

    /// Hands the walker the code of every process whose maps were read since last time.
    fn publish(&mut self) {
        for pid in self.pipeline.take_respaced() {
            if let Some(space) = self.pipeline.space(pid)
                && let Err(e) = self.source.publish_code(space)
            {
                tracing::warn!("pid {pid}: stacks fall back to frame pointers: {e}");
            }
        }
    }

    /// Hooks every allocator and loader the process maps now that is not hooked yet.
    /// Returns how many of the modules it maps have their allocator hooked, and whether a
    /// loader it maps is hooked.
    pub(super) fn hook(&mut self, pid: u32) -> Result<(usize, bool), SessionError> {
        self.publish();
        let Some(space) = self.pipeline.space(pid) else {
            let probes = self.probes.get(&pid);
            return Ok((
                probes.map_or(0, |p| p.allocator_modules.len()),
                probes.is_some_and(|p| !p.loader_modules.is_empty()),
            ));
        };
        let modules = space.modules();
        if self.full.as_ref().is_some_and(|f| !f.contains(&pid)) {
            // The agent's first tier: tracepoints only, nothing to hook, nothing missing.
            return Ok((modules.len(), false));
        }
        // Before the return probes go in: the warning must come out before the process
        // could die of them.
        if self.heap
            && self.allocator_probes != AllocatorProbes::Floor
            && modules.iter().any(|m| m.elf.is_allocator())
        {
            self.warn_uretprobe_seccomp(pid);
        }
        let probes = self.probes.entry(pid).or_default();
        let before = probes.len();
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
        self.links_attached += (probes.len() - before) as u64;
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

    /// Releases what the kernel side holds for a process that is gone.
    fn release(&mut self, pid: u32) {
        self.seccomp_checked.remove(&pid);
        if let Some(probes) = self.probes.remove(&pid) {
            self.detacher.detach(probes);
        }
        self.source.untrace(pid);
        self.source.unpublish_code(pid);
    }

    /// Forgets a process: keeps what it held at exit, releases its probes.
    pub(super) fn retire(&mut self, pid: u32, ts_ns: u64) {
        self.pipeline.retire(pid, ts_ns);
        self.release(pid);
    }

    /// Applies one ring-buffer record. Gated processes are released afterwards whatever
    /// happened. Returns an alert to act on at once.
    pub(super) fn handle(&mut self, bytes: &[u8]) -> Result<Option<Alert>, SessionError> {
        self.records += 1;
        if self.is_from_demoted(bytes) {
            self.last = None;
            return Ok(None);
        }
        let applied = self.pipeline.apply(bytes);
        self.last = applied.hdr;
        let Some(hdr) = applied.hdr else {
            return Ok(None);
        };
        let result = match applied.lifecycle {
            Some(Lifecycle::Exec(pid)) => {
                let result = self.on_exec(pid, hdr.ts_ns);
                self.hooked_after(pid, hdr.ts_ns);
                result
            }
            Some(Lifecycle::Loader(pid)) => self.hook(pid).map(drop),
            Some(Lifecycle::Fork(child)) => {
                if let Err(e) = self.hook(child) {
                    tracing::warn!("pid {child} (forked) cannot be traced: {e}");
                }
                self.hooked_after(child, hdr.ts_ns);
                Ok(())
            }
            Some(Lifecycle::Exit(pid)) => {
                self.release(pid);
                Ok(())
            }
            None => {
                self.publish();
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
        result.map(|()| applied.alert)
    }

    /// True for an allocator record of a process not (or no longer) traced exactly: a
    /// demoted process's links are closed off the event loop, and records already in the
    /// ring buffer arrive after it; they would rebuild the heap rows its demotion dropped.
    fn is_from_demoted(&self, bytes: &[u8]) -> bool {
        let Some(full) = &self.full else {
            return false;
        };
        let Ok(hdr) = crate::decode::peek_header(bytes) else {
            return false;
        };
        matches!(
            hdr.kind,
            leaktrace_common::kind::ALLOC | leaktrace_common::kind::FREE
        ) && !full.contains(&hdr.pid)
    }

    /// Notes how long after its fork or exec record (at `ts_ns`) the probes of `pid` are in
    /// place.
    fn hooked_after(&mut self, pid: u32, ts_ns: u64) {
        let ns = crate::source::ktime_ns().saturating_sub(ts_ns);
        if self.hook_latencies.len() == HOOK_LATENCIES {
            self.hook_latencies.pop_front();
        }
        self.hook_latencies.push_back(ns);
        self.hook_events += 1;
        self.hook_max_ns = self.hook_max_ns.max(ns);
        tracing::debug!(
            "pid {pid}: probes in place {} µs after its record",
            ns / 1000
        );
    }

    fn on_exec(&mut self, pid: u32, ts_ns: u64) -> Result<(), SessionError> {
        // Probes stay across exec. A uprobe is placed on a file, scoped to the process, so a
        // probe on a module the new image maps again (libc, the loader) is exactly the probe
        // the new image needs, and `hook` will not attach a second one; a probe on a module
        // it does not map never fires. Detaching them instead takes ~90 ms a probe (see
        // `Detacher`), and until that is done the new image would run under both the old
        // probes and the new: every free reported twice.
        let (hooked, has_loader) = self.hook(pid)?;
        if self.full.is_some() {
            // The agent traces every process, hookable or not.
            return Ok(());
        }
        if hooked == 0 && !has_loader && procfs::is_alive(pid) {
            // A static executable without malloc: nothing will ever be hooked.
            if pid != self.root {
                tracing::warn!(
                    "pid {pid} ({}) exec'd a program without a hookable allocator; not traced",
                    self.pipeline.comm(pid)
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

    /// What only the kernel side knows, now.
    fn kernel_stats(&self) -> KernelStats {
        use leaktrace_common::counter;
        KernelStats {
            lost: self
                .source
                .drops()
                .into_iter()
                .map(|(cause, n)| (cause.to_owned(), n))
                .collect(),
            filtered_frees: self.source.counter(counter::FILTERED_FREES),
            thread_exit_frees: self.source.counter(counter::THREAD_EXIT_FREES),
            stack_cache_hits: self.source.counter(counter::WALK_CACHE_HITS),
            stack_walks: self.source.counter(counter::WALKS),
            probes: Some(self.probe_summary()),
            walks: self.measure_walks.then(|| {
                let w = self.source.walk_stats();
                let per = |x: u64| {
                    if w.walks == 0 {
                        0.0
                    } else {
                        x as f64 / w.walks as f64
                    }
                };
                WalkSummary {
                    walks: w.walks,
                    frames_per_walk: per(w.frames),
                    ns_per_walk: per(w.ns),
                    unwind_rows: self.source.unwind_rows_used().0 as u64,
                    bpf_map_bytes: crate::source::map_memory_bytes(),
                }
            }),
        }
    }

    fn probe_summary(&self) -> ProbeSummary {
        let mut sorted: Vec<u64> = self.hook_latencies.iter().copied().collect();
        sorted.sort_unstable();
        let us = |ns: Option<&u64>| ns.map_or(0, |ns| ns / 1000);
        ProbeSummary {
            attach: self.source.attach_mode().name().to_owned(),
            hits: self.source.counter(leaktrace_common::counter::PROBE_HITS),
            hook_events: self.hook_events,
            hook_latency_us_p50: us(sorted.get(sorted.len() / 2)),
            hook_latency_us_max: self.hook_max_ns / 1000,
            links_attached: self.links_attached,
        }
    }

    /// Links attached now, and the file names of the modules whose allocator they hook.
    pub(super) fn attached(&self) -> (usize, Vec<String>) {
        let links = self.probes.values().map(ProcessProbes::len).sum();
        let mut modules: Vec<String> = self
            .probes
            .values()
            .flat_map(|p| &p.allocator_modules)
            .map(|m| m.path.rsplit('/').next().unwrap_or(&m.path).to_owned())
            .collect();
        modules.sort();
        modules.dedup();
        (links, modules)
    }

    /// A report of everything so far.
    pub(super) fn report(&mut self, is_final: bool) -> Report {
        self.report_with(is_final, |_| {})
    }

    /// A report of everything so far, with the driver's own sections added by `add`, then
    /// its rows' pods and containers named.
    pub(super) fn report_with(&mut self, is_final: bool, add: impl FnOnce(&mut Report)) -> Report {
        let kernel = self.kernel_stats();
        let mut report = self.pipeline.report(is_final, &kernel);
        add(&mut report);
        let pods = &mut self.pods;
        annotate::name_pods(&mut report, &mut |uid, id| pods.lookup(uid, id));
        self.describe(&mut report.summary);
        report
    }

    /// Adds what every report says about the session, and the totals so far.
    fn describe(&mut self, summary: &mut Summary) {
        let about = self.about.clone();
        summary.target = about.target;
        summary.command = about.command;
        summary.kernel = about.kernel;
        summary.host = about.host;
        // An alert's report may come at the same moment as a periodic one: keep the later.
        if self
            .history
            .back()
            .is_some_and(|last| last.t_s >= summary.elapsed_s)
        {
            self.history.pop_back();
        }
        self.history.push_back(Totals::of(summary));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        summary.history = self.history.iter().copied().collect();
    }

    /// An OOM kill the pipeline just saw, its pod and container named.
    pub(super) fn named(&mut self, kill: &OomKill) -> OomKill {
        let mut kill = kill.clone();
        let pods = &mut self.pods;
        annotate::name_oom_kill(&mut kill, &mut |uid, id| pods.lookup(uid, id));
        kill
    }
}
