//! The report's data model: what exporters see and what the JSON contract serializes.
//! Plain data; addresses are numbers here and become `0x…` text only when written.
use serde::Serialize;

use crate::{report::verdict::Verdict, symbolize::SymbolizedFrame, track::held::Held};

/// Session-wide figures (the JSON `summary`).
///
/// Blocks the C or C++ runtime allocated for itself and keeps while the process lives (stdio
/// buffers, locale data, thread descriptors, ...; see [`crate::symbolize::runtime_owned`]) are
/// counted apart, in `runtime_*` and the report's `runtime` list, as valgrind leaves them out
/// of "in use at exit" (it has the runtime free them first). Everything else holds exactly: `allocs - frees == outstanding_count` when no
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
    /// Their bytes.
    pub outstanding_bytes: u64,
    /// Frees of blocks allocated before tracing started (or whose allocation was lost).
    pub unmatched_frees: u64,
    /// Frees by threads on their way out of blocks never seen allocated (or freed already):
    /// glibc handing each exiting thread's cache back (its per-thread cache block, allocated
    /// inside the allocator, and the blocks parked in it). Not in `unmatched_frees`. The main
    /// thread is on its way out from `exit` on, so after an attach, static destructors
    /// freeing blocks allocated before it count here too.
    pub thread_exit_frees: u64,
    /// Frees, in forked children, of blocks their parent held at the fork (matched).
    #[serde(skip_serializing_if = "is_zero")]
    pub inherited_frees: u64,
    /// Events the kernel side could not deliver; non-zero means counts are lower bounds.
    pub lost_events: u64,
    /// Stacks whose frames could not be delivered (counts stay exact; the frames are sent
    /// again the next time the stack allocates).
    pub lost_stacks: u64,
    /// Losses by cause (`stack_*` causes are stacks, the rest events).
    pub lost_by_cause: std::collections::BTreeMap<&'static str, u64>,
    /// Allocations at an address still outstanding (a free was missed).
    pub replaced: u64,
    /// Outstanding blocks the C/C++ runtime keeps for itself while the process lives (not
    /// leaks: the program cannot free them).
    pub runtime_outstanding_count: u64,
    /// Their bytes.
    pub runtime_outstanding_bytes: u64,
    /// Seconds since tracing started.
    pub elapsed_s: f64,
    /// Blocks younger than this are not counted in `leaks`.
    pub min_age_s: f64,
    /// Distinct stacks whose walk hit the depth limit, and whose walk broke off early (a
    /// frame without unwind information or frame pointer, unreadable stack memory).
    pub stacks_truncated: u64,
    /// Distinct stacks whose walk broke off early (and did not hit the depth limit).
    pub stacks_broken: u64,
    /// Stack walking cost, measured in the kernel (`--measure-walks` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walks: Option<WalkSummary>,
    /// How the uprobes were attached and what they cost to attach (live sessions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<ProbeSummary>,
    /// Descriptors created, closed, and still open (or open at exit), among those we saw
    /// created; closes of others (inherited, opened before tracing).
    pub fds_opened: u64,
    /// Descriptors closed, of those we saw created.
    pub fds_closed: u64,
    /// Descriptors still open (or open at exit), of those we saw created.
    pub fds_outstanding: u64,
    /// Closes of descriptors we never saw created (inherited, opened before tracing).
    pub fds_unmatched_closes: u64,
    /// Temp files created, and those still on disk.
    pub tmp_files_created: u64,
    /// Of those, the ones still on disk.
    pub tmp_files_outstanding: u64,
    /// Temp files created beyond the number leaktrace watches at once (not in tmp_leaks).
    pub tmp_files_unwatched: u64,
    /// leaktrace's own CPU time and peak RSS so far.
    pub tracer: TracerUsage,
    /// Stack captures the kernel side's walk cache answered, and those that walked.
    pub stack_cache_hits: u64,
    /// Stack captures that walked the stack.
    pub stack_walks: u64,
    /// How the heap was traced: `full` (allocator probes) or `growth` (page faults; then
    /// allocs/frees count what write faults added (a page, a huge page) and what was given
    /// back).
    pub mode: &'static str,
    /// Non-zero: allocations were sampled, one byte in this many on average; heap bytes are
    /// unbiased estimates, counts are of sampled blocks, and `unmatched_frees` also counts
    /// some frees of blocks that were not sampled.
    pub sample_bytes: u64,
    /// What was traced: `pid 4242 (api): /srv/api --port 8080`, the command `run` started,
    /// or every process on the node (set by the driver; absent in replayed sessions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// leaktrace's own command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The kernel, as uname(2) tells it: `Linux 6.18.0 x86_64`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The host's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// What the traced processes held at each report so far, oldest first (the last
    /// [`HISTORY`]): the whole-process line of the HTML report's chart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Totals>,
}

