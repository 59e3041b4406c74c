//! End-to-end tests on the virtual cluster (`mesh_tests::vcluster`): real `ztunnel run`
//! processes, one per node, capturing pods that live in their own network namespaces, with
//! unmodified clients and servers in those pods. Each test builds its own cluster, so tests run
//! in parallel; each needs root and skips without it (but fails under `CI=true`).
//!
//! What they show: pod-to-pod and VIP traffic works and keeps its bytes; what crosses between
//! nodes is TLS (a marker never shows on the wire) while un-enrolled traffic is plain; the server
//! side learns the client's SPIFFE identity; enrolment follows namespace labels live; STRICT
//! PeerAuthentication and L4 AuthorizationPolicies are enforced, on live connections too;
//! kubelet probes bypass capture; SIGTERM drains without breaking an in-flight transfer.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::vcluster::{
    Captured, Cluster, ClusterBuilder, HBONE_PORT, IO_TIMEOUT, Metrics, eventually, needs_root,
    pattern, unique_marker,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::capture::nft;

/// The application port of every server pod.
const APP_PORT: u16 = 8080;
/// The port of service `demo/server`.
const SERVICE_PORT: u16 = 80;
const OPENED: &str = "istio_tcp_connections_opened_total";
/// How long a metric may take to show a connection that already completed.
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);

/// Two nodes. `demo` is ambient: `client` and `neighbour` on node a, `server` on node b, behind
/// service `server`. `legacy` is not: `legacy-client` on a, `legacy-server` on b.
fn two_nodes() -> ClusterBuilder {
    Cluster::builder()
        .node("a")
        .node("b")
        .namespace("demo")
        .ambient()
        .namespace("legacy")
        .pod("a", "demo", "client")
        .pod("a", "demo", "neighbour")
        .pod("b", "demo", "server")
        .pod("a", "legacy", "legacy-client")
        .pod("b", "legacy", "legacy-server")
        .service("demo", "server", SERVICE_PORT, APP_PORT)
}

/// Whether `result` is the echo of `sent`.
fn echoed(result: &std::io::Result<Vec<u8>>, sent: &[u8]) -> bool {
    matches!(result, Ok(received) if received == sent)
}

