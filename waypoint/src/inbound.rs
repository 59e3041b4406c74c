//! The HBONE front door: tunnels from ztunnels arrive here, one per client connection, with
//! the service `VIP:port` as `:authority`. This module checks the tunnel (a service VIP bound to
//! this waypoint, a port it has), works out who the client is ([`Downstream`]) and how its bytes
//! are read: HTTP (HTTP/1.1 or HTTP/2 with prior knowledge, served by hyper, each request handed
//! to [`Engine::http`]) or opaque TCP ([`Engine::tcp`]). Everything after that is the engine's.
//!
//! Protocol selection follows Istio: the port's `appProtocol` or name prefix (`http`, `http2`,
//! `grpc` -> HTTP; `tcp`, `tls`, `https`, `mongo`, `redis`... -> TCP); an undeclared port is
//! sniffed from the client's first bytes (an HTTP/1 method and a space, or the HTTP/2
//! preface), which means a server-first protocol must declare its port.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use mesh::discovery::Store;
use mesh::hbone::{H2Stream, InboundTunnel};
use mesh::model::{ServicePort, WaypointRef};
use tokio::io::AsyncReadExt;

use crate::engine::{Downstream, Engine};
use crate::live::Live;
use crate::request::SourceInfo;
use crate::rewind::Rewind;

use crate::http_front::HEADER_READ_TIMEOUT;

/// The HBONE listener's view of the waypoint.
#[derive(Debug)]
pub struct Inbound {
    pub engine: Arc<Engine>,
    pub store: Store,
    /// This waypoint: a tunnel to a service bound to another is refused.
    pub waypoint: WaypointRef,
    /// `None`: wait for an undeclared port's first bytes for ever.
    pub protocol_detection_timeout: Option<Duration>,
    pub live: Arc<Live>,
}

/// How the tunnel's bytes are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
    /// Undeclared: sniff.
    Detect,
}

/// Istio's protocol selection from the port's declared protocol.
pub fn declared_protocol(port: &ServicePort) -> Protocol {
    match port.app_protocol.as_deref() {
        None => Protocol::Detect,
        Some("http" | "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c") => {
            Protocol::Http
        }
        Some(_) => Protocol::Tcp,
    }
}

const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Sniffs `prefix`: `Some(true)` HTTP, `Some(false)` not HTTP, `None` need more bytes.
pub fn sniff(prefix: &[u8]) -> Option<bool> {
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(true);
    }
    let mut undecided = false;
    for method in HTTP1_METHODS {
        let want = method.len() + 1;
        let n = prefix.len().min(want);
        let mut expected = method.to_vec();
        expected.push(b' ');
        if prefix[..n] == expected[..n] {
            if n == want {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

/// Handles one HBONE tunnel request.
pub async fn tunnel(inbound: Arc<Inbound>, tunnel: InboundTunnel) {
    let state = inbound.store.snapshot();
    let vip = tunnel.authority.0;
    let Some(service) = state.service_by_vip(vip.ip()).cloned() else {
        tracing::warn!(authority = %vip, peer = %tunnel.peer_identity, "refused: the authority is not a service VIP (400)");
        tunnel.reject(StatusCode::BAD_REQUEST);
        return;
    };
    if service.waypoint.as_ref() != Some(&inbound.waypoint) {
        tracing::warn!(
            service = %service.key(),
            waypoint = %inbound.waypoint,
            uses = ?service.waypoint.as_ref().map(ToString::to_string),
            "refused: the service is not bound to this waypoint (check its istio.io/use-waypoint label) (503)"
        );
        tunnel.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    }
    let Some(port) = service.ports.iter().find(|p| p.port == vip.port()).cloned() else {
        tracing::warn!(service = %service.key(), port = vip.port(), "refused: the service has no such port (400)");
        tunnel.reject(StatusCode::BAD_REQUEST);
        return;
    };
    // The client is the tunnel's peer: a ztunnel dials from its client pod's IP. No proxy
    // relays other clients to a waypoint yet, so `forwarded` is never taken on trust here (a
    // workload with its own certificate could claim any address and slip past `ipBlocks`).
    let ip = Some(tunnel.client_address(|| false).ip());
    let source = SourceInfo::new(
        Some(tunnel.peer_identity.clone()),
        ip,
        ip.and_then(|ip| state.workload_by_ip(ip).cloned()),
    );
    let downstream = Arc::new(Downstream {
        service,
        port,
        vip,
        source,
        peer_addr: tunnel.peer_addr,
        mutual_tls: true,
        scope: None,
        sni: None,
    });
    let stream = match tunnel.accept() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "tunnel closed before it was accepted");
            return;
        }
    };
    let _live = inbound.live.enter();
    let engine = inbound.engine.clone();
    match declared_protocol(&downstream.port) {
        Protocol::Http => match first_bytes(stream, HEADER_READ_TIMEOUT).await {
            Ok(io) => serve_http(engine, downstream, io).await,
            Err(e) => tracing::debug!(error = %e, "tunnel closed before its first request"),
        },
        Protocol::Tcp => {
            engine
                .tcp(&downstream, Rewind::new(Bytes::new(), stream))
                .await
        }
        Protocol::Detect => match detect(stream, inbound.protocol_detection_timeout).await {
            Ok((true, io)) => serve_http(engine, downstream, io).await,
            Ok((false, io)) => engine.tcp(&downstream, io).await,
            Err(e) => tracing::debug!(error = %e, "tunnel ended before its protocol was known"),
        },
    }
}

