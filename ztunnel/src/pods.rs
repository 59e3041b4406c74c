//! The pods this node's ztunnel serves, and the network each is served in.
//!
//! For every enrolled workload on this node there is one [`LocalPod`]: its network (ztunnel's
//! own namespace in capture mode `none`, the pod's namespace otherwise), its HBONE client (so
//! outbound tunnels leave from the pod's namespace) and its listeners. [`PodManager::sync`]
//! brings the set in line with each new state snapshot: new pods get rules and listeners, pods
//! that left (deleted, un-labelled, `dataplane-mode=none`) lose them, live.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh::cert_manager::CertManager;
use mesh::hbone::{ClientConfig, HboneClient, TcpConnector};
use mesh::model::{State, Workload};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// How sockets for one pod are made.
pub trait PodNetwork: Send + Sync + std::fmt::Debug + 'static {
    /// Binds a listener for the pod on `addr`.
    fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener>;
    /// Connects on the pod's behalf (from its namespace, marked so capture lets it through).
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpStream>>;
    /// Binds a UDP socket for the pod on `addr` (the DNS proxy's listener).
    fn bind_udp(&self, addr: SocketAddr) -> std::io::Result<UdpSocket> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket)
    }
    /// A UDP socket on an ephemeral port for talking to `peer` on the pod's behalf (from its
    /// namespace, marked so capture lets it through): the DNS proxy's upstream queries.
    fn udp_socket(&self, peer: SocketAddr) -> BoxFuture<'static, std::io::Result<UdpSocket>> {
        let any = SocketAddr::new(unspecified_like(peer.ip()), 0);
        Box::pin(UdpSocket::bind(any))
    }
    /// Removes whatever the network installed (capture rules). Called when the pod leaves.
    fn teardown(&self) {}
    /// True when the pod's traffic is redirected to ztunnel (15001/15006 listeners needed).
    fn captures(&self) -> bool {
        false
    }
}

/// `0.0.0.0` or `[::]`, whichever family `ip` is.
pub fn unspecified_like(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Capture mode `none`: everything in ztunnel's own network namespace. Connections made for a
/// pod leave from the pod's IP (`source`) when it is an address of this host of the same kind
/// (loopback or not) as the destination, as they would from the pod's own network: the far side
/// then learns the client from the connection itself, not from a header it cannot trust.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostNetwork {
    pub source: Option<std::net::IpAddr>,
}

impl PodNetwork for HostNetwork {
    fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpStream>> {
        let source = self.source.filter(|s| {
            s.is_ipv4() == addr.is_ipv4() && s.is_loopback() == addr.ip().is_loopback()
        });
        Box::pin(async move {
            let Some(source) = source else {
                return TcpStream::connect(addr).await;
            };
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            match socket.bind(SocketAddr::new(source, 0)) {
                Ok(()) => socket.connect(addr).await,
                // The pod's IP is not an address of this host (a local run with made-up IPs).
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    TcpStream::connect(addr).await
                }
                Err(e) => Err(e),
            }
        })
    }
}

/// Adapts a pod's network to the HBONE client's dialer.
#[derive(Debug)]
struct PodConnector(Arc<dyn PodNetwork>);

impl TcpConnector for PodConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpStream>> {
        self.0.connect(addr)
    }
}

/// One enrolled pod on this node.
#[derive(Debug)]
pub struct LocalPod {
    pub workload: Arc<Workload>,
    pub network: Arc<dyn PodNetwork>,
    pub hbone: HboneClient,
    /// Cancelled when the pod leaves the mesh (never on drop: a metadata update replaces the
    /// `LocalPod` while its listeners keep running).
    pub stop: CancellationToken,
}

/// Makes the network for a pod that joins, or says why it cannot.
pub trait NetworkFactory: Send + Sync + 'static {
    fn network_for(&self, workload: &Workload) -> Result<Arc<dyn PodNetwork>, String>;
}

/// Capture mode `none`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostNetworkFactory;

impl NetworkFactory for HostNetworkFactory {
    fn network_for(&self, workload: &Workload) -> Result<Arc<dyn PodNetwork>, String> {
        Ok(Arc::new(HostNetwork {
            source: workload.ips.first().copied(),
        }))
    }
}

/// Starts the listeners of a pod that joined.
pub type ListenerStarter = Arc<dyn Fn(Arc<LocalPod>) -> Result<(), String> + Send + Sync>;

