//! Shared harness for the integration tests: builds fixture programs, runs the real
//! `leaktrace` binary against them on the real kernel, and reads its JSON reports.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod containers;

/// True when the tests can load eBPF programs. Without root they are skipped with a note,
/// unless `LEAKTRACE_TEST_REQUIRE_ROOT=1` (set by `cargo xtask test`) makes that a failure.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("LEAKTRACE_TEST_REQUIRE_ROOT").is_ok_and(|v| v == "1") {
        panic!("the eBPF integration tests need root (run `cargo xtask test`)");
    }
    eprintln!("skipped: needs root to load eBPF programs (run `cargo xtask test`)");
    false
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn fixtures_out() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn newer(src: &Path, out: &Path) -> bool {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (m(src), m(out)) {
        (Some(s), Some(o)) => s > o,
        _ => true,
    }
}

/// Builds `tests/fixtures/<name>.c` (once; rebuilt when the source changes) with `flags`,
/// and returns the executable. Several tests may ask at once: each builds to a private
/// name and renames into place.
pub fn c_fixture_with(name: &str, variant: &str, flags: &[&str]) -> PathBuf {
    build_fixture(
        "cc",
        &format!("{name}.c"),
        &format!("{name}{variant}"),
        flags,
    )
}

/// Builds `tests/fixtures/<name>.cpp` with the C++ compiler.
pub fn cpp_fixture(name: &str, variant: &str, flags: &[&str]) -> PathBuf {
    build_fixture(
        "c++",
        &format!("{name}.cpp"),
        &format!("{name}{variant}"),
        flags,
    )
}

fn build_fixture(compiler: &str, source: &str, output: &str, flags: &[&str]) -> PathBuf {
    let src = workspace().join("tests/fixtures").join(source);
    let out = fixtures_out().join(output);
    if newer(&src, &out) {
        let tmp = out.with_extension(unique_tmp());
        let status = Command::new(compiler)
            .args(flags)
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("a C/C++ compiler (cargo xtask setup installs one)");
        assert!(status.success(), "building {} failed", src.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// A file extension no other build, in this process or another, is using.
fn unique_tmp() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("tmp{}-{n}", std::process::id())
}

/// The standard build of C fixtures: `-O0 -g -fno-omit-frame-pointer`, with threads.
pub fn c_fixture(name: &str) -> PathBuf {
    c_fixture_with(
        name,
        "",
        &["-O0", "-g", "-fno-omit-frame-pointer", "-pthread"],
    )
}

/// Builds `tests/fixtures/<name>.rs` with rustc and `extra` flags.
pub fn rust_fixture(name: &str, variant: &str, extra: &[&str]) -> PathBuf {
    let src = workspace().join(format!("tests/fixtures/{name}.rs"));
    let out = fixtures_out().join(format!("{name}{variant}"));
    if newer(&src, &out) {
        let tmp = out.with_extension(unique_tmp());
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let status = Command::new(rustc)
            .args(["--edition", "2021", "-g"])
            .args(extra)
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success(), "building {} failed", src.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// The `leaktrace` binary under test.
pub fn leaktrace() -> Command {
    Command::new(env!("CARGO_BIN_EXE_leaktrace"))
}

/// What a finished leaktrace run left behind.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The last JSON report on stdout.
    /// Every JSON report on stdout, first first.
    pub fn reports(&self) -> Vec<Report> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| Report(serde_json::from_str(l).unwrap()))
            .collect()
    }

    pub fn report(&self) -> Report {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| {
                panic!(
                    "no JSON report; status {}\nstdout:\n{}\nstderr:\n{}",
                    self.status, self.stdout, self.stderr
                )
            });
        Report(serde_json::from_str(line).unwrap())
    }
}

/// A leaktrace running in the background, its stderr watched line by line.
pub struct Background {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: String,
    stdout: std::thread::JoinHandle<String>,
}

impl Background {
    /// The leaktrace process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `leaktrace agent <args>` writing every row (on a busy node the top ones can
    /// all be a compiler's) as JSON to `out`, its decisions logged (`-v`).
    pub fn agent(args: &[&str], out: &Path) -> Self {
        let mut all = vec!["agent"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--top", "100000", "--format", "json", "-v", "-o"]);
        all.push(out.to_str().unwrap());
        Self::start(&all)
    }

    /// Starts `leaktrace <args>`.
    pub fn start(args: &[&str]) -> Self {
        let mut child = leaktrace()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            out.read_to_string(&mut s).unwrap();
            s
        });
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            stderr: String::new(),
            stdout,
        }
    }

    /// Waits (up to 30 s) for a stderr line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.stderr.push_str(&line);
                    self.stderr.push('\n');
                    if hit {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("leaktrace never said {needle:?}; stderr:\n{}", self.stderr);
    }

    /// Waits (up to `limit`) for leaktrace to end.
    pub fn finish(mut self, limit: Duration) -> Run {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "leaktrace did not finish within {limit:?}; stderr:\n{}",
                    self.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = self.stdout.join().unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        Run {
            status,
            stdout,
            stderr: self.stderr,
        }
    }
}

/// Runs `leaktrace <args>` to completion (within a minute).
pub fn run(args: &[&str]) -> Run {
    Background::start(args).finish(Duration::from_secs(60))
}

