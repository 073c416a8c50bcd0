//! Descriptor and temp-file records, from decode to tables: which descriptor kinds the calls
//! create, which opens make temp files, paths made absolute while the process lives.
use std::{
    fs,
    time::{Duration, SystemTime},
};

use hashbrown::HashMap;
use leaktrace_common::{fd_call, fd_op, features};

use crate::{
    decode::FdRecord,
    report::TmpRow,
    targets::procfs,
    track::fd::{Creation, FdKind, FdTables},
    track::heap::StackId,
    track::tmp::{self, TmpFile, TmpFiles},
};

const O_CREAT: u32 = 0o100;
const O_EXCL: u32 = 0o200;
const O_TMPFILE: u32 = 0o20000000 | 0o200000;
const O_CLOEXEC: u32 = 0o2000000;
const FD_CLOEXEC: u32 = 1;
const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
const AT_FDCWD: i32 = -100;

/// What a creating call makes.
pub fn kind_of_call(call: u16) -> FdKind {
    match call {
        fd_call::OPEN | fd_call::OPENAT | fd_call::OPENAT2 | fd_call::CREAT => FdKind::File,
        fd_call::SOCKET | fd_call::SOCKETPAIR | fd_call::ACCEPT | fd_call::ACCEPT4 => {
            FdKind::Socket
        }
        fd_call::PIPE | fd_call::PIPE2 => FdKind::Pipe,
        _ => FdKind::Other,
    }
}

/// Whether an open made a file worth watching as a temp file, and whether it is unnamed:
/// an unnamed one (`O_TMPFILE`), one it must have created (`O_CREAT|O_EXCL`), or one an
/// `O_CREAT` open created, as the file's birth time says (`born`: `None` where the
/// filesystem keeps none; then only in a temp directory, where reopening is rare).
pub fn temp_creation(
    flags: u32,
    abs_path: &str,
    born: impl FnOnce() -> Option<bool>,
) -> Option<bool> {
    if flags & O_TMPFILE == O_TMPFILE {
        return Some(true);
    }
    if flags & O_CREAT == 0 {
        return None;
    }
    if flags & O_EXCL != 0 {
        return Some(false);
    }
    match born() {
        Some(created) => created.then_some(false),
        None => tmp::in_temp_dir(abs_path).then_some(false),
    }
}

/// How far a coarse filesystem clock may lag the event's timestamp (a few ticks).
const BIRTH_SLACK: Duration = Duration::from_millis(20);

/// Whether the file at `path` (as `pid` sees it) was born at about `at_mono_ns`, the
/// monotonic time of the open that returned: `None` when its filesystem keeps no birth
/// time or it is gone.
pub fn born_at(pid: u32, path: &str, at_mono_ns: u64) -> Option<bool> {
    let rooted = procfs::path(pid, "root").join(path.trim_start_matches('/'));
    let meta = fs::metadata(&rooted).or_else(|_| fs::metadata(path)).ok()?;
    let birth = meta.created().ok()?;
    let ago = Duration::from_nanos(crate::driver::monotonic_ns().saturating_sub(at_mono_ns));
    let at = SystemTime::now().checked_sub(ago)?;
    Some(birth + BIRTH_SLACK >= at && birth <= at + Duration::from_millis(5))
}

/// Makes a path the process passed absolute: relative to its working directory or to
/// `dirfd`, read while it lives (`cwd`: the working directory to assume once it is gone).
/// A path that cannot be resolved stays as given.
pub fn resolve(pid: u32, dirfd: i32, path: &str, cwd: Option<&str>) -> String {
    if path.starts_with('/') {
        return tmp::normalize("/", path);
    }
    let base = if dirfd == AT_FDCWD {
        "cwd".to_owned()
    } else {
        format!("fd/{dirfd}")
    };
    match fs::read_link(procfs::path(pid, &base)) {
        Ok(dir) => tmp::normalize(&dir.to_string_lossy(), path),
        Err(_) => match cwd {
            Some(dir) if dirfd == AT_FDCWD => tmp::normalize(dir, path),
            _ => path.to_owned(),
        },
    }
}

/// A descriptor table that filled up: what the session reports at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub pid: u32,
    pub stack_id: StackId,
    pub errno: i32,
}

/// Descriptors and temp files of all traced processes.
#[derive(Debug, Default)]
pub struct FdTracker {
    pub fds: FdTables,
    pub tmp: TmpFiles,
    /// Bits of [`features`].
    pub features: u32,
    /// Each process's soft `RLIMIT_NOFILE`, as read at attach and set since: an `EMFILE`
    /// names it even when the process is gone by the time the record is read.
    limits: HashMap<u32, u64>,
    /// Each process's working directory as last read, for paths read after it exited.
    cwds: HashMap<u32, String>,
}

