//! Waypoint routing: VirtualServices go through the file source and the translation into a
//! `RouteTable` (beside fixed Services, a Pod and a DestinationRule of namespace `demo`);
//! requests (method, path, authority, headers, port, source) are matched against it, and the
//! chosen route's rewrites, header edits, redirects, direct responses, faults, mirrors, CORS and
//! retries are applied as the proxy applies them. Beyond not panicking: the chosen match holds
//! for the request, no earlier route with a destination matches it, and the rewritten request
//! is a valid one.
//!
//! Two input forms. Text (the seeds; first byte `#`): YAML documents, a NUL byte, then
//! requests to `demo/reviews` port 9080 from the `sleep` pod, separated by blank lines, one
//! header a line with pseudo-headers first (`:method GET`, `:path /`, `:authority host`,
//! `name: value`). Anything else: Istio-shaped VirtualServices and requests built by
//! `arbitrary` (every field of the schema, strings from a vocabulary of real values or
//! arbitrary), for depth.
#![no_main]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use mesh::discovery::StoreWriter;
use mesh::discovery::file::{FileSource, FileSourceConfig};
use mesh::fuzzing::file_source_load;
use mesh::identity::Identity;
use mesh::model::{HttpAction, State};
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};
use waypoint::request::SourceInfo;
use waypoint::route::matcher::http_match_holds;
use waypoint::route::retry::{AttemptOutcome, is_retriable, retry_backoff};
use waypoint::route::{RequestView, RouteTable, SelectedAction, cors, filters, grpc};

/// Real values the translation and the matcher look for, so the fuzzer reaches past the
/// validation without having to guess them.
const WORDS: &[&str] = &[
    "",
    "/",
    "/api",
    "/api/",
    "/api/v1",
    "/productpage",
    "/reviews/1",
    "reviews",
    "ratings",
    "reviews.demo.svc.cluster.local",
    "ratings.demo.svc.cluster.local",
    "reviews.demo",
    "*",
    "*.demo.svc.cluster.local",
    "mesh",
    "demo/gw",
    "v1",
    "v2",
    "v3",
    "GET",
    "POST",
    "OPTIONS",
    "http",
    "https",
    "x-user",
    "end-user",
    "jason",
    "cookie",
    "user=jason",
    "host",
    ":authority",
    ":path",
    ":method",
    "x-request-id",
    "content-type",
    "application/grpc",
    "^/api/(.*)$",
    "/api/(.*)",
    "\\1",
    "/v2/\\1",
    "(.*)",
    "[a-z]+",
    "1s",
    "0.5s",
    "100ms",
    "2m",
    "1h",
    "0s",
    "10",
    "5xx",
    "gateway-error",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "503",
    "cancelled",
    "unavailable",
    "internal",
    "reset",
    "deadline-exceeded",
    "resource-exhausted",
    "FROM_REQUEST_PORT",
    "FROM_PROTOCOL_DEFAULT",
    "example.com",
    "https://example.com",
    "http://a.b",
    "UNAVAILABLE",
    "14",
    "aGVsbG8=",
    "hello",
    "app",
    "sleep",
    "version",
    "demo",
    "other",
    "%2F",
    "a=1&b=2",
    "?",
    "#",
    "\u{fffd}",
];

#[derive(Debug)]
struct Text(String);

impl<'a> Arbitrary<'a> for Text {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Text(if u.ratio(3, 4)? {
            (*u.choose(WORDS)?).to_owned()
        } else {
            String::arbitrary(u)?
        }))
    }
}

impl Text {
    fn v(&self) -> Value {
        Value::String(self.0.clone())
    }
}

/// An integer that is usually sensible (a port, a status, a weight) and sometimes anything.
#[derive(Debug)]
struct Int(i64);

impl<'a> Arbitrary<'a> for Int {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        const SENSIBLE: &[i64] = &[
            0, 1, 2, 3, 10, 25, 50, 75, 100, 200, 204, 301, 302, 307, 308, 400, 404, 418, 429, 500,
            503, 504, 80, 443, 8080, 9080, 9090, 65535, 65536, -1,
        ];
        Ok(Int(if u.ratio(3, 4)? {
            *u.choose(SENSIBLE)?
        } else {
            i64::arbitrary(u)?
        }))
    }
}

