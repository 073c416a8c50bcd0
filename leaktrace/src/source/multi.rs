//! uprobe_multi links: every probe of one program on one file, for one process, in a single
//! BPF link, created with our own `bpf(BPF_LINK_CREATE)` (aya 0.14 has no such link).
//!
//! The link's `pid` makes the kernel's uprobe consumer filter install the breakpoints only in
//! that process's memory: another process mapping the same libc never traps. Closing the
//! link's descriptor detaches every probe of it at once.
//!
//! What releasing costs, measured on this VM (Linux 6.18, 2 vCPUs, `LEAKTRACE_LOG=debug`
//! `leaktrace run --follow-forks` over `heap_fork` and `fork_storm`, the detach thread's
//! "released N links" lines): closing a perf-event uprobe takes ~95–120 ms (16 of a
//! process's in 1.5–1.9 s, one after the other: each waits for an RCU grace period under a
//! kernel-wide mutex); closing a uprobe_multi link ~27–50 ms whatever its number of probes
//! (a process's 3 links, closed in turn, in 80–150 ms: a grace period per link, not per
//! probe). Closed side by side, as the `Detacher` does, a process's 3 links take 24–76 ms.
use std::{
    ffi::CString,
    io,
    mem::{size_of, zeroed},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{
    BPF_F_UPROBE_MULTI_RETURN, bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type,
    bpf_prog_type,
};

/// One uprobe_multi link. Dropping it closes the descriptor, which detaches its probes.
#[derive(Debug)]
pub struct MultiLink {
    _fd: OwnedFd,
}

/// `bpf(cmd, attr)`: the new descriptor or number, or the error.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, zero-initialised `bpf_attr` of the size passed; the kernel
    // reads and writes only within it, and any pointers in it point to live buffers the
    // callers keep until this returns.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a descriptor the kernel just returned.
fn owned(fd: i64) -> OwnedFd {
    // SAFETY: `fd` was just returned by bpf() and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a C union of integers and arrays: all zeroes is valid, and the
    // kernel requires the unused tail to be zero.
    unsafe { zeroed() }
}

impl MultiLink {
    /// Attaches `prog` (loaded with `UProbe::load_multi`) at each of `offsets` of the file at
    /// `path`, with the matching entry of `cookies` (`bpf_get_attach_cookie`), as return
    /// probes when `ret`, for the process `pid` only.
    pub fn attach(
        prog: BorrowedFd<'_>,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
        ret: bool,
        pid: u32,
    ) -> io::Result<Self> {
        if offsets.is_empty() || cookies.len() != offsets.len() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let flags = if ret { BPF_F_UPROBE_MULTI_RETURN } else { 0 };
        create(prog, &path, offsets, Some(cookies), flags, pid).map(|fd| Self { _fd: fd })
    }
}

/// `BPF_LINK_CREATE` of a uprobe_multi link.
fn create(
    prog: BorrowedFd<'_>,
    path: &CString,
    offsets: &[u64],
    cookies: Option<&[u64]>,
    flags: u32,
    pid: u32,
) -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    // SAFETY: writing the `link_create` member of a zeroed union; `path`, `offsets` and
    // `cookies` outlive the call below.
    unsafe {
        let lc = &mut attr.link_create;
        lc.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
        lc.attach_type = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32;
        let um = &mut lc.__bindgen_anon_3.uprobe_multi;
        um.path = path.as_ptr() as u64;
        um.offsets = offsets.as_ptr() as u64;
        um.cookies = cookies.map_or(0, |c| c.as_ptr() as u64);
        um.cnt = offsets.len() as u32;
        um.flags = flags;
        um.pid = pid;
    }
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Whether this kernel creates uprobe_multi links with a working process filter, probed as
/// libbpf does (`probe_uprobe_multi_link`): a trivial program loaded for uprobe_multi, a link
/// on `/` must fail with `EBADF` (not a regular file: the attach type is known), and with
/// pid -1 with `EINVAL` (the first kernels with uprobe_multi, whose pid filter was per
/// thread rather than per process, looked the pid up first and answered `ESRCH`).
pub fn supported() -> bool {
    probe().unwrap_or(false)
}

fn probe() -> io::Result<bool> {
    // r0 = 0; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut attr = zeroed_attr();
    // SAFETY: writing the prog_load member of a zeroed union; `insns` and `license` outlive
    // the call below.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
        load.insn_cnt = insns.len() as u32;
        load.insns = insns.as_ptr() as u64;
        load.license = license.as_ptr() as u64;
        load.expected_attach_type = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32;
    }
    let prog = owned(bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)?);
    let root = c"/".to_owned();
    let offset = [0u64];
    let errno = |r: io::Result<OwnedFd>| r.err().and_then(|e| e.raw_os_error());
    if errno(create(prog.as_fd(), &root, &offset, None, 0, 0)) != Some(libc::EBADF) {
        return Ok(false);
    }
    Ok(errno(create(prog.as_fd(), &root, &offset, None, 0, u32::MAX)) == Some(libc::EINVAL))
}

/// A uprobe_multi link as the kernel describes it (for tests and benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkSummary {
    /// The link's id.
    pub id: u32,
    /// The process it is filtered to (0: none).
    pub pid: u32,
    /// How many probes it holds.
    pub probes: u32,
    /// Return probes.
    pub ret: bool,
}

/// Every BPF link of the system by its type, and each uprobe_multi link's summary: a census
/// of what is attached, whoever attached it (`BPF_LINK_GET_NEXT_ID`, needs root).
/// Returns (uprobe_multi links, perf-event links).
pub fn census() -> io::Result<(Vec<LinkSummary>, usize)> {
    let mut multi = Vec::new();
    let mut perf = 0;
    let mut id = 0u32;
    loop {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        match bpf(bpf_cmd::BPF_LINK_GET_NEXT_ID, &mut attr) {
            // SAFETY: the kernel filled `next_id`.
            Ok(_) => id = unsafe { attr.__bindgen_anon_6.next_id },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
        let fd = match bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr) {
            Ok(fd) => owned(fd),
            // Released meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: plain data, all zeroes valid.
        let mut info: bpf_link_info = unsafe { zeroed() };
        let mut attr = zeroed_attr();
        // `info` outlives the call.
        attr.info.bpf_fd = fd.as_raw_fd() as u32;
        attr.info.info_len = size_of::<bpf_link_info>() as u32;
        attr.info.info = std::ptr::from_mut(&mut info) as u64;
        bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        if info.type_ == bpf_link_type::BPF_LINK_TYPE_UPROBE_MULTI as u32 {
            // SAFETY: the kernel filled the uprobe_multi member for this type.
            let um = unsafe { info.__bindgen_anon_1.uprobe_multi };
            multi.push(LinkSummary {
                id,
                pid: um.pid,
                probes: um.count,
                ret: um.flags & BPF_F_UPROBE_MULTI_RETURN != 0,
            });
        } else if info.type_ == bpf_link_type::BPF_LINK_TYPE_PERF_EVENT as u32 {
            perf += 1;
        }
    }
    Ok((multi, perf))
}
