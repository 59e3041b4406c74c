use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::discovery::Store;
use crate::model::{PolicyAction, State};

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

const NAMESPACE_AND_POD: &str = "
# The demo namespace, enrolled.
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: main}]}
status: {phase: Running, podIP: 10.0.0.1}
";

const SERVICE_AND_POLICY: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.2]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-policy, namespace: demo}
spec: {action: DENY, rules: [{}]}
";

const OVERRIDE_POLICY: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: web-policy, namespace: demo}
spec: {rules: [{from: [{source: {namespaces: [demo]}}]}]}
";

fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo}}
spec: {{nodeName: node-a, containers: [{{name: main}}]}}
status: {{phase: Running, podIP: {ip}}}
---
"
    )
}

fn deny_policy(ports: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-web, namespace: demo}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{ports: [{ports}]}}}}]}}]
---
"
    )
}

fn source(path: &Path, registry: &mut Registry) -> FileSource {
    let config = FileSourceConfig {
        poll_interval: Duration::from_millis(20),
        ..FileSourceConfig::new(path)
    };
    FileSource::new(config, registry)
}

/// The value of one sample in the text exposition, e.g.
/// `mesh_config_rejected_total{kind="Pod"}`.
fn metric(registry: &Registry, sample: &str) -> Option<f64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

async fn wait_for(store: &Store, what: &str, condition: impl Fn(&State) -> bool) {
    let mut versions = store.subscribe();
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            if condition(&store.snapshot()) {
                return;
            }
            versions.changed().await.unwrap();
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

/// Writes a file so that polling sees a change even on a filesystem with coarse timestamps:
/// the size differs from any earlier version in these tests, or the content is appended.
fn write(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
}

#[tokio::test]
async fn initial_load_reads_the_yaml_files_of_a_directory_in_order() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("10-namespace.yaml"), NAMESPACE_AND_POD);
    write(&dir.path().join("20-service.yml"), SERVICE_AND_POLICY);
    // Sorted after 20-service.yml, so its definition of web-policy wins.
    write(&dir.path().join("30-override.yaml"), OVERRIDE_POLICY);
    // Not read: other extensions, dot-files (ConfigMap mount internals), subdirectories.
    write(&dir.path().join("README.md"), "not: [yaml");
    write(&dir.path().join(".hidden.yaml"), "not: [yaml");
    std::fs::create_dir(dir.path().join("nested")).unwrap();
    write(&dir.path().join("nested/x.yaml"), "not: [yaml");

    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    assert!(!store.has_synced());

    let report = source.load_once(&writer).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(
        (report.files, report.objects, report.ignored, report.version),
        (3, 5, 0, 1)
    );
    assert!(store.has_synced());

    let state = store.snapshot();
    assert!(state.workloads["demo/client"].enrolled);
    assert_eq!(state.services["demo/web"].endpoints.len(), 1);
    assert_eq!(state.authorization_policies.len(), 1);
    assert_eq!(state.authorization_policies[0].action, PolicyAction::Allow);

    assert_eq!(
        metric(&registry, r#"mesh_config_objects{kind="Pod"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_objects{kind="AuthorizationPolicy"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_objects{kind="PeerAuthentication"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&registry, r#"mesh_config_reloads_total{result="success"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn edits_deletions_and_new_files_are_picked_up_by_polling() {
    let dir = tempfile::tempdir().unwrap();
    let pods = dir.path().join("pods.yaml");
    write(&pods, &pod("a", "10.0.0.1"));

    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    source.load_once(&writer).await.unwrap();
    assert!(store.snapshot().workloads.contains_key("demo/a"));

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(writer, shutdown.clone()));

    write(&pods, &(pod("a", "10.0.0.1") + &pod("b", "10.0.0.2")));
    wait_for(&store, "pod b", |s| s.workloads.contains_key("demo/b")).await;

    write(&dir.path().join("more.yml"), &pod("c", "10.0.0.3"));
    wait_for(&store, "pod c from a new file", |s| s.workloads.len() == 3).await;

    std::fs::remove_file(&pods).unwrap();
    wait_for(&store, "pods a and b gone", |s| {
        s.workloads.keys().collect::<Vec<_>>() == ["demo/c"]
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(metric(&registry, r#"mesh_config_reloads_total{result="success"}"#).unwrap() >= 4.0);
}

#[tokio::test]
async fn unchanged_files_are_not_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("pods.yaml"), &pod("a", "10.0.0.1"));
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    source.load_once(&writer).await.unwrap();

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(writer, shutdown.clone()));
    // Ten polls' worth of time: nothing changed, so nothing is published.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.version(), 1);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn broken_yaml_keeps_the_files_last_good_contents_while_other_files_apply() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    let pods = dir.path().join("pods.yaml");
    write(&policies, &deny_policy("'80'"));
    write(&pods, &pod("a", "10.0.0.1"));

    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    source.load_once(&writer).await.unwrap();

    // The second document of policies.yaml is broken; pods.yaml changes too.
    write(&policies, &(deny_policy("'8080'") + "kind: [unclosed\n"));
    write(&pods, &(pod("a", "10.0.0.1") + &pod("b", "10.0.0.2")));
    let report = source.load_once(&writer).await.unwrap();

    assert_eq!(report.rejected.len(), 1);
    let message = report.rejected[0].to_string();
    assert!(
        message.starts_with(&format!(
            "{}: document 2: invalid YAML: ",
            policies.display()
        )),
        "{message}"
    );
    let state = store.snapshot();
    // The whole file's last good contents stay (port 80, not the new 8080)...
    assert_eq!(
        state.authorization_policies[0].rules[0].to[0].ports,
        vec![80]
    );
    // ...and the other file applied.
    assert!(state.workloads.contains_key("demo/b"));
    assert_eq!(
        metric(&registry, r#"mesh_config_rejected_total{kind="unknown"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&registry, r#"mesh_config_reloads_total{result="partial"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_objects{kind="AuthorizationPolicy"}"#
        ),
        Some(1.0)
    );

    // Fixing the file applies it.
    write(&policies, &deny_policy("'8080'"));
    let report = source.load_once(&writer).await.unwrap();
    assert!(report.rejected.is_empty());
    assert_eq!(
        store.snapshot().authorization_policies[0].rules[0].to[0].ports,
        vec![8080]
    );
}

#[tokio::test]
async fn broken_yaml_in_a_file_never_loaded_before_applies_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let broken = pod("a", "10.0.0.1") + "apiVersion: v1\nkind: [broken\n";
    write(&dir.path().join("a.yaml"), &broken);
    write(&dir.path().join("b.yaml"), &pod("b", "10.0.0.2"));
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let report = source.load_once(&writer).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(writer.store().has_synced());
    // The other file, and the documents of the broken file before the error, apply.
    let state = writer.store().snapshot();
    assert_eq!(
        state.workloads.keys().collect::<Vec<_>>(),
        ["demo/a", "demo/b"]
    );
}