#[derive(Arbitrary, Debug)]
enum StringMatch {
    Exact(Text),
    Prefix(Text),
    Regex(Text),
    /// Zero or several of the three, which the schema allows and the translation must judge.
    Odd(Option<Text>, Option<Text>, Option<Text>),
}

impl StringMatch {
    fn v(&self) -> Value {
        match self {
            StringMatch::Exact(t) => json!({ "exact": t.v() }),
            StringMatch::Prefix(t) => json!({ "prefix": t.v() }),
            StringMatch::Regex(t) => json!({ "regex": t.v() }),
            StringMatch::Odd(e, p, r) => {
                let mut m = Map::new();
                for (k, t) in [("exact", e), ("prefix", p), ("regex", r)] {
                    if let Some(t) = t {
                        m.insert(k.into(), t.v());
                    }
                }
                Value::Object(m)
            }
        }
    }
}

fn string_map(entries: &[(Text, StringMatch)]) -> Value {
    Value::Object(entries.iter().map(|(k, m)| (k.0.clone(), m.v())).collect())
}

fn text_map(entries: &[(Text, Text)]) -> Value {
    Value::Object(entries.iter().map(|(k, v)| (k.0.clone(), v.v())).collect())
}

#[derive(Arbitrary, Debug)]
struct Match {
    name: Option<Text>,
    uri: Option<StringMatch>,
    scheme: Option<StringMatch>,
    method: Option<StringMatch>,
    authority: Option<StringMatch>,
    headers: Vec<(Text, StringMatch)>,
    without_headers: Vec<(Text, StringMatch)>,
    query_params: Vec<(Text, StringMatch)>,
    port: Option<Int>,
    source_labels: Vec<(Text, Text)>,
    source_namespace: Option<Text>,
    gateways: Vec<Text>,
    ignore_uri_case: bool,
}

impl Match {
    fn v(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("name", self.name.as_ref().map(Text::v));
        put("uri", self.uri.as_ref().map(StringMatch::v));
        put("scheme", self.scheme.as_ref().map(StringMatch::v));
        put("method", self.method.as_ref().map(StringMatch::v));
        put("authority", self.authority.as_ref().map(StringMatch::v));
        put("headers", Some(string_map(&self.headers)));
        put("withoutHeaders", Some(string_map(&self.without_headers)));
        put("queryParams", Some(string_map(&self.query_params)));
        put("port", self.port.as_ref().map(|p| json!(p.0)));
        put("sourceLabels", Some(text_map(&self.source_labels)));
        put(
            "sourceNamespace",
            self.source_namespace.as_ref().map(Text::v),
        );
        put(
            "gateways",
            (!self.gateways.is_empty()).then(|| self.gateways.iter().map(Text::v).collect()),
        );
        put("ignoreUriCase", Some(json!(self.ignore_uri_case)));
        Value::Object(m)
    }
}

#[derive(Arbitrary, Debug)]
struct HeaderOps {
    set: Vec<(Text, Text)>,
    add: Vec<(Text, Text)>,
    remove: Vec<Text>,
}

impl HeaderOps {
    fn v(&self) -> Value {
        json!({
            "set": text_map(&self.set),
            "add": text_map(&self.add),
            "remove": self.remove.iter().map(Text::v).collect::<Vec<_>>(),
        })
    }
}

#[derive(Arbitrary, Debug)]
struct Headers {
    request: Option<HeaderOps>,
    response: Option<HeaderOps>,
}

impl Headers {
    fn v(&self) -> Value {
        let mut m = Map::new();
        if let Some(r) = &self.request {
            m.insert("request".into(), r.v());
        }
        if let Some(r) = &self.response {
            m.insert("response".into(), r.v());
        }
        Value::Object(m)
    }
}

