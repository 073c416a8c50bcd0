//! Turns ring-buffer records into [`Event`]s: the one place that checks their length and kind.
//!
//! Records are read field by field from little-endian bytes, never cast in place, so a short
//! or misaligned buffer is an error and not undefined behaviour.
use leaktrace_common::{
    AllocEvent, FD_PATH_LEN, FdEvent, FdPathEvent, FreeEvent, Header, MAX_FRAMES, OomEvent,
    PageEvent, ProcEvent, ReleaseEvent, StackEvent, kind,
};
use std::mem::size_of;

use bytes::Buf as _;

/// A decoded record. `Stack` borrows its frames from the ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// An allocation ([`kind::ALLOC`]).
    Alloc(AllocEvent),
    /// A `free` ([`kind::FREE`]).
    Free(FreeEvent),
    /// The frames of a stack id ([`kind::STACK`]).
    Stack(StackRecord<'a>),
    /// A traced process exec'd ([`kind::EXEC`]).
    Exec(ProcEvent),
    /// A traced process exited ([`kind::EXIT`]).
    Exit(ProcEvent),
    /// A traced process forked a traced child ([`kind::FORK`]).
    Fork(ProcEvent),
    /// A process's dynamic loader changed its object list ([`kind::LOADER`]).
    Loader(ProcEvent),
    /// A descriptor event, with or without a path ([`kind::FD`], [`kind::FD_PATH`]).
    Fd(FdRecord<'a>),
    /// The OOM killer chose a victim ([`kind::OOM`]).
    Oom(OomEvent),
    /// Growth mode: a write fault gave a process memory ([`kind::PAGE`]).
    Page(PageEvent),
    /// Growth mode: a process released memory ([`kind::RELEASE`]).
    Release(ReleaseEvent),
}

/// A descriptor event, with its path when it carries one (borrowed from the ring buffer,
/// without the NUL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdRecord<'a> {
    /// The fixed part of the record (its header's kind tells a path record from a plain one).
    pub event: FdEvent,
    /// The path bytes up to the first NUL, for [`kind::FD_PATH`] records; else `None`.
    pub path: Option<&'a [u8]>,
}

impl Event<'_> {
    /// The header every record starts with.
    pub fn header(&self) -> &Header {
        match self {
            Event::Alloc(e) => &e.hdr,
            Event::Free(e) => &e.hdr,
            Event::Stack(s) => &s.hdr,
            Event::Exec(e) | Event::Exit(e) | Event::Fork(e) | Event::Loader(e) => &e.hdr,
            Event::Fd(f) => &f.event.hdr,
            Event::Oom(e) => &e.hdr,
            Event::Page(e) => &e.hdr,
            Event::Release(e) => &e.hdr,
        }
    }
}

/// The frames of one stack id, still in the ring buffer's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackRecord<'a> {
    /// The record's header.
    pub hdr: Header,
    /// The id [`leaktrace_common::AllocEvent::stack_id`] and others refer to.
    pub stack_id: u64,
    /// Bits of [`leaktrace_common::stack_flags`].
    pub flags: u32,
    bytes: &'a [u8],
}

impl<'a> StackRecord<'a> {
    /// The frames, innermost first.
    pub fn frames(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
    }
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte {what}")]
    /// The record is shorter than the struct its kind names.
    TooShort {
        /// What was being read (the struct's name).
        what: &'static str,
        /// The record's length, in bytes.
        len: usize,
        /// The bytes that struct needs.
        need: usize,
    },
    #[error("record of unknown kind {0}")]
    /// The header's kind is none of [`kind`].
    UnknownKind(u16),
    #[error("stack record claims {0} frames (at most {MAX_FRAMES})")]
    /// A stack record's `nr` exceeds [`MAX_FRAMES`].
    TooManyFrames(u32),
}

/// Little-endian field reader over one record whose length was checked ([`need`]).
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn u16(&mut self) -> u16 {
        self.rest.get_u16_le()
    }
    fn u32(&mut self) -> u32 {
        self.rest.get_u32_le()
    }
    fn u64(&mut self) -> u64 {
        self.rest.get_u64_le()
    }
    /// The next `n` bytes, as they are.
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        head
    }
    fn header(&mut self) -> Header {
        Header {
            kind: self.u16(),
            flags: self.u16(),
            pid: self.u32(),
            tid: self.u32(),
            _pad: self.u32(),
            ts_ns: self.u64(),
        }
    }
}

