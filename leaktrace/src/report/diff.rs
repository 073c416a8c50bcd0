//! `leaktrace diff`: what changed between two reports, stack by stack ("did the fix work?").
//!
//! Two reports of one program, before and after a change, share no pid, no stack id and (with
//! ASLR) no address. A stack is known across them by what symbolization said of it: each
//! frame's function, source file and line (a frame without a symbol, by its module's file
//! name and its offset there), with the kind of row and the process's command name. Rows of
//! one report with the same identity (several processes, `--by-pid`, a row at exit beside a
//! live one) are summed. Stacks that match exactly are paired first; then, since an edit to
//! a source file moves the lines of everything below it, stacks left over whose functions
//! alone agree are paired when each report holds as many of them (in source order).
//!
//! A diff reads a narrow view of the JSON report ([`ReportView`]): the model
//! ([`crate::report::model`]) stays the one description of the JSON, and the view is checked
//! against it by a round-trip test (render the model as JSON, read it back, compare with the
//! view taken of the model directly). [`diff`] is a pure function of two views; the writers
//! are in [`crate::export::diff`].
use std::{
    cmp::{Ordering, Reverse},
    collections::BTreeMap,
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::report::{Frame, Report};

/// The kinds of row a diff compares.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Heap blocks (`leaks` of kind `heap`).
    Heap,
    /// Pages written and kept (`leaks` of kind `growth`, and the agent's `growth` list).
    Growth,
    /// Descriptors still open (`fd_leaks`).
    Fd,
    /// Temp files still on disk (`tmp_leaks`).
    Tmp,
}

impl Kind {
    /// What a row's count counts.
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Heap => "blocks",
            Kind::Growth => "pages",
            Kind::Fd => "descriptors",
            Kind::Tmp => "files",
        }
    }

    /// False for descriptors, which have a count and no size.
    pub fn has_bytes(self) -> bool {
        self != Kind::Fd
    }

    /// The name reports and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Heap => "heap",
            Kind::Growth => "growth",
            Kind::Fd => "fd",
            Kind::Tmp => "tmp",
        }
    }
}

/// One frame as a diff knows it: what symbolization said, and not the address, which
/// differs from run to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameView {
    /// Demangled function name, when known.
    pub symbol: Option<String>,
    /// Path of the module as the process mapped it.
    pub module: Option<String>,
    /// Source file name.
    pub file: Option<String>,
    /// Source line.
    pub line: Option<u32>,
    /// Offset in `module` (`0x…` in JSON): names a frame without a symbol.
    #[serde(serialize_with = "hex_opt", deserialize_with = "from_hex_opt", default)]
    pub offset: Option<u64>,
    /// A function inlined into the next frame.
    #[serde(default)]
    pub inlined: bool,
}

impl From<&Frame> for FrameView {
    fn from(f: &Frame) -> Self {
        Self {
            symbol: f.symbol.clone(),
            module: f.module.clone(),
            file: f.file.clone(),
            line: f.line,
            offset: f.offset,
            inlined: f.inlined,
        }
    }
}

impl FrameView {
    /// The module's file name, without its directory (which may be a temporary one).
    pub fn module_name(&self) -> Option<&str> {
        self.module
            .as_deref()
            .map(|m| m.rsplit('/').next().unwrap_or(m))
    }
}

fn hex_opt<S: serde::Serializer>(n: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => s.collect_str(&format_args!("{n:#x}")),
        None => s.serialize_none(),
    }
}

fn from_hex_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    let digits = text.strip_prefix("0x").unwrap_or(&text);
    u64::from_str_radix(digits, 16)
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("`{text}` is not an offset like 0x1a2b")))
}

/// One row of a report, whatever its kind: a stack of one process (merged rows: of one
/// command) and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// What the row holds.
    pub kind: Kind,
    /// The process's command name.
    pub comm: String,
    /// Blocks, pages, descriptors or files.
    pub count: u64,
    /// Their bytes (0 for descriptors).
    pub bytes: u64,
    /// Innermost first.
    pub frames: Vec<FrameView>,
    /// The index in `frames` of the row's site, its first frame in the program's own code.
    pub site: usize,
}

