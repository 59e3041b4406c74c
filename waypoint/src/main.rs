//! The `waypoint` command: `run` serves the services bound to this waypoint.

use std::sync::Arc;

/// The data path allocates per request and per chunk; mimalloc keeps that memory pooled per
/// thread (the same choice as ztunnel, where glibc's allocator cost 40-70% of bulk throughput).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

#[derive(Debug, Parser)]
#[command(name = "waypoint", version, about = "Ambient mesh L7 proxy (waypoint)")]
struct Cli {
    /// Log filter, as RUST_LOG (e.g. `info`, `waypoint=debug`, `access=off`).
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the services labelled `istio.io/use-waypoint=<WAYPOINT_NAME>`. Configured by
    /// environment variables: WAYPOINT_NAME, WAYPOINT_NAMESPACE, MESH_CONFIG_PATH, CA_ADDRESS,
    /// CA_ROOT_CERT (required); SERVICE_ACCOUNT (default: the name), TRUST_DOMAIN,
    /// CLUSTER_DOMAIN, ROOT_NAMESPACE, CA_SERVER_NAME, CA_TOKEN_FILE, HBONE_ADDR (default
    /// 0.0.0.0:15008), ADMIN_ADDR, METRICS_ADDR, READINESS_ADDR, DRAIN_DEADLINE_SECONDS,
    /// WORKLOAD_CERT_TTL_SECONDS, PROTOCOL_DETECTION_TIMEOUT_MS (0 = wait),
    /// WAYPOINT_WORKER_THREADS (default 2).
    Run,
    /// Show what a running waypoint serves: services with their routes, upstream clusters with
    /// endpoint health and overflows, its certificate (reads its admin port).
    Config(waypoint::operator::ConfigArgs),
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {}", mesh::ops::one_line(&e));
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (filter, handle) = reload::Layer::new(EnvFilter::try_new(&cli.log)?);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
        )
        .init();
    let log: mesh::ops::LogControl = Arc::new(move |f: &str| {
        let filter = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(waypoint::config::worker_threads(&mesh::ops::ProcessEnv)?)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Config(args) => {
                print!("{}", waypoint::operator::run(args).await?);
                Ok(())
            }
            Command::Run => {
                let config = waypoint::config::Config::from_env(&mesh::ops::ProcessEnv)?;
                let bound = waypoint::app::build(config, Some(log)).await?;
                let trigger = bound.shutdown_trigger();
                tokio::spawn(async move {
                    mesh::ops::shutdown_signal().await;
                    trigger.cancel();
                });
                bound.wait().await
            }
        }
    })
}
