//! The `ztunnel` command: `run` serves this node's pods, `ca` runs the certificate authority.

/// The data path allocates a buffer per chunk it moves; glibc's allocator serves chunks of a
/// few hundred KiB with fresh mmaps (a page fault per page, every time), which the benchmark
/// showed dominating bulk transfers. mimalloc keeps such memory pooled per thread.
/// The `system-allocator` feature keeps glibc's, for heap profilers that hook `malloc`
/// (heaptrack, valgrind): `cargo build -p ztunnel --features system-allocator`.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mesh::configure_allocator_before_main!();

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about = "Ambient mesh node proxy")]
struct Cli {
    /// Log filter, as RUST_LOG (e.g. `info`, `mesh=debug`, `access=off`).
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve this node's enrolled pods. Configured by environment variables: NODE_NAME,
    /// CA_ADDRESS, CA_ROOT_CERT (required); CONFIG_SOURCE (`file` | `kubernetes`; `file` when
    /// MESH_CONFIG_PATH is set), MESH_CONFIG_PATH, TRUST_DOMAIN, CLUSTER_DOMAIN,
    /// ROOT_NAMESPACE, CLUSTER_ID (default `Kubernetes`), CA_SERVER_NAME, CA_TOKEN_FILE,
    /// CA_REQUEST_TIMEOUT_MS (default 10000), CAPTURE_MODE (`none` | `netns:<prefix>` |
    /// `proc`), CAPTURE_PROBE_SOURCES (IPs whose connections skip capture, e.g. the node's),
    /// DNS_CAPTURE (default true with capture), DNS_UPSTREAMS, DNS_UPSTREAM_TIMEOUT_MS,
    /// ADMIN_ADDR (loopback unless ADMIN_ALLOW_REMOTE=true), METRICS_ADDR, READINESS_ADDR,
    /// OPERATOR_MAX_CONNECTIONS (per operator port, default 100), SOCKS5_ADDR (`off` to
    /// disable), DRAIN_DEADLINE_SECONDS, WORKLOAD_CERT_TTL_SECONDS (60 to 7776000, default
    /// 86400), ZTUNNEL_WORKER_THREADS (1 to 64, default 2),
    /// HBONE_MAX_STREAMS_PER_CONNECTION (default 100), HBONE_MAX_CONNECTIONS_PER_PEER (default
    /// 100, per pod).
    Run,
    /// Run the mesh's certificate authority (Istio's certificate service over gRPC/TLS).
    Ca(Box<ztunnel::ca_cmd::CaArgs>),
    /// Show what a running ztunnel knows: workloads, services, policies, certificates,
    /// connections (reads its admin port).
    Config(ztunnel::operator::ConfigArgs),
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
        .worker_threads(ztunnel::config::worker_threads(
            &ztunnel::config::ProcessEnv,
        )?)
        .enable_all()
        .on_thread_park(mesh::alloc::on_worker_park)
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Ca(args) => {
                mesh::accept::raise_and_log_open_file_limit();
                ztunnel::ca_cmd::run(*args).await
            }
            Command::Config(args) => {
                print!("{}", ztunnel::operator::run(args).await?);
                Ok(())
            }
            Command::Run => {
                mesh::accept::raise_and_log_open_file_limit();
                let config = ztunnel::config::Config::from_env(&ztunnel::config::ProcessEnv)?;
                let bound = ztunnel::app::build(config, Some(log)).await?;
                let trigger = bound.shutdown_trigger();
                tokio::spawn(async move {
                    ztunnel::ca_cmd::shutdown_signal().await;
                    trigger.cancel();
                });
                bound.wait().await
            }
        }
    })
}
