//! HTTP through the waypoint in the virtual cluster, next to the ztunnel-only path and the
//! direct path, measured in one run:
//!
//! - direct: a client pod on node A -> a server pod on node B, both in a namespace outside the
//!   mesh;
//! - ztunnel: client pod -> ztunnel A -> HBONE -> ztunnel B -> server pod, through service
//!   `mesh-l4` (`istio.io/use-waypoint: none`);
//! - waypoint: client pod -> ztunnel A -> HBONE -> waypoint (node A) -> HBONE -> ztunnel B ->
//!   server pod, through service `mesh-l7`, whose VirtualService has ten routes: nine header
//!   matches the benchmark's requests never satisfy, then a 50/50 weighted split between
//!   DestinationRule subsets v1 and v2.
//!
//! Both mesh services front the same two server pods (v1, v2 on node B). For each path: HTTP/1.1
//! keep-alive on `BENCH_CONCURRENCY` connections, and HTTP/2 with that many concurrent streams on
//! one connection; closed loop (each worker sends its next `GET` when the previous answer has
//! been read in full) for `BENCH_SECONDS` per cell after a warm-up of `BENCH_WARMUP_MS` per
//! protocol. The servers are a lean hyper server in this file (HTTP/1.1 and HTTP/2, a fixed
//! 2-byte body); `BENCH_SAMPLE_BACKEND=1` uses the tests' chattier sample backend instead.
//!
//! Route table size (`BENCH_ROUTE_COUNTS`, default `10,1000`; empty skips it): for each count
//! N, service `mesh-rt` gets N routes written once as a VirtualService and once as an
//! HTTPRoute (N-1 header matches the requests never satisfy, alternately exact and regex,
//! then a catch-all to `mesh-l4`), applied in turn; each is measured over HTTP/1.1 keep-alive
//! like the cells above. One engine and one table serve both, so the two rows of a count
//! should cost the same; the table prints the waypoint's CPU per request and p50/p99 with
//! the HTTPRoute/VirtualService ratio. `BENCH_ONLY_ROUTES=1` measures only this table.
//!
//! Prints requests/s and p50/p99 latency with ratios to the direct path, CPU time per request of
//! each process of the path (from `/proc/<pid>/stat`), the requests the waypoint counted and the
//! v1/v2 split it made, and the resident memory of the waypoint and both ztunnels after the run.
//!
//! `BENCH_LOG` sets the proxies' `RUST_LOG` (default `info`, which includes the waypoint's
//! access-log line per request; `info,access=off` leaves it out).
//!
//! Run as root: `cargo build --release -p ztunnel -p waypoint && cargo bench -p mesh-tests
//! --bench waypoint`. It never fails on a timing; without root it says so and exits.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_tests::load;
use mesh_tests::load::in_pod;
use mesh_tests::vcluster::http::serve_backend;
use mesh_tests::vcluster::{Cluster, Pod, needs_root};
use serde_json::json;
use tokio::net::TcpStream;

const PORT: u16 = 9080;
const NAMESPACE: &str = "demo";
const WAYPOINT: &str = "waypoint";
/// ztunnel's count of the connections it opened (inbound tunnels on node B here).
const OPENED: &str = "istio_tcp_connections_opened_total";
/// What the lean server answers.
const BODY: &[u8] = b"ok";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !needs_root() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

// ---------------------------------------------------------------------------------------------
// The cluster

const DESTINATION_RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-l7, namespace: demo}
spec:
  host: mesh-l7
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
"#;

