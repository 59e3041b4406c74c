//! The HBONE server: accepts mTLS connections, verifies the client's chain and trust domain,
//! and turns each `CONNECT` into an [`InboundTunnel`] for the caller to accept or refuse.
//!
//! Requests that are not HBONE at all (another method, no or bad authority) are answered 400
//! here; everything else (policy, reaching the upstream) is the caller's decision, so the status
//! it sends (200, 401, 503) reflects what actually happened.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::budget::{CONNECTION_SEND_QUEUE, Counted, ProcessSendQueue, SendQueue};
use super::stream::H2Stream;
use super::{DEFAULT_CERTIFICATE_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, H2Settings, HboneAuthority};
use crate::cert_manager::CertError;
use crate::identity::Identity;
use crate::tls::WorkloadCertificate;

/// Server tuning.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerConfig {
    pub h2: H2Settings,
    pub handshake_timeout: Duration,
    /// How long an accepted connection waits for the certificate to present (its first fetch
    /// from the CA) before it is closed.
    pub certificate_timeout: Duration,
    /// Concurrent tunnels one client connection may carry (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; Istio's ztunnel clients open a new connection after
    /// 100, as ours do).
    pub max_concurrent_streams: u32,
    /// Connections one peer (source IP) may have open to one listener at a time; more are
    /// closed at once, before the TLS handshake.
    pub max_connections_per_peer: usize,
}

/// Sets [`ServerConfig::max_concurrent_streams`].
pub const MAX_STREAMS_PER_CONNECTION_VAR: &str = "HBONE_MAX_STREAMS_PER_CONNECTION";
/// Sets [`ServerConfig::max_connections_per_peer`].
pub const MAX_CONNECTIONS_PER_PEER_VAR: &str = "HBONE_MAX_CONNECTIONS_PER_PEER";

impl ServerConfig {
    /// The defaults, with the limits from [`MAX_STREAMS_PER_CONNECTION_VAR`] (1..=10000) and
    /// [`MAX_CONNECTIONS_PER_PEER_VAR`] (1..=100000).
    pub fn from_env(env: &dyn crate::ops::Env) -> Result<Self, crate::ops::ConfigError> {
        Ok(Self {
            max_concurrent_streams: crate::ops::parse_in_range(
                env,
                MAX_STREAMS_PER_CONNECTION_VAR,
                DEFAULT_MAX_STREAMS_PER_CONNECTION,
                1..=10_000,
                "",
            )?,
            max_connections_per_peer: crate::ops::parse_in_range(
                env,
                MAX_CONNECTIONS_PER_PEER_VAR,
                DEFAULT_MAX_CONNECTIONS_PER_PEER,
                1..=100_000,
                "",
            )?,
            ..Self::default()
        })
    }
}

/// Default of [`ServerConfig::max_concurrent_streams`].
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Default of [`ServerConfig::max_connections_per_peer`]: with 100 tunnels each, 10,000 tunnels
/// from one peer to one pod.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 100;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            h2: H2Settings::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            certificate_timeout: DEFAULT_CERTIFICATE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
        }
    }
}

/// The certificate the server presents; looked up per connection so rotation takes effect for
/// every new connection while established ones keep theirs.
pub trait ServerCertificate: Send + Sync + 'static {
    fn server_certificate(&self) -> BoxFuture<'_, Result<Arc<WorkloadCertificate>, CertError>>;
}

impl ServerCertificate for Arc<WorkloadCertificate> {
    fn server_certificate(&self) -> BoxFuture<'_, Result<Arc<WorkloadCertificate>, CertError>> {
        let cert = self.clone();
        Box::pin(async move { Ok(cert) })
    }
}

/// A certificate manager serving one identity.
#[derive(Debug, Clone)]
pub struct ManagedCertificate {
    pub manager: crate::cert_manager::CertManager,
    pub identity: Identity,
}

impl ServerCertificate for ManagedCertificate {
    fn server_certificate(&self) -> BoxFuture<'_, Result<Arc<WorkloadCertificate>, CertError>> {
        Box::pin(self.manager.fetch_certificate(&self.identity))
    }
}

/// One `CONNECT` the server accepted at the HTTP/2 level, waiting for the caller's decision.
pub struct InboundTunnel {
    /// The identity the client proved with its certificate.
    pub peer_identity: Identity,
    /// The TCP source of the HBONE connection (a ztunnel or waypoint, not the original client).
    pub peer_addr: SocketAddr,
    /// Where the client wants its bytes to go.
    pub authority: HboneAuthority,
    pub headers: HeaderMap,
    /// How the HBONE connection is protected.
    pub tls: Arc<TlsSummary>,
    respond: h2::server::SendResponse<Bytes>,
    recv: h2::RecvStream,
    queue: Arc<SendQueue>,
}

