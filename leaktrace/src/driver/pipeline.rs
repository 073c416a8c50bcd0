//! The stages after the kernel boundary, wired: decode → track → symbolize → report. No BPF,
//! no privilege of its own: what it asks the system goes through a [`Host`], so a recorded
//! session replays through it in unit tests exactly as it ran.
//!
//! The driver hands it every ring-buffer record ([`Pipeline::apply`]) and the few decisions
//! that are the driver's own (a process it starts tracking or gives up on, the liveness tick,
//! a report). It answers with what the driver must act on: a process whose code changed
//! (attach probes, publish its unwind tables), an alert to print now.
use hashbrown::HashMap;
use leaktrace_common::{AllocEvent, Header, alloc_shape, release_op};

use super::record::{Entry, Recorder};
use crate::{
    decode::{Event, StackRecord, decode},
    report::{FdExhaustion, OomKill, Owner, ReportOptions, Trend},
    symbolize::{
        Symbols,
        stacks::{Stack, StackStore, normalize},
    },
    targets::{
        host::Host,
        modules::{AddressSpace, Modules},
    },
    track::{fd_events::FdTracker, heap::HeapTables, oom::OomWatch},
};

/// What the driver must act on after a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// The process exec'd: its new image's modules are in [`Pipeline::space`].
    Exec(u32),
    /// A traced process forked this child, now tracked too.
    Fork(u32),
    /// The process's dynamic loader changed its object list: maps read again.
    Loader(u32),
    /// The process exited and is forgotten: release its probes.
    Exit(u32),
}

/// Something that cannot wait for the next report: print it, and write a report now.
#[derive(Clone, Debug, PartialEq)]
pub enum Alert {
    /// The OOM killer chose a victim.
    Oom(Box<OomKill>),
    /// A process's descriptor table is full (first time at this stack).
    Exhausted(Box<FdExhaustion>),
}

/// What one record did.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The record's header (`None` when it could not be decoded).
    pub hdr: Option<Header>,
    /// What the driver must do for the process, if anything.
    pub lifecycle: Option<Lifecycle>,
    /// What to print at once, if anything.
    pub alert: Option<Alert>,
}

/// A full descriptor table, reported once per (process, failing stack).
pub(super) struct Exhaustion {
    pub(super) pid: u32,
    pub(super) stack_id: u64,
    pub(super) record: FdExhaustion,
}

/// Who a process is, as the host tells: its name, executable, cgroup, container and pod uid.
/// The pod's and container's names are added to reports later (`report::annotate`).
pub(super) fn owner_of(host: &dyn Host, pid: u32) -> Owner {
    let attribution = host.attribution(pid);
    Owner {
        comm: host.comm(pid),
        exe: host.proc_link(pid, "exe"),
        container_id: attribution.as_ref().and_then(|a| a.container_id.clone()),
        container_runtime: attribution
            .as_ref()
            .and_then(|a| crate::targets::cgroup::container(&a.cgroup))
            .map(|(_, runtime)| runtime.name()),
        pod_uid: attribution.as_ref().and_then(|a| a.pod_uid.clone()),
        cgroup: attribution.map(|a| a.cgroup),
        ..Owner::default()
    }
}

/// How full the pipeline's growing tables are ([`Pipeline::table_sizes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSizes {
    /// Outstanding heap blocks kept.
    pub heap_blocks: usize,
    /// Pages kept in the growth tables (when kept apart from the heap's).
    pub growth_pages: usize,
    /// Stacks kept.
    pub stacks: usize,
    /// Processes tracked.
    pub processes: usize,
}

