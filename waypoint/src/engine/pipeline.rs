//! One HTTP request through the engine, in the order Envoy's HTTP filter chain applies it:
//! [`admit`] (L7 authorization, rate limits), [`choose`] (route selection, CORS preflight, fault
//! injection, an action answered locally: redirect or direct response), then [`forward`]
//! (rewrites, header edits, the body, mirrors, the attempts with retries and the route timeout,
//! the response's edits). Each stage ends the request early with an [`Early`]; every request
//! ends in exactly one metrics record and one access-log line ([`Finish`]), including local
//! replies, so an operator can explain every 403, 404, 429, 503 and 504 from the log alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use bytes::Bytes;
use http::header;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::upgrade::OnUpgrade;
use mesh::model::{RouteDestination, Service};

use super::finish::{CountedBody, Finish};
use super::headers::{
    authority_of, clone_parts, clone_response_parts, is_empty_request, prepare_upstream_headers,
    set_uri_for, strip_h2c_upgrade, strip_hop_by_hop,
};
use super::{Downstream, Engine, Routing};
use crate::authz::ACCESS_DENIED_BODY as DENIED_BODY;
use crate::metrics::LocalReply;
use crate::request::{Body, BoxError, full_body};
use crate::route::filters::{self, FaultDecision};
use crate::route::retry::{AttemptOutcome, is_retriable, retry_backoff};
use crate::route::{RequestView, Selected, SelectedAction, cors, grpc};
use crate::upstream::{ClusterKey, HashInput, UpstreamError, UpstreamProtocol, UpstreamResponse};

/// Request bodies up to this size are kept so the request can be retried or mirrored; larger
/// or streaming bodies are sent once (a failed attempt is then final), as Envoy does when its
/// retry buffer overflows.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// A request body as a front door hands it over (hyper's `Incoming`, or a boxed [`Body`]).
pub trait RequestBody: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static {}

impl<B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static> RequestBody for B {}

/// How a stage ends a request before (or instead of) a forwarded response.
enum Early {
    /// A reply the engine makes itself: status, Envoy's response flag, body.
    Local(StatusCode, &'static str, &'static str),
    /// A response made by a policy (rate limit, CORS preflight, fault abort, redirect, direct
    /// response), with its response flag.
    Respond(Box<Response<Body>>, &'static str),
}

type Stage<T> = Result<T, Early>;

/// Handles one request; never fails (errors become local replies).
pub(super) async fn handle<B>(
    engine: Arc<Engine>,
    downstream: Arc<Downstream>,
    mut request: Request<B>,
) -> Response<Body>
where
    B: RequestBody,
    B::Error: Into<BoxError>,
{
    let routing = engine.routes.load_full();
    let mut finish = Finish::new(&engine, &downstream, &request);
    strip_h2c_upgrade(request.headers_mut());
    let upgrade = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let request_bytes = Arc::new(AtomicU64::new(0));
    let body = CountedBody::new(body, request_bytes.clone());
    finish.request_bytes = Some(request_bytes);
    finish.grpc = grpc::is_grpc_request(&parts.headers);
    let mut rng = fastrand::Rng::new();

    let outcome = async {
        admit(&engine, &downstream, &routing, &parts, &mut finish)?;
        let chosen = choose(&routing, &downstream, &parts, &mut rng, &mut finish).await?;
        let request = Outgoing {
            parts,
            body,
            upgrade,
        };
        forward(
            &engine,
            &routing,
            &downstream,
            chosen,
            request,
            &mut rng,
            &mut finish,
        )
        .await
    }
    .await;
    match outcome {
        Ok(response) => finish.respond(response, "-"),
        Err(Early::Local(status, flag, message)) => finish.local(status, flag, message),
        Err(Early::Respond(response, flag)) => finish.respond(*response, flag),
    }
}

/// Stage 1: the L7 AuthorizationPolicies on the original client's identity, then the rate
/// limits (after authorization, so a denied request spends no token; their `x-ratelimit-*`
/// headers go on whatever this request is answered).
fn admit(
    engine: &Engine,
    downstream: &Downstream,
    routing: &Routing,
    parts: &http::request::Parts,
    finish: &mut Finish,
) -> Stage<()> {
    if let Err(denied) = engine.authorize(downstream, &routing.state, Some(parts)) {
        finish.reason = denied;
        return Err(Early::Local(StatusCode::FORBIDDEN, "RBAC", DENIED_BODY));
    }
    let rate_limit = engine.rate_limit(downstream, parts);
    finish.extra_response_headers = rate_limit.headers;
    if let Some(limited) = rate_limit.limited {
        let response = limited.response(finish.grpc).map(full_body);
        finish.reason = limited.reason;
        finish.local_reply = Some(LocalReply::RateLimited);
        return Err(Early::Respond(Box::new(response), "RL"));
    }
    Ok(())
}

/// The route chosen for a request that is to be forwarded.
struct Chosen<'r> {
    selected: Selected<'r>,
    destination: &'r RouteDestination,
    /// The client's request headers, kept when the route has a CORS policy (its response
    /// headers depend on them, and rewrites change them).
    cors_request_headers: Option<HeaderMap>,
}

