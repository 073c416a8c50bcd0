//! Recording a session and replaying it: every ring-buffer record, every call the driver
//! made into the [`Pipeline`], and every answer the [`Host`] gave, one JSON line each.
//!
//! A replay feeds the same records through the same stages with the recorded answers, so
//! it reproduces the session's reports byte for byte, without privileges or the traced
//! processes. `leaktrace --record FILE` writes one; the unit tests replay the fixtures in
//! `src/driver/fixtures/` (see the README there for how they were made).
use std::{
    cell::RefCell,
    collections::VecDeque,
    fs::File,
    io::{self, BufWriter, Write as _},
    rc::Rc,
};

use hashbrown::HashMap;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{pipeline::Pipeline, reports::KernelStats};
use crate::{
    report::{Report, ReportOptions, TracerUsage},
    symbolize::{Resolved, Symbols},
    targets::{
        cgroup::Attribution,
        host::{Host, Live},
        procfs::Mapping,
    },
    track::{fd_events::FdTracker, oom::OomWatch},
};

/// One line of a recording.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Entry {
    /// The session's settings.
    Begin {
        /// The report options the session ran with.
        options: ReportOptions,
        /// Bits of [`leaktrace_common::features`].
        features: u32,
    },
    /// A ring-buffer record, as hex.
    Record {
        /// The record's bytes, two lowercase hex digits each.
        hex: String,
    },
    /// [`Pipeline::start`].
    Start {
        /// The process.
        pid: u32,
        /// A command leaktrace started, not yet exec'd.
        spawned: bool,
    },
    /// [`Pipeline::retire`].
    Retire {
        /// The process.
        pid: u32,
        /// When, in `CLOCK_MONOTONIC` nanoseconds.
        ts_ns: u64,
    },
    /// [`Pipeline::adopt`].
    Adopt {
        /// The process.
        pid: u32,
    },
    /// [`Pipeline::discard_heap`].
    Discard {
        /// The process.
        pid: u32,
    },
    /// [`Pipeline::tick`].
    Tick {
        /// The processes the tick looked at.
        pids: Vec<u32>,
    },
    /// [`Pipeline::report`].
    Report {
        /// Whether it was the session's last report.
        is_final: bool,
        /// What the kernel side counted, as read for that report.
        kernel: KernelStats,
    },
    /// What the host answered to question `q`.
    Answer {
        /// The question: the [`Host`] method and its arguments (`comm 42`, `maps 42`).
        q: String,
        /// The answer, as JSON.
        a: Value,
    },
    /// What every (module, offset) looked up resolved to.
    Symbols {
        /// (device, inode, file offset, what it resolved to), as [`Symbols::known`] lists them.
        entries: Vec<(u64, u64, u64, Resolved)>,
    },
}

impl Entry {
    /// A record's entry.
    pub fn record(bytes: &[u8]) -> Self {
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            hex.push_str(&format!("{b:02x}"));
        }
        Entry::Record { hex }
    }
}

/// Where entries go: one file, shared by the pipeline and the host it asks.
#[derive(Clone)]
pub struct Recorder(Rc<RefCell<BufWriter<File>>>);

impl Recorder {
    /// Records into a new file at `path`.
    pub fn create(path: &std::path::Path) -> io::Result<Self> {
        Ok(Self(Rc::new(RefCell::new(BufWriter::new(File::create(
            path,
        )?)))))
    }

    /// Appends one entry. A failed write is logged once per call site and dropped: a
    /// recording never stops the session.
    pub fn write(&mut self, entry: &Entry) {
        let mut out = self.0.borrow_mut();
        let line = serde_json::to_string(entry).unwrap_or_default();
        if let Err(e) = writeln!(out, "{line}") {
            tracing::warn!("recording: {e}");
        }
    }

    /// Writes out what is buffered.
    pub fn flush(&self) {
        if let Err(e) = self.0.borrow_mut().flush() {
            tracing::warn!("recording: {e}");
        }
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorder")
    }
}

/// The live host, with every answer recorded.
pub struct Recording {
    live: Live,
    out: RefCell<Recorder>,
}

impl Recording {
    /// Answers from `live`, recording into `out`.
    pub fn new(live: Live, out: Recorder) -> Self {
        Self {
            live,
            out: RefCell::new(out),
        }
    }

    fn note<T: Serialize>(&self, q: String, a: T) -> T {
        let value = serde_json::to_value(&a).unwrap_or(Value::Null);
        self.out.borrow_mut().write(&Entry::Answer { q, a: value });
        a
    }
}

/// An `io::Result` as a recording keeps it: the value, or `None` for any error.
fn ok<T>(r: io::Result<T>) -> Option<T> {
    r.ok()
}

fn gone<T>(v: Option<T>) -> io::Result<T> {
    v.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
}

impl Host for Recording {
    fn comm(&self, pid: u32) -> String {
        self.note(format!("comm {pid}"), self.live.comm(pid))
    }
    fn maps(&self, pid: u32) -> io::Result<Vec<Mapping>> {
        gone(self.note(format!("maps {pid}"), ok(self.live.maps(pid))))
    }
    fn open_module(&self, pid: u32, m: &Mapping) -> io::Result<Option<File>> {
        self.live.open_module(pid, m)
    }
    fn proc_link(&self, pid: u32, name: &str) -> Option<String> {
        self.note(format!("link {pid} {name}"), self.live.proc_link(pid, name))
    }
    fn open_files_limit(&self, pid: u32) -> Option<u64> {
        self.note(format!("nofile {pid}"), self.live.open_files_limit(pid))
    }
    fn born_at(&self, pid: u32, path: &str, at: u64) -> Option<bool> {
        let q = format!("born {pid} {path}");
        self.note(q, self.live.born_at(pid, path, at))
    }
    fn file_size(&self, pid: u32, path: &str, fd: Option<i32>) -> Option<u64> {
        let q = format!("size {pid} {path} {fd:?}");
        self.note(q, self.live.file_size(pid, path, fd))
    }
    fn attribution(&self, pid: u32) -> Option<Attribution> {
        self.note(format!("attribution {pid}"), self.live.attribution(pid))
    }
    fn victim_attribution(
        &self,
        pid: u32,
        remembered: Option<&Attribution>,
    ) -> Option<Attribution> {
        let q = format!("victim {pid}");
        self.note(q, self.live.victim_attribution(pid, remembered))
    }
    fn now_ns(&self) -> u64 {
        self.note("now".into(), self.live.now_ns())
    }
    fn utc_now(&self) -> String {
        self.note("utc".into(), self.live.utc_now())
    }
    fn usage(&self) -> TracerUsage {
        self.note("usage".into(), self.live.usage())
    }
}

