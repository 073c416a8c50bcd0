//! One step of the walk: the caller of the current frame, by its unwind row (CFA rules,
//! signal frames) or, without one, by the frame pointer.
//!
//! Where the walk breaks off early (`stack_flags::BROKEN`) it logs why at debug level
//! (`-vv`). Only those paths log. With the level off (the default) the log macro stops at
//! its level check, before reserving anything; the level is a frozen read-only global, so
//! the verifier knows that branch is never taken and does not even explore it.
use core::ffi::c_void;

use aya_log_ebpf::debug;
use leaktrace_common::{MAX_FRAMES, stack_flags, unwind_kind, unwind_mode};

use super::{
    config::config,
    copy::{read, read_unrecorded},
    rows::row_for,
    walk::{BP_CHECKED, STACK_SCRATCH, push, use_bp},
};

/// One step of the walk: finds the caller of the current frame and pushes its return
/// address. Returns 1 to stop the loop.
#[inline(never)]
pub(super) extern "C" fn step(_index: u32, _ctx: *mut c_void) -> i64 {
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
                debug!(
                    &(),
                    "stack walk broken at pc {:x}: signal frame at {:x} unreadable", lookup, uc
                );
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
            debug!(&(), "stack walk broken at pc {:x}: no unwind row", lookup);
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
                debug!(
                    &(),
                    "stack walk broken at pc {:x}: frame pointer {:x} below sp {:x}",
                    lookup,
                    w.bp,
                    w.sp
                );
                return 1;
            }
            (w.bp + 16, w.bp)
        }
    };
    let Some(ret) = read(w, cfa - 8) else {
        w.flags |= stack_flags::BROKEN;
        debug!(
            &(),
            "stack walk broken at pc {:x}: return address at {:x} unreadable",
            lookup,
            cfa - 8
        );
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
                debug!(
                    &(),
                    "stack walk broken at pc {:x}: saved rbp at {:x} unreadable", lookup, saved_bp
                );
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
        debug!(
            &(),
            "stack walk broken at pc {:x}: CFA {:x} not above sp {:x}", lookup, cfa, w.sp
        );
        return 1;
    }
    w.pc = ret;
    w.sp = cfa;
    w.bp = next_bp;
    w.bp_src = next_src;
    if push(s, ret) { 0 } else { 1 }
}
