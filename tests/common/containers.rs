//! Real containers for the integration tests: an image of the C fixtures, built offline from
//! the fixtures and the libraries they load and imported into podman, and containers started
//! from it. tests/containers.md says why podman is run the way [`podman`] runs it.
//!
//! `cargo xtask setup` installs podman and runc; the image is built here, lazily, the first
//! time a test asks for it, and again only when its content changes: its tag is the hash of
//! its tarball (`target/tmp/containers/leaktrace-fixtures-<hash>.tar`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use super::c_fixture;

/// The image's repository; its tag is the hash of its content.
pub const IMAGE_REPO: &str = "localhost/leaktrace-fixtures";

/// The fixtures in the image, at `/fixtures/<name>`.
const FIXTURES: &[&str] = &["ctr_service", "pod_service"];

/// Directories the image holds empty: mount points the runtime fills in.
const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys", "tmp", "etc", "run"];

/// `podman` with the options that matter to every command, container cleanup included
/// (conmon runs `podman container cleanup` with the same ones):
/// - `--runtime runc`: the OCI runtime setup installs (crun is not installed);
/// - `--cgroup-manager cgroupfs`: there is no systemd as PID 1 on the test machines to own
///   `libpod-<id>.scope` units; containers land in `/libpod_parent/libpod-<id>`.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c.stdin(Stdio::null());
    c
}

/// Options of `podman run` this kernel needs (see tests/containers.md):
/// - `--ulimit nofile=1024:1024 --ulimit nproc=4096:4096`: podman asks runc to raise both
///   hard limits to its defaults (1048576 files, the host's process maximum); root here has
///   no `CAP_SYS_RESOURCE`, so raising fails with "error setting rlimit type 7 (then 6):
///   operation not permitted". Lowering needs no capability.
/// - `--network none`: nothing is reached over a network; the default network makes a CNI
///   bridge and firewall chains on the host for nothing.
pub const RUN_FLAGS: &[&str] = &[
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// Runs `cmd`, panicking with its stderr when it fails.
fn checked(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&checked(cmd).stdout)
        .trim()
        .to_owned()
}

