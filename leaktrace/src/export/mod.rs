//! Writers: one module per output format, each an [`Exporter`] that takes a finished
//! [`Report`] and returns its bytes (text for all but pprof). [`Format::exporter`] picks one.
//! [`diff`] writes what `leaktrace diff` found between two reports.
use std::{fs, io, io::Write as _, path::Path};

use crate::report::Report;

pub mod diff;
pub mod folded;
pub mod html;
pub mod json;
pub mod metrics;
pub mod pprof;
pub mod svg;
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
    /// A gzipped pprof heap profile (binary: needs --output) for `go tool pprof`, Parca or
    /// Pyroscope.
    Pprof,
    /// One self-contained page for a browser (needs --output or a pipe): flame graphs,
    /// growth charts, the ranked stacks with verdicts, OOM kills, lost events.
    Html,
    /// The flame graph alone, as SVG (the stacks of --folded-kind, by --folded-weight).
    Svg,
}

impl Format {
    /// True for formats that are not text.
    pub fn is_binary(self) -> bool {
        self == Format::Pprof
    }

    /// Why this format is not written to a terminal (`--format pprof` without `-o`): a
    /// binary profile, or a document meant for a browser that a terminal would only scroll
    /// past. `None` for the formats people read there.
    pub fn not_for_terminal(self) -> Option<&'static str> {
        match self {
            Format::Pprof => Some(
                "--format pprof is a binary profile: write it to a file with -o FILE (or pipe it)",
            ),
            Format::Html => Some(
                "--format html is a page for a browser: write it to a file with -o report.html (or pipe it)",
            ),
            Format::Svg => Some(
                "--format svg is a drawing for a browser: write it to a file with -o flame.svg (or pipe it)",
            ),
            Format::Table | Format::Json | Format::Folded => None,
        }
    }
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
pub fn to_path(path: &Path, text: impl AsRef<[u8]>) -> io::Result<()> {
    let text = text.as_ref();
    let in_place = fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file());
    if in_place {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)?;
        return f.write_all(text);
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

/// Which stacks folded output shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FoldedKind {
    /// Heap leaks.
    #[default]
    Heap,
    /// Descriptors still open.
    Fd,
    /// Temp files still on disk.
    Tmp,
}

/// Turns a finished report into bytes; one implementation per output format.
pub trait Exporter {
    /// The report as this format writes it: UTF-8 text, except for binary formats (pprof).
    fn export(&self, report: &Report) -> Vec<u8>;

    /// The HTTP `Content-Type` of what [`export`](Self::export) returns.
    fn content_type(&self) -> &'static str {
        "text/plain; charset=utf-8"
    }
}

impl Format {
    /// The exporter of this format; folded output and the SVG flame graph are weighted by
    /// `weight` and show the stacks of `kind` (the other formats show everything).
    pub fn exporter(self, weight: FoldedWeight, kind: FoldedKind) -> Box<dyn Exporter> {
        match self {
            Format::Table => Box::new(table::Table),
            Format::Json => Box::new(json::Json),
            Format::Folded => Box::new(folded::Folded { weight, kind }),
            Format::Pprof => Box::new(pprof::Pprof::default()),
            Format::Html => Box::new(html::Html),
            Format::Svg => Box::new(svg::Svg { weight, kind }),
        }
    }
}

/// Renders a report in `format` (see [`Format::exporter`]).
pub fn render_bytes(
    report: &Report,
    format: Format,
    weight: FoldedWeight,
    kind: FoldedKind,
) -> Vec<u8> {
    format.exporter(weight, kind).export(report)
}

