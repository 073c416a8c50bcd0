//! Reports that never contradict themselves: the summary is the sum of the rows on each side
//! of the runtime's line, every format says the same, each block is counted once, and what a
//! program holds at exit is what valgrind says. Fixtures traced by the real binary.
mod common;

use std::{io::Read as _, path::Path, process::Command};

use common::{c_fixture_with, cpp_fixture, privileged, run, trace_json};
use serde_json::Value;

/// Sums `(outstanding_count, outstanding_bytes)` over the rows of `list`.
fn rows_total(r: &common::Report, list: &str) -> (u64, u64) {
    r.0[list]
        .as_array()
        .unwrap_or_else(|| panic!("{list} missing: {}", r.pretty()))
        .iter()
        .fold((0, 0), |(c, b), l| {
            (
                c + l["outstanding_count"].as_u64().unwrap(),
                b + l["outstanding_bytes"].as_u64().unwrap(),
            )
        })
}

/// valgrind's "in use at exit" of `prog`: (bytes, blocks), after the C and C++ runtimes
/// freed their own blocks (valgrind has them do so), or `None` without valgrind.
fn valgrind_in_use_at_exit(prog: &Path) -> Option<(u64, u64)> {
    let out = Command::new("valgrind")
        .arg("--error-exitcode=0")
        .arg(prog)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.contains("in use at exit:"))?;
    // "==1== in use at exit: 1,234 bytes in 5 blocks"
    let nums: Vec<u64> = line
        .split("exit:")
        .nth(1)?
        .split_whitespace()
        .filter_map(|w| w.replace(',', "").parse().ok())
        .collect();
    Some((nums[0], nums[1]))
}

/// Sums the weights of folded lines.
fn folded_total(text: &str) -> u64 {
    text.lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum()
}

/// A program that dlopens libm and keeps it: the loader allocates for it at several places
/// inside ld.so, some blocks the runtime's (thread-local storage bookkeeping), the others the
/// program's. Once those frames were dropped they all became one row at `main`, counted as
/// the program's in the row and split in the summary.
#[test]
fn a_dlopen_is_counted_once_per_block_in_the_summary_the_rows_and_every_format() {
    if !privileged() {
        return;
    }
    let prog = c_fixture_with(
        "dlopen_libm",
        "",
        &["-O0", "-g", "-fno-omit-frame-pointer", "-ldl"],
    );
    let (run_json, r) = trace_json(&prog, &["--only", "heap"], &[]);
    assert!(run_json.status.success(), "{}", run_json.stderr);
    let summary = (
        r.summary("outstanding_count"),
        r.summary("outstanding_bytes"),
    );
    let runtime = (
        r.summary("runtime_outstanding_count"),
        r.summary("runtime_outstanding_bytes"),
    );
    // Each side of the line is the sum of its rows, so no block is on both.
    assert_eq!(rows_total(&r, "leaks"), summary, "{}", r.pretty());
    assert_eq!(rows_total(&r, "runtime"), runtime, "{}", r.pretty());
    r.assert_balanced();
    r.assert_site("own_leak", 3, 300);
    // The loader's rows name main as their site and keep ld.so's frames before it.
    let at_main = r.site("main");
    assert!(!at_main.is_empty(), "{}", r.pretty());
    for row in at_main {
        let site = row["site"].as_u64().unwrap() as usize;
        assert!(site > 0, "the loader's frames come first: {row}");
        assert!(
            row["frames"][0]["module"]
                .as_str()
                .is_some_and(|m| m.contains("ld-linux")),
            "{row}"
        );
    }
    // What the program holds at exit is what valgrind counts in use at exit (valgrind has
    // the runtime free its own blocks first).
    if let Some((bytes, blocks)) = valgrind_in_use_at_exit(&prog) {
        assert_eq!((summary.1, summary.0), (bytes, blocks), "{}", r.pretty());
    } else {
        eprintln!("valgrind is not installed: that comparison skipped");
    }
    // Every format says the same.
    let prog = prog.to_str().unwrap();
    let folded = |weight: &str| {
        let out = run(&[
            "run",
            "--only",
            "heap",
            "--format",
            "folded",
            "--folded-weight",
            weight,
            "--",
            prog,
        ]);
        assert!(out.status.success(), "{}", out.stderr);
        folded_total(&out.stdout)
    };
    assert_eq!(folded("bytes"), summary.1);
    assert_eq!(folded("count"), summary.0);
    let table = run(&["run", "--only", "heap", "--top", "1000", "--", prog]);
    assert!(table.status.success(), "{}", table.stderr);
    let header = table
        .stdout
        .lines()
        .find(|l| l.starts_with("leaktrace final report"))
        .unwrap_or_else(|| panic!("no summary line:\n{}", table.stdout));
    assert!(
        header.contains(&format!(" in {} blocks, ", summary.0)),
        "{header} vs {summary:?}"
    );
    let rows: u64 = table
        .stdout
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            let after = l.split(" in ").nth(1).unwrap();
            after
                .split_whitespace()
                .next()
                .unwrap()
                .replace(',', "")
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(rows, summary.0, "{}", table.stdout);
}

