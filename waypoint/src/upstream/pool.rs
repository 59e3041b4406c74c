//! A cluster's runtime state: its endpoints with their connection pools and outlier state, the
//! circuit-breaker counters and the pending queues, behind one mutex that is never held across
//! an `.await`.
//!
//! Every count has an RAII guard (pending, active request, connection, HTTP/2 stream,
//! outstanding pick, HTTP/1 checkout) that gives the count back on drop, so an early return or a
//! dropped future cannot leak a permit. Guards lock the cluster when dropped; code that already
//! holds the lock gives guards back with `release_locked` instead, and never drops one.
//!
//! Circuit breaking follows Envoy's connection pool (verified against Envoy's circuit breaking
//! overview and Istio's `ConnectionPoolSettings`):
//! - `http2MaxRequests` caps requests attached to a connection across the cluster (checked on
//!   arrival and again when a waiting request gets its connection); over it: overflow (UO).
//! - A request that finds no ready connection is *pending* until it is handed one (a free
//!   HTTP/1 connection, an HTTP/2 stream, or a connection made for it);
//!   `http1MaxPendingRequests` caps pending requests per cluster and one over the cap fails at
//!   once (UO). It stops being pending when it is handed its connection, under the lock, not
//!   when its task next runs. While a connection is being made for it, it is still pending for
//!   a direct TCP connection (Envoy's `Connected` event), but not for an HBONE one
//!   ([`super::Connector::tunnelled`]): Istio's waypoint connects its clusters to Envoy's
//!   internal listener `connect_originate`, which is connected at once and makes the tunnel
//!   behind it, so the CONNECT round trip is part of the request, not of its wait.
//! - `maxConnections` caps open connections (connecting, idle, busy, draining and upgraded ones
//!   all count). As Envoy, an endpoint pool with no connection at all may always open one, so the
//!   count can exceed the cap by at most one per endpoint and protocol. Over the cap a request
//!   waits as pending (Envoy's `upstream_cx_overflow`), it does not fail. A connection the pool
//!   retires (`maxRequestsPerConnection` reached, a response not read to its end, a draining
//!   HTTP/2 connection without streams) gives its slot back as the retiring request ends, as
//!   Envoy closes it there, not when its socket is finally dropped.
//! - Pending requests wait per endpoint pool, first come first served: a freed HTTP/1
//!   connection or HTTP/2 stream goes to the oldest waiter of that pool, a freed connection slot
//!   to the oldest waiter of the cluster.
//! - HTTP/2: one connection multiplexes up to the server's `SETTINGS_MAX_CONCURRENT_STREAMS`;
//!   a second is opened only when the first is full (one connect at a time per pool).
//! - `maxRequestsPerConnection` (0 = unlimited) closes an HTTP/1 connection after that many
//!   requests and stops new streams on an HTTP/2 one (closed once its streams end).
//! - `idleTimeout` closes a connection without requests for that long (0 disables it).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use mesh::model::{LoadBalancer, TrafficPolicy, Workload};
use tokio::sync::oneshot;

use super::lb::{self, HashOutcome, Ring};
use super::outlier::{self, Outcome, OutlierState};
use super::resolve::ClusterSpec;
use super::{
    ClusterKey, ClusterSnapshot, EndpointSnapshot, OverflowCounts, PoolSnapshot, UpstreamProtocol,
};
use crate::request::Body;

/// hyper's (and h2's) stream limit for a connection until the server's SETTINGS say otherwise.
pub(super) const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Locks a mutex, ignoring poisoning: the state stays consistent between statements.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a request could not get an endpoint or a connection.
#[derive(Debug, Clone)]
pub(super) enum Failure {
    NoCluster(String),
    NoHealthy(String),
    Overflow(&'static str),
    /// The endpoint left the cluster (an update) while the request waited.
    Gone,
    ConnectTimeout(Duration),
    ConnectError(Arc<io::Error>),
}

/// One cluster: (service, subset, port).
pub(super) struct Cluster {
    pub(super) key: ClusterKey,
    state: Mutex<ClusterState>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("key", &self.key).finish()
    }
}

impl Cluster {
    pub(super) fn new(key: ClusterKey, spec: Result<ClusterSpec, String>) -> Arc<Self> {
        let cluster = Arc::new(Self {
            key,
            state: Mutex::new(ClusterState::default()),
        });
        // Nothing to drop: the cluster had no endpoints yet.
        let _ = cluster.apply(spec);
        cluster
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, ClusterState> {
        lock(&self.state)
    }

    /// Applies a new resolution; returns the endpoints that left, for the caller to drop
    /// outside the lock (their idle connections close, their waiters fail over).
    #[must_use]
    pub(super) fn apply(&self, spec: Result<ClusterSpec, String>) -> Vec<EndpointState> {
        self.lock().apply(spec)
    }

    /// Load balancing: one available endpoint, counted as outstanding until the guard drops.
    /// Picks an endpoint; one of `avoid` only when no other is available.
    pub(super) fn pick(
        self: &Arc<Self>,
        hash: Option<&HashOutcome>,
        avoid: &[SocketAddr],
    ) -> Result<Picked, Failure> {
        let mut st = self.lock();
        let now = Instant::now();
        let index = match st.pick(hash, now, avoid) {
            Ok(index) => index,
            Err(_) if !avoid.is_empty() => st.pick(hash, now, &[])?,
            Err(e) => return Err(e),
        };
        let authority = st.via_waypoint.as_ref().map(|via| via.authority);
        let endpoint = &mut st.endpoints[index];
        endpoint.outstanding += 1;
        Ok(Picked {
            addr: endpoint.addr,
            generation: endpoint.generation,
            workload: endpoint.workload.clone(),
            authority,
            guard: OutstandingGuard {
                cluster: Some(self.clone()),
                addr: endpoint.addr,
                generation: endpoint.generation,
            },
        })
    }

    /// A connection (or HTTP/2 stream) to the picked endpoint, waiting as a pending request or
    /// connecting as the limits allow.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        picked: &Picked,
        protocol: UpstreamProtocol,
        connector: &dyn super::Connector,
    ) -> Result<Lease, Failure> {
        let target = super::UpstreamTarget {
            addr: picked.addr,
            workload: picked.workload.clone(),
            authority: picked.authority,
        };
        let tunnelled = connector.tunnelled(&target);
        loop {
            let step = self.lock().try_acquire(
                self,
                picked.addr,
                picked.generation,
                protocol,
                tunnelled,
            )?;
            let (grant, pending) = match step {
                Step::Grant(grant, pending) => (grant, pending),
                Step::Wait(rx, pending) => match rx.await {
                    Ok(grant) => (grant, Some(pending)),
                    // The endpoint's pool was dropped by an update.
                    Err(_) => return Err(Failure::Gone),
                },
            };
            match grant {
                Grant::Lease(mut lease) => {
                    drop(pending);
                    if lease.ready().await {
                        return Ok(lease);
                    }
                    // A pooled connection that died while idle: try again.
                }
                Grant::Connect { slot, timeout } => {
                    let result = super::conn::establish(
                        self,
                        connector,
                        target.clone(),
                        protocol,
                        slot,
                        timeout,
                    )
                    .await;
                    drop(pending);
                    return result;
                }
                Grant::Fail(failure) => return Err(failure),
            }
        }
    }

