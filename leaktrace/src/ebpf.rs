//! The privileged side: loading leaktrace's eBPF object, attaching its programs, and the maps
//! user space reads or writes. Nothing else in the crate talks to the kernel's BPF interface.
use std::{
    num::NonZeroU32,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        ProgramError, TracePoint, UProbe,
        uprobe::{UProbeLink, UProbeScope},
    },
};
use hashbrown::HashMap;
use leaktrace_common::{
    CodeMapping, Config, MAX_CODE_MAPPINGS, ProcessCode, UnwindRow, WalkStats, alloc_fn,
    drop_reason, features,
};

use crate::{
    modules::{AddressSpace, Module, ModuleKey},
    unwind::{self, UnwindTable},
};

/// The eBPF object built from `leaktrace-ebpf` (empty when built without the toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace"));

/// Why the kernel side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "this leaktrace binary was built without its eBPF programs (nightly with rust-src and \
         bpf-linker were missing); run `cargo xtask setup` and rebuild"
    )]
    NoObject,
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF object lacks {0}")]
    Missing(&'static str),
    #[error("cannot map the unwind table: {0}")]
    Mmap(std::io::Error),
}

/// The entry program for each allocator function.
fn entry_program(func: u32) -> &'static str {
    match func {
        alloc_fn::MALLOC => "malloc_enter",
        alloc_fn::CALLOC => "calloc_enter",
        alloc_fn::REALLOC => "realloc_enter",
        alloc_fn::REALLOCARRAY => "reallocarray_enter",
        alloc_fn::POSIX_MEMALIGN => "posix_memalign_enter",
        alloc_fn::ALIGNED_ALLOC => "aligned_alloc_enter",
        alloc_fn::MEMALIGN => "memalign_enter",
        alloc_fn::VALLOC => "valloc_enter",
        alloc_fn::PVALLOC => "pvalloc_enter",
        _ => "free_enter",
    }
}

const UPROBES: &[&str] = &[
    "malloc_enter",
    "calloc_enter",
    "realloc_enter",
    "reallocarray_enter",
    "posix_memalign_enter",
    "aligned_alloc_enter",
    "memalign_enter",
    "valloc_enter",
    "pvalloc_enter",
    "free_enter",
    "alloc_return",
    "loader_state",
    "empty",
    "empty_return",
];

/// What is attached to an allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AllocatorProbes {
    /// Every entry point, with its return: exact tracing.
    #[default]
    Full,
    /// Empty programs on `malloc` and `free` only, where placement puts them: the cost of
    /// the traps alone, the floor benchmarks compare with.
    Floor,
    /// The floor plus an empty return probe on `malloc`.
    FloorReturn,
}

const LIFECYCLE: &[(&str, &str, &str)] = &[
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    // OOM kills anywhere on the node, traced or not.
    ("mark_victim", "oom", "mark_victim"),
];

/// Descriptor creation and release (also needed for temp files: opens with O_CREAT, and
/// closes of unnamed temp files).
const DESCRIPTORS: &[&str] = &[
    "sys_exit_open",
    "sys_exit_openat",
    "sys_exit_openat2",
    "sys_exit_creat",
    "sys_exit_socket",
    "sys_exit_socketpair",
    "sys_exit_accept",
    "sys_exit_accept4",
    "sys_exit_pipe",
    "sys_exit_pipe2",
    "sys_exit_dup",
    "sys_exit_dup2",
    "sys_exit_dup3",
    "sys_exit_fcntl",
    "sys_exit_eventfd",
    "sys_exit_eventfd2",
    "sys_exit_epoll_create",
    "sys_exit_epoll_create1",
    "sys_exit_timerfd_create",
    "sys_exit_signalfd",
    "sys_exit_signalfd4",
    "sys_exit_memfd_create",
    "sys_exit_inotify_init",
    "sys_exit_inotify_init1",
    "sys_enter_close",
    "sys_exit_close_range",
    "sys_exit_setrlimit",
    "sys_exit_prlimit64",
];

/// Paths going away, for temp files.
const UNLINKS: &[&str] = &[
    "sys_exit_unlink",
    "sys_exit_unlinkat",
    "sys_exit_rename",
    "sys_exit_renameat",
    "sys_exit_renameat2",
];

/// Growth mode: pages written to, memory given back.
const GROWTH: &[(&str, &str, &str)] = &[
    ("page_fault_user", "exceptions", "page_fault_user"),
    ("page_fault_kernel", "exceptions", "page_fault_kernel"),
    ("rss_stat", "kmem", "rss_stat"),
    ("sys_enter_munmap", "syscalls", "sys_enter_munmap"),
    ("sys_enter_madvise", "syscalls", "sys_enter_madvise"),
    ("sys_exit_brk", "syscalls", "sys_exit_brk"),
];

