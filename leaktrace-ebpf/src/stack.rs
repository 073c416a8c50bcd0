//! The one stack walker: every program that needs a stack calls [`capture`].
//!
//! It unwinds the user stack from the registers at the event: with the module's unwind
//! table (compiled from `.eh_frame` by user space, see `UNWIND_ROWS` and `PROC_CODE`) where
//! there is one, with the frame pointer elsewhere. It hashes the frames into a stack id and
//! sends the frames to user space the first time an id is seen (`STACKS_SEEN`); user space
//! keeps the id → frames store, so events carry only the 8-byte id.
//!
//! The same walk, in user space and tested against glibc's `backtrace()`, is
//! `leaktrace::unwind::walk`.
//!
//! Verifier notes. The walk runs one frame per `bpf_loop` step, and its state lives in a
//! per-CPU map value, not on the BPF stack: values loaded from a map are opaque to the
//! verifier, so indexes derived from them (into the frame buffer, the stack copy, the
//! mappings) need no precision tracking across steps, and the step verifies once instead of
//! once per frame. Binary searches index map values too, so they run in `bpf_loop`s of their
//! own for the same reason.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated::bpf_loop},
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use leaktrace_common::{
    CodeMapping, Config, Header, MAX_CODE_MAPPINGS, MAX_FRAMES, ProcessCode, StackEvent,
    UNWIND_PAGE_SHIFT, UnwindRow, WalkStats, counter, drop_reason, kind, stack_flags, unwind_kind,
    unwind_mode,
};

use crate::maps::{EVENTS, count_drop};

/// Settings from user space, fixed at load time (the verifier prunes what they turn off).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    unwind: unwind_mode::AUTO,
    measure: 0,
    features: 0,
    sample_bytes: 0,
};

#[inline(always)]
fn config() -> Config {
    // SAFETY: a plain read of a global user space may patch before loading.
    unsafe { core::ptr::read_volatile(&raw const CONFIG) }
}

/// Allocations are sampled, one byte in this many on average (0: all).
#[inline(always)]
pub fn sample_bytes() -> u32 {
    config().sample_bytes
}

/// Bits of `leaktrace_common::features` this session traces.
#[inline(always)]
pub fn features() -> u32 {
    config().features
}

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
static PROC_CODE: HashMap<u32, ProcessCode> = HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Per-CPU walk timings, when `CONFIG.measure` is set.
#[map]
static WALK_STATS: PerCpuArray<WalkStats> = PerCpuArray::with_max_entries(1, 0);

/// Stack ids already sent to user space, each in slot `id % SEEN_SLOTS`: a direct-mapped
/// cache in an array (no helper call to look up). An id whose slot another took is simply
/// sent again.
#[map]
static STACKS_SEEN: Array<u64> = Array::with_max_entries(SEEN_SLOTS, 0);
const SEEN_SLOTS: u32 = 1 << 16;

#[inline(always)]
fn seen_slot(id: u64) -> Option<*mut u64> {
    STACKS_SEEN.get_ptr_mut((id % u64::from(SEEN_SLOTS)) as u32)
}

/// Where a walk is.
#[repr(C)]
struct Walk {
    /// The frame being unwound: its pc (a return address unless `exact`), sp and rbp.
    pc: u64,
    sp: u64,
    bp: u64,
    hash: u64,
    /// The stack pointer the walk started from, and the chunk holding it: `STACK_COPY`
    /// mirrors `[base, base + COPY_CHUNKS chunks)`.
    start_sp: u64,
    base: u64,
    /// `Scratch::users` when this walk started.
    ticket: u64,
    pid: u32,
    nr: u32,
    flags: u32,
    /// `pc` is an exact instruction address (the first frame at a probe or tracepoint).
    exact: u32,
    /// `pc` is a function's first instruction: nothing pushed yet.
    entry: u32,
    /// Unwind tables are in use for this process.
    tables: u32,
    /// Chunks of `STACK_COPY` copied (bit per chunk), and chunks that could not be read.
    copied: u32,
    failed: u32,
    /// The code mapping the previous frame was in, and the one before that (copies: callers
    /// are often in the same module, or back in the one before).
    last: CodeMapping,
    prev: CodeMapping,
    /// The stack words this walk read, for [`WALK_CACHE`]: how many, their offsets from
    /// `start_sp` (in `Scratch::reads`), a hash of their values, and whether every read came
    /// from the copy and fit the record.
    nreads: u32,
    cacheable: u32,
    read_hash: u64,
    /// Ranges of the stack planned for the walk cache (see `Scratch::ranges`).
    nranges: u32,
    /// Where `bp` came from, until a step uses it: the offset from `start_sp` of the slot
    /// it was loaded from, [`BP_REGISTER`] (the starting register) or [`BP_CHECKED`]. Only
    /// a used bp is part of what a cached walk depends on: in code built without frame
    /// pointers rbp is just another register, holding data that changes call to call.
    bp_src: u32,
    /// The starting bp was used.
    bp_reg: u32,
}

