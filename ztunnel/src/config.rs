//! ztunnel's configuration: plain data, read from the environment through [`Env`] so tests
//! pass a map. Every variable name is a constant next to its default; a bad value is reported
//! with the variable, the value and why.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const NODE_NAME: &str = "NODE_NAME";
pub const TRUST_DOMAIN: &str = "TRUST_DOMAIN";
pub const CLUSTER_DOMAIN: &str = "CLUSTER_DOMAIN";
pub const ROOT_NAMESPACE: &str = "ROOT_NAMESPACE";
pub const CONFIG_PATH: &str = "MESH_CONFIG_PATH";
pub use mesh::ops::{
    CA_ADDRESS, CA_REQUEST_TIMEOUT, CA_ROOT_CERT, CA_SERVER_NAME, CA_TOKEN_FILE, CLUSTER_ID,
};
pub const CAPTURE_MODE: &str = "CAPTURE_MODE";
pub const CAPTURE_PROBE_SOURCES: &str = "CAPTURE_PROBE_SOURCES";
pub const ADMIN_ADDR: &str = "ADMIN_ADDR";
pub const METRICS_ADDR: &str = "METRICS_ADDR";
pub const READINESS_ADDR: &str = "READINESS_ADDR";
pub const SOCKS5_ADDR: &str = "SOCKS5_ADDR";
pub const DRAIN_DEADLINE: &str = "DRAIN_DEADLINE_SECONDS";
pub const WORKLOAD_CERT_TTL: &str = "WORKLOAD_CERT_TTL_SECONDS";
/// `true|false`: redirect captured pods' DNS (port 53) to the DNS proxy on 15053. On by
/// default, as in Istio's ambient mode since 1.25 (`cni.ambient.dnsCapture`).
pub const DNS_CAPTURE: &str = "DNS_CAPTURE";
/// Comma-separated resolvers (`ip` or `ip:port`) the DNS proxy forwards to; default: the
/// nameservers of ztunnel's own `/etc/resolv.conf`.
pub const DNS_UPSTREAMS: &str = "DNS_UPSTREAMS";
/// How long a forwarded query may take before the client gets SERVFAIL (milliseconds).
pub const DNS_UPSTREAM_TIMEOUT: &str = "DNS_UPSTREAM_TIMEOUT_MS";
/// Worker threads of the runtime (read by `main` before the runtime exists).
pub const WORKER_THREADS: &str = "ZTUNNEL_WORKER_THREADS";
pub const DEFAULT_WORKER_THREADS: usize = 2;

/// The runtime's worker count from [`WORKER_THREADS`]: a positive number, default 2.
pub fn worker_threads(env: &dyn Env) -> Result<usize, ConfigError> {
    mesh::ops::worker_threads(env, WORKER_THREADS, DEFAULT_WORKER_THREADS)
}

const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
const DEFAULT_SOCKS5_ADDR: &str = "127.0.0.1:15080";
const DEFAULT_DRAIN_DEADLINE_SECONDS: u64 = 30;

pub use mesh::ops::{CaConfig, ConfigError, Env, ProcessEnv};
use mesh::ops::{parse, required};

/// How pods' traffic reaches ztunnel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum CaptureMode {
    /// No redirection: each local pod's HBONE listener is bound on its IP in ztunnel's own
    /// network namespace, and clients use the SOCKS5 listener. For local runs and tests.
    None,
    /// Per-pod network namespaces found by name under `/var/run/netns/<prefix><pod-name>`:
    /// redirect rules and listeners are installed inside each (the virtual-cluster harness).
    NamedNetns { prefix: String },
    /// A real node: each pod's namespace is found by its IP among the namespaces of the node's
    /// processes (`/proc/*/ns/net`). Needs hostPID.
    Proc,
}

