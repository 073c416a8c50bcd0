//! The OOM killer's choice of victim, for every process on the node: the record users need
//! after an `Exit Code: 137`. Rare, so it always wakes user space at once.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use leaktrace_common::{OomEvent, drop_reason, kind};

use crate::maps::{header, send_now};

// name: mark_victim
// field:int pid;	offset:8;	size:4;	signed:1;
// field:__data_loc char[] comm;	offset:12;	size:4;	signed:0;
// field:unsigned long total_vm;	offset:16;	size:8;	signed:0;
// field:unsigned long anon_rss;	offset:24;	size:8;	signed:0;
// field:unsigned long file_rss;	offset:32;	size:8;	signed:0;
// field:unsigned long shmem_rss;	offset:40;	size:8;	signed:0;
// field:uid_t uid;	offset:48;	size:4;	signed:0;
// field:unsigned long pgtables;	offset:56;	size:8;	signed:0;
// field:short oom_score_adj;	offset:64;	size:2;	signed:1;
#[tracepoint]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the format above.
    let read = |off: usize| unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0);
    let mut event = OomEvent {
        hdr: header(kind::OOM),
        // SAFETY: as above.
        victim: unsafe { ctx.read_at::<u32>(8) }.unwrap_or(0),
        // SAFETY: as above.
        oom_score_adj: i32::from(unsafe { ctx.read_at::<i16>(64) }.unwrap_or(0)),
        total_vm_kb: read(16),
        anon_rss_kb: read(24),
        file_rss_kb: read(32),
        shmem_rss_kb: read(40),
        comm: [0; 16],
    };
    // __data_loc: offset in the low 16 bits, length in the high 16, from the record start.
    // SAFETY: as above.
    let loc = unsafe { ctx.read_at::<u32>(12) }.unwrap_or(0);
    let (off, len) = ((loc & 0xffff) as usize, (loc >> 16) as usize);
    if len > 0 && off < 256 {
        // SAFETY: reads inside the tracepoint record.
        if let Ok(comm) = unsafe { ctx.read_at::<[u8; 16]>(off) } {
            event.comm = comm;
        }
    }
    send_now(&event, drop_reason::OOM_RINGBUF);
    0
}
