//! What a route does to a request and its response, as pure functions: path and authority
//! rewrites, header edits, redirects, direct responses, fault injection and mirroring decisions.
//!
//! Semantics are those of the Envoy configuration Istio generates: `rewrite.uri` is Envoy's
//! `prefix_rewrite`, `uriRegexRewrite` its `regex_rewrite`, redirects its `RedirectAction`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, LOCATION};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use mesh::model::{
    AbortStatus, DirectResponse, Fault, HeaderEdits, HttpMatch, Mirror, Redirect, RedirectPort,
    ValueMatch,
};

use super::grpc;
use super::matcher::{RequestView, split_path};

/// The body Envoy's fault filter answers aborted requests with.
pub const FAULT_ABORT_MESSAGE: &str = "fault filter abort";

/// A rewrite produced something that cannot be sent. The VirtualService's `rewrite` (or a
/// header edit of `host`/`:authority`) is what to check.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("rewritten request target {path:?} is not valid ({why}): check the route's rewrite")]
    InvalidPath { path: String, why: String },
    #[error("rewritten authority {authority:?} is not valid ({why}): check the route's rewrite")]
    InvalidAuthority { authority: String, why: String },
}

/// `rewrite.uri` (Envoy's `prefix_rewrite`): replaces the part of the path the route's `uri`
/// condition matched (the prefix for a prefix match, the whole path for exact and regex
/// matches, `/` when the match has no `uri` condition), keeping the rest of the path and the
/// query string.
pub fn rewrite_path(
    path_and_query: &str,
    replacement: &str,
    matched: Option<&HttpMatch>,
) -> String {
    let (path, _) = split_path(path_and_query);
    let uri = matched.and_then(|m| m.uri.as_ref());
    let matched_len = match uri {
        Some(ValueMatch::Prefix(p)) => p.len(),
        Some(ValueMatch::PathPrefix(p)) => super::matcher::path_prefix_len(p, path).unwrap_or(0),
        Some(ValueMatch::Exact(_) | ValueMatch::Regex(_)) => path.len(),
        // Istio's route has `prefix: /` when there is no uri condition.
        None => usize::from(path.starts_with('/')),
    };
    let rest = path_and_query.get(matched_len..).unwrap_or("");
    if !matches!(uri, Some(ValueMatch::PathPrefix(_))) {
        return format!("{replacement}{rest}");
    }
    // Gateway API `ReplacePrefixMatch`: whole path elements; a trailing `/` of the replacement
    // is not doubled and an empty result is `/`.
    let joined = format!("{}{rest}", replacement.trim_end_matches('/'));
    if joined.is_empty() || joined.starts_with(['?', '#']) {
        format!("/{joined}")
    } else {
        joined
    }
}

/// `uriRegexRewrite` (Envoy's `regex_rewrite`): every match of `regex` in the path (query
/// excluded) is replaced by `substitution`, given in the regex crate's syntax (see
/// [`translate_substitution`]); the query string is kept.
pub fn regex_rewrite_path(
    path_and_query: &str,
    regex: &regex::Regex,
    substitution: &str,
) -> String {
    let (path, rest) = split_path(path_and_query);
    let mut out = regex.replace_all(path, substitution).into_owned();
    out.push_str(rest);
    out
}

/// An RE2 rewrite string (`\1` group references, `\\` a backslash), as Istio's
/// `uriRegexRewrite.rewrite` takes it, in the regex crate's syntax (`${1}`, `$$`).
pub fn translate_substitution(re2: &str) -> String {
    let mut out = String::with_capacity(re2.len() + 4);
    let mut chars = re2.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    out.push_str("${");
                    out.push(d);
                    out.push('}');
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            other => out.push(other),
        }
    }
    out
}

/// Replaces the request's path and query, keeping scheme and authority.
pub fn set_path_and_query(
    parts: &mut http::request::Parts,
    path_and_query: &str,
) -> Result<(), FilterError> {
    let invalid = |why: String| FilterError::InvalidPath {
        path: path_and_query.to_owned(),
        why,
    };
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|e| invalid(format!("{e}")))?,
    );
    parts.uri = Uri::from_parts(uri).map_err(|e| invalid(format!("{e}")))?;
    Ok(())
}

