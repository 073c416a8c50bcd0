//! The node agent's HTTP endpoints, served from the latest published report.
//!
//! | path | content |
//! |---|---|
//! | `/metrics` | Prometheus text (0.0.4), [`export::metrics`] |
//! | `/debug/pprof/heap` | gzipped pprof, [`export::pprof`]; `?kind=growth`, `?sample_index=inuse_objects` |
//! | `/debug/pprof/growth` | the same as `/debug/pprof/heap?kind=growth` |
//! | `/folded` | folded stacks; `?kind=heap\|fd\|tmp\|growth`, `&weight=bytes\|count` |
//! | `/report.json` | the JSON report |
//! | `/report.html` | the HTML report, [`export::html`]: flame graphs, charts, verdicts |
//! | `/healthz` | `ok` |
//!
//! The report endpoints (not `/healthz`) take filters, all of which a row must pass:
//! `container=` (a container id prefix, or the container's name in its pod), `pod=` and
//! `namespace=` (the Kubernetes pod's name and namespace, exactly). Before the first report
//! they answer 503.
//!
//! The agent loop [`publish`](Publisher::publish)es each report; handlers take the latest
//! with a pointer copy, so the loop never waits on a client. Rendering runs on tokio's
//! blocking pool, off the loop's thread. Bounded: at most
//! [`ServeOptions::max_connections`] connections (more wait in the kernel's backlog), headers
//! within [`ServeOptions::header_timeout`], connections closed after
//! [`ServeOptions::connection_lifetime`], request bodies never read.
//!
//! ```ignore
//! let server = serve::bind(listen)?; // a port in use fails here, before tracing starts
//! let (publisher, snapshots) = serve::channel();
//! tokio::spawn(server.run(snapshots, ServeOptions::default()));
//! // every interval:
//! publisher.publish(Arc::new(report), stats);
//! ```
use std::{
    convert::Infallible,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};

use crate::{
    export::{
        Exporter, FoldedKind, FoldedWeight,
        folded::Folded,
        html::Html,
        json::Json,
        metrics::{AgentStats, MAX_SERIES, Metrics},
        pprof::{Pprof, PprofKind},
    },
    report::{Leak, Owner, Report},
};

/// Where the agent listens unless told otherwise: loopback only, the port the OpenTelemetry
/// Prometheus exporter convention uses.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));

/// What the endpoints serve: the latest report and the agent's figures at that moment.
#[derive(Clone, Debug)]
pub struct Published {
    /// The latest complete report.
    pub report: Arc<Report>,
    /// The agent's own figures.
    pub stats: AgentStats,
}

/// The agent loop's end: replaces what the endpoints serve.
#[derive(Debug)]
pub struct Publisher(watch::Sender<Option<Arc<Published>>>);

impl Publisher {
    /// Serves `report` and `stats` from now on. Never waits (handlers hold the previous
    /// snapshot by their own pointer).
    pub fn publish(&self, report: Arc<Report>, stats: AgentStats) {
        self.0
            .send_replace(Some(Arc::new(Published { report, stats })));
    }
}

/// The handlers' end: the latest snapshot.
#[derive(Clone, Debug)]
pub struct Snapshots(watch::Receiver<Option<Arc<Published>>>);

impl Snapshots {
    /// The latest published snapshot, if any.
    pub fn latest(&self) -> Option<Arc<Published>> {
        self.0.borrow().clone()
    }
}

/// A publisher and the snapshots it feeds; nothing is published yet.
pub fn channel() -> (Publisher, Snapshots) {
    let (tx, rx) = watch::channel(None);
    (Publisher(tx), Snapshots(rx))
}

/// Limits of the server.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Connections served at once.
    pub max_connections: usize,
    /// A client must send its request headers within this.
    pub header_timeout: Duration,
    /// A connection is closed after this long, whatever it is doing.
    pub connection_lifetime: Duration,
    /// Series per metric family on `/metrics` (see [`Metrics::max_series`]).
    pub max_series: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(120),
            max_series: MAX_SERIES,
        }
    }
}

