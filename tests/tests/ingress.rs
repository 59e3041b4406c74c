//! End-to-end tests of the ingress gateway (`waypoint gateway`) on the virtual cluster, with
//! YAML shaped like Istio's ingress tasks: a `Gateway` selecting `istio: ingress`, a
//! `VirtualService` bound to it with `gateways:`, `credentialName` Secrets. The gateway runs in
//! its own pod in the non-ambient namespace `istio-ingress`; the client is a pod outside the
//! mesh; the backends are mesh pods behind ztunnel, reached over HBONE with the gateway's
//! identity. Each test needs root and skips without it (but fails under `CI=true`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_tests::WebPki;
use mesh_tests::vcluster::http::{Backend, HttpClient, HttpVersion, serve_backend};
use mesh_tests::vcluster::{Cluster, ClusterBuilder, eventually, needs_root};
use rustls_pki_types::ServerName;

const PORT: u16 = 9080;
const HTTP_PORT: u16 = 8080;
const HTTPS_PORT: u16 = 8443;
const HOST: &str = "bookinfo.example.com";
const GATEWAY_SA: &str = "spiffe://cluster.local/ns/istio-ingress/sa/istio-ingress";
/// How long a change may take to reach the gateway's listeners.
const SHOW_UP: Duration = Duration::from_secs(10);

/// Node a: the ingress gateway `istio-ingress` and the outside client `curl`; node b: `reviews`
/// v1 and v2 in the ambient namespace `demo`.
fn bookinfo() -> ClusterBuilder {
    reviews(
        Cluster::builder()
            .node("a")
            .node("b")
            .namespace("istio-ingress")
            .ingress_gateway("a", "istio-ingress", "istio-ingress"),
    )
    .yaml("subsets", SUBSETS)
}

/// `builder` plus the outside client `curl` on node a and, in the ambient namespace `demo`,
/// `reviews` v1 and v2 on node b behind the Service `reviews`.
fn reviews(builder: ClusterBuilder) -> ClusterBuilder {
    builder
        .namespace("outside")
        .pod("a", "outside", "curl")
        .namespace("demo")
        .ambient()
        .pod("b", "demo", "reviews-v1")
        .label("app", "reviews")
        .label("version", "v1")
        .pod("b", "demo", "reviews-v2")
        .label("app", "reviews")
        .label("version", "v2")
        .http_service("demo", "reviews", PORT, PORT)
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

/// Istio's `bookinfo-gateway`, with `servers` given.
fn gateway(servers: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bookinfo-gateway, namespace: demo}}
spec:
  selector:
    istio: ingress
  servers:
{servers}"#
    )
}

/// A VirtualService for [`HOST`] bound to `bookinfo-gateway`, with `http` routes given.
fn virtual_service(http: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bookinfo, namespace: demo}}
spec:
  hosts: ["{HOST}"]
  gateways: [bookinfo-gateway]
  http:
{http}"#
    )
}

const TO_REVIEWS: &str = r#"
  - route:
    - destination: {host: reviews, port: {number: 9080}}
"#;