impl FdTracker {
    pub fn new(features: u32) -> Self {
        Self {
            features,
            ..Default::default()
        }
    }

    fn tracks(&self, feature: u32) -> bool {
        self.features & feature != 0
    }

    /// Applies one record; a full descriptor table comes back for the session to report.
    pub fn on_record(&mut self, r: &FdRecord<'_>, at_ms: u32) -> Option<Exhausted> {
        let e = &r.event;
        let pid = e.hdr.pid;
        let path = r.path.map(|p| {
            let cwd = self.cwds.get(&pid).map(String::as_str);
            resolve(pid, e.dirfd, &String::from_utf8_lossy(p), cwd)
        });
        let cloexec = e.flags & O_CLOEXEC != 0;
        match e.op {
            fd_op::OPEN => {
                if self.tracks(features::FD) {
                    let how = Creation {
                        stack: e.stack_id,
                        kind: kind_of_call(e.syscall),
                        cloexec,
                        path: path.as_deref(),
                        born_ms: at_ms,
                    };
                    match e.syscall {
                        fd_call::DUP | fd_call::DUP2 | fd_call::DUP3 | fd_call::FCNTL => {
                            self.fds.dup(pid, e.fd, e.fd2, &how)
                        }
                        _ => {
                            self.fds.open(pid, e.fd, &how);
                            if e.fd2 >= 0 {
                                // The second end of a pipe or socketpair.
                                self.fds.open(pid, e.fd2, &Creation { path: None, ..how });
                            }
                        }
                    }
                }
                if self.tracks(features::TMP)
                    && let Some(path) = path
                    && let Some(unnamed) =
                        temp_creation(e.flags, &path, || born_at(pid, &path, e.hdr.ts_ns))
                {
                    self.tmp.created(TmpFile {
                        pid,
                        stack_id: e.stack_id,
                        path,
                        unnamed,
                        fd: e.fd,
                        created_ms: at_ms,
                    });
                }
            }
            fd_op::CLOSE => {
                if self.tracks(features::FD) {
                    self.fds.close(pid, e.fd);
                }
                self.tmp.closed(pid, e.fd);
            }
            fd_op::CLOSE_RANGE => {
                let cloexec_only = e.flags & CLOSE_RANGE_CLOEXEC != 0;
                self.fds.close_range(pid, e.fd, e.fd2, cloexec_only);
                if !cloexec_only {
                    for fd in e.fd..=e.fd2.min(e.fd.saturating_add(65_536)) {
                        self.tmp.closed(pid, fd);
                    }
                }
            }
            fd_op::SET_CLOEXEC => self.fds.set_cloexec(pid, e.fd, e.flags & FD_CLOEXEC != 0),
            fd_op::FAIL => {
                return Some(Exhausted {
                    pid,
                    stack_id: e.stack_id,
                    errno: e.errno,
                });
            }
            fd_op::NOFILE_LIMIT => {
                let target = if e.fd2 > 0 { e.fd2 as u32 } else { pid };
                self.limits.insert(target, e.value);
            }
            fd_op::UNLINK | fd_op::RENAME_FROM | fd_op::RENAME_TO => {
                if let Some(path) = path {
                    self.tmp.path_gone(&path);
                }
            }
            _ => {}
        }
        None
    }

    /// The process exec'd: close-on-exec descriptors are gone, and unnamed temp files with
    /// them (we keep those whose descriptor survived, when we track descriptors).
    pub fn exec(&mut self, pid: u32) {
        self.fds.exec(pid);
        if !self.tracks(features::FD) {
            self.tmp.process_gone(pid);
        }
    }

    /// Reads what a record may need after the process is gone: its descriptor limit and
    /// working directory.
    pub fn note_process(&mut self, pid: u32) {
        if let Some(limit) = procfs::open_files_limit(pid) {
            self.limits.insert(pid, limit);
        }
        if let Ok(dir) = fs::read_link(procfs::path(pid, "cwd")) {
            self.cwds.insert(pid, dir.to_string_lossy().into_owned());
        }
    }

    /// `child` was forked by `parent`: it inherits the limit and working directory.
    pub fn fork(&mut self, parent: u32, child: u32) {
        if let Some(&limit) = self.limits.get(&parent) {
            self.limits.insert(child, limit);
        }
        if let Some(dir) = self.cwds.get(&parent).cloned() {
            self.cwds.insert(child, dir);
        }
    }