const BP_REGISTER: u32 = u32::MAX;
const BP_CHECKED: u32 = u32::MAX - 1;

/// The step is about to use `bp`: make its value part of what the walk depends on.
#[inline(always)]
fn use_bp(w: &mut Walk) {
    match w.bp_src {
        BP_CHECKED => {}
        BP_REGISTER => w.bp_reg = 1,
        offset => record_read(w, u64::from(offset), w.bp),
    }
    w.bp_src = BP_CHECKED;
}

/// A walk's state and the frames it collected, one per CPU (too large for the BPF stack).
///
/// Uprobe programs run with migration disabled but may be preempted on kernels with full
/// preemption, so another task's walk can reuse this CPU's scratch midway. `users` counts
/// walks started here; a walk that finds it changed at the end knows its frames were
/// overwritten and does not send them.
#[repr(C)]
pub struct Scratch {
    users: u64,
    walk: Walk,
    /// `ProcessCode::generation` of `walk.pid` when `walk.last`/`walk.prev` were found.
    generation: u32,
    _pad: u32,
    /// Offsets from the starting sp of the words the walk read (see `Walk::nreads`).
    reads: [u16; CACHED_READS],
    /// The ranges of the stack that hold those words, planned for the walk cache.
    ranges: [CopyRange; CACHED_RANGES],
    frames: [u64; MAX_FRAMES],
}

/// A range of the stack a cached walk depends on: `len` bytes at `sp + offset`, copied to
/// `at` in `STACK_COPY` when the walk is checked.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CopyRange {
    offset: u16,
    len: u16,
    at: u16,
    _pad: u16,
}

/// Most ranges a cached walk is checked with: each is one helper call.
const CACHED_RANGES: usize = 8;
/// Words closer than this to a range join it: copying the gap costs less than another call.
/// Measured on sqlite3's walks (hit cost against the ranges and bytes copied), a call costs
/// ~170 ns and a byte ~0.04 ns here: gaps under ~4 KiB are cheaper copied.
const RANGE_GAP: u32 = 4096;
/// Most bytes a cached walk's ranges may hold, together: positions in the copy stay below
/// it, so `at + len` stays inside `STACK_COPY` with both masked.
const CACHED_BYTES: u32 = 16 << 10;

/// The most stack words a cached walk may have read (two per frame at most). A power of
/// two: indexes are masked with it, which the verifier follows where a compare may not be.
const CACHED_READS: usize = 64;
/// Cached walks per CPU, ~264 KiB a CPU: sets of two, chosen by start pc and sp.
///
/// Two ways, because the misses of a direct-mapped cache were nearly all (99.97% on
/// sqlite3) another call path reaching the same instruction at the same depth, the paths
/// taking turns: with two ways, sqlite3's allocations that hit went from 70% to 84–89%
/// (runs differ: which way a third path replaces is random).
const CACHED_WALKS: u32 = 1024;

