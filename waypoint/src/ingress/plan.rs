//! Pure: which ports this ingress gateway listens on and which Gateway servers each port
//! serves, from one [`State`], the gateway's pod labels and its namespace (where the servers'
//! Secrets are read, as Istio reads them from the gateway Deployment's namespace).
//!
//! Rules, in order: Gateways are taken oldest first (the state's order); a Gateway applies
//! when its `selector` matches the labels; a server that cannot be served becomes a
//! [`Problem`] and every other server stays. One port carries one [`PortClass`]: plain HTTP,
//! TLS (HTTPS and TLS servers, terminated or passed through, told apart by SNI) or opaque TCP
//! (the older Gateway's class wins), and a host two Gateways both claim on one port goes to the
//! older (the younger server is not served there, and the conflict is reported).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh::model::{GatewayServer, PortClass, State, TlsMode, TlsSecret};

/// What to listen on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ports: BTreeMap<SocketAddr, PortPlan>,
    pub problems: Vec<Problem>,
}

/// One listening address and the servers it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    pub class: PortClass,
    /// Oldest Gateway first, then in `spec.servers` order.
    pub servers: Vec<PlannedServer>,
}

/// A server to serve, with its TLS material found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedServer {
    /// `namespace/name` of the Gateway.
    pub gateway: String,
    /// `spec.servers` (Istio) or `spec.listeners` (Gateway API).
    pub field: &'static str,
    pub server: GatewayServer,
    /// The `credentialName` Secret (TLS servers).
    pub credential: Option<Arc<TlsSecret>>,
    /// The CA bundle client certificates are verified against (MUTUAL, OPTIONAL_MUTUAL): the
    /// `caCertCredentialName` Secret when named, else the credential's `ca.crt`, else the
    /// `<credentialName>-cacert` Secret.
    pub client_ca: Option<Arc<TlsSecret>>,
}

impl PlannedServer {
    /// `gateway/server-name`, for logs.
    pub fn describe(&self) -> String {
        format!(
            "Gateway {} server {:?} ({}[{}], port {})",
            self.gateway, self.server.name, self.field, self.server.index, self.server.port
        )
    }
}

/// A server that is not served, and why. Each is logged once and exported as a metric while it
/// lasts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Problem {
    pub gateway: String,
    pub server: String,
    pub port: u16,
    /// `namespace/name` of the Secret involved, or empty.
    pub secret: String,
    /// Short and stable, the metric's `reason` label.
    pub reason: &'static str,
    /// What to check, for the log.
    pub message: String,
}

pub const MISSING_SECRET: &str = "secret_not_found";
pub const INCOMPLETE_SECRET: &str = "secret_incomplete";
pub const MISSING_CA: &str = "ca_not_found";
pub const PORT_CONFLICT: &str = "port_conflict";
pub const HOST_CONFLICT: &str = "host_conflict";
/// Set by the TLS builder, not here: bad PEM, key and certificate that do not match.
pub const INVALID_CREDENTIAL: &str = "invalid_credential";
/// Set by the listener manager: the port could not be bound.
pub const BIND_FAILED: &str = "bind_failed";

