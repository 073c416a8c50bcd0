//! The agent's image run the way `deploy/kubernetes/daemonset.yaml` says: the manifest's pod
//! and container fields are translated into `podman run` flags (host pid namespace,
//! capabilities, read-only root, seccomp, read-only host mounts, limits, environment,
//! command and arguments), so what runs is the manifest and not a copy of it. Leaking
//! workloads run in containers of their own; the agent's `/healthz`, `/metrics`,
//! `/folded` and `/report.json` are read from the host, through the pod's own network
//! namespace as a node's Prometheus reaches a pod IP.
//!
//! The image is the one `cargo xtask image` builds (release binary): `cargo xtask test` builds
//! it first and names it in `LEAKTRACE_TEST_AGENT_IMAGE`; run alone, the test runs `cargo
//! xtask image` itself (cached in target/ like every build).
mod common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::fd::AsRawFd as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{
    Report,
    containers::{self, Container},
    privileged, workspace,
};
use serde_yaml::Value;

/// The node name the downward API would give `spec.nodeName`.
const NODE: &str = "leaktrace-test-node";

/// What the manifest says to run, as podman flags.
#[derive(Debug, Default)]
struct PodmanRun {
    /// Flags before the image.
    flags: Vec<String>,
    /// The image the manifest names.
    image: String,
    /// The container's arguments (after the image; the command is `--entrypoint`).
    args: Vec<String>,
    /// `hostNetwork`.
    host_network: bool,
    /// The liveness probe's path and port.
    health: (String, u16),
    /// `limits.memory` in bytes.
    memory_limit: Option<u64>,
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn bool_of(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

fn list_of<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

fn keys(v: &Value) -> Vec<String> {
    v.as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Fails on a key this translation does not know: a new field in the manifest must be
/// translated (or deliberately ignored) here before the test passes again.
fn only_known(v: &Value, what: &str, known: &[&str]) -> Result<(), String> {
    let unknown: Vec<String> = keys(v)
        .into_iter()
        .filter(|k| !known.contains(&k.as_str()))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}: no podman translation for {unknown:?}; add one to tests/deploy.rs"
        ))
    }
}

/// `256Mi`, `1G`, `1048576` → bytes.
fn memory_bytes(q: &str) -> Result<u64, String> {
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n
                .parse::<u64>()
                .map(|n| n * factor)
                .map_err(|e| format!("memory {q:?}: {e}"));
        }
    }
    q.parse().map_err(|e| format!("memory {q:?}: {e}"))
}

/// `500m`, `1`, `2.5` → CPUs as podman's `--cpus` takes them.
fn cpus(q: &str) -> Result<String, String> {
    if let Some(milli) = q.strip_suffix('m') {
        let m: u64 = milli.parse().map_err(|e| format!("cpu {q:?}: {e}"))?;
        return Ok(format!("{}.{:03}", m / 1000, m % 1000));
    }
    q.parse::<f64>()
        .map(|c| c.to_string())
        .map_err(|e| format!("cpu {q:?}: {e}"))
}

