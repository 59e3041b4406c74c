//! Making one upstream connection: connect through the [`Connector`] within `connectTimeout`,
//! the hyper handshake, and the driver task that runs the connection and closes it when idle.
//!
//! An HTTP/2 connection counts as established once the server's first SETTINGS frame arrived
//! (the server preface), so its stream limit is known before requests are spread over it. hyper
//! does not expose the peer's settings, so [`FrameWatch`] reads SETTINGS_MAX_CONCURRENT_STREAMS
//! from the frames as they pass (frame headers only; payloads other than SETTINGS are skipped).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::pool::{Cluster, ConnShared, Failure, INITIAL_MAX_SEND_STREAMS, Lease, SlotGuard};
use super::{Connector, Io, UpstreamProtocol, UpstreamTarget};
use crate::request::Body;

/// HTTP/2 flow-control windows towards endpoints, as for HBONE (`mesh::hbone::H2Settings`).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Connects to `target` for the cluster and hands back the first request's lease.
pub(super) async fn establish(
    cluster: &Arc<Cluster>,
    connector: &dyn Connector,
    target: UpstreamTarget,
    protocol: UpstreamProtocol,
    slot: SlotGuard,
    connect_timeout: Duration,
) -> Result<Lease, Failure> {
    let shared = slot.shared().clone();
    let deadline = Instant::now() + connect_timeout;
    let io = match tokio::time::timeout_at(deadline, connector.connect(&target)).await {
        Ok(Ok(io)) => io,
        Ok(Err(error)) => {
            tracing::debug!(endpoint = %target.addr, %error, "upstream connect failed");
            return Err(cluster.connect_failed(&shared, Failure::ConnectError(Arc::new(error))));
        }
        Err(_) => {
            tracing::debug!(endpoint = %target.addr, ?connect_timeout, "upstream connect timed out");
            return Err(cluster.connect_failed(&shared, Failure::ConnectTimeout(connect_timeout)));
        }
    };
    let weak = Arc::downgrade(cluster);
    match protocol {
        UpstreamProtocol::Http1 => {
            let io = UpstreamIo {
                inner: io,
                frames: None,
                _slot: slot,
            };
            let (sender, conn) = match http1::Builder::new()
                .handshake::<_, Body>(TokioIo::new(io))
                .await
            {
                Ok(parts) => parts,
                Err(error) => return Err(handshake_failed(cluster, &shared, error)),
            };
            tokio::spawn(Driver::new(
                conn.with_upgrades(),
                shared.clone(),
                weak,
                false,
            ));
            cluster.register_http1(&shared, sender)
        }
        UpstreamProtocol::Http2 => {
            let (first_settings, settings_seen) = oneshot::channel();
            let io = UpstreamIo {
                inner: io,
                frames: Some(FrameWatch::new(shared.clone(), first_settings)),
                _slot: slot,
            };
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW);
            let handshake = builder.handshake::<_, Body>(TokioIo::new(io));
            let (sender, conn) = match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(parts)) => parts,
                Ok(Err(error)) => return Err(handshake_failed(cluster, &shared, error)),
                Err(_) => {
                    return Err(
                        cluster.connect_failed(&shared, Failure::ConnectTimeout(connect_timeout))
                    );
                }
            };
            tokio::spawn(Driver::new(conn, shared.clone(), weak, true));
            match tokio::time::timeout_at(deadline, settings_seen).await {
                Ok(Ok(())) => cluster.register_http2(&shared, sender),
                Ok(Err(_)) => Err(cluster.connect_failed(
                    &shared,
                    Failure::ConnectError(Arc::new(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the connection closed before the server's HTTP/2 SETTINGS: \
                         is the port really HTTP/2 (appProtocol)?",
                    ))),
                )),
                Err(_) => {
                    drop(sender);
                    Err(cluster.connect_failed(&shared, Failure::ConnectTimeout(connect_timeout)))
                }
            }
        }
    }
}

fn handshake_failed(cluster: &Cluster, shared: &ConnShared, error: hyper::Error) -> Failure {
    tracing::debug!(endpoint = %shared.addr(), %error, "upstream handshake failed");
    cluster.connect_failed(
        shared,
        Failure::ConnectError(Arc::new(io::Error::other(error))),
    )
}

