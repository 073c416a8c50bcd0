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
use core::ffi::c_void;

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated::bpf_loop},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use leaktrace_common::{
    Config, MAX_CODE_MAPPINGS, MAX_FRAMES, ProcessCode, StackEvent, UnwindRow, WalkStats,
    drop_reason, kind, stack_flags, unwind_kind, unwind_mode,
};

use crate::maps::{EVENTS, count_drop, header};

/// Settings from user space, fixed at load time (the verifier prunes what they turn off).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    unwind: unwind_mode::AUTO,
    measure: 0,
};

#[inline(always)]
fn config() -> Config {
    // SAFETY: a plain read of a global user space may patch before loading.
    unsafe { core::ptr::read_volatile(&raw const CONFIG) }
}

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Every module's unwind rows, one slice per module; user space writes them through mmap
/// and sizes the array at load time.
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1 << 20, BPF_F_MMAPABLE);

/// Per traced process: its executable mappings and their tables.
#[map]
static PROC_CODE: HashMap<u32, ProcessCode> = HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Per-CPU walk timings, when `CONFIG.measure` is set.
#[map]
static WALK_STATS: PerCpuArray<WalkStats> = PerCpuArray::with_max_entries(1, 0);

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
    /// The frame being unwound: its pc (a return address unless `exact`), sp and rbp.
    pc: u64,
    sp: u64,
    bp: u64,
    /// The process's code mappings (null: frame pointers only).
    code: *const ProcessCode,
    hash: u64,
    /// `Scratch::users` when this walk started.
    ticket: u64,
    nr: u32,
    flags: u32,
    /// `pc` is an exact instruction address (the first frame at a probe or tracepoint).
    exact: u32,
    /// `pc` is a function's first instruction: nothing pushed yet.
    entry: u32,
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

/// The unwind row for `pc`, if a table covers it.
#[inline(always)]
fn row_for(code: *const ProcessCode, pc: u64) -> Option<UnwindRow> {
    if code.is_null() {
        return None;
    }
    // SAFETY: `code` points at a PROC_CODE value, looked up by `capture`.
    let len = unsafe { (*code).len } as usize;
    // The last mapping starting at or below pc (mappings are sorted by start).
    let (mut lo, mut hi) = (
        0usize,
        if len < MAX_CODE_MAPPINGS {
            len
        } else {
            MAX_CODE_MAPPINGS
        },
    );
    for _ in 0..8 {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        if mid >= MAX_CODE_MAPPINGS {
            return None;
        }
        // SAFETY: index checked against the array length.
        if unsafe { (*code).mappings[mid].start } <= pc {
            lo = mid + 1
        } else {
            hi = mid
        }
    }
    let i = lo.checked_sub(1)?;
    if i >= MAX_CODE_MAPPINGS {
        return None;
    }
    // SAFETY: as above.
    let m = unsafe { &(*code).mappings[i] };
    if pc >= m.end || m.table_len == 0 {
        return None;
    }
    let rel = pc - m.start + m.offset;
    // The last row with row.pc <= rel.
    let (mut lo, mut hi) = (m.table_start, m.table_start + m.table_len);
    for _ in 0..24 {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        let row = UNWIND_ROWS.get(mid)?;
        if u64::from(row.pc) <= rel {
            lo = mid + 1
        } else {
            hi = mid
        }
    }
    if lo <= m.table_start {
        return None;
    }
    UNWIND_ROWS.get(lo - 1).copied()
}

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the address and never faults the target.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// One step of the walk: finds the caller of `walk.pc` and pushes its return address.
/// Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` that `capture` passed to bpf_loop.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    if walk.nr as usize >= MAX_FRAMES {
        walk.flags |= stack_flags::TRUNCATED;
        return 1;
    }
    // A return address points after its call: look the call itself up.
    let lookup = if walk.exact != 0 {
        walk.pc
    } else {
        walk.pc.wrapping_sub(1)
    };
    let entry = walk.entry != 0;
    walk.exact = 0;
    walk.entry = 0;

    let (cfa, ret, next_bp) = match row_for(walk.code, lookup) {
        Some(row) if row.kind == unwind_kind::END => return 1,
        Some(row) if row.kind <= unwind_kind::PLT => {
            let base = if row.kind == unwind_kind::CFA_RBP {
                walk.bp
            } else {
                walk.sp
            };
            let mut cfa = base.wrapping_add(u64::from(row.cfa_off));
            if row.kind == unwind_kind::PLT && lookup & 15 >= 11 {
                cfa += 8;
            }
            if row.rbp_off == -2 {
                // The usual frame: saved rbp right below the return address, one read.
                // SAFETY: as in `read_u64`.
                let Ok([bp, ret]) = (unsafe { bpf_probe_read_user((cfa - 16) as *const [u64; 2]) })
                else {
                    walk.flags |= stack_flags::BROKEN;
                    return 1;
                };
                (cfa, ret, bp)
            } else {
                let Some(ret) = read_u64(cfa - 8) else {
                    walk.flags |= stack_flags::BROKEN;
                    return 1;
                };
                let bp = if row.rbp_off == 0 {
                    walk.bp
                } else {
                    match read_u64(cfa.wrapping_add_signed(i64::from(row.rbp_off) * 8)) {
                        Some(bp) => bp,
                        None => {
                            walk.flags |= stack_flags::BROKEN;
                            return 1;
                        }
                    }
                };
                (cfa, ret, bp)
            }
        }
        // No usable rule here: with --unwind dwarf the stack ends; at a function's first
        // instruction the return address is at [sp]; elsewhere follow the frame pointer.
        _ if config().unwind == unwind_mode::DWARF && !walk.code.is_null() => {
            walk.flags |= stack_flags::BROKEN;
            return 1;
        }
        _ if entry => {
            let Some(ret) = read_u64(walk.sp) else {
                walk.flags |= stack_flags::BROKEN;
                return 1;
            };
            (walk.sp + 8, ret, walk.bp)
        }
        _ => {
            if walk.bp == 0 {
                return 1;
            }
            if walk.bp < walk.sp {
                walk.flags |= stack_flags::BROKEN;
                return 1;
            }
            // SAFETY: as in `read_u64`.
            let Ok([bp, ret]) = (unsafe { bpf_probe_read_user(walk.bp as *const [u64; 2]) }) else {
                walk.flags |= stack_flags::BROKEN;
                return 1;
            };
            (walk.bp + 16, ret, bp)
        }
    };
    // The stack only grows towards callers; anything else is garbage, and this also
    // guarantees the walk ends.
    if ret == 0 {
        return 1;
    }
    if cfa <= walk.sp {
        walk.flags |= stack_flags::BROKEN;
        return 1;
    }
    if !push(walk, ret) {
        return 1;
    }
    walk.pc = ret;
    walk.sp = cfa;
    walk.bp = next_bp;
    0
}

