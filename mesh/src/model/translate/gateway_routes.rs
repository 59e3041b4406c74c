//! Gateway API `HTTPRoute` -> the route model the waypoint already applies for VirtualService
//! (one engine, one table): each route becomes, per Service it attaches to, entries of one
//! ordered list of [`HttpRoute`]s, sorted by the Gateway API's precedence.
//!
//! What the specification says (Gateway API v1.2, `HTTPRoute` reference), as applied here:
//!
//! - Attachment (GEP-1426, "mesh binding"): a `parentRefs` entry with `group: ""` and
//!   `kind: Service` attaches the route to that Service, at its waypoint; `port` limits it to
//!   one service port. A route in another namespace than the Service is a *consumer* route
//!   (GEP-1294): it applies only to clients in the route's namespace and takes precedence over
//!   the Service's own (*producer*) routes for them. `hostnames` are not used for Service
//!   parents ("GAMMA implementations SHOULD NOT infer any functionality from the hostnames
//!   field"). A `Gateway` parent of the ingress class attaches the route to its listeners
//!   ([`attach_to_gateways`]): the one named by `sectionName` and/or with `port`, else every
//!   listener, each only where its `allowedRoutes` admit the route's namespace and kind and
//!   where the route's `hostnames` meet the listener's `hostname` ("Listener" hostname
//!   matching; no hostnames: the listener's). Other kinds attach nothing.
//! - `HTTPRouteRule.matches`: none means one match on path prefix `/`. A path match is `Exact`,
//!   `PathPrefix` (the default; element-wise: `/abc` matches `/abc`, `/abc/` and `/abc/def`,
//!   not `/abcd`; a trailing `/` in the value is ignored) or `RegularExpression`. Header
//!   names are case-insensitive, query parameter names are not.
//! - Precedence ("HTTPRouteRule", matching precedence), across every rule of every route on the
//!   parent: an `Exact` path, then the `PathPrefix` with the most characters, then a method
//!   match, then the most header matches, then the most query parameter matches; ties go to
//!   the oldest route (creation timestamp), then to `{namespace}/{name}` in alphabetical
//!   order, then to the first rule and match in list order. `RegularExpression` paths rank
//!   below prefixes, as in Istio (the specification leaves them to the implementation).
//! - `backendRefs`: a Service (`group: ""`, `kind: Service`), whose `port` is required; weights
//!   are relative (default 1), a weight of 0 gets no traffic. A Service in another namespace
//!   needs a `ReferenceGrant` there (GEP-709: `from` group `gateway.networking.k8s.io`, kind
//!   `HTTPRoute`, the route's namespace; `to` group `""`, kind `Service`, the Service's name or
//!   none for all); mirrors too. A backend that cannot be resolved (another kind, or another
//!   namespace without a grant) gets its share of requests answered 500 ("HTTPBackendRef": "the implementation MUST return 500 for
//!   the share of requests the invalid backendRef would have received"); a rule with no
//!   backends (or only weight 0) and no redirect answers 500.
//! - Filters: `RequestHeaderModifier` / `ResponseHeaderModifier` (rule and backend level),
//!   `RequestRedirect` (scheme, hostname, port, `ReplaceFullPath`, status 301/302, default
//!   302), `URLRewrite` (hostname, `ReplaceFullPath`, `ReplacePrefixMatch` with a `PathPrefix`
//!   match only), `RequestMirror` (`percent` or `fraction`), `CORS` (experimental, GEP-1767,
//!   see [`cors`]). `ExtensionRef`, `ExternalAuth` and a redirect's `ReplacePrefixMatch` are
//!   refused with the field named, so a route never silently does less than it says.
//! - `timeouts.request` is the whole request's timeout, `timeouts.backendRequest` each attempt's;
//!   `0s` disables. Without `retry`, retries are Istio's default policy, as for a
//!   VirtualService without `retries` (Istio converts HTTPRoutes to its own routes the same
//!   way); the experimental `retry` (GEP-1731: attempts, codes, backoff) replaces it
//!   ([`route_retry`]); `sessionPersistence` is not applied (logged).
//! - An HTTPRoute and a VirtualService for one Service: the HTTPRoutes apply and the
//!   VirtualService is reported shadowed (`waypoint_config_conflicts`). Gateway API is the API
//!   Istio's ambient mode documents; a VirtualService there is alpha.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use tracing::debug;

use super::networking::{Ctx, istio_default_retries};
use super::{Kind, ObjectKey, TranslateConfig, TranslateError};
use crate::model::gateway_api_crd as gw;
use crate::model::{
    CorsPolicy, Destination, DirectResponse, HeaderEdits, HeaderOperations, HttpAction, HttpMatch,
    HttpRoute, L4Match, Mirror, NamedMatch, Redirect, RedirectPort, Regex, RetryCondition, RetryOn,
    RetryPolicy, Rewrite, RouteDestination, Service, TcpRoute, TlsMatch, TlsRoute,
    UNRESOLVED_BACKEND, ValueMatch, VirtualService, VirtualServiceOrigin,
};

type Result<T> = std::result::Result<T, TranslateError>;

/// One validated HTTPRoute, GRPCRoute, TCPRoute or TLSRoute, not yet attached (assembly does
/// it, knowing the Services and Gateways).
#[derive(Debug)]
pub(super) struct AcceptedGatewayRoute {
    /// `key.kind`: [`Kind::HttpRoute`], [`Kind::GrpcRoute`], [`Kind::TcpRoute`] or
    /// [`Kind::TlsRoute`].
    key: ObjectKey,
    created_at: Option<Timestamp>,
    parents: Vec<ServiceParent>,
    gateway_parents: Vec<GatewayParent>,
    /// `spec.hostnames`, lower case (used for Gateway parents only).
    hostnames: Vec<String>,
    /// For the status: `metadata.generation`, the Service and Gateway parents as written
    /// (defaults filled in), and every rule's backends (group, kind, namespace, name).
    generation: Option<i64>,
    status_parents: Vec<crate::model::ParentRef>,
    backends: Vec<(String, String, String, String)>,
    /// HTTPRoute and GRPCRoute: one entry per (rule, match), in the route's order.
    routes: Vec<(Rank, HttpRoute)>,
    /// TCPRoute and TLSRoute: the one rule's weighted backends (never empty: a rule without
    /// usable backends holds one [`UNRESOLVED_BACKEND`], so its connections are refused).
    l4: Vec<RouteDestination>,
}

impl AcceptedGatewayRoute {
    /// `HTTPRoute ns/name`, for logs and the routes a VirtualService-shaped list came from.
    fn describe(&self) -> String {
        format!("{} {}", self.key.kind.as_str(), self.key.namespace_name())
    }

    /// Its place in GEP-1294's route type order for one Service port ("Route types": of routes
    /// of different types on one Service and port, GRPCRoute wins, then HTTPRoute, TLSRoute,
    /// TCPRoute; the others are `Conflicted`). Greater wins.
    fn type_rank(&self) -> u8 {
        match self.key.kind {
            Kind::GrpcRoute => 3,
            Kind::HttpRoute => 2,
            Kind::TlsRoute => 1,
            _ => 0,
        }
    }

    fn is_l4(&self) -> bool {
        matches!(self.key.kind, Kind::TcpRoute | Kind::TlsRoute)
    }
}

/// A `parentRefs` entry naming a Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GatewayParent {
    /// `namespace/name`.
    gateway: String,
    section: Option<String>,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceParent {
    namespace: String,
    name: String,
    port: Option<u16>,
}

/// A match's place in the specification's precedence: greater sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// 2 `Exact`, 1 `PathPrefix`, 0 `RegularExpression`.
    path_kind: u8,
    path_len: usize,
    method: bool,
    headers: usize,
    query_params: usize,
}