/// Stage 2: the route, its CORS preflight, its fault injection, and an action answered here
/// (redirect, direct response).
async fn choose<'r>(
    routing: &'r Routing,
    downstream: &Downstream,
    parts: &http::request::Parts,
    rng: &mut fastrand::Rng,
    finish: &mut Finish,
) -> Stage<Chosen<'r>> {
    let view = RequestView::from_parts(parts, downstream.port.port);
    // The ingress routes by host; the waypoint by the service the tunnel named.
    let host = downstream.scope.as_ref().map(|_| request_host(parts));
    if let (Some(scope), Some(host)) = (&downstream.scope, &host)
        && scope.redirects_to_https(host)
    {
        finish.reason = "httpsRedirect".into();
        finish.local_reply = Some(LocalReply::Redirect);
        let response = https_redirect(parts).map(full_body);
        return Err(Early::Respond(Box::new(response), "-"));
    }
    let selected = match &downstream.scope {
        None => {
            routing
                .table
                .select_http(&downstream.service.key(), &view, &downstream.source, rng)
        }
        Some(scope) => {
            let host = request_host(parts);
            routing
                .table
                .select_gateway_http(scope, &host, &view, &downstream.source, rng)
        }
    };
    let Some(selected) = selected else {
        finish.reason = match &downstream.scope {
            None => format!("no route of {} matches", downstream.service.key()),
            Some(_) => format!(
                "no VirtualService bound to this gateway server takes host {:?}, or none of its routes matches",
                request_host(parts)
            ),
        };
        return Err(Early::Local(StatusCode::NOT_FOUND, "NR", "route not found"));
    };
    finish.route = route_label(&selected);

    let cors_policy = selected.route.cors.as_ref();
    if let Some(policy) = cors_policy
        && let Some(headers) = cors::preflight(policy, &parts.headers, &parts.method)
    {
        let mut response = Response::new(full_body(Bytes::new()));
        *response.headers_mut() = headers;
        finish.reason = "CORS preflight".into();
        return Err(Early::Respond(Box::new(response), "-"));
    }

    if let Some(fault) = &selected.route.fault {
        let FaultDecision { delay, abort } = filters::decide_fault(fault, rng);
        if let Some(delay) = delay {
            finish.flags_delay = true;
            tokio::time::sleep(delay).await;
        }
        if let Some(abort) = abort {
            finish.reason = format!("fault abort {abort:?}");
            finish.local_reply = Some(LocalReply::FaultAbort);
            let response = filters::abort_response(&abort, finish.grpc).map(full_body);
            return Err(Early::Respond(Box::new(response), "FI"));
        }
    }

    match selected.action {
        SelectedAction::Redirect(redirect) => {
            finish.reason = "redirect".into();
            finish.local_reply = Some(LocalReply::Redirect);
            let response = filters::redirect_response(redirect, &view).map(full_body);
            Err(Early::Respond(Box::new(response), "-"))
        }
        SelectedAction::DirectResponse(direct) => {
            finish.reason = "direct response".into();
            finish.local_reply = Some(LocalReply::DirectResponse);
            let response = filters::direct_response(direct).map(full_body);
            Err(Early::Respond(Box::new(response), "-"))
        }
        SelectedAction::Route(destination) => Ok(Chosen {
            selected,
            destination,
            cors_request_headers: cors_policy.map(|_| parts.headers.clone()),
        }),
    }
}

/// The request on its way upstream.
struct Outgoing<B> {
    parts: http::request::Parts,
    body: CountedBody<B>,
    /// The client asked for an upgrade (WebSocket and friends).
    upgrade: Option<OnUpgrade>,
}

