//! Prometheus metrics (text exposition format 0.0.4), what the node agent serves on
//! `/metrics`.
//!
//! Every metric is named `leaktrace_…`. Labels tell who holds a row and nothing else:
//! - `namespace` and `pod`: the Kubernetes pod, when the node names it (left out otherwise);
//! - `container`: the container's name in its pod when the node names it, else the
//!   container id's first 12 characters ("" outside containers), so that a series joins
//!   cAdvisor's and kube-state-metrics' on `namespace`, `pod` and `container`;
//! - `container_id`: the id's first 12 characters, when `container` is a name (a restarted
//!   container is a new series either way);
//! - `comm`, and `kind` (`heap`/`growth` for heap rows, the descriptor kind for descriptors,
//!   `tmp`).
//!
//! Never a stack: stacks live in the pprof and folded endpoints, and a label per stack would
//! make one series per call path. The pod labels add no series: a container has one pod.
//! Rows with the same labels are summed; past [`Metrics::max_series`] label sets in one
//! family, the smallest are summed into one series whose labels are all `other`.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    hash::Hash,
};

use prometheus_client::{
    encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder, prometheus_text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    export::Exporter,
    report::{Owner, Report},
};

/// What the agent knows beyond one report, for the metrics of its own work. `None`: not
/// known (the metric is left out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Processes traced now.
    pub tracked_processes: Option<u64>,
    /// Of those, the ones traced in depth (tier 2: allocator probes, stacks); `None`: those
    /// still traced in the report's `tier2` list, when it has one.
    pub tier2_processes: Option<u64>,
    /// Processes promoted to tier 2 since the agent started.
    pub promotions: Option<u64>,
    /// Outstanding heap blocks the agent keeps now (its cap: `--max-heap-blocks`).
    pub heap_blocks: Option<u64>,
    /// Grown pages it keeps now (its cap: `--max-growth-pages`).
    pub growth_pages: Option<u64>,
    /// Stacks it keeps now.
    pub stacks: Option<u64>,
}

/// Series per metric family by default.
pub const MAX_SERIES: usize = 500;

/// The metrics of one report and the agent's figures.
#[derive(Clone, Copy, Debug)]
pub struct Metrics {
    /// The agent's own figures.
    pub stats: AgentStats,
    /// Series per metric family, the `other` series included (at least 1).
    pub max_series: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            stats: AgentStats::default(),
            max_series: MAX_SERIES,
        }
    }
}

/// Who a series belongs to (see the module's documentation for each label).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Identity {
    /// The pod's namespace, or "" (the label is left out).
    pub namespace: String,
    /// The pod's name, or "" (the label is left out).
    pub pod: String,
    /// The container's name, else its id's short form (12 characters), or "".
    pub container: String,
    /// The id's short form when `container` is a name, else "" (the label is left out).
    pub container_id: String,
    /// The command name.
    pub comm: String,
}

impl Identity {
    /// The labels of a row held by `owner`.
    pub fn of(owner: &Owner) -> Self {
        Self::new(
            owner.container_id.as_deref(),
            &owner.comm,
            owner.namespace.as_deref(),
            owner.pod.as_deref(),
            owner.container_name.as_deref(),
        )
    }

    fn new(
        container_id: Option<&str>,
        comm: &str,
        namespace: Option<&str>,
        pod: Option<&str>,
        container_name: Option<&str>,
    ) -> Self {
        let short: String = container_id
            .map(|id| id.chars().take(12).collect())
            .unwrap_or_default();
        let (container, container_id) = match container_name {
            Some(name) => (name.to_owned(), short),
            None => (short, String::new()),
        };
        Self {
            namespace: namespace.unwrap_or_default().to_owned(),
            pod: pod.unwrap_or_default().to_owned(),
            container,
            container_id,
            comm: comm.to_owned(),
        }
    }

    fn other() -> Self {
        Self {
            container: OTHER.into(),
            comm: OTHER.into(),
            ..Self::default()
        }
    }
}

/// `container` and `comm` always; the others only when known, so a node without
/// Kubernetes exposes what it always did.
impl EncodeLabelSet for Identity {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (key, value, always) in [
            ("namespace", &self.namespace, false),
            ("pod", &self.pod, false),
            ("container", &self.container, true),
            ("container_id", &self.container_id, false),
            ("comm", &self.comm, true),
        ] {
            if always || !value.is_empty() {
                (key, value.as_str()).encode(encoder.encode_label())?;
            }
        }
        Ok(())
    }
}

