//! What the pipeline says: full reports, and the records that cannot wait for one (an OOM
//! kill, a full descriptor table), each built from the trackers and named late.
use leaktrace_common::OomEvent;
use serde::{Deserialize, Serialize};

use super::pipeline::{Alert, Exhaustion, Pipeline};
use crate::{
    report::{
        self, FdExhaustion, FdHolder, Frame, HeapHolder, OomKill, Owner, ProbeSummary, Report,
        ReportInput, WalkSummary,
    },
    track::fd_events::Exhausted,
};

/// What only the kernel side knows, read by the driver when it asks for a report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelStats {
    /// Lost events by cause.
    pub lost: Vec<(String, u64)>,
    /// Frees of never-seen addresses counted in the kernel instead of sent.
    pub filtered_frees: u64,
    /// Of such frees, those made by threads on their way out, counted apart (absent in
    /// recordings made before they were).
    #[serde(default)]
    pub thread_exit_frees: u64,
    /// Stack captures the kernel's per-CPU walk cache answered without walking.
    pub stack_cache_hits: u64,
    /// Stack captures that walked.
    pub stack_walks: u64,
    /// Stack walking cost (`--measure-walks` only).
    pub walks: Option<WalkSummary>,
    /// The uprobes (absent in recordings made before they were reported).
    #[serde(default)]
    pub probes: Option<ProbeSummary>,
}

/// Rows a report describes the blocks of (`held`) when it lists every row: the heaviest.
/// 100,000 stacks holding 1M blocks took 400 ms to describe, and 250 MB for that moment.
const DESCRIBED_ROWS: usize = 1000;

