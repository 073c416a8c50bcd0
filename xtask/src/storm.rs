//! `cargo xtask bench --only storm`: short-lived processes under `leaktrace run
//! --follow-forks`, with uprobe_multi links and with perf-event uprobes, side by side.
//!
//! `fork_storm 200 50` forks 200 children at 20/s; each execs, leaks, and exits. Per run:
//! the wall time, how long after its fork/exec record each child's probes were in place
//! (leaktrace's own figures, `summary.probes`), the most BPF links alive at once, and how
//! long after leaktrace exits the system's uprobe links are back to their count before the
//! run (the probes of exited processes still being released).
use std::{
    mem::{size_of, zeroed},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

use crate::{
    as_root,
    bench::{median, min_max},
    build_release, c_fixture, is_root, workspace_root,
};

/// Children per run, and the gap between two forks.
const CHILDREN: u32 = 200;
const GAP_MS: u32 = 50;

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> i64 {
    // SAFETY: `attr` is a zero-initialised bpf_attr of the size passed, and its pointers
    // point to buffers alive for the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    }
}

/// BPF links of the system that carry uprobes or perf events (uprobe_multi and perf-event
/// links; the latter also hold tracepoints).
fn probe_links() -> usize {
    let mut n = 0;
    let mut id = 0u32;
    loop {
        // SAFETY: all zeroes is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { zeroed() };
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        if bpf(bpf_cmd::BPF_LINK_GET_NEXT_ID, &mut attr) < 0 {
            return n;
        }
        // SAFETY: the kernel filled next_id.
        id = unsafe { attr.__bindgen_anon_6.next_id };
        // SAFETY: as above.
        let mut attr: bpf_attr = unsafe { zeroed() };
        attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
        let fd = bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue;
        }
        // SAFETY: plain data.
        let mut info: bpf_link_info = unsafe { zeroed() };
        // SAFETY: as above.
        let mut attr: bpf_attr = unsafe { zeroed() };
        attr.info.bpf_fd = fd as u32;
        attr.info.info_len = size_of::<bpf_link_info>() as u32;
        attr.info.info = std::ptr::from_mut(&mut info) as u64;
        let ok = bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) == 0;
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd as i32) };
        if ok
            && (info.type_ == bpf_link_type::BPF_LINK_TYPE_UPROBE_MULTI as u32
                || info.type_ == bpf_link_type::BPF_LINK_TYPE_PERF_EVENT as u32)
        {
            n += 1;
        }
    }
}

/// One storm under leaktrace.
struct Figures {
    wall_s: f64,
    hook_p50_ms: f64,
    hook_max_ms: f64,
    links_attached: u64,
    peak_links: usize,
    release_s: f64,
    exact: bool,
}

fn storm(leaktrace: &str, prog: &str, attach: &str) -> Result<Figures> {
    let baseline = probe_links();
    let out = std::env::temp_dir().join(format!("leaktrace-storm-{}.json", std::process::id()));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(probe_links().saturating_sub(baseline), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let started = Instant::now();
    let status = as_root(leaktrace)
        .args([
            "run",
            "--follow-forks",
            "--format",
            "json",
            "--attach",
            attach,
        ])
        .arg("--output")
        .arg(&out)
        .args(["--", prog, &CHILDREN.to_string(), &GAP_MS.to_string()])
        .status()
        .context("leaktrace")?;
    let wall_s = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    if !status.success() {
        bail!("leaktrace run --attach {attach} failed: {status}");
    }
    let exited = Instant::now();
    let deadline = exited + Duration::from_secs(900);
    while probe_links() > baseline {
        if Instant::now() > deadline {
            bail!("--attach {attach}: links still not released after 15 min");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let release_s = exited.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    let report = crate::bench::json_line(&text)?;
    let s = &report["summary"];
    let p = &s["probes"];
    let ms = |k: &str| p[k].as_u64().unwrap_or(0) as f64 / 1e3;
    let leaked = report["leaks"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|l| l["frames"][0]["symbol"] == "child_leak")
                .map(|l| l["outstanding_bytes"].as_u64().unwrap_or(0))
                .sum::<u64>()
        })
        .unwrap_or(0);
    Ok(Figures {
        wall_s,
        hook_p50_ms: ms("hook_latency_us_p50"),
        hook_max_ms: ms("hook_latency_us_max"),
        links_attached: p["links_attached"].as_u64().unwrap_or(0),
        peak_links: peak.load(Ordering::Relaxed),
        release_s,
        exact: leaked == u64::from(CHILDREN) * 300 && s["lost_events"] == 0,
    })
}

/// Runs the storm `rounds` times for each attach mode, interleaved, and prints a table.
pub fn run(rounds: usize) -> Result<()> {
    if !is_root() {
        bail!("the storm benchmark counts the system's BPF links: run it as root");
    }
    build_release()?;
    let prog = c_fixture("fork_storm", &["-O2", "-g", "-fno-omit-frame-pointer"])?;
    let prog = prog.to_str().context("path")?.to_owned();
    let leaktrace = workspace_root().join("target/release/leaktrace");
    let leaktrace = leaktrace.to_str().context("path")?;
    let modes = ["multi", "perf"];
    let mut results: Vec<Vec<Figures>> = modes.iter().map(|_| Vec::new()).collect();
    let mut untraced = Vec::new();
    for round in 0..rounds {
        eprintln!("storm: round {}/{rounds}", round + 1);
        let t = Instant::now();
        let status = Command::new(&prog)
            .args([CHILDREN.to_string(), GAP_MS.to_string()])
            .status()?;
        if !status.success() {
            bail!("{prog} failed");
        }
        untraced.push(t.elapsed().as_secs_f64());
        for (mode, out) in modes.iter().zip(&mut results) {
            let f = storm(leaktrace, &prog, mode)?;
            eprintln!(
                "storm: {mode}: wall {:.2} s, hook p50 {:.1} ms max {:.1} ms, peak links {}, \
                 released {:.2} s after exit",
                f.wall_s, f.hook_p50_ms, f.hook_max_ms, f.peak_links, f.release_s
            );
            out.push(f);
        }
    }
    println!(
        "| {CHILDREN} children at {}/s | wall s | probes in place after fork/exec: p50 ms | max ms \
         | links attached | peak links alive | links released after exit s | exact |",
        1000 / GAP_MS
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (lo, hi) = min_max(&untraced);
    let wall = if untraced.len() == 1 {
        format!("{:.2}", untraced[0])
    } else {
        format!("{:.2} ({lo:.2}–{hi:.2})", median(&untraced))
    };
    println!("| untraced | {wall} | — | — | — | — | — | — |");
    for (mode, figures) in modes.iter().zip(&results) {
        let col = |f: fn(&Figures) -> f64| {
            let v: Vec<f64> = figures.iter().map(f).collect();
            let (lo, hi) = min_max(&v);
            let p = if v.iter().all(|x| x.fract() == 0.0) {
                0
            } else {
                2
            };
            if v.len() == 1 {
                format!("{:.p$}", v[0])
            } else {
                format!("{:.p$} ({lo:.p$}–{hi:.p$})", median(&v))
            }
        };
        println!(
            "| leaktrace --attach {mode} | {} | {} | {} | {} | {} | {} | {} |",
            col(|f| f.wall_s),
            col(|f| f.hook_p50_ms),
            col(|f| f.hook_max_ms),
            col(|f| f.links_attached as f64),
            col(|f| f.peak_links as f64),
            col(|f| f.release_s),
            figures.iter().all(|f| f.exact),
        );
    }
    Ok(())
}
