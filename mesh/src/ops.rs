//! Plumbing both proxies share around the data path: configuration from environment variables
//! ([`Env`]), the CA client and certificate manager from a [`CaConfig`], the operator's plain
//! HTTP ports ([`bind`], [`serve`] within [`OperatorLimits`], [`metrics_handler`],
//! [`admin_handler`]) and the one-line error report of the binaries ([`one_line`]).

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
    /// The value of `key`; `None` when unset or empty. A value that is not UTF-8 is an error
    /// naming the variable, never taken for unset.
    fn get(&self, key: &'static str) -> Result<Option<String>, ConfigError>;
}

/// The process environment (empty values count as unset).
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &'static str) -> Result<Option<String>, ConfigError> {
        decode(key, std::env::var_os(key))
    }
}

impl Env for HashMap<&str, String> {
    fn get(&self, key: &'static str) -> Result<Option<String>, ConfigError> {
        Ok(HashMap::get(self, key).filter(|v| !v.is_empty()).cloned())
    }
}

/// Raw values, as the process environment holds them (tests of non-UTF-8 values).
impl Env for HashMap<&str, std::ffi::OsString> {
    fn get(&self, key: &'static str) -> Result<Option<String>, ConfigError> {
        decode(key, HashMap::get(self, key).cloned())
    }
}

