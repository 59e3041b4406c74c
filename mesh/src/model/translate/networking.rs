//! VirtualService, DestinationRule and waypoint `Gateway` -> the L7 domain model, with Istio's
//! defaults applied and Istio's validation (`pkg/config/validation`) enforced, so the waypoint
//! never reads an optional field to guess a default.
//!
//! What Istio does, as checked against its API reference and sources (values this code relies
//! on):
//!
//! - Durations are decoded by Istio with Go's `time.ParseDuration` (golang/protobuf `jsonpb`):
//!   decimal numbers with an optional fraction and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`,
//!   `h`), possibly several (`1h30m`), or a bare `0`. Where Istio's validation calls
//!   `ValidateDuration` (route `timeout`, `perTryTimeout`, `fixedDelay`, `connectTimeout`, HTTP
//!   `idleTimeout`, `interval`, `baseEjectionTime`) the value must also be at least 1ms and a
//!   whole number of milliseconds.
//! - Route weights are relative (`weight / sum of weights`); a 0 weight gets no traffic; with
//!   several destinations the total must not be 0 (Istio: "total destination weight = 0");
//!   negative weights are refused. The old "must sum to 100" rule is gone from Istio.
//! - A route needs exactly one of `route`, `redirect`, `directResponse`; `redirect` cannot be
//!   combined with `fault` or `rewrite`, `directResponse` neither; `mirror` and `mirrors` are
//!   exclusive.
//! - No `retries`: Envoy gets Istio's default policy, 2 retries on
//!   `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with status
//!   503. `attempts: 0` (or `retries: {}`) disables retries, and Istio refuses `perTryTimeout`,
//!   `retryOn` or `retryRemoteLocalities` next to it. `attempts > 0` without `retryOn` keeps the
//!   default conditions; a `retryOn` replaces them; numbers in it are status codes (Go's
//!   `http.StatusText` must know them) and imply `retriable-status-codes`.
//! - Fault `delay`/`abort` without `percentage` (and, for delay, without the deprecated
//!   integer `percent`) apply to 0% of requests ("if left unspecified, no request will be
//!   delayed/aborted"). Percentages are 0..=100. `httpStatus` must be 200..=599 (Istio's
//!   message; its check lets 600 through). `grpcStatus` is a code name (`UNAVAILABLE` = 14).
//! - `mirrorPercentage` / `mirrors[].percentage` default to 100% when absent.
//! - `LEAST_CONN` is a deprecated alias of `LEAST_REQUEST`; `UNSPECIFIED` or no `simple` means
//!   `LEAST_REQUEST` (Istio's default).
//! - Connection pool integers are proto3 `int32`: negative is refused, 0 means "not set"
//!   (defaults: 2^32-1 connections, pending requests, requests and retries; unlimited requests
//!   per connection; `connectTimeout` 10s; HTTP `idleTimeout` 1h).
//! - Outlier detection defaults: `consecutive5xxErrors` 5 (0 disables), gateway errors off,
//!   `interval` 10s, `baseEjectionTime` 30s, `maxEjectionPercent` 10% (0 = default; Istio only
//!   sets Envoy's field when > 0). The deprecated `consecutiveErrors` counts gateway errors
//!   and, unless `consecutive5xxErrors` is set, turns 5xx ejection off (Istio before it
//!   dropped the field; recent releases only warn about it).
//! - A subset's `trafficPolicy` replaces the rule's `loadBalancer`, `connectionPool` and
//!   `outlierDetection` each wholesale when it sets them (Istio's `MergeTrafficPolicy`).
//! - Several VirtualServices for one host: Istio sorts configs by `creationTimestamp`, then
//!   name, then namespace (`sortConfigByCreationTime`), and the first wins.
//!
//! Our choices where Istio says nothing or differs:
//!
//! - Host short forms: Istio expands only dot-less names (`reviews` ->
//!   `reviews.<rule namespace>.svc.<cluster domain>`). We also expand `<name>.<namespace>.svc`,
//!   and `<name>.<namespace>` when such a Service exists (at assembly, so `example.com` stays
//!   itself). Wildcards (`*`, `*.example.com`) and IPs are kept as written. Hosts are
//!   lower-cased.
//! - Istio refuses `hosts: ["*"]` for mesh-bound VirtualServices; we keep it as written.
//! - `PASSTHROUGH` load balancing is refused: a waypoint has no original destination to pass
//!   through to.
//! - Header match names are lower-cased; the keys `uri`, `scheme`, `method` and `authority` in
//!   `headers` are ignored, as Istio documents.
//! - Fields Istio has but the waypoint does not apply (TLS routes, `portLevelSettings`,
//!   upstream `tls`, hash ring tuning, retry `backoff`...) are validated where cheap and
//!   otherwise ignored with a debug log.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::jiff::Timestamp;
use tracing::{debug, warn};

use super::{ObjectKey, TranslateConfig, TranslateError, invalid, ip_block, port_number};
use crate::model::networking_crd as ncrd;
use crate::model::{
    AbortStatus, ConfigWarning, ConnectionPool, CorsPolicy, Destination, DestinationRule,
    DirectResponse, Fault, FaultAbort, FaultDelay, HashKey, HeaderEdits, HeaderOperations,
    HttpAction, HttpMatch, HttpRoute, L4Match, LoadBalancer, Mirror, NamedMatch, Redirect,
    RedirectPort, Regex, RetryCondition, RetryOn, RetryPolicy, Rewrite, RouteDestination, Service,
    Subset, TcpRoute, TlsMatch, TlsRoute, TrafficPolicy, ValueMatch, VirtualService,
    VirtualServiceOrigin, WAYPOINT_GATEWAY_CLASS, WaypointGateway,
};

type Result<T> = std::result::Result<T, TranslateError>;

/// A VirtualService or DestinationRule with its creation time, for Istio's "oldest first".
#[derive(Debug)]
pub(super) struct AcceptedRoute<T> {
    pub(super) value: T,
    pub(super) created_at: Option<Timestamp>,
    /// The subsets a VirtualService routes or mirrors to, checked against the DestinationRules
    /// at assembly; none for a DestinationRule.
    pub(super) subset_refs: Vec<SubsetRef>,
}

/// A `destination.subset` as written: where (`spec.http[0].route[1].destination.subset`),
/// for which host (expanded as the route's destination is).
#[derive(Debug, Clone)]
pub(super) struct SubsetRef {
    field: String,
    host: String,
    subset: String,
}

/// The subsets an HTTP route (`p` = `spec.http[i]`, as written) sends to: its destinations
/// and mirrors, in the order `http_route` translated them.
fn http_subset_refs(p: &str, r: &ncrd::HttpRoute, route: &HttpRoute, out: &mut Vec<SubsetRef>) {
    if let HttpAction::Route(destinations) = &route.action {
        for (j, d) in destinations.iter().enumerate() {
            push_subset_ref(format!("{p}.route[{j}].destination"), &d.destination, out);
        }
    }
    // `mirror` and `mirrors` are exclusive (validated), so the translated list is one or the
    // other, in order.
    for (j, m) in route.mirrors.iter().enumerate() {
        let field = if r.mirror.is_some() {
            format!("{p}.mirror")
        } else {
            format!("{p}.mirrors[{j}].destination")
        };
        push_subset_ref(field, &m.destination, out);
    }
}

fn push_subset_ref(destination_field: String, d: &Destination, out: &mut Vec<SubsetRef>) {
    if let Some(subset) = d.subset.as_deref().filter(|s| !s.is_empty()) {
        out.push(SubsetRef {
            field: format!("{destination_field}.subset"),
            host: d.host.clone(),
            subset: subset.to_owned(),
        });
    }
}

/// Istio's default retry policy, applied to routes without `retries`.
pub fn istio_default_retries() -> RetryPolicy {
    RetryPolicy::istio_default()
}

/// `attempts: 0`: no retries.
fn no_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 0,
        per_try_timeout: None,
        backoff: None,
        retry_on: RetryOn::default(),
    }
}

