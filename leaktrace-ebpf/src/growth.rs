//! Growth mode: which stacks make a process grow, with no allocator probe at all.
//!
//! A write fault on a page the process has no private copy of (first touch of anonymous
//! memory, copy-on-write) is the moment the kernel hands it a new page; `exceptions:
//! page_fault_user` sees it in the faulting thread, whose stack is walked from the faulting
//! instruction. Memory given back is seen at `munmap`, `madvise(MADV_DONTNEED|FREE|REMOVE)`
//! and `brk`. Tracepoints only: whatever the allocator (glibc, jemalloc, Go, a JIT), nothing
//! is trapped, and a process not traced pays the tracepoint's entry alone.
use aya_ebpf::{
    bindings::pt_regs, helpers::bpf_get_current_pid_tgid, macros::tracepoint,
    programs::TracePointContext,
};
use leaktrace_common::{PageEvent, ReleaseEvent, drop_reason, kind, release_op};

use crate::{
    fd::field,
    maps::{TRACED, header_for, send_batched},
    stack,
};

/// Page-fault error code bit (x86): the access was a write.
const PF_WRITE: u64 = 1 << 1;
const PAGE_MASK: u64 = !4095;

const MADV_DONTNEED: i64 = 4;
const MADV_FREE: i64 = 8;
const MADV_REMOVE: i64 = 9;

/// The calling thread's `pid_tgid`, when its process is traced.
#[inline(always)]
fn traced() -> Option<u64> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: presence check only.
    unsafe { TRACED.get((id >> 32) as u32) }.map(|_| id)
}

/// `exceptions:page_fault_user`: address at 8, ip at 16, error_code at 24.
#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    let Some(id) = traced() else { return 0 };
    // SAFETY: offsets from the format.
    let (addr, error) = unsafe { (field::<u64>(&ctx, 8), field::<u64>(&ctx, 24)) };
    // A read fault maps the shared zero page (or a file's page): nothing new for the
    // process. A write fault gives it a page of its own, unless the page was present and
    // writable in another way (a protection fault on a private page is copy-on-write, which
    // also allocates, so PF_PROT is kept).
    if error & PF_WRITE == 0 {
        return 0;
    }
    let hdr = header_for(kind::PAGE, id);
    // SAFETY: the faulting task's user registers, saved on entry to the fault.
    let regs = unsafe {
        let task = aya_ebpf::helpers::generated::bpf_get_current_task_btf();
        aya_ebpf::helpers::generated::bpf_task_pt_regs(task) as *const pt_regs
    };
    if regs.is_null() {
        return 0;
    }
    let stack_id = stack::capture(regs, &hdr, true, false);
    send_batched(
        &PageEvent {
            hdr,
            addr: addr & PAGE_MASK,
            stack_id,
        },
        drop_reason::GROWTH_RINGBUF,
    );
    0
}

#[inline(always)]
fn release(id: u64, start: u64, end: u64, op: u32) {
    send_batched(
        &ReleaseEvent {
            hdr: header_for(kind::RELEASE, id),
            start,
            end,
            op,
            _pad: 0,
        },
        drop_reason::GROWTH_RINGBUF,
    );
}

/// `munmap(addr, len)`: args at 16 and 24. Sent at entry: a fault in the range by another
/// thread after the unmap can only come after this record.
#[tracepoint]
pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
    let Some(id) = traced() else { return 0 };
    // SAFETY: offsets from the format.
    let (addr, len) = unsafe { (field::<u64>(&ctx, 16), field::<u64>(&ctx, 24)) };
    release(id, addr, addr.saturating_add(len), release_op::RANGE);
    0
}

/// `madvise(start, len, behavior)`: args at 16, 24 and 32.
#[tracepoint]
pub fn sys_enter_madvise(ctx: TracePointContext) -> u32 {
    let Some(id) = traced() else { return 0 };
    // SAFETY: offsets from the format.
    let (start, len, advice) = unsafe {
        (
            field::<u64>(&ctx, 16),
            field::<u64>(&ctx, 24),
            field::<i64>(&ctx, 32),
        )
    };
    if matches!(advice, MADV_DONTNEED | MADV_FREE | MADV_REMOVE) {
        release(id, start, start.saturating_add(len), release_op::RANGE);
    }
    0
}

/// `brk` returns the program break now in force.
#[tracepoint]
pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
    let Some(id) = traced() else { return 0 };
    // SAFETY: `ret` at 16 in every sys_exit format.
    let brk = unsafe { field::<u64>(&ctx, 16) };
    release(id, brk, 0, release_op::BRK);
    0
}
