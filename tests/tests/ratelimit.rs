//! End-to-end tests of `RateLimitPolicy` (`mesh.ambient.dev/v1alpha1`) on the virtual cluster:
//! real `ztunnel` processes, a real `waypoint` process, HTTP/1.1, HTTP/2 and gRPC clients in
//! pods. The token bucket's rate over a measured window, per-principal isolation, unmatched
//! routes, live policy changes, bad policies and gRPC. Each builds its own cluster, needs root
//! and skips without it (but fails under `CI=true`).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_tests::vcluster::http::{Answer, HttpClient, HttpVersion, grpc_frame, serve_backend};
use mesh_tests::vcluster::{Cluster, ClusterBuilder, eventually, needs_root};

const PORT: u16 = 9080;
/// How long something that already happened may take to show in logs.
const SHOW_UP: Duration = Duration::from_secs(5);

/// Two nodes; `demo` is ambient and uses waypoint `waypoint` (on node a). Clients `sleep` and
/// `other` (each its own service account) on node a; `reviews` on node b behind HTTP service
/// `reviews`.
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
        .pod("b", "demo", "reviews")
        .http_service("demo", "reviews", PORT, PORT)
}

struct Mesh {
    cluster: Cluster,
    _reviews: mesh_tests::vcluster::http::Backend,
}

async fn start() -> Mesh {
    let cluster = mesh().build().await.unwrap();
    let reviews = serve_backend(cluster.pod("reviews"), PORT, "v1")
        .await
        .unwrap();
    Mesh {
        cluster,
        _reviews: reviews,
    }
}

impl Mesh {
    async fn client(&self, pod: &str, version: HttpVersion) -> HttpClient {
        let addr = self.cluster.service_addr("demo", "reviews", PORT);
        HttpClient::connect(self.cluster.pod(pod), addr, version)
            .await
            .unwrap()
    }

    /// `n` GETs of `path` from `pod` on one connection: the statuses, in order.
    async fn statuses(&self, pod: &str, path: &str, n: usize) -> Vec<u16> {
        let mut client = self.client(pod, HttpVersion::Http1).await;
        let mut statuses = Vec::new();
        for _ in 0..n {
            statuses.push(client.get(path, &[]).await.unwrap().status);
        }
        statuses
    }

    fn logs(&self) -> String {
        self.cluster.waypoint("waypoint").logs()
    }
}

/// A RateLimitPolicy `name` in `demo` on Service `reviews` with `rules` (YAML list items,
/// indented by two spaces).
fn policy(name: &str, rules: &str) -> String {
    policy_on(name, r#"{group: "", kind: Service, name: reviews}"#, rules)
}

fn policy_on(name: &str, target: &str, rules: &str) -> String {
    format!(
        r#"
apiVersion: mesh.ambient.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  targetRefs:
  - {target}
  rules:
{rules}"#
    )
}

async fn post(client: &mut HttpClient, path: &str) -> Answer {
    client
        .send("POST", path, &[], Bytes::from_static(b"x"))
        .await
        .unwrap()
}

/// One unary gRPC call to `demo.Echo/Echo`.
async fn echo(client: &mut HttpClient) -> Answer {
    client
        .send(
            "POST",
            "/demo.Echo/Echo",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            grpc_frame(b"hello"),
        )
        .await
        .unwrap()
}

fn header<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer
        .header(name)
        .unwrap_or_else(|| panic!("no {name} in {} {:?}", answer.status, answer.headers))
}