pub(super) fn http_route(
    config: &TranslateConfig,
    key: &ObjectKey,
    route: &gw::HttpRoute,
) -> Result<AcceptedGatewayRoute> {
    let ctx = ctx(config, key);
    let spec = &route.spec;
    let mut accepted = common(&ctx, &route.metadata, &spec.parent_refs, &spec.hostnames)?;
    for (i, rule) in spec.rules.iter().enumerate() {
        rule_routes(
            &ctx,
            &format!("spec.rules[{i}]"),
            i,
            rule,
            &mut accepted.routes,
        )?;
    }
    accepted.backends = http_backend_keys(key, spec.rules.iter().flat_map(|r| &r.backend_refs));
    Ok(accepted)
}

fn ctx<'a>(config: &'a TranslateConfig, key: &'a ObjectKey) -> Ctx<'a> {
    Ctx {
        config,
        key,
        binding: super::networking::Binding::Mesh,
    }
}

/// Each backend as (group, kind, namespace, name) with the defaults filled in, for the status.
fn backend_keys<'b>(
    key: &ObjectKey,
    refs: impl Iterator<Item = (Option<&'b str>, Option<&'b str>, Option<&'b str>, &'b str)>,
) -> Vec<(String, String, String, String)> {
    refs.map(|(group, kind, namespace, name)| {
        (
            group.unwrap_or_default().to_owned(),
            kind.unwrap_or("Service").to_owned(),
            namespace.unwrap_or(&key.namespace).to_owned(),
            name.to_owned(),
        )
    })
    .collect()
}

/// [`backend_keys`] of HTTPRoute and GRPCRoute backends.
fn http_backend_keys<'b>(
    key: &ObjectKey,
    refs: impl Iterator<Item = &'b gw::HttpBackendRef>,
) -> Vec<(String, String, String, String)> {
    backend_keys(
        key,
        refs.map(|b| {
            (
                b.group.as_deref(),
                b.kind.as_deref(),
                b.namespace.as_deref(),
                b.name.as_str(),
            )
        }),
    )
}

/// What every route kind shares: `parentRefs` and `hostnames` ("CommonRouteSpec").
fn common(
    ctx: &Ctx<'_>,
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    parent_refs: &[gw::ParentReference],
    hostnames_in: &[String],
) -> Result<AcceptedGatewayRoute> {
    let key = ctx.key;
    let mut parents = Vec::new();
    let mut gateway_parents = Vec::new();
    let mut status_parents = Vec::new();
    for (i, parent) in parent_refs.iter().enumerate() {
        let p = format!("spec.parentRefs[{i}]");
        if parent.name.is_empty() {
            return Err(ctx.invalid(format!("{p}.name"), "a parentRef needs a name"));
        }
        let group = parent
            .group
            .as_deref()
            .unwrap_or("gateway.networking.k8s.io");
        let kind = parent.kind.as_deref().unwrap_or("Gateway");
        let port = parent
            .port
            .map(|n| ctx.port(format!("{p}.port"), n))
            .transpose()?;
        if matches!(
            (group, kind),
            ("", "Service") | ("gateway.networking.k8s.io", "Gateway")
        ) {
            status_parents.push(crate::model::ParentRef {
                group: group.to_owned(),
                kind: kind.to_owned(),
                namespace: parent
                    .namespace
                    .clone()
                    .unwrap_or_else(|| key.namespace.clone()),
                name: parent.name.clone(),
                section_name: parent.section_name.clone().filter(|s| !s.is_empty()),
                port,
            });
        }
        match (group, kind) {
            ("", "Service") => parents.push(ServiceParent {
                namespace: parent
                    .namespace
                    .clone()
                    .unwrap_or_else(|| key.namespace.clone()),
                name: parent.name.clone(),
                port,
            }),
            ("gateway.networking.k8s.io", "Gateway") => gateway_parents.push(GatewayParent {
                gateway: format!(
                    "{}/{}",
                    parent.namespace.as_deref().unwrap_or(&key.namespace),
                    parent.name
                ),
                section: parent.section_name.clone().filter(|s| !s.is_empty()),
                port,
            }),
            _ => debug!(
                route = %key, group, kind,
                "parentRef of a kind routes cannot attach to (Service or Gateway); ignored"
            ),
        }
    }
    let mut hostnames = Vec::new();
    for (i, h) in hostnames_in.iter().enumerate() {
        let lower = h.to_ascii_lowercase();
        if !super::ingress::is_host_name(&lower) {
            return Err(ctx.invalid(
                format!("spec.hostnames[{i}]"),
                format!(
                    "{h:?} is not a hostname: `example.com` or `*.example.com` (no IP, no port)"
                ),
            ));
        }
        hostnames.push(lower);
    }
    Ok(AcceptedGatewayRoute {
        key: key.clone(),
        created_at: metadata.creation_timestamp.as_ref().map(|t| t.0),
        parents,
        gateway_parents,
        hostnames,
        generation: metadata.generation,
        status_parents,
        backends: Vec::new(),
        routes: Vec::new(),
        l4: Vec::new(),
    })
}

/// A `GRPCRoute` (Gateway API v1.2, "GRPCRoute"). A gRPC call is an HTTP/2 `POST` to
/// `/{service}/{method}`, so each match becomes the HTTP path match it means ("GRPCMethodMatch"):
/// `Exact` service and method an exact path, a service alone the path prefix `/{service}`, a
/// method alone or a `RegularExpression` a path regex (a missing part matches any name). The
/// specification's precedence (the longest service, then the longest method, then the most
/// headers; then the oldest route, then namespace/name) orders these as the HTTP ranks do: an
/// exact path, then the longest prefix, then regexes, then the most headers. No matches: every
/// request. Filters: `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror`
/// (`ExtensionRef` is refused); backends, weights, grants and 500 for an unresolvable backend's
/// share as for HTTPRoute. gRPC has no timeouts or retries of its own here: Istio's defaults.
pub(super) fn grpc_route(
    config: &TranslateConfig,
    key: &ObjectKey,
    route: &gw::GrpcRoute,
) -> Result<AcceptedGatewayRoute> {
    let ctx = ctx(config, key);
    let spec = &route.spec;
    let mut accepted = common(&ctx, &route.metadata, &spec.parent_refs, &spec.hostnames)?;
    for (i, rule) in spec.rules.iter().enumerate() {
        let p = format!("spec.rules[{i}]");
        for (j, f) in rule.filters.iter().enumerate() {
            if matches!(f.kind.as_str(), "RequestRedirect" | "URLRewrite") {
                return Err(ctx.invalid(
                    format!("{p}.filters[{j}].type"),
                    format!(
                        "{} is not a GRPCRoute filter (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror)",
                        f.kind
                    ),
                ));
            }
        }
        if rule.session_persistence.is_some() {
            debug!(route = %key, rule = p, "sessionPersistence (experimental) is not applied");
        }
        let mut matches = Vec::new();
        for (j, m) in rule.matches.iter().enumerate() {
            matches.push(grpc_match(&ctx, &format!("{p}.matches[{j}]"), m)?);
        }
        let as_http = gw::HttpRouteRule {
            name: rule.name.clone(),
            matches,
            filters: rule.filters.clone(),
            backend_refs: rule.backend_refs.clone(),
            timeouts: None,
            retry: None,
            session_persistence: None,
        };
        rule_routes(&ctx, &p, i, &as_http, &mut accepted.routes)?;
    }
    accepted.backends = http_backend_keys(key, spec.rules.iter().flat_map(|r| &r.backend_refs));
    Ok(accepted)
}