#[derive(Arbitrary, Debug)]
struct Destination {
    host: Text,
    subset: Option<Text>,
    port: Option<Int>,
}

impl Destination {
    fn v(&self) -> Value {
        let mut m = Map::new();
        m.insert("host".into(), self.host.v());
        if let Some(s) = &self.subset {
            m.insert("subset".into(), s.v());
        }
        if let Some(p) = &self.port {
            m.insert("port".into(), json!({ "number": p.0 }));
        }
        Value::Object(m)
    }
}

#[derive(Arbitrary, Debug)]
struct WeightedDestination {
    destination: Destination,
    weight: Option<Int>,
    headers: Option<Headers>,
}

#[derive(Arbitrary, Debug)]
enum Action {
    Route(Vec<WeightedDestination>),
    Redirect {
        uri: Option<Text>,
        authority: Option<Text>,
        port: Option<Int>,
        derive_port: Option<Text>,
        scheme: Option<Text>,
        code: Option<Int>,
    },
    DirectResponse {
        status: Option<Int>,
        string: Option<Text>,
        bytes: Option<Text>,
    },
    /// A route with two actions, or none: the translation decides.
    Several(Vec<WeightedDestination>, Option<Text>, Option<Int>),
}

#[derive(Arbitrary, Debug)]
struct Route {
    name: Option<Text>,
    matches: Vec<Match>,
    action: Action,
    rewrite: Option<(
        Option<Text>,
        Option<Text>,
        Option<(Option<Text>, Option<Text>)>,
    )>,
    timeout: Option<Text>,
    retries: Option<(Option<Int>, Option<Text>, Option<Text>)>,
    delay: Option<(Option<Text>, Option<f64>, Option<Int>)>,
    abort: Option<(Option<Int>, Option<Text>, Option<f64>)>,
    mirror: Option<(Destination, Option<f64>)>,
    mirror_percent: Option<Int>,
    cors: Option<Cors>,
    headers: Option<Headers>,
}

#[derive(Arbitrary, Debug)]
struct Cors {
    allow_origin: Vec<Text>,
    allow_origins: Vec<StringMatch>,
    allow_methods: Vec<Text>,
    allow_headers: Vec<Text>,
    expose_headers: Vec<Text>,
    max_age: Option<Text>,
    allow_credentials: Option<bool>,
}

fn destinations(list: &[WeightedDestination]) -> Value {
    list.iter()
        .map(|d| {
            let mut m = Map::new();
            m.insert("destination".into(), d.destination.v());
            if let Some(w) = &d.weight {
                m.insert("weight".into(), json!(w.0));
            }
            if let Some(h) = &d.headers {
                m.insert("headers".into(), h.v());
            }
            Value::Object(m)
        })
        .collect()
}

fn opt<T>(m: &mut Map<String, Value>, k: &str, v: Option<T>, f: impl FnOnce(T) -> Value) {
    if let Some(v) = v {
        m.insert(k.into(), f(v));
    }
}

