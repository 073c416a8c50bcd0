//! Descriptor hooks: the exit of every system call that creates or releases a descriptor,
//! and of unlink and rename (for temp files). Tracepoints, not uprobes: no trap.
//!
//! Every program asks first whether the calling process is traced, so the rest of the node
//! pays only the tracepoint's own entry. Arguments come from the task's saved user
//! registers, which the kernel leaves untouched across the call (all but rax, rcx, r11).
//!
//! A record that carries a stack is finished by one program, [`fd_stack`], which every
//! descriptor program tail-calls: the stack walker is verified once for all of them instead
//! of once (or twice) in each, which took the verifier ~3.5 M instructions, ~30 s of load
//! time under load, on kernel 6.18.44.
use aya_ebpf::{
    EbpfContext as _,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, ProgramArray},
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use leaktrace_common::{
    FD_PATH_LEN, FdEvent, FdPathEvent, drop_reason, fd_call, fd_op, features, kind,
    linux::{
        AT_FDCWD, EMFILE, ENFILE, F_DUPFD, F_DUPFD_CLOEXEC, F_SETFD, MFD_CLOEXEC, O_CLOEXEC,
        O_CREAT, O_TMPFILE, RLIMIT_NOFILE,
    },
};

use crate::{
    maps::{EVENTS, count_drop, header, send_batched, traced_flags},
    stack,
};

/// A field of the tracepoint record, loaded directly: the verifier lets a tracepoint
/// program read its context, so no helper call is needed (each costs ~65 ns here).
///
/// # Safety
/// `offset` and `T` must match the tracepoint's format.
#[inline(always)]
pub(crate) unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: the caller's contract; the context is the record.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

/// The syscall's return value (`field:long ret; offset:16` in every sys_exit format).
#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: offset from the sys_exit_* formats.
    unsafe { field::<i64>(ctx, 16) }
}

/// Where the current task's user registers were saved on entry to the kernel (a system
/// call, a fault).
#[inline(always)]
pub(crate) fn task_regs() -> Option<*const pt_regs> {
    // SAFETY: both helpers take the current task.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs };
    (!regs.is_null()).then_some(regs)
}

/// The calling task's user registers as saved at syscall entry.
#[inline(always)]
fn user_regs() -> Option<pt_regs> {
    // SAFETY: the task's saved registers; the read goes through the kernel's fault-tolerant
    // copy.
    task_regs().map(|regs| unsafe { core::ptr::read_volatile(regs) })
}

/// The n-th syscall argument (x86-64: rdi, rsi, rdx, r10, r8, r9).
#[inline(always)]
fn arg(regs: &pt_regs, n: usize) -> u64 {
    match n {
        0 => regs.rdi,
        1 => regs.rsi,
        2 => regs.rdx,
        3 => regs.r10,
        4 => regs.r8,
        _ => regs.r9,
    }
}

#[inline(always)]
fn config_features() -> u32 {
    crate::stack::features()
}

/// True when the calling process is traced: the first thing every program checks.
#[inline(always)]
fn traced() -> bool {
    traced_flags((bpf_get_current_pid_tgid() >> 32) as u32).is_some()
}

/// Sends a descriptor record without a path.
#[inline(always)]
fn send_fd(event: &FdEvent) {
    send_batched(event, drop_reason::FD_RINGBUF);
}

