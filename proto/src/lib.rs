//! Protocol buffer types and gRPC stubs the mesh speaks on the wire.
//!
//! Only Istio's certificate service lives here today (`istio.v1.auth`), so that this project's CA,
//! istiod and cert-manager's istio-csr are interchangeable. The Rust is generated from the
//! `.proto` files under `proto/` and checked in; `tests/generated_up_to_date.rs` regenerates it
//! with pure-Rust tools and fails when the two drift apart.

#![forbid(unsafe_code)]

/// Istio's certificate service: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
#[allow(
    unreachable_pub,
    missing_docs,
    clippy::all,
    missing_debug_implementations
)]
pub mod istio_ca {
    include!("generated/istio.v1.auth.rs");
}

pub use istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
