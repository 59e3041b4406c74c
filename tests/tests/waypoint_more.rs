//! More end-to-end tests of the waypoint on the virtual cluster (see `waypoint.rs` for the
//! Istio tasks): bad input from clients (oversized, malformed, smuggled, stalled), bad
//! configuration (invalid objects, unknown subsets, conflicting and dangling VirtualServices),
//! the route features the tasks do not cover (redirects, direct responses, rewrites, header
//! edits, mirrors, CORS, load balancing, retries, upgrades, large bodies), TCP and undeclared
//! ports, L7 policies and the access log. Each builds its own cluster, needs root and skips
//! without it (but fails under `CI=true`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use mesh_tests::vcluster::http::{
    Answer, Backend, HttpClient, HttpVersion, grpc_frame, grpc_unframe, raw_request,
    read_response_head, serve_backend,
};
use mesh_tests::vcluster::{Cluster, ClusterBuilder, Waypoint, eventually, needs_root, pattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 9080;
/// The service hostname the waypoint reports for `reviews`.
const REVIEWS_HOST: &str = "reviews.demo.svc.cluster.local";
/// How long a condition that should already hold may take to show (logs, metrics, mirrors).
const SHOW_UP: Duration = Duration::from_secs(5);

/// Two nodes; `demo` is ambient and uses waypoint `waypoint` (on node a). Clients `sleep` and
/// `other` on node a; `reviews` v1 and v2 on node b behind HTTP service `reviews`, with a
/// DestinationRule defining subsets v1 and v2.
fn mesh() -> ClusterBuilder {
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
        .yaml("destination-rule", &destination_rule(""))
}

/// The `reviews` DestinationRule with subsets v1 and v2 and `traffic_policy` (YAML under
/// `trafficPolicy:`, indented by four spaces; empty for none).
fn destination_rule(traffic_policy: &str) -> String {
    let policy = if traffic_policy.is_empty() {
        String::new()
    } else {
        format!("  trafficPolicy:\n{traffic_policy}")
    };
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: demo}}
spec:
  host: reviews
{policy}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"#
    )
}

/// The `reviews` VirtualService with these `http` routes (YAML list items, indented by two).
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

struct Mesh {
    cluster: Cluster,
    v1: Backend,
    v2: Backend,
}

async fn start(builder: ClusterBuilder) -> Mesh {
    let cluster = builder.build().await.unwrap();
    let v1 = serve_backend(cluster.pod("reviews-v1"), PORT, "v1")
        .await
        .unwrap();
    let v2 = serve_backend(cluster.pod("reviews-v2"), PORT, "v2")
        .await
        .unwrap();
    Mesh { cluster, v1, v2 }
}

impl Mesh {
    fn waypoint(&self) -> &Waypoint {
        self.cluster.waypoint("waypoint")
    }

    fn reviews(&self) -> std::net::SocketAddr {
        self.cluster.service_addr("demo", "reviews", PORT)
    }

    async fn client(&self, pod: &str, version: HttpVersion) -> HttpClient {
        HttpClient::connect(self.cluster.pod(pod), self.reviews(), version)
            .await
            .unwrap()
    }

