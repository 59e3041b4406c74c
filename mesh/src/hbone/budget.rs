//! How much tunnel data may wait inside HTTP/2 for a socket that does not drain: per HBONE
//! connection and for the whole process.
//!
//! HTTP/2 flow control bounds what a peer *lets* us send, not what we hold: a peer that grants
//! huge windows and then stops reading its socket made ztunnel queue everything the upstream
//! sent (4.6 MiB per stream, 2.6 GiB for 600 streams). HTTP/2 already caps each stream's queue
//! (`max_send_buffer_size`); [`SendQueue`] caps the sum over a connection's streams and over
//! every connection, so a stalled reader costs a fixed amount however many streams or
//! connections it opens.
//!
//! Accounting: a pump reserves room before it reads from its socket ([`SendQueue::reserve`]),
//! so what it reads and then hands to HTTP/2 is counted from the moment it exists, and gives
//! back what it did not read; the connection's I/O ([`Counted`]) subtracts what HTTP/2 writes
//! into TLS. A reservation is granted while the level is below its limit, so a level exceeds
//! its limit by at most one read. Control frames and frame headers
//! make the writes slightly larger than the data, so the count errs low, never high. A stream
//! reset with data still queued has that data discarded by HTTP/2 unwritten; to keep such bytes
//! from being counted for ever, the count restarts at zero whenever the connection flushes
//! completely (HTTP/2 then holds nothing: it only hands over data within the peer's windows, so
//! what it holds waits for the socket alone).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Data one HBONE connection may have waiting for its socket before its pumps stop reading
/// from their clients.
pub const CONNECTION_SEND_QUEUE: usize = 1024 * 1024;
/// Data every HBONE connection of the process together may have waiting.
pub const PROCESS_SEND_QUEUE: usize = 64 * 1024 * 1024;

/// A count of queued bytes with a limit, and a signal for the pumps waiting for it to fall.
#[derive(Debug)]
struct Level {
    queued: AtomicUsize,
    limit: usize,
    notify: Arc<Notify>,
}

impl Level {
    fn new(limit: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            limit,
            notify: Arc::new(Notify::new()),
        }
    }

    fn full(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= self.limit
    }

    /// Adds `n` if the level is below its limit.
    fn try_add(&self, n: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.limit).then_some(q + n)
            })
            .is_ok()
    }

    /// Subtracts up to `n`; returns what was subtracted.
    fn release(&self, n: usize) -> usize {
        let mut taken = 0;
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                taken = q.min(n);
                Some(q - taken)
            });
        if taken > 0 {
            self.notify.notify_waiters();
        }
        taken
    }
}

/// The process-wide level every connection's queue also counts into.
#[derive(Debug)]
pub struct ProcessSendQueue(Level);

impl ProcessSendQueue {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self(Level::new(limit)))
    }

    /// The queue shared by every HBONE connection of this process.
    pub fn global() -> Arc<Self> {
        static GLOBAL: std::sync::OnceLock<Arc<ProcessSendQueue>> = std::sync::OnceLock::new();
        GLOBAL
            .get_or_init(|| ProcessSendQueue::new(PROCESS_SEND_QUEUE))
            .clone()
    }

    /// Bytes queued over every connection now.
    pub fn queued(&self) -> usize {
        self.0.queued.load(Ordering::Acquire)
    }
}

/// One HBONE connection's send queue.
#[derive(Debug)]
pub struct SendQueue {
    conn: Level,
    process: Arc<ProcessSendQueue>,
    /// The last write into TLS could not complete: the socket is backed up.
    blocked: AtomicBool,
}

impl SendQueue {
    pub fn new(limit: usize, process: Arc<ProcessSendQueue>) -> Arc<Self> {
        Arc::new(Self {
            conn: Level::new(limit),
            process,
            blocked: AtomicBool::new(false),
        })
    }

    /// Bytes this connection has waiting.
    pub fn queued(&self) -> usize {
        self.conn.queued.load(Ordering::Acquire)
    }

    /// Counts `n` bytes handed to HTTP/2.
    pub fn handed(&self, n: usize) {
        self.conn.queued.fetch_add(n, Ordering::AcqRel);
        self.process.0.queued.fetch_add(n, Ordering::AcqRel);
    }

    fn written(&self, n: usize) {
        let taken = self.conn.release(n);
        self.process.0.release(taken);
    }

    fn flushed_everything(&self) {
        let was = self.conn.queued.swap(0, Ordering::AcqRel);
        if was > 0 {
            self.conn.notify.notify_waiters();
            self.process.0.release(was);
        }
    }

    fn full_level(&self) -> Option<&Level> {
        [&self.conn, &self.process.0].into_iter().find(|l| l.full())
    }

    /// Waits until both this connection and the process are below their limits, then counts
    /// `n` bytes as queued on both: room for a read of up to `n` bytes that will be handed to
    /// HTTP/2. Give back what was not read with [`Self::unreserve`].
    pub async fn reserve(&self, n: usize) {
        loop {
            let level = if !self.conn.try_add(n) {
                &self.conn
            } else if !self.process.0.try_add(n) {
                self.conn.release(n);
                &self.process.0
            } else {
                return;
            };
            // Registered before the re-check, so a release in between is not missed.
            let notified = level.notify.notified();
            if level.full() {
                notified.await;
            }
        }
    }

