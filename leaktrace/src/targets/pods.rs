//! Pod identity without the Kubernetes API: the namespace, pod name and container name of a
//! pod uid and container id (both read from a process's cgroup path, see
//! [`cgroup::pod_uid`](super::cgroup::pod_uid) and
//! [`cgroup::container_id`](super::cgroup::container_id)), from the directories the kubelet
//! keeps for container logs on every node:
//!
//! - `/var/log/pods/<namespace>_<pod>_<uid>/<container>/<restarts>.log`: a pod uid gives its
//!   namespace and name, and the names of its containers (one directory each, init
//!   containers included; the sandbox (`pause`) has none);
//! - `/var/log/containers/<pod>_<namespace>_<container>-<id>.log`, a symbolic link into the
//!   above: a container id gives its container's name.
//!
//! Namespaces, pod names and container names are DNS labels or subdomains: no `_`, so the
//! `_`-separated names split without ambiguity. When a container id is not among the links
//! (the directory is not mounted, or the link is not made yet), a pod with exactly one
//! container directory names it, unless the links show other containers of that pod.
//!
//! [`PodIndex`] keeps the answer to every name in memory, bounded, and reads the directories
//! again only when asked about something it does not know and its last read is a few seconds
//! old (and at the latest every minute): never once per event, nor per row.
use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use hashbrown::HashMap;

/// Where the kubelet keeps pod logs unless told otherwise.
pub const DEFAULT_POD_LOGS: &str = "/var/log/pods";

/// A process's pod, as the node's log directories name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodName {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container's name in the pod spec, when known.
    pub container: Option<String>,
}

/// `<namespace>_<pod>_<uid>`, a pod's log directory: (namespace, pod, uid).
pub fn parse_pod_dir(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.split('_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = parts.next().is_none()
        && !namespace.is_empty()
        && !pod.is_empty()
        && !uid.is_empty()
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then_some((namespace, pod, uid))
}

/// A container's log link, `<pod>_<namespace>_<container>-<id>.log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContainerLog<'a> {
    /// The pod's name.
    pub pod: &'a str,
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The container's name.
    pub container: &'a str,
    /// The container's id (64 hex digits).
    pub id: &'a str,
}

/// Reads a container log link's name (see [`ContainerLog`]).
pub fn parse_container_log(name: &str) -> Option<ContainerLog<'_>> {
    let stem = name.strip_suffix(".log")?;
    // The id is the last 64 characters, after a `-` (container names have dashes too).
    let (rest, id) = stem.rsplit_once('-')?;
    if id.len() != 64 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut parts = rest.split('_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    let ok =
        parts.next().is_none() && !pod.is_empty() && !namespace.is_empty() && !container.is_empty();
    ok.then_some(ContainerLog {
        pod,
        namespace,
        container,
        id,
    })
}

/// Pods an index keeps at most (a node runs 110 by default; 250 is a common maximum).
pub const MAX_PODS: usize = 4096;
/// Containers (log links) an index keeps at most.
pub const MAX_CONTAINERS: usize = 16384;
/// Container names kept per pod.
const MAX_NAMES_PER_POD: usize = 64;
/// A lookup of something unknown reads the directories again at most this often.
pub const MISS_REFRESH: Duration = Duration::from_secs(5);
/// The directories are read again at least this often when asked at all (a pod's second
/// container may have appeared since).
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// A pod as its log directory tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pod {
    namespace: String,
    pod: String,
    /// Its containers' directories, sorted.
    containers: Vec<String>,
}

/// A container as its log link tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Container {
    namespace: String,
    pod: String,
    container: String,
}

/// What one read of the directories found.
#[derive(Debug, Default)]
struct Scan {
    /// By pod uid.
    pods: HashMap<String, Pod>,
    /// By container id.
    containers: HashMap<String, Container>,
    /// How many containers of each `(namespace, pod)` have a link.
    linked: HashMap<(String, String), usize>,
    /// Entries past the caps, left out.
    left_out: usize,
}

/// The names of the pods and containers on this node, from the kubelet's log directories,
/// read again only when needed (see the module's documentation).
#[derive(Debug)]
pub struct PodIndex {
    pods_dir: PathBuf,
    containers_dir: PathBuf,
    scan: Scan,
    scanned: Option<Instant>,
    /// Times the directories were read.
    scans: u64,
    /// Said once that entries were left out.
    told_full: bool,
}