/// One `GRPCRouteMatch` as the HTTPRoute match it means (see [`grpc_route`]).
fn grpc_match(ctx: &Ctx<'_>, p: &str, m: &gw::GrpcRouteMatch) -> Result<gw::HttpRouteMatch> {
    let path = match &m.method {
        None => None,
        Some(method) => {
            let service = method.service.as_deref().filter(|s| !s.is_empty());
            let name = method.method.as_deref().filter(|s| !s.is_empty());
            let kind = method.kind.as_deref().unwrap_or("Exact");
            if service.is_none() && name.is_none() {
                return Err(ctx.invalid(
                    format!("{p}.method"),
                    "a method match needs a service, a method or both",
                ));
            }
            let (kind, value) = match kind {
                "Exact" => {
                    // "Service: [...] MUST be a valid fully qualified gRPC service name";
                    // "Method: [...] MUST be a valid gRPC method name".
                    let valid = |field: &str, v: &str, dots: bool| {
                        let ok = v.split('.').all(|part| {
                            !part.is_empty()
                                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        }) && (dots || !v.contains('.'));
                        if ok {
                            Ok(())
                        } else {
                            Err(ctx.invalid(
                                format!("{p}.method.{field}"),
                                format!(
                                    "{v:?} is not a gRPC {field} name (letters, digits, _{})",
                                    if dots { " and . between parts" } else { "" }
                                ),
                            ))
                        }
                    };
                    if let Some(s) = service {
                        valid("service", s, true)?;
                    }
                    if let Some(n) = name {
                        valid("method", n, false)?;
                    }
                    match (service, name) {
                        (Some(s), Some(n)) => ("Exact", format!("/{s}/{n}")),
                        (Some(s), None) => ("PathPrefix", format!("/{s}")),
                        (None, Some(n)) => {
                            ("RegularExpression", format!("/[^/]+/{}", regex::escape(n)))
                        }
                        (None, None) => unreachable!("checked above"),
                    }
                }
                "RegularExpression" => (
                    "RegularExpression",
                    format!(
                        "/(?:{})/(?:{})",
                        service.unwrap_or("[^/]+"),
                        name.unwrap_or("[^/]+")
                    ),
                ),
                other => {
                    return Err(ctx.not_one_of(
                        format!("{p}.method.type"),
                        other,
                        "Exact, RegularExpression",
                    ));
                }
            };
            Some(gw::HttpPathMatch {
                kind: Some(kind.to_owned()),
                value: Some(value),
            })
        }
    };
    Ok(gw::HttpRouteMatch {
        path,
        headers: m.headers.clone(),
        query_params: Vec::new(),
        method: None,
    })
}

/// A `TCPRoute` or `TLSRoute` (Gateway API, "TCPRoute", "TLSRoute"): a connection goes to one
/// of the rule's backends by weight; a TLSRoute chooses by the ClientHello's SNI among its
/// `hostnames` (at a TLS `Passthrough` listener, meeting the listener's hostname). Neither kind
/// has matches, so one rule is all that can apply: a second is refused rather than ignored. A
/// backend that cannot be resolved, or a rule with no backend of weight > 0, refuses its share
/// of connections ("TCPRoute": "connections [...] MUST be rejected").
pub(super) fn l4_route(
    config: &TranslateConfig,
    key: &ObjectKey,
    route: &gw::L4Route,
) -> Result<AcceptedGatewayRoute> {
    let ctx = ctx(config, key);
    let spec = &route.spec;
    if key.kind == Kind::TcpRoute && !spec.hostnames.is_empty() {
        return Err(ctx.invalid(
            "spec.hostnames",
            "a TCPRoute has no hostnames; route TLS by SNI with a TLSRoute",
        ));
    }
    let mut accepted = common(&ctx, &route.metadata, &spec.parent_refs, &spec.hostnames)?;
    let Some(rule) = spec.rules.first() else {
        return Err(ctx.invalid("spec.rules", "one rule with backendRefs is required"));
    };
    if spec.rules.len() > 1 {
        return Err(ctx.invalid(
            "spec.rules[1]",
            format!(
                "a {} rule has no matches, so only one rule can apply; put every backend in spec.rules[0]",
                key.kind.as_str()
            ),
        ));
    }
    for (j, b) in rule.backend_refs.iter().enumerate() {
        let bp = format!("spec.rules[0].backendRefs[{j}]");
        let weight = weight(&ctx, &bp, b.weight)?;
        let reference = gw::BackendObjectReference {
            group: b.group.clone(),
            kind: b.kind.clone(),
            name: b.name.clone(),
            namespace: b.namespace.clone(),
            port: b.port,
        };
        let destination = backend_destination(&ctx, &bp, &reference)?;
        if weight > 0 {
            accepted.l4.push(RouteDestination {
                destination,
                weight,
                headers: HeaderOperations::default(),
            });
        }
    }
    if accepted.l4.is_empty() {
        accepted.l4.push(RouteDestination {
            destination: unresolved(),
            weight: 1,
            headers: HeaderOperations::default(),
        });
    }
    accepted.backends = backend_keys(
        key,
        rule.backend_refs.iter().map(|b| {
            (
                b.group.as_deref(),
                b.kind.as_deref(),
                b.namespace.as_deref(),
                b.name.as_str(),
            )
        }),
    );
    Ok(accepted)
}

/// A backend's `weight`: default 1, between 0 and 1,000,000 ("BackendRef").
fn weight(ctx: &Ctx<'_>, p: &str, weight: Option<i64>) -> Result<u32> {
    match weight.unwrap_or(1) {
        n if n < 0 => Err(ctx.invalid(format!("{p}.weight"), format!("{n} is negative"))),
        n if n > 1_000_000 => {
            Err(ctx.invalid(format!("{p}.weight"), format!("{n} is larger than 1000000")))
        }
        n => Ok(n as u32),
    }
}

fn unresolved() -> Destination {
    Destination {
        host: UNRESOLVED_BACKEND.to_owned(),
        subset: None,
        port: None,
    }
}

/// The filters of a rule, validated.
#[derive(Default)]
struct RuleFilters {
    headers: HeaderOperations,
    redirect: Option<Redirect>,
    rewrite: Option<gw::UrlRewrite>,
    mirrors: Vec<Mirror>,
    cors: Option<CorsPolicy>,
}

fn rule_routes(
    ctx: &Ctx<'_>,
    p: &str,
    index: usize,
    rule: &gw::HttpRouteRule,
    out: &mut Vec<(Rank, HttpRoute)>,
) -> Result<()> {
    if rule.session_persistence.is_some() {
        debug!(route = %ctx.key, rule = p, "sessionPersistence (experimental) is not applied");
    }
    let filters = parse_filters(ctx, &format!("{p}.filters"), &rule.filters, true)?;
    let mut backends = Vec::new();
    for (j, backend) in rule.backend_refs.iter().enumerate() {
        let b = format!("{p}.backendRefs[{j}]");
        let weight = weight(ctx, &b, backend.weight)?;
        let backend_filters = parse_filters(ctx, &format!("{b}.filters"), &backend.filters, false)?;
        let reference = gw::BackendObjectReference {
            group: backend.group.clone(),
            kind: backend.kind.clone(),
            name: backend.name.clone(),
            namespace: backend.namespace.clone(),
            port: backend.port,
        };
        let destination = backend_destination(ctx, &b, &reference)?;
        if weight > 0 {
            backends.push(RouteDestination {
                destination,
                weight,
                headers: backend_filters.headers,
            });
        }
    }
    let timeouts = rule.timeouts.clone().unwrap_or_default();
    let timeout = |field: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|v| ctx.duration(format!("{p}.timeouts.{field}"), v))
            .transpose()
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    let request_timeout = timeout("request", &timeouts.request)?;
    let backend_timeout = timeout("backendRequest", &timeouts.backend_request)?;
    if let (Some(request), Some(backend)) = (request_timeout, backend_timeout)
        && backend > request
    {
        return Err(ctx.invalid(
            format!("{p}.timeouts.backendRequest"),
            format!("{backend:?} is longer than timeouts.request ({request:?})"),
        ));
    }
    let action = match (&filters.redirect, backends.is_empty()) {
        (Some(redirect), _) => HttpAction::Redirect(redirect.clone()),
        (None, false) => HttpAction::Route(backends),
        (None, true) => HttpAction::DirectResponse(DirectResponse {
            status: 500,
            body: None,
        }),
    };
    let mut retries = match &rule.retry {
        None => istio_default_retries(),
        Some(retry) => route_retry(ctx, &format!("{p}.retry"), retry)?,
    };
    retries.per_try_timeout = backend_timeout;
    let default_match = [gw::HttpRouteMatch::default()];
    let matches: &[gw::HttpRouteMatch] = if rule.matches.is_empty() {
        &default_match
    } else {
        &rule.matches
    };
    let name = format!(
        "{}:{}:{}",
        ctx.key.kind.as_str(),
        ctx.key.namespace_name(),
        rule.name.clone().unwrap_or_else(|| index.to_string())
    );
    for (j, m) in matches.iter().enumerate() {
        let mp = format!("{p}.matches[{j}]");
        let (rank, matched) = route_match(ctx, &mp, m)?;
        let rewrite = filters
            .rewrite
            .as_ref()
            .map(|r| rewrite(ctx, &format!("{p}.filters"), r, &matched))
            .transpose()?;
        out.push((
            rank,
            HttpRoute {
                name: Some(name.clone()),
                matches: vec![matched],
                action: action.clone(),
                rewrite,
                timeout: request_timeout,
                retries: retries.clone(),
                fault: None,
                mirrors: filters.mirrors.clone(),
                cors: filters.cors.clone(),
                headers: filters.headers.clone(),
            },
        ));
    }
    Ok(())
}

