//! What the node agent serves, checked by the tools that read it: `promtool check metrics`
//! on `/metrics`, `go tool pprof` on `/debug/pprof/heap`. Both tools come from
//! `cargo xtask setup` (Debian's `prometheus` and `golang-go`); without them these tests fail,
//! they do not skip.
use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use leaktrace::{
    export::{
        Exporter as _,
        metrics::{AgentStats, Metrics},
        pprof::Pprof,
    },
    report::{
        Frame, Leak, Owner, Report, Summary,
        verdict::{Sample, judge},
    },
};

fn frame(addr: u64, symbol: Option<&str>, module: &str, line: u32, inlined: bool) -> Frame {
    Frame {
        addr,
        symbol: symbol.map(str::to_owned),
        module: Some(module.to_owned()),
        file: Some("cache.c".to_owned()),
        line: Some(line),
        path: Some("/src/cache.c".to_owned()),
        offset: Some(addr & 0xffff),
        inlined,
    }
}

fn leak(comm: &str, container: Option<&str>, bytes: u64, frames: Vec<Frame>) -> Leak {
    Leak {
        kind: "heap",
        pid: 4242,
        processes: 1,
        pids: vec![4242],
        owner: Owner {
            container_id: container.map(str::to_owned),
            ..Owner::named(comm)
        },
        outstanding_count: bytes / 64,
        outstanding_bytes: bytes,
        allocs: bytes / 64 + 5,
        frees: 5,
        oldest_age_s: 30.0,
        at_exit: false,
        growth_bytes_per_s: Some(1024.0),
        held: None,
        // Growing 1 KiB/s over 8 reports 10 s apart: a leak (a verdict series in /metrics).
        trend: Some(judge(
            &(0..8u64)
                .map(|i| Sample {
                    t_s: 10.0 * i as f64,
                    value: bytes - (7 - i) * 10_240,
                    oldest_s: 10.0 * i as f64 + 30.0,
                })
                .collect::<Vec<_>>(),
            None,
            "bytes",
        )),
        truncated: false,
        site: 0,
        frames,
    }
}

/// A service whose cache leaks 48 MiB through an inlined helper, and a little noise.
fn report() -> Report {
    const APP: &str = "/srv/app/bin/cache-server";
    let main = frame(0x5555_0000_1300, Some("main"), APP, 88, false);
    Report {
        summary: Summary {
            outstanding_bytes: 49 << 20,
            elapsed_s: 60.0,
            mode: "full",
            lost_by_cause: [("ringbuf_full", 3)].into(),
            ..Summary::default()
        },
        leaks: vec![
            leak(
                "cache-server",
                Some("0123456789abcdef0123456789abcdef"),
                48 << 20,
                vec![
                    frame(0x5555_0000_1234, Some("cache_entry_new"), APP, 17, true),
                    frame(0x5555_0000_1234, Some("leaky_cache_insert"), APP, 40, false),
                    main.clone(),
                ],
            ),
            leak(
                "cache-server",
                None,
                1 << 20,
                vec![
                    frame(0x7f00_0000_4321, None, "/usr/lib/libplugin.so", 1, false),
                    main,
                ],
            ),
        ],
        runtime: vec![],
        fd_leaks: vec![],
        fd_exhaustion: vec![],
        tmp_leaks: vec![],
        oom_kills: vec![],
        growth: vec![],
        tier2: vec![],
        notices: vec![],
        build_ids: Default::default(),
        is_final: false,
    }
}

/// A scratch directory under target/, also the tools' HOME (root in CI has no usable one).
fn scratch() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serving");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(name).is_file()));
    assert!(
        found,
        "`{name}` is not installed: run `cargo xtask setup` (it installs Debian's prometheus \
         and golang-go packages)"
    );
    Command::new(name)
}

#[test]
fn promtool_accepts_the_metrics() {
    let metrics = Metrics {
        stats: AgentStats {
            tracked_processes: Some(2),
            tier2_processes: Some(1),
            promotions: Some(1),
            heap_blocks: Some(3),
            growth_pages: Some(4),
            stacks: Some(5),
        },
        ..Metrics::default()
    };
    let text = metrics.export(&report());
    assert!(
        String::from_utf8_lossy(&text).contains("leaktrace_leak_verdict_stacks{"),
        "the verdicts are among the metrics checked"
    );
    let mut child = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n--- the metrics:\n{}",
        String::from_utf8_lossy(&text)
    );
}

#[test]
fn go_tool_pprof_names_the_leaking_function() {
    let dir = scratch();
    let profile = dir.join("heap.pb.gz");
    std::fs::write(&profile, Pprof::default().export(&report())).unwrap();
    let out = tool("go")
        .args(["tool", "pprof", "-top", "-sample_index=inuse_space"])
        .arg(&profile)
        .env("HOME", &dir)
        .env("GOCACHE", dir.join("go-cache"))
        .env("GOPATH", dir.join("go"))
        .env("PPROF_TMPDIR", dir.join("pprof"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "go tool pprof failed: {stderr}");
    // `-top` lists flat (leaf) costs: the inlined helper holds the 48 MiB, and its caller
    // is the same location's next line.
    let line = stdout
        .lines()
        .find(|l| l.contains("cache_entry_new"))
        .unwrap_or_else(|| panic!("no cache_entry_new in:\n{stdout}\n{stderr}"));
    assert!(line.contains("48MB"), "{line}");
    let cum = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-cum",
            "-sample_index=inuse_objects",
        ])
        .arg(&profile)
        .env("HOME", &dir)
        .env("GOCACHE", dir.join("go-cache"))
        .env("GOPATH", dir.join("go"))
        .env("PPROF_TMPDIR", dir.join("pprof"))
        .output()
        .unwrap();
    let cum = String::from_utf8_lossy(&cum.stdout);
    let line = cum
        .lines()
        .find(|l| l.contains("leaky_cache_insert"))
        .unwrap_or_else(|| panic!("no leaky_cache_insert in:\n{cum}"));
    assert!(line.contains("786432"), "48 MiB / 64 objects: {line}");
}