    /// A connection slot for a TCP route to the picked endpoint: `maxConnections` applies
    /// without a pending queue (over it: overflow), and the connection belongs to no pool.
    pub(super) fn tcp_slot(
        self: &Arc<Self>,
        picked: &Picked,
    ) -> Result<(SlotGuard, Duration), Failure> {
        let mut st = self.lock();
        st.position(picked.addr, picked.generation)
            .ok_or(Failure::Gone)?;
        if st.connections >= st.policy.connection_pool.max_connections {
            st.overflow.connections += 1;
            return Err(Failure::Overflow("connections"));
        }
        st.connections += 1;
        let id = st.next_id();
        let shared = Arc::new(ConnShared {
            id,
            addr: picked.addr,
            generation: picked.generation,
            protocol: UpstreamProtocol::Http1,
            // Never in a pool: closing it only gives the slot back.
            life: AtomicU8::new(DETACHED),
            counted: AtomicBool::new(true),
            idle: Mutex::new(None),
            epoch: AtomicU64::new(0),
            waker: Mutex::new(None),
            max_streams: AtomicUsize::new(0),
        });
        let slot = SlotGuard {
            cluster: Some(self.clone()),
            shared,
        };
        Ok((slot, st.policy.connection_pool.connect_timeout))
    }

    /// Outlier detection: counts the outcome of a request to the endpoint.
    pub(super) fn record(&self, addr: SocketAddr, generation: u64, outcome: Outcome) {
        let mut st = self.lock();
        if let Some(index) = st.position(addr, generation) {
            st.record(index, outcome, Instant::now());
        }
    }

    /// A new connection is ready: hands it to the requester that made it (and, for HTTP/2,
    /// spare streams to waiters).
    pub(super) fn register_http1(
        self: &Arc<Self>,
        shared: &Arc<ConnShared>,
        sender: http1::SendRequest<Body>,
    ) -> Result<Lease, Failure> {
        self.lock().register_http1(self, shared, sender)
    }

    pub(super) fn register_http2(
        self: &Arc<Self>,
        shared: &Arc<ConnShared>,
        sender: http2::SendRequest<Body>,
    ) -> Result<Lease, Failure> {
        self.lock().register_http2(self, shared, sender)
    }

    /// A connect attempt failed: counts it for outlier detection and fails the pool's waiters
    /// when nothing else can serve them. Returns `failure` for the requester.
    pub(super) fn connect_failed(&self, shared: &ConnShared, failure: Failure) -> Failure {
        self.lock().connect_failed(shared, &failure);
        failure
    }

    /// The connection driver's idle timer fired for `epoch`: `true` if the connection was
    /// still idle and is now out of the pool (the driver then closes it).
    pub(super) fn expire_idle(&self, shared: &ConnShared, epoch: u64) -> bool {
        self.lock().expire_idle(shared, epoch)
    }

    /// The server changed an HTTP/2 connection's stream limit.
    pub(super) fn http2_settings(self: &Arc<Self>, shared: &ConnShared, max_streams: usize) {
        let mut st = self.lock();
        let Some(index) = st.position(shared.addr, shared.generation) else {
            return;
        };
        let pool = &mut st.endpoints[index].pools[HTTP2];
        if let Some(conn) = pool.conns.iter_mut().find(|c| c.shared.id == shared.id) {
            conn.max_streams = max_streams;
            st.dispatch_pool(self, index, UpstreamProtocol::Http2);
        }
    }

    /// A retry permit under `maxRetries`.
    pub(super) fn try_retry(&self) -> bool {
        let mut st = self.lock();
        if st.retries < st.policy.connection_pool.max_retries {
            st.retries += 1;
            true
        } else {
            st.overflow.retries += 1;
            false
        }
    }

    pub(super) fn end_retry(&self) {
        let mut st = self.lock();
        st.retries = st.retries.saturating_sub(1);
    }

    pub(super) fn snapshot(&self) -> ClusterSnapshot {
        self.lock().snapshot(&self.key, Instant::now())
    }
}

const HTTP1: usize = 0;
const HTTP2: usize = 1;

fn pool_index(protocol: UpstreamProtocol) -> usize {
    match protocol {
        UpstreamProtocol::Http1 => HTTP1,
        UpstreamProtocol::Http2 => HTTP2,
    }
}

/// Counters and endpoints of a cluster.
#[derive(Default)]
pub(super) struct ClusterState {
    /// Why the cluster cannot be used (unknown service, port or subset).
    error: Option<String>,
    hostname: String,
    destination_rule: Option<String>,
    via_waypoint: Option<super::resolve::ViaWaypoint>,
    pub(super) policy: TrafficPolicy,
    endpoints: Vec<EndpointState>,
    index: HashMap<SocketAddr, usize>,
    ring: Option<Ring>,
    round_robin: usize,
    connections: u32,
    pending: u32,
    active: u32,
    retries: u32,
    overflow: OverflowCounts,
    next_id: u64,
}

/// One endpoint of a cluster, kept across updates while its address stays.
pub(super) struct EndpointState {
    /// Tells this endpoint apart from an earlier one at the same address.
    generation: u64,
    addr: SocketAddr,
    workload: Option<Arc<Workload>>,
    /// Picked and not finished (LEAST_REQUEST reads this).
    outstanding: u32,
    outlier: OutlierState,
    pools: [Pool; 2],
}

