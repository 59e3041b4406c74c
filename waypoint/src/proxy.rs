//! One HTTP request through the waypoint, in the order Envoy's HTTP filter chain applies it:
//! L7 authorization, rate limits, route selection, CORS, fault injection, the route's action
//! (redirect, direct response, or forwarding with rewrites, header edits, mirrors, retries and
//! the route timeout), then the response's header edits. Every request ends in exactly one metrics
//! record and one access-log line ([`Finish`]), including local replies, so an operator can
//! explain every 403, 404, 429, 503 and 504 from the log alone.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use mesh::model::{Service, Workload};

use crate::app::{Context, Routing};
use crate::inbound::Downstream;
use crate::request::{Body, BoxError, full_body};
use crate::route::filters::{self, FaultDecision};
use crate::route::retry::{AttemptOutcome, is_retriable, retry_backoff};
use crate::route::{RequestView, Selected, SelectedAction, cors, grpc};
use crate::upstream::{ClusterKey, HashInput, UpstreamError, UpstreamProtocol};

/// Request bodies up to this size are kept so the request can be retried or mirrored; larger
/// or streaming bodies are sent once (a failed attempt is then final), as Envoy does when its
/// retry buffer overflows.
const REPLAY_LIMIT: u64 = 64 * 1024;

use crate::authz::ACCESS_DENIED_BODY as DENIED_BODY;
use crate::metrics::LocalReply;

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

