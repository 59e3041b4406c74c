//! Tables for the Gateway API `HTTPRoute` translation: attachment to Services, matches,
//! precedence, filters, backends and the objects that must be refused.

use std::time::Duration;

use super::tests::{messages, translate};
use super::*;

fn service(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: [{{port: 9080, name: http}}]}}\n---\n"
    )
}

fn route(ns: &str, name: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}\nspec:\n{spec}\n---\n"
    )
}

const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";
const PARENT: &str = "  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]\n";

fn reviews_routes(t: &Translation) -> &VirtualService {
    assert!(t.rejections.is_empty(), "{:?}", messages(t));
    t.state
        .virtual_services
        .iter()
        .find(|vs| vs.hosts == [REVIEWS])
        .expect("routes for reviews")
}

fn destinations(route: &HttpRoute) -> Vec<(&str, Option<u16>, u32)> {
    match &route.action {
        HttpAction::Route(d) => d
            .iter()
            .map(|d| (d.destination.host.as_str(), d.destination.port, d.weight))
            .collect(),
        other => panic!("not a route: {other:?}"),
    }
}

/// The getting-started guide's split of Istio's ambient docs: reviews v1 90, v2 10.
#[test]
fn getting_started_split_90_10() {
    let yaml = service("bookinfo", "reviews")
        + &service("bookinfo", "reviews-v1")
        + &service("bookinfo", "reviews-v2")
        + &route(
            "bookinfo",
            "reviews",
            "2026-01-01T00:00:00Z",
            &format!(
                "{PARENT}  rules:\n  - backendRefs:\n    - {{name: reviews-v1, port: 9080, weight: 90}}\n    - {{name: reviews-v2, port: 9080, weight: 10}}\n"
            ),
        );
    let t = translate(&yaml);
    let vs = reviews_routes(&t);
    assert_eq!(
        vs.origin,
        VirtualServiceOrigin::GatewayRoutes(vec!["HTTPRoute bookinfo/reviews".into()])
    );
    assert_eq!(vs.http.len(), 1);
    let r = &vs.http[0];
    assert_eq!(
        destinations(r),
        [
            ("reviews-v1.bookinfo.svc.cluster.local", Some(9080), 90),
            ("reviews-v2.bookinfo.svc.cluster.local", Some(9080), 10)
        ]
    );
    // No matches: path prefix `/`, limited to the parentRef's port.
    assert_eq!(r.matches.len(), 1);
    assert_eq!(r.matches[0].uri, Some(ValueMatch::PathPrefix("/".into())));
    assert_eq!(r.matches[0].port, Some(9080));
    // Istio's default retries, as for a VirtualService without `retries`.
    assert_eq!(r.retries, istio_default_retries());
}

/// Gateway API precedence: exact path, longest prefix, method, most headers, most query
/// parameters, then the oldest route, then rule order; across routes and rules.
#[test]
fn precedence_across_rules_and_routes() {
    let older = route(
        "bookinfo",
        "older",
        "2026-01-01T00:00:00Z",
        &format!(
            "{PARENT}  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n    backendRefs: [{{name: reviews, port: 9080}}]\n    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: X-Rule, value: root-older}}]}}}}]\n  - matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: End-User, value: jason}}]}}]\n    backendRefs: [{{name: reviews, port: 9080}}]\n"
        ),
    );
    let newer = route(
        "bookinfo",
        "newer",
        "2026-02-01T00:00:00Z",
        &format!(
            "{PARENT}  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n    backendRefs: [{{name: reviews, port: 9080}}]\n  - matches:\n    - {{path: {{type: Exact, value: /api/v1}}}}\n    - {{path: {{type: PathPrefix, value: /api/}}, method: GET}}\n    - {{path: {{type: PathPrefix, value: /api/longer}}}}\n    - {{path: {{type: RegularExpression, value: '/api/.*'}}}}\n    backendRefs: [{{name: reviews, port: 9080}}]\n"
        ),
    );
    let t = translate(&(service("bookinfo", "reviews") + &newer + &older));
    let vs = reviews_routes(&t);
    let order: Vec<String> = vs
        .http
        .iter()
        .map(|r| {
            let m = &r.matches[0];
            format!(
                "{} {:?} {} {}",
                r.name.as_deref().unwrap_or(""),
                m.uri,
                m.method.is_some(),
                m.headers.len()
            )
        })
        .collect();
    let expected = [
        "HTTPRoute:bookinfo/newer:1 Some(Exact(\"/api/v1\")) false 0",
        "HTTPRoute:bookinfo/newer:1 Some(PathPrefix(\"/api/longer\")) false 0",
        // `/api/` is written with a trailing `/`: 5 characters, ahead of `/api`.
        "HTTPRoute:bookinfo/newer:1 Some(PathPrefix(\"/api\")) true 0",
        "HTTPRoute:bookinfo/older:1 Some(PathPrefix(\"/api\")) false 1",
        // The oldest route's `/` first, then the newer one's.
        "HTTPRoute:bookinfo/older:0 Some(PathPrefix(\"/\")) false 0",
        "HTTPRoute:bookinfo/newer:0 Some(PathPrefix(\"/\")) false 0",
        "HTTPRoute:bookinfo/newer:1 Some(Regex(Regex { pattern: \"/api/.*\", compiled: Regex(\"^(?:/api/.*)$\") })) false 0",
    ];
    assert_eq!(order, expected);
    assert_eq!(
        vs.origin,
        VirtualServiceOrigin::GatewayRoutes(vec![
            "HTTPRoute bookinfo/older".into(),
            "HTTPRoute bookinfo/newer".into()
        ])
    );
    // Rule-level header edits are the route's.
    let root_older = &vs.http[4];
    assert_eq!(
        root_older.headers.request.set,
        [("x-rule".to_owned(), "root-older".to_owned())]
    );
}

