//! How probes are attached (uprobe_multi links or perf-event uprobes), on the real kernel:
//! scoped to the traced process, exact either way, and all gone after a run.
mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{c_fixture, privileged, trace_json};

/// The tests here count links and probe hits: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `churn_stdin` process, started and ready.
struct Churner {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Churner {
    fn start(calls: u64) -> Self {
        let mut child = Command::new(c_fixture("churn_stdin"))
            .arg(calls.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// One round of malloc/free pairs, waited for.
    fn churn(&mut self) {
        self.stdin.write_all(b"go\n").unwrap();
        assert_eq!(self.lines.next().unwrap().unwrap(), "done");
    }

    fn end(self) {
        let Self {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        child.wait().unwrap();
    }
}

/// `--pid A` while B, the same executable mapping the same libc, churns 200,000 pairs: the
/// kernel must install the breakpoints in A only. Without the process filter on the link
/// (or the perf event), every call of B would run the entry program and count a hit.
#[test]
fn only_the_traced_process_runs_the_allocator_programs() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    for attach in ["multi", "perf"] {
        let mut traced = Churner::start(1000);
        let mut other = Churner::start(100_000);
        let pid = traced.child.id().to_string();
        let mut tracer = common::Background::start(&[
            "--pid", &pid, "--format", "json", "-v", "--attach", attach,
        ]);
        tracer.wait_for("tracing pid");
        other.churn();
        other.churn();
        traced.churn();
        traced.end();
        let run = tracer.finish(Duration::from_secs(30));
        other.end();
        assert!(run.status.success(), "{}", run.stderr);
        let r = run.report();
        let probes = &r.0["summary"]["probes"];
        assert_eq!(probes["attach"], attach, "{}", r.pretty());
        let hits = probes["hits"].as_u64().unwrap();
        // The traced process: 1,000 mallocs and 1,000 frees, and a few calls of its own
        // (stdio). The other: 400,000 calls.
        assert!(
            (2000..3000).contains(&hits),
            "{attach}: {hits} entry program runs: {}",
            r.pretty()
        );
        assert!(r.summary("allocs") >= 1000, "{}", r.pretty());
        r.assert_balanced();
    }
}

/// The uprobe_multi links of the whole system.
fn multi_links() -> usize {
    leaktrace::source::link_census().unwrap().0.len()
}

/// 40 children forked and exec'd as fast as the parent can, each leaking 3 blocks: exact
/// totals, a set of links per child, and once leaktrace is gone, none of its links left.
#[test]
fn short_lived_children_are_counted_exactly_and_their_links_released() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let before = multi_links();
    let prog = c_fixture("fork_storm");
    let (run, r) = trace_json(&prog, &["--follow-forks", "--by-pid"], &["40", "0"]);
    assert!(run.status.success(), "{}", run.stderr);
    let rows = r.site("child_leak");
    assert_eq!(rows.len(), 40, "one row per child: {}", r.pretty());
    r.assert_site("child_leak", 120, 12_000);
    assert_eq!(r.summary("outstanding_count"), 120, "{}", r.pretty());
    assert_eq!(r.summary("lost_events"), 0);
    assert_eq!(r.summary("unmatched_frees"), 0);
    r.assert_balanced();
    let probes = &r.0["summary"]["probes"];
    assert_eq!(probes["attach"], "multi", "{}", r.pretty());
    // An allocator entry and return link per process (the parent and 40 children), and
    // the loader's.
    assert!(
        probes["links_attached"].as_u64().unwrap() >= 2 * 41,
        "{}",
        r.pretty()
    );
    // leaktrace has exited; its last links go with the process that holds them for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = multi_links();
        if now <= before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{now} uprobe_multi links left, {before} before the run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `limit` for the system's uprobe_multi links to be back to `before`; returns
/// how long it took.
fn links_back_to(before: usize, limit: Duration) -> Duration {
    let began = Instant::now();
    loop {
        let now = multi_links();
        if now <= before {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < limit,
            "{now} uprobe_multi links left {limit:?} later, {before} before"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent's links go with it: within 2 s of SIGTERM, and when it is SIGKILLed too (a
/// link is a descriptor; nothing is pinned).
#[test]
fn the_agents_links_are_gone_after_sigterm_and_after_sigkill() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let target = Command::new(c_fixture("heap_attach"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let selector = format!("pid={}", target.id());
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let before = multi_links();
        let mut agent = common::Background::start(&[
            "agent",
            "--full",
            &selector,
            "--no-listen",
            "-o",
            "/dev/null",
            "-v",
        ]);
        agent.wait_for("exact heap tracing on");
        assert!(
            multi_links() > before,
            "the agent attached no uprobe_multi link"
        );
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(agent.pid() as i32, signal) };
        let took = links_back_to(before, Duration::from_secs(10));
        let _ = agent.finish(Duration::from_secs(30));
        eprintln!("signal {signal}: links gone {took:?} after it");
        if signal == libc::SIGTERM {
            assert!(
                took < Duration::from_secs(2),
                "SIGTERM: links gone only after {took:?}"
            );
        }
    }
    drop(target);
}
