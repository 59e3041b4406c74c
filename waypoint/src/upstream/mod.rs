//! The waypoint's upstream layer: from a chosen destination (service, subset, port) to a
//! response from one of its endpoints.
//!
//! [`Upstreams`] keeps one cluster per (service, subset, service port), built lazily from the
//! current [`State`] and kept in step by [`Upstreams::update`]: its endpoints, its
//! DestinationRule traffic policy, its load balancer (`lb`), its connection pools with Istio's
//! circuit breakers (`pool`) and its outlier detection (`outlier`). Connections go through a
//! [`Connector`] (HBONE to the endpoint's ztunnel in production, plain TCP in tests) and speak
//! HTTP/1.1 or HTTP/2 with hyper's client connections. Routing, retries, timeouts and faults are
//! the caller's; this layer reports errors with Envoy's response flags so the caller can decide.

mod body;
mod conn;
mod lb;
mod outlier;
mod pool;
mod resolve;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use http::header::HOST;
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use mesh::model::{LoadBalancer, RetryCondition, State, Workload};
use tokio::io::{AsyncRead, AsyncWrite};

pub use body::UpstreamBody;
pub use resolve::Side;

use self::lb::{HashOutcome, HashSource};
use self::outlier::Outcome;
use self::pool::{Cluster, Failure};
use self::resolve::Unresolved;
use crate::request::Body;

/// How many times one [`Upstreams::send`] picks again after its endpoint left the cluster or a
/// pooled connection closed before the request went out.
const MAX_QUIET_ATTEMPTS: usize = 3;

/// A cluster: requests to one service port, optionally restricted to a DestinationRule subset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ClusterKey {
    /// The service, `namespace/name` (the key of [`State::services`]).
    pub service: String,
    /// A subset of the DestinationRule for the service's hostname.
    pub subset: Option<String>,
    /// The service port (not the target port).
    pub port: u16,
}

impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)?;
        if let Some(subset) = &self.subset {
            write!(f, " subset {subset}")?;
        }
        Ok(())
    }
}

/// The protocol spoken to the endpoint; each has its own pool per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum UpstreamProtocol {
    /// HTTP/1.1: one request at a time per connection, upgrades (101) supported.
    Http1,
    /// HTTP/2 (gRPC): requests multiplexed on one connection per endpoint.
    Http2,
}

/// Where to connect: the endpoint's address (pod IP and resolved target port) and its workload
/// (for the HBONE connector: the node and the identity to expect).
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// Pod IP and the service port's target port on that pod.
    pub addr: SocketAddr,
    /// The pod behind the endpoint, when the state knows it.
    pub workload: Option<Arc<Workload>>,
    /// Set when the endpoint is the service's waypoint (an ingress gateway's cluster with
    /// `istio.io/ingress-use-waypoint`): `addr` is the waypoint pod's HBONE port, `workload` the
    /// waypoint's, and this is the tunnel's `:authority` (the service's VIP:port).
    pub authority: Option<SocketAddr>,
}

/// A byte stream to an endpoint.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Opens streams to endpoints. Production: HBONE to the endpoint's ztunnel; tests: plain TCP.
/// [`Upstreams`] bounds each call by the cluster's `connectTimeout`.
pub trait Connector: Send + Sync + 'static {
    /// A stream to `target`; errors are reported as connect failures (UF).
    fn connect(&self, target: &UpstreamTarget) -> BoxFuture<'static, io::Result<Box<dyn Io>>>;

    /// Whether streams to `target` are tunnels (HBONE) rather than direct TCP connections.
    /// For circuit breaking a tunnel is what Istio's waypoint makes of it: its clusters connect
    /// to Envoy's internal listener `connect_originate`, a local hand-off that is connected at
    /// once and opens the tunnel behind it, so a request whose connection is a tunnel stops
    /// being pending as soon as the connection is made for it. Over a direct connection it
    /// stays pending until connected, as in Envoy. Default: direct.
    fn tunnelled(&self, _target: &UpstreamTarget) -> bool {
        false
    }
}

/// What a consistent-hash load balancer reads (`useSourceIp`, `httpHeaderName`, `httpCookie`,
/// `httpQueryParameterName`). Pass the headers as they will be sent; `query: None` falls back to
/// the request URI's query.
#[derive(Debug, Clone, Copy)]
pub struct HashInput<'a> {
    /// The original client's address.
    pub source_ip: Option<IpAddr>,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    /// Endpoints earlier attempts of this request already tried: a retry goes elsewhere when
    /// another endpoint is available (Istio's retries use Envoy's `previous_hosts` predicate).
    pub previous_hosts: &'a [SocketAddr],
}

