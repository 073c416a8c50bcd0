//! Descriptors, temp files and OOM kills on the real kernel: fixtures with known leaks,
//! traced by the real binary.
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{Background, c_fixture, c_fixture_with, privileged, run, trace_json};
use serde_json::Value;

/// The sites of `fd_sites.c` and what each must hold at exit.
const FD_SITES: &[(&str, u64, &str)] = &[
    ("load_chunk", 7, "file"),
    ("leak_socket", 3, "socket"),
    ("leak_socketpair", 4, "socket"),
    ("leak_pipe", 8, "pipe"),
    ("open_base", 1, "file"),
    ("leak_dup", 2, "file"),
    ("leak_dup2", 1, "file"),
    ("leak_fcntl_dup", 1, "file"),
    ("leak_fopen", 3, "file"),
    ("leak_misc", 6, "other"),
    ("accept_one", 2, "socket"),
    ("reuse_second", 1, "file"),
];

/// Sites of `fd_sites.c` that close everything they open.
const FD_CLEAN: &[&str] = &[
    "churn",
    "open_elsewhere",
    "close_elsewhere",
    "reuse_first",
    "closed_by_range",
    "leak_accept",
    "main",
];

fn check_fd_sites(prog: &Path) {
    let file = prog.to_str().unwrap();
    let (run, r) = trace_json(prog, &[], &[file]);
    assert!(run.status.success(), "{}", run.stderr);
    for &(site, n, kind) in FD_SITES {
        r.assert_fds(site, n, kind);
    }
    for site in FD_CLEAN {
        r.assert_no_fds(site);
    }
    let total: u64 = FD_SITES.iter().map(|s| s.1).sum();
    assert_eq!(r.summary("fds_outstanding"), total, "{}", r.pretty());
    assert_eq!(r.summary("lost_events"), 0);
    // The caller of the libc wrapper is frames[0]; its caller follows.
    let chunk = r.entries("fd_leaks", "load_chunk")[0];
    assert_eq!(common::frame(chunk, 1)["symbol"], "main", "{}", r.pretty());
    assert_eq!(chunk["paths"], serde_json::json!([file]));
    assert_eq!(chunk["at_exit"], true);
    assert_eq!(chunk["pid"].as_u64(), r.0["leaks"][0]["pid"].as_u64());
    // fopen's FILE is a heap leak at the same caller.
    assert_eq!(r.at("leak_fopen").0, 3, "{}", r.pretty());
}

#[test]
fn descriptor_leaks_are_counted_exactly_per_site() {
    if !privileged() {
        return;
    }
    check_fd_sites(&c_fixture("fd_sites"));
}

#[test]
fn descriptor_sites_without_frame_pointers() {
    if !privileged() {
        return;
    }
    // At the syscall, libc's wrapper has no frame pointer to follow: only .eh_frame gets
    // from the wrapper to its caller.
    let prog = c_fixture_with(
        "fd_sites",
        "-O2-nofp",
        &[
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-fno-ipa-cp",
            "-fno-ipa-sra",
        ],
    );
    check_fd_sites(&prog);
}

#[test]
fn close_on_exec_descriptors_close_at_exec() {
    if !privileged() {
        return;
    }
    let prog = c_fixture("fd_exec");
    let (run, r) = trace_json(&prog, &[], &[prog.to_str().unwrap()]);
    assert!(run.status.success(), "{}", run.stderr);
    r.assert_fds("inherited", 2, "file");
    r.assert_fds("child_open", 1, "file");
    for site in ["open_cloexec", "pipe_cloexec", "marked_later"] {
        r.assert_no_fds(site);
    }
}

