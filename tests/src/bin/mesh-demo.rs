//! The local mesh demo: no cluster, no root, nothing installed.
//!
//! It starts the mesh's CA (gRPC over TLS), two "nodes" on two loopback addresses, each with its
//! own certificate manager fetching workload certificates from that CA, and two versions of an
//! HTTP backend on node B. A client workload on node A sends requests to the backends through
//! HBONE tunnels (HTTP/2 CONNECT over mutual TLS 1.3), spread over both endpoints, and the demo
//! prints what happened: requests per version, latency, the identity each backend's node saw,
//! the TLS parameters of every hop, and how many pooled connections carried the tunnels.
//!
//! Run: `cargo run --release -p mesh-tests --bin mesh-demo -- [--requests N]`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh::ca::{
    AllowAny, CaClientConfig, CaKeySource, CaMetrics, CaServer, CaService, CaServingNames,
    CertificateAuthority, GrpcCaClient, TokenSource,
};
use mesh::cert_manager::{CertManager, CertManagerConfig};
use mesh::hbone::server::{ManagedCertificate, TlsSummary};
use mesh::hbone::{
    ClientConfig, ConnectRequest, HboneAuthority, HboneClient, HboneServer, InboundTunnel,
    ServerConfig, forwarded_header, headers,
};
use mesh::identity::Identity;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const TRUST_DOMAIN: &str = "cluster.local";
const NODE_A: &str = "127.0.0.1";
const NODE_B: &str = "127.0.0.2";

/// What node B's inbound saw, per backend.
#[derive(Default)]
struct Seen {
    identities: BTreeMap<String, BTreeMap<String, u64>>,
    tls: BTreeMap<String, u64>,
}

fn main() -> anyhow::Result<()> {
    let mut requests = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--requests" => {
                requests = args
                    .next()
                    .context("--requests needs a number")?
                    .parse()
                    .context("--requests must be a positive number")?;
                if requests == 0 {
                    bail!("--requests must be at least 1");
                }
            }
            "-h" | "--help" => {
                println!("usage: mesh-demo [--requests N]   (default 200)");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}; try --help"),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(requests))
}

