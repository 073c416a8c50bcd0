//! A finished report: the tables at one moment, stacks symbolized and trimmed, rows merged
//! and ranked. Writers ([`crate::export`]) render it; they know nothing of how it was gathered.
use std::collections::VecDeque;

use hashbrown::HashMap;
use serde::Serialize;

use crate::{
    symbolize::stacks::StackStore,
    symbolize::{SymFrame, Symbols, runtime_owned, trim},
    track::fd::{FdKind, FdSnapshot},
    track::heap::StackId,
    track::heap::{Snapshot, StackRow},
};

/// Session-wide figures (the JSON `summary`).
///
/// Blocks the C or C++ runtime allocated for itself and releases at exit (stdio buffers,
/// locale data, thread descriptors, ...; see [`crate::symbolize::runtime_owned`]) are counted
/// apart, in `runtime_*` and the report's `runtime` list, as valgrind leaves them out of "in
/// use at exit". Everything else holds exactly: `allocs - frees == outstanding_count` when no
/// event was lost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Successful allocations of the program (realloc counts as one).
    pub allocs: u64,
    /// Of those, how many were freed (or moved by realloc).
    pub frees: u64,
    /// Blocks still outstanding in live processes plus those in use when traced processes
    /// exited, regardless of `--min-age`.
    pub outstanding_count: u64,
    pub outstanding_bytes: u64,
    /// Frees of blocks allocated before tracing started (or whose allocation was lost).
    pub unmatched_frees: u64,
    /// Events the kernel side could not deliver; non-zero means counts are lower bounds.
    pub lost_events: u64,
    /// Stacks whose frames could not be delivered (counts stay exact; the frames are sent
    /// again the next time the stack allocates).
    pub lost_stacks: u64,
    /// Losses by cause (`stack_*` causes are stacks, the rest events).
    pub lost_by_cause: std::collections::BTreeMap<&'static str, u64>,
    /// Allocations at an address still outstanding (a free was missed).
    pub replaced: u64,
    /// Outstanding blocks the C/C++ runtime owns and releases at exit (not leaks).
    pub runtime_outstanding_count: u64,
    pub runtime_outstanding_bytes: u64,
    /// Seconds since tracing started.
    pub elapsed_s: f64,
    /// Blocks younger than this are not counted in `leaks`.
    pub min_age_s: f64,
    /// Distinct stacks whose walk hit the depth limit, and whose walk broke off early (a
    /// frame without unwind information or frame pointer, unreadable stack memory).
    pub stacks_truncated: u64,
    pub stacks_broken: u64,
    /// Stack walking cost, measured in the kernel (`--measure-walks` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walks: Option<WalkSummary>,
    /// Descriptors created, closed, and still open (or open at exit), among those we saw
    /// created; closes of others (inherited, opened before tracing).
    pub fds_opened: u64,
    pub fds_closed: u64,
    pub fds_outstanding: u64,
    pub fds_unmatched_closes: u64,
    /// Temp files created, and those still on disk.
    pub tmp_files_created: u64,
    pub tmp_files_outstanding: u64,
    /// Temp files created beyond the number leaktrace watches at once (not in tmp_leaks).
    pub tmp_files_unwatched: u64,
    /// leaktrace's own CPU time and peak RSS so far.
    pub tracer: TracerUsage,
    /// Stack captures the kernel side's walk cache answered, and those that walked.
    pub stack_cache_hits: u64,
    pub stack_walks: u64,
    /// How the heap was traced: `full` (allocator probes) or `growth` (page faults; then
    /// allocs/frees count what write faults added (a page, a huge page) and what was given
    /// back).
    pub mode: &'static str,
    /// Non-zero: allocations were sampled, one byte in this many on average; heap bytes are
    /// unbiased estimates, counts are of sampled blocks, and `unmatched_frees` also counts
    /// some frees of blocks that were not sampled.
    pub sample_bytes: u64,
}

