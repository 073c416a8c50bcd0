//! `cargo xtask bench --only agent`: what the node agent costs the node, side by side with
//! no agent in one run.
//!
//! - **Tier 1 on busy programs**: each workload timed with no agent and with `leaktrace
//!   agent` running (every process in tier 1: growth, descriptors, temp files; nothing
//!   selected), round by round in ABBA order; `× untraced` is the ratio of medians.
//! - **Idle**: the agent's CPU over 20 s on this node with nothing to do.
//! - **Memory**: the agent's RSS with 1,000 processes on the node, 50 of them allocating
//!   and selected for exact heap tracing (`--full comm=agent_churner`); and its RSS every
//!   10 s over `--churn-minutes` of process churn (50 short-lived processes a second).
//!
//! Prints a markdown table and one JSON line (`--json FILE` writes it there too).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{as_root, bench::median, build_release, c_fixture, workspace_root};

/// A running `leaktrace agent`, stopped with SIGTERM on drop.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(leaktrace: &Path, extra: &[&str], out: &Path) -> Result<Self> {
        let mut child = as_root(leaktrace.to_str().context("path")?)
            .args([
                "agent",
                "--no-listen",
                "--interval",
                "1h",
                "--format",
                "json",
            ])
            .arg("-o")
            .arg(out)
            .args(extra)
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("agent: watching") => break,
                Some(Ok(_)) => {}
                _ => bail!("the agent did not start"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child })
    }

    /// CPU seconds it used so far.
    fn cpu_s(&self) -> f64 {
        proc_stat_cpu(self.child.id()).unwrap_or(0.0)
    }

    /// Its resident memory now and at its peak, in bytes.
    fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Stops it; returns how long that took.
    fn stop(mut self) -> Duration {
        let began = Instant::now();
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        began.elapsed()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// utime + stime of a process, in seconds.
fn proc_stat_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split(' ').skip(11);
    let ticks: u64 = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

struct Workload {
    name: &'static str,
    argv: Vec<String>,
    /// Runs before each timed run (outside the timing).
    reset: Option<PathBuf>,
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn workloads(dir: &Path) -> Result<Vec<Workload>> {
    let mut list = Vec::new();
    if on_path("sqlite3") {
        let script = dir.join("inserts.sql");
        let mut sql = String::from("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);\nBEGIN;\n");
        for i in 0..60_000 {
            sql.push_str(&format!(
                "INSERT INTO t(v) VALUES ('value-{i}-{}');\n",
                i * 7919 % 1000
            ));
        }
        sql.push_str("COMMIT;\nSELECT count(*), sum(length(v)) FROM t;\n");
        std::fs::write(&script, sql)?;
        list.push(Workload {
            name: "sqlite3 60k inserts",
            argv: vec![
                "sqlite3".into(),
                ":memory:".into(),
                format!(".read {}", script.display()),
            ],
            reset: None,
        });
    }
    if Path::new("/usr/bin/python3").exists() {
        list.push(Workload {
            name: "python3 dict churn",
            argv: vec![
                "/usr/bin/python3".into(),
                "-c".into(),
                "d={}\nfor i in range(600000):\n d[i%5000]=str(i)*3\nprint(len(d))".into(),
            ],
            reset: None,
        });
    }
    if on_path("jq") {
        let data = dir.join("records.json");
        let rows: Vec<String> = (0..80_000)
            .map(|i| format!("{{\"x\":{i},\"tags\":[\"a{}\",\"b{}\"]}}", i % 97, i % 13))
            .collect();
        std::fs::write(&data, format!("[{}]\n", rows.join(",")))?;
        list.push(Workload {
            name: "jq 80k records",
            argv: vec![
                "jq".into(),
                "[.[] | {a: .x, c: (.tags|join(\",\"))}] | length".into(),
                data.to_string_lossy().into_owned(),
            ],
            reset: None,
        });
    }
    // Syscall-heavy: 20,000 small files extracted (an open, write and close each), into a
    // tmpfs where it can have one: on this VM's disk the run took 13–18 s of mostly I/O
    // wait, and the writeback of one run's files landed in the next run's time.
    let tar = dir.join("tree.tar");
    if !tar.exists() {
        let tree = dir.join("tree");
        for i in 0..20_000 {
            let sub = tree.join(format!("d{:02}", i % 100));
            std::fs::create_dir_all(&sub)?;
            std::fs::write(sub.join(format!("f{i:05}.txt")), [b'a'; 512])?;
        }
        crate::run(
            Command::new("tar")
                .arg("-cf")
                .arg(&tar)
                .arg("-C")
                .arg(dir)
                .arg("tree"),
        )?;
        std::fs::remove_dir_all(&tree)?;
    }
    let into = dir.join("untar");
    list.push(Workload {
        name: "tar -xf 20k files",
        argv: vec![
            "tar".into(),
            "-xf".into(),
            tar.to_string_lossy().into_owned(),
            "-C".into(),
            into.to_string_lossy().into_owned(),
        ],
        reset: Some(into),
    });
    Ok(list)
}

/// A tmpfs mounted for the benchmark's scratch files, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one at `dir`; `None` (the files go to disk) where that is not allowed.
    fn mount(dir: &Path) -> Option<Self> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = as_root("mount")
            .args(["-t", "tmpfs", "-o", "size=512m", "leaktrace-bench"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "bench agent: no tmpfs at {}: tar extracts to disk",
                dir.display()
            );
        }
        ok.then(|| Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = as_root("umount").arg(&self.0).status();
    }
}

fn time(w: &Workload) -> Result<Timed> {
    if let Some(dir) = &w.reset {
        // Emptied, not removed: it may be a mount point.
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    let began = Instant::now();
    let child = Command::new(&w.argv[0])
        .args(&w.argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: rusage is plain integers and timevals, for which all-zero bytes are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unreaped child; `status` and `usage` are valid for writes.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
        bail!("{}: wait4 failed", w.name);
    }
    let wall = began.elapsed().as_secs_f64();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{}: status {status}", w.name);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Timed {
        wall,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
    })
}