/// Parses a duration as Istio decodes one (Go's `time.ParseDuration`): `0`, or one or more
/// `<number>[.<fraction>]<unit>` with units `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`. Negative
/// durations are refused (Istio refuses them wherever it validates a duration).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, &'static str> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err("it is empty");
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(after) => after.split_at(after.bytes().take_while(u8::is_ascii_digit).count()),
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err("a number is expected");
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err("a unit is missing"),
            _ => return Err("the unit is not one of ns, us, ms, s, m, h"),
        };
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| "it is too large")?
        };
        // Go ignores fraction digits beyond what it can represent; 18 is plenty for ns.
        let frac = &frac[..frac.len().min(18)];
        let frac_nanos = if frac.is_empty() {
            0
        } else {
            let digits: u128 = frac.parse().map_err(|_| "it is too large")?;
            digits * per_unit / 10u128.pow(frac.len() as u32)
        };
        total = int
            .checked_mul(per_unit)
            .and_then(|n| n.checked_add(frac_nanos))
            .and_then(|n| n.checked_add(total))
            .filter(|n| *n <= i64::MAX as u128)
            .ok_or("it is too large")?;
        rest = after;
    }
    if negative && total != 0 {
        return Err("it is negative");
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Go's `http.StatusText` table: the status codes Istio accepts as numbers in `retryOn`.
fn is_known_http_status(code: u16) -> bool {
    matches!(
        code,
        100..=103
            | 200..=208
            | 226
            | 300..=305
            | 307
            | 308
            | 400..=418
            | 421..=426
            | 428
            | 429
            | 431
            | 451
            | 500..=508
            | 510
            | 511
    )
}

/// gRPC status names (grpc/doc/statuscodes.md), as Istio's `grpcStatus` takes them.
const GRPC_STATUS: [(&str, u32); 17] = [
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

const RETRY_ON_EXPECTED: &str = "5xx, gateway-error, reset, connect-failure, refused-stream, \
    retriable-4xx, retriable-status-codes, cancelled, deadline-exceeded, internal, \
    resource-exhausted, unavailable, or an HTTP status code";

/// Envoy conditions Istio accepts but the waypoint does not implement: dropped with a warning
/// (retrying less than asked, never more).
const RETRY_ON_UNSUPPORTED: [&str; 4] = [
    "reset-before-request",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
];

/// Methods Istio accepts in `corsPolicy.allowMethods` (Go's `net/http` method constants).
const CORS_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

/// Istio caps direct response bodies at 1 MiB.
const MAX_DIRECT_RESPONSE_BODY: usize = 1024 * 1024;

/// Istio's cap on regex length (an approximation of Envoy's RE2 program size limit).
const MAX_REGEX_LEN: usize = 1024;

/// The translation of one object: its key (for errors) and the cluster facts.
pub(super) struct Ctx<'a> {
    pub(super) config: &'a TranslateConfig,
    pub(super) key: &'a ObjectKey,
    /// Which proxies the VirtualService is being translated for (the `gateways` fields).
    pub(super) binding: Binding<'a>,
}

/// What a VirtualService is translated for: the mesh (waypoints) or one ingress `Gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Binding<'a> {
    Mesh,
    /// `namespace/name` of an Istio `Gateway`.
    Gateway(&'a str),
}

impl Binding<'_> {
    /// Whether a `gateways` list (of a VirtualService, or of one match, where empty inherits
    /// the VirtualService's) names this binding. `vs_namespace` resolves short names.
    fn named_in(self, gateways: &[String], vs_namespace: &str) -> bool {
        match self {
            Binding::Mesh => applies_to_mesh(gateways),
            Binding::Gateway(key) => gateways
                .iter()
                .any(|g| resolve_gateway_name(g, vs_namespace).as_deref() == Some(key)),
        }
    }
}

/// A `gateways` entry as `namespace/name`: `name` is in the VirtualService's namespace; `mesh`
/// is not a Gateway (`None`).
pub(super) fn resolve_gateway_name(written: &str, vs_namespace: &str) -> Option<String> {
    match written {
        "mesh" | "" => None,
        _ if written.contains('/') => Some(written.to_owned()),
        _ => Some(format!("{vs_namespace}/{written}")),
    }
}

impl Ctx<'_> {
    /// Whether a match's `gateways` bind it here: an empty list inherits the VirtualService's
    /// (already checked), a written one replaces it.
    fn match_bound(&self, gateways: &[String]) -> bool {
        gateways.is_empty() || self.binding.named_in(gateways, &self.key.namespace)
    }

    pub(super) fn invalid(
        &self,
        field: impl Into<String>,
        why: impl Into<String>,
    ) -> TranslateError {
        invalid(self.key, field, why)
    }

    pub(super) fn not_one_of(&self, field: String, value: &str, expected: &str) -> TranslateError {
        TranslateError::NotOneOf {
            object: Box::new(self.key.clone()),
            field,
            value: value.to_owned(),
            expected: expected.to_owned(),
        }
    }

    pub(super) fn port(&self, field: String, n: i64) -> Result<u16> {
        port_number(n).ok_or_else(|| TranslateError::NotAPort {
            object: Box::new(self.key.clone()),
            field,
            value: n.to_string(),
        })
    }

    /// Any well-formed, non-negative duration.
    pub(super) fn duration(&self, field: String, value: &str) -> Result<Duration> {
        parse_duration(value).map_err(|why| {
            self.invalid(
                field,
                format!(
                    "{value:?} is not a duration ({why}); write it like 100ms, 0.5s, 3s, 1m or 1h"
                ),
            )
        })
    }

    /// A duration Istio validates with `ValidateDuration`: at least 1ms, whole milliseconds.
    fn istio_duration(&self, field: String, value: &str) -> Result<Duration> {
        let d = self.duration(field.clone(), value)?;
        if d < Duration::from_millis(1) {
            return Err(self.invalid(field, format!("{value:?} is shorter than 1ms")));
        }
        if d.subsec_nanos() % 1_000_000 != 0 {
            return Err(self.invalid(
                field,
                format!("{value:?} is finer than a millisecond; only ms precision is supported"),
            ));
        }
        Ok(d)
    }

    /// A percentage in 0..=100.
    pub(super) fn percentage(&self, field: String, value: f64) -> Result<f64> {
        if (0.0..=100.0).contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(
                field,
                format!("{value} is not a percentage between 0 and 100"),
            ))
        }
    }

    /// A proto3 `int32` limit: negative refused, 0 = not set.
    fn limit(&self, field: String, value: Option<i64>) -> Result<Option<u32>> {
        match value {
            None | Some(0) => Ok(None),
            Some(n) if n < 0 => Err(self.invalid(field, format!("{n} is negative"))),
            Some(n) => i32::try_from(n)
                .map(|n| Some(n as u32))
                .map_err(|_| self.invalid(field, format!("{n} is larger than {}", i32::MAX))),
        }
    }

    /// A regex matched against the whole value.
    pub(super) fn regex(&self, field: String, pattern: &str) -> Result<Regex> {
        self.check_regex_len(&field, pattern)?;
        Regex::full_match(pattern).map_err(|e| self.bad_regex(field, pattern, &e))
    }

    /// A regex matched anywhere in the value (`uriRegexRewrite` replaces every match).
    fn search_regex(&self, field: String, pattern: &str) -> Result<Regex> {
        self.check_regex_len(&field, pattern)?;
        let compiled =
            regex::Regex::new(pattern).map_err(|e| self.bad_regex(field, pattern, &e))?;
        Ok(Regex {
            pattern: pattern.to_owned(),
            compiled,
        })
    }

    fn check_regex_len(&self, field: &str, pattern: &str) -> Result<()> {
        if pattern.is_empty() {
            return Err(self.invalid(field, "a regex must not be empty"));
        }
        if pattern.len() > MAX_REGEX_LEN {
            return Err(self.invalid(
                field,
                format!(
                    "the regex is {} characters long; at most {MAX_REGEX_LEN} are allowed",
                    pattern.len()
                ),
            ));
        }
        Ok(())
    }

    fn bad_regex(&self, field: String, pattern: &str, e: &regex::Error) -> TranslateError {
        // The regex crate's syntax errors span several lines (pattern, caret, message); the
        // last line is the reason.
        let text = e.to_string();
        let why = text.lines().last().unwrap_or_default();
        let why = why.strip_prefix("error: ").unwrap_or(why);
        self.invalid(
            field,
            format!("{pattern:?} is not a valid regular expression: {why}"),
        )
    }

    /// Istio's `StringMatch`. `None`: written empty (`{}`). `uri` may have an empty prefix
    /// (matches everything); other fields may not, as Envoy refuses them.
    fn value_match(
        &self,
        field: &str,
        sm: &ncrd::StringMatch,
        empty_prefix_ok: bool,
    ) -> Result<Option<ValueMatch>> {
        let set = [sm.exact.is_some(), sm.prefix.is_some(), sm.regex.is_some()];
        if set.iter().filter(|s| **s).count() > 1 {
            return Err(self.invalid(field, "only one of exact, prefix or regex may be set"));
        }
        Ok(if let Some(exact) = &sm.exact {
            Some(ValueMatch::Exact(exact.clone()))
        } else if let Some(prefix) = &sm.prefix {
            if prefix.is_empty() && !empty_prefix_ok {
                return Err(self.invalid(format!("{field}.prefix"), "a prefix must not be empty"));
            }
            Some(ValueMatch::Prefix(prefix.clone()))
        } else if let Some(regex) = &sm.regex {
            Some(ValueMatch::Regex(
                self.regex(format!("{field}.regex"), regex)?,
            ))
        } else {
            None
        })
    }

    /// A hostname as written in the object, validated, lower-cased, short forms expanded
    /// relative to the object's namespace (see the module doc).
    pub(super) fn host(&self, field: String, host: &str) -> Result<String> {
        if host.is_empty() {
            return Err(self.invalid(field, "a host is required"));
        }
        if host == "*" || host.parse::<IpAddr>().is_ok() {
            return Ok(host.to_owned());
        }
        let host = host.to_ascii_lowercase();
        let name = host.strip_prefix("*.").unwrap_or(&host);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.len() > 253 || !name.split('.').all(label_ok) {
            return Err(self.invalid(
                field,
                format!("{host:?} is not a hostname (DNS labels separated by dots, optionally after `*.`)"),
            ));
        }
        Ok(expand_host(
            &host,
            &self.key.namespace,
            &self.config.cluster_domain,
        ))
    }

    fn subset_name(&self, field: String, name: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if ok {
            Ok(())
        } else {
            Err(self.invalid(
                field,
                format!("{name:?} is not a subset name (a DNS label: lower-case letters, digits and '-')"),
            ))
        }
    }

    fn destination(&self, field: &str, d: &ncrd::Destination) -> Result<Destination> {
        let host = self.host(format!("{field}.host"), &d.host)?;
        if host == "*" {
            return Err(self.invalid(format!("{field}.host"), "\"*\" is not a destination host"));
        }
        let subset = match d.subset.as_deref() {
            None | Some("") => None,
            Some(s) => {
                self.subset_name(format!("{field}.subset"), s)?;
                Some(s.to_owned())
            }
        };
        let port = d
            .port
            .as_ref()
            .map(|p| self.port(format!("{field}.port.number"), p.number))
            .transpose()?;
        Ok(Destination { host, subset, port })
    }

    fn weight(&self, field: String, weight: Option<i64>) -> Result<u32> {
        match weight.unwrap_or(0) {
            n if n < 0 => Err(self.invalid(
                field,
                format!("{n} is negative; weights are relative and must be >= 0"),
            )),
            n => i32::try_from(n)
                .map(|n| n as u32)
                .map_err(|_| self.invalid(field, format!("{n} is larger than {}", i32::MAX))),
        }
    }

    /// Istio: with several destinations, the weights must not all be 0.
    fn check_weights(&self, field: String, route: &[RouteDestination]) -> Result<()> {
        if route.len() > 1 && route.iter().all(|d| d.weight == 0) {
            return Err(self.invalid(
                field,
                "total destination weight = 0: with several destinations at least one needs a weight (weights are relative)",
            ));
        }
        Ok(())
    }
}