/// An endpoint's response.
#[derive(Debug)]
pub struct UpstreamResponse {
    /// The response; its body holds the connection (and the request's circuit-breaker counts)
    /// until it ends or is dropped. For a `101 Switching Protocols` over HTTP/1,
    /// `hyper::upgrade::on(&mut response)` yields the upgraded stream; that connection has left
    /// the pool and is never reused.
    pub response: http::Response<UpstreamBody>,
    /// The endpoint that answered.
    pub endpoint: SocketAddr,
    /// Its workload (for metrics and access logs).
    pub workload: Option<Arc<Workload>>,
    /// A `Set-Cookie` to add to the response: consistent hashing on a cookie with a `ttl`
    /// generated one because the request had none.
    pub set_cookie: Option<HeaderValue>,
}

/// Why [`Upstreams::send`] got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The service, its port, or the DestinationRule subset does not exist. (Field names are
    /// self-explanatory: the cluster asked for and why it cannot serve.)
    #[error("no cluster for {cluster}: {reason}")]
    NoCluster { cluster: ClusterKey, reason: String },
    /// No ready endpoint, or every endpoint is ejected by outlier detection.
    #[error("no healthy upstream for {cluster}: {reason}")]
    NoHealthyUpstream { cluster: ClusterKey, reason: String },
    /// A circuit breaker is open: `what` is `"pending"` (http1MaxPendingRequests) or
    /// `"requests"` (http2MaxRequests). (`maxConnections` makes requests wait as pending; it
    /// does not fail them by itself.)
    #[error(
        "upstream overflow for {cluster}: too many {what} (DestinationRule trafficPolicy.connectionPool)"
    )]
    Overflow {
        cluster: ClusterKey,
        what: &'static str,
    },
    #[error("connect to {endpoint} failed: {error}")]
    ConnectFailure {
        endpoint: SocketAddr,
        #[source]
        error: Arc<io::Error>,
    },
    #[error(
        "connect to {endpoint} timed out after {timeout:?} (DestinationRule connectionPool.tcp.connectTimeout): is the endpoint, or its node's ztunnel on 15008, reachable?"
    )]
    ConnectTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    /// The connection or the stream failed before a response arrived.
    #[error("upstream {endpoint} reset the request: {error}")]
    Reset {
        endpoint: SocketAddr,
        #[source]
        error: hyper::Error,
    },
    /// HTTP/2 REFUSED_STREAM: the endpoint did not process the request (safe to retry).
    #[error("upstream {endpoint} refused the stream")]
    RefusedStream {
        endpoint: SocketAddr,
        #[source]
        error: hyper::Error,
    },
}

impl UpstreamError {
    /// Envoy's response flag for the access log: NC, UH, UO, UF, UC (connection terminated) or
    /// UR (stream reset).
    pub fn response_flag(&self) -> &'static str {
        match self {
            UpstreamError::NoCluster { .. } => "NC",
            UpstreamError::NoHealthyUpstream { .. } => "UH",
            UpstreamError::Overflow { .. } => "UO",
            UpstreamError::ConnectFailure { .. } | UpstreamError::ConnectTimeout { .. } => "UF",
            UpstreamError::Reset { error, .. } => {
                if error.is_incomplete_message() || error.is_closed() {
                    "UC"
                } else {
                    "UR"
                }
            }
            UpstreamError::RefusedStream { .. } => "UR",
        }
    }

    /// The endpoint involved, when one was chosen.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            UpstreamError::ConnectFailure { endpoint, .. }
            | UpstreamError::ConnectTimeout { endpoint, .. }
            | UpstreamError::Reset { endpoint, .. }
            | UpstreamError::RefusedStream { endpoint, .. } => Some(*endpoint),
            _ => None,
        }
    }

    /// The `retryOn` condition this error satisfies, if any.
    pub fn retry_condition(&self) -> Option<RetryCondition> {
        match self {
            UpstreamError::ConnectFailure { .. } | UpstreamError::ConnectTimeout { .. } => {
                Some(RetryCondition::ConnectFailure)
            }
            UpstreamError::Reset { .. } => Some(RetryCondition::Reset),
            UpstreamError::RefusedStream { .. } => Some(RetryCondition::RefusedStream),
            _ => None,
        }
    }

    /// The HTTP status the waypoint answers with: 503 for everything here (Envoy's choice for
    /// NC, UH, UO, UF, UC and UR alike).
    pub fn status(&self) -> http::StatusCode {
        http::StatusCode::SERVICE_UNAVAILABLE
    }
}

