//! Descriptor and temp-file records, from decode to tables: which descriptor kinds the calls
//! create, which opens make temp files, paths made absolute while the process lives.
use hashbrown::HashMap;
use leaktrace_common::{
    FdEvent, fd_call, fd_op, features,
    linux::{AT_FDCWD, CLOSE_RANGE_CLOEXEC, FD_CLOEXEC, O_CLOEXEC, O_CREAT, O_EXCL, O_TMPFILE},
};

use crate::{
    decode::FdRecord,
    report::TmpRow,
    targets::host::Host,
    track::fd::{Creation, FdKind, FdTables},
    track::heap::StackId,
    track::tmp::{self, TmpFile, TmpFiles},
};

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

/// Makes a path the process passed absolute: relative to its working directory or to
/// `dirfd`, read while it lives (`cwd`: the working directory to assume once it is gone).
/// A path that cannot be resolved stays as given.
pub fn resolve(host: &dyn Host, pid: u32, dirfd: i32, path: &str, cwd: Option<&str>) -> String {
    if path.starts_with('/') {
        return tmp::normalize("/", path);
    }
    let base = if dirfd == AT_FDCWD {
        "cwd".to_owned()
    } else {
        format!("fd/{dirfd}")
    };
    match host.proc_link(pid, &base) {
        Some(dir) => tmp::normalize(&dir, path),
        None => match cwd {
            Some(dir) if dirfd == AT_FDCWD => tmp::normalize(dir, path),
            _ => path.to_owned(),
        },
    }
}

/// A descriptor table that filled up: what the session reports at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// The process whose table is full.
    pub pid: u32,
    /// The stack of the call that failed.
    pub stack_id: StackId,
    /// `EMFILE` (the process's limit) or `ENFILE` (the system's).
    pub errno: i32,
}

/// Descriptors and temp files of all traced processes.
#[derive(Debug, Default)]
pub struct FdTracker {
    /// Open descriptors per process.
    pub fds: FdTables,
    /// Temp files being watched.
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
    /// An empty tracker; `features` are bits of [`features`].
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
    pub fn on_record(
        &mut self,
        host: &dyn Host,
        r: &FdRecord<'_>,
        at_ms: u32,
    ) -> Option<Exhausted> {
        let e = &r.event;
        let pid = e.hdr.pid;
        let path = r.path.map(|p| {
            let cwd = self.cwds.get(&pid).map(String::as_str);
            resolve(host, pid, e.dirfd, &String::from_utf8_lossy(p), cwd)
        });
        match e.op {
            fd_op::OPEN => self.opened(host, e, path, at_ms),
            fd_op::CLOSE => self.closed(pid, e.fd),
            fd_op::CLOSE_RANGE => self.closed_range(e),
            fd_op::SET_CLOEXEC => self.fds.set_cloexec(pid, e.fd, e.flags & FD_CLOEXEC != 0),
            fd_op::FAIL => {
                return Some(Exhausted {
                    pid,
                    stack_id: e.stack_id,
                    errno: e.errno,
                });
            }
            fd_op::NOFILE_LIMIT => self.limit_set(e),
            fd_op::UNLINK | fd_op::RENAME_FROM | fd_op::RENAME_TO => {
                if let Some(path) = path {
                    self.tmp.path_gone(&path);
                }
            }
            _ => {}
        }
        None
    }

    /// A call made a descriptor (`path`: where it opened, made absolute).
    #[inline]
    fn opened(&mut self, host: &dyn Host, e: &FdEvent, path: Option<String>, at_ms: u32) {
        if self.tracks(features::FD) {
            self.open_fds(e, path.as_deref(), at_ms);
        }
        if self.tracks(features::TMP)
            && let Some(path) = path
        {
            self.maybe_temp_file(host, e, path, at_ms);
        }
    }

