//! Tables for the L7 half of the translation: VirtualService, DestinationRule, waypoint
//! bindings and AuthorizationPolicies as waypoints see them.

use std::time::Duration;

use super::tests::{AMBIENT, messages, namespace, parse, pod, policy, translate};
use super::*;

fn vs(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

fn vs_created(ns: &str, name: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}\nspec:\n{spec}\n---\n"
    )
}

fn dr(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

fn service(ns: &str, name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{ports: [{{port: 9080, name: http}}]}}\n---\n"
    )
}

fn gateway(ns: &str, name: &str, class: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  gatewayClassName: {class}\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n---\n"
    )
}

fn only_vs(t: &Translation) -> &VirtualService {
    assert!(t.rejections.is_empty(), "{:?}", messages(t));
    assert_eq!(t.state.virtual_services.len(), 1);
    &t.state.virtual_services[0]
}

fn only_dr(t: &Translation) -> &DestinationRule {
    assert!(t.rejections.is_empty(), "{:?}", messages(t));
    assert_eq!(t.state.destination_rules.len(), 1);
    &t.state.destination_rules[0]
}

/// A single-route VirtualService's only route.
fn only_route(t: &Translation) -> &HttpRoute {
    let vs = only_vs(t);
    assert_eq!(vs.http.len(), 1);
    &vs.http[0]
}

fn weighted(route: &HttpRoute) -> Vec<(&str, Option<&str>, u32)> {
    let HttpAction::Route(destinations) = &route.action else {
        panic!("not a route: {:?}", route.action);
    };
    destinations
        .iter()
        .map(|d| {
            (
                d.destination.host.as_str(),
                d.destination.subset.as_deref(),
                d.weight,
            )
        })
        .collect()
}

const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

// ---------------------------------------------------------------------------------------------
// VirtualService: the examples of Istio's traffic-management tasks

#[test]
fn canary_split_90_10_with_subsets() {
    let yaml = vs(
        "bookinfo",
        "reviews",
        "
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10",
    ) + &dr(
        "bookinfo",
        "reviews",
        "
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}",
    );
    let t = translate(&yaml);
    let vs = only_vs(&t);
    assert_eq!(vs.key(), "bookinfo/reviews");
    assert_eq!(vs.hosts, vec![REVIEWS]);
    assert_eq!(vs.created, None);
    assert_eq!(
        weighted(&vs.http[0]),
        vec![(REVIEWS, Some("v1"), 90), (REVIEWS, Some("v2"), 10)]
    );
    // Nothing else written: Istio's defaults.
    let route = &vs.http[0];
    assert!(route.matches.is_empty());
    assert_eq!(route.retries, istio_default_retries());
    assert_eq!(route.timeout, None);
    assert_eq!(route.fault, None);
    assert!(route.mirrors.is_empty());

    let dr = only_dr(&t);
    assert_eq!(dr.host, REVIEWS);
    assert_eq!(dr.traffic_policy, TrafficPolicy::default());
    let subsets: Vec<_> = dr
        .subsets
        .iter()
        .map(|s| (s.name.as_str(), s.labels.clone()))
        .collect();
    assert_eq!(
        subsets,
        vec![
            ("v1", [("version".into(), "v1".into())].into()),
            ("v2", [("version".into(), "v2".into())].into()),
        ]
    );
    assert_eq!(
        dr.subset("v2").unwrap().traffic_policy,
        TrafficPolicy::default()
    );
}

#[test]
fn header_match_sends_jason_to_v2() {
    let t = translate(&vs(
        "bookinfo",
        "reviews",
        "
  hosts: [reviews]
  http:
  - match:
    - headers:
        End-User: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}",
    ));
    let vs = only_vs(&t);
    assert_eq!(
        vs.http[0].matches,
        vec![HttpMatch {
            headers: vec![NamedMatch {
                name: "end-user".into(),
                value: Some(ValueMatch::Exact("jason".into())),
            }],
            ..HttpMatch::default()
        }]
    );
    assert_eq!(weighted(&vs.http[0]), vec![(REVIEWS, Some("v2"), 0)]);
    assert_eq!(weighted(&vs.http[1]), vec![(REVIEWS, Some("v1"), 0)]);
}

#[test]
fn every_match_field() {
    let t = translate(&vs(
        "demo",
        "web",
        r#"
  hosts: [web]
  http:
  - name: api
    match:
    - name: first
      uri: {prefix: /api/}
      ignoreUriCase: true
      scheme: {exact: https}
      method: {regex: "GET|HEAD"}
      authority: {prefix: web}
      headers:
        x-present: {}
        uri: {exact: ignored}
      withoutHeaders:
        x-debug: {regex: "*"}
        x-mode: {prefix: test}
      queryParams:
        Page: {regex: '\d+'}
      port: 9080
      sourceLabels: {app: client}
      sourceNamespace: frontend
      gateways: [mesh]
    - uri: {exact: /}
    - uri: {prefix: ""}
      gateways: [istio-system/ingress]
    route:
    - destination: {host: web}"#,
    ));
    let route = only_route(&t);
    assert_eq!(route.name.as_deref(), Some("api"));
    let full = HttpMatch {
        name: Some("first".into()),
        uri: Some(ValueMatch::Prefix("/api/".into())),
        scheme: Some(ValueMatch::Exact("https".into())),
        method: Some(ValueMatch::Regex(Regex::full_match("GET|HEAD").unwrap())),
        authority: Some(ValueMatch::Prefix("web".into())),
        // `uri` as a header key is ignored, as Istio documents.
        headers: vec![NamedMatch {
            name: "x-present".into(),
            value: None,
        }],
        without_headers: vec![
            NamedMatch {
                name: "x-debug".into(),
                value: None,
            },
            NamedMatch {
                name: "x-mode".into(),
                value: Some(ValueMatch::Prefix("test".into())),
            },
        ],
        query_params: vec![NamedMatch {
            name: "Page".into(),
            value: Some(ValueMatch::Regex(Regex::full_match(r"\d+").unwrap())),
        }],
        port: Some(9080),
        source_labels: [("app".into(), "client".into())].into(),
        source_namespace: Some("frontend".into()),
        ignore_uri_case: true,
    };
    let exact_root = HttpMatch {
        uri: Some(ValueMatch::Exact("/".into())),
        ..HttpMatch::default()
    };
    // The third match is for an ingress gateway only: not a waypoint's.
    assert_eq!(route.matches, vec![full, exact_root]);
    // Regexes match whole values.
    let ValueMatch::Regex(method) = route.matches[0].method.as_ref().unwrap() else {
        panic!()
    };
    assert!(method.is_match("HEAD"));
    assert!(!method.is_match("HEADER"));
}

#[test]
fn fault_delay_abort_timeout_and_retries() {
    let t = translate(&vs(
        "bookinfo",
        "ratings",
        "
  hosts: [ratings]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
    fault:
      abort:
        percentage: {value: 100.0}
        httpStatus: 500
    route:
    - destination: {host: ratings, subset: v1}
  - fault:
      delay:
        percentage: {value: 50}
        fixedDelay: 3s
    timeout: 0.5s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: 5xx
    route:
    - destination: {host: ratings, subset: v1}",
    ));
    let vs = only_vs(&t);
    assert_eq!(
        vs.http[0].fault,
        Some(Fault {
            delay: None,
            abort: Some(FaultAbort {
                status: AbortStatus::Http(500),
                percentage: 100.0,
            }),
        })
    );
    let route = &vs.http[1];
    assert_eq!(
        route.fault,
        Some(Fault {
            delay: Some(FaultDelay {
                delay: Duration::from_secs(3),
                percentage: 50.0,
            }),
            abort: None,
        })
    );
    assert_eq!(route.timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        route.retries,
        RetryPolicy {
            attempts: 3,
            per_try_timeout: Some(Duration::from_secs(2)),
            backoff: None,
            retry_on: RetryOn {
                conditions: vec![RetryCondition::FiveXx],
                status_codes: vec![],
            },
        }
    );
}

