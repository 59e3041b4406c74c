//! AuthorizationPolicies as a waypoint evaluates them ([`L7AuthorizationPolicy`]).
//!
//! Which policies a waypoint gets:
//!
//! - `targetRefs` (or the deprecated `targetRef`) naming a `Gateway` of group
//!   `gateway.networking.k8s.io` (the waypoint itself) or a `Service` of the core group (`""`,
//!   requests to that service through its waypoint). Istio also allows `ServiceEntry` and
//!   `GatewayClass` references; they are skipped (debug log), and a policy left without a
//!   target is not produced. As in Istio's validation, a `namespace` other than the policy's own
//!   is refused (cross-namespace references are not supported), and `targetRefs` cannot be
//!   combined with a `selector`.
//! - Namespace-wide policies (no selector, no targetRefs) -> [`L7Target::Namespace`]. A policy
//!   in the root namespace stays `Namespace(<root>)`: the waypoint treats that namespace as the
//!   whole mesh (it knows the root namespace from [`crate::model::State::root_namespace`]).
//! - Policies with a workload `selector` are ztunnel's (or a sidecar's), not a waypoint's.
//!
//! `ALLOW` and `DENY` are produced; `AUDIT` and `CUSTOM` are not (debug log). Rule values use the
//! same syntax and helpers as the L4 translation (`prefix*`, `*suffix`, `*`; service accounts
//! and trust domains folded into principals). For the IP keys of `when` (`source.ip`,
//! `destination.ip`) the values are validated here as addresses or CIDRs and kept as written
//! for the waypoint to parse; `destination.port` values are validated port numbers.

use tracing::debug;

use super::{
    ObjectKey, TranslateError, invalid, ip_block, port_from_str, string_matches, translate_source,
};
use crate::model::istio_crd as crd;
use crate::model::networking_crd::GATEWAY_API_GROUP;
use crate::model::{
    L7AuthorizationPolicy, L7Condition, L7ConditionKey, L7Operation, L7Rule, L7Source, L7Target,
    PolicyAction,
};

/// `None`: valid, but not a waypoint's policy (workload selector, AUDIT, CUSTOM, or only
/// targets a waypoint does not serve).
pub(super) fn l7_authorization_policy(
    key: &ObjectKey,
    policy: &crd::AuthorizationPolicy,
) -> Result<Option<L7AuthorizationPolicy>, TranslateError> {
    let spec = &policy.spec;
    let refs: Vec<(String, &crd::PolicyTargetReference)> = spec
        .target_ref
        .iter()
        .map(|r| ("spec.targetRef".to_owned(), r))
        .chain(
            spec.target_refs
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
        )
        .collect();
    let selector = spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    if selector && let Some((field, _)) = refs.first() {
        return Err(invalid(
            key,
            field.clone(),
            "targetRefs cannot be combined with selector",
        ));
    }

    let mut targets = Vec::new();
    for (field, r) in &refs {
        if r.name.is_empty() {
            return Err(invalid(key, format!("{field}.name"), "a name is required"));
        }
        if let Some(ns) = r
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty() && *ns != key.namespace)
        {
            return Err(invalid(
                key,
                format!("{field}.namespace"),
                format!(
                    "{ns:?} is another namespace; cross-namespace targetRefs are not supported (Istio refuses them too)"
                ),
            ));
        }
        let (namespace, name) = (key.namespace.clone(), r.name.clone());
        let target = match (r.group.as_str(), r.kind.as_str()) {
            (GATEWAY_API_GROUP, "Gateway") => L7Target::Gateway { namespace, name },
            ("" | "core", "Service") => L7Target::Service { namespace, name },
            (group, kind) => {
                debug!(policy = %key, field, group, kind, "target is neither a waypoint Gateway nor a Service; not applied by waypoints");
                continue;
            }
        };
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    if refs.is_empty() {
        if selector {
            return Ok(None);
        }
        targets.push(L7Target::Namespace(key.namespace.clone()));
    } else if targets.is_empty() {
        return Ok(None);
    }

    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" | "" => PolicyAction::Allow,
        "DENY" => PolicyAction::Deny,
        action @ ("AUDIT" | "CUSTOM") => {
            debug!(policy = %key, action, "waypoints do not enforce {action} policies; skipped");
            return Ok(None);
        }
        other => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: "spec.action".to_owned(),
                value: other.to_owned(),
                expected: "ALLOW, DENY, AUDIT, CUSTOM".to_owned(),
            });
        }
    };
    let rules = spec
        .rules
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, rule)| l7_rule(key, &format!("spec.rules[{i}]"), rule))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(L7AuthorizationPolicy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        targets,
        action,
        rules,
    }))
}

