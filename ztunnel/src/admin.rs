//! The operator's ports: admin (15000: `/config_dump`, `/logging`, `/quitquitquit`), metrics
//! (15020: `/metrics`) and readiness (15021: `/healthz/ready`). Plain HTTP/1.1 with hyper; each
//! listener is bound up front so a port conflict fails start-up with a clear error.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::Context;

/// Changes the log filter at run time (`/logging?level=debug` or `?filter=mesh=debug,info`).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Readiness: the first state load happened, every local pod has its certificate, and the
/// node is not draining.
#[derive(Debug, Default)]
pub struct Readiness {
    pub draining: AtomicBool,
}

impl Readiness {
    pub fn check(&self, ctx: &Context) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        if !ctx.store.has_synced() {
            return Err("waiting for the first configuration load".into());
        }
        if ctx.applied_version.load(Ordering::Acquire) == 0 {
            return Err("waiting for the pods of the first configuration to be set up".into());
        }
        let pending: Vec<String> = ctx
            .certs
            .summaries()
            .into_iter()
            .filter(|c| c.state != "available")
            .map(|c| format!("{} ({})", c.identity, c.state))
            .collect();
        if !pending.is_empty() {
            return Err(format!("certificates not ready: {}", pending.join(", ")));
        }
        Ok(())
    }
}

/// Binds `addr`, naming the role in the error.
pub async fn bind(role: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{role} listener on {addr}: {e} (is another ztunnel running?)"))
}

type Handler = Arc<dyn Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `handler` on `listener` until `stop`.
pub fn serve(listener: TcpListener, stop: CancellationToken, handler: Handler) {
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r
}

/// `/healthz/ready`.
pub fn readiness_handler(ctx: Arc<Context>, readiness: Arc<Readiness>) -> Handler {
    Arc::new(move |req| {
        if req.uri().path() != "/healthz/ready" {
            return text(StatusCode::NOT_FOUND, "try /healthz/ready\n");
        }
        match readiness.check(&ctx) {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        }
    })
}

/// `/metrics` in the Prometheus text format.
pub fn metrics_handler(registry: Arc<Registry>) -> Handler {
    Arc::new(move |req| {
        if req.uri().path() != "/metrics" {
            return text(StatusCode::NOT_FOUND, "try /metrics\n");
        }
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, &registry) {
            Ok(()) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics: {e}\n"),
            ),
        }
    })
}

/// What `/config_dump` shows.
#[derive(serde::Serialize)]
struct ConfigDump<'a> {
    node: &'a str,
    config: &'a crate::config::Config,
    pods: Vec<String>,
    state: &'a mesh::model::State,
    certificates: Vec<mesh::cert_manager::CertSummary>,
    connections: Vec<ConnectionDump>,
}

#[derive(serde::Serialize)]
struct ConnectionDump {
    #[serde(flatten)]
    conn: crate::proxy::live::LiveConnection,
    age_ms: u128,
    bytes_to_server: u64,
    bytes_to_client: u64,
}

/// `/config_dump`, `/logging`, `/quitquitquit`.
pub fn admin_handler(
    ctx: Arc<Context>,
    config: Arc<crate::config::Config>,
    log: Option<LogControl>,
    quit: CancellationToken,
) -> Handler {
    Arc::new(move |req| match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => {
            let state = ctx.store.snapshot();
            let mut pods: Vec<String> = ctx
                .pods_by_ip
                .load()
                .values()
                .map(|p| p.workload.uid.clone())
                .collect();
            pods.sort();
            pods.dedup();
            let dump = ConfigDump {
                node: &config.node_name,
                config: &config,
                pods,
                state: &state,
                certificates: ctx.certs.summaries(),
                connections: ctx
                    .live
                    .snapshot()
                    .into_iter()
                    .map(|c| ConnectionDump {
                        age_ms: c.started.elapsed().as_millis(),
                        bytes_to_server: c.bytes.a_to_b(),
                        bytes_to_client: c.bytes.b_to_a(),
                        conn: c,
                    })
                    .collect(),
            };
            match serde_json::to_string_pretty(&dump) {
                Ok(json) => {
                    let mut r = text(StatusCode::OK, json);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        (_, "/logging") => {
            let query = req.uri().query().unwrap_or("");
            let filter = query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                matches!(k, "level" | "filter").then(|| v.replace("%2C", ",").replace("%3D", "="))
            });
            match (filter, &log) {
                (Some(f), Some(set)) => match set(&f) {
                    Ok(()) => text(StatusCode::OK, format!("log filter is now {f}\n")),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("bad filter {f:?}: {e}\n")),
                },
                (None, _) => text(
                    StatusCode::BAD_REQUEST,
                    "give ?level=<trace|debug|info|warn|error> or ?filter=<RUST_LOG syntax>\n",
                ),
                (_, None) => text(
                    StatusCode::NOT_IMPLEMENTED,
                    "log filter is fixed in this process\n",
                ),
            }
        }
        (&Method::POST, "/quitquitquit") => {
            quit.cancel();
            text(StatusCode::OK, "draining\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /config_dump, /logging?level=, POST /quitquitquit\n",
        ),
    })
}
