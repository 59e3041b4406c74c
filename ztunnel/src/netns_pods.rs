//! Pods in named network namespaces (`/var/run/netns/<prefix><pod name>`), as the
//! virtual-cluster harness creates them: capture rules and listeners are installed inside each
//! pod's namespace, and connections made on a pod's behalf leave from it, marked so the rules
//! let them through. (Finding a real pod's namespace from `/proc` is the Kubernetes issue's.)

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh::model::Workload;
use socket2::Domain;
use tokio::net::{TcpListener, TcpStream};

use crate::capture::netns::SocketFactory;
use crate::capture::{CaptureConfig, NetNs, nft};
use crate::pods::{NetworkFactory, PodNetwork};

/// A pod served inside its own network namespace.
#[derive(Debug)]
pub struct NetnsPod {
    netns: NetNs,
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
}

impl NetworkFactory for NamedNetnsFactory {
    fn network_for(&self, workload: &Workload) -> Result<Arc<dyn PodNetwork>, String> {
        let name = format!("{}{}", self.prefix, workload.name);
        let netns = NetNs::from_name(&name).map_err(|e| e.to_string())?;
        let sockets = Arc::new(netns.socket_factory().map_err(|e| e.to_string())?);
        nft::install(&netns, &self.capture).map_err(|e| e.to_string())?;
        Ok(Arc::new(NetnsPod {
            netns,
            sockets,
            capture: self.capture.clone(),
        }))
    }
}
