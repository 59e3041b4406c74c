use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use mesh::identity::Identity;
use mesh::model::*;

use super::filters::*;
use super::matcher::*;
use super::retry::*;
use super::table::*;
use super::{cors, grpc};
use crate::request::SourceInfo;

// ---------------------------------------------------------------- builders

const NS: &str = "demo";

fn host(name: &str) -> String {
    format!("{name}.{NS}.svc.cluster.local")
}

fn service(name: &str) -> Arc<Service> {
    Arc::new(Service {
        name: name.into(),
        namespace: NS.into(),
        hostname: host(name),
        vips: vec![],
        ports: vec![],
        endpoints: vec![],
        labels: BTreeMap::new(),
        waypoint: None,
    })
}

fn key(name: &str) -> String {
    format!("{NS}/{name}")
}

fn dest(service: &str, subset: Option<&str>, weight: u32) -> RouteDestination {
    RouteDestination {
        destination: Destination {
            host: host(service),
            subset: subset.map(Into::into),
            port: None,
        },
        weight,
        headers: HeaderOperations::default(),
    }
}

fn route(matches: Vec<HttpMatch>, destinations: Vec<RouteDestination>) -> HttpRoute {
    HttpRoute {
        name: None,
        matches,
        action: HttpAction::Route(destinations),
        rewrite: None,
        timeout: None,
        retries: default_retry_policy(),
        fault: None,
        mirrors: vec![],
        cors: None,
        headers: HeaderOperations::default(),
    }
}

fn named(mut r: HttpRoute, name: &str) -> HttpRoute {
    r.name = Some(name.into());
    r
}

fn vs(name: &str, hosts: &[&str], http: Vec<HttpRoute>) -> Arc<VirtualService> {
    Arc::new(VirtualService {
        name: name.into(),
        namespace: NS.into(),
        hosts: hosts.iter().map(|h| host(h)).collect(),
        http,
        tcp: vec![],
        tls: vec![],
        created: None,
        origin: Default::default(),
    })
}

fn state(services: &[&str], virtual_services: Vec<Arc<VirtualService>>) -> State {
    State {
        services: services.iter().map(|s| (key(s), service(s))).collect(),
        virtual_services,
        ..State::default()
    }
}

fn exact(s: &str) -> ValueMatch {
    ValueMatch::Exact(s.into())
}

fn prefix(s: &str) -> ValueMatch {
    ValueMatch::Prefix(s.into())
}

fn regex(s: &str) -> ValueMatch {
    ValueMatch::Regex(Regex::full_match(s).unwrap())
}

fn uri(m: ValueMatch) -> HttpMatch {
    HttpMatch {
        uri: Some(m),
        ..HttpMatch::default()
    }
}

fn named_match(name: &str, value: Option<ValueMatch>) -> NamedMatch {
    NamedMatch {
        name: name.into(),
        value,
    }
}

fn header(name: &str, value: Option<ValueMatch>) -> HttpMatch {
    HttpMatch {
        headers: vec![named_match(name, value)],
        ..HttpMatch::default()
    }
}

/// A request as hyper hands it over (HTTP/1.1 origin form: authority in `Host`).
fn request(method: Method, target: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "reviews:9080");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn get(target: &str) -> http::request::Parts {
    request(Method::GET, target, &[])
}

fn rng() -> fastrand::Rng {
    fastrand::Rng::with_seed(7)
}

fn no_source() -> SourceInfo {
    SourceInfo::default()
}

