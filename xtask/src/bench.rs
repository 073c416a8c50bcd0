//! `cargo xtask bench`: what tracing costs, measured side by side in one run.
//!
//! Rounds interleave the configurations (untraced, traced, untraced, ...) so machine drift
//! hits all of them alike; the table gives the median and the range.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{as_root, build_release, c_fixture, workspace_root};

/// malloc/free pairs per churn run.
const PAIRS: u64 = 200_000;
/// Outstanding blocks for the memory figure.
const HELD: u64 = 1_000_000;

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn min_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(0.0, f64::max),
    )
}

fn range(v: &[f64]) -> String {
    let (min, max) = min_max(v);
    format!("{min:.0}–{max:.0}")
}

/// Runs a command, returning its stdout and the peak RSS (KiB) of it and its children.
fn run_measured(cmd: &mut Command) -> Result<(String, u64)> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let pid = child.id() as i32;
    let mut out = String::new();
    for line in BufReader::new(child.stdout.context("stdout")?).lines() {
        out.push_str(&line?);
        out.push('\n');
    }
    let mut status = 0;
    // SAFETY: rusage is plain integers and timevals, for which all-zero bytes are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unreaped child; `status` and `usage` are valid for writes.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
        bail!("wait4 failed");
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed: status {status}");
    }
    Ok((out, usage.ru_maxrss as u64))
}

pub fn run(rounds: usize) -> Result<()> {
    build_release()?;
    let prog = c_fixture("bench_alloc", &["-O2", "-g", "-fno-omit-frame-pointer"])?;
    let leaktrace = workspace_root().join("target/release/leaktrace");
    let pairs = PAIRS.to_string();

    let mut untraced = Vec::new();
    let mut traced = Vec::new();
    let mut traced_wall = Vec::new();
    for round in 0..rounds {
        eprintln!("bench: round {}/{rounds}", round + 1);
        let (out, _) = run_measured(Command::new(&prog).args(["churn", &pairs]))?;
        untraced.push(out.trim().parse::<f64>()?);
        let t = Instant::now();
        let (out, _) = run_measured(
            as_root(leaktrace.to_str().context("path")?)
                .args(["run", "--format", "json", "--output", "/dev/null", "--"])
                .arg(&prog)
                .args(["churn", &pairs]),
        )?;
        traced_wall.push(t.elapsed().as_secs_f64());
        traced.push(out.trim().parse::<f64>()?);
    }
    let (u, t) = (median(&untraced), median(&traced));

    // Tracer memory with a million outstanding blocks: peak RSS of leaktrace itself (the
    // traced program's own RSS is measured untraced and subtracted).
    // ru_maxrss of children is the largest single child: leaktrace itself, which is far
    // bigger than the traced program. The same run with nothing held gives the baseline.
    let tracer_rss = |n: u64| -> Result<u64> {
        let (_, rss) = run_measured(
            as_root(leaktrace.to_str().context("path")?)
                .args(["run", "--format", "json", "--output", "/dev/null", "--"])
                .arg(&prog)
                .args(["hold", &n.to_string()]),
        )?;
        Ok(rss)
    };
    let baseline = tracer_rss(0)?;
    let held_rss = tracer_rss(HELD)?;

    println!(
        "| workload | config | median ns per malloc/free pair | min–max | ratio to untraced |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| churn {PAIRS} pairs, -O2 | untraced | {u:.0} | {} | 1.00 |",
        range(&untraced)
    );
    println!(
        "| churn {PAIRS} pairs, -O2 | leaktrace run | {t:.0} | {} | {:.1} |",
        range(&traced),
        t / u
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| added ns per traced malloc/free pair (median) | {:.0} |",
        t - u
    );
    println!(
        "| leaktrace peak RSS, nothing outstanding | {:.1} MiB |",
        baseline as f64 / 1024.0
    );
    println!(
        "| leaktrace peak RSS, {HELD} outstanding blocks | {:.1} MiB |",
        held_rss as f64 / 1024.0
    );
    println!(
        "| peak tracer bytes per outstanding block (difference / {HELD}) | {:.0} |",
        held_rss.saturating_sub(baseline) as f64 * 1024.0 / HELD as f64
    );
    println!(
        "| traced run wall time (median, incl. start-up) | {:.2} s |",
        median(&traced_wall)
    );
    Ok(())
}

