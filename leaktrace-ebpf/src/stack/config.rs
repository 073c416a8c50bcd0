//! The settings user space fixes at load time, and their readers.
use leaktrace_common::{Config, unwind_mode};

/// Settings from user space, fixed at load time (the verifier prunes what they turn off).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    unwind: unwind_mode::AUTO,
    measure: 0,
    features: 0,
    sample_bytes: 0,
    self_tgid: 0,
    _pad: 0,
};

#[inline(always)]
pub(super) fn config() -> Config {
    // SAFETY: a plain read of a global user space may patch before loading.
    unsafe { core::ptr::read_volatile(&raw const CONFIG) }
}

/// Allocations are sampled, one byte in this many on average (0: all).
#[inline(always)]
pub fn sample_bytes() -> u32 {
    config().sample_bytes
}

/// Node-wide tracing ([`leaktrace_common::features::NODE`]): every process but this one.
#[inline(always)]
pub fn node_wide_except() -> Option<u32> {
    let c = config();
    (c.features & leaktrace_common::features::NODE != 0).then_some(c.self_tgid)
}

/// Bits of `leaktrace_common::features` this session traces.
#[inline(always)]
pub fn features() -> u32 {
    config().features
}