/// Reports a session's [`Summary::history`] keeps: an hour at the default 10 s interval.
pub const HISTORY: usize = 360;

/// What the traced processes held when one report was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Seconds since tracing started.
    pub t_s: f64,
    /// Outstanding heap bytes (pages kept, in growth mode): [`Summary::outstanding_bytes`].
    pub outstanding_bytes: u64,
    /// Descriptors still open: [`Summary::fds_outstanding`].
    pub fds_outstanding: u64,
    /// Temp files still on disk: [`Summary::tmp_files_outstanding`].
    pub tmp_files_outstanding: u64,
}

impl Totals {
    /// The totals of `summary`, at its time.
    pub fn of(summary: &Summary) -> Self {
        Self {
            t_s: summary.elapsed_s,
            outstanding_bytes: summary.outstanding_bytes,
            fds_outstanding: summary.fds_outstanding,
            tmp_files_outstanding: summary.tmp_files_outstanding,
        }
    }
}

/// The uprobes of a session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ProbeSummary {
    /// `multi` (uprobe_multi links) or `perf` (a perf-event uprobe per function).
    pub attach: String,
    /// Runs of an allocator entry program in the kernel, any process: with the probes scoped
    /// to the traced processes, their allocator calls and nothing else.
    pub hits: u64,
    /// Fork and exec records after which a process's probes were brought up to date (the
    /// latencies below are of these).
    pub hook_events: u64,
    /// Microseconds from a fork or exec record's kernel timestamp to the process's probes in
    /// place (the child waits, stopped, meanwhile): median.
    pub hook_latency_us_p50: u64,
    /// The same, the slowest.
    pub hook_latency_us_max: u64,
    /// Links attached over the session (a perf-event uprobe or a uprobe_multi link each).
    pub links_attached: u64,
}

/// Stack walks timed in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct WalkSummary {
    /// Stack walks timed.
    pub walks: u64,
    /// Frames per walk, on average.
    pub frames_per_walk: f64,
    /// Nanoseconds per walk, on average.
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
    /// Demangled function name, when known.
    pub symbol: Option<String>,
    /// Path of the module as the process maps it.
    pub module: Option<String>,
    /// Source file name (the path as compiled is in `path`).
    pub file: Option<String>,
    /// Source line.
    pub line: Option<u32>,
    /// Source file path as compiled.
    pub path: Option<String>,
    /// Offset in `module` (written `0x…`): identifies frames without a symbol.
    #[serde(serialize_with = "hex_opt")]
    pub offset: Option<u64>,
    /// True for a function inlined into the next frame.
    pub inlined: bool,
}

impl From<&SymbolizedFrame> for Frame {
    fn from(f: &SymbolizedFrame) -> Self {
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
    /// `heap`, or `growth` in growth mode.
    pub kind: &'static str,
    /// The process (merged: the first of them).
    pub pid: u32,
    /// How many processes hold this row: more than one when rows of one executable in one
    /// container merge (`--by-pid` keeps them apart).
    #[serde(skip_serializing_if = "is_one")]
    pub processes: u32,
    /// The first of those processes' pids ([`PIDS_SHOWN`] at most), when more than one.
    #[serde(skip_serializing_if = "at_most_one")]
    pub pids: Vec<u32>,
    /// Who the process is.
    #[serde(flatten)]
    pub owner: Owner,
    /// Outstanding blocks at least `--min-age` old.
    pub outstanding_count: u64,
    /// Their bytes.
    pub outstanding_bytes: u64,
    /// Blocks this stack allocated.
    pub allocs: u64,
    /// Of those, how many were freed.
    pub frees: u64,
    /// Age of the oldest outstanding block (at exit, for `at_exit` rows).
    pub oldest_age_s: f64,
    /// True when the process has exited (or exec'd) and this is what it held then.
    pub at_exit: bool,
    /// Growth of `outstanding_bytes` per second over the recent reports, when known (the
    /// slope of `trend`).
    pub growth_bytes_per_s: Option<f64>,
    /// The ages and sizes of the blocks counted in `outstanding_count` (pages in growth
    /// mode), when described (the heaviest rows).
    pub held: Option<Held>,
    /// What the row's bytes did over the recent reports, and the verdict drawn from it;
    /// `None` for what a process held at exit.
    pub trend: Option<Verdict>,
    /// The stack walk hit its depth limit or broke: outer frames are missing.
    pub truncated: bool,
    /// The whole stack, innermost first: the allocator's and the runtime's frames, then the
    /// program's from `frames[site]` on.
    pub frames: Vec<Frame>,
    /// The row's site: the index in `frames` of its first frame in the program's own code,
    /// the code that called the allocator (directly or through its runtime: `operator new`,
    /// `std::vector`, `strdup`, the loader for `dlopen`, ...).
    pub site: usize,
}

/// A process the node agent traced exactly (its heap, with allocator probes).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tier2 {
    /// The process.
    pub pid: u32,
    /// Who it is.
    #[serde(flatten)]
    pub owner: Owner,
    /// Why: the selector it matched, or the growth that promoted it.
    pub reason: String,
    /// When exact tracing began, seconds since the agent started.
    pub since_s: f64,
    /// When it ended (`None`: still traced).
    pub until_s: Option<f64>,
    /// Why it ended: the promotion's time budget ran out, or the process exited.
    pub end: Option<String>,
}

