//! What leaktrace hooks: the allocator catalogue and the tracepoint catalogue.
//!
//! Both sides read these tables. Adding an allocator function whose arguments look like one
//! already known (jemalloc's `mallocx(size, flags)` is [`alloc_shape::SIZE`]) is one row of
//! [`ALLOCATOR_FNS`]; a new way of passing arguments is a new [`alloc_shape`] and its entry
//! program.

/// Argument registers (System V x86-64) as bits: what an entry program reads, so probe
/// placement knows which registers must still hold the arguments where the probe lands.
pub mod arg_regs {
    /// `rdi`: the first argument.
    pub const RDI: u8 = 1;
    /// `rsi`: the second argument.
    pub const RSI: u8 = 2;
    /// `rdx`: the third argument.
    pub const RDX: u8 = 4;
}

/// How an allocator function takes its arguments and hands back its block. Each shape has
/// one entry program; the return program reads the shape from the in-flight call.
pub mod alloc_shape {
    use super::arg_regs::{RDI, RDX, RSI};

    /// `p = f(size)`: malloc, valloc, pvalloc.
    pub const SIZE: u32 = 1;
    /// `p = f(nmemb, size)`, `nmemb * size` bytes: calloc.
    pub const COUNT_SIZE: u32 = 2;
    /// `q = f(p, size)`, `p` moved or freed: realloc.
    pub const RESIZE: u32 = 3;
    /// `q = f(p, nmemb, size)`: reallocarray.
    pub const RESIZE_ARRAY: u32 = 4;
    /// `err = f(&p, alignment, size)`, the block stored through the first argument:
    /// posix_memalign.
    pub const OUT_ALIGN_SIZE: u32 = 5;
    /// `p = f(alignment, size)`: aligned_alloc, memalign.
    pub const ALIGN_SIZE: u32 = 6;
    /// `f(p)`: free, cfree.
    pub const FREE: u32 = 7;
    /// Not an allocator function: the start of a thread's way out (glibc's
    /// `__call_tls_dtors`, which `start_thread` calls once the thread's function has
    /// returned, and `exit` too). The thread is marked until it exits, and its frees from
    /// then on carry [`crate::header_flags::THREAD_EXIT`]: glibc then frees the thread's
    /// cache (`tcache_thread_shutdown`), its own block and the blocks parked in it, which
    /// no traced allocation returned or which the program already freed.
    pub const THREAD_EXIT: u32 = 8;

    /// Every shape, in id order.
    pub const ALL: [u32; 8] = [
        SIZE,
        COUNT_SIZE,
        RESIZE,
        RESIZE_ARRAY,
        OUT_ALIGN_SIZE,
        ALIGN_SIZE,
        FREE,
        THREAD_EXIT,
    ];

    /// The entry program of a shape (the name of its eBPF function).
    pub const fn entry_program(shape: u32) -> &'static str {
        match shape {
            SIZE => "size_enter",
            COUNT_SIZE => "count_size_enter",
            RESIZE => "resize_enter",
            RESIZE_ARRAY => "resize_array_enter",
            OUT_ALIGN_SIZE => "out_align_size_enter",
            ALIGN_SIZE => "align_size_enter",
            THREAD_EXIT => "thread_exit_enter",
            _ => "free_enter",
        }
    }

    /// The argument registers the entry program reads ([`super::arg_regs`]).
    pub const fn registers_read(shape: u32) -> u8 {
        match shape {
            COUNT_SIZE | RESIZE => RDI | RSI,
            RESIZE_ARRAY | OUT_ALIGN_SIZE => RDI | RSI | RDX,
            ALIGN_SIZE => RSI,
            THREAD_EXIT => 0,
            _ => RDI,
        }
    }

    /// True for the shapes that hand out a block (and so get the return probe).
    pub const fn allocates(shape: u32) -> bool {
        shape != FREE && shape != THREAD_EXIT
    }

    /// True when the first argument is a block the call moves or frees.
    pub const fn resizes(shape: u32) -> bool {
        matches!(shape, RESIZE | RESIZE_ARRAY)
    }
}

/// One allocator function leaktrace hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocatorFn {
    /// Its symbol.
    pub symbol: &'static str,
    /// One of [`alloc_shape`].
    pub shape: u32,
}

impl AllocatorFn {
    const fn new(symbol: &'static str, shape: u32) -> Self {
        Self { symbol, shape }
    }
}

