//! Processes in real containers (podman, on this machine's kernel), traced from the host by
//! their host pid: their modules are read through `/proc/PID/root`, and their rows name the
//! container they run in. tests/containers.md says how the containers are run.
mod common;

use std::{path::PathBuf, time::Duration};

use common::{
    Background, Report,
    containers::{self, Container},
    privileged,
};
use leaktrace::targets::{
    cgroup::{self, Runtime},
    seccomp::{KernelRelease, SeccompState},
};
use serde_json::Value;

/// Both a root and a working podman are needed.
fn ready() -> bool {
    privileged() && containers::available()
}

/// The container `/proc/<host pid>/cgroup` names, by the library's own parsing, must be the
/// one podman started: on every hierarchy (v1 controllers and the unified one alike).
#[track_caller]
fn assert_cgroup_names(ctr: &Container) {
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", ctr.host_pid())).unwrap();
    let lines = cgroup::parse(&text);
    assert!(!lines.is_empty(), "{text}");
    for line in &lines {
        assert_eq!(
            cgroup::container(&line.path),
            Some((ctr.id().to_owned(), Runtime::Podman)),
            "{text}"
        );
    }
    let (memory, _) = cgroup::memory_cgroup(&lines).expect("a memory cgroup");
    assert_eq!(
        cgroup::container_id(memory).as_deref(),
        Some(ctr.id()),
        "{text}"
    );
    assert_eq!(Runtime::Podman.name(), "podman");
}

/// Traces the container's process for 3 s from the host; one round of its leaks is made in
/// that time, once the probes are in place.
fn trace_one_round(ctr: &Container) -> Report {
    ctr.wait_for_log("ready");
    let pid = ctr.host_pid().to_string();
    let mut tracer =
        Background::start(&["--pid", &pid, "--duration", "3s", "--format", "json", "-v"]);
    tracer.wait_for("tracing pid");
    ctr.signal(libc::SIGUSR1);
    ctr.wait_for_log("leaked 1");
    let run = tracer.finish(Duration::from_secs(30));
    assert!(run.status.success(), "{}", run.stderr);
    run.report()
}

/// A row names who holds it: the process's executable as the container sees it, its memory
/// cgroup, and the container podman started.
#[track_caller]
fn assert_owner(row: &Value, ctr: &Container, r: &Report) {
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", ctr.host_pid())).unwrap();
    let lines = cgroup::parse(&text);
    let (memory, _) = cgroup::memory_cgroup(&lines).unwrap();
    assert_eq!(row["container_id"], ctr.id(), "{}", r.pretty());
    assert_eq!(row["cgroup"], memory, "{}", r.pretty());
    assert_eq!(row["exe"], "/fixtures/ctr_service", "{}", r.pretty());
    assert_eq!(row["container_runtime"], "podman", "{}", r.pretty());
    assert_eq!(row["pid"].as_u64(), Some(u64::from(ctr.host_pid())));
}

#[test]
fn heap_leaks_in_a_container_are_counted_exactly_from_the_host() {
    if !ready() {
        return;
    }
    let ctr = Container::run("heap", &["ctr_service", "heap"]);
    assert_cgroup_names(&ctr);
    let r = trace_one_round(&ctr);
    // Symbols come from /fixtures/ctr_service inside the container's root: the host has
    // no such file.
    r.assert_site("ctr_heap_leak", 16, 16 * 256);
    r.assert_absent("ctr_heap_churn");
    assert_eq!(r.summary("lost_events"), 0, "{}", r.pretty());
    assert_owner(r.site("ctr_heap_leak")[0], &ctr, &r);
}

