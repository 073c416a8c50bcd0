//! Frames to names: function, module, file and line, with inlined calls expanded.
//!
//! One long-lived blazesym [`Symbolizer`] serves the whole session; lookups go through the
//! held module files (see [`crate::targets::modules`]), so they work after the process is gone, and
//! results are cached per (module, offset).
pub mod python;
pub mod stacks;

use std::sync::Arc;

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};
use hashbrown::HashMap;

use crate::{
    symbolize::stacks::Stack,
    targets::modules::{Module, ModuleKey},
};

/// One symbolized frame, innermost first in a stack.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SymbolizedFrame {
    /// The address in the process (for inlined frames, the address of the frame they sit in).
    pub addr: u64,
    /// Demangled function name, when known.
    pub symbol: Option<String>,
    /// Path of the module as the process maps it.
    pub module: Option<String>,
    /// Offset of the address in the module file (module+offset identifies unknown frames).
    pub offset: Option<u64>,
    /// Source file path, when known.
    pub file: Option<String>,
    /// Source line, when known.
    pub line: Option<u32>,
    /// True for a function inlined into the next frame.
    pub inlined: bool,
}

/// What one address resolves to: the function and its inlined callees, innermost first,
/// each as (name, file, line).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resolved {
    names: Vec<(Option<String>, Option<String>, Option<u32>)>,
}

/// A symbolizer with a per-address cache.
pub struct Symbols {
    /// `None` when replaying a recording: only what the cache holds is known.
    symbolizer: Option<Symbolizer>,
    cache: HashMap<(ModuleKey, u64), Arc<Resolved>>,
    /// Times the cache was full and started over.
    pub cache_resets: u64,
}

/// Addresses the symbol cache holds at most (a few hundred bytes each).
const CACHE_CAP: usize = 1 << 18;

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Symbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbols")
            .field("cached", &self.cache.len())
            .finish()
    }
}

fn resolved(sym: Symbolized<'_>) -> Resolved {
    let Symbolized::Sym(sym) = sym else {
        return Resolved::default();
    };
    let location = |ci: Option<&blazesym::symbolize::CodeInfo<'_>>| match ci {
        Some(ci) => (Some(ci.to_path().display().to_string()), ci.line),
        None => (None, None),
    };
    // blazesym lists inlined calls outermost first; each carries its own location.
    let mut names = Vec::with_capacity(1 + sym.inlined.len());
    for inl in sym.inlined.iter().rev() {
        let (file, line) = location(inl.code_info.as_ref());
        names.push((Some(inl.name.to_string()), file, line));
    }
    let (file, line) = location(sym.code_info.as_deref());
    names.push((Some(sym.name.to_string()), file, line));
    Resolved { names }
}

impl Symbols {
    /// A symbolizer with an empty cache.
    pub fn new() -> Self {
        let symbolizer = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Self {
            symbolizer: Some(symbolizer),
            cache: HashMap::new(),
            cache_resets: 0,
        }
    }

    /// Symbols known in advance, as (device, inode, file offset, resolved); nothing else
    /// is looked up (replaying a recording).
    pub fn recorded(entries: impl IntoIterator<Item = (u64, u64, u64, Resolved)>) -> Self {
        let cache = entries
            .into_iter()
            .map(|(dev, inode, offset, r)| ((ModuleKey { dev, inode }, offset), Arc::new(r)))
            .collect();
        Self {
            symbolizer: None,
            cache,
            cache_resets: 0,
        }
    }

    /// Everything looked up so far, as [`Self::recorded`] takes it, in a stable order.
    pub fn known(&self) -> Vec<(u64, u64, u64, Resolved)> {
        let mut out: Vec<_> = self
            .cache
            .iter()
            .map(|((k, offset), r)| (k.dev, k.inode, *offset, (**r).clone()))
            .collect();
        out.sort_by_key(|&(dev, inode, offset, _)| (dev, inode, offset));
        out
    }

