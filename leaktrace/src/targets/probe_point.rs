//! Where to put an allocator probe so that the kernel never single-steps it.
//!
//! An x86 uprobe replaces an instruction with `int3`. When it fires, the kernel either
//! *emulates* the displaced instruction (near jumps and calls, conditional jumps, `push` of a
//! register, the canonical nops: arch/x86/kernel/uprobes.c) or copies it out of line and
//! single-steps it, which traps twice more: ~0.7 µs against ~9.4 µs a hit on a VM. glibc's
//! `free` starts with `test %rdi,%rdi`, single-stepped; three bytes further is a `je`,
//! emulated, with `%rdi` still holding the argument.
//!
//! So each function's code is decoded and the probe goes on the first instruction the kernel
//! emulates, provided that it is safe there:
//! - it lies in the function's first basic block: every instruction before it falls through
//!   (no branch, call or return), so reaching it means the function was entered, once;
//! - no direct branch anywhere in the function lands after the entry and at or before it, so
//!   it is reached from the entry only;
//! - the instructions before it write neither the argument registers the program reads nor
//!   the stack pointer nor any memory, so the arguments are intact and `[rsp]` still holds
//!   the return address that a return probe at the same point replaces.
//!
//! Otherwise the probe stays at the entry (slower, never wrong), and the caller logs why.
use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess};

pub use leaktrace_common::arg_regs as regs;

/// How far into a function the search for an emulated instruction goes.
const MAX_SKIPPED: usize = 16;

/// The chosen probe point of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    /// Bytes from the function's entry.
    pub delta: u64,
    /// True when the kernel emulates the instruction there (no single-step).
    pub emulated: bool,
}

impl ProbePoint {
    const ENTRY_SINGLE_STEPPED: Self = Self {
        delta: 0,
        emulated: false,
    };
}

/// The canonical x86-64 nops the kernel compares against (`x86_nops`, by length).
const NOPS: [&[u8]; 9] = [
    &[],
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// True when the kernel emulates `bytes` (one whole instruction) at a uprobe. A strict
/// subset of what it accepts: the unprefixed encodings only.
pub fn kernel_emulates(bytes: &[u8]) -> bool {
    match bytes {
        // push %reg, push %r8..%r15
        [0x50..=0x57] | [0x41, 0x50..=0x57] => true,
        // jmp rel8, jcc rel8
        [0xeb, _] | [0x70..=0x7f, _] => true,
        // jmp rel32, call rel32
        [0xe9, _, _, _, _] | [0xe8, _, _, _, _] => true,
        // jcc rel32
        [0x0f, 0x80..=0x8f, _, _, _, _] => true,
        _ => NOPS.get(bytes.len()).is_some_and(|nop| *nop == bytes),
    }
}

/// Why a function keeps its probe at the (single-stepped) entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoSafePoint {
    #[error("its code could not be decoded")]
    /// The decoder could not make sense of the entry code.
    Undecodable,
    #[error("no emulated instruction before {0}")]
    /// An instruction that cannot be skipped (named here) comes before any emulated one.
    Blocked(String),
    #[error("no emulated instruction in its first {MAX_SKIPPED} instructions")]
    /// No emulated instruction within the first `MAX_SKIPPED` (16) instructions.
    TooFar,
}

/// Chooses the probe point of the function whose code is `code` (its whole body, as its
/// symbol's size gives), loaded at virtual address `ip`; `reads` are the [`regs`] the probe
/// program reads. The entry when the kernel emulates it; else the first emulated instruction
/// of the first basic block that is safe (see the module's documentation).
pub fn place(code: &[u8], ip: u64, reads: u8) -> Result<ProbePoint, NoSafePoint> {
    let insns: Vec<_> = Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
        .into_iter()
        .collect();
    let first = insns.first().ok_or(NoSafePoint::Undecodable)?;
    if first.is_invalid() {
        return Err(NoSafePoint::Undecodable);
    }
    if kernel_emulates(insn_bytes(code, ip, first)) {
        return Ok(ProbePoint {
            delta: 0,
            emulated: true,
        });
    }
    let targets = branch_targets(&insns, ip, ip + code.len() as u64);
    let mut info = InstructionInfoFactory::new();
    for (n, insn) in insns.iter().enumerate().take(MAX_SKIPPED) {
        if insn.is_invalid() {
            return Err(NoSafePoint::Undecodable);
        }
        if n > 0 {
            if targets.iter().any(|&t| t <= insn.ip()) {
                return Err(NoSafePoint::Blocked(format!(
                    "a branch into the entry block, at +{}",
                    insn.ip() - ip
                )));
            }
            if kernel_emulates(insn_bytes(code, ip, insn)) {
                return Ok(ProbePoint {
                    delta: insn.ip() - ip,
                    emulated: true,
                });
            }
        }
        // `insn` runs before the probe point: it must leave what the probe reads intact.
        if insn.flow_control() != FlowControl::Next || insn.code() == Code::INVALID {
            return Err(NoSafePoint::Blocked(format!(
                "the end of the entry block, at +{}",
                insn.ip() - ip
            )));
        }
        if clobbers(&mut info, insn, reads) {
            return Err(NoSafePoint::Blocked(format!(
                "an instruction that writes a register or memory the probe needs, at +{}",
                insn.ip() - ip
            )));
        }
    }
    Err(NoSafePoint::TooFar)
}