#[test]
fn running_out_of_descriptors_names_the_limit_and_the_holders() {
    if !privileged() {
        return;
    }
    let prog = c_fixture("fd_exhaust");
    let (run, r) = trace_json(&prog, &[], &[prog.to_str().unwrap()]);
    assert!(run.status.success(), "{}", run.stderr);
    // The command's stdout goes to stderr under --format json.
    let hoarded: u64 = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("hoarded "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count from the fixture:\n{}", run.stderr));
    assert!(
        run.stderr
            .contains("ran out of descriptors (EMFILE, limit 64"),
        "the notice is printed at once:\n{}",
        run.stderr
    );
    let x = r.entries("fd_exhaustion", "one_more");
    assert_eq!(x.len(), 1, "{}", r.pretty());
    let x = x[0];
    assert_eq!(x["errno"], "EMFILE");
    assert_eq!(x["limit"], 64);
    assert_eq!(x["count"], 1);
    let top = &x["top_holders"][0];
    assert_eq!(top["outstanding"].as_u64(), Some(hoarded), "{x}");
    assert_eq!(top["fd_kind"], "file");
    assert_eq!(top["frames"][0]["symbol"], "hoard");
    // hoard's own last open failed too: a second record, its own stack.
    assert_eq!(r.entries("fd_exhaustion", "hoard").len(), 1);
    r.assert_fds("hoard", hoarded, "file");
}

/// A directory for the fixture's files, outside the temp directories.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn temp_files_never_unlinked_are_reported_per_creating_stack() {
    if !privileged() {
        return;
    }
    let prog = c_fixture("tmp_sites");
    let dir = scratch("tmp_sites");
    let d = dir.to_str().unwrap();
    std::fs::write(dir.join("existing.log"), "kept\n").unwrap();
    // Old enough that its birth is not mistaken for the reopen's.
    std::thread::sleep(Duration::from_millis(100));
    // Stays alive 3 s after creating everything: the interval reports at 1 s and 2 s see the
    // unnamed files. (Other reports come when another test's OOM kill is seen.)
    let (run, last) = trace_json(&prog, &["--interval", "1s"], &[d, "3"]);
    assert!(run.status.success(), "{}", run.stderr);
    let live: Vec<common::Report> = run
        .reports()
        .into_iter()
        .filter(|r| {
            let t = r.0["summary"]["elapsed_s"].as_f64().unwrap();
            r.0["final"] == false && (0.9..2.5).contains(&t)
        })
        .collect();
    assert!(!live.is_empty(), "{}", run.stdout);
    for r in live.iter().chain([&last]) {
        assert_eq!(r.tmp_at("leak_mkstemp"), (5, 500), "{}", r.pretty());
        let paths = &r.entries("tmp_leaks", "leak_mkstemp")[0]["paths"];
        assert!(
            paths
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p.as_str().unwrap().starts_with(&format!("{d}/chunk-"))),
            "{paths}"
        );
        assert_eq!(r.tmp_at("leak_fopen_w"), (2, 20), "{}", r.pretty());
        for site in ["cleaned_up", "renamed_away", "reopen_log"] {
            assert_eq!(r.tmp_at(site), (0, 0), "{site}: {}", r.pretty());
        }
    }
    // Unnamed temp files exist while their descriptor does: in the report while the
    // process lives, gone with it.
    for r in &live {
        assert_eq!(r.tmp_at("leak_tmpfile"), (2, 14), "{}", r.pretty());
    }
    assert_eq!(last.tmp_at("leak_tmpfile"), (0, 0), "{}", last.pretty());
    assert_eq!(last.summary("tmp_files_created"), 5 + 3 + 2 + 2 + 2);
    assert_eq!(last.summary("tmp_files_outstanding"), 5 + 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_narrows_what_is_traced_and_folded_shows_one_kind() {
    if !privileged() {
        return;
    }
    let prog = c_fixture("fd_sites");
    let file = prog.to_str().unwrap();
    let (out, r) = trace_json(&prog, &["--only", "fd"], &[file]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(r.summary("allocs"), 0);
    r.assert_fds("load_chunk", 7, "file");
    let (_, r) = trace_json(&prog, &["--only", "heap"], &[file]);
    assert!(r.0["fd_leaks"].as_array().unwrap().is_empty());
    assert_eq!(r.at("leak_fopen").0, 3);

    let out = run(&[
        "run",
        "--format",
        "folded",
        "--folded-kind",
        "fd",
        "--",
        prog.to_str().unwrap(),
        file,
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    // The whole stack, root first: main, the site, then libc's wrapper.
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(";main;load_chunk;") && l.ends_with(" 7"))
        .unwrap_or_else(|| panic!("no load_chunk line:\n{}", out.stdout));
    assert!(line.ends_with(";__libc_open64 7"), "{line}");
}

/// A memory cgroup limited to `limit` bytes, removed on drop.
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    fn new(name: &str, limit: u64) -> Option<Self> {
        // cgroup v1 (this machine), else v2.
        let (root, file) = if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            ("/sys/fs/cgroup", "memory.max")
        } else {
            return None;
        };
        let dir = Path::new(root).join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::write(dir.join(file), limit.to_string()).ok()?;
        if file == "memory.max" {
            // No swap either, so the limit is what kills.
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        }
        Some(Self { dir })
    }

    fn procs(&self) -> String {
        self.dir.join("cgroup.procs").to_str().unwrap().to_owned()
    }

    fn name(&self) -> String {
        self.dir.file_name().unwrap().to_str().unwrap().to_owned()
    }

    /// The report's OOM kills in this cgroup.
    fn kills<'r>(&self, r: &'r common::Report) -> Vec<&'r Value> {
        let name = self.name();
        r.0["oom_kills"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["cgroup"].as_str().is_some_and(|c| c.ends_with(&name)))
            .collect()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

const OOM_LIMIT: u64 = 48 << 20;

/// One OOM kill at a time: every leaktrace sees every kill on the node, and two victims
/// that die at the same moment, both gone before their cgroups can be read, are told apart
/// only by which cgroup counted which kill.
static OOM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check_oom_record(k: &Value, cgroup: &MemoryCgroup) {
    assert_eq!(k["comm"], "oom_victim", "{k}");
    assert!(
        k["cgroup"].as_str().unwrap().ends_with(&cgroup.name()),
        "{k}"
    );
    assert_eq!(k["limit_bytes"].as_u64(), Some(OOM_LIMIT), "{k}");
    assert!(k["container_id"].is_null());
    let rss = k["rss_bytes"].as_u64().unwrap();
    assert!(
        rss > OOM_LIMIT / 2 && rss <= OOM_LIMIT + (8 << 20),
        "rss {rss} near the limit: {k}"
    );
}

#[test]
fn an_oom_kill_names_the_victim_and_the_leaking_site() {
    if !privileged() {
        return;
    }
    let _one_at_a_time = OOM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cgroup) = MemoryCgroup::new("leaktrace-oom", OOM_LIMIT) else {
        eprintln!("skipped: no memory cgroup controller");
        return;
    };
    let victim = c_fixture("oom_victim");
    let log = scratch("oom-log").join("oom.jsonl");
    let script = format!("echo $$ > {} && exec {}", cgroup.procs(), victim.display());
    let out = run(&[
        "run",
        "--format",
        "json",
        "--oom-log",
        log.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "killed by SIGKILL: {}",
        out.stderr
    );
    assert!(out.stderr.contains("OOM kill"), "{}", out.stderr);
    let r = out.report();
    // Every OOM kill on the node is recorded (other tests' too): find ours.
    let kills = cgroup.kills(&r);
    assert_eq!(kills.len(), 1, "{}", r.pretty());
    let k = kills[0];
    check_oom_record(k, &cgroup);
    assert_eq!(k["traced"], true);
    assert_eq!(k["frames_top"][0]["symbol"], "grow_cache", "{k}");
    let held = k["heap_top"][0]["outstanding_bytes"].as_u64().unwrap();
    assert!(held >= 16 << 20, "{k}");
    assert!(!k["growth"].as_array().unwrap().is_empty(), "{k}");
    // The heap leak itself, as of the victim's death.
    let (blocks, bytes) = r.at("grow_cache");
    assert_eq!(bytes, blocks << 20, "{}", r.pretty());
    // The log has the same record, written at the kill.
    let line = std::fs::read_to_string(&log).unwrap();
    let logged: Vec<Value> = line
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v["pid"] == k["pid"])
        .collect();
    assert_eq!(logged.len(), 1, "{line}");
    let logged = &logged[0];
    assert_eq!(logged["frames_top"][0]["symbol"], "grow_cache");
}