#[test]
fn fault_percentages_and_grpc_aborts() {
    let cases = [
        // Deprecated integer percent.
        (
            "{delay: {percent: 30, fixedDelay: 100ms}}",
            Fault {
                delay: Some(FaultDelay {
                    delay: Duration::from_millis(100),
                    percentage: 30.0,
                }),
                abort: None,
            },
        ),
        // Unset percentage: Istio applies the fault to no request.
        (
            "{delay: {fixedDelay: 1m}, abort: {grpcStatus: UNAVAILABLE}}",
            Fault {
                delay: Some(FaultDelay {
                    delay: Duration::from_secs(60),
                    percentage: 0.0,
                }),
                abort: Some(FaultAbort {
                    status: AbortStatus::Grpc(14),
                    percentage: 0.0,
                }),
            },
        ),
        (
            "{abort: {grpcStatus: NOT_FOUND, percentage: {value: 0.1}}}",
            Fault {
                delay: None,
                abort: Some(FaultAbort {
                    status: AbortStatus::Grpc(5),
                    percentage: 0.1,
                }),
            },
        ),
    ];
    for (fault, expected) in cases {
        let t = translate(&vs(
            "demo",
            "f",
            &format!(
                "  hosts: [web]\n  http:\n  - fault: {fault}\n    route: [{{destination: {{host: web}}}}]"
            ),
        ));
        assert_eq!(only_route(&t).fault, Some(expected), "{fault}");
    }
}

#[test]
fn retry_policies() {
    let condition = |c: &[RetryCondition], codes: &[u16]| RetryOn {
        conditions: c.to_vec(),
        status_codes: codes.to_vec(),
    };
    use RetryCondition::*;
    let cases = [
        // Absent: Istio's default policy.
        ("", istio_default_retries()),
        // attempts without retryOn: Istio's default conditions.
        (
            "retries: {attempts: 5}",
            RetryPolicy {
                attempts: 5,
                ..istio_default_retries()
            },
        ),
        // attempts 0 (or nothing) disables.
        (
            "retries: {attempts: 0}",
            RetryPolicy {
                attempts: 0,
                per_try_timeout: None,
                backoff: None,
                retry_on: RetryOn::default(),
            },
        ),
        (
            "retries: {}",
            RetryPolicy {
                attempts: 0,
                per_try_timeout: None,
                backoff: None,
                retry_on: RetryOn::default(),
            },
        ),
        // Numbers are status codes and imply retriable-status-codes.
        (
            "retries: {attempts: 1, retryOn: 'gateway-error, 503,connect-failure,409,503'}",
            RetryPolicy {
                attempts: 1,
                per_try_timeout: None,
                backoff: None,
                retry_on: condition(
                    &[GatewayError, ConnectFailure, RetriableStatusCodes],
                    &[503, 409],
                ),
            },
        ),
        (
            "retries: {attempts: 2, retryOn: 'reset,refused-stream,retriable-4xx,cancelled,deadline-exceeded,internal,resource-exhausted,unavailable,retriable-status-codes'}",
            RetryPolicy {
                attempts: 2,
                per_try_timeout: None,
                backoff: None,
                retry_on: condition(
                    &[
                        Reset,
                        RefusedStream,
                        Retriable4xx,
                        GrpcCancelled,
                        GrpcDeadlineExceeded,
                        GrpcInternal,
                        GrpcResourceExhausted,
                        GrpcUnavailable,
                        RetriableStatusCodes,
                    ],
                    &[],
                ),
            },
        ),
        // Conditions Istio accepts but the waypoint does not implement are dropped.
        (
            "retries: {attempts: 2, retryOn: 'envoy-ratelimited,5xx', backoff: 25ms, retryRemoteLocalities: true}",
            RetryPolicy {
                attempts: 2,
                per_try_timeout: None,
                backoff: None,
                retry_on: condition(&[FiveXx], &[]),
            },
        ),
    ];
    for (retries, expected) in cases {
        let t = translate(&vs(
            "demo",
            "r",
            &format!(
                "  hosts: [web]\n  http:\n  - route: [{{destination: {{host: web}}}}]\n    {retries}"
            ),
        ));
        assert_eq!(only_route(&t).retries, expected, "{retries}");
    }
    // The default Istio applies, spelled out.
    assert_eq!(
        istio_default_retries(),
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            backoff: None,
            retry_on: condition(
                &[
                    ConnectFailure,
                    RefusedStream,
                    GrpcUnavailable,
                    GrpcCancelled,
                    RetriableStatusCodes
                ],
                &[503],
            ),
        }
    );
}

