//! HTTP in the virtual cluster: a sample backend that reports its version (the Istio tasks'
//! `reviews` v1/v2/v3 in spirit) and whose behaviour a test can change live, and an HTTP/1.1 or
//! HTTP/2 client that connects from inside a pod as an unmodified application would.

use std::sync::atomic::AtomicU64;

use ::http::{HeaderMap, Request, Response, StatusCode};
use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::*;

/// What a backend does; shared with the test, which may change it while traffic flows.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Answer this status instead of 200 (0 = 200).
    pub status: AtomicU32,
    /// Answer 503 to this many requests first (a flaky backend), counting down.
    pub fail_next: AtomicU32,
    /// Wait this long before answering, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Every request received, in order (method, path, headers), for tests that check what
    /// the backend saw (or never saw).
    pub received: Mutex<Vec<Received>>,
}

/// One request as a backend received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The authority: the URI's (HTTP/2 `:authority`), else the `Host` header.
    pub authority: Option<String>,
    pub headers: HeaderMap,
}

/// A running backend.
#[derive(Debug)]
pub struct Backend {
    pub behaviour: Arc<Behaviour>,
    _server: AppServer,
}

impl Backend {
    pub fn requests(&self) -> u64 {
        self.behaviour.requests.load(Ordering::Relaxed)
    }

