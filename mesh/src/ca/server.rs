//! The CA's gRPC face: Istio's `IstioCertificateService/CreateCertificate`, served over TLS.
//!
//! Every request is authenticated and authorised by an [`Authenticator`] before anything is
//! signed, and every decision is logged with who asked for what.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use proto::istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use proto::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use super::authority::{CaError, CertificateAuthority};
use crate::identity::Identity;

/// Metadata key under which Istio's ztunnel names the identity it asks for on a pod's behalf.
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";

/// Who is asking, as far as the transport tells.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token from `authorization: Bearer <token>`, if any.
    pub bearer_token: Option<String>,
    pub remote_addr: Option<SocketAddr>,
    /// The identity named under `ImpersonatedIdentity`, if the caller asks on someone's behalf.
    pub impersonated: Option<Identity>,
}

/// Why an [`Authenticator`] refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The caller could not be identified (no token, bad token).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known but may not hold the identity.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

/// Decides whether a caller may obtain a certificate for an identity.
pub trait Authenticator: Send + Sync + 'static {
    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        requested: &'a Identity,
    ) -> BoxFuture<'a, Result<(), AuthError>>;
}

/// Local mode: anyone who can reach the CA gets any identity in the trust domain. For a laptop
/// or a test, never for a shared network.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAny;

impl Authenticator for AllowAny {
    fn authorize<'a>(
        &'a self,
        _: &'a Caller,
        _: &'a Identity,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A fixed table of bearer tokens and the identities each may hold.
#[derive(Debug, Default, Clone)]
pub struct StaticTokens {
    tokens: std::collections::HashMap<String, Vec<Identity>>,
}

impl StaticTokens {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `token` obtain `identity`.
    pub fn allow(mut self, token: impl Into<String>, identity: Identity) -> Self {
        self.tokens.entry(token.into()).or_default().push(identity);
        self
    }
}

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("token file {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("token file {path}, line {line}: {why}")]
    Line {
        path: std::path::PathBuf,
        line: usize,
        why: String,
    },
}

impl StaticTokens {
    /// Reads `<token> <identity>` lines; blank lines and lines starting with `#` are skipped.
    /// A token may appear on several lines to hold several identities.
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut tokens = StaticTokens::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |why: String| TokenFileError::Line {
                path: path.to_owned(),
                line: n + 1,
                why,
            };
            let mut fields = line.split_whitespace();
            let (Some(token), Some(identity), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(err("expected `<token> <spiffe identity>`".into()));
            };
            let identity = identity
                .parse()
                .map_err(|e: crate::identity::IdentityError| err(e.to_string()))?;
            tokens = tokens.allow(token, identity);
        }
        if tokens.tokens.is_empty() {
            return Err(TokenFileError::Line {
                path: path.to_owned(),
                line: 0,
                why: "no tokens: every caller would be refused".into(),
            });
        }
        Ok(tokens)
    }
}

impl Authenticator for StaticTokens {
    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        requested: &'a Identity,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        Box::pin(async move {
            let token = caller
                .bearer_token
                .as_deref()
                .ok_or_else(|| AuthError::Unauthenticated("no bearer token".into()))?;
            let allowed = self
                .tokens
                .get(token)
                .ok_or_else(|| AuthError::Unauthenticated("unknown bearer token".into()))?;
            if allowed.contains(requested) {
                Ok(())
            } else {
                Err(AuthError::PermissionDenied(format!(
                    "this token may not obtain {requested}"
                )))
            }
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CsrLabels {
    /// granted, denied, invalid, error
    result: &'static str,
}

/// CA metrics.
#[derive(Clone, Debug)]
pub struct CaMetrics {
    csr_requests: Family<CsrLabels, Counter>,
}

impl CaMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let csr_requests = Family::<CsrLabels, Counter>::default();
        registry.register(
            "mesh_ca_csr_requests",
            "Certificate signing requests, by result (granted, denied, invalid, error)",
            csr_requests.clone(),
        );
        Self { csr_requests }
    }

    fn count(&self, result: &'static str) {
        self.csr_requests.get_or_create(&CsrLabels { result }).inc();
    }
}

