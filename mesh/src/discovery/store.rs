//! The snapshot store: one writer publishes whole [`State`]s, any number of readers take cheap
//! snapshots.
//!
//! Readers never lock: [`Store::snapshot`] is an atomic load of an `Arc`, so a reader can hold a
//! snapshot across `.await` without blocking the writer or other readers, and always sees one
//! consistent state. The writer half is not `Clone`, so there is exactly one source per store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::State;

#[derive(Debug)]
struct Shared {
    state: ArcSwap<State>,
    version: watch::Sender<u64>,
    synced: AtomicBool,
}

/// The readers' handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl Store {
    /// The current state. Hold it as long as needed: later updates replace it for new callers
    /// and never change this one.
    pub fn snapshot(&self) -> Arc<State> {
        self.shared.state.load_full()
    }

    /// Wakes on every applied state with its version, so a component can rebuild what it
    /// derives from the state (capture rules, listeners) instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.version.subscribe()
    }

    /// The number of states applied so far (0 before the first).
    pub fn version(&self) -> u64 {
        *self.shared.version.borrow()
    }

    /// True once the source has loaded its first state: until then an empty state means "not
    /// known yet", not "no workloads", and readiness must say so.
    pub fn has_synced(&self) -> bool {
        self.shared.synced.load(Ordering::Acquire)
    }
}

/// The single writer's handle, owned by the source.
#[derive(Debug)]
pub struct StoreWriter {
    shared: Arc<Shared>,
}

impl Default for StoreWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl StoreWriter {
    /// A store holding an empty, not yet synced state.
    pub fn new() -> Self {
        let (version, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                state: ArcSwap::from_pointee(State::default()),
                version,
                synced: AtomicBool::new(false),
            }),
        }
    }

    /// A reader handle for this store.
    pub fn store(&self) -> Store {
        Store {
            shared: self.shared.clone(),
        }
    }

    /// Publishes a new state, marks the store synced and returns the new version. The state is
    /// swapped in before subscribers are woken, so a woken reader sees it.
    pub fn apply(&self, state: State) -> u64 {
        self.shared.state.store(Arc::new(state));
        self.shared.synced.store(true, Ordering::Release);
        let mut version = 0;
        self.shared.version.send_modify(|v| {
            *v += 1;
            version = *v;
        });
        version
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn readers_see_applied_states_and_wake() {
        let writer = StoreWriter::new();
        let store = writer.store();
        assert!(!store.has_synced());
        assert_eq!(store.version(), 0);
        let before = store.snapshot();
        let mut rx = store.subscribe();

        let state = State {
            root_namespace: "mesh-root".into(),
            ..State::default()
        };
        assert_eq!(writer.apply(state), 1);

        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("woken")
            .expect("writer alive");
        assert_eq!(*rx.borrow(), 1);
        assert!(store.has_synced());
        assert_eq!(store.snapshot().root_namespace, "mesh-root");
        // An old snapshot is unaffected by the update.
        assert_eq!(before.root_namespace, "");
        assert_eq!(writer.apply(State::default()), 2);
        assert_eq!(store.version(), 2);
    }
}