/// Stack walks timed in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct WalkSummary {
    pub walks: u64,
    pub frames_per_walk: f64,
    pub ns_per_walk: f64,
    /// Unwind rows loaded, for all modules together.
    pub unwind_rows: u64,
    /// Kernel memory of all of leaktrace's BPF maps (their `memlock`).
    pub bpf_map_bytes: u64,
}

/// One frame as reports show it (the JSON `frames` entries).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// The address in the process (written `0x…`).
    #[serde(serialize_with = "hex")]
    pub addr: u64,
    pub symbol: Option<String>,
    pub module: Option<String>,
    /// Source file name (the path as compiled is in `path`).
    pub file: Option<String>,
    pub line: Option<u32>,
    pub path: Option<String>,
    /// Offset in `module` (written `0x…`): identifies frames without a symbol.
    #[serde(serialize_with = "hex_opt")]
    pub offset: Option<u64>,
    pub inlined: bool,
}

impl From<&SymFrame> for Frame {
    fn from(f: &SymFrame) -> Self {
        Self {
            addr: f.addr,
            symbol: f.symbol.clone(),
            module: f.module.clone(),
            file: f
                .file
                .as_ref()
                .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned()),
            line: f.line,
            path: f.file.clone(),
            offset: f.offset,
            inlined: f.inlined,
        }
    }
}

/// An address as reports write it: `0x…`, lowercase, no leading zeros.
fn hex<S: serde::Serializer>(addr: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{addr:#x}"))
}

/// [`hex`], or `null`.
fn hex_opt<S: serde::Serializer>(addr: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match addr {
        Some(a) => hex(a, s),
        None => s.serialize_none(),
    }
}

/// One leaking stack of one process (the JSON `leaks` entries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Leak {
    pub kind: &'static str,
    pub pid: u32,
    pub comm: String,
    pub outstanding_count: u64,
    pub outstanding_bytes: u64,
    pub allocs: u64,
    pub frees: u64,
    /// Age of the oldest outstanding block (at exit, for `at_exit` rows).
    pub oldest_age_s: f64,
    /// True when the process has exited (or exec'd) and this is what it held then.
    pub at_exit: bool,
    /// Growth of `outstanding_bytes` per second over the recent reports, when known.
    pub growth_bytes_per_s: Option<f64>,
    /// The stack walk hit its depth limit or broke: outer frames are missing.
    pub truncated: bool,
    /// Innermost first; `frames[0]` is the code that called the allocator.
    pub frames: Vec<Frame>,
}

/// Descriptors still open, per creating stack (the JSON `fd_leaks` entries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdLeak {
    pub pid: u32,
    pub comm: String,
    /// Descriptors this stack created that are still open (or were open at exit).
    pub outstanding: u64,
    pub fd_kind: &'static str,
    /// Example paths, for files.
    pub paths: Vec<String>,
    pub opened: u64,
    pub closed: u64,
    pub oldest_age_s: f64,
    pub at_exit: bool,
    pub truncated: bool,
    /// `frames[0]` is the code that called the libc wrapper (open, socket, fopen, ...).
    pub frames: Vec<Frame>,
}

/// A stack holding descriptors (in [`FdExhaustion::top_holders`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdHolder {
    pub outstanding: u64,
    pub fd_kind: &'static str,
    pub frames: Vec<Frame>,
}

/// A process that ran out of descriptors (the JSON `fd_exhaustion` entries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdExhaustion {
    pub pid: u32,
    pub comm: String,
    /// `EMFILE` (the process's limit) or `ENFILE` (the system's).
    pub errno: &'static str,
    /// The process's soft `RLIMIT_NOFILE`.
    pub limit: Option<u64>,
    /// Descriptors it had open (that we saw created) when the call failed.
    pub open: u64,
    /// Failures at this stack.
    pub count: u64,
    /// Seconds since tracing started, of the first failure.
    pub at_s: f64,
    /// The call that failed.
    pub frames: Vec<Frame>,
    /// The stacks holding the most descriptors at that moment.
    pub top_holders: Vec<FdHolder>,
}

