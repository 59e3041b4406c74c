//! A small fake Kubernetes API server on 127.0.0.1 for the Kubernetes source's and the CA's
//! tests: lists, `?watch=true` streams of `{"type":..,"object":..}` lines, gets, field
//! selectors, TokenReview, creates, and server-side apply (a PATCH of an applied configuration,
//! merged into the stored object; nothing changes, nothing is written), with knobs for what a
//! real cluster does to clients: failing requests, expired resource versions (410 Gone), dropped
//! watches, CRDs that are not installed (a plain-text 404 as the real server sends), namespaces
//! being terminated (no new objects in them) and an API server that goes away.
//!
//! Objects are plain JSON. List items of built-in kinds carry no apiVersion/kind, as the real
//! server sends them, so the source must not depend on them.
//!
//! Also here, for the tests that use the fake: [`requested`] (wait for a request) and [`Logs`]
//! (capture what the code under test logs).
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::watch;

type Body = BoxBody<Bytes, Infallible>;

/// `(group, plural)`: a resource, whatever version it is asked for in.
type ResourceId = (String, String);

#[derive(Debug)]
struct Served {
    versions: Vec<String>,
    kind: String,
    namespaced: bool,
}

/// A token the fake TokenReview accepts.
#[derive(Debug, Clone)]
pub(crate) struct TokenUser {
    pub(crate) username: String,
    pub(crate) audiences: Vec<String>,
    pub(crate) extra: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    served: HashMap<ResourceId, Served>,
    /// `(resource, namespace, name)` -> object.
    objects: BTreeMap<(ResourceId, String, String), Value>,
    /// Every change, for watches: `(rv, resource, type, object)`.
    history: Vec<(u64, ResourceId, &'static str, Value)>,
    /// Watches from a resource version below this get 410 Gone.
    compacted: u64,
    /// Statuses the next requests of `(resource, verb)` fail with.
    failures: HashMap<(ResourceId, &'static str), VecDeque<u16>>,
    /// Every request as `METHOD path?query`.
    requests: Vec<String>,
    tokens: HashMap<String, TokenUser>,
    /// Answer every request with 503 (an API server that went away).
    down: bool,
}

/// The fake server. Dropping it stops accepting (open watches end with the runtime).
#[derive(Debug)]
pub(crate) struct FakeApi {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// Bumped on every change; the value's parity is irrelevant, only the wake-up.
    changes: watch::Sender<u64>,
    /// Bumped to end every open watch stream.
    generation: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn id(group: &str, plural: &str) -> ResourceId {
    (group.to_owned(), plural.to_owned())
}

impl FakeApi {
    /// Serves the built-in kinds and every Istio/Gateway API CRD the mesh reads.
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner::default()));
        let (changes, _) = watch::channel(0);
        let (generation, _) = watch::channel(0);
        let server = Server {
            inner: inner.clone(),
            changes: changes.clone(),
            generation: generation.clone(),
        };
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let api = Self {
            addr,
            inner,
            changes,
            generation,
            accept,
        };
        for (group, versions, plural, kind, namespaced) in [
            ("", &["v1"][..], "namespaces", "Namespace", false),
            ("", &["v1"], "pods", "Pod", true),
            ("", &["v1"], "services", "Service", true),
            ("", &["v1"], "secrets", "Secret", true),
            ("", &["v1"], "configmaps", "ConfigMap", true),
            (
                "authentication.k8s.io",
                &["v1"],
                "tokenreviews",
                "TokenReview",
                false,
            ),
            (
                "discovery.k8s.io",
                &["v1"],
                "endpointslices",
                "EndpointSlice",
                true,
            ),
            (
                "security.istio.io",
                &["v1", "v1beta1"],
                "authorizationpolicies",
                "AuthorizationPolicy",
                true,
            ),
            (
                "security.istio.io",
                &["v1", "v1beta1"],
                "peerauthentications",
                "PeerAuthentication",
                true,
            ),
            (
                "networking.istio.io",
                &["v1", "v1beta1", "v1alpha3"],
                "virtualservices",
                "VirtualService",
                true,
            ),
            (
                "networking.istio.io",
                &["v1", "v1beta1", "v1alpha3"],
                "destinationrules",
                "DestinationRule",
                true,
            ),
            (
                "gateway.networking.k8s.io",
                &["v1", "v1beta1"],
                "gateways",
                "Gateway",
                true,
            ),
            (
                "mesh.ambient.dev",
                &["v1alpha1"],
                "ratelimitpolicies",
                "RateLimitPolicy",
                true,
            ),
        ] {
            api.serve(group, versions, plural, kind, namespaced);
        }
        api
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this server: plain HTTP, no credentials, no client-side retries.
    pub(crate) fn client(&self) -> ::kube::Client {
        let mut config = ::kube::Config::new(self.url().parse().unwrap());
        // As `default_client`: failures reach the caller instead of being retried inside.
        config.default_retry = false;
        ::kube::Client::try_from(config).unwrap()
    }

    /// Serves (or re-serves) a resource in the given versions.
    pub(crate) fn serve(
        &self,
        group: &str,
        versions: &[&str],
        plural: &str,
        kind: &str,
        namespaced: bool,
    ) {
        self.inner.lock().unwrap().served.insert(
            id(group, plural),
            Served {
                versions: versions.iter().map(|v| (*v).to_owned()).collect(),
                kind: kind.to_owned(),
                namespaced,
            },
        );
    }

    /// Stops serving a resource, as when its CRD is not installed; its objects stay stored
    /// for when it comes back.
    pub(crate) fn unserve(&self, group: &str, plural: &str) {
        self.inner.lock().unwrap().served.remove(&id(group, plural));
        self.end_watches();
    }

    /// Creates or replaces an object (`metadata.namespace`/`name` say where).
    pub(crate) fn apply(&self, group: &str, plural: &str, object: Value) {
        self.inner.lock().unwrap().put(&id(group, plural), object);
        self.changes.send_modify(|v| *v += 1);
    }

    pub(crate) fn delete(&self, group: &str, plural: &str, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        let key = (id(group, plural), namespace.to_owned(), name.to_owned());
        let Some(mut object) = inner.objects.remove(&key) else {
            return;
        };
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner
            .history
            .push((rv, id(group, plural), "DELETED", object));
        drop(inner);
        self.changes.send_modify(|v| *v += 1);
    }

    /// Forgets the history so far and ends every watch: clients resuming from an older
    /// resource version get 410 Gone and must relist.
    pub(crate) fn expire_history(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.compacted = inner.rv;
        inner.history.clear();
        drop(inner);
        self.end_watches();
    }

    /// Ends every open watch stream (a dropped connection); clients resume from their last
    /// resource version.
    pub(crate) fn end_watches(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// The next `count` requests of `verb` (`list`, `watch`, `get`, `create`, `patch`) on the
    /// resource fail with `status`.
    pub(crate) fn fail(
        &self,
        group: &str,
        plural: &str,
        verb: &'static str,
        status: u16,
        count: usize,
    ) {
        let mut inner = self.inner.lock().unwrap();
        let queue = inner.failures.entry((id(group, plural), verb)).or_default();
        queue.extend(std::iter::repeat_n(status, count));
    }

    /// While down, every request gets 503 and open watches end.
    pub(crate) fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
        if down {
            self.end_watches();
        }
    }

    /// Lets TokenReview accept `token` as `user`.
    pub(crate) fn add_token(&self, token: &str, user: TokenUser) {
        self.inner
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), user);
    }

    /// Every request so far, as `METHOD path?query` (query percent-decoded).
    pub(crate) fn requests(&self) -> Vec<String> {
        self.inner.lock().unwrap().requests.clone()
    }

    pub(crate) fn object(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let key = (id(group, plural), namespace.to_owned(), name.to_owned());
        self.inner.lock().unwrap().objects.get(&key).cloned()
    }
}