fn source(namespace: &str, labels: &[(&str, &str)]) -> SourceInfo {
    let identity = Identity::new("cluster.local", namespace, "sleep").unwrap();
    let workload = Workload {
        uid: format!("{namespace}/sleep-1"),
        name: "sleep-1".into(),
        namespace: namespace.into(),
        ips: vec!["10.0.0.9".parse().unwrap()],
        node: "node-a".into(),
        service_account: "sleep".into(),
        identity: identity.clone(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        enrolled: true,
        workload_name: "sleep".into(),
        workload_kind: "deployment".into(),
        canonical_service: "sleep".into(),
        canonical_revision: "latest".into(),
        named_ports: BTreeMap::new(),
    };
    SourceInfo::new(
        Some(identity),
        Some("10.0.0.9".parse().unwrap()),
        Some(Arc::new(workload)),
    )
}

/// The subset the table sends `parts` to (`"-"` for no subset, `None` for no route).
fn subset_for(
    table: &RouteTable,
    parts: &http::request::Parts,
    src: &SourceInfo,
) -> Option<String> {
    let view = RequestView::from_parts(parts, 9080);
    let selected = table.select_http(&key("reviews"), &view, src, &mut rng())?;
    Some(
        selected
            .destination()
            .and_then(|d| d.destination.subset.clone())
            .unwrap_or_else(|| "-".into()),
    )
}

/// One route per subset, in order, each with its `match`; the last one unconditional to v1.
fn reviews_table(conditions: Vec<(HttpMatch, &str)>) -> RouteTable {
    let mut http: Vec<_> = conditions
        .into_iter()
        .map(|(m, subset)| route(vec![m], vec![dest("reviews", Some(subset), 100)]))
        .collect();
    http.push(route(vec![], vec![dest("reviews", Some("v1"), 100)]));
    RouteTable::build(&state(
        &["reviews"],
        vec![vs("reviews", &["reviews"], http)],
    ))
}

// ---------------------------------------------------------------- table

#[test]
fn service_without_virtual_service_gets_the_default_route() {
    let table = RouteTable::build(&state(&["reviews", "ratings"], vec![]));
    let view_parts = get("/anything?x=1");
    let view = RequestView::from_parts(&view_parts, 9080);
    let selected = table
        .select_http(&key("ratings"), &view, &no_source(), &mut rng())
        .unwrap();
    assert_eq!(selected.virtual_service, None);
    assert_eq!(selected.name(), Some(DEFAULT_ROUTE_NAME));
    assert_eq!(selected.index, 0);
    let d = selected.destination().unwrap();
    assert_eq!(d.destination.host, host("ratings"));
    assert_eq!(d.destination.subset, None);
    assert_eq!(d.destination.port, None);
    assert_eq!(selected.route.timeout, None);
    assert_eq!(selected.route.retries.attempts, 2);
    assert_eq!(
        selected.route.retries.retry_on.conditions,
        vec![
            RetryCondition::ConnectFailure,
            RetryCondition::RefusedStream,
            RetryCondition::GrpcUnavailable,
            RetryCondition::GrpcCancelled,
            RetryCondition::RetriableStatusCodes,
        ]
    );
    assert_eq!(selected.route.retries.retry_on.status_codes, vec![503]);
    assert!(table.conflicts().is_empty());
    assert!(
        table
            .select_http("demo/nope", &view, &no_source(), &mut rng())
            .is_none()
    );
}

#[test]
fn virtual_service_applies_to_each_of_its_hosts() {
    let table = RouteTable::build(&state(
        &["reviews", "ratings", "details"],
        vec![vs(
            "both",
            &["reviews", "ratings"],
            vec![route(vec![], vec![dest("reviews", Some("v3"), 100)])],
        )],
    ));
    assert_eq!(
        table
            .service(&key("reviews"))
            .unwrap()
            .virtual_service
            .as_deref(),
        Some("demo/both")
    );
    assert_eq!(
        table
            .service(&key("ratings"))
            .unwrap()
            .virtual_service
            .as_deref(),
        Some("demo/both")
    );
    assert_eq!(
        table.service(&key("details")).unwrap().virtual_service,
        None
    );
}

#[test]
fn first_virtual_service_for_a_host_wins_and_the_later_one_is_a_conflict() {
    let older = vs(
        "older",
        &["reviews"],
        vec![route(vec![], vec![dest("reviews", Some("v1"), 100)])],
    );
    let newer = vs(
        "newer",
        &["reviews", "ratings"],
        vec![route(vec![], vec![dest("reviews", Some("v2"), 100)])],
    );
    let table = RouteTable::build(&state(&["reviews", "ratings"], vec![older, newer]));
    assert_eq!(
        table.conflicts(),
        &[Conflict {
            host: host("reviews"),
            winner: "demo/older".into(),
            shadowed: "demo/newer".into(),
            winner_is: "VirtualService demo/older".into(),
            shadowed_is: "VirtualService demo/newer".into(),
        }]
    );
    assert_eq!(
        subset_for(&table, &get("/"), &no_source()).as_deref(),
        Some("v1")
    );
    // The newer one still applies to the host nobody else claims.
    assert_eq!(
        table
            .service(&key("ratings"))
            .unwrap()
            .virtual_service
            .as_deref(),
        Some("demo/newer")
    );
}

#[test]
fn virtual_service_without_http_routes_leaves_http_on_the_default_route() {
    let mut only_tcp = (*vs("tcp-only", &["reviews"], vec![])).clone();
    only_tcp.tcp = vec![TcpRoute {
        matches: vec![],
        route: vec![dest("reviews", Some("v2"), 100)],
    }];
    let table = RouteTable::build(&state(&["reviews"], vec![Arc::new(only_tcp)]));
    assert_eq!(
        subset_for(&table, &get("/"), &no_source()).as_deref(),
        Some("-")
    );
}

#[test]
fn no_matching_route_is_none() {
    let table = RouteTable::build(&state(
        &["reviews"],
        vec![vs(
            "reviews",
            &["reviews"],
            vec![route(
                vec![uri(prefix("/api"))],
                vec![dest("reviews", None, 100)],
            )],
        )],
    ));
    assert_eq!(subset_for(&table, &get("/web"), &no_source()), None);
}

#[test]
fn end_user_jason_goes_to_v2_everyone_else_to_v1() {
    let table = reviews_table(vec![(header("end-user", Some(exact("jason"))), "v2")]);
    let jason = request(Method::GET, "/reviews/0", &[("end-user", "jason")]);
    let other = request(Method::GET, "/reviews/0", &[("end-user", "json")]);
    assert_eq!(
        subset_for(&table, &jason, &no_source()).as_deref(),
        Some("v2")
    );
    assert_eq!(
        subset_for(&table, &other, &no_source()).as_deref(),
        Some("v1")
    );
    assert_eq!(
        subset_for(&table, &get("/reviews/0"), &no_source()).as_deref(),
        Some("v1")
    );
}

#[test]
fn first_matching_route_wins() {
    let table = reviews_table(vec![
        (uri(prefix("/usrv")), "short"),
        (uri(prefix("/usrv-expand")), "long"),
    ]);
    assert_eq!(
        subset_for(&table, &get("/usrv-expand/x"), &no_source()).as_deref(),
        Some("short")
    );
    let view_parts = get("/usrv-expand/x");
    let view = RequestView::from_parts(&view_parts, 9080);
    let selected = table
        .select_http(&key("reviews"), &view, &no_source(), &mut rng())
        .unwrap();
    assert_eq!(selected.index, 0);
}

#[test]
fn any_match_entry_of_a_route_suffices() {
    let m = route(
        vec![uri(exact("/a")), uri(exact("/b"))],
        vec![dest("reviews", Some("v2"), 100)],
    );
    let table = RouteTable::build(&state(
        &["reviews"],
        vec![vs("reviews", &["reviews"], vec![named(m, "ab")])],
    ));
    assert_eq!(
        subset_for(&table, &get("/b"), &no_source()).as_deref(),
        Some("v2")
    );
    assert_eq!(subset_for(&table, &get("/c"), &no_source()), None);
}

#[test]
fn route_name_combines_route_and_match_names_as_istio() {
    let mut m = uri(prefix("/"));
    m.name = Some("all".into());
    let table = RouteTable::build(&state(
        &["reviews"],
        vec![vs(
            "reviews",
            &["reviews"],
            vec![named(route(vec![m], vec![dest("reviews", None, 1)]), "r")],
        )],
    ));
    let parts = get("/x");
    let view = RequestView::from_parts(&parts, 9080);
    let selected = table
        .select_http(&key("reviews"), &view, &no_source(), &mut rng())
        .unwrap();
    assert_eq!(selected.name(), Some("r"));
    assert_eq!(selected.route_name(), "r.all");
    assert_eq!(selected.virtual_service, Some("demo/reviews"));
}

fn share_of_v2(weights: (u32, u32), picks: usize) -> usize {
    let table = RouteTable::build(&state(
        &["reviews"],
        vec![vs(
            "reviews",
            &["reviews"],
            vec![route(
                vec![],
                vec![
                    dest("reviews", Some("v1"), weights.0),
                    dest("reviews", Some("v2"), weights.1),
                ],
            )],
        )],
    ));
    let parts = get("/");
    let view = RequestView::from_parts(&parts, 9080);
    let mut rng = fastrand::Rng::with_seed(42);
    (0..picks)
        .filter(|_| {
            let s = table
                .select_http(&key("reviews"), &view, &no_source(), &mut rng)
                .unwrap();
            s.destination().unwrap().destination.subset.as_deref() == Some("v2")
        })
        .count()
}

#[test]
fn fifty_fifty_split_is_fifty_percent_within_ten() {
    let v2 = share_of_v2((50, 50), 1000);
    assert!((400..=600).contains(&v2), "v2 got {v2} of 1000");
}

#[test]
fn ninety_ten_split_is_ninety_percent_within_three() {
    let v1 = 1000 - share_of_v2((90, 10), 1000);
    assert!((870..=930).contains(&v1), "v1 got {v1} of 1000");
}

#[test]
fn zero_weight_is_never_chosen_but_a_single_destination_always_is() {
    assert_eq!(share_of_v2((100, 0), 1000), 0);
    assert_eq!(share_of_v2((0, 100), 1000), 1000);
    let single = [dest("reviews", Some("v1"), 0)];
    assert_eq!(
        pick_weighted(&single, &mut rng())
            .unwrap()
            .destination
            .subset
            .as_deref(),
        Some("v1")
    );
    assert!(pick_weighted(&[], &mut rng()).is_none());
}

#[test]
fn redirect_and_direct_response_actions_are_selected() {
    let mut redirect = route(vec![uri(prefix("/old"))], vec![]);
    redirect.action = HttpAction::Redirect(Redirect {
        uri: Some("/new".into()),
        authority: None,
        port: None,
        scheme: None,
        code: 301,
    });
    let mut direct = route(vec![uri(prefix("/gone"))], vec![]);
    direct.action = HttpAction::DirectResponse(DirectResponse {
        status: 410,
        body: Some("gone".into()),
    });
    let table = RouteTable::build(&state(
        &["reviews"],
        vec![vs("reviews", &["reviews"], vec![redirect, direct])],
    ));
    let parts = get("/old/x");
    let view = RequestView::from_parts(&parts, 9080);
    let s = table
        .select_http(&key("reviews"), &view, &no_source(), &mut rng())
        .unwrap();
    assert!(matches!(s.action, SelectedAction::Redirect(r) if r.uri.as_deref() == Some("/new")));
    assert!(s.destination().is_none());
    let parts = get("/gone");
    let view = RequestView::from_parts(&parts, 9080);
    let s = table
        .select_http(&key("reviews"), &view, &no_source(), &mut rng())
        .unwrap();
    assert!(matches!(s.action, SelectedAction::DirectResponse(d) if d.status == 410));
}

// ---------------------------------------------------------------- match conditions

fn holds(m: &HttpMatch, parts: &http::request::Parts, src: &SourceInfo) -> bool {
    http_match_holds(m, &RequestView::from_parts(parts, 9080), src)
}

#[test]
fn uri_is_matched_without_the_query_string() {
    assert!(holds(&uri(exact("/a")), &get("/a?x=1"), &no_source()));
    assert!(!holds(&uri(exact("/a")), &get("/a/b"), &no_source()));
    assert!(holds(&uri(prefix("/a/")), &get("/a/b?c"), &no_source()));
    assert!(holds(
        &uri(regex("/a/[0-9]+")),
        &get("/a/12?x=y"),
        &no_source()
    ));
}

#[test]
fn regex_must_match_the_whole_value() {
    let m = uri(regex("/pr[1-3]/.*"));
    assert!(holds(&m, &get("/pr2/list"), &no_source()));
    assert!(!holds(&m, &get("/x/pr2/list"), &no_source()));
    assert!(!holds(
        &uri(regex("/api/v[0-9]+")),
        &get("/api/v1/extra"),
        &no_source()
    ));
    let h = header("user-agent", Some(regex(".*Firefox.*")));
    assert!(holds(
        &h,
        &request(Method::GET, "/", &[("user-agent", "Mozilla Firefox 1")]),
        &no_source()
    ));
    let h = header("user-agent", Some(regex("Firefox")));
    assert!(!holds(
        &h,
        &request(Method::GET, "/", &[("user-agent", "Mozilla Firefox 1")]),
        &no_source()
    ));
}

#[test]
fn ignore_uri_case_applies_to_exact_and_prefix() {
    let mut m = uri(prefix("/Ratings/V2/"));
    assert!(!holds(&m, &get("/ratings/v2/1"), &no_source()));
    m.ignore_uri_case = true;
    assert!(holds(&m, &get("/ratings/v2/1"), &no_source()));
    assert!(holds(&m, &get("/RATINGS/V2/1"), &no_source()));
    let mut m = uri(exact("/Login"));
    m.ignore_uri_case = true;
    assert!(holds(&m, &get("/LOGIN?next=/"), &no_source()));
    assert!(!holds(&m, &get("/LOGINS"), &no_source()));
    // Short paths and multi-byte characters do not trip the prefix comparison.
    let mut m = uri(prefix("/ééé"));
    m.ignore_uri_case = true;
    assert!(!holds(&m, &get("/"), &no_source()));
}

#[test]
fn method_scheme_authority_and_port() {
    let m = HttpMatch {
        method: Some(exact("POST")),
        ..HttpMatch::default()
    };
    assert!(holds(&m, &request(Method::POST, "/", &[]), &no_source()));
    assert!(!holds(&m, &get("/"), &no_source()));

    let m = HttpMatch {
        scheme: Some(exact("http")),
        authority: Some(prefix("reviews")),
        ..HttpMatch::default()
    };
    assert!(holds(&m, &get("/"), &no_source()));
    let m = HttpMatch {
        authority: Some(exact("reviews")),
        ..HttpMatch::default()
    };
    assert!(
        !holds(&m, &get("/"), &no_source()),
        "authority includes the port"
    );

    let m = HttpMatch {
        port: Some(9080),
        ..HttpMatch::default()
    };
    let parts = get("/");
    assert!(http_match_holds(
        &m,
        &RequestView::from_parts(&parts, 9080),
        &no_source()
    ));
    assert!(!http_match_holds(
        &m,
        &RequestView::from_parts(&parts, 8080),
        &no_source()
    ));
}

#[test]
fn http2_authority_comes_from_the_uri() {
    let parts = http::Request::builder()
        .uri("https://ratings.demo:443/x?y")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let view = RequestView::from_parts(&parts, 443);
    assert_eq!(view.authority, "ratings.demo:443");
    assert_eq!(view.scheme, "https");
    assert_eq!(view.path(), "/x");
    assert_eq!(view.query(), Some("y"));
}

#[test]
fn headers_presence_value_and_repeated_values() {
    let present = header("x-canary", None);
    assert!(holds(
        &present,
        &request(Method::GET, "/", &[("x-canary", "")]),
        &no_source()
    ));
    assert!(!holds(&present, &get("/"), &no_source()));
    let repeated = request(Method::GET, "/", &[("x-tag", "a"), ("x-tag", "b")]);
    assert!(holds(
        &header("x-tag", Some(exact("a,b"))),
        &repeated,
        &no_source()
    ));
    assert!(!holds(
        &header("x-tag", Some(exact("a"))),
        &repeated,
        &no_source()
    ));
    // Istio's cookie example.
    let cookie = header("cookie", Some(regex("^(.*?;)?(user=jason)(;.*)?$")));
    assert!(holds(
        &cookie,
        &request(Method::GET, "/", &[("cookie", "a=1;user=jason;b=2")]),
        &no_source()
    ));
    assert!(!holds(
        &cookie,
        &request(Method::GET, "/", &[("cookie", "user=jasonx")]),
        &no_source()
    ));
    // Pseudo-header names read the request line.
    assert!(holds(
        &header(":method", Some(exact("GET"))),
        &get("/"),
        &no_source()
    ));
}

#[test]
fn without_headers_holds_when_absent_or_not_matching() {
    let m = HttpMatch {
        without_headers: vec![named_match("x-debug", Some(exact("true")))],
        ..HttpMatch::default()
    };
    assert!(holds(&m, &get("/"), &no_source()));
    assert!(holds(
        &m,
        &request(Method::GET, "/", &[("x-debug", "false")]),
        &no_source()
    ));
    assert!(!holds(
        &m,
        &request(Method::GET, "/", &[("x-debug", "true")]),
        &no_source()
    ));

    let absent = HttpMatch {
        without_headers: vec![named_match("x-debug", None)],
        ..HttpMatch::default()
    };
    assert!(holds(&absent, &get("/"), &no_source()));
    assert!(!holds(
        &absent,
        &request(Method::GET, "/", &[("x-debug", "")]),
        &no_source()
    ));

    // Envoy treats a missing header as empty for inverted value matches: a pattern that
    // matches the empty string makes a request without the header fail the condition.
    let empty_matching = HttpMatch {
        without_headers: vec![named_match("x-debug", Some(regex(".*")))],
        ..HttpMatch::default()
    };
    assert!(!holds(&empty_matching, &get("/"), &no_source()));
}

#[test]
fn query_params_exact_regex_prefix_presence_decoded() {
    let q = |value| HttpMatch {
        query_params: vec![named_match("user", value)],
        ..HttpMatch::default()
    };
    assert!(holds(
        &q(Some(exact("jason"))),
        &get("/p?a=1&user=jason"),
        &no_source()
    ));
    assert!(!holds(
        &q(Some(exact("jason"))),
        &get("/p?user=jasonx"),
        &no_source()
    ));
    assert!(holds(
        &q(Some(regex("ja.*"))),
        &get("/p?user=jason"),
        &no_source()
    ));
    assert!(holds(
        &q(Some(prefix("ja"))),
        &get("/p?user=jason"),
        &no_source()
    ));
    assert!(holds(&q(None), &get("/p?user"), &no_source()));
    assert!(holds(&q(Some(exact(""))), &get("/p?user"), &no_source()));
    assert!(!holds(&q(None), &get("/p?users=1"), &no_source()));
    assert!(!holds(&q(None), &get("/p"), &no_source()));
    assert!(holds(
        &q(Some(exact("a b/c"))),
        &get("/p?user=a%20b%2Fc"),
        &no_source()
    ));
    // Only the first occurrence counts.
    assert!(!holds(
        &q(Some(exact("b"))),
        &get("/p?user=a&user=b"),
        &no_source()
    ));
}

#[test]
fn source_labels_and_namespace() {
    let m = HttpMatch {
        source_labels: [("app".to_string(), "sleep".to_string())].into(),
        ..HttpMatch::default()
    };
    let sleep = source("demo", &[("app", "sleep"), ("version", "v1")]);
    let other = source("demo", &[("app", "curl")]);
    assert!(holds(&m, &get("/"), &sleep));
    assert!(!holds(&m, &get("/"), &other));
    assert!(!holds(&m, &get("/"), &no_source()));

    let table = reviews_table(vec![(m, "v2")]);
    assert_eq!(subset_for(&table, &get("/"), &sleep).as_deref(), Some("v2"));
    assert_eq!(subset_for(&table, &get("/"), &other).as_deref(), Some("v1"));

    let ns = HttpMatch {
        source_namespace: Some("demo".into()),
        ..HttpMatch::default()
    };
    assert!(holds(&ns, &get("/"), &sleep));
    assert!(!holds(&ns, &get("/"), &source("other", &[])));
    assert!(!holds(&ns, &get("/"), &no_source()));
}

#[test]
fn percent_decoding_keeps_malformed_escapes() {
    assert_eq!(percent_decode("a%20b"), "a b");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%zz%4"), "%zz%4");
    assert_eq!(percent_decode("a+b"), "a+b");
    assert_eq!(
        parse_query("a=1&&b&c=%41"),
        vec![
            ("a".into(), "1".into()),
            ("b".into(), "".into()),
            ("c".into(), "A".into())
        ]
    );
}

// ---------------------------------------------------------------- tcp

#[test]
fn tcp_routes_by_port_and_subnet_else_the_service() {
    let mut v = (*vs("reviews", &["reviews"], vec![])).clone();
    v.tcp = vec![
        TcpRoute {
            matches: vec![L4Match {
                port: Some(27017),
                ..L4Match::default()
            }],
            route: vec![dest("mongo", Some("v2"), 100)],
        },
        TcpRoute {
            matches: vec![L4Match {
                destination_subnets: vec![IpBlock {
                    addr: "10.96.0.0".parse().unwrap(),
                    prefix: 16,
                }],
                source_labels: [("app".to_string(), "sleep".to_string())].into(),
                ..L4Match::default()
            }],
            route: vec![dest("reviews", Some("v3"), 100)],
        },
    ];
    let table = RouteTable::build(&state(&["reviews"], vec![Arc::new(v)]));
    let vip: IpAddr = "10.96.1.1".parse().unwrap();
    let elsewhere: IpAddr = "10.97.1.1".parse().unwrap();
    let sleep = source("demo", &[("app", "sleep")]);
    let pick = |port, src: &SourceInfo, ip| {
        table
            .select_tcp(&key("reviews"), port, src, ip, &mut rng())
            .map(|d| (d.destination.host.clone(), d.destination.subset.clone()))
    };
    assert_eq!(
        pick(27017, &no_source(), vip),
        Some((host("mongo"), Some("v2".into())))
    );
    assert_eq!(
        pick(9080, &sleep, vip),
        Some((host("reviews"), Some("v3".into())))
    );
    assert_eq!(pick(9080, &no_source(), vip), Some((host("reviews"), None)));
    assert_eq!(pick(9080, &sleep, elsewhere), Some((host("reviews"), None)));
    assert_eq!(
        table.select_tcp("demo/unknown", 1, &sleep, vip, &mut rng()),
        None
    );
}

#[test]
fn tcp_weights_are_honoured() {
    let mut v = (*vs("reviews", &["reviews"], vec![])).clone();
    v.tcp = vec![TcpRoute {
        matches: vec![],
        route: vec![
            dest("reviews", Some("v1"), 80),
            dest("reviews", Some("v2"), 20),
        ],
    }];
    let table = RouteTable::build(&state(&["reviews"], vec![Arc::new(v)]));
    let mut rng = fastrand::Rng::with_seed(3);
    let ip: IpAddr = "10.96.1.1".parse().unwrap();
    let v2 = (0..1000)
        .filter(|_| {
            table
                .select_tcp(&key("reviews"), 9080, &no_source(), ip, &mut rng)
                .unwrap()
                .destination
                .subset
                .as_deref()
                == Some("v2")
        })
        .count();
    assert!((170..=230).contains(&v2), "v2 got {v2}");
}

// ---------------------------------------------------------------- rewrite and headers

fn selected_for<'t>(table: &'t RouteTable, parts: &http::request::Parts) -> Selected<'t> {
    let view = RequestView::from_parts(parts, 9080);
    table
        .select_http(&key("reviews"), &view, &no_source(), &mut rng())
        .unwrap()
}

