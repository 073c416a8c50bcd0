//! CPython frames to names: finding a process's interpreter, and turning a code object and an
//! instruction offset into function, file and line.
//!
//! Everything here reads the target from outside (`process_vm_readv`), so it works on a
//! running service with no restart and nothing injected. The layout comes from
//! [`leaktrace_common::python`]'s per-version rows. Frames are "named late": the BPF side (or
//! [`walk_threads`]) records only (code object address, instruction offset); the names and the
//! line are read here, once per code object, and cached.
//!
//! The line comes from `co_linetable`, CPython 3.11's location table (`Objects/locations.md`
//! in the CPython tree): a run of entries, each covering some code units, each moving the line
//! by a delta from `co_firstlineno`.

use std::{io, path::Path, sync::Arc};

use hashbrown::HashMap;
use leaktrace_common::python::{self, Offsets};
use object::{Object, ObjectSection, ObjectSymbol};

use crate::targets::procfs;

/// The most bytes read for one string or line table: a guard against a torn or freed object.
const MAX_READ: usize = 1 << 16;

/// The most frames [`walk_threads`] follows per thread (a guard against a cycle).
const MAX_DEPTH: usize = 1024;

/// Why a process's interpreter or a code object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PyError {
    /// Reading the target's memory failed (it exited, or the address is not mapped).
    #[error("reading {len} bytes at {addr:#x} in pid {pid}: {source}")]
    Read {
        /// The process read.
        pid: u32,
        /// Where.
        addr: u64,
        /// How many bytes.
        len: usize,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A field held a value no live object can have.
    #[error("pid {pid}: {what} at {addr:#x} is not valid")]
    Invalid {
        /// The process read.
        pid: u32,
        /// The object's address.
        addr: u64,
        /// What it should have been.
        what: &'static str,
    },
}

/// A CPython interpreter found in a process: its version's offsets and where `_PyRuntime` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interpreter {
    /// Major and minor version, as the binary's `Py_Version` says.
    pub version: (u8, u8),
    /// The address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// The offsets for this version.
    pub offsets: &'static Offsets,
}

/// What an ELF file says about the interpreter it holds: the version and the link-time address
/// of `_PyRuntime`. `None` when the file is not a CPython we have offsets for.
pub fn inspect_elf(path: &Path) -> Option<((u8, u8), u64, u64)> {
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let find = |name: &str| {
        file.dynamic_symbols()
            .chain(file.symbols())
            .find(|s| s.name() == Ok(name) && s.address() != 0)
    };
    let runtime = find("_PyRuntime")?.address();
    // `Py_Version` (3.11+) is a `const unsigned long` holding PY_VERSION_HEX.
    let version = find("Py_Version")?;
    let hex = file.sections().find_map(|sec| {
        let bytes = sec.data_range(version.address(), 4).ok()??;
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    })?;
    let (major, minor) = ((hex >> 24) as u8, (hex >> 16) as u8);
    python::offsets(major, minor)?;
    // The lowest loaded address, to turn a mapping's start into the load bias.
    let first_load = file
        .segments()
        .map(|s| object::ObjectSegment::address(&s))
        .min()?;
    Some(((major, minor), runtime, first_load & !0xfff))
}

/// The CPython interpreter in `pid`, if it runs one we have offsets for: looks at the
/// executable and any `libpython3.*` the process maps (a `--enable-shared` build).
pub fn detect(pid: u32) -> Option<Interpreter> {
    let maps = procfs::read_maps(pid).ok()?;
    let mut seen = Vec::new();
    for m in maps.iter().filter(|m| m.is_file() && m.offset == 0) {
        let path = Path::new(&m.path);
        let name = path.file_name()?.to_string_lossy();
        if !(name.starts_with("python3") || name.starts_with("libpython3")) {
            continue;
        }
        if seen.contains(&m.path) {
            continue;
        }
        seen.push(m.path.clone());
        // Read through the process's root, so a container's file is the one inspected.
        let file = procfs::path(pid, "root").join(path.strip_prefix("/").unwrap_or(path));
        if let Some(((major, minor), runtime, first_load)) = inspect_elf(&file) {
            let bias = m.start.wrapping_sub(first_load);
            return Some(Interpreter {
                version: (major, minor),
                runtime: runtime.wrapping_add(bias),
                offsets: python::offsets(major, minor)?,
            });
        }
    }
    None
}

/// Reads another process's memory.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    /// The process read.
    pub pid: u32,
}