const HTTP_SERVER: &str = r#"
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["bookinfo.example.com"]
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
    fn gateway_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.cluster.ingress("istio-ingress").ip(), port)
    }

    /// A plain HTTP client from outside the mesh, sending `Host: host`.
    async fn http(&self, host: &str) -> std::io::Result<HttpClient> {
        let stream = self
            .cluster
            .pod("curl")
            .connect(self.gateway_addr(HTTP_PORT))
            .await?;
        HttpClient::on(stream, host.to_owned(), HttpVersion::Http1).await
    }

    /// An HTTPS client from outside the mesh: SNI and `Host` = `host`, ALPN `alpn`.
    async fn https(
        &self,
        config: Arc<rustls::ClientConfig>,
        host: &str,
        version: HttpVersion,
    ) -> std::io::Result<(HttpClient, Vec<u8>)> {
        // Returns the client and the DER of the certificate the gateway presented.
        let stream = self
            .cluster
            .pod("curl")
            .connect(self.gateway_addr(HTTPS_PORT))
            .await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::try_from(host.to_owned()).unwrap();
        let tls = connector.connect(name, stream).await?;
        let serial = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        Ok((HttpClient::on(tls, host.to_owned(), version).await?, serial))
    }

    /// Waits until a plain GET for [`HOST`] answers `status`.
    async fn until_http_status(&self, status: u16) {
        eventually(SHOW_UP, || async {
            let mut client = self.http(HOST).await.map_err(|e| e.to_string())?;
            let answer = client.get("/", &[]).await.map_err(|e| e.to_string())?;
            if answer.status == status {
                Ok(())
            } else {
                Err(format!("status {} ({})", answer.status, answer.text()))
            }
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "GET http://{HOST}/ never answered {status}: {e}\n{}",
                self.cluster.ingress("istio-ingress").logs()
            )
        });
    }

    async fn config_dump(&self) -> serde_json::Value {
        self.cluster
            .ingress("istio-ingress")
            .try_config_dump()
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_by_host_reaches_the_mesh_with_the_gateways_identity() {
    if !needs_root() {
        return;
    }
    let bi = start(
        bookinfo()
            .yaml("gateway", &gateway(HTTP_SERVER))
            .yaml("vs", &virtual_service(TO_REVIEWS)),
    )
    .await;
    bi.until_http_status(200).await;

    let mut client = bi.http(HOST).await.unwrap();
    let mut versions = BTreeMap::new();
    for _ in 0..40 {
        let answer = client
            .get("/productpage", &[("x-request-id", "from-outside")])
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        *versions.entry(answer.version().to_owned()).or_insert(0) += 1;
        let seen = answer.text().to_ascii_lowercase();
        // Host is preserved; the edge headers are Envoy's for an internal client (the pod's
        // address is private): its x-request-id kept, x-forwarded-for its address.
        assert!(seen.contains(&format!("host: {HOST}")), "{seen}");
        let curl_ip = bi.cluster.pod("curl").ip().to_string();
        assert!(
            seen.contains(&format!("x-forwarded-for: {curl_ip}")),
            "{seen}"
        );
        assert!(seen.contains("x-forwarded-proto: http"), "{seen}");
        assert!(seen.contains("x-request-id: from-outside"), "{seen}");
    }
    assert_eq!(versions.values().sum::<i32>(), 40, "{versions:?}");
    assert!(versions.len() == 2, "both endpoints serve: {versions:?}");

    // Another host is not routed here: 404 (Envoy's "route not found").
    let mut other = bi.http("other.example.com").await.unwrap();
    assert_eq!(other.get("/", &[]).await.unwrap().status, 404);

    // The backends were reached over HBONE: their ztunnel saw the gateway's identity.
    let node_b = bi.cluster.node("b").metrics().await;
    let from_gateway = node_b.sum(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", GATEWAY_SA),
        ],
    );
    assert!(
        from_gateway >= 1.0,
        "ztunnel b saw no connection from {GATEWAY_SA}:\n{}",
        node_b.text()
    );
    // The gateway reports as Istio's gateways do (`reporter="source"`).
    let metrics = bi.cluster.ingress("istio-ingress").metrics().await;
    let total = metrics.sum(
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("destination_service_name", "reviews"),
            ("response_code", "200"),
        ],
    );
    assert!(total >= 40.0, "{}", metrics.text());

    // A policy at the destination that denies the gateway's identity is enforced by ztunnel.
    bi.cluster
        .apply(
            "deny-gateway",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-gateway, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: DENY
  rules:
  - from:
    - source: {{principals: ["{}"]}}
"#,
                GATEWAY_SA.trim_start_matches("spiffe://")
            ),
        )
        .await;
    bi.until_http_status(503).await;
    assert!(bi.v1.requests() + bi.v2.requests() >= 40);
}

