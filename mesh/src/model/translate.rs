//! The pure translation from Kubernetes and Istio objects to a [`State`].
//!
//! Both transports (the file source today, the Kubernetes watcher later) hand the full set of
//! objects they currently see to one [`Translator`]; it validates each object on its own, keeps
//! the last good version of any object that fails, and assembles the cross-object view
//! (enrolment from namespace labels, endpoints from slices, policy scopes, waypoint bindings,
//! VirtualService precedence). No I/O happens here.
//!
//! The L7 half (VirtualService, DestinationRule, waypoint `Gateway`s, AuthorizationPolicies as a
//! waypoint evaluates them) lives in the `networking` and `l7_policy` submodules, this
//! project's `RateLimitPolicy` in `ratelimit`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::Resource as _;
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tracing::{debug, warn};

use super::gateway_api_crd as gw;
use super::ingress_crd as icrd;
use super::istio_crd as crd;
use super::l7::*;
use super::networking_crd as ncrd;
use super::ratelimit::*;
use super::ratelimit_crd as rcrd;
use super::types::*;
use super::{IngressGateway, TlsSecret};
use crate::identity::{Identity, IdentityError};

mod gateway_routes;
mod ingress;
mod l7_policy;
mod networking;
mod ratelimit;
mod strict;

pub use networking::{REFERENCED_RESOURCE_NOT_FOUND, istio_default_retries, parse_duration};
pub use strict::{KindSuggestion, suggest_kind};

#[cfg(test)]
mod gateway_routes_tests;
#[cfg(test)]
mod ingress_tests;
#[cfg(test)]
mod l7_tests;
#[cfg(test)]
mod ratelimit_tests;
#[cfg(test)]
mod tests;

/// The namespace `kubectl apply` uses for an object that names none; files follow it.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Kubernetes' default cluster domain (`<svc>.<ns>.svc.cluster.local`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The EndpointSlice label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Pod label Istio's gateway controller puts on the pods it deploys; with
/// [`WAYPOINT_CONTROLLER`] the pod is a waypoint.
pub const GATEWAY_MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// The [`GATEWAY_MANAGED_LABEL`] value of waypoint pods (Istio's `ControllerLabel` for the
/// `istio-waypoint` class).
pub const WAYPOINT_CONTROLLER: &str = "istio.io-mesh-controller";
/// Label on a Gateway's generated Service naming the Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Cluster-wide facts the objects themselves do not carry. They must match the cluster's (and
/// istiod's, when talking to Istio proxies), or identities and hostnames will not line up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TranslateConfig {
    /// The SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// The Kubernetes cluster domain in service hostnames.
    pub cluster_domain: String,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    pub root_namespace: String,
    /// The `gatewayClassName` of Gateway API Gateways served by ingress gateways (Istio's
    /// `istio`).
    pub ingress_gateway_class: String,
}

/// Istio's GatewayClass for ingress Gateways.
pub const DEFAULT_INGRESS_GATEWAY_CLASS: &str = "istio";

impl Default for TranslateConfig {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            ingress_gateway_class: DEFAULT_INGRESS_GATEWAY_CLASS.to_owned(),
        }
    }
}

/// The kinds of object the translation reads. Also the `kind` label of the config metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
    PeerAuthentication,
    VirtualService,
    DestinationRule,
    /// Gateway API `Gateway` (only class `istio-waypoint` matters).
    Gateway,
    /// This project's `RateLimitPolicy` (`mesh.ambient.dev`), enforced by waypoints.
    RateLimitPolicy,
    /// Gateway API `HTTPRoute`.
    HttpRoute,
    /// Gateway API `ReferenceGrant` (cross-namespace backends of routes).
    ReferenceGrant,
    /// Gateway API `GRPCRoute`.
    GrpcRoute,
    /// Gateway API `TCPRoute` (experimental channel).
    TcpRoute,
    /// Gateway API `TLSRoute`.
    TlsRoute,
    /// Istio's `Gateway` (`networking.istio.io`): the servers of an ingress gateway.
    IstioGateway,
    /// A Secret with TLS material an ingress gateway's server names (`credentialName`).
    Secret,
}

