//! waypoint: the optional per-namespace L7 proxy of the ambient mesh.
//!
//! ztunnel sends a service's traffic here over HBONE when the service (or its namespace) is
//! labelled `istio.io/use-waypoint=<name>`. The waypoint terminates HBONE, serves HTTP/1.1 and
//! HTTP/2, applies `VirtualService` routes ([`route`]), `DestinationRule` policies and the
//! connection pools to the chosen endpoints ([`upstream`]), L7 `AuthorizationPolicy`
//! ([`authz`]) and this project's `RateLimitPolicy` ([`ratelimit`]), then opens HBONE to the
//! endpoint's ztunnel.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod config;
pub mod connector;
pub mod engine;
pub mod http_front;
pub mod inbound;
pub mod ingress;
pub mod live;
pub mod metrics;
pub mod operator;
pub mod ratelimit;
pub mod request;
pub mod rewind;
pub mod route;
pub mod upstream;