/// Sends a descriptor record with the user-space path at `path`.
#[inline(always)]
fn send_fd_path(event: &FdEvent, path: u64) {
    let Some(mut entry) = EVENTS.reserve::<FdPathEvent>(0) else {
        count_drop(drop_reason::FD_RINGBUF);
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is a reserved, writable FdPathEvent; the path read is bounded by the
    // buffer and never faults the target.
    unsafe {
        (*record).fd = *event;
        (*record).fd.hdr.kind = kind::FD_PATH;
        let buf = &mut *(&raw mut (*record).path);
        if bpf_probe_read_user_str_bytes(path as *const u8, buf).is_err() {
            buf[0] = 0;
        }
        buf[FD_PATH_LEN - 1] = 0;
    }
    entry.submit(0);
}

/// A new record for the current task, with no stack yet.
#[inline(always)]
fn event(op: u16, call: u16) -> FdEvent {
    FdEvent {
        hdr: header(kind::FD),
        op,
        syscall: call,
        fd: -1,
        fd2: -1,
        flags: 0,
        errno: 0,
        dirfd: AT_FDCWD,
        stack_id: 0,
        value: 0,
    }
}

/// How [`fd_stack`] sends a record's path.
mod path_mode {
    /// Never: the record has no path, or only a sample would carry it and it is not one.
    pub const NONE: u32 = 0;
    /// Always (a temp-file candidate: an unlink must match it).
    pub const ALWAYS: u32 = 1;
    /// As one of its stack's first few examples ([`super::sample_path`]).
    pub const SAMPLE: u32 = 2;
}

/// A record left for [`fd_stack`] to walk the stack of and send.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FdPending {
    /// `pid_tgid` of the task that left it: another task's means it was overwritten.
    id: u64,
    event: FdEvent,
    /// User address of the record's path, 0 for none.
    path: u64,
    /// One of [`path_mode`].
    path_mode: u32,
    _pad: u32,
}

/// One pending record per CPU: written just before the tail call, read just after it.
#[map]
static FD_PENDING: PerCpuArray<FdPending> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: [`fd_stack`], put there by user space before any descriptor program is attached.
#[map]
static FD_TAIL: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Finishes `event` in [`fd_stack`]: its stack walked from the task's saved registers (the
/// pc is exact: the instruction after `syscall`, inside the libc wrapper), then sent, with
/// the path at `path` as `mode` says. Returns only if the tail call failed (the slot is
/// empty, which user space never leaves it): then the record goes without its stack.
#[inline(always)]
fn send_with_stack(ctx: &TracePointContext, event: FdEvent, path: u64, mode: u32) {
    if let Some(slot) = FD_PENDING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe {
            *slot = FdPending {
                id: bpf_get_current_pid_tgid(),
                event,
                path,
                path_mode: mode,
                _pad: 0,
            };
            FD_TAIL.tail_call(ctx, 0);
        }
    }
    send_fd(&event);
}

/// The second half of every descriptor program that sends a stack (see the module notes).
/// Loaded, never attached: reached by tail call from the first half, on the same task.
#[tracepoint]
pub fn fd_stack(_ctx: TracePointContext) -> u32 {
    let Some(slot) = FD_PENDING.get_ptr_mut(0) else {
        return 0;
    };
    let id = bpf_get_current_pid_tgid();
    // Worked on in place (a copy would not fit the BPF stack beside the walker's frames);
    // a preempting task's record, before or during the walk, fails the id check.
    // SAFETY: this CPU's slot.
    if unsafe { (*slot).id } != id {
        count_drop(drop_reason::FD_RACE);
        return 0;
    }
    let Some(regs) = task_regs() else { return 0 };
    // SAFETY: as above.
    let stack_id = stack::capture(regs, unsafe { &(*slot).event.hdr }, true, false);
    // SAFETY: as above.
    let pending = unsafe { &mut *slot };
    if pending.id != id {
        count_drop(drop_reason::FD_RACE);
        return 0;
    }
    pending.id = 0;
    pending.event.stack_id = stack_id;
    let with_path = pending.path != 0
        && (pending.path_mode == path_mode::ALWAYS
            || pending.path_mode == path_mode::SAMPLE && sample_path(stack_id));
    if with_path {
        send_fd_path(&pending.event, pending.path);
    } else {
        send_fd(&pending.event);
    }
    0
}

/// A call that failed: only a full descriptor table is worth reporting, at once.
#[inline(always)]
fn failed(ctx: &TracePointContext, call: u16, r: i64) {
    let table_full = r == -i64::from(EMFILE) || r == -i64::from(ENFILE);
    if table_full && config_features() & features::FD != 0 {
        let mut e = event(fd_op::FAIL, call);
        e.errno = -r as i32;
        send_with_stack(ctx, e, 0, path_mode::NONE);
    }
}

