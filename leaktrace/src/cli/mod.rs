//! Command-line interface: `leaktrace --pid PID`, `leaktrace run -- CMD`, `leaktrace agent`
//! and `leaktrace diff OLD.json NEW.json`.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use leaktrace::{
    driver::{SessionConfig, Target},
    export::{FoldedKind, FoldedWeight, Format},
    report::ReportOptions,
    source::{AllocatorProbes, AttachMode},
    unwind::Unwind,
};
use leaktrace_common::features;

mod agent;
mod diff;
mod run;

const EXIT_CODES: &str = "\
Exit codes:
  0    success (with --pid); with `run`, the command's own exit status
       (128+N when it was killed by signal N)
  1    leaktrace failed while tracing
  2    invalid command line
  3    insufficient privileges (needs CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, or root)
  4    the target cannot be traced (no such pid, no allocator to hook)
  5    the kernel lacks a required feature (BTF, uprobes, tracefs)
  126  `run`: the command cannot be executed
  127  `run`: the command was not found

Examples:
  sudo leaktrace --pid 4242 --interval 10s --min-age 5s
  sudo leaktrace run --format json -- ./service --port 8080
  sudo leaktrace --pid 4242 --format folded --duration 60s | inferno-flamegraph > leaks.svg
  sudo leaktrace --pid 4242 --only fd --format folded --folded-kind fd > fds.folded
  sudo leaktrace --pid 4242 --duration 60s --format pprof -o heap.pb.gz
  sudo leaktrace --pid 4242 --oom-log /var/log/leaktrace-oom.jsonl
  leaktrace diff before.json after.json   # did the fix work?";

/// Find the call stacks that leak memory, descriptors and temp files, in a live process, with
/// eBPF.
///
/// leaktrace hooks the allocator (malloc, calloc, realloc, free, posix_memalign, ...) of one
/// process with uprobes, keeps every block that is allocated and not yet freed, and reports
/// the call stacks holding the most memory, with how fast they grow. From syscall
/// tracepoints it also reports the stacks holding open descriptors and temp files never
/// unlinked, descriptor exhaustion (EMFILE) the moment it happens, and every OOM kill on the
/// node. No restart, no recompilation; only the traced process pays for the probes.
#[derive(Debug, Parser)]
#[command(
    name = "leaktrace",
    version,
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Attach to this running process.
    #[arg(long, value_name = "PID", required = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(run::RunArgs),
    Agent(agent::AgentArgs),
    Diff(diff::DiffArgs),
    /// Compile the unwind tables of ELF files and print what they cost (for benchmarks).
    #[command(hide = true)]
    UnwindInfo {
        /// ELF files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    Trace(Box<SessionConfig>, u8),
    UnwindInfo(Vec<PathBuf>),
    /// `leaktrace diff`.
    Diff(leaktrace::driver::diff::DiffConfig),
}

