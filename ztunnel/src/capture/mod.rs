//! In-pod traffic capture: ztunnel serves each enrolled pod from the node process but inside the
//! pod's network namespace.
//!
//! [`NetNs`] enters a namespace on a short-lived thread and opens sockets there; [`nft`] installs
//! and removes the redirect rules (nftables over netlink, no external binaries);
//! [`original_destination`] recovers where a redirected connection was going. Which pods to
//! capture, and the proxies behind the listeners, live elsewhere.

mod netlink;
pub mod netns;
pub mod nft;
mod orig_dst;

use std::io;
use std::net::SocketAddr;

pub use netns::{NetNs, NetNsId, ProcNamespace, find_netns_by_ip, scan_proc_namespaces};
pub use nft::CaptureConfig;
pub use orig_dst::original_destination;

/// What went wrong while entering a pod's network namespace or programming its capture rules.
///
/// Every message names the namespace and says what the operator should check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace file could not be opened (the pod, or the process, is gone).
    #[error(
        "cannot open network namespace {netns}: {source}; does the pod (or process) still exist, \
         and does ztunnel see the host's /proc and /var/run/netns (hostPID, host mounts)?"
    )]
    Open {
        /// The namespace, as described by [`NetNs::description`].
        netns: String,
        /// The error from `open(2)`.
        #[source]
        source: io::Error,
    },
    /// The file opened is not a namespace (nsfs) file.
    #[error(
        "{netns} is not a network namespace file; expected /proc/<pid>/ns/net or a bind mount \
         such as /var/run/netns/<name> (is the entry stale, left behind by a deleted netns?)"
    )]
    NotANamespace {
        /// The namespace, as described by [`NetNs::description`].
        netns: String,
    },
    /// A namespace name that cannot be a file under `/var/run/netns`.
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// `setns(2)` refused to switch into the namespace.
    #[error(
        "cannot enter network namespace {netns}: {source}; {hint}",
        hint = enter_hint(.source)
    )]
    Enter {
        /// The namespace.
        netns: String,
        /// The error from `setns(2)`.
        #[source]
        source: io::Error,
    },
    /// No thread could be started to enter the namespace.
    #[error("cannot start a thread to enter network namespace {netns}: {source}")]
    SpawnThread {
        /// The namespace.
        netns: String,
        /// The error from the thread builder.
        #[source]
        source: io::Error,
    },
    /// A socket could not be created or configured inside the namespace.
    #[error(
        "cannot create {what} in network namespace {netns}: {source}; is ztunnel running with \
         CAP_NET_ADMIN (needed for SO_MARK)?"
    )]
    Socket {
        /// The namespace.
        netns: String,
        /// Which socket, for the operator.
        what: &'static str,
        /// The error from the socket call.
        #[source]
        source: io::Error,
    },
    /// A listener could not be bound inside the namespace.
    #[error(
        "cannot listen on {addr} in network namespace {netns}: {source}; is another process in \
         the pod (or an older ztunnel) already bound to that port?"
    )]
    Bind {
        /// The namespace.
        netns: String,
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The error from `bind(2)` or `listen(2)`.
        #[source]
        source: io::Error,
    },
    /// The kernel refused an nftables request.
    #[error(
        "nftables: cannot {action} in network namespace {netns}: {source}; is ztunnel running \
         with CAP_NET_ADMIN, and does the kernel have nf_tables with NAT and redirect \
         (nft_nat, nft_redir)?"
    )]
    Nftables {
        /// What we asked for, e.g. "install the capture table".
        action: String,
        /// The namespace.
        netns: String,
        /// The error the kernel returned, or the netlink socket error.
        #[source]
        source: io::Error,
    },
    /// Listing interface addresses over netlink failed.
    #[error("cannot list the addresses of network namespace {netns}: {source}")]
    ListAddresses {
        /// The namespace.
        netns: String,
        /// The netlink error.
        #[source]
        source: io::Error,
    },
    /// Scanning `/proc` for namespaces failed.
    #[error(
        "cannot scan {path} for network namespaces: {source}; does ztunnel run with hostPID and \
         CAP_SYS_PTRACE so that it sees every pod's processes?"
    )]
    Scan {
        /// The path being read.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn enter_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(nix::libc::EPERM) => "is ztunnel running with CAP_SYS_ADMIN (and CAP_NET_ADMIN)?",
        Some(nix::libc::EINVAL) => "the file is not a network namespace",
        _ => "is ztunnel running with CAP_SYS_ADMIN and CAP_NET_ADMIN?",
    }
}

/// The result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;
