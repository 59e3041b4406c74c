//! The local mesh demo: no cluster, no root, nothing installed.
//!
//! It starts the mesh's CA (gRPC over TLS), two real ztunnels (`ztunnel::app::build`, the same
//! code `ztunnel run` uses) as two "nodes", a waypoint and an ingress gateway
//! (`waypoint::app::build`, as `waypoint run` and `waypoint gateway`) on loopback, loads the
//! cluster and its traffic rules from `examples/demo/*.yaml`, and runs the backends `echo-v1`
//! and `echo-v2` on node B. The requests come from outside the mesh: HTTPS to the ingress
//! gateway (`https://echo.example.com:8443`, on the gateway pod's loopback address, with a
//! certificate made at start), which terminates TLS, routes by the Istio `Gateway` and the
//! `VirtualService` bound to it, and, because the namespace carries
//! `istio.io/ingress-use-waypoint`, carries each request over HBONE (HTTP/2 CONNECT over mutual
//! TLS 1.3) to the waypoint. The waypoint applies the VirtualService (a 90/10 canary and a 3 s
//! delay for half of the requests) and the DestinationRule's subsets, then opens HBONE to the
//! chosen pod's ztunnel on node B. `--from-pod` sends from the mesh pod `sleep` on node A
//! instead, through node A's ztunnel (its SOCKS5 port, since nothing is captured without root).
//! The demo prints the `curl` command that reaches the gateway while it is up (`--serve` keeps
//! it up until Ctrl-C), then what happened: requests per version, the latency distribution with
//! the injected delay, the identities each hop verified (from the proxies' Istio metrics), and
//! the certificates. Edit the YAML and run again to change the result.
//!
//! Run: `cargo run --release -p mesh-tests --bin mesh-demo -- [--requests N] [--concurrency C]
//! [--config DIR] [--from-pod] [--serve]`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use mesh::ca::CertificateAuthority;
use mesh::ca::{AllowAny, CaKeySource, CaMetrics, CaServer, CaService, CaServingNames};
use mesh::ops::CaConfig;
use mesh_tests::vcluster::http::{HttpClient, HttpVersion};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use ztunnel::config::{CaptureMode, Config};

const TRUST_DOMAIN: &str = "cluster.local";
const SERVICE: &str = "echo.demo.svc.cluster.local";

struct Args {
    requests: usize,
    concurrency: usize,
    config: PathBuf,
    /// Send from the mesh pod `sleep` (SOCKS5 into node A's ztunnel), not through the ingress.
    from_pod: bool,
    /// Stay up after the run, until Ctrl-C, for the printed `curl` command.
    serve: bool,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut args = Args {
        requests: 100,
        concurrency: 20,
        config: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo"),
        from_pod: false,
        serve: false,
    };
    let positive = |value: Option<String>, flag: &str| -> anyhow::Result<usize> {
        let n: usize = value
            .with_context(|| format!("{flag} needs a number"))?
            .parse()
            .with_context(|| format!("{flag} must be a positive number"))?;
        if n == 0 {
            bail!("{flag} must be at least 1");
        }
        Ok(n)
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--requests" => args.requests = positive(it.next(), "--requests")?,
            "--concurrency" => args.concurrency = positive(it.next(), "--concurrency")?,
            "--config" => args.config = it.next().context("--config needs a directory")?.into(),
            "--from-pod" => args.from_pod = true,
            "--serve" => args.serve = true,
            "-h" | "--help" => {
                println!(
                    "usage: mesh-demo [--requests N (default 100)] [--concurrency C (default 20)] \
                     [--config DIR (default examples/demo)] [--from-pod (send from the mesh pod \
                     sleep, not through the ingress gateway)] [--serve (stay up after the run, \
                     until Ctrl-C)]"
                );
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}; try --help"),
        }
    }
    Ok(Some(args))
}

fn main() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,access=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// A minimal HTTP/1.1 keep-alive backend that names its pod and version.
async fn start_backend(addr: SocketAddr, name: &str, version: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {name} on {addr}"))?;
    let body = Bytes::from(format!("hello from {name}\n"));
    let version = version.to_owned();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            let version = version.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let response = http::Response::builder()
                        .header("content-type", "text/plain")
                        .header("x-version", version.as_str())
                        .body(http_body_util::Full::new(body.clone()));
                    async move { response }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// The value of `label` in a Prometheus sample line.
fn label<'a>(line: &'a str, label: &str) -> Option<&'a str> {
    let start = line.find(&format!("{label}=\""))? + label.len() + 2;
    let end = line[start..].find('"')? + start;
    Some(&line[start..end])
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    /// By `x-version` (or status, for answers the waypoint made).
    answers: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
    latencies: Vec<Duration>,
    failed: Vec<String>,
}

