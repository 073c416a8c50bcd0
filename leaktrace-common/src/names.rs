//! The one spelling of every program, map and global that crosses the kernel boundary.
//!
//! The eBPF side names its items after these (a program is its function's name, a map its
//! static's name); user space finds them by these constants, never by a literal. The
//! `leaktrace` crate checks the built object against this list in a unit test.

/// Maps and globals of the eBPF object.
pub mod map {
    /// The ring buffer every record leaves through but the allocator's.
    pub const EVENTS: &str = "EVENTS";
    /// The allocator probes' records and their stacks, apart: a node's flood of tracepoint
    /// records cannot crowd exact heap tracing out.
    pub const HEAP_EVENTS: &str = "HEAP_EVENTS";
    /// Per-CPU counters of lost events, indexed by [`crate::drop_reason`].
    pub const DROPS: &str = "DROPS";
    /// Per-CPU counters of work that is not a loss, indexed by [`crate::counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Processes traced, with their [`crate::traced_flags`].
    pub const TRACED: &str = "TRACED";
    /// Each traced process's executable mappings ([`crate::ProcessCode`]).
    pub const PROC_CODE: &str = "PROC_CODE";
    /// Stack walking cost ([`crate::WalkStats`]), kept with [`crate::Config::measure`].
    pub const WALK_STATS: &str = "WALK_STATS";
    /// Unwind rows of every module ([`crate::UnwindRow`]), shared memory.
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// The page index into [`UNWIND_ROWS`], shared memory.
    pub const UNWIND_INDEX: &str = "UNWIND_INDEX";
    /// aya-log's records (diagnostics, debug level).
    pub const AYA_LOGS: &str = "AYA_LOGS";
    /// The global [`crate::Config`] written before loading.
    pub const CONFIG: &str = "CONFIG";
    /// The descriptor programs' tail call: slot 0 holds [`super::program::FD_STACK`].
    pub const FD_TAIL: &str = "FD_TAIL";

    /// Every map user space opens by name (for the object check).
    pub const ALL: &[&str] = &[
        EVENTS,
        HEAP_EVENTS,
        DROPS,
        COUNTERS,
        TRACED,
        PROC_CODE,
        WALK_STATS,
        UNWIND_ROWS,
        UNWIND_INDEX,
        CONFIG,
        FD_TAIL,
    ];
}

/// Uprobe programs (the tracepoint programs are listed in [`crate::TRACEPOINTS`], the
/// allocator entry programs in [`crate::alloc_shape`]), and the one tail-called program.
pub mod program {
    /// The second half of every descriptor tracepoint that sends a stack: walks it and sends
    /// the record the first half left in a per-CPU slot. One copy of the stack walker for
    /// twenty-odd programs, so the verifier checks it once, not once per program.
    pub const FD_STACK: &str = "fd_stack";
    /// Every allocator entry point of a module on one uprobe_multi link, the function's
    /// [`crate::alloc_shape`] its attach cookie.
    pub const ALLOC_ENTER_MULTI: &str = "alloc_enter_multi";
    /// The return of every allocating entry point: pairs it with its entry, sends the block.
    pub const ALLOC_RETURN: &str = "alloc_return";
    /// The dynamic loader's `_dl_debug_state`: its object list changed.
    pub const LOADER_STATE: &str = "loader_state";
    /// Nothing at all: the benchmark's floor, what the traps alone cost.
    pub const EMPTY: &str = "empty";
    /// Nothing, on return: what a return probe adds to the floor.
    pub const EMPTY_RETURN: &str = "empty_return";

    /// The uprobes besides the allocator entry programs.
    pub const UPROBES: &[&str] = &[
        ALLOC_ENTER_MULTI,
        ALLOC_RETURN,
        LOADER_STATE,
        EMPTY,
        EMPTY_RETURN,
    ];
}
