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

use super::stream::H2Stream;
use super::{DEFAULT_HANDSHAKE_TIMEOUT, H2Settings, HboneAuthority};
use crate::cert_manager::CertError;
use crate::identity::Identity;
use crate::tls::WorkloadCertificate;

/// Server tuning.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerConfig {
    pub h2: H2Settings,
    pub handshake_timeout: Duration,
    /// Concurrent tunnels one client connection may carry.
    pub max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            h2: H2Settings::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_concurrent_streams: 1000,
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
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self
            .respond
            .send_response(status_response(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, self.recv, None))
    }

    /// Answers `status` (400, 401, 503, ...) and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        if let Err(e) = self.respond.send_response(status_response(status), true) {
            tracing::debug!(error = %e, %status, "could not send HBONE rejection");
        }
    }

    /// The original client's address from the `forwarded` header, if present.
    pub fn forwarded_for(&self) -> Option<std::net::IpAddr> {
        super::forwarded_for(&self.headers)
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

/// A bound HBONE listener.
pub struct HboneServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: Arc<ServerConfig>,
    cert: Arc<dyn ServerCertificate>,
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
        } = self;
        let _ = tcp.set_nodelay(true);
        let timeout = config.handshake_timeout;
        let handshake = async {
            let cert = cert
                .server_certificate()
                .await
                .map_err(|e| format!("no certificate to present: {e}"))?;
            let mut tls = tokio_rustls::TlsAcceptor::from(cert.server_config())
                .accept(super::batch_read::BatchedRead::new(tcp))
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(super::TLS_WRITE_BUFFER));
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
                .max_send_buffer_size(config.h2.stream_window as usize)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
            Ok::<_, String>((peer_identity, summary, h2))
        };
        let (peer_identity, tls_summary, mut h2) = tokio::time::timeout(timeout, handshake)
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
fn validate(request: &Request<h2::RecvStream>) -> Result<HboneAuthority, String> {
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