/// Where the demo's requests enter the mesh.
#[derive(Clone)]
enum Entry {
    /// HTTPS to the ingress gateway at `addr`; `host` is the SNI and `Host`.
    Ingress {
        addr: SocketAddr,
        host: String,
        tls: Arc<rustls::ClientConfig>,
    },
    /// The mesh pod `sleep` at `source`: SOCKS5 into node A's ztunnel.
    Pod {
        socks: SocketAddr,
        source: std::net::IpAddr,
    },
}

impl Entry {
    /// A keep-alive HTTP/1.1 client on a new connection.
    async fn connect(&self) -> Result<HttpClient, String> {
        match self {
            Entry::Ingress { addr, host, tls } => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connecting to the ingress gateway {addr}: {e}"))?;
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("{host}: {e}"))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with the ingress gateway {addr}: {e}"))?;
                HttpClient::on(stream, host.clone(), HttpVersion::Http1)
                    .await
                    .map_err(|e| format!("HTTP handshake: {e}"))
            }
            Entry::Pod { socks, source } => {
                match mesh_tests::socks5_connect(
                    *socks,
                    *source,
                    mesh_tests::Socks5Target::Name(SERVICE, 80),
                )
                .await
                {
                    Ok((stream, 0)) => {
                        HttpClient::on(stream, SERVICE.to_owned(), HttpVersion::Http1)
                            .await
                            .map_err(|e| format!("HTTP handshake: {e}"))
                    }
                    Ok((_, code)) => Err(format!("SOCKS5 refused: code {code}")),
                    Err(e) => Err(format!("SOCKS5: {e}")),
                }
            }
        }
    }

    /// The URL the requests go to.
    fn url(&self) -> String {
        match self {
            Entry::Ingress { addr, host, .. } => format!("https://{host}:{}/", addr.port()),
            Entry::Pod { .. } => format!("http://{SERVICE}/"),
        }
    }
}

/// One client connection (reopened after a failure): HTTP/1.1 keep-alive requests through
/// `entry`, `count` of them.
async fn worker(entry: Entry, count: usize, done: Arc<AtomicUsize>, total: usize) -> Tally {
    let mut tally = Tally::default();
    let mut client = None;
    for _ in 0..count {
        if client.is_none() {
            match entry.connect().await {
                Ok(c) => client = Some(c),
                Err(e) => tally.failed.push(e),
            }
        }
        if let Some(c) = client.as_mut() {
            let started = Instant::now();
            match c.send("GET", "/", &[], Bytes::new()).await {
                Ok(answer) => {
                    tally.latencies.push(started.elapsed());
                    *tally.statuses.entry(answer.status).or_default() += 1;
                    let who = match answer.version() {
                        "" => format!("HTTP {} from the waypoint", answer.status),
                        v => format!("echo-{v}"),
                    };
                    *tally.answers.entry(who).or_default() += 1;
                }
                Err(e) => {
                    tally.failed.push(format!("request: {e}"));
                    client = None;
                }
            }
        }
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        progress(n, total);
    }
    tally
}

/// The demo's ingress gateway, from the example YAML: a pod labelled `istio: ingress` and the
/// first HTTPS server (with a `credentialName`) of a Gateway that selects it.
struct IngressPlan {
    pod: Arc<mesh::model::Workload>,
    port: u16,
    host: String,
    gateway: String,
    credential: String,
}

fn ingress_plan(state: &mesh::model::State) -> Option<IngressPlan> {
    let pod = state
        .workloads
        .values()
        .find(|w| w.labels.get("istio").map(String::as_str) == Some("ingress"))?;
    state
        .ingress_gateways
        .iter()
        .filter(|g| g.selects(&pod.labels))
        .flat_map(|g| g.servers.iter().map(move |s| (g, s)))
        .find_map(|(g, server)| {
            let credential = server.tls.as_ref()?.credential.clone()?;
            let host = server.hosts.iter().find(|h| !h.host.contains('*'))?;
            (server.protocol == mesh::model::ServerProtocol::Https).then(|| IngressPlan {
                pod: pod.clone(),
                port: server.port,
                host: host.host.clone(),
                gateway: g.key(),
                credential,
            })
        })
}

