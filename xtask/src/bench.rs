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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    // SAFETY: zeroed rusage is a valid out-parameter; waiting for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
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
    let (u, t) = (median(&mut untraced.clone()), median(&mut traced.clone()));
    let range = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!("{min:.0}–{max:.0}")
    };

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
        median(&mut traced_wall)
    );
    Ok(())
}
