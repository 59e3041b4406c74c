//! Giving memory back to the system once the proxy is idle again.
//!
//! Both proxies allocate with mimalloc, which keeps freed memory in per-thread pages. A block
//! freed by another thread than the one that allocated it (a read buffer filled on one worker
//! and released by the HTTP/2 connection task on the other) is only collected when the owning
//! thread allocates again; a worker that goes idle after a burst therefore kept the burst's
//! memory for ever (a flood of stalled tunnels left ztunnel at twice its idle RSS after they
//! closed). [`on_worker_park`] runs when a runtime worker runs out of work and, at most once per
//! [`COLLECT_INTERVAL`] on that thread, has mimalloc collect that thread's heap and return empty
//! pages to the OS.
//!
//! [`configure`] runs before `main` (each binary invokes [`configure_allocator_before_main`])
//! and turns transparent huge pages off for the process: mimalloc asks for them on its arenas (`MADV_HUGEPAGE`), and every 2 MiB page the
//! kernel backs that way is resident as a whole however little of it is used. On this
//! project's idle ztunnel that was 13 MiB of its RSS (RssAnon 19-21 MiB with them, 6.3 MiB
//! without, `cargo bench -p mesh-tests --bench vcluster`), for a heap too small for the TLB
//! savings huge pages buy.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often a worker thread at most collects its heap.
pub const COLLECT_INTERVAL: Duration = Duration::from_secs(2);

thread_local! {
    static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// For `tokio::runtime::Builder::on_thread_park`: collects the parking thread's heap when it
/// has not done so for [`COLLECT_INTERVAL`]. Cheap otherwise (a clock read).
pub fn on_worker_park() {
    let now = Instant::now();
    let due = LAST_COLLECT.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < COLLECT_INTERVAL => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        collect();
    }
}

/// Defines, in the binary that invokes it, an `.init_array` entry that runs [`configure`]
/// before Rust's runtime has allocated anything, so the allocator's first arena is already
/// set up that way (a call at the top of `main` came too late for what was allocated before
/// it: 3 MiB of RSS).
#[macro_export]
macro_rules! configure_allocator_before_main {
    () => {
        #[allow(unsafe_code)]
        #[used]
        #[unsafe(link_section = ".init_array")]
        static CONFIGURE_ALLOCATOR: extern "C" fn() = {
            extern "C" fn configure() {
                $crate::alloc::configure();
            }
            configure
        };
    };
}

/// Set to `1` to keep transparent huge pages (the kernel's setting) for this process.
pub const TRANSPARENT_HUGEPAGES_ENV: &str = "MESH_TRANSPARENT_HUGEPAGES";

/// Process-wide allocator settings, before the proxy allocates in earnest: no transparent
/// huge pages (see the module comment) unless [`TRANSPARENT_HUGEPAGES_ENV`] is `1`. A kernel
/// that refuses is logged nowhere (logging is not up yet) and changes nothing but the memory
/// figure.
pub fn configure() {
    if std::env::var_os(TRANSPARENT_HUGEPAGES_ENV).is_some_and(|v| v == "1") {
        return;
    }
    let _ = nix::sys::prctl::set_thp_disable(true);
}

#[allow(unsafe_code)]
fn collect() {
    // SAFETY: `mi_collect` takes no pointers and has no preconditions: it frees what the
    // calling thread's mimalloc heap holds unused (`force`: and returns it to the OS at once).
    // It is sound whichever allocator the process uses globally.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