#[test]
fn redirect_direct_response_rewrite_mirrors_cors_and_headers() {
    let t = translate(&vs(
        "demo",
        "web",
        r#"
  hosts: [web.demo.svc]
  http:
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: other.demo, derivePort: FROM_REQUEST_PORT, scheme: https, redirectCode: 308}
  - match: [{uri: {exact: /gone}}]
    directResponse: {status: 410, body: {bytes: "Z29uZQ=="}}
  - match: [{uri: {prefix: /v1}}]
    rewrite: {uriRegexRewrite: {match: "^/v1/(.*)$", rewrite: '/v2/\1'}, authority: api}
    route:
    - destination: {host: web, port: {number: 8080}}
      headers: {request: {set: {X-Canary: "yes"}}}
    mirror: {host: shadow}
    mirrorPercentage: {value: 25}
    corsPolicy:
      allowOrigins: [{exact: "https://example.com"}, {regex: "https://.*\\.example\\.org"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: false
    headers:
      request: {add: {X-Via: waypoint}, remove: [X-Internal]}
      response: {set: {Cache-Control: no-store}}
  - route: [{destination: {host: web}}]
    mirrors:
    - destination: {host: shadow-a}
    - destination: {host: shadow-b.other}
      percentage: {value: 5.5}"#,
    ));
    let vs = only_vs(&t);
    assert_eq!(vs.hosts, vec!["web.demo.svc.cluster.local"]);
    assert_eq!(
        vs.http[0].action,
        HttpAction::Redirect(Redirect {
            uri: Some("/new".into()),
            authority: Some("other.demo".into()),
            port: Some(RedirectPort::FromRequestPort),
            scheme: Some("https".into()),
            code: 308,
        })
    );
    let HttpAction::DirectResponse(response) = &vs.http[1].action else {
        panic!("{:?}", vs.http[1].action)
    };
    assert_eq!(response.status, 410);
    assert_eq!(response.body.as_deref(), Some(&b"gone"[..]));

    let route = &vs.http[2];
    let rewrite = route.rewrite.as_ref().unwrap();
    assert_eq!(rewrite.authority.as_deref(), Some("api"));
    let (regex, replacement) = rewrite.uri_regex.as_ref().unwrap();
    assert_eq!(
        regex
            .compiled
            .replace("/v1/books", replacement.replace(r"\1", "$1")),
        "/v2/books"
    );
    let HttpAction::Route(destinations) = &route.action else {
        panic!()
    };
    assert_eq!(
        destinations[0].destination,
        Destination {
            host: "web.demo.svc.cluster.local".into(),
            subset: None,
            port: Some(8080),
        }
    );
    assert_eq!(
        destinations[0].headers.request.set,
        vec![("x-canary".to_string(), "yes".to_string())]
    );
    assert_eq!(
        route.mirrors,
        vec![Mirror {
            destination: Destination {
                host: "shadow.demo.svc.cluster.local".into(),
                subset: None,
                port: None,
            },
            percentage: 25.0,
        }]
    );
    assert_eq!(
        route.cors,
        Some(CorsPolicy {
            allow_origins: vec![
                ValueMatch::Exact("https://example.com".into()),
                ValueMatch::Regex(Regex::full_match(r"https://.*\.example\.org").unwrap()),
            ],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-custom".into()],
            expose_headers: vec!["x-trace".into()],
            max_age: Some(Duration::from_secs(24 * 3600)),
            allow_credentials: Some(false),
        })
    );
    assert_eq!(
        route.headers,
        HeaderOperations {
            request: HeaderEdits {
                add: vec![("x-via".into(), "waypoint".into())],
                remove: vec!["x-internal".into()],
                ..HeaderEdits::default()
            },
            response: HeaderEdits {
                set: vec![("cache-control".into(), "no-store".into())],
                ..HeaderEdits::default()
            },
        }
    );
    // Mirror percentages default to 100; `shadow-b.other` has no Service: kept as written.
    let mirrors: Vec<_> = vs.http[3]
        .mirrors
        .iter()
        .map(|m| (m.destination.host.as_str(), m.percentage))
        .collect();
    assert_eq!(
        mirrors,
        vec![
            ("shadow-a.demo.svc.cluster.local", 100.0),
            ("shadow-b.other", 5.5)
        ]
    );
}

#[test]
fn weights_are_relative_and_zero_is_kept() {
    let t = translate(&vs(
        "demo",
        "w",
        "
  hosts: [web]
  http:
  - route:
    - {destination: {host: web, subset: a}, weight: 3}
    - {destination: {host: web, subset: b}, weight: 1}
    - {destination: {host: web, subset: c}, weight: 0}
  tcp:
  - match: [{port: 5432, destinationSubnets: [10.0.0.0/8]}]
    route:
    - {destination: {host: db}, weight: 1}
    - {destination: {host: db-replica}}",
    ));
    let vs = only_vs(&t);
    let web = "web.demo.svc.cluster.local";
    assert_eq!(
        weighted(&vs.http[0]),
        vec![
            (web, Some("a"), 3),
            (web, Some("b"), 1),
            (web, Some("c"), 0)
        ]
    );
    assert_eq!(
        vs.tcp,
        vec![TcpRoute {
            matches: vec![L4Match {
                port: Some(5432),
                destination_subnets: vec![parse_ip_block("10.0.0.0/8").unwrap()],
                ..L4Match::default()
            }],
            route: vec![
                RouteDestination {
                    destination: Destination {
                        host: "db.demo.svc.cluster.local".into(),
                        subset: None,
                        port: None,
                    },
                    weight: 1,
                    headers: HeaderOperations::default(),
                },
                RouteDestination {
                    destination: Destination {
                        host: "db-replica.demo.svc.cluster.local".into(),
                        subset: None,
                        port: None,
                    },
                    weight: 0,
                    headers: HeaderOperations::default(),
                },
            ],
        }]
    );
}

#[test]
fn hosts_expand_relative_to_the_object_namespace() {
    let services = service("bookinfo", "reviews", "") + &service("other", "ratings", "");
    let cases = [
        ("reviews", REVIEWS),
        ("Reviews", REVIEWS),
        ("reviews.bookinfo.svc", REVIEWS),
        (REVIEWS, REVIEWS),
        // `<name>.<namespace>`: expanded when such a Service exists...
        ("ratings.other", "ratings.other.svc.cluster.local"),
        // ...and kept as written otherwise (it may be an external name).
        ("example.com", "example.com"),
        ("*.example.com", "*.example.com"),
        ("*", "*"),
        ("10.0.0.1", "10.0.0.1"),
    ];
    for (host, expected) in cases {
        let yaml = services.clone()
            + &vs(
                "bookinfo",
                "h",
                &format!(
                    "  hosts: ['{host}']\n  http: [{{route: [{{destination: {{host: reviews}}}}]}}]"
                ),
            );
        assert_eq!(only_vs(&translate(&yaml)).hosts, vec![expected], "{host}");
        let yaml = services.clone() + &dr("bookinfo", "h", &format!("  host: '{host}'"));
        assert_eq!(only_dr(&translate(&yaml)).host, expected, "{host}");
    }
    // Destinations expand the same way.
    let yaml = services
        + &vs(
            "bookinfo",
            "d",
            "  hosts: [reviews]\n  http: [{route: [{destination: {host: ratings.other}}]}]",
        );
    assert_eq!(
        weighted(only_route(&translate(&yaml))),
        vec![("ratings.other.svc.cluster.local", None, 0)]
    );
}

#[test]
fn oldest_virtual_service_for_a_host_comes_first_and_all_are_kept() {
    let route = "  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews}}]}]";
    let yaml = [
        vs_created("bookinfo", "a-newest", "2024-03-01T00:00:00Z", route),
        vs_created("bookinfo", "z-oldest", "2024-01-01T00:00:00Z", route),
        // Same time: Istio orders by name, then namespace.
        vs_created("other", "m-tie", "2024-02-01T00:00:00Z", "  hosts: [reviews.bookinfo.svc.cluster.local]\n  http: [{route: [{destination: {host: reviews}}]}]"),
        vs_created("bookinfo", "m-tie", "2024-02-01T00:00:00Z", route),
        // No hosts of any Service: kept (the Service may come later).
        vs("bookinfo", "lonely", "  hosts: [nobody]\n  http: [{route: [{destination: {host: nobody}}]}]"),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let order: Vec<_> = t
        .state
        .virtual_services
        .iter()
        .map(|v| (v.key(), v.created.clone()))
        .collect();
    assert_eq!(
        order,
        vec![
            // Files carry no creationTimestamp: first, as Go's zero time.
            ("bookinfo/lonely".into(), None),
            (
                "bookinfo/z-oldest".into(),
                Some("2024-01-01T00:00:00Z".into())
            ),
            ("bookinfo/m-tie".into(), Some("2024-02-01T00:00:00Z".into())),
            ("other/m-tie".into(), Some("2024-02-01T00:00:00Z".into())),
            (
                "bookinfo/a-newest".into(),
                Some("2024-03-01T00:00:00Z".into())
            ),
        ]
    );
}

#[test]
fn gateway_bound_and_delegate_virtual_services_are_not_waypoint_routes() {
    let yaml = [
        vs(
            "demo",
            "ingress-only",
            "  hosts: [web.example.com]\n  gateways: [istio-system/ingress]\n  http: [{route: [{destination: {host: web}}]}]",
        ),
        vs(
            "demo",
            "both",
            "  hosts: [web]\n  gateways: [istio-system/ingress, mesh]\n  http: [{route: [{destination: {host: web}}]}]",
        ),
        vs(
            "demo",
            "delegate",
            "  http: [{route: [{destination: {host: web}}]}]",
        ),
        vs(
            "demo",
            "tls-only",
            "  hosts: [secure]\n  tls: [{match: [{sniHosts: [secure]}], route: [{destination: {host: secure}}]}]",
        ),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let keys: Vec<_> = t.state.virtual_services.iter().map(|v| v.key()).collect();
    // TLS routes are not applied: the VirtualService stays, without routes.
    assert_eq!(keys, vec!["demo/both", "demo/tls-only"]);
    assert!(t.state.virtual_services[1].http.is_empty());
    assert_eq!(t.in_force[&Kind::VirtualService], 4);
}

// ---------------------------------------------------------------------------------------------
// DestinationRule

#[test]
fn circuit_breaker_and_outlier_detection_like_istios_task() {
    let t = translate(&dr(
        "demo",
        "httpbin",
        "
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100",
    ));
    let dr = only_dr(&t);
    assert_eq!(dr.host, "httpbin.demo.svc.cluster.local");
    assert_eq!(
        dr.traffic_policy,
        TrafficPolicy {
            load_balancer: LoadBalancer::LeastRequest,
            connection_pool: ConnectionPool {
                max_connections: 1,
                http1_max_pending_requests: 1,
                max_requests_per_connection: 1,
                ..ConnectionPool::default()
            },
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: 1,
                consecutive_gateway_errors: 0,
                interval: Duration::from_secs(1),
                base_ejection_time: Duration::from_secs(180),
                max_ejection_percent: 100,
            }),
        }
    );
}

#[test]
fn istio_defaults_for_pools_and_outlier_detection() {
    let t = translate(&dr(
        "demo",
        "d",
        "
  host: web
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 0}, http: {http2MaxRequests: 0}}
    outlierDetection: {}",
    ));
    let policy = &only_dr(&t).traffic_policy;
    // 0 is proto3's "not set".
    assert_eq!(policy.connection_pool, ConnectionPool::default());
    assert_eq!(
        ConnectionPool::default(),
        ConnectionPool {
            max_connections: u32::MAX,
            connect_timeout: Duration::from_secs(10),
            http1_max_pending_requests: u32::MAX,
            http2_max_requests: u32::MAX,
            max_requests_per_connection: 0,
            max_retries: u32::MAX,
            idle_timeout: Duration::from_secs(3600),
        }
    );
    assert_eq!(
        policy.outlier_detection,
        Some(OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        })
    );
    // The deprecated consecutiveErrors counts gateway errors instead of 5xx.
    for (od, expected) in [
        ("{consecutiveErrors: 7}", (0, 7)),
        ("{consecutiveErrors: 7, consecutive5xxErrors: 3}", (3, 7)),
        (
            "{consecutiveErrors: 7, consecutiveGatewayErrors: 2}",
            (0, 2),
        ),
    ] {
        let t = translate(&dr(
            "demo",
            "d",
            &format!("  host: web\n  trafficPolicy: {{outlierDetection: {od}}}"),
        ));
        let od = only_dr(&t)
            .traffic_policy
            .outlier_detection
            .clone()
            .unwrap();
        assert_eq!(
            (od.consecutive_5xx_errors, od.consecutive_gateway_errors),
            expected
        );
    }
}

