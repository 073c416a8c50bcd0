//! The objects mapped into traced processes: which of them hold an allocator we can hook,
//! where their code lives, and the open file handles that keep them readable after the
//! process (or the file) is gone.
//!
//! A module is opened once per node, keyed by device and inode, and shared by every process
//! that maps it. Uprobes attach through `/proc/self/fd/N` of the held file, so they land on
//! exactly the inode the process maps, whichever mount namespace it lives in.
use std::{fs::File, io, os::fd::AsRawFd as _, path::PathBuf, sync::Arc};

use hashbrown::HashMap;
use leaktrace_common::{ALLOCATOR_FNS, alloc_shape};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};

use crate::{
    targets::host::Host,
    targets::probe_point::{self, ProbePoint},
    targets::procfs::Mapping,
};

/// The dynamic loader's hook for debuggers, called whenever its object list changes.
pub const LOADER_STATE_SYMBOL: &str = "_dl_debug_state";

/// An allocator function found in a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatorEntry {
    /// One of [`alloc_shape`].
    pub shape: u32,
    /// The function's name (a row of [`leaktrace_common::ALLOCATOR_FNS`]).
    pub symbol: &'static str,
    /// File offset of the function's first instruction.
    pub offset: u64,
    /// Where its probes go, from the entry (see [`crate::targets::probe_point`]).
    pub probe: ProbePoint,
}

impl AllocatorEntry {
    /// File offset of the probe point (what uprobes attach to).
    pub fn probe_offset(&self) -> u64 {
        self.offset + self.probe.delta
    }
}

/// What leaktrace needs to know about an ELF file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElfInfo {
    /// Allocator entry points it defines, one per distinct address.
    pub allocator: Vec<AllocatorEntry>,
    /// File offset of `_dl_debug_state`, when this is a dynamic loader.
    pub loader_state: Option<u64>,
    /// Its GNU build id, as hex, when it has one (profiles name the exact binary by it).
    pub build_id: Option<String>,
}

impl ElfInfo {
    /// True when it defines `malloc` and `free`: an allocator worth hooking.
    pub fn is_allocator(&self) -> bool {
        let malloc = ALLOCATOR_FNS[0].symbol;
        self.allocator.iter().any(|e| e.symbol == malloc)
            && self.allocator.iter().any(|e| e.shape == alloc_shape::FREE)
    }
}

/// Why a module could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot open {path} mapped by pid {pid}: {source}")]
    /// The mapped file could not be opened or mapped.
    Open {
        /// The process that maps it.
        pid: u32,
        /// The path as that process sees it.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The file could not be parsed as ELF.
    #[error("cannot read ELF file {path}: {source}")]
    Elf {
        /// The file's path.
        path: String,
        /// What the ELF parser said.
        source: object::Error,
    },
}

/// Turns an ELF file's virtual addresses into file offsets (what uprobes attach to and what
/// process mappings are keyed by), through the loadable segment holding each address.
pub struct FileOffsets(Vec<(u64, u64, u64)>);

impl FileOffsets {
    /// Reads `elf`'s segments: (virtual address, file offset, size in the file) each.
    pub fn of<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>) -> Self {
        Self(
            elf.segments()
                .map(|s| (s.address(), s.file_range().0, s.file_range().1))
                .collect(),
        )
    }

    /// The file offset of virtual address `addr`, if a segment's file bytes hold it.
    pub fn get(&self, addr: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|&&(vaddr, _, filesz)| addr >= vaddr && addr < vaddr + filesz)
            .map(|&(vaddr, off, _)| addr - vaddr + off)
    }
}

/// The bytes of the code at `address` (`size` of them).
fn code_at<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    address: u64,
    size: u64,
) -> Option<&'d [u8]> {
    elf.sections()
        .find(|s| address >= s.address() && address < s.address() + s.size())?
        .data_range(address, size)
        .ok()
        .flatten()
}