fn route_match(ctx: &Ctx<'_>, p: &str, m: &gw::HttpRouteMatch) -> Result<(Rank, HttpMatch)> {
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.clone().unwrap_or_else(|| "/".to_owned());
    let kind = path.kind.as_deref().unwrap_or("PathPrefix");
    let (path_kind, uri) = match kind {
        "Exact" | "PathPrefix" => {
            if !value.starts_with('/') {
                return Err(ctx.invalid(
                    format!("{p}.path.value"),
                    format!("{value:?} must start with /"),
                ));
            }
            if value.contains("//") || value.contains(['?', '#']) {
                return Err(ctx.invalid(
                    format!("{p}.path.value"),
                    format!("{value:?} must not contain //, ? or #"),
                ));
            }
            if kind == "Exact" {
                (2, ValueMatch::Exact(value.clone()))
            } else {
                let trimmed = match value.trim_end_matches('/') {
                    "" => "/".to_owned(),
                    t => t.to_owned(),
                };
                (1, ValueMatch::PathPrefix(trimmed))
            }
        }
        "RegularExpression" => (
            0,
            ValueMatch::Regex(ctx.regex(format!("{p}.path.value"), &value)?),
        ),
        other => {
            return Err(ctx.not_one_of(
                format!("{p}.path.type"),
                other,
                "Exact, PathPrefix, RegularExpression",
            ));
        }
    };
    let named =
        |field: &str, list: &[gw::HttpValueMatch], lower: bool| -> Result<Vec<NamedMatch>> {
            let mut out: Vec<NamedMatch> = Vec::new();
            for (i, v) in list.iter().enumerate() {
                let f = format!("{p}.{field}[{i}]");
                if v.name.is_empty() {
                    return Err(ctx.invalid(format!("{f}.name"), "a name is required"));
                }
                let name = if lower {
                    v.name.to_ascii_lowercase()
                } else {
                    v.name.clone()
                };
                // "If multiple entries specify equivalent names, only the first entry with an
                // equivalent name MUST be considered."
                if out.iter().any(|o| o.name == name) {
                    continue;
                }
                let value = match v.kind.as_deref().unwrap_or("Exact") {
                    "Exact" => ValueMatch::Exact(v.value.clone()),
                    "RegularExpression" => {
                        ValueMatch::Regex(ctx.regex(format!("{f}.value"), &v.value)?)
                    }
                    other => {
                        return Err(ctx.not_one_of(
                            format!("{f}.type"),
                            other,
                            "Exact, RegularExpression",
                        ));
                    }
                };
                out.push(NamedMatch {
                    name,
                    value: Some(value),
                });
            }
            Ok(out)
        };
    let headers = named("headers", &m.headers, true)?;
    let query_params = named("queryParams", &m.query_params, false)?;
    let method = match m.method.as_deref() {
        None => None,
        Some(
            method @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH"),
        ) => Some(ValueMatch::Exact(method.to_owned())),
        Some(other) => {
            return Err(ctx.not_one_of(
                format!("{p}.method"),
                other,
                "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
            ));
        }
    };
    let rank = Rank {
        path_kind,
        path_len: value.len(),
        method: method.is_some(),
        headers: headers.len(),
        query_params: query_params.len(),
    };
    Ok((
        rank,
        HttpMatch {
            uri: Some(uri),
            method,
            headers,
            query_params,
            ..HttpMatch::default()
        },
    ))
}

fn parse_filters(
    ctx: &Ctx<'_>,
    p: &str,
    list: &[gw::HttpRouteFilter],
    rule_level: bool,
) -> Result<RuleFilters> {
    let mut out = RuleFilters::default();
    for (i, filter) in list.iter().enumerate() {
        let f = format!("{p}[{i}]");
        let missing = |field: &str| {
            ctx.invalid(
                format!("{f}.{field}"),
                format!("type {} needs {field}", filter.kind),
            )
        };
        match filter.kind.as_str() {
            "RequestHeaderModifier" => {
                let m = filter
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                out.headers.request = header_edits(ctx, &format!("{f}.requestHeaderModifier"), m)?;
            }
            "ResponseHeaderModifier" => {
                let m = filter
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                out.headers.response =
                    header_edits(ctx, &format!("{f}.responseHeaderModifier"), m)?;
            }
            "RequestRedirect" if rule_level => {
                let r = filter
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| missing("requestRedirect"))?;
                out.redirect = Some(redirect(ctx, &format!("{f}.requestRedirect"), r)?);
            }
            "URLRewrite" if rule_level => {
                let r = filter
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| missing("urlRewrite"))?;
                out.rewrite = Some(r.clone());
            }
            "RequestMirror" if rule_level => {
                let m = filter
                    .request_mirror
                    .as_ref()
                    .ok_or_else(|| missing("requestMirror"))?;
                let mp = format!("{f}.requestMirror");
                let percentage = match (m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        return Err(ctx.invalid(mp, "only one of percent and fraction may be set"));
                    }
                    (Some(n), None) => ctx.percentage(format!("{mp}.percent"), n as f64)?,
                    (None, Some(fraction)) => {
                        let denominator = fraction.denominator.unwrap_or(100);
                        if denominator <= 0
                            || fraction.numerator < 0
                            || fraction.numerator > denominator
                        {
                            return Err(ctx.invalid(
                                format!("{mp}.fraction"),
                                "numerator must be between 0 and a denominator > 0",
                            ));
                        }
                        fraction.numerator as f64 * 100.0 / denominator as f64
                    }
                    (None, None) => 100.0,
                };
                let destination =
                    backend_destination(ctx, &format!("{mp}.backendRef"), &m.backend_ref)?;
                if destination.host == UNRESOLVED_BACKEND {
                    debug!(route = %ctx.key, filter = f, "mirror backend cannot be resolved; not mirrored");
                } else {
                    out.mirrors.push(Mirror {
                        destination,
                        percentage,
                    });
                }
            }
            "RequestRedirect" | "URLRewrite" | "RequestMirror" => {
                return Err(ctx.invalid(
                    format!("{f}.type"),
                    format!(
                        "{} is not supported on a backendRef (only header modifiers are)",
                        filter.kind
                    ),
                ));
            }
            "CORS" if rule_level => {
                let c = filter.cors.as_ref().ok_or_else(|| missing("cors"))?;
                out.cors = Some(cors(ctx, &format!("{f}.cors"), c)?);
            }
            "ExtensionRef" | "ExternalAuth" => {
                return Err(ctx.invalid(
                    format!("{f}.type"),
                    format!(
                        "{} filters are not supported by this mesh; remove the filter",
                        filter.kind
                    ),
                ));
            }
            other => {
                return Err(ctx.not_one_of(
                    format!("{f}.type"),
                    other,
                    "RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror",
                ));
            }
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err(ctx.invalid(
            p.to_owned(),
            "RequestRedirect and URLRewrite cannot be used on the same rule",
        ));
    }
    Ok(out)
}

