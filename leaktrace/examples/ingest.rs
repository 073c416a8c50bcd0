//! The user-space pipeline alone, on one core: how many records a second it decodes and
//! applies to the outstanding tables (the work the session does per ring-buffer record),
//! and how much memory the tables take per outstanding allocation.
//!
//! The feed is a synthetic ring-buffer image: the kernel side's records, encoded byte for
//! byte, back to back as `RingBuf::next` hands them over. Used by `cargo xtask bench`;
//! prints one JSON object.
//!
//! `cargo run --release --example ingest -- [EVENTS] [OUTSTANDING...]`
use std::{hint::black_box, time::Instant};

use leaktrace::{
    decode::{Event, decode, encode},
    track::heap::HeapTables,
};
use leaktrace_common::{AllocEvent, FreeEvent, Header, alloc_shape, kind};

const PID: u32 = 4242;
/// Distinct stacks in the feed (the stack store is not what is measured).
const STACKS: u64 = 1024;

fn header(kind: u16, ts_ns: u64) -> Header {
    Header {
        kind,
        flags: 0,
        pid: PID,
        tid: PID,
        _pad: 0,
        ts_ns,
    }
}

fn alloc(addr: u64, size: u64, n: u64) -> Vec<u8> {
    encode::alloc(&AllocEvent {
        hdr: header(kind::ALLOC, n),
        addr,
        size,
        old_addr: 0,
        stack_id: 1 + n % STACKS,
        shape: alloc_shape::SIZE,
        _pad: 0,
    })
}

fn free(addr: u64, n: u64) -> Vec<u8> {
    encode::free(&FreeEvent {
        hdr: header(kind::FREE, n),
        addr,
    })
}

/// The session's per-record work for heap records.
fn apply(tables: &mut HeapTables, record: &[u8]) {
    match decode(record) {
        Ok(Event::Alloc(e)) => tables.alloc(&e),
        Ok(Event::Free(e)) => tables.free(&e),
        _ => {}
    }
}

/// Resident bytes of this process.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Records per second through decode + tables: malloc/free churn over a live set of 1024
/// blocks, the shape of the churn benchmark.
fn throughput(events: u64) -> f64 {
    // Build the feed first, as one buffer: reading it is what a ring buffer read costs.
    let live = 1024u64;
    let mut feed: Vec<u8> = Vec::new();
    let mut offsets: Vec<(usize, usize)> = Vec::new();
    let mut push = |bytes: Vec<u8>, feed: &mut Vec<u8>| {
        offsets.push((feed.len(), bytes.len()));
        feed.extend_from_slice(&bytes);
    };
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for n in 0..events / 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let addr = 0x5555_0000_0000 + (x % live) * 4096;
        push(free(addr, n), &mut feed);
        push(alloc(addr, 16 + x % 2048, n), &mut feed);
    }
    let mut tables = HeapTables::new(0);
    let started = Instant::now();
    for &(at, len) in &offsets {
        apply(&mut tables, black_box(&feed[at..at + len]));
    }
    let secs = started.elapsed().as_secs_f64();
    black_box(tables.totals());
    offsets.len() as f64 / secs
}

/// Bytes of table memory per outstanding allocation with `n` outstanding (RSS growth).
fn bytes_per_outstanding(n: u64) -> f64 {
    let mut tables = HeapTables::new(0);
    let before = rss_bytes();
    for i in 0..n {
        apply(&mut tables, &alloc(0x7000_0000_0000 + i * 32, 16, i));
    }
    let after = rss_bytes();
    black_box(tables.totals());
    after.saturating_sub(before) as f64 / n as f64
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let events = args.first().copied().unwrap_or(20_000_000);
    let outstanding: Vec<u64> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![1_000_000, 10_000_000]
    };
    let rate = throughput(events);
    let memory: Vec<String> = outstanding
        .iter()
        .map(|&n| {
            format!(
                "{{\"outstanding\":{n},\"bytes_per_alloc\":{:.1}}}",
                bytes_per_outstanding(n)
            )
        })
        .collect();
    println!(
        "{{\"events\":{events},\"events_per_s\":{rate:.0},\"memory\":[{}]}}",
        memory.join(",")
    );
}