const HTTPS_SERVER: &str = r#"
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["bookinfo.example.com"]
    tls:
      mode: SIMPLE
      credentialName: bookinfo-credential
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_simple_terminates_tls_and_follows_a_rotated_secret() {
    if !needs_root() {
        return;
    }
    let pki = WebPki::new("example.com root");
    let first = pki.server(&[HOST]);
    let bi = start(
        bookinfo()
            .yaml(
                "credential",
                &WebPki::secret_yaml("istio-ingress", "bookinfo-credential", &first, None),
            )
            .yaml("gateway", &gateway(&format!("{HTTP_SERVER}{HTTPS_SERVER}")))
            .yaml("vs", &virtual_service(TO_REVIEWS)),
    )
    .await;
    bi.until_http_status(200).await;

    // HTTP/1.1 and HTTP/2 by ALPN.
    for (alpn, version) in [
        (&b"http/1.1"[..], HttpVersion::Http1),
        (&b"h2"[..], HttpVersion::Http2),
    ] {
        let config = pki.client_config(&[alpn], None);
        let (mut client, _) = eventually(SHOW_UP, || bi.https(config.clone(), HOST, version))
            .await
            .unwrap();
        let answer = client.get("/", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        let seen = answer.text().to_ascii_lowercase();
        assert!(seen.contains("x-forwarded-proto: https"), "{seen}");
        assert!(seen.contains(&format!("host: {HOST}")), "{seen}");
    }

    // The certificate is shown (serial, SANs) but never its key.
    let dump = bi.config_dump().await;
    let text = dump.to_string();
    assert!(
        !text.contains("PRIVATE KEY"),
        "key material in /config_dump"
    );
    let listener = dump["ingress"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["class"] == "Tls")
        .unwrap()
        .clone();
    assert_eq!(
        listener["servers"][0]["certificate"]["subject_alt_names"][0],
        format!("DNS:{HOST}")
    );
    let first_serial = listener["servers"][0]["certificate"]["serial"].clone();

    // An open connection survives the rotation; new ones get the new certificate.
    let config = pki.client_config(&[b"http/1.1"], None);
    let (mut open, old_cert) = bi
        .https(config.clone(), HOST, HttpVersion::Http1)
        .await
        .unwrap();
    let second = pki.server(&[HOST]);
    bi.cluster
        .apply(
            "credential",
            &WebPki::secret_yaml("istio-ingress", "bookinfo-credential", &second, None),
        )
        .await;
    let new_cert = eventually(SHOW_UP, || async {
        let (_, cert) = bi
            .https(config.clone(), HOST, HttpVersion::Http1)
            .await
            .map_err(|e| e.to_string())?;
        if cert == old_cert {
            Err("still the first certificate".to_owned())
        } else {
            Ok(cert)
        }
    })
    .await
    .unwrap();
    assert_ne!(new_cert, old_cert);
    assert_eq!(open.get("/", &[]).await.unwrap().status, 200);
    let dump = bi.config_dump().await;
    assert!(
        !dump["ingress"]["listeners"]
            .to_string()
            .contains(&first_serial.to_string()),
        "the dump still shows the first certificate"
    );

    // A client that does not trust the gateway's CA is refused by its own TLS check; one with
    // an SNI no server takes gets no certificate.
    let other = WebPki::new("another root");
    assert!(
        bi.https(
            other.client_config(&[b"http/1.1"], None),
            HOST,
            HttpVersion::Http1
        )
        .await
        .is_err()
    );
    assert!(
        bi.https(config.clone(), "nope.example.org", HttpVersion::Http1)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    if !needs_root() {
        return;
    }
    let pki = WebPki::new("example.com root");
    let server = pki.server(&[HOST]);
    let bi = start(
        bookinfo()
            .yaml(
                "credential",
                &WebPki::secret_yaml(
                    "istio-ingress",
                    "bookinfo-credential",
                    &server,
                    Some(&pki.ca_pem),
                ),
            )
            .yaml(
                "gateway",
                &gateway(&format!(
                    "{HTTP_SERVER}{}",
                    HTTPS_SERVER.replace("mode: SIMPLE", "mode: MUTUAL")
                )),
            )
            .yaml("vs", &virtual_service(TO_REVIEWS)),
    )
    .await;
    bi.until_http_status(200).await;
    let good = pki.client_config(&[b"http/1.1"], Some(&pki.client("client.example.com")));
    let (mut client, _) = eventually(SHOW_UP, || bi.https(good.clone(), HOST, HttpVersion::Http1))
        .await
        .unwrap();
    assert_eq!(client.get("/", &[]).await.unwrap().status, 200);

    // No client certificate: TLS 1.3 reports the refusal on the first read, so a request
    // must fail either way.
    let anonymous = pki.client_config(&[b"http/1.1"], None);
    let refused = match bi.https(anonymous, HOST, HttpVersion::Http1).await {
        Err(_) => true,
        Ok((mut c, _)) => c.get("/", &[]).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    // A certificate from another CA: refused.
    let stranger = WebPki::new("stranger");
    let foreign = pki.client_config(&[b"http/1.1"], Some(&stranger.client("client.example.com")));
    let refused = match bi.https(foreign, HOST, HttpVersion::Http1).await {
        Err(_) => true,
        Ok((mut c, _)) => c.get("/", &[]).await.is_err(),
    };
    assert!(refused, "a client certificate from another CA was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_redirect_and_a_missing_secret_leave_the_rest_working() {
    if !needs_root() {
        return;
    }
    let redirect = r#"
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["bookinfo.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 8080, name: http-plain, protocol: HTTP}
    hosts: ["plain.example.com"]
"#;
    let bi = start(
        bookinfo()
            .yaml("gateway", &gateway(&format!("{redirect}{HTTPS_SERVER}")))
            .yaml(
                "vs",
                &virtual_service(TO_REVIEWS).replace(
                    &format!("hosts: [\"{HOST}\"]"),
                    &format!("hosts: [\"{HOST}\", plain.example.com]"),
                ),
            ),
    )
    .await;
    bi.until_http_status(301).await;
    let mut client = bi.http(HOST).await.unwrap();
    let answer = client.get("/productpage?u=1", &[]).await.unwrap();
    assert_eq!(answer.status, 301);
    assert_eq!(
        answer.header("location"),
        Some(format!("https://{HOST}/productpage?u=1").as_str())
    );
    let mut plain = bi.http("plain.example.com").await.unwrap();
    assert_eq!(plain.get("/", &[]).await.unwrap().status, 200);

    // The HTTPS server's Secret does not exist: that server alone is not served, with the
    // reason in the dump and the metric.
    let dump = bi.config_dump().await;
    let problems = dump["ingress"]["problems"].as_array().unwrap().clone();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["reason"], "secret_not_found");
    assert_eq!(problems[0]["secret"], "istio-ingress/bookinfo-credential");
    let metrics = bi.cluster.ingress("istio-ingress").metrics().await;
    assert_eq!(
        metrics.sum(
            "gateway_server_problems",
            &[
                ("gateway", "demo/bookinfo-gateway"),
                ("reason", "secret_not_found")
            ]
        ),
        1.0,
        "{}",
        metrics.text()
    );
    assert!(
        bi.cluster
            .pod("curl")
            .connect(bi.gateway_addr(HTTPS_PORT))
            .await
            .is_err()
    );

    // Creating the Secret brings the server up.
    let pki = WebPki::new("example.com root");
    bi.cluster
        .apply(
            "credential",
            &WebPki::secret_yaml(
                "istio-ingress",
                "bookinfo-credential",
                &pki.server(&[HOST]),
                None,
            ),
        )
        .await;
    let config = pki.client_config(&[b"h2"], None);
    let (mut client, _) = eventually(SHOW_UP, || {
        bi.https(config.clone(), HOST, HttpVersion::Http2)
    })
    .await
    .unwrap();
    assert_eq!(client.get("/", &[]).await.unwrap().status, 200);
    let dump = bi.config_dump().await;
    assert_eq!(
        dump["ingress"]["problems"].as_array().map(Vec::len),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_and_fault_delay_from_the_seed_flow() {
    if !needs_root() {
        return;
    }
    // The user's note: a VirtualService bound to the ingress Gateway splits traffic and delays
    // half of it.
    let http = r#"
  - fault:
      delay:
        percentage: {value: 50}
        fixedDelay: 300ms
    route:
    - destination: {host: reviews, port: {number: 9080}, subset: v1}
      weight: 80
    - destination: {host: reviews, port: {number: 9080}, subset: v2}
      weight: 20
"#;
    let bi = start(
        bookinfo()
            .yaml("gateway", &gateway(HTTP_SERVER))
            .yaml("vs", &virtual_service(http)),
    )
    .await;
    bi.until_http_status(200).await;
    let mut client = bi.http(HOST).await.unwrap();
    let mut versions: BTreeMap<String, u32> = BTreeMap::new();
    let mut delayed = 0;
    const N: u32 = 100;
    for _ in 0..N {
        let started = std::time::Instant::now();
        let answer = client.get("/", &[]).await.unwrap();
        assert_eq!(answer.status, 200);
        if started.elapsed() >= Duration::from_millis(290) {
            delayed += 1;
        }
        *versions.entry(answer.version().to_owned()).or_default() += 1;
    }
    let v1 = versions.get("v1").copied().unwrap_or(0);
    // 80% +- 15 points over 100 requests (a miss is below 1 in 10,000 for a fair split).
    assert!((65..=95).contains(&v1), "80/20 gave {versions:?}");
    // 50% +- 20 points.
    assert!((30..=70).contains(&delayed), "{delayed} of {N} delayed");
    let _ = (&bi.v1, &bi.v2);
}

/// The L4 backends of the passthrough tests on node b of `demo`: `my-nginx` (Service port 443
/// to the pod's 8443, see [`tls_backend`]) and `tcp-echo` (9000).
fn l4_backends(builder: ClusterBuilder) -> ClusterBuilder {
    builder
        .pod("b", "demo", "my-nginx")
        .label("app", "my-nginx")
        .service("demo", "my-nginx", 443, 8443)
        .pod("b", "demo", "tcp-echo")
        .label("app", "tcp-echo")
        .service("demo", "tcp-echo", 9000, 9000)
}

/// A TLS backend in `pod` on 8443 with its own certificate for `name` from `pki` (the gateway
/// never holds it): answers the first line it reads with `my-nginx: <line>`.
async fn tls_backend(
    pod: &mesh_tests::vcluster::Pod,
    pki: &WebPki,
    name: &str,
) -> mesh_tests::vcluster::AppServer {
    let backend_tls = tokio_rustls::TlsAcceptor::from(WebPki::server_config(&pki.server(&[name])));
    pod.serve(8443, move |stream, _| {
        let acceptor = backend_tls.clone();
        async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let mut tls = BufReader::new(tls);
            let mut line = String::new();
            if tls.read_line(&mut line).await.is_ok() {
                let _ = tls
                    .get_mut()
                    .write_all(format!("my-nginx: {line}").as_bytes())
                    .await;
                let _ = tls.get_mut().shutdown().await;
            }
        }
    })
    .await
    .unwrap()
}

/// From `client`, TLS to `addr` with SNI `name` (verified with `config`), `hello` sent and
/// the whole answer read.
async fn passthrough_hello(
    client: &mesh_tests::vcluster::Pod,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = client.connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await?;
    tls.write_all(b"hello\n").await?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// Istio's "ingress gateway without TLS termination" task, beside an HTTPS server on the same
/// port and a TCP server: the gateway passes `nginx.example.com`'s TLS through by SNI to a
/// backend holding its own certificate, terminates `bookinfo.example.com`, and carries TCP on
/// 31400 by the VirtualService's `tcp` route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_by_sni_and_tcp_servers_reach_the_mesh() {
    if !needs_root() {
        return;
    }
    const NGINX: &str = "nginx.example.com";
    const TCP_PORT: u16 = 31400;
    let pki = WebPki::new("example.com root");
    // The backend's own CA: the gateway never holds this certificate.
    let nginx_pki = WebPki::new("nginx root");
    let servers = format!(
        r#"{HTTPS_SERVER}
  - port: {{number: 8443, name: tls, protocol: TLS}}
    hosts: ["{NGINX}"]
    tls: {{mode: PASSTHROUGH}}
  - port: {{number: {TCP_PORT}, name: tcp, protocol: TCP}}
    hosts: ["*"]
"#
    );
    let passthrough_vs = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: nginx, namespace: demo}}
spec:
  hosts: ["{NGINX}"]
  gateways: [bookinfo-gateway]
  tls:
  - match:
    - port: 8443
      sniHosts: ["{NGINX}"]
    route:
    - destination: {{host: my-nginx, port: {{number: 443}}}}
"#
    );
    let tcp_vs = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo, namespace: demo}}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  tcp:
  - match: [{{port: {TCP_PORT}}}]
    route:
    - destination: {{host: tcp-echo, port: {{number: 9000}}}}
"#
    );
    let bi = start(
        l4_backends(bookinfo())
            .yaml(
                "credential",
                &WebPki::secret_yaml(
                    "istio-ingress",
                    "bookinfo-credential",
                    &pki.server(&[HOST]),
                    None,
                ),
            )
            .yaml("gateway", &gateway(&servers))
            .yaml("vs", &virtual_service(TO_REVIEWS))
            .yaml("nginx", &passthrough_vs)
            .yaml("tcp", &tcp_vs),
    )
    .await;
    let _nginx = tls_backend(bi.cluster.pod("my-nginx"), &nginx_pki, NGINX).await;
    let _echo = bi.cluster.pod("tcp-echo").serve_echo(9000).await.unwrap();

    // Passed through: the client sees the backend's own certificate, from the backend's CA.
    let gateway = bi.gateway_addr(HTTPS_PORT);
    let curl = bi.cluster.pod("curl");
    let through = nginx_pki.client_config(&[], None);
    let answer = eventually(SHOW_UP, || {
        passthrough_hello(curl, gateway, through.clone(), NGINX)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "no answer through the PASSTHROUGH server: {e}\n{}",
            bi.cluster.ingress("istio-ingress").logs()
        )
    });
    assert_eq!(answer, "my-nginx: hello\n");

    // The same port terminates the HTTPS server's host with the gateway's certificate.
    let (mut client, _) = eventually(SHOW_UP, || {
        bi.https(
            pki.client_config(&[b"http/1.1"], None),
            HOST,
            HttpVersion::Http1,
        )
    })
    .await
    .unwrap();
    assert_eq!(client.get("/", &[]).await.unwrap().status, 200);
    // An SNI no server and no route takes is closed without a certificate.
    assert!(
        bi.https(
            nginx_pki.client_config(&[], None),
            "other.example.org",
            HttpVersion::Http1
        )
        .await
        .is_err()
    );

    // TCP: bytes arrive intact both ways.
    let data = mesh_tests::vcluster::pattern(256 * 1024, 7);
    let echoed = eventually(SHOW_UP, || async {
        curl.exchange(bi.gateway_addr(TCP_PORT), &data).await
    })
    .await
    .unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "TCP bytes changed on the way");

    // Both went over HBONE with the gateway's identity, and the gateway recorded them as
    // Istio's gateways do.
    let node_b = bi.cluster.node("b").metrics().await;
    for workload in ["my-nginx", "tcp-echo"] {
        let service = workload;
        let seen = node_b.sum(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", GATEWAY_SA),
                ("destination_workload", service),
            ],
        );
        assert!(seen >= 1.0, "{service}: {}", node_b.text());
    }
    let metrics = bi.cluster.ingress("istio-ingress").metrics().await;
    let opened = metrics.sum(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("destination_service_name", "my-nginx"),
        ],
    );
    assert!(opened >= 1.0, "{}", metrics.text());
}

