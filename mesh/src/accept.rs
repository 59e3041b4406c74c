//! The one accept loop helper every listener uses ([`Acceptor`]), and the process' open-file
//! limit ([`raise_open_file_limit`]).
//!
//! A failed `accept` for want of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) leaves the pending
//! connection in the backlog, so the listener is readable again at once: retried in a loop it
//! pins a CPU and starves every other task. The acceptor backs off exponentially on such errors
//! (reset by the next success), logs at most one warning per [`LOG_INTERVAL`] per listener, and
//! counts every failure in `mesh_accept_errors_total{listener, error}`. Errors that concern one
//! aborted connection (ECONNABORTED and the network errors accept(2) passes on) are retried at
//! once: each consumes the connection it reports.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

/// The first pause after a resource error; it doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(5);
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one accept-error warning per listener in this interval (the rest are counted).
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Something connections are accepted from: a [`TcpListener`], or a fake in tests.
pub trait Listen {
    type Conn;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Conn, SocketAddr)>>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl Listen for TcpListener {
    type Conn = TcpStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        TcpListener::poll_accept(self, cx)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

/// What an accept error means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptErrorKind {
    /// One connection was aborted before it could be accepted: try the next one now.
    Connection,
    /// The process or the system is out of something (file descriptors, buffers, memory):
    /// retrying at once fails again, so wait.
    Resource,
    /// Anything else: also waited on, so an unexpected error cannot make the loop spin.
    Other,
}

/// Sorts an accept error (see accept(2): "ERRORS" and "Linux notes").
pub fn classify(e: &io::Error) -> (AcceptErrorKind, &'static str) {
    let Some(errno) = e.raw_os_error().map(Errno::from_raw) else {
        return (AcceptErrorKind::Other, "other");
    };
    match errno {
        Errno::EMFILE => (AcceptErrorKind::Resource, "EMFILE"),
        Errno::ENFILE => (AcceptErrorKind::Resource, "ENFILE"),
        Errno::ENOBUFS => (AcceptErrorKind::Resource, "ENOBUFS"),
        Errno::ENOMEM => (AcceptErrorKind::Resource, "ENOMEM"),
        Errno::ECONNABORTED => (AcceptErrorKind::Connection, "ECONNABORTED"),
        Errno::ECONNRESET
        | Errno::EPROTO
        | Errno::EPERM
        | Errno::ENETDOWN
        | Errno::ENOPROTOOPT
        | Errno::EHOSTDOWN
        | Errno::ENONET
        | Errno::EHOSTUNREACH
        | Errno::EOPNOTSUPP
        | Errno::ENETUNREACH
        | Errno::EINTR => (AcceptErrorKind::Connection, "connection"),
        _ => (AcceptErrorKind::Other, "other"),
    }
}

/// Exponential back-off between failing accepts: [`MIN_BACKOFF`] doubling to [`MAX_BACKOFF`],
/// back to the start after a success.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    /// How long to wait after an error of `kind` (`None`: try again at once).
    pub fn on_error(&mut self, kind: AcceptErrorKind) -> Option<Duration> {
        if kind == AcceptErrorKind::Connection {
            return None;
        }
        let delay = self.next.unwrap_or(MIN_BACKOFF);
        self.next = Some((delay * 2).min(MAX_BACKOFF));
        Some(delay)
    }

    pub fn on_success(&mut self) {
        self.next = None;
    }
}

/// At most one line per interval; the lines in between are counted and reported with the next.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be written at `now`.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceptErrorLabels {
    listener: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

/// The listeners' counters. Process-wide: listeners are made in many places (per pod, per
/// test), and every registry of the process ([`register_metrics`]) shows the same counts.
#[derive(Debug, Clone, Default)]
struct ListenerMetrics {
    accept_errors: Family<AcceptErrorLabels, Counter>,
    rejected: Family<ListenerLabels, Counter>,
}

static METRICS: LazyLock<ListenerMetrics> = LazyLock::new(ListenerMetrics::default);

/// Adds the listeners' counters to `registry`: `mesh_accept_errors_total{listener, error}` and
/// `mesh_connections_rejected_total{listener}` (connections closed at once because a
/// listener's connection cap was reached).
pub fn register_metrics(registry: &mut Registry) {
    registry.register(
        "mesh_accept_errors",
        "Failed accepts per listener and error (EMFILE: out of file descriptors)",
        METRICS.accept_errors.clone(),
    );
    registry.register(
        "mesh_connections_rejected",
        "Connections closed at once because the listener had its maximum of open connections",
        METRICS.rejected.clone(),
    );
}

