//! One self-contained page (`--format html`, and the node agent's `/report.html`): what an
//! SRE opens during an incident. It loads nothing from anywhere: the styles are inline, the
//! charts are inline SVG drawn here (no chart library, no script), and each flame graph is
//! inferno's own SVG, with its search and zoom script, in an `<iframe srcdoc>`.
//!
//! The frames sit in iframes because inferno's script assumes it owns its document (the first
//! `<svg>`, fixed element ids, listeners on the window): several of them inline in one page
//! would take each other's clicks. In an iframe each keeps its own document.
//!
//! The page: what was traced (command, target, kernel), the headline figures, OOM kills and
//! descriptor exhaustion, the growth over time of the top stacks and of the whole process,
//! a flame graph per kind of leak that has stacks, the ranked tables with verdicts and ages,
//! and the lost-event counters. Every text from the report is escaped.
use std::fmt::Write as _;

use crate::{
    export::{
        Exporter, FoldedWeight, folded,
        svg::{self, Look},
        table::{age, bytes, count, pod_identity, rate, who},
    },
    report::{
        FdExhaustion, FdHolder, Frame, HeapHolder, Leak, OomKill, Report, Summary,
        verdict::{Shape, Verdict},
    },
    track::held::Held,
};

/// The page.
#[derive(Clone, Copy, Debug, Default)]
pub struct Html;

impl Exporter for Html {
    fn export(&self, report: &Report) -> Vec<u8> {
        page(report).into_bytes()
    }

    fn content_type(&self) -> &'static str {
        "text/html; charset=utf-8"
    }
}

const CSS: &str = include_str!("html.css");

/// Rows a table lists; the flame graphs and the JSON have them all.
const TABLE_ROWS: usize = 100;

/// Stacks a chart draws a line for (the heaviest with a series).
pub(crate) const CHART_LINES: usize = 8;

/// Line colours (Tableau 10): told apart at a glance, and by most colour-blind readers.
const COLOURS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// `text` safe in HTML (and XML) text and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One kind of row, as the page shows it.
struct Kind<'a> {
    /// The anchor and the CSS id stem.
    id: &'static str,
    /// The section's heading.
    title: &'static str,
    rows: Vec<View<'a>>,
    /// What a row's value counts, in the chart.
    unit: Unit,
    /// The flame graph's look and its folded lines.
    look: Look,
    folded: String,
    /// The whole-process line: the history's value for this kind.
    total: Option<fn(&crate::report::model::Totals) -> u64>,
}

/// What a chart's values count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Bytes,
    Count(&'static str),
}

impl Unit {
    fn label(self, v: f64) -> String {
        match self {
            Unit::Bytes => bytes(v.max(0.0) as u64),
            Unit::Count(_) => count(v.max(0.0).round() as u64),
        }
    }
}

/// A row of any kind, as tables and charts show it.
struct View<'a> {
    frames: &'a [Frame],
    /// The index in `frames` of the row's site.
    site: usize,
    truncated: bool,
    who: String,
    /// The headline figure and what is under it.
    holds: String,
    holds_sub: String,
    /// What the chart plots now (bytes, descriptors, files).
    value: u64,
    trend: Option<&'a Verdict>,
    at_exit: bool,
    held: Option<&'a Held>,
    oldest_s: f64,
    paths: &'a [String],
}

fn leak_view(l: &Leak) -> View<'_> {
    let (what, sub) = if l.kind == "growth" {
        (
            format!("{} pages", count(l.outstanding_count)),
            format!("written {}, given back {}", count(l.allocs), count(l.frees)),
        )
    } else {
        (
            format!("{} blocks", count(l.outstanding_count)),
            format!("allocs {}, frees {}", count(l.allocs), count(l.frees)),
        )
    };
    View {
        frames: &l.frames,
        site: l.site,
        truncated: l.truncated,
        who: who(l.pid, l.processes, &l.pids, &l.owner),
        holds: bytes(l.outstanding_bytes),
        holds_sub: format!("in {what}; {sub}"),
        value: l.outstanding_bytes,
        trend: l.trend.as_ref(),
        at_exit: l.at_exit,
        held: l.held.as_ref(),
        oldest_s: l.oldest_age_s,
        paths: &[],
    }
}

/// The kinds of the report that have rows, in the order the page shows them.
fn kinds(r: &Report) -> Vec<Kind<'_>> {
    let heap: Vec<&Leak> = r.leaks.iter().filter(|l| l.kind == "heap").collect();
    let growth: Vec<&Leak> = r
        .leaks
        .iter()
        .chain(&r.growth)
        .filter(|l| l.kind == "growth")
        .collect();
    let growth_mode = r.summary.mode == "growth";
    let weight = FoldedWeight::Bytes;
    let mut kinds = vec![
        Kind {
            id: "heap",
            title: "Heap",
            folded: folded::fold(folded::leak_rows(heap.iter().copied(), weight)),
            rows: heap.into_iter().map(leak_view).collect(),
            unit: Unit::Bytes,
            look: Look::heap(weight),
            total: (!growth_mode).then_some(|t| t.outstanding_bytes),
        },
        Kind {
            id: "growth",
            title: "Growth (pages written and kept)",
            folded: folded::fold(folded::leak_rows(growth.iter().copied(), weight)),
            rows: growth.into_iter().map(leak_view).collect(),
            unit: Unit::Bytes,
            look: Look::growth(weight),
            total: growth_mode.then_some(|t| t.outstanding_bytes),
        },
        Kind {
            id: "fd",
            title: "Descriptors",
            folded: folded::fold(folded::rows(r, weight, super::FoldedKind::Fd)),
            rows: r
                .fd_leaks
                .iter()
                .map(|l| View {
                    frames: &l.frames,
                    site: l.site,
                    truncated: l.truncated,
                    who: who(l.pid, l.processes, &l.pids, &l.owner),
                    holds: format!("{} open", count(l.outstanding)),
                    holds_sub: format!(
                        "{} descriptors; opened {}, closed {}",
                        l.fd_kind,
                        count(l.opened),
                        count(l.closed)
                    ),
                    value: l.outstanding,
                    trend: l.trend.as_ref(),
                    at_exit: l.at_exit,
                    held: None,
                    oldest_s: l.oldest_age_s,
                    paths: &l.paths,
                })
                .collect(),
            unit: Unit::Count("descriptors"),
            look: Look::fd(),
            total: Some(|t| t.fds_outstanding),
        },
        Kind {
            id: "tmp",
            title: "Temp files",
            folded: folded::fold(folded::rows(r, weight, super::FoldedKind::Tmp)),
            rows: r
                .tmp_leaks
                .iter()
                .map(|l| View {
                    frames: &l.frames,
                    site: l.site,
                    truncated: l.truncated,
                    who: who(l.pid, l.processes, &l.pids, &l.owner),
                    holds: format!("{} files", count(l.files)),
                    holds_sub: format!("{} on disk", bytes(l.bytes)),
                    value: l.files,
                    trend: l.trend.as_ref(),
                    at_exit: false,
                    held: None,
                    oldest_s: l.oldest_age_s,
                    paths: &l.paths,
                })
                .collect(),
            unit: Unit::Count("files"),
            look: Look::tmp(weight),
            total: Some(|t| t.tmp_files_outstanding),
        },
    ];
    kinds.retain(|k| !k.rows.is_empty());
    kinds
}

