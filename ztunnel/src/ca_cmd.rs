//! `ztunnel ca`: runs the mesh's certificate authority, speaking Istio's
//! `IstioCertificateService` over TLS, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use mesh::ca::kube_auth::{self, KubeAuthConfig, KubeAuthenticator, NamespacedName};
use mesh::ca::root_configmap::{self, RootPublisher, RootPublisherConfig};
use mesh::ca::{
    AllowAny, Authenticator, CaKeySource, CaMetrics, CaServer, CaService, CaServingNames,
    CertificateAuthority, StaticTokens,
};
use tokio_util::sync::CancellationToken;

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
    /// `authorization: Bearer` may obtain that identity. Without it (or --kubernetes-auth) any
    /// caller gets any identity, which is allowed only on a loopback address.
    #[arg(long, env = "MESH_CA_TOKENS_FILE", conflicts_with = "kubernetes_auth")]
    pub tokens_file: Option<PathBuf>,
    /// Authenticate callers with the Kubernetes TokenReview API and authorize them as istiod
    /// does: a caller may obtain its own identity; a trusted ztunnel (see
    /// --ztunnel-service-accounts) the identity of a pod on its node. Needs in-cluster
    /// credentials (or KUBECONFIG) allowed to create tokenreviews and get/list pods.
    #[arg(long, env = "MESH_CA_KUBERNETES_AUTH")]
    pub kubernetes_auth: bool,
    /// With --kubernetes-auth: the `<namespace>/<service account>`s of the node proxies that
    /// may ask on behalf of their node's pods (Istio's CA_TRUSTED_NODE_ACCOUNTS).
    #[arg(
        long,
        env = "MESH_CA_ZTUNNEL_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_value = kube_auth::DEFAULT_ZTUNNEL_ACCOUNT
    )]
    pub ztunnel_service_accounts: Vec<NamespacedName>,
    /// With --kubernetes-auth: the audiences a caller's token must be valid for (Istio's
    /// TOKEN_AUDIENCES, default istio-ca).
    #[arg(
        long,
        env = "MESH_CA_TOKEN_AUDIENCES",
        value_delimiter = ',',
        default_value = kube_auth::ISTIO_CA_AUDIENCE
    )]
    pub token_audiences: Vec<String>,
    /// `<namespace>/<name>` of a Secret holding the CA key (`ca-cert.pem`, `ca-key.pem`, as
    /// Istio's istio-ca-secret or cacerts); created with a new root on first start. Its
    /// contents are written to --ca-dir for loading. Conflicts with --ca-cert.
    #[arg(long, env = "MESH_CA_SECRET", conflicts_with = "ca_cert")]
    pub ca_secret: Option<NamespacedName>,
    /// With --kubernetes-auth: the ConfigMap the CA keeps in every namespace (not being
    /// deleted) holding its root certificate under `root-cert.pem`, as istiod keeps
    /// istio-ca-root-cert; ztunnel and the waypoints mount it. Re-created when deleted, restored
    /// when edited. Needs list/watch on namespaces and list/watch/create/patch on configmaps.
    /// Empty: not published.
    #[arg(
        long,
        env = "MESH_CA_ROOT_CONFIGMAP",
        default_value = root_configmap::DEFAULT_ROOT_CONFIGMAP,
        value_parser = parse_root_configmap
    )]
    pub root_configmap: String,
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
    let kube_client = if args.kubernetes_auth || args.ca_secret.is_some() {
        Some(
            mesh::discovery::kube::default_client()
                .await
                .context("--kubernetes-auth/--ca-secret need the Kubernetes API")?,
        )
    } else {
        None
    };
    // Refuse an unsafe configuration before touching the key directory.
    let authenticator: Arc<dyn Authenticator> = match (&args.tokens_file, &kube_client) {
        (Some(path), _) => Arc::new(StaticTokens::from_file(path)?),
        (None, Some(client)) if args.kubernetes_auth => Arc::new(KubeAuthenticator::new(
            client.clone(),
            KubeAuthConfig {
                audiences: args.token_audiences.clone(),
                ztunnel_accounts: args.ztunnel_service_accounts.clone(),
                ..KubeAuthConfig::new(&args.trust_domain)
            },
        )),
        _ if args.listen.ip().is_loopback() => Arc::new(AllowAny),
        _ => bail!(
            "refusing to serve {} without --tokens-file or --kubernetes-auth: any caller could \
             obtain any identity; listen on a loopback address for local use",
            args.listen
        ),
    };
    let source = match (&args.ca_cert, &args.ca_key, &args.ca_secret, &kube_client) {
        (Some(cert), Some(key), _, _) => CaKeySource::Files {
            cert: cert.clone(),
            key: key.clone(),
            chain: args.ca_chain.clone(),
        },
        (_, _, Some(secret), Some(client)) => kube_auth::ca_key_from_secret(
            client.clone(),
            &secret.namespace,
            &secret.name,
            &args.trust_domain,
            &args.ca_dir,
        )
        .await
        .context("loading the CA key from its Secret")?,
        _ => CaKeySource::Directory(args.ca_dir.clone()),
    };
    let authority = CertificateAuthority::load(&source, &args.trust_domain)
        .context("loading the CA key")?
        .with_max_ttl(Duration::from_secs(args.max_ttl_seconds));
    // The trust anchor clients need: the root at the top of the chain, also when the CA signs
    // with a plugged-in intermediate.
    let root_pem = authority.root_pem().to_owned();
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
    let stop_publisher = CancellationToken::new();
    let publisher = match &kube_client {
        Some(client) if args.kubernetes_auth && !args.root_configmap.is_empty() => {
            let publisher = RootPublisher::new(
                client.clone(),
                RootPublisherConfig::new(&args.root_configmap, root_pem),
            );
            Some(tokio::spawn(publisher.run(stop_publisher.clone())))
        }
        _ => None,
    };
    tracing::info!(
        addr = %server.local_addr(),
        trust_domain = %args.trust_domain,
        auth = if args.tokens_file.is_some() {
            "tokens"
        } else if args.kubernetes_auth {
            "kubernetes (TokenReview, node authorization)"
        } else {
            "local (any caller)"
        },
        root_configmap = if publisher.is_some() {
            args.root_configmap.as_str()
        } else {
            "(not published)"
        },
        "CA ready"
    );
    let served = server.run(shutdown_signal()).await;
    stop_publisher.cancel();
    if let Some(publisher) = publisher {
        // It stops at once when cancelled; a panic in it is reported, not propagated.
        if let Err(e) = publisher.await {
            tracing::warn!(error = %e, "the root publisher ended abnormally");
        }
    }
    served?;
    tracing::info!("CA stopped");
    Ok(())
}

