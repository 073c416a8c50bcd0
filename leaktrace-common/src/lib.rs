//! The contract between leaktrace's eBPF programs and its user space.
//!
//! Every record that crosses the ring buffer starts with a [`Header`] whose `kind` says which
//! struct follows. All types are `#[repr(C)]`, `Copy`, padded explicitly and free of `bool`s
//! and Rust enums, so both sides agree on every byte. Sizes are checked at compile time.
#![no_std]

use core::mem::size_of;

mod catalogue;
pub mod linux;
pub mod names;
pub mod python;

pub use catalogue::{
    ALLOCATOR_FNS, AllocatorFn, TRACEPOINTS, Tracepoint, alloc_shape, arg_regs, hook_family,
};

/// Most frames a stack can hold (the kernel's own `PERF_MAX_STACK_DEPTH`).
pub const MAX_FRAMES: usize = 127;

/// Record kinds, the `kind` field of [`Header`].
pub mod kind {
    /// An allocation: malloc, calloc, realloc, posix_memalign, … ([`super::AllocEvent`]).
    pub const ALLOC: u16 = 1;
    /// A block was released with `free` ([`super::FreeEvent`]).
    pub const FREE: u16 = 2;
    /// The frames behind a stack id, sent once per stack ([`super::StackEvent`]).
    pub const STACK: u16 = 3;
    /// A traced process replaced its image with `execve` ([`super::ProcEvent`]).
    pub const EXEC: u16 = 4;
    /// The last thread of a traced process exited ([`super::ProcEvent`]).
    pub const EXIT: u16 = 5;
    /// A traced process forked a child that is now traced too ([`super::ProcEvent`]).
    pub const FORK: u16 = 6;
    /// The dynamic loader of a traced process changed its list of loaded objects
    /// (`_dl_debug_state`, called around `dlopen`/`dlclose` and at start-up) ([`super::ProcEvent`]).
    pub const LOADER: u16 = 7;
    /// A descriptor was created, closed or failed to be created ([`super::FdEvent`]).
    pub const FD: u16 = 8;
    /// The same, with a path: opens of files, unlinks, renames ([`super::FdPathEvent`]).
    pub const FD_PATH: u16 = 9;
    /// The OOM killer chose a victim, traced or not ([`super::OomEvent`]).
    pub const OOM: u16 = 10;
    /// Growth mode: a traced process wrote to a page it had no private copy of, so the
    /// kernel gave it a new one ([`super::PageEvent`]).
    pub const PAGE: u16 = 11;
    /// Growth mode: a traced process gave memory back, `munmap`, `madvise(DONTNEED|FREE|
    /// REMOVE)` or a lower `brk` ([`super::ReleaseEvent`]).
    pub const RELEASE: u16 = 12;
}

/// Memory a traced process was given by a write fault (kind [`kind::PAGE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageEvent {
    /// Kind [`kind::PAGE`]; pid and tid of the faulting thread.
    pub hdr: Header,
    /// Where it starts: the faulting address rounded down to `size` when that is a power of
    /// two (a 4 KiB page, a transparent huge page), else to 4 KiB.
    pub addr: u64,
    /// The stack that touched it; `frames[0]` is the faulting instruction.
    pub stack_id: u64,
    /// Bytes the fault added to the process's anonymous (or shmem) memory.
    pub size: u64,
}
const _: () = assert!(size_of::<PageEvent>() == 48);

/// Memory a traced process released (kind [`kind::RELEASE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseEvent {
    /// Kind [`kind::RELEASE`].
    pub hdr: Header,
    /// `[start, end)` released; for [`release_op::BRK`], `start` is the new program break.
    pub start: u64,
    /// End of the released range, exclusive; 0 for [`release_op::BRK`].
    pub end: u64,
    /// One of [`release_op`].
    pub op: u32,
    /// Explicit padding to 8 bytes; not read.
    pub _pad: u32,
}
const _: () = assert!(size_of::<ReleaseEvent>() == 48);