/// Libraries the table-memory figure loads into one process (the first 20 found).
const LIBRARIES: &[&str] = &[
    "libm.so.6",
    "libz.so.1",
    "libcrypto.so.3",
    "libssl.so.3",
    "libstdc++.so.6",
    "libgcc_s.so.1",
    "libexpat.so.1",
    "libffi.so.8",
    "liblzma.so.5",
    "libbz2.so.1.0",
    "libzstd.so.1",
    "libuuid.so.1",
    "libselinux.so.1",
    "libpcre2-8.so.0",
    "libcap.so.2",
    "libsqlite3.so.0",
    "libgmp.so.10",
    "libreadline.so.8",
    "libncursesw.so.6",
    "libtinfo.so.6",
    "libsystemd.so.0",
    "libkeyutils.so.1",
    "libmd.so.0",
    "libblkid.so.1",
    "libmount.so.1",
];

pub(crate) fn json_line(out: &str) -> Result<serde_json::Value> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON report")?;
    Ok(serde_json::from_str(line)?)
}

/// Stack walking: ns per walk measured in the kernel, tables against frame pointers, at three
/// depths, interleaved; unwind table sizes and build times; BPF map memory with 20 modules.
pub fn unwind(rounds: usize) -> Result<()> {
    build_release()?;
    let prog = c_fixture("bench_unwind", &["-O2", "-g", "-fno-omit-frame-pointer"])?;
    let leaktrace = workspace_root().join("target/release/leaktrace");
    let lt = leaktrace.to_str().context("path")?;
    let walk = |depth: u32, unwind: &str| -> Result<(f64, f64)> {
        let (out, _) = run_measured(
            as_root(lt)
                .args([
                    "run",
                    "--format",
                    "json",
                    "--measure-walks",
                    "--unwind",
                    unwind,
                    "--",
                ])
                .arg(&prog)
                .args([&depth.to_string(), "20000"]),
        )?;
        let w = &json_line(&out)?["summary"]["walks"];
        Ok((
            w["ns_per_walk"].as_f64().unwrap_or(0.0),
            w["frames_per_walk"].as_f64().unwrap_or(0.0),
        ))
    };
    println!(
        "| stack (frames with tables) | walk | median ns per walk | min–max | frames | ns per frame |"
    );
    println!("|---|---|---|---|---|---|");
    // Depth d gives d + 6 frames with tables (through glibc to _start), d + 4 with frame
    // pointers (glibc has none, so the chain ends in __libc_start_call_main).
    for depth in [4u32, 24, 94] {
        let (mut fp, mut dw) = (Vec::new(), Vec::new());
        let (mut fp_frames, mut dw_frames) = (0.0, 0.0);
        for round in 0..rounds {
            eprintln!("bench: unwind depth {depth}, round {}/{rounds}", round + 1);
            let (ns, frames) = walk(depth, "fp")?;
            fp.push(ns);
            fp_frames = frames;
            let (ns, frames) = walk(depth, "auto")?;
            dw.push(ns);
            dw_frames = frames;
        }
        for (name, v, frames) in [
            (".eh_frame tables", &dw, dw_frames),
            ("frame pointers", &fp, fp_frames),
        ] {
            let m = median(v);
            let (min, max) = min_max(v);
            println!(
                "| ~{} | {name} | {m:.0} | {min:.0}–{max:.0} | {frames:.0} | {:.1} |",
                depth + 6,
                m / frames
            );
        }
    }

    println!();
    println!(
        "| module | FDEs | rows | unsupported rows | table bytes (rows + page index) | build ms |"
    );
    println!("|---|---|---|---|---|---|");
    let mut modules = vec![
        "/usr/lib/x86_64-linux-gnu/libc.so.6".to_owned(),
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6".to_owned(),
    ];
    // A large binary: the nightly compiler's driver library, else leaktrace itself.
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()?;
    let lib = std::path::PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    let large = std::fs::read_dir(&lib)
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().contains("librustc_driver"))
        })
        .unwrap_or_else(|| leaktrace.clone());
    modules.push(large.to_string_lossy().into_owned());
    let (out, _) = run_measured(Command::new(lt).arg("unwind-info").args(&modules))?;
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let bytes = v["row_bytes"].as_u64().unwrap_or(0) + v["index_bytes"].as_u64().unwrap_or(0);
        println!(
            "| {} | {} | {} | {} | {:.1} KiB | {:.1} |",
            v["path"]
                .as_str()
                .unwrap_or("?")
                .rsplit('/')
                .next()
                .unwrap_or("?"),
            v["fdes"],
            v["rows"],
            v["unsupported"],
            bytes as f64 / 1024.0,
            v["compile_ms"].as_f64().unwrap_or(0.0)
        );
    }

    let host = c_fixture("dlopen_many", &["-O2", "-g"])?;
    let libs: Vec<String> = LIBRARIES
        .iter()
        .map(|l| format!("/usr/lib/x86_64-linux-gnu/{l}"))
        .filter(|p| std::path::Path::new(p).exists())
        .take(20)
        .collect();
    let (out, _) = run_measured(
        as_root(lt)
            .args(["run", "--format", "json", "--measure-walks", "--"])
            .arg(&host)
            .args(&libs),
    )?;
    let w = &json_line(&out)?["summary"]["walks"];
    println!();
    println!(
        "| with {} libraries dlopen'ed (plus the program, libc, the loader) | value |",
        libs.len()
    );
    println!("|---|---|");
    println!("| unwind rows loaded | {} |", w["unwind_rows"]);
    println!(
        "| kernel memory of all BPF maps (memlock; unwind arrays and ring buffer are preallocated) | {:.1} MiB |",
        w["bpf_map_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
    );
    Ok(())
}

