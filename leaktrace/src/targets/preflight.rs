//! Checks, before anything is loaded, that this process and this kernel can trace: the
//! capabilities, BTF, uprobes, and tracefs (mounted here when missing). Each failure is one
//! actionable sentence.
use std::{
    io,
    path::{Path, PathBuf},
};

/// Linux capability numbers we need.
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Why tracing cannot start here.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "insufficient privileges: leaktrace needs CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE \
         (or root), and this process lacks {0}; run it with sudo"
    )]
    /// The effective capability set lacks these (names, comma-separated).
    Capabilities(String),
    #[error("cannot read this process's capabilities: {0}")]
    /// `CapEff` could not be read from `/proc/self/status`.
    ReadCapabilities(io::Error),
    #[error(
        "this kernel exposes no BTF ({0} is missing): leaktrace needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    /// `kernel/btf/vmlinux` under sysfs, which does not exist.
    NoBtf(PathBuf),
    #[error(
        "this kernel has no uprobe support ({0} is missing): leaktrace needs \
         CONFIG_UPROBE_EVENTS=y"
    )]
    /// The uprobe PMU's `type` file under sysfs, which does not exist.
    NoUprobes(PathBuf),
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({0}); mount it \
         with `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    /// tracefs is not mounted, and this is the error of mounting it.
    NoTracefs(io::Error),
}

/// Names the missing capabilities in an effective set, or `None` when all are there.
pub fn missing_capabilities(effective: u64) -> Option<String> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF", admin),
        (CAP_PERFMON, "CAP_PERFMON", admin),
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE", false),
    ]
    .into_iter()
    .filter(|&(cap, _, implied)| !has(cap) && !implied)
    .map(|(_, name, _)| name)
    .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Checks the kernel features under `sys` (normally `/sys`).
pub fn check_kernel(sys: &Path) -> Result<(), PreflightError> {
    let btf = sys.join("kernel/btf/vmlinux");
    if !btf.exists() {
        return Err(PreflightError::NoBtf(btf));
    }
    let uprobe = sys.join("bus/event_source/devices/uprobe/type");
    if !uprobe.exists() {
        return Err(PreflightError::NoUprobes(uprobe));
    }
    Ok(())
}

fn tracefs_mounted(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// Makes sure tracefs is mounted (tracepoints are attached through it).
pub fn ensure_tracefs() -> Result<(), PreflightError> {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracefs_mounted(tracing) || tracefs_mounted(Path::new("/sys/kernel/debug/tracing")) {
        return Ok(());
    }
    // SAFETY: plain mount(2) call with NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(PreflightError::NoTracefs(io::Error::last_os_error()));
    }
    Ok(())
}

/// All checks, in the order a user can fix them.
pub fn check() -> Result<(), PreflightError> {
    let effective = crate::targets::procfs::effective_capabilities()
        .map_err(PreflightError::ReadCapabilities)?;
    if let Some(missing) = missing_capabilities(effective) {
        return Err(PreflightError::Capabilities(missing));
    }
    check_kernel(Path::new("/sys"))?;
    ensure_tracefs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_exactly_the_missing_capabilities() {
        assert_eq!(missing_capabilities(u64::MAX), None);
        assert_eq!(
            missing_capabilities(0).as_deref(),
            Some("CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE")
        );
        let admin_ptrace = (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE);
        assert_eq!(
            missing_capabilities(admin_ptrace),
            None,
            "CAP_SYS_ADMIN implies BPF and PERFMON"
        );
        let bpf_perfmon = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert_eq!(
            missing_capabilities(bpf_perfmon).as_deref(),
            Some("CAP_SYS_PTRACE")
        );
    }

    #[test]
    fn kernel_without_btf_or_uprobes_is_named() {
        let root = std::env::temp_dir().join(format!("leaktrace-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("kernel/btf")).unwrap();
        let err = check_kernel(&root).unwrap_err();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
        std::fs::write(root.join("kernel/btf/vmlinux"), b"").unwrap();
        let err = check_kernel(&root).unwrap_err();
        assert!(err.to_string().contains("CONFIG_UPROBE_EVENTS"), "{err}");
        std::fs::create_dir_all(root.join("bus/event_source/devices/uprobe")).unwrap();
        std::fs::write(root.join("bus/event_source/devices/uprobe/type"), b"8\n").unwrap();
        check_kernel(&root).unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }
}
