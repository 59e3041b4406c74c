//! What a hostile workload tried against ztunnel in the virtual cluster, each as a regression
//! test: connections addressed to ztunnel's own ports (they used to make it connect to itself
//! until the node ran out of file descriptors), a forged `forwarded` header (it used to pass for
//! the client's address in `ipBlocks` policies), a tunnel whose far ztunnel dies (the client used
//! to see a clean end of a truncated download), and a peer that grants huge windows and then
//! never reads (ztunnel used to queue 4.6 MiB per stream without limit).
//!
//! The attacker is the pod `outsider` in a namespace outside the mesh, holding a valid mesh
//! certificate issued by the cluster's CA (as if a workload's key had leaked), and speaking HBONE
//! itself from its own network namespace. Each test needs root and skips without it (but fails
//! under `CI=true`).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use mesh::hbone::{ClientConfig, ConnectRequest, HboneAuthority, HboneClient, TcpConnector};
use mesh::identity::Identity;
use mesh_tests::StaticCerts;
use mesh_tests::load::status_kib;
use mesh_tests::vcluster::{
    Cluster, ClusterBuilder, HBONE_PORT, IO_TIMEOUT, Pod, connect_in, eventually, needs_root,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
const REFUSED: &str = "ztunnel_self_calls_refused_total";

/// Two nodes: `client` (a) and `server` (b) in the ambient namespace `demo`, and the attacker
/// `outsider` (a) in `legacy`, which is not in the mesh.
fn cluster() -> ClusterBuilder {
    Cluster::builder()
        .node("a")
        .node("b")
        .namespace("demo")
        .ambient()
        .namespace("legacy")
        .pod("a", "demo", "client")
        .pod("b", "demo", "server")
        .pod("a", "legacy", "outsider")
        .service("demo", "server", 80, APP_PORT)
}

/// Dials from inside a pod's network namespace, unmarked: what the pod's own process would do.
struct PodDialer(String);

impl TcpConnector for PodDialer {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
        let netns = self.0.clone();
        Box::pin(async move { connect_in(&netns, addr).await })
    }
}

/// An HBONE client in `from`'s network namespace presenting a certificate for `identity`.
fn hostile_hbone(cluster: &Cluster, from: &str, identity: &Identity) -> HboneClient {
    let cert = cluster.pki().cert(identity);
    HboneClient::with_connector(
        ClientConfig::default(),
        Arc::new(StaticCerts::default().with(cert)),
        Arc::new(PodDialer(cluster.pod(from).netns().name().to_owned())),
    )
}

fn identity_of(pod: &Pod) -> Identity {
    pod.identity().parse().unwrap()
}

fn attacker(cluster: &Cluster) -> Identity {
    cluster.pki().id("demo", "attacker")
}