fn page(r: &Report) -> String {
    let kinds = kinds(r);
    let mut out = String::with_capacity(64 << 10);
    let s = &r.summary;
    let title = match &s.target {
        Some(t) => format!("leaktrace · {t}"),
        None => "leaktrace report".to_owned(),
    };
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n\
         <meta name=\"color-scheme\" content=\"light\"/>\n<title>{}</title>\n<style>\n{CSS}</style>\n\
         </head>\n<body>\n",
        escape(&title)
    );
    header(&mut out, r, &kinds);
    cards(&mut out, r);
    alerts(&mut out, r);
    if kinds.is_empty() {
        out.push_str(
            "<section id=\"stacks\"><h2>Stacks</h2><p class=\"note\">No stack holds anything \
             in this report.</p></section>\n",
        );
    } else {
        charts(&mut out, r, &kinds);
        flames(&mut out, r, &kinds);
        for k in &kinds {
            table(&mut out, k);
        }
    }
    runtime(&mut out, r);
    counters(&mut out, s);
    notices(&mut out, r);
    let _ = write!(
        out,
        "<footer>leaktrace {} · a report from eBPF: outstanding means allocated (opened, \
         created) and not yet freed (closed, removed).</footer>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    out
}

fn header(out: &mut String, r: &Report, kinds: &[Kind<'_>]) {
    let s = &r.summary;
    let (badge, class) = if r.is_final {
        ("final report", "v-final")
    } else {
        ("live report", "v-live")
    };
    let _ = write!(
        out,
        "<header class=\"top\">\n<h1>leaktrace <span class=\"badge {class}\">{badge}</span>\
         <span class=\"when\">after {}</span></h1>\n<dl class=\"about\">\n",
        age(s.elapsed_s)
    );
    let mut item = |name: &str, value: &str, code: bool| {
        let value = escape(value);
        let value = if code {
            format!("<code>{value}</code>")
        } else {
            value
        };
        let _ = writeln!(out, "<dt>{name}</dt><dd>{value}</dd>");
    };
    if let Some(t) = &s.target {
        item("Target", t, false);
    }
    if let Some(c) = &s.command {
        item("Command", c, true);
    }
    if let Some(k) = &s.kernel {
        item("Kernel", k, false);
    }
    if let Some(h) = &s.host {
        item("Host", h, false);
    }
    let mut mode = match s.mode {
        "growth" => "growth: pages each stack made resident (no allocator probes)".to_owned(),
        _ => "full: every allocation and free (allocator probes)".to_owned(),
    };
    if s.sample_bytes > 0 {
        let _ = write!(
            mode,
            "; sampled, one byte in {} (bytes are estimates)",
            count(s.sample_bytes)
        );
    }
    if s.min_age_s > 0.0 {
        let _ = write!(mode, "; blocks younger than {} left out", age(s.min_age_s));
    }
    item("Mode", &mode, false);
    out.push_str("</dl>\n<nav class=\"toc\">");
    let mut link = |id: &str, name: &str| {
        let _ = write!(out, "<a href=\"#{id}\">{name}</a>");
    };
    if !r.oom_kills.is_empty() {
        link("oom", "OOM kills");
    }
    if !r.fd_exhaustion.is_empty() {
        link("emfile", "Descriptor exhaustion");
    }
    if !kinds.is_empty() {
        link("charts", "Growth over time");
        link("flames", "Flame graphs");
    }
    for k in kinds {
        link(&format!("{}-table", k.id), k.title);
    }
    link("counters", "Lost events and counters");
    out.push_str("</nav>\n</header>\n");
}

fn card(out: &mut String, class: &str, label: &str, value: &str, sub: &str) {
    let _ = writeln!(
        out,
        "<div class=\"card {class}\"><div class=\"label\">{label}</div>\
         <div class=\"value\">{}</div><div class=\"sub\">{}</div></div>",
        escape(value),
        escape(sub)
    );
}

fn cards(out: &mut String, r: &Report) {
    let s = &r.summary;
    out.push_str("<div class=\"cards\">\n");
    let heap = if s.mode == "growth" {
        "Pages kept"
    } else {
        "Heap outstanding"
    };
    card(
        out,
        "",
        heap,
        &bytes(s.outstanding_bytes),
        &format!(
            "in {} blocks; {} allocs, {} frees",
            count(s.outstanding_count),
            count(s.allocs),
            count(s.frees)
        ),
    );
    let mut verdicts = [0u64; Shape::ALL.len()];
    let trends = r
        .leaks
        .iter()
        .chain(&r.growth)
        .filter_map(|l| l.trend.as_ref())
        .chain(r.fd_leaks.iter().filter_map(|l| l.trend.as_ref()))
        .chain(r.tmp_leaks.iter().filter_map(|l| l.trend.as_ref()));
    for t in trends {
        if let Some(i) = Shape::ALL.iter().position(|&v| v == t.verdict) {
            verdicts[i] += 1;
        }
    }
    let leaks = verdicts[0];
    let others: Vec<String> = Shape::ALL
        .iter()
        .zip(verdicts)
        .skip(1)
        .filter(|&(_, n)| n > 0)
        .map(|(v, n)| format!("{n} {}", v.name()))
        .collect();
    card(
        out,
        if leaks > 0 { "bad" } else { "" },
        "Stacks judged leak",
        &count(leaks),
        &if others.is_empty() {
            "no other verdict".to_owned()
        } else {
            others.join(", ")
        },
    );
    card(
        out,
        "",
        "Descriptors open",
        &count(s.fds_outstanding),
        &format!(
            "{} opened, {} closed",
            count(s.fds_opened),
            count(s.fds_closed)
        ),
    );
    card(
        out,
        "",
        "Temp files on disk",
        &count(s.tmp_files_outstanding),
        &format!("{} created", count(s.tmp_files_created)),
    );
    card(
        out,
        if r.oom_kills.is_empty() { "" } else { "bad" },
        "OOM kills",
        &count(r.oom_kills.len() as u64),
        &format!(
            "{} descriptor exhaustion{}",
            count(r.fd_exhaustion.len() as u64),
            if r.fd_exhaustion.len() == 1 { "" } else { "s" }
        ),
    );
    card(
        out,
        if s.lost_events > 0 { "bad" } else { "good" },
        "Lost events",
        &count(s.lost_events),
        if s.lost_events > 0 {
            "counts are lower bounds"
        } else {
            "counts are exact"
        },
    );
    out.push_str("</div>\n");
}

/// The verdict cell: a coloured badge and how sure.
fn verdict_badge(trend: Option<&Verdict>, at_exit: bool) -> String {
    match trend {
        Some(v) => format!(
            "<span class=\"badge v-{name}\">{name}</span><span class=\"sub\">{:.0}% sure</span>",
            v.confidence * 100.0,
            name = v.verdict.name()
        ),
        None if at_exit => "<span class=\"badge v-exit\">at exit</span>".to_owned(),
        None => "—".to_owned(),
    }
}

/// How a frame is named: its symbol, else its module and offset.
fn frame_name(f: &Frame) -> String {
    match (&f.symbol, &f.module, f.offset) {
        (Some(s), _, _) => s.clone(),
        (None, Some(m), Some(o)) => format!("{}+{o:#x}", m.rsplit('/').next().unwrap_or(m)),
        (None, Some(m), None) => format!("[{}]", m.rsplit('/').next().unwrap_or(m)),
        (None, None, _) => format!("{:#x}", f.addr),
    }
}

/// `at cache.c:17 in cache-server`.
fn frame_place(f: &Frame) -> String {
    let mut s = String::new();
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let _ = write!(s, "at {file}:{line} ");
    }
    if let Some(m) = &f.module {
        let _ = write!(s, "in {}", m.rsplit('/').next().unwrap_or(m));
    }
    if f.inlined {
        s.push_str(" (inlined)");
    }
    s
}

