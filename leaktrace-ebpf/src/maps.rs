//! The maps shared by all programs, and small helpers to fill and send records.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use leaktrace_common::{ADDR_FILTER_BITS, Header, INFLIGHT_SLOTS, Inflight, counter, drop_reason};

/// Every record to user space but the allocator probes'. User space sets the real size at
/// load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 24, 0);

/// The allocator probes' records and their stacks: tier 2 of the node agent, apart from the
/// node-wide tracepoints' flood. User space sets the real size at load time.
#[map]
pub static HEAP_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 24, 0);

/// Per-CPU counters of lost events, indexed by [`drop_reason`].
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// Allocator calls between entry and return, in the slot `tid % INFLIGHT_SLOTS`. An array:
/// its lookups compile to a bounds check and an add, where a hash map costs helper calls
/// (~400 ns a malloc/free pair measured here with an LRU hash).
#[map]
pub static INFLIGHT: Array<Inflight> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// The slot of thread `tid`.
#[inline(always)]
pub fn inflight_slot(tid: u32) -> Option<*mut Inflight> {
    INFLIGHT.get_ptr_mut(tid % INFLIGHT_SLOTS)
}

/// Threads on their way out ([`leaktrace_common::alloc_shape::THREAD_EXIT`]): the thread id
/// in the slot `tid % INFLIGHT_SLOTS`, set at glibc's `__call_tls_dtors` and cleared when the
/// thread exits (so a new thread given the id starts unmarked).
#[map]
pub static THREAD_EXITING: Array<u32> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// Whether thread `tid` is on its way out.
#[inline(always)]
pub fn thread_exiting(tid: u32) -> bool {
    THREAD_EXITING
        .get(tid % INFLIGHT_SLOTS)
        .is_some_and(|&t| t == tid && tid != 0)
}

/// Marks thread `tid` as on its way out (`exiting`), or no longer (it exited).
#[inline(always)]
pub fn set_thread_exiting(tid: u32, exiting: bool) {
    if let Some(slot) = THREAD_EXITING.get_ptr_mut(tid % INFLIGHT_SLOTS) {
        // SAFETY: an element of the array; only its own thread (or its exit) writes it.
        unsafe {
            if exiting {
                *slot = tid;
            } else if *slot == tid {
                *slot = 0;
            }
        }
    }
}

/// A filter of the addresses traced allocators returned: a flag byte per hash of the
/// address, never cleared, so a set flag only means "maybe seen". A free whose flag is clear
/// frees a block allocated before tracing began, or not by a traced allocator: it is
/// counted (`counter::FILTERED_FREES`) and not sent. Bytes, not bits: setting one is a
/// plain store, where setting a bit would need an atomic read-modify-write.
#[map]
pub static ADDR_FILTER: Array<u64> = Array::with_max_entries(ADDR_FILTER_BITS / 8, 0);

/// The element and the byte in it of `addr`'s flag.
///
/// Neighbouring blocks get neighbouring flags: one flag per 16 bytes of a 16 MiB region, so
/// a program's live heap touches a few pages and cache lines of the filter rather than one
/// each. On the churn benchmark the flag's load held two thirds of `free_enter`'s profile
/// samples with a scattering hash, and still over half with this one: the flag was last
/// touched when the block was allocated, often long before. The region's number is hashed
/// and XORed in, which keeps the locality (aligned groups of flags map to aligned groups)
/// while regions that differ only in high bits, such as glibc's 64 MiB-aligned thread
/// arenas, do not share flags.
#[inline(always)]
fn addr_flag(addr: u64) -> (u32, usize) {
    let region = (addr >> 24).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 44;
    let h = ((addr >> 4) ^ region) as u32 % ADDR_FILTER_BITS;
    (h / 8, (h % 8) as usize)
}

/// Marks `addr` as returned by a traced allocator.
#[inline(always)]
pub fn addr_seen(addr: u64) {
    let (word, byte) = addr_flag(addr);
    if let Some(w) = ADDR_FILTER.get_ptr_mut(word) {
        // SAFETY: a byte of an element of the array.
        unsafe { core::ptr::write_volatile(w.cast::<u8>().add(byte), 1) };
    }
}

