//! The `ztunnel` command.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about = "Ambient mesh node proxy")]
struct Cli {
    /// Log filter, as RUST_LOG (e.g. `info`, `mesh=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the mesh's certificate authority (Istio's certificate service over gRPC/TLS).
    Ca(ztunnel::ca_cmd::CaArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log)?)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Ca(args) => ztunnel::ca_cmd::run(args).await,
        }
    })
}