#[tokio::test]
async fn a_bad_object_keeps_its_last_good_version_and_names_file_and_document() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.yaml");
    write(&file, &(deny_policy("'80'") + &pod("a", "10.0.0.1")));

    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    source.load_once(&writer).await.unwrap();

    write(&file, &(deny_policy("'80', http") + &pod("a", "10.0.0.9")));
    let report = source.load_once(&writer).await.unwrap();
    let messages: Vec<_> = report.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        vec![format!(
            r#"{}: document 1: AuthorizationPolicy demo/deny-web: spec.rules[0].to[0].operation.ports[1]: "http" is not a port number"#,
            file.display()
        )]
    );
    let state = store.snapshot();
    assert_eq!(
        state.authorization_policies[0].rules[0].to[0].ports,
        vec![80]
    );
    assert_eq!(
        state.workloads["demo/a"].ips,
        vec!["10.0.0.9".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_rejected_total{kind="AuthorizationPolicy"}"#
        ),
        Some(1.0)
    );

    // A schema error (wrong type) is pinned to its object too.
    write(
        &file,
        &(deny_policy("'80'").replace("rules: [", "rulez: [") + &pod("a", "10.0.0.9")),
    );
    let report = source.load_once(&writer).await.unwrap();
    let message = report.rejected[0].to_string();
    assert!(
        message.contains(
            "document 1: AuthorizationPolicy demo/deny-web: spec.rulez: unknown field `rulez`"
        ),
        "{message}"
    );
    assert_eq!(
        store.snapshot().authorization_policies[0].rules[0].to[0].ports,
        vec![80]
    );
}

