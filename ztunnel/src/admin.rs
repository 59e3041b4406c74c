//! The operator's ports: admin (15000: `/config_dump`, `/logging`, `/quitquitquit`), metrics
//! (15020: `/metrics`) and readiness (15021: `/healthz/ready`). Plain HTTP/1.1 with hyper; each
//! listener is bound up front so a port conflict fails start-up with a clear error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::proxy::Context;

use mesh::ops::text;
pub use mesh::ops::{Handler, LogControl, bind, metrics_handler, serve};

/// Readiness: the first state load happened, every local pod has its certificate, and the
/// node is not draining.
#[derive(Debug, Default)]
pub struct Readiness {
    pub draining: AtomicBool,
}

impl Readiness {
    pub fn check(&self, ctx: &Context) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        if !ctx.store.has_synced() {
            return Err("waiting for the first configuration load".into());
        }
        if ctx.applied_version.load(Ordering::Acquire) == 0 {
            return Err("waiting for the pods of the first configuration to be set up".into());
        }
        let now = std::time::SystemTime::now();
        let pending: Vec<String> = ctx
            .certs
            .summaries()
            .into_iter()
            .filter_map(|c| c.not_ready(now))
            .collect();
        if !pending.is_empty() {
            return Err(pending.join("\n"));
        }
        Ok(())
    }
}

/// `/healthz/ready`.
pub fn readiness_handler(ctx: Arc<Context>, readiness: Arc<Readiness>) -> Handler {
    Arc::new(move |req| {
        if req.uri().path() != "/healthz/ready" {
            return text(StatusCode::NOT_FOUND, "try /healthz/ready\n");
        }
        match readiness.check(&ctx) {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        }
    })
}

/// What `/config_dump` shows.
#[derive(serde::Serialize)]
struct ConfigDump<'a> {
    node: &'a str,
    config: &'a crate::config::Config,
    pods: Vec<String>,
    state: &'a mesh::model::State,
    certificates: Vec<mesh::cert_manager::CertSummary>,
    connections: Vec<ConnectionDump>,
}

#[derive(serde::Serialize)]
struct ConnectionDump {
    #[serde(flatten)]
    conn: crate::proxy::live::LiveConnection,
    age_ms: u128,
    bytes_to_server: u64,
    bytes_to_client: u64,
}

/// `/config_dump`, `/logging`, `/quitquitquit`.
pub fn admin_handler(
    ctx: Arc<Context>,
    config: Arc<crate::config::Config>,
    log: Option<LogControl>,
    quit: CancellationToken,
) -> Handler {
    mesh::ops::admin_handler(
        move || {
            let state = ctx.store.snapshot();
            let mut pods: Vec<String> = ctx
                .pods_by_ip
                .load()
                .values()
                .map(|p| p.workload.uid.clone())
                .collect();
            pods.sort();
            pods.dedup();
            let dump = ConfigDump {
                node: &config.node_name,
                config: &config,
                pods,
                state: &state,
                certificates: ctx.certs.summaries(),
                connections: ctx
                    .live
                    .snapshot()
                    .into_iter()
                    .map(|c| ConnectionDump {
                        age_ms: c.started.elapsed().as_millis(),
                        bytes_to_server: c.bytes.a_to_b(),
                        bytes_to_client: c.bytes.b_to_a(),
                        conn: c,
                    })
                    .collect(),
            };
            mesh::ops::json(&dump)
        },
        log,
        quit,
    )
}