/// Sets the request's authority: in the URI when it carries one (HTTP/2, absolute form), and
/// in `Host` when the request has that header or no URI authority.
pub fn set_authority(parts: &mut http::request::Parts, authority: &str) -> Result<(), FilterError> {
    let invalid = |why: String| FilterError::InvalidAuthority {
        authority: authority.to_owned(),
        why,
    };
    let value = HeaderValue::from_str(authority).map_err(|e| invalid(format!("{e}")))?;
    if parts.uri.authority().is_some() {
        let mut uri = parts.uri.clone().into_parts();
        uri.authority = Some(authority.parse().map_err(|e| invalid(format!("{e}")))?);
        parts.uri = Uri::from_parts(uri).map_err(|e| invalid(format!("{e}")))?;
        if parts.headers.contains_key(HOST) {
            parts.headers.insert(HOST, value);
        }
    } else {
        parts.headers.insert(HOST, value);
    }
    Ok(())
}

/// Applies header edits in Envoy's order: the `remove`s of every layer first, then each layer's
/// `set` (replace) and `add` (append), in order. Pass the route's edits then the destination's.
/// Pseudo-headers and `host` are not edited here: Istio turns a `host`/`:authority` edit into
/// an authority rewrite ([`edited_authority`]). Names or values that are not valid HTTP are
/// skipped.
pub fn apply_header_edits(headers: &mut HeaderMap, layers: &[&HeaderEdits]) {
    for edits in layers {
        for name in &edits.remove {
            if !is_internal_header(name) {
                headers.remove(name.as_str());
            }
        }
    }
    for edits in layers {
        for (name, value) in &edits.set {
            if let Some((name, value)) = header_pair(name, value) {
                headers.insert(name, value);
            }
        }
        for (name, value) in &edits.add {
            if let Some((name, value)) = header_pair(name, value) {
                headers.append(name, value);
            }
        }
    }
}

/// The authority a layer of header edits sets through `host` or `:authority` (`set` wins over
/// `add`), as Istio turns it into a host rewrite.
pub fn edited_authority(edits: &HeaderEdits) -> Option<&str> {
    fn find(list: &[(String, String)]) -> Option<&str> {
        list.iter()
            .rev()
            .find(|(name, _)| is_authority_header(name))
            .map(|(_, value)| value.as_str())
    }
    find(&edits.set).or_else(|| find(&edits.add))
}

fn is_authority_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority")
}

fn is_internal_header(name: &str) -> bool {
    name.starts_with(':') || name.eq_ignore_ascii_case("host")
}

fn header_pair(name: &str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    if is_internal_header(name) {
        return None;
    }
    Some((
        HeaderName::from_bytes(name.as_bytes()).ok()?,
        HeaderValue::from_str(value).ok()?,
    ))
}