/// `config` (a directory of YAML, or one file) seen through `dir`: a link to each of its files
/// (so edits reach the running proxies) and `extra` files written beside them.
fn config_overlay(
    config: &std::path::Path,
    dir: &std::path::Path,
    extra: &[(&str, String)],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = config
        .canonicalize()
        .with_context(|| format!("reading {}", config.display()))?;
    let files: Vec<PathBuf> = if config.is_dir() {
        std::fs::read_dir(&config)
            .with_context(|| format!("listing {}", config.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?
    } else {
        vec![config.clone()]
    };
    for file in files {
        let Some(name) = file.file_name() else {
            continue;
        };
        std::os::unix::fs::symlink(&file, dir.join(name))
            .with_context(|| format!("linking {}", file.display()))?;
    }
    for (name, text) in extra {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

/// Reads the state the proxies will start from.
async fn load_state(config: &std::path::Path) -> anyhow::Result<Arc<mesh::model::State>> {
    let writer = mesh::discovery::StoreWriter::new();
    let mut source = mesh::discovery::file::FileSource::new(
        mesh::discovery::file::FileSourceConfig::new(config.to_owned()),
        &mut Registry::default(),
    );
    let report = source
        .load_once(&writer)
        .await
        .with_context(|| format!("loading {}", config.display()))?;
    for rejected in &report.rejected {
        eprintln!("warning: {rejected}");
    }
    Ok(writer.store().snapshot())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    // The CA, as `ztunnel ca` runs it.
    let authority = CertificateAuthority::load(
        &CaKeySource::Directory(work.path().join("ca")),
        TRUST_DOMAIN,
    )?;
    let root = work.path().join("ca/root-cert.pem");
    let mut ca_registry = Registry::default();
    let ca = CaServer::bind(
        "127.0.0.1:0".parse()?,
        CaService::new(
            Arc::new(authority),
            Arc::new(AllowAny),
            CaMetrics::new(&mut ca_registry),
        ),
        &CaServingNames::default(),
    )
    .await?;
    let ca_addr = ca.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(ca.run(stop.clone().cancelled_owned()));
    let ca_config = CaConfig {
        address: ca_addr.to_string(),
        root_cert: root.clone(),
        server_name: Some("localhost".into()),
        token_file: None,
        request_timeout: mesh::ops::DEFAULT_CA_REQUEST_TIMEOUT,
    };

    // The cluster from the example YAML: pods, their IPs, the service, its waypoint and the
    // ingress gateway. The proxies read it through an overlay directory that adds the gateway's
    // certificate, made now by a CA of the demo's own (the one `curl --cacert` trusts).
    let state = load_state(&args.config).await?;
    let ingress_plan = ingress_plan(&state).filter(|_| !args.from_pod);
    let config_dir = work.path().join("config");
    let web_pki = mesh_tests::WebPki::new("mesh-demo ingress CA");
    let ca_file = work.path().join("ingress-ca.crt");
    std::fs::write(&ca_file, &web_pki.ca_pem)?;
    let mut extra = Vec::new();
    if let Some(plan) = &ingress_plan {
        extra.push((
            "zz-ingress-credential.yaml",
            mesh_tests::WebPki::secret_yaml(
                &plan.pod.namespace,
                &plan.credential,
                &web_pki.server(&[&plan.host]),
                None,
            ),
        ));
    }
    config_overlay(&args.config, &config_dir, &extra)?;
    let client = state
        .workloads
        .values()
        .find(|w| w.node == "node-a" && w.name == "sleep")
        .context("the example YAML has no pod `sleep` on node-a to send from")?
        .clone();
    let service = state
        .services
        .get("demo/echo")
        .context("the example YAML has no service demo/echo")?
        .clone();
    for w in state.workloads.values().filter(|w| w.node == "node-b") {
        start_backend(
            SocketAddr::new(w.ips[0], 8080),
            &w.name,
            &w.canonical_revision,
        )
        .await?;
    }
    let any = SocketAddr::from(([127, 0, 0, 1], 0));

    let node = |name: &str| Config {
        node_name: name.into(),
        trust_domain: TRUST_DOMAIN.into(),
        cluster_id: mesh::ops::DEFAULT_CLUSTER_ID.into(),
        cluster_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        config_path: config_dir.clone(),
        ca: ca_config.clone(),
        capture: CaptureMode::None,
        probe_sources: vec![],
        admin_addr: any,
        metrics_addr: any,
        readiness_addr: any,
        socks5_addr: Some(any),
        operator: Default::default(),
        drain_deadline: Duration::from_secs(1),
        workload_cert_ttl: Duration::from_secs(3600),
        dns: Default::default(),
        hbone: Default::default(),
    };
    let a = ztunnel::app::build(node("node-a"), None)
        .await
        .context("starting ztunnel node-a")?;
    let b = ztunnel::app::build(node("node-b"), None)
        .await
        .context("starting ztunnel node-b")?;

    // A waypoint or ingress gateway `name` for `pod`, configured as `waypoint run` / `waypoint
    // gateway` would be, on loopback ports the OS picks.
    let proxy = |name: mesh::model::WaypointRef,
                 pod: &mesh::model::Workload,
                 hbone_addr: SocketAddr,
                 ingress: Option<waypoint::config::IngressConfig>|
     -> anyhow::Result<waypoint::config::Config> {
        Ok(waypoint::config::Config {
            waypoint: name,
            identity: mesh::identity::Identity::new(
                TRUST_DOMAIN,
                &pod.namespace,
                &pod.service_account,
            )?,
            trust_domain: TRUST_DOMAIN.into(),
            cluster_id: mesh::ops::DEFAULT_CLUSTER_ID.into(),
            cluster_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            config_path: config_dir.clone(),
            ca: ca_config.clone(),
            hbone_addr,
            admin_addr: any,
            metrics_addr: any,
            readiness_addr: any,
            operator: Default::default(),
            drain_deadline: Duration::from_secs(1),
            workload_cert_ttl: Duration::from_secs(3600),
            protocol_detection_timeout: None,
            hbone: Default::default(),
            ingress,
        })
    };
    // The waypoint, if the service uses one: on its pod's IP, as in a cluster.
    let waypoint = match &service.waypoint {
        None => None,
        Some(waypoint) => {
            let pod = state
                .workloads
                .values()
                .find(|w| {
                    w.namespace == waypoint.namespace
                        && w.labels.get("gateway.networking.k8s.io/gateway-name")
                            == Some(&waypoint.name)
                })
                .with_context(|| format!("no pod for waypoint {waypoint} in the example YAML"))?;
            let config = proxy(
                waypoint.clone(),
                pod,
                SocketAddr::new(pod.ips[0], mesh::hbone::HBONE_PORT),
                None,
            )?;
            Some(
                waypoint::app::build(config, None)
                    .await
                    .context("starting the waypoint")?,
            )
        }
    };
    // The ingress gateway, as `waypoint gateway` runs it: listening on its pod's address.
    let ingress = match &ingress_plan {
        None => None,
        Some(plan) => {
            let pod = &plan.pod;
            let name = mesh::model::WaypointRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            };
            let config = proxy(
                name,
                pod,
                any,
                Some(waypoint::config::IngressConfig {
                    labels: pod.labels.clone(),
                    bind: pod.ips[0],
                    class: mesh::model::translate::DEFAULT_INGRESS_GATEWAY_CLASS.to_owned(),
                }),
            )?;
            Some(
                waypoint::app::build(config, None)
                    .await
                    .context("starting the ingress gateway")?,
            )
        }
    };
    let mut readiness = vec![("node-a", a.readiness_addr), ("node-b", b.readiness_addr)];
    if let Some(w) = &waypoint {
        readiness.push(("waypoint", w.readiness_addr));
    }
    if let Some(i) = &ingress {
        readiness.push(("ingress gateway", i.readiness_addr));
    }
    for (name, addr) in readiness {
        let ready = async {
            while !http_get(addr, "/healthz/ready")
                .await
                .unwrap_or_default()
                .starts_with("ready")
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .with_context(|| format!("{name} did not become ready"))?;
    }

    let entry = match &ingress_plan {
        Some(plan) => Entry::Ingress {
            addr: SocketAddr::new(plan.pod.ips[0], plan.port),
            host: plan.host.clone(),
            tls: web_pki.client_config(&[b"http/1.1"], None),
        },
        None => Entry::Pod {
            socks: a.socks5_addr.context("node-a has no SOCKS5 listener")?,
            source: client.ips[0],
        },
    };
    if let Entry::Ingress { addr, .. } = &entry {
        // Its listeners follow the state: the port opens once the Gateway is applied.
        let open = async {
            while TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), open)
            .await
            .with_context(|| format!("the ingress gateway never listened on {addr}"))?;
    }

    println!(
        "Ambient mesh demo: local, no cluster (config {})",
        args.config.display()
    );
    println!("  CA        {ca_addr} (gRPC over TLS, trust domain {TRUST_DOMAIN})");
    println!(
        "  node-a    ztunnel, client pod {} ({})",
        client.name, client.ips[0]
    );
    match (&waypoint, &service.waypoint) {
        (Some(w), Some(name)) => println!(
            "  waypoint  {name} on {} (VirtualService and DestinationRule for {SERVICE})",
            w.hbone_addr
                .map_or_else(|| "-".to_owned(), |a| a.to_string())
        ),
        _ => println!("  waypoint  none: {SERVICE} does not use one"),
    }
    println!(
        "  node-b    ztunnel, pods {}",
        state
            .workloads
            .values()
            .filter(|w| w.node == "node-b")
            .map(|w| format!("{} ({})", w.name, w.ips[0]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let (Some(plan), Entry::Ingress { addr, .. }) = (&ingress_plan, &entry) {
        println!(
            "  ingress   {}/{} on {addr} (Gateway {}: HTTPS for {}, a certificate made at \
             start; then {})",
            plan.pod.namespace,
            plan.pod.name,
            plan.gateway,
            plan.host,
            match state.ingress_waypoint(&service) {
                Some(waypoint) => format!("through the waypoint {waypoint}"),
                None => "straight to the pods".to_owned(),
            }
        );
        println!(
            "  try it    curl --resolve {host}:{port}:{ip} --cacert {ca} https://{host}:{port}/ \
             (while the demo is up; --serve keeps it up)",
            host = plan.host,
            port = addr.port(),
            ip = addr.ip(),
            ca = ca_file.display()
        );
    }
    println!(
        "  sending {} requests to {} on {} keep-alive connections",
        args.requests,
        entry.url(),
        args.concurrency.min(args.requests)
    );
    println!();

    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let workers = args.concurrency.min(args.requests);
    let mut tasks = Vec::new();
    for i in 0..workers {
        let count = args.requests / workers + usize::from(i < args.requests % workers);
        tasks.push(tokio::spawn(worker(
            entry.clone(),
            count,
            done.clone(),
            args.requests,
        )));
    }
    let mut tally = Tally::default();
    for task in tasks {
        let t = task.await?;
        for (k, v) in t.answers {
            *tally.answers.entry(k).or_default() += v;
        }
        for (k, v) in t.statuses {
            *tally.statuses.entry(k).or_default() += v;
        }
        tally.latencies.extend(t.latencies);
        tally.failed.extend(t.failed);
    }
    let elapsed = started.elapsed();
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    report(&args, &tally, elapsed);

    // What each hop verified, from the proxies' own Istio metrics.
    println!(
        "Hops (each is HBONE: HTTP/2 CONNECT over mutual TLS 1.3, from the proxies' metrics):"
    );
    if let Some(i) = &ingress {
        let metrics = http_get(i.metrics_addr, "/metrics").await?;
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
        {
            println!(
                "  ingress saw  an outside client -> {}  HTTPS  HTTP {} {}  ({} requests)",
                label(line, "destination_service").unwrap_or("?"),
                label(line, "response_code").unwrap_or("?"),
                label(line, "response_flags").unwrap_or("-"),
                line.rsplit(' ').next().unwrap_or("?")
            );
        }
    }
    if let Some(w) = &waypoint {
        let metrics = http_get(w.metrics_addr, "/metrics").await?;
        let mut lines: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{") && l.contains("reporter=\"waypoint\"")
            })
            .collect();
        lines.sort_by_key(|l| {
            (
                label(l, "destination_workload"),
                label(l, "response_code"),
                label(l, "response_flags"),
            )
        });
        for line in lines {
            println!(
                "  waypoint saw {} -> {}  {}  HTTP {} {}  ({} requests)",
                label(line, "source_principal").unwrap_or("?"),
                label(line, "destination_workload").unwrap_or("?"),
                security(label(line, "connection_security_policy")),
                label(line, "response_code").unwrap_or("?"),
                label(line, "response_flags").unwrap_or("-"),
                line.rsplit(' ').next().unwrap_or("?")
            );
        }
    }
    let metrics = http_get(b.metrics_addr, "/metrics").await?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total{")
            && l.contains("reporter=\"destination\"")
    }) {
        println!(
            "  node-b saw  {} -> {}  {}  ({} connections)",
            label(line, "source_principal").unwrap_or("?"),
            label(line, "destination_workload").unwrap_or("?"),
            security(label(line, "connection_security_policy")),
            line.rsplit(' ').next().unwrap_or("?")
        );
    }
    println!("Certificates (from each proxy's /config_dump):");
    let mut admins = vec![("node-a", a.admin_addr), ("node-b", b.admin_addr)];
    if let Some(w) = &waypoint {
        admins.push(("waypoint", w.admin_addr));
    }
    if let Some(i) = &ingress {
        admins.push(("ingress", i.admin_addr));
    }
    for (name, addr) in admins {
        let dump: serde_json::Value = serde_json::from_str(&http_get(addr, "/config_dump").await?)?;
        for c in dump["certificates"].as_array().into_iter().flatten() {
            println!(
                "  {name:<9} {:<56} {} serial {}",
                c["identity"].as_str().unwrap_or("?"),
                c["state"].as_str().unwrap_or("?"),
                c["serial"].as_str().unwrap_or("-")
            );
        }
    }

    if args.serve {
        // Registered before the line that invites the signal.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        println!();
        println!("Up until Ctrl-C: the curl command above reaches the gateway.");
        interrupt.recv().await;
    }

    // The gateway and the waypoint first: their pooled tunnels close with them.
    if let Some(i) = ingress {
        i.shutdown_trigger().cancel();
        i.wait().await?;
    }
    if let Some(w) = waypoint {
        w.shutdown_trigger().cancel();
        w.wait().await?;
    }
    a.shutdown_trigger().cancel();
    b.shutdown_trigger().cancel();
    a.wait().await?;
    b.wait().await?;
    stop.cancel();
    if !tally.failed.is_empty() {
        bail!(
            "{} of {} requests failed: {}",
            tally.failed.len(),
            args.requests,
            tally.failed[0]
        );
    }
    Ok(())
}

fn security(policy: Option<&str>) -> &'static str {
    match policy {
        Some("mutual_tls") => "mutual TLS",
        Some(_) => "PLAINTEXT",
        None => "?",
    }
}

/// The summary: answers per version, statuses, and the latency distribution.
fn report(args: &Args, tally: &Tally, elapsed: Duration) {
    let answered: u64 = tally.statuses.values().sum();
    let ok = tally.statuses.get(&200).copied().unwrap_or(0);
    println!(
        "Requests: {} in {:.2} s: {ok} answered 200, {} answered otherwise, {} failed",
        args.requests,
        elapsed.as_secs_f64(),
        answered - ok,
        tally.failed.len()
    );
    for (who, count) in &tally.answers {
        println!(
            "  {who:<10} {count:>5} ({:.0}%)",
            *count as f64 * 100.0 / args.requests as f64
        );
    }
    let mut sorted = tally.latencies.clone();
    sorted.sort();
    let pct = |p: f64| {
        sorted
            .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
            .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "Latency: p50 {}  p90 {}  p99 {}  max {}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    let buckets: [(&str, Duration, Duration); 5] = [
        ("< 10 ms", Duration::ZERO, Duration::from_millis(10)),
        (
            "10-100 ms",
            Duration::from_millis(10),
            Duration::from_millis(100),
        ),
        (
            "0.1-1 s",
            Duration::from_millis(100),
            Duration::from_secs(1),
        ),
        ("1-3 s", Duration::from_secs(1), Duration::from_secs(3)),
        (">= 3 s", Duration::from_secs(3), Duration::MAX),
    ];
    let total = sorted.len().max(1);
    for (name, low, high) in buckets {
        let n = sorted.iter().filter(|d| **d >= low && **d < high).count();
        println!(
            "  {name:<10} {:<40} {n:>5} ({:.0}%)",
            "#".repeat(n * 40 / total),
            n as f64 * 100.0 / total as f64
        );
    }
}

/// A progress bar on stderr, only when a person is watching it.
fn progress(done: usize, total: usize) {
    use std::io::IsTerminal;
    const WIDTH: usize = 40;
    if !std::io::stderr().is_terminal() {
        return;
    }
    let filled = done * WIDTH / total;
    eprint!(
        "\r  [{}{}] {done}/{total}",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    );
}