/// The request body as the attempts send it.
enum Payload {
    /// Kept whole: sent again on a retry, copied to mirrors.
    Buffered(Bytes),
    /// Sent once, as it arrives.
    Streaming(Option<Body>),
}

impl Payload {
    fn next(&mut self) -> Body {
        match self {
            Payload::Buffered(bytes) => full_body(bytes.clone()),
            Payload::Streaming(body) => body.take().unwrap_or_else(|| full_body(Bytes::new())),
        }
    }
}

/// Stage 3: forwarding. The destination's cluster, the route's rewrites and header edits, the
/// body (kept when it may be sent more than once), mirrors, the attempts within the route
/// timeout, then the response's edits (or the upgrade's splice).
async fn forward<B>(
    engine: &Engine,
    routing: &Routing,
    downstream: &Downstream,
    chosen: Chosen<'_>,
    request: Outgoing<B>,
    rng: &mut fastrand::Rng,
    finish: &mut Finish,
) -> Stage<Response<Body>>
where
    B: RequestBody,
    B::Error: Into<BoxError>,
{
    let Chosen {
        selected,
        destination,
        cors_request_headers,
    } = chosen;
    let Outgoing {
        mut parts,
        body,
        upgrade,
    } = request;
    if destination.destination.host == mesh::model::UNRESOLVED_BACKEND {
        // A Gateway API backendRef that cannot be resolved: its share of requests gets 500,
        // as the specification requires.
        finish.reason = "the route's backendRef cannot be resolved (not a Service, or in another namespace without a ReferenceGrant): its share of requests is answered 500".to_owned();
        return Err(Early::Local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "NC",
            "no healthy upstream",
        ));
    }
    let Some((target_service, port)) =
        resolve_destination(routing, downstream, &destination.destination)
    else {
        finish.reason = format!(
            "route destination {} port {:?} is not a known service port (check the VirtualService's destination host and port)",
            destination.destination.host, destination.destination.port
        );
        return Err(Early::Local(
            StatusCode::SERVICE_UNAVAILABLE,
            "NC",
            "no healthy upstream",
        ));
    };
    let key = ClusterKey {
        service: target_service.key(),
        subset: destination.destination.subset.clone(),
        port,
    };
    finish.destination_service = Some(target_service.clone());
    finish.subset = key.subset.clone();

    if let Err(e) = selected.apply_request_filters(&mut parts) {
        finish.reason = format!("rewrite failed: {e}");
        return Err(Early::Local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "-",
            "invalid rewrite",
        ));
    }
    let upgrading = upgrade.is_some();
    let protocol = upstream_protocol(
        downstream,
        &target_service,
        port,
        parts.version,
        upgrading,
        finish.grpc,
    );
    let authority = authority_of(&parts);
    prepare_upstream_headers(&mut parts, upgrading);

    let wants_replay = selected.route.retries.attempts > 0 || !selected.route.mirrors.is_empty();
    let payload = if !upgrading && wants_replay && body_fits(&body, &parts.headers) {
        match body.collect().await {
            Ok(collected) => Payload::Buffered(collected.to_bytes()),
            Err(e) => {
                finish.reason = format!("reading the request body: {e}");
                return Err(Early::Local(
                    StatusCode::BAD_REQUEST,
                    "DPE",
                    "bad request body",
                ));
            }
        }
    } else {
        Payload::Streaming(Some(body.boxed_unsync()))
    };

    if let Payload::Buffered(bytes) = &payload {
        let mirror = Mirror {
            parts: &parts,
            protocol,
            authority: &authority,
            body: bytes,
        };
        mirror.spawn(engine, routing, downstream, &selected, rng);
    }
    set_uri_for(&mut parts, protocol, &authority);

    let attempt = Attempts {
        key: &key,
        protocol,
        parts: &parts,
        upgrading,
    };
    let upstream = attempt
        .run(engine, downstream, &selected, payload, rng, finish)
        .await?;
    Ok(upstream_response(
        &selected,
        upstream,
        upgrade,
        cors_request_headers.as_ref(),
        finish,
    ))
}

/// A copy of the request for the route's mirrors.
struct Mirror<'a> {
    parts: &'a http::request::Parts,
    protocol: UpstreamProtocol,
    authority: &'a str,
    body: &'a Bytes,
}

