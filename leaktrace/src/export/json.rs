//! The JSON report: the contract scripts and acceptance checks read.
//!
//! `{"summary": {...}, "leaks": [{"kind": "heap", "pid", "outstanding_count",
//! "outstanding_bytes", "allocs", "frees", "oldest_age_s", "frames": [{"addr", "symbol",
//! "module", "file", "line"}, ...]}, ...]}`; more keys may be added, none renamed.
use crate::{export::Exporter, report::Report};

/// One line of JSON per report, newline-terminated.
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl Exporter for Json {
    fn export(&self, report: &Report) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        let mut out =
            serde_json::to_string(report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        out.push('\n');
        out.into_bytes()
    }

    fn content_type(&self) -> &'static str {
        "application/json"
    }
}
