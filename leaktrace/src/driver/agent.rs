//! The node agent, `leaktrace agent`: every process on the node in the first tier, exact
//! heap tracing for a few in the second, reports on a timer and on demand.
//!
//! - **Tier 1**, every process but our own, no traps: the tracepoint hooks run node-wide
//!   (`features::NODE`): pages each stack makes resident and keeps (growth), descriptors,
//!   temp files, OOM kills, exits. A process is adopted (its name, executable, cgroup and
//!   maps read once) when the agent starts, or at its first record.
//! - **Tier 2**, exact heap tracing with allocator probes, for the processes a `--full`
//!   [`Selector`] names, and for the `--full-auto N` whose growth is steepest and steady over
//!   a window ([`Promoter`]); those are demoted when their time budget runs out. Every
//!   promotion and demotion is logged and listed in the report ([`Tier2`]).
//!
//! The agent adds policy and changes no stage: it is the session's `Tracer` and `Pipeline`
//! with the growth tables kept apart from the heap's.
use std::{collections::VecDeque, fmt, net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use hashbrown::{HashMap, HashSet};
use leaktrace_common::kind;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use super::{
    AsyncRings, FastExit, Outcome, Rings, SessionConfig, SessionError, Target, on_alert,
    serve::{self, Publisher},
    session,
    sink::Sink,
    tracer::Tracer,
};
use crate::{
    export::metrics::AgentStats,
    report::{
        Owner, Report, Tier2,
        verdict::{self, Sample},
    },
    symbolize::stacks::StackStore,
    targets::{preflight, procfs},
};

/// Which processes get exact heap tracing: `pid=N`, `comm=NAME`, `exe=PATH`,
/// `cgroup=PATH` (the cgroup or one below it) or `container=ID-PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// One process.
    Pid(u32),
    /// Processes with this command name.
    Comm(String),
    /// Processes running this executable (as `/proc/PID/exe` names it).
    Exe(String),
    /// Processes in this cgroup or below it.
    Cgroup(String),
    /// Processes in containers whose id starts with this.
    Container(String),
}

impl FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (key, value) = s.split_once('=').ok_or_else(|| {
            format!("`{s}`: expected KEY=VALUE with KEY one of pid, comm, exe, cgroup, container")
        })?;
        if value.is_empty() {
            return Err(format!("`{s}`: empty {key}"));
        }
        Ok(match key {
            "pid" => Selector::Pid(
                value
                    .parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| format!("`{s}`: `{value}` is not a pid"))?,
            ),
            "comm" => Selector::Comm(value.to_owned()),
            "exe" => Selector::Exe(value.to_owned()),
            "cgroup" => Selector::Cgroup(value.trim_end_matches('/').to_owned()),
            "container" => {
                if !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("`{s}`: a container id is hexadecimal"));
                }
                Selector::Container(value.to_ascii_lowercase())
            }
            _ => {
                return Err(format!(
                    "`{s}`: unknown key `{key}` (one of pid, comm, exe, cgroup, container)"
                ));
            }
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Pid(p) => write!(f, "pid={p}"),
            Selector::Comm(c) => write!(f, "comm={c}"),
            Selector::Exe(e) => write!(f, "exe={e}"),
            Selector::Cgroup(c) => write!(f, "cgroup={c}"),
            Selector::Container(c) => write!(f, "container={c}"),
        }
    }
}

impl Selector {
    /// Whether process `pid`, as `owner` describes it, is selected.
    pub fn matches(&self, pid: u32, owner: &Owner) -> bool {
        match self {
            Selector::Pid(p) => *p == pid,
            Selector::Comm(c) => owner.comm == *c,
            Selector::Exe(e) => owner.exe.as_deref() == Some(e.as_str()),
            Selector::Cgroup(c) => owner.cgroup.as_deref().is_some_and(|g| {
                g.strip_prefix(c.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }),
            Selector::Container(prefix) => owner
                .container_id
                .as_deref()
                .is_some_and(|id| id.starts_with(prefix.as_str())),
        }
    }
}

/// The agent's own settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Processes traced exactly for as long as they live.
    pub full: Vec<Selector>,
    /// Promote this many processes at most, the steepest steady growers (0: none).
    pub full_auto: usize,
    /// Growth must be steady over this long to promote.
    pub window: Duration,
    /// A promoted process is demoted after this long.
    pub budget: Duration,
    /// Serve reports over HTTP here (`None`: not at all).
    pub listen: Option<SocketAddr>,
    /// Outstanding heap blocks kept at most (tier 2, all processes together).
    pub max_heap_blocks: usize,
    /// Grown pages kept at most (tier 1, node-wide).
    pub max_growth_pages: usize,
}