/// Handles one request; never fails (errors become local replies).
pub async fn handle(
    ctx: Arc<Context>,
    downstream: Arc<Downstream>,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let routing = ctx.routes.load_full();
    let mut finish = Finish::new(&ctx, &downstream, &request);
    strip_h2c_upgrade(request.headers_mut());
    let upgrade = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let request_bytes = Arc::new(AtomicU64::new(0));
    let body = CountedBody::new(body, request_bytes.clone());
    finish.request_bytes = Some(request_bytes);
    let grpc_request = grpc::is_grpc_request(&parts.headers);
    finish.grpc = grpc_request;
    let mut rng = fastrand::Rng::new();

    // 1. L7 authorization, on the original client's identity.
    if let Err(denied) = downstream.authorize(&ctx, &routing.state, Some(&parts)) {
        finish.reason = denied;
        return finish.local(StatusCode::FORBIDDEN, "RBAC", DENIED_BODY);
    }

    // 1b. Rate limits (RateLimitPolicy), after authorization so a denied request spends no
    // token; their `x-ratelimit-*` headers go on whatever this request is answered.
    let rate_limit = crate::ratelimit::check(&ctx, &downstream, &parts);
    finish.extra_response_headers = rate_limit.headers;
    if let Some(limited) = rate_limit.limited {
        let response = limited.response(grpc_request).map(full_body);
        finish.reason = limited.reason;
        finish.local_reply = Some(LocalReply::RateLimited);
        return finish.respond(response, "RL");
    }

    // 2. The route.
    let service_key = downstream.service.key();
    let view = RequestView::from_parts(&parts, downstream.port.port);
    let Some(selected) =
        routing
            .table
            .select_http(&service_key, &view, &downstream.source, &mut rng)
    else {
        finish.reason = format!("no route of {service_key} matches");
        return finish.local(StatusCode::NOT_FOUND, "NR", "route not found");
    };
    finish.route = route_label(&selected);

    // 3. CORS preflight.
    let cors_policy = selected.route.cors.as_ref();
    if let Some(policy) = cors_policy
        && let Some(headers) = cors::preflight(policy, &parts.headers, &parts.method)
    {
        let mut response = Response::new(full_body(Bytes::new()));
        *response.headers_mut() = headers;
        finish.reason = "CORS preflight".into();
        return finish.respond(response, "-");
    }
    let request_headers_for_cors = cors_policy.map(|_| parts.headers.clone());

    // 4. Fault injection.
    if let Some(fault) = &selected.route.fault {
        let FaultDecision { delay, abort } = filters::decide_fault(fault, &mut rng);
        if let Some(delay) = delay {
            finish.flags_delay = true;
            tokio::time::sleep(delay).await;
        }
        if let Some(abort) = abort {
            finish.reason = format!("fault abort {abort:?}");
            finish.local_reply = Some(LocalReply::FaultAbort);
            let response = filters::abort_response(&abort, grpc_request).map(full_body);
            return finish.respond(response, "FI");
        }
    }

    // 5. The action.
    let destination = match selected.action {
        SelectedAction::Redirect(redirect) => {
            finish.reason = "redirect".into();
            finish.local_reply = Some(LocalReply::Redirect);
            let response = filters::redirect_response(redirect, &view).map(full_body);
            return finish.respond(response, "-");
        }
        SelectedAction::DirectResponse(direct) => {
            finish.reason = "direct response".into();
            finish.local_reply = Some(LocalReply::DirectResponse);
            let response = filters::direct_response(direct).map(full_body);
            return finish.respond(response, "-");
        }
        SelectedAction::Route(destination) => destination,
    };
    let Some((target_service, port)) =
        resolve_destination(&routing, &downstream, &destination.destination)
    else {
        finish.reason = format!(
            "route destination {} port {:?} is not a known service port (check the VirtualService's destination host and port)",
            destination.destination.host, destination.destination.port
        );
        return finish.local(StatusCode::SERVICE_UNAVAILABLE, "NC", "no healthy upstream");
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
        return finish.local(StatusCode::INTERNAL_SERVER_ERROR, "-", "invalid rewrite");
    }
    let protocol = upstream_protocol(&downstream, &target_service, port, parts.version, &upgrade);
    let authority = authority_of(&parts);
    prepare_upstream_headers(&mut parts, upgrade.is_some());

    // 6. The body: kept when it may be sent more than once.
    let wants_replay = selected.route.retries.attempts > 0 || !selected.route.mirrors.is_empty();
    let replayable = upgrade.is_none() && wants_replay && body_fits(&body, &parts.headers);
    let mut streaming: Option<Body> = None;
    let buffered: Option<Bytes> = if replayable {
        match body.collect().await {
            Ok(collected) => Some(collected.to_bytes()),
            Err(e) => {
                finish.reason = format!("reading the request body: {e}");
                return finish.local(StatusCode::BAD_REQUEST, "DPE", "bad request body");
            }
        }
    } else {
        streaming = Some(body.boxed_unsync());
        None
    };

    // 7. Mirrors: fire and forget, never delaying or failing the request.
    if let Some(bytes) = &buffered {
        for mirror in &selected.route.mirrors {
            if !filters::should_mirror(mirror, &mut rng) {
                continue;
            }
            let Some((mirror_service, mirror_port)) =
                resolve_destination(&routing, &downstream, &mirror.destination)
            else {
                tracing::debug!(host = %mirror.destination.host, "mirror destination is not a known service; skipped");
                continue;
            };
            let mirror_key = ClusterKey {
                service: mirror_service.key(),
                subset: mirror.destination.subset.clone(),
                port: mirror_port,
            };
            let mut mirror_parts = clone_parts(&parts);
            let shadow = format!("{}-shadow", authority.split(':').next().unwrap_or(""));
            let _ = filters::set_authority(&mut mirror_parts, &shadow);
            set_uri_for(&mut mirror_parts, protocol, &shadow);
            let mirror_request = Request::from_parts(mirror_parts, full_body(bytes.clone()));
            let upstreams = ctx.upstreams.clone();
            let source_ip = downstream.source.ip;
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
    set_uri_for(&mut parts, protocol, &authority);

    // 8. Attempts, within the route timeout.
    let route = selected.route;
    let started = Instant::now();
    let deadline = route.timeout.map(|t| started + t);
    // Endpoints already tried: a retry goes elsewhere when it can (Envoy's `previous_hosts`).
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt: u32 = 0;
    let mut _retry_permit = None;
    loop {
        attempt += 1;
        finish.attempts = attempt;
        let body = match (&buffered, streaming.take()) {
            (Some(bytes), _) => full_body(bytes.clone()),
            (None, Some(body)) => body,
            (None, None) => full_body(Bytes::new()),
        };
        let upstream_request = Request::from_parts(clone_parts(&parts), body);
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
        let send = ctx.upstreams.send(&key, protocol, upstream_request, &hash);
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
        let may_retry = attempt <= route.retries.attempts
            && !overall_expired
            && retriable_error
            && upgrade.is_none()
            && (buffered.is_some() || (attempt == 1 && is_empty_request(&parts)))
            && is_retriable(&route.retries.retry_on, &outcome);
        if may_retry {
            match ctx.upstreams.try_retry_permit(&key) {
                Some(permit) => {
                    _retry_permit = Some(permit);
                    if let Some(Ok(response)) = result {
                        // Discard the failed answer; its connection goes back to the pool.
                        tokio::spawn(async move {
                            let _ = response.response.into_body().collect().await;
                        });
                    }
                    let wait = retry_backoff(attempt, &mut rng);
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
                finish.local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                )
            }
            Some(Err(e)) => {
                finish.endpoint = e.endpoint();
                finish.reason = e.to_string();
                let (status, body) = match &e {
                    UpstreamError::Overflow { .. } => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                    ),
                    UpstreamError::NoHealthyUpstream { .. } | UpstreamError::NoCluster { .. } => {
                        (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
                    }
                    _ => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers",
                    ),
                };
                finish.local(status, e.response_flag(), body)
            }
            Some(Ok(upstream)) => {
                finish.endpoint = Some(upstream.endpoint);
                finish.destination_workload = upstream.workload.clone();
                let (mut response_parts, response_body) = upstream.response.into_parts();
                if response_parts.status == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(downstream_upgrade) = upgrade
                {
                    // The upgraded stream is in the upstream response's extensions: they go with
                    // the response handed to `splice_upgrade`, not with the copy sent downstream.
                    let mut upstream_parts = clone_response_parts(&response_parts);
                    upstream_parts.extensions = std::mem::take(&mut response_parts.extensions);
                    let upstream_response = Response::from_parts(upstream_parts, response_body);
                    splice_upgrade(downstream_upgrade, upstream_response);
                    finish.reason = "upgraded".into();
                    let response = Response::from_parts(response_parts, full_body(Bytes::new()));
                    return finish.respond(response, "-");
                }
                strip_hop_by_hop(&mut response_parts.headers);
                selected.apply_response_headers(&mut response_parts.headers);
                if let (Some(policy), Some(request_headers)) =
                    (cors_policy, &request_headers_for_cors)
                {
                    cors::apply_response_headers(
                        policy,
                        request_headers,
                        &mut response_parts.headers,
                    );
                }
                if let Some(cookie) = upstream.set_cookie {
                    response_parts.headers.append(header::SET_COOKIE, cookie);
                }
                let body = response_body
                    .map_err(|e| Box::new(e) as BoxError)
                    .boxed_unsync();
                finish.respond(Response::from_parts(response_parts, body), "-")
            }
        };
    }
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
    upgrade: &Option<hyper::upgrade::OnUpgrade>,
) -> UpstreamProtocol {
    if upgrade.is_some() {
        return UpstreamProtocol::Http1;
    }
    let declared = service
        .ports
        .iter()
        .find(|p| p.port == port)
        .and_then(|p| p.app_protocol.clone())
        .or_else(|| downstream.port.app_protocol.clone());
    match declared.as_deref() {
        Some("http2" | "grpc" | "h2c" | "kubernetes.io/h2c") => UpstreamProtocol::Http2,
        _ if version == Version::HTTP_2 => UpstreamProtocol::Http2,
        _ => UpstreamProtocol::Http1,
    }
}

/// The request's authority: `:authority` (HTTP/2) or `Host`.
pub(crate) fn authority_of(parts: &http::request::Parts) -> String {
    authority(&parts.uri, &parts.headers)
}

fn authority(uri: &http::Uri, headers: &HeaderMap) -> String {
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
fn set_uri_for(parts: &mut http::request::Parts, protocol: UpstreamProtocol, authority: &str) {
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

fn prepare_upstream_headers(parts: &mut http::request::Parts, upgrade: bool) {
    let upgrade_value = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if upgrade && let Some(value) = upgrade_value {
        parts.headers.insert(header::UPGRADE, value);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:032x}", fastrand::u128(..));
        if let Ok(v) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", v);
        }
    }
}

/// `Upgrade: h2c` (what `curl --http2` sends on `http://`) is not an upgrade the waypoint
/// performs: as Envoy, it drops the upgrade headers and serves the request over HTTP/1.1.
fn strip_h2c_upgrade(headers: &mut HeaderMap) {
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

fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
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

fn clone_response_parts(parts: &http::response::Parts) -> http::response::Parts {
    let (mut cloned, ()) = Response::new(()).into_parts();
    cloned.status = parts.status;
    cloned.version = parts.version;
    cloned.headers = parts.headers.clone();
    cloned
}

/// Whether the request body may be buffered for replays: absent, or with a known length up to
/// [`REPLAY_LIMIT`].
fn body_fits(body: &CountedBody, headers: &HeaderMap) -> bool {
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

fn is_empty_request(parts: &http::request::Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v == "0")
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
fn splice_upgrade<B>(downstream: hyper::upgrade::OnUpgrade, mut upstream: Response<B>) {
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

/// Counts the bytes of a body as they pass.
#[derive(Debug)]
pub struct CountedBody {
    inner: Incoming,
    count: Arc<AtomicU64>,
}

impl CountedBody {
    fn new(inner: Incoming, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Everything the access log and the metrics say about one request, finished exactly once:
/// when the response body ends or is dropped (so durations and response sizes are whole).
#[allow(missing_debug_implementations)]
pub struct Finish {
    ctx: Arc<Context>,
    downstream: Arc<Downstream>,
    started: Instant,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub route: String,
    pub subset: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub attempts: u32,
    pub reason: String,
    pub grpc: bool,
    pub flags_delay: bool,
    pub retry_overflow: bool,
    pub destination_service: Option<Arc<Service>>,
    pub destination_workload: Option<Arc<Workload>>,
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub local_reply: Option<LocalReply>,
    /// Added to (replacing) the response's headers, whoever made it: the rate limits'
    /// `x-ratelimit-*` and `retry-after`.
    pub extra_response_headers: HeaderMap,
    /// Set by [`crate::record::record`]; a `Finish` dropped unrecorded is a request the
    /// client abandoned before the answer.
    pub(crate) recorded: bool,
}

impl Drop for Finish {
    /// The client went away (closed the connection, reset the stream) before the response
    /// started: the request is still recorded, as Envoy does, with response code 0 and flag
    /// DC.
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        if self.reason.is_empty() {
            self.reason =
                "the client closed the connection or the stream before the response".to_owned();
        }
        let flag = if self.flags_delay { "DI,DC" } else { "DC" };
        crate::record::record(self, 0, flag, 0, None);
    }
}

impl Finish {
    fn new(ctx: &Arc<Context>, downstream: &Arc<Downstream>, request: &Request<Incoming>) -> Self {
        Self {
            ctx: ctx.clone(),
            downstream: downstream.clone(),
            started: Instant::now(),
            method: request.method().to_string(),
            authority: authority(request.uri(), request.headers()),
            path: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            route: "-".into(),
            subset: None,
            endpoint: None,
            attempts: 0,
            reason: String::new(),
            grpc: false,
            flags_delay: false,
            retry_overflow: false,
            destination_service: None,
            destination_workload: None,
            request_bytes: None,
            local_reply: None,
            extra_response_headers: HeaderMap::new(),
            recorded: false,
        }
    }

    /// A reply the waypoint makes itself (`flag` is Envoy's response flag).
    fn local(mut self, status: StatusCode, flag: &'static str, message: &str) -> Response<Body> {
        self.local_reply = Some(match flag {
            "RBAC" => LocalReply::AuthzDenied,
            "NR" => LocalReply::NoRoute,
            "UH" | "NC" => LocalReply::NoHealthyUpstream,
            "UO" => LocalReply::Overflow,
            "UT" => LocalReply::Timeout,
            _ => LocalReply::UpstreamFailure,
        });
        let response = grpc::local_reply(status, message, self.grpc).map(full_body);
        self.respond(response, flag)
    }

    /// Wraps the response body so the record is made when it ends.
    fn respond(mut self, mut response: Response<Body>, flag: &'static str) -> Response<Body> {
        let extra = std::mem::take(&mut self.extra_response_headers);
        response.headers_mut().extend(extra);
        let flag = match (flag, self.flags_delay) {
            ("-", true) => "DI",
            (f, _) => f,
        };
        let status = response.status().as_u16();
        let grpc_status = grpc::grpc_status(response.headers());
        let (parts, body) = response.into_parts();
        let observed = ObservedBody {
            inner: body,
            bytes: 0,
            grpc_status,
            done: Some(Done {
                finish: self,
                status,
                flag,
            }),
        };
        Response::from_parts(parts, observed.boxed_unsync())
    }
}

struct Done {
    finish: Finish,
    status: u16,
    flag: &'static str,
}

/// A response body that records the request when it ends or is dropped.
struct ObservedBody {
    inner: Body,
    bytes: u64,
    grpc_status: Option<u32>,
    done: Option<Done>,
}

impl ObservedBody {
    fn complete(&mut self) {
        if let Some(mut done) = self.done.take() {
            crate::record::record(
                &mut done.finish,
                done.status,
                done.flag,
                self.bytes,
                self.grpc_status,
            );
        }
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.complete();
    }
}

impl hyper::body::Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = grpc::grpc_status(trailers)
                {
                    self.grpc_status = Some(status);
                }
            }
            Poll::Ready(None) => self.complete(),
            Poll::Ready(Some(Err(e))) => {
                if let Some(done) = &mut self.done {
                    done.finish.reason = format!("response body failed: {e}");
                    done.flag = "UR";
                }
                self.complete();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Finish {
    pub fn ctx(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub fn downstream(&self) -> &Arc<Downstream> {
        &self.downstream
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
