//! Allocator hooks: an entry uprobe per entry point remembers the arguments, the shared
//! return probe `alloc_return` pairs them with the returned block, captures the stack and sends
//! an [`AllocEvent`]; `free_enter` sends a [`FreeEvent`].
//!
//! Allocator functions call each other (glibc's `realloc(NULL, n)` calls `malloc`,
//! `reallocarray` calls `realloc`, an interposed `malloc` may call libc's): only the outermost
//! call of a thread is reported. Depth is tracked per thread in `INFLIGHT`; an entry at a
//! lower stack pointer than the recorded outer one is nested.
use aya_ebpf::{
    EbpfContext as _,
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{AllocEvent, FreeEvent, Inflight, alloc_fn, drop_reason, kind};

use crate::{
    maps::{INFLIGHT, count_drop, header, send_batched},
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

/// True when the current thread is already inside a traced allocator call below `sp`.
#[inline(always)]
fn nested(id: u64, sp: u64) -> Option<*mut Inflight> {
    let outer = INFLIGHT.get_ptr_mut(id)?;
    // SAFETY: map value of this thread; only this thread writes it.
    let o = unsafe { &*outer };
    (o.depth > 0 && sp < o.sp).then_some(outer)
}

#[inline(always)]
fn enter(ctx: &ProbeContext, func: u32, arg: u64, size: u64) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let sp = stack_pointer(ctx.as_ptr().cast());
    if let Some(outer) = nested(id, sp) {
        // SAFETY: as in `nested`.
        unsafe { (*outer).depth += 1 };
        return 0;
    }
    let call = Inflight {
        sp,
        arg,
        size,
        func,
        depth: 1,
    };
    if INFLIGHT.insert(id, call, 0).is_err() {
        count_drop(drop_reason::INFLIGHT_FULL);
    }
    0
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, alloc_fn::MALLOC, 0, arg(&ctx, 0))
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, alloc_fn::VALLOC, 0, arg(&ctx, 0))
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, alloc_fn::PVALLOC, 0, arg(&ctx, 0))
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    let size = arg(&ctx, 0).wrapping_mul(arg(&ctx, 1));
    enter(&ctx, alloc_fn::CALLOC, 0, size)
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, alloc_fn::REALLOC, arg(&ctx, 0), arg(&ctx, 1))
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    let size = arg(&ctx, 1).wrapping_mul(arg(&ctx, 2));
    enter(&ctx, alloc_fn::REALLOCARRAY, arg(&ctx, 0), size)
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    // posix_memalign(void **memptr, size_t alignment, size_t size)
    enter(&ctx, alloc_fn::POSIX_MEMALIGN, arg(&ctx, 0), arg(&ctx, 2))
}

#[uprobe]
pub fn aligned_alloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, alloc_fn::ALIGNED_ALLOC, 0, arg(&ctx, 1))
}

#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, alloc_fn::MEMALIGN, 0, arg(&ctx, 1))
}

/// The return of every allocating entry point.
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(call) = INFLIGHT.get_ptr_mut(id) else {
        // Entered before we attached, or the entry could not be remembered (counted there).
        return 0;
    };
    // SAFETY: map value of this thread.
    let call = unsafe { &mut *call };
    if call.depth > 1 {
        call.depth -= 1;
        return 0;
    }
    let Inflight {
        arg, size, func, ..
    } = *call;
    let _ = INFLIGHT.remove(id);

    let ret: u64 = ctx.ret();
    let (addr, old_addr) = match func {
        alloc_fn::POSIX_MEMALIGN => {
            // Returns 0 on success and stores the block through `memptr`.
            // SAFETY: bpf_probe_read_user never faults the target.
            let addr = if ret as u32 == 0 {
                unsafe { bpf_probe_read_user(arg as *const u64) }.unwrap_or(0)
            } else {
                0
            };
            (addr, 0)
        }
        alloc_fn::REALLOC | alloc_fn::REALLOCARRAY => (ret, arg),
        _ => (ret, 0),
    };
    // A failed call changes nothing, except realloc(p, 0), which frees p and returns NULL.
    if addr == 0 && (old_addr == 0 || size != 0) {
        return 0;
    }
    let hdr = header(kind::ALLOC);
    let stack_id = stack::capture(ctx.as_ptr().cast(), &hdr, false, false);
    let event = AllocEvent {
        hdr,
        addr,
        size,
        old_addr,
        stack_id,
        func,
        _pad: 0,
    };
    send_batched(&event, drop_reason::HEAP_RINGBUF);
    0
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let addr = arg(&ctx, 0);
    if addr == 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    // A free inside realloc belongs to the realloc, which reports it.
    if nested(id, stack_pointer(ctx.as_ptr().cast())).is_some() {
        return 0;
    }
    let event = FreeEvent {
        hdr: header(kind::FREE),
        addr,
    };
    send_batched(&event, drop_reason::HEAP_RINGBUF);
    0
}