/// Runs `leaktrace run --format json [extra] -- prog [prog_args]` and returns its report.
pub fn trace_json(prog: &Path, extra: &[&str], prog_args: &[&str]) -> (Run, Report) {
    let mut args = vec!["run", "--format", "json"];
    args.extend_from_slice(extra);
    args.push("--");
    let prog = prog.to_str().unwrap();
    args.push(prog);
    args.extend_from_slice(prog_args);
    let run = run(&args);
    let report = run.report();
    (run, report)
}

/// Frame `i` of a report row counted from its site (`frames[site + i]`): 0 is the program's
/// code that called the allocator (or the libc wrapper), 1 its caller. Notices (OOM kills,
/// full descriptor tables) have no `site`: their frames start at it.
pub fn frame(row: &Value, i: usize) -> &Value {
    let site = row["site"].as_u64().unwrap_or(0) as usize;
    &row["frames"][site + i]
}

/// A JSON report with helpers to find leak sites.
#[derive(Debug, Clone)]
pub struct Report(pub Value);

impl Report {
    pub fn summary(&self, key: &str) -> u64 {
        self.0["summary"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("summary.{key} missing: {}", self.0))
    }

    pub fn leaks(&self) -> &Vec<Value> {
        self.0["leaks"].as_array().unwrap()
    }

    /// Leaks whose site (`frames[site]`, the program's code that called the allocator) is
    /// the function `site`.
    pub fn site(&self, site: &str) -> Vec<&Value> {
        self.leaks()
            .iter()
            .filter(|l| frame(l, 0)["symbol"].as_str() == Some(site))
            .collect()
    }

    /// Outstanding (count, bytes) summed over the leaks at `site`.
    pub fn at(&self, site: &str) -> (u64, u64) {
        self.site(site).iter().fold((0, 0), |(c, b), l| {
            (
                c + l["outstanding_count"].as_u64().unwrap(),
                b + l["outstanding_bytes"].as_u64().unwrap(),
            )
        })
    }

    /// Asserts the exact outstanding count and bytes at `site`.
    #[track_caller]
    pub fn assert_site(&self, site: &str, count: u64, bytes: u64) {
        assert_eq!(
            self.at(site),
            (count, bytes),
            "site {site} in report:\n{}",
            self.pretty()
        );
    }

    /// Asserts that no leak is reported at `site`.
    #[track_caller]
    pub fn assert_absent(&self, site: &str) {
        assert!(
            self.site(site).is_empty(),
            "{site} must not be reported:\n{}",
            self.pretty()
        );
    }

    /// `allocs - frees == outstanding_count` (the report holds nothing lost).
    #[track_caller]
    pub fn assert_balanced(&self) {
        assert_eq!(
            self.summary("allocs") - self.summary("frees"),
            self.summary("outstanding_count"),
            "{}",
            self.pretty()
        );
    }

    /// Entries of `list` (`fd_leaks`, `tmp_leaks`, ...) whose site is `site`.
    pub fn entries(&self, list: &str, site: &str) -> Vec<&Value> {
        self.0[list]
            .as_array()
            .unwrap_or_else(|| panic!("{list} missing: {}", self.0))
            .iter()
            .filter(|l| frame(l, 0)["symbol"].as_str() == Some(site))
            .collect()
    }

    /// Outstanding descriptors created at `site`, summed, and their kinds.
    pub fn fds_at(&self, site: &str) -> (u64, Vec<String>) {
        let rows = self.entries("fd_leaks", site);
        let mut kinds: Vec<String> = rows
            .iter()
            .map(|l| l["fd_kind"].as_str().unwrap().to_owned())
            .collect();
        kinds.sort();
        kinds.dedup();
        let n = rows
            .iter()
            .map(|l| l["outstanding"].as_u64().unwrap())
            .sum();
        (n, kinds)
    }

    /// Asserts the exact number of descriptors `site` holds, all of `kind`.
    #[track_caller]
    pub fn assert_fds(&self, site: &str, outstanding: u64, kind: &str) {
        assert_eq!(
            self.fds_at(site),
            (outstanding, vec![kind.to_owned()]),
            "descriptors at {site} in report:\n{}",
            self.pretty()
        );
    }

    /// Asserts that `site` holds no descriptor.
    #[track_caller]
    pub fn assert_no_fds(&self, site: &str) {
        assert!(
            self.entries("fd_leaks", site).is_empty(),
            "{site} must not hold descriptors:\n{}",
            self.pretty()
        );
    }

    /// Temp files (count, bytes) left by `site`.
    pub fn tmp_at(&self, site: &str) -> (u64, u64) {
        self.entries("tmp_leaks", site)
            .iter()
            .fold((0, 0), |(n, b), l| {
                (
                    n + l["files"].as_u64().unwrap(),
                    b + l["bytes"].as_u64().unwrap(),
                )
            })
    }

    pub fn pretty(&self) -> String {
        let mut short = self.0.clone();
        for list in ["leaks", "runtime", "fd_leaks", "tmp_leaks"] {
            if let Some(leaks) = short[list].as_array_mut() {
                for l in leaks {
                    let frames: Vec<String> = l["frames"]
                        .as_array()
                        .unwrap_or(&Vec::new())
                        .iter()
                        .map(|f| f["symbol"].as_str().unwrap_or("?").to_owned())
                        .collect();
                    l["frames"] = Value::from(frames.join(" < "));
                }
            }
        }
        serde_json::to_string_pretty(&short).unwrap()
    }
}
