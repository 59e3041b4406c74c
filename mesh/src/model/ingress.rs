//! The ingress side of the model: Istio `Gateway`s (what an ingress gateway's pods listen on)
//! and the TLS Secrets their servers name. Built by `translate/ingress.rs`; read by the
//! waypoint binary's ingress front door (`waypoint gateway`).

use std::collections::BTreeMap;
use std::fmt;

use super::Labels;

/// An Istio `Gateway` (`networking.istio.io`), validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IngressGateway {
    pub namespace: String,
    pub name: String,
    /// The gateway pods it applies to: every label must match. Empty selects every gateway
    /// pod (as in Istio, where it selects every workload).
    pub selector: Labels,
    pub servers: Vec<GatewayServer>,
    /// `metadata.creationTimestamp` (RFC 3339): of two Gateways claiming one port and host,
    /// the older wins.
    pub created: Option<String>,
    /// Which API wrote it.
    pub api: IngressApi,
}

/// The API an ingress Gateway comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum IngressApi {
    /// Istio's `Gateway` (`networking.istio.io`): applies to every gateway pod its selector
    /// matches, in any namespace; its routes are VirtualServices.
    Istio,
    /// The Gateway API's `Gateway` (`gateway.networking.k8s.io`) of the ingress class: applies
    /// to the gateway pods of its own namespace labelled
    /// `gateway.networking.k8s.io/gateway-name: <name>` (as Istio deploys them); its servers
    /// are its listeners and their routes the HTTPRoutes attached to each.
    GatewayApi,
}

impl IngressGateway {
    /// `namespace/name`, as VirtualServices name it in `gateways`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether a gateway pod with `labels` serves it.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    /// Whether a gateway pod with `labels` in `namespace` serves it: its selector matches and,
    /// for a Gateway API Gateway, the pod is in the Gateway's namespace.
    pub fn applies_to(&self, labels: &BTreeMap<String, String>, namespace: &str) -> bool {
        self.selects(labels) && (self.api == IngressApi::Istio || self.namespace == namespace)
    }

    /// The field its servers are written in, for messages.
    pub fn servers_field(&self) -> &'static str {
        match self.api {
            IngressApi::Istio => "spec.servers",
            IngressApi::GatewayApi => "spec.listeners",
        }
    }
}

/// One entry of `spec.servers`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GatewayServer {
    /// Position in `spec.servers`, for logs.
    pub index: usize,
    /// `name`, else `<port name>` (Istio's default).
    pub name: String,
    pub port: u16,
    /// `bind`: the address to listen on; `None`: every address of the pod.
    pub bind: Option<std::net::IpAddr>,
    pub protocol: ServerProtocol,
    pub hosts: Vec<ServerHost>,
    /// `None` for plain HTTP and TCP servers.
    pub tls: Option<ServerTls>,
    /// `tls.httpsRedirect`: an HTTP server answering every request with a 301 to `https://`.
    pub https_redirect: bool,
    /// The key of [`super::State::gateway_virtual_services`] its routes are under: the
    /// Gateway's `namespace/name` for an Istio Gateway (every server shares its
    /// VirtualServices), `namespace/name:listener` for a Gateway API listener (routes attach
    /// per listener).
    pub routes: String,
}

/// `port.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ServerProtocol {
    /// `HTTP`, `HTTP2`, `GRPC`, `GRPC-WEB`: HTTP/1.1 and HTTP/2 (prior knowledge).
    Http,
    /// HTTPS: TLS terminated here, then HTTP (ALPN `h2` / `http/1.1`).
    Https,
    /// TLS: terminated (`SIMPLE`/`MUTUAL`) then opaque TCP, or passed through by SNI.
    Tls,
    /// TCP (also `MONGO`): opaque bytes.
    Tcp,
}

impl ServerProtocol {
    /// What a listening port carries for servers of this protocol; servers of one port must
    /// agree (HTTPS and TLS servers share a port and are told apart by SNI).
    pub fn port_class(self) -> PortClass {
        match self {
            ServerProtocol::Http => PortClass::Http,
            ServerProtocol::Https | ServerProtocol::Tls => PortClass::Tls,
            ServerProtocol::Tcp => PortClass::Tcp,
        }
    }
}

