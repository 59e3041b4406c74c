//! Bidirectional copy between two byte streams (a tunnel and a TCP socket), with half-close in
//! each direction and byte counts that stay readable while the copy runs and after it fails.
//!
//! When one side ends its sending (EOF), the other side's write half is shut down (a TCP FIN, or
//! END_STREAM on an HBONE tunnel) and the opposite direction keeps flowing until it ends too.
//! Any other end (a reset, an error) is returned, and the caller [`reset`]s the sockets it
//! still holds: a broken connection must reach the application as one, never as a clean FIN.
//! Buffers start small and grow only for streams that fill them, so idle connections stay cheap.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First buffer size per direction.
const INITIAL_BUFFER: usize = 16 * 1024;
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
/// updated as bytes are written, so they are right even when an error is returned.
pub async fn copy_bidirectional<A, B>(a: A, b: B, counts: &ByteCounts) -> Result<(), CopyError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let forward = copy_one_way(&mut a_read, &mut b_write, &counts.a_to_b, Side::A, Side::B);
    let backward = copy_one_way(&mut b_read, &mut a_write, &counts.b_to_a, Side::B, Side::A);
    tokio::try_join!(forward, backward).map(|_| ())
}

async fn copy_one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    count: &AtomicU64,
    from: Side,
    to: Side,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut full_reads = 0u32;
    loop {
        let n = reader
            .read(&mut buf)
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
        if n == buf.len() && buf.len() < MAX_BUFFER {
            full_reads += 1;
            if full_reads >= 4 {
                full_reads = 0;
                buf.resize(buf.len() * 2, 0);
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