/// A descriptor-creating call returned `r`: report it. `path_of` gives the directory
/// descriptor and user address of the path the call opened (address 0: no path; plain
/// values rather than an `Option`, whose padding the verifier would see as uninitialized).
#[inline(always)]
fn created_at(
    ctx: &TracePointContext,
    call: u16,
    flags_of: impl Fn(&pt_regs) -> u32,
    path_of: impl Fn(&pt_regs) -> (i32, u64),
) -> u32 {
    if !traced() {
        return 0;
    }
    let r = ret(ctx);
    let Some(regs) = user_regs() else { return 0 };
    if r < 0 {
        failed(ctx, call, r);
        return 0;
    }
    let flags = flags_of(&regs);
    let (dirfd, path) = path_of(&regs);
    let feats = config_features();
    // (O_TMPFILE carries O_DIRECTORY's bit: a plain opendir is no creation.)
    let unnamed = flags & O_TMPFILE == O_TMPFILE;
    let creates_file = flags & O_CREAT != 0 || unnamed;
    if feats & features::FD == 0 && !(feats & features::TMP != 0 && path != 0 && creates_file) {
        return 0;
    }
    let mut e = event(fd_op::OPEN, call);
    e.fd = r as i32;
    e.flags = flags;
    e.dirfd = dirfd;
    // A file that may be a temp file always carries its path (an unlink must match it);
    // otherwise a stack's first few opens do, as examples. Node-wide, only an unnamed file
    // or one named by an absolute path in a temp directory may be one: every file a node
    // creates (`tar -x`, logs, databases) is not worth a path and a stat each.
    let temp_candidate = feats & features::TMP != 0
        && creates_file
        && (feats & features::NODE == 0 || unnamed || path != 0 && in_temp_dir(path));
    let mode = if temp_candidate {
        path_mode::ALWAYS
    } else {
        path_mode::SAMPLE
    };
    send_with_stack(ctx, e, path, mode);
    0
}

/// Whether the user-space path at `path` names a file in a temp directory (`/tmp/`,
/// `/var/tmp/`, `/dev/shm/`; the list of `leaktrace::track::tmp::TEMP_DIRS`).
#[inline(always)]
fn in_temp_dir(path: u64) -> bool {
    let mut head = [0u8; 10];
    // SAFETY: bounded by the buffer; never faults the target.
    if unsafe { bpf_probe_read_user_str_bytes(path as *const u8, &mut head) }.is_err() {
        return false;
    }
    let starts = |prefix: &[u8]| {
        let mut i = 0;
        while i < prefix.len() {
            if head[i] != prefix[i] {
                return false;
            }
            i += 1;
        }
        true
    };
    starts(b"/tmp/") || starts(b"/var/tmp/") || starts(b"/dev/shm/")
}

/// Paths sent per creating stack as examples (user space keeps up to 5 distinct ones).
const PATHS_PER_STACK: u32 = 8;

/// How many example paths each stack has sent. LRU: a stack evicted just sends a few more.
#[map]
static PATHS_SENT: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// True while `stack` has sent fewer than [`PATHS_PER_STACK`] paths (and counts this one).
#[inline(always)]
fn sample_path(stack: u64) -> bool {
    match PATHS_SENT.get_ptr_mut(&stack) {
        // SAFETY: a map value; a lost increment under concurrency sends one more path.
        Some(n) => unsafe {
            if *n >= PATHS_PER_STACK {
                return false;
            }
            *n += 1;
            true
        },
        None => {
            if let Err(e) = PATHS_SENT.insert(&stack, &1, 0) {
                debug!(&(), "PATHS_SENT insert failed ({}): stack {:x}", e, stack);
            }
            true
        }
    }
}

/// A descriptor-creating call that opens no path.
#[inline(always)]
fn created(ctx: &TracePointContext, call: u16, flags_of: impl Fn(&pt_regs) -> u32) -> u32 {
    created_at(ctx, call, flags_of, |_| (AT_FDCWD, 0))
}

#[tracepoint]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    created_at(
        &ctx,
        fd_call::OPEN,
        |r| arg(r, 1) as u32,
        |r| (AT_FDCWD, arg(r, 0)),
    )
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    created_at(
        &ctx,
        fd_call::OPENAT,
        |r| arg(r, 2) as u32,
        |r| (arg(r, 0) as i32, arg(r, 1)),
    )
}

