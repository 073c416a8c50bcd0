//! Pod identity without the Kubernetes API, on the real kernel with real containers: a
//! leaking container placed under a kubelet-shaped cgroup parent, next to the log
//! directories a kubelet would have made for it, is named by namespace, pod and container in
//! the agent's JSON, `/metrics`, `/folded` and `/report.json`; a container in no pod gets no
//! pod labels. tests/containers.md says how the pod's container is run and why.
mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{
    Background, Report,
    containers::{self, Container},
    privileged,
};
use serde_json::Value;

/// The pod, as the test's kubelet-shaped log directory names it.
const NAMESPACE: &str = "ledger";
const POD: &str = "reconciler-5c8d7b9f4-qm2zt";
const CONTAINER: &str = "reconciler";
/// A second container of the pod, with a log directory and a link of its own: the pod has
/// two containers, so only the link can say which one the traced process is.
const SIDECAR: &str = "envoy";
/// What `pod_service` leaks a round at `pod_cache_fill`: 12 blocks of 768 B.
const FILL_COUNT: u64 = 12;
const FILL_BYTES: u64 = 12 * 768;

/// A fresh pod uid, as the kubelet makes them (a random UUID).
fn fresh_uid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_owned()
}

/// The pod's cgroups, removed when dropped (after its containers): podman makes
/// `/kubepods/burstable/pod<uid>` (and the `conmon` cgroup in it) on every hierarchy and
/// leaves them behind. Its monitor may still be exiting when the container is gone, so
/// removal is retried for a few seconds. The QoS levels above go too when nothing else is in
/// them.
struct PodCgroups(String);

impl PodCgroups {
    /// Removes what it can; true when the pod's cgroup is gone from every hierarchy.
    fn remove(&self) -> bool {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut gone = true;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            if !right.starts_with("cgroup") {
                continue;
            }
            let Some(mount) = left.split(' ').nth(4) else {
                continue;
            };
            let root = Path::new(mount).join("kubepods");
            let pod = root.join("burstable").join(format!("pod{}", self.0));
            // Innermost first; rmdir only removes empty cgroups.
            if let Ok(entries) = fs::read_dir(&pod) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
            let _ = fs::remove_dir(&pod);
            gone &= !pod.exists();
            for dir in [root.join("burstable"), root] {
                let _ = fs::remove_dir(dir);
            }
        }
        gone
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.remove() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A kubelet-shaped log tree under a fresh directory: `pods/<ns>_<pod>_<uid>/<container>/0.log`
/// and `containers/<pod>_<ns>_<container>-<id>.log` links to them. Removed when dropped.
struct LogTree(PathBuf);

impl LogTree {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("pods")).unwrap();
        fs::create_dir_all(dir.join("containers")).unwrap();
        Self(dir)
    }

    fn pods(&self) -> PathBuf {
        self.0.join("pods")
    }

    /// The container's log directory, and its link when `id` is given.
    fn container(&self, uid: &str, name: &str, id: Option<&str>) {
        let dir = self
            .pods()
            .join(format!("{NAMESPACE}_{POD}_{uid}"))
            .join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("0.log"), "").unwrap();
        if let Some(id) = id {
            std::os::unix::fs::symlink(
                dir.join("0.log"),
                self.0
                    .join(format!("containers/{POD}_{NAMESPACE}_{name}-{id}.log")),
            )
            .unwrap();
        }
    }
}

impl Drop for LogTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A free local port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0: the body of a 200 answer; `None` otherwise.
fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1)? == "200").then(|| body.to_owned())
}

/// Polls `f` every 200 ms for up to 30 s until it returns `Some`.
fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
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

/// The rows at `pod_cache_fill` of the process `pid`.
fn fill_rows(r: &Report, pid: u32) -> Vec<&Value> {
    r.site("pod_cache_fill")
        .into_iter()
        .filter(|l| l["pid"].as_u64() == Some(u64::from(pid)))
        .collect()
}