/// Options shared by `--pid` and `run`.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Stop after this long (e.g. 30s, 5m, 1h) and print the final report.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Print a report every DURATION [default with --pid: 10s; with run: only at exit].
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub interval: Option<Duration>,

    /// Show at most N stacks [default: 10 for table, all for json and folded].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub top: Option<u64>,

    /// Count only blocks at least this old as leaks (e.g. 5s): hides short-lived
    /// allocations still in flight.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,

    /// Keep each process's rows apart. By default the same stack in several processes of one
    /// executable and container (a prefork server's workers, a command's children) is one
    /// row with a process count.
    #[arg(long)]
    pub by_pid: bool,

    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// Write reports to FILE instead of stdout; it always holds the latest complete report.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Trace only these kinds of leak (comma-separated) [default: all].
    #[arg(long, value_enum, value_name = "KIND", value_delimiter = ',')]
    pub only: Vec<Kind>,

    /// Which stacks folded output shows: heap blocks, open descriptors or temp files.
    #[arg(long, value_enum, default_value_t = FoldedKind::Heap)]
    pub folded_kind: FoldedKind,

    /// Also append every OOM-kill record to FILE, one JSON line each, the moment it happens.
    #[arg(long, value_name = "FILE")]
    pub oom_log: Option<PathBuf>,

    /// Record the session to FILE (JSON lines: every kernel record and what was read about
    /// the processes), to replay it without the processes or privileges: for bug reports and
    /// test fixtures.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,

    /// What folded stacks are weighted by.
    #[arg(long, value_enum, default_value_t = FoldedWeight::Bytes)]
    pub folded_weight: FoldedWeight,

    /// Size of the kernel-to-user ring buffer (a power of two, e.g. 16M, 256M). A larger buffer
    /// loses fewer events under bursts of allocations.
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_ring_buffer)]
    pub ring_buffer: u32,

    /// How stacks are walked: unwind tables from .eh_frame where a module has them and frame
    /// pointers elsewhere (auto), frame pointers only (fp), or tables only (dwarf).
    #[arg(long, value_enum, default_value_t = Unwind::Auto)]
    pub unwind: Unwind,

    /// Capacity of the kernel-side unwind table, in rows of 8 bytes for all modules together
    /// (glibc needs ~18k, a large C++ service a few hundred thousand).
    #[arg(long, value_name = "ROWS", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(1024..=1 << 26))]
    pub unwind_rows: u32,

    /// What to trace the heap with: allocator probes, exact (full), or no allocator probe at
    /// all, only page faults and mapping changes, for which stacks make the process grow
    /// (growth: any allocator, a cost low enough to leave on).
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    pub mode: Mode,

    /// Full mode: sample allocations instead of tracing each, a block of S bytes with
    /// probability min(1, S/N). Heap bytes per stack become unbiased estimates; each
    /// allocation still traps, but skipped ones cost no stack walk and no record.
    #[arg(long, value_name = "N", value_parser = parse_sample_bytes)]
    pub sample_bytes: Option<u32>,

    /// Time every stack walk in the kernel and add the figures to the summary (benchmarks).
    #[arg(long, hide = true)]
    pub measure_walks: bool,

    /// How uprobes are attached: uprobe_multi links where the kernel has them (auto), always
    /// (multi), or a perf-event uprobe per function (perf; slow to release). For tests and
    /// benchmarks.
    #[arg(long, value_enum, default_value_t = Attach::Auto, hide = true)]
    pub attach: Attach,

    /// Name Kubernetes pods and containers from the kubelet's log directories here,
    /// `<namespace>_<pod>_<uid>/<container>/`, and from the links in its sibling
    /// `containers/` (`<pod>_<namespace>_<container>-<id>.log`), with no API access
    /// [default: /var/log/pods].
    #[arg(long, value_name = "DIR")]
    pub pod_logs: Option<PathBuf>,

    /// More log output on stderr (-v info, -vv debug, -vvv trace); LEAKTRACE_LOG overrides.
    #[arg(long, short, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// No start line and no live status line on stderr (warnings, notices and errors
    /// still go there).
    #[arg(long, short)]
    pub quiet: bool,
}

/// How the heap is traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Every allocation and free, exact, with its stack.
    Full,
    /// New resident memory by the stacks that touched it: page faults, brk, mmap, munmap.
    Growth,
    /// Benchmarks: empty programs on malloc and free, the cost of the traps alone.
    #[value(hide = true)]
    Floor,
    /// Benchmarks: the floor plus an empty return probe on malloc.
    #[value(hide = true)]
    FloorReturn,
}

/// `--attach`: how uprobes are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attach {
    /// uprobe_multi links where the kernel has them, perf-event uprobes elsewhere.
    Auto,
    /// uprobe_multi links (fails where the kernel has none).
    Multi,
    /// A perf-event uprobe per program and function.
    Perf,
}

/// A kind of leak `--only` can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Heap blocks (allocator uprobes).
    Heap,
    /// File descriptors (syscall tracepoints).
    Fd,
    /// Temp files created and never unlinked.
    Tmp,
}

impl CommonArgs {
    pub fn session(&self, target: Target) -> SessionConfig {
        let interval = match (&target, self.interval) {
            (_, Some(i)) => Some(i),
            (Target::Pid(_) | Target::Node(_), None) => Some(Duration::from_secs(10)),
            (Target::Run { .. }, None) => None,
        };
        let top = match (self.top, self.format) {
            (Some(n), _) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            (None, Format::Table) => Some(10),
            (None, _) => None,
        };
        SessionConfig {
            target,
            duration: self.duration,
            interval,
            report: ReportOptions {
                min_age_ns: self.min_age.as_nanos().min(u128::from(u64::MAX)) as u64,
                growth_mode: self.mode == Mode::Growth,
                sample_bytes: self.sample_bytes.unwrap_or(0),
                top,
                by_pid: self.by_pid,
                row_limit: None,
                oom_traced_only: false,
            },
            format: self.format,
            weight: self.folded_weight,
            output: self.output.clone(),
            ring_buffer_bytes: self.ring_buffer,
            unwind: self.unwind,
            unwind_rows: self.unwind_rows,
            measure_walks: self.measure_walks,
            heap: self.traces(Kind::Heap) && self.mode != Mode::Growth,
            allocator_probes: match self.mode {
                Mode::Floor => AllocatorProbes::Floor,
                Mode::FloorReturn => AllocatorProbes::FloorReturn,
                Mode::Full | Mode::Growth => AllocatorProbes::Full,
            },
            attach: match self.attach {
                Attach::Auto => AttachMode::Auto,
                Attach::Multi => AttachMode::Multi,
                Attach::Perf => AttachMode::Perf,
            },
            sample_bytes: self.sample_bytes.unwrap_or(0),
            features: [(Kind::Fd, features::FD), (Kind::Tmp, features::TMP)]
                .into_iter()
                .filter(|&(kind, _)| self.traces(kind))
                .fold(0, |bits, (_, bit)| bits | bit)
                | if self.mode == Mode::Growth && self.traces(Kind::Heap) {
                    features::GROWTH
                } else {
                    0
                },
            oom_log: self.oom_log.clone(),
            folded_kind: self.folded_kind,
            bpf_log: self.verbose >= 2,
            record: self.record.clone(),
            quiet: self.quiet,
            pod_logs: self.pod_logs.clone(),
        }
    }