async fn run(requests: usize) -> anyhow::Result<()> {
    let ca_dir = tempfile::tempdir()?;
    let id = |ns: &str, sa: &str| Identity::new(TRUST_DOMAIN, ns, sa);
    let client_id = id("demo", "sleep")?;
    let backends = [
        ("v1", id("demo", "echo-v1")?),
        ("v2", id("demo", "echo-v2")?),
    ];

    // The CA, as `ztunnel ca` runs it.
    let authority =
        CertificateAuthority::load(&CaKeySource::Directory(ca_dir.path().into()), TRUST_DOMAIN)?;
    let root_pem = authority.root_pem().to_owned();
    let mut ca_registry = Registry::default();
    let ca = CaServer::bind(
        format!("{NODE_A}:0").parse()?,
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
    let cert_manager = || -> anyhow::Result<CertManager> {
        let client = GrpcCaClient::new(CaClientConfig {
            address: ca_addr.to_string(),
            root_cert_pem: root_pem.clone(),
            server_name: Some("localhost".into()),
            token: TokenSource::None,
            impersonate: true,
            timeout: Duration::from_secs(5),
        })?;
        Ok(CertManager::new(
            Arc::new(client),
            CertManagerConfig::default(),
            &mut Registry::default(),
        ))
    };

    // Node B: two backend versions and an HBONE inbound per backend identity.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let node_b_certs = cert_manager()?;
    let mut endpoints = Vec::new();
    for (version, identity) in &backends {
        let backend = start_backend(version).await?;
        let server = HboneServer::bind(
            format!("{NODE_B}:0").parse()?,
            ServerConfig::default(),
            Arc::new(ManagedCertificate {
                manager: node_b_certs.clone(),
                identity: identity.clone(),
            }),
        )
        .await
        .with_context(|| {
            format!("binding {NODE_B}: does this system route all of 127.0.0.0/8 to loopback?")
        })?;
        let hbone_addr = server.local_addr();
        let seen = seen.clone();
        let name = format!("echo-{version}");
        tokio::spawn(server.run(stop.clone(), move |tunnel: InboundTunnel| {
            let (seen, name) = (seen.clone(), name.clone());
            async move {
                {
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    *s.identities
                        .entry(name)
                        .or_default()
                        .entry(tunnel.peer_identity.to_string())
                        .or_default() += 1;
                    *s.tls.entry(describe_tls(&tunnel.tls)).or_default() += 1;
                }
                inbound(tunnel, backend).await;
            }
        }));
        endpoints.push((version.to_string(), identity.clone(), hbone_addr, backend));
    }

    // Node A: the client workload's outbound, through pooled HBONE.
    let node_a_certs = cert_manager()?;
    let client = HboneClient::new(ClientConfig::default(), Arc::new(node_a_certs.clone()));

    println!("Ambient mesh demo: local, no cluster");
    println!("  CA         {ca_addr} (gRPC over TLS, trust domain {TRUST_DOMAIN})");
    println!("  node A     {NODE_A}  client workload {client_id}");
    for (version, identity, hbone, backend) in &endpoints {
        println!("  node B     {hbone}  HBONE -> echo-{version} at {backend} ({identity})");
    }
    println!();

    let mut per_version: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(requests);
    let mut failures = 0usize;
    let started = Instant::now();
    for i in 0..requests {
        let (version, identity, hbone, backend) = &endpoints[i % endpoints.len()];
        let t = Instant::now();
        let source_addr: SocketAddr = format!("{NODE_A}:{}", 40000 + (i % 20000)).parse()?;
        let mut request_headers = http::HeaderMap::new();
        request_headers.insert(
            headers::FORWARDED,
            forwarded_header(source_addr, Some("echo.demo.svc.cluster.local")).parse()?,
        );
        let result = async {
            let mut tunnel = client
                .connect(ConnectRequest {
                    source: client_id.clone(),
                    destination: identity.clone(),
                    hbone_addr: *hbone,
                    authority: HboneAuthority(*backend),
                    headers: request_headers,
                })
                .await?;
            tunnel
                .write_all(b"GET / HTTP/1.1\r\nHost: echo.demo\r\nConnection: close\r\n\r\n")
                .await?;
            tunnel.shutdown().await?;
            let mut response = String::new();
            tunnel.read_to_string(&mut response).await?;
            anyhow::Ok(response)
        }
        .await;
        match result {
            Ok(body)
                if body.starts_with("HTTP/1.1 200")
                    && body.contains(&format!("echo-{version}")) =>
            {
                *per_version.entry(version.clone()).or_default() += 1;
                latencies.push(t.elapsed());
            }
            Ok(body) => {
                failures += 1;
                eprintln!(
                    "\nunexpected response: {}",
                    body.lines().next().unwrap_or("")
                );
            }
            Err(e) => {
                failures += 1;
                eprintln!("\nrequest failed: {e:#}");
            }
        }
        progress(i + 1, requests);
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
        "Requests: {requests} in {:.2} s, {failures} failed",
        elapsed.as_secs_f64()
    );
    for (version, count) in &per_version {
        println!(
            "  echo-{version}: {count:>5} ({:.0}%)",
            *count as f64 * 100.0 / requests as f64
        );
    }
    println!(
        "Latency: p50 {}  p90 {}  p99 {}",
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    println!("Identities node B verified on each backend's tunnels:");
    for (backend, ids) in &seen.identities {
        for (identity, count) in ids {
            println!("  {backend:<8} <- {identity} ({count} tunnels)");
        }
    }
    println!("Protection of every hop:");
    for (tls, count) in &seen.tls {
        println!("  {tls} ({count} tunnels)");
    }
    println!(
        "HBONE connections from node A: {} pooled, carrying {requests} tunnels",
        client.connection_count()
    );
    println!("Certificates:");
    for manager in [&node_a_certs, &node_b_certs] {
        for c in manager.summaries() {
            println!(
                "  {:<45} {} serial {}",
                c.identity.to_string(),
                c.state,
                c.serial.as_deref().unwrap_or("-")
            );
        }
    }
    stop.cancel();
    if failures > 0 {
        bail!("{failures} of {requests} requests failed");
    }
    Ok(())
}

fn describe_tls(tls: &TlsSummary) -> String {
    format!(
        "mutual TLS {} {}, client certificate verified",
        tls.protocol, tls.cipher_suite
    )
}

/// ztunnel's inbound in miniature: connect to the backend, then answer 200 and copy.
async fn inbound(tunnel: InboundTunnel, backend: SocketAddr) {
    if tunnel.authority.0 != backend {
        tunnel.reject(http::StatusCode::BAD_REQUEST);
        return;
    }
    let Ok(upstream) = TcpStream::connect(backend).await else {
        tunnel.reject(http::StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let Ok(stream) = tunnel.accept() else {
        return;
    };
    let counts = mesh::copy::ByteCounts::default();
    if let Err(e) = mesh::copy::copy_bidirectional(stream, upstream, &counts).await {
        tracing::warn!(error = %e, "demo inbound copy failed");
    }
}

/// A minimal HTTP/1.1 backend that names its version.
async fn start_backend(version: &str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(format!("{NODE_B}:0")).await?;
    let addr = listener.local_addr()?;
    let body = format!("hello from echo-{version}\n");
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
    Ok(addr)
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
