//! Istio `Gateway`s and the TLS Secrets their servers name, for the ingress gateway
//! (`waypoint gateway`). Each Gateway is validated on its own, with Istio's rules where they
//! decide behaviour (a server needs a port, a protocol and hosts; HTTPS needs a credential;
//! `ns/host` host syntax), and every field this gateway cannot honour is refused with a message
//! rather than dropped (file-mounted certificates, `ISTIO_MUTUAL`, `defaultEndpoint`).
//!
//! The routes of a Gateway are the VirtualServices that name it in `gateways`; they are
//! translated with [`super::networking::Binding::Gateway`] and assembled in [`assemble`].

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as corev1;
use tracing::debug;

use super::networking::{AcceptedRoute, Binding, resolve_gateway_name, virtual_service_for};
use super::{Kind, ObjectKey, TranslateConfig, TranslateError, invalid, port_number};
use crate::model::ingress_crd as icrd;
use crate::model::networking_crd as ncrd;
use crate::model::{
    GatewayServer, IngressApi, IngressGateway, Labels, ServerHost, ServerProtocol, ServerTls,
    TlsMode, TlsSecret, TlsVersion, VirtualService,
};

type Result<T> = std::result::Result<T, TranslateError>;

/// Validates one Istio `Gateway`.
pub(super) fn istio_gateway(
    key: &ObjectKey,
    gateway: &icrd::IstioGateway,
) -> Result<IngressGateway> {
    let spec = &gateway.spec;
    if spec.servers.is_empty() {
        return Err(invalid(
            key,
            "spec.servers",
            "at least one server is required (a port, a protocol and hosts)",
        ));
    }
    let mut servers: Vec<GatewayServer> = Vec::new();
    for (i, written) in spec.servers.iter().enumerate() {
        let server = server(key, i, written)?;
        if let Some(other) = servers
            .iter()
            .find(|s| s.port == server.port && s.bind == server.bind)
            && other.protocol.port_class() != server.protocol.port_class()
        {
            return Err(invalid(
                key,
                format!("spec.servers[{i}].port.number"),
                format!(
                    "port {} is already a {} server (spec.servers[{}]); one port serves one of plain HTTP, TLS (HTTPS and TLS, told apart by SNI) or opaque TCP",
                    server.port,
                    other.protocol.port_class(),
                    other.index
                ),
            ));
        }
        servers.push(server);
    }
    Ok(IngressGateway {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        selector: spec.selector.clone(),
        servers,
        created: gateway
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        api: IngressApi::Istio,
    })
}

