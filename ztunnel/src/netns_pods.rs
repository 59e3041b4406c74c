//! Pods in named network namespaces (`/var/run/netns/<prefix><pod name>`), as the
//! virtual-cluster harness creates them: capture rules and listeners are installed inside each
//! pod's namespace, and connections made on a pod's behalf leave from it, marked so the rules
//! let them through. [`ProcNetnsFactory`] finds a real pod's namespace instead by its IP among
//! the namespaces of the node's processes (`/proc/*/ns/net`).

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh::model::Workload;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::capture::netns::SocketFactory;
use crate::capture::{CaptureConfig, NetNs, nft};
use crate::pods::{NetworkFactory, PodNetwork, unspecified_like};

/// A pod served inside its own network namespace.
#[derive(Debug)]
pub struct NetnsPod {
    netns: Arc<NetNs>,
    sockets: Arc<SocketFactory>,
    capture: CaptureConfig,
}

impl PodNetwork for NetnsPod {
    fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let listener = self
            .netns
            .tcp_listener(addr)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        TcpListener::from_std(listener)
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpStream>> {
        let (sockets, mark) = (self.sockets.clone(), self.capture.mark);
        Box::pin(async move {
            let socket = sockets
                .outbound_socket(Domain::for_address(addr), mark)
                .await?;
            socket.set_nonblocking(true)?;
            let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
            socket.connect(addr).await
        })
    }

    fn bind_udp(&self, addr: SocketAddr) -> std::io::Result<UdpSocket> {
        let socket = self
            .netns
            .run(move || {
                let socket = std::net::UdpSocket::bind(addr)?;
                socket.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(socket)
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding UDP {addr}: {e}")))?;
        UdpSocket::from_std(socket)
    }

    /// A new socket per call, made on a short-lived thread inside the namespace: only queries
    /// that go upstream pay for it (mesh names and cached answers do not).
    fn udp_socket(&self, peer: SocketAddr) -> BoxFuture<'static, std::io::Result<UdpSocket>> {
        let (netns, mark) = (self.netns.clone(), self.capture.mark);
        Box::pin(async move {
            let socket = tokio::task::spawn_blocking(move || {
                netns
                    .run(|| marked_udp_socket(peer, mark))
                    .map_err(|e| std::io::Error::other(e.to_string()))?
            })
            .await
            .map_err(std::io::Error::other)??;
            UdpSocket::from_std(socket)
        })
    }

    fn teardown(&self) {
        if let Err(e) = nft::remove(&self.netns) {
            tracing::warn!(netns = self.netns.description(), error = %e, "removing capture rules failed");
        }
    }

    fn captures(&self) -> bool {
        true
    }
}

/// Finds each pod's namespace by name and installs the capture rules in it.
#[derive(Debug, Clone)]
pub struct NamedNetnsFactory {
    prefix: String,
    capture: CaptureConfig,
}

impl NamedNetnsFactory {
    pub fn new(prefix: String) -> Self {
        Self {
            prefix,
            capture: CaptureConfig::default(),
        }
    }

    /// Sources whose connections reach pods unredirected (kubelet probes from the node).
    pub fn with_probe_sources(mut self, sources: Vec<std::net::IpAddr>) -> Self {
        self.capture.probe_sources.extend(sources);
        self
    }

