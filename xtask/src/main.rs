//! `cargo xtask`: what cargo alone cannot do for leaktrace — install the eBPF toolchain, run
//! the privileged test suite, the demo and the benchmarks. Nothing here is needed at run time.
use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// bpf-linker release known to work with the pinned aya crates.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(about = "leaktrace project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): nightly's rust-src, bpf-linker
    /// built against the nightly's LLVM, a C compiler, valgrind, promtool and Go for the
    /// serving tests, podman and runc for the container tests, tracefs.
    Setup,
    /// Set up, then build leaktrace in release mode with its eBPF programs.
    Build,
    /// Set up, build the agent image (as `image`), then run the whole suite, eBPF integration
    /// tests and the deploy test of that image included (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build leaktrace in release mode, and make the agent's container image,
    /// `localhost/leaktrace:<version>-<hash>` (also tagged `:<version>`, the name the
    /// manifests in deploy/kubernetes use), from it offline; nothing is imported when podman
    /// has that tag already. Prints the image's name on stdout.
    Image,
    /// Set up, build, and trace the bundled leaking demo program.
    Demo,
    /// Measure tracing overhead and tracer memory (markdown tables on stdout).
    Bench {
        /// Rounds per configuration, interleaved.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Which benchmark: `overhead` (heap tracing against untraced, the floor and
        /// bcc-style placement, on the churn fixture and real programs; the user-space
        /// pipeline alone), `alloc` (tracer memory with a million blocks outstanding),
        /// `unwind` (stack walking cost, unwind table sizes), `fd` (descriptor tracking),
        /// `storm` (200 short-lived processes under --follow-forks, uprobe_multi links
        /// against perf-event uprobes: attach latency, release, wall time; needs root) or
        /// `agent` (the node agent: tier 1 on busy programs, idle CPU, RSS with 1,000
        /// processes).
        #[arg(long, default_value = "overhead")]
        only: String,
        /// Also write the overhead figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Agent: minutes of process churn (50 short-lived processes a second) to watch the
        /// agent's memory over; 0 skips it.
        #[arg(long, value_name = "MINUTES", default_value_t = 1)]
        churn_minutes: u64,
        /// Overhead: only the workloads whose name contains NAME (repeatable), e.g. `sqlite3`.
        #[arg(long, value_name = "NAME")]
        workload: Vec<String>,
        /// Overhead: only these configurations (repeatable, e.g. `growth`); untraced is always
        /// measured, as the reference, and a configuration's `(baseline)` row goes with it.
        #[arg(long, value_name = "CONFIG")]
        config: Vec<String>,
        /// Overhead: also run every configuration that runs leaktrace (floor, full, full
        /// sampled 64K, growth) with the leaktrace binary at PATH, e.g. one built from an
        /// earlier commit, as `<config> (baseline)` rows interleaved in the same rounds; the
        /// `× baseline` column is this tree's median over the baseline's. floor's empty
        /// programs never change: its ratio shows the noise.
        #[arg(long, value_name = "PATH")]
        baseline: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build_release()
        }
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
        Task::Image => {
            setup()?;
            let image = image::build()?;
            eprintln!(
                "xtask: {} {} ({:.1} MiB, one layer)",
                if image.imported {
                    "imported"
                } else {
                    "podman already has"
                },
                image.name,
                image.bytes as f64 / (1024.0 * 1024.0)
            );
            println!("{}", image.name);
            Ok(())
        }
        Task::Demo => {
            setup()?;
            demo()
        }
        Task::Bench {
            rounds,
            only,
            json,
            workload,
            config,
            baseline,
            churn_minutes,
        } => {
            setup()?;
            match only.as_str() {
                "unwind" => bench::unwind(rounds),
                "fd" => bench::fd(rounds),
                "alloc" => bench::run(rounds),
                "storm" => storm::run(rounds),
                "overhead" => overhead::run(rounds, json, &workload, &config, baseline),
                "agent" => agent_bench::run(rounds, json, churn_minutes),
                other => {
                    anyhow::bail!(
                        "no benchmark `{other}` (overhead, alloc, unwind, fd, storm, agent)"
                    )
                }
            }
        }
    }
}

mod agent_bench;
mod bench;
mod image;
#[cfg(test)]
mod manifests;
mod overhead;
mod storm;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).as_deref() == Some("0")
}

