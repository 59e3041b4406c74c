//! Two real ztunnels (`ztunnel::app::build`, capture mode `none`) as two "nodes" on loopback,
//! with the file source and the in-process CA: traffic through SOCKS5 goes over HBONE to an
//! enrolled pod and straight to an un-enrolled one, the destination sees the client's identity,
//! policies deny new and live connections when they change, and drain completes.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh::ca::AllowAny;
use mesh_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The cluster: namespace `demo` is ambient, `legacy` is not. Pod IPs are loopback aliases
/// derived from `net` so tests running in parallel do not collide.
fn cluster_yaml(net: u8) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: legacy}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: demo, labels: {{app: sleep}}}}
spec: {{nodeName: node-a, serviceAccountName: sleep, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: 127.{net}.0.11}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: demo, labels: {{app: web, version: v1}}}}
spec: {{nodeName: node-b, serviceAccountName: web, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{phase: Running, podIP: 127.{net}.0.21}}
---
apiVersion: v1
kind: Pod
metadata: {{name: old, namespace: legacy}}
spec: {{nodeName: node-b, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: 127.{net}.0.31}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: 10.96.{net}.10
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-abc, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
- addresses: [127.{net}.0.21]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: web, namespace: demo}}
ports: [{{name: http, port: 8080}}]
"#
    )
}

const DENY_SLEEP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/sleep"]}}]
"#;

struct Node {
    bound: ztunnel::app::Bound,
}

async fn start_node(name: &str, config_dir: &Path, ca: &RunningCa, root: &Path) -> Node {
    start_node_in(mesh::ops::DEFAULT_CLUSTER_ID, name, config_dir, ca, root).await
}

async fn start_node_in(
    cluster_id: &str,
    name: &str,
    config_dir: &Path,
    ca: &RunningCa,
    root: &Path,
) -> Node {
    let any = "127.0.0.1:0".parse::<SocketAddr>().unwrap();
    let config = ztunnel::config::Config {
        node_name: name.into(),
        trust_domain: TRUST_DOMAIN.into(),
        cluster_id: cluster_id.into(),
        cluster_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        config_path: config_dir.to_owned(),
        ca: ztunnel::config::CaConfig {
            address: ca.addr.to_string(),
            root_cert: root.to_owned(),
            server_name: Some("localhost".into()),
            token_file: None,
            request_timeout: mesh::ops::DEFAULT_CA_REQUEST_TIMEOUT,
        },
        capture: ztunnel::config::CaptureMode::None,
        probe_sources: vec![],
        admin_addr: any,
        metrics_addr: any,
        readiness_addr: any,
        socks5_addr: Some(any),
        operator: Default::default(),
        drain_deadline: Duration::from_secs(2),
        workload_cert_ttl: Duration::from_secs(3600),
        dns: Default::default(),
        hbone: Default::default(),
    };
    Node {
        bound: ztunnel::app::build(config, None)
            .await
            .expect("ztunnel starts"),
    }
}

