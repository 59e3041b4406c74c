//! gRPC helpers: recognising a gRPC request and answering one locally.
//!
//! A proxy answers a gRPC client with a trailers-only response (HTTP 200, `grpc-status` and
//! `grpc-message` in the headers, no body), never with a bare HTTP error, which gRPC clients
//! report as an opaque protocol failure.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, StatusCode};

pub const GRPC_STATUS: &str = "grpc-status";
pub const GRPC_MESSAGE: &str = "grpc-message";

/// gRPC status codes (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
pub mod code {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const NOT_FOUND: u32 = 5;
    pub const ALREADY_EXISTS: u32 = 6;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const FAILED_PRECONDITION: u32 = 9;
    pub const ABORTED: u32 = 10;
    pub const OUT_OF_RANGE: u32 = 11;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const DATA_LOSS: u32 = 15;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// `content-type: application/grpc` or `application/grpc+<codec>` (Envoy's test; gRPC-Web's
/// `application/grpc-web*` is a different protocol).
pub fn is_grpc_request(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'))
}

/// The `grpc-status` of response headers (a trailers-only response carries it there) or
/// trailers.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// The gRPC status for an HTTP status, as gRPC specifies and Envoy applies to its local replies.
pub fn http_to_grpc_status(status: u16) -> u32 {
    match status {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// A trailers-only gRPC response: HTTP 200, `content-type: application/grpc`, `grpc-status`
/// and, when not empty, the percent-encoded `grpc-message`.
pub fn trailers_only(status: u32, message: &str) -> http::Response<Bytes> {
    let mut response = http::Response::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(status));
    if !message.is_empty()
        && let Ok(value) = HeaderValue::try_from(encode_grpc_message(message))
    {
        headers.insert(GRPC_MESSAGE, value);
    }
    response
}

/// A locally generated error: for a gRPC request a trailers-only response with the gRPC status
/// matching `status`, else `status` with `message` as a `text/plain` body.
pub fn local_reply(status: StatusCode, message: &str, grpc_request: bool) -> http::Response<Bytes> {
    if grpc_request {
        return trailers_only(http_to_grpc_status(status.as_u16()), message);
    }
    let mut response = http::Response::new(Bytes::copy_from_slice(message.as_bytes()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
pub fn encode_grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
