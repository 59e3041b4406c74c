//! L4 authorization as Istio's ztunnel evaluates it: a pure function of the connection and the
//! policies in force, so every decision can be explained and table-tested.
//!
//! Order: any matching DENY rule denies; then, if any ALLOW policy applies to the destination,
//! some ALLOW rule must match; otherwise the connection is allowed. L7-only fields cannot be
//! evaluated here; as in Istio, an ALLOW rule using them matches nothing (fail closed) and a
//! DENY rule using them is enforced on its L4 parts alone ("more restrictive than requested").
//! Plaintext on a port a STRICT PeerAuthentication covers is refused before any of this.

use std::net::{IpAddr, SocketAddr};

use mesh::identity::Identity;
use mesh::model::{
    AuthorizationPolicy, Condition, ConditionKey, IpBlock, MtlsMode, Operation, PeerAuthentication,
    PolicyAction, PolicyScope, Rule, Source, State, StringMatch, Workload,
};

/// What authorization sees of one inbound connection.
#[derive(Debug, Clone)]
pub struct Connection<'a> {
    /// The peer's verified identity; `None` for plaintext.
    pub source_identity: Option<&'a Identity>,
    /// The original client's address (from `forwarded` on HBONE, the socket on plaintext).
    pub source_ip: IpAddr,
    pub destination: &'a Workload,
    pub destination_addr: SocketAddr,
}

/// The outcome, with the reason an operator needs in the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `<namespace>/<name>` of the policy that decided, when one did.
        policy: Option<String>,
        reason: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Does `policy` (or PeerAuthentication) scope cover `workload`?
pub fn scope_covers(scope: &PolicyScope, root_namespace: &str, workload: &Workload) -> bool {
    match scope {
        PolicyScope::Global => true,
        PolicyScope::Namespace(ns) => ns == &workload.namespace || ns == root_namespace,
        PolicyScope::WorkloadSelector { namespace, labels } => {
            (namespace == &workload.namespace || namespace == root_namespace)
                && labels
                    .iter()
                    .all(|(k, v)| workload.labels.get(k).is_some_and(|w| w == v))
        }
    }
}

/// Evaluates every policy in `state` that covers the destination.
pub fn authorize(state: &State, conn: &Connection<'_>) -> Decision {
    let root = state.root_namespace.as_str();
    let applicable = || {
        state
            .authorization_policies
            .iter()
            .filter(|p| scope_covers(&p.scope, root, conn.destination))
    };
    for policy in applicable().filter(|p| p.action == PolicyAction::Deny) {
        for (i, rule) in policy.rules.iter().enumerate() {
            // L7 fields were dropped by the translation: the L4 remainder is what applies.
            if rule_matches(rule, conn) {
                return Decision::Deny {
                    policy: Some(policy.key()),
                    reason: format!("DENY policy {} rule {i} matched", policy.key()),
                };
            }
        }
    }
    let allows: Vec<&AuthorizationPolicy> = applicable()
        .filter(|p| p.action == PolicyAction::Allow)
        .map(|p| p.as_ref())
        .collect();
    if allows.is_empty() {
        return Decision::Allow;
    }
    let matched = allows.iter().any(|p| {
        p.rules
            .iter()
            .any(|rule| rule.l7_fields.is_empty() && rule_matches(rule, conn))
    });
    if matched {
        Decision::Allow
    } else {
        let names: Vec<String> = allows.iter().map(|p| p.key()).collect();
        Decision::Deny {
            policy: (names.len() == 1).then(|| names[0].clone()),
            reason: format!("no rule of the ALLOW policies {} matched", names.join(", ")),
        }
    }
}

fn rule_matches(rule: &Rule, conn: &Connection<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, conn)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, conn)))
        && rule.when.iter().all(|c| condition_matches(c, conn))
}

/// Istio writes principals without the scheme: `cluster.local/ns/default/sa/sleep`.
fn principal(id: &Identity) -> String {
    let s = id.to_string();
    s.strip_prefix("spiffe://").map(str::to_owned).unwrap_or(s)
}

fn principal_matches(m: &StringMatch, principal: &str) -> bool {
    match m {
        StringMatch::Exact(s) => s.strip_prefix("spiffe://").unwrap_or(s) == principal,
        StringMatch::Prefix(p) => principal.starts_with(p.strip_prefix("spiffe://").unwrap_or(p)),
        other => other.matches(principal),
    }
}