/// Expands the short host forms that need no knowledge of other objects.
fn expand_host(host: &str, namespace: &str, cluster_domain: &str) -> String {
    if host.contains('*') || host.parse::<IpAddr>().is_ok() {
        return host.to_owned();
    }
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.svc.{cluster_domain}"),
        2 if host.ends_with(".svc") => format!("{host}.{cluster_domain}"),
        _ => host.to_owned(),
    }
}

fn header_operations(headers: Option<&ncrd::Headers>) -> HeaderOperations {
    let edits = |ops: Option<&ncrd::HeaderOperations>| {
        ops.map(|o| HeaderEdits {
            set: o
                .set
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            add: o
                .add
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            remove: o.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
        })
        .unwrap_or_default()
    };
    HeaderOperations {
        request: edits(headers.and_then(|h| h.request.as_ref())),
        response: edits(headers.and_then(|h| h.response.as_ref())),
    }
}

/// Bound to the mesh (and so to waypoints): no gateways named, or `mesh` among them.
fn applies_to_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

/// Standard base64 with padding, as protobuf JSON writes `bytes`.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// VirtualService

/// `None`: valid but not for waypoints (bound to gateways only, or a delegate without hosts).
pub(super) fn virtual_service(
    config: &TranslateConfig,
    key: &ObjectKey,
    vs: &ncrd::VirtualService,
) -> Result<Option<AcceptedRoute<VirtualService>>> {
    virtual_service_for(config, key, vs, Binding::Mesh)
}

/// The VirtualService as `binding` sees it: its routes and matches bound there (`gateways`).
/// `None`: nothing of it is bound there (or a delegate without hosts).
pub(super) fn virtual_service_for(
    config: &TranslateConfig,
    key: &ObjectKey,
    vs: &ncrd::VirtualService,
    binding: Binding<'_>,
) -> Result<Option<AcceptedRoute<VirtualService>>> {
    let ctx = Ctx {
        config,
        key,
        binding,
    };
    let spec = &vs.spec;
    let mut hosts: Vec<String> = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        let host = ctx.host(format!("spec.hosts[{i}]"), h)?;
        if let Some(j) = hosts.iter().position(|other| *other == host) {
            return Err(ctx.invalid(
                format!("spec.hosts[{i}]"),
                format!("{host:?} duplicates spec.hosts[{j}]"),
            ));
        }
        hosts.push(host);
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        return Err(ctx.invalid("spec", "one of http, tcp or tls is required"));
    }
    let mut http = Vec::new();
    let mut subset_refs = Vec::new();
    for (i, written) in spec.http.iter().enumerate() {
        let p = format!("spec.http[{i}]");
        if let Some(route) = http_route(&ctx, &p, written)? {
            http_subset_refs(&p, written, &route, &mut subset_refs);
            http.push(route);
        }
    }
    let mut tcp = Vec::new();
    for (i, route) in spec.tcp.iter().enumerate() {
        if let Some(route) = tcp_route(&ctx, &format!("spec.tcp[{i}]"), route)? {
            for (j, d) in route.route.iter().enumerate() {
                let field = format!("spec.tcp[{i}].route[{j}].destination");
                push_subset_ref(field, &d.destination, &mut subset_refs);
            }
            tcp.push(route);
        }
    }
    let mut tls = Vec::new();
    for (i, route) in spec.tls.iter().enumerate() {
        if let Some(route) = tls_route(&ctx, &format!("spec.tls[{i}]"), route, &hosts)? {
            for (j, d) in route.route.iter().enumerate() {
                let field = format!("spec.tls[{i}].route[{j}].destination");
                push_subset_ref(field, &d.destination, &mut subset_refs);
            }
            tls.push(route);
        }
    }
    if !tls.is_empty() && matches!(binding, Binding::Mesh) {
        debug!(virtual_service = %key, "tls (SNI) routes are applied by ingress gateways, not by the waypoint");
    }
    if !binding.named_in(&spec.gateways, &key.namespace) {
        debug!(virtual_service = %key, gateways = ?spec.gateways, ?binding, "not bound here");
        return Ok(None);
    }
    if hosts.is_empty() {
        debug!(virtual_service = %key, "no hosts (a delegate); delegation is not supported");
        return Ok(None);
    }
    let created_at = vs.metadata.creation_timestamp.as_ref().map(|t| t.0);
    Ok(Some(AcceptedRoute {
        value: VirtualService {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            hosts,
            http,
            tcp,
            tls,
            created: created_at.map(|t| t.to_string()),
            origin: VirtualServiceOrigin::VirtualService,
        },
        created_at,
        subset_refs,
    }))
}