/// A finished walk, and what it depended on.
///
/// A walk is a function of its starting registers (pc, sp, and bp if a step uses it), the
/// unwind rows (fixed for a `generation` of the process's code) and the stack words it
/// uses: return addresses, and saved rbp values that a later step uses. When a new walk
/// starts from the same pc and sp of the same process and generation (and the same bp, if
/// it mattered), and the same offsets hold the same words, it would take the same steps to
/// the same frames: its stack id is the cached one, with no row looked up. That is the
/// common case: an allocation site reached by the same call path, at the same depth.
///
/// Checking costs a copy of the words: a few ranges of the stack (`ranges`), each one
/// helper call, packed into `STACK_COPY`. Deep stacks cross large frames (sqlite3's VDBE
/// keeps kilobytes of locals), and copying only the ranges that hold the words read, not the
/// whole span, is what lets walks spanning up to the 32 KiB copy be cached at all.
#[repr(C)]
pub struct CachedWalk {
    start: WalkStart,
    nreads: u32,
    nranges: u32,
    /// The walk used the starting bp: it must match too.
    bp_reg: u32,
    _pad: u32,
    read_hash: u64,
    stack_id: u64,
    /// A hash over every field above: an entry torn by a preempting walk does not match.
    check: u64,
    /// Where each word the walk read lands in `STACK_COPY` once `ranges` are copied.
    reads: [u16; CACHED_READS],
    ranges: [CopyRange; CACHED_RANGES],
}

/// Where a walk starts: what a cached walk must match.
#[repr(C)]
#[derive(Clone, Copy)]
struct WalkStart {
    pc: u64,
    sp: u64,
    bp: u64,
    pid: u32,
    generation: u32,
}

impl WalkStart {
    /// The same instruction and stack depth of the same process and code: the key of a
    /// cached walk (its bp matters only if the walk used it).
    #[inline(always)]
    fn same_place(&self, k: &WalkStart) -> bool {
        self.pc == k.pc && self.sp == k.sp && self.pid == k.pid && self.generation == k.generation
    }
}

#[map]
static WALK_CACHE: PerCpuArray<CachedWalk> = PerCpuArray::with_max_entries(CACHED_WALKS, 0);

#[inline(always)]
fn entry_check(e: &CachedWalk) -> u64 {
    let k = &e.start;
    let mut h = mix(SEED, k.pc);
    h = mix(h, k.sp);
    h = mix(h, k.bp);
    h = mix(h, (u64::from(k.pid) << 32) | u64::from(k.generation));
    h = mix(h, (u64::from(e.nreads) << 32) | u64::from(e.nranges));
    h = mix(h, u64::from(e.bp_reg));
    h = mix(h, e.read_hash);
    mix(h, e.stack_id)
}

/// The first of the two slots (ways) of the set for a walk from `pc` and `sp`.
#[inline(always)]
fn cache_set(pc: u64, sp: u64) -> u32 {
    (finish(pc ^ sp.rotate_left(17)) % u64::from(CACHED_WALKS)) as u32 & !1
}

/// Which way of `set` a new walk from `k` replaces: one holding a walk from other
/// registers (another key, or nothing), else either.
#[inline(always)]
fn victim(set: u32, k: &WalkStart) -> u32 {
    let same = |slot: u32| {
        WALK_CACHE.get_ptr(slot).is_some_and(|e| {
            // SAFETY: this CPU's cache entry; a torn read only picks another way.
            unsafe { &(*e).start }.same_place(k)
        })
    };
    if !same(set) {
        set
    } else if !same(set | 1) {
        set | 1
    } else {
        // SAFETY: no preconditions.
        set | (unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() } & 1)
    }
}

#[map]
static STACK_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The stack is copied in chunks of this many bytes, on demand, from the chunk holding the
/// starting sp upwards: 32 chunks, 32 KiB, the most a per-CPU map value may hold. Smaller
/// chunks copy less of what no frame needs; each is one helper call.
const CHUNK: u64 = 1024;
const COPY_CHUNKS: u64 = 32;

/// A per-CPU copy of the top of the stack being walked.
///
/// Each `bpf_probe_read_user` is a helper call (~170 ns on this kind of VM); a walk reads one
/// or two words per frame. Copying the stack a chunk at a time, on demand, then reading
/// frames from the copy costs a call per chunk instead. The memory above the starting sp
/// holds the live frames of the callers, so it is resident; a chunk that cannot be read
/// (the end of the stack mapping) falls back to reading words one by one.
#[repr(C)]
pub struct StackCopy {
    bytes: [u8; (COPY_CHUNKS * CHUNK) as usize],
}

#[map]
static STACK_COPY: PerCpuArray<StackCopy> = PerCpuArray::with_max_entries(1, 0);

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