/// The label value of the series that sums those past the cap.
const OTHER: &str = "other";

/// The labels of a row's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct Series {
    #[prometheus(flatten)]
    identity: Identity,
    kind: String,
}

impl Series {
    fn new(owner: &Owner, kind: &str) -> Self {
        Self {
            identity: Identity::of(owner),
            kind: kind.to_owned(),
        }
    }

    fn other() -> Self {
        Self {
            identity: Identity::other(),
            kind: OTHER.into(),
        }
    }
}

/// The labels of a verdict's series: who, the row kind, and the verdict.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct VerdictSeries {
    #[prometheus(flatten)]
    series: Series,
    verdict: String,
}

/// `reason` of dropped events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// Sums of the rows of one label set: `a` ranks them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Sums {
    a: u64,
    b: u64,
    rate: Option<f64>,
}

impl Sums {
    fn add(&mut self, o: Sums) {
        self.a += o.a;
        self.b += o.b;
        self.rate = match (self.rate, o.rate) {
            (Some(x), Some(y)) => Some(x + y),
            (x, y) => x.or(y),
        };
    }
}

/// Sums rows by label set; past `max` sets, keeps the largest by `a` and sums the rest
/// into their `other` series (one for every family but the verdicts', which keep an `other`
/// series per verdict), `max` series in all.
fn aggregate<S: Clone + Hash + Eq + Ord>(
    rows: impl Iterator<Item = (S, Sums)>,
    max: usize,
    other: impl Fn(&S) -> S,
) -> Vec<(S, Sums)> {
    let mut by: HashMap<S, Sums> = HashMap::new();
    for (series, sums) in rows {
        by.entry(series).or_default().add(sums);
    }
    let mut out: Vec<(S, Sums)> = by.into_iter().collect();
    out.sort_by(|x, y| y.1.a.cmp(&x.1.a).then_with(|| x.0.cmp(&y.0)));
    let max = max.max(1);
    if out.len() > max {
        let mut keep = max - 1;
        while keep > 0 {
            let others: HashSet<S> = out[keep..].iter().map(|(s, _)| other(s)).collect();
            if keep + others.len() <= max {
                break;
            }
            keep -= 1;
        }
        let mut folded: BTreeMap<S, Sums> = BTreeMap::new();
        for (s, sums) in out.drain(keep..) {
            folded.entry(other(&s)).or_default().add(sums);
        }
        out.extend(folded);
    }
    out
}

fn gauge_i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Registers a family of integer gauges, one per series.
fn gauges(
    registry: &mut Registry,
    name: &str,
    help: &str,
    series: &[(Series, Sums)],
    value: impl Fn(&Sums) -> Option<u64>,
) {
    let family = Family::<Series, Gauge>::default();
    for (labels, sums) in series {
        if let Some(v) = value(sums) {
            family.get_or_create(labels).set(gauge_i(v));
        }
    }
    registry.register(name, help, family);
}