impl std::fmt::Debug for InboundTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundTunnel")
            .field("peer_identity", &self.peer_identity)
            .field("peer_addr", &self.peer_addr)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl InboundTunnel {
    /// Answers 200 and returns the tunnel. Call only once the upstream is connected and the
    /// request authorised.
    pub fn accept(self) -> Result<H2Stream, h2::Error> {
        self.accept_with_headers(HeaderMap::new())
    }

    /// [`Self::accept`], with `headers` on the 200 (ztunnel: the destination's `baggage`, as
    /// Istio's ztunnel answers).
    pub fn accept_with_headers(mut self, headers: HeaderMap) -> Result<H2Stream, h2::Error> {
        let mut response = status_response(StatusCode::OK);
        *response.headers_mut() = headers;
        let send = self.respond.send_response(response, false)?;
        Ok(H2Stream::new(send, self.recv, self.queue, None))
    }

    /// Answers `status` (400, 401, 503, ...) and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        if let Err(e) = self.respond.send_response(status_response(status), true) {
            tracing::debug!(error = %e, %status, "could not send HBONE rejection");
        }
    }

    /// The original client: the `forwarded` address when the peer is entitled to relay one
    /// (`peer_relays`: a waypoint or gateway of this mesh, by its verified identity), else the
    /// connection's peer address (see [`super::client_address`]).
    pub fn client_address(&self, peer_relays: impl FnOnce() -> bool) -> SocketAddr {
        super::client_address(self.peer_addr, &self.headers, peer_relays)
    }
}

/// The negotiated TLS parameters of an HBONE connection, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsSummary {
    /// For example `TLSv1_3`.
    pub protocol: String,
    /// For example `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("HBONE: cannot listen on {addr}: {source} (is the port in use?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Open connections per peer IP, for [`ServerConfig::max_connections_per_peer`].
