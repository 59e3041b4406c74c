//! The L7 half of the domain model: what a waypoint reads.
//!
//! `VirtualService` and `DestinationRule` (networking.istio.io), waypoint bindings
//! (`istio.io/use-waypoint`, Gateway API `Gateway` with class `istio-waypoint`) and
//! AuthorizationPolicies evaluated at L7. Like [`super::types`], these are produced only by the
//! translation, validated, with Istio's defaults already applied, so the data path never reads
//! an optional field to guess a default.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use super::types::{IpBlock, Labels, PolicyAction, StringMatch};

/// Service or Namespace label naming the waypoint that serves its traffic; `none` opts a
/// service out of its namespace's waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Companion label: the waypoint lives in another namespace.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Service or Namespace label: `"true"` sends an ingress gateway's traffic for the service
/// through the service's waypoint (`istio.io/use-waypoint`) rather than straight to its
/// endpoints, as Istio's gateways do. Read from the Service when it carries the label, else from
/// its Namespace.
pub const INGRESS_USE_WAYPOINT_LABEL: &str = "istio.io/ingress-use-waypoint";
/// The `gatewayClassName` of a waypoint `Gateway`.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";
/// The HBONE port a waypoint listens on.
pub const WAYPOINT_HBONE_PORT: u16 = 15008;

/// Which waypoint serves a service: the waypoint's own Service, `<namespace>/<name>` (Istio
/// names the waypoint's Service after its Gateway).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

impl WaypointRef {
    /// The key of the waypoint's Service in [`super::State::services`].
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Gateway API `Gateway` with `gatewayClassName: istio-waypoint`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WaypointGateway {
    pub name: String,
    pub namespace: String,
}

/// A compiled regular expression with RE2 semantics as Envoy applies them: it must match the
/// whole value (the translation anchors it).
#[derive(Debug, Clone)]
pub struct Regex {
    /// As written by the user (for config dumps and errors).
    pub pattern: String,
    pub compiled: regex::Regex,
}

impl Regex {
    /// Compiles `pattern` anchored at both ends.
    pub fn full_match(pattern: &str) -> Result<Self, regex::Error> {
        let compiled = regex::Regex::new(&format!("^(?:{pattern})$"))?;
        Ok(Self {
            pattern: pattern.to_owned(),
            compiled,
        })
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.compiled.is_match(value)
    }
}

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl Eq for Regex {}

impl serde::Serialize for Regex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.pattern)
    }
}

/// Istio's `StringMatch` in VirtualService matches: `exact`, `prefix` or `regex`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    /// Gateway API `PathPrefix`: element-wise (`/abc` matches `/abc`, `/abc/` and `/abc/def`,
    /// not `/abcd`); no trailing `/` (except the root `/`).
    PathPrefix(String),
}

/// A header or query parameter condition. `value: None` means "present" (Istio's empty
/// `StringMatch`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NamedMatch {
    /// Header names are lower-cased by the translation.
    pub name: String,
    pub value: Option<ValueMatch>,
}

/// One `HTTPMatchRequest`: every condition present must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<ValueMatch>,
    pub scheme: Option<ValueMatch>,
    pub method: Option<ValueMatch>,
    pub authority: Option<ValueMatch>,
    pub headers: Vec<NamedMatch>,
    /// Each listed header must be absent, or present without matching its value.
    pub without_headers: Vec<NamedMatch>,
    pub query_params: Vec<NamedMatch>,
    /// The service port the request arrived on.
    pub port: Option<u16>,
    /// The client workload must carry all of these labels (Istio ignores this in ambient
    /// mode; we honour it with the client's workload labels).
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
    /// Case-insensitive `uri` match (exact and prefix; regex as written).
    pub ignore_uri_case: bool,
}

/// [`Destination::host`] of a Gateway API backend that cannot be resolved (not a Service, or
/// in another namespace without a ReferenceGrant): the waypoint answers its share of requests
/// with 500, as the specification requires. No VirtualService destination is ever empty.
pub const UNRESOLVED_BACKEND: &str = "";

/// Where a route sends traffic. `host` is a fully qualified service hostname (short names are
/// expanded relative to the VirtualService's namespace by the translation).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    /// Needed when the service has more than one port; else the request's port.
    pub port: Option<u16>,
}

