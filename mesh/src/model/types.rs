//! The domain model every proxy decision reads: workloads, services and policies, validated.
//!
//! These types are produced only by the translation in [`super::translate`] (from Kubernetes
//! and Istio objects, whichever transport brought them) and are immutable once built; the data
//! path never sees a raw Kubernetes object. A [`State`] is one consistent snapshot.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::l7::*;
use crate::identity::Identity;

/// Label maps, sorted so output (config dumps, logs) is stable.
pub type Labels = BTreeMap<String, String>;

/// Istio's root namespace: policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// Namespace label that enrols a namespace in the ambient mesh (`=ambient`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Pod label value that opts a pod out (`istio.io/dataplane-mode=none`).
pub const DATAPLANE_MODE_NONE: &str = "none";

/// A pod, as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    /// `<namespace>/<name>`: unique and stable across updates.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// Pod IPs (`status.podIPs`), at least one.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node: String,
    pub service_account: String,
    pub identity: Identity,
    pub labels: Labels,
    /// Captured by the mesh: its namespace is ambient and the pod did not opt out.
    pub enrolled: bool,
    /// The canonical workload name for metrics and baggage (the owning Deployment's name when
    /// it can be derived, else the pod name), and its kind (`deployment`, `pod`, ...).
    pub workload_name: String,
    pub workload_kind: String,
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else the
    /// workload name (Istio's canonical service).
    pub canonical_service: String,
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else `version`,
    /// else `latest`.
    pub canonical_revision: String,
    /// Container ports by name, for resolving a Service's named `targetPort`.
    pub named_ports: BTreeMap<String, u16>,
}

/// How a Service port maps to the pods' port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per endpoint (pods may use different numbers).
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
    /// Only TCP ports are proxied; others are kept for the config dump.
    pub protocol: String,
    /// `appProtocol`, else the Istio port-name prefix (`http-web` -> `http`), lower-cased:
    /// how a waypoint treats the port (`http`, `http2`, `grpc`, `tcp`...; `None` = detect).
    pub app_protocol: Option<String>,
}

/// One backend of a Service, from its EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// The workload behind it (`<namespace>/<pod name>` from the slice's `targetRef`), if known.
    pub workload_uid: Option<String>,
    pub ip: IpAddr,
    /// `conditions.ready` (absent counts as ready, as Kubernetes documents).
    pub ready: bool,
    /// Port name in the slice -> port number on this endpoint.
    pub ports: BTreeMap<String, u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub hostname: String,
    /// ClusterIPs; empty for headless services.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    pub labels: Labels,
    /// The waypoint that serves this service's traffic (`istio.io/use-waypoint` on the service,
    /// else on its namespace; `none` opts out). ztunnel sends its traffic there.
    pub waypoint: Option<WaypointRef>,
}

impl Service {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Where an authorization or peer-authentication policy applies.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum PolicyScope {
    /// In the root namespace without a selector: every workload in the mesh.
    Global,
    /// In a namespace without a selector: every workload of that namespace.
    Namespace(String),
    /// With `selector.matchLabels`: workloads of that namespace carrying all the labels.
    WorkloadSelector { namespace: String, labels: Labels },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// A CIDR (`10.0.0.0/8`) or single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A string matcher as Istio's AuthorizationPolicy writes them: exact, `prefix*`, `*suffix`, or
/// `*` (presence).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StringMatch {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            StringMatch::Suffix(p.to_owned())
        } else {
            StringMatch::Exact(s.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(p) => value.ends_with(p.as_str()),
            StringMatch::Any => true,
        }
    }
}

/// `rules[].from[].source`. Principals are compared without the `spiffe://` prefix, as Istio
/// writes them (`cluster.local/ns/default/sa/sleep`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpBlock>,
    pub not_ip_blocks: Vec<IpBlock>,
}

/// `rules[].to[].operation`, L4 part.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// A `when` key ztunnel can evaluate at L4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ConditionKey {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    pub key: ConditionKey,
    /// Matched as [`StringMatch`]; for IP keys also as CIDRs.
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// One rule: matches when any `from` matches (or there is none), any `to` matches (or there is
/// none) and every `when` matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
    /// L7-only fields the rule used (`paths`, `methods`, `hosts`, `headers`,
    /// `requestPrincipals`, unknown `when` keys...), dropped from `from`/`to`/`when` because
    /// ztunnel cannot evaluate them. As in Istio: such a rule matches nothing in an ALLOW policy
    /// (fail closed), and a DENY policy enforces the rule's L4 remainder ("more restrictive
    /// than requested").
    pub l7_fields: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    /// An ALLOW policy with no rules allows nothing; a DENY policy with no rules denies nothing
    /// (Istio's semantics).
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MtlsMode {
    /// Inherit from the parent scope (namespace, then mesh-wide); PERMISSIVE at the top.
    Unset,
    Permissive,
    Strict,
    Disable,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub mode: MtlsMode,
    /// `portLevelMtls`: per target port overrides.
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

/// Something in the configuration that applies, but probably not as its author meant, as
/// `istioctl analyze` reports it: a VirtualService route to a subset no DestinationRule defines,
/// a document whose kind is a near miss of one the proxies read. Nothing is rejected for it;
/// it is in the [`State`] (so in `/config_dump`), in the metric `mesh_config_warnings{kind,code}`
/// and logged when it appears.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ConfigWarning {
    /// Istio's analyzer code where it has one (`IST0101`), else a name of ours (`UnknownKind`).
    pub code: String,
    /// The kind of the object, as written (the metric's `kind` label).
    pub kind: String,
    /// Which object: `VirtualService demo/reviews`, or a file's document for one not read.
    pub object: String,
    /// The field path inside it (`spec.http[0].route[1].destination.subset`).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {} [{}]",
            self.object, self.field, self.message, self.code
        )
    }
}