fn server(key: &ObjectKey, i: usize, s: &icrd::Server) -> Result<GatewayServer> {
    let p = format!("spec.servers[{i}]");
    let Some(port) = &s.port else {
        return Err(invalid(key, format!("{p}.port"), "a port is required"));
    };
    let Some(number) = port.number else {
        return Err(invalid(
            key,
            format!("{p}.port.number"),
            "a port number is required",
        ));
    };
    let number = port_number(number).ok_or_else(|| TranslateError::NotAPort {
        object: Box::new(key.clone()),
        field: format!("{p}.port.number"),
        value: number.to_string(),
    })?;
    let written_protocol = port.protocol.as_deref().unwrap_or_default();
    let mut protocol = match written_protocol.to_ascii_uppercase().as_str() {
        "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => ServerProtocol::Http,
        "HTTPS" => ServerProtocol::Https,
        "TLS" => ServerProtocol::Tls,
        "TCP" | "MONGO" => ServerProtocol::Tcp,
        _ => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: format!("{p}.port.protocol"),
                value: written_protocol.to_owned(),
                expected: "HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, TLS, TCP, MONGO".to_owned(),
            });
        }
    };
    if s.default_endpoint.is_some() {
        return Err(invalid(
            key,
            format!("{p}.defaultEndpoint"),
            "defaultEndpoint applies to sidecars only; not supported on a gateway",
        ));
    }
    let bind = match s.bind.as_deref().filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => Some(b.parse::<IpAddr>().map_err(|_| {
            invalid(
                key,
                format!("{p}.bind"),
                format!("{b:?} is not an IP address (Unix sockets are not supported)"),
            )
        })?),
    };
    if s.hosts.is_empty() {
        return Err(invalid(
            key,
            format!("{p}.hosts"),
            "at least one host is required (`*` for any)",
        ));
    }
    let hosts = s
        .hosts
        .iter()
        .enumerate()
        .map(|(j, h)| server_host(key, &format!("{p}.hosts[{j}]"), h))
        .collect::<Result<Vec<_>>>()?;
    let mut https_redirect = false;
    let tls = match &s.tls {
        None => None,
        Some(tls) => {
            https_redirect = tls.https_redirect.unwrap_or(false);
            server_tls(key, &format!("{p}.tls"), tls, protocol)?
        }
    };
    match (protocol, &tls) {
        (ServerProtocol::Https | ServerProtocol::Tls, None) => {
            return Err(invalid(
                key,
                format!("{p}.tls"),
                format!("a {written_protocol} server needs tls (mode and credentialName)"),
            ));
        }
        (ServerProtocol::Http | ServerProtocol::Tcp, Some(_)) => {
            return Err(invalid(
                key,
                format!("{p}.tls"),
                format!(
                    "a {written_protocol} server takes no TLS settings but httpsRedirect; use protocol HTTPS or TLS"
                ),
            ));
        }
        // An HTTPS port passed through unterminated is a TLS server routed by SNI (Istio's
        // "ingress gateway without TLS termination" task writes it so).
        (ServerProtocol::Https, Some(t)) if t.mode == TlsMode::Passthrough => {
            protocol = ServerProtocol::Tls;
        }
        _ => {}
    }
    if https_redirect && protocol != ServerProtocol::Http {
        debug!(gateway = %key, server = i, "httpsRedirect on a TLS server has no effect (as in Istio)");
        https_redirect = false;
    }
    let name = s
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| port.name.clone().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| format!("{}-{number}", written_protocol.to_ascii_lowercase()));
    Ok(GatewayServer {
        index: i,
        name,
        port: number,
        bind,
        protocol,
        hosts,
        tls,
        https_redirect,
        routes: key.namespace_name(),
    })
}

/// `[namespace/]host`, Istio's Gateway host syntax.
fn server_host(key: &ObjectKey, field: &str, written: &str) -> Result<ServerHost> {
    let (namespace, host) = match written.split_once('/') {
        None => (None, written),
        Some(("*", host)) => (None, host),
        Some((".", host)) => (Some(key.namespace.clone()), host),
        Some((ns, host)) => {
            if !is_dns_label(ns) {
                return Err(invalid(
                    key,
                    field,
                    format!(
                        "{written:?}: {ns:?} is not a namespace (`*`, `.` or a namespace name before the `/`)"
                    ),
                ));
            }
            (Some(ns.to_owned()), host)
        }
    };
    let host = host.to_ascii_lowercase();
    if host != "*" && !is_host_name(&host) {
        return Err(invalid(
            key,
            field,
            format!(
                "{written:?} is not a host: `*`, `*.example.com` or `example.com`, optionally after `namespace/` (no port, no scheme)"
            ),
        ));
    }
    Ok(ServerHost { namespace, host })
}

/// `example.com` or `*.example.com` (lower case; no port, no scheme, not `*` alone).
pub(super) fn is_host_name(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    host.len() <= 253 && !name.is_empty() && name.split('.').all(is_dns_label)
}