/// What a [`ReleaseEvent`] is.
pub mod release_op {
    /// `munmap` or `madvise`: `[start, end)` is gone.
    pub const RANGE: u32 = 0;
    /// `brk` returned `start`: what lay above it (up to the previous break) is gone.
    pub const BRK: u32 = 1;
}

/// Bits of [`Header::flags`].
pub mod header_flags {
    /// The program stopped the process (`SIGSTOP`) so user space can attach probes before it
    /// runs on; user space must send `SIGCONT` once it has acted on the record.
    pub const STOPPED: u16 = 1 << 0;
    /// A free made by a thread on its way out (see [`super::alloc_shape::THREAD_EXIT`]): when
    /// it frees a block never seen allocated, glibc is handing the thread's cache back.
    pub const THREAD_EXIT: u16 = 1 << 1;
}

/// The first bytes of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// One of [`kind`].
    pub kind: u16,
    /// Bits of [`header_flags`].
    pub flags: u16,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// Explicit padding so `ts_ns` is 8-aligned; not read.
    pub _pad: u32,
    /// `CLOCK_MONOTONIC` time of the event, in nanoseconds.
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<Header>() == 24);

/// A block handed out by the allocator (kind [`kind::ALLOC`]).
///
/// `realloc` and `reallocarray` set `old_addr`; user space applies C's rules: a non-null
/// `addr` replaces `old_addr`, a null `addr` with `size == 0` means `old_addr` was freed,
/// a null `addr` with `size > 0` means the call failed and `old_addr` is untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocEvent {
    /// Kind [`kind::ALLOC`]; pid and tid of the calling thread.
    pub hdr: Header,
    /// The returned block; 0 when the call failed (or `realloc(p, 0)` freed `p`).
    pub addr: u64,
    /// The requested size in bytes (`nmemb * size` for calloc and reallocarray).
    pub size: u64,
    /// The block passed to realloc/reallocarray, else 0.
    pub old_addr: u64,
    /// The calling stack; its frames arrive once in a [`StackEvent`] with the same id.
    pub stack_id: u64,
    /// One of [`alloc_shape`]: how the call's arguments were read.
    pub shape: u32,
    /// Explicit padding to 8 bytes; not read.
    pub _pad: u32,
}
const _: () = assert!(size_of::<AllocEvent>() == 64);

/// A block passed to `free` (kind [`kind::FREE`]). `free(NULL)` never crosses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeEvent {
    /// Kind [`kind::FREE`].
    pub hdr: Header,
    /// The block passed to `free`; never 0.
    pub addr: u64,
}
const _: () = assert!(size_of::<FreeEvent>() == 32);

/// Bits of [`StackEvent::flags`].
pub mod stack_flags {
    /// The walk stopped at [`super::MAX_FRAMES`] frames; outer frames are missing.
    pub const TRUNCATED: u32 = 1 << 0;
    /// The walk stopped early because a frame could not be read or made no sense.
    pub const BROKEN: u32 = 1 << 1;
    /// `frames[0]` is the exact instruction pointer, not a return address.
    pub const FIRST_IS_PC: u32 = 1 << 2;
}

/// The frames of a stack id, sent the first time the id is seen (kind [`kind::STACK`]).
///
/// Frames are innermost first. Apart from `frames[0]` under [`stack_flags::FIRST_IS_PC`] they
/// are return addresses, so the call instruction sits just before each.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackEvent {
    /// Kind [`kind::STACK`]; the pid the stack belongs to.
    pub hdr: Header,
    /// A hash of the pid and the frames.
    pub stack_id: u64,
    /// How many entries of `frames` are valid.
    pub nr: u32,
    /// Bits of [`stack_flags`].
    pub flags: u32,
    /// Instruction addresses, innermost first; only the first `nr` are valid.
    pub frames: [u64; MAX_FRAMES],
}
const _: () = assert!(size_of::<StackEvent>() == 40 + 8 * MAX_FRAMES);

