//! Unwind tables: a module's `.eh_frame` (or `.debug_frame`) compiled into the compact rows
//! the kernel-side stack walker binary-searches ([`UnwindRow`]), and [`walk`], the same walk
//! in user space, which tests hold against glibc's own unwinder.
//!
//! Per code range, a row says where the caller's frame starts (the CFA, from `rsp` or `rbp`),
//! that the return address sits just below it, and where `rbp` was saved. Anything the
//! walker cannot express — DWARF expressions, signal frames, registers copied elsewhere — is
//! marked so the walker falls back to the frame pointer there.
use std::{fs::File, path::Path};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, LittleEndian, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use leaktrace_common::{UNWIND_PAGE_SHIFT, UnwindRow, unwind_kind};
use object::{Object as _, ObjectSection as _};

/// Why a module has no table.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("cannot open: {0}")]
    /// The file could not be opened or mapped into memory.
    Open(#[from] std::io::Error),
    #[error("cannot read ELF file: {0}")]
    /// The file is not a readable ELF file.
    Elf(#[from] object::Error),
    #[error("cannot parse unwind information: {0}")]
    /// Its `.eh_frame` or `.debug_frame` is malformed.
    Dwarf(#[from] gimli::Error),
    #[error("no .eh_frame or .debug_frame")]
    /// The file has neither `.eh_frame` nor `.debug_frame`.
    NoUnwindInfo,
    #[error("code beyond 4 GiB in the file")]
    /// Code lies beyond 4 GiB in the file, past what [`UnwindRow::pc`] holds.
    TooLarge,
}

/// A compiled table and how it was made.
#[derive(Clone, Debug, Default)]
pub struct UnwindTable {
    /// Sorted by `pc` (a file offset); the last row covers everything after it.
    pub rows: Vec<UnwindRow>,
    /// Frame description entries read.
    pub fdes: usize,
    /// Rows whose rule could not be expressed (the walker falls back to frame pointers).
    pub unsupported: usize,
}

impl UnwindTable {
    /// For each page (`1 << UNWIND_PAGE_SHIFT` bytes) of the file from offset 0 through the
    /// last row, the index of the row covering the page's first byte (0 before the first).
    pub fn page_index(&self) -> Vec<u32> {
        let Some(last) = self.rows.last() else {
            return Vec::new();
        };
        let pages = (last.pc >> UNWIND_PAGE_SHIFT) as usize + 2;
        (0..pages)
            .map(|p| {
                let start = (p as u64) << UNWIND_PAGE_SHIFT;
                self.rows
                    .partition_point(|r| u64::from(r.pc) <= start)
                    .saturating_sub(1) as u32
            })
            .collect()
    }

    /// The row covering file offset `pc`.
    pub fn lookup(&self, pc: u64) -> Option<&UnwindRow> {
        let pc = u32::try_from(pc).ok()?;
        let i = self.rows.partition_point(|r| r.pc <= pc).checked_sub(1)?;
        Some(&self.rows[i])
    }

    /// Bytes the rows take in the kernel.
    pub fn bytes(&self) -> usize {
        self.rows.len() * size_of::<UnwindRow>()
    }
}

/// A rule for one address range, before it is turned into a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    kind: u8,
    cfa_off: u16,
    rbp_off: i8,
}

const NO_INFO: Rule = Rule {
    kind: unwind_kind::NO_INFO,
    cfa_off: 0,
    rbp_off: 0,
};
const UNSUPPORTED: Rule = Rule {
    kind: unwind_kind::UNSUPPORTED,
    cfa_off: 0,
    rbp_off: 0,
};

fn rule<T: gimli::ReaderOffset>(row: &gimli::UnwindTableRow<T>, in_plt: bool) -> Rule {
    // An undefined return address marks the outermost frame (_start, thread start).
    if matches!(row.register(X86_64::RA), Some(RegisterRule::Undefined)) {
        return Rule {
            kind: unwind_kind::END,
            cfa_off: 0,
            rbp_off: 0,
        };
    }
    let (kind, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => {
            (unwind_kind::CFA_RSP, *offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => {
            (unwind_kind::CFA_RBP, *offset)
        }
        // PLT stubs describe their CFA with a fixed expression on rip; we know its meaning.
        CfaRule::Expression(_) if in_plt => {
            return Rule {
                kind: unwind_kind::PLT,
                cfa_off: 8,
                rbp_off: 0,
            };
        }
        _ => return UNSUPPORTED,
    };
    let Ok(cfa_off) = u16::try_from(offset) else {
        return UNSUPPORTED;
    };
    // The return address must be right below the CFA, as the x86-64 ABI has it.
    match row.register(X86_64::RA) {
        None | Some(RegisterRule::Offset(-8)) => {}
        Some(_) => return UNSUPPORTED,
    }
    let rbp_off = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) | Some(RegisterRule::Undefined) => 0,
        Some(RegisterRule::Offset(off)) if off % 8 == 0 && off != 0 => {
            match i8::try_from(off / 8) {
                Ok(o) => o,
                Err(_) => return UNSUPPORTED,
            }
        }
        Some(_) => return UNSUPPORTED,
    };
    Rule {
        kind,
        cfa_off,
        rbp_off,
    }
}

/// Collects `(start, end, rule)` for every row of every FDE of a CFI section.
fn collect<R, S>(
    section: &S,
    bases: &BaseAddresses,
    plt: &[(u64, u64)],
    out: &mut Vec<(u64, u64, Rule)>,
) -> Result<usize, gimli::Error>
where
    R: gimli::Reader,
    S: UnwindSection<R>,
{
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    let mut fdes = 0;
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        // One malformed FDE (seen in hand-written assembly) must not cost the whole module.
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
            continue;
        };
        fdes += 1;
        let in_plt = plt
            .iter()
            .any(|&(s, e)| fde.initial_address() >= s && fde.initial_address() < e);
        if fde.is_signal_trampoline() {
            let signal = Rule {
                kind: unwind_kind::SIGNAL,
                cfa_off: 0,
                rbp_off: 0,
            };
            out.push((fde.initial_address(), fde.end_address(), signal));
            continue;
        }
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else {
            continue;
        };
        while let Ok(Some(row)) = table.next_row() {
            if row.start_address() < row.end_address() {
                out.push((row.start_address(), row.end_address(), rule(row, in_plt)));
            }
        }
    }
    Ok(fdes)
}