#[test]
fn filters_redirect_rewrite_mirror_and_timeouts() {
    let spec = format!(
        "{PARENT}  rules:\n  - matches: [{{path: {{value: /old}}}}]\n    filters:\n    - {{type: RequestRedirect, requestRedirect: {{scheme: https, hostname: example.com, statusCode: 301}}}}\n  - matches: [{{path: {{value: /v1}}}}]\n    filters:\n    - {{type: URLRewrite, urlRewrite: {{hostname: internal, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}}}}\n    - {{type: RequestMirror, requestMirror: {{backendRef: {{name: reviews, port: 9080}}, fraction: {{numerator: 1, denominator: 4}}}}}}\n    - {{type: ResponseHeaderModifier, responseHeaderModifier: {{add: [{{name: X-Served, value: v2}}], remove: [Server]}}}}\n    backendRefs: [{{name: reviews, port: 9080}}]\n    timeouts: {{request: 10s, backendRequest: 2s}}\n  - matches: [{{path: {{type: Exact, value: /full}}}}]\n    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /a$b}}}}}}]\n    backendRefs: [{{name: reviews, port: 9080}}]\n"
    );
    let t = translate(
        &(service("bookinfo", "reviews") + &route("bookinfo", "r", "2026-01-01T00:00:00Z", &spec)),
    );
    let vs = reviews_routes(&t);
    let by_path = |p: &str| {
        vs.http
            .iter()
            .find(|r| match &r.matches[0].uri {
                Some(ValueMatch::PathPrefix(v) | ValueMatch::Exact(v)) => v == p,
                _ => false,
            })
            .unwrap_or_else(|| panic!("route for {p}"))
    };
    let HttpAction::Redirect(redirect) = &by_path("/old").action else {
        panic!("redirect");
    };
    assert_eq!(redirect.scheme.as_deref(), Some("https"));
    assert_eq!(redirect.authority.as_deref(), Some("example.com"));
    assert_eq!(redirect.port, Some(RedirectPort::FromProtocolDefault));
    assert_eq!(redirect.code, 301);

    let v1 = by_path("/v1");
    let rewrite = v1.rewrite.as_ref().expect("rewrite");
    assert_eq!(rewrite.uri.as_deref(), Some("/v2"));
    assert_eq!(rewrite.authority.as_deref(), Some("internal"));
    assert_eq!(v1.mirrors.len(), 1);
    assert_eq!(v1.mirrors[0].percentage, 25.0);
    assert_eq!(
        v1.headers.response.add,
        [("x-served".to_owned(), "v2".to_owned())]
    );
    assert_eq!(v1.headers.response.remove, ["server"]);
    assert_eq!(v1.timeout, Some(Duration::from_secs(10)));
    assert_eq!(v1.retries.per_try_timeout, Some(Duration::from_secs(2)));

    let full = by_path("/full");
    let (regex, replacement) = full
        .rewrite
        .as_ref()
        .and_then(|r| r.uri_regex.as_ref())
        .expect("full path rewrite");
    assert!(regex.is_match("/anything/at/all"));
    assert_eq!(replacement, "/a$$b", "`$` escaped for the regex crate");
}

/// Backends: weight 0 gets nothing; all weight 0 or none at all answers 500; a backend that
/// cannot be resolved keeps its share, answered 500 by the waypoint.
#[test]
fn backends_weights_and_unresolvable_ones() {
    let spec = format!(
        "{PARENT}  rules:\n  - matches: [{{path: {{value: /zero}}}}]\n    backendRefs: [{{name: reviews, port: 9080, weight: 0}}]\n  - matches: [{{path: {{value: /none}}}}]\n  - matches: [{{path: {{value: /mixed}}}}]\n    backendRefs:\n    - {{name: reviews, port: 9080, weight: 3}}\n    - {{name: other, namespace: elsewhere, port: 80, weight: 1}}\n    - {{name: bucket, kind: Bucket, group: storage.example.com, weight: 1}}\n    - {{name: reviews, port: 9080, weight: 0}}\n"
    );
    let t = translate(
        &(service("bookinfo", "reviews") + &route("bookinfo", "r", "2026-01-01T00:00:00Z", &spec)),
    );
    let vs = reviews_routes(&t);
    let by_prefix = |p: &str| {
        vs.http
            .iter()
            .find(|r| r.matches[0].uri == Some(ValueMatch::PathPrefix(p.into())))
            .unwrap_or_else(|| panic!("route for {p}"))
    };
    for p in ["/zero", "/none"] {
        assert_eq!(
            by_prefix(p).action,
            HttpAction::DirectResponse(DirectResponse {
                status: 500,
                body: None
            }),
            "{p}"
        );
    }
    assert_eq!(
        destinations(by_prefix("/mixed")),
        [
            (REVIEWS, Some(9080), 3),
            (UNRESOLVED_BACKEND, None, 1),
            (UNRESOLVED_BACKEND, None, 1)
        ]
    );
}