/// The session-wide figures a diff shows beside its rows.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(expecting = "the report's summary (an object)")]
pub struct SummaryView {
    /// Seconds since tracing started.
    pub elapsed_s: f64,
    /// `full` or `growth`.
    #[serde(default)]
    pub mode: String,
    /// Events the kernel side could not deliver.
    #[serde(default)]
    pub lost_events: u64,
    /// Non-zero: allocations were sampled.
    #[serde(default)]
    pub sample_bytes: u64,
    /// Blocks younger than this were not counted.
    #[serde(default)]
    pub min_age_s: f64,
}

/// What a diff reads of a report: its summary and its rows of every kind (the C/C++
/// runtime's own blocks, which are not leaks, are left out).
#[derive(Clone, Debug, PartialEq)]
pub struct ReportView {
    /// Session-wide figures.
    pub summary: SummaryView,
    /// Rows of every kind, in the report's order: heap or growth, the agent's growth,
    /// descriptors, temp files.
    pub rows: Vec<Row>,
    /// The last report of its session.
    pub is_final: bool,
}

impl<'de> Deserialize<'de> for ReportView {
    /// A report is an object: a derived struct would also take an array of its fields.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = ReportView;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a leaktrace JSON report (an object with `summary` and `leaks`)")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ReportView, A::Error> {
                RawReport::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ReportView::from)
            }
        }
        d.deserialize_map(Object)
    }
}

/// The JSON report's keys a diff reads; every other key is skipped.
#[derive(Deserialize)]
struct RawReport {
    summary: SummaryView,
    leaks: Vec<RawLeak>,
    #[serde(default)]
    growth: Vec<RawLeak>,
    #[serde(default)]
    fd_leaks: Vec<RawFd>,
    #[serde(default)]
    tmp_leaks: Vec<RawTmp>,
    #[serde(rename = "final", default)]
    is_final: bool,
}

#[derive(Deserialize)]
struct RawLeak {
    kind: Kind,
    comm: String,
    outstanding_count: u64,
    outstanding_bytes: u64,
    frames: Vec<FrameView>,
    #[serde(default)]
    site: usize,
}

#[derive(Deserialize)]
struct RawFd {
    comm: String,
    outstanding: u64,
    frames: Vec<FrameView>,
    #[serde(default)]
    site: usize,
}

#[derive(Deserialize)]
struct RawTmp {
    comm: String,
    files: u64,
    bytes: u64,
    frames: Vec<FrameView>,
    #[serde(default)]
    site: usize,
}

impl From<RawReport> for ReportView {
    fn from(r: RawReport) -> Self {
        let leak = |l: RawLeak| Row {
            kind: l.kind,
            comm: l.comm,
            count: l.outstanding_count,
            bytes: l.outstanding_bytes,
            frames: l.frames,
            site: l.site,
        };
        let mut rows: Vec<Row> = r.leaks.into_iter().map(leak).collect();
        rows.extend(r.growth.into_iter().map(leak));
        rows.extend(r.fd_leaks.into_iter().map(|l| Row {
            kind: Kind::Fd,
            comm: l.comm,
            count: l.outstanding,
            bytes: 0,
            frames: l.frames,
            site: l.site,
        }));
        rows.extend(r.tmp_leaks.into_iter().map(|l| Row {
            kind: Kind::Tmp,
            comm: l.comm,
            count: l.files,
            bytes: l.bytes,
            frames: l.frames,
            site: l.site,
        }));
        Self {
            summary: r.summary,
            rows,
            is_final: r.is_final,
        }
    }
}