/// The Gateway API's L4 routes at the ingress: a `TLS` listener in `Passthrough` mode whose
/// `TLSRoute` sends `nginx.example.com` by SNI to a backend holding its own certificate (the
/// gateway never terminates it; another name is refused), and a `TCP` listener whose `TCPRoute`
/// carries bytes intact to an echo server in the mesh, over HBONE with the gateway's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_tls_and_tcp_routes_pass_through_the_ingress() {
    if !needs_root() {
        return;
    }
    const NGINX: &str = "nginx.example.com";
    const TCP_PORT: u16 = 31400;
    let nginx_pki = WebPki::new("nginx root");
    let yaml = format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: demo}}
spec:
  gatewayClassName: istio
  listeners:
  - name: tls
    port: {HTTPS_PORT}
    protocol: TLS
    hostname: "*.example.com"
    tls: {{mode: Passthrough}}
  - name: tcp
    port: {TCP_PORT}
    protocol: TCP
---
apiVersion: gateway.networking.k8s.io/v1alpha3
kind: TLSRoute
metadata: {{name: nginx, namespace: demo}}
spec:
  parentRefs: [{{name: edge, sectionName: tls}}]
  hostnames: ["{NGINX}"]
  rules:
  - backendRefs: [{{name: my-nginx, port: 443}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: echo, namespace: demo}}