/// Growth under this rate never promotes (bytes a second): a few pages a second is noise.
pub const MIN_PROMOTE_RATE: f64 = 16.0 * 1024.0;
/// How straight growth must be to promote: R² of its least-squares line.
pub const MIN_PROMOTE_FIT: f64 = 0.8;
/// Samples a [`Promoter`] keeps over a window.
const SAMPLES_PER_WINDOW: usize = 12;

/// Each process's growth over the last window, and which grow steepest and steadiest.
#[derive(Debug)]
pub struct Promoter {
    window_s: f64,
    samples: HashMap<u32, VecDeque<Sample>>,
}

/// A process whose growth could promote it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// The process.
    pub pid: u32,
    /// Growth, bytes a second (least squares over the window).
    pub rate: f64,
    /// R² of that line.
    pub fit: f64,
}

impl Promoter {
    /// Judges growth over `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window_s: window.as_secs_f64().max(1e-3),
            samples: HashMap::new(),
        }
    }

    /// How often to [`sample`](Self::sample).
    pub fn every(&self) -> Duration {
        Duration::from_secs_f64(self.window_s / SAMPLES_PER_WINDOW as f64)
    }

    /// Notes that `pid` held `bytes` at `t_s`.
    pub fn sample(&mut self, pid: u32, t_s: f64, bytes: u64) {
        let h = self.samples.entry(pid).or_default();
        h.push_back(Sample {
            t_s,
            value: bytes,
            oldest_s: 0.0,
        });
        while h.len() > SAMPLES_PER_WINDOW + 1 {
            h.pop_front();
        }
    }

    /// Forgets a process.
    pub fn forget(&mut self, pid: u32) {
        self.samples.remove(&pid);
    }

    /// The processes growing at least [`MIN_PROMOTE_RATE`] along a line at least
    /// [`MIN_PROMOTE_FIT`] straight over a whole window, steepest first.
    pub fn candidates(&mut self) -> Vec<Candidate> {
        let window_s = self.window_s;
        let mut out: Vec<Candidate> = self
            .samples
            .iter_mut()
            .filter_map(|(&pid, h)| {
                let (first, last) = (h.front()?.t_s, h.back()?.t_s);
                if last - first < window_s * 0.99 || h.len() < 3 {
                    return None;
                }
                // A flat line fits with slope 0: under MIN_PROMOTE_RATE like any other.
                let (rate, fit) = verdict::fit(h.make_contiguous())?;
                (rate >= MIN_PROMOTE_RATE && fit >= MIN_PROMOTE_FIT).then_some(Candidate {
                    pid,
                    rate,
                    fit,
                })
            })
            .collect();
        out.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(a.pid.cmp(&b.pid)));
        out
    }
}

/// What a process in the second tier is there for.
#[derive(Debug)]
struct Active {
    /// Its entry in the history.
    entry: usize,
    /// When a promotion's budget runs out (`None`: selected, traced while it lives).
    until: Option<Instant>,
    /// When an allocator probe last fired for it.
    last_fired: Instant,
    /// Its CPU time when last looked at.
    cpu_ticks: Option<u64>,
    /// Already said its probes are silent.
    silence_told: bool,
}

/// Why a process leaves the second tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// It is gone.
    Exited,
    /// Its promotion's time budget ran out: demoted, never promoted again.
    BudgetSpent,
}

impl End {
    fn why(self) -> &'static str {
        match self {
            End::Exited => "exited",
            End::BudgetSpent => "its promotion's time budget ran out",
        }
    }
}

/// Entries of tier-2 history kept (the oldest ended ones go first).
const TIER2_HISTORY: usize = 256;
/// Notices kept for reports; later ones are logged and counted only.
const MAX_NOTICES: usize = 64;
/// A selected process that uses CPU with no allocator probe firing this long is reported.
const SILENCE: Duration = Duration::from_secs(10);

