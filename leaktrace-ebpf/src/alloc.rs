//! Allocator hooks: an entry uprobe per entry point remembers the arguments, the shared
//! return probe `alloc_return` pairs them with the returned block, captures the stack and sends
//! an [`AllocEvent`]; `free_enter` sends a [`FreeEvent`]. Attached with uprobe_multi links,
//! `alloc_enter_multi` is every entry program at once, the function's shape its attach cookie.
//!
//! Allocator functions call each other (glibc's `realloc(NULL, n)` calls `malloc`,
//! `reallocarray` calls `realloc`, an interposed `malloc` may call libc's): only the outermost
//! call of a thread is reported. Depth is tracked per thread in `INFLIGHT`; an entry at a
//! lower stack pointer than the recorded outer one is nested.
//!
//! User space attaches these where the kernel emulates the probed instruction
//! (`leaktrace::targets::probe_point`), not always at the first byte of the function.
use aya_ebpf::{
    EbpfContext as _,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{
    AllocEvent, FreeEvent, Inflight, alloc_shape, counter, drop_reason, header_flags, kind,
};

use crate::{
    maps::{
        addr_maybe_seen, addr_seen, count, count_drop, header_for, inflight_slot, send_heap,
        set_thread_exiting, thread_exiting,
    },
    stack,
};

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

#[inline(always)]
fn stack_pointer(regs: *const pt_regs) -> u64 {
    // SAFETY: `regs` is the program's context.
    unsafe { (*regs).rsp }
}

/// The current thread's in-flight slot, when it is inside a traced allocator call entered
/// above `sp` (so a call at `sp` is nested in it).
#[inline(always)]
fn nested(tid: u32, sp: u64) -> Option<*mut Inflight> {
    let slot = inflight_slot(tid)?;
    // SAFETY: an INFLIGHT element; only its owning thread writes it (see INFLIGHT_SLOTS).
    let o = unsafe { &*slot };
    (o.tid == tid && o.depth > 0 && sp < o.sp).then_some(slot)
}

#[inline(always)]
fn enter(ctx: &ProbeContext, shape: u32, arg: u64, size: u64) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let sp = stack_pointer(ctx.as_ptr().cast());
    let Some(slot) = inflight_slot(tid) else {
        return 0;
    };
    // SAFETY: as in `nested`.
    let o = unsafe { &mut *slot };
    if o.depth > 0 {
        if o.tid == tid {
            if sp < o.sp {
                o.depth += 1;
                return 0;
            }
            // Left without returning (a thread unwound by an exception or longjmp through
            // an allocator hook): start over.
        } else {
            // Another thread's call is in flight in this slot; it will not be paired.
            count_drop(drop_reason::INFLIGHT_FULL);
        }
    }
    *o = Inflight {
        tid,
        _pad: 0,
        sp,
        arg,
        size,
        shape,
        depth: 1,
    };
    0
}

// One entry program per argument shape (`leaktrace_common::alloc_shape`); the allocator
// catalogue (`ALLOCATOR_FNS`) says which function has which shape. Attached with uprobe_multi
// links, one program serves them all and reads the shape from the attach cookie.

/// The entry of an allocator function of `shape`: remembers an allocating call's arguments,
/// or reports a free. Counted in [`counter::PROBE_HITS`].
#[inline(always)]
fn entry(ctx: &ProbeContext, shape: u32) -> u32 {
    count(counter::PROBE_HITS);
    match shape {
        alloc_shape::SIZE => enter(ctx, shape, 0, arg(ctx, 0)),
        alloc_shape::COUNT_SIZE => {
            let size = arg(ctx, 0).wrapping_mul(arg(ctx, 1));
            enter(ctx, shape, 0, size)
        }
        alloc_shape::RESIZE => enter(ctx, shape, arg(ctx, 0), arg(ctx, 1)),
        alloc_shape::RESIZE_ARRAY => {
            let size = arg(ctx, 1).wrapping_mul(arg(ctx, 2));
            enter(ctx, shape, arg(ctx, 0), size)
        }
        alloc_shape::OUT_ALIGN_SIZE => enter(ctx, shape, arg(ctx, 0), arg(ctx, 2)),
        alloc_shape::ALIGN_SIZE => enter(ctx, shape, 0, arg(ctx, 1)),
        alloc_shape::FREE => free(ctx),
        alloc_shape::THREAD_EXIT => {
            set_thread_exiting(bpf_get_current_pid_tgid() as u32, true);
            0
        }
        _ => 0,
    }
}

/// Every allocator entry point of a module, on one uprobe_multi link: the attach cookie of
/// each probed offset is the function's [`alloc_shape`].
#[uprobe]
pub fn alloc_enter_multi(ctx: ProbeContext) -> u32 {
    // SAFETY: the context is the program's own; the kernel answers 0 where no cookie was set.
    let shape = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    entry(&ctx, shape)
}

/// `p = f(size)`.
#[uprobe]
pub fn size_enter(ctx: ProbeContext) -> u32 {
    entry(&ctx, alloc_shape::SIZE)
}

/// `p = f(nmemb, size)`.
#[uprobe]
pub fn count_size_enter(ctx: ProbeContext) -> u32 {
    entry(&ctx, alloc_shape::COUNT_SIZE)
}

