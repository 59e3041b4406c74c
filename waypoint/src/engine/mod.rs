//! The L7 engine: everything the waypoint does to a request or a connection once it knows who
//! the client is and which service it asked for, and nothing about how the connection arrived.
//!
//! A front door (today the HBONE listener, [`crate::inbound`]) terminates the transport, works
//! out a [`Downstream`] (the client's identity and address, the service and port it dialled)
//! and hands the engine either one HTTP request at a time ([`Engine::http`]) or the
//! connection's bytes ([`Engine::tcp`]). The engine owns the request path in the order Envoy's
//! HTTP filter chain applies it (authorization, rate limits, route selection, CORS, fault
//! injection, the route's action, the upstream attempt loop, response edits), the compiled
//! routes, the upstream pools, and the metrics and access log of every request and connection.
//!
//! Dependencies point one way: the front doors and [`crate::app`] use the engine; the engine
//! uses the policy modules ([`crate::authz`], [`crate::ratelimit`], [`crate::route`]), the
//! upstream layer ([`crate::upstream`]) and [`crate::metrics`], none of which know the engine.

mod finish;
mod headers;
mod pipeline;
mod tcp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh::metrics::TcpMetrics;
use mesh::model::{Service, ServicePort, State, WaypointRef};
use prometheus_client::registry::Registry;

use crate::metrics::RequestMetrics;
use crate::ratelimit::RateLimits;
use crate::request::SourceInfo;
use crate::route::RouteTable;
use crate::upstream::Upstreams;

pub use self::headers::authority_of;
pub use self::pipeline::RequestBody;

/// Who this engine answers as: the names policies target and metrics carry.
#[derive(Debug, Clone)]
pub struct EngineIdentity {
    /// The Gateway whose policies (`targetRefs` kind `Gateway`, RateLimitPolicy) apply.
    pub gateway: WaypointRef,
    /// Istio's root namespace: its namespace-wide policies apply everywhere.
    pub root_namespace: String,
    /// `CLUSTER_ID`: the cluster label of the metrics.
    pub cluster_id: String,
    /// The `reporter` label of its metrics and access log: `waypoint`, or `source` for the
    /// ingress (Istio's gateways report as the client side).
    pub reporter: mesh::metrics::Reporter,
}

/// The request path's shared state. One per process, behind an `Arc`; every front door holds
/// it.
#[derive(Debug)]
pub struct Engine {
    pub identity: EngineIdentity,
    /// Rebuilt on every state change ([`Engine::apply`]).
    pub routes: ArcSwap<Routing>,
    pub upstreams: Upstreams,
    pub metrics: RequestMetrics,
    pub tcp_metrics: TcpMetrics,
    /// RateLimitPolicy buckets, following the state like the routes.
    pub rate_limits: RateLimits,
}

/// The compiled view of one state: routes plus a hostname index of services.
#[derive(Debug, Default)]
pub struct Routing {
    pub state: Arc<State>,
    pub table: RouteTable,
    /// Service hostname -> `ns/name`.
    pub hosts: HashMap<String, String>,
}

impl Routing {
    pub fn build(state: Arc<State>) -> Self {
        let table = RouteTable::build(&state);
        let hosts = state
            .services
            .values()
            .map(|s| (s.hostname.clone(), s.key()))
            .collect();
        Self {
            state,
            table,
            hosts,
        }
    }
}

/// What the engine knows of a connection before it reads any byte of it: who the client is and
/// which service port it asked for. The front door fills it in; nothing in it says how the
/// connection arrived.
#[derive(Debug, Clone)]
pub struct Downstream {
    pub service: Arc<Service>,
    pub port: ServicePort,
    /// The `VIP:port` the client dialled.
    pub vip: SocketAddr,
    pub source: SourceInfo,
    /// The peer of the connection the front door accepted (for HBONE, the client's ztunnel).
    pub peer_addr: SocketAddr,
    /// Whether the client proved its identity with mutual TLS (the `connection_security_policy`
    /// label).
    pub mutual_tls: bool,
    /// `Some` for the ingress: the Gateway servers the connection came in on, whose
    /// VirtualServices route its requests by `Host`. `None`: the routes of [`Self::service`].
    pub scope: Option<Arc<crate::route::ServerScope>>,
    /// The SNI of a TLS connection the ingress passes through unterminated (lower case): what
    /// its VirtualServices' `tls` routes match.
    pub sni: Option<String>,
}

