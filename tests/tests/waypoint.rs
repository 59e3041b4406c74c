//! End-to-end tests of the waypoint on the virtual cluster: real `ztunnel` processes per node,
//! a real `waypoint` process in its own pod, unmodified HTTP clients and sample backends that
//! report their version. They reproduce Istio's traffic-management tasks (traffic shifting,
//! request routing, fault injection, timeouts, retries, circuit breaking, outlier detection)
//! and L7 authorization, with the YAML Istio users write. Each needs root and skips without it
//! (but fails under `CI=true`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use mesh_tests::vcluster::http::{
    Backend, HttpClient, HttpVersion, grpc_frame, grpc_unframe, serve_backend,
};
use mesh_tests::vcluster::{Cluster, ClusterBuilder, eventually, needs_root};

const PORT: u16 = 9080;

/// Two nodes; `demo` is ambient and uses waypoint `waypoint` (on node a). Clients `sleep` and
/// `other` on node a; `reviews` v1 and v2 on node b behind HTTP service `reviews`, plus a
/// DestinationRule with subsets v1 and v2.
fn bookinfo() -> ClusterBuilder {
    Cluster::builder()
        .node("a")
        .node("b")
        .namespace("demo")
        .ambient()
        .namespace_label("istio.io/use-waypoint", "waypoint")
        .waypoint("a", "demo", "waypoint")
        .pod("a", "demo", "sleep")
        .pod("a", "demo", "other")
        .pod("b", "demo", "reviews-v1")
        .label("app", "reviews")
        .label("version", "v1")
        .pod("b", "demo", "reviews-v2")
        .label("app", "reviews")
        .label("version", "v2")
        .http_service("demo", "reviews", PORT, PORT)
        .yaml("destination-rule", SUBSETS)
}

const SUBSETS: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
"#;

struct Bookinfo {
    cluster: Cluster,
    v1: Backend,
    v2: Backend,
}

async fn start(builder: ClusterBuilder) -> Bookinfo {
    let cluster = builder.build().await.unwrap();
    let v1 = serve_backend(cluster.pod("reviews-v1"), PORT, "v1")
        .await
        .unwrap();
    let v2 = serve_backend(cluster.pod("reviews-v2"), PORT, "v2")
        .await
        .unwrap();
    Bookinfo { cluster, v1, v2 }
}

impl Bookinfo {
    async fn client(&self, pod: &str, version: HttpVersion) -> HttpClient {
        let addr = self.cluster.service_addr("demo", "reviews", PORT);
        HttpClient::connect(self.cluster.pod(pod), addr, version)
            .await
            .unwrap()
    }

    /// `n` GETs on one keep-alive connection; the versions that answered, counted.
    async fn versions(&self, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
        let mut client = self.client("sleep", HttpVersion::Http1).await;
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let answer = client.get("/reviews", headers).await.unwrap();
            assert_eq!(answer.status, 200, "{}", answer.text());
            *seen.entry(answer.version().to_owned()).or_default() += 1;
        }
        seen
    }
}

fn virtual_service(http: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: demo}}
spec:
  hosts: [reviews]
  http:
{http}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_shifting_50_50_then_all_to_v2() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo()).await;
    bi.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v2}
      weight: 50
"#,
            ),
        )
        .await;
    let seen = bi.versions(200, &[]).await;
    let (v1, v2) = (
        seen.get("v1").copied().unwrap_or(0),
        seen.get("v2").copied().unwrap_or(0),
    );
    assert_eq!(v1 + v2, 200, "{seen:?}");
    // 50% +-10% of 200 (a 1-in-200,000 miss for a fair split).
    assert!(
        (80..=120).contains(&v1),
        "50/50 split over 200 requests gave {seen:?}"
    );

    bi.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - route:
    - destination: {host: reviews, subset: v2}