impl Kind {
    /// Every kind, so metrics can report zero for kinds that have no objects.
    pub const ALL: [Kind; 17] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Gateway,
        Kind::RateLimitPolicy,
        Kind::HttpRoute,
        Kind::ReferenceGrant,
        Kind::GrpcRoute,
        Kind::TcpRoute,
        Kind::TlsRoute,
        Kind::IstioGateway,
        Kind::Secret,
    ];

    /// What a waypoint reads: everything but the ingress gateway's kinds (it must not watch
    /// Secrets), which come last in [`Self::ALL`].
    pub const WAYPOINT: &'static [Kind] = Kind::ALL.split_at(Kind::ALL.len() - 2).0;

    /// The `kind` as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => corev1::Namespace::KIND,
            Kind::Pod => corev1::Pod::KIND,
            Kind::Service => corev1::Service::KIND,
            Kind::EndpointSlice => discoveryv1::EndpointSlice::KIND,
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::RateLimitPolicy => "RateLimitPolicy",
            Kind::HttpRoute => "HTTPRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TcpRoute => "TCPRoute",
            Kind::TlsRoute => "TLSRoute",
            Kind::IstioGateway => "Gateway",
            Kind::Secret => corev1::Secret::KIND,
        }
    }

    /// The kind in messages and metric labels: [`Self::as_str`], qualified by its group where
    /// two kinds share a name (`Gateway.networking.istio.io`).
    pub fn label(self) -> &'static str {
        match self {
            Kind::IstioGateway => "Gateway.networking.istio.io",
            _ => self.as_str(),
        }
    }

    /// Cluster-scoped kinds have no namespace in their key.
    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// Recognises a document by its API group and kind, whatever the version: an object of a
    /// kind we read in a version we do not is an error ([`Object::from_value`] reports it),
    /// while a kind we do not read at all (`None`) is somebody else's business.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind && k.group() == group)
    }

    fn group(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Pod | Kind::Service | Kind::Secret => corev1::Pod::GROUP,
            Kind::EndpointSlice => discoveryv1::EndpointSlice::GROUP,
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => crd::SECURITY_GROUP,
            Kind::VirtualService | Kind::DestinationRule | Kind::IstioGateway => {
                ncrd::NETWORKING_GROUP
            }
            Kind::Gateway
            | Kind::HttpRoute
            | Kind::ReferenceGrant
            | Kind::GrpcRoute
            | Kind::TcpRoute
            | Kind::TlsRoute => ncrd::GATEWAY_API_GROUP,
            Kind::RateLimitPolicy => rcrd::MESH_GROUP,
        }
    }

    /// Where a strict parse ([`Object::from_value_strict`]) accepts fields the schema does not
    /// name: the Gateway API spec is open on purpose (see [`ncrd::GatewaySpec`]).
    fn open_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Gateway => &["spec"],
            _ => &[],
        }
    }

    /// The apiVersions accepted for this kind.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace | Kind::Pod | Kind::Service | Kind::Secret => {
                &[corev1::Pod::API_VERSION]
            }
            Kind::EndpointSlice => &[discoveryv1::EndpointSlice::API_VERSION],
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => &crd::SECURITY_API_VERSIONS,
            Kind::VirtualService | Kind::DestinationRule | Kind::IstioGateway => {
                &ncrd::NETWORKING_API_VERSIONS
            }
            Kind::Gateway => &ncrd::GATEWAY_API_VERSIONS,
            Kind::RateLimitPolicy => &rcrd::RATE_LIMIT_API_VERSIONS,
            Kind::HttpRoute => &gw::HTTP_ROUTE_API_VERSIONS,
            Kind::ReferenceGrant => &gw::REFERENCE_GRANT_API_VERSIONS,
            Kind::GrpcRoute => &gw::GRPC_ROUTE_API_VERSIONS,
            Kind::TcpRoute => &gw::TCP_ROUTE_API_VERSIONS,
            Kind::TlsRoute => &gw::TLS_ROUTE_API_VERSIONS,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Which object: the unit of rejection and of "last good version".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// A key as Kubernetes would file the object: a namespaced object that names no namespace
    /// lands in `default` (as with `kubectl apply`); a cluster-scoped one has none.
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        let namespace = if kind.is_namespaced() {
            namespace
                .filter(|ns| !ns.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_owned()
        } else {
            String::new()
        };
        Self {
            kind,
            namespace,
            name: name.to_owned(),
        }
    }

    fn from_meta(kind: Kind, meta: &ObjectMeta) -> Self {
        Self::new(
            kind,
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

impl ObjectKey {
    /// `namespace/name` (`name` for a cluster-scoped object).
    pub fn namespace_name(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One parsed input object. Sources build these from YAML or from the API server; the
/// translation never sees the transport.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Box<corev1::Namespace>),
    Pod(Box<corev1::Pod>),
    Service(Box<corev1::Service>),
    EndpointSlice(Box<discoveryv1::EndpointSlice>),
    AuthorizationPolicy(Box<crd::AuthorizationPolicy>),
    PeerAuthentication(Box<crd::PeerAuthentication>),
    VirtualService(Box<ncrd::VirtualService>),
    DestinationRule(Box<ncrd::DestinationRule>),
    Gateway(Box<ncrd::Gateway>),
    RateLimitPolicy(Box<rcrd::RateLimitPolicy>),
    HttpRoute(Box<gw::HttpRoute>),
    ReferenceGrant(Box<gw::ReferenceGrant>),
    GrpcRoute(Box<gw::GrpcRoute>),
    TcpRoute(Box<gw::L4Route>),
    TlsRoute(Box<gw::L4Route>),
    IstioGateway(Box<icrd::IstioGateway>),
    Secret(Box<corev1::Secret>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::DestinationRule(_) => Kind::DestinationRule,
            Object::Gateway(_) => Kind::Gateway,
            Object::RateLimitPolicy(_) => Kind::RateLimitPolicy,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::ReferenceGrant(_) => Kind::ReferenceGrant,
            Object::GrpcRoute(_) => Kind::GrpcRoute,
            Object::TcpRoute(_) => Kind::TcpRoute,
            Object::TlsRoute(_) => Kind::TlsRoute,
            Object::IstioGateway(_) => Kind::IstioGateway,
            Object::Secret(_) => Kind::Secret,
        }
    }

    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::VirtualService(o) => &o.metadata,
            Object::DestinationRule(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::RateLimitPolicy(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::ReferenceGrant(o) => &o.metadata,
            Object::GrpcRoute(o) => &o.metadata,
            Object::TcpRoute(o) | Object::TlsRoute(o) => &o.metadata,
            Object::IstioGateway(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        ObjectKey::from_meta(self.kind(), self.metadata())
    }

    /// Deserializes a JSON document already recognised as `kind` (see [`Kind::from_type`]).
    /// Schema errors name the key (from the caller, who read it from the document's header)
    /// and the exact field path, so they can be reported and the last good version kept.
    ///
    /// Fields the Kubernetes kinds' schemas do not have are skipped, as the API server's
    /// objects may carry fields newer than this build knows: this is for objects the API
    /// server has already validated (the Kubernetes source). Documents people write go through
    /// [`from_value_strict`](Self::from_value_strict).
    pub fn from_value(key: &ObjectKey, value: serde_json::Value) -> Result<Object, TranslateError> {
        Self::parse(key, value, false)
    }

    /// [`from_value`](Self::from_value), refusing every field the kind's schema does not have,
    /// anywhere in the object (metadata included), as `kubectl apply --validate=strict` does: a
    /// `podIp:` for `podIP:` would otherwise take the pod out of the mesh, a
    /// `serviceAcountName:` make it `sa/default`. The error names the object and every unknown
    /// field's path, with a "did you mean" for near misses of the fields the translation reads.
    pub fn from_value_strict(
        key: &ObjectKey,
        value: serde_json::Value,
    ) -> Result<Object, TranslateError> {
        Self::parse(key, value, true)
    }

    fn parse(
        key: &ObjectKey,
        value: serde_json::Value,
        strict: bool,
    ) -> Result<Object, TranslateError> {
        let kind = key.kind;
        let api_version = value
            .get("apiVersion")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        if !kind.api_versions().contains(&api_version) {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: "apiVersion".to_owned(),
                value: api_version.to_owned(),
                expected: kind.api_versions().join(", "),
            });
        }
        Ok(match kind {
            Kind::Namespace => Object::Namespace(typed(key, value, strict)?),
            Kind::Pod => Object::Pod(typed(key, value, strict)?),
            Kind::Service => Object::Service(typed(key, value, strict)?),
            Kind::EndpointSlice => Object::EndpointSlice(typed(key, value, strict)?),
            Kind::AuthorizationPolicy => Object::AuthorizationPolicy(typed(key, value, strict)?),
            Kind::PeerAuthentication => Object::PeerAuthentication(typed(key, value, strict)?),
            Kind::VirtualService => Object::VirtualService(typed(key, value, strict)?),
            Kind::DestinationRule => Object::DestinationRule(typed(key, value, strict)?),
            Kind::Gateway => Object::Gateway(typed(key, value, strict)?),
            Kind::RateLimitPolicy => Object::RateLimitPolicy(typed(key, value, strict)?),
            Kind::HttpRoute => Object::HttpRoute(typed(key, value, strict)?),
            Kind::ReferenceGrant => Object::ReferenceGrant(typed(key, value, strict)?),
            Kind::GrpcRoute => Object::GrpcRoute(typed(key, value, strict)?),
            Kind::TcpRoute => Object::TcpRoute(typed(key, value, strict)?),
            Kind::TlsRoute => Object::TlsRoute(typed(key, value, strict)?),
            Kind::IstioGateway => Object::IstioGateway(typed(key, value, strict)?),
            Kind::Secret => Object::Secret(typed(key, value, strict)?),
        })
    }
}

/// One document as its serde shape; with `strict`, fields the shape skipped are an error
/// (outside the kind's [open fields](Kind::open_fields)).
fn typed<T: serde::de::DeserializeOwned>(
    key: &ObjectKey,
    value: serde_json::Value,
    strict: bool,
) -> Result<Box<T>, TranslateError> {
    let schema_error = |e: serde_path_to_error::Error<serde_json::Error>| TranslateError::Schema {
        object: Box::new(key.clone()),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    };
    if !strict {
        return serde_path_to_error::deserialize(value)
            .map(Box::new)
            .map_err(schema_error);
    }
    let mut unknown: Vec<(String, String)> = Vec::new();
    let parsed = {
        let mut record = |path: serde_ignored::Path<'_>| {
            let leaf = match &path {
                serde_ignored::Path::Map { key, .. } => key.clone(),
                _ => String::new(),
            };
            unknown.push((strict::field_path(&path), leaf));
        };
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut record))
    };
    let parsed = parsed.map_err(schema_error)?;
    let open = key.kind.open_fields();
    unknown.retain(|(path, _)| {
        !open.iter().any(|prefix| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('.'))
        })
    });
    // A near miss of a field the translation reads is the one that changes behaviour: first.
    unknown.sort_by_key(|(_, leaf)| strict::suggest_field(leaf).is_none());
    let Some(((field, leaf), others)) = unknown.split_first() else {
        return Ok(Box::new(parsed));
    };
    let mut message = format!(
        "unknown field `{leaf}`: the {} schema has no such field here",
        key.kind
    );
    if let Some(meant) = strict::suggest_field(leaf) {
        message.push_str(&format!("; did you mean `{meant}`?"));
    } else {
        message.push_str(" (check its spelling, case and indentation)");
    }
    if !others.is_empty() {
        let others: Vec<&str> = others.iter().map(|(path, _)| path.as_str()).collect();
        message.push_str(&format!("; also unknown: {}", others.join(", ")));
    }
    Err(TranslateError::Schema {
        object: Box::new(key.clone()),
        field: field.clone(),
        message,
    })
}

