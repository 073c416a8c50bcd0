//! Heap tracing on the real kernel: fixtures with known leaks, traced by the real binary.
mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::{c_fixture, c_fixture_with, privileged, trace_json};

#[test]
fn every_allocator_entry_point_is_counted_exactly_and_churn_is_not_reported() {
    if !privileged() {
        return;
    }
    every_entry_point_exactly(&[]);
}

/// The same with a perf-event uprobe per function, where the kernel has no uprobe_multi.
#[test]
fn every_allocator_entry_point_is_counted_exactly_with_perf_uprobes() {
    if !privileged() {
        return;
    }
    every_entry_point_exactly(&["--attach", "perf"]);
}

fn every_entry_point_exactly(extra: &[&str]) {
    let (run, r) = trace_json(&c_fixture("heap_every_fn"), extra, &[]);
    assert!(run.status.success(), "{}", run.stderr);
    let attach = if extra.is_empty() { "multi" } else { "perf" };
    assert_eq!(r.0["summary"]["probes"]["attach"], attach, "{}", r.pretty());
    r.assert_site("leak_malloc", 10, 1000);
    r.assert_site("leak_calloc", 5, 600);
    r.assert_site("leak_realloc_grow", 3, 3 * 4096);
    r.assert_site("leak_realloc_null", 2, 154);
    r.assert_site("leak_realloc_shrink", 1, 10);
    r.assert_site("leak_reallocarray", 2, 200);
    r.assert_site("leak_posix_memalign", 3, 600);
    r.assert_site("leak_aligned_alloc", 2, 512);
    r.assert_site("leak_memalign", 1, 96);
    r.assert_site("leak_valloc", 1, 300);
    r.assert_site("leak_pvalloc", 1, 5000);
    r.assert_site("leak_large", 2, 2 << 20);
    // The first malloc of each realloc'd block moved to the realloc site.
    r.assert_absent("first_alloc");
    r.assert_absent("churn");
    let expected_bytes =
        1000 + 600 + 3 * 4096 + 154 + 10 + 200 + 600 + 512 + 96 + 300 + 5000 + (2 << 20);
    assert_eq!(r.summary("outstanding_count"), 33, "{}", r.pretty());
    assert_eq!(r.summary("outstanding_bytes"), expected_bytes);
    assert_eq!(r.summary("lost_events"), 0);
    assert_eq!(r.summary("unmatched_frees"), 0);
    r.assert_balanced();
    // The caller of the allocator is frames[0], never lost: main called it.
    let leak = r.site("leak_malloc")[0];
    assert_eq!(common::frame(leak, 1)["symbol"], "main");
    assert_eq!(common::frame(leak, 0)["file"], "heap_every_fn.c");
    assert_eq!(common::frame(leak, 0)["line"], 11);
    assert_eq!(leak["kind"], "heap");
    assert_eq!(leak["allocs"], 10);
    assert_eq!(leak["frees"], 0);
}