/// `None`: every match of the route is for gateways only.
fn http_route(ctx: &Ctx<'_>, p: &str, r: &ncrd::HttpRoute) -> Result<Option<HttpRoute>> {
    if r.delegate.is_some() {
        return Err(ctx.invalid(
            format!("{p}.delegate"),
            "delegation to another VirtualService is not supported by the waypoint",
        ));
    }
    // Istio's conflict rules (validateHTTPRouteConflict).
    let has_route = !r.route.is_empty();
    if r.redirect.is_some() {
        for (set, name) in [
            (has_route, "route"),
            (r.fault.is_some(), "fault"),
            (r.rewrite.is_some(), "rewrite"),
            (r.direct_response.is_some(), "directResponse"),
        ] {
            if set {
                return Err(ctx.invalid(
                    format!("{p}.redirect"),
                    format!("redirect cannot be combined with {name}"),
                ));
            }
        }
    } else if r.direct_response.is_some() {
        for (set, name) in [
            (has_route, "route"),
            (r.fault.is_some(), "fault"),
            (r.rewrite.is_some(), "rewrite"),
        ] {
            if set {
                return Err(ctx.invalid(
                    format!("{p}.directResponse"),
                    format!("directResponse cannot be combined with {name}"),
                ));
            }
        }
    } else if !has_route {
        return Err(ctx.invalid(p, "one of route, redirect or directResponse is required"));
    }
    if r.mirror.is_some() && !r.mirrors.is_empty() {
        return Err(ctx.invalid(
            format!("{p}.mirrors"),
            "mirrors cannot be combined with mirror",
        ));
    }

    let mut matches = Vec::new();
    let mut gateway_only = 0;
    for (j, m) in r.matches.iter().enumerate() {
        match http_match(ctx, &format!("{p}.match[{j}]"), m)? {
            Some(m) => matches.push(m),
            None => gateway_only += 1,
        }
    }

    let action = if let Some(redirect) = &r.redirect {
        HttpAction::Redirect(http_redirect(ctx, &format!("{p}.redirect"), redirect)?)
    } else if let Some(response) = &r.direct_response {
        HttpAction::DirectResponse(direct_response(
            ctx,
            &format!("{p}.directResponse"),
            response,
        )?)
    } else {
        let mut route = Vec::new();
        for (j, d) in r.route.iter().enumerate() {
            let field = format!("{p}.route[{j}]");
            route.push(RouteDestination {
                destination: ctx.destination(&format!("{field}.destination"), &d.destination)?,
                weight: ctx.weight(format!("{field}.weight"), d.weight)?,
                headers: header_operations(d.headers.as_ref()),
            });
        }
        ctx.check_weights(format!("{p}.route"), &route)?;
        HttpAction::Route(route)
    };

    let rewrite = r
        .rewrite
        .as_ref()
        .map(|rw| http_rewrite(ctx, &format!("{p}.rewrite"), rw))
        .transpose()?;
    let timeout = r
        .timeout
        .as_deref()
        .map(|t| ctx.istio_duration(format!("{p}.timeout"), t))
        .transpose()?;
    let retries = retries(ctx, &format!("{p}.retries"), r.retries.as_ref())?;
    let fault = r
        .fault
        .as_ref()
        .map(|f| fault(ctx, &format!("{p}.fault"), f))
        .transpose()?;
    let mirrors = mirrors(ctx, p, r)?;
    let cors = r
        .cors_policy
        .as_ref()
        .map(|c| cors_policy(ctx, &format!("{p}.corsPolicy"), c))
        .transpose()?;

    if !r.matches.is_empty() && gateway_only == r.matches.len() {
        debug!(virtual_service = %ctx.key, route = p, "every match is for gateways only; not a waypoint route");
        return Ok(None);
    }
    Ok(Some(HttpRoute {
        name: r.name.clone().filter(|n| !n.is_empty()),
        matches,
        action,
        rewrite,
        timeout,
        retries,
        fault,
        mirrors,
        cors,
        headers: header_operations(r.headers.as_ref()),
    }))
}

/// `None`: the match names gateways and not `mesh`, so it does not apply to waypoints.
fn http_match(ctx: &Ctx<'_>, p: &str, m: &ncrd::HttpMatchRequest) -> Result<Option<HttpMatch>> {
    let named = |field: &str, map: &BTreeMap<String, ncrd::StringMatch>, lower: bool| {
        let mut out = Vec::new();
        for (name, sm) in map {
            let f = format!("{p}.{field}.{name}");
            if name.is_empty() {
                return Err(ctx.invalid(f, "a name is required"));
            }
            if lower && matches!(name.as_str(), "uri" | "scheme" | "method" | "authority") {
                debug!(virtual_service = %ctx.key, field = f, "Istio ignores this header key; ignored");
                continue;
            }
            // `withoutHeaders: {x: {regex: "*"}}` is Istio's spelling of "x is present".
            let value = if field == "withoutHeaders" && sm.regex.as_deref() == Some("*") {
                None
            } else {
                ctx.value_match(&f, sm, false)?
            };
            out.push(NamedMatch {
                name: if lower {
                    name.to_ascii_lowercase()
                } else {
                    name.clone()
                },
                value,
            });
        }
        Ok(out)
    };
    let optional = |field: &str, sm: Option<&ncrd::StringMatch>, empty_prefix_ok: bool| {
        sm.map(|sm| ctx.value_match(&format!("{p}.{field}"), sm, empty_prefix_ok))
            .transpose()
            .map(Option::flatten)
    };
    let result = HttpMatch {
        name: m.name.clone().filter(|n| !n.is_empty()),
        uri: optional("uri", m.uri.as_ref(), true)?,
        scheme: optional("scheme", m.scheme.as_ref(), false)?,
        method: optional("method", m.method.as_ref(), false)?,
        authority: optional("authority", m.authority.as_ref(), false)?,
        headers: named("headers", &m.headers, true)?,
        without_headers: named("withoutHeaders", &m.without_headers, true)?,
        query_params: named("queryParams", &m.query_params, false)?,
        port: match m.port {
            None | Some(0) => None,
            Some(n) => Some(ctx.port(format!("{p}.port"), n)?),
        },
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone().filter(|n| !n.is_empty()),
        ignore_uri_case: m.ignore_uri_case,
    };
    Ok(ctx.match_bound(&m.gateways).then_some(result))
}

fn http_redirect(ctx: &Ctx<'_>, p: &str, r: &ncrd::HttpRedirect) -> Result<Redirect> {
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    let (uri, authority, scheme) = (
        non_empty(&r.uri),
        non_empty(&r.authority),
        non_empty(&r.scheme),
    );
    let port = match (r.port, r.derive_port.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ctx.invalid(
                format!("{p}.derivePort"),
                "derivePort cannot be combined with port",
            ));
        }
        (Some(n), None) => Some(RedirectPort::Number(ctx.port(format!("{p}.port"), n)?)),
        (None, Some("FROM_PROTOCOL_DEFAULT")) => Some(RedirectPort::FromProtocolDefault),
        (None, Some("FROM_REQUEST_PORT")) => Some(RedirectPort::FromRequestPort),
        (None, Some(other)) => {
            return Err(ctx.not_one_of(
                format!("{p}.derivePort"),
                other,
                "FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT",
            ));
        }
        (None, None) => None,
    };
    if let Some(s) = &scheme
        && s != "http"
        && s != "https"
    {
        return Err(ctx.not_one_of(format!("{p}.scheme"), s, "http, https"));
    }
    if uri.is_none() && authority.is_none() && scheme.is_none() && port.is_none() {
        return Err(ctx.invalid(
            p,
            "a redirect must set uri, authority, scheme, port or derivePort",
        ));
    }
    let code = match r.redirect_code {
        None | Some(0) => 301,
        Some(n @ 300..=399) => n as u16,
        Some(n) => {
            return Err(ctx.invalid(
                format!("{p}.redirectCode"),
                format!("{n} is not a redirect status (3xx)"),
            ));
        }
    };
    Ok(Redirect {
        uri,
        authority,
        port,
        scheme,
        code,
    })
}

fn http_status(ctx: &Ctx<'_>, field: String, status: i64) -> Result<u16> {
    if (200..=599).contains(&status) {
        Ok(status as u16)
    } else {
        Err(ctx.invalid(field, format!("{status} is not an HTTP status in 200..599")))
    }
}

fn direct_response(ctx: &Ctx<'_>, p: &str, r: &ncrd::HttpDirectResponse) -> Result<DirectResponse> {
    let status = r
        .status
        .ok_or_else(|| ctx.invalid(format!("{p}.status"), "a status is required"))?;
    let status = http_status(ctx, format!("{p}.status"), status)?;
    let body = match &r.body {
        None => None,
        Some(ncrd::HttpBody {
            string: Some(_),
            bytes: Some(_),
        }) => {
            return Err(ctx.invalid(
                format!("{p}.body"),
                "only one of string or bytes may be set",
            ));
        }
        Some(ncrd::HttpBody {
            string: Some(s), ..
        }) => Some(Bytes::from(s.clone().into_bytes())),
        Some(ncrd::HttpBody { bytes: Some(b), .. }) => {
            Some(Bytes::from(decode_base64(b).ok_or_else(|| {
                ctx.invalid(format!("{p}.body.bytes"), "the value is not base64")
            })?))
        }
        Some(_) => None,
    };
    if let Some(body) = &body
        && body.len() > MAX_DIRECT_RESPONSE_BODY
    {
        return Err(ctx.invalid(
            format!("{p}.body"),
            format!(
                "the body is {} bytes; a direct response body must be at most 1 MiB",
                body.len()
            ),
        ));
    }
    Ok(DirectResponse { status, body })
}

fn http_rewrite(ctx: &Ctx<'_>, p: &str, r: &ncrd::HttpRewrite) -> Result<Rewrite> {
    let uri = r.uri.clone().filter(|s| !s.is_empty());
    let authority = r.authority.clone().filter(|s| !s.is_empty());
    if uri.is_some() && r.uri_regex_rewrite.is_some() {
        return Err(ctx.invalid(
            format!("{p}.uriRegexRewrite"),
            "uriRegexRewrite cannot be combined with uri",
        ));
    }
    let uri_regex = match &r.uri_regex_rewrite {
        None => None,
        Some(rr) => {
            let field = format!("{p}.uriRegexRewrite");
            let (Some(pattern), Some(rewrite)) = (
                rr.pattern.as_deref().filter(|s| !s.is_empty()),
                rr.rewrite.as_deref().filter(|s| !s.is_empty()),
            ) else {
                return Err(ctx.invalid(field, "both match and rewrite are required"));
            };
            Some((
                ctx.search_regex(format!("{field}.match"), pattern)?,
                rewrite.to_owned(),
            ))
        }
    };
    if uri.is_none() && uri_regex.is_none() && authority.is_none() {
        return Err(ctx.invalid(p, "a rewrite must set uri, uriRegexRewrite or authority"));
    }
    Ok(Rewrite {
        uri,
        authority,
        uri_regex,
    })
}