/// A process lifecycle record (kinds [`kind::EXEC`], [`kind::EXIT`], [`kind::FORK`],
/// [`kind::LOADER`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    /// One of the kinds above; the pid is the process concerned (the child, for FORK).
    pub hdr: Header,
    /// FORK: the parent's pid. Otherwise 0.
    pub other_pid: u32,
    /// Explicit padding to 8 bytes; not read.
    pub _pad: u32,
}
const _: () = assert!(size_of::<ProcEvent>() == 32);

/// What happened to a descriptor ([`FdEvent::op`]).
pub mod fd_op {
    /// `fd` was created (by `syscall`; `fd2` is the second end of a pipe or socket pair, or
    /// the descriptor duplicated by dup*/F_DUPFD; `flags` holds the open/creation flags).
    pub const OPEN: u16 = 1;
    /// `fd` was closed.
    pub const CLOSE: u16 = 2;
    /// `close_range(fd, fd2, flags)` succeeded.
    pub const CLOSE_RANGE: u16 = 3;
    /// `fcntl(fd, F_SETFD, flags)` set or cleared close-on-exec.
    pub const SET_CLOEXEC: u16 = 4;
    /// Creating a descriptor failed with `errno` (EMFILE or ENFILE: the table is full).
    pub const FAIL: u16 = 5;
    /// The path was unlinked.
    pub const UNLINK: u16 = 6;
    /// The path was renamed away (it no longer names the file).
    pub const RENAME_FROM: u16 = 7;
    /// The path was renamed onto (a file it named is gone).
    pub const RENAME_TO: u16 = 8;
    /// `setrlimit`/`prlimit64` set the soft `RLIMIT_NOFILE` of process `fd2` (0: the caller)
    /// to `value`. Kept so an `EMFILE` can name the limit after the process is gone.
    pub const NOFILE_LIMIT: u16 = 9;
}

/// The system calls behind descriptor events ([`FdEvent::syscall`]).
pub mod fd_call {
    /// `open(2)`.
    pub const OPEN: u16 = 1;
    /// `openat(2)`.
    pub const OPENAT: u16 = 2;
    /// `openat2(2)`.
    pub const OPENAT2: u16 = 3;
    /// `creat(2)`.
    pub const CREAT: u16 = 4;
    /// `socket(2)`.
    pub const SOCKET: u16 = 5;
    /// `socketpair(2)`: two descriptors, `fd` and `fd2`.
    pub const SOCKETPAIR: u16 = 6;
    /// `accept(2)`.
    pub const ACCEPT: u16 = 7;
    /// `accept4(2)`.
    pub const ACCEPT4: u16 = 8;
    /// `pipe(2)`: two descriptors, `fd` and `fd2`.
    pub const PIPE: u16 = 9;
    /// `pipe2(2)`: two descriptors, `fd` and `fd2`.
    pub const PIPE2: u16 = 10;
    /// `dup(2)`.
    pub const DUP: u16 = 11;
    /// `dup2(2)`.
    pub const DUP2: u16 = 12;
    /// `dup3(2)`.
    pub const DUP3: u16 = 13;
    /// `fcntl(2)` with `F_DUPFD`, `F_DUPFD_CLOEXEC` or `F_SETFD`.
    pub const FCNTL: u16 = 14;
    /// `eventfd(2)` or `eventfd2`.
    pub const EVENTFD: u16 = 15;
    /// `epoll_create(2)` or `epoll_create1`.
    pub const EPOLL_CREATE: u16 = 16;
    /// `timerfd_create(2)`.
    pub const TIMERFD_CREATE: u16 = 17;
    /// `signalfd(2)` or `signalfd4`.
    pub const SIGNALFD: u16 = 18;
    /// `memfd_create(2)`.
    pub const MEMFD_CREATE: u16 = 19;
    /// `inotify_init(2)` or `inotify_init1`.
    pub const INOTIFY_INIT: u16 = 20;
    /// `close(2)`.
    pub const CLOSE: u16 = 21;
    /// `close_range(2)`.
    pub const CLOSE_RANGE: u16 = 22;
    /// `unlink(2)`.
    pub const UNLINK: u16 = 23;
    /// `unlinkat(2)`.
    pub const UNLINKAT: u16 = 24;
    /// `rename(2)`.
    pub const RENAME: u16 = 25;
    /// `renameat(2)`.
    pub const RENAMEAT: u16 = 26;
    /// `renameat2(2)`.
    pub const RENAMEAT2: u16 = 27;
    /// `setrlimit(2)`.
    pub const SETRLIMIT: u16 = 28;
    /// `prlimit64(2)`.
    pub const PRLIMIT64: u16 = 29;