    /// One GET from `sleep` on a fresh HTTP/1.1 connection.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut client = self.client("sleep", HttpVersion::Http1).await;
        client.get(path, headers).await.unwrap()
    }

    /// `n` GETs from `pod` on one keep-alive connection; the versions that answered, counted.
    async fn versions_from(
        &self,
        pod: &str,
        n: usize,
        headers: &[(&str, &str)],
    ) -> BTreeMap<String, usize> {
        let mut client = self.client(pod, HttpVersion::Http1).await;
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let answer = client.get("/reviews", headers).await.unwrap();
            assert_eq!(answer.status, 200, "{}", answer.text());
            *seen.entry(answer.version().to_owned()).or_default() += 1;
        }
        seen
    }

    async fn versions(&self, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
        self.versions_from("sleep", n, headers).await
    }

    /// The waypoint still runs and still serves: the answer to everything bad input must not
    /// break.
    async fn assert_still_serving(&self) {
        assert!(
            self.waypoint().is_alive(),
            "the waypoint exited:\n{}",
            self.waypoint().logs()
        );
        let answer = self.get("/reviews", &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(!answer.version().is_empty(), "answered by a backend");
    }

    /// The waypoint's access-log lines that contain every one of `needles`.
    fn access_lines(&self, needles: &[&str]) -> Vec<String> {
        self.waypoint()
            .logs()
            .lines()
            .filter(|l| l.contains("access") && l.contains("request complete"))
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until exactly one access-log line contains every one of `needles`, and returns it.
    async fn access_line(&self, needles: &[&str]) -> String {
        let found = eventually(SHOW_UP, || async {
            match self.access_lines(needles).as_slice() {
                [line] => Ok(line.clone()),
                other => Err(other.len()),
            }
        })
        .await;
        match found {
            Ok(line) => line,
            Err(n) => panic!(
                "{n} access-log lines with {needles:?}, expected 1:\n{}",
                self.waypoint().logs()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input from clients.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_gets_431_and_the_waypoint_keeps_serving() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    let addr = m.reviews();
    let sleep = m.cluster.pod("sleep");

    // One header of 70 KiB: over the 64 KiB limit on a request head.
    let mut big = format!("GET /big HTTP/1.1\r\nhost: {addr}\r\nx-big: ").into_bytes();
    big.extend(std::iter::repeat_n(b'a', 70 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let head = raw_request(sleep, addr, &big).await.unwrap();
    assert_eq!(head.status, 431, "{}", head.head);

    // Many small headers (more than any proxy keeps): a clear 4xx as well.
    let mut many = format!("GET /many HTTP/1.1\r\nhost: {addr}\r\n");
    for i in 0..500 {
        many.push_str(&format!("x-h{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let head = raw_request(sleep, addr, many.as_bytes()).await.unwrap();
    assert!(
        (400..500).contains(&head.status),
        "500 headers: {}",
        head.head
    );

    // A 70 KiB request target.
    let long = format!(
        "GET /long/{} HTTP/1.1\r\nhost: {addr}\r\n\r\n",
        "c".repeat(70 * 1024)
    );
    let head = raw_request(sleep, addr, long.as_bytes()).await.unwrap();
    assert!(
        matches!(head.status, 414 | 431),
        "70 KiB URI: {}",
        head.head
    );

    // HTTP/2: a header list over the limit is refused with 431 on that stream; the
    // connection stays usable.
    let mut h2 = m.client("sleep", HttpVersion::Http2).await;
    let huge = "b".repeat(70 * 1024);
    match h2.get("/big-h2", &[("x-big", &huge)]).await {
        Ok(answer) => assert_eq!(answer.status, 431, "{}", answer.text()),
        Err(e) => panic!("HTTP/2 oversized headers: no status but {e}"),
    }
    let fine = h2.get("/reviews", &[]).await.unwrap();
    assert_eq!(fine.status, 200, "{}", fine.text());

    for backend in [&m.v1, &m.v2] {
        assert!(
            !backend.received().iter().any(|r| ["/big", "/many", "/long"]
                .iter()
                .any(|p| r.path.starts_with(p))),
            "an oversized request reached a backend"
        );
    }
    m.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_400_and_the_waypoint_keeps_serving() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    let addr = m.reviews();
    let sleep = m.cluster.pod("sleep");
    let host = format!("host: {addr}\r\n");
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("a request line without a version", b"GET /\r\nxx".to_vec()),
        (
            "a header line without a colon",
            format!("GET / HTTP/1.1\r\n{host}no colon here\r\n\r\n").into_bytes(),
        ),
        (
            "a non-numeric content-length",
            format!("POST / HTTP/1.1\r\n{host}content-length: abc\r\n\r\n").into_bytes(),
        ),
        (
            "a control character in a header value",
            format!("GET / HTTP/1.1\r\n{host}x-bad: a\x01b\r\n\r\n").into_bytes(),
        ),
        (
            "a TLS ClientHello on a plaintext HTTP port",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03rest of a hello\r\n\r\n".to_vec(),
        ),
    ];
    cases.push((
        "a transfer-encoding that does not end in chunked",
        format!("POST / HTTP/1.1\r\n{host}transfer-encoding: gzip\r\n\r\nxx").into_bytes(),
    ));
    for (what, bytes) in cases {
        let head = raw_request(sleep, addr, &bytes)
            .await
            .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        assert_eq!(head.status, 400, "{what}: {}", head.head);
    }
    assert_eq!(
        m.v1.requests() + m.v2.requests(),
        0,
        "nothing was forwarded"
    );

    // Request smuggling (content-length and chunked at once): the chunked framing wins, the
    // backend gets one request whose body holds the would-be second one, never two.
    let smuggled = "GET /smuggled HTTP/1.1\r\nx: y\r\n\r\n";
    let request = format!(
        "POST /smuggle HTTP/1.1\r\n{host}content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n\
         {:x}\r\n{smuggled}\r\n0\r\n\r\n",
        smuggled.len()
    );
    let mut stream = sleep.connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_response_head(&mut stream, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        matches!(head.status, 200 | 400),
        "smuggling attempt: {}",
        head.head
    );
    // Whatever else the connection carries, the backend never sees the smuggled request.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await
    })
    .await;
    let paths: Vec<String> =
        m.v1.received()
            .into_iter()
            .chain(m.v2.received())
            .map(|r| r.path)
            .collect();
    assert!(
        paths.iter().all(|p| p == "/smuggle"),
        "the backends saw {paths:?}"
    );
    m.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_do_not_block_others() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    let addr = m.reviews();
    let sleep = m.cluster.pod("sleep");
    // Twenty clients stall in the middle of their request head, ten after sending half of a
    // body, five without sending anything.
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut s = sleep.connect(addr).await.unwrap();
        s.write_all(format!("GET /stall-{i} HTTP/1.1\r\nhost: {addr}\r\nx-partial: ").as_bytes())
            .await
            .unwrap();
        stalled.push(s);
    }
    for i in 0..10 {
        let mut s = sleep.connect(addr).await.unwrap();
        s.write_all(
            format!("POST /half-body-{i} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 1000\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        s.write_all(&[b'x'; 500]).await.unwrap();
        stalled.push(s);
    }
    for _ in 0..5 {
        stalled.push(sleep.connect(addr).await.unwrap());
    }

    // Meanwhile everybody else is served at once, concurrently.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut client = m.client("sleep", HttpVersion::Http1).await;
        tasks.push(tokio::spawn(async move {
            client.get("/reviews", &[]).await.unwrap()
        }));
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        // (The stalled ones wait for the 30 s header read timeout.)
        assert!(
            answer.elapsed < Duration::from_secs(5),
            "a request took {:?} next to stalled clients",
            answer.elapsed
        );
    }
    // The stalled clients got no answer (their request is not complete), and none was
    // forwarded as if it were.
    for s in &mut stalled[..20] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "a client with half a request head got {read:?}"
        );
    }
    assert!(
        !m.v1
            .received()
            .iter()
            .chain(m.v2.received().iter())
            .any(|r| r.path.starts_with("/stall")),
        "a request with an incomplete head was forwarded"
    );
    drop(stalled);
    m.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Bad configuration.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_regex_is_rejected_and_the_last_good_version_stays() {
    if !needs_root() {
        return;
    }
    let m = start(
        mesh()
            .pod("b", "demo", "ratings")
            .http_service("demo", "ratings", PORT, PORT),
    )
    .await;
    let _ratings = serve_backend(m.cluster.pod("ratings"), PORT, "ratings")
        .await
        .unwrap();
    let ratings_vs = |tag: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: demo}}
spec:
  hosts: [ratings]
  http:
  - headers:
      response:
        set: {{x-route: {tag}}}
    route:
    - destination: {{host: ratings}}
"#
        )
    };
    let good = virtual_service(
        r#"
  - match:
    - uri: {regex: "/reviews(/.*)?"}
    route:
    - destination: {host: reviews, subset: v2}
"#,
    );
    m.cluster
        .apply("vs", &format!("{good}\n---\n{}", ratings_vs("one")))
        .await;
    assert_eq!(m.versions(10, &[]).await.get("v2"), Some(&10));
    let rejected_before = m
        .waypoint()
        .metrics()
        .await
        .sum("mesh_config_rejected_total", &[("kind", "VirtualService")]);

    // The same file: reviews gets a pattern that does not compile, ratings a good change.
    let bad = virtual_service(
        r#"
  - match:
    - uri: {regex: "/reviews([unclosed"}
    route:
    - destination: {host: reviews, subset: v1}
"#,
    );
    m.cluster
        .apply("vs", &format!("{bad}\n---\n{}", ratings_vs("two")))
        .await;
    let rejected = m
        .waypoint()
        .metrics()
        .await
        .sum("mesh_config_rejected_total", &[("kind", "VirtualService")]);
    assert!(
        rejected > rejected_before,
        "the invalid VirtualService was not counted as rejected ({rejected_before} -> {rejected})"
    );
    // The previous good version of reviews stays in force...
    assert_eq!(
        m.versions(10, &[]).await.get("v2"),
        Some(&10),
        "the last good VirtualService must stay in force"
    );
    // ...and the good object next to the bad one applies.
    let ratings = m.cluster.service_addr("demo", "ratings", PORT);
    let mut client = HttpClient::connect(m.cluster.pod("sleep"), ratings, HttpVersion::Http1)
        .await
        .unwrap();
    let answer = client.get("/", &[]).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.version(), "ratings");
    assert_eq!(answer.header("x-route"), Some("two"));
    // The operator can tell why from the log.
    assert!(
        m.waypoint().logs().contains("unclosed"),
        "the rejection names the bad pattern:\n{}",
        m.waypoint().logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_an_unknown_subset_answers_503_and_says_why() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - match:
    - uri: {prefix: /v3}
    route:
    - destination: {host: reviews, subset: v3}
  - route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    let answer = m.get("/v3/unknown-subset", &[]).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.text(), "no healthy upstream");
    assert_eq!(answer.version(), "", "made by the waypoint");
    // Other routes of the same VirtualService work.
    assert_eq!(m.get("/reviews", &[]).await.version(), "v1");

    let line = m.access_line(&["/v3/unknown-subset"]).await;
    for expected in ["status=503", "flags=\"NC\"", "subset=v3", "v3"] {
        assert!(line.contains(expected), "{expected:?} missing in {line}");
    }
    // (Counted before it was logged.)
    let metrics = m.waypoint().metrics().await;
    assert_eq!(
        metrics.sum(
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "NC")]
        ),
        1.0,
        "the 503 is counted with flag NC"
    );
    assert!(
        line.contains("no such subset"),
        "the access log says why: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_older_of_two_virtual_services_for_a_host_wins() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    // The newer one sorts first by name and by file; only its creation time makes it lose.
    let vs = |name: &str, created: &str, subset: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: demo, creationTimestamp: "{created}"}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: {subset}}}
