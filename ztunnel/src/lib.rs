//! ztunnel: the per-node proxy of the ambient mesh.
//!
//! Today the binary runs the mesh's certificate authority (`ztunnel ca`); capture, the
//! outbound/inbound proxies and L4 policy arrive with the ztunnel issue and will live beside it
//! (`app`, `capture`, `proxy`, `authz`, `dns`), all built on the shared `mesh` library.

#![forbid(unsafe_code)]

pub mod ca_cmd;