    /// The call's name, or `"?"`.
    pub const fn name(call: u16) -> &'static str {
        match call {
            OPEN => "open",
            OPENAT => "openat",
            OPENAT2 => "openat2",
            CREAT => "creat",
            SOCKET => "socket",
            SOCKETPAIR => "socketpair",
            ACCEPT => "accept",
            ACCEPT4 => "accept4",
            PIPE => "pipe",
            PIPE2 => "pipe2",
            DUP => "dup",
            DUP2 => "dup2",
            DUP3 => "dup3",
            FCNTL => "fcntl",
            EVENTFD => "eventfd",
            EPOLL_CREATE => "epoll_create",
            TIMERFD_CREATE => "timerfd_create",
            SIGNALFD => "signalfd",
            MEMFD_CREATE => "memfd_create",
            INOTIFY_INIT => "inotify_init",
            CLOSE => "close",
            CLOSE_RANGE => "close_range",
            UNLINK => "unlink",
            UNLINKAT => "unlinkat",
            RENAME => "rename",
            RENAMEAT => "renameat",
            RENAMEAT2 => "renameat2",
            SETRLIMIT => "setrlimit",
            PRLIMIT64 => "prlimit64",
            _ => "?",
        }
    }
}

/// A descriptor event (kind [`kind::FD`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdEvent {
    /// Kind [`kind::FD`] (or [`kind::FD_PATH`] inside a [`FdPathEvent`]).
    pub hdr: Header,
    /// One of [`fd_op`].
    pub op: u16,
    /// One of [`fd_call`].
    pub syscall: u16,
    /// The descriptor created, closed or flagged, the first of the range for CLOSE_RANGE;
    /// -1 when there is none (FAIL, NOFILE_LIMIT, path-only ops).
    pub fd: i32,
    /// The second descriptor: the other end of a pipe or socket pair, the source of a dup, the
    /// last of the range for CLOSE_RANGE; for NOFILE_LIMIT the target pid (0: the caller); else -1.
    pub fd2: i32,
    /// Open flags (`O_CLOEXEC`, `O_CREAT`, `O_EXCL`, `O_TMPFILE`, ...), socket type flags,
    /// `FD_CLOEXEC` for SET_CLOEXEC, close_range flags.
    pub flags: u32,
    /// For FAIL: the positive errno.
    pub errno: i32,
    /// For opens relative to a directory: the directory descriptor (`AT_FDCWD` = -100).
    pub dirfd: i32,
    /// The creating (or failing) stack, 0 for closes.
    pub stack_id: u64,
    /// For NOFILE_LIMIT: the new soft limit.
    pub value: u64,
}
const _: () = assert!(size_of::<FdEvent>() == 64);

/// Bytes of a path carried by [`FdPathEvent`], NUL included; longer paths are cut.
pub const FD_PATH_LEN: usize = 256;

/// A descriptor event with a path (kind [`kind::FD_PATH`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FdPathEvent {
    /// The descriptor event the path belongs to.
    pub fd: FdEvent,
    /// NUL-terminated, as the process passed it (absolute or relative to `fd.dirfd`).
    pub path: [u8; FD_PATH_LEN],
}
const _: () = assert!(size_of::<FdPathEvent>() == size_of::<FdEvent>() + FD_PATH_LEN);