#[tokio::test]
async fn unknown_kinds_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec: {}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative, namespace: demo}
---
"
    .to_owned()
        + &pod("a", "10.0.0.1");
    write(&dir.path().join("mixed.yaml"), &yaml);
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let report = source.load_once(&writer).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.ignored, 2);
    assert!(writer.store().snapshot().workloads.contains_key("demo/a"));
    assert!(writer.store().snapshot().services.is_empty());
    assert_eq!(
        metric(&registry, r#"mesh_config_ignored_total{kind="Deployment"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&registry, r#"mesh_config_ignored_total{kind="Service"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&registry, r#"mesh_config_reloads_total{result="success"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_document_without_a_name_rejects_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pods.yaml");
    write(&file, &pod("a", "10.0.0.1"));
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    source.load_once(&writer).await.unwrap();

    let nameless = "apiVersion: v1\nkind: Pod\nmetadata: {namespace: demo}\n---\n";
    write(&file, &(pod("b", "10.0.0.2") + nameless));
    let report = source.load_once(&writer).await.unwrap();
    assert_eq!(
        report
            .rejected
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![format!(
            "{}: document 2: Pod without metadata.name",
            file.display()
        )]
    );
    let state = writer.store().snapshot();
    assert_eq!(state.workloads.keys().collect::<Vec<_>>(), ["demo/a"]);
    assert_eq!(
        metric(&registry, r#"mesh_config_rejected_total{kind="Pod"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_single_file_path_and_a_path_that_appears_later() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.txt");
    let mut registry = Registry::default();
    let mut source = source(&file, &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();

    let error = source.load_once(&writer).await.unwrap_err();
    assert!(matches!(error, FileSourceError::Scan { .. }), "{error}");
    assert!(error.to_string().contains("does it exist"), "{error}");
    assert!(!store.has_synced());
    assert_eq!(
        metric(&registry, r#"mesh_config_reloads_total{result="failure"}"#),
        Some(1.0)
    );

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(writer, shutdown.clone()));
    // A file path is read whatever its extension.
    write(&file, &pod("a", "10.0.0.1"));
    wait_for(&store, "the file to appear", |s| {
        s.workloads.contains_key("demo/a")
    })
    .await;
    assert!(store.has_synced());
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    // The missing file was reported once, not once per poll.
    assert_eq!(
        metric(&registry, r#"mesh_config_reloads_total{result="failure"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn list_documents_are_expanded() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: demo}
  spec: {nodeName: node-a, containers: [{name: main}]}
  status: {phase: Running, podIP: 10.0.0.1}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: demo}
  spec: {clusterIP: bogus}
";
    let file = dir.path().join("list.yaml");
    write(&file, yaml);
    let mut registry = Registry::default();
    let mut source = source(&file, &mut registry);
    let writer = StoreWriter::new();
    let report = source.load_once(&writer).await.unwrap();
    assert_eq!(
        report
            .rejected
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![format!(
            r#"{}: document 1, items[1]: Service demo/web: spec.clusterIP: "bogus" is not an IP address"#,
            file.display()
        )]
    );
    assert!(writer.store().snapshot().workloads.contains_key("demo/a"));
}

#[test]
fn empty_and_comment_only_documents_are_skipped() {
    let parsed = parse_file(
        Path::new("x.yaml"),
        "# nothing\n---\n---\n# still nothing\n",
    );
    assert!(parsed.objects.is_empty() && parsed.errors.is_empty() && parsed.ignored.is_empty());
    let parsed = parse_file(Path::new("x.yaml"), "");
    assert!(parsed.objects.is_empty() && parsed.errors.is_empty());
    let parsed = parse_file(Path::new("x.yaml"), "just a string\n");
    assert_eq!(parsed.errors.len(), 1);
    let parsed = parse_file(Path::new("x.yaml"), "kind: Pod\nmetadata: {name: a}\n");
    assert_eq!(
        parsed.errors[0].to_string(),
        "x.yaml: document 1: not a Kubernetes object: apiVersion and kind are required"
    );
}

#[test]
fn the_store_handle_is_shared() {
    let writer = StoreWriter::new();
    let a = writer.store();
    let b = a.clone();
    writer.apply(State::default());
    assert!(Arc::ptr_eq(&a.snapshot(), &b.snapshot()));
}

#[tokio::test]
async fn traffic_objects_and_waypoints_load_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("traffic.yaml");
    let good = "
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
# Istio's own (ingress) Gateway kind: the ingress gateway's.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: demo}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - route:
    - {destination: {host: web, subset: v1}, weight: 90}
    - {destination: {host: web, subset: v2}, weight: 10}
    timeout: 3s
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
";
    write(&file, good);
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    let report = source.load_once(&writer).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!((report.objects, report.ignored), (6, 0));

    let state = store.snapshot();
    assert_eq!(
        state.services["demo/web"]
            .waypoint
            .as_ref()
            .map(|w| w.service_key()),
        Some("demo/waypoint".to_owned())
    );
    assert!(state.waypoint_gateways.contains_key("demo/waypoint"));
    assert_eq!(state.ingress_gateways[0].key(), "demo/public");
    assert_eq!(
        state.virtual_services[0].hosts,
        ["web.demo.svc.cluster.local"]
    );
    assert_eq!(
        state.virtual_services[0].http[0].timeout,
        Some(Duration::from_secs(3))
    );
    assert_eq!(state.destination_rules[0].subsets.len(), 2);
    for kind in [
        "VirtualService",
        "DestinationRule",
        "Gateway",
        "Gateway.networking.istio.io",
    ] {
        assert_eq!(
            metric(
                &registry,
                &format!(r#"mesh_config_objects{{kind="{kind}"}}"#)
            ),
            Some(1.0),
            "{kind}"
        );
    }

    // A bad duration rejects the VirtualService, naming file, document and field; the last
    // good version stays in force.
    write(&file, &good.replace("timeout: 3s", "timeout: 3 seconds"));
    let report = source.load_once(&writer).await.unwrap();
    let messages: Vec<_> = report.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        vec![format!(
            r#"{}: document 5: VirtualService demo/web: spec.http[0].timeout: "3 seconds" is not a duration (the unit is not one of ns, us, ms, s, m, h); write it like 100ms, 0.5s, 3s, 1m or 1h"#,
            file.display()
        )]
    );
    assert_eq!(
        store.snapshot().virtual_services[0].http[0].timeout,
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_rejected_total{kind="VirtualService"}"#
        ),
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------------------------
// Typos: strict fields, near-miss kinds, routes to undefined subsets

#[tokio::test]
async fn a_misspelt_pod_field_is_rejected_and_the_pod_stays_in_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    write(&file, NAMESPACE_AND_POD);
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    source.load_once(&writer).await.unwrap();
    let meshed = |state: &State| {
        let client = &state.workloads["demo/client"];
        assert!(client.enrolled);
        assert_eq!(
            client.ips,
            ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            client.identity.to_string(),
            "spiffe://cluster.local/ns/demo/sa/client"
        );
    };
    meshed(&store.snapshot());

    // `podIp:` would leave the pod without an IP (out of the mesh, plaintext to it), and
    // `serviceAcountName:` would make it sa/default. Each is rejected, naming file, document,
    // object and field; the pod keeps its last good version.
    for (typo, field, meant) in [
        ("podIP:", "status.podIp", "podIP"),
        (
            "serviceAccountName:",
            "spec.serviceAcountName",
            "serviceAccountName",
        ),
    ] {
        let wrong = field.rsplit('.').next().unwrap();
        write(
            &file,
            &NAMESPACE_AND_POD.replace(typo, &format!("{wrong}:")),
        );
        let report = source.load_once(&writer).await.unwrap();
        let messages: Vec<_> = report.rejected.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [format!(
                "{}: document 2: Pod demo/client: {field}: unknown field `{wrong}`: the Pod schema has no such field here; did you mean `{meant}`?",
                file.display()
            )]
        );
        meshed(&store.snapshot());
    }
    assert_eq!(
        metric(&registry, r#"mesh_config_rejected_total{kind="Pod"}"#),
        Some(2.0)
    );

    // A new pod with a typo has no last good version: it is not applied, and says so.
    write(
        &file,
        &(NAMESPACE_AND_POD.to_owned()
            + "---\n"
            + &pod("new", "10.0.0.5").replace("podIP", "podIp")),
    );
    let report = source.load_once(&writer).await.unwrap();
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
    assert!(
        report.rejected[0]
            .to_string()
            .contains("Pod demo/new: status.podIp: unknown field `podIp`"),
        "{}",
        report.rejected[0]
    );
    assert!(!store.snapshot().workloads.contains_key("demo/new"));
    meshed(&store.snapshot());
}

#[tokio::test]
async fn near_miss_kinds_get_a_did_you_mean_warning_naming_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.yaml");
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorisationPolicy
metadata: {name: deny-all, namespace: demo}
spec: {action: DENY, rules: [{}]}
---
apiVersion: networking.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: demo}
spec: {}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative, namespace: demo}
";
    write(&file, yaml);
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let report = source.load_once(&writer).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.ignored, 3);
    let warnings: Vec<_> = report.warnings.iter().map(ToString::to_string).collect();
    let path = file.display();
    assert_eq!(
        warnings,
        [
            format!(
                "{path}: document 1 (AuthorisationPolicy demo/deny-all): kind: apiVersion: security.istio.io/v1, kind: AuthorisationPolicy is not a type this proxy reads; did you mean apiVersion: security.istio.io/v1, kind: AuthorizationPolicy? The document is skipped [UnknownKind]"
            ),
            format!(
                "{path}: document 2 (AuthorizationPolicy demo/allow-web): apiVersion: apiVersion: networking.istio.io/v1, kind: AuthorizationPolicy is not a type this proxy reads; did you mean apiVersion: security.istio.io/v1, kind: AuthorizationPolicy? The document is skipped [UnknownKind]"
            ),
        ]
    );
    // In the published state (the config dump shows it) and in the metric.
    assert_eq!(writer.store().snapshot().warnings, report.warnings);
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_warnings{kind="AuthorisationPolicy",code="UnknownKind"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_warnings{kind="AuthorizationPolicy",code="UnknownKind"}"#
        ),
        Some(1.0)
    );
    // Somebody else's kind is only ignored.
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_warnings{kind="Service",code="UnknownKind"}"#
        ),
        None
    );

    // Fixed, the policy applies and the warnings clear.
    write(
        &file,
        &yaml
            .replace("AuthorisationPolicy", "AuthorizationPolicy")
            .replace("networking.istio.io/v1", "security.istio.io/v1"),
    );
    let report = source.load_once(&writer).await.unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(writer.store().snapshot().authorization_policies.len(), 2);
    assert!(writer.store().snapshot().warnings.is_empty());
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_warnings{kind="AuthorisationPolicy",code="UnknownKind"}"#
        ),
        None
    );
}