spec:
  parentRefs: [{{name: edge, sectionName: tcp}}]
  rules:
  - backendRefs: [{{name: tcp-echo, port: 9000}}]
"#
    );
    let bi = start(
        l4_backends(
            reviews(Cluster::builder().node("a").node("b"))
                .ingress_gateway("a", "demo", "edge-istio")
                .label("gateway.networking.k8s.io/gateway-name", "edge")
                .label("istio.io/dataplane-mode", "none"),
        )
        .yaml("routes", &yaml),
    )
    .await;
    let _nginx = tls_backend(bi.cluster.pod("my-nginx"), &nginx_pki, NGINX).await;
    let _echo = bi.cluster.pod("tcp-echo").serve_echo(9000).await.unwrap();
    let ingress = bi.cluster.ingress("edge-istio");
    let addr = |port| SocketAddr::new(ingress.ip(), port);
    let curl = bi.cluster.pod("curl");
    let through = nginx_pki.client_config(&[], None);
    let answer = eventually(SHOW_UP, || {
        passthrough_hello(curl, addr(HTTPS_PORT), through.clone(), NGINX)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "no answer through the Passthrough listener: {e}\n{}",
            ingress.logs()
        )
    });
    assert_eq!(answer, "my-nginx: hello\n");
    // A name the listener covers but no TLSRoute takes: closed.
    let other = nginx_pki.client_config(&[], None);
    assert!(
        passthrough_hello(curl, addr(HTTPS_PORT), other, "shop.example.com")
            .await
            .is_err()
    );
    let data = mesh_tests::vcluster::pattern(256 * 1024, 3);
    let echoed = eventually(SHOW_UP, || async {
        curl.exchange(addr(TCP_PORT), &data).await
    })
    .await
    .unwrap();
    assert!(echoed == data, "TCP bytes changed on the way");
    let node_b = bi.cluster.node("b").metrics().await;
    for workload in ["my-nginx", "tcp-echo"] {
        let seen = node_b.sum(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", workload),
            ],
        );
        assert!(seen >= 1.0, "{workload}: {}", node_b.text());
    }
    let dump = ingress.try_config_dump().await.unwrap().to_string();
    assert!(dump.contains("TLSRoute demo/nginx"), "{dump}");
    assert!(dump.contains("TCPRoute demo/echo"), "{dump}");
}