impl Route {
    fn v(&self) -> Value {
        let mut m = Map::new();
        opt(&mut m, "name", self.name.as_ref(), Text::v);
        m.insert("match".into(), self.matches.iter().map(Match::v).collect());
        match &self.action {
            Action::Route(list) => {
                m.insert("route".into(), destinations(list));
            }
            Action::Redirect {
                uri,
                authority,
                port,
                derive_port,
                scheme,
                code,
            } => {
                let mut r = Map::new();
                opt(&mut r, "uri", uri.as_ref(), Text::v);
                opt(&mut r, "authority", authority.as_ref(), Text::v);
                opt(&mut r, "port", port.as_ref(), |p| json!(p.0));
                opt(&mut r, "derivePort", derive_port.as_ref(), Text::v);
                opt(&mut r, "scheme", scheme.as_ref(), Text::v);
                opt(&mut r, "redirectCode", code.as_ref(), |c| json!(c.0));
                m.insert("redirect".into(), Value::Object(r));
            }
            Action::DirectResponse {
                status,
                string,
                bytes,
            } => {
                let mut r = Map::new();
                opt(&mut r, "status", status.as_ref(), |s| json!(s.0));
                let mut body = Map::new();
                opt(&mut body, "string", string.as_ref(), Text::v);
                opt(&mut body, "bytes", bytes.as_ref(), Text::v);
                if !body.is_empty() {
                    r.insert("body".into(), Value::Object(body));
                }
                m.insert("directResponse".into(), Value::Object(r));
            }
            Action::Several(list, uri, status) => {
                if !list.is_empty() {
                    m.insert("route".into(), destinations(list));
                }
                opt(
                    &mut m,
                    "redirect",
                    uri.as_ref(),
                    |u| json!({ "uri": u.v() }),
                );
                opt(
                    &mut m,
                    "directResponse",
                    status.as_ref(),
                    |s| json!({ "status": s.0 }),
                );
            }
        }
        if let Some((uri, authority, regex)) = &self.rewrite {
            let mut r = Map::new();
            opt(&mut r, "uri", uri.as_ref(), Text::v);
            opt(&mut r, "authority", authority.as_ref(), Text::v);
            opt(&mut r, "uriRegexRewrite", regex.as_ref(), |(p, s)| {
                let mut x = Map::new();
                opt(&mut x, "match", p.as_ref(), Text::v);
                opt(&mut x, "rewrite", s.as_ref(), Text::v);
                Value::Object(x)
            });
            m.insert("rewrite".into(), Value::Object(r));
        }
        opt(&mut m, "timeout", self.timeout.as_ref(), Text::v);
        if let Some((attempts, per_try, retry_on)) = &self.retries {
            let mut r = Map::new();
            opt(&mut r, "attempts", attempts.as_ref(), |a| json!(a.0));
            opt(&mut r, "perTryTimeout", per_try.as_ref(), Text::v);
            opt(&mut r, "retryOn", retry_on.as_ref(), Text::v);
            m.insert("retries".into(), Value::Object(r));
        }
        let mut fault = Map::new();
        if let Some((fixed, percentage, percent)) = &self.delay {
            let mut d = Map::new();
            opt(&mut d, "fixedDelay", fixed.as_ref(), Text::v);
            opt(
                &mut d,
                "percentage",
                percentage.as_ref(),
                |p| json!({ "value": p }),
            );
            opt(&mut d, "percent", percent.as_ref(), |p| json!(p.0));
            fault.insert("delay".into(), Value::Object(d));
        }
        if let Some((http, grpc, percentage)) = &self.abort {
            let mut a = Map::new();
            opt(&mut a, "httpStatus", http.as_ref(), |s| json!(s.0));
            opt(&mut a, "grpcStatus", grpc.as_ref(), Text::v);
            opt(
                &mut a,
                "percentage",
                percentage.as_ref(),
                |p| json!({ "value": p }),
            );
            fault.insert("abort".into(), Value::Object(a));
        }
        if !fault.is_empty() {
            m.insert("fault".into(), Value::Object(fault));
        }
        if let Some((destination, percentage)) = &self.mirror {
            m.insert("mirror".into(), destination.v());
            opt(
                &mut m,
                "mirrorPercentage",
                percentage.as_ref(),
                |p| json!({ "value": p }),
            );
        }
        opt(&mut m, "mirrorPercent", self.mirror_percent.as_ref(), |p| {
            json!(p.0)
        });
        if let Some(c) = &self.cors {
            let mut x = Map::new();
            let list = |l: &[Text]| l.iter().map(Text::v).collect::<Value>();
            x.insert("allowOrigin".into(), list(&c.allow_origin));
            x.insert(
                "allowOrigins".into(),
                c.allow_origins.iter().map(StringMatch::v).collect(),
            );
            x.insert("allowMethods".into(), list(&c.allow_methods));
            x.insert("allowHeaders".into(), list(&c.allow_headers));
            x.insert("exposeHeaders".into(), list(&c.expose_headers));
            opt(&mut x, "maxAge", c.max_age.as_ref(), Text::v);
            opt(&mut x, "allowCredentials", c.allow_credentials, |b| {
                json!(b)
            });
            m.insert("corsPolicy".into(), Value::Object(x));
        }
        opt(&mut m, "headers", self.headers.as_ref(), Headers::v);
        Value::Object(m)
    }
}

