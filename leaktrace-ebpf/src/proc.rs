//! Process lifecycle: exec, exit and fork of traced processes, and the loader gate.
//!
//! Lifecycle records travel in the same ring buffer as heap records, so user space sees them
//! in order: every allocation a process made before it exec'd or died comes first.
//!
//! Gating: for processes flagged [`traced_flags::GATE`] (those `leaktrace run` started), the
//! hook stops the process with `SIGSTOP` and sends the record, so user space can attach the
//! allocator probes of a new image or a new child before any of its code runs; user space
//! sends `SIGCONT`. A record that cannot be sent never leaves the process stopped.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_send_signal},
    macros::{tracepoint, uprobe},
    programs::{ProbeContext, TracePointContext},
};
use aya_log_ebpf::debug;
use leaktrace_common::{
    ProcEvent, drop_reason, header_flags, kind,
    linux::{SIGCONT, SIGSTOP},
    traced_flags,
};

use crate::maps::{PENDING_FORKS, TRACED, header, inflight_slot, send_now, traced_flags};

#[inline(always)]
fn traced(pid: u32) -> Option<u32> {
    traced_flags(pid)
}

/// Sends a lifecycle record for the current process and, if it is gated, stops it.
#[inline(always)]
fn notify(kind: u16, flags: u32, other_pid: u32) {
    let mut event = ProcEvent {
        hdr: header(kind),
        other_pid,
        _pad: 0,
    };
    let gate = flags & traced_flags::GATE != 0;
    if gate {
        event.hdr.flags |= header_flags::STOPPED;
        // Stop first, then tell: user space may read the record and send SIGCONT before
        // this program's next instruction (it can be preempted), and a SIGCONT that comes
        // before the SIGSTOP is queued would leave the process stopped for good.
        // SAFETY: no preconditions; the signal goes to the current process.
        unsafe { bpf_send_signal(SIGSTOP) };
    }
    if !send_now(&event, drop_reason::PROC_RINGBUF) && gate {
        // Nobody will be told to continue it: a SIGCONT discards the pending SIGSTOP.
        // SAFETY: as above.
        unsafe { bpf_send_signal(SIGCONT) };
    }
}

// name: sched_process_exec
// field:__data_loc char[] filename;	offset:8;	size:4;	signed:0;
// field:pid_t pid;	offset:12;	size:4;	signed:1;
// field:pid_t old_pid;	offset:16;	size:4;	signed:1;
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(flags) = traced(pid) {
        notify(kind::EXEC, flags, 0);
    }
    0
}

// name: sched_process_exit
// field:char comm[16];	offset:8;	size:16;	signed:0;
// field:pid_t pid;	offset:24;	size:4;	signed:1;
// field:int prio;	offset:28;	size:4;	signed:1;
// field:bool group_dead;	offset:32;	size:1;	signed:0;
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let pid = (id >> 32) as u32;
    if traced(pid).is_none() {
        return 0;
    }
    // A new thread given this id must not look on its way out.
    crate::maps::set_thread_exiting(id as u32, false);
    // A thread that dies inside the allocator never returns: forget its call.
    if let Some(slot) = inflight_slot(id as u32) {
        // SAFETY: the slot of this thread (or of another; then it is left alone).
        unsafe {
            if (*slot).tid == id as u32 {
                (*slot).depth = 0;
            }
        }
    }
    // SAFETY: offset from the format above.
    let group_dead: u8 = unsafe { ctx.read_at(32) }.unwrap_or(0);
    if group_dead != 0 {
        // The pid may be reused at once: stop treating it as traced before anything else.
        let _ = TRACED.remove(pid);
        let _ = crate::growth::MEM_COUNTS.remove(pid);
        notify(kind::EXIT, 0, 0);
    }
    0
}

// name: sched_process_fork (runs in the parent)
// field:pid_t parent_pid;	offset:12;	size:4;	signed:1;
// field:pid_t child_pid;	offset:20;	size:4;	signed:1;
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(flags) = traced(parent) else {
        return 0;
    };
    if flags & traced_flags::FOLLOW_FORKS == 0 {
        return 0;
    }
    // SAFETY: offset from the format above.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(20) }) else {
        return 0;
    };
    if let Err(e) = PENDING_FORKS.insert(child, parent, 0) {
        debug!(
            &ctx,
            "PENDING_FORKS insert failed ({}): child {} of {} not followed", e, child, parent
        );
    }
    0
}

/// The child's first return to user space, from `clone`, `clone3`, `fork` or `vfork`:
/// a new process (not a thread) of a followed parent becomes traced and, if gated, stops
/// before its first instruction.
///
/// name: sys_exit_clone (and friends)
/// field:long ret;	offset:16;	size:8;	signed:1;
#[inline(always)]
fn fork_child_return(ctx: &TracePointContext) -> u32 {
    // SAFETY: offset from the format above.
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if ret != 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let (pid, tid) = ((id >> 32) as u32, id as u32);
    // SAFETY: plain read of a u32 value.
    let Some(parent) = (unsafe { PENDING_FORKS.get(tid) }).copied() else {
        return 0;
    };
    let _ = PENDING_FORKS.remove(tid);
    if pid != tid {
        return 0; // a new thread: it shares the traced address space already
    }
    let Some(flags) = traced(parent) else {
        return 0;
    };
    match TRACED.insert(pid, flags, 0) {
        Ok(()) => notify(kind::FORK, flags, parent),
        Err(e) => debug!(
            ctx,
            "TRACED insert failed ({}): child {} of {} not traced", e, pid, parent
        ),
    }
    0
}

#[tracepoint]
pub fn sys_exit_clone(ctx: TracePointContext) -> u32 {
    fork_child_return(&ctx)
}

#[tracepoint]
pub fn sys_exit_clone3(ctx: TracePointContext) -> u32 {
    fork_child_return(&ctx)
}

#[tracepoint]
pub fn sys_exit_fork(ctx: TracePointContext) -> u32 {
    fork_child_return(&ctx)
}

#[tracepoint]
pub fn sys_exit_vfork(ctx: TracePointContext) -> u32 {
    fork_child_return(&ctx)
}

/// The dynamic loader's `_dl_debug_state`, which it calls whenever its list of loaded
/// objects changes (the hook debuggers use). Attached per traced process.
#[uprobe]
pub fn loader_state(_ctx: ProbeContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let flags = traced(pid).unwrap_or(0);
    notify(kind::LOADER, flags, 0);
    0
}