/// A `CONNECT` to `target` at `pod`'s HBONE port, with extra headers.
fn connect_request(
    source: &Identity,
    pod: &Pod,
    target: SocketAddr,
    headers: &[(&'static str, String)],
) -> ConnectRequest {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.insert(*k, v.parse().unwrap());
    }
    ConnectRequest {
        source: source.clone(),
        destination: identity_of(pod),
        hbone_addr: SocketAddr::new(pod.ip(), HBONE_PORT),
        authority: HboneAuthority(target),
        headers: map,
    }
}

/// Whether a plain connection from `from` to `addr` is closed by the far side (EOF or an error)
/// instead of being kept open.
async fn closed_by_far_side(from: &Pod, addr: SocketAddr) -> bool {
    let Ok(mut stream) = from.connect(addr).await else {
        return true;
    };
    let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_ztunnels_own_ports_are_refused_without_looping() {
    if !needs_root() {
        return;
    }
    let cluster = cluster().build().await.unwrap();
    let server = cluster.pod("server");
    let _echo = server.serve_echo(APP_PORT).await.unwrap();
    let (node_a, node_b) = (cluster.node("a"), cluster.node("b"));
    let fds_before = open_fds(node_b.pid());

    // Plaintext from outside the mesh to the pod's capture ports (PERMISSIVE): each used to
    // make ztunnel connect to its own listener, again and again.
    let outsider = cluster.pod("outsider");
    for port in [15006, 15001] {
        assert!(
            closed_by_far_side(outsider, server.addr(port)).await,
            "plaintext to {port}: ztunnel must close it\n{}",
            cluster.logs()
        );
    }
    // HBONE with a valid mesh certificate, for ztunnel's own ports in the pod.
    let hostile = hostile_hbone(&cluster, "outsider", &attacker(&cluster));
    // The node's metrics port (15020 in a cluster; the harness binds another).
    let metrics_port = node_b.metrics_addr().port();
    for port in [15001, 15006, 15008, 15053, metrics_port] {
        let request = connect_request(&attacker(&cluster), server, server.addr(port), &[]);
        let refused = tokio::time::timeout(IO_TIMEOUT, hostile.connect(request))
            .await
            .unwrap_or_else(|_| panic!("CONNECT to :{port} got no answer\n{}", cluster.logs()));
        assert_eq!(
            refused.err().and_then(|e| e.status()),
            Some(http::StatusCode::BAD_REQUEST),
            "CONNECT to :{port}"
        );
    }
    // From inside the mesh, to the pod's own loopback: the outbound listener itself.
    let client = cluster.pod("client");
    assert!(
        closed_by_far_side(client, "127.0.0.1:15001".parse().unwrap()).await,
        "the client's own capture port"
    );

    let metrics_b = node_b.metrics().await;
    assert!(
        metrics_b.sum(REFUSED, &[("direction", "inbound")]) >= 7.0,
        "every inbound self call counted:\n{}",
        metrics_b.text()
    );
    assert_eq!(
        metrics_b.sum(REFUSED, &[("direction", "inbound"), ("port", "15006")]),
        2.0,
        "plaintext to 15006 and HBONE to 15006"
    );
    let metrics_a = node_a.metrics().await;
    assert!(
        metrics_a.sum(REFUSED, &[("direction", "outbound"), ("port", "15001")]) >= 1.0,
        "{}",
        metrics_a.text()
    );
    assert!(
        node_b.logs().contains(&outsider.ip().to_string()),
        "the refusal names the source"
    );
    // Nothing kept looping: the node's descriptors are back near where they were, it is ready,
    // and traffic flows.
    let fds_after = open_fds(node_b.pid());
    assert!(
        fds_after < fds_before + 40,
        "ztunnel of node b holds {fds_after} descriptors (was {fds_before})"
    );
    assert_eq!(node_b.readiness().await.unwrap().0, 200);
    let echoed = client
        .exchange(cluster.service_addr("demo", "server", 80), b"still works")
        .await
        .unwrap();
    assert_eq!(echoed, b"still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_forwarded_header_does_not_pass_for_another_address() {
    if !needs_root() {
        return;
    }
    let cluster = cluster().build().await.unwrap();
    let server = cluster.pod("server");
    let _echo = server.serve_echo(APP_PORT).await.unwrap();
    let (client, outsider) = (cluster.pod("client"), cluster.pod("outsider"));
    let forged = format!("for=\"{}:5555\"", client.ip());
    let hostile = hostile_hbone(&cluster, "outsider", &attacker(&cluster));
    let attempt = |headers: Vec<(&'static str, String)>| {
        let request = connect_request(&attacker(&cluster), server, server.addr(APP_PORT), &headers);
        let hostile = hostile.clone();
        async move {
            tokio::time::timeout(IO_TIMEOUT, hostile.connect(request))
                .await
                .expect("an answer")
                .map(|_| http::StatusCode::OK)
                .unwrap_or_else(|e| e.status().unwrap_or(http::StatusCode::BAD_GATEWAY))
        }
    };

    // DENY by the attacker's address: claiming the client's address must not get around it.
    cluster
        .apply(
            "deny-outsider",
            &format!(
                "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-outsider, namespace: demo}}
spec:
  action: DENY
  rules: [{{from: [{{source: {{ipBlocks: ['{}/32']}}}}]}}]
",
                outsider.ip()
            ),
        )
        .await;
    assert_eq!(attempt(vec![]).await, http::StatusCode::UNAUTHORIZED);
    assert_eq!(
        attempt(vec![("forwarded", forged.clone())]).await,
        http::StatusCode::UNAUTHORIZED,
        "a forged forwarded header bypassed a DENY ipBlocks rule"
    );
    cluster.remove("deny-outsider").await;

    // ALLOW only the client's address: the attacker claiming it stays out, the client gets in.
    cluster
        .apply(
            "allow-client",
            &format!(
                "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-client, namespace: demo}}
spec:
  action: ALLOW
  rules: [{{from: [{{source: {{ipBlocks: ['{}/32']}}}}]}}]
",
                client.ip()
            ),
        )
        .await;
    assert_eq!(
        attempt(vec![("forwarded", forged)]).await,
        http::StatusCode::UNAUTHORIZED,
        "a forged forwarded header passed an ALLOW ipBlocks rule"
    );
    let echoed = client
        .exchange(server.addr(APP_PORT), b"the real client")
        .await
        .unwrap();
    assert_eq!(echoed, b"the real client");
    // The access log names the address the attacker really came from, never the forged one.
    let logs = cluster.node("b").logs();
    let denied: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("attacker") && l.contains("RBAC"))
        .collect();
    assert!(!denied.is_empty(), "denied tunnels are logged:\n{logs}");
    for line in denied {
        assert!(line.contains(&outsider.ip().to_string()), "{line}");
        assert!(
            !line.contains(":5555"),
            "the forged address was logged: {line}"
        );
    }
}

/// Serves an endless stream of bytes to every connection.
async fn serve_firehose(pod: &Pod) -> mesh_tests::vcluster::AppServer {
    pod.serve(APP_PORT, |mut stream, _| async move {
        let chunk = vec![0x5au8; 64 * 1024];
        while stream.write_all(&chunk).await.is_ok() {}
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_a_dead_ztunnel_ends_in_a_reset_not_a_clean_end() {
    if !needs_root() {
        return;
    }
    let cluster = cluster().build().await.unwrap();
    let server = cluster.pod("server");
    let _firehose = serve_firehose(server).await;
    let mut download = cluster
        .pod("client")
        .connect(server.addr(APP_PORT))
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    while received < 8 << 20 {
        let n = tokio::time::timeout(IO_TIMEOUT, download.read(&mut buf))
            .await
            .expect("data flows")
            .expect("read");
        assert_ne!(n, 0, "the endless stream ended");
        received += n;
    }
    // The destination node's ztunnel dies (a crash, an OOM kill): its TLS connection ends
    // without close_notify.
    cluster.node("b").sigkill();
    let end = tokio::time::timeout(IO_TIMEOUT, async {
        loop {
            match download.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the download ends once its tunnel is gone");
    let error = end.expect_err("a truncated download ended as if complete (FIN)");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_by_a_dead_ztunnel_reaches_the_server_as_a_reset() {
    if !needs_root() {
        return;
    }
    let cluster = cluster().build().await.unwrap();
    let server = cluster.pod("server");
    let received = Arc::new(AtomicU64::new(0));
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let counter = received.clone();
    let _sink = server
        .serve(APP_PORT, move |mut stream, _| {
            let (counter, ended_tx) = (counter.clone(), ended_tx.clone());
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                let end = loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => break Err(e.kind()),
                    }
                };
                let _ = ended_tx.send(end);
            }
        })
        .await
        .unwrap();
    let mut upload = cluster
        .pod("client")
        .connect(server.addr(APP_PORT))
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![0xa5u8; 64 * 1024];
        while upload.write_all(&chunk).await.is_ok() {}
    });
    eventually(IO_TIMEOUT, || {
        let n = received.load(Ordering::Relaxed);
        async move { if n >= 8 << 20 { Ok(()) } else { Err(n) } }
    })
    .await
    .expect("8 MiB uploaded");
    // The client node's ztunnel dies mid-upload.
    cluster.node("a").sigkill();
    let end = tokio::time::timeout(IO_TIMEOUT, ended.recv())
        .await
        .expect("the server sees the upload end once its tunnel is gone")
        .unwrap();
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "a truncated upload reached the server as a clean end (FIN)"
    );
    writer.abort();
}

/// An HBONE connection from `from` (valid certificate, huge HTTP/2 windows) carrying `streams`
/// tunnels to `target`, which stops reading its socket once every tunnel is open. Dropping it
/// closes the connection.
struct StalledReader {
    _streams: Vec<h2::RecvStream>,
    _send: Vec<h2::SendStream<Bytes>>,
    resume: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StalledReader {
    fn drop(&mut self) {
        self.resume.take();
        self.task.abort();
    }
}

async fn stalled_reader(
    cluster: &Cluster,
    from: &str,
    to: &Pod,
    target: SocketAddr,
    streams: usize,
) -> StalledReader {
    let identity = attacker(cluster);
    let cert = cluster.pki().cert(&identity);
    let tcp = connect_in(
        cluster.pod(from).netns().name(),
        SocketAddr::new(to.ip(), HBONE_PORT),
    )
    .await
    .unwrap();
    let tls = tokio_rustls::TlsConnector::from(cert.client_config(vec![identity_of(to)]))
        .connect(mesh::tls::unused_server_name(), tcp)
        .await
        .unwrap();
    let huge = (1u32 << 31) - 1;
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(huge)
        .initial_connection_window_size(huge)
        .handshake::<_, Bytes>(tls)
        .await
        .unwrap();
    let (pause_tx, pause_rx) = tokio::sync::oneshot::channel::<()>();
    let (resume_tx, resume_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            _ = &mut connection => return,
            _ = pause_rx => {}
        }
        // Held, never polled: nothing more is read from the socket.
        let _ = resume_rx.await;
    });
    let mut responses = Vec::new();
    let mut sends = Vec::new();
    for _ in 0..streams {
        client = client.ready().await.unwrap();
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .unwrap();
        let (response, send) = client.send_request(request, false).unwrap();
        responses.push(response);
        sends.push(send);
    }
    let mut bodies = Vec::new();
    for response in responses {
        let response = tokio::time::timeout(IO_TIMEOUT, response)
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        bodies.push(response.into_body());
    }
    let _ = pause_tx.send(());
    StalledReader {
        _streams: bodies,
        _send: sends,
        resume: Some(resume_tx),
        task,
    }
}

fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_costs_a_bounded_amount_of_memory() {
    if !needs_root() {
        return;
    }
    let cluster = cluster().build().await.unwrap();
    let server = cluster.pod("server");
    let _firehose = serve_firehose(server).await;
    let pid = cluster.node("b").pid();
    let before = rss_mib(pid);
    // Two connections of 100 tunnels each (the default stream cap), every tunnel to an
    // upstream that sends without end.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled
            .push(stalled_reader(&cluster, "outsider", server, server.addr(APP_PORT), 100).await);
    }
    // The queue fills within a moment; watch the memory for a few seconds and keep the peak.
    let mut peak = before;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_mib(pid));
    }
    let growth = peak - before;
    eprintln!(
        "ztunnel of node b: RSS {before:.1} MiB before, {peak:.1} MiB with 200 stalled tunnels"
    );
    assert!(
        growth < 64.0,
        "200 stalled tunnels grew ztunnel's memory by {growth:.1} MiB (from {before:.1} MiB)"
    );
    // The node keeps serving everyone else meanwhile.
    let mut other = cluster
        .pod("client")
        .connect(server.addr(APP_PORT))
        .await
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    tokio::time::timeout(IO_TIMEOUT, other.read_exact(&mut buf))
        .await
        .expect("node b stopped serving others")
        .unwrap();
    drop(other);
    drop(stalled);
    // Memory comes back once they are gone.
    let after = eventually(Duration::from_secs(20), || {
        let rss = rss_mib(pid);
        async move {
            if rss < before + 16.0 {
                Ok(rss)
            } else {
                Err(rss)
            }
        }
    })
    .await;
    eprintln!("after the stalled tunnels closed: {after:?} MiB");
    assert!(
        after.is_ok(),
        "memory not given back: {after:?} MiB, {before:.1} MiB before"
    );
}