"#,
            ),
        )
        .await;
    let seen = bi.versions(50, &[]).await;
    assert_eq!(seen.get("v2"), Some(&50), "100% to v2 gave {seen:?}");

    // Every hop was the mesh's: the waypoint reported the requests with mTLS and the client's
    // identity, and the backends were reached from the waypoint through their ztunnel.
    let metrics = bi.cluster.waypoint("waypoint").metrics().await;
    let sleep = bi.cluster.pod("sleep").identity();
    let total = metrics.sum(
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("source_principal", sleep.as_str()),
            ("connection_security_policy", "mutual_tls"),
            ("response_code", "200"),
        ],
    );
    assert!(
        total >= 250.0,
        "waypoint counted {total} requests from {sleep}"
    );
    assert!(bi.v1.requests() > 0 && bi.v2.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_match_routes_jason_to_v2() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo()).await;
    bi.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    let jason = bi.versions(20, &[("end-user", "jason")]).await;
    assert_eq!(jason.get("v2"), Some(&20), "{jason:?}");
    let others = bi.versions(20, &[("end-user", "mallory")]).await;
    assert_eq!(others.get("v1"), Some(&20), "{others:?}");
    let anonymous = bi.versions(20, &[]).await;
    assert_eq!(anonymous.get("v1"), Some(&20), "{anonymous:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delay_for_jason_and_abort() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo()).await;
    bi.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - match:
    - headers:
        end-user: {exact: jason}
    fault:
      delay:
        percentage: {value: 100}
        fixedDelay: 7s
    route:
    - destination: {host: reviews, subset: v1}
  - match:
    - headers:
        end-user: {exact: abort-me}
    fault:
      abort:
        percentage: {value: 100}
        httpStatus: 500
    route:
    - destination: {host: reviews, subset: v1}
  - route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    // A client with a 3 s timeout gives up on jason's requests...
    let mut client = bi.client("sleep", HttpVersion::Http1).await;
    let jason = client
        .send_within(
            Duration::from_secs(3),
            "GET",
            "/reviews",
            &[("end-user", "jason")],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        jason.as_ref().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::TimedOut),
        "jason's request should hang for 7 s: {jason:?}"
    );
    // ...while everybody else is fast.
    let mut client = bi.client("sleep", HttpVersion::Http1).await;
    let fast = client
        .get("/reviews", &[("end-user", "bob")])
        .await
        .unwrap();
    assert_eq!(fast.status, 200);
    assert!(fast.elapsed < Duration::from_secs(2), "{:?}", fast.elapsed);
    // Abort: 500 for that user only, made by the waypoint (the backend never sees it).
    let before = bi.v1.requests();
    let aborted = client
        .get("/reviews", &[("end-user", "abort-me")])
        .await
        .unwrap();
    assert_eq!(aborted.status, 500, "{}", aborted.text());
    assert_eq!(aborted.version(), "", "the abort comes from the waypoint");
    assert_eq!(
        bi.v1.requests(),
        before,
        "an aborted request never reaches the backend"
    );
    let metrics = bi.cluster.waypoint("waypoint").metrics().await;
    assert!(
        metrics.sum(
            "istio_requests_total",
            &[("response_code", "500"), ("response_flags", "FI")]
        ) >= 1.0,
        "the abort is counted with flag FI"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_of_the_requests_get_a_3s_delay() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo()).await;
    bi.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - fault:
      delay:
        percentage: {value: 50}
        fixedDelay: 3s
    route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    // 24 requests at once, each on its own connection: the run takes ~3 s whatever the split.
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let mut client = bi.client("sleep", HttpVersion::Http1).await;
        tasks.push(tokio::spawn(async move {
            client.get("/reviews", &[]).await.unwrap()
        }));
    }
    let mut delayed = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 200);
        if answer.elapsed >= Duration::from_secs(3) {
            delayed += 1;
        } else {
            assert!(
                answer.elapsed < Duration::from_secs(2),
                "{:?}",
                answer.elapsed
            );
        }
    }
    // Binomial(24, 0.5): 5..=19 holds with probability > 99.8%.
    assert!((5..=19).contains(&delayed), "{delayed} of 24 delayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_answers_504() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo()).await;
    bi.v1.behaviour.delay_ms.store(2000, Ordering::Relaxed);
    bi.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - timeout: 0.5s
    route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    let mut client = bi.client("sleep", HttpVersion::Http1).await;
    let answer = client.get("/reviews", &[]).await.unwrap();
    assert_eq!(answer.status, 504, "{}", answer.text());
    assert!(
        answer.elapsed >= Duration::from_millis(450)
            && answer.elapsed < Duration::from_millis(1500),
        "504 after {:?}, expected about 0.5 s",
        answer.elapsed
    );
    assert_eq!(answer.text(), "upstream request timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_a_flaky_backends_503s_into_200s() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo()).await;
    bi.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - match:
    - headers:
        x-no-retry: {exact: "1"}
    retries: {attempts: 0}
    route:
    - destination: {host: reviews, subset: v1}
  - retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: 5xx
    route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    let mut client = bi.client("sleep", HttpVersion::Http1).await;
    for round in 0..5 {
        // Two failures, then success: within 3 retries.
        bi.v1.behaviour.fail_next.store(2, Ordering::Relaxed);
        let answer = client.get("/reviews", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "round {round}: {}", answer.text());
        assert_eq!(answer.version(), "v1");
    }
    // Without retries the flaky 503 reaches the client.
    bi.v1.behaviour.fail_next.store(1, Ordering::Relaxed);
    let answer = client
        .get("/reviews", &[("x-no-retry", "1")])
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_overflows_with_503_uo() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo().yaml(
        "destination-rule",
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
"#,
    ))
    .await;
    bi.v1.behaviour.delay_ms.store(300, Ordering::Relaxed);
    bi.v2.behaviour.delay_ms.store(300, Ordering::Relaxed);
    // Four concurrent clients, several rounds. Two endpoints (v1, v2), and as in Envoy each may
    // open its first connection whatever `maxConnections` says: one request in flight on each,
    // one pending, the fourth overflows at once.
    let mut statuses = BTreeMap::new();
    for _ in 0..4 {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let mut client = bi.client("sleep", HttpVersion::Http1).await;
            tasks.push(tokio::spawn(async move {
                let answer = client.get("/reviews", &[]).await.unwrap();
                answer.status
            }));
        }
        for task in tasks {
            *statuses.entry(task.await.unwrap()).or_insert(0) += 1;
        }
    }
    assert!(statuses.contains_key(&200), "{statuses:?}");
    assert!(statuses.contains_key(&503), "{statuses:?}");
    let metrics = bi.cluster.waypoint("waypoint").metrics().await;
    let overflowed = metrics.sum(
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "UO")],
    );
    assert_eq!(
        overflowed as usize, statuses[&503],
        "every 503 is flagged UO"
    );
}

