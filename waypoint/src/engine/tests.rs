//! The engine on its own: requests handed to it directly, with no listener, no HBONE and no
//! TLS in front, as any front door hands them. What comes out is what a client relies on: the
//! upstream gets the request (with the headers the engine adds), a denied request is denied
//! with 403, a fault abort answers with its status, and every request is in the metrics.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use mesh::discovery::StoreWriter;
use mesh::discovery::file::{FileSource, FileSourceConfig};
use mesh::identity::Identity;
use mesh::model::WaypointRef;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::request::empty_body;
use crate::upstream::{Connector, Io, UpstreamTarget};

const WAIT: Duration = Duration::from_secs(5);

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 127.0.0.21}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [127.0.0.21], conditions: {ready: true}, targetRef: {kind: Pod, name: web, namespace: demo}}]
ports: [{name: http, port: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web.demo.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /teapot}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: web.demo.svc.cluster.local}}]
  - route: [{destination: {host: web.demo.svc.cluster.local}}]
"#;

/// Each endpoint's pod IP is a local server: `pods` maps the IP to the server's address.
struct ToServer {
    pods: HashMap<std::net::IpAddr, SocketAddr>,
}

impl Connector for ToServer {
    fn connect(&self, target: &UpstreamTarget) -> BoxFuture<'static, io::Result<Box<dyn Io>>> {
        let addr = self.pods.get(&target.addr.ip()).copied();
        Box::pin(async move {
            let addr = addr.ok_or_else(|| io::Error::other("no server for this pod"))?;
            let stream = tokio::net::TcpStream::connect(addr).await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }
}

/// An HTTP/1.1 server that answers every request with `name`, a newline and the request's
/// head as the body.
async fn echo_server(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let mut head: Vec<u8> = format!("{name}\n").into_bytes();
                        head.extend(buf.drain(..end + 4));
                        // One write: head and body in separate segments would meet Nagle's
                        // algorithm and the client's delayed ACK (40 ms a request).
                        let mut response =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", head.len())
                                .into_bytes();
                        response.extend(head);
                        if stream.write_all(&response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

struct Fixture {
    engine: Arc<Engine>,
    downstream: Arc<Downstream>,
    registry: Registry,
}

async fn fixture() -> Fixture {
    fixture_with(CLUSTER, "demo/web", &[("127.0.0.21", "web")]).await
}

/// An engine for `yaml`'s state, a client of `service`, and one local server per pod IP.
async fn fixture_with(yaml: &str, service: &str, pods: &[(&str, &'static str)]) -> Fixture {
    let store = StoreWriter::new();
    let mut registry = Registry::default();
    let mut source = FileSource::new(FileSourceConfig::new("/engine-test"), &mut registry);
    let report = mesh::fuzzing::file_source_load(
        &mut source,
        vec![(PathBuf::from("/engine-test/cluster.yaml"), yaml.to_owned())],
        &store,
    );
    let state = store.store().snapshot();
    assert!(
        state.services.contains_key(service) && report.rejected.is_empty(),
        "the test's cluster YAML loads: {report:?}"
    );
    let mut servers = HashMap::new();
    for (ip, name) in pods {
        servers.insert(ip.parse().expect("pod IP"), echo_server(name).await);
    }
    let engine = Arc::new(Engine::new(
        EngineIdentity {
            gateway: WaypointRef {
                namespace: "demo".into(),
                name: "waypoint".into(),
            },
            root_namespace: "istio-system".into(),
            cluster_id: "Kubernetes".into(),
            reporter: mesh::metrics::Reporter::Waypoint,
        },
        Upstreams::new(Arc::new(ToServer { pods: servers })),
        &mut registry,
    ));
    engine.apply(state.clone());
    let service = state.services[service].clone();
    let port = service.ports[0].clone();
    let vip = SocketAddr::new(service.vips[0], port.port);
    let identity = Identity::new("cluster.local", "demo", "sleep").expect("identity");
    let downstream = Arc::new(Downstream {
        port,
        vip,
        service,
        source: SourceInfo::new(Some(identity), Some([127, 0, 0, 11].into()), None),
        peer_addr: SocketAddr::from(([127, 0, 0, 1], 40000)),
        mutual_tls: true,
        scope: None,
        sni: None,
    });
    Fixture {
        engine,
        downstream,
        registry,
    }
}

async fn get(f: &Fixture, path: &str) -> (StatusCode, String) {
    let request = Request::get(path)
        .header("host", f.downstream.service.hostname.as_str())
        .body(empty_body())
        .expect("request");
    let response = tokio::time::timeout(WAIT, f.engine.clone().http(f.downstream.clone(), request))
        .await
        .expect("the engine answers within the wait");
    let status = response.status();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body within the wait")
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn metrics(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text
}

#[tokio::test]
async fn a_request_handed_to_the_engine_reaches_the_upstream() {
    let f = fixture().await;
    let (status, head) = get(&f, "/hello").await;
    assert_eq!(status, StatusCode::OK, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("web\nget /hello http/1.1\r\n"), "{head}");
    assert!(
        head.contains("host: web.demo.svc.cluster.local\r\n"),
        "{head}"
    );
    assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
    assert!(head.contains("x-request-id: "), "{head}");
}

#[tokio::test]
async fn policies_apply_to_a_request_handed_to_the_engine() {
    let f = fixture().await;
    let (status, body) = get(&f, "/admin").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body, crate::authz::ACCESS_DENIED_BODY);
    let (status, _) = get(&f, "/teapot").await;
    assert_eq!(status.as_u16(), 418);
    let (status, _) = get(&f, "/").await;
    assert_eq!(status, StatusCode::OK);

    // Each request is one record, with the client's identity.
    let text = metrics(&f.registry);
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    for code in ["200", "403", "418"] {
        let line = requests
            .iter()
            .find(|l| l.contains(&format!("response_code=\"{code}\"")))
            .unwrap_or_else(|| panic!("no istio_requests_total for {code} in {requests:#?}"));
        assert!(line.ends_with(" 1"), "{line}");
        assert!(
            line.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/sleep\""),
            "{line}"
        );
    }
}

/// Istio's ambient getting-started guide, its `reviews` split written as a Gateway API
/// `HTTPRoute` (parentRefs: the Service) and routed by the same engine as a VirtualService.
const BOOKINFO: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec: {nodeName: node-a, serviceAccountName: reviews, containers: [{name: reviews, image: reviews}]}
status: {phase: Running, podIP: 127.0.0.31}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec: {nodeName: node-a, serviceAccountName: reviews, containers: [{name: reviews, image: reviews}]}
status: {phase: Running, podIP: 127.0.0.32}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.96.1.10, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {clusterIP: 10.96.1.11, selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {clusterIP: 10.96.1.12, selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-v1, namespace: bookinfo, labels: {kubernetes.io/service-name: reviews-v1}}
addressType: IPv4
endpoints: [{addresses: [127.0.0.31], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-v1, namespace: bookinfo}}]
ports: [{name: http, port: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-v2, namespace: bookinfo, labels: {kubernetes.io/service-name: reviews-v2}}
addressType: IPv4
endpoints: [{addresses: [127.0.0.32], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-v2, namespace: bookinfo}}]
ports: [{name: http, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: Exact, value: /broken}}]
    backendRefs: [{name: ratings, namespace: elsewhere, port: 9080}]
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
"#;

#[tokio::test]
async fn an_http_route_splits_90_10_through_the_engine() {
    let f = fixture_with(
        BOOKINFO,
        "bookinfo/reviews",
        &[("127.0.0.31", "v1"), ("127.0.0.32", "v2")],
    )
    .await;
    // 1,000 requests: v2's share is 10 %; a binomial(1000, 0.1) is within 100 +- 40 with
    // probability > 0.9999 (4.2 standard deviations).
    let mut v2 = 0;
    for _ in 0..1000 {
        let (status, body) = get(&f, "/reviews/1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body.starts_with("v2\n") {
            v2 += 1;
        } else {
            assert!(body.starts_with("v1\n"), "{body}");
        }
    }
    assert!(
        (60..=140).contains(&v2),
        "v2 got {v2} of 1000 requests (10 % +- 4 %)"
    );

    // A header match ranks above the catch-all split: jason always gets v2.
    for _ in 0..20 {
        let request = Request::get("/reviews/1")
            .header("host", "reviews.bookinfo.svc.cluster.local")
            .header("end-user", "jason")
            .body(empty_body())
            .expect("request");
        let response = f.engine.clone().http(f.downstream.clone(), request).await;
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert!(
            body.starts_with(b"v2\n"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }

    // ReplacePrefixMatch rewrites whole path elements: /v1/x -> /x.
    let (status, body) = get(&f, "/v1/x?y=1").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("v1\nGET /x?y=1 HTTP/1.1\r\n"), "{body}");

    // A backend in another namespace without a ReferenceGrant: 500 for its share.
    let (status, _) = get(&f, "/broken").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}
