//! ztunnel's proxies. [`plan`] decides where an outbound connection goes; [`outbound`],
//! [`inbound`] and [`socks5`] execute connections; [`live`] tracks open ones for policy re-checks
//! and drain. [`Context`] is what every connection handler reads: the state snapshot,
//! certificates, metrics and the pods this node serves.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh::cert_manager::CertManager;
use mesh::copy::{CopyError, Side};
use mesh::discovery::Store;
use mesh::hbone::server::ManagedCertificate;
use mesh::hbone::{HBONE_PORT, HboneServer, InboundTunnel, ServerConfig};
use mesh::identity::Identity;
use mesh::metrics::{ConnectionGuard, Peer, TcpMetrics};
use mesh::model::Workload;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pods::LocalPod;

pub mod inbound;
pub mod live;
pub mod outbound;
pub mod own_ports;
pub mod plan;
pub mod socks5;

/// Port of the captured outbound listener in each pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the captured inbound plaintext listener in each pod's netns.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// Shared by every listener and connection of one ztunnel.
#[derive(Debug)]
pub struct Context {
    pub store: Store,
    pub certs: CertManager,
    pub metrics: TcpMetrics,
    pub live: live::LiveConnections,
    /// This cluster's name (`CLUSTER_ID`), sent in `baggage`.
    pub cluster_id: String,
    pub cluster_domain: String,
    pub hbone_server: ServerConfig,
    /// The pods this node serves, by IP; replaced whole after each sync.
    pub pods_by_ip: ArcSwap<HashMap<IpAddr, Arc<LocalPod>>>,
    /// The state version whose pods, listeners and policies are in force (0: none yet).
    pub applied_version: std::sync::atomic::AtomicU64,
    /// The DNS proxy, when captured pods' DNS is redirected to it (`DNS_CAPTURE`).
    pub dns: Option<Arc<crate::dns::DnsProxy>>,
    /// ztunnel's own ports: connections addressed to them are refused.
    pub own_ports: own_ports::OwnPorts,
    pub self_calls: own_ports::SelfCallMetrics,
}

impl Context {
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<LocalPod>> {
        self.pods_by_ip.load().get(&ip).cloned()
    }

    /// A mesh service's first VIP for `name.ns.svc.<cluster domain>`, `name.ns.svc` or
    /// `name.ns`.
    pub fn resolve_service_hostname(&self, name: &str) -> Option<IpAddr> {
        let name = name.trim_end_matches('.');
        let full = if name.ends_with(&format!(".svc.{}", self.cluster_domain)) {
            name.to_owned()
        } else if name.ends_with(".svc") {
            format!("{name}.{}", self.cluster_domain)
        } else {
            format!("{name}.svc.{}", self.cluster_domain)
        };
        let state = self.store.snapshot();
        state
            .services
            .values()
            .find(|s| s.hostname == full)
            .and_then(|s| s.vips.first().copied())
    }
}

/// The headers of ztunnel's 200 to a CONNECT: the destination workload's `baggage`, as
/// Istio's ztunnel answers.
pub(crate) fn accept_headers(ctx: &Context, destination: &Workload) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    let baggage = mesh::hbone::Baggage::of_workload(destination, &ctx.cluster_id).to_header();
    if let Ok(v) = baggage.parse() {
        headers.insert(mesh::hbone::headers::BAGGAGE, v);
    }
    headers
}

/// How the metrics label one side of a connection.
pub(crate) fn peer_of(workload: Option<&Arc<Workload>>, identity: Option<&Identity>) -> Peer {
    Peer::of(workload, identity)
}

/// Runs `copy` (client on side A, upstream on side B) until it ends, fails, or `cancelled`
/// fires, recording the outcome on `guard`. Returns whether both directions ended cleanly; when
/// not, the caller resets the sockets it holds ([`mesh::copy::reset`]) so an application on
/// either end sees the failure instead of a clean end of stream.
///
/// `copy` is pinned by the caller (`std::pin::pin!`) and borrowed here, so the copy's state
/// exists once in the connection's task rather than once in the caller and again here.
pub(crate) async fn copy_until_cancelled(
    copy: std::pin::Pin<&mut impl std::future::Future<Output = Result<(), CopyError>>>,
    guard: &mut ConnectionGuard,
    cancelled: &CancellationToken,
) -> bool {
    tokio::select! {
        result = copy => match result {
            Ok(()) => true,
            Err(e @ (CopyError::Read { side: Side::A, .. } | CopyError::Write { side: Side::A, .. })) => {
                guard.fail("DC", format!("client side: {e}"));
                false
            }
            Err(e) => {
                guard.fail("UC", format!("upstream side: {e}"));
                false
            }
        },
        _ = cancelled.cancelled() => {
            guard.fail("DC", "closed by ztunnel: a policy change denies it, or the drain deadline passed");
            false
        }
    }
}

