//! The kernel source: loading leaktrace's eBPF object, attaching its programs, and the maps
//! user space reads or writes. It is the only code in the crate that talks to the kernel's
//! BPF interface (through aya); what it attaches is read from `leaktrace-common`'s
//! catalogues, and every name it looks up is a constant from there.
//!
//! - `probes`: the allocator and loader uprobes of each process, and their release;
//! - `multi`: uprobe_multi links, made with our own `bpf()` call (aya 0.14 has none);
//! - `code`: the stack walker's view of each process (mappings, unwind tables);
//! - here: loading, the tracepoints, the traced-process map and the kernel's counters.
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{ProgramError, TracePoint, UProbe},
};
use leaktrace_common::{
    Config, ProcessCode, TRACEPOINTS, WalkStats, alloc_shape, drop_reason, features, hook_family,
    names::{map, program},
};

use crate::unwind::{Unwind, Unwinder};

mod code;
mod multi;
mod probes;

pub use code::map_memory_bytes;
pub use multi::{LinkSummary, census as link_census};
pub use probes::{AllocatorProbes, AttachMode, Detacher, ProcessProbes, release_probes_after_exit};

/// The eBPF object built from `leaktrace-ebpf` (empty when built without the toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace"));

/// Why the kernel side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "this leaktrace binary was built without its eBPF programs (nightly with rust-src and \
         bpf-linker were missing); run `cargo xtask setup` and rebuild"
    )]
    /// The binary was built with an empty stub instead of the eBPF object.
    NoObject,
    #[error("cannot load the eBPF programs: {0}")]
    /// The kernel refused the eBPF object (verifier, BTF, maps).
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    /// A program could not be loaded or attached.
    Program {
        /// The program's name in the eBPF object.
        name: &'static str,
        /// What aya reported.
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    /// A map could not be opened or written.
    Map {
        /// The map's name in the eBPF object.
        name: &'static str,
        /// What aya reported.
        source: aya::maps::MapError,
    },
    #[error("eBPF program {name}: cannot create its uprobe_multi link: {source}")]
    /// `BPF_LINK_CREATE` of a uprobe_multi link failed.
    Link {
        /// The program's name in the eBPF object.
        name: &'static str,
        /// What the kernel answered.
        source: std::io::Error,
    },
    #[error("eBPF object lacks {0}")]
    /// The object has no program or map of this name (`"pid"`: probes were asked for pid 0).
    Missing(&'static str),
    #[error("cannot map the unwind table: {0}")]
    /// `mmap` of the `UNWIND_ROWS` or `UNWIND_INDEX` array failed.
    Mmap(std::io::Error),
}

/// Options for loading.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_buffer_bytes: u32,
    /// Attach the hooks that follow forked children.
    pub follow_forks: bool,
    /// How stacks are walked (written to the kernel side's `CONFIG`).
    pub unwind: Unwind,
    /// Capacity of the kernel-side unwind table, in rows (8 bytes each), for all modules.
    pub unwind_rows: u32,
    /// Time every stack walk (`Source::walk_stats`), for benchmarks.
    pub measure_walks: bool,
    /// Bits of [`leaktrace_common::features`]: descriptors, temp files.
    pub features: u32,
    /// Sample allocations (0: every one), see [`leaktrace_common::Config::sample_bytes`].
    pub sample_bytes: u32,
    /// Forward the eBPF side's diagnostics (aya-log, debug level) to the log; off, they
    /// cost one load and branch each.
    pub bpf_log: bool,
    /// How uprobes are attached ([`AttachMode::Auto`]: uprobe_multi links where the kernel
    /// has them).
    pub attach: AttachMode,
}

