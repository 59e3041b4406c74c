//! The ingress gateway (`waypoint gateway`) against nginx as a TLS-terminating reverse proxy and
//! against the direct path, in the virtual cluster, measured in one run. Same client, same
//! backend, same certificate:
//!
//! - direct: client pod -> backend pod, plain HTTP to the pod's IP (no TLS terminator);
//! - direct-tls: client pod -> backend pod over HTTPS, terminated by rustls in the backend
//!   itself (what TLS costs without a proxy);
//! - ingress: client pod --HTTPS--> `waypoint gateway` (its own pod, as in
//!   `tests/tests/ingress.rs`: an Istio Gateway, HTTPS SIMPLE with a `credentialName` Secret,
//!   a VirtualService) --HBONE with the gateway's identity--> ztunnel of node b -> backend;
//! - nginx-wN: client pod --HTTPS--> nginx (Debian's package, `worker_processes N`,
//!   `master_process on`) in an un-meshed pod next to the gateway's, on the same node --plain
//!   HTTP/1.1, upstream keep-alive--> backend pod (nginx is not in the mesh).
//!
//! The client pod (node a) and the gateway and nginx pods (node a) are outside the mesh; the
//! backend pod (node b) is in an ambient namespace, so every path reaches it through the
//! ztunnel of node b: over HBONE from the gateway, as captured plaintext from everyone else.
//! The backend is a lean hyper server in this process answering every `GET` with 1 KiB.
//!
//! For each path: HTTP/1.1 keep-alive with each of `BENCH_CONCURRENCY` (default `1,16`)
//! connections, HTTP/2 with the largest of them as streams of one connection, closed loop,
//! `BENCH_REQUESTS` (20,000) requests per cell or `BENCH_MAX_SECONDS` (30), whichever ends
//! first; then `BENCH_CONNECTIONS` (2,000) new connections by `BENCH_CONN_CONCURRENCY` (4)
//! workers, each a TCP connect, a full TLS handshake (client resumption off) and one request.
//! The CPU time of the proxy (utime + stime from `/proc/<pid>/stat`; nginx: master and workers),
//! of node b's ztunnel and of this process (client and backend) is taken around every cell, the
//! proxies' resident memory before the path's first request and after its last.
//!
//! `BENCH_NGINX_WORKERS` (default `1,2`: `waypoint gateway` runs 2 tokio workers) lists the
//! nginx configurations; `NGINX_BIN` picks the binary (default `nginx` on `PATH` or
//! `/usr/sbin/nginx`; without one the nginx rows are skipped with the reason).
//! `BENCH_PATHS` (e.g. `ingress,nginx-w2`) measures only the paths named.
//! `BENCH_ACCESS_LOG=1` turns both proxies' access logs on (off by default: Istio's ingress
//! has none unless `accessLogFile` is set). `WAYPOINT_BIN` / `ZTUNNEL_BIN` pick other builds.
//!
//! Run as root: `cargo build --release -p ztunnel -p waypoint && cargo bench -p mesh-tests
//! --bench ingress`. It prints figures and never fails on a timing; without root it says so and
//! exits.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_tests::load::in_pod;
use mesh_tests::vcluster::{AppServer, Cluster, Pod, eventually, needs_root};
use mesh_tests::{IssuedPem, WebPki, load};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use ztunnel::capture::NetNs;

const BACKEND_PORT: u16 = 9080;
const BACKEND_TLS_PORT: u16 = 9443;
const HTTPS_PORT: u16 = 8443;
const HOST: &str = "bench.example.com";
const INGRESS: &str = "istio-ingress";
const INGRESS_NS: &str = "istio-ingress";
/// What the backend answers to every request.
const BODY_BYTES: usize = 1024;
/// The tokio workers of `waypoint gateway` (`WAYPOINT_WORKER_THREADS`, whose default the
/// harness keeps).
const GATEWAY_WORKERS: usize = waypoint::config::DEFAULT_WORKER_THREADS;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    let raw = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    raw.split(',')
        .filter_map(|v| v.trim().parse().ok())
        .filter(|&v| v > 0)
        .collect()
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
// The cluster and the backend