fn table_with(r: HttpRoute) -> RouteTable {
    RouteTable::build(&state(
        &["reviews"],
        vec![vs("reviews", &["reviews"], vec![r])],
    ))
}

fn rewrite(uri: Option<&str>, authority: Option<&str>, uri_regex: Option<(&str, &str)>) -> Rewrite {
    Rewrite {
        uri: uri.map(Into::into),
        authority: authority.map(Into::into),
        uri_regex: uri_regex.map(|(re, sub)| (Regex::full_match(re).unwrap(), sub.to_owned())),
    }
}

#[test]
fn prefix_rewrite_keeps_the_rest_of_the_path_and_the_query() {
    let mut r = route(vec![uri(prefix("/api/v1"))], vec![dest("reviews", None, 1)]);
    r.rewrite = Some(rewrite(Some("/v2"), None, None));
    let table = table_with(r);
    let mut parts = get("/api/v1/users/7?expand=true");
    selected_for(&table, &parts)
        .apply_request_filters(&mut parts)
        .unwrap();
    assert_eq!(parts.uri, "/v2/users/7?expand=true");
}

#[test]
fn exact_and_regex_rewrite_replace_the_whole_path_but_keep_the_query() {
    let m = HttpMatch {
        uri: Some(exact("/login")),
        ..HttpMatch::default()
    };
    assert_eq!(
        rewrite_path("/login?next=/a", "/auth/login", Some(&m)),
        "/auth/login?next=/a"
    );
    let m = uri(regex("/pr[1-3]/.*"));
    assert_eq!(
        rewrite_path("/pr2/x?y", "/prod/list", Some(&m)),
        "/prod/list?y"
    );
    // No uri condition: Istio's route is `prefix: /`, so `/` is what gets replaced.
    assert_eq!(rewrite_path("/foo", "/bar/", None), "/bar/foo");
    assert_eq!(
        rewrite_path("/foo", "/bar/", Some(&header("x", None))),
        "/bar/foo"
    );
    // Case-insensitive prefix: the matched length is replaced.
    let mut m = uri(prefix("/API"));
    m.ignore_uri_case = true;
    assert_eq!(rewrite_path("/api/x", "/v2", Some(&m)), "/v2/x");
}