/// open/close pairs per tight-loop run.
const OPENS: u64 = 200_000;
/// Files in the tarball the `tar` workload extracts.
const TAR_FILES: usize = 20_000;

/// A tarball of `TAR_FILES` small files in 100 directories, built once under `target/`.
fn tarball() -> Result<std::path::PathBuf> {
    let dir = workspace_root().join("target/bench-fd");
    let tar = dir.join("tree.tar");
    if tar.exists() {
        return Ok(tar);
    }
    let tree = dir.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    for i in 0..TAR_FILES {
        let sub = tree.join(format!("d{:02}", i % 100));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(
            sub.join(format!("f{i:05}.txt")),
            vec![b'a' + (i % 26) as u8; 512],
        )?;
    }
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&dir)
        .arg("tree")
        .status()?;
    if !status.success() {
        bail!("building {} failed", tar.display());
    }
    std::fs::remove_dir_all(&tree)?;
    Ok(tar)
}

/// A leaktrace attached to a process that does nothing, so that the workload runs on a node
/// where the descriptor tracepoints are live but it is not traced. Killed on drop.
struct Bystander {
    tracer: std::process::Child,
    sleeper: std::process::Child,
}

impl Bystander {
    fn start(lt: &str) -> Result<Self> {
        let sleeper = Command::new("sleep").arg("3600").spawn()?;
        let mut tracer = as_root(lt)
            .args(["--pid", &sleeper.id().to_string(), "--interval", "1h", "-v"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = tracer.stderr.take().context("stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("tracing pid") => break,
                Some(Ok(_)) => {}
                _ => bail!("the bystander leaktrace did not start"),
            }
        }
        // Keep draining its stderr so it never blocks.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { tracer, sleeper })
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own children.
        unsafe { libc::kill(self.tracer.id() as i32, libc::SIGINT) };
        let _ = self.tracer.wait();
        let _ = self.sleeper.kill();
        let _ = self.sleeper.wait();
    }
}

/// Descriptor tracking: ns per open/close pair on a tight loop and the slowdown of `tar`
/// extracting `TAR_FILES` small files, untraced / on a node where another process is traced
/// / traced with `--only fd` / traced with everything on.
pub fn fd(rounds: usize) -> Result<()> {
    build_release()?;
    // No frame pointers: the stacks at the syscall are walked with .eh_frame.
    let prog = c_fixture("bench_fd", &["-O2", "-g"])?;
    let lt = workspace_root().join("target/release/leaktrace");
    let lt = lt.to_str().context("path")?;
    let file = prog.to_str().context("path")?;
    let tar = tarball()?;
    // Extracted to tmpfs: on disk, the discards and writeback of the previous round's files
    // swing the time tenfold. In memory the tracer's share is the largest it can be.
    let out_dir = std::path::PathBuf::from(format!(
        "/dev/shm/leaktrace-bench-fd-{}",
        std::process::id()
    ));
    let opens = OPENS.to_string();

    const CONFIGS: [&str; 4] = ["untraced", "bystander", "--only fd", "all kinds"];
    let traced_args = |config: &str| -> Vec<&str> {
        match config {
            "--only fd" => vec!["run", "--format", "json", "--only", "fd", "--follow-forks"],
            _ => vec!["run", "--format", "json", "--follow-forks"],
        }
    };
    let run_config = |config: &str, workload: &[&str]| -> Result<f64> {
        let mut cmd = match config {
            "untraced" | "bystander" => Command::new(&prog),
            _ => {
                let mut c = as_root(lt);
                c.args(traced_args(config)).arg("--").arg(&prog);
                c
            }
        };
        cmd.args(workload);
        if config != "untraced" && config != "bystander" {
            // The report is not what is measured; the workload prints its figure to stderr
            // under --format json, so read it from the JSON-free stream below.
            cmd.stderr(Stdio::piped());
        }
        let out = cmd.stdout(Stdio::piped()).output()?;
        if !out.status.success() {
            bail!(
                "{config} {workload:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(if config == "untraced" || config == "bystander" {
            &out.stdout
        } else {
            &out.stderr
        })
        .into_owned();
        text.lines()
            .rev()
            .find_map(|l| l.trim().parse::<f64>().ok())
            .with_context(|| format!("no figure from {config} {workload:?}: {text}"))
    };

    let mut pairs: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut tars: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut disk_tars: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    // On disk (ext4 here), into a fresh directory each time: deleting the previous round's
    // files first is what makes disk times swing, so they are all deleted at the end.
    let disk_root = workspace_root().join("target/bench-fd/disk");
    let _ = std::fs::remove_dir_all(&disk_root);
    let tar_args = [
        "timed",
        "tar",
        "-xf",
        tar.to_str().context("path")?,
        "-C",
        out_dir.to_str().context("path")?,
    ];
    for round in 0..rounds {
        eprintln!("bench: fd round {}/{rounds}", round + 1);
        for (i, config) in CONFIGS.iter().enumerate() {
            let _bystander = (*config == "bystander")
                .then(|| Bystander::start(lt))
                .transpose()?;
            pairs[i].push(run_config(config, &["openclose", &opens, file])?);
            let _ = std::fs::remove_dir_all(&out_dir);
            std::fs::create_dir_all(&out_dir)?;
            // Earlier rounds' dirty pages are written back now, not during the next run.
            Command::new("sync").status()?;
            tars[i].push(run_config(config, &tar_args)? / 1e6);
            let disk_dir = disk_root.join(format!("{round}-{i}"));
            std::fs::create_dir_all(&disk_dir)?;
            let mut args = tar_args;
            args[5] = disk_dir.to_str().context("path")?;
            Command::new("sync").status()?;
            disk_tars[i].push(run_config(config, &args)? / 1e6);
        }
    }
    let _ = std::fs::remove_dir_all(&disk_root);
    let base_pair = median(&pairs[0]);
    println!("| workload | config | median | min–max | added | ratio to untraced |");
    println!("|---|---|---|---|---|---|");
    for (i, config) in CONFIGS.iter().enumerate() {
        let m = median(&pairs[i]);
        println!(
            "| {OPENS} open/close pairs, ns per pair | {config} | {m:.0} | {} | {:+.0} ns | {:.2} |",
            range(&pairs[i]),
            m - base_pair,
            m / base_pair
        );
    }
    for (name, runs) in [("tmpfs", &tars), ("ext4", &disk_tars)] {
        let base = median(&runs[0]);
        for (i, config) in CONFIGS.iter().enumerate() {
            let m = median(&runs[i]);
            println!(
                "| tar -xf of {TAR_FILES} files to {name}, ms | {config} | {m:.0} | {} | {:+.1}% | {:.3} |",
                range(&runs[i]),
                (m / base - 1.0) * 100.0,
                m / base
            );
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    Ok(())
}