/// Ten routes: nine header matches (exact, prefix and regex; none matches the benchmark's
/// requests, so every request is tested against all nine) and a 50/50 split.
fn virtual_service() -> String {
    let mut http = String::new();
    for i in 1..=9 {
        let condition = match i % 3 {
            0 => format!("{{prefix: tenant-{i}-}}"),
            1 => format!("{{exact: user-{i}}}"),
            _ => format!("{{regex: \"^group-{i}-[0-9]+$\"}}"),
        };
        let subset = if i % 2 == 0 { "v2" } else { "v1" };
        http.push_str(&format!(
            "  - name: header-{i}\n    match:\n    - headers:\n        x-bench-route-{i}: \
             {condition}\n    route:\n    - destination: {{host: mesh-l7, subset: {subset}}}\n"
        ));
    }
    http.push_str(
        "  - name: split\n    route:\n    - destination: {host: mesh-l7, subset: v1}\n      \
         weight: 50\n    - destination: {host: mesh-l7, subset: v2}\n      weight: 50\n",
    );
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: mesh-l7, \
         namespace: demo}}\nspec:\n  hosts: [mesh-l7]\n  http:\n{http}"
    )
}

/// An EndpointSlice for `service` listing the pods of `mesh-l7` (the harness's services
/// select `app=<service>`, so more services fronting the same pods need this one by hand).
fn shared_endpoints(service: &str, pods: &[&Pod]) -> String {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-shared"),
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": pods.iter().map(|p| json!({
            "addresses": [p.ip().to_string()],
            "conditions": {"ready": true},
            "nodeName": p.node(),
            "targetRef": {"kind": "Pod", "name": p.name(), "namespace": p.namespace()},
        })).collect::<Vec<_>>(),
        "ports": [{"name": format!("http-{PORT}"), "port": PORT, "protocol": "TCP"}],
    })
    .to_string()
}

/// A server's request count, and whatever keeps it running.
struct Server {
    requests: Box<dyn Fn() -> u64 + Send + Sync>,
    _running: Box<dyn std::any::Any + Send + Sync>,
}

/// HTTP/1.1 and HTTP/2 (prior knowledge) on `port` in `pod`; every request gets 200 with
/// [`BODY`] and `x-version`.
async fn serve_lean(pod: &Pod, port: u16, version: &'static str) -> Server {
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let running = pod
        .serve(port, move |stream, _| {
            let counter = counter.clone();
            async move {
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut response =
                            hyper::Response::new(Full::new(Bytes::from_static(BODY)));
                        response
                            .headers_mut()
                            .insert("x-version", http::HeaderValue::from_static(version));
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        })
        .await
        .unwrap();
    Server {
        requests: Box::new(move || requests.load(Ordering::Relaxed)),
        _running: Box::new(running),
    }
}

async fn serve(pod: &Pod, version: &'static str) -> Server {
    if env("BENCH_SAMPLE_BACKEND", 0) != 0 {
        let backend = Arc::new(serve_backend(pod, PORT, version).await.unwrap());
        let counted = backend.clone();
        return Server {
            requests: Box::new(move || counted.requests()),
            _running: Box::new(backend),
        };
    }
    serve_lean(pod, PORT, version).await
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

async fn connect(addr: SocketAddr) -> TokioIo<TcpStream> {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    TokioIo::new(s)
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    /// One `GET /`, answer read in full; whether it was a 200.
    async fn get(&mut self, authority: &str) -> Result<bool, hyper::Error> {
        let response = match self {
            Self::H1(s) => {
                s.ready().await?;
                let request = http::Request::get("/")
                    .header(http::header::HOST, authority)
                    .body(Empty::new())
                    .unwrap();
                s.send_request(request).await?
            }
            Self::H2(s) => {
                s.ready().await?;
                let request = http::Request::get(format!("http://{authority}/"))
                    .body(Empty::new())
                    .unwrap();
                s.send_request(request).await?
            }
        };
        let ok = response.status() == http::StatusCode::OK;
        let body = response.into_body().collect().await?.to_bytes();
        Ok(ok && body.len() <= 4096)
    }

    fn is_closed(&self) -> bool {
        match self {
            Self::H1(s) => s.is_closed(),
            Self::H2(s) => s.is_closed(),
        }
    }
}

/// What one cell measured.
#[derive(Debug, Default, Clone)]
struct Cell {
    requests: u64,
    errors: u64,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU seconds used meanwhile by: this process (client and servers), ztunnel A, the
    /// waypoint, ztunnel B.
    cpu: [f64; 4],
    /// Share of the machine's CPUs busy meanwhile (any process, kernel included), 0..1.
    machine_busy: f64,
}

impl Cell {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// `concurrency` closed-loop workers sending `GET /` to `addr` for `duration`: on their own
/// HTTP/1.1 connections, or as streams of one HTTP/2 connection.
async fn load(
    addr: SocketAddr,
    protocol: Protocol,
    duration: Duration,
    concurrency: usize,
) -> Cell {
    let authority = Arc::<str>::from(addr.to_string());
    let mut senders = Vec::with_capacity(concurrency);
    match protocol {
        Protocol::Http1 => {
            for _ in 0..concurrency {
                let (sender, conn) = http1::handshake(connect(addr).await).await.unwrap();
                tokio::spawn(conn);
                senders.push(Sender::H1(sender));
            }
        }
        Protocol::Http2 => {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), connect(addr).await)
                .await
                .unwrap();
            tokio::spawn(conn);
            for _ in 0..concurrency {
                senders.push(Sender::H2(sender.clone()));
            }
        }
    }
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let authority = authority.clone();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match sender.get(&authority).await {
                        Ok(true) => times.push(t.elapsed()),
                        Ok(false) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            if sender.is_closed() {
                                break;
                            }
                        }
                    }
                }
                (times, errors)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (t, e) = worker.await.unwrap();
        times.extend(t);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    times.sort_unstable();
    let pct = |p: f64| {
        if times.is_empty() {
            return f64::NAN;
        }
        times[((times.len() as f64 * p) as usize).min(times.len() - 1)].as_secs_f64() * 1e6
    };
    Cell {
        requests: times.len() as u64,
        errors,
        seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu: [0.0; 4],
        machine_busy: f64::NAN,
    }
}

