//! The HTML report in a real browser: leaktrace traces a leaking fixture and writes
//! `--format html`, then headless chromium loads the page. It must log nothing on its console
//! (inferno's script runs in each flame graph's frame), its DOM must name the leaking function
//! with its verdict, and a screenshot must show the flame graph and the chart drawn.
//!
//! Needs root (tracing) and chromium (`cargo xtask setup` installs it). Without chromium the
//! test is skipped with a note, unless `LEAKTRACE_TEST_REQUIRE_ROOT=1` (`cargo xtask test`).
mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Background, c_fixture, leaktrace, privileged};

/// The browser, or `None` (with a note) when it is missing and may be.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
            .map(|_| PathBuf::from(name))
    });
    if found.is_none() {
        if std::env::var("LEAKTRACE_TEST_REQUIRE_ROOT").is_ok_and(|v| v == "1") {
            panic!("chromium is missing: `cargo xtask setup` installs it");
        }
        eprintln!("skipped: chromium is not installed (`cargo xtask setup` installs it)");
    }
    found
}

/// A scratch directory of this test run.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("html-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What headless chromium did with a page: its stdout and its log (stderr).
struct Browsed {
    stdout: String,
    log: String,
}

impl Browsed {
    /// The page's console messages, as chromium logs them (every level is logged as INFO
    /// here, errors too: any line is one the page should not have).
    fn console(&self) -> Vec<&str> {
        self.log
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .collect()
    }
}

/// Loads `page` in headless chromium with `args` (`--dump-dom`, `--screenshot=…`), with a
/// profile of its own (tests run in parallel) and time for the pages' timers to run.
fn browse(browser: &Path, page: &Path, dir: &Path, args: &[&str]) -> Browsed {
    let profile = dir.join(format!("profile-{}", args.join("").len()));
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let log = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut s).unwrap();
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let (stdout, log) = (stdout.join().unwrap(), log.join().unwrap());
            assert!(status.success(), "chromium failed ({status}):\n{log}");
            return Browsed { stdout, log };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A decoded RGB(A) screenshot.
struct Shot {
    width: usize,
    height: usize,
    channels: usize,
    pixels: Vec<u8>,
}

impl Shot {
    fn load(path: &Path) -> Self {
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let channels = match info.color_type {
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            other => panic!("a {other:?} screenshot"),
        };
        pixels.truncate(info.buffer_size());
        Self {
            width: info.width as usize,
            height: info.height as usize,
            channels,
            pixels,
        }
    }

    /// The pixels `keep` accepts: how many, and their bounding box `(x0, y0, x1, y1)`.
    fn find(&self, keep: impl Fn(u8, u8, u8) -> bool) -> (usize, (usize, usize, usize, usize)) {
        let (mut n, mut bbox) = (0, (usize::MAX, usize::MAX, 0, 0));
        for y in 0..self.height {
            for x in 0..self.width {
                let i = (y * self.width + x) * self.channels;
                let p = &self.pixels[i..i + 3];
                if keep(p[0], p[1], p[2]) {
                    n += 1;
                    bbox = (bbox.0.min(x), bbox.1.min(y), bbox.2.max(x), bbox.3.max(y));
                }
            }
        }
        (n, bbox)
    }
}

/// Within `tolerance` of `rgb` on every channel.
fn near(rgb: (u8, u8, u8), tolerance: u8) -> impl Fn(u8, u8, u8) -> bool {
    move |r, g, b| {
        r.abs_diff(rgb.0) <= tolerance
            && g.abs_diff(rgb.1) <= tolerance
            && b.abs_diff(rgb.2) <= tolerance
    }
}

/// That a page's error would be seen at all: chromium's log carries it.
fn errors_are_seen(browser: &Path, dir: &Path) {
    let broken = dir.join("broken.html");
    std::fs::write(
        &broken,
        "<!DOCTYPE html><html><body><p>x</p><script>no_such_function();</script></body></html>",
    )
    .unwrap();
    let seen = browse(browser, &broken, dir, &["--dump-dom"]);
    assert!(
        seen.console()
            .iter()
            .any(|l| l.contains("Uncaught ReferenceError: no_such_function is not defined")),
        "chromium did not report the broken page's error; its log:\n{}",
        seen.log
    );
}