    /// Gives back `n` bytes of a [`Self::reserve`] that were not read.
    pub fn unreserve(&self, n: usize) {
        if n > 0 {
            self.written(n);
        }
    }

    /// [`Self::admit`] for `poll`-based writers: `Ready` once below both limits, else `Pending`
    /// with `cx` woken when a level falls. `slot` holds the registration between polls.
    pub fn poll_admit(&self, cx: &mut Context<'_>, slot: &mut AdmitSlot) -> Poll<()> {
        loop {
            let Some(level) = self.full_level() else {
                slot.0 = None;
                return Poll::Ready(());
            };
            let notified = slot
                .0
                .get_or_insert_with(|| Box::pin(level.notify.clone().notified_owned()));
            if !level.full() {
                slot.0 = None;
                continue;
            }
            match notified.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => slot.0 = None,
            }
        }
    }
}

/// The registration of a `poll`-based writer waiting in [`SendQueue::poll_admit`].
#[derive(Default)]
pub struct AdmitSlot(Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>);

impl std::fmt::Debug for AdmitSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AdmitSlot").field(&self.0.is_some()).finish()
    }
}

/// The I/O under an HBONE connection's HTTP/2, counting what HTTP/2 writes into it for the
/// connection's [`SendQueue`].
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    queue: Arc<SendQueue>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, queue: Arc<SendQueue>) -> Self {
        Self { inner, queue }
    }

    fn wrote(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) => {
                self.queue.blocked.store(false, Ordering::Release);
                self.queue.written(*n);
            }
            Poll::Pending => self.queue.blocked.store(true, Ordering::Release),
            Poll::Ready(Err(_)) => {}
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        match result {
            // HTTP/2 flushes once it has nothing left to write: whatever is still counted was
            // discarded with a reset stream, or is being handed over right now by a pump (and
            // then errs the count low by that chunk).
            Poll::Ready(Ok(())) if !self.queue.blocked.load(Ordering::Acquire) => {
                self.queue.flushed_everything();
            }
            Poll::Pending => self.queue.blocked.store(true, Ordering::Release),
            _ => {}
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        // The connection is gone, and with it everything it had queued.
        self.queue.flushed_everything();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn writers_wait_for_the_socket_and_resume_when_it_drains() {
        let process = ProcessSendQueue::new(10 * 1024);
        let queue = SendQueue::new(4096, process.clone());
        // A pipe nobody reads: the "socket" of a stalled peer.
        let (writer, mut reader) = tokio::io::duplex(1024);
        let mut io = Counted::new(writer, queue.clone());
        queue.reserve(8192).await;
        assert_eq!(process.queued(), 8192);
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.reserve(100).await }
        });
        // Only 1 KiB fits; the rest stays queued and the waiter keeps waiting.
        let n = io.write(&[0u8; 8192]).await.expect("write");
        assert_eq!(n, 1024);
        assert_eq!(queue.queued(), 8192 - 1024);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "over the limit: the pump waits");
        // The reader drains; the writer writes the rest: the waiter goes on.
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut sink).await
        });
        io.write_all(&[0u8; 4096]).await.expect("write");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("admitted once below the limit")
            .expect("task");
        assert_eq!(queue.queued(), 8192 - 1024 - 4096 + 100);
        queue.unreserve(60);
        assert_eq!(queue.queued(), 8192 - 1024 - 4096 + 40);
        drop(io);
        assert_eq!(queue.queued(), 0, "a closed connection holds nothing");
        assert_eq!(process.queued(), 0, "and the process level follows");
        drain.abort();
    }

    #[tokio::test]
    async fn the_process_level_stops_every_connection() {
        let process = ProcessSendQueue::new(4096);
        let a = SendQueue::new(1 << 20, process.clone());
        let b = SendQueue::new(1 << 20, process.clone());
        a.handed(4096);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(1).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "b waits for a's queue to drain");
        assert_eq!(
            b.queued(),
            0,
            "a refused reservation leaves nothing counted"
        );
        let (writer, _reader) = tokio::io::duplex(1 << 20);
        let mut io = Counted::new(writer, a.clone());
        io.write_all(&[0u8; 4096]).await.expect("write");
        io.flush().await.expect("flush");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("admitted")
            .expect("task");
        assert_eq!(process.queued(), 1);
    }

    #[tokio::test]
    async fn concurrent_reservations_exceed_the_limit_by_one_read_at_most() {
        let process = ProcessSendQueue::new(1 << 30);
        let q = SendQueue::new(1000, process);
        let mut waiting = Vec::new();
        for _ in 0..50 {
            let q = q.clone();
            waiting.push(tokio::spawn(async move { q.reserve(300).await }));
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(q.queued() < 1000 + 300, "queued {}", q.queued());
        assert_eq!(waiting.iter().filter(|t| t.is_finished()).count(), 4);
        for t in waiting {
            t.abort();
        }
    }

    #[tokio::test]
    async fn a_complete_flush_forgets_discarded_data() {
        let process = ProcessSendQueue::new(1 << 20);
        let q = SendQueue::new(1 << 20, process.clone());
        // Handed, then discarded by HTTP/2 with a reset stream: never written.
        q.handed(5000);
        let (writer, _reader) = tokio::io::duplex(1 << 20);
        let mut io = Counted::new(writer, q.clone());
        io.write_all(b"control frame").await.expect("write");
        io.flush().await.expect("flush");
        assert_eq!(q.queued(), 0);
        assert_eq!(process.queued(), 0);
    }
}