/// One endpoint's connections of one protocol.
#[derive(Default)]
struct Pool {
    /// Connections of this pool still alive (idle, busy or draining; not upgraded ones).
    open: u32,
    connecting: u32,
    waiters: VecDeque<Waiter>,
    /// HTTP/1: idle connections, most recently used last.
    idle: Vec<IdleHttp1>,
    /// HTTP/2: connections that may take streams (draining ones leave this list).
    conns: Vec<Http2Conn>,
}

struct Waiter {
    seq: u64,
    tx: oneshot::Sender<Grant>,
    /// The waiting request's pending count, shared with its [`PendingGuard`].
    pending: Arc<AtomicBool>,
    /// Whether its connections are tunnels (see [`pending_ends`]).
    tunnelled: bool,
}

/// An HTTP/1 connection between requests.
pub(super) struct IdleHttp1 {
    sender: http1::SendRequest<Body>,
    shared: Arc<ConnShared>,
    served: u32,
}

struct Http2Conn {
    sender: http2::SendRequest<Body>,
    shared: Arc<ConnShared>,
    active: u32,
    max_streams: usize,
    served: u32,
    draining: bool,
}

impl Http2Conn {
    fn usable(&self) -> bool {
        !self.draining && !self.sender.is_closed() && (self.active as usize) < self.max_streams
    }
}

/// Life of a connection, as its guards and pool see it.
const CONNECTING: u8 = 0;
const OPEN: u8 = 1;
/// Upgraded (101): no longer the pool's, still counted against `maxConnections`.
const DETACHED: u8 = 2;
const CLOSED: u8 = 3;

/// What a connection's pool entry, guard and driver task share.
pub(super) struct ConnShared {
    id: u64,
    addr: SocketAddr,
    generation: u64,
    protocol: UpstreamProtocol,
    life: AtomicU8,
    /// Counted against `maxConnections`; cleared once when the slot is given back (when the
    /// pool retires the connection, or when its socket is dropped, whichever comes first).
    counted: AtomicBool,
    /// (deadline, epoch) while idle with an idle timeout.
    idle: Mutex<Option<(Instant, u64)>>,
    epoch: AtomicU64,
    waker: Mutex<Option<Waker>>,
    /// HTTP/2: the server's SETTINGS_MAX_CONCURRENT_STREAMS as last seen on the wire.
    pub(super) max_streams: AtomicUsize,
}

impl ConnShared {
    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[cfg(test)]
    pub(super) fn for_test() -> Arc<Self> {
        Arc::new(Self {
            id: 0,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            generation: 0,
            protocol: UpstreamProtocol::Http2,
            life: AtomicU8::new(CONNECTING),
            counted: AtomicBool::new(true),
            idle: Mutex::new(None),
            epoch: AtomicU64::new(0),
            waker: Mutex::new(None),
            max_streams: AtomicUsize::new(INITIAL_MAX_SEND_STREAMS),
        })
    }

    fn life(&self) -> u8 {
        self.life.load(Ordering::Acquire)
    }

    fn set_idle(&self, timeout: Duration) {
        let next = (!timeout.is_zero()).then(|| {
            (
                Instant::now() + timeout,
                self.epoch.fetch_add(1, Ordering::Relaxed),
            )
        });
        *lock(&self.idle) = next;
        self.wake();
    }

    fn set_busy(&self) {
        *lock(&self.idle) = None;
    }

    pub(super) fn idle(&self) -> Option<(Instant, u64)> {
        *lock(&self.idle)
    }

    pub(super) fn register(&self, waker: &Waker) {
        let mut slot = lock(&self.waker);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    pub(super) fn wake(&self) {
        if let Some(waker) = lock(&self.waker).as_ref() {
            waker.wake_by_ref();
        }
    }
}

/// What a waiting request is handed.
pub(super) enum Grant {
    Lease(Lease),
    /// A connection slot: connect (within `timeout`) and use the connection.
    Connect {
        slot: SlotGuard,
        timeout: Duration,
    },
    Fail(Failure),
}

impl Grant {
    fn release_locked(self, this: &Arc<Cluster>, st: &mut ClusterState) {
        match self {
            Grant::Lease(lease) => lease.release_locked(this, st),
            Grant::Connect { slot, .. } => slot.release_locked(st),
            Grant::Fail(_) => {}
        }
    }
}

pub(super) enum Step {
    Grant(Grant, Option<PendingGuard>),
    Wait(oneshot::Receiver<Grant>, PendingGuard),
}

/// A connection (HTTP/1) or a stream on one (HTTP/2), with the request counted as active.
pub(super) enum Lease {
    Http1 {
        active: ActiveGuard,
        conn: Http1Checkout,
    },
    Http2 {
        active: ActiveGuard,
        stream: StreamGuard,
        sender: http2::SendRequest<Body>,
    },
}

/// What is still held while the response streams.
pub(super) struct Completion {
    // Fields drop in this order: the active count first, so a waiter handed the connection
    // below is not refused by `http2MaxRequests` because of this very request.
    _active: ActiveGuard,
    conn: Option<Http1Checkout>,
    _stream: Option<StreamGuard>,
    outstanding: OutstandingGuard,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("endpoint", &self.outstanding.addr)
            .finish_non_exhaustive()
    }
}

impl Completion {
    /// The response ended cleanly: an HTTP/1 connection may serve another request.
    pub(super) fn complete(&mut self) {
        if let Some(conn) = &mut self.conn {
            conn.reusable = true;
        }
    }

    /// The connection was upgraded (101, or a CONNECT answered 2xx): it leaves the pool.
    pub(super) fn detach(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.detach();
        }
    }
}

/// The outcome of sending on a lease.
pub(super) struct SendFailure {
    pub(super) error: hyper::Error,
    /// The request, when it never reached the connection (a pooled connection that closed).
    pub(super) request: Option<http::Request<Body>>,
}