/// The loaded kernel side.
pub struct Source {
    ebpf: Ebpf,
    traced: BpfHashMap<MapData, u32, u32>,
    drops: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    proc_code: BpfHashMap<MapData, u32, ProcessCode>,
    walk_stats: PerCpuArray<MapData, WalkStats>,
    tables: code::UnwindTables,
    /// Reads the eBPF side's diagnostics, when asked for.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Stamped on every PROC_CODE value written.
    generation: u32,
    /// Uprobes are attached with uprobe_multi links (else perf-event uprobes).
    multi: bool,
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

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> SourceError {
    move |source| SourceError::Map { name, source }
}

/// The ring buffers records arrive in.
pub struct Rings {
    /// Every record but the allocator probes'.
    pub events: RingBuf<MapData>,
    /// The allocator probes' records and their stacks (apart, so that a node's flood of
    /// tracepoint records cannot crowd exact heap tracing out). A process's records here
    /// precede its fork, exec and exit records in `events`: a driver drains this one before
    /// it applies one of those.
    pub heap: RingBuf<MapData>,
}

impl Source {
    /// Loads every program and attaches the tracepoints `opts` asks for. Returns the source
    /// and the ring buffers to drain.
    pub fn load(
        opts: &LoadOptions,
        unwinder: Box<dyn Unwinder>,
    ) -> Result<(Self, Rings), SourceError> {
        if OBJECT.is_empty() {
            return Err(SourceError::NoObject);
        }
        let config = Config {
            unwind: opts.unwind.mode(),
            measure: u32::from(opts.measure_walks),
            features: opts.features,
            sample_bytes: opts.sample_bytes,
            self_tgid: std::process::id(),
            _pad: 0,
        };
        // aya-log-ebpf checks this level before it reserves a record.
        let log_level: u8 = if opts.bpf_log {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map::EVENTS, opts.ring_buffer_bytes)
            .map_max_entries(map::HEAP_EVENTS, opts.ring_buffer_bytes)
            .map_max_entries(map::UNWIND_ROWS, opts.unwind_rows)
            .map_max_entries(map::UNWIND_INDEX, code::index_capacity(opts.unwind_rows))
            .override_global(map::CONFIG, &config, true)
            .override_global(aya_log::LEVEL, &log_level, false)
            .load(OBJECT)?;
        let multi = match opts.attach {
            AttachMode::Multi => true,
            AttachMode::Perf => false,
            AttachMode::Auto => {
                let supported = multi::supported();
                if !supported {
                    tracing::warn!(
                        "this kernel has no usable uprobe_multi links: attaching a perf-event \
                         uprobe per allocator function (slower to release)"
                    );
                }
                supported
            }
        };
        load_programs(&mut ebpf, opts, multi)?;
        let logger = opts.bpf_log.then(|| start_logger(&mut ebpf)).flatten();
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(SourceError::Missing(name));
        let events = RingBuf::try_from(take(map::EVENTS)?).map_err(map_error(map::EVENTS))?;
        let heap =
            RingBuf::try_from(take(map::HEAP_EVENTS)?).map_err(map_error(map::HEAP_EVENTS))?;
        let traced = BpfHashMap::try_from(take(map::TRACED)?).map_err(map_error(map::TRACED))?;
        let drops = PerCpuArray::try_from(take(map::DROPS)?).map_err(map_error(map::DROPS))?;
        let counters =
            PerCpuArray::try_from(take(map::COUNTERS)?).map_err(map_error(map::COUNTERS))?;
        let proc_code =
            BpfHashMap::try_from(take(map::PROC_CODE)?).map_err(map_error(map::PROC_CODE))?;
        let walk_stats =
            PerCpuArray::try_from(take(map::WALK_STATS)?).map_err(map_error(map::WALK_STATS))?;
        let tables = code::UnwindTables::new(&mut ebpf, opts.unwind_rows, unwinder)?;
        let source = Self {
            ebpf,
            traced,
            drops,
            counters,
            proc_code,
            walk_stats,
            tables,
            logger,
            generation: 0,
            multi,
        };
        Ok((source, Rings { events, heap }))
    }

