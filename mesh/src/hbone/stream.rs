//! One HBONE tunnel as a byte stream: an HTTP/2 stream's DATA frames behind `AsyncRead` and
//! `AsyncWrite`, so the same copy code serves tunnels and sockets.
//!
//! Shutting down the write half sends END_STREAM (a half-close); dropping the stream before that
//! resets it (RST_STREAM CANCEL), which the peer sees as an aborted connection. Only END_STREAM
//! is a clean end: a reset stream, a connection that dies or a TLS stream cut without
//! `close_notify` is an error, and [`copy_tcp_and_tunnel`] returns it so the caller resets the
//! TCP side too (a FIN there would tell the application a truncated transfer was complete).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::budget::{AdmitSlot, SendQueue};

/// Kept alive for as long as the tunnel is; the client pool uses it to count streams per
/// connection.
pub(crate) type StreamGuard = Option<Box<dyn Send + Sync>>;

/// An established tunnel.
pub struct H2Stream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
    /// The connection's send queue: writes wait while it is full.
    queue: Arc<SendQueue>,
    admit: AdmitSlot,
    _guard: StreamGuard,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("recv_done", &self.recv_done)
            .field("send_done", &self.send_done)
            .finish_non_exhaustive()
    }
}

impl H2Stream {
    pub(crate) fn new(
        send: h2::SendStream<Bytes>,
        recv: h2::RecvStream,
        queue: Arc<SendQueue>,
        guard: StreamGuard,
    ) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
            queue,
            admit: AdmitSlot::default(),
            _guard: guard,
        }
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    match e.reason() {
        Some(h2::Reason::CANCEL)
        | Some(h2::Reason::NO_ERROR)
        | Some(h2::Reason::REFUSED_STREAM) => io::Error::new(io::ErrorKind::ConnectionReset, e),
        _ => io::Error::other(e),
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The chunk is held here until read, so releasing its window now bounds what
                    // this stream buffers to one chunk plus the peer's in-flight window.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.recv_done = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.send_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let this = &mut *self;
        ready!(this.queue.poll_admit(cx, &mut this.admit));
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let n = cap.min(buf.len());
                    self.queue.handed(n);
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames; there is nothing to flush per stream.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.send_done {
            self.send_done = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Moves bytes between a TCP socket and a tunnel until both directions end, like
/// [`crate::copy::copy_bidirectional`] but without staging buffers: bytes read from the socket
/// are handed to HTTP/2 as they are, and DATA frames from the tunnel are written to the socket
/// as they arrived. Counts follow `tcp_side`: bytes from side A to side B go to `a_to_b`.
///
/// Ends are passed on as they came: a FIN from the socket becomes END_STREAM and END_STREAM
/// becomes a FIN. Any other end is an error: the tunnel is reset when this returns (its
/// streams are dropped unfinished), and the caller resets the socket
/// ([`crate::copy::reset`]) so the application sees the failure too. Reads from the socket
/// wait while the connection's send queue is full ([`super::budget`]).
pub async fn copy_tcp_and_tunnel(
    tcp: &mut tokio::net::TcpStream,
    tunnel: H2Stream,
    counts: &crate::copy::ByteCounts,
    tcp_side: crate::copy::Side,
) -> Result<(), crate::copy::CopyError> {
    use crate::copy::{CopyError, Side};
    let (tunnel_side, tcp_count, tunnel_count) = match tcp_side {
        Side::A => (Side::B, counts.a_to_b_counter(), counts.b_to_a_counter()),
        Side::B => (Side::A, counts.b_to_a_counter(), counts.a_to_b_counter()),
    };
    let H2Stream {
        mut send,
        mut recv,
        pending,
        recv_done,
        send_done,
        queue,
        admit: _,
        _guard,
    } = tunnel;
    let (mut tcp_read, mut tcp_write) = tcp.split();

    let upload = async {
        use tokio::io::AsyncReadExt;
        let mut buf = bytes::BytesMut::new();
        let mut size = crate::copy::INITIAL_BUFFER;
        loop {
            if send_done {
                return Ok(());
            }
            // Memory only once there is something to read: an idle tunnel holds no buffer (the
            // leftover capacity of the last chunk's allocation is given up, and the chunk's own
            // share is freed once HTTP/2 has written it), and the next burst starts small.
            crate::copy::until_readable(&mut tcp_read, || {
                buf = bytes::BytesMut::new();
                size = crate::copy::INITIAL_BUFFER;
            })
            .await
            .map_err(|source| CopyError::Read {
                side: tcp_side,
                source,
            })?;
            // Room in the connection's send queue first: a peer that does not read stops this
            // pump before it reads more from the socket.
            let room = size;
            queue.reserve(room).await;
            buf.reserve(size);
            let read = tcp_read.read_buf(&mut buf).await;
            match *read.as_ref().unwrap_or(&0) {
                n if n > room => queue.handed(n - room),
                n => queue.unreserve(room - n),
            }
            let n = read.map_err(|source| CopyError::Read {
                side: tcp_side,
                source,
            })?;
            if n == 0 {
                return send
                    .send_data(Bytes::new(), true)
                    .map_err(|e| CopyError::Write {
                        side: tunnel_side,
                        source: h2_to_io(e),
                    });
            }
            if n == size && size < 256 * 1024 {
                size *= 2;
            }
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))
                    .and_then(|r| r.map_err(h2_to_io))
                    .map_err(|source| CopyError::Write {
                        side: tunnel_side,
                        source,
                    })?;
                if granted == 0 {
                    continue;
                }
                let part = chunk.split_to(granted.min(chunk.len()));
                let len = part.len();
                send.send_data(part, false).map_err(|e| CopyError::Write {
                    side: tunnel_side,
                    source: h2_to_io(e),
                })?;
                tcp_count.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };

    let download = async {
        use tokio::io::AsyncWriteExt;
        let write = |e| CopyError::Write {
            side: tcp_side,
            source: e,
        };
        if !pending.is_empty() {
            tcp_write.write_all(&pending).await.map_err(write)?;
            tunnel_count.fetch_add(pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if !recv_done {
            while let Some(data) = std::future::poll_fn(|cx| recv.poll_data(cx)).await {
                let data = data.map_err(|e| CopyError::Read {
                    side: tunnel_side,
                    source: h2_to_io(e),
                })?;
                tcp_write.write_all(&data).await.map_err(write)?;
                let _ = recv.flow_control().release_capacity(data.len());
                tunnel_count.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        tcp_write.shutdown().await.map_err(write)
    };

    tokio::try_join!(upload, download).map(|_| ())
}
