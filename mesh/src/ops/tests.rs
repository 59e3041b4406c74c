#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::Mutex;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

fn env(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn err(r: Result<impl std::fmt::Debug, ConfigError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn non_utf8_values_are_an_error_naming_the_variable() {
    let mut raw: HashMap<&str, OsString> = HashMap::new();
    raw.insert("GOOD", "text".into());
    raw.insert("EMPTY", "".into());
    raw.insert("BAD", OsString::from_vec(b"ab\xffcd".to_vec()));
    assert_eq!(raw.get("GOOD").unwrap(), "text");
    assert_eq!(Env::get(&raw, "GOOD").unwrap().as_deref(), Some("text"));
    assert_eq!(Env::get(&raw, "EMPTY").unwrap(), None);
    assert_eq!(Env::get(&raw, "UNSET").unwrap(), None);
    let e = Env::get(&raw, "BAD").unwrap_err().to_string();
    assert_eq!(
        e,
        "BAD=\"ab\u{fffd}cd\": not valid UTF-8 (shown with U+FFFD for the bad bytes); check how \
         the variable is set"
    );
    // Through every reader, not taken for unset (which would mean the default).
    assert!(err(parse::<u16>(&raw, "BAD", "1")).starts_with("BAD="));
    assert!(err(required(&raw, "BAD", "x")).starts_with("BAD="));
    assert!(err(worker_threads(&raw, "BAD", 2)).starts_with("BAD="));
}

#[test]
fn worker_threads_have_a_range() {
    const VAR: &str = "X_WORKER_THREADS";
    for (value, expected) in [
        (None, Ok(2)),
        (Some("1"), Ok(1)),
        (Some("64"), Ok(64)),
        (
            Some("0"),
            Err("X_WORKER_THREADS=\"0\": out of range: must be 1 to 64"),
        ),
        (
            Some("65"),
            Err("X_WORKER_THREADS=\"65\": out of range: must be 1 to 64"),
        ),
        (
            Some("100000"),
            Err("X_WORKER_THREADS=\"100000\": out of range: must be 1 to 64"),
        ),
        (
            Some("many"),
            Err("X_WORKER_THREADS=\"many\": invalid digit"),
        ),
    ] {
        let env = env(&value.map(|v| (VAR, v)).into_iter().collect::<Vec<_>>());
        match (worker_threads(&env, VAR, 2), expected) {
            (Ok(n), Ok(want)) => assert_eq!(n, want, "{value:?}"),
            (Err(e), Err(want)) => assert!(e.to_string().starts_with(want), "{e}"),
            (got, want) => panic!("{value:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn workload_cert_ttl_has_a_range() {
    const VAR: &str = "WORKLOAD_CERT_TTL_SECONDS";
    let range = "out of range: must be 60 to 7776000 seconds (1 minute to 90 days)";
    for (value, expected) in [
        (None, Ok(24 * 3600)),
        (Some("60"), Ok(60)),
        (Some("3600"), Ok(3600)),
        (Some("7776000"), Ok(90 * 24 * 3600)),
        // 0 used to mean "the CA's default" without a word; too short or too long is refused.
        (Some("0"), Err(format!("{VAR}=\"0\": {range}"))),
        (Some("59"), Err(format!("{VAR}=\"59\": {range}"))),
        (Some("7776001"), Err(format!("{VAR}=\"7776001\": {range}"))),
        (
            Some("-1"),
            Err(format!("{VAR}=\"-1\": invalid digit found in string")),
        ),
    ] {
        let env = env(&value.map(|v| (VAR, v)).into_iter().collect::<Vec<_>>());
        match (workload_cert_ttl(&env, VAR), expected) {
            (Ok(ttl), Ok(want)) => assert_eq!(ttl, Duration::from_secs(want), "{value:?}"),
            (Err(e), Err(want)) => assert_eq!(e.to_string(), want),
            (got, want) => panic!("{value:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn admin_address_must_be_loopback_unless_allowed() {
    const VAR: &str = "ADMIN_ADDR";
    let default = "127.0.0.1:15000";
    for (addr, allow, expected) in [
        (None, None, Ok("127.0.0.1:15000")),
        (Some("127.0.0.1:15000"), None, Ok("127.0.0.1:15000")),
        (Some("127.0.0.2:0"), None, Ok("127.0.0.2:0")),
        (Some("[::1]:15000"), None, Ok("[::1]:15000")),
        (
            Some("0.0.0.0:15000"),
            None,
            Err("ADMIN_ADDR=\"0.0.0.0:15000\": refusing a non-loopback admin address"),
        ),
        (
            Some("10.0.0.5:15000"),
            Some("false"),
            Err("ADMIN_ADDR=\"10.0.0.5:15000\": refusing a non-loopback admin address"),
        ),
        (
            Some("[::]:15000"),
            None,
            Err("ADMIN_ADDR=\"[::]:15000\": refusing"),
        ),
        (Some("0.0.0.0:15000"), Some("true"), Ok("0.0.0.0:15000")),
        (
            Some("0.0.0.0:15000"),
            Some("yes"),
            Err("ADMIN_ALLOW_REMOTE=\"yes\": provided string was not `true` or `false`"),
        ),
    ] {
        let mut pairs = vec![];
        pairs.extend(addr.map(|a| (VAR, a)));
        pairs.extend(allow.map(|a| (ADMIN_ALLOW_REMOTE, a)));
        match (admin_addr(&env(&pairs), VAR, default), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got.to_string(), want),
            (Err(e), Err(want)) => {
                let e = e.to_string();
                assert!(e.starts_with(want), "{e}");
                if want.contains("refusing") {
                    assert!(
                        e.contains("ADMIN_ALLOW_REMOTE=true"),
                        "names the way out: {e}"
                    );
                }
            }
            (got, want) => panic!("{addr:?} {allow:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn operator_max_connections_has_a_range() {
    assert_eq!(
        OperatorLimits::from_env(&env(&[])).unwrap(),
        OperatorLimits::default()
    );
    let limits = OperatorLimits::from_env(&env(&[(OPERATOR_MAX_CONNECTIONS, "5")])).unwrap();
    assert_eq!(limits.max_connections, 5);
    for bad in ["0", "10001"] {
        let e = err(OperatorLimits::from_env(&env(&[(
            OPERATOR_MAX_CONNECTIONS,
            bad,
        )])));
        assert_eq!(
            e,
            format!(
                "OPERATOR_MAX_CONNECTIONS=\"{bad}\": out of range: must be 1 to 10000 \
                 connections per operator port"
            )
        );
    }
}

/// A [`LogFilter`] that remembers what it was set to.
struct FakeFilter(Mutex<String>);

impl LogFilter for FakeFilter {
    fn current(&self) -> String {
        self.0.lock().unwrap().clone()
    }
    fn set(&self, filter: &str) -> Result<(), String> {
        if filter.contains('[') {
            return Err("bad directive".into());
        }
        *self.0.lock().unwrap() = filter.to_owned();
        Ok(())
    }
}

fn body(r: Response<Full<Bytes>>) -> (StatusCode, String) {
    use http_body_util::BodyExt as _;
    let status = r.status();
    use futures::FutureExt as _;
    // A `Full` body is ready at once.
    let bytes = r
        .into_body()
        .collect()
        .now_or_never()
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[test]
fn admin_changes_take_post() {
    use http::Method;
    let filter = Arc::new(FakeFilter(Mutex::new("info".into())));
    let log: LogControl = filter.clone();
    let quit = CancellationToken::new();
    let dump = || text(StatusCode::OK, "{}");
    let route = |method: Method, path: &str, query: Option<&str>| {
        body(admin_route(&method, path, query, &dump, Some(&log), &quit))
    };
    // (method, path, query, status, body contains, filter afterwards)
    let cases = [
        (
            Method::GET,
            "/logging",
            None,
            200,
            "log filter: info",
            "info",
        ),
        // A GET (a link, a browser page, a careless curl) changes nothing.
        (
            Method::GET,
            "/logging",
            Some("level=debug"),
            405,
            "nothing was changed",
            "info",
        ),
        (
            Method::PUT,
            "/logging",
            Some("level=debug"),
            405,
            "POST /logging",
            "info",
        ),
        (
            Method::POST,
            "/logging",
            Some("level=debug"),
            200,
            "log filter is now debug",
            "debug",
        ),
        (
            Method::GET,
            "/logging",
            None,
            200,
            "log filter: debug",
            "debug",
        ),
        (
            Method::POST,
            "/logging",
            Some("filter=mesh%3Dtrace%2Cinfo"),
            200,
            "now mesh=trace,info",
            "mesh=trace,info",
        ),
        (
            Method::POST,
            "/logging",
            Some("level=[x"),
            400,
            "bad filter",
            "mesh=trace,info",
        ),
        (
            Method::POST,
            "/logging",
            None,
            400,
            "give ?level=",
            "mesh=trace,info",
        ),
        (
            Method::GET,
            "/config_dump",
            None,
            200,
            "{}",
            "mesh=trace,info",
        ),
        (
            Method::GET,
            "/nope",
            None,
            404,
            "POST /logging?level=",
            "mesh=trace,info",
        ),
    ];
    for (method, path, query, status, contains, after) in cases {
        let (got, text) = route(method.clone(), path, query);
        assert_eq!(got.as_u16(), status, "{method} {path}?{query:?}: {text}");
        assert!(text.contains(contains), "{method} {path}?{query:?}: {text}");
        assert_eq!(filter.current(), after, "{method} {path}?{query:?}");
    }
    let (status, _) = route(Method::GET, "/quitquitquit", None);
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(!quit.is_cancelled(), "a GET does not stop the proxy");
    let (status, _) = route(Method::POST, "/quitquitquit", None);
    assert_eq!(status, StatusCode::OK);
    assert!(quit.is_cancelled());
    let fixed = admin_route(
        &Method::POST,
        "/logging",
        Some("level=debug"),
        &dump,
        None,
        &quit,
    );
    assert_eq!(fixed.status(), StatusCode::NOT_IMPLEMENTED);
}

/// Serves `/metrics` of a registry with the listener counters, plus `/big` (`big` bytes).
async fn start(name: &'static str, limits: OperatorLimits, big: usize) -> SocketAddr {
    let mut registry = Registry::default();
    crate::accept::register_metrics(&mut registry);
    let metrics = metrics_handler(Arc::new(registry));
    let handler: Handler = Arc::new(move |req| {
        if req.uri().path() == "/big" {
            return text(StatusCode::OK, "x".repeat(big));
        }
        metrics(req)
    });
    let listener = bind(name, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve(name, listener, limits, CancellationToken::new(), handler);
    addr
}

/// One request on `stream` (kept alive): the status and the body.
async fn request(stream: &mut TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: ops\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        if rest.len() >= length {
            let status = head[9..12].parse().unwrap();
            return Ok((status, rest.to_owned()));
        }
    }
}

/// True when the server closed `stream` (EOF or reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

fn rejected(listener: &'static str, metrics: &str) -> u64 {
    let prefix = format!("mesh_connections_rejected_total{{listener=\"{listener}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn idle_operator_connections_time_out() {
    let limits = OperatorLimits {
        max_connections: 10,
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(30),
    };
    let addr = start("test-idle", limits, 0).await;
    let started = Instant::now();
    // Silent from the start; half a request head (slowloris); idle after a request.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut kept = TcpStream::connect(addr).await.unwrap();
    assert_eq!(request(&mut kept, "/metrics").await.unwrap().0, 200);
    for (what, stream) in [
        ("silent", &mut silent),
        ("partial head", &mut partial),
        ("kept alive", &mut kept),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(10)).await,
            "{what} connection still open"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed() {
    let limits = OperatorLimits {
        max_connections: 1,
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_millis(300),
    };
    // Far more than the socket buffers hold, so the server's write waits on the client.
    let addr = start("test-stall", limits, 64 << 20).await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nHost: ops\r\n\r\n")
        .await
        .unwrap();
    // It holds the only slot until the server gives up on it; then a new client is served.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = TcpStream::connect(addr).await.unwrap();
        if let Ok((200, _)) = request(&mut client, "/metrics").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut received = 0;
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(n @ 1..) = stalled.read(&mut buf).await {
        received += n;
    }
    assert!(received < 64 << 20, "the response was cut off");
}

#[tokio::test]
async fn the_connection_cap_holds_and_the_port_recovers() {
    let limits = OperatorLimits {
        max_connections: 3,
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
    };
    let addr = start("test-cap", limits, 0).await;
    // Three clients hold the three slots (each served once, then idle on keep-alive).
    let mut holders = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(request(&mut s, "/metrics").await.unwrap().0, 200);
        holders.push(s);
    }
    // A fourth is closed at once, unserved, and counted.
    let mut excess = TcpStream::connect(addr).await.unwrap();
    let answer = request(&mut excess, "/metrics").await;
    assert!(answer.is_err(), "served over the cap: {answer:?}");
    // The idle holders are closed by the header read timeout, freeing their slots.
    for s in &mut holders {
        assert!(closed_within(s, Duration::from_secs(10)).await);
    }
    // A new client is served, and the rejection is in the metrics.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        match request(&mut s, "/metrics").await {
            Ok((200, body)) => break body,
            other => assert!(Instant::now() < deadline, "not served again: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rejected("test-cap", &metrics), 1, "{metrics}");
}