/// The `Location` of a redirect (Envoy's `RedirectAction` as Istio configures it):
/// - scheme: `redirect.scheme`, else the request's;
/// - host: `redirect.authority`, else the request's authority; the request's port is dropped
///   when the redirect sets a port, or when the scheme changes and the port was the old
///   scheme's default;
/// - port: appended when the redirect sets one that is not the scheme's default
///   (`FROM_REQUEST_PORT` uses the service port the request came on, `FROM_PROTOCOL_DEFAULT`
///   none);
/// - path: `redirect.uri`, else the request's; the request's query string is kept unless the
///   new uri carries its own.
pub fn redirect_location(redirect: &Redirect, request: &RequestView<'_>) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(request.scheme);
    let port = match redirect.port {
        None => None,
        Some(RedirectPort::FromProtocolDefault) => Some(None),
        Some(RedirectPort::Number(p)) => Some(Some(p)),
        Some(RedirectPort::FromRequestPort) => Some(Some(request.port)),
    };
    let host = match redirect.authority.as_deref() {
        Some(authority) => authority,
        None => {
            let (host, request_port) = split_host_port(request.authority);
            let drop_port = match request_port {
                None => false,
                Some(_) if port.is_some() => true,
                Some(p) => scheme != request.scheme && Some(p) == default_port(request.scheme),
            };
            if drop_port { host } else { request.authority }
        }
    };
    let port = port
        .flatten()
        .filter(|p| Some(*p) != default_port(scheme))
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = match redirect.uri.as_deref() {
        Some(uri) if uri.contains('?') => uri.to_owned(),
        Some(uri) => {
            let (_, rest) = split_path(request.path_and_query);
            let query = rest.find('?').map_or("", |i| &rest[i..]);
            format!("{uri}{query}")
        }
        None => request.path_and_query.to_owned(),
    };
    let slash = if path.starts_with('/') { "" } else { "/" };
    format!("{scheme}://{host}{port}{slash}{path}")
}

/// The redirect answer: `redirect.code` (301 by default) with `Location`, no body.
pub fn redirect_response(redirect: &Redirect, request: &RequestView<'_>) -> http::Response<Bytes> {
    let mut response = http::Response::new(Bytes::new());
    *response.status_mut() =
        StatusCode::from_u16(redirect.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(location) = HeaderValue::try_from(redirect_location(redirect, request)) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

/// `directResponse`: the status and body, `text/plain` when there is a body (as Envoy's local
/// replies).
pub fn direct_response(direct: &DirectResponse) -> http::Response<Bytes> {
    let body = direct.body.clone().unwrap_or_default();
    let mut response = http::Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(direct.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !response.body().is_empty() {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
}

/// What the fault filter does to one request: wait `delay` first, then answer `abort` instead
/// of forwarding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultDecision {
    pub delay: Option<Duration>,
    pub abort: Option<AbortStatus>,
}

/// Rolls the route's fault percentages; delay and abort are decided independently, as Envoy's
/// fault filter does.
pub fn decide_fault(fault: &Fault, rng: &mut fastrand::Rng) -> FaultDecision {
    FaultDecision {
        delay: fault
            .delay
            .as_ref()
            .filter(|d| roll_percent(d.percentage, rng))
            .map(|d| d.delay),
        abort: fault
            .abort
            .as_ref()
            .filter(|a| roll_percent(a.percentage, rng))
            .map(|a| a.status.clone()),
    }
}

/// The answer to an aborted request. An HTTP status goes out as such (for a gRPC request, as a
/// trailers-only response with the matching gRPC status, as Envoy's local replies); a gRPC
/// status goes out as a trailers-only response (HTTP 200).
pub fn abort_response(status: &AbortStatus, grpc_request: bool) -> http::Response<Bytes> {
    match status {
        AbortStatus::Http(code) => grpc::local_reply(
            StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            FAULT_ABORT_MESSAGE,
            grpc_request,
        ),
        AbortStatus::Grpc(code) => grpc::trailers_only(*code, FAULT_ABORT_MESSAGE),
    }
}

/// Whether this request is copied to the mirror, by its percentage.
pub fn should_mirror(mirror: &Mirror, rng: &mut fastrand::Rng) -> bool {
    roll_percent(mirror.percentage, rng)
}

/// True with probability `percent`/100 (0 never draws true, 100 always).
pub fn roll_percent(percent: f64, rng: &mut fastrand::Rng) -> bool {
    if percent >= 100.0 {
        true
    } else if percent > 0.0 {
        rng.f64() * 100.0 < percent
    } else {
        false
    }
}

/// `host:port` -> (`host`, `port`); handles `[v6]:port`.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    let colon = if authority.starts_with('[') {
        authority.rfind("]:").map(|i| i + 1)
    } else {
        authority.rfind(':')
    };
    match colon {
        Some(i) => match authority[i + 1..].parse() {
            Ok(port) => (&authority[..i], Some(port)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}