impl PodIndex {
    /// An index of `pods_dir` (`/var/log/pods`) and of its sibling `containers`
    /// (`/var/log/containers`); nothing is read until the first lookup. `explicit`: the user
    /// named the directory, so its absence is worth a warning (one line, now); the default's
    /// absence (a node without Kubernetes) is not.
    pub fn new(pods_dir: impl Into<PathBuf>, explicit: bool) -> Self {
        let pods_dir = pods_dir.into();
        let containers_dir = pods_dir
            .parent()
            .map_or_else(|| PathBuf::from("containers"), |p| p.join("containers"));
        if explicit && let Err(e) = fs::read_dir(&pods_dir) {
            tracing::warn!(
                "--pod-logs {}: {e}; pods are known by their uid only until it can be read",
                pods_dir.display()
            );
        }
        Self {
            pods_dir,
            containers_dir,
            scan: Scan::default(),
            scanned: None,
            scans: 0,
            told_full: false,
        }
    }

    /// Times the directories were read so far.
    pub fn scans(&self) -> u64 {
        self.scans
    }

    /// The pod of `pod_uid` and, when `container_id` can be named, its container; reads the
    /// directories again first when the answer is incomplete and the last read is older
    /// than [`MISS_REFRESH`], or when it is older than [`MAX_AGE`].
    pub fn lookup(&mut self, pod_uid: &str, container_id: Option<&str>) -> Option<PodName> {
        self.lookup_at(Instant::now(), pod_uid, container_id)
    }

    /// [`lookup`](Self::lookup) at `now`.
    pub fn lookup_at(
        &mut self,
        now: Instant,
        pod_uid: &str,
        container_id: Option<&str>,
    ) -> Option<PodName> {
        let age = self.scanned.map(|at| now.saturating_duration_since(at));
        if age.is_none_or(|a| a >= MAX_AGE) {
            self.refresh(now);
            return self.answer(pod_uid, container_id);
        }
        let answer = self.answer(pod_uid, container_id);
        let complete = answer
            .as_ref()
            .is_some_and(|a| container_id.is_none() || a.container.is_some());
        if !complete && age.is_some_and(|a| a >= MISS_REFRESH) {
            self.refresh(now);
            return self.answer(pod_uid, container_id);
        }
        answer
    }

    /// What the last read says.
    fn answer(&self, pod_uid: &str, container_id: Option<&str>) -> Option<PodName> {
        let pod = self.scan.pods.get(pod_uid);
        // A link of another pod than the uid's (a stale read) names nothing here.
        let linked = container_id
            .and_then(|id| self.scan.containers.get(id))
            .filter(|c| pod.is_none_or(|p| p.namespace == c.namespace && p.pod == c.pod));
        match (pod, linked) {
            // The link names the container; the pod's directory, if read, its pod.
            (_, Some(c)) => Some(PodName {
                namespace: pod.map_or(&c.namespace, |p| &p.namespace).clone(),
                pod: pod.map_or(&c.pod, |p| &p.pod).clone(),
                container: Some(c.container.clone()),
            }),
            (Some(p), None) => {
                // One container directory is that container, unless links show the pod has
                // others with ids (then this one is not among them: a sandbox, an exited
                // container's successor not linked yet).
                let others = self
                    .scan
                    .linked
                    .contains_key(&(p.namespace.clone(), p.pod.clone()));
                let only = match p.containers.as_slice() {
                    [one] if container_id.is_some() && !others => Some(one.clone()),
                    _ => None,
                };
                Some(PodName {
                    namespace: p.namespace.clone(),
                    pod: p.pod.clone(),
                    container: only,
                })
            }
            (None, None) => None,
        }
    }

    /// Reads both directories again, replacing what was known.
    fn refresh(&mut self, now: Instant) {
        self.scanned = Some(now);
        self.scans += 1;
        let mut scan = Scan::default();
        if let Err(e) = read_pods(&self.pods_dir, &mut scan) {
            tracing::debug!("pod logs {}: {e}", self.pods_dir.display());
        }
        if let Err(e) = read_links(&self.containers_dir, &mut scan) {
            tracing::debug!("container logs {}: {e}", self.containers_dir.display());
        }
        if scan.left_out > 0 && !self.told_full {
            self.told_full = true;
            tracing::warn!(
                "pod logs: more than {MAX_PODS} pods or {MAX_CONTAINERS} containers; {} left \
                 unnamed",
                scan.left_out
            );
        }
        self.scan = scan;
    }
}