fn retries(ctx: &Ctx<'_>, p: &str, r: Option<&ncrd::HttpRetry>) -> Result<RetryPolicy> {
    let Some(r) = r else {
        return Ok(istio_default_retries());
    };
    let attempts = r.attempts.unwrap_or(0);
    if attempts < 0 {
        return Err(ctx.invalid(format!("{p}.attempts"), format!("{attempts} is negative")));
    }
    let attempts = u32::try_from(attempts)
        .map_err(|_| ctx.invalid(format!("{p}.attempts"), format!("{attempts} is too large")))?;
    if let Some(backoff) = &r.backoff {
        ctx.istio_duration(format!("{p}.backoff"), backoff)?;
        debug!(virtual_service = %ctx.key, field = %format_args!("{p}.backoff"), "retry back-off is not applied by the waypoint yet; ignored");
    }
    let retry_on_set = r.retry_on.as_deref().is_some_and(|s| !s.is_empty());
    if attempts == 0 {
        if r.per_try_timeout.is_some() || retry_on_set || r.retry_remote_localities.is_some() {
            return Err(ctx.invalid(
                p,
                "perTryTimeout, retryOn and retryRemoteLocalities cannot be set when attempts is 0 (retries disabled)",
            ));
        }
        return Ok(no_retries());
    }
    let per_try_timeout = r
        .per_try_timeout
        .as_deref()
        .map(|t| ctx.istio_duration(format!("{p}.perTryTimeout"), t))
        .transpose()?;
    let retry_on = match r.retry_on.as_deref().filter(|s| !s.is_empty()) {
        None => istio_default_retries().retry_on,
        Some(s) => retry_on(ctx, &format!("{p}.retryOn"), s)?,
    };
    Ok(RetryPolicy {
        attempts,
        per_try_timeout,
        backoff: None,
        retry_on,
    })
}

fn retry_on(ctx: &Ctx<'_>, field: &str, s: &str) -> Result<RetryOn> {
    let mut out = RetryOn::default();
    for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if token.bytes().all(|b| b.is_ascii_digit()) {
            match token.parse::<u16>() {
                Ok(code) if is_known_http_status(code) => {
                    if !out.status_codes.contains(&code) {
                        out.status_codes.push(code);
                    }
                    continue;
                }
                _ => return Err(ctx.not_one_of(field.to_owned(), token, RETRY_ON_EXPECTED)),
            }
        }
        let condition = match token {
            "5xx" => RetryCondition::FiveXx,
            "gateway-error" => RetryCondition::GatewayError,
            "reset" => RetryCondition::Reset,
            "connect-failure" => RetryCondition::ConnectFailure,
            "refused-stream" => RetryCondition::RefusedStream,
            "retriable-4xx" => RetryCondition::Retriable4xx,
            "retriable-status-codes" => RetryCondition::RetriableStatusCodes,
            "cancelled" => RetryCondition::GrpcCancelled,
            "deadline-exceeded" => RetryCondition::GrpcDeadlineExceeded,
            "unavailable" => RetryCondition::GrpcUnavailable,
            "resource-exhausted" => RetryCondition::GrpcResourceExhausted,
            "internal" => RetryCondition::GrpcInternal,
            t if RETRY_ON_UNSUPPORTED.contains(&t) => {
                warn!(virtual_service = %ctx.key, field, condition = t, "retry condition is not supported by the waypoint; ignored");
                continue;
            }
            _ => return Err(ctx.not_one_of(field.to_owned(), token, RETRY_ON_EXPECTED)),
        };
        if !out.conditions.contains(&condition) {
            out.conditions.push(condition);
        }
    }
    // Istio adds `retriable-status-codes` when codes are listed without it.
    if !out.status_codes.is_empty()
        && !out
            .conditions
            .contains(&RetryCondition::RetriableStatusCodes)
    {
        out.conditions.push(RetryCondition::RetriableStatusCodes);
    }
    Ok(out)
}

fn fault(ctx: &Ctx<'_>, p: &str, f: &ncrd::HttpFaultInjection) -> Result<Fault> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err(ctx.invalid(p, "a fault needs a delay, an abort or both"));
    }
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let p = format!("{p}.delay");
            if d.exponential_delay.is_some() {
                return Err(ctx.invalid(
                    format!("{p}.exponentialDelay"),
                    "exponentialDelay is not supported (Istio refuses it too)",
                ));
            }
            let fixed = d.fixed_delay.as_deref().ok_or_else(|| {
                ctx.invalid(format!("{p}.fixedDelay"), "a fixedDelay is required")
            })?;
            let delay = ctx.istio_duration(format!("{p}.fixedDelay"), fixed)?;
            // `percentage` wins over the deprecated integer `percent`; neither: no request.
            let percentage = match (&d.percentage, d.percent) {
                (Some(pct), _) => ctx.percentage(format!("{p}.percentage.value"), pct.value)?,
                (None, Some(n)) => ctx.percentage(format!("{p}.percent"), n as f64)?,
                (None, None) => 0.0,
            };
            Some(FaultDelay { delay, percentage })
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let p = format!("{p}.abort");
            if a.http2_error.is_some() {
                return Err(ctx.invalid(
                    format!("{p}.http2Error"),
                    "http2Error aborts are not supported (Istio refuses them too)",
                ));
            }
            let status = match (a.http_status, a.grpc_status.as_deref()) {
                (Some(_), Some(_)) => {
                    return Err(ctx.invalid(
                        format!("{p}.grpcStatus"),
                        "grpcStatus cannot be combined with httpStatus",
                    ));
                }
                (Some(code), None) => {
                    AbortStatus::Http(http_status(ctx, format!("{p}.httpStatus"), code)?)
                }
                (None, Some(name)) => {
                    let code = GRPC_STATUS
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, c)| *c)
                        .ok_or_else(|| {
                            let names: Vec<&str> = GRPC_STATUS.iter().map(|(n, _)| *n).collect();
                            ctx.not_one_of(format!("{p}.grpcStatus"), name, &names.join(", "))
                        })?;
                    AbortStatus::Grpc(code)
                }
                (None, None) => {
                    return Err(ctx.invalid(p, "one of httpStatus or grpcStatus is required"));
                }
            };
            let percentage = match &a.percentage {
                Some(pct) => ctx.percentage(format!("{p}.percentage.value"), pct.value)?,
                None => 0.0,
            };
            Some(FaultAbort { status, percentage })
        }
    };
    Ok(Fault { delay, abort })
}

fn mirrors(ctx: &Ctx<'_>, p: &str, r: &ncrd::HttpRoute) -> Result<Vec<Mirror>> {
    let mut out = Vec::new();
    if let Some(mirror) = &r.mirror {
        let percentage = match (&r.mirror_percentage, r.mirror_percent) {
            (Some(pct), _) => ctx.percentage(format!("{p}.mirrorPercentage.value"), pct.value)?,
            (None, Some(n)) => ctx.percentage(format!("{p}.mirrorPercent"), n as f64)?,
            (None, None) => 100.0,
        };
        out.push(Mirror {
            destination: ctx.destination(&format!("{p}.mirror"), mirror)?,
            percentage,
        });
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        let field = format!("{p}.mirrors[{j}]");
        let percentage = match &m.percentage {
            Some(pct) => ctx.percentage(format!("{field}.percentage.value"), pct.value)?,
            None => 100.0,
        };
        out.push(Mirror {
            destination: ctx.destination(&format!("{field}.destination"), &m.destination)?,
            percentage,
        });
    }
    Ok(out)
}

