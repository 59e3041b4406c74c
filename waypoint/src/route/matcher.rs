//! Request conditions: Istio's `HTTPMatchRequest` and `L4MatchAttributes` evaluated against one
//! request, with the semantics of the Envoy configuration Istio generates for them.
//!
//! Paths are matched without their query string; header conditions see all values of a header
//! joined with `,`; query parameters are percent-decoded and only the first occurrence of a name
//! counts; `withoutHeaders` treats a missing header as an empty value (Envoy's
//! `invert_match` + `treat_missing_header_as_empty`).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::net::IpAddr;

use http::{HeaderMap, Method};
use mesh::model::{HttpMatch, L4Match, Labels, NamedMatch, ValueMatch};

use crate::request::SourceInfo;

/// What routing reads from a request. Borrowed, so building one per request costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// `http` or `https`, as the client addressed the service (`:scheme`).
    pub scheme: &'a str,
    /// The `:authority` (HTTP/2) or `Host` (HTTP/1.1) value, with the port when the client sent
    /// one.
    pub authority: &'a str,
    /// Path and query as received, e.g. `/a/b?x=1`.
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    /// The service port the request arrived on.
    pub port: u16,
}

impl<'a> RequestView<'a> {
    /// A view of a request as hyper hands it over: the authority from the URI (HTTP/2 or an
    /// absolute-form HTTP/1.1 target) else from `Host`; the scheme from the URI else `http`.
    pub fn from_parts(parts: &'a http::request::Parts, port: u16) -> Self {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        Self {
            method: &parts.method,
            scheme: parts.uri.scheme_str().unwrap_or("http"),
            authority,
            path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            headers: &parts.headers,
            port,
        }
    }

    /// The path without query string and fragment, as Envoy's path matchers see it.
    pub fn path(&self) -> &'a str {
        split_path(self.path_and_query).0
    }

    /// The query string (after `?`, before any `#`), if any.
    pub fn query(&self) -> Option<&'a str> {
        let rest = &self.path_and_query[self.path().len()..];
        let query = rest.strip_prefix('?')?;
        Some(query.split('#').next().unwrap_or(query))
    }

    /// A header's value as Envoy's header matchers see it: every value of the header joined
    /// with `,`. `:authority`/`host`, `:method`, `:scheme` and `:path` read the view.
    pub fn header(&self, name: &str) -> Option<Cow<'a, str>> {
        match name {
            ":authority" | "host" => Some(Cow::Borrowed(self.authority)),
            ":method" => Some(Cow::Borrowed(self.method.as_str())),
            ":scheme" => Some(Cow::Borrowed(self.scheme)),
            ":path" => Some(Cow::Borrowed(self.path_and_query)),
            _ => header_value(self.headers, name),
        }
    }
}

/// Every value of `name` in `headers` joined with `,` (`None` when absent). Bytes that are not
/// UTF-8 are replaced, so such a value matches only patterns that expect the replacement.
pub fn header_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let first = String::from_utf8_lossy(first.as_bytes());
    let Some(second) = values.next() else {
        return Some(first);
    };
    let mut joined = first.into_owned();
    for value in std::iter::once(second).chain(values) {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
    }
    Some(Cow::Owned(joined))
}

/// Splits `path?query#fragment` into the path and the rest (starting at `?` or `#`).
pub(crate) fn split_path(path_and_query: &str) -> (&str, &str) {
    let end = path_and_query
        .find(['?', '#'])
        .unwrap_or(path_and_query.len());
    path_and_query.split_at(end)
}

/// `exact`, `prefix` or (whole-value) `regex`, case-sensitive.
pub fn value_matches(m: &ValueMatch, value: &str) -> bool {
    match m {
        ValueMatch::Exact(s) => value == s,
        ValueMatch::Prefix(p) => value.starts_with(p.as_str()),
        ValueMatch::Regex(r) => r.is_match(value),
        ValueMatch::PathPrefix(p) => path_prefix_len(p, value).is_some(),
    }
}

