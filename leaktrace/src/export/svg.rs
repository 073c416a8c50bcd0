//! The flame graph alone (`--format svg`): drawn by inferno from the stacks and weights that
//! `--format folded` writes (see [`folded::rows`]), with inferno's own search (Ctrl-F) and
//! click-to-zoom. The HTML report embeds the same drawings, one per kind of leak.
use std::fmt::Write as _;

use inferno::flamegraph::{
    self,
    color::{BackgroundColor, BasicPalette, Color, Palette},
};

use crate::{
    export::{Exporter, FoldedKind, FoldedWeight, folded, html::escape},
    report::Report,
};

/// The flame graph of the stacks of `kind`, weighted by `weight` (as folded output).
#[derive(Clone, Copy, Debug, Default)]
pub struct Svg {
    /// What heap and temp file stacks are weighted by.
    pub weight: FoldedWeight,
    /// Which stacks are drawn.
    pub kind: FoldedKind,
}

impl Exporter for Svg {
    fn export(&self, report: &Report) -> Vec<u8> {
        let growth = report.summary.mode == "growth";
        let look = match self.kind {
            FoldedKind::Heap if growth => Look::growth(self.weight),
            FoldedKind::Heap => Look::heap(self.weight),
            FoldedKind::Fd => Look::fd(),
            FoldedKind::Tmp => Look::tmp(self.weight),
        };
        let lines = folded::fold(folded::rows(report, self.weight, self.kind));
        draw(&lines, &look, &subtitle(report))
    }

    fn content_type(&self) -> &'static str {
        "image/svg+xml"
    }
}

/// What a flame graph says about its weights, and its colours.
#[derive(Clone, Debug)]
pub(crate) struct Look {
    /// The heading: what the widths measure.
    pub(crate) title: &'static str,
    /// What one unit of weight is, in the tooltips (`8,388,608 bytes, 88.89%`).
    pub(crate) unit: &'static str,
    /// Frame colours, told apart per kind.
    pub(crate) palette: BasicPalette,
}

impl Look {
    /// Outstanding heap blocks.
    pub(crate) fn heap(weight: FoldedWeight) -> Self {
        Self {
            title: match weight {
                FoldedWeight::Bytes => "Outstanding heap bytes",
                FoldedWeight::Count => "Outstanding heap blocks",
            },
            unit: match weight {
                FoldedWeight::Bytes => "bytes",
                FoldedWeight::Count => "blocks",
            },
            palette: BasicPalette::Hot,
        }
    }

    /// Pages written and kept (growth mode).
    pub(crate) fn growth(weight: FoldedWeight) -> Self {
        Self {
            title: match weight {
                FoldedWeight::Bytes => "Growth: bytes of pages written and kept",
                FoldedWeight::Count => "Growth: pages written and kept",
            },
            unit: match weight {
                FoldedWeight::Bytes => "bytes",
                FoldedWeight::Count => "pages",
            },
            palette: BasicPalette::Mem,
        }
    }

    /// Descriptors still open.
    pub(crate) fn fd() -> Self {
        Self {
            title: "Open file descriptors",
            unit: "descriptors",
            palette: BasicPalette::Io,
        }
    }

    /// Temp files still on disk.
    pub(crate) fn tmp(weight: FoldedWeight) -> Self {
        Self {
            title: match weight {
                FoldedWeight::Bytes => "Temp files: bytes on disk",
                FoldedWeight::Count => "Temp files on disk",
            },
            unit: match weight {
                FoldedWeight::Bytes => "bytes",
                FoldedWeight::Count => "files",
            },
            palette: BasicPalette::Purple,
        }
    }
}

/// `pid 4242 (api) · after 60.0s · final report`: what the drawing is of.
fn subtitle(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    if let Some(target) = &s.target {
        let _ = write!(out, "{target} · ");
    }
    let _ = write!(
        out,
        "{} after {:.1}s",
        if report.is_final {
            "final report"
        } else {
            "report"
        },
        s.elapsed_s
    );
    out
}

/// The flame graph of folded `lines` as a standalone SVG document; a small one that says so
/// when there is no stack to draw (inferno draws an error then).
pub(crate) fn draw(lines: &str, look: &Look, subtitle: &str) -> Vec<u8> {
    if lines.is_empty() {
        return empty(look, subtitle);
    }
    let mut opt = flamegraph::Options::default();
    opt.title = look.title.to_owned();
    opt.subtitle = Some(subtitle.to_owned());
    opt.count_name = look.unit.to_owned();
    opt.colors = Palette::Basic(look.palette);
    opt.bgcolors = Some(BackgroundColor::Flat(Color {
        r: 255,
        g: 255,
        b: 255,
    }));
    // Colours from the function's name: the same function keeps its colour from one report
    // to the next (inferno's default draws them at random).
    opt.hash = true;
    opt.font_type = "sans-serif".to_owned();
    opt.frame_height = 18;
    opt.font_size = 12;
    opt.min_width = 0.05;
    // Our folded lines are already sorted and merged.
    opt.no_sort = true;
    let mut out = Vec::new();
    match flamegraph::from_lines(&mut opt, lines.lines(), &mut out) {
        Ok(()) => out,
        // Only a line without a weight makes it fail, and folded output writes none.
        Err(_) => empty(look, subtitle),
    }
}