/// Why the server cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another program listens there.
    #[error("address {0} is in use: pass --listen ADDR")]
    InUse(SocketAddr),
    /// Any other reason the address cannot be listened on.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, io::Error),
}

/// A bound listening socket, not serving yet.
#[derive(Debug)]
pub struct Server {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

/// Listens on `addr` (port 0: any free port, see [`Server::local_addr`]).
pub fn bind(addr: SocketAddr) -> Result<Server, ServeError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => ServeError::InUse(addr),
        _ => ServeError::Bind(addr, e),
    })?;
    let local = listener
        .local_addr()
        .and_then(|a| listener.set_nonblocking(true).map(|()| a))
        .map_err(|e| ServeError::Bind(addr, e))?;
    Ok(Server {
        listener,
        addr: local,
    })
}

impl Server {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the task is dropped; needs a tokio runtime with I/O and timers.
    pub async fn run(self, snapshots: Snapshots, options: ServeOptions) -> Result<(), ServeError> {
        let addr = self.addr;
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .map_err(|e| ServeError::Bind(addr, e))?;
        let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(options.header_timeout);
        let http = Arc::new(http);
        loop {
            // The semaphore is never closed.
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return Ok(());
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or memory, or a connection reset before accept:
                    // keep serving, without spinning.
                    tracing::warn!("http: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let snapshots = snapshots.clone();
            let http = Arc::clone(&http);
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |req| {
                    let snapshots = snapshots.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &snapshots, &options).await) }
                });
                let conn = http.serve_connection(TokioIo::new(stream), service);
                // A client gone or too slow is its own problem, not the agent's.
                let _ = tokio::time::timeout(options.connection_lifetime, conn).await;
            });
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body)
}