/// The OOM killer chose a victim (kind [`kind::OOM`]). The header's pid is the task that
/// ran the OOM killer; the victim is `victim`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomEvent {
    /// Kind [`kind::OOM`].
    pub hdr: Header,
    /// The victim's pid, as `oom:mark_victim` reports it.
    pub victim: u32,
    /// The victim's `oom_score_adj`, -1000 to 1000.
    pub oom_score_adj: i32,
    /// The victim's virtual memory size, in KiB.
    pub total_vm_kb: u64,
    /// The victim's resident anonymous memory, in KiB.
    pub anon_rss_kb: u64,
    /// The victim's resident file-backed memory, in KiB.
    pub file_rss_kb: u64,
    /// The victim's resident shared memory (shmem, tmpfs), in KiB.
    pub shmem_rss_kb: u64,
    /// The victim's command name, NUL-padded; zeros if it could not be read.
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<OomEvent>() == 24 + 8 + 32 + 16);

/// Why an event was lost: indices of the per-CPU `DROPS` counters.
pub mod drop_reason {
    /// An allocation or free record found the ring buffer full.
    pub const HEAP_RINGBUF: u32 = 0;
    /// A stack record found the ring buffer full (its allocations show an unknown stack).
    pub const STACK_RINGBUF: u32 = 1;
    /// A process lifecycle record found the ring buffer full.
    pub const PROC_RINGBUF: u32 = 2;
    /// An allocator call could not be paired with its return: another thread took its
    /// in-flight slot meanwhile.
    pub const INFLIGHT_FULL: u32 = 3;
    /// A stack's frames were overwritten by a walk preempting it on the same CPU, so they
    /// were not sent (they will be the next time the stack is seen).
    pub const STACK_RACE: u32 = 4;
    /// A descriptor record found the ring buffer full.
    pub const FD_RINGBUF: u32 = 5;
    /// An OOM-kill record found the ring buffer full.
    pub const OOM_RINGBUF: u32 = 6;
    /// A growth-mode record (page, release) found the ring buffer full.
    pub const GROWTH_RINGBUF: u32 = 7;
    /// A descriptor record waiting for its stack walk was overwritten by another task's on
    /// the same CPU (the first program was preempted before its tail call).
    pub const FD_RACE: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
    /// A short name per counter, for reports.
    pub const NAMES: [&str; COUNT as usize] = [
        "heap_ringbuf",
        "stack_ringbuf",
        "proc_ringbuf",
        "inflight_full",
        "stack_race",
        "fd_ringbuf",
        "oom_ringbuf",
        "growth_ringbuf",
        "fd_race",
    ];
}

/// Bits of the `TRACED` map's values: how a traced process is handled.
pub mod traced_flags {
    /// Stop the process at exec, at loader changes and (for children) at its first return
    /// from fork, so user space attaches probes before any of its code runs.
    pub const GATE: u32 = 1 << 0;
    /// Children this process forks are traced too, with the same flags.
    pub const FOLLOW_FORKS: u32 = 1 << 1;
}

/// What the kernel side remembers about an allocator call between its entry and its return,
/// in the slot of its thread (`tid % INFLIGHT_SLOTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    /// The thread owning the slot.
    pub tid: u32,
    /// Explicit padding so `sp` is 8-aligned; not read.
    pub _pad: u32,
    /// Stack pointer at the outermost entry; a deeper entry (lower `sp`) is a nested call.
    pub sp: u64,
    /// First remembered argument (realloc's old block, posix_memalign's `memptr`).
    pub arg: u64,
    /// Requested size.
    pub size: u64,
    /// One of [`alloc_shape`].
    pub shape: u32,
    /// Allocator calls of this thread currently entered and not yet returned.
    pub depth: u32,
}
const _: () = assert!(size_of::<Inflight>() == 40);

