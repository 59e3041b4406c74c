//! The composition root: [`build`] turns a [`Config`] into a running waypoint (state source,
//! certificate, HBONE listener, route table and upstreams kept in step with the state, operator
//! ports, drain) and returns the bound addresses. `main`, the demo and the tests call it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use mesh::cert_manager::CertManager;
use mesh::discovery::file::FileSourceConfig;
use mesh::discovery::kube::KubeSourceConfig;
use mesh::discovery::{SourceKind, SourceSpec};
use mesh::discovery::{Store, StoreWriter};
use mesh::hbone::server::ManagedCertificate;
use mesh::hbone::{ClientConfig, HboneClient, HboneServer};
use mesh::metrics::TcpMetrics;
use mesh::model::State;
use mesh::model::translate::TranslateConfig;
use mesh::ops::LogControl;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connector::HboneConnector;
use crate::metrics::RequestMetrics;
use crate::route::RouteTable;
use crate::upstream::Upstreams;

/// Everything a request handler reads.
#[derive(Debug)]
pub struct Context {
    pub config: Arc<Config>,
    pub store: Store,
    pub certs: CertManager,
    /// Rebuilt on every state change.
    pub routes: ArcSwap<Routing>,
    pub upstreams: Upstreams,
    pub metrics: RequestMetrics,
    pub tcp_metrics: TcpMetrics,
    pub live: Live,
    pub connector: Arc<HboneConnector>,
    /// `waypoint_config_conflicts{shadowed, winner, host}`: VirtualServices shadowed by an
    /// older one for the same host (1 while the conflict lasts).
    pub conflicts: Family<ConflictLabels, Gauge>,
    /// RateLimitPolicy buckets, following the state like the routes.
    pub rate_limits: crate::ratelimit::RateLimits,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConflictLabels {
    pub host: String,
    pub winner: String,
    pub shadowed: String,
}

/// The compiled view of one state: routes plus a hostname index of services.
#[derive(Debug, Default)]
pub struct Routing {
    pub state: Arc<State>,
    pub table: RouteTable,
    /// Service hostname -> `ns/name`.
    pub hosts: HashMap<String, String>,
}

impl Routing {
    pub fn build(state: Arc<State>) -> Self {
        let table = RouteTable::build(&state);
        let hosts = state
            .services
            .values()
            .map(|s| (s.hostname.clone(), s.key()))
            .collect();
        Self {
            state,
            table,
            hosts,
        }
    }
}

/// Counts the tunnels in flight, so drain knows when the waypoint is quiet.
#[derive(Debug, Default)]
pub struct Live {
    count: AtomicUsize,
    changed: Notify,
}

/// Leaves the count when dropped.
#[derive(Debug)]
pub struct LiveGuard<'a>(&'a Live);

