//! The maps shared by all programs, and small helpers to fill and send records.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use leaktrace_common::{Header, Inflight, drop_reason};

/// Every record to user space. User space sets the real size at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 24, 0);

/// Per-CPU counters of lost events, indexed by [`drop_reason`].
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// Allocator calls between entry and return, by `pid_tgid`. LRU so that a thread that dies
/// inside the allocator cannot leak an entry forever.
#[map]
pub static INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(16384, 0);

/// Processes whose lifecycle we follow (tgid → `traced_flags`). User space adds the targets;
/// the fork hook adds followed children; the exit hook removes the dead.
#[map]
pub static TRACED: HashMap<u32, u32> = HashMap::with_max_entries(8192, 0);

/// Children forked by a process that follows forks, from `sched_process_fork` (in the
/// parent) until the child's first return to user space: child tid → parent tgid.
#[map]
pub static PENDING_FORKS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);

/// Counts one lost event.
#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot; programs do not nest on one CPU for these hooks.
        unsafe { *counter += 1 };
    }
}

/// A header for the current task.
#[inline(always)]
pub fn header(kind: u16) -> Header {
    let id = bpf_get_current_pid_tgid();
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

fn output<T>(record: &T, flags: u64, reason: u32) -> bool {
    if EVENTS.output::<T>(record, flags).is_ok() {
        true
    } else {
        count_drop(reason);
        false
    }
}

/// Sends a record user space must act on at once (a stopped process waits for it).
#[inline(always)]
pub fn send_now<T>(record: &T, reason: u32) -> bool {
    output(record, BPF_RB_FORCE_WAKEUP, reason)
}

/// Sends a record in a batch: a wakeup costs the traced thread more than the probe itself
/// (~6 µs measured per event here), so user space is woken once every [`WAKEUP_EVERY`]
/// records per CPU and otherwise drains on its own timer.
#[inline(always)]
pub fn send_batched<T>(record: &T, reason: u32) -> bool {
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
    output(record, flags, reason)
}