/// Why an object was rejected. Every message starts with the object (`Kind namespace/name`)
/// and the field path, so the operator knows exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("{object}: {field}: {value:?} is not a port number")]
    NotAPort {
        object: Box<ObjectKey>,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: {value:?} is not an IP address")]
    NotAnIp {
        object: Box<ObjectKey>,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: {value:?} is not an IP address or CIDR: {why}")]
    NotAnIpBlock {
        object: Box<ObjectKey>,
        field: String,
        value: String,
        why: &'static str,
    },
    #[error("{object}: {field}: {value:?} is not one of {expected}")]
    NotOneOf {
        object: Box<ObjectKey>,
        field: String,
        value: String,
        expected: String,
    },
    #[error("{object}: {field}: {error}")]
    Identity {
        object: Box<ObjectKey>,
        field: String,
        error: IdentityError,
    },
    /// A rule about the object's shape, e.g. a required field missing.
    #[error("{object}: {field}: {why}")]
    Invalid {
        object: Box<ObjectKey>,
        field: String,
        why: String,
    },
    /// The document does not match the kind's schema (wrong type, unknown field).
    #[error("{object}: {field}: {message}")]
    Schema {
        object: Box<ObjectKey>,
        field: String,
        message: String,
    },
}

impl TranslateError {
    /// The rejected object.
    pub fn object(&self) -> &ObjectKey {
        match self {
            TranslateError::NotAPort { object, .. }
            | TranslateError::NotAnIp { object, .. }
            | TranslateError::NotAnIpBlock { object, .. }
            | TranslateError::NotOneOf { object, .. }
            | TranslateError::Identity { object, .. }
            | TranslateError::Invalid { object, .. }
            | TranslateError::Schema { object, .. } => object,
        }
    }
}

/// One object that did not make it into this state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub error: TranslateError,
    /// A previous version of the object was good and stays in force; otherwise the object is
    /// simply absent.
    pub kept_last_good: bool,
}

/// The result of one translation.
#[derive(Debug, Clone)]
pub struct Translation {
    pub state: State,
    pub rejections: Vec<Rejection>,
    /// Objects in force per kind (including last good versions of rejected updates); every
    /// kind is present so gauges can drop to zero.
    pub in_force: BTreeMap<Kind, usize>,
}

/// An input object: parsed, or already rejected by its source (e.g. a schema error) but with a
/// known key, so its last good version can stay.
pub type SourceObject = Result<Object, TranslateError>;

/// Translates whole object sets into states, remembering the last good version of each object.
///
/// It is the only state the translation keeps: feed it the complete current set every time
/// (not deltas); objects missing from a set are deleted.
#[derive(Debug)]
pub struct Translator {
    config: TranslateConfig,
    in_force: BTreeMap<ObjectKey, Arc<Accepted>>,
}

