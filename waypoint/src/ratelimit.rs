//! Request rate limits (`RateLimitPolicy`, `mesh.ambient.dev/v1alpha1`), enforced per waypoint
//! replica with token buckets.
//!
//! [`RateLimits::decide`] runs once per request (from the engine), after L7 authorization (a denied request spends no token)
//! and before route selection. Every rule of every policy attached to the request's Service or
//! to this waypoint's Gateway whose match holds takes one token from its bucket; the request is
//! limited (429 with `retry-after`, gRPC `RESOURCE_EXHAUSTED`) when one of them has none, and the
//! tokens it took from the others are given back. Every response of a request that some rule
//! counted carries `x-ratelimit-limit`, `-remaining` and `-reset` of the rule closest to its
//! limit.
//!
//! Buckets are kept per (policy, rule): one for a `Global` key, else one per key value in a
//! map bounded to [`MAX_KEYS_PER_RULE`] entries, least recently used evicted first, and buckets
//! that refilled completely dropped (a full bucket is the same as a new one). They survive a
//! state change as long as the rule is unchanged (a reload does not refill them) and start full
//! when it changed.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use mesh::identity::Identity;
use mesh::model::{
    RateLimitKey, RateLimitMatch, RateLimitPolicy, RateLimitRule, RateLimitTarget, State,
    TokenBucketLimit,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::route::grpc;

/// The most keys (principals, header values) one rule keeps buckets for. At the cap the least
/// recently used key's bucket is dropped, so a client rotating header values cannot grow memory
/// without bound; the evicted key starts again with a full bucket.
pub const MAX_KEYS_PER_RULE: usize = 10_000;

/// Keys longer than this are kept as a 128-bit keyed hash, so one rule's map stays under a few
/// megabytes whatever clients send (header values may be up to the 64 KiB header limit).
pub const MAX_KEY_BYTES: usize = 256;

/// Full buckets dropped from the least recently used end per lookup (bounded so one request
/// never pays for a large sweep; the work is amortised over the requests that created them).
const PRUNE_PER_LOOKUP: usize = 16;

/// The body of a limited request's 429, as Envoy's local rate limit filter writes it.
pub const RATE_LIMITED_BODY: &str = "local_rate_limited";

pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

// ---------------------------------------------------------------------------------------------
// Token bucket

/// A token bucket's numbers, derived once from the rule's [`TokenBucketLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketLimit {
    /// Capacity (`burst`).
    pub capacity: u32,
    /// Time one token takes to refill.
    pub interval: Duration,
    /// Time an empty bucket takes to fill: `capacity x interval`.
    pub window: Duration,
}

impl From<&TokenBucketLimit> for BucketLimit {
    fn from(limit: &TokenBucketLimit) -> Self {
        let interval = limit.token_interval();
        Self {
            capacity: limit.burst,
            interval,
            // At most u32::MAX hours: no overflow.
            window: interval.checked_mul(limit.burst).unwrap_or(Duration::MAX),
        }
    }
}

/// A token bucket that refills continuously, kept as the one instant at which it will be full
/// again (the "theoretical arrival time" of GCRA, which is the same algorithm): the tokens in
/// it at `now` are `capacity - (full_at - now) / interval`. Time is passed in, so tests drive a
/// clock of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    full_at: Instant,
}

