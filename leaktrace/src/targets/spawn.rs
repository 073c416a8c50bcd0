//! Starting the command of `leaktrace run` so that it is traced from its first instruction.
//!
//! The child is forked and held before `execve` until the tracer has registered its pid;
//! released, it execs, and the kernel side stops it right after exec so the allocator probes
//! are in place before the dynamic loader runs any of its code.
use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

/// Why the command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command not found: {0}")]
    /// No executable of this name in `PATH` (empty: no command given).
    NotFound(String),
    /// `execve` of the command failed (not executable, not a valid binary, ...).
    #[error("cannot execute {path}: {source}")]
    Exec {
        /// The resolved path of the command.
        path: PathBuf,
        /// Why `execve` failed.
        source: io::Error,
    },
    #[error("cannot start {0}: {1}")]
    /// A system call (named) failed before the exec.
    Os(&'static str, io::Error),
    #[error("argument contains a NUL byte")]
    /// An argument contains a NUL byte, which `execve` cannot pass.
    Nul,
}

impl SpawnError {
    /// The shell's exit code for this failure: 127 when not found, 126 when not executable.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::NotFound(_) => 127,
            SpawnError::Exec { source, .. } if source.kind() == io::ErrorKind::NotFound => 127,
            _ => 126,
        }
    }
}

/// Finds `cmd` the way a shell does: as given when it contains a `/`, else along `PATH`.
pub fn resolve(cmd: &OsStr) -> Result<PathBuf, SpawnError> {
    if cmd.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(cmd));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(cmd))
        .find(|p| is_executable(p))
        .ok_or_else(|| SpawnError::NotFound(cmd.to_string_lossy().into_owned()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn cstring(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Os("pipe", io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A forked child waiting to exec.
#[derive(Debug)]
pub struct Held {
    /// The child's pid.
    pub pid: u32,
    path: PathBuf,
    go: OwnedFd,
    exec_error: OwnedFd,
}

/// Forks a child that will exec `argv` once released. With `stdout_to_stderr`, the child's
/// standard output goes to our standard error (so ours carries only the report).
pub fn hold(argv: &[OsString], stdout_to_stderr: bool) -> Result<Held, SpawnError> {
    let cmd = argv.first().ok_or(SpawnError::NotFound(String::new()))?;
    let path = resolve(cmd)?;
    // Everything the child needs is prepared before fork: after it, only async-signal-safe calls.
    let c_path = cstring(path.as_os_str())?;
    let c_args = argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    c_argv.push(std::ptr::null());
    let c_env = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut c_envp: Vec<*const libc::c_char> = c_env.iter().map(|a| a.as_ptr()).collect();
    c_envp.push(std::ptr::null());

    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // SAFETY: the child only calls async-signal-safe functions before execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::Os("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls on descriptors and memory prepared above.
        unsafe {
            if stdout_to_stderr {
                libc::dup2(2, 1);
            }
            // Rust ignores SIGPIPE; the program must start with the default.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut byte = 0u8;
            if libc::read(go_r.as_raw_fd(), (&raw mut byte).cast(), 1) != 1 {
                libc::_exit(127);
            }
            libc::execve(c_path.as_ptr(), c_argv.as_ptr(), c_envp.as_ptr());
            let errno = *libc::__errno_location();
            libc::write(err_w.as_raw_fd(), (&raw const errno).cast(), 4);
            libc::_exit(127);
        }
    }
    drop((go_r, err_w));
    Ok(Held {
        pid: pid as u32,
        path,
        go: go_w,
        exec_error: err_r,
    })
}

impl Held {
    /// Lets the child exec and waits until it has (or failed to).
    pub fn release(self) -> Result<u32, SpawnError> {
        let Held {
            pid,
            path,
            go,
            exec_error,
        } = self;
        // SAFETY: writing one byte from a valid buffer to our pipe.
        if unsafe { libc::write(go.as_raw_fd(), [1u8].as_ptr().cast(), 1) } != 1 {
            return Err(SpawnError::Os("write", io::Error::last_os_error()));
        }
        drop(go);
        let mut errno = [0u8; 4];
        // The write end is close-on-exec: EOF means the exec succeeded.
        let n = loop {
            // SAFETY: reading into a 4-byte buffer.
            let n = unsafe { libc::read(exec_error.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n == 4 {
            // Reap the child that failed to exec.
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
            return Err(SpawnError::Exec {
                path,
                source: io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
            });
        }
        Ok(pid)
    }

    /// Gives up on the child: it exits without running the command.
    pub fn abandon(self) {
        let pid = self.pid as i32;
        drop(self);
        // SAFETY: our own child, blocked in read; closing `go` made it _exit.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
}

/// A started child, to wait for.
#[derive(Debug)]
pub struct Child {
    /// The child's pid.
    pub pid: u32,
    pidfd: OwnedFd,
}

impl Child {
    /// Watches our child `pid` through a pidfd (readable once it has exited).
    pub fn watch(pid: u32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pidfd_open succeeded, so `fd` is a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { pid, pidfd })
    }

    /// The pidfd, readable once the child has exited (for the event loop to poll).
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Reaps the child if it has exited: its exit code, or 128 + signal like a shell.
    pub fn try_wait(&self) -> io::Result<Option<i32>> {
        // SAFETY: zeroed siginfo is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child's pidfd.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: si_pid/si_status are valid for SIGCHLD siginfo filled by waitid.
        let (pid, status, code) = unsafe { (info.si_pid(), info.si_status(), info.si_code) };
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some(if code == libc::CLD_EXITED {
            status
        } else {
            128 + status
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_along_path_and_reports_missing_commands() {
        assert!(resolve(OsStr::new("sh")).unwrap().is_absolute());
        assert_eq!(resolve(OsStr::new("./x")).unwrap(), PathBuf::from("./x"));
        let err = resolve(OsStr::new("no-such-command-leaktrace")).unwrap_err();
        assert_eq!(err.exit_code(), 127);
        assert_eq!(
            err.to_string(),
            "command not found: no-such-command-leaktrace"
        );
    }

    #[test]
    fn held_child_runs_only_when_released_and_reports_its_status() {
        let held = hold(&["sh".into(), "-c".into(), "exit 7".into()], false).unwrap();
        let pid = held.release().unwrap();
        let child = Child::watch(pid).unwrap();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(status, 7);
    }

    #[test]
    fn exec_failure_is_reported_not_hidden() {
        let dir = std::env::temp_dir().join(format!("leaktrace-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("not-executable-format");
        std::fs::write(&script, b"\x7fELF garbage").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let held = hold(&[script.into()], false).unwrap();
        let err = held.release().unwrap_err();
        assert!(matches!(err, SpawnError::Exec { .. }), "{err}");
        assert_eq!(err.exit_code(), 126);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