impl Translator {
    pub fn new(config: TranslateConfig) -> Self {
        Self {
            config,
            in_force: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &TranslateConfig {
        &self.config
    }

    /// Translates the complete current object set. A rejected object keeps its last good
    /// version in force while everything else applies; when the same key appears twice the
    /// later one wins, as with consecutive `kubectl apply`s.
    pub fn translate(&mut self, objects: impl IntoIterator<Item = SourceObject>) -> Translation {
        let mut latest: BTreeMap<ObjectKey, SourceObject> = BTreeMap::new();
        for object in objects {
            let key = match &object {
                Ok(object) => object.key(),
                Err(error) => error.object().clone(),
            };
            if latest.insert(key.clone(), object).is_some() {
                warn!(object = %key, "defined more than once; the last definition wins");
            }
        }

        let mut in_force = BTreeMap::new();
        let mut rejections = Vec::new();
        for (key, object) in latest {
            let result = object.and_then(|object| accept(&self.config, &key, &object));
            match result {
                Ok(accepted) => {
                    in_force.insert(key, Arc::new(accepted));
                }
                Err(error) => {
                    let previous = self.in_force.get(&key).cloned();
                    let kept_last_good = previous.is_some();
                    if let Some(previous) = previous {
                        in_force.insert(key, previous);
                    }
                    rejections.push(Rejection {
                        error,
                        kept_last_good,
                    });
                }
            }
        }

        let state = assemble(&self.config, &in_force);
        let mut counts: BTreeMap<Kind, usize> = Kind::ALL.into_iter().map(|k| (k, 0)).collect();
        for key in in_force.keys() {
            *counts.entry(key.kind).or_default() += 1;
        }
        self.in_force = in_force;
        Translation {
            state,
            rejections,
            in_force: counts,
        }
    }
}

/// An object validated on its own; what the cross-object assembly reads.
#[derive(Debug)]
enum Accepted {
    Namespace(Labels),
    /// `None`: not running or no IP yet; kept (it is valid) but not a workload.
    Pod(Option<PodWorkload>),
    Service(Service),
    EndpointSlice(Slice),
    AuthorizationPolicy {
        /// `None`: valid but not for ztunnel (waypoint-attached, AUDIT, CUSTOM).
        l4: Option<AuthorizationPolicy>,
        /// `None`: valid but not for waypoints (workload selector, AUDIT, CUSTOM).
        l7: Option<L7AuthorizationPolicy>,
    },
    PeerAuthentication(PeerAuthentication),
    VirtualService {
        /// `None`: valid but not for waypoints (bound to gateways only, or a delegate).
        mesh: Option<Box<networking::AcceptedRoute<VirtualService>>>,
        /// As each ingress `Gateway` it names sees it: `(namespace/name, routes)`.
        gateways: Vec<(String, networking::AcceptedRoute<VirtualService>)>,
    },
    DestinationRule(Box<networking::AcceptedRoute<DestinationRule>>),
    /// `None`: a Gateway of another class.
    Gateway(Option<WaypointGateway>),
    /// Targets not resolved yet (assembly does it).
    RateLimitPolicy(RateLimitPolicy),
    /// Not attached yet (assembly does it).
    /// An HTTPRoute, GRPCRoute, TCPRoute or TLSRoute.
    GatewayRoute(Box<gateway_routes::AcceptedGatewayRoute>),
    ReferenceGrant(gateway_routes::Grant),
    IstioGateway(IngressGateway),
    /// A Gateway API Gateway of the ingress class.
    ApiGateway(Box<ingress::ApiGateway>),
    /// `None`: not a TLS Secret.
    Secret(Option<Arc<TlsSecret>>),
}

#[derive(Debug)]
struct PodWorkload {
    /// `enrolled` is decided at assembly, from the namespace.
    workload: Workload,
    /// Host-network pods share the node's IP and cannot be captured.
    host_network: bool,
}

#[derive(Debug)]
struct Slice {
    service: Option<String>,
    endpoints: Vec<Endpoint>,
}

fn accept(
    config: &TranslateConfig,
    key: &ObjectKey,
    object: &Object,
) -> Result<Accepted, TranslateError> {
    if key.name.is_empty() {
        return Err(invalid(key, "metadata.name", "a name is required"));
    }
    Ok(match object {
        Object::Namespace(ns) => Accepted::Namespace(labels(&ns.metadata)),
        Object::Pod(pod) => Accepted::Pod(pod_workload(config, key, pod)?),
        Object::Service(svc) => Accepted::Service(service(config, key, svc)?),
        Object::EndpointSlice(slice) => Accepted::EndpointSlice(endpoint_slice(key, slice)?),
        Object::AuthorizationPolicy(policy) => Accepted::AuthorizationPolicy {
            l4: authorization_policy(config, key, policy)?,
            l7: l7_policy::l7_authorization_policy(key, policy)?,
        },
        Object::PeerAuthentication(pa) => {
            Accepted::PeerAuthentication(peer_authentication(config, key, pa)?)
        }
        Object::VirtualService(vs) => Accepted::VirtualService {
            mesh: networking::virtual_service(config, key, vs)?.map(Box::new),
            gateways: ingress::gateway_virtual_services(config, key, vs)?,
        },
        Object::IstioGateway(gateway) => {
            Accepted::IstioGateway(ingress::istio_gateway(key, gateway)?)
        }
        Object::Secret(secret) => Accepted::Secret(ingress::tls_secret(key, secret)?.map(Arc::new)),
        Object::DestinationRule(dr) => {
            Accepted::DestinationRule(Box::new(networking::destination_rule(config, key, dr)?))
        }
        Object::Gateway(gateway)
            if gateway.spec.gateway_class_name == config.ingress_gateway_class =>
        {
            Accepted::ApiGateway(Box::new(ingress::api_gateway(key, gateway)?))
        }
        Object::Gateway(gateway) => Accepted::Gateway(networking::waypoint_gateway(key, gateway)),
        Object::HttpRoute(route) => {
            Accepted::GatewayRoute(Box::new(gateway_routes::http_route(config, key, route)?))
        }
        Object::GrpcRoute(route) => {
            Accepted::GatewayRoute(Box::new(gateway_routes::grpc_route(config, key, route)?))
        }
        Object::TcpRoute(route) | Object::TlsRoute(route) => {
            Accepted::GatewayRoute(Box::new(gateway_routes::l4_route(config, key, route)?))
        }
        Object::ReferenceGrant(grant) => {
            Accepted::ReferenceGrant(gateway_routes::reference_grant(key, grant)?)
        }
        Object::RateLimitPolicy(policy) => {
            Accepted::RateLimitPolicy(ratelimit::rate_limit_policy(key, policy)?)
        }
    })
}

fn invalid(key: &ObjectKey, field: impl Into<String>, why: impl Into<String>) -> TranslateError {
    TranslateError::Invalid {
        object: Box::new(key.clone()),
        field: field.into(),
        why: why.into(),
    }
}

fn labels(meta: &ObjectMeta) -> Labels {
    meta.labels.clone().unwrap_or_default()
}

/// A TCP/UDP port: 1..=65535.
fn port_number(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn port_from_i32(key: &ObjectKey, field: String, n: i32) -> Result<u16, TranslateError> {
    port_number(i64::from(n)).ok_or_else(|| TranslateError::NotAPort {
        object: Box::new(key.clone()),
        field,
        value: n.to_string(),
    })
}

fn port_from_str(key: &ObjectKey, field: String, s: &str) -> Result<u16, TranslateError> {
    s.parse::<i64>()
        .ok()
        .and_then(port_number)
        .ok_or_else(|| TranslateError::NotAPort {
            object: Box::new(key.clone()),
            field,
            value: s.to_owned(),
        })
}

fn ip(key: &ObjectKey, field: String, s: &str) -> Result<IpAddr, TranslateError> {
    s.parse().map_err(|_| TranslateError::NotAnIp {
        object: Box::new(key.clone()),
        field,
        value: s.to_owned(),
    })
}

/// Parses a CIDR (`10.0.0.0/8`, `fd00::/64`) or a single address, as Istio's `ipBlocks` and
/// `source.ip` conditions accept them. Host bits may be set (`10.1.2.3/8`), as Envoy allows;
/// [`IpBlock::contains`] masks them.
pub fn parse_ip_block(s: &str) -> Result<IpBlock, &'static str> {
    let (addr, prefix) = match s.split_once('/') {
        None => (s, None),
        Some((addr, prefix)) => (addr, Some(prefix)),
    };
    let addr: IpAddr = addr.parse().map_err(|_| "the address is not valid")?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => {
            let p: u8 = p.parse().map_err(|_| "the prefix length is not a number")?;
            if p > max {
                return Err(if addr.is_ipv4() {
                    "the prefix length is longer than 32"
                } else {
                    "the prefix length is longer than 128"
                });
            }
            p
        }
    };
    Ok(IpBlock { addr, prefix })
}

fn ip_block(key: &ObjectKey, field: String, s: &str) -> Result<IpBlock, TranslateError> {
    parse_ip_block(s).map_err(|why| TranslateError::NotAnIpBlock {
        object: Box::new(key.clone()),
        field,
        value: s.to_owned(),
        why,
    })
}

// ---------------------------------------------------------------------------------------------
// Pods

const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

fn pod_workload(
    config: &TranslateConfig,
    key: &ObjectKey,
    pod: &corev1::Pod,
) -> Result<Option<PodWorkload>, TranslateError> {
    let no_status = corev1::PodStatus::default();
    let status = pod.status.as_ref().unwrap_or(&no_status);
    let phase = status.phase.as_deref().unwrap_or_default();
    if phase != "Running" {
        debug!(pod = %key, phase, "pod is not running; not a workload yet");
        return Ok(None);
    }
    let mut ips = Vec::new();
    match status.pod_ips.as_deref() {
        Some(pod_ips) if !pod_ips.is_empty() => {
            for (i, pod_ip) in pod_ips.iter().enumerate() {
                ips.push(ip(key, format!("status.podIPs[{i}].ip"), &pod_ip.ip)?);
            }
        }
        _ => {
            if let Some(pod_ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
                ips.push(ip(key, "status.podIP".to_owned(), pod_ip)?);
            }
        }
    }
    if ips.is_empty() {
        debug!(pod = %key, "pod has no IP yet; not a workload yet");
        return Ok(None);
    }

    let no_spec = corev1::PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&no_spec);
    let node = spec
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid(key, "spec.nodeName", "a running pod must name its node"))?;
    // `serviceAccount` is the deprecated spelling; the API server fills both.
    let service_account = [&spec.service_account_name, &spec.service_account]
        .into_iter()
        .flatten()
        .find(|sa| !sa.is_empty())
        .cloned()
        .unwrap_or_else(|| "default".to_owned());
    let identity =
        Identity::new(&config.trust_domain, &key.namespace, &service_account).map_err(|error| {
            TranslateError::Identity {
                object: Box::new(key.clone()),
                field: "spec.serviceAccountName".to_owned(),
                error,
            }
        })?;

    let labels = labels(&pod.metadata);
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let (workload_name, workload_kind) = workload_name(&key.name, &labels, owners);
    let canonical_service = first_label(
        &labels,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(&workload_name)
    .to_owned();
    let canonical_revision = first_label(
        &labels,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest")
    .to_owned();

    let mut named_ports = BTreeMap::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (p, port) in container
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let number = port_from_i32(
                key,
                format!("spec.containers[{c}].ports[{p}].containerPort"),
                port.container_port,
            )?;
            if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                named_ports.entry(name.to_owned()).or_insert(number);
            }
        }
    }

    Ok(Some(PodWorkload {
        workload: Workload {
            uid: format!("{}/{}", key.namespace, key.name),
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            ips,
            node,
            service_account,
            identity,
            labels,
            enrolled: false,
            workload_name,
            workload_kind,
            canonical_service,
            canonical_revision,
            named_ports,
        },
        host_network: spec.host_network.unwrap_or(false),
    }))
}

