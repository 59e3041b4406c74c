//! The status of Gateway API routes, as the specification defines `status.parents[]`: for each
//! parent a route names, whether it is attached there (`Accepted`) and whether all of its
//! references resolve (`ResolvedRefs`), each with the specification's reason. Computed by the
//! translation as a pure function of the objects (`translate/gateway_routes.rs`), shown in
//! `/config_dump`, and kept as data a controller can write to the API server.

/// One route's status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteStatus {
    /// `HTTPRoute`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `metadata.generation` the status describes (`observedGeneration`).
    pub generation: Option<i64>,
    pub parents: Vec<RouteParentStatus>,
}

/// `status.parents[]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteParentStatus {
    /// The `parentRefs` entry, defaults filled in.
    pub parent_ref: ParentRef,
    pub conditions: Vec<RouteCondition>,
}

/// A `parentRefs` entry with its defaults (`group` `gateway.networking.k8s.io`, `kind`
/// `Gateway`, the route's namespace).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

/// One condition: `type` `Accepted` or `ResolvedRefs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteCondition {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `True` or `False`.
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl RouteCondition {
    pub fn new(kind: &'static str, ok: bool, reason: &'static str, message: String) -> Self {
        Self {
            kind,
            status: if ok { "True" } else { "False" },
            reason,
            message,
        }
    }
}