/// A route in another namespace than its Service is a consumer route: only for clients of its
/// own namespace, ahead of the Service's own routes.
#[test]
fn consumer_routes_apply_to_their_namespace_first() {
    let producer = route(
        "bookinfo",
        "producer",
        "2026-01-01T00:00:00Z",
        "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules: [{backendRefs: [{name: reviews, port: 9080}]}]\n",
    );
    let consumer = route(
        "frontend",
        "consumer",
        "2026-02-01T00:00:00Z",
        "  parentRefs: [{group: \"\", kind: Service, name: reviews, namespace: bookinfo}]\n  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-consumer, value: frontend}]}}], backendRefs: [{name: reviews, namespace: bookinfo, port: 9080}]}]\n",
    );
    let t = translate(&(service("bookinfo", "reviews") + &producer + &consumer));
    let vs = reviews_routes(&t);
    assert_eq!(vs.http.len(), 2);
    assert_eq!(
        vs.http[0].matches[0].source_namespace.as_deref(),
        Some("frontend")
    );
    assert_eq!(vs.http[0].matches[0].port, None);
    // Its backend is in another namespace and no ReferenceGrant is read: 500 for its share.
    assert_eq!(destinations(&vs.http[0]), [(UNRESOLVED_BACKEND, None, 1)]);
    assert_eq!(vs.http[1].matches[0].source_namespace, None);
}

/// HTTPRoutes on a Service win over a VirtualService for it, which is then shadowed.
#[test]
fn http_routes_win_over_a_virtual_service() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo, creationTimestamp: '2020-01-01T00:00:00Z'}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews}}]}]\n---\n";
    let t = translate(
        &(service("bookinfo", "reviews")
            + vs
            + &route(
                "bookinfo",
                "reviews",
                "2026-01-01T00:00:00Z",
                &format!("{PARENT}  rules: [{{backendRefs: [{{name: reviews, port: 9080}}]}}]\n"),
            )),
    );
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let first = t
        .state
        .virtual_services
        .iter()
        .position(|vs| matches!(vs.origin, VirtualServiceOrigin::GatewayRoutes(_)))
        .expect("HTTPRoutes");
    let plain = t
        .state
        .virtual_services
        .iter()
        .position(|vs| vs.origin == VirtualServiceOrigin::VirtualService)
        .expect("VirtualService");
    assert!(first < plain, "the HTTPRoutes come first for the host");
}

/// Refused objects name the field; nothing of theirs applies.
#[test]
fn bad_routes_are_refused_with_the_field_named() {
    let cases = [
        (
            "  parentRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules: [{matches: [{path: {type: Prefix, value: /}}]}]\n",
            "spec.rules[0].matches[0].path.type",
        ),
        (
            "  parentRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules: [{matches: [{path: {value: api}}]}]\n",
            "spec.rules[0].matches[0].path.value",
        ),
        (
            "  parentRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules: [{backendRefs: [{name: reviews}]}]\n",
            "spec.rules[0].backendRefs[0].port",
        ),
        (
            "  parentRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}], backendRefs: [{name: reviews, port: 9080}]}]\n",
            "spec.rules[0].filters.urlRewrite.path",
        ),
        (
            "  parentRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules: [{filters: [{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}], backendRefs: [{name: reviews, port: 9080}]}]\n",
            "spec.rules[0].filters[0].type",
        ),
        (
            "  parentRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules: [{backendRef: [{name: reviews, port: 9080}]}]\n",
            "backendRef",
        ),
        (
            "  parentRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules: [{matches: [{method: FETCH}], backendRefs: [{name: reviews, port: 9080}]}]\n",
            "spec.rules[0].matches[0].method",
        ),
    ];
    for (spec, field) in cases {
        let t = translate(
            &(service("bookinfo", "reviews")
                + &route("bookinfo", "bad", "2026-01-01T00:00:00Z", spec)),
        );
        let m = messages(&t);
        assert_eq!(m.len(), 1, "{spec}: {m:?}");
        assert!(m[0].starts_with("HTTPRoute bookinfo/bad: "), "{m:?}");
        assert!(m[0].contains(field), "{field} in {m:?}");
        assert!(
            !t.state
                .virtual_services
                .iter()
                .any(|vs| vs.hosts == [REVIEWS]),
            "nothing of a refused route applies"
        );
    }
}

