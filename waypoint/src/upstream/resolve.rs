//! Which endpoints make up a cluster and which traffic policy applies: a pure function of the
//! state.
//!
//! A cluster is (service, subset, service port). Its endpoints are the service's ready
//! endpoints whose workload carries every label of the subset, each at the target port of that
//! service port: a number, or a container port name resolved per endpoint (the EndpointSlice's
//! port of the same name as the service port, else the workload's named container port). The
//! first DestinationRule (the state keeps them oldest first) whose `host` is the service's
//! hostname applies; its subset's policy is already merged with the top level by the
//! translation; no rule means Istio's defaults.
//!
//! At an ingress gateway a service whose waypoint is to see ingress traffic
//! (`istio.io/ingress-use-waypoint`, [`State::ingress_waypoint`]) resolves instead to the ready
//! pods of its waypoint's Service at their HBONE port, with the service's VIP:port as the
//! tunnel's `:authority`, as ztunnel sends a mesh client's traffic there. The waypoint then
//! routes it (subsets included: a subset is not applied at the gateway, as in Istio, where the
//! waypoint's routes decide). The DestinationRule's traffic policy still applies to the
//! gateway's connections. A waypoint that is missing or has no ready pod leaves the cluster
//! without endpoints (503, fail closed): its policies are never bypassed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh::hbone::HBONE_PORT;
use mesh::model::{Service, State, TrafficPolicy, WaypointRef, Workload};

use super::ClusterKey;

/// The resolved view of one cluster.
#[derive(Debug, Clone)]
pub(super) struct ClusterSpec {
    /// The service's hostname (for messages).
    pub(super) hostname: String,
    /// `namespace/name` of the DestinationRule that applies.
    pub(super) destination_rule: Option<String>,
    pub(super) policy: TrafficPolicy,
    pub(super) endpoints: Vec<ResolvedEndpoint>,
    /// Set when the endpoints are the service's waypoint's pods (ingress only).
    pub(super) via_waypoint: Option<ViaWaypoint>,
}

/// The cluster's traffic goes through the service's waypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ViaWaypoint {
    pub(super) waypoint: WaypointRef,
    /// The service's VIP and port: the `:authority` of each tunnel, by which the waypoint
    /// knows the service.
    pub(super) authority: SocketAddr,
}

#[derive(Debug, Clone)]
pub(super) struct ResolvedEndpoint {
    pub(super) addr: SocketAddr,
    pub(super) workload: Option<Arc<Workload>>,
}

/// Why a cluster does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Unresolved {
    /// The service is gone: the cluster can be forgotten.
    NoService(String),
    /// The service exists but not this port or subset.
    Invalid(String),
}

/// Which side of the mesh the clusters are resolved for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A waypoint: always the service's endpoints (it is the waypoint).
    Waypoint,
    /// An ingress gateway: the service's waypoint when the service asks for it.
    Ingress,
}

pub(super) fn resolve(
    state: &State,
    key: &ClusterKey,
    side: Side,
) -> Result<ClusterSpec, Unresolved> {
    let service = state
        .services
        .get(&key.service)
        .ok_or_else(|| Unresolved::NoService(format!("service {} not found", key.service)))?;
    let service_port = service
        .ports
        .iter()
        .find(|p| p.port == key.port && p.protocol.eq_ignore_ascii_case("TCP"))
        .ok_or_else(|| {
            Unresolved::Invalid(format!(
                "service {} has no TCP port {}",
                key.service, key.port
            ))
        })?;
    let rule = state
        .destination_rules
        .iter()
        .find(|dr| dr.host == service.hostname);
    let (policy, labels) = match &key.subset {
        None => (
            rule.map(|dr| dr.traffic_policy.clone()).unwrap_or_default(),
            None,
        ),
        Some(name) => {
            let rule = rule.ok_or_else(|| {
                Unresolved::Invalid(format!(
                    "subset {name} of {}: no DestinationRule for this host",
                    service.hostname
                ))
            })?;
            let subset = rule.subset(name).ok_or_else(|| {
                Unresolved::Invalid(format!(
                    "subset {name} of {}: DestinationRule {} defines no such subset",
                    service.hostname,
                    rule.key()
                ))
            })?;
            (subset.traffic_policy.clone(), Some(&subset.labels))
        }
    };

    if side == Side::Ingress
        && let Some(waypoint) = state.ingress_waypoint(service)
    {
        let (via, waypoint_service) = via_waypoint(state, service, key.port, waypoint)?;
        return Ok(ClusterSpec {
            hostname: service.hostname.clone(),
            destination_rule: rule.map(|dr| dr.key()),
            policy,
            endpoints: waypoint_endpoints(state, waypoint_service),
            via_waypoint: Some(via),
        });
    }

    let mut seen = HashSet::new();
    let endpoints = service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| {
            let workload = state.endpoint_workload(e);
            if let Some(labels) = labels {
                let carries_all = workload.as_ref().is_some_and(|w| {
                    labels
                        .iter()
                        .all(|(k, v)| w.labels.get(k).is_some_and(|have| have == v))
                });
                if !carries_all {
                    return None;
                }
            }
            let port = service_port.target_on(e, workload.as_deref())?;
            let addr = SocketAddr::new(e.ip, port);
            seen.insert(addr)
                .then_some(ResolvedEndpoint { addr, workload })
        })
        .collect();
    Ok(ClusterSpec {
        hostname: service.hostname.clone(),
        destination_rule: rule.map(|dr| dr.key()),
        policy,
        endpoints,
        via_waypoint: None,
    })
}

/// The tunnel's `:authority` for `service`'s `port` through `waypoint`: the service's first
/// VIP (a headless service has none, and a waypoint cannot know it by address); and the
/// waypoint's own Service.
fn via_waypoint<'s>(
    state: &'s State,
    service: &Service,
    port: u16,
    waypoint: &WaypointRef,
) -> Result<(ViaWaypoint, &'s Service), Unresolved> {
    let vip = service.vips.first().ok_or_else(|| {
        Unresolved::Invalid(format!(
            "service {} asks for its waypoint {waypoint} (istio.io/ingress-use-waypoint) but \
             has no ClusterIP for the waypoint to know it by",
            service.key()
        ))
    })?;
    let waypoint_service = state.services.get(&waypoint.service_key()).ok_or_else(|| {
        Unresolved::Invalid(format!(
            "service {} asks for its waypoint {waypoint} (istio.io/ingress-use-waypoint), but \
             no Service {waypoint} exists (check the istio.io/use-waypoint label and the \
             waypoint's deployment)",
            service.key()
        ))
    })?;
    let via = ViaWaypoint {
        waypoint: waypoint.clone(),
        authority: SocketAddr::new(*vip, port),
    };
    Ok((via, waypoint_service))
}

/// The ready pods of a waypoint's Service, each at its HBONE port.
fn waypoint_endpoints(state: &State, service: &Service) -> Vec<ResolvedEndpoint> {
    let mut seen = HashSet::new();
    service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| {
            // Without its workload the waypoint's identity is unknown: never dialled.
            let workload = state.endpoint_workload(e)?;
            let addr = SocketAddr::new(e.ip, HBONE_PORT);
            seen.insert(addr).then_some(ResolvedEndpoint {
                addr,
                workload: Some(workload),
            })
        })
        .collect()
}