impl Pipeline {
    /// A report of everything tracked so far.
    pub fn report(&mut self, is_final: bool, kernel: &KernelStats) -> Report {
        self.log_report(is_final, kernel);
        let now = self.host.now_ns();
        // Only the rows a report lists get the ages and sizes of what they hold, and at most
        // DESCRIBED_ROWS when it lists every row: each costs a pair of histograms (~2 KiB)
        // while the report is built.
        let described = Some(self.options.row_limit.unwrap_or(DESCRIBED_ROWS));
        let snapshot = self
            .heap
            .snapshot_described(now, self.options.min_age_ns, described);
        let mut lost: Vec<(&'static str, u64)> = kernel
            .lost
            .iter()
            .map(|(cause, n)| (cause_name(cause), *n))
            .collect();
        lost.push(("undecodable", self.decode_errors));
        // Tables that were full: counted like the kernel side's losses.
        if self.stacks.dropped() > 0 {
            lost.push(("stack_table_full", self.stacks.dropped()));
        }
        if self.heap.totals().table_full > 0 {
            lost.push(("heap_table_full", self.heap.totals().table_full));
        }
        if let Some(pages) = self.pages.as_ref().filter(|p| p.totals().table_full > 0) {
            lost.push(("growth_table_full", pages.totals().table_full));
        }
        let fds = self.fd.fds.snapshot(snapshot.now_ms);
        let tmp = self.fd.tmp_rows(self.host.as_ref());
        let exhaustion: Vec<FdExhaustion> =
            self.exhaustion.iter().map(|x| x.record.clone()).collect();
        let (owners, host) = (&self.owners, self.host.as_ref());
        let owner = |pid: u32| {
            owners
                .get(&pid)
                .cloned()
                .unwrap_or_else(|| Owner::named(host.comm(pid)))
        };
        let input = ReportInput {
            snapshot: &snapshot,
            stacks: &self.stacks,
            lost: &lost,
            owner: &owner,
            is_final,
            walks: kernel.walks,
            fds: &fds,
            tmp: &tmp,
            tmp_created: self.fd.tmp.created,
            tmp_unwatched: self.fd.tmp.unwatched,
            // Sampled, the frees of blocks not sampled are filtered too: not "unmatched".
            filtered_frees: if self.options.sample_bytes == 0 {
                kernel.filtered_frees
            } else {
                0
            },
            thread_exit_frees: kernel.thread_exit_frees,
            tracer: host.usage(),
            stack_cache_hits: kernel.stack_cache_hits,
            stack_walks: kernel.stack_walks,
            probes: kernel.probes.clone(),
            fd_exhaustion: &exhaustion,
            oom_kills: &self.oom.records,
        };
        let mut report = report::build(&input, &self.options, &mut self.symbols, &mut self.trend);
        if let Some(pages) = &self.pages {
            let pages = pages.snapshot_described(now, self.options.min_age_ns, described);
            let mut growth = report::growth_leaks(
                &pages,
                &input,
                &self.options,
                &mut self.symbols,
                &mut self.growth_trend,
            );
            if let Some(top) = self.options.top {
                growth.truncate(top);
            }
            report.growth = growth;
        }
        let named: hashbrown::HashSet<String> = report
            .leaks
            .iter()
            .chain(&report.runtime)
            .chain(&report.growth)
            .flat_map(|l| &l.frames)
            .chain(report.fd_leaks.iter().flat_map(|l| &l.frames))
            .chain(report.tmp_leaks.iter().flat_map(|l| &l.frames))
            .filter_map(|f| f.module.clone())
            .collect();
        let build_ids = self
            .modules
            .build_ids()
            .filter(|(path, _)| named.contains(*path))
            .map(|(path, id)| (path.to_owned(), id.to_owned()))
            .collect();
        report.build_ids = build_ids;
        report
    }

    fn log_report(&mut self, is_final: bool, kernel: &KernelStats) {
        if let Some(r) = &mut self.recorder {
            r.write(&super::record::Entry::Report {
                is_final,
                kernel: kernel.clone(),
            });
        }
    }

    /// Symbolized, trimmed frames of a stack, for records written at once.
    fn frames(&mut self, id: u64) -> Vec<Frame> {
        report::stack_frames(&self.stacks, &mut self.symbols, id)
            .0
            .iter()
            .map(Frame::from)
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

    /// A call failed because the descriptor table is full: a record at once, with the
    /// stacks holding the most descriptors right now (once per process and failing stack).
    pub(super) fn on_exhausted(&mut self, x: Exhausted, at_ms: u32) -> Option<Alert> {
        if let Some(seen) = self
            .exhaustion
            .iter_mut()
            .find(|r| r.pid == x.pid && r.stack_id == x.stack_id)
        {
            seen.record.count += 1;
            return None;
        }
        // The process may be gone already; then the last limit we saw it set.
        let limit = self
            .host
            .open_files_limit(x.pid)
            .or_else(|| self.fd.limit(x.pid));
        let record = FdExhaustion {
            pid: x.pid,
            comm: self.comm(x.pid),
            errno: if x.errno == leaktrace_common::linux::ENFILE {
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
        self.exhaustion.push(Exhaustion {
            pid: x.pid,
            stack_id: x.stack_id,
            record: record.clone(),
        });
        Some(Alert::Exhausted(Box::new(record)))
    }

    /// The OOM killer chose a victim: the record is made now, while the victim's tables
    /// are still here. `None`: a process not traced, when only the traced ones' kills are
    /// wanted (`run`).
    pub(super) fn on_oom(&mut self, e: &OomEvent) -> Option<Alert> {
        let pid = e.victim;
        let traced = self.is_tracked(pid);
        if !traced && self.options.oom_traced_only {
            return None;
        }
        let at_ms = self.heap.ms_since_epoch(e.hdr.ts_ns);
        let comm = String::from_utf8_lossy(e.comm.split(|&b| b == 0).next().unwrap_or_default())
            .into_owned();
        let attribution = self.oom.victim_attribution(self.host.as_ref(), pid);
        let (mut heap_top, mut fd_top, mut growth, mut rate) =
            (Vec::new(), Vec::new(), Vec::new(), None);
        if traced {
            let (_, bytes) = self.heap.outstanding_of(pid);
            (growth, rate) = self.oom.growth(pid, at_ms, bytes);
            for c in self.heap.top_stacks(pid, 5) {
                heap_top.push(HeapHolder {
                    outstanding_bytes: c.outstanding_bytes,
                    outstanding_count: c.outstanding_count,
                    frames: self.frames(c.stack_id),
                });
            }
            fd_top = self.holders(pid);
        }
        let kill = OomKill {
            pid,
            comm,
            cgroup: attribution.as_ref().map(|p| p.cgroup.clone()),
            container_id: attribution.as_ref().and_then(|p| p.container_id.clone()),
            pod_uid: attribution.as_ref().and_then(|p| p.pod_uid.clone()),
            // Named with the report's rows (see `report::annotate`).
            namespace: None,
            pod: None,
            container_name: None,
            rss_bytes: (e.anon_rss_kb + e.file_rss_kb + e.shmem_rss_kb) * 1024,
            anon_rss_bytes: e.anon_rss_kb * 1024,
            limit_bytes: attribution.and_then(|p| p.limit_bytes),
            oom_score_adj: e.oom_score_adj,
            traced,
            time: self.host.utc_now(),
            frames_top: heap_top
                .first()
                .map(|h| h.frames.clone())
                .unwrap_or_default(),
            heap_top,
            fd_top,
            growth,
            growth_bytes_per_s: rate,
        };
        self.oom.record(kill.clone());
        Some(Alert::Oom(Box::new(kill)))
    }
}

/// The `&'static` name of a loss cause read back from a recording.
fn cause_name(cause: &str) -> &'static str {
    leaktrace_common::drop_reason::NAMES
        .iter()
        .find(|&&n| n == cause)
        .copied()
        .unwrap_or("unknown")
}
