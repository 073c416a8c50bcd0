//! What is traced, as the system shows it: processes read from procfs, commands spawned and
//! held at their first instruction, the modules they map and where an allocator's probes go,
//! the cgroup (container, pod) a process runs in, and the names the node's kubelet gives that
//! pod and container.
pub mod cgroup;
pub mod host;
pub mod modules;
pub mod pods;
pub mod preflight;
pub mod probe_point;
pub mod procfs;
pub mod seccomp;
pub mod spawn;
