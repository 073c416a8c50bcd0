//! `leaktrace diff` on two real runs of one program, before and after a fix, and on files
//! that are not reports.
mod common;

use std::path::PathBuf;

use common::{c_fixture, leaktrace, privileged, run};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("diff-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `leaktrace diff ARGS`: its exit code, stdout and stderr.
fn diff(args: &[&str]) -> (Option<i32>, String, String) {
    let out = leaktrace().arg("diff").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Traces `diff_fix ARGS` to its end and writes the final JSON report to `out`.
fn trace(out: &std::path::Path, args: &[&str]) {
    let prog = c_fixture("diff_fix");
    let mut all = vec!["run", "--format", "json", "-o", out.to_str().unwrap(), "--"];
    all.push(prog.to_str().unwrap());
    all.extend_from_slice(args);
    let r = run(&all);
    assert!(r.status.success(), "{}", r.stderr);
}

/// The stack whose innermost frame is `symbol`, from `diff --format json`.
fn stack<'a>(v: &'a Value, symbol: &str) -> &'a Value {
    let found: Vec<&Value> = v["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["frames"][0]["symbol"] == symbol)
        .collect();
    assert_eq!(found.len(), 1, "{symbol} in {v:#}");
    found[0]
}

#[test]
fn the_fixed_leak_is_gone_with_its_bytes_and_the_other_is_unchanged() {
    if !privileged() {
        return;
    }
    let dir = scratch("fix");
    let (old, new) = (dir.join("old.json"), dir.join("new.json"));
    trace(&old, &[]);
    trace(&new, &["--fixed"]);
    let (old, new) = (old.to_str().unwrap(), new.to_str().unwrap());

    let (code, table, stderr) = diff(&[old, new]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(
        table.contains(&format!("\nGone: held in {old}, not in {new}")),
        "{table}"
    );
    assert!(
        table.contains("#1 heap -5.0 KiB, -20 blocks (was 5.0 KiB in 20 blocks) — diff_fix\n"),
        "{table}"
    );
    let gone = table.split("\nGone:").nth(1).unwrap();
    assert!(gone.contains(" 0 leak_session at diff_fix.c:"), "{table}");
    let unchanged = table.split("\nUnchanged:").nth(1).expect(&table);
    assert!(
        unchanged.contains("heap 1.4 KiB in 30 blocks — diff_fix — leak_name at diff_fix.c:"),
        "{table}"
    );
    for section in ["\nGrew:", "\nShrank:", "\nNew:"] {
        assert!(!table.contains(section), "{section} in {table}");
    }
    assert!(
        table.contains("stacks: 0 grew, 0 new, 0 shrank, 1 gone, 1 unchanged\n"),
        "{table}"
    );

    let (code, json, stderr) = diff(&["--format", "json", old, new]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: Value = serde_json::from_str(&json).unwrap();
    let counts = &v["counts"];
    assert_eq!(
        (
            counts["grew"].as_u64(),
            counts["new"].as_u64(),
            counts["shrank"].as_u64(),
            counts["gone"].as_u64(),
            counts["unchanged"].as_u64()
        ),
        (Some(0), Some(0), Some(0), Some(1), Some(1)),
        "{v:#}"
    );
    let fixed = stack(&v, "leak_session");
    assert_eq!(fixed["change"], "gone");
    assert_eq!(fixed["kind"], "heap");
    assert_eq!(
        (fixed["old_count"].as_u64(), fixed["old_bytes"].as_u64()),
        (Some(20), Some(20 * 256))
    );
    assert_eq!(
        (fixed["delta_count"].as_i64(), fixed["delta_bytes"].as_i64()),
        (Some(-20), Some(-20 * 256))
    );
    assert_eq!(fixed["frames"][1]["symbol"], "main");
    let kept = stack(&v, "leak_name");
    assert_eq!(kept["change"], "unchanged");
    assert_eq!(kept["matched"], "frames");
    assert_eq!(
        (
            kept["old_count"].as_u64(),
            kept["new_count"].as_u64(),
            kept["new_bytes"].as_u64(),
            kept["delta_bytes"].as_i64()
        ),
        (Some(30), Some(30), Some(30 * 48), Some(0))
    );
    let heap = &v["totals"][0];
    assert_eq!(heap["kind"], "heap");
    assert_eq!(
        (heap["old_bytes"].as_u64(), heap["new_bytes"].as_u64()),
        (Some(20 * 256 + 30 * 48), Some(30 * 48))
    );

    // The folded diff, for a differential flame graph: `stack old new`.
    let (code, folded, _) = diff(&["--format", "folded", old, new]);
    assert_eq!(code, Some(0));
    assert!(
        folded
            .lines()
            .any(|l| l.ends_with(";main;leak_session 5120 0")),
        "{folded}"
    );
    assert!(
        folded
            .lines()
            .any(|l| l.ends_with(";main;leak_name 1440 1440")),
        "{folded}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The binary's plumbing without tracing: the recorded session's report against a copy
/// with one stack fixed, written with `-o`.
#[test]
fn a_recorded_report_against_a_fixed_copy_names_the_fixed_stack() {
    let dir = scratch("recorded");
    let live = common::workspace().join("leaktrace/src/driver/fixtures/full.live.json");
    let mut report: Value = serde_json::from_str(&std::fs::read_to_string(&live).unwrap()).unwrap();
    let leaks = report["leaks"].as_array_mut().unwrap();
    let before = leaks.len();
    leaks.retain(|l| l["frames"][0]["symbol"] != "grow_cache");
    assert_eq!(leaks.len(), before - 1);
    let fixed = dir.join("fixed.json");
    // Two reports in the file, one a line: the last is read.
    let text = format!(
        "{}\n{}\n",
        std::fs::read_to_string(&live).unwrap().trim(),
        report
    );
    std::fs::write(&fixed, text).unwrap();
    let out = dir.join("diff.json");
    let (code, stdout, stderr) = diff(&[
        live.to_str().unwrap(),
        fixed.to_str().unwrap(),
        "--format",
        "json",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.is_empty() && stderr.is_empty(), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["new"]["reports"], 2);
    assert_eq!(
        (
            v["counts"]["gone"].as_u64(),
            v["counts"]["unchanged"].as_u64()
        ),
        (Some(1), Some(21))
    );
    let gone = stack(&v, "grow_cache");
    assert_eq!(gone["change"], "gone");
    assert_eq!(
        (gone["old_bytes"].as_u64(), gone["old_count"].as_u64()),
        (Some(48 << 20), Some(48))
    );
    // The table, at most one stack of each change.
    let (code, table, _) = diff(&[
        live.to_str().unwrap(),
        fixed.to_str().unwrap(),
        "--top",
        "1",
    ]);
    assert_eq!(code, Some(0));
    assert!(
        table.contains("#1 heap -48.0 MiB, -48 blocks (was 48.0 MiB in 48 blocks) — oom_victim\n"),
        "{table}"
    );
    assert!(
        table.contains("(the last of 2 reports in the file)"),
        "{table}"
    );
    assert!(table.contains("   … and 20 more (--top)\n"), "{table}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn one_line_error(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0]
}

#[test]
fn inputs_that_are_not_reports_are_named_with_exit_code_2() {
    let dir = scratch("bad");
    let report = dir.join("report.json");
    std::fs::write(&report, "{\"summary\":{\"elapsed_s\":1.0},\"leaks\":[]}\n").unwrap();
    let report = report.to_str().unwrap();
    let other = dir.join("other.json");
    std::fs::write(&other, "{\"pid\": 1}\n").unwrap();
    let other = other.to_str().unwrap();
    let text = dir.join("report.txt");
    std::fs::write(&text, "leaktrace final report after 5.7s: ...\n").unwrap();
    let text = text.to_str().unwrap();
    let empty = dir.join("empty.json");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    let missing = dir.join("missing.json");
    let missing = missing.to_str().unwrap();

    for (args, want) in [
        (
            [missing, report],
            format!("{missing}: cannot read: No such file or directory (os error 2)"),
        ),
        (
            [report, other],
            format!(
                "{other}: not a leaktrace JSON report: missing field `summary` at line 1 column 10"
            ),
        ),
        (
            [text, report],
            format!("{text}: not JSON: expected value at line 1 column 1"),
        ),
        (
            [report, empty],
            format!("{empty}: empty: no report in it (write one with `--format json -o FILE`)"),
        ),
    ] {
        let (code, stdout, stderr) = diff(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        assert_eq!(one_line_error(&stderr), format!("leaktrace: error: {want}"));
    }
    // A report against itself: nothing changed, exit 0.
    let (code, stdout, stderr) = diff(&[report, report]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("Neither report holds a stack."), "{stdout}");
    // Usage errors, as for the rest of the command line.
    for args in [
        &[report][..],
        &[report, report, "--sort", "age"],
        &[report, report, "--top", "0"],
    ] {
        let (code, _, stderr) = diff(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn help_says_which_report_of_a_file_is_read() {
    let (code, help, _) = diff(&["--help"]);
    assert_eq!(code, Some(0));
    for needle in [
        "OLD.json",
        "NEW.json",
        "last report",
        "--sort",
        "Exit codes:",
        "folded",
    ] {
        assert!(help.contains(needle), "diff --help lacks {needle}:\n{help}");
    }
}