impl Metrics {
    /// The registry of a report's metrics.
    fn registry(&self, report: &Report) -> Registry {
        let mut r = Registry::with_prefix("leaktrace");
        let other = Series::other();
        let heap = aggregate(
            report.leaks.iter().chain(&report.growth).map(|l| {
                let sums = Sums {
                    a: l.outstanding_bytes,
                    b: l.outstanding_count,
                    rate: l.growth_bytes_per_s,
                };
                (Series::new(&l.owner, l.kind), sums)
            }),
            self.max_series,
            |_| other.clone(),
        );
        gauges(
            &mut r,
            "heap_outstanding_bytes",
            "Heap bytes outstanding (kind heap) or resident memory added (kind growth), at least --min-age old",
            &heap,
            |s| Some(s.a),
        );
        gauges(
            &mut r,
            "heap_outstanding_objects",
            "Heap blocks outstanding (kind growth: faults that added memory)",
            &heap,
            |s| Some(s.b),
        );
        let growth = Family::<Series, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for (labels, sums) in &heap {
            if let Some(rate) = sums.rate {
                growth.get_or_create(labels).set(rate);
            }
        }
        r.register(
            "heap_growth_bytes_per_second",
            "How fast outstanding heap bytes grow, over the recent reports",
            growth,
        );

        let fds = aggregate(
            report.fd_leaks.iter().map(|l| {
                let sums = Sums {
                    a: l.outstanding,
                    ..Sums::default()
                };
                (Series::new(&l.owner, l.fd_kind), sums)
            }),
            self.max_series,
            |_| other.clone(),
        );
        gauges(
            &mut r,
            "open_fds",
            "Descriptors still open, of those seen created (kind: file, socket, pipe, other)",
            &fds,
            |s| Some(s.a),
        );

        let tmp = aggregate(
            report.tmp_leaks.iter().map(|l| {
                let sums = Sums {
                    a: l.bytes,
                    b: l.files,
                    rate: None,
                };
                (Series::new(&l.owner, "tmp"), sums)
            }),
            self.max_series,
            |_| other.clone(),
        );
        gauges(
            &mut r,
            "tmp_file_bytes",
            "Bytes on disk of temp files created and never unlinked",
            &tmp,
            |s| Some(s.a),
        );
        gauges(
            &mut r,
            "tmp_files",
            "Temp files created and never unlinked",
            &tmp,
            |s| Some(s.b),
        );

        let ooms = aggregate(
            report.oom_kills.iter().map(|k| {
                let series = Series {
                    identity: Identity::new(
                        k.container_id.as_deref(),
                        &k.comm,
                        k.namespace.as_deref(),
                        k.pod.as_deref(),
                        k.container_name.as_deref(),
                    ),
                    kind: "oom".into(),
                };
                let sums = Sums {
                    a: 1,
                    ..Sums::default()
                };
                (series, sums)
            }),
            self.max_series,
            |_| other.clone(),
        );
        let family = Family::<Series, Counter>::default();
        for (labels, sums) in &ooms {
            family.get_or_create(labels).inc_by(sums.a);
        }
        r.register(
            "oom_kills",
            "Processes the kernel killed for want of memory",
            family,
        );

        self.verdicts(&mut r, report);
        self.losses(&mut r, report);
        self.agent(&mut r, report);
        r
    }

    /// How many of the listed rows of each owner and kind got each verdict.
    fn verdicts(&self, r: &mut Registry, report: &Report) {
        let heap = report
            .leaks
            .iter()
            .chain(&report.growth)
            .filter_map(|l| Some((&l.owner, l.kind, l.trend.as_ref()?)));
        let fds = report
            .fd_leaks
            .iter()
            .filter_map(|l| Some((&l.owner, l.fd_kind, l.trend.as_ref()?)));
        let tmp = report
            .tmp_leaks
            .iter()
            .filter_map(|l| Some((&l.owner, "tmp", l.trend.as_ref()?)));
        let rows = heap.chain(fds).chain(tmp).map(|(owner, kind, trend)| {
            let labels = VerdictSeries {
                series: Series::new(owner, kind),
                verdict: trend.verdict.name().to_owned(),
            };
            let one = Sums {
                a: 1,
                ..Sums::default()
            };
            (labels, one)
        });
        let series = aggregate(rows, self.max_series, |s| VerdictSeries {
            series: Series::other(),
            verdict: s.verdict.clone(),
        });
        let family = Family::<VerdictSeries, Gauge>::default();
        for (labels, sums) in &series {
            family.get_or_create(labels).set(gauge_i(sums.a));
        }
        r.register(
            "leak_verdict_stacks",
            "Stacks listed in the report per verdict: leak, plateau, sawtooth, churn, too-early (kind: heap, growth, a descriptor kind, tmp)",
            family,
        );
    }

    /// Events and stacks the kernel side could not deliver, by cause.
    fn losses(&self, r: &mut Registry, report: &Report) {
        let events = Family::<Reason, Counter>::default();
        let stacks = Family::<Reason, Counter>::default();
        for (&cause, &n) in &report.summary.lost_by_cause {
            // The causes keep their names in the JSON report's `lost_by_cause`.
            let family = if cause.starts_with("stack_") {
                &stacks
            } else {
                &events
            };
            family
                .get_or_create(&Reason {
                    reason: cause.to_owned(),
                })
                .inc_by(n);
        }
        r.register(
            "dropped_events",
            "Events the kernel side could not deliver (counts are lower bounds then)",
            events,
        );
        r.register(
            "dropped_stacks",
            "Stacks whose frames could not be delivered (counts stay exact)",
            stacks,
        );
    }