    pub(crate) fn traces(&self, kind: Kind) -> bool {
        self.only.is_empty() || self.only.contains(&kind)
    }
}

impl Cli {
    /// Checks what clap cannot: option combinations that make no sense together.
    pub fn validate(&self) -> Result<(), clap::Error> {
        let common = match &self.command {
            Some(Command::Run(run)) => &run.common,
            Some(Command::Agent(agent)) => {
                if agent.common.mode != Mode::Full || agent.common.sample_bytes.is_some() {
                    return Err(<Self as clap::CommandFactory>::command().error(
                        clap::error::ErrorKind::ArgumentConflict,
                        "the agent picks its own modes: growth for every process, exact heap \
                         tracing for --full and --full-auto; --mode and --sample-bytes do not apply",
                    ));
                }
                &agent.common
            }
            Some(Command::UnwindInfo { .. } | Command::Diff(_)) => return Ok(()),
            None => &self.common,
        };
        if let Some(why) = common.format.not_for_terminal()
            && common.output.is_none()
            && std::io::IsTerminal::is_terminal(&std::io::stdout())
        {
            return Err(<Self as clap::CommandFactory>::command()
                .error(clap::error::ErrorKind::ArgumentConflict, why));
        }
        if common.sample_bytes.is_some() && common.mode != Mode::Full {
            return Err(<Self as clap::CommandFactory>::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--sample-bytes samples the allocator probes of --mode full; growth mode has none",
            ));
        }
        Ok(())
    }

    /// What the command line asks for.
    pub fn into_action(self) -> Action {
        match self.command {
            Some(Command::UnwindInfo { files }) => Action::UnwindInfo(files),
            Some(Command::Diff(args)) => Action::Diff(args.config()),
            _ => {
                let (config, verbose) = self.into_session();
                Action::Trace(Box::new(config), verbose)
            }
        }
    }

    /// The session the command line asks for, and the verbosity.
    pub fn into_session(self) -> (SessionConfig, u8) {
        match self.command {
            Some(Command::UnwindInfo { .. } | Command::Diff(_)) => unreachable!("not a session"),
            Some(Command::Agent(agent)) => {
                let verbose = agent.common.verbose;
                (agent.session(), verbose)
            }
            Some(Command::Run(run)) => {
                let target = Target::Run {
                    argv: run.cmd,
                    follow_forks: run.follow_forks,
                };
                let mut config = run.common.session(target);
                config.report.oom_traced_only = !run.oom_all;
                (config, run.common.verbose)
            }
            None => {
                // clap enforces --pid when there is no subcommand.
                let pid = self.pid.unwrap_or_default();
                (self.common.session(Target::Pid(pid)), self.common.verbose)
            }
        }
    }
}