fn cors_policy(ctx: &Ctx<'_>, p: &str, c: &ncrd::CorsPolicy) -> Result<CorsPolicy> {
    let mut allow_origins = Vec::new();
    for (j, sm) in c.allow_origins.iter().enumerate() {
        let field = format!("{p}.allowOrigins[{j}]");
        match ctx.value_match(&field, sm, false)? {
            Some(ValueMatch::Exact(s) | ValueMatch::Prefix(s)) if s.is_empty() => {
                return Err(ctx.invalid(field, "an origin match must not be empty"));
            }
            Some(m) => allow_origins.push(m),
            None => return Err(ctx.invalid(field, "one of exact, prefix or regex is required")),
        }
    }
    // The deprecated form: exact origins, `*` for any.
    for origin in &c.allow_origin {
        allow_origins.push(if origin == "*" {
            ValueMatch::Prefix(String::new())
        } else {
            ValueMatch::Exact(origin.clone())
        });
    }
    for (j, method) in c.allow_methods.iter().enumerate() {
        if !CORS_METHODS.contains(&method.as_str()) {
            return Err(ctx.not_one_of(
                format!("{p}.allowMethods[{j}]"),
                method,
                &CORS_METHODS.join(", "),
            ));
        }
    }
    if c.unmatched_preflights.is_some() {
        debug!(virtual_service = %ctx.key, "corsPolicy.unmatchedPreflights is not applied by the waypoint yet; ignored");
    }
    Ok(CorsPolicy {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: c
            .max_age
            .as_deref()
            .map(|d| ctx.duration(format!("{p}.maxAge"), d))
            .transpose()?,
        allow_credentials: c.allow_credentials,
    })
}

/// `None`: every match of the route is for gateways only.
fn tcp_route(ctx: &Ctx<'_>, p: &str, r: &ncrd::TcpRoute) -> Result<Option<TcpRoute>> {
    let mut matches = Vec::new();
    let mut gateway_only = 0;
    for (j, m) in r.matches.iter().enumerate() {
        let field = format!("{p}.match[{j}]");
        let l4 = l4_match(
            ctx,
            &field,
            &m.destination_subnets,
            m.port,
            &m.source_labels,
            &m.source_namespace,
        )?;
        if !ctx.match_bound(&m.gateways) {
            gateway_only += 1;
            continue;
        }
        matches.push(l4);
    }
    let route = l4_destinations(ctx, p, &r.route, "TCP")?;
    if !r.matches.is_empty() && gateway_only == r.matches.len() {
        return Ok(None);
    }
    Ok(Some(TcpRoute { matches, route }))
}

/// A `tls` route (SNI routing of unterminated TLS), checked as Istio's validation does: every
/// match names `sniHosts`, each within one of the VirtualService's `hosts`. `None`: every match
/// is for other gateways.
fn tls_route(
    ctx: &Ctx<'_>,
    p: &str,
    r: &ncrd::TlsRoute,
    hosts: &[String],
) -> Result<Option<TlsRoute>> {
    if r.matches.is_empty() {
        return Err(ctx.invalid(
            format!("{p}.match"),
            "a TLS route needs at least one match with sniHosts",
        ));
    }
    let mut matches = Vec::new();
    for (j, m) in r.matches.iter().enumerate() {
        let field = format!("{p}.match[{j}]");
        if m.sni_hosts.is_empty() {
            return Err(ctx.invalid(
                format!("{field}.sniHosts"),
                "at least one SNI name is required",
            ));
        }
        let mut sni_hosts = Vec::with_capacity(m.sni_hosts.len());
        for (k, written) in m.sni_hosts.iter().enumerate() {
            let sni = ctx.host(format!("{field}.sniHosts[{k}]"), written)?;
            let within = hosts
                .iter()
                .any(|h| h == "*" || h == &sni || host_covers(h, &sni));
            if !within {
                return Err(ctx.invalid(
                    format!("{field}.sniHosts[{k}]"),
                    format!("{sni:?} is not within any of the VirtualService's hosts {hosts:?}"),
                ));
            }
            sni_hosts.push(sni);
        }
        let l4 = l4_match(
            ctx,
            &field,
            &m.destination_subnets,
            m.port,
            &m.source_labels,
            &m.source_namespace,
        )?;
        if ctx.match_bound(&m.gateways) {
            matches.push(TlsMatch { sni_hosts, l4 });
        }
    }
    let route = l4_destinations(ctx, p, &r.route, "TLS")?;
    if matches.is_empty() {
        return Ok(None);
    }
    Ok(Some(TlsRoute { matches, route }))
}

/// Whether the host pattern `pattern` (`*.example.com`) covers `name` (a name or a narrower
/// pattern), as Envoy's domains: a wildcard covers one or more labels in front of its suffix.
fn host_covers(pattern: &str, name: &str) -> bool {
    pattern
        .strip_prefix('*')
        .is_some_and(|suffix| name.len() > suffix.len() && name.ends_with(suffix))
}

/// The L4 conditions of a `tcp` or `tls` match.
fn l4_match(
    ctx: &Ctx<'_>,
    field: &str,
    destination_subnets: &[String],
    port: Option<i64>,
    source_labels: &BTreeMap<String, String>,
    source_namespace: &Option<String>,
) -> Result<L4Match> {
    let destination_subnets = destination_subnets
        .iter()
        .enumerate()
        .map(|(k, s)| ip_block(ctx.key, format!("{field}.destinationSubnets[{k}]"), s))
        .collect::<Result<Vec<_>>>()?;
    let port = match port {
        None | Some(0) => None,
        Some(n) => Some(ctx.port(format!("{field}.port"), n)?),
    };
    Ok(L4Match {
        port,
        destination_subnets,
        source_labels: source_labels.clone(),
        source_namespace: source_namespace.clone().filter(|n| !n.is_empty()),
    })
}

/// The weighted destinations of a `tcp` or `tls` route (`what`, for the message).
fn l4_destinations(
    ctx: &Ctx<'_>,
    p: &str,
    written: &[ncrd::RouteDestination],
    what: &str,
) -> Result<Vec<RouteDestination>> {
    if written.is_empty() {
        return Err(ctx.invalid(
            format!("{p}.route"),
            format!("a {what} route needs at least one destination"),
        ));
    }
    let mut route = Vec::new();
    for (j, d) in written.iter().enumerate() {
        let field = format!("{p}.route[{j}]");
        route.push(RouteDestination {
            destination: ctx.destination(&format!("{field}.destination"), &d.destination)?,
            weight: ctx.weight(format!("{field}.weight"), d.weight)?,
            headers: HeaderOperations::default(),
        });
    }
    ctx.check_weights(format!("{p}.route"), &route)?;
    Ok(route)
}

// ---------------------------------------------------------------------------------------------
// DestinationRule

/// The parts of a `trafficPolicy` that were written; merged with the rule's at subset level.
#[derive(Debug, Default)]
struct PartialPolicy {
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<crate::model::OutlierDetection>,
}

impl PartialPolicy {
    /// Defaults under `self`, then `subset` over it, field by field (Istio's merge).
    fn effective(&self, subset: Option<&PartialPolicy>) -> TrafficPolicy {
        let pick = |f: fn(&PartialPolicy) -> bool| subset.filter(|s| f(s)).unwrap_or(self);
        let defaults = TrafficPolicy::default();
        TrafficPolicy {
            load_balancer: pick(|p| p.load_balancer.is_some())
                .load_balancer
                .clone()
                .unwrap_or(defaults.load_balancer),
            connection_pool: pick(|p| p.connection_pool.is_some())
                .connection_pool
                .clone()
                .unwrap_or(defaults.connection_pool),
            outlier_detection: pick(|p| p.outlier_detection.is_some())
                .outlier_detection
                .clone(),
        }
    }
}

pub(super) fn destination_rule(
    config: &TranslateConfig,
    key: &ObjectKey,
    dr: &ncrd::DestinationRule,
) -> Result<AcceptedRoute<DestinationRule>> {
    let ctx = Ctx {
        config,
        key,
        binding: Binding::Mesh,
    };
    let spec = &dr.spec;
    let host = ctx.host("spec.host".to_owned(), &spec.host)?;
    let top = spec
        .traffic_policy
        .as_ref()
        .map(|tp| traffic_policy(&ctx, "spec.trafficPolicy", tp))
        .transpose()?
        .unwrap_or_default();
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            return Err(ctx.invalid(format!("{field}.name"), "a name is required"));
        }
        ctx.subset_name(format!("{field}.name"), &s.name)?;
        if let Some(j) = subsets.iter().position(|other| other.name == s.name) {
            return Err(ctx.invalid(
                format!("{field}.name"),
                format!(
                    "duplicate subset name {:?} (also spec.subsets[{j}])",
                    s.name
                ),
            ));
        }
        let own = s
            .traffic_policy
            .as_ref()
            .map(|tp| traffic_policy(&ctx, &format!("{field}.trafficPolicy"), tp))
            .transpose()?;
        subsets.push(Subset {
            name: s.name.clone(),
            labels: s.labels.clone(),
            traffic_policy: top.effective(own.as_ref()),
        });
    }
    if spec.workload_selector.is_some() {
        debug!(destination_rule = %key, "workloadSelector scopes a rule to sidecars; the waypoint applies the rule regardless");
    }
    let created_at = dr.metadata.creation_timestamp.as_ref().map(|t| t.0);
    Ok(AcceptedRoute {
        value: DestinationRule {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            host,
            traffic_policy: top.effective(None),
            subsets,
            created: created_at.map(|t| t.to_string()),
        },
        created_at,
        subset_refs: Vec::new(),
    })
}

