//! Building a report from the trackers' snapshots: symbolize each row's stack, set apart
//! what the C/C++ runtime owns, find each row's site, merge rows of the same stack, rank.
use crate::{
    report::merge::{History, Row, Trend, merge, merge_paths, rank},
    report::model::{
        FdExhaustion, FdLeak, Frame, Leak, OomKill, Owner, ProbeSummary, Report, Summary, TmpLeak,
        TracerUsage, WalkSummary,
    },
    report::verdict::{Ages, Sample, judge},
    symbolize::stacks::StackStore,
    symbolize::{SymbolizedFrame, Symbols, runtime_owned, site, trim},
    track::fd::{FdKind, FdSnapshot},
    track::heap::{HeapSnapshot, StackRow},
    track::{StackId, heaviest},
};

/// Knobs of report building.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportOptions {
    /// Blocks younger than this are not counted in `leaks`.
    pub min_age_ns: u64,
    /// Growth mode: the tables hold pages written to, not allocations.
    pub growth_mode: bool,
    /// Allocations are sampled one byte in this many (0: exact).
    pub sample_bytes: u32,
    /// Keep at most this many leaks (`None`: all).
    pub top: Option<usize>,
    /// Keep the rows of each process apart, instead of merging the same stack across the
    /// processes of one executable in one container.
    #[serde(default)]
    pub by_pid: bool,
    /// Symbolize and list only the heaviest this many rows of each kind, before merging
    /// (the node agent: symbolizing every stack of every process costs seconds). The
    /// summary still counts every row. `None`: all.
    #[serde(default)]
    pub row_limit: Option<usize>,
    /// Keep only the OOM kills of traced processes (`run`, unless `--oom-all`): a command's
    /// report is about that command. `--pid` and the agent keep every kill on the node.
    #[serde(default)]
    pub oom_traced_only: bool,
}

/// Everything a report is built from.
pub struct ReportInput<'a> {
    /// The heap tables.
    pub snapshot: &'a HeapSnapshot,
    /// The stacks the rows name.
    pub stacks: &'a StackStore,
    /// Lost events and stacks, by cause.
    pub lost: &'a [(&'static str, u64)],
    /// Who a pid is.
    pub owner: &'a dyn Fn(u32) -> Owner,
    /// Whether this is the session's last report.
    pub is_final: bool,
    /// Stack walking cost, when measured.
    pub walks: Option<WalkSummary>,
    /// The descriptor tables.
    pub fds: &'a FdSnapshot,
    /// Temp files still watched, with their size on disk (gone ones left out).
    pub tmp: &'a [TmpRow],
    /// Temp files created.
    pub tmp_created: u64,
    /// Temp files created but not watched (over the cap).
    pub tmp_unwatched: u64,
    /// Processes that ran out of descriptors.
    pub fd_exhaustion: &'a [FdExhaustion],
    /// OOM kills seen.
    pub oom_kills: &'a [OomKill],
    /// Frees of never-seen addresses the kernel side counted instead of sending.
    pub filtered_frees: u64,
    /// Of such frees, those made by threads on their way out, counted apart.
    pub thread_exit_frees: u64,
    /// What leaktrace itself has used so far.
    pub tracer: TracerUsage,
    /// Stack captures answered by the walk cache.
    pub stack_cache_hits: u64,
    /// Stack captures that walked.
    pub stack_walks: u64,
    /// The uprobes, when known (live sessions).
    pub probes: Option<ProbeSummary>,
}

/// A temp file as a report sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmpRow {
    /// The process that created it.
    pub pid: u32,
    /// The stack that created it.
    pub stack_id: StackId,
    /// Its path.
    pub path: String,
    /// Its size on disk.
    pub bytes: u64,
    /// When it was created, ms since the epoch.
    pub created_ms: u32,
}

/// The symbolized frames of a stack, whole, and whether the walk was incomplete.
pub fn whole_stack(
    stacks: &StackStore,
    symbols: &mut Symbols,
    id: StackId,
) -> (Vec<SymbolizedFrame>, bool) {
    match stacks.get(id) {
        Some(stack) => (symbols.frames(stack), stack.truncated() || stack.broken()),
        None => (Vec::new(), true),
    }
}

