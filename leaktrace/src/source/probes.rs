//! Uprobes: the allocator's and the loader's, attached per process and released off the
//! event loop.
use std::{num::NonZeroU32, sync::Arc};

use aya::programs::{
    UProbe,
    uprobe::{UProbeLink, UProbeScope},
};
use leaktrace_common::{ALLOCATOR_FNS, alloc_shape, names::program};

use super::{Source, SourceError, program_error};
use crate::targets::modules::Module;

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

    /// True when no probe is attached.
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
                let malloc = entry.symbol == ALLOCATOR_FNS[0].symbol;
                if !malloc && entry.shape != alloc_shape::FREE {
                    continue;
                }
                self.attach_one(probes, program::EMPTY, module, at, pid)?;
                if malloc && what == AllocatorProbes::FloorReturn {
                    self.attach_one(probes, program::EMPTY_RETURN, module, at, pid)?;
                }
            }
            probes.allocator_modules.push(module.clone());
            return Ok(());
        }
        for entry in &module.elf.allocator {
            let at = entry.probe_offset();
            let entry_program = alloc_shape::entry_program(entry.shape);
            self.attach_one(probes, entry_program, module, at, pid)?;
            if alloc_shape::allocates(entry.shape) {
                // The probe point guarantees `[rsp]` is still the return address there.
                self.attach_one(probes, program::ALLOC_RETURN, module, at, pid)?;
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
        self.attach_one(probes, program::LOADER_STATE, module, offset, pid)?;
        probes.loader_modules.push(module.clone());
        Ok(())
    }
}