#[test]
fn descriptor_leaks_in_a_container_are_counted_exactly_from_the_host() {
    if !ready() {
        return;
    }
    let ctr = Container::run("fd", &["ctr_service", "fd"]);
    assert_cgroup_names(&ctr);
    let r = trace_one_round(&ctr);
    r.assert_fds("ctr_fd_leak", 5, "file");
    r.assert_fds("ctr_pipe_leak", 4, "pipe");
    r.assert_no_fds("ctr_fd_churn");
    assert_eq!(r.summary("fds_outstanding"), 9, "{}", r.pretty());
    assert_owner(r.entries("fd_leaks", "ctr_fd_leak")[0], &ctr, &r);
}

/// A process under podman's default seccomp profile, traced exactly (allocator uprobes and
/// the return probes: on kernels from 6.11 on, a uretprobe returns through the `uretprobe`
/// system call, which that profile does not list), runs to completion and prints what it
/// prints untraced, to the byte; its leak is counted exactly, so the return probes did fire.
#[test]
fn a_traced_container_under_the_default_seccomp_profile_runs_to_completion_unchanged() {
    if !ready() {
        return;
    }
    let untraced = Container::run("digest-untraced", &["ctr_service", "digest"]);
    untraced.wait_for_log("ready");
    untraced.signal(libc::SIGUSR1);
    assert_eq!(untraced.wait_exit(), 0, "{}", untraced.logs());
    let want = untraced.logs();
    assert!(
        want.contains("\ndigest ") && want.contains(" errors 0"),
        "{want}"
    );
    drop(untraced);

    let ctr = Container::run("digest-traced", &["ctr_service", "digest"]);
    ctr.wait_for_log("ready");
    let status = std::fs::read_to_string(format!("/proc/{}/status", ctr.host_pid())).unwrap();
    let seccomp = SeccompState::from_status(&status);
    assert_eq!(seccomp.mode, 2, "not under a seccomp filter:\n{status}");
    assert!(seccomp.filtered(), "{status}");
    let pid = ctr.host_pid().to_string();
    let mut tracer = Background::start(&["--pid", &pid, "--format", "json", "-v"]);
    tracer.wait_for("tracing pid");
    ctr.signal(libc::SIGUSR1);
    let code = ctr.wait_exit();
    let run = tracer.finish(Duration::from_secs(30));
    assert_eq!(
        code,
        0,
        "the traced container died: {}\n{}",
        ctr.logs(),
        run.stderr
    );
    assert_eq!(ctr.logs(), want, "traced output differs");
    assert!(run.status.success(), "{}", run.stderr);
    let r = run.report();
    r.assert_site("ctr_heap_leak", 16, 16 * 256);
    assert_eq!(r.summary("lost_events"), 0, "{}", r.pretty());
    // Every call of the work was seen, each return included: 5000 each of malloc, calloc
    // and realloc and the 16 leaked blocks; 15000 frees (a realloc's old block is not one).
    assert_eq!(r.summary("allocs"), 15_016, "{}", r.pretty());
    assert_eq!(r.summary("frees"), 15_000, "{}", r.pretty());
    // The warning comes exactly where the kernel makes the return probe a risk.
    let at_risk = KernelRelease::running().is_some_and(|k| k.uretprobe_syscall_filtered());
    assert_eq!(
        run.stderr
            .contains("exact heap tracing may kill this process"),
        at_risk,
        "{}",
        run.stderr
    );
}

#[test]
fn a_container_is_removed_when_its_helper_is_dropped() {
    if !ready() {
        return;
    }
    let ctr = Container::run("drop", &["ctr_service", "heap"]);
    let id = ctr.id().to_owned();
    assert_eq!(id.len(), 64, "{id}");
    assert_eq!(ctr.inspect("{{.State.Running}}"), "true");
    drop(ctr);
    let left = containers::podman()
        .args(["ps", "--all", "--quiet", "--no-trunc"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&id),
        "container {id} outlived its helper"
    );
}

