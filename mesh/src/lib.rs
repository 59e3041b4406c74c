//! The library both proxies share: SPIFFE identity, mutual TLS, the certificate authority and
//! the certificate manager, HBONE tunnels (server, pooled client, stream), and the bidirectional
//! copy that moves bytes between a tunnel and a socket.
//!
//! Nothing here knows about pods or routes; ztunnel and the waypoint build on these pieces.
//! Dependencies point one way: `proto` <- `mesh` <- `ztunnel`, `waypoint`.

#![deny(unsafe_code)]

pub mod accept;
pub mod alloc;
pub mod ca;
pub mod cert_manager;
pub mod copy;
pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod tls;

pub use identity::Identity;