/// Parses `250ms`, `30s`, `1.5s`, `5m`, `2h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 5m or 250ms"))?;
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{s}` (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err("the interval must be at least 100ms".into());
    }
    Ok(d)
}

/// Parses a ring buffer size: bytes, or with a K/M/G suffix; a power of two from 4K to 1G.
/// A byte count with an optional K, M or G suffix; `example` is shown when it is not one.
fn parse_size(s: &str, example: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, scale) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like {example}"))?;
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// `--sample-bytes`: a size like 512K, from 2 bytes to 1G.
pub fn parse_sample_bytes(s: &str) -> Result<u32, String> {
    match parse_size(s, "512K")? {
        bytes @ 2..=0x4000_0000 => Ok(bytes as u32),
        _ => Err(format!(
            "`{s}`: the sampling unit must be between 2 bytes and 1G"
        )),
    }
}

pub fn parse_ring_buffer(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s, "16M")?;
    if !bytes.is_power_of_two() || !(4096..=1 << 30).contains(&bytes) {
        return Err(format!(
            "`{s}`: the ring buffer must be a power of two between 4K and 1G"
        ));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_interval("10ms").is_err());
    }

    #[test]
    fn ring_buffer_sizes() {
        assert_eq!(parse_ring_buffer("16M"), Ok(16 << 20));
        assert_eq!(parse_ring_buffer("4096"), Ok(4096));
        assert_eq!(parse_ring_buffer("1G"), Ok(1 << 30));
        assert!(parse_ring_buffer("3M").is_err());
        assert!(parse_ring_buffer("2G").is_err());
        assert!(parse_ring_buffer("lots").is_err());
    }

    #[test]
    fn pid_mode_and_run_mode_parse() {
        let cli = Cli::try_parse_from(["leaktrace", "--pid", "42", "--format", "json"]).unwrap();
        let (cfg, _) = cli.into_session();
        assert!(matches!(cfg.target, Target::Pid(42)));
        assert_eq!(cfg.interval, Some(Duration::from_secs(10)));
        assert_eq!(cfg.report.top, None);

        let cli = Cli::try_parse_from([
            "leaktrace",
            "run",
            "--follow-forks",
            "--top",
            "3",
            "--",
            "./prog",
            "-x",
        ])
        .unwrap();
        let (cfg, _) = cli.into_session();
        let Target::Run { argv, follow_forks } = cfg.target else {
            panic!()
        };
        assert_eq!(argv, ["./prog", "-x"]);
        assert!(follow_forks);
        assert_eq!(cfg.interval, None);
        assert_eq!(cfg.report.top, Some(3));
        assert!(cfg.heap);
        assert_eq!(cfg.features, features::FD | features::TMP);
        // A command's report keeps only its own OOM kills, unless --oom-all.
        assert!(cfg.report.oom_traced_only);
        let all = Cli::try_parse_from(["leaktrace", "run", "--oom-all", "--", "./prog"]).unwrap();
        assert!(!all.into_session().0.report.oom_traced_only);
        let pid = Cli::try_parse_from(["leaktrace", "--pid", "1"]).unwrap();
        assert!(!pid.into_session().0.report.oom_traced_only);
    }

    #[test]
    fn only_narrows_what_is_traced() {
        let cli = Cli::try_parse_from(["leaktrace", "--pid", "7", "--only", "fd,tmp"]).unwrap();
        let (cfg, _) = cli.into_session();
        assert!(!cfg.heap);
        assert_eq!(cfg.features, features::FD | features::TMP);
        let cli = Cli::try_parse_from(["leaktrace", "--pid", "7", "--only", "heap"]).unwrap();
        let (cfg, _) = cli.into_session();
        assert!(cfg.heap);
        assert_eq!(cfg.features, 0);
        assert!(Cli::try_parse_from(["leaktrace", "--pid", "7", "--only", "disk"]).is_err());
    }

    #[test]
    fn diff_parses_to_two_files_and_a_format() {
        let action = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            cli.validate().unwrap();
            match cli.into_action() {
                Action::Diff(config) => config,
                other => panic!("{other:?}"),
            }
        };
        let c = action(&["leaktrace", "diff", "old.json", "new.json"]);
        assert_eq!(
            (c.old, c.new),
            (PathBuf::from("old.json"), PathBuf::from("new.json"))
        );
        assert_eq!(c.top, Some(10));
        let c = action(&[
            "leaktrace",
            "diff",
            "a",
            "b",
            "--format",
            "json",
            "--sort",
            "count",
        ]);
        assert_eq!(c.top, None);
        assert_eq!(c.sort, leaktrace::report::diff::Sort::Count);
        let c = action(&[
            "leaktrace",
            "diff",
            "a",
            "b",
            "--format",
            "folded",
            "--folded-kind",
            "fd",
        ]);
        assert_eq!(c.folded_kind, leaktrace::report::diff::Kind::Fd);
        for args in [
            &["leaktrace", "diff", "a"][..],
            &["leaktrace", "--pid", "1", "diff", "a", "b"],
            &["leaktrace", "diff", "a", "b", "--format", "pprof"],
            &["leaktrace", "diff", "a", "b", "--folded-kind", "runtime"],
        ] {
            assert!(
                Cli::try_parse_from(args).is_err(),
                "{args:?} should be rejected"
            );
        }
    }

    #[test]
    fn bad_command_lines_are_rejected() {
        for args in [
            &["leaktrace"][..],
            &["leaktrace", "--pid", "0"],
            &["leaktrace", "--pid", "abc"],
            &["leaktrace", "run"],
            &["leaktrace", "--pid", "1", "run", "--", "x"],
            &["leaktrace", "--pid", "1", "--top", "0"],
        ] {
            assert!(
                Cli::try_parse_from(args).is_err(),
                "{args:?} should be rejected"
            );
        }
    }
}
