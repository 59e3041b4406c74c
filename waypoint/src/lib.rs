//! The waypoint: the optional per-namespace L7 proxy.
//!
//! It will terminate HBONE from ztunnels, parse HTTP/1.1, HTTP/2 and gRPC, apply Istio
//! `VirtualService`, `DestinationRule` and L7 `AuthorizationPolicy`, and open HBONE to the chosen
//! endpoint. Nothing is built here yet: the crate holds the place DESIGN.md gives it so the
//! workspace layout and dependency direction (`mesh` <- `waypoint`) are fixed from the start.

#![forbid(unsafe_code)]