/// Istio's circuit-breaking task (istio.io, Tasks > Traffic Management > Circuit Breaking), its
/// DestinationRule as the page gives it.
const CIRCUIT_BREAKING_TASK: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"#;

/// `fortio load -c <connections> -qps 0 -n <requests> http://httpbin:8000/get`: that many
/// keep-alive connections opened first, then each sends its share of the requests back to back,
/// all at once. The statuses, counted.
async fn fortio_load(
    cluster: &Cluster,
    pod: &str,
    connections: usize,
    requests: usize,
) -> BTreeMap<u16, usize> {
    let addr = cluster.service_addr("default", "httpbin", 8000);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(
            HttpClient::connect(cluster.pod(pod), addr, HttpVersion::Http1)
                .await
                .unwrap(),
        );
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(connections));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let start = start.clone();
            // fortio gives the remainder to the first connections.
            let share = requests / connections + usize::from(i < requests % connections);
            tokio::spawn(async move {
                start.wait().await;
                let mut statuses = Vec::with_capacity(share);
                for _ in 0..share {
                    statuses.push(client.get("/get", &[]).await.unwrap().status);
                }
                statuses
            })
        })
        .collect();
    let mut counted = BTreeMap::new();
    for task in tasks {
        for status in task.await.unwrap() {
            *counted.entry(status).or_insert(0) += 1;
        }
    }
    counted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_circuit_breaking_task_two_connections_pass_three_trip() {
    if !needs_root() {
        return;
    }
    // The task's httpbin (one pod, port 8000 -> 8080) and fortio, in an ambient namespace whose
    // services use a waypoint.
    let cluster = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("default")
        .ambient()
        .namespace_label("istio.io/use-waypoint", "waypoint")
        .waypoint("a", "default", "waypoint")
        .pod("a", "default", "fortio")
        .pod("b", "default", "httpbin")
        .label("app", "httpbin")
        .http_service("default", "httpbin", 8000, 8080)
        .yaml("destination-rule", CIRCUIT_BREAKING_TASK)
        .build()
        .await
        .unwrap();
    let httpbin = serve_backend(cluster.pod("httpbin"), 8080, "v1")
        .await
        .unwrap();
    // `-c 2 -n 20`: one request on the connection, the other pending for it. With Envoy's
    // accounting as Istio's waypoint has it, the connection's slot is handed to the waiter as
    // the answer ends, before the other client can ask again, so 20 of 20 in every run
    // measured. Istio's page shows 17 and 19 of 20 from a sidecar, whose TCP connect counts as
    // pending (a request arriving then overflows); the tolerance (at least 15) accepts what
    // the page shows with room to spare, and still fails the old accounting (8-14).
    let two = fortio_load(&cluster, "fortio", 2, 20).await;
    eprintln!("circuit breaking task, -c 2 -n 20: {two:?}");
    let ok = two.get(&200).copied().unwrap_or(0);
    assert!(
        ok >= 15,
        "at least 15 of 20 answer 200, as Istio's page shows: {two:?}"
    );
    assert!(
        two.keys().all(|s| *s == 200 || *s == 503),
        "only 200 and 503: {two:?}"
    );
    // `-c 3 -n 30`: the third concurrent request finds the connection busy and the pending
    // queue full, and overflows at once.
    let three = fortio_load(&cluster, "fortio", 3, 30).await;
    eprintln!("circuit breaking task, -c 3 -n 30: {three:?}");
    let overflowed = three.get(&503).copied().unwrap_or(0);
    assert!(
        overflowed > 0,
        "three connections trip the breaker: {three:?}"
    );
    assert!(three.get(&200).copied().unwrap_or(0) > 0, "{three:?}");
    assert!(
        three.keys().all(|s| *s == 200 || *s == 503),
        "only 200 and 503: {three:?}"
    );
    // Every 503 is the waypoint's overflow (UO), none reached httpbin, and none ejected it
    // (overflows are no endpoint's fault).
    let metrics = cluster.waypoint("waypoint").metrics().await;
    let uo = metrics.sum(
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "UO")],
    );
    let all_503 = two.get(&503).copied().unwrap_or(0) + overflowed;
    assert_eq!(uo as usize, all_503, "every 503 is flagged UO");
    let served = (ok + three.get(&200).copied().unwrap_or(0)) as u64;
    assert_eq!(httpbin.requests(), served, "httpbin saw only the 200s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_stops_sending_to_a_failing_endpoint() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo().yaml(
        "destination-rule",
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 1m
      maxEjectionPercent: 100
"#,
    ))
    .await;
    bi.v2.behaviour.status.store(500, Ordering::Relaxed);
    let mut client = bi.client("sleep", HttpVersion::Http1).await;
    let mut failures = 0;
    for _ in 0..10 {
        if client.get("/reviews", &[]).await.unwrap().status == 500 {
            failures += 1;
        }
    }
    assert!(failures >= 2, "v2 should have failed before being ejected");
    // Ejected: every further request goes to v1.
    for i in 0..20 {
        let answer = client.get("/reviews", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "request {i} after ejection");
        assert_eq!(answer.version(), "v1");
    }
    // `waypoint config upstreams` shows it.
    let dump = bi
        .cluster
        .waypoint("waypoint")
        .try_config_dump()
        .await
        .unwrap();
    let view = waypoint::operator::render(
        &dump,
        waypoint::operator::Section::Upstreams,
        mesh::ops::view::Output::Table,
    )
    .unwrap();
    let v2 = bi.cluster.pod("reviews-v2").addr(PORT).to_string();
    let row = view
        .lines()
        .find(|l| l.contains(&v2))
        .unwrap_or_else(|| panic!("{view}"));
    assert!(row.contains("ejected ("), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_policy_denies_a_path_and_sees_the_original_client() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo()).await;
    let other = bi.cluster.pod("other").principal();
    bi.cluster
        .apply(
            "policy",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: demo}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin*"]
  - from:
    - source:
        principals: ["{other}"]