/// The resolved configuration, logged once at start-up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub node_name: String,
    pub trust_domain: String,
    /// This cluster's name (`CLUSTER_ID`, Istio's default `Kubernetes`): sent in `baggage` and
    /// the cluster label of metrics.
    pub cluster_id: String,
    pub cluster_domain: String,
    pub root_namespace: String,
    /// A YAML file or directory (the file source); empty when the objects come from the
    /// Kubernetes API (`CONFIG_SOURCE=kubernetes`, see [`Config::config_source`]).
    pub config_path: PathBuf,
    pub ca: CaConfig,
    pub capture: CaptureMode,
    /// Extra sources (besides Istio's 169.254.7.127) whose connections reach captured pods'
    /// ports unredirected: kubelet health probes from the node, e.g. the node's IP.
    pub probe_sources: Vec<std::net::IpAddr>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub socks5_addr: Option<SocketAddr>,
    /// Connection caps and timeouts of the admin, metrics and readiness ports.
    pub operator: mesh::ops::OperatorLimits,
    pub drain_deadline: Duration,
    pub workload_cert_ttl: Duration,
    pub dns: DnsSettings,
    /// The HBONE listeners' limits (`HBONE_MAX_STREAMS_PER_CONNECTION`,
    /// `HBONE_MAX_CONNECTIONS_PER_PEER`).
    pub hbone: mesh::hbone::ServerConfig,
}

/// The DNS proxy's settings; the default is Istio's (capture on, upstreams from resolv.conf).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DnsSettings {
    /// The DNS proxy and the port-53 redirect for captured pods (not with capture `none`).
    pub capture: bool,
    /// `None`: the nameservers of ztunnel's `/etc/resolv.conf`, read at start-up.
    pub upstreams: Option<Vec<SocketAddr>>,
    pub upstream_timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            capture: true,
            upstreams: None,
            upstream_timeout: crate::dns::DEFAULT_UPSTREAM_TIMEOUT,
        }
    }
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
        let trust_domain = env
            .get(TRUST_DOMAIN)?
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
        mesh::identity::validate_trust_domain(&trust_domain).map_err(|why| {
            ConfigError::Invalid {
                var: TRUST_DOMAIN,
                value: trust_domain.clone(),
                why: why.to_owned(),
            }
        })?;
        let capture = match env.get(CAPTURE_MODE)?.as_deref() {
            None | Some("none") => CaptureMode::None,
            Some("proc") => CaptureMode::Proc,
            Some(v) => match v.strip_prefix("netns:") {
                Some(prefix) => CaptureMode::NamedNetns {
                    prefix: prefix.to_owned(),
                },
                None => {
                    return Err(ConfigError::Invalid {
                        var: CAPTURE_MODE,
                        value: v.to_owned(),
                        why: "expected `none`, `proc` or `netns:<name prefix>`".into(),
                    });
                }
            },
        };
        let probe_sources = env
            .get(CAPTURE_PROBE_SOURCES)?
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                        var: CAPTURE_PROBE_SOURCES,
                        value: s.to_owned(),
                        why: format!("{e}; expected comma-separated IP addresses"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dns_upstreams = env
            .get(DNS_UPSTREAMS)?
            .map(|list| parse_dns_upstreams(&list))
            .transpose()?;
        let dns_upstream_timeout = Duration::from_millis(parse(
            env,
            DNS_UPSTREAM_TIMEOUT,
            &DnsSettings::default()
                .upstream_timeout
                .as_millis()
                .to_string(),
        )?);
        if dns_upstream_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                var: DNS_UPSTREAM_TIMEOUT,
                value: "0".to_owned(),
                why: "must be at least 1 (milliseconds)".to_owned(),
            });
        }
        let socks5_addr = match env.get(SOCKS5_ADDR)?.as_deref() {
            Some("off") => None,
            _ => Some(parse(env, SOCKS5_ADDR, DEFAULT_SOCKS5_ADDR)?),
        };
        Ok(Config {
            node_name: required(env, NODE_NAME, "the name of the node this ztunnel serves")?,
            trust_domain,
            cluster_id: mesh::ops::cluster_id(env)?,
            cluster_domain: env
                .get(CLUSTER_DOMAIN)?
                .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.to_owned()),
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
            capture,
            probe_sources,
            admin_addr: mesh::ops::admin_addr(env, ADMIN_ADDR, DEFAULT_ADMIN_ADDR)?,
            metrics_addr: parse(env, METRICS_ADDR, DEFAULT_METRICS_ADDR)?,
            readiness_addr: parse(env, READINESS_ADDR, DEFAULT_READINESS_ADDR)?,
            socks5_addr,
            operator: mesh::ops::OperatorLimits::from_env(env)?,
            drain_deadline: Duration::from_secs(parse(
                env,
                DRAIN_DEADLINE,
                &DEFAULT_DRAIN_DEADLINE_SECONDS.to_string(),
            )?),
            workload_cert_ttl: mesh::ops::workload_cert_ttl(env, WORKLOAD_CERT_TTL)?,
            dns: DnsSettings {
                capture: parse(
                    env,
                    DNS_CAPTURE,
                    &DnsSettings::default().capture.to_string(),
                )?,
                upstreams: dns_upstreams,
                upstream_timeout: dns_upstream_timeout,
            },
            hbone: mesh::hbone::ServerConfig::from_env(env)?,
        })
    }
}