fn first_label<'a>(labels: &'a Labels, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The workload a pod belongs to, as Istio names it for metrics: a ReplicaSet whose name is
/// `<deployment>-<pod-template-hash>` means the Deployment; another controller (StatefulSet,
/// DaemonSet, Job...) names itself; a bare pod is its own workload.
fn workload_name(pod_name: &str, labels: &Labels, owners: &[OwnerReference]) -> (String, String) {
    let controller = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first());
    let Some(owner) = controller else {
        return (pod_name.to_owned(), "pod".to_owned());
    };
    if owner.kind == "ReplicaSet" {
        let deployment = labels
            .get(POD_TEMPLATE_HASH_LABEL)
            .and_then(|hash| owner.name.strip_suffix(hash.as_str()))
            .and_then(|rest| rest.strip_suffix('-'))
            .filter(|name| !name.is_empty());
        if let Some(deployment) = deployment {
            return (deployment.to_owned(), "deployment".to_owned());
        }
    }
    (owner.name.clone(), owner.kind.to_ascii_lowercase())
}

// ---------------------------------------------------------------------------------------------
// Services and endpoints

fn service(
    config: &TranslateConfig,
    key: &ObjectKey,
    svc: &corev1::Service,
) -> Result<Service, TranslateError> {
    let no_spec = corev1::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&no_spec);
    let mut vips = Vec::new();
    match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => {
            for (i, s) in ips.iter().enumerate() {
                if is_cluster_ip(s) {
                    vips.push(ip(key, format!("spec.clusterIPs[{i}]"), s)?);
                }
            }
        }
        _ => {
            if let Some(s) = spec.cluster_ip.as_deref().filter(|s| is_cluster_ip(s)) {
                vips.push(ip(key, "spec.clusterIP".to_owned(), s)?);
            }
        }
    }

    let mut ports = Vec::new();
    for (i, p) in spec.ports.as_deref().unwrap_or_default().iter().enumerate() {
        let port = port_from_i32(key, format!("spec.ports[{i}].port"), p.port)?;
        let field = format!("spec.ports[{i}].targetPort");
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_from_i32(key, field, *n)?),
            // A quoted number is a number: treating "8080" as a port name would never resolve.
            Some(IntOrString::String(s))
                if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) =>
            {
                TargetPort::Number(port_from_str(key, field, s)?)
            }
            Some(IntOrString::String(s)) if s.is_empty() => {
                return Err(invalid(key, field, "a port name must not be empty"));
            }
            Some(IntOrString::String(s)) => TargetPort::Named(s.clone()),
        };
        ports.push(ServicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            target,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
            app_protocol: app_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
        });
    }

    Ok(Service {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        hostname: format!(
            "{}.{}.svc.{}",
            key.name, key.namespace, config.cluster_domain
        ),
        vips,
        ports,
        endpoints: Vec::new(),
        labels: labels(&svc.metadata),
        waypoint: None,
    })
}

/// Headless services say `None`; services of type ExternalName have no cluster IP at all.
/// Istio's protocol selection: `appProtocol` first, else the port name's prefix before `-`
/// (`http-web`, `grpc`, `tcp-db`), lower-cased. `None`: undeclared.
fn app_protocol(app_protocol: Option<&str>, name: Option<&str>) -> Option<String> {
    const KNOWN: [&str; 9] = [
        "http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo", "redis",
    ];
    if let Some(p) = app_protocol.filter(|p| !p.is_empty()) {
        return Some(p.to_ascii_lowercase());
    }
    let name = name?.to_ascii_lowercase();
    let prefix = name.split('-').next().unwrap_or_default();
    if name.starts_with("grpc-web") {
        return Some("grpc-web".to_owned());
    }
    KNOWN.contains(&prefix).then(|| prefix.to_owned())
}

fn is_cluster_ip(s: &str) -> bool {
    !s.is_empty() && s != "None"
}

