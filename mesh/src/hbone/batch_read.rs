//! Large socket reads under rustls.
//!
//! rustls reads one TLS record (at most ~16 KiB) per call into its own buffer, so a tunnel
//! moving 256 KiB DATA frames cost the receiving side sixteen `recvfrom`s per frame, each also
//! acknowledging what it read. [`BatchedRead`] sits between the socket and rustls: while the
//! peer streams (a read fills rustls' request), it reads up to [`BATCH`] at a time into a buffer
//! of its own and serves rustls from there; once reads come back short (requests and replies,
//! an idle tunnel) it frees the buffer and passes reads straight through again, so small
//! messages take no extra copy and idle connections hold no buffer. Writes pass through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest read while the peer streams.
pub(crate) const BATCH: usize = 256 * 1024;

#[derive(Debug)]
pub(crate) struct BatchedRead<T> {
    io: T,
    /// Empty while passing through.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<T> BatchedRead<T> {
    pub(crate) fn new(io: T) -> Self {
        Self {
            io,
            buf: Box::default(),
            start: 0,
            end: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedRead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            if this.buf.is_empty() {
                // Passing through: a read that fills the caller's buffer means more is waiting.
                let before = out.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
                if out.remaining() == 0 && out.filled().len() > before {
                    this.buf = vec![0; BATCH].into_boxed_slice();
                }
                return Poll::Ready(Ok(()));
            }
            let mut batch = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut batch))?;
            let n = batch.filled().len();
            let taken = n.min(out.remaining());
            out.put_slice(&this.buf[..taken]);
            if taken == n && n < BATCH / 16 {
                // The stream slowed down (or ended): pass through again.
                this.buf = Box::default();
            } else {
                (this.start, this.end) = (taken, n);
            }
            return Poll::Ready(Ok(()));
        }
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedRead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads with requests of `request` bytes until EOF.
    async fn read_all<R: AsyncRead + Unpin>(r: &mut R, request: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; request];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn streams_and_small_messages_arrive_intact() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut reader = BatchedRead::new(near);
        // A stream (batching kicks in), then small messages (passing through again).
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            far.write_all(&sent).await.unwrap();
            far
        });
        let got = {
            let mut got = vec![0u8; data.len()];
            let mut filled = 0;
            while filled < data.len() {
                let end = (filled + 18_000).min(data.len());
                filled += reader.read(&mut got[filled..end]).await.unwrap();
            }
            got
        };
        let mut far = writer.await.unwrap();
        assert!(got == data, "streamed bytes differ");
        assert!(reader.start == reader.end, "nothing left over");
        for i in 0..5u8 {
            far.write_all(&[i; 100]).await.unwrap();
            let mut small = [0u8; 18_000];
            let n = reader.read(&mut small).await.unwrap();
            assert_eq!(&small[..n], &[i; 100][..]);
        }
        assert!(reader.buf.is_empty(), "short reads free the batch buffer");
        far.write_all(b"end").await.unwrap();
        drop(far);
        assert_eq!(read_all(&mut reader, 7).await, b"end");
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (far, near) = tokio::io::duplex(1024);
        let mut wrapped = BatchedRead::new(near);
        wrapped.write_all(b"hello").await.unwrap();
        wrapped.shutdown().await.unwrap();
        let mut far = far;
        assert_eq!(read_all(&mut far, 3).await, b"hello");
    }
}