/// The site (the first frame in the program's own code, `frames[site]`) in bold, then the
/// whole stack, folded away, the site marked in it.
fn stack_cell(out: &mut String, frames: &[Frame], site: usize, truncated: bool) {
    let Some(first) = frames.get(site).or(frames.first()) else {
        out.push_str("<span class=\"fn\">stack lost</span>");
        return;
    };
    let _ = write!(
        out,
        "<code class=\"fn\">{}</code> <span class=\"loc\">{}</span>",
        escape(&frame_name(first)),
        escape(&frame_place(first))
    );
    let _ = write!(
        out,
        "<details><summary>stack: {} frame{}{}</summary><ol class=\"stack\" start=\"0\">",
        frames.len(),
        if frames.len() == 1 { "" } else { "s" },
        if truncated { ", truncated" } else { "" }
    );
    for (i, f) in frames.iter().enumerate() {
        let _ = write!(
            out,
            "<li{}><code>{}</code> <span class=\"loc\">{} · {:#x}</span></li>",
            if i == site && site > 0 {
                " class=\"site\" title=\"the site: the first frame in the program's own code\""
            } else {
                ""
            },
            escape(&frame_name(f)),
            escape(&frame_place(f)),
            f.addr
        );
    }
    out.push_str("</ol></details>");
}

fn table(out: &mut String, k: &Kind<'_>) {
    let _ = writeln!(
        out,
        "<section id=\"{}-table\"><h2>{}: ranked stacks</h2>",
        k.id, k.title
    );
    if k.rows.len() > TABLE_ROWS {
        let _ = writeln!(
            out,
            "<p class=\"note\">The heaviest {TABLE_ROWS} of {} stacks; the flame graph and \
             the JSON report have them all.</p>",
            count(k.rows.len() as u64)
        );
    }
    let ages = if k.rows.iter().any(|v| v.held.is_some()) {
        "Ages p50 · p90 · max"
    } else {
        "Oldest"
    };
    let _ = writeln!(
        out,
        "<table class=\"rows\" id=\"{}-rows\"><thead><tr><th>#</th><th>Verdict</th>\
         <th>Holds</th><th>Trend</th><th>{ages}</th><th>Site and stack</th><th>Process</th>\
         </tr></thead><tbody>",
        k.id
    );
    for (i, v) in k.rows.iter().take(TABLE_ROWS).enumerate() {
        let verdict = v.trend.map_or("none", |t| t.verdict.name());
        let _ = write!(
            out,
            "<tr data-verdict=\"{verdict}\"><td class=\"num\">{}</td><td class=\"verdict\">{}</td>\
             <td class=\"num\">{}<span class=\"sub\">{}</span></td><td class=\"num\">",
            i + 1,
            verdict_badge(v.trend, v.at_exit),
            escape(&v.holds),
            escape(&v.holds_sub)
        );
        match v.trend {
            Some(t) => {
                let _ = write!(
                    out,
                    "{}<span class=\"sub\">R² {:.2} over {} intervals ({})</span>",
                    escape(&rate(t.slope_per_s, t.unit)),
                    t.r2,
                    t.intervals,
                    age(t.window_s)
                );
                if t.releases > 0 {
                    let _ = write!(
                        out,
                        "<span class=\"sub\">released {} times</span>",
                        t.releases
                    );
                }
            }
            None => out.push('—'),
        }
        out.push_str("</td><td class=\"num\">");
        match v.held {
            Some(h) if h.blocks() > 0 => {
                let (a, z) = (h.age_ms(), h.size());
                let secs = |ms: u64| age(ms as f64 / 1e3);
                let _ = write!(
                    out,
                    "{} · {} · {}<span class=\"sub\">sizes {} · {} · {}</span>",
                    secs(a.p50),
                    secs(a.p90),
                    secs(a.max),
                    bytes(z.p50),
                    bytes(z.p90),
                    bytes(z.max)
                );
            }
            _ => out.push_str(&age(v.oldest_s)),
        }
        out.push_str("</td><td class=\"site\">");
        stack_cell(out, v.frames, v.site, v.truncated);
        if !v.paths.is_empty() {
            let _ = write!(
                out,
                "<span class=\"sub\">paths: {}</span>",
                escape(&v.paths.join(", "))
            );
        }
        let _ = writeln!(out, "</td><td>{}</td></tr>", escape(&v.who));
    }
    out.push_str("</tbody></table></section>\n");
}

/// A line of a chart.
struct Line {
    label: String,
    detail: String,
    colour: &'static str,
    points: Vec<(f64, f64)>,
    /// The whole process's line (dashed, drawn on top).
    total: bool,
}