    /// Looks up every (module, offset) of `stacks` that is not cached yet, one batch per module.
    pub fn prepare<'a>(&mut self, stacks: impl IntoIterator<Item = &'a Stack>) {
        let Some(symbolizer) = &self.symbolizer else {
            return;
        };
        if self.cache.len() >= CACHE_CAP {
            // Bounded: start over rather than grow with every address a node ever ran.
            self.cache.clear();
            self.cache_resets += 1;
        }
        let mut todo: HashMap<ModuleKey, (Arc<Module>, Vec<u64>)> = HashMap::new();
        for stack in stacks {
            for (module, offset) in stack.frames.iter().filter_map(|f| f.place.as_ref()) {
                if !self.cache.contains_key(&(module.key, *offset)) {
                    todo.entry(module.key)
                        .or_insert_with(|| (module.clone(), Vec::new()))
                        .1
                        .push(*offset);
                }
            }
        }
        for (key, (module, mut offsets)) in todo {
            offsets.sort_unstable();
            offsets.dedup();
            let src = Source::Elf(Elf::new(module.open_path()));
            let results = match symbolizer.symbolize(&src, Input::FileOffset(&offsets)) {
                Ok(r) => r,
                Err(err) => {
                    tracing::debug!("cannot symbolize {}: {err}", module.path);
                    Vec::new()
                }
            };
            let mut results = results.into_iter();
            for offset in offsets {
                let r = results.next().map(resolved).unwrap_or_default();
                self.cache.insert((key, offset), Arc::new(r));
            }
        }
    }

    /// The symbolized frames of a stack, inlined calls expanded, innermost first.
    pub fn frames(&mut self, stack: &Stack) -> Vec<SymbolizedFrame> {
        self.prepare(std::iter::once(stack));
        let mut out = Vec::with_capacity(stack.frames.len());
        for frame in stack.frames.iter() {
            let Some((module, offset)) = &frame.place else {
                let module = frame.mapping.as_ref().map(|m| {
                    if m.is_empty() {
                        "[anon]".to_owned()
                    } else {
                        m.clone()
                    }
                });
                out.push(SymbolizedFrame {
                    addr: frame.addr,
                    symbol: None,
                    module,
                    offset: None,
                    file: None,
                    line: None,
                    inlined: false,
                });
                continue;
            };
            let resolved = self
                .cache
                .get(&(module.key, *offset))
                .cloned()
                .unwrap_or_default();
            let unknown = [(None, None, None)];
            let names = if resolved.names.is_empty() {
                &unknown[..]
            } else {
                &resolved.names[..]
            };
            let last = names.len() - 1;
            for (i, (symbol, file, line)) in names.iter().enumerate() {
                out.push(SymbolizedFrame {
                    addr: frame.addr,
                    symbol: symbol.clone(),
                    module: Some(module.path.clone()),
                    offset: Some(*offset),
                    file: file.clone(),
                    line: *line,
                    inlined: i != last,
                });
            }
        }
        out
    }
}

/// Symbol prefixes of language runtimes and standard libraries: frames there are how the
/// program reached the allocator, not where it leaks.
const RUNTIME_SYMBOL_PREFIXES: &[&str] = &[
    // Rust: the global allocator shims and the standard library.
    "__rust_",
    "__rdl_",
    "__rg_",
    "alloc::",
    "<alloc::",
    "core::",
    "<core::",
    "std::",
    "<std::",
    // C++: operator new and the standard library.
    "operator new",
    "__gnu_cxx::",
    "<__gnu_cxx::",
    "__cxxabiv1::",
];

/// Module file names of C and C++ runtimes and allocators.
const RUNTIME_MODULE_PREFIXES: &[&str] = &[
    "libc.so",
    "libc-2.",
    "ld-linux",
    "ld-musl",
    "libstdc++.so",
    "libc++.so",
    "libc++abi.so",
    "libgcc_s.so",
    "libpthread.so",
    "libjemalloc.so",
    "libtcmalloc",
    "libmimalloc.so",
];

/// Where the sources of library code inlined into a program live: system headers (glibc's
/// inline `getline`, libstdc++'s templates) and the Rust standard library.
const LIBRARY_SOURCE_PREFIXES: &[&str] = &["/usr/include/", "/usr/local/include/", "/rustc/"];

