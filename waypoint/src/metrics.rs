//! Istio's standard HTTP metrics as a waypoint reports them (`reporter="waypoint"`), the
//! waypoint's count of the replies it generated itself, and the access-log line: one of each per
//! request, from one [`RequestRecord`].
//!
//! Metric names, label names and values and histogram buckets are Istio's, so existing
//! dashboards work. The access log (target `access`) carries what the labels cannot: route,
//! subset, endpoint, attempts and the failure reason, so every 503 and reset can be explained.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderMap;
use mesh::identity::Identity;
use mesh::model::{Service, Workload};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `reporter` label of everything a waypoint reports.
pub const REPORTER: &str = "waypoint";

/// Istio's value for a label it cannot fill.
pub const UNKNOWN: &str = "unknown";

/// Envoy's default histogram buckets. Istio sets no others, so all three of its HTTP
/// histograms use them, milliseconds and bytes alike, unless a pod overrides them with the
/// `sidecar.istio.io/statsHistogramBuckets` annotation (prefix `istiocustom`).
pub const ISTIO_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// One side of a request as the metrics label it, every value filled (`unknown` when missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabels {
    pub workload: String,
    pub namespace: String,
    /// `spiffe://...`, as Istio prints principals in metrics.
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl Default for PeerLabels {
    fn default() -> Self {
        let unknown = || UNKNOWN.to_owned();
        Self {
            workload: unknown(),
            namespace: unknown(),
            principal: unknown(),
            app: unknown(),
            version: unknown(),
            canonical_service: unknown(),
            canonical_revision: unknown(),
            cluster: unknown(),
        }
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_owned()
    } else {
        s.to_owned()
    }
}

/// Labels for a peer: its workload (from the state) and the identity it proved (source) or was
/// expected to prove (destination). `app`/`version` are the canonical service and revision, as
/// Istio's ambient proxies fill them. Without a workload the namespace still comes from the
/// identity, as Istio falls back to the principal. A workload from the state is in this
/// proxy's cluster, `cluster` (`CLUSTER_ID`); without one the cluster is `unknown`.
pub fn peer_labels(
    workload: Option<&Workload>,
    identity: Option<&Identity>,
    cluster: &str,
) -> PeerLabels {
    let principal = identity.map_or_else(|| UNKNOWN.to_owned(), |i| i.to_string());
    match workload {
        Some(w) => PeerLabels {
            workload: or_unknown(&w.workload_name),
            namespace: or_unknown(&w.namespace),
            principal,
            app: or_unknown(&w.canonical_service),
            version: or_unknown(&w.canonical_revision),
            canonical_service: or_unknown(&w.canonical_service),
            canonical_revision: or_unknown(&w.canonical_revision),
            cluster: or_unknown(cluster),
        },
        None => PeerLabels {
            namespace: identity.map_or_else(|| UNKNOWN.to_owned(), |i| or_unknown(i.namespace())),
            principal,
            ..PeerLabels::default()
        },
    }
}

/// `destination_service*` labels: hostname, name and namespace of the service the request was
/// for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLabels {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl Default for ServiceLabels {
    fn default() -> Self {
        Self {
            host: UNKNOWN.to_owned(),
            name: UNKNOWN.to_owned(),
            namespace: UNKNOWN.to_owned(),
        }
    }
}

pub fn service_labels(service: Option<&Service>) -> ServiceLabels {
    match service {
        Some(s) => ServiceLabels {
            host: or_unknown(&s.hostname),
            name: or_unknown(&s.name),
            namespace: or_unknown(&s.namespace),
        },
        None => ServiceLabels::default(),
    }
}

/// `request_protocol`: `grpc` when the request's content type says gRPC, else `http`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RequestProtocol {
    #[default]
    Http,
    Grpc,
}

impl RequestProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }

    /// As Envoy decides it: `content-type` is `application/grpc`, or starts with
    /// `application/grpc+` or `application/grpc;`.
    pub fn of(headers: &HeaderMap) -> Self {
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|ct| ct.strip_prefix("application/grpc"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']));
        if grpc {
            RequestProtocol::Grpc
        } else {
            RequestProtocol::Http
        }
    }
}