/// The bytes of `insn`, one of those decoded from `code` loaded at `ip`.
fn insn_bytes<'c>(code: &'c [u8], ip: u64, insn: &iced_x86::Instruction) -> &'c [u8] {
    let start = (insn.ip() - ip) as usize;
    &code[start..start + insn.len()]
}

/// Direct branch targets inside the function (`ip..end`), past its entry.
fn branch_targets(insns: &[iced_x86::Instruction], ip: u64, end: u64) -> Vec<u64> {
    insns
        .iter()
        .filter(|i| {
            matches!(
                i.flow_control(),
                FlowControl::UnconditionalBranch
                    | FlowControl::ConditionalBranch
                    | FlowControl::Call
                    | FlowControl::XbeginXabortXend
            )
        })
        .map(|i| i.near_branch_target())
        .filter(|&t| t > ip && t < end)
        .collect()
}

/// True when `insn` writes the stack pointer, one of the argument registers in `reads`, or
/// any memory.
fn clobbers(info: &mut InstructionInfoFactory, insn: &iced_x86::Instruction, reads: u8) -> bool {
    let used = info.info(insn);
    let writes =
        |a: OpAccess| !matches!(a, OpAccess::Read | OpAccess::None | OpAccess::NoMemAccess);
    used.used_registers().iter().any(|r| {
        writes(r.access())
            && match r.register().full_register() {
                iced_x86::Register::RSP => true,
                iced_x86::Register::RDI => reads & regs::RDI != 0,
                iced_x86::Register::RSI => reads & regs::RSI != 0,
                iced_x86::Register::RDX => reads & regs::RDX != 0,
                _ => false,
            }
    }) || used.used_memory().iter().any(|m| writes(m.access()))
}

/// The one function `code` hands every call to, when it is a wrapper that tail-calls it:
/// the function's only way out other than returning is one direct `jmp` out of its body,
/// and it contains no call, indirect branch or system call. Such a wrapper (glibc's
/// `reallocarray` checks for overflow, then jumps to `realloc`) allocates nothing itself on
/// any path, so probing its target sees all it does.
pub fn tail_call_target(code: &[u8], ip: u64) -> Option<u64> {
    let end = ip + code.len() as u64;
    let mut target = None;
    for insn in Decoder::with_ip(64, code, ip, DecoderOptions::NONE) {
        match insn.flow_control() {
            FlowControl::Next | FlowControl::Return | FlowControl::ConditionalBranch
                if !insn.is_invalid() && insn.mnemonic() != iced_x86::Mnemonic::Syscall =>
            {
                let t = insn.near_branch_target();
                if insn.flow_control() == FlowControl::ConditionalBranch && !(ip..end).contains(&t)
                {
                    return None;
                }
            }
            FlowControl::UnconditionalBranch => {
                let t = insn.near_branch_target();
                if !(ip..end).contains(&t) {
                    if target.is_some_and(|old| old != t) {
                        return None;
                    }
                    target = Some(t);
                }
            }
            // Padding after the last instruction.
            FlowControl::Interrupt if insn.mnemonic() == iced_x86::Mnemonic::Int3 => {}
            _ => return None,
        }
    }
    target
}

/// The GOT slot a PLT stub at `code` jumps through (`[endbr64;] [bnd] jmp *slot(%rip)`).
pub fn plt_slot(code: &[u8], ip: u64) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut insn = decoder.decode();
    if insn.mnemonic() == iced_x86::Mnemonic::Endbr64 {
        insn = decoder.decode();
    }
    (insn.flow_control() == FlowControl::IndirectBranch && insn.is_ip_rel_memory_operand())
        .then(|| insn.ip_rel_memory_address())
}