/// Reads until the first bytes say whether this is HTTP; the bytes read are replayed.
async fn detect(
    mut stream: H2Stream,
    timeout: Option<Duration>,
) -> io::Result<(bool, Rewind<H2Stream>)> {
    let mut buf = BytesMut::with_capacity(64);
    let read = async {
        loop {
            if stream.read_buf(&mut buf).await? == 0 {
                // The client closed before deciding: treat what it sent as TCP.
                return Ok::<bool, io::Error>(false);
            }
            if let Some(http) = sniff(&buf) {
                return Ok(http);
            }
        }
    };
    let is_http = match timeout {
        None => read.await?,
        Some(t) => tokio::time::timeout(t, read).await.unwrap_or(Ok(false))?,
    };
    Ok((is_http, Rewind::new(buf.freeze(), stream)))
}

/// Waits at most `limit` for a declared-HTTP tunnel's first bytes, until they tell HTTP/1 from
/// HTTP/2 (see [`sniff`]); the bytes read are replayed. hyper's header read timeout only runs
/// once HTTP/1 is chosen, so without this a client that connects and sends nothing would hold
/// its tunnel forever, where one that stalls in its request head is closed after `limit`.
async fn first_bytes(mut stream: H2Stream, limit: Duration) -> io::Result<Rewind<H2Stream>> {
    let mut buf = BytesMut::with_capacity(64);
    let read = async {
        // On EOF, hyper sees what there is (nothing: a quiet close; half a head: an error).
        while stream.read_buf(&mut buf).await? > 0 && sniff(&buf).is_none() {}
        Ok::<(), io::Error>(())
    };
    tokio::time::timeout(limit, read).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no request within {limit:?} (header read timeout)"),
        )
    })??;
    Ok(Rewind::new(buf.freeze(), stream))
}

async fn serve_http(engine: Arc<Engine>, downstream: Arc<Downstream>, io: Rewind<H2Stream>) {
    crate::http_front::serve_http(engine, downstream, io, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(sniff(b"GE"), None);
        assert_eq!(sniff(b"POST "), Some(true));
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(true));
        assert_eq!(sniff(b"PRI * HTTP/2"), None);
        assert_eq!(sniff(b"\x16\x03\x01"), Some(false));
        assert_eq!(sniff(b"GETX"), Some(false));
        assert_eq!(sniff(b"hello"), Some(false));
    }
}