/// Temp files a stack created that still exist (the JSON `tmp_leaks` entries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TmpLeak {
    pub pid: u32,
    pub comm: String,
    pub files: u64,
    /// Their current size on disk.
    pub bytes: u64,
    pub paths: Vec<String>,
    pub oldest_age_s: f64,
    pub truncated: bool,
    pub frames: Vec<Frame>,
}

/// Outstanding heap bytes of a process some time before an event.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GrowthSample {
    /// Seconds before the event (negative).
    pub t_s: f64,
    pub outstanding_bytes: u64,
}

/// A heap stack in an OOM record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeapHolder {
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    pub frames: Vec<Frame>,
}

/// An OOM kill (the JSON `oom_kills` entries), written out as soon as it happens.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OomKill {
    pub pid: u32,
    pub comm: String,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// Resident memory when chosen (anonymous + file + shared).
    pub rss_bytes: u64,
    pub anon_rss_bytes: u64,
    /// The memory limit of its cgroup, when it has one.
    pub limit_bytes: Option<u64>,
    pub oom_score_adj: i32,
    /// Whether leaktrace was tracing it (then the stacks below are filled in).
    pub traced: bool,
    /// Wall-clock time of the kill (RFC 3339, UTC).
    pub time: String,
    /// The heap stack holding the most bytes.
    pub frames_top: Vec<Frame>,
    pub heap_top: Vec<HeapHolder>,
    pub fd_top: Vec<FdHolder>,
    /// Its outstanding heap bytes over the minutes before the kill.
    pub growth: Vec<GrowthSample>,
    pub growth_bytes_per_s: Option<f64>,
}

/// A complete report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub summary: Summary,
    /// Ranked by outstanding bytes, largest first.
    pub leaks: Vec<Leak>,
    /// Blocks the C/C++ runtime holds for itself, ranked the same way (not leaks).
    pub runtime: Vec<Leak>,
    /// Ranked by descriptors held, most first.
    pub fd_leaks: Vec<FdLeak>,
    pub fd_exhaustion: Vec<FdExhaustion>,
    /// Ranked by bytes on disk.
    pub tmp_leaks: Vec<TmpLeak>,
    pub oom_kills: Vec<OomKill>,
    /// Set on the last report of a session.
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Knobs of report building.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    pub min_age_ns: u64,
    /// Growth mode: the tables hold pages written to, not allocations.
    pub growth_mode: bool,
    /// Allocations are sampled one byte in this many (0: exact).
    pub sample_bytes: u32,
    /// Keep at most this many leaks (`None`: all).
    pub top: Option<usize>,
}

/// Remembers each leak's outstanding bytes across reports, to tell how fast it grows.
#[derive(Debug, Default)]
pub struct Growth {
    history: HashMap<LeakKey, VecDeque<(f64, u64)>>,
}

/// Identifies a leak across reports: process and trimmed frames.
type LeakKey = (u32, bool, Vec<u64>);

const GROWTH_SAMPLES: usize = 32;

impl Growth {
    /// Records a sample and returns the least-squares slope in bytes per second over the
    /// recent samples, once there are at least two.
    fn observe(&mut self, key: &LeakKey, t: f64, bytes: u64) -> Option<f64> {
        let h = self.history.entry(key.clone()).or_default();
        if h.back().is_some_and(|&(last, _)| last >= t) {
            h.pop_back();
        }
        h.push_back((t, bytes));
        if h.len() > GROWTH_SAMPLES {
            h.pop_front();
        }
        slope(h.iter().copied())
    }

    /// Forgets leaks not seen in the latest report (bounded memory).
    fn retain(&mut self, seen: &[LeakKey]) {
        self.history.retain(|k, _| seen.contains(k));
    }
}