struct Bench {
    seconds: Duration,
    warmup: Duration,
    concurrency: usize,
    /// This process, ztunnel A, the waypoint, ztunnel B.
    pids: [u32; 4],
}

impl Bench {
    async fn cell(&self, client: &Pod, addr: SocketAddr, protocol: Protocol, d: Duration) -> Cell {
        let netns = client.netns().open().unwrap();
        let concurrency = self.concurrency;
        let before = self.pids.map(load::cpu_seconds);
        let machine_before = load::machine_ticks();
        let mut cell = in_pod(netns, move || load(addr, protocol, d, concurrency)).await;
        let machine_after = load::machine_ticks();
        let after = self.pids.map(load::cpu_seconds);
        for i in 0..4 {
            cell.cpu[i] = after[i] - before[i];
        }
        cell.machine_busy = (machine_after.0 - machine_before.0) as f64
            / (machine_after.1 - machine_before.1).max(1) as f64;
        cell
    }

    /// Warms the path up with both protocols, then measures both.
    async fn path(&self, client: &Pod, addr: SocketAddr) -> [Cell; 2] {
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let warm = self.cell(client, addr, protocol, self.warmup).await;
            assert!(
                warm.requests > 0,
                "no answer from {addr} over {protocol:?} during the warm-up ({} errors)",
                warm.errors
            );
        }
        [
            self.cell(client, addr, Protocol::Http1, self.seconds).await,
            self.cell(client, addr, Protocol::Http2, self.seconds).await,
        ]
    }
}