/// Counts a connection `listener` closed at once because it was at its cap.
pub fn count_rejected(listener: &'static str) {
    METRICS
        .rejected
        .get_or_create(&ListenerLabels { listener })
        .inc();
}

/// Accepts connections from a listener, backing off on errors instead of spinning. `name`
/// (`hbone`, `metrics`, ...) labels the metric and the log lines.
#[derive(Debug)]
pub struct Acceptor<L = TcpListener> {
    listener: L,
    name: &'static str,
    local_addr: Option<SocketAddr>,
    backoff: Backoff,
    log: LogLimiter,
}

impl<L: Listen> Acceptor<L> {
    pub fn new(listener: L, name: &'static str) -> Self {
        Self {
            local_addr: listener.local_addr().ok(),
            listener,
            name,
            backoff: Backoff::default(),
            log: LogLimiter::new(LOG_INTERVAL),
        }
    }

    pub fn listener(&self) -> &L {
        &self.listener
    }

    /// The next connection. Never fails: errors are counted, logged (rate-limited) and, unless
    /// they concern one aborted connection, waited out with exponential back-off. Cancel-safe.
    pub async fn accept(&mut self) -> (L::Conn, SocketAddr) {
        loop {
            match poll_fn(|cx| self.listener.poll_accept(cx)).await {
                Ok(accepted) => {
                    self.backoff.on_success();
                    return accepted;
                }
                Err(e) => {
                    let (kind, label) = classify(&e);
                    METRICS
                        .accept_errors
                        .get_or_create(&AcceptErrorLabels {
                            listener: self.name,
                            error: label,
                        })
                        .inc();
                    let delay = self.backoff.on_error(kind);
                    if let Some(suppressed) = self.log.allow(Instant::now()) {
                        let addr = self
                            .local_addr
                            .map_or_else(|| "?".to_owned(), |a| a.to_string());
                        let hint = if kind == AcceptErrorKind::Resource {
                            "out of file descriptors or memory: check the open-file limit \
                             (logged at start), the connection caps and who holds connections"
                        } else {
                            "retrying"
                        };
                        tracing::warn!(
                            listener = self.name,
                            %addr,
                            error = %e,
                            backoff = ?delay.unwrap_or_default(),
                            suppressed,
                            "accept failed: {hint}"
                        );
                    }
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }
}

/// The open-file limit before and after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
}

/// Raises this process' soft RLIMIT_NOFILE to its hard limit. Every connection is a file
/// descriptor, and the usual default soft limit (1,024) is far below what a proxy needs; the
/// hard limit (a container runtime's is typically 1,048,576) is what the operator granted.
pub fn raise_open_file_limit() -> Result<OpenFileLimit, Errno> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (now, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(OpenFileLimit {
        before: soft,
        now,
        hard,
    })
}

/// [`raise_open_file_limit`] with its outcome logged, as both binaries call it at start.
pub fn raise_and_log_open_file_limit() {
    match raise_open_file_limit() {
        Ok(limit) if limit.before < limit.now => tracing::info!(
            before = limit.before,
            now = limit.now,
            "open-file limit (RLIMIT_NOFILE) raised to the hard limit"
        ),
        Ok(limit) => tracing::info!(
            now = limit.now,
            hard = limit.hard,
            "open-file limit (RLIMIT_NOFILE) already at the hard limit"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot raise the open-file limit (RLIMIT_NOFILE); connections beyond it fail with EMFILE"
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn os(errno: Errno) -> io::Error {
        io::Error::from_raw_os_error(errno as i32)
    }

    #[test]
    fn errors_are_classified() {
        for (error, kind, label) in [
            (os(Errno::EMFILE), AcceptErrorKind::Resource, "EMFILE"),
            (os(Errno::ENFILE), AcceptErrorKind::Resource, "ENFILE"),
            (os(Errno::ENOBUFS), AcceptErrorKind::Resource, "ENOBUFS"),
            (os(Errno::ENOMEM), AcceptErrorKind::Resource, "ENOMEM"),
            (
                os(Errno::ECONNABORTED),
                AcceptErrorKind::Connection,
                "ECONNABORTED",
            ),
            (os(Errno::EPROTO), AcceptErrorKind::Connection, "connection"),
            (os(Errno::EBADF), AcceptErrorKind::Other, "other"),
            (
                io::Error::other("not an OS error"),
                AcceptErrorKind::Other,
                "other",
            ),
        ] {
            assert_eq!(classify(&error), (kind, label), "{error}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let ms = Duration::from_millis;
        let waits: Vec<_> = (0..10)
            .map(|_| b.on_error(AcceptErrorKind::Resource))
            .collect();
        assert_eq!(
            waits,
            [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000].map(|n| Some(ms(n)))
        );
        assert_eq!(b.on_error(AcceptErrorKind::Connection), None);
        assert_eq!(b.on_error(AcceptErrorKind::Other), Some(MAX_BACKOFF));
        b.on_success();
        assert_eq!(b.on_error(AcceptErrorKind::Other), Some(MIN_BACKOFF));
    }

    #[test]
    fn log_limiter_writes_one_line_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = LogLimiter::new(s(10));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + s(1)), None);
        assert_eq!(l.allow(t0 + s(9)), None);
        assert_eq!(l.allow(t0 + s(10)), Some(2));
        assert_eq!(l.allow(t0 + s(11)), None);
        assert_eq!(l.allow(t0 + s(30)), Some(1));
    }

    /// Fails with `errno` `failures` times (always ready, as a listener whose backlog holds a
    /// connection it cannot accept), then accepts.
    struct Failing {
        errno: Errno,
        failures: u64,
        attempts: Arc<AtomicU64>,
    }

    impl Listen for Failing {
        type Conn = u64;
        fn poll_accept(&self, _: &mut Context<'_>) -> Poll<io::Result<(u64, SocketAddr)>> {
            let n = self.attempts.fetch_add(1, Ordering::Relaxed);
            if n < self.failures {
                Poll::Ready(Err(os(self.errno)))
            } else {
                Poll::Ready(Ok((n, SocketAddr::from(([127, 0, 0, 1], 1)))))
            }
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 15020)))
        }
    }

