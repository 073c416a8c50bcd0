//! pprof profiles (`profile.proto`, gzipped), what `go tool pprof`, Parca, Grafana
//! Pyroscope and Alloy's `pyroscope.scrape` read.
//!
//! One profile shows one kind of row, chosen by [`PprofKind`], rather than every kind as
//! extra sample types: collectors store each sample type as its own series, and a growth
//! type that is zero in every heap profile (and the reverse) would only add empty series.
//!
//! - [`PprofKind::Heap`]: outstanding heap blocks (rows of kind `heap`), sample types
//!   `inuse_objects`/`count` and `inuse_space`/`bytes`, `inuse_space` by default: the names
//!   and units of Go's heap profile, so `go tool pprof -sample_index=inuse_objects`,
//!   Pyroscope's `memory:inuse_space:bytes` and Parca's heap views work unchanged.
//! - [`PprofKind::Growth`]: resident memory the stacks added (rows of kind `growth`),
//!   sample type `growth_space`/`bytes`.
//!
//! Each sample is one row, leaf first. Frames become locations at their address in the
//! process, within a mapping of their module; a run of inlined frames and the frame they sit
//! in become one location with several lines, innermost first, as pprof wants. Frames
//! without a symbol get a location without lines (tools show the module and address). Each
//! sample carries the labels `pid`, `comm`, and when the row has them `container_id`, and
//! the Kubernetes `namespace`, `pod` and `container` (the container's name in the pod).
use std::{
    collections::{HashMap, hash_map::Entry},
    io::Write as _,
};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;

use crate::{
    export::Exporter,
    report::{Frame, Leak, Report},
};

/// Which rows a profile shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PprofKind {
    /// Outstanding heap blocks: `inuse_objects`, `inuse_space`.
    #[default]
    Heap,
    /// Resident memory added, by stack (growth mode): `growth_space`.
    Growth,
}

impl PprofKind {
    /// The sample types of this kind's profiles, as (type, unit); the last is the default.
    pub fn sample_types(self) -> &'static [(&'static str, &'static str)] {
        match self {
            PprofKind::Heap => &[("inuse_objects", "count"), ("inuse_space", "bytes")],
            PprofKind::Growth => &[("growth_space", "bytes")],
        }
    }

    /// The `kind` of the report rows this profile shows.
    fn row_kind(self) -> &'static str {
        match self {
            PprofKind::Heap => "heap",
            PprofKind::Growth => "growth",
        }
    }
}

/// A gzipped pprof profile of one kind of heap row.
#[derive(Clone, Debug, Default)]
pub struct Pprof {
    /// Which rows; `None`: growth rows in growth mode, heap rows otherwise.
    pub kind: Option<PprofKind>,
    /// The sample type shown by default (one of [`PprofKind::sample_types`]); `None`: the
    /// last, `inuse_space` or `growth_space`.
    pub sample_index: Option<String>,
}

impl Pprof {
    /// The profile, not compressed.
    pub fn profile(&self, report: &Report) -> Profile {
        let kind = self.kind.unwrap_or(if report.summary.mode == "growth" {
            PprofKind::Growth
        } else {
            PprofKind::Heap
        });
        let mut b = Builder {
            build_ids: report.build_ids.clone(),
            ..Builder::default()
        };
        b.string(""); // The string table starts with "".
        let types = kind.sample_types();
        for (ty, unit) in types {
            let vt = ValueType {
                r#type: b.string(ty),
                unit: b.string(unit),
            };
            b.profile.sample_type.push(vt);
        }
        let default = self
            .sample_index
            .as_deref()
            .and_then(|want| types.iter().position(|(ty, _)| *ty == want))
            .unwrap_or(types.len() - 1);
        b.profile.default_sample_type = b.profile.sample_type[default].r#type;
        b.profile.period_type = Some(ValueType {
            r#type: b.string("space"),
            unit: b.string("bytes"),
        });
        // Sampled allocations: the byte values are already scaled to estimates.
        b.profile.period = report.summary.sample_bytes as i64;
        b.profile.duration_nanos = (report.summary.elapsed_s * 1e9) as i64;
        b.profile.time_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let comments = [
            format!(
                "leaktrace: blocks at least {}s old, mode {}",
                report.summary.min_age_s, report.summary.mode
            ),
            format!(
                "lost events: {} (non-zero: values are lower bounds)",
                report.summary.lost_events
            ),
        ];
        for c in comments {
            let s = b.string(&c);
            b.profile.comment.push(s);
        }
        // A `--mode growth` session reports its growth rows in `leaks`, the node agent in
        // `growth`, apart from the exact heap of the processes it traces in full.
        for row in report
            .leaks
            .iter()
            .chain(&report.growth)
            .filter(|l| l.kind == kind.row_kind())
        {
            b.sample(row, kind);
        }
        b.finish()
    }
}