#[tracepoint]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    // struct open_how { u64 flags; u64 mode; u64 resolve; }
    let flags = |r: &pt_regs| {
        // SAFETY: bpf_probe_read_user never faults the target.
        unsafe { bpf_probe_read_user(arg(r, 2) as *const u64) }.unwrap_or(0) as u32
    };
    created_at(&ctx, fd_call::OPENAT2, flags, |r| {
        (arg(r, 0) as i32, arg(r, 1))
    })
}

#[tracepoint]
pub fn sys_exit_creat(ctx: TracePointContext) -> u32 {
    // creat() is open(path, O_CREAT | O_WRONLY | O_TRUNC).
    created_at(
        &ctx,
        fd_call::CREAT,
        |_| O_CREAT | 0o1 | 0o1000,
        |r| (AT_FDCWD, arg(r, 0)),
    )
}

#[tracepoint]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::SOCKET, |r| arg(r, 1) as u32 & O_CLOEXEC)
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::ACCEPT, |_| 0)
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::ACCEPT4, |r| arg(r, 3) as u32 & O_CLOEXEC)
}

#[tracepoint]
pub fn sys_exit_eventfd(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::EVENTFD, |_| 0)
}

#[tracepoint]
pub fn sys_exit_eventfd2(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::EVENTFD, |r| arg(r, 1) as u32 & O_CLOEXEC)
}

#[tracepoint]
pub fn sys_exit_epoll_create(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::EPOLL_CREATE, |_| 0)
}

#[tracepoint]
pub fn sys_exit_epoll_create1(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::EPOLL_CREATE, |r| {
        arg(r, 0) as u32 & O_CLOEXEC
    })
}

#[tracepoint]
pub fn sys_exit_timerfd_create(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::TIMERFD_CREATE, |r| {
        arg(r, 1) as u32 & O_CLOEXEC
    })
}

/// signalfd(fd, ...) with fd != -1 updates an existing descriptor: nothing is created.
#[inline(always)]
fn signalfd(ctx: &TracePointContext, flags_of: impl Fn(&pt_regs) -> u32) -> u32 {
    if !traced() {
        return 0;
    }
    if user_regs().is_some_and(|r| arg(&r, 0) as i32 != -1) {
        return 0;
    }
    created(ctx, fd_call::SIGNALFD, flags_of)
}

#[tracepoint]
pub fn sys_exit_signalfd(ctx: TracePointContext) -> u32 {
    signalfd(&ctx, |_| 0)
}

#[tracepoint]
pub fn sys_exit_signalfd4(ctx: TracePointContext) -> u32 {
    signalfd(&ctx, |r| arg(r, 3) as u32 & O_CLOEXEC)
}

#[tracepoint]
pub fn sys_exit_memfd_create(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::MEMFD_CREATE, |r| {
        if arg(r, 1) & MFD_CLOEXEC != 0 {
            O_CLOEXEC
        } else {
            0
        }
    })
}

#[tracepoint]
pub fn sys_exit_inotify_init(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::INOTIFY_INIT, |_| 0)
}

#[tracepoint]
pub fn sys_exit_inotify_init1(ctx: TracePointContext) -> u32 {
    created(&ctx, fd_call::INOTIFY_INIT, |r| {
        arg(r, 0) as u32 & O_CLOEXEC
    })
}

/// pipe/pipe2/socketpair return 0 and write two descriptors to user memory.
#[inline(always)]
fn pair(
    ctx: &TracePointContext,
    call: u16,
    fds_arg: usize,
    flags_of: impl Fn(&pt_regs) -> u32,
) -> u32 {
    if !traced() {
        return 0;
    }
    let r = ret(ctx);
    let Some(regs) = user_regs() else { return 0 };
    if r < 0 {
        failed(ctx, call, r);
        return 0;
    }
    if config_features() & features::FD == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user never faults the target.
    let Ok(fds) = (unsafe { bpf_probe_read_user(arg(&regs, fds_arg) as *const [i32; 2]) }) else {
        return 0;
    };
    let mut e = event(fd_op::OPEN, call);
    e.fd = fds[0];
    e.fd2 = fds[1];
    e.flags = flags_of(&regs);
    send_with_stack(ctx, e, 0, path_mode::NONE);
    0
}