/// A host that answers what a recording says, in the order it was asked.
#[derive(Debug, Default)]
pub struct Replayed {
    answers: RefCell<HashMap<String, VecDeque<Value>>>,
}

impl Replayed {
    /// The recorded answer to `q` (the last one again once they run out), or `None`.
    fn answer<T: DeserializeOwned>(&self, q: &str) -> Option<T> {
        let mut answers = self.answers.borrow_mut();
        let queue = answers.get_mut(q)?;
        let value = if queue.len() > 1 {
            queue.pop_front()?
        } else {
            queue.front()?.clone()
        };
        serde_json::from_value(value).ok()
    }
}

impl Host for Replayed {
    fn comm(&self, pid: u32) -> String {
        self.answer(&format!("comm {pid}"))
            .unwrap_or_else(|| "?".into())
    }
    fn maps(&self, pid: u32) -> io::Result<Vec<Mapping>> {
        gone(self.answer::<Option<_>>(&format!("maps {pid}")).flatten())
    }
    fn open_module(&self, _pid: u32, _m: &Mapping) -> io::Result<Option<File>> {
        Ok(None)
    }
    fn proc_link(&self, pid: u32, name: &str) -> Option<String> {
        self.answer(&format!("link {pid} {name}")).flatten()
    }
    fn open_files_limit(&self, pid: u32) -> Option<u64> {
        self.answer(&format!("nofile {pid}")).flatten()
    }
    fn born_at(&self, pid: u32, path: &str, _at: u64) -> Option<bool> {
        self.answer(&format!("born {pid} {path}")).flatten()
    }
    fn file_size(&self, pid: u32, path: &str, fd: Option<i32>) -> Option<u64> {
        self.answer(&format!("size {pid} {path} {fd:?}")).flatten()
    }
    fn attribution(&self, pid: u32) -> Option<Attribution> {
        self.answer(&format!("attribution {pid}")).flatten()
    }
    fn victim_attribution(
        &self,
        pid: u32,
        _remembered: Option<&Attribution>,
    ) -> Option<Attribution> {
        self.answer(&format!("victim {pid}")).flatten()
    }
    fn now_ns(&self) -> u64 {
        self.answer("now").unwrap_or_default()
    }
    fn utc_now(&self) -> String {
        self.answer("utc").unwrap_or_default()
    }
    fn usage(&self) -> TracerUsage {
        self.answer("usage").unwrap_or_default()
    }
}

/// Why a recording could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("line {line}: {source}")]
    /// A line is not a valid entry.
    Json {
        /// 1-based line number in the recording.
        line: usize,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    /// A record's hex is malformed.
    #[error("line {line}: a record's hex is malformed")]
    Hex {
        /// 1-based line number in the recording.
        line: usize,
    },
    #[error("the recording does not start with its settings")]
    /// The first line is not a [`Entry::Begin`].
    NoBegin,
}

fn unhex(hex: &str) -> Option<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Replays a recording through a fresh pipeline: every report it made, in order.
pub fn replay(text: &str) -> Result<Vec<Report>, ReplayError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let entry: Entry = serde_json::from_str(line).map_err(|source| ReplayError::Json {
            line: i + 1,
            source,
        })?;
        entries.push((i + 1, entry));
    }
    let host = Replayed::default();
    let mut symbols = Vec::new();
    for (_, entry) in &entries {
        match entry {
            Entry::Answer { q, a } => host
                .answers
                .borrow_mut()
                .entry(q.clone())
                .or_default()
                .push_back(a.clone()),
            Entry::Symbols { entries } => symbols.extend(entries.iter().cloned()),
            _ => {}
        }
    }
    let Some((_, Entry::Begin { options, features })) = entries.first() else {
        return Err(ReplayError::NoBegin);
    };
    let mut pipeline = Pipeline::new(
        Box::new(host),
        options.clone(),
        FdTracker::new(*features),
        OomWatch::new(None),
        Symbols::recorded(symbols),
    );
    let mut reports = Vec::new();
    for (line, entry) in entries {
        match entry {
            Entry::Record { hex } => {
                let bytes = unhex(&hex).ok_or(ReplayError::Hex { line })?;
                pipeline.apply(&bytes);
            }
            Entry::Start { pid, spawned } => pipeline.start(pid, spawned),
            Entry::Retire { pid, ts_ns } => pipeline.retire(pid, ts_ns),
            Entry::Discard { pid } => pipeline.discard_heap(pid),
            Entry::Adopt { pid } => pipeline.adopt(pid),
            Entry::Tick { pids } => pipeline.tick(&pids),
            Entry::Report { is_final, kernel } => reports.push(pipeline.report(is_final, &kernel)),
            Entry::Begin { .. } | Entry::Answer { .. } | Entry::Symbols { .. } => {}
        }
    }
    Ok(reports)
}
