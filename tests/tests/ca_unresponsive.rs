//! A ztunnel (`ztunnel::app::build`, capture `none`) whose `CA_ADDRESS` accepts connections and
//! never answers: the pod's certificate fails by the CA deadline, readiness and `ztunnel config
//! certificates` say why, a client's connection through SOCKS5 is refused promptly with a
//! failure flag and reason in its access-log line, and an inbound HBONE connection is closed
//! with a warning instead of hanging.
//!
//! This file installs a process-wide log subscriber to read the access log, so it holds one
//! test.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NET: u8 = 63;

fn cluster_yaml() -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: demo, labels: {{app: sleep}}}}
spec: {{nodeName: node-a, serviceAccountName: sleep, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: 127.{NET}.0.11}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: demo, labels: {{app: web}}}}
spec: {{nodeName: node-b, serviceAccountName: web, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: 127.{NET}.0.21}}
"#
    )
}

/// Every log line of this process, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn install() -> Self {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
    }

    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

#[tokio::test]
async fn a_ca_that_never_answers_fails_connections_promptly_and_says_why() {
    let logs = Captured::install();
    let pki = TestPki::new(TRUST_DOMAIN);
    let silent = start_silent_server().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), cluster_yaml()).unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, pki.root_pem()).unwrap();
    let ca_deadline = Duration::from_secs(1);
    let any = "127.0.0.1:0".parse::<SocketAddr>().unwrap();
    let config = ztunnel::config::Config {
        node_name: "node-a".into(),
        trust_domain: TRUST_DOMAIN.into(),
        cluster_id: mesh::ops::DEFAULT_CLUSTER_ID.into(),
        cluster_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        config_path: dir.path().join("cluster.yaml"),
        ca: ztunnel::config::CaConfig {
            address: silent.addr.to_string(),
            root_cert: root,
            server_name: Some("localhost".into()),
            token_file: None,
            request_timeout: ca_deadline,
        },
        capture: ztunnel::config::CaptureMode::None,
        probe_sources: vec![],
        admin_addr: any,
        metrics_addr: any,
        readiness_addr: any,
        socks5_addr: Some(any),
        drain_deadline: Duration::from_secs(1),
        workload_cert_ttl: Duration::from_secs(3600),
        dns: Default::default(),
        operator: Default::default(),
        hbone: Default::default(),
    };
    let node = ztunnel::app::build(config, None)
        .await
        .expect("ztunnel starts");
    let sleep_id = pki.id("demo", "sleep").to_string();

    // A client's connection is refused within the CA deadline (plus slack), not left hanging.
    let socks = node.socks5_addr.unwrap();
    let web: SocketAddr = format!("127.{NET}.0.21:8080").parse().unwrap();
    let started = Instant::now();
    let (_, code) = tokio::time::timeout(
        Duration::from_secs(8),
        socks5_connect(
            socks,
            format!("127.{NET}.0.11").parse().unwrap(),
            Socks5Target::Addr(web),
        ),
    )
    .await
    .expect("SOCKS5 answers instead of hanging on the CA")
    .unwrap();
    assert_eq!(code, 5, "connection refused");
    assert!(
        started.elapsed() < ca_deadline + Duration::from_secs(4),
        "refused after {:?}",
        started.elapsed()
    );
    // Its access-log line carries the failure flag and the reason: no certificate, the CA's
    // error.
    let access = wait_until(Duration::from_secs(5), || {
        logs.lines()
            .iter()
            .any(|l| l.contains("connection complete") && l.contains(&web.to_string()))
    })
    .await;
    let lines = logs.lines();
    assert!(access, "no access-log line: {lines:#?}");
    let line = lines
        .iter()
        .find(|l| l.contains("connection complete") && l.contains(&web.to_string()))
        .unwrap();
    assert!(line.contains(r#"flags="UF""#), "{line}");
    assert!(
        line.contains("source certificate unavailable")
            && line.contains(&sleep_id)
            && line.contains(&silent.addr.to_string())
            && line.contains("did not answer within"),
        "{line}"
    );
    // The CA failure itself is a warning naming the CA and what to check.
    assert!(
        lines.iter().any(|l| l.contains("WARN")
            && l.contains("certificate fetch failed")
            && l.contains("is the CA healthy")),
        "{lines:#?}"
    );
    let (_, metrics) = http_get(node.metrics_addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_failed_total{")
                && l.contains(r#"response_flags="UF""#)),
        "{metrics}"
    );

    // Readiness: 503 naming the identity and the CA's error.
    let (status, body) = http_get(node.readiness_addr, "/healthz/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&sleep_id)
            && body.contains("did not answer within")
            && body.contains("next attempt in"),
        "{body}"
    );

    // `ztunnel config certificates`: the state, the error and when the next attempt is.
    let dump = ztunnel::operator::fetch(node.admin_addr).await.unwrap();
    let table = ztunnel::operator::render(
        &dump,
        ztunnel::operator::Section::Certificates,
        ztunnel::operator::Output::Table,
    )
    .unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with(&sleep_id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("failed") && row.contains("(in ") && row.contains("did not answer within"),
        "{table}"
    );
    assert!(table.contains("NEXT ATTEMPT"), "{table}");

    // Inbound: an HBONE connection to the pod is closed at once (no certificate to present),
    // with a warning, rather than held.
    let hbone: SocketAddr = format!("127.{NET}.0.11:15008").parse().unwrap();
    let mut conn = TcpStream::connect(hbone).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("closed instead of held open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        wait_until(Duration::from_secs(5), || logs
            .lines()
            .iter()
            .any(|l| l.contains("WARN")
                && l.contains("no certificate to present")
                && l.contains(&sleep_id)))
        .await,
        "{:#?}",
        logs.lines()
    );

    node.shutdown_trigger().cancel();
    tokio::time::timeout(Duration::from_secs(10), node.wait())
        .await
        .expect("stops")
        .unwrap();
}
