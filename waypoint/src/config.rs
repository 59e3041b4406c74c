//! The waypoint's configuration: plain data from environment variables (through
//! [`mesh::ops::Env`], so tests pass a map). Every variable is a constant next to its default;
//! a bad value is reported with the variable, the value and why.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh::identity::Identity;
use mesh::model::WaypointRef;
use mesh::ops::{CaConfig, ConfigError, Env, parse, required};

/// The waypoint's name: its Gateway's and its Service's (`istio.io/use-waypoint=<name>`).
pub const WAYPOINT_NAME: &str = "WAYPOINT_NAME";
/// Its namespace (in Kubernetes, from the downward API).
pub const WAYPOINT_NAMESPACE: &str = "WAYPOINT_NAMESPACE";
/// The service account of its pods, which makes its identity (default: the waypoint's name, as
/// Istio's deployment controller names it).
pub const SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
pub const TRUST_DOMAIN: &str = "TRUST_DOMAIN";
pub use mesh::ops::CLUSTER_ID;
pub const CLUSTER_DOMAIN: &str = "CLUSTER_DOMAIN";
pub const ROOT_NAMESPACE: &str = "ROOT_NAMESPACE";
pub const CONFIG_PATH: &str = "MESH_CONFIG_PATH";
pub const HBONE_ADDR: &str = "HBONE_ADDR";
pub const ADMIN_ADDR: &str = "ADMIN_ADDR";
pub const METRICS_ADDR: &str = "METRICS_ADDR";
pub const READINESS_ADDR: &str = "READINESS_ADDR";
pub const DRAIN_DEADLINE: &str = "DRAIN_DEADLINE_SECONDS";
pub const WORKLOAD_CERT_TTL: &str = "WORKLOAD_CERT_TTL_SECONDS";
/// How long to wait for a client's first bytes on a port whose protocol is not declared
/// before treating it as opaque TCP; 0 (the default, as Istio's `protocolDetectionTimeout`)
/// waits for ever, so server-first protocols must declare their port (`tcp-...`).
pub const PROTOCOL_DETECTION_TIMEOUT_MS: &str = "PROTOCOL_DETECTION_TIMEOUT_MS";
/// `waypoint gateway` (the ingress): its name (the Deployment/Service, e.g. `istio-ingress`),
/// namespace, and its pods' labels, which Istio `Gateway`s select (`istio=ingress,app=...`).
pub const GATEWAY_NAME: &str = "GATEWAY_NAME";
pub const GATEWAY_NAMESPACE: &str = "GATEWAY_NAMESPACE";
pub const GATEWAY_LABELS: &str = "GATEWAY_LABELS";
/// The address the ingress's server ports are bound on (default `0.0.0.0`); a server's own
/// `bind` wins.
pub const GATEWAY_BIND_ADDRESS: &str = "GATEWAY_BIND_ADDRESS";
/// The `gatewayClassName` of the Gateway API Gateways this ingress serves (default `istio`,
/// Istio's class).
pub const GATEWAY_CLASS: &str = "GATEWAY_CLASS";
/// Worker threads of the runtime (read by `main` before the runtime exists).
pub const WORKER_THREADS: &str = "WAYPOINT_WORKER_THREADS";
pub const DEFAULT_WORKER_THREADS: usize = 2;

const DEFAULT_HBONE_ADDR: &str = "0.0.0.0:15008";
const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
const DEFAULT_DRAIN_DEADLINE_SECONDS: u64 = 30;

/// The runtime's worker count from [`WORKER_THREADS`].
pub fn worker_threads(env: &dyn Env) -> Result<usize, ConfigError> {
    mesh::ops::worker_threads(env, WORKER_THREADS, DEFAULT_WORKER_THREADS)
}