/// The allocator function a jump to `target` reaches: one of `found` directly, or the
/// symbol a PLT stub at `target` jumps to through its GOT slot.
fn called_allocator<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    offsets: &FileOffsets,
    found: &[AllocatorEntry],
    target: u64,
) -> Option<&'static str> {
    if let Some(e) = found.iter().find(|e| offsets.get(target) == Some(e.offset)) {
        return Some(e.symbol);
    }
    let slot = probe_point::plt_slot(code_at(elf, target, 16)?, target)?;
    let (_, reloc) = elf.dynamic_relocations()?.find(|(at, _)| *at == slot)?;
    let object::RelocationTarget::Symbol(index) = reloc.target() else {
        return None;
    };
    let name = object::ObjectSymbolTable::symbol_by_index(&elf.dynamic_symbol_table()?, index)
        .ok()?
        .name()
        .ok()?;
    ALLOCATOR_FNS
        .iter()
        .find(|f| f.symbol == name && alloc_shape::allocates(f.shape))
        .map(|f| f.symbol)
}

/// An ELF file's bytes, mapped. Parsing through `object::ReadCache` instead costs a seek and
/// a read per symbol name (~5,700 of each to start python3): 50 ms of the 0.33 s it took to
/// attach to a binary with 14,600 symbols.
pub fn map_file(file: &File) -> io::Result<memmap2::Mmap> {
    // SAFETY: a private read-only mapping. A file truncated while mapped would fault on
    // access; these are executables and libraries a process has mapped, which is the same
    // exposure blazesym's own mappings of them have.
    unsafe { memmap2::Mmap::map(file) }
}

/// [`inspect_elf`] of the file at `path`, for tests.
#[cfg(test)]
pub fn inspect_path(path: impl AsRef<std::path::Path>) -> ElfInfo {
    inspect_elf(&map_file(&File::open(path).unwrap()).unwrap()).unwrap()
}

/// Reads allocator and loader symbols from an ELF file's bytes.
pub fn inspect_elf(data: &[u8]) -> Result<ElfInfo, object::Error> {
    let elf = object::File::parse(data)?;
    let offsets = FileOffsets::of(&elf);
    let file_offset = |addr| offsets.get(addr);

    let mut info = ElfInfo {
        build_id: elf
            .build_id()
            .ok()
            .flatten()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect()),
        ..ElfInfo::default()
    };
    let mut found: Vec<AllocatorEntry> = Vec::new();
    let mut single_stepped = Vec::new();
    // Dynamic symbols first (what other objects bind to), then the full table for static
    // binaries.
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        if !sym.is_definition() || sym.kind() != object::SymbolKind::Text || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if name == LOADER_STATE_SYMBOL {
            info.loader_state = info.loader_state.or_else(|| file_offset(sym.address()));
            continue;
        }
        let Some(&leaktrace_common::AllocatorFn { symbol, shape }) =
            ALLOCATOR_FNS.iter().find(|f| f.symbol == name)
        else {
            continue;
        };
        if let Some(offset) = file_offset(sym.address()) {
            let code = code_at(&elf, sym.address(), sym.size()).unwrap_or_default();
            let (probe, why) = probe_point::place_or_entry(
                code,
                sym.address(),
                alloc_shape::registers_read(shape),
            );
            found.push(AllocatorEntry {
                shape,
                symbol,
                offset,
                probe,
            });
            if let Some(why) = why {
                single_stepped.push((found.len() - 1, sym.address(), sym.size(), why));
            }
        }
    }
    // A function without a safe probe point that only tail-calls another allocator function
    // is seen whole by that function's probes: it is not probed itself.
    let mut covered = Vec::new();
    for (i, address, size, why) in single_stepped {
        let entry = &found[i];
        let callee = code_at(&elf, address, size)
            .and_then(|code| probe_point::tail_call_target(code, address))
            .and_then(|target| called_allocator(&elf, &offsets, &found, target));
        match callee {
            Some(callee) => {
                tracing::debug!("{}: not probed, it tail-calls {callee}", entry.symbol);
                covered.push(entry.offset);
            }
            None => tracing::warn!(
                "{}: probed at its entry, which the kernel single-steps (~10 µs a call): {why}",
                entry.symbol
            ),
        }
    }
    found.retain(|e| !covered.contains(&e.offset));
    // One entry per address: aliases keep the name listed first in ALLOCATOR_FNS.
    let rank = |e: &AllocatorEntry| ALLOCATOR_FNS.iter().position(|f| f.symbol == e.symbol);
    found.sort_by_key(|e| (e.offset, rank(e)));
    found.dedup_by_key(|e| e.offset);
    found.sort_by_key(rank);
    info.allocator = found;
    Ok(info)
}