/// One in-flight retry counted against the cluster's `maxRetries`; given back on drop.
#[derive(Debug)]
pub struct RetryPermit {
    cluster: Arc<Cluster>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.cluster.end_retry();
    }
}

/// The upstream clusters of a waypoint. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Arc<dyn Connector>,
    side: Side,
    state: RwLock<Arc<State>>,
    clusters: RwLock<HashMap<ClusterKey, Arc<Cluster>>>,
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstreams")
            .field("clusters", &read(&self.inner.clusters).len())
            .finish_non_exhaustive()
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Upstreams {
    /// A waypoint's upstreams, no clusters yet; [`Self::update`] gives the state they are built
    /// from.
    pub fn new(connector: Arc<dyn Connector>) -> Self {
        Self::for_side(connector, Side::Waypoint)
    }

    /// Upstreams resolved for `side` (an ingress gateway sends a service's traffic to its
    /// waypoint when the service asks for it).
    pub fn for_side(connector: Arc<dyn Connector>, side: Side) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                side,
                state: RwLock::new(Arc::new(State::default())),
                clusters: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// Applies a new state: endpoints, subsets and policies change; endpoints that remain keep
    /// their pools, counters and outlier state. Endpoints that left close their idle
    /// connections (busy ones finish first); clusters of services that are gone are forgotten.
    pub fn update(&self, state: &State) {
        let state = Arc::new(state.clone());
        *write(&self.inner.state) = state.clone();
        let mut gone_endpoints = Vec::new();
        {
            let mut clusters = write(&self.inner.clusters);
            clusters.retain(
                |key, cluster| match resolve::resolve(&state, key, self.inner.side) {
                    Ok(spec) => {
                        gone_endpoints.extend(cluster.apply(Ok(spec)));
                        true
                    }
                    Err(Unresolved::Invalid(reason)) => {
                        gone_endpoints.extend(cluster.apply(Err(reason)));
                        true
                    }
                    Err(Unresolved::NoService(reason)) => {
                        gone_endpoints.extend(cluster.apply(Err(reason)));
                        false
                    }
                },
            );
        }
        drop(gone_endpoints);
    }

    fn cluster(&self, key: &ClusterKey) -> Arc<Cluster> {
        if let Some(cluster) = read(&self.inner.clusters).get(key) {
            return cluster.clone();
        }
        // The clusters lock before the state: an update that lands meanwhile walks this
        // cluster too.
        let mut clusters = write(&self.inner.clusters);
        if let Some(cluster) = clusters.get(key) {
            return cluster.clone();
        }
        let state = read(&self.inner.state).clone();
        let spec =
            resolve::resolve(&state, key, self.inner.side).map_err(|unresolved| match unresolved {
                Unresolved::NoService(reason) | Unresolved::Invalid(reason) => reason,
            });
        let cluster = Cluster::new(key.clone(), spec);
        clusters.insert(key.clone(), cluster.clone());
        cluster
    }

    /// Sends `request` to an endpoint of the cluster chosen by its load balancer, over a pooled
    /// connection of `protocol`, within its circuit breakers. The request URI may be in origin
    /// or absolute form: it is adapted to the protocol (HTTP/1: origin form plus `Host`; HTTP/2:
    /// scheme and authority, from `Host` or else the endpoint). Each outcome feeds the
    /// cluster's outlier detection (response status, or a local failure).
    pub async fn send(
        &self,
        key: &ClusterKey,
        protocol: UpstreamProtocol,
        mut request: http::Request<Body>,
        hash_input: &HashInput<'_>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let cluster = self.cluster(key);
        let hash = hash_outcome(&cluster, hash_input, request.uri().query());
        let set_cookie = match &hash {
            Some(HashOutcome::Generated { set_cookie, .. }) => {
                HeaderValue::from_str(set_cookie).ok()
            }
            _ => None,
        };
        let upgrade_possible = protocol == UpstreamProtocol::Http1;
        let is_connect = request.method() == Method::CONNECT;
        let is_grpc = is_grpc(request.headers());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let picked = cluster
                .pick(hash.as_ref(), hash_input.previous_hosts)
                .map_err(|failure| to_error(key, None, failure))?;
            let lease = match cluster
                .acquire(&picked, protocol, &*self.inner.connector)
                .await
            {
                Ok(lease) => lease,
                Err(Failure::Gone) if attempt < MAX_QUIET_ATTEMPTS => continue,
                Err(failure) => return Err(to_error(key, Some(picked.addr), failure)),
            };
            prepare(
                &mut request,
                protocol,
                picked.authority.unwrap_or(picked.addr),
            );
            let (addr, generation, workload) =
                (picked.addr, picked.generation, picked.workload.clone());
            let (result, mut completion) = lease.send(request, picked.guard).await;
            match result {
                Ok(response) => {
                    let status = response.status();
                    let observed = is_grpc
                        .then(|| grpc_status_as_http(response.headers()))
                        .flatten()
                        .unwrap_or(status.as_u16());
                    cluster.record(addr, generation, Outcome::Status(observed));
                    if upgrade_possible
                        && (status == http::StatusCode::SWITCHING_PROTOCOLS
                            || (is_connect && status.is_success()))
                    {
                        completion.detach();
                    }
                    let response = response.map(|body| UpstreamBody::new(body, completion));
                    return Ok(UpstreamResponse {
                        response,
                        endpoint: addr,
                        workload,
                        set_cookie,
                    });
                }
                Err(failure) => {
                    drop(completion);
                    match failure.request {
                        // A pooled connection closed under us before the request went out.
                        Some(unsent) if attempt < MAX_QUIET_ATTEMPTS => {
                            request = unsent;
                            continue;
                        }
                        _ => {
                            cluster.record(addr, generation, Outcome::LocalFailure);
                            return Err(reset_error(addr, failure.error));
                        }
                    }
                }
            }
        }
    }

    /// Opens a TCP stream (a VirtualService `tcp` route) to an endpoint of the cluster chosen by
    /// its load balancer. `maxConnections` caps the cluster's connections (over it: UO, no
    /// queue), `connectTimeout` bounds the connect, and the connect's outcome feeds outlier
    /// detection (a success counts as Envoy's connect-success-final).
    pub async fn connect_tcp(
        &self,
        key: &ClusterKey,
        hash: &HashInput<'_>,
    ) -> Result<TcpUpstream, UpstreamError> {
        let cluster = self.cluster(key);
        let hash = hash_outcome(&cluster, hash, None);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let picked = cluster
                .pick(hash.as_ref(), &[])
                .map_err(|failure| to_error(key, None, failure))?;
            let (slot, timeout) = match cluster.tcp_slot(&picked) {
                Ok(granted) => granted,
                Err(Failure::Gone) if attempt < MAX_QUIET_ATTEMPTS => continue,
                Err(failure) => return Err(to_error(key, Some(picked.addr), failure)),
            };
            let target = UpstreamTarget {
                addr: picked.addr,
                workload: picked.workload.clone(),
                authority: picked.authority,
            };
            let connected =
                tokio::time::timeout(timeout, self.inner.connector.connect(&target)).await;
            let failure = match connected {
                Ok(Ok(io)) => {
                    cluster.record(picked.addr, picked.generation, Outcome::Status(200));
                    return Ok(TcpUpstream {
                        io,
                        endpoint: picked.addr,
                        workload: picked.workload.clone(),
                        _slot: slot,
                        _outstanding: picked.guard,
                    });
                }
                Ok(Err(error)) => Failure::ConnectError(Arc::new(error)),
                Err(_) => Failure::ConnectTimeout(timeout),
            };
            cluster.record(picked.addr, picked.generation, Outcome::LocalFailure);
            return Err(to_error(key, Some(picked.addr), failure));
        }
    }

    /// A permit for one retry under the cluster's `maxRetries` (concurrent retries); hold it
    /// while the retry is in flight. `None`: the retry budget is spent (Envoy's
    /// `upstream_rq_retry_overflow`), the caller answers with the last response (or 503 UO).
    pub fn try_retry_permit(&self, key: &ClusterKey) -> Option<RetryPermit> {
        let cluster = self.cluster(key);
        cluster.try_retry().then_some(RetryPermit { cluster })
    }

    /// For the admin view: every cluster with its counters and endpoints.
    pub fn snapshot(&self) -> UpstreamsSnapshot {
        let clusters: Vec<Arc<Cluster>> = read(&self.inner.clusters).values().cloned().collect();
        let mut clusters: Vec<ClusterSnapshot> = clusters.iter().map(|c| c.snapshot()).collect();
        clusters
            .sort_by(|a, b| (&a.service, a.port, &a.subset).cmp(&(&b.service, b.port, &b.subset)));
        UpstreamsSnapshot { clusters }
    }
}