impl Mem {
    /// Fills `buf` from `addr`; all of it or an error.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), PyError> {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` covers exactly `buf`, which we own mutably; the kernel checks
        // the remote range.
        let n = unsafe { libc::process_vm_readv(self.pid as i32, &local, 1, &remote, 1, 0) };
        if n == buf.len() as isize {
            return Ok(());
        }
        let source = if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::from(io::ErrorKind::UnexpectedEof)
        };
        Err(PyError::Read {
            pid: self.pid,
            addr,
            len: buf.len(),
            source,
        })
    }

    /// A little-endian `u64` at `addr`.
    pub fn u64(&self, addr: u64) -> Result<u64, PyError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A little-endian `u32` at `addr`.
    pub fn u32(&self, addr: u64) -> Result<u32, PyError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn invalid(&self, addr: u64, what: &'static str) -> PyError {
        PyError::Invalid {
            pid: self.pid,
            addr,
            what,
        }
    }

    /// A `str` object's text (compact strings, which is every string a code object holds).
    pub fn unicode(&self, o: &Offsets, addr: u64) -> Result<String, PyError> {
        let len = self.u64(addr + u64::from(o.unicode_length))? as usize;
        let state = self.u32(addr + u64::from(o.unicode_state))?;
        // interned:2, kind:3, compact:1, ascii:1, ready:1, from the low bit up.
        let kind = ((state >> 2) & 7) as usize;
        let compact = state & (1 << 5) != 0;
        let ascii = state & (1 << 6) != 0;
        if !compact || !(1..=4).contains(&kind) || kind == 3 || len * kind > MAX_READ {
            return Err(self.invalid(addr, "string"));
        }
        let data = addr
            + u64::from(if ascii {
                o.unicode_ascii_data
            } else {
                o.unicode_compact_data
            });
        let mut buf = vec![0; len * kind];
        self.read(data, &mut buf)?;
        let text = match kind {
            1 => buf.iter().map(|&b| char::from(b)).collect(),
            2 => buf
                .chunks_exact(2)
                .map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]]))))
                .collect::<Option<String>>()
                .ok_or_else(|| self.invalid(addr, "string"))?,
            _ => buf
                .chunks_exact(4)
                .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect::<Option<String>>()
                .ok_or_else(|| self.invalid(addr, "string"))?,
        };
        Ok(text)
    }

    /// A `bytes` object's contents.
    pub fn bytes(&self, o: &Offsets, addr: u64) -> Result<Vec<u8>, PyError> {
        let len = self.u64(addr + u64::from(o.var_size))? as usize;
        if len > MAX_READ {
            return Err(self.invalid(addr, "bytes"));
        }
        let mut buf = vec![0; len];
        self.read(addr + u64::from(o.bytes_data), &mut buf)?;
        Ok(buf)
    }
}

/// What a code object says about itself, read once and cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Code {
    /// `co_name`: the function's name (`<module>` for a module's body).
    pub name: String,
    /// `co_qualname`: with its classes and enclosing functions (`Zone.check`).
    pub qualname: String,
    /// `co_filename`: the source file as the interpreter loaded it.
    pub filename: String,
    /// `co_firstlineno`: the line of the `def`.
    pub firstlineno: u32,
    /// `co_linetable`, decoded by [`Code::line`].
    pub linetable: Vec<u8>,
}

impl Code {
    /// Reads the code object at `addr`.
    pub fn read(mem: &Mem, o: &Offsets, addr: u64) -> Result<Self, PyError> {
        let field = |off: u16| mem.u64(addr + u64::from(off));
        Ok(Self {
            name: mem.unicode(o, field(o.code_name)?)?,
            qualname: mem.unicode(o, field(o.code_qualname)?)?,
            filename: mem.unicode(o, field(o.code_filename)?)?,
            firstlineno: mem.u32(addr + u64::from(o.code_firstlineno))?,
            linetable: mem.bytes(o, field(o.code_linetable)?)?,
        })
    }

    /// The source line of the instruction at `unit` (in 2-byte code units from
    /// `co_code_adaptive`), or `None` when the table gives it no line.
    pub fn line(&self, unit: u32) -> Option<u32> {
        line_for(&self.linetable, self.firstlineno, unit)
    }
}