    /// Enters the descriptors an open, dup or pipe-like call made into the tables.
    #[inline]
    fn open_fds(&mut self, e: &FdEvent, path: Option<&str>, at_ms: u32) {
        let pid = e.hdr.pid;
        let how = Creation {
            stack: e.stack_id,
            kind: kind_of_call(e.syscall),
            cloexec: e.flags & O_CLOEXEC != 0,
            path,
            born_ms: at_ms,
        };
        match e.syscall {
            fd_call::DUP | fd_call::DUP2 | fd_call::DUP3 | fd_call::FCNTL => {
                self.fds.dup(pid, e.fd, e.fd2, &how);
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

    /// Watches the file an open made at `path` when it is a temp file ([`temp_creation`]).
    #[inline]
    fn maybe_temp_file(&mut self, host: &dyn Host, e: &FdEvent, path: String, at_ms: u32) {
        let pid = e.hdr.pid;
        // Node-wide, a named file is a temp file only in a temp directory (the kernel side
        // sends no other as a candidate; a stack's sampled paths may still be one).
        if self.tracks(features::NODE)
            && e.flags & O_TMPFILE != O_TMPFILE
            && !tmp::in_temp_dir(&path)
        {
            return;
        }
        if let Some(unnamed) =
            temp_creation(e.flags, &path, || host.born_at(pid, &path, e.hdr.ts_ns))
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

    #[inline]
    fn closed(&mut self, pid: u32, fd: i32) {
        if self.tracks(features::FD) {
            self.fds.close(pid, fd);
        }
        self.tmp.closed(pid, fd);
    }

    /// `close_range(fd, fd2)`, or with `CLOSE_RANGE_CLOEXEC` only marking them close-on-exec.
    #[inline]
    fn closed_range(&mut self, e: &FdEvent) {
        let pid = e.hdr.pid;
        let cloexec_only = e.flags & CLOSE_RANGE_CLOEXEC != 0;
        self.fds.close_range(pid, e.fd, e.fd2, cloexec_only);
        if !cloexec_only {
            for fd in e.fd..=e.fd2.min(e.fd.saturating_add(65_536)) {
                self.tmp.closed(pid, fd);
            }
        }
    }

    /// A new soft descriptor limit (`value`) for process `fd2`, or for the caller when 0.
    #[inline]
    fn limit_set(&mut self, e: &FdEvent) {
        let target = if e.fd2 > 0 { e.fd2 as u32 } else { e.hdr.pid };
        self.limits.insert(target, e.value);
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
    pub fn note_process(&mut self, host: &dyn Host, pid: u32) {
        if let Some(limit) = host.open_files_limit(pid) {
            self.limits.insert(pid, limit);
        }
        if let Some(dir) = host.proc_link(pid, "cwd") {
            self.cwds.insert(pid, dir);
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

    /// The process exited: its descriptors are kept as open at exit (`keep`) or forgotten;
    /// unnamed temp files die.
    pub fn exit(&mut self, pid: u32, at_ms: u32, keep: bool) {
        self.limits.remove(&pid);
        self.cwds.remove(&pid);
        if keep {
            self.fds.exit(pid, at_ms);
        } else {
            self.fds.discard(pid);
        }
        self.tmp.process_gone(pid);
    }

    /// Watched temp files that still exist, with their size now.
    /// In creation order (then by path), so sample paths come out the same every time.
    pub fn tmp_rows(&self, host: &dyn Host) -> Vec<TmpRow> {
        let mut files: Vec<&TmpFile> = self.tmp.files().collect();
        files.sort_by(|a, b| (a.pid, a.created_ms, &a.path).cmp(&(b.pid, b.created_ms, &b.path)));
        files
            .into_iter()
            .filter_map(|f| {
                let fd = f.unnamed.then_some(f.fd);
                Some(TmpRow {
                    pid: f.pid,
                    stack_id: f.stack_id,
                    path: f.path.clone(),
                    bytes: host.file_size(f.pid, &f.path, fd)?,
                    created_ms: f.created_ms,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::host::Live;

    #[test]
    fn node_wide_only_temp_directories_and_unnamed_files_are_temp_files() {
        let host = Live::new();
        let open = |tracker: &mut FdTracker, fd: i32, flags: u32, path: &str| {
            let event = FdEvent {
                hdr: leaktrace_common::Header {
                    kind: leaktrace_common::kind::FD_PATH,
                    flags: 0,
                    pid: u32::MAX - 1,
                    tid: u32::MAX - 1,
                    _pad: 0,
                    ts_ns: 0,
                },
                op: fd_op::OPEN,
                syscall: fd_call::OPENAT,
                fd,
                fd2: -1,
                flags,
                errno: 0,
                dirfd: AT_FDCWD,
                stack_id: 7,
                value: 0,
            };
            let r = FdRecord {
                event,
                path: Some(path.as_bytes()),
            };
            tracker.on_record(&host, &r, 0);
        };
        let made = |features: u32| {
            let mut t = FdTracker::new(features);
            open(&mut t, 3, O_CREAT | O_EXCL, "/srv/data/x.db");
            open(&mut t, 4, O_CREAT | O_EXCL, "/tmp/x.tmp");
            open(&mut t, 5, O_TMPFILE | 0o2, "/srv/data");
            let mut paths: Vec<String> = t.tmp.files().map(|f| f.path.clone()).collect();
            paths.sort();
            paths
        };
        assert_eq!(
            made(features::FD | features::TMP),
            ["/srv/data", "/srv/data/x.db", "/tmp/x.tmp"]
        );
        assert_eq!(
            made(features::FD | features::TMP | features::NODE),
            ["/srv/data", "/tmp/x.tmp"]
        );
    }

    #[test]
    fn birth_times_tell_created_from_reopened() {
        let dir = std::env::temp_dir().join(format!("leaktrace-born-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("old");
        std::fs::write(&old, b"x").unwrap();
        let old_born = std::fs::metadata(&old).unwrap().created();
        std::thread::sleep(std::time::Duration::from_millis(60));
        let new = dir.join("new");
        std::fs::write(&new, b"y").unwrap();
        let host = Live::new();
        let now = host.now_ns();
        let me = std::process::id();
        let born_at = |path: &std::path::Path| host.born_at(me, path.to_str().unwrap(), now);
        if old_born.is_ok() {
            assert_eq!(born_at(&new), Some(true));
            assert_eq!(born_at(&old), Some(false));
        }
        assert_eq!(born_at(&dir.join("gone")), None);
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
            resolve(&Live::new(), me, AT_FDCWD, "a/../b", None),
            format!("{}/b", cwd.display())
        );
        assert_eq!(
            resolve(&Live::new(), me, AT_FDCWD, "/tmp//x", None),
            "/tmp/x"
        );
        assert_eq!(
            resolve(&Live::new(), u32::MAX - 1, AT_FDCWD, "rel", None),
            "rel",
            "unresolvable stays as given"
        );
        assert_eq!(
            resolve(
                &Live::new(),
                u32::MAX - 1,
                AT_FDCWD,
                "./rel",
                Some("/srv/app")
            ),
            "/srv/app/rel",
            "a process gone resolves against its last known working directory"
        );
        assert_eq!(
            resolve(&Live::new(), u32::MAX - 1, 5, "rel", Some("/srv/app")),
            "rel"
        );
    }
}