/// A reader over `bytes` once it is known to hold at least `size` bytes: every read after
/// this is in bounds.
fn need<'a>(bytes: &'a [u8], what: &'static str, size: usize) -> Result<Fields<'a>, DecodeError> {
    if bytes.len() < size {
        return Err(DecodeError::TooShort {
            what,
            len: bytes.len(),
            need: size,
        });
    }
    Ok(Fields {
        rest: &bytes[..size],
    })
}

/// The header of a record, without decoding the rest (to decide whether to).
pub fn peek_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    Ok(need(bytes, "header", size_of::<Header>())?.header())
}

/// Decodes one record.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let kind = need(bytes, "header", size_of::<Header>())?.u16();
    Ok(match kind {
        kind::ALLOC => Event::Alloc(alloc(bytes)?),
        kind::FREE => Event::Free(free(bytes)?),
        kind::STACK => Event::Stack(stack(bytes)?),
        kind::FD => Event::Fd(fd(bytes, false)?),
        kind::FD_PATH => Event::Fd(fd(bytes, true)?),
        kind::PAGE => Event::Page(page(bytes)?),
        kind::RELEASE => Event::Release(release(bytes)?),
        kind::OOM => Event::Oom(oom(bytes)?),
        kind::EXEC | kind::EXIT | kind::FORK | kind::LOADER => {
            let e = proc(bytes)?;
            match kind {
                kind::EXEC => Event::Exec(e),
                kind::EXIT => Event::Exit(e),
                kind::FORK => Event::Fork(e),
                _ => Event::Loader(e),
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    })
}

// One reader per record kind: each checks the record is long enough for its kind, then reads
// it field by field.

#[inline]
fn alloc(bytes: &[u8]) -> Result<AllocEvent, DecodeError> {
    let mut f = need(bytes, "alloc record", size_of::<AllocEvent>())?;
    Ok(AllocEvent {
        hdr: f.header(),
        addr: f.u64(),
        size: f.u64(),
        old_addr: f.u64(),
        stack_id: f.u64(),
        shape: f.u32(),
        _pad: f.u32(),
    })
}

#[inline]
fn free(bytes: &[u8]) -> Result<FreeEvent, DecodeError> {
    let mut f = need(bytes, "free record", size_of::<FreeEvent>())?;
    Ok(FreeEvent {
        hdr: f.header(),
        addr: f.u64(),
    })
}

/// A stack record, its frames still in the ring buffer; the frame count is checked before
/// they are sliced out.
#[inline]
fn stack(bytes: &[u8]) -> Result<StackRecord<'_>, DecodeError> {
    let mut f = need(bytes, "stack record", size_of::<StackEvent>())?;
    let hdr = f.header();
    let stack_id = f.u64();
    let nr = f.u32();
    let flags = f.u32();
    if nr as usize > MAX_FRAMES {
        return Err(DecodeError::TooManyFrames(nr));
    }
    Ok(StackRecord {
        hdr,
        stack_id,
        flags,
        bytes: f.bytes(8 * nr as usize),
    })
}

/// A descriptor record: an [`FdPathEvent`] when `with_path`, else an [`FdEvent`].
#[inline]
fn fd(bytes: &[u8], with_path: bool) -> Result<FdRecord<'_>, DecodeError> {
    let size = if with_path {
        size_of::<FdPathEvent>()
    } else {
        size_of::<FdEvent>()
    };
    let mut f = need(bytes, "descriptor record", size)?;
    let event = FdEvent {
        hdr: f.header(),
        op: f.u16(),
        syscall: f.u16(),
        fd: f.u32() as i32,
        fd2: f.u32() as i32,
        flags: f.u32(),
        errno: f.u32() as i32,
        dirfd: f.u32() as i32,
        stack_id: f.u64(),
        value: f.u64(),
    };
    let path = with_path.then(|| {
        let raw = f.bytes(FD_PATH_LEN);
        &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())]
    });
    Ok(FdRecord { event, path })
}