/// The page in the browser: nothing on its console; in its DOM, the first row of the heap
/// table is `function` with `verdict`, one flame graph per kind in `flames`, a heap chart
/// with the stack's line; on a screenshot, the flame graph drawn page-wide in inferno's hot
/// colours, below the chart's first line. Returns the browser's DOM.
fn check_in_browser(
    browser: &Path,
    page: &Path,
    dir: &Path,
    function: &str,
    verdict: &str,
    flames: &[&str],
) -> String {
    let dom = browse(browser, page, dir, &["--dump-dom"]);
    assert_eq!(
        dom.console(),
        Vec::<&str>::new(),
        "the page logged on the console"
    );
    let heap = dom
        .stdout
        .split_once("id=\"heap-rows\"")
        .map(|(_, rest)| rest.split("</table>").next().unwrap())
        .unwrap_or_else(|| panic!("no heap table in the DOM:\n{}", dom.stdout));
    let first = heap.split("<tr data-verdict=").nth(1).unwrap();
    assert!(first.starts_with(&format!("\"{verdict}\"")), "{first}");
    assert!(
        first.contains(&format!("<code class=\"fn\">{function}</code>")),
        "{first}"
    );
    assert!(first.contains(&format!(
        "<span class=\"badge v-{verdict}\">{verdict}</span>"
    )));
    let frames: Vec<&str> = dom
        .stdout
        .match_indices("<iframe class=\"flame-graph\" id=\"")
        .map(|(at, m)| dom.stdout[at + m.len()..].split('"').next().unwrap())
        .collect();
    assert_eq!(frames, flames);
    let chart = dom
        .stdout
        .split_once("id=\"chart-heap\"")
        .map(|(_, rest)| rest.split("</svg>").next().unwrap())
        .expect("a heap chart");
    assert!(chart.contains("<polyline class=\"series\" fill=\"none\" stroke=\"#4e79a7\""));
    assert!(chart.contains(&format!("<title>{function} ← ")), "{chart}");

    // The screenshot: the flame graph in inferno's hot colours across the page's width (the
    // frame fills its iframe: inferno's script ran), and the chart's first line in its colour.
    let png = page.with_extension("png");
    let shot = browse(
        browser,
        page,
        dir,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,2400",
        ],
    );
    assert_eq!(shot.console(), Vec::<&str>::new());
    let shot = Shot::load(&png);
    assert_eq!((shot.width, shot.height), (1280, 2400));
    // inferno's "hot" palette: red 205–255, green 0–230, blue 0–55 (not the badges' red).
    let (flame, fbox) = shot.find(|r, g, b| r >= 205 && g >= 60 && b <= 55);
    let (line, lbox) = shot.find(near((0x4e, 0x79, 0xa7), 24));
    let look = format!(
        "flame {flame} px in {fbox:?}, chart line {line} px in {lbox:?}; see {}",
        png.display()
    );
    eprintln!("{look}");
    assert!(flame > 20_000, "{look}");
    assert!(
        fbox.2 - fbox.0 > 1000,
        "the flame graph is not page-wide: {look}"
    );
    assert!(line > 800, "{look}");
    assert!(lbox.2 - lbox.0 > 500, "the chart's line is short: {look}");
    // The chart comes first.
    assert!(lbox.1 < fbox.1, "{look}");
    dom.stdout
}