/// Reads the `.debug_frame` of `elf`, if it has one.
fn debug_frame<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    bases: &BaseAddresses,
    plt: &[(u64, u64)],
    out: &mut Vec<(u64, u64, Rule)>,
) -> Result<usize, gimli::Error> {
    let Some(data) = elf
        .section_by_name(".debug_frame")
        .and_then(|s| s.data().ok())
    else {
        return Ok(0);
    };
    let mut frame = DebugFrame::new(data, LittleEndian);
    frame.set_address_size(8);
    collect(&frame, bases, plt, out)
}

/// Where distributions install separate debug files, keyed by build id.
pub const DEBUG_DIRS: &[&str] = &["/usr/lib/debug"];

/// The separate debug file of `elf` (`.build-id/xx/rest.debug` under a debug directory).
fn debug_file<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>) -> Option<File> {
    let id = elf.build_id().ok()??;
    if id.len() < 2 {
        return None;
    }
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    DEBUG_DIRS.iter().find_map(|dir| {
        File::open(format!("{dir}/.build-id/{}/{}.debug", &hex[..2], &hex[2..])).ok()
    })
}

/// Compiles the unwind table of the ELF file at `path`.
pub fn compile_path(path: &Path) -> Result<UnwindTable, UnwindError> {
    compile(&File::open(path)?)
}

/// Compiles the unwind table of an ELF file: `.eh_frame`, and `.debug_frame` for code that
/// `.eh_frame` does not cover.
pub fn compile(file: &File) -> Result<UnwindTable, UnwindError> {
    let data = crate::targets::modules::map_file(file)?;
    let elf = object::File::parse(&*data)?;
    let bases = base_addresses(&elf);
    let plt = plt_ranges(&elf);

    let mut ranges = Vec::new();
    let mut fdes = eh_frame(&elf, &bases, &plt, &mut ranges)?;
    let mut debug = Vec::new();
    fdes += own_or_separate_debug_frame(&elf, &bases, &plt, &mut debug)?;
    add_uncovered(&mut ranges, debug);
    if fdes == 0 {
        return Err(UnwindError::NoUnwindInfo);
    }

    let offsets = crate::targets::modules::FileOffsets::of(&elf);
    let (rows, unsupported) = rows_of(ranges, |addr| offsets.get(addr))?;
    Ok(UnwindTable {
        rows,
        fdes,
        unsupported,
    })
}

/// The section addresses pointer encodings in CFI may be relative to.
fn base_addresses<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>) -> BaseAddresses {
    let mut bases = BaseAddresses::default();
    if let Some(text) = elf.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = elf.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    bases
}

/// The address ranges of the PLT sections, whose stubs get their own rule.
fn plt_ranges<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>) -> Vec<(u64, u64)> {
    elf.sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
        .map(|s| (s.address(), s.address() + s.size()))
        .collect()
}