"#
            ),
        )
        .await;
    let mut client = bi.client("sleep", HttpVersion::Http1).await;
    let admin = client.get("/admin/users", &[]).await.unwrap();
    assert_eq!(admin.status, 403);
    assert_eq!(admin.text(), "RBAC: access denied");
    let fine = client.get("/reviews", &[]).await.unwrap();
    assert_eq!(fine.status, 200);
    // The waypoint sees `other`'s own identity (from its ztunnel), not a node's.
    let mut client = bi.client("other", HttpVersion::Http1).await;
    let denied = client.get("/reviews", &[]).await.unwrap();
    assert_eq!(denied.status, 403);

    // The destination ztunnel sees the waypoint's identity: an L4 policy on the backends that
    // allows only the waypoint keeps the mesh working.
    let waypoint_principal = "cluster.local/ns/demo/sa/waypoint";
    bi.cluster
        .apply(
            "l4",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-waypoint, namespace: demo}}
spec:
  selector:
    matchLabels: {{app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{waypoint_principal}"]
"#
            ),
        )
        .await;
    let mut client = bi.client("sleep", HttpVersion::Http1).await;
    let through = client.get("/reviews", &[]).await.unwrap();
    assert_eq!(through.status, 200, "{}", through.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http2_through_the_waypoint() {
    if !needs_root() {
        return;
    }
    let bi = start(bookinfo()).await;
    bi.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - route:
    - destination: {host: reviews, subset: v2}
"#,
            ),
        )
        .await;
    let mut client = bi.client("sleep", HttpVersion::Http2).await;
    // Plain HTTP/2, several streams on one connection.
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(client.get("/reviews", &[]).await.unwrap());
    }
    assert!(
        answers
            .iter()
            .all(|a| a.status == 200 && a.version() == "v2")
    );
    // gRPC: the message comes back and the trailers (grpc-status) pass through.
    let message = b"hello over grpc";
    let answer = client
        .send(
            "POST",
            "/demo.Echo/Echo",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            grpc_frame(message),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(
        grpc_unframe(answer.body.clone()).as_deref(),
        Some(&message[..])
    );
    let trailers = answer.trailers.clone().expect("gRPC trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    let metrics = bi.cluster.waypoint("waypoint").metrics().await;
    assert!(
        metrics.sum(
            "istio_requests_total",
            &[("request_protocol", "grpc"), ("grpc_response_status", "0")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_a_waypoint_label_bypasses_it() {
    if !needs_root() {
        return;
    }
    let bi = start(
        bookinfo()
            .pod("b", "demo", "ratings")
            .http_service("demo", "ratings", PORT, PORT)
            .service_label("istio.io/use-waypoint", "none"),
    )
    .await;
    let _ratings = serve_backend(bi.cluster.pod("ratings"), PORT, "ratings")
        .await
        .unwrap();
    let addr = bi.cluster.service_addr("demo", "ratings", PORT);
    let mut client = HttpClient::connect(bi.cluster.pod("sleep"), addr, HttpVersion::Http1)
        .await
        .unwrap();
    assert_eq!(client.get("/", &[]).await.unwrap().status, 200);
    let waypoint = bi.cluster.waypoint("waypoint");
    // Give the metrics a moment: nothing for ratings may show up at the waypoint.
    let counted = eventually(Duration::from_millis(300), || async {
        let m = waypoint.metrics().await;
        let n = m.sum(
            "istio_requests_total",
            &[("destination_service_name", "ratings")],
        );
        if n > 0.0 { Ok(n) } else { Err(n) }
    })
    .await;
    assert!(
        counted.is_err(),
        "ratings opted out but the waypoint saw it"
    );
}

/// Nodes a and b; namespace `demo` in the mesh, behind waypoint `waypoint` on node a; `sleep`
/// on a; `<app>-v1` and `<app>-v2` on b; Services `<app>` (no pods), `<app>-v1` and `<app>-v2`,
/// their ports named `<protocol>-9080`.
fn two_versions(app: &str, protocol: &'static str) -> ClusterBuilder {
    let mut builder = Cluster::builder()
        .node("a")
        .node("b")
        .namespace("demo")
        .ambient()
        .namespace_label("istio.io/use-waypoint", "waypoint")
        .waypoint("a", "demo", "waypoint")
        .pod("a", "demo", "sleep");
    for version in ["v1", "v2"] {
        let name = format!("{app}-{version}");
        builder = builder.pod("b", "demo", &name).label("app", &name);
    }
    for name in [app.to_owned(), format!("{app}-v1"), format!("{app}-v2")] {
        builder = builder.service_with_protocol("demo", &name, PORT, PORT, protocol);
    }
    builder
}

/// Builds `builder` (from [`two_versions`]) and serves `<app>-v1` and `<app>-v2` with the
/// sample backend, answering `x-version: v1` / `v2`.
async fn running(builder: ClusterBuilder, app: &str) -> (Cluster, Backend, Backend) {
    let cluster = builder.build().await.unwrap();
    let v1 = serve_backend(cluster.pod(&format!("{app}-v1")), PORT, "v1")
        .await
        .unwrap();
    let v2 = serve_backend(cluster.pod(&format!("{app}-v2")), PORT, "v2")
        .await
        .unwrap();
    (cluster, v1, v2)
}

/// The waypoint's `/config_dump` names `routes` (e.g. `HTTPRoute demo/reviews (Service
/// demo/reviews)`) as what routes a service.
async fn assert_routed_by(cluster: &Cluster, routes: &str) {
    let dump = cluster
        .waypoint("waypoint")
        .try_config_dump()
        .await
        .unwrap();
    assert!(dump.to_string().contains(routes), "{routes}: {dump}");
}

/// An HTTPRoute's filters through real ztunnels and a waypoint: a redirect (301 with the new
/// path), a prefix rewrite with request and response header edits and a mirror to another
/// version; a backend in another namespace answers 500 until a `ReferenceGrant` there allows
/// it; and a VirtualService for the same service is shadowed by the HTTPRoute (reported in
/// `waypoint_config_conflicts`), as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_http_route_filters_grants_and_a_shadowed_virtual_service() {
    if !needs_root() {
        return;
    }
    let (cluster, v1, v2) = running(
        two_versions("reviews", "http")
            .namespace("other")
            .ambient()
            .pod("b", "other", "ratings")
            .label("app", "ratings")
            .http_service("other", "ratings", PORT, PORT),
        "reviews",
    )
    .await;
    let _ratings = serve_backend(cluster.pod("ratings"), PORT, "ratings")
        .await
        .unwrap();
    cluster
        .apply(
            "route",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2api}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-added, value: "yes"}], remove: [x-drop]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-resp, value: r}]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: reviews-v2, port: 9080}}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /ratings}}]
    backendRefs: [{name: ratings, namespace: other, port: 9080}]
