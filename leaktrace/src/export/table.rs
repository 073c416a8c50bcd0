//! The human report: a summary line, then each leaking stack with its figures and frames.
use std::fmt::Write as _;

use crate::{
    export::Exporter,
    report::{
        FdExhaustion, FdHolder, FdLeak, Frame, Leak, OomKill, Owner, Report, TmpLeak,
        verdict::Verdict,
    },
    track::held::Held,
};

/// `1.5 MiB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `word`, with an `s` unless there is exactly one.
fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// `12,345`-style counts.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn age(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1}s")
    } else if s < 7200.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

fn leak(out: &mut String, rank: usize, l: &Leak) {
    let when = if l.at_exit {
        "in use at exit"
    } else {
        "outstanding"
    };
    if l.kind == "growth" {
        let _ = write!(
            out,
            "#{rank} {} in {} pages written and kept{} — {}, pages written {}, given back {}, oldest {}",
            bytes(l.outstanding_bytes),
            count(l.outstanding_count),
            if l.at_exit { " to exit" } else { "" },
            who(l.pid, l.processes, &l.pids, &l.owner),
            count(l.allocs),
            count(l.frees),
            age(l.oldest_age_s),
        );
    } else {
        let _ = write!(
            out,
            "#{rank} {} in {} blocks {when} — {}, allocs {}, frees {}, oldest {}",
            bytes(l.outstanding_bytes),
            count(l.outstanding_count),
            who(l.pid, l.processes, &l.pids, &l.owner),
            count(l.allocs),
            count(l.frees),
            age(l.oldest_age_s),
        );
    }
    if let Some(g) = l.growth_bytes_per_s {
        let _ = write!(out, ", growth {}", rate(g, "bytes"));
    }
    out.push('\n');
    verdict(out, l.trend.as_ref());
    if let Some(h) = &l.held {
        held(
            out,
            h,
            if l.kind == "growth" {
                "pages"
            } else {
                "blocks"
            },
        );
    }
    frames(out, &l.frames, l.site, l.truncated);
}

/// `+1.5 MiB/s`, `-2.0/s`: a slope in `unit`s per second.
pub(crate) fn rate(per_s: f64, unit: &str) -> String {
    let sign = if per_s < 0.0 { "-" } else { "+" };
    if unit == "bytes" {
        format!("{sign}{}/s", bytes(per_s.abs() as u64))
    } else {
        format!("{sign}{:.1}/s", per_s.abs())
    }
}

/// `    verdict leak, 93% sure: +1.1 MiB/s, R² 0.99 over 12 intervals (2.4s)`.
fn verdict(out: &mut String, v: Option<&Verdict>) {
    let Some(v) = v else {
        return;
    };
    let _ = write!(
        out,
        "    verdict {}, {:.0}% sure: {}, R² {:.2} over {} {} ({})",
        v.verdict.name(),
        v.confidence * 100.0,
        rate(v.slope_per_s, v.unit),
        v.r2,
        v.intervals,
        plural(u64::from(v.intervals), "interval"),
        age(v.window_s),
    );
    if v.releases > 0 {
        let _ = write!(out, ", released {} times", v.releases);
    }
    out.push('\n');
}

/// `    blocks aged p50 1.0s, p90 3.6s, max 4.0s; sized p50 64 B, p90 64 B, max 1.0 KiB`.
fn held(out: &mut String, h: &Held, what: &str) {
    let (a, z) = (h.age_ms(), h.size());
    let secs = |ms: u64| age(ms as f64 / 1e3);
    let _ = writeln!(
        out,
        "    {what} aged p50 {}, p90 {}, max {}; sized p50 {}, p90 {}, max {}",
        secs(a.p50),
        secs(a.p90),
        secs(a.max),
        bytes(z.p50),
        bytes(z.p90),
        bytes(z.max),
    );
}