/// Gateway API `PathPrefix` (element-wise, see [`ValueMatch::PathPrefix`]): how much of `path`
/// the prefix matched (0 for the root prefix `/`), or `None`.
pub fn path_prefix_len(prefix: &str, path: &str) -> Option<usize> {
    if prefix == "/" {
        return path.starts_with('/').then_some(0);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(prefix.len())
}

/// The `uri` condition on a path without its query. `ignore_case` applies to exact and prefix
/// (ASCII, as Envoy's `case_sensitive: false`); a regex is applied as written.
pub fn uri_matches(m: &ValueMatch, path: &str, ignore_case: bool) -> bool {
    match m {
        ValueMatch::Exact(s) if ignore_case => path.eq_ignore_ascii_case(s),
        ValueMatch::Prefix(p) if ignore_case => path
            .get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p)),
        _ => value_matches(m, path),
    }
}

/// Whether one `HTTPMatchRequest` holds for the request: every condition present must.
pub fn http_match_holds(m: &HttpMatch, request: &RequestView<'_>, source: &SourceInfo) -> bool {
    RequestContext::new(*request).holds(m, source)
}

/// Whether one `tcp[].match[]` holds: `port` is the service port, `destination` the address
/// the client connected to.
pub fn l4_match_holds(m: &L4Match, port: u16, destination: IpAddr, source: &SourceInfo) -> bool {
    m.port.is_none_or(|p| p == port)
        && (m.destination_subnets.is_empty()
            || m.destination_subnets
                .iter()
                .any(|b| b.contains(destination)))
        && source_holds(&m.source_labels, m.source_namespace.as_deref(), source)
}

fn source_holds(labels: &Labels, namespace: Option<&str>, source: &SourceInfo) -> bool {
    if let Some(ns) = namespace
        && source.namespace() != Some(ns)
    {
        return false;
    }
    if labels.is_empty() {
        return true;
    }
    source.workload.as_ref().is_some_and(|w| {
        labels
            .iter()
            .all(|(k, v)| w.labels.get(k).is_some_and(|have| have == v))
    })
}

/// A request plus what matching derives from it lazily (the decoded query), so a route table
/// with many query conditions parses the query once.
#[derive(Debug)]
pub(crate) struct RequestContext<'a> {
    pub(crate) view: RequestView<'a>,
    query: OnceCell<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
}

impl<'a> RequestContext<'a> {
    pub(crate) fn new(view: RequestView<'a>) -> Self {
        Self {
            view,
            query: OnceCell::new(),
        }
    }

    pub(crate) fn holds(&self, m: &HttpMatch, source: &SourceInfo) -> bool {
        let view = &self.view;
        m.port.is_none_or(|p| p == view.port)
            && source_holds(&m.source_labels, m.source_namespace.as_deref(), source)
            && m.method
                .as_ref()
                .is_none_or(|vm| value_matches(vm, view.method.as_str()))
            && m.scheme
                .as_ref()
                .is_none_or(|vm| value_matches(vm, view.scheme))
            && m.authority
                .as_ref()
                .is_none_or(|vm| value_matches(vm, view.authority))
            && m.uri
                .as_ref()
                .is_none_or(|vm| uri_matches(vm, view.path(), m.ignore_uri_case))
            && m.headers.iter().all(|h| self.header_holds(h))
            && m.without_headers
                .iter()
                .all(|h| self.without_header_holds(h))
            && m.query_params.iter().all(|q| self.query_param_holds(q))
    }

    fn header_holds(&self, h: &NamedMatch) -> bool {
        match (self.view.header(&h.name), &h.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(value), Some(vm)) => value_matches(vm, &value),
        }
    }

    /// Envoy's inverted header matcher: a presence condition holds when the header is absent;
    /// a value condition holds unless the value (empty when absent) matches.
    fn without_header_holds(&self, h: &NamedMatch) -> bool {
        let value = self.view.header(&h.name);
        match &h.value {
            None => value.is_none(),
            Some(vm) => !value_matches(vm, value.as_deref().unwrap_or("")),
        }
    }

    fn query_param_holds(&self, q: &NamedMatch) -> bool {
        let params = self
            .query
            .get_or_init(|| parse_query(self.view.query().unwrap_or("")));
        match (params.iter().find(|(k, _)| *k == q.name.as_str()), &q.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some((_, value)), Some(vm)) => value_matches(vm, value),
        }
    }
}

/// `a=1&b&c=%20` -> `[(a, 1), (b, ""), (c, " ")]`, keys and values percent-decoded (`+` is kept,
/// as Envoy's route matcher keeps it).
pub fn parse_query(query: &str) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `%XX` -> byte; malformed escapes are kept as written; invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex_value(*b)),
                bytes.get(i + 2).and_then(|b| hex_value(*b)),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
