//! The local mesh demo: no cluster, no root, nothing installed.
//!
//! It starts the mesh's CA (gRPC over TLS) and two real ztunnels (`ztunnel::app::build`, the
//! same code `ztunnel run` uses) as two "nodes" on loopback, loads the cluster from
//! `examples/demo/*.yaml`, and runs the backends `echo-v1` and `echo-v2` on node B. The client
//! pod `sleep` on node A sends HTTP requests to `echo.demo.svc.cluster.local` through node A's
//! ztunnel (its SOCKS5 port, since nothing is captured without root); ztunnel load-balances over
//! the service's endpoints and carries each request in an HBONE tunnel (HTTP/2 CONNECT over
//! mutual TLS 1.3) to node B. The demo prints what happened: requests per version, latency, the
//! identities node B verified (from its metrics), the protection of the hop, and the
//! certificates each node holds. Edit the YAML and run again to change the result.
//!
//! Run: `cargo run --release -p mesh-tests --bin mesh-demo -- [--requests N] [--config DIR]`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh::ca::CertificateAuthority;
use mesh::ca::{AllowAny, CaKeySource, CaMetrics, CaServer, CaService, CaServingNames};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use ztunnel::config::{CaConfig, CaptureMode, Config};

const TRUST_DOMAIN: &str = "cluster.local";
const SERVICE: &str = "echo.demo.svc.cluster.local";