/// Runs `cmd` as root: directly when we are root, else through sudo.
fn as_root(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

fn setup() -> Result<()> {
    // Nightly with rust-src builds the eBPF crate (`-Z build-std=core`).
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("no nightly toolchain: install one with `rustup toolchain install nightly`")?;
    let sysroot = PathBuf::from(sysroot);
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("xtask: installing rust-src for nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    install_bpf_linker(&sysroot)?;
    // The fixtures are C and C++ programs; valgrind is the oracle for "in use at exit";
    // promtool (in Debian's prometheus package) and `go tool pprof` check what the agent
    // serves.
    let missing: Vec<&str> = [
        ("cc", "--version", "gcc"),
        ("c++", "--version", "g++"),
        ("valgrind", "--version", "valgrind"),
        ("promtool", "--version", "prometheus"),
        ("go", "version", "golang-go"),
    ]
    .into_iter()
    .filter(|(tool, arg, _)| output(Command::new(tool).arg(arg)).is_none())
    .map(|(_, _, package)| package)
    .collect();
    // The container tests run fixtures under podman with runc (see tests/containers.md), and
    // tests/html.rs opens the HTML report in headless chromium.
    // Recommends are left out: as root, with no network and no registry, podman needs
    // neither buildah, slirp4netns, fuse-overlayfs nor the user-session pieces, and headless
    // chromium none of its desktop integration (the base image's DejaVu fonts suffice).
    let no_recommends: Vec<&str> = [
        ("podman", "podman"),
        ("runc", "runc"),
        ("chromium", "chromium"),
    ]
    .into_iter()
    .filter(|(tool, _)| output(Command::new(tool).arg("--version")).is_none())
    .map(|(_, package)| package)
    .collect();
    if !missing.is_empty() || !no_recommends.is_empty() {
        run(as_root("apt-get").args(["update", "-q"]))?;
    }
    if !missing.is_empty() {
        eprintln!("xtask: installing {}", missing.join(", "));
        run(as_root("apt-get")
            .args(["install", "-yq", "libc6-dev"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !no_recommends.is_empty() {
        eprintln!("xtask: installing {}", no_recommends.join(", "));
        run(as_root("apt-get")
            .args(["install", "-yq", "--no-install-recommends"])
            .args(&no_recommends)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    mount_tracefs()
}

/// bpf-linker links eBPF objects with LLVM; it must be the LLVM of the nightly that emits the
/// bitcode. It finds `libLLVM.so` through `$LLVM_PREFIX/lib`, so we give it a directory of
/// links to the nightly's own library (and keep it: the binary's rpath points there).
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let version = output(Command::new("rustc").args(["+nightly", "-vV"])).unwrap_or_default();
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot tell the nightly's LLVM version")?
        .to_owned();
    let lib = fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .find(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        .or_else(|| {
            fs::read_dir(sysroot.join("lib"))
                .ok()?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .find(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("libLLVM") && n.ends_with(".so")
                })
        })
        .context("the nightly toolchain ships no libLLVM")?;
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = home.join(format!("leaktrace-llvm-{major}"));
    let libdir = prefix.join("lib");
    fs::create_dir_all(&libdir)?;
    let target = sysroot.join("lib").join(&lib);
    for name in [OsStr::new("libLLVM.so"), lib.as_os_str()] {
        let link = libdir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn mount_tracefs() -> Result<()> {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("events").is_dir() || Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    run(as_root("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    // A missing eBPF toolchain must fail the build, not produce a stub object.
    c.env("LEAKTRACE_REQUIRE_EBPF", "1");
    c
}

fn build_release() -> Result<()> {
    run(cargo().args(["build", "--release", "--package", "leaktrace"]))
}

fn test(args: &[String]) -> Result<()> {
    // The deploy test runs the agent's image the way deploy/kubernetes/daemonset.yaml says:
    // build it first (a release build; cached in target/ like the rest), so the test only
    // reads its name.
    let started = std::time::Instant::now();
    let image = image::build()?;
    eprintln!(
        "xtask: agent image {} ready in {:.1?}",
        image.name,
        started.elapsed()
    );
    let mut cmd = cargo();
    cmd.arg("test");
    cmd.env("LEAKTRACE_TEST_AGENT_IMAGE", &image.name);
    // The integration tests load eBPF programs: they must run, not skip.
    cmd.env("LEAKTRACE_TEST_REQUIRE_ROOT", "1");
    // Setup installed podman: the container tests must run too.
    cmd.env("LEAKTRACE_TEST_REQUIRE_CONTAINERS", "1");
    if !is_root() {
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    run(&mut cmd)
}

/// Builds `tests/fixtures/<name>.c` into `target/fixtures/<name>`.
fn c_fixture(name: &str, flags: &[&str]) -> Result<PathBuf> {
    let root = workspace_root();
    let out = root.join("target/fixtures");
    fs::create_dir_all(&out)?;
    let exe = out.join(name);
    run(Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(root.join(format!("tests/fixtures/{name}.c"))))?;
    Ok(exe)
}

fn demo() -> Result<()> {
    build_release()?;
    let root = workspace_root();
    let demo = c_fixture("demo", &["-O0", "-g", "-fno-omit-frame-pointer"])?;
    eprintln!(
        "xtask: tracing the demo: a toy service that handles requests for 4 s; its response cache never \
         evicts and a config check leaks a descriptor now and then.\n       leaktrace run --interval 1s -- {}",
        demo.display()
    );
    run(as_root(
        root.join("target/release/leaktrace")
            .to_str()
            .context("non-UTF-8 path")?,
    )
    .args(["run", "--interval", "1s", "--top", "3", "--"])
    .arg(&demo))
}