#[test]
fn uri_regex_rewrite_substitutes_groups_everywhere_and_keeps_the_query() {
    let mut r = route(
        vec![uri(prefix("/service"))],
        vec![dest("reviews", None, 1)],
    );
    r.rewrite = Some(rewrite(
        None,
        None,
        Some((r"^/service/([^/]+)(/.*)$", r"\2/instance/\1")),
    ));
    let table = table_with(r);
    let mut parts = get("/service/foo/v1/api?q=1");
    selected_for(&table, &parts)
        .apply_request_filters(&mut parts)
        .unwrap();
    assert_eq!(parts.uri, "/v1/api/instance/foo?q=1");

    // Unanchored patterns replace every occurrence, as Envoy's regex_rewrite.
    let re = regex::Regex::new("o").unwrap();
    assert_eq!(regex_rewrite_path("/foo/boo?o=o", &re, "0"), "/f00/b00?o=o");

    let mut r = route(vec![], vec![dest("reviews", None, 1)]);
    r.rewrite = Some(rewrite(None, None, Some(("o", "0"))));
    let table = table_with(r);
    assert_eq!(
        selected_for(&table, &get("/foo")).rewritten_path("/foo?o"),
        Some("/f00?o".into())
    );
}

#[test]
fn re2_substitution_becomes_regex_crate_syntax() {
    assert_eq!(
        translate_substitution(r"\2/instance/\1"),
        "${2}/instance/${1}"
    );
    assert_eq!(translate_substitution(r"/\10"), "/${1}0");
    assert_eq!(translate_substitution(r"/a$b\\c\"), "/a$$b\\c\\");
    let re = regex::Regex::new("^/(a)(b)$").unwrap();
    assert_eq!(
        re.replace_all("/ab", translate_substitution(r"/\2\1$x").as_str()),
        "/ba$x"
    );
}

#[test]
fn authority_rewrite_sets_host_and_uri_authority() {
    let mut r = route(vec![], vec![dest("reviews", None, 1)]);
    r.rewrite = Some(rewrite(None, Some("new.example.com"), None));
    let table = table_with(r);
    let mut parts = get("/x");
    selected_for(&table, &parts)
        .apply_request_filters(&mut parts)
        .unwrap();
    assert_eq!(parts.headers["host"], "new.example.com");
    assert_eq!(parts.uri, "/x");

    let mut h2 = http::Request::builder()
        .uri("http://reviews:9080/x?y")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    selected_for(&table, &h2)
        .apply_request_filters(&mut h2)
        .unwrap();
    assert_eq!(h2.uri, "http://new.example.com/x?y");
    assert!(!h2.headers.contains_key("host"));
}

fn edits(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderEdits {
    let pairs = |l: &[(&str, &str)]| {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    HeaderEdits {
        set: pairs(set),
        add: pairs(add),
        remove: remove.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn header_edits_set_replaces_add_appends_remove_deletes() {
    let mut headers = HeaderMap::new();
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    headers.insert("x-b", HeaderValue::from_static("1"));
    headers.insert("x-gone", HeaderValue::from_static("1"));
    let e = edits(
        &[("x-a", "set")],
        &[("x-b", "2"), ("x-new", "n")],
        &["x-gone"],
    );
    apply_header_edits(&mut headers, &[&e]);
    assert_eq!(headers.get_all("x-a").iter().collect::<Vec<_>>(), ["set"]);
    assert_eq!(
        headers.get_all("x-b").iter().collect::<Vec<_>>(),
        ["1", "2"]
    );
    assert_eq!(headers["x-new"], "n");
    assert!(!headers.contains_key("x-gone"));
}

#[test]
fn route_edits_then_destination_edits_and_removes_first() {
    let route_edits = edits(&[("x-who", "route")], &[("x-trace", "r")], &[]);
    let dest_edits = edits(&[("x-who", "destination")], &[], &["x-trace", "x-in"]);
    let mut headers = HeaderMap::new();
    headers.insert("x-in", HeaderValue::from_static("1"));
    apply_header_edits(&mut headers, &[&route_edits, &dest_edits]);
    assert_eq!(headers["x-who"], "destination");
    // Envoy removes before it adds, whatever layer the add comes from.
    assert_eq!(headers["x-trace"], "r");
    assert!(!headers.contains_key("x-in"));
}

#[test]
fn selected_applies_route_then_destination_request_and_response_edits() {
    let mut d = dest("reviews", Some("v2"), 1);
    d.headers.request = edits(&[("x-layer", "destination")], &[], &[]);
    d.headers.response = edits(&[], &[("x-resp", "destination")], &[]);
    let mut r = route(vec![], vec![d]);
    r.headers.request = edits(&[("x-layer", "route"), ("x-route", "1")], &[], &["cookie"]);
    r.headers.response = edits(&[("x-resp", "route")], &[], &["server"]);
    let table = table_with(r);
    let mut parts = request(Method::GET, "/", &[("cookie", "secret")]);
    let selected = selected_for(&table, &parts);
    selected.apply_request_filters(&mut parts).unwrap();
    assert_eq!(parts.headers["x-layer"], "destination");
    assert_eq!(parts.headers["x-route"], "1");
    assert!(!parts.headers.contains_key("cookie"));

    let mut response = HeaderMap::new();
    response.insert("server", HeaderValue::from_static("envoy"));
    selected.apply_response_headers(&mut response);
    assert_eq!(
        response.get_all("x-resp").iter().collect::<Vec<_>>(),
        ["route", "destination"]
    );
    assert!(!response.contains_key("server"));
}

#[test]
fn host_header_edit_is_an_authority_rewrite_and_rewrite_authority_wins() {
    let mut d = dest("reviews", None, 1);
    d.headers.request = edits(&[("host", "from-destination")], &[], &[]);
    let r = route(vec![], vec![d.clone()]);
    let table = table_with(r);
    let mut parts = get("/");
    selected_for(&table, &parts)
        .apply_request_filters(&mut parts)
        .unwrap();
    assert_eq!(parts.headers["host"], "from-destination");

    let mut r = route(vec![], vec![d.clone()]);
    r.headers.request = edits(&[(":authority", "from-route")], &[], &["host"]);
    let table = table_with(r);
    let mut parts = get("/");
    selected_for(&table, &parts)
        .apply_request_filters(&mut parts)
        .unwrap();
    assert_eq!(parts.headers["host"], "from-route");

    let mut r = route(vec![], vec![d]);
    r.headers.request = edits(&[("host", "from-route")], &[], &[]);
    r.rewrite = Some(rewrite(None, Some("from-rewrite"), None));
    let table = table_with(r);
    let mut parts = get("/");
    selected_for(&table, &parts)
        .apply_request_filters(&mut parts)
        .unwrap();
    assert_eq!(parts.headers["host"], "from-rewrite");
}

#[test]
fn invalid_rewrite_is_an_error_not_a_panic() {
    let mut r = route(vec![uri(prefix("/a"))], vec![dest("reviews", None, 1)]);
    r.rewrite = Some(rewrite(Some("/has space"), None, None));
    let table = table_with(r);
    let mut parts = get("/a/b");
    let err = selected_for(&table, &parts)
        .apply_request_filters(&mut parts)
        .unwrap_err();
    assert!(matches!(err, FilterError::InvalidPath { .. }), "{err}");
}

// ---------------------------------------------------------------- redirect, direct response

fn redirect(
    uri: Option<&str>,
    authority: Option<&str>,
    port: Option<RedirectPort>,
    scheme: Option<&str>,
) -> Redirect {
    Redirect {
        uri: uri.map(Into::into),
        authority: authority.map(Into::into),
        port,
        scheme: scheme.map(Into::into),
        code: 301,
    }
}

fn location(r: &Redirect, target: &str, host_header: &str) -> String {
    let parts = http::Request::builder()
        .uri(target)
        .header("host", host_header)
        .body(())
        .unwrap()
        .into_parts()
        .0;
    redirect_location(r, &RequestView::from_parts(&parts, 9080))
}

#[test]
fn redirect_location_keeps_the_query_unless_the_new_uri_has_one() {
    let r = redirect(
        Some("/v1/bookRatings"),
        Some("newratings.default.svc.cluster.local"),
        None,
        None,
    );
    assert_eq!(
        location(&r, "/v1/getProductRatings?id=1", "ratings:9080"),
        "http://newratings.default.svc.cluster.local/v1/bookRatings?id=1"
    );
    let r = redirect(Some("/new?fresh=1"), None, None, None);
    assert_eq!(
        location(&r, "/old?id=1", "ratings:9080"),
        "http://ratings:9080/new?fresh=1"
    );
    let r = redirect(None, Some("other"), None, None);
    assert_eq!(location(&r, "/keep?x", "ratings"), "http://other/keep?x");
    let r = redirect(Some("relative"), None, None, None);
    assert_eq!(location(&r, "/x", "ratings"), "http://ratings/relative");
}

#[test]
fn redirect_scheme_and_port() {
    // Scheme change drops the old scheme's default port.
    let https = redirect(None, None, None, Some("https"));
    assert_eq!(location(&https, "/a", "shop:80"), "https://shop/a");
    assert_eq!(location(&https, "/a", "shop:8080"), "https://shop:8080/a");
    // An explicit port replaces the request's; the scheme's default is not written.
    let r = redirect(None, None, Some(RedirectPort::Number(8443)), Some("https"));
    assert_eq!(location(&r, "/a", "shop:8080"), "https://shop:8443/a");
    let r = redirect(None, None, Some(RedirectPort::Number(443)), Some("https"));
    assert_eq!(location(&r, "/a", "shop:8080"), "https://shop/a");
    let r = redirect(None, None, Some(RedirectPort::FromRequestPort), None);
    assert_eq!(location(&r, "/a", "shop"), "http://shop:9080/a");
    let r = redirect(None, None, Some(RedirectPort::FromProtocolDefault), None);
    assert_eq!(location(&r, "/a", "shop:8080"), "http://shop/a");
    let r = redirect(None, Some("[::1]"), Some(RedirectPort::Number(81)), None);
    assert_eq!(location(&r, "/a", "x"), "http://[::1]:81/a");
    let r = redirect(None, None, Some(RedirectPort::Number(81)), None);
    assert_eq!(location(&r, "/a", "[::1]:8080"), "http://[::1]:81/a");
}

#[test]
fn redirect_response_has_code_and_location() {
    let mut r = redirect(Some("/new"), None, None, None);
    r.code = 308;
    let parts = get("/old");
    let response = redirect_response(&r, &RequestView::from_parts(&parts, 9080));
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(response.headers()["location"], "http://reviews:9080/new");
    assert!(response.body().is_empty());
}

#[test]
fn direct_response_status_and_body() {
    let response = direct_response(&DirectResponse {
        status: 503,
        body: Some("unavailable".into()),
    });
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.body().as_ref(), b"unavailable");
    assert_eq!(response.headers()["content-type"], "text/plain");
    let empty = direct_response(&DirectResponse {
        status: 204,
        body: None,
    });
    assert_eq!(empty.status(), StatusCode::NO_CONTENT);
    assert!(empty.body().is_empty());
    assert!(!empty.headers().contains_key("content-type"));
}

// ---------------------------------------------------------------- cors

fn cors_policy() -> CorsPolicy {
    CorsPolicy {
        allow_origins: vec![
            exact("https://example.com"),
            regex(r"https://.*\.example\.org"),
        ],
        allow_methods: vec!["POST".into(), "GET".into()],
        allow_headers: vec!["x-custom".into(), "content-type".into()],
        expose_headers: vec!["x-expose".into()],
        max_age: Some(Duration::from_secs(86400)),
        allow_credentials: Some(true),
    }
}

fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                http::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            )
        })
        .collect()
}

#[test]
fn cors_preflight_from_an_allowed_origin_is_answered() {
    let req = header_map(&[
        ("origin", "https://a.example.org"),
        ("access-control-request-method", "POST"),
    ]);
    let h = cors::preflight(&cors_policy(), &req, &Method::OPTIONS).unwrap();
    assert_eq!(h["access-control-allow-origin"], "https://a.example.org");
    assert_eq!(h["access-control-allow-methods"], "POST,GET");
    assert_eq!(h["access-control-allow-headers"], "x-custom,content-type");
    assert_eq!(h["access-control-max-age"], "86400");
    assert_eq!(h["access-control-allow-credentials"], "true");
}

#[test]
fn cors_preflight_from_a_disallowed_origin_or_not_a_preflight_is_forwarded() {
    let denied = header_map(&[
        ("origin", "https://evil.com"),
        ("access-control-request-method", "POST"),
    ]);
    assert!(cors::preflight(&cors_policy(), &denied, &Method::OPTIONS).is_none());
    let no_method = header_map(&[("origin", "https://example.com")]);
    assert!(cors::preflight(&cors_policy(), &no_method, &Method::OPTIONS).is_none());
    let allowed = header_map(&[
        ("origin", "https://example.com"),
        ("access-control-request-method", "POST"),
    ]);
    assert!(cors::preflight(&cors_policy(), &allowed, &Method::GET).is_none());
    assert!(cors::preflight(&cors_policy(), &header_map(&[]), &Method::OPTIONS).is_none());
}

#[test]
fn cors_star_methods_and_headers_echo_the_request() {
    let policy = CorsPolicy {
        allow_origins: vec![exact("*")],
        allow_methods: vec!["*".into()],
        allow_headers: vec!["*".into()],
        ..CorsPolicy::default()
    };
    let req = header_map(&[
        ("origin", "https://anyone.net"),
        ("access-control-request-method", "PATCH"),
        ("access-control-request-headers", "x-a,x-b"),
    ]);
    let h = cors::preflight(&policy, &req, &Method::OPTIONS).unwrap();
    assert_eq!(h["access-control-allow-origin"], "https://anyone.net");
    assert_eq!(h["access-control-allow-methods"], "PATCH");
    assert_eq!(h["access-control-allow-headers"], "x-a,x-b");
    assert!(!h.contains_key("access-control-allow-credentials"));
    assert!(!h.contains_key("access-control-max-age"));
}

#[test]
fn cors_response_headers_only_for_allowed_origins() {
    let allowed = header_map(&[("origin", "https://example.com")]);
    let h = cors::response_headers(&cors_policy(), &allowed);
    assert_eq!(h["access-control-allow-origin"], "https://example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-expose-headers"], "x-expose");
    assert!(!h.contains_key("access-control-allow-methods"));

    let denied = header_map(&[("origin", "https://example.com.evil")]);
    assert!(cors::response_headers(&cors_policy(), &denied).is_empty());
    assert!(cors::response_headers(&cors_policy(), &header_map(&[])).is_empty());

    let mut response = header_map(&[("access-control-allow-origin", "*"), ("x-keep", "1")]);
    cors::apply_response_headers(&cors_policy(), &allowed, &mut response);
    assert_eq!(
        response["access-control-allow-origin"],
        "https://example.com"
    );
    assert_eq!(response["x-keep"], "1");
}