impl From<&Report> for ReportView {
    /// The view of a report in memory: what reading its JSON gives.
    fn from(r: &Report) -> Self {
        let frames = |f: &[Frame]| f.iter().map(FrameView::from).collect();
        let leak = |l: &crate::report::Leak| Row {
            kind: if l.kind == "growth" {
                Kind::Growth
            } else {
                Kind::Heap
            },
            comm: l.owner.comm.clone(),
            count: l.outstanding_count,
            bytes: l.outstanding_bytes,
            frames: frames(&l.frames),
            site: l.site,
        };
        let mut rows: Vec<Row> = r.leaks.iter().map(leak).collect();
        rows.extend(r.growth.iter().map(leak));
        rows.extend(r.fd_leaks.iter().map(|l| Row {
            kind: Kind::Fd,
            comm: l.owner.comm.clone(),
            count: l.outstanding,
            bytes: 0,
            frames: frames(&l.frames),
            site: l.site,
        }));
        rows.extend(r.tmp_leaks.iter().map(|l| Row {
            kind: Kind::Tmp,
            comm: l.owner.comm.clone(),
            count: l.files,
            bytes: l.bytes,
            frames: frames(&l.frames),
            site: l.site,
        }));
        let s = &r.summary;
        Self {
            summary: SummaryView {
                elapsed_s: s.elapsed_s,
                mode: s.mode.to_owned(),
                lost_events: s.lost_events,
                sample_bytes: s.sample_bytes,
                min_age_s: s.min_age_s,
            },
            rows,
            is_final: r.is_final,
        }
    }
}

/// Why a file holds no report a diff can read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds nothing but white space.
    #[error("{path}: empty: no report in it (write one with `--format json -o FILE`)")]
    Empty {
        /// The file.
        path: String,
    },
    /// The file is not JSON.
    #[error("{path}: not JSON: {source}")]
    NotJson {
        /// The file.
        path: String,
        /// Where and why.
        #[source]
        source: serde_json::Error,
    },
    /// The file is JSON, but not a leaktrace report.
    #[error("{path}: not a leaktrace JSON report: {source}")]
    NotReport {
        /// The file.
        path: String,
        /// What is missing or wrong, and where.
        #[source]
        source: serde_json::Error,
    },
}

/// A report read from a file, and how many the file held.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    /// The file, as the command line named it.
    pub path: String,
    /// Reports in the file (a session writing to stdout with `--interval` writes one a line);
    /// `report` is the last.
    pub reports: usize,
    /// The last report.
    pub report: ReportView,
}

impl Input {
    /// Reads the last report of `text` (one JSON report, or several one after another).
    /// Every report in it is read, so a broken one is named wherever it is.
    pub fn parse(path: &str, text: &str) -> Result<Self, ReadError> {
        let mut last = None;
        let mut reports = 0;
        for report in serde_json::Deserializer::from_str(text).into_iter::<ReportView>() {
            let report = report.map_err(|source| {
                let path = path.to_owned();
                match source.classify() {
                    serde_json::error::Category::Data => ReadError::NotReport { path, source },
                    _ => ReadError::NotJson { path, source },
                }
            })?;
            reports += 1;
            last = Some(report);
        }
        let report = last.ok_or_else(|| ReadError::Empty {
            path: path.to_owned(),
        })?;
        Ok(Self {
            path: path.to_owned(),
            reports,
            report,
        })
    }

    /// Reads the last report of the file at `path`.
    pub fn read(path: &Path) -> Result<Self, ReadError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io {
            path: name.clone(),
            source,
        })?;
        Self::parse(&name, &text)
    }
}

/// What a diff ranks stacks by (and weighs folded lines with).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    /// The change in bytes held (descriptors, which have none, by their count).
    #[default]
    Bytes,
    /// The change in blocks, pages, descriptors or files held.
    Count,
}

/// What happened to a stack between the two reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// It holds more bytes (or as many bytes and more blocks) than before.
    Grew,
    /// Only the new report holds it.
    New,
    /// It holds fewer bytes (or as many bytes and fewer blocks) than before.
    Shrank,
    /// Only the old report holds it: fixed, or not reached this time.
    Gone,
    /// It holds exactly what it held.
    Unchanged,
}

impl Change {
    /// Every change, in the order a diff lists them: what got worse first.
    pub const ALL: [Change; 5] = [
        Change::Grew,
        Change::New,
        Change::Shrank,
        Change::Gone,
        Change::Unchanged,
    ];

