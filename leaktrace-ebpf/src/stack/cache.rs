//! The walk cache: a walk from the same registers over the same stack words is not walked
//! again (see [`CachedWalk`]).
use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_loop, macros::map, maps::PerCpuArray};

use super::{
    copy::STACK_COPY,
    seen::seen_slot,
    walk::{SEED, STACK_SCRATCH, Scratch, Walk, finish, mix},
};

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
pub(super) const CACHED_RANGES: usize = 8;
/// Words closer than this to a range join it: copying the gap costs less than another call.
/// Measured on sqlite3's walks (hit cost against the ranges and bytes copied), a call costs
/// ~170 ns and a byte ~0.04 ns here: gaps under ~4 KiB are cheaper copied.
const RANGE_GAP: u32 = 4096;
/// Most bytes a cached walk's ranges may hold, together: positions in the copy stay below
/// it, so `at + len` stays inside `STACK_COPY` with both masked.
const CACHED_BYTES: u32 = 16 << 10;

/// The most stack words a cached walk may have read (two per frame at most). A power of
/// two: indexes are masked with it, which the verifier follows where a compare may not be.
pub(super) const CACHED_READS: usize = 64;
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
pub(super) struct WalkStart {
    pub(super) pc: u64,
    pub(super) sp: u64,
    pub(super) bp: u64,
    pub(super) pid: u32,
    pub(super) generation: u32,
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
pub(super) fn cache_set(pc: u64, sp: u64) -> u32 {
    (finish(pc ^ sp.rotate_left(17)) % u64::from(CACHED_WALKS)) as u32 & !1
}

/// Which way of `set` a new walk from `k` replaces: one holding a walk from other
/// registers (another key, or nothing), else either.
#[inline(always)]
pub(super) fn victim(set: u32, k: &WalkStart) -> u32 {
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

/// Notes a word the walk read from the copy, for the walk cache.
#[inline(always)]
pub(super) fn record_read(w: &mut Walk, offset: u64, value: u64) {
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

/// The stack id of a walk from `k` when a cached walk from the same registers read the same
/// words (see [`CachedWalk`]) and its frames were sent.
///
/// A subprogram: inlined once per way, it would take the caller past the 512-byte BPF
/// stack.
#[inline(never)]
pub(super) fn cached_walk(s: *mut Scratch, slot: u32, k: WalkStart) -> Option<u64> {
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
pub(super) fn remember_walk(s: *mut Scratch, slot: u32, k: WalkStart, id: u64) {
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
