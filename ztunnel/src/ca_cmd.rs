//! `ztunnel ca`: runs the mesh's certificate authority, speaking Istio's
//! `IstioCertificateService` over TLS, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use mesh::ca::{
    AllowAny, Authenticator, CaKeySource, CaMetrics, CaServer, CaService, CaServingNames,
    CertificateAuthority, StaticTokens,
};

/// Flags of `ztunnel ca`. Every flag can also be set by the environment variable shown.
#[derive(Debug, Clone, clap::Args)]
pub struct CaArgs {
    /// Address to serve gRPC over TLS on (istiod uses 15012).
    #[arg(long, env = "MESH_CA_LISTEN", default_value = "127.0.0.1:15012")]
    pub listen: SocketAddr,
    /// SPIFFE trust domain of every identity this CA signs.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Directory holding root-cert.pem and root-key.pem; a new ECDSA P-256 root is generated
    /// there on first start. Ignored when --ca-cert is given.
    #[arg(long, env = "MESH_CA_DIR", default_value = "./mesh-ca")]
    pub ca_dir: PathBuf,
    /// Your own signing certificate (a root, or an intermediate with --ca-chain).
    #[arg(long, env = "MESH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// PKCS#8 private key of --ca-cert.
    #[arg(long, env = "MESH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Certificates above --ca-cert up to the root, root last (Istio's cert-chain.pem works).
    #[arg(long, env = "MESH_CA_CHAIN", requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// Lines of `<token> <spiffe identity>`: a caller presenting the token in
    /// `authorization: Bearer` may obtain that identity. Without it any caller gets any identity,
    /// which is allowed only on a loopback address.
    #[arg(long, env = "MESH_CA_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// DNS names the CA's TLS certificate carries (clients dial one of them).
    #[arg(
        long,
        env = "MESH_CA_DNS_NAMES",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub dns_names: Vec<String>,
    /// Longest certificate lifetime a caller may ask for, in seconds.
    #[arg(long, env = "MESH_CA_MAX_TTL_SECONDS", default_value_t = 90 * 24 * 3600)]
    pub max_ttl_seconds: u64,
}

/// Builds and runs the CA until a termination signal.
pub async fn run(args: CaArgs) -> anyhow::Result<()> {
    // Refuse an unsafe configuration before touching the key directory.
    let authenticator: Arc<dyn Authenticator> = match &args.tokens_file {
        Some(path) => Arc::new(StaticTokens::from_file(path)?),
        None if args.listen.ip().is_loopback() => Arc::new(AllowAny),
        None => bail!(
            "refusing to serve {} without --tokens-file: any caller could obtain any identity; \
             listen on a loopback address for local use, or give a tokens file",
            args.listen
        ),
    };
    let source = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => CaKeySource::Files {
            cert: cert.clone(),
            key: key.clone(),
            chain: args.ca_chain.clone(),
        },
        _ => CaKeySource::Directory(args.ca_dir.clone()),
    };
    let authority = CertificateAuthority::load(&source, &args.trust_domain)
        .context("loading the CA key")?
        .with_max_ttl(Duration::from_secs(args.max_ttl_seconds));
    let mut names = CaServingNames {
        dns: args.dns_names.clone(),
        ..CaServingNames::default()
    };
    if !args.listen.ip().is_unspecified() && !names.ips.contains(&args.listen.ip()) {
        names.ips.push(args.listen.ip());
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let service = CaService::new(
        Arc::new(authority),
        authenticator,
        CaMetrics::new(&mut registry),
    );
    let server = CaServer::bind(args.listen, service, &names).await?;
    tracing::info!(
        addr = %server.local_addr(),
        trust_domain = %args.trust_domain,
        auth = if args.tokens_file.is_some() { "tokens" } else { "local (any caller)" },
        "CA ready"
    );
    server.run(shutdown_signal()).await?;
    tracing::info!("CA stopped");
    Ok(())
}

pub use mesh::ops::shutdown_signal;