/// The pod template of the manifest, translated into `podman run` flags. `create_dirs`
/// stands for the kubelet making `DirectoryOrCreate` host paths.
fn translate(manifest: &str, create_dirs: bool) -> Result<PodmanRun, String> {
    let doc: Value = serde_yaml::from_str(manifest).map_err(|e| e.to_string())?;
    if str_of(&doc, "kind") != Some("DaemonSet") {
        return Err("not a DaemonSet".into());
    }
    let pod = doc
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("spec"))
        .ok_or("no spec.template.spec")?;
    only_known(
        pod,
        "pod spec",
        &[
            "hostPID",
            "hostNetwork",
            "hostIPC",
            "automountServiceAccountToken",
            "enableServiceLinks",
            "tolerations",
            "terminationGracePeriodSeconds",
            "containers",
            "volumes",
            "nodeSelector",
            "priorityClassName",
        ],
    )?;
    let mut run = PodmanRun::default();
    if bool_of(pod, "hostPID") == Some(true) {
        run.flags.extend(["--pid".into(), "host".into()]);
    }
    if bool_of(pod, "hostIPC") == Some(true) {
        run.flags.extend(["--ipc".into(), "host".into()]);
    }
    run.host_network = bool_of(pod, "hostNetwork") == Some(true);
    // A pod's own network namespace stands in for the pod network: `none` gives the
    // container its own namespace with loopback only.
    run.flags.extend([
        "--network".into(),
        if run.host_network { "host" } else { "none" }.into(),
    ]);
    if bool_of(pod, "automountServiceAccountToken") != Some(false) {
        return Err(
            "the agent needs no ServiceAccount token: set automountServiceAccountToken: false"
                .into(),
        );
    }
    let containers = list_of(pod, "containers");
    let [c] = containers else {
        return Err(format!(
            "one container expected, found {}",
            containers.len()
        ));
    };
    only_known(
        c,
        "container",
        &[
            "name",
            "image",
            "imagePullPolicy",
            "command",
            "args",
            "env",
            "ports",
            "resources",
            "livenessProbe",
            "readinessProbe",
            "securityContext",
            "volumeMounts",
        ],
    )?;
    run.image = str_of(c, "image").ok_or("no image")?.to_owned();
    let strings = |key: &str| -> Result<Vec<String>, String> {
        list_of(c, key)
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or(format!("{key}: not a string: {v:?}"))
            })
            .collect()
    };
    let command = strings("command")?;
    if !command.is_empty() {
        run.flags.push("--entrypoint".into());
        run.flags.push(serde_json::to_string(&command).unwrap());
    }
    run.args = strings("args")?;
    for env in list_of(c, "env") {
        let name = str_of(env, "name").ok_or("env without a name")?;
        let value = if let Some(v) = str_of(env, "value") {
            v.to_owned()
        } else {
            let field = env
                .get("valueFrom")
                .and_then(|v| v.get("fieldRef"))
                .and_then(|f| str_of(f, "fieldPath"));
            match field {
                Some("spec.nodeName") => NODE.to_owned(),
                other => return Err(format!("env {name}: no translation for {other:?}")),
            }
        };
        run.flags.push("--env".into());
        run.flags.push(format!("{name}={value}"));
    }
    let mut ports = BTreeMap::new();
    for p in list_of(c, "ports") {
        let port = p
            .get("containerPort")
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
            .ok_or("a port without containerPort")?;
        if let Some(name) = str_of(p, "name") {
            ports.insert(name.to_owned(), port);
        }
    }
    if let Some(limits) = c.get("resources").and_then(|r| r.get("limits")) {
        only_known(limits, "limits", &["memory", "cpu"])?;
        if let Some(m) = str_of(limits, "memory") {
            let bytes = memory_bytes(m)?;
            run.memory_limit = Some(bytes);
            run.flags.push(format!("--memory={bytes}"));
        }
        if let Some(cpu) = str_of(limits, "cpu") {
            run.flags.push(format!("--cpus={}", cpus(cpu)?));
        }
    }
    let probe = c
        .get("livenessProbe")
        .and_then(|p| p.get("httpGet"))
        .ok_or("no livenessProbe.httpGet")?;
    let port = match probe.get("port") {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(Value::String(name)) => ports.get(name).copied(),
        _ => None,
    }
    .ok_or("livenessProbe: no port")?;
    run.health = (str_of(probe, "path").unwrap_or("/").to_owned(), port);

    let sc = c.get("securityContext").ok_or("no securityContext")?;
    only_known(
        sc,
        "securityContext",
        &[
            "privileged",
            "allowPrivilegeEscalation",
            "readOnlyRootFilesystem",
            "runAsUser",
            "runAsGroup",
            "runAsNonRoot",
            "capabilities",
            "seccompProfile",
        ],
    )?;
    if bool_of(sc, "privileged") == Some(true) {
        run.flags.push("--privileged".into());
    }
    if bool_of(sc, "allowPrivilegeEscalation") == Some(false) {
        run.flags
            .extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    if bool_of(sc, "readOnlyRootFilesystem") == Some(true) {
        // Kubernetes adds no tmpfs of its own; podman would, unless told not to.
        run.flags
            .extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    let uid = sc.get("runAsUser").and_then(Value::as_u64);
    let gid = sc.get("runAsGroup").and_then(Value::as_u64);
    if let Some(uid) = uid {
        run.flags.push("--user".into());
        run.flags.push(match gid {
            Some(g) => format!("{uid}:{g}"),
            None => uid.to_string(),
        });
    }
    if let Some(caps) = sc.get("capabilities") {
        only_known(caps, "capabilities", &["add", "drop"])?;
        for (key, flag) in [("drop", "--cap-drop"), ("add", "--cap-add")] {
            for cap in list_of(caps, key) {
                let cap = cap.as_str().ok_or("a capability is not a string")?;
                run.flags.push(flag.into());
                run.flags.push(cap.to_lowercase());
            }
        }
    }
    if let Some(profile) = sc.get("seccompProfile") {
        match str_of(profile, "type") {
            Some("Unconfined") => run
                .flags
                .extend(["--security-opt".into(), "seccomp=unconfined".into()]),
            // podman's default profile stands in for the runtime's.
            Some("RuntimeDefault") => {}
            other => return Err(format!("seccompProfile {other:?}: no translation")),
        }
    }

    let mut host_paths = BTreeMap::new();
    for v in list_of(pod, "volumes") {
        let name = str_of(v, "name").ok_or("a volume without a name")?;
        only_known(v, "volume", &["name", "hostPath"])?;
        let hp = v
            .get("hostPath")
            .ok_or(format!("volume {name}: only hostPath volumes translate"))?;
        let path = str_of(hp, "path").ok_or("hostPath without a path")?;
        match str_of(hp, "type") {
            Some("DirectoryOrCreate") if create_dirs => {
                std::fs::create_dir_all(path).map_err(|e| format!("{path}: {e}"))?;
            }
            Some("Directory") if create_dirs && !Path::new(path).is_dir() => {
                return Err(format!("hostPath {path} is not a directory on this node"));
            }
            _ => {}
        }
        host_paths.insert(name.to_owned(), path.to_owned());
    }
    for m in list_of(c, "volumeMounts") {
        only_known(m, "volumeMount", &["name", "mountPath", "readOnly"])?;
        let name = str_of(m, "name").ok_or("a mount without a name")?;
        let host = host_paths
            .get(name)
            .ok_or(format!("mount {name}: no such volume"))?;
        let at = str_of(m, "mountPath").ok_or("a mount without mountPath")?;
        let ro = bool_of(m, "readOnly") == Some(true);
        run.flags.push("--volume".into());
        run.flags
            .push(format!("{host}:{at}:{}", if ro { "ro" } else { "rw" }));
    }
    Ok(run)
}

fn manifest() -> String {
    std::fs::read_to_string(workspace().join("deploy/kubernetes/daemonset.yaml")).unwrap()
}

/// The agent image: `LEAKTRACE_TEST_AGENT_IMAGE` (set by `cargo xtask test`), else built now
/// with `cargo xtask image`.
fn agent_image() -> String {
    if let Ok(image) = std::env::var("LEAKTRACE_TEST_AGENT_IMAGE")
        && !image.is_empty()
    {
        return image;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args(["run", "--quiet", "--package", "xtask", "--", "image"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo xtask image failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("cargo xtask image names the image")
        .trim()
        .to_owned()
}

/// `GET path` on `port`, from inside the network namespace of `pid` (the pod's), or the
/// host's when `pid` is `None`: (status, body), or `None` when nothing answers. The
/// namespace is entered by a thread of its own, which ends with it.
fn get_in(pid: Option<u32>, port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let path = path.to_owned();
    std::thread::spawn(move || {
        if let Some(pid) = pid {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
            // SAFETY: setns on a descriptor we own; it changes this thread's network
            // namespace only, and this thread ends after the request.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
        }
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).ok()?;
        let split = all.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&all[..split]).into_owned();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, all[split + 4..].to_vec()))
    })
    .join()
    .ok()
    .flatten()
}