/// False when no traced allocator ever returned `addr`.
#[inline(always)]
pub fn addr_maybe_seen(addr: u64) -> bool {
    let (word, byte) = addr_flag(addr);
    // SAFETY: a byte of an element of the array.
    ADDR_FILTER
        .get_ptr(word)
        .is_none_or(|w| unsafe { core::ptr::read_volatile(w.cast::<u8>().add(byte)) } != 0)
}

/// Per-CPU [`counter`]s.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Counts one event of kind `which` (a [`counter`]).
#[inline(always)]
pub fn count(which: u32) {
    increment(&COUNTERS, which);
}

#[inline(always)]
fn increment(map: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs do not nest on one CPU for these hooks.
        unsafe { *c += 1 };
    }
}

/// Processes whose lifecycle we follow (tgid → `traced_flags`). User space adds the targets;
/// the fork hook adds followed children; the exit hook removes the dead.
#[map]
pub static TRACED: HashMap<u32, u32> = HashMap::with_max_entries(8192, 0);

/// The `traced_flags` of process `pid` when it is traced: its `TRACED` entry, or, node-wide,
/// none for every process but the tracer itself.
#[inline(always)]
pub fn traced_flags(pid: u32) -> Option<u32> {
    // SAFETY: plain read of a u32 value.
    if let Some(flags) = unsafe { TRACED.get(pid) } {
        return Some(*flags);
    }
    match crate::stack::node_wide_except() {
        Some(me) if pid != me && pid != 0 => Some(0),
        _ => None,
    }
}

/// Children forked by a process that follows forks, from `sched_process_fork` (in the
/// parent) until the child's first return to user space: child tid → parent tgid.
#[map]
pub static PENDING_FORKS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);

/// Counts one lost event.
#[inline(always)]
pub fn count_drop(reason: u32) {
    increment(&DROPS, reason);
}

/// A header for the current task.
#[inline(always)]
pub fn header(kind: u16) -> Header {
    header_for(kind, bpf_get_current_pid_tgid())
}

/// A header for the task whose `pid_tgid` is `id`.
#[inline(always)]
pub fn header_for(kind: u16, id: u64) -> Header {
    Header {
        kind,
        flags: 0,
        pid: (id >> 32) as u32,
        tid: id as u32,
        _pad: 0,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Records sent per CPU without waking user space, between two wakeups.
const WAKEUP_EVERY: u64 = 256;

/// Per-CPU count of records sent, to wake user space once every [`WAKEUP_EVERY`].
#[map]
static SENT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

fn output<T>(ring: &RingBuf, record: &T, flags: u64, reason: u32) -> bool {
    if ring.output::<T>(record, flags).is_ok() {
        true
    } else {
        count_drop(reason);
        false
    }
}

/// Sends a record user space must act on at once (a stopped process waits for it).
#[inline(always)]
pub fn send_now<T>(record: &T, reason: u32) -> bool {
    output(&EVENTS, record, BPF_RB_FORCE_WAKEUP, reason)
}

/// Sends a record in a batch: a wakeup costs the traced thread more than the probe itself
/// (~6 µs measured per event here), so user space is woken once every [`WAKEUP_EVERY`]
/// records per CPU and otherwise drains on its own timer.
#[inline(always)]
pub fn send_batched<T>(record: &T, reason: u32) -> bool {
    send_batched_to(&EVENTS, record, reason)
}

/// [`send_batched`] for the allocator probes' records (`HEAP_EVENTS`).
#[inline(always)]
pub fn send_heap<T>(record: &T, reason: u32) -> bool {
    send_batched_to(&HEAP_EVENTS, record, reason)
}

#[inline(always)]
fn send_batched_to<T>(ring: &RingBuf, record: &T, reason: u32) -> bool {
    let mut flags = BPF_RB_NO_WAKEUP;
    if let Some(sent) = SENT.get_ptr_mut(0) {
        // SAFETY: per-CPU counter; a lost increment under preemption only shifts a wakeup.
        unsafe {
            *sent = (*sent).wrapping_add(1);
            if *sent % WAKEUP_EVERY == 0 {
                flags = BPF_RB_FORCE_WAKEUP;
            }
        }
    }
    output(ring, record, flags, reason)
}
