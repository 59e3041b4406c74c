//! An HBONE request as a peer with a valid certificate can shape it: the pseudo-headers h2
//! hands over (method, authority, scheme and path, built into a request as h2 builds it, so
//! only requests h2 would deliver get through) and any headers, `forwarded` and `baggage`
//! among them. They go through the server's CONNECT validation and the `forwarded` and
//! `baggage` parsers. Beyond not panicking: an accepted authority is the `ip:port` the client
//! wrote; what we send in `forwarded` reads back as the address we put in; `baggage` parses to
//! what its own re-encoding parses to.
//!
//! Input: the header block as text, one a line: `:method CONNECT`, `:authority 10.1.2.3:80`
//! (`:scheme`, `:path` likewise), then `name: value`.
#![no_main]

use std::net::SocketAddr;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use mesh::hbone::{Baggage, client_address, forwarded_for, forwarded_header, headers};

/// The header block as h2 hands it over: pseudo-headers and headers, raw bytes.
#[derive(Debug, Default)]
struct Block<'a> {
    method: Option<&'a [u8]>,
    authority: Option<&'a [u8]>,
    scheme: Option<&'a [u8]>,
    path: Option<&'a [u8]>,
    headers: Vec<(&'a [u8], &'a [u8])>,
}

/// One header a line: `:name value` for a pseudo-header, `name: value` for a header.
fn block(data: &[u8]) -> Block<'_> {
    let mut block = Block::default();
    for line in data.split(|&b| b == b'\n') {
        if let Some(pseudo) = line.strip_prefix(b":") {
            let (name, value) = match pseudo.iter().position(|&b| b == b' ') {
                Some(i) => (&pseudo[..i], &pseudo[i + 1..]),
                None => (pseudo, &[][..]),
            };
            let slot = match name {
                b"method" => &mut block.method,
                b"authority" => &mut block.authority,
                b"scheme" => &mut block.scheme,
                b"path" => &mut block.path,
                _ => continue,
            };
            *slot = Some(value);
        } else if let Some(i) = line.iter().position(|&b| b == b':') {
            let value = &line[i + 1..];
            let value = value.strip_prefix(b" ").unwrap_or(value);
            block.headers.push((&line[..i], value));
        }
    }
    block
}

/// The request h2 delivers for this block, or `None` where h2 refuses the stream as malformed
/// itself (no or a bad method, a bad authority, a scheme without a path).
fn request(block: &Block<'_>) -> Option<Request<()>> {
    let method = Method::from_bytes(block.method?).ok()?;
    let mut parts = http::uri::Parts::default();
    if let Some(authority) = block.authority {
        parts.authority = Some(Authority::try_from(authority).ok()?);
    }
    if let Some(scheme) = block.scheme {
        parts.scheme = Some(Scheme::try_from(scheme).ok()?);
        parts.path_and_query = Some(PathAndQuery::try_from(block.path?).ok()?);
    }
    let uri = Uri::from_parts(parts).ok()?;
    let mut request = Request::builder().method(method).uri(uri).body(()).ok()?;
    for (name, value) in &block.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            request.headers_mut().append(name, value);
        }
    }
    Some(request)
}

/// The DNS characters of `bytes`, as a service hostname in `forwarded: ...;host=`.
fn hostname(bytes: &[u8]) -> Option<String> {
    let host: String = bytes
        .iter()
        .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect();
    (!host.is_empty()).then_some(host)
}

fuzz_target!(|data: &[u8]| {
    let block = block(data);
    let Some(request) = request(&block) else {
        return;
    };
    let accepted = mesh::fuzzing::validate_connect(&request);
    if let Ok(authority) = &accepted {
        assert_eq!(request.method(), Method::CONNECT);
        let written = request.uri().authority().map(Authority::as_str);
        assert_eq!(
            written.and_then(|a| a.parse::<SocketAddr>().ok()),
            Some(authority.0),
            "accepted an authority that is not the ip:port written"
        );
    }
    // Whatever `forwarded` says, a peer that may not relay is the client itself (issue 12
    // item 2: a forged header must never move the source address to another IP).
    let peer: SocketAddr = "10.9.8.7:40000".parse().unwrap();
    let seen = client_address(peer, request.headers(), || false);
    assert_eq!(seen.ip(), peer.ip(), "a non-relay moved the client address: {seen}");
    if let Some(claimed) = forwarded_for(request.headers()).filter(|c| c.ip() != peer.ip()) {
        assert_eq!(client_address(peer, request.headers(), || true), claimed);
    }
    for value in request.headers().get_all(headers::BAGGAGE) {
        if let Ok(value) = value.to_str() {
            let parsed = Baggage::parse(value);
            assert_eq!(
                Baggage::parse(&parsed.to_header()),
                parsed,
                "baggage {value:?} re-encoded reads differently"
            );
        }
    }

    // What our own client sends for this destination as the client address reads back as it.
    if let Ok(authority) = accepted {
        let client = authority.0;
        let host = block.path.and_then(hostname);
        let value = forwarded_header(client, host.as_deref());
        let mut sent = HeaderMap::new();
        sent.insert(
            headers::FORWARDED,
            HeaderValue::from_str(&value).expect("forwarded_header makes a valid header value"),
        );
        assert_eq!(forwarded_for(&sent), Some(client), "{value:?}");
    }
});
