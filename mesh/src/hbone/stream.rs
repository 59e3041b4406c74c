//! One HBONE tunnel as a byte stream: an HTTP/2 stream's DATA frames behind `AsyncRead` and
//! `AsyncWrite`, so the same copy code serves tunnels and sockets.
//!
//! Shutting down the write half sends END_STREAM (a half-close); dropping the stream before that
//! resets it (RST_STREAM CANCEL), which the peer sees as an aborted connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
        guard: StreamGuard,
    ) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
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
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let n = cap.min(buf.len());
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