/// Slots of the in-flight table: an array indexed by thread id, so entry and return find
/// their slot without a hash-map helper call. Two threads sharing a slot and both inside the
/// allocator at once lose one call (counted as `inflight_full`).
pub const INFLIGHT_SLOTS: u32 = 1 << 16;

/// Bits of the filter of addresses ever returned by a traced allocator (see `free_enter`).
pub const ADDR_FILTER_BITS: u32 = 1 << 20;

/// Counters of the kernel side's work that are not losses (per CPU, summed by user space).
pub mod counter {
    /// Frees of addresses no traced allocation ever returned, filtered in the kernel: they
    /// count as unmatched frees without crossing to user space.
    pub const FILTERED_FREES: u32 = 0;
    /// Stack captures answered by the per-CPU walk cache, without walking.
    pub const WALK_CACHE_HITS: u32 = 1;
    /// Stack captures that walked the stack.
    pub const WALKS: u32 = 2;
    /// Runs of an allocator entry program (any function, `free` included, in any process):
    /// with the probes scoped to the traced processes, only their calls count.
    pub const PROBE_HITS: u32 = 3;
    /// Frees of addresses no traced allocation ever returned, made by a thread on its way out
    /// (see [`super::alloc_shape::THREAD_EXIT`]): glibc freeing the thread's cache, which it
    /// allocated inside the allocator; filtered like [`FILTERED_FREES`] but counted apart.
    pub const THREAD_EXIT_FREES: u32 = 4;
    /// Number of counters.
    pub const COUNT: u32 = 5;
}

/// One row of a module's unwind table: how to find the caller from any instruction in
/// `[pc, next row's pc)`, compiled from `.eh_frame`/`.debug_frame` by user space.
///
/// `pc` is a file offset in the module (so one table serves every process mapping it,
/// wherever it is loaded). The caller's frame: `CFA = (rsp or rbp) + cfa_off`; the return
/// address is at `CFA - 8`; the caller's `rbp` was saved at `CFA + 8 * rbp_off` or, when
/// `rbp_off` is 0, is unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// File offset in the module of the first instruction the row covers.
    pub pc: u32,
    /// Bytes added to rsp or rbp (as `kind` says) to get the CFA.
    pub cfa_off: u16,
    /// Where the caller's rbp was saved, in 8-byte words from the CFA; 0: rbp is unchanged.
    pub rbp_off: i8,
    /// One of [`unwind_kind`].
    pub kind: u8,
}
const _: () = assert!(size_of::<UnwindRow>() == 8);

/// How an [`UnwindRow`] finds the caller.
pub mod unwind_kind {
    /// CFA = rsp + cfa_off.
    pub const CFA_RSP: u8 = 0;
    /// CFA = rbp + cfa_off.
    pub const CFA_RBP: u8 = 1;
    /// A PLT stub: CFA = rsp + 8, plus 8 past the stub's push (its offset & 15 >= 11).
    pub const PLT: u8 = 2;
    /// The outermost frame (`_start`, a thread's start): the return address is undefined.
    pub const END: u8 = 3;
    /// No unwind information covers this code: fall back to the frame pointer.
    pub const NO_INFO: u8 = 4;
    /// The rule cannot be expressed here (a DWARF expression): fall back to the frame pointer.
    pub const UNSUPPORTED: u8 = 5;
    /// A signal trampoline (`__restore_rt`): the interrupted registers are in the
    /// `ucontext_t` at the stack pointer, and the interrupted pc is exact.
    pub const SIGNAL: u8 = 6;
    /// Offset of the interrupted rbp in `ucontext_t` (x86-64), in bytes.
    pub const UC_RBP: u64 = 120;
    /// Offset of the interrupted rsp in `ucontext_t`, in bytes.
    pub const UC_RSP: u64 = 160;
    /// Offset of the interrupted rip in `ucontext_t`, in bytes.
    pub const UC_RIP: u64 = 168;
}