"#
        )
    };
    m.cluster
        .apply("a-newer", &vs("aa-newer", "2024-06-01T00:00:00Z", "v2"))
        .await;
    m.cluster
        .apply("z-older", &vs("zz-older", "2020-01-01T00:00:00Z", "v1"))
        .await;
    assert_eq!(
        m.versions(20, &[]).await.get("v1"),
        Some(&20),
        "the older VirtualService (zz-older, to v1) wins"
    );
    let metrics = m.waypoint().metrics().await;
    assert_eq!(
        metrics.sum(
            "waypoint_config_conflicts",
            &[
                ("host", REVIEWS_HOST),
                ("winner", "demo/zz-older"),
                ("shadowed", "demo/aa-newer"),
            ],
        ),
        1.0,
        "the shadowed VirtualService is reported:\n{}",
        metrics.text()
    );
    assert!(m.waypoint().logs().contains("is shadowed"));

    // Without the older one, the other applies and the conflict is over.
    m.cluster.remove("z-older").await;
    assert_eq!(m.versions(20, &[]).await.get("v2"), Some(&20));
    let metrics = m.waypoint().metrics().await;
    assert_eq!(metrics.sum("waypoint_config_conflicts", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_for_a_host_that_does_not_exist_disturbs_nothing() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
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
    m.cluster
        .apply(
            "ghosts",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ghost, namespace: demo}
spec:
  hosts: [ghost, nowhere.example.com]
  http:
  - fault:
      abort:
        percentage: {value: 100}
        httpStatus: 500
    route:
    - destination: {host: ghost}
  tcp:
  - route:
    - destination: {host: nowhere.example.com}
"#,
        )
        .await;
    assert_eq!(m.versions(20, &[]).await.get("v2"), Some(&20));
    let metrics = m.waypoint().metrics().await;
    assert_eq!(
        metrics.sum("mesh_config_rejected_total", &[("kind", "VirtualService")]),
        0.0,
        "the dangling VirtualService is valid and was accepted"
    );
    assert_eq!(metrics.sum("waypoint_config_conflicts", &[]), 0.0);
    assert_eq!(
        metrics.sum("istio_requests_total", &[("response_code", "500")]),
        0.0
    );
    m.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Route features.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_answers_301_with_the_new_location() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - match:
    - uri: {prefix: /old}
    redirect:
      uri: /new-place
  - match:
    - uri: {prefix: /elsewhere}
    redirect:
      authority: example.com
      scheme: https
      redirectCode: 302
  - route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    let addr = m.reviews();
    let answer = m.get("/old/page?x=1", &[]).await;
    assert_eq!(answer.status, 301, "{}", answer.text());
    assert_eq!(
        answer.header("location"),
        Some(format!("http://{addr}/new-place?x=1").as_str())
    );
    let answer = m.get("/elsewhere/a", &[]).await;
    assert_eq!(answer.status, 302);
    assert_eq!(
        answer.header("location"),
        Some("https://example.com/elsewhere/a")
    );
    // Over HTTP/2 the authority comes from `:authority`.
    let mut h2 = m.client("sleep", HttpVersion::Http2).await;
    let answer = h2.get("/old", &[]).await.unwrap();
    assert_eq!(answer.status, 301);
    assert_eq!(
        answer.header("location"),
        Some(format!("http://{addr}/new-place").as_str())
    );
    assert_eq!(m.v1.requests() + m.v2.requests(), 0, "redirects are local");
    assert_eq!(m.get("/reviews", &[]).await.version(), "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_response_answers_status_and_body() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - match:
    - uri: {exact: /maintenance}
    directResponse:
      status: 503
      body:
        string: "down for maintenance"
  - match:
    - uri: {exact: /teapot}
    directResponse:
      status: 418
  - route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    let answer = m.get("/maintenance", &[]).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.text(), "down for maintenance");
    assert_eq!(answer.header("content-type"), Some("text/plain"));
    let answer = m.get("/teapot", &[]).await;
    assert_eq!(answer.status, 418);
    assert!(answer.body.is_empty());
    assert_eq!(m.v1.requests(), 0, "direct responses are local");
    // Over HTTP/2 as well.
    let mut h2 = m.client("sleep", HttpVersion::Http2).await;
    let answer = h2.get("/maintenance", &[]).await.unwrap();
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (503, "down for maintenance")
    );
    assert_eq!(m.get("/other", &[]).await.version(), "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_changes_the_path_and_authority_the_backend_sees() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - match:
    - uri: {prefix: /api/v1/}
    rewrite:
      uri: /reviews/
      authority: reviews.internal
    route:
    - destination: {host: reviews, subset: v1}
  - route:
    - destination: {host: reviews, subset: v2}
"#,
            ),
        )
        .await;
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let mut client = m.client("sleep", version).await;
        let answer = client.get("/api/v1/123?x=y", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.version(), "v1");
        assert!(
            answer.text().contains("path=/reviews/123?x=y "),
            "{version:?}: the backend saw {}",
            answer.text()
        );
    }
    let received = m.v1.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        assert_eq!(r.path, "/reviews/123?x=y");
        assert_eq!(r.authority.as_deref(), Some("reviews.internal"), "{r:?}");
    }
    // Paths outside the prefix are untouched.
    let answer = m.get("/api/v2/123", &[]).await;
    assert_eq!(answer.version(), "v2");
    assert!(
        answer.text().contains("path=/api/v2/123 "),
        "{}",
        answer.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_edits_reach_the_backend_and_the_client() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - headers:
      request:
        set: {x-set: from-waypoint}
        add: {x-added: added}
        remove: [x-secret]
      response:
        set: {x-resp: set}
        add: {x-resp-added: "yes"}
        remove: [x-pod]
    route:
    - destination: {host: reviews, subset: v1}
      headers:
        request:
          set: {x-destination: v1}
"#,
            ),
        )
        .await;
    let answer = m
        .get(
            "/headers",
            &[
                ("x-set", "from-client"),
                ("x-secret", "s3cret"),
                ("x-kept", "k"),
            ],
        )
        .await;
    assert_eq!(answer.status, 200);
    // The client sees the response edits.
    assert_eq!(answer.header("x-resp"), Some("set"));
    assert_eq!(answer.header("x-resp-added"), Some("yes"));
    assert_eq!(answer.header("x-pod"), None, "removed from the response");
    assert_eq!(answer.version(), "v1", "other response headers stay");
    // The backend saw the request edits.
    let received = m.v1.received();
    let [r] = received.as_slice() else {
        panic!("{received:?}");
    };
    let header = |name: &str| {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(header("x-set"), ["from-waypoint"]);
    assert_eq!(header("x-added"), ["added"]);
    assert_eq!(header("x-destination"), ["v1"]);
    assert_eq!(header("x-kept"), ["k"]);
    assert!(header("x-secret").is_empty(), "x-secret must be removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_copies_every_request_and_the_client_gets_the_primary_answer() {
    if !needs_root() {
        return;
    }
    let m = start(
        mesh()
            .pod("b", "demo", "shadow")
            .http_service("demo", "shadow", PORT, PORT),
    )
    .await;
    let shadow = serve_backend(m.cluster.pod("shadow"), PORT, "shadow")
        .await
        .unwrap();
    // The mirror is slow and failing: the client must not notice.
    shadow.behaviour.delay_ms.store(10_000, Ordering::Relaxed);
    shadow.behaviour.status.store(500, Ordering::Relaxed);
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - route:
    - destination: {host: reviews, subset: v1}
    mirror: {host: shadow}
    mirrorPercentage: {value: 100}
"#,
            ),
        )
        .await;
    let mut h1 = m.client("sleep", HttpVersion::Http1).await;
    let mut h2 = m.client("sleep", HttpVersion::Http2).await;
    for i in 0..10 {
        let client = if i < 5 { &mut h1 } else { &mut h2 };
        let (method, body) = if i % 2 == 0 {
            ("GET", Bytes::new())
        } else {
            ("POST", Bytes::from_static(b"mirrored body"))
        };
        let answer = client
            .send(method, &format!("/mirror/{i}"), &[], body)
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.version(), "v1", "the primary answers");
        assert!(
            answer.elapsed < Duration::from_secs(5),
            "the slow mirror delayed the client: {:?}",
            answer.elapsed
        );
    }
    assert_eq!(m.v1.requests(), 10);
    let copies = eventually(SHOW_UP, || async {
        let n = shadow.requests();
        if n >= 10 { Ok(n) } else { Err(n) }
    })
    .await;
    assert_eq!(
        copies,
        Ok(10),
        "the mirror receives a copy of every request"
    );
    let received = shadow.received();
    let paths: BTreeSet<_> = received.iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths.len(), 10, "{paths:?}");
    assert!(received.iter().any(|r| r.method == "POST"));
    // Envoy marks mirrored requests with a `-shadow` authority.
    for r in &received {
        let host = r.authority.as_deref().unwrap_or_default();
        assert!(host.ends_with("-shadow"), "mirror saw host {host:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_from_an_allowed_origin_is_answered_by_the_waypoint() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - corsPolicy:
      allowOrigins:
      - exact: https://good.example
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      exposeHeaders: [x-version]
      maxAge: 24h
    route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    let preflight = |origin: &'static str| {
        [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "x-custom"),
        ]
    };
    let answer = client
        .send(
            "OPTIONS",
            "/cors",
            &preflight("https://good.example"),
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("https://good.example")
    );
    assert_eq!(
        answer.header("access-control-allow-methods"),
        Some("GET,POST")
    );
    assert_eq!(
        answer.header("access-control-allow-headers"),
        Some("x-custom")
    );
    assert_eq!(answer.header("access-control-max-age"), Some("86400"));
    assert_eq!(answer.version(), "", "answered by the waypoint");
    assert_eq!(
        m.v1.requests(),
        0,
        "the backend never sees an allowed preflight"
    );

    // A disallowed origin's preflight is forwarded, and gets no CORS headers.
    let answer = client
        .send(
            "OPTIONS",
            "/cors",
            &preflight("https://evil.example"),
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(answer.version(), "v1", "forwarded to the backend");
    assert_eq!(answer.header("access-control-allow-origin"), None);
    let received = m.v1.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].method, "OPTIONS");

    // The actual request from the allowed origin gets the CORS response headers.
    let answer = client
        .get("/cors", &[("origin", "https://good.example")])
        .await
        .unwrap();
    assert_eq!(answer.version(), "v1");
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("https://good.example")
    );
    assert_eq!(
        answer.header("access-control-expose-headers"),
        Some("x-version")
    );
}