/// A TCP stream to an endpoint, counted against the cluster's `maxConnections` (and as the
/// endpoint's active request for LEAST_REQUEST) until dropped.
pub struct TcpUpstream {
    io: Box<dyn Io>,
    endpoint: SocketAddr,
    workload: Option<Arc<Workload>>,
    _slot: pool::SlotGuard,
    _outstanding: pool::OutstandingGuard,
}

impl TcpUpstream {
    /// The endpoint connected to.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// Its workload, when known.
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        self.workload.as_ref()
    }
}

impl fmt::Debug for TcpUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpUpstream")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for TcpUpstream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TcpUpstream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Every cluster, for `/config_dump`-style views.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamsSnapshot {
    /// Sorted by service, port and subset.
    pub clusters: Vec<ClusterSnapshot>,
}

/// One cluster's counters and endpoints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterSnapshot {
    /// `namespace/name`.
    pub service: String,
    pub subset: Option<String>,
    /// The service port.
    pub port: u16,
    pub hostname: String,
    /// `namespace/name` of the DestinationRule that applies.
    pub destination_rule: Option<String>,
    /// The service's waypoint, when this ingress cluster sends its traffic there
    /// (`istio.io/ingress-use-waypoint`); the endpoints are then the waypoint's pods.
    pub via_waypoint: Option<String>,
    /// Why the cluster cannot serve (unknown port or subset).
    pub error: Option<String>,
    /// The load balancer in force.
    pub load_balancer: LoadBalancer,
    /// Open connections (all endpoints and protocols, upgraded ones included).
    pub connections: u32,
    /// Requests waiting for a connection.
    pub pending: u32,
    /// Requests on a connection, until their response body ends.
    pub active_requests: u32,
    /// Retry permits held.
    pub active_retries: u32,
    pub overflow: OverflowCounts,
    pub endpoints: Vec<EndpointSnapshot>,
}