fn is_dns_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// `None`: only `httpsRedirect` is set (a plain HTTP server).
fn server_tls(
    key: &ObjectKey,
    p: &str,
    tls: &icrd::ServerTls,
    protocol: ServerProtocol,
) -> Result<Option<ServerTls>> {
    for (set, field) in [
        (tls.server_certificate.is_some(), "serverCertificate"),
        (tls.private_key.is_some(), "privateKey"),
        (tls.ca_certificates.is_some(), "caCertificates"),
        (tls.ca_crl.is_some(), "caCrl"),
        (!tls.tls_certificates.is_empty(), "tlsCertificates"),
    ] {
        if set {
            return Err(invalid(
                key,
                format!("{p}.{field}"),
                "certificates from files in the gateway pod are not supported: put them in a Secret (tls.crt, tls.key, ca.crt) and name it in credentialName",
            ));
        }
    }
    for (set, field) in [
        (
            !tls.verify_certificate_spki.is_empty(),
            "verifyCertificateSpki",
        ),
        (
            !tls.verify_certificate_hash.is_empty(),
            "verifyCertificateHash",
        ),
    ] {
        if set {
            return Err(invalid(
                key,
                format!("{p}.{field}"),
                "not supported; use subjectAltNames to restrict client certificates",
            ));
        }
    }
    let written_mode = tls.mode.as_deref().unwrap_or_default();
    let mode = match written_mode {
        "" if protocol == ServerProtocol::Http => return Ok(None),
        "SIMPLE" => TlsMode::Simple,
        "MUTUAL" => TlsMode::Mutual,
        "OPTIONAL_MUTUAL" => TlsMode::OptionalMutual,
        // Istio's default mode (the enum's zero value).
        "PASSTHROUGH" | "" => TlsMode::Passthrough,
        "ISTIO_MUTUAL" | "AUTO_PASSTHROUGH" => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: format!("{p}.mode"),
                value: written_mode.to_owned(),
                expected: "SIMPLE, MUTUAL, OPTIONAL_MUTUAL, PASSTHROUGH (ISTIO_MUTUAL and AUTO_PASSTHROUGH are for multi-network east-west gateways, which this gateway is not)".to_owned(),
            });
        }
        _ => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: format!("{p}.mode"),
                value: written_mode.to_owned(),
                expected: "SIMPLE, MUTUAL, OPTIONAL_MUTUAL, PASSTHROUGH".to_owned(),
            });
        }
    };
    let credential = tls
        .credential_name
        .clone()
        .filter(|c| !c.is_empty())
        .or_else(|| tls.credential_names.first().cloned());
    let credential = match credential {
        None if mode != TlsMode::Passthrough => {
            return Err(invalid(
                key,
                format!("{p}.credentialName"),
                format!(
                    "mode {written_mode} needs credentialName: the Secret (in the gateway's namespace) with tls.crt and tls.key"
                ),
            ));
        }
        None => None,
        Some(name) => {
            let name = name
                .strip_prefix("kubernetes://")
                .unwrap_or(&name)
                .to_owned();
            if !name.split('.').all(is_dns_label) || name.contains('/') {
                return Err(invalid(
                    key,
                    format!("{p}.credentialName"),
                    format!(
                        "{name:?} is not a Secret name (Secrets are read from the gateway's own namespace)"
                    ),
                ));
            }
            if mode == TlsMode::Passthrough {
                debug!(gateway = %key, field = p, "credentialName on a PASSTHROUGH server is not used");
                None
            } else {
                Some(name)
            }
        }
    };
    let version = |field: &str, v: &Option<String>| -> Result<Option<TlsVersion>> {
        Ok(match v.as_deref() {
            None | Some("" | "TLS_AUTO") => None,
            Some("TLSV1_0") => Some(TlsVersion::V1_0),
            Some("TLSV1_1") => Some(TlsVersion::V1_1),
            Some("TLSV1_2") => Some(TlsVersion::V1_2),
            Some("TLSV1_3") => Some(TlsVersion::V1_3),
            Some(other) => {
                return Err(TranslateError::NotOneOf {
                    object: Box::new(key.clone()),
                    field: format!("{p}.{field}"),
                    value: other.to_owned(),
                    expected: "TLS_AUTO, TLSV1_0, TLSV1_1, TLSV1_2, TLSV1_3".to_owned(),
                });
            }
        })
    };
    let min_version = version("minProtocolVersion", &tls.min_protocol_version)?;
    let max_version = version("maxProtocolVersion", &tls.max_protocol_version)?;
    if let (Some(min), Some(max)) = (min_version, max_version)
        && min > max
    {
        return Err(invalid(
            key,
            format!("{p}.minProtocolVersion"),
            "is above maxProtocolVersion",
        ));
    }
    let ca_credential = match tls
        .ca_cert_credential_name
        .as_deref()
        .filter(|n| !n.is_empty())
    {
        None => None,
        Some(_) if !matches!(mode, TlsMode::Mutual | TlsMode::OptionalMutual) => {
            return Err(invalid(
                key,
                format!("{p}.caCertCredentialName"),
                format!(
                    "only MUTUAL and OPTIONAL_MUTUAL verify client certificates; mode is {written_mode}"
                ),
            ));
        }
        Some(name) => {
            let name = name.strip_prefix("kubernetes://").unwrap_or(name);
            if !name.split('.').all(is_dns_label) || name.contains('/') {
                return Err(invalid(
                    key,
                    format!("{p}.caCertCredentialName"),
                    format!(
                        "{name:?} is not a Secret name (read from the gateway's own namespace; ConfigMaps are not read)"
                    ),
                ));
            }
            Some(name.to_owned())
        }
    };
    Ok(Some(ServerTls {
        mode,
        credential,
        ca_credential,
        min_version,
        max_version,
        cipher_suites: tls.cipher_suites.clone(),
        subject_alt_names: tls.subject_alt_names.clone(),
    }))
}