fn slope(points: impl Iterator<Item = (f64, u64)> + Clone) -> Option<f64> {
    let n = points.clone().count() as f64;
    if n < 2.0 {
        return None;
    }
    let (sx, sy) = points
        .clone()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y as f64));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y as f64 - my), den + (x - mx) * (x - mx))
    });
    (den > 0.0).then(|| num / den)
}

/// Everything a report is built from.
pub struct ReportInput<'a> {
    pub snapshot: &'a Snapshot,
    pub stacks: &'a StackStore,
    pub lost: &'a [(&'static str, u64)],
    pub comm: &'a dyn Fn(u32) -> String,
    pub is_final: bool,
    pub walks: Option<WalkSummary>,
    pub fds: &'a FdSnapshot,
    /// Temp files still watched, with their size on disk (gone ones left out).
    pub tmp: &'a [TmpRow],
    pub tmp_created: u64,
    /// Temp files created but not watched (over the cap).
    pub tmp_unwatched: u64,
    pub fd_exhaustion: &'a [FdExhaustion],
    pub oom_kills: &'a [OomKill],
    /// Frees of never-seen addresses the kernel side counted instead of sending.
    pub filtered_frees: u64,
    /// What leaktrace itself has used so far.
    pub tracer: TracerUsage,
    /// Stack captures answered by the walk cache, and walks.
    pub stack_cache_hits: u64,
    pub stack_walks: u64,
}

/// The tracer's own CPU time and peak memory, for overhead accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TracerUsage {
    /// User + system CPU seconds of the leaktrace process.
    pub cpu_s: f64,
    /// Its peak resident memory.
    pub peak_rss_bytes: u64,
}

impl TracerUsage {
    /// Of the calling process.
    pub fn current() -> Self {
        // SAFETY: a zeroed rusage is a valid out-parameter.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a valid pointer.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
            return Self::default();
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Self {
            cpu_s: secs(u.ru_utime) + secs(u.ru_stime),
            peak_rss_bytes: u.ru_maxrss as u64 * 1024,
        }
    }
}

/// A temp file as a report sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmpRow {
    pub pid: u32,
    pub stack_id: StackId,
    pub path: String,
    pub bytes: u64,
    pub created_ms: u32,
}

/// The symbolized, trimmed frames of a stack, and whether the walk was incomplete.
pub fn stack_frames(
    stacks: &StackStore,
    symbols: &mut Symbols,
    id: StackId,
) -> (Vec<SymFrame>, bool) {
    match stacks.get(id) {
        Some(stack) => {
            let mut frames = symbols.frames(stack);
            trim(&mut frames, |_| false);
            (frames, stack.truncated() || stack.broken())
        }
        None => (Vec::new(), true),
    }
}

fn merge_paths(into: &mut Vec<String>, from: &[String]) {
    for p in from {
        if into.len() < crate::track::fd::PATH_SAMPLES && !into.contains(p) {
            into.push(p.clone());
        }
    }
}

/// Descriptors still open, merged per (process, trimmed stack), most first.
fn fd_leaks(input: &ReportInput<'_>, symbols: &mut Symbols, now_ms: u32) -> Vec<FdLeak> {
    let fds = input.fds;
    let rows = fds
        .live
        .iter()
        .flat_map(|p| p.stacks.iter().map(move |s| (p.pid, false, now_ms, s)))
        .chain(
            fds.exited
                .iter()
                .flat_map(|e| e.stacks.iter().map(move |s| (e.pid, true, e.at_ms, s))),
        )
        .filter(|(_, _, _, s)| s.outstanding > 0);
    let mut merged: HashMap<LeakKey, FdLeak> = HashMap::new();
    for (pid, at_exit, at_ms, s) in rows {
        let (frames, truncated) = stack_frames(input.stacks, symbols, s.stack_id);
        let key: LeakKey = (pid, at_exit, frames.iter().map(|f| f.addr).collect());
        let age = f64::from(at_ms.saturating_sub(s.oldest_born_ms.unwrap_or(at_ms))) / 1e3;
        let leak = merged.entry(key).or_insert_with(|| FdLeak {
            pid,
            comm: (input.comm)(pid),
            outstanding: 0,
            fd_kind: s.kind.map_or("other", FdKind::name),
            paths: Vec::new(),
            opened: 0,
            closed: 0,
            oldest_age_s: 0.0,
            at_exit,
            truncated,
            frames: frames.iter().map(Frame::from).collect(),
        });
        leak.outstanding += s.outstanding;
        leak.opened += s.opened;
        leak.closed += s.closed;
        leak.oldest_age_s = leak.oldest_age_s.max(age);
        merge_paths(&mut leak.paths, &s.paths);
    }
    let mut leaks: Vec<FdLeak> = merged.into_values().collect();
    leaks.sort_by(|a, b| {
        b.outstanding
            .cmp(&a.outstanding)
            .then(a.pid.cmp(&b.pid))
            .then_with(|| by_address_text(&a.frames, &b.frames))
    });
    leaks
}

