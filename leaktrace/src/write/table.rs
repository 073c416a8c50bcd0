//! The human report: a summary line, then each leaking stack with its figures and frames.
use std::fmt::Write as _;

use crate::report::{Leak, Report};

/// `1.5 MiB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `12,345`-style counts.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn age(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1}s")
    } else if s < 7200.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

fn leak(out: &mut String, rank: usize, l: &Leak) {
    let when = if l.at_exit {
        "in use at exit"
    } else {
        "outstanding"
    };
    let _ = write!(
        out,
        "#{rank} {} in {} blocks {when} — pid {} ({}), allocs {}, frees {}, oldest {}",
        bytes(l.outstanding_bytes),
        count(l.outstanding_count),
        l.pid,
        l.comm,
        count(l.allocs),
        count(l.frees),
        age(l.oldest_age_s),
    );
    if let Some(g) = l.growth_bytes_per_s {
        let sign = if g < 0.0 { "-" } else { "+" };
        let _ = write!(out, ", growth {sign}{}/s", bytes(g.abs() as u64));
    }
    out.push('\n');
    for (i, f) in l.frames.iter().enumerate() {
        let symbol = f.symbol.as_deref().unwrap_or("??");
        let _ = write!(out, "    {i:>2} {} {symbol}", f.addr);
        if f.inlined {
            out.push_str(" (inlined)");
        }
        if let (Some(file), Some(line)) = (&f.file, f.line) {
            let _ = write!(out, " at {file}:{line}");
        }
        match (&f.module, &f.offset) {
            (Some(m), Some(o)) if f.symbol.is_none() => {
                let _ = write!(out, " in {m}+{o}");
            }
            (Some(m), _) => {
                let _ = write!(out, " in {}", m.rsplit('/').next().unwrap_or(m));
            }
            _ => {}
        }
        out.push('\n');
    }
    if l.truncated {
        out.push_str("       … stack truncated or incomplete\n");
    }
}

pub fn render(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leaktrace {} after {}: {} allocs, {} frees, {} outstanding in {} blocks, {} unmatched frees, {} lost events",
        if report.is_final {
            "final report"
        } else {
            "report"
        },
        age(s.elapsed_s),
        count(s.allocs),
        count(s.frees),
        bytes(s.outstanding_bytes),
        count(s.outstanding_count),
        count(s.unmatched_frees),
        count(s.lost_events),
    );
    if s.lost_events > 0 {
        let causes: Vec<String> = s
            .lost_by_cause
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "warning: {} events were lost ({}); counts are lower bounds — try a larger --ring-buffer",
            count(s.lost_events),
            causes.join(", ")
        );
    }
    if report.leaks.is_empty() {
        let _ = writeln!(
            out,
            "no outstanding allocations{}",
            if s.min_age_s > 0.0 {
                format!(" older than {}", age(s.min_age_s))
            } else {
                String::new()
            }
        );
    }
    for (i, l) in report.leaks.iter().enumerate() {
        out.push('\n');
        leak(&mut out, i + 1, l);
    }
    if s.runtime_outstanding_count > 0 {
        let _ = writeln!(
            out,
            "\n(not counted: {} in {} blocks held by the C/C++ runtime for itself — stdio buffers, locale, thread data — released at exit)",
            bytes(s.runtime_outstanding_bytes),
            count(s.runtime_outstanding_count),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(100), "100");
    }
}