/// The answer of [`TokenBucket::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// A token was taken; `remaining` whole tokens are left; full again after `reset`.
    Allowed { remaining: u32, reset: Duration },
    /// No token: the next one arrives after `retry_after`; full again after `reset`.
    Limited {
        retry_after: Duration,
        reset: Duration,
    },
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(now: Instant) -> Self {
        Self { full_at: now }
    }

    /// Time until the bucket is full again (zero when it is).
    pub fn until_full(&self, now: Instant) -> Duration {
        self.full_at.saturating_duration_since(now)
    }

    pub fn is_full(&self, now: Instant) -> bool {
        self.full_at <= now
    }

    /// Whole tokens available at `now`.
    pub fn available(&self, limit: &BucketLimit, now: Instant) -> u32 {
        let missing = ceil_div(self.until_full(now), limit.interval);
        limit
            .capacity
            .saturating_sub(u32::try_from(missing).unwrap_or(u32::MAX))
    }

    pub fn take(&mut self, limit: &BucketLimit, now: Instant) -> Take {
        let missing = self.until_full(now);
        let after = missing + limit.interval;
        if after > limit.window {
            return Take::Limited {
                retry_after: after - limit.window,
                reset: missing,
            };
        }
        self.full_at = now + after;
        Take::Allowed {
            remaining: self.available(limit, now),
            reset: after,
        }
    }

    /// Gives back a token taken at or before `now` (never beyond full).
    pub fn give_back(&mut self, limit: &BucketLimit, now: Instant) {
        self.full_at = self
            .full_at
            .checked_sub(limit.interval)
            .map_or(now, |t| t.max(now));
    }
}

fn ceil_div(a: Duration, b: Duration) -> u128 {
    let b = b.as_nanos().max(1);
    a.as_nanos().div_ceil(b)
}

/// Whole seconds, rounded up (`retry-after` and `x-ratelimit-reset` are delta-seconds).
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

// ---------------------------------------------------------------------------------------------
// Keyed buckets

/// Buckets by key, at most `capacity` of them, least recently used evicted first.
#[derive(Debug)]
pub struct KeyedBuckets {
    entries: HashMap<Arc<str>, KeyedEntry>,
    /// Use stamp -> key, oldest first.
    order: BTreeMap<u64, Arc<str>>,
    next_stamp: u64,
    capacity: usize,
}

#[derive(Debug)]
struct KeyedEntry {
    bucket: TokenBucket,
    stamp: u64,
}

impl KeyedBuckets {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The bucket of `key` (a new, full one when unknown), marked most recently used. The
    /// second value counts the buckets evicted to make room for it (0 or 1).
    pub fn bucket(&mut self, key: &str, now: Instant) -> (&mut TokenBucket, u64) {
        self.prune_full(now);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let mut evicted = 0;
        let shared: Arc<str> = match self.entries.get_key_value(key) {
            Some((shared, entry)) => {
                let (shared, used) = (shared.clone(), entry.stamp);
                self.order.remove(&used);
                shared
            }
            None => {
                while self.entries.len() >= self.capacity {
                    let Some((_, oldest)) = self.order.pop_first() else {
                        break;
                    };
                    self.entries.remove(&oldest);
                    evicted += 1;
                }
                Arc::from(key)
            }
        };
        self.order.insert(stamp, shared.clone());
        let entry = self.entries.entry(shared).or_insert(KeyedEntry {
            bucket: TokenBucket::new(now),
            stamp,
        });
        entry.stamp = stamp;
        (&mut entry.bucket, evicted)
    }