/// Istio's `istio.io/ingress-use-waypoint`: with it on the service, the gateway sends the
/// service's traffic to its waypoint (HBONE, `:authority` the VIP), so the waypoint's routes
/// (all to v2, a response header) and its L7 policies (which see the gateway's identity) apply;
/// without it the gateway goes straight to the endpoints, as Istio's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_use_waypoint_puts_the_waypoints_routes_and_policies_in_the_path() {
    if !needs_root() {
        return;
    }
    const INGRESS_USE_WAYPOINT: &str = "istio.io/ingress-use-waypoint";
    let mesh_routes = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: demo}
spec:
  hosts: [reviews]
  http:
  - headers:
      response:
        set: {x-routed-by: waypoint}
    route:
    - destination: {host: reviews, subset: v2}
"#;
    let policy = format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-private-from-the-gateway, namespace: demo}}
spec:
  targetRefs:
  - {{kind: Service, group: "", name: reviews}}
  action: DENY
  rules:
  - from:
    - source: {{principals: ["{}"]}}
    to:
    - operation: {{paths: ["/private*"]}}
"#,
        GATEWAY_SA.trim_start_matches("spiffe://")
    );
    let bi = start(
        bookinfo()
            .service_label("istio.io/use-waypoint", "waypoint")
            .service_label(INGRESS_USE_WAYPOINT, "true")
            .waypoint("b", "demo", "waypoint")
            .yaml("gateway", &gateway(HTTP_SERVER))
            .yaml("vs", &virtual_service(TO_REVIEWS))
            .yaml("mesh-routes", mesh_routes)
            .yaml("policy", &policy),
    )
    .await;
    bi.until_http_status(200).await;

    const N: usize = 40;
    let mut client = bi.http(HOST).await.unwrap();
    for _ in 0..N {
        let answer = client.get("/", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.version(), "v2", "the waypoint's route applies");
        assert_eq!(answer.header("x-routed-by"), Some("waypoint"));
        // Host is still the one the outside client sent.
        assert!(
            answer
                .text()
                .to_ascii_lowercase()
                .contains(&format!("host: {HOST}"))
        );
    }
    // The waypoint's L7 policy sees the gateway's identity.
    let denied = client.get("/private/x", &[]).await.unwrap();
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert_eq!(bi.v1.requests(), 0, "nothing bypassed the waypoint");

    let waypoint = bi.cluster.waypoint("waypoint").metrics().await;
    let through = waypoint.sum(
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("source_principal", GATEWAY_SA),
            ("destination_service_name", "reviews"),
        ],
    );
    assert!(through >= N as f64 + 1.0, "{}", waypoint.text());
    let dump = bi.config_dump().await.to_string();
    assert!(
        dump.contains("demo/waypoint (:authority "),
        "the gateway's cluster shows the waypoint: {dump}"
    );

    // Without the label the gateway goes to the endpoints (both versions, no waypoint header).
    bi.cluster
        .set_service_label("demo", "reviews", INGRESS_USE_WAYPOINT, None)
        .await;
    eventually(SHOW_UP, || async {
        let mut client = bi.http(HOST).await.map_err(|e| e.to_string())?;
        let answer = client.get("/", &[]).await.map_err(|e| e.to_string())?;
        match answer.header("x-routed-by") {
            None if answer.status == 200 => Ok(()),
            _ => Err(format!("{} {:?}", answer.status, answer.text())),
        }
    })
    .await
    .unwrap();
    let mut client = bi.http(HOST).await.unwrap();
    let mut versions: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..N {
        let answer = client.get("/", &[]).await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-routed-by"), None);
        *versions.entry(answer.version().to_owned()).or_default() += 1;
    }
    assert_eq!(versions.len(), 2, "both endpoints serve: {versions:?}");
}