/// True when a frame belongs to a runtime or allocator rather than the program.
pub fn is_runtime_frame(frame: &SymbolizedFrame) -> bool {
    if frame.inlined
        && frame
            .file
            .as_deref()
            .is_some_and(|f| LIBRARY_SOURCE_PREFIXES.iter().any(|p| f.starts_with(p)))
    {
        return true;
    }
    if let Some(module) = &frame.module {
        let name = module.rsplit('/').next().unwrap_or(module);
        if RUNTIME_MODULE_PREFIXES.iter().any(|p| name.starts_with(p)) {
            return true;
        }
    }
    frame.symbol.as_deref().is_some_and(|s| {
        let name = qualified_name(s);
        RUNTIME_SYMBOL_PREFIXES
            .iter()
            .any(|p| s.starts_with(p) || name.starts_with(p))
    })
}

/// The qualified function name of a demangled C++ symbol, without its return type and
/// parameters: `void std::vector<int>::push_back(int const&)` → `std::vector<int>::push_back`.
pub fn qualified_name(symbol: &str) -> &str {
    let mut depth = 0i32;
    let mut name_start = 0;
    for (i, c) in symbol.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            '(' if depth == 0 && i > 0 => return &symbol[name_start..i],
            ' ' if depth == 0 && !symbol[..i].ends_with("operator") => name_start = i + 1,
            _ => {}
        }
    }
    &symbol[name_start..]
}

/// Functions of the C and C++ runtimes whose allocations the runtime keeps for itself while
/// the process lives (only a checker gets them freed at exit, through glibc's `__libc_freeres`
/// and libstdc++'s `__gnu_cxx::__freeres`, as valgrind does):
/// stdio buffers, locale, time zone, NSS and resolver state, `setenv`'s copies, thread
/// descriptors, libstdc++'s exception pool. Prefixes of the direct caller of the allocator.
const RUNTIME_OWNED_CALLERS: &[&str] = &[
    // stdio buffers
    "_IO_file_doallocate",
    "__GI__IO_file_doallocate",
    // locale and character sets
    "_nl_",
    "new_composite_name",
    "setlocale",
    "__libc_setlocale",
    "read_alias_file",
    "extend_alias_table",
    "__gconv",
    "__wcsmbs_load_conv",
    // time zone
    "__tzfile_read",
    "__tzstring",
    "tzset_internal",
    "__tzset_parse_tz",
    "update_vars",
    // environment copies made by setenv/putenv
    "__add_to_environ",
    // NSS, the resolver and the get*by* static buffers
    "__nss_",
    "nss_",
    "global_state_allocate",
    "__libc_alloc_buffer",
    "__res_",
    "__resolv_",
    "resolv_conf",
    "getpwnam",
    "getpwuid",
    "getgrnam",
    "getgrgid",
    "getspnam",
    "gethostby",
    "getservby",
    "getprotoby",
    "getnetby",
    "getaliasby",
    "getpwent",
    "getgrent",
    // thread-local storage blocks (allocated by the loader per thread and per module)
    "allocate_dtv",
    "_dl_allocate_tls",
    "_dl_resize_dtv",
    "_dl_update_slotinfo",
    "update_get_addr",
    "tls_get_addr_tail",
    "_dlfo_",
    "_dl_map_object_deps",
    // libstdc++'s emergency exception-handling pool
    "(anonymous namespace)::pool::pool",
    "__gnu_cxx::__freeres",
];

/// Names an allocator's own inlined wrappers take in the loader (`rtld-malloc.h`).
const ALLOCATOR_WRAPPERS: &[&str] = &["malloc", "calloc", "realloc", "free"];

/// C library functions that only copy for their caller: the block belongs to whoever called
/// them, so ownership is decided one frame further out.
const COPYING_HELPERS: &[&str] = &[
    "__GI___strdup",
    "__strdup",
    "strdup",
    "__GI___strndup",
    "__strndup",
    "strndup",
];