#[derive(Debug, Default)]
struct PeerConnections(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One open connection of a peer; counted until dropped.
struct PeerSlot {
    peers: Arc<PeerConnections>,
    ip: std::net::IpAddr,
}

impl PeerConnections {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        // Single inserts and removes: a panic elsewhere cannot leave the map inconsistent.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for `ip`, or `None` when it already has `limit` connections open.
    fn enter(self: &Arc<Self>, ip: std::net::IpAddr, limit: usize) -> Option<PeerSlot> {
        let mut open = self.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A bound HBONE listener.
pub struct HboneServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: Arc<ServerConfig>,
    cert: Arc<dyn ServerCertificate>,
    peers: Arc<PeerConnections>,
}

impl std::fmt::Debug for HboneServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl HboneServer {
    pub async fn bind(
        addr: SocketAddr,
        config: ServerConfig,
        cert: Arc<dyn ServerCertificate>,
    ) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Self::from_listener(listener, config, cert)
    }

    /// Serves on an already bound listener (for example one opened inside a pod's netns).
    pub fn from_listener(
        listener: TcpListener,
        config: ServerConfig,
        cert: Arc<dyn ServerCertificate>,
    ) -> Result<Self, ServerError> {
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        Ok(Self {
            listener,
            local_addr,
            config: Arc::new(config),
            cert,
            peers: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until `shutdown` is cancelled, then asks every connection to finish
    /// its tunnels (HTTP/2 GOAWAY) and returns. `handler` is called once per tunnel request.
    pub async fn run<F, Fut>(self, shutdown: CancellationToken, handler: F)
    where
        F: Fn(InboundTunnel) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Accept errors (EMFILE and friends) back off instead of spinning.
        let mut acceptor = crate::accept::Acceptor::new(self.listener, "hbone");
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = acceptor.accept() => accepted,
            };
            let span = tracing::debug_span!("hbone_conn", %peer, local = %self.local_addr);
            let conn = Connection {
                tcp,
                peer,
                config: self.config.clone(),
                cert: self.cert.clone(),
                shutdown: shutdown.clone(),
                peers: self.peers.clone(),
            };
            let handler = handler.clone();
            tokio::spawn(
                async move {
                    if let Err(reason) = conn.serve(handler).await {
                        tracing::info!(%peer, %reason, "HBONE connection closed");
                    }
                }
                .instrument(span),
            );
        }
    }
}

struct Connection {
    tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    cert: Arc<dyn ServerCertificate>,
    shutdown: CancellationToken,
    peers: Arc<PeerConnections>,
}

impl Connection {
    async fn serve<F, Fut>(self, handler: F) -> Result<(), String>
    where
        F: Fn(InboundTunnel) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Connection {
            tcp,
            peer,
            config,
            cert,
            shutdown,
            peers,
        } = self;
        let limit = config.max_connections_per_peer;
        let Some(_slot) = peers.enter(peer.ip(), limit) else {
            return Err(format!(
                "refused: {} already has {limit} HBONE connections open to this listener \
                 (HBONE_MAX_CONNECTIONS_PER_PEER)",
                peer.ip()
            ));
        };
        let _ = tcp.set_nodelay(true);
        // Without a certificate there is nothing to serve: the connection is closed before TLS,
        // and the operator is told why (the CA's error), not left with a silent hang.
        let cert = match tokio::time::timeout(config.certificate_timeout, cert.server_certificate())
            .await
        {
            Ok(Ok(cert)) => cert,
            Ok(Err(error)) => {
                tracing::warn!(%peer, %error, "HBONE connection closed: no certificate to present");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(
                    %peer,
                    after = ?config.certificate_timeout,
                    "HBONE connection closed: no certificate to present yet (the CA has not \
                     answered; the certificates view shows its error)"
                );
                return Ok(());
            }
        };
        let timeout = config.handshake_timeout;
        let handshake = async {
            let mut tls = tokio_rustls::TlsAcceptor::from(cert.server_config())
                .accept(super::batch_read::BatchedRead::new(tcp))
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(super::TLS_WRITE_BUFFER));
            let queue = SendQueue::new(CONNECTION_SEND_QUEUE, ProcessSendQueue::global());
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first().cloned())
                .ok_or("client presented no certificate")?;
            let peer_identity = crate::tls::peer_identity(&leaf).map_err(|e| e.to_string())?;
            let conn = tls.get_ref().1;
            let summary = Arc::new(TlsSummary {
                protocol: conn
                    .protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default(),
                cipher_suite: conn
                    .negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()))
                    .unwrap_or_default(),
            });
            let h2 = h2::server::Builder::new()
                .initial_window_size(config.h2.stream_window)
                .initial_connection_window_size(config.h2.connection_window)
                .max_frame_size(config.h2.max_frame_size)
                .max_header_list_size(config.h2.max_header_list_size)
                .max_concurrent_streams(config.max_concurrent_streams)
                .max_send_buffer_size(config.h2.stream_send_buffer as usize)
                .handshake::<_, Bytes>(Counted::new(tls, queue.clone()))
                .await
                .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
            Ok::<_, String>((peer_identity, summary, h2, queue))
        };
        let (peer_identity, tls_summary, mut h2, queue) = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| format!("handshake did not finish within {timeout:?}"))??;
        tracing::debug!(%peer_identity, "HBONE connection established");

        let mut draining = false;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    h2.graceful_shutdown();
                    continue;
                }
                next = h2.accept() => next,
            };
            let (request, respond) = match next {
                Some(Ok(r)) => r,
                Some(Err(e)) if e.is_go_away() || e.is_io() => return Ok(()),
                Some(Err(e)) => return Err(format!("HTTP/2 error from {peer_identity}: {e}")),
                None => return Ok(()),
            };
            match validate(&request) {
                Ok(authority) => {
                    let (parts, recv) = request.into_parts();
                    let tunnel = InboundTunnel {
                        peer_identity: peer_identity.clone(),
                        peer_addr: peer,
                        authority,
                        headers: parts.headers,
                        tls: tls_summary.clone(),
                        respond,
                        recv,
                        queue: queue.clone(),
                    };
                    tokio::spawn(handler(tunnel).in_current_span());
                }
                Err(why) => {
                    tracing::info!(
                        %peer_identity,
                        method = %request.method(),
                        uri = %request.uri(),
                        %why,
                        "HBONE request refused with 400"
                    );
                    let mut respond = respond;
                    let _ = respond.send_response(status_response(StatusCode::BAD_REQUEST), true);
                }
            }
        }
    }
}

/// Checks the request is an HBONE `CONNECT` to `ip:port`.
pub(crate) fn validate<B>(request: &Request<B>) -> Result<HboneAuthority, String> {
    if request.method() != Method::CONNECT {
        return Err(format!("method {} is not CONNECT", request.method()));
    }
    let authority = request
        .uri()
        .authority()
        .ok_or_else(|| "no :authority".to_owned())?;
    authority
        .as_str()
        .parse::<SocketAddr>()
        .map(HboneAuthority)
        .map_err(|_| format!(":authority {authority:?} is not ip:port"))
}
