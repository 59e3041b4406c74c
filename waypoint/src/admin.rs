//! The operator's ports: admin (`/config_dump`, `/logging`, `/quitquitquit`) and readiness
//! (`/healthz/ready`); `/metrics` is [`mesh::ops::metrics_handler`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::StatusCode;
use mesh::cert_manager::CertManager;
use mesh::ops::{Handler, LogControl, text};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;

/// What `/config_dump` shows: the waypoint, the services it serves with the VirtualServices and
/// DestinationRules that apply to them, the upstream clusters (endpoints, ejections, pools) and
/// its certificate.
#[derive(serde::Serialize)]
struct ConfigDump<'a> {
    config: &'a crate::config::Config,
    services: Vec<ServedService>,
    upstreams: serde_json::Value,
    certificates: Vec<mesh::cert_manager::CertSummary>,
    /// The ingress gateway's listeners, servers (with their certificates' serials, SANs and
    /// expiry; never key material) and the servers it cannot serve.
    #[serde(skip_serializing_if = "Option::is_none")]
    ingress: Option<Arc<crate::ingress::IngressStatus>>,
    state: &'a mesh::model::State,
}

#[derive(serde::Serialize)]
struct ServedService {
    service: String,
    hostname: String,
    virtual_service: Option<String>,
    /// What routes the service: `VirtualService ns/name` or the HTTPRoutes attached to it.
    routed_by: Option<String>,
    destination_rule: Option<String>,
}

/// `/healthz/ready`: the first state applied, the waypoint's certificate available, not
/// draining.
pub fn readiness_handler(
    certs: CertManager,
    applied: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
) -> Handler {
    Arc::new(move |req| {
        if req.uri().path() != "/healthz/ready" {
            return text(StatusCode::NOT_FOUND, "try /healthz/ready\n");
        }
        let why = if draining.load(Ordering::Acquire) {
            Some("draining".to_owned())
        } else if !applied.load(Ordering::Acquire) {
            Some("waiting for the first configuration load".to_owned())
        } else {
            certs
                .summaries()
                .into_iter()
                .find_map(|c| c.not_ready(std::time::SystemTime::now()))
        };
        match why {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        }
    })
}

/// `/config_dump`, `/logging`, `/quitquitquit`.
pub fn admin_handler(
    config: Arc<Config>,
    engine: Arc<Engine>,
    ingress: Option<Arc<crate::ingress::Ingress>>,
    certs: CertManager,
    log: Option<LogControl>,
    quit: CancellationToken,
) -> Handler {
    mesh::ops::admin_handler(
        move || {
            // The state the routes were compiled from (not the store's newest), so a reader
            // that sees a change here knows requests are routed by it.
            let routing = engine.routes.load();
            let state = &routing.state;
            let services = state
                .services
                .values()
                .filter(|s| s.waypoint.as_ref() == Some(&config.waypoint))
                .map(|s| {
                    let routes = state
                        .virtual_services
                        .iter()
                        .find(|vs| vs.hosts.contains(&s.hostname));
                    ServedService {
                        service: s.key(),
                        hostname: s.hostname.clone(),
                        virtual_service: routes.map(|vs| vs.key()),
                        routed_by: routes.map(|vs| vs.describe()),
                        destination_rule: state
                            .destination_rules
                            .iter()
                            .find(|dr| dr.host == s.hostname)
                            .map(|dr| dr.key()),
                    }
                })
                .collect();
            let dump = ConfigDump {
                config: &config,
                services,
                upstreams: serde_json::to_value(engine.upstreams.snapshot()).unwrap_or_default(),
                certificates: certs.summaries(),
                ingress: ingress.as_ref().map(|i| i.status()),
                state,
            };
            mesh::ops::json(&dump)
        },
        log,
        quit,
    )
}
