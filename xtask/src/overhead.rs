//! `cargo xtask bench` (the default): what heap tracing costs a program, against the floor
//! and against bcc-style placement, all rows measured side by side in one run.
//!
//! Every round runs every (workload, config) once, in the same order, so machine drift hits
//! all rows alike; the table gives medians and min–max over rounds.
//!
//! - untraced: the program alone.
//! - floor: empty BPF programs on two emulated uprobes per malloc/free pair (`malloc`'s
//!   entry, `free` past its single-stepped first instruction): what the traps alone cost.
//!   Defined once, never changed.
//! - floor+ret: the floor plus an empty return probe on `malloc` (churn only): what getting
//!   the returned pointer with a uretprobe costs.
//! - full: `leaktrace run --mode full`, exact, with `.eh_frame` stacks.
//! - full, sampled 64K: the same with `--sample-bytes 64K` (size-weighted sampling).
//! - growth: `leaktrace run --mode growth`, no allocator probe at all.
//! - bcc-style: bpftrace on `malloc` entry + return and `free` entry, as memleak attaches,
//!   with a stack id per allocation (when bpftrace is installed).
//!
//! With `--baseline PATH`, every row that runs leaktrace (floor, full, full sampled 64K,
//! growth) is also run with that binary, one built from an earlier commit, as
//! `<config> (baseline)` right after its own row in every round; `× baseline` is the current
//! binary's median over the baseline's. floor's empty programs never change, so its ratio is
//! the noise yardstick for the others; floor+ret and bcc-style are left out (floor+ret adds
//! nothing floor does not show, bpftrace is not leaktrace).
//!
//! Workloads time themselves: the churn fixture prints ns per malloc/free pair; the real
//! programs are timed from inside by a preloaded constructor/destructor (`bench_timer.c`),
//! so a tracer's start-up is not counted against it.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    as_root,
    bench::{json_line, median, min_max},
    build_release, c_fixture, cargo, workspace_root,
};

/// malloc/free pairs per churn run (per thread).
const PAIRS: &str = "300000";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Untraced,
    Floor,
    FloorRet,
    Full,
    /// Full mode sampling one byte in 64 KiB.
    Sampled,
    Growth,
    BccStyle,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Floor => "floor",
            Config::FloorRet => "floor+ret",
            Config::Full => "full",
            Config::Sampled => "full, sampled 64K",
            Config::Growth => "growth",
            Config::BccStyle => "bcc-style",
        }
    }

    fn leaktrace_mode(self) -> Option<&'static str> {
        match self {
            Config::Floor => Some("floor"),
            Config::FloorRet => Some("floor-return"),
            Config::Full | Config::Sampled => Some("full"),
            Config::Growth => Some("growth"),
            _ => None,
        }
    }

    /// Whether `--baseline` adds a row of this configuration run with the baseline binary.
    fn has_baseline(self) -> bool {
        matches!(
            self,
            Config::Floor | Config::Full | Config::Sampled | Config::Growth
        )
    }
}

/// Which leaktrace binary a row runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Binary {
    /// `target/release/leaktrace`, built from this tree.
    Current,
    /// `--baseline PATH`: one built from an earlier commit.
    Baseline,
}

/// One row of the table: a configuration, and the leaktrace binary it runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Row {
    config: Config,
    binary: Binary,
}

impl Row {
    fn label(self) -> String {
        match self.binary {
            Binary::Current => self.config.name().into(),
            Binary::Baseline => format!("{} (baseline)", self.config.name()),
        }
    }
}

struct Workload {
    name: String,
    /// The program and its arguments.
    argv: Vec<String>,
    /// Its comm, for the preloaded timer; `None`: it prints ns per pair itself.
    comm: Option<&'static str>,
    configs: Vec<Config>,
}

/// One run's figures.
#[derive(Default, Clone, Copy)]
struct Sample {
    /// ns per allocator call (churn) or seconds (real programs).
    value: f64,
    /// Seconds the workload ran, for the event rate.
    seconds: f64,
    events: u64,
    lost: u64,
    tracer_cpu_s: f64,
    tracer_rss: u64,
}

fn libc_path() -> Result<String> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so"))
        .map(str::to_owned)
        .context("no libc mapped")
}

/// memleak's placement in bpftrace: size at `malloc` entry, the block and a stack id at its
/// return, `free` at its entry (single-stepped on glibc).
fn bcc_script(libc: &str) -> String {
    format!(
        "uprobe:{libc}:malloc {{ @size[tid] = arg0; }}
uretprobe:{libc}:malloc /@size[tid]/ {{ @allocs[retval] = @size[tid]; @stacks[ustack] = count(); delete(@size[tid]); }}
uprobe:{libc}:free {{ delete(@allocs[arg0]); }}
END {{ clear(@size); clear(@allocs); clear(@stacks); }}"
    )
}