/// Polls `f` every 200 ms for up to `limit` until it returns `Some`.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The memory cgroup (v1) charge of a container, in bytes, now and at peak.
fn memory_charge(ctr: &Container) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", ctr.host_pid())).ok()?;
    let lines = leaktrace::targets::cgroup::parse(&text);
    let (path, _) = leaktrace::targets::cgroup::memory_cgroup(&lines)?;
    let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((
        read("memory.usage_in_bytes")?,
        read("memory.max_usage_in_bytes")?,
    ))
}

#[test]
fn the_manifest_translates_to_least_privilege_podman_flags() {
    let run = translate(&manifest(), false).unwrap();
    let flags = run.flags.join(" ");
    for want in [
        "--pid host",
        "--network none",
        "--read-only --read-only-tmpfs=false",
        "--cap-drop all",
        "--cap-add bpf",
        "--cap-add perfmon",
        "--security-opt no-new-privileges",
        "--user 0:0",
        "--env NODE_NAME=leaktrace-test-node",
        "--volume /sys/kernel/tracing:/sys/kernel/tracing:ro",
        "--volume /sys/fs/cgroup:/sys/fs/cgroup:ro",
        "--volume /var/log/pods:/var/log/pods:ro",
        "--entrypoint [\"/usr/bin/leaktrace\"]",
    ] {
        assert!(flags.contains(want), "{want:?} not in {flags}");
    }
    assert!(!flags.contains("--privileged"), "{flags}");
    assert!(!flags.contains("cap-add sys_admin"), "{flags}");
    assert!(!flags.contains(":rw"), "a writable host mount: {flags}");
    assert_eq!(run.health, ("/healthz".to_owned(), 9464));
    assert!(
        run.image.starts_with("localhost/leaktrace:"),
        "{}",
        run.image
    );
    assert_eq!(run.args[0], "agent");
    // A field the translation does not know fails it, rather than being left out.
    let typo = manifest().replace("readOnlyRootFilesystem", "readOnlyRootFileSystem");
    let err = translate(&typo, false).unwrap_err();
    assert!(err.contains("readOnlyRootFileSystem"), "{err}");
    let privileged =
        std::fs::read_to_string(workspace().join("deploy/kubernetes/daemonset-privileged.yaml"))
            .unwrap();
    let run = translate(&privileged, false).unwrap();
    assert!(
        run.flags.iter().any(|f| f == "--privileged"),
        "{:?}",
        run.flags
    );
}