/// Istio's ambient getting-started `bookinfo-gateway`, as the Gateway API writes it: a
/// `Gateway` of class `istio` (an HTTP listener, and here an HTTPS one with a `certificateRefs`
/// Secret) served by the gateway pods of its namespace labelled with its name, and the
/// `bookinfo` HTTPRoute attached to it. Routes attach per listener: one naming the `https`
/// listener by `sectionName` is not served on the HTTP port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_api_gateway_with_http_routes_from_the_getting_started_guide() {
    if !needs_root() {
        return;
    }
    let pki = WebPki::new("example.com root");
    let gateway = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway, namespace: demo}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 8080
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Same
  - name: https
    port: 8443
    protocol: HTTPS
    hostname: bookinfo.example.com
    tls:
      mode: Terminate
      certificateRefs: [{name: bookinfo-cert}]
"#;
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bookinfo, namespace: demo}
spec:
  parentRefs:
  - name: bookinfo-gateway
  rules:
  - matches:
    - path: {type: Exact, value: /productpage}
    - path: {type: PathPrefix, value: /static}
    backendRefs:
    - name: reviews
      port: 9080
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: secure-only, namespace: demo}
spec:
  parentRefs:
  - {name: bookinfo-gateway, sectionName: https}
  rules:
  - matches: [{path: {type: PathPrefix, value: /secure}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-listener, value: https}]
    backendRefs: [{name: reviews, port: 9080}]
"#;
    // The gateway pod, as Istio deploys one for the Gateway: in its namespace, labelled with
    // its name, not captured.
    let bi = start(
        reviews(Cluster::builder().node("a").node("b"))
            .ingress_gateway("a", "demo", "bookinfo-gateway-istio")
            .label("gateway.networking.k8s.io/gateway-name", "bookinfo-gateway")
            .label("istio.io/dataplane-mode", "none")
            .yaml("gateway", gateway)
            .yaml("routes", routes)
            .yaml(
                "cert",
                &WebPki::secret_yaml("demo", "bookinfo-cert", &pki.server(&[HOST]), None),
            ),
    )
    .await;
    let ingress = bi.cluster.ingress("bookinfo-gateway-istio");
    let addr = |port| SocketAddr::new(ingress.ip(), port);
    let http = || async {
        let stream = bi.cluster.pod("curl").connect(addr(HTTP_PORT)).await?;
        HttpClient::on(stream, HOST.to_owned(), HttpVersion::Http1).await
    };
    eventually(SHOW_UP, || async {
        let mut client = http().await.map_err(|e| e.to_string())?;
        let answer = client
            .get("/productpage", &[])
            .await
            .map_err(|e| e.to_string())?;
        (answer.status == 200)
            .then_some(())
            .ok_or_else(|| format!("{} {}", answer.status, answer.text()))
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "GET /productpage never answered 200: {e}\n{}",
            ingress.logs()
        )
    });

    let mut client = http().await.unwrap();
    let mut versions: BTreeMap<String, u32> = BTreeMap::new();
    for path in ["/productpage", "/static/app.js", "/productpage"] {
        let answer = client.get(path, &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        *versions.entry(answer.version().to_owned()).or_default() += 1;
    }
    assert_eq!(versions.values().sum::<u32>(), 3);
    // Exact /productpage only; nothing else matches: 404.
    assert_eq!(client.get("/productpage/x", &[]).await.unwrap().status, 404);
    // The https listener's route is not on the HTTP listener.
    assert_eq!(client.get("/secure", &[]).await.unwrap().status, 404);

    // Over TLS on the https listener, with the certificateRefs Secret: both routes apply.
    let config = pki.client_config(&[b"http/1.1"], None);
    let stream = bi
        .cluster
        .pod("curl")
        .connect(addr(HTTPS_PORT))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(HOST.to_owned()).unwrap(), stream)
        .await
        .unwrap();
    let mut client = HttpClient::on(tls, HOST.to_owned(), HttpVersion::Http1)
        .await
        .unwrap();
    let answer = client.get("/secure/page", &[]).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-listener"), Some("https"));
    assert_eq!(client.get("/productpage", &[]).await.unwrap().status, 200);

    let dump = ingress.try_config_dump().await.unwrap();
    assert_eq!(
        dump["ingress"]["problems"].as_array().map(Vec::len),
        Some(0),
        "{dump}"
    );
    assert!(bi.v1.requests() + bi.v2.requests() >= 5);
}