fn header_edits(ctx: &Ctx<'_>, p: &str, m: &gw::HeaderModifier) -> Result<HeaderEdits> {
    let name = |field: String, n: &str| -> Result<String> {
        if n.is_empty() || http::HeaderName::from_bytes(n.as_bytes()).is_err() {
            return Err(ctx.invalid(field, format!("{n:?} is not a header name")));
        }
        Ok(n.to_ascii_lowercase())
    };
    let pairs = |field: &str, list: &[gw::HttpHeader]| -> Result<Vec<(String, String)>> {
        list.iter()
            .enumerate()
            .map(|(i, h)| {
                Ok((
                    name(format!("{p}.{field}[{i}].name"), &h.name)?,
                    h.value.clone(),
                ))
            })
            .collect()
    };
    Ok(HeaderEdits {
        set: pairs("set", &m.set)?,
        add: pairs("add", &m.add)?,
        remove: m
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| name(format!("{p}.remove[{i}]"), n))
            .collect::<Result<_>>()?,
    })
}

fn redirect(ctx: &Ctx<'_>, p: &str, r: &gw::RequestRedirect) -> Result<Redirect> {
    let scheme = match r.scheme.as_deref() {
        None => None,
        Some(s @ ("http" | "https")) => Some(s.to_owned()),
        Some(other) => return Err(ctx.not_one_of(format!("{p}.scheme"), other, "http, https")),
    };
    let uri = match &r.path {
        None => None,
        Some(path) => match path.kind.as_str() {
            "ReplaceFullPath" => Some(
                path.replace_full_path
                    .clone()
                    .unwrap_or_else(|| "/".to_owned()),
            ),
            "ReplacePrefixMatch" => {
                return Err(ctx.invalid(
                    format!("{p}.path.type"),
                    "ReplacePrefixMatch is not supported in a redirect yet; use ReplaceFullPath",
                ));
            }
            other => {
                return Err(ctx.not_one_of(
                    format!("{p}.path.type"),
                    other,
                    "ReplaceFullPath, ReplacePrefixMatch",
                ));
            }
        },
    };
    let port = match r.port {
        Some(n) => Some(RedirectPort::Number(ctx.port(format!("{p}.port"), n)?)),
        None if scheme.is_some() => Some(RedirectPort::FromProtocolDefault),
        None => None,
    };
    let code = match r.status_code.unwrap_or(302) {
        n @ (301 | 302) => n as u16,
        other => {
            return Err(ctx.not_one_of(format!("{p}.statusCode"), &other.to_string(), "301, 302"));
        }
    };
    if let Some(host) = &r.hostname {
        ctx.host(format!("{p}.hostname"), host)?;
    }
    Ok(Redirect {
        uri,
        authority: r.hostname.clone(),
        port,
        scheme,
        code,
    })
}

/// A rule's `retry` (GEP-1731, "HTTPRouteRetry"): `attempts` retries after the first try
/// (default Istio's 2), on the listed response `codes` (400-599) and, as the GEP allows, on
/// connection failures; no codes keeps Istio's default conditions. `backoff` is the base of the
/// jittered exponential back-off (its ceiling ten times it).
fn route_retry(ctx: &Ctx<'_>, p: &str, r: &gw::HttpRouteRetry) -> Result<RetryPolicy> {
    let mut policy = istio_default_retries();
    if let Some(attempts) = r.attempts {
        if !(0..=100).contains(&attempts) {
            return Err(ctx.invalid(
                format!("{p}.attempts"),
                format!("{attempts} is not between 0 and 100"),
            ));
        }
        policy.attempts = attempts as u32;
    }
    if !r.codes.is_empty() {
        let mut codes = Vec::new();
        for (i, code) in r.codes.iter().enumerate() {
            if !(400..=599).contains(code) {
                return Err(ctx.invalid(
                    format!("{p}.codes[{i}]"),
                    format!("{code} is not a status code between 400 and 599"),
                ));
            }
            codes.push(*code as u16);
        }
        policy.retry_on = RetryOn {
            conditions: vec![
                RetryCondition::ConnectFailure,
                RetryCondition::RefusedStream,
                RetryCondition::RetriableStatusCodes,
            ],
            status_codes: codes,
        };
    }
    policy.backoff = r
        .backoff
        .as_deref()
        .map(|b| ctx.duration(format!("{p}.backoff"), b))
        .transpose()?
        .filter(|d| !d.is_zero());
    Ok(policy)
}

/// The `CORS` filter (GEP-1767, "HTTPCORSFilter"): `allowOrigins` `*` or
/// `scheme://host[:port]`, whose host may start with a `*.` wildcard (one or more labels);
/// methods and headers as listed (`*`: whatever the preflight asks), `maxAge` seconds (default
/// 5), `allowCredentials`. The waypoint applies it as it applies a VirtualService's
/// `corsPolicy`.
fn cors(ctx: &Ctx<'_>, p: &str, c: &gw::HttpCorsFilter) -> Result<CorsPolicy> {
    let mut allow_origins = Vec::new();
    for (i, origin) in c.allow_origins.iter().enumerate() {
        let field = format!("{p}.allowOrigins[{i}]");
        if origin == "*" {
            allow_origins.push(ValueMatch::Exact("*".to_owned()));
            continue;
        }
        let not_an_origin = || {
            ctx.invalid(
                field.clone(),
                format!("{origin:?} is not `*` or scheme://host[:port]"),
            )
        };
        let (scheme, host) = origin.split_once("://").ok_or_else(not_an_origin)?;
        if scheme.is_empty() || host.is_empty() || host.contains('/') {
            return Err(not_an_origin());
        }
        match host.strip_prefix("*.") {
            Some(rest) if !rest.contains('*') => {
                let pattern = format!(
                    "{}://[^/]+\\.{}",
                    regex::escape(scheme),
                    regex::escape(rest)
                );
                allow_origins.push(ValueMatch::Regex(ctx.regex(field, &pattern)?));
            }
            None if !host.contains('*') => allow_origins.push(ValueMatch::Exact(origin.clone())),
            _ => {
                return Err(ctx.invalid(
                    field,
                    format!("{origin:?}: a wildcard may only be the host's first label (*.)"),
                ));
            }
        }
    }
    let max_age = match c.max_age.unwrap_or(5) {
        n if n < 0 => {
            return Err(ctx.invalid(format!("{p}.maxAge"), format!("{n} is negative")));
        }
        n => std::time::Duration::from_secs(n as u64),
    };
    Ok(CorsPolicy {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: Some(max_age),
        allow_credentials: c.allow_credentials,
    })
}

/// `URLRewrite` for one match. `ReplacePrefixMatch` replaces the matched path prefix element by
/// element (see the waypoint's `rewrite_path`), so it needs a `PathPrefix` match.
fn rewrite(ctx: &Ctx<'_>, p: &str, r: &gw::UrlRewrite, matched: &HttpMatch) -> Result<Rewrite> {
    if let Some(host) = &r.hostname {
        ctx.host(format!("{p}.urlRewrite.hostname"), host)?;
    }
    let mut rewrite = Rewrite {
        uri: None,
        authority: r.hostname.clone(),
        uri_regex: None,
    };
    if let Some(path) = &r.path {
        match path.kind.as_str() {
            "ReplacePrefixMatch" => {
                if !matches!(matched.uri, Some(ValueMatch::PathPrefix(_))) {
                    return Err(ctx.invalid(
                        format!("{p}.urlRewrite.path"),
                        "ReplacePrefixMatch needs a PathPrefix match on every match of the rule",
                    ));
                }
                rewrite.uri = Some(path.replace_prefix_match.clone().unwrap_or_default());
            }
            "ReplaceFullPath" => {
                let whole = Regex::full_match(".*")
                    .map_err(|e| ctx.invalid(p.to_owned(), e.to_string()))?;
                let value = path
                    .replace_full_path
                    .clone()
                    .unwrap_or_else(|| "/".to_owned());
                rewrite.uri_regex = Some((whole, value.replace('$', "$$")));
            }
            other => {
                return Err(ctx.not_one_of(
                    format!("{p}.urlRewrite.path.type"),
                    other,
                    "ReplaceFullPath, ReplacePrefixMatch",
                ));
            }
        }
    }
    Ok(rewrite)
}

