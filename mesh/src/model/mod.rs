//! The domain model and the translation that builds it.
//!
//! [`translate`] turns Kubernetes and Istio objects (from whichever source) into one validated
//! [`State`]; [`istio_crd`] and [`networking_crd`] hold the serde shapes of the Istio and Gateway
//! API resources it reads, [`ratelimit_crd`] that of this project's own `RateLimitPolicy`.
//! Nothing in here does I/O: the sources in [`crate::discovery`] feed objects in and publish the
//! result.

pub mod gateway_api_crd;
mod ingress;
pub mod ingress_crd;
pub mod istio_crd;
mod l7;
pub mod networking_crd;
mod ratelimit;
pub mod ratelimit_crd;
mod route_status;
pub mod translate;
mod types;

pub use ingress::*;
pub use l7::*;
pub use ratelimit::*;
pub use route_status::*;
pub use types::*;
