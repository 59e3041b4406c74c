//! Header and URI edits of a forwarded request (hop-by-hop headers, authority, the upstream's
//! URI form, `x-forwarded-proto` and `x-request-id`).

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, Version};

use crate::upstream::UpstreamProtocol;

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), except that `te: trailers`
/// is kept for HTTP/2 (gRPC needs it) and upgrades keep `connection`/`upgrade`.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// The request's authority: `:authority` (HTTP/2) or `Host`.
pub fn authority_of(parts: &http::request::Parts) -> String {
    authority(&parts.uri, &parts.headers)
}

pub(super) fn authority(uri: &http::Uri, headers: &HeaderMap) -> String {
    uri.authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// Origin-form plus `Host` for HTTP/1.1, absolute form for HTTP/2 (hyper derives
/// `:authority` from it).
pub(super) fn set_uri_for(
    parts: &mut http::request::Parts,
    protocol: UpstreamProtocol,
    authority: &str,
) {
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let uri = match protocol {
        UpstreamProtocol::Http1 => path.parse(),
        UpstreamProtocol::Http2 => format!("http://{authority}{path}").parse(),
    };
    if let Ok(uri) = uri {
        parts.uri = uri;
    }
    match protocol {
        UpstreamProtocol::Http1 => {
            parts.version = Version::HTTP_11;
            if let Ok(host) = HeaderValue::from_str(authority) {
                parts.headers.insert(header::HOST, host);
            }
        }
        UpstreamProtocol::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
    }
}

pub(super) fn prepare_upstream_headers(parts: &mut http::request::Parts, upgrade: bool) {
    let upgrade_value = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if upgrade && let Some(value) = upgrade_value {
        parts.headers.insert(header::UPGRADE, value);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // A front door that knows better (the ingress, for HTTPS) has set it already.
    if !parts.headers.contains_key("x-forwarded-proto") {
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:032x}", fastrand::u128(..));
        if let Ok(v) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", v);
        }
    }
}

/// `Upgrade: h2c` (what `curl --http2` sends on `http://`) is not an upgrade the waypoint
/// performs: as Envoy, it drops the upgrade headers and serves the request over HTTP/1.1.
pub(super) fn strip_h2c_upgrade(headers: &mut HeaderMap) {
    let h2c = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("h2c"));
    if h2c {
        headers.remove(header::UPGRADE);
        headers.remove("http2-settings");
        headers.remove(header::CONNECTION);
    }
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the `connection` header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let keep_te = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

pub(super) fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers.clone();
    }
    let (mut cloned, ()) = builder.body(()).unwrap_or_default().into_parts();
    cloned.headers = parts.headers.clone();
    cloned
}

pub(super) fn clone_response_parts(parts: &http::response::Parts) -> http::response::Parts {
    let (mut cloned, ()) = Response::new(()).into_parts();
    cloned.status = parts.status;
    cloned.version = parts.version;
    cloned.headers = parts.headers.clone();
    cloned
}

pub(super) fn is_empty_request(parts: &http::request::Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v == "0")
}
