//! Plumbing both proxies share around the data path: configuration from environment variables
//! ([`Env`]), the CA client and certificate manager from a [`CaConfig`], the operator's plain
//! HTTP ports ([`bind`], [`serve`], [`metrics_handler`], [`logging`]) and the one-line error
//! report of the binaries ([`one_line`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ca::{CaClientConfig, GrpcCaClient, TokenSource};
use crate::cert_manager::{CertManager, CertManagerConfig};

/// Where variables come from: the process environment, or a map in tests.
pub trait Env {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment (empty values count as unset).
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl Env for HashMap<&str, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: required but not set ({hint})")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var}={value:?}: {why}")]
    Invalid {
        var: &'static str,
        value: String,
        why: String,
    },
}

/// A variable that must be set; `hint` says what it should hold.
pub fn required(
    env: &dyn Env,
    var: &'static str,
    hint: &'static str,
) -> Result<String, ConfigError> {
    env.get(var).ok_or(ConfigError::Missing { var, hint })
}

/// A variable parsed as `T`, `default` when unset.
pub fn parse<T: std::str::FromStr>(
    env: &dyn Env,
    var: &'static str,
    default: &str,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    let value = env.get(var).unwrap_or_else(|| default.to_owned());
    value.parse().map_err(|e: T::Err| ConfigError::Invalid {
        var,
        value: value.clone(),
        why: e.to_string(),
    })
}

/// A positive thread count from `var`.
pub fn worker_threads(
    env: &dyn Env,
    var: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    let n: usize = parse(env, var, &default.to_string())?;
    if n == 0 {
        return Err(ConfigError::Invalid {
            var,
            value: "0".into(),
            why: "must be at least 1".into(),
        });
    }
    Ok(n)
}

pub const CA_ADDRESS: &str = "CA_ADDRESS";
pub const CA_ROOT_CERT: &str = "CA_ROOT_CERT";
pub const CA_SERVER_NAME: &str = "CA_SERVER_NAME";
pub const CA_TOKEN_FILE: &str = "CA_TOKEN_FILE";
/// Deadline of one certificate request to the CA, connecting included (milliseconds).
pub const CA_REQUEST_TIMEOUT: &str = "CA_REQUEST_TIMEOUT_MS";
pub const DEFAULT_CA_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster this proxy runs in, as Istio names it (`CLUSTER_ID`, default `Kubernetes`): sent
/// as `k8s.cluster.name` in HBONE `baggage` and used for the `source_cluster` and
/// `destination_cluster` metric labels of workloads in this cluster.
pub const CLUSTER_ID: &str = "CLUSTER_ID";
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// [`CLUSTER_ID`]: a name that fits in a `baggage` value (visible ASCII without `,;=\"`).
pub fn cluster_id(env: &dyn Env) -> Result<String, ConfigError> {
    let value = env
        .get(CLUSTER_ID)
        .unwrap_or_else(|| DEFAULT_CLUSTER_ID.to_owned());
    let bad = value
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, ',' | ';' | '=' | '"' | '\\'));
    match bad {
        Some(c) => Err(ConfigError::Invalid {
            var: CLUSTER_ID,
            value: value.clone(),
            why: format!(
                "{c:?} is not allowed: the cluster name travels in the HBONE `baggage` header \
                 (use letters, digits, `-`, `_`, `.`; Istio's default is {DEFAULT_CLUSTER_ID:?})"
            ),
        }),
        None => Ok(value),
    }
}

/// Where workload certificates come from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaConfig {
    pub address: String,
    pub root_cert: PathBuf,
    pub server_name: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Deadline of one certificate request, connecting and the TLS handshake included.
    pub request_timeout: Duration,
}