#[derive(Arbitrary, Debug)]
struct TcpRoute {
    destination_subnets: Vec<Text>,
    port: Option<Int>,
    source_labels: Vec<(Text, Text)>,
    source_namespace: Option<Text>,
    route: Vec<(Destination, Option<Int>)>,
}

impl TcpRoute {
    fn v(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "destinationSubnets".into(),
            self.destination_subnets.iter().map(Text::v).collect(),
        );
        opt(&mut m, "port", self.port.as_ref(), |p| json!(p.0));
        m.insert("sourceLabels".into(), text_map(&self.source_labels));
        opt(
            &mut m,
            "sourceNamespace",
            self.source_namespace.as_ref(),
            Text::v,
        );
        let route: Value = self
            .route
            .iter()
            .map(|(d, w)| {
                let mut r = Map::new();
                r.insert("destination".into(), d.v());
                opt(&mut r, "weight", w.as_ref(), |w| json!(w.0));
                Value::Object(r)
            })
            .collect();
        json!({ "match": [Value::Object(m)], "route": route })
    }
}

#[derive(Arbitrary, Debug)]
struct VirtualService {
    namespace: bool,
    hosts: Vec<Text>,
    gateways: Vec<Text>,
    http: Vec<Route>,
    tcp: Vec<TcpRoute>,
    /// Orders VirtualServices claiming one host (the oldest wins).
    created: u8,
}

#[derive(Arbitrary, Debug)]
struct Request {
    service: bool,
    method: Text,
    scheme: Option<Text>,
    authority: Option<Text>,
    path: Text,
    headers: Vec<(Text, Text)>,
    port: u16,
    /// Source: identity namespace and service account, and whether it is the `sleep` pod.
    source: Option<(Text, Text)>,
    source_is_sleep: bool,
    destination: IpAddr,
    seed: u64,
    outcome: (u16, Option<u32>, u8),
    attempt: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    virtual_services: Vec<VirtualService>,
    requests: Vec<Request>,
}

/// What every input routes against: the services `reviews` and `ratings` bound to a waypoint,
/// the client pod `sleep` (labels `app: sleep, version: v1`), subsets v1 and v2 of `reviews`.
const FIXED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.5
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: 9080}
  - {name: grpc-api, port: 9090, targetPort: grpc}
  - {name: tcp-db, port: 5432}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.6
  selector: {app: ratings}
  ports:
  - {name: http, port: 9080}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo, labels: {app: sleep, version: v1}}
spec: {nodeName: node-a, serviceAccountName: sleep}
status: {phase: Running, podIP: 10.1.0.9}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

/// The state a waypoint would route on after loading `fixed` and `config` from its files.
fn load(config: String) -> State {
    let mut source = FileSource::new(FileSourceConfig::new("/fuzz"), &mut Registry::default());
    let store = StoreWriter::new();
    let files = vec![
        (PathBuf::from("/fuzz/fixed.yaml"), FIXED.to_owned()),
        (PathBuf::from("/fuzz/routes.yaml"), config),
    ];
    file_source_load(&mut source, files, &store);
    State::clone(&store.store().snapshot())
}

/// The VirtualServices as JSON documents (JSON is YAML).
fn generated_config(input: &Input) -> String {
    let mut docs = Vec::new();
    for (i, vs) in input.virtual_services.iter().take(4).enumerate() {
        let namespace = if vs.namespace { "demo" } else { "other" };
        let mut spec = Map::new();
        spec.insert("hosts".into(), vs.hosts.iter().map(Text::v).collect());
        if !vs.gateways.is_empty() {
            spec.insert("gateways".into(), vs.gateways.iter().map(Text::v).collect());
        }
        spec.insert("http".into(), vs.http.iter().map(Route::v).collect());
        spec.insert("tcp".into(), vs.tcp.iter().map(TcpRoute::v).collect());
        let value = json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": { "name": format!("vs-{i}"), "namespace": namespace,
                          "creationTimestamp": format!("2024-01-01T00:00:{:02}Z", vs.created % 60) },
            "spec": Value::Object(spec),
        });
        docs.push(value.to_string());
    }
    docs.join("\n---\n")
}

