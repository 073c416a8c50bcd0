//! Unwind rows: the row for a pc, found through the process's code mappings (`PROC_CODE`),
//! the page index (`UNWIND_INDEX`) and a binary search of `UNWIND_ROWS`, with a per-CPU cache
//! of the rows found.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_loop,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use leaktrace_common::{MAX_CODE_MAPPINGS, ProcessCode, UNWIND_PAGE_SHIFT, UnwindRow};

use super::walk::{SEED, Walk, finish};

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Every module's unwind rows, one slice per module; user space writes them through mmap
/// and sizes the array at load time.
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1 << 20, BPF_F_MMAPABLE);

/// Every module's page index into its rows (see `CodeMapping::index_start`). Entries are
/// u64 because array elements are 8-byte aligned in the memory user space maps.
#[map]
static UNWIND_INDEX: Array<u64> = Array::with_max_entries(1 << 19, BPF_F_MMAPABLE);

/// Per traced process: its executable mappings and their tables.
#[map]
pub(super) static PROC_CODE: HashMap<u32, ProcessCode> =
    HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// State of a binary search, run by `bpf_loop` (see the module notes).
#[repr(C)]
struct Search {
    /// The answer lies in `[lo, hi)`; at the end `lo` is one past the last element `<= key`.
    lo: u32,
    hi: u32,
    key: u64,
    code: *const ProcessCode,
}

/// One step of the search for the last mapping starting at or below `key`.
#[inline(never)]
extern "C" fn mapping_step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Search` that `row_for` passed to bpf_loop.
    let s = unsafe { &mut *ctx.cast::<Search>() };
    if s.lo >= s.hi || s.code.is_null() {
        return 1;
    }
    let mid = s.lo + (s.hi - s.lo) / 2;
    if mid as usize >= MAX_CODE_MAPPINGS {
        return 1;
    }
    // SAFETY: `code` is a PROC_CODE value; `mid` is checked against the array length.
    if unsafe { (*s.code).mappings[mid as usize].start } <= s.key {
        s.lo = mid + 1;
    } else {
        s.hi = mid;
    }
    0
}

/// One step of the search for the last unwind row at or below `key`.
#[inline(never)]
extern "C" fn row_step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Search` that `row_for` passed to bpf_loop.
    let s = unsafe { &mut *ctx.cast::<Search>() };
    if s.lo >= s.hi {
        return 1;
    }
    let mid = s.lo + (s.hi - s.lo) / 2;
    let Some(row) = UNWIND_ROWS.get(mid) else {
        return 1;
    };
    if u64::from(row.pc) <= s.key {
        s.lo = mid + 1;
    } else {
        s.hi = mid;
    }
    0
}

/// A row found for one return address: `tag` is its key (table and offset) mixed with the
/// row itself, so an entry torn by a preempting walk does not match.
#[repr(C)]
pub struct CachedRow {
    tag: u64,
    row: UnwindRow,
}

/// Rows found per CPU, direct-mapped by table and offset (64 KiB a CPU, in cache).
///
/// The tables are large (every module's rows) and a binary search through them is a chain
/// of dependent loads, each a likely cache and TLB miss: that, not the arithmetic, was most
/// of a walk's cost. Programs return to the same few thousand call sites over and over, so
/// one load here replaces the chain. Tables are only ever appended to (a table's rows never
/// change once placed), so an entry never goes stale.
#[map]
static ROW_CACHE: PerCpuArray<CachedRow> = PerCpuArray::with_max_entries(ROW_CACHE_SLOTS, 0);
const ROW_CACHE_SLOTS: u32 = 4096;

/// The tag of `row` cached under `key`.
#[inline(always)]
fn row_tag(key: u64, row: &UnwindRow) -> u64 {
    let bits = u64::from(row.pc)
        | (u64::from(row.cfa_off) << 32)
        | (u64::from(row.rbp_off as u8) << 48)
        | (u64::from(row.kind) << 56);
    key ^ finish(bits ^ SEED)
}