/// [`place`], falling back to the entry.
pub fn place_or_entry(code: &[u8], ip: u64, reads: u8) -> (ProbePoint, Option<NoSafePoint>) {
    match place(code, ip, reads) {
        Ok(point) => (point, None),
        Err(why) => (ProbePoint::ENTRY_SINGLE_STEPPED, Some(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: u64 = 0x1000;

    #[test]
    fn an_emulated_entry_stays_at_the_entry() {
        // push %r12; push %rbp (glibc 2.36 malloc)
        let code = [0x41, 0x54, 0x55, 0xc3];
        assert_eq!(
            place(&code, IP, regs::RDI),
            Ok(ProbePoint {
                delta: 0,
                emulated: true
            })
        );
    }

    #[test]
    fn free_moves_past_its_test_to_the_je() {
        // test %rdi,%rdi; je +0x10; push %rbp; ...; ret
        let mut code = vec![0x48, 0x85, 0xff, 0x74, 0x10, 0x55];
        code.resize(0x15, 0x90);
        code.push(0xc3);
        assert_eq!(
            place(&code, IP, regs::RDI),
            Ok(ProbePoint {
                delta: 3,
                emulated: true
            })
        );
    }

    #[test]
    fn a_read_only_compare_then_push_moves_to_the_push() {
        // cmpb $0,0x10(%rip); push %r12; mov %rdx,%r12 (glibc posix_memalign)
        let code = [
            0x80, 0x3d, 0x10, 0x00, 0x00, 0x00, 0x00, 0x41, 0x54, 0x49, 0x89, 0xd4, 0xc3,
        ];
        assert_eq!(
            place(&code, IP, regs::RDI | regs::RSI | regs::RDX),
            Ok(ProbePoint {
                delta: 7,
                emulated: true
            })
        );
    }

    #[test]
    fn an_argument_overwritten_first_keeps_the_entry() {
        // mov $0,%edi; push %rbx
        let code = [0xbf, 0x00, 0x00, 0x00, 0x00, 0x53, 0xc3];
        assert!(matches!(
            place(&code, IP, regs::RDI),
            Err(NoSafePoint::Blocked(_))
        ));
        // The same code is fine for a probe that reads only %rsi.
        assert_eq!(place(&code, IP, regs::RSI).map(|p| p.delta), Ok(5));
    }

    #[test]
    fn a_moved_stack_pointer_or_a_memory_write_keeps_the_entry() {
        // sub $8,%rsp; push %rbx
        let code = [0x48, 0x83, 0xec, 0x08, 0x53, 0xc3];
        assert!(place(&code, IP, 0).is_err());
        // mov %rdi,(%rax); push %rbx
        let code = [0x48, 0x89, 0x38, 0x53, 0xc3];
        assert!(place(&code, IP, 0).is_err());
    }

    #[test]
    fn a_branch_into_the_entry_block_keeps_the_entry() {
        // test %rdi,%rdi; je +2 (to the ret); ret; ... jmp back to +3
        let code = [0x48, 0x85, 0xff, 0x74, 0x01, 0xc3, 0xeb, 0xfb];
        assert!(matches!(
            place(&code, IP, regs::RDI),
            Err(NoSafePoint::Blocked(why)) if why.contains("branch into")
        ));
    }

    #[test]
    fn a_call_or_return_before_any_emulated_instruction_ends_the_search() {
        // test %rdi,%rdi; ret
        let code = [0x48, 0x85, 0xff, 0xc3];
        assert!(place(&code, IP, regs::RDI).is_err());
        let (point, why) = place_or_entry(&code, IP, regs::RDI);
        assert_eq!(point, ProbePoint::ENTRY_SINGLE_STEPPED);
        assert!(why.is_some());
    }

    #[test]
    fn a_wrapper_that_only_tail_calls_names_its_target() {
        // glibc 2.36 reallocarray: mov %rsi,%rax; mul %rdx; mov %rax,%rsi; jo +5;
        // jmp realloc@plt; (overflow:) mov ...,%rax; movl $0xc,%fs:(%rax); xor %eax,%eax; ret
        let code = [
            0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05, 0xe9, 0x40, 0xb8,
            0xf8, 0xff, 0x48, 0x8b, 0x05, 0xe9, 0x85, 0x13, 0x00, 0x64, 0xc7, 0x00, 0x0c, 0x00,
            0x00, 0x00, 0x31, 0xc0, 0xc3,
        ];
        let ip = 0x9a7e0;
        assert!(place(&code, ip, regs::RDI | regs::RSI | regs::RDX).is_err());
        assert_eq!(tail_call_target(&code, ip), Some(0x26030));
        // A call anywhere in it, and it is no longer a pure wrapper.
        let mut called = code;
        called[11] = 0xe8;
        assert_eq!(tail_call_target(&called, ip), None);
        // jmp *0x1000(%rip) through a PLT stub, with endbr64 in front.
        let stub = [
            0xf3, 0x0f, 0x1e, 0xfa, 0xf2, 0xff, 0x25, 0x00, 0x10, 0x00, 0x00,
        ];
        assert_eq!(plt_slot(&stub, 0x5000), Some(0x5000 + 11 + 0x1000));
    }

    #[test]
    fn only_the_unprefixed_forms_count_as_emulated() {
        assert!(kernel_emulates(&[0x0f, 0x1f, 0x44, 0x00, 0x00]));
        assert!(kernel_emulates(&[0x0f, 0x84, 1, 2, 3, 4]));
        // endbr64, a 0x66-prefixed call, test, mov: single-stepped.
        assert!(!kernel_emulates(&[0xf3, 0x0f, 0x1e, 0xfa]));
        assert!(!kernel_emulates(&[0x66, 0xe8, 0, 0]));
        assert!(!kernel_emulates(&[0x48, 0x85, 0xff]));
        // A nop with a non-canonical operand.
        assert!(!kernel_emulates(&[0x0f, 0x1f, 0x44, 0x00, 0x01]));
    }
}