/// Temp files still on disk, merged per (process, trimmed stack), largest first.
fn tmp_leaks(input: &ReportInput<'_>, symbols: &mut Symbols, now_ms: u32) -> Vec<TmpLeak> {
    let mut merged: HashMap<LeakKey, TmpLeak> = HashMap::new();
    for row in input.tmp {
        let (frames, truncated) = stack_frames(input.stacks, symbols, row.stack_id);
        let key: LeakKey = (row.pid, false, frames.iter().map(|f| f.addr).collect());
        let leak = merged.entry(key).or_insert_with(|| TmpLeak {
            pid: row.pid,
            comm: (input.comm)(row.pid),
            files: 0,
            bytes: 0,
            paths: Vec::new(),
            oldest_age_s: 0.0,
            truncated,
            frames: frames.iter().map(Frame::from).collect(),
        });
        leak.files += 1;
        leak.bytes += row.bytes;
        leak.oldest_age_s = leak
            .oldest_age_s
            .max(f64::from(now_ms.saturating_sub(row.created_ms)) / 1e3);
        merge_paths(&mut leak.paths, std::slice::from_ref(&row.path));
    }
    let mut leaks: Vec<TmpLeak> = merged.into_values().collect();
    leaks.sort_by(|a, b| {
        (b.bytes, b.files)
            .cmp(&(a.bytes, a.files))
            .then(a.pid.cmp(&b.pid))
            .then_with(|| by_address_text(&a.frames, &b.frames))
    });
    leaks
}

struct Merged {
    pid: u32,
    at_exit: bool,
    runtime: bool,
    /// outstanding (aged) count and bytes, allocs, frees
    counters: (u64, u64, u64, u64),
    oldest_age_ms: u32,
    truncated: bool,
    frames: Vec<SymFrame>,
}