impl Mirror<'_> {
    /// Fires the mirrors that the dice pick; they never delay or fail the request.
    fn spawn(
        &self,
        engine: &Engine,
        routing: &Routing,
        downstream: &Downstream,
        selected: &Selected<'_>,
        rng: &mut fastrand::Rng,
    ) {
        for mirror in &selected.route.mirrors {
            if !filters::should_mirror(mirror, rng) {
                continue;
            }
            let Some((mirror_service, mirror_port)) =
                resolve_destination(routing, downstream, &mirror.destination)
            else {
                tracing::debug!(host = %mirror.destination.host, "mirror destination is not a known service; skipped");
                continue;
            };
            let mirror_key = ClusterKey {
                service: mirror_service.key(),
                subset: mirror.destination.subset.clone(),
                port: mirror_port,
            };
            let mut mirror_parts = clone_parts(self.parts);
            let shadow = format!("{}-shadow", self.authority.split(':').next().unwrap_or(""));
            let _ = filters::set_authority(&mut mirror_parts, &shadow);
            set_uri_for(&mut mirror_parts, self.protocol, &shadow);
            let mirror_request = Request::from_parts(mirror_parts, full_body(self.body.clone()));
            let upstreams = engine.upstreams.clone();
            let source_ip = downstream.source.ip;
            let protocol = self.protocol;
            tokio::spawn(async move {
                let empty = HeaderMap::new();
                let hash = HashInput {
                    source_ip,
                    headers: &empty,
                    query: None,
                    previous_hosts: &[],
                };
                match upstreams
                    .send(&mirror_key, protocol, mirror_request, &hash)
                    .await
                {
                    Ok(response) => {
                        // Drain so the connection can be reused.
                        let _ = response.response.into_body().collect().await;
                    }
                    Err(e) => tracing::debug!(error = %e, "mirror request failed"),
                }
            });
        }
    }
}

/// The attempts of one request to one cluster.
struct Attempts<'a> {
    key: &'a ClusterKey,
    protocol: UpstreamProtocol,
    parts: &'a http::request::Parts,
    upgrading: bool,
}

impl Attempts<'_> {
    /// Sends the request, retrying as the route's `retries` allow within its timeout; the first
    /// answer that is not retried is the result.
    async fn run(
        &self,
        engine: &Engine,
        downstream: &Downstream,
        selected: &Selected<'_>,
        mut payload: Payload,
        rng: &mut fastrand::Rng,
        finish: &mut Finish,
    ) -> Stage<UpstreamResponse> {
        let (key, parts) = (self.key, self.parts);
        let route = selected.route;
        let started = Instant::now();
        let deadline = route.timeout.map(|t| started + t);
        // Endpoints already tried: a retry goes elsewhere when it can (Envoy's
        // `previous_hosts`).
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt: u32 = 0;
        let mut _retry_permit = None;
        loop {
            attempt += 1;
            finish.attempts = attempt;
            let upstream_request = Request::from_parts(clone_parts(parts), payload.next());
            let now = Instant::now();
            let remaining = deadline.map(|d| d.saturating_duration_since(now));
            let limit = match (route.retries.per_try_timeout, remaining) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let hash = HashInput {
                source_ip: downstream.source.ip,
                headers: &parts.headers,
                query: parts.uri.query(),
                previous_hosts: &tried,
            };
            let send = engine
                .upstreams
                .send(key, self.protocol, upstream_request, &hash);
            let result = match limit {
                Some(limit) => tokio::time::timeout(limit, send).await.ok(),
                None => Some(send.await),
            };
            let endpoint = match &result {
                Some(Ok(response)) => Some(response.endpoint),
                Some(Err(e)) => e.endpoint(),
                None => None,
            };
            tried.extend(endpoint);
            let outcome = match &result {
                None => AttemptOutcome::PerTryTimeout,
                Some(Ok(response)) => AttemptOutcome::Response {
                    status: response.response.status().as_u16(),
                    grpc_status: grpc::grpc_status(response.response.headers()),
                },
                Some(Err(e)) => attempt_outcome(e),
            };
            let overall_expired = deadline.is_some_and(|d| Instant::now() >= d);
            let retriable_error = match &result {
                // Circuit-breaker overflow and missing endpoints are final, as in Envoy.
                Some(Err(e)) => !matches!(
                    e,
                    UpstreamError::Overflow { .. }
                        | UpstreamError::NoHealthyUpstream { .. }
                        | UpstreamError::NoCluster { .. }
                ),
                _ => true,
            };
            let replayable = matches!(payload, Payload::Buffered(_))
                || (attempt == 1 && is_empty_request(parts));
            let may_retry = attempt <= route.retries.attempts
                && !overall_expired
                && retriable_error
                && !self.upgrading
                && replayable
                && is_retriable(&route.retries.retry_on, &outcome);
            if may_retry {
                match engine.upstreams.try_retry_permit(key) {
                    Some(permit) => {
                        _retry_permit = Some(permit);
                        if let Some(Ok(response)) = result {
                            // Discard the failed answer; its connection goes back to the pool.
                            tokio::spawn(async move {
                                let _ = response.response.into_body().collect().await;
                            });
                        }
                        let wait = retry_backoff(attempt, route.retries.backoff, rng);
                        tracing::debug!(attempt, ?outcome, ?wait, cluster = ?key, "retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    None => {
                        tracing::debug!(cluster = ?key, "retry budget (maxRetries) exhausted");
                        finish.retry_overflow = true;
                    }
                }
            }
            return match result {
                None => {
                    finish.reason = if overall_expired {
                        format!(
                            "route timeout {:?} expired",
                            route.timeout.unwrap_or_default()
                        )
                    } else {
                        format!(
                            "per-try timeout {:?} expired on attempt {attempt}",
                            route.retries.per_try_timeout.unwrap_or_default()
                        )
                    };
                    Err(Early::Local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        "upstream request timeout",
                    ))
                }
                Some(Err(e)) => {
                    finish.endpoint = e.endpoint();
                    finish.reason = e.to_string();
                    let body = match &e {
                        UpstreamError::Overflow { .. } => {
                            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
                        }
                        UpstreamError::NoHealthyUpstream { .. }
                        | UpstreamError::NoCluster { .. } => "no healthy upstream",
                        _ => "upstream connect error or disconnect/reset before headers",
                    };
                    Err(Early::Local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        e.response_flag(),
                        body,
                    ))
                }
                Some(Ok(upstream)) => Ok(upstream),
            };
        }
    }
}

