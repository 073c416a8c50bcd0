//! Trackers: pure bookkeeping of what is outstanding, per process and stack. They know
//! nothing of BPF, files or formats; the driver feeds them decoded events.
pub mod fd;
pub mod fd_events;
pub mod heap;
pub mod oom;
pub mod tmp;