/// An environment value as text: empty is unset, non-UTF-8 an error.
fn decode(
    var: &'static str,
    value: Option<std::ffi::OsString>,
) -> Result<Option<String>, ConfigError> {
    match value.map(std::ffi::OsString::into_string) {
        None => Ok(None),
        Some(Ok(v)) => Ok(Some(v).filter(|v| !v.is_empty())),
        Some(Err(raw)) => Err(ConfigError::Invalid {
            var,
            value: raw.to_string_lossy().into_owned(),
            why: "not valid UTF-8 (shown with U+FFFD for the bad bytes); check how the \
                  variable is set"
                .into(),
        }),
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
    env.get(var)?.ok_or(ConfigError::Missing { var, hint })
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
    let value = env.get(var)?.unwrap_or_else(|| default.to_owned());
    value.parse().map_err(|e: T::Err| ConfigError::Invalid {
        var,
        value: value.clone(),
        why: e.to_string(),
    })
}

/// A number from `var` (`default` when unset) that must lie in `range`; out of range is an
/// error naming the variable, the value and the range, never a silent fallback.
pub fn parse_in_range<T>(
    env: &dyn Env,
    var: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
    unit: &str,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
    T::Err: std::fmt::Display,
{
    let value: T = parse(env, var, &default.to_string())?;
    if !range.contains(&value) {
        return Err(ConfigError::Invalid {
            var,
            value: value.to_string(),
            why: format!(
                "out of range: must be {} to {}{unit}",
                range.start(),
                range.end()
            ),
        });
    }
    Ok(value)
}

/// The most runtime worker threads a proxy accepts. A worker per core is what pays; far more
/// only contend, and a typo (`100000`) would otherwise exhaust the system's thread limit at
/// start. 64 covers the largest nodes a single ztunnel or waypoint replica should use.
pub const MAX_WORKER_THREADS: usize = 64;

/// A thread count from `var`: 1 to [`MAX_WORKER_THREADS`], `default` when unset.
pub fn worker_threads(
    env: &dyn Env,
    var: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    parse_in_range(env, var, default, 1..=MAX_WORKER_THREADS, "")
}

/// The shortest workload certificate lifetime a proxy asks for: renewal starts at half of it.
pub const MIN_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(60);

/// A workload certificate lifetime in seconds from `var` (default 24 h): from
/// [`MIN_WORKLOAD_CERT_TTL`] to Istio's maximum of 90 days (the CA may cap it lower with
/// `MESH_CA_MAX_TTL_SECONDS`, and then refuses longer requests with that maximum named).
pub fn workload_cert_ttl(env: &dyn Env, var: &'static str) -> Result<Duration, ConfigError> {
    use crate::ca::authority::{DEFAULT_MAX_WORKLOAD_TTL, DEFAULT_WORKLOAD_TTL};
    parse_in_range(
        env,
        var,
        DEFAULT_WORKLOAD_TTL.as_secs(),
        MIN_WORKLOAD_CERT_TTL.as_secs()..=DEFAULT_MAX_WORKLOAD_TTL.as_secs(),
        " seconds (1 minute to 90 days)",
    )
    .map(Duration::from_secs)
}

/// `true`: the admin port may listen on a non-loopback address.
pub const ADMIN_ALLOW_REMOTE: &str = "ADMIN_ALLOW_REMOTE";

/// The admin address from `var`. The admin port serves `/config_dump` (the whole mesh state),
/// changes the log level and stops the proxy, with no authentication, so an address other
/// hosts can reach is refused unless [`ADMIN_ALLOW_REMOTE`] is `true`.
pub fn admin_addr(
    env: &dyn Env,
    var: &'static str,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = parse(env, var, default)?;
    let allow_remote: bool = parse(env, ADMIN_ALLOW_REMOTE, "false")?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(ConfigError::Invalid {
            var,
            value: addr.to_string(),
            why: format!(
                "refusing a non-loopback admin address: any host that reaches it could read \
                 /config_dump, change the log level and stop the proxy; listen on 127.0.0.1 \
                 (use `kubectl port-forward`), or set {ADMIN_ALLOW_REMOTE}=true if a network \
                 policy guards the port"
            ),
        });
    }
    Ok(addr)
}

/// `OPERATOR_MAX_CONNECTIONS`: open connections each operator port (admin, metrics, readiness)
/// serves at once; more are closed at once and counted.
pub const OPERATOR_MAX_CONNECTIONS: &str = "OPERATOR_MAX_CONNECTIONS";

/// Bounds on an operator port's connections, so idle or slow clients cannot hold the process'
/// file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OperatorLimits {
    /// Open connections per port; a connection beyond it is closed at once and counted in
    /// `mesh_connections_rejected_total{listener}`.
    pub max_connections: usize,
    /// A complete request head must arrive within this of the connection opening or of the
    /// previous response (hyper's header read timeout, which also bounds a kept-alive
    /// connection's idleness).
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves for this long (a client that does not read its
    /// response) is closed.
    pub idle_timeout: Duration,
}

impl Default for OperatorLimits {
    fn default() -> Self {
        Self {
            max_connections: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

impl OperatorLimits {
    /// [`OPERATOR_MAX_CONNECTIONS`] (1 to 10,000; default 100); the timeouts are fixed.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let default = Self::default();
        Ok(Self {
            max_connections: parse_in_range(
                env,
                OPERATOR_MAX_CONNECTIONS,
                default.max_connections,
                1..=10_000,
                " connections per operator port",
            )?,
            ..default
        })
    }
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
        .get(CLUSTER_ID)?
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
            server_name: env.get(CA_SERVER_NAME)?,
            token_file: env.get(CA_TOKEN_FILE)?.map(PathBuf::from),
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

/// The process' log filter, read and changed at run time (`GET /logging` shows it,
/// `POST /logging?level=debug` or `?filter=mesh=debug,info` changes it).
pub trait LogFilter: Send + Sync {
    /// The filter in force, in RUST_LOG syntax.
    fn current(&self) -> String;
    /// Replaces the filter (RUST_LOG syntax); an invalid one is refused with the reason.
    fn set(&self, filter: &str) -> Result<(), String>;
}

/// A handle on the process' [`LogFilter`].
pub type LogControl = Arc<dyn LogFilter>;

/// The filter of [`init_logging`]'s subscriber.
struct ReloadableFilter(
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
);

impl LogFilter for ReloadableFilter {
    fn current(&self) -> String {
        self.0
            .with_current(|f| f.to_string())
            .unwrap_or_else(|e| format!("(unknown: {e})"))
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// Log lines queued for the writer thread before logging waits for it (see [`init_logging`]).
pub const LOG_QUEUE_LINES: usize = 8192;

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
/// The queue holds [`LOG_QUEUE_LINES`] lines: its slots are allocated and touched up front, so
/// tracing-appender's default of 128,000 was 4 MiB of every idle proxy's RSS (heaptrack, `cargo
/// bench -p mesh-tests --bench vcluster`); 8,192 lines are over half a second of access log at
/// the benchmark's request rate, for a writer thread that only copies them to stdout.
pub fn init_logging(filter: &str) -> anyhow::Result<Logging> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, reload};
    let (filter, handle) = reload::Layer::new(EnvFilter::try_new(filter)?);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
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
        control: Arc::new(ReloadableFilter(handle)),
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

/// Serves `handler` over HTTP/1.1 on `listener` until `stop`, within `limits`: at most
/// `max_connections` open at once (one more is closed at once and counted), each closed when it
/// sends no request head in time or stops moving bytes. `name` (`admin`, `metrics`,
/// `readiness`) labels the metrics and log lines. Accept errors back off ([`crate::accept`]).
pub fn serve(
    name: &'static str,
    listener: TcpListener,
    limits: OperatorLimits,
    stop: CancellationToken,
    handler: Handler,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut acceptor = crate::accept::Acceptor::new(listener, name);
    let mut full_log = crate::accept::LogLimiter::new(crate::accept::LOG_INTERVAL);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = acceptor.accept() => accepted,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                crate::accept::count_rejected(name);
                if let Some(suppressed) = full_log.allow(std::time::Instant::now()) {
                    tracing::warn!(
                        listener = name,
                        %peer,
                        max = limits.max_connections,
                        suppressed,
                        "operator port has its maximum of open connections: closed the new one \
                         (who holds them? {OPERATOR_MAX_CONNECTIONS} raises the cap)"
                    );
                }
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req)) }
                });
                let io = IdleTimeout::new(stream, limits.idle_timeout);
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .serve_connection(TokioIo::new(io), service)
                    .await;
            });
        }
    });
}

