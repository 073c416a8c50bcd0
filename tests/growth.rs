//! Growth mode on the real kernel: no allocator probe, page faults and releases only.
mod common;

use common::{c_fixture, privileged, trace_json};

/// True when `leak`'s stack passes through `function`, anywhere.
fn passes_through(leak: &serde_json::Value, function: &str) -> bool {
    leak["frames"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["symbol"].as_str() == Some(function))
}

/// Leaks whose stack passes through `function`.
fn through<'a>(r: &'a common::Report, function: &str) -> Vec<&'a serde_json::Value> {
    r.leaks()
        .iter()
        .filter(|l| passes_through(l, function))
        .collect()
}

/// Asserts that the first (largest) row's stack passes through `function`.
fn ranks_first(r: &common::Report, function: &str) {
    assert!(
        passes_through(&r.leaks()[0], function),
        "the first row is not {function}'s:\n{}",
        r.pretty()
    );
}

fn bytes(rows: &[&serde_json::Value]) -> u64 {
    rows.iter()
        .map(|l| l["outstanding_bytes"].as_u64().unwrap())
        .sum()
}

#[test]
fn the_growing_stack_ranks_first_and_released_memory_is_not_counted() {
    if !privileged() {
        return;
    }
    let (run, r) = trace_json(&c_fixture("growth_sites"), &["--mode", "growth"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(r.0["summary"]["mode"], "growth");
    assert_eq!(r.summary("lost_events"), 0);
    // No allocator probe: the pages of each 256 KiB block (65 with malloc's header page),
    // first written by malloc itself (the header) or by memset, all under leak_pages; and
    // the page of `kept[]`, first written there too.
    let leaked = through(&r, "leak_pages");
    assert_eq!(bytes(&leaked), (40 * 65 + 1) * 4096, "{}", r.pretty());
    ranks_first(&r, "leak_pages");
    assert_eq!(r.leaks()[0]["kind"], "growth");
    // The cache is written 20 times but grows once: 1 MiB and its header page.
    assert_eq!(
        bytes(&through(&r, "cache_fill")),
        257 * 4096,
        "{}",
        r.pretty()
    );
    // Freed blocks went back with munmap, the small ones with brk/madvise: not growth.
    assert_eq!(bytes(&through(&r, "churn_big")), 0, "{}", r.pretty());
    assert!(
        bytes(&through(&r, "brk_churn")) < 256 << 10,
        "{}",
        r.pretty()
    );
    // Pages written by churn_big were seen, then given back.
    assert!(r.summary("allocs") >= 40 * 65 + 30 * 256, "{}", r.pretty());
}

/// A fault that maps a transparent huge page gives the process 2 MiB, not a page: what a
/// fault added is read from the process's memory counts (`kmem:rss_stat`), not assumed.
#[test]
fn a_fault_that_maps_a_huge_page_is_charged_2_mib() {
    if !privileged() {
        return;
    }
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        eprintln!("transparent huge pages are off here: nothing to check");
        return;
    }
    let (run, r) = trace_json(&c_fixture("growth_thp"), &["--mode", "growth"], &[]);
    // The fixture exits 3 when the kernel did not map its region with huge pages.
    assert!(run.status.success(), "no huge pages mapped? {}", run.stderr);
    assert_eq!(r.summary("lost_events"), 0);
    // Four faults, 2 MiB each; a page per fault would be 16 KiB.
    assert_eq!(bytes(&through(&r, "touch_huge")), 8 << 20, "{}", r.pretty());
    ranks_first(&r, "touch_huge");
}

/// Pages the kernel first writes for the process (a `read` into an untouched buffer) are
/// growth too, charged to the stack of the system call that asked for them.
#[test]
fn pages_the_kernel_fills_for_a_read_belong_to_the_read() {
    if !privileged() {
        return;
    }
    let (run, r) = trace_json(&c_fixture("growth_read"), &["--mode", "growth"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(r.summary("lost_events"), 0);
    // The 8 MiB read into the buffer, at the line of the read() call; malloc's and printf's
    // own pages are other lines' rows.
    let source =
        std::fs::read_to_string(common::workspace().join("tests/fixtures/growth_read.c")).unwrap();
    let read_line = 1 + source
        .lines()
        .position(|l| l.contains("read(fd, p + got"))
        .unwrap() as u64;
    let at_read: Vec<_> = r
        .leaks()
        .iter()
        .filter(|l| {
            common::frame(l, 0)["symbol"] == "fill_by_read"
                && common::frame(l, 0)["line"] == read_line
        })
        .collect();
    assert_eq!(bytes(&at_read), 8 << 20, "{}", r.pretty());
    ranks_first(&r, "fill_by_read");
}