    /// The requests received so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.behaviour.received).clone()
    }
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `port` in `pod`. Every answer carries
/// `x-version: <version>` and `x-pod: <pod>`, and a body `version=<v> pod=<p> method=<m>
/// path=<path> peer=<ip:port>` followed by the request headers, one `name: value` per line.
/// `?delay_ms=N` delays one answer; `?status=N` answers N. gRPC requests (`content-type:
/// application/grpc`) are echoed with trailers `grpc-status: 0` (or `?grpc_status` as a header
/// `x-grpc-status`). A request with `upgrade` gets `101` and an echo of the upgraded bytes.
pub async fn serve_backend(pod: &Pod, port: u16, version: &str) -> io::Result<Backend> {
    let behaviour = Arc::new(Behaviour::default());
    let shared = behaviour.clone();
    let version = version.to_owned();
    let name = pod.name().to_owned();
    let server = pod
        .serve(port, move |stream, peer| {
            let behaviour = shared.clone();
            let version = version.clone();
            let name = name.clone();
            async move {
                let service = hyper::service::service_fn(move |req| {
                    answer(behaviour.clone(), version.clone(), name.clone(), peer, req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            }
        })
        .await?;
    Ok(Backend {
        behaviour,
        _server: server,
    })
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn answer(
    behaviour: Arc<Behaviour>,
    version: String,
    pod: String,
    peer: SocketAddr,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<BoxBody>, std::convert::Infallible> {
    behaviour.requests.fetch_add(1, Ordering::Relaxed);
    lock(&behaviour.received).push(Received {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        authority: req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(::http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            }),
        headers: req.headers().clone(),
    });
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let delay = query
        .get("delay_ms")
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| behaviour.delay_ms.load(Ordering::Relaxed));
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut status = match behaviour.status.load(Ordering::Relaxed) {
        0 => 200,
        s => s as u16,
    };
    if behaviour
        .fail_next
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
    {
        status = 503;
    }
    if let Some(s) = query.get("status").and_then(|s| s.parse().ok()) {
        status = s;
    }
    let mut builder = Response::builder()
        .header("x-version", &version)
        .header("x-pod", &pod);

    if req.headers().contains_key(::http::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let response = builder
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(::http::header::CONNECTION, "upgrade")
            .header(::http::header::UPGRADE, "echo")
            .body(full(Bytes::new()));
        return Ok(response.unwrap_or_else(|_| Response::new(full(Bytes::new()))));
    }

    let grpc = req
        .headers()
        .get(::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let mut text = format!(
        "version={version} pod={pod} method={} path={} peer={peer}\n",
        req.method(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    for (name, value) in req.headers() {
        let _ = writeln!(text, "{name}: {}", value.to_str().unwrap_or("?"));
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let Ok(body) = body else {
        return Ok(Response::new(full(Bytes::new())));
    };
    if grpc {
        let grpc_status = query
            .get("grpc_status")
            .cloned()
            .unwrap_or_else(|| "0".into());
        let mut trailers = HeaderMap::new();
        if let Ok(v) = grpc_status.parse() {
            trailers.insert("grpc-status", v);
        }
        let frames = futures::stream::iter(vec![
            Ok::<_, hyper::Error>(hyper::body::Frame::data(body)),
            Ok(hyper::body::Frame::trailers(trailers)),
        ]);
        let response = builder
            .status(200)
            .header(::http::header::CONTENT_TYPE, "application/grpc")
            .body(http_body_util::StreamBody::new(frames).boxed());
        return Ok(response.unwrap_or_else(|_| Response::new(full(Bytes::new()))));
    }
    builder = builder.status(status);
    let response = builder.body(full(text));
    Ok(response.unwrap_or_else(|_| Response::new(full(Bytes::new()))))
}

/// One answer as a client saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    pub elapsed: Duration,
}

impl Answer {
    /// The `x-version` the backend reported (`""` when the answer came from a proxy).
    pub fn version(&self) -> &str {
        self.headers
            .get("x-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// HTTP version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    /// HTTP/2 with prior knowledge (cleartext).
    Http2,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A keep-alive connection from inside a pod.
pub struct HttpClient {
    sender: Sender,
    authority: String,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Connects from `pod` to `addr` (usually a service VIP:port).
    pub async fn connect(pod: &Pod, addr: SocketAddr, version: HttpVersion) -> io::Result<Self> {
        let stream = pod.connect(addr).await?;
        Self::on(stream, addr.to_string(), version).await
    }

    /// Speaks HTTP over an established stream; `authority` is sent as Host / `:authority`.
    pub async fn on<S>(stream: S, authority: String, version: HttpVersion) -> io::Result<Self>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(stream);
        let sender = match version {
            HttpVersion::Http1 => {
                let (sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(io::Error::other)?;
                tokio::spawn(conn.with_upgrades());
                Sender::H1(sender)
            }
            HttpVersion::Http2 => {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(io::Error::other)?;
                tokio::spawn(conn);
                Sender::H2(sender)
            }
        };
        Ok(Self { sender, authority })
    }

    /// `GET path` with extra headers.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> io::Result<Answer> {
        self.send("GET", path, headers, Bytes::new()).await
    }

    /// Sends one request and reads the whole answer (bounded by [`IO_TIMEOUT`]).
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> io::Result<Answer> {
        self.send_within(IO_TIMEOUT, method, path, headers, body)
            .await
    }

    /// [`Self::send`] with a client-side timeout (`TimedOut` when it passes).
    pub async fn send_within(
        &mut self,
        limit: Duration,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> io::Result<Answer> {
        let start = Instant::now();
        let uri = match self.sender {
            Sender::H1(_) => path.to_owned(),
            Sender::H2(_) => format!("http://{}{path}", self.authority),
        };
        let mut builder = Request::builder().method(method).uri(uri);
        if matches!(self.sender, Sender::H1(_)) {
            builder = builder.header(::http::header::HOST, &self.authority);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body)).map_err(io::Error::other)?;
        let exchange = async {
            let response = match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.map_err(io::Error::other)?;
                    s.send_request(request).await
                }
                Sender::H2(s) => {
                    s.ready().await.map_err(io::Error::other)?;
                    s.send_request(request).await
                }
            }
            .map_err(io::Error::other)?;
            let (parts, body) = response.into_parts();
            let collected = body.collect().await.map_err(io::Error::other)?;
            let trailers = collected.trailers().cloned();
            Ok::<_, io::Error>(Answer {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
                elapsed: start.elapsed(),
            })
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{method} {path}")))?
    }
}

/// A gRPC-style unary call body: one length-prefixed message.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// Reads the first message of a gRPC body.
pub fn grpc_unframe(mut body: Bytes) -> Option<Bytes> {
    if body.len() < 5 {
        return None;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    (body.len() >= len).then(|| body.slice(..len))
}

/// A response head read off a raw connection.
#[derive(Debug, Clone)]
pub struct RawHead {
    pub status: u16,
    /// The status line and headers, as text.
    pub head: String,
    /// Bytes read after the head (the start of the body, or of an upgraded stream).
    pub rest: Vec<u8>,
}

impl RawHead {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads an HTTP/1 response head from `stream` (until the blank line), bounded by `limit`.
/// `UnexpectedEof` when the peer closes first, `TimedOut` when `limit` passes.
pub async fn read_response_head(stream: &mut TcpStream, limit: Duration) -> io::Result<RawHead> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("bad head: {head:?}"))
                    })?;
                return Ok(RawHead {
                    status,
                    head,
                    rest: buf[end + 4..].to_vec(),
                });
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "closed after {} bytes: {:?}",
                        buf.len(),
                        String::from_utf8_lossy(&buf)
                    ),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response head in time"))?
}

/// Sends `bytes` as is from `pod` to `addr` and reads the response head (bounded by
/// [`IO_TIMEOUT`]); for requests no HTTP client library would send.
pub async fn raw_request(pod: &Pod, addr: SocketAddr, bytes: &[u8]) -> io::Result<RawHead> {
    let mut stream = pod.connect(addr).await?;
    stream.write_all(bytes).await?;
    read_response_head(&mut stream, IO_TIMEOUT).await
}
