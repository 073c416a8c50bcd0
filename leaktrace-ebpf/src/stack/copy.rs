//! Reading the stack being walked: from a per-CPU copy of its top, made a chunk at a time.
use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_probe_read_user, macros::map, maps::PerCpuArray};

use super::{cache::record_read, walk::Walk};

/// The stack is copied in chunks of this many bytes, on demand, from the chunk holding the
/// starting sp upwards: 32 chunks, 32 KiB, the most a per-CPU map value may hold. Smaller
/// chunks copy less of what no frame needs; each is one helper call.
pub(super) const CHUNK: u64 = 1024;
const COPY_CHUNKS: u64 = 32;

/// A per-CPU copy of the top of the stack being walked.
///
/// Each `bpf_probe_read_user` is a helper call (~170 ns on this kind of VM); a walk reads one
/// or two words per frame. Copying the stack a chunk at a time, on demand, then reading
/// frames from the copy costs a call per chunk instead. The memory above the starting sp
/// holds the live frames of the callers, so it is resident; a chunk that cannot be read
/// (the end of the stack mapping) falls back to reading words one by one.
#[repr(C)]
pub struct StackCopy {
    bytes: [u8; (COPY_CHUNKS * CHUNK) as usize],
}

#[map]
pub(super) static STACK_COPY: PerCpuArray<StackCopy> = PerCpuArray::with_max_entries(1, 0);

/// Makes chunk `chunk` of the copy (relative to `w.base`) available. False: read directly.
#[inline(always)]
fn copy_chunk(w: &mut Walk, chunk: u64) -> bool {
    if chunk >= COPY_CHUNKS {
        return false;
    }
    let bit = 1u32 << chunk;
    if w.copied & bit != 0 {
        return true;
    }
    if w.failed & bit != 0 {
        return false;
    }
    let Some(copy) = STACK_COPY.get_ptr_mut(0) else {
        return false;
    };
    // Whole chunks, the first included: the part of it below sp is in the same mapped page,
    // and a fixed size keeps the verifier's bounds simple.
    let at = chunk * CHUNK;
    // SAFETY: `chunk < COPY_CHUNKS`, so `at + CHUNK` is within the per-CPU buffer; the helper
    // checks the user range and never faults the target.
    let r = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            (copy as *mut u8).add(at as usize).cast(),
            CHUNK as u32,
            (w.base + at) as *const c_void,
        )
    };
    if r == 0 {
        w.copied |= bit;
        true
    } else {
        w.failed |= bit;
        false
    }
}

/// Reads a word of the stack being walked, recorded for the walk cache.
#[inline(always)]
pub(super) fn read(w: &mut Walk, addr: u64) -> Option<u64> {
    let value = read_unrecorded(w, addr)?;
    if w.cacheable != 0 {
        record_read(w, addr.wrapping_sub(w.start_sp), value);
    }
    Some(value)
}

/// Reads a word of the stack being walked: from the copy when it covers `addr`. A word
/// read directly (outside the copy) makes the walk uncacheable.
#[inline(always)]
pub(super) fn read_unrecorded(w: &mut Walk, addr: u64) -> Option<u64> {
    if addr >= w.start_sp && addr - w.base <= COPY_CHUNKS * CHUNK - 8 {
        let rel = addr - w.base;
        if copy_chunk(w, rel / CHUNK) && copy_chunk(w, (rel + 7) / CHUNK) {
            let copy = STACK_COPY.get_ptr(0)?;
            let rel = rel as usize;
            if rel <= (COPY_CHUNKS * CHUNK - 8) as usize {
                // SAFETY: `rel + 8` is within the buffer, checked above.
                return Some(unsafe {
                    core::ptr::read_unaligned((copy as *const u8).add(rel).cast::<u64>())
                });
            }
        }
    }
    w.cacheable = 0;
    // SAFETY: bpf_probe_read_user checks the address and never faults the target.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}
