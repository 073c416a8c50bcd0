//! leaktrace: find the call stacks that leak memory in a live process, with eBPF.
//!
//! The pipeline runs one way:
//!
//! ```text
//! ebpf (load, attach) → ring buffer → decode → table (outstanding per stack)
//!     → symbolize (after exit too) → report → write (table | json | folded)
//! ```
//!
//! [`session`] ties it together; everything but [`ebpf`], [`preflight`] and [`spawn`] is pure
//! and runs in unit tests without privileges.
pub mod cgroup;
pub mod decode;
pub mod ebpf;
pub mod fdtable;
pub mod fdtrack;
pub mod modules;
pub mod oomwatch;
pub mod placement;
pub mod preflight;
pub mod procfs;
pub mod report;
pub mod session;
pub mod spawn;
pub mod stacks;
pub mod symbolize;
pub mod table;
pub mod tmpfiles;
pub mod unwind;
pub mod write;