// ---------------------------------------------------------------- fault, mirror

fn fault(delay_pct: f64, abort_pct: f64) -> Fault {
    Fault {
        delay: Some(FaultDelay {
            delay: Duration::from_secs(7),
            percentage: delay_pct,
        }),
        abort: Some(FaultAbort {
            status: AbortStatus::Http(500),
            percentage: abort_pct,
        }),
    }
}

fn fault_counts(f: &Fault) -> (usize, usize) {
    let mut rng = fastrand::Rng::with_seed(11);
    let decisions: Vec<_> = (0..1000).map(|_| decide_fault(f, &mut rng)).collect();
    (
        decisions.iter().filter(|d| d.delay.is_some()).count(),
        decisions.iter().filter(|d| d.abort.is_some()).count(),
    )
}

#[test]
fn fault_percentages_zero_fifty_hundred() {
    assert_eq!(fault_counts(&fault(0.0, 0.0)), (0, 0));
    assert_eq!(fault_counts(&fault(100.0, 100.0)), (1000, 1000));
    let (delays, aborts) = fault_counts(&fault(50.0, 50.0));
    assert!((440..=560).contains(&delays), "{delays} delays");
    assert!((440..=560).contains(&aborts), "{aborts} aborts");
    let (delays, _) = fault_counts(&fault(0.1, 0.0));
    assert!(delays <= 5, "{delays} delays at 0.1%");
    let d = decide_fault(&fault(100.0, 100.0), &mut rng());
    assert_eq!(
        d,
        FaultDecision {
            delay: Some(Duration::from_secs(7)),
            abort: Some(AbortStatus::Http(500)),
        }
    );
    assert_eq!(
        decide_fault(&Fault::default(), &mut rng()),
        FaultDecision::default()
    );
}