fn traffic_policy(ctx: &Ctx<'_>, p: &str, tp: &ncrd::TrafficPolicy) -> Result<PartialPolicy> {
    let ignored = [
        ("tls", tp.tls.is_some()),
        ("portLevelSettings", !tp.port_level_settings.is_empty()),
        ("tunnel", tp.tunnel.is_some()),
        ("proxyProtocol", tp.proxy_protocol.is_some()),
        ("retryBudget", tp.retry_budget.is_some()),
    ];
    let any_ignored = ignored.iter().any(|(_, set)| *set);
    if tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && !any_ignored
    {
        return Err(ctx.invalid(p, "a trafficPolicy needs at least one field"));
    }
    for (name, set) in ignored {
        if set {
            debug!(destination_rule = %ctx.key, field = %format_args!("{p}.{name}"), "not applied by the waypoint; ignored");
        }
    }
    Ok(PartialPolicy {
        load_balancer: tp
            .load_balancer
            .as_ref()
            .map(|lb| load_balancer(ctx, &format!("{p}.loadBalancer"), lb))
            .transpose()?,
        connection_pool: tp
            .connection_pool
            .as_ref()
            .map(|cp| connection_pool(ctx, &format!("{p}.connectionPool"), cp))
            .transpose()?,
        outlier_detection: tp
            .outlier_detection
            .as_ref()
            .map(|od| outlier_detection(ctx, &format!("{p}.outlierDetection"), od))
            .transpose()?,
    })
}

fn load_balancer(ctx: &Ctx<'_>, p: &str, lb: &ncrd::LoadBalancerSettings) -> Result<LoadBalancer> {
    if lb.locality_lb_setting.is_some() || lb.warmup_duration_secs.is_some() || lb.warmup.is_some()
    {
        debug!(destination_rule = %ctx.key, field = p, "locality and warmup settings are not applied by the waypoint; ignored");
    }
    match (lb.simple.as_deref(), &lb.consistent_hash) {
        (Some(_), Some(_)) => Err(ctx.invalid(
            format!("{p}.consistentHash"),
            "consistentHash cannot be combined with simple",
        )),
        (None | Some("UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN"), None) => {
            Ok(LoadBalancer::LeastRequest)
        }
        (Some("ROUND_ROBIN"), None) => Ok(LoadBalancer::RoundRobin),
        (Some("RANDOM"), None) => Ok(LoadBalancer::Random),
        (Some("PASSTHROUGH"), None) => Err(ctx.invalid(
            format!("{p}.simple"),
            "PASSTHROUGH is not supported by the waypoint: it forwards to the original destination address, which a waypoint does not have; use LEAST_REQUEST",
        )),
        (Some(other), None) => Err(ctx.not_one_of(
            format!("{p}.simple"),
            other,
            "UNSPECIFIED, LEAST_REQUEST, LEAST_CONN, ROUND_ROBIN, RANDOM",
        )),
        (None, Some(ch)) => consistent_hash(ctx, &format!("{p}.consistentHash"), ch),
    }
}

fn consistent_hash(ctx: &Ctx<'_>, p: &str, ch: &ncrd::ConsistentHashLb) -> Result<LoadBalancer> {
    if ch.ring_hash.is_some() || ch.maglev.is_some() || ch.minimum_ring_size.is_some() {
        debug!(destination_rule = %ctx.key, field = p, "hash ring tuning is not applied by the waypoint; ignored");
    }
    let mut keys = Vec::new();
    if let Some(name) = ch.http_header_name.as_deref().filter(|n| !n.is_empty()) {
        keys.push(HashKey::Header(name.to_ascii_lowercase()));
    }
    if let Some(cookie) = &ch.http_cookie {
        if cookie.name.is_empty() {
            return Err(ctx.invalid(format!("{p}.httpCookie.name"), "a cookie name is required"));
        }
        keys.push(HashKey::Cookie {
            name: cookie.name.clone(),
            path: cookie.path.clone().filter(|s| !s.is_empty()),
            // 0s is allowed: the generated cookie is then a session cookie.
            ttl: cookie
                .ttl
                .as_deref()
                .map(|t| ctx.duration(format!("{p}.httpCookie.ttl"), t))
                .transpose()?,
        });
    }
    if ch.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(name) = ch
        .http_query_parameter_name
        .as_deref()
        .filter(|n| !n.is_empty())
    {
        keys.push(HashKey::QueryParameter(name.to_owned()));
    }
    match keys.len() {
        1 => Ok(LoadBalancer::ConsistentHash(keys.remove(0))),
        0 => Err(ctx.invalid(
            p,
            "one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required",
        )),
        _ => Err(ctx.invalid(
            p,
            "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set",
        )),
    }
}

fn connection_pool(
    ctx: &Ctx<'_>,
    p: &str,
    cp: &ncrd::ConnectionPoolSettings,
) -> Result<ConnectionPool> {
    if cp.tcp.is_none() && cp.http.is_none() {
        return Err(ctx.invalid(p, "a connectionPool needs tcp, http or both"));
    }
    let mut pool = ConnectionPool::default();
    if let Some(tcp) = &cp.tcp {
        let p = format!("{p}.tcp");
        if let Some(n) = ctx.limit(format!("{p}.maxConnections"), tcp.max_connections)? {
            pool.max_connections = n;
        }
        if let Some(t) = &tcp.connect_timeout {
            pool.connect_timeout = ctx.istio_duration(format!("{p}.connectTimeout"), t)?;
        }
        if let Some(t) = &tcp.max_connection_duration {
            ctx.istio_duration(format!("{p}.maxConnectionDuration"), t)?;
        }
        if let Some(t) = &tcp.idle_timeout {
            // 0s disables the timeout; anything else is validated as Istio does.
            if !ctx.duration(format!("{p}.idleTimeout"), t)?.is_zero() {
                ctx.istio_duration(format!("{p}.idleTimeout"), t)?;
            }
        }
        if tcp.max_connection_duration.is_some()
            || tcp.idle_timeout.is_some()
            || tcp.tcp_keepalive.is_some()
        {
            debug!(destination_rule = %ctx.key, field = p, "TCP keepalive, idle and lifetime settings are not applied by the waypoint; ignored");
        }
    }
    if let Some(http) = &cp.http {
        let p = format!("{p}.http");
        if let Some(n) = ctx.limit(
            format!("{p}.http1MaxPendingRequests"),
            http.http1_max_pending_requests,
        )? {
            pool.http1_max_pending_requests = n;
        }
        if let Some(n) = ctx.limit(format!("{p}.http2MaxRequests"), http.http2_max_requests)? {
            pool.http2_max_requests = n;
        }
        if let Some(n) = ctx.limit(
            format!("{p}.maxRequestsPerConnection"),
            http.max_requests_per_connection,
        )? {
            pool.max_requests_per_connection = n;
        }
        if let Some(n) = ctx.limit(format!("{p}.maxRetries"), http.max_retries)? {
            pool.max_retries = n;
        }
        ctx.limit(
            format!("{p}.maxConcurrentStreams"),
            http.max_concurrent_streams,
        )?;
        if let Some(t) = &http.idle_timeout {
            pool.idle_timeout = ctx.istio_duration(format!("{p}.idleTimeout"), t)?;
        }
        match http.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT" | "DO_NOT_UPGRADE") => {}
            Some("UPGRADE") if http.use_client_protocol == Some(true) => {
                return Err(ctx.invalid(
                    format!("{p}.useClientProtocol"),
                    "useClientProtocol cannot be true when h2UpgradePolicy is UPGRADE",
                ));
            }
            Some("UPGRADE") => {}
            Some(other) => {
                return Err(ctx.not_one_of(
                    format!("{p}.h2UpgradePolicy"),
                    other,
                    "DEFAULT, DO_NOT_UPGRADE, UPGRADE",
                ));
            }
        }
    }
    Ok(pool)
}

