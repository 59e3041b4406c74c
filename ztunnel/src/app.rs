//! The composition root: [`build`] turns a [`Config`] into a running ztunnel (state source,
//! certificates, per-pod listeners, node listeners, drain) and returns the bound addresses.
//! `main` and the tests call the same function.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use mesh::discovery::StoreWriter;
use mesh::discovery::file::FileSourceConfig;
use mesh::discovery::kube::KubeSourceConfig;
use mesh::discovery::{SourceKind, SourceSpec};
use mesh::hbone::ClientConfig;
use mesh::metrics::TcpMetrics;
use mesh::model::translate::TranslateConfig;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, LogControl, Readiness};
use crate::config::{CaptureMode, Config};
use crate::dns;
use crate::pods::{HostNetworkFactory, NetworkFactory, PodManager};
use crate::proxy::{self, Context};

/// A running ztunnel.
#[derive(Debug)]
pub struct Bound {
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub socks5_addr: Option<SocketAddr>,
    pub ctx: Arc<Context>,
    shutdown: CancellationToken,
    done: JoinHandle<()>,
}

impl Bound {
    /// Cancelling it starts the drain (as SIGTERM does).
    pub fn shutdown_trigger(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the drain finished.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("drain task")
    }
}

/// Builds every component, binds every port and starts serving.
pub async fn build(config: Config, log: Option<LogControl>) -> anyhow::Result<Bound> {
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting ztunnel");
    let config = Arc::new(config);
    let mut registry = Registry::default();

    let certs = config
        .ca
        .cert_manager(true, config.workload_cert_ttl, &mut registry)?;

    let writer = StoreWriter::new();
    let store = writer.store();
    let translate = TranslateConfig {
        trust_domain: config.trust_domain.clone(),
        cluster_domain: config.cluster_domain.clone(),
        root_namespace: config.root_namespace.clone(),
        ..TranslateConfig::default()
    };
    let source = match config.config_source() {
        SourceKind::File => SourceSpec::File(FileSourceConfig {
            translate,
            ..FileSourceConfig::new(config.config_path.clone())
        }),
        SourceKind::Kubernetes => SourceSpec::Kubernetes(KubeSourceConfig::ztunnel(translate)),
    };

    // The operator listeners are bound first: their ports are among ztunnel's own, which no
    // connection may be addressed to.
    let admin_listener = admin::bind("admin", config.admin_addr)
        .await
        .map_err(anyhow::Error::msg)?;
    let metrics_listener = admin::bind("metrics", config.metrics_addr)
        .await
        .map_err(anyhow::Error::msg)?;
    let readiness_listener = admin::bind("readiness", config.readiness_addr)
        .await
        .map_err(anyhow::Error::msg)?;
    let socks5_listener = match config.socks5_addr {
        Some(addr) => Some(
            admin::bind("SOCKS5", addr)
                .await
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let admin_addr = admin_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let readiness_addr = readiness_listener.local_addr()?;
    let socks5_addr = socks5_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let metrics = TcpMetrics::new(&mut registry, &config.cluster_id);
    let dns = dns_proxy(&config, &store, &mut registry);
    let ctx = Arc::new(Context {
        store: store.clone(),
        certs: certs.clone(),
        metrics,
        live: proxy::live::LiveConnections::default(),
        cluster_id: config.cluster_id.clone(),
        cluster_domain: config.cluster_domain.clone(),
        hbone_server: config.hbone.clone(),
        pods_by_ip: ArcSwap::from_pointee(HashMap::new()),
        applied_version: std::sync::atomic::AtomicU64::new(0),
        dns: dns.clone(),
        own_ports: proxy::own_ports::OwnPorts::new(
            [admin_addr, metrics_addr, readiness_addr]
                .into_iter()
                .chain(socks5_addr)
                .map(|a| a.port()),
        ),
        self_calls: proxy::own_ports::SelfCallMetrics::new(&mut registry),
    });

    // Stopping: `shutdown` starts the drain; `accepting` stops every listener.
    let shutdown = CancellationToken::new();
    let accepting = CancellationToken::new();
    let sources_stop = CancellationToken::new();

    // A file source's first load is awaited so the pods are set up before `build` returns; a
    // failure is logged and counted by the source, and readiness stays false until a load
    // succeeds (for the Kubernetes source: until every kind has been listed).
    mesh::discovery::start(source, writer, &mut registry, sources_stop.clone())
        .await
        .context("starting the configuration source")?;

    let factory: Arc<dyn NetworkFactory> = match &config.capture {
        CaptureMode::None => Arc::new(HostNetworkFactory),
        CaptureMode::NamedNetns { prefix } => Arc::new(
            crate::netns_pods::NamedNetnsFactory::new(prefix.clone())
                .with_probe_sources(config.probe_sources.clone())
                .with_dns_capture(dns.is_some()),
        ),
        CaptureMode::Proc => Arc::new(
            crate::netns_pods::ProcNetnsFactory::new()
                .with_probe_sources(config.probe_sources.clone())
                .with_dns_capture(dns.is_some()),
        ),
    };
    let starter_ctx = ctx.clone();
    let pods = PodManager::new(
        config.node_name.clone(),
        certs.clone(),
        ClientConfig::default(),
        factory,
        Arc::new(move |pod| proxy::start_pod_listeners(&starter_ctx, pod)),
        accepting.clone(),
    );
    let pods_task = tokio::spawn(follow_state(ctx.clone(), pods, accepting.clone()));

    let readiness = Arc::new(Readiness::default());
    mesh::accept::register_metrics(&mut registry);
    let registry = Arc::new(registry);
    // Admin, metrics and readiness stay up through the drain.
    let ops_stop = CancellationToken::new();
    admin::serve(
        "admin",
        admin_listener,
        config.operator,
        ops_stop.clone(),
        admin::admin_handler(ctx.clone(), config.clone(), log, shutdown.clone()),
    );
    admin::serve(
        "metrics",
        metrics_listener,
        config.operator,
        ops_stop.clone(),
        admin::metrics_handler(registry),
    );
    admin::serve(
        "readiness",
        readiness_listener,
        config.operator,
        ops_stop.clone(),
        admin::readiness_handler(ctx.clone(), readiness.clone()),
    );
    if let Some(listener) = socks5_listener {
        tokio::spawn(proxy::socks5::serve(
            ctx.clone(),
            listener,
            accepting.clone(),
        ));
    }

    let drain_ctx = ctx.clone();
    let deadline = config.drain_deadline;
    let trigger = shutdown.clone();
    let done = tokio::spawn(async move {
        trigger.cancelled().await;
        tracing::info!(deadline = ?deadline, live = drain_ctx.live.len(), "draining: readiness off, listeners closing");
        readiness.draining.store(true, Ordering::Release);
        accepting.cancel();
        if tokio::time::timeout(deadline, drain_ctx.live.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                live = drain_ctx.live.len(),
                "drain deadline passed: closing the remaining connections"
            );
            drain_ctx.live.close_all();
            let _ = tokio::time::timeout(Duration::from_secs(1), drain_ctx.live.wait_empty()).await;
        }
        sources_stop.cancel();
        let _ = pods_task.await;
        ops_stop.cancel();
        tracing::info!("drained");
    });

    Ok(Bound {
        admin_addr,
        metrics_addr,
        readiness_addr,
        socks5_addr,
        ctx,
        shutdown,
        done,
    })
}

/// The DNS proxy when DNS capture is on and pods are captured (without capture there is
/// nothing to redirect). Upstreams default to the nameservers of ztunnel's resolv.conf; none
/// there is logged, and forwarded queries then get SERVFAIL.
fn dns_proxy(
    config: &Config,
    store: &mesh::discovery::Store,
    registry: &mut Registry,
) -> Option<Arc<dns::DnsProxy>> {
    if !config.dns.capture || config.capture == CaptureMode::None {
        return None;
    }
    let upstreams = match &config.dns.upstreams {
        Some(upstreams) => upstreams.clone(),
        None => dns::system_upstreams().unwrap_or_else(|e| {
            tracing::warn!(path = dns::RESOLV_CONF, error = %e, "cannot read the DNS upstreams; set DNS_UPSTREAMS");
            Vec::new()
        }),
    };
    if upstreams.is_empty() {
        tracing::warn!(
            "no DNS upstream: queries for names outside the mesh will get SERVFAIL; set DNS_UPSTREAMS"
        );
    }
    tracing::info!(
        ?upstreams,
        "DNS proxy on, pods' DNS redirected to :{}",
        dns::DNS_PROXY_PORT
    );
    let dns_config = dns::DnsConfig {
        upstream_timeout: config.dns.upstream_timeout,
        ..dns::DnsConfig::new(config.cluster_domain.clone(), upstreams)
    };
    Some(Arc::new(dns::DnsProxy::new(
        dns_config,
        store.clone(),
        registry,
    )))
}

/// How often pods that could not be set up are retried.
const POD_RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Applies every new state: pods join and leave, live connections are re-authorized, rules
/// that ztunnel cannot enforce are reported once.
async fn follow_state(ctx: Arc<Context>, mut pods: PodManager, stop: CancellationToken) {
    let mut changes = ctx.store.subscribe();
    let mut reported_l7: HashSet<String> = HashSet::new();
    loop {
        let version = ctx.store.version();
        let state = ctx.store.snapshot();
        let (added, removed) = pods.sync(&state);
        ctx.pods_by_ip.store(Arc::new(pods.by_ip()));
        let closed = ctx.live.recheck(&state);
        if ctx.store.has_synced() {
            ctx.applied_version.store(version, Ordering::Release);
        }
        if added + removed + closed > 0 {
            tracing::info!(added, removed, closed, "applied new state");
        }
        for policy in &state.authorization_policies {
            for (i, rule) in policy.rules.iter().enumerate() {
                let key = format!("{}#{i}:{:?}", policy.key(), rule.l7_fields);
                if !rule.l7_fields.is_empty() && reported_l7.insert(key) {
                    tracing::warn!(
                        policy = %policy.key(),
                        rule = i,
                        fields = ?rule.l7_fields,
                        action = ?policy.action,
                        "rule uses L7 fields ztunnel cannot evaluate: in ALLOW it matches nothing, in DENY its L4 part alone is enforced (more restrictive); use a waypoint for L7 policy"
                    );
                }
            }
        }
        let retry = pods.has_failures();
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(POD_RETRY_INTERVAL), if retry => {}
        }
    }
    pods.stop_all();
    ctx.pods_by_ip.store(Arc::new(HashMap::new()));
}
