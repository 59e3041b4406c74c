//! Where an outbound connection goes, decided as a pure function of the state snapshot.
//!
//! A service VIP resolves to one ready endpoint (the caller picks which, so tests are
//! deterministic and the proxy can spread load); an enrolled destination is reached over HBONE
//! on its pod IP, port 15008, with `:authority` podIP:targetPort, expecting its identity; any
//! other destination is passed through as plain TCP. A service with a waypoint
//! (`istio.io/use-waypoint`) is not resolved here at all: the connection goes over HBONE to one
//! of the waypoint's pods, `:authority` = the service VIP:port the client dialled, expecting the
//! waypoint's identity; the waypoint picks the endpoint. A waypoint that is missing or has no
//! ready pod makes the service unreachable (fail closed, never a silent bypass of its L7
//! policies).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh::hbone::HBONE_PORT;
use mesh::identity::Identity;
use mesh::model::{Service, State, WaypointRef, Workload};

/// The decision for one outbound connection.
#[derive(Debug, Clone, PartialEq)]
pub enum OutboundPlan {
    /// Tunnel to the destination's node over HBONE.
    Hbone {
        /// `pod-ip:15008`.
        hbone_addr: SocketAddr,
        /// `pod-ip:target-port`: the `:authority` of the CONNECT.
        authority: SocketAddr,
        /// The identity the destination must prove.
        identity: Identity,
        workload: Arc<Workload>,
        /// The service the client dialled, if it dialled a VIP.
        service: Option<Arc<Service>>,
        /// Set when the tunnel goes to the service's waypoint (then `workload` and `identity`
        /// are the waypoint's and `authority` is the VIP:port).
        waypoint: Option<WaypointRef>,
    },
    /// Plain TCP to `addr`: the destination is not in the mesh (or unknown).
    Passthrough {
        addr: SocketAddr,
        /// Set when a VIP was resolved to an endpoint outside the mesh.
        service: Option<Arc<Service>>,
        reason: &'static str,
    },
    /// Nothing can serve it; the client's connection is closed.
    Unreachable { reason: String },
}

/// Plans the connection `original_destination` (from `SO_ORIGINAL_DST`, or SOCKS5). `pick`
/// chooses among `n` candidate endpoints and returns an index below `n`.
pub fn plan_outbound(
    state: &State,
    original_destination: SocketAddr,
    pick: impl FnOnce(usize) -> usize,
) -> OutboundPlan {
    let ip = original_destination.ip();
    let port = original_destination.port();

    // 1. Through a waypoint? The waypoint resolves the service itself.
    if let Some(service) = state.service_by_vip(ip)
        && let Some(waypoint) = &service.waypoint
    {
        return plan_waypoint(state, service, waypoint, original_destination, pick);
    }

    // 2. Resolve the destination: a service VIP becomes one endpoint and its target port.
    let (service, endpoint_addr, workload) = match state.service_by_vip(ip) {
        Some(service) => match resolve_service(state, service, port, pick) {
            Ok((addr, workload)) => (Some(service.clone()), addr, workload),
            Err(reason) => return OutboundPlan::Unreachable { reason },
        },
        None => (
            None,
            original_destination,
            state.workload_by_ip(ip).cloned(),
        ),
    };

    // 3. Choose the transport.
    match workload {
        Some(workload) if workload.enrolled => OutboundPlan::Hbone {
            hbone_addr: SocketAddr::new(endpoint_addr.ip(), HBONE_PORT),
            authority: endpoint_addr,
            identity: workload.identity.clone(),
            workload,
            service,
            waypoint: None,
        },
        Some(_) => OutboundPlan::Passthrough {
            addr: endpoint_addr,
            service,
            reason: "destination workload is not in the mesh",
        },
        None => OutboundPlan::Passthrough {
            addr: endpoint_addr,
            service,
            reason: "destination is not a known workload",
        },
    }
}

/// HBONE to one ready pod of `service`'s waypoint, carrying the VIP:port as `:authority`.
fn plan_waypoint(
    state: &State,
    service: &Arc<Service>,
    waypoint: &WaypointRef,
    original_destination: SocketAddr,
    pick: impl FnOnce(usize) -> usize,
) -> OutboundPlan {
    let port = original_destination.port();
    if !service
        .ports
        .iter()
        .any(|p| p.port == port && p.protocol.eq_ignore_ascii_case("TCP"))
    {
        return OutboundPlan::Unreachable {
            reason: format!("service {} has no TCP port {port}", service.key()),
        };
    }
    let Some(waypoint_service) = state.services.get(&waypoint.service_key()) else {
        return OutboundPlan::Unreachable {
            reason: format!(
                "service {} uses waypoint {waypoint}, but no Service {waypoint} exists \
                 (check the istio.io/use-waypoint label and the waypoint's deployment)",
                service.key()
            ),
        };
    };
    let mut candidates: Vec<Arc<Workload>> = waypoint_service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| state.endpoint_workload(e))
        .collect();
    if candidates.is_empty() {
        return OutboundPlan::Unreachable {
            reason: format!(
                "service {} uses waypoint {waypoint}, which has no ready pod",
                service.key()
            ),
        };
    }
    let index = pick(candidates.len()).min(candidates.len() - 1);
    let workload = candidates.swap_remove(index);
    let Some(ip) = workload.ips.first().copied() else {
        return OutboundPlan::Unreachable {
            reason: format!("waypoint pod {} has no IP", workload.uid),
        };
    };
    OutboundPlan::Hbone {
        hbone_addr: SocketAddr::new(ip, HBONE_PORT),
        authority: original_destination,
        identity: workload.identity.clone(),
        workload,
        service: Some(service.clone()),
        waypoint: Some(waypoint.clone()),
    }
}

/// One ready endpoint of `service` for `port`, with its target port resolved.
fn resolve_service(
    state: &State,
    service: &Service,
    port: u16,
    pick: impl FnOnce(usize) -> usize,
) -> Result<(SocketAddr, Option<Arc<Workload>>), String> {
    let service_port = service
        .ports
        .iter()
        .find(|p| p.port == port && p.protocol.eq_ignore_ascii_case("TCP"))
        .ok_or_else(|| format!("service {} has no TCP port {port}", service.key()))?;
    let mut candidates: Vec<(SocketAddr, Option<Arc<Workload>>)> = service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| {
            let workload = state.endpoint_workload(e);
            let target = service_port.target_on(e, workload.as_deref())?;
            Some((SocketAddr::new(e.ip, target), workload))
        })
        .collect();
    if candidates.is_empty() {
        return Err(format!(
            "service {} has no ready endpoint for port {port}",
            service.key()
        ));
    }
    // Clamped below `len`, and `len > 0`: the index is always valid.
    let index = pick(candidates.len()).min(candidates.len() - 1);
    Ok(candidates.swap_remove(index))
}

#[cfg(test)]
mod tests;