/// The agent's policy state: who is in the second tier, why, and since when.
struct Policy {
    config: AgentConfig,
    started: Instant,
    history: Vec<Tier2>,
    active: HashMap<u32, Active>,
    promoter: Promoter,
    /// Processes that were promoted once and demoted: not promoted again.
    spent: HashSet<u32>,
    /// Selectors that matched some process.
    matched: Vec<bool>,
    notices: Vec<String>,
    /// Notices past [`MAX_NOTICES`], logged only.
    notices_dropped: u64,
    self_pid: u32,
    /// Ended tier-2 entries dropped from the history (bounded).
    evicted_history: u64,
}

impl Policy {
    fn new(config: AgentConfig) -> Self {
        let promoter = Promoter::new(config.window);
        let matched = vec![false; config.full.len()];
        Self {
            config,
            started: Instant::now(),
            history: Vec::new(),
            active: HashMap::new(),
            promoter,
            spent: HashSet::new(),
            matched,
            notices: Vec::new(),
            notices_dropped: 0,
            self_pid: std::process::id(),
            evicted_history: 0,
        }
    }

    fn since_start(&self, at: Instant) -> f64 {
        at.duration_since(self.started).as_secs_f64()
    }

    fn notice(&mut self, text: String) {
        tracing::warn!("{text}");
        if self.notices.len() < MAX_NOTICES {
            self.notices.push(text);
        } else {
            self.notices_dropped += 1;
        }
    }

    /// Starts tracking a process found on the node (at start, or at its first record), and
    /// promotes it if a selector names it.
    fn adopt(&mut self, tracer: &mut Tracer, pid: u32) {
        if pid == self.self_pid || tracer.pipeline.is_tracked(pid) || !procfs::has_exe(pid) {
            return;
        }
        tracer.pipeline.adopt(pid);
        // Its code now, so that its first stacks are walked with its unwind tables (each
        // module's table is compiled once, for every process that maps it).
        match tracer.pipeline.ensure_space(pid) {
            Ok(()) => {
                if let Err(e) = tracer.hook(pid) {
                    tracing::debug!("pid {pid}: {e}");
                }
            }
            Err(e) => tracing::debug!("pid {pid}: cannot read maps: {e}"),
        }
        self.select(tracer, pid);
    }

    /// Promotes `pid` if a selector names it.
    fn select(&mut self, tracer: &mut Tracer, pid: u32) {
        if self.active.contains_key(&pid) {
            return;
        }
        let Some(owner) = tracer.pipeline.owner(pid).cloned() else {
            return;
        };
        let Some(i) = self.config.full.iter().position(|s| s.matches(pid, &owner)) else {
            return;
        };
        self.matched[i] = true;
        let reason = format!("selected by {}", self.config.full[i]);
        self.promote(tracer, pid, owner, reason, None);
    }

