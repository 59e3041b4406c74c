//! Opaque TCP through the engine: the waypoint's AuthorizationPolicies (on what a TCP
//! connection has: source and destination), then the service's `tcp` routes (weighted
//! destinations) pick a destination, the upstream layer picks an endpoint of it (subset, load
//! balancing, outlier state), and bytes are copied both ways. One `istio_tcp_*` record per
//! connection with `reporter="waypoint"`.

use http::HeaderMap;
use mesh::metrics::{ConnectionGuard, ConnectionInfo, Peer};
use mesh::model::Service;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Downstream, Engine};
use crate::upstream::{ClusterKey, HashInput};

/// Proxies one tunnel's bytes at L4.
pub(super) async fn proxy<S>(engine: &Engine, downstream: &Downstream, client: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let routing = engine.routes.load_full();
    let mut rng = fastrand::Rng::new();
    let service = &downstream.service;
    // The record is opened once the endpoint is known, so that it names the destination
    // workload (as Istio's waypoint reports it); a connection that fails before that is
    // recorded without one.
    let info = |destination: Peer, service: &std::sync::Arc<Service>| ConnectionInfo {
        reporter: engine.identity.reporter,
        source: Peer::of(
            downstream.source.workload.as_ref(),
            downstream.source.identity.as_ref(),
        ),
        destination,
        service: Some(service.clone()),
        mutual_tls: downstream.mutual_tls,
        source_addr: std::net::SocketAddr::new(
            downstream.source.ip.unwrap_or(downstream.peer_addr.ip()),
            0,
        ),
        destination_addr: downstream.vip,
    };
    let failed = |flag: &'static str, reason: String| {
        let mut guard = ConnectionGuard::new(&engine.tcp_metrics, info(Peer::default(), service));
        guard.fail(flag, reason);
    };
    // The waypoint's AuthorizationPolicies apply to TCP as to HTTP. A connection has no
    // method, path or host: an ALLOW rule that needs one matches nothing (as in Istio).
    if let Err(denied) = engine.authorize(downstream, &routing.state, None) {
        failed("RBAC", denied);
        return;
    }
    let selected = match &downstream.scope {
        // The ingress: the Gateway's VirtualServices (`tls` routes by SNI, or `tcp` routes).
        Some(scope) => routing
            .table
            .select_gateway_tcp(
                scope,
                downstream.sni.as_deref(),
                downstream.port.port,
                &downstream.source,
                downstream.vip.ip(),
                &mut rng,
            )
            .map(|(_, d)| d)
            .ok_or_else(|| match &downstream.sni {
                Some(sni) => format!(
                    "no tls route of a VirtualService bound to {} takes SNI {sni:?} on port {}",
                    gateways(scope),
                    downstream.port.port
                ),
                None if scope.servers.iter().any(|s| s.passthrough) => format!(
                    "the client sent no SNI; a PASSTHROUGH server of {} routes by SNI only",
                    gateways(scope)
                ),
                None => format!(
                    "no tcp route of a VirtualService bound to {} takes port {}",
                    gateways(scope),
                    downstream.port.port
                ),
            }),
        None => routing
            .table
            .select_tcp(
                &service.key(),
                downstream.port.port,
                &downstream.source,
                downstream.vip.ip(),
                &mut rng,
            )
            .ok_or_else(|| format!("no TCP route for {}", service.key())),
    };
    let destination = match selected {
        Ok(d) => d,
        Err(reason) => {
            failed("NR", reason);
            return;
        }
    };
    if destination.destination.host == mesh::model::UNRESOLVED_BACKEND {
        failed(
            "NC",
            "the route's backend cannot be resolved (not a Service, or in another namespace without a ReferenceGrant; see the route's status): connection refused".to_owned(),
        );
        return;
    }
    let target_service = routing
        .hosts
        .get(&destination.destination.host)
        .and_then(|key| routing.state.services.get(key))
        .cloned();
    let Some(target_service) = target_service else {
        failed(
            "NC",
            format!(
                "TCP route destination {} is not a known service",
                destination.destination.host
            ),
        );
        return;
    };
    let port = destination.destination.port.unwrap_or(downstream.port.port);
    let key = ClusterKey {
        service: target_service.key(),
        subset: destination.destination.subset.clone(),
        port,
    };
    let empty = HeaderMap::new();
    let hash = HashInput {
        source_ip: downstream.source.ip,
        headers: &empty,
        query: None,
        previous_hosts: &[],
    };
    let upstream = match engine.upstreams.connect_tcp(&key, &hash).await {
        Ok(upstream) => upstream,
        Err(e) => {
            failed(e.response_flag(), e.to_string());
            return;
        }
    };
    let workload = upstream.workload().cloned();
    let mut guard = ConnectionGuard::new(
        &engine.tcp_metrics,
        info(
            Peer::of(workload.as_ref(), workload.as_ref().map(|w| &w.identity)),
            // The ingress names the service it routed to (its own is what the client dialled),
            // as the waypoint names the service it serves.
            if downstream.scope.is_some() {
                &target_service
            } else {
                service
            },
        ),
    );
    let bytes = guard.bytes.clone();
    if let Err(e) = mesh::copy::copy_bidirectional(client, upstream, &bytes).await {
        guard.fail("UR", e.to_string());
    }
}

/// The Gateways of an ingress connection's servers, for messages.
fn gateways(scope: &crate::route::ServerScope) -> String {
    let mut names: Vec<&str> = scope.servers.iter().map(|s| s.gateway.as_str()).collect();
    names.dedup();
    format!("Gateway {}", names.join(", "))
}
