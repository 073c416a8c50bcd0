//! leaktrace: find the call stacks that leak memory, descriptors and temp files in a live
//! process, with eBPF.
//!
//! One way through, one stage per module:
//!
//! ```text
//!  kernel (leaktrace-ebpf) ─ring buffer─► decode ─► track ─► symbolize ─► report ─► export
//!         ▲                                  ▲
//!      source ◄──────── driver ────────► targets
//!  (load, attach,      (--pid, run:     (procfs, spawn, modules,
//!   maps, counters)     wires stages)    probe points, cgroups)
//! ```
//!
//! - **Born**: an event is born in one eBPF program per hook family (`leaktrace-ebpf`), and
//!   crosses the kernel boundary as a fixed-size record whose layout, kind tag and every
//!   program and map name live in `leaktrace-common`. [`source`] loads those programs,
//!   attaches them from `leaktrace-common`'s catalogues and reads the kernel's counters; it
//!   is the only module that touches aya. [`unwind`] compiles the per-module tables the
//!   kernel-side stack walker follows.
//! - **Decoded**: [`decode`] is the one place that reads a record's bytes, checking its
//!   length and kind.
//! - **Counted**: [`track`] holds the trackers (heap blocks, descriptors, temp files, OOM
//!   history), pure bookkeeping that knows nothing of BPF, files or formats.
//! - **Named**: late, on a snapshot: [`symbolize`] turns frames placed in their modules into
//!   functions, files and lines; [`report`] merges rows per process and stack, ranks them and
//!   tells how fast each grows.
//! - **Leaves**: through [`export`], one module per format (table, JSON, folded stacks).
//! - **Privilege**: everything that asks the system about a process goes through
//!   [`targets`] ([`targets::host::Host`]), so [`driver::Pipeline`] (decode → track →
//!   symbolize → report) runs in unit tests without privileges, fed by a recorded session
//!   ([`driver::record`]).
//! - **Drivers**: [`driver`] wires the stages for `--pid` and `run`; it holds policy (what
//!   to attach when a process execs or forks) and the event loop, nothing a stage needs.
pub mod decode;
pub mod driver;
pub mod export;
pub mod report;
pub mod source;
pub mod symbolize;
pub mod targets;
pub mod track;
pub mod unwind;
