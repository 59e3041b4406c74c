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
        lock(&self.inner.conns).remove(&self.id);
        self.inner.changed.notify_waiters();
    }
}

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
