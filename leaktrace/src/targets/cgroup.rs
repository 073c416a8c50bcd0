//! Control groups: which cgroup a process is in, the container behind it, and the memory
//! limit an OOM kill hit. Parsing is pure and tested on real-world paths (Docker, containerd,
//! CRI-O, podman, systemd, cgroup v1 and v2); the readers are thin.
use std::{fs, path::PathBuf};

use hashbrown::HashMap;

/// One line of `/proc/PID/cgroup`: `hierarchy:controllers:path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLine {
    /// Hierarchy id; 0 for the unified (v2) hierarchy.
    pub hierarchy: u32,
    /// Empty for the unified (v2) hierarchy.
    pub controllers: Vec<String>,
    /// The cgroup's path from the hierarchy's root, starting with `/`.
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

/// The container runtime that made a cgroup, as its path tells (see [`container`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// Docker (dockerd), alone or under Kubernetes with cri-dockerd's systemd driver.
    Docker,
    /// containerd: Kubernetes' CRI plugin, or nerdctl.
    Containerd,
    /// CRI-O.
    CriO,
    /// Podman (libpod), rootful or rootless.
    Podman,
}

impl Runtime {
    /// The runtime's usual lower-case name: `docker`, `containerd`, `cri-o`, `podman`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Podman => "podman",
        }
    }
}

/// 64 lower-case hex digits: a full container id as runtimes write it.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What one path component says about a container.
enum Component<'a> {
    /// A container's own cgroup.
    Container(&'a str, Runtime),
    /// A runtime's monitor (conmon): next to a container, never in it.
    Monitor,
    /// A bare id: whose it is depends on the components above it.
    BareId(&'a str),
    /// Anything else.
    Other,
}

/// Reads one component of a cgroup path (a `.scope` suffix taken off).
fn component(part: &str) -> Component<'_> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    if is_container_id(part) {
        return Component::BareId(part);
    }
    // Monitors first: `crio-conmon-<id>` also starts with `crio-`.
    for monitor in ["crio-conmon-", "libpod-conmon-"] {
        if part.strip_prefix(monitor).is_some_and(is_container_id) {
            return Component::Monitor;
        }
    }
    const PREFIXES: [(&str, Runtime); 6] = [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("nerdctl-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("libpod-payload-", Runtime::Podman),
        ("libpod-", Runtime::Podman),
    ];
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = part.strip_prefix(prefix)
            && is_container_id(id)
        {
            return Component::Container(id, runtime);
        }
    }
    Component::Other
}

/// The container a cgroup path (as `/proc/PID/cgroup` writes it, v1 or v2) belongs to: its
/// full 64-hex id and the runtime that made it. The path is read from its leaf up, so a
/// process in a sub-cgroup of a container (`libpod-<id>.scope/container`, a nested
/// `init.scope`) belongs to it, and the innermost container wins when they nest.
///
/// What is recognized, for both cgroup versions:
/// - systemd driver, one scope per container: `docker-<id>.scope` (Docker),
///   `cri-containerd-<id>.scope` and `nerdctl-<id>.scope` (containerd), `crio-<id>.scope`
///   (CRI-O), `libpod-<id>.scope` (Podman, rootful in `machine.slice`, rootless under
///   `user@UID.service`);
/// - cgroupfs driver: `/docker/<id>` (Docker), `crio-<id>` (CRI-O), `/libpod_parent/libpod-<id>`
///   and `libpod-payload-<id>` (Podman);
/// - a bare `<id>` under a `kubepods` hierarchy (the kubelet's cgroupfs driver) is reported as
///   containerd. The path alone cannot tell it from Docker through dockershim or cri-dockerd,
///   which name their cgroups the same way; containerd is Kubernetes' default runtime since
///   dockershim was removed (1.24), so that is the answer given.
///
/// A runtime's monitor (`crio-conmon-<id>`, `libpod-conmon-<id>`) is not its container: a
/// path through one has none. Neither has a bare id under any other parent (a Docker
/// `--cgroup-parent`, `ctr`'s namespaces): which runtime made it is unknown, though
/// [`container_id`] still returns the id.
pub fn container(path: &str) -> Option<(String, Runtime)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate().rev() {
        match component(part) {
            Component::Container(id, runtime) => return Some((id.to_owned(), runtime)),
            Component::Monitor => return None,
            Component::BareId(id) => {
                let above = &parts[..i];
                let runtime = if above.last() == Some(&"docker") {
                    Runtime::Docker
                } else if above.iter().any(|p| p.starts_with("kubepods")) {
                    Runtime::Containerd
                } else {
                    return None;
                };
                return Some((id.to_owned(), runtime));
            }
            Component::Other => {}
        }
    }
    None
}

