//! The Kubernetes source against the fake API server: first publication only after every
//! kind listed, add/update/delete, outages and 410 relists that keep the last good state and
//! converge, watch errors that recover, absent CRDs, RBAC gaps; and the pure parts (trimming,
//! applying updates) directly.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::fake_api::{FakeApi, Logs, WAIT, requested};
use super::*;
use crate::discovery::Store;
use crate::model::State;

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels}})
}

fn pod(name: &str, ip: &str, node: &str, extra_labels: Value) -> Value {
    let mut labels = json!({"app": name, "pod-template-hash": "7d4b9"});
    for (k, v) in extra_labels.as_object().unwrap() {
        labels[k] = v.clone();
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "demo", "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(2048)},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}],
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-7d4b9"),
                 "uid": "u1", "controller": true}
            ],
            "uid": format!("uid-{name}"),
        },
        "spec": {
            "nodeName": node, "serviceAccountName": name,
            "containers": [{"name": "main", "image": "app:1",
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "env": [{"name": "BIG", "value": "y".repeat(1024)}]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

fn service(name: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"clusterIP": vip, "clusterIPs": [vip],
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        "status": {"loadBalancer": {}},
    })
}

fn slice(service: &str, endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod)| {
            json!({"addresses": [ip], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "namespace": "demo", "name": pod}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abc"), "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    })
}

fn policy(name: &str, action: &str) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"action": action, "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]},
    })
}

/// Objects as a cluster holds them: an enrolled namespace, pods on two nodes, a service with
/// both as endpoints, a policy.
fn seed(api: &FakeApi) {
    api.apply("", "namespaces", namespace("demo", true));
    api.apply("", "pods", pod("a", "10.1.0.1", "node-a", json!({})));
    api.apply("", "pods", pod("b", "10.1.1.1", "node-b", json!({})));
    api.apply("", "services", service("web", "10.96.0.10"));
    api.apply(
        "discovery.k8s.io",
        "endpointslices",
        slice("web", &[("10.1.0.1", "a"), ("10.1.1.1", "b")]),
    );
    api.apply(
        "security.istio.io",
        "authorizationpolicies",
        policy("allow-demo", "ALLOW"),
    );
}