/// One executable mapping of a traced process, as the stack walker sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeMapping {
    /// First address of the mapping in the process.
    pub start: u64,
    /// Address just past the mapping's end.
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// Rows `[table_start, table_start + table_len)` of `UNWIND_ROWS`; `table_len` 0 means
    /// no table (frame pointers only).
    pub table_start: u32,
    /// Rows in the module's table; 0: no table.
    pub table_len: u32,
    /// Entries `[index_start, index_start + index_len)` of `UNWIND_INDEX`: for each
    /// `1 << UNWIND_PAGE_SHIFT`-byte page of the file, the (table-relative) row covering its start,
    /// so a lookup searches only the rows of one page.
    pub index_start: u32,
    /// Entries of this mapping in `UNWIND_INDEX`; 0: no index, a lookup searches all its rows.
    pub index_len: u32,
}
const _: () = assert!(size_of::<CodeMapping>() == 40);

/// Page size of the unwind index ([`CodeMapping::index_start`]), as a shift.
pub const UNWIND_PAGE_SHIFT: u32 = 8;

/// Most executable mappings a traced process can have in the walker's view.
pub const MAX_CODE_MAPPINGS: usize = 250;

/// The walker's view of one process: its executable mappings, sorted by `start`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessCode {
    /// How many entries of `mappings` are valid.
    pub len: u32,
    /// Changes whenever user space rewrites the value, so the walker knows when mappings it
    /// cached from an earlier walk are stale.
    pub generation: u32,
    /// The mappings, sorted by `start`; only the first `len` are valid.
    pub mappings: [CodeMapping; MAX_CODE_MAPPINGS],
}
const _: () = assert!(size_of::<ProcessCode>() == 8 + 40 * MAX_CODE_MAPPINGS);

/// How stacks are walked ([`Config::unwind`]).
pub mod unwind_mode {
    /// Frame pointers only.
    pub const FP: u32 = 0;
    /// Unwind tables where a module has one, frame pointers elsewhere.
    pub const AUTO: u32 = 1;
    /// Unwind tables only: a frame without one ends the walk.
    pub const DWARF: u32 = 2;
}

/// Settings user space writes into the kernel side's `CONFIG` map before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// One of [`unwind_mode`].
    pub unwind: u32,
    /// Non-zero: time every stack walk into `WALK_STATS` (for benchmarks).
    pub measure: u32,
    /// Bits of [`features`]: what the descriptor hooks report.
    pub features: u32,
    /// Non-zero: sample allocations, a block of `size` bytes with probability
    /// `min(1, size / sample_bytes)` (see `leaktrace::table`'s estimate).
    pub sample_bytes: u32,
    /// With [`features::NODE`]: the tracer's own process, never traced.
    pub self_tgid: u32,
    /// Padding.
    pub _pad: u32,
}
const _: () = assert!(size_of::<Config>() == 24);

/// What is traced besides the heap ([`Config::features`]).
pub mod features {
    /// Every descriptor's creation and release.
    pub const FD: u32 = 1 << 0;
    /// Files created (and unlinked or renamed): temp-file leaks.
    pub const TMP: u32 = 1 << 1;
    /// Growth mode: page faults and memory released, no allocator probe.
    pub const GROWTH: u32 = 1 << 2;
    /// Node-wide (the agent's first tier): every process but [`super::Config::self_tgid`]
    /// counts as traced by the tracepoint hooks, without a `TRACED` entry; its forks are
    /// not followed one by one.
    pub const NODE: u32 = 1 << 3;
}

/// Per-CPU totals of stack walks, kept when [`Config::measure`] is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Stack walks timed.
    pub walks: u64,
    /// Frames those walks produced.
    pub frames: u64,
    /// Time spent in those walks, in nanoseconds.
    pub ns: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Inflight {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnwindRow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CodeMapping {}
    // SAFETY: as above (`u16`s, padded to 56 bytes).
    unsafe impl aya::Pod for super::python::Offsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcessCode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WalkStats {}
}
