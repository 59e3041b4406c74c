//! Serde shape of this project's `RateLimitPolicy` (`mesh.ambient.dev/v1alpha1`), as users write
//! it (the CRD is `manifests/crds/ratelimitpolicy.yaml`).
//!
//! The schema is ours and closed (`deny_unknown_fields`): a typo such as `pathprefix:` must be an
//! error naming the field, not a rule that silently counts every request. Values stay as written
//! (signed integers, strings for enums) so the translation's errors can name the field and the
//! value (`requests: -5`, `unit: fortnight`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::istio_crd::null_as_default;

/// The API group of this project's own resources.
pub const MESH_GROUP: &str = "mesh.ambient.dev";
/// The apiVersions accepted for `RateLimitPolicy`.
pub const RATE_LIMIT_API_VERSIONS: [&str; 1] = ["mesh.ambient.dev/v1alpha1"];

/// `kind: RateLimitPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: RateLimitPolicySpec,
    /// Written by controllers; not read.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Gateway API `LocalPolicyTargetReference`, plus an optional `namespace` that must be the
/// policy's own (so a copy of an AuthorizationPolicy's `targetRefs` reads the same).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub name: Option<String>,
    /// Absent: every request to the target.
    #[serde(rename = "match", default, deserialize_with = "null_as_default")]
    pub matches: Match,
    /// Required.
    pub limit: Option<Limit>,
    /// Absent: `type: Global`.
    pub key: Option<Key>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    pub path_prefix: Option<String>,
    pub method: Option<String>,
    /// Header name -> exact value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limit {
    /// Signed, so `-5` reaches the translation and gets an error naming the field.
    pub requests: Option<i64>,
    /// `second`, `minute` or `hour`.
    pub unit: Option<String>,
    /// Bucket capacity; absent: `requests`.
    pub burst: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Key {
    /// `Global` (default), `SourcePrincipal` or `Header`.
    #[serde(rename = "type")]
    pub key_type: Option<String>,
    /// The header name, with `type: Header`.
    pub header: Option<String>,
}