/// Captures the user stack of the current task from `regs` and returns its id (never 0).
///
/// `exact`: `regs.rip` is the instruction about to run (an entry probe, a tracepoint)
/// rather than a return address (a return probe). `at_entry`: it is a function's first
/// instruction.
#[inline(always)]
pub fn capture(regs: *const pt_regs, exact: bool, at_entry: bool) -> u64 {
    let cfg = config();
    let started = if cfg.measure != 0 {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    // SAFETY: `regs` is the program's context.
    let (ip, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    let hdr = header(kind::STACK);
    let code = if cfg.unwind != unwind_mode::FP {
        PROC_CODE.get_ptr(hdr.pid).unwrap_or(core::ptr::null())
    } else {
        core::ptr::null()
    };
    let mut walk = Walk {
        pc: ip,
        sp,
        bp,
        code,
        hash: SEED ^ u64::from(hdr.pid),
        ticket: 0,
        nr: 0,
        flags: 0,
        exact: u32::from(exact),
        entry: u32::from(at_entry),
    };
    if let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU value; see `Scratch` for why it is checked again at the end.
        unsafe {
            (*scratch).users = (*scratch).users.wrapping_add(1);
            walk.ticket = (*scratch).users;
        }
    }
    if exact {
        walk.flags |= stack_flags::FIRST_IS_PC;
    }
    push(&mut walk, ip);
    // SAFETY: `step` has the callback signature; `walk` outlives the call.
    unsafe {
        bpf_loop(
            MAX_FRAMES as u32,
            step as *mut c_void,
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
    if cfg.measure != 0
        && let Some(stats) = WALK_STATS.get_ptr_mut(0)
    {
        // SAFETY: per-CPU value; bpf_ktime_get_ns has no preconditions.
        unsafe {
            (*stats).walks += 1;
            (*stats).frames += u64::from(walk.nr);
            (*stats).ns += bpf_ktime_get_ns() - started;
        }
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