    /// The bucket of `key` if it is kept, without marking it used.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut TokenBucket> {
        self.entries.get_mut(key).map(|e| &mut e.bucket)
    }

    /// Drops full buckets from the least recently used end, stopping at the first that is not
    /// full (a bounded amount of work; the cap bounds memory whatever is left).
    fn prune_full(&mut self, now: Instant) {
        for _ in 0..PRUNE_PER_LOOKUP {
            let Some((&stamp, key)) = self.order.first_key_value() else {
                return;
            };
            let full = self.entries.get(key).is_none_or(|e| e.bucket.is_full(now));
            if !full {
                return;
            }
            if let Some(key) = self.order.remove(&stamp) {
                self.entries.remove(&key);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rules

/// One rule's buckets and what it needs to evaluate a request.
#[derive(Debug)]
pub struct RuleLimiter {
    /// `<namespace>/<name>` of the policy.
    pub policy: String,
    pub rule: RateLimitRule,
    pub limit: BucketLimit,
    buckets: Buckets,
    hasher: RandomState,
}

#[derive(Debug)]
enum Buckets {
    Global(Mutex<TokenBucket>),
    Keyed(Mutex<KeyedBuckets>),
}

/// What a request looks like to the rules.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitRequest<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The client's identity (from its ztunnel, over HBONE).
    pub source: Option<&'a Identity>,
}

impl RuleLimiter {
    pub fn new(policy: String, rule: RateLimitRule, now: Instant) -> Self {
        let buckets = match rule.key {
            RateLimitKey::Global => Buckets::Global(Mutex::new(TokenBucket::new(now))),
            _ => Buckets::Keyed(Mutex::new(KeyedBuckets::new(MAX_KEYS_PER_RULE))),
        };
        Self {
            policy,
            limit: BucketLimit::from(&rule.limit),
            rule,
            buckets,
            hasher: RandomState::new(),
        }
    }

    pub fn matches(&self, request: &RateLimitRequest<'_>) -> bool {
        matches(&self.rule.matches, request)
    }

    /// The bucket key of `request`: `None` for a global rule. Clients without an identity share
    /// the `""` principal bucket, requests without the header the `""` header bucket; several
    /// values of the header are joined with `,` as HTTP folds them. Long keys are hashed.
    pub fn key<'r>(&self, request: &RateLimitRequest<'r>) -> Option<Cow<'r, str>> {
        let raw: Cow<'r, str> = match &self.rule.key {
            RateLimitKey::Global => return None,
            RateLimitKey::SourcePrincipal => match request.source {
                Some(identity) => Cow::Owned(
                    identity
                        .to_string()
                        .trim_start_matches("spiffe://")
                        .to_owned(),
                ),
                None => Cow::Borrowed(""),
            },
            RateLimitKey::Header(name) => {
                let mut values = request.headers.get_all(name.as_str()).iter();
                match (values.next(), values.next()) {
                    (None, _) => Cow::Borrowed(""),
                    (Some(only), None) => {
                        Cow::Owned(String::from_utf8_lossy(only.as_bytes()).into_owned())
                    }
                    (Some(_), Some(_)) => Cow::Owned(
                        request
                            .headers
                            .get_all(name.as_str())
                            .iter()
                            .map(|v| String::from_utf8_lossy(v.as_bytes()))
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                }
            }
        };
        if raw.len() <= MAX_KEY_BYTES {
            return Some(raw);
        }
        // NUL never occurs in a header value or a principal, so a hashed key cannot collide
        // with a literal one.
        let high = self.hasher.hash_one((0u8, raw.as_ref()));
        let low = self.hasher.hash_one((1u8, raw.as_ref()));
        Some(Cow::Owned(format!("\0{high:016x}{low:016x}")))
    }

    /// Takes a token for `key`; the second value counts keys evicted to make room.
    pub fn take(&self, key: Option<&str>, now: Instant) -> (Take, u64) {
        match (&self.buckets, key) {
            (Buckets::Global(bucket), _) => (lock(bucket).take(&self.limit, now), 0),
            (Buckets::Keyed(buckets), key) => {
                let mut buckets = lock(buckets);
                let (bucket, evicted) = buckets.bucket(key.unwrap_or(""), now);
                (bucket.take(&self.limit, now), evicted)
            }
        }
    }

    /// Gives back a token taken for `key` (no-op if its bucket was evicted meanwhile).
    pub fn give_back(&self, key: Option<&str>, now: Instant) {
        match (&self.buckets, key) {
            (Buckets::Global(bucket), _) => lock(bucket).give_back(&self.limit, now),
            (Buckets::Keyed(buckets), key) => {
                if let Some(bucket) = lock(buckets).get_mut(key.unwrap_or("")) {
                    bucket.give_back(&self.limit, now);
                }
            }
        }
    }

    /// Keys with a bucket (0 for a global rule).
    pub fn keys(&self) -> usize {
        match &self.buckets {
            Buckets::Global(_) => 0,
            Buckets::Keyed(buckets) => lock(buckets).len(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave a bucket half-updated (every update is one assignment).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every condition given holds: path prefix (query excluded), exact method, each header
/// present with exactly the value (any of its values, when repeated).
pub fn matches(m: &RateLimitMatch, request: &RateLimitRequest<'_>) -> bool {
    m.path_prefix
        .as_deref()
        .is_none_or(|p| request.path.starts_with(p))
        && m.method.as_deref().is_none_or(|x| x == request.method)
        && m.headers.iter().all(|(name, value)| {
            request
                .headers
                .get_all(name.as_str())
                .iter()
                .any(|v| v.as_bytes() == value.as_bytes())
        })
}

// ---------------------------------------------------------------------------------------------
// Policies

/// Where the request is going, as targets name it.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitDestination<'a> {
    pub service_namespace: &'a str,
    pub service_name: &'a str,
    /// This waypoint's Gateway.
    pub gateway_namespace: &'a str,
    pub gateway_name: &'a str,
}

impl RateLimitDestination<'_> {
    fn is(&self, target: &RateLimitTarget) -> bool {
        match target {
            RateLimitTarget::Service { namespace, name } => {
                namespace == self.service_namespace && name == self.service_name
            }
            RateLimitTarget::Gateway { namespace, name } => {
                namespace == self.gateway_namespace && name == self.gateway_name
            }
        }
    }
}

#[derive(Debug)]
struct CompiledPolicy {
    /// Only the targets that exist.
    targets: Vec<RateLimitTarget>,
    rules: Vec<Arc<RuleLimiter>>,
}

/// The compiled policies of one state.
#[derive(Debug, Default)]
pub struct RateLimitTable {
    policies: Vec<CompiledPolicy>,
}

impl RateLimitTable {
    /// Compiles `policies`, keeping the buckets of every rule of `previous` that is unchanged
    /// (same policy, same name, same match, limit and key).
    pub fn build(
        policies: &[Arc<RateLimitPolicy>],
        previous: &RateLimitTable,
        now: Instant,
    ) -> Self {
        let kept: HashMap<(&str, &str), &Arc<RuleLimiter>> = previous
            .policies
            .iter()
            .flat_map(|p| &p.rules)
            .map(|r| ((r.policy.as_str(), r.rule.name.as_str()), r))
            .collect();
        let policies = policies
            .iter()
            .map(|policy| {
                let key = policy.key();
                let rules = policy
                    .rules
                    .iter()
                    .map(|rule| match kept.get(&(key.as_str(), rule.name.as_str())) {
                        Some(limiter) if limiter.rule == *rule => Arc::clone(limiter),
                        _ => Arc::new(RuleLimiter::new(key.clone(), rule.clone(), now)),
                    })
                    .collect();
                let targets = policy
                    .targets
                    .iter()
                    .filter(|t| !policy.unresolved_targets.iter().any(|u| &u.target == *t))
                    .cloned()
                    .collect();
                CompiledPolicy { targets, rules }
            })
            .collect();
        Self { policies }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The rules that count `request` to `destination`, in policy (key) then rule order.
    pub fn matching<'t>(
        &'t self,
        destination: &RateLimitDestination<'_>,
        request: &RateLimitRequest<'_>,
    ) -> impl Iterator<Item = &'t Arc<RuleLimiter>> {
        self.policies
            .iter()
            .filter(|p| p.targets.iter().any(|t| destination.is(t)))
            .flat_map(|p| &p.rules)
            .filter(|r| r.matches(request))
    }

    /// Applies the matching rules to one request at `now` (see the module docs).
    pub fn evaluate(
        &self,
        destination: &RateLimitDestination<'_>,
        request: &RateLimitRequest<'_>,
        now: Instant,
    ) -> Evaluation {
        let mut evaluation = Evaluation::default();
        let mut taken: Vec<(&RuleLimiter, Option<Cow<'_, str>>)> = Vec::new();
        for limiter in self.matching(destination, request) {
            let key = limiter.key(request);
            let (take, evicted) = limiter.take(key.as_deref(), now);
            evaluation
                .evicted
                .extend((evicted > 0).then(|| (Arc::clone(limiter), evicted)));
            match take {
                Take::Allowed { remaining, reset } => {
                    let closer = evaluation
                        .report
                        .as_ref()
                        .is_none_or(|r| remaining < r.remaining);
                    if closer {
                        evaluation.report = Some(Report {
                            limit: limiter.limit.capacity,
                            remaining,
                            reset,
                            retry_after: None,
                        });
                    }
                    taken.push((limiter, key));
                }
                Take::Limited { retry_after, reset } => {
                    for (other, key) in taken {
                        other.give_back(key.as_deref(), now);
                    }
                    evaluation.report = Some(Report {
                        limit: limiter.limit.capacity,
                        remaining: 0,
                        reset,
                        retry_after: Some(retry_after),
                    });
                    evaluation.limited_by = Some(Arc::clone(limiter));
                    return evaluation;
                }
            }
        }
        evaluation
    }
}

/// What the rate limits decided about one request.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// The numbers for the response headers (`None`: no rule counted the request).
    pub report: Option<Report>,
    /// The rule that limited the request.
    pub limited_by: Option<Arc<RuleLimiter>>,
    /// Rules that evicted keys to make room, with how many.
    pub evicted: Vec<(Arc<RuleLimiter>, u64)>,
}

/// The `x-ratelimit-*` numbers of the rule closest to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// The bucket's capacity.
    pub limit: u32,
    /// Whole tokens left after this request.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Set when limited: until the next token.
    pub retry_after: Option<Duration>,
}