/// One request as the proxy sees it, and what happens to its attempt.
struct Case {
    parts: http::request::Parts,
    service: &'static str,
    port: u16,
    source: SourceInfo,
    destination: IpAddr,
    seed: u64,
    outcome: AttemptOutcome,
    attempt: u32,
}

/// Requests written as header lines (see the module doc).
fn text_cases(text: &str, state: &State) -> Vec<Case> {
    let sleep = state.workloads.get("demo/sleep").cloned();
    let identity = Identity::new("cluster.local", "demo", "sleep").ok();
    let mut cases = Vec::new();
    for (i, block) in text.split("\n\n").enumerate().take(8) {
        let mut builder = http::Request::builder();
        let mut path = "/";
        let mut authority = None;
        for line in block.lines() {
            if let Some(pseudo) = line.strip_prefix(':') {
                let (name, value) = pseudo.split_once(' ').unwrap_or((pseudo, ""));
                match name {
                    "method" => builder = builder.method(value),
                    "path" => path = value,
                    "authority" => authority = Some(value),
                    _ => {}
                }
            } else if let Some((name, value)) = line.split_once(':') {
                builder = builder.header(name.trim(), value.trim());
            }
        }
        let uri = match authority {
            Some(a) => format!("http://{a}{path}"),
            None => path.to_owned(),
        };
        let Ok(request) = builder.uri(uri).body(()) else {
            continue;
        };
        cases.push(Case {
            parts: request.into_parts().0,
            service: "demo/reviews",
            port: 9080,
            source: SourceInfo::new(
                identity.clone(),
                sleep.as_ref().and_then(|w| w.ips.first().copied()),
                sleep.clone(),
            ),
            destination: IpAddr::from([10, 96, 0, 5]),
            seed: i as u64,
            outcome: AttemptOutcome::Response {
                status: 503,
                grpc_status: None,
            },
            attempt: 1,
        });
    }
    cases
}

fn generated_cases(input: &Input, state: &State) -> Vec<Case> {
    let sleep = state.workloads.get("demo/sleep").cloned();
    let mut cases = Vec::new();
    for r in input.requests.iter().take(8) {
        let Some(parts) = parts(r) else {
            continue;
        };
        let identity = r
            .source
            .as_ref()
            .and_then(|(ns, sa)| Identity::new("cluster.local", &ns.0, &sa.0).ok());
        let workload = if r.source_is_sleep {
            sleep.clone()
        } else {
            None
        };
        let (status, grpc_status, kind) = r.outcome;
        cases.push(Case {
            parts,
            service: if r.service {
                "demo/reviews"
            } else {
                "demo/ratings"
            },
            port: r.port,
            source: SourceInfo::new(
                identity,
                workload.as_ref().and_then(|w| w.ips.first().copied()),
                workload,
            ),
            destination: r.destination,
            seed: r.seed,
            outcome: match kind % 5 {
                0 => AttemptOutcome::Response {
                    status,
                    grpc_status,
                },
                1 => AttemptOutcome::ConnectFailure,
                2 => AttemptOutcome::Reset,
                3 => AttemptOutcome::RefusedStream,
                _ => AttemptOutcome::PerTryTimeout,
            },
            attempt: r.attempt,
        });
    }
    cases
}

fn parts(r: &Request) -> Option<http::request::Parts> {
    let mut builder =
        http::Request::builder().method(Method::from_bytes(r.method.0.as_bytes()).ok()?);
    let uri = match (&r.scheme, &r.authority) {
        (Some(s), Some(a)) => format!("{}://{}{}", s.0, a.0, r.path.0),
        _ => r.path.0.clone(),
    };
    builder = builder.uri(http::Uri::try_from(uri).ok()?);
    for (name, value) in &r.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.0.as_bytes()),
            HeaderValue::from_bytes(value.0.as_bytes()),
        ) {
            builder = builder.header(n, v);
        }
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