/// How often each circuit breaker tripped (Envoy's `upstream_cx_overflow`,
/// `upstream_rq_pending_overflow`, `upstream_rq_retry_overflow`,
/// `outlier_detection.ejections_overflow`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OverflowCounts {
    /// Requests that had to wait because `maxConnections` was reached.
    pub connections: u64,
    /// Requests refused because `http1MaxPendingRequests` was reached.
    pub pending: u64,
    /// Requests refused because `http2MaxRequests` was reached.
    pub requests: u64,
    /// Retries refused because `maxRetries` was reached.
    pub retries: u64,
    /// Ejections skipped because of `maxEjectionPercent`.
    pub ejections: u64,
}

/// One endpoint of a cluster: outlier state and pools.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointSnapshot {
    pub address: SocketAddr,
    /// The workload's uid (`namespace/pod`).
    pub workload: Option<String>,
    /// Ejected by outlier detection (skipped by load balancing).
    pub ejected: bool,
    /// Time left in the current ejection.
    pub ejection_left_ms: Option<u64>,
    /// Ejections since the endpoint joined the cluster.
    pub ejections: u64,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    /// Requests picked for this endpoint and not finished.
    pub outstanding_requests: u32,
    pub http1: PoolSnapshot,
    pub http2: PoolSnapshot,
}

/// One endpoint's connections of one protocol.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolSnapshot {
    /// Connections of the pool (idle, busy or draining); upgraded ones have left it.
    pub open: u32,
    /// Connect attempts in progress.
    pub connecting: u32,
    /// HTTP/1 idle connections, or HTTP/2 connections without streams.
    pub idle: u32,
    /// HTTP/2 streams in flight.
    pub active_streams: u32,
    /// Pending requests queued on this pool.
    pub waiting: u32,
}