"#,
        )
        .await;
    let addr = cluster.service_addr("demo", "reviews", PORT);
    let mut client = HttpClient::connect(cluster.pod("sleep"), addr, HttpVersion::Http1)
        .await
        .unwrap();

    let moved = client.get("/old/page", &[]).await.unwrap();
    assert_eq!(moved.status, 301, "{}", moved.text());
    let location = moved.header("location").unwrap_or_default().to_owned();
    assert!(location.ends_with("/new"), "Location {location:?}");

    let n = 10;
    for _ in 0..n {
        let answer = client
            .get("/api/items", &[("x-drop", "secret")])
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.version(), "v1");
        assert_eq!(answer.header("x-resp"), Some("r"));
    }
    let received = v1.received();
    let last = received.last().expect("v1 got the requests");
    assert_eq!(last.path, "/v2api/items");
    assert_eq!(last.headers.get("x-added").unwrap(), "yes");
    assert!(last.headers.get("x-drop").is_none(), "{:?}", last.headers);
    // Every request was mirrored to v2 (its answers are dropped); nothing else goes there.
    let mirrored = eventually(Duration::from_secs(5), || async {
        let seen = v2.requests();
        if seen >= n { Ok(seen) } else { Err(seen) }
    })
    .await;
    assert!(
        mirrored.is_ok(),
        "v2 saw {mirrored:?} of {n} mirrored requests"
    );

    // Another namespace's Service: 500 without a ReferenceGrant there, 200 with one.
    let answer = client.get("/ratings/1", &[]).await.unwrap();
    assert_eq!(answer.status, 500, "{}", answer.text());
    cluster
        .apply(
            "grant",
            r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: reviews-to-ratings, namespace: other}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: demo}]
  to: [{group: "", kind: Service, name: ratings}]
