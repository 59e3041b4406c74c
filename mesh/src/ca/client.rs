//! Asking a CA for a certificate over Istio's gRPC protocol.
//!
//! [`CertificateSigner`] is the seam the certificate manager uses; [`GrpcCaClient`] implements it
//! against this project's CA, istiod or istio-csr alike.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use proto::IstioCertificateRequest;
use proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("CA address {address:?} is invalid: {why}")]
    Address { address: String, why: String },
    #[error("reading CA token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA at {address} refused the request for {identity}: {code:?}: {message}")]
    Refused {
        address: String,
        identity: Identity,
        code: tonic::Code,
        message: String,
    },
    #[error("CA at {address} is unreachable: {message} (is it running and is the address right?)")]
    Unreachable { address: String, message: String },
    #[error(
        "CA at {address} did not answer within {after:?} (TCP connect, TLS handshake and \
         CreateCertificate together): is {address} the CA's gRPC-over-TLS port (15012 by \
         default) and is the CA healthy?"
    )]
    Timeout { address: String, after: Duration },
    #[error("CA returned an empty certificate chain for {0}")]
    EmptyChain(Identity),
}

/// Turns a CSR into a signed chain (leaf first, root last).
pub trait CertificateSigner: Send + Sync + 'static {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, SignError>>;
}

/// Where the bearer token comes from. A file is read again on every request, because projected
/// service-account tokens rotate.
#[derive(Debug, Clone, Default)]
pub enum TokenSource {
    #[default]
    None,
    Static(String),
    File(PathBuf),
}

impl TokenSource {
    async fn token(&self) -> Result<Option<String>, SignError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Static(t) => Ok(Some(t.clone())),
            TokenSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|source| SignError::Token {
                    path: path.clone(),
                    source,
                }),
        }
    }
}

/// How to reach a CA.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `host:port` or `https://host:port`.
    pub address: String,
    /// PEM root that signed the CA's serving certificate.
    pub root_cert_pem: String,
    /// The name the CA's certificate carries, when it differs from the address' host (for
    /// istiod: `istiod.istio-system.svc`).
    pub server_name: Option<String>,
    pub token: TokenSource,
    /// Send the identity under `ImpersonatedIdentity` metadata, as Istio's ztunnel does when it
    /// asks on a pod's behalf.
    pub impersonate: bool,
    /// Deadline of one signing request, connecting included.
    pub timeout: Duration,
}

/// A gRPC client of `IstioCertificateService`. The connection is made lazily and re-made after
/// failures, so a CA that is down at start-up is not fatal.
///
/// Every [`CertificateSigner::sign`] call ends within `timeout`. tonic's own timeouts do not
/// ensure that: `Endpoint::connect_timeout` covers only the TCP connect, and
/// `Endpoint::timeout` starts only once a lazy channel has connected (the connection is made
/// while the request waits in the channel's buffer), so a CA that accepts and never finishes
/// the TLS handshake held a request, and every caller waiting on it, for ever.
#[derive(Debug, Clone)]
pub struct GrpcCaClient {
    client: IstioCertificateServiceClient<Channel>,
    address: String,
    token: TokenSource,
    impersonate: bool,
    timeout: Duration,
}

impl GrpcCaClient {
    pub fn new(config: CaClientConfig) -> Result<Self, SignError> {
        let address = config.address.clone();
        let url = if address.starts_with("https://") {
            address.clone()
        } else {
            format!("https://{address}")
        };
        let bad = |why: String| SignError::Address {
            address: address.clone(),
            why,
        };
        // The handshake deadline lets the channel give up a stalled connection attempt (and try
        // again on the next request) instead of keeping it, and every later request, waiting.
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(config.root_cert_pem.as_bytes()))
            .timeout(config.timeout);
        if let Some(name) = &config.server_name {
            tls = tls.domain_name(name.clone());
        }
        let channel = Endpoint::from_shared(url)
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            client: IstioCertificateServiceClient::new(channel),
            address,
            token: config.token,
            impersonate: config.impersonate,
            timeout: config.timeout,
        })
    }
}

impl CertificateSigner for GrpcCaClient {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, SignError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.sign_unbounded(identity, csr_pem, ttl))
                .await
                .unwrap_or_else(|_| {
                    Err(SignError::Timeout {
                        address: self.address.clone(),
                        after: self.timeout,
                    })
                })
        })
    }
}

impl GrpcCaClient {
    async fn sign_unbounded(
        &self,
        identity: &Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> Result<Vec<String>, SignError> {
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: ttl.as_secs() as i64,
            metadata: self
                .impersonate
                .then(|| super::server::impersonation_metadata(identity)),
        });
        if let Some(token) = self.token.token().await? {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| SignError::Refused {
                    address: self.address.clone(),
                    identity: identity.clone(),
                    code: tonic::Code::InvalidArgument,
                    message: "token holds characters not allowed in a header".into(),
                })?;
            request.metadata_mut().insert("authorization", value);
        }
        // Tells the CA how long we wait (`grpc-timeout`), so it can give up too.
        request.set_timeout(self.timeout);
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                    if status.message().contains("transport")
                        || status.code() != tonic::Code::Unknown =>
                {
                    let message = format!("{}: {}", status.message(), source_chain(&status));
                    // A connection attempt given up by its deadline (TCP connect or TLS
                    // handshake), which the channel reports to the request after it: the CA did
                    // not answer, it did not refuse.
                    if message.to_ascii_lowercase().contains("timeout")
                        || message.contains("timed out")
                    {
                        SignError::Timeout {
                            address: self.address.clone(),
                            after: self.timeout,
                        }
                    } else {
                        SignError::Unreachable {
                            address: self.address.clone(),
                            message,
                        }
                    }
                }
                code => SignError::Refused {
                    address: self.address.clone(),
                    identity: identity.clone(),
                    code,
                    message: status.message().to_owned(),
                },
            })?;
        let chain = response.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(SignError::EmptyChain(identity.clone()));
        }
        Ok(chain)
    }
}

fn source_chain(err: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push(e.to_string());
        cur = e.source();
    }
    out.join(": ")
}
