//! Builds the eBPF object (`leaktrace-ebpf`) with aya-build and leaves it in `OUT_DIR`.
//!
//! The eBPF build needs nightly with `rust-src` and `bpf-linker` (`cargo xtask setup` installs
//! them). Without them, `cargo check`, `clippy` and the unit tests still work: an empty stub
//! object is written instead and the binary explains at run time how to get the real one.
//! `LEAKTRACE_REQUIRE_EBPF=1` (set by xtask) turns a missing toolchain into a build error.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

const OBJECT: &str = "leaktrace";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LEAKTRACE_REQUIRE_EBPF");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let required = env::var("LEAKTRACE_REQUIRE_EBPF").is_ok_and(|v| v == "1");

    if let Err(missing) = toolchain_ready() {
        if required {
            return Err(anyhow!(
                "cannot build the eBPF object: {missing}; run `cargo xtask setup`"
            ));
        }
        println!("cargo:warning=building a stub eBPF object: {missing} (run `cargo xtask setup`)");
        fs::write(out_dir.join(OBJECT), [])?;
        return Ok(());
    }

    // The nested eBPF build's progress lines would each become a cargo warning.
    // SAFETY: build scripts are single-threaded here.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "leaktrace-ebpf")
        .ok_or_else(|| anyhow!("leaktrace-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("leaktrace-ebpf has no directory"))?;
    // The eBPF crate's dependency on the contract is invisible to cargo from here.
    if let Some(common) = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "leaktrace-common")
        && let Some(dir) = common.manifest_path.parent()
    {
        println!("cargo:rerun-if-changed={dir}");
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Checks for what the eBPF build needs, without installing anything.
fn toolchain_ready() -> Result<(), String> {
    if env::var_os("AYA_BUILD_SKIP").is_some() {
        return Err("AYA_BUILD_SKIP is set".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .ok_or("no nightly toolchain")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Err("nightly has no rust-src component".into());
    }
    which::which("bpf-linker").map_err(|_| "bpf-linker is not installed".to_string())?;
    Ok(())
}