impl Engine {
    pub fn new(identity: EngineIdentity, upstreams: Upstreams, registry: &mut Registry) -> Self {
        let tcp_metrics = TcpMetrics::new(registry, &identity.cluster_id);
        Self {
            identity,
            routes: ArcSwap::from_pointee(Routing::default()),
            upstreams,
            metrics: RequestMetrics::new(registry),
            tcp_metrics,
            rate_limits: RateLimits::new(registry),
        }
    }

    /// Compiles `state` and puts it in force: upstreams and rate limits first, then the routes,
    /// so a request that sees the new routes finds their clusters. Returns what is now in
    /// force (its route conflicts are the caller's to report).
    pub fn apply(&self, state: Arc<State>) -> Arc<Routing> {
        let routing = Arc::new(Routing::build(state.clone()));
        self.upstreams.update(&state);
        let gateway = &self.identity.gateway;
        self.rate_limits
            .update(&state, &gateway.namespace, &gateway.name);
        self.routes.store(routing.clone());
        routing
    }

    /// Serves one HTTP request of `downstream`; never fails (errors become local replies,
    /// each recorded and logged).
    pub async fn http<B>(
        self: Arc<Self>,
        downstream: Arc<Downstream>,
        request: http::Request<B>,
    ) -> http::Response<crate::request::Body>
    where
        B: RequestBody,
        B::Error: Into<crate::request::BoxError>,
    {
        pipeline::handle(self, downstream, request).await
    }

    /// Proxies one connection of `downstream` as opaque TCP (the service's `tcp` routes).
    pub async fn tcp<S>(&self, downstream: &Downstream, client: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        tcp::proxy(self, downstream, client).await
    }

    /// The L7 AuthorizationPolicies for a request of `downstream` (`parts`), or for the
    /// connection itself as opaque TCP (`None`: no method, path, host or headers, so an ALLOW
    /// rule that needs one matches nothing, as in Istio). `Err` says which policy denied.
    fn authorize(
        &self,
        downstream: &Downstream,
        state: &State,
        parts: Option<&http::request::Parts>,
    ) -> Result<(), String> {
        let service = &downstream.service;
        let target = crate::authz::AuthzTarget {
            gateway_namespace: &self.identity.gateway.namespace,
            gateway_name: &self.identity.gateway.name,
            service_namespace: &service.namespace,
            service_name: &service.name,
            service_hostname: &service.hostname,
            root_namespace: &self.identity.root_namespace,
        };
        let no_headers = http::HeaderMap::new();
        let authority = parts.map(authority_of).unwrap_or_default();
        let request = crate::authz::AuthzRequest {
            source_principal: downstream.source.principal.as_deref(),
            source_namespace: downstream.source.identity.as_ref().map(|i| i.namespace()),
            source_ip: downstream.source.ip,
            remote_ip: None,
            destination_ip: downstream.vip.ip(),
            destination_port: downstream.vip.port(),
            method: parts.map_or("", |p| p.method.as_str()),
            host: &authority,
            path: parts.map_or("", |p| p.uri.path_and_query().map_or("/", |pq| pq.as_str())),
            headers: parts.map_or(&no_headers, |p| &p.headers),
            tcp: parts.is_none(),
        };
        let decision = crate::authz::authorize(&state.l7_authorization_policies, &target, &request);
        if decision.allowed {
            Ok(())
        } else {
            Err(decision.to_string())
        }
    }

    /// The rate limits for one request (see [`crate::ratelimit`]).
    fn rate_limit(
        &self,
        downstream: &Downstream,
        parts: &http::request::Parts,
    ) -> crate::ratelimit::Decision {
        let service = &downstream.service;
        let destination = crate::ratelimit::RateLimitDestination {
            service_namespace: &service.namespace,
            service_name: &service.name,
            gateway_namespace: &self.identity.gateway.namespace,
            gateway_name: &self.identity.gateway.name,
        };
        let request = crate::ratelimit::RateLimitRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            headers: &parts.headers,
            source: downstream.source.identity.as_ref(),
        };
        self.rate_limits
            .decide(&destination, &request, std::time::Instant::now())
    }
}

#[cfg(test)]
mod tests;