/// The plan for a gateway pod with `labels` in `namespace`, binding `default_bind` unless a
/// server names its own address.
pub fn plan(
    state: &State,
    labels: &BTreeMap<String, String>,
    namespace: &str,
    default_bind: IpAddr,
) -> Plan {
    let mut out = Plan::default();
    for gateway in state
        .ingress_gateways
        .iter()
        .filter(|g| g.applies_to(labels, namespace))
    {
        let key = gateway.key();
        for server in &gateway.servers {
            let problem = |reason: &'static str, secret: String, message: String| Problem {
                gateway: key.clone(),
                server: server.name.clone(),
                port: server.port,
                secret,
                reason,
                message,
            };
            let class = server.protocol.port_class();
            let (credential, client_ca) = match credentials(state, namespace, server) {
                Ok(found) => found,
                Err((reason, secret, message)) => {
                    out.problems.push(problem(reason, secret, message));
                    continue;
                }
            };
            let addr = SocketAddr::new(server.bind.unwrap_or(default_bind), server.port);
            let port = out.ports.entry(addr).or_insert_with(|| PortPlan {
                class,
                servers: Vec::new(),
            });
            if port.class != class {
                out.problems.push(problem(
                    PORT_CONFLICT,
                    String::new(),
                    format!(
                        "port {} is already served as {} by an older server ({}); a port carries one of plain HTTP, TLS (HTTPS and TLS servers) or TCP",
                        server.port,
                        port.class,
                        port.servers.first().map(PlannedServer::describe).unwrap_or_default()
                    ),
                ));
                continue;
            }
            let clash = port.servers.iter().find(|other| {
                other.gateway != key
                    && other
                        .server
                        .hosts
                        .iter()
                        .any(|h| server.hosts.iter().any(|mine| mine.host == h.host))
            });
            if let Some(other) = clash {
                out.problems.push(problem(
                    HOST_CONFLICT,
                    String::new(),
                    format!(
                        "a host of this server is already served on port {} by the older {}; the older Gateway wins (give the servers distinct hosts or ports)",
                        server.port,
                        other.describe()
                    ),
                ));
                continue;
            }
            port.servers.push(PlannedServer {
                gateway: key.clone(),
                field: gateway.servers_field(),
                server: server.clone(),
                credential,
                client_ca,
            });
        }
    }
    out.ports.retain(|_, p| !p.servers.is_empty());
    out.problems.sort();
    out
}

type Found = (Option<Arc<TlsSecret>>, Option<Arc<TlsSecret>>);

fn credentials(
    state: &State,
    namespace: &str,
    server: &GatewayServer,
) -> Result<Found, (&'static str, String, String)> {
    let Some(tls) = &server.tls else {
        return Ok((None, None));
    };
    let Some(name) = &tls.credential else {
        return Ok((None, None));
    };
    let key = format!("{namespace}/{name}");
    let Some(secret) = state.secrets.get(&key) else {
        return Err((
            MISSING_SECRET,
            key.clone(),
            format!(
                "Secret {key} (credentialName) does not exist or holds no TLS keys (tls.crt and tls.key, or cert and key); create it in the gateway's namespace {namespace}"
            ),
        ));
    };
    if secret.cert_chain.is_none() || secret.private_key.is_none() {
        return Err((
            INCOMPLETE_SECRET,
            key.clone(),
            format!("Secret {key} has no tls.crt/tls.key (or cert/key)"),
        ));
    }
    let client_ca = match tls.mode {
        TlsMode::Mutual | TlsMode::OptionalMutual => {
            Some(client_ca(state, namespace, &key, secret, tls)?)
        }
        TlsMode::Simple | TlsMode::Passthrough => None,
    };
    Ok((Some(secret.clone()), client_ca))
}

/// The CA bundle that verifies client certificates of a MUTUAL / OPTIONAL_MUTUAL server whose
/// credential is `secret` (Secret `key`): the `caCertCredentialName` Secret when named, else the
/// credential's own `ca.crt`, else the `<credentialName>-cacert` Secret (Istio's order).
fn client_ca(
    state: &State,
    namespace: &str,
    key: &str,
    secret: &Arc<TlsSecret>,
    tls: &mesh::model::ServerTls,
) -> Result<Arc<TlsSecret>, (&'static str, String, String)> {
    let (ca_key, named, message) = match &tls.ca_credential {
        Some(name) => {
            let ca_key = format!("{namespace}/{name}");
            let message = format!(
                "Secret {ca_key} (caCertCredentialName) does not exist or holds no ca.crt; create it in the gateway's namespace {namespace}"
            );
            (ca_key.clone(), ca_key, message)
        }
        None if secret.ca_bundle.is_some() => return Ok(secret.clone()),
        None => {
            let ca_key = format!("{key}-cacert");
            let message = format!(
                "mode {:?} needs a CA to verify clients: ca.crt in Secret {key}, or a Secret {ca_key} with ca.crt",
                tls.mode
            );
            (ca_key, key.to_owned(), message)
        }
    };
    state
        .secrets
        .get(&ca_key)
        .filter(|s| s.ca_bundle.is_some())
        .cloned()
        .ok_or((MISSING_CA, named, message))
}