/// True when `text` holds something that looks like an Itanium C++ mangled name.
fn mangled_in(text: &str) -> Option<&str> {
    text.match_indices("_Z").find_map(|(i, _)| {
        let rest = &text[i..];
        let next = rest[2..].chars().next()?;
        let boundary = i == 0 || !text[..i].ends_with(|c: char| c.is_ascii_alphanumeric());
        (boundary && (next == 'N' || next == 'S' || next == 'L' || next.is_ascii_digit()))
            .then(|| &rest[..rest.len().min(60)])
    })
}

/// No name is left mangled, in any format: std::async's shared state, created through
/// std::make_shared, has one of the longest names libstdc++ makes.
#[test]
fn no_name_is_left_mangled_in_any_format() {
    if !privileged() {
        return;
    }
    let prog = cpp_fixture(
        "cpp_async",
        "",
        &["-O0", "-g", "-fno-omit-frame-pointer", "-pthread"],
    );
    let (run_json, r) = trace_json(&prog, &["--only", "heap"], &[]);
    assert!(run_json.status.success(), "{}", run_json.stderr);
    let symbols: Vec<&str> = ["leaks", "runtime"]
        .iter()
        .flat_map(|list| r.0[*list].as_array().unwrap())
        .flat_map(|l| l["frames"].as_array().unwrap())
        .filter_map(|f| f["symbol"].as_str())
        .collect();
    for s in &symbols {
        assert!(mangled_in(s).is_none(), "mangled: {s}");
    }
    assert!(
        symbols
            .iter()
            .any(|s| s.contains("std::make_shared<std::__future_base::_Deferred_state<")),
        "the kept future's state, made by make_shared, is named: {symbols:#?}"
    );
    let prog = prog.to_str().unwrap();
    for format in [&["--format", "folded"][..], &["--top", "1000"][..]] {
        let mut args = vec!["run", "--only", "heap"];
        args.extend_from_slice(format);
        args.extend_from_slice(&["--", prog]);
        let out = run(&args);
        assert!(out.status.success(), "{}", out.stderr);
        assert!(
            mangled_in(&out.stdout).is_none(),
            "{format:?}: {:?}",
            mangled_in(&out.stdout)
        );
        assert!(out.stdout.contains("std::make_shared<"), "{}", out.stdout);
    }
    let pprof = std::env::temp_dir().join(format!("leaktrace-async-{}.pb.gz", std::process::id()));
    let out = run(&[
        "run",
        "--only",
        "heap",
        "--format",
        "pprof",
        "-o",
        pprof.to_str().unwrap(),
        "--",
        prog,
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&pprof).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    let _ = std::fs::remove_file(&pprof);
    // The string table holds the function names as they are.
    let text = String::from_utf8_lossy(&raw);
    assert!(mangled_in(&text).is_none(), "{:?}", mangled_in(&text));
    assert!(text.contains("std::make_shared<"));
}

/// Rows carry their whole stack: `frames[site]` is the program's, what comes before it the
/// allocator's and the runtime's.
#[test]
fn the_site_is_the_programs_frame_and_the_runtime_frames_stay() {
    if !privileged() {
        return;
    }
    let prog = cpp_fixture(
        "cpp_sites",
        "-o0",
        &["-O0", "-g", "-fno-omit-frame-pointer"],
    );
    let (_, r) = trace_json(&prog, &[], &[]);
    // The vector's buffer: operator new and std::vector's frames first, then make_vector.
    let rows = r.site("make_vector()");
    let grown: Vec<&&Value> = rows
        .iter()
        .filter(|l| l["outstanding_bytes"] == 512)
        .collect();
    assert_eq!(grown.len(), 1, "{}", r.pretty());
    let frames = grown[0]["frames"].as_array().unwrap();
    let site = grown[0]["site"].as_u64().unwrap() as usize;
    let before: Vec<&str> = frames[..site]
        .iter()
        .map(|f| f["symbol"].as_str().unwrap_or("??"))
        .collect();
    assert!(
        before.iter().any(|s| s.starts_with("operator new")),
        "{before:?}"
    );
    assert!(
        before.iter().any(|s| s.contains("std::vector<int")),
        "{before:?}"
    );
}