impl Report {
    /// `x-ratelimit-limit`, `-remaining`, `-reset` (whole seconds, rounded up) and, when
    /// limited, `retry-after` (at least 1 s).
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(X_RATELIMIT_RESET, HeaderValue::from(ceil_secs(self.reset)));
        if let Some(wait) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(wait).max(1)));
        }
        headers
    }
}

// ---------------------------------------------------------------------------------------------
// The waypoint's view

/// `waypoint_rate_limited_total{policy, rule}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub policy: String,
    pub rule: String,
}

/// `waypoint_rate_limit_unresolved_targets{policy, field, target}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnresolvedLabels {
    pub policy: String,
    pub field: String,
    pub target: String,
}

/// The rate limits of one waypoint: the compiled table (swapped on every state) and metrics.
#[derive(Debug)]
pub struct RateLimits {
    table: ArcSwap<RateLimitTable>,
    /// Serialises updates; holds the unresolved targets already warned about.
    reported: Mutex<HashSet<String>>,
    limited: Family<RuleLabels, Counter>,
    evicted: Family<RuleLabels, Counter>,
    unresolved: Family<UnresolvedLabels, Gauge>,
}

impl RateLimits {
    pub fn new(registry: &mut Registry) -> Self {
        let limits = Self {
            table: ArcSwap::from_pointee(RateLimitTable::default()),
            reported: Mutex::new(HashSet::new()),
            limited: Family::default(),
            evicted: Family::default(),
            unresolved: Family::default(),
        };
        // The client library appends `_total` to counters.
        registry.register(
            "waypoint_rate_limited",
            "Requests refused by a RateLimitPolicy (429 / RESOURCE_EXHAUSTED), by policy and rule",
            limits.limited.clone(),
        );
        registry.register(
            "waypoint_rate_limit_keys_evicted",
            "Keyed rate-limit buckets evicted because a rule reached its key cap, by policy and rule",
            limits.evicted.clone(),
        );
        registry.register(
            "waypoint_rate_limit_unresolved_targets",
            "RateLimitPolicy targets naming a Service or Gateway that does not exist (1 while it lasts); not enforced",
            limits.unresolved.clone(),
        );
        limits
    }