impl Exporter for Pprof {
    fn export(&self, report: &Report) -> Vec<u8> {
        let raw = self.profile(report).encode_to_vec();
        let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::default());
        // Writing to a Vec cannot fail.
        let _ = gz.write_all(&raw);
        gz.finish().unwrap_or_default()
    }

    fn content_type(&self) -> &'static str {
        "application/octet-stream"
    }
}

/// Where a frame's mapping starts: a module, and the address its file offset 0 sits at in
/// the process (`addr - offset`; `None` when the offset is unknown).
type MappingKey = (String, Option<u64>);

/// Interns strings, functions, mappings and locations while samples are added.
#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(i64, i64), u64>,
    mappings: HashMap<MappingKey, u64>,
    locations: HashMap<LocationKey, u64>,
    /// Build ids by module path, from the report.
    build_ids: std::collections::BTreeMap<String, String>,
}

/// What makes two locations the same: the address, the module, and the functions and lines
/// there.
type LocationKey = (
    u64,
    Option<String>,
    Vec<(Option<String>, Option<String>, Option<u32>)>,
);

fn location_key(group: &[Frame]) -> LocationKey {
    let outer = &group[group.len() - 1];
    let lines = group
        .iter()
        .map(|f| (f.symbol.clone(), f.path.clone().or(f.file.clone()), f.line))
        .collect();
    (outer.addr, outer.module.clone(), lines)
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (self.string(name), self.string(file));
        let next = self.profile.function.len() as u64 + 1;
        match self.functions.entry(key) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                e.insert(next);
                self.profile.function.push(Function {
                    id: next,
                    name: key.0,
                    system_name: key.0,
                    filename: key.1,
                    start_line: 0,
                });
                next
            }
        }
    }

    /// The mapping of `frame`'s module, widened to cover its address.
    fn mapping(&mut self, frame: &Frame, symbolized: bool) -> u64 {
        let Some(module) = &frame.module else {
            return 0;
        };
        let start = frame.offset.and_then(|o| frame.addr.checked_sub(o));
        let key = (module.clone(), start);
        let id = match self.mappings.get(&key) {
            Some(&id) => id,
            None => {
                let id = self.profile.mapping.len() as u64 + 1;
                let filename = self.string(module);
                // With the build id, Parca and Pyroscope can symbolize frames we could not.
                let build_id = match self.build_ids.get(module).cloned() {
                    Some(id) => self.string(&id),
                    None => 0,
                };
                self.profile.mapping.push(Mapping {
                    id,
                    memory_start: start.unwrap_or(frame.addr),
                    memory_limit: frame.addr + 1,
                    file_offset: 0,
                    filename,
                    build_id,
                    ..Mapping::default()
                });
                self.mappings.insert(key, id);
                id
            }
        };
        let m = &mut self.profile.mapping[id as usize - 1];
        m.memory_start = m.memory_start.min(frame.addr);
        m.memory_limit = m.memory_limit.max(frame.addr + 1);
        if symbolized {
            m.has_functions = true;
            m.has_filenames |= frame.path.is_some() || frame.file.is_some();
            m.has_line_numbers |= frame.line.is_some();
            m.has_inline_frames = true;
        }
        id
    }

    /// The location of a frame and the frames inlined into it (innermost first: `group`
    /// ends with the frame that holds the address).
    fn location(&mut self, group: &[Frame]) -> u64 {
        let key = location_key(group);
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let outer = &group[group.len() - 1];
        let symbolized = group.iter().any(|f| f.symbol.is_some());
        let mapping_id = self.mapping(outer, symbolized);
        let mut line = Vec::with_capacity(group.len());
        for f in group {
            let Some(name) = &f.symbol else { continue };
            let file = f.path.as_deref().or(f.file.as_deref()).unwrap_or("");
            line.push(Line {
                function_id: self.function(name, file),
                line: f.line.map_or(0, i64::from),
                column: 0,
            });
        }
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            mapping_id,
            address: outer.addr,
            line,
            is_folded: false,
        });
        self.locations.insert(key, id);
        id
    }

    fn label(&mut self, key: &str, value: &str) -> Label {
        Label {
            key: self.string(key),
            str: self.string(value),
            ..Label::default()
        }
    }

    fn sample(&mut self, row: &Leak, kind: PprofKind) {
        let mut location_id = Vec::with_capacity(row.frames.len());
        let mut start = 0;
        for (i, f) in row.frames.iter().enumerate() {
            // An inlined frame belongs with the next one, up to the frame that is not.
            if !f.inlined || i + 1 == row.frames.len() {
                location_id.push(self.location(&row.frames[start..=i]));
                start = i + 1;
            }
        }
        let value = match kind {
            PprofKind::Heap => vec![row.outstanding_count as i64, row.outstanding_bytes as i64],
            PprofKind::Growth => vec![row.outstanding_bytes as i64],
        };
        let mut label = vec![
            self.label("pid", &row.pid.to_string()),
            self.label("comm", &row.owner.comm),
        ];
        let o = &row.owner;
        for (key, value) in [
            ("container_id", &o.container_id),
            ("namespace", &o.namespace),
            ("pod", &o.pod),
            ("container", &o.container_name),
        ] {
            if let Some(v) = value {
                label.push(self.label(key, v));
            }
        }
        if row.processes > 1 {
            label.push(Label {
                key: self.string("processes"),
                num: i64::from(row.processes),
                ..Label::default()
            });
        }
        self.profile.sample.push(Sample {
            location_id,
            value,
            label,
        });
    }

    fn finish(self) -> Profile {
        self.profile
    }
}

