//! `cargo xtask image`: the agent's container image, built offline (there is no registry to
//! pull a base from). The release `leaktrace` binary (debug info stripped) and the shared
//! libraries `ldd` lists for it, at the paths it lists, laid out as a root file system, tarred reproducibly and
//! `podman import`ed as `localhost/leaktrace:<version>-<hash>`; skipped when podman already
//! has that tag. The tarball stays in `target/image/`.
//!
//! Why copy glibc rather than link statically: the binary is built once either way, and a
//! musl build would be a second full build of every dependency (a rustup target, a C
//! toolchain for musl, minutes of CI) for ~2 MiB less image; glibc's malloc is also the one
//! the agent was measured with.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{build_release, output, run, workspace_root};

/// The image's repository; the manifests in `deploy/kubernetes/` name it.
pub const REPO: &str = "localhost/leaktrace";

/// Where the binary goes, and the image's entry point.
pub const BINARY: &str = "/usr/bin/leaktrace";

/// Empty directories the image holds: mount points the runtime or the manifest fills in
/// (a read-only root can't have them made at run time).
const MOUNT_POINTS: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "tmp",
    "etc",
    "run",
    "var/log/pods",
    "var/log/containers",
];

/// What `cargo xtask image` made.
pub struct Image {
    /// `localhost/leaktrace:<version>-<hash>`.
    pub name: String,
    /// The tarball's size in bytes (the image's only layer).
    pub bytes: u64,
    /// False when podman already had the tag.
    pub imported: bool,
}

/// Builds the release binary, then the image from it.
pub fn build() -> Result<Image> {
    build_release()?;
    let root = workspace_root();
    from_binary(
        &root.join("target/release/leaktrace"),
        &root.join("target/image"),
    )
}

/// Lays out, tars and imports the image of `binary`, working in `dir`.
pub fn from_binary(binary: &Path, dir: &Path) -> Result<Image> {
    fs::create_dir_all(dir)?;
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    lay_out(binary, &rootfs)?;
    let tmp = dir.join("leaktrace.tar.tmp");
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
        ])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tmp)
        .arg("."))?;
    let sum = output(Command::new("sha256sum").arg(&tmp)).context("sha256sum failed")?;
    let hash = sum.get(..16).context("sha256sum printed no hash")?;
    let version = env!("CARGO_PKG_VERSION");
    let tag = format!("{version}-{hash}");
    let tar = dir.join(format!("leaktrace-{tag}.tar"));
    fs::rename(&tmp, &tar)?;
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("leaktrace-") && name.ends_with(".tar") && entry.path() != tar {
            let _ = fs::remove_file(entry.path());
        }
    }
    let bytes = fs::metadata(&tar)?.len();
    let name = format!("{REPO}:{tag}");
    let exists = podman()
        .args(["image", "exists", &name])
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        // Root only because BPF needs it; the manifests make the root file system read-only
        // and give the capabilities, not the image.
        run(podman()
            .arg("import")
            .args(["--change", &format!("ENTRYPOINT [\"{BINARY}\"]")])
            .args([
                "--change",
                "CMD [\"agent\", \"--listen\", \"0.0.0.0:9464\"]",
            ])
            .args(["--change", "USER 0:0"])
            .args(["--change", "EXPOSE 9464/tcp"])
            .args(["--message", &format!("leaktrace {version}")])
            .arg(&tar)
            .arg(&name))?;
    }
    // The name the manifests use, moved to this build.
    run(podman().args(["tag", &name, &format!("{REPO}:{version}")]))?;
    Ok(Image {
        name,
        bytes,
        imported: !exists,
    })
}

/// `podman` with the global options every podman command here takes (tests/containers.md).
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

/// The binary at [`BINARY`], each library `ldd` lists at its path (as a file: the loader's
/// `/lib64` path is a link on Debian), and empty mount points.
fn lay_out(binary: &Path, root: &Path) -> Result<()> {
    for dir in MOUNT_POINTS {
        fs::create_dir_all(root.join(dir))?;
    }
    let to = root.join(BINARY.trim_start_matches('/'));
    fs::create_dir_all(to.parent().context("a parent")?)?;
    // Without its DWARF (35 of its 47 MiB are the release profile's line tables): a panic
    // still names its functions (the symbol table stays), only not their lines. The eBPF
    // object, with the BTF the kernel needs, is data inside it and stays whole.
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&to))?;
    for lib in shared_libraries(binary)? {
        let to = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        fs::create_dir_all(to.parent().context("a parent")?)?;
        fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    Ok(())
}

/// The absolute paths `ldd` lists for `exe` (`libc.so.6 => /lib/.../libc.so.6 (0x...)`, the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x...)`); the vDSO has no file.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("cannot run ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let libs = parse_ldd(&String::from_utf8_lossy(&out.stdout));
    ensure!(
        !libs.is_empty(),
        "ldd lists no library for {}",
        exe.display()
    );
    Ok(libs)
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=>").map_or(line, |(_, p)| p.trim());
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_files_to_copy() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd4b5f2000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f3a1c000000)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3a1be00000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3a1c2a0000)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }
}