/// Decodes a 3.11 location table: the line of code unit `unit`, starting from `firstlineno`.
pub fn line_for(table: &[u8], firstlineno: u32, unit: u32) -> Option<u32> {
    let mut line = i64::from(firstlineno);
    let mut at = 0u32;
    let mut i = 0;
    let varint = |i: &mut usize| -> Option<u32> {
        let mut v = 0u32;
        let mut shift = 0;
        loop {
            let b = *table.get(*i)?;
            *i += 1;
            v |= u32::from(b & 0x3f).checked_shl(shift)?;
            if b & 0x40 == 0 {
                return Some(v);
            }
            shift += 6;
        }
    };
    while i < table.len() {
        let first = table[i];
        if first & 0x80 == 0 {
            return None; // not at an entry's start: a torn table
        }
        i += 1;
        let code = (first >> 3) & 0xf;
        let len = u32::from(first & 7) + 1;
        let has_line = match code {
            15 => false,
            14 => {
                let v = varint(&mut i)?;
                line += if v & 1 != 0 {
                    -i64::from(v >> 1)
                } else {
                    i64::from(v >> 1)
                };
                varint(&mut i)?; // end line delta
                varint(&mut i)?; // column + 1
                varint(&mut i)?; // end column + 1
                true
            }
            13 => {
                let v = varint(&mut i)?;
                line += if v & 1 != 0 {
                    -i64::from(v >> 1)
                } else {
                    i64::from(v >> 1)
                };
                true
            }
            // One-line forms: the line moves by code - 10, then start and end columns.
            10..=12 => {
                line += i64::from(code) - 10;
                i += 2;
                true
            }
            _ => {
                i += 1;
                true
            }
        };
        if unit < at + len {
            return has_line.then(|| u32::try_from(line).ok()).flatten();
        }
        at += len;
    }
    None
}

/// One Python frame as captured: which code object, and the instruction in it (in code units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawFrame {
    /// The address of the `PyCodeObject`.
    pub code: u64,
    /// `(prev_instr - co_code_adaptive) / 2`.
    pub unit: u32,
}

/// One thread's Python stack, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadStack {
    /// The kernel's id of the thread.
    pub tid: u32,
    /// Its frames, innermost first.
    pub frames: Vec<RawFrame>,
}

/// Walks every thread's Python frames from user space (what the BPF walk does for the
/// current thread at an event). The process keeps running: a stack can be torn, in which
/// case the walk stops at the first unreadable frame.
pub fn walk_threads(mem: &Mem, py: &Interpreter) -> Result<Vec<ThreadStack>, PyError> {
    let o = py.offsets;
    let interp = mem.u64(py.runtime + u64::from(o.runtime_interpreters_head))?;
    if interp == 0 {
        return Err(mem.invalid(py.runtime, "interpreter list"));
    }
    let mut out = Vec::new();
    let mut tstate = mem.u64(interp + u64::from(o.interp_threads_head))?;
    while tstate != 0 && out.len() < MAX_DEPTH {
        let tid = mem.u64(tstate + u64::from(o.tstate_native_thread_id))? as u32;
        let cframe = mem.u64(tstate + u64::from(o.tstate_cframe))?;
        let mut frames = Vec::new();
        if cframe != 0 {
            let mut frame = mem.u64(cframe + u64::from(o.cframe_current_frame))?;
            while frame != 0 && frames.len() < MAX_DEPTH {
                frames.push(read_frame(mem, o, frame)?);
                frame = mem.u64(frame + u64::from(o.frame_previous))?;
            }
        }
        out.push(ThreadStack { tid, frames });
        tstate = mem.u64(tstate + u64::from(o.tstate_next))?;
    }
    Ok(out)
}

/// The code object and instruction of the `_PyInterpreterFrame` at `frame`.
fn read_frame(mem: &Mem, o: &Offsets, frame: u64) -> Result<RawFrame, PyError> {
    let code = mem.u64(frame + u64::from(o.frame_code))?;
    let prev = mem.u64(frame + u64::from(o.frame_prev_instr))?;
    let first = code + u64::from(o.code_adaptive);
    // Before the first instruction runs, prev_instr is one unit before it.
    let unit = prev.saturating_sub(first) / 2;
    let unit = u32::try_from(unit).map_err(|_| mem.invalid(frame, "frame"))?;
    Ok(RawFrame { code, unit })
}

/// A named Python frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    /// The function's qualified name (`<module>` for a module's body).
    pub function: String,
    /// The source file.
    pub file: String,
    /// The line, when the location table gives one.
    pub line: Option<u32>,
}

/// Code objects read so far, per process and address. A code object lives as long as its
/// function, and one freed and another allocated at the same address is possible: callers
/// drop a process's entries when it execs or exits ([`PyNames::forget`]).
#[derive(Default)]
pub struct PyNames {
    codes: HashMap<(u32, u64), Arc<Code>>,
}

