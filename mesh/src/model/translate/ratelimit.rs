//! `RateLimitPolicy` (`mesh.ambient.dev/v1alpha1`) -> [`RateLimitPolicy`].
//!
//! Validation on its own (`rate_limit_policy`): at least one target and one rule; targets are a
//! core `Service` or a `gateway.networking.k8s.io` `Gateway` in the policy's namespace; rule
//! names are unique (an unnamed rule is called by its index); `limit.requests` and `limit.burst`
//! are at least 1, `limit.unit` is `second`, `minute` or `hour`; `key.type` is `Global`,
//! `SourcePrincipal` or `Header` (with a valid `key.header`); `match.pathPrefix` starts with
//! `/`, `match.method` is an upper-case token and header names are valid. Any violation rejects
//! the object (its last good version stays).
//!
//! At assembly (`resolve_targets`) a target naming a Service or waypoint Gateway that does not
//! exist keeps the policy accepted but is recorded in
//! [`RateLimitPolicy::unresolved_targets`]: waypoints do not enforce it there, and report it
//! (log and metric), until the object appears. Rejecting the policy instead would make its
//! validity depend on the order objects are created in.

use std::collections::BTreeMap;

use tracing::debug;

use super::{ObjectKey, TranslateError, invalid};
use crate::model::networking_crd::GATEWAY_API_GROUP;
use crate::model::ratelimit_crd as rcrd;
use crate::model::{
    RateLimitKey, RateLimitMatch, RateLimitPolicy, RateLimitRule, RateLimitTarget, RateUnit,
    Service, TokenBucketLimit, UnresolvedTarget, WaypointGateway,
};

pub(super) fn rate_limit_policy(
    key: &ObjectKey,
    policy: &rcrd::RateLimitPolicy,
) -> Result<RateLimitPolicy, TranslateError> {
    let spec = &policy.spec;
    if spec.target_refs.is_empty() {
        return Err(invalid(
            key,
            "spec.targetRefs",
            "at least one target (a Service or the waypoint's Gateway) is required",
        ));
    }
    let mut targets = Vec::new();
    for (i, r) in spec.target_refs.iter().enumerate() {
        // Kept in the order written, duplicates included, so `targets[i]` is
        // `spec.targetRefs[i]` in reports.
        targets.push(target(key, &format!("spec.targetRefs[{i}]"), r)?);
    }

    if spec.rules.is_empty() {
        return Err(invalid(key, "spec.rules", "at least one rule is required"));
    }
    let mut rules: Vec<RateLimitRule> = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let rule = rule(key, &path, i, r)?;
        if let Some(j) = rules.iter().position(|other| other.name == rule.name) {
            return Err(invalid(
                key,
                format!("{path}.name"),
                format!(
                    "{:?} is also the name of spec.rules[{j}]; rule names must be unique (an unnamed rule is called by its index)",
                    rule.name
                ),
            ));
        }
        rules.push(rule);
    }

    Ok(RateLimitPolicy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        targets,
        rules,
        unresolved_targets: Vec::new(),
    })
}

fn target(
    key: &ObjectKey,
    field: &str,
    r: &rcrd::TargetRef,
) -> Result<RateLimitTarget, TranslateError> {
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
                "{ns:?} is another namespace; a RateLimitPolicy targets objects of its own namespace"
            ),
        ));
    }
    let (namespace, name) = (key.namespace.clone(), r.name.clone());
    match (r.kind.as_str(), r.group.as_str()) {
        ("Service", "" | "core") => Ok(RateLimitTarget::Service { namespace, name }),
        ("Gateway", GATEWAY_API_GROUP) => Ok(RateLimitTarget::Gateway { namespace, name }),
        ("Service", group) => Err(TranslateError::NotOneOf {
            object: Box::new(key.clone()),
            field: format!("{field}.group"),
            value: group.to_owned(),
            expected: "\"\" (core) for kind Service".to_owned(),
        }),
        ("Gateway", group) => Err(TranslateError::NotOneOf {
            object: Box::new(key.clone()),
            field: format!("{field}.group"),
            value: group.to_owned(),
            expected: format!("{GATEWAY_API_GROUP} for kind Gateway"),
        }),
        (kind, _) => Err(TranslateError::NotOneOf {
            object: Box::new(key.clone()),
            field: format!("{field}.kind"),
            value: kind.to_owned(),
            expected: "Service, Gateway".to_owned(),
        }),
    }
}

fn rule(
    key: &ObjectKey,
    path: &str,
    index: usize,
    r: &rcrd::Rule,
) -> Result<RateLimitRule, TranslateError> {
    let name = match r.name.as_deref() {
        None => index.to_string(),
        Some("") => {
            return Err(invalid(
                key,
                format!("{path}.name"),
                "an empty name; leave the field out to call the rule by its index",
            ));
        }
        Some(name) => name.to_owned(),
    };
    let matches = rule_match(key, &format!("{path}.match"), &r.matches)?;
    let Some(limit) = &r.limit else {
        return Err(invalid(
            key,
            format!("{path}.limit"),
            "a limit ({requests, unit, burst}) is required",
        ));
    };
    let limit = token_bucket(key, &format!("{path}.limit"), limit)?;
    let rule_key = rate_limit_key(key, &format!("{path}.key"), r.key.as_ref())?;
    Ok(RateLimitRule {
        name,
        matches,
        limit,
        key: rule_key,
    })
}