impl Live {
    pub fn enter(&self) -> LiveGuard<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        LiveGuard(self)
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub async fn wait_empty(&self) {
        loop {
            let notified = self.changed.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A running waypoint.
#[derive(Debug)]
pub struct Bound {
    pub hbone_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
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
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting waypoint");
    let config = Arc::new(config);
    let mut registry = Registry::default();
    let certs = config
        .ca
        .cert_manager(false, config.workload_cert_ttl, &mut registry)?;
    certs.prefetch(&config.identity);

    let writer = StoreWriter::new();
    let store = writer.store();
    let translate = TranslateConfig {
        trust_domain: config.trust_domain.clone(),
        cluster_domain: config.cluster_domain.clone(),
        root_namespace: config.root_namespace.clone(),
    };
    let source = match config.config_source() {
        SourceKind::File => SourceSpec::File(FileSourceConfig {
            translate,
            ..FileSourceConfig::new(config.config_path.clone())
        }),
        SourceKind::Kubernetes => SourceSpec::Kubernetes(KubeSourceConfig::waypoint(translate)),
    };
    let sources_stop = CancellationToken::new();
    mesh::discovery::start(source, writer, &mut registry, sources_stop.clone())
        .await
        .context("starting the configuration source")?;

    let connector = Arc::new(HboneConnector::new(
        HboneClient::new(ClientConfig::default(), Arc::new(certs.clone())),
        config.identity.clone(),
        &config.waypoint,
        &config.cluster_id,
    ));
    let upstreams = Upstreams::new(connector.clone());
    let conflicts = Family::<ConflictLabels, Gauge>::default();
    registry.register(
        "waypoint_config_conflicts",
        "VirtualServices shadowed by an older one for the same host (1 while it lasts)",
        conflicts.clone(),
    );
    let ctx = Arc::new(Context {
        config: config.clone(),
        store: store.clone(),
        certs: certs.clone(),
        routes: ArcSwap::from_pointee(Routing::default()),
        upstreams,
        metrics: RequestMetrics::new(&mut registry),
        tcp_metrics: TcpMetrics::new(&mut registry, &config.cluster_id),
        live: Live::default(),
        connector,
        conflicts,
        rate_limits: crate::ratelimit::RateLimits::new(&mut registry),
    });
    let applied = Arc::new(AtomicBool::new(false));
    tokio::spawn(follow_state(
        ctx.clone(),
        applied.clone(),
        sources_stop.clone(),
    ));

    let shutdown = CancellationToken::new();
    let accepting = CancellationToken::new();
    let hbone = HboneServer::bind(
        config.hbone_addr,
        config.hbone.clone(),
        Arc::new(ManagedCertificate {
            manager: certs.clone(),
            identity: config.identity.clone(),
        }),
    )
    .await
    .with_context(|| format!("HBONE listener on {}", config.hbone_addr))?;
    let hbone_addr = hbone.local_addr();
    let handler_ctx = ctx.clone();
    tokio::spawn(hbone.run(accepting.clone(), move |tunnel| {
        crate::inbound::tunnel(handler_ctx.clone(), tunnel)
    }));

    mesh::accept::register_metrics(&mut registry);
    let registry = Arc::new(registry);
    let admin_listener = mesh::ops::bind("admin", config.admin_addr)
        .await
        .map_err(anyhow::Error::msg)?;
    let metrics_listener = mesh::ops::bind("metrics", config.metrics_addr)
        .await
        .map_err(anyhow::Error::msg)?;
    let readiness_listener = mesh::ops::bind("readiness", config.readiness_addr)
        .await
        .map_err(anyhow::Error::msg)?;
    let admin_addr = admin_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let readiness_addr = readiness_listener.local_addr()?;
    let draining = Arc::new(AtomicBool::new(false));
    let ops_stop = CancellationToken::new();
    mesh::ops::serve(
        "admin",
        admin_listener,
        config.operator,
        ops_stop.clone(),
        crate::admin::admin_handler(ctx.clone(), log, shutdown.clone()),
    );
    mesh::ops::serve(
        "metrics",
        metrics_listener,
        config.operator,
        ops_stop.clone(),
        mesh::ops::metrics_handler(registry),
    );
    mesh::ops::serve(
        "readiness",
        readiness_listener,
        config.operator,
        ops_stop.clone(),
        crate::admin::readiness_handler(ctx.clone(), applied, draining.clone()),
    );

    let drain_ctx = ctx.clone();
    let deadline = config.drain_deadline;
    let trigger = shutdown.clone();
    let done = tokio::spawn(async move {
        trigger.cancelled().await;
        tracing::info!(deadline = ?deadline, live = drain_ctx.live.len(), "draining: readiness off, HBONE listener closing (GOAWAY)");
        draining.store(true, Ordering::Release);
        accepting.cancel();
        if tokio::time::timeout(deadline, drain_ctx.live.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                live = drain_ctx.live.len(),
                "drain deadline passed: closing the remaining connections"
            );
        }
        sources_stop.cancel();
        // Pooled upstream connections (HBONE tunnels to the endpoints' ztunnels) close now,
        // so the far side sees a clean end instead of waiting for its own drain deadline.
        drain_ctx.upstreams.update(&State::default());
        ops_stop.cancel();
        tracing::info!("drained");
    });

    Ok(Bound {
        hbone_addr,
        admin_addr,
        metrics_addr,
        readiness_addr,
        ctx,
        shutdown,
        done,
    })
}

/// Recompiles routes and updates upstreams on every new state.
async fn follow_state(ctx: Arc<Context>, applied: Arc<AtomicBool>, stop: CancellationToken) {
    let mut changes = ctx.store.subscribe();
    let mut reported = std::collections::HashSet::new();
    loop {
        let state = ctx.store.snapshot();
        let routing = Routing::build(state.clone());
        ctx.conflicts.clear();
        for conflict in routing.table.conflicts() {
            ctx.conflicts
                .get_or_create(&ConflictLabels {
                    host: conflict.host.clone(),
                    winner: conflict.winner.clone(),
                    shadowed: conflict.shadowed.clone(),
                })
                .set(1);
            let id = format!(
                "{}|{}|{}",
                conflict.host, conflict.winner, conflict.shadowed
            );
            if reported.insert(id) {
                tracing::warn!(
                    host = %conflict.host,
                    winner = %conflict.winner,
                    shadowed = %conflict.shadowed,
                    "VirtualService {} is shadowed for host {}: VirtualService {} is older and wins (Istio's rule); merge them or remove one",
                    conflict.shadowed, conflict.host, conflict.winner
                );
            }
        }
        ctx.upstreams.update(&state);
        let waypoint = &ctx.config.waypoint;
        ctx.rate_limits
            .update(&state, &waypoint.namespace, &waypoint.name);
        ctx.routes.store(Arc::new(routing));
        if ctx.store.has_synced() {
            applied.store(true, Ordering::Release);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        // Coalesce bursts of file events.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