// ---------------------------------------------------------------------------------------------
// Load balancing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_user_a_cookie_and_a_client_on_one_version() {
    if !needs_root() {
        return;
    }
    let m = start(mesh().yaml(
        "destination-rule",
        &destination_rule("    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n"),
    ))
    .await;
    for user in ["alice", "bob"] {
        let seen = m.versions(30, &[("x-user", user)]).await;
        assert_eq!(seen.len(), 1, "{user} was spread over {seen:?}");
    }
    // Different users spread over both versions (each user's pick is stable).
    let mut by_user = BTreeMap::new();
    for i in 0..20 {
        let user = format!("user-{i}");
        let seen = m.versions(3, &[("x-user", &user)]).await;
        assert_eq!(seen.len(), 1, "{user}: {seen:?}");
        by_user.insert(user, seen.into_keys().next().unwrap());
    }
    let versions: BTreeSet<_> = by_user.values().cloned().collect();
    assert_eq!(
        versions.len(),
        2,
        "20 users all hashed to one version: {by_user:?}"
    );

    // A cookie with a ttl: the waypoint makes one for a client without it, and the client
    // that sends it back stays on one version.
    m.cluster
        .apply(
            "destination-rule",
            &destination_rule(
                "    loadBalancer:\n      consistentHash:\n        httpCookie: {name: session, ttl: 60s}\n",
            ),
        )
        .await;
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    let first = client.get("/reviews", &[]).await.unwrap();
    let set_cookie = first
        .header("set-cookie")
        .expect("a generated cookie")
        .to_owned();
    assert!(
        set_cookie.starts_with("session=") && set_cookie.contains("Max-Age=60"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let answer = client
            .get("/reviews", &[("cookie", &cookie)])
            .await
            .unwrap();
        assert_eq!(answer.header("set-cookie"), None, "the cookie was sent");
        seen.insert(answer.version().to_owned());
    }
    assert_eq!(seen.len(), 1, "the cookie {cookie} spread over {seen:?}");

    // The source address: each client stays on one version.
    m.cluster
        .apply(
            "destination-rule",
            &destination_rule("    loadBalancer:\n      consistentHash: {useSourceIp: true}\n"),
        )
        .await;
    for pod in ["sleep", "other"] {
        let seen = m.versions_from(pod, 20, &[]).await;
        assert_eq!(seen.len(), 1, "{pod} was spread over {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_and_least_request_spread_over_two_endpoints() {
    if !needs_root() {
        return;
    }
    let m = start(mesh().yaml(
        "destination-rule",
        &destination_rule("    loadBalancer: {simple: ROUND_ROBIN}\n"),
    ))
    .await;
    // Round robin alternates.
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    let mut order = Vec::new();
    for _ in 0..20 {
        order.push(
            client
                .get("/reviews", &[])
                .await
                .unwrap()
                .version()
                .to_owned(),
        );
    }
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "round robin should alternate: {order:?}"
    );

    // Least request (P2C) with equal load spreads too.
    m.cluster
        .apply(
            "destination-rule",
            &destination_rule("    loadBalancer: {simple: LEAST_REQUEST}\n"),
        )
        .await;
    let seen = m.versions(60, &[]).await;
    let (v1, v2) = (
        seen.get("v1").copied().unwrap_or(0),
        seen.get("v2").copied().unwrap_or(0),
    );
    // Binomial(60, 0.5) outside 15..=45 is a one-in-10,000 event.
    assert!(
        (15..=45).contains(&v1) && v1 + v2 == 60,
        "LEAST_REQUEST over 60 requests gave {seen:?}"
    );
    // A busy endpoint gets the new requests less: v1 holds 4 slow requests, so nearly
    // everything new goes to v2.
    // A busy endpoint gets no new requests while the other is idle: P2C over two hosts always
    // compares both. Requests go out one by one until one lands on the slow v1 and stays.
    m.v1.behaviour.delay_ms.store(3000, Ordering::Relaxed);
    let before = m.v1.requests();
    let mut busy = None;
    for _ in 0..30 {
        let mut client = m.client("other", HttpVersion::Http1).await;
        let task = tokio::spawn(async move { client.get("/reviews", &[]).await.unwrap() });
        // Either v1 received it (and holds it for 3 s), or v2 answered it at once.
        let settled = eventually(Duration::from_secs(5), || async {
            if m.v1.requests() > before || task.is_finished() {
                Ok(())
            } else {
                Err(())
            }
        })
        .await;
        assert!(settled.is_ok(), "a request neither reached v1 nor finished");
        if m.v1.requests() > before {
            busy = Some(task);
            break;
        }
        assert_eq!(task.await.unwrap().version(), "v2");
    }
    let busy = busy.expect("30 requests, none to v1");
    let seen = m.versions(10, &[]).await;
    assert_eq!(
        seen.get("v2"),
        Some(&10),
        "LEAST_REQUEST sent new requests to the busy endpoint: {seen:?}"
    );
    assert_eq!(busy.await.unwrap().version(), "v1");
}

// ---------------------------------------------------------------------------------------------
// Upgrades, TCP and protocol detection.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_request_is_served_as_plain_http1() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    let addr = m.reviews();
    // What `curl --http2 http://...` sends. Envoy does not do h2c upgrades: it drops the
    // upgrade headers and serves the request over HTTP/1.1.
    let request = format!(
        "GET /h2c HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade, HTTP2-Settings\r\n\
         upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    let head = raw_request(m.cluster.pod("sleep"), addr, request.as_bytes())
        .await
        .unwrap();
    assert_eq!(head.status, 200, "{}", head.head);
    assert!(head.header("x-version").is_some(), "{}", head.head);
    let received: Vec<_> = m.v1.received().into_iter().chain(m.v2.received()).collect();
    let [r] = received.as_slice() else {
        panic!("{received:?}");
    };
    assert_eq!(r.path, "/h2c");
    for name in ["upgrade", "http2-settings"] {
        assert!(!r.headers.contains_key(name), "{name} forwarded: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_and_expect_continue_pass_through() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    // 4 MiB each way, over HTTP/1.1 and HTTP/2 (gRPC framing: the backend echoes the body),
    // more than any buffer on the way.
    let message = pattern(4 << 20, 3);
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let mut client = m.client("sleep", version).await;
        for _ in 0..2 {
            let answer = client
                .send(
                    "POST",
                    "/demo.Echo/Echo",
                    &[("content-type", "application/grpc"), ("te", "trailers")],
                    grpc_frame(&message),
                )
                .await
                .unwrap();
            assert_eq!(answer.status, 200, "{version:?}");
            let echoed = grpc_unframe(answer.body.clone()).unwrap_or_default();
            assert!(
                echoed == message,
                "{version:?}: {} bytes back of {}",
                echoed.len(),
                message.len()
            );
        }
    }
    // `Expect: 100-continue` (curl sends it for bodies over 1 MiB): the client hears 100 before
    // sending the body, then the answer.
    let addr = m.reviews();
    let mut stream = m.cluster.pod("sleep").connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /upload HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 5\r\n\
                 expect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let head = read_response_head(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(head.status, 100, "{}", head.head);
    stream.write_all(b"hello").await.unwrap();
    let head = read_response_head(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(head.status, 200, "{}", head.head);
    let counted = eventually(SHOW_UP, || async {
        let bytes = m
            .waypoint()
            .metrics()
            .await
            .sum("istio_request_bytes_sum", &[]);
        if bytes >= 4.0 * (4 << 20) as f64 {
            Ok(())
        } else {
            Err(bytes)
        }
    })
    .await;
    assert_eq!(counted, Ok(()), "request bytes counted at the waypoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_gives_up_on_is_still_logged() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.v1.behaviour.delay_ms.store(3000, Ordering::Relaxed);
    m.v2.behaviour.delay_ms.store(3000, Ordering::Relaxed);
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    let gave_up = client
        .send_within(
            Duration::from_millis(500),
            "GET",
            "/given-up",
            &[],
            Bytes::new(),
        )
        .await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    drop(client);
    // Envoy logs such a request with response code 0 and flag DC (downstream closed).
    let line = m.access_line(&["/given-up"]).await;
    assert!(
        line.contains("status=0") && line.contains("flags=\"DC\""),
        "{line}"
    );
    let metrics = m.waypoint().metrics().await;
    assert_eq!(
        metrics.sum(
            "istio_requests_total",
            &[("response_code", "0"), ("response_flags", "DC")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_carries_bytes_both_ways() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    let addr = m.reviews();
    let mut stream = m.cluster.pod("sleep").connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let head = read_response_head(&mut stream, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(head.status, 101, "{}", head.head);
    assert_eq!(head.header("upgrade"), Some("echo"), "{}", head.head);
    assert!(head.rest.is_empty());
    // Bytes after the upgrade are echoed by the backend, through the waypoint.
    for round in 0..3u64 {
        let data = pattern(64 * 1024, round);
        let (mut r, mut w) = stream.split();
        let write = async {
            w.write_all(&data).await.unwrap();
            w.flush().await.unwrap();
        };
        let read = async {
            let mut echoed = vec![0u8; data.len()];
            r.read_exact(&mut echoed).await.map(|_| echoed)
        };
        let ((), echoed) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
                .await
                .expect("echo within 10 s");
        assert!(echoed.unwrap() == data, "round {round}: bytes differ");
    }
    // Closing our side ends the upgraded stream: the backend closes too.
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the upgraded stream did not close: {closed:?}"
    );
    assert_eq!(m.v1.requests() + m.v2.requests(), 1);
    m.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_follows_its_weighted_tcp_route() {
    if !needs_root() {
        return;
    }
    const TCP_PORT: u16 = 9000;
    let m = start(
        mesh()
            .pod("b", "demo", "echo-v1")
            .label("app", "echo")
            .label("version", "v1")
            .pod("b", "demo", "echo-v2")
            .label("app", "echo")
            .label("version", "v2")
            .service_with_protocol("demo", "echo", TCP_PORT, TCP_PORT, "tcp")
            .yaml(
                "echo-destination-rule",
                r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
"#,
            ),
    )
    .await;
    let echo_v1 = m.cluster.pod("echo-v1").serve_echo(TCP_PORT).await.unwrap();
    let echo_v2 = m.cluster.pod("echo-v2").serve_echo(TCP_PORT).await.unwrap();
    let tcp_vs = |w1: u32, w2: u32| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: demo}}
spec:
  hosts: [echo]
  tcp:
  - route:
    - destination: {{host: echo, subset: v1}}
      weight: {w1}
    - destination: {{host: echo, subset: v2}}
      weight: {w2}
"#
        )
    };
    m.cluster.apply("echo-vs", &tcp_vs(50, 50)).await;
    let addr = m.cluster.service_addr("demo", "echo", TCP_PORT);
    let sleep = m.cluster.pod("sleep");
    for i in 0..20 {
        let data = pattern(100 * 1024, i);
        let echoed = sleep.exchange(addr, &data).await.unwrap();
        assert!(echoed == data, "connection {i}: bytes differ");
    }
    let (n1, n2) = (echo_v1.peers().len(), echo_v2.peers().len());
    assert_eq!(n1 + n2, 20);
    // 50/50 over 20 connections: both get some (a miss is one in 500,000).
    assert!(n1 > 0 && n2 > 0, "v1 {n1}, v2 {n2}");

    m.cluster.apply("echo-vs", &tcp_vs(0, 100)).await;
    for i in 0..10 {
        let data = pattern(10 * 1024, 100 + i);
        assert!(sleep.exchange(addr, &data).await.unwrap() == data);
    }
    assert_eq!(
        echo_v1.peers().len(),
        n1,
        "weight 0 for v1: nothing new there"
    );
    assert_eq!(echo_v2.peers().len(), n2 + 10);
    // The connections went through the waypoint (and the echo pods saw the waypoint's
    // connections, not the client's).
    let metrics = m.waypoint().metrics().await;
    let opened = metrics.sum(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "waypoint"),
            ("destination_service_name", "echo"),
        ],
    );
    assert!(opened >= 30.0, "waypoint counted {opened} TCP connections");
    // ...and name the endpoint's workload, as Istio's waypoint reports it (dashboards draw the
    // edge from the waypoint to the workload with it).
    for (workload, n) in [("echo-v1", n1), ("echo-v2", n2 + 10)] {
        let counted = metrics.sum(
            "istio_tcp_connections_opened_total",
            &[("reporter", "waypoint"), ("destination_workload", workload)],
        );
        assert_eq!(
            counted,
            n as f64,
            "connections to {workload}:\n{}",
            metrics.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_policy_also_guards_tcp_services() {
    if !needs_root() {
        return;
    }
    const TCP_PORT: u16 = 9000;
    let m = start(
        mesh()
            .pod("b", "demo", "echo")
            .service_with_protocol("demo", "echo", TCP_PORT, TCP_PORT, "tcp"),
    )
    .await;
    let echo = m.cluster.pod("echo").serve_echo(TCP_PORT).await.unwrap();
    let addr = m.cluster.service_addr("demo", "echo", TCP_PORT);
    let other = m.cluster.pod("other").principal();
    m.cluster
        .apply(
            "policy",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-other, namespace: demo}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["{other}"]
"#
            ),
        )
        .await;
    let data = pattern(10 * 1024, 1);
    let echoed = m.cluster.pod("sleep").exchange(addr, &data).await.unwrap();
    assert!(echoed == data, "sleep is allowed");
    let accepted = echo.peers().len();
    // `other` is denied at the waypoint: its connection carries nothing and is closed.
    let denied = m.cluster.pod("other").exchange(addr, &data).await;
    assert!(
        denied.as_ref().map_or(true, Vec::is_empty),
        "a denied TCP client got {} bytes back",
        denied.map_or(0, |d| d.len())
    );
    assert_eq!(
        echo.peers().len(),
        accepted,
        "the echo server never saw other"
    );
    let metrics = m.waypoint().metrics().await;
    let other_identity = m.cluster.pod("other").identity();
    assert_eq!(
        metrics.sum(
            "istio_tcp_connections_failed_total",
            &[
                ("reporter", "waypoint"),
                ("source_principal", other_identity.as_str()),
                ("response_flags", "RBAC"),
            ],
        ),
        1.0,
        "{}",
        metrics.text()
    );
    // The HTTP service is guarded by the same policy, as before.
    let mut client = m.client("other", HttpVersion::Http1).await;
    assert_eq!(client.get("/reviews", &[]).await.unwrap().status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_port_carries_http_and_other_bytes() {
    if !needs_root() {
        return;
    }
    const HTTP_PORT: u16 = 8000;
    const RAW_PORT: u16 = 8001;
    // Port names `web-8000` and `web-8001`: no known protocol prefix, so the waypoint sniffs.
    let m = start(
        mesh()
            .pod("b", "demo", "web")
            .service_with_protocol("demo", "web", HTTP_PORT, HTTP_PORT, "web")
            .service_with_protocol("demo", "web", RAW_PORT, RAW_PORT, "web"),
    )
    .await;
    let _web = serve_backend(m.cluster.pod("web"), HTTP_PORT, "web")
        .await
        .unwrap();
    let _echo = m.cluster.pod("web").serve_echo(RAW_PORT).await.unwrap();
    // An L7 feature on the service shows that the waypoint parsed the HTTP.
    m.cluster
        .apply(
            "web-vs",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - headers:
      response:
        set: {x-seen-by: waypoint}
    route:
    - destination: {host: web}
"#,
        )
        .await;
    let sleep = m.cluster.pod("sleep");
    let http_addr = m.cluster.service_addr("demo", "web", HTTP_PORT);
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let mut client = HttpClient::connect(sleep, http_addr, version)
            .await
            .unwrap();
        for _ in 0..3 {
            let answer = client.get("/detected", &[]).await.unwrap();
            assert_eq!(answer.status, 200, "{version:?}: {}", answer.text());
            assert_eq!(answer.version(), "web");
            assert_eq!(answer.header("x-seen-by"), Some("waypoint"), "{version:?}");
        }
    }
    // A request is counted when its response ends, which the client may see a moment before.
    let counted = eventually(SHOW_UP, || async {
        let n = m.waypoint().metrics().await.sum(
            "istio_requests_total",
            &[
                ("destination_service_name", "web"),
                ("response_code", "200"),
            ],
        );
        if n == 6.0 { Ok(n) } else { Err(n) }
    })
    .await;
    assert_eq!(counted, Ok(6.0), "HTTP requests counted at the waypoint");

    // Non-HTTP bytes on an undeclared port pass through untouched, both ways.
    let raw_addr = m.cluster.service_addr("demo", "web", RAW_PORT);
    let mut data = b"\x00\x01hello, not http".to_vec();
    data.extend(pattern(200 * 1024, 7));
    let echoed = sleep.exchange(raw_addr, &data).await.unwrap();
    assert!(
        echoed == data,
        "{} bytes back of {}",
        echoed.len(),
        data.len()
    );
    // A short message that starts like a method but is not one.
    let echoed = sleep.exchange(raw_addr, b"GETTING STARTED").await.unwrap();
    assert_eq!(echoed, b"GETTING STARTED");
    let metrics = m.waypoint().metrics().await;
    assert!(
        metrics.sum(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service_name", "web")
            ]
        ) >= 2.0
    );
}

// ---------------------------------------------------------------------------------------------
// Policies, source matches and the access log.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_policy_on_methods_denies_the_others() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "policy",
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: demo}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: [GET]
"#,
        )
        .await;
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    let get = client.get("/reviews", &[]).await.unwrap();
    assert_eq!(get.status, 200, "{}", get.text());
    let post = client
        .send("POST", "/reviews", &[], Bytes::from_static(b"new review"))
        .await
        .unwrap();
    assert_eq!(post.status, 403);
    assert_eq!(post.text(), "RBAC: access denied");
    let delete = client
        .send("DELETE", "/reviews/1", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(delete.status, 403);
    let methods: Vec<_> =
        m.v1.received()
            .into_iter()
            .chain(m.v2.received())
            .map(|r| r.method)
            .collect();
    assert_eq!(methods, ["GET"], "denied requests never reach a backend");
    let line = m.access_line(&["method=POST"]).await;
    assert!(
        line.contains("status=403") && line.contains("flags=\"RBAC\""),
        "{line}"
    );
    assert!(
        line.contains("demo/get-only"),
        "the log names the policy: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_wide_policy_applies_at_the_waypoint() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    let sleep = m.cluster.pod("sleep").principal();
    let waypoint = "cluster.local/ns/demo/sa/waypoint";
    // No selector, no targetRefs: the whole namespace, at its ztunnels and at its waypoint.
    // The backends' ztunnels see the waypoint's identity, the waypoint sees the clients'.
    m.cluster
        .apply(
            "policy",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: namespace-allow, namespace: demo}}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{sleep}", "{waypoint}"]
"#
            ),
        )
        .await;
    let answer = m.get("/reviews", &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let mut client = m.client("other", HttpVersion::Http1).await;
    let denied = client.get("/reviews", &[]).await.unwrap();
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert_eq!(
        denied.text(),
        "RBAC: access denied",
        "denied by the waypoint"
    );
    assert_eq!(m.v1.requests() + m.v2.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_labels_route_a_client_by_its_pod_labels() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - match:
    - sourceLabels: {app: other}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#,
            ),
        )
        .await;
    let other = m.versions_from("other", 15, &[]).await;
    assert_eq!(other.get("v2"), Some(&15), "{other:?}");
    let sleep = m.versions_from("sleep", 15, &[]).await;
    assert_eq!(sleep.get("v1"), Some(&15), "{sleep:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_route_subset_and_endpoint() {
    if !needs_root() {
        return;
    }
    let m = start(mesh()).await;
    m.cluster
        .apply(
            "vs",
            &virtual_service(
                r#"
  - name: primary
    match:
    - uri: {prefix: /logged}
    route:
    - destination: {host: reviews, subset: v2}
"#,
            ),
        )
        .await;
    let answer = m.get("/logged/one", &[]).await;
    assert_eq!(answer.version(), "v2");
    let v2_ip = m.cluster.pod("reviews-v2").ip();
    let sleep = m.cluster.pod("sleep").identity();
    let line = m.access_line(&["/logged/one"]).await;
    for expected in [
        "method=GET".to_owned(),
        "status=200".to_owned(),
        "route=demo/reviews/primary".to_owned(),
        "subset=v2".to_owned(),
        format!("endpoint={v2_ip}:{PORT}"),
        format!("dst.service={REVIEWS_HOST}"),
        "attempts=1".to_owned(),
    ] {
        assert!(line.contains(&expected), "{expected:?} missing in {line}");
    }
    let principal = sleep.trim_start_matches("spiffe://");
    assert!(line.contains(principal), "the client's identity: {line}");

    // One line per request, also for the waypoint's own answers, with the reason.
    let answer = m.get("/unrouted", &[]).await;
    assert_eq!(answer.status, 404);
    let line = m.access_line(&["/unrouted"]).await;
    assert!(
        line.contains("status=404") && line.contains("flags=\"NR\""),
        "{line}"
    );
    assert!(line.contains("no route"), "the reason: {line}");
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    for i in 0..5 {
        client.get(&format!("/logged/many-{i}"), &[]).await.unwrap();
    }
    for i in 0..5 {
        m.access_line(&[&format!("/logged/many-{i}")]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_retried_around() {
    if !needs_root() {
        return;
    }
    let cluster = mesh().build().await.unwrap();
    // Nothing listens on reviews-v1 (its port refuses connections) but it is still an
    // endpoint, as during a rolling restart before the endpoint is removed.
    let v2 = serve_backend(cluster.pod("reviews-v2"), PORT, "v2")
        .await
        .unwrap();
    let addr = cluster.service_addr("demo", "reviews", PORT);
    let mut client = HttpClient::connect(cluster.pod("sleep"), addr, HttpVersion::Http1)
        .await
        .unwrap();
    // Istio's default retry policy (connect-failure, 2 retries, on another host than the
    // failed one): every request ends at v2.
    let mut statuses = BTreeMap::new();
    for _ in 0..30 {
        let answer = client.get("/reviews", &[]).await.unwrap();
        *statuses.entry(answer.status).or_insert(0) += 1;
    }
    assert_eq!(
        statuses,
        BTreeMap::from([(200, 30)]),
        "{}",
        cluster.waypoint("waypoint").logs()
    );
    assert_eq!(v2.requests(), 30);
}