/// GEP-709: a backend (or mirror) in another namespace needs a ReferenceGrant there, from
/// HTTPRoutes of the route's namespace to that Service (or every Service).
#[test]
fn cross_namespace_backends_need_a_reference_grant() {
    let grant = |from_ns: &str, to_name: Option<&str>| {
        let name = to_name.map_or(String::new(), |n| format!(", name: {n}"));
        format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: ratings}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {from_ns}}}]\n  to: [{{group: \"\", kind: Service{name}}}]\n---\n"
        )
    };
    let spec = format!(
        "{PARENT}  rules:\n  - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: ratings, namespace: ratings, port: 9080}}}}}}]\n    backendRefs: [{{name: ratings, namespace: ratings, port: 9080}}]\n"
    );
    let base = service("bookinfo", "reviews")
        + &service("ratings", "ratings")
        + &route("bookinfo", "r", "2026-01-01T00:00:00Z", &spec);
    let cases = [
        ("no grant", String::new(), false),
        ("a grant for every Service", grant("bookinfo", None), true),
        (
            "a grant for this Service",
            grant("bookinfo", Some("ratings")),
            true,
        ),
        (
            "a grant for another Service",
            grant("bookinfo", Some("details")),
            false,
        ),
        (
            "a grant to another namespace's routes",
            grant("frontend", None),
            false,
        ),
    ];
    for (what, grant, allowed) in cases {
        let t = translate(&(base.clone() + &grant));
        let vs = reviews_routes(&t);
        let (host, port) = if allowed {
            ("ratings.ratings.svc.cluster.local", Some(9080))
        } else {
            (UNRESOLVED_BACKEND, None)
        };
        assert_eq!(destinations(&vs.http[0]), [(host, port, 1)], "{what}");
        assert_eq!(
            vs.http[0].mirrors.len(),
            usize::from(allowed),
            "{what}: the mirror"
        );
    }
}

/// `(type, status, reason)` of each condition of the route's one parent.
fn conditions(t: &Translation, name: &str) -> Vec<(&'static str, &'static str, &'static str)> {
    assert!(t.rejections.is_empty(), "{:?}", messages(t));
    let status = t
        .state
        .route_statuses
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for {name}: {:?}", t.state.route_statuses));
    assert_eq!(status.parents.len(), 1, "{status:?}");
    status.parents[0]
        .conditions
        .iter()
        .map(|c| (c.kind, c.status, c.reason))
        .collect()
}

#[test]
fn route_status_names_the_specifications_reasons_per_parent() {
    let objects = [
        service("bookinfo", "reviews"),
        service("other", "ratings"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: bookinfo}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - {name: http, port: 80, protocol: HTTP, hostname: bookinfo.example.com}\n---\n".to_owned(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: bookinfo}\nspec: {gatewayClassName: istio-waypoint}\n---\n".to_owned(),
    ]
    .concat();
    let backend = "  rules:\n  - backendRefs: [{name: reviews, port: 9080}]\n";
    let accepted = ("Accepted", "True", "Accepted");
    let resolved = ("ResolvedRefs", "True", "ResolvedRefs");
    type Condition<'a> = (&'a str, &'a str, &'a str);
    let cases: [(&str, String, [Condition<'_>; 2]); 11] = [
        ("mesh", format!("{PARENT}{backend}"), [accepted, resolved]),
        (
            "no-service",
            format!("  parentRefs: [{{group: \"\", kind: Service, name: nope}}]\n{backend}"),
            [("Accepted", "False", "NoMatchingParent"), resolved],
        ),
        (
            "no-port",
            format!(
                "  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 1}}]\n{backend}"
            ),
            [("Accepted", "False", "NoMatchingParent"), resolved],
        ),
        (
            "ingress",
            format!("  parentRefs: [{{name: edge}}]\n{backend}"),
            [accepted, resolved],
        ),
        (
            "no-listener",
            format!("  parentRefs: [{{name: edge, sectionName: https}}]\n{backend}"),
            [("Accepted", "False", "NoMatchingParent"), resolved],
        ),
        (
            "other-host",
            format!("  parentRefs: [{{name: edge}}]\n  hostnames: [shop.example.com]\n{backend}"),
            [
                ("Accepted", "False", "NoMatchingListenerHostname"),
                resolved,
            ],
        ),
        (
            "waypoint",
            format!("  parentRefs: [{{name: waypoint}}]\n{backend}"),
            [("Accepted", "False", "NoMatchingParent"), resolved],
        ),
        (
            "no-gateway",
            format!("  parentRefs: [{{name: nope}}]\n{backend}"),
            [("Accepted", "False", "NoMatchingParent"), resolved],
        ),
        (
            "bad-kind",
            format!(
                "{PARENT}  rules:\n  - backendRefs: [{{group: example.com, kind: Bucket, name: b}}]\n"
            ),
            [accepted, ("ResolvedRefs", "False", "InvalidKind")],
        ),
        (
            "not-permitted",
            format!(
                "{PARENT}  rules:\n  - backendRefs: [{{name: ratings, namespace: other, port: 9080}}]\n"
            ),
            [accepted, ("ResolvedRefs", "False", "RefNotPermitted")],
        ),
        (
            "not-found",
            format!("{PARENT}  rules:\n  - backendRefs: [{{name: gone, port: 9080}}]\n"),
            [accepted, ("ResolvedRefs", "False", "BackendNotFound")],
        ),
    ];
    for (name, spec, expected) in cases {
        let t = translate(&format!(
            "{objects}{}",
            route("bookinfo", name, "2026-01-01T00:00:00Z", &spec)
        ));
        assert_eq!(conditions(&t, name), expected, "{name}");
    }
    // An HTTPRoute of another namespace than the Gateway: not admitted by the default `Same`.
    let t = translate(&format!(
        "{objects}{}",
        route(
            "other",
            "elsewhere",
            "2026-01-01T00:00:00Z",
            "  parentRefs: [{name: edge, namespace: bookinfo}]\n  rules:\n  - backendRefs: [{name: ratings, port: 9080}]\n",
        )
    ));
    assert_eq!(
        conditions(&t, "elsewhere"),
        [("Accepted", "False", "NotAllowedByListeners"), resolved]
    );
    // The status carries the generation it describes and the parent as written, defaults
    // filled in; it is part of the state /config_dump shows.
    let t = translate(&format!(
        "{objects}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: g, namespace: bookinfo, generation: 7}}\nspec:\n  parentRefs: [{{name: edge}}]\n{backend}---\n"
    ));
    let status = &t.state.route_statuses[0];
    assert_eq!(status.generation, Some(7));
    assert_eq!(
        status.parents[0].parent_ref.group,
        "gateway.networking.k8s.io"
    );
    assert_eq!(status.parents[0].parent_ref.kind, "Gateway");
    assert_eq!(status.parents[0].parent_ref.namespace, "bookinfo");
    let dump = serde_json::to_value(&t.state).unwrap();
    assert_eq!(
        dump["route_statuses"][0]["parents"][0]["conditions"][0]["type"],
        "Accepted"
    );
}

fn kind_route(
    kind: &str,
    version: &str,
    ns: &str,
    name: &str,
    created: &str,
    spec: &str,
) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/{version}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}\nspec:\n{spec}\n---\n"
    )
}

