//! The `waypoint` command: `run` serves the services bound to this waypoint.

/// The data path allocates per request and per chunk; mimalloc keeps that memory pooled per
/// thread (the same choice as ztunnel, where glibc's allocator cost 40-70% of bulk throughput).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mesh::configure_allocator_before_main!();

use clap::{Parser, Subcommand};

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
    /// environment variables: WAYPOINT_NAME, WAYPOINT_NAMESPACE, CA_ADDRESS, CA_ROOT_CERT
    /// (required); CONFIG_SOURCE (`file` | `kubernetes`; `file` when MESH_CONFIG_PATH is set),
    /// MESH_CONFIG_PATH, SERVICE_ACCOUNT (default: the name), TRUST_DOMAIN,
    /// CLUSTER_DOMAIN, ROOT_NAMESPACE, CLUSTER_ID (default `Kubernetes`), CA_SERVER_NAME,
    /// CA_TOKEN_FILE, CA_REQUEST_TIMEOUT_MS (default 10000), HBONE_ADDR (default
    /// 0.0.0.0:15008), ADMIN_ADDR (loopback unless ADMIN_ALLOW_REMOTE=true), METRICS_ADDR,
    /// READINESS_ADDR, OPERATOR_MAX_CONNECTIONS (per operator port, default 100),
    /// DRAIN_DEADLINE_SECONDS, WORKLOAD_CERT_TTL_SECONDS (60 to 7776000, default 86400),
    /// PROTOCOL_DETECTION_TIMEOUT_MS (0 = wait), WAYPOINT_WORKER_THREADS (1 to 64, default 2),
    /// HBONE_MAX_STREAMS_PER_CONNECTION (default 100), HBONE_MAX_CONNECTIONS_PER_PEER (default
    /// 100).
    Run,
    /// Run as an ingress gateway: listen on the servers of the Istio `Gateway`s whose selector
    /// matches GATEWAY_LABELS and on the listeners of the Gateway API Gateways of class
    /// GATEWAY_CLASS (default istio) named by the label gateway.networking.k8s.io/gateway-name
    /// in GATEWAY_NAMESPACE, terminate TLS with their Secrets (read from GATEWAY_NAMESPACE),
    /// route by the VirtualServices bound to those Gateways and the HTTPRoutes attached to
    /// those listeners, and send each request into the mesh over HBONE. Configured as `run`,
    /// with GATEWAY_NAME, GATEWAY_NAMESPACE and GATEWAY_LABELS (`istio=ingress,app=istio-ingress`)
    /// in place of WAYPOINT_NAME/WAYPOINT_NAMESPACE, and GATEWAY_BIND_ADDRESS (default
    /// 0.0.0.0); no HBONE listener.
    Gateway,
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
    // Held until `run` returns, so buffered log lines are written before the process exits.
    let logging = mesh::ops::init_logging(&cli.log)?;
    let log = logging.control.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(waypoint::config::worker_threads(&mesh::ops::ProcessEnv)?)
        .enable_all()
        .on_thread_park(mesh::alloc::on_worker_park)
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Config(args) => {
                print!("{}", waypoint::operator::run(args).await?);
                Ok(())
            }
            Command::Run | Command::Gateway => {
                mesh::accept::raise_and_log_open_file_limit();
                let role = match cli.command {
                    Command::Gateway => waypoint::config::Role::Ingress,
                    _ => waypoint::config::Role::Waypoint,
                };
                let config = waypoint::config::Config::from_env_for(&mesh::ops::ProcessEnv, role)?;
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
