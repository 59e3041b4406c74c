//! How the waypoint reaches an endpoint: HBONE to the endpoint's ztunnel (`pod-ip:15008`,
//! `:authority` = `pod-ip:target-port`) with the waypoint's own certificate, expecting the
//! endpoint's identity, when the endpoint is in the mesh; plain TCP otherwise. The destination
//! ztunnel therefore authorizes the waypoint's identity (as in Istio). Each CONNECT carries the
//! waypoint's own `baggage` (cluster, namespace, name), as Istio's proxies describe themselves.
//! An ingress gateway's target that is a service's waypoint (`UpstreamTarget::authority` set)
//! is reached over HBONE at its address with that authority (the service's VIP:port),
//! expecting the waypoint's identity, whether or not the waypoint's pod is captured.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh::hbone::{Baggage, ConnectRequest, HBONE_PORT, HboneAuthority, HboneClient, headers};
use mesh::identity::Identity;
use mesh::model::{WaypointRef, Workload};

use crate::upstream::{Connector, Io, UpstreamTarget};

/// The production [`Connector`].
#[derive(Debug, Clone)]
pub struct HboneConnector {
    pub client: HboneClient,
    /// The waypoint's identity, presented to endpoints.
    pub identity: Identity,
    /// The request headers of every CONNECT (`baggage`).
    headers: http::HeaderMap,
}

impl HboneConnector {
    /// A connector for the waypoint `waypoint` in cluster `cluster_id`.
    pub fn new(
        client: HboneClient,
        identity: Identity,
        waypoint: &WaypointRef,
        cluster_id: &str,
    ) -> Self {
        let baggage = Baggage {
            cluster: Some(cluster_id.to_owned()),
            namespace: Some(waypoint.namespace.clone()),
            workload: Some(("deployment".into(), waypoint.name.clone())),
            service: Some(waypoint.name.clone()),
            version: None,
        };
        let mut request_headers = http::HeaderMap::new();
        // Names and the cluster id are validated to be header-safe; a value that is not is
        // left out rather than failing every connection.
        if let Ok(v) = baggage.to_header().parse() {
            request_headers.insert(headers::BAGGAGE, v);
        }
        Self {
            client,
            identity,
            headers: request_headers,
        }
    }
}

/// Where a tunnel to `target` goes: the workload whose identity to expect, its HBONE address
/// and the `:authority`; `None` when the target is reached over plain TCP (not in the mesh).
fn hbone_route(target: &UpstreamTarget) -> Option<(&Arc<Workload>, SocketAddr, SocketAddr)> {
    let workload = target.workload.as_ref()?;
    match target.authority {
        Some(authority) => Some((workload, target.addr, authority)),
        None => workload.enrolled.then(|| {
            (
                workload,
                SocketAddr::new(target.addr.ip(), HBONE_PORT),
                target.addr,
            )
        }),
    }
}

impl Connector for HboneConnector {
    fn connect(&self, target: &UpstreamTarget) -> BoxFuture<'static, std::io::Result<Box<dyn Io>>> {
        let addr = target.addr;
        let tunnel = hbone_route(target)
            .map(|(workload, hbone_addr, authority)| (workload.clone(), hbone_addr, authority));
        let client = self.client.clone();
        let source = self.identity.clone();
        let headers = self.headers.clone();
        Box::pin(async move {
            match tunnel {
                Some((workload, hbone_addr, authority)) => {
                    let request = ConnectRequest {
                        source,
                        destination: workload.identity.clone(),
                        hbone_addr,
                        authority: HboneAuthority(authority),
                        headers,
                    };
                    let stream = client.connect(request).await.map_err(|e| {
                        let kind = match e.status() {
                            Some(http::StatusCode::UNAUTHORIZED) => {
                                std::io::ErrorKind::PermissionDenied
                            }
                            _ => std::io::ErrorKind::ConnectionRefused,
                        };
                        std::io::Error::new(kind, e.to_string())
                    })?;
                    Ok(Box::new(stream) as Box<dyn Io>)
                }
                None => {
                    let stream = tokio::net::TcpStream::connect(addr).await?;
                    let _ = stream.set_nodelay(true);
                    Ok(Box::new(stream) as Box<dyn Io>)
                }
            }
        })
    }

    fn tunnelled(&self, target: &UpstreamTarget) -> bool {
        hbone_route(target).is_some()
    }
}