    /// The name the JSON uses.
    pub fn name(self) -> &'static str {
        match self {
            Change::Grew => "grew",
            Change::New => "new",
            Change::Shrank => "shrank",
            Change::Gone => "gone",
            Change::Unchanged => "unchanged",
        }
    }
}

/// How a stack of the old report was paired with one of the new.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Matched {
    /// Every frame's function, file and line (or module and offset) agree.
    Frames,
    /// Only the functions agree: lines moved (the source was edited), and each report holds
    /// as many stacks with these functions, paired in source order.
    Functions,
}

/// One stack's change (the JSON `stacks` entries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StackDiff {
    /// What happened to it.
    pub change: Change,
    /// What it holds.
    pub kind: Kind,
    /// The command name of the processes holding it.
    pub comm: String,
    /// What `count` counts: blocks, pages, descriptors or files.
    pub unit: &'static str,
    /// Held in the old report (0 when new).
    pub old_count: u64,
    /// Held in the new report (0 when gone).
    pub new_count: u64,
    /// `new_count - old_count`.
    pub delta_count: i64,
    /// Bytes held in the old report (`None` for descriptors).
    pub old_bytes: Option<u64>,
    /// Bytes held in the new report.
    pub new_bytes: Option<u64>,
    /// `new_bytes - old_bytes`.
    pub delta_bytes: Option<i64>,
    /// How the two were paired (`None` for new and gone stacks).
    pub matched: Option<Matched>,
    /// The stack, innermost first: as the new report has it (the old, for a gone stack).
    pub frames: Vec<FrameView>,
    /// The index in `frames` of the stack's site.
    pub site: usize,
    /// The old report's lines, when they moved (matched by functions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_frames: Option<Vec<FrameView>>,
}

impl StackDiff {
    /// The change that `--sort` ranks by (descriptors, with no bytes, by their count).
    pub fn delta(&self, sort: Sort) -> i64 {
        match (sort, self.delta_bytes) {
            (Sort::Bytes, Some(b)) => b,
            _ => self.delta_count,
        }
    }

    /// What the new report holds, in `--sort`'s measure.
    fn held(&self, sort: Sort) -> u64 {
        match (sort, self.new_bytes) {
            (Sort::Bytes, Some(b)) => b,
            _ => self.new_count,
        }
    }
}

/// The totals of one kind in each report (the JSON `totals` entries): the sums of the rows
/// compared, so of the rows each report kept (its `--top`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Total {
    /// The kind of row.
    pub kind: Kind,
    /// What the counts count.
    pub unit: &'static str,
    /// Stacks in the old report.
    pub old_stacks: u64,
    /// Stacks in the new report.
    pub new_stacks: u64,
    /// Held in the old report.
    pub old_count: u64,
    /// Held in the new report.
    pub new_count: u64,
    /// `new_count - old_count`.
    pub delta_count: i64,
    /// Bytes held in the old report (`None` for descriptors).
    pub old_bytes: Option<u64>,
    /// Bytes held in the new report.
    pub new_bytes: Option<u64>,
    /// `new_bytes - old_bytes`.
    pub delta_bytes: Option<i64>,
}

/// One of the two reports, as the diff tells it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Side {
    /// The file.
    pub path: String,
    /// Reports in the file; the diff read the last.
    pub reports: usize,
    /// Seconds of tracing the report covers.
    pub elapsed_s: f64,
    /// The last report of its session.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// `full` or `growth`.
    pub mode: String,
    /// Events lost in that session: non-zero makes its counts lower bounds.
    pub lost_events: u64,
}

/// How many stacks changed each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Stacks that grew.
    pub grew: u64,
    /// Stacks only the new report holds.
    pub new: u64,
    /// Stacks that shrank.
    pub shrank: u64,
    /// Stacks only the old report holds.
    pub gone: u64,
    /// Stacks that hold what they held.
    pub unchanged: u64,
}

impl Counts {
    /// The count of `change`.
    pub fn of(&self, change: Change) -> u64 {
        match change {
            Change::Grew => self.grew,
            Change::New => self.new,
            Change::Shrank => self.shrank,
            Change::Gone => self.gone,
            Change::Unchanged => self.unchanged,
        }
    }