    /// The agent's and the tracer's own figures.
    fn agent(&self, r: &mut Registry, report: &Report) {
        let s = &self.stats;
        let tier2 = s.tier2_processes.or_else(|| {
            (!report.tier2.is_empty())
                .then(|| report.tier2.iter().filter(|t| t.until_s.is_none()).count() as u64)
        });
        for (name, help, value) in [
            ("tracked_processes", "Processes traced", s.tracked_processes),
            (
                "tier2_processes",
                "Processes traced in depth (allocator probes, stacks)",
                tier2,
            ),
            (
                "heap_blocks_kept",
                "Outstanding heap blocks in the agent's tables (capped by --max-heap-blocks)",
                s.heap_blocks,
            ),
            (
                "growth_pages_kept",
                "Grown pages in the agent's tables (capped by --max-growth-pages)",
                s.growth_pages,
            ),
            ("stacks_kept", "Stacks in the agent's tables", s.stacks),
        ] {
            if let Some(v) = value {
                let g = Gauge::<i64>::default();
                g.set(gauge_i(v));
                r.register(name, help, g);
            }
        }
        if let Some(v) = s.promotions {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            r.register("promotions", "Processes promoted to tier 2", c);
        }
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        cpu.inc_by(report.summary.tracer.cpu_s);
        r.register("tracer_cpu_seconds", "leaktrace's own CPU time", cpu);
        let rss = Gauge::<i64>::default();
        rss.set(gauge_i(report.summary.tracer.peak_rss_bytes));
        r.register(
            "tracer_peak_rss_bytes",
            "leaktrace's own peak resident memory",
            rss,
        );
    }
}