/// Why the waypoint answered a request itself instead of passing on the upstream's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalReply {
    /// 403: an AuthorizationPolicy denied it.
    AuthzDenied,
    /// 404: no route for the host or path.
    NoRoute,
    /// 503: no ready endpoint (none at all, none in the subset, or all ejected).
    NoHealthyUpstream,
    /// 503: a connection-pool limit was reached.
    Overflow,
    /// 504: the route's timeout (or the per-try timeout on the last try) expired.
    Timeout,
    /// 503 (or 502/504): the upstream connection failed, or was reset before a response, on
    /// the last attempt.
    UpstreamFailure,
    /// Fault injection `abort`.
    FaultAbort,
    /// The route's `directResponse`.
    DirectResponse,
    /// The route's `redirect`.
    Redirect,
    /// 429 (gRPC `RESOURCE_EXHAUSTED`): a RateLimitPolicy rule's bucket was empty.
    RateLimited,
}

impl LocalReply {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalReply::AuthzDenied => "authz_denied",
            LocalReply::NoRoute => "no_route",
            LocalReply::NoHealthyUpstream => "no_healthy_upstream",
            LocalReply::Overflow => "overflow",
            LocalReply::Timeout => "timeout",
            LocalReply::UpstreamFailure => "upstream_failure",
            LocalReply::FaultAbort => "fault_abort",
            LocalReply::DirectResponse => "direct_response",
            LocalReply::Redirect => "redirect",
            LocalReply::RateLimited => "rate_limited",
        }
    }
}

/// Everything recorded about one finished request: the metric labels, the measurements and
/// the access-log fields.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    /// `waypoint`, or `source` for the ingress.
    pub reporter: &'static str,
    pub source: PeerLabels,
    /// The endpoint's workload, `unknown` when the request never reached one.
    pub destination: PeerLabels,
    pub service: ServiceLabels,
    pub protocol: RequestProtocol,
    /// The status sent to the client; 0 when none was (the client went away first), as Envoy.
    pub response_code: u16,
    /// `grpc-status` from the response trailers or headers, for gRPC.
    pub grpc_status: Option<u32>,
    /// Envoy's short response flags, comma-separated (`UF`, `UH`, `UO`, `UT`, `URX`, `UC`,
    /// `UR`, `NR`, `DC`, `FI`, `DI`, ...); empty when none (reported as `-`).
    pub response_flags: String,
    /// The client came over mTLS (HBONE): `connection_security_policy="mutual_tls"`.
    pub mutual_tls: bool,
    /// From the first byte of the request to the last byte of the response.
    pub duration: Duration,
    /// Bytes received from the client for this request. Istio counts the downstream wire
    /// bytes (headers and body); pass those when known, else the body length.
    pub request_bytes: u64,
    /// Bytes sent to the client, counted the same way.
    pub response_bytes: u64,
    pub method: http::Method,
    pub authority: String,
    /// As received, query string included.
    pub path: String,
    /// The VirtualService route that matched (`<namespace>/<name>` and route name or index).
    pub route: Option<String>,
    pub subset: Option<String>,
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
    /// Upstream tries, the first included: 0 = never sent upstream, 2 = one retry.
    pub attempts: u32,
    /// Set when the waypoint answered itself.
    pub local_reply: Option<LocalReply>,
    /// Why the request failed or was refused, for the operator: the upstream error of the last
    /// attempt (`connect 10.1.2.3:8080: connection refused`, `reset by upstream`), or the
    /// authorization decision (`denied by DENY policy demo/x rule 0`).
    pub failure_reason: Option<String>,
}

impl RequestRecord {
    fn response_flags(&self) -> &str {
        if self.response_flags.is_empty() {
            "-"
        } else {
            &self.response_flags
        }
    }

    fn labels(&self) -> RequestLabels {
        let (src, dst, svc) = (&self.source, &self.destination, &self.service);
        RequestLabels {
            reporter: self.reporter,
            source_workload: src.workload.clone(),
            source_workload_namespace: src.namespace.clone(),
            source_principal: src.principal.clone(),
            source_app: src.app.clone(),
            source_version: src.version.clone(),
            source_canonical_service: src.canonical_service.clone(),
            source_canonical_revision: src.canonical_revision.clone(),
            source_cluster: src.cluster.clone(),
            destination_workload: dst.workload.clone(),
            destination_workload_namespace: dst.namespace.clone(),
            destination_principal: dst.principal.clone(),
            destination_app: dst.app.clone(),
            destination_version: dst.version.clone(),
            destination_service: svc.host.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            destination_canonical_service: dst.canonical_service.clone(),
            destination_canonical_revision: dst.canonical_revision.clone(),
            destination_cluster: dst.cluster.clone(),
            request_protocol: self.protocol.as_str(),
            response_code: self.response_code,
            // Empty for plain HTTP, and for gRPC without a status, as Istio.
            grpc_response_status: self.grpc_status.map(|s| s.to_string()).unwrap_or_default(),
            response_flags: self.response_flags().to_owned(),
            connection_security_policy: if self.mutual_tls {
                "mutual_tls"
            } else {
                "none"
            },
        }
    }
}