/// The agent's view: one container selected by id prefix for exact heap tracing, the other
/// left in the first tier; each leak is named with the container podman started.
#[test]
fn the_agent_names_each_containers_leak_with_its_container_id() {
    if !ready() {
        return;
    }
    let heap = Container::run("agent-heap", &["ctr_service", "heap"]);
    let fd = Container::run("agent-fd", &["ctr_service", "fd"]);
    heap.wait_for_log("ready");
    fd.wait_for_log("ready");
    let dir = std::env::temp_dir().join(format!("leaktrace-agent-ctr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report.json");
    let selector = format!("container={}", &heap.id()[..12]);
    let mut agent = Background::start(&[
        "agent",
        "--full",
        &selector,
        "--no-listen",
        // Every row: on a busy node the top ones can all be a compiler's.
        "--top",
        "100000",
        "--format",
        "json",
        "-o",
        out.to_str().unwrap(),
        "-v",
    ]);
    agent.wait_for(&format!(
        "pid {} (ctr_service): exact heap tracing on: selected by {selector}",
        heap.host_pid()
    ));
    agent.wait_for("agent: watching");
    heap.signal(libc::SIGUSR1);
    fd.signal(libc::SIGUSR1);
    heap.wait_for_log("leaked 1");
    fd.wait_for_log("leaked 1");
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let run = agent.finish(Duration::from_secs(30));
    assert!(run.status.success(), "{}", run.stderr);
    let r = Report(serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap());
    // Exact, unless a flood of the first tier's records on a busy node filled the ring
    // buffer the second tier shares with it: then the report says so, and what it kept
    // cannot exceed the truth.
    let lost_heap = r.0["summary"]["lost_by_cause"]["heap_ringbuf"]
        .as_u64()
        .unwrap_or(0);
    if lost_heap == 0 {
        r.assert_site("ctr_heap_leak", 16, 16 * 256);
        r.assert_absent("ctr_heap_churn");
        assert_owner(r.site("ctr_heap_leak")[0], &heap, &r);
    } else {
        assert!(r.at("ctr_heap_leak").0 <= 16, "{}", r.pretty());
        eprintln!("{lost_heap} heap records lost to a busy node");
    }
    let lost = r.0["summary"]["lost_by_cause"]["fd_ringbuf"]
        .as_u64()
        .unwrap_or(0);
    let rows = r.entries("fd_leaks", "ctr_fd_leak");
    let mine: Vec<&Value> = r.0["fd_leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["pid"].as_u64() == Some(u64::from(fd.host_pid())))
        .collect();
    eprintln!(
        "lost {}; rows of pid {}: {}",
        r.0["summary"]["lost_by_cause"],
        fd.host_pid(),
        serde_json::to_string_pretty(&mine).unwrap()
    );
    if lost == 0 {
        r.assert_fds("ctr_fd_leak", 5, "file");
        r.assert_no_fds("ctr_fd_churn");
        assert_owner(rows[0], &fd, &r);
    } else if let Some(row) = rows.first() {
        assert_owner(row, &fd, &r);
    }
    // Only the selected container's heap was traced.
    assert!(
        r.leaks()
            .iter()
            .all(|l| l["container_id"].as_str() != Some(fd.id())),
        "{}",
        r.pretty()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A free local port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0: (status, body); `None` when nothing answers.
fn try_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let split = all.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, all[split + 4..].to_vec()))
}

fn get(port: u16, path: &str) -> (u16, Vec<u8>) {
    try_get(port, path).unwrap_or_else(|| panic!("nothing answers on port {port}"))
}

/// Polls `f` every 200 ms for up to `limit` until it returns `Some`.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A tool with HOME and caches under target/ (root in CI has no usable HOME).
fn tool(name: &str, dir: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(name);
    c.env("HOME", dir)
        .env("GOCACHE", dir.join("go-cache"))
        .env("GOPATH", dir.join("go"))
        .env("PPROF_TMPDIR", dir.join("pprof"));
    c
}

/// The running agent, read by the tools that will read it in production: a real
/// Prometheus scraping `/metrics` sees the container's outstanding heap grow, promtool
/// accepts the exposition, and `go tool pprof` names the leaking function in
/// `/debug/pprof/heap`.
#[test]
fn prometheus_promtool_and_pprof_read_the_running_agent() {
    if !ready() {
        return;
    }
    let ctr = Container::run("serve-heap", &["ctr_service", "heap"]);
    ctr.wait_for_log("ready");
    let short = &ctr.id()[..12];
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = Background::start(&[
        "agent",
        "--full",
        &format!("container={short}"),
        "--listen",
        &listen,
        "--interval",
        "500ms",
        "-v",
    ]);
    agent.wait_for("agent: serving on");
    agent.wait_for("agent: watching");
    assert_eq!(get(port, "/healthz"), (200, b"ok".to_vec()));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agent-serving");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A real Prometheus, scraping the agent every second.
    let prom_port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: leaktrace\n    static_configs:\n      - targets: ['{listen}']\n"
        ),
    )
    .unwrap();
    let mut prometheus = tool("prometheus", &dir)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let query = format!("leaktrace_heap_outstanding_bytes{{container=\"{short}\"}}");
    let value = |min: f64| -> Option<f64> {
        let (status, body) = try_get(
            prom_port,
            &format!(
                "/api/v1/query?query={}",
                query
                    .replace('{', "%7B")
                    .replace('}', "%7D")
                    .replace('"', "%22")
                    .replace('=', "%3D")
            ),
        )?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&body).ok()?;
        let sum: f64 = v["data"]["result"]
            .as_array()?
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .sum();
        (sum >= min).then_some(sum)
    };
    ctr.signal(libc::SIGUSR1);
    ctr.wait_for_log("leaked 1");
    let first = eventually(Duration::from_secs(30), || value(4096.0));
    ctr.signal(libc::SIGUSR1);
    ctr.wait_for_log("leaked 2");
    let second = eventually(Duration::from_secs(30), || value(8192.0));
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert_eq!(first, Some(4096.0), "Prometheus never saw the first 4 KiB");
    assert_eq!(second, Some(8192.0), "Prometheus never saw the heap grow");
    // promtool accepts what the agent exposes.
    let (status, metrics) = get(port, "/metrics");
    assert_eq!(status, 200);
    let mut check = tool("promtool", &dir)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        check.stdin.take().unwrap().write_all(&metrics).unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // go tool pprof names the leaking function, in the container's own binary.
    let (status, profile) = get(port, &format!("/debug/pprof/heap?container={short}"));
    assert_eq!(status, 200);
    let path = dir.join("heap.pb.gz");
    std::fs::write(&path, profile).unwrap();
    let out = tool("go", &dir)
        .args(["tool", "pprof", "-top", "-sample_index=inuse_space"])
        .arg(&path)
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = top
        .lines()
        .find(|l| l.contains("ctr_heap_leak"))
        .unwrap_or_else(|| panic!("no ctr_heap_leak in:\n{top}"));
    assert!(line.contains("8kB"), "{line}\n{top}");
    // Its mapping names the binary by build id, as the report does.
    let (status, json) = get(port, &format!("/report.json?container={short}"));
    assert_eq!(status, 200);
    let report: Value = serde_json::from_slice(&json).unwrap();
    let id = report["build_ids"]["/fixtures/ctr_service"]
        .as_str()
        .unwrap_or_else(|| panic!("no build id for the fixture: {}", report["build_ids"]));
    assert_eq!(id.len(), 40, "{id}");
    let raw = tool("go", &dir)
        .args(["tool", "pprof", "-raw"])
        .arg(&path)
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&raw.stdout);
    assert!(
        raw.lines()
            .any(|l| l.contains("/fixtures/ctr_service") && l.contains(id)),
        "no mapping of /fixtures/ctr_service with build id {id}:\n{raw}"
    );
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let run = agent.finish(Duration::from_secs(30));
    assert!(run.status.success(), "{}", run.stderr);
}