async fn run() {
    let seconds = env("BENCH_SECONDS", 3);
    let concurrency = env("BENCH_CONCURRENCY", 8).max(1) as usize;
    let warmup = Duration::from_millis(env("BENCH_WARMUP_MS", 500));
    // `RUST_LOG` of the ztunnels and the waypoint; e.g. `info,access=off` drops the waypoint's
    // per-request access-log line (and ztunnel's per-connection one).
    let log = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".to_owned());
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace(NAMESPACE)
        .ambient()
        .namespace_label("istio.io/use-waypoint", WAYPOINT)
        .namespace("plain")
        .waypoint("a", NAMESPACE, WAYPOINT)
        .pod("a", NAMESPACE, "client")
        .pod("b", NAMESPACE, "server-v1")
        .label("app", "mesh-l7")
        .label("version", "v1")
        .pod("b", NAMESPACE, "server-v2")
        .label("app", "mesh-l7")
        .label("version", "v2")
        .pod("a", "plain", "client-direct")
        .pod("b", "plain", "server-direct")
        .http_service(NAMESPACE, "mesh-l7", PORT, PORT)
        .http_service(NAMESPACE, "mesh-l4", PORT, PORT)
        .service_label("istio.io/use-waypoint", "none")
        .http_service(NAMESPACE, "mesh-rt", PORT, PORT)
        .yaml("destination-rule", DESTINATION_RULE)
        .yaml("virtual-service", &virtual_service())
        .log_filter(&log)
        .build()
        .await
        .expect("virtual cluster");
    let pods = [cluster.pod("server-v1"), cluster.pod("server-v2")];
    cluster
        .apply("mesh-l4-endpoints", &shared_endpoints("mesh-l4", &pods))
        .await;
    cluster
        .apply("mesh-rt-endpoints", &shared_endpoints("mesh-rt", &pods))
        .await;
    let v1 = serve(cluster.pod("server-v1"), "v1").await;
    let v2 = serve(cluster.pod("server-v2"), "v2").await;
    let direct_server = serve(cluster.pod("server-direct"), "direct").await;
    let waypoint = cluster.waypoint(WAYPOINT);
    let bench = Bench {
        seconds: Duration::from_secs(seconds),
        warmup,
        concurrency,
        pids: [
            std::process::id(),
            cluster.node("a").pid(),
            waypoint.pid(),
            cluster.node("b").pid(),
        ],
    };
    if env("BENCH_ONLY_ROUTES", 0) != 0 {
        route_table_sizes(&cluster, &bench).await;
        return;
    }
    let counted_before = waypoint.metrics().await.sum("istio_requests_total", &[]);
    let node_b = cluster.node("b");
    let opened = || async { node_b.metrics().await.sum(OPENED, &[]) };
    let opened_before = opened().await;

    let direct = bench
        .path(
            cluster.pod("client-direct"),
            cluster.pod("server-direct").addr(PORT),
        )
        .await;
    let l4 = bench
        .path(
            cluster.pod("client"),
            cluster.service_addr(NAMESPACE, "mesh-l4", PORT),
        )
        .await;
    let counted_l4 = waypoint.metrics().await.sum("istio_requests_total", &[]);
    let opened_l4 = opened().await;
    let (v1_before, v2_before) = ((v1.requests)(), (v2.requests)());
    let l7 = bench
        .path(
            cluster.pod("client"),
            cluster.service_addr(NAMESPACE, "mesh-l7", PORT),
        )
        .await;
    let (v1_l7, v2_l7) = ((v1.requests)() - v1_before, (v2.requests)() - v2_before);
    let counted_l7 = waypoint.metrics().await.sum("istio_requests_total", &[]);
    let opened_l7 = opened().await;
    let memory: Vec<(&str, u32)> = vec![
        ("waypoint", waypoint.pid()),
        ("ztunnel node a", cluster.node("a").pid()),
        ("ztunnel node b", cluster.node("b").pid()),
    ];

    println!();
    println!(
        "Virtual cluster, client pod on node A -> server pod on node B: GET / answered by {}, \
         closed loop, {concurrency} workers, {seconds} s per cell after a {} ms warm-up, \
         RUST_LOG={log}",
        if env("BENCH_SAMPLE_BACKEND", 0) != 0 {
            "the sample backend (body echoes the request headers)".to_owned()
        } else {
            format!("a lean server ({} bytes)", BODY.len())
        },
        warmup.as_millis(),
    );
    println!(
        "direct: outside the mesh; ztunnel: ztunnel A -> HBONE -> ztunnel B; waypoint: \
         ztunnel A -> waypoint (10 routes, 50/50 split) -> ztunnel B"
    );
    println!(
        "{:<36}{:>10}{:>10}{:>8}{:>10}{:>8}",
        "", "direct", "ztunnel", "ratio", "waypoint", "ratio"
    );
    let labels = [
        format!("HTTP/1.1 keep-alive, {concurrency} connections"),
        format!("HTTP/2, 1 connection, {concurrency} streams"),
    ];
    for (i, label) in labels.iter().enumerate() {
        println!("{label}");
        let (d, m, w) = (&direct[i], &l4[i], &l7[i]);
        let row = |name: &str, d: f64, m: f64, w: f64, precision: usize| {
            println!(
                "  {name:<34}{d:>10.precision$}{m:>10.precision$}{:>8.2}{w:>10.precision$}{:>8.2}",
                m / d,
                w / d
            );
        };
        row("requests/s", d.rps(), m.rps(), w.rps(), 0);
        row("p50 latency (us)", d.p50_us, m.p50_us, w.p50_us, 1);
        row("p99 latency (us)", d.p99_us, m.p99_us, w.p99_us, 1);
        if d.errors + m.errors + w.errors > 0 {
            println!(
                "  {:<34}{:>10}{:>10}{:>8}{:>10}",
                "errors", d.errors, m.errors, "", w.errors
            );
        }
    }

    println!();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "CPU time per request (us), from /proc/<pid>/stat (10 ms ticks); busy: share of the \
         {cpus} CPUs used by these processes / by the whole machine (other load included)"
    );
    println!(
        "{:<36}{:>16}{:>12}{:>12}{:>12}{:>14}",
        "", "client+servers", "ztunnel A", "waypoint", "ztunnel B", "busy"
    );
    let cells = [("direct", &direct), ("ztunnel", &l4), ("waypoint", &l7)];
    for (path, pair) in cells {
        for (i, cell) in pair.iter().enumerate() {
            let per = |s: f64| s * 1e6 / cell.requests.max(1) as f64;
            let ours = cell.cpu.iter().sum::<f64>() / cell.seconds / cpus * 100.0;
            println!(
                "  {:<34}{:>16.1}{:>12.1}{:>12.1}{:>12.1}{:>7.0}% /{:>3.0}%",
                format!("{path}, {}", if i == 0 { "HTTP/1.1" } else { "HTTP/2" }),
                per(cell.cpu[0]),
                per(cell.cpu[1]),
                per(cell.cpu[2]),
                per(cell.cpu[3]),
                ours,
                cell.machine_busy * 100.0
            );
        }
    }

    let sent_l7: u64 = l7.iter().map(|c| c.requests + c.errors).sum();
    println!();
    println!(
        "waypoint: counted {:.0} requests (istio_requests_total) during the ztunnel path and \
         {:.0} during the waypoint path (which answered {sent_l7} measured requests plus the \
         warm-up); the split sent {v1_l7} to v1 and {v2_l7} to v2 ({:.1}% v1)",
        counted_l4 - counted_before,
        counted_l7 - counted_l4,
        v1_l7 as f64 * 100.0 / (v1_l7 + v2_l7).max(1) as f64
    );
    println!(
        "ztunnel B: {OPENED} rose by {:.0} during the ztunnel path and by {:.0} during the \
         waypoint path (each path: 2 warm-ups and 2 cells; HTTP/1.1 opens {concurrency} \
         connections a cell, HTTP/2 one)",
        opened_l4 - opened_before,
        opened_l7 - opened_l4
    );
    println!(
        "server requests: v1 {}, v2 {}, direct {}",
        (v1.requests)(),
        (v2.requests)(),
        (direct_server.requests)()
    );
    let mib =
        |kib: Option<u64>| kib.map_or("?".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
    println!("memory after the run (MiB):");
    for (name, pid) in memory {
        println!(
            "  {name:<16} VmRSS {:>8}   peak VmHWM {:>8}",
            mib(load::status_kib(pid, "VmRSS")),
            mib(load::status_kib(pid, "VmHWM"))
        );
    }
    route_table_sizes(&cluster, &bench).await;
}