struct Args {
    requests: usize,
    config: PathBuf,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut args = Args {
        requests: 200,
        config: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--requests" => {
                args.requests = it
                    .next()
                    .context("--requests needs a number")?
                    .parse()
                    .context("--requests must be a positive number")?;
                if args.requests == 0 {
                    bail!("--requests must be at least 1");
                }
            }
            "--config" => args.config = it.next().context("--config needs a directory")?.into(),
            "-h" | "--help" => {
                println!(
                    "usage: mesh-demo [--requests N (default 200)] [--config DIR (default examples/demo)]"
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

/// A minimal HTTP/1.1 backend that names its version.
async fn start_backend(addr: SocketAddr, name: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {name} on {addr}"))?;
    let body = format!("hello from {name}\n");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}

/// One request from `source` through SOCKS5 at `proxy` to the service; returns the response,
/// or the SOCKS5 reply code when the mesh refused.
async fn request(
    proxy: SocketAddr,
    source: std::net::IpAddr,
) -> anyhow::Result<Result<String, u8>> {
    let (mut s, code) =
        mesh_tests::socks5_connect(proxy, source, mesh_tests::Socks5Target::Name(SERVICE, 80))
            .await?;
    if code != 0 {
        return Ok(Err(code));
    }
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {SERVICE}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = String::new();
    s.read_to_string(&mut response).await?;
    Ok(Ok(response))
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

    // The cluster from the example YAML: pods, their IPs and the service.
    let state = {
        let writer = mesh::discovery::StoreWriter::new();
        let mut source = mesh::discovery::file::FileSource::new(
            mesh::discovery::file::FileSourceConfig::new(args.config.clone()),
            &mut Registry::default(),
        );
        source
            .load_once(&writer)
            .await
            .with_context(|| format!("loading {}", args.config.display()))?;
        writer.store().snapshot()
    };
    let client = state
        .workloads
        .values()
        .find(|w| w.node == "node-a")
        .context("the example YAML has no pod on node-a to send from")?
        .clone();
    for w in state.workloads.values().filter(|w| w.node == "node-b") {
        start_backend(SocketAddr::new(w.ips[0], 8080), &w.name).await?;
    }

    let node = |name: &str| Config {
        node_name: name.into(),
        trust_domain: TRUST_DOMAIN.into(),
        cluster_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        config_path: args.config.clone(),
        ca: CaConfig {
            address: ca_addr.to_string(),
            root_cert: root.clone(),
            server_name: Some("localhost".into()),
            token_file: None,
        },
        capture: CaptureMode::None,
        probe_sources: vec![],
        admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        readiness_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        socks5_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        drain_deadline: Duration::from_secs(1),
        workload_cert_ttl: Duration::from_secs(3600),
    };
    let a = ztunnel::app::build(node("node-a"), None)
        .await
        .context("starting ztunnel node-a")?;
    let b = ztunnel::app::build(node("node-b"), None)
        .await
        .context("starting ztunnel node-b")?;
    for (name, bound) in [("node-a", &a), ("node-b", &b)] {
        let ready = async {
            while !http_get(bound.readiness_addr, "/healthz/ready")
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

    println!(
        "Ambient mesh demo: local, no cluster (config {})",
        args.config.display()
    );
    println!("  CA       {ca_addr} (gRPC over TLS, trust domain {TRUST_DOMAIN})");
    println!(
        "  node-a   ztunnel, client pod {} ({})",
        client.name, client.ips[0]
    );
    println!(
        "  node-b   ztunnel, pods {}",
        state
            .workloads
            .values()
            .filter(|w| w.node == "node-b")
            .map(|w| format!("{} ({})", w.name, w.ips[0]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  sending {} requests to http://{SERVICE}/", args.requests);
    println!();

    let socks = a.socks5_addr.context("node-a has no SOCKS5 listener")?;
    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(args.requests);
    let mut refused = 0usize;
    let mut failed = 0usize;
    let started = Instant::now();
    for i in 0..args.requests {
        let t = Instant::now();
        match request(socks, client.ips[0]).await {
            Ok(Ok(body)) if body.starts_with("HTTP/1.1 200") => {
                let who = body
                    .lines()
                    .last()
                    .and_then(|l| l.strip_prefix("hello from "))
                    .unwrap_or("?")
                    .to_owned();
                *per_backend.entry(who).or_default() += 1;
                latencies.push(t.elapsed());
            }
            Ok(Err(_)) => refused += 1,
            Ok(Ok(body)) => {
                failed += 1;
                eprintln!(
                    "\nunexpected response: {}",
                    body.lines().next().unwrap_or("")
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("\nrequest failed: {e:#}");
            }
        }
        progress(i + 1, args.requests);
    }
    let elapsed = started.elapsed();
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }

    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "Requests: {} in {:.2} s, {} answered, {refused} refused by policy, {failed} failed",
        args.requests,
        elapsed.as_secs_f64(),
        latencies.len()
    );
    for (backend, count) in &per_backend {
        println!(
            "  {backend:<10} {count:>5} ({:.0}%)",
            *count as f64 * 100.0 / args.requests as f64
        );
    }
    println!(
        "Latency: p50 {}  p90 {}  p99 {}",
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );

    // What node B saw, from its Istio metrics.
    let metrics = http_get(b.metrics_addr, "/metrics").await?;
    println!(
        "Seen by node-b's ztunnel (istio_tcp_connections_opened_total, reporter=destination):"
    );
    for line in metrics.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total{")
            && l.contains("reporter=\"destination\"")
    }) {
        let count = line.rsplit(' ').next().unwrap_or("?");
        println!(
            "  {} <- {}  {}  ({count} connections)",
            label(line, "destination_workload").unwrap_or("?"),
            label(line, "source_principal").unwrap_or("?"),
            match label(line, "connection_security_policy") {
                Some("mutual_tls") => "mutual TLS 1.3 (HBONE)",
                Some(other) => other,
                None => "?",
            },
        );
    }
    for line in metrics.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_failed_total{")
            && l.contains("response_flags=\"RBAC\"")
    }) {
        println!(
            "  {} refused {} by policy ({} connections)",
            label(line, "destination_workload").unwrap_or("?"),
            label(line, "source_principal").unwrap_or("?"),
            line.rsplit(' ').next().unwrap_or("?")
        );
    }
    println!("Certificates (from each node's /config_dump):");
    for (name, bound) in [("node-a", &a), ("node-b", &b)] {
        let dump: serde_json::Value =
            serde_json::from_str(&http_get(bound.admin_addr, "/config_dump").await?)?;
        for c in dump["certificates"].as_array().into_iter().flatten() {
            println!(
                "  {name}  {:<45} {} serial {}",
                c["identity"].as_str().unwrap_or("?"),
                c["state"].as_str().unwrap_or("?"),
                c["serial"].as_str().unwrap_or("-")
            );
        }
    }

    a.shutdown_trigger().cancel();
    b.shutdown_trigger().cancel();
    a.wait().await?;
    b.wait().await?;
    stop.cancel();
    if failed > 0 {
        bail!("{failed} of {} requests failed", args.requests);
    }
    Ok(())
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