fuzz_target!(|data: &[u8]| {
    let (state, cases) = if let Some(text) = data.strip_prefix(b"#") {
        let text = String::from_utf8_lossy(text);
        let (config, requests) = text.split_once('\0').unwrap_or((&text, ""));
        let state = load(config.to_owned());
        let cases = text_cases(requests, &state);
        (state, cases)
    } else {
        let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
            return;
        };
        let state = load(generated_config(&input));
        let cases = generated_cases(&input, &state);
        (state, cases)
    };
    let table = RouteTable::build(&state);
    for case in cases {
        route(&table, case);
    }
});

fn route(table: &RouteTable, case: Case) {
    let Case {
        mut parts,
        service,
        port,
        source,
        destination,
        seed,
        outcome,
        attempt,
    } = case;
    let mut rng = fastrand::Rng::with_seed(seed);
    let grpc_request = grpc::is_grpc_request(&parts.headers);

    let view = RequestView::from_parts(&parts, port);
    let selected = table.select_http(service, &view, &source, &mut rng);
    let _ = table.select_tcp(service, port, &source, destination, &mut rng);
    let Some(selected) = selected else {
        return;
    };
    if let Some(m) = selected.matched {
        assert!(
            http_match_holds(m, &view, &source),
            "chose a match that does not hold"
        );
    }
    let routes = table.service(service).expect("the service was routed");
    for earlier in routes.http_routes() {
        if std::ptr::eq(earlier, selected.route) {
            break;
        }
        let has_destination = matches!(&earlier.action, HttpAction::Route(d) if !d.is_empty());
        if has_destination {
            assert!(
                !earlier.matches.is_empty()
                    && !earlier
                        .matches
                        .iter()
                        .any(|m| http_match_holds(m, &view, &source)),
                "an earlier route matches too: the first match must win"
            );
        }
    }
    let _ = selected.route_name();

    if let Some(policy) = &selected.route.cors {
        let _ = cors::preflight(policy, &parts.headers, &parts.method);
        let mut response = HeaderMap::new();
        cors::apply_response_headers(policy, &parts.headers, &mut response);
    }
    if let Some(fault) = &selected.route.fault {
        let decision = filters::decide_fault(fault, &mut rng);
        if let Some(abort) = &decision.abort {
            let _ = filters::abort_response(abort, grpc_request);
        }
    }
    match selected.action {
        SelectedAction::Redirect(redirect) => {
            let _ = filters::redirect_response(redirect, &view);
            return;
        }
        SelectedAction::DirectResponse(direct) => {
            let _ = filters::direct_response(direct);
            return;
        }
        SelectedAction::Route(_) => {}
    }
    for mirror in &selected.route.mirrors {
        let _ = filters::should_mirror(mirror, &mut rng);
    }
    if selected.apply_request_filters(&mut parts).is_ok() {
        // What goes upstream must be a request target hyper can write.
        let uri = parts.uri.to_string();
        assert!(
            http::Uri::try_from(uri.as_str()).is_ok(),
            "rewrote the request to an invalid target {uri:?}"
        );
    }
    let mut response = HeaderMap::new();
    selected.apply_response_headers(&mut response);
    let _ = is_retriable(&selected.route.retries.retry_on, &outcome);
    // Whatever base a route sets (a Gateway API `retry.backoff`), the wait stays under its
    // ceiling of ten times the base.
    let base = selected.route.retries.backoff;
    let wait = retry_backoff(attempt, base, &mut rng);
    let ceiling = base.map_or(Duration::from_millis(250), |b| {
        b.saturating_mul(10).max(Duration::from_millis(1))
    });
    assert!(wait < ceiling, "back-off {wait:?} not under {ceiling:?}");
}
