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

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh::model::{State, TrafficPolicy, Workload};

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

pub(super) fn resolve(state: &State, key: &ClusterKey) -> Result<ClusterSpec, Unresolved> {
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
    })
}