/// True when the container tests can run: podman is installed and starts a container from
/// the fixture image. Without podman they are skipped with a note, unless
/// `LEAKTRACE_TEST_REQUIRE_CONTAINERS=1` (set by `cargo xtask test`, whose setup installs
/// it) makes that a failure. Once podman is there, a container that does not start is a
/// failure, never a skip: it means the flags above no longer fit the machine.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = AVAILABLE.get_or_init(|| {
        let version = Command::new("podman").arg("--version").output();
        if !version.is_ok_and(|o| o.status.success()) {
            return Err("podman is not installed (`cargo xtask setup` installs it)".into());
        }
        // A container that exits at once: any failure to run one shows here, with podman's
        // own words.
        let out = podman()
            .args(["run", "--rm"])
            .args(RUN_FLAGS)
            .arg(image())
            .args(["/fixtures/ctr_service", "probe"])
            .output()
            .map_err(|e| format!("cannot run podman: {e}"))?;
        if !out.status.success() {
            panic!(
                "podman is installed but cannot run a container here ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    });
    match verdict {
        Ok(()) => true,
        Err(why) => {
            if std::env::var("LEAKTRACE_TEST_REQUIRE_CONTAINERS").is_ok_and(|v| v == "1") {
                panic!("the container tests cannot run: {why}");
            }
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// The fixture image, `localhost/leaktrace-fixtures:<hash>`, built and imported when missing.
pub fn image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(build_image).clone()
}

fn containers_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("containers");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Holds an exclusive lock on `target/tmp/containers/lock` while alive: test binaries of two
/// `cargo test` runs in one tree build the same tarball.
struct Lock(fs::File);

impl Lock {
    fn take(dir: &Path) -> Self {
        use std::os::fd::AsRawFd as _;
        let file = fs::File::create(dir.join("lock")).unwrap();
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        Self(file)
    }
}

/// Lays out the root file system: the fixtures under `/fixtures`, each shared library `ldd`
/// lists (the loader included) at the path it lists, and empty mount points.
fn lay_out_rootfs(root: &Path) {
    for dir in MOUNT_POINTS.iter().chain(&["fixtures"]) {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let mut libs: Vec<PathBuf> = Vec::new();
    for name in FIXTURES {
        let exe = c_fixture(name);
        fs::copy(&exe, root.join("fixtures").join(name)).unwrap();
        libs.extend(shared_libraries(&exe));
    }
    libs.sort();
    libs.dedup();
    for lib in libs {
        let to = root.join(lib.strip_prefix("/").unwrap());
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        // The file itself, not a link: the loader's /lib64 path is a link on the host.
        fs::copy(&lib, &to).unwrap_or_else(|e| panic!("copying {}: {e}", lib.display()));
    }
}

/// The absolute paths `ldd` lists for `exe`: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and
/// the loader's `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn shared_libraries(exe: &Path) -> Vec<PathBuf> {
    stdout_of(Command::new("ldd").arg(exe))
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=>").map_or(line, |(_, p)| p.trim());
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Builds the tarball, names the image after its hash, and imports it unless podman has it.
fn build_image() -> String {
    let dir = containers_dir();
    let _lock = Lock::take(&dir);
    let started = Instant::now();
    let root = dir.join("rootfs");
    let _ = fs::remove_dir_all(&root);
    lay_out_rootfs(&root);
    // Same content, same bytes: sorted names, no times, no owners of this machine.
    let tar = dir.join("leaktrace-fixtures.tar.tmp");
    checked(
        Command::new("tar")
            .args([
                "--sort=name",
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-C",
            ])
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    let sum = stdout_of(Command::new("sha256sum").arg(&tar));
    let tag = &sum[..16];
    let cached = dir.join(format!("leaktrace-fixtures-{tag}.tar"));
    fs::rename(&tar, &cached).unwrap();
    // Older tarballs of this tree are of no use now.
    for e in fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("leaktrace-fixtures-") && e.path() != cached {
            let _ = fs::remove_file(e.path());
        }
    }
    let image = format!("{IMAGE_REPO}:{tag}");
    let have = podman()
        .args(["image", "exists", &image])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        checked(podman().arg("import").arg(&cached).arg(&image));
        eprintln!(
            "containers: imported {image} ({} KiB) in {:?}",
            fs::metadata(&cached).map_or(0, |m| m.len() >> 10),
            started.elapsed()
        );
    }
    image
}

/// A container running a fixture, detached, removed (with everything in it) on drop.
#[derive(Debug)]
pub struct Container {
    id: String,
    host_pid: u32,
}

impl Container {
    /// Starts `argv` in a new container named `leaktrace-test-<name>-<our pid>` from the
    /// fixture image; `argv[0]` names a fixture (`/fixtures/<argv[0]>`) unless it is a path.
    pub fn run(name: &str, argv: &[&str]) -> Self {
        let image = image();
        let (prog, args) = argv.split_first().expect("a command to run");
        let prog = if prog.starts_with('/') {
            (*prog).to_owned()
        } else {
            format!("/fixtures/{prog}")
        };
        let mut flags: Vec<String> = RUN_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        flags.push(image);
        flags.push(prog);
        flags.extend(args.iter().map(|s| (*s).to_owned()));
        Self::start(name, &flags)
    }

    /// Starts a container named `leaktrace-test-<name>-<our pid>` with `podman run --detach
    /// <run_args>` (flags, image, command): the caller gives every flag.
    pub fn start(name: &str, run_args: &[String]) -> Self {
        let name = format!("leaktrace-test-{name}-{}", std::process::id());
        let id = stdout_of(
            podman()
                .args(["run", "--detach", "--replace", "--name", &name])
                .args(["--label", "leaktrace-test=1"])
                .args(run_args),
        );
        // From here on, Drop removes it whatever goes wrong.
        let mut container = Self { id, host_pid: 0 };
        let state = container.inspect("{{.Id}} {{.State.Pid}}");
        let (id, pid) = state.split_once(' ').expect("id and pid");
        assert_eq!(id, container.id, "podman run and inspect disagree");
        container.host_pid = pid.parse().expect("a pid");
        assert!(
            container.host_pid > 0,
            "container {name} is not running; it printed:\n{}",
            container.logs()
        );
        container
    }

    /// `podman inspect --format FORMAT` of this container.
    pub fn inspect(&self, format: &str) -> String {
        stdout_of(podman().args(["inspect", "--format", format, &self.id]))
    }

    /// The full id, as `podman inspect --format {{.Id}}` prints it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pid of the container's first process, in the host's pid namespace
    /// (`{{.State.Pid}}`).
    pub fn host_pid(&self) -> u32 {
        self.host_pid
    }

    /// What the container printed so far (stdout and stderr).
    pub fn logs(&self) -> String {
        let out = checked(podman().args(["logs", &self.id]));
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        s
    }

    /// Waits (up to 30 s) until the container has printed a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logs = self.logs();
            if logs.lines().any(|l| l.contains(needle)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "container {} never printed {needle:?}; it printed:\n{logs}",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 60 s) for the container to stop; its first process's exit status.
    pub fn wait_exit(&self) -> i32 {
        let out = checked(
            podman()
                .args(["wait", "--interval", "100ms", &self.id])
                .stdout(Stdio::piped()),
        );
        let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        code.parse()
            .unwrap_or_else(|_| panic!("podman wait printed {code:?}"))
    }

    /// Sends `signal` to the container's first process, from the host.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is the container's live process.
        let rc = unsafe { libc::kill(self.host_pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Like [`run`](Self::run), with `flags` added to `podman run`'s own (a
    /// `--cgroup-parent`, say).
    pub fn run_with(name: &str, flags: &[&str], argv: &[&str]) -> Self {
        let (prog, args) = argv.split_first().expect("a command to run");
        let mut run_args: Vec<String> = RUN_FLAGS
            .iter()
            .chain(flags)
            .map(|s| (*s).to_owned())
            .collect();
        run_args.push(image());
        run_args.push(format!("/fixtures/{prog}"));
        run_args.extend(args.iter().map(|s| (*s).to_owned()));
        Self::start(name, &run_args)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // No grace period: the fixtures hold nothing worth a clean stop.
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
