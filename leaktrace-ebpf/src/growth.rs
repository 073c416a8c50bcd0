//! Growth mode: which stacks make a process grow, with no allocator probe at all.
//!
//! A write fault is when the kernel may hand a process new memory. `exceptions:
//! page_fault_user` sees it in the faulting thread and notes where it happened;
//! `exceptions:page_fault_kernel` sees the kernel write to a user address on the thread's
//! behalf (a `read` into a buffer never touched), noted at the system call. While the
//! fault is handled, `kmem:rss_stat` reports the process's new count of anonymous (or
//! shmem) bytes. If that count grew, the growth is charged to the noted fault, and its
//! stack is walked from the faulting instruction (the thread's user registers have not
//! moved). The count tells what the fault gave:
//! - 4 KiB for a page;
//! - 2 MiB for a transparent huge page, which a fault address alone would count as 4 KiB;
//! - nothing for a fault that gave no new memory, such as copy-on-write of a page after
//!   fork, which the process already counted.
//!
//! Memory given back is seen at `munmap`, `madvise(MADV_DONTNEED|FREE|REMOVE)` and `brk`.
//! Tracepoints only: whatever the allocator (glibc, jemalloc, Go, a JIT), nothing is
//! trapped, and a process not traced pays the tracepoints' entries alone.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{Array, LruHashMap},
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use leaktrace_common::{
    PageEvent, ReleaseEvent, drop_reason, kind,
    linux::{
        MADV_DONTNEED, MADV_FREE, MADV_REMOVE, MM_ANONPAGES, MM_SHMEMPAGES, PAGE_SIZE, PF_WRITE,
        USER_END,
    },
    release_op,
};

use crate::{
    fd::{field, task_regs},
    maps::{header_for, send_batched, traced_flags},
    stack,
};

/// The calling thread's `pid_tgid`, when its process is traced.
#[inline(always)]
fn traced() -> Option<u64> {
    let id = bpf_get_current_pid_tgid();
    traced_flags((id >> 32) as u32).map(|_| id)
}

/// A write fault being handled: its thread, where the thread was, and the address.
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingFault {
    tid: u32,
    _pad: u32,
    ip: u64,
    sp: u64,
    addr: u64,
}

const PENDING_SLOTS: u32 = 1 << 14;

/// The write fault each thread is in, in slot `tid % PENDING_SLOTS` (an array, like
/// `INFLIGHT`: no hash-map helper on the fault path). Two threads sharing a slot and
/// faulting at once lose one fault.
#[map]
static PENDING_FAULTS: Array<PendingFault> = Array::with_max_entries(PENDING_SLOTS, 0);

/// A process's last reported memory counts, in bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemCounts {
    /// `rss_stat`'s hash of the mm they belong to: a new one after exec.
    mm_id: u32,
    _pad: u32,
    anon: u64,
    shmem: u64,
}

/// Per traced process (tgid): its last `MM_ANONPAGES` and `MM_SHMEMPAGES`. The exit hook
/// removes the entry. LRU, for node-wide tracing: a process evicted counts its next change
/// as one page, as a new one does.
#[map]
pub static MEM_COUNTS: LruHashMap<u32, MemCounts> = LruHashMap::with_max_entries(16384, 0);

/// `exceptions:page_fault_user`: address at 8, ip at 16, error_code at 24.
#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    note_fault(&ctx)
}

/// `exceptions:page_fault_kernel`, same format: a fault the kernel took on a user address
/// while working for the thread (copying a `read`'s data out, say). The thread's user
/// registers are where it entered the kernel, so the growth goes to that call's stack.
#[tracepoint]
pub fn page_fault_kernel(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the format.
    if unsafe { field::<u64>(&ctx, 8) } >= USER_END {
        return 0;
    }
    note_fault(&ctx)
}

#[inline(always)]
fn note_fault(ctx: &TracePointContext) -> u32 {
    let Some(id) = traced() else { return 0 };
    // SAFETY: offsets from the format.
    let (addr, error) = unsafe { (field::<u64>(ctx, 8), field::<u64>(ctx, 24)) };
    // A read fault maps the shared zero page (or a file's page, or swaps a page back in):
    // nothing new for the process. A write fault may give it memory; `rss_stat` tells.
    if error & PF_WRITE == 0 {
        return 0;
    }
    let Some(regs) = task_regs() else { return 0 };
    let tid = id as u32;
    if let Some(slot) = PENDING_FAULTS.get_ptr_mut(tid % PENDING_SLOTS) {
        // SAFETY: an element of the array; `regs` is the task's saved registers.
        unsafe {
            *slot = PendingFault {
                tid,
                _pad: 0,
                ip: (*regs).rip,
                sp: (*regs).rsp,
                addr,
            };
        }
    }
    0
}

/// `kmem:rss_stat`: mm_id at 8, curr at 12, member at 16, size (bytes) at 24. Reported
/// whenever a counter of an mm changes; `curr` when that mm is the current task's.
#[tracepoint]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the format.
    let (mm_id, curr, member) = unsafe {
        (
            field::<u32>(&ctx, 8),
            field::<u32>(&ctx, 12),
            field::<i32>(&ctx, 16),
        )
    };
    if curr == 0 || (member != MM_ANONPAGES && member != MM_SHMEMPAGES) {
        return 0;
    }
    let Some(id) = traced() else { return 0 };
    // SAFETY: offset from the format.
    let now = unsafe { field::<i64>(&ctx, 24) }.max(0) as u64;
    let pid = (id >> 32) as u32;
    // SAFETY: a value of the map, copied.
    let last = unsafe { MEM_COUNTS.get(pid) }.copied();
    let mut counts = match last {
        Some(c) if c.mm_id == mm_id => c,
        _ => MemCounts {
            mm_id,
            _pad: 0,
            anon: u64::MAX,
            shmem: u64::MAX,
        },
    };
    let before = if member == MM_ANONPAGES {
        core::mem::replace(&mut counts.anon, now)
    } else {
        core::mem::replace(&mut counts.shmem, now)
    };
    if let Err(e) = MEM_COUNTS.insert(pid, counts, 0) {
        debug!(&ctx, "MEM_COUNTS insert failed ({}): pid {}", e, pid);
    }
    // The first count seen for this mm has nothing to compare with: a page, the usual case.
    let grown = if before == u64::MAX {
        PAGE_SIZE
    } else {
        now.saturating_sub(before)
    };
    if grown == 0 {
        return 0;
    }
    // Charged to the write fault this thread is handling, if it is one: the same thread at
    // the same instruction and stack pointer. Memory a system call populates without a fault
    // (`MAP_POPULATE`, `mlock`) is not charged.
    let tid = id as u32;
    let Some(slot) = PENDING_FAULTS.get_ptr_mut(tid % PENDING_SLOTS) else {
        return 0;
    };
    let Some(regs) = task_regs() else { return 0 };
    // SAFETY: an element of the array; `regs` is the task's saved registers.
    let fault = unsafe {
        let f = *slot;
        if f.tid != tid || f.ip != (*regs).rip || f.sp != (*regs).rsp {
            return 0;
        }
        (*slot).tid = 0;
        f
    };
    let align = if grown.is_power_of_two() && grown >= PAGE_SIZE {
        grown
    } else {
        PAGE_SIZE
    };
    let hdr = header_for(kind::PAGE, id);
    let stack_id = stack::capture(regs, &hdr, true, false);
    send_batched(
        &PageEvent {
            hdr,
            addr: fault.addr & !(align - 1),
            stack_id,
            size: grown,
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