/// A stream that fails with `TimedOut` when a read or write has waited `idle` without any
/// byte moving, so a peer that neither sends nor reads cannot hold its connection.
struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Passes `polled` on, pushing the deadline back when it made progress and turning a wait
    /// past the deadline into `TimedOut`.
    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        use std::task::Poll;
        match polled {
            Poll::Ready(r) => {
                let next = tokio::time::Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no byte moved for {:?}", self.idle),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleTimeout<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        this.check(cx, polled)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, polled)
    }
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
/// `GET /logging` (the log filter), `POST /logging?level=` (changes it through `log`),
/// `POST /quitquitquit` (cancels `quit`: the drain starts). Changes take POST, so a link or a
/// GET from a browser page cannot make them.
pub fn admin_handler(
    config_dump: impl Fn() -> Response<Full<Bytes>> + Send + Sync + 'static,
    log: Option<LogControl>,
    quit: CancellationToken,
) -> Handler {
    Arc::new(move |req| {
        admin_route(
            req.method(),
            req.uri().path(),
            req.uri().query(),
            &config_dump,
            log.as_ref(),
            &quit,
        )
    })
}

const ADMIN_ENDPOINTS: &str =
    "endpoints: GET /config_dump, GET /logging, POST /logging?level=, POST /quitquitquit\n";

/// [`admin_handler`]'s routing, apart from the request type.
fn admin_route(
    method: &http::Method,
    path: &str,
    query: Option<&str>,
    config_dump: &dyn Fn() -> Response<Full<Bytes>>,
    log: Option<&LogControl>,
    quit: &CancellationToken,
) -> Response<Full<Bytes>> {
    use http::Method;
    let not_allowed = |allow: &'static str, why: &str| {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, format!("{why}\n"));
        r.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
        r
    };
    match (method, path) {
        (&Method::GET, "/config_dump") => config_dump(),
        (&Method::GET | &Method::HEAD, "/logging") if query.is_none_or(str::is_empty) => {
            match log {
                Some(log) => text(
                    StatusCode::OK,
                    format!(
                        "log filter: {}\nchange it with POST /logging?level=<trace|debug|info|warn|error> \
                         or ?filter=<RUST_LOG syntax>\n",
                        log.current()
                    ),
                ),
                None => text(StatusCode::OK, "log filter is fixed in this process\n"),
            }
        }
        (&Method::POST, "/logging") => logging(query, log),
        (_, "/logging") => not_allowed(
            "GET, POST",
            "the log filter is changed with POST /logging?level=... (GET /logging only shows it); \
             nothing was changed",
        ),
        (&Method::POST, "/quitquitquit") => {
            quit.cancel();
            text(StatusCode::OK, "draining\n")
        }
        (_, "/quitquitquit") => not_allowed("POST", "stopping takes POST /quitquitquit"),
        _ => text(StatusCode::NOT_FOUND, ADMIN_ENDPOINTS),
    }
}

/// `POST /logging?level=` or `?filter=`: changes the log filter through `log`.
fn logging(query: Option<&str>, log: Option<&LogControl>) -> Response<Full<Bytes>> {
    let filter = query.unwrap_or("").split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        matches!(k, "level" | "filter").then(|| v.replace("%2C", ",").replace("%3D", "="))
    });
    match (filter, log) {
        (Some(f), Some(log)) => match log.set(&f) {
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

#[cfg(test)]
mod tests;

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