/// A Secret with TLS material (see [`TlsSecret`] for the keys read); `None` for any other
/// Secret, which is none of the gateway's business.
pub(super) fn tls_secret(key: &ObjectKey, secret: &corev1::Secret) -> Result<Option<TlsSecret>> {
    let mut data: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        data.insert(k, v.0.clone());
    }
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k, v.clone().into_bytes());
    }
    let take = |names: [&str; 2]| names.iter().find_map(|n| data.get(n).cloned());
    let cert_chain = take(["tls.crt", "cert"]);
    let private_key = take(["tls.key", "key"]);
    let ca_bundle = take(["ca.crt", "cacert"]);
    if cert_chain.is_none() && private_key.is_none() && ca_bundle.is_none() {
        return Ok(None);
    }
    if cert_chain.is_some() != private_key.is_some() {
        let (has, lacks) = if cert_chain.is_some() {
            ("a certificate", "tls.key (or key)")
        } else {
            ("a private key", "tls.crt (or cert)")
        };
        return Err(invalid(key, "data", format!("has {has} but no {lacks}")));
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&cert_chain, &private_key, &ca_bundle).hash(&mut hasher);
    Ok(Some(TlsSecret {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        version: format!("{:016x}", hasher.finish()),
        cert_chain,
        private_key,
        ca_bundle,
    }))
}