    fn promote(
        &mut self,
        tracer: &mut Tracer,
        pid: u32,
        owner: Owner,
        reason: String,
        until: Option<Instant>,
    ) {
        if let Err(e) = tracer.pipeline.ensure_space(pid) {
            tracing::warn!(
                "pid {pid} ({}): {reason}, but its maps cannot be read: {e}",
                owner.comm
            );
            return;
        }
        match tracer.promote(pid) {
            Ok(0) => {
                tracing::info!(
                    "pid {pid} ({}): {reason}, but it maps no allocator leaktrace can hook; \
                     tier 1 only",
                    owner.comm
                );
                if let Some(full) = &mut tracer.full {
                    full.remove(&pid);
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(
                    "pid {pid} ({}): {reason}, but cannot be traced: {e}",
                    owner.comm
                );
                tracer.demote(pid);
                return;
            }
        }
        let now = Instant::now();
        tracing::info!(
            "pid {pid} ({}): exact heap tracing on: {reason}",
            owner.comm
        );
        if self.history.len() >= TIER2_HISTORY
            && let Some(i) = self.history.iter().position(|t| t.until_s.is_some())
        {
            self.history.remove(i);
            self.evicted_history += 1;
            for a in self.active.values_mut() {
                if a.entry > i {
                    a.entry -= 1;
                }
            }
        }
        self.history.push(Tier2 {
            pid,
            owner,
            reason,
            since_s: self.since_start(now),
            until_s: None,
            end: None,
        });
        self.active.insert(
            pid,
            Active {
                entry: self.history.len() - 1,
                until,
                last_fired: now,
                cpu_ticks: procfs::cpu_ticks(pid),
                silence_told: false,
            },
        );
    }

    /// Ends a process's second tier, saying why.
    fn end(&mut self, tracer: &mut Tracer, pid: u32, end: End) {
        let Some(a) = self.active.remove(&pid) else {
            return;
        };
        let why = end.why();
        let now = self.since_start(Instant::now());
        if let Some(t) = self.history.get_mut(a.entry) {
            t.until_s = Some(now);
            t.end = Some(why.to_owned());
            tracing::info!(
                "pid {pid} ({}): exact heap tracing off: {why}",
                t.owner.comm
            );
        }
        match end {
            End::Exited => {
                if let Some(full) = &mut tracer.full {
                    full.remove(&pid);
                }
            }
            End::BudgetSpent => {
                tracer.demote(pid);
                self.spent.insert(pid);
            }
        }
    }

    /// An allocator probe of `pid` fired.
    fn fired(&mut self, pid: u32) {
        if let Some(a) = self.active.get_mut(&pid) {
            a.last_fired = Instant::now();
        }
    }

    /// Once a second: demotes what ran out of budget, says which selected processes use CPU
    /// while their probes stay silent.
    fn tick(&mut self, tracer: &mut Tracer) {
        let now = Instant::now();
        let expired: Vec<u32> = self
            .active
            .iter()
            .filter(|(_, a)| a.until.is_some_and(|u| now >= u))
            .map(|(&p, _)| p)
            .collect();
        for pid in expired {
            self.end(tracer, pid, End::BudgetSpent);
        }
        let mut silent = Vec::new();
        for (&pid, a) in &mut self.active {
            let cpu = procfs::cpu_ticks(pid);
            let busy = matches!((a.cpu_ticks, cpu), (Some(before), Some(now)) if now > before);
            a.cpu_ticks = cpu;
            if busy && !a.silence_told && now.duration_since(a.last_fired) >= SILENCE {
                a.silence_told = true;
                silent.push(pid);
            }
        }
        for pid in silent {
            let comm = tracer.pipeline.comm(pid);
            self.notice(format!(
                "pid {pid} ({comm}) used CPU but none of its allocator probes fired for {}s: \
                 it may allocate through an allocator leaktrace does not hook",
                SILENCE.as_secs()
            ));
        }
    }

    /// Samples every process's growth; promotes the steepest steady growers up to
    /// `--full-auto`.
    fn sample_and_promote(&mut self, tracer: &mut Tracer) {
        let t = self.since_start(Instant::now());
        for pid in tracer.pipeline.tracked().collect::<Vec<_>>() {
            let (_, bytes) = tracer.pipeline.growth_of(pid);
            self.promoter.sample(pid, t, bytes);
        }
        let auto = self.active.values().filter(|a| a.until.is_some()).count();
        let room = self.config.full_auto.saturating_sub(auto);
        if room == 0 {
            return;
        }
        let picks: Vec<Candidate> = self
            .promoter
            .candidates()
            .into_iter()
            .filter(|c| !self.active.contains_key(&c.pid) && !self.spent.contains(&c.pid))
            .take(room)
            .collect();
        for c in picks {
            let Some(owner) = tracer.pipeline.owner(c.pid).cloned() else {
                continue;
            };
            let reason = format!(
                "grew {}/s steadily over {}s (fit {:.2})",
                crate::export::table::bytes(c.rate as u64),
                self.config.window.as_secs(),
                c.fit
            );
            let until = Some(Instant::now() + self.config.budget);
            self.promote(tracer, c.pid, owner, reason, until);
        }
    }

    /// The process is gone.
    fn gone(&mut self, tracer: &mut Tracer, pid: u32) {
        self.end(tracer, pid, End::Exited);
        self.promoter.forget(pid);
        self.spent.remove(&pid);
    }

    /// Adds the agent's own sections to a report.
    fn annotate(&self, report: &mut Report) {
        report.tier2 = self.history.clone();
        report.notices = self.notices.clone();
        if self.notices_dropped > 0 {
            report.notices.push(format!(
                "{} more notices were logged only (the report keeps {MAX_NOTICES})",
                self.notices_dropped
            ));
        }
    }
}

/// Stacks the agent keeps at most (~256 B each): past it new stacks are counted as lost
/// (`stack_table_full`) until processes exit.
const AGENT_STACKS: usize = 1 << 18;

/// Runs the agent until SIGTERM or SIGINT (or `--duration`).
pub async fn run(config: SessionConfig) -> Result<Outcome, SessionError> {
    let Target::Node(agent) = &config.target else {
        unreachable!("agent::run runs the node target");
    };
    preflight::check()?;
    // Bound first: a port that is taken fails before anything is loaded.
    let server = agent.listen.map(serve::bind).transpose()?;
    let (mut tracer, rings, _recorder) = session::setup(&config)?;
    tracer.full = Some(HashSet::new());
    tracer.about.target("every process on the node".to_owned());
    tracer.pipeline.keep_growth_apart();
    tracer.pipeline.forget_exited();
    tracer.pipeline.stacks = StackStore::with_cap(AGENT_STACKS);
    tracer
        .pipeline
        .cap_tables(agent.max_heap_blocks, agent.max_growth_pages);
    let sink = Sink::of(&config);
    let _fast_exit = FastExit;
    let mut ring = AsyncRings::register(rings)?;
    let mut policy = Policy::new(agent.clone());
    let (publisher, snapshots) = serve::channel();
    if let Some(server) = server {
        tracing::info!("agent: serving on http://{}", server.local_addr());
        tokio::spawn(async move {
            if let Err(e) = server.run(snapshots, serve::ServeOptions::default()).await {
                tracing::error!("agent: the HTTP server stopped: {e}");
            }
        });
    }
    let pids = procfs::all_pids().map_err(|e| SessionError::Io("/proc", e))?;
    for &pid in &pids {
        policy.adopt(&mut tracer, pid);
    }
    tracing::info!(
        "agent: watching {} processes, {} traced exactly",
        tracer.pipeline.tracked().count(),
        policy.active.len()
    );
    for (s, matched) in policy.config.full.iter().zip(&policy.matched) {
        if !matched {
            tracing::warn!("--full {s} matches no process yet; watching for one");
        }
    }
    publish(&mut tracer, &policy, &publisher);
    agent_loop(
        &config,
        &mut tracer,
        &mut policy,
        &sink,
        &mut ring,
        &publisher,
    )
    .await?;
    drain(&mut ring.get_mut(), &mut tracer, &mut policy, &sink)?;
    // Stopping: the probes go now, while the final report is built (symbolizing a whole
    // node's rows takes seconds on a busy one; SIGTERM owes the node its probes within 2 s).
    tracer.detach_all();
    let report = tracer.report_with(true, |r| policy.annotate(r));
    sink.emit(&report)?;
    Ok(Outcome { exit_code: 0 })
}

async fn agent_loop(
    config: &SessionConfig,
    tracer: &mut Tracer,
    policy: &mut Policy,
    sink: &Sink,
    ring: &mut AsyncRings,
    publisher: &Publisher,
) -> Result<(), SessionError> {
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| SessionError::Io("signal", e))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| SessionError::Io("signal", e))?;
    let deadline = config.duration.map(|d| Instant::now() + d);
    let every = config.interval.unwrap_or(Duration::from_secs(10));
    let mut report_tick = tokio::time::interval_at(Instant::now() + every, every);
    // Records come with a wakeup every few hundred (and lifecycle ones at once); the rest
    // wait for this tick. An agent can wait longer than a session: fewer wakeups when idle.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(50));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut trim_tick = tokio::time::interval(TRIM_EVERY);
    let mut sample_tick = tokio::time::interval(policy.promoter.every());
    sample_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.events.readable_mut() => {
                let mut guard = guard.map_err(|e| SessionError::Io("ring buffer", e))?;
                let mut rings = Rings { events: guard.get_inner_mut(), heap: ring.heap.get_mut() };
                if drain(&mut rings, tracer, policy, sink)? < BATCH {
                    guard.clear_ready();
                } else {
                    guard.retain_ready();
                }
            }
            guard = ring.heap.readable_mut() => {
                let mut guard = guard.map_err(|e| SessionError::Io("ring buffer", e))?;
                let mut rings = Rings { events: ring.events.get_mut(), heap: guard.get_inner_mut() };
                if drain(&mut rings, tracer, policy, sink)? < BATCH {
                    guard.clear_ready();
                } else {
                    guard.retain_ready();
                }
            }
            _ = drain_tick.tick() => {
                drain(&mut ring.get_mut(), tracer, policy, sink)?;
                tracer.source.flush_log();
            }
            _ = second.tick() => {
                retire_dead(tracer, policy, &mut ring.get_mut(), sink)?;
                policy.tick(tracer);
            }
            _ = trim_tick.tick() => give_back_freed_memory(),
            _ = sample_tick.tick() => policy.sample_and_promote(tracer),
            _ = report_tick.tick() => {
                drain(&mut ring.get_mut(), tracer, policy, sink)?;
                let report = publish(tracer, policy, publisher);
                if sink.output.is_some() {
                    sink.emit(&report)?;
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            () = tokio::time::sleep_until(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400))) => {
                if deadline.is_some() { break; }
            }
        }
    }
    Ok(())
}