impl Lease {
    /// A pooled HTTP/1 connection must be ready (its previous response fully processed, still
    /// open); waits briefly for it.
    async fn ready(&mut self) -> bool {
        match self {
            Lease::Http1 { conn, .. } => match conn.conn.as_mut() {
                Some(idle) => matches!(
                    tokio::time::timeout(Duration::from_secs(1), idle.sender.ready()).await,
                    Ok(Ok(()))
                ),
                None => false,
            },
            Lease::Http2 { sender, .. } => !sender.is_closed(),
        }
    }

    pub(super) async fn send(
        self,
        request: http::Request<Body>,
        outstanding: OutstandingGuard,
    ) -> (
        Result<http::Response<hyper::body::Incoming>, SendFailure>,
        Completion,
    ) {
        match self {
            Lease::Http1 { active, mut conn } => {
                let idle = conn
                    .conn
                    .as_mut()
                    .expect("a checkout holds its connection until dropped");
                let result = idle.sender.try_send_request(request).await;
                let result = result.map_err(|mut e| SendFailure {
                    request: e.take_message(),
                    error: e.into_error(),
                });
                let completion = Completion {
                    _active: active,
                    conn: Some(conn),
                    _stream: None,
                    outstanding,
                };
                (result, completion)
            }
            Lease::Http2 {
                active,
                stream,
                mut sender,
            } => {
                let sent = sender.try_send_request(request);
                // The pool keeps its own handle; ours must not hold a draining connection open.
                drop(sender);
                let result = sent.await.map_err(|mut e| SendFailure {
                    request: e.take_message(),
                    error: e.into_error(),
                });
                let completion = Completion {
                    _active: active,
                    conn: None,
                    _stream: Some(stream),
                    outstanding,
                };
                (result, completion)
            }
        }
    }

    fn release_locked(self, this: &Arc<Cluster>, st: &mut ClusterState) {
        match self {
            Lease::Http1 { active, conn } => {
                active.release_locked(st);
                conn.release_locked(st);
            }
            Lease::Http2 { active, stream, .. } => {
                active.release_locked(st);
                stream.release_locked(this, st);
            }
        }
    }
}

/// The endpoint chosen by load balancing.
pub(super) struct Picked {
    pub(super) addr: SocketAddr,
    pub(super) generation: u64,
    pub(super) workload: Option<Arc<Workload>>,
    /// The tunnel's `:authority` when the endpoint is the service's waypoint.
    pub(super) authority: Option<SocketAddr>,
    pub(super) guard: OutstandingGuard,
}

/// Counts a request as pending (no connection yet). The count goes back once: when the pool
/// hands the request its connection (under the lock, see [`pending_ends`]) or when the guard
/// drops (the request got its connection, failed or gave up), whichever comes first.
pub(super) struct PendingGuard {
    cluster: Option<Arc<Cluster>>,
    counted: Arc<AtomicBool>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            cluster.lock().end_pending(&self.counted);
        }
    }
}

/// Whether a waiting request stops being pending when it is handed `grant`: a connection or
/// stream to use, or a failure, always; a connection slot to connect with only when that
/// connection is a tunnel set up behind a local hand-off (Istio's waypoint: Envoy's internal
/// listener `connect_originate`), else it stays pending until connected (Envoy's `Connected`).
fn pending_ends(grant: &Grant, tunnelled: bool) -> bool {
    match grant {
        Grant::Lease(_) | Grant::Fail(_) => true,
        Grant::Connect { .. } => tunnelled,
    }
}

/// Counts a request as active (attached to a connection) for `http2MaxRequests`.
pub(super) struct ActiveGuard {
    cluster: Option<Arc<Cluster>>,
}

impl ActiveGuard {
    fn release_locked(mut self, st: &mut ClusterState) {
        if self.cluster.take().is_some() {
            st.active = st.active.saturating_sub(1);
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            let mut st = cluster.lock();
            st.active = st.active.saturating_sub(1);
        }
    }
}

/// Counts a pick against its endpoint (LEAST_REQUEST's active requests).
pub(super) struct OutstandingGuard {
    cluster: Option<Arc<Cluster>>,
    addr: SocketAddr,
    generation: u64,
}

impl Drop for OutstandingGuard {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            let mut st = cluster.lock();
            if let Some(index) = st.position(self.addr, self.generation) {
                let endpoint = &mut st.endpoints[index];
                endpoint.outstanding = endpoint.outstanding.saturating_sub(1);
            }
        }
    }
}

/// One connection counted against `maxConnections`, from the connect attempt until the socket
/// is dropped (it lives inside the connection's I/O, so an upgraded stream keeps it).
pub(super) struct SlotGuard {
    cluster: Option<Arc<Cluster>>,
    shared: Arc<ConnShared>,
}

impl SlotGuard {
    pub(super) fn shared(&self) -> &Arc<ConnShared> {
        &self.shared
    }

    fn release_locked(mut self, st: &mut ClusterState) {
        if self.cluster.take().is_some() {
            st.close_slot(&self.shared);
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            let mut st = cluster.lock();
            st.close_slot(&self.shared);
            st.dispatch_all(&cluster);
        }
    }
}

/// An HTTP/1 connection out of the pool for one request; back into it on drop when the
/// response completed (`reusable`), else closed.
pub(super) struct Http1Checkout {
    cluster: Option<Arc<Cluster>>,
    conn: Option<IdleHttp1>,
    reusable: bool,
}

impl Http1Checkout {
    fn release_locked(mut self, st: &mut ClusterState) {
        if let (Some(_), Some(conn)) = (self.cluster.take(), self.conn.take()) {
            st.put_idle(conn);
        }
    }

    fn detach(mut self) {
        if let (Some(cluster), Some(conn)) = (self.cluster.take(), self.conn.take()) {
            let mut st = cluster.lock();
            st.detach_http1(&cluster, &conn.shared);
            // The sender goes; hyper has handed the socket to the upgrade.
            drop(conn);
        }
    }
}

impl Drop for Http1Checkout {
    fn drop(&mut self) {
        let (Some(cluster), Some(conn)) = (self.cluster.take(), self.conn.take()) else {
            return;
        };
        let mut st = cluster.lock();
        let retired = if self.reusable {
            st.return_http1(&cluster, conn)
        } else {
            // Dropping the sender mid-response closes the connection.
            Some(conn)
        };
        if let Some(conn) = &retired {
            st.retire(&cluster, &conn.shared);
        }
        drop(st);
        // The connection closes when its sender goes, outside the lock.
        drop(retired);
    }
}

