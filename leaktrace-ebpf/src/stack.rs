//! The one stack walker: every program that needs a stack calls [`capture`].
//!
//! It walks the frame-pointer chain from the user registers, hashes the frames into a stack
//! id, and sends the frames to user space the first time an id is seen (`STACKS_SEEN`).
//! User space keeps the id → frames store, so events carry only the 8-byte id.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_probe_read_user, generated::bpf_loop},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use leaktrace_common::{MAX_FRAMES, StackEvent, drop_reason, kind, stack_flags};

use crate::maps::{EVENTS, count_drop, header};

/// Frames being collected, one buffer per CPU (too large for the 512-byte BPF stack).
///
/// Uprobe programs run with migration disabled but may be preempted on kernels with full
/// preemption, so another task's walk can reuse this CPU's buffer midway. `users` counts
/// walks started here; a walk that finds it changed at the end knows its frames were
/// overwritten and does not send them (its id, hashed privately, is still right).
#[repr(C)]
pub struct Scratch {
    users: u64,
    frames: [u64; MAX_FRAMES],
}

#[map]
static STACK_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Stack ids already sent to user space. When one is evicted it is simply sent again.
#[map]
static STACKS_SEEN: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// Where a walk is: lives on the caller's stack and is handed to each `bpf_loop` step.
#[repr(C)]
struct Walk {
    /// Frame pointer of the frame whose caller comes next.
    bp: u64,
    hash: u64,
    /// `Scratch::users` when this walk started.
    ticket: u64,
    nr: u32,
    flags: u32,
}

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

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
fn push(walk: &mut Walk, frame: u64) -> bool {
    let nr = walk.nr as usize;
    if nr >= MAX_FRAMES {
        walk.flags |= stack_flags::TRUNCATED;
        return false;
    }
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        walk.flags |= stack_flags::BROKEN;
        return false;
    };
    // SAFETY: per-CPU scratch, `nr` checked against the array length above.
    unsafe { (*scratch).frames[nr] = frame };
    walk.nr += 1;
    walk.hash = mix(walk.hash, frame);
    true
}

/// One step of the frame-pointer walk: `[bp]` holds the caller's frame pointer and
/// `[bp + 8]` the return address into the caller. Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn fp_step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` that `capture` passed to bpf_loop.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    if walk.bp == 0 {
        return 1;
    }
    // One helper call per frame: the saved frame pointer and the return address together.
    // SAFETY: bpf_probe_read_user checks the address and never faults the target.
    let Ok([next_bp, ret]) = (unsafe { bpf_probe_read_user(walk.bp as *const [u64; 2]) }) else {
        walk.flags |= stack_flags::BROKEN;
        return 1;
    };
    if ret == 0 || !push(walk, ret) {
        return 1;
    }
    // The chain must climb the stack; anything else is the end or garbage, and this also
    // guarantees the walk terminates.
    if next_bp <= walk.bp {
        return 1;
    }
    walk.bp = next_bp;
    0
}

/// Captures the user stack of the current task from `regs` and returns its id (never 0).
///
/// `at_entry`: the registers are at a function's first instruction, so its caller's return
/// address is at `[sp]` and not yet in the frame-pointer chain.
#[inline(always)]
pub fn capture(regs: *const pt_regs, at_entry: bool) -> u64 {
    // SAFETY: `regs` is the program's context.
    let (ip, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    let hdr = header(kind::STACK);
    let mut walk = Walk {
        bp,
        hash: SEED ^ u64::from(hdr.pid),
        ticket: 0,
        nr: 0,
        flags: 0,
    };
    if let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU value; see `Scratch` for why it is checked again at the end.
        unsafe {
            (*scratch).users = (*scratch).users.wrapping_add(1);
            walk.ticket = (*scratch).users;
        }
    }
    if at_entry {
        walk.flags |= stack_flags::FIRST_IS_PC;
    }
    push(&mut walk, ip);
    if at_entry {
        // SAFETY: as above.
        match unsafe { bpf_probe_read_user(sp as *const u64) } {
            Ok(ret) => {
                push(&mut walk, ret);
            }
            Err(_) => walk.flags |= stack_flags::BROKEN,
        }
    }
    // SAFETY: `fp_step` has the callback signature; `walk` outlives the call.
    unsafe {
        bpf_loop(
            MAX_FRAMES as u32,
            fp_step as *mut c_void,
            (&raw mut walk).cast(),
            0,
        )
    };

    let id = match finish(walk.hash ^ u64::from(walk.nr)) {
        0 => 1,
        id => id,
    };
    // SAFETY: read-only presence check.
    if unsafe { STACKS_SEEN.get(&id) }.is_none() {
        send_frames(hdr, id, &walk);
    }
    id
}

#[inline(always)]
fn send_frames(mut hdr: leaktrace_common::Header, id: u64, walk: &Walk) {
    let Some(scratch) = STACK_SCRATCH.get_ptr(0) else {
        return;
    };
    // SAFETY: per-CPU value.
    if unsafe { (*scratch).users } != walk.ticket {
        count_drop(drop_reason::STACK_RACE);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<StackEvent>(0) else {
        count_drop(drop_reason::STACK_RINGBUF);
        return;
    };
    hdr.kind = kind::STACK;
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points to a reserved, writable StackEvent; `frames` to the scratch.
    unsafe {
        (*record).hdr = hdr;
        (*record).stack_id = id;
        (*record).nr = walk.nr;
        (*record).flags = walk.flags;
        core::ptr::copy_nonoverlapping(&raw const (*scratch).frames, &raw mut (*record).frames, 1);
    }
    // Stacks precede the event that refers to them; that event's wakeup covers both.
    entry.submit(1);
    // Mark it sent only once it really was, so a lost stack is sent again next time.
    let _ = STACKS_SEEN.insert(&id, &1, 0);
}