#[test]
fn an_oom_kill_of_a_process_not_traced_is_still_recorded() {
    if !privileged() {
        return;
    }
    let _one_at_a_time = OOM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cgroup) = MemoryCgroup::new("leaktrace-oom-untraced", OOM_LIMIT) else {
        eprintln!("skipped: no memory cgroup controller");
        return;
    };
    // leaktrace traces a bystander; the victim runs on its own.
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = bystander.id().to_string();
    let mut tracer =
        Background::start(&["--pid", &pid, "--format", "json", "--interval", "1h", "-v"]);
    tracer.wait_for("tracing pid");
    let victim = c_fixture("oom_victim");
    let script = format!("echo $$ > {} && exec {}", cgroup.procs(), victim.display());
    let status = Command::new("sh").args(["-c", &script]).status().unwrap();
    assert_eq!(status.code(), None, "the victim dies by a signal");
    tracer.wait_for("OOM kill");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGINT) };
    let out = tracer.finish(Duration::from_secs(30));
    let _ = bystander.kill();
    let _ = bystander.wait();
    let r = out.report();
    let kills = cgroup.kills(&r);
    assert_eq!(kills.len(), 1, "{}", r.pretty());
    check_oom_record(kills[0], &cgroup);
    assert_eq!(kills[0]["traced"], false);
    assert!(kills[0]["frames_top"].as_array().unwrap().is_empty());
}