/// A standalone SVG saying there is nothing to draw.
fn empty(look: &Look, subtitle: &str) -> Vec<u8> {
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"600\" height=\"60\" viewBox=\"0 0 600 60\" \
         xmlns=\"http://www.w3.org/2000/svg\">\
         <text x=\"300\" y=\"24\" text-anchor=\"middle\" font-family=\"sans-serif\" \
         font-size=\"16\">{}</text>\
         <text x=\"300\" y=\"46\" text-anchor=\"middle\" font-family=\"sans-serif\" \
         font-size=\"12\" fill=\"#555\">no stack to draw · {}</text></svg>\n",
        escape(look.title),
        escape(subtitle)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{Format, golden::sample, html::dom::parse, render};

    fn svg(r: &Report, weight: FoldedWeight, kind: FoldedKind) -> String {
        render(r, Format::Svg, weight, kind)
    }

    /// Each frame: its tooltip, and its width as inferno keeps it (`fg:w` of its `<rect>`).
    fn frames(doc: &str) -> Vec<(String, u64)> {
        let dom = parse(doc);
        dom.all("g")
            .filter_map(|(i, _)| {
                let (_, title) = dom.inside(i, "title").next()?;
                let (_, rect) = dom.inside(i, "rect").next()?;
                Some((title.text.clone(), rect.attrs["fg:w"].parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn the_flame_graph_names_each_leaking_function_with_its_weight() {
        let doc = svg(&sample(), FoldedWeight::Bytes, FoldedKind::Heap);
        assert!(doc.starts_with("<?xml"));
        let mut got = frames(&doc);
        got.sort();
        assert_eq!(
            got,
            [
                (
                    "[libplugin.so] (1,048,576 bytes, 11.11%)".to_owned(),
                    1_048_576
                ),
                ("all (9,437,184 bytes, 100%)".to_owned(), 9_437_184),
                (
                    "cache_insert (8,388,608 bytes, 88.89%)".to_owned(),
                    8_388_608
                ),
                (
                    "handle_request (8,388,608 bytes, 88.89%)".to_owned(),
                    8_388_608
                ),
                (
                    "load_plugin:\u{a0}v2 (1,048,576 bytes, 11.11%)".to_owned(),
                    1_048_576
                ),
                ("main (9,437,184 bytes, 100.00%)".to_owned(), 9_437_184),
            ]
        );
        let dom = parse(&doc);
        let heading: Vec<&str> = dom
            .all("text")
            .filter(|(_, n)| n.attrs.get("id").is_some_and(|id| id == "title"))
            .map(|(_, n)| n.text.as_str())
            .collect();
        assert_eq!(heading, ["Outstanding heap bytes"]);
    }

    #[test]
    fn weights_and_kinds_follow_the_folded_options() {
        let by_count = frames(&svg(&sample(), FoldedWeight::Count, FoldedKind::Heap));
        assert!(
            by_count.contains(&("cache_insert (4,000 blocks, 87.58%)".to_owned(), 4000)),
            "{by_count:?}"
        );
        let fd = frames(&svg(&sample(), FoldedWeight::Bytes, FoldedKind::Fd));
        assert!(
            fd.contains(&("load_geofence (847 descriptors, 98.60%)".to_owned(), 847)),
            "{fd:?}"
        );
        assert!(!fd.iter().any(|(t, _)| t.starts_with("cache_insert")));
        let tmp = frames(&svg(&sample(), FoldedWeight::Count, FoldedKind::Tmp));
        assert!(tmp.contains(&("load_geofence (1,247 files, 100.00%)".to_owned(), 1247)));
    }

    #[test]
    fn no_stack_is_a_drawing_that_says_so() {
        let mut r = sample();
        r.leaks.clear();
        let doc = svg(&r, FoldedWeight::Bytes, FoldedKind::Heap);
        let dom = parse(&doc);
        let text: Vec<&str> = dom.all("text").map(|(_, n)| n.text.as_str()).collect();
        assert_eq!(
            text,
            [
                "Outstanding heap bytes",
                "no stack to draw · final report after 60.0s"
            ]
        );
    }
}