/// One run's wall-clock seconds, and the CPU seconds the program itself used (user and
/// system: the tracepoint programs run in its system time). On a busy machine the wall
/// clock also counts waiting for a core, which the agent's own work (on the other core)
/// or anything else can cause; CPU time is what tracing costs the program.
#[derive(Clone, Copy)]
struct Timed {
    wall: f64,
    cpu: f64,
}

/// Tier 1 on one busy program: median seconds untraced and under the agent, for its first
/// run under this agent and for the run right after, wall-clock and CPU.
struct Tier1 {
    name: &'static str,
    first: (f64, f64),
    again: (f64, f64),
    /// CPU seconds, untraced and under the agent, of the run after the first.
    again_cpu: (f64, f64),
}

/// Tier 1 on busy programs.
///
/// Each is run twice in a row, untraced and under a fresh agent. The first run under an
/// agent is of a binary it has never seen: it compiles the unwind tables of the binary and
/// its libraries while the program runs, on the other core. A node runs the same binaries
/// over and over, so the second run is the steady state; both are reported.
fn tier1(leaktrace: &Path, dir: &Path, rounds: usize) -> Result<Vec<Tier1>> {
    let list = workloads(dir)?;
    let _scratch = Tmpfs::mount(&dir.join("untar"));
    // [workload][first, again] samples.
    let mut plain = vec![[Vec::new(), Vec::new()]; list.len()];
    let mut agent = vec![[Vec::new(), Vec::new()]; list.len()];
    let twice = |times: &mut Vec<[Vec<Timed>; 2]>| -> Result<()> {
        for (i, w) in list.iter().enumerate() {
            times[i][0].push(time(w)?);
            times[i][1].push(time(w)?);
        }
        Ok(())
    };
    // ABBA: odd rounds time under the agent first. Whichever side runs right after an agent
    // starts or stops (its adoption of every process, its probes' release) would otherwise
    // always be the same one: one order read sqlite3 at 0.66x untraced.
    let settle = || std::thread::sleep(Duration::from_secs(1));
    for round in 0..rounds {
        eprintln!("bench agent: tier-1 round {}/{rounds}", round + 1);
        if round % 2 == 0 {
            twice(&mut plain)?;
        }
        let a = Agent::start(leaktrace, &[], &dir.join("tier1.json"))?;
        settle();
        twice(&mut agent)?;
        a.stop();
        settle();
        if round % 2 == 1 {
            twice(&mut plain)?;
        }
    }
    Ok(list
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let wall = |v: &[Timed]| median(&v.iter().map(|t| t.wall).collect::<Vec<_>>());
            let cpu = |v: &[Timed]| median(&v.iter().map(|t| t.cpu).collect::<Vec<_>>());
            Tier1 {
                name: w.name,
                first: (wall(&plain[i][0]), wall(&agent[i][0])),
                again: (wall(&plain[i][1]), wall(&agent[i][1])),
                again_cpu: (cpu(&plain[i][1]), cpu(&agent[i][1])),
            }
        })
        .collect())
}