/// The resolved configuration, logged once at start-up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub waypoint: WaypointRef,
    pub identity: Identity,
    pub trust_domain: String,
    /// This cluster's name (`CLUSTER_ID`, Istio's default `Kubernetes`): sent in `baggage` to
    /// endpoints and the cluster label of metrics.
    pub cluster_id: String,
    pub cluster_domain: String,
    pub root_namespace: String,
    /// A YAML file or directory (the file source); empty when the objects come from the
    /// Kubernetes API (`CONFIG_SOURCE=kubernetes`, see [`Config::config_source`]).
    pub config_path: PathBuf,
    pub ca: CaConfig,
    pub hbone_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    /// Connection caps and timeouts of the admin, metrics and readiness ports.
    pub operator: mesh::ops::OperatorLimits,
    pub drain_deadline: Duration,
    pub workload_cert_ttl: Duration,
    /// `None`: wait for the first bytes for ever.
    pub protocol_detection_timeout: Option<Duration>,
    /// The HBONE listener's limits (`HBONE_MAX_STREAMS_PER_CONNECTION`,
    /// `HBONE_MAX_CONNECTIONS_PER_PEER`).
    pub hbone: mesh::hbone::ServerConfig,
    /// `Some` when running as an ingress gateway (`waypoint gateway`): no HBONE listener, the
    /// servers of the Istio `Gateway`s that select [`IngressConfig::labels`] instead.
    pub ingress: Option<IngressConfig>,
}

/// What the ingress gateway role adds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngressConfig {
    /// This gateway's pod labels ([`GATEWAY_LABELS`]).
    pub labels: std::collections::BTreeMap<String, String>,
    /// [`GATEWAY_BIND_ADDRESS`].
    pub bind: std::net::IpAddr,
    /// [`GATEWAY_CLASS`].
    pub class: String,
}

/// Which proxy the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Waypoint,
    Ingress,
}

/// `k=v,k=v` (spaces around items allowed).
fn parse_labels(
    var: &'static str,
    value: &str,
) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    let mut labels = std::collections::BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(ConfigError::Invalid {
                var,
                value: value.to_owned(),
                why: format!("{item:?} is not key=value (write the pod's labels as k=v,k=v)"),
            });
        };
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    if labels.is_empty() {
        return Err(ConfigError::Invalid {
            var,
            value: value.to_owned(),
            why: "no labels: Gateways select gateway pods by label (e.g. istio=ingress)".into(),
        });
    }
    Ok(labels)
}