/// The frames of a stack, one per line, indented. When the site is not the first frame (the
/// allocator's or the runtime's frames come first), its line is marked `>`.
fn frames(out: &mut String, frames: &[Frame], site: usize, truncated: bool) {
    for (i, f) in frames.iter().enumerate() {
        let symbol = f.symbol.as_deref().unwrap_or("??");
        let mark = if site > 0 && i == site { '>' } else { ' ' };
        let _ = write!(out, "  {mark} {i:>2} {:#x} {symbol}", f.addr);
        if f.inlined {
            out.push_str(" (inlined)");
        }
        if let (Some(file), Some(line)) = (&f.file, f.line) {
            let _ = write!(out, " at {file}:{line}");
        }
        match (&f.module, &f.offset) {
            (Some(m), Some(o)) if f.symbol.is_none() => {
                let _ = write!(out, " in {m}+{o:#x}");
            }
            (Some(m), _) => {
                let _ = write!(out, " in {}", m.rsplit('/').next().unwrap_or(m));
            }
            _ => {}
        }
        out.push('\n');
    }
    if truncated {
        out.push_str("       … stack truncated or incomplete\n");
    }
}

fn fd_leak(out: &mut String, rank: usize, l: &FdLeak) {
    let when = if l.at_exit { "open at exit" } else { "open" };
    let _ = writeln!(
        out,
        "#{rank} {} {} {} {when} — {}, opened {}, closed {}, oldest {}",
        count(l.outstanding),
        l.fd_kind,
        plural(l.outstanding, "descriptor"),
        who(l.pid, l.processes, &l.pids, &l.owner),
        count(l.opened),
        count(l.closed),
        age(l.oldest_age_s),
    );
    if !l.paths.is_empty() {
        let _ = writeln!(out, "    paths: {}", l.paths.join(", "));
    }
    verdict(out, l.trend.as_ref());
    frames(out, &l.frames, l.site, l.truncated);
}

/// The stacks holding descriptors, most first: each one's innermost frames.
fn holders(out: &mut String, holders: &[FdHolder]) {
    for h in holders {
        let _ = writeln!(
            out,
            "  holding {} {} {}{}",
            count(h.outstanding),
            h.fd_kind,
            plural(h.outstanding, "descriptor"),
            if h.frames.is_empty() {
                " (stack lost)"
            } else {
                ":"
            }
        );
        frames(
            out,
            &h.frames[..h.frames.len().min(HOLDER_FRAMES)],
            0,
            false,
        );
    }
}

/// Frames shown per holder in a notice: enough to name the site.
const HOLDER_FRAMES: usize = 4;

/// Who holds a row: `pid 42 (comm)`, or `3 processes of comm (pids 42, 43, 44)`, and the
/// container and pod when there are: `in containerd 0123456789ab, pod payments/api-7f9c,
/// container api`.
pub(crate) fn who(pid: u32, processes: u32, pids: &[u32], owner: &Owner) -> String {
    let mut s = if processes > 1 {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let more = if (processes as usize) > pids.len() {
            ", …"
        } else {
            ""
        };
        format!(
            "{processes} processes of {} (pids {}{more})",
            owner.comm,
            list.join(", ")
        )
    } else {
        format!("pid {pid} ({})", owner.comm)
    };
    if let Some(id) = &owner.container_id {
        let runtime = owner.container_runtime.unwrap_or("container");
        let _ = write!(s, " in {runtime} {}", &id[..id.len().min(12)]);
    }
    s.push_str(&pod_identity(
        owner.namespace.as_deref(),
        owner.pod.as_deref(),
        owner.container_name.as_deref(),
    ));
    s
}

/// `, pod NAMESPACE/POD, container NAME`, the parts the node names; "" outside pods.
pub(crate) fn pod_identity(
    namespace: Option<&str>,
    pod: Option<&str>,
    container: Option<&str>,
) -> String {
    let mut s = String::new();
    if let (Some(ns), Some(pod)) = (namespace, pod) {
        let _ = write!(s, ", pod {ns}/{pod}");
        if let Some(c) = container {
            let _ = write!(s, ", container {c}");
        }
    }
    s
}