/// Every answer of a limited route carries the `x-ratelimit-*` headers; a 429 also
/// `retry-after` (whole seconds, at least 1) and no remaining tokens.
fn assert_rate_limit_headers(answer: &Answer, limit: &str) {
    assert_eq!(header(answer, "x-ratelimit-limit"), limit);
    let remaining: u32 = header(answer, "x-ratelimit-remaining").parse().unwrap();
    let reset: u64 = header(answer, "x-ratelimit-reset").parse().unwrap();
    assert!(remaining <= limit.parse().unwrap());
    if answer.status == 429 {
        assert_eq!(remaining, 0);
        assert!(reset >= 1);
        let retry_after: u64 = header(answer, "retry-after").parse().unwrap();
        assert!(retry_after >= 1, "{:?}", answer.headers);
        assert_eq!(answer.text(), "local_rate_limited");
    } else {
        assert!(
            answer.header("retry-after").is_none(),
            "{:?}",
            answer.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_per_second_with_burst_five_over_a_measured_window() {
    if !needs_root() {
        return;
    }
    let m = start().await;
    m.cluster
        .apply(
            "limits",
            &policy(
                "steady",
                r#"
  - name: ten-per-second
    match: {pathPrefix: /limited}
    limit: {requests: 10, unit: second, burst: 5}
"#,
            ),
        )
        .await;

    // A steady fast sender for about 3 s: the bucket starts full (5) and refills at 10/s, so
    // 5 + 10 t requests pass over the t seconds from the first request to the last answer.
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    let (mut allowed, mut limited) = (0u32, 0u32);
    let first = Instant::now();
    let mut last = first;
    while first.elapsed() < Duration::from_secs(3) {
        let answer = client.get("/limited/x", &[]).await.unwrap();
        last = Instant::now();
        assert_rate_limit_headers(&answer, "5");
        match answer.status {
            200 => allowed += 1,
            429 => limited += 1,
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    let t = (last - first).as_secs_f64();
    let expected = 5.0 + 10.0 * t;
    eprintln!(
        "10 r/s burst 5 over {t:.3} s: {allowed} allowed (expected {expected:.1} +-3), {limited} limited"
    );
    assert!(
        (f64::from(allowed) - expected).abs() <= 3.0,
        "{allowed} allowed over {t:.3} s, expected {expected:.1} +-3"
    );
    assert!(limited > 50, "a fast sender must be limited: {limited}");

    // Metrics count every limited request per policy and rule; the access log names the rule.
    let metrics = m.cluster.waypoint("waypoint").metrics().await;
    let counted = metrics.sum(
        "waypoint_rate_limited_total",
        &[("policy", "demo/steady"), ("rule", "ten-per-second")],
    );
    assert_eq!(counted, f64::from(limited));
    assert_eq!(
        metrics.sum(
            "waypoint_local_replies_total",
            &[("reason", "rate_limited")]
        ),
        f64::from(limited)
    );
    assert_eq!(
        metrics.sum(
            "istio_requests_total",
            &[("response_code", "429"), ("response_flags", "RL")]
        ),
        f64::from(limited)
    );
    eventually(SHOW_UP, || async {
        let logs = m.logs();
        logs.lines()
            .any(|l| {
                l.contains("rate limited by RateLimitPolicy demo/steady rule ten-per-second")
                    && l.contains("RL")
            })
            .then_some(())
            .ok_or(())
    })
    .await
    .unwrap_or_else(|()| panic!("no access log line names the rule:\n{}", m.logs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_principal_keys_isolate_two_clients() {
    if !needs_root() {
        return;
    }
    let m = start().await;
    // On the waypoint's Gateway: every service it serves.
    m.cluster
        .apply(
            "limits",
            &policy_on(
                "per-client",
                "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}",
                r#"
  - name: per-client
    limit: {requests: 3, unit: minute}
    key: {type: SourcePrincipal}
"#,
            ),
        )
        .await;
    assert_eq!(
        m.statuses("sleep", "/", 5).await,
        [200, 200, 200, 429, 429],
        "sleep's own bucket (burst = requests = 3)"
    );
    // `other` has its own identity, so its own full bucket.
    let mut client = m.client("other", HttpVersion::Http1).await;
    for remaining in ["2", "1", "0"] {
        let answer = client.get("/", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(header(&answer, "x-ratelimit-remaining"), remaining);
    }
    assert_eq!(client.get("/", &[]).await.unwrap().status, 429);
    // And sleep is still limited.
    assert_eq!(m.statuses("sleep", "/", 1).await, [429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_the_rules_do_not_match_is_unlimited() {
    if !needs_root() {
        return;
    }
    let m = start().await;
    m.cluster
        .apply(
            "limits",
            &policy(
                "api",
                r#"
  - name: api-posts
    match: {pathPrefix: /api, method: POST}
    limit: {requests: 1, unit: hour}
"#,
            ),
        )
        .await;
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    let first = post(&mut client, "/api/orders").await;
    assert_eq!(first.status, 200);
    assert_rate_limit_headers(&first, "1");
    let second = post(&mut client, "/api/orders").await;
    assert_eq!(second.status, 429);
    assert_rate_limit_headers(&second, "1");
    assert_eq!(header(&second, "retry-after"), "3600");

    // Another path, or another method on the same path: not counted, no headers.
    for _ in 0..50 {
        let free = client.get("/free", &[]).await.unwrap();
        assert_eq!(free.status, 200);
        assert!(
            free.header("x-ratelimit-limit").is_none(),
            "{:?}",
            free.headers
        );
        let get = client.get("/api/orders", &[]).await.unwrap();
        assert_eq!(get.status, 200);
    }
    let posted = post(&mut client, "/other").await;
    assert_eq!(posted.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_applies_without_a_restart_and_a_reload_does_not_refill() {
    if !needs_root() {
        return;
    }
    let m = start().await;
    let pid = m.cluster.waypoint("waypoint").pid();
    let one_per_hour = policy(
        "live",
        r#"
  - name: slow
    limit: {requests: 1, unit: hour}
"#,
    );
    m.cluster.apply("limits", &one_per_hour).await;
    assert_eq!(m.statuses("sleep", "/", 2).await, [200, 429]);

    // Another object changes (a reload of everything): the unchanged rule keeps its empty
    // bucket.
    m.cluster
        .apply(
            "unrelated",
            &policy_on(
                "elsewhere",
                r#"{group: "", kind: Service, name: ratings}"#,
                "  - limit: {requests: 1, unit: second}\n",
            ),
        )
        .await;
    assert_eq!(m.statuses("sleep", "/", 1).await, [429]);

    // The rule changes: new limit, new bucket, at once.
    m.cluster
        .apply(
            "limits",
            &policy(
                "live",
                r#"
  - name: slow
    limit: {requests: 100, unit: second, burst: 20}
"#,
            ),
        )
        .await;
    let mut client = m.client("sleep", HttpVersion::Http1).await;
    for _ in 0..10 {
        let answer = client.get("/", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_rate_limit_headers(&answer, "20");
    }
    // Removed: no limit, no headers.
    m.cluster.remove("limits").await;
    let answer = client.get("/", &[]).await.unwrap();
    assert_eq!(answer.status, 200);
    assert!(answer.header("x-ratelimit-limit").is_none());
    assert_eq!(m.cluster.waypoint("waypoint").pid(), pid, "no restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies_are_rejected_and_the_others_keep_working() {
    if !needs_root() {
        return;
    }
    let m = start().await;
    let good = policy(
        "good",
        r#"
  - name: one
    match: {pathPrefix: /limited}
    limit: {requests: 1, unit: hour}
"#,
    );
    let zero = policy("zero", "  - limit: {requests: 0, unit: second}\n");
    let fortnight = policy("fortnight", "  - limit: {requests: 5, unit: fortnight}\n");
    let ghost = policy_on(
        "ghost",
        r#"{group: "", kind: Service, name: nope}"#,
        "  - limit: {requests: 1, unit: hour}\n",
    );
    m.cluster
        .apply(
            "limits",
            &format!("{good}\n---\n{zero}\n---\n{fortnight}\n---\n{ghost}"),
        )
        .await;

    // The good policy in the same file applies.
    assert_eq!(m.statuses("sleep", "/limited", 2).await, [200, 429]);
    assert_eq!(m.statuses("sleep", "/", 3).await, [200, 200, 200]);

    let waypoint = m.cluster.waypoint("waypoint");
    let metrics = waypoint.metrics().await;
    assert!(
        metrics.sum("mesh_config_rejected_total", &[("kind", "RateLimitPolicy")]) >= 2.0,
        "{}",
        metrics.text()
    );
    // A target that does not exist: kept, reported, not enforced.
    assert_eq!(
        metrics.sum(
            "waypoint_rate_limit_unresolved_targets",
            &[
                ("policy", "demo/ghost"),
                ("field", "spec.targetRefs[0]"),
                ("target", "Service demo/nope")
            ]
        ),
        1.0,
        "{}",
        metrics.text()
    );
    let logs = waypoint.logs();
    for expected in [
        "RateLimitPolicy demo/zero: spec.rules[0].limit.requests: 0 is not a rate",
        r#"RateLimitPolicy demo/fortnight: spec.rules[0].limit.unit: "fortnight" is not one of second, minute, hour"#,
        "RateLimitPolicy demo/ghost: spec.targetRefs[0]: Service demo/nope does not exist",
    ] {
        assert!(
            logs.contains(expected),
            "no {expected:?} in the waypoint's log:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_gets_resource_exhausted() {
    if !needs_root() {
        return;
    }
    let m = start().await;
    m.cluster
        .apply(
            "limits",
            &policy(
                "grpc",
                r#"
  - name: echo
    match: {pathPrefix: /demo.Echo/}
    limit: {requests: 1, unit: minute}
"#,
            ),
        )
        .await;
    let mut client = m.client("sleep", HttpVersion::Http2).await;
    let ok = echo(&mut client).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.trailers.as_ref().unwrap()["grpc-status"], "0");
    assert_eq!(header(&ok, "x-ratelimit-remaining"), "0");

    // Trailers-only: grpc-status in the headers.
    let limited = echo(&mut client).await;
    assert_eq!(limited.status, 200);
    assert_eq!(
        header(&limited, "grpc-status"),
        "8",
        "{:?}",
        limited.headers
    );
    assert_eq!(header(&limited, "content-type"), "application/grpc");
    assert_eq!(header(&limited, "retry-after"), "60");
    assert_eq!(header(&limited, "x-ratelimit-limit"), "1");

    let metrics = m.cluster.waypoint("waypoint").metrics().await;
    assert_eq!(
        metrics.sum(
            "istio_requests_total",
            &[
                ("request_protocol", "grpc"),
                ("grpc_response_status", "8"),
                ("response_flags", "RL")
            ]
        ),
        1.0
    );
}