fn rule_match(
    key: &ObjectKey,
    path: &str,
    m: &rcrd::Match,
) -> Result<RateLimitMatch, TranslateError> {
    if let Some(prefix) = &m.path_prefix
        && !prefix.starts_with('/')
    {
        return Err(invalid(
            key,
            format!("{path}.pathPrefix"),
            format!("{prefix:?} does not start with \"/\""),
        ));
    }
    if let Some(method) = &m.method {
        let token = http::Method::from_bytes(method.as_bytes()).is_ok() && !method.is_empty();
        if !token || method.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(invalid(
                key,
                format!("{path}.method"),
                format!(
                    "{method:?} is not an HTTP method as sent on the wire (methods are case-sensitive: GET, POST, ...)"
                ),
            ));
        }
    }
    let mut headers = Vec::new();
    for (name, value) in &m.headers {
        let field = format!("{path}.headers.{name}");
        let lower = header_name(key, &field, name)?;
        if http::HeaderValue::from_str(value).is_err() {
            return Err(invalid(
                key,
                field,
                format!("{value:?} is not a valid header value"),
            ));
        }
        headers.push((lower, value.clone()));
    }
    Ok(RateLimitMatch {
        path_prefix: m.path_prefix.clone(),
        method: m.method.clone(),
        headers,
    })
}

fn header_name(key: &ObjectKey, field: &str, name: &str) -> Result<String, TranslateError> {
    let lower = name.to_ascii_lowercase();
    if lower.is_empty() || http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
        return Err(invalid(
            key,
            field,
            format!("{name:?} is not a valid header name"),
        ));
    }
    Ok(lower)
}

fn token_bucket(
    key: &ObjectKey,
    path: &str,
    limit: &rcrd::Limit,
) -> Result<TokenBucketLimit, TranslateError> {
    let positive = |field: &str, value: i64, what: &str| {
        u32::try_from(value).ok().filter(|n| *n > 0).ok_or_else(|| {
            invalid(
                key,
                format!("{path}.{field}"),
                format!(
                    "{value} is not {what}: it must be a whole number from 1 to {}",
                    u32::MAX
                ),
            )
        })
    };
    let Some(requests) = limit.requests else {
        return Err(invalid(
            key,
            format!("{path}.requests"),
            "the number of requests per unit is required",
        ));
    };
    let requests = positive("requests", requests, "a rate")?;
    let unit = match limit.unit.as_deref() {
        None => {
            return Err(invalid(
                key,
                format!("{path}.unit"),
                "a unit (second, minute or hour) is required",
            ));
        }
        Some("second") => RateUnit::Second,
        Some("minute") => RateUnit::Minute,
        Some("hour") => RateUnit::Hour,
        Some(other) => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: format!("{path}.unit"),
                value: other.to_owned(),
                expected: "second, minute, hour".to_owned(),
            });
        }
    };
    let burst = match limit.burst {
        None => requests,
        Some(burst) => positive("burst", burst, "a bucket size")?,
    };
    Ok(TokenBucketLimit {
        requests,
        unit,
        burst,
    })
}

fn rate_limit_key(
    key: &ObjectKey,
    path: &str,
    k: Option<&rcrd::Key>,
) -> Result<RateLimitKey, TranslateError> {
    let Some(k) = k else {
        return Ok(RateLimitKey::Global);
    };
    let parsed = match k.key_type.as_deref().unwrap_or("Global") {
        "Global" => RateLimitKey::Global,
        "SourcePrincipal" => RateLimitKey::SourcePrincipal,
        "Header" => {
            let Some(name) = k.header.as_deref() else {
                return Err(invalid(
                    key,
                    format!("{path}.header"),
                    "type Header needs the header's name",
                ));
            };
            return Ok(RateLimitKey::Header(header_name(
                key,
                &format!("{path}.header"),
                name,
            )?));
        }
        other => {
            return Err(TranslateError::NotOneOf {
                object: Box::new(key.clone()),
                field: format!("{path}.type"),
                value: other.to_owned(),
                expected: "Global, SourcePrincipal, Header".to_owned(),
            });
        }
    };
    if k.header.is_some() {
        return Err(invalid(
            key,
            format!("{path}.header"),
            "only used with type Header",
        ));
    }
    Ok(parsed)
}

/// Records the targets that name no existing Service or waypoint Gateway (see the module docs).
pub(super) fn resolve_targets(
    policy: &mut RateLimitPolicy,
    services: &BTreeMap<String, std::sync::Arc<Service>>,
    gateways: &BTreeMap<String, WaypointGateway>,
) {
    policy.unresolved_targets.clear();
    for (i, target) in policy.targets.iter().enumerate() {
        let exists = match target {
            RateLimitTarget::Service { namespace, name } => {
                services.contains_key(&format!("{namespace}/{name}"))
            }
            RateLimitTarget::Gateway { namespace, name } => {
                gateways.contains_key(&format!("{namespace}/{name}"))
            }
        };
        if !exists {
            debug!(policy = %policy.key(), %target, "rate limit target does not exist (yet); not enforced there");
            policy.unresolved_targets.push(UnresolvedTarget {
                field: format!("spec.targetRefs[{i}]"),
                target: target.clone(),
            });
        }
    }
}