/// The symbolized frames of a stack from its site outward, and whether the walk was
/// incomplete: for notices (an OOM kill, a full descriptor table), which show a few frames.
pub fn stack_frames(
    stacks: &StackStore,
    symbols: &mut Symbols,
    id: StackId,
) -> (Vec<SymbolizedFrame>, bool) {
    let (mut frames, incomplete) = whole_stack(stacks, symbols, id);
    trim(&mut frames, |_| false);
    (frames, incomplete)
}

/// Builds a report: symbolizes and classifies rows, finds their sites, merges and ranks them.
pub fn build(
    input: &ReportInput<'_>,
    opts: &ReportOptions,
    symbols: &mut Symbols,
    trend: &mut Trend,
) -> Report {
    let mut summary = summary(input, opts);
    let kind = if opts.growth_mode { "growth" } else { "heap" };
    let heap = heap_rows(input.snapshot, kind, input, opts, symbols, &mut summary);
    let (leaks, runtime) = heap_leaks(heap, input.snapshot, opts, trend);

    let mut fd_leaks = fd_leaks(input, symbols, opts);
    let mut tmp_leaks = tmp_leaks(input, symbols, input.snapshot.now_ms, opts.by_pid);
    let now_s = f64::from(input.snapshot.now_ms) / 1e3;
    judge_rows(
        &mut trend.fds,
        now_s,
        opts.by_pid,
        fd_leaks.iter_mut(),
        |l| (!l.at_exit).then_some((l.outstanding, l.oldest_age_s, &mut l.trend)),
        "descriptors",
    );
    judge_rows(
        &mut trend.tmp,
        now_s,
        opts.by_pid,
        tmp_leaks.iter_mut(),
        |l| Some((l.files, l.oldest_age_s, &mut l.trend)),
        "files",
    );
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
        growth: Vec::new(),
        tier2: Vec::new(),
        notices: Vec::new(),
        build_ids: Default::default(),
        is_final: input.is_final,
    }
}

/// The pages each stack keeps, from growth tables kept apart from the heap's (the node
/// agent traces growth everywhere and the heap of a few processes): ranked, the runtime's
/// rows left out, each with its trend.
pub fn growth_leaks(
    pages: &HeapSnapshot,
    input: &ReportInput<'_>,
    opts: &ReportOptions,
    symbols: &mut Symbols,
    trend: &mut Trend,
) -> Vec<Leak> {
    let mut ignored = Summary::default();
    let rows = heap_rows(pages, "growth", input, opts, symbols, &mut ignored);
    heap_leaks(rows, pages, opts, trend).0
}

/// The summary's session-wide figures; the heap, descriptor and temp file counts are
/// added as their rows are built.
fn summary(input: &ReportInput<'_>, opts: &ReportOptions) -> Summary {
    let snap = input.snapshot;
    let lost = |stacks: bool| -> u64 {
        input
            .lost
            .iter()
            .filter(|(c, _)| c.starts_with("stack_") == stacks)
            .map(|(_, n)| n)
            .sum()
    };
    Summary {
        unmatched_frees: snap.totals.unmatched_frees + input.filtered_frees,
        thread_exit_frees: snap.totals.thread_exit_frees + input.thread_exit_frees,
        inherited_frees: snap.totals.inherited_frees,
        tracer: input.tracer,
        stack_cache_hits: input.stack_cache_hits,
        stack_walks: input.stack_walks,
        mode: if opts.growth_mode { "growth" } else { "full" },
        sample_bytes: u64::from(opts.sample_bytes),
        replaced: snap.totals.replaced,
        lost_events: lost(false),
        lost_stacks: lost(true),
        lost_by_cause: input.lost.iter().copied().filter(|(_, n)| *n > 0).collect(),
        elapsed_s: f64::from(snap.now_ms) / 1e3,
        min_age_s: opts.min_age_ns as f64 / 1e9,
        stacks_truncated: input.stacks.count(|s| s.truncated()),
        stacks_broken: input.stacks.count(|s| s.broken() && !s.truncated()),
        walks: input.walks,
        probes: input.probes.clone(),
        ..Default::default()
    }
}

/// A heap row, and whether the C/C++ runtime owns its blocks (then it is listed apart).
struct HeapRow {
    leak: Leak,
    runtime: bool,
}

