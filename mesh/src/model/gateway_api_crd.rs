//! Serde shape of the Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`, `v1beta1`), as
//! the translation reads it (see [`super::translate`] for what it becomes).
//!
//! Closed (`deny_unknown_fields`) like Istio's kinds: a `backendRef:` for `backendRefs:` must be
//! an error naming the field, not a rule that silently forwards nowhere. Values stay as written
//! (enums are strings, integers signed) so errors can name the field and the value. Fields of
//! the experimental channel that the waypoint does not apply (`sessionPersistence`,
//! `externalAuth`) are accepted as opaque values and reported by the translation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

use super::istio_crd::null_as_default;

/// The apiVersions accepted for `HTTPRoute` (one schema).
pub const HTTP_ROUTE_API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// `kind: HTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: HttpRouteSpec,
    /// Written by the route's controllers; not read.
    #[serde(default)]
    pub status: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<HttpRouteRule>,
}

/// `parentRefs[]`: a Service (the mesh binding, GEP-1426) or a Gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// Default `gateway.networking.k8s.io`; `""` (core) for a Service.
    pub group: Option<String>,
    /// Default `Gateway`.
    pub kind: Option<String>,
    /// Default: the route's namespace.
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    /// Empty: one match, path prefix `/`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub backend_refs: Vec<HttpBackendRef>,
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Experimental channel (GEP-1731).
    pub retry: Option<HttpRouteRetry>,
    /// Experimental channel; not applied (reported).
    pub session_persistence: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    pub path: Option<HttpPathMatch>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub headers: Vec<HttpValueMatch>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub query_params: Vec<HttpValueMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Default `/`.
    pub value: Option<String>,
}

/// `headers[]` and `queryParams[]` of a match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpValueMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_mirror: Option<RequestMirror>,
    pub request_redirect: Option<RequestRedirect>,
    pub url_rewrite: Option<UrlRewrite>,
    /// Not applied: refused by the translation.
    pub extension_ref: Option<Value>,
    /// Experimental channel (GEP-1767).
    pub cors: Option<HttpCorsFilter>,
    /// Experimental channel; refused by the translation.
    pub external_auth: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, deserialize_with = "null_as_default")]
    pub set: Vec<HttpHeader>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub add: Vec<HttpHeader>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    #[serde(default)]
    pub backend_ref: BackendObjectReference,
    pub percent: Option<i64>,
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fraction {
    #[serde(default)]
    pub numerator: i64,
    /// Default 100.
    pub denominator: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<HttpPathModifier>,
    pub port: Option<i64>,
    /// 301 or 302 (default 302).
    pub status_code: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<HttpPathModifier>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type", default)]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

/// A backend: a Service by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendObjectReference {
    /// Default `""` (core).
    pub group: Option<String>,
    /// Default `Service`.
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    /// Default: the route's namespace.
    pub namespace: Option<String>,
    /// Required for a Service.
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    /// Default 1.
    pub weight: Option<i64>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub filters: Vec<HttpRouteFilter>,
}

/// `retry` of a rule (experimental channel, GEP-1731).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    /// Response codes (400-599) that are retried.
    #[serde(default, deserialize_with = "null_as_default")]
    pub codes: Vec<i64>,
    /// Retries after the first try.
    pub attempts: Option<i64>,
    /// A Gateway API duration: the base of the back-off between attempts.
    pub backoff: Option<String>,
}

/// The `CORS` filter (experimental channel, GEP-1767).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCorsFilter {
    /// `*`, or `scheme://host[:port]` with an optional leading `*.` wildcard in the host.
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_origins: Vec<String>,
    pub allow_credentials: Option<bool>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_methods: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_headers: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub expose_headers: Vec<String>,
    /// Seconds (default 5).
    pub max_age: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// The apiVersions accepted for `ReferenceGrant` (one schema).
pub const REFERENCE_GRANT_API_VERSIONS: [&str; 3] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
    "gateway.networking.k8s.io/v1alpha2",
];

/// `kind: ReferenceGrant`: lets objects of the `from` kinds in other namespaces refer to the
/// `to` objects of the grant's namespace.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrant {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub from: Vec<ReferenceGrantFrom>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub to: Vec<ReferenceGrantTo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrantFrom {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrantTo {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    /// None: every object of the kind in the grant's namespace.
    pub name: Option<String>,
}

/// The apiVersions accepted for `GRPCRoute` (one schema; v1alpha2 is the experimental
/// version of Gateway API v1.0 and earlier).
pub const GRPC_ROUTE_API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1alpha2",
];

/// `kind: GRPCRoute`: HTTP/2 requests matched by gRPC service and method.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRoute {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: GrpcRouteSpec,
    /// Written by the route's controllers; not read.
    #[serde(default)]
    pub status: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    pub name: Option<String>,
    /// Empty: every gRPC request.
    #[serde(default, deserialize_with = "null_as_default")]
    pub matches: Vec<GrpcRouteMatch>,
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror`, `ExtensionRef`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Experimental channel; not applied (reported).
    pub session_persistence: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub headers: Vec<HttpValueMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The fully qualified service, `package.Service`.
    pub service: Option<String>,
    pub method: Option<String>,
}

/// The apiVersions accepted for `TCPRoute` (experimental channel).
pub const TCP_ROUTE_API_VERSIONS: [&str; 1] = ["gateway.networking.k8s.io/v1alpha2"];

/// The apiVersions accepted for `TLSRoute`: v1alpha2 and v1alpha3 (experimental channel) and
/// v1 (standard channel from Gateway API v1.5) share these fields.
pub const TLS_ROUTE_API_VERSIONS: [&str; 3] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1alpha3",
    "gateway.networking.k8s.io/v1alpha2",
];

/// `kind: TCPRoute` and `kind: TLSRoute`: connections forwarded as bytes to weighted
/// backends (TLSRoute: chosen by the ClientHello's SNI, matched against `hostnames`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Route {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: L4RouteSpec,
    /// Written by the route's controllers; not read.
    #[serde(default)]
    pub status: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4RouteSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub parent_refs: Vec<ParentReference>,
    /// TLSRoute only (a TCPRoute with hostnames is refused by the translation).
    #[serde(default, deserialize_with = "null_as_default")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<L4RouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4RouteRule {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub backend_refs: Vec<BackendRef>,
}

/// A weighted backend without filters (`TCPRoute`, `TLSRoute`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    /// Default 1.
    pub weight: Option<i64>,
}