    /// Writes the eBPF side's pending diagnostics to the log (the session does so on its
    /// drain tick, every 10 ms).
    pub fn flush_log(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// How uprobes are attached: [`AttachMode::Multi`] or [`AttachMode::Perf`].
    pub fn attach_mode(&self) -> AttachMode {
        if self.multi {
            AttachMode::Multi
        } else {
            AttachMode::Perf
        }
    }

    /// Marks a process as traced, with [`leaktrace_common::traced_flags`].
    pub fn trace(&mut self, pid: u32, flags: u32) -> Result<(), SourceError> {
        self.traced
            .insert(pid, flags, 0)
            .map_err(|source| SourceError::Map {
                name: map::TRACED,
                source,
            })
    }

    /// Stops following a process's lifecycle.
    pub fn untrace(&mut self, pid: u32) {
        let _ = self.traced.remove(&pid);
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

/// The kernel's clock of record timestamps (`bpf_ktime_get_ns`, `CLOCK_MONOTONIC`), now.
pub fn ktime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Loads the uprobe programs of the attach mode (attached per process later: a program is
/// loaded either for uprobe_multi links or for perf-event uprobes) and loads and attaches
/// the tracepoints `opts` asks for.
fn load_programs(ebpf: &mut Ebpf, opts: &LoadOptions, multi: bool) -> Result<(), SourceError> {
    let shared = [
        program::ALLOC_RETURN,
        program::LOADER_STATE,
        program::EMPTY,
        program::EMPTY_RETURN,
    ];
    let entries: &[&'static str] = if multi {
        &[program::ALLOC_ENTER_MULTI]
    } else {
        &alloc_shape::ALL.map(alloc_shape::entry_program)
    };
    for &name in entries.iter().chain(&shared) {
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .ok_or(SourceError::Missing(name))?
            .try_into()
            .map_err(program_error(name))?;
        if multi {
            prog.load_multi().map_err(program_error(name))?;
        } else {
            prog.load().map_err(program_error(name))?;
        }
        if let Ok(info) = prog.info() {
            tracing::debug!(
                "{name}: {} instructions verified, {} translated",
                info.verified_instruction_count().unwrap_or(0),
                info.size_translated().unwrap_or(0) / 8
            );
        }
    }
    if wanted(hook_family::FD, opts) {
        load_fd_stack(ebpf)?;
    }
    for tp in TRACEPOINTS.iter().filter(|tp| wanted(tp.family, opts)) {
        let name = tp.program;
        let prog: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(SourceError::Missing(name))?
            .try_into()
            .map_err(program_error(name))?;
        prog.load().map_err(program_error(name))?;
        prog.attach(tp.category, tp.event)
            .map_err(program_error(name))?;
    }
    Ok(())
}

/// Loads the descriptor programs' shared second half and puts it in their tail-call slot,
/// before any of them is attached.
fn load_fd_stack(ebpf: &mut Ebpf) -> Result<(), SourceError> {
    let name = program::FD_STACK;
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(SourceError::Missing(name))?
        .try_into()
        .map_err(program_error(name))?;
    prog.load().map_err(program_error(name))?;
    let fd = prog
        .fd()
        .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
        .map_err(program_error(name))?;
    let mut slots = ProgramArray::try_from(
        ebpf.map_mut(map::FD_TAIL)
            .ok_or(SourceError::Missing(map::FD_TAIL))?,
    )
    .map_err(map_error(map::FD_TAIL))?;
    slots.set(0, &fd, 0).map_err(map_error(map::FD_TAIL))
}

/// Starts reading the eBPF side's diagnostics; without them, tracing goes on.
fn start_logger(ebpf: &mut Ebpf) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
    aya_log::EbpfLogger::init(ebpf)
        .inspect_err(|e| tracing::warn!("eBPF diagnostics unavailable: {e}"))
        .ok()
}

/// Whether the tracepoints of a [`hook_family`] are attached under `opts`.
fn wanted(family: u32, opts: &LoadOptions) -> bool {
    match family {
        hook_family::LIFECYCLE => true,
        hook_family::FORKS => opts.follow_forks,
        // Temp files need the descriptor hooks too: opens with O_CREAT, closes of unnamed
        // temp files.
        hook_family::FD => opts.features & (features::FD | features::TMP) != 0,
        hook_family::TMP => opts.features & features::TMP != 0,
        hook_family::GROWTH => opts.features & features::GROWTH != 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSymbol as _};

    use super::*;

    #[test]
    fn the_object_defines_every_name_the_catalogues_use() {
        if OBJECT.is_empty() {
            eprintln!("skipped: built without the eBPF toolchain (cargo xtask setup)");
            return;
        }
        let elf = object::File::parse(OBJECT).unwrap();
        let symbols: hashbrown::HashSet<&str> =
            elf.symbols().filter_map(|s| s.name().ok()).collect();
        let entries = alloc_shape::ALL.map(alloc_shape::entry_program);
        let names = TRACEPOINTS
            .iter()
            .map(|t| t.program)
            .chain(entries)
            .chain(program::UPROBES.iter().copied())
            .chain([program::FD_STACK])
            .chain(map::ALL.iter().copied());
        for name in names {
            assert!(symbols.contains(name), "the eBPF object has no {name}");
        }
    }
}