/// A backend that answers each line with `<name>: <line>`.
async fn start_backend(addr: SocketAddr, name: &'static str) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let reply = format!("{name}: {}", String::from_utf8_lossy(&buf[..n]));
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Connects through SOCKS5 from `source` (the client pod's IP) to `target`; returns the stream
/// and the SOCKS5 reply code.
async fn socks5(proxy: SocketAddr, source: &str, target: SocketAddr) -> (TcpStream, u8) {
    socks5_connect(proxy, source.parse().unwrap(), Socks5Target::Addr(target))
        .await
        .unwrap()
}

/// Waits until every node answers readiness 200 (config loaded, certificates fetched).
async fn wait_ready(nodes: &[&Node]) {
    for node in nodes {
        let addr = node.bound.readiness_addr;
        let ready = async {
            loop {
                if http_get(addr, "/healthz/ready").await.0 == 200 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("ready once config and certificates are loaded");
    }
}

async fn roundtrip(s: &mut TcpStream, msg: &str) -> String {
    s.write_all(msg.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("reply in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Two ready ztunnels (node-a, node-b) on the cluster of [`cluster_yaml`], with the web and
/// old backends running.
struct TwoNodes {
    a: Node,
    b: Node,
    dir: tempfile::TempDir,
    _ca: RunningCa,
}

impl TwoNodes {
    async fn start(net: u8) -> Self {
        init_tracing();
        let pki = TestPki::new(TRUST_DOMAIN);
        let ca = start_ca(&pki, Arc::new(AllowAny), "127.0.0.1:0".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.pem");
        std::fs::write(&root, pki.root_pem()).unwrap();
        let config_dir = dir.path().join("mesh");
        std::fs::create_dir(&config_dir).unwrap();
        std::fs::write(config_dir.join("cluster.yaml"), cluster_yaml(net)).unwrap();
        start_backend(format!("127.{net}.0.21:8080").parse().unwrap(), "web").await;
        start_backend(format!("127.{net}.0.31:8080").parse().unwrap(), "old").await;
        let a = start_node("node-a", &config_dir, &ca, &root).await;
        let b = start_node("node-b", &config_dir, &ca, &root).await;
        wait_ready(&[&a, &b]).await;
        Self { a, b, dir, _ca: ca }
    }

    fn config_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("mesh")
    }
}

#[tokio::test]
async fn two_nodes_hbone_passthrough_policy_and_drain() {
    let net = 41;
    let mesh = TwoNodes::start(net).await;
    let config_dir = mesh.config_dir();
    let TwoNodes { a, b, .. } = &mesh;

    let socks = a.bound.socks5_addr.unwrap();
    let client_ip = format!("127.{net}.0.11");
    // Through the service VIP: load-balanced to the web pod, over HBONE.
    let vip: SocketAddr = format!("10.96.{net}.10:80").parse().unwrap();
    let (mut live, code) = socks5(socks, &client_ip, vip).await;
    assert_eq!(code, 0, "SOCKS5 success");
    assert_eq!(roundtrip(&mut live, "hello").await, "web: hello");

    // To the un-enrolled pod: plain passthrough.
    let (mut plain, code) = socks5(
        socks,
        &client_ip,
        format!("127.{net}.0.31:8080").parse().unwrap(),
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(roundtrip(&mut plain, "hi").await, "old: hi");
    drop(plain);

    // An address that is not a local pod may not use this node's SOCKS5.
    let (_, code) = socks5(socks, "127.0.0.1", vip).await;
    assert_eq!(code, 2, "not allowed: the client is not a pod of this node");

    // The destination node saw the client's identity over mutual TLS.
    let (_, metrics) = http_get(b.bound.metrics_addr, "/metrics").await;
    let inbound = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains(r#"reporter="destination""#)
        })
        .unwrap_or_else(|| panic!("no inbound connection metric:\n{metrics}"));
    assert!(
        inbound.contains(r#"source_principal="spiffe://cluster.local/ns/demo/sa/sleep""#),
        "{inbound}"
    );
    assert!(
        inbound.contains(r#"destination_principal="spiffe://cluster.local/ns/demo/sa/web""#),
        "{inbound}"
    );
    assert!(
        inbound.contains(r#"connection_security_policy="mutual_tls""#),
        "{inbound}"
    );
    let (_, metrics_a) = http_get(a.bound.metrics_addr, "/metrics").await;
    assert!(
        metrics_a
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains(r#"reporter="source""#)
                && l.contains(r#"destination_service="web.demo.svc.cluster.local""#)
                && l.contains(r#"connection_security_policy="mutual_tls""#)),
        "{metrics_a}"
    );
    assert!(
        metrics_a
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains(r#"destination_workload_namespace="legacy""#)
                && l.contains(r#"connection_security_policy="none""#)),
        "passthrough is recorded as plaintext: {metrics_a}"
    );

    // The admin port shows what the node knows.
    let (status, dump) = http_get(b.bound.admin_addr, "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["pods"], serde_json::json!(["demo/web"]));
    assert_eq!(
        dump["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    assert_eq!(dump["certificates"][0]["state"], "available");

    // The operator view (`ztunnel config`) of node b, while the connection is live.
    use ztunnel::operator::{Output, Section, render};
    let dump = ztunnel::operator::fetch(b.bound.admin_addr).await.unwrap();
    let tables = render(&dump, Section::All, Output::Table).unwrap();
    let row = |title: &str, needle: &str| {
        tables
            .split("\n\n")
            .find(|t| t.starts_with(title))
            .and_then(|t| t.lines().find(|l| l.contains(needle)).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {needle:?} row under {title}:\n{tables}"))
    };
    let web = row("WORKLOADS", " web ");
    assert!(
        web.contains(&format!("127.{net}.0.21")) && web.contains("node-b"),
        "{web}"
    );
    assert!(
        web.contains("spiffe://cluster.local/ns/demo/sa/web") && web.contains("yes (this node)"),
        "{web}"
    );
    assert!(row("WORKLOADS", " old ").contains("no (not enrolled)"));
    assert!(row("WORKLOADS", " sleep ").contains("yes (other node)"));
    let svc = row("SERVICES", " web ");
    assert!(
        svc.contains(&format!("10.96.{net}.10")) && svc.contains("80->http") && svc.contains("1/1"),
        "{svc}"
    );
    let cert = row("CERTIFICATES", "sa/web");
    assert!(cert.contains("available"), "{cert}");
    let conn = row("CONNECTIONS", "inbound");
    assert!(
        conn.contains("spiffe://cluster.local/ns/demo/sa/sleep") && conn.contains("demo/web"),
        "{conn}"
    );
    assert!(
        conn.contains(" 5 ") && conn.contains(" 10 "),
        "bytes each way of the live connection: {conn}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&render(&dump, Section::Certificates, Output::Json).unwrap()).unwrap();
    assert_eq!(json[0]["identity"], "spiffe://cluster.local/ns/demo/sa/web");
    let yaml = render(&dump, Section::Services, Output::Yaml).unwrap();
    assert!(
        yaml.contains("hostname: web.demo.svc.cluster.local"),
        "{yaml}"
    );

    // A DENY policy: the live connection is closed and new ones are refused.
    std::fs::write(config_dir.join("deny.yaml"), DENY_SLEEP).unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match live.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "live connection closed after the policy change"
    );
    let (_, code) = socks5(socks, &client_ip, vip).await;
    assert_eq!(
        code, 2,
        "destination denied the new connection (401 -> not allowed)"
    );
    let (_, metrics) = http_get(b.bound.metrics_addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_failed_total{")
                && l.contains(r#"response_flags="RBAC""#)),
        "{metrics}"
    );

    // Removing the policy lets traffic through again.
    std::fs::remove_file(config_dir.join("deny.yaml")).unwrap();
    let ok = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (mut s, code) = socks5(socks, &client_ip, vip).await;
            if code == 0 {
                return roundtrip(&mut s, "again").await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("allowed again after the policy is removed");
    assert_eq!(ok, "web: again");

    // Drain: readiness goes false at once, then the node stops.
    b.bound.shutdown_trigger().cancel();
    let (status, body) = http_get(b.bound.readiness_addr, "/healthz/ready").await;
    assert_eq!(status, 503, "{body}");
    let TwoNodes {
        a,
        b,
        dir: _dir,
        _ca,
    } = mesh;
    tokio::time::timeout(Duration::from_secs(10), b.bound.wait())
        .await
        .expect("drain completes")
        .unwrap();
    a.bound.shutdown_trigger().cancel();
    a.bound.wait().await.unwrap();
}

#[tokio::test]
async fn operator_view_says_plainly_when_the_admin_port_is_wrong() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = ztunnel::operator::fetch(closed)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot reach ztunnel's admin port") && err.contains(&closed.to_string()),
        "{err}"
    );
    // Something that is not a ztunnel: an HTTP server answering 404.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let err = ztunnel::operator::fetch(addr)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is not a ztunnel admin port") && err.contains("404"),
        "{err}"
    );
}

#[tokio::test]
async fn socks5_bad_input_is_refused_without_harm() {
    let net = 42;
    let mesh = TwoNodes::start(net).await;
    let a = &mesh.a;
    let socks = a.bound.socks5_addr.unwrap();
    let client_ip = format!("127.{net}.0.11");

    // Not SOCKS at all, a SOCKS4 greeting, and a client that stalls: closed, nothing else hurt.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[4, 1, 0, 80, 127, 0, 0, 1, 0][..],
        &[5][..],
    ] {
        let mut s = TcpStream::connect(socks).await.unwrap();
        s.write_all(junk).await.unwrap();
        if junk.len() == 1 {
            continue; // stalls mid-greeting; the handshake timeout will close it
        }
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a non-SOCKS5 client is disconnected promptly");
    }
    // A hostname the mesh does not know: host unreachable (4).
    let source = client_ip.parse().unwrap();
    let unknown = Socks5Target::Name("nope.demo.svc.cluster.local", 80);
    let (_, code) = socks5_connect(socks, source, unknown).await.unwrap();
    assert_eq!(code, 4);
    // The service hostname resolves from the mesh's state, and traffic still flows.
    let known = Socks5Target::Name("web.demo.svc.cluster.local", 80);
    let (mut s, code) = socks5_connect(socks, source, known).await.unwrap();
    assert_eq!(code, 0, "service hostname resolved to its VIP");
    assert_eq!(roundtrip(&mut s, "by name").await, "web: by name");
    // A port the service does not have: refused (5), and the node keeps serving.
    let (_, code) = socks5(
        socks,
        &client_ip,
        format!("10.96.{net}.10:81").parse().unwrap(),
    )
    .await;
    assert_eq!(code, 5);
    let (mut ok, code) = socks5(
        socks,
        &client_ip,
        format!("10.96.{net}.10:80").parse().unwrap(),
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(roundtrip(&mut ok, "still").await, "web: still");
}

/// `CLUSTER_ID` on the wire and in metrics, both ways: node-a's CONNECTs carry its cluster in
/// `baggage` (seen by a recording HBONE server standing in for node-b), its metrics label both
/// known workloads with it, and its 200 to a CONNECT carries the destination pod's `baggage`,
/// as Istio's ztunnel answers.
#[tokio::test]
async fn baggage_carries_the_cluster_both_ways() {
    init_tracing();
    let net = 43;
    let cluster = "east-1";
    let pki = TestPki::new(TRUST_DOMAIN);
    let ca = start_ca(&pki, Arc::new(AllowAny), "127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, pki.root_pem()).unwrap();
    let config_dir = dir.path().join("mesh");
    std::fs::create_dir(&config_dir).unwrap();
    std::fs::write(config_dir.join("cluster.yaml"), cluster_yaml(net)).unwrap();
    let web_ip = format!("127.{net}.0.21");
    start_backend(format!("{web_ip}:8080").parse().unwrap(), "web").await;
    // node-b is played by an HBONE server that records each request and forwards it.
    let server = mesh::hbone::HboneServer::bind(
        format!("{web_ip}:15008").parse().unwrap(),
        mesh::hbone::ServerConfig::default(),
        Arc::new(pki.cert(&pki.id("demo", "web"))),
    )
    .await
    .unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(
        server.run(stop.clone(), move |tunnel: mesh::hbone::InboundTunnel| {
            let _ = seen_tx.send(tunnel.headers.clone());
            forward(tunnel)
        }),
    );
    let a = start_node_in(cluster, "node-a", &config_dir, &ca, &root).await;
    wait_ready(&[&a]).await;

    let socks = a.bound.socks5_addr.unwrap();
    let (mut s, code) = socks5(
        socks,
        &format!("127.{net}.0.11"),
        format!("{web_ip}:8080").parse().unwrap(),
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(roundtrip(&mut s, "hi").await, "web: hi");
    let headers = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .unwrap()
        .unwrap();
    let baggage = headers
        .get(mesh::hbone::headers::BAGGAGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no baggage: {headers:?}"));
    let parsed = mesh::hbone::Baggage::parse(baggage);
    assert_eq!(parsed.cluster.as_deref(), Some(cluster), "{baggage}");
    assert_eq!(parsed.namespace.as_deref(), Some("demo"), "{baggage}");
    assert_eq!(parsed.service.as_deref(), Some("sleep"), "{baggage}");
    drop(s);
    let labelled = async {
        loop {
            let (_, metrics) = http_get(a.bound.metrics_addr, "/metrics").await;
            if metrics.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains(r#"destination_workload="web""#)
                    && l.contains(&format!(r#"source_cluster="{cluster}""#))
                    && l.contains(&format!(r#"destination_cluster="{cluster}""#))
            }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), labelled)
        .await
        .expect("source_cluster and destination_cluster are the CLUSTER_ID");

    // The 200 to a CONNECT names the destination pod: sleep, in node-a's cluster.
    let sleep_ip = format!("127.{net}.0.11");
    start_backend(format!("{sleep_ip}:9090").parse().unwrap(), "sleep").await;
    let client = mesh::hbone::HboneClient::new(
        mesh::hbone::ClientConfig::default(),
        Arc::new(StaticCerts::default().with(pki.cert(&pki.id("demo", "web")))),
    );
    let (mut tunnel, answer) = client
        .connect_with_headers(mesh::hbone::ConnectRequest {
            source: pki.id("demo", "web"),
            destination: pki.id("demo", "sleep"),
            hbone_addr: format!("{sleep_ip}:15008").parse().unwrap(),
            authority: mesh::hbone::HboneAuthority(format!("{sleep_ip}:9090").parse().unwrap()),
            headers: http::HeaderMap::new(),
        })
        .await
        .unwrap();
    let baggage = answer
        .get(mesh::hbone::headers::BAGGAGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no baggage on the 200: {answer:?}"));
    let parsed = mesh::hbone::Baggage::parse(baggage);
    assert_eq!(parsed.cluster.as_deref(), Some(cluster), "{baggage}");
    assert_eq!(parsed.namespace.as_deref(), Some("demo"), "{baggage}");
    assert_eq!(parsed.service.as_deref(), Some("sleep"), "{baggage}");
    assert_eq!(
        parsed.workload.as_ref().map(|(_, name)| name.as_str()),
        Some("sleep"),
        "{baggage}"
    );
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"sleep: ping");

    stop.cancel();
    a.bound.shutdown_trigger().cancel();
    a.bound.wait().await.unwrap();
}