fn outlier_detection(
    ctx: &Ctx<'_>,
    p: &str,
    od: &ncrd::OutlierDetection,
) -> Result<crate::model::OutlierDetection> {
    let count = |field: &str, value: Option<i64>| -> Result<Option<u32>> {
        match value {
            None => Ok(None),
            Some(n) if n < 0 => {
                Err(ctx.invalid(format!("{p}.{field}"), format!("{n} is negative")))
            }
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| ctx.invalid(format!("{p}.{field}"), format!("{n} is too large"))),
        }
    };
    let percent = |field: &str, value: Option<i64>| -> Result<Option<u32>> {
        match value {
            None => Ok(None),
            Some(n @ 0..=100) => Ok(Some(n as u32)),
            Some(n) => Err(ctx.invalid(
                format!("{p}.{field}"),
                format!("{n} is not a percentage between 0 and 100"),
            )),
        }
    };
    let deprecated_errors = count("consecutiveErrors", od.consecutive_errors)?.filter(|n| *n > 0);
    let local_origin = count(
        "consecutiveLocalOriginFailures",
        od.consecutive_local_origin_failures,
    )?;
    if local_origin.is_some_and(|n| n > 0) && od.split_external_local_origin_errors != Some(true) {
        return Err(ctx.invalid(
            format!("{p}.consecutiveLocalOriginFailures"),
            "consecutiveLocalOriginFailures needs splitExternalLocalOriginErrors: true",
        ));
    }
    percent("minHealthPercent", od.min_health_percent)?;
    if od.min_health_percent.is_some() || od.split_external_local_origin_errors.is_some() {
        debug!(destination_rule = %ctx.key, field = p, "minHealthPercent and local-origin splitting are not applied by the waypoint; ignored");
    }
    Ok(crate::model::OutlierDetection {
        // The deprecated `consecutiveErrors` switched 5xx ejection off in favour of gateway
        // errors (Istio: "only listen to gateway errors", istio/api#617).
        consecutive_5xx_errors: count("consecutive5xxErrors", od.consecutive_5xx_errors)?
            .unwrap_or(if deprecated_errors.is_some() { 0 } else { 5 }),
        consecutive_gateway_errors: count(
            "consecutiveGatewayErrors",
            od.consecutive_gateway_errors,
        )?
        .or(deprecated_errors)
        .unwrap_or(0),
        interval: od
            .interval
            .as_deref()
            .map(|d| ctx.istio_duration(format!("{p}.interval"), d))
            .transpose()?
            .unwrap_or(Duration::from_secs(10)),
        base_ejection_time: od
            .base_ejection_time
            .as_deref()
            .map(|d| ctx.istio_duration(format!("{p}.baseEjectionTime"), d))
            .transpose()?
            .unwrap_or(Duration::from_secs(30)),
        max_ejection_percent: percent("maxEjectionPercent", od.max_ejection_percent)?
            .filter(|n| *n > 0)
            .unwrap_or(10),
    })
}

// ---------------------------------------------------------------------------------------------
// Gateway

/// `None`: a Gateway of another class, somebody else's (not an error).
pub(super) fn waypoint_gateway(key: &ObjectKey, gw: &ncrd::Gateway) -> Option<WaypointGateway> {
    if gw.spec.gateway_class_name != WAYPOINT_GATEWAY_CLASS {
        debug!(gateway = %key, class = gw.spec.gateway_class_name, "not a waypoint Gateway; ignored");
        return None;
    }
    Some(WaypointGateway {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Assembly

/// What [`assemble_routes`] builds.
pub(super) struct Routes {
    pub(super) virtual_services: Vec<Arc<VirtualService>>,
    pub(super) destination_rules: Vec<Arc<DestinationRule>>,
    /// Routes to subsets no DestinationRule defines (IST0101).
    pub(super) warnings: Vec<ConfigWarning>,
}

/// Istio's analyzer code for a reference to something that does not exist.
pub const REFERENCED_RESOURCE_NOT_FOUND: &str = "IST0101";

/// Resolves `<name>.<namespace>` hosts against the Services that exist, orders VirtualServices
/// and DestinationRules oldest first (Istio's precedence), reports shadowed ones, and warns of
/// every route or mirror to a subset that the DestinationRule in force for its host (the one the
/// waypoint uses) does not define, as `istioctl analyze` does (IST0101). The VirtualService still
/// applies, as in Istio: requests to such a subset get 503 `NC`.
pub(super) fn assemble_routes(
    services: &BTreeMap<String, Arc<Service>>,
    virtual_services: Vec<&AcceptedRoute<VirtualService>>,
    from_http_routes: Vec<VirtualService>,
    destination_rules: Vec<&AcceptedRoute<DestinationRule>>,
) -> Routes {
    let short: HashMap<String, &str> = services
        .values()
        .map(|s| (format!("{}.{}", s.name, s.namespace), s.hostname.as_str()))
        .collect();
    let resolve = |host: &mut String| {
        if let Some(full) = short.get(host.as_str()) {
            *host = (*full).to_owned();
        }
    };
    let known_host = |host: &str| {
        services.values().any(|s| match host.strip_prefix('*') {
            Some(suffix) => s.hostname.ends_with(suffix),
            None => s.hostname == host,
        })
    };

    let mut subset_refs: Vec<(String, SubsetRef)> = Vec::new();
    let mut vss: Vec<(Option<Timestamp>, VirtualService)> = virtual_services
        .into_iter()
        .map(|a| {
            for r in &a.subset_refs {
                let mut r = r.clone();
                resolve(&mut r.host);
                subset_refs.push((a.value.key(), r));
            }
            let mut vs = a.value.clone();
            vs.hosts.iter_mut().for_each(resolve);
            for route in &mut vs.http {
                if let HttpAction::Route(destinations) = &mut route.action {
                    destinations
                        .iter_mut()
                        .for_each(|d| resolve(&mut d.destination.host));
                }
                route
                    .mirrors
                    .iter_mut()
                    .for_each(|m| resolve(&mut m.destination.host));
            }
            for route in &mut vs.tcp {
                route
                    .route
                    .iter_mut()
                    .for_each(|d| resolve(&mut d.destination.host));
            }
            (a.created_at, vs)
        })
        .collect();
    // Istio's sortConfigByCreationTime: creation time, then name, then namespace. Objects
    // without a timestamp (files) sort first, as Go's zero time does.
    vss.sort_by(|(ta, a), (tb, b)| {
        ta.cmp(tb)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.namespace.cmp(&b.namespace))
    });
    // A Service's HTTPRoutes come before any VirtualService for it (see `gateway_routes`).
    let vss: Vec<(Option<Timestamp>, VirtualService)> = from_http_routes
        .into_iter()
        .map(|vs| (None, vs))
        .chain(vss)
        .collect();
    let mut owner: HashMap<&str, String> = HashMap::new();
    for (_, vs) in &vss {
        for host in &vs.hosts {
            match owner.get(host.as_str()) {
                Some(first) => warn!(
                    virtual_service = %vs.describe(),
                    shadowed_by = %first,
                    host,
                    "other routes for this host take precedence (an older VirtualService, or HTTPRoutes attached to the Service); this one is not used for it"
                ),
                None => {
                    owner.insert(host, vs.describe());
                }
            }
        }
        if !vs.hosts.iter().any(|h| known_host(h)) {
            debug!(virtual_service = %vs.key(), hosts = ?vs.hosts, "no Service matches the hosts (yet); kept");
        }
    }
    let virtual_services = vss.into_iter().map(|(_, vs)| Arc::new(vs)).collect();

    let mut drs: Vec<(Option<Timestamp>, DestinationRule)> = destination_rules
        .into_iter()
        .map(|a| {
            let mut dr = a.value.clone();
            resolve(&mut dr.host);
            (a.created_at, dr)
        })
        .collect();
    drs.sort_by(|(ta, a), (tb, b)| {
        ta.cmp(tb)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.namespace.cmp(&b.namespace))
    });
    let mut owner: HashMap<&str, String> = HashMap::new();
    for (_, dr) in &drs {
        match owner.get(dr.host.as_str()) {
            Some(first) => warn!(
                destination_rule = %format_args!("DestinationRule {}", dr.key()),
                shadowed_by = %format_args!("DestinationRule {first}"),
                host = dr.host,
                "another DestinationRule for this host is older and takes precedence; this one is not used"
            ),
            None => {
                owner.insert(&dr.host, dr.key());
            }
        }
    }
    let mut warnings = Vec::new();
    for (vs, r) in subset_refs {
        let why = match drs.iter().find(|(_, dr)| dr.host == r.host) {
            None => format!("no DestinationRule has host {}", r.host),
            Some((_, dr)) if dr.subset(&r.subset).is_none() => {
                let defined: Vec<&str> = dr.subsets.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "DestinationRule {} (host {}) defines {}",
                    dr.key(),
                    r.host,
                    if defined.is_empty() {
                        "no subsets".to_owned()
                    } else {
                        format!("only {}", defined.join(", "))
                    }
                )
            }
            Some(_) => continue,
        };
        warnings.push(ConfigWarning {
            code: REFERENCED_RESOURCE_NOT_FOUND.to_owned(),
            kind: "VirtualService".to_owned(),
            object: format!("VirtualService {vs}"),
            field: r.field,
            message: format!(
                "Referenced host+subset in destinationrule not found: \"{}+{}\" ({why}); requests routed there fail with 503 NC",
                r.host, r.subset
            ),
        });
    }
    warnings.sort();
    let destination_rules = drs.into_iter().map(|(_, dr)| Arc::new(dr)).collect();
    Routes {
        virtual_services,
        destination_rules,
        warnings,
    }
}