#[test]
fn subset_policies_replace_top_level_fields_one_by_one() {
    let t = translate(&dr(
        "demo",
        "web",
        "
  host: web
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 100, connectTimeout: 30ms}}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie: {name: user, path: /, ttl: 0s}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      connectionPool: {http: {maxRetries: 3}}
      outlierDetection: {consecutiveGatewayErrors: 2}",
    ));
    let dr = only_dr(&t);
    let top_pool = ConnectionPool {
        max_connections: 100,
        connect_timeout: Duration::from_millis(30),
        ..ConnectionPool::default()
    };
    assert_eq!(
        dr.traffic_policy,
        TrafficPolicy {
            load_balancer: LoadBalancer::RoundRobin,
            connection_pool: top_pool.clone(),
            outlier_detection: None,
        }
    );
    assert_eq!(dr.subset("v1").unwrap().traffic_policy, dr.traffic_policy);
    assert_eq!(
        dr.subset("v2").unwrap().traffic_policy,
        TrafficPolicy {
            load_balancer: LoadBalancer::ConsistentHash(HashKey::Cookie {
                name: "user".into(),
                path: Some("/".into()),
                ttl: Some(Duration::ZERO),
            }),
            connection_pool: top_pool,
            outlier_detection: None,
        }
    );
    // The subset's connectionPool replaces the rule's wholesale (maxConnections back to the
    // default), as Istio merges.
    assert_eq!(
        dr.subset("v3").unwrap().traffic_policy,
        TrafficPolicy {
            load_balancer: LoadBalancer::RoundRobin,
            connection_pool: ConnectionPool {
                max_retries: 3,
                ..ConnectionPool::default()
            },
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: 5,
                consecutive_gateway_errors: 2,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 10,
            }),
        }
    );
}

#[test]
fn load_balancer_settings() {
    let cases = [
        ("{simple: UNSPECIFIED}", LoadBalancer::LeastRequest),
        ("{simple: LEAST_REQUEST}", LoadBalancer::LeastRequest),
        // Deprecated alias.
        ("{simple: LEAST_CONN}", LoadBalancer::LeastRequest),
        ("{simple: ROUND_ROBIN}", LoadBalancer::RoundRobin),
        ("{simple: RANDOM}", LoadBalancer::Random),
        (
            "{localityLbSetting: {enabled: true}}",
            LoadBalancer::LeastRequest,
        ),
        (
            "{consistentHash: {httpHeaderName: X-User}}",
            LoadBalancer::ConsistentHash(HashKey::Header("x-user".into())),
        ),
        (
            "{consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 1024}}}",
            LoadBalancer::ConsistentHash(HashKey::SourceIp),
        ),
        (
            "{consistentHash: {httpQueryParameterName: session}}",
            LoadBalancer::ConsistentHash(HashKey::QueryParameter("session".into())),
        ),
        (
            "{consistentHash: {httpCookie: {name: s}}}",
            LoadBalancer::ConsistentHash(HashKey::Cookie {
                name: "s".into(),
                path: None,
                ttl: None,
            }),
        ),
    ];
    for (lb, expected) in cases {
        let t = translate(&dr(
            "demo",
            "lb",
            &format!("  host: web\n  trafficPolicy: {{loadBalancer: {lb}}}"),
        ));
        assert_eq!(only_dr(&t).traffic_policy.load_balancer, expected, "{lb}");
    }
}

// ---------------------------------------------------------------------------------------------
// Rejections