impl Row for HeapRow {
    fn pid(&self) -> u32 {
        self.leak.pid
    }
    fn owner(&self) -> &Owner {
        &self.leak.owner
    }
    fn pids_mut(&mut self) -> &mut Vec<u32> {
        &mut self.leak.pids
    }
    fn processes_mut(&mut self) -> &mut u32 {
        &mut self.leak.processes
    }
    fn at_exit(&self) -> bool {
        self.leak.at_exit
    }
    fn frames(&self) -> &[Frame] {
        &self.leak.frames
    }
    fn weight(&self) -> (u64, u64) {
        self.leak.weight()
    }
    fn absorb(&mut self, other: Self) {
        // Whether the runtime owns it stays the first row's.
        self.leak.absorb(other.leak);
    }
}

/// The heap rows with blocks at least `--min-age` old, merged per stack; counts every row
/// into `summary`, the runtime's blocks apart from the program's.
fn heap_rows(
    snap: &HeapSnapshot,
    kind: &'static str,
    input: &ReportInput<'_>,
    opts: &ReportOptions,
    symbols: &mut Symbols,
    summary: &mut Summary,
) -> Vec<HeapRow> {
    let rows: Vec<_> = snap
        .rows()
        .filter(|r| r.row.counters.outstanding_count > 0 || r.row.counters.allocs > 0)
        .collect();
    let weights: Vec<u64> = rows.iter().map(|r| r.row.aged_bytes).collect();
    let listed = heaviest(&weights, opts.row_limit);
    symbols.prepare(
        rows.iter()
            .zip(&listed)
            .filter(|(_, l)| **l)
            .filter_map(|(r, _)| input.stacks.get(r.row.counters.stack_id)),
    );
    let (mut runtime_allocs, mut runtime_frees) = (0, 0);
    let mut out = Vec::new();
    for (r, listed) in rows.into_iter().zip(listed) {
        let (pid, at_exit, at_ms) = (r.pid, r.at_exit, r.at_ms);
        let StackRow {
            counters: c,
            aged_count,
            aged_bytes,
            oldest_born_ms,
            ref held,
        } = *r.row;
        if !listed {
            summary.outstanding_count += c.outstanding_count;
            summary.outstanding_bytes += c.outstanding_bytes;
            continue;
        }
        let (frames, truncated) = whole_stack(input.stacks, symbols, c.stack_id);
        // Decided per stack, and rows merge only when their whole stacks are the same: each
        // block is counted once, on the side its stack says, in the summary and the rows.
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
        let age_ms = at_ms.saturating_sub(oldest_born_ms.unwrap_or(at_ms));
        let leak = Leak {
            kind,
            pid,
            processes: 1,
            pids: vec![pid],
            owner: (input.owner)(pid),
            outstanding_count: aged_count,
            outstanding_bytes: aged_bytes,
            allocs: c.allocs,
            frees: c.frees,
            oldest_age_s: f64::from(age_ms) / 1e3,
            at_exit,
            growth_bytes_per_s: None,
            held: held.as_deref().cloned(),
            trend: None,
            truncated,
            site: site(&frames, |_| false),
            frames: frames.iter().map(Frame::from).collect(),
        };
        out.push(HeapRow { leak, runtime });
    }
    // Blocks the runtime owns are left out of the program's counts on both sides, so the
    // program's allocs - frees still equals its outstanding blocks.
    summary.allocs = snap.totals.allocs - runtime_allocs;
    summary.frees = snap.totals.frees - runtime_frees;
    merge(out, opts.by_pid)
}

/// The merged heap rows as ranked leaks, the program's and the runtime's apart, each with
/// its trend while the process lives.
fn heap_leaks(
    rows: Vec<HeapRow>,
    snap: &HeapSnapshot,
    opts: &ReportOptions,
    trend: &mut Trend,
) -> (Vec<Leak>, Vec<Leak>) {
    let now_s = f64::from(snap.now_ms) / 1e3;
    let (mut leaks, mut runtime) = (Vec::new(), Vec::new());
    for HeapRow {
        mut leak,
        runtime: by_runtime,
    } in rows
    {
        if !leak.at_exit {
            let sample = Sample {
                t_s: now_s,
                value: leak.outstanding_bytes,
                oldest_s: leak.oldest_age_s,
            };
            let samples = trend.heap.observe(&leak.key(opts.by_pid), sample);
            let ages = leak.held.as_ref().map(|h| {
                let a = h.age_ms();
                Ages {
                    p50_s: a.p50 as f64 / 1e3,
                    max_s: a.max as f64 / 1e3,
                }
            });
            let verdict = judge(&samples, ages, "bytes");
            leak.growth_bytes_per_s = (verdict.intervals >= 2).then_some(verdict.slope_per_s);
            leak.trend = Some(verdict);
        }
        if by_runtime {
            runtime.push(leak);
        } else {
            leaks.push(leak);
        }
    }
    trend.heap.end_report();
    for list in [&mut leaks, &mut runtime] {
        rank(list);
        if let Some(top) = opts.top {
            list.truncate(top);
        }
    }
    (leaks, runtime)
}