const FORK_FOLLOWING: &[(&str, &str, &str)] = &[
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sys_exit_clone", "syscalls", "sys_exit_clone"),
    ("sys_exit_clone3", "syscalls", "sys_exit_clone3"),
    ("sys_exit_fork", "syscalls", "sys_exit_fork"),
    ("sys_exit_vfork", "syscalls", "sys_exit_vfork"),
];

/// The uprobes attached for one process. Dropping it detaches them.
#[derive(Debug, Default)]
pub struct ProcessProbes {
    links: Vec<UProbeLink>,
    /// Modules whose allocator is hooked.
    pub allocator_modules: Vec<Arc<Module>>,
    /// Modules whose loader hook is attached.
    pub loader_modules: Vec<Arc<Module>>,
}

impl ProcessProbes {
    /// How many probes are attached.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

/// Detaches probes off the event loop.
///
/// Releasing a uprobe's BPF link waits for an RCU grace period under a kernel-wide mutex:
/// ~90 ms per probe on this kind of VM, one after the other. A process with 18 probes would
/// stall the loop for 1.6 s when it exits, so a thread does it.
#[derive(Debug)]
pub struct Detacher {
    tx: Option<std::sync::mpsc::Sender<ProcessProbes>>,
}

impl Default for Detacher {
    fn default() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<ProcessProbes>();
        let spawned = std::thread::Builder::new()
            .name("detach".into())
            .spawn(move || {
                for probes in rx {
                    drop(probes);
                }
            });
        // Without the thread, probes are simply detached inline (slowly).
        Self {
            tx: spawned.ok().map(|_| tx),
        }
    }
}

impl Detacher {
    pub fn detach(&self, probes: ProcessProbes) {
        if let Some(tx) = &self.tx
            && let Err(std::sync::mpsc::SendError(probes)) = tx.send(probes)
        {
            drop(probes);
        }
    }
}

/// Makes the end of this process fast: a child inherits every descriptor and holds the last
/// references to the probes until this process has exited, then releases them at its own
/// pace. The child closes the standard streams first, so a pipe reading our output sees its
/// end at once.
pub fn release_probes_after_exit() {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    // SAFETY: the child only calls async-signal-safe functions.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: close/read/_exit on our own descriptors.
        unsafe {
            for fd in 0..3 {
                libc::close(fd);
            }
            libc::close(fds[1]);
            let mut byte = 0u8;
            // Returns 0 once the parent has exited and its write end is gone.
            while libc::read(fds[0], (&raw mut byte).cast(), 1) > 0 {}
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the read end; the write end stays open until we exit.
    unsafe { libc::close(fds[0]) };
}

/// How stacks are walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Unwind {
    /// Frame pointers only.
    Fp,
    /// Unwind tables only: a frame without one ends the stack.
    Dwarf,
    /// Unwind tables where a module has them, frame pointers elsewhere.
    #[default]
    Auto,
}

/// Options for loading.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_buffer_bytes: u32,
    /// Attach the hooks that follow forked children.
    pub follow_forks: bool,
    pub unwind: Unwind,
    /// Capacity of the kernel-side unwind table, in rows (8 bytes each), for all modules.
    pub unwind_rows: u32,
    /// Time every stack walk (`Source::walk_stats`), for benchmarks.
    pub measure_walks: bool,
    /// Bits of [`leaktrace_common::features`]: descriptors, temp files.
    pub features: u32,
    /// Sample allocations (0: every one), see [`leaktrace_common::Config::sample_bytes`].
    pub sample_bytes: u32,
}

/// A BPF array created with `BPF_F_MMAPABLE`, mapped into our memory and filled from the
/// front: the cheapest way to hand the kernel side large tables.
struct SharedArray<T: Copy> {
    ptr: *mut T,
    capacity: usize,
    used: usize,
    _map: MapData,
}

impl<T: Copy> SharedArray<T> {
    fn new(map: MapData, capacity: u32) -> Result<Self, SourceError> {
        let bytes = capacity as usize * size_of::<T>();
        // SAFETY: maps the array's own memory, shared with the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SourceError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: ptr.cast(),
            capacity: capacity as usize,
            used: 0,
            _map: map,
        })
    }

    /// Appends `items`, returning where they start; `None` when they do not fit.
    fn append(&mut self, items: &[T]) -> Option<u32> {
        if self.used + items.len() > self.capacity {
            return None;
        }
        // SAFETY: `used + len <= capacity` elements lie inside the mapping; T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(items.as_ptr(), self.ptr.add(self.used), items.len())
        };
        let start = self.used as u32;
        self.used += items.len();
        Some(start)
    }
}

