//! How the waypoint reaches an endpoint: HBONE to the endpoint's ztunnel (`pod-ip:15008`,
//! `:authority` = `pod-ip:target-port`) with the waypoint's own certificate, expecting the
//! endpoint's identity, when the endpoint is in the mesh; plain TCP otherwise. The destination
//! ztunnel therefore authorizes the waypoint's identity (as in Istio). Each CONNECT carries the
//! waypoint's own `baggage` (cluster, namespace, name), as Istio's proxies describe themselves.

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

/// The endpoint's workload when it is reached over HBONE (enrolled in the mesh).
fn hbone_workload(target: &UpstreamTarget) -> Option<&Arc<Workload>> {
    target.workload.as_ref().filter(|w| w.enrolled)
}

impl Connector for HboneConnector {
    fn connect(&self, target: &UpstreamTarget) -> BoxFuture<'static, std::io::Result<Box<dyn Io>>> {
        let addr = target.addr;
        let enrolled = hbone_workload(target).cloned();
        let client = self.client.clone();
        let source = self.identity.clone();
        let headers = self.headers.clone();
        Box::pin(async move {
            match enrolled {
                Some(workload) => {
                    let request = ConnectRequest {
                        source,
                        destination: workload.identity.clone(),
                        hbone_addr: SocketAddr::new(addr.ip(), HBONE_PORT),
                        authority: HboneAuthority(addr),
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
        hbone_workload(target).is_some()
    }
}