/// The upstream's response as the client gets it: hop-by-hop headers dropped, the route's
/// response header edits, CORS headers and a session cookie added; or, for a
/// `101 Switching Protocols`, the two upgraded connections spliced.
fn upstream_response(
    selected: &Selected<'_>,
    upstream: UpstreamResponse,
    upgrade: Option<OnUpgrade>,
    cors_request_headers: Option<&HeaderMap>,
    finish: &mut Finish,
) -> Response<Body> {
    finish.endpoint = Some(upstream.endpoint);
    finish.destination_workload = upstream.workload.clone();
    let (mut response_parts, response_body) = upstream.response.into_parts();
    if response_parts.status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(downstream_upgrade) = upgrade
    {
        // The upgraded stream is in the upstream response's extensions: they go with the
        // response handed to `splice_upgrade`, not with the copy sent downstream.
        let mut upstream_parts = clone_response_parts(&response_parts);
        upstream_parts.extensions = std::mem::take(&mut response_parts.extensions);
        let upstream_response = Response::from_parts(upstream_parts, response_body);
        splice_upgrade(downstream_upgrade, upstream_response);
        finish.reason = "upgraded".into();
        return Response::from_parts(response_parts, full_body(Bytes::new()));
    }
    strip_hop_by_hop(&mut response_parts.headers);
    selected.apply_response_headers(&mut response_parts.headers);
    if let (Some(policy), Some(request_headers)) =
        (selected.route.cors.as_ref(), cors_request_headers)
    {
        cors::apply_response_headers(policy, request_headers, &mut response_parts.headers);
    }
    if let Some(cookie) = upstream.set_cookie {
        response_parts.headers.append(header::SET_COOKIE, cookie);
    }
    let body = response_body
        .map_err(|e| Box::new(e) as BoxError)
        .boxed_unsync();
    Response::from_parts(response_parts, body)
}

