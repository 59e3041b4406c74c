//! The certificate authority: signs workload certificates for SPIFFE identities, and the client
//! the proxies use to ask it (or istiod, or istio-csr) for them.
//!
//! [`authority`] holds the key and turns CSRs into chains; [`server`] is Istio's gRPC
//! `IstioCertificateService` over TLS with pluggable authorization; [`kube_auth`] is the
//! authorization for a cluster (TokenReview, Istio's node rules) and the key kept in a Secret;
//! [`root_configmap`] publishes the root to every namespace of a cluster; [`client`] is the
//! caller side.

pub mod authority;
pub mod client;
pub mod kube_auth;
pub mod root_configmap;
pub mod server;

pub use authority::{CaError, CaKeySource, CertificateAuthority};
pub use client::{CaClientConfig, CertificateSigner, GrpcCaClient, SignError, TokenSource};
pub use server::{
    AllowAny, AuthError, Authenticator, CaMetrics, CaServer, CaServerError, CaService,
    CaServingNames, Caller, StaticTokens, TokenFileError,
};