/// Every Gateway a VirtualService names in `spec.gateways` (not `mesh`), as `namespace/name`.
pub(super) fn bound_gateways(key: &ObjectKey, vs: &ncrd::VirtualService) -> Vec<String> {
    let mut out: Vec<String> = vs
        .spec
        .gateways
        .iter()
        .filter_map(|g| resolve_gateway_name(g, &key.namespace))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The VirtualService as each of its Gateways sees it.
pub(super) fn gateway_virtual_services(
    config: &TranslateConfig,
    key: &ObjectKey,
    vs: &ncrd::VirtualService,
) -> Result<Vec<(String, AcceptedRoute<VirtualService>)>> {
    let mut out = Vec::new();
    for gateway in bound_gateways(key, vs) {
        if let Some(route) = virtual_service_for(config, key, vs, Binding::Gateway(&gateway))? {
            out.push((gateway, route));
        }
    }
    Ok(out)
}

/// Orders each Gateway's VirtualServices oldest first (then by key), the order in which a host
/// claimed twice goes to the first.
pub(super) fn assemble(
    bound: Vec<(&str, &AcceptedRoute<VirtualService>)>,
) -> BTreeMap<String, Vec<Arc<VirtualService>>> {
    let mut by_gateway: BTreeMap<String, Vec<&AcceptedRoute<VirtualService>>> = BTreeMap::new();
    for (gateway, route) in bound {
        by_gateway
            .entry(gateway.to_owned())
            .or_default()
            .push(route);
    }
    by_gateway
        .into_iter()
        .map(|(gateway, mut routes)| {
            routes.sort_by(|a, b| {
                a.created_at
                    .cmp(&b.created_at)
                    .then_with(|| a.value.key().cmp(&b.value.key()))
            });
            let routes = routes
                .into_iter()
                .map(|r| Arc::new(r.value.clone()))
                .collect();
            (gateway, routes)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Gateway API `Gateway` of the ingress class

/// A Gateway API `Gateway` of the ingress class: the [`IngressGateway`] its listeners make, and
/// what each listener lets attach (routes are attached in `gateway_routes::attach_to_gateways`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ApiGateway {
    pub(super) gateway: IngressGateway,
    pub(super) listeners: Vec<ApiListener>,
}

/// One listener, as routes see it (Gateway API, "Listener" and "AllowedRoutes").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ApiListener {
    /// The `sectionName` of `parentRefs`.
    pub(super) name: String,
    pub(super) port: u16,
    /// Lower case; `None`: every hostname.
    pub(super) hostname: Option<String>,
    pub(super) namespaces: AllowedNamespaces,
    /// The route kinds that may attach: `allowedRoutes.kinds`, or by protocol when it is
    /// empty (`HTTP`/`HTTPS`: HTTPRoute and GRPCRoute; `TLS` Passthrough: TLSRoute; `TLS`
    /// Terminate and `TCP`: TCPRoute).
    pub(super) kinds: Vec<Kind>,
    /// The key its routes go under ([`GatewayServer::routes`]).
    pub(super) routes_key: String,
}

/// `allowedRoutes.namespaces.from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AllowedNamespaces {
    /// The Gateway's namespace (the default).
    Same,
    All,
    /// Namespaces carrying every label of `selector.matchLabels`.
    Selector(Labels),
}

impl AllowedNamespaces {
    /// Whether a route in `namespace` (labels `labels`) may attach to a listener of a Gateway
    /// in `gateway_namespace`.
    pub(super) fn allow(
        &self,
        gateway_namespace: &str,
        namespace: &str,
        labels: Option<&Labels>,
    ) -> bool {
        match self {
            AllowedNamespaces::Same => namespace == gateway_namespace,
            AllowedNamespaces::All => true,
            AllowedNamespaces::Selector(selector) => labels.is_some_and(|labels| {
                selector
                    .iter()
                    .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
            }),
        }
    }
}

/// Validates a Gateway API `Gateway` of the ingress class (Gateway API v1.2, "Gateway" and
/// "Listener"): listeners `HTTP`, `HTTPS` (TLS `Terminate`) and `TLS` (`Terminate` or
/// `Passthrough`) with a `hostname`, one `certificateRefs` Secret of the Gateway's namespace
/// and `allowedRoutes`. The Gateway applies to the gateway pods of its namespace labelled
/// `gateway.networking.k8s.io/gateway-name: <name>`, as Istio deploys them. What this gateway
/// cannot serve is refused naming the field (the last good version stays), never dropped.
pub(super) fn api_gateway(key: &ObjectKey, gw: &ncrd::Gateway) -> Result<ApiGateway> {
    let spec = &gw.spec;
    if spec.listeners.is_empty() {
        return Err(invalid(
            key,
            "spec.listeners",
            "at least one listener is required (name, port, protocol)",
        ));
    }
    let mut servers: Vec<GatewayServer> = Vec::new();
    let mut listeners: Vec<ApiListener> = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let p = format!("spec.listeners[{i}]");
        if l.name.is_empty() {
            return Err(invalid(key, format!("{p}.name"), "a listener needs a name"));
        }
        if let Some(other) = listeners.iter().position(|o| o.name == l.name) {
            return Err(invalid(
                key,
                format!("{p}.name"),
                format!(
                    "{:?} is already the name of spec.listeners[{other}]; names are unique",
                    l.name
                ),
            ));
        }
        let port = port_number(l.port).ok_or_else(|| TranslateError::NotAPort {
            object: Box::new(key.clone()),
            field: format!("{p}.port"),
            value: l.port.to_string(),
        })?;
        let hostname = match l.hostname.as_deref().filter(|h| !h.is_empty()) {
            None => None,
            Some(h) => {
                let lower = h.to_ascii_lowercase();
                if !is_host_name(&lower) {
                    return Err(invalid(
                        key,
                        format!("{p}.hostname"),
                        format!(
                            "{h:?} is not a hostname: `example.com` or `*.example.com` (no IP, no port; leave it out for any)"
                        ),
                    ));
                }
                Some(lower)
            }
        };
        let (protocol, tls) = listener_tls(key, &p, l)?;
        let passthrough = tls.as_ref().is_some_and(|t| t.mode == TlsMode::Passthrough);
        let (namespaces, kinds) = allowed_routes(key, &p, l, route_kinds(protocol, passthrough))?;
        if let Some(other) = servers
            .iter()
            .find(|s| s.port == port && s.protocol.port_class() != protocol.port_class())
        {
            return Err(invalid(
                key,
                format!("{p}.port"),
                format!(
                    "port {port} is already a {} listener ({:?}); one port serves one of plain HTTP or TLS (HTTPS and TLS, told apart by SNI)",
                    other.protocol.port_class(),
                    other.name
                ),
            ));
        }
        let routes_key = format!("{}:{}", key.namespace_name(), l.name);
        servers.push(GatewayServer {
            index: i,
            name: l.name.clone(),
            port,
            bind: None,
            protocol,
            hosts: vec![ServerHost {
                namespace: None,
                host: hostname.clone().unwrap_or_else(|| "*".to_owned()),
            }],
            tls,
            https_redirect: false,
            routes: routes_key.clone(),
        });
        listeners.push(ApiListener {
            name: l.name.clone(),
            port,
            hostname,
            namespaces,
            kinds,
            routes_key,
        });
    }
    Ok(ApiGateway {
        gateway: IngressGateway {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            selector: [(super::GATEWAY_NAME_LABEL.to_owned(), key.name.clone())].into(),
            servers,
            created: gw
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            api: IngressApi::GatewayApi,
        },
        listeners,
    })
}