"#,
        )
        .await;
    let answer = client.get("/ratings/1", &[]).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.version(), "ratings");

    // A VirtualService for the same service: the HTTPRoute stays in force, the VirtualService
    // is reported shadowed.
    cluster
        .apply(
            "vs",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: demo}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews-v2}}]
"#,
        )
        .await;
    let answer = client.get("/api/items", &[]).await.unwrap();
    assert_eq!(answer.version(), "v1");
    let metrics = cluster.waypoint("waypoint").metrics().await;
    assert!(
        metrics.sum("waypoint_config_conflicts", &[]) >= 1.0,
        "{}",
        metrics.text()
    );
}

/// A Gateway API `GRPCRoute` on a Service routes gRPC calls by service and method at the
/// waypoint: `demo.Echo/Shout` to v2, every other call to v1; the calls' messages and
/// `grpc-status` trailers come through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_grpc_route_routes_by_method() {
    if !needs_root() {
        return;
    }
    let (cluster, _v1, _v2) = running(two_versions("echo", "grpc"), "echo").await;
    cluster
        .apply(
            "route",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: echo
  namespace: demo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
    port: 9080
  rules:
  - matches:
    - method:
        service: demo.Echo
        method: Shout
    backendRefs:
    - name: echo-v2
      port: 9080
  - backendRefs:
    - name: echo-v1
      port: 9080
"#,
        )
        .await;
    let addr = cluster.service_addr("demo", "echo", PORT);
    let mut client = HttpClient::connect(cluster.pod("sleep"), addr, HttpVersion::Http2)
        .await
        .unwrap();
    for (method, version) in [
        ("/demo.Echo/Shout", "v2"),
        ("/demo.Echo/Echo", "v1"),
        ("/demo.Other/Shout", "v1"),
    ] {
        for _ in 0..20 {
            let message = b"a gRPC message";
            let answer = client
                .send(
                    "POST",
                    method,
                    &[("content-type", "application/grpc"), ("te", "trailers")],
                    grpc_frame(message),
                )
                .await
                .unwrap();
            assert_eq!(answer.status, 200, "{method}: {}", answer.text());
            assert_eq!(answer.version(), version, "{method}");
            assert_eq!(
                grpc_unframe(answer.body.clone()).as_deref(),
                Some(&message[..])
            );
            let trailers = answer.trailers.clone().expect("gRPC trailers");
            assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        }
    }
    assert_routed_by(&cluster, "GRPCRoute demo/echo (Service demo/echo)").await;
}

