//! Whether a return probe can kill the traced process: on x86_64 kernels from 6.11 on, a
//! uretprobe returns to the caller through the `uretprobe` system call (nr 335) made from the
//! kernel's trampoline page, and a seccomp filter that does not know that call (podman's and
//! Docker's default profiles answer `ENOSYS`, others kill) makes the trampoline fall through
//! to `ud2`: the process dies of SIGILL the first time a probed function returns.
//!
//! The kernel fixed it by letting `uretprobe` pass every seccomp filter unseen ("seccomp:
//! passthrough uretprobe systemcall without filtering"), in 6.14 and in the stable releases
//! 6.12.14 and 6.13.3 (February 2025). 6.11 never got it. Distribution kernels may carry the
//! fix under an older version number, so a version in the window is a risk, not a verdict.

/// A kernel release, `major.minor.patch` from `uname -r` (`6.12.9-200.fc41.x86_64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelRelease(pub u32, pub u32, pub u32);

impl KernelRelease {
    /// Parses the leading `major.minor[.patch]` of a release string; `None` when it has none.
    pub fn parse(release: &str) -> Option<Self> {
        let mut numbers = release.trim().split(['.', '-', '+', '_']).map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        let major = numbers.next()??;
        let minor = numbers.next()??;
        let patch = numbers.next().flatten().unwrap_or(0);
        Some(Self(major, minor, patch))
    }

    /// The running kernel's release, from uname(2).
    pub fn running() -> Option<Self> {
        // SAFETY: `utsname` is plain data; uname fills it and we read it only on success.
        let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: `uts` is a valid, writable utsname.
        if unsafe { libc::uname(&mut uts) } != 0 {
            return None;
        }
        let bytes: Vec<u8> = uts
            .release
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Self::parse(&String::from_utf8_lossy(&bytes))
    }

    /// True when uretprobes return through the `uretprobe` system call and seccomp filters
    /// still see that call: 6.11, 6.12 before 6.12.14, 6.13 before 6.13.3 (x86_64 only: other
    /// architectures never had the system call).
    pub fn uretprobe_syscall_filtered(self) -> bool {
        if !cfg!(target_arch = "x86_64") {
            return false;
        }
        match (self.0, self.1) {
            (6, 11) => true,
            (6, 12) => self.2 < 14,
            (6, 13) => self.2 < 3,
            _ => false,
        }
    }
}

/// A process's seccomp state, from the `Seccomp:` and `Seccomp_filters:` lines of
/// `/proc/PID/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeccompState {
    /// 0 none, 1 strict, 2 filter.
    pub mode: u32,
    /// How many filters are attached (kernels from 5.9 on print it).
    pub filters: Option<u32>,
}

impl SeccompState {
    /// Reads the two fields out of a `/proc/PID/status` text; missing fields read as none.
    pub fn from_status(status: &str) -> Self {
        let mut state = Self::default();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim().parse::<u32>().ok();
            match key {
                "Seccomp" => state.mode = value.unwrap_or(0),
                "Seccomp_filters" => state.filters = value,
                _ => {}
            }
        }
        state
    }

    /// True when a filter can see the process's system calls (strict mode allows only four,
    /// `uretprobe` not among them).
    pub fn filtered(self) -> bool {
        self.mode != 0 || self.filters.is_some_and(|n| n > 0)
    }
}

/// Why a return probe in this process may kill it, in words for a warning; `None` when it
/// cannot.
pub fn uretprobe_risk(kernel: KernelRelease, state: SeccompState) -> Option<String> {
    if !(kernel.uretprobe_syscall_filtered() && state.filtered()) {
        return None;
    }
    let KernelRelease(major, minor, patch) = kernel;
    let filters = state
        .filters
        .map_or_else(String::new, |n| format!(", {n} filter(s)"));
    Some(format!(
        "it runs under seccomp (mode {}{filters}) on kernel {major}.{minor}.{patch}, where a \
         return probe returns through the uretprobe system call (335) and a filter that does \
         not allow it kills the process (SIGSYS) or makes it die of SIGILL; fixed in 6.14, \
         6.13.3 and 6.12.14",
        state.mode
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_from_uname_strings() {
        assert_eq!(
            KernelRelease::parse("6.18.44-fc-v1147"),
            Some(KernelRelease(6, 18, 44))
        );
        assert_eq!(
            KernelRelease::parse("6.12.9-200.fc41.x86_64"),
            Some(KernelRelease(6, 12, 9))
        );
        assert_eq!(
            KernelRelease::parse("6.11.0-rc3"),
            Some(KernelRelease(6, 11, 0))
        );
        assert_eq!(KernelRelease::parse("6.13"), Some(KernelRelease(6, 13, 0)));
        assert_eq!(KernelRelease::parse("linux"), None);
        assert_eq!(KernelRelease::parse(""), None);
        assert_eq!(KernelRelease::parse("6"), None);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn only_the_kernels_between_the_syscall_and_its_fix_are_at_risk() {
        let at = |s: &str| {
            KernelRelease::parse(s)
                .unwrap()
                .uretprobe_syscall_filtered()
        };
        for risky in ["6.11.0", "6.11.11", "6.12.0", "6.12.13", "6.13.0", "6.13.2"] {
            assert!(at(risky), "{risky}");
        }
        for safe in [
            "5.15.0", "6.10.14", "6.12.14", "6.12.60", "6.13.3", "6.14.0", "6.18.44",
        ] {
            assert!(!at(safe), "{safe}");
        }
    }

    #[test]
    fn seccomp_fields_are_read_from_status() {
        let status = "Name:\tctr_service\nNoNewPrivs:\t0\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        let s = SeccompState::from_status(status);
        assert_eq!(
            s,
            SeccompState {
                mode: 2,
                filters: Some(1)
            }
        );
        assert!(s.filtered());
        let none = SeccompState::from_status("Seccomp:\t0\nSeccomp_filters:\t0\n");
        assert!(!none.filtered());
        assert!(!SeccompState::from_status("garbage\n:\nSeccomp: x\n").filtered());
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_risk_needs_both_the_kernel_and_a_filter() {
        let filtered = SeccompState {
            mode: 2,
            filters: Some(1),
        };
        let risk = uretprobe_risk(KernelRelease(6, 12, 9), filtered).unwrap();
        assert!(risk.contains("6.12.9") && risk.contains("335"), "{risk}");
        assert_eq!(uretprobe_risk(KernelRelease(6, 18, 44), filtered), None);
        assert_eq!(
            uretprobe_risk(KernelRelease(6, 12, 9), SeccompState::default()),
            None
        );
    }
}