/// Steps `x` to the next of Marsaglia's xorshift64 numbers: inputs that are the same every run.
fn xorshift(x: &mut u64) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
}

/// Inputs for the real programs, generated once.
fn sqlite_script(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("inserts.sql");
    let mut sql = String::from(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, payload TEXT);\n\
         CREATE INDEX t_name ON t(name);\nBEGIN;\n",
    );
    let mut x: u64 = 88172645463325252;
    for i in 0..60_000u64 {
        xorshift(&mut x);
        let _ = writeln!(
            sql,
            "INSERT INTO t(name, payload) VALUES ('user-{}-{}', printf('%.*c', {}, 'x'));",
            x % 100_000,
            i,
            20 + x % 400
        );
    }
    sql.push_str(
        "COMMIT;\nSELECT count(*), sum(length(payload)) FROM t WHERE name LIKE 'user-1%';\n\
         SELECT name, count(*) FROM t GROUP BY substr(name, 1, 8) ORDER BY 2 DESC LIMIT 3;\n",
    );
    std::fs::write(&path, sql)?;
    Ok(path)
}

const PYTHON: &str = "
import random
random.seed(7)
cache = {}
total = 0
for i in range(250000):
    k = random.randrange(40000)
    cache[k] = {'id': i, 'blob': b'x' * random.randrange(520, 4000), 'tags': [str(i)] * 4}
    if len(cache) > 5000:
        cache.pop(next(iter(cache)))
    total += len(cache[k]['blob'])
print(total)
";

fn workloads(dir: &Path, churn: &Path, bpftrace: bool) -> Result<Vec<Workload>> {
    // floor+ret everywhere: what the return probe alone adds on each workload.
    let mut all = vec![
        Config::Untraced,
        Config::Floor,
        Config::FloorRet,
        Config::Full,
        Config::Sampled,
        Config::Growth,
    ];
    if bpftrace {
        all.push(Config::BccStyle);
    }
    let churn = churn.to_string_lossy().into_owned();
    let mut list = vec![
        Workload {
            name: "churn (1 thread)".into(),
            argv: vec![churn.clone(), "churn".into(), PAIRS.into(), "1".into()],
            comm: None,
            configs: all.clone(),
        },
        Workload {
            name: "churn (2 threads)".into(),
            argv: vec![churn, "churn".into(), PAIRS.into(), "2".into()],
            comm: None,
            configs: vec![Config::Untraced, Config::Floor, Config::Full],
        },
    ];
    if which("sqlite3") {
        let script = sqlite_script(dir)?;
        list.push(Workload {
            name: "sqlite3 60k inserts".into(),
            argv: vec![
                "sqlite3".into(),
                ":memory:".into(),
                format!(".read {}", script.display()),
            ],
            comm: Some("sqlite3"),
            configs: all.clone(),
        });
    }
    if Path::new("/usr/bin/python3").exists() {
        list.push(Workload {
            name: "python3 dict churn".into(),
            argv: vec!["/usr/bin/python3".into(), "-c".into(), PYTHON.into()],
            comm: Some("python3"),
            configs: all.clone(),
        });
    }
    // jq reshaping a generated array: a value per node, malloc'd and freed by refcount.
    if which("jq") {
        let data = dir.join("records.json");
        if !data.exists() {
            let mut text = String::from("[");
            let mut x: u64 = 0x2545_f491;
            for i in 0..80_000u64 {
                xorshift(&mut x);
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(
                    text,
                    "{sep}{{\"x\":{i},\"y\":{},\"tags\":[\"{}\",\"{}\",\"{}\"]}}",
                    x % 100_000,
                    x % 977,
                    x % 89,
                    x % 13
                );
            }
            text.push_str("]\n");
            std::fs::write(&data, text)?;
        }
        list.push(Workload {
            name: "jq 80k records".into(),
            argv: vec![
                "jq".into(),
                "[.[] | {a: .x, b: (.y|tostring), c: (.tags|join(\",\"))}] | length".into(),
                data.to_string_lossy().into_owned(),
            ],
            comm: Some("jq"),
            configs: all.clone(),
        });
    }
    // GNU sort of a generated file: allocates per buffer rather than per line.
    let lines = dir.join("lines.txt");
    if !lines.exists() {
        let mut text = String::new();
        let mut x: u64 = 0x9e37_79b9;
        for _ in 0..400_000 {
            xorshift(&mut x);
            let _ = writeln!(text, "{:016x} {}", x, x % 977);
        }
        std::fs::write(&lines, text)?;
    }
    list.push(Workload {
        name: "sort 400k lines".into(),
        argv: vec![
            "sort".into(),
            "-o".into(),
            dir.join("sorted.txt").to_string_lossy().into_owned(),
            lines.to_string_lossy().into_owned(),
        ],
        comm: Some("sort"),
        configs: all,
    });
    Ok(list)
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

struct Env<'a> {
    leaktrace: &'a str,
    /// `--baseline PATH`.
    baseline: Option<&'a str>,
    timer: &'a Path,
    dir: &'a Path,
    libc: String,
}