/// `yaml` is refused with a message naming `field` (`what`: the case, for the failure).
fn assert_refused(yaml: &str, field: &str, what: &str) {
    let m = messages(&translate(yaml)).join("\n");
    assert!(m.contains(field), "{what}: {m}");
}

fn uri(route: &HttpRoute) -> String {
    match &route.matches[0].uri {
        Some(ValueMatch::Exact(p)) => format!("exact {p}"),
        Some(ValueMatch::PathPrefix(p)) => format!("prefix {p}"),
        Some(ValueMatch::Regex(r)) => format!("regex {}", r.pattern),
        other => format!("{other:?}"),
    }
}

/// GRPCRoute matches become the HTTP path matches a gRPC call (`POST /{service}/{method}`) is
/// matched by, ranked as the specification orders them: exact service and method first, then
/// the service alone, then method-only and regex matches; no match: every call.
#[test]
fn grpc_route_matches_service_and_method() {
    let spec = format!(
        "{PARENT}  rules:\n  - matches: [{{method: {{service: demo.Echo}}}}]\n    backendRefs: [{{name: reviews-v1, port: 9080}}]\n  - matches: [{{method: {{service: demo.Echo, method: Shout}}}}]\n    backendRefs: [{{name: reviews-v2, port: 9080}}]\n  - matches: [{{method: {{method: Ping}}}}, {{method: {{type: RegularExpression, service: 'demo\\..*', method: 'Get.*'}}}}]\n    backendRefs: [{{name: reviews-v2, port: 9080}}]\n  - backendRefs: [{{name: reviews-v1, port: 9080}}]\n"
    );
    let yaml = service("bookinfo", "reviews")
        + &service("bookinfo", "reviews-v1")
        + &service("bookinfo", "reviews-v2")
        + &kind_route(
            "GRPCRoute",
            "v1",
            "bookinfo",
            "echo",
            "2026-01-01T00:00:00Z",
            &spec,
        );
    let t = translate(&yaml);
    let vs = reviews_routes(&t);
    assert_eq!(
        vs.origin,
        VirtualServiceOrigin::GatewayRoutes(vec!["GRPCRoute bookinfo/echo".into()])
    );
    let order: Vec<String> = vs.http.iter().map(uri).collect();
    assert_eq!(
        order,
        [
            "exact /demo.Echo/Shout",
            "prefix /demo.Echo",
            "prefix /",
            // Regexes of equal kind: the longer first, as for paths.
            "regex /(?:demo\\..*)/(?:Get.*)",
            "regex /[^/]+/Ping",
        ],
        "{:?}",
        vs.http
    );
    assert_eq!(
        vs.http[0].name.as_deref(),
        Some("GRPCRoute:bookinfo/echo:1")
    );
    let regex = |i: usize, path: &str| match &vs.http[i].matches[0].uri {
        Some(ValueMatch::Regex(r)) => r.compiled.is_match(path),
        other => panic!("{other:?}"),
    };
    assert!(regex(4, "/demo.Echo/Ping") && !regex(4, "/demo.Echo/Pingx"));
    assert!(regex(3, "/demo.Echo/GetAll") && !regex(3, "/other.Echo/GetAll"));
    // What a GRPCRoute cannot say is refused with the field named.
    for (what, spec, field) in [
        (
            "redirect",
            format!(
                "{PARENT}  rules:\n  - filters: [{{type: RequestRedirect, requestRedirect: {{hostname: x}}}}]\n    backendRefs: [{{name: reviews-v1, port: 9080}}]\n"
            ),
            "spec.rules[0].filters[0].type",
        ),
        (
            "empty method",
            format!("{PARENT}  rules:\n  - matches: [{{method: {{}}}}]\n"),
            "spec.rules[0].matches[0].method",
        ),
        (
            "bad service",
            format!("{PARENT}  rules:\n  - matches: [{{method: {{service: 'demo/Echo'}}}}]\n"),
            "spec.rules[0].matches[0].method.service",
        ),
        (
            "bad type",
            format!(
                "{PARENT}  rules:\n  - matches: [{{method: {{type: Prefix, service: demo.Echo}}}}]\n"
            ),
            "spec.rules[0].matches[0].method.type",
        ),
    ] {
        let yaml = service("bookinfo", "reviews")
            + &kind_route(
                "GRPCRoute",
                "v1",
                "bookinfo",
                "bad",
                "2026-01-01T00:00:00Z",
                &spec,
            );
        assert_refused(&yaml, field, what);
    }
}