    fn errors_counted(listener: &'static str, error: &'static str) -> u64 {
        METRICS
            .accept_errors
            .get_or_create(&AcceptErrorLabels { listener, error })
            .get()
    }

    #[tokio::test]
    async fn emfile_does_not_spin() {
        let attempts = Arc::new(AtomicU64::new(0));
        let mut acceptor = Acceptor::new(
            Failing {
                errno: Errno::EMFILE,
                failures: u64::MAX,
                attempts: attempts.clone(),
            },
            "test-emfile",
        );
        let window = Duration::from_millis(300);
        let started = Instant::now();
        let accepted = tokio::time::timeout(window, acceptor.accept()).await;
        assert!(accepted.is_err(), "every accept fails");
        assert!(started.elapsed() >= window);
        // 5 + 10 + 20 + 40 + 80 + 160 ms: about 7 attempts in 300 ms, not millions.
        let n = attempts.load(Ordering::Relaxed);
        assert!((2..=10).contains(&n), "{n} accept attempts in {window:?}");
        assert_eq!(errors_counted("test-emfile", "EMFILE"), n);
    }

    #[tokio::test]
    async fn connection_errors_are_retried_at_once_and_success_resets() {
        let attempts = Arc::new(AtomicU64::new(0));
        let mut acceptor = Acceptor::new(
            Failing {
                errno: Errno::ECONNABORTED,
                failures: 1000,
                attempts: attempts.clone(),
            },
            "test-aborted",
        );
        // A thousand aborted connections cost no waiting: the next good one is accepted.
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept())
            .await
            .unwrap();
        assert_eq!(n, 1000);
        assert_eq!(errors_counted("test-aborted", "ECONNABORTED"), 1000);

        let mut acceptor = Acceptor::new(
            Failing {
                errno: Errno::ENFILE,
                failures: 3,
                attempts: Arc::new(AtomicU64::new(0)),
            },
            "test-enfile",
        );
        let started = Instant::now();
        acceptor.accept().await;
        // 5 + 10 + 20 ms of back-off, then accepted; the next error starts over at 5 ms.
        assert!(started.elapsed() >= Duration::from_millis(35));
        assert_eq!(acceptor.backoff.next, None);
    }

    #[tokio::test]
    async fn real_listener_accepts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acceptor = Acceptor::new(listener, "test-real");
        let client = tokio::spawn(TcpStream::connect(addr));
        let (_, peer) = acceptor.accept().await;
        let client = client.await.unwrap().unwrap();
        assert_eq!(client.local_addr().unwrap(), peer);
    }

    #[test]
    fn open_file_limit_is_at_the_hard_limit_after_raising() {
        // Only raises (never lowers) this process' limit, so it cannot disturb other tests.
        let limit = raise_open_file_limit().unwrap();
        assert_eq!(limit.now, limit.hard);
        assert!(limit.before <= limit.now);
    }
}