/// Builds a report: symbolizes, classifies, trims and merges rows, ranks them.
pub fn build(
    input: ReportInput<'_>,
    opts: &ReportOptions,
    symbols: &mut Symbols,
    growth: &mut Growth,
) -> Report {
    let snap = input.snapshot;
    let rows = snap
        .live
        .iter()
        .flat_map(|p| p.stacks.iter().map(move |r| (p.pid, false, snap.now_ms, r)))
        .chain(
            snap.exited
                .iter()
                .flat_map(|e| e.stacks.iter().map(move |r| (e.pid, true, e.at_ms, r))),
        )
        .filter(|(_, _, _, r)| r.counters.outstanding_count > 0 || r.counters.allocs > 0);

    symbols.prepare(
        rows.clone()
            .filter_map(|(_, _, _, r)| input.stacks.get(r.counters.stack_id)),
    );

    let mut summary = Summary {
        unmatched_frees: snap.totals.unmatched_frees + input.filtered_frees,
        tracer: input.tracer,
        stack_cache_hits: input.stack_cache_hits,
        stack_walks: input.stack_walks,
        mode: if opts.growth_mode { "growth" } else { "full" },
        sample_bytes: u64::from(opts.sample_bytes),
        replaced: snap.totals.replaced,
        lost_events: input
            .lost
            .iter()
            .filter(|(c, _)| !c.starts_with("stack_"))
            .map(|(_, n)| n)
            .sum(),
        lost_stacks: input
            .lost
            .iter()
            .filter(|(c, _)| c.starts_with("stack_"))
            .map(|(_, n)| n)
            .sum(),
        lost_by_cause: input.lost.iter().copied().filter(|(_, n)| *n > 0).collect(),
        elapsed_s: f64::from(snap.now_ms) / 1e3,
        min_age_s: opts.min_age_ns as f64 / 1e9,
        stacks_truncated: input.stacks.count(|s| s.truncated()),
        stacks_broken: input.stacks.count(|s| s.broken() && !s.truncated()),
        walks: input.walks,
        ..Default::default()
    };
    let (mut runtime_allocs, mut runtime_frees) = (0, 0);
    let mut merged: HashMap<LeakKey, Merged> = HashMap::new();
    for (pid, at_exit, at_ms, row) in rows {
        let StackRow {
            counters: c,
            aged_count,
            aged_bytes,
            oldest_born_ms,
        } = *row;
        let (mut frames, truncated) = match input.stacks.get(c.stack_id) {
            Some(stack) => (symbols.frames(stack), stack.truncated() || stack.broken()),
            None => (Vec::new(), true),
        };
        let runtime = runtime_owned(&frames);
        if runtime {
            summary.runtime_outstanding_count += c.outstanding_count;
            summary.runtime_outstanding_bytes += c.outstanding_bytes;
            runtime_allocs += c.allocs;
            runtime_frees += c.frees;
        } else {
            summary.outstanding_count += c.outstanding_count;
            summary.outstanding_bytes += c.outstanding_bytes;
        }
        if aged_count == 0 {
            continue;
        }
        trim(&mut frames, |_| false);
        let key: LeakKey = (pid, at_exit, frames.iter().map(|f| f.addr).collect());
        let age = at_ms.saturating_sub(oldest_born_ms.unwrap_or(at_ms));
        let m = merged.entry(key).or_insert_with(|| Merged {
            pid,
            at_exit,
            runtime,
            counters: (0, 0, 0, 0),
            oldest_age_ms: 0,
            truncated,
            frames,
        });
        m.counters.0 += aged_count;
        m.counters.1 += aged_bytes;
        m.counters.2 += c.allocs;
        m.counters.3 += c.frees;
        m.oldest_age_ms = m.oldest_age_ms.max(age);
        m.truncated |= truncated;
    }
    // Blocks the runtime owns are left out of the program's counts on both sides, so the
    // program's allocs - frees still equals its outstanding blocks.
    summary.allocs = snap.totals.allocs - runtime_allocs;
    summary.frees = snap.totals.frees - runtime_frees;

    let now_s = f64::from(snap.now_ms) / 1e3;
    let mut keys = Vec::with_capacity(merged.len());
    let (mut leaks, mut runtime) = (Vec::new(), Vec::new());
    for (key, m) in merged {
        let growth_bytes_per_s = if m.at_exit {
            None
        } else {
            growth.observe(&key, now_s, m.counters.1)
        };
        keys.push(key);
        let leak = Leak {
            kind: if opts.growth_mode { "growth" } else { "heap" },
            pid: m.pid,
            comm: (input.comm)(m.pid),
            outstanding_count: m.counters.0,
            outstanding_bytes: m.counters.1,
            allocs: m.counters.2,
            frees: m.counters.3,
            oldest_age_s: f64::from(m.oldest_age_ms) / 1e3,
            at_exit: m.at_exit,
            growth_bytes_per_s,
            truncated: m.truncated,
            frames: m.frames.iter().map(Frame::from).collect(),
        };
        if m.runtime {
            runtime.push(leak)
        } else {
            leaks.push(leak)
        }
    }
    growth.retain(&keys);
    for list in [&mut leaks, &mut runtime] {
        rank(list);
        if let Some(top) = opts.top {
            list.truncate(top);
        }
    }

    let mut fd_leaks = fd_leaks(&input, symbols, snap.now_ms);
    let mut tmp_leaks = tmp_leaks(&input, symbols, snap.now_ms);
    let fd_totals = input.fds.totals;
    summary.fds_opened = fd_totals.opened;
    summary.fds_closed = fd_totals.closed;
    summary.fds_unmatched_closes = fd_totals.unmatched_closes;
    summary.fds_outstanding = fd_leaks.iter().map(|l| l.outstanding).sum();
    summary.tmp_files_created = input.tmp_created;
    summary.tmp_files_unwatched = input.tmp_unwatched;
    summary.tmp_files_outstanding = tmp_leaks.iter().map(|l| l.files).sum();
    if let Some(top) = opts.top {
        fd_leaks.truncate(top);
        tmp_leaks.truncate(top);
    }
    Report {
        summary,
        leaks,
        runtime,
        fd_leaks,
        fd_exhaustion: input.fd_exhaustion.to_vec(),
        tmp_leaks,
        oom_kills: input.oom_kills.to_vec(),
        is_final: input.is_final,
    }
}