impl Config {
    /// Where the mesh objects come from: the file source when [`Self::config_path`] is set,
    /// else the Kubernetes API.
    pub fn config_source(&self) -> mesh::discovery::SourceKind {
        if self.config_path.as_os_str().is_empty() {
            mesh::discovery::SourceKind::Kubernetes
        } else {
            mesh::discovery::SourceKind::File
        }
    }

    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Self::from_env_for(env, Role::Waypoint)
    }

    /// The configuration of `role`: a waypoint names itself with `WAYPOINT_NAME` /
    /// `WAYPOINT_NAMESPACE`, an ingress gateway with `GATEWAY_NAME` / `GATEWAY_NAMESPACE`
    /// and needs `GATEWAY_LABELS`.
    pub fn from_env_for(env: &dyn Env, role: Role) -> Result<Self, ConfigError> {
        let trust_domain = env
            .get(TRUST_DOMAIN)?
            .unwrap_or_else(|| mesh::model::translate::DEFAULT_TRUST_DOMAIN.to_owned());
        let (name_var, namespace_var) = match role {
            Role::Waypoint => (WAYPOINT_NAME, WAYPOINT_NAMESPACE),
            Role::Ingress => (GATEWAY_NAME, GATEWAY_NAMESPACE),
        };
        let name = required(env, name_var, "the proxy's Deployment/Service name")?;
        let namespace = required(env, namespace_var, "the proxy's namespace")?;
        let ingress = match role {
            Role::Waypoint => None,
            Role::Ingress => Some(IngressConfig {
                labels: parse_labels(
                    GATEWAY_LABELS,
                    &required(env, GATEWAY_LABELS, "the gateway pods' labels, k=v,k=v")?,
                )?,
                bind: parse(env, GATEWAY_BIND_ADDRESS, "0.0.0.0")?,
                class: match env.get(GATEWAY_CLASS)?.filter(|c| !c.is_empty()) {
                    None => mesh::model::translate::DEFAULT_INGRESS_GATEWAY_CLASS.to_owned(),
                    Some(class) if class == mesh::model::WAYPOINT_GATEWAY_CLASS => {
                        return Err(ConfigError::Invalid {
                            var: GATEWAY_CLASS,
                            value: class,
                            why: "is the waypoints' class; an ingress gateway needs its own (Istio's is istio)".into(),
                        });
                    }
                    Some(class) => class,
                },
            }),
        };
        let service_account = env.get(SERVICE_ACCOUNT)?.unwrap_or_else(|| name.clone());
        let identity = Identity::new(&trust_domain, &namespace, &service_account).map_err(|e| {
            ConfigError::Invalid {
                var: SERVICE_ACCOUNT,
                value: format!("{trust_domain}/ns/{namespace}/sa/{service_account}"),
                why: format!("not a valid identity: {e} (check TRUST_DOMAIN, WAYPOINT_NAMESPACE and SERVICE_ACCOUNT)"),
            }
        })?;
        let detection_ms: u64 = parse(env, PROTOCOL_DETECTION_TIMEOUT_MS, "0")?;
        Ok(Config {
            waypoint: WaypointRef { namespace, name },
            identity,
            trust_domain,
            cluster_id: mesh::ops::cluster_id(env)?,
            cluster_domain: env
                .get(CLUSTER_DOMAIN)?
                .unwrap_or_else(|| mesh::model::translate::DEFAULT_CLUSTER_DOMAIN.to_owned()),
            root_namespace: env
                .get(ROOT_NAMESPACE)?
                .unwrap_or_else(|| mesh::model::DEFAULT_ROOT_NAMESPACE.to_owned()),
            config_path: match mesh::discovery::SourceKind::from_env(env, CONFIG_PATH)? {
                mesh::discovery::SourceKind::File => {
                    required(env, CONFIG_PATH, "a YAML file or directory of mesh objects")?.into()
                }
                mesh::discovery::SourceKind::Kubernetes => PathBuf::new(),
            },
            ca: CaConfig::from_env(env)?,
            hbone_addr: parse(env, HBONE_ADDR, DEFAULT_HBONE_ADDR)?,
            admin_addr: mesh::ops::admin_addr(env, ADMIN_ADDR, DEFAULT_ADMIN_ADDR)?,
            metrics_addr: parse(env, METRICS_ADDR, DEFAULT_METRICS_ADDR)?,
            readiness_addr: parse(env, READINESS_ADDR, DEFAULT_READINESS_ADDR)?,
            operator: mesh::ops::OperatorLimits::from_env(env)?,
            drain_deadline: Duration::from_secs(parse(
                env,
                DRAIN_DEADLINE,
                &DEFAULT_DRAIN_DEADLINE_SECONDS.to_string(),
            )?),
            workload_cert_ttl: mesh::ops::workload_cert_ttl(env, WORKLOAD_CERT_TTL)?,
            protocol_detection_timeout: (detection_ms > 0)
                .then(|| Duration::from_millis(detection_ms)),
            hbone: mesh::hbone::ServerConfig::from_env(env)?,
            ingress,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    fn base() -> HashMap<&'static str, String> {
        [
            (WAYPOINT_NAME, "waypoint"),
            (WAYPOINT_NAMESPACE, "demo"),
            (CONFIG_PATH, "/etc/mesh"),
            (mesh::ops::CA_ADDRESS, "127.0.0.1:15012"),
            (mesh::ops::CA_ROOT_CERT, "/etc/mesh/root.pem"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }

    #[test]
    fn defaults_and_identity() {
        let c = Config::from_env(&base()).unwrap();
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/demo/sa/waypoint"
        );
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.protocol_detection_timeout, None);
        let mut env = base();
        env.insert(SERVICE_ACCOUNT, "wp-sa".into());
        env.insert(PROTOCOL_DETECTION_TIMEOUT_MS, "250".into());
        let c = Config::from_env(&env).unwrap();
        assert_eq!(c.identity.service_account(), "wp-sa");
        assert_eq!(
            c.protocol_detection_timeout,
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn config_source_file_or_kubernetes() {
        use mesh::discovery::{CONFIG_SOURCE, SourceKind};
        assert_eq!(
            Config::from_env(&base()).unwrap().config_source(),
            SourceKind::File
        );
        let mut env = base();
        env.remove(CONFIG_PATH);
        assert_eq!(
            Config::from_env(&env).unwrap().config_source(),
            SourceKind::Kubernetes
        );
        env.insert(CONFIG_SOURCE, "file".into());
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.starts_with("MESH_CONFIG_PATH: required"), "{e}");
    }

    /// Settings that used to be accepted silently or fall back: each is an error naming the
    /// variable, the value and what is accepted.
    #[test]
    fn out_of_range_and_unsafe_settings_are_errors() {
        for (var, value, expected) in [
            (
                WORKLOAD_CERT_TTL,
                "0",
                "WORKLOAD_CERT_TTL_SECONDS=\"0\": out of range: must be 60 to 7776000 seconds",
            ),
            (
                ADMIN_ADDR,
                "0.0.0.0:15000",
                "ADMIN_ADDR=\"0.0.0.0:15000\": refusing a non-loopback admin address",
            ),
            (
                mesh::ops::OPERATOR_MAX_CONNECTIONS,
                "100000",
                "OPERATOR_MAX_CONNECTIONS=\"100000\": out of range",
            ),
        ] {
            let mut env = base();
            env.insert(var, value.into());
            let e = Config::from_env(&env).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{e}");
        }
        let mut env = base();
        env.insert(ADMIN_ADDR, "0.0.0.0:15000".into());
        env.insert(mesh::ops::ADMIN_ALLOW_REMOTE, "true".into());
        assert!(
            Config::from_env(&env)
                .unwrap()
                .admin_addr
                .ip()
                .is_unspecified()
        );
        let mut env = base();
        env.insert(WORKER_THREADS, "100000".into());
        let e = worker_threads(&env).unwrap_err().to_string();
        assert_eq!(
            e,
            "WAYPOINT_WORKER_THREADS=\"100000\": out of range: must be 1 to 64"
        );
    }

    #[test]
    fn non_utf8_values_are_errors_not_unset() {
        use std::os::unix::ffi::OsStringExt;
        for var in [SERVICE_ACCOUNT, TRUST_DOMAIN, ADMIN_ADDR, WORKLOAD_CERT_TTL] {
            let mut env: HashMap<&str, std::ffi::OsString> =
                base().into_iter().map(|(k, v)| (k, v.into())).collect();
            env.insert(var, std::ffi::OsString::from_vec(b"sa\xff".to_vec()));
            let e = Config::from_env(&env).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{var}=\"sa\u{fffd}\": not valid UTF-8")),
                "{e}"
            );
        }
    }

    #[test]
    fn ingress_role_names_itself_and_its_labels() {
        let mut env: HashMap<&str, String> = base();
        env.remove(WAYPOINT_NAME);
        env.remove(WAYPOINT_NAMESPACE);
        env.insert(GATEWAY_NAME, "istio-ingress".into());
        env.insert(GATEWAY_NAMESPACE, "istio-ingress".into());
        let e = Config::from_env_for(&env, Role::Ingress)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("GATEWAY_LABELS: required"), "{e}");
        env.insert(GATEWAY_LABELS, "istio=ingress, app=istio-ingress".into());
        let c = Config::from_env_for(&env, Role::Ingress).unwrap();
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/istio-ingress/sa/istio-ingress"
        );
        let ingress = c.ingress.unwrap();
        assert_eq!(ingress.labels["istio"], "ingress");
        assert_eq!(ingress.labels["app"], "istio-ingress");
        assert!(ingress.bind.is_unspecified());
        env.insert(GATEWAY_LABELS, "istio".into());
        let e = Config::from_env_for(&env, Role::Ingress)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("GATEWAY_LABELS=\"istio\""), "{e}");
    }

    #[test]
    fn errors_name_the_variable() {
        let mut env = base();
        env.remove(WAYPOINT_NAME);
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.starts_with("WAYPOINT_NAME: required"), "{e}");
        let mut env = base();
        env.insert(SERVICE_ACCOUNT, "Bad SA".into());
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.starts_with("SERVICE_ACCOUNT="), "{e}");
        let mut env = base();
        env.insert(HBONE_ADDR, "15008".into());
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.starts_with("HBONE_ADDR=\"15008\""), "{e}");
    }
}