/// The consistent-hash outcome for a request, when the cluster hashes; `uri_query` stands in
/// for a missing [`HashInput::query`].
fn hash_outcome(
    cluster: &Cluster,
    input: &HashInput<'_>,
    uri_query: Option<&str>,
) -> Option<HashOutcome> {
    let key = match &cluster.lock().policy.load_balancer {
        LoadBalancer::ConsistentHash(key) => key.clone(),
        _ => return None,
    };
    let source = HashSource {
        source_ip: input.source_ip,
        headers: input.headers,
        query: input.query.or(uri_query),
    };
    Some(lb::hash_request(&key, &source, || {
        format!("{:016x}", fastrand::u64(..))
    }))
}

/// Adapts the request line to the protocol.
fn prepare(request: &mut http::Request<Body>, protocol: UpstreamProtocol, endpoint: SocketAddr) {
    if request.method() == Method::CONNECT {
        return;
    }
    match protocol {
        UpstreamProtocol::Http1 => {
            if request.version() != Version::HTTP_10 {
                *request.version_mut() = Version::HTTP_11;
            }
            let Some(authority) = request.uri().authority().cloned() else {
                return;
            };
            if !request.headers().contains_key(HOST)
                && let Ok(host) = HeaderValue::from_str(authority.as_str())
            {
                request.headers_mut().insert(HOST, host);
            }
            let origin = request
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .parse::<Uri>();
            if let Ok(origin) = origin {
                *request.uri_mut() = origin;
            }
        }
        UpstreamProtocol::Http2 => {
            *request.version_mut() = Version::HTTP_2;
            // HTTP/2 carries the host as `:authority` (Envoy treats `Host` and `:authority` as
            // one): a `Host` header, possibly rewritten by the route, becomes the authority.
            let host = request.headers_mut().remove(HOST);
            let host = host.as_ref().and_then(|h| h.to_str().ok());
            let uri = request.uri();
            if host.is_none() && uri.scheme().is_some() && uri.authority().is_some() {
                return;
            }
            let authority = match (host, uri.authority()) {
                (Some(host), _) => host.to_owned(),
                (None, Some(authority)) => authority.as_str().to_owned(),
                (None, None) => endpoint.to_string(),
            };
            let rebuilt = Uri::builder()
                .scheme(uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP))
                .authority(authority)
                .path_and_query(uri.path_and_query().map_or("/", |pq| pq.as_str()))
                .build();
            if let Ok(rebuilt) = rebuilt {
                *request.uri_mut() = rebuilt;
            }
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Envoy's router feeds outlier detection the `grpc-status` of a gRPC response's *headers*
/// (a trailers-only response) as an HTTP status (`Grpc::Utility::grpcToHttpStatus`); a status
/// in the trailers is not counted.
fn grpc_status_as_http(headers: &HeaderMap) -> Option<u16> {
    let code: u64 = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        // 2 unknown, 13 internal, 15 data loss, and codes gRPC does not define.
        _ => 500,
    })
}

fn to_error(key: &ClusterKey, endpoint: Option<SocketAddr>, failure: Failure) -> UpstreamError {
    let cluster = key.clone();
    let unknown = || SocketAddr::from(([0, 0, 0, 0], 0));
    match failure {
        Failure::NoCluster(reason) => UpstreamError::NoCluster { cluster, reason },
        Failure::NoHealthy(reason) => UpstreamError::NoHealthyUpstream { cluster, reason },
        Failure::Overflow(what) => UpstreamError::Overflow { cluster, what },
        Failure::Gone => UpstreamError::NoHealthyUpstream {
            cluster,
            reason: format!(
                "endpoint {} left the cluster while the request waited",
                endpoint.unwrap_or_else(unknown)
            ),
        },
        Failure::ConnectTimeout(timeout) => UpstreamError::ConnectTimeout {
            endpoint: endpoint.unwrap_or_else(unknown),
            timeout,
        },
        Failure::ConnectError(error) => UpstreamError::ConnectFailure {
            endpoint: endpoint.unwrap_or_else(unknown),
            error,
        },
    }
}

fn reset_error(endpoint: SocketAddr, error: hyper::Error) -> UpstreamError {
    if is_refused_stream(&error) {
        UpstreamError::RefusedStream { endpoint, error }
    } else {
        UpstreamError::Reset { endpoint, error }
    }
}

/// hyper does not expose h2's reason codes; the h2 error in the source chain prints its reason
/// (`REFUSED_STREAM`) in its `Debug` form.
fn is_refused_stream(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(err) = source {
        if format!("{err:?}").contains("REFUSED_STREAM") {
            return true;
        }
        source = err.source();
    }
    false
}