/// What one listening port of a gateway carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum PortClass {
    /// Plain-text HTTP, routed by `Host`.
    Http,
    /// TLS, each connection's server chosen by SNI: terminated (HTTPS, TLS SIMPLE/MUTUAL) or
    /// passed through (PASSTHROUGH).
    Tls,
    /// Opaque TCP.
    Tcp,
}

impl std::fmt::Display for PortClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortClass::Http => "plain HTTP",
            PortClass::Tls => "TLS",
            PortClass::Tcp => "TCP",
        })
    }
}

/// One of `hosts`: `[namespace/]dnsName`. The namespace part restricts which namespaces'
/// VirtualServices may bind to the server (`*` any, `.` the Gateway's own).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerHost {
    /// `None`: any namespace.
    pub namespace: Option<String>,
    /// Lower case: `*`, `*.example.com` or `example.com`.
    pub host: String,
}

impl fmt::Display for ServerHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.host),
            None => write!(f, "*/{}", self.host),
        }
    }
}

/// `tls` of a server that terminates or passes TLS.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerTls {
    pub mode: TlsMode,
    /// The Secret with the certificate, in the gateway's namespace (`credentialName`). `None`
    /// only for PASSTHROUGH.
    pub credential: Option<String>,
    /// `caCertCredentialName`: the Secret with the CA client certificates are verified against
    /// (MUTUAL, OPTIONAL_MUTUAL); `None`: the credential's `ca.crt`, else the
    /// `<credentialName>-cacert` Secret.
    pub ca_credential: Option<String>,
    pub min_version: Option<TlsVersion>,
    pub max_version: Option<TlsVersion>,
    /// Names as Istio/BoringSSL spell them (`ECDHE-ECDSA-AES128-GCM-SHA256`, ...); empty: the
    /// defaults.
    pub cipher_suites: Vec<String>,
    /// MUTUAL: a client certificate must carry one of these SANs (DNS or URI); empty: any.
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TlsMode {
    Simple,
    /// Client certificate required and verified against the credential's CA.
    Mutual,
    /// Client certificate verified when sent.
    OptionalMutual,
    /// Not terminated: routed by SNI (`tls` routes of VirtualServices).
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum TlsVersion {
    V1_0,
    V1_1,
    V1_2,
    V1_3,
}

/// A Secret holding TLS material, as Istio's gateways read them: `tls.crt` / `tls.key` (type
/// `kubernetes.io/tls`) or `cert` / `key` (generic), a CA bundle under `ca.crt` or `cacert`,
/// or a `<name>-cacert` Secret holding only the CA. Never serialized: key material must not
/// reach `/config_dump` (see [`TlsSecret::summary`]).
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub namespace: String,
    pub name: String,
    /// Secret `resourceVersion` (or a hash of the data from files), so users of the secret
    /// can tell a rotation.
    pub version: String,
    pub cert_chain: Option<Vec<u8>>,
    pub private_key: Option<Vec<u8>>,
    pub ca_bundle: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSecret")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("cert_chain", &self.cert_chain.as_ref().map(Vec::len))
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("ca_bundle", &self.ca_bundle.as_ref().map(Vec::len))
            .finish()
    }
}

impl TlsSecret {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What may be shown: which parts are present, never their bytes.
    pub fn summary(&self) -> TlsSecretSummary {
        TlsSecretSummary {
            name: self.key(),
            version: self.version.clone(),
            has_certificate: self.cert_chain.is_some(),
            has_private_key: self.private_key.is_some(),
            has_ca_bundle: self.ca_bundle.is_some(),
        }
    }
}

/// A [`TlsSecret`] as `/config_dump` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsSecretSummary {
    pub name: String,
    pub version: String,
    pub has_certificate: bool,
    pub has_private_key: bool,
    pub has_ca_bundle: bool,
}

/// Serializes the secrets map as summaries only.
pub(super) fn serialize_secrets<S: serde::Serializer>(
    secrets: &BTreeMap<String, std::sync::Arc<TlsSecret>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(secrets.values().map(|s| s.summary()))
}