/// `run` is about its command: an OOM kill elsewhere on the node is neither printed into the
/// command's stderr nor reported, unless `--oom-all` asks for every kill (as `--pid` and the
/// agent always report).
#[test]
fn run_reports_only_its_own_oom_kills_unless_asked_for_all() {
    if !privileged() {
        return;
    }
    let _one_at_a_time = OOM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cgroup) = MemoryCgroup::new("leaktrace-oom-elsewhere", OOM_LIMIT) else {
        eprintln!("skipped: no memory cgroup controller");
        return;
    };
    // Two runs of a command that only waits, one with --oom-all; the victim is neither's.
    let start = |extra: &[&str]| {
        let mut args = vec!["run", "--format", "json"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sleep", "60"]);
        let mut t = Background::start(&args);
        t.wait_for("leaktrace: running sleep");
        t
    };
    let own = start(&[]);
    let mut all = start(&["--oom-all"]);
    let victim = c_fixture("oom_victim");
    let script = format!("echo $$ > {} && exec {}", cgroup.procs(), victim.display());
    let status = Command::new("sh").args(["-c", &script]).status().unwrap();
    assert_eq!(status.code(), None, "the victim dies by a signal");
    all.wait_for("OOM kill at");
    // Both saw the kill's record by now (each drains its ring buffer before the final report).
    for t in [&own, &all] {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(t.pid() as i32, libc::SIGINT) };
    }
    let (own, all) = (
        own.finish(Duration::from_secs(30)),
        all.finish(Duration::from_secs(30)),
    );
    // (The start line names the tracepoint, "OOM kills"; the notice is "OOM kill at ...".)
    assert!(!own.stderr.contains("OOM kill at"), "{}", own.stderr);
    assert!(!own.stderr.contains("oom_victim"), "{}", own.stderr);
    let r = own.report();
    assert!(cgroup.kills(&r).is_empty(), "{}", r.pretty());
    let r = all.report();
    let kills = cgroup.kills(&r);
    assert_eq!(kills.len(), 1, "{}", r.pretty());
    check_oom_record(kills[0], &cgroup);
    assert_eq!(kills[0]["traced"], false);
    assert!(all.stderr.contains("oom_victim"), "{}", all.stderr);
}