/// How often the agent hands freed heap memory back to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Hands the heap's free pages back to the kernel. The agent's heap has transient peaks
/// (compiling a new module's unwind table: tens of MiB for a large one; a report) that
/// glibc keeps mapped; without this the resident size ratchets up to the highest peak
/// and stays, which is what a DaemonSet's memory limit sees.
fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Builds a report and hands it to the HTTP server.
fn publish(tracer: &mut Tracer, policy: &Policy, publisher: &Publisher) -> Arc<Report> {
    let report = Arc::new(tracer.report_with(false, |r| policy.annotate(r)));
    let tables = tracer.pipeline.table_sizes();
    let stats = AgentStats {
        tracked_processes: Some(tables.processes as u64),
        tier2_processes: Some(policy.active.len() as u64),
        promotions: Some(policy.history.len() as u64 + policy.evicted_history),
        heap_blocks: Some(tables.heap_blocks as u64),
        growth_pages: Some(tables.growth_pages as u64),
        stacks: Some(tables.stacks as u64),
    };
    publisher.publish(report.clone(), stats);
    report
}

/// Records drained in one go.
const BATCH: usize = 4096;

/// Drains the ring buffers ([`super::drain_in_order`]): applies each record, adopts the
/// processes it names for the first time, notes which probes fire.
fn drain(
    rings: &mut Rings<'_>,
    tracer: &mut Tracer,
    policy: &mut Policy,
    sink: &Sink,
) -> Result<usize, SessionError> {
    let mut fresh: Vec<u32> = Vec::new();
    // A bounded batch, so timers and signals are served under a flood of records.
    let n = super::drain_in_order(rings, BATCH, |item| {
        apply(tracer, policy, sink, item, &mut fresh)
    })?;
    fresh.sort_unstable();
    fresh.dedup();
    for pid in fresh {
        policy.adopt(tracer, pid);
    }
    Ok(n)
}