/// `set` replaces, `add` appends, `remove` deletes. Header names lower-cased.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeaderEdits {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeaderOperations {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteDestination {
    pub destination: Destination,
    /// Relative weight; a single destination gets everything whatever its weight.
    pub weight: u32,
    pub headers: HeaderOperations,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RedirectPort {
    Number(u16),
    /// `derivePort: FROM_PROTOCOL_DEFAULT` (80 for http, 443 for https).
    FromProtocolDefault,
    /// `derivePort: FROM_REQUEST_PORT`.
    FromRequestPort,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<RedirectPort>,
    pub scheme: Option<String>,
    /// 301 unless `redirectCode` says otherwise.
    pub code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(skip)]
    pub body: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum HttpAction {
    /// Weighted destinations (at least one).
    Route(Vec<RouteDestination>),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rewrite {
    /// Replaces the matched prefix (or the whole path for exact/regex matches).
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `uriRegexRewrite`: every match of `regex` in the path is replaced by `rewrite` (RE2
    /// `\1` group references).
    pub uri_regex: Option<(Regex, String)>,
}

/// `retryOn` tokens, as Envoy names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum RetryCondition {
    /// `5xx`
    FiveXx,
    /// `gateway-error` (502, 503, 504)
    GatewayError,
    /// `reset`
    Reset,
    /// `connect-failure`
    ConnectFailure,
    /// `refused-stream`
    RefusedStream,
    /// `retriable-4xx` (409)
    Retriable4xx,
    /// `retriable-status-codes` (with [`RetryOn::status_codes`])
    RetriableStatusCodes,
    /// gRPC `cancelled`, `deadline-exceeded`, `unavailable`, `resource-exhausted`, `internal`
    GrpcCancelled,
    GrpcDeadlineExceeded,
    GrpcUnavailable,
    GrpcResourceExhausted,
    GrpcInternal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryOn {
    pub conditions: Vec<RetryCondition>,
    /// Bare numbers in `retryOn` (Istio turns them into retriable status codes).
    pub status_codes: Vec<u16>,
}

/// `retries`, with Istio's defaults applied when the route has none: 2 attempts on
/// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try (0 disables).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// The base of the jittered exponential back-off between attempts (the ceiling is ten
    /// times it, as Envoy's `max_interval` default); `None`: Envoy's 25 ms (250 ms ceiling).
    /// Set by a Gateway API `retry.backoff`; Istio's `retries` has no such field.
    pub backoff: Option<Duration>,
    pub retry_on: RetryOn,
}

impl RetryPolicy {
    /// Istio's policy for routes that set no `retries`: 2 retries on
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503.
    pub fn istio_default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            backoff: None,
            retry_on: RetryOn {
                conditions: vec![
                    RetryCondition::ConnectFailure,
                    RetryCondition::RefusedStream,
                    RetryCondition::GrpcUnavailable,
                    RetryCondition::GrpcCancelled,
                    RetryCondition::RetriableStatusCodes,
                ],
                status_codes: vec![503],
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FaultDelay {
    pub delay: Duration,
    /// 0.0 ..= 100.0
    pub percentage: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code number (from its name, e.g. `UNAVAILABLE` = 14).
    Grpc(u32),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FaultAbort {
    pub status: AbortStatus,
    /// 0.0 ..= 100.0
    pub percentage: f64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Mirror {
    pub destination: Destination,
    /// 0.0 ..= 100.0 (100 when unset, as Istio).
    pub percentage: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CorsPolicy {
    pub allow_origins: Vec<ValueMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
}

/// One `http` route, defaults applied.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Empty: matches every request.
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    pub rewrite: Option<Rewrite>,
    /// Whole-request timeout including retries; `None` = none (Istio's default for HTTP).
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub cors: Option<CorsPolicy>,
    pub headers: HeaderOperations,
}

/// `tcp[].match[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct L4Match {
    pub port: Option<u16>,
    pub destination_subnets: Vec<IpBlock>,
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TcpRoute {
    pub matches: Vec<L4Match>,
    pub route: Vec<RouteDestination>,
}

/// `tls[].match[]`: a TLS connection passed through unterminated, by its SNI.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlsMatch {
    /// Lower case; `*.example.com` covers any name under `example.com`. Never empty.
    pub sni_hosts: Vec<String>,
    pub l4: L4Match,
}

/// One `tls` route: SNI routing of unterminated TLS. Applied by the ingress gateway's
/// PASSTHROUGH servers; the waypoint does not apply them (as Istio's waypoint).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsRoute {
    /// Never empty (a TLS route needs a match with `sniHosts`).
    pub matches: Vec<TlsMatch>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VirtualService {
    pub name: String,
    pub namespace: String,
    /// Fully qualified hostnames (short names expanded relative to `namespace`); only hosts of
    /// services that exist are routed, the rest are reported by the translation.
    pub hosts: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    pub tls: Vec<TlsRoute>,
    /// `metadata.creationTimestamp` (RFC 3339), for Istio's "oldest wins" on conflicts.
    pub created: Option<String>,
    pub origin: VirtualServiceOrigin,
}

/// Where a VirtualService's routes come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub enum VirtualServiceOrigin {
    /// A `VirtualService` object of that name.
    #[default]
    VirtualService,
    /// The Gateway API routes (`HTTPRoute namespace/name`, `GRPCRoute ...`, `TCPRoute ...`,
    /// `TLSRoute ...`) attached to the Service or listener the VirtualService is named after,
    /// merged in precedence order.
    GatewayRoutes(Vec<String>),
}

impl VirtualService {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What the routes are, for logs and conflict reports: `VirtualService ns/name` or
    /// `HTTPRoute ns/a, GRPCRoute ns/b (Service ns/name)`.
    pub fn describe(&self) -> String {
        match &self.origin {
            VirtualServiceOrigin::VirtualService => format!("VirtualService {}", self.key()),
            VirtualServiceOrigin::GatewayRoutes(routes) => {
                format!("{} (Service {})", routes.join(", "), self.key())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum HashKey {
    Header(String),
    /// `httpCookie`: when the request lacks it and `ttl` is set, the proxy generates one.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

/// `loadBalancer`; Istio's default (unset or `UNSPECIFIED`) is `LEAST_REQUEST`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum LoadBalancer {
    RoundRobin,
    LeastRequest,
    Random,
    ConsistentHash(HashKey),
}

/// `connectionPool`, Istio's defaults applied (`u32::MAX` = unlimited).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`
    pub max_connections: u32,
    /// `tcp.connectTimeout` (10 s)
    pub connect_timeout: Duration,
    /// `http.http1MaxPendingRequests`
    pub http1_max_pending_requests: u32,
    /// `http.http2MaxRequests`: concurrent requests to the destination
    pub http2_max_requests: u32,
    /// `http.maxRequestsPerConnection`; 0 = unlimited
    pub max_requests_per_connection: u32,
    /// `http.maxRetries`: concurrent retries to the destination
    pub max_retries: u32,
    /// `http.idleTimeout` (1 h)
    pub idle_timeout: Duration,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: u32::MAX,
            connect_timeout: Duration::from_secs(10),
            http1_max_pending_requests: u32::MAX,
            http2_max_requests: u32::MAX,
            max_requests_per_connection: 0,
            max_retries: u32::MAX,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// `outlierDetection`, Istio's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutlierDetection {
    /// `consecutive5xxErrors` (5; 0 disables)
    pub consecutive_5xx_errors: u32,
    /// `consecutiveGatewayErrors` (0 = disabled)
    pub consecutive_gateway_errors: u32,
    /// `interval` (10 s)
    pub interval: Duration,
    /// `baseEjectionTime` (30 s), multiplied by the number of times a host was ejected
    pub base_ejection_time: Duration,
    /// `maxEjectionPercent` (10)
    pub max_ejection_percent: u32,
}

/// A `trafficPolicy` (top level or a subset's, already merged with the top level).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    pub outlier_detection: Option<OutlierDetection>,
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        Self {
            load_balancer: LoadBalancer::LeastRequest,
            connection_pool: ConnectionPool::default(),
            outlier_detection: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Subset {
    pub name: String,
    /// Endpoints whose workload carries all of these labels.
    pub labels: Labels,
    /// Effective policy: the subset's fields override the rule's, field by field at the top
    /// level (`loadBalancer`, `connectionPool`, `outlierDetection`), as Istio merges them.
    pub traffic_policy: TrafficPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    /// Fully qualified service hostname.
    pub host: String,
    pub traffic_policy: TrafficPolicy,
    pub subsets: Vec<Subset>,
    pub created: Option<String>,
}

impl DestinationRule {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }
}

/// What an L7 AuthorizationPolicy attaches to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum L7Target {
    /// No selector and no targetRefs: every waypoint (and workload) of the namespace; in the
    /// root namespace, the whole mesh.
    Namespace(String),
    /// `targetRefs` kind `Gateway`: the waypoint of that name.
    Gateway { namespace: String, name: String },
    /// `targetRefs` kind `Service`: requests to that service through a waypoint.
    Service { namespace: String, name: String },
}

/// `rules[].from[].source` at L7. Principals without `spiffe://`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct L7Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpBlock>,
    pub not_ip_blocks: Vec<IpBlock>,
    /// `remoteIpBlocks`: the original client address (from `X-Forwarded-For` when trusted
    /// proxies are configured, else the peer address, as Envoy's `remote.ip`).
    pub remote_ip_blocks: Vec<IpBlock>,
    pub not_remote_ip_blocks: Vec<IpBlock>,
    /// `requestPrincipals` or `notRequestPrincipals` (JWT): not supported; a source using them
    /// never matches.
    pub request_principals: bool,
}

/// `rules[].to[].operation` at L7.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct L7Operation {
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum L7ConditionKey {
    /// `request.headers[<name>]`, name lower-cased.
    RequestHeader(String),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    /// A key the waypoint cannot evaluate (e.g. `request.auth.claims[...]`); the condition
    /// never matches.
    Unsupported(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct L7Condition {
    pub key: L7ConditionKey,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
}

/// Matches when any `from` matches (or none is given), any `to` matches (or none) and every
/// `when` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct L7Rule {
    pub from: Vec<L7Source>,
    pub to: Vec<L7Operation>,
    pub when: Vec<L7Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct L7AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub targets: Vec<L7Target>,
    pub action: PolicyAction,
    pub rules: Vec<L7Rule>,
}

impl L7AuthorizationPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
