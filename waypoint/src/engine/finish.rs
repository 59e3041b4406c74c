//! One request's record: [`Finish`] follows the request through the engine and is recorded
//! exactly once (metrics and one access-log line), when the response body ends or is dropped,
//! or when the client goes away first.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use mesh::model::{Service, Workload};

use super::{Downstream, Engine};
use crate::metrics::{
    LocalReply, RequestProtocol, RequestRecord, log_access, peer_labels, service_labels,
};
use crate::request::{Body, BoxError, full_body};
use crate::route::grpc;

/// Counts the bytes of a body as they pass. Generic over the front door's body type, so the
/// request body is not boxed once more per request.
#[derive(Debug)]
pub(super) struct CountedBody<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> CountedBody<B> {
    pub(super) fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B> hyper::body::Body for CountedBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
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
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
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
pub(super) struct Finish {
    engine: Arc<Engine>,
    downstream: Arc<Downstream>,
    started: Instant,
    pub(super) method: String,
    pub(super) authority: String,
    pub(super) path: String,
    pub(super) route: String,
    pub(super) subset: Option<String>,
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) attempts: u32,
    pub(super) reason: String,
    pub(super) grpc: bool,
    pub(super) flags_delay: bool,
    pub(super) retry_overflow: bool,
    pub(super) destination_service: Option<Arc<Service>>,
    pub(super) destination_workload: Option<Arc<Workload>>,
    pub(super) request_bytes: Option<Arc<AtomicU64>>,
    pub(super) local_reply: Option<LocalReply>,
    /// Added to (replacing) the response's headers, whoever made it: the rate limits'
    /// `x-ratelimit-*` and `retry-after`.
    pub(super) extra_response_headers: HeaderMap,
    /// Set by [`Finish::record`]; a `Finish` dropped unrecorded is a request the client
    /// abandoned before the answer.
    recorded: bool,
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
        self.record(0, flag, 0, None);
    }
}

impl Finish {
    pub(super) fn new<B>(
        engine: &Arc<Engine>,
        downstream: &Arc<Downstream>,
        request: &Request<B>,
    ) -> Self {
        Self {
            engine: engine.clone(),
            downstream: downstream.clone(),
            started: Instant::now(),
            method: request.method().to_string(),
            authority: super::headers::authority(request.uri(), request.headers()),
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
    pub(super) fn local(
        mut self,
        status: StatusCode,
        flag: &'static str,
        message: &str,
    ) -> Response<Body> {
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
    pub(super) fn respond(
        mut self,
        mut response: Response<Body>,
        flag: &'static str,
    ) -> Response<Body> {
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
            done.finish
                .record(done.status, done.flag, self.bytes, self.grpc_status);
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
    pub(super) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records the finished request: `istio_requests_total` and friends, then the access log.
    /// Marks it recorded, so it is recorded once.
    fn record(
        &mut self,
        status: u16,
        flag: &'static str,
        response_bytes: u64,
        grpc_status: Option<u32>,
    ) {
        let downstream = &self.downstream;
        let service = self
            .destination_service
            .clone()
            .unwrap_or_else(|| downstream.service.clone());
        let mut flags = flag.to_owned();
        if self.retry_overflow {
            flags = if flags == "-" {
                "URX".into()
            } else {
                format!("{flags},URX")
            };
        }
        let cluster = &self.engine.identity.cluster_id;
        let record = RequestRecord {
            reporter: self.engine.identity.reporter.as_str(),
            source: peer_labels(
                downstream.source.workload.as_deref(),
                downstream.source.identity.as_ref(),
                cluster,
            ),
            destination: peer_labels(
                self.destination_workload.as_deref(),
                self.destination_workload.as_ref().map(|w| &w.identity),
                cluster,
            ),
            service: service_labels(Some(&service)),
            protocol: if self.grpc {
                RequestProtocol::Grpc
            } else {
                RequestProtocol::Http
            },
            response_code: status,
            grpc_status,
            response_flags: if flags == "-" { String::new() } else { flags },
            mutual_tls: downstream.mutual_tls,
            duration: self.elapsed(),
            request_bytes: self
                .request_bytes
                .as_ref()
                .map_or(0, |b| b.load(Ordering::Relaxed)),
            response_bytes,
            method: self.method.parse().unwrap_or_default(),
            authority: self.authority.clone(),
            path: self.path.clone(),
            route: Some(self.route.clone()),
            subset: self.subset.clone(),
            endpoint: self.endpoint,
            attempts: self.attempts,
            local_reply: self.local_reply,
            failure_reason: (!self.reason.is_empty()).then(|| self.reason.clone()),
        };
        self.recorded = true;
        self.engine.metrics.record(&record);
        log_access(&record);
    }
}