fn charts(out: &mut String, r: &Report, kinds: &[Kind<'_>]) {
    out.push_str(
        "<section id=\"charts\"><h2>Growth over time</h2>\n<p class=\"note\">What the \
         heaviest stacks held at each report (the series their verdicts are drawn from), and \
         the whole process (grey, dashed). Hover a line for its stack.</p>\n",
    );
    let mut drawn = 0;
    for k in kinds {
        // Rows held at exit have no series: with the whole process, still a chart.
        let mut lines: Vec<Line> = k
            .rows
            .iter()
            .filter_map(|v| v.trend.map(|t| (v, t)))
            .filter(|(_, t)| !t.series.is_empty())
            .take(CHART_LINES)
            .enumerate()
            .map(|(i, (v, t))| Line {
                label: headline(v.frames, v.site),
                detail: format!(
                    "{} · {} · {}",
                    t.verdict.name(),
                    k.unit.label(v.value as f64),
                    v.who
                ),
                colour: COLOURS[i % COLOURS.len()],
                points: t.series.iter().map(|p| (p.t_s, p.value as f64)).collect(),
                total: false,
            })
            .collect();
        if let Some(total) = k.total.filter(|_| !r.summary.history.is_empty()) {
            lines.push(Line {
                label: "whole process".to_owned(),
                detail: "everything the traced processes hold".to_owned(),
                colour: "#8c959f",
                points: r
                    .summary
                    .history
                    .iter()
                    .map(|t| (t.t_s, total(t) as f64))
                    .collect(),
                total: true,
            });
        }
        if lines.is_empty() {
            continue;
        }
        if drawn == 0 {
            out.push_str("<div class=\"charts\">\n");
        }
        let _ = writeln!(
            out,
            "<figure class=\"chart\"><figcaption>{}</figcaption>",
            k.title
        );
        chart(
            out,
            &format!("chart-{}", k.id),
            k.unit,
            &lines,
            "time since tracing started",
        );
        out.push_str("</figure>\n");
        drawn += 1;
    }
    if drawn == 0 {
        out.push_str("<p class=\"note\">No stack has a series yet (one report so far).</p>\n");
    } else {
        out.push_str("</div>\n");
    }
    out.push_str("</section>\n");
}

/// `cache_insert ← handle_request`: a stack's site and its caller, for a legend.
fn headline(frames: &[Frame], site: usize) -> String {
    let from = if site < frames.len() { site } else { 0 };
    let names: Vec<String> = frames[from..].iter().take(2).map(frame_name).collect();
    if names.is_empty() {
        "stack lost".to_owned()
    } else {
        names.join(" ← ")
    }
}

/// A step of about `range / n` that reads well: 1, 2 or 5 times a power of ten.
fn nice_step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let m = raw / magnitude;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// Ticks from 0 to at least `max` for values in `unit`: round numbers of KiB, MiB, … for
/// bytes, whole counts otherwise.
fn value_ticks(max: f64, unit: Unit) -> Vec<f64> {
    let max = max.max(1.0);
    let step = match unit {
        Unit::Bytes => {
            let mut scale = 1.0;
            while max / scale >= 1024.0 {
                scale *= 1024.0;
            }
            nice_step(max / scale, 4.0) * scale
        }
        Unit::Count(_) => nice_step(max, 4.0).max(1.0),
    };
    let n = (max / step).ceil() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// Ticks over `[lo, hi]` seconds at round intervals.
fn time_ticks(lo: f64, hi: f64) -> Vec<f64> {
    const STEPS: [f64; 19] = [
        0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
        3600.0, 7200.0, 21600.0, 86400.0,
    ];
    let want = (hi - lo) / 6.0;
    let step = STEPS
        .iter()
        .copied()
        .find(|&s| s >= want)
        .unwrap_or(86400.0);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// `90s`, `2m`, `1.5h`, `0.2s`.
fn seconds(t: f64) -> String {
    let a = t.abs();
    let (v, unit) = if a < 120.0 {
        (t, "s")
    } else if a < 7200.0 {
        (t / 60.0, "m")
    } else {
        (t / 3600.0, "h")
    };
    if (v - v.round()).abs() < 1e-6 {
        format!("{}{unit}", v.round() as i64)
    } else {
        format!("{v:.1}{unit}")
    }
}

/// The chart's plot area, in SVG units.
const PLOT: (f64, f64, f64, f64) = (70.0, 12.0, 644.0, 212.0);
/// The chart's width, in SVG units: two charts side by side on a laptop's screen are drawn
/// at about this size, and their text reads at 12 px.
const CHART_WIDTH: f64 = 660.0;
/// How the whole process's line is drawn.
const TOTAL_STYLE: &str = "stroke-width=\"4\" stroke-dasharray=\"9 5\"";
/// Height of a legend entry.
const LEGEND_ROW: f64 = 20.0;

/// A line chart of `lines` over time (`time` names the axis), with axes and a legend, as
/// inline SVG.
fn chart(out: &mut String, id: &str, unit: Unit, lines: &[Line], time: &str) {
    let (left, top, right, bottom) = PLOT;
    let all = lines.iter().flat_map(|l| &l.points);
    let (mut lo, mut hi, mut max) = (f64::MAX, f64::MIN, 0.0f64);
    for &(t, v) in all {
        lo = lo.min(t);
        hi = hi.max(t);
        max = max.max(v);
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 1.0, hi + 1.0);
    }
    let yt = value_ticks(max, unit);
    let ymax = *yt.last().unwrap_or(&1.0);
    let x = |t: f64| left + (t - lo) / (hi - lo) * (right - left);
    let y = |v: f64| bottom - v / ymax * (bottom - top);
    let legend_top = bottom + 48.0;
    let height = legend_top + LEGEND_ROW * lines.len() as f64 + 6.0;
    let _ = writeln!(
        out,
        "<svg id=\"{id}\" class=\"growth-chart\" viewBox=\"0 0 {CHART_WIDTH} {height}\" \
         xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" font-family=\"system-ui, sans-serif\" \
         font-size=\"12\">"
    );
    // Grid and value axis.
    for v in &yt {
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" x2=\"{right}\" y1=\"{0:.1}\" y2=\"{0:.1}\" stroke=\"#e5e8eb\"/>\
             <text x=\"{1}\" y=\"{2:.1}\" text-anchor=\"end\" fill=\"#59636e\">{3}</text>",
            y(*v),
            left - 8.0,
            y(*v) + 4.0,
            escape(&unit.label(*v))
        );
    }
    // Time axis.
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" x2=\"{right}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"#8c959f\"/>\
         <line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"#8c959f\"/>"
    );
    for t in time_ticks(lo, hi) {
        let _ = writeln!(
            out,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{bottom}\" y2=\"{1}\" stroke=\"#8c959f\"/>\
             <text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\" fill=\"#59636e\">{3}</text>",
            x(t),
            bottom + 5.0,
            bottom + 18.0,
            seconds(t)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#59636e\">{}</text>",
        (left + right) / 2.0,
        bottom + 36.0,
        escape(time)
    );
    // The whole process first, wide and grey: a stack holding all of it is drawn on top
    // and both stay visible.
    for l in lines
        .iter()
        .filter(|l| l.total)
        .chain(lines.iter().filter(|l| !l.total))
    {
        let points: Vec<String> = l
            .points
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
            .collect();
        let (class, style) = if l.total {
            ("total", TOTAL_STYLE)
        } else {
            ("series", "stroke-width=\"2\"")
        };
        let title = escape(&format!("{} — {}", l.label, l.detail));
        let _ = writeln!(
            out,
            "<polyline class=\"{class}\" fill=\"none\" stroke=\"{}\" {style} \
             stroke-linejoin=\"round\" points=\"{}\"><title>{title}</title></polyline>",
            l.colour,
            points.join(" ")
        );
        if let [only] = l.points.as_slice() {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"><title>{title}</title></circle>",
                x(only.0),
                y(only.1),
                l.colour
            );
        }
    }
    // The legend, in the order of the table.
    for (i, l) in lines.iter().enumerate() {
        let ly = legend_top + LEGEND_ROW * i as f64 + 10.0;
        let style = if l.total {
            TOTAL_STYLE
        } else {
            "stroke-width=\"3\""
        };
        let label = if l.total {
            l.label.clone()
        } else {
            format!("#{} {}", i + 1, l.label)
        };
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" {style}/>\
             <text x=\"{}\" y=\"{}\" fill=\"#1f2328\">{}<tspan fill=\"#59636e\"> — {}</tspan></text>",
            left + 28.0,
            l.colour,
            left + 36.0,
            ly + 4.0,
            escape(&clip(&label, 36)),
            escape(&clip(&l.detail, 44))
        );
    }
    out.push_str("</svg>\n");
}

/// `text` cut to `max` characters, with an ellipsis.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

/// Undoes inferno's history updates in an iframe: `about:srcdoc` may not change its URL, and
/// every click on a frame would log a SecurityError.
const FLAME_SHIM: &str = "(function(){var h=history,r=h.replaceState;\
     h.replaceState=function(){try{return r.apply(h,arguments)}catch(e){}}})();";

fn flames(out: &mut String, r: &Report, kinds: &[Kind<'_>]) {
    out.push_str(
        "<section id=\"flames\"><h2>Flame graphs</h2>\n<p class=\"note\">Width is what a \
         stack holds now; the root is at the bottom. Click a frame to zoom, Ctrl-F (or \
         <em>Search</em>) to highlight a function.</p>\n",
    );
    let subtitle = match &r.summary.target {
        Some(t) => t.clone(),
        None => String::new(),
    };
    for k in kinds.iter().filter(|k| !k.folded.is_empty()) {
        let drawing = svg::draw(&k.folded, &k.look, &subtitle);
        let drawing = String::from_utf8_lossy(&drawing);
        let (svg, height) = inline_svg(&drawing);
        let doc = format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"/><style>html,body{{margin:0;\
             background:#fff}}svg{{display:block;width:100%}}</style><script>{FLAME_SHIM}</script></head><body>{svg}</body></html>"
        );
        let _ = writeln!(
            out,
            "<div class=\"flame\"><iframe class=\"flame-graph\" \
             id=\"flame-{id}\" title=\"{title}\" style=\"height:{height}px\" srcdoc=\"{}\">\
             </iframe></div>",
            escape(&doc),
            title = escape(k.look.title),
            id = k.id,
        );
    }
    out.push_str("</section>\n");
}

