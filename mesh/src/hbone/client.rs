//! The HBONE client: opens tunnels over pooled HTTP/2 connections.
//!
//! Connections are pooled per (source identity, destination identity, destination address), so a
//! tunnel only ever shares a connection with tunnels that would present and expect the same
//! certificates. Each connection carries up to `max_streams_per_connection` tunnels; past that a
//! new connection is opened. Concurrent requesters for one key wait for a single handshake rather
//! than each opening their own. Connections with no tunnels are closed after `idle_timeout`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, StatusCode};
use tokio::net::TcpStream;

use super::budget::{CONNECTION_SEND_QUEUE, Counted, ProcessSendQueue, SendQueue};
use super::stream::H2Stream;
use super::{DEFAULT_HANDSHAKE_TIMEOUT, H2Settings, HboneAuthority, TLS_WRITE_BUFFER, headers};
use crate::cert_manager::{CertError, CertificateSource};
use crate::identity::Identity;

/// Client tuning.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientConfig {
    pub h2: H2Settings,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How long a new connection waits for the source's certificate (its first fetch from the
    /// CA) before it fails.
    pub certificate_timeout: Duration,
    /// Tunnels per connection before another connection is opened. Istio's ztunnel uses 100.
    pub max_streams_per_connection: usize,
    /// A connection with no tunnels for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            h2: H2Settings::default(),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            certificate_timeout: super::DEFAULT_CERTIFICATE_TIMEOUT,
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What to open a tunnel to.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Identity presented to the server.
    pub source: Identity,
    /// Identity the server must prove.
    pub destination: Identity,
    /// The HBONE endpoint to dial (`pod-ip:15008` or a waypoint).
    pub hbone_addr: SocketAddr,
    /// The `:authority`: where the far side should send the bytes.
    pub authority: HboneAuthority,
    /// Extra request headers (`forwarded`, `baggage`); a `traceparent` is added when absent.
    pub headers: http::HeaderMap,
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no client certificate: {0}")]
    Certificate(#[from] CertError),
    #[error(
        "no client certificate for {identity} after waiting {after:?}: the CA has not answered \
         yet (the proxy's certificates view shows the CA's error and the next attempt)"
    )]
    CertificateTimeout { identity: Identity, after: Duration },
    #[error("connect to {addr} failed: {source} (is the destination's port 15008 reachable?)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {after:?} (is a firewall dropping port 15008?)")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error(
        "TLS with {addr} failed: {source} (does it hold a certificate for {expected} from our root?)"
    )]
    Tls {
        addr: SocketAddr,
        expected: Identity,
        source: std::io::Error,
    },
    #[error("handshake with {addr} did not finish within {after:?}")]
    HandshakeTimeout { addr: SocketAddr, after: Duration },
    #[error("HTTP/2 with {addr}: {source}")]
    Http2 { addr: SocketAddr, source: h2::Error },
    #[error("{addr} answered {status} for CONNECT {authority}")]
    Status {
        addr: SocketAddr,
        authority: HboneAuthority,
        status: StatusCode,
    },
    #[error("bad request header: {0}")]
    Header(String),
    #[error(
        "{addr} accepts no tunnels on a new connection (closed at once, or a stream limit of 0)"
    )]
    NoCapacity { addr: SocketAddr },
}

impl HboneError {
    /// The HTTP status the server answered, when it did answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HboneError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The tunnel failed before dialing because this side has no certificate to present.
    pub fn is_certificate(&self) -> bool {
        matches!(
            self,
            HboneError::Certificate(_) | HboneError::CertificateTimeout { .. }
        )
    }
}

type PoolKey = (Identity, Identity, SocketAddr);

/// Opens the TCP connection under an HBONE connection. ztunnel supplies one that dials from
/// inside the source pod's network namespace; the default dials from wherever the process is.
pub trait TcpConnector: Send + Sync + 'static {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpStream>>;
}

/// Dials from the process' own network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectConnector;

impl TcpConnector for DirectConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(addr))
    }
}

/// Opens HBONE tunnels. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct HboneClient {
    inner: Arc<Pool>,
}

impl std::fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneClient")
            .field("config", &self.inner.config)
            .field("connections", &self.connection_count())
            .finish()
    }
}

struct Pool {
    config: ClientConfig,
    certs: Arc<dyn CertificateSource>,
    connector: Arc<dyn TcpConnector>,
    keys: Mutex<HashMap<PoolKey, Arc<KeyPool>>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct KeyPool {
    conns: Mutex<Vec<Arc<PooledConn>>>,
    /// Held while dialing so concurrent requesters share one new connection.
    dialing: tokio::sync::Mutex<()>,
}

struct PooledConn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    /// The peer's advertised concurrent-stream limit, kept current by the connection task.
    peer_limit: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    /// Milliseconds since `epoch` when the last tunnel ended.
    idle_since_ms: AtomicU64,
    epoch: Instant,
    /// What this connection's tunnels have waiting for its socket.
    queue: Arc<SendQueue>,
}

