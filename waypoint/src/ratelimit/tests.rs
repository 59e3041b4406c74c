//! Token-bucket arithmetic on a clock the tests drive, the key cap, key extraction, rule
//! matching and the table's evaluation across rules, policies and reloads.

#![allow(clippy::unwrap_used)]

use super::*;
use mesh::model::{RateLimitTarget, RateUnit, UnresolvedTarget};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn limit(requests: u32, unit: RateUnit, burst: u32) -> TokenBucketLimit {
    TokenBucketLimit {
        requests,
        unit,
        burst,
    }
}

fn allowed(take: Take) -> Option<u32> {
    match take {
        Take::Allowed { remaining, .. } => Some(remaining),
        Take::Limited { .. } => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Token bucket

#[test]
fn ten_per_second_with_burst_five() {
    let l = BucketLimit::from(&limit(10, RateUnit::Second, 5));
    assert_eq!(l.interval, ms(100));
    assert_eq!(l.window, ms(500));
    let t0 = Instant::now();
    let mut b = TokenBucket::new(t0);
    assert_eq!(b.available(&l, t0), 5);
    let remaining: Vec<Option<u32>> = (0..6).map(|_| allowed(b.take(&l, t0))).collect();
    assert_eq!(
        remaining,
        [Some(4), Some(3), Some(2), Some(1), Some(0), None]
    );
    assert_eq!(
        b.take(&l, t0),
        Take::Limited {
            retry_after: ms(100),
            reset: ms(500)
        }
    );
    // Continuous refill: 60 ms in, still nothing; 100 ms in, one token.
    assert_eq!(
        b.take(&l, t0 + ms(60)),
        Take::Limited {
            retry_after: ms(40),
            reset: ms(440)
        }
    );
    assert_eq!(
        b.take(&l, t0 + ms(100)),
        Take::Allowed {
            remaining: 0,
            reset: ms(500)
        }
    );
    // Idle long enough, the bucket is full again and no fuller.
    assert!(b.is_full(t0 + ms(600)));
    assert_eq!(b.available(&l, t0 + ms(10_000)), 5);
    assert_eq!(b.until_full(t0 + ms(10_000)), Duration::ZERO);
}

#[test]
fn a_steady_sender_gets_the_burst_plus_the_rate() {
    // One request per millisecond for 3 s against 10/s burst 5: 5 + 10 x 3 = 35 (the 30th
    // refill lands exactly on the last request).
    let l = BucketLimit::from(&limit(10, RateUnit::Second, 5));
    let t0 = Instant::now();
    let mut b = TokenBucket::new(t0);
    let passed = (0..=3000)
        .filter(|i| allowed(b.take(&l, t0 + ms(*i))).is_some())
        .count();
    assert_eq!(passed, 35);
}

#[test]
fn burst_defaults_to_requests_and_units_scale() {
    let l = BucketLimit::from(&limit(2, RateUnit::Minute, 2));
    assert_eq!(
        (l.interval, l.window),
        (Duration::from_secs(30), ms(60_000))
    );
    let t0 = Instant::now();
    let mut b = TokenBucket::new(t0);
    assert!(allowed(b.take(&l, t0)).is_some());
    assert!(allowed(b.take(&l, t0)).is_some());
    assert_eq!(
        b.take(&l, t0 + Duration::from_secs(10)),
        Take::Limited {
            retry_after: Duration::from_secs(20),
            reset: Duration::from_secs(50)
        }
    );
    let hourly = BucketLimit::from(&limit(1, RateUnit::Hour, 1));
    assert_eq!(hourly.interval, Duration::from_secs(3600));
    // The largest burst and the slowest rate do not overflow.
    let huge = BucketLimit::from(&limit(1, RateUnit::Hour, u32::MAX));
    let mut b = TokenBucket::new(t0);
    assert_eq!(allowed(b.take(&huge, t0)), Some(u32::MAX - 1));
}

#[test]
fn a_token_given_back_is_available_again_but_never_beyond_full() {
    let l = BucketLimit::from(&limit(1, RateUnit::Minute, 2));
    let t0 = Instant::now();
    let mut b = TokenBucket::new(t0);
    b.take(&l, t0);
    b.take(&l, t0);
    assert_eq!(b.available(&l, t0), 0);
    b.give_back(&l, t0);
    assert_eq!(b.available(&l, t0), 1);
    b.give_back(&l, t0);
    b.give_back(&l, t0);
    assert!(b.is_full(t0));
    assert_eq!(b.available(&l, t0), 2);
}

#[test]
fn report_headers_are_whole_seconds_rounded_up() {
    let report = Report {
        limit: 5,
        remaining: 0,
        reset: ms(450),
        retry_after: Some(ms(50)),
    };
    let h = report.headers();
    assert_eq!(h["x-ratelimit-limit"], "5");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(h["x-ratelimit-reset"], "1");
    assert_eq!(h["retry-after"], "1");
    let h = Report {
        limit: 100,
        remaining: 99,
        reset: Duration::from_secs(36),
        retry_after: None,
    }
    .headers();
    assert_eq!(h["x-ratelimit-reset"], "36");
    assert!(!h.contains_key("retry-after"));
    let h = Report {
        limit: 1,
        remaining: 0,
        reset: Duration::from_millis(3_600_001),
        retry_after: Some(Duration::from_millis(3_599_999)),
    }
    .headers();
    assert_eq!(h["x-ratelimit-reset"], "3601");
    assert_eq!(h["retry-after"], "3600");
}

// ---------------------------------------------------------------------------------------------
// Keyed buckets

#[test]
fn keyed_buckets_evict_the_least_recently_used_at_the_cap() {
    let l = BucketLimit::from(&limit(1, RateUnit::Minute, 1));
    let t0 = Instant::now();
    let mut keyed = KeyedBuckets::new(3);
    for key in ["a", "b", "c"] {
        let (bucket, evicted) = keyed.bucket(key, t0);
        assert_eq!(evicted, 0);
        bucket.take(&l, t0);
    }
    // `a` used again: `b` is now the least recently used.
    assert!(allowed(keyed.bucket("a", t0).0.take(&l, t0)).is_none());
    let (_, evicted) = keyed.bucket("d", t0);
    assert_eq!(evicted, 1);
    assert_eq!(keyed.len(), 3);
    assert!(keyed.contains("a") && !keyed.contains("b"));
    // `b` comes back with a full bucket: that is the price of the bound.
    assert!(allowed(keyed.bucket("b", t0).0.take(&l, t0)).is_some());
    assert!(!keyed.contains("c"));
}

#[test]
fn refilled_buckets_are_dropped_as_keys_are_looked_up() {
    let l = BucketLimit::from(&limit(10, RateUnit::Second, 1));
    let t0 = Instant::now();
    let mut keyed = KeyedBuckets::new(100);
    for i in 0..10 {
        keyed.bucket(&format!("k{i}"), t0).0.take(&l, t0);
    }
    assert_eq!(keyed.len(), 10);
    // 100 ms later every bucket is full again, so any lookup drops them: same as new.
    keyed.bucket("other", t0 + ms(100));
    assert_eq!(keyed.len(), 1);
    assert!(keyed.contains("other"));
}

#[test]
fn rotating_header_values_cannot_grow_memory_without_bound() {
    let rule = RateLimitRule {
        name: "per-user".into(),
        matches: RateLimitMatch::default(),
        limit: limit(1, RateUnit::Hour, 1),
        key: RateLimitKey::Header("x-user".into()),
    };
    let limiter = RuleLimiter::new("demo/x".into(), rule, Instant::now());
    let now = Instant::now();
    let mut evicted = 0;
    for i in 0..(MAX_KEYS_PER_RULE + 5_000) {
        let key = format!("user-{i}");
        let (take, n) = limiter.take(Some(&key), now);
        assert!(allowed(take).is_some(), "a new key starts full");
        evicted += n;
    }
    assert_eq!(limiter.keys(), MAX_KEYS_PER_RULE);
    assert_eq!(evicted, 5_000);
    // The recent keys are still limited.
    let last = format!("user-{}", MAX_KEYS_PER_RULE + 4_999);
    assert!(allowed(limiter.take(Some(&last), now).0).is_none());
}

// ---------------------------------------------------------------------------------------------
// Keys and matches

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn request<'a>(
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
    source: Option<&'a Identity>,
) -> RateLimitRequest<'a> {
    RateLimitRequest {
        method,
        path,
        headers,
        source,
    }
}