fn endpoint_slice(
    key: &ObjectKey,
    slice: &discoveryv1::EndpointSlice,
) -> Result<Slice, TranslateError> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned();
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        debug!(slice = %key, address_type = slice.address_type, "endpoint slice is not of IP addresses; ignored");
        return Ok(Slice {
            service,
            endpoints: Vec::new(),
        });
    }
    let mut ports = BTreeMap::new();
    for (i, p) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let Some(n) = p.port else { continue };
        let number = port_from_i32(key, format!("ports[{i}].port"), n)?;
        ports.insert(p.name.clone().unwrap_or_default(), number);
    }
    let mut endpoints = Vec::new();
    for (e, endpoint) in slice.endpoints.iter().enumerate() {
        let ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        let workload_uid = endpoint
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                let name = r.name.as_deref()?;
                let namespace = r.namespace.as_deref().unwrap_or(&key.namespace);
                Some(format!("{namespace}/{name}"))
            });
        for (a, address) in endpoint.addresses.iter().enumerate() {
            endpoints.push(Endpoint {
                workload_uid: workload_uid.clone(),
                ip: ip(key, format!("endpoints[{e}].addresses[{a}]"), address)?,
                ready,
                ports: ports.clone(),
            });
        }
    }
    Ok(Slice { service, endpoints })
}

// ---------------------------------------------------------------------------------------------
// Policies

fn scope(
    config: &TranslateConfig,
    namespace: &str,
    selector: Option<&crd::WorkloadSelector>,
) -> PolicyScope {
    match selector.filter(|s| !s.match_labels.is_empty()) {
        Some(selector) => PolicyScope::WorkloadSelector {
            namespace: namespace.to_owned(),
            labels: selector.match_labels.clone(),
        },
        None if namespace == config.root_namespace => PolicyScope::Global,
        None => PolicyScope::Namespace(namespace.to_owned()),
    }
}

fn authorization_policy(
    config: &TranslateConfig,
    key: &ObjectKey,
    policy: &crd::AuthorizationPolicy,
) -> Result<Option<AuthorizationPolicy>, TranslateError> {
    let spec = &policy.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        debug!(policy = %key, "policy attaches to a waypoint or gateway (targetRef); not an L4 policy");
        return Ok(None);
    }
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" | "" => PolicyAction::Allow,
        "DENY" => PolicyAction::Deny,
        "AUDIT" | "CUSTOM" => {
            let action = spec.action.as_deref().unwrap_or_default();
            warn!(policy = %key, action, "ztunnel does not enforce {action} policies; skipped");
            return Ok(None);
        }
        other => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: "spec.action".to_owned(),
                value: other.to_owned(),
                expected: "ALLOW, DENY, AUDIT, CUSTOM".to_owned(),
            });
        }
    };
    let rules = spec
        .rules
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, rule)| translate_rule(key, &format!("spec.rules[{i}]"), rule))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(AuthorizationPolicy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        scope: scope(config, &key.namespace, spec.selector.as_ref()),
        action,
        rules,
    }))
}

fn string_matches(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| StringMatch::parse(v)).collect()
}

fn translate_rule(key: &ObjectKey, path: &str, rule: &crd::Rule) -> Result<Rule, TranslateError> {
    let mut l7_fields = Vec::new();
    let mut l7 = |field: String, values: &[String]| {
        if !values.is_empty() {
            l7_fields.push(field);
        }
    };

    let mut from = Vec::new();
    for (j, f) in rule.from.iter().enumerate() {
        let p = format!("{path}.from[{j}].source");
        let s = &f.source;
        l7(format!("{p}.requestPrincipals"), &s.request_principals);
        l7(
            format!("{p}.notRequestPrincipals"),
            &s.not_request_principals,
        );
        l7(format!("{p}.remoteIpBlocks"), &s.remote_ip_blocks);
        l7(format!("{p}.notRemoteIpBlocks"), &s.not_remote_ip_blocks);
        from.push(translate_source(key, &p, s)?);
    }

    let mut to = Vec::new();
    for (j, t) in rule.to.iter().enumerate() {
        let p = format!("{path}.to[{j}].operation");
        let o = &t.operation;
        l7(format!("{p}.hosts"), &o.hosts);
        l7(format!("{p}.notHosts"), &o.not_hosts);
        l7(format!("{p}.methods"), &o.methods);
        l7(format!("{p}.notMethods"), &o.not_methods);
        l7(format!("{p}.paths"), &o.paths);
        l7(format!("{p}.notPaths"), &o.not_paths);
        let ports = |field: &str, values: &[String]| {
            values
                .iter()
                .enumerate()
                .map(|(k, v)| port_from_str(key, format!("{p}.{field}[{k}]"), v))
                .collect::<Result<Vec<_>, _>>()
        };
        to.push(Operation {
            ports: ports("ports", &o.ports)?,
            not_ports: ports("notPorts", &o.not_ports)?,
        });
    }

    let mut when = Vec::new();
    for (j, c) in rule.when.iter().enumerate() {
        let p = format!("{path}.when[{j}]");
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(invalid(key, p, "one of values or notValues is required"));
        }
        let condition_key = match c.key.as_str() {
            "source.ip" => ConditionKey::SourceIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "" => return Err(invalid(key, format!("{p}.key"), "a key is required")),
            other => {
                l7_fields.push(format!("{p} ({other})"));
                continue;
            }
        };
        // Validate now so the data path can trust every value.
        for (field, values) in [("values", &c.values), ("notValues", &c.not_values)] {
            for (k, v) in values.iter().enumerate() {
                let field = format!("{p}.{field}[{k}]");
                match condition_key {
                    ConditionKey::SourceIp | ConditionKey::DestinationIp => {
                        ip_block(key, field, v)?;
                    }
                    ConditionKey::DestinationPort => {
                        port_from_str(key, field, v)?;
                    }
                    ConditionKey::SourceNamespace | ConditionKey::SourcePrincipal => {}
                }
            }
        }
        when.push(Condition {
            key: condition_key,
            values: c.values.clone(),
            not_values: c.not_values.clone(),
        });
    }

    Ok(Rule {
        from,
        to,
        when,
        l7_fields,
    })
}