impl PyNames {
    /// Names `frame` of `pid`, reading its code object on first sight.
    pub fn name(&mut self, pid: u32, o: &Offsets, frame: RawFrame) -> Result<Named, PyError> {
        let code = match self.codes.get(&(pid, frame.code)) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(Code::read(&Mem { pid }, o, frame.code)?);
                self.codes.insert((pid, frame.code), c.clone());
                c
            }
        };
        Ok(Named {
            function: code.qualname.clone(),
            file: code.filename.clone(),
            line: code.line(frame.unit),
        })
    }

    /// Drops what is known of `pid`'s code objects.
    pub fn forget(&mut self, pid: u32) {
        self.codes.retain(|&(p, _), _| p != pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_table_short_one_line_no_column_long_and_none() {
        // Entry byte: 0x80 | code << 3 | (units - 1).
        let table = [
            0x80 | (13 << 3) | 1, // 2 units, no column: line delta svarint
            2 << 1,               // +2
            0x80 | (11 << 3),     // 1 unit, one-line form: +1
            4,
            9,
            0x80 | (5 << 3) | 2, // 3 units, short form: same line
            7,
            0x80 | (10 << 3), // 1 unit, one-line form with no line change
            4,
            9,
            0x80 | (15 << 3), // 1 unit, no location
            0x80 | (14 << 3), // 1 unit, long form
            (3 << 1) | 1,     // -3
            0,
            1,
            1,
            0x80 | (13 << 3), // 1 unit, a delta needing two varint chunks: +40
            0x40 | ((40 << 1) & 0x3f),
            (40 << 1) >> 6,
        ];
        let lines: Vec<_> = (0..11).map(|u| line_for(&table, 10, u)).collect();
        assert_eq!(
            lines,
            [
                Some(12),
                Some(12),
                Some(13),
                Some(13),
                Some(13),
                Some(13),
                Some(13),
                None,
                Some(10),
                Some(50),
                None
            ]
        );
        // A table torn mid-way names nothing rather than a wrong line.
        assert_eq!(line_for(&[0x80 | (13 << 3), 4, 0x12], 10, 2), None);
    }

    #[test]
    fn offsets_row_for_311_only() {
        assert_eq!(python::offsets(3, 11).map(|o| o.version), Some(0x030b));
        assert_eq!(python::offsets(3, 10), None);
    }

    /// A script whose main thread blocks at a known line, three calls deep, one of them a
    /// method (so `co_qualname` is `Zone.check`).
    const SCRIPT: &str = "import sys, time

class Zone:
    def check(self):
        return inner()

def inner():
    print('ready', flush=True); time.sleep(60)

def outer():
    return Zone().check()

outer()
";

    /// Debian's interpreter, read live: the offsets row, `_PyRuntime` found from the ELF
    /// symbol, the thread list, the frame chain, strings and the line table all have to be
    /// right for the exact names and lines to come out.
    #[test]
    fn live_python311_stack_names_functions_files_and_lines() {
        use std::io::BufRead;
        let exe = Path::new("/usr/bin/python3");
        if inspect_elf(exe).map(|v| v.0) != Some((3, 11)) {
            eprintln!("skipped: /usr/bin/python3 is not CPython 3.11");
            return;
        }
        let dir = std::env::temp_dir().join(format!("leaktrace-py-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("zone.py");
        std::fs::write(&script, SCRIPT).unwrap();
        let mut child = std::process::Command::new(exe)
            .arg(&script)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut line = String::new();
        io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");

        let py = detect(pid).expect("CPython 3.11 detected in the child");
        assert_eq!(py.version, (3, 11));
        let mem = Mem { pid };
        let threads = walk_threads(&mem, &py).unwrap();
        let mut names = PyNames::default();
        let named: Vec<_> = threads
            .iter()
            .map(|t| {
                let frames: Vec<_> = t
                    .frames
                    .iter()
                    .map(|&f| {
                        let n = names.name(pid, py.offsets, f).unwrap();
                        (n.function, n.file, n.line)
                    })
                    .collect();
                (t.tid, frames)
            })
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);

        let file = script.to_string_lossy().into_owned();
        let at = |f: &str, l| (f.to_string(), file.clone(), Some(l));
        assert_eq!(
            named,
            [(
                pid,
                vec![
                    at("inner", 8),
                    at("Zone.check", 5),
                    at("outer", 11),
                    at("<module>", 13)
                ]
            )]
        );
        // The cache holds one entry per code object, and forgets the process.
        assert_eq!(names.codes.len(), 4);
        names.forget(pid);
        assert!(names.codes.is_empty());
    }
}