fn rule(
    name: &str,
    matches: RateLimitMatch,
    key: RateLimitKey,
    l: TokenBucketLimit,
) -> RateLimitRule {
    RateLimitRule {
        name: name.into(),
        matches,
        limit: l,
        key,
    }
}

#[test]
fn keys_by_principal_header_or_nothing() {
    let now = Instant::now();
    let l = limit(1, RateUnit::Second, 1);
    let sleep = Identity::new("cluster.local", "demo", "sleep").unwrap();
    let h = headers(&[("x-user", "alice"), ("x-team", "a"), ("x-team", "b")]);
    let empty = HeaderMap::new();
    let limiter = |key| {
        RuleLimiter::new(
            "demo/x".into(),
            rule("r", RateLimitMatch::default(), key, l),
            now,
        )
    };

    let global = limiter(RateLimitKey::Global);
    assert_eq!(global.key(&request("GET", "/", &h, Some(&sleep))), None);

    let principal = limiter(RateLimitKey::SourcePrincipal);
    assert_eq!(
        principal
            .key(&request("GET", "/", &h, Some(&sleep)))
            .as_deref(),
        Some("cluster.local/ns/demo/sa/sleep")
    );
    assert_eq!(
        principal.key(&request("GET", "/", &h, None)).as_deref(),
        Some("")
    );

    let user = limiter(RateLimitKey::Header("x-user".into()));
    assert_eq!(
        user.key(&request("GET", "/", &h, None)).as_deref(),
        Some("alice")
    );
    // Leaving the header out does not escape the limit: those requests share one bucket.
    assert_eq!(
        user.key(&request("GET", "/", &empty, None)).as_deref(),
        Some("")
    );
    let team = limiter(RateLimitKey::Header("x-team".into()));
    assert_eq!(
        team.key(&request("GET", "/", &h, None)).as_deref(),
        Some("a,b")
    );

    // Long values are hashed: bounded, stable, distinct, never equal to a literal value.
    let long_a = headers(&[("x-user", &"a".repeat(10_000))]);
    let long_b = headers(&[("x-user", &format!("{}b", "a".repeat(9_999)))]);
    let ka = user.key(&request("GET", "/", &long_a, None)).unwrap();
    let kb = user.key(&request("GET", "/", &long_b, None)).unwrap();
    assert!(ka.len() <= MAX_KEY_BYTES && ka.starts_with('\0'), "{ka:?}");
    assert_ne!(ka, kb);
    assert_eq!(ka, user.key(&request("GET", "/", &long_a, None)).unwrap());
}

