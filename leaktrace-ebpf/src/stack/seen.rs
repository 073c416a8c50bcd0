//! Stacks already sent: each stack's frames go to user space once, the events carry its id.
use aya_ebpf::{macros::map, maps::Array};
use leaktrace_common::{Header, StackEvent, drop_reason};

use super::walk::STACK_SCRATCH;
use crate::maps::{EVENTS, HEAP_EVENTS, count_drop};

/// Stack ids already sent to user space, each in slot `id % SEEN_SLOTS`: a direct-mapped
/// cache in an array (no helper call to look up). An id whose slot another took is simply
/// sent again.
#[map]
static STACKS_SEEN: Array<u64> = Array::with_max_entries(SEEN_SLOTS, 0);
const SEEN_SLOTS: u32 = 1 << 16;

#[inline(always)]
pub(super) fn seen_slot(id: u64) -> Option<*mut u64> {
    STACKS_SEEN.get_ptr_mut((id % u64::from(SEEN_SLOTS)) as u32)
}

#[inline(always)]
pub(super) fn send_frames(hdr: Header, id: u64, nr: u32, flags: u32, heap: bool) {
    let Some(scratch) = STACK_SCRATCH.get_ptr(0) else {
        return;
    };
    // A stack goes with the record that names it: the allocator's ring or the other.
    let ring = if heap { &HEAP_EVENTS } else { &EVENTS };
    let Some(mut entry) = ring.reserve::<StackEvent>(0) else {
        count_drop(drop_reason::STACK_RINGBUF);
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points to a reserved, writable StackEvent; `frames` to the scratch.
    unsafe {
        (*record).hdr = hdr;
        (*record).stack_id = id;
        (*record).nr = nr;
        (*record).flags = flags;
        core::ptr::copy_nonoverlapping(&raw const (*scratch).frames, &raw mut (*record).frames, 1);
    }
    // Stacks precede the event that refers to them; that event's wakeup covers both.
    entry.submit(1);
    // Mark it sent only once it really was, so a lost stack is sent again next time.
    if let Some(slot) = seen_slot(id) {
        // SAFETY: as in `capture`.
        unsafe { *slot = id };
    }
}