/// The allocator functions hooked, by symbol. Aliases at one address (glibc's
/// `memalign`/`aligned_alloc`, `free`/`cfree`) are hooked once, as the first name listed.
/// An object is hooked when it defines [`ALLOCATOR_FNS`]`[0]` (`malloc`) and a free. The
/// last row is glibc's thread exit, hooked beside the allocator to name the frees made then
/// ([`alloc_shape::THREAD_EXIT`]).
pub const ALLOCATOR_FNS: &[AllocatorFn] = &[
    AllocatorFn::new("malloc", alloc_shape::SIZE),
    AllocatorFn::new("calloc", alloc_shape::COUNT_SIZE),
    AllocatorFn::new("realloc", alloc_shape::RESIZE),
    AllocatorFn::new("reallocarray", alloc_shape::RESIZE_ARRAY),
    AllocatorFn::new("free", alloc_shape::FREE),
    AllocatorFn::new("cfree", alloc_shape::FREE),
    AllocatorFn::new("posix_memalign", alloc_shape::OUT_ALIGN_SIZE),
    AllocatorFn::new("aligned_alloc", alloc_shape::ALIGN_SIZE),
    AllocatorFn::new("memalign", alloc_shape::ALIGN_SIZE),
    AllocatorFn::new("valloc", alloc_shape::SIZE),
    AllocatorFn::new("pvalloc", alloc_shape::SIZE),
    AllocatorFn::new("__call_tls_dtors", alloc_shape::THREAD_EXIT),
];

/// When a tracepoint program is attached ([`Tracepoint::family`]).
pub mod hook_family {
    /// Always: exec, exit, OOM kills.
    pub const LIFECYCLE: u32 = 0;
    /// Following forked children (`run --follow-forks`).
    pub const FORKS: u32 = 1;
    /// Descriptors created and released (also needed for temp files).
    pub const FD: u32 = 2;
    /// Paths going away (temp files).
    pub const TMP: u32 = 3;
    /// Growth mode: pages written to, memory given back.
    pub const GROWTH: u32 = 4;
}

/// A tracepoint program and the event it attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracepoint {
    /// The program (its eBPF function's name).
    pub program: &'static str,
    /// The tracepoint's category (`syscalls`, `oom`, ...), the directory under `events/`.
    pub category: &'static str,
    /// The tracepoint's name within its category.
    pub event: &'static str,
    /// One of [`hook_family`].
    pub family: u32,
}

const fn tp(program: &'static str, category: &'static str, family: u32) -> Tracepoint {
    Tracepoint {
        program,
        category,
        event: program,
        family,
    }
}

const fn syscall(program: &'static str, family: u32) -> Tracepoint {
    tp(program, "syscalls", family)
}

/// Every tracepoint program.
pub const TRACEPOINTS: &[Tracepoint] = {
    use hook_family::{FD, FORKS, GROWTH, LIFECYCLE, TMP};
    &[
        tp("sched_process_exec", "sched", LIFECYCLE),
        tp("sched_process_exit", "sched", LIFECYCLE),
        // OOM kills anywhere on the node, traced or not.
        tp("mark_victim", "oom", LIFECYCLE),
        tp("sched_process_fork", "sched", FORKS),
        syscall("sys_exit_clone", FORKS),
        syscall("sys_exit_clone3", FORKS),
        syscall("sys_exit_fork", FORKS),
        syscall("sys_exit_vfork", FORKS),
        syscall("sys_exit_open", FD),
        syscall("sys_exit_openat", FD),
        syscall("sys_exit_openat2", FD),
        syscall("sys_exit_creat", FD),
        syscall("sys_exit_socket", FD),
        syscall("sys_exit_socketpair", FD),
        syscall("sys_exit_accept", FD),
        syscall("sys_exit_accept4", FD),
        syscall("sys_exit_pipe", FD),
        syscall("sys_exit_pipe2", FD),
        syscall("sys_exit_dup", FD),
        syscall("sys_exit_dup2", FD),
        syscall("sys_exit_dup3", FD),
        syscall("sys_exit_fcntl", FD),
        syscall("sys_exit_eventfd", FD),
        syscall("sys_exit_eventfd2", FD),
        syscall("sys_exit_epoll_create", FD),
        syscall("sys_exit_epoll_create1", FD),
        syscall("sys_exit_timerfd_create", FD),
        syscall("sys_exit_signalfd", FD),
        syscall("sys_exit_signalfd4", FD),
        syscall("sys_exit_memfd_create", FD),
        syscall("sys_exit_inotify_init", FD),
        syscall("sys_exit_inotify_init1", FD),
        syscall("sys_enter_close", FD),
        syscall("sys_exit_close_range", FD),
        syscall("sys_exit_setrlimit", FD),
        syscall("sys_exit_prlimit64", FD),
        syscall("sys_exit_unlink", TMP),
        syscall("sys_exit_unlinkat", TMP),
        syscall("sys_exit_rename", TMP),
        syscall("sys_exit_renameat", TMP),
        syscall("sys_exit_renameat2", TMP),
        tp("page_fault_user", "exceptions", GROWTH),
        tp("page_fault_kernel", "exceptions", GROWTH),
        tp("rss_stat", "kmem", GROWTH),
        syscall("sys_enter_munmap", GROWTH),
        syscall("sys_enter_madvise", GROWTH),
        syscall("sys_exit_brk", GROWTH),
    ]
};
