//! VirtualService routing, pure: which route a request takes and what the route does to it.
//!
//! [`RouteTable::build`] compiles a [`mesh::model::State`] into per-service routes;
//! [`RouteTable::select_http`] / [`RouteTable::select_tcp`] pick a route and a weighted
//! destination; [`filters`], [`cors`], [`retry`] and [`grpc`] turn the route's settings into
//! header edits, local answers and retry decisions. No I/O and no clocks here: the request
//! handler executes these decisions, randomness comes in as a `fastrand::Rng`.

pub mod cors;
pub mod filters;
pub mod grpc;
pub mod matcher;
pub mod retry;
pub mod table;

#[cfg(test)]
mod tests;

pub use filters::{FaultDecision, FilterError};
pub use matcher::RequestView;
pub use retry::AttemptOutcome;
pub use table::{
    Conflict, RouteTable, ScopedServer, Selected, SelectedAction, ServerScope, ServiceRoutes,
    host_matches, host_specificity,
};
