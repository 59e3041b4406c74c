//! Serde shapes of the Istio security resources the translation reads, as users write them in
//! `security.istio.io/v1` and `v1beta1` (the two versions share one schema).
//!
//! Istio's schema is closed, so the spec structs deny unknown fields: a typo such as `principal:`
//! must be an error naming the field, not a silently widened policy. Values stay as written
//! (strings); validating them is the translation's job, so its errors can name the field path.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// The API group of both resources.
pub const SECURITY_GROUP: &str = "security.istio.io";
/// The apiVersions accepted for both resources; they share one schema.
pub const SECURITY_API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// `kind: AuthorizationPolicy`. Closed at the top too: a misspelt `spec` would otherwise turn
/// into an empty ALLOW policy, which denies everything.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec:` written empty (YAML null) is the same as `spec: {}`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: AuthorizationPolicySpec,
    /// Written by Istio's controllers; not read.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    /// Gateway API attachment (`targetRef`/`targetRefs`): the policy belongs to a waypoint or
    /// gateway, not to ztunnel.
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Absent means no rules: an ALLOW policy then allows nothing.
    pub rules: Option<Vec<Rule>>,
    /// `ALLOW` (default), `DENY`, `AUDIT`, `CUSTOM`; kept as text so an unknown value gets an
    /// error naming it.
    pub action: Option<String>,
    /// Only meaningful with `CUSTOM`.
    pub provider: Option<ExtensionProvider>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
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
pub struct ExtensionProvider {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// `ns/sa` or `sa` (the policy's namespace); Istio 1.24+.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Trust domains of the peer identity; recent Istio releases.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Strings in Istio's schema (`"8080"`); a YAML number is accepted too.
    #[serde(default, deserialize_with = "strings_or_numbers")]
    pub ports: Vec<String>,
    #[serde(default, deserialize_with = "strings_or_numbers")]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, deserialize_with = "strings_or_numbers")]
    pub values: Vec<String>,
    #[serde(default, deserialize_with = "strings_or_numbers")]
    pub not_values: Vec<String>,
}

/// `kind: PeerAuthentication`; closed at the top like [`AuthorizationPolicy`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: PeerAuthenticationSpec,
    /// Written by Istio's controllers; not read.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<Mtls>,
    /// Keys are target ports. JSON makes them strings and YAML may make them numbers, so they
    /// are kept as text and validated by the translation.
    #[serde(default, deserialize_with = "port_keyed_map")]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    /// `UNSET` (absent), `PERMISSIVE`, `STRICT`, `DISABLE`.
    pub mode: Option<String>,
}

/// A scalar written as a string or, carelessly, as a number (`ports: [8080]`): Istio's
/// validating webhook coerces both, so a file should too.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    String(String),
    Unsigned(u64),
    Signed(i64),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::String(s) => s,
            Scalar::Unsigned(n) => n.to_string(),
            Scalar::Signed(n) => n.to_string(),
        }
    }
}

fn strings_or_numbers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let items = Vec::<Scalar>::deserialize(d)?;
    Ok(items.into_iter().map(Scalar::into_string).collect())
}

fn port_keyed_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Mtls>, D::Error> {
    #[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
    #[serde(transparent)]
    struct Key(#[serde(deserialize_with = "scalar_string")] String);
    let map = BTreeMap::<Key, Mtls>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k.0, v)).collect())
}

fn scalar_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Scalar::deserialize(d).map(Scalar::into_string)
}

/// `spec:` written empty (YAML null) is the same as `spec: {}`; shared with
/// [`super::networking_crd`].
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