/// Processes for the memory figure: idle sleepers and allocating churners, killed on drop.
struct Crowd(Vec<Child>);

impl Drop for Crowd {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What process churn did to the agent: RSS samples (seconds, bytes), processes started,
/// the agent's CPU fraction.
type Churned = (Vec<(f64, u64)>, u64, f64);

/// The agent's memory under process churn: 50 short-lived processes a second (each maps
/// libc, opens a file and exits) for `minutes`; RSS sampled every 10 s.
fn churn(leaktrace: &Path, dir: &Path, minutes: u64) -> Result<Churned> {
    let a = Agent::start(leaktrace, &[], &dir.join("churn.json"))?;
    let cpu0 = a.cpu_s();
    let began = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let mut samples = vec![(0.0, a.rss().0)];
    let mut started = 0u64;
    let mut next_sample = began + Duration::from_secs(10);
    while began.elapsed() < total {
        let tick = Instant::now();
        let mut batch = Vec::new();
        for _ in 0..5 {
            batch.push(
                Command::new("sh")
                    .args(["-c", "cat /etc/hostname > /dev/null"])
                    .stdout(Stdio::null())
                    .spawn()?,
            );
        }
        for mut c in batch {
            let _ = c.wait();
        }
        started += 5;
        if Instant::now() >= next_sample {
            samples.push((began.elapsed().as_secs_f64(), a.rss().0));
            next_sample += Duration::from_secs(10);
        }
        // 5 every 100 ms: 50 a second.
        if let Some(rest) = Duration::from_millis(100).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    samples.push((began.elapsed().as_secs_f64(), a.rss().0));
    let cpu = (a.cpu_s() - cpu0) / began.elapsed().as_secs_f64();
    a.stop();
    Ok((samples, started, cpu))
}

pub fn run(rounds: usize, json: Option<PathBuf>, churn_minutes: u64) -> Result<()> {
    build_release()?;
    let root = workspace_root();
    let leaktrace = root.join("target/release/leaktrace");
    let churner = c_fixture("agent_churner", &["-O2", "-g"])?;
    let dir = root.join("target/bench-agent");
    std::fs::create_dir_all(&dir)?;

    let tier1 = tier1(&leaktrace, &dir, rounds)?;

    eprintln!("bench agent: idle, 20 s");
    let a = Agent::start(&leaktrace, &[], &dir.join("idle.json"))?;
    let cpu0 = a.cpu_s();
    std::thread::sleep(Duration::from_secs(20));
    let idle_cpu = (a.cpu_s() - cpu0) / 20.0;
    let (idle_rss, _) = a.rss();
    let idle_stop = a.stop();

    eprintln!("bench agent: 1,000 processes, 50 allocating, 30 s");
    let mut crowd = Crowd(Vec::new());
    for _ in 0..950 {
        crowd.0.push(Command::new("sleep").arg("3600").spawn()?);
    }
    for _ in 0..50 {
        crowd.0.push(
            Command::new(&churner)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    let started = Instant::now();
    let a = Agent::start(
        &leaktrace,
        &["--full", "comm=agent_churner"],
        &dir.join("crowd.json"),
    )?;
    let adopt_s = started.elapsed().as_secs_f64();
    let cpu0 = a.cpu_s();
    std::thread::sleep(Duration::from_secs(30));
    let crowd_cpu = (a.cpu_s() - cpu0) / 30.0;
    let (crowd_rss, crowd_peak) = a.rss();
    let crowd_stop = a.stop();
    drop(crowd);

    let churned = if churn_minutes > 0 {
        eprintln!("bench agent: {churn_minutes} min of process churn");
        Some(churn(&leaktrace, &dir, churn_minutes)?)
    } else {
        None
    };

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "| workload | untraced s | agent (tier 1) s | × untraced | CPU s untraced | CPU s agent | CPU × | first run: untraced s | agent s | × |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for t in &tier1 {
        let ((fu, fa), (u, a), (cu, ca)) = (t.first, t.again, t.again_cpu);
        println!(
            "| {} | {u:.3} | {a:.3} | {:.3} | {cu:.3} | {ca:.3} | {:.3} | {fu:.3} | {fa:.3} | {:.3} |",
            t.name,
            a / u,
            ca / cu,
            fa / fu
        );
    }
    println!();
    println!("| agent | CPU (of one core) | RSS MiB | peak RSS MiB | stop s |");
    println!("|---|---|---|---|---|");
    println!(
        "| idle node, 20 s | {:.2}% | {:.1} | | {:.2} |",
        idle_cpu * 100.0,
        mib(idle_rss),
        idle_stop.as_secs_f64()
    );
    println!(
        "| 1,000 processes, 50 allocating (tier 2), 30 s; started in {adopt_s:.1} s | {:.1}% | {:.1} | {:.1} | {:.2} |",
        crowd_cpu * 100.0,
        mib(crowd_rss),
        mib(crowd_peak),
        crowd_stop.as_secs_f64()
    );
    if let Some((samples, started, cpu)) = &churned {
        let rss: Vec<String> = samples
            .iter()
            .map(|(t, b)| format!("{t:.0}s {:.1}", mib(*b)))
            .collect();
        println!();
        println!(
            "process churn, {started} processes over {churn_minutes} min: agent CPU {:.1}%, RSS MiB: {}",
            cpu * 100.0,
            rss.join(", ")
        );
    }
    let line = serde_json::json!({
        "bench": "agent",
        "rounds": rounds,
        "tier1": tier1.iter().map(|t| serde_json::json!({
            "workload": t.name, "untraced_s": t.again.0, "agent_s": t.again.1,
            "ratio": t.again.1 / t.again.0,
            "cpu": {"untraced_s": t.again_cpu.0, "agent_s": t.again_cpu.1,
                    "ratio": t.again_cpu.1 / t.again_cpu.0},
            "first_run": {"untraced_s": t.first.0, "agent_s": t.first.1,
                          "ratio": t.first.1 / t.first.0},
        })).collect::<Vec<_>>(),
        "idle": {"cpu_fraction": idle_cpu, "rss_bytes": idle_rss, "stop_s": idle_stop.as_secs_f64()},
        "crowd": {"processes": 1000, "allocating": 50, "start_s": adopt_s, "cpu_fraction": crowd_cpu,
                  "rss_bytes": crowd_rss, "peak_rss_bytes": crowd_peak, "stop_s": crowd_stop.as_secs_f64()},
        "churn": churned.as_ref().map(|(samples, started, cpu)| serde_json::json!({
            "minutes": churn_minutes, "processes": started, "cpu_fraction": cpu,
            "rss_samples": samples.iter().map(|(t, b)| serde_json::json!([t, b])).collect::<Vec<_>>(),
        })),
    });
    println!("{line}");
    if let Some(path) = json {
        std::fs::write(path, format!("{line}\n"))?;
    }
    Ok(())
}