/// Collects the ranges of the `.eh_frame` of `elf` into `out`; returns how many FDEs it read.
fn eh_frame<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    bases: &BaseAddresses,
    plt: &[(u64, u64)],
    out: &mut Vec<(u64, u64, Rule)>,
) -> Result<usize, gimli::Error> {
    let Some(eh) = elf.section_by_name(".eh_frame") else {
        return Ok(0);
    };
    let Ok(data) = eh.data() else {
        return Ok(0);
    };
    let bases = bases.clone().set_eh_frame(eh.address());
    collect(&EhFrame::new(data, LittleEndian), &bases, plt, out)
}

/// Collects the ranges of the `.debug_frame` of `elf`, or else of its separate debug file,
/// into `out`; returns how many FDEs it read.
fn own_or_separate_debug_frame<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    bases: &BaseAddresses,
    plt: &[(u64, u64)],
    out: &mut Vec<(u64, u64, Rule)>,
) -> Result<usize, gimli::Error> {
    let own = debug_frame(elf, bases, plt, out)?;
    if own != 0 {
        return Ok(own);
    }
    // Stripped of its debug info: a separate debug file, found by build id, may hold a
    // .debug_frame. Its addresses are the same; file offsets still come from this file.
    if let Some(file) = debug_file(elf)
        && let Ok(data) = crate::targets::modules::map_file(&file)
        && let Ok(dbg) = object::File::parse(&*data)
    {
        return debug_frame(&dbg, bases, plt, out);
    }
    Ok(0)
}

/// Adds to the `.eh_frame` ranges the `.debug_frame` ones that start where `.eh_frame` says
/// nothing.
fn add_uncovered(ranges: &mut Vec<(u64, u64, Rule)>, debug: Vec<(u64, u64, Rule)>) {
    let mut eh: Vec<(u64, u64)> = ranges.iter().map(|&(s, e, _)| (s, e)).collect();
    eh.sort_unstable();
    ranges.extend(debug.into_iter().filter(|&(s, _, _)| {
        let i = eh.partition_point(|&(es, _)| es <= s);
        i == 0 || eh[i - 1].1 <= s
    }));
}

/// Turns address ranges into rows keyed by file offset (`file_offset` of an address), with
/// a no-info row in each gap and after the last; also counts the unsupported ranges.
fn rows_of(
    mut ranges: Vec<(u64, u64, Rule)>,
    file_offset: impl Fn(u64) -> Option<u64>,
) -> Result<(Vec<UnwindRow>, usize), UnwindError> {
    ranges.sort_by_key(|&(start, _, _)| start);
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(ranges.len());
    let mut unsupported = 0;
    let mut prev_end = 0u64;
    for (start, end, r) in ranges {
        let (Some(start_off), Some(end_off)) = (file_offset(start), file_offset(end - 1)) else {
            continue;
        };
        if start > prev_end && prev_end != 0 {
            // A gap between functions: no rule from the previous one may leak into it.
            if let Some(gap) = file_offset(prev_end) {
                push_row(&mut rows, gap, NO_INFO)?;
            }
        }
        if r.kind == unwind_kind::UNSUPPORTED {
            unsupported += 1;
        }
        push_row(&mut rows, start_off, r)?;
        prev_end = prev_end.max(end);
        let _ = end_off;
    }
    if let Some(end) = file_offset(prev_end.saturating_sub(1)) {
        push_row(&mut rows, end + 1, NO_INFO)?;
    }
    Ok((rows, unsupported))
}

/// Appends the row for `r` from file offset `offset` on.
fn push_row(rows: &mut Vec<UnwindRow>, offset: u64, r: Rule) -> Result<(), UnwindError> {
    let pc = u32::try_from(offset).map_err(|_| UnwindError::TooLarge)?;
    let row = UnwindRow {
        pc,
        cfa_off: r.cfa_off,
        rbp_off: r.rbp_off,
        kind: r.kind,
    };
    match rows.last_mut() {
        // Equal neighbours merge; a later row at the same pc replaces an earlier one.
        Some(last)
            if (last.kind, last.cfa_off, last.rbp_off) == (row.kind, row.cfa_off, row.rbp_off) => {}
        Some(last) if last.pc == row.pc => *last = row,
        _ => rows.push(row),
    }
    Ok(())
}

/// Registers at the start of a walk.
#[derive(Clone, Copy, Debug)]
pub struct Regs {
    /// Instruction pointer (rip).
    pub pc: u64,
    /// Stack pointer (rsp).
    pub sp: u64,
    /// Frame pointer (rbp).
    pub bp: u64,
}

/// Why a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// The outermost frame was reached.
    Complete,
    /// `max` frames were collected.
    Truncated,
    /// A frame could not be unwound (no rule and no frame pointer, unreadable memory).
    Broken,
}