/// The container id a cgroup path carries (64 hex digits): the id of [`container`], else the
/// innermost bare id under a parent no runtime is known by (`/my-parent/<id>`). None for a
/// runtime's monitor (conmon).
pub fn container_id(path: &str) -> Option<String> {
    if let Some((id, _)) = container(path) {
        return Some(id);
    }
    for part in path.rsplit('/') {
        match component(part) {
            Component::Monitor => return None,
            Component::BareId(id) => return Some(id.to_owned()),
            Component::Container(..) | Component::Other => {}
        }
    }
    None
}

/// A pod uid as the kubelet writes it: a UUID (`8-4-4-4-12` hex digits), or the 32 hex
/// digits of a static pod's (a hash of its manifest, with no dashes).
fn is_pod_uid(uid: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = uid.split('-').collect();
    match groups.as_slice() {
        [a, b, c, d, e] => hex(a, 8) && hex(b, 4) && hex(c, 4) && hex(d, 4) && hex(e, 12),
        [one] => hex(one, 32),
        _ => false,
    }
}

/// The Kubernetes pod uid in a cgroup path, with dashes: the kubelet's pod cgroup is
/// `pod<uid>` with its cgroupfs driver (`/kubepods/burstable/pod<uid>/<id>`) and
/// `<parent>-pod<uid with _ for ->.slice` with its systemd driver
/// (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/…`), for
/// every runtime. The innermost such component wins.
pub fn pod_uid(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|part| {
        let uid = match part.strip_suffix(".slice") {
            // systemd: `-` separates a slice from its parents, so the uid's are `_`.
            Some(slice) => slice
                .strip_prefix("pod")
                .or_else(|| slice.rsplit_once("-pod").map(|(_, u)| u))?
                .replace('_', "-"),
            None => part.strip_prefix("pod")?.to_owned(),
        };
        is_pod_uid(&uid).then(|| uid.to_ascii_lowercase())
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
                v1 = Some(PathBuf::from(m));
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

/// Where a process lives: its memory cgroup, the container and pod that cgroup belongs to,
/// and the memory limit that applies to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attribution {
    /// The memory cgroup's path, from `/proc/PID/cgroup`.
    pub cgroup: String,
    /// The container id in that path (64 hex digits), if any (see [`container_id`]).
    pub container_id: Option<String>,
    /// The Kubernetes pod uid in that path, if any (see [`pod_uid`]).
    pub pod_uid: Option<String>,
    /// The memory limit of its cgroup (the nearest limited ancestor), in bytes.
    pub limit_bytes: Option<u64>,
}

/// The memory cgroup of `pid`, as its `/proc/PID/cgroup` says: (path, v2).
pub fn memory_cgroup_of(pid: u32) -> Option<(String, bool)> {
    let lines = parse(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?);
    memory_cgroup(&lines).map(|(p, v2)| (p.to_owned(), v2))
}

/// Where the memory hierarchy is mounted here (v1's `memory` controller, else v2).
fn hierarchy_root(v2: bool) -> Option<PathBuf> {
    let (v1_mount, v2_mount) =
        mounts(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    if v2 { v2_mount } else { v1_mount }
}

/// Reads where `pid` lives, while it still exists.
pub fn attribution(pid: u32) -> Option<Attribution> {
    let (path, v2) = memory_cgroup_of(pid)?;
    Some(attribution_at(&path, v2))
}

/// What is known of the memory cgroup at `path` (as `/proc/PID/cgroup` writes it).
pub fn attribution_at(path: &str, v2: bool) -> Attribution {
    let file = if v2 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    // The limit that applies is the smallest along the path to the root.
    let limit_bytes = hierarchy_root(v2).and_then(|root| {
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
    Attribution {
        cgroup: path.to_owned(),
        container_id: container_id(path),
        pod_uid: pod_uid(path),
        limit_bytes,
    }
}

/// The `oom_kill N` count of a v1 `memory.oom_control` or a v2 `memory.events`.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// Cgroups visited at most when counting OOM kills (a node has hundreds).
const MAX_CGROUPS: usize = 100_000;

/// OOM kills counted per memory cgroup: the cgroup whose count went up is where a kill
/// happened, even when the victim is gone before its `/proc/PID/cgroup` can be read (and an
/// exiting task's reads back as the root).
#[derive(Debug)]
pub struct OomKillCounters {
    root: PathBuf,
    v2: bool,
    counts: HashMap<String, u64>,
}

impl OomKillCounters {
    /// Counts as of now, or `None` without a memory controller.
    pub fn new() -> Option<Self> {
        let (root, v2) = match hierarchy_root(false) {
            Some(r) => (r, false),
            None => (hierarchy_root(true)?, true),
        };
        let mut c = Self {
            root,
            v2,
            counts: HashMap::new(),
        };
        c.counts = c.scan();
        Some(c)
    }

    /// Every cgroup's count, by path relative to the hierarchy (`/a/b`).
    fn scan(&self) -> HashMap<String, u64> {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let mut counts = HashMap::new();
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            if counts.len() >= MAX_CGROUPS {
                break;
            }
            if let Some(n) = fs::read_to_string(dir.join(file))
                .ok()
                .as_deref()
                .and_then(parse_oom_kills)
            {
                counts.insert(
                    if rel.is_empty() {
                        "/".into()
                    } else {
                        rel.clone()
                    },
                    n,
                );
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    stack.push((e.path(), format!("{rel}/{name}")));
                }
            }
        }
        counts
    }

    /// The memory cgroup of the kill just seen: of the cgroups whose count went up, the
    /// deepest, preferring the one `hint` (the victim's cgroup, if it could be read) lies
    /// in. Consumes one kill there and in its ancestors. (path, v2).
    pub fn attribute(&mut self, hint: Option<&str>) -> Option<(String, bool)> {
        let now = self.scan();
        let chosen = pick_changed(&self.counts, &now, hint)?;
        // One kill accounted for here and (v2 counts are hierarchical) above.
        let mut path = Some(chosen.as_str());
        while let Some(p) = path {
            if let (Some(seen), Some(&n)) = (self.counts.get_mut(p), now.get(p)) {
                *seen = (*seen + 1).min(n);
            } else if let Some(&n) = now.get(p) {
                self.counts.insert(p.to_owned(), n.min(1));
            }
            path = parent(p);
        }
        // Cgroups that appeared since: known from now on.
        for (p, n) in now {
            self.counts.entry(p).or_insert(n);
        }
        Some((chosen, self.v2))
    }
}

fn parent(path: &str) -> Option<&str> {
    match path.rsplit_once('/') {
        Some(("", _)) if path != "/" => Some("/"),
        Some((p, _)) if !p.is_empty() => Some(p),
        _ => None,
    }
}

/// Of the cgroups counting more kills `now` than `before` (new ones count from 0), the
/// deepest; `hint` or the changed cgroup holding it wins when it is among them.
pub fn pick_changed(
    before: &HashMap<String, u64>,
    now: &HashMap<String, u64>,
    hint: Option<&str>,
) -> Option<String> {
    let changed: Vec<&String> = now
        .iter()
        .filter(|(p, n)| **n > before.get(*p).copied().unwrap_or(0))
        .map(|(p, _)| p)
        .collect();
    let within = |inner: &str, outer: &str| {
        outer == "/" || inner == outer || inner.starts_with(&format!("{outer}/"))
    };
    // An exiting task's cgroup reads back as the root: no hint at all.
    if let Some(h) = hint.filter(|h| *h != "/")
        && let Some(best) = changed
            .iter()
            .filter(|c| within(h, c))
            .max_by_key(|c| c.len())
    {
        return Some((*best).clone());
    }
    changed
        .iter()
        .max_by(|a, b| {
            a.matches('/')
                .count()
                .cmp(&b.matches('/').count())
                .then(b.cmp(a))
        })
        .map(|c| (*c).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counts() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        assert_eq!(parse_oom_kills(v2), Some(2));
        assert_eq!(parse_oom_kills("oom 1\n"), None);
    }

    #[test]
    fn the_kill_is_attributed_to_the_deepest_cgroup_that_counted_it() {
        let map = |v: &[(&str, u64)]| -> HashMap<String, u64> {
            v.iter().map(|&(p, n)| (p.to_owned(), n)).collect()
        };
        let before = map(&[
            ("/", 4),
            ("/kubepods", 4),
            ("/kubepods/pod1", 1),
            ("/system.slice", 0),
        ]);
        // v2: counts are hierarchical; a new container cgroup appeared and was hit.
        let now = map(&[
            ("/", 5),
            ("/kubepods", 5),
            ("/kubepods/pod1", 2),
            ("/kubepods/pod1/ctr", 1),
            ("/system.slice", 0),
        ]);
        assert_eq!(
            pick_changed(&before, &now, None).as_deref(),
            Some("/kubepods/pod1/ctr")
        );
        // Two kills at once in different places: the victim's own cgroup decides.
        let now = map(&[
            ("/", 6),
            ("/kubepods", 5),
            ("/kubepods/pod1", 2),
            ("/system.slice", 1),
        ]);
        assert_eq!(
            pick_changed(&before, &now, Some("/system.slice")).as_deref(),
            Some("/system.slice")
        );
        assert_eq!(
            pick_changed(&before, &now, Some("/kubepods/pod1/ctr")).as_deref(),
            Some("/kubepods/pod1")
        );
        // An exiting task reads back as the root: no better than no hint.
        assert_eq!(
            pick_changed(&before, &now, Some("/")).as_deref(),
            Some("/kubepods/pod1")
        );
        assert_eq!(pick_changed(&before, &before, None), None);
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/"), None);
    }

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
            // podman with systemd, v2: the process sits in the scope's `container` leaf
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                Some(ID),
            ),
            // a bare id under a parent no runtime is known by: the id, runtime unknown
            (format!("/my-services/{ID}"), Some(ID)),
            // a runtime's monitor is not in the container
            (format!("/system.slice/crio-conmon-{ID}.scope"), None),
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
    fn runtimes_in_real_cgroup_paths() {
        use Runtime::*;
        let pod = "pod0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c";
        let pod_ = "pod0f2b6a7e_3d6c_4b1a_9c5e_2a7f8d9e0b1c";
        let cases = [
            // Docker: cgroupfs (v1 and v2 alike), systemd, rootless, nested in Docker
            (format!("/docker/{ID}"), Some(Docker)),
            (format!("/system.slice/docker-{ID}.scope"), Some(Docker)),
            (
                format!("/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope"),
                Some(Docker),
            ),
            (
                format!("/docker/{}/docker/{ID}", "a".repeat(64)),
                Some(Docker),
            ),
            // Kubernetes with cri-dockerd's systemd driver names the runtime
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{pod_}.slice/docker-{ID}.scope"
                ),
                Some(Docker),
            ),
            // containerd: the kubelet's systemd driver (v2, and v1's every hierarchy)
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{pod_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(Containerd),
            ),
            // the kubelet's cgroupfs driver: a bare id, taken as containerd (dockershim
            // wrote the same path)
            (format!("/kubepods/besteffort/{pod}/{ID}"), Some(Containerd)),
            (format!("/kubepods/{pod}/{ID}"), Some(Containerd)),
            (
                format!("/system.slice/nerdctl-{ID}.scope"),
                Some(Containerd),
            ),
            // CRI-O: systemd (its scope, or the scope's `container` leaf) and cgroupfs
            (
                format!("/kubepods.slice/kubepods-{pod_}.slice/crio-{ID}.scope"),
                Some(CriO),
            ),
            (
                format!("/kubepods.slice/kubepods-{pod_}.slice/crio-{ID}.scope/container"),
                Some(CriO),
            ),
            (format!("/kubepods/burstable/{pod}/crio-{ID}"), Some(CriO)),
            // podman: cgroupfs (as on this project's test machines, v1), systemd (rootful,
            // rootless, with the `container` leaf of --cgroupns), split cgroups, pods
            (format!("/libpod_parent/libpod-{ID}"), Some(Podman)),
            (format!("/machine.slice/libpod-{ID}.scope"), Some(Podman)),
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                Some(Podman),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
                ),
                Some(Podman),
            ),
            (
                format!("/system.slice/app.service/libpod-payload-{ID}"),
                Some(Podman),
            ),
            (
                format!(
                    "/machine.slice/machine-libpod_pod_{}.slice/libpod-{ID}.scope",
                    "b".repeat(64)
                ),
                Some(Podman),
            ),
            // monitors: next to the container, not in it
            (format!("/system.slice/crio-conmon-{ID}.scope"), None),
            (
                format!("/kubepods.slice/kubepods-{pod_}.slice/crio-conmon-{ID}.scope"),
                None,
            ),
            (format!("/kubepods/burstable/{pod}/crio-conmon-{ID}"), None),
            (format!("/machine.slice/libpod-conmon-{ID}.scope"), None),
            ("/libpod_parent/conmon".to_owned(), None),
            // no container, or none a runtime can be named for
            (
                "/user.slice/user-1000.slice/session-2.scope".to_owned(),
                None,
            ),
            ("/system.slice/docker.service".to_owned(), None),
            ("/kubepods.slice/kubepods-besteffort.slice".to_owned(), None),
            (format!("/my-services/{ID}"), None),
            (format!("/system.slice/docker-{}.scope", &ID[..63]), None),
            (format!("/docker/{}", ID.to_uppercase()), None),
            ("/".to_owned(), None),
            (String::new(), None),
        ];
        for (path, want) in cases {
            let got = container(&path);
            assert_eq!(got.as_ref().map(|(_, r)| *r), want, "{path}");
            if let Some((id, _)) = got {
                assert_eq!(id, ID, "{path}");
            }
        }
        let names: Vec<&str> = [Docker, Containerd, CriO, Podman]
            .into_iter()
            .map(Runtime::name)
            .collect();
        assert_eq!(names, ["docker", "containerd", "cri-o", "podman"]);
    }

    /// Every shape the kubelet gives a pod's containers: its two cgroup drivers, each
    /// runtime, each QoS class, static pods, and what sits in a pod's cgroup without being
    /// one of its containers.
    #[test]
    fn pods_and_containers_in_kubelet_cgroup_paths() {
        use Runtime::*;
        const UID: &str = "0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c";
        const STATIC: &str = "5d3b8e6c0a9f4e1b8c7d2a6f3e9b0c14";
        let pod = format!("pod{UID}");
        let pod_ = format!("pod{}", UID.replace('-', "_"));
        let cases: Vec<(String, Option<&str>, Option<Runtime>)> = vec![
            // systemd driver: containerd (v2, and every v1 hierarchy alike), per QoS class
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{pod_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(UID),
                Some(Containerd),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{pod_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(UID),
                Some(Containerd),
            ),
            // guaranteed pods sit right under kubepods.slice
            (
                format!("/kubepods.slice/kubepods-{pod_}.slice/cri-containerd-{ID}.scope"),
                Some(UID),
                Some(Containerd),
            ),
            // systemd driver: CRI-O, its scope or the scope's `container` leaf
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{pod_}.slice/crio-{ID}.scope"
                ),
                Some(UID),
                Some(CriO),
            ),
            (
                format!("/kubepods.slice/kubepods-{pod_}.slice/crio-{ID}.scope/container"),
                Some(UID),
                Some(CriO),
            ),
            // systemd driver: Docker through cri-dockerd
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{pod_}.slice/docker-{ID}.scope"
                ),
                Some(UID),
                Some(Docker),
            ),
            // cgroupfs driver: containerd (and dockershim/cri-dockerd: the same bare id)
            (
                format!("/kubepods/burstable/{pod}/{ID}"),
                Some(UID),
                Some(Containerd),
            ),
            (
                format!("/kubepods/besteffort/{pod}/{ID}"),
                Some(UID),
                Some(Containerd),
            ),
            (format!("/kubepods/{pod}/{ID}"), Some(UID), Some(Containerd)),
            // cgroupfs driver: CRI-O
            (
                format!("/kubepods/burstable/{pod}/crio-{ID}"),
                Some(UID),
                Some(CriO),
            ),
            // a kubelet with --cgroup-root: the same below it
            (
                format!("/kubelet/kubepods/burstable/{pod}/{ID}"),
                Some(UID),
                Some(Containerd),
            ),
            // podman under a kubelet-shaped --cgroup-parent, as the tests run it here
            (
                format!("/kubepods/burstable/{pod}/libpod-{ID}"),
                Some(UID),
                Some(Podman),
            ),
            // static pods: the uid is a hash, 32 hex digits, both drivers
            (
                format!("/kubepods/burstable/pod{STATIC}/{ID}"),
                Some(STATIC),
                Some(Containerd),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/cri-containerd-{ID}.scope"
                ),
                Some(STATIC),
                Some(Containerd),
            ),
            // in a pod's cgroup but in none of its containers: a monitor, podman's conmon, the
            // pod cgroup itself
            (
                format!("/kubepods/burstable/{pod}/crio-conmon-{ID}"),
                Some(UID),
                None,
            ),
            (format!("/kubepods/burstable/{pod}/conmon"), Some(UID), None),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{pod_}.slice"),
                Some(UID),
                None,
            ),
            // not pods: a QoS slice, podman's own pods, services named like pods
            (
                "/kubepods.slice/kubepods-besteffort.slice".to_owned(),
                None,
                None,
            ),
            ("/kubepods/burstable".to_owned(), None, None),
            (
                format!(
                    "/machine.slice/machine-libpod_pod_{}.slice/libpod-{ID}.scope",
                    "b".repeat(64)
                ),
                None,
                Some(Podman),
            ),
            ("/system.slice/podman.service".to_owned(), None, None),
            ("/system.slice/ipod-sync.service".to_owned(), None, None),
            // almost a uid: a group too short, a dash where systemd writes `_`, not hex
            (
                format!("/kubepods/burstable/pod{}/{ID}", &UID[..35]),
                None,
                Some(Containerd),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{}.slice", &UID[..8]),
                None,
                None,
            ),
            (
                format!("/kubepods/pod{}/{ID}", UID.replace('0', "g")),
                None,
                Some(Containerd),
            ),
        ];
        for (path, uid, runtime) in cases {
            assert_eq!(pod_uid(&path).as_deref(), uid, "{path}");
            let got = container(&path);
            assert_eq!(got.as_ref().map(|(_, r)| *r), runtime, "{path}");
            if let Some((id, _)) = got {
                assert_eq!(id, ID, "{path}");
            }
        }
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