    fn add(&mut self, change: Change) {
        *match change {
            Change::Grew => &mut self.grew,
            Change::New => &mut self.new,
            Change::Shrank => &mut self.shrank,
            Change::Gone => &mut self.gone,
            Change::Unchanged => &mut self.unchanged,
        } += 1;
    }
}

/// What changed between two reports (the JSON document `diff --format json` writes).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diff {
    /// The report before.
    pub old: Side,
    /// The report after.
    pub new: Side,
    /// What stacks are ranked by.
    pub sort: Sort,
    /// Per kind present in either report.
    pub totals: Vec<Total>,
    /// Stacks per change.
    pub counts: Counts,
    /// Every stack of either report: grew, new, shrank, gone, unchanged in that order, each
    /// group ranked by the size of its change in `sort`'s measure.
    pub stacks: Vec<StackDiff>,
    /// What the reader must know to trust the comparison (modes or sampling that differ,
    /// lost events).
    pub notes: Vec<String>,
}

impl Diff {
    /// Keeps the first `n` stacks of each change (the largest changes); `counts` still counts
    /// them all.
    pub fn keep_top(&mut self, n: usize) {
        let mut seen = Counts::default();
        self.stacks.retain(|s| {
            seen.add(s.change);
            seen.of(s.change) <= n as u64
        });
    }
}

/// What identifies a frame across runs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FrameKey<'a> {
    /// A function, and where in its source.
    Symbol {
        name: &'a str,
        file: Option<&'a str>,
        line: Option<u32>,
        inlined: bool,
    },
    /// An address without a symbol: its module's file name and offset.
    Unknown {
        module: Option<&'a str>,
        offset: Option<u64>,
    },
}

/// What identifies a frame when lines may have moved: its function. A frame without a
/// symbol has nothing but its module and offset to go by, so it stays as exact as before.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FunctionKey<'a> {
    Symbol(&'a str),
    Unknown(FrameKey<'a>),
}

fn frame_key(f: &FrameView) -> FrameKey<'_> {
    match &f.symbol {
        Some(name) => FrameKey::Symbol {
            name,
            file: f.file.as_deref(),
            line: f.line,
            inlined: f.inlined,
        },
        None => FrameKey::Unknown {
            module: f.module_name(),
            offset: f.offset,
        },
    }
}

fn function_key(f: &FrameView) -> FunctionKey<'_> {
    match &f.symbol {
        Some(name) => FunctionKey::Symbol(name),
        None => FunctionKey::Unknown(frame_key(f)),
    }
}

/// What identifies a stack when lines may have moved (with its kind and command).
fn functions<'a>(h: &Held<'a>) -> Vec<FunctionKey<'a>> {
    h.frames.iter().map(function_key).collect()
}

/// A stack's identity in one report.
type StackKey<'a> = (Kind, &'a str, Vec<FrameKey<'a>>);

/// The rows of one identity in one report, summed.
#[derive(Clone, Debug)]
struct Held<'a> {
    count: u64,
    bytes: u64,
    /// The frames of its first row, and its site.
    frames: &'a [FrameView],
    site: usize,
}

/// A report's rows by identity, summed.
fn by_stack(rows: &[Row]) -> BTreeMap<StackKey<'_>, Held<'_>> {
    let mut stacks: BTreeMap<StackKey<'_>, Held<'_>> = BTreeMap::new();
    for row in rows {
        let key = (
            row.kind,
            row.comm.as_str(),
            row.frames.iter().map(frame_key).collect(),
        );
        let held = stacks.entry(key).or_insert(Held {
            count: 0,
            bytes: 0,
            frames: &row.frames,
            site: row.site,
        });
        held.count = held.count.saturating_add(row.count);
        held.bytes = held.bytes.saturating_add(row.bytes);
    }
    stacks
}

