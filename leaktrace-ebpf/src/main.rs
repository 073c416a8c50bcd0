//! leaktrace's kernel side.
//!
//! One module per hook family: [`alloc`] (allocator uprobes), [`proc`] (process lifecycle
//! tracepoints and the loader gate). Every event that carries a stack gets it from
//! [`stack::capture`], the one stack walker. Records leave through the `EVENTS` ring buffer
//! ([`maps`]); anything that cannot be sent is counted in `DROPS`.
#![no_std]
#![no_main]

mod alloc;
mod fd;
mod growth;
mod maps;
mod oom;
mod proc;
mod stack;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_probe_read_user, bpf_send_signal and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