/// What a request asks for, checked before anything is rendered.
#[derive(Debug)]
enum Endpoint {
    Metrics,
    Pprof(Pprof),
    Folded(Folded, Option<&'static str>),
    Json,
    Html,
}

/// The query's `key=value` pairs (values are ids and words: no percent-decoding).
fn params(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// The endpoint of `path?query`, `Err` with the reason when the query makes no sense.
fn endpoint(path: &str, query: &str) -> Option<Result<Endpoint, String>> {
    let mut bad = None;
    let mut unknown = |k: &str, v: &str| bad = Some(format!("unknown value `{v}` for `{k}`"));
    let e = match path {
        "/metrics" => Endpoint::Metrics,
        "/report.json" => Endpoint::Json,
        "/report.html" => Endpoint::Html,
        "/debug/pprof/heap" | "/debug/pprof/growth" => {
            let mut p = Pprof {
                kind: Some(if path.ends_with("growth") {
                    PprofKind::Growth
                } else {
                    PprofKind::Heap
                }),
                sample_index: None,
            };
            for (k, v) in params(query) {
                match (k, v) {
                    ("kind", "heap") => p.kind = Some(PprofKind::Heap),
                    ("kind", "growth") => p.kind = Some(PprofKind::Growth),
                    ("sample_index", v) => p.sample_index = Some(v.to_owned()),
                    ("kind", v) => unknown(k, v),
                    _ => {}
                }
            }
            if let (Some(kind), Some(want)) = (p.kind, &p.sample_index)
                && !kind.sample_types().iter().any(|(ty, _)| ty == want)
            {
                unknown("sample_index", want);
            }
            Endpoint::Pprof(p)
        }
        "/folded" => {
            let mut f = Folded::default();
            let mut leak_kind = Some("heap");
            for (k, v) in params(query) {
                match (k, v) {
                    ("kind", "heap") => (f.kind, leak_kind) = (FoldedKind::Heap, Some("heap")),
                    ("kind", "growth") => (f.kind, leak_kind) = (FoldedKind::Heap, Some("growth")),
                    ("kind", "fd") => (f.kind, leak_kind) = (FoldedKind::Fd, None),
                    ("kind", "tmp") => (f.kind, leak_kind) = (FoldedKind::Tmp, None),
                    ("weight", "bytes") => f.weight = FoldedWeight::Bytes,
                    ("weight", "count") => f.weight = FoldedWeight::Count,
                    ("kind" | "weight", v) => unknown(k, v),
                    _ => {}
                }
            }
            Endpoint::Folded(f, leak_kind)
        }
        _ => return None,
    };
    Some(match bad {
        Some(reason) => Err(reason),
        None => Ok(e),
    })
}

/// Which rows a request keeps (all when empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Filter {
    /// A container id prefix, or a container's name in its pod.
    container: Option<String>,
    /// A pod's name.
    pod: Option<String>,
    /// A pod's namespace.
    namespace: Option<String>,
}

impl Filter {
    /// The filters of a query (the last of each key wins).
    fn of(query: &str) -> Self {
        let mut f = Self::default();
        for (k, v) in params(query) {
            match k {
                "container" => f.container = Some(v.to_owned()),
                "pod" => f.pod = Some(v.to_owned()),
                "namespace" => f.namespace = Some(v.to_owned()),
                _ => {}
            }
        }
        f
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether a row of this container (id, name) and pod (namespace, name) is kept.
    fn keeps(
        &self,
        id: Option<&str>,
        name: Option<&str>,
        namespace: Option<&str>,
        pod: Option<&str>,
    ) -> bool {
        let container = self
            .container
            .as_deref()
            .is_none_or(|c| id.is_some_and(|id| id.starts_with(c)) || name.is_some_and(|n| n == c));
        let exact = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        container && exact(&self.pod, pod) && exact(&self.namespace, namespace)
    }

    fn keeps_owner(&self, o: &Owner) -> bool {
        self.keeps(
            o.container_id.as_deref(),
            o.container_name.as_deref(),
            o.namespace.as_deref(),
            o.pod.as_deref(),
        )
    }
}

/// The rows of `report` that `filter` keeps. With `heap_kind`, `leaks` holds the heap rows
/// of that kind from both `leaks` and the agent's `growth` (what folded heap output shows),
/// and `growth` is left empty.
fn select(report: &Report, filter: &Filter, heap_kind: Option<&str>) -> Report {
    let keep = |o: &Owner| filter.keeps_owner(o);
    let rows =
        |rows: &[Leak]| -> Vec<Leak> { rows.iter().filter(|l| keep(&l.owner)).cloned().collect() };
    let (leaks, growth) = match heap_kind {
        None => (rows(&report.leaks), rows(&report.growth)),
        Some(kind) => (
            report
                .leaks
                .iter()
                .chain(&report.growth)
                .filter(|l| l.kind == kind && keep(&l.owner))
                .cloned()
                .collect(),
            vec![],
        ),
    };
    Report {
        summary: report.summary.clone(),
        leaks,
        runtime: rows(&report.runtime),
        fd_leaks: report
            .fd_leaks
            .iter()
            .filter(|l| keep(&l.owner))
            .cloned()
            .collect(),
        // These name no container: kept only when nothing is filtered out.
        fd_exhaustion: if filter.is_empty() {
            report.fd_exhaustion.clone()
        } else {
            vec![]
        },
        tmp_leaks: report
            .tmp_leaks
            .iter()
            .filter(|l| keep(&l.owner))
            .cloned()
            .collect(),
        oom_kills: report
            .oom_kills
            .iter()
            .filter(|k| {
                filter.keeps(
                    k.container_id.as_deref(),
                    k.container_name.as_deref(),
                    k.namespace.as_deref(),
                    k.pod.as_deref(),
                )
            })
            .cloned()
            .collect(),
        growth,
        tier2: report
            .tier2
            .iter()
            .filter(|t| keep(&t.owner))
            .cloned()
            .collect(),
        notices: report.notices.clone(),
        build_ids: report.build_ids.clone(),
        is_final: report.is_final,
    }
}

/// Renders `endpoint` from `published` (CPU work: on the blocking pool).
fn render(
    endpoint: &Endpoint,
    published: &Published,
    filter: &Filter,
    max_series: usize,
) -> (&'static str, Vec<u8>) {
    let report = &published.report;
    let filtered;
    let report = match endpoint {
        Endpoint::Folded(_, Some(kind)) => {
            filtered = select(report, filter, Some(kind));
            &filtered
        }
        _ if !filter.is_empty() => {
            filtered = select(report, filter, None);
            &filtered
        }
        _ => report.as_ref(),
    };
    let exporter: &dyn Exporter = match endpoint {
        Endpoint::Metrics => &Metrics {
            stats: published.stats,
            max_series,
        },
        Endpoint::Pprof(p) => p,
        Endpoint::Folded(f, _) => f,
        Endpoint::Json => &Json,
        Endpoint::Html => &Html,
    };
    (exporter.content_type(), exporter.export(report))
}

async fn respond<B>(
    req: &Request<B>,
    snapshots: &Snapshots,
    options: &ServeOptions,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if req.method() != Method::GET {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    if path == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    let query = req.uri().query().unwrap_or("");
    let endpoint = match endpoint(path, query) {
        None => return text(StatusCode::NOT_FOUND, "not found\n"),
        Some(Err(reason)) => {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                format!("{reason}\n"),
            );
        }
        Some(Ok(e)) => e,
    };
    let Some(published) = snapshots.latest() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no report yet\n");
    };
    let filter = Filter::of(query);
    let max_series = options.max_series;
    let rendered =
        tokio::task::spawn_blocking(move || render(&endpoint, &published, &filter, max_series))
            .await;
    match rendered {
        Ok((content_type, body)) => {
            let mut r = reply(StatusCode::OK, content_type, body);
            if path.starts_with("/debug/pprof/") {
                r.headers_mut().insert(
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_static("attachment; filename=\"profile.pb.gz\""),
                );
            }
            r
        }
        Err(e) => {
            tracing::error!("http: rendering {path} failed: {e}");
            text(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };

    use super::*;
    use crate::export::golden::sample;

    /// One request over a real socket: status, content type, body.
    fn get(addr: SocketAddr, method: &str, target: &str) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: leaktrace\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head");
        let head = String::from_utf8(raw[..split].to_vec()).unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_default();
        (status, content_type, raw[split + 4..].to_vec())
    }

    async fn fetch(
        addr: SocketAddr,
        method: &'static str,
        target: &'static str,
    ) -> (u16, String, Vec<u8>) {
        tokio::task::spawn_blocking(move || get(addr, method, target))
            .await
            .unwrap()
    }

    fn gunzip(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// The sample report, its first row in a container, and a growth row as the agent lists
    /// them.
    fn report() -> Report {
        let mut r = sample();
        r.leaks[0].owner.container_id = Some("0123456789abcdef0123".into());
        let mut growth = r.leaks[0].clone();
        growth.kind = "growth";
        growth.outstanding_bytes = 4096;
        growth.frames.remove(0);
        r.growth.push(growth);
        r
    }

    #[tokio::test]
    async fn every_endpoint_over_a_real_socket() {
        let server = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr();
        let (publisher, snapshots) = channel();
        let task = tokio::spawn(server.run(snapshots, ServeOptions::default()));

        assert_eq!(fetch(addr, "GET", "/healthz").await.2, b"ok");
        let (status, _, body) = fetch(addr, "GET", "/metrics").await;
        assert_eq!((status, body.as_slice()), (503, &b"no report yet\n"[..]));

        let stats = AgentStats {
            tracked_processes: Some(3),
            ..AgentStats::default()
        };
        publisher.publish(Arc::new(report()), stats);

        let (status, ct, body) = fetch(addr, "GET", "/healthz").await;
        assert_eq!(
            (status, ct.as_str(), body.as_slice()),
            (200, "text/plain; charset=utf-8", &b"ok"[..])
        );

        let (status, ct, body) = fetch(addr, "GET", "/metrics").await;
        let body = String::from_utf8(body).unwrap();
        assert_eq!(
            (status, ct.as_str()),
            (200, "text/plain; version=0.0.4; charset=utf-8")
        );
        assert!(
            body.contains(
                "leaktrace_heap_outstanding_bytes{container=\"0123456789ab\",comm=\"cache-server\",kind=\"heap\"} 8388608\n"
            ),
            "{body}"
        );
        assert!(body.contains("leaktrace_tracked_processes 3\n"), "{body}");

        let (status, ct, body) = fetch(addr, "GET", "/debug/pprof/heap").await;
        assert_eq!((status, ct.as_str()), (200, "application/octet-stream"));
        let profile =
            <crate::export::pprof::Profile as prost::Message>::decode(gunzip(&body).as_slice())
                .unwrap();
        assert_eq!(profile.sample.len(), 2);
        let (status, _, body) =
            fetch(addr, "GET", "/debug/pprof/heap?sample_index=inuse_objects").await;
        assert_eq!(status, 200);
        let profile =
            <crate::export::pprof::Profile as prost::Message>::decode(gunzip(&body).as_slice())
                .unwrap();
        assert_eq!(
            profile.string_table[profile.default_sample_type as usize],
            "inuse_objects"
        );
        for target in ["/debug/pprof/heap?kind=growth", "/debug/pprof/growth"] {
            let (status, _, body) = fetch(addr, "GET", target).await;
            assert_eq!(status, 200);
            let profile =
                <crate::export::pprof::Profile as prost::Message>::decode(gunzip(&body).as_slice())
                    .unwrap();
            let values: Vec<&[i64]> = profile.sample.iter().map(|x| x.value.as_slice()).collect();
            assert_eq!(values, [&[4096][..]], "{target}");
        }
        assert_eq!(
            fetch(addr, "GET", "/debug/pprof/heap?sample_index=nope")
                .await
                .0,
            400
        );

        let (status, ct, body) = fetch(addr, "GET", "/folded").await;
        assert_eq!((status, ct.as_str()), (200, "text/plain; charset=utf-8"));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "main;handle_request;cache_insert 8388608\nmain;load_plugin:\u{a0}v2;[libplugin.so] 1048576\n"
        );
        let (_, _, body) =
            fetch(addr, "GET", "/folded?kind=heap&container=0123&weight=count").await;
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "main;handle_request;cache_insert 4000\n"
        );
        let (_, _, body) = fetch(addr, "GET", "/folded?kind=growth&container=0123").await;
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "main;handle_request 4096\n"
        );
        let (_, _, body) = fetch(addr, "GET", "/folded?kind=fd").await;
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "main 12\nmain;load_geofence 847\n"
        );
        let (_, _, body) = fetch(addr, "GET", "/folded?kind=tmp&container=ff").await;
        assert!(body.is_empty());
        assert_eq!(fetch(addr, "GET", "/folded?kind=stack").await.0, 400);

