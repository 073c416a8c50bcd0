//! Control groups: which cgroup a process is in, the container behind it, and the memory
//! limit an OOM kill hit. Parsing is pure and tested on real-world paths (Docker, containerd,
//! CRI-O, podman, systemd, cgroup v1 and v2); the readers are thin.
use std::{fs, path::PathBuf};

/// One line of `/proc/PID/cgroup`: `hierarchy:controllers:path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLine {
    pub hierarchy: u32,
    /// Empty for the unified (v2) hierarchy.
    pub controllers: Vec<String>,
    pub path: String,
}

/// Parses `/proc/PID/cgroup`.
pub fn parse(text: &str) -> Vec<CgroupLine> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let hierarchy = f.next()?.parse().ok()?;
            let controllers = f.next()?;
            let path = f.next()?.to_owned();
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            Some(CgroupLine {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// Where the process's memory is accounted: the v1 `memory` controller's cgroup, else the
/// unified hierarchy's. `true` for v2.
pub fn memory_cgroup(lines: &[CgroupLine]) -> Option<(&str, bool)> {
    lines
        .iter()
        .find(|l| l.controllers.iter().any(|c| c == "memory"))
        .map(|l| (l.path.as_str(), false))
        .or_else(|| {
            lines
                .iter()
                .find(|l| l.hierarchy == 0)
                .map(|l| (l.path.as_str(), true))
        })
}

/// The container id a cgroup path carries: 64 hex digits after `docker-`, `cri-containerd-`,
/// `crio-`, `libpod-` (systemd scopes), or as the last component (`/docker/<id>`,
/// `/kubepods/.../<id>`).
pub fn container_id(path: &str) -> Option<String> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    for part in path.rsplit('/') {
        let part = part.strip_suffix(".scope").unwrap_or(part);
        let candidate = part.rsplit(['-', ':']).next().unwrap_or(part);
        if is_id(candidate) {
            return Some(candidate.to_owned());
        }
    }
    None
}

/// The Kubernetes pod uid in a cgroup path (`pod<uid>` or `-pod<uid_with_underscores>.slice`).
pub fn pod_uid(path: &str) -> Option<String> {
    path.split('/').find_map(|part| {
        let part = part.strip_suffix(".slice").unwrap_or(part);
        let uid = part.rsplit_once("pod").map(|(_, u)| u)?;
        let uid = uid.replace('_', "-");
        (uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(uid)
    })
}

/// Mount points of the cgroup v1 memory controller and of cgroup v2, from `mountinfo`.
pub fn mounts(mountinfo: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let (mut v1, mut v2) = (None, None);
    for line in mountinfo.lines() {
        // "id parent maj:min root mountpoint options ... - fstype source superoptions"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mountpoint = left.split(' ').nth(4);
        let mut r = right.split(' ');
        let fstype = r.next();
        let superopts = r.nth(1).unwrap_or("");
        match (fstype, mountpoint) {
            (Some("cgroup2"), Some(m)) if v2.is_none() => v2 = Some(PathBuf::from(m)),
            (Some("cgroup"), Some(m)) if superopts.split(',').any(|o| o == "memory") => {
                v1 = Some(PathBuf::from(m))
            }
            _ => {}
        }
    }
    (v1, v2)
}

/// Interprets a memory limit file: `max` and v1's "no limit" (a page-rounded i64::MAX) are
/// none.
pub fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < (1 << 62)).then_some(v)
}

/// What an OOM record says about where a process lived.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub cgroup: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// The memory limit of its cgroup (the nearest limited ancestor), in bytes.
    pub limit_bytes: Option<u64>,
}

/// Reads where `pid` lives, while it still exists.
pub fn placement(pid: u32) -> Option<Placement> {
    let lines = parse(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?);
    let (path, v2) = memory_cgroup(&lines)?;
    let (v1_mount, v2_mount) =
        mounts(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let (root, file) = if v2 {
        (v2_mount, "memory.max")
    } else {
        (v1_mount, "memory.limit_in_bytes")
    };
    // The limit that applies is the smallest along the path to the root.
    let limit_bytes = root.and_then(|root| {
        let mut dir = PathBuf::from(path);
        let mut best: Option<u64> = None;
        loop {
            let f = root.join(dir.strip_prefix("/").unwrap_or(&dir)).join(file);
            if let Some(l) = fs::read_to_string(&f).ok().as_deref().and_then(parse_limit) {
                best = Some(best.map_or(l, |b| b.min(l)));
            }
            if !dir.pop() {
                break best;
            }
        }
    });
    Some(Placement {
        cgroup: path.to_owned(),
        container_id: container_id(path),
        pod_uid: pod_uid(path),
        limit_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b";

    #[test]
    fn container_ids_in_real_cgroup_paths() {
        let cases = [
            // Docker, cgroup v1
            (format!("/docker/{ID}"), Some(ID)),
            // Docker with the systemd driver, v2
            (format!("/system.slice/docker-{ID}.scope"), Some(ID)),
            // containerd in Kubernetes, v1
            (
                format!("/kubepods/besteffort/pod0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c/{ID}"),
                Some(ID),
            ),
            // containerd in Kubernetes, v2 with systemd
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f2b6a7e_3d6c_4b1a_9c5e_2a7f8d9e0b1c.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
            ),
            // CRI-O, v2
            (
                format!(
                    "/kubepods.slice/kubepods-pod0f2b6a7e_3d6c_4b1a_9c5e_2a7f8d9e0b1c.slice/crio-{ID}.scope"
                ),
                Some(ID),
            ),
            // CRI-O's conmon scope carries the id too
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                Some(ID),
            ),
            // not containers
            (
                "/user.slice/user-1000.slice/session-2.scope".to_owned(),
                None,
            ),
            ("/system.slice/nginx.service".to_owned(), None),
            ("/".to_owned(), None),
        ];
        for (path, want) in cases {
            assert_eq!(container_id(&path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn pod_uids() {
        let v1 = "/kubepods/besteffort/pod0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c/abc";
        let v2 = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f2b6a7e_3d6c_4b1a_9c5e_2a7f8d9e0b1c.slice/x";
        assert_eq!(
            pod_uid(v1).as_deref(),
            Some("0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c")
        );
        assert_eq!(
            pod_uid(v2).as_deref(),
            Some("0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c")
        );
        assert_eq!(pod_uid("/system.slice/podman.service"), None);
    }

    #[test]
    fn proc_cgroup_v1_and_v2() {
        let v1 = "12:memory:/leaktrace-test\n11:cpu,cpuacct:/\n1:name=systemd:/init.scope\n0::/init.scope\n";
        let lines = parse(v1);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1].controllers, ["cpu", "cpuacct"]);
        assert_eq!(memory_cgroup(&lines), Some(("/leaktrace-test", false)));
        let v2 = "0::/system.slice/app.service\n";
        assert_eq!(
            memory_cgroup(&parse(v2)),
            Some(("/system.slice/app.service", true))
        );
    }

    #[test]
    fn mount_points_and_limits() {
        let mountinfo = "\
30 23 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
31 23 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,memory
32 23 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
";
        let (v1, v2) = mounts(mountinfo);
        assert_eq!(v1, Some(PathBuf::from("/sys/fs/cgroup/memory")));
        assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_limit("33554432\n"), Some(32 << 20));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712"), None);
    }
}