/// Keeps the set of [`LocalPod`]s in line with the state.
pub struct PodManager {
    node: String,
    certs: CertManager,
    client_config: ClientConfig,
    factory: Arc<dyn NetworkFactory>,
    start_listeners: ListenerStarter,
    pods: HashMap<String, Arc<LocalPod>>,
    /// Enrolled pods whose capture or listeners could not be set up (netns not there yet,
    /// port taken): retried on every sync, and `sync` is called periodically while any remain.
    failed: std::collections::HashSet<String>,
    /// Parent of every pod's `stop`: cancelling it (drain) stops all listeners.
    parent: CancellationToken,
}

impl std::fmt::Debug for PodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodManager")
            .field("node", &self.node)
            .field("pods", &self.pods.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PodManager {
    pub fn new(
        node: String,
        certs: CertManager,
        client_config: ClientConfig,
        factory: Arc<dyn NetworkFactory>,
        start_listeners: ListenerStarter,
        parent: CancellationToken,
    ) -> Self {
        Self {
            node,
            certs,
            client_config,
            factory,
            start_listeners,
            pods: HashMap::new(),
            failed: std::collections::HashSet::new(),
            parent,
        }
    }

    /// True while some enrolled pod could not be set up and should be retried.
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Every served pod by IP, for lookups on the data path.
    pub fn by_ip(&self) -> HashMap<std::net::IpAddr, Arc<LocalPod>> {
        self.pods
            .values()
            .flat_map(|p| p.workload.ips.iter().map(move |ip| (*ip, p.clone())))
            .collect()
    }

    pub fn pod(&self, uid: &str) -> Option<Arc<LocalPod>> {
        self.pods.get(uid).cloned()
    }

    pub fn pods(&self) -> Vec<Arc<LocalPod>> {
        self.pods.values().cloned().collect()
    }

    /// Adds pods that joined, removes pods that left, restarts pods whose workload changed in a
    /// way that matters (IPs). Returns (added, removed).
    pub fn sync(&mut self, state: &State) -> (usize, usize) {
        let wanted: HashMap<&String, &Arc<Workload>> = state
            .workloads
            .iter()
            .filter(|(_, w)| w.node == self.node && w.enrolled)
            .collect();
        let mut removed = 0;
        self.pods.retain(|uid, pod| {
            let keep = wanted
                .get(uid)
                .is_some_and(|w| w.ips == pod.workload.ips);
            if !keep {
                tracing::info!(pod = %uid, "pod left the mesh on this node: removing capture and listeners");
                pod.stop.cancel();
                pod.network.teardown();
                removed += 1;
            }
            keep
        });
        let mut added = 0;
        self.failed.retain(|uid| wanted.contains_key(uid));
        for (uid, workload) in wanted {
            if let Some(existing) = self.pods.get_mut(uid) {
                // Labels and other metadata may change without re-capturing.
                if existing.workload != *workload {
                    let pod = LocalPod {
                        workload: workload.clone(),
                        network: existing.network.clone(),
                        hbone: existing.hbone.clone(),
                        stop: existing.stop.clone(),
                    };
                    // The listeners keep running (they share `stop`); they read workload
                    // metadata from each connection's state snapshot.
                    *existing = Arc::new(pod);
                }
                continue;
            }
            let network = match self.factory.network_for(workload) {
                Ok(n) => n,
                Err(e) => {
                    if self.failed.insert(uid.clone()) {
                        tracing::warn!(pod = %uid, error = %e, "cannot capture pod yet; retrying");
                    }
                    continue;
                }
            };
            self.certs.prefetch(&workload.identity);
            let hbone = HboneClient::with_connector(
                self.client_config.clone(),
                Arc::new(self.certs.clone()),
                Arc::new(PodConnector(network.clone())),
            );
            let pod = Arc::new(LocalPod {
                workload: workload.clone(),
                network,
                hbone,
                stop: self.parent.child_token(),
            });
            match (self.start_listeners)(pod.clone()) {
                Ok(()) => {
                    self.failed.remove(uid);
                    tracing::info!(pod = %uid, ips = ?workload.ips, identity = %workload.identity, "pod joined the mesh on this node");
                    self.pods.insert(uid.clone(), pod);
                    added += 1;
                }
                Err(e) => {
                    if self.failed.insert(uid.clone()) {
                        tracing::warn!(pod = %uid, error = %e, "cannot start the pod's listeners yet; retrying");
                    }
                    pod.stop.cancel();
                    pod.network.teardown();
                }
            }
        }
        // Certificates of identities no local pod uses any more.
        let in_use: std::collections::HashSet<_> = self
            .pods
            .values()
            .map(|p| p.workload.identity.clone())
            .collect();
        for summary in self.certs.summaries() {
            if !in_use.contains(&summary.identity) {
                self.certs.forget(&summary.identity);
            }
        }
        (added, removed)
    }

    /// Stops every pod's listeners on shutdown, leaving capture rules in place: until the
    /// next ztunnel binds the listeners again, the pods' traffic fails instead of silently
    /// bypassing the mesh.
    pub fn stop_all(&mut self) {
        for (_, pod) in self.pods.drain() {
            pod.stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use mesh::ca::{CertificateSigner, SignError};
    use mesh::identity::Identity;

    struct NoCa;
    impl CertificateSigner for NoCa {
        fn sign<'a>(
            &'a self,
            identity: &'a Identity,
            _: String,
            _: std::time::Duration,
        ) -> BoxFuture<'a, Result<Vec<String>, SignError>> {
            Box::pin(async move { Err(SignError::EmptyChain(identity.clone())) })
        }
    }

    /// Fails the first `fail` attempts, like a netns that is not there yet.
    struct Flaky {
        fail: usize,
        calls: AtomicUsize,
        teardowns: Arc<AtomicUsize>,
    }

    #[derive(Debug)]
    struct Recorded(Arc<AtomicUsize>);
    impl PodNetwork for Recorded {
        fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
            HostNetwork::default().bind(addr)
        }
        fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpStream>> {
            HostNetwork::default().connect(addr)
        }
        fn teardown(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl NetworkFactory for Flaky {
        fn network_for(&self, _: &Workload) -> Result<Arc<dyn PodNetwork>, String> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
                Err("netns not found".into())
            } else {
                Ok(Arc::new(Recorded(self.teardowns.clone())))
            }
        }
    }

    fn state(enrolled: bool) -> State {
        let w = Arc::new(Workload {
            uid: "demo/web".into(),
            name: "web".into(),
            namespace: "demo".into(),
            ips: vec!["10.1.0.5".parse().unwrap()],
            node: "node-a".into(),
            service_account: "web".into(),
            identity: Identity::new("cluster.local", "demo", "web").unwrap(),
            labels: Default::default(),
            enrolled,
            workload_name: "web".into(),
            workload_kind: "deployment".into(),
            canonical_service: "web".into(),
            canonical_revision: "latest".into(),
            named_ports: Default::default(),
        });
        let mut s = State::default();
        s.workloads.insert(w.uid.clone(), w);
        s
    }

    fn manager(factory: Arc<dyn NetworkFactory>, listeners_ok: bool) -> PodManager {
        let certs = CertManager::new(
            Arc::new(NoCa),
            Default::default(),
            &mut prometheus_client::registry::Registry::default(),
        );
        PodManager::new(
            "node-a".into(),
            certs,
            ClientConfig::default(),
            factory,
            Arc::new(move |_| {
                if listeners_ok {
                    Ok(())
                } else {
                    Err("port in use".into())
                }
            }),
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn a_pod_that_cannot_be_captured_yet_is_retried() {
        let teardowns = Arc::new(AtomicUsize::new(0));
        let factory = Arc::new(Flaky {
            fail: 2,
            calls: AtomicUsize::new(0),
            teardowns: teardowns.clone(),
        });
        let mut m = manager(factory, true);
        assert_eq!(m.sync(&state(true)), (0, 0));
        assert!(m.has_failures());
        assert_eq!(m.sync(&state(true)), (0, 0));
        assert_eq!(
            m.sync(&state(true)),
            (1, 0),
            "third attempt captures the pod"
        );
        assert!(!m.has_failures());
        // Leaving the mesh removes its capture.
        assert_eq!(m.sync(&state(false)), (0, 1));
        assert_eq!(teardowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn failed_listeners_leave_no_capture_behind_and_a_departed_pod_stops_retrying() {
        let teardowns = Arc::new(AtomicUsize::new(0));
        let factory = Arc::new(Flaky {
            fail: 0,
            calls: AtomicUsize::new(0),
            teardowns: teardowns.clone(),
        });
        let mut m = manager(factory, false);
        assert_eq!(m.sync(&state(true)), (0, 0));
        assert_eq!(
            teardowns.load(Ordering::SeqCst),
            1,
            "rules removed when listeners fail"
        );
        assert!(m.has_failures());
        assert_eq!(m.sync(&State::default()), (0, 0));
        assert!(!m.has_failures(), "a deleted pod is not retried");
    }
}