/// Pids a merged row lists.
pub const PIDS_SHOWN: usize = 16;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn at_most_one(pids: &[u32]) -> bool {
    pids.len() <= 1
}

/// Who a row belongs to, as the node tells it: the process's name, executable, cgroup, the
/// container and Kubernetes pod that cgroup names, and the names the node's kubelet gives
/// them (see [`crate::targets::pods`]). Unknown parts are left out of the JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Owner {
    /// The command name.
    pub comm: String,
    /// The executable, as `/proc/PID/exe` names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// The cgroup (the memory controller's on a v1 hierarchy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The id of the container the cgroup belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The runtime that made that container: `docker`, `containerd`, `cri-o` or `podman`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<&'static str>,
    /// The container's name in its pod's spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// The namespace of the Kubernetes pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The name of the Kubernetes pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The uid of the Kubernetes pod the cgroup belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl Owner {
    /// An owner known by its command name only.
    pub fn named(comm: impl Into<String>) -> Self {
        Self {
            comm: comm.into(),
            ..Self::default()
        }
    }
}

/// Descriptors still open, per creating stack (the JSON `fd_leaks` entries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdLeak {
    /// The process (merged: the first of them).
    pub pid: u32,
    /// How many processes hold this row: more than one when rows of one executable in one
    /// container merge (`--by-pid` keeps them apart).
    #[serde(skip_serializing_if = "is_one")]
    pub processes: u32,
    /// The first of those processes' pids ([`PIDS_SHOWN`] at most), when more than one.
    #[serde(skip_serializing_if = "at_most_one")]
    pub pids: Vec<u32>,
    /// Who the process is.
    #[serde(flatten)]
    pub owner: Owner,
    /// Descriptors this stack created that are still open (or were open at exit).
    pub outstanding: u64,
    /// `file`, `socket`, `pipe` or `other`.
    pub fd_kind: &'static str,
    /// Example paths, for files.
    pub paths: Vec<String>,
    /// Descriptors this stack created.
    pub opened: u64,
    /// Of those, how many were closed.
    pub closed: u64,
    /// Age of the oldest still open (at exit, for `at_exit` rows).
    pub oldest_age_s: f64,
    /// True when the process has exited and this is what it had open then.
    pub at_exit: bool,
    /// What `outstanding` did over the recent reports, and the verdict drawn from it;
    /// `None` for what a process had open at exit.
    pub trend: Option<Verdict>,
    /// The stack walk hit its depth limit or broke: outer frames are missing.
    pub truncated: bool,
    /// The whole stack, innermost first: the libc wrapper (open, socket, fopen, ...) and
    /// what it called, then the program's frames from `frames[site]` on.
    pub frames: Vec<Frame>,
    /// The index in `frames` of the code that called the libc wrapper.
    pub site: usize,
}

/// A stack holding descriptors (in [`FdExhaustion::top_holders`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdHolder {
    /// Descriptors it holds.
    pub outstanding: u64,
    /// `file`, `socket`, `pipe` or `other`.
    pub fd_kind: &'static str,
    /// The stack that created them, from its site outward (a notice shows the site first;
    /// the rows in `fd_leaks` have the whole stack).
    pub frames: Vec<Frame>,
}

/// A process that ran out of descriptors (the JSON `fd_exhaustion` entries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdExhaustion {
    /// The process.
    pub pid: u32,
    /// Its command name.
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
    /// The call that failed, from its site outward.
    pub frames: Vec<Frame>,
    /// The stacks holding the most descriptors at that moment.
    pub top_holders: Vec<FdHolder>,
}

