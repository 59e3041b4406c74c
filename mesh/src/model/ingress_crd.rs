//! Serde shape of Istio's `Gateway` (`networking.istio.io/v1`, `v1beta1`, `v1alpha3`, one
//! schema): the servers an ingress gateway's pods (those whose labels match `selector`) listen
//! on. Closed like the other Istio kinds, so `credentialname:` is an error naming the field,
//! not a server without a certificate. Values stay as written; the translation validates them
//! (`translate/ingress.rs`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

use super::istio_crd::null_as_default;

/// `kind: Gateway` of `networking.istio.io`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioGateway {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: IstioGatewaySpec,
    /// Written by Istio's controllers; not read.
    #[serde(default)]
    pub status: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioGatewaySpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    pub port: Option<ServerPort>,
    /// The address to listen on (Istio: an IP or a Unix socket); only an IP is accepted.
    #[serde(default)]
    pub bind: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub tls: Option<ServerTls>,
    #[serde(default)]
    pub name: Option<String>,
    /// Sidecar-only in Istio; refused with a message.
    #[serde(default)]
    pub default_endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerPort {
    /// Signed so that a negative value is reported, not a parse error.
    pub number: Option<i64>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Deprecated in Istio; accepted and ignored (the gateway listens on `number`).
    #[serde(default)]
    pub target_port: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    #[serde(default)]
    pub https_redirect: Option<bool>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Istio's list form (a certificate per key type); the first is used.
    #[serde(default)]
    pub credential_names: Vec<String>,
    /// Istio 1.28: the Secret holding the CA that client certificates are verified against
    /// (MUTUAL, OPTIONAL_MUTUAL), instead of the credential's `ca.crt`.
    #[serde(default)]
    pub ca_cert_credential_name: Option<String>,
    /// File paths inside the gateway pod: refused (use `credentialName`).
    #[serde(default)]
    pub server_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub ca_crl: Option<String>,
    #[serde(default)]
    pub tls_certificates: Vec<Value>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub verify_certificate_spki: Vec<String>,
    #[serde(default)]
    pub verify_certificate_hash: Vec<String>,
    #[serde(default)]
    pub min_protocol_version: Option<String>,
    #[serde(default)]
    pub max_protocol_version: Option<String>,
    #[serde(default)]
    pub cipher_suites: Vec<String>,
}
