//! Probe placement must never change what a traced program does: fixture and real programs
//! print exactly the same bytes traced (probes past functions' first instructions, where the
//! kernel emulates them) as untraced.
mod common;

use std::{path::Path, process::Command};

use common::{Report, Run, c_fixture, c_fixture_with, privileged};

fn untraced(prog: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `leaktrace run --only heap` with the report in a file, so the program's stdout is its own.
fn traced(prog: &Path, args: &[&str]) -> (Run, Report) {
    let report = std::env::temp_dir().join(format!(
        "leaktrace-placement-{}-{}.json",
        std::process::id(),
        prog.file_name().unwrap().to_string_lossy()
    ));
    let mut argv = vec!["run", "--only", "heap", "--format", "json", "--output"];
    argv.push(report.to_str().unwrap());
    argv.push("--");
    argv.push(prog.to_str().unwrap());
    argv.extend_from_slice(args);
    let run = common::run(&argv);
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!("no report from {prog:?}: {}", run.stderr);
        });
    (run, Report(serde_json::from_str(line).unwrap()))
}

#[track_caller]
fn assert_same_bytes(traced: &[u8], untraced: &[u8], what: &str) {
    if traced != untraced {
        let at = traced
            .iter()
            .zip(untraced)
            .position(|(a, b)| a != b)
            .unwrap_or(traced.len().min(untraced.len()));
        panic!(
            "{what}: traced output differs at byte {at} ({} bytes traced, {} untraced)",
            traced.len(),
            untraced.len()
        );
    }
}

#[test]
fn every_allocator_entry_point_computes_the_same_traced() {
    if !privileged() {
        return;
    }
    for prog in [
        c_fixture("alloc_digest"),
        // Without sibling calls, so malloc_site stays the caller of malloc.
        c_fixture_with(
            "alloc_digest",
            "-O2-nosibling",
            &[
                "-O2",
                "-g",
                "-fomit-frame-pointer",
                "-fno-optimize-sibling-calls",
            ],
        ),
    ] {
        let want = untraced(&prog, &[]);
        assert!(String::from_utf8_lossy(&want).ends_with("errors 0\n"));
        let (run, r) = traced(&prog, &[]);
        assert!(run.status.success(), "{}", run.stderr);
        assert_same_bytes(run.stdout.as_bytes(), &want, "alloc_digest");
        // And it was traced: every call seen, the kept blocks at their sites.
        assert_eq!(r.summary("lost_events"), 0);
        r.assert_site("malloc_site", 7, 700);
        r.assert_site("calloc_site", 3, 90);
        // Nine allocating calls a round (reallocarray's through realloc's probes).
        assert_eq!(r.summary("allocs"), 20_000 * 9 + 10, "{}", r.pretty());
        assert_eq!(r.summary("frees"), 20_000 * 9);
    }
}

#[test]
fn real_programs_print_the_same_bytes_traced() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("leaktrace-placement-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lines = dir.join("lines.txt");
    let text: String = (0..20_000u64)
        .map(|i| {
            format!(
                "{:016x} {}\n",
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                i % 97
            )
        })
        .collect();
    std::fs::write(&lines, text).unwrap();
    let lines = lines.to_str().unwrap();
    let mut programs: Vec<(&str, Vec<&str>)> = vec![("sort", vec![lines])];
    let python = "import random\nrandom.seed(3)\nd={}\nfor i in range(20000):\n d[random.randrange(999)]=str(i)*random.randrange(1,40)\nprint(sum(len(v) for v in d.values()), sorted(d)[:5])\n";
    if Path::new("/usr/bin/python3").exists() {
        programs.push(("/usr/bin/python3", vec!["-c", python]));
    }
    let sql = "create table t(a, b); with recursive n(i) as (select 1 union all select i+1 from n where i < 5000) insert into t select i, printf('%d-%.*c', i, i % 50, 'x') from n; select count(*), sum(length(b)), max(b) from t;";
    if Path::new("/usr/bin/sqlite3").exists() {
        programs.push(("/usr/bin/sqlite3", vec![":memory:", sql]));
    }
    for (prog, args) in &programs {
        let prog = which(prog);
        let want = untraced(&prog, args);
        let (run, r) = traced(&prog, args);
        assert!(run.status.success(), "{prog:?}: {}", run.stderr);
        assert!(!want.is_empty());
        assert_same_bytes(run.stdout.as_bytes(), &want, &prog.to_string_lossy());
        assert!(r.summary("allocs") > 0, "{prog:?} was not traced");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn which(prog: &str) -> std::path::PathBuf {
    if prog.starts_with('/') {
        return prog.into();
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{prog} not found"))
}