/// A ConfigMap name, or empty (not published).
fn parse_root_configmap(name: &str) -> Result<String, String> {
    if !name.is_empty() {
        root_configmap::check_configmap_name(name)?;
    }
    Ok(name.to_owned())
}

pub use mesh::ops::shutdown_signal;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ca: CaArgs,
    }

    #[test]
    fn kubernetes_auth_flags() {
        let cli = Cli::try_parse_from([
            "ca",
            "--kubernetes-auth",
            "--ztunnel-service-accounts",
            "istio-system/ztunnel,kube-system/ztunnel",
            "--ca-secret",
            "istio-system/istio-ca-secret",
        ])
        .unwrap();
        assert!(cli.ca.kubernetes_auth);
        assert_eq!(cli.ca.ztunnel_service_accounts.len(), 2);
        assert_eq!(cli.ca.token_audiences, vec!["istio-ca".to_owned()]);
        assert_eq!(
            cli.ca.ca_secret.unwrap().to_string(),
            "istio-system/istio-ca-secret"
        );
        // Istio's defaults.
        let cli = Cli::try_parse_from(["ca", "--kubernetes-auth"]).unwrap();
        assert_eq!(
            cli.ca.ztunnel_service_accounts[0].to_string(),
            "istio-system/ztunnel"
        );
        // The root is published as mesh-ca-root-cert unless told otherwise; empty turns it off.
        assert_eq!(cli.ca.root_configmap, "mesh-ca-root-cert");
        let cli = Cli::try_parse_from([
            "ca",
            "--kubernetes-auth",
            "--root-configmap",
            "istio-ca-root-cert",
        ])
        .unwrap();
        assert_eq!(cli.ca.root_configmap, "istio-ca-root-cert");
        let cli = Cli::try_parse_from(["ca", "--kubernetes-auth", "--root-configmap", ""]).unwrap();
        assert!(cli.ca.root_configmap.is_empty());
        assert!(Cli::try_parse_from(["ca", "--root-configmap", "Not_A_Name"]).is_err());
        // One authentication at a time; accounts must name their namespace.
        assert!(Cli::try_parse_from(["ca", "--kubernetes-auth", "--tokens-file", "t"]).is_err());
        assert!(Cli::try_parse_from(["ca", "--ztunnel-service-accounts", "ztunnel"]).is_err());
    }
}