impl Env<'_> {
    fn leaktrace(&self, binary: Binary) -> &str {
        match binary {
            Binary::Current => self.leaktrace,
            Binary::Baseline => self.baseline.expect("baseline rows only with --baseline"),
        }
    }

    /// The comms the tracers run under, for `settle`.
    fn tracer_comms(&self) -> Vec<String> {
        let mut comms = vec!["bpftrace".to_owned(), comm_of(self.leaktrace)];
        comms.extend(self.baseline.map(comm_of));
        comms
    }
}

/// The comm a program runs under: its file name, cut to the kernel's 15 bytes.
fn comm_of(program: &str) -> String {
    let name = Path::new(program)
        .file_name()
        .map_or_else(|| program.into(), |n| n.to_string_lossy());
    String::from_utf8_lossy(&name.as_bytes()[..name.len().min(15)]).into_owned()
}

fn run_once(env: &Env<'_>, w: &Workload, row: Row) -> Result<Sample> {
    let config = row.config;
    let time_file = env.dir.join("time.txt");
    let report = env.dir.join("report.json");
    let _ = std::fs::remove_file(&time_file);
    let _ = std::fs::remove_file(&report);
    let mut cmd = match config {
        Config::Untraced => {
            let mut c = Command::new(&w.argv[0]);
            c.args(&w.argv[1..]);
            c
        }
        Config::BccStyle => {
            // bpftrace -c splits its command on spaces, quotes or not: a wrapper script
            // that execs the program (same pid) carries arguments with spaces.
            let wrapper = env.dir.join("bcc-wrapper.sh");
            std::fs::write(&wrapper, format!("exec {}\n", shell_words(&w.argv)))?;
            let mut c = as_root("bpftrace");
            c.args(["-q", "-e", &bcc_script(&env.libc), "-c"])
                .arg(format!("/bin/sh {}", wrapper.display()));
            c
        }
        _ => {
            let mut c = as_root(env.leaktrace(row.binary));
            c.args(["run", "--only", "heap", "--format", "json", "--mode"])
                .arg(config.leaktrace_mode().unwrap_or("full"))
                .args(if config == Config::Sampled {
                    &["--sample-bytes", "64K"][..]
                } else {
                    &[]
                })
                .arg("--output")
                .arg(&report)
                .arg("--")
                .args(&w.argv);
            c
        }
    };
    if let Some(comm) = w.comm {
        cmd.env("LD_PRELOAD", env.timer)
            .env("LT_BENCH_COMM", comm)
            .env("LT_BENCH_OUT", &time_file);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{} under {}: {}", w.name, row.label(), out.status);
    }
    settle(&env.tracer_comms());
    let mut s = Sample::default();
    match w.comm {
        None => {
            let text = String::from_utf8_lossy(&out.stdout);
            let per_pair: f64 = text
                .lines()
                .rev()
                .find_map(|l| l.trim().parse().ok())
                .context("no ns per pair in the churn output")?;
            let pairs: f64 = PAIRS.parse()?;
            s.value = per_pair / 2.0;
            s.seconds = per_pair * pairs / 1e9;
        }
        Some(_) => {
            let text = std::fs::read_to_string(&time_file)
                .with_context(|| format!("{}: the timer wrote nothing", w.name))?;
            s.value = text
                .lines()
                .next()
                .context("empty timer file")?
                .trim()
                .parse()?;
            s.seconds = s.value;
        }
    }
    if config.leaktrace_mode().is_some()
        && let Ok(text) = std::fs::read_to_string(&report)
        && let Ok(r) = json_line(&text)
    {
        let sm = &r["summary"];
        let n = |k: &str| sm[k].as_u64().unwrap_or(0);
        s.events = n("allocs") + n("frees") + n("unmatched_frees");
        s.lost = n("lost_events");
        s.tracer_cpu_s = sm["tracer"]["cpu_s"].as_f64().unwrap_or(0.0);
        s.tracer_rss = sm["tracer"]["peak_rss_bytes"].as_u64().unwrap_or(0);
    }
    Ok(s)
}