fn tmp_leak(out: &mut String, rank: usize, l: &TmpLeak) {
    let _ = writeln!(
        out,
        "#{rank} {} temp {}, {} on disk — {}, oldest {}",
        count(l.files),
        plural(l.files, "file"),
        bytes(l.bytes),
        who(l.pid, l.processes, &l.pids, &l.owner),
        age(l.oldest_age_s),
    );
    let _ = writeln!(out, "    paths: {}", l.paths.join(", "));
    verdict(out, l.trend.as_ref());
    frames(out, &l.frames, l.site, l.truncated);
}

/// The line printed the moment a process runs out of descriptors.
pub fn exhaustion_notice(x: &FdExhaustion) -> String {
    let mut out = String::new();
    let site = x
        .frames
        .first()
        .and_then(|f| f.symbol.as_deref())
        .unwrap_or("??");
    let limit = x.limit.map_or_else(|| "?".to_owned(), |l| l.to_string());
    let _ = writeln!(
        out,
        "leaktrace: pid {} ({}) ran out of descriptors ({}, limit {limit}, {} open), {} time{} in {site}",
        x.pid,
        x.comm,
        x.errno,
        x.open,
        count(x.count),
        if x.count == 1 { "" } else { "s" }
    );
    frames(&mut out, &x.frames, 0, false);
    holders(&mut out, &x.top_holders);
    out
}

/// The record printed the moment the OOM killer chooses a victim.
pub fn oom_notice(k: &OomKill) -> String {
    let mut out = String::new();
    let limit = k
        .limit_bytes
        .map_or_else(String::new, |l| format!(" of a {} limit", bytes(l)));
    let _ = writeln!(
        out,
        "leaktrace: OOM kill at {}: pid {} ({}), rss {}{limit}, cgroup {}{}{}",
        k.time,
        k.pid,
        k.comm,
        bytes(k.rss_bytes),
        k.cgroup.as_deref().unwrap_or("?"),
        k.container_id
            .as_deref()
            .map_or_else(String::new, |c| format!(
                ", container {}",
                &c[..12.min(c.len())]
            )),
        pod_identity(
            k.namespace.as_deref(),
            k.pod.as_deref(),
            k.container_name.as_deref()
        ),
    );
    if !k.traced {
        out.push_str("  (not traced by leaktrace: no stacks)\n");
        return out;
    }
    if let (Some(first), Some(last), Some(rate)) =
        (k.growth.first(), k.growth.last(), k.growth_bytes_per_s)
    {
        let sign = if rate < 0.0 { "-" } else { "+" };
        let _ = writeln!(
            out,
            "  outstanding heap {} → {} over the last {}, {sign}{}/s",
            bytes(first.outstanding_bytes),
            bytes(last.outstanding_bytes),
            age(last.t_s - first.t_s),
            bytes(rate.abs() as u64)
        );
    }
    for h in &k.heap_top {
        let _ = writeln!(
            out,
            "  heap: {} in {} blocks{}",
            bytes(h.outstanding_bytes),
            count(h.outstanding_count),
            if h.frames.is_empty() {
                " (stack lost)"
            } else {
                ":"
            }
        );
        frames(
            &mut out,
            &h.frames[..h.frames.len().min(HOLDER_FRAMES)],
            0,
            false,
        );
    }
    holders(&mut out, &k.fd_top);
    out
}

/// The human report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Table;

impl Exporter for Table {
    fn export(&self, report: &Report) -> Vec<u8> {
        let mut out = String::new();
        header(&mut out, report);
        let s = &report.summary;
        if report.leaks.is_empty() {
            let _ = writeln!(
                out,
                "no outstanding allocations{}",
                if s.min_age_s > 0.0 {
                    format!(" older than {}", age(s.min_age_s))
                } else {
                    String::new()
                }
            );
        }
        for (i, l) in report.leaks.iter().enumerate() {
            out.push('\n');
            leak(&mut out, i + 1, l);
        }
        descriptors(&mut out, report);
        temp_files(&mut out, report);
        for k in &report.oom_kills {
            out.push('\n');
            out.push_str(&oom_notice(k).replacen("leaktrace: ", "", 1));
        }
        if s.runtime_outstanding_count > 0 {
            let _ = writeln!(
                out,
                "\n(not counted as leaks: {} in {} blocks the C/C++ runtime keeps for itself — stdio buffers, locale, thread data — for as long as the process lives)",
                bytes(s.runtime_outstanding_bytes),
                count(s.runtime_outstanding_count),
            );
        }
        out.into_bytes()
    }
}