/// One HTTP/2 stream on a pooled connection.
pub(super) struct StreamGuard {
    cluster: Option<Arc<Cluster>>,
    shared: Arc<ConnShared>,
}

impl StreamGuard {
    fn release_locked(mut self, _this: &Arc<Cluster>, st: &mut ClusterState) {
        if self.cluster.take().is_some() {
            // Called while serving waiters: a connection retired here gives its slot back
            // when its socket drops, which serves the waiters of the whole cluster.
            let _ = st.release_stream(&self.shared);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            let mut st = cluster.lock();
            match st.release_stream(&self.shared) {
                Some(Released::Kept(index)) => {
                    st.dispatch_pool(&cluster, index, UpstreamProtocol::Http2);
                }
                Some(Released::Retired) => st.retire(&cluster, &self.shared),
                None => {}
            }
        }
    }
}

/// What ending a stream did to its HTTP/2 connection.
enum Released {
    /// Still in the pool (endpoint index): its waiters may get the stream.
    Kept(usize),
    /// Out of the pool (draining or closed, no streams left): hyper closes it.
    Retired,
}

impl ClusterState {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn idle_timeout(&self) -> Duration {
        self.policy.connection_pool.idle_timeout
    }

    fn position(&self, addr: SocketAddr, generation: u64) -> Option<usize> {
        self.index
            .get(&addr)
            .copied()
            .filter(|&i| self.endpoints[i].generation == generation)
    }