/// One consistent snapshot of everything the proxies know. Built whole by the translation and
/// swapped in atomically; readers never see half an update.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct State {
    /// By uid.
    pub workloads: BTreeMap<String, Arc<Workload>>,
    /// By `<namespace>/<name>`.
    pub services: BTreeMap<String, Arc<Service>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    /// Namespace labels, by namespace name.
    pub namespaces: BTreeMap<String, Labels>,
    /// L7: what waypoints read. Sorted by key.
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    /// AuthorizationPolicies as a waypoint evaluates them (targetRefs, or namespace-wide).
    pub l7_authorization_policies: Vec<Arc<L7AuthorizationPolicy>>,
    /// Waypoint `Gateway`s by `<namespace>/<name>`.
    pub waypoint_gateways: BTreeMap<String, WaypointGateway>,
    /// `RateLimitPolicy`s (`mesh.ambient.dev`) waypoints enforce, sorted by key, targets
    /// resolved against `services` and `waypoint_gateways`.
    pub rate_limit_policies: Vec<Arc<super::ratelimit::RateLimitPolicy>>,
    pub root_namespace: String,
    /// Istio `Gateway`s (ingress), oldest first.
    pub ingress_gateways: Vec<Arc<super::IngressGateway>>,
    /// The VirtualServices bound to each ingress Gateway (`namespace/name`), as that Gateway
    /// sees them (routes and matches of other bindings dropped), oldest first.
    pub gateway_virtual_services: BTreeMap<String, Vec<Arc<VirtualService>>>,
    /// TLS Secrets by `namespace/name`; serialized as summaries, never their bytes.
    #[serde(serialize_with = "super::ingress::serialize_secrets")]
    pub secrets: BTreeMap<String, Arc<super::TlsSecret>>,
    /// What applies but looks wrong (see [`ConfigWarning`]), sorted.
    pub warnings: Vec<ConfigWarning>,
    /// The status of each Gateway API route (`status.parents[]`), by kind, namespace, name.
    pub route_statuses: Vec<super::RouteStatus>,
    #[serde(skip)]
    pub by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    pub by_vip: HashMap<IpAddr, Arc<Service>>,
}

impl State {
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// The workload behind an endpoint: its slice's `targetRef`, else the pod with its IP.
    pub fn endpoint_workload(&self, endpoint: &Endpoint) -> Option<Arc<Workload>> {
        endpoint
            .workload_uid
            .as_ref()
            .and_then(|uid| self.workloads.get(uid))
            .or_else(|| self.workload_by_ip(endpoint.ip))
            .cloned()
    }

    /// The waypoint an ingress gateway sends `service`'s traffic to: the service's own
    /// waypoint, when `istio.io/ingress-use-waypoint` is `"true"` on the Service or, if the
    /// Service does not carry the label, on its Namespace (Istio's lookup). `None`: the gateway
    /// goes straight to the endpoints, the default in Istio.
    pub fn ingress_waypoint<'a>(&self, service: &'a Service) -> Option<&'a WaypointRef> {
        let waypoint = service.waypoint.as_ref()?;
        let value = match service.labels.get(INGRESS_USE_WAYPOINT_LABEL) {
            Some(value) => Some(value),
            None => self
                .namespaces
                .get(&service.namespace)
                .and_then(|labels| labels.get(INGRESS_USE_WAYPOINT_LABEL)),
        };
        (value.map(String::as_str) == Some("true")).then_some(waypoint)
    }

    /// Whether `peer` is a waypoint serving one of `destination`'s services (an endpoint of the
    /// Service that a service of `destination` names in `istio.io/use-waypoint`): the one proxy
    /// entitled to relay other clients' addresses to `destination` in `forwarded`, as Istio's
    /// ztunnel trusts that header only from the destination's own waypoint.
    pub fn is_waypoint_for(&self, peer: &Identity, destination: &Workload) -> bool {
        let serves_destination = |e: &Endpoint| {
            e.workload_uid.as_deref() == Some(destination.uid.as_str())
                || (e.workload_uid.is_none() && destination.ips.contains(&e.ip))
        };
        self.services
            .values()
            .filter(|s| s.endpoints.iter().any(serves_destination))
            .filter_map(|s| s.waypoint.as_ref())
            .filter_map(|w| self.services.get(&w.service_key()))
            .flat_map(|waypoint| waypoint.endpoints.iter())
            .filter_map(|e| self.endpoint_workload(e))
            .any(|w| w.identity == *peer)
    }
}

impl ServicePort {
    /// The port this service port reaches on `endpoint`: a numeric `targetPort` as is; a named
    /// one from the EndpointSlice (whose ports carry the service port's name), else from the
    /// pod's container port of that name. `None`: the endpoint does not expose it.
    pub fn target_on(&self, endpoint: &Endpoint, workload: Option<&Workload>) -> Option<u16> {
        match &self.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Named(target) => self
                .name
                .as_ref()
                .and_then(|name| endpoint.ports.get(name))
                .copied()
                .or_else(|| workload.and_then(|w| w.named_ports.get(target).copied())),
        }
    }
}