/// Identifies a file on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleKey {
    /// The device holding the file (`st_dev`).
    pub dev: u64,
    /// The file's inode number.
    pub inode: u64,
}

/// An executable or shared library mapped by a traced process, held open.
#[derive(Debug)]
pub struct Module {
    /// The file's identity on the node.
    pub key: ModuleKey,
    /// The path as the (first) process that mapped it sees it.
    pub path: String,
    /// The file, held open; `None` when only its name is known (a recording).
    file: Option<File>,
    /// What was found in it: allocator entries, loader hook.
    pub elf: ElfInfo,
}

impl Module {
    /// A path that reaches this exact file from leaktrace, for as long as it is held.
    pub fn open_path(&self) -> PathBuf {
        match &self.file {
            Some(file) => PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
            None => PathBuf::from(&self.path),
        }
    }
}

/// Every module opened so far, shared across processes.
#[derive(Debug, Default)]
pub struct Modules {
    by_key: HashMap<ModuleKey, Arc<Module>>,
}

impl Modules {
    /// Every module's build id, by the path processes map it at.
    pub fn build_ids(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_key
            .values()
            .filter_map(|m| Some((m.path.as_str(), m.elf.build_id.as_deref()?)))
    }

    /// The module behind a file mapping of `pid`, opened and inspected on first sight.
    pub fn get_or_open(
        &mut self,
        host: &dyn Host,
        pid: u32,
        m: &Mapping,
    ) -> Result<Arc<Module>, ModuleError> {
        let key = ModuleKey {
            dev: m.dev,
            inode: m.inode,
        };
        if let Some(module) = self.by_key.get(&key) {
            return Ok(module.clone());
        }
        let open_error = |source| ModuleError::Open {
            pid,
            path: m.path.clone(),
            source,
        };
        let file = host.open_module(pid, m).map_err(open_error)?;
        let elf = match &file {
            Some(file) => {
                let data = map_file(file).map_err(open_error)?;
                inspect_elf(&data).map_err(|source| ModuleError::Elf {
                    path: m.path.clone(),
                    source,
                })?
            }
            None => ElfInfo::default(),
        };
        let module = Arc::new(Module {
            key,
            path: m.path.clone(),
            file,
            elf,
        });
        self.by_key.insert(key, module.clone());
        Ok(module)
    }

    /// How many distinct modules (by [`ModuleKey`]) are held.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when no module is open.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// An executable range of a process and the module it maps.
#[derive(Clone, Debug)]
pub struct CodeRange {
    /// First address of the range in the process.
    pub start: u64,
    /// Address just past the range's end.
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The file mapped here; `None` for the vDSO and anonymous code (JIT compilers).
    pub module: Option<Arc<Module>>,
    /// The mapping's name as `/proc/PID/maps` shows it (`[vdso]`, or empty for anonymous).
    pub name: String,
}

/// Where a process's code is: its executable mappings, sorted by address. A return address
/// outside all of them cannot be real, which is how a broken stack walk is recognised.
#[derive(Clone, Debug, Default)]
pub struct AddressSpace {
    /// The process these mappings belong to.
    pub pid: u32,
    ranges: Vec<CodeRange>,
    /// The path of the main executable (the first file mapping).
    pub exe: Option<String>,
}

impl AddressSpace {
    /// Reads `/proc/PID/maps` and opens every executable module. Modules that cannot be
    /// opened are skipped (their frames stay unsymbolized) and logged.
    pub fn read(host: &dyn Host, pid: u32, modules: &mut Modules) -> io::Result<Self> {
        let maps = host.maps(pid)?;
        let exe = maps.iter().find(|m| m.is_file()).map(|m| m.path.clone());
        let mut ranges = Vec::new();
        for m in maps.iter().filter(|m| m.executable) {
            let module = if m.is_file() {
                modules
                    .get_or_open(host, pid, m)
                    .inspect_err(|err| tracing::debug!("{err}"))
                    .ok()
            } else {
                None
            };
            ranges.push(CodeRange {
                start: m.start,
                end: m.end,
                offset: m.offset,
                module,
                name: m.path.clone(),
            });
        }
        ranges.sort_by_key(|r| r.start);
        Ok(Self { pid, ranges, exe })
    }