/// True when the block was allocated by the C or C++ runtime for itself, kept while the
/// process lives (not a leak of the program). Decided by the allocator's direct caller.
pub fn runtime_owned(frames: &[SymbolizedFrame]) -> bool {
    let Some(caller) = frames.iter().find(|f| {
        let symbol = f.symbol.as_deref().unwrap_or("");
        let wrapper = f.inlined && ALLOCATOR_WRAPPERS.contains(&symbol);
        !(wrapper || COPYING_HELPERS.contains(&symbol))
    }) else {
        return false;
    };
    let caller_module = caller
        .module
        .as_deref()
        .map_or("", |m| m.rsplit('/').next().unwrap_or(m));
    let in_runtime = ["libc.so", "libc-2.", "ld-linux", "libstdc++.so"]
        .iter()
        .any(|p| caller_module.starts_with(p));
    if !in_runtime {
        return false;
    }
    if caller
        .symbol
        .as_deref()
        .is_some_and(|s| RUNTIME_OWNED_CALLERS.iter().any(|p| s.starts_with(p)))
    {
        return true;
    }
    // libstdc++'s own static initialisers (its exception pool, whose symbols the shipped
    // library does not name): no program frame anywhere, and the loader running constructors.
    caller_module.starts_with("libstdc++.so")
        && frames
            .iter()
            .all(|f| f.module.is_none() || is_runtime_frame(f))
        && frames
            .iter()
            .any(|f| f.symbol.as_deref() == Some("_dl_init"))
}

/// The *site* of a stack: the index of its first frame in the program's own code, the code
/// that (directly or through its runtime) called the allocator; the frames before it are the
/// runtime's and the allocator's. 0 for a stack made only of runtime frames. `is_allocator`
/// additionally marks allocator modules found by their symbols.
pub fn site(frames: &[SymbolizedFrame], is_allocator: impl Fn(&SymbolizedFrame) -> bool) -> usize {
    frames
        .iter()
        .position(|f| !is_runtime_frame(f) && !is_allocator(f))
        .unwrap_or(0)
}