fn delta(old: u64, new: u64) -> i64 {
    let d = i128::from(new) - i128::from(old);
    d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn stack_diff(
    kind: Kind,
    comm: &str,
    old: Option<&Held<'_>>,
    new: Option<&Held<'_>>,
    matched: Option<Matched>,
) -> StackDiff {
    let (old_count, old_bytes) = old.map_or((0, 0), |h| (h.count, h.bytes));
    let (new_count, new_bytes) = new.map_or((0, 0), |h| (h.count, h.bytes));
    let (delta_count, delta_bytes) = (delta(old_count, new_count), delta(old_bytes, new_bytes));
    let change = match (old, new) {
        (None, _) => Change::New,
        (_, None) => Change::Gone,
        _ => match (delta_bytes, delta_count).cmp(&(0, 0)) {
            Ordering::Greater => Change::Grew,
            Ordering::Less => Change::Shrank,
            Ordering::Equal => Change::Unchanged,
        },
    };
    let (frames, site) = new
        .or(old)
        .map(|h| (h.frames.to_vec(), h.site))
        .unwrap_or_default();
    let old_frames = match (matched, old) {
        (Some(Matched::Functions), Some(o)) => Some(o.frames.to_vec()),
        _ => None,
    };
    let bytes = kind.has_bytes();
    StackDiff {
        change,
        kind,
        comm: comm.to_owned(),
        unit: kind.unit(),
        old_count,
        new_count,
        delta_count,
        old_bytes: bytes.then_some(old_bytes),
        new_bytes: bytes.then_some(new_bytes),
        delta_bytes: bytes.then_some(delta_bytes),
        matched,
        frames,
        site,
        old_frames,
    }
}

/// The lines of a stack, innermost first, to pair stacks whose functions agree in source
/// order.
fn lines(frames: &[FrameView]) -> Vec<(Option<u32>, Option<u64>)> {
    frames.iter().map(|f| (f.line, f.offset)).collect()
}

/// Pairs the stacks of `old` and `new` and says how each changed, ranked by `sort`.
pub fn diff(old: &Input, new: &Input, sort: Sort) -> Diff {
    let before = by_stack(&old.report.rows);
    let after = by_stack(&new.report.rows);
    let mut stacks = Vec::new();
    // Exact pairs first; what is left over is paired by functions alone.
    type Leftover<'a, 'h> = (Vec<&'h Held<'a>>, Vec<&'h Held<'a>>);
    let mut loose: BTreeMap<(Kind, &str, Vec<FunctionKey<'_>>), Leftover<'_, '_>> = BTreeMap::new();
    for (key, held) in &before {
        match after.get(key) {
            Some(now) => stacks.push(stack_diff(
                key.0,
                key.1,
                Some(held),
                Some(now),
                Some(Matched::Frames),
            )),
            None => loose
                .entry((key.0, key.1, functions(held)))
                .or_default()
                .0
                .push(held),
        }
    }
    for (key, held) in &after {
        if !before.contains_key(key) {
            loose
                .entry((key.0, key.1, functions(held)))
                .or_default()
                .1
                .push(held);
        }
    }
    for ((kind, comm, _), (mut gone, mut new)) in loose {
        if gone.len() == new.len() {
            gone.sort_by_key(|h| lines(h.frames));
            new.sort_by_key(|h| lines(h.frames));
            for (o, n) in gone.into_iter().zip(new) {
                stacks.push(stack_diff(
                    kind,
                    comm,
                    Some(o),
                    Some(n),
                    Some(Matched::Functions),
                ));
            }
        } else {
            for o in gone {
                stacks.push(stack_diff(kind, comm, Some(o), None, None));
            }
            for n in new {
                stacks.push(stack_diff(kind, comm, None, Some(n), None));
            }
        }
    }
    rank(&mut stacks, sort);
    let mut counts = Counts::default();
    for s in &stacks {
        counts.add(s.change);
    }
    Diff {
        old: side(old),
        new: side(new),
        sort,
        totals: totals(&before, &after),
        counts,
        stacks,
        notes: notes(old, new),
    }
}

/// Groups by change, then the largest change (for unchanged stacks, the most held) first;
/// ties by the other measure, then by kind, command and frames, so the order is
/// deterministic.
fn rank(stacks: &mut [StackDiff], sort: Sort) {
    let other = match sort {
        Sort::Bytes => Sort::Count,
        Sort::Count => Sort::Bytes,
    };
    let frames_text = |s: &StackDiff| -> Vec<(Option<String>, Option<String>, Option<u32>)> {
        s.frames
            .iter()
            .map(|f| (f.symbol.clone(), f.file.clone(), f.line))
            .collect()
    };
    stacks.sort_by(|a, b| {
        let weight = |s: &StackDiff, sort| match s.change {
            Change::Unchanged => u128::from(s.held(sort)),
            _ => u128::from(s.delta(sort).unsigned_abs()),
        };
        a.change
            .cmp(&b.change)
            .then_with(|| Reverse(weight(a, sort)).cmp(&Reverse(weight(b, sort))))
            .then_with(|| Reverse(weight(a, other)).cmp(&Reverse(weight(b, other))))
            .then_with(|| (a.kind, &a.comm).cmp(&(b.kind, &b.comm)))
            .then_with(|| frames_text(a).cmp(&frames_text(b)))
    });
}

fn totals(
    before: &BTreeMap<StackKey<'_>, Held<'_>>,
    after: &BTreeMap<StackKey<'_>, Held<'_>>,
) -> Vec<Total> {
    let mut sums: BTreeMap<Kind, [u64; 6]> = BTreeMap::new();
    for (i, side) in [before, after].into_iter().enumerate() {
        for ((kind, _, _), held) in side {
            let s = sums.entry(*kind).or_default();
            s[i] += 1;
            s[2 + i] = s[2 + i].saturating_add(held.count);
            s[4 + i] = s[4 + i].saturating_add(held.bytes);
        }
    }
    sums.into_iter()
        .map(
            |(
                kind,
                [
                    old_stacks,
                    new_stacks,
                    old_count,
                    new_count,
                    old_bytes,
                    new_bytes,
                ],
            )| {
                let bytes = kind.has_bytes();
                Total {
                    kind,
                    unit: kind.unit(),
                    old_stacks,
                    new_stacks,
                    old_count,
                    new_count,
                    delta_count: delta(old_count, new_count),
                    old_bytes: bytes.then_some(old_bytes),
                    new_bytes: bytes.then_some(new_bytes),
                    delta_bytes: bytes.then_some(delta(old_bytes, new_bytes)),
                }
            },
        )
        .collect()
}

fn side(input: &Input) -> Side {
    let s = &input.report.summary;
    Side {
        path: input.path.clone(),
        reports: input.reports,
        elapsed_s: s.elapsed_s,
        is_final: input.report.is_final,
        mode: s.mode.clone(),
        lost_events: s.lost_events,
    }
}

fn notes(old: &Input, new: &Input) -> Vec<String> {
    let (a, b) = (&old.report.summary, &new.report.summary);
    let mut notes = Vec::new();
    if a.mode != b.mode {
        notes.push(format!(
            "{} traced the heap in {} mode and {} in {} mode: heap and growth rows do not compare",
            old.path, a.mode, new.path, b.mode
        ));
    }
    if a.sample_bytes != b.sample_bytes {
        notes.push(format!(
            "{} and {} sampled allocations differently (--sample-bytes {} and {}): bytes are \
             estimates and block counts do not compare",
            old.path, new.path, a.sample_bytes, b.sample_bytes
        ));
    } else if a.sample_bytes != 0 {
        notes.push(format!(
            "both reports sampled allocations (--sample-bytes {}): heap bytes are estimates, \
             and small changes may be noise",
            a.sample_bytes
        ));
    }
    if a.min_age_s != b.min_age_s {
        notes.push(format!(
            "{} counted blocks at least {}s old and {} at least {}s old (--min-age)",
            old.path, a.min_age_s, new.path, b.min_age_s
        ));
    }
    for (input, s) in [(old, a), (new, b)] {
        if s.lost_events > 0 {
            notes.push(format!(
                "{} lost {} events: its counts are lower bounds",
                input.path, s.lost_events
            ));
        }
    }
    notes
}

#[cfg(test)]
#[path = "diff_tests.rs"]
pub(crate) mod tests;