/// A Gateway API `TCPRoute` on a Service splits its connections by weight at the waypoint
/// (80/20 over 400 connections); the bytes arrive intact both ways. Moving all the weight to
/// v2 sends every new connection there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_tcp_route_splits_connections() {
    if !needs_root() {
        return;
    }
    // The backends speak HTTP/1.1 so each connection can say which one it reached; the
    // service's port is plain TCP, so the waypoint forwards the bytes without reading them.
    let (cluster, _v1, _v2) = running(two_versions("db", "tcp"), "db").await;
    let route = |v1: u32, v2: u32| {
        format!(
            r#"
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: db
  namespace: demo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: db
  rules:
  - backendRefs:
    - name: db-v1
      port: 9080
      weight: {v1}
    - name: db-v2
      port: 9080
      weight: {v2}
"#
        )
    };
    let connections = |n: usize| {
        let cluster = &cluster;
        async move {
            let addr = cluster.service_addr("demo", "db", PORT);
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..n {
                let mut client =
                    HttpClient::connect(cluster.pod("sleep"), addr, HttpVersion::Http1)
                        .await
                        .unwrap();
                let answer = client.get("/db", &[]).await.unwrap();
                assert_eq!(answer.status, 200, "{}", answer.text());
                *seen.entry(answer.version().to_owned()).or_default() += 1;
            }
            seen
        }
    };
    cluster.apply("route", &route(80, 20)).await;
    let seen = connections(400).await;
    let v2 = seen.get("v2").copied().unwrap_or(0);
    assert_eq!(seen.values().sum::<usize>(), 400, "{seen:?}");
    // binomial(400, 0.2): 80 +- 34 is 4.2 standard deviations.
    assert!(
        (46..=114).contains(&v2),
        "80/20 over 400 connections gave {seen:?}"
    );
    cluster.apply("route", &route(0, 1)).await;
    assert_eq!(connections(30).await.get("v2"), Some(&30));
    assert_routed_by(&cluster, "TCPRoute demo/db (Service demo/db)").await;
}

