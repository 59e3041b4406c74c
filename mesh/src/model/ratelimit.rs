//! Request rate limits a waypoint enforces: the domain form of this project's own
//! `RateLimitPolicy` (`mesh.ambient.dev/v1alpha1`, serde shape in [`super::ratelimit_crd`]).
//!
//! Istio offers rate limiting only through EnvoyFilter patches; this is the small first-class
//! API instead. A policy targets Services or a waypoint `Gateway` in its own namespace and holds
//! rules: an optional match (path prefix, method, exact headers), a token bucket and what the
//! bucket is keyed by. Like the rest of the model it is validated by the translation, defaults
//! applied, so the data path never guesses.

use std::fmt;
use std::time::Duration;

/// What a policy attaches to (`spec.targetRefs[]`), always in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum RateLimitTarget {
    /// Requests to this Service through its waypoint.
    Service { namespace: String, name: String },
    /// Every request through the waypoint of this `Gateway` (class `istio-waypoint`).
    Gateway { namespace: String, name: String },
}

impl fmt::Display for RateLimitTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimitTarget::Service { namespace, name } => {
                write!(f, "Service {namespace}/{name}")
            }
            RateLimitTarget::Gateway { namespace, name } => {
                write!(f, "Gateway {namespace}/{name}")
            }
        }
    }
}

/// A target that named no existing object when the state was assembled. The policy stays
/// accepted (the Service or Gateway may be created later, and then applies without touching the
/// policy), but the waypoint does not enforce it for this target and reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnresolvedTarget {
    /// The field that names it, e.g. `spec.targetRefs[1]`.
    pub field: String,
    pub target: RateLimitTarget,
}

/// Which requests a rule counts; every condition given must hold. Empty: every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct RateLimitMatch {
    /// The request path (query excluded) starts with this string (plain string prefix, as a
    /// VirtualService `prefix` match).
    pub path_prefix: Option<String>,
    /// Exact, case-sensitive (`GET`).
    pub method: Option<String>,
    /// `(lower-cased name, exact value)`: the header is present with exactly this value.
    pub headers: Vec<(String, String)>,
}

impl RateLimitMatch {
    pub fn is_empty(&self) -> bool {
        self.path_prefix.is_none() && self.method.is_none() && self.headers.is_empty()
    }
}

/// The window `requests` are counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateUnit {
    Second,
    Minute,
    Hour,
}

impl RateUnit {
    pub fn duration(self) -> Duration {
        match self {
            RateUnit::Second => Duration::from_secs(1),
            RateUnit::Minute => Duration::from_secs(60),
            RateUnit::Hour => Duration::from_secs(3600),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RateUnit::Second => "second",
            RateUnit::Minute => "minute",
            RateUnit::Hour => "hour",
        }
    }
}

/// A token bucket: it refills continuously at `requests` per `unit` and holds at most `burst`
/// tokens (`burst` defaults to `requests`: a full window's worth may arrive at once). Every
/// counted request takes one token; a request that finds none is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct TokenBucketLimit {
    /// At least 1.
    pub requests: u32,
    pub unit: RateUnit,
    /// The bucket's capacity; at least 1.
    pub burst: u32,
}

impl TokenBucketLimit {
    /// The time one token takes to refill (`unit / requests`), at least 1 ns.
    pub fn token_interval(&self) -> Duration {
        let unit = self.unit.duration().as_nanos();
        let nanos = (unit / u128::from(self.requests.max(1))).max(1);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// What a rule's buckets are keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum RateLimitKey {
    /// One bucket for the rule (per waypoint replica).
    Global,
    /// One bucket per client identity (the principal its ztunnel proved over HBONE); clients
    /// without one share a bucket.
    SourcePrincipal,
    /// One bucket per value of this request header (lower-cased name); requests without it
    /// share a bucket, so leaving the header out does not escape the limit.
    Header(String),
}

/// One `spec.rules[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct RateLimitRule {
    /// `name`, else the rule's index (`"0"`); unique within the policy. Metrics, the access
    /// log and the waypoint's bucket bookkeeping use it.
    pub name: String,
    #[serde(rename = "match")]
    pub matches: RateLimitMatch,
    pub limit: TokenBucketLimit,
    pub key: RateLimitKey,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RateLimitPolicy {
    pub name: String,
    pub namespace: String,
    /// At least one, in the order written (`targets[i]` is `spec.targetRefs[i]`).
    pub targets: Vec<RateLimitTarget>,
    /// At least one. Every rule that matches a request applies: the request passes only if
    /// each of their buckets has a token.
    pub rules: Vec<RateLimitRule>,
    /// Targets absent from the state at assembly (not enforced until they exist).
    pub unresolved_targets: Vec<UnresolvedTarget>,
}

impl RateLimitPolicy {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `target` is one of the policy's targets and exists.
    pub fn enforced_for(&self, target: &RateLimitTarget) -> bool {
        self.targets.contains(target)
            && !self.unresolved_targets.iter().any(|u| &u.target == target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_interval_is_the_unit_over_requests() {
        let limit = |requests, unit| TokenBucketLimit {
            requests,
            unit,
            burst: 1,
        };
        assert_eq!(
            limit(10, RateUnit::Second).token_interval(),
            Duration::from_millis(100)
        );
        assert_eq!(
            limit(2, RateUnit::Minute).token_interval(),
            Duration::from_secs(30)
        );
        assert_eq!(
            limit(3600, RateUnit::Hour).token_interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            limit(u32::MAX, RateUnit::Second).token_interval(),
            Duration::from_nanos(1)
        );
    }
}