impl Exporter for Metrics {
    fn export(&self, report: &Report) -> Vec<u8> {
        let mut out = String::new();
        // Writing to a String cannot fail.
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry(report)) {
            let _ = writeln!(out, "# error: {e}");
        }
        out.into_bytes()
    }

    fn content_type(&self) -> &'static str {
        prometheus_text::CONTENT_TYPE
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::export::golden::sample;

    /// The samples of an exposition, `name{labels}` to value.
    fn samples(text: &str) -> BTreeMap<&str, &str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap())
            .collect()
    }

    fn report() -> Report {
        let mut r = sample();
        // The sample's fd rows and its first heap row run in a container.
        r.leaks[0].owner.container_id = Some("0123456789abcdef0123".into());
        for row in &mut r.fd_leaks {
            row.owner.container_id = Some("0123456789abcdef0123".into());
        }
        r.summary.lost_by_cause = [("ringbuf_full", 7), ("stack_map_full", 2)].into();
        r
    }

    #[test]
    fn exact_values_of_a_report() {
        let metrics = Metrics {
            stats: AgentStats {
                tracked_processes: Some(12),
                tier2_processes: Some(3),
                promotions: Some(5),
                heap_blocks: Some(40),
                growth_pages: Some(7),
                stacks: Some(9),
            },
            max_series: MAX_SERIES,
        };
        let text = String::from_utf8(metrics.export(&report())).unwrap();
        let c = r#"container="0123456789ab",comm="cache-server""#;
        let h = r#"container="",comm="cache-server""#;
        let want: BTreeMap<String, &str> = [
            (
                format!("leaktrace_heap_outstanding_bytes{{{c},kind=\"heap\"}}"),
                "8388608",
            ),
            (
                format!("leaktrace_heap_outstanding_bytes{{{h},kind=\"heap\"}}"),
                "1048576",
            ),
            (
                format!("leaktrace_heap_outstanding_objects{{{c},kind=\"heap\"}}"),
                "4000",
            ),
            (
                format!("leaktrace_heap_outstanding_objects{{{h},kind=\"heap\"}}"),
                "567",
            ),
            (
                format!("leaktrace_heap_growth_bytes_per_second{{{c},kind=\"heap\"}}"),
                "2048.0",
            ),
            (format!("leaktrace_open_fds{{{c},kind=\"file\"}}"), "847"),
            (format!("leaktrace_open_fds{{{c},kind=\"socket\"}}"), "12"),
            (
                format!("leaktrace_tmp_file_bytes{{{h},kind=\"tmp\"}}"),
                "5242880",
            ),
            (format!("leaktrace_tmp_files{{{h},kind=\"tmp\"}}"), "1247"),
            (
                format!("leaktrace_leak_verdict_stacks{{{c},kind=\"heap\",verdict=\"leak\"}}"),
                "1",
            ),
            (
                format!("leaktrace_leak_verdict_stacks{{{c},kind=\"file\",verdict=\"plateau\"}}"),
                "1",
            ),
            (
                format!("leaktrace_leak_verdict_stacks{{{h},kind=\"tmp\",verdict=\"sawtooth\"}}"),
                "1",
            ),
            (
                r#"leaktrace_oom_kills_total{container="abcdef",comm="cache-server",kind="oom"}"#
                    .into(),
                "1",
            ),
            (
                r#"leaktrace_dropped_events_total{reason="ringbuf_full"}"#.into(),
                "7",
            ),
            (
                r#"leaktrace_dropped_stacks_total{reason="stack_map_full"}"#.into(),
                "2",
            ),
            ("leaktrace_tracked_processes".into(), "12"),
            ("leaktrace_tier2_processes".into(), "3"),
            ("leaktrace_promotions_total".into(), "5"),
            ("leaktrace_heap_blocks_kept".into(), "40"),
            ("leaktrace_growth_pages_kept".into(), "7"),
            ("leaktrace_stacks_kept".into(), "9"),
            ("leaktrace_tracer_cpu_seconds_total".into(), "1.25"),
            ("leaktrace_tracer_peak_rss_bytes".into(), "62914560"),
        ]
        .into_iter()
        .collect();
        let got: BTreeMap<String, &str> = samples(&text)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(got, want, "{text}");
        assert!(text.contains("# TYPE leaktrace_oom_kills_total counter\n"));
        assert!(text.contains("# TYPE leaktrace_open_fds gauge\n"));
        assert!(!text.contains("cache_insert"), "no stack in a label");
    }

    #[test]
    fn rows_in_pods_carry_namespace_pod_and_the_container_name() {
        let mut r = report();
        let o = &mut r.leaks[0].owner;
        o.namespace = Some("payments".into());
        o.pod = Some("api-7f9c".into());
        o.container_name = Some("api".into());
        // A pod whose container the node does not name: the id stays the container label.
        for row in &mut r.fd_leaks {
            row.owner.namespace = Some("payments".into());
            row.owner.pod = Some("api-7f9c".into());
        }
        let k = &mut r.oom_kills[0];
        k.namespace = Some("payments".into());
        k.pod = Some("api-7f9c".into());
        k.container_name = Some("api".into());
        let text = String::from_utf8(Metrics::default().export(&r)).unwrap();
        let got = samples(&text);
        let pod = r#"namespace="payments",pod="api-7f9c""#;
        for (key, value) in [
            (
                format!(
                    r#"leaktrace_heap_outstanding_bytes{{{pod},container="api",container_id="0123456789ab",comm="cache-server",kind="heap"}}"#
                ),
                "8388608",
            ),
            (
                format!(
                    r#"leaktrace_open_fds{{{pod},container="0123456789ab",comm="cache-server",kind="file"}}"#
                ),
                "847",
            ),
            (
                format!(
                    r#"leaktrace_oom_kills_total{{{pod},container="api",container_id="abcdef",comm="cache-server",kind="oom"}}"#
                ),
                "1",
            ),
            // Not in a pod: as before, no pod labels.
            (
                r#"leaktrace_heap_outstanding_bytes{container="",comm="cache-server",kind="heap"}"#
                    .to_owned(),
                "1048576",
            ),
        ] {
            assert_eq!(got.get(key.as_str()), Some(&value), "{key}\n{text}");
        }
        assert!(!text.contains("namespace=\"\""), "{text}");
    }

    #[test]
    fn the_agents_growth_rows_and_tier2_list_count() {
        let mut r = sample();
        let mut row = r.leaks[0].clone();
        row.kind = "growth";
        row.outstanding_bytes = 4096;
        r.growth.push(row);
        r.tier2 = ["exited", ""]
            .into_iter()
            .map(|end| crate::report::Tier2 {
                pid: 7,
                owner: Owner::named("svc"),
                reason: "comm=svc".into(),
                since_s: 1.0,
                until_s: (!end.is_empty()).then_some(2.0),
                end: (!end.is_empty()).then(|| end.to_owned()),
            })
            .collect();
        let text = String::from_utf8(Metrics::default().export(&r)).unwrap();
        let got = samples(&text);
        let key =
            r#"leaktrace_heap_outstanding_bytes{container="",comm="cache-server",kind="growth"}"#;
        assert_eq!(got[key], "4096");
        assert_eq!(got["leaktrace_tier2_processes"], "1", "one still traced");
    }

    #[test]
    fn rows_of_one_label_set_are_summed() {
        let text = String::from_utf8(Metrics::default().export(&sample())).unwrap();
        let got = samples(&text);
        let key =
            r#"leaktrace_heap_outstanding_bytes{container="",comm="cache-server",kind="heap"}"#;
        assert_eq!(got[key], "9437184");
        // Unknown agent figures are left out.
        assert!(!text.contains("tracked_processes"));
    }

    #[test]
    fn verdicts_are_counted_per_owner_and_past_the_cap_per_verdict() {
        use crate::report::verdict::Shape;
        let mut r = sample();
        let template = r.leaks[0].clone();
        let shapes = [Shape::Leak, Shape::Plateau, Shape::Leak, Shape::Churn];
        r.leaks = (0..12u64)
            .map(|i| {
                let mut row = template.clone();
                // 4 workers of 3 stacks each.
                row.owner.comm = format!("worker-{}", i / 3);
                let mut trend = row.trend.clone().unwrap();
                trend.verdict = shapes[i as usize % shapes.len()];
                row.trend = Some(trend);
                row
            })
            .collect();
        r.fd_leaks.clear();
        r.tmp_leaks.clear();
        let count = |text: &str| -> BTreeMap<String, String> {
            samples(text)
                .into_iter()
                .filter_map(|(k, v)| {
                    let labels = k.strip_prefix("leaktrace_leak_verdict_stacks")?;
                    Some((labels.to_owned(), v.to_owned()))
                })
                .collect()
        };
        let all = count(&String::from_utf8(Metrics::default().export(&r)).unwrap());
        let total: u64 = all.values().map(|v| v.parse::<u64>().unwrap()).sum();
        assert_eq!(total, 12, "{all:?}");
        assert_eq!(
            all[r#"{container="",comm="worker-0",kind="heap",verdict="leak"}"#],
            "2"
        );
        assert!(all.keys().all(|k| !k.contains("cache_insert")), "no stack");
        let metrics = Metrics {
            max_series: 4,
            ..Metrics::default()
        };
        let capped = count(&String::from_utf8(metrics.export(&r)).unwrap());
        assert!(capped.len() <= 4, "{capped:?}");
        let total: u64 = capped.values().map(|v| v.parse::<u64>().unwrap()).sum();
        assert_eq!(total, 12, "every stack still counted: {capped:?}");
        let leaks: u64 = capped
            .iter()
            .filter(|(k, _)| k.contains(r#"verdict="leak""#))
            .map(|(_, v)| v.parse::<u64>().unwrap())
            .sum();
        assert_eq!(leaks, 6, "the other series keep their verdict: {capped:?}");
        assert!(
            capped
                .keys()
                .any(|k| k.starts_with(r#"{container="other",comm="other",kind="other""#)),
            "{capped:?}"
        );
    }

    #[test]
    fn past_the_cap_the_smallest_series_sum_into_other() {
        let mut r = sample();
        let template = r.leaks[0].clone();
        r.leaks = (1..=5u64)
            .map(|i| {
                let mut row = template.clone();
                row.owner.comm = format!("worker-{i}");
                row.outstanding_bytes = i * 100;
                row.outstanding_count = i;
                row.growth_bytes_per_s = Some(i as f64);
                row
            })
            .collect();
        let metrics = Metrics {
            max_series: 3,
            ..Metrics::default()
        };
        let text = String::from_utf8(metrics.export(&r)).unwrap();
        let got = samples(&text);
        let bytes: BTreeMap<&str, &str> = got
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("leaktrace_heap_outstanding_bytes")?, *v)))
            .collect();
        let want: BTreeMap<&str, &str> = [
            (r#"{container="",comm="worker-5",kind="heap"}"#, "500"),
            (r#"{container="",comm="worker-4",kind="heap"}"#, "400"),
            (r#"{container="other",comm="other",kind="other"}"#, "600"),
        ]
        .into();
        assert_eq!(bytes, want);
        let other = r#"{container="other",comm="other",kind="other"}"#;
        assert_eq!(
            got[format!("leaktrace_heap_outstanding_objects{other}").as_str()],
            "6"
        );
        assert_eq!(
            got[format!("leaktrace_heap_growth_bytes_per_second{other}").as_str()],
            "6.0"
        );
    }
}