#[test]
fn matches_path_prefix_method_and_exact_headers() {
    let h = headers(&[("x-tier", "free"), ("x-tier", "beta")]);
    let m = RateLimitMatch {
        path_prefix: Some("/api".into()),
        method: Some("POST".into()),
        headers: vec![("x-tier".into(), "beta".into())],
    };
    let cases = [
        ("POST", "/api/orders", &h, true),
        ("POST", "/api", &h, true),
        ("POST", "/apix", &h, true),
        ("GET", "/api/orders", &h, false),
        ("post", "/api/orders", &h, false),
        ("POST", "/", &h, false),
        ("POST", "/API", &h, false),
    ];
    for (method, path, headers, expected) in cases {
        assert_eq!(
            matches(&m, &request(method, path, headers, None)),
            expected,
            "{method} {path}"
        );
    }
    let other = headers_of("x-tier", "Free");
    assert!(!matches(&m, &request("POST", "/api", &other, None)));
    assert!(matches(
        &RateLimitMatch::default(),
        &request("DELETE", "/anything", &other, None)
    ));
}

fn headers_of(name: &str, value: &str) -> HeaderMap {
    headers(&[(name, value)])
}

// ---------------------------------------------------------------------------------------------
// The table

fn service_target(name: &str) -> RateLimitTarget {
    RateLimitTarget::Service {
        namespace: "demo".into(),
        name: name.into(),
    }
}

fn policy(
    name: &str,
    targets: Vec<RateLimitTarget>,
    rules: Vec<RateLimitRule>,
) -> Arc<RateLimitPolicy> {
    Arc::new(RateLimitPolicy {
        name: name.into(),
        namespace: "demo".into(),
        targets,
        rules,
        unresolved_targets: Vec::new(),
    })
}

const TO_REVIEWS: RateLimitDestination<'static> = RateLimitDestination {
    service_namespace: "demo",
    service_name: "reviews",
    gateway_namespace: "demo",
    gateway_name: "waypoint",
};

