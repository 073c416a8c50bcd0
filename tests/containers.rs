//! Processes in real containers (podman, on this machine's kernel), traced from the host by
//! their host pid: their modules are read through `/proc/PID/root`, and their rows name the
//! container they run in. tests/containers.md says how the containers are run.
mod common;

use std::time::Duration;

use common::{
    Background, Report,
    containers::{self, Container},
    privileged,
};
use leaktrace::targets::cgroup::{self, Runtime};
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
    r.assert_site("ctr_heap_leak", 16, 16 * 256);
    r.assert_absent("ctr_heap_churn");
    assert_owner(r.site("ctr_heap_leak")[0], &heap, &r);
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
    }
    assert_owner(rows[0], &fd, &r);
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
