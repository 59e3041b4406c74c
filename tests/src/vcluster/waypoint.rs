//! Waypoints and ingress gateways in the virtual cluster: the real `waypoint` binary (`run`, or
//! `gateway` for an ingress), run inside its pod's network namespace (`ip netns exec`), as a
//! waypoint or gateway Deployment's pod would run. Its admin ports are on
//! the pod's own loopback; the harness reaches them by connecting from inside the namespace.
//! The CA (in the test process, on the host's loopback) is reached through a relay the harness
//! serves on the pod's `127.0.0.1:15012`, the address istiod's CA has in a cluster.

use super::*;

/// Istio labels the pods of the waypoints it deploys with these; ztunnel does not capture them.
pub(super) const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub(super) const MANAGED_VALUE: &str = "istio.io-mesh-controller";
pub(super) const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

const CA_RELAY_PORT: u16 = 15012;
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
const READINESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);

#[derive(Debug, Clone)]
pub(super) struct WaypointSpec {
    pub(super) namespace: String,
    pub(super) name: String,
    /// `Some`: an ingress gateway with these pod labels (`waypoint gateway`).
    pub(super) ingress_labels: Option<BTreeMap<String, String>>,
}

/// The Gateway that declares the waypoint.
pub(super) fn gateway_document(spec: &WaypointSpec) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    })
}

/// A running waypoint; killed (by its pid) on drop.
#[derive(Debug)]
pub struct Waypoint {
    name: String,
    namespace: String,
    netns: String,
    pod_ip: IpAddr,
    process: ZtunnelProcess,
    _ca_relay: AppServer,
}

impl Waypoint {
    pub(super) async fn start(
        cluster: &Cluster,
        launch: &Launch,
        spec: &WaypointSpec,
    ) -> anyhow::Result<Self> {
        let binary = waypoint_binary()?;
        let pod = cluster.pod(&spec.name);
        let ca = launch.ca_addr;
        let relay = pod
            .serve(CA_RELAY_PORT, move |mut client, _| async move {
                if let Ok(mut upstream) = TcpStream::connect(ca).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            })
            .await
            .context("serving the CA relay in the waypoint's pod")?;
        let log = launch.dir.join(format!("waypoint-{}.log", spec.name));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", pod.netns().name()])
            .arg(&binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", &launch.log_filter);
        match &spec.ingress_labels {
            None => command
                .arg("run")
                .env("WAYPOINT_NAME", &spec.name)
                .env("WAYPOINT_NAMESPACE", &spec.namespace)
                .env("HBONE_ADDR", pod.addr(HBONE_PORT).to_string()),
            Some(labels) => command
                .arg("gateway")
                .env("GATEWAY_NAME", &spec.name)
                .env("GATEWAY_NAMESPACE", &spec.namespace)
                .env(
                    "GATEWAY_LABELS",
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                )
                .env("GATEWAY_BIND_ADDRESS", pod.ip().to_string()),
        };
        let child = command
            .env("MESH_CONFIG_PATH", &launch.config_dir)
            .env(
                "CA_ADDRESS",
                SocketAddr::from((Ipv4Addr::LOCALHOST, CA_RELAY_PORT)).to_string(),
            )
            .env("CA_ROOT_CERT", &launch.root)
            .env("CA_SERVER_NAME", "localhost")
            .env("ADMIN_ADDR", ADMIN.to_string())
            .env("METRICS_ADDR", METRICS.to_string())
            .env("READINESS_ADDR", READINESS.to_string())
            .env(
                "DRAIN_DEADLINE_SECONDS",
                launch.drain_deadline.as_secs().to_string(),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let waypoint = Waypoint {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            netns: pod.netns().name().to_owned(),
            pod_ip: pod.ip(),
            process: ZtunnelProcess {
                pid: child.id(),
                child: Mutex::new(child),
                admin_addr: ADMIN,
                metrics_addr: METRICS,
                readiness_addr: READINESS,
                log,
            },
            _ca_relay: relay,
        };
        eventually(READY_TIMEOUT, || async {
            if let Some(status) = waypoint.process.exit_status() {
                return Err(format!("exited with {status}"));
            }
            match waypoint.get(READINESS, "/healthz/ready").await {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("readiness {status}: {}", body.trim())),
                Err(e) => Err(format!("readiness: {e}")),
            }
        })
        .await
        .map_err(|e| {
            anyhow!(
                "waypoint {} did not become ready: {e}\n--- log:\n{}",
                spec.name,
                tail(&waypoint.logs(), LOG_TAIL_LINES)
            )
        })?;
        Ok(waypoint)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The pod's IP (a waypoint's HBONE listener is on port 15008 there; an ingress listens
    /// on its Gateways' server ports there).
    pub fn ip(&self) -> IpAddr {
        self.pod_ip
    }

    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    async fn get(&self, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
        http_get_on(connect_in(&self.netns, addr), addr, path).await
    }

    /// `GET /metrics`, parsed.
    ///
    /// # Panics
    /// When the waypoint does not answer 200 (its log is in the message).
    pub async fn metrics(&self) -> Metrics {
        match self.get(METRICS, "/metrics").await {
            Ok((200, text)) => Metrics::parse(&text),
            other => panic!(
                "GET /metrics of waypoint {}: {other:?}\n{}",
                self.name,
                tail(&self.logs(), LOG_TAIL_LINES)
            ),
        }
    }

    /// `GET /config_dump`, as JSON.
    pub async fn try_config_dump(&self) -> Result<Value, String> {
        match self.get(ADMIN, "/config_dump").await {
            Ok((200, body)) => serde_json::from_str(&body).map_err(|e| format!("{e}: {body}")),
            other => Err(format!("GET /config_dump: {other:?}")),
        }
    }

    /// The waypoint's output so far.
    pub fn logs(&self) -> String {
        self.process.log_text()
    }

    /// Whether the waypoint process is still running (it has not exited or crashed).
    pub fn is_alive(&self) -> bool {
        self.process.exit_status().is_none()
    }

    pub(super) fn is_running(&self) -> bool {
        self.process.exit_status().is_none()
    }

    /// Whether the waypoint has loaded configuration `generation`.
    pub(super) async fn applied(&self, generation: u64) -> Result<(), String> {
        let dump = self.try_config_dump().await?;
        let loaded = dump["state"]["namespaces"][GENERATION_NAMESPACE][GENERATION_LABEL]
            .as_str()
            .and_then(|g| g.parse::<u64>().ok());
        if loaded < Some(generation) {
            return Err(format!(
                "waypoint {} has loaded configuration generation {loaded:?}, waiting for {generation}",
                self.name
            ));
        }
        Ok(())
    }
}