    /// The executable ranges, sorted by address.
    pub fn ranges(&self) -> &[CodeRange] {
        &self.ranges
    }

    /// The executable range holding `addr`.
    pub fn range(&self, addr: u64) -> Option<&CodeRange> {
        let i = self
            .ranges
            .partition_point(|r| r.start <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        (addr < r.end).then_some(r)
    }

    /// The module holding `addr` and the file offset of `addr` in it.
    pub fn lookup(&self, addr: u64) -> Option<(&Arc<Module>, u64)> {
        let r = self.range(addr)?;
        Some((r.module.as_ref()?, addr - r.start + r.offset))
    }

    /// The distinct modules, in address order.
    pub fn modules(&self) -> Vec<Arc<Module>> {
        let mut out: Vec<Arc<Module>> = Vec::new();
        for m in self.ranges.iter().filter_map(|r| r.module.as_ref()) {
            if !out.iter().any(|o| o.key == m.key) {
                out.push(m.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libc_path() -> Option<String> {
        crate::targets::procfs::read_maps(std::process::id())
            .ok()?
            .into_iter()
            .find(|m| m.path.contains("libc.so"))
            .map(|m| m.path)
    }

    #[test]
    fn every_glibc_allocator_probe_sits_on_an_emulated_instruction() {
        let Some(path) = libc_path() else { return };
        let bytes = std::fs::read(&path).unwrap();
        let info = inspect_path(&path);
        for e in &info.allocator {
            assert!(e.probe.emulated, "{}: {:?}", e.symbol, e.probe);
            let at = e.probe_offset() as usize;
            let insn = iced_x86::Decoder::with_ip(64, &bytes[at..at + 16], 0, 0).decode();
            assert!(
                probe_point::kernel_emulates(&bytes[at..at + insn.len()]),
                "{} +{}",
                e.symbol,
                e.probe.delta
            );
        }
        // glibc's free starts with `test %rdi,%rdi`, which the kernel single-steps.
        let free = info.allocator.iter().find(|e| e.symbol == "free").unwrap();
        assert!(free.probe.delta > 0);
    }

    #[test]
    fn glibc_exports_every_allocator_entry_once_per_address() {
        let Some(path) = libc_path() else { return };
        let info = inspect_path(&path);
        assert!(info.is_allocator());
        let names: Vec<_> = info.allocator.iter().map(|e| e.symbol).collect();
        for want in [
            "malloc",
            "calloc",
            "realloc",
            "free",
            "posix_memalign",
            "valloc",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(
            !names.contains(&"cfree"),
            "cfree is free's alias: {names:?}"
        );
        let mut offsets: Vec<_> = info.allocator.iter().map(|e| e.offset).collect();
        offsets.dedup();
        assert_eq!(offsets.len(), info.allocator.len());
        assert_eq!(info.loader_state, None);
    }

    #[test]
    fn the_loader_has_its_debugger_hook_and_no_allocator() {
        let Some(ld) = crate::targets::procfs::read_maps(std::process::id())
            .unwrap()
            .into_iter()
            .find(|m| m.path.contains("ld-linux"))
        else {
            return;
        };
        let info = inspect_path(&ld.path);
        assert!(info.loader_state.is_some());
        assert!(!info.is_allocator());
    }

    #[test]
    fn address_space_maps_code_addresses_to_file_offsets() {
        let mut modules = Modules::default();
        let space = AddressSpace::read(
            &crate::targets::host::Live::new(),
            std::process::id(),
            &mut modules,
        )
        .unwrap();
        let here = address_space_maps_code_addresses_to_file_offsets as *const () as usize as u64;
        let (module, offset) = space.lookup(here).expect("own code is mapped");
        assert_eq!(Some(&module.path), space.exe.as_ref());
        assert!(offset < std::fs::metadata(&module.path).unwrap().len());
        assert!(space.lookup(0x10).is_none());
        assert!(space.modules().len() >= 2, "exe and libc at least");
    }
}