#[tracepoint]
pub fn sys_exit_pipe(ctx: TracePointContext) -> u32 {
    pair(&ctx, fd_call::PIPE, 0, |_| 0)
}

#[tracepoint]
pub fn sys_exit_pipe2(ctx: TracePointContext) -> u32 {
    pair(&ctx, fd_call::PIPE2, 0, |r| arg(r, 1) as u32 & O_CLOEXEC)
}

#[tracepoint]
pub fn sys_exit_socketpair(ctx: TracePointContext) -> u32 {
    pair(&ctx, fd_call::SOCKETPAIR, 3, |r| {
        arg(r, 1) as u32 & O_CLOEXEC
    })
}

/// dup/dup2/dup3/fcntl(F_DUPFD*): `ret` duplicates `old` (dup2 and dup3 first close `ret`).
#[inline(always)]
fn duplicated(ctx: &TracePointContext, call: u16, flags_of: impl Fn(&pt_regs) -> u32) -> u32 {
    if !traced() {
        return 0;
    }
    let r = ret(ctx);
    let Some(regs) = user_regs() else { return 0 };
    if r < 0 {
        failed(ctx, call, r);
        return 0;
    }
    if config_features() & features::FD == 0 {
        return 0;
    }
    let mut e = event(fd_op::OPEN, call);
    e.fd = r as i32;
    e.fd2 = arg(&regs, 0) as i32;
    e.flags = flags_of(&regs);
    send_with_stack(ctx, e, 0, path_mode::NONE);
    0
}

#[tracepoint]
pub fn sys_exit_dup(ctx: TracePointContext) -> u32 {
    duplicated(&ctx, fd_call::DUP, |_| 0)
}

#[tracepoint]
pub fn sys_exit_dup2(ctx: TracePointContext) -> u32 {
    duplicated(&ctx, fd_call::DUP2, |_| 0)
}

#[tracepoint]
pub fn sys_exit_dup3(ctx: TracePointContext) -> u32 {
    duplicated(&ctx, fd_call::DUP3, |r| arg(r, 2) as u32 & O_CLOEXEC)
}

#[tracepoint]
pub fn sys_exit_fcntl(ctx: TracePointContext) -> u32 {
    if !traced() || config_features() & features::FD == 0 {
        return 0;
    }
    let Some(regs) = user_regs() else { return 0 };
    match arg(&regs, 1) {
        F_DUPFD => duplicated(&ctx, fd_call::FCNTL, |_| 0),
        F_DUPFD_CLOEXEC => duplicated(&ctx, fd_call::FCNTL, |_| O_CLOEXEC),
        F_SETFD if ret(&ctx) == 0 => {
            let mut e = event(fd_op::SET_CLOEXEC, fd_call::FCNTL);
            e.fd = arg(&regs, 0) as i32;
            e.flags = arg(&regs, 2) as u32;
            send_fd(&e);
            0
        }
        _ => 0,
    }
}

/// At entry, not exit: close releases the descriptor whatever it returns (EBADF aside: then
/// it was not open), and a record sent before the release precedes any reuse of the number
/// by another thread. The argument is in the tracepoint record: no helper call for it.
// field:unsigned int fd;	offset:16;	size:8;	signed:0;
#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    if !traced() || config_features() & (features::FD | features::TMP) == 0 {
        return 0;
    }
    // SAFETY: offset from the format above.
    let fd = unsafe { field::<u64>(&ctx, 16) };
    send_fd(&FdEvent {
        hdr: header(kind::FD),
        op: fd_op::CLOSE,
        syscall: fd_call::CLOSE,
        fd: fd as i32,
        fd2: -1,
        flags: 0,
        errno: 0,
        dirfd: AT_FDCWD,
        stack_id: 0,
        value: 0,
    });
    0
}