/// GEP-1294 "Route types": of routes of different types on one Service port, GRPCRoute wins
/// over HTTPRoute, which wins over TCPRoute; the loser is `Conflicted` and not applied. Routes
/// on different ports of the Service do not conflict.
#[test]
fn route_types_on_one_service_port_conflict() {
    let backend = "  rules:\n  - backendRefs: [{name: reviews-v1, port: 9080}]\n";
    let yaml = service("bookinfo", "reviews")
        + &service("bookinfo", "reviews-v1")
        + &route(
            "bookinfo",
            "web",
            "2026-01-01T00:00:00Z",
            &format!("{PARENT}{backend}"),
        )
        + &kind_route(
            "GRPCRoute",
            "v1",
            "bookinfo",
            "rpc",
            "2026-02-01T00:00:00Z",
            &format!("  parentRefs: [{{group: \"\", kind: Service, name: reviews}}]\n{backend}"),
        )
        + &kind_route(
            "TCPRoute",
            "v1alpha2",
            "bookinfo",
            "raw",
            "2026-01-01T00:00:00Z",
            &format!(
                "  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 9080}}]\n{backend}"
            ),
        );
    let t = translate(&yaml);
    let vs = reviews_routes(&t);
    assert_eq!(
        vs.origin,
        VirtualServiceOrigin::GatewayRoutes(vec!["GRPCRoute bookinfo/rpc".into()])
    );
    assert!(vs.tcp.is_empty());
    let resolved = ("ResolvedRefs", "True", "ResolvedRefs");
    assert_eq!(
        conditions(&t, "web"),
        [("Accepted", "False", "Conflicted"), resolved]
    );
    assert_eq!(
        conditions(&t, "raw"),
        [("Accepted", "False", "Conflicted"), resolved]
    );
    assert_eq!(conditions(&t, "rpc")[0], ("Accepted", "True", "Accepted"));
    // An HTTPRoute on port 9080 and a TCPRoute on another port both apply.
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec: {ports: [{port: 9080, name: http}, {port: 5432, name: tcp}]}\n---\n".to_owned()
        + &service("bookinfo", "reviews-v1")
        + &route("bookinfo", "web", "2026-01-01T00:00:00Z", &format!("{PARENT}{backend}"))
        + &kind_route(
            "TCPRoute",
            "v1alpha2",
            "bookinfo",
            "db",
            "2026-01-01T00:00:00Z",
            "  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 5432}]\n  rules:\n  - backendRefs: [{name: reviews-v1, port: 5432}]\n",
        );
    let t = translate(&yaml);
    let vs = reviews_routes(&t);
    assert_eq!(vs.http.len(), 1);
    assert_eq!(vs.tcp.len(), 1);
    assert_eq!(vs.tcp[0].matches[0].port, Some(5432));
    assert_eq!(conditions(&t, "db")[0], ("Accepted", "True", "Accepted"));
}

/// A TCPRoute on a Service: weighted backends at its waypoint; an unresolvable backend or one
/// of another namespace without a ReferenceGrant *for TCPRoutes* refuses its share; a rule
/// with no backend of weight > 0 refuses every connection.
#[test]
fn tcp_route_on_a_service_splits_connections() {
    let parent = "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n";
    let tcp = |name: &str, rules: &str| {
        kind_route(
            "TCPRoute",
            "v1alpha2",
            "bookinfo",
            name,
            "2026-01-01T00:00:00Z",
            &format!("{parent}  rules:\n{rules}"),
        )
    };
    let base = service("bookinfo", "reviews")
        + &service("bookinfo", "reviews-v1")
        + &service("other", "ratings");
    let t = translate(
        &(base.clone()
            + &tcp(
                "split",
                "  - backendRefs:\n    - {name: reviews-v1, port: 9080, weight: 80}\n    - {name: ratings, namespace: other, port: 9080, weight: 20}\n    - {name: idle, port: 9080, weight: 0}\n",
            )),
    );
    let vs = reviews_routes(&t);
    assert!(vs.http.is_empty());
    assert_eq!(vs.tcp.len(), 1);
    assert!(vs.tcp[0].matches.is_empty());
    let got: Vec<(&str, u32)> = vs.tcp[0]
        .route
        .iter()
        .map(|d| (d.destination.host.as_str(), d.weight))
        .collect();
    // No grant: the other namespace's share is refused (UNRESOLVED_BACKEND).
    assert_eq!(
        got,
        [
            ("reviews-v1.bookinfo.svc.cluster.local", 80),
            (UNRESOLVED_BACKEND, 20)
        ]
    );
    assert_eq!(
        conditions(&t, "split")[1],
        ("ResolvedRefs", "False", "RefNotPermitted")
    );
    // A grant for HTTPRoutes does not cover TCPRoutes; one for TCPRoutes does.
    let grant = |from_kind: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: other}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: bookinfo}}]\n  to: [{{group: \"\", kind: Service}}]\n---\n"
        )
    };
    let cross = tcp(
        "cross",
        "  - backendRefs: [{name: ratings, namespace: other, port: 9080}]\n",
    );
    for (from_kind, host) in [
        ("HTTPRoute", UNRESOLVED_BACKEND),
        ("TCPRoute", "ratings.other.svc.cluster.local"),
    ] {
        let t = translate(&(base.clone() + &grant(from_kind) + &cross));
        let vs = reviews_routes(&t);
        assert_eq!(vs.tcp[0].route[0].destination.host, host, "{from_kind}");
    }
    // Only weight 0: every connection is refused, never sent to the Service itself.
    let t = translate(
        &(base.clone()
            + &tcp(
                "zero",
                "  - backendRefs: [{name: reviews-v1, port: 9080, weight: 0}]\n",
            )),
    );
    let vs = reviews_routes(&t);
    assert_eq!(vs.tcp[0].route.len(), 1);
    assert_eq!(vs.tcp[0].route[0].destination.host, UNRESOLVED_BACKEND);
    // Refused with the field named: a second rule (nothing tells them apart), hostnames.
    for (spec, field) in [
        (
            format!(
                "{parent}  rules:\n  - backendRefs: [{{name: reviews-v1, port: 9080}}]\n  - backendRefs: [{{name: reviews-v1, port: 9080}}]\n"
            ),
            "spec.rules[1]",
        ),
        (
            format!(
                "{parent}  hostnames: [a.example.com]\n  rules:\n  - backendRefs: [{{name: reviews-v1, port: 9080}}]\n"
            ),
            "spec.hostnames",
        ),
        (format!("{parent}  rules: []\n"), "spec.rules"),
    ] {
        let yaml = base.clone()
            + &kind_route(
                "TCPRoute",
                "v1alpha2",
                "bookinfo",
                "bad",
                "2026-01-01T00:00:00Z",
                &spec,
            );
        assert_refused(&yaml, field, field);
    }
}