#[test]
fn the_report_of_a_traced_leak_opens_in_a_browser() {
    if !privileged() {
        return;
    }
    let Some(browser) = chromium() else {
        return;
    };
    let dir = scratch("traced");
    errors_are_seen(&browser, &dir);

    // A linear leak, traced while it runs (it would for 10 minutes; ended once traced): the
    // last report has its series and verdict.
    let prog = c_fixture("verdict_leak");
    let mut victim = Command::new(&prog)
        .arg("600000")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = victim.id().to_string();
    let page = dir.join("report.html");
    let traced = Background::start(&[
        "--pid",
        &pid,
        "--interval",
        "200ms",
        "--duration",
        "3s",
        "--format",
        "html",
        "-o",
        page.to_str().unwrap(),
    ])
    .finish(Duration::from_secs(60));
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(traced.status.success(), "{}", traced.stderr);
    assert!(
        traced.stdout.is_empty(),
        "the report went to -o, not stdout"
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    // The page says what was traced, how, and on which kernel.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    for said in [
        format!(
            "<dt>Target</dt><dd>pid {pid} (verdict_leak): {} 600000</dd>",
            prog.display()
        ),
        format!("<dt>Kernel</dt><dd>Linux {} x86_64</dd>", release.trim()),
        "<dt>Command</dt><dd><code>".to_owned(),
        "--format html -o ".to_owned(),
    ] {
        assert!(html.contains(&said), "{said} not in the page");
    }
    let dom = check_in_browser(&browser, &page, &dir, "leak_site", "leak", &["flame-heap"]);
    // The whole process's line, from the reports along the way.
    assert_eq!(dom.matches("<polyline class=\"total\"").count(), 1);
}

/// A report of the recorded session the unit tests replay (`leaktrace/src/driver/fixtures`):
/// while demo ran, its cache growing. No root needed: only the browser.
#[test]
fn a_replayed_session_opens_in_a_browser() {
    let Some(browser) = chromium() else {
        return;
    };
    let dir = scratch("replayed");
    errors_are_seen(&browser, &dir);
    let recording = common::workspace().join("leaktrace/src/driver/fixtures/full.jsonl.gz");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(recording).unwrap()),
        &mut text,
    )
    .unwrap();
    let reports = leaktrace::driver::record::replay(&text).unwrap();
    // The last report in which demo's cache is a live row with a series of several points.
    let growing = |r: &&leaktrace::report::Report| {
        r.leaks.first().is_some_and(|l| {
            l.frames.get(l.site).and_then(|f| f.symbol.as_deref()) == Some("cache_insert")
                && l.trend.as_ref().is_some_and(|t| t.series.len() >= 4)
        })
    };
    let report = reports
        .iter()
        .rev()
        .find(growing)
        .expect("a report while demo's cache grew");
    let verdict = report.leaks[0].trend.as_ref().unwrap().verdict.name();
    let page = dir.join("replayed.html");
    std::fs::write(
        &page,
        leaktrace::export::render(
            report,
            leaktrace::export::Format::Html,
            leaktrace::export::FoldedWeight::Bytes,
            leaktrace::export::FoldedKind::Heap,
        ),
    )
    .unwrap();
    check_in_browser(
        &browser,
        &page,
        &dir,
        "cache_insert",
        verdict,
        &["flame-heap", "flame-fd"],
    );
}

#[test]
fn html_is_not_written_to_a_terminal() {
    if Command::new("script").arg("-V").output().is_err() {
        eprintln!("skipped: script(1) gives the pseudo-terminal");
        return;
    }
    let cmd = format!(
        "{} run --format html -- true",
        env!("CARGO_BIN_EXE_leaktrace")
    );
    // util-linux's script(1) gives leaktrace a pseudo-terminal for stdout.
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(
            "--format html is a page for a browser: write it to a file with -o report.html (or pipe it)"
        ),
        "{text}"
    );
    assert!(!text.contains("<html"), "{text}");
    // Not a terminal: nothing is refused before tracing would start.
    let piped = leaktrace()
        .args(["run", "--format", "svg", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(!stderr.contains("is a drawing for a browser"), "{stderr}");
    if privileged() {
        // `true` holds nothing: a drawing that says so.
        let svg = String::from_utf8_lossy(&piped.stdout);
        assert!(piped.status.success(), "{stderr}");
        assert!(
            svg.starts_with("<?xml") && svg.contains("no stack to draw"),
            "{svg}"
        );
    }
}