/// Largest first, then a stable order so reports are deterministic.
fn rank(leaks: &mut [Leak]) {
    leaks.sort_by(|a, b| {
        (b.outstanding_bytes, b.outstanding_count)
            .cmp(&(a.outstanding_bytes, a.outstanding_count))
            .then_with(|| a.pid.cmp(&b.pid))
            .then_with(|| by_address_text(&a.frames, &b.frames))
    });
}

/// Compares stacks frame by frame, each address as its `0x…` text compares: the order
/// reports have always broken ties in (`0x10` before `0x9`), kept so output does not change.
fn by_address_text(a: &[Frame], b: &[Frame]) -> std::cmp::Ordering {
    let text = |f: &Frame| AddressText(f.addr);
    a.iter().map(text).cmp(b.iter().map(text))
}

/// An address ordered as its `0x…` text orders, without formatting it: the hex digits
/// left-aligned, then the shorter (a prefix of the other) first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AddressText(u64);

impl AddressText {
    fn key(self) -> (u64, u32) {
        let digits = (64 - self.0.leading_zeros()).div_ceil(4).max(1);
        (self.0 << (4 * (16 - digits)), digits)
    }
}

impl Ord for AddressText {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for AddressText {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_tie_break_as_their_text_did() {
        let addrs = [
            0,
            1,
            9,
            0xa,
            0xf,
            0x10,
            0x1f,
            0x90,
            0x100,
            0x1000,
            0x5555_0000_1234,
            0x5555_0000_1290,
            0x7f00_0000_4321,
            0xffff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
        ];
        for &a in &addrs {
            for &b in &addrs {
                assert_eq!(
                    AddressText(a).cmp(&AddressText(b)),
                    format!("{a:#x}").cmp(&format!("{b:#x}")),
                    "{a:#x} vs {b:#x}"
                );
            }
        }
    }

    #[test]
    fn slope_of_a_straight_line() {
        let pts = [(0.0, 100), (1.0, 300), (2.0, 500)];
        assert_eq!(slope(pts.iter().copied()), Some(200.0));
        assert_eq!(slope([(0.0, 1)].iter().copied()), None);
        assert_eq!(slope([(1.0, 1), (1.0, 5)].iter().copied()), None);
    }

    #[test]
    fn growth_follows_a_leak_across_reports_and_forgets_gone_ones() {
        let mut g = Growth::default();
        let k: LeakKey = (1, false, vec![0x10]);
        assert_eq!(g.observe(&k, 0.0, 0), None);
        assert_eq!(g.observe(&k, 10.0, 1000), Some(100.0));
        assert_eq!(g.observe(&k, 20.0, 1000), Some(50.0));
        g.retain(&[]);
        assert_eq!(g.observe(&k, 30.0, 0), None);
    }
}