#[test]
fn virtual_service_errors_name_the_field() {
    let route = "route: [{destination: {host: web}}]";
    let http = |extra: &str| {
        vs(
            "demo",
            "bad",
            &format!("  hosts: [web]\n  http:\n  - {route}\n    {extra}"),
        )
    };
    let cases = [
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - match: [{uri: {exact: /}}, {uri: {regex: '('}}]\n    route: [{destination: {host: web}}]"),
            r#"VirtualService demo/bad: spec.http[0].match[1].uri.regex: "(" is not a valid regular expression: unclosed group"#,
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - match: [{headers: {x-id: {regex: 'a{2'}}}]\n    route: [{destination: {host: web}}]"),
            r#"VirtualService demo/bad: spec.http[0].match[0].headers.x-id.regex: "a{2" is not a valid regular expression: unclosed counted repetition"#,
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - match: [{uri: {exact: /, prefix: /}}]\n    route: [{destination: {host: web}}]"),
            "VirtualService demo/bad: spec.http[0].match[0].uri: only one of exact, prefix or regex may be set",
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - match: [{method: {prefix: ''}}]\n    route: [{destination: {host: web}}]"),
            "VirtualService demo/bad: spec.http[0].match[0].method.prefix: a prefix must not be empty",
        ),
        (
            http("timeout: 5 s"),
            r#"VirtualService demo/bad: spec.http[0].timeout: "5 s" is not a duration (the unit is not one of ns, us, ms, s, m, h); write it like 100ms, 0.5s, 3s, 1m or 1h"#,
        ),
        (
            http("timeout: '10'"),
            r#"VirtualService demo/bad: spec.http[0].timeout: "10" is not a duration (a unit is missing); write it like 100ms, 0.5s, 3s, 1m or 1h"#,
        ),
        (
            http("timeout: 0s"),
            r#"VirtualService demo/bad: spec.http[0].timeout: "0s" is shorter than 1ms"#,
        ),
        (
            http("retries: {attempts: 2, perTryTimeout: 1.5ms}"),
            r#"VirtualService demo/bad: spec.http[0].retries.perTryTimeout: "1.5ms" is finer than a millisecond; only ms precision is supported"#,
        ),
        (
            http("retries: {attempts: 3, retryOn: '5xx,retry-everything'}"),
            r#"VirtualService demo/bad: spec.http[0].retries.retryOn: "retry-everything" is not one of 5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or an HTTP status code"#,
        ),
        (
            http("retries: {attempts: 3, retryOn: '599'}"),
            r#"VirtualService demo/bad: spec.http[0].retries.retryOn: "599" is not one of 5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or an HTTP status code"#,
        ),
        (
            http("retries: {attempts: 0, retryOn: 5xx}"),
            "VirtualService demo/bad: spec.http[0].retries: perTryTimeout, retryOn and retryRemoteLocalities cannot be set when attempts is 0 (retries disabled)",
        ),
        (
            http("retries: {attempts: -1}"),
            "VirtualService demo/bad: spec.http[0].retries.attempts: -1 is negative",
        ),
        (
            http("retries: {attempts: 2, retryon: 5xx}"),
            "VirtualService demo/bad: spec.http[0].retries.retryon: unknown field `retryon`, expected one of `attempts`, `perTryTimeout`, `retryOn`, `retryRemoteLocalities`, `retryIgnorePreviousHosts`, `backoff`",
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - route:\n    - destination: {host: web, subset: v1}\n    - destination: {host: web, subset: v2}"),
            "VirtualService demo/bad: spec.http[0].route: total destination weight = 0: with several destinations at least one needs a weight (weights are relative)",
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web}, weight: 110}\n    - {destination: {host: web}, weight: -10}"),
            "VirtualService demo/bad: spec.http[0].route[1].weight: -10 is negative; weights are relative and must be >= 0",
        ),
        (
            http("redirect: {uri: /elsewhere}"),
            "VirtualService demo/bad: spec.http[0].redirect: redirect cannot be combined with route",
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - directResponse: {status: 200}\n    fault: {abort: {httpStatus: 500}}"),
            "VirtualService demo/bad: spec.http[0].directResponse: directResponse cannot be combined with fault",
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - timeout: 1s"),
            "VirtualService demo/bad: spec.http[0]: one of route, redirect or directResponse is required",
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - redirect: {redirectCode: 301}"),
            "VirtualService demo/bad: spec.http[0].redirect: a redirect must set uri, authority, scheme, port or derivePort",
        ),
        (
            http("fault: {abort: {grpcStatus: TEAPOT}}"),
            r#"VirtualService demo/bad: spec.http[0].fault.abort.grpcStatus: "TEAPOT" is not one of OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED"#,
        ),
        (
            http("fault: {abort: {httpStatus: 700, percentage: {value: 10}}}"),
            "VirtualService demo/bad: spec.http[0].fault.abort.httpStatus: 700 is not an HTTP status in 200..599",
        ),
        (
            http("fault: {delay: {fixedDelay: 1s, percentage: {value: 150}}}"),
            "VirtualService demo/bad: spec.http[0].fault.delay.percentage.value: 150 is not a percentage between 0 and 100",
        ),
        (
            http("fault: {delay: {percentage: {value: 10}}}"),
            "VirtualService demo/bad: spec.http[0].fault.delay.fixedDelay: a fixedDelay is required",
        ),
        (
            http("fault: {}"),
            "VirtualService demo/bad: spec.http[0].fault: a fault needs a delay, an abort or both",
        ),
        (
            http("mirror: {host: a}\n    mirrors: [{destination: {host: b}}]"),
            "VirtualService demo/bad: spec.http[0].mirrors: mirrors cannot be combined with mirror",
        ),
        (
            http("delegate: {name: other}"),
            "VirtualService demo/bad: spec.http[0].delegate: delegation to another VirtualService is not supported by the waypoint",
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  http:\n  - route: [{destination: {host: '*'}}]"),
            r#"VirtualService demo/bad: spec.http[0].route[0].destination.host: "*" is not a destination host"#,
        ),
        (
            vs("demo", "bad", "  hosts: [web, 'web.demo.svc.cluster.local']\n  http: [{route: [{destination: {host: web}}]}]"),
            r#"VirtualService demo/bad: spec.hosts[1]: "web.demo.svc.cluster.local" duplicates spec.hosts[0]"#,
        ),
        (
            vs("demo", "bad", "  hosts: ['web_app']\n  http: [{route: [{destination: {host: web}}]}]"),
            r#"VirtualService demo/bad: spec.hosts[0]: "web_app" is not a hostname (DNS labels separated by dots, optionally after `*.`)"#,
        ),
        (
            vs("demo", "bad", "  hosts: [web]"),
            "VirtualService demo/bad: spec: one of http, tcp or tls is required",
        ),
        (
            vs("demo", "bad", "  hosts: [web]\n  tcp: [{route: [{destination: {host: db, port: {number: 0}}}]}]"),
            r#"VirtualService demo/bad: spec.tcp[0].route[0].destination.port.number: "0" is not a port number"#,
        ),
        (
            "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: bad, namespace: demo}\n".to_string(),
            r#"VirtualService demo/bad: apiVersion: "networking.istio.io/v2" is not one of networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3"#,
        ),
    ];
    for (yaml, message) in cases {
        let t = translate(&yaml);
        assert_eq!(messages(&t), vec![message.to_string()], "{yaml}");
        assert!(t.state.virtual_services.is_empty());
        assert_eq!(t.rejections[0].error.object().kind, Kind::VirtualService);
    }
}

#[test]
fn destination_rule_errors_name_the_field() {
    let cases = [
        (
            "  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n  - {name: v1, labels: {version: v3}}",
            r#"DestinationRule demo/bad: spec.subsets[2].name: duplicate subset name "v1" (also spec.subsets[0])"#,
        ),
        (
            "  host: web\n  subsets: [{name: V1}]",
            r#"DestinationRule demo/bad: spec.subsets[0].name: "V1" is not a subset name (a DNS label: lower-case letters, digits and '-')"#,
        ),
        (
            "  host: web\n  subsets: [{labels: {version: v1}}]",
            "DestinationRule demo/bad: spec.subsets[0].name: a name is required",
        ),
        (
            "  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
            "DestinationRule demo/bad: spec.host: a host is required",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}",
            "DestinationRule demo/bad: spec.trafficPolicy.loadBalancer.simple: PASSTHROUGH is not supported by the waypoint: it forwards to the original destination address, which a waypoint does not have; use LEAST_REQUEST",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {simple: FASTEST}}",
            r#"DestinationRule demo/bad: spec.trafficPolicy.loadBalancer.simple: "FASTEST" is not one of UNSPECIFIED, LEAST_REQUEST, LEAST_CONN, ROUND_ROBIN, RANDOM"#,
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x, useSourceIp: true}}}",
            "DestinationRule demo/bad: spec.trafficPolicy.loadBalancer.consistentHash: only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set",
        ),
        (
            "  host: web\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}",
            "DestinationRule demo/bad: spec.trafficPolicy.connectionPool.tcp.maxConnections: -1 is negative",
        ),
        (
            "  host: web\n  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 10 seconds}}}",
            r#"DestinationRule demo/bad: spec.trafficPolicy.connectionPool.tcp.connectTimeout: "10 seconds" is not a duration (the unit is not one of ns, us, ms, s, m, h); write it like 100ms, 0.5s, 3s, 1m or 1h"#,
        ),
        (
            "  host: web\n  subsets:\n  - name: v1\n    trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}",
            "DestinationRule demo/bad: spec.subsets[0].trafficPolicy.outlierDetection.maxEjectionPercent: 101 is not a percentage between 0 and 100",
        ),
        (
            "  host: web\n  trafficPolicy: {outlierDetection: {baseEjectionTime: 0s}}",
            r#"DestinationRule demo/bad: spec.trafficPolicy.outlierDetection.baseEjectionTime: "0s" is shorter than 1ms"#,
        ),
        (
            "  host: web\n  trafficPolicy: {}",
            "DestinationRule demo/bad: spec.trafficPolicy: a trafficPolicy needs at least one field",
        ),
        (
            "  host: web\n  trafficPolicy: {connectionPool: {}}",
            "DestinationRule demo/bad: spec.trafficPolicy.connectionPool: a connectionPool needs tcp, http or both",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}",
            "DestinationRule demo/bad: spec.trafficPolicy.loadBalancer.consistentHash: consistentHash cannot be combined with simple",
        ),
        (
            "  host: web\n  trafficPolicy: {outlierDetection: {consecutive5xxErrors: x}}",
            "DestinationRule demo/bad: spec.trafficPolicy.outlierDetection.consecutive5xxErrors: invalid type: string \"x\", expected i64",
        ),
    ];
    for (spec, message) in cases {
        let t = translate(&dr("demo", "bad", spec));
        assert_eq!(messages(&t), vec![message.to_string()], "{spec}");
        assert!(t.state.destination_rules.is_empty());
    }
}