impl PooledConn {
    fn try_reserve(self: &Arc<Self>, max: usize) -> Option<StreamReservation> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        // The server's SETTINGS_MAX_CONCURRENT_STREAMS, once known, lowers our own limit: past
        // it h2 would queue the stream instead of a new connection carrying it.
        let max = max.min(self.peer_limit.load(Ordering::Acquire));
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamReservation(self.clone()))
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(now.duration_since(self.epoch).saturating_sub(since))
    }
}

/// Counts one tunnel against its connection until dropped.
struct StreamReservation(Arc<PooledConn>);

impl Drop for StreamReservation {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.idle_since_ms
            .store(conn.epoch.elapsed().as_millis() as u64, Ordering::Release);
        conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HboneClient {
    /// A client presenting certificates from `certs`. Starts the idle reaper; needs a Tokio
    /// runtime.
    pub fn new(config: ClientConfig, certs: Arc<dyn CertificateSource>) -> Self {
        Self::with_connector(config, certs, Arc::new(DirectConnector))
    }

    /// A client whose connections are dialled by `connector`.
    pub fn with_connector(
        config: ClientConfig,
        certs: Arc<dyn CertificateSource>,
        connector: Arc<dyn TcpConnector>,
    ) -> Self {
        let inner = Arc::new(Pool {
            config,
            certs,
            connector,
            keys: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Open connections, across all keys.
    pub fn connection_count(&self) -> usize {
        lock(&self.inner.keys)
            .values()
            .map(|k| lock(&k.conns).len())
            .sum()
    }

    /// Opens a tunnel and waits for the server's answer: `Ok` only on 200.
    pub async fn connect(&self, request: ConnectRequest) -> Result<H2Stream, HboneError> {
        self.connect_with_headers(request)
            .await
            .map(|(stream, _)| stream)
    }

    /// [`Self::connect`], also returning the headers of the 200 (Istio's ztunnel sends the
    /// destination workload's `baggage` there).
    pub async fn connect_with_headers(
        &self,
        request: ConnectRequest,
    ) -> Result<(H2Stream, http::HeaderMap), HboneError> {
        let key: PoolKey = (
            request.source.clone(),
            request.destination.clone(),
            request.hbone_addr,
        );
        let key_pool = lock(&self.inner.keys).entry(key).or_default().clone();
        // A connection can die between being picked and being used (GOAWAY, reset); one retry on
        // a fresh connection covers that without hiding a server that keeps failing.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let reservation = self.reserve(&key_pool, &request).await?;
            match self.open_stream(&reservation, &request).await {
                Err(HboneError::Http2 { source, .. })
                    if attempts == 1 && (source.is_go_away() || source.is_io()) =>
                {
                    reservation.0.closed.store(true, Ordering::Release);
                    continue;
                }
                other => {
                    return other.map(|(send, recv, headers)| {
                        let queue = reservation.0.queue.clone();
                        (
                            H2Stream::new(send, recv, queue, Some(Box::new(reservation))),
                            headers,
                        )
                    });
                }
            }
        }
    }

    async fn reserve(
        &self,
        key_pool: &KeyPool,
        request: &ConnectRequest,
    ) -> Result<StreamReservation, HboneError> {
        let max = self.inner.config.max_streams_per_connection.max(1);
        if let Some(r) = find_capacity(key_pool, max) {
            return Ok(r);
        }
        let _dialing = key_pool.dialing.lock().await;
        // Another requester may have dialed while we waited.
        if let Some(r) = find_capacity(key_pool, max) {
            return Ok(r);
        }
        let conn = Arc::new(self.dial(request).await?);
        // A peer can close at once or advertise a stream limit of 0; neither may panic.
        let reservation = conn.try_reserve(max).ok_or(HboneError::NoCapacity {
            addr: request.hbone_addr,
        })?;
        let mut conns = lock(&key_pool.conns);
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        conns.push(conn);
        Ok(reservation)
    }

    async fn dial(&self, request: &ConnectRequest) -> Result<PooledConn, HboneError> {
        let cfg = &self.inner.config;
        let addr = request.hbone_addr;
        let cert = tokio::time::timeout(
            cfg.certificate_timeout,
            self.inner.certs.certificate(&request.source),
        )
        .await
        .map_err(|_| HboneError::CertificateTimeout {
            identity: request.source.clone(),
            after: cfg.certificate_timeout,
        })??;
        let tcp = tokio::time::timeout(cfg.connect_timeout, self.inner.connector.connect(addr))
            .await
            .map_err(|_| HboneError::ConnectTimeout {
                addr,
                after: cfg.connect_timeout,
            })?
            .map_err(|source| HboneError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let mut tls = tokio_rustls::TlsConnector::from(
                cert.client_config(vec![request.destination.clone()]),
            )
            .connect(
                crate::tls::unused_server_name(),
                super::batch_read::BatchedRead::new(tcp),
            )
            .await
            .map_err(|source| HboneError::Tls {
                addr,
                expected: request.destination.clone(),
                source,
            })?;
            tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
            let queue = SendQueue::new(CONNECTION_SEND_QUEUE, ProcessSendQueue::global());
            let io = Counted::new(tls, queue.clone());
            h2::client::Builder::new()
                .initial_window_size(cfg.h2.stream_window)
                .initial_connection_window_size(cfg.h2.connection_window)
                .max_frame_size(cfg.h2.max_frame_size)
                .max_header_list_size(cfg.h2.max_header_list_size)
                .max_send_buffer_size(cfg.h2.stream_send_buffer as usize)
                .enable_push(false)
                .handshake::<_, Bytes>(io)
                .await
                .map(|(send, connection)| (send, connection, queue))
                .map_err(|source| HboneError::Http2 { addr, source })
        };
        let (send, connection, queue) = tokio::time::timeout(cfg.handshake_timeout, handshake)
            .await
            .map_err(|_| HboneError::HandshakeTimeout {
                addr,
                after: cfg.handshake_timeout,
            })??;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let closed_by_task = closed.clone();
        let (src, dst) = (request.source.clone(), request.destination.clone());
        let peer_limit = Arc::new(AtomicUsize::new(usize::MAX));
        let limit_by_task = peer_limit.clone();
        tokio::spawn(async move {
            let mut connection = connection;
            let result = std::future::poll_fn(|cx| {
                let poll = std::pin::Pin::new(&mut connection).poll(cx);
                limit_by_task.store(connection.max_concurrent_send_streams(), Ordering::Release);
                poll
            })
            .await;
            match result {
                Ok(()) => tracing::debug!(conn = id, %addr, "HBONE connection closed"),
                Err(e) => tracing::info!(conn = id, %addr, error = %e, "HBONE connection failed"),
            }
            closed_by_task.store(true, Ordering::Release);
        });
        tracing::debug!(conn = id, %addr, source = %src, destination = %dst, "HBONE connection opened");
        let epoch = Instant::now();
        Ok(PooledConn {
            id,
            send,
            active: AtomicUsize::new(0),
            peer_limit,
            closed,
            idle_since_ms: AtomicU64::new(0),
            epoch,
            queue,
        })
    }

    async fn open_stream(
        &self,
        reservation: &StreamReservation,
        request: &ConnectRequest,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream, http::HeaderMap), HboneError> {
        let addr = request.hbone_addr;
        let h2_err = |source| HboneError::Http2 { addr, source };
        let mut builder = Request::builder()
            .method(http::Method::CONNECT)
            .uri(request.authority.to_string());
        if let Some(h) = builder.headers_mut() {
            h.extend(request.headers.clone());
            if !h.contains_key(headers::TRACEPARENT) {
                let tp = super::new_traceparent()
                    .parse()
                    .map_err(|_| HboneError::Header("traceparent".into()))?;
                h.insert(headers::TRACEPARENT, tp);
            }
        }
        let req = builder
            .body(())
            .map_err(|e| HboneError::Header(e.to_string()))?;
        let mut send = reservation.0.send.clone().ready().await.map_err(h2_err)?;
        let (response, stream) = send.send_request(req, false).map_err(h2_err)?;
        let response = response.await.map_err(h2_err)?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(HboneError::Status {
                addr,
                authority: request.authority,
                status,
            });
        }
        tracing::trace!(conn = reservation.0.id, authority = %request.authority, "HBONE tunnel open");
        let (parts, body) = response.into_parts();
        Ok((stream, body, parts.headers))
    }
}

fn find_capacity(key_pool: &KeyPool, max: usize) -> Option<StreamReservation> {
    lock(&key_pool.conns)
        .iter()
        .find_map(|c| c.try_reserve(max))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The pool's maps are updated by single inserts/removes; a panic elsewhere cannot leave them
    // inconsistent, so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Closes connections idle past the timeout and forgets dead ones.
async fn reap_idle(pool: Weak<Pool>) {
    let period = match pool.upgrade() {
        Some(p) => {
            (p.config.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(10))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let idle_timeout = pool.config.idle_timeout;
        let mut keys = lock(&pool.keys);
        keys.retain(|_, key_pool| {
            let mut conns = lock(&key_pool.conns);
            conns.retain(|c| {
                let dead = c.closed.load(Ordering::Acquire);
                let idle = c.idle_for(now).is_some_and(|d| d >= idle_timeout);
                if idle && !dead {
                    tracing::debug!(conn = c.id, "closing idle HBONE connection");
                }
                !(dead || idle)
            });
            !conns.is_empty() || Arc::strong_count(key_pool) > 1
        });
    }
}
