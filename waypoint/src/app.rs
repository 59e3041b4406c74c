//! The composition root: [`build`] turns a [`Config`] into a running waypoint (state source,
//! certificate, the L7 [`Engine`] kept in step with the state, its HBONE front door, operator
//! ports, drain) and returns the bound addresses. `main`, the demo and the tests call it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use mesh::discovery::StoreWriter;
use mesh::discovery::file::FileSourceConfig;
use mesh::discovery::kube::KubeSourceConfig;
use mesh::discovery::{SourceKind, SourceSpec};
use mesh::hbone::server::ManagedCertificate;
use mesh::hbone::{ClientConfig, HboneClient, HboneServer};
use mesh::model::State;
use mesh::model::translate::TranslateConfig;
use mesh::ops::LogControl;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connector::HboneConnector;
use crate::engine::{Engine, EngineIdentity};
use crate::inbound::Inbound;
use crate::live::Live;
use crate::upstream::{Side, Upstreams};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConflictLabels {
    pub host: String,
    pub winner: String,
    pub shadowed: String,
}

/// A running waypoint.
#[derive(Debug)]
pub struct Bound {
    /// The HBONE listener (a waypoint); `None` for an ingress gateway, which has none.
    pub hbone_addr: Option<SocketAddr>,
    /// The ingress front door (`waypoint gateway`).
    pub ingress: Option<Arc<crate::ingress::Ingress>>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub engine: Arc<Engine>,
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
        ingress_gateway_class: config.ingress.as_ref().map_or_else(
            || mesh::model::translate::DEFAULT_INGRESS_GATEWAY_CLASS.to_owned(),
            |i| i.class.clone(),
        ),
    };
    let source = match config.config_source() {
        SourceKind::File => SourceSpec::File(FileSourceConfig {
            translate,
            ..FileSourceConfig::new(config.config_path.clone())
        }),
        SourceKind::Kubernetes if config.ingress.is_some() => SourceSpec::Kubernetes(
            KubeSourceConfig::ingress(translate, &config.waypoint.namespace),
        ),
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
    let upstreams = Upstreams::for_side(
        connector.clone(),
        if config.ingress.is_some() {
            Side::Ingress
        } else {
            Side::Waypoint
        },
    );
    let conflicts = Family::<ConflictLabels, Gauge>::default();
    registry.register(
        "waypoint_config_conflicts",
        "VirtualServices shadowed by an older one for the same host (1 while it lasts)",
        conflicts.clone(),
    );
    let engine = Arc::new(Engine::new(
        EngineIdentity {
            gateway: config.waypoint.clone(),
            root_namespace: config.root_namespace.clone(),
            cluster_id: config.cluster_id.clone(),
            // Istio's gateways report as the client side of the request (`source`).
            reporter: if config.ingress.is_some() {
                mesh::metrics::Reporter::Source
            } else {
                mesh::metrics::Reporter::Waypoint
            },
        },
        upstreams,
        &mut registry,
    ));
    let applied = Arc::new(AtomicBool::new(false));
    tokio::spawn(follow_state(
        engine.clone(),
        store.clone(),
        conflicts,
        applied.clone(),
        sources_stop.clone(),
    ));
    let live = Arc::new(Live::default());

    let shutdown = CancellationToken::new();
    let accepting = CancellationToken::new();
    let (hbone_addr, ingress) = match &config.ingress {
        None => {
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
            let inbound = Arc::new(Inbound {
                engine: engine.clone(),
                store: store.clone(),
                waypoint: config.waypoint.clone(),
                protocol_detection_timeout: config.protocol_detection_timeout,
                live: live.clone(),
            });
            tokio::spawn(hbone.run(accepting.clone(), move |tunnel| {
                crate::inbound::tunnel(inbound.clone(), tunnel)
            }));
            (Some(hbone_addr), None)
        }
        Some(ingress_config) => {
            let ingress = Arc::new(crate::ingress::Ingress::new(
                engine.clone(),
                store.clone(),
                ingress_config.clone(),
                config.waypoint.namespace.clone(),
                config.waypoint.name.clone(),
                config.cluster_domain.clone(),
                live.clone(),
                &mut registry,
            ));
            tokio::spawn(ingress.clone().run(accepting.clone()));
            (None, Some(ingress))
        }
    };

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
        crate::admin::admin_handler(
            config.clone(),
            engine.clone(),
            ingress.clone(),
            certs.clone(),
            log,
            shutdown.clone(),
        ),
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
        crate::admin::readiness_handler(certs.clone(), applied, draining.clone()),
    );

    let drain_engine = engine.clone();
    let deadline = config.drain_deadline;
    let trigger = shutdown.clone();
    let done = tokio::spawn(async move {
        trigger.cancelled().await;
        tracing::info!(deadline = ?deadline, live = live.len(), "draining: readiness off, listeners closing (HBONE: GOAWAY)");
        draining.store(true, Ordering::Release);
        accepting.cancel();
        if tokio::time::timeout(deadline, live.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                live = live.len(),
                "drain deadline passed: closing the remaining connections"
            );
        }
        sources_stop.cancel();
        // Pooled upstream connections (HBONE tunnels to the endpoints' ztunnels) close now,
        // so the far side sees a clean end instead of waiting for its own drain deadline.
        drain_engine.upstreams.update(&State::default());
        ops_stop.cancel();
        tracing::info!("drained");
    });

    Ok(Bound {
        hbone_addr,
        ingress,
        admin_addr,
        metrics_addr,
        readiness_addr,
        engine,
        shutdown,
        done,
    })
}

/// Puts every new state in force in the engine and reports its route conflicts.
async fn follow_state(
    engine: Arc<Engine>,
    store: mesh::discovery::Store,
    conflicts: Family<ConflictLabels, Gauge>,
    applied: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut changes = store.subscribe();
    let mut reported = std::collections::HashSet::new();
    loop {
        let routing = engine.apply(store.snapshot());
        conflicts.clear();
        for conflict in routing.table.conflicts() {
            conflicts
                .get_or_create(&ConflictLabels {
                    host: conflict.host.clone(),
                    winner: conflict.winner.clone(),
                    shadowed: conflict.shadowed.clone(),
                })
                .set(1);
            let id = format!(
                "{}|{}|{}",
                conflict.host, conflict.winner_is, conflict.shadowed_is
            );
            if reported.insert(id) {
                tracing::warn!(
                    host = %conflict.host,
                    winner = %conflict.winner,
                    shadowed = %conflict.shadowed,
                    "{} is shadowed for host {}: {} takes precedence (an older VirtualService wins, as in Istio; HTTPRoutes attached to the Service win over VirtualServices); merge them or remove one",
                    conflict.shadowed_is, conflict.host, conflict.winner_is
                );
            }
        }
        if store.has_synced() {
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