#[test]
fn a_bad_virtual_service_update_keeps_its_last_good_version() {
    let mut translator = Translator::new(TranslateConfig::default());
    let good = vs(
        "demo",
        "web",
        "  hosts: [web]\n  http: [{route: [{destination: {host: web}}], timeout: 2s}]",
    );
    translator.translate(parse(&good));
    let bad = vs(
        "demo",
        "web",
        "  hosts: [web]\n  http: [{route: [{destination: {host: web}}], timeout: soon}]",
    );
    let t = translator.translate(parse(&bad));
    assert_eq!(t.rejections.len(), 1);
    assert!(t.rejections[0].kept_last_good);
    assert_eq!(
        t.state.virtual_services[0].http[0].timeout,
        Some(Duration::from_secs(2))
    );
}

#[test]
fn durations_parse_like_go() {
    let ok = [
        ("3s", Duration::from_secs(3)),
        ("0.5s", Duration::from_millis(500)),
        (".5s", Duration::from_millis(500)),
        ("1.s", Duration::from_secs(1)),
        ("100ms", Duration::from_millis(100)),
        ("1m", Duration::from_secs(60)),
        ("1h", Duration::from_secs(3600)),
        ("1.5h", Duration::from_secs(5400)),
        ("1h30m10.5s", Duration::from_millis(5_410_500)),
        ("300us", Duration::from_micros(300)),
        ("2µs", Duration::from_micros(2)),
        ("7ns", Duration::from_nanos(7)),
        ("0", Duration::ZERO),
        ("-0s", Duration::ZERO),
        ("+2s", Duration::from_secs(2)),
    ];
    for (s, expected) in ok {
        assert_eq!(parse_duration(s), Ok(expected), "{s}");
    }
    let bad = [
        ("", "it is empty"),
        ("5", "a unit is missing"),
        ("5 s", "the unit is not one of ns, us, ms, s, m, h"),
        ("1d", "the unit is not one of ns, us, ms, s, m, h"),
        ("s", "a number is expected"),
        (".s", "a number is expected"),
        ("-1s", "it is negative"),
        ("9999999999h", "it is too large"),
    ];
    for (s, why) in bad {
        assert_eq!(parse_duration(s), Err(why), "{s}");
    }
}

// ---------------------------------------------------------------------------------------------
// Waypoints