/// A Service backend's destination, or [`UNRESOLVED_BACKEND`] for one that cannot be resolved
/// (another kind). One in another namespace is checked against the ReferenceGrants at
/// attachment ([`attach`]).
fn backend_destination(
    ctx: &Ctx<'_>,
    p: &str,
    b: &gw::BackendObjectReference,
) -> Result<Destination> {
    if b.name.is_empty() {
        return Err(ctx.invalid(format!("{p}.name"), "a backend needs a name"));
    }
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    let namespace = b
        .namespace
        .clone()
        .unwrap_or_else(|| ctx.key.namespace.clone());
    if (group, kind) != ("", "Service") {
        debug!(route = %ctx.key, backend = %b.name, group, kind, "backend is not a Service: its share of requests is answered 500, of connections refused (InvalidKind)");
        return Ok(unresolved());
    }
    let Some(port) = b.port else {
        return Err(ctx.invalid(format!("{p}.port"), "a Service backend needs a port"));
    };
    let port = ctx.port(format!("{p}.port"), port)?;
    // Another namespace: allowed or not by a ReferenceGrant, checked at attachment.
    Ok(Destination {
        host: format!("{}.{namespace}.svc.{}", b.name, ctx.config.cluster_domain),
        subset: None,
        port: Some(port),
    })
}

/// The routes of every Service some HTTPRoute, GRPCRoute or TCPRoute attaches to, as one
/// VirtualService-shaped route list per Service: `http` sorted by the Gateway API's
/// precedence (see the module doc), `tcp` consumer routes first, then oldest first (a TCPRoute
/// has no matches: the first that applies takes the connection). Of routes of different types
/// on one Service port only the highest type applies (GEP-1294, "Route types": GRPCRoute,
/// HTTPRoute, TLSRoute, TCPRoute; the others are `Conflicted`, see [`conflicting`]). TLSRoutes
/// are not applied at waypoints (which do not route by SNI), only at ingress listeners.
pub(super) fn attach(
    services: &BTreeMap<String, Arc<Service>>,
    routes: &[&AcceptedGatewayRoute],
    grants: &[Grant],
) -> Vec<VirtualService> {
    let routes = oldest_first(routes);
    #[derive(Default)]
    struct Lists {
        http: Vec<(bool, Rank, HttpRoute)>,
        tcp: Vec<(bool, TcpRoute)>,
        sources: Vec<String>,
    }
    let mut by_service: BTreeMap<String, Lists> = BTreeMap::new();
    for route in &routes {
        for parent in &route.parents {
            let service_key = format!("{}/{}", parent.namespace, parent.name);
            if !services.contains_key(&service_key) {
                debug!(route = %route.describe(), service = service_key, "parent Service does not exist (yet); not attached");
                continue;
            }
            if route.key.kind == Kind::TlsRoute {
                debug!(route = %route.describe(), service = service_key, "a TLSRoute applies at ingress Gateway listeners, not at a Service's waypoint; not attached");
                continue;
            }
            if let Some(winner) = conflicting(&routes, route, parent) {
                debug!(route = %route.describe(), service = service_key, winner = %winner.describe(), "a route of a higher type holds this Service port (GEP-1294: Conflicted); not attached");
                continue;
            }
            let consumer = parent.namespace != route.key.namespace;
            let lists = by_service.entry(service_key).or_default();
            if route.is_l4() {
                let mut destinations = route.l4.clone();
                check_destination_grants(&route.key, &mut destinations, grants);
                let matches = if parent.port.is_some() || consumer {
                    vec![L4Match {
                        port: parent.port,
                        source_namespace: consumer.then(|| route.key.namespace.clone()),
                        ..L4Match::default()
                    }]
                } else {
                    Vec::new()
                };
                lists.tcp.push((
                    consumer,
                    TcpRoute {
                        matches,
                        route: destinations,
                    },
                ));
            }
            for (rank, r) in &route.routes {
                let mut r = r.clone();
                check_grants(&route.key, &mut r, grants);
                for m in &mut r.matches {
                    m.port = parent.port;
                    if consumer {
                        m.source_namespace = Some(route.key.namespace.clone());
                    }
                }
                lists.http.push((consumer, *rank, r));
            }
            let name = route.describe();
            if !lists.sources.contains(&name) {
                lists.sources.push(name);
            }
        }
    }
    by_service
        .into_iter()
        .map(|(service_key, mut lists)| {
            // Stable: equal ranks keep the oldest-route, rule and match order.
            lists
                .http
                .sort_by_key(|(consumer, rank, _)| std::cmp::Reverse((*consumer, *rank)));
            lists.tcp.sort_by_key(|(consumer, _)| !*consumer);
            let service = &services[&service_key];
            VirtualService {
                name: service.name.clone(),
                namespace: service.namespace.clone(),
                hosts: vec![service.hostname.clone()],
                http: lists.http.into_iter().map(|(_, _, r)| r).collect(),
                tcp: lists.tcp.into_iter().map(|(_, r)| r).collect(),
                tls: Vec::new(),
                created: None,
                origin: VirtualServiceOrigin::GatewayRoutes(lists.sources),
            }
        })
        .collect()
}

/// The route of a higher type (GEP-1294, "Route types": GRPCRoute, then HTTPRoute, TLSRoute,
/// TCPRoute) that attaches to `parent`'s Service on an overlapping port (no port: every port),
/// which makes `route` `Conflicted` there; the oldest such. TLSRoutes, not applied at
/// waypoints, hold no Service.
fn conflicting<'r>(
    routes: &[&'r AcceptedGatewayRoute],
    route: &AcceptedGatewayRoute,
    parent: &ServiceParent,
) -> Option<&'r AcceptedGatewayRoute> {
    routes.iter().copied().find(|other| {
        other.key.kind != Kind::TlsRoute
            && other.type_rank() > route.type_rank()
            && other.parents.iter().any(|p| {
                p.namespace == parent.namespace
                    && p.name == parent.name
                    && (p.port.is_none() || parent.port.is_none() || p.port == parent.port)
            })
    })
}

/// Oldest first, then namespace/name: the order ties in precedence fall back to.
fn oldest_first<'a>(routes: &[&'a AcceptedGatewayRoute]) -> Vec<&'a AcceptedGatewayRoute> {
    let mut routes = routes.to_vec();
    routes.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then_with(|| a.key.namespace.cmp(&b.key.namespace))
            .then_with(|| a.key.name.cmp(&b.key.name))
    });
    routes
}

/// The hostnames a request may carry to match both a listener's `hostname` and a route's
/// (Gateway API, "Listener.hostname" and "HTTPRoute.hostnames"): `*.example.com` covers
/// `a.example.com` and `a.b.example.com`, not `example.com`. `None`: they do not meet.
fn intersect(listener: Option<&str>, route: &str) -> Option<String> {
    let Some(listener) = listener else {
        return Some(route.to_owned());
    };
    let covers = |wildcard: &str, name: &str| {
        wildcard
            .strip_prefix('*')
            .is_some_and(|suffix| name.len() > suffix.len() && name.ends_with(suffix))
    };
    if listener == route || covers(listener, route) {
        Some(route.to_owned())
    } else if covers(route, listener) {
        Some(listener.to_owned())
    } else {
        None
    }
}