/// An SVG document as it can sit inside HTML: from its `<svg>` element on, without the XML
/// declaration, the DOCTYPE naming an external DTD, and the comments inferno writes first
/// (addresses of its project); and its height.
pub(crate) fn inline_svg(doc: &str) -> (String, u32) {
    let svg = doc.find("<svg").map_or(doc, |at| &doc[at..]);
    let head_end = svg.find('>').map_or(svg.len(), |e| e + 1);
    let (head, mut rest) = svg.split_at(head_end);
    let height = head
        .split_once(" height=\"")
        .and_then(|(_, h)| h.split('"').next())
        .and_then(|h| h.parse::<f64>().ok())
        .map_or(300, |h| h.ceil() as u32);
    while let Some(comment) = rest.trim_start().strip_prefix("<!--") {
        rest = comment.split_once("-->").map_or("", |(_, after)| after);
    }
    (format!("{head}{rest}"), height)
}

fn alerts(out: &mut String, r: &Report) {
    if !r.oom_kills.is_empty() {
        out.push_str("<section id=\"oom\"><h2>OOM kills</h2>\n");
        for k in &r.oom_kills {
            oom_kill(out, k);
        }
        out.push_str("</section>\n");
    }
    if !r.fd_exhaustion.is_empty() {
        out.push_str("<section id=\"emfile\"><h2>Descriptor exhaustion</h2>\n");
        for x in &r.fd_exhaustion {
            exhaustion(out, x);
        }
        out.push_str("</section>\n");
    }
}

/// A small table of the stacks holding the most, as an OOM kill or an EMFILE saw them.
fn holders_table<'a>(
    out: &mut String,
    what: &str,
    rows: impl Iterator<Item = (String, &'a [Frame])>,
) {
    let _ = write!(
        out,
        "<table class=\"rows\"><thead><tr><th>{what}</th><th>Site and stack</th></tr></thead><tbody>"
    );
    for (holds, frames) in rows {
        let _ = write!(
            out,
            "<tr><td class=\"num\">{}</td><td class=\"site\">",
            escape(&holds)
        );
        stack_cell(out, frames, 0, false);
        out.push_str("</td></tr>");
    }
    out.push_str("</tbody></table>\n");
}

fn oom_kill(out: &mut String, k: &OomKill) {
    let limit = k
        .limit_bytes
        .map_or_else(String::new, |l| format!(" of a {} limit", bytes(l)));
    let _ = write!(
        out,
        "<div class=\"alert\"><h3>OOM kill at {}: pid {} ({})</h3>\n<p>RSS {}{limit} \
         (anonymous {}), oom_score_adj {}",
        escape(&k.time),
        k.pid,
        escape(&k.comm),
        bytes(k.rss_bytes),
        bytes(k.anon_rss_bytes),
        k.oom_score_adj
    );
    if let Some(c) = &k.cgroup {
        let _ = write!(out, ", cgroup <code>{}</code>", escape(c));
    }
    if let Some(id) = &k.container_id {
        let _ = write!(out, ", container {}", escape(&id[..id.len().min(12)]));
    }
    out.push_str(&escape(&pod_identity(
        k.namespace.as_deref(),
        k.pod.as_deref(),
        k.container_name.as_deref(),
    )));
    out.push_str("</p>\n");
    if !k.traced {
        out.push_str("<p class=\"note\">Not traced by leaktrace: no stacks.</p></div>\n");
        return;
    }
    if let (Some(first), Some(last)) = (k.growth.first(), k.growth.last()) {
        let _ = write!(
            out,
            "<p>Outstanding heap {} → {} over the last {}",
            bytes(first.outstanding_bytes),
            bytes(last.outstanding_bytes),
            age(last.t_s - first.t_s)
        );
        if let Some(g) = k.growth_bytes_per_s {
            let _ = write!(out, ", {}", escape(&rate(g, "bytes")));
        }
        out.push_str(".</p>\n");
        if k.growth.len() > 1 {
            let line = Line {
                label: format!("pid {} ({})", k.pid, k.comm),
                detail: "outstanding heap".to_owned(),
                colour: "#c62828",
                points: k
                    .growth
                    .iter()
                    .map(|g| (g.t_s, g.outstanding_bytes as f64))
                    .collect(),
                total: false,
            };
            out.push_str("<figure class=\"chart\">");
            chart(
                out,
                &format!("oom-chart-{}", k.pid),
                Unit::Bytes,
                std::slice::from_ref(&line),
                "time before the kill",
            );
            out.push_str("</figure>\n");
        }
    }
    if !k.heap_top.is_empty() {
        holders_table(
            out,
            "Heap held",
            k.heap_top.iter().map(|h: &HeapHolder| {
                (
                    format!(
                        "{} in {} blocks",
                        bytes(h.outstanding_bytes),
                        count(h.outstanding_count)
                    ),
                    h.frames.as_slice(),
                )
            }),
        );
    }
    if !k.fd_top.is_empty() {
        fd_holders(out, &k.fd_top);
    }
    out.push_str("</div>\n");
}

fn fd_holders(out: &mut String, holders: &[FdHolder]) {
    holders_table(
        out,
        "Descriptors held",
        holders.iter().map(|h| {
            (
                format!("{} {}", count(h.outstanding), h.fd_kind),
                h.frames.as_slice(),
            )
        }),
    );
}

fn exhaustion(out: &mut String, x: &FdExhaustion) {
    let limit = x.limit.map_or_else(|| "?".to_owned(), count);
    let _ = write!(
        out,
        "<div class=\"alert\"><h3>pid {} ({}) ran out of descriptors</h3>\n<p>{} (limit {limit}, \
         {} open), {} time{}, first at {} — in ",
        x.pid,
        escape(&x.comm),
        x.errno,
        count(x.open),
        count(x.count),
        if x.count == 1 { "" } else { "s" },
        age(x.at_s)
    );
    stack_cell(out, &x.frames, 0, false);
    out.push_str("</p>\n");
    if !x.top_holders.is_empty() {
        fd_holders(out, &x.top_holders);
    }
    out.push_str("</div>\n");
}

fn runtime(out: &mut String, r: &Report) {
    let s = &r.summary;
    if s.runtime_outstanding_count == 0 {
        return;
    }
    let _ = write!(
        out,
        "<section id=\"runtime\"><h2>Held by the C/C++ runtime</h2>\n<p class=\"note\">Not \
         counted as leaks: {} in {} blocks that the runtime allocated for itself (stdio \
         buffers, locale, thread data).</p>\n",
        bytes(s.runtime_outstanding_bytes),
        count(s.runtime_outstanding_count)
    );
    if !r.runtime.is_empty() {
        holders_table(
            out,
            "Holds",
            r.runtime.iter().take(TABLE_ROWS).map(|l| {
                (
                    format!(
                        "{} in {} blocks",
                        bytes(l.outstanding_bytes),
                        count(l.outstanding_count)
                    ),
                    l.frames.as_slice(),
                )
            }),
        );
    }
    out.push_str("</section>\n");
}