#[test]
fn waypoint_binding_from_service_and_namespace_labels() {
    let yaml = [
        namespace("shop", "istio.io/use-waypoint: waypoint"),
        namespace("plain", ""),
        namespace(
            "cross",
            "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra",
        ),
        service("shop", "web", ""),
        // The waypoint's own Service (named after its Gateway): never behind a waypoint.
        service("shop", "waypoint", ""),
        service("shop", "opted-out", "istio.io/use-waypoint: none"),
        service("shop", "special", "istio.io/use-waypoint: fast-lane"),
        // A waypoint Service named otherwise, recognised by the Gateway API label.
        service(
            "shop",
            "waypoint-svc",
            "gateway.networking.k8s.io/gateway-name: waypoint",
        ),
        service("plain", "api", ""),
        service(
            "plain",
            "labelled",
            "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra",
        ),
        service("cross", "x", ""),
        // Same name as the waypoint but another namespace: not the waypoint itself.
        service("cross", "shared", ""),
        service("missing-ns", "y", ""),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let waypoint = |ns: &str, name: &str| {
        Some(WaypointRef {
            namespace: ns.into(),
            name: name.into(),
        })
    };
    let cases = [
        ("shop/web", waypoint("shop", "waypoint")),
        ("shop/waypoint", None),
        ("shop/opted-out", None),
        ("shop/special", waypoint("shop", "fast-lane")),
        ("shop/waypoint-svc", None),
        ("plain/api", None),
        ("plain/labelled", waypoint("infra", "shared")),
        ("cross/x", waypoint("infra", "shared")),
        ("cross/shared", waypoint("infra", "shared")),
        ("missing-ns/y", None),
    ];
    for (key, expected) in cases {
        assert_eq!(t.state.services[key].waypoint, expected, "{key}");
    }
    assert_eq!(
        waypoint("infra", "shared").unwrap().service_key(),
        "infra/shared"
    );
}

#[test]
fn waypoint_gateways_and_waypoint_pods() {
    let yaml = [
        namespace("shop", AMBIENT),
        gateway("shop", "waypoint", "istio-waypoint"),
        gateway("istio-ingress", "public", "example.com/other"),
        pod(
            "shop",
            "waypoint-5d7f",
            "10.0.0.9",
            "gateway.istio.io/managed: istio.io-mesh-controller, gateway.networking.k8s.io/gateway-name: waypoint",
            "",
        ),
        pod("shop", "web", "10.0.0.10", "app: web", ""),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    assert_eq!(
        t.state.waypoint_gateways.into_iter().collect::<Vec<_>>(),
        vec![(
            "shop/waypoint".to_string(),
            WaypointGateway {
                name: "waypoint".into(),
                namespace: "shop".into(),
            }
        )]
    );
    // The ingress Gateway is valid, in force, just not a waypoint.
    assert_eq!(t.in_force[&Kind::Gateway], 2);
    assert!(!t.state.workloads["shop/waypoint-5d7f"].enrolled);
    assert!(t.state.workloads["shop/web"].enrolled);
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy at L7

#[test]
fn l7_policy_targets() {
    let yaml = [
        policy(
            "shop",
            "both",
            "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n  - {kind: Service, group: '', name: web}\n  - {kind: Service, group: '', name: web, namespace: shop}",
        ),
        policy(
            "shop",
            "single",
            "  targetRef: {kind: Service, group: '', name: api}\n  action: DENY\n  rules: [{}]",
        ),
        policy("shop", "ns-wide", "  rules: [{}]"),
        policy("istio-system", "mesh-wide", "  action: DENY\n  rules: [{}]"),
        // Not a waypoint's: a workload selector, an audit policy, a ServiceEntry target.
        policy("shop", "selected", "  selector: {matchLabels: {app: web}}\n  rules: [{}]"),
        policy(
            "shop",
            "audit",
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: AUDIT\n  rules: [{}]",
        ),
        policy(
            "shop",
            "external",
            "  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: api}]\n  rules: [{}]",
        ),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let got: Vec<_> = t
        .state
        .l7_authorization_policies
        .iter()
        .map(|p| (p.key(), p.targets.clone(), p.action))
        .collect();
    let service = |name: &str| L7Target::Service {
        namespace: "shop".into(),
        name: name.into(),
    };
    assert_eq!(
        got,
        vec![
            (
                "istio-system/mesh-wide".to_string(),
                vec![L7Target::Namespace("istio-system".into())],
                PolicyAction::Deny
            ),
            (
                "shop/both".to_string(),
                vec![
                    L7Target::Gateway {
                        namespace: "shop".into(),
                        name: "waypoint".into()
                    },
                    service("web"),
                ],
                PolicyAction::Allow
            ),
            (
                "shop/ns-wide".to_string(),
                vec![L7Target::Namespace("shop".into())],
                PolicyAction::Allow
            ),
            (
                "shop/single".to_string(),
                vec![service("api")],
                PolicyAction::Deny
            ),
        ]
    );
    // ztunnel's view is unchanged: namespace-wide and selected policies only.
    let l4: Vec<_> = t
        .state
        .authorization_policies
        .iter()
        .map(|p| p.key())
        .collect();
    assert_eq!(
        l4,
        vec!["istio-system/mesh-wide", "shop/ns-wide", "shop/selected"]
    );
}

#[test]
fn l7_policy_rules() {
    let spec = "
  targetRefs: [{kind: Service, group: '', name: web}]
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/client, '*/sa/admin']
        notPrincipals: [cluster.local/ns/shop/sa/bad]
        namespaces: [shop]
        ipBlocks: [10.0.0.0/8]
        remoteIpBlocks: [203.0.113.7]
    - source:
        serviceAccounts: [robot]
        requestPrincipals: ['issuer/*']
    to:
    - operation:
        hosts: ['web.shop.svc.cluster.local', '*.example.com']
        ports: ['9080']
        methods: [GET, HEAD]
        paths: ['/api/*']
        notPaths: [/api/admin]
    when:
    - {key: 'request.headers[X-User]', values: [alice]}
    - {key: source.ip, notValues: [10.1.0.0/16]}
    - {key: source.namespace, values: [shop]}
    - {key: source.principal, values: ['cluster.local/*']}
    - {key: destination.ip, values: [10.96.0.10]}
    - {key: destination.port, values: ['9080']}
    - {key: 'request.auth.claims[iss]', values: [issuer]}";
    let t = translate(&policy("shop", "l7", spec));
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    // A targetRefs policy is not ztunnel's.
    assert!(t.state.authorization_policies.is_empty());
    let p = &t.state.l7_authorization_policies[0];
    let exact = |s: &str| StringMatch::Exact(s.into());
    let block = |s: &str| parse_ip_block(s).unwrap();
    let condition = |key, values: &[StringMatch], not_values: &[StringMatch]| L7Condition {
        key,
        values: values.to_vec(),
        not_values: not_values.to_vec(),
    };
    assert_eq!(
        p.rules,
        vec![L7Rule {
            from: vec![
                L7Source {
                    principals: vec![
                        exact("cluster.local/ns/shop/sa/client"),
                        StringMatch::Suffix("/sa/admin".into()),
                    ],
                    not_principals: vec![exact("cluster.local/ns/shop/sa/bad")],
                    namespaces: vec![exact("shop")],
                    ip_blocks: vec![block("10.0.0.0/8")],
                    remote_ip_blocks: vec![block("203.0.113.7")],
                    ..L7Source::default()
                },
                L7Source {
                    principals: vec![StringMatch::Suffix("/ns/shop/sa/robot".into())],
                    request_principals: true,
                    ..L7Source::default()
                },
            ],
            to: vec![L7Operation {
                hosts: vec![
                    exact("web.shop.svc.cluster.local"),
                    StringMatch::Suffix(".example.com".into()),
                ],
                ports: vec![9080],
                methods: vec![exact("GET"), exact("HEAD")],
                paths: vec![StringMatch::Prefix("/api/".into())],
                not_paths: vec![exact("/api/admin")],
                ..L7Operation::default()
            }],
            when: vec![
                condition(
                    L7ConditionKey::RequestHeader("x-user".into()),
                    &[exact("alice")],
                    &[]
                ),
                condition(L7ConditionKey::SourceIp, &[], &[exact("10.1.0.0/16")]),
                condition(L7ConditionKey::SourceNamespace, &[exact("shop")], &[]),
                condition(
                    L7ConditionKey::SourcePrincipal,
                    &[StringMatch::Prefix("cluster.local/".into())],
                    &[]
                ),
                condition(L7ConditionKey::DestinationIp, &[exact("10.96.0.10")], &[]),
                condition(L7ConditionKey::DestinationPort, &[exact("9080")], &[]),
                condition(
                    L7ConditionKey::Unsupported("request.auth.claims[iss]".into()),
                    &[exact("issuer")],
                    &[]
                ),
            ],
        }]
    );
}

#[test]
fn l7_policy_errors_name_the_field() {
    let cases = [
        (
            policy(
                "shop",
                "p",
                "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: infra}]",
            ),
            r#"AuthorizationPolicy shop/p: spec.targetRefs[0].namespace: "infra" is another namespace; cross-namespace targetRefs are not supported (Istio refuses them too)"#,
        ),
        (
            policy(
                "shop",
                "p",
                "  selector: {matchLabels: {app: web}}\n  targetRefs: [{kind: Service, group: '', name: web}]",
            ),
            "AuthorizationPolicy shop/p: spec.targetRefs[0]: targetRefs cannot be combined with selector",
        ),
        (
            policy("shop", "p", "  targetRefs: [{kind: Service, group: ''}]"),
            "AuthorizationPolicy shop/p: spec.targetRefs[0].name: a name is required",
        ),
        (
            policy(
                "shop",
                "p",
                "  targetRefs: [{kind: Service, group: '', name: web}]\n  rules: [{to: [{operation: {ports: [http]}}]}]",
            ),
            r#"AuthorizationPolicy shop/p: spec.rules[0].to[0].operation.ports[0]: "http" is not a port number"#,
        ),
        (
            policy(
                "shop",
                "p",
                "  targetRefs: [{kind: Service, group: '', name: web}]\n  rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4/40]}}]}]",
            ),
            r#"AuthorizationPolicy shop/p: spec.rules[0].from[0].source.remoteIpBlocks[0]: "1.2.3.4/40" is not an IP address or CIDR: the prefix length is longer than 32"#,
        ),
        (
            policy(
                "shop",
                "p",
                "  targetRefs: [{kind: Service, group: '', name: web}]\n  rules: [{when: [{key: 'request.headers[]', values: [x]}]}]",
            ),
            "AuthorizationPolicy shop/p: spec.rules[0].when[0].key: a header name is required",
        ),
        (
            policy(
                "shop",
                "p",
                "  targetRefs: [{kind: Service, group: '', name: web}]\n  action: deny",
            ),
            r#"AuthorizationPolicy shop/p: spec.action: "deny" is not one of ALLOW, DENY, AUDIT, CUSTOM"#,
        ),
    ];
    for (yaml, message) in cases {
        assert_eq!(
            messages(&translate(&yaml)),
            vec![message.to_string()],
            "{yaml}"
        );
    }
}

/// Who may relay a client's address to a pod in `forwarded`: the waypoint of one of the pod's
/// services, by the identity of the waypoint's pods, and no one else.
#[test]
fn only_the_destinations_own_waypoint_relays_for_it() {
    let slice = |ns: &str, svc: &str, pods: &[(&str, &str)]| {
        let endpoints: String = pods
            .iter()
            .map(|(ip, name)| {
                format!("- addresses: [{ip}]\n  targetRef: {{kind: Pod, name: {name}}}\n")
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-x\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints:\n{endpoints}---\n"
        )
    };
    let sa = |name: &str| format!("  serviceAccountName: {name}\n");
    let yaml = [
        namespace(
            "shop",
            &format!("{AMBIENT}, istio.io/use-waypoint: waypoint"),
        ),
        namespace("other", AMBIENT),
        service("shop", "web", ""),
        service("shop", "waypoint", ""),
        service("shop", "direct", "istio.io/use-waypoint: none"),
        service("other", "waypoint", ""),
        pod("shop", "web-1", "10.0.0.1", "", &sa("web")),
        pod("shop", "direct-1", "10.0.0.2", "", &sa("direct")),
        pod("shop", "waypoint-1", "10.0.0.9", "", &sa("waypoint")),
        pod("other", "waypoint-1", "10.0.1.9", "", &sa("waypoint")),
        slice("shop", "web", &[("10.0.0.1", "web-1")]),
        slice("shop", "direct", &[("10.0.0.2", "direct-1")]),
        slice("shop", "waypoint", &[("10.0.0.9", "waypoint-1")]),
        slice("other", "waypoint", &[("10.0.1.9", "waypoint-1")]),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let state = &t.state;
    let id = |ns: &str, sa: &str| crate::identity::Identity::new("cluster.local", ns, sa).unwrap();
    let cases = [
        // (peer, destination pod, relays)
        (id("shop", "waypoint"), "shop/web-1", true),
        // The pod's own service opted out of the waypoint: nobody relays for it.
        (id("shop", "waypoint"), "shop/direct-1", false),
        // A waypoint of another namespace, a workload, the pod itself: no.
        (id("other", "waypoint"), "shop/web-1", false),
        (id("shop", "direct"), "shop/web-1", false),
        (id("shop", "web"), "shop/web-1", false),
    ];
    for (peer, pod, expected) in cases {
        let destination = &state.workloads[pod];
        assert_eq!(
            state.is_waypoint_for(&peer, destination),
            expected,
            "{peer} for {pod}"
        );
    }
}

/// `(object, field, message)` of the state's warnings.
fn warnings(t: &Translation) -> Vec<(&str, &str, &str)> {
    t.state
        .warnings
        .iter()
        .map(|w| {
            assert_eq!(w.code, REFERENCED_RESOURCE_NOT_FOUND);
            assert_eq!(w.kind, "VirtualService");
            (w.object.as_str(), w.field.as_str(), w.message.as_str())
        })
        .collect()
}

#[test]
fn routes_to_subsets_no_destination_rule_defines_are_warnings_not_rejections() {
    let routes = "
  hosts: [reviews]
  http:
  - match: [{gateways: [public]}]
    route: [{destination: {host: reviews, subset: v9}}]
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v3}
      weight: 50
    mirror: {host: reviews, subset: shadow}
  - route: [{destination: {host: ratings, subset: v1}}]
    mirrors: [{destination: {host: reviews, subset: v1}}, {destination: {host: reviews.bookinfo, subset: v4}}]
  - route: [{destination: {host: reviews}}]
  tcp:
  - route: [{destination: {host: reviews, subset: v2}, weight: 1}, {destination: {host: reviews, subset: tcp}, weight: 1}]";
    let rule = "
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]";
    let yaml = service("bookinfo", "reviews", "")
        + &vs("bookinfo", "reviews", routes)
        + &dr("bookinfo", "reviews", rule);
    let t = translate(&yaml);
    // Accepted as Istio accepts it; the waypoint answers 503 NC for those subsets.
    assert_eq!(only_vs(&t).http.len(), 3);
    let ratings = "ratings.bookinfo.svc.cluster.local";
    let not_found = |host: &str, subset: &str, why: &str| {
        format!(
            "Referenced host+subset in destinationrule not found: \"{host}+{subset}\" ({why}); requests routed there fail with 503 NC"
        )
    };
    let only_v1_v2 =
        format!("DestinationRule bookinfo/reviews (host {REVIEWS}) defines only v1, v2");
    let expected = [
        // Indexes are as written: the gateway-only spec.http[0] is not a waypoint route and is
        // not checked, but the paths of the others still count it.
        (
            "spec.http[1].mirror.subset",
            not_found(REVIEWS, "shadow", &only_v1_v2),
        ),
        (
            "spec.http[1].route[1].destination.subset",
            not_found(REVIEWS, "v3", &only_v1_v2),
        ),
        (
            "spec.http[2].mirrors[1].destination.subset",
            not_found(REVIEWS, "v4", &only_v1_v2),
        ),
        (
            "spec.http[2].route[0].destination.subset",
            not_found(
                ratings,
                "v1",
                &format!("no DestinationRule has host {ratings}"),
            ),
        ),
        (
            "spec.tcp[0].route[1].destination.subset",
            not_found(REVIEWS, "tcp", &only_v1_v2),
        ),
    ];
    let got = warnings(&t);
    let want: Vec<(&str, &str, &str)> = expected
        .iter()
        .map(|(field, message)| ("VirtualService bookinfo/reviews", *field, message.as_str()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        t.state.warnings[1].to_string(),
        format!(
            "VirtualService bookinfo/reviews: spec.http[1].route[1].destination.subset: {} [IST0101]",
            not_found(REVIEWS, "v3", &only_v1_v2)
        )
    );

    // Defining the subsets clears the warnings.
    let full = "
  host: reviews
  subsets: [{name: v1}, {name: v2}, {name: v3}, {name: v4}, {name: shadow}, {name: tcp}]";
    let ratings_rule = "\n  host: ratings\n  subsets: [{name: v1}]";
    let t = translate(
        &(service("bookinfo", "reviews", "")
            + &vs("bookinfo", "reviews", routes)
            + &dr("bookinfo", "reviews", full)
            + &dr("bookinfo", "ratings", ratings_rule)),
    );
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    assert_eq!(warnings(&t), vec![]);
}

#[test]
fn subsets_are_checked_against_the_destination_rule_in_force() {
    // Two rules for one host: the older is the one the waypoint uses (and the one checked),
    // even though the newer defines the subset.
    let older = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a-old, namespace: bookinfo, creationTimestamp: '2024-01-01T00:00:00Z'}\nspec:\n  host: reviews\n  subsets: [{name: v1}]\n---\n";
    let newer = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: b-new, namespace: bookinfo, creationTimestamp: '2025-01-01T00:00:00Z'}\nspec:\n  host: reviews\n  subsets: [{name: v1}, {name: v2}]\n---\n";
    let routes =
        "\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v2}}]";
    let t = translate(&(vs("bookinfo", "reviews", routes) + older + newer));
    assert_eq!(
        warnings(&t),
        vec![(
            "VirtualService bookinfo/reviews",
            "spec.http[0].route[0].destination.subset",
            format!(
                "Referenced host+subset in destinationrule not found: \"{REVIEWS}+v2\" (DestinationRule bookinfo/a-old (host {REVIEWS}) defines only v1); requests routed there fail with 503 NC"
            )
            .as_str()
        )]
    );
    // A rule without subsets.
    let t = translate(
        &(vs("bookinfo", "reviews", routes) + &dr("bookinfo", "reviews", "\n  host: reviews")),
    );
    assert!(
        warnings(&t)[0].2.contains("defines no subsets"),
        "{:?}",
        warnings(&t)
    );
}
