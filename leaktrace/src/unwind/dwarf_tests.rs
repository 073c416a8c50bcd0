//! Unit tests of [`super`]: tables compiled from real binaries, walks held against glibc.
use super::*;
use crate::targets::procfs;

fn mapped(name: &str) -> Option<String> {
    procfs::read_maps(std::process::id())
        .ok()?
        .into_iter()
        .find(|m| m.path.contains(name))
        .map(|m| m.path)
}

#[test]
fn plt_stubs_get_their_own_rule() {
    let Some(libc) = mapped("libc.so") else {
        return;
    };
    let t = compile_path(Path::new(&libc)).unwrap();
    assert!(
        t.rows.iter().any(|r| r.kind == unwind_kind::PLT),
        "libc's .plt has an expression CFA"
    );
    assert!(
        t.rows.iter().any(|r| r.kind == unwind_kind::SIGNAL),
        "__restore_rt is a signal trampoline"
    );
    assert!(
        t.rows.iter().any(|r| r.kind == unwind_kind::END),
        "clone/start_thread end the stack"
    );
}

#[test]
fn glibc_compiles_into_a_compact_sorted_table() {
    let Some(libc) = mapped("libc.so") else {
        return;
    };
    let t = compile_path(Path::new(&libc)).unwrap();
    assert!(t.fdes > 1000, "{} FDEs", t.fdes);
    assert!(
        t.rows.windows(2).all(|w| w[0].pc < w[1].pc),
        "sorted, no duplicates"
    );
    assert!(
        t.unsupported * 50 < t.rows.len(),
        "{} of {} rows unsupported",
        t.unsupported,
        t.rows.len()
    );
    // malloc's first instruction: nothing pushed yet, the caller's frame is rsp + 8.
    let info = crate::targets::modules::inspect_path(&libc);
    let malloc = info
        .allocator
        .iter()
        .find(|e| e.symbol == "malloc")
        .unwrap()
        .offset;
    // The page index narrows every lookup to the rows of one page.
    let index = t.page_index();
    let every_row = t
        .rows
        .iter()
        .flat_map(|r| [u64::from(r.pc), u64::from(r.pc) + 1]);
    for off in [malloc, malloc + 3, 0x30000].into_iter().chain(every_row) {
        let page = (off >> UNWIND_PAGE_SHIFT) as usize;
        let (lo, hi) = (index[page] as usize, index[page + 1] as usize + 1);
        let narrowed = &t.rows[lo..hi.min(t.rows.len())];
        let i = narrowed.partition_point(|r| u64::from(r.pc) <= off) - 1;
        assert_eq!(Some(&narrowed[i]), t.lookup(off), "at {off:#x}");
    }
    let row = t.lookup(malloc).unwrap();
    assert_eq!(
        (row.kind, row.cfa_off, row.rbp_off),
        (unwind_kind::CFA_RSP, 8, 0)
    );
    // malloc pushes r12, rbp, rbx: deeper in, rbp is saved and the CFA is further up.
    let later = t.lookup(malloc + 3).unwrap();
    assert_eq!(
        (later.kind, later.cfa_off, later.rbp_off),
        (unwind_kind::CFA_RSP, 24, -3)
    );
}

/// Reads 8 bytes of our own memory without ever faulting.
fn read_self(addr: u64) -> Option<u64> {
    let mut value = 0u64;
    let local = libc::iovec {
        iov_base: (&raw mut value).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: process_vm_readv checks the remote range; `local` is our own u64.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == 8).then_some(value)
}

type Check<'a> = &'a dyn Fn(Regs, &[u64]);

/// Takes our registers and glibc's backtrace() at one point of one function and checks
/// them while this frame and its callers are still on the stack.
#[inline(never)]
fn at_the_bottom(check: Check<'_>) {
    let (pc, sp, bp): (u64, u64, u64);
    // SAFETY: reads rip, rsp and rbp; touches nothing.
    unsafe {
        std::arch::asm!("lea {}, [rip]", "mov {}, rsp", "mov {}, rbp", out(reg) pc, out(reg) sp, out(reg) bp);
    }
    let mut buf = [std::ptr::null_mut(); 64];
    // SAFETY: buf has room for 64 frames.
    let n = unsafe { libc::backtrace(buf.as_mut_ptr(), 64) } as usize;
    let oracle: Vec<u64> = buf[..n].iter().map(|&p| p as u64).collect();
    check(Regs { pc, sp, bp }, &oracle);
}

#[inline(never)]
fn nested(depth: usize, check: Check<'_>) {
    if depth == 0 {
        at_the_bottom(check);
    } else {
        nested(depth - 1, check);
    }
    std::hint::black_box(depth);
}

#[test]
fn the_walk_matches_glibcs_backtrace_frame_for_frame() {
    // glibc's backtrace() is libgcc's .eh_frame unwinder: the oracle no one tunes.
    let mut modules = crate::targets::modules::Modules::default();
    let space = crate::targets::modules::AddressSpace::read(
        &crate::targets::host::Live::new(),
        std::process::id(),
        &mut modules,
    )
    .unwrap();
    let tables: hashbrown::HashMap<_, _> = space
        .modules()
        .iter()
        .filter_map(|m| Some((m.key, compile(&File::open(&m.path).ok()?).ok()?)))
        .collect();
    let table_for = |pc: u64| {
        let (m, off) = space.lookup(pc)?;
        Some((tables.get(&m.key)?, off))
    };
    let checked = std::cell::Cell::new(false);
    nested(6, &|regs, oracle| {
        let (frames, end) = walk(regs, true, 127, table_for, read_self);
        // frames[0] is our pc inside at_the_bottom(); backtrace()'s is its return address
        // into it. From there on both list the same return addresses.
        assert!(oracle.len() > 8, "{oracle:x?}");
        assert_eq!(
            frames[1..],
            oracle[1..],
            "ours {frames:x?}\noracle {oracle:x?}"
        );
        assert_eq!(
            end,
            WalkEnd::Complete,
            "the walk reaches the thread's start"
        );
        checked.set(true);
    });
    assert!(checked.get());
}