/// `n` routes for `mesh-rt` as a VirtualService or as an HTTPRoute: `n - 1` header matches
/// the benchmark's requests never satisfy (exact and regex in turn), then a catch-all to
/// `mesh-l4`. The same table either way.
fn route_table(n: usize, http_route: bool) -> String {
    let mut out = String::new();
    if http_route {
        out.push_str(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: \
             mesh-rt, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, \
             name: mesh-rt, port: 9080}]\n  rules:\n",
        );
        for i in 1..n {
            let (kind, value) = if i % 2 == 0 {
                ("RegularExpression", format!("'^group-{i}-[0-9]+$'"))
            } else {
                ("Exact", format!("user-{i}"))
            };
            out.push_str(&format!(
                "  - matches: [{{headers: [{{name: x-bench-route-{i}, type: {kind}, value: \
                 {value}}}]}}]\n    backendRefs: [{{name: mesh-l4, port: 9080}}]\n"
            ));
        }
        out.push_str("  - backendRefs: [{name: mesh-l4, port: 9080}]\n");
    } else {
        out.push_str(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: \
             mesh-rt, namespace: demo}\nspec:\n  hosts: [mesh-rt]\n  http:\n",
        );
        for i in 1..n {
            let condition = if i % 2 == 0 {
                format!("{{regex: '^group-{i}-[0-9]+$'}}")
            } else {
                format!("{{exact: user-{i}}}")
            };
            out.push_str(&format!(
                "  - match: [{{headers: {{x-bench-route-{i}: {condition}}}}}]\n    route: \
                 [{{destination: {{host: mesh-l4, port: {{number: 9080}}}}}}]\n"
            ));
        }
        out.push_str("  - route: [{destination: {host: mesh-l4, port: {number: 9080}}}]\n");
    }
    out
}

