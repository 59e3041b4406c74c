//! Types every stage of a request shares.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use mesh::identity::Identity;
use mesh::model::Workload;

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type inside the waypoint, both directions: the downstream's streamed body, a
/// buffered copy (for retries and mirrors), or a generated one.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Who sent the request, as the waypoint knows it: the identity the client's ztunnel proved on
/// the HBONE connection, the original client address from `forwarded`, and that address's
/// workload in the current state.
#[derive(Debug, Clone, Default)]
pub struct SourceInfo {
    pub identity: Option<Identity>,
    pub ip: Option<IpAddr>,
    pub workload: Option<Arc<Workload>>,
    /// The identity as policies write principals (without `spiffe://`), made once per tunnel
    /// rather than per request.
    pub principal: Option<String>,
}

impl SourceInfo {
    pub fn new(
        identity: Option<Identity>,
        ip: Option<IpAddr>,
        workload: Option<Arc<Workload>>,
    ) -> Self {
        let principal = identity
            .as_ref()
            .map(|i| i.to_string().trim_start_matches("spiffe://").to_owned());
        Self {
            identity,
            ip,
            workload,
            principal,
        }
    }

    /// The client's namespace: from its identity, else from its workload.
    pub fn namespace(&self) -> Option<&str> {
        self.identity
            .as_ref()
            .map(Identity::namespace)
            .or_else(|| self.workload.as_ref().map(|w| w.namespace.as_str()))
    }
}

/// An empty body.
pub fn empty_body() -> Body {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body holding `bytes`.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