/// A positive list matches when empty or when any entry matches; with no value (plaintext has
/// no principal) a non-empty positive list cannot match.
fn positive<T>(list: &[T], value: Option<&str>, m: impl Fn(&T, &str) -> bool) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|e| m(e, v)))
}

/// A negative list matches when no entry matches; a missing value matches no entry.
fn negative<T>(list: &[T], value: Option<&str>, m: impl Fn(&T, &str) -> bool) -> bool {
    value.is_none_or(|v| !list.iter().any(|e| m(e, v)))
}

fn ip_in(blocks: &[IpBlock], ip: IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(ip))
}

fn source_matches(s: &Source, conn: &Connection<'_>) -> bool {
    let principal = conn.source_identity.map(principal);
    let namespace = conn.source_identity.map(|i| i.namespace());
    positive(&s.principals, principal.as_deref(), principal_matches)
        && negative(&s.not_principals, principal.as_deref(), principal_matches)
        && positive(&s.namespaces, namespace, StringMatch::matches)
        && negative(&s.not_namespaces, namespace, StringMatch::matches)
        && (s.ip_blocks.is_empty() || ip_in(&s.ip_blocks, conn.source_ip))
        && !ip_in(&s.not_ip_blocks, conn.source_ip)
}

fn operation_matches(o: &Operation, conn: &Connection<'_>) -> bool {
    let port = conn.destination_addr.port();
    (o.ports.is_empty() || o.ports.contains(&port)) && !o.not_ports.contains(&port)
}

fn condition_matches(c: &Condition, conn: &Connection<'_>) -> bool {
    let value_matches = |v: &str| -> bool {
        match c.key {
            ConditionKey::SourceIp => ip_value_matches(v, conn.source_ip),
            ConditionKey::DestinationIp => ip_value_matches(v, conn.destination_addr.ip()),
            ConditionKey::DestinationPort => {
                v.parse::<u16>().ok() == Some(conn.destination_addr.port())
            }
            ConditionKey::SourceNamespace => conn
                .source_identity
                .is_some_and(|i| StringMatch::parse(v).matches(i.namespace())),
            ConditionKey::SourcePrincipal => conn
                .source_identity
                .is_some_and(|i| principal_matches(&StringMatch::parse(v), &principal(i))),
        }
    };
    (c.values.is_empty() || c.values.iter().any(|v| value_matches(v)))
        && !c.not_values.iter().any(|v| value_matches(v))
}

fn ip_value_matches(value: &str, ip: IpAddr) -> bool {
    match value.split_once('/') {
        Some((addr, prefix)) => match (addr.parse::<IpAddr>(), prefix.parse::<u8>()) {
            (Ok(addr), Ok(prefix)) => IpBlock { addr, prefix }.contains(ip),
            _ => false,
        },
        None => value.parse::<IpAddr>().is_ok_and(|v| v == ip),
    }
}

/// The mTLS mode in force for `workload` on `port`: a selector policy's port-level mode, then
/// its mode, then the namespace's, then the mesh-wide one; `PERMISSIVE` when all are unset.
pub fn effective_mtls_mode(state: &State, workload: &Workload, port: u16) -> MtlsMode {
    let root = state.root_namespace.as_str();
    let covering = |want: fn(&PolicyScope) -> bool| -> Option<&PeerAuthentication> {
        state
            .peer_authentications
            .iter()
            .filter(|p| want(&p.scope) && scope_covers(&p.scope, root, workload))
            // Istio takes the oldest when several apply; translation keeps a stable order.
            .map(|p| p.as_ref())
            .next()
    };
    let selector = covering(|s| matches!(s, PolicyScope::WorkloadSelector { .. }));
    let namespace = state
        .peer_authentications
        .iter()
        .find(|p| matches!(&p.scope, PolicyScope::Namespace(ns) if ns == &workload.namespace && ns != root));
    let mesh = state.peer_authentications.iter().find(|p| {
        matches!(p.scope, PolicyScope::Global)
            || matches!(&p.scope, PolicyScope::Namespace(ns) if ns == root)
    });
    let chain = [
        selector.and_then(|p| p.port_modes.get(&port).copied()),
        selector.map(|p| p.mode),
        namespace.map(|p| p.mode),
        mesh.map(|p| p.mode),
    ];
    chain
        .into_iter()
        .flatten()
        .find(|m| *m != MtlsMode::Unset)
        .unwrap_or(MtlsMode::Permissive)
}

#[cfg(test)]
mod tests;