    /// Compiles the state's policies, keeping unchanged rules' buckets, and reports the
    /// targets that do not exist. Only policies that concern this waypoint are reported: those
    /// in its namespace or in a namespace with a Service it serves.
    pub fn update(&self, state: &State, waypoint_namespace: &str, waypoint_name: &str) {
        let mut reported = lock(&self.reported);
        let previous = self.table.load();
        let table = RateLimitTable::build(&state.rate_limit_policies, &previous, Instant::now());
        let served: HashSet<&str> = state
            .services
            .values()
            .filter(|s| {
                s.waypoint
                    .as_ref()
                    .is_some_and(|w| w.namespace == waypoint_namespace && w.name == waypoint_name)
            })
            .map(|s| s.namespace.as_str())
            .chain([waypoint_namespace])
            .collect();
        self.unresolved.clear();
        let mut still = HashSet::new();
        for policy in &state.rate_limit_policies {
            if !served.contains(policy.namespace.as_str()) {
                continue;
            }
            for unresolved in &policy.unresolved_targets {
                let labels = UnresolvedLabels {
                    policy: policy.key(),
                    field: unresolved.field.clone(),
                    target: unresolved.target.to_string(),
                };
                self.unresolved.get_or_create(&labels).set(1);
                let id = format!("{}|{}|{}", labels.policy, labels.field, labels.target);
                if !reported.contains(&id) {
                    tracing::warn!(
                        policy = %labels.policy,
                        field = %labels.field,
                        target = %labels.target,
                        "RateLimitPolicy {}: {}: {} does not exist; the policy is kept but not enforced there until it does",
                        labels.policy, labels.field, labels.target
                    );
                }
                still.insert(id);
            }
        }
        *reported = still;
        self.table.store(Arc::new(table));
    }