/// The waypoint's cost per request with `BENCH_ROUTE_COUNTS` routes on one service, written as
/// a VirtualService and as an HTTPRoute, in one run (see the module doc).
async fn route_table_sizes(cluster: &Cluster, bench: &Bench) {
    let counts: Vec<usize> = std::env::var("BENCH_ROUTE_COUNTS")
        .unwrap_or_else(|_| "10,1000".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .collect();
    if counts.is_empty() {
        return;
    }
    let client = cluster.pod("client");
    let addr = cluster.service_addr(NAMESPACE, "mesh-rt", PORT);
    let mut rows = Vec::new();
    for n in counts {
        let mut pair = Vec::new();
        for (api, http_route) in [("VirtualService", false), ("HTTPRoute", true)] {
            cluster
                .apply("route-table", &route_table(n, http_route))
                .await;
            let warm = bench
                .cell(client, addr, Protocol::Http1, bench.warmup)
                .await;
            assert!(
                warm.requests > 0,
                "no answer from mesh-rt with {n} routes as {api} ({} errors)",
                warm.errors
            );
            let cell = bench
                .cell(client, addr, Protocol::Http1, bench.seconds)
                .await;
            pair.push((api, cell));
        }
        cluster.remove("route-table").await;
        rows.push((n, pair));
    }
    println!();
    println!(
        "Route table size, service mesh-rt through the waypoint, HTTP/1.1 keep-alive, {} \
         workers: N routes (N-1 unmatched header rules, then a catch-all)",
        bench.concurrency
    );
    println!(
        "{:<8}{:<16}{:>10}{:>10}{:>10}{:>16}{:>8}",
        "routes", "written as", "req/s", "p50 us", "p99 us", "waypoint us/req", "ratio"
    );
    for (n, pair) in rows {
        let per = |c: &Cell| c.cpu[2] * 1e6 / c.requests.max(1) as f64;
        let base = per(&pair[0].1);
        for (api, cell) in &pair {
            println!(
                "{n:<8}{api:<16}{:>10.0}{:>10.1}{:>10.1}{:>16.1}{:>8.2}",
                cell.rps(),
                cell.p50_us,
                cell.p99_us,
                per(cell),
                per(cell) / base
            );
            if cell.errors > 0 {
                println!("        errors: {}", cell.errors);
            }
        }
    }
}