/// Descriptors still open, merged per (process, stack), most first.
fn fd_leaks(input: &ReportInput<'_>, symbols: &mut Symbols, opts: &ReportOptions) -> Vec<FdLeak> {
    let rows: Vec<_> = input.fds.rows().filter(|r| r.row.outstanding > 0).collect();
    let weights: Vec<u64> = rows.iter().map(|r| r.row.outstanding).collect();
    let listed = heaviest(&weights, opts.row_limit);
    let rows = rows
        .into_iter()
        .zip(listed)
        .filter(|(_, l)| *l)
        .map(|(r, _)| {
            let (pid, at_exit, at_ms, s) = (r.pid, r.at_exit, r.at_ms, r.row);
            let (frames, truncated) = whole_stack(input.stacks, symbols, s.stack_id);
            let age_ms = at_ms.saturating_sub(s.oldest_born_ms.unwrap_or(at_ms));
            let mut paths = Vec::new();
            merge_paths(&mut paths, &s.paths);
            FdLeak {
                pid,
                processes: 1,
                pids: vec![pid],
                owner: (input.owner)(pid),
                outstanding: s.outstanding,
                fd_kind: s.kind.map_or("other", FdKind::name),
                paths,
                opened: s.opened,
                closed: s.closed,
                oldest_age_s: f64::from(age_ms) / 1e3,
                at_exit,
                trend: None,
                truncated,
                site: site(&frames, |_| false),
                frames: frames.iter().map(Frame::from).collect(),
            }
        });
    merged_ranked(rows, opts.by_pid)
}

/// Temp files still on disk, merged per (process, stack), largest first.
fn tmp_leaks(
    input: &ReportInput<'_>,
    symbols: &mut Symbols,
    now_ms: u32,
    by_pid: bool,
) -> Vec<TmpLeak> {
    let rows = input.tmp.iter().map(|row| {
        let (frames, truncated) = whole_stack(input.stacks, symbols, row.stack_id);
        TmpLeak {
            pid: row.pid,
            processes: 1,
            pids: vec![row.pid],
            owner: (input.owner)(row.pid),
            files: 1,
            bytes: row.bytes,
            paths: vec![row.path.clone()],
            oldest_age_s: f64::from(now_ms.saturating_sub(row.created_ms)) / 1e3,
            trend: None,
            truncated,
            site: site(&frames, |_| false),
            frames: frames.iter().map(Frame::from).collect(),
        }
    });
    merged_ranked(rows, by_pid)
}

/// Follows each row's count (descriptors, temp files) across reports and judges it; `part`
/// gives a row's count, the age of its oldest and where its verdict goes (`None`: what a
/// process had at exit, not followed).
fn judge_rows<'a, R: Row + 'a>(
    history: &mut History,
    now_s: f64,
    by_pid: bool,
    rows: impl Iterator<Item = &'a mut R>,
    part: impl Fn(&mut R) -> Option<(u64, f64, &mut Option<crate::report::verdict::Verdict>)>,
    unit: &'static str,
) {
    for row in rows {
        let key = row.key(by_pid);
        if let Some((value, oldest_s, verdict)) = part(row) {
            let samples = history.observe(
                &key,
                Sample {
                    t_s: now_s,
                    value,
                    oldest_s,
                },
            );
            *verdict = Some(judge(&samples, None, unit));
        }
    }
    history.end_report();
}

/// Merges rows per owner and stack (see [`Row::key`]) and ranks them heaviest first.
fn merged_ranked<R: Row>(rows: impl IntoIterator<Item = R>, by_pid: bool) -> Vec<R> {
    let mut leaks = merge(rows, by_pid);
    rank(&mut leaks);
    leaks
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