/// The L4 part of `rules[].from[].source` (`p` is its field path), shared by ztunnel's
/// translation and the waypoint's.
fn translate_source(key: &ObjectKey, p: &str, s: &crd::Source) -> Result<Source, TranslateError> {
    // serviceAccounts and trustDomains are matched on the principal, so they share its
    // list; a rule with two of them in the positive lists would need an AND the list
    // cannot express, so it is refused rather than widened into an OR.
    let positive = [
        ("principals", s.principals.len()),
        ("serviceAccounts", s.service_accounts.len()),
        ("trustDomains", s.trust_domains.len()),
    ];
    let used: Vec<&str> = positive
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, _)| *name)
        .collect();
    if let [first, second, ..] = used.as_slice() {
        return Err(invalid(
            key,
            format!("{p}.{second}"),
            format!("{second} cannot be combined with {first}"),
        ));
    }
    let mut principals = string_matches(&s.principals);
    let mut not_principals = string_matches(&s.not_principals);
    for (field, values, out) in [
        ("trustDomains", &s.trust_domains, &mut principals),
        ("notTrustDomains", &s.not_trust_domains, &mut not_principals),
    ] {
        for (k, value) in values.iter().enumerate() {
            let matcher = trust_domain_match(value).ok_or_else(|| {
                invalid(
                    key,
                    format!("{p}.{field}[{k}]"),
                    format!("{value:?} is not a trust domain, `prefix*` or `*`"),
                )
            })?;
            out.push(matcher);
        }
    }
    for (field, values, out) in [
        ("serviceAccounts", &s.service_accounts, &mut principals),
        (
            "notServiceAccounts",
            &s.not_service_accounts,
            &mut not_principals,
        ),
    ] {
        for (k, value) in values.iter().enumerate() {
            let matcher = service_account_match(&key.namespace, value)
                .ok_or_else(|| invalid(
                    key,
                    format!("{p}.{field}[{k}]"),
                    format!("{value:?} is not <namespace>/<service account> or <service account> (no wildcards)"),
                ))?;
            out.push(matcher);
        }
    }
    let ip_blocks = |field: &str, values: &[String]| {
        values
            .iter()
            .enumerate()
            .map(|(k, v)| ip_block(key, format!("{p}.{field}[{k}]"), v))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Source {
        principals,
        not_principals,
        namespaces: string_matches(&s.namespaces),
        not_namespaces: string_matches(&s.not_namespaces),
        ip_blocks: ip_blocks("ipBlocks", &s.ip_blocks)?,
        not_ip_blocks: ip_blocks("notIpBlocks", &s.not_ip_blocks)?,
    })
}

/// `ns/sa` or `sa` (in the policy's namespace) as a principal matcher: Istio matches any trust
/// domain (`spiffe://*/ns/<ns>/sa/<sa>`), which is a suffix of the principal.
fn service_account_match(policy_namespace: &str, value: &str) -> Option<StringMatch> {
    let (ns, sa) = value.split_once('/').unwrap_or((policy_namespace, value));
    let valid = |s: &str| !s.is_empty() && !s.contains(['/', '*']);
    (valid(ns) && valid(sa)).then(|| StringMatch::Suffix(format!("/ns/{ns}/sa/{sa}")))
}

/// A trust domain pattern as a principal matcher: the trust domain is the principal's first
/// segment (`<td>/ns/<ns>/sa/<sa>`). Suffix patterns (`*.local`) cannot be expressed that way
/// and are refused rather than approximated.
fn trust_domain_match(value: &str) -> Option<StringMatch> {
    if value == "*" {
        return Some(StringMatch::Any);
    }
    let (domain, prefix) = match value.strip_suffix('*') {
        Some(domain) => (domain, true),
        None => (value, false),
    };
    if domain.is_empty() || domain.contains(['/', '*']) {
        return None;
    }
    Some(if prefix {
        StringMatch::Prefix(domain.to_owned())
    } else {
        StringMatch::Prefix(format!("{domain}/"))
    })
}

fn mtls_mode(
    key: &ObjectKey,
    field: String,
    mtls: Option<&crd::Mtls>,
) -> Result<MtlsMode, TranslateError> {
    match mtls.and_then(|m| m.mode.as_deref()).unwrap_or("UNSET") {
        "UNSET" | "" => Ok(MtlsMode::Unset),
        "PERMISSIVE" => Ok(MtlsMode::Permissive),
        "STRICT" => Ok(MtlsMode::Strict),
        "DISABLE" => Ok(MtlsMode::Disable),
        other => Err(TranslateError::NotOneOf {
            object: Box::new(key.clone()),
            field,
            value: other.to_owned(),
            expected: "UNSET, PERMISSIVE, STRICT, DISABLE".to_owned(),
        }),
    }
}

fn peer_authentication(
    config: &TranslateConfig,
    key: &ObjectKey,
    pa: &crd::PeerAuthentication,
) -> Result<PeerAuthentication, TranslateError> {
    let spec = &pa.spec;
    let mode = mtls_mode(key, "spec.mtls.mode".to_owned(), spec.mtls.as_ref())?;
    let mut port_modes = BTreeMap::new();
    for (port, mtls) in &spec.port_level_mtls {
        let field = format!("spec.portLevelMtls.{port}");
        let number = port_from_str(key, field.clone(), port)?;
        port_modes.insert(number, mtls_mode(key, format!("{field}.mode"), Some(mtls))?);
    }
    Ok(PeerAuthentication {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        scope: scope(config, &key.namespace, spec.selector.as_ref()),
        mode,
        port_modes,
    })
}

// ---------------------------------------------------------------------------------------------
// Assembly