/// The connector's stream, carrying the connection's slot (so the count lasts as long as the
/// socket, upgraded or not) and, for HTTP/2, the SETTINGS watch.
struct UpstreamIo {
    inner: Box<dyn Io>,
    frames: Option<FrameWatch>,
    _slot: SlotGuard,
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(frames)) = (&polled, this.frames.as_mut()) {
            frames.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

const FRAME_HEADER_LEN: usize = 9;
const FRAME_TYPE_SETTINGS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// Follows the HTTP/2 frames a server sends and records SETTINGS_MAX_CONCURRENT_STREAMS.
struct FrameWatch {
    shared: Arc<ConnShared>,
    /// Fired when the first SETTINGS frame (the server preface) has been read.
    first: Option<oneshot::Sender<()>>,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to come (0: reading a header).
    remaining: usize,
    in_settings: bool,
    entry: [u8; 6],
    entry_len: usize,
}

impl FrameWatch {
    fn new(shared: Arc<ConnShared>, first: oneshot::Sender<()>) -> Self {
        Self {
            shared,
            first: Some(first),
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            remaining: 0,
            in_settings: false,
            entry: [0; 6],
            entry_len: 0,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining == 0 {
                let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len < FRAME_HEADER_LEN {
                    return;
                }
                self.header_len = 0;
                let [l0, l1, l2, kind, flags, ..] = self.header;
                self.remaining = u32::from_be_bytes([0, l0, l1, l2]) as usize;
                self.in_settings = kind == FRAME_TYPE_SETTINGS && flags & FLAG_ACK == 0;
                self.entry_len = 0;
                if self.remaining == 0 {
                    self.frame_done();
                }
                continue;
            }
            let take = self.remaining.min(bytes.len());
            if self.in_settings {
                for &byte in &bytes[..take] {
                    self.entry[self.entry_len] = byte;
                    self.entry_len += 1;
                    if self.entry_len == self.entry.len() {
                        self.entry_len = 0;
                        let [i0, i1, v0, v1, v2, v3] = self.entry;
                        if u16::from_be_bytes([i0, i1]) == SETTINGS_MAX_CONCURRENT_STREAMS {
                            let value = u32::from_be_bytes([v0, v1, v2, v3]);
                            self.shared.max_streams.store(
                                usize::try_from(value).unwrap_or(usize::MAX),
                                Ordering::Release,
                            );
                        }
                    }
                }
            }
            self.remaining -= take;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                self.frame_done();
            }
        }
    }

    fn frame_done(&mut self) {
        if self.in_settings {
            self.in_settings = false;
            if let Some(first) = self.first.take() {
                let _ = first.send(());
            }
            self.shared.wake();
        }
    }
}

/// Runs a connection: polls hyper's connection future, reports HTTP/2 stream-limit changes to
/// the pool, and closes the connection when the pool says it has been idle for `idleTimeout`.
struct Driver<C> {
    conn: Pin<Box<C>>,
    shared: Arc<ConnShared>,
    cluster: Weak<Cluster>,
    sleep: Pin<Box<Sleep>>,
    /// The idle epoch the timer is set for, and the last one that fired.
    armed: Option<u64>,
    fired: Option<u64>,
    track_streams: bool,
    last_streams: usize,
}

impl<C> Driver<C> {
    fn new(conn: C, shared: Arc<ConnShared>, cluster: Weak<Cluster>, track_streams: bool) -> Self {
        Self {
            conn: Box::pin(conn),
            shared,
            cluster,
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(86_400))),
            armed: None,
            fired: None,
            track_streams,
            last_streams: INITIAL_MAX_SEND_STREAMS,
        }
    }
}

impl<C, E> Future for Driver<C>
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Poll::Ready(result) = this.conn.as_mut().poll(cx) {
            if let Err(error) = result {
                tracing::debug!(endpoint = %this.shared.addr(), %error, "upstream connection ended");
            }
            return Poll::Ready(());
        }
        // Register before reading the shared state, so a change after the read wakes us.
        this.shared.register(cx.waker());
        if this.track_streams {
            let max = this.shared.max_streams.load(Ordering::Acquire);
            if max != this.last_streams {
                this.last_streams = max;
                if let Some(cluster) = this.cluster.upgrade() {
                    cluster.http2_settings(&this.shared, max);
                }
            }
        }
        loop {
            let Some((deadline, epoch)) = this.shared.idle() else {
                return Poll::Pending;
            };
            if this.fired == Some(epoch) {
                return Poll::Pending;
            }
            if this.armed != Some(epoch) {
                this.sleep.as_mut().reset(deadline.into());
                this.armed = Some(epoch);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.fired = Some(epoch);
            match this.cluster.upgrade() {
                None => return Poll::Ready(()),
                Some(cluster) if cluster.expire_idle(&this.shared, epoch) => {
                    tracing::debug!(endpoint = %this.shared.addr(), "closing idle upstream connection");
                    return Poll::Ready(());
                }
                Some(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_watch_reads_max_concurrent_streams_across_reads() {
        let shared = ConnShared::for_test();
        let (tx, mut rx) = oneshot::channel();
        let mut watch = FrameWatch::new(shared.clone(), tx);
        // A DATA frame of 3 bytes, then SETTINGS {ENABLE_PUSH=0, MAX_CONCURRENT_STREAMS=7}.
        let mut wire = vec![0, 0, 3, 0x0, 0x1, 0, 0, 0, 1, 9, 9, 9];
        wire.extend_from_slice(&[0, 0, 12, 0x4, 0x0, 0, 0, 0, 0]);
        wire.extend_from_slice(&[0, 2, 0, 0, 0, 0]);
        wire.extend_from_slice(&[0, 3, 0, 0, 0, 7]);
        // A SETTINGS ACK (empty) after it.
        wire.extend_from_slice(&[0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]);
        let (before_end, rest) = wire.split_at(32);
        for chunk in before_end.chunks(5) {
            watch.feed(chunk);
        }
        assert!(rx.try_recv().is_err(), "not before the SETTINGS frame ends");
        watch.feed(rest);
        assert_eq!(shared.max_streams.load(Ordering::Acquire), 7);
        assert!(rx.try_recv().is_ok());
        // A later update is seen too.
        watch.feed(&[0, 0, 6, 0x4, 0x0, 0, 0, 0, 0, 0, 3, 0, 0, 1, 0]);
        assert_eq!(shared.max_streams.load(Ordering::Acquire), 256);
    }
}