impl<T: Copy> Drop for SharedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing else points into it.
        unsafe { libc::munmap(self.ptr.cast(), self.capacity * size_of::<T>()) };
    }
}

/// Kernel memory held by this process's BPF maps: the sum of `memlock` over its map fds.
pub fn map_memory_bytes() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Entries of the page index for a row capacity: a page of code has ~30 rows, so half the
/// row count leaves ample room.
fn index_capacity(rows: u32) -> u32 {
    (rows / 2).max(1 << 16)
}

/// Where a module's table sits in the kernel's arrays.
#[derive(Clone, Copy, Debug)]
struct Placement {
    table_start: u32,
    table_len: u32,
    index_start: u32,
    index_len: u32,
}

/// Every module's unwind rows (`UNWIND_ROWS`) and page index (`UNWIND_INDEX`). Each
/// module's table is compiled and copied once, whichever processes map it.
struct UnwindTables {
    rows: SharedArray<UnwindRow>,
    /// u64 entries: elements of a mmap'ed BPF array are 8-byte aligned.
    index: SharedArray<u64>,
    /// Where each module's table is (`None`: it has no usable table).
    placed: HashMap<ModuleKey, Option<Placement>>,
}

impl UnwindTables {
    /// The table of `module`, compiled and copied in on first use.
    fn place(&mut self, module: &Module) -> Option<Placement> {
        if let Some(placed) = self.placed.get(&module.key) {
            return *placed;
        }
        let placed = match unwind::compile_path(&module.open_path()) {
            Ok(table) => self.copy_in(module, &table),
            Err(e) => {
                tracing::debug!("{}: no unwind table: {e}", module.path);
                None
            }
        };
        self.placed.insert(module.key, placed);
        placed
    }

    fn copy_in(&mut self, module: &Module, table: &UnwindTable) -> Option<Placement> {
        let mut index: Vec<u64> = table.page_index().into_iter().map(u64::from).collect();
        if self.index.used + index.len() > self.index.capacity {
            // Lookups in this module search all its rows instead of one page's.
            index.clear();
        }
        if self.rows.used + table.rows.len() > self.rows.capacity {
            tracing::warn!(
                "{}: the unwind table is full ({} rows); its frames use frame pointers (raise --unwind-rows)",
                module.path,
                self.rows.capacity
            );
            return None;
        }
        let placement = Placement {
            table_start: self.rows.append(&table.rows)?,
            table_len: table.rows.len() as u32,
            index_start: self.index.append(&index).unwrap_or(0),
            index_len: index.len() as u32,
        };
        tracing::debug!(
            "{}: {} unwind rows from {} FDEs",
            module.path,
            table.rows.len(),
            table.fdes
        );
        Some(placement)
    }
}

/// The loaded kernel side.
pub struct Source {
    ebpf: Ebpf,
    traced: BpfHashMap<MapData, u32, u32>,
    drops: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    proc_code: BpfHashMap<MapData, u32, ProcessCode>,
    walk_stats: PerCpuArray<MapData, WalkStats>,
    tables: UnwindTables,
    /// Stamped on every PROC_CODE value written.
    generation: u32,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").finish_non_exhaustive()
    }
}