/// The gRPC service implementation. Mount it with [`CaService::into_server`].
pub struct CaService {
    authority: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    metrics: CaMetrics,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl CaService {
    pub fn new(
        authority: Arc<CertificateAuthority>,
        authenticator: Arc<dyn Authenticator>,
        metrics: CaMetrics,
    ) -> Self {
        Self {
            authority,
            authenticator,
            metrics,
        }
    }

    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    async fn create(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Vec<String>, Status> {
        let remote_addr = request.remote_addr();
        let bearer_token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_owned());
        let body = request.into_inner();
        let impersonated = impersonated_identity(body.metadata.as_ref()).map_err(|e| {
            Status::invalid_argument(format!("metadata {IMPERSONATED_IDENTITY_KEY}: {e}"))
        })?;
        let csr = self
            .authority
            .validate_csr(&body.csr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(imp) = &impersonated
            && imp != &csr.identity
        {
            return Err(Status::invalid_argument(format!(
                "CSR asks for {} but metadata {IMPERSONATED_IDENTITY_KEY} names {imp}",
                csr.identity
            )));
        }
        let caller = Caller {
            bearer_token,
            remote_addr,
            impersonated,
        };
        self.authenticator
            .authorize(&caller, &csr.identity)
            .await
            .map_err(|e| match e {
                AuthError::Unauthenticated(m) => Status::unauthenticated(m),
                AuthError::PermissionDenied(m) => Status::permission_denied(m),
            })?;
        let requested = match body.validity_duration {
            d if d > 0 => Some(Duration::from_secs(d as u64)),
            _ => None,
        };
        self.authority.sign(&csr, requested).map_err(|e| match e {
            CaError::TtlTooLong { .. } => Status::invalid_argument(e.to_string()),
            other => Status::internal(other.to_string()),
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let remote = request.remote_addr();
        let requested = request.get_ref().csr.len();
        match self.create(request).await {
            Ok(cert_chain) => {
                self.metrics.count("granted");
                let leaf = cert_chain
                    .first()
                    .and_then(|pem| crate::tls::parse_pem_certs(pem, "issued").ok())
                    .and_then(|c| crate::tls::cert_info(&c[0], "issued").ok());
                tracing::info!(
                    ?remote,
                    identity = ?leaf.as_ref().and_then(|l| l.identities.first().cloned()),
                    serial = leaf.as_ref().map(|l| l.serial.as_str()),
                    "CA: certificate granted"
                );
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(status) => {
                let result = match status.code() {
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => "denied",
                    tonic::Code::InvalidArgument => "invalid",
                    _ => "error",
                };
                self.metrics.count(result);
                tracing::warn!(
                    ?remote,
                    csr_bytes = requested,
                    code = ?status.code(),
                    reason = status.message(),
                    "CA: certificate request refused"
                );
                Err(status)
            }
        }
    }
}

fn impersonated_identity(
    metadata: Option<&prost_types::Struct>,
) -> Result<Option<Identity>, String> {
    use prost_types::value::Kind;
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY_KEY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) => s
            .parse()
            .map(Some)
            .map_err(|e: crate::identity::IdentityError| e.to_string()),
        _ => Err("must be a string".into()),
    }
}

/// Metadata naming `identity` as the one asked for on a pod's behalf, as Istio's ztunnel sends it.
pub fn impersonation_metadata(identity: &Identity) -> prost_types::Struct {
    use prost_types::value::Kind;
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        IMPERSONATED_IDENTITY_KEY.to_owned(),
        prost_types::Value {
            kind: Some(Kind::StringValue(identity.to_string())),
        },
    );
    prost_types::Struct { fields }
}

/// A running CA: bound, serving TLS with a certificate the root signed.
#[derive(Debug)]
pub struct CaServer {
    local_addr: SocketAddr,
    listener: tokio::net::TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    service: CaService,
}

/// How the CA presents itself over TLS: the names clients dial it by.
#[derive(Debug, Clone)]
pub struct CaServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

impl Default for CaServingNames {
    fn default() -> Self {
        Self {
            dns: vec!["localhost".into()],
            ips: vec![
                std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::Ipv6Addr::LOCALHOST.into(),
            ],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaServerError {
    #[error("CA: cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("CA: serving certificate: {0}")]
    ServingCert(String),
    #[error("CA: TLS configuration: {0}")]
    Tls(tonic::transport::Error),
    #[error("CA: server stopped: {0}")]
    Serve(tonic::transport::Error),
}

/// The CA's connections, accepted by [`crate::accept::Acceptor`]: tonic's own loop retries a
/// failed accept (EMFILE) at once, for ever.
fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    let acceptor = crate::accept::Acceptor::new(listener, "ca");
    futures::stream::unfold(acceptor, |mut acceptor| async move {
        let (stream, _) = acceptor.accept().await;
        let _ = stream.set_nodelay(true);
        Some((Ok(stream), acceptor))
    })
}

impl CaServer {
    /// Binds `addr` and prepares a serving certificate for `names`, signed by the CA itself.
    pub async fn bind(
        addr: SocketAddr,
        service: CaService,
        names: &CaServingNames,
    ) -> Result<Self, CaServerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| CaServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| CaServerError::Bind { addr, source })?;
        let (cert_pem, key_pem) = service
            .authority
            .serving_certificate(names)
            .map_err(|e| CaServerError::ServingCert(e.to_string()))?;
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem))
            .timeout(Duration::from_secs(10));
        Ok(Self {
            local_addr,
            listener,
            tls,
            service,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), CaServerError> {
        tracing::info!(addr = %self.local_addr, "CA: serving IstioCertificateService over TLS");
        tonic::transport::Server::builder()
            .tls_config(self.tls)
            .map_err(CaServerError::Tls)?
            .add_service(self.service.into_server())
            .serve_with_incoming_shutdown(incoming(self.listener), shutdown)
            .await
            .map_err(CaServerError::Serve)
    }
}
