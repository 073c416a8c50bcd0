//! The command line's promises: clear one-line errors and documented exit codes for bad
//! input, never a panic.
mod common;

use common::{c_fixture, c_fixture_with, leaktrace, privileged, run};

fn one_line_error(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("leaktrace: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    errors[0]
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["--pid", "0"],
        &["--pid", "x"],
        &["run"],
        &["--pid", "1", "--interval", "1ms"],
    ] {
        let out = leaktrace().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn help_documents_exit_codes() {
    let out = leaktrace().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in ["Exit codes:", "CAP_BPF", "127", "--pid", "run"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn a_pid_that_does_not_exist_is_named() {
    if !privileged() {
        return;
    }
    let r = run(&["--pid", "4194000"]);
    assert_eq!(r.status.code(), Some(4));
    assert_eq!(
        one_line_error(&r.stderr),
        "leaktrace: error: no process with pid 4194000"
    );
}

#[test]
fn missing_privileges_name_the_capabilities() {
    // As an unprivileged user, whoever runs the tests.
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if !privileged() || !setpriv.exists() {
        return;
    }
    let out = std::process::Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_leaktrace"))
        .args(["--pid", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let line = one_line_error(&stderr);
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"] {
        assert!(line.contains(cap), "{line}");
    }
}

#[test]
fn a_program_without_an_allocator_is_refused() {
    if !privileged() {
        return;
    }
    let prog = c_fixture_with("no_allocator", "", &["-static", "-nostdlib", "-O2"]);
    let r = run(&["run", "--", prog.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(4), "{}", r.stderr);
    assert!(
        one_line_error(&r.stderr).contains("has no allocator leaktrace can hook"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_command_that_cannot_start_gets_the_shells_codes() {
    if !privileged() {
        return;
    }
    let r = run(&["run", "--", "/nonexistent/program"]);
    assert_eq!(r.status.code(), Some(127), "{}", r.stderr);
    assert!(one_line_error(&r.stderr).contains("/nonexistent/program"));
    let r = run(&["run", "--", "no-such-command-anywhere"]);
    assert_eq!(r.status.code(), Some(127));
    assert_eq!(
        one_line_error(&r.stderr),
        "leaktrace: error: command not found: no-such-command-anywhere"
    );
    let r = run(&["run", "--", "/etc/hostname"]);
    assert_eq!(r.status.code(), Some(126), "{}", r.stderr);
}

#[test]
fn tracing_says_what_it_traces_when_it_starts_and_nothing_with_quiet() {
    if !privileged() {
        return;
    }
    let demo = c_fixture("heap_attach");
    let demo = demo.to_str().unwrap();
    // heap_attach waits for stdin, which is /dev/null here: it exits at once.
    let said = run(&["run", "--format", "json", "--interval", "5s", "--", demo]);
    assert!(said.status.success(), "{}", said.stderr);
    let line = said
        .stderr
        .lines()
        .find(|l| l.starts_with("leaktrace: running "))
        .unwrap_or_else(|| panic!("no start line:\n{}", said.stderr));
    for part in [
        "heap_attach (pid ",
        "heap (allocator probes once it maps an allocator)",
        "descriptors, temp files, OOM kills (tracepoints)",
        "a report every 5s",
        "Ctrl-C stops both with a final report",
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
    // Not a terminal: no status line, and the report on stdout is JSON alone.
    assert!(!said.stderr.contains('\r'), "{:?}", said.stderr);
    serde_json::from_str::<serde_json::Value>(&said.stdout).unwrap();
    let quiet = run(&["run", "--quiet", "--format", "json", "--", demo]);
    assert!(quiet.status.success(), "{}", quiet.stderr);
    assert!(!quiet.stderr.contains("leaktrace: "), "{}", quiet.stderr);
}

#[test]
fn on_a_terminal_a_status_line_is_kept_and_wiped_before_the_report() {
    if !privileged()
        || std::process::Command::new("script")
            .arg("-V")
            .output()
            .is_err()
    {
        return;
    }
    let cmd = format!(
        "{} run --interval 10s -- sleep 2.5",
        env!("CARGO_BIN_EXE_leaktrace")
    );
    // util-linux's script(1) gives the command a pseudo-terminal.
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let status = "\r\x1b[2Kleaktrace: ";
    assert!(text.contains(status), "{text:?}");
    assert!(text.contains(" events/s, "), "{text:?}");
    // Wiped before the report: the report's first line starts a line of its own.
    assert!(
        text.contains("\r\x1b[2Kleaktrace final report after "),
        "{text:?}"
    );
}
