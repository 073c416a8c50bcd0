//! Uprobes: the allocator's and the loader's, attached per process and released off the
//! event loop.
//!
//! Two ways to attach, chosen once at load ([`AttachMode`]): a uprobe_multi link per program,
//! process and module (`multi`, see `multi.rs`): the entry link holds every allocator
//! function of the module, its shape the attach cookie, the return link every allocating
//! one; or one perf-event uprobe per program and function (`perf`), where uprobe_multi is
//! missing. Either way the kernel installs the breakpoints in the traced process only.
use std::{num::NonZeroU32, os::fd::AsFd as _, sync::Arc};

use aya::programs::{
    UProbe,
    uprobe::{UProbeLink, UProbeScope},
};
use leaktrace_common::{ALLOCATOR_FNS, alloc_shape, names::program};

use super::{Source, SourceError, multi::MultiLink, program_error};
use crate::targets::modules::Module;

/// How the uprobes are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// uprobe_multi links where the kernel has them with a process-wide pid filter (kernels
    /// from 2024 on; the first ones, 6.6 on, filtered by thread), perf-event uprobes
    /// elsewhere.
    #[default]
    Auto,
    /// uprobe_multi links: 3 per process with libc, each released in ~30–50 ms.
    Multi,
    /// A perf-event uprobe per program and function: ~18 per process, each ~90 ms to
    /// release.
    Perf,
}

impl AttachMode {
    /// Its name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Auto => "auto",
            AttachMode::Multi => "multi",
            AttachMode::Perf => "perf",
        }
    }
}

/// One attachment: a perf-event uprobe, or a uprobe_multi link.
#[derive(Debug)]
enum Link {
    Perf(#[allow(dead_code, reason = "held to keep the probe attached")] UProbeLink),
    Multi(#[allow(dead_code, reason = "held to keep the probes attached")] MultiLink),
}

/// What is attached to an allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AllocatorProbes {
    /// Every entry point, with its return: exact tracing.
    #[default]
    Full,
    /// Empty programs on `malloc` and `free` only, at their probe points: the cost of
    /// the traps alone, the floor benchmarks compare with.
    Floor,
    /// The floor plus an empty return probe on `malloc`.
    FloorReturn,
}

/// The uprobes attached for one process. Dropping it detaches them.
#[derive(Debug, Default)]
pub struct ProcessProbes {
    links: Vec<Link>,
    /// Modules whose allocator is hooked.
    pub allocator_modules: Vec<Arc<Module>>,
    /// Modules whose loader hook is attached.
    pub loader_modules: Vec<Arc<Module>>,
}

impl ProcessProbes {
    /// How many links are attached (a perf-event uprobe or a uprobe_multi link each).
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// True when no probe is attached.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

/// Detaches probes off the event loop.
///
/// Releasing a perf-event uprobe's BPF link waits for an RCU grace period under a
/// kernel-wide mutex: ~90 ms per probe on this kind of VM, one after the other. A process
/// with 18 probes would stall the loop for 1.6 s when it exits, so a thread does it.
///
/// Closing a uprobe_multi link waits for grace periods too, once per link rather than once
/// per probe (~30–50 ms a link here, see `multi.rs`), but without a mutex: links closed side
/// by side share their grace periods. So the thread takes every process queued so far and
/// closes all their links at once, each on a thread of its own (up to [`BATCH`] at a time).
#[derive(Debug)]
pub struct Detacher {
    tx: Option<std::sync::mpsc::Sender<ProcessProbes>>,
}

/// Links closed side by side, at most.
const BATCH: usize = 64;

impl Default for Detacher {
    fn default() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<ProcessProbes>();
        let spawned = std::thread::Builder::new()
            .name("detach".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut links = first.links;
                    while links.len() < BATCH
                        && let Ok(more) = rx.try_recv()
                    {
                        links.extend(more.links);
                    }
                    let (n, started) = (links.len(), std::time::Instant::now());
                    release_side_by_side(links);
                    tracing::debug!("released {n} links in {:?}", started.elapsed());
                }
            });
        // Without the thread, probes are simply detached inline (slowly).
        Self {
            tx: spawned.ok().map(|_| tx),
        }
    }
}