/// The lines above the leaks: how the heap was traced, the summary, lost events.
fn header(out: &mut String, report: &Report) {
    let s = &report.summary;
    if s.sample_bytes > 0 {
        let _ = writeln!(
            out,
            "sampled: one allocated byte in {} on average; heap bytes are estimates, block counts are of sampled blocks",
            count(s.sample_bytes),
        );
    }
    if s.mode == "growth" {
        let _ = writeln!(
            out,
            "growth mode: no allocator probe; each stack's figures are the pages (4 KiB, or 2 MiB huge pages) its writes, or the kernel's writes for its system calls, first added to the process and the process has not given back (munmap, madvise, brk)",
        );
    }
    let _ = writeln!(
        out,
        "leaktrace {} after {}: {} allocs, {} frees, {} outstanding in {} blocks, {} unmatched frees, {} lost events",
        if report.is_final {
            "final report"
        } else {
            "report"
        },
        age(s.elapsed_s),
        count(s.allocs),
        count(s.frees),
        bytes(s.outstanding_bytes),
        count(s.outstanding_count),
        count(s.unmatched_frees),
        count(s.lost_events),
    );
    if s.lost_events > 0 {
        let causes: Vec<String> = s
            .lost_by_cause
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "warning: {} events were lost ({}); counts are lower bounds — try a larger --ring-buffer",
            count(s.lost_events),
            causes.join(", ")
        );
    }
}

/// The descriptor section: totals, leaks, and processes that ran out.
fn descriptors(out: &mut String, report: &Report) {
    let s = &report.summary;
    if !report.fd_leaks.is_empty() || s.fds_opened > 0 {
        let _ = writeln!(
            out,
            "\ndescriptors: {} opened, {} closed, {} still open",
            count(s.fds_opened),
            count(s.fds_closed),
            count(s.fds_outstanding)
        );
        for (i, l) in report.fd_leaks.iter().enumerate() {
            out.push('\n');
            fd_leak(out, i + 1, l);
        }
    }
    for x in &report.fd_exhaustion {
        out.push('\n');
        out.push_str(&exhaustion_notice(x).replacen("leaktrace: ", "", 1));
    }
}

/// The temp file section: totals and leaks.
fn temp_files(out: &mut String, report: &Report) {
    let s = &report.summary;
    if report.tmp_leaks.is_empty() && s.tmp_files_created == 0 {
        return;
    }
    let _ = writeln!(
        out,
        "\ntemp files: {} created, {} still on disk{}",
        count(s.tmp_files_created),
        count(s.tmp_files_outstanding),
        if s.tmp_files_unwatched > 0 {
            format!(
                " ({} more not watched: over {} at once)",
                count(s.tmp_files_unwatched),
                count(crate::track::tmp::MAX_WATCHED as u64)
            )
        } else {
            String::new()
        }
    );
    for (i, l) in report.tmp_leaks.iter().enumerate() {
        out.push('\n');
        tmp_leak(out, i + 1, l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(100), "100");
    }

    #[test]
    fn the_owner_line_names_the_container_and_pod() {
        let mut o = Owner {
            container_id: Some("0123456789abcdef".into()),
            container_runtime: Some("containerd"),
            pod_uid: Some("0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c".into()),
            ..Owner::named("api")
        };
        assert_eq!(
            who(42, 1, &[42], &o),
            "pid 42 (api) in containerd 0123456789ab"
        );
        o.namespace = Some("payments".into());
        o.pod = Some("api-7f9c".into());
        assert_eq!(
            who(42, 1, &[42], &o),
            "pid 42 (api) in containerd 0123456789ab, pod payments/api-7f9c"
        );
        o.container_name = Some("api".into());
        assert_eq!(
            who(42, 2, &[42, 43], &o),
            "2 processes of api (pids 42, 43) in containerd 0123456789ab, pod payments/api-7f9c, \
             container api"
        );
    }
}