#[tracepoint]
pub fn sys_exit_close_range(ctx: TracePointContext) -> u32 {
    if !traced() || config_features() & (features::FD | features::TMP) == 0 || ret(&ctx) != 0 {
        return 0;
    }
    let Some(regs) = user_regs() else { return 0 };
    let mut e = event(fd_op::CLOSE_RANGE, fd_call::CLOSE_RANGE);
    e.fd = arg(&regs, 0) as i32;
    // `last` is often ~0U: keep it as the largest descriptor.
    e.fd2 = arg(&regs, 1).min(i32::MAX as u64) as i32;
    e.flags = arg(&regs, 2) as u32;
    send_fd(&e);
    0
}

/// A new soft `RLIMIT_NOFILE` for `target` (0: the caller), read from the user's struct.
#[inline(always)]
fn nofile_limit(call: u16, target: u64, resource: u64, new_limit: u64) {
    if resource != RLIMIT_NOFILE || new_limit == 0 {
        return;
    }
    // SAFETY: bpf_probe_read_user never faults the target. struct rlimit { cur, max }.
    let Ok(soft) = (unsafe { bpf_probe_read_user(new_limit as *const u64) }) else {
        return;
    };
    let mut e = event(fd_op::NOFILE_LIMIT, call);
    e.fd2 = target as i32;
    e.value = soft;
    send_fd(&e);
}

#[tracepoint]
pub fn sys_exit_setrlimit(ctx: TracePointContext) -> u32 {
    if !traced() || config_features() & features::FD == 0 || ret(&ctx) != 0 {
        return 0;
    }
    if let Some(r) = user_regs() {
        nofile_limit(fd_call::SETRLIMIT, 0, arg(&r, 0), arg(&r, 1));
    }
    0
}

#[tracepoint]
pub fn sys_exit_prlimit64(ctx: TracePointContext) -> u32 {
    if !traced() || config_features() & features::FD == 0 || ret(&ctx) != 0 {
        return 0;
    }
    if let Some(r) = user_regs() {
        nofile_limit(fd_call::PRLIMIT64, arg(&r, 0), arg(&r, 1), arg(&r, 2));
    }
    0
}

/// A path stopped naming what it named: unlink, or either side of a rename.
#[inline(always)]
fn path_gone(op: u16, call: u16, dirfd: i32, path: u64) {
    let mut e = event(op, call);
    e.dirfd = dirfd;
    send_fd_path(&e, path);
}

#[inline(always)]
fn tmp_call(ctx: &TracePointContext) -> Option<pt_regs> {
    if !traced() || config_features() & features::TMP == 0 || ret(ctx) != 0 {
        return None;
    }
    user_regs()
}

#[tracepoint]
pub fn sys_exit_unlink(ctx: TracePointContext) -> u32 {
    if let Some(r) = tmp_call(&ctx) {
        path_gone(fd_op::UNLINK, fd_call::UNLINK, AT_FDCWD, arg(&r, 0));
    }
    0
}

#[tracepoint]
pub fn sys_exit_unlinkat(ctx: TracePointContext) -> u32 {
    if let Some(r) = tmp_call(&ctx) {
        path_gone(
            fd_op::UNLINK,
            fd_call::UNLINKAT,
            arg(&r, 0) as i32,
            arg(&r, 1),
        );
    }
    0
}

#[tracepoint]
pub fn sys_exit_rename(ctx: TracePointContext) -> u32 {
    if let Some(r) = tmp_call(&ctx) {
        path_gone(fd_op::RENAME_FROM, fd_call::RENAME, AT_FDCWD, arg(&r, 0));
        path_gone(fd_op::RENAME_TO, fd_call::RENAME, AT_FDCWD, arg(&r, 1));
    }
    0
}

#[inline(always)]
fn renameat(ctx: &TracePointContext, call: u16) -> u32 {
    if let Some(r) = tmp_call(ctx) {
        path_gone(fd_op::RENAME_FROM, call, arg(&r, 0) as i32, arg(&r, 1));
        path_gone(fd_op::RENAME_TO, call, arg(&r, 2) as i32, arg(&r, 3));
    }
    0
}

#[tracepoint]
pub fn sys_exit_renameat(ctx: TracePointContext) -> u32 {
    renameat(&ctx, fd_call::RENAMEAT)
}

#[tracepoint]
pub fn sys_exit_renameat2(ctx: TracePointContext) -> u32 {
    renameat(&ctx, fd_call::RENAMEAT2)
}