impl CaConfig {
    /// `CA_ADDRESS`, `CA_ROOT_CERT` (required), `CA_SERVER_NAME`, `CA_TOKEN_FILE`,
    /// `CA_REQUEST_TIMEOUT_MS`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let timeout_ms: u64 = parse(
            env,
            CA_REQUEST_TIMEOUT,
            &DEFAULT_CA_REQUEST_TIMEOUT.as_millis().to_string(),
        )?;
        if timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                var: CA_REQUEST_TIMEOUT,
                value: "0".into(),
                why: "must be at least 1 (milliseconds)".into(),
            });
        }
        Ok(CaConfig {
            address: required(env, CA_ADDRESS, "host:port of the CA, e.g. 127.0.0.1:15012")?,
            root_cert: required(env, CA_ROOT_CERT, "PEM root the CA's certificate chains to")?
                .into(),
            server_name: env.get(CA_SERVER_NAME),
            token_file: env.get(CA_TOKEN_FILE).map(PathBuf::from),
            request_timeout: Duration::from_millis(timeout_ms),
        })
    }

    /// A certificate manager fetching from this CA. `impersonate`: the caller asks for other
    /// identities than its own (ztunnel for its pods), sent as `ImpersonatedIdentity`.
    pub fn cert_manager(
        &self,
        impersonate: bool,
        ttl: Duration,
        registry: &mut Registry,
    ) -> anyhow::Result<CertManager> {
        use anyhow::Context as _;
        let root = std::fs::read_to_string(&self.root_cert)
            .with_context(|| format!("reading CA root {}", self.root_cert.display()))?;
        let signer = GrpcCaClient::new(CaClientConfig {
            address: self.address.clone(),
            root_cert_pem: root,
            server_name: self.server_name.clone(),
            token: self
                .token_file
                .clone()
                .map_or(TokenSource::None, TokenSource::File),
            impersonate,
            timeout: self.request_timeout,
        })?;
        Ok(CertManager::new(
            Arc::new(signer),
            CertManagerConfig {
                ttl,
                ..CertManagerConfig::default()
            },
            registry,
        ))
    }
}

/// Changes the log filter at run time (`/logging?level=debug` or `?filter=mesh=debug,info`).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The process' logging: the control `/logging` uses to change the filter at run time, and the
/// guard that flushes buffered lines when dropped (keep it until the process ends).
#[allow(missing_debug_implementations)]
pub struct Logging {
    pub control: LogControl,
    pub guard: tracing_appender::non_blocking::WorkerGuard,
}

/// Installs the process' log output (stdout, ANSI colours only on a terminal) with `filter`
/// (RUST_LOG syntax). Lines are handed to a writer thread instead of being written on the
/// proxy's worker threads: with one access-log line per request, a `write(2)` each on the data
/// path cost about 10% of the waypoint's CPU in the benchmark. The queue is not lossy: when the
/// writer falls behind, logging waits rather than dropping lines an operator needs.
pub fn init_logging(filter: &str) -> anyhow::Result<Logging> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, reload};
    let (filter, handle) = reload::Layer::new(EnvFilter::try_new(filter)?);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stdout());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(writer),
        )
        .init();
    Ok(Logging {
        control: Arc::new(move |f: &str| {
            let filter = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }),
        guard,
    })
}

/// A plain HTTP handler of an operator port.
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Binds `addr`, naming the role in the error.
pub async fn bind(role: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{role} listener on {addr}: {e} (is another proxy running?)"))
}

/// Serves `handler` over HTTP/1.1 on `listener` until `stop`.
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

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r
}

/// A JSON response of `value`.
pub fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
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

/// The admin port both proxies serve: `GET /config_dump` (what `config_dump` answers),
/// `/logging?level=` (through `log`), `POST /quitquitquit` (cancels `quit`: the drain starts).
pub fn admin_handler(
    config_dump: impl Fn() -> Response<Full<Bytes>> + Send + Sync + 'static,
    log: Option<LogControl>,
    quit: CancellationToken,
) -> Handler {
    Arc::new(move |req| match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/config_dump") => config_dump(),
        (_, "/logging") => logging(req.uri().query(), log.as_ref()),
        (&http::Method::POST, "/quitquitquit") => {
            quit.cancel();
            text(StatusCode::OK, "draining\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /config_dump, /logging?level=, POST /quitquitquit\n",
        ),
    })
}