#[tokio::test]
async fn a_route_to_an_undefined_subset_is_a_warning_in_the_metric_and_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("traffic.yaml");
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: demo}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v3}, weight: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
";
    write(&file, yaml);
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let report = source.load_once(&writer).await.unwrap();
    // Accepted, as Istio accepts it.
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(writer.store().snapshot().virtual_services.len(), 1);
    let warnings: Vec<_> = report.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "VirtualService demo/reviews: spec.http[0].route[1].destination.subset: Referenced host+subset in destinationrule not found: \"reviews.demo.svc.cluster.local+v3\" (DestinationRule demo/reviews (host reviews.demo.svc.cluster.local) defines only v1, v2); requests routed there fail with 503 NC [IST0101]"
        ]
    );
    assert_eq!(writer.store().snapshot().warnings, report.warnings);
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_warnings{kind="VirtualService",code="IST0101"}"#
        ),
        Some(1.0)
    );

    write(&file, &yaml.replace("{name: v2,", "{name: v3,"));
    let report = source.load_once(&writer).await.unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(
        metric(
            &registry,
            r#"mesh_config_warnings{kind="VirtualService",code="IST0101"}"#
        ),
        None
    );
}

// ---------------------------------------------------------------------------------------------
// Unreadable files and directories keep the last good state