/// Istio's standard label set for HTTP metrics, in Istio's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalReplyLabels {
    pub reason: &'static str,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn istio_histogram() -> Histogram {
    Histogram::new(ISTIO_BUCKETS)
}

/// `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
/// `istio_response_bytes` and `waypoint_local_replies_total`.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    local_replies: Family<LocalReplyLabels, Counter>,
}

impl RequestMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let histogram = || HistogramFamily::new_with_constructor(istio_histogram);
        let m = Self {
            requests: Family::default(),
            duration: histogram(),
            request_bytes: histogram(),
            response_bytes: histogram(),
            local_replies: Family::default(),
        };
        // The client library appends `_total` to counters.
        registry.register(
            "istio_requests",
            "Requests handled, by response code and flags",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, first request byte to last response byte",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size in bytes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response size in bytes",
            m.response_bytes.clone(),
        );
        registry.register(
            "waypoint_local_replies",
            "Responses the waypoint generated itself instead of forwarding the upstream's, by reason",
            m.local_replies.clone(),
        );
        m
    }

    /// Counts one finished request.
    pub fn record(&self, record: &RequestRecord) {
        let labels = record.labels();
        self.requests.get_or_create(&labels).inc();
        // Envoy records whole milliseconds.
        self.duration
            .get_or_create(&labels)
            .observe(record.duration.as_millis() as f64);
        self.request_bytes
            .get_or_create(&labels)
            .observe(record.request_bytes as f64);
        self.response_bytes
            .get_or_create(&labels)
            .observe(record.response_bytes as f64);
        if let Some(reason) = record.local_reply {
            self.local_replies
                .get_or_create(&LocalReplyLabels {
                    reason: reason.as_str(),
                })
                .inc();
        }
    }
}

/// `-` for a missing value, as Envoy's access log.
struct OrDash<'a, T: ?Sized>(Option<&'a T>);