// profile.proto (github.com/google/pprof/proto/profile.proto), the fields leaktrace writes.

/// `perftools.profiles.Profile`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    /// What each sample value is.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// One per row.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// Modules.
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    /// Addresses and the lines at them.
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// Functions.
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Every string, indexed by the other messages; `string_table[0]` is "".
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// When the profile was taken, nanoseconds since the epoch.
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    /// How long it covers.
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    /// What `period` counts.
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    /// The sampling period (bytes with `--sample-bytes`; 0: every allocation).
    #[prost(int64, tag = "12")]
    pub period: i64,
    /// Free-form notes (string table indices).
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    /// The sample type shown by default (string table index of its type).
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `perftools.profiles.ValueType`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ValueType {
    /// The type's name (string table index).
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// Its unit (string table index).
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `perftools.profiles.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// The stack, leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// Labels.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `perftools.profiles.Label`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Label {
    /// Its key (string table index).
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// Its text value (string table index), or 0.
    #[prost(int64, tag = "2")]
    pub str: i64,
    /// Its numeric value.
    #[prost(int64, tag = "3")]
    pub num: i64,
}

/// `perftools.profiles.Mapping`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Mapping {
    /// Its id, from 1.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Where file offset `file_offset` is mapped.
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    /// The end of the addresses seen in it.
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    /// The file offset at `memory_start`.
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    /// The module's path (string table index).
    #[prost(int64, tag = "5")]
    pub filename: i64,
    /// Its build id (string table index; 0: unknown).
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    /// Its locations have function names.
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    /// They have file names.
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    /// They have line numbers.
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    /// Inlined calls are expanded.
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// `perftools.profiles.Location`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    /// Its id, from 1.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its mapping (0: none).
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    /// The address in the process.
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// The functions at this address, innermost (inlined) first, the caller they are
    /// inlined into last.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
    /// Part of a folded run of frames.
    #[prost(bool, tag = "5")]
    pub is_folded: bool,
}

/// `perftools.profiles.Line`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Line {
    /// The function.
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// The source line (0: unknown).
    #[prost(int64, tag = "2")]
    pub line: i64,
    /// The column (0: unknown).
    #[prost(int64, tag = "3")]
    pub column: i64,
}

/// `perftools.profiles.Function`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Function {
    /// Its id, from 1.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its name, demangled (string table index).
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// Its name as the linker knows it (string table index).
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// The source file path (string table index).
    #[prost(int64, tag = "4")]
    pub filename: i64,
    /// Its first line (0: unknown).
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::export::golden::sample;

    fn decode(bytes: &[u8]) -> Profile {
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzipped");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .unwrap();
        Profile::decode(raw.as_slice()).unwrap()
    }

    fn s(p: &Profile, i: i64) -> &str {
        &p.string_table[i as usize]
    }

    /// The function names of a location, innermost first.
    fn names(p: &Profile, id: u64) -> Vec<&str> {
        let loc = &p.location[id as usize - 1];
        assert_eq!(loc.id, id);
        loc.line
            .iter()
            .map(|l| s(p, p.function[l.function_id as usize - 1].name))
            .collect()
    }

    /// The sample report, its first row in a container and with `cache_insert` inlined into
    /// `handle_request`.
    fn report() -> Report {
        let mut r = sample();
        let row = &mut r.leaks[0];
        row.owner.container_id = Some("0123456789abcdef".into());
        row.frames[0].inlined = true;
        row.frames[0].addr = row.frames[1].addr;
        row.frames[0].offset = row.frames[1].offset;
        r
    }

    #[test]
    fn heap_profile_has_go_heap_sample_types_values_and_labels() {
        let p = decode(&Pprof::default().export(&report()));
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| (s(&p, t.r#type), s(&p, t.unit)))
            .collect();
        assert_eq!(
            types,
            [("inuse_objects", "count"), ("inuse_space", "bytes")]
        );
        assert_eq!(s(&p, p.default_sample_type), "inuse_space");
        assert_eq!(p.string_table[0], "");
        assert_eq!(p.duration_nanos, 60_000_000_000);
        let values: Vec<&[i64]> = p.sample.iter().map(|x| x.value.as_slice()).collect();
        assert_eq!(values, [&[4000, 8 << 20][..], &[567, 1 << 20][..]]);
        let labels: Vec<(&str, &str)> = p.sample[0]
            .label
            .iter()
            .map(|l| (s(&p, l.key), s(&p, l.str)))
            .collect();
        assert_eq!(
            labels,
            [
                ("pid", "4242"),
                ("comm", "cache-server"),
                ("container_id", "0123456789abcdef")
            ]
        );
        assert_eq!(p.sample[1].label.len(), 2, "no container, no label");
    }

    #[test]
    fn a_row_in_a_pod_is_labelled_with_its_namespace_pod_and_container() {
        let mut r = report();
        let o = &mut r.leaks[0].owner;
        o.namespace = Some("payments".into());
        o.pod = Some("api-7f9c".into());
        o.container_name = Some("api".into());
        o.pod_uid = Some("0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c".into());
        let p = decode(&Pprof::default().export(&r));
        let labels: Vec<(&str, &str)> = p.sample[0]
            .label
            .iter()
            .map(|l| (s(&p, l.key), s(&p, l.str)))
            .collect();
        assert_eq!(
            labels,
            [
                ("pid", "4242"),
                ("comm", "cache-server"),
                ("container_id", "0123456789abcdef"),
                ("namespace", "payments"),
                ("pod", "api-7f9c"),
                ("container", "api"),
            ]
        );
        assert_eq!(p.sample[1].label.len(), 2, "not in a pod, no pod labels");
    }

    #[test]
    fn inlined_frames_are_lines_of_one_location_innermost_first() {
        let p = decode(&Pprof::default().export(&report()));
        let first = &p.sample[0].location_id;
        assert_eq!(
            first.len(),
            2,
            "cache_insert sits in handle_request's location"
        );
        assert_eq!(names(&p, first[0]), ["cache_insert", "handle_request"]);
        assert_eq!(names(&p, first[1]), ["main"]);
        let loc = &p.location[first[0] as usize - 1];
        assert_eq!(loc.address, 0x5555_0000_1280);
        let lines: Vec<i64> = loc.line.iter().map(|l| l.line).collect();
        assert_eq!(lines, [17, 301]);
        let f = &p.function[loc.line[0].function_id as usize - 1];
        assert_eq!(s(&p, f.filename), "/src/cache.c");
        // `main` is one location shared by both samples.
        assert_eq!(p.sample[1].location_id[2], first[1]);
        // A frame without a symbol: a location with an address and no line.
        let unknown = &p.location[p.sample[1].location_id[0] as usize - 1];
        assert_eq!((unknown.address, unknown.line.len()), (0x7f00_0000_4321, 0));
    }

    #[test]
    fn mappings_name_the_module_where_its_offset_zero_is_mapped() {
        let p = decode(&Pprof::default().export(&report()));
        let m = |loc: u64| &p.mapping[p.location[loc as usize - 1].mapping_id as usize - 1];
        let app = m(p.sample[0].location_id[1]);
        assert_eq!(s(&p, app.filename), "/srv/app/bin/cache-server");
        assert_eq!(app.memory_start, 0x5555_0000_0000);
        assert_eq!(app.file_offset, 0);
        assert!(app.memory_limit > 0x5555_0000_1300);
        assert!(app.has_functions && app.has_line_numbers && app.has_filenames);
        let lib = m(p.sample[1].location_id[0]);
        assert_eq!(s(&p, lib.filename), "/usr/lib/libplugin.so");
        assert_eq!(lib.memory_start, 0x7f00_0000_0000);
        assert!(!lib.has_functions);
    }

    #[test]
    fn growth_profile_shows_growth_rows_only() {
        let mut r = report();
        r.leaks[1].kind = "growth";
        let growth = Pprof {
            kind: Some(PprofKind::Growth),
            sample_index: None,
        };
        let p = decode(&growth.export(&r));
        assert_eq!(p.sample_type.len(), 1);
        assert_eq!(s(&p, p.sample_type[0].r#type), "growth_space");
        let values: Vec<&[i64]> = p.sample.iter().map(|x| x.value.as_slice()).collect();
        assert_eq!(values, [&[1 << 20][..]]);
        let heap = decode(&Pprof::default().export(&r));
        assert_eq!(heap.sample.len(), 1);
        // The node agent's growth rows come in a list of their own.
        let mut agent = report();
        let mut row = agent.leaks.pop().unwrap();
        row.kind = "growth";
        agent.growth.push(row);
        let p = decode(&growth.export(&agent));
        let values: Vec<&[i64]> = p.sample.iter().map(|x| x.value.as_slice()).collect();
        assert_eq!(values, [&[1 << 20][..]]);
        // Without a kind, growth mode's reports give growth profiles.
        r.summary.mode = "growth";
        let auto = decode(&Pprof::default().export(&r));
        assert_eq!(s(&auto, auto.default_sample_type), "growth_space");
    }

    #[test]
    fn sample_index_picks_the_default_type() {
        let p = Pprof {
            kind: None,
            sample_index: Some("inuse_objects".into()),
        };
        let p = decode(&p.export(&report()));
        assert_eq!(s(&p, p.default_sample_type), "inuse_objects");
    }
}