fn l7_rule(key: &ObjectKey, path: &str, rule: &crd::Rule) -> Result<L7Rule, TranslateError> {
    let mut from = Vec::new();
    for (j, f) in rule.from.iter().enumerate() {
        let p = format!("{path}.from[{j}].source");
        let s = &f.source;
        let base = translate_source(key, &p, s)?;
        let ip_blocks = |field: &str, values: &[String]| {
            values
                .iter()
                .enumerate()
                .map(|(k, v)| ip_block(key, format!("{p}.{field}[{k}]"), v))
                .collect::<Result<Vec<_>, _>>()
        };
        from.push(L7Source {
            principals: base.principals,
            not_principals: base.not_principals,
            namespaces: base.namespaces,
            not_namespaces: base.not_namespaces,
            ip_blocks: base.ip_blocks,
            not_ip_blocks: base.not_ip_blocks,
            remote_ip_blocks: ip_blocks("remoteIpBlocks", &s.remote_ip_blocks)?,
            not_remote_ip_blocks: ip_blocks("notRemoteIpBlocks", &s.not_remote_ip_blocks)?,
            request_principals: !s.request_principals.is_empty()
                || !s.not_request_principals.is_empty(),
        });
    }

    let mut to = Vec::new();
    for (j, t) in rule.to.iter().enumerate() {
        let p = format!("{path}.to[{j}].operation");
        let o = &t.operation;
        let ports = |field: &str, values: &[String]| {
            values
                .iter()
                .enumerate()
                .map(|(k, v)| port_from_str(key, format!("{p}.{field}[{k}]"), v))
                .collect::<Result<Vec<_>, _>>()
        };
        to.push(L7Operation {
            hosts: string_matches(&o.hosts),
            not_hosts: string_matches(&o.not_hosts),
            ports: ports("ports", &o.ports)?,
            not_ports: ports("notPorts", &o.not_ports)?,
            methods: string_matches(&o.methods),
            not_methods: string_matches(&o.not_methods),
            paths: string_matches(&o.paths),
            not_paths: string_matches(&o.not_paths),
        });
    }

    let mut when = Vec::new();
    for (j, c) in rule.when.iter().enumerate() {
        let p = format!("{path}.when[{j}]");
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(invalid(key, p, "one of values or notValues is required"));
        }
        let condition_key = match c.key.as_str() {
            "" => return Err(invalid(key, format!("{p}.key"), "a key is required")),
            "source.ip" => L7ConditionKey::SourceIp,
            "source.namespace" => L7ConditionKey::SourceNamespace,
            "source.principal" => L7ConditionKey::SourcePrincipal,
            "destination.ip" => L7ConditionKey::DestinationIp,
            "destination.port" => L7ConditionKey::DestinationPort,
            other => match other
                .strip_prefix("request.headers[")
                .and_then(|rest| rest.strip_suffix(']'))
            {
                Some("") => {
                    return Err(invalid(
                        key,
                        format!("{p}.key"),
                        "a header name is required",
                    ));
                }
                Some(name) => L7ConditionKey::RequestHeader(name.to_ascii_lowercase()),
                None => L7ConditionKey::Unsupported(other.to_owned()),
            },
        };
        for (field, values) in [("values", &c.values), ("notValues", &c.not_values)] {
            for (k, v) in values.iter().enumerate() {
                let field = format!("{p}.{field}[{k}]");
                match condition_key {
                    L7ConditionKey::SourceIp | L7ConditionKey::DestinationIp => {
                        ip_block(key, field, v)?;
                    }
                    L7ConditionKey::DestinationPort => {
                        port_from_str(key, field, v)?;
                    }
                    _ => {}
                }
            }
        }
        when.push(L7Condition {
            key: condition_key,
            values: string_matches(&c.values),
            not_values: string_matches(&c.not_values),
        });
    }
    Ok(L7Rule { from, to, when })
}