    /// The soft descriptor limit of `pid`, if known.
    pub fn limit(&self, pid: u32) -> Option<u64> {
        self.limits.get(&pid).copied()
    }

    /// The process exited: its descriptors are kept as open at exit; unnamed temp files die.
    pub fn exit(&mut self, pid: u32, at_ms: u32) {
        self.limits.remove(&pid);
        self.cwds.remove(&pid);
        self.fds.exit(pid, at_ms);
        self.tmp.process_gone(pid);
    }

    /// Watched temp files that still exist, with their size now.
    pub fn tmp_rows(&self) -> Vec<TmpRow> {
        self.tmp
            .files()
            .filter_map(|f| {
                let bytes = if f.unnamed {
                    // Reachable only through the descriptor.
                    fs::metadata(procfs::path(f.pid, &format!("fd/{}", f.fd)))
                        .ok()?
                        .len()
                } else {
                    // Through the process's root while it lives (containers), else directly.
                    let rooted = procfs::path(f.pid, "root").join(f.path.trim_start_matches('/'));
                    fs::metadata(&rooted)
                        .or_else(|_| fs::metadata(&f.path))
                        .ok()?
                        .len()
                };
                Some(TmpRow {
                    pid: f.pid,
                    stack_id: f.stack_id,
                    path: f.path.clone(),
                    bytes,
                    created_ms: f.created_ms,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn birth_times_tell_created_from_reopened() {
        let dir = std::env::temp_dir().join(format!("leaktrace-born-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("old");
        std::fs::write(&old, b"x").unwrap();
        let old_born = std::fs::metadata(&old).unwrap().created();
        std::thread::sleep(Duration::from_millis(60));
        let new = dir.join("new");
        std::fs::write(&new, b"y").unwrap();
        let now = crate::driver::monotonic_ns();
        let me = std::process::id();
        if old_born.is_ok() {
            assert_eq!(born_at(me, new.to_str().unwrap(), now), Some(true));
            assert_eq!(born_at(me, old.to_str().unwrap(), now), Some(false));
        }
        assert_eq!(born_at(me, dir.join("gone").to_str().unwrap(), now), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_counts_as_a_temp_file() {
        let unknown = || None;
        let never = || -> Option<bool> { panic!("no need to look") };
        assert_eq!(
            temp_creation(O_CREAT | O_EXCL, "/var/lib/app/x.tmp", never),
            Some(false)
        );
        assert_eq!(
            temp_creation(O_TMPFILE | 0o2, "/var/tmp", never),
            Some(true)
        );
        assert_eq!(
            temp_creation(0, "/tmp/x", never),
            None,
            "opening is not creating"
        );
        // With birth times: what the open created counts, anywhere; what existed does not.
        assert_eq!(
            temp_creation(O_CREAT, "/srv/out/report.csv", || Some(true)),
            Some(false)
        );
        assert_eq!(
            temp_creation(O_CREAT, "/var/log/app.log", || Some(false)),
            None,
            "a log file reopened with O_CREAT was not created"
        );
        assert_eq!(temp_creation(O_CREAT, "/tmp/x", || Some(false)), None);
        // Without: only in temp directories.
        assert_eq!(
            temp_creation(O_CREAT, "/tmp/report.csv", unknown),
            Some(false)
        );
        assert_eq!(temp_creation(O_CREAT, "/var/log/app.log", unknown), None);
    }

    #[test]
    fn calls_make_kinds() {
        assert_eq!(kind_of_call(fd_call::OPENAT), FdKind::File);
        assert_eq!(kind_of_call(fd_call::ACCEPT4), FdKind::Socket);
        assert_eq!(kind_of_call(fd_call::PIPE2), FdKind::Pipe);
        assert_eq!(kind_of_call(fd_call::EVENTFD), FdKind::Other);
        assert_eq!(kind_of_call(fd_call::MEMFD_CREATE), FdKind::Other);
    }

    #[test]
    fn relative_paths_resolve_against_the_process() {
        let me = std::process::id();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            resolve(me, AT_FDCWD, "a/../b", None),
            format!("{}/b", cwd.display())
        );
        assert_eq!(resolve(me, AT_FDCWD, "/tmp//x", None), "/tmp/x");
        assert_eq!(
            resolve(u32::MAX - 1, AT_FDCWD, "rel", None),
            "rel",
            "unresolvable stays as given"
        );
        assert_eq!(
            resolve(u32::MAX - 1, AT_FDCWD, "./rel", Some("/srv/app")),
            "/srv/app/rel",
            "a process gone resolves against its last known working directory"
        );
        assert_eq!(resolve(u32::MAX - 1, 5, "rel", Some("/srv/app")), "rel");
    }
}
