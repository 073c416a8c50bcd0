//! Stacks without frame pointers: the kernel-side walker with `.eh_frame` tables, checked
//! against glibc's own unwinder and at allocation sites reached through libc, libstdc++ and
//! Rust's standard library, in optimized builds.
mod common;

use common::{c_fixture_with, cpp_fixture, privileged, rust_fixture, trace_json};

const O2_NO_FP: &[&str] = &["-O2", "-g", "-fomit-frame-pointer"];
const O0_FP: &[&str] = &["-O0", "-g", "-fno-omit-frame-pointer"];

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// Every stack leaktrace reports for record_and_alloc must equal, frame for frame, what
/// glibc's backtrace() printed just before that allocation.
fn matches_backtrace(flags: &[&str], variant: &str) {
    let prog = c_fixture_with("unwind_oracle", variant, flags);
    let (run, r) = trace_json(&prog, &[], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    let oracles: Vec<(u64, Vec<u64>)> = run
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("oracle "))
        .map(|l| {
            let mut words = l.split(' ');
            let size = words.next().unwrap().parse().unwrap();
            (size, words.map(hex).collect())
        })
        .collect();
    assert_eq!(oracles.len(), 4, "{}", run.stderr);
    for (size, oracle) in oracles {
        let leak = r
            .site("record_and_alloc")
            .into_iter()
            .find(|l| l["outstanding_bytes"].as_u64() == Some(size))
            .unwrap_or_else(|| panic!("no {size}-byte leak at record_and_alloc:\n{}", r.pretty()));
        // Inlined calls repeat their frame's address; the oracle lists each frame once.
        let site = leak["site"].as_u64().unwrap() as usize;
        let ours: Vec<u64> = leak["frames"].as_array().unwrap()[site..]
            .iter()
            .filter(|f| f["inlined"] == false)
            .map(|f| hex(f["addr"].as_str().unwrap()))
            .collect();
        assert_eq!(
            ours[1..],
            oracle[..],
            "{size}-byte site: ours {ours:x?}, backtrace() {oracle:x?}"
        );
        assert_eq!(leak["truncated"], false, "the walk reaches _start");
    }
}

#[test]
fn stacks_match_glibcs_backtrace_without_frame_pointers() {
    if privileged() {
        matches_backtrace(O2_NO_FP, "-o2");
    }
}

#[test]
fn stacks_match_glibcs_backtrace_with_frame_pointers() {
    if privileged() {
        matches_backtrace(O0_FP, "-o0");
    }
}

#[test]
fn every_allocator_entry_point_without_frame_pointers() {
    if !privileged() {
        return;
    }
    let prog = c_fixture_with("heap_every_fn", "-o2", O2_NO_FP);
    let (_, r) = trace_json(&prog, &[], &[]);
    r.assert_site("leak_malloc", 10, 1000);
    r.assert_site("leak_calloc", 5, 600);
    r.assert_site("leak_realloc_grow", 3, 3 * 4096);
    r.assert_site("leak_posix_memalign", 3, 600);
    r.assert_site("leak_aligned_alloc", 2, 512);
    r.assert_site("leak_large", 2, 2 << 20);
    r.assert_absent("churn");
    assert_eq!(r.summary("outstanding_count"), 33, "{}", r.pretty());
}