    /// Whether the pods' DNS (port 53) is redirected to the DNS proxy (`DNS_CAPTURE`).
    pub fn with_dns_capture(mut self, enabled: bool) -> Self {
        self.capture.redirect_dns = enabled;
        self
    }
}

/// An unconnected UDP socket in the calling thread's namespace, on an ephemeral port, marked
/// so the capture rules let its packets through, non-blocking for tokio.
fn marked_udp_socket(peer: SocketAddr, mark: u32) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_mark(mark)?;
    socket.bind(&SocketAddr::new(unspecified_like(peer.ip()), 0).into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl NetworkFactory for NamedNetnsFactory {
    fn network_for(&self, workload: &Workload) -> Result<Arc<dyn PodNetwork>, String> {
        let name = format!("{}{}", self.prefix, workload.name);
        let netns = NetNs::from_name(&name).map_err(|e| e.to_string())?;
        let sockets = Arc::new(netns.socket_factory().map_err(|e| e.to_string())?);
        nft::install(&netns, &self.capture).map_err(|e| e.to_string())?;
        Ok(Arc::new(NetnsPod {
            netns: Arc::new(netns),
            sockets,
            capture: self.capture.clone(),
        }))
    }
}

/// Capture mode `proc`, for a real node: each pod's namespace is the one whose interfaces carry
/// the pod's IP, among the namespaces of the node's processes (`/proc/*/ns/net`; the pod's
/// sandbox process lives in it). ztunnel needs `hostPID` (to see the pods' processes) and
/// `CAP_SYS_ADMIN`, `CAP_NET_ADMIN` and `CAP_SYS_PTRACE` (to enter them and program nftables).
///
/// Pods that ran before ztunnel started are captured by the first sync like any other, and a
/// restarted ztunnel installs the same table again: [`nft::install`] replaces it atomically, so
/// re-capture is idempotent. One pass over `/proc` indexes every namespace by IP; later pods
/// are found through the index (the process is checked to still be in a namespace with that
/// IP) and only a miss scans again.
#[derive(Debug)]
pub struct ProcNetnsFactory {
    capture: CaptureConfig,
    index: std::sync::Mutex<ProcIndex>,
}

/// What the last scan of `/proc` saw.
#[derive(Debug, Default)]
struct ProcIndex {
    /// Pod IP -> a process last seen in the namespace that carries it.
    by_ip: std::collections::HashMap<std::net::IpAddr, u32>,
    /// The addresses of ztunnel's own namespace (the host's): never a pod to capture.
    own: std::collections::HashSet<std::net::IpAddr>,
}

impl Default for ProcNetnsFactory {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcNetnsFactory {
    pub fn new() -> Self {
        Self {
            capture: CaptureConfig::default(),
            index: Default::default(),
        }
    }

    /// Sources whose connections reach pods unredirected (kubelet probes from the node).
    pub fn with_probe_sources(mut self, sources: Vec<std::net::IpAddr>) -> Self {
        self.capture.probe_sources.extend(sources);
        self
    }

    /// Whether the pods' DNS (port 53) is redirected to the DNS proxy (`DNS_CAPTURE`).
    pub fn with_dns_capture(mut self, enabled: bool) -> Self {
        self.capture.redirect_dns = enabled;
        self
    }

    /// The namespace carrying `ip`: through the index, else after a fresh scan of `/proc`.
    fn find(&self, ip: std::net::IpAddr) -> Result<Option<NetNs>, String> {
        let host_network = || {
            format!(
                "{ip} is an address of ztunnel's own network namespace (the node's), not a \
                 pod's: a host-network pod cannot be captured"
            )
        };
        let cached = {
            let index = self.lock_index();
            if index.own.contains(&ip) {
                return Err(host_network());
            }
            index.by_ip.get(&ip).copied()
        };
        if let Some(pid) = cached
            && let Ok(netns) = NetNs::from_pid(pid)
            && netns.has_address(ip).unwrap_or(false)
        {
            return Ok(Some(netns));
        }
        let namespaces = crate::capture::scan_proc_namespaces().map_err(|e| e.to_string())?;
        let own = NetNs::open("/proc/self/ns/net", "ztunnel's own")
            .and_then(|netns| netns.id())
            .map_err(|e| e.to_string())?;
        let mut index = self.lock_index();
        index.by_ip.clear();
        index.own.clear();
        for namespace in &namespaces {
            for address in &namespace.addresses {
                if namespace.id == own {
                    index.own.insert(*address);
                } else {
                    index.by_ip.insert(*address, namespace.pid);
                }
            }
        }
        if index.own.contains(&ip) {
            return Err(host_network());
        }
        let Some(pid) = index.by_ip.get(&ip).copied() else {
            return Ok(None);
        };
        drop(index);
        NetNs::from_pid(pid).map(Some).map_err(|e| e.to_string())
    }

    fn lock_index(&self) -> std::sync::MutexGuard<'_, ProcIndex> {
        // The index is a cache: a panic while holding it leaves nothing inconsistent.
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl NetworkFactory for ProcNetnsFactory {
    fn network_for(&self, workload: &Workload) -> Result<Arc<dyn PodNetwork>, String> {
        let mut found = None;
        for ip in &workload.ips {
            if let Some(netns) = self.find(*ip)? {
                found = Some(netns);
                break;
            }
        }
        let netns = found
            .ok_or_else(|| {
                format!(
                    "no network namespace on this node carries pod {}'s IP {}: is the pod \
                     still starting, and does ztunnel run with hostPID (and CAP_SYS_PTRACE) \
                     so that it sees the pods' processes?",
                    workload.uid,
                    workload
                        .ips
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?
            .described_as(format!("of pod {}", workload.uid));
        let sockets = Arc::new(netns.socket_factory().map_err(|e| e.to_string())?);
        nft::install(&netns, &self.capture).map_err(|e| e.to_string())?;
        tracing::debug!(
            pod = workload.uid,
            "capture installed in the pod's network namespace"
        );
        Ok(Arc::new(NetnsPod {
            netns: Arc::new(netns),
            sockets,
            capture: self.capture.clone(),
        }))
    }
}