const NO_MAPPING: CodeMapping = CodeMapping {
    start: 0,
    end: 0,
    offset: 0,
    table_start: 0,
    table_len: 0,
    index_start: 0,
    index_len: 0,
};

#[inline(always)]
fn mix(hash: u64, value: u64) -> u64 {
    (hash.rotate_left(5) ^ value).wrapping_mul(0x51_7cc1_b727_220a_95)
}

/// The finalizer of MurmurHash3: spreads every input bit over the whole id.
#[inline(always)]
fn finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[inline(always)]
fn push(s: &mut Scratch, frame: u64) -> bool {
    let nr = s.walk.nr as usize;
    if nr >= MAX_FRAMES {
        s.walk.flags |= stack_flags::TRUNCATED;
        return false;
    }
    s.frames[nr] = frame;
    s.walk.nr += 1;
    s.walk.hash = mix(s.walk.hash, frame);
    true
}

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
fn row_for(w: &mut Walk, pc: u64) -> Option<UnwindRow> {
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
    let (first, mut l, mut h) = (lo, lo, hi);
    for _ in 0..12 {
        if l >= h {
            break;
        }
        let mid = l + (h - l) / 2;
        let row = UNWIND_ROWS.get(mid)?;
        if u64::from(row.pc) <= rel {
            l = mid + 1
        } else {
            h = mid
        }
    }
    if l < h {
        // The page holds more rows than 12 halvings cover: finish in a loop of its own.
        let mut search = Search {
            lo: l,
            hi: h,
            key: rel,
            code: core::ptr::null(),
        };
        // SAFETY: as above.
        unsafe { bpf_loop(32, row_step as *mut c_void, (&raw mut search).cast(), 0) };
        l = search.lo;
    }
    if l <= first || l <= start {
        return None;
    }
    UNWIND_ROWS.get(l - 1).copied()
}

/// Makes chunk `chunk` of the copy (relative to `w.base`) available. False: read directly.
#[inline(always)]
fn copy_chunk(w: &mut Walk, chunk: u64) -> bool {
    if chunk >= COPY_CHUNKS {
        return false;
    }
    let bit = 1u32 << chunk;
    if w.copied & bit != 0 {
        return true;
    }
    if w.failed & bit != 0 {
        return false;
    }
    let Some(copy) = STACK_COPY.get_ptr_mut(0) else {
        return false;
    };
    // Whole chunks, the first included: the part of it below sp is in the same mapped page,
    // and a fixed size keeps the verifier's bounds simple.
    let at = chunk * CHUNK;
    // SAFETY: `chunk < COPY_CHUNKS`, so `at + CHUNK` is within the per-CPU buffer; the helper
    // checks the user range and never faults the target.
    let r = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            (copy as *mut u8).add(at as usize).cast(),
            CHUNK as u32,
            (w.base + at) as *const c_void,
        )
    };
    if r == 0 {
        w.copied |= bit;
        true
    } else {
        w.failed |= bit;
        false
    }
}

/// Reads a word of the stack being walked, recorded for the walk cache.
#[inline(always)]
fn read(w: &mut Walk, addr: u64) -> Option<u64> {
    let value = read_unrecorded(w, addr)?;
    if w.cacheable != 0 {
        record_read(w, addr.wrapping_sub(w.start_sp), value);
    }
    Some(value)
}