/// `q = f(p, size)`.
#[uprobe]
pub fn resize_enter(ctx: ProbeContext) -> u32 {
    entry(&ctx, alloc_shape::RESIZE)
}

/// `q = f(p, nmemb, size)`.
#[uprobe]
pub fn resize_array_enter(ctx: ProbeContext) -> u32 {
    entry(&ctx, alloc_shape::RESIZE_ARRAY)
}

/// `err = f(&p, alignment, size)`.
#[uprobe]
pub fn out_align_size_enter(ctx: ProbeContext) -> u32 {
    entry(&ctx, alloc_shape::OUT_ALIGN_SIZE)
}

/// `p = f(alignment, size)`.
#[uprobe]
pub fn align_size_enter(ctx: ProbeContext) -> u32 {
    entry(&ctx, alloc_shape::ALIGN_SIZE)
}

/// A thread's way out (glibc's `__call_tls_dtors`).
#[uprobe]
pub fn thread_exit_enter(ctx: ProbeContext) -> u32 {
    entry(&ctx, alloc_shape::THREAD_EXIT)
}

/// The return of every allocating entry point. Loaded for perf-event uprobes or for a
/// uprobe_multi return link (over all of a module's allocating functions at once), as the
/// attach mode says: its body needs nothing from either.
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tid = id as u32;
    let Some(slot) = inflight_slot(tid) else {
        return 0;
    };
    // SAFETY: an INFLIGHT element of this thread, checked below.
    let call = unsafe { &mut *slot };
    if call.tid != tid || call.depth == 0 {
        // Entered before we attached, or another thread took the slot (counted there).
        return 0;
    }
    if call.depth > 1 {
        call.depth -= 1;
        return 0;
    }
    call.depth = 0;
    let Inflight {
        arg, size, shape, ..
    } = *call;

    let ret: u64 = ctx.ret();
    let (addr, old_addr) = match shape {
        alloc_shape::OUT_ALIGN_SIZE => {
            // Returns 0 on success and stores the block through `memptr`.
            // SAFETY: bpf_probe_read_user never faults the target.
            let addr = if ret as u32 == 0 {
                unsafe { bpf_probe_read_user(arg as *const u64) }.unwrap_or(0)
            } else {
                0
            };
            (addr, 0)
        }
        alloc_shape::RESIZE | alloc_shape::RESIZE_ARRAY => (ret, arg),
        _ => (ret, 0),
    };
    // A failed call changes nothing, except realloc(p, 0), which frees p and returns NULL.
    if addr == 0 && (old_addr == 0 || size != 0) {
        return 0;
    }
    let sample = u64::from(stack::sample_bytes());
    if sample != 0 && size < sample {
        // Size-weighted sampling: kept with probability size / sample. Skipped, the block
        // costs no walk and no record, and its free is filtered out like any never seen.
        // SAFETY: no preconditions.
        let draw = u64::from(unsafe { bpf_get_prandom_u32() });
        if draw * sample >= size << 32 {
            // realloc still released its old block, which may be a sampled one.
            if old_addr != 0 && addr_maybe_seen(old_addr) {
                let event = FreeEvent {
                    hdr: header_for(kind::FREE, id),
                    addr: old_addr,
                };
                send_heap(&event, drop_reason::HEAP_RINGBUF);
            }
            return 0;
        }
    }
    if addr != 0 {
        addr_seen(addr);
    }
    let hdr = header_for(kind::ALLOC, id);
    let stack_id = stack::capture(ctx.as_ptr().cast(), &hdr, false, false);
    let event = AllocEvent {
        hdr,
        addr,
        size,
        old_addr,
        stack_id,
        shape,
        _pad: 0,
    };
    send_heap(&event, drop_reason::HEAP_RINGBUF);
    0
}

/// `free`, at its probe point (past glibc's `test %rdi,%rdi`, with `%rdi` intact).
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    entry(&ctx, alloc_shape::FREE)
}

/// A free: reported unless nested in a traced call or of an address never handed out.
#[inline(always)]
fn free(ctx: &ProbeContext) -> u32 {
    let addr = arg(ctx, 0);
    if addr == 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    // A free inside realloc belongs to the realloc, which reports it.
    if nested(id as u32, stack_pointer(ctx.as_ptr().cast())).is_some() {
        return 0;
    }
    let exiting = thread_exiting(id as u32);
    // Nothing traced ever returned it: no user-space work to do but count it.
    if !addr_maybe_seen(addr) {
        count(if exiting {
            counter::THREAD_EXIT_FREES
        } else {
            counter::FILTERED_FREES
        });
        return 0;
    }
    let mut hdr = header_for(kind::FREE, id);
    if exiting {
        hdr.flags |= header_flags::THREAD_EXIT;
    }
    let event = FreeEvent { hdr, addr };
    send_heap(&event, drop_reason::HEAP_RINGBUF);
    0
}

/// Nothing at all: attached instead of the real programs by `--mode floor`, the benchmark's
/// floor (what the traps alone cost).
#[uprobe]
pub fn empty(_ctx: ProbeContext) -> u32 {
    0
}

/// Nothing, on return (`--mode floor-return`: what a return probe adds).
#[uretprobe]
pub fn empty_return(_ctx: RetProbeContext) -> u32 {
    0
}
