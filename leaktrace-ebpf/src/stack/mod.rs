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
//!
//! The parts, in the order a walk uses them:
//! - `config`: the settings user space fixes at load time (`CONFIG`);
//! - `capture` (here): the entry point; tries the walk cache, else walks, then sends;
//! - `cache`: the walk cache, a walk from the same registers over the same words reused;
//! - `walk`: the walk's state and frames in the per-CPU scratch, and the id hash;
//! - `step`: one frame (CFA rules, signal frames, frame-pointer fallback);
//! - `rows`: the unwind row for a pc (`PROC_CODE`, `UNWIND_INDEX`, `UNWIND_ROWS`);
//! - `copy`: reading stack words from a per-CPU copy of the stack's top;
//! - `seen`: sending each stack's frames once (`STACKS_SEEN`).

mod cache;
mod config;
mod copy;
mod rows;
mod seen;
mod step;
mod walk;

use core::ffi::c_void;

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_ktime_get_ns, generated::bpf_loop},
    macros::map,
    maps::PerCpuArray,
};
use leaktrace_common::{
    Header, MAX_FRAMES, WalkStats, counter, drop_reason, kind, stack_flags, unwind_mode,
};

pub use self::config::{features, node_wide_except, sample_bytes};
use self::{
    cache::{WalkStart, cache_set, cached_walk, remember_walk, victim},
    config::config,
    copy::CHUNK,
    rows::PROC_CODE,
    seen::{seen_slot, send_frames},
    step::step,
    walk::{BP_REGISTER, NO_MAPPING, SEED, STACK_SCRATCH, Walk, finish, push},
};
use crate::maps::count_drop;

/// Per-CPU walk timings, when `CONFIG.measure` is set.
#[map]
static WALK_STATS: PerCpuArray<WalkStats> = PerCpuArray::with_max_entries(1, 0);

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
    let heap = event.kind == kind::ALLOC || event.kind == kind::FREE;
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
            send_frames(hdr, id, nr, flags, heap);
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