fn prefix(p: &str) -> RateLimitMatch {
    RateLimitMatch {
        path_prefix: Some(p.into()),
        ..RateLimitMatch::default()
    }
}

#[test]
fn every_matching_rule_applies_and_a_limited_request_spends_nothing_elsewhere() {
    let t0 = Instant::now();
    let policies = vec![policy(
        "limits",
        vec![service_target("reviews")],
        vec![
            rule(
                "global",
                RateLimitMatch::default(),
                RateLimitKey::Global,
                limit(100, RateUnit::Second, 10),
            ),
            rule(
                "per-user",
                prefix("/api"),
                RateLimitKey::Header("x-user".into()),
                limit(1, RateUnit::Minute, 2),
            ),
        ],
    )];
    let table = RateLimitTable::build(&policies, &RateLimitTable::default(), t0);
    let alice = headers_of("x-user", "alice");
    let api = request("GET", "/api/x", &alice, None);

    // The report names the rule closest to its limit: per-user (1 left of 2), not global.
    let first = table.evaluate(&TO_REVIEWS, &api, t0);
    assert!(first.limited_by.is_none());
    assert_eq!(
        first.report,
        Some(Report {
            limit: 2,
            remaining: 1,
            reset: Duration::from_secs(60),
            retry_after: None
        })
    );
    table.evaluate(&TO_REVIEWS, &api, t0);
    let third = table.evaluate(&TO_REVIEWS, &api, t0);
    let limited_by = third.limited_by.unwrap();
    assert_eq!(limited_by.rule.name, "per-user");
    let report = third.report.unwrap();
    assert_eq!((report.limit, report.remaining), (2, 0));
    assert_eq!(report.retry_after, Some(Duration::from_secs(60)));

    // The global bucket gave back the limited request's token: 10 - 2 spent.
    let home = request("GET", "/", &alice, None);
    let report = table.evaluate(&TO_REVIEWS, &home, t0).report.unwrap();
    assert_eq!((report.limit, report.remaining), (10, 7));
}

#[test]
fn only_the_targets_that_exist_and_match_are_enforced() {
    let t0 = Instant::now();
    let one = || {
        vec![rule(
            "r",
            RateLimitMatch::default(),
            RateLimitKey::Global,
            limit(1, RateUnit::Hour, 1),
        )]
    };
    let gateway = RateLimitTarget::Gateway {
        namespace: "demo".into(),
        name: "waypoint".into(),
    };
    let mut missing = (*policy("missing", vec![service_target("reviews")], one())).clone();
    missing.unresolved_targets.push(UnresolvedTarget {
        field: "spec.targetRefs[0]".into(),
        target: service_target("reviews"),
    });
    let h = HeaderMap::new();
    let any = request("GET", "/", &h, None);
    let cases: Vec<(&str, Arc<RateLimitPolicy>, bool)> = vec![
        (
            "the service",
            policy("p", vec![service_target("reviews")], one()),
            true,
        ),
        (
            "another service",
            policy("p", vec![service_target("ratings")], one()),
            false,
        ),
        (
            "this waypoint",
            policy("p", vec![gateway.clone()], one()),
            true,
        ),
        (
            "another waypoint",
            policy(
                "p",
                vec![RateLimitTarget::Gateway {
                    namespace: "demo".into(),
                    name: "other".into(),
                }],
                one(),
            ),
            false,
        ),
        ("an unresolved target", Arc::new(missing), false),
    ];
    for (what, policy, counted) in cases {
        let table = RateLimitTable::build(&[policy], &RateLimitTable::default(), t0);
        assert_eq!(
            table.evaluate(&TO_REVIEWS, &any, t0).report.is_some(),
            counted,
            "{what}"
        );
    }
}

