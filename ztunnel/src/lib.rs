//! ztunnel: the per-node proxy of the ambient mesh.
//!
//! `ztunnel run` serves the enrolled pods of one node: [`app`] composes the state source,
//! certificates, [`pods`] (each enrolled pod's network and listeners, with [`capture`] for
//! in-pod redirection), the [`proxy`] handlers, the [`dns`] proxy, L4 [`authz`] and the
//! [`admin`] ports.
//! `ztunnel ca` runs the mesh's certificate authority ([`ca_cmd`]); `ztunnel config` prints a
//! running ztunnel's view for operators ([`operator`]).

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod ca_cmd;
pub mod capture;
pub mod config;
pub mod dns;
pub mod netns_pods;
pub mod operator;
pub mod pods;
pub mod proxy;
