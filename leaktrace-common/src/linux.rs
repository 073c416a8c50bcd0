//! Kernel ABI constants (x86-64) both sides read: flags of the calls the hooks decode, and
//! values of the tracepoint records they read.
//!
//! Defined once here rather than taken from `libc`, which the eBPF side cannot use.

/// `open(2)` flag `O_CREAT`: create the file if it does not exist.
pub const O_CREAT: u32 = 0o100;
/// `O_EXCL`: fail if `O_CREAT` finds the file already there.
pub const O_EXCL: u32 = 0o200;
/// `O_CLOEXEC`: close the descriptor on exec.
pub const O_CLOEXEC: u32 = 0o2000000;
/// `O_TMPFILE` includes `O_DIRECTORY`: test with `flags & O_TMPFILE == O_TMPFILE`.
pub const O_TMPFILE: u32 = 0o20000000 | 0o200000;
/// The "current directory" `dirfd` of the `*at` calls.
pub const AT_FDCWD: i32 = -100;

/// `fcntl(2)` command `F_DUPFD`: duplicate onto the lowest free descriptor >= the argument.
pub const F_DUPFD: u64 = 0;
/// `fcntl(2)` command `F_SETFD`: set the descriptor flags (only [`FD_CLOEXEC`] exists).
pub const F_SETFD: u64 = 2;
/// `fcntl(2)` command `F_DUPFD_CLOEXEC`: `F_DUPFD` with close-on-exec set on the copy.
pub const F_DUPFD_CLOEXEC: u64 = 1030;
/// `FD_CLOEXEC`: the close-on-exec descriptor flag.
pub const FD_CLOEXEC: u32 = 1;
/// `close_range(2)`: mark close-on-exec instead of closing.
pub const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
/// `memfd_create(2)`: close on exec.
pub const MFD_CLOEXEC: u64 = 1;
/// `setrlimit(2)`: the descriptor limit.
pub const RLIMIT_NOFILE: u64 = 7;

/// errno `EMFILE`: the process's descriptor table is full (`RLIMIT_NOFILE` reached).
pub const EMFILE: i32 = 24;
/// errno `ENFILE`: the system's file table is full.
pub const ENFILE: i32 = 23;

/// `madvise(2)` advice `MADV_DONTNEED`: drop the pages now (anonymous ones read back as zeros).
pub const MADV_DONTNEED: i64 = 4;
/// `madvise(2)` advice `MADV_FREE`: the kernel may reclaim the pages lazily.
pub const MADV_FREE: i64 = 8;
/// `madvise(2)` advice `MADV_REMOVE`: free the pages and their backing store.
pub const MADV_REMOVE: i64 = 9;

/// `SIGCONT`: resumes a stopped process; user space sends it once a gate record is handled.
pub const SIGCONT: u32 = 18;
/// `SIGSTOP`: the lifecycle gate stops the process with it until [`SIGCONT`].
pub const SIGSTOP: u32 = 19;

/// Page-fault error code bit (x86, `exceptions:page_fault_*`): the access was a write.
pub const PF_WRITE: u64 = 1 << 1;
/// `kmem:rss_stat` member: the mm's anonymous page counter.
pub const MM_ANONPAGES: i32 = 1;
/// `kmem:rss_stat` member: the mm's shmem page counter.
pub const MM_SHMEMPAGES: i32 = 3;
/// The base page size.
pub const PAGE_SIZE: u64 = 4096;
/// The end of the user half of the address space (x86-64, 4-level paging; 5-level user
/// addresses reach further, and faults there are only not seen).
pub const USER_END: u64 = 1 << 47;
