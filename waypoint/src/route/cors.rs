//! CORS for a route's `corsPolicy`, as Envoy's CORS filter applies it.
//!
//! A request with a non-empty `Origin` is a CORS request. A preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) from an allowed origin is answered by the proxy (200, not
//! forwarded); from a disallowed origin it is forwarded untouched (Istio's default
//! `unmatchedPreflights: FORWARD`). Other responses to an allowed origin get
//! `access-control-allow-origin` (the origin echoed), `-allow-credentials` and
//! `-expose-headers`; a disallowed origin gets no CORS headers.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, HeaderName, ORIGIN,
};
use http::{HeaderMap, HeaderValue, Method};
use mesh::model::CorsPolicy;

use super::matcher::value_matches;

/// Whether `origin` is allowed: an `allowOrigins` entry matches it, or matches `*` (so
/// `exact: "*"` allows every origin).
pub fn is_origin_allowed(policy: &CorsPolicy, origin: &str) -> bool {
    policy
        .allow_origins
        .iter()
        .any(|m| value_matches(m, "*") || value_matches(m, origin))
}

/// For a preflight from an allowed origin, the headers of the 200 the proxy answers with
/// instead of forwarding. `None`: not a preflight, or from a disallowed origin; forward it.
pub fn preflight(
    policy: &CorsPolicy,
    request_headers: &HeaderMap,
    method: &Method,
) -> Option<HeaderMap> {
    if method != Method::OPTIONS {
        return None;
    }
    let origin = allowed_origin(policy, request_headers)?;
    let requested_method = request_headers
        .get(ACCESS_CONTROL_REQUEST_METHOD)
        .filter(|v| !v.is_empty())?;

    let mut headers = HeaderMap::new();
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if policy.allow_credentials == Some(true) {
        headers.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    // `*` echoes what the preflight asks for, as Envoy does.
    insert_list_or_echo(
        &mut headers,
        ACCESS_CONTROL_ALLOW_METHODS,
        &policy.allow_methods,
        Some(requested_method),
    );
    insert_list_or_echo(
        &mut headers,
        ACCESS_CONTROL_ALLOW_HEADERS,
        &policy.allow_headers,
        request_headers.get(ACCESS_CONTROL_REQUEST_HEADERS),
    );
    if let Some(max_age) = policy.max_age {
        headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(max_age.as_secs()));
    }
    Some(headers)
}

/// The CORS headers for a (non-preflight) response to a request from an allowed origin;
/// empty otherwise.
pub fn response_headers(policy: &CorsPolicy, request_headers: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let Some(origin) = allowed_origin(policy, request_headers) else {
        return headers;
    };
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if policy.allow_credentials == Some(true) {
        headers.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    insert_list(
        &mut headers,
        ACCESS_CONTROL_EXPOSE_HEADERS,
        &policy.expose_headers,
    );
    headers
}

/// Sets [`response_headers`] on a response (replacing what the upstream sent for them).
pub fn apply_response_headers(
    policy: &CorsPolicy,
    request_headers: &HeaderMap,
    response: &mut HeaderMap,
) {
    let mut name = None;
    for (n, value) in response_headers(policy, request_headers) {
        if let Some(n) = n {
            name = Some(n);
        }
        if let Some(n) = &name {
            response.insert(n.clone(), value);
        }
    }
}

fn allowed_origin<'h>(
    policy: &CorsPolicy,
    request_headers: &'h HeaderMap,
) -> Option<&'h HeaderValue> {
    let origin = request_headers.get(ORIGIN).filter(|v| !v.is_empty())?;
    is_origin_allowed(policy, origin.to_str().ok()?).then_some(origin)
}

/// `list` joined with `,` (nothing when empty).
fn insert_list(headers: &mut HeaderMap, name: HeaderName, list: &[String]) {
    if list.is_empty() {
        return;
    }
    if let Ok(value) = HeaderValue::try_from(list.join(",")) {
        headers.insert(name, value);
    }
}

/// As [`insert_list`], except that `["*"]` echoes `echo` (nothing when the request did not
/// send it).
fn insert_list_or_echo(
    headers: &mut HeaderMap,
    name: HeaderName,
    list: &[String],
    echo: Option<&HeaderValue>,
) {
    match list {
        [star] if star == "*" => {
            if let Some(value) = echo {
                headers.insert(name, value.clone());
            }
        }
        _ => insert_list(headers, name, list),
    }
}