#[test]
fn outstanding_at_exit_matches_valgrind() {
    if !privileged() {
        return;
    }
    // valgrind aborts on pvalloc, so this build leaves it out.
    let prog = c_fixture_with(
        "heap_every_fn",
        "-no-pvalloc",
        &["-O0", "-g", "-fno-omit-frame-pointer", "-DNO_PVALLOC"],
    );
    let Ok(vg) = Command::new("valgrind")
        .arg("--error-exitcode=0")
        .arg(&prog)
        .output()
    else {
        eprintln!("skipped: valgrind is not installed");
        return;
    };
    let text = String::from_utf8_lossy(&vg.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("in use at exit:"))
        .expect("valgrind summary");
    // "==1== in use at exit: 1,234 bytes in 5 blocks"
    let nums: Vec<u64> = line
        .split("exit:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .filter_map(|w| w.replace(',', "").parse().ok())
        .collect();
    let (_, r) = trace_json(&prog, &[], &[]);
    assert_eq!(
        (
            r.summary("outstanding_bytes"),
            r.summary("outstanding_count")
        ),
        (nums[0], nums[1]),
        "{line}"
    );
}

#[test]
fn threads_freeing_each_others_blocks_balance_out() {
    if !privileged() {
        return;
    }
    let (run, r) = trace_json(&c_fixture("heap_threads"), &[], &[]);
    assert!(run.status.success());
    r.assert_site("thread_leak", 100, 4800);
    r.assert_absent("produce");
    r.assert_absent("worker");
    assert_eq!(r.summary("outstanding_count"), 100, "{}", r.pretty());
    // Each exiting thread's glibc frees its cache (the cache's own block, allocated inside
    // malloc, and the blocks parked in it, freed by the program already): counted apart,
    // never as unmatched frees, which would mean blocks allocated before tracing.
    assert_eq!(r.summary("unmatched_frees"), 0, "{}", r.pretty());
    assert!(
        r.summary("thread_exit_frees") >= 5,
        "at least the cache of each of the 5 threads: {}",
        r.pretty()
    );
    assert_eq!(r.summary("lost_events"), 0);
    r.assert_balanced();
    // glibc's per-thread blocks are the runtime's, reported apart.
    assert!(r.summary("runtime_outstanding_count") > 0);
}

#[test]
fn a_leak_before_main_is_caught() {
    if !privileged() {
        return;
    }
    let (_, r) = trace_json(&c_fixture("heap_before_main"), &[], &[]);
    r.assert_site("ctor_leak", 3, 192);
    assert_eq!(r.summary("outstanding_count"), 3);
}

#[test]
fn run_passes_the_commands_exit_status_through() {
    if !privileged() {
        return;
    }
    let (run, r) = trace_json(Path::new("/bin/sh"), &[], &["-c", "exit 7"]);
    assert_eq!(run.status.code(), Some(7), "{}", run.stderr);
    assert!(r.0["final"].as_bool().unwrap());
    let (run, _) = trace_json(Path::new("/bin/sh"), &[], &["-c", "kill -TERM $$"]);
    assert_eq!(run.status.code(), Some(128 + 15));
}

#[test]
fn forked_children_are_traced_from_their_first_allocation_with_follow_forks() {
    if !privileged() {
        return;
    }
    let prog = c_fixture("heap_fork");
    let (run, r) = trace_json(&prog, &["--follow-forks"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    r.assert_site("child_leak", 7, 224);
    r.assert_site("parent_leak", 1, 1000);
    let child = r.site("child_leak")[0]["pid"].as_u64().unwrap();
    let parent = r.site("parent_leak")[0]["pid"].as_u64().unwrap();
    assert_ne!(child, parent);
    r.assert_balanced();

    // Without --follow-forks the child is not traced at all.
    let (_, r) = trace_json(&prog, &[], &[]);
    r.assert_absent("child_leak");
    r.assert_site("parent_leak", 1, 1000);
}

#[test]
fn attach_to_a_running_process_sees_only_what_happens_after() {
    if !privileged() {
        return;
    }
    let mut target = Command::new(c_fixture("heap_attach"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(target.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let pid = target.id().to_string();
    let mut tracer = common::Background::start(&["--pid", &pid, "--format", "json", "-v"]);
    // The probes are in place once leaktrace says so.
    tracer.wait_for("tracing pid");
    let mut stdin = target.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "done");
    drop(stdin); // the target exits on EOF, and leaktrace with it
    target.wait().unwrap();
    let run = tracer.finish(Duration::from_secs(30));
    assert!(run.status.success(), "{}", run.stderr);
    let r = run.report();
    r.assert_site("attach_leak", 12, 12 * 128);
    r.assert_absent("attach_churn");
    // The 20 blocks allocated before the attach were freed after it: unmatched, not errors,
    // and not taken for a thread's exit.
    assert_eq!(r.summary("unmatched_frees"), 20, "{}", r.pretty());
    assert_eq!(r.summary("thread_exit_frees"), 0, "{}", r.pretty());
    assert_eq!(r.summary("outstanding_count"), 12);
    r.assert_balanced();
    // Descriptors too: what was opened after the attach is the leak; closes of what was
    // opened before are unmatched, never charged to anyone.
    r.assert_fds("attach_fd_leak", 3, "file");
    assert_eq!(r.summary("fds_unmatched_closes"), 4, "{}", r.pretty());
    assert_eq!(r.summary("fds_outstanding"), 3);
}

#[test]
fn under_pressure_the_counts_either_balance_or_report_what_was_lost() {
    if !privileged() {
        return;
    }
    let prog = c_fixture("heap_pressure");
    let (run, r) = trace_json(&prog, &[], &["2"]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(r.summary("allocs") > 100_000, "{}", r.pretty());
    if r.summary("lost_events") == 0 {
        r.assert_balanced();
        r.assert_site("pressure_leak", 100, 1000);
        r.assert_absent("hammer");
    }

    // A ring buffer far too small must lose events, and say so.
    let (run, r) = trace_json(&prog, &["--ring-buffer", "4K"], &["1"]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(r.summary("lost_events") > 0, "{}", r.pretty());
    assert!(
        r.0["summary"]["lost_by_cause"]["heap_ringbuf"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn rust_box_and_vec_leaks_are_reported_at_the_rust_function() {
    if !privileged() {
        return;
    }
    let prog = common::rust_fixture(
        "rust_leak",
        "-fp",
        &["-C", "force-frame-pointers=yes", "-C", "opt-level=0"],
    );
    let (run, r) = trace_json(&prog, &[], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    // Box<[u64; 8]> six times, a Vec<u32> with capacity 250 once.
    r.assert_site("rust_leak::leak_boxes", 6, 6 * 64);
    r.assert_site("rust_leak::leak_vec", 1, 1000);
    r.assert_absent("rust_leak::churn");
    r.assert_balanced();
}

#[test]
fn followed_children_that_exec_are_traced_in_their_new_image() {
    if !privileged() {
        return;
    }
    // The shell forks, and each child execs a fixture.
    let script = format!(
        "{}; {}; true",
        c_fixture("heap_before_main").display(),
        c_fixture("heap_fork").display()
    );
    let (run, r) = trace_json(Path::new("/bin/sh"), &["--follow-forks"], &["-c", &script]);
    assert!(run.status.success(), "{}", run.stderr);
    r.assert_site("ctor_leak", 3, 192);
    r.assert_site("parent_leak", 1, 1000);
    r.assert_site("child_leak", 7, 224);
    let pids: std::collections::BTreeSet<u64> = ["ctor_leak", "parent_leak", "child_leak"]
        .iter()
        .map(|s| r.site(s)[0]["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "three processes: {}", r.pretty());
    for leak in r.leaks() {
        assert_eq!(leak["at_exit"], true);
    }
    r.assert_balanced();
}

/// A process that execs keeps its pid and, for the modules the new image maps again (libc,
/// the loader), the probes it already had: every allocator call of the new image is reported
/// once, not once per image that hooked it.
#[test]
fn an_exec_into_the_same_libc_reports_each_call_once() {
    if !privileged() {
        return;
    }
    let prog = c_fixture("heap_every_fn");
    // env execs the fixture in its own process.
    let (run, r) = trace_json(Path::new("/usr/bin/env"), &[], &[prog.to_str().unwrap()]);
    assert!(run.status.success(), "{}", run.stderr);
    r.assert_site("leak_malloc", 10, 1000);
    r.assert_site("leak_calloc", 5, 600);
    r.assert_site("leak_realloc_grow", 3, 3 * 4096);
    r.assert_site("leak_posix_memalign", 3, 600);
    r.assert_absent("churn");
    // The fixture's churn frees 1,200 blocks: a second probe on free would report each again.
    assert_eq!(r.summary("unmatched_frees"), 0, "{}", r.pretty());
    assert_eq!(r.summary("lost_events"), 0);
    r.assert_balanced();
}

#[test]
fn cpp_names_are_demangled() {
    if !privileged() {
        return;
    }
    let prog = common::cpp_fixture("cpp_names", "", &["-O0", "-g", "-fno-omit-frame-pointer"]);
    let (_, r) = trace_json(&prog, &[], &[]);
    r.assert_site("leaky::Cache::insert(int)", 4, 96);
    r.assert_site("void leaky::hold<double>(int)", 3, 24);
}

#[test]
fn folded_output_to_a_file_holds_root_first_stacks() {
    if !privileged() {
        return;
    }
    let out = std::env::temp_dir().join(format!("leaktrace-folded-{}.txt", std::process::id()));
    let prog = c_fixture("heap_every_fn");
    let run = common::run(&[
        "run",
        "--format",
        "folded",
        "--output",
        out.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "the report went to the file");
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    let line = |stack_end: &str| {
        text.lines()
            .find(|l| l.split(' ').next().unwrap().ends_with(stack_end))
            .map(str::to_owned)
    };
    let malloc =
        line(";main;leak_malloc").unwrap_or_else(|| panic!("no leak_malloc stack in:\n{text}"));
    assert!(malloc.ends_with(" 1000"), "{malloc}");
    assert!(line(";main;leak_calloc").unwrap().ends_with(" 600"));
    let count = common::run(&[
        "run",
        "--format",
        "folded",
        "--folded-weight",
        "count",
        "--",
        prog.to_str().unwrap(),
    ]);
    let calloc = count
        .stdout
        .lines()
        .find(|l| l.contains(";main;leak_calloc "))
        .unwrap()
        .to_owned();
    assert!(calloc.ends_with(" 5"), "{calloc}");
}

#[test]
fn a_static_executable_is_hooked_in_itself() {
    if !privileged() {
        return;
    }
    let prog = c_fixture_with(
        "heap_every_fn",
        "-static",
        &["-static", "-O0", "-g", "-fno-omit-frame-pointer"],
    );
    let (run, r) = trace_json(&prog, &[], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    r.assert_site("leak_malloc", 10, 1000);
    r.assert_site("leak_realloc_grow", 3, 3 * 4096);
    r.assert_site("leak_posix_memalign", 3, 600);
    r.assert_site("leak_large", 2, 2 << 20);
    r.assert_absent("churn");
    r.assert_balanced();
}

/// Leaks at `inner` (their site) whose stack goes through `caller`.
fn through_caller(r: &common::Report, caller: &str) -> u64 {
    r.site("inner")
        .iter()
        .filter(|l| {
            let site = l["site"].as_u64().unwrap() as usize;
            l["frames"]
                .as_array()
                .is_some_and(|f| f[site + 1..].iter().any(|f| f["symbol"] == caller))
        })
        .map(|l| l["outstanding_count"].as_u64().unwrap())
        .sum()
}

/// Traces fixture `name` (two call paths reaching malloc at the same depth, 100 blocks via_a
/// and 60 via_b, alternating) at -O0 and at -O2 without tail calls or merged callers, checks
/// that each path kept its own stack, and returns the reports.
fn paths_kept_apart(name: &str) -> Vec<common::Report> {
    [
        c_fixture(name),
        c_fixture_with(
            name,
            "-O2-nosibling",
            &[
                "-O2",
                "-g",
                "-fomit-frame-pointer",
                "-fno-optimize-sibling-calls",
                "-fno-ipa-icf",
            ],
        ),
    ]
    .iter()
    .map(|prog| {
        let (run, r) = trace_json(prog, &["--only", "heap"], &[]);
        assert!(run.status.success(), "{}", run.stderr);
        assert_eq!(through_caller(&r, "via_a"), 100, "{}", r.pretty());
        assert_eq!(through_caller(&r, "via_b"), 60, "{}", r.pretty());
        r
    })
    .collect()
}

#[test]
fn cached_walks_never_merge_paths_that_differ_only_further_up() {
    if !privileged() {
        return;
    }
    paths_kept_apart("heap_same_depth");
}

#[test]
fn cached_walks_check_words_far_above_large_frames() {
    if !privileged() {
        return;
    }
    // The paths part ~21 KiB up, past three 7000-byte frames: the cached walk is checked
    // with several copied ranges of the stack, not one span.
    for r in paths_kept_apart("heap_same_depth_far") {
        let leak = r.site("inner")[0];
        let (frames, site) = (&leak["frames"], leak["site"].as_u64().unwrap() as usize);
        assert!(
            frames.as_array().unwrap()[site + 1..site + 4]
                .iter()
                .all(|f| f["symbol"].as_str().unwrap().starts_with("big")),
            "{frames}"
        );
        // 160 allocations over two paths switching 40 times: all but ~40 walks are cached
        // (the counters cover every allocation of the process, the loader's included).
        let hits = r.summary("stack_cache_hits");
        assert!(hits >= 110, "{hits} cache hits: {}", r.pretty());
    }
}

#[test]
fn sampled_bytes_per_stack_are_within_ten_percent() {
    if !privileged() {
        return;
    }
    let prog = c_fixture_with(
        "heap_sampling",
        "-nosibling",
        &[
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-optimize-sibling-calls",
        ],
    );
    let (run, r) = trace_json(&prog, &["--only", "heap", "--sample-bytes", "1024"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(r.summary("sample_bytes"), 1024);
    assert_eq!(r.summary("lost_events"), 0);
    // Each estimate's relative standard deviation is at most ~2% here (24-byte blocks are
    // kept with p = 24/1024, 2,343 of them on average): 10% is ~5 sigma.
    for (site, exact) in [
        ("small_site", 2_400_000u64),
        ("mid_site", 4_000_000),
        ("big_site", 4_096_000),
    ] {
        let (_, estimate) = r.at(site);
        let error = (estimate as f64 - exact as f64).abs() / exact as f64;
        assert!(
            error < 0.10,
            "{site}: estimated {estimate} bytes for {exact} ({:.1}% off)",
            error * 100.0
        );
    }
    // Blocks above the unit are all sampled: exact.
    assert_eq!(r.at("big_site"), (500, 4_096_000));
    // Sampled blocks' frees still cross: the churn holds nothing.
    r.assert_absent("churn");
}

#[test]
fn sampling_is_refused_in_growth_mode() {
    let out = common::leaktrace()
        .args([
            "run",
            "--mode",
            "growth",
            "--sample-bytes",
            "64K",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sample-bytes"));
}

#[test]
fn prefork_workers_are_one_row_and_free_what_they_inherited() {
    if !privileged() {
        return;
    }
    let prog = c_fixture("heap_prefork");
    let (run, r) = trace_json(&prog, &["--follow-forks"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    // Twenty workers of one executable, one stack: one row that counts them.
    let rows = r.site("worker_leak");
    assert_eq!(rows.len(), 1, "{}", r.pretty());
    assert_eq!(rows[0]["processes"], 20, "{}", r.pretty());
    assert_eq!(rows[0]["pids"].as_array().unwrap().len(), 16);
    r.assert_site("worker_leak", 40, 40 * 64);
    // Each worker freed its inherited copy of the table: matched, not unmatched, not a leak.
    r.assert_absent("parent_table");
    assert_eq!(r.summary("unmatched_frees"), 0, "{}", r.pretty());
    assert_eq!(r.summary("inherited_frees"), 200, "{}", r.pretty());
    // Split by pid on request.
    let (_, r) = trace_json(&prog, &["--follow-forks", "--by-pid"], &[]);
    assert_eq!(r.site("worker_leak").len(), 20, "{}", r.pretty());
    r.assert_site("worker_leak", 40, 40 * 64);
}