fn counters(out: &mut String, s: &Summary) {
    out.push_str("<section id=\"counters\"><h2>Lost events and counters</h2>\n");
    if s.lost_events > 0 {
        let _ = writeln!(
            out,
            "<div class=\"banner bad\">{} events were lost: counts are lower bounds (a larger \
             --ring-buffer helps).</div>",
            count(s.lost_events)
        );
    } else {
        out.push_str("<div class=\"banner ok\">No event was lost: counts are exact.</div>\n");
    }
    out.push_str("<table class=\"kv\" id=\"lost\"><tbody>\n");
    let mut row = |name: &str, value: String| {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(name),
            escape(&value)
        );
    };
    row("lost events", count(s.lost_events));
    for (cause, n) in &s.lost_by_cause {
        row(&format!("lost: {cause}"), count(*n));
    }
    row("lost stacks (frames resent later)", count(s.lost_stacks));
    row(
        "unmatched frees (allocated before tracing)",
        count(s.unmatched_frees),
    );
    if s.inherited_frees > 0 {
        row("inherited frees", count(s.inherited_frees));
    }
    row(
        "allocations over a live block (missed free)",
        count(s.replaced),
    );
    row(
        "closes of descriptors opened before tracing",
        count(s.fds_unmatched_closes),
    );
    if s.tmp_files_unwatched > 0 {
        row("temp files not watched", count(s.tmp_files_unwatched));
    }
    row("stacks truncated (depth limit)", count(s.stacks_truncated));
    row("stacks broken off early", count(s.stacks_broken));
    row(
        "leaktrace CPU time",
        format!("{:.2}s over {}", s.tracer.cpu_s, age(s.elapsed_s)),
    );
    row("leaktrace peak RSS", bytes(s.tracer.peak_rss_bytes));
    out.push_str("</tbody></table></section>\n");
}