/// The answer of a server with `httpsRedirect`: 301 to the same URL with `https`, as Envoy's
/// `https_redirect` (an explicit `:80` is dropped, another port kept).
fn https_redirect(parts: &http::request::Parts) -> Response<Bytes> {
    let authority = authority_of(parts);
    let authority = authority.strip_suffix(":80").unwrap_or(&authority);
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(location) = http::HeaderValue::from_str(&format!("https://{authority}{path}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// The request's host, lower case, without a port (for the ingress's virtual host choice).
fn request_host(parts: &http::request::Parts) -> String {
    let authority = authority_of(parts);
    let host = match authority.rsplit_once(':') {
        // `[::1]:80`, `example.com:80`; a bare IPv6 address has more than one colon.
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
            host
        }
        _ => authority.as_str(),
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn route_label(selected: &Selected<'_>) -> String {
    let name = selected.route_name();
    match (selected.virtual_service, name.is_empty()) {
        (Some(vs), true) => format!("{vs}#{}", selected.index),
        (Some(vs), false) => format!("{vs}/{name}"),
        (None, _) => "default".to_owned(),
    }
}

/// The service and port a destination names: `host` by its FQDN; the port given, else the
/// request's port on the same service, else the destination's only port.
fn resolve_destination(
    routing: &Routing,
    downstream: &Downstream,
    destination: &mesh::model::Destination,
) -> Option<(Arc<Service>, u16)> {
    let key = routing.hosts.get(&destination.host)?;
    let service = routing.state.services.get(key)?.clone();
    let port = match destination.port {
        Some(p) => p,
        None if service.key() == downstream.service.key() => downstream.port.port,
        None if service.ports.len() == 1 => service.ports[0].port,
        None => downstream.port.port,
    };
    service
        .ports
        .iter()
        .any(|p| p.port == port)
        .then_some((service, port))
}

/// HTTP/2 upstream when the destination port declares it (`http2`, `grpc`) or the client spoke
/// HTTP/2 on an undeclared or `http` port (Istio's `useClientProtocol` behaviour, which keeps
/// gRPC working); HTTP/1.1 otherwise, and always for upgrades.
fn upstream_protocol(
    downstream: &Downstream,
    service: &Service,
    port: u16,
    version: Version,
    upgrading: bool,
    grpc_request: bool,
) -> UpstreamProtocol {
    if upgrading {
        return UpstreamProtocol::Http1;
    }
    let declared = service
        .ports
        .iter()
        .find(|p| p.port == port)
        .and_then(|p| p.app_protocol.clone());
    // The ingress's clients speak whatever ALPN chose (curl and browsers: h2), which says
    // nothing of the backend: there only the destination's declared protocol counts, and gRPC
    // (which needs HTTP/2 end to end).
    if downstream.scope.is_some() {
        return match declared.as_deref() {
            Some("http2" | "grpc" | "h2c" | "kubernetes.io/h2c") => UpstreamProtocol::Http2,
            _ if grpc_request => UpstreamProtocol::Http2,
            _ => UpstreamProtocol::Http1,
        };
    }
    let declared = declared.or_else(|| downstream.port.app_protocol.clone());
    match declared.as_deref() {
        Some("http2" | "grpc" | "h2c" | "kubernetes.io/h2c") => UpstreamProtocol::Http2,
        _ if version == Version::HTTP_2 => UpstreamProtocol::Http2,
        _ => UpstreamProtocol::Http1,
    }
}

/// Whether the request body may be buffered for replays: absent, or with a known length up to
/// [`REPLAY_LIMIT`].
fn body_fits<B: RequestBody>(body: &CountedBody<B>, headers: &HeaderMap) -> bool
where
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return true;
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| body.size_hint().exact());
    length.is_some_and(|n| n <= REPLAY_LIMIT)
}

fn attempt_outcome(error: &UpstreamError) -> AttemptOutcome {
    match error {
        UpstreamError::ConnectFailure { .. } | UpstreamError::ConnectTimeout { .. } => {
            AttemptOutcome::ConnectFailure
        }
        UpstreamError::RefusedStream { .. } => AttemptOutcome::RefusedStream,
        _ => AttemptOutcome::Reset,
    }
}

/// Joins the client's and the upstream's upgraded connections (WebSocket and friends).
fn splice_upgrade<B>(downstream: OnUpgrade, mut upstream: Response<B>) {
    let upstream_upgrade = hyper::upgrade::on(&mut upstream);
    tokio::spawn(async move {
        let (client, server) = match tokio::try_join!(downstream, upstream_upgrade) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut server = hyper_util::rt::TokioIo::new(server);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}