/// Applies one record, and what it means for the tiers.
fn apply(
    tracer: &mut Tracer,
    policy: &mut Policy,
    sink: &Sink,
    item: &[u8],
    fresh: &mut Vec<u32>,
) -> Result<(), SessionError> {
    if let Some(alert) = tracer.handle(item)? {
        on_alert(tracer, sink, &alert);
    }
    let Some(hdr) = tracer.last else {
        return Ok(());
    };
    match hdr.kind {
        kind::ALLOC | kind::FREE => policy.fired(hdr.pid),
        kind::EXIT => {
            policy.gone(tracer, hdr.pid);
            return Ok(());
        }
        kind::EXEC => {
            // A new image: a selector may name it now.
            if policy.active.contains_key(&hdr.pid) {
                return Ok(());
            }
            policy.select(tracer, hdr.pid);
        }
        _ => {}
    }
    if !tracer.pipeline.is_tracked(hdr.pid) && hdr.pid != policy.self_pid {
        fresh.push(hdr.pid);
    }
    Ok(())
}

/// Retires the processes that are gone without an exit record (they died before we
/// adopted them, or their record was lost).
fn retire_dead(
    tracer: &mut Tracer,
    policy: &mut Policy,
    ring: &mut Rings<'_>,
    sink: &Sink,
) -> Result<(), SessionError> {
    let mut pids: Vec<u32> = tracer.pipeline.tracked().collect();
    pids.sort_unstable();
    tracer.pipeline.tick(&pids);
    let dead: Vec<u32> = pids.into_iter().filter(|&p| !procfs::is_alive(p)).collect();
    if dead.is_empty() {
        return Ok(());
    }
    drain(ring, tracer, policy, sink)?;
    for pid in dead {
        if tracer.pipeline.is_tracked(pid) {
            let now = tracer.pipeline.now_ns();
            tracer.retire(pid, now);
            policy.gone(tracer, pid);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(comm: &str, exe: &str, cgroup: &str, container: Option<&str>) -> Owner {
        Owner {
            comm: comm.into(),
            exe: Some(exe.into()),
            cgroup: Some(cgroup.into()),
            container_id: container.map(str::to_owned),
            container_runtime: container.map(|_| "podman"),
            ..Owner::default()
        }
    }

    #[test]
    fn selectors_parse_and_match() {
        let o = owner(
            "api",
            "/usr/bin/api",
            "/machine.slice/libpod-abc123.scope",
            Some("abc123def"),
        );
        let yes = [
            "pid=42",
            "comm=api",
            "exe=/usr/bin/api",
            "cgroup=/machine.slice",
            "cgroup=/machine.slice/libpod-abc123.scope/",
            "container=ABC1",
        ];
        for s in yes {
            let sel: Selector = s.parse().unwrap();
            assert!(sel.matches(42, &o), "{s}");
        }
        let no = [
            "pid=43",
            "comm=ap",
            "exe=/usr/bin",
            "cgroup=/machine",
            "container=bc",
        ];
        for s in no {
            let sel: Selector = s.parse().unwrap();
            assert!(!sel.matches(42, &o), "{s}");
        }
        assert!(!Selector::Container("a".into()).matches(1, &Owner::named("x")));
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        for (s, needle) in [
            ("comm", "KEY=VALUE"),
            ("pid=x", "not a pid"),
            ("pid=0", "not a pid"),
            ("comm=", "empty comm"),
            ("container=zz", "hexadecimal"),
            ("user=root", "unknown key `user`"),
        ] {
            let err = s.parse::<Selector>().unwrap_err();
            assert!(err.contains(needle), "{s}: {err}");
        }
    }

    #[test]
    fn steady_steep_growth_promotes_and_a_plateau_does_not() {
        let mut p = Promoter::new(Duration::from_secs(60));
        for i in 0..=12 {
            let t = f64::from(i) * 5.0;
            // 100 KiB/s, straight.
            p.sample(1, t, 1_000_000 + (t * 102_400.0) as u64);
            // 1 MiB/s for 10 s, then flat: mostly a plateau.
            p.sample(2, t, (t.min(10.0) * 1_048_576.0) as u64);
            // 20 KiB/s with noise.
            let noise = if i % 2 == 0 { 30_000 } else { 0 };
            p.sample(3, t, (t * 20_480.0) as u64 + noise);
            // Slow: 1 KiB/s.
            p.sample(4, t, (t * 1024.0) as u64);
        }
        let c = p.candidates();
        let pids: Vec<u32> = c.iter().map(|c| c.pid).collect();
        assert_eq!(pids, [1, 3], "{c:?}");
        assert!((c[0].rate - 102_400.0).abs() < 1.0);
        assert!(c[0].fit > 0.999);
    }

    #[test]
    fn growth_shorter_than_the_window_does_not_promote() {
        let mut p = Promoter::new(Duration::from_secs(60));
        for i in 0..6 {
            let t = f64::from(i) * 5.0;
            p.sample(1, t, (t * 1e6) as u64);
        }
        assert!(p.candidates().is_empty());
        p.forget(1);
        assert!(p.samples.is_empty());
    }
}