/// A listener's protocol and TLS settings.
fn listener_tls(
    key: &ObjectKey,
    p: &str,
    l: &ncrd::GatewayListener,
) -> Result<(ServerProtocol, Option<ServerTls>)> {
    let protocol = match l.protocol.as_str() {
        "HTTP" => ServerProtocol::Http,
        "HTTPS" => ServerProtocol::Https,
        "TLS" => ServerProtocol::Tls,
        "TCP" => ServerProtocol::Tcp,
        "UDP" => {
            return Err(invalid(
                key,
                format!("{p}.protocol"),
                "UDP listeners are not served by this gateway (UDPRoute); the ingress carries TCP only",
            ));
        }
        other => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: format!("{p}.protocol"),
                value: other.to_owned(),
                expected: "HTTP, HTTPS, TLS, TCP".to_owned(),
            });
        }
    };
    let tls = match (&l.tls, protocol) {
        (None, ServerProtocol::Http | ServerProtocol::Tcp) => return Ok((protocol, None)),
        (Some(_), ServerProtocol::Http | ServerProtocol::Tcp) => {
            return Err(invalid(
                key,
                format!("{p}.tls"),
                format!(
                    "a {} listener takes no tls; use protocol HTTPS or TLS",
                    l.protocol
                ),
            ));
        }
        (None, _) => {
            return Err(invalid(
                key,
                format!("{p}.tls"),
                format!(
                    "a {} listener needs tls (certificateRefs, or mode: Passthrough for TLS)",
                    l.protocol
                ),
            ));
        }
        (Some(tls), _) => tls,
    };
    let mode = match tls.mode.as_deref().unwrap_or("Terminate") {
        "Terminate" => TlsMode::Simple,
        "Passthrough" if protocol == ServerProtocol::Tls => TlsMode::Passthrough,
        "Passthrough" => {
            return Err(invalid(
                key,
                format!("{p}.tls.mode"),
                "an HTTPS listener terminates TLS; pass TLS through with protocol TLS",
            ));
        }
        other => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: format!("{p}.tls.mode"),
                value: other.to_owned(),
                expected: "Terminate, Passthrough".to_owned(),
            });
        }
    };
    let credential = if mode == TlsMode::Passthrough {
        if !tls.certificate_refs.is_empty() {
            debug!(gateway = %key, listener = l.name, "certificateRefs of a Passthrough listener are not used");
        }
        None
    } else {
        let refs = &tls.certificate_refs;
        let Some(first) = refs.first() else {
            return Err(invalid(
                key,
                format!("{p}.tls.certificateRefs"),
                "a listener that terminates TLS needs a certificateRef: a Secret with tls.crt and tls.key",
            ));
        };
        if refs.len() > 1 {
            return Err(invalid(
                key,
                format!("{p}.tls.certificateRefs[1]"),
                "one certificate per listener is served; name one Secret",
            ));
        }
        let r = format!("{p}.tls.certificateRefs[0]");
        let (group, kind) = (
            first.group.as_deref().unwrap_or(""),
            first.kind.as_deref().unwrap_or("Secret"),
        );
        if (group, kind) != ("", "Secret") {
            return Err(invalid(
                key,
                format!("{r}.kind"),
                format!("{group}/{kind} is not a Secret (InvalidCertificateRef)"),
            ));
        }
        if first
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != key.namespace)
        {
            return Err(invalid(
                key,
                format!("{r}.namespace"),
                "a Secret of another namespace is not served yet: the gateway reads Secrets of its own namespace (the Gateway's); create the Secret there",
            ));
        }
        if first.name.is_empty() || !first.name.split('.').all(is_dns_label) {
            return Err(invalid(
                key,
                format!("{r}.name"),
                format!("{:?} is not a Secret name", first.name),
            ));
        }
        Some(first.name.clone())
    };
    Ok((
        protocol,
        Some(ServerTls {
            mode,
            credential,
            ca_credential: None,
            min_version: None,
            max_version: None,
            cipher_suites: Vec::new(),
            subject_alt_names: Vec::new(),
        }),
    ))
}