/// Sends `marker` through an echo at `to` while capturing between the nodes.
async fn exchange_captured(
    cluster: &Cluster,
    from: &str,
    to: SocketAddr,
    marker: &str,
) -> Captured {
    let capture = cluster.capture_between_nodes().unwrap();
    let echoed_back = cluster
        .pod(from)
        .exchange(to, marker.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
    assert_eq!(echoed_back, marker.as_bytes(), "{from} -> {to}");
    capture.finish().unwrap()
}

/// Asserts that `marker` crossed between the nodes in clear, straight to the app's port.
#[track_caller]
fn assert_plain(wire: &Captured, marker: &str, when: &str) {
    let carriers = wire.tcp_ports_carrying(marker.as_bytes());
    assert!(
        carriers.iter().any(|&(_, dst)| dst == APP_PORT),
        "{when}: expected the marker in clear to port {APP_PORT}; seen in {carriers:?} \
         ({} frames captured)",
        wire.frames.len()
    );
}

/// Asserts that `marker` never crossed between the nodes in clear, while HBONE did.
#[track_caller]
fn assert_tunnelled(wire: &Captured, marker: &str, when: &str) {
    assert!(
        !wire.contains(marker.as_bytes()),
        "{when}: the marker crossed between nodes in clear"
    );
    assert!(
        wire.tcp_frames_to_port(HBONE_PORT) > 0,
        "{when}: no frames to port {HBONE_PORT} between nodes ({} frames captured)",
        wire.frames.len()
    );
}

/// Whether the capture rules are installed in `pod`'s network namespace.
fn captured(cluster: &Cluster, pod: &str) -> bool {
    nft::is_installed(&cluster.pod(pod).netns().open().unwrap()).unwrap()
}

/// Waits until `node`'s metrics satisfy `check`, returning them; panics with them otherwise.
async fn metrics_until(
    cluster: &Cluster,
    node: &str,
    what: &str,
    check: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let node = cluster.node(node);
    eventually(METRIC_TIMEOUT, || async {
        let metrics = node.metrics().await;
        if check(&metrics) {
            Ok(metrics)
        } else {
            Err(metrics)
        }
    })
    .await
    .unwrap_or_else(|metrics| panic!("node {}: {what}:\n{}", node.name(), metrics.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_reach_each_other_by_ip_and_vip_with_bytes_intact() {
    if !needs_root() {
        return;
    }
    let cluster = two_nodes().build().await.unwrap();
    let (client, server, neighbour) = (
        cluster.pod("client"),
        cluster.pod("server"),
        cluster.pod("neighbour"),
    );
    let _server_app = server.serve_echo(APP_PORT).await.unwrap();
    let _neighbour_app = neighbour.serve_echo(APP_PORT).await.unwrap();
    let data = pattern(64 * 1024, 1);

    // Across nodes by pod IP, across nodes by service VIP (which exists on no interface: only
    // capture can make it work), and within node a.
    for (what, to) in [
        ("cross-node by pod IP", server.addr(APP_PORT)),
        (
            "cross-node by VIP",
            cluster.service_addr("demo", "server", SERVICE_PORT),
        ),
        ("same node by pod IP", neighbour.addr(APP_PORT)),
    ] {
        let received = client.exchange(to, &data).await;
        assert!(
            echoed(&received, &data),
            "{what} ({to}): {:?}",
            received.map(|r| r.len())
        );
    }

    // All three went through ztunnel over mutual TLS, not around it.
    let source = |destination: &'static str, service: &'static str| {
        move |m: &Metrics| {
            m.sum(
                OPENED,
                &[
                    ("reporter", "source"),
                    ("destination_workload", destination),
                    ("destination_service", service),
                    ("connection_security_policy", "mutual_tls"),
                ],
            ) >= 1.0
        }
    };
    metrics_until(
        &cluster,
        "a",
        "HBONE to server by IP",
        source("server", "unknown"),
    )
    .await;
    metrics_until(
        &cluster,
        "a",
        "HBONE to server by VIP",
        source("server", "server.demo.svc.cluster.local"),
    )
    .await;
    metrics_until(
        &cluster,
        "a",
        "HBONE to neighbour",
        source("neighbour", "unknown"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_between_nodes_are_tls_unless_the_namespace_is_not_enrolled() {
    if !needs_root() {
        return;
    }
    let cluster = two_nodes().build().await.unwrap();
    let _server = cluster.pod("server").serve_echo(APP_PORT).await.unwrap();
    let _legacy = cluster
        .pod("legacy-server")
        .serve_echo(APP_PORT)
        .await
        .unwrap();

    let marker = unique_marker();
    let wire = exchange_captured(
        &cluster,
        "client",
        cluster.pod("server").addr(APP_PORT),
        &marker,
    )
    .await;
    assert_tunnelled(&wire, &marker, "between enrolled pods");

    // Control: the same capture sees an un-enrolled pod's bytes in clear.
    let marker = unique_marker();
    let wire = exchange_captured(
        &cluster,
        "legacy-client",
        cluster.pod("legacy-server").addr(APP_PORT),
        &marker,
    )
    .await;
    assert_plain(&wire, &marker, "between un-enrolled pods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_destination_sees_the_clients_spiffe_identity() {
    if !needs_root() {
        return;
    }
    let cluster = two_nodes().build().await.unwrap();
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _app = server.serve_echo(APP_PORT).await.unwrap();
    assert!(echoed(
        &client.exchange(server.addr(APP_PORT), b"who am i").await,
        b"who am i"
    ));

    let (source, destination) = (client.identity(), server.identity());
    assert_eq!(source, "spiffe://cluster.local/ns/demo/sa/client");
    metrics_until(
        &cluster,
        "b",
        "inbound connection with the client's identity",
        |m| {
            m.sum(
                OPENED,
                &[
                    ("reporter", "destination"),
                    ("source_principal", &source),
                    ("source_workload", "client"),
                    ("destination_principal", &destination),
                    ("connection_security_policy", "mutual_tls"),
                ],
            ) >= 1.0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unenrolled_namespace_gets_plain_passthrough() {
    if !needs_root() {
        return;
    }
    let cluster = two_nodes().build().await.unwrap();
    let legacy_server = cluster.pod("legacy-server");
    let _app = legacy_server.serve_echo(APP_PORT).await.unwrap();
    let to = legacy_server.addr(APP_PORT);
    assert!(!captured(&cluster, "legacy-client"));
    assert!(!captured(&cluster, "legacy-server"));

    // Between un-enrolled pods: works, and neither ztunnel is involved.
    let data = pattern(16 * 1024, 4);
    assert!(echoed(
        &cluster.pod("legacy-client").exchange(to, &data).await,
        &data
    ));
    // From an enrolled pod: ztunnel passes it through as plain TCP, and says so.
    let marker = unique_marker();
    let wire = exchange_captured(&cluster, "client", to, &marker).await;
    assert_plain(&wire, &marker, "passthrough from an enrolled pod");

    metrics_until(&cluster, "a", "passthrough recorded as plaintext", |m| {
        m.sum(
            OPENED,
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("destination_workload", "legacy-server"),
                ("connection_security_policy", "none"),
            ],
        ) >= 1.0
    })
    .await;
    let a = cluster.node("a").metrics().await;
    assert_eq!(
        a.sum(OPENED, &[("source_workload", "legacy-client")]),
        0.0,
        "node a saw the un-enrolled client:\n{}",
        a.text()
    );
    let b = cluster.node("b").metrics().await;
    assert_eq!(
        b.sum(
            OPENED,
            &[
                ("reporter", "destination"),
                ("destination_workload", "legacy-server")
            ]
        ),
        0.0,
        "nothing is received by ztunnel for an un-enrolled pod:\n{}",
        b.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrolment_follows_namespace_labels_live_and_pods_can_opt_out() {
    if !needs_root() {
        return;
    }
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("demo")
        .pod("a", "demo", "client")
        .pod("a", "demo", "opted-out")
        .label("istio.io/dataplane-mode", "none")
        .pod("b", "demo", "server")
        .build()
        .await
        .unwrap();
    // One server process for the whole test: enrolment never restarts the pods.
    let server = cluster.pod("server").serve_echo(APP_PORT).await.unwrap();
    let to = cluster.pod("server").addr(APP_PORT);

    let marker = unique_marker();
    let wire = exchange_captured(&cluster, "client", to, &marker).await;
    assert_plain(&wire, &marker, "before enrolment");
    assert!(!captured(&cluster, "client") && !captured(&cluster, "server"));

    cluster.set_ambient("demo", true).await;
    assert!(captured(&cluster, "client") && captured(&cluster, "server"));
    assert!(
        !captured(&cluster, "opted-out"),
        "a pod labelled dataplane-mode=none must not be captured"
    );
    let marker = unique_marker();
    let wire = exchange_captured(&cluster, "client", to, &marker).await;
    assert_tunnelled(&wire, &marker, "after labelling the namespace ambient");
    // The opted-out pod still reaches the (now enrolled) server, in clear.
    let marker = unique_marker();
    let wire = exchange_captured(&cluster, "opted-out", to, &marker).await;
    assert_plain(&wire, &marker, "from the opted-out pod");
    let pods = cluster.node("a").config_dump().await["pods"].clone();
    assert_eq!(pods, serde_json::json!(["demo/client"]));

    cluster.set_ambient("demo", false).await;
    assert!(!captured(&cluster, "client") && !captured(&cluster, "server"));
    let marker = unique_marker();
    let wire = exchange_captured(&cluster, "client", to, &marker).await;
    assert_plain(&wire, &marker, "after removing the label");

    // And back once more, on the same pods.
    cluster.set_ambient("demo", true).await;
    let marker = unique_marker();
    let wire = exchange_captured(&cluster, "client", to, &marker).await;
    assert_tunnelled(&wire, &marker, "after labelling it again");

    let client_ip = cluster.pod("client").ip();
    let server_ip = cluster.pod("server").ip();
    assert!(
        server.peers().iter().any(|p| p.ip() == client_ip),
        "the app saw the client itself while not enrolled: {:?}",
        server.peers()
    );
    // Enrolled, the inbound side connects to the app from inside the pod.
    assert_eq!(server.peers().last().map(|p| p.ip()), Some(server_ip));
}

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_peer_authentication_refuses_plaintext_clients() {
    if !needs_root() {
        return;
    }
    let cluster = two_nodes().build().await.unwrap();
    let _app = cluster.pod("server").serve_echo(APP_PORT).await.unwrap();
    let to = cluster.pod("server").addr(APP_PORT);
    let data = pattern(4096, 6);

    // PERMISSIVE (the default): a plaintext client from outside the mesh gets through.
    assert!(echoed(
        &cluster.pod("legacy-client").exchange(to, &data).await,
        &data
    ));

    cluster.apply("strict", STRICT).await;
    let refused = cluster.pod("legacy-client").exchange(to, &data).await;
    assert!(
        !echoed(&refused, &data),
        "plaintext got through under STRICT"
    );
    assert!(
        matches!(&refused, Ok(r) if r.is_empty()) || refused.is_err(),
        "{refused:?}"
    );
    assert!(
        echoed(&cluster.pod("client").exchange(to, &data).await, &data),
        "an ambient client must still get through under STRICT"
    );
    metrics_until(&cluster, "b", "plaintext refused under STRICT", |m| {
        m.sum(
            "istio_tcp_connections_failed_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "legacy-client"),
                ("response_flags", "RBAC"),
            ],
        ) >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authorization_policies_allow_deny_and_recheck_live_connections() {
    if !needs_root() {
        return;
    }
    let cluster = two_nodes().build().await.unwrap();
    let (client, neighbour) = (cluster.pod("client"), cluster.pod("neighbour"));
    let _app = cluster.pod("server").serve_echo(APP_PORT).await.unwrap();
    let to = cluster.pod("server").addr(APP_PORT);
    let data = pattern(4096, 7);

    // ALLOW: only `client` may reach `server`.
    cluster
        .apply(
            "allow-client",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-client, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["{}"]}}}}]
"#,
                client.principal()
            ),
        )
        .await;
    assert!(echoed(&client.exchange(to, &data).await, &data));
    let refused = neighbour.exchange(to, &data).await;
    assert!(
        !echoed(&refused, &data),
        "neighbour is not allowed: {refused:?}"
    );

    // A long-lived connection, working before the DENY arrives.
    let mut live = client.connect(to).await.unwrap();
    live.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(IO_TIMEOUT, live.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");

    cluster
        .apply(
            "deny-client",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: ["{}"]}}}}]
"#,
                client.principal()
            ),
        )
        .await;
    // The live connection is closed by the re-check (EOF or reset), without the client doing
    // anything.
    let closed = tokio::time::timeout(IO_TIMEOUT, async {
        let mut buf = [0u8; 64];
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
        "the live connection stayed open after a DENY for its source"
    );
    assert!(!echoed(&client.exchange(to, &data).await, &data));

    // DENY gone: ALLOW applies again.
    cluster.remove("deny-client").await;
    assert!(echoed(&client.exchange(to, &data).await, &data));
    metrics_until(&cluster, "b", "denials recorded", |m| {
        m.sum(
            "istio_tcp_connections_failed_total",
            &[("reporter", "destination"), ("response_flags", "RBAC")],
        ) >= 2.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubelet_probes_from_the_node_reach_the_app_unredirected() {
    if !needs_root() {
        return;
    }
    let cluster = two_nodes().build().await.unwrap();
    let server = cluster.pod("server");
    let node = cluster.node("b");
    assert!(captured(&cluster, "server"));
    let _app = server.serve_identity(APP_PORT).await.unwrap();

    // From the node's bridge address, as the kubelet: the app itself answers, and sees the node.
    let probe = node
        .netns()
        .exchange(server.addr(APP_PORT), b"")
        .await
        .unwrap();
    let probe = String::from_utf8(probe).unwrap();
    assert!(
        probe.starts_with(&format!("server {}:", node.bridge_ip())),
        "probe answered by {probe:?}"
    );

    // Any other plaintext source is captured: ztunnel's inbound answers, and the app sees
    // ztunnel's connection from inside the pod.
    let other = cluster
        .pod("legacy-server")
        .exchange(server.addr(APP_PORT), b"")
        .await
        .unwrap();
    let other = String::from_utf8(other).unwrap();
    assert!(
        other.starts_with(&format!("server {}:", server.ip())),
        "a non-probe source should be redirected: {other:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_without_breaking_an_in_flight_transfer() {
    if !needs_root() {
        return;
    }
    const TOTAL: usize = 20 << 20;
    const CHUNK: usize = 64 << 10;
    let cluster = two_nodes()
        .drain_deadline(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let _app = cluster.pod("server").serve_echo(APP_PORT).await.unwrap();
    let node = cluster.node("b");
    let stream = cluster
        .pod("client")
        .connect(cluster.pod("server").addr(APP_PORT))
        .await
        .unwrap();
    let data = pattern(TOTAL, 9);

    // 20 MiB, paced to about two seconds, echoed back while it is sent.
    let (mut r, mut w) = stream.into_split();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let send = async {
        let mut started = Some(started_tx);
        let mut pace = tokio::time::interval(Duration::from_millis(6));
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            pace.tick().await;
            w.write_all(chunk).await?;
            if i == 16
                && let Some(tx) = started.take()
            {
                let _ = tx.send(());
            }
        }
        w.shutdown().await
    };
    let receive = async {
        let mut received = Vec::with_capacity(TOTAL);
        r.read_to_end(&mut received).await.map(|_| received)
    };
    let drain = async {
        started_rx.await.unwrap();
        node.sigterm();
        // Readiness fails at once, while the process keeps serving the transfer.
        let (status, body) = eventually(Duration::from_secs(2), || async {
            match node.readiness().await {
                Ok((503, body)) => Ok((503, body)),
                other => Err(other),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("readiness did not turn 503 after SIGTERM: {e:?}"));
        assert!(body.contains("draining"), "{status} {body}");
        assert!(
            node.exit_status().is_none(),
            "ztunnel exited with a transfer in flight"
        );
    };
    let (sent, received, ()) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(send, receive, drain)
    })
    .await
    .expect("transfer finished");
    sent.expect("sending through the draining node");
    let received = received.expect("receiving through the draining node");
    assert_eq!(received.len(), TOTAL);
    assert!(received == data, "bytes changed in transit");

    let status = node
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("ztunnel exits once the transfer is done");
    assert!(status.success(), "ztunnel exited with {status}");
    let log = node.logs();
    assert!(log.contains("drained"), "{log}");
    assert!(
        !log.contains("drain deadline passed"),
        "the transfer finished by itself, not by the deadline: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_view_renders_a_live_nodes_config_dump() {
    use ztunnel::operator::{Output, Section, render};
    if !needs_root() {
        return;
    }
    let cluster = two_nodes().build().await.unwrap();
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _app = server.serve_echo(APP_PORT).await.unwrap();
    cluster
        .apply(
            "allow-client",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-client, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["{}"]}}}}]
"#,
                client.principal()
            ),
        )
        .await;

    // A live connection to the service, one round trip done, kept open.
    let vip = cluster.service_addr("demo", "server", SERVICE_PORT);
    let mut live = client.connect(vip).await.unwrap();
    live.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    tokio::time::timeout(IO_TIMEOUT, live.read_exact(&mut echoed))
        .await
        .expect("echo through the mesh")
        .unwrap();
    assert_eq!(&echoed, b"hello");

    let node = cluster.node("b");
    let dump = eventually(METRIC_TIMEOUT, || async {
        let dump = node.config_dump().await;
        let has_policy = dump["state"]["authorization_policies"]
            .as_array()
            .is_some_and(|p| !p.is_empty());
        let has_connection = dump["connections"]
            .as_array()
            .is_some_and(|c| !c.is_empty());
        if has_policy && has_connection {
            Ok(dump)
        } else {
            Err(dump)
        }
    })
    .await
    .unwrap_or_else(|dump| panic!("no policy or live connection in node b's dump: {dump:#}"));
    let render = |section| render(&dump, section, Output::Table).unwrap();
    let row = |text: &str, needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {needle:?} row:\n{text}"))
    };

    let workloads = render(Section::Workloads);
    assert!(workloads.starts_with("WORKLOADS"), "{workloads}");
    let row_of = |pod: &str| row(&workloads, &format!(" {pod} "));
    let server_row = row_of("server");
    for expected in [
        server.ip().to_string(),
        " b ".to_owned(),
        server.identity(),
        "yes (this node)".to_owned(),
    ] {
        assert!(server_row.contains(&expected), "{expected:?}: {server_row}");
    }
    let client_row = row_of("client");
    for expected in [
        client.ip().to_string(),
        " a ".to_owned(),
        client.identity(),
        "yes (other node)".to_owned(),
    ] {
        assert!(client_row.contains(&expected), "{expected:?}: {client_row}");
    }
    assert!(row_of("legacy-server").contains("no (not enrolled)"));

    let services = render(Section::Services);
    assert!(services.lines().next().unwrap().contains("SERVICES"));
    assert!(services.contains("WAYPOINT"), "{services}");
    let service_row = row(&services, " server ");
    assert!(
        service_row.contains(&vip.ip().to_string())
            && service_row.contains(&format!("{SERVICE_PORT}->{APP_PORT}"))
            && service_row.contains("1/1")
            && service_row.trim_end().ends_with('-'),
        "VIP, ports, endpoints and no waypoint: {service_row}"
    );

    let policies = render(Section::Policies);
    let policy_row = row(&policies, "allow-client");
    assert!(
        policy_row.contains("ALLOW") && policy_row.contains(&client.principal()),
        "{policy_row}"
    );

    let certificates = render(Section::Certificates);
    let cert_row = row(&certificates, &server.identity());
    assert!(cert_row.contains("available"), "{cert_row}");

    let connections = render(Section::Connections);
    let conn_row = row(&connections, "inbound");
    assert!(
        conn_row.contains(&client.identity()) && conn_row.contains("demo/server"),
        "the live connection with the client's identity and the server workload: {conn_row}"
    );
    assert!(
        conn_row.contains(&client.ip().to_string()),
        "from the client's address: {conn_row}"
    );
    drop(live);
}