/// Element `index` of a per-CPU counter array, summed over CPUs (0 if unreadable).
fn per_cpu_sum(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn program_error(name: &'static str) -> impl FnOnce(ProgramError) -> SourceError {
    move |source| SourceError::Program { name, source }
}

impl Source {
    /// Loads every program and attaches the lifecycle tracepoints. Returns the source and
    /// the ring buffer to drain.
    pub fn load(opts: &LoadOptions) -> Result<(Self, RingBuf<MapData>), SourceError> {
        if OBJECT.is_empty() {
            return Err(SourceError::NoObject);
        }
        let config = Config {
            unwind: match opts.unwind {
                Unwind::Fp => leaktrace_common::unwind_mode::FP,
                Unwind::Auto => leaktrace_common::unwind_mode::AUTO,
                Unwind::Dwarf => leaktrace_common::unwind_mode::DWARF,
            },
            measure: u32::from(opts.measure_walks),
            features: opts.features,
            sample_bytes: opts.sample_bytes,
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", opts.ring_buffer_bytes)
            .map_max_entries("UNWIND_ROWS", opts.unwind_rows)
            .map_max_entries("UNWIND_INDEX", index_capacity(opts.unwind_rows))
            .override_global("CONFIG", &config, true)
            .load(OBJECT)?;
        for &name in UPROBES {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or(SourceError::Missing(name))?
                .try_into()
                .map_err(program_error(name))?;
            prog.load().map_err(program_error(name))?;
        }
        let fds = opts.features & (features::FD | features::TMP) != 0;
        let tmp = opts.features & features::TMP != 0;
        let syscalls = DESCRIPTORS
            .iter()
            .filter(|_| fds)
            .chain(UNLINKS.iter().filter(|_| tmp))
            .map(|&name| (name, "syscalls", name));
        let tracepoints = LIFECYCLE
            .iter()
            .copied()
            .chain(
                if opts.follow_forks {
                    FORK_FOLLOWING
                } else {
                    &[]
                }
                .iter()
                .copied(),
            )
            .chain(syscalls)
            .chain(
                GROWTH
                    .iter()
                    .copied()
                    .filter(|_| opts.features & features::GROWTH != 0),
            );
        for (name, category, event) in tracepoints {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(SourceError::Missing(name))?
                .try_into()
                .map_err(program_error(name))?;
            prog.load().map_err(program_error(name))?;
            prog.attach(category, event).map_err(program_error(name))?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(SourceError::Missing(name))
        };
        let map_error = |name: &'static str| move |source| SourceError::Map { name, source };
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(map_error("EVENTS"))?;
        let traced =
            BpfHashMap::try_from(take(&mut ebpf, "TRACED")?).map_err(map_error("TRACED"))?;
        let drops = PerCpuArray::try_from(take(&mut ebpf, "DROPS")?).map_err(map_error("DROPS"))?;
        let counters =
            PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?).map_err(map_error("COUNTERS"))?;
        let proc_code =
            BpfHashMap::try_from(take(&mut ebpf, "PROC_CODE")?).map_err(map_error("PROC_CODE"))?;
        let walk_stats = PerCpuArray::try_from(take(&mut ebpf, "WALK_STATS")?)
            .map_err(map_error("WALK_STATS"))?;
        let mut array = |name: &'static str| match take(&mut ebpf, name)? {
            Map::Array(data) => Ok(data),
            _ => Err(SourceError::Missing(name)),
        };
        let tables = UnwindTables {
            rows: SharedArray::new(array("UNWIND_ROWS")?, opts.unwind_rows)?,
            index: SharedArray::new(array("UNWIND_INDEX")?, index_capacity(opts.unwind_rows))?,
            placed: HashMap::new(),
        };
        let source = Self {
            ebpf,
            traced,
            drops,
            counters,
            proc_code,
            walk_stats,
            tables,
            generation: 0,
        };
        Ok((source, events))
    }

    /// Marks a process as traced, with [`leaktrace_common::traced_flags`].
    pub fn trace(&mut self, pid: u32, flags: u32) -> Result<(), SourceError> {
        self.traced
            .insert(pid, flags, 0)
            .map_err(|source| SourceError::Map {
                name: "TRACED",
                source,
            })
    }

    /// Stops following a process's lifecycle.
    pub fn untrace(&mut self, pid: u32) {
        let _ = self.traced.remove(&pid);
    }

    fn uprobe(&mut self, name: &'static str) -> Result<&mut UProbe, SourceError> {
        self.ebpf
            .program_mut(name)
            .ok_or(SourceError::Missing(name))?
            .try_into()
            .map_err(program_error(name))
    }

    fn attach_one(
        &mut self,
        probes: &mut ProcessProbes,
        name: &'static str,
        module: &Module,
        offset: u64,
        pid: NonZeroU32,
    ) -> Result<(), SourceError> {
        let prog = self.uprobe(name)?;
        let id = prog
            .attach(offset, module.open_path(), UProbeScope::OneProcess(pid))
            .map_err(program_error(name))?;
        probes
            .links
            .push(prog.take_link(id).map_err(program_error(name))?);
        Ok(())
    }

    /// Hooks the allocator of `module` for `pid` only: an entry probe per function, a return
    /// probe on each allocating one.
    pub fn attach_allocator(
        &mut self,
        probes: &mut ProcessProbes,
        pid: u32,
        module: &Arc<Module>,
        what: AllocatorProbes,
    ) -> Result<(), SourceError> {
        if probes.allocator_modules.iter().any(|m| m.key == module.key) {
            return Ok(());
        }
        let pid = NonZeroU32::new(pid).ok_or(SourceError::Missing("pid"))?;
        if what != AllocatorProbes::Full {
            for entry in &module.elf.allocator {
                let at = entry.probe_offset();
                match entry.func {
                    alloc_fn::MALLOC | alloc_fn::FREE => {
                        self.attach_one(probes, "empty", module, at, pid)?
                    }
                    _ => continue,
                }
                if entry.func == alloc_fn::MALLOC && what == AllocatorProbes::FloorReturn {
                    self.attach_one(probes, "empty_return", module, at, pid)?;
                }
            }
            probes.allocator_modules.push(module.clone());
            return Ok(());
        }
        for entry in &module.elf.allocator {
            let at = entry.probe_offset();
            self.attach_one(probes, entry_program(entry.func), module, at, pid)?;
            if entry.func != alloc_fn::FREE {
                // Placement guarantees `[rsp]` is still the return address there.
                self.attach_one(probes, "alloc_return", module, at, pid)?;
            }
        }
        probes.allocator_modules.push(module.clone());
        Ok(())
    }

    /// Hooks the dynamic loader's `_dl_debug_state` in `module` for `pid`.
    pub fn attach_loader(
        &mut self,
        probes: &mut ProcessProbes,
        pid: u32,
        module: &Arc<Module>,
    ) -> Result<(), SourceError> {
        let Some(offset) = module.elf.loader_state else {
            return Ok(());
        };
        if probes.loader_modules.iter().any(|m| m.key == module.key) {
            return Ok(());
        }
        let pid = NonZeroU32::new(pid).ok_or(SourceError::Missing("pid"))?;
        self.attach_one(probes, "loader_state", module, offset, pid)?;
        probes.loader_modules.push(module.clone());
        Ok(())
    }

    /// Tells the stack walker where `space`'s code is and gives it the unwind tables of its
    /// modules (compiled and loaded on first sight). Mappings beyond the walker's capacity
    /// keep frame pointers only.
    pub fn publish_code(&mut self, space: &AddressSpace) -> Result<(), SourceError> {
        self.generation = self.generation.wrapping_add(1);
        let mut code = ProcessCode {
            len: 0,
            generation: self.generation,
            mappings: [CodeMapping::default(); MAX_CODE_MAPPINGS],
        };
        for range in space.ranges() {
            if code.len as usize == MAX_CODE_MAPPINGS {
                tracing::debug!(
                    "pid {}: more than {MAX_CODE_MAPPINGS} executable mappings",
                    space.pid
                );
                break;
            }
            let placed = range.module.as_ref().and_then(|m| self.tables.place(m));
            let p = placed.unwrap_or(Placement {
                table_start: 0,
                table_len: 0,
                index_start: 0,
                index_len: 0,
            });
            code.mappings[code.len as usize] = CodeMapping {
                start: range.start,
                end: range.end,
                offset: range.offset,
                table_start: p.table_start,
                table_len: p.table_len,
                index_start: p.index_start,
                index_len: p.index_len,
            };
            code.len += 1;
        }
        self.proc_code
            .insert(space.pid, code, 0)
            .map_err(|source| SourceError::Map {
                name: "PROC_CODE",
                source,
            })
    }

    /// Forgets a process's code (it exited).
    pub fn unpublish_code(&mut self, pid: u32) {
        let _ = self.proc_code.remove(&pid);
    }

    /// Unwind rows in use, of the capacity.
    pub fn unwind_rows_used(&self) -> (usize, usize) {
        (self.tables.rows.used, self.tables.rows.capacity)
    }

    /// Stack walks so far, summed over CPUs (counted only with `measure_walks`).
    pub fn walk_stats(&self) -> WalkStats {
        let per_cpu = self
            .walk_stats
            .get(&0, 0)
            .map(|v| v.iter().copied().collect::<Vec<_>>())
            .unwrap_or_default();
        per_cpu.iter().fold(WalkStats::default(), |a, s| WalkStats {
            walks: a.walks + s.walks,
            frames: a.frames + s.frames,
            ns: a.ns + s.ns,
        })
    }

    /// A [`leaktrace_common::counter`], summed over CPUs.
    pub fn counter(&self, which: u32) -> u64 {
        per_cpu_sum(&self.counters, which)
    }

    /// Lost events so far, by cause (summed over CPUs).
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        (0..drop_reason::COUNT)
            .map(|i| (drop_reason::NAMES[i as usize], per_cpu_sum(&self.drops, i)))
            .collect()
    }
}