#[inline]
fn page(bytes: &[u8]) -> Result<PageEvent, DecodeError> {
    let mut f = need(bytes, "page record", size_of::<PageEvent>())?;
    Ok(PageEvent {
        hdr: f.header(),
        addr: f.u64(),
        stack_id: f.u64(),
        size: f.u64(),
    })
}

#[inline]
fn release(bytes: &[u8]) -> Result<ReleaseEvent, DecodeError> {
    let mut f = need(bytes, "release record", size_of::<ReleaseEvent>())?;
    Ok(ReleaseEvent {
        hdr: f.header(),
        start: f.u64(),
        end: f.u64(),
        op: f.u32(),
        _pad: f.u32(),
    })
}

#[inline]
fn oom(bytes: &[u8]) -> Result<OomEvent, DecodeError> {
    let mut f = need(bytes, "OOM record", size_of::<OomEvent>())?;
    let mut e = OomEvent {
        hdr: f.header(),
        victim: f.u32(),
        oom_score_adj: f.u32() as i32,
        total_vm_kb: f.u64(),
        anon_rss_kb: f.u64(),
        file_rss_kb: f.u64(),
        shmem_rss_kb: f.u64(),
        comm: [0; 16],
    };
    e.comm.copy_from_slice(f.bytes(16));
    Ok(e)
}

/// An exec, exit, fork or loader record: one layout, told apart by the header's kind.
#[inline]
fn proc(bytes: &[u8]) -> Result<ProcEvent, DecodeError> {
    let mut f = need(bytes, "process record", size_of::<ProcEvent>())?;
    Ok(ProcEvent {
        hdr: f.header(),
        other_pid: f.u32(),
        _pad: f.u32(),
    })
}

/// Encoders for tests and benchmarks: the byte images the kernel side produces.
pub mod encode {
    use super::*;

    fn header(out: &mut Vec<u8>, h: &Header) {
        out.extend_from_slice(&h.kind.to_le_bytes());
        out.extend_from_slice(&h.flags.to_le_bytes());
        out.extend_from_slice(&h.pid.to_le_bytes());
        out.extend_from_slice(&h.tid.to_le_bytes());
        out.extend_from_slice(&h._pad.to_le_bytes());
        out.extend_from_slice(&h.ts_ns.to_le_bytes());
    }