/// Reads `<dir>/<namespace>_<pod>_<uid>/<container>/`.
fn read_pods(dir: &Path, scan: &mut Scan) -> io::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let Some((namespace, pod, uid)) = name.to_str().and_then(parse_pod_dir) else {
            continue;
        };
        if scan.pods.len() >= MAX_PODS {
            scan.left_out += 1;
            continue;
        }
        let mut containers: Vec<String> = fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .take(MAX_NAMES_PER_POD)
            .collect();
        containers.sort_unstable();
        scan.pods.insert(
            uid.to_ascii_lowercase(),
            Pod {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                containers,
            },
        );
    }
    Ok(())
}

/// Reads the names of `<dir>/<pod>_<namespace>_<container>-<id>.log` (the links are not
/// followed: their names say it all).
fn read_links(dir: &Path, scan: &mut Scan) -> io::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let Some(log) = name.to_str().and_then(parse_container_log) else {
            continue;
        };
        if scan.containers.len() >= MAX_CONTAINERS {
            scan.left_out += 1;
            continue;
        }
        let key = (log.namespace.to_owned(), log.pod.to_owned());
        *scan.linked.entry(key).or_default() += 1;
        scan.containers.insert(
            log.id.to_owned(),
            Container {
                namespace: log.namespace.to_owned(),
                pod: log.pod.to_owned(),
                container: log.container.to_owned(),
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f2b6a7e-3d6c-4b1a-9c5e-2a7f8d9e0b1c";
    const UID2: &str = "6c1a9d2e-8b7f-4e3a-a5c4-1d0e9f8b7a6c";
    const API: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
    const SIDECAR: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";

    #[test]
    fn kubelet_log_names() {
        assert_eq!(
            parse_pod_dir(&format!("payments_api-7f9c6d5b4-x2x9q_{UID}")),
            Some(("payments", "api-7f9c6d5b4-x2x9q", UID))
        );
        assert_eq!(
            parse_pod_dir("kube-system_etcd-node-1_5d3b8e6c0a9f4e1b8c7d2a6f3e9b0c14"),
            Some((
                "kube-system",
                "etcd-node-1",
                "5d3b8e6c0a9f4e1b8c7d2a6f3e9b0c14"
            ))
        );
        for bad in [
            "payments_api",
            "payments_api_x_y",
            "_api_0f2b",
            "payments__0f2b",
            "payments_api_not-a-uid",
            "lost+found",
        ] {
            assert_eq!(parse_pod_dir(bad), None, "{bad}");
        }
        assert_eq!(
            parse_container_log(&format!(
                "api-7f9c6d5b4-x2x9q_payments_istio-proxy-{API}.log"
            )),
            Some(ContainerLog {
                pod: "api-7f9c6d5b4-x2x9q",
                namespace: "payments",
                container: "istio-proxy",
                id: API,
            })
        );
        for bad in [
            format!("api_payments_api-{API}"),
            format!("api_payments_api-{}.log", &API[1..]),
            format!("api_payments_api-{}.log", API.to_uppercase()),
            format!("api_payments-{API}.log"),
            format!("api_payments_x_api-{API}.log"),
            format!("api_payments_-{API}.log"),
        ] {
            assert_eq!(parse_container_log(&bad), None, "{bad}");
        }
    }

    /// A kubelet-shaped log tree under a fresh temp dir: `pods/` and `containers/`.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("leaktrace-pods-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("pods")).unwrap();
            fs::create_dir_all(dir.join("containers")).unwrap();
            Self(dir)
        }

        fn pods(&self) -> PathBuf {
            self.0.join("pods")
        }

        fn container(&self, ns: &str, pod: &str, uid: &str, name: &str) {
            let d = self.pods().join(format!("{ns}_{pod}_{uid}")).join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("0.log"), "").unwrap();
        }

        fn link(&self, ns: &str, pod: &str, uid: &str, name: &str, id: &str) {
            std::os::unix::fs::symlink(
                self.pods().join(format!("{ns}_{pod}_{uid}/{name}/0.log")),
                self.0
                    .join(format!("containers/{pod}_{ns}_{name}-{id}.log")),
            )
            .unwrap();
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn name(ns: &str, pod: &str, container: Option<&str>) -> Option<PodName> {
        Some(PodName {
            namespace: ns.into(),
            pod: pod.into(),
            container: container.map(str::to_owned),
        })
    }

    #[test]
    fn pods_and_containers_are_named_from_the_log_directories() {
        let t = Tree::new("named");
        // One container, no links: its directory names it.
        t.container("payments", "api-7f9c", UID, "api");
        // Two containers, linked: the link names each.
        t.container("shop", "cart-0", UID2, "cart");
        t.container("shop", "cart-0", UID2, "istio-proxy");
        t.link("shop", "cart-0", UID2, "cart", API);
        t.link("shop", "cart-0", UID2, "istio-proxy", SIDECAR);
        let mut index = PodIndex::new(t.pods(), true);
        let now = Instant::now();
        let only = "ab".repeat(32);
        assert_eq!(
            index.lookup_at(now, UID, Some(&only)),
            name("payments", "api-7f9c", Some("api"))
        );
        // A link of another pod than the uid's names no container of it.
        assert_eq!(
            index.lookup_at(now, UID, Some(API)),
            name("payments", "api-7f9c", Some("api"))
        );
        assert_eq!(
            index.lookup_at(now, UID2, Some(API)),
            name("shop", "cart-0", Some("cart"))
        );
        assert_eq!(
            index.lookup_at(now, UID2, Some(SIDECAR)),
            name("shop", "cart-0", Some("istio-proxy"))
        );
        // Not a container of the pod (its sandbox): the pod, no container name, even with
        // one container directory when links name the pod's containers.
        let sandbox = "e".repeat(64);
        assert_eq!(
            index.lookup_at(now, UID2, Some(&sandbox)),
            name("shop", "cart-0", None)
        );
        // In the pod's cgroup but no container: the pod alone.
        assert_eq!(
            index.lookup_at(now, UID, None),
            name("payments", "api-7f9c", None)
        );
        assert_eq!(
            index.lookup_at(now, "11111111-2222-3333-4444-555555555555", Some(API)),
            name("shop", "cart-0", Some("cart")),
            "a link names its pod even before the pod's directory is read"
        );
        assert_eq!(
            index.lookup_at(now, "11111111-2222-3333-4444-555555555555", None),
            None
        );
        assert_eq!(index.scans(), 1, "every answer came from one read");
    }

    #[test]
    fn a_miss_reads_again_but_not_more_than_every_few_seconds() {
        let t = Tree::new("refresh");
        let mut index = PodIndex::new(t.pods(), true);
        let t0 = Instant::now();
        assert_eq!(index.lookup_at(t0, UID, Some(API)), None);
        assert_eq!(index.scans(), 1);
        // The pod appears; misses within MISS_REFRESH do not read again.
        t.container("payments", "api-7f9c", UID, "api");
        for ms in [0, 100, 4_900] {
            let at = t0 + Duration::from_millis(ms);
            assert_eq!(index.lookup_at(at, UID, Some(API)), None, "{ms} ms");
        }
        assert_eq!(index.scans(), 1);
        let t1 = t0 + MISS_REFRESH;
        assert_eq!(
            index.lookup_at(t1, UID, Some(API)),
            name("payments", "api-7f9c", Some("api"))
        );
        assert_eq!(index.scans(), 2);
        // Hits read nothing until MAX_AGE: a second container's directory is seen then.
        t.container("payments", "api-7f9c", UID, "sidecar");
        let hit = index.lookup_at(t1 + Duration::from_secs(30), UID, Some(API));
        assert_eq!(hit, name("payments", "api-7f9c", Some("api")));
        assert_eq!(index.scans(), 2);
        assert_eq!(
            index.lookup_at(t1 + MAX_AGE, UID, Some(API)),
            name("payments", "api-7f9c", None),
            "two directories and no link: which one is unknown"
        );
        assert_eq!(index.scans(), 3);
        // A pod that is gone is forgotten at the next read.
        fs::remove_dir_all(t.pods().join(format!("payments_api-7f9c_{UID}"))).unwrap();
        assert_eq!(index.lookup_at(t1 + MAX_AGE * 2, UID, Some(API)), None);
    }

    #[test]
    fn a_missing_directory_is_no_pod_and_no_error() {
        let mut index = PodIndex::new("/nonexistent/leaktrace/pods", true);
        assert_eq!(index.lookup(UID, Some(API)), None);
        assert_eq!(index.scans(), 1);
    }

    #[test]
    fn the_index_is_bounded() {
        let t = Tree::new("bounded");
        for i in 0..(MAX_PODS + 3) {
            let dir = t.pods().join(format!("ns_p{i}_{i:032x}"));
            fs::create_dir_all(dir).unwrap();
        }
        let mut index = PodIndex::new(t.pods(), true);
        let _ = index.lookup(UID, None);
        assert_eq!(index.scan.pods.len(), MAX_PODS);
        assert_eq!(index.scan.left_out, 3);
    }
}