/// Temp files a stack created that still exist (the JSON `tmp_leaks` entries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TmpLeak {
    /// The process (merged: the first of them).
    pub pid: u32,
    /// How many processes hold this row: more than one when rows of one executable in one
    /// container merge (`--by-pid` keeps them apart).
    #[serde(skip_serializing_if = "is_one")]
    pub processes: u32,
    /// The first of those processes' pids ([`PIDS_SHOWN`] at most), when more than one.
    #[serde(skip_serializing_if = "at_most_one")]
    pub pids: Vec<u32>,
    /// Who the process is.
    #[serde(flatten)]
    pub owner: Owner,
    /// Temp files still on disk.
    pub files: u64,
    /// Their current size on disk.
    pub bytes: u64,
    /// Example paths.
    pub paths: Vec<String>,
    /// Age of the oldest.
    pub oldest_age_s: f64,
    /// What `files` did over the recent reports, and the verdict drawn from it.
    pub trend: Option<Verdict>,
    /// The stack walk hit its depth limit or broke: outer frames are missing.
    pub truncated: bool,
    /// The whole stack that created them, innermost first.
    pub frames: Vec<Frame>,
    /// The index in `frames` of the program's code that created them.
    pub site: usize,
}

/// Outstanding heap bytes of a process some time before an event.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GrowthSample {
    /// Seconds before the event (negative).
    pub t_s: f64,
    /// Outstanding heap bytes then.
    pub outstanding_bytes: u64,
}

/// A heap stack in an OOM record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeapHolder {
    /// Bytes it held.
    pub outstanding_bytes: u64,
    /// Blocks it held.
    pub outstanding_count: u64,
    /// The stack, from its site outward (the rows in `leaks` have the whole stack).
    pub frames: Vec<Frame>,
}

/// An OOM kill (the JSON `oom_kills` entries), written out as soon as it happens.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OomKill {
    /// The victim.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Its cgroup path, when known.
    pub cgroup: Option<String>,
    /// Its container, when it ran in one.
    pub container_id: Option<String>,
    /// Its Kubernetes pod, when it ran in one.
    pub pod_uid: Option<String>,
    /// That pod's namespace, when the node names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// That pod's name, when the node names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Its container's name in the pod, when the node names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// Resident memory when chosen (anonymous + file + shared).
    pub rss_bytes: u64,
    /// Of which anonymous memory.
    pub anon_rss_bytes: u64,
    /// The memory limit of its cgroup, when it has one.
    pub limit_bytes: Option<u64>,
    /// Its `oom_score_adj`.
    pub oom_score_adj: i32,
    /// Whether leaktrace was tracing it (then the stacks below are filled in).
    pub traced: bool,
    /// Wall-clock time of the kill (RFC 3339, UTC).
    pub time: String,
    /// The heap stack holding the most bytes.
    pub frames_top: Vec<Frame>,
    /// The heap stacks holding the most bytes.
    pub heap_top: Vec<HeapHolder>,
    /// The stacks holding the most descriptors.
    pub fd_top: Vec<FdHolder>,
    /// Its outstanding heap bytes over the minutes before the kill.
    pub growth: Vec<GrowthSample>,
    /// The rate over the last minute, bytes per second.
    pub growth_bytes_per_s: Option<f64>,
}

/// A complete report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Session-wide figures.
    pub summary: Summary,
    /// Ranked by outstanding bytes, largest first.
    pub leaks: Vec<Leak>,
    /// Blocks the C/C++ runtime holds for itself, ranked the same way (not leaks).
    pub runtime: Vec<Leak>,
    /// Ranked by descriptors held, most first.
    pub fd_leaks: Vec<FdLeak>,
    /// Processes that ran out of descriptors.
    pub fd_exhaustion: Vec<FdExhaustion>,
    /// Ranked by bytes on disk.
    pub tmp_leaks: Vec<TmpLeak>,
    /// OOM kills seen.
    pub oom_kills: Vec<OomKill>,
    /// The node agent's first tier: the pages each stack made resident and kept, in every
    /// process (kept apart from `leaks`, the exact heap of the processes traced in full).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub growth: Vec<Leak>,
    /// The node agent's second tier: each process it traced exactly, why, and until when.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tier2: Vec<Tier2>,
    /// Things the reader must know about this report (once each): probes that never fired,
    /// selectors that matched nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
    /// The GNU build id of each module the rows' frames name, by its path.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub build_ids: std::collections::BTreeMap<String, String>,
    /// Set on the last report of a session.
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// The tracer's own CPU time and peak memory, for overhead accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
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