/// The route kinds a listener takes ("Listener.allowedRoutes": "When unspecified or empty,
/// the kinds of Routes selected are determined using the Listener protocol"). A TLS listener
/// that terminates hands the decrypted bytes to TCPRoutes; one passing TLS through chooses a
/// TLSRoute by SNI.
fn route_kinds(protocol: ServerProtocol, passthrough: bool) -> &'static [Kind] {
    match protocol {
        ServerProtocol::Http | ServerProtocol::Https => &[Kind::HttpRoute, Kind::GrpcRoute],
        ServerProtocol::Tls if passthrough => &[Kind::TlsRoute],
        _ => &[Kind::TcpRoute],
    }
}

/// `allowedRoutes`: which namespaces, and which of the route kinds the protocol can carry
/// (`compatible`) may attach.
fn allowed_routes(
    key: &ObjectKey,
    p: &str,
    l: &ncrd::GatewayListener,
    compatible: &[Kind],
) -> Result<(AllowedNamespaces, Vec<Kind>)> {
    let Some(allowed) = &l.allowed_routes else {
        return Ok((AllowedNamespaces::Same, compatible.to_vec()));
    };
    let namespaces = match &allowed.namespaces {
        None => AllowedNamespaces::Same,
        Some(ns) => match ns.from.as_deref().unwrap_or("Same") {
            "Same" => AllowedNamespaces::Same,
            "All" => AllowedNamespaces::All,
            "Selector" => {
                let Some(selector) = &ns.selector else {
                    return Err(invalid(
                        key,
                        format!("{p}.allowedRoutes.namespaces.selector"),
                        "from: Selector needs a selector",
                    ));
                };
                if !selector.match_expressions.is_empty() {
                    return Err(invalid(
                        key,
                        format!("{p}.allowedRoutes.namespaces.selector.matchExpressions"),
                        "not supported; select namespaces with matchLabels",
                    ));
                }
                AllowedNamespaces::Selector(selector.match_labels.clone())
            }
            other => {
                return Err(TranslateError::NotOneOf {
                    object: Box::new(key.clone()),
                    field: format!("{p}.allowedRoutes.namespaces.from"),
                    value: other.to_owned(),
                    expected: "Same, All, Selector".to_owned(),
                });
            }
        },
    };
    if allowed.kinds.is_empty() {
        return Ok((namespaces, compatible.to_vec()));
    }
    let mut kinds = Vec::new();
    for (j, k) in allowed.kinds.iter().enumerate() {
        let group = k.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = compatible
            .iter()
            .find(|c| group == "gateway.networking.k8s.io" && c.as_str() == k.kind);
        match kind {
            Some(kind) => {
                if !kinds.contains(kind) {
                    kinds.push(*kind);
                }
            }
            None => {
                let names: Vec<&str> = compatible.iter().map(|c| c.as_str()).collect();
                return Err(invalid(
                    key,
                    format!("{p}.allowedRoutes.kinds[{j}]"),
                    format!(
                        "{group}/{} cannot attach to this {} listener (InvalidRouteKinds); it takes {}",
                        k.kind,
                        l.protocol,
                        names.join(", ")
                    ),
                ));
            }
        }
    }
    Ok((namespaces, kinds))
}