struct Running {
    store: Store,
    registry: Registry,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Running {
    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

fn start(api: &FakeApi, config: KubeSourceConfig) -> Running {
    let mut registry = Registry::default();
    let writer = StoreWriter::new();
    let store = writer.store();
    let source = KubeSource::new(config, api.client(), &mut registry);
    let stop = CancellationToken::new();
    tokio::spawn(source.run(writer, stop.clone()));
    Running {
        store,
        registry,
        stop,
    }
}

fn fast(mut config: KubeSourceConfig) -> KubeSourceConfig {
    config.batch_delay = Duration::from_millis(20);
    config.absent_recheck = Duration::from_millis(300);
    config
}

/// Waits until the store is synced and `ready` holds for its state.
async fn converge(store: &Store, what: &str, ready: impl Fn(&State) -> bool) -> Arc<State> {
    let mut changes = store.subscribe();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = store.snapshot();
        if store.has_synced() && ready(&state) {
            return state;
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            panic!("timed out waiting for: {what}; state: {state:#?}");
        }
    }
}

fn enrolled(state: &State, uid: &str) -> Option<bool> {
    state.workloads.get(uid).map(|w| w.enrolled)
}

#[tokio::test]
async fn publishes_after_every_kind_listed_then_follows_add_update_delete() {
    let api = FakeApi::start().await;
    seed(&api);
    // Pods fail to list twice: the other kinds list at once, but nothing may be published
    // (an empty or partial state would mean "no workloads" to the proxy).
    api.fail("", "pods", "list", 500, 2);
    let running = start(
        &api,
        fast(KubeSourceConfig::ztunnel(TranslateConfig::default())),
    );
    for resource in [
        "/api/v1/namespaces?",
        "/api/v1/services?",
        "/apis/discovery.k8s.io/v1/endpointslices?",
        "/apis/security.istio.io/v1/authorizationpolicies?",
        "/apis/security.istio.io/v1/peerauthentications?",
    ] {
        requested(&api, resource, 1).await;
    }
    requested(&api, "GET /api/v1/pods?", 1).await;
    assert!(
        !running.store.has_synced(),
        "published before pods were listed"
    );
    assert_eq!(running.store.version(), 0);

    let state = converge(&running.store, "initial state", |s| s.workloads.len() == 2).await;
    // Every pod of the cluster, not only one node's: remote endpoints need their identity.
    let b = &state.workloads["demo/b"];
    assert_eq!(b.node, "node-b");
    assert_eq!(
        b.identity.to_string(),
        "spiffe://cluster.local/ns/demo/sa/b"
    );
    assert!(b.enrolled);
    assert_eq!(b.named_ports.get("http"), Some(&8080));
    assert_eq!(b.workload_name, "b", "controller owner kept: {b:?}");
    let web = &state.services["demo/web"];
    assert_eq!(web.endpoints.len(), 2);
    assert_eq!(state.authorization_policies.len(), 1);
    // Watches, not polling: every kind is watched from the listed resource version.
    requested(&api, "GET /api/v1/pods?*watch=true", 1).await;

    // Add.
    api.apply("", "pods", pod("c", "10.1.0.2", "node-a", json!({})));
    converge(&running.store, "pod c added", |s| {
        enrolled(s, "demo/c") == Some(true)
    })
    .await;
    // Update: opting out of the mesh.
    api.apply(
        "",
        "pods",
        pod(
            "c",
            "10.1.0.2",
            "node-a",
            json!({"istio.io/dataplane-mode": "none"}),
        ),
    );
    converge(&running.store, "pod c opted out", |s| {
        enrolled(s, "demo/c") == Some(false)
    })
    .await;
    // Delete.
    api.delete("", "pods", "demo", "b");
    let state = converge(&running.store, "pod b deleted", |s| {
        !s.workloads.contains_key("demo/b")
    })
    .await;
    assert!(state.workload_by_ip("10.1.1.1".parse().unwrap()).is_none());
    // A namespace label change re-enrols its pods.
    api.apply("", "namespaces", namespace("demo", false));
    converge(&running.store, "namespace left the mesh", |s| {
        enrolled(s, "demo/a") == Some(false)
    })
    .await;
}

#[tokio::test]
async fn a_bad_object_is_rejected_counted_and_its_last_good_version_kept() {
    let api = FakeApi::start().await;
    seed(&api);
    let running = start(
        &api,
        fast(KubeSourceConfig::ztunnel(TranslateConfig::default())),
    );
    converge(&running.store, "initial state", |s| {
        s.authorization_policies.len() == 1
    })
    .await;

    // An action Istio does not have: rejected, the ALLOW version stays in force.
    api.apply(
        "security.istio.io",
        "authorizationpolicies",
        policy("allow-demo", "PERMIT"),
    );
    api.apply("", "pods", pod("marker", "10.1.0.9", "node-a", json!({})));
    let state = converge(&running.store, "marker pod after the bad policy", |s| {
        s.workloads.contains_key("demo/marker")
    })
    .await;
    assert_eq!(
        state.authorization_policies.len(),
        1,
        "last good version kept"
    );
    let metrics = running.metrics();
    assert!(
        metrics.contains(r#"mesh_config_rejected_total{kind="AuthorizationPolicy"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"mesh_config_reloads_total{result="partial"}"#),
        "{metrics}"
    );

    // A pod whose schema is wrong is rejected too; being new, it is simply absent.
    let mut broken = pod("broken", "10.1.0.10", "node-a", json!({}));
    broken["spec"]["containers"][0]["ports"][0]["containerPort"] = json!("eighty");
    api.apply("", "pods", broken);
    api.apply("", "pods", pod("marker2", "10.1.0.11", "node-a", json!({})));
    let state = converge(&running.store, "second marker", |s| {
        s.workloads.contains_key("demo/marker2")
    })
    .await;
    assert!(!state.workloads.contains_key("demo/broken"));
    assert!(
        running
            .metrics()
            .contains(r#"mesh_config_rejected_total{kind="Pod"} 1"#)
    );
}

#[tokio::test]
async fn an_outage_and_a_410_relist_keep_the_last_good_state_then_converge() {
    let api = FakeApi::start().await;
    seed(&api);
    let running = start(
        &api,
        fast(KubeSourceConfig::ztunnel(TranslateConfig::default())),
    );
    let before = converge(&running.store, "initial state", |s| s.workloads.len() == 2).await;
    requested(&api, "GET /api/v1/pods?*watch=true", 1).await;

    // The API server goes away: watches end and every retry gets 503.
    let seen = api.requests().len();
    api.set_down(true);
    // Meanwhile the cluster changes and its history is compacted, so the watches cannot
    // resume: only a relist can show that pod a is gone.
    api.delete("", "pods", "demo", "a");
    api.apply("", "pods", pod("c", "10.1.0.2", "node-a", json!({})));
    api.expire_history();
    // Wait for retries to fail against the dead server; the state must not move.
    let deadline = tokio::time::Instant::now() + WAIT;
    while api.requests().len() < seen + 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retries during the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(running.store.has_synced());
    let during = running.store.snapshot();
    assert_eq!(
        during.workloads.keys().collect::<Vec<_>>(),
        before.workloads.keys().collect::<Vec<_>>(),
        "the last good state stays through the outage"
    );

    api.set_down(false);
    let state = converge(&running.store, "relisted after 410", |s| {
        !s.workloads.contains_key("demo/a") && s.workloads.contains_key("demo/c")
    })
    .await;
    assert!(state.workloads.contains_key("demo/b"));
    assert_eq!(
        state.services.len(),
        1,
        "other kinds unharmed by the relist"
    );
    let metrics = running.metrics();
    assert!(
        metrics.contains(r#"mesh_config_watch_errors_total{kind="Pod",reason="api"}"#)
            && metrics.contains(r#"mesh_config_watch_errors_total{kind="Pod",reason="gone"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn watch_errors_back_off_and_recover() {
    let api = FakeApi::start().await;
    seed(&api);
    let running = start(
        &api,
        fast(KubeSourceConfig::ztunnel(TranslateConfig::default())),
    );
    converge(&running.store, "initial state", |s| s.services.len() == 1).await;
    requested(&api, "GET /api/v1/services?*watch=true", 1).await;

    // The watch connection drops and the next two attempts to resume fail with 500; a
    // service is added meanwhile.
    api.fail("", "services", "watch", 500, 2);
    api.end_watches();
    requested(&api, "GET /api/v1/services?*watch=true", 3).await;
    assert!(running.store.snapshot().services.contains_key("demo/web"));
    api.apply("", "services", service("api", "10.96.0.11"));
    let state = converge(&running.store, "service added after the errors", |s| {
        s.services.contains_key("demo/api")
    })
    .await;
    assert!(state.services.contains_key("demo/web"));
    let metrics = running.metrics();
    assert!(
        metrics.contains(r#"mesh_config_watch_errors_total{kind="Service",reason="api"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_absent_crd_is_an_empty_set_logged_once_and_read_once_installed() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let api = FakeApi::start().await;
    seed(&api);
    api.unserve("networking.istio.io", "virtualservices");
    // Only an older version of DestinationRule is served: the source falls back to it.
    api.serve(
        "networking.istio.io",
        &["v1beta1"],
        "destinationrules",
        "DestinationRule",
        true,
    );
    api.apply(
        "networking.istio.io",
        "destinationrules",
        json!({
            "apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
        }),
    );
    let running = start(
        &api,
        fast(KubeSourceConfig::waypoint(TranslateConfig::default())),
    );
    let state = converge(&running.store, "synced without VirtualServices", |s| {
        s.destination_rules.len() == 1
    })
    .await;
    assert!(state.virtual_services.is_empty());

    // Several rechecks later: still one log line, and no retry storm.
    requested(
        &api,
        "/apis/networking.istio.io/v1alpha3/virtualservices?",
        3,
    )
    .await;
    let text = logs.text();
    let line =
        "CRD virtualservices.networking.istio.io not installed: VirtualServices are not read";
    assert_eq!(text.matches(line).count(), 1, "{text}");
    let vs_requests = api
        .requests()
        .iter()
        .filter(|r| r.contains("virtualservices"))
        .count();
    assert!(vs_requests <= 12, "{vs_requests} requests: a retry loop?");

    // Installing the CRD later is noticed.
    api.serve(
        "networking.istio.io",
        &["v1", "v1beta1", "v1alpha3"],
        "virtualservices",
        "VirtualService",
        true,
    );
    api.apply(
        "networking.istio.io",
        "virtualservices",
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]},
        }),
    );
    converge(&running.store, "VirtualService read once installed", |s| {
        s.virtual_services.len() == 1
    })
    .await;
    assert!(logs.text().contains("now installed"), "{}", logs.text());
}

#[tokio::test]
async fn a_403_names_the_missing_permission_and_readiness_waits() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let api = FakeApi::start().await;
    seed(&api);
    api.fail("", "pods", "list", 403, 1);
    let running = start(
        &api,
        fast(KubeSourceConfig::ztunnel(TranslateConfig::default())),
    );
    requested(&api, "GET /api/v1/pods?", 1).await;
    assert!(!running.store.has_synced());
    converge(&running.store, "synced once permitted", |s| {
        s.workloads.len() == 2
    })
    .await;
    let text = logs.text();
    assert!(
        text.contains("RBAC: this service account may not list pods cluster-wide")
            && text.contains(r#"on resource "pods" in API group """#),
        "{text}"
    );
    assert!(text.contains("watch recovered"), "{text}");
    assert!(
        running
            .metrics()
            .contains(r#"mesh_config_watch_errors_total{kind="Pod",reason="forbidden"} 1"#)
    );
}

#[test]
fn plurals_and_resources_are_named_as_kubernetes_names_them() {
    assert_eq!(plural("AuthorizationPolicy"), "AuthorizationPolicies");
    assert_eq!(plural("Gateway"), "Gateways");
    assert_eq!(plural("EndpointSlice"), "EndpointSlices");
    let vs = Resource::of(Kind::VirtualService);
    assert_eq!(vs.qualified(), "virtualservices.networking.istio.io");
    assert_eq!(vs.api_resource(0).api_version, "networking.istio.io/v1");
    assert_eq!(
        vs.api_resource(2).api_version,
        "networking.istio.io/v1alpha3"
    );
    assert!(vs.is_custom());
    assert_eq!(Resource::of(Kind::Pod).qualified(), "pods");
    assert!(!Resource::of(Kind::EndpointSlice).is_custom());
    assert!(Resource::of(Kind::Gateway).is_custom());
    let rbac = required_resources(&ZTUNNEL_KINDS);
    assert!(rbac.contains(&("".to_owned(), "pods".to_owned())));
    assert!(rbac.contains(&(
        "security.istio.io".to_owned(),
        "authorizationpolicies".to_owned()
    )));
    assert_eq!(rbac.len(), 6);
}

#[test]
fn a_pod_is_trimmed_to_what_the_translation_reads() {
    let full = pod("a", "10.1.0.1", "node-a", json!({}));
    let full_size = full.to_string().len();
    let object: DynamicObject = serde_json::from_value(full).unwrap();
    let resource = Resource::of(Kind::Pod);
    let (key, parsed) = source_object(&resource, &resource.api_resource(0), object);
    assert_eq!(key.to_string(), "Pod demo/a");
    let Ok(Object::Pod(trimmed)) = parsed else {
        panic!("not a pod: {parsed:?}")
    };
    let text = serde_json::to_string(&trimmed).unwrap();
    assert!(
        text.len() * 4 < full_size,
        "{} of {full_size} bytes: {text}",
        text.len()
    );
    assert!(trimmed.metadata.annotations.is_none());
    assert!(trimmed.metadata.managed_fields.is_none());
    let spec = trimmed.spec.as_ref().unwrap();
    assert!(spec.volumes.is_none());
    assert!(spec.containers[0].env.is_none());
    assert_eq!(
        spec.containers[0].ports.as_ref().unwrap()[0].container_port,
        8080
    );
    assert!(trimmed.status.as_ref().unwrap().conditions.is_none());

    // Translated, the trimmed pod is the same workload as the full one.
    let mut translator = Translator::new(TranslateConfig::default());
    let full = Object::from_value(&key, pod("a", "10.1.0.1", "node-a", json!({})));
    let from_full = translator.translate([full]).state;
    let from_trimmed = translator.translate([Ok(Object::Pod(trimmed))]).state;
    assert_eq!(from_full.workloads, from_trimmed.workloads);
}

#[test]
fn updates_that_change_nothing_do_not_retranslate() {
    let mut kinds = BTreeMap::from([(Kind::Pod, KindState::default())]);
    let resource = Resource::of(Kind::Pod);
    let object = |status_condition: &str| {
        let mut value = pod("a", "10.1.0.1", "node-a", json!({}));
        value["status"]["conditions"][0]["status"] = json!(status_condition);
        let object: DynamicObject = serde_json::from_value(value).unwrap();
        source_object(&resource, &resource.api_resource(0), object)
    };
    assert!(!apply(&mut kinds, Update::Relisting(Kind::Pod)));
    let (key, value) = object("True");
    assert!(!apply(&mut kinds, Update::Listed(key, value)));
    assert!(apply(&mut kinds, Update::ListDone(Kind::Pod)));
    assert!(kinds[&Kind::Pod].synced);
    // A readiness flip is invisible once trimmed.
    let (key, value) = object("False");
    assert!(!apply(&mut kinds, Update::Applied(key.clone(), value)));
    // A relist with the same objects changes nothing either.
    assert!(!apply(&mut kinds, Update::Relisting(Kind::Pod)));
    let (key2, value) = object("True");
    assert!(!apply(&mut kinds, Update::Listed(key2, value)));
    assert!(!apply(&mut kinds, Update::ListDone(Kind::Pod)));
    // During a relist the old set stays in force until the list completes.
    assert!(!apply(&mut kinds, Update::Relisting(Kind::Pod)));
    assert_eq!(kinds[&Kind::Pod].objects.len(), 1);
    assert!(apply(&mut kinds, Update::ListDone(Kind::Pod)));
    assert!(kinds[&Kind::Pod].objects.is_empty());
    assert!(!apply(&mut kinds, Update::Deleted(key)));
    assert!(!apply(&mut kinds, Update::Absent(Kind::Pod)));
}
