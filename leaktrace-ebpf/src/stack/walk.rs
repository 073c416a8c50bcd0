//! A walk's state: where it is, the frames it collected, and the hash that becomes its id.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use leaktrace_common::{CodeMapping, MAX_FRAMES, stack_flags};

use super::cache::{CACHED_RANGES, CACHED_READS, CopyRange, record_read};

/// Where a walk is.
#[repr(C)]
pub(super) struct Walk {
    /// The frame being unwound: its pc (a return address unless `exact`), sp and rbp.
    pub(super) pc: u64,
    pub(super) sp: u64,
    pub(super) bp: u64,
    pub(super) hash: u64,
    /// The stack pointer the walk started from, and the chunk holding it: `STACK_COPY`
    /// mirrors `[base, base + COPY_CHUNKS chunks)`.
    pub(super) start_sp: u64,
    pub(super) base: u64,
    /// `Scratch::users` when this walk started.
    pub(super) ticket: u64,
    pub(super) pid: u32,
    pub(super) nr: u32,
    pub(super) flags: u32,
    /// `pc` is an exact instruction address (the first frame at a probe or tracepoint).
    pub(super) exact: u32,
    /// `pc` is a function's first instruction: nothing pushed yet.
    pub(super) entry: u32,
    /// Unwind tables are in use for this process.
    pub(super) tables: u32,
    /// Chunks of `STACK_COPY` copied (bit per chunk), and chunks that could not be read.
    pub(super) copied: u32,
    pub(super) failed: u32,
    /// The code mapping the previous frame was in, and the one before that (copies: callers
    /// are often in the same module, or back in the one before).
    pub(super) last: CodeMapping,
    pub(super) prev: CodeMapping,
    /// The stack words this walk read, for `WALK_CACHE`: how many, their offsets from
    /// `start_sp` (in `Scratch::reads`), a hash of their values, and whether every read came
    /// from the copy and fit the record.
    pub(super) nreads: u32,
    pub(super) cacheable: u32,
    pub(super) read_hash: u64,
    /// Ranges of the stack planned for the walk cache (see `Scratch::ranges`).
    pub(super) nranges: u32,
    /// Where `bp` came from, until a step uses it: the offset from `start_sp` of the slot
    /// it was loaded from, [`BP_REGISTER`] (the starting register) or [`BP_CHECKED`]. Only
    /// a used bp is part of what a cached walk depends on: in code built without frame
    /// pointers rbp is just another register, holding data that changes call to call.
    pub(super) bp_src: u32,
    /// The starting bp was used.
    pub(super) bp_reg: u32,
}

pub(super) const BP_REGISTER: u32 = u32::MAX;
pub(super) const BP_CHECKED: u32 = u32::MAX - 1;

/// The step is about to use `bp`: make its value part of what the walk depends on.
#[inline(always)]
pub(super) fn use_bp(w: &mut Walk) {
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
    pub(super) users: u64,
    pub(super) walk: Walk,
    /// `ProcessCode::generation` of `walk.pid` when `walk.last`/`walk.prev` were found.
    pub(super) generation: u32,
    pub(super) _pad: u32,
    /// Offsets from the starting sp of the words the walk read (see `Walk::nreads`).
    pub(super) reads: [u16; CACHED_READS],
    /// The ranges of the stack that hold those words, planned for the walk cache.
    pub(super) ranges: [CopyRange; CACHED_RANGES],
    pub(super) frames: [u64; MAX_FRAMES],
}

#[map]
pub(super) static STACK_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

pub(super) const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

pub(super) const NO_MAPPING: CodeMapping = CodeMapping {
    start: 0,
    end: 0,
    offset: 0,
    table_start: 0,
    table_len: 0,
    index_start: 0,
    index_len: 0,
};

#[inline(always)]
pub(super) fn mix(hash: u64, value: u64) -> u64 {
    (hash.rotate_left(5) ^ value).wrapping_mul(0x51_7cc1_b727_220a_95)
}

/// The finalizer of MurmurHash3: spreads every input bit over the whole id.
#[inline(always)]
pub(super) fn finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[inline(always)]
pub(super) fn push(s: &mut Scratch, frame: u64) -> bool {
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