/// Reads a word of the stack being walked: from the copy when it covers `addr`. A word
/// read directly (outside the copy) makes the walk uncacheable.
#[inline(always)]
fn read_unrecorded(w: &mut Walk, addr: u64) -> Option<u64> {
    if addr >= w.start_sp && addr - w.base <= COPY_CHUNKS * CHUNK - 8 {
        let rel = addr - w.base;
        if copy_chunk(w, rel / CHUNK) && copy_chunk(w, (rel + 7) / CHUNK) {
            let copy = STACK_COPY.get_ptr(0)?;
            let rel = rel as usize;
            if rel <= (COPY_CHUNKS * CHUNK - 8) as usize {
                // SAFETY: `rel + 8` is within the buffer, checked above.
                return Some(unsafe {
                    core::ptr::read_unaligned((copy as *const u8).add(rel).cast::<u64>())
                });
            }
        }
    }
    w.cacheable = 0;
    // SAFETY: bpf_probe_read_user checks the address and never faults the target.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Notes a word the walk read from the copy, for the walk cache.
#[inline(always)]
fn record_read(w: &mut Walk, offset: u64, value: u64) {
    let n = w.nreads as usize;
    if n >= CACHED_READS || offset > u64::from(u16::MAX) {
        w.cacheable = 0;
        return;
    }
    let Some(s) = STACK_SCRATCH.get_ptr_mut(0) else {
        w.cacheable = 0;
        return;
    };
    // SAFETY: this CPU's scratch; `n` is checked against the array length.
    unsafe { (*s).reads[n & (CACHED_READS - 1)] = offset as u16 };
    w.nreads += 1;
    w.read_hash = mix(w.read_hash, value);
}

/// One step of planning the ranges a cached walk is checked with: finds or makes a range
/// holding read `index` (words in walk order, mostly rising; a saved rbp used later lies
/// next to a word already read).
#[inline(never)]
extern "C" fn plan_step(index: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch, set up by `capture`.
    let s = unsafe { &mut *s };
    let o = u32::from(s.reads[index as usize & (CACHED_READS - 1)]);
    let n = s.walk.nranges as usize;
    for r in 0..CACHED_RANGES {
        if r >= n {
            break;
        }
        let g = &mut s.ranges[r];
        let (lo, hi) = (u32::from(g.offset), u32::from(g.offset) + u32::from(g.len));
        if o >= lo && o < hi + RANGE_GAP {
            g.len = (hi.max(o + 8) - lo) as u16;
            return 0;
        }
        if o < lo && o + 8 + RANGE_GAP > lo {
            g.offset = o as u16;
            g.len = (hi - o) as u16;
            return 0;
        }
    }
    if n >= CACHED_RANGES {
        s.walk.cacheable = 0;
        return 1;
    }
    s.ranges[n & (CACHED_RANGES - 1)] = CopyRange {
        offset: o as u16,
        len: 8,
        at: 0,
        _pad: 0,
    };
    s.walk.nranges += 1;
    0
}

/// One step of placing read `index` in the copy the planned ranges will make: replaces its
/// offset from sp with its position in `STACK_COPY`.
#[inline(never)]
extern "C" fn place_step(index: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch, set up by `capture`.
    let s = unsafe { &mut *s };
    let i = index as usize & (CACHED_READS - 1);
    let o = u32::from(s.reads[i]);
    for r in 0..CACHED_RANGES {
        if r >= s.walk.nranges as usize {
            break;
        }
        let g = s.ranges[r];
        if u32::from(g.offset) <= o && o + 8 <= u32::from(g.offset) + u32::from(g.len) {
            s.reads[i] = (u32::from(g.at) + o - u32::from(g.offset)) as u16;
            return 0;
        }
    }
    s.walk.cacheable = 0;
    1
}

/// One step of the walk: finds the caller of the current frame and pushes its return
/// address. Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn step(_index: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch, set up by `capture`.
    let s = unsafe { &mut *s };
    if s.walk.nr as usize >= MAX_FRAMES {
        s.walk.flags |= stack_flags::TRUNCATED;
        return 1;
    }
    let w = &mut s.walk;
    // A return address points after its call: look the call itself up.
    let lookup = if w.exact != 0 {
        w.pc
    } else {
        w.pc.wrapping_sub(1)
    };
    let entry = w.entry != 0;
    w.exact = 0;
    w.entry = 0;

    // Where the caller's frame starts (its CFA), and where its rbp was saved (0: unchanged).
    let (cfa, saved_bp) = match row_for(w, lookup) {
        Some(row) if row.kind == unwind_kind::END => return 1,
        Some(row) if row.kind == unwind_kind::SIGNAL => {
            // Back into the code the signal interrupted, at its exact instruction. A handler
            // may run on another stack, so sp need not grow here (the loop bound still ends
            // the walk).
            let uc = w.sp;
            let (Some(pc), Some(sp), Some(bp)) = (
                read(w, uc + unwind_kind::UC_RIP),
                read(w, uc + unwind_kind::UC_RSP),
                read(w, uc + unwind_kind::UC_RBP),
            ) else {
                w.flags |= stack_flags::BROKEN;
                return 1;
            };
            w.pc = pc;
            w.sp = sp;
            w.bp = bp;
            // Read (and recorded) from the signal frame.
            w.bp_src = BP_CHECKED;
            w.exact = 1;
            return if push(s, pc) { 0 } else { 1 };
        }
        Some(row) if row.kind <= unwind_kind::PLT => {
            let base = if row.kind == unwind_kind::CFA_RBP {
                use_bp(w);
                w.bp
            } else {
                w.sp
            };
            let mut cfa = base.wrapping_add(u64::from(row.cfa_off));
            if row.kind == unwind_kind::PLT && lookup & 15 >= 11 {
                cfa += 8;
            }
            let saved = if row.rbp_off == 0 {
                0
            } else {
                cfa.wrapping_add_signed(i64::from(row.rbp_off) * 8)
            };
            (cfa, saved)
        }
        // No usable rule here: with --unwind dwarf the stack ends; at a function's first
        // instruction the return address is at [sp]; elsewhere follow the frame pointer.
        _ if config().unwind == unwind_mode::DWARF && w.tables != 0 => {
            w.flags |= stack_flags::BROKEN;
            return 1;
        }
        _ if entry => (w.sp + 8, 0),
        _ => {
            use_bp(w);
            if w.bp == 0 {
                return 1;
            }
            if w.bp < w.sp {
                w.flags |= stack_flags::BROKEN;
                return 1;
            }
            (w.bp + 16, w.bp)
        }
    };
    let Some(ret) = read(w, cfa - 8) else {
        w.flags |= stack_flags::BROKEN;
        return 1;
    };
    let (next_bp, next_src) = if saved_bp == 0 {
        (w.bp, w.bp_src)
    } else {
        // Not recorded now: only if a later step uses it (see `Walk::bp_src`).
        let offset = saved_bp.wrapping_sub(w.start_sp);
        let src = if offset <= u64::from(u16::MAX) {
            offset as u32
        } else {
            w.cacheable = 0;
            BP_CHECKED
        };
        match read_unrecorded(w, saved_bp) {
            Some(bp) => (bp, src),
            None => {
                w.flags |= stack_flags::BROKEN;
                return 1;
            }
        }
    };
    // The stack only grows towards callers; anything else is garbage, and this also
    // guarantees the walk ends.
    if ret == 0 {
        return 1;
    }
    if cfa <= w.sp {
        w.flags |= stack_flags::BROKEN;
        return 1;
    }
    w.pc = ret;
    w.sp = cfa;
    w.bp = next_bp;
    w.bp_src = next_src;
    if push(s, ret) { 0 } else { 1 }
}