    fn apply(&mut self, spec: Result<ClusterSpec, String>) -> Vec<EndpointState> {
        let spec = match spec {
            Ok(spec) => spec,
            Err(reason) => {
                self.error = Some(reason);
                self.index.clear();
                self.ring = None;
                return std::mem::take(&mut self.endpoints);
            }
        };
        self.error = None;
        self.hostname = spec.hostname;
        self.destination_rule = spec.destination_rule;
        self.policy = spec.policy;
        let mut gone = Vec::new();
        if self.via_waypoint != spec.via_waypoint {
            // Connections made the other way (to the endpoints or the waypoint, or for another
            // VIP) are not reused: every endpoint starts afresh.
            self.via_waypoint = spec.via_waypoint;
            gone = std::mem::take(&mut self.endpoints);
        }
        let mut old: HashMap<SocketAddr, EndpointState> =
            self.endpoints.drain(..).map(|e| (e.addr, e)).collect();
        let mut endpoints = Vec::with_capacity(spec.endpoints.len());
        for resolved in spec.endpoints {
            let endpoint = match old.remove(&resolved.addr) {
                Some(mut kept) => {
                    kept.workload = resolved.workload;
                    kept
                }
                None => EndpointState {
                    generation: self.next_id(),
                    addr: resolved.addr,
                    workload: resolved.workload,
                    outstanding: 0,
                    outlier: OutlierState::default(),
                    pools: Default::default(),
                },
            };
            endpoints.push(endpoint);
        }
        self.endpoints = endpoints;
        self.index = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.addr, i))
            .collect();
        self.ring = match self.policy.load_balancer {
            LoadBalancer::ConsistentHash(_) => Some(Ring::new(
                &self.endpoints.iter().map(|e| e.addr).collect::<Vec<_>>(),
            )),
            _ => None,
        };
        gone.extend(old.into_values());
        gone
    }

    fn pick(
        &mut self,
        hash: Option<&HashOutcome>,
        now: Instant,
        avoid: &[SocketAddr],
    ) -> Result<usize, Failure> {
        if let Some(reason) = &self.error {
            return Err(Failure::NoCluster(reason.clone()));
        }
        if self.endpoints.is_empty() {
            return Err(Failure::NoHealthy(match &self.via_waypoint {
                Some(via) => format!(
                    "service {} goes through its waypoint {} (istio.io/ingress-use-waypoint), \
                     which has no ready pod",
                    self.hostname, via.waypoint
                ),
                None => format!(
                    "service {} has no ready endpoint for this port{}",
                    self.hostname,
                    if self.destination_rule.is_some() {
                        " and subset"
                    } else {
                        ""
                    }
                ),
            }));
        }
        if let Some(config) = &self.policy.outlier_detection {
            for endpoint in &mut self.endpoints {
                endpoint.outlier.refresh(now, config);
            }
        }
        let n = self.endpoints.len();
        let endpoints = &self.endpoints;
        let available =
            |i: usize| !endpoints[i].outlier.is_ejected() && !avoid.contains(&endpoints[i].addr);
        let random = |bound: usize| fastrand::usize(..bound);
        let picked = match &self.policy.load_balancer {
            LoadBalancer::RoundRobin => {
                let counter = self.round_robin;
                self.round_robin = self.round_robin.wrapping_add(1);
                lb::round_robin(n, counter, available)
            }
            LoadBalancer::LeastRequest => {
                lb::least_request(n, available, |i| endpoints[i].outstanding, random)
            }
            LoadBalancer::Random => lb::random(n, available, random),
            LoadBalancer::ConsistentHash(_) => match (hash, &self.ring) {
                (
                    Some(HashOutcome::Key(hash) | HashOutcome::Generated { hash, .. }),
                    Some(ring),
                ) => ring.pick(*hash, available),
                _ => lb::random(n, available, random),
            },
        };
        // Istio sets Envoy's panic threshold to `minHealthPercent`, 0 by default: when every
        // endpoint is ejected there is no panic routing, the request fails (UH).
        picked.ok_or_else(|| {
            Failure::NoHealthy(format!(
                "all {n} endpoints of {} are ejected by outlier detection",
                self.hostname
            ))
        })
    }

    fn record(&mut self, index: usize, outcome: Outcome, now: Instant) {
        let Some(config) = self.policy.outlier_detection.clone() else {
            return;
        };
        let endpoint = &mut self.endpoints[index];
        endpoint.outlier.refresh(now, &config);
        if !endpoint.outlier.record(outcome, &config) {
            return;
        }
        let hosts = self.endpoints.len();
        let ejected = self
            .endpoints
            .iter_mut()
            .map(|e| e.outlier.refresh(now, &config))
            .filter(|&ejected| ejected)
            .count();
        let addr = self.endpoints[index].addr;
        if outlier::may_eject(ejected, hosts, config.max_ejection_percent) {
            let duration = self.endpoints[index].outlier.eject(now, &config);
            tracing::info!(
                service = %self.hostname, endpoint = %addr, ?duration,
                "outlier detection ejected an endpoint"
            );
        } else {
            self.overflow.ejections += 1;
            tracing::debug!(
                service = %self.hostname, endpoint = %addr,
                max_ejection_percent = config.max_ejection_percent,
                "outlier detection would eject an endpoint but the cluster is at maxEjectionPercent"
            );
        }
    }

    fn try_acquire(
        &mut self,
        this: &Arc<Cluster>,
        addr: SocketAddr,
        generation: u64,
        protocol: UpstreamProtocol,
        tunnelled: bool,
    ) -> Result<Step, Failure> {
        let limits = &self.policy.connection_pool;
        let (max_requests, max_pending, max_connections) = (
            limits.http2_max_requests,
            limits.http1_max_pending_requests,
            limits.max_connections,
        );
        if self.active >= max_requests {
            self.overflow.requests += 1;
            return Err(Failure::Overflow("requests"));
        }
        let index = self.position(addr, generation).ok_or(Failure::Gone)?;
        if let Some(lease) = self.take_ready(this, index, protocol) {
            return Ok(Step::Grant(Grant::Lease(lease), None));
        }
        if self.pending >= max_pending {
            self.overflow.pending += 1;
            return Err(Failure::Overflow("pending"));
        }
        if self.may_connect(index, protocol) {
            let grant = self.start_connect(this, index, protocol);
            // Envoy checks the pending limit even here: the request is pending until its new
            // connection is connected (at once for a tunnel's local hand-off).
            let pending = (!pending_ends(&grant, tunnelled)).then(|| self.start_pending(this));
            return Ok(Step::Grant(grant, pending));
        }
        if self.connections >= max_connections {
            self.overflow.connections += 1;
        }
        let pending = self.start_pending(this);
        let (tx, rx) = oneshot::channel();
        let seq = self.next_id();
        self.endpoints[index].pools[pool_index(protocol)]
            .waiters
            .push_back(Waiter {
                seq,
                tx,
                pending: pending.counted.clone(),
                tunnelled,
            });
        Ok(Step::Wait(rx, pending))
    }

    /// Whether the pool has a connection (or stream) to hand out now; drops dead ones.
    fn has_ready(&mut self, index: usize, protocol: UpstreamProtocol) -> bool {
        let pool = &mut self.endpoints[index].pools[pool_index(protocol)];
        match protocol {
            UpstreamProtocol::Http1 => {
                pool.idle.retain(|c| !c.sender.is_closed());
                !pool.idle.is_empty()
            }
            UpstreamProtocol::Http2 => {
                pool.conns.retain(|c| !c.sender.is_closed());
                pool.conns.iter().any(Http2Conn::usable)
            }
        }
    }

    /// Takes a ready connection (HTTP/1, most recently used first) or stream (HTTP/2) and
    /// counts the request active. The caller has checked `http2MaxRequests`.
    fn take_ready(
        &mut self,
        this: &Arc<Cluster>,
        index: usize,
        protocol: UpstreamProtocol,
    ) -> Option<Lease> {
        if !self.has_ready(index, protocol) {
            return None;
        }
        let max_per_connection = self.policy.connection_pool.max_requests_per_connection;
        let pool = &mut self.endpoints[index].pools[pool_index(protocol)];
        let lease = match protocol {
            UpstreamProtocol::Http1 => {
                let mut conn = pool.idle.pop()?;
                conn.shared.set_busy();
                conn.served += 1;
                Lease::Http1 {
                    active: ActiveGuard {
                        cluster: Some(this.clone()),
                    },
                    conn: Http1Checkout {
                        cluster: Some(this.clone()),
                        conn: Some(conn),
                        reusable: false,
                    },
                }
            }
            UpstreamProtocol::Http2 => {
                let conn = pool.conns.iter_mut().find(|c| c.usable())?;
                conn.active += 1;
                conn.served += 1;
                if max_per_connection > 0 && conn.served >= max_per_connection {
                    conn.draining = true;
                }
                conn.shared.set_busy();
                Lease::Http2 {
                    active: ActiveGuard {
                        cluster: Some(this.clone()),
                    },
                    stream: StreamGuard {
                        cluster: Some(this.clone()),
                        shared: conn.shared.clone(),
                    },
                    sender: conn.sender.clone(),
                }
            }
        };
        self.active += 1;
        Some(lease)
    }

    /// Whether a waiter of this pool may open a connection now.
    fn may_connect(&self, index: usize, protocol: UpstreamProtocol) -> bool {
        let pool = &self.endpoints[index].pools[pool_index(protocol)];
        if protocol == UpstreamProtocol::Http2 && pool.connecting > 0 {
            // The connection on its way will multiplex this request too.
            return false;
        }
        self.connections < self.policy.connection_pool.max_connections
            || pool.open + pool.connecting == 0
    }

    fn start_connect(
        &mut self,
        this: &Arc<Cluster>,
        index: usize,
        protocol: UpstreamProtocol,
    ) -> Grant {
        let id = self.next_id();
        self.connections += 1;
        let endpoint = &mut self.endpoints[index];
        endpoint.pools[pool_index(protocol)].connecting += 1;
        let shared = Arc::new(ConnShared {
            id,
            addr: endpoint.addr,
            generation: endpoint.generation,
            protocol,
            life: AtomicU8::new(CONNECTING),
            counted: AtomicBool::new(true),
            idle: Mutex::new(None),
            epoch: AtomicU64::new(0),
            waker: Mutex::new(None),
            max_streams: AtomicUsize::new(INITIAL_MAX_SEND_STREAMS),
        });
        Grant::Connect {
            slot: SlotGuard {
                cluster: Some(this.clone()),
                shared,
            },
            timeout: self.policy.connection_pool.connect_timeout,
        }
    }

    /// Serves the pool's waiters, oldest first, while connections, streams or slots allow.
    fn dispatch_pool(&mut self, this: &Arc<Cluster>, index: usize, protocol: UpstreamProtocol) {
        let p = pool_index(protocol);
        loop {
            let Some(front) = self.endpoints[index].pools[p].waiters.front() else {
                return;
            };
            if front.tx.is_closed() {
                self.endpoints[index].pools[p].waiters.pop_front();
                continue;
            }
            let grant = if self.has_ready(index, protocol) {
                if self.active >= self.policy.connection_pool.http2_max_requests {
                    self.overflow.requests += 1;
                    Grant::Fail(Failure::Overflow("requests"))
                } else {
                    match self.take_ready(this, index, protocol) {
                        Some(lease) => Grant::Lease(lease),
                        None => return,
                    }
                }
            } else if self.may_connect(index, protocol) {
                self.start_connect(this, index, protocol)
            } else {
                return;
            };
            let Some(waiter) = self.endpoints[index].pools[p].waiters.pop_front() else {
                grant.release_locked(this, self);
                return;
            };
            if pending_ends(&grant, waiter.tunnelled) {
                self.end_pending(&waiter.pending);
            }
            if let Err(grant) = waiter.tx.send(grant) {
                grant.release_locked(this, self);
            }
        }
    }

    /// After a connection slot freed up: serves waiters across the cluster, oldest first.
    fn dispatch_all(&mut self, this: &Arc<Cluster>) {
        let mut heads: Vec<(u64, usize, UpstreamProtocol)> = Vec::new();
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
                if let Some(front) = endpoint.pools[pool_index(protocol)].waiters.front() {
                    heads.push((front.seq, index, protocol));
                }
            }
        }
        heads.sort_unstable_by_key(|head| head.0);
        for (_, index, protocol) in heads {
            self.dispatch_pool(this, index, protocol);
        }
    }

    /// A connection is gone, retired, or its attempt abandoned: its slot and pool counts go
    /// back, once.
    fn close_slot(&mut self, shared: &ConnShared) {
        if !shared.counted.swap(false, Ordering::AcqRel) {
            return;
        }
        self.connections = self.connections.saturating_sub(1);
        let life = shared.life.swap(CLOSED, Ordering::AcqRel);
        let Some(index) = self.position(shared.addr, shared.generation) else {
            return;
        };
        let pool = &mut self.endpoints[index].pools[pool_index(shared.protocol)];
        match life {
            CONNECTING => pool.connecting = pool.connecting.saturating_sub(1),
            OPEN => {
                pool.open = pool.open.saturating_sub(1);
                pool.idle.retain(|c| c.shared.id != shared.id);
                pool.conns.retain(|c| c.shared.id != shared.id);
            }
            _ => {}
        }
    }

    /// The pool is done with a connection that is about to close: its slot goes back now, and
    /// to the oldest waiter, as Envoy closes a connection when its last request ends rather
    /// than when the socket is finally dropped.
    fn retire(&mut self, this: &Arc<Cluster>, shared: &ConnShared) {
        self.close_slot(shared);
        self.dispatch_all(this);
    }

    fn start_pending(&mut self, this: &Arc<Cluster>) -> PendingGuard {
        self.pending += 1;
        PendingGuard {
            cluster: Some(this.clone()),
            counted: Arc::new(AtomicBool::new(true)),
        }
    }

    fn end_pending(&mut self, counted: &AtomicBool) {
        if counted.swap(false, Ordering::AcqRel) {
            self.pending = self.pending.saturating_sub(1);
        }
    }

    /// Puts an HTTP/1 connection back as idle, without serving waiters.
    fn put_idle(&mut self, conn: IdleHttp1) {
        let timeout = self.idle_timeout();
        if let Some(index) = self.position(conn.shared.addr, conn.shared.generation) {
            conn.shared.set_idle(timeout);
            self.endpoints[index].pools[HTTP1].idle.push(conn);
        }
    }

    /// An HTTP/1 connection finished a response: idle again (and handed to the oldest waiter),
    /// or given back to the caller to be closed outside the lock.
    fn return_http1(&mut self, this: &Arc<Cluster>, conn: IdleHttp1) -> Option<IdleHttp1> {
        let max_per_connection = self.policy.connection_pool.max_requests_per_connection;
        let Some(index) = self.position(conn.shared.addr, conn.shared.generation) else {
            return Some(conn);
        };
        if conn.sender.is_closed()
            || conn.shared.life() != OPEN
            || (max_per_connection > 0 && conn.served >= max_per_connection)
        {
            return Some(conn);
        }
        self.put_idle(conn);
        self.dispatch_pool(this, index, UpstreamProtocol::Http1);
        None
    }

    fn detach_http1(&mut self, this: &Arc<Cluster>, shared: &ConnShared) {
        if shared
            .life
            .compare_exchange(OPEN, DETACHED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        if let Some(index) = self.position(shared.addr, shared.generation) {
            let pool = &mut self.endpoints[index].pools[HTTP1];
            pool.open = pool.open.saturating_sub(1);
            self.dispatch_pool(this, index, UpstreamProtocol::Http1);
        }
    }

    /// A stream ended: the connection stays (the endpoint index, so the caller can serve
    /// waiters) or, drained, leaves the pool (the caller gives its slot back).
    fn release_stream(&mut self, shared: &ConnShared) -> Option<Released> {
        let timeout = self.idle_timeout();
        let index = self.position(shared.addr, shared.generation)?;
        let pool = &mut self.endpoints[index].pools[HTTP2];
        if let Some(at) = pool.conns.iter().position(|c| c.shared.id == shared.id) {
            let conn = &mut pool.conns[at];
            conn.active = conn.active.saturating_sub(1);
            if conn.active == 0 {
                if conn.draining || conn.sender.is_closed() {
                    // Dropping the pool's handle lets hyper close the connection.
                    pool.conns.remove(at);
                    return Some(Released::Retired);
                }
                conn.shared.set_idle(timeout);
            }
        }
        Some(Released::Kept(index))
    }

    fn register_http1(
        &mut self,
        this: &Arc<Cluster>,
        shared: &Arc<ConnShared>,
        sender: http1::SendRequest<Body>,
    ) -> Result<Lease, Failure> {
        if shared
            .life
            .compare_exchange(CONNECTING, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Failure::Gone);
        }
        let Some(index) = self.position(shared.addr, shared.generation) else {
            return Err(Failure::Gone);
        };
        let pool = &mut self.endpoints[index].pools[HTTP1];
        pool.connecting = pool.connecting.saturating_sub(1);
        pool.open += 1;
        let mut conn = IdleHttp1 {
            sender,
            shared: shared.clone(),
            served: 0,
        };
        if self.active >= self.policy.connection_pool.http2_max_requests {
            self.overflow.requests += 1;
            self.put_idle(conn);
            self.dispatch_pool(this, index, UpstreamProtocol::Http1);
            return Err(Failure::Overflow("requests"));
        }
        conn.served = 1;
        self.active += 1;
        Ok(Lease::Http1 {
            active: ActiveGuard {
                cluster: Some(this.clone()),
            },
            conn: Http1Checkout {
                cluster: Some(this.clone()),
                conn: Some(conn),
                reusable: false,
            },
        })
    }

    fn register_http2(
        &mut self,
        this: &Arc<Cluster>,
        shared: &Arc<ConnShared>,
        sender: http2::SendRequest<Body>,
    ) -> Result<Lease, Failure> {
        if shared
            .life
            .compare_exchange(CONNECTING, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Failure::Gone);
        }
        let Some(index) = self.position(shared.addr, shared.generation) else {
            return Err(Failure::Gone);
        };
        let pool = &mut self.endpoints[index].pools[HTTP2];
        pool.connecting = pool.connecting.saturating_sub(1);
        pool.open += 1;
        // Read under the lock: `http2_settings` for a later change serialises after this.
        let max_streams = shared.max_streams.load(Ordering::Acquire);
        pool.conns.push(Http2Conn {
            sender,
            shared: shared.clone(),
            active: 0,
            max_streams,
            served: 0,
            draining: false,
        });
        let result = if self.active >= self.policy.connection_pool.http2_max_requests {
            self.overflow.requests += 1;
            Err(Failure::Overflow("requests"))
        } else {
            self.take_ready(this, index, UpstreamProtocol::Http2)
                .ok_or_else(|| {
                    Failure::ConnectError(Arc::new(io::Error::other(
                        "the HTTP/2 server allows no concurrent streams",
                    )))
                })
        };
        if result.is_err() {
            shared.set_idle(self.idle_timeout());
        }
        self.dispatch_pool(this, index, UpstreamProtocol::Http2);
        result
    }

    fn connect_failed(&mut self, shared: &ConnShared, failure: &Failure) {
        let was_connecting = shared
            .life
            .compare_exchange(CONNECTING, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        let Some(index) = self.position(shared.addr, shared.generation) else {
            return;
        };
        let p = pool_index(shared.protocol);
        if was_connecting {
            let pool = &mut self.endpoints[index].pools[p];
            pool.connecting = pool.connecting.saturating_sub(1);
        }
        self.record(index, Outcome::LocalFailure, Instant::now());
        let pool = &mut self.endpoints[index].pools[p];
        if pool.open + pool.connecting == 0 {
            // Nothing else would serve them: they fail with this attempt, as Envoy purges the
            // pending requests of a pool whose connect failed.
            let failed: Vec<Waiter> = pool.waiters.drain(..).collect();
            for waiter in failed {
                self.end_pending(&waiter.pending);
                let _ = waiter.tx.send(Grant::Fail(failure.clone()));
            }
        }
    }

    fn expire_idle(&mut self, shared: &ConnShared, epoch: u64) -> bool {
        if shared.idle().map(|(_, e)| e) != Some(epoch) {
            return false;
        }
        let Some(index) = self.position(shared.addr, shared.generation) else {
            return true;
        };
        let pool = &mut self.endpoints[index].pools[pool_index(shared.protocol)];
        let removed = match shared.protocol {
            UpstreamProtocol::Http1 => pool
                .idle
                .iter()
                .position(|c| c.shared.id == shared.id)
                .map(|at| drop(pool.idle.remove(at)))
                .is_some(),
            UpstreamProtocol::Http2 => pool
                .conns
                .iter()
                .position(|c| c.shared.id == shared.id && c.active == 0)
                .map(|at| drop(pool.conns.remove(at)))
                .is_some(),
        };
        if removed {
            shared.set_busy();
        }
        removed
    }

    fn snapshot(&mut self, key: &ClusterKey, now: Instant) -> ClusterSnapshot {
        if let Some(config) = &self.policy.outlier_detection {
            for endpoint in &mut self.endpoints {
                endpoint.outlier.refresh(now, config);
            }
        }
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| {
                let pool = |p: usize| {
                    let pool = &e.pools[p];
                    PoolSnapshot {
                        open: pool.open,
                        connecting: pool.connecting,
                        idle: u32::try_from(
                            pool.idle.len() + pool.conns.iter().filter(|c| c.active == 0).count(),
                        )
                        .unwrap_or(u32::MAX),
                        active_streams: pool.conns.iter().map(|c| c.active).sum(),
                        waiting: u32::try_from(pool.waiters.len()).unwrap_or(u32::MAX),
                    }
                };
                EndpointSnapshot {
                    address: e.addr,
                    workload: e.workload.as_ref().map(|w| w.uid.clone()),
                    ejected: e.outlier.is_ejected(),
                    ejection_left_ms: e
                        .outlier
                        .ejection_left(now)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    ejections: e.outlier.total_ejections(),
                    consecutive_5xx: e.outlier.consecutive_5xx(),
                    consecutive_gateway_errors: e.outlier.consecutive_gateway(),
                    outstanding_requests: e.outstanding,
                    http1: pool(HTTP1),
                    http2: pool(HTTP2),
                }
            })
            .collect();
        ClusterSnapshot {
            service: key.service.clone(),
            subset: key.subset.clone(),
            port: key.port,
            hostname: self.hostname.clone(),
            destination_rule: self.destination_rule.clone(),
            via_waypoint: self
                .via_waypoint
                .as_ref()
                .map(|via| format!("{} (:authority {})", via.waypoint, via.authority)),
            error: self.error.clone(),
            load_balancer: self.policy.load_balancer.clone(),
            connections: self.connections,
            pending: self.pending,
            active_requests: self.active,
            active_retries: self.retries,
            overflow: self.overflow.clone(),
            endpoints,
        }
    }
}
