//! Unwinding: what the kernel-side stack walker needs from user space for each module.
//!
//! The walker in `leaktrace-ebpf` follows compact per-module tables. An [`Unwinder`] compiles
//! them, once per module, whichever processes map it; [`dwarf::Dwarf`] is the native one,
//! from `.eh_frame`/`.debug_frame`. Interpreter frames (Python) will be a second.
use std::path::Path;

pub mod dwarf;

pub use dwarf::{Dwarf, Regs, UnwindError, UnwindTable, WalkEnd, compile, compile_path, walk};

/// Compiles what the kernel-side walker needs to step through one module's code.
pub trait Unwinder {
    /// A short name for logs (`dwarf`).
    fn name(&self) -> &'static str;

    /// The table of the module at `path`, or why it has none (its frames then fall back to
    /// frame pointers).
    fn compile(&self, path: &Path) -> Result<UnwindTable, UnwindError>;
}

/// How stacks are walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Unwind {
    /// Frame pointers only.
    Fp,
    /// Unwind tables only: a frame without one ends the stack.
    Dwarf,
    /// Unwind tables where a module has them, frame pointers elsewhere.
    #[default]
    Auto,
}

impl Unwind {
    /// The kernel side's [`leaktrace_common::unwind_mode`].
    pub fn mode(self) -> u32 {
        match self {
            Unwind::Fp => leaktrace_common::unwind_mode::FP,
            Unwind::Auto => leaktrace_common::unwind_mode::AUTO,
            Unwind::Dwarf => leaktrace_common::unwind_mode::DWARF,
        }
    }
}
