//! The root publisher against the fake API server: existing and new namespaces get the root,
//! a deleted ConfigMap comes back, an edited one is restored, a namespace being deleted is left
//! alone, an up-to-date one is not rewritten, and a 403 (on the watch and on a write) is logged
//! with what to grant while the controller carries on.
#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};

use super::*;
use crate::discovery::kube::fake_api::{FakeApi, Logs, WAIT, requested};

const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIBroot\n-----END CERTIFICATE-----\n";

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
           "status": {"phase": "Active"}})
}

fn terminating_namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "deletionTimestamp": "2025-01-01T00:00:00Z"},
           "status": {"phase": "Terminating"}})
}

struct Running {
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn start(api: &FakeApi) -> Running {
    let config = RootPublisherConfig {
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        cache_wait: Duration::from_secs(5),
        ..RootPublisherConfig::new(DEFAULT_ROOT_CONFIGMAP, ROOT)
    };
    let stop = CancellationToken::new();
    tokio::spawn(RootPublisher::new(api.client(), config).run(stop.clone()));
    Running { stop }
}

fn configmap(api: &FakeApi, namespace: &str) -> Option<Value> {
    api.object("", "configmaps", namespace, DEFAULT_ROOT_CONFIGMAP)
}

/// Holds the root under `root-cert.pem` and the CA's label.
fn published(api: &FakeApi, namespace: &str) -> bool {
    configmap(api, namespace).is_some_and(|cm| {
        cm["data"][ROOT_CERT_KEY] == ROOT
            && cm["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY
    })
}

/// Waits (at most [`WAIT`]) until the root is published in `namespace`.
async fn until_published(api: &FakeApi, namespace: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !published(api, namespace) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the root was not published to {namespace}: {:#?}\nrequests: {:#?}",
            configmap(api, namespace),
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn writes_to(api: &FakeApi, namespace: &str) -> usize {
    let path = format!("PATCH /api/v1/namespaces/{namespace}/configmaps/");
    api.requests()
        .iter()
        .filter(|r| r.starts_with(&path))
        .count()
}

#[tokio::test]
async fn existing_and_new_namespaces_get_the_root_but_not_one_being_deleted() {
    let api = FakeApi::start().await;
    for ns in ["mesh-system", "demo"] {
        api.apply("", "namespaces", namespace(ns));
    }
    api.apply("", "namespaces", terminating_namespace("old"));
    // Already right (a restart of the CA): left as it is.
    api.apply("", "namespaces", namespace("ready"));
    api.apply(
        "",
        "configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": DEFAULT_ROOT_CONFIGMAP, "namespace": "ready",
                            "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
               "data": {ROOT_CERT_KEY: ROOT}}),
    );
    let _running = start(&api);

    until_published(&api, "mesh-system").await;
    until_published(&api, "demo").await;
    // Server-side apply, as the CA's field manager, taking over fields others set.
    let write = api
        .requests()
        .into_iter()
        .find(|r| r.starts_with("PATCH /api/v1/namespaces/demo/configmaps/mesh-ca-root-cert?"))
        .unwrap();
    assert!(
        write.contains("fieldManager=mesh-ca") && write.contains("force=true"),
        "{write}"
    );

    // A namespace created later gets it too.
    api.apply("", "namespaces", namespace("later"));
    until_published(&api, "later").await;
    // By then every namespace listed at the start has been reconciled: the one being deleted
    // was not written to, the up-to-date one not rewritten.
    assert_eq!(writes_to(&api, "old"), 0, "{:#?}", api.requests());
    assert!(configmap(&api, "old").is_none());
    assert_eq!(writes_to(&api, "ready"), 0, "{:#?}", api.requests());

    // A change to a namespace that leaves its ConfigMap right writes nothing either.
    let before = writes_to(&api, "demo");
    let mut demo = namespace("demo");
    demo["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "ambient"});
    api.apply("", "namespaces", demo);
    api.apply("", "namespaces", namespace("after-demo"));
    until_published(&api, "after-demo").await;
    assert_eq!(writes_to(&api, "demo"), before, "{:#?}", api.requests());
}

#[tokio::test]
async fn a_deleted_configmap_is_recreated_and_an_edited_one_restored() {
    let api = FakeApi::start().await;
    api.apply("", "namespaces", namespace("demo"));
    let _running = start(&api);
    until_published(&api, "demo").await;

    api.delete("", "configmaps", "demo", DEFAULT_ROOT_CONFIGMAP);
    until_published(&api, "demo").await;

    // Someone replaces the root and drops the label, and adds a key of their own.
    let mut edited = configmap(&api, "demo").unwrap();
    edited["data"][ROOT_CERT_KEY] = json!("not the root");
    edited["data"]["extra"] = json!("theirs");
    edited["metadata"]["labels"] = json!({});
    api.apply("", "configmaps", edited);
    assert!(!published(&api, "demo"));
    until_published(&api, "demo").await;
    // Only the CA's fields are taken back.
    assert_eq!(configmap(&api, "demo").unwrap()["data"]["extra"], "theirs");
}

#[tokio::test]
async fn a_403_is_logged_with_what_to_grant_and_the_controller_carries_on() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let api = FakeApi::start().await;
    api.apply("", "namespaces", namespace("demo"));
    // The ConfigMaps may not be listed at first, and the first write is refused.
    api.fail("", "configmaps", "list", 403, 1);
    api.fail("", "configmaps", "patch", 403, 1);
    let _running = start(&api);

    // The write is retried and succeeds once allowed.
    requested(&api, "PATCH /api/v1/namespaces/demo/configmaps/", 2).await;
    until_published(&api, "demo").await;
    // Still running: a new namespace gets the root, and a deleted ConfigMap (which only the
    // recovered watch can see) comes back.
    api.apply("", "namespaces", namespace("later"));
    until_published(&api, "later").await;
    api.delete("", "configmaps", "demo", DEFAULT_ROOT_CONFIGMAP);
    until_published(&api, "demo").await;

    let text = logs.text();
    assert!(
        text.contains(
            "RBAC: the CA's service account may not list configmaps cluster-wide: grant the \
             verbs list and watch on resource \"configmaps\""
        ),
        "{text}"
    );
    assert!(text.contains("watch recovered"), "{text}");
    assert!(
        text.contains(
            "ConfigMap demo/mesh-ca-root-cert: forbidden: the CA's service account may not \
             patch configmaps; grant it (ClusterRole rule: verbs [patch] on configmaps"
        ) && text.contains("namespace=\"demo\""),
        "{text}"
    );
    // The fake API server has the ConfigMap before the controller has read the answer and
    // logged it: wait (bounded) for the line rather than race it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !logs.text().contains("published the CA root") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no \"published the CA root\" in {}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn configmap_names_are_checked() {
    for good in [DEFAULT_ROOT_CONFIGMAP, "istio-ca-root-cert", "a", "a.b-1"] {
        check_configmap_name(good).unwrap();
    }
    for bad in ["", "Root", "-a", "a-", "a_b", &"a".repeat(254)] {
        assert!(check_configmap_name(bad).is_err(), "{bad}");
    }
}

// A runtime only because a kube client needs one to exist.
#[tokio::test]
async fn retries_back_off_per_namespace_and_reset_on_success() {
    let (store, _writer) = reflector::store::<ConfigMap>();
    let context = Context {
        client: {
            let config = ::kube::Config::new("http://127.0.0.1:1".parse().unwrap());
            ::kube::Client::try_from(config).unwrap()
        },
        config: RootPublisherConfig {
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
            ..RootPublisherConfig::new(DEFAULT_ROOT_CONFIGMAP, ROOT)
        },
        configmaps: store,
        failures: Mutex::new(HashMap::new()),
    };
    let within = |delay: Duration, full: u64| {
        let full = Duration::from_secs(full);
        assert!(delay >= full / 2 && delay <= full, "{delay:?} for {full:?}");
    };
    for full in [1, 2, 4, 8, 8] {
        within(context.retry_delay("a"), full);
    }
    within(context.retry_delay("b"), 1);
    context.succeeded("a");
    within(context.retry_delay("a"), 1);
    assert_eq!(
        forbidden_verb(r#"configmaps "x" is forbidden: User "u" cannot create resource"#),
        "create"
    );
    assert_eq!(forbidden_verb("forbidden"), "create and patch");
}
