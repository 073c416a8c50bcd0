//! CPython structure offsets, one row per interpreter version.
//!
//! The BPF walk and the user-space decoder read the interpreter's own structures from outside
//! (no code injected, no restart), so they need the byte offsets of a handful of fields. They
//! change between minor versions, never within one: a new version is a new row, not new code.
//!
//! The 3.11 row was computed with `offsetof` against Debian's `python3.11-dev` headers
//! (3.11.2, `Py_BUILD_CORE` internals) and is checked against the running `/usr/bin/python3`
//! by `leaktrace::symbolize::python`'s tests.

/// Byte offsets into one CPython version's structures. `#[repr(C)]` so the same row can
/// go to BPF in a map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `PY_VERSION_HEX >> 16`: major in the high byte, minor in the low (0x030b for 3.11).
    pub version: u16,
    /// `_PyRuntimeState.gilstate.tstate_current`: the thread state holding the GIL.
    pub runtime_tstate_current: u16,
    /// `_PyRuntimeState.interpreters.head`: the main interpreter.
    pub runtime_interpreters_head: u16,
    /// `PyInterpreterState.threads.head`: its first thread state.
    pub interp_threads_head: u16,
    /// `PyThreadState.next`.
    pub tstate_next: u16,
    /// `PyThreadState.cframe` (3.11: a `_PyCFrame *`).
    pub tstate_cframe: u16,
    /// `PyThreadState.native_thread_id`: the kernel tid of the thread.
    pub tstate_native_thread_id: u16,
    /// `_PyCFrame.current_frame`: the innermost `_PyInterpreterFrame`.
    pub cframe_current_frame: u16,
    /// `_PyInterpreterFrame.f_code`.
    pub frame_code: u16,
    /// `_PyInterpreterFrame.previous`: the caller's frame.
    pub frame_previous: u16,
    /// `_PyInterpreterFrame.prev_instr`: the instruction being executed.
    pub frame_prev_instr: u16,
    /// `_PyInterpreterFrame.owner` (one byte).
    pub frame_owner: u16,
    /// `PyCodeObject.co_filename`.
    pub code_filename: u16,
    /// `PyCodeObject.co_name`.
    pub code_name: u16,
    /// `PyCodeObject.co_qualname`.
    pub code_qualname: u16,
    /// `PyCodeObject.co_linetable` (a bytes object).
    pub code_linetable: u16,
    /// `PyCodeObject.co_firstlineno` (an `int`).
    pub code_firstlineno: u16,
    /// `PyCodeObject.co_code_adaptive`: the first instruction, inline in the code object.
    pub code_adaptive: u16,
    /// `PyObject.ob_type`.
    pub object_type: u16,
    /// `PyVarObject.ob_size`: the length of a bytes object.
    pub var_size: u16,
    /// `PyBytesObject.ob_sval`: its first byte.
    pub bytes_data: u16,
    /// `PyASCIIObject.length`: a string's length in code points.
    pub unicode_length: u16,
    /// `PyASCIIObject.state`: the bit field with `kind`, `compact` and `ascii`.
    pub unicode_state: u16,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's characters start.
    pub unicode_ascii_data: u16,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact strings' characters start.
    pub unicode_compact_data: u16,
    /// Explicit padding to a multiple of 8 bytes.
    pub _pad: [u16; 3],
}

const _: () = assert!(size_of::<Offsets>() == 56);

/// CPython 3.11 on x86-64 (from `offsetof` on the 3.11.2 headers; stable across 3.11.x).
pub const PY311: Offsets = Offsets {
    version: 0x030b,
    runtime_tstate_current: 576,
    runtime_interpreters_head: 40,
    interp_threads_head: 16,
    tstate_next: 8,
    tstate_cframe: 56,
    tstate_native_thread_id: 160,
    cframe_current_frame: 8,
    frame_code: 32,
    frame_previous: 48,
    frame_prev_instr: 56,
    frame_owner: 69,
    code_filename: 112,
    code_name: 120,
    code_qualname: 128,
    code_linetable: 136,
    code_firstlineno: 72,
    code_adaptive: 184,
    object_type: 8,
    var_size: 16,
    bytes_data: 32,
    unicode_length: 16,
    unicode_state: 32,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    _pad: [0; 3],
};

/// Every version leaktrace can read.
pub const VERSIONS: &[Offsets] = &[PY311];

/// The row for `major.minor`, if there is one.
pub fn offsets(major: u8, minor: u8) -> Option<&'static Offsets> {
    let v = (u16::from(major) << 8) | u16::from(minor);
    VERSIONS.iter().find(|o| o.version == v)
}