/// Waits until no tracer is left releasing its probes: leaktrace hands its BPF links to a
/// detached child that frees them after it exits (seconds of kernel time), and bpftrace
/// detaches as it ends. The next run must not share the machine with that. `comms`: the
/// tracers' comms.
fn settle(comms: &[String]) {
    let busy = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| comms.iter().any(|t| t == c.trim()))
            })
    };
    let started = std::time::Instant::now();
    while busy() && started.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// argv as one shell command line.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(
    rounds: usize,
    json: Option<PathBuf>,
    only: &[String],
    configs: &[String],
    baseline: Option<PathBuf>,
) -> Result<()> {
    // With run-time statistics on, the kernel times every BPF program run (~74 ns each
    // here): a cost no production node pays, added to every traced row.
    if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() != "0")
    {
        bail!(
            "kernel.bpf_stats_enabled is on: every BPF program run is timed, which adds to every \
             traced row; turn it off (sysctl kernel.bpf_stats_enabled=0) and run again"
        );
    }
    // Absolute, so that it does not depend on the directory cargo runs us from.
    let baseline = baseline
        .map(|p| std::fs::canonicalize(&p).with_context(|| format!("--baseline {}", p.display())))
        .transpose()?;
    build_release()?;
    let root = workspace_root();
    let churn = c_fixture("bench_alloc", &["-O2", "-g", "-pthread"])?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let timer = dir.join("bench_timer.so");
    crate::run(
        Command::new("cc")
            .args(["-O2", "-shared", "-fPIC", "-o"])
            .arg(&timer)
            .arg(root.join("tests/fixtures/bench_timer.c")),
    )?;
    let bpftrace = which("bpftrace");
    if !bpftrace {
        eprintln!("bench: bpftrace is not installed: no bcc-style rows (apt-get install bpftrace)");
    }
    let leaktrace = root.join("target/release/leaktrace");
    let env = Env {
        leaktrace: leaktrace.to_str().context("path")?,
        baseline: baseline
            .as_deref()
            .map(|p| p.to_str().context("--baseline: not UTF-8"))
            .transpose()?,
        timer: &timer,
        dir: &dir,
        libc: libc_path()?,
    };
    let mut list = workloads(&dir, &churn, bpftrace)?;
    if !only.is_empty() {
        list.retain(|w| only.iter().any(|name| w.name.contains(name.as_str())));
        if list.is_empty() {
            bail!("no workload matches {only:?}");
        }
    }
    if !configs.is_empty() {
        for w in &mut list {
            w.configs.retain(|&c| {
                c == Config::Untraced
                    || configs
                        .iter()
                        .any(|n| n.trim_end_matches(" (baseline)") == c.name())
            });
        }
        if list.iter().all(|w| w.configs.len() == 1) {
            bail!("no configuration matches {configs:?}");
        }
    }
    // Each baseline row right after its own, so that the pair sees the same machine.
    let rows: Vec<Vec<Row>> = list
        .iter()
        .map(|w| {
            w.configs
                .iter()
                .flat_map(|&config| {
                    let current = Row {
                        config,
                        binary: Binary::Current,
                    };
                    let baseline =
                        (env.baseline.is_some() && config.has_baseline()).then_some(Row {
                            config,
                            binary: Binary::Baseline,
                        });
                    std::iter::once(current).chain(baseline)
                })
                .collect()
        })
        .collect();
    if env.baseline.is_some() && rows.iter().flatten().all(|r| r.binary == Binary::Current) {
        eprintln!("bench: no configuration left that runs leaktrace: no baseline rows");
    }
    let mut samples: Vec<Vec<Vec<Sample>>> =
        rows.iter().map(|r| vec![Vec::new(); r.len()]).collect();
    for round in 0..rounds {
        for (wi, w) in list.iter().enumerate() {
            eprintln!("bench: round {}/{rounds}: {}", round + 1, w.name);
            for (ri, &row) in rows[wi].iter().enumerate() {
                samples[wi][ri].push(run_once(&env, w, row)?);
            }
        }
    }

    let mut rows_json = Vec::new();
    let mut header = vec![
        "workload",
        "config",
        "median",
        "min–max",
        "× untraced",
        "× floor",
    ];
    if env.baseline.is_some() {
        header.push("× baseline");
    }
    header.extend(["events/s", "lost events", "tracer CPU s", "tracer peak RSS"]);
    println!("| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));
    for (wi, w) in list.iter().enumerate() {
        let med = |ri: usize| median(&samples[wi][ri].iter().map(|s| s.value).collect::<Vec<_>>());
        let position = |config, binary| rows[wi].iter().position(|&r| r == Row { config, binary });
        let untraced = med(0);
        let floor = position(Config::Floor, Binary::Current).map(med);
        let unit = if w.comm.is_none() { "ns_per_call" } else { "s" };
        for (ri, &row) in rows[wi].iter().enumerate() {
            let values: Vec<f64> = samples[wi][ri].iter().map(|s| s.value).collect();
            let m = median(&values);
            let (lo, hi) = min_max(&values);
            // The current binary's median over the baseline's, on the current row.
            let vs_baseline = match row.binary {
                Binary::Current => position(row.config, Binary::Baseline).map(|b| m / med(b)),
                Binary::Baseline => None,
            };
            let last =
                |f: fn(&Sample) -> f64| median(&samples[wi][ri].iter().map(f).collect::<Vec<_>>());
            let rate = last(|s| {
                if s.seconds > 0.0 {
                    s.events as f64 / s.seconds
                } else {
                    0.0
                }
            });
            let lost = samples[wi][ri].iter().map(|s| s.lost).max().unwrap_or(0);
            let traced = row.config.leaktrace_mode().is_some();
            let fmt_value = |v: f64| {
                if unit == "s" {
                    format!("{v:.3} s")
                } else {
                    format!("{v:.0} ns/call")
                }
            };
            let fmt_range = |v: f64| {
                if unit == "s" {
                    format!("{v:.3}")
                } else {
                    format!("{v:.0}")
                }
            };
            let ratio = |r: Option<f64>| r.map_or("—".into(), |r| format!("{r:.2}"));
            let if_traced = |cell: String| if traced { cell } else { "—".into() };
            let mut cells = vec![
                w.name.clone(),
                row.label(),
                fmt_value(m),
                format!("{}–{}", fmt_range(lo), fmt_range(hi)),
                format!("{:.2}", m / untraced),
                ratio(floor.map(|f| m / f)),
            ];
            if env.baseline.is_some() {
                cells.push(ratio(vs_baseline));
            }
            cells.extend([
                if_traced(format!("{rate:.0}")),
                if_traced(lost.to_string()),
                if_traced(format!("{:.2}", last(|s| s.tracer_cpu_s))),
                if_traced(format!(
                    "{:.1} MiB",
                    last(|s| s.tracer_rss as f64) / 1048576.0
                )),
            ]);
            println!("| {} |", cells.join(" | "));
            rows_json.push(serde_json::json!({
                "workload": w.name,
                "config": row.label(),
                "binary": match row.binary {
                    Binary::Current => "current",
                    Binary::Baseline => "baseline",
                },
                "median": m,
                "min": lo,
                "max": hi,
                "unit": unit,
                "ratio_untraced": m / untraced,
                "ratio_floor": floor.map(|f| m / f),
                "ratio_baseline": vs_baseline,
                "events_per_s": traced.then_some(rate),
                "lost_events": lost,
                "tracer_cpu_s": traced.then(|| last(|s| s.tracer_cpu_s)),
                "tracer_peak_rss_bytes": traced.then(|| last(|s| s.tracer_rss as f64) as u64),
            }));
        }
    }

    // The user-space pipeline alone, on one core.
    println!();
    let out = cargo()
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "leaktrace",
            "--example",
            "ingest",
        ])
        .current_dir(&root)
        .output()?;
    if !out.status.success() {
        bail!(
            "ingest example failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ingest: serde_json::Value = serde_json::from_slice(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .context("no ingest output")?
            .as_bytes(),
    )?;
    println!("| user-space pipeline (one core, synthetic ring-buffer feed) | value |");
    println!("|---|---|");
    println!(
        "| records decoded and applied per second ({} malloc/free records) | {:.1} M/s |",
        ingest["events"],
        ingest["events_per_s"].as_f64().unwrap_or(0.0) / 1e6
    );
    for m in ingest["memory"].as_array().into_iter().flatten() {
        println!(
            "| table bytes per outstanding allocation, {} outstanding | {:.1} |",
            m["outstanding"],
            m["bytes_per_alloc"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(path) = json {
        let doc = serde_json::json!({
            "rows": rows_json,
            "ingest": ingest,
            "baseline": env.baseline,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("bench: figures written to {}", path.display());
    }
    Ok(())
}