        let (status, ct, body) = fetch(addr, "GET", "/report.json").await;
        assert_eq!((status, ct.as_str()), (200, "application/json"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["leaks"][0]["container_id"], "0123456789abcdef0123");

        let (status, ct, body) = fetch(addr, "GET", "/report.html").await;
        assert_eq!((status, ct.as_str()), (200, "text/html; charset=utf-8"));
        let page = String::from_utf8(body).unwrap();
        assert!(page.starts_with("<!DOCTYPE html>"));
        for row in ["cache_insert", "libplugin.so+0x4321", "load_geofence"] {
            assert!(
                page.contains(&format!("<code class=\"fn\">{row}</code>")),
                "{row}"
            );
        }
        // Filtered like the other endpoints: the container's rows only.
        let (_, _, body) = fetch(addr, "GET", "/report.html?container=0123").await;
        let page = String::from_utf8(body).unwrap();
        assert!(page.contains("<code class=\"fn\">cache_insert</code>"));
        assert!(!page.contains("libplugin.so") && !page.contains("load_geofence"));

        assert_eq!(fetch(addr, "GET", "/nope").await.0, 404);
        assert_eq!(fetch(addr, "POST", "/metrics").await.0, 405);
        task.abort();
    }

    /// What `path?query` renders from `report`, as text.
    fn rendered(report: &Report, target: &str) -> String {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let endpoint = endpoint(path, query).unwrap().unwrap();
        let published = Published {
            report: Arc::new(report.clone()),
            stats: AgentStats::default(),
        };
        let (_, body) = render(&endpoint, &published, &Filter::of(query), MAX_SERIES);
        String::from_utf8(body).unwrap()
    }