#[test]
fn abort_responses_for_http_and_grpc_clients() {
    let http_abort = abort_response(&AbortStatus::Http(503), false);
    assert_eq!(http_abort.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(http_abort.body().as_ref(), FAULT_ABORT_MESSAGE.as_bytes());

    let to_grpc_client = abort_response(&AbortStatus::Http(503), true);
    assert_eq!(to_grpc_client.status(), StatusCode::OK);
    assert_eq!(to_grpc_client.headers()["grpc-status"], "14");
    assert_eq!(to_grpc_client.headers()["content-type"], "application/grpc");

    let grpc_abort = abort_response(&AbortStatus::Grpc(grpc::code::PERMISSION_DENIED), true);
    assert_eq!(grpc_abort.status(), StatusCode::OK);
    assert_eq!(grpc_abort.headers()["grpc-status"], "7");
    assert_eq!(grpc_abort.headers()["grpc-message"], "fault filter abort");
    assert!(grpc_abort.body().is_empty());
}

#[test]
fn mirror_percentage() {
    let mirror = |percentage| Mirror {
        destination: Destination {
            host: host("shadow"),
            subset: None,
            port: None,
        },
        percentage,
    };
    let mut rng = rng();
    assert!((0..100).all(|_| should_mirror(&mirror(100.0), &mut rng)));
    assert!((0..100).all(|_| !should_mirror(&mirror(0.0), &mut rng)));
    let n = (0..1000)
        .filter(|_| should_mirror(&mirror(25.0), &mut rng))
        .count();
    assert!((200..=300).contains(&n), "{n}");
}

// ---------------------------------------------------------------- retry

fn on(conditions: &[RetryCondition], codes: &[u16]) -> RetryOn {
    RetryOn {
        conditions: conditions.to_vec(),
        status_codes: codes.to_vec(),
    }
}

fn status(s: u16) -> AttemptOutcome {
    AttemptOutcome::Response {
        status: s,
        grpc_status: None,
    }
}

fn grpc_status(g: u32) -> AttemptOutcome {
    AttemptOutcome::Response {
        status: 200,
        grpc_status: Some(g),
    }
}

const NO_RESPONSE: [AttemptOutcome; 4] = [
    AttemptOutcome::ConnectFailure,
    AttemptOutcome::Reset,
    AttemptOutcome::RefusedStream,
    AttemptOutcome::PerTryTimeout,
];

#[test]
fn retry_on_5xx() {
    let p = on(&[RetryCondition::FiveXx], &[]);
    for s in [500, 501, 502, 503, 504, 599] {
        assert!(is_retriable(&p, &status(s)), "{s}");
    }
    for s in [200, 404, 409, 429] {
        assert!(!is_retriable(&p, &status(s)), "{s}");
    }
    for o in NO_RESPONSE {
        assert!(is_retriable(&p, &o), "{o:?}");
    }
    assert!(!is_retriable(&p, &grpc_status(14)));
}

#[test]
fn retry_on_gateway_error() {
    let p = on(&[RetryCondition::GatewayError], &[]);
    for s in [502, 503, 504] {
        assert!(is_retriable(&p, &status(s)), "{s}");
    }
    for s in [500, 501, 505, 409] {
        assert!(!is_retriable(&p, &status(s)), "{s}");
    }
    for o in NO_RESPONSE {
        assert!(is_retriable(&p, &o), "{o:?}");
    }
}

#[test]
fn retry_on_reset() {
    let p = on(&[RetryCondition::Reset], &[]);
    for o in NO_RESPONSE {
        assert!(is_retriable(&p, &o), "{o:?}");
    }
    assert!(!is_retriable(&p, &status(503)));
}

#[test]
fn retry_on_connect_failure_and_refused_stream_only_their_own() {
    let p = on(&[RetryCondition::ConnectFailure], &[]);
    assert!(is_retriable(&p, &AttemptOutcome::ConnectFailure));
    for o in [
        AttemptOutcome::Reset,
        AttemptOutcome::RefusedStream,
        AttemptOutcome::PerTryTimeout,
        status(503),
    ] {
        assert!(!is_retriable(&p, &o), "{o:?}");
    }
    let p = on(&[RetryCondition::RefusedStream], &[]);
    assert!(is_retriable(&p, &AttemptOutcome::RefusedStream));
    for o in [
        AttemptOutcome::Reset,
        AttemptOutcome::ConnectFailure,
        AttemptOutcome::PerTryTimeout,
        status(503),
    ] {
        assert!(!is_retriable(&p, &o), "{o:?}");
    }
}

#[test]
fn retry_on_retriable_4xx_is_409_only() {
    let p = on(&[RetryCondition::Retriable4xx], &[]);
    assert!(is_retriable(&p, &status(409)));
    for s in [400, 404, 429, 503] {
        assert!(!is_retriable(&p, &status(s)), "{s}");
    }
    assert!(!is_retriable(&p, &AttemptOutcome::Reset));
}

#[test]
fn retry_on_retriable_status_codes_uses_the_list() {
    let p = on(&[RetryCondition::RetriableStatusCodes], &[503, 429]);
    assert!(is_retriable(&p, &status(503)));
    assert!(is_retriable(&p, &status(429)));
    assert!(!is_retriable(&p, &status(500)));
    assert!(!is_retriable(&p, &AttemptOutcome::ConnectFailure));
    // Codes without the token do nothing.
    assert!(!is_retriable(&on(&[], &[503]), &status(503)));
}

#[test]
fn retry_on_grpc_statuses() {
    use RetryCondition as C;
    let cases = [
        (C::GrpcCancelled, grpc::code::CANCELLED),
        (C::GrpcDeadlineExceeded, grpc::code::DEADLINE_EXCEEDED),
        (C::GrpcResourceExhausted, grpc::code::RESOURCE_EXHAUSTED),
        (C::GrpcUnavailable, grpc::code::UNAVAILABLE),
        (C::GrpcInternal, grpc::code::INTERNAL),
    ];
    for (condition, code) in cases {
        let p = on(&[condition], &[]);
        assert!(is_retriable(&p, &grpc_status(code)), "{condition:?}");
        for (_, other) in cases.iter().filter(|(c, _)| *c != condition) {
            assert!(
                !is_retriable(&p, &grpc_status(*other)),
                "{condition:?} vs {other}"
            );
        }
        assert!(!is_retriable(&p, &grpc_status(grpc::code::OK)));
        assert!(!is_retriable(&p, &status(503)));
        for o in NO_RESPONSE {
            assert!(!is_retriable(&p, &o), "{condition:?} {o:?}");
        }
    }
}

#[test]
fn istio_default_policy_decisions() {
    let p = default_retry_policy().retry_on;
    assert!(is_retriable(&p, &AttemptOutcome::ConnectFailure));
    assert!(is_retriable(&p, &AttemptOutcome::RefusedStream));
    assert!(is_retriable(&p, &status(503)));
    assert!(is_retriable(&p, &grpc_status(grpc::code::UNAVAILABLE)));
    assert!(is_retriable(&p, &grpc_status(grpc::code::CANCELLED)));
    assert!(!is_retriable(&p, &status(500)));
    assert!(!is_retriable(&p, &status(502)));
    assert!(!is_retriable(&p, &AttemptOutcome::Reset));
    assert!(!is_retriable(&p, &AttemptOutcome::PerTryTimeout));
}

#[test]
fn backoff_is_jittered_exponential_capped_at_250ms() {
    let mut rng = rng();
    let max_of = |retry, rng: &mut fastrand::Rng| {
        (0..2000)
            .map(|_| retry_backoff(retry, None, rng))
            .max()
            .unwrap()
    };
    let ms = Duration::from_millis;
    let first = max_of(1, &mut rng);
    assert!(first < ms(25) && first >= ms(20), "{first:?}");
    let second = max_of(2, &mut rng);
    assert!(second < ms(75) && second >= ms(65), "{second:?}");
    let third = max_of(3, &mut rng);
    assert!(third < ms(175) && third >= ms(160), "{third:?}");
    for retry in [4, 10, 64, u32::MAX] {
        let m = max_of(retry, &mut rng);
        assert!(m < ms(250) && m >= ms(230), "retry {retry}: {m:?}");
    }
    assert!(retry_backoff(0, None, &mut rng) < ms(25));
    // A route's own base (Gateway API `retry.backoff`): the ceiling is ten times it.
    let base = Some(ms(100));
    let first = (0..2000)
        .map(|_| retry_backoff(1, base, &mut rng))
        .max()
        .unwrap();
    assert!(first < ms(100) && first >= ms(90), "{first:?}");
    let late = (0..2000)
        .map(|_| retry_backoff(10, base, &mut rng))
        .max()
        .unwrap();
    assert!(late < ms(1000) && late >= ms(920), "{late:?}");
}

// ---------------------------------------------------------------- grpc

#[test]
fn grpc_request_detection() {
    let is = |ct: &'static str| grpc::is_grpc_request(&header_map(&[("content-type", ct)]));
    assert!(is("application/grpc"));
    assert!(is("application/grpc+proto"));
    assert!(!is("application/grpc-web"));
    assert!(!is("application/json"));
    assert!(!grpc::is_grpc_request(&HeaderMap::new()));
}

#[test]
fn grpc_trailers_only_and_local_replies() {
    let r = grpc::trailers_only(grpc::code::UNAVAILABLE, "no healthy upstream: 100%");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/grpc");
    assert_eq!(r.headers()["grpc-status"], "14");
    assert_eq!(r.headers()["grpc-message"], "no healthy upstream: 100%25");
    assert_eq!(grpc::grpc_status(r.headers()), Some(14));

    let plain = grpc::local_reply(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream request timeout",
        false,
    );
    assert_eq!(plain.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(plain.body().as_ref(), b"upstream request timeout");

    for (http, grpc_code) in [
        (400, 13),
        (401, 16),
        (403, 7),
        (404, 12),
        (429, 14),
        (502, 14),
        (503, 14),
        (504, 14),
        (500, 2),
    ] {
        assert_eq!(grpc::http_to_grpc_status(http), grpc_code, "{http}");
        let r = grpc::local_reply(StatusCode::from_u16(http).unwrap(), "x", true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(grpc::grpc_status(r.headers()), Some(grpc_code));
    }
    assert_eq!(grpc::encode_grpc_message("héllo\n"), "h%C3%A9llo%0A");
}

// ---------------------------------------------------------------- ingress: tcp and tls routes

fn gateway_vs(
    name: &str,
    ns: &str,
    hosts: &[&str],
    tcp: Vec<TcpRoute>,
    tls: Vec<TlsRoute>,
) -> Arc<VirtualService> {
    Arc::new(VirtualService {
        name: name.into(),
        namespace: ns.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        http: vec![],
        tcp,
        tls,
        created: None,
        origin: Default::default(),
    })
}

fn sni_route(sni: &[&str], to: &str) -> TlsRoute {
    TlsRoute {
        matches: vec![TlsMatch {
            sni_hosts: sni.iter().map(|s| s.to_string()).collect(),
            l4: L4Match::default(),
        }],
        route: vec![dest(to, None, 100)],
    }
}

fn scope(hosts: &[(&str, Option<&str>)], passthrough: bool) -> ServerScope {
    ServerScope {
        servers: vec![ScopedServer {
            gateway: "istio-ingress/gw".into(),
            hosts: hosts
                .iter()
                .map(|(h, ns)| ServerHost {
                    namespace: ns.map(Into::into),
                    host: (*h).into(),
                })
                .collect(),
            https_redirect: false,
            passthrough,
        }],
    }
}

#[test]
fn ingress_passthrough_picks_the_most_specific_sni_and_tcp_the_oldest_admitted_route() {
    let tcp = TcpRoute {
        matches: vec![L4Match {
            port: Some(31400),
            ..L4Match::default()
        }],
        route: vec![dest("tcp-echo", None, 100)],
    };
    let state = State {
        gateway_virtual_services: BTreeMap::from([(
            "istio-ingress/gw".to_owned(),
            vec![
                gateway_vs(
                    "wild",
                    NS,
                    &["*.example.com"],
                    vec![],
                    vec![sni_route(&["*.example.com"], "wild")],
                ),
                gateway_vs(
                    "exact",
                    NS,
                    &["nginx.example.com"],
                    vec![],
                    vec![sni_route(&["nginx.example.com"], "nginx")],
                ),
                gateway_vs("other-ns", "elsewhere", &["*"], vec![tcp.clone()], vec![]),
                gateway_vs("tcp", NS, &["*"], vec![tcp], vec![]),
            ],
        )]),
        ..State::default()
    };
    let table = RouteTable::build(&state);
    let mut rng = fastrand::Rng::with_seed(1);
    let any = IpAddr::from([10, 0, 0, 1]);
    let pick = |scope: &ServerScope, sni: Option<&str>, port: u16, rng: &mut fastrand::Rng| {
        table
            .select_gateway_tcp(scope, sni, port, &no_source(), any, rng)
            .map(|(vs, d)| (vs.to_owned(), d.destination.host.clone()))
    };

    let passthrough = scope(&[("*.example.com", None)], true);
    // The exact name beats the older wildcard; other names under it take the wildcard.
    assert_eq!(
        pick(&passthrough, Some("nginx.example.com"), 443, &mut rng),
        Some(("demo/exact".into(), host("nginx")))
    );
    assert_eq!(
        pick(&passthrough, Some("shop.example.com"), 443, &mut rng),
        Some(("demo/wild".into(), host("wild")))
    );
    // No SNI, or one no route takes: nothing (the connection is closed).
    assert_eq!(pick(&passthrough, None, 443, &mut rng), None);
    assert_eq!(pick(&passthrough, Some("example.org"), 443, &mut rng), None);
    // A server limited to another namespace admits none of these.
    let fenced = scope(&[("*.example.com", Some("elsewhere"))], true);
    assert_eq!(
        pick(&fenced, Some("nginx.example.com"), 443, &mut rng),
        None
    );

    // TCP: the `tcp` routes whose port matches, of the oldest VirtualService the server admits.
    let tcp = scope(&[("*", Some(NS))], false);
    assert_eq!(
        pick(&tcp, None, 31400, &mut rng),
        Some(("demo/tcp".into(), host("tcp-echo")))
    );
    assert_eq!(
        pick(&tcp, None, 31401, &mut rng),
        None,
        "port does not match"
    );
}