/// Istio's ingress task, shaped for one backend: an HTTPS SIMPLE server for [`HOST`] with the
/// Secret `bench-credential` (in the gateway's namespace), and a VirtualService sending
/// everything to `backend`.
fn ingress_yaml() -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench-gateway, namespace: demo}}
spec:
  selector:
    istio: ingress
  servers:
  - port: {{number: {HTTPS_PORT}, name: https, protocol: HTTPS}}
    hosts: ["{HOST}"]
    tls:
      mode: SIMPLE
      credentialName: bench-credential
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench, namespace: demo}}
spec:
  hosts: ["{HOST}"]
  gateways: [bench-gateway]
  http:
  - route:
    - destination: {{host: backend, port: {{number: {BACKEND_PORT}}}}}
"#
    )
}

/// A rustls server config for `issued` offering `h2` and `http/1.1`.
fn server_config(issued: &IssuedPem) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(issued.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge, or ALPN under `tls`) on `port` in `pod`: every
/// request gets 200 and [`BODY_BYTES`] bytes.
async fn serve_backend(
    pod: &Pod,
    port: u16,
    tls: Option<Arc<rustls::ServerConfig>>,
    requests: Arc<AtomicU64>,
) -> AppServer {
    let body = Bytes::from(vec![b'x'; BODY_BYTES]);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    pod.serve(port, move |stream, _| {
        let (body, requests, acceptor) = (body.clone(), requests.clone(), acceptor.clone());
        async move {
            let service = hyper::service::service_fn(move |_req| {
                requests.fetch_add(1, Ordering::Relaxed);
                let body = body.clone();
                async move {
                    let mut response = hyper::Response::new(Full::new(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = match acceptor {
                None => server.serve_connection(TokioIo::new(stream), service).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => server.serve_connection(TokioIo::new(tls), service).await,
                    Err(_) => return,
                },
            };
        }
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// nginx

/// `NGINX_BIN`, else `nginx` on `PATH`, else `/usr/sbin/nginx`.
fn nginx_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("NGINX_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("NGINX_BIN={} is not a file", path.display()))
        };
    }
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nginx")).collect())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "no nginx binary (install it with `apt-get install -y nginx-light`, or set NGINX_BIN)"
                .to_owned()
        })
}

/// `nginx -v`'s answer, e.g. `nginx/1.22.1`.
fn nginx_version(binary: &Path) -> String {
    Command::new(binary)
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_owned()
        })
        .unwrap_or_else(|e| format!("? ({e})"))
}

/// nginx terminating TLS for [`HOST`] on `listen` and proxying to `upstream` with keep-alive,
/// run as root in a pod's network namespace with its own configuration in a temporary
/// directory. Stopped (by its pid) on drop.
struct Nginx {
    child: Child,
    workers: usize,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn config(
        dir: &Path,
        workers: usize,
        listen: SocketAddr,
        upstream: SocketAddr,
        access_log: bool,
    ) -> String {
        let d = dir.display();
        let access_log = if access_log {
            format!("access_log {d}/access.log;")
        } else {
            "access_log off;".to_owned()
        };
        // keepalive_requests: nginx closes a keep-alive connection after 1,000 requests by
        // default (client and upstream side); the gateway has no such limit, and a cell sends
        // 20,000 requests on one connection. Session tickets and the session cache stay at
        // their defaults; the benchmark's client never resumes.
        format!(
            r#"daemon off;
master_process on;
worker_processes {workers};
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    {access_log}
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen} ssl http2;
        server_name {HOST};
        ssl_certificate {d}/tls.crt;
        ssl_certificate_key {d}/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-Id $request_id;
        }}
    }}
}}
"#
        )
    }

    async fn start(
        binary: &Path,
        pod: &Pod,
        workers: usize,
        upstream: SocketAddr,
        issued: &IssuedPem,
        access_log: bool,
    ) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("bench-nginx-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let listen = pod.addr(HTTPS_PORT);
        let conf = dir.path().join("nginx.conf");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).map_err(|e| format!("{name}: {e}"))
        };
        write(
            "nginx.conf",
            &Self::config(dir.path(), workers, listen, upstream, access_log),
        )?;
        write("tls.crt", &issued.cert)?;
        write("tls.key", &issued.key)?;
        let out =
            std::fs::File::create(dir.path().join("stderr.log")).map_err(|e| e.to_string())?;
        // `ip netns exec` execs nginx in place: the child's pid is the master's.
        let child = Command::new("ip")
            .args(["netns", "exec", pod.netns().name()])
            .arg(binary)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let mut nginx = Self {
            child,
            workers,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let problem = if let Ok(Some(status)) = nginx.child.try_wait() {
                format!("exited with {status}")
            } else if nginx.pids().len() < 1 + workers {
                format!("{} of {workers} workers up", nginx.pids().len() - 1)
            } else {
                match pod.connect(listen).await {
                    Ok(_) => return Ok(nginx),
                    Err(e) => format!("connect {listen}: {e}"),
                }
            };
            if Instant::now() >= deadline || problem.starts_with("exited") {
                return Err(format!("nginx did not start: {problem}\n{}", nginx.logs()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        pids.extend(children(master));
        pids
    }

    fn logs(&self) -> String {
        ["stderr.log", "error.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.path().join(f)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pids = self.pids();
        // SIGTERM: nginx's fast shutdown; the master stops its workers.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in pids {
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

/// The processes whose parent is `pid` (from `/proc/<pid>/stat`, field 4).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// `Pss` of a process from `/proc/<pid>/smaps_rollup`, KiB: its share of pages it shares with
/// others (nginx's workers share most of the master's).
fn pss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Where a path's client connects and how.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// `Some`: HTTPS with SNI [`HOST`], trusting the benchmark's CA.
    tls: Option<Arc<WebPki>>,
}

/// What the client's streams are: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A TLS session's parameters as the client saw them, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384
/// X25519`.
type TlsInfo = Option<String>;

impl Target {
    fn client_config(&self, protocol: Protocol, resume: bool) -> Option<Arc<rustls::ClientConfig>> {
        let pki = self.tls.as_ref()?;
        let alpn: &[u8] = match protocol {
            Protocol::Http1 => b"http/1.1",
            Protocol::Http2 => b"h2",
        };
        let config = pki.client_config(&[alpn], None);
        if resume {
            return Some(config);
        }
        let mut config = (*config).clone();
        config.resumption = rustls::client::Resumption::disabled();
        Some(Arc::new(config))
    }

    async fn connect(
        &self,
        config: Option<&Arc<rustls::ClientConfig>>,
    ) -> std::io::Result<(Box<dyn Io>, TlsInfo)> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let Some(config) = config else {
            return Ok((Box::new(tcp), None));
        };
        let name = ServerName::try_from(HOST).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await?;
        let session = tls.get_ref().1;
        let info = format!(
            "{:?} {:?} {}",
            session
                .protocol_version()
                .unwrap_or(rustls::ProtocolVersion::Unknown(0)),
            session
                .negotiated_cipher_suite()
                .map(|s| s.suite())
                .unwrap_or(rustls::CipherSuite::Unknown(0)),
            session
                .negotiated_key_exchange_group()
                .map_or("?".to_owned(), |g| format!("{:?}", g.name())),
        );
        Ok((Box::new(tls), Some(info)))
    }

    fn uri(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{HOST}/")
    }
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn open(io: Box<dyn Io>, protocol: Protocol) -> Result<Self, hyper::Error> {
        let io = TokioIo::new(io);
        Ok(match protocol {
            Protocol::Http1 => {
                let (sender, conn) = http1::handshake(io).await?;
                tokio::spawn(conn);
                Self::H1(sender)
            }
            Protocol::Http2 => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                Self::H2(sender)
            }
        })
    }

    /// One `GET /`, answer read in full; whether it was a 200 with [`BODY_BYTES`] bytes.
    async fn get(&mut self, uri: &str) -> Result<bool, hyper::Error> {
        let response = match self {
            Self::H1(s) => {
                s.ready().await?;
                let request = http::Request::get("/")
                    .header(http::header::HOST, HOST)
                    .body(Empty::new())
                    .unwrap();
                s.send_request(request).await?
            }
            Self::H2(s) => {
                s.ready().await?;
                let request = http::Request::get(uri).body(Empty::new()).unwrap();
                s.send_request(request).await?
            }
        };
        let ok = response.status() == http::StatusCode::OK;
        let body = response.into_body().collect().await?.to_bytes();
        Ok(ok && body.len() == BODY_BYTES)
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
    /// Requests answered with 200 and 1 KiB (new-connection cells: connections that did so).
    done: u64,
    errors: u64,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU seconds meanwhile of: this process (client and backend), the proxy, ztunnel b.
    cpu: [f64; 3],
    /// Share of the machine's CPUs busy meanwhile (any process, kernel included), 0..1.
    machine_busy: f64,
    tls: TlsInfo,
}

impl Cell {
    fn rate(&self) -> f64 {
        self.done as f64 / self.seconds
    }

    /// CPU microseconds of process `i` per answered request (or connection).
    fn cpu_us(&self, i: usize) -> f64 {
        self.cpu[i] * 1e6 / self.done.max(1) as f64
    }

    fn from_times(mut times: Vec<Duration>, errors: u64, seconds: f64, tls: TlsInfo) -> Self {
        times.sort_unstable();
        let pct = |p: f64| {
            if times.is_empty() {
                return f64::NAN;
            }
            times[((times.len() as f64 * p) as usize).min(times.len() - 1)].as_secs_f64() * 1e6
        };
        Self {
            done: times.len() as u64,
            errors,
            seconds,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            cpu: [0.0; 3],
            machine_busy: f64::NAN,
            tls,
        }
    }
}

/// How much load a cell sends.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// `concurrency` closed-loop workers on their own connections (HTTP/1.1) or as streams of
    /// one connection (HTTP/2), `total` requests in all.
    KeepAlive {
        protocol: Protocol,
        concurrency: usize,
        total: u64,
    },
    /// `total` fresh connections (full handshake, one HTTP/1.1 request each) by `concurrency`
    /// workers.
    NewConnections { concurrency: usize, total: u64 },
}

/// Runs one cell's load; at most `limit` long.
async fn load(target: Target, shape: Shape, limit: Duration) -> Cell {
    let deadline = Instant::now() + limit;
    let tickets = Arc::new(AtomicU64::new(0));
    let uri = Arc::<str>::from(target.uri());
    match shape {
        Shape::KeepAlive {
            protocol,
            concurrency,
            total,
        } => {
            let config = target.client_config(protocol, true);
            let mut senders = Vec::with_capacity(concurrency);
            let mut tls = None;
            let connections = if protocol == Protocol::Http1 {
                concurrency
            } else {
                1
            };
            for _ in 0..connections {
                let (io, info) = target.connect(config.as_ref()).await.unwrap();
                tls = info;
                senders.push(Sender::open(io, protocol).await.unwrap());
            }
            while senders.len() < concurrency {
                let Sender::H2(s) = &senders[0] else {
                    unreachable!("HTTP/1.1 has a connection per worker")
                };
                let s = s.clone();
                senders.push(Sender::H2(s));
            }
            let start = Instant::now();
            let workers: Vec<_> = senders
                .into_iter()
                .map(|mut sender| {
                    let (tickets, uri) = (tickets.clone(), uri.clone());
                    tokio::spawn(async move {
                        let mut times = Vec::with_capacity(total as usize / concurrency + 1);
                        let mut errors = 0u64;
                        while Instant::now() < deadline
                            && tickets.fetch_add(1, Ordering::Relaxed) < total
                        {
                            let t = Instant::now();
                            match sender.get(&uri).await {
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
            let (times, errors) = gather(workers).await;
            Cell::from_times(times, errors, start.elapsed().as_secs_f64(), tls)
        }
        Shape::NewConnections { concurrency, total } => {
            let config = target.client_config(Protocol::Http1, false);
            let start = Instant::now();
            let workers: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (tickets, uri, target, config) =
                        (tickets.clone(), uri.clone(), target.clone(), config.clone());
                    tokio::spawn(async move {
                        let mut times = Vec::with_capacity(total as usize / concurrency + 1);
                        let mut errors = 0u64;
                        while Instant::now() < deadline
                            && tickets.fetch_add(1, Ordering::Relaxed) < total
                        {
                            let t = Instant::now();
                            let one = async {
                                let (io, _) = target.connect(config.as_ref()).await.ok()?;
                                let mut sender = Sender::open(io, Protocol::Http1).await.ok()?;
                                sender.get(&uri).await.ok()
                            };
                            match one.await {
                                Some(true) => times.push(t.elapsed()),
                                _ => errors += 1,
                            }
                        }
                        (times, errors)
                    })
                })
                .collect();
            let (times, errors) = gather(workers).await;
            let seconds = start.elapsed().as_secs_f64();
            // One more handshake, outside the timing, to show what was negotiated.
            let tls = match target.connect(config.as_ref()).await {
                Ok((_, info)) => info,
                Err(e) => Some(format!("? ({e})")),
            };
            Cell::from_times(times, errors, seconds, tls)
        }
    }
}

async fn gather(
    workers: Vec<tokio::task::JoinHandle<(Vec<Duration>, u64)>>,
) -> (Vec<Duration>, u64) {
    let mut times = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (t, e) = worker.await.unwrap();
        times.extend(t);
        errors += e;
    }
    (times, errors)
}

/// One path: where the client connects, and the processes of its proxy (none for direct).
struct PathUnderTest {
    name: String,
    describe: String,
    target: Target,
    proxy: Vec<u32>,
}

/// What one path measured.
struct Measured {
    name: String,
    /// Keep-alive cells: (label, cell).
    keep_alive: Vec<(String, Cell)>,
    new_connections: Cell,
    /// The proxy's memory (KiB): (RSS, PSS) before the first request and after the last.
    idle: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
}

struct Bench {
    /// The client pod's network namespace (its name).
    client: String,
    /// This process and ztunnel b.
    bench_pid: u32,
    ztunnel_b: u32,
    concurrency: Vec<usize>,
    requests: u64,
    connections: u64,
    conn_concurrency: usize,
    limit: Duration,
}

fn memory(pids: &[u32]) -> Option<(u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    let rss = pids
        .iter()
        .map(|&p| load::status_kib(p, "VmRSS"))
        .sum::<Option<u64>>()?;
    let pss = pids.iter().map(|&p| pss_kib(p)).sum::<Option<u64>>()?;
    Some((rss, pss))
}

impl Bench {
    async fn cell(&self, target: &Target, proxy: &[u32], shape: Shape) -> Cell {
        let pids: Vec<u32> = [self.bench_pid, self.ztunnel_b]
            .into_iter()
            .chain(proxy.iter().copied())
            .collect();
        let cpu = |pids: &[u32]| -> [f64; 3] {
            let s = |p: &[u32]| p.iter().map(|&p| load::cpu_seconds(p)).sum::<f64>();
            [s(&pids[..1]), s(&pids[2..]), s(&pids[1..2])]
        };
        let before = cpu(&pids);
        let machine_before = load::machine_ticks();
        let netns = NetNs::from_name(&self.client).unwrap();
        let (target, limit) = (target.clone(), self.limit);
        let mut cell = in_pod(netns, move || load(target, shape, limit)).await;
        let machine_after = load::machine_ticks();
        let after = cpu(&pids);
        for i in 0..3 {
            cell.cpu[i] = after[i] - before[i];
        }
        cell.machine_busy = (machine_after.0 - machine_before.0) as f64
            / (machine_after.1 - machine_before.1).max(1) as f64;
        cell
    }

    async fn path(&self, path: &PathUnderTest) -> Measured {
        eprintln!("measuring {} (proxy pids {:?})", path.name, path.proxy);
        let idle = memory(&path.proxy);
        let max = self.concurrency.iter().copied().max().unwrap_or(1);
        // Warm-up: connections, pools and allocators of every protocol.
        for shape in [
            Shape::KeepAlive {
                protocol: Protocol::Http1,
                concurrency: max,
                total: 2000,
            },
            Shape::KeepAlive {
                protocol: Protocol::Http2,
                concurrency: max,
                total: 1000,
            },
            Shape::NewConnections {
                concurrency: self.conn_concurrency,
                total: 200,
            },
        ] {
            let warm = self.cell(&path.target, &path.proxy, shape).await;
            assert!(
                warm.done > 0 && warm.errors == 0,
                "{}: warm-up {shape:?}: {} answered, {} errors",
                path.name,
                warm.done,
                warm.errors
            );
        }
        let mut keep_alive = Vec::new();
        for &concurrency in &self.concurrency {
            let shape = Shape::KeepAlive {
                protocol: Protocol::Http1,
                concurrency,
                total: self.requests,
            };
            let label = format!("HTTP/1.1 x{concurrency}");
            keep_alive.push((label, self.cell(&path.target, &path.proxy, shape).await));
        }
        let shape = Shape::KeepAlive {
            protocol: Protocol::Http2,
            concurrency: max,
            total: self.requests,
        };
        keep_alive.push((
            format!("h2 1 conn x{max}"),
            self.cell(&path.target, &path.proxy, shape).await,
        ));
        let shape = Shape::NewConnections {
            concurrency: self.conn_concurrency,
            total: self.connections,
        };
        let new_connections = self.cell(&path.target, &path.proxy, shape).await;
        Measured {
            name: path.name.clone(),
            keep_alive,
            new_connections,
            idle,
            after: memory(&path.proxy),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run() {
    let concurrency: Vec<usize> = env_list("BENCH_CONCURRENCY", "1,16")
        .into_iter()
        .map(|c| c as usize)
        .collect();
    let nginx_workers = env_list("BENCH_NGINX_WORKERS", "1,2");
    let access_log = env("BENCH_ACCESS_LOG", 0) != 0;
    let log = if access_log {
        "info"
    } else {
        "info,access=off"
    };

    let pki = Arc::new(WebPki::new("bench root"));
    let issued = pki.server(&[HOST]);
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace(INGRESS_NS)
        .ingress_gateway("a", INGRESS_NS, INGRESS)
        .pod("a", INGRESS_NS, "nginx")
        .namespace("outside")
        .pod("a", "outside", "client")
        .namespace("demo")
        .ambient()
        .pod("b", "demo", "backend")
        .http_service("demo", "backend", BACKEND_PORT, BACKEND_PORT)
        .yaml(
            "credential",
            &WebPki::secret_yaml(INGRESS_NS, "bench-credential", &issued, None),
        )
        .yaml("ingress", &ingress_yaml())
        .log_filter(log)
        .build()
        .await
        .expect("virtual cluster");
    let backend = cluster.pod("backend");
    let served = Arc::new(AtomicU64::new(0));
    let _plain = serve_backend(backend, BACKEND_PORT, None, served.clone()).await;
    let _tls = serve_backend(
        backend,
        BACKEND_TLS_PORT,
        Some(server_config(&issued)),
        served.clone(),
    )
    .await;
    let ingress = cluster.ingress(INGRESS);
    let client = cluster.pod("client");

    let mut paths = vec![
        PathUnderTest {
            name: "direct".to_owned(),
            describe: "plain HTTP to the backend pod (no TLS, no proxy)".to_owned(),
            target: Target {
                addr: backend.addr(BACKEND_PORT),
                tls: None,
            },
            proxy: Vec::new(),
        },
        PathUnderTest {
            name: "direct-tls".to_owned(),
            describe: "HTTPS terminated by rustls in the backend (no proxy)".to_owned(),
            target: Target {
                addr: backend.addr(BACKEND_TLS_PORT),
                tls: Some(pki.clone()),
            },
            proxy: Vec::new(),
        },
        PathUnderTest {
            name: "ingress".to_owned(),
            describe: format!(
                "HTTPS -> waypoint gateway ({GATEWAY_WORKERS} tokio workers) -> HBONE -> \
                 ztunnel b -> backend"
            ),
            target: Target {
                addr: SocketAddr::new(ingress.ip(), HTTPS_PORT),
                tls: Some(pki.clone()),
            },
            proxy: vec![ingress.pid()],
        },
    ];
    // The gateway's listener follows the state: wait until it answers over HTTPS.
    let probe = paths[2].target.clone();
    let ready = eventually(Duration::from_secs(15), || {
        let (netns, probe) = (client.netns().open().unwrap(), probe.clone());
        async move {
            let shape = Shape::NewConnections {
                concurrency: 1,
                total: 1,
            };
            let cell = in_pod(netns, move || load(probe, shape, Duration::from_secs(5))).await;
            if cell.done == 1 { Ok(()) } else { Err(()) }
        }
    })
    .await;
    if ready.is_err() {
        panic!(
            "the ingress never answered https://{HOST}/ on {}\n{}",
            probe.addr,
            ingress.logs()
        );
    }

    let bench = Bench {
        client: client.netns().name().to_owned(),
        bench_pid: std::process::id(),
        ztunnel_b: cluster.node("b").pid(),
        concurrency: if concurrency.is_empty() {
            vec![1, 16]
        } else {
            concurrency
        },
        requests: env("BENCH_REQUESTS", 20_000).max(1),
        connections: env("BENCH_CONNECTIONS", 2_000).max(1),
        conn_concurrency: env("BENCH_CONN_CONCURRENCY", 4).max(1) as usize,
        limit: Duration::from_secs(env("BENCH_MAX_SECONDS", 30).max(1)),
    };
    let load_before = loadavg();
    // `BENCH_PATHS=ingress,nginx-w2` measures only those (e.g. to profile one of them).
    let only: Option<Vec<String>> = std::env::var("BENCH_PATHS")
        .ok()
        .map(|v| v.split(',').map(|p| p.trim().to_owned()).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|p| p == name));
    paths.retain(|p| wanted(&p.name));
    let mut results = Vec::new();
    for path in &paths {
        results.push(bench.path(path).await);
    }
    let nginx_note = match nginx_binary() {
        Err(reason) => {
            println!("nginx skipped: {reason}");
            format!("nginx skipped: {reason}")
        }
        Ok(binary) => {
            let nginx_pod = cluster.pod("nginx");
            // One nginx at a time: each configuration owns the pod's port while it is measured.
            for &workers in nginx_workers
                .iter()
                .filter(|w| wanted(&format!("nginx-w{w}")))
            {
                let started = Nginx::start(
                    &binary,
                    nginx_pod,
                    workers as usize,
                    backend.addr(BACKEND_PORT),
                    &issued,
                    access_log,
                )
                .await;
                let nginx = match started {
                    Ok(nginx) => nginx,
                    Err(e) => {
                        println!("nginx with {workers} workers skipped: {e}");
                        continue;
                    }
                };
                let path = PathUnderTest {
                    name: format!("nginx-w{workers}"),
                    describe: format!(
                        "HTTPS -> nginx (worker_processes {}, master_process on) -> plain \
                         HTTP/1.1, upstream keepalive -> ztunnel b (captured plaintext) -> \
                         backend",
                        nginx.workers
                    ),
                    target: Target {
                        addr: nginx_pod.addr(HTTPS_PORT),
                        tls: Some(pki.clone()),
                    },
                    proxy: nginx.pids(),
                };
                results.push(bench.path(&path).await);
                paths.push(path);
                drop(nginx);
            }
            format!("{} ({})", nginx_version(&binary), binary.display())
        }
    };
    let load_after = loadavg();

    let settings = Settings {
        log,
        nginx: nginx_note,
        load_before,
        load_after,
    };
    report(&bench, &paths, &results, &settings);
    println!(
        "backend answered {} requests in all",
        served.load(Ordering::Relaxed)
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// The report

struct Settings {
    log: &'static str,
    nginx: String,
    load_before: String,
    load_after: String,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn report(bench: &Bench, paths: &[PathUnderTest], results: &[Measured], settings: &Settings) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!(
        "Ingress benchmark: client pod (node a, outside the mesh) -> backend pod (node b, \
         ambient), GET / answered with {BODY_BYTES} bytes; closed loop, {} requests per cell \
         (at most {} s); {} new connections by {} workers; the client is one thread (hyper, \
         rustls/ring, resumption off for new connections)",
        bench.requests,
        bench.limit.as_secs(),
        bench.connections,
        bench.conn_concurrency
    );
    println!(
        "machine: {cpus} vCPUs ({}), load average {} before, {} after; proxies' RUST_LOG={}; {}",
        cpu_model(),
        settings.load_before,
        settings.load_after,
        settings.log,
        settings.nginx
    );
    for (path, measured) in paths.iter().zip(results) {
        println!(
            "  {:<11} {}; TLS: {}",
            path.name,
            path.describe,
            measured.new_connections.tls.as_deref().unwrap_or("none")
        );
    }

    let direct = results.iter().find(|m| m.name == "direct");
    println!();
    println!(
        "Keep-alive, {BODY_BYTES}-byte responses. CPU per request (us) from /proc/<pid>/stat \
         (10 ms ticks); busy: share of the {cpus} CPUs in use by the whole machine"
    );
    println!(
        "{:<12}{:<16}{:>9}{:>8}{:>9}{:>9}{:>8}{:>10}{:>11}{:>10}{:>7}",
        "path",
        "cell",
        "req/s",
        "x dir",
        "p50 us",
        "p99 us",
        "x dir",
        "proxy",
        "ztunnel b",
        "cl+back",
        "busy"
    );
    for m in results {
        for (label, cell) in &m.keep_alive {
            let base = direct
                .and_then(|d| d.keep_alive.iter().find(|(l, _)| l == label))
                .map(|(_, c)| c);
            let ratio = |f: fn(&Cell) -> f64| base.map_or(f64::NAN, |b| f(cell) / f(b));
            println!(
                "{:<12}{:<16}{:>9.0}{:>8.2}{:>9.0}{:>9.0}{:>8.2}{:>10}{:>11.1}{:>10.1}{:>6.0}%{}",
                m.name,
                label,
                cell.rate(),
                ratio(Cell::rate),
                cell.p50_us,
                cell.p99_us,
                ratio(|c| c.p99_us),
                proxy_cpu(m, cell),
                cell.cpu_us(2),
                cell.cpu_us(0),
                cell.machine_busy * 100.0,
                errors(cell)
            );
        }
    }

    println!();
    println!(
        "New connections: TCP connect + full TLS handshake + one request (direct: no TLS), \
         {} workers; latency of the whole; CPU per connection (us)",
        bench.conn_concurrency
    );
    println!(
        "{:<12}{:>9}{:>8}{:>9}{:>9}{:>10}{:>11}{:>10}{:>7}",
        "path", "conn/s", "x dir", "p50 us", "p99 us", "proxy", "ztunnel b", "cl+back", "busy"
    );
    for m in results {
        let cell = &m.new_connections;
        let ratio = direct.map_or(f64::NAN, |d| cell.rate() / d.new_connections.rate());
        println!(
            "{:<12}{:>9.0}{:>8.2}{:>9.0}{:>9.0}{:>10}{:>11.1}{:>10.1}{:>6.0}%{}",
            m.name,
            cell.rate(),
            ratio,
            cell.p50_us,
            cell.p99_us,
            proxy_cpu(m, cell),
            cell.cpu_us(2),
            cell.cpu_us(0),
            cell.machine_busy * 100.0,
            errors(cell)
        );
    }

    println!();
    println!(
        "Proxy memory (MiB), idle = before its first request, after = after its last; nginx: \
         master + workers (RSS counts their shared pages once per process, PSS shares them)"
    );
    println!(
        "{:<12}{:>10}{:>10}{:>10}{:>10}",
        "path", "RSS idle", "RSS after", "PSS idle", "PSS after"
    );
    let mib =
        |kib: Option<u64>| kib.map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
    for m in results.iter().filter(|m| m.idle.is_some()) {
        println!(
            "{:<12}{:>10}{:>10}{:>10}{:>10}",
            m.name,
            mib(m.idle.map(|x| x.0)),
            mib(m.after.map(|x| x.0)),
            mib(m.idle.map(|x| x.1)),
            mib(m.after.map(|x| x.1)),
        );
    }

    let Some(ingress) = results.iter().find(|m| m.name == "ingress") else {
        return;
    };
    for nginx in results.iter().filter(|m| m.name.starts_with("nginx")) {
        println!();
        println!(
            "ingress / {}: requests per proxy CPU-second (> 1: the ingress does more with a \
             CPU-second), p99 (< 1: the ingress is faster), and with ztunnel b's CPU added \
             (the HBONE end the ingress path makes it run; nginx's plaintext is captured too)",
            nginx.name
        );
        println!(
            "{:<16}{:>14}{:>14}{:>10}{:>10}{:>18}",
            "cell", "ingress/CPU-s", "nginx/CPU-s", "ratio", "p99 ratio", "ratio +ztunnel b"
        );
        let cells = ingress
            .keep_alive
            .iter()
            .map(|(l, c)| (l.clone(), c))
            .chain([("new connections".to_owned(), &ingress.new_connections)]);
        for (label, i) in cells {
            let n = if label == "new connections" {
                Some(&nginx.new_connections)
            } else {
                nginx
                    .keep_alive
                    .iter()
                    .find(|(l, _)| *l == label)
                    .map(|(_, c)| c)
            };
            let Some(n) = n else { continue };
            let per_cpu = |c: &Cell, with_ztunnel: bool| {
                let cpu = c.cpu[1] + if with_ztunnel { c.cpu[2] } else { 0.0 };
                c.done as f64 / cpu
            };
            println!(
                "{:<16}{:>14.0}{:>14.0}{:>10.2}{:>10.2}{:>18.2}",
                label,
                per_cpu(i, false),
                per_cpu(n, false),
                per_cpu(i, false) / per_cpu(n, false),
                i.p99_us / n.p99_us,
                per_cpu(i, true) / per_cpu(n, true),
            );
        }
    }
}

/// The proxy's CPU per request, or `-` for the direct paths.
fn proxy_cpu(m: &Measured, cell: &Cell) -> String {
    if m.idle.is_none() {
        "-".to_owned()
    } else {
        format!("{:.1}", cell.cpu_us(1))
    }
}

fn errors(cell: &Cell) -> String {
    if cell.errors == 0 {
        String::new()
    } else {
        format!("  ({} errors)", cell.errors)
    }
}