/// The tracking state of a session.
pub struct Pipeline {
    pub(super) host: Box<dyn Host>,
    pub(super) modules: Modules,
    spaces: HashMap<u32, AddressSpace>,
    spaces_read: HashMap<u32, u64>,
    /// Processes whose maps were read since the driver last asked ([`Self::take_respaced`]).
    respaced: Vec<u32>,
    pub(super) heap: HeapTables,
    /// Growth tables kept apart from the heap's (the node agent: growth everywhere, the
    /// heap of a few); `None`: growth mode keeps pages in `heap`.
    pub(super) pages: Option<HeapTables>,
    pub(super) growth_trend: Trend,
    /// Keep what a process held when it exited, as *in use at exit* (`--pid`, `run`); the
    /// node agent forgets it (exited processes hold nothing; only their temp files stay).
    pub(super) keep_exited: bool,
    pub(super) stacks: StackStore,
    pub(super) symbols: Symbols,
    pub(super) trend: Trend,
    /// Who each process is, read when it was first seen.
    pub(super) owners: HashMap<u32, Owner>,
    /// Processes tracked and not yet gone.
    tracked: hashbrown::HashSet<u32>,
    /// A command we started, not yet exec'd: what it does with descriptors is our own
    /// spawning code's doing (stdout redirection), not the program's.
    before_exec: Option<u32>,
    pub(super) decode_errors: u64,
    pub(super) options: ReportOptions,
    /// Growth mode: each process's program break, to see it shrink.
    brk: HashMap<u32, u64>,
    pub(super) fd: FdTracker,
    pub(super) oom: OomWatch,
    pub(super) exhaustion: Vec<Exhaustion>,
    /// Writes every call, and the host's answers, for replay.
    pub(super) recorder: Option<Recorder>,
}

impl Pipeline {
    /// An empty pipeline; event times count from now (the host's monotonic clock).
    pub fn new(
        host: Box<dyn Host>,
        options: ReportOptions,
        fd: FdTracker,
        oom: OomWatch,
        symbols: Symbols,
    ) -> Self {
        let epoch = host.now_ns();
        Self {
            host,
            modules: Modules::default(),
            spaces: HashMap::new(),
            spaces_read: HashMap::new(),
            respaced: Vec::new(),
            heap: HeapTables::new(epoch),
            pages: None,
            growth_trend: Trend::default(),
            keep_exited: true,
            stacks: StackStore::default(),
            symbols,
            trend: Trend::default(),
            owners: HashMap::new(),
            tracked: hashbrown::HashSet::new(),
            before_exec: None,
            decode_errors: 0,
            options,
            brk: HashMap::new(),
            fd,
            oom,
            exhaustion: Vec::new(),
            recorder: None,
        }
    }

    /// Keeps the pages each stack makes resident in their own tables, apart from the heap's
    /// (reported as `growth`), so exact heap tracing and growth can run side by side.
    pub fn keep_growth_apart(&mut self) {
        self.pages = Some(HeapTables::new(self.heap.epoch_ns()));
    }

    /// Caps the outstanding blocks the heap tables keep, and the pages the growth tables
    /// keep (when kept apart); what comes past a cap is counted as lost
    /// (`heap_table_full`, `growth_table_full`).
    pub fn cap_tables(&mut self, heap_blocks: usize, growth_pages: usize) {
        self.heap.set_max_blocks(heap_blocks);
        if let Some(pages) = &mut self.pages {
            pages.set_max_blocks(growth_pages);
        }
    }

    /// Entries in the tables that grow with what traced processes do: outstanding heap
    /// blocks, growth pages, stacks.
    pub fn table_sizes(&self) -> TableSizes {
        TableSizes {
            heap_blocks: self.heap.blocks(),
            growth_pages: self.pages.as_ref().map_or(0, HeapTables::blocks),
            stacks: self.stacks.len(),
            processes: self.tracked.len(),
        }
    }

    /// Forgets what a process held when it exits, instead of keeping it as *in use at exit*
    /// (the node agent: an exited process holds nothing).
    pub fn forget_exited(&mut self) {
        self.keep_exited = false;
    }

    /// The tables pages are counted in.
    fn pages_mut(&mut self) -> &mut HeapTables {
        self.pages.as_mut().unwrap_or(&mut self.heap)
    }

    fn log(&mut self, entry: impl FnOnce() -> Entry) {
        if let Some(r) = &mut self.recorder {
            r.write(&entry());
        }
    }