/// Starts `pod`'s listeners: HBONE on each pod IP, and, when its network captures, the
/// outbound (15001) and inbound plaintext (15006) listeners inside its namespace, and the DNS
/// proxy (15053) when DNS capture is on. Everything is bound before anything is served.
pub fn start_pod_listeners(ctx: &Arc<Context>, pod: Arc<LocalPod>) -> Result<(), String> {
    let mut bound: Vec<(SocketAddr, TcpListener)> = Vec::new();
    for ip in &pod.workload.ips {
        let addr = SocketAddr::new(*ip, HBONE_PORT);
        let listener = pod
            .network
            .bind(addr)
            .map_err(|e| format!("binding HBONE {addr}: {e}"))?;
        bound.push((addr, listener));
    }
    let capture = if pod.network.captures() {
        let any = |port| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port);
        let out = pod
            .network
            .bind(any(OUTBOUND_PORT))
            .map_err(|e| format!("binding outbound {OUTBOUND_PORT}: {e}"))?;
        let inb = pod
            .network
            .bind(any(INBOUND_PLAINTEXT_PORT))
            .map_err(|e| format!("binding inbound plaintext {INBOUND_PLAINTEXT_PORT}: {e}"))?;
        Some((out, inb))
    } else {
        None
    };
    let dns = match &ctx.dns {
        Some(dns) if pod.network.captures() => Some(dns.bind(&pod)?),
        _ => None,
    };

    for (addr, listener) in bound {
        let server = HboneServer::from_listener(
            listener,
            ctx.hbone_server.clone(),
            Arc::new(ManagedCertificate {
                manager: ctx.certs.clone(),
                identity: pod.workload.identity.clone(),
            }),
        )
        .map_err(|e| format!("HBONE {addr}: {e}"))?;
        let (ctx, handler_pod) = (ctx.clone(), pod.clone());
        tokio::spawn(server.run(pod.stop.clone(), move |tunnel: InboundTunnel| {
            inbound::hbone(ctx.clone(), handler_pod.clone(), tunnel)
        }));
    }
    if let Some((out, inb)) = capture {
        spawn_captured(ctx, &pod, out, |ctx, pod, s, peer, dst| {
            Box::pin(outbound::captured(ctx, pod, s, peer, dst))
        });
        spawn_captured(ctx, &pod, inb, |ctx, pod, s, peer, dst| {
            Box::pin(inbound::plaintext(ctx, pod, s, peer, dst))
        });
    }
    if let Some(dns) = dns {
        dns.spawn();
    }
    Ok(())
}

type CapturedHandler = fn(
    Arc<Context>,
    Arc<LocalPod>,
    tokio::net::TcpStream,
    SocketAddr,
    SocketAddr,
) -> futures::future::BoxFuture<'static, ()>;

/// Accepts redirected connections, reads their original destination and hands them on.
fn spawn_captured(
    ctx: &Arc<Context>,
    pod: &Arc<LocalPod>,
    listener: TcpListener,
    handler: CapturedHandler,
) {
    let (ctx, pod) = (ctx.clone(), pod.clone());
    // Accept errors (EMFILE and friends) back off instead of spinning; the metric's label.
    let name = match listener.local_addr().map(|a| a.port()) {
        Ok(OUTBOUND_PORT) => "outbound",
        Ok(INBOUND_PLAINTEXT_PORT) => "inbound_plaintext",
        _ => "captured",
    };
    let mut acceptor = mesh::accept::Acceptor::new(listener, name);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = pod.stop.cancelled() => return,
                accepted = acceptor.accept() => accepted,
            };
            let _ = stream.set_nodelay(true);
            let original = match crate::capture::original_destination(&stream) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(pod = %pod.workload.uid, %peer, error = %e, "no original destination: closing");
                    continue;
                }
            };
            tokio::spawn(handler(ctx.clone(), pod.clone(), stream, peer, original));
        }
    });
}

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, E, Fut>(_: impl FnOnce(A, B, C, D, E) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    fn future_size3<A, B, C, Fut>(_: impl FnOnce(A, B, C) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Each open connection is one task whose size is the largest state of its future, held
    /// for the connection's life: the admission phases are boxed and freed, the copy's state is
    /// held once. (They were 8.5 KiB outbound and 3.7 KiB inbound before; 1.8 and 1.6 now.)
    #[test]
    fn connection_futures_are_small() {
        let sizes = [
            ("outbound", future_size(super::outbound::captured)),
            ("inbound plaintext", future_size(super::inbound::plaintext)),
            ("inbound HBONE", future_size3(super::inbound::hbone)),
        ];
        eprintln!("connection task futures (bytes): {sizes:?}");
        for (name, size) in sizes {
            assert!(
                size <= 3 * 1024,
                "the {name} connection future is {size} bytes: something large is held across \
                 the copy (box what only the setup needs)"
            );
        }
    }
}
