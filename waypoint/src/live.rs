//! Counts the connections in flight, so drain knows when the waypoint is quiet. Every front
//! door enters it for each connection it serves.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Live {
    count: AtomicUsize,
    changed: Notify,
}

/// Leaves the count when dropped.
#[derive(Debug)]
pub struct LiveGuard<'a>(&'a Live);

impl Live {
    pub fn enter(&self) -> LiveGuard<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        LiveGuard(self)
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub async fn wait_empty(&self) {
        loop {
            let notified = self.changed.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}