    /// Where a traced process's code is, as last read.
    pub fn space(&self, pid: u32) -> Option<&AddressSpace> {
        self.spaces.get(&pid)
    }

    /// The processes whose maps were read since the last call: their code is published to
    /// the stack walker again.
    pub fn take_respaced(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.respaced)
    }

    /// The monotonic clock, as the host tells it.
    pub fn now_ns(&self) -> u64 {
        self.host.now_ns()
    }

    /// Reads where the process's code is.
    pub fn read_space(&mut self, pid: u32) -> std::io::Result<()> {
        let space = AddressSpace::read(self.host.as_ref(), pid, &mut self.modules)?;
        tracing::trace!("pid {pid}: maps read: {} ranges", space.ranges().len());
        self.spaces.insert(pid, space);
        self.spaces_read.insert(pid, self.host.now_ns());
        self.respaced.push(pid);
        Ok(())
    }

    /// Starts tracking a process: its name, limits and cgroup while it certainly exists,
    /// and its maps. `spawned`: a command we started, not yet exec'd.
    pub fn start(&mut self, pid: u32, spawned: bool) {
        self.log(|| Entry::Start { pid, spawned });
        self.tracked.insert(pid);
        if spawned {
            self.before_exec = Some(pid);
            return;
        }
        self.note(pid);
        if let Err(e) = self.read_space(pid) {
            tracing::debug!("pid {pid}: cannot read maps: {e}");
        }
    }

    /// Starts tracking a process found running (the node agent): its name, limits and
    /// cgroup now, its maps only when a record needs them (see [`Self::ensure_space`]), so
    /// adopting every process on a node stays cheap.
    pub fn adopt(&mut self, pid: u32) {
        self.log(|| Entry::Adopt { pid });
        self.tracked.insert(pid);
        self.note(pid);
    }

    /// Reads the process's maps unless they were read already.
    pub fn ensure_space(&mut self, pid: u32) -> std::io::Result<()> {
        if self.spaces.contains_key(&pid) {
            return Ok(());
        }
        self.read_space(pid)
    }

    fn note(&mut self, pid: u32) {
        let host = self.host.as_ref();
        self.owners.insert(pid, owner_of(host, pid));
        self.fd.note_process(host, pid);
        self.oom.track(host, pid);
    }

    /// The command name of a process, as first read.
    pub fn comm(&self, pid: u32) -> String {
        self.owners
            .get(&pid)
            .map(|o| o.comm.clone())
            .unwrap_or_else(|| self.host.comm(pid))
    }

    /// Decodes and applies one ring-buffer record.
    pub fn apply(&mut self, bytes: &[u8]) -> Applied {
        if let Some(r) = &mut self.recorder {
            r.write(&Entry::record(bytes));
        }
        let event = match decode(bytes) {
            Ok(event) => event,
            Err(e) => {
                if self.decode_errors == 0 {
                    tracing::warn!("undecodable record: {e}");
                }
                self.decode_errors += 1;
                return Applied {
                    hdr: None,
                    lifecycle: None,
                    alert: None,
                };
            }
        };
        let hdr = *event.header();
        let (lifecycle, alert) = self.on_event(event);
        Applied {
            hdr: Some(hdr),
            lifecycle,
            alert,
        }
    }

    fn on_event(&mut self, event: Event<'_>) -> (Option<Lifecycle>, Option<Alert>) {
        let mut lifecycle = None;
        let mut alert = None;
        match event {
            Event::Alloc(mut e) => {
                // A sampled block smaller than the sampling unit stands for `sample / size`
                // blocks like it: its estimated share of outstanding bytes is `sample`.
                let sample = u64::from(self.options.sample_bytes);
                if e.addr != 0 && e.size < sample {
                    e.size = sample;
                }
                self.heap.alloc(&e);
            }
            Event::Free(e) => self.heap.free(&e),
            Event::Stack(s) => self.on_stack(&s),
            Event::Exec(e) => {
                self.exec(e.hdr.pid, e.hdr.ts_ns);
                lifecycle = Some(Lifecycle::Exec(e.hdr.pid));
            }
            Event::Loader(e) => {
                let _ = self.read_space(e.hdr.pid);
                lifecycle = Some(Lifecycle::Loader(e.hdr.pid));
            }
            Event::Fork(e) => {
                let (child, parent) = (e.hdr.pid, e.other_pid);
                self.tracked.insert(child);
                self.note(child);
                self.fd.fork(parent, child);
                self.heap.fork(parent, child);
                let _ = self.read_space(child);
                lifecycle = Some(Lifecycle::Fork(child));
            }
            // Node-wide (the agent, which keeps nothing of exited processes), every process's
            // exit comes, and records of one that lived too briefly to be adopted may have
            // left state behind: forget it all. Otherwise only a tracked one has any.
            Event::Exit(e) if self.tracked.contains(&e.hdr.pid) || !self.keep_exited => {
                self.forget(e.hdr.pid, e.hdr.ts_ns);
                lifecycle = Some(Lifecycle::Exit(e.hdr.pid));
            }
            Event::Exit(_) => {}
            Event::Fd(r) if self.before_exec == Some(r.event.hdr.pid) => {}
            Event::Fd(r) => {
                let at_ms = self.heap.ms_since_epoch(r.event.hdr.ts_ns);
                if let Some(x) = self.fd.on_record(self.host.as_ref(), &r, at_ms) {
                    alert = self.on_exhausted(x, at_ms);
                }
            }
            Event::Oom(e) => alert = self.on_oom(&e),
            Event::Page(e) => {
                // What a fault added is a block allocated by the stack that first wrote there.
                self.pages_mut().alloc(&AllocEvent {
                    hdr: e.hdr,
                    addr: e.addr,
                    size: e.size,
                    old_addr: 0,
                    stack_id: e.stack_id,
                    shape: alloc_shape::SIZE,
                    _pad: 0,
                });
            }
            Event::Release(e) => {
                let pid = e.hdr.pid;
                let (start, end) = if e.op == release_op::BRK {
                    // The break moved: what lay between the new one and a higher old one is
                    // gone.
                    let old = self.brk.insert(pid, e.start).unwrap_or(e.start);
                    (e.start, old.max(e.start))
                } else {
                    (e.start, e.end)
                };
                self.pages_mut().release_range(pid, start, end);
            }
        }
        (lifecycle, alert)
    }

    /// The old image is gone; what it held is kept as in use at exit of that image.
    fn exec(&mut self, pid: u32, ts_ns: u64) {
        let keep = self.keep_exited;
        for t in std::iter::once(&mut self.heap).chain(self.pages.as_mut()) {
            if keep {
                t.exec(pid, ts_ns);
            } else {
                // The node agent keeps nothing of an image that is gone (every `sh -c`
                // forks and execs: kept, they would pile up for as long as it runs).
                t.discard(pid);
            }
        }
        self.brk.remove(&pid);
        self.fd.exec(pid);
        if self.before_exec == Some(pid) {
            self.before_exec = None;
        }
        self.note(pid);
        if let Err(e) = self.read_space(pid) {
            tracing::debug!("pid {pid}: cannot read maps: {e}");
        }
    }

    fn on_stack(&mut self, s: &StackRecord<'_>) {
        if self.stacks.contains(s.stack_id) {
            return;
        }
        let pid = s.hdr.pid;
        // The innermost frame is always real code: if it is in no known mapping, the maps
        // are stale (dlopen, JIT) or were never read.
        let covered = |space: Option<&AddressSpace>| {
            space.is_some_and(|sp| {
                s.frames()
                    .next()
                    .is_none_or(|a| sp.range(a.saturating_sub(1)).is_some())
            })
        };
        if !covered(self.spaces.get(&pid)) {
            // New code (dlopen, JIT, a library the loader mapped since exec) or a process we
            // have not read yet. Read again when the maps we have predate the walk (they may
            // miss what it saw), else at most every 10 ms.
            let now = self.host.now_ns();
            let stale = self
                .spaces_read
                .get(&pid)
                .is_none_or(|&read| read <= s.hdr.ts_ns || now.saturating_sub(read) > 10_000_000);
            if stale {
                let _ = self.read_space(pid);
            }
        }
        if !covered(self.spaces.get(&pid)) {
            tracing::debug!(
                "pid {pid}: stack {:#x} starts at {:#x}, in no known mapping",
                s.stack_id,
                s.frames().next().unwrap_or_default(),
            );
        }
        let mut flags = s.flags;
        let frames = match self.spaces.get(&pid) {
            Some(space) => normalize(space, &mut flags, s.frames()),
            None => normalize(&AddressSpace::default(), &mut flags, s.frames()),
        };
        self.stacks.insert(s.stack_id, Stack { pid, flags, frames });
    }

    /// Forgets a process (it exited, or cannot be traced): keeps what it held at exit.
    pub fn retire(&mut self, pid: u32, ts_ns: u64) {
        self.log(|| Entry::Retire { pid, ts_ns });
        self.forget(pid, ts_ns);
    }

    fn forget(&mut self, pid: u32, ts_ns: u64) {
        self.tracked.remove(&pid);
        let keep = self.keep_exited;
        for t in std::iter::once(&mut self.heap).chain(self.pages.as_mut()) {
            if keep {
                t.exit(pid, ts_ns);
            } else {
                t.discard(pid);
            }
        }
        self.brk.remove(&pid);
        self.fd.exit(pid, self.heap.ms_since_epoch(ts_ns), keep);
        if !keep && !self.fd.tmp.files().any(|f| f.pid == pid) {
            self.owners.remove(&pid);
        }
        self.oom.forget(pid);
        self.spaces.remove(&pid);
        self.spaces_read.remove(&pid);
        let mut kept: hashbrown::HashSet<u64> = self.heap.exited_stacks(pid).collect();
        if let Some(pages) = &self.pages {
            kept.extend(pages.exited_stacks(pid));
        }
        // Stacks that still hold descriptors or temp files, or are named in a record, stay.
        kept.extend(self.fd.fds.exited_stacks(pid));
        kept.extend(
            self.fd
                .tmp
                .files()
                .filter(|f| f.pid == pid)
                .map(|f| f.stack_id),
        );
        self.stacks.forget_pid(pid, |id| kept.contains(&id));
    }

    /// Drops what the heap tables hold for `pid` (its exact tracing stopped).
    pub fn discard_heap(&mut self, pid: u32) {
        self.log(|| Entry::Discard { pid });
        self.heap.discard(pid);
    }

    /// Who a process is, as first read.
    pub fn owner(&self, pid: u32) -> Option<&Owner> {
        self.owners.get(&pid)
    }

    /// Outstanding (count, bytes) of one live process: pages in its growth tables when they
    /// are kept apart, else its heap.
    pub fn growth_of(&self, pid: u32) -> (u64, u64) {
        self.pages
            .as_ref()
            .unwrap_or(&self.heap)
            .outstanding_of(pid)
    }

    /// The liveness tick: notes every tracked process's outstanding heap bytes, for OOM
    /// records.
    pub fn tick(&mut self, pids: &[u32]) {
        self.log(|| Entry::Tick {
            pids: pids.to_vec(),
        });
        let at_ms = self.heap.ms_since_epoch(self.host.now_ns());
        for &pid in pids {
            self.oom.sample(pid, at_ms, self.heap.outstanding_of(pid).1);
        }
    }

    /// Whether `pid` is tracked (started or forked, not yet gone).
    pub fn is_tracked(&self, pid: u32) -> bool {
        self.tracked.contains(&pid)
    }

    /// The processes tracked, in no order.
    pub fn tracked(&self) -> impl Iterator<Item = u32> + '_ {
        self.tracked.iter().copied()
    }

    /// Outstanding (count, bytes) of the live processes' heaps (their pages in growth mode).
    pub fn outstanding(&self) -> (u64, u64) {
        self.heap.live_outstanding()
    }

    /// Allocations seen so far.
    pub fn allocs(&self) -> u64 {
        self.heap.totals().allocs
    }
}