/// Captures the user stack of the current task from `regs` for the event with header
/// `event`, and returns its id (0 only if the per-CPU scratch is missing).
///
/// `exact`: `regs.rip` is the instruction about to run (an entry probe, a tracepoint)
/// rather than a return address (a return probe). `at_entry`: it is a function's first
/// instruction.
#[inline(always)]
pub fn capture(regs: *const pt_regs, event: &Header, exact: bool, at_entry: bool) -> u64 {
    let cfg = config();
    let started = if cfg.measure != 0 {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let Some(s) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `regs` is the program's context.
    let (ip, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    // The event's own header serves the stack record too: no extra helper calls.
    let hdr = Header {
        kind: kind::STACK,
        ..*event
    };
    // The mappings the previous walk on this CPU found stay valid for the next walk of the
    // same process, until user space republishes its code.
    let generation = if cfg.unwind == unwind_mode::FP {
        None
    } else {
        // SAFETY: a PROC_CODE value.
        PROC_CODE
            .get_ptr(hdr.pid)
            .map(|code| unsafe { (*code).generation })
    };
    // SAFETY: this CPU's scratch; see `Scratch` for how a preempting walk is detected.
    let ticket = unsafe {
        let reuse = generation.is_some_and(|g| (*s).walk.pid == hdr.pid && (*s).generation == g);
        let (last, prev) = if reuse {
            ((*s).walk.last, (*s).walk.prev)
        } else {
            (NO_MAPPING, NO_MAPPING)
        };
        (*s).generation = generation.unwrap_or(0);
        (*s).users = (*s).users.wrapping_add(1);
        (*s).walk = Walk {
            pc: ip,
            sp,
            bp,
            hash: SEED ^ u64::from(hdr.pid),
            start_sp: sp,
            base: sp & !(CHUNK - 1),
            ticket: (*s).users,
            pid: hdr.pid,
            nr: 0,
            flags: if exact { stack_flags::FIRST_IS_PC } else { 0 },
            exact: u32::from(exact),
            entry: u32::from(at_entry),
            tables: u32::from(generation.is_some()),
            copied: 0,
            failed: 0,
            last,
            prev,
            nreads: 0,
            cacheable: 1,
            read_hash: SEED,
            nranges: 0,
            bp_src: BP_REGISTER,
            bp_reg: 0,
        };
        push(&mut *s, ip);
        (*s).users
    };
    // Keyed by pc and sp only: bp matters only when the walk used it (`bp_reg`).
    let set = cache_set(ip, sp);
    let generation = generation.unwrap_or(0);
    let start = WalkStart {
        pc: ip,
        sp,
        bp,
        pid: hdr.pid,
        generation,
    };
    // Timed walks (benchmarks of the walker) always walk.
    if cfg.measure == 0
        && let Some(id) = cached_walk(s, set, start).or_else(|| cached_walk(s, set | 1, start))
    {
        crate::maps::count(counter::WALK_CACHE_HITS);
        measured(cfg.measure, started, 0);
        return id;
    }
    crate::maps::count(counter::WALKS);
    // SAFETY: as above: a fresh walk, the copied chunks kept.
    unsafe {
        (*s).walk.nreads = 0;
        (*s).walk.cacheable = 1;
        (*s).walk.read_hash = SEED;
    }
    // SAFETY: `step` has the callback signature; it finds its state in the scratch.
    unsafe {
        bpf_loop(
            MAX_FRAMES as u32,
            step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };

    // SAFETY: as above.
    let (nr, flags, hash, intact) = unsafe {
        (
            (*s).walk.nr,
            (*s).walk.flags,
            (*s).walk.hash,
            (*s).users == ticket,
        )
    };
    let id = match finish(hash ^ u64::from(nr)) {
        0 => 1,
        id => id,
    };
    // SAFETY: an element of the array; a torn race only resends a stack.
    if seen_slot(id).is_some_and(|slot| unsafe { *slot } != id) {
        if intact {
            send_frames(hdr, id, nr, flags);
        } else {
            count_drop(drop_reason::STACK_RACE);
        }
    }
    if intact {
        remember_walk(s, victim(set, &start), start, id);
    }
    measured(cfg.measure, started, nr);
    id
}

#[inline(always)]
fn measured(measure: u32, started: u64, frames: u32) {
    if measure != 0
        && let Some(stats) = WALK_STATS.get_ptr_mut(0)
    {
        // SAFETY: per-CPU value; bpf_ktime_get_ns has no preconditions.
        unsafe {
            (*stats).walks += 1;
            (*stats).frames += u64::from(frames);
            (*stats).ns += bpf_ktime_get_ns() - started;
        }
    }
}

/// The stack id of a walk from `k` when a cached walk from the same registers read the same
/// words (see [`CachedWalk`]) and its frames were sent.
///
/// A subprogram: inlined once per way, it would take the caller past the 512-byte BPF
/// stack.
#[inline(never)]
fn cached_walk(s: *mut Scratch, slot: u32, k: WalkStart) -> Option<u64> {
    let e = WALK_CACHE.get_ptr(slot)?;
    // SAFETY: this CPU's cache entry and scratch.
    let (e, s) = unsafe { (&*e, &mut *s) };
    if e.nreads == 0
        || !e.start.same_place(&k)
        || (e.bp_reg != 0 && e.start.bp != k.bp)
        || e.check != entry_check(e)
    {
        return None;
    }
    let (want, id, n) = (e.read_hash, e.stack_id, e.nreads as usize);
    let copy = STACK_COPY.get_ptr_mut(0)?.cast::<u8>();
    // Copy the ranges holding the words the cached walk read, packed.
    for r in 0..CACHED_RANGES {
        if r >= e.nranges as usize {
            break;
        }
        let g = e.ranges[r];
        // SAFETY: `at` and `len` are below `CACHED_BYTES` (16 KiB), masked so the verifier
        // sees it: inside the 32 KiB copy. The helper never faults the target.
        let res = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                copy.add(usize::from(g.at) & (CACHED_BYTES as usize - 1))
                    .cast(),
                u32::from(g.len) & (CACHED_BYTES - 1),
                (k.sp + u64::from(g.offset)) as *const c_void,
            )
        };
        if res != 0 {
            return None;
        }
    }
    let mut hash = SEED;
    for i in 0..CACHED_READS {
        if i >= n {
            break;
        }
        let at = usize::from(e.reads[i]) & (CACHED_BYTES as usize - 1);
        // SAFETY: `at + 8` is inside the copy (see above).
        hash = mix(hash, unsafe {
            core::ptr::read_unaligned(copy.add(at).cast::<u64>())
        });
    }
    let ok = hash == want && s.users == s.walk.ticket;
    // Its frames must have reached user space (a lost stack record is sent again by a walk).
    // SAFETY: an element of the array.
    (ok && seen_slot(id).is_some_and(|v| unsafe { *v } == id)).then_some(id)
}

/// Caches a finished walk that read only words of the copy, with the ranges of the stack
/// that hold them (see [`plan_step`]).
#[inline(always)]
fn remember_walk(s: *mut Scratch, slot: u32, k: WalkStart, id: u64) {
    let Some(e) = WALK_CACHE.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: this CPU's cache entry.
    let e = unsafe { &mut *e };
    e.nreads = 0;
    // SAFETY: this CPU's scratch; the loops' callbacks find it themselves, so no reference
    // to it is held across them.
    let n = unsafe {
        if (*s).walk.cacheable == 0 || (*s).walk.nreads == 0 {
            return;
        }
        (*s).walk.nranges = 0;
        (*s).walk.nreads
    };
    // SAFETY: the callbacks have the bpf_loop signature and take no context.
    unsafe { bpf_loop(n, plan_step as *mut c_void, core::ptr::null_mut(), 0) };
    {
        // SAFETY: as above; this reference ends before the next loop.
        let s = unsafe { &mut *s };
        let mut at = 0u32;
        for r in 0..CACHED_RANGES {
            if r >= s.walk.nranges as usize {
                break;
            }
            s.ranges[r].at = at as u16;
            at += u32::from(s.ranges[r].len);
        }
        if s.walk.cacheable == 0 || at > CACHED_BYTES - 8 {
            return;
        }
    }
    // SAFETY: as above.
    unsafe { bpf_loop(n, place_step as *mut c_void, core::ptr::null_mut(), 0) };
    // SAFETY: as above.
    let s = unsafe { &*s };
    if s.walk.cacheable == 0 {
        return;
    }
    e.start = k;
    e.nranges = s.walk.nranges;
    e.bp_reg = s.walk.bp_reg;
    e.read_hash = s.walk.read_hash;
    e.stack_id = id;
    e.reads = s.reads;
    e.ranges = s.ranges;
    e.nreads = n;
    e.check = entry_check(e);
}

#[inline(always)]
fn send_frames(hdr: Header, id: u64, nr: u32, flags: u32) {
    let Some(scratch) = STACK_SCRATCH.get_ptr(0) else {
        return;
    };
    let Some(mut entry) = EVENTS.reserve::<StackEvent>(0) else {
        count_drop(drop_reason::STACK_RINGBUF);
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points to a reserved, writable StackEvent; `frames` to the scratch.
    unsafe {
        (*record).hdr = hdr;
        (*record).stack_id = id;
        (*record).nr = nr;
        (*record).flags = flags;
        core::ptr::copy_nonoverlapping(&raw const (*scratch).frames, &raw mut (*record).frames, 1);
    }
    // Stacks precede the event that refers to them; that event's wakeup covers both.
    entry.submit(1);
    // Mark it sent only once it really was, so a lost stack is sent again next time.
    if let Some(slot) = seen_slot(id) {
        // SAFETY: as in `capture`.
        unsafe { *slot = id };
    }
}