/// The unwind row for `pc`, if a table covers it.
#[inline(always)]
pub(super) fn row_for(w: &mut Walk, pc: u64) -> Option<UnwindRow> {
    if w.tables == 0 {
        return None;
    }
    if !(w.last.start <= pc && pc < w.last.end) {
        if w.prev.start <= pc && pc < w.prev.end {
            // Back to the module before (stacks alternate between the program and libc).
            core::mem::swap(&mut w.last, &mut w.prev);
        } else {
            let code = PROC_CODE.get_ptr(w.pid)?;
            // SAFETY: a PROC_CODE value.
            let len = unsafe { (*code).len }.min(MAX_CODE_MAPPINGS as u32);
            let mut search = Search {
                lo: 0,
                hi: len,
                key: pc,
                code,
            };
            // SAFETY: the callback has the bpf_loop signature; `search` outlives the call.
            unsafe { bpf_loop(9, mapping_step as *mut c_void, (&raw mut search).cast(), 0) };
            let i = search.lo.checked_sub(1)? as usize;
            if i >= MAX_CODE_MAPPINGS {
                return None;
            }
            w.prev = w.last;
            // SAFETY: as above; `i` is checked against the array length.
            w.last = unsafe { (*code).mappings[i] };
        }
        if !(w.last.start <= pc && pc < w.last.end) {
            return None;
        }
    }
    if w.last.table_len == 0 {
        return None;
    }
    let rel = pc - w.last.start + w.last.offset;
    // Rows hold u32 offsets: an offset past 4 GiB has no key of its own, so it is searched
    // and never cached.
    if rel > u64::from(u32::MAX) {
        return search_row(w, rel);
    }
    let key = (u64::from(w.last.table_start) << 32) | rel;
    let slot = (finish(key) as u32) & (ROW_CACHE_SLOTS - 1);
    if let Some(e) = ROW_CACHE.get_ptr(slot) {
        // SAFETY: this CPU's entry; a torn one fails the tag check.
        let (tag, row) = unsafe { ((*e).tag, (*e).row) };
        if tag == row_tag(key, &row) {
            return Some(row);
        }
    }
    let row = search_row(w, rel)?;
    if let Some(e) = ROW_CACHE.get_ptr_mut(slot) {
        // SAFETY: this CPU's entry (see above).
        unsafe {
            (*e).row = row;
            (*e).tag = row_tag(key, &row);
        }
    }
    Some(row)
}

/// The row covering `rel` in the table of `w.last`, by binary search.
#[inline(always)]
fn search_row(w: &Walk, rel: u64) -> Option<UnwindRow> {
    let start = w.last.table_start;
    // The page index narrows the search to the rows of rel's page: the row covering the
    // page's start through the one covering the next page's start.
    let page = (rel >> UNWIND_PAGE_SHIFT) as u32;
    let (mut lo, mut hi) = (start, start + w.last.table_len);
    if page + 1 < w.last.index_len
        && let (Some(&first), Some(&next)) = (
            UNWIND_INDEX.get(w.last.index_start + page),
            UNWIND_INDEX.get(w.last.index_start + page + 1),
        )
    {
        lo = start + first as u32;
        hi = hi.min(start + next as u32 + 1);
    }
    // The whole search runs in bpf_loop, never unrolled here: an unrolled search's bounds
    // are precise scalars to the verifier, which then explores every branch of every step
    // (2^n states per search, and row_for inlines it twice). Kernel 6.18.44's verifier gave
    // up on a 12-step unrolled prefix at its million-instruction limit; older 6.18 builds
    // pruned it.
    let mut search = Search {
        lo,
        hi,
        key: rel,
        code: core::ptr::null(),
    };
    // SAFETY: as above.
    unsafe { bpf_loop(32, row_step as *mut c_void, (&raw mut search).cast(), 0) };
    let (first, l) = (lo, search.lo);
    if l <= first || l <= start {
        return None;
    }
    UNWIND_ROWS.get(l - 1).copied()
}