    /// The compiled table in force.
    pub fn table(&self) -> Arc<RateLimitTable> {
        self.table.load_full()
    }

    /// Evaluates one request and counts the outcome.
    pub fn decide(
        &self,
        destination: &RateLimitDestination<'_>,
        request: &RateLimitRequest<'_>,
        now: Instant,
    ) -> Decision {
        let table = self.table.load();
        if table.is_empty() {
            return Decision::default();
        }
        let evaluation = table.evaluate(destination, request, now);
        for (limiter, n) in &evaluation.evicted {
            self.evicted.get_or_create(&limiter.labels()).inc_by(*n);
        }
        let headers = evaluation
            .report
            .as_ref()
            .map(Report::headers)
            .unwrap_or_default();
        let limited = evaluation.limited_by.map(|limiter| {
            self.limited.get_or_create(&limiter.labels()).inc();
            Limited {
                reason: format!(
                    "rate limited by RateLimitPolicy {} rule {}",
                    limiter.policy, limiter.rule.name
                ),
            }
        });
        Decision { headers, limited }
    }
}

impl RuleLimiter {
    fn labels(&self) -> RuleLabels {
        RuleLabels {
            policy: self.policy.clone(),
            rule: self.rule.name.clone(),
        }
    }
}

/// The rate limits' verdict on one request.
#[derive(Debug, Default)]
pub struct Decision {
    /// For every response to the request: `x-ratelimit-*` (and `retry-after` when limited);
    /// empty when no rule counted it.
    pub headers: HeaderMap,
    pub limited: Option<Limited>,
}

/// A limited request.
#[derive(Debug)]
pub struct Limited {
    /// For the access log: `rate limited by RateLimitPolicy <ns>/<name> rule <rule>`.
    pub reason: String,
}

impl Limited {
    /// 429 with Envoy's body, or for gRPC a trailers-only `RESOURCE_EXHAUSTED` (8).
    pub fn response(&self, grpc_request: bool) -> http::Response<Bytes> {
        if grpc_request {
            return grpc::trailers_only(grpc::code::RESOURCE_EXHAUSTED, RATE_LIMITED_BODY);
        }
        let mut response = http::Response::new(Bytes::from_static(RATE_LIMITED_BODY.as_bytes()));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    }
}

#[cfg(test)]
mod tests;