fn pod_names(store: &Store) -> Vec<String> {
    store.snapshot().workloads.keys().cloned().collect()
}

#[tokio::test]
async fn an_unreadable_file_keeps_its_last_good_contents_and_a_deleted_one_is_removed() {
    use std::os::unix::fs::symlink;

    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.yaml");
    write(&cluster, &pod("a", "10.0.0.1"));
    write(&dir.path().join("other.yaml"), &pod("b", "10.0.0.2"));
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    source.load_once(&writer).await.unwrap();
    assert_eq!(pod_names(&store), ["demo/a", "demo/b"]);

    // (how the file is broken, what the error says)
    /// Breaks the file in place.
    type Break = fn(&Path);
    let cases: [(&str, Break, &str); 4] = [
        (
            "a dangling symbolic link",
            |cluster| symlink("missing.yaml", cluster).unwrap(),
            "cannot read: a symbolic link to missing.yaml: No such file or directory",
        ),
        (
            "a symbolic link loop",
            |cluster| {
                let loop_back = cluster.with_file_name("loop");
                symlink("loop", cluster).unwrap();
                symlink("cluster.yaml", loop_back).unwrap();
            },
            "cannot read: a symbolic link to loop: Too many levels of symbolic links",
        ),
        (
            "not UTF-8",
            |cluster| std::fs::write(cluster, b"apiVersion: v1\nkind: \xff\xfe\n").unwrap(),
            "YAML files must be UTF-8",
        ),
        (
            // Reading it would block the source for ever.
            "a FIFO",
            |cluster| {
                let made = std::process::Command::new("mkfifo").arg(cluster).status();
                assert!(made.unwrap().success(), "mkfifo {}", cluster.display());
            },
            "cannot read: not a regular file",
        ),
    ];
    for (i, (what, break_it, why)) in cases.into_iter().enumerate() {
        std::fs::remove_file(&cluster).unwrap();
        let _ = std::fs::remove_file(dir.path().join("loop"));
        break_it(&cluster);
        let report = source.load_once(&writer).await.unwrap();
        assert_eq!(report.files, 2, "{what}: the file is still listed");
        assert_eq!(report.rejected.len(), 1, "{what}: {:?}", report.rejected);
        let message = report.rejected[0].to_string();
        assert!(
            message.starts_with(&format!("{}: ", cluster.display())) && message.contains(why),
            "{what}: {message}"
        );
        assert_eq!(pod_names(&store), ["demo/a", "demo/b"], "{what}");
        assert_eq!(
            metric(&registry, r#"mesh_config_reloads_total{result="partial"}"#),
            Some(i as f64 + 1.0),
            "{what}"
        );
    }
    assert_eq!(
        metric(&registry, r#"mesh_config_rejected_total{kind="unknown"}"#),
        Some(4.0)
    );

    // Deleted for real: its objects go, the other file's stay.
    std::fs::remove_file(&cluster).unwrap();
    let report = source.load_once(&writer).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.files, 1);
    assert_eq!(pod_names(&store), ["demo/b"]);
}

#[tokio::test]
async fn polling_keeps_a_file_whose_link_breaks_and_reads_it_again_when_it_is_back() {
    use std::os::unix::fs::symlink;

    // As a ConfigMap mount: the listed name is a link to a file elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let target = data.path().join("cluster.yaml");
    write(&target, &pod("a", "10.0.0.1"));
    symlink(&target, dir.path().join("cluster.yaml")).unwrap();
    let mut registry = Registry::default();
    let mut source = source(dir.path(), &mut registry);
    let writer = StoreWriter::new();
    let store = writer.store();
    source.load_once(&writer).await.unwrap();
    assert_eq!(pod_names(&store), ["demo/a"]);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(writer, shutdown.clone()));

    std::fs::remove_file(&target).unwrap();
    wait_for(&store, "the reload after the link broke", |_| {
        store.version() >= 2
    })
    .await;
    assert_eq!(
        pod_names(&store),
        ["demo/a"],
        "a broken link must not empty the mesh"
    );
    assert_eq!(
        metric(&registry, r#"mesh_config_rejected_total{kind="unknown"}"#),
        Some(1.0)
    );

    write(&target, &pod("b", "10.0.0.2"));
    wait_for(&store, "the file read again", |s| {
        s.workloads.contains_key("demo/b")
    })
    .await;
    assert_eq!(pod_names(&store), ["demo/b"]);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_config_path_that_cannot_be_listed_keeps_the_whole_state() {
    use std::os::unix::fs::symlink;

    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    write(&real.join("cluster.yaml"), &pod("a", "10.0.0.1"));
    let single = dir.path().join("single.yaml");
    write(&single, &pod("b", "10.0.0.2"));

    // The configured directory, and a configured single file, each behind a link.
    for (config, target) in [
        (dir.path().join("conf"), &real),
        (dir.path().join("conf.yaml"), &single),
    ] {
        symlink(target, &config).unwrap();
        let mut registry = Registry::default();
        let mut source = source(&config, &mut registry);
        let writer = StoreWriter::new();
        let store = writer.store();
        source.load_once(&writer).await.unwrap();
        let before = pod_names(&store);
        assert_eq!(before.len(), 1);

        for (what, break_it) in [
            (
                "dangling",
                (|config: &Path| symlink("gone", config).unwrap()) as fn(&Path),
            ),
            ("a loop", |config: &Path| {
                symlink(config.file_name().unwrap(), config).unwrap()
            }),
        ] {
            std::fs::remove_file(&config).unwrap();
            break_it(&config);
            let error = source.load_once(&writer).await.unwrap_err();
            assert!(
                matches!(error, FileSourceError::Scan { .. }),
                "{what}: {error}"
            );
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("config path {}: ", config.display())),
                "{what}: {error}"
            );
            assert_eq!(pod_names(&store), before, "{}: {what}", config.display());
        }
        assert_eq!(
            metric(&registry, r#"mesh_config_reloads_total{result="failure"}"#),
            Some(2.0)
        );
    }
}