    /// The bytes of an [`AllocEvent`].
    pub fn alloc(e: &AllocEvent) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_of::<AllocEvent>());
        header(&mut out, &e.hdr);
        for v in [e.addr, e.size, e.old_addr, e.stack_id] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&e.shape.to_le_bytes());
        out.extend_from_slice(&e._pad.to_le_bytes());
        out
    }

    /// The bytes of a [`FreeEvent`].
    pub fn free(e: &FreeEvent) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_of::<FreeEvent>());
        header(&mut out, &e.hdr);
        out.extend_from_slice(&e.addr.to_le_bytes());
        out
    }

    /// The bytes of a [`StackEvent`] holding `frames`.
    pub fn stack(hdr: &Header, stack_id: u64, flags: u32, frames: &[u64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_of::<StackEvent>());
        header(&mut out, hdr);
        out.extend_from_slice(&stack_id.to_le_bytes());
        out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&f.to_le_bytes());
        }
        out.resize(size_of::<StackEvent>(), 0);
        out
    }

    /// The bytes of an [`FdEvent`], with `path` as an [`FdPathEvent`].
    pub fn fd(e: &FdEvent, path: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_of::<FdPathEvent>());
        let mut hdr = e.hdr;
        hdr.kind = if path.is_some() {
            kind::FD_PATH
        } else {
            kind::FD
        };
        header(&mut out, &hdr);
        out.extend_from_slice(&e.op.to_le_bytes());
        out.extend_from_slice(&e.syscall.to_le_bytes());
        for v in [e.fd, e.fd2] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&e.flags.to_le_bytes());
        for v in [e.errno, e.dirfd] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&e.stack_id.to_le_bytes());
        out.extend_from_slice(&e.value.to_le_bytes());
        if let Some(p) = path {
            let mut buf = [0u8; FD_PATH_LEN];
            buf[..p.len()].copy_from_slice(p);
            out.extend_from_slice(&buf);
        }
        out
    }

    /// The bytes of a [`ProcEvent`].
    pub fn proc(e: &ProcEvent) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_of::<ProcEvent>());
        header(&mut out, &e.hdr);
        out.extend_from_slice(&e.other_pid.to_le_bytes());
        out.extend_from_slice(&e._pad.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(kind: u16) -> Header {
        Header {
            kind,
            flags: 0,
            pid: 42,
            tid: 43,
            _pad: 0,
            ts_ns: 1_000,
        }
    }

    #[test]
    fn alloc_round_trips() {
        let e = AllocEvent {
            hdr: hdr(kind::ALLOC),
            addr: 0x5555_0000_1000,
            size: 4096,
            old_addr: 0x10,
            stack_id: 7,
            shape: leaktrace_common::alloc_shape::RESIZE,
            _pad: 0,
        };
        assert_eq!(decode(&encode::alloc(&e)), Ok(Event::Alloc(e)));
    }

    #[test]
    fn stack_frames_come_out_in_order() {
        let bytes = encode::stack(&hdr(kind::STACK), 9, 1, &[1, 2, 3]);
        let Ok(Event::Stack(s)) = decode(&bytes) else {
            panic!("not a stack")
        };
        assert_eq!((s.stack_id, s.flags), (9, 1));
        assert_eq!(s.frames().collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        let bytes = encode::alloc(&AllocEvent {
            hdr: hdr(kind::ALLOC),
            ..Default::default()
        });
        assert_eq!(
            decode(&bytes[..40]),
            Err(DecodeError::TooShort {
                what: "alloc record",
                len: 40,
                need: 64
            })
        );
        assert!(matches!(
            decode(&bytes[..10]),
            Err(DecodeError::TooShort { what: "header", .. })
        ));
        let mut unknown = encode::free(&FreeEvent {
            hdr: hdr(99),
            addr: 1,
        });
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(99)));
        unknown.truncate(0);
        assert!(decode(&unknown).is_err());
    }

    #[test]
    fn fd_records_with_and_without_paths() {
        let e = FdEvent {
            hdr: hdr(kind::FD),
            op: 1,
            syscall: 2,
            fd: 7,
            fd2: -1,
            flags: 0o2000100,
            errno: 0,
            dirfd: -100,
            stack_id: 9,
            value: 77,
        };
        let bytes = encode::fd(&e, None);
        assert_eq!(bytes.len(), 64);
        assert_eq!(
            decode(&bytes),
            Ok(Event::Fd(FdRecord {
                event: e,
                path: None
            }))
        );
        let bytes = encode::fd(&e, Some(b"/tmp/x"));
        let Ok(Event::Fd(r)) = decode(&bytes) else {
            panic!()
        };
        assert_eq!(r.event.hdr.kind, kind::FD_PATH);
        assert_eq!(
            (
                r.event.fd,
                r.event.dirfd,
                r.event.stack_id,
                r.event.value,
                r.path
            ),
            (7, -100, 9, 77, Some(&b"/tmp/x"[..]))
        );
        assert!(
            decode(&bytes[..100]).is_err(),
            "a path record must be whole"
        );
    }

    #[test]
    fn stack_with_too_many_frames_is_rejected() {
        let mut bytes = encode::stack(&hdr(kind::STACK), 1, 0, &[]);
        bytes[32..36].copy_from_slice(&500u32.to_le_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::TooManyFrames(500)));
    }

    #[test]
    fn proc_kinds_map_to_variants() {
        for (k, want) in [
            (kind::EXEC, "Exec"),
            (kind::EXIT, "Exit"),
            (kind::FORK, "Fork"),
            (kind::LOADER, "Loader"),
        ] {
            let e = ProcEvent {
                hdr: hdr(k),
                other_pid: 5,
                _pad: 0,
            };
            let bytes = encode::proc(&e);
            let got = decode(&bytes).unwrap();
            assert!(format!("{got:?}").starts_with(want), "{got:?}");
            assert_eq!(got.header().kind, k);
        }
    }
}