impl Inner {
    /// Stores `object` (its `metadata.namespace`/`name` say where) under a new resource version
    /// and records the change for watches; returns the stored object.
    fn put(&mut self, resource: &ResourceId, mut object: Value) -> Value {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let key = (resource.clone(), namespace, name);
        let kind = if self.objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.history
            .push((rv, resource.clone(), kind, object.clone()));
        object
    }

    /// The namespace is being deleted: the real server refuses new objects in it.
    fn terminating(&self, namespace: &str) -> bool {
        let key = (id("", "namespaces"), String::new(), namespace.to_owned());
        self.objects.get(&key).is_some_and(|ns| {
            !ns["metadata"]["deletionTimestamp"].is_null() || ns["status"]["phase"] == "Terminating"
        })
    }
}

/// Server-side apply of `applied` onto `existing`, for one field manager that owns every field
/// it sets: maps merge key by key, anything else is replaced; fields it does not set stay.
fn merge_applied(existing: &mut Value, applied: &Value) {
    match (existing, applied) {
        (Value::Object(existing), Value::Object(applied)) => {
            for (key, value) in applied {
                match existing.get_mut(key) {
                    Some(slot) if slot.is_object() && value.is_object() => {
                        merge_applied(slot, value)
                    }
                    _ => {
                        existing.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (existing, applied) => *existing = applied.clone(),
    }
}

#[derive(Clone)]
struct Server {
    inner: Arc<Mutex<Inner>>,
    changes: watch::Sender<u64>,
    generation: watch::Sender<u64>,
}

/// What a path names.
struct Target {
    resource: ResourceId,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", namespace, plural] => (Some(*namespace), *plural, None),
        ["namespaces", namespace, plural, name] => (Some(*namespace), *plural, Some(*name)),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    Some(Target {
        resource: id(group, plural),
        version: version.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_params(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `spec.nodeName=a,spec.serviceAccountName!=b`: every term must hold.
fn matches_fields(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let (path, expected, equal) = match term.split_once("!=") {
            Some((path, value)) => (path, value, false),
            None => {
                let (path, value) = term.split_once('=').unwrap_or((term, ""));
                (path.trim_end_matches('='), value, true)
            }
        };
        let actual = path
            .split('.')
            .try_fold(object, |value, field| value.get(field))
            .and_then(Value::as_str)
            .unwrap_or_default();
        (actual == expected) == equal
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        }),
    )
}

/// What the real server answers a create in a namespace being deleted.
fn terminating_response(plural: &str, name: &str, namespace: &str) -> Response<Body> {
    status_response(
        403,
        "Forbidden",
        &format!(
            "{plural} {name:?} is forbidden: unable to create new content in namespace \
             {namespace} because it is being terminated"
        ),
    )
}

/// What the real server sends for a path nobody serves (a CRD that is not installed).
fn page_not_found() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(b"404 page not found\n")).boxed())
        .unwrap()
}

impl Server {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let params = query_params(request.uri().query());
        self.inner.lock().unwrap().requests.push(format!(
            "{method} {path}?{}",
            percent_decode(request.uri().query().unwrap_or_default())
        ));
        if self.inner.lock().unwrap().down {
            return status_response(503, "ServiceUnavailable", "the server is shutting down");
        }
        let body = match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let Some(target) = parse_path(&path) else {
            return page_not_found();
        };
        let watching = params.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (&method, &target.name) {
            (&Method::GET, Some(_)) => "get",
            (&Method::GET, None) if watching => "watch",
            (&Method::GET, None) => "list",
            (&Method::POST, None) => "create",
            (&Method::PATCH, Some(_)) => "patch",
            _ => return status_response(405, "MethodNotAllowed", "not supported by the fake"),
        };
        let (kind, api_version) = {
            let mut inner = self.inner.lock().unwrap();
            let Some(served) = inner.served.get(&target.resource) else {
                return page_not_found();
            };
            if !served.versions.contains(&target.version) {
                return page_not_found();
            }
            let api_version = if target.resource.0.is_empty() {
                target.version.clone()
            } else {
                format!("{}/{}", target.resource.0, target.version)
            };
            let kind = served.kind.clone();
            if let Some(status) = inner
                .failures
                .get_mut(&(target.resource.clone(), verb))
                .and_then(VecDeque::pop_front)
            {
                let reason = match status {
                    403 => "Forbidden",
                    404 => "NotFound",
                    410 => "Expired",
                    _ => "InternalError",
                };
                // A 403 reads as the real server's: the verb, resource and group refused.
                let message = if status == 403 {
                    format!(
                        "{plural} is forbidden: User \"system:serviceaccount:test:test\" cannot \
                         {verb} resource \"{plural}\" in API group \"{group}\" (injected 403)",
                        plural = target.resource.1,
                        group = target.resource.0,
                    )
                } else {
                    format!(
                        "{verb} {} is failing (injected {status})",
                        target.resource.1
                    )
                };
                return status_response(status, reason, &message);
            }
            (kind, api_version)
        };
        match verb {
            "get" => self.get(&target),
            "list" => self.list(&target, &kind, &api_version, &params),
            "watch" => self.watch(target, api_version, &params),
            "create" if target.resource.1 == "tokenreviews" => self.token_review(&body),
            "create" => self.create(&target, &body),
            "patch" if content_type.starts_with("application/apply-patch") => {
                self.server_side_apply(&target, &body)
            }
            "patch" => status_response(
                415,
                "UnsupportedMediaType",
                "the fake supports only server-side apply patches",
            ),
            _ => page_not_found(),
        }
    }

    /// Built-in kinds' list items carry no apiVersion/kind; custom resources' do.
    fn presented(resource: &ResourceId, api_version: &str, kind: &str, object: &Value) -> Value {
        let mut object = object.clone();
        if resource.0.is_empty() || resource.0 == "discovery.k8s.io" {
            if let Some(map) = object.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
        } else {
            object["apiVersion"] = json!(api_version);
            object["kind"] = json!(kind);
        }
        object
    }

    fn selected<'a>(
        inner: &'a Inner,
        target: &'a Target,
        params: &'a HashMap<String, String>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        inner
            .objects
            .iter()
            .filter(move |((resource, namespace, _), _)| {
                resource == &target.resource
                    && target.namespace.as_ref().is_none_or(|ns| ns == namespace)
            })
            .map(|(_, object)| object)
            .filter(move |object| matches_fields(object, params.get("fieldSelector")))
    }

    fn get(&self, target: &Target) -> Response<Body> {
        let inner = self.inner.lock().unwrap();
        let key = (
            target.resource.clone(),
            target.namespace.clone().unwrap_or_default(),
            target.name.clone().unwrap_or_default(),
        );
        match inner.objects.get(&key) {
            Some(object) => json_response(StatusCode::OK, object),
            None => status_response(
                404,
                "NotFound",
                &format!(
                    "{} {:?} not found",
                    target.resource.1,
                    target.name.as_deref().unwrap_or_default()
                ),
            ),
        }
    }

    fn list(
        &self,
        target: &Target,
        kind: &str,
        api_version: &str,
        params: &HashMap<String, String>,
    ) -> Response<Body> {
        let inner = self.inner.lock().unwrap();
        let items: Vec<Value> = Self::selected(&inner, target, params)
            .map(|o| Self::presented(&target.resource, api_version, kind, o))
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": api_version,
                "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": inner.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn create(&self, target: &Target, body: &Bytes) -> Response<Body> {
        let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
            return status_response(400, "BadRequest", "not JSON");
        };
        let namespace = target.namespace.clone().unwrap_or_default();
        object["metadata"]["namespace"] = json!(namespace);
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = (target.resource.clone(), namespace.clone(), name.clone());
        let object = {
            let mut inner = self.inner.lock().unwrap();
            if inner.objects.contains_key(&key) {
                return status_response(
                    409,
                    "AlreadyExists",
                    &format!("{} {name:?} already exists", target.resource.1),
                );
            }
            if inner.terminating(&namespace) {
                return terminating_response(&target.resource.1, &name, &namespace);
            }
            inner.put(&target.resource, object)
        };
        self.changes.send_modify(|v| *v += 1);
        json_response(StatusCode::CREATED, &object)
    }

    /// `PATCH` with an applied configuration: creates the object, or merges the configuration
    /// into it; an apply that changes nothing stores nothing (no new resource version, no watch
    /// event), as the real server.
    fn server_side_apply(&self, target: &Target, body: &Bytes) -> Response<Body> {
        let Ok(mut applied) = serde_json::from_slice::<Value>(body) else {
            return status_response(400, "BadRequest", "not JSON");
        };
        let namespace = target.namespace.clone().unwrap_or_default();
        let name = target.name.clone().unwrap_or_default();
        if applied["metadata"]["name"].as_str() != Some(name.as_str()) {
            return status_response(400, "BadRequest", "metadata.name does not match the path");
        }
        applied["metadata"]["namespace"] = json!(namespace);
        if let Some(metadata) = applied["metadata"].as_object_mut() {
            metadata.remove("resourceVersion");
        }
        let key = (target.resource.clone(), namespace.clone(), name.clone());
        let (status, object) = {
            let mut inner = self.inner.lock().unwrap();
            match inner.objects.get(&key).cloned() {
                Some(existing) => {
                    let mut merged = existing.clone();
                    merge_applied(&mut merged, &applied);
                    if merged == existing {
                        return json_response(StatusCode::OK, &existing);
                    }
                    (StatusCode::OK, inner.put(&target.resource, merged))
                }
                None if inner.terminating(&namespace) => {
                    return terminating_response(&target.resource.1, &name, &namespace);
                }
                None => (StatusCode::CREATED, inner.put(&target.resource, applied)),
            }
        };
        self.changes.send_modify(|v| *v += 1);
        json_response(status, &object)
    }

    fn watch(
        &self,
        target: Target,
        api_version: String,
        params: &HashMap<String, String>,
    ) -> Response<Body> {
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let kind = self
            .inner
            .lock()
            .unwrap()
            .served
            .get(&target.resource)
            .map(|s| s.kind.clone())
            .unwrap_or_default();
        let field_selector = params.get("fieldSelector").cloned();
        let inner = self.inner.clone();
        let mut changes = self.changes.subscribe();
        let mut generation = self.generation.subscribe();
        generation.borrow_and_update();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        tokio::spawn(async move {
            let mut last = from;
            loop {
                changes.borrow_and_update();
                let lines = {
                    let inner = inner.lock().unwrap();
                    if last < inner.compacted {
                        let gone = json!({"type": "ERROR", "object": {
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "reason": "Expired", "code": 410,
                            "message": format!("too old resource version: {last} ({})", inner.compacted),
                        }});
                        let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("{gone}\n")))));
                        return;
                    }
                    let mut lines = Vec::new();
                    for (rv, resource, kind_of_change, object) in &inner.history {
                        if *rv <= last || resource != &target.resource {
                            continue;
                        }
                        let namespace =
                            object["metadata"]["namespace"].as_str().unwrap_or_default();
                        if target.namespace.as_ref().is_some_and(|ns| ns != namespace)
                            || !matches_fields(object, field_selector.as_ref())
                        {
                            continue;
                        }
                        let object = Server::presented(resource, &api_version, &kind, object);
                        lines.push(format!(
                            "{}\n",
                            json!({"type": kind_of_change, "object": object})
                        ));
                    }
                    last = inner.rv;
                    lines
                };
                for line in lines {
                    if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = generation.changed() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed())
            .unwrap()
    }

    fn token_review(&self, body: &Bytes) -> Response<Body> {
        let Ok(review) = serde_json::from_slice::<Value>(body) else {
            return status_response(400, "BadRequest", "not JSON");
        };
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let user = self.inner.lock().unwrap().tokens.get(token).cloned();
        let status = match user {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some(user) => {
                let audiences: Vec<&String> = if wanted.is_empty() {
                    user.audiences.iter().collect()
                } else {
                    wanted
                        .iter()
                        .filter(|a| user.audiences.contains(a))
                        .collect()
                };
                if audiences.is_empty() {
                    json!({"authenticated": false,
                           "error": "token audiences [..] is invalid for the target audiences"})
                } else {
                    let namespace = user
                        .username
                        .strip_prefix("system:serviceaccount:")
                        .and_then(|rest| rest.split(':').next())
                        .unwrap_or_default()
                        .to_owned();
                    json!({
                        "authenticated": true,
                        "audiences": audiences,
                        "user": {
                            "username": user.username,
                            "uid": "00000000-0000-0000-0000-000000000000",
                            "groups": ["system:serviceaccounts",
                                       format!("system:serviceaccounts:{namespace}"),
                                       "system:authenticated"],
                            "extra": user.extra,
                        }
                    })
                }
            }
        };
        let mut response = review.clone();
        response["status"] = status;
        json_response(StatusCode::CREATED, &response)
    }
}

/// Every wait on the fake is bounded by this (kube's back-off starts at 0.8 s and doubles).
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Waits (at most [`WAIT`]) until the fake has seen a request containing every part of
/// `pattern` (separated by `*`) at least `times` times.
pub(crate) async fn requested(api: &FakeApi, pattern: &str, times: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = api
            .requests()
            .iter()
            .filter(|r| pattern.split('*').all(|part| r.contains(part)))
            .count();
        if seen >= times {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {times} requests like {pattern:?}; saw {:#?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Log lines written while the guard lives (the tests run on one thread, so every task logs
/// here).
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub(crate) fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