/// Closes `links` each on a thread of its own, and returns when all are closed. Perf-event
/// uprobes are closed in turn: their release is serialized in the kernel anyway.
fn release_side_by_side(links: Vec<Link>) {
    let (multi, perf): (Vec<Link>, Vec<Link>) =
        links.into_iter().partition(|l| matches!(l, Link::Multi(_)));
    std::thread::scope(|s| {
        for link in multi {
            // When the thread cannot start, the closure, link and all, is dropped right here:
            // the link is closed inline.
            let _ = std::thread::Builder::new().spawn_scoped(s, move || drop(link));
        }
        drop(perf);
    });
}

impl Detacher {
    /// Detaches `probes` on the detach thread (inline when there is none); returns at once.
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

impl Source {
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
            .push(Link::Perf(prog.take_link(id).map_err(program_error(name))?));
        Ok(())
    }

    /// Attaches program `name` at every `(offset, cookie)` of `module`, for `pid` only: one
    /// uprobe_multi link, or (in perf mode) a perf-event uprobe per offset, where the entry
    /// program of the cookie's shape stands in for `name` when `per_shape`.
    fn attach_set(
        &mut self,
        probes: &mut ProcessProbes,
        name: &'static str,
        module: &Module,
        at: &[(u64, u64)],
        ret: bool,
        pid: NonZeroU32,
    ) -> Result<(), SourceError> {
        if at.is_empty() {
            return Ok(());
        }
        if !self.multi {
            for &(offset, cookie) in at {
                let name = if name == program::ALLOC_ENTER_MULTI {
                    alloc_shape::entry_program(cookie as u32)
                } else {
                    name
                };
                self.attach_one(probes, name, module, offset, pid)?;
            }
            return Ok(());
        }
        let prog = self.uprobe(name)?;
        let fd = prog.fd().map_err(program_error(name))?;
        let (offsets, cookies): (Vec<u64>, Vec<u64>) = at.iter().copied().unzip();
        let link = MultiLink::attach(
            fd.as_fd(),
            &module.open_path(),
            &offsets,
            &cookies,
            ret,
            pid.get(),
        )
        .map_err(|source| SourceError::Link { name, source })?;
        probes.links.push(Link::Multi(link));
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
        let entries = &module.elf.allocator;
        if what == AllocatorProbes::Full {
            let enter: Vec<(u64, u64)> = entries
                .iter()
                .map(|e| (e.probe_offset(), u64::from(e.shape)))
                .collect();
            // The probe point guarantees `[rsp]` is still the return address there.
            let ret: Vec<(u64, u64)> = enter
                .iter()
                .copied()
                .filter(|&(_, shape)| alloc_shape::allocates(shape as u32))
                .collect();
            self.attach_set(
                probes,
                program::ALLOC_ENTER_MULTI,
                module,
                &enter,
                false,
                pid,
            )?;
            self.attach_set(probes, program::ALLOC_RETURN, module, &ret, true, pid)?;
        } else {
            let is_malloc =
                |e: &&crate::targets::modules::AllocatorEntry| e.symbol == ALLOCATOR_FNS[0].symbol;
            let floor: Vec<(u64, u64)> = entries
                .iter()
                .filter(|e| is_malloc(e) || e.shape == alloc_shape::FREE)
                .map(|e| (e.probe_offset(), 0))
                .collect();
            self.attach_set(probes, program::EMPTY, module, &floor, false, pid)?;
            if what == AllocatorProbes::FloorReturn {
                let malloc: Vec<(u64, u64)> = entries
                    .iter()
                    .filter(is_malloc)
                    .map(|e| (e.probe_offset(), 0))
                    .collect();
                self.attach_set(probes, program::EMPTY_RETURN, module, &malloc, true, pid)?;
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
        self.attach_set(
            probes,
            program::LOADER_STATE,
            module,
            &[(offset, 0)],
            false,
            pid,
        )?;
        probes.loader_modules.push(module.clone());
        Ok(())
    }
}
