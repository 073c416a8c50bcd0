//! What the stages after the kernel boundary ask the system: a process's name, maps, working
//! directory and limits, a temp file's size, where a process lives, the clocks.
//!
//! [`Host`] is that narrow interface. [`Live`] answers from procfs, cgroupfs and the clocks,
//! which needs privileges for other users' processes; a recording answers in tests
//! (`crate::driver::record`), so decode → track → report → export run unprivileged.
use std::{
    cell::RefCell,
    fs::{self, File},
    io,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    report::TracerUsage,
    targets::{
        cgroup::{self, Attribution, OomKillCounters},
        procfs::{self, Mapping},
    },
};

/// The questions the tracking stages ask about processes and files.
pub trait Host {
    /// The command name of `pid`, or `?`.
    fn comm(&self, pid: u32) -> String;
    /// `/proc/PID/maps`, parsed; `NotFound` once the process is gone.
    fn maps(&self, pid: u32) -> io::Result<Vec<Mapping>>;
    /// The file behind a file mapping of `pid`, held open for probes and symbols; `None`
    /// where only the mapping's name is known (a recording).
    fn open_module(&self, pid: u32, m: &Mapping) -> io::Result<Option<File>>;
    /// The target of the symbolic link `/proc/PID/NAME` (`cwd`, `fd/3`).
    fn proc_link(&self, pid: u32, name: &str) -> Option<String>;
    /// The soft `RLIMIT_NOFILE` of `pid`.
    fn open_files_limit(&self, pid: u32) -> Option<u64>;
    /// Whether the file at `path` (as `pid` sees it) was born at about `at_mono_ns`: `None`
    /// when its filesystem keeps no birth time or it is gone.
    fn born_at(&self, pid: u32, path: &str, at_mono_ns: u64) -> Option<bool>;
    /// The size on disk now of a temp file `pid` created: through its descriptor `fd` when
    /// it is unnamed, else by `path`. `None` when it is gone.
    fn file_size(&self, pid: u32, path: &str, fd: Option<i32>) -> Option<u64>;
    /// Where `pid` lives (memory cgroup, container, pod, limit), while it exists.
    fn attribution(&self, pid: u32) -> Option<Attribution>;
    /// Where the victim of the OOM kill just seen lived (`remembered`: as read earlier).
    fn victim_attribution(&self, pid: u32, remembered: Option<&Attribution>)
    -> Option<Attribution>;
    /// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of the kernel side's timestamps.
    fn now_ns(&self) -> u64;
    /// Wall-clock time now, RFC 3339 UTC.
    fn utc_now(&self) -> String;
    /// leaktrace's own CPU time and peak memory so far.
    fn usage(&self) -> TracerUsage;
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel and the host, as uname(2) tells them: `("Linux 6.18.0 x86_64", "node-1")`.
pub fn system() -> Option<(String, String)> {
    // SAFETY: `utsname` is plain data; uname fills it and we read it only on success.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let text = |field: &[libc::c_char]| {
        let bytes: Vec<u8> = field
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let kernel = format!(
        "{} {} {}",
        text(&uts.sysname),
        text(&uts.release),
        text(&uts.machine)
    );
    Some((kernel, text(&uts.nodename)))
}

/// How far a coarse filesystem clock may lag the event's timestamp (a few ticks).
const BIRTH_SLACK: Duration = Duration::from_millis(20);

/// The live system.
#[derive(Debug)]
pub struct Live {
    /// OOM kills per memory cgroup, to place victims already gone.
    counters: RefCell<Option<OomKillCounters>>,
}

impl Live {
    /// Reads the OOM-kill counters of every memory cgroup now, to tell later which one a
    /// kill hit.
    pub fn new() -> Self {
        Self {
            counters: RefCell::new(OomKillCounters::new()),
        }
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

impl Host for Live {
    fn comm(&self, pid: u32) -> String {
        procfs::comm(pid)
    }

    fn maps(&self, pid: u32) -> io::Result<Vec<Mapping>> {
        procfs::read_maps(pid)
    }

    fn open_module(&self, pid: u32, m: &Mapping) -> io::Result<Option<File>> {
        open_mapped(pid, m).map(Some)
    }

    fn proc_link(&self, pid: u32, name: &str) -> Option<String> {
        let target = fs::read_link(procfs::path(pid, name)).ok()?;
        Some(target.to_string_lossy().into_owned())
    }

    fn open_files_limit(&self, pid: u32) -> Option<u64> {
        procfs::open_files_limit(pid)
    }

    fn born_at(&self, pid: u32, path: &str, at_mono_ns: u64) -> Option<bool> {
        let rooted = procfs::path(pid, "root").join(path.trim_start_matches('/'));
        let meta = fs::metadata(&rooted).or_else(|_| fs::metadata(path)).ok()?;
        let birth = meta.created().ok()?;
        let ago = Duration::from_nanos(monotonic_ns().saturating_sub(at_mono_ns));
        let at = SystemTime::now().checked_sub(ago)?;
        Some(birth + BIRTH_SLACK >= at && birth <= at + Duration::from_millis(5))
    }

    fn file_size(&self, pid: u32, path: &str, fd: Option<i32>) -> Option<u64> {
        let meta = match fd {
            // Reachable only through the descriptor.
            Some(fd) => fs::metadata(procfs::path(pid, &format!("fd/{fd}"))),
            // Through the process's root while it lives (containers), else directly.
            None => fs::metadata(procfs::path(pid, "root").join(path.trim_start_matches('/')))
                .or_else(|_| fs::metadata(path)),
        };
        Some(meta.ok()?.len())
    }

    fn attribution(&self, pid: u32) -> Option<Attribution> {
        cgroup::attribution(pid)
    }

    /// The memory cgroup whose OOM-kill count went up (read at once; the count lands just
    /// after the tracepoint, hence the short retries), else its `/proc/PID/cgroup` if it is
    /// still there, else as remembered.
    fn victim_attribution(
        &self,
        pid: u32,
        remembered: Option<&Attribution>,
    ) -> Option<Attribution> {
        let read = cgroup::memory_cgroup_of(pid);
        let hint = read
            .as_ref()
            .map(|(p, _)| p.clone())
            .filter(|p| p != "/")
            .or_else(|| remembered.map(|p| p.cgroup.clone()));
        if let Some(counters) = self.counters.borrow_mut().as_mut() {
            for attempt in 0..5 {
                if let Some((path, v2)) = counters.attribute(hint.as_deref()) {
                    return Some(cgroup::attribution_at(&path, v2));
                }
                std::thread::sleep(Duration::from_millis(2 << attempt));
            }
        }
        match read {
            Some((path, v2)) if path != "/" => Some(cgroup::attribution_at(&path, v2)),
            _ => remembered
                .cloned()
                .or_else(|| read.map(|(p, v2)| cgroup::attribution_at(&p, v2))),
        }
    }

    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }

    fn utc_now(&self) -> String {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        crate::track::oom::rfc3339(secs)
    }

    fn usage(&self) -> TracerUsage {
        TracerUsage::current()
    }
}

/// Opens the file behind a mapping: through the process's root (works across mount
/// namespaces) when that still names the mapped inode, else through `map_files`, which
/// reaches it even when it was deleted or replaced.
fn open_mapped(pid: u32, m: &Mapping) -> io::Result<File> {
    use std::os::unix::fs::MetadataExt as _;
    let rooted = procfs::path(pid, "root").join(m.path.trim_start_matches('/'));
    if let Ok(file) = File::open(&rooted)
        && let Ok(meta) = file.metadata()
        && (meta.dev(), meta.ino()) == (m.dev, m.inode)
    {
        return Ok(file);
    }
    File::open(procfs::path(
        pid,
        &format!("map_files/{:x}-{:x}", m.start, m.end),
    ))
}