fn libc_sites(flags: &[&str], variant: &str) {
    let prog = c_fixture_with("libc_sites", variant, flags);
    let (run, r) = trace_json(&prog, &[], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    r.assert_site("dup_names", 4, 24);
    r.assert_site("dup_prefixes", 3, 12);
    r.assert_site("open_config", 1, 472);
    r.assert_site("read_lines", 1, 120);
    r.assert_absent("churn");
    // Nothing is left to libc itself: the stdio buffers it frees at exit are its own.
    assert_eq!(
        (
            r.summary("outstanding_count"),
            r.summary("outstanding_bytes")
        ),
        (9, 628),
        "{}",
        r.pretty()
    );
    r.assert_balanced();
}

#[test]
fn strdup_fopen_and_getline_count_at_their_callers() {
    if privileged() {
        libc_sites(O2_NO_FP, "-o2");
        libc_sites(O0_FP, "-o0");
    }
}

#[test]
fn operator_new_string_and_vector_count_at_their_callers() {
    if !privileged() {
        return;
    }
    for (flags, variant) in [(O2_NO_FP, "-o2"), (O0_FP, "-o0")] {
        let prog = cpp_fixture("cpp_sites", variant, flags);
        let (_, r) = trace_json(&prog, &[], &[]);
        r.assert_site("make_ints()", 5, 20);
        r.assert_site("make_array()", 1, 80);
        r.assert_site("make_string()", 2, 32 + 41);
        r.assert_site("make_vector()", 2, 24 + 512);
        r.assert_absent("churn()");
        // libstdc++'s emergency exception pool is the runtime's, as valgrind sees it too.
        assert_eq!(
            (
                r.summary("outstanding_count"),
                r.summary("outstanding_bytes")
            ),
            (10, 709),
            "{}",
            r.pretty()
        );
    }
}

#[test]
fn rust_release_build_leaks_count_at_the_rust_function() {
    if !privileged() {
        return;
    }
    let prog = rust_fixture("rust_leak", "-release", &["-C", "opt-level=2"]);
    let (_, r) = trace_json(&prog, &[], &[]);
    r.assert_site("rust_leak::leak_boxes", 6, 6 * 64);
    r.assert_site("rust_leak::leak_vec", 1, 1000);
    r.assert_site("rust_leak::leak_string", 1, 77);
    r.assert_absent("rust_leak::churn");
}

#[test]
fn a_library_dlopened_while_traced_is_unwound_and_named() {
    if !privileged() {
        return;
    }
    let lib = c_fixture_with("plugin", ".so", &["-O2", "-g", "-shared", "-fPIC"]);
    let host = c_fixture_with("dlopen_host", "", &["-O2", "-g"]);
    let (run, r) = trace_json(&host, &[], &[lib.to_str().unwrap()]);
    assert!(run.status.success(), "{}", run.stderr);
    // Symbolized after the library was unloaded, and the process gone.
    r.assert_site("plugin_leak", 2, 1110);
    let leak = r.site("plugin_leak")[0];
    assert_eq!(common::frame(leak, 1)["symbol"], "main");
    assert!(
        common::frame(leak, 0)["module"]
            .as_str()
            .unwrap()
            .ends_with("plugin.so")
    );
}

#[test]
fn a_recursion_deeper_than_the_limit_is_truncated_cleanly() {
    if !privileged() {
        return;
    }
    let prog = c_fixture_with("deep_recursion", "", O2_NO_FP);
    let (_, r) = trace_json(&prog, &[], &[]);
    r.assert_site("recurse", 1, 64);
    let leak = r.site("recurse")[0];
    assert_eq!(leak["truncated"], true);
    assert_eq!(leak["frames"].as_array().unwrap().len(), 127);
}

/// Built without .eh_frame for its own code (as some embedded and kernel-adjacent builds
/// are): .debug_frame from -g is the only unwind information.
const DEBUG_FRAME_ONLY: &[&str] = &[
    "-O2",
    "-g",
    "-fomit-frame-pointer",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
];

fn assert_every_fn_sites(r: &common::Report) {
    r.assert_site("leak_malloc", 10, 1000);
    r.assert_site("leak_realloc_grow", 3, 3 * 4096);
    r.assert_site("leak_posix_memalign", 3, 600);
    r.assert_absent("churn");
    for site in ["leak_malloc", "leak_calloc", "leak_large"] {
        assert_eq!(
            common::frame(r.site(site)[0], 1)["symbol"],
            "main",
            "{site}:\n{}",
            r.pretty()
        );
    }
}

#[test]
fn debug_frame_stands_in_for_a_missing_eh_frame() {
    if !privileged() {
        return;
    }
    let prog = c_fixture_with("heap_every_fn", "-debug-frame", DEBUG_FRAME_ONLY);
    let (_, r) = trace_json(&prog, &[], &[]);
    assert_every_fn_sites(&r);
}

#[test]
fn a_separate_debug_file_found_by_build_id_is_used() {
    if !privileged() {
        return;
    }
    let built = c_fixture_with("heap_every_fn", "-debug-frame", DEBUG_FRAME_ONLY);
    let dir = std::env::temp_dir().join(format!("leaktrace-debuglink-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = dir.join("heap_every_fn");
    let debug = dir.join("heap_every_fn.debug");
    let run = |cmd: &mut std::process::Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    run(std::process::Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&built)
        .arg(&debug));
    run(std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&built)
        .arg(&prog));
    // The build id names the debug file: /usr/lib/debug/.build-id/ab/cdef….debug
    let out = std::process::Command::new("readelf")
        .arg("-n")
        .arg(&prog)
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&out.stdout);
    let id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("a build id")
        .to_owned();
    let installed = std::path::PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ));
    std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
    std::fs::copy(&debug, &installed).unwrap();
    let (_, r) = trace_json(&prog, &[], &[]);
    std::fs::remove_file(&installed).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_every_fn_sites(&r);
}