/// `10.96.0.10, 10.96.0.11:5353, [fd00::10]:53, fd00::10`: port 53 unless given.
fn parse_dns_upstreams(list: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| {
                    s.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| ConfigError::Invalid {
                    var: DNS_UPSTREAMS,
                    value: s.to_owned(),
                    why: "expected comma-separated `ip` or `ip:port` (IPv6 with a port as \
                          `[ip]:port`)"
                        .to_owned(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn base() -> HashMap<&'static str, String> {
        [
            (NODE_NAME, "node-a"),
            (CONFIG_PATH, "/etc/mesh"),
            (CA_ADDRESS, "127.0.0.1:15012"),
            (CA_ROOT_CERT, "/etc/mesh/root.pem"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }

    #[test]
    fn defaults() {
        let c = Config::from_env(&base()).unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.capture, CaptureMode::None);
        assert_eq!(c.socks5_addr, Some("127.0.0.1:15080".parse().unwrap()));
        assert_eq!(c.admin_addr.port(), 15000);
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.readiness_addr.port(), 15021);
        assert_eq!(c.drain_deadline, Duration::from_secs(30));
        assert!(
            c.dns.capture,
            "Istio's ambient mode captures DNS by default"
        );
        assert_eq!(c.dns.upstreams, None);
        assert_eq!(c.dns.upstream_timeout, Duration::from_secs(4));
        assert_eq!(c.cluster_id, "Kubernetes", "Istio's default CLUSTER_ID");
        assert_eq!(c.ca.request_timeout, Duration::from_secs(10));
    }

    #[test]
    fn cluster_id_and_ca_timeout() {
        let mut env = base();
        env.insert(CLUSTER_ID, "east-1".into());
        env.insert(CA_REQUEST_TIMEOUT, "2500".into());
        let c = Config::from_env(&env).unwrap();
        assert_eq!(c.cluster_id, "east-1");
        assert_eq!(c.ca.request_timeout, Duration::from_millis(2500));
        // A value that cannot travel in `baggage`, or a zero deadline, names the variable.
        for (var, value) in [
            (CLUSTER_ID, "east,1"),
            (CLUSTER_ID, "east 1"),
            (CA_REQUEST_TIMEOUT, "0"),
            (CA_REQUEST_TIMEOUT, "soon"),
        ] {
            let mut env = base();
            env.insert(var, value.into());
            let err = Config::from_env(&env).unwrap_err().to_string();
            assert!(err.starts_with(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn dns_settings() {
        let mut env = base();
        env.insert(DNS_CAPTURE, "false".into());
        env.insert(
            DNS_UPSTREAMS,
            "10.96.0.10, 10.0.0.2:5353,[fd00::10]:53,fd00::11".into(),
        );
        env.insert(DNS_UPSTREAM_TIMEOUT, "750".into());
        let c = Config::from_env(&env).unwrap();
        assert!(!c.dns.capture);
        assert_eq!(
            c.dns.upstreams.unwrap(),
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.2:5353".parse().unwrap(),
                "[fd00::10]:53".parse().unwrap(),
                "[fd00::11]:53".parse().unwrap(),
            ]
        );
        assert_eq!(c.dns.upstream_timeout, Duration::from_millis(750));

        for (var, value, expected) in [
            (DNS_CAPTURE, "yes", "DNS_CAPTURE=\"yes\""),
            (
                DNS_UPSTREAMS,
                "10.0.0.1,kube-dns",
                "DNS_UPSTREAMS=\"kube-dns\": expected",
            ),
            (DNS_UPSTREAM_TIMEOUT, "0", "DNS_UPSTREAM_TIMEOUT_MS=\"0\""),
        ] {
            let mut env = base();
            env.insert(var, value.into());
            let e = Config::from_env(&env).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{e}");
        }
    }

    #[test]
    fn errors_name_variable_and_value() {
        let mut env = base();
        env.remove(NODE_NAME);
        assert!(
            Config::from_env(&env)
                .unwrap_err()
                .to_string()
                .starts_with("NODE_NAME: required")
        );
        let mut env = base();
        env.insert(ADMIN_ADDR, "localhost".into());
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.starts_with("ADMIN_ADDR=\"localhost\": "), "{e}");
        let mut env = base();
        env.insert(CAPTURE_MODE, "iptables".into());
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.contains("expected `none`, `proc` or `netns:"), "{e}");
        let mut env = base();
        env.insert(TRUST_DOMAIN, "Bad Domain".into());
        assert!(
            Config::from_env(&env)
                .unwrap_err()
                .to_string()
                .contains("TRUST_DOMAIN")
        );
    }

    #[test]
    fn worker_threads_default_and_validation() {
        assert_eq!(worker_threads(&base()).unwrap(), 2);
        for (value, expected) in [
            ("1", Ok(1)),
            ("64", Ok(64)),
            (
                "0",
                Err("ZTUNNEL_WORKER_THREADS=\"0\": out of range: must be 1 to 64"),
            ),
            (
                "100000",
                Err("ZTUNNEL_WORKER_THREADS=\"100000\": out of range: must be 1 to 64"),
            ),
            (
                "many",
                Err("ZTUNNEL_WORKER_THREADS=\"many\": invalid digit"),
            ),
        ] {
            let mut env = base();
            env.insert(WORKER_THREADS, value.into());
            match (worker_threads(&env), expected) {
                (Ok(n), Ok(want)) => assert_eq!(n, want),
                (Err(e), Err(want)) => assert!(e.to_string().starts_with(want), "{e}"),
                (got, want) => panic!("{value}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// Settings that used to fall back or go unchecked: each is an error naming the variable,
    /// the value and what is accepted.
    #[test]
    fn out_of_range_and_unsafe_settings_are_errors() {
        for (var, value, expected) in [
            (
                WORKLOAD_CERT_TTL,
                "0",
                "WORKLOAD_CERT_TTL_SECONDS=\"0\": out of range: must be 60 to 7776000 seconds",
            ),
            (
                WORKLOAD_CERT_TTL,
                "31536000",
                "WORKLOAD_CERT_TTL_SECONDS=\"31536000\": out of range: must be 60 to 7776000",
            ),
            (
                ADMIN_ADDR,
                "0.0.0.0:15000",
                "ADMIN_ADDR=\"0.0.0.0:15000\": refusing a non-loopback admin address",
            ),
            (
                mesh::ops::OPERATOR_MAX_CONNECTIONS,
                "0",
                "OPERATOR_MAX_CONNECTIONS=\"0\": out of range: must be 1 to 10000",
            ),
        ] {
            let mut env = base();
            env.insert(var, value.into());
            let e = Config::from_env(&env).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{e}");
        }
        let mut env = base();
        env.insert(WORKLOAD_CERT_TTL, "3600".into());
        env.insert(ADMIN_ADDR, "0.0.0.0:15000".into());
        env.insert(mesh::ops::ADMIN_ALLOW_REMOTE, "true".into());
        env.insert(mesh::ops::OPERATOR_MAX_CONNECTIONS, "20".into());
        let c = Config::from_env(&env).unwrap();
        assert_eq!(c.workload_cert_ttl, Duration::from_secs(3600));
        assert_eq!(c.admin_addr, "0.0.0.0:15000".parse().unwrap());
        assert_eq!(c.operator.max_connections, 20);
        assert_eq!(
            Config::from_env(&base()).unwrap().workload_cert_ttl,
            Duration::from_secs(86400)
        );
    }

    #[test]
    fn non_utf8_values_are_errors_not_unset() {
        use std::os::unix::ffi::OsStringExt;
        let raw = |var: &'static str| {
            let mut env: HashMap<&str, std::ffi::OsString> =
                base().into_iter().map(|(k, v)| (k, v.into())).collect();
            env.insert(var, std::ffi::OsString::from_vec(b"\xff\xfe".to_vec()));
            env
        };
        // Unset, each of these has a default: a bad value must not quietly become it.
        for var in [
            TRUST_DOMAIN,
            CAPTURE_MODE,
            ADMIN_ADDR,
            SOCKS5_ADDR,
            DNS_UPSTREAMS,
        ] {
            let e = Config::from_env(&raw(var)).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{var}=\"\u{fffd}\u{fffd}\": not valid UTF-8")),
                "{e}"
            );
        }
        let e = worker_threads(&raw(WORKER_THREADS))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ZTUNNEL_WORKER_THREADS="), "{e}");
    }

    #[test]
    fn config_source_file_or_kubernetes() {
        use mesh::discovery::{CONFIG_SOURCE, SourceKind};
        assert_eq!(
            Config::from_env(&base()).unwrap().config_source(),
            SourceKind::File
        );
        // No path: the API server (in a pod nothing else is needed).
        let mut env = base();
        env.remove(CONFIG_PATH);
        assert_eq!(
            Config::from_env(&env).unwrap().config_source(),
            SourceKind::Kubernetes
        );
        let mut env = base();
        env.insert(CONFIG_SOURCE, "kubernetes".into());
        assert_eq!(
            Config::from_env(&env).unwrap().config_source(),
            SourceKind::Kubernetes
        );
        env.insert(CONFIG_SOURCE, "file".into());
        env.remove(CONFIG_PATH);
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.starts_with("MESH_CONFIG_PATH: required"), "{e}");
        env.insert(CONFIG_SOURCE, "etcd".into());
        let e = Config::from_env(&env).unwrap_err().to_string();
        assert!(e.starts_with("CONFIG_SOURCE=\"etcd\""), "{e}");
        let mut env = base();
        env.insert(CAPTURE_MODE, "proc".into());
        assert_eq!(Config::from_env(&env).unwrap().capture, CaptureMode::Proc);
    }

    #[test]
    fn socks5_can_be_turned_off_and_capture_parsed() {
        let mut env = base();
        env.insert(SOCKS5_ADDR, "off".into());
        env.insert(CAPTURE_MODE, "netns:pod-".into());
        env.insert(CAPTURE_PROBE_SOURCES, "10.0.0.1, fd00::1".into());
        let c = Config::from_env(&env).unwrap();
        assert_eq!(
            c.probe_sources,
            vec![
                "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(c.socks5_addr, None);
        assert_eq!(
            c.capture,
            CaptureMode::NamedNetns {
                prefix: "pod-".into()
            }
        );
    }
}