/// `/logging?level=` or `?filter=`: changes the log filter through `log`.
pub fn logging(query: Option<&str>, log: Option<&LogControl>) -> Response<Full<Bytes>> {
    let filter = query.unwrap_or("").split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        matches!(k, "level" | "filter").then(|| v.replace("%2C", ",").replace("%3D", "="))
    });
    match (filter, log) {
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

/// An error and its causes on one line, skipping a cause its parent already quotes: what the
/// binaries print for an operator's mistake, without backtrace noise.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Operator views (`ztunnel config`, `waypoint config`): fetching a proxy's `/config_dump` and
/// printing tables, JSON or YAML.
pub mod view {
    use std::fmt::Write as _;
    use std::net::SocketAddr;
    use std::time::Duration;

    use serde_json::Value;

    /// How to print a view.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
    pub enum Output {
        Table,
        Json,
        Yaml,
    }

    #[derive(Debug, thiserror::Error)]
    pub enum ViewError {
        #[error(
            "cannot reach {proxy}'s admin port at {addr}: {source} (is {proxy} running, and is \
             --admin its ADMIN_ADDR?)"
        )]
        Unreachable {
            proxy: &'static str,
            addr: SocketAddr,
            source: std::io::Error,
        },
        #[error("{addr} did not answer within {after:?}")]
        Timeout { addr: SocketAddr, after: Duration },
        #[error("{addr} is not a {proxy} admin port: {why}")]
        NotThisProxy {
            proxy: &'static str,
            addr: SocketAddr,
            why: String,
        },
        #[error("formatting: {0}")]
        Format(String),
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// Fetches `/config_dump` from `proxy`'s admin port at `addr`; the dump must have every key
    /// of `required` (so another program on that port is reported as such).
    pub async fn fetch(
        proxy: &'static str,
        addr: SocketAddr,
        required: &[&str],
    ) -> Result<Value, ViewError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let unreachable = |source| ViewError::Unreachable {
            proxy,
            addr,
            source,
        };
        let request = async {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(unreachable)?;
            s.write_all(b"GET /config_dump HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                .await
                .map_err(unreachable)?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.map_err(unreachable)?;
            Ok::<_, ViewError>(raw)
        };
        let raw =
            tokio::time::timeout(TIMEOUT, request)
                .await
                .map_err(|_| ViewError::Timeout {
                    addr,
                    after: TIMEOUT,
                })??;
        let text = String::from_utf8_lossy(&raw);
        let not = |why: &str| ViewError::NotThisProxy {
            proxy,
            addr,
            why: why.to_owned(),
        };
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| not("the answer is not HTTP"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(not(head.lines().next().unwrap_or("no status line")));
        }
        let dump: Value =
            serde_json::from_str(body).map_err(|_| not("/config_dump is not JSON"))?;
        if let Some(missing) = required.iter().find(|k| dump.get(**k).is_none()) {
            return Err(not(&format!("/config_dump lacks `{missing}`")));
        }
        Ok(dump)
    }

    /// `value` as pretty JSON or YAML.
    pub fn serialize(value: &Value, output: Output) -> Result<String, ViewError> {
        match output {
            Output::Yaml => {
                serde_yaml::to_string(value).map_err(|e| ViewError::Format(e.to_string()))
            }
            _ => serde_json::to_string_pretty(value)
                .map(|s| s + "\n")
                .map_err(|e| ViewError::Format(e.to_string())),
        }
    }

    /// A JSON value as a cell: strings bare, null as `-`.
    pub fn cell(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        }
    }

    /// A JSON array as a comma-separated cell, `-` when empty.
    pub fn list(v: &Value) -> String {
        match v.as_array() {
            Some(items) if !items.is_empty() => {
                items.iter().map(cell).collect::<Vec<_>>().join(",")
            }
            _ => "-".into(),
        }
    }

    /// Left-aligned columns separated by two spaces, with a title and a header.
    pub fn table(out: &mut String, title: &str, header: &[&str], rows: Vec<Vec<String>>) {
        let _ = writeln!(out, "{title}");
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<String>| {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(cell);
                } else {
                    let _ = write!(l, "{cell:<w$}  ");
                }
            }
            l.trim_end().to_owned()
        };
        let _ = writeln!(
            out,
            "{}",
            line(header.iter().map(|h| h.to_string()).collect())
        );
        if rows.is_empty() {
            let _ = writeln!(out, "(none)");
        }
        for row in rows {
            let _ = writeln!(out, "{}", line(row));
        }
        out.push('\n');
    }

    /// Unix seconds as RFC 3339 (UTC), `-` when absent.
    pub fn timestamp(v: &Value) -> String {
        v.as_i64()
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "-".into())
    }

    /// Unix seconds as RFC 3339 and how far from `now` (`(in 12s)`, `(5s ago)`).
    fn moment(v: &Value, now: i64) -> String {
        match v.as_i64() {
            Some(t) if t >= now => format!("{} (in {}s)", timestamp(v), t - now),
            Some(t) => format!("{} ({}s ago)", timestamp(v), now - t),
            None => "-".into(),
        }
    }

    /// The `certificates` of a config dump (`CertSummary`s) as a table: state, validity, when
    /// the next fetch (retry or renewal) starts and why the last one failed.
    pub fn certificates(dump: &Value, out: &mut String) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let rows = dump["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let error = match &c["last_error"] {
                    Value::Null => "-".to_owned(),
                    e => format!("{} ({})", cell(e), moment(&c["last_error_at"], now)),
                };
                vec![
                    cell(&c["identity"]),
                    cell(&c["state"]),
                    cell(&c["serial"]),
                    timestamp(&c["not_before"]),
                    timestamp(&c["not_after"]),
                    moment(&c["next_attempt"], now),
                    error,
                ]
            })
            .collect();
        table(
            out,
            "CERTIFICATES",
            &[
                "IDENTITY",
                "STATE",
                "SERIAL",
                "NOT BEFORE",
                "NOT AFTER",
                "NEXT ATTEMPT",
                "LAST ERROR",
            ],
            rows,
        );
    }
}