    #[test]
    fn rows_are_filtered_by_pod_namespace_and_container_name() {
        let mut r = report();
        for row in r.leaks.iter_mut().take(1).chain(&mut r.growth) {
            row.owner.namespace = Some("payments".into());
            row.owner.pod = Some("api-7f9c".into());
            row.owner.container_name = Some("api".into());
        }
        let api = "main;handle_request;cache_insert 8388608\n";
        for q in [
            "pod=api-7f9c",
            "namespace=payments",
            "namespace=payments&pod=api-7f9c",
            "namespace=payments&pod=api-7f9c&container=api",
            "pod=api-7f9c&container=0123",
        ] {
            assert_eq!(rendered(&r, &format!("/folded?kind=heap&{q}")), api, "{q}");
        }
        for q in [
            "pod=api",
            "namespace=payment",
            "namespace=shop&pod=api-7f9c",
            "pod=api-7f9c&container=sidecar",
            "container=ap",
        ] {
            assert_eq!(rendered(&r, &format!("/folded?kind=heap&{q}")), "", "{q}");
        }
        assert_eq!(
            rendered(&r, "/folded?kind=growth&namespace=payments"),
            "main;handle_request 4096\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&rendered(&r, "/report.json?pod=api-7f9c")).unwrap();
        let leaks = json["leaks"].as_array().unwrap();
        assert_eq!(leaks.len(), 1, "{json}");
        assert_eq!(leaks[0]["namespace"], "payments");
        assert_eq!(leaks[0]["pod"], "api-7f9c");
        assert_eq!(leaks[0]["container_name"], "api");
        assert_eq!(
            json["fd_leaks"],
            serde_json::json!([]),
            "fd rows are in no pod"
        );
        assert_eq!(json["fd_exhaustion"], serde_json::json!([]));
        let metrics = rendered(&r, "/metrics?namespace=payments");
        assert!(
            metrics.contains(
                "leaktrace_heap_outstanding_bytes{namespace=\"payments\",pod=\"api-7f9c\",\
                 container=\"api\",container_id=\"0123456789ab\",comm=\"cache-server\",\
                 kind=\"heap\"} 8388608\n"
            ),
            "{metrics}"
        );
        assert!(!metrics.contains("container=\"\""), "{metrics}");
    }

    #[test]
    fn a_port_in_use_is_a_one_line_error() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr();
        let err = bind(addr).unwrap_err().to_string();
        assert_eq!(err, format!("address {addr} is in use: pass --listen ADDR"));
    }

    #[tokio::test]
    async fn a_client_that_sends_no_headers_is_dropped() {
        let server = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr();
        let (_publisher, snapshots) = channel();
        let options = ServeOptions {
            header_timeout: Duration::from_millis(200),
            ..ServeOptions::default()
        };
        let task = tokio::spawn(server.run(snapshots, options));
        let closed = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            let started = std::time::Instant::now();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            started.elapsed()
        })
        .await
        .unwrap();
        assert!(closed < Duration::from_secs(3), "closed after {closed:?}");
        task.abort();
    }
}
