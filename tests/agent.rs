//! The node agent on the real kernel: every process in the first tier, exact heap tracing
//! for the selected ones, a report on SIGTERM.
mod common;

use std::{
    io::{BufRead as _, BufReader, Lines, Write as _},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Background, Report, c_fixture, privileged};
use serde_json::Value;

/// A fixture that says "ready", works on "go", says "done", and exits at end of input.
struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Fixture {
    fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    fn start_with(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(c_fixture(name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn go(&mut self) {
        assert_eq!(self.go_lines(), Vec::<String>::new());
    }

    /// Says "go"; returns what the fixture printed before "done".
    fn go_lines(&mut self) -> Vec<String> {
        self.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let mut said = Vec::new();
        loop {
            let line = self.lines.next().unwrap().unwrap();
            if line == "done" {
                return said;
            }
            said.push(line);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM to the agent and returns its final report and how long it took to stop.
fn stop(agent: Background, out: &std::path::Path) -> (Report, Duration, String) {
    let began = Instant::now();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let run = agent.finish(Duration::from_secs(30));
    let took = began.elapsed();
    assert!(run.status.success(), "{}", run.stderr);
    let text = std::fs::read_to_string(out).unwrap();
    (
        Report(serde_json::from_str(&text).unwrap()),
        took,
        run.stderr,
    )
}

fn rows_of<'a>(r: &'a Report, list: &str, pid: u32) -> Vec<&'a Value> {
    r.0[list]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|l| {
                    l["pid"].as_u64() == Some(u64::from(pid))
                        || l["pids"]
                            .as_array()
                            .is_some_and(|p| p.contains(&Value::from(pid)))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn through(row: &Value, function: &str) -> bool {
    row["frames"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["symbol"].as_str() == Some(function))
}

#[test]
fn the_agent_traces_every_process_and_the_selected_heap_exactly() {
    if !privileged() {
        return;
    }
    let mut selected = Fixture::start("heap_attach");
    // Files it makes outside a temp directory go under /run (root's, and in no temp
    // directory: a checkout, and so target/, may itself lie under /tmp).
    let data =
        std::path::Path::new("/run").join(format!("leaktrace-agent-tiers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let mut other = Fixture::start_with("agent_tier1", &[data.to_str().unwrap()]);
    let dir = tempfile_dir("agent-tiers");
    let out = dir.join("report.json");
    let mut agent = Background::agent(
        &[
            "--full",
            "comm=heap_attach",
            "--full",
            "comm=no-such-command",
            "--no-listen",
        ],
        &out,
    );
    agent.wait_for("no-such-command matches no process yet");
    selected.go();
    let said = other.go_lines();
    let tmp_path = said[0].clone();
    // Let the drain tick take the last records.
    std::thread::sleep(Duration::from_millis(500));
    let (r, took, stderr) = stop(agent, &out);
    let _ = std::fs::remove_file(&tmp_path);
    let _ = std::fs::remove_dir_all(&data);
    assert!(r.0["final"].as_bool().unwrap());
    assert!(
        stderr.contains(&format!(
            "pid {} (heap_attach): exact heap tracing on: selected by comm=heap_attach",
            selected.pid()
        )),
        "{stderr}"
    );
    // Tier 2: the selected process's heap, exactly, as with --pid (unless a flood of the
    // first tier's records on a busy node filled the ring buffer: then it says so).
    let lost_heap = r.0["summary"]["lost_by_cause"]["heap_ringbuf"]
        .as_u64()
        .unwrap_or(0);
    if lost_heap == 0 {
        r.assert_site("attach_leak", 12, 12 * 128);
    } else {
        assert!(r.at("attach_leak").0 <= 12, "{}", r.pretty());
    }
    r.assert_absent("attach_churn");
    let tier2 = r.0["tier2"].as_array().unwrap();
    assert_eq!(tier2.len(), 1, "{}", r.pretty());
    assert_eq!(tier2[0]["pid"].as_u64(), Some(u64::from(selected.pid())));
    assert_eq!(tier2[0]["reason"], "selected by comm=heap_attach");
    assert!(tier2[0]["exe"].as_str().unwrap().ends_with("/heap_attach"));
    // The unselected process never had its heap traced.
    assert!(
        rows_of(&r, "leaks", other.pid()).is_empty(),
        "{}",
        r.pretty()
    );
    // Tier 1, for the process nobody selected: its pages and descriptors, by stack.
    let pages: u64 = rows_of(&r, "growth", other.pid())
        .iter()
        .filter(|l| through(l, "keep_pages"))
        .map(|l| l["outstanding_bytes"].as_u64().unwrap())
        .sum();
    let lost = &r.0["summary"]["lost_by_cause"];
    let lost_growth =
        lost["growth_ringbuf"].as_u64().unwrap_or(0) + lost["stack_ringbuf"].as_u64().unwrap_or(0);
    // Node-wide, a busy neighbour (a compiler) can fill the ring buffer: then the report
    // says how many records were lost, and what it kept cannot exceed the truth.
    if lost_growth == 0 {
        assert_eq!(pages, (16 * 65 + 1) * 4096, "{}", r.pretty());
    } else {
        assert!(
            pages <= (16 * 65 + 1) * 4096,
            "lost: {lost}\n{}",
            r.pretty()
        );
        eprintln!("{lost_growth} growth/stack records lost to a busy node: {pages} bytes seen");
    }
    let fds: Vec<&Value> = rows_of(&r, "fd_leaks", other.pid());
    let kept: u64 = fds
        .iter()
        .filter(|l| through(l, "keep_fds"))
        .map(|l| l["outstanding"].as_u64().unwrap())
        .sum();
    if lost["fd_ringbuf"].as_u64().unwrap_or(0) == 0 && lost_growth == 0 {
        assert_eq!(kept, 5, "{}", r.pretty());
    } else {
        assert!(kept <= 5, "lost: {lost}\n{}", r.pretty());
    }
    assert!(
        !fds.iter().any(|l| through(l, "churn_fds")),
        "{}",
        r.pretty()
    );
    // Node-wide, a temp file is one in a temp directory: mkstemp's in /tmp is, the
    // O_CREAT|O_EXCL file under /run is not (on a node, that is every file made).
    let tmp = rows_of(&r, "tmp_leaks", other.pid());
    if lost["fd_ringbuf"].as_u64().unwrap_or(0) == 0 {
        assert_eq!(tmp.len(), 1, "{}", r.pretty());
        assert!(through(tmp[0], "keep_tmp"), "{}", r.pretty());
        assert_eq!(tmp[0]["paths"], serde_json::json!([tmp_path]));
        assert_eq!(
            (tmp[0]["files"].as_u64(), tmp[0]["bytes"].as_u64()),
            (Some(1), Some(3000))
        );
    }
    // Rows carry who holds them.
    let row = fds.iter().find(|l| through(l, "keep_fds")).unwrap();
    assert_eq!(row["comm"], "agent_tier1");
    assert!(row["exe"].as_str().unwrap().ends_with("/agent_tier1"));
    assert!(row["cgroup"].as_str().is_some());
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
}

#[test]
fn full_tables_keep_their_caps_and_count_what_they_turned_away() {
    if !privileged() {
        return;
    }
    let mut selected = Fixture::start("heap_attach");
    let mut other = Fixture::start("agent_tier1");
    let dir = tempfile_dir("agent-caps");
    let out = dir.join("report.json");
    let mut agent = Background::agent(
        &[
            "--full",
            &format!("pid={}", selected.pid()),
            "--max-heap-blocks",
            "5",
            "--max-growth-pages",
            "64",
            "--no-listen",
        ],
        &out,
    );
    agent.wait_for("agent: watching");
    selected.go();
    other.go();
    std::thread::sleep(Duration::from_millis(500));
    let (r, _, _) = stop(agent, &out);
    let lost = &r.0["summary"]["lost_by_cause"];
    let n = |cause: &str| lost[cause].as_u64().unwrap_or(0);
    eprintln!("lost: {lost}");
    // Five blocks kept: the first five of attach_leak's twelve. The other seven and all 300
    // of attach_churn's found the table full, counted, and their frees are unmatched.
    if n("heap_ringbuf") == 0 {
        r.assert_site("attach_leak", 5, 5 * 128);
        assert_eq!(n("heap_table_full"), 7 + 300, "{}", r.pretty());
    } else {
        assert!(r.at("attach_leak").0 <= 5, "{}", r.pretty());
    }
    r.assert_absent("attach_churn");
    // Node-wide pages (a huge page, or a fault that made several resident, counts once):
    // never more than the cap, and agent_tier1's 1,041 cannot all fit.
    let kept: u64 = r.0["growth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["outstanding_count"].as_u64().unwrap())
        .sum();
    assert!(kept <= 64, "{kept} kept\n{}", r.pretty());
    if n("growth_ringbuf") + n("stack_ringbuf") == 0 {
        assert!(
            n("growth_table_full") >= 16 * 65 + 1 - 64,
            "lost: {lost}\n{}",
            r.pretty()
        );
    }
}

#[test]
fn a_bad_selector_is_a_one_line_error() {
    let run = common::run(&["agent", "--full", "user=root"]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("unknown key `user`"), "{}", run.stderr);
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("leaktrace-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn steady_growth_is_promoted_then_demoted_when_its_budget_runs_out() {
    if !privileged() {
        return;
    }
    let mut grower = Fixture::start("agent_grower");
    let quiet = Fixture::start("agent_tier1");
    let dir = tempfile_dir("agent-auto");
    let out = dir.join("report.json");
    let mut agent = Background::agent(
        &[
            // Room for a busy neighbour (a compiler) that grows too.
            "--full-auto",
            "4",
            "--promote-window",
            "3s",
            "--promote-budget",
            "2s",
            "--no-listen",
        ],
        &out,
    );
    agent.wait_for("agent: watching");
    grower.go();
    let on = format!(
        "pid {} (agent_grower): exact heap tracing on: grew",
        grower.pid()
    );
    agent.wait_for(&on);
    let off = format!(
        "pid {} (agent_grower): exact heap tracing off: its promotion's time budget ran out",
        grower.pid()
    );
    agent.wait_for(&off);
    let (r, _, _) = stop(agent, &out);
    let tier2 = r.0["tier2"].as_array().unwrap();
    let entry = tier2
        .iter()
        .find(|t| t["pid"].as_u64() == Some(u64::from(grower.pid())))
        .unwrap_or_else(|| panic!("{}", r.pretty()));
    assert!(
        entry["reason"].as_str().unwrap().starts_with("grew "),
        "{entry}"
    );
    assert_eq!(entry["end"], "its promotion's time budget ran out");
    let (since, until) = (
        entry["since_s"].as_f64().unwrap(),
        entry["until_s"].as_f64().unwrap(),
    );
    assert!((until - since - 2.0).abs() < 1.5, "{entry}");
    // The process that does not grow was never promoted.
    assert!(
        !tier2
            .iter()
            .any(|t| t["pid"].as_u64() == Some(u64::from(quiet.pid()))),
        "{}",
        r.pretty()
    );
    // Demoted, its heap rows went with its probes.
    assert!(
        rows_of(&r, "leaks", grower.pid()).is_empty(),
        "{}",
        r.pretty()
    );
}

#[test]
fn a_selected_process_that_runs_without_its_probes_firing_is_reported_once() {
    if !privileged() {
        return;
    }
    let mut spin = Fixture::start("agent_spin");
    let dir = tempfile_dir("agent-silence");
    let out = dir.join("report.json");
    let mut agent = Background::agent(
        &["--full", &format!("pid={}", spin.pid()), "--no-listen"],
        &out,
    );
    agent.wait_for("exact heap tracing on: selected by pid=");
    spin.go();
    let notice = format!(
        "pid {} (agent_spin) used CPU but none of its allocator probes fired for 10s",
        spin.pid()
    );
    agent.wait_for(&notice);
    let (r, _, stderr) = stop(agent, &out);
    assert_eq!(
        stderr.matches(&notice).count(),
        1,
        "said more than once:\n{stderr}"
    );
    let notices = r.0["notices"].as_array().unwrap();
    assert_eq!(notices.len(), 1, "{}", r.pretty());
    assert!(notices[0].as_str().unwrap().starts_with(&notice));
}

#[test]
fn a_port_that_is_taken_is_a_one_line_error() {
    if !privileged() {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let run = common::run(&["agent", "--listen", &addr]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        errors,
        [format!("leaktrace: error: address {addr} is in use: pass --listen ADDR").as_str()],
        "{}",
        run.stderr
    );
}