/// A Gateway with 1,000 HTTPS servers on one port, each its own host and certificate: every
/// name gets its own certificate by SNI and its request routed; a name no server has is
/// refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sni_names_each_get_their_own_certificate() {
    if !needs_root() {
        return;
    }
    const N: usize = 1_000;
    let pki = WebPki::new("example.com root");
    let mut servers = String::new();
    let mut secrets = String::new();
    let mut issued = Vec::new();
    for i in 0..N {
        let host = format!("h{i}.example.com");
        servers.push_str(&format!(
            "  - port: {{number: 8443, name: s{i}, protocol: HTTPS}}\n    hosts: [\"{host}\"]\n    tls: {{mode: SIMPLE, credentialName: c{i}}}\n"
        ));
        let cert = pki.server(&[&host]);
        secrets.push_str(&WebPki::secret_yaml(
            "istio-ingress",
            &format!("c{i}"),
            &cert,
            None,
        ));
        secrets.push_str("\n---\n");
        issued.push(cert);
    }
    let routes = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: many, namespace: demo}
spec:
  hosts: ["*.example.com"]
  gateways: [bookinfo-gateway]
  http:
  - route:
    - destination: {host: reviews, port: {number: 9080}}
"#;
    let bi = start(
        bookinfo()
            .yaml("gateway", &gateway(&servers))
            .yaml("vs", routes)
            .yaml("credentials", &secrets),
    )
    .await;
    let config = pki.client_config(&[b"http/1.1"], None);
    for i in [0, 1, N / 2, N - 1] {
        let host = format!("h{i}.example.com");
        let (mut client, presented) = eventually(SHOW_UP, || async {
            bi.https(config.clone(), &host, HttpVersion::Http1)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{host}: {e}\n{}",
                bi.cluster.ingress("istio-ingress").logs()
            )
        });
        use rustls_pki_types::pem::PemObject;
        let expected =
            rustls_pki_types::CertificateDer::from_pem_slice(issued[i].cert.as_bytes()).unwrap();
        assert_eq!(
            presented,
            expected.to_vec(),
            "{host} got another certificate"
        );
        let answer = client.get("/", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{host}: {}", answer.text());
    }
    assert!(
        bi.https(config, "nope.example.com", HttpVersion::Http1)
            .await
            .is_err(),
        "a name no server has is refused"
    );
    let dump = bi.config_dump().await;
    assert_eq!(
        dump["ingress"]["problems"].as_array().map(Vec::len),
        Some(0)
    );
    let _ = (&bi.v1, &bi.v2);
}

/// Two Gateways claim one host on one port: the older serves it, the younger's server is not
/// served there, and the conflict is reported (log, `/config_dump`, metric) naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_claiming_one_port_and_host_the_older_wins_and_it_is_reported() {
    if !needs_root() {
        return;
    }
    let gateway_at = |name: &str, created: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: demo, creationTimestamp: "{created}"}}
spec:
  selector: {{istio: ingress}}
  servers:
  - port: {{number: 8080, name: http, protocol: HTTP}}
    hosts: ["{HOST}"]
"#
        )
    };
    let bound = |name: &str, gateway: &str, subset: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: demo}}
spec:
  hosts: ["{HOST}"]
  gateways: [{gateway}]
  http:
  - route:
    - destination: {{host: reviews, port: {{number: 9080}}, subset: {subset}}}
"#
        )
    };
    let bi = start(
        bookinfo()
            .yaml(
                "old",
                &gateway_at("bookinfo-gateway", "2026-01-01T00:00:00Z"),
            )
            .yaml("young", &gateway_at("intruder", "2026-06-01T00:00:00Z"))
            .yaml("to-v1", &bound("to-v1", "bookinfo-gateway", "v1"))
            .yaml("to-v2", &bound("to-v2", "intruder", "v2")),
    )
    .await;
    bi.until_http_status(200).await;
    let mut client = bi.http(HOST).await.unwrap();
    for _ in 0..20 {
        let answer = client.get("/", &[]).await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.version(), "v1", "the older Gateway's routes serve");
    }
    assert_eq!(bi.v2.requests(), 0);
    let dump = bi.config_dump().await;
    let problems = dump["ingress"]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["gateway"], "demo/intruder");
    assert_eq!(problems[0]["reason"], "host_conflict");
    let metrics = bi.cluster.ingress("istio-ingress").metrics().await;
    assert_eq!(
        metrics.sum(
            "gateway_server_problems",
            &[("gateway", "demo/intruder"), ("reason", "host_conflict")]
        ),
        1.0,
        "{}",
        metrics.text()
    );
}
