//! Writers: one module per output format. Each takes a finished [`Report`] and returns text.
use std::{fs, io, io::Write as _, path::Path};

use crate::report::Report;

pub mod folded;
pub mod json;
pub mod table;

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A ranked, human-readable report.
    Table,
    /// One JSON document per report (one line each).
    Json,
    /// Folded stacks for flamegraph.pl or inferno: `root;…;leaf weight`.
    Folded,
}

/// What folded lines are weighted by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FoldedWeight {
    /// Outstanding bytes.
    #[default]
    Bytes,
    /// Outstanding blocks.
    Count,
}

/// Writes a rendered report to `path` so that it always holds one complete report: a
/// regular file (or a new one) is replaced atomically through a temporary file beside it.
/// Anything else is written in place and never replaced: a device such as `/dev/null`, a
/// FIFO, or a symbolic link (written through).
pub fn to_path(path: &Path, text: &str) -> io::Result<()> {
    let in_place = fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file());
    if in_place {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)?;
        return f.write_all(text.as_bytes());
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("the output path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renders a report in `format`.
pub fn render(report: &Report, format: Format, weight: FoldedWeight) -> String {
    match format {
        Format::Table => table::render(report),
        Format::Json => json::render(report),
        Format::Folded => folded::render(report, weight),
    }
}

#[cfg(test)]
mod output_file {
    use std::os::unix::fs::FileTypeExt as _;

    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("leaktrace-out-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_regular_file_is_replaced_whole_and_no_temporary_is_left() {
        let dir = scratch("regular");
        let path = dir.join("report.json");
        to_path(&path, "first, longer report\n").unwrap();
        to_path(&path, "second\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "second\n");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_symlink_is_written_through_not_replaced() {
        let dir = scratch("symlink");
        let target = dir.join("target.txt");
        let link = dir.join("link.txt");
        fs::write(&target, "old old old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        to_path(&link, "new").unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_device_or_fifo_is_written_in_place() {
        // A FIFO stands in for /dev/null: replacing either with a regular file would break
        // every program on the machine that writes there.
        let dir = scratch("fifo");
        let fifo = dir.join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read_to_string(fifo).unwrap())
        };
        to_path(&fifo, "through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), "through the pipe");
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        to_path(Path::new("/dev/null"), "discarded").unwrap();
        assert!(
            fs::metadata("/dev/null")
                .unwrap()
                .file_type()
                .is_char_device()
        );
        fs::remove_dir_all(dir).unwrap();
    }
}

#[cfg(test)]
mod golden {
    //! Each writer against a file of expected output. `UPDATE_GOLDEN=1 cargo test` rewrites
    //! them; review the diff.
    use super::*;
    use crate::report::{Frame, Leak, Summary};

    fn frame(addr: u64, symbol: Option<&str>, module: &str, file: Option<(&str, u32)>) -> Frame {
        Frame {
            addr: format!("{addr:#x}"),
            symbol: symbol.map(str::to_owned),
            module: Some(module.to_owned()),
            file: file.map(|(f, _)| f.rsplit('/').next().unwrap().to_owned()),
            line: file.map(|(_, l)| l),
            path: file.map(|(f, _)| f.to_owned()),
            offset: Some(format!("{:#x}", addr & 0xffff)),
            inlined: false,
        }
    }

    fn sample() -> Report {
        let app = "/srv/app/bin/cache-server";
        let leak = |pid, count, bytes, at_exit, frames| Leak {
            kind: "heap",
            pid,
            comm: "cache-server".into(),
            outstanding_count: count,
            outstanding_bytes: bytes,
            allocs: count + 10,
            frees: 10,
            oldest_age_s: 42.5,
            at_exit,
            growth_bytes_per_s: (!at_exit).then_some(2048.0),
            truncated: false,
            frames,
        };
        let main = frame(
            0x5555_0000_1300,
            Some("main"),
            app,
            Some(("/src/main.c", 88)),
        );
        Report {
            summary: Summary {
                allocs: 1_234_567,
                frees: 1_230_000,
                outstanding_count: 4567,
                outstanding_bytes: 9 << 20,
                unmatched_frees: 3,
                lost_events: 0,
                elapsed_s: 60.0,
                ..Default::default()
            },
            leaks: vec![
                leak(
                    4242,
                    4000,
                    8 << 20,
                    false,
                    vec![
                        frame(
                            0x5555_0000_1234,
                            Some("cache_insert"),
                            app,
                            Some(("/src/cache.c", 17)),
                        ),
                        frame(
                            0x5555_0000_1280,
                            Some("handle_request"),
                            app,
                            Some(("/src/server.c", 301)),
                        ),
                        main.clone(),
                    ],
                ),
                leak(
                    4242,
                    567,
                    1 << 20,
                    true,
                    vec![
                        frame(0x7f00_0000_4321, None, "/usr/lib/libplugin.so", None),
                        frame(
                            0x5555_0000_1290,
                            Some("load_plugin; v2"),
                            app,
                            Some(("/src/plugin.c", 9)),
                        ),
                        main,
                    ],
                ),
            ],
            runtime: vec![],
            is_final: true,
        }
    }

    fn check(name: &str, got: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/write/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            got, want,
            "{name} differs from its golden file (UPDATE_GOLDEN=1 to accept)"
        );
    }

    #[test]
    fn table_report() {
        check(
            "report.txt",
            &render(&sample(), Format::Table, FoldedWeight::Bytes),
        );
    }

    #[test]
    fn json_report() {
        let text = render(&sample(), Format::Json, FoldedWeight::Bytes);
        assert_eq!(text.lines().count(), 1, "one report, one line");
        check("report.json", &text);
        // The contract's keys, by name.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "allocs",
            "frees",
            "outstanding_count",
            "outstanding_bytes",
            "unmatched_frees",
            "lost_events",
        ] {
            assert!(v["summary"][key].is_u64(), "summary.{key}");
        }
        let leak = &v["leaks"][0];
        for key in [
            "pid",
            "outstanding_count",
            "outstanding_bytes",
            "allocs",
            "frees",
        ] {
            assert!(leak[key].is_u64(), "leaks[].{key}");
        }
        assert_eq!(leak["kind"], "heap");
        assert!(leak["oldest_age_s"].is_f64());
        let f = &leak["frames"][0];
        assert_eq!(
            (f["addr"].as_str(), f["symbol"].as_str()),
            (Some("0x555500001234"), Some("cache_insert"))
        );
        assert_eq!(
            (f["file"].as_str(), f["line"].as_u64()),
            (Some("cache.c"), Some(17))
        );
        assert_eq!(f["module"], "/srv/app/bin/cache-server");
        assert!(v["leaks"][1]["frames"][0]["symbol"].is_null());
    }

    #[test]
    fn folded_report_by_bytes_and_by_count() {
        let bytes = render(&sample(), Format::Folded, FoldedWeight::Bytes);
        check("report.folded", &bytes);
        let count = render(&sample(), Format::Folded, FoldedWeight::Count);
        let weights: Vec<&str> = count
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(weights, ["4000", "567"]);
    }
}
