//! The walker's view of each traced process: its executable mappings and, per module, the
//! unwind table the walker follows, handed over in shared memory.
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::MapData;
use hashbrown::HashMap;
use leaktrace_common::{CodeMapping, MAX_CODE_MAPPINGS, ProcessCode, UnwindRow, names::map};

use super::SourceError;
use crate::{
    targets::modules::{AddressSpace, Module, ModuleKey},
    unwind::{UnwindTable, Unwinder},
};

/// A BPF array created with `BPF_F_MMAPABLE`, mapped into our memory and filled from the
/// front: the cheapest way to hand the kernel side large tables.
pub(super) struct SharedArray<T: Copy> {
    ptr: *mut T,
    capacity: usize,
    used: usize,
    _map: MapData,
}

impl<T: Copy> SharedArray<T> {
    pub(super) fn new(map: MapData, capacity: u32) -> Result<Self, SourceError> {
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
            std::ptr::copy_nonoverlapping(items.as_ptr(), self.ptr.add(self.used), items.len());
        }
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
pub(super) fn index_capacity(rows: u32) -> u32 {
    (rows / 2).max(1 << 16)
}

/// Where a module's table sits in the kernel's arrays.
#[derive(Clone, Copy, Debug)]
struct TableSlot {
    table_start: u32,
    table_len: u32,
    index_start: u32,
    index_len: u32,
}

/// Every module's unwind rows (`UNWIND_ROWS`) and page index (`UNWIND_INDEX`). Each
/// module's table is compiled and copied once, whichever processes map it.
pub(super) struct UnwindTables {
    unwinder: Box<dyn Unwinder>,
    rows: SharedArray<UnwindRow>,
    /// u64 entries: elements of a mmap'ed BPF array are 8-byte aligned.
    index: SharedArray<u64>,
    /// Where each module's table is (`None`: it has no usable table).
    placed: HashMap<ModuleKey, Option<TableSlot>>,
    /// Said already that the table is full.
    told_full: bool,
}

impl UnwindTables {
    /// Maps the object's `UNWIND_ROWS` and `UNWIND_INDEX` arrays, sized for `rows` rows.
    pub(super) fn new(
        ebpf: &mut aya::Ebpf,
        rows: u32,
        unwinder: Box<dyn Unwinder>,
    ) -> Result<Self, SourceError> {
        let mut array = |name: &'static str| match ebpf.take_map(name) {
            Some(aya::maps::Map::Array(data)) => Ok(data),
            _ => Err(SourceError::Missing(name)),
        };
        Ok(Self {
            unwinder,
            rows: SharedArray::new(array(map::UNWIND_ROWS)?, rows)?,
            index: SharedArray::new(array(map::UNWIND_INDEX)?, index_capacity(rows))?,
            placed: HashMap::new(),
            told_full: false,
        })
    }

    /// The table of `module`, compiled and copied in on first use.
    fn place(&mut self, module: &Module) -> Option<TableSlot> {
        if let Some(placed) = self.placed.get(&module.key) {
            return *placed;
        }
        let placed = match self.unwinder.compile(&module.open_path()) {
            Ok(table) => self.copy_in(module, &table),
            Err(e) => {
                tracing::debug!("{}: no unwind table: {e}", module.path);
                None
            }
        };
        self.placed.insert(module.key, placed);
        placed
    }

    fn copy_in(&mut self, module: &Module, table: &UnwindTable) -> Option<TableSlot> {
        let mut index: Vec<u64> = table.page_index().into_iter().map(u64::from).collect();
        if self.index.used + index.len() > self.index.capacity {
            // Lookups in this module search all its rows instead of one page's.
            index.clear();
        }
        if self.rows.used + table.rows.len() > self.rows.capacity {
            // Once: on a node that keeps starting new binaries, every later one lands here.
            if !self.told_full {
                self.told_full = true;
                tracing::warn!(
                    "{}: the unwind table is full ({} rows); this and later modules' frames use frame pointers (raise --unwind-rows)",
                    module.path,
                    self.rows.capacity
                );
            } else {
                tracing::debug!("{}: the unwind table is full", module.path);
            }
            return None;
        }
        let slot = TableSlot {
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
        Some(slot)
    }
}

impl super::Source {
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
            let p = placed.unwrap_or(TableSlot {
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
                name: map::PROC_CODE,
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
}