/// The routes of every Gateway API listener (of the ingress class) that some route attaches
/// to, keyed by the listener's routes key (`namespace/name:listener`): one VirtualService-shaped
/// list per hostname. HTTPRoutes and GRPCRoutes give `http` routes sorted by the Gateway API's
/// precedence; the gateway picks the list of the most specific hostname a request matches, as
/// Istio turns each hostname into one of Envoy's virtual hosts. TLSRoutes give `tls` routes by
/// SNI (the hostname), TCPRoutes `tcp` routes, oldest first. A route attaches to a listener
/// when it names the Gateway (and the listener's `sectionName` / `port`, if given), the
/// listener's `allowedRoutes` admit its namespace and kind, and a hostname meets the
/// listener's; routes that attach nowhere are logged with the reason (the specification's
/// `NoMatchingParent`, `NotAllowedByListeners`, `NoMatchingListenerHostname`).
pub(super) fn attach_to_gateways(
    gateways: &[&super::ingress::ApiGateway],
    namespaces: &BTreeMap<String, crate::model::Labels>,
    routes: &[&AcceptedGatewayRoute],
    grants: &[Grant],
) -> BTreeMap<String, Vec<Arc<VirtualService>>> {
    let by_key = by_key(gateways);
    #[derive(Default)]
    struct Lists {
        http: Vec<(Rank, HttpRoute)>,
        tcp: Vec<TcpRoute>,
        tls: Vec<TlsRoute>,
        sources: Vec<String>,
    }
    // (listener routes key, hostname) -> the routes, and the routes they come from.
    let mut lists: BTreeMap<(String, String), Lists> = BTreeMap::new();
    for route in oldest_first(routes) {
        for parent in &route.gateway_parents {
            let Some(gateway) = by_key.get(&parent.gateway) else {
                debug!(route = %route.describe(), gateway = parent.gateway, "no ingress Gateway of that name (NoMatchingParent)");
                continue;
            };
            let listeners = match attachment(gateway, parent, route, namespaces) {
                Ok(listeners) => listeners,
                Err((reason, why)) => {
                    debug!(route = %route.describe(), gateway = parent.gateway, reason, "{why}");
                    continue;
                }
            };
            for (listener, hosts) in listeners {
                for host in hosts {
                    let list = lists
                        .entry((listener.routes_key.clone(), host.clone()))
                        .or_default();
                    for (rank, r) in &route.routes {
                        let mut r = r.clone();
                        check_grants(&route.key, &mut r, grants);
                        list.http.push((*rank, r));
                    }
                    if route.is_l4() {
                        let mut destinations = route.l4.clone();
                        check_destination_grants(&route.key, &mut destinations, grants);
                        if route.key.kind == Kind::TlsRoute {
                            list.tls.push(TlsRoute {
                                matches: vec![TlsMatch {
                                    sni_hosts: vec![host],
                                    l4: L4Match::default(),
                                }],
                                route: destinations,
                            });
                        } else {
                            list.tcp.push(TcpRoute {
                                matches: Vec::new(),
                                route: destinations,
                            });
                        }
                    }
                    let name = route.describe();
                    if !list.sources.contains(&name) {
                        list.sources.push(name);
                    }
                }
            }
        }
    }
    let mut out: BTreeMap<String, Vec<Arc<VirtualService>>> = BTreeMap::new();
    for ((routes_key, host), mut list) in lists {
        // Stable: equal ranks keep the oldest-route, rule and match order.
        list.http.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
        let (namespace, name) = routes_key
            .split_once('/')
            .map(|(ns, rest)| (ns.to_owned(), rest.to_owned()))
            .unwrap_or_default();
        out.entry(routes_key)
            .or_default()
            .push(Arc::new(VirtualService {
                name,
                namespace,
                hosts: vec![host],
                http: list.http.into_iter().map(|(_, r)| r).collect(),
                tcp: list.tcp,
                tls: list.tls,
                created: None,
                origin: VirtualServiceOrigin::GatewayRoutes(list.sources),
            }));
    }
    out
}

/// The ingress Gateways by `namespace/name`, as parentRefs name them.
fn by_key<'g>(
    gateways: &[&'g super::ingress::ApiGateway],
) -> BTreeMap<String, &'g super::ingress::ApiGateway> {
    gateways.iter().map(|g| (g.gateway.key(), *g)).collect()
}

/// The listeners a route attaches to, each with its hostnames; or why none (the
/// specification's reason and a message).
type Attachment<'g> = std::result::Result<
    Vec<(&'g super::ingress::ApiListener, Vec<String>)>,
    (&'static str, String),
>;

/// The listeners of `gateway` that `route` attaches to through `parent`, each with the
/// hostnames it is served for; or why none (the specification's reason and a message).
fn attachment<'g>(
    gateway: &'g super::ingress::ApiGateway,
    parent: &GatewayParent,
    route: &AcceptedGatewayRoute,
    namespaces: &BTreeMap<String, crate::model::Labels>,
) -> Attachment<'g> {
    let named: Vec<&super::ingress::ApiListener> = gateway
        .listeners
        .iter()
        .filter(|l| {
            parent.section.as_ref().is_none_or(|s| *s == l.name)
                && parent.port.is_none_or(|p| p == l.port)
        })
        .collect();
    if named.is_empty() {
        return Err((
            "NoMatchingParent",
            format!(
                "Gateway {} has no listener {}",
                parent.gateway,
                match (&parent.section, parent.port) {
                    (Some(s), Some(p)) => format!("named {s:?} on port {p}"),
                    (Some(s), None) => format!("named {s:?}"),
                    (None, Some(p)) => format!("on port {p}"),
                    (None, None) => "at all".to_owned(),
                }
            ),
        ));
    }
    let allowed: Vec<&super::ingress::ApiListener> = named
        .into_iter()
        .filter(|l| {
            l.kinds.contains(&route.key.kind)
                && l.namespaces.allow(
                    &gateway.gateway.namespace,
                    &route.key.namespace,
                    namespaces.get(&route.key.namespace),
                )
        })
        .collect();
    if allowed.is_empty() {
        return Err((
            "NotAllowedByListeners",
            format!(
                "no listener of Gateway {} admits {}s of namespace {} (check its allowedRoutes and protocol)",
                parent.gateway,
                route.key.kind.as_str(),
                route.key.namespace
            ),
        ));
    }
    let mut out = Vec::new();
    for listener in allowed {
        let hosts: Vec<String> = if route.hostnames.is_empty() {
            vec![listener.hostname.clone().unwrap_or_else(|| "*".to_owned())]
        } else {
            route
                .hostnames
                .iter()
                .filter_map(|h| intersect(listener.hostname.as_deref(), h))
                .collect()
        };
        if !hosts.is_empty() {
            out.push((listener, hosts));
        }
    }
    if out.is_empty() {
        return Err((
            "NoMatchingListenerHostname",
            format!(
                "no hostname of the route meets a listener hostname of Gateway {}",
                parent.gateway
            ),
        ));
    }
    Ok(out)
}