/// Renders a report in a text `format` (see [`Format::exporter`]); a binary format's bytes
/// come out mangled, use [`render_bytes`] for those.
pub fn render(report: &Report, format: Format, weight: FoldedWeight, kind: FoldedKind) -> String {
    String::from_utf8(render_bytes(report, format, weight, kind))
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
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
pub(crate) mod golden {
    //! Each writer against a file of expected output. `UPDATE_GOLDEN=1 cargo test` rewrites
    //! them; review the diff.
    use super::*;
    use crate::{
        report::{
            FdExhaustion, FdHolder, FdLeak, Frame, GrowthSample, HeapHolder, Leak, OomKill, Owner,
            Summary, TmpLeak,
            verdict::{self, Sample, Verdict},
        },
        track::held::Held,
    };

    fn frame(addr: u64, symbol: Option<&str>, module: &str, file: Option<(&str, u32)>) -> Frame {
        Frame {
            addr,
            symbol: symbol.map(str::to_owned),
            module: Some(module.to_owned()),
            file: file.map(|(f, _)| f.rsplit('/').next().unwrap().to_owned()),
            line: file.map(|(_, l)| l),
            path: file.map(|(f, _)| f.to_owned()),
            offset: Some(addr & 0xffff),
            inlined: false,
        }
    }

    const APP: &str = "/srv/app/bin/cache-server";

    /// A frame of the traced program, with its symbol and source line.
    fn app_frame(addr: u64, symbol: &str, file: &str, line: u32) -> Frame {
        frame(addr, Some(symbol), APP, Some((file, line)))
    }

    /// A report with a row of every kind, for the exporters' and the server's tests.
    pub(crate) fn sample() -> Report {
        let main = app_frame(0x5555_0000_1300, "main", "/src/main.c", 88);
        let loader = app_frame(0x5555_0000_1400, "load_geofence", "/src/geo.c", 40);
        let insert = app_frame(0x5555_0000_1234, "cache_insert", "/src/cache.c", 17);
        Report {
            summary: summary(),
            leaks: heap_leaks(&main),
            runtime: vec![],
            fd_leaks: fd_leaks(&loader, &main),
            fd_exhaustion: vec![fd_exhaustion(&loader, &main)],
            tmp_leaks: vec![tmp_leak(&loader, &main)],
            oom_kills: vec![oom_kill(&insert, &main)],
            growth: vec![],
            tier2: vec![],
            notices: vec![],
            build_ids: Default::default(),
            is_final: true,
        }
    }

    /// A verdict drawn from a series of `values` reported every 10 s.
    fn trend(values: &[u64], unit: &'static str) -> Option<Verdict> {
        let series: Vec<Sample> = values
            .iter()
            .enumerate()
            .map(|(i, &value)| Sample {
                t_s: 10.0 * (i + 1) as f64,
                value,
                oldest_s: 10.0 * (i + 1) as f64,
            })
            .collect();
        Some(verdict::judge(&series, None, unit))
    }

    /// `count` blocks of every age up to the rows' oldest, 42.5 s, of 1 KiB to 4 KiB.
    fn held(count: u64) -> Held {
        let mut h = Held::new();
        for i in 0..count {
            h.record((i * 42_500 / (count - 1).max(1)) as u32, 1024 << (i % 3));
        }
        h
    }

    fn heap_leak(count: u64, bytes: u64, at_exit: bool, frames: Vec<Frame>) -> Leak {
        // 2 KiB/s, as `growth_bytes_per_s` says, over 8 reports 10 s apart.
        let growth: Vec<u64> = (0..8).map(|i| bytes - (7 - i) * 20_480).collect();
        Leak {
            kind: "heap",
            pid: 4242,
            processes: 1,
            pids: vec![4242],
            owner: Owner::named("cache-server"),
            outstanding_count: count,
            outstanding_bytes: bytes,
            allocs: count + 10,
            frees: 10,
            oldest_age_s: 42.5,
            at_exit,
            growth_bytes_per_s: (!at_exit).then_some(2048.0),
            held: Some(held(count)),
            trend: (!at_exit).then(|| trend(&growth, "bytes")).flatten(),
            truncated: false,
            frames,
            site: 0,
        }
    }

    /// One leak still growing, and one left at exit whose innermost frame has no symbol.
    fn heap_leaks(main: &Frame) -> Vec<Leak> {
        vec![
            heap_leak(
                4000,
                8 << 20,
                false,
                vec![
                    app_frame(0x5555_0000_1234, "cache_insert", "/src/cache.c", 17),
                    app_frame(0x5555_0000_1280, "handle_request", "/src/server.c", 301),
                    main.clone(),
                ],
            ),
            heap_leak(
                567,
                1 << 20,
                true,
                vec![
                    frame(0x7f00_0000_4321, None, "/usr/lib/libplugin.so", None),
                    app_frame(0x5555_0000_1290, "load_plugin; v2", "/src/plugin.c", 9),
                    main.clone(),
                ],
            ),
        ]
    }

    fn fd_exhaustion(loader: &Frame, main: &Frame) -> FdExhaustion {
        FdExhaustion {
            pid: 4242,
            comm: "cache-server".into(),
            errno: "EMFILE",
            limit: Some(1024),
            open: 1021,
            count: 3,
            at_s: 58.5,
            frames: vec![main.clone()],
            top_holders: vec![FdHolder {
                outstanding: 847,
                fd_kind: "file",
                frames: vec![loader.clone(), main.clone()],
            }],
        }
    }

    fn tmp_leak(loader: &Frame, main: &Frame) -> TmpLeak {
        TmpLeak {
            pid: 4242,
            processes: 1,
            pids: vec![4242],
            owner: Owner::named("cache-server"),
            files: 1247,
            bytes: 5 << 20,
            paths: vec!["/tmp/chunk-a1b2c3".into()],
            oldest_age_s: 50.0,
            trend: trend(&[400, 800, 0, 400, 800, 0, 400, 1247], "files"),
            truncated: false,
            frames: vec![loader.clone(), main.clone()],
            site: 0,
        }
    }

    fn summary() -> Summary {
        Summary {
            allocs: 1_234_567,
            frees: 1_230_000,
            outstanding_count: 4567,
            outstanding_bytes: 9 << 20,
            unmatched_frees: 3,
            lost_events: 0,
            elapsed_s: 60.0,
            mode: "full",
            tracer: crate::report::TracerUsage {
                cpu_s: 1.25,
                peak_rss_bytes: 60 << 20,
            },
            fds_opened: 912,
            fds_closed: 53,
            fds_outstanding: 859,
            tmp_files_created: 1300,
            tmp_files_outstanding: 1247,
            ..Default::default()
        }
    }

    fn fd_leaks(loader: &Frame, main: &Frame) -> Vec<FdLeak> {
        vec![
            FdLeak {
                pid: 4242,
                processes: 1,
                pids: vec![4242],
                owner: Owner::named("cache-server"),
                outstanding: 847,
                fd_kind: "file",
                paths: vec!["/srv/geo/zone-1.json".into(), "/srv/geo/zone-2.json".into()],
                opened: 900,
                closed: 53,
                oldest_age_s: 30.0,
                at_exit: false,
                trend: trend(&[847, 847, 846, 847, 847, 847], "descriptors"),
                truncated: false,
                frames: vec![loader.clone(), main.clone()],
                site: 0,
            },
            FdLeak {
                pid: 4242,
                processes: 1,
                pids: vec![4242],
                owner: Owner::named("cache-server"),
                outstanding: 12,
                fd_kind: "socket",
                paths: vec![],
                opened: 12,
                closed: 0,
                oldest_age_s: 12.0,
                at_exit: true,
                trend: None,
                truncated: false,
                frames: vec![main.clone()],
                site: 0,
            },
        ]
    }

    fn oom_kill(insert: &Frame, main: &Frame) -> OomKill {
        OomKill {
            pid: 4242,
            comm: "cache-server".into(),
            cgroup: Some("/kubepods/burstable/pod1234/abcdef".into()),
            container_id: Some("abcdef".into()),
            pod_uid: Some("1234".into()),
            namespace: None,
            pod: None,
            container_name: None,
            rss_bytes: 64 << 20,
            anon_rss_bytes: 60 << 20,
            limit_bytes: Some(64 << 20),
            oom_score_adj: 0,
            traced: true,
            time: "2026-11-24T03:00:00Z".into(),
            frames_top: vec![insert.clone(), main.clone()],
            heap_top: vec![HeapHolder {
                outstanding_bytes: 50 << 20,
                outstanding_count: 50,
                frames: vec![insert.clone(), main.clone()],
            }],
            fd_top: vec![],
            growth: vec![
                GrowthSample {
                    t_s: -10.0,
                    outstanding_bytes: 40 << 20,
                },
                GrowthSample {
                    t_s: 0.0,
                    outstanding_bytes: 50 << 20,
                },
            ],
            growth_bytes_per_s: Some(1_048_576.0),
        }
    }

    fn check(name: &str, got: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/export/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            fs::write(&path, got).unwrap();
        }
        let want = fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            got, want,
            "{name} differs from its golden file (UPDATE_GOLDEN=1 to accept)"
        );
    }

    #[test]
    fn table_report() {
        check(
            "report.txt",
            &render(
                &sample(),
                Format::Table,
                FoldedWeight::Bytes,
                FoldedKind::Heap,
            ),
        );
    }

    #[test]
    fn json_report() {
        let text = render(
            &sample(),
            Format::Json,
            FoldedWeight::Bytes,
            FoldedKind::Heap,
        );
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

    /// A row whose site is not its first frame keeps the frames before it (the allocator's
    /// and the runtime's) in every format; the table marks the site.
    #[test]
    fn frames_before_the_site_are_in_every_format() {
        let mut r = sample();
        let leak = &mut r.leaks[0];
        leak.frames.splice(
            0..0,
            [
                frame(0x7f00_0000_1000, Some("malloc"), "/usr/lib/libc.so.6", None),
                frame(
                    0x7f00_0000_2000,
                    Some("operator new(unsigned long)"),
                    "/usr/lib/libstdc++.so.6",
                    None,
                ),
            ],
        );
        leak.site = 2;
        let table = render(&r, Format::Table, FoldedWeight::Bytes, FoldedKind::Heap);
        for line in [
            "     0 0x7f0000001000 malloc in libc.so.6\n",
            "     1 0x7f0000002000 operator new(unsigned long) in libstdc++.so.6\n",
            "  >  2 0x555500001234 cache_insert at cache.c:17 in cache-server\n",
            "     3 0x555500001280 handle_request at server.c:301 in cache-server\n",
        ] {
            assert!(table.contains(line), "{line:?} not in\n{table}");
        }
        // Rows whose site is their first frame are not marked.
        assert_eq!(table.matches("  > ").count(), 1, "{table}");
        let folded = render(&r, Format::Folded, FoldedWeight::Bytes, FoldedKind::Heap);
        assert!(
            folded.contains(
                "main;handle_request;cache_insert;operator\u{a0}new(unsigned\u{a0}long);malloc 8388608\n"
            ),
            "{folded}"
        );
        let json: serde_json::Value = serde_json::from_str(&render(
            &r,
            Format::Json,
            FoldedWeight::Bytes,
            FoldedKind::Heap,
        ))
        .unwrap();
        assert_eq!(json["leaks"][0]["site"], 2);
        assert_eq!(json["leaks"][0]["frames"][0]["symbol"], "malloc");
        assert_eq!(json["leaks"][0]["frames"][2]["symbol"], "cache_insert");
        assert_eq!(json["leaks"][1]["site"], 0);
        let profile = pprof::Pprof::default().profile(&r);
        let names: Vec<&str> = profile
            .function
            .iter()
            .map(|f| profile.string_table[f.name as usize].as_str())
            .collect();
        for name in ["malloc", "operator new(unsigned long)", "cache_insert"] {
            assert!(names.contains(&name), "{name} not in {names:?}");
        }
    }

    #[test]
    fn folded_report_by_bytes_and_by_count() {
        let bytes = render(
            &sample(),
            Format::Folded,
            FoldedWeight::Bytes,
            FoldedKind::Heap,
        );
        check("report.folded", &bytes);
        let count = render(
            &sample(),
            Format::Folded,
            FoldedWeight::Count,
            FoldedKind::Heap,
        );
        let weights: Vec<&str> = count
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(weights, ["4000", "567"]);
    }

    #[test]
    fn folded_descriptors_and_temp_files() {
        let fd = render(
            &sample(),
            Format::Folded,
            FoldedWeight::Bytes,
            FoldedKind::Fd,
        );
        assert_eq!(fd, "main 12\nmain;load_geofence 847\n");
        let tmp = |weight| render(&sample(), Format::Folded, weight, FoldedKind::Tmp);
        assert_eq!(tmp(FoldedWeight::Bytes), "main;load_geofence 5242880\n");
        assert_eq!(tmp(FoldedWeight::Count), "main;load_geofence 1247\n");
    }

    #[test]
    fn json_carries_the_other_kinds_of_leak() {
        let text = render(
            &sample(),
            Format::Json,
            FoldedWeight::Bytes,
            FoldedKind::Heap,
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let fd = &v["fd_leaks"][0];
        assert_eq!(
            (fd["pid"].as_u64(), fd["outstanding"].as_u64()),
            (Some(4242), Some(847))
        );
        assert_eq!(fd["fd_kind"], "file");
        assert_eq!(fd["paths"][0], "/srv/geo/zone-1.json");
        assert_eq!(fd["frames"][0]["symbol"], "load_geofence");
        let x = &v["fd_exhaustion"][0];
        assert_eq!(
            (x["errno"].as_str(), x["limit"].as_u64()),
            (Some("EMFILE"), Some(1024))
        );
        assert_eq!(x["top_holders"][0]["outstanding"], 847);
        assert!(x["top_holders"][0]["frames"].is_array());
        let t = &v["tmp_leaks"][0];
        assert_eq!(
            (t["files"].as_u64(), t["bytes"].as_u64()),
            (Some(1247), Some(5 << 20))
        );
        assert_eq!(t["paths"][0], "/tmp/chunk-a1b2c3");
        let o = &v["oom_kills"][0];
        assert_eq!(
            (o["pid"].as_u64(), o["comm"].as_str()),
            (Some(4242), Some("cache-server"))
        );
        assert_eq!(o["container_id"], "abcdef");
        assert_eq!(
            (o["rss_bytes"].as_u64(), o["limit_bytes"].as_u64()),
            (Some(64 << 20), Some(64 << 20))
        );
        assert_eq!(o["traced"], true);
        assert_eq!(o["frames_top"][0]["symbol"], "cache_insert");
        assert!(o["cgroup"].is_string());
    }
}