/// Drops the frames before the [`site`], so `frames[0]` is the site (for notices, which show
/// a stack's first few frames). A stack made only of runtime frames is kept whole.
pub fn trim(frames: &mut Vec<SymbolizedFrame>, is_allocator: impl Fn(&SymbolizedFrame) -> bool) {
    let n = site(frames, is_allocator);
    frames.drain(..n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(symbol: &str, module: &str) -> SymbolizedFrame {
        SymbolizedFrame {
            addr: 1,
            symbol: Some(symbol.into()),
            module: Some(module.into()),
            offset: Some(0),
            file: None,
            line: None,
            inlined: false,
        }
    }

    #[test]
    fn trims_libc_libstdcxx_and_rust_shims() {
        let mut frames = vec![
            frame("__strdup", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            frame(
                "operator new(unsigned long)",
                "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            ),
            frame("__rust_alloc", "/app/bin"),
            frame("alloc::raw_vec::RawVec<T,A>::grow_one", "/app/bin"),
            frame("leaky::cache_insert", "/app/bin"),
            frame("std::rt::lang_start", "/app/bin"),
            frame("main", "/app/bin"),
        ];
        trim(&mut frames, |_| false);
        assert_eq!(frames[0].symbol.as_deref(), Some("leaky::cache_insert"));
        assert_eq!(frames.len(), 3, "only leading runtime frames go");
    }

    #[test]
    fn an_all_runtime_stack_is_kept() {
        let mut frames = vec![
            frame("malloc", "/lib/libc.so.6"),
            frame("start_thread", "/lib/libc.so.6"),
        ];
        trim(&mut frames, |_| false);
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn custom_allocator_modules_are_trimmed_by_predicate() {
        let mut frames = vec![
            frame("my_malloc", "/opt/libmyalloc.so"),
            frame("work", "/app"),
        ];
        trim(&mut frames, |f| {
            f.module.as_deref() == Some("/opt/libmyalloc.so")
        });
        assert_eq!(frames[0].symbol.as_deref(), Some("work"));
    }

    #[test]
    fn runtime_owned_blocks_are_told_by_the_allocators_caller() {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let ld = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
        assert!(runtime_owned(&[
            frame("__GI__IO_file_doallocate", libc),
            frame("main", "/app")
        ]));
        assert!(runtime_owned(&[frame("_nl_make_l10nflist", libc)]));
        let mut wrapper = frame("calloc", ld);
        wrapper.inlined = true;
        assert!(runtime_owned(&[wrapper.clone(), frame("allocate_dtv", ld)]));
        // The loader's own objects for dlopen stay in use (valgrind reports them too).
        assert!(!runtime_owned(&[wrapper, frame("_dl_new_object", ld)]));
        // strdup and fopen hand their blocks to the program, unless the runtime called them.
        assert!(!runtime_owned(&[
            frame("__GI___strdup", libc),
            frame("main", "/app")
        ]));
        assert!(runtime_owned(&[
            frame("__GI___strdup", libc),
            frame("setlocale", libc)
        ]));
        assert!(!runtime_owned(&[frame("__fopen_internal", libc)]));
        // A program's own function with a runtime-like name is the program's.
        assert!(!runtime_owned(&[frame("_nl_mine", "/app")]));
        assert!(!runtime_owned(&[]));
    }

    #[test]
    fn cpp_names_lose_return_types_and_parameters() {
        let push = "void std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>(__gnu_cxx::__normal_iterator<int*, std::vector<int, std::allocator<int> > >, int const&)";
        assert_eq!(
            qualified_name(push),
            "std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>"
        );
        assert_eq!(qualified_name("make_vector()"), "make_vector");
        assert_eq!(
            qualified_name("operator new(unsigned long)"),
            "operator new"
        );
        assert_eq!(qualified_name("rust_leak::main"), "rust_leak::main");
        assert_eq!(
            qualified_name("std::map<int, int>::operator[](int const&)"),
            "std::map<int, int>::operator[]"
        );
        assert!(is_runtime_frame(&frame(push, "/app")));
        assert!(!is_runtime_frame(&frame("make_vector()", "/app")));
    }

    #[test]
    fn library_code_inlined_from_system_headers_is_runtime() {
        let mut getline = frame("getline", "/app");
        getline.file = Some("/usr/include/x86_64-linux-gnu/bits/stdio.h".into());
        assert!(!is_runtime_frame(&getline), "only when inlined");
        getline.inlined = true;
        assert!(is_runtime_frame(&getline));
        let mut own = frame("helper", "/app");
        own.inlined = true;
        own.file = Some("/src/app/helper.h".into());
        assert!(!is_runtime_frame(&own));
    }

    #[test]
    fn libstdcxx_static_init_is_the_runtimes() {
        let pool = SymbolizedFrame {
            symbol: None,
            ..frame("", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30")
        };
        let ld = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
        assert!(runtime_owned(&[
            pool.clone(),
            frame("call_init", ld),
            frame("_dl_init", ld)
        ]));
        // The same library allocating for the program (operator new called from main) is not.
        assert!(!runtime_owned(&[pool, frame("main", "/app")]));
    }

    /// blazesym demangles with cpp_demangle, patched (third_party/cpp_demangle) to read GCC's
    /// `sr <type> <name>` as c++filt does: every `std::make_shared` has one.
    #[test]
    fn long_libstdcxx_template_names_are_demangled() {
        let demangle = |s: &str| {
            cpp_demangle::Symbol::new(s)
                .ok()
                .and_then(|s| s.demangle().ok())
        };
        let make_shared = "_ZSt11make_sharedINSt13__future_base17_Async_state_implINSt6thread8_\
            InvokerISt5tupleIJPFiiEiEEEEiEEJRS5_RiEESt10shared_ptrINSt9enable_ifIXntsrSt8is_\
            arrayIT_E5valueESF_E4typeEEDpOT0_";
        let state = "std::__future_base::_Async_state_impl<std::thread::_Invoker<std::tuple<\
            int (*)(int), int> >, int>";
        assert_eq!(
            demangle(make_shared).as_deref(),
            Some(
                format!(
                    "std::shared_ptr<std::enable_if<!(std::is_array<{state} >::value), {state} \
                     >::type> std::make_shared<{state}, int (&)(int), int&>(int (&)(int), int&)"
                )
                .as_str()
            )
        );
        // The same form with a plain class template as the qualifier, and the grammar's own
        // `sr <levels> E <name>`, which reads as before.
        assert_eq!(
            demangle("_Z1fIiEv1AIXsr1BIT_E1zEE").as_deref(),
            Some("void f<int>(A<B<int>::z>)")
        );
        assert_eq!(
            demangle("_Z1fIiEv1AIXsr1BIT_EE1zEE").as_deref(),
            Some("void f<int>(A<B<int>::z>)")
        );
    }

    #[test]
    fn program_code_is_not_runtime() {
        assert!(!is_runtime_frame(&frame(
            "leak_here",
            "/usr/local/bin/libcache-server"
        )));
        assert!(!is_runtime_frame(&frame("standard_deviation", "/app")));
        assert!(is_runtime_frame(&frame(
            "x",
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        )));
    }
}