fn notices(out: &mut String, r: &Report) {
    if r.notices.is_empty() && r.tier2.is_empty() {
        return;
    }
    out.push_str("<section id=\"notices\"><h2>Notices</h2>\n");
    if !r.notices.is_empty() {
        out.push_str("<ul>");
        for n in &r.notices {
            let _ = write!(out, "<li>{}</li>", escape(n));
        }
        out.push_str("</ul>\n");
    }
    if !r.tier2.is_empty() {
        out.push_str(
            "<h3>Traced exactly (tier 2)</h3><table class=\"rows\"><thead><tr><th>Process</th>\
             <th>Why</th><th>Since</th><th>Until</th></tr></thead><tbody>",
        );
        for t in &r.tier2 {
            let until = match (&t.until_s, &t.end) {
                (Some(u), Some(e)) => format!("{} ({e})", age(*u)),
                (Some(u), None) => age(*u),
                _ => "still traced".to_owned(),
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&who(t.pid, 1, &[], &t.owner)),
                escape(&t.reason),
                age(t.since_s),
                escape(&until)
            );
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("</section>\n");
}

/// The SVG and HTML reports read back as XML, for tests: well-formedness is checked as they
/// are parsed (every element closed, in order), and queries look at elements, attributes and
/// text as a browser's DOM would.
#[cfg(test)]
pub(crate) mod dom {
    use std::collections::BTreeMap;

    use quick_xml::{Reader, escape::unescape, events::Event};

    /// An element: its name, attributes (unescaped), all the text inside it, its parent.
    #[derive(Debug)]
    pub(crate) struct Node {
        pub(crate) name: String,
        pub(crate) attrs: BTreeMap<String, String>,
        pub(crate) text: String,
        pub(crate) parent: Option<usize>,
    }

    /// Every element of a document, in document order.
    #[derive(Debug)]
    pub(crate) struct Dom(pub(crate) Vec<Node>);

    /// Parses `doc`; panics where it is not well-formed.
    pub(crate) fn parse(doc: &str) -> Dom {
        let mut reader = Reader::from_str(doc);
        let mut nodes: Vec<Node> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        loop {
            let at = reader.buffer_position();
            let event = reader
                .read_event()
                .unwrap_or_else(|e| panic!("not well-formed at byte {at}: {e}"));
            let text = |nodes: &mut Vec<Node>, t: &str| {
                for &i in &open {
                    nodes[i].text.push_str(t);
                }
            };
            match event {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let attrs = e
                        .attributes()
                        .map(|a| {
                            let a = a.expect("a well-formed attribute");
                            let raw = std::str::from_utf8(&a.value).unwrap();
                            (
                                String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                                unescape(raw).expect("known entities").into_owned(),
                            )
                        })
                        .collect();
                    nodes.push(Node {
                        name: String::from_utf8(e.name().as_ref().to_vec()).unwrap(),
                        attrs,
                        text: String::new(),
                        parent: open.last().copied(),
                    });
                    if matches!(event, Event::Start(_)) {
                        open.push(nodes.len() - 1);
                    }
                }
                Event::End(_) => {
                    open.pop();
                }
                Event::Text(t) => text(&mut nodes, &t.decode().unwrap()),
                Event::CData(t) => text(&mut nodes, &t.decode().unwrap()),
                Event::GeneralRef(r) => {
                    let c = match r.resolve_char_ref().unwrap() {
                        Some(c) => c.to_string(),
                        None => {
                            let name = r.decode().unwrap();
                            unescape(&format!("&{name};"))
                                .expect("a predefined entity")
                                .into_owned()
                        }
                    };
                    text(&mut nodes, &c);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert!(open.is_empty(), "elements left open: {open:?}");
        Dom(nodes)
    }

    impl Dom {
        /// The elements named `name`.
        pub(crate) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (usize, &'a Node)> {
            self.0
                .iter()
                .enumerate()
                .filter(move |(_, n)| n.name == name)
        }

        /// The element whose `id` is `id`.
        pub(crate) fn by_id(&self, id: &str) -> Option<usize> {
            self.0
                .iter()
                .position(|n| n.attrs.get("id").map(String::as_str) == Some(id))
        }

        /// The elements named `name` inside the element `ancestor`.
        pub(crate) fn inside<'a>(
            &'a self,
            ancestor: usize,
            name: &'a str,
        ) -> impl Iterator<Item = (usize, &'a Node)> {
            self.all(name)
                .filter(move |&(i, _)| self.is_inside(i, ancestor))
        }

        fn is_inside(&self, mut i: usize, ancestor: usize) -> bool {
            while let Some(p) = self.0[i].parent {
                if p == ancestor {
                    return true;
                }
                i = p;
            }
            false
        }

        /// The text of every `<title>`: inferno's tooltips, `name (weight unit, share%)`.
        pub(crate) fn titles(&self) -> Vec<&str> {
            self.all("title").map(|(_, n)| n.text.as_str()).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{dom::parse, *};
    use crate::{
        export::{FoldedKind, Format, golden::sample, render},
        report::{model::Totals, verdict},
    };

    fn html(r: &Report) -> String {
        render(r, Format::Html, FoldedWeight::Bytes, FoldedKind::Heap)
    }

    /// The documents of the page's flame graphs, by iframe id.
    fn flame_docs(page: &str) -> Vec<(String, String)> {
        let dom = parse(page);
        dom.all("iframe")
            .map(|(_, n)| (n.attrs["id"].clone(), n.attrs["srcdoc"].clone()))
            .collect()
    }

    /// The sample with `n` more growing heap rows (`grow_1`, …, lighter each), and what the
    /// process held at 8 reports.
    fn with_rows(n: usize) -> Report {
        let mut r = sample();
        let template = r.leaks[0].clone();
        for i in 1..=n {
            let mut l = template.clone();
            l.frames[0].symbol = Some(format!("grow_{i}"));
            l.frames[0].addr += i as u64;
            l.outstanding_bytes = (8 << 20) - (i as u64) * 4096;
            let values: Vec<u64> = (1..=8).map(|k| k * l.outstanding_bytes / 8).collect();
            let series: Vec<verdict::Sample> = values
                .iter()
                .enumerate()
                .map(|(k, &value)| verdict::Sample {
                    t_s: 10.0 * (k + 1) as f64,
                    value,
                    oldest_s: 10.0 * (k + 1) as f64,
                })
                .collect();
            l.trend = Some(verdict::judge(&series, None, "bytes"));
            r.leaks.insert(i, l);
        }
        r.summary.history = (1..=8)
            .map(|k| Totals {
                t_s: 10.0 * k as f64,
                outstanding_bytes: k * (12 << 20) / 8,
                fds_outstanding: 100 * k,
                tmp_files_outstanding: 0,
            })
            .collect();
        r
    }

    #[test]
    fn a_flame_graph_per_kind_that_has_stacks() {
        let page = html(&sample());
        let docs = flame_docs(&page);
        let ids: Vec<&str> = docs.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["flame-heap", "flame-fd", "flame-tmp"]);
        let titles = |id: &str| -> Vec<String> {
            let doc = &docs.iter().find(|(i, _)| i == id).unwrap().1;
            let dom = parse(doc);
            let drawings = dom
                .all("svg")
                .filter(|(_, n)| n.attrs.contains_key("onload"));
            assert_eq!(drawings.count(), 1, "{id}");
            // inferno's search and zoom came along.
            let script: String = dom.all("script").map(|(_, n)| n.text.clone()).collect();
            assert!(script.contains("function zoom("), "{id}");
            dom.titles().into_iter().map(str::to_owned).collect()
        };
        let heap = titles("flame-heap");
        for want in [
            "all (9,437,184 bytes, 100%)",
            "cache_insert (8,388,608 bytes, 88.89%)",
            "[libplugin.so] (1,048,576 bytes, 11.11%)",
        ] {
            assert!(heap.iter().any(|t| t == want), "{want} not in {heap:?}");
        }
        let fd = titles("flame-fd");
        assert!(
            fd.iter()
                .any(|t| t == "load_geofence (847 descriptors, 98.60%)"),
            "{fd:?}"
        );
        let tmp = titles("flame-tmp");
        assert!(
            tmp.iter()
                .any(|t| t == "load_geofence (5,242,880 bytes, 100.00%)"),
            "{tmp:?}"
        );

        // Growth rows get theirs; a kind without rows gets none.
        let mut r = sample();
        let mut growth = r.leaks[0].clone();
        growth.kind = "growth";
        growth.frames[0].symbol = Some("fill_pages".into());
        r.growth.push(growth);
        r.fd_leaks.clear();
        let docs = flame_docs(&html(&r));
        let ids: Vec<&str> = docs.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["flame-heap", "flame-growth", "flame-tmp"]);
        assert!(docs[1].1.contains("fill_pages (8,388,608 bytes, 100.00%)"));
        assert!(!docs[0].1.contains("fill_pages"));
    }

    #[test]
    fn the_chart_draws_a_line_per_top_stack_and_one_for_the_whole_process() {
        let r = with_rows(10);
        let dom = parse(&html(&r));
        let chart = dom.by_id("chart-heap").expect("a heap chart");
        let lines: Vec<_> = dom.inside(chart, "polyline").collect();
        let series: Vec<_> = lines
            .iter()
            .filter(|(_, n)| n.attrs["class"] == "series")
            .collect();
        let totals: Vec<_> = lines
            .iter()
            .filter(|(_, n)| n.attrs["class"] == "total")
            .collect();
        // 11 growing stacks, the heaviest 8 drawn; the row left at exit has no series.
        assert_eq!((series.len(), totals.len()), (CHART_LINES, 1));
        for (_, l) in &series {
            let points: Vec<(f64, f64)> = l.attrs["points"]
                .split(' ')
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect();
            assert_eq!(points.len(), 8);
            let (left, top, right, bottom) = PLOT;
            assert!(
                points
                    .iter()
                    .all(|&(x, y)| (left..=right).contains(&x) && (top..=bottom).contains(&y)),
                "{points:?}"
            );
            // Time runs left to right and these stacks only grow: up the page.
            assert!(
                points
                    .windows(2)
                    .all(|w| w[1].0 > w[0].0 && w[1].1 < w[0].1)
            );
        }
        assert_eq!(
            series[0].1.text,
            "cache_insert ← handle_request — leak · 8.0 MiB · pid 4242 (cache-server)"
        );
        assert!(series[1].1.text.starts_with("grow_1 ← handle_request — "));
        let legend: Vec<&str> = dom
            .inside(chart, "text")
            .map(|(_, n)| n.text.as_str())
            .filter(|t| t.starts_with('#') || t.starts_with("whole"))
            .collect();
        assert_eq!(legend.len(), CHART_LINES + 1, "{legend:?}");
        assert!(legend[0].starts_with("#1 cache_insert ← handle_request — leak"));
        assert!(legend[8].starts_with("whole process"));
        // The value axis reaches the whole process's 12 MiB, in round steps.
        let axis: Vec<&str> = dom
            .inside(chart, "text")
            .map(|(_, n)| n.text.as_str())
            .filter(|t| t.ends_with("MiB") || t.ends_with(" B"))
            .collect();
        assert_eq!(axis, ["0 B", "5.0 MiB", "10.0 MiB", "15.0 MiB"]);
        // Rows held at exit have no series: the whole process is drawn alone.
        let mut exited = with_rows(0);
        exited.leaks[0].at_exit = true;
        exited.leaks[0].trend = None;
        let dom_exited = parse(&html(&exited));
        let chart = dom_exited.by_id("chart-heap").unwrap();
        let classes: Vec<&str> = dom_exited
            .inside(chart, "polyline")
            .map(|(_, n)| n.attrs["class"].as_str())
            .collect();
        assert_eq!(classes, ["total"]);
        // Descriptors: the growing row and the whole process; temp files: one line.
        let fd = dom.by_id("chart-fd").unwrap();
        assert_eq!(dom.inside(fd, "polyline").count(), 2);
        let tmp = dom.by_id("chart-tmp").unwrap();
        assert_eq!(dom.inside(tmp, "polyline").count(), 2);
    }

    #[test]
    fn the_tables_rank_rows_with_verdicts_ages_and_alerts() {
        let page = html(&sample());
        let dom = parse(&page);
        let verdicts = |id: &str| -> Vec<String> {
            let t = dom.by_id(id).unwrap();
            dom.inside(t, "tr")
                .filter_map(|(_, n)| n.attrs.get("data-verdict").cloned())
                .collect()
        };
        assert_eq!(verdicts("heap-rows"), ["leak", "none"]);
        assert_eq!(verdicts("fd-rows"), ["plateau", "none"]);
        assert_eq!(verdicts("tmp-rows"), ["sawtooth"]);
        assert_eq!(dom.by_id("growth-rows"), None);
        let rows: Vec<&str> = dom
            .inside(dom.by_id("heap-rows").unwrap(), "tr")
            .map(|(_, n)| n.text.as_str())
            .collect();
        assert_eq!(
            rows[1],
            "1leak67% sure8.0 MiBin 4,000 blocks; allocs 4,010, frees 10+2.0 KiB/sR² 1.00 over \
             8 intervals (70.0s)20.5s · 36.9s · 42.5ssizes 2.0 KiB · 4.0 KiB · 4.0 KiB\
             cache_insert at cache.c:17 in cache-serverstack: 3 framescache_insert at cache.c:17 \
             in cache-server · 0x555500001234handle_request at server.c:301 in cache-server · \
             0x555500001280main at main.c:88 in cache-server · 0x555500001300pid 4242 (cache-server)"
        );
        assert!(rows[2].starts_with("2at exit1.0 MiB"), "{}", rows[2]);
        let badge = dom
            .all("span")
            .find(|(_, n)| n.text == "leak")
            .map(|(_, n)| n.attrs["class"].clone());
        assert_eq!(badge.as_deref(), Some("badge v-leak"));
        let text = |id: &str| dom.0[dom.by_id(id).unwrap()].text.clone();
        let oom = text("oom");
        assert!(
            oom.contains("OOM kill at 2026-11-24T03:00:00Z: pid 4242 (cache-server)")
                && oom.contains("RSS 64.0 MiB of a 64.0 MiB limit")
                && oom.contains(
                    "Outstanding heap 40.0 MiB → 50.0 MiB over the last 10.0s, +1.0 MiB/s"
                )
                && oom.contains("50.0 MiB in 50 blocks"),
            "{oom}"
        );
        assert_eq!(
            dom.inside(dom.by_id("oom-chart-4242").unwrap(), "polyline")
                .count(),
            1
        );
        let emfile = text("emfile");
        assert!(
            emfile.contains("pid 4242 (cache-server) ran out of descriptors")
                && emfile.contains("EMFILE (limit 1,024, 1,021 open), 3 times, first at 58.5s")
                && emfile.contains("847 file"),
            "{emfile}"
        );
        let counters = text("lost");
        assert!(counters.contains("lost events0"), "{counters}");
        assert!(counters.contains("unmatched frees (allocated before tracing)3"));
    }

    #[test]
    fn the_header_says_command_target_and_kernel() {
        let mut r = sample();
        r.summary.target = Some("pid 4242 (cache-server): /srv/app/bin/cache-server -p 80".into());
        r.summary.command = Some("leaktrace --pid 4242 --format html -o r.html".into());
        r.summary.kernel = Some("Linux 6.18.0 x86_64".into());
        r.summary.host = Some("node-7".into());
        let dom = parse(&html(&r));
        let about: Vec<(&str, &str)> = dom
            .all("dt")
            .zip(dom.all("dd"))
            .map(|((_, dt), (_, dd))| (dt.text.as_str(), dd.text.as_str()))
            .collect();
        assert_eq!(
            &about[..4],
            [
                (
                    "Target",
                    "pid 4242 (cache-server): /srv/app/bin/cache-server -p 80"
                ),
                ("Command", "leaktrace --pid 4242 --format html -o r.html"),
                ("Kernel", "Linux 6.18.0 x86_64"),
                ("Host", "node-7"),
            ]
        );
        let (_, title) = dom.all("title").next().unwrap();
        assert_eq!(
            title.text,
            "leaktrace · pid 4242 (cache-server): /srv/app/bin/cache-server -p 80"
        );
    }

    #[test]
    fn nothing_is_loaded_from_elsewhere() {
        let page = html(&with_rows(2));
        let mut docs = vec![page.clone()];
        docs.extend(flame_docs(&page).into_iter().map(|(_, d)| d));
        for doc in &docs {
            let dom = parse(doc);
            for n in &dom.0 {
                assert!(!n.attrs.contains_key("src"), "<{} src>", n.name);
                if let Some(href) = n.attrs.get("href") {
                    assert!(href.starts_with('#'), "href={href}");
                }
                assert!(n.name != "link" && n.name != "img" && n.name != "object");
            }
            assert!(!doc.contains("@import"));
            assert!(
                doc.match_indices("url(")
                    .all(|(at, _)| doc[at..].starts_with("url(#")),
                "a url() to another document"
            );
            assert!(!doc.contains("<!DOCTYPE svg"), "an external DTD");
            // Every absolute URL is an XML namespace, or one of the two in inferno's script:
            // a comment, and the message asking to report a bug.
            let inferno = [
                "please file a bug at https://github.com/jonhoo/inferno/",
                "// https://web.dev/avoid-large-complex-layouts-and-layout-thrashing/",
            ];
            let known = |text: &str| {
                inferno
                    .iter()
                    .fold(text.to_owned(), |t, u| t.replace(u, ""))
            };
            for n in &dom.0 {
                for (k, v) in &n.attrs {
                    if k != "srcdoc" && v.contains("://") {
                        assert!(k.starts_with("xmlns"), "<{} {k}={v:?}>", n.name);
                    }
                }
                if n.parent.is_none() {
                    assert!(!known(&n.text).contains("://"), "a URL in the text");
                }
                if n.name == "script" {
                    for call in ["fetch(", "XMLHttpRequest", "import(", "WebSocket", ".src"] {
                        assert!(!n.text.contains(call), "a script that loads: {call}");
                    }
                }
            }
            assert!(
                !known(doc).contains("<!--"),
                "comments (inferno's name URLs)"
            );
        }
    }

    #[test]
    fn text_from_the_report_is_escaped() {
        let name = "std::map<int, Foo&>::insert<\"x\">";
        let mut r = sample();
        r.leaks[0].frames[0].symbol = Some(name.into());
        r.summary.target = Some("pid 1 (<script>alert(1)</script>)".into());
        r.fd_leaks[0].paths = vec!["/srv/a&b<c>.json".into()];
        let page = html(&r);
        assert!(
            !page.contains("<script>alert"),
            "markup from the report got through"
        );
        assert!(!page.contains(name));
        assert!(page.contains("std::map&lt;int, Foo&amp;&gt;::insert&lt;&quot;x&quot;&gt;"));
        let dom = parse(&page);
        let site = dom
            .inside(dom.by_id("heap-rows").unwrap(), "code")
            .find(|(_, n)| n.attrs.get("class").map(String::as_str) == Some("fn"))
            .unwrap()
            .1;
        assert_eq!(site.text, name);
        assert!(
            dom.0[dom.by_id("fd-rows").unwrap()]
                .text
                .contains("paths: /srv/a&b<c>.json")
        );
        // Escaped once more inside the flame graph's srcdoc, and read back whole.
        let (_, doc) = &flame_docs(&page)[0];
        let flame = parse(doc);
        let folded_name = "std::map<int,\u{a0}Foo&>::insert<\"x\">";
        assert!(
            flame.titles().iter().any(|t| t.starts_with(folded_name)),
            "{:?}",
            flame.titles()
        );
        // The chart's legend and tooltips.
        let chart = dom.by_id("chart-heap").unwrap();
        assert!(
            dom.inside(chart, "title")
                .any(|(_, n)| n.text.starts_with(name))
        );
    }

    #[test]
    fn a_report_without_stacks_says_so() {
        let mut r = sample();
        r.leaks.clear();
        r.fd_leaks.clear();
        r.tmp_leaks.clear();
        let dom = parse(&html(&r));
        assert_eq!(dom.all("iframe").count(), 0);
        assert_eq!(dom.by_id("charts"), None);
        assert!(
            dom.0[dom.by_id("stacks").unwrap()]
                .text
                .contains("No stack holds anything")
        );
    }
}