/// Each HTTPRoute's `status.parents[]` (Gateway API, "RouteParentStatus"): per Service or
/// Gateway parent, `Accepted` (`Accepted`, or `NoMatchingParent`: no such Service, port,
/// Gateway or listener, `NotAllowedByListeners`, `NoMatchingListenerHostname`) and
/// `ResolvedRefs` (`ResolvedRefs`, or the first failing backend's `InvalidKind`,
/// `RefNotPermitted`: another namespace without a ReferenceGrant, `BackendNotFound`). A parent
/// of another kind is not this implementation's and gets no entry. Pure; sorted by namespace
/// and name.
pub(super) fn route_statuses(
    services: &BTreeMap<String, Arc<Service>>,
    gateways: &[&super::ingress::ApiGateway],
    waypoint_gateways: &BTreeMap<String, crate::model::WaypointGateway>,
    namespaces: &BTreeMap<String, crate::model::Labels>,
    routes: &[&AcceptedGatewayRoute],
    grants: &[Grant],
) -> Vec<crate::model::RouteStatus> {
    use crate::model::{RouteCondition, RouteParentStatus, RouteStatus};
    let resolved = |route: &AcceptedGatewayRoute| -> RouteCondition {
        for (group, kind, namespace, name) in &route.backends {
            if (group.as_str(), kind.as_str()) != ("", "Service") {
                return RouteCondition::new(
                    "ResolvedRefs",
                    false,
                    "InvalidKind",
                    format!("backend {name} is a {group}/{kind}, not a Service"),
                );
            }
            if !granted(grants, &route.key, namespace, name) {
                return RouteCondition::new(
                    "ResolvedRefs",
                    false,
                    "RefNotPermitted",
                    format!(
                        "backend Service {namespace}/{name} is in another namespace and no ReferenceGrant there allows {}s of {}",
                        route.key.kind.as_str(),
                        route.key.namespace
                    ),
                );
            }
            if !services.contains_key(&format!("{namespace}/{name}")) {
                return RouteCondition::new(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    format!("backend Service {namespace}/{name} does not exist"),
                );
            }
        }
        RouteCondition::new(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every backend resolves".to_owned(),
        )
    };
    let by_key = by_key(gateways);
    let mut out: Vec<RouteStatus> = routes
        .iter()
        .map(|route| {
            let refs = resolved(route);
            let parents = route
                .status_parents
                .iter()
                .map(|p| {
                    let key = format!("{}/{}", p.namespace, p.name);
                    let accepted = if p.kind == "Service" {
                        let parent = ServiceParent {
                            namespace: p.namespace.clone(),
                            name: p.name.clone(),
                            port: p.port,
                        };
                        match services.get(&key) {
                            None => Err(("NoMatchingParent", format!("Service {key} does not exist"))),
                            Some(s) if p.port.is_some_and(|port| !s.ports.iter().any(|sp| sp.port == port)) => Err((
                                "NoMatchingParent",
                                format!("Service {key} has no port {}", p.port.unwrap_or_default()),
                            )),
                            Some(_) if route.key.kind == Kind::TlsRoute => Err((
                                "UnsupportedValue",
                                "a TLSRoute applies at an ingress Gateway's TLS Passthrough listener; waypoints do not route by SNI (use a TCPRoute on the Service)".to_owned(),
                            )),
                            Some(_) => match conflicting(routes, route, &parent) {
                                Some(winner) => Err((
                                    "Conflicted",
                                    format!(
                                        "{} also attaches to Service {key} on this port and its type wins (GEP-1294: GRPCRoute, HTTPRoute, TLSRoute, TCPRoute)",
                                        winner.describe()
                                    ),
                                )),
                                None => Ok(()),
                            },
                        }
                    } else if let Some(gateway) = by_key.get(&key) {
                        let parent = GatewayParent {
                            gateway: key.clone(),
                            section: p.section_name.clone(),
                            port: p.port,
                        };
                        attachment(gateway, &parent, route, namespaces).map(|_| ())
                    } else if waypoint_gateways.contains_key(&key) {
                        Err((
                            "NoMatchingParent",
                            format!("Gateway {key} is a waypoint: routes attached to it are not applied; attach the route to the Service (parentRefs group \"\", kind Service)"),
                        ))
                    } else {
                        Err((
                            "NoMatchingParent",
                            format!("no Gateway {key} of the ingress class"),
                        ))
                    };
                    let accepted = match accepted {
                        Ok(()) => RouteCondition::new(
                            "Accepted",
                            true,
                            "Accepted",
                            "attached".to_owned(),
                        ),
                        Err((reason, message)) => {
                            RouteCondition::new("Accepted", false, reason, message)
                        }
                    };
                    RouteParentStatus {
                        parent_ref: p.clone(),
                        conditions: vec![accepted, refs.clone()],
                    }
                })
                .collect();
            RouteStatus {
                kind: route.key.kind.as_str().to_owned(),
                namespace: route.key.namespace.clone(),
                name: route.key.name.clone(),
                generation: route.generation,
                parents,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name, &a.kind).cmp(&(&b.namespace, &b.name, &b.kind)));
    out
}

/// A `ReferenceGrant`, validated: who (`from`: group, kind, namespace) may refer to what in
/// the grant's namespace (`to`: group, kind, name or every name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Grant {
    namespace: String,
    from: Vec<(String, String, String)>,
    to: Vec<(String, String, Option<String>)>,
}

pub(super) fn reference_grant(key: &ObjectKey, grant: &gw::ReferenceGrant) -> Result<Grant> {
    let invalid = |field: String, why: &str| super::invalid(key, field, why);
    if grant.spec.from.is_empty() {
        return Err(invalid(
            "spec.from".into(),
            "at least one from entry is required",
        ));
    }
    if grant.spec.to.is_empty() {
        return Err(invalid(
            "spec.to".into(),
            "at least one to entry is required",
        ));
    }
    let mut from = Vec::new();
    for (i, f) in grant.spec.from.iter().enumerate() {
        if f.kind.is_empty() {
            return Err(invalid(
                format!("spec.from[{i}].kind"),
                "a kind is required",
            ));
        }
        if f.namespace.is_empty() {
            return Err(invalid(
                format!("spec.from[{i}].namespace"),
                "a namespace is required",
            ));
        }
        from.push((f.group.clone(), f.kind.clone(), f.namespace.clone()));
    }
    let mut to = Vec::new();
    for (i, t) in grant.spec.to.iter().enumerate() {
        if t.kind.is_empty() {
            return Err(invalid(format!("spec.to[{i}].kind"), "a kind is required"));
        }
        to.push((
            t.group.clone(),
            t.kind.clone(),
            t.name.clone().filter(|n| !n.is_empty()),
        ));
    }
    Ok(Grant {
        namespace: key.namespace.clone(),
        from,
        to,
    })
}

/// Whether routes of `route`'s kind and namespace may send to Service `namespace/name`
/// (GEP-709: a ReferenceGrant in the Service's namespace `from` that kind and namespace).
fn granted(grants: &[Grant], route: &ObjectKey, namespace: &str, name: &str) -> bool {
    namespace == route.namespace
        || grants.iter().any(|g| {
            g.namespace == namespace
                && g.from.iter().any(|(group, kind, ns)| {
                    group == "gateway.networking.k8s.io"
                        && kind == route.kind.as_str()
                        && *ns == route.namespace
                })
                && g.to.iter().any(|(group, kind, to)| {
                    group.is_empty() && kind == "Service" && to.as_deref().is_none_or(|n| n == name)
                })
        })
}

/// `name.namespace` of a backend's `name.namespace.svc.<domain>` host.
fn backend_service(host: &str) -> Option<(&str, &str)> {
    let mut labels = host.split('.');
    Some((labels.next()?, labels.next()?))
}

/// Whether a destination host may be used by `route` (see [`granted`]).
fn allowed(route: &ObjectKey, host: &str, grants: &[Grant]) -> bool {
    host == UNRESOLVED_BACKEND
        || backend_service(host)
            .is_some_and(|(name, namespace)| granted(grants, route, namespace, name))
}

/// Backends in other namespaces that no ReferenceGrant allows become [`UNRESOLVED_BACKEND`]:
/// their share of requests is answered 500, of connections refused (`RefNotPermitted`).
fn check_destination_grants(
    route: &ObjectKey,
    destinations: &mut [RouteDestination],
    grants: &[Grant],
) {
    for d in destinations {
        if !allowed(route, &d.destination.host, grants) {
            debug!(route = %route, backend = %d.destination.host, "no ReferenceGrant lets this route use a Service of another namespace: its share is answered 500 or refused (RefNotPermitted)");
            d.destination = unresolved();
        }
    }
}

/// [`check_destination_grants`] for an HTTP route; a mirror no grant allows is dropped.
fn check_grants(route: &ObjectKey, r: &mut HttpRoute, grants: &[Grant]) {
    if let HttpAction::Route(destinations) = &mut r.action {
        check_destination_grants(route, destinations, grants);
    }
    r.mirrors.retain(|m| {
        let ok = allowed(route, &m.destination.host, grants);
        if !ok {
            debug!(route = %route, mirror = %m.destination.host, "no ReferenceGrant lets this route mirror to a Service of another namespace; not mirrored");
        }
        ok
    });
}