#[test]
fn the_agent_names_a_pods_namespace_pod_and_container_from_the_node() {
    if !(privileged() && containers::available()) {
        return;
    }
    let uid = fresh_uid();
    let _cgroups = PodCgroups(uid.clone());
    let parent = format!("/kubepods/burstable/pod{uid}");
    let in_pod = Container::run_with(
        "pod-member",
        &["--cgroup-parent", &parent],
        &["pod_service"],
    );
    let alone = Container::run("pod-outsider", &["pod_service"]);
    // The kubelet's view of the pod: two containers, each linked by id.
    let logs = LogTree::new("pod-logs");
    logs.container(&uid, CONTAINER, Some(in_pod.id()));
    logs.container(&uid, SIDECAR, Some("5e".repeat(32).as_str()));
    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", in_pod.host_pid())).unwrap();
    assert!(
        cgroup.contains(&format!("{parent}/libpod-{}", in_pod.id())),
        "podman did not place the container under {parent}:\n{cgroup}"
    );
    in_pod.wait_for_log("ready");
    alone.wait_for_log("ready");

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let out = logs.0.join("report.json");
    let (short, alone_short) = (&in_pod.id()[..12], &alone.id()[..12]);
    let full_pod = format!("container={short}");
    let full_alone = format!("container={alone_short}");
    let mut agent = Background::start(&[
        "agent",
        "--full",
        &full_pod,
        "--full",
        &full_alone,
        "--pod-logs",
        logs.pods().to_str().unwrap(),
        "--listen",
        &listen,
        "--interval",
        "500ms",
        // The default --top: heap rows are the two traced containers' alone, and symbolizing
        // every growth row of a busy node (its compilers') makes a final report slow.
        // Room for bursts of the node's other records: fewer of ours are lost.
        "--ring-buffer",
        "64M",
        "--format",
        "json",
        "-o",
        out.to_str().unwrap(),
        "-v",
    ]);
    // Both promoted, in the order the agent adopts processes (by pid), before they leak.
    let mut pids = [in_pod.host_pid(), alone.host_pid()];
    pids.sort_unstable();
    for pid in pids {
        agent.wait_for(&format!("pid {pid} (pod_service): exact heap tracing on"));
    }
    agent.wait_for("agent: watching");
    in_pod.signal(libc::SIGUSR1);
    alone.signal(libc::SIGUSR1);
    in_pod.wait_for_log("filled 1");
    alone.wait_for_log("filled 1");

    // /metrics: the pod's series by namespace, pod, container name and id; the other
    // container's by its id alone.
    let pod_series = format!(
        "leaktrace_heap_outstanding_bytes{{namespace=\"{NAMESPACE}\",pod=\"{POD}\",\
         container=\"{CONTAINER}\",container_id=\"{short}\",comm=\"pod_service\",kind=\"heap\"}}"
    );
    let alone_series = format!(
        "leaktrace_heap_outstanding_bytes{{container=\"{alone_short}\",comm=\"pod_service\",\
         kind=\"heap\"}}"
    );
    let value = |text: &str, series: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    // A node busy enough to fill the ring buffer (a compiler's page faults) loses heap
    // records too, counted: then the bytes are lower bounds, and only the names are checked.
    let heap_lost = |text: &str| {
        value(
            text,
            "leaktrace_dropped_events_total{reason=\"heap_ringbuf\"}",
        )
        .unwrap_or(0)
    };
    let metrics = eventually(|| {
        let text = get(port, "/metrics")?;
        let (pod, alone) = (value(&text, &pod_series)?, value(&text, &alone_series)?);
        let done = (pod == FILL_BYTES && alone == FILL_BYTES) || heap_lost(&text) > 0;
        done.then_some(text)
    });
    let Some(metrics) = metrics else {
        let last = get(port, "/metrics").unwrap_or_default();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
        let run = agent.finish(Duration::from_secs(120));
        panic!(
            "never {FILL_BYTES} in both {pod_series} and {alone_series}:\n{last}\nagent:\n{}",
            run.stderr
        );
    };
    let exact = heap_lost(&metrics) == 0;
    if !exact {
        eprintln!(
            "heap records were lost ({}): bytes not checked exactly",
            heap_lost(&metrics)
        );
    }
    assert!(
        metrics
            .lines()
            .filter(|l| l.contains(alone_short))
            .all(|l| !l.contains("pod=") && !l.contains("namespace=")),
        "the container in no pod has pod labels:\n{metrics}"
    );

    // /folded and /report.json, filtered by pod, namespace and container name.
    let folded = get(
        port,
        &format!("/folded?kind=heap&namespace={NAMESPACE}&pod={POD}&container={CONTAINER}"),
    )
    .unwrap();
    let lines: Vec<&str> = folded
        .lines()
        .filter(|l| l.contains("pod_cache_fill"))
        .collect();
    assert_eq!(lines.len(), 1, "{folded}");
    if exact {
        assert!(
            lines[0].ends_with(&format!(";pod_cache_fill {FILL_BYTES}")),
            "{folded}"
        );
    }
    let json: Value = serde_json::from_str(
        &get(
            port,
            &format!("/report.json?pod={POD}&namespace={NAMESPACE}"),
        )
        .unwrap(),
    )
    .unwrap();
    let leaks = json["leaks"].as_array().unwrap();
    assert!(
        !leaks.is_empty()
            && leaks
                .iter()
                .all(|l| l["pod"] == POD && l["container_id"] != alone.id()),
        "{json:#}"
    );
    assert_eq!(
        get(
            port,
            &format!("/folded?kind=heap&pod={POD}&container={SIDECAR}")
        )
        .as_deref(),
        Some(""),
        "the sidecar holds nothing"
    );

    // The final JSON report: every field, exact bytes at the known site.
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let run = agent.finish(Duration::from_secs(120));
    assert!(run.status.success(), "{}", run.stderr);
    let r = Report(serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap());
    let exact = exact
        && r.0["summary"]["lost_by_cause"]["heap_ringbuf"]
            .as_u64()
            .unwrap_or(0)
            == 0;
    let rows = fill_rows(&r, in_pod.host_pid());
    assert_eq!(rows.len(), 1, "{}", r.pretty());
    let row = rows[0];
    if exact {
        assert_eq!(
            (
                row["outstanding_count"].as_u64(),
                row["outstanding_bytes"].as_u64()
            ),
            (Some(FILL_COUNT), Some(FILL_BYTES)),
            "{}",
            r.pretty()
        );
    }
    for (key, want) in [
        ("namespace", NAMESPACE),
        ("pod", POD),
        ("pod_uid", uid.as_str()),
        ("container_name", CONTAINER),
        ("container_id", in_pod.id()),
        ("container_runtime", "podman"),
        ("exe", "/fixtures/pod_service"),
    ] {
        assert_eq!(row[key], want, "{key}: {}", r.pretty());
    }
    let rows = fill_rows(&r, alone.host_pid());
    assert_eq!(rows.len(), 1, "{}", r.pretty());
    let row = rows[0];
    if exact {
        assert_eq!(row["outstanding_bytes"].as_u64(), Some(FILL_BYTES));
    }
    assert_eq!(row["container_id"], alone.id());
    for key in ["namespace", "pod", "pod_uid", "container_name"] {
        assert!(row.get(key).is_none(), "{key} outside a pod: {row:#}");
    }
    assert!(
        !run.stderr.contains("--pod-logs"),
        "a readable --pod-logs is no warning: {}",
        run.stderr
    );
}

/// A `--pod-logs` that does not exist is one line of warning, and tracing goes on.
#[test]
fn a_missing_pod_log_directory_is_a_warning_not_an_error() {
    if !privileged() {
        return;
    }
    let missing = "/nonexistent/leaktrace-test/pods";
    let run = common::run(&[
        "run",
        "--pod-logs",
        missing,
        "--format",
        "json",
        "--",
        "/bin/true",
    ]);
    assert!(run.status.success(), "{}", run.stderr);
    let warnings: Vec<&str> = run.stderr.lines().filter(|l| l.contains(missing)).collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    assert!(warnings[0].contains("WARN"), "{}", run.stderr);
    assert_eq!(run.report().summary("lost_events"), 0);
}