/// At an ingress Gateway: a TLSRoute attaches to a TLS Passthrough listener and routes by SNI
/// (its hostnames meeting the listener's), a TCPRoute to a TCP listener; each only where the
/// listener's kinds admit it. A TLSRoute on a Service is not applied (waypoints do not route by
/// SNI) and its status says so.
#[test]
fn tls_and_tcp_routes_attach_to_ingress_listeners() {
    let gateway = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: bookinfo}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - {name: tls, port: 443, protocol: TLS, hostname: '*.example.com', tls: {mode: Passthrough}}\n  - {name: db, port: 5432, protocol: TCP}\n  - {name: web, port: 80, protocol: HTTP}\n---\n";
    let base = service("bookinfo", "reviews") + &service("bookinfo", "reviews-v1") + gateway;
    let tls = kind_route(
        "TLSRoute",
        "v1alpha3",
        "bookinfo",
        "sni",
        "2026-01-01T00:00:00Z",
        "  parentRefs: [{name: edge, sectionName: tls}]\n  hostnames: [shop.example.com, other.net]\n  rules:\n  - backendRefs: [{name: reviews-v1, port: 8443}]\n",
    );
    let tcp = kind_route(
        "TCPRoute",
        "v1alpha2",
        "bookinfo",
        "pg",
        "2026-01-01T00:00:00Z",
        "  parentRefs: [{name: edge}]\n  rules:\n  - backendRefs: [{name: reviews, port: 5432}]\n",
    );
    let t = translate(&(base.clone() + &tls + &tcp));
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let listener = |name: &str| {
        t.state
            .gateway_virtual_services
            .get(&format!("bookinfo/edge:{name}"))
            .unwrap_or_else(|| panic!("{name}: {:?}", t.state.gateway_virtual_services.keys()))
    };
    let sni = listener("tls");
    assert_eq!(sni.len(), 1, "{sni:?}");
    assert_eq!(sni[0].hosts, ["shop.example.com"]);
    assert_eq!(sni[0].tls[0].matches[0].sni_hosts, ["shop.example.com"]);
    assert_eq!(
        sni[0].tls[0].route[0].destination.host,
        "reviews-v1.bookinfo.svc.cluster.local"
    );
    // The TCPRoute names no section: it attaches where its kind is admitted, the TCP listener.
    let db = listener("db");
    assert_eq!(db[0].tcp.len(), 1);
    assert_eq!(db[0].tcp[0].route[0].destination.port, Some(5432));
    assert!(
        !t.state
            .gateway_virtual_services
            .contains_key("bookinfo/edge:web")
    );
    assert_eq!(conditions(&t, "sni")[0], ("Accepted", "True", "Accepted"));
    assert_eq!(conditions(&t, "pg")[0], ("Accepted", "True", "Accepted"));
    // A TCPRoute on the HTTP listener only: not allowed by it.
    let t = translate(
        &(base.clone()
            + &kind_route(
                "TCPRoute",
                "v1alpha2",
                "bookinfo",
                "wrong",
                "2026-01-01T00:00:00Z",
                "  parentRefs: [{name: edge, sectionName: web}]\n  rules:\n  - backendRefs: [{name: reviews, port: 80}]\n",
            )),
    );
    assert_eq!(
        conditions(&t, "wrong")[0],
        ("Accepted", "False", "NotAllowedByListeners")
    );
    // A TLSRoute on a Service.
    let t = translate(
        &(base
            + &kind_route(
                "TLSRoute",
                "v1alpha2",
                "bookinfo",
                "mesh",
                "2026-01-01T00:00:00Z",
                &format!("{PARENT}  rules:\n  - backendRefs: [{{name: reviews-v1, port: 9080}}]\n"),
            )),
    );
    assert_eq!(
        conditions(&t, "mesh")[0],
        ("Accepted", "False", "UnsupportedValue")
    );
    assert!(
        t.state
            .virtual_services
            .iter()
            .all(|vs| vs.hosts != [REVIEWS])
    );
    // allowedRoutes naming a kind the protocol cannot carry is refused.
    let t = translate(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: bookinfo}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - {name: web, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: TCPRoute}]}}\n---\n",
    );
    let m = messages(&t).join("\n");
    assert!(
        m.contains("spec.listeners[0].allowedRoutes.kinds[0]")
            && m.contains("HTTPRoute, GRPCRoute"),
        "{m}"
    );
}