/// The agent in its image, run as the manifest says, finds the leaks of workloads in other
/// containers and serves them: exact heap bytes at the known site in `/metrics`, `/folded`
/// and `/report.json`, each with the container id podman gives.
#[test]
fn the_agent_image_run_as_the_manifest_says_serves_container_leaks() {
    if !(privileged() && containers::available()) {
        return;
    }
    let image = agent_image();
    let mut run = translate(&manifest(), true).unwrap();
    assert_eq!(
        run.image.split_once(':').map(|(repo, _)| repo),
        image.split_once(':').map(|(repo, _)| repo),
        "the manifest names another image than cargo xtask image builds"
    );
    let heap = Container::run("deploy-heap", &["ctr_service", "heap"]);
    let fd = Container::run("deploy-fd", &["ctr_service", "fd"]);
    heap.wait_for_log("ready");
    fd.wait_for_log("ready");
    let short = &heap.id()[..12];
    // What an operator adds to the manifest's args for exact tracing, and a short interval.
    run.args.extend(
        [
            "--full",
            &format!("container={short}"),
            "--interval",
            "500ms",
        ]
        .map(str::to_owned),
    );
    // This machine's runc needs lower rlimits (tests/containers.md); the network comes from
    // the manifest.
    let machine: Vec<String> = containers::RUN_FLAGS
        .chunks(2)
        .filter(|pair| pair[0] != "--network")
        .flatten()
        .map(|s| (*s).to_owned())
        .collect();
    let mut argv = machine;
    argv.extend(run.flags.iter().cloned());
    argv.push(image);
    argv.extend(run.args.iter().cloned());
    eprintln!("podman run {}", argv.join(" "));
    let started = Instant::now();
    let agent = Container::start("deploy-agent", &argv);
    let pid = agent.host_pid();
    let netns = (!run.host_network).then_some(pid);
    let (path, port) = run.health.clone();
    let health = eventually(Duration::from_secs(60), || {
        get_in(netns, port, &path).filter(|(s, _)| *s == 200)
    });
    assert_eq!(
        health,
        Some((200, b"ok".to_vec())),
        "no /healthz; the agent printed:\n{}",
        agent.logs()
    );
    agent.wait_for_log(&format!(
        "pid {} (ctr_service): exact heap tracing on: selected by container={short}",
        heap.host_pid()
    ));
    agent.wait_for_log("agent: watching");
    eprintln!("agent ready in {:?}", started.elapsed());
    // The environment the downward API gives.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|kv| kv == format!("NODE_NAME={NODE}").as_bytes()),
        "NODE_NAME not set"
    );
    heap.signal(libc::SIGUSR1);
    fd.signal(libc::SIGUSR1);
    heap.wait_for_log("leaked 1");
    fd.wait_for_log("leaked 1");

    // /metrics: the heap container's outstanding heap bytes (kind heap: exact tracing, not
    // tier 1's growth), exactly one round's 16 × 256.
    let series = format!("container=\"{short}\"");
    let metrics = eventually(Duration::from_secs(30), || {
        let (status, body) = get_in(netns, port, "/metrics")?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let bytes: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("leaktrace_heap_outstanding_bytes{")
                    && l.contains(&series)
                    && l.contains("kind=\"heap\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (status == 200 && bytes == 4096.0).then_some(text)
    })
    .unwrap_or_else(|| {
        let last = get_in(netns, port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        panic!(
            "/metrics never showed 4096 heap bytes for {short}:\n{}\nagent:\n{}",
            String::from_utf8_lossy(&last),
            agent.logs()
        )
    });
    let fd_short = &fd.id()[..12];
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("leaktrace_open_fds{") && l.contains(fd_short)),
        "no open descriptors of {fd_short}:\n{metrics}"
    );

    // /folded: the leaking stack, weighed in bytes, ending at the leaking function.
    let (status, folded) = get_in(netns, port, &format!("/folded?kind=heap&container={short}"))
        .expect("/folded answers");
    let folded = String::from_utf8_lossy(&folded).into_owned();
    assert_eq!(status, 200, "{folded}");
    let leak: u64 = folded
        .lines()
        .filter(|l| l.contains("ctr_heap_leak"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(leak, 4096, "{folded}");
    assert!(!folded.contains("ctr_heap_churn"), "{folded}");

    // /report.json: the row names the container as podman inspect does.
    let (status, json) = get_in(netns, port, &format!("/report.json?container={short}"))
        .expect("/report.json answers");
    assert_eq!(status, 200);
    let r = Report(serde_json::from_slice(&json).unwrap());
    r.assert_site("ctr_heap_leak", 16, 16 * 256);
    r.assert_absent("ctr_heap_churn");
    let row = r.site("ctr_heap_leak")[0];
    assert_eq!(
        row["container_id"],
        heap.inspect("{{.Id}}"),
        "{}",
        r.pretty()
    );
    assert_eq!(row["exe"], "/fixtures/ctr_service", "{}", r.pretty());
    assert_eq!(row["pid"].as_u64(), Some(u64::from(heap.host_pid())));

    // What the pod costs its node: the memory cgroup charge (RSS and the BPF maps the
    // kernel charges to it) against the manifest's limit.
    if let Some((now, peak)) = memory_charge(&agent) {
        eprintln!(
            "agent memory cgroup: {:.1} MiB now, {:.1} MiB peak, limit {:?} MiB",
            now as f64 / 1048576.0,
            peak as f64 / 1048576.0,
            run.memory_limit.map(|b| b >> 20)
        );
    }
    assert_eq!(
        agent.inspect("{{.State.Running}} {{.State.OOMKilled}}"),
        "true false",
        "{}",
        agent.logs()
    );
}