/// The stack walk the kernel side does, in user space: from `regs` (where `pc` is a return
/// address unless `first_is_pc`), find each caller with `table_for(pc)` → (table, file
/// offset of pc) and `read(addr)` for stack memory. Mirrors `leaktrace-ebpf/src/stack.rs`.
pub fn walk<'t>(
    regs: Regs,
    first_is_pc: bool,
    max: usize,
    table_for: impl Fn(u64) -> Option<(&'t UnwindTable, u64)>,
    read: impl Fn(u64) -> Option<u64>,
) -> (Vec<u64>, WalkEnd) {
    let mut frames = vec![regs.pc];
    let (mut pc, mut sp, mut bp) = (regs.pc, regs.sp, regs.bp);
    let mut exact = first_is_pc;
    loop {
        if frames.len() >= max {
            return (frames, WalkEnd::Truncated);
        }
        // A return address points after its call: look up the call itself.
        let lookup = if exact { pc } else { pc - 1 };
        exact = false;
        let row = table_for(lookup)
            .and_then(|(t, off)| t.lookup(off))
            .copied();
        if row.map(|r| r.kind) == Some(unwind_kind::SIGNAL) {
            // Back into the code the signal interrupted, at its exact instruction.
            let Some(next) = interrupted(sp, &read) else {
                return (frames, WalkEnd::Broken);
            };
            frames.push(next.pc);
            (pc, sp, bp) = (next.pc, next.sp, next.bp);
            exact = true;
            continue;
        }
        let (cfa, next_bp) = match caller_frame(row, lookup, sp, bp, &read) {
            Ok(frame) => frame,
            Err(end) => return (frames, end),
        };
        let (Some(ret), Some(next_bp)) = (read(cfa - 8), next_bp) else {
            return (frames, WalkEnd::Broken);
        };
        // The stack only grows towards callers; anything else is garbage, and this also
        // guarantees the walk ends.
        if ret == 0 || cfa <= sp {
            return (
                frames,
                if ret == 0 {
                    WalkEnd::Complete
                } else {
                    WalkEnd::Broken
                },
            );
        }
        frames.push(ret);
        (pc, sp, bp) = (ret, cfa, next_bp);
    }
}

/// At a signal frame whose `ucontext` is at `sp`: the registers of the code the signal
/// interrupted. A handler may run on another stack, so sp need not grow here.
fn interrupted(sp: u64, read: &impl Fn(u64) -> Option<u64>) -> Option<Regs> {
    let next = (
        read(sp + unwind_kind::UC_RIP),
        read(sp + unwind_kind::UC_RSP),
        read(sp + unwind_kind::UC_RBP),
    );
    let (Some(pc), Some(sp), Some(bp)) = next else {
        return None;
    };
    Some(Regs { pc, sp, bp })
}

/// Where the caller's frame starts (the CFA) and the caller's rbp (`None` when it cannot be
/// read), by the `row` covering `lookup`; or why the walk ends here.
fn caller_frame(
    row: Option<UnwindRow>,
    lookup: u64,
    sp: u64,
    bp: u64,
    read: &impl Fn(u64) -> Option<u64>,
) -> Result<(u64, Option<u64>), WalkEnd> {
    match row.map(|r| r.kind) {
        Some(unwind_kind::END) => Err(WalkEnd::Complete),
        Some(unwind_kind::CFA_RSP | unwind_kind::CFA_RBP | unwind_kind::PLT) => {
            let r = row.unwrap_or_default();
            let base = if r.kind == unwind_kind::CFA_RBP {
                bp
            } else {
                sp
            };
            let mut cfa = base + u64::from(r.cfa_off);
            if r.kind == unwind_kind::PLT && (lookup & 15) >= 11 {
                cfa += 8;
            }
            let next_bp = if r.rbp_off == 0 {
                Some(bp)
            } else {
                read(cfa.wrapping_add_signed(i64::from(r.rbp_off) * 8))
            };
            Ok((cfa, next_bp))
        }
        // No usable rule: the frame pointer, if the frame has one.
        _ => {
            if bp == 0 || bp < sp {
                return Err(WalkEnd::Broken);
            }
            Ok((bp + 16, read(bp)))
        }
    }
}

/// The native unwinder: `.eh_frame`, or `.debug_frame` from the file or its separate debug
/// file.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dwarf;

impl super::Unwinder for Dwarf {
    fn name(&self) -> &'static str {
        "dwarf"
    }

    fn compile(&self, path: &Path) -> Result<UnwindTable, UnwindError> {
        compile_path(path)
    }
}

#[cfg(test)]
#[path = "dwarf_tests.rs"]
mod tests;
