//! Live inbound connections: what was authorized, so a policy change can re-check every open
//! connection and close those now denied, and so drain knows when the node is quiet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mesh::identity::Identity;
use mesh::model::State;
use tokio_util::sync::CancellationToken;

use crate::authz::{Connection, Decision, authorize};

/// What a connection was authorized as.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveConnection {
    pub source_identity: Option<Identity>,
    pub source_ip: IpAddr,
    pub destination_workload: String,
    pub destination_addr: SocketAddr,
    #[serde(skip)]
    pub started: Instant,
    /// Bytes moved so far (client to server is `a_to_b`).
    #[serde(skip)]
    pub bytes: Arc<mesh::copy::ByteCounts>,
    #[serde(skip)]
    cancel: CancellationToken,
}

/// The registry. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct LiveConnections {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, LiveConnection>>,
    changed: tokio::sync::Notify,
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    inner: Arc<Inner>,
    /// Cancelled when a policy change denies the connection or drain's deadline passes.
    pub cancelled: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        {
            let mut conns = lock(&self.inner.conns);
            conns.remove(&self.id);
            // A wave of connections grows the table; it is given back once three quarters of
            // it is empty (halving, so a steady count does not resize back and forth), so RSS
            // returns to idle after the wave instead of keeping its peak.
            if conns.capacity() > SHRINK_ABOVE && conns.len() * 4 < conns.capacity() {
                let keep = conns.len() * 2;
                conns.shrink_to(keep);
            }
        }
        self.inner.changed.notify_waiters();
    }
}

/// Below this many slots the table is left as it is.
const SHRINK_ABOVE: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single inserts and removes: a panic elsewhere cannot leave the map inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LiveConnections {
    pub fn register(
        &self,
        source_identity: Option<Identity>,
        source_ip: IpAddr,
        destination_workload: String,
        destination_addr: SocketAddr,
        bytes: Arc<mesh::copy::ByteCounts>,
    ) -> Registration {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        lock(&self.inner.conns).insert(
            id,
            LiveConnection {
                source_identity,
                source_ip,
                destination_workload,
                destination_addr,
                started: Instant::now(),
                bytes,
                cancel: cancel.clone(),
            },
        );
        Registration {
            id,
            inner: self.inner.clone(),
            cancelled: cancel,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<LiveConnection> {
        lock(&self.inner.conns).values().cloned().collect()
    }

    /// Re-authorizes every live connection against `state` and closes those now denied.
    /// Returns how many were closed.
    pub fn recheck(&self, state: &State) -> usize {
        let conns = lock(&self.inner.conns);
        let mut closed = 0;
        for c in conns.values() {
            let Some(destination) = state.workloads.get(&c.destination_workload) else {
                continue;
            };
            let decision = authorize(
                state,
                &Connection {
                    source_identity: c.source_identity.as_ref(),
                    source_ip: c.source_ip,
                    destination,
                    destination_addr: c.destination_addr,
                },
            );
            if let Decision::Deny { reason, .. } = decision {
                tracing::info!(
                    src.ip = %c.source_ip,
                    src.identity = ?c.source_identity,
                    dst.addr = %c.destination_addr,
                    %reason,
                    "closing live connection: policy now denies it"
                );
                c.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Closes every live connection (drain deadline passed).
    pub fn close_all(&self) {
        for c in lock(&self.inner.conns).values() {
            c.cancel.cancel();
        }
    }

    /// Waits until no connection is live.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.inner.changed.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(live: &LiveConnections, n: u16) -> Registration {
        live.register(
            None,
            IpAddr::from([10, 0, 0, 1]),
            format!("demo/pod-{n}"),
            SocketAddr::from(([10, 0, 0, 2], n)),
            Arc::default(),
        )
    }

    /// After a wave of connections closes, the table is given back (RSS returns to idle), and
    /// the connections still open are all still there.
    #[test]
    fn the_table_shrinks_after_a_wave_and_keeps_what_is_open() {
        let live = LiveConnections::default();
        let mut wave: Vec<_> = (0..5000).map(|n| register(&live, n)).collect();
        let peak = lock(&live.inner.conns).capacity();
        assert!(peak >= 5000);
        let kept = wave.split_off(4990);
        drop(wave);
        assert_eq!(live.len(), 10);
        let after = lock(&live.inner.conns).capacity();
        assert!(
            after <= 2 * SHRINK_ABOVE,
            "{after} slots kept for 10 connections (peak {peak})"
        );
        let mut open: Vec<_> = live
            .snapshot()
            .into_iter()
            .map(|c| c.destination_addr.port())
            .collect();
        open.sort_unstable();
        assert_eq!(open, (4990..5000).collect::<Vec<u16>>());
        drop(kept);
        assert!(live.is_empty());
    }
}