/// The yaml_translate fuzz seed with every route kind is valid as a whole (so the fuzzer starts
/// from objects that get past validation) and attaches where it says.
#[test]
fn the_route_kinds_fuzz_seed_translates_cleanly() {
    let t = translate(include_str!(
        "../../../../fuzz/corpus/yaml_translate/gateway_api_l4_grpc_routes.yaml"
    ));
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let echo = t
        .state
        .virtual_services
        .iter()
        .find(|vs| vs.hosts == ["echo.demo.svc.cluster.local"])
        .expect("routes for echo");
    assert_eq!(echo.http.len(), 2);
    assert_eq!(echo.tcp.len(), 1);
    for listener in ["tls", "tcp", "web"] {
        assert!(
            t.state
                .gateway_virtual_services
                .contains_key(&format!("demo/edge:{listener}")),
            "{listener}"
        );
    }
    assert!(
        t.state
            .route_statuses
            .iter()
            .all(|s| s.parents.iter().all(|p| p.conditions[0].status == "True"))
    );
}

/// The experimental `retry` (GEP-1731) and `CORS` filter (GEP-1767) become the route's retry
/// policy and CORS policy; what they cannot say is refused with the field named.
#[test]
fn retry_and_cors_of_the_experimental_channel() {
    let spec = format!(
        "{PARENT}  rules:\n  - retry: {{attempts: 4, codes: [500, 503], backoff: 100ms}}\n    timeouts: {{backendRequest: 2s}}\n    filters:\n    - type: CORS\n      cors: {{allowOrigins: ['https://*.example.com', 'http://app.test:8080'], allowMethods: [GET, POST], allowHeaders: [x-a], exposeHeaders: [x-b], allowCredentials: true, maxAge: 60}}\n    backendRefs: [{{name: reviews-v1, port: 9080}}]\n  - backendRefs: [{{name: reviews-v1, port: 9080}}]\n"
    );
    let yaml = service("bookinfo", "reviews")
        + &service("bookinfo", "reviews-v1")
        + &route("bookinfo", "r", "2026-01-01T00:00:00Z", &spec);
    let t = translate(&yaml);
    let vs = reviews_routes(&t);
    let retries = &vs.http[0].retries;
    assert_eq!(retries.attempts, 4);
    assert_eq!(retries.retry_on.status_codes, [500, 503]);
    assert!(
        retries
            .retry_on
            .conditions
            .contains(&RetryCondition::RetriableStatusCodes)
    );
    assert_eq!(retries.backoff, Some(Duration::from_millis(100)));
    assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(2)));
    // The rule without `retry` keeps Istio's default policy.
    assert_eq!(vs.http[1].retries, RetryPolicy::istio_default());
    let cors = vs.http[0].cors.as_ref().expect("a CORS policy");
    let allowed = |origin: &str| {
        cors.allow_origins.iter().any(|m| match m {
            ValueMatch::Exact(e) => e == origin,
            ValueMatch::Regex(r) => r.compiled.is_match(origin),
            _ => false,
        })
    };
    assert!(allowed("https://shop.example.com") && allowed("https://a.b.example.com"));
    assert!(!allowed("https://example.com") && !allowed("http://shop.example.com"));
    assert!(allowed("http://app.test:8080") && !allowed("http://app.test"));
    assert_eq!(cors.max_age, Some(Duration::from_secs(60)));
    assert_eq!(cors.allow_credentials, Some(true));
    assert!(vs.http[1].cors.is_none());
    for (rule, field) in [
        ("retry: {attempts: -1}", "spec.rules[0].retry.attempts"),
        ("retry: {codes: [200]}", "spec.rules[0].retry.codes[0]"),
        ("retry: {backoff: soon}", "spec.rules[0].retry.backoff"),
        (
            "filters: [{type: CORS, cors: {allowOrigins: ['example.com']}}]",
            "spec.rules[0].filters[0].cors.allowOrigins[0]",
        ),
        (
            "filters: [{type: CORS, cors: {allowOrigins: ['https://a.*.com']}}]",
            "spec.rules[0].filters[0].cors.allowOrigins[0]",
        ),
    ] {
        let spec = format!(
            "{PARENT}  rules:\n  - {rule}\n    backendRefs: [{{name: reviews-v1, port: 9080}}]\n"
        );
        let yaml = service("bookinfo", "reviews")
            + &route("bookinfo", "bad", "2026-01-01T00:00:00Z", &spec);
        assert_refused(&yaml, field, rule);
    }
}