/// Istio's ambient getting-started guide routes `reviews` with a Gateway API `HTTPRoute` whose
/// parent is the Service, not with a VirtualService: 90 % to `reviews-v1`, 10 % to
/// `reviews-v2`, then everything to v1, and `end-user: jason` to v2. The YAML is the guide's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_http_route_splits_90_10_as_the_getting_started_guide() {
    if !needs_root() {
        return;
    }
    let (cluster, _v1, _v2) = running(two_versions("reviews", "http"), "reviews").await;
    let route = |rules: &str| {
        format!(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: demo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  rules:
{rules}"#
        )
    };
    let versions = |n: usize, headers: &'static [(&'static str, &'static str)]| {
        let cluster = &cluster;
        async move {
            let addr = cluster.service_addr("demo", "reviews", PORT);
            let mut client = HttpClient::connect(cluster.pod("sleep"), addr, HttpVersion::Http1)
                .await
                .unwrap();
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..n {
                let answer = client.get("/reviews/1", headers).await.unwrap();
                assert_eq!(answer.status, 200, "{}", answer.text());
                *seen.entry(answer.version().to_owned()).or_default() += 1;
            }
            seen
        }
    };

    cluster
        .apply(
            "route",
            &route(
                r#"
  - backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v2
      port: 9080
      weight: 10
"#,
            ),
        )
        .await;
    let seen = versions(1000, &[]).await;
    let v2 = seen.get("v2").copied().unwrap_or(0);
    assert_eq!(seen.values().sum::<usize>(), 1000, "{seen:?}");
    // binomial(1000, 0.1): 100 +- 40 is 4.2 standard deviations (a 1-in-40,000 miss).
    assert!(
        (60..=140).contains(&v2),
        "90/10 over 1,000 requests gave {seen:?}"
    );

    cluster
        .apply(
            "route",
            &route(
                r#"
  - matches:
    - headers:
      - name: end-user
        value: jason
    backendRefs:
    - name: reviews-v2
      port: 9080
  - backendRefs:
    - name: reviews-v1
      port: 9080
"#,
            ),
        )
        .await;
    assert_eq!(versions(50, &[]).await.get("v1"), Some(&50));
    assert_eq!(
        versions(50, &[("end-user", "jason")]).await.get("v2"),
        Some(&50)
    );

    // The waypoint names the HTTPRoute as what routes the service.
    assert_routed_by(&cluster, "HTTPRoute demo/reviews (Service demo/reviews)").await;
}