fn assemble(config: &TranslateConfig, in_force: &BTreeMap<ObjectKey, Arc<Accepted>>) -> State {
    let mut state = State {
        root_namespace: config.root_namespace.clone(),
        ..State::default()
    };
    for (key, accepted) in in_force {
        if let Accepted::Namespace(labels) = accepted.as_ref() {
            state.namespaces.insert(key.name.clone(), labels.clone());
        }
    }

    let mut slices = Vec::new();
    let mut virtual_services = Vec::new();
    let mut route_objects = Vec::new();
    let mut grants = Vec::new();
    let mut destination_rules = Vec::new();
    let mut rate_limit_policies = Vec::new();
    let mut gateway_bound = Vec::new();
    let mut ingress_gateways: Vec<&IngressGateway> = Vec::new();
    let mut api_gateways: Vec<&ingress::ApiGateway> = Vec::new();
    for (key, accepted) in in_force {
        match accepted.as_ref() {
            Accepted::Namespace(_)
            | Accepted::Pod(None)
            | Accepted::Secret(None)
            | Accepted::Gateway(None) => {}
            Accepted::Pod(Some(pod)) => {
                let mut workload = pod.workload.clone();
                let namespace_ambient = state
                    .namespaces
                    .get(&workload.namespace)
                    .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                    .is_some_and(|v| v == DATAPLANE_MODE_AMBIENT);
                let opted_out = workload
                    .labels
                    .get(DATAPLANE_MODE_LABEL)
                    .is_some_and(|v| v == DATAPLANE_MODE_NONE);
                // Istio's waypoint template labels its pods `istio.io/dataplane-mode=none`,
                // which the opt-out above already honours; the controller label also catches
                // waypoints deployed by hand without it. A waypoint captured by ztunnel would
                // send its own upstream traffic back to itself.
                let waypoint = workload
                    .labels
                    .get(GATEWAY_MANAGED_LABEL)
                    .is_some_and(|v| v == WAYPOINT_CONTROLLER);
                workload.enrolled =
                    namespace_ambient && !opted_out && !waypoint && !pod.host_network;
                let workload = Arc::new(workload);
                if !pod.host_network {
                    for ip in &workload.ips {
                        if let Some(other) = state.by_ip.insert(*ip, workload.clone()) {
                            warn!(ip = %ip, pods = %format_args!("{}, {}", other.uid, workload.uid), "two running pods claim one IP; the latter is used");
                        }
                    }
                }
                state.workloads.insert(workload.uid.clone(), workload);
            }
            Accepted::Service(service) => {
                let mut service = service.clone();
                service.waypoint = waypoint_binding(&service, &state.namespaces);
                state.services.insert(service.key(), Arc::new(service));
            }
            Accepted::EndpointSlice(slice) => slices.push((key, slice)),
            Accepted::AuthorizationPolicy { l4, l7 } => {
                if let Some(policy) = l4 {
                    state.authorization_policies.push(Arc::new(policy.clone()));
                }
                // `in_force` iterates by key, so these stay sorted by key.
                if let Some(policy) = l7 {
                    state
                        .l7_authorization_policies
                        .push(Arc::new(policy.clone()));
                }
            }
            Accepted::PeerAuthentication(pa) => {
                state.peer_authentications.push(Arc::new(pa.clone()));
            }
            Accepted::VirtualService { mesh, gateways } => {
                if let Some(vs) = mesh {
                    virtual_services.push(vs.as_ref());
                }
                gateway_bound.extend(gateways.iter().map(|(g, vs)| (g.as_str(), vs)));
            }
            Accepted::IstioGateway(gateway) => ingress_gateways.push(gateway),
            Accepted::ApiGateway(gateway) => {
                ingress_gateways.push(&gateway.gateway);
                api_gateways.push(gateway);
            }
            Accepted::Secret(Some(secret)) => {
                state.secrets.insert(secret.key(), secret.clone());
            }
            Accepted::DestinationRule(dr) => destination_rules.push(dr.as_ref()),
            Accepted::Gateway(Some(gateway)) => {
                state.waypoint_gateways.insert(
                    format!("{}/{}", gateway.namespace, gateway.name),
                    gateway.clone(),
                );
            }
            Accepted::RateLimitPolicy(policy) => rate_limit_policies.push(policy),
            Accepted::GatewayRoute(route) => route_objects.push(route.as_ref()),
            Accepted::ReferenceGrant(grant) => grants.push(grant.clone()),
        }
    }

    // Services are Arc'd above for the common path; endpoints are attached by rebuilding the
    // few that have slices.
    let mut endpoints: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    for (key, slice) in slices {
        let Some(service) = &slice.service else {
            debug!(slice = %key, "endpoint slice has no {SERVICE_NAME_LABEL} label; ignored");
            continue;
        };
        let service_key = format!("{}/{}", key.namespace, service);
        if !state.services.contains_key(&service_key) {
            debug!(slice = %key, service = service_key, "endpoint slice of an unknown service; ignored");
            continue;
        }
        endpoints
            .entry(service_key)
            .or_default()
            .extend(slice.endpoints.iter().cloned());
    }
    for (service_key, service) in state.services.iter_mut() {
        match endpoints.remove(service_key) {
            Some(mut eps) => {
                eps.sort_by(|a, b| {
                    a.ip.cmp(&b.ip)
                        .then_with(|| a.workload_uid.cmp(&b.workload_uid))
                });
                Arc::make_mut(service).endpoints = eps;
            }
            None => debug!(service = service_key, "service has no endpoints"),
        }
    }
    for service in state.services.values() {
        for vip in &service.vips {
            state.by_vip.insert(*vip, service.clone());
        }
        if let Some(waypoint) = &service.waypoint
            && !state.services.contains_key(&waypoint.service_key())
        {
            debug!(service = %service.key(), %waypoint, "the service's waypoint has no Service (yet)");
        }
    }
    let from_gateway_routes = gateway_routes::attach(&state.services, &route_objects, &grants);
    let routes = networking::assemble_routes(
        &state.services,
        virtual_services,
        from_gateway_routes,
        destination_rules,
    );
    state.virtual_services = routes.virtual_services;
    state.destination_rules = routes.destination_rules;
    state.warnings = routes.warnings;
    state.gateway_virtual_services = ingress::assemble(gateway_bound);
    state.route_statuses = gateway_routes::route_statuses(
        &state.services,
        &api_gateways,
        &state.waypoint_gateways,
        &state.namespaces,
        &route_objects,
        &grants,
    );
    state
        .gateway_virtual_services
        .extend(gateway_routes::attach_to_gateways(
            &api_gateways,
            &state.namespaces,
            &route_objects,
            &grants,
        ));
    // Oldest first: of two Gateways claiming one port and host, the older wins.
    ingress_gateways.sort_by(|a, b| {
        a.created
            .cmp(&b.created)
            .then_with(|| a.key().cmp(&b.key()))
    });
    state.ingress_gateways = ingress_gateways
        .into_iter()
        .cloned()
        .map(Arc::new)
        .collect();
    // `in_force` iterates by key, so these stay sorted by key.
    for policy in rate_limit_policies {
        let mut policy = policy.clone();
        ratelimit::resolve_targets(&mut policy, &state.services, &state.waypoint_gateways);
        state.rate_limit_policies.push(Arc::new(policy));
    }
    state
}

/// Which waypoint serves `service`, as Istio decides it: `istio.io/use-waypoint` on the Service,
/// else on its Namespace; `none` opts out (on the Service, it also overrides its namespace's
/// waypoint). `istio.io/use-waypoint-namespace`, read from the same object as the name, names
/// the waypoint's namespace (default: the service's own).
///
/// A waypoint's own Service (named after its Gateway, in the waypoint's namespace, as Istio's
/// waypoint template names it; or carrying the Gateway API's gateway-name label) never gets a
/// waypoint, so a namespace-wide label cannot make a waypoint send traffic to itself.
fn waypoint_binding(
    service: &Service,
    namespaces: &BTreeMap<String, Labels>,
) -> Option<WaypointRef> {
    let labels = if service.labels.contains_key(USE_WAYPOINT_LABEL) {
        &service.labels
    } else {
        namespaces.get(&service.namespace)?
    };
    let name = labels
        .get(USE_WAYPOINT_LABEL)
        .filter(|n| !n.is_empty() && n.as_str() != "none")?;
    let namespace = labels
        .get(USE_WAYPOINT_NAMESPACE_LABEL)
        .filter(|ns| !ns.is_empty())
        .unwrap_or(&service.namespace);
    let waypoint = WaypointRef {
        namespace: namespace.clone(),
        name: name.clone(),
    };
    let is_the_waypoint = waypoint.namespace == service.namespace
        && (waypoint.name == service.name
            || service.labels.get(GATEWAY_NAME_LABEL) == Some(&waypoint.name));
    if is_the_waypoint {
        debug!(service = %service.key(), "a waypoint's own Service is not served by a waypoint");
        return None;
    }
    Some(waypoint)
}
