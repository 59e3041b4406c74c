//! What every front door does to serve HTTP on an accepted connection: hyper's server
//! (HTTP/1.1, and HTTP/2 by prior knowledge or ALPN, with upgrades), its limits, and for the
//! ingress the edge's request headers ([`Edge`]); each request then goes to [`Engine::http`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::engine::{Downstream, Engine};

/// How long a client may take to send a request's headers (slowloris protection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (HTTP/1 buffer, HTTP/2 header list); beyond it the client gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The client of an edge proxy (the ingress): where its requests came from and how.
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    /// The connection's peer.
    pub peer: IpAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
}

/// Serves HTTP on `io` until the client closes; every request goes to the engine.
pub async fn serve_http<I>(
    engine: Arc<Engine>,
    downstream: Arc<Downstream>,
    io: I,
    edge: Option<Edge>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(1000);
    let service =
        hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            let engine = engine.clone();
            let downstream = downstream.clone();
            if let Some(edge) = edge {
                edge_headers(request.headers_mut(), edge);
            }
            async move { Ok::<_, std::convert::Infallible>(engine.http(downstream, request).await) }
        });
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Whether Envoy counts `ip` as internal (its default `internal_address_config`: RFC 1918,
/// loopback, IPv6 unique-local and loopback): requests from such clients keep the
/// `x-request-id` and `x-forwarded-proto` they carry and get `x-envoy-internal: true`.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_internal(IpAddr::V4(v4)),
            None => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        },
    }
}

/// The request headers an edge proxy sets, as Envoy at Istio's ingress gateway does
/// (`use_remote_address: true`, no trusted hops; Envoy's "HTTP header manipulation" and
/// `x-forwarded-for` docs):
/// - `x-forwarded-for`: the peer's address appended;
/// - external clients: every `x-envoy-*` header they sent is removed, `x-envoy-external-address`
///   is the peer's address, `x-forwarded-proto` the connection's scheme, and `x-request-id` is
///   replaced by a new one (`preserve_external_request_id` is off);
/// - internal clients (see [`is_internal`]): `x-envoy-internal: true`; their `x-request-id` and
///   `x-forwarded-proto` are kept (set when absent).
pub fn edge_headers(headers: &mut HeaderMap, edge: Edge) {
    let peer = edge.peer.to_string();
    let xff = match headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        previous if previous.is_empty() => peer.clone(),
        previous => format!("{}, {peer}", previous.join(", ")),
    };
    headers.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    let scheme = HeaderValue::from_static(edge.scheme);
    if is_internal(edge.peer) {
        headers.insert("x-envoy-internal", HeaderValue::from_static("true"));
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert("x-forwarded-proto", scheme);
        }
    } else {
        let envoy: Vec<http::HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-envoy-"))
            .cloned()
            .collect();
        for name in envoy {
            headers.remove(name);
        }
        if let Ok(v) = HeaderValue::from_str(&peer) {
            headers.insert("x-envoy-external-address", v);
        }
        headers.insert("x-forwarded-proto", scheme);
        // The engine makes a fresh one where there is none.
        headers.remove("x-request-id");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_external_client_gets_envoys_edge_headers() {
        let mut h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-request-id", "mine"),
            ("x-forwarded-proto", "http"),
            ("x-envoy-internal", "true"),
            ("x-envoy-upstream-rq-timeout-ms", "1"),
        ]);
        let edge = Edge {
            peer: "203.0.113.7".parse().unwrap(),
            scheme: "https",
        };
        edge_headers(&mut h, edge);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 203.0.113.7");
        assert_eq!(h["x-envoy-external-address"], "203.0.113.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(!h.contains_key("x-request-id"));
        assert!(!h.contains_key("x-envoy-internal"));
        assert!(!h.contains_key("x-envoy-upstream-rq-timeout-ms"));
    }

    #[test]
    fn an_internal_client_keeps_its_request_id_and_proto() {
        let mut h = headers(&[("x-request-id", "mine"), ("x-forwarded-proto", "https")]);
        let edge = Edge {
            peer: "10.0.0.5".parse().unwrap(),
            scheme: "http",
        };
        edge_headers(&mut h, edge);
        assert_eq!(h["x-forwarded-for"], "10.0.0.5");
        assert_eq!(h["x-request-id"], "mine");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-envoy-internal"], "true");
        assert!(!h.contains_key("x-envoy-external-address"));
        let mut h = HeaderMap::new();
        edge_headers(&mut h, edge);
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn internal_addresses_are_envoys_defaults() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "203.0.113.1", "2001:db8::1", "100.64.0.1"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }
}