#[test]
fn buckets_survive_a_reload_unless_the_rule_changed() {
    let t0 = Instant::now();
    let with = |requests| {
        vec![policy(
            "limits",
            vec![service_target("reviews")],
            vec![
                rule(
                    "a",
                    RateLimitMatch::default(),
                    RateLimitKey::Global,
                    limit(requests, RateUnit::Hour, 1),
                ),
                rule(
                    "b",
                    RateLimitMatch::default(),
                    RateLimitKey::SourcePrincipal,
                    limit(1, RateUnit::Hour, 1),
                ),
            ],
        )]
    };
    let h = HeaderMap::new();
    let any = request("GET", "/", &h, None);
    let first = RateLimitTable::build(&with(1), &RateLimitTable::default(), t0);
    assert!(first.evaluate(&TO_REVIEWS, &any, t0).limited_by.is_none());
    assert!(first.evaluate(&TO_REVIEWS, &any, t0).limited_by.is_some());

    // The same policy again (any reload): still empty.
    let same = RateLimitTable::build(&with(1), &first, t0);
    assert!(same.evaluate(&TO_REVIEWS, &any, t0).limited_by.is_some());

    // Rule `a` changed: its bucket starts full; `b` (unchanged) keeps its empty one.
    let changed = RateLimitTable::build(&with(2), &same, t0);
    let limited = changed.evaluate(&TO_REVIEWS, &any, t0).limited_by.unwrap();
    assert_eq!(limited.rule.name, "b");
    assert!(Arc::ptr_eq(
        &changed.policies[0].rules[1],
        &first.policies[0].rules[1]
    ));
    assert!(!Arc::ptr_eq(
        &changed.policies[0].rules[0],
        &first.policies[0].rules[0]
    ));
}

#[test]
fn decide_counts_limited_requests_per_policy_and_rule() {
    let mut registry = Registry::default();
    let limits = RateLimits::new(&mut registry);
    let state = State {
        rate_limit_policies: vec![policy(
            "limits",
            vec![service_target("reviews")],
            vec![rule(
                "per-user",
                prefix("/"),
                RateLimitKey::Header("x-user".into()),
                limit(1, RateUnit::Hour, 1),
            )],
        )],
        ..State::default()
    };
    limits.update(&state, "demo", "waypoint");
    let alice = headers_of("x-user", "alice");
    let now = Instant::now();
    let req = request("GET", "/", &alice, None);
    let first = limits.decide(&TO_REVIEWS, &req, now);
    assert!(first.limited.is_none());
    assert_eq!(first.headers["x-ratelimit-remaining"], "0");
    let second = limits.decide(&TO_REVIEWS, &req, now);
    let limited = second.limited.unwrap();
    assert_eq!(
        limited.reason,
        "rate limited by RateLimitPolicy demo/limits rule per-user"
    );
    assert_eq!(second.headers["retry-after"], "3600");
    let response = limited.response(false);
    assert_eq!(response.status(), 429);
    assert_eq!(response.body().as_ref(), b"local_rate_limited");
    let grpc_response = limited.response(true);
    assert_eq!(grpc_response.status(), 200);
    assert_eq!(grpc_response.headers()["grpc-status"], "8");

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"waypoint_rate_limited_total{policy="demo/limits",rule="per-user"} 1"#),
        "{text}"
    );

    // Nothing attached: no headers, nothing counted.
    let other = RateLimitDestination {
        service_name: "ratings",
        ..TO_REVIEWS
    };
    let free = limits.decide(&other, &req, now);
    assert!(free.headers.is_empty() && free.limited.is_none());
}

#[test]
fn unresolved_targets_of_served_namespaces_are_exported() {
    let mut registry = Registry::default();
    let limits = RateLimits::new(&mut registry);
    let mut missing = (*policy(
        "limits",
        vec![service_target("nope")],
        vec![rule(
            "r",
            RateLimitMatch::default(),
            RateLimitKey::Global,
            limit(1, RateUnit::Hour, 1),
        )],
    ))
    .clone();
    missing.unresolved_targets.push(UnresolvedTarget {
        field: "spec.targetRefs[0]".into(),
        target: service_target("nope"),
    });
    let mut elsewhere = missing.clone();
    elsewhere.namespace = "prod".into();
    let mut state = State {
        rate_limit_policies: vec![Arc::new(missing), Arc::new(elsewhere)],
        ..State::default()
    };
    limits.update(&state, "demo", "waypoint");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"waypoint_rate_limit_unresolved_targets{policy="demo/limits",field="spec.targetRefs[0]",target="Service demo/nope"} 1"#),
        "{text}"
    );
    assert!(!text.contains("prod/limits"), "{text}");

    // Resolved later: the gauge goes away.
    state.rate_limit_policies = Vec::new();
    limits.update(&state, "demo", "waypoint");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(!text.contains("demo/limits"), "{text}");
}