impl<T: fmt::Display + ?Sized> fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// One access-log line (target `access`) for a finished request.
pub fn log_access(record: &RequestRecord) {
    let r = record;
    tracing::info!(
        target: "access",
        reporter = r.reporter,
        method = %r.method,
        authority = %or_dash(&r.authority),
        path = %or_dash(&r.path),
        protocol = r.protocol.as_str(),
        status = r.response_code,
        grpc_status = %OrDash(r.grpc_status.as_ref()),
        flags = r.response_flags(),
        duration_ms = r.duration.as_millis() as u64,
        bytes_recv = r.request_bytes,
        bytes_sent = r.response_bytes,
        src.identity = %r.source.principal,
        src.workload = %r.source.workload,
        src.namespace = %r.source.namespace,
        dst.service = %r.service.host,
        dst.workload = %r.destination.workload,
        dst.identity = %r.destination.principal,
        route = %OrDash(r.route.as_deref()),
        subset = %OrDash(r.subset.as_deref()),
        endpoint = %OrDash(r.endpoint.as_ref()),
        attempts = r.attempts,
        local_reply = r.local_reply.map_or("-", LocalReply::as_str),
        reason = %OrDash(r.failure_reason.as_deref()),
        "request complete"
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io;
    use std::sync::{Arc, Mutex};

    use prometheus_client::encoding::text::encode;

    use super::*;

    fn workload(ns: &str, name: &str) -> Workload {
        Workload {
            uid: format!("{ns}/{name}-0"),
            name: format!("{name}-0"),
            namespace: ns.into(),
            ips: vec!["10.1.0.5".parse().unwrap()],
            node: "node-a".into(),
            service_account: name.into(),
            identity: Identity::new("cluster.local", ns, name).unwrap(),
            labels: BTreeMap::new(),
            enrolled: true,
            workload_name: name.into(),
            workload_kind: "deployment".into(),
            canonical_service: name.into(),
            canonical_revision: "v1".into(),
            named_ports: BTreeMap::new(),
        }
    }

    fn ok_record() -> RequestRecord {
        let sleep = workload("demo", "sleep");
        let web = workload("demo", "web");
        RequestRecord {
            reporter: REPORTER,
            source: peer_labels(Some(&sleep), Some(&sleep.identity), "Kubernetes"),
            destination: peer_labels(Some(&web), Some(&web.identity), "Kubernetes"),
            service: ServiceLabels {
                host: "web.demo.svc.cluster.local".into(),
                name: "web".into(),
                namespace: "demo".into(),
            },
            response_code: 200,
            mutual_tls: true,
            duration: Duration::from_micros(7_400),
            request_bytes: 120,
            response_bytes: 2_000,
            authority: "web.demo.svc.cluster.local:8080".into(),
            path: "/api?x=1".into(),
            route: Some("demo/web/0".into()),
            subset: Some("v1".into()),
            endpoint: Some("10.1.2.3:8080".parse().unwrap()),
            attempts: 1,
            ..RequestRecord::default()
        }
    }

    fn encoded(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).unwrap();
        out
    }

    /// The sample line of `name` whose labels contain every one of `labels`.
    fn sample<'a>(text: &'a str, name: &str, labels: &[&str]) -> Option<&'a str> {
        text.lines().find(|l| {
            l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want))
        })
    }

    fn value(line: Option<&str>) -> f64 {
        let line = line.expect("sample present");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn peer_labels_fill_unknown() {
        let web = workload("demo", "web");
        let full = peer_labels(Some(&web), Some(&web.identity), "east");
        assert_eq!(
            full,
            PeerLabels {
                workload: "web".into(),
                namespace: "demo".into(),
                principal: "spiffe://cluster.local/ns/demo/sa/web".into(),
                app: "web".into(),
                version: "v1".into(),
                canonical_service: "web".into(),
                canonical_revision: "v1".into(),
                cluster: "east".into(),
            }
        );
        let no_identity = peer_labels(Some(&web), None, "east");
        assert_eq!(no_identity.principal, "unknown");
        let id = Identity::new("cluster.local", "prod", "robot").unwrap();
        let identity_only = peer_labels(None, Some(&id), "east");
        assert_eq!(identity_only.namespace, "prod");
        assert_eq!(identity_only.cluster, "unknown", "a peer not in the state");
        assert_eq!(identity_only.workload, "unknown");
        assert_eq!(
            identity_only.principal,
            "spiffe://cluster.local/ns/prod/sa/robot"
        );
        assert_eq!(peer_labels(None, None, "east"), PeerLabels::default());
        assert_eq!(PeerLabels::default().app, "unknown");
        assert_eq!(service_labels(None).host, "unknown");
    }

    #[test]
    fn grpc_is_detected_from_the_content_type() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(ct),
            );
            RequestProtocol::of(&h)
        };
        assert_eq!(with("application/grpc"), RequestProtocol::Grpc);
        assert_eq!(with("application/grpc+proto"), RequestProtocol::Grpc);
        assert_eq!(with("application/grpc-web"), RequestProtocol::Http);
        assert_eq!(with("application/json"), RequestProtocol::Http);
        assert_eq!(
            RequestProtocol::of(&HeaderMap::new()),
            RequestProtocol::Http
        );
    }

    #[test]
    fn records_istio_metrics_with_labels_and_buckets() {
        let mut registry = Registry::default();
        let metrics = RequestMetrics::new(&mut registry);
        metrics.record(&ok_record());
        metrics.record(&ok_record());
        let overflow = RequestRecord {
            destination: PeerLabels::default(),
            response_code: 503,
            response_flags: "UO".into(),
            duration: Duration::from_micros(300),
            request_bytes: 80,
            response_bytes: 81,
            endpoint: None,
            attempts: 0,
            local_reply: Some(LocalReply::Overflow),
            failure_reason: Some("http2MaxRequests (100) reached".into()),
            ..ok_record()
        };
        metrics.record(&overflow);
        let text = encoded(&registry);

        let ok = [
            r#"reporter="waypoint""#,
            r#"source_workload="sleep""#,
            r#"source_workload_namespace="demo""#,
            r#"source_principal="spiffe://cluster.local/ns/demo/sa/sleep""#,
            r#"source_app="sleep""#,
            r#"source_version="v1""#,
            r#"source_cluster="Kubernetes""#,
            r#"destination_workload="web""#,
            r#"destination_cluster="Kubernetes""#,
            r#"destination_principal="spiffe://cluster.local/ns/demo/sa/web""#,
            r#"destination_service="web.demo.svc.cluster.local""#,
            r#"destination_service_name="web""#,
            r#"destination_service_namespace="demo""#,
            r#"destination_canonical_revision="v1""#,
            r#"request_protocol="http""#,
            r#"response_code="200""#,
            r#"grpc_response_status="""#,
            r#"response_flags="-""#,
            r#"connection_security_policy="mutual_tls""#,
        ];
        assert_eq!(
            value(sample(&text, "istio_requests_total", &ok)),
            2.0,
            "{text}"
        );
        let failed = [
            r#"response_code="503""#,
            r#"response_flags="UO""#,
            r#"destination_workload="unknown""#,
        ];
        assert_eq!(value(sample(&text, "istio_requests_total", &failed)), 1.0);

        // 7.4 ms is recorded as 7: above 5, within 10.
        let dur = "istio_request_duration_milliseconds_bucket";
        let ok_200 = r#"response_code="200""#;
        assert_eq!(value(sample(&text, dur, &[ok_200, r#"le="5.0""#])), 0.0);
        assert_eq!(value(sample(&text, dur, &[ok_200, r#"le="10.0""#])), 2.0);
        assert_eq!(value(sample(&text, dur, &[ok_200, r#"le="+Inf""#])), 2.0);
        assert_eq!(
            value(sample(&text, dur, &[ok_200, r#"le="3600000.0""#])),
            2.0
        );
        assert_eq!(
            value(sample(
                &text,
                "istio_request_duration_milliseconds_sum",
                &[ok_200]
            )),
            14.0
        );
        assert_eq!(
            value(sample(
                &text,
                "istio_request_duration_milliseconds_count",
                &[ok_200]
            )),
            2.0
        );
        // 0.3 ms rounds down to 0: the first bucket.
        let r503 = r#"response_code="503""#;
        assert_eq!(value(sample(&text, dur, &[r503, r#"le="0.5""#])), 1.0);

        let req = "istio_request_bytes_bucket";
        assert_eq!(value(sample(&text, req, &[ok_200, r#"le="100.0""#])), 0.0);
        assert_eq!(value(sample(&text, req, &[ok_200, r#"le="250.0""#])), 2.0);
        let resp = "istio_response_bytes_bucket";
        assert_eq!(value(sample(&text, resp, &[ok_200, r#"le="1000.0""#])), 0.0);
        assert_eq!(value(sample(&text, resp, &[ok_200, r#"le="2500.0""#])), 2.0);
        assert_eq!(
            value(sample(&text, "istio_response_bytes_sum", &[ok_200])),
            4000.0
        );

        assert_eq!(
            value(sample(
                &text,
                "waypoint_local_replies_total",
                &[r#"reason="overflow""#]
            )),
            1.0
        );
        assert!(text.contains("# TYPE istio_requests counter"), "{text}");
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram"));
        assert!(text.contains("# TYPE istio_request_bytes histogram"));
        assert!(text.contains("# TYPE istio_response_bytes histogram"));
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with(dur) && l.contains(ok_200))
                .count(),
            ISTIO_BUCKETS.len() + 1
        );
    }

    #[test]
    fn grpc_status_label() {
        let mut registry = Registry::default();
        let metrics = RequestMetrics::new(&mut registry);
        metrics.record(&RequestRecord {
            protocol: RequestProtocol::Grpc,
            grpc_status: Some(14),
            ..ok_record()
        });
        let text = encoded(&registry);
        let labels = [r#"request_protocol="grpc""#, r#"grpc_response_status="14""#];
        assert_eq!(value(sample(&text, "istio_requests_total", &labels)), 1.0);
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log_of(record: &RequestRecord) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || log_access(record));
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn access_log_explains_a_503() {
        let record = RequestRecord {
            response_code: 503,
            response_flags: "URX,UF".into(),
            attempts: 3,
            local_reply: Some(LocalReply::UpstreamFailure),
            failure_reason: Some("connect 10.1.2.3:8080: connection refused".into()),
            ..ok_record()
        };
        let line = log_of(&record);
        assert_eq!(line.lines().count(), 1, "{line}");
        for want in [
            " access: ",
            "method=GET",
            "authority=web.demo.svc.cluster.local:8080",
            "path=/api?x=1",
            "status=503",
            "flags=\"URX,UF\"",
            "duration_ms=7",
            "src.identity=spiffe://cluster.local/ns/demo/sa/sleep",
            "dst.service=web.demo.svc.cluster.local",
            "route=demo/web/0",
            "subset=v1",
            "endpoint=10.1.2.3:8080",
            "attempts=3",
            "local_reply=\"upstream_failure\"",
            "reason=connect 10.1.2.3:8080: connection refused",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
    }

    #[test]
    fn access_log_dashes_missing_values() {
        let record = RequestRecord {
            route: None,
            subset: None,
            endpoint: None,
            ..ok_record()
        };
        let line = log_of(&record);
        for want in [
            "route=-",
            "subset=-",
            "endpoint=-",
            "reason=-",
            "grpc_status=-",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
    }
}
