//! Bidirectional copy between two byte streams (a tunnel and a TCP socket), with half-close in
//! each direction and byte counts that stay readable while the copy runs and after it fails.
//!
//! When one side ends its sending (EOF), the other side's write half is shut down (a TCP FIN, or
//! END_STREAM on an HBONE tunnel) and the opposite direction keeps flowing until it ends too.
//! Any other end (a reset, an error) is returned, and the caller [`reset`]s the sockets it
//! still holds: a broken connection must reach the application as one, never as a clean FIN.
//! Buffers grow only for streams that fill them, and between two TCP sockets
//! ([`copy_tcp`]) a direction holds no buffer at all while its socket has nothing to read, so
//! an idle connection costs its sockets and a few hundred bytes of state.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First buffer size per direction.
pub(crate) const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest buffer a busy direction grows to.
const MAX_BUFFER: usize = 256 * 1024;

/// Bytes moved so far in each direction.
#[derive(Debug, Default)]
pub struct ByteCounts {
    a_to_b: AtomicU64,
    b_to_a: AtomicU64,
}

impl ByteCounts {
    pub fn a_to_b(&self) -> u64 {
        self.a_to_b.load(Ordering::Relaxed)
    }

    pub fn b_to_a(&self) -> u64 {
        self.b_to_a.load(Ordering::Relaxed)
    }

    pub(crate) fn a_to_b_counter(&self) -> &AtomicU64 {
        &self.a_to_b
    }

    pub(crate) fn b_to_a_counter(&self) -> &AtomicU64 {
        &self.b_to_a
    }
}

/// Which direction failed, and how.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading from {side}: {source}")]
    Read { side: Side, source: io::Error },
    #[error("writing to {side}: {source}")]
    Write { side: Side, source: io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::A => "side A",
            Side::B => "side B",
        })
    }
}

/// Makes dropping `stream` send a TCP reset (RST) instead of a FIN: for a connection whose
/// other side failed, so the application learns its transfer is incomplete.
pub fn reset(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0: the socket will close with a FIN");
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended, or one fails. Counts are
/// updated as bytes are written, so they are right even when an error is returned. Each
/// direction keeps its buffer while the copy lasts; between two TCP sockets [`copy_tcp`] does
/// not.
pub async fn copy_bidirectional<A, B>(a: A, b: B, counts: &ByteCounts) -> Result<(), CopyError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (a_read, mut a_write) = tokio::io::split(a);
    let (b_read, mut b_write) = tokio::io::split(b);
    let (mut a_read, mut b_read) = (AlwaysReady(a_read), AlwaysReady(b_read));
    let forward = copy_one_way(&mut a_read, &mut b_write, &counts.a_to_b, Side::A, Side::B);
    let backward = copy_one_way(&mut b_read, &mut a_write, &counts.b_to_a, Side::B, Side::A);
    tokio::try_join!(forward, backward).map(|_| ())
}

/// [`copy_bidirectional`] between two TCP sockets: a direction takes its buffer only when its
/// socket is readable and gives it up when the socket runs dry, so idle connections hold none.
pub async fn copy_tcp(
    a: &mut tokio::net::TcpStream,
    b: &mut tokio::net::TcpStream,
    counts: &ByteCounts,
) -> Result<(), CopyError> {
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let forward = copy_one_way(&mut a_read, &mut b_write, &counts.a_to_b, Side::A, Side::B);
    let backward = copy_one_way(&mut b_read, &mut a_write, &counts.b_to_a, Side::B, Side::A);
    tokio::try_join!(forward, backward).map(|_| ())
}

/// A reader that can tell it has bytes before it is handed a buffer to put them in.
pub(crate) trait ReadReady: AsyncRead + Unpin {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for tokio::net::tcp::ReadHalf<'_> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

/// A reader that cannot tell: always "ready", so the buffer is taken at once and kept.
struct AlwaysReady<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for AlwaysReady<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<R: AsyncRead + Unpin> ReadReady for AlwaysReady<R> {
    fn poll_read_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Waits until `reader` has bytes (or its end, or an error). When it has none yet, `on_idle`
/// runs once before the wait: the caller gives up its read buffer there, so an idle direction
/// holds none, and the next burst starts small again.
pub(crate) async fn until_readable<R: ReadReady>(
    reader: &mut R,
    mut on_idle: impl FnMut(),
) -> io::Result<()> {
    let mut idle = false;
    std::future::poll_fn(|cx| {
        let ready = reader.poll_read_ready(cx);
        if ready.is_pending() && !idle {
            idle = true;
            on_idle();
        }
        ready
    })
    .await
}

async fn copy_one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    count: &AtomicU64,
    from: Side,
    to: Side,
) -> Result<(), CopyError>
where
    R: ReadReady,
    W: AsyncWrite + Unpin,
{
    // Filled by `read_buf` into spare capacity: never zeroed, so taking it per burst is cheap.
    let mut buf: Vec<u8> = Vec::new();
    let mut size = INITIAL_BUFFER;
    let mut full_reads = 0u32;
    loop {
        until_readable(reader, || {
            buf = Vec::new();
            size = INITIAL_BUFFER;
        })
        .await
        .map_err(|source| CopyError::Read { side: from, source })?;
        buf.clear();
        buf.reserve_exact(size);
        let n = reader
            .read_buf(&mut buf)
            .await
            .map_err(|source| CopyError::Read { side: from, source })?;
        if n == 0 {
            // Half-close: pass the end of stream on; the other direction carries on.
            return writer
                .shutdown()
                .await
                .map_err(|source| CopyError::Write { side: to, source });
        }
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|source| CopyError::Write { side: to, source })?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n == size && size < MAX_BUFFER {
            full_reads += 1;
            if full_reads >= 4 {
                full_reads = 0;
                size *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn half_close_each_way_and_counts() {
        // client <-> (a | proxy | b) <-> server
        let (client, a) = duplex(1024);
        let (b, server) = duplex(1024);
        let counts = std::sync::Arc::new(ByteCounts::default());
        let c = counts.clone();
        let proxy = tokio::spawn(async move { copy_bidirectional(a, b, &c).await });

        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut server_r, mut server_w) = tokio::io::split(server);
        client_w.write_all(b"hello").await.unwrap();
        client_w.shutdown().await.unwrap();
        let mut got = Vec::new();
        server_r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "server sees client's bytes then EOF");

        // The other direction still works after the client's half-close.
        server_w.write_all(b"world!").await.unwrap();
        server_w.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_r.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");

        proxy.await.unwrap().unwrap();
        assert_eq!(counts.a_to_b(), 5);
        assert_eq!(counts.b_to_a(), 6);
    }

    #[tokio::test]
    async fn grows_buffer_and_keeps_bytes_intact() {
        let (client, a) = duplex(64 * 1024);
        let (b, server) = duplex(64 * 1024);
        let counts = std::sync::Arc::new(ByteCounts::default());
        let c = counts.clone();
        let proxy = tokio::spawn(async move { copy_bidirectional(a, b, &c).await });
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expected = data.clone();
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            client_w.write_all(&data).await.unwrap();
            client_w.shutdown().await.unwrap();
        });
        let (mut server_r, mut server_w) = tokio::io::split(server);
        let mut got = Vec::new();
        server_r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        server_w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client_r.read_to_end(&mut rest).await.unwrap();
        proxy.await.unwrap().unwrap();
        assert!(got == expected, "bytes differ after copy");
        assert_eq!(counts.a_to_b(), 3_000_000);
        assert_eq!(counts.b_to_a(), 0);
    }
}
