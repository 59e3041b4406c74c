use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::*;

/// Parses YAML documents the way a source does: YAML -> JSON value -> typed object.
pub(super) fn parse(yaml: &str) -> Vec<SourceObject> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .filter(|yaml| !yaml.is_null())
        .map(|yaml| {
            let json = serde_json::to_value(&yaml).unwrap();
            let api_version = json["apiVersion"].as_str().unwrap();
            let kind = Kind::from_type(api_version, json["kind"].as_str().unwrap()).unwrap();
            let meta = &json["metadata"];
            let key = ObjectKey::new(
                kind,
                meta["namespace"].as_str(),
                meta["name"].as_str().unwrap(),
            );
            Object::from_value(&key, json)
        })
        .collect()
}

pub(super) fn translate(yaml: &str) -> Translation {
    Translator::new(TranslateConfig::default()).translate(parse(yaml))
}

pub(super) fn messages(t: &Translation) -> Vec<String> {
    t.rejections.iter().map(|r| r.error.to_string()).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn namespace(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\n---\n"
    )
}

/// A running pod; `labels` and `extra_spec` are spliced in as YAML flow/block text.
pub(super) fn pod(ns: &str, name: &str, ip: &str, labels: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{{labels}}}
spec:
  nodeName: node-a
  containers:
  - name: main
{extra_spec}
status:
  phase: Running
  podIP: {ip}
---
"
    )
}

pub(super) const AMBIENT: &str = "istio.io/dataplane-mode: ambient";

// ---------------------------------------------------------------------------------------------
// Pods and enrolment

#[test]
fn enrolment_follows_namespace_label_and_pod_opt_out() {
    let yaml = [
        namespace("mesh", AMBIENT),
        namespace("plain", "team: a"),
        namespace("off", "istio.io/dataplane-mode: none"),
        pod("mesh", "in", "10.0.0.1", "app: a", ""),
        pod(
            "mesh",
            "opted-out",
            "10.0.0.2",
            "istio.io/dataplane-mode: none",
            "",
        ),
        pod("plain", "not-ambient", "10.0.0.3", "", ""),
        pod("off", "ns-off", "10.0.0.4", "", ""),
        pod("missing-ns", "no-namespace-object", "10.0.0.5", "", ""),
        pod(
            "mesh",
            "host-net",
            "192.168.1.10",
            "",
            "  hostNetwork: true",
        ),
        // A pod label cannot enrol a pod of a namespace that is not ambient.
        pod("plain", "pod-label-only", "10.0.0.6", AMBIENT, ""),
    ]
    .concat();
    let t = translate(&yaml);
    assert_eq!(messages(&t), Vec::<String>::new());
    let cases = [
        ("mesh/in", true),
        ("mesh/opted-out", false),
        ("plain/not-ambient", false),
        ("off/ns-off", false),
        ("missing-ns/no-namespace-object", false),
        ("mesh/host-net", false),
        ("plain/pod-label-only", false),
    ];
    for (uid, enrolled) in cases {
        let w = t
            .state
            .workloads
            .get(uid)
            .unwrap_or_else(|| panic!("{uid} missing"));
        assert_eq!(w.enrolled, enrolled, "{uid}");
    }
    // Every running pod is a workload; only host-network pods stay out of the IP index.
    assert_eq!(t.state.workloads.len(), cases.len());
    assert_eq!(
        t.state.workload_by_ip(ip("10.0.0.1")).unwrap().uid,
        "mesh/in"
    );
    assert!(t.state.workload_by_ip(ip("192.168.1.10")).is_none());
    assert_eq!(
        t.state.namespaces["mesh"],
        labels(&[("istio.io/dataplane-mode", "ambient")])
    );
}

#[test]
fn namespace_label_flip_re_enrols_running_pods() {
    let mut translator = Translator::new(TranslateConfig::default());
    let pods = pod("demo", "web", "10.0.0.1", "", "");
    let on = translator.translate(parse(&(namespace("demo", AMBIENT) + &pods)));
    assert!(on.state.workloads["demo/web"].enrolled);
    let off = translator.translate(parse(&(namespace("demo", "") + &pods)));
    assert!(!off.state.workloads["demo/web"].enrolled);
    let on_again = translator.translate(parse(&(namespace("demo", AMBIENT) + &pods)));
    assert!(on_again.state.workloads["demo/web"].enrolled);
}

#[test]
fn pods_without_ip_or_not_running_are_skipped_without_error() {
    let yaml = "
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: demo}
spec: {nodeName: node-a, containers: [{name: main}]}
status: {phase: Pending, podIP: 10.0.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: no-ip, namespace: demo}
spec: {nodeName: node-a, containers: [{name: main}]}
status: {phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: no-status, namespace: demo}
spec: {containers: [{name: main}]}
";
    let t = translate(yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    assert!(t.state.workloads.is_empty());
    // They are valid objects, in force, just not workloads yet.
    assert_eq!(t.in_force[&Kind::Pod], 3);
}

#[test]
fn pod_fields_identity_names_ports_and_ips() {
    let yaml = "
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v2-7d4b9c8f6-x2x9z
  namespace: bookinfo
  labels: {app: reviews, version: v2, pod-template-hash: 7d4b9c8f6}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v2-7d4b9c8f6, uid: u1, controller: true}
spec:
  nodeName: node-b
  serviceAccountName: bookinfo-reviews
  containers:
  - name: reviews
    ports:
    - {name: http, containerPort: 9080}
    - {containerPort: 9443}
  - name: metrics
    ports: [{name: metrics, containerPort: 15090, protocol: TCP}]
status:
  phase: Running
  podIP: 10.1.0.7
  podIPs: [{ip: 10.1.0.7}, {ip: 'fd00::7'}]
";
    let t = translate(yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let w = &t.state.workloads["bookinfo/reviews-v2-7d4b9c8f6-x2x9z"];
    let expected = Workload {
        uid: "bookinfo/reviews-v2-7d4b9c8f6-x2x9z".into(),
        name: "reviews-v2-7d4b9c8f6-x2x9z".into(),
        namespace: "bookinfo".into(),
        ips: vec![ip("10.1.0.7"), ip("fd00::7")],
        node: "node-b".into(),
        service_account: "bookinfo-reviews".into(),
        identity: "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
            .parse()
            .unwrap(),
        labels: labels(&[
            ("app", "reviews"),
            ("pod-template-hash", "7d4b9c8f6"),
            ("version", "v2"),
        ]),
        enrolled: false,
        workload_name: "reviews-v2".into(),
        workload_kind: "deployment".into(),
        canonical_service: "reviews".into(),
        canonical_revision: "v2".into(),
        named_ports: [("http".to_string(), 9080), ("metrics".to_string(), 15090)].into(),
    };
    assert_eq!(**w, expected);
    assert_eq!(
        t.state.workload_by_ip(ip("fd00::7")).unwrap().uid,
        expected.uid
    );
}

#[test]
fn trust_domain_is_a_parameter_and_service_account_defaults() {
    let config = TranslateConfig {
        trust_domain: "example.org".into(),
        ..TranslateConfig::default()
    };
    let t = Translator::new(config).translate(parse(&pod("demo", "p", "10.0.0.1", "", "")));
    let w = &t.state.workloads["demo/p"];
    assert_eq!(w.service_account, "default");
    assert_eq!(
        w.identity.to_string(),
        "spiffe://example.org/ns/demo/sa/default"
    );
}

#[test]
fn workload_name_and_kind_from_owner() {
    let owner = |kind: &str, name: &str| {
        format!(
            "  ownerReferences: [{{apiVersion: apps/v1, kind: {kind}, name: {name}, uid: u, controller: true}}]\n"
        )
    };
    let with_owner = |name: &str, labels: &str, owner: &str| {
        pod("demo", name, "10.0.0.1", labels, "").replacen("spec:\n", &format!("{owner}spec:\n"), 1)
    };
    let cases = [
        // (pod, labels, owner, workload name, kind)
        (
            "web-5d9c-abcde",
            "pod-template-hash: 5d9c",
            owner("ReplicaSet", "web-5d9c"),
            "web",
            "deployment",
        ),
        // Without the hash label the ReplicaSet cannot be traced to a Deployment.
        (
            "rs-only-xyz",
            "",
            owner("ReplicaSet", "rs-only"),
            "rs-only",
            "replicaset",
        ),
        ("db-0", "", owner("StatefulSet", "db"), "db", "statefulset"),
        (
            "agent-q7x",
            "",
            owner("DaemonSet", "agent"),
            "agent",
            "daemonset",
        ),
        ("bare", "", String::new(), "bare", "pod"),
    ];
    for (name, labels, owner, workload, kind) in cases {
        let t = translate(&with_owner(name, labels, &owner));
        assert!(t.rejections.is_empty(), "{:?}", messages(&t));
        let w = &t.state.workloads[&format!("demo/{name}")];
        assert_eq!(
            (w.workload_name.as_str(), w.workload_kind.as_str()),
            (workload, kind),
            "{name}"
        );
    }
}

#[test]
fn canonical_service_and_revision_precedence() {
    let cases = [
        (
            "service.istio.io/canonical-name: canon, app.kubernetes.io/name: k8s, app: app, \
             service.istio.io/canonical-revision: r1, app.kubernetes.io/version: r2, version: r3",
            "canon",
            "r1",
        ),
        (
            "app.kubernetes.io/name: k8s, app: app, app.kubernetes.io/version: r2, version: r3",
            "k8s",
            "r2",
        ),
        ("app: app, version: r3", "app", "r3"),
        ("", "solo", "latest"),
    ];
    for (labels, service, revision) in cases {
        let t = translate(&pod("demo", "solo", "10.0.0.1", labels, ""));
        let w = &t.state.workloads["demo/solo"];
        assert_eq!(
            (w.canonical_service.as_str(), w.canonical_revision.as_str()),
            (service, revision),
            "{labels}"
        );
    }
}

#[test]
fn pod_errors_name_the_field() {
    let cases = [
        (
            pod("demo", "p", "10.0.0.300", "", ""),
            r#"Pod demo/p: status.podIP: "10.0.0.300" is not an IP address"#,
        ),
        (
            pod(
                "demo",
                "p",
                "10.0.0.1",
                "",
                "    ports: [{name: http, containerPort: 70000}]",
            ),
            r#"Pod demo/p: spec.containers[0].ports[0].containerPort: "70000" is not a port number"#,
        ),
        (
            pod("demo", "p", "10.0.0.1", "", "  serviceAccountName: Bad_SA"),
            r#"Pod demo/p: spec.serviceAccountName: identity "spiffe://cluster.local/ns/demo/sa/Bad_SA": service account "Bad_SA" is not a valid Kubernetes name: only lowercase letters, digits, '-' and '.' are allowed"#,
        ),
        (
            pod("demo", "p", "10.0.0.1", "", "").replace("  nodeName: node-a\n", ""),
            "Pod demo/p: spec.nodeName: a running pod must name its node",
        ),
    ];
    for (yaml, message) in cases {
        let t = translate(&yaml);
        assert_eq!(messages(&t), vec![message.to_string()]);
        assert!(t.state.workloads.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Services and endpoints

const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, labels: {app: web}}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00:96::10']
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 9000, targetPort: 9001}
  - {name: grpc, port: 7070}
  - {name: dns, port: 53, protocol: UDP, targetPort: '5353'}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: demo}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: demo}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: admin, port: 9001}]
endpoints:
- addresses: [10.0.0.2]
  targetRef: {kind: Pod, name: web-2, namespace: demo}
- addresses: [10.0.0.1]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: web-1}
- addresses: [10.0.0.3]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-def
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ['fd00::2']
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: orphan-xyz
  namespace: demo
  labels: {kubernetes.io/service-name: gone}
addressType: IPv4
endpoints: [{addresses: [10.0.0.9]}]
";

#[test]
fn services_ports_vips_and_hostnames() {
    let t = translate(SERVICES);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let web = &t.state.services["demo/web"];
    assert_eq!(web.hostname, "web.demo.svc.cluster.local");
    assert_eq!(web.vips, vec![ip("10.96.0.10"), ip("fd00:96::10")]);
    assert_eq!(web.labels, labels(&[("app", "web")]));
    let ports: Vec<_> = web
        .ports
        .iter()
        .map(|p| {
            (
                p.name.as_deref(),
                p.port,
                p.target.clone(),
                p.protocol.as_str(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        vec![
            (Some("http"), 80, TargetPort::Named("http".into()), "TCP"),
            (Some("admin"), 9000, TargetPort::Number(9001), "TCP"),
            (Some("grpc"), 7070, TargetPort::Number(7070), "TCP"),
            (Some("dns"), 53, TargetPort::Number(5353), "UDP"),
        ]
    );
    assert!(t.state.services["demo/headless"].vips.is_empty());
    assert_eq!(
        t.state.service_by_vip(ip("fd00:96::10")).unwrap().name,
        "web"
    );
    assert_eq!(
        t.state.service_by_vip(ip("10.96.0.11")).unwrap().name,
        "lonely"
    );

    let config = TranslateConfig {
        cluster_domain: "corp.internal".into(),
        ..TranslateConfig::default()
    };
    let t = Translator::new(config).translate(parse(SERVICES));
    assert_eq!(
        t.state.services["demo/web"].hostname,
        "web.demo.svc.corp.internal"
    );
}

#[test]
fn endpoints_come_from_slices_with_readiness_and_named_ports() {
    let t = translate(SERVICES);
    let web = &t.state.services["demo/web"];
    let http_admin: BTreeMap<String, u16> =
        [("admin".to_string(), 9001), ("http".to_string(), 8080)].into();
    let http: BTreeMap<String, u16> = [("http".to_string(), 8080)].into();
    assert_eq!(
        web.endpoints,
        vec![
            Endpoint {
                workload_uid: Some("demo/web-1".into()),
                ip: ip("10.0.0.1"),
                ready: true,
                ports: http_admin.clone(),
            },
            Endpoint {
                workload_uid: Some("demo/web-2".into()),
                ip: ip("10.0.0.2"),
                // `conditions` absent counts as ready.
                ready: true,
                ports: http_admin.clone(),
            },
            Endpoint {
                workload_uid: None,
                ip: ip("10.0.0.3"),
                ready: false,
                ports: http_admin,
            },
            Endpoint {
                workload_uid: None,
                ip: ip("fd00::2"),
                ready: true,
                ports: http,
            },
        ]
    );
    // A service that selects nothing has no endpoints, and that is not an error; a slice of a
    // service that does not exist is ignored.
    assert!(t.state.services["demo/lonely"].endpoints.is_empty());
    assert!(!t.state.services.contains_key("demo/gone"));
    assert_eq!(t.in_force[&Kind::EndpointSlice], 3);
}

#[test]
fn service_and_slice_errors_name_the_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {clusterIP: 10.96.0.999}\n",
            r#"Service demo/s: spec.clusterIP: "10.96.0.999" is not an IP address"#,
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: [{port: 80}, {port: 81, targetPort: 0}]}\n",
            r#"Service demo/s: spec.ports[1].targetPort: "0" is not a port number"#,
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: [{port: 65536}]}\n",
            r#"Service demo/s: spec.ports[0].port: "65536" is not a port number"#,
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: demo}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2, nope]}]\n",
            r#"EndpointSlice demo/e: endpoints[1].addresses[1]: "nope" is not an IP address"#,
        ),
    ];
    for (yaml, message) in cases {
        assert_eq!(messages(&translate(yaml)), vec![message.to_string()]);
    }
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

pub(super) fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

fn only_policy(t: &Translation) -> &AuthorizationPolicy {
    assert!(t.rejections.is_empty(), "{:?}", messages(t));
    assert_eq!(t.state.authorization_policies.len(), 1);
    &t.state.authorization_policies[0]
}

#[test]
fn authorization_policy_every_l4_field() {
    let spec = "
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/demo/sa/client, 'cluster.local/ns/*', '*/sa/admin', '*']
        notPrincipals: [cluster.local/ns/demo/sa/bad]
        namespaces: [demo]
        notNamespaces: [kube-system]
        ipBlocks: [10.0.0.0/8, 192.168.1.1, 'fd00::/64']
        notIpBlocks: [10.1.0.0/16]
    - source:
        serviceAccounts: [other/robot, helper]
        notServiceAccounts: [demo/intruder]
    - source:
        trustDomains: [cluster.local, 'corp-*']
        notTrustDomains: ['*']
    to:
    - operation: {ports: ['8080', '9090'], notPorts: ['22']}
    when:
    - {key: source.ip, values: [10.0.0.1/32]}
    - {key: source.namespace, notValues: [test]}
    - {key: source.principal, values: [cluster.local/ns/demo/sa/client]}
    - {key: destination.ip, values: [10.96.0.10]}
    - {key: destination.port, values: ['8080']}";
    let t = translate(&policy("demo", "full", spec));
    let p = only_policy(&t);
    assert_eq!(p.key(), "demo/full");
    assert_eq!(p.action, PolicyAction::Deny);
    assert_eq!(
        p.scope,
        PolicyScope::WorkloadSelector {
            namespace: "demo".into(),
            labels: labels(&[("app", "web")]),
        }
    );
    let block = |addr: &str, prefix: u8| IpBlock {
        addr: ip(addr),
        prefix,
    };
    let condition = |key, values: &[&str], not_values: &[&str]| Condition {
        key,
        values: values.iter().map(|s| s.to_string()).collect(),
        not_values: not_values.iter().map(|s| s.to_string()).collect(),
    };
    let expected = Rule {
        from: vec![
            Source {
                principals: vec![
                    StringMatch::Exact("cluster.local/ns/demo/sa/client".into()),
                    StringMatch::Prefix("cluster.local/ns/".into()),
                    StringMatch::Suffix("/sa/admin".into()),
                    StringMatch::Any,
                ],
                not_principals: vec![StringMatch::Exact("cluster.local/ns/demo/sa/bad".into())],
                namespaces: vec![StringMatch::Exact("demo".into())],
                not_namespaces: vec![StringMatch::Exact("kube-system".into())],
                ip_blocks: vec![
                    block("10.0.0.0", 8),
                    block("192.168.1.1", 32),
                    block("fd00::", 64),
                ],
                not_ip_blocks: vec![block("10.1.0.0", 16)],
            },
            Source {
                // Service accounts match any trust domain; `helper` is in the policy's namespace.
                principals: vec![
                    StringMatch::Suffix("/ns/other/sa/robot".into()),
                    StringMatch::Suffix("/ns/demo/sa/helper".into()),
                ],
                not_principals: vec![StringMatch::Suffix("/ns/demo/sa/intruder".into())],
                ..Source::default()
            },
            Source {
                // Trust domains are the principal's first segment.
                principals: vec![
                    StringMatch::Prefix("cluster.local/".into()),
                    StringMatch::Prefix("corp-".into()),
                ],
                not_principals: vec![StringMatch::Any],
                ..Source::default()
            },
        ],
        to: vec![Operation {
            ports: vec![8080, 9090],
            not_ports: vec![22],
        }],
        when: vec![
            condition(ConditionKey::SourceIp, &["10.0.0.1/32"], &[]),
            condition(ConditionKey::SourceNamespace, &[], &["test"]),
            condition(
                ConditionKey::SourcePrincipal,
                &["cluster.local/ns/demo/sa/client"],
                &[],
            ),
            condition(ConditionKey::DestinationIp, &["10.96.0.10"], &[]),
            condition(ConditionKey::DestinationPort, &["8080"], &[]),
        ],
        l7_fields: vec![],
    };
    assert_eq!(p.rules, vec![expected]);
    // The service-account matchers do what Istio's do.
    assert!(p.rules[0].from[1].principals[0].matches("cluster.local/ns/other/sa/robot"));
    assert!(p.rules[0].from[1].principals[0].matches("example.org/ns/other/sa/robot"));
    assert!(!p.rules[0].from[1].principals[0].matches("cluster.local/ns/other/sa/robot2"));
    assert!(p.rules[0].from[2].principals[0].matches("cluster.local/ns/a/sa/b"));
    assert!(!p.rules[0].from[2].principals[0].matches("cluster.localhost/ns/a/sa/b"));
}

#[test]
fn authorization_policy_l7_fields_are_recorded_not_rejected() {
    let spec = "
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/demo/sa/client]
        requestPrincipals: [issuer/subject]
        notRequestPrincipals: ['*']
        remoteIpBlocks: [1.2.3.4]
        notRemoteIpBlocks: [5.6.7.8]
    to:
    - operation:
        hosts: [web.demo]
        notHosts: [evil]
        methods: [GET]
        notMethods: [DELETE]
        paths: [/api/*]
        notPaths: [/admin]
        ports: ['8080']
    when:
    - {key: 'request.headers[x-user]', values: [alice]}
    - {key: source.ip, values: [10.0.0.0/8]}
    - {key: 'request.auth.claims[iss]', values: [issuer]}
  - to:
    - operation: {methods: [], ports: ['9090']}";
    let t = translate(&policy("demo", "l7", spec));
    let p = only_policy(&t);
    assert_eq!(
        p.rules[0].l7_fields,
        vec![
            "spec.rules[0].from[0].source.requestPrincipals",
            "spec.rules[0].from[0].source.notRequestPrincipals",
            "spec.rules[0].from[0].source.remoteIpBlocks",
            "spec.rules[0].from[0].source.notRemoteIpBlocks",
            "spec.rules[0].to[0].operation.hosts",
            "spec.rules[0].to[0].operation.notHosts",
            "spec.rules[0].to[0].operation.methods",
            "spec.rules[0].to[0].operation.notMethods",
            "spec.rules[0].to[0].operation.paths",
            "spec.rules[0].to[0].operation.notPaths",
            "spec.rules[0].when[0] (request.headers[x-user])",
            "spec.rules[0].when[2] (request.auth.claims[iss])",
        ]
    );
    // The L4 parts of the same rule are still translated.
    assert_eq!(p.rules[0].to[0].ports, vec![8080]);
    assert_eq!(p.rules[0].when.len(), 1);
    assert_eq!(p.rules[0].when[0].key, ConditionKey::SourceIp);
    // An empty list is the same as an absent one, not an L7 field.
    assert!(p.rules[1].l7_fields.is_empty());
}

#[test]
fn authorization_policy_scope_action_and_empty_rules() {
    let yaml = [
        policy("istio-system", "mesh-wide", "  action: DENY\n  rules: [{}]"),
        policy(
            "istio-system",
            "root-selector",
            "  selector: {matchLabels: {app: x}}",
        ),
        policy("demo", "ns-wide", "  rules: [{}]"),
        policy(
            "demo",
            "empty-selector",
            "  selector: {matchLabels: {}}\n  rules: []",
        ),
        policy("demo", "allow-nothing", "  {}"),
        policy("demo", "null-spec", ""),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let got: BTreeMap<String, (PolicyScope, PolicyAction, Vec<Rule>)> = t
        .state
        .authorization_policies
        .iter()
        .map(|p| (p.key(), (p.scope.clone(), p.action, p.rules.clone())))
        .collect();
    let ns = |n: &str| PolicyScope::Namespace(n.into());
    let expected: BTreeMap<String, (PolicyScope, PolicyAction, Vec<Rule>)> = [
        (
            "istio-system/mesh-wide",
            (
                PolicyScope::Global,
                PolicyAction::Deny,
                vec![Rule::default()],
            ),
        ),
        (
            "istio-system/root-selector",
            (
                PolicyScope::WorkloadSelector {
                    namespace: "istio-system".into(),
                    labels: labels(&[("app", "x")]),
                },
                PolicyAction::Allow,
                vec![],
            ),
        ),
        // `rules: [{}]` allows everything: one rule with no conditions.
        (
            "demo/ns-wide",
            (ns("demo"), PolicyAction::Allow, vec![Rule::default()]),
        ),
        (
            "demo/empty-selector",
            (ns("demo"), PolicyAction::Allow, vec![]),
        ),
        // No rules: an ALLOW policy that allows nothing.
        (
            "demo/allow-nothing",
            (ns("demo"), PolicyAction::Allow, vec![]),
        ),
        ("demo/null-spec", (ns("demo"), PolicyAction::Allow, vec![])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, expected);
    assert_eq!(t.state.root_namespace, "istio-system");
}

#[test]
fn root_namespace_is_a_parameter() {
    let config = TranslateConfig {
        root_namespace: "mesh-config".into(),
        ..TranslateConfig::default()
    };
    let yaml =
        policy("mesh-config", "a", "  rules: [{}]") + &policy("istio-system", "b", "  rules: [{}]");
    let t = Translator::new(config).translate(parse(&yaml));
    let scopes: Vec<_> = t
        .state
        .authorization_policies
        .iter()
        .map(|p| p.scope.clone())
        .collect();
    assert_eq!(
        scopes,
        vec![
            PolicyScope::Namespace("istio-system".into()),
            PolicyScope::Global
        ]
    );
    assert_eq!(t.state.root_namespace, "mesh-config");
}

#[test]
fn waypoint_audit_and_custom_policies_are_not_l4_policies() {
    let yaml = [
        policy("demo", "waypoint", "  targetRefs: [{kind: Service, group: '', name: web}]\n  rules: [{to: [{operation: {methods: [GET]}}]}]"),
        policy("demo", "gateway", "  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: wp}"),
        policy("demo", "audit", "  action: AUDIT\n  rules: [{}]"),
        policy("demo", "custom", "  action: CUSTOM\n  provider: {name: ext-authz}\n  rules: [{}]"),
        policy("demo", "l4", "  action: DENY\n  rules: [{}]"),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let keys: Vec<_> = t
        .state
        .authorization_policies
        .iter()
        .map(|p| p.key())
        .collect();
    assert_eq!(keys, vec!["demo/l4"]);
    // They are valid objects, in force for whoever enforces them.
    assert_eq!(t.in_force[&Kind::AuthorizationPolicy], 5);
}

#[test]
fn authorization_policy_errors_name_the_field() {
    let cases = [
        (
            policy("demo", "deny-web", "  action: DENY\n  rules: [{to: [{operation: {ports: ['80', http]}}]}]"),
            r#"AuthorizationPolicy demo/deny-web: spec.rules[0].to[0].operation.ports[1]: "http" is not a port number"#,
        ),
        (
            policy(
                "demo",
                "cidr",
                "  rules: [{from: [{source: {namespaces: [a]}}, {source: {ipBlocks: [10.0.0.0/8, 1.2.3.4, 10.0.0.0/33]}}]}]",
            ),
            r#"AuthorizationPolicy demo/cidr: spec.rules[0].from[1].source.ipBlocks[2]: "10.0.0.0/33" is not an IP address or CIDR: the prefix length is longer than 32"#,
        ),
        (
            policy("demo", "cidr", "  rules: [{from: [{source: {notIpBlocks: [10.0.0.x]}}]}]"),
            r#"AuthorizationPolicy demo/cidr: spec.rules[0].from[0].source.notIpBlocks[0]: "10.0.0.x" is not an IP address or CIDR: the address is not valid"#,
        ),
        (
            policy("demo", "notport", "  rules: [{}, {to: [{operation: {notPorts: ['0']}}]}]"),
            r#"AuthorizationPolicy demo/notport: spec.rules[1].to[0].operation.notPorts[0]: "0" is not a port number"#,
        ),
        (
            policy("demo", "when-ip", "  rules: [{when: [{key: destination.ip, notValues: [10.0.0.0/a]}]}]"),
            r#"AuthorizationPolicy demo/when-ip: spec.rules[0].when[0].notValues[0]: "10.0.0.0/a" is not an IP address or CIDR: the prefix length is not a number"#,
        ),
        (
            policy("demo", "when-port", "  rules: [{when: [{key: destination.port, values: ['99999']}]}]"),
            r#"AuthorizationPolicy demo/when-port: spec.rules[0].when[0].values[0]: "99999" is not a port number"#,
        ),
        (
            policy("demo", "when-empty", "  rules: [{when: [{key: source.ip}]}]"),
            "AuthorizationPolicy demo/when-empty: spec.rules[0].when[0]: one of values or notValues is required",
        ),
        (
            policy("demo", "action", "  action: deny"),
            r#"AuthorizationPolicy demo/action: spec.action: "deny" is not one of ALLOW, DENY, AUDIT, CUSTOM"#,
        ),
        (
            policy("demo", "sa", "  rules: [{from: [{source: {serviceAccounts: ['ns/*']}}]}]"),
            r#"AuthorizationPolicy demo/sa: spec.rules[0].from[0].source.serviceAccounts[0]: "ns/*" is not <namespace>/<service account> or <service account> (no wildcards)"#,
        ),
        (
            policy("demo", "sa", "  rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]"),
            "AuthorizationPolicy demo/sa: spec.rules[0].from[0].source.serviceAccounts: serviceAccounts cannot be combined with principals",
        ),
        (
            policy("demo", "td", "  rules: [{from: [{source: {serviceAccounts: [a], trustDomains: [td]}}]}]"),
            "AuthorizationPolicy demo/td: spec.rules[0].from[0].source.trustDomains: trustDomains cannot be combined with serviceAccounts",
        ),
        (
            policy("demo", "td", "  rules: [{from: [{source: {notTrustDomains: [ok, '*.local']}}]}]"),
            r#"AuthorizationPolicy demo/td: spec.rules[0].from[0].source.notTrustDomains[1]: "*.local" is not a trust domain, `prefix*` or `*`"#,
        ),
        (
            policy("demo", "typo", "  rules: [{from: [{source: {principal: [a]}}]}]"),
            "AuthorizationPolicy demo/typo: spec.rules[0].from[0].source.principal: unknown field `principal`, expected one of `principals`, `notPrincipals`, `requestPrincipals`, `notRequestPrincipals`, `namespaces`, `notNamespaces`, `serviceAccounts`, `notServiceAccounts`, `trustDomains`, `notTrustDomains`, `ipBlocks`, `notIpBlocks`, `remoteIpBlocks`, `notRemoteIpBlocks`",
        ),
        (
            policy("demo", "type", "  rules: [{to: [{operation: {ports: 8080}}]}]"),
            "AuthorizationPolicy demo/type: spec.rules[0].to[0].operation.ports: invalid type: integer `8080`, expected a sequence",
        ),
        (
            "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: old, namespace: demo}\n".to_string(),
            r#"AuthorizationPolicy demo/old: apiVersion: "security.istio.io/v1alpha1" is not one of security.istio.io/v1, security.istio.io/v1beta1"#,
        ),
    ];
    for (yaml, message) in cases {
        let t = translate(&yaml);
        assert_eq!(messages(&t), vec![message.to_string()], "{yaml}");
        assert!(t.state.authorization_policies.is_empty());
        assert_eq!(
            t.rejections[0].error.object().kind,
            Kind::AuthorizationPolicy
        );
    }
}

#[test]
fn v1beta1_and_numeric_ports_are_accepted() {
    let yaml = policy(
        "demo",
        "beta",
        "  rules: [{to: [{operation: {ports: [8080, '9090']}}]}]",
    )
    .replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n");
    let t = translate(&yaml);
    assert_eq!(only_policy(&t).rules[0].to[0].ports, vec![8080, 9090]);
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication

fn peer_authentication(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

#[test]
fn peer_authentication_modes_scopes_and_port_overrides() {
    let yaml = [
        peer_authentication("istio-system", "mesh", "  mtls: {mode: STRICT}"),
        peer_authentication("demo", "ns", "  mtls: {mode: PERMISSIVE}"),
        peer_authentication(
            "demo",
            "web",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: UNSET}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    '9090': {mode: STRICT}",
        ),
        peer_authentication("other", "unset", "  {}"),
    ]
    .concat();
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let got: BTreeMap<String, PeerAuthentication> = t
        .state
        .peer_authentications
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), (**p).clone()))
        .collect();
    assert_eq!(got["istio-system/mesh"].scope, PolicyScope::Global);
    assert_eq!(got["istio-system/mesh"].mode, MtlsMode::Strict);
    assert_eq!(got["demo/ns"].scope, PolicyScope::Namespace("demo".into()));
    assert_eq!(got["demo/ns"].mode, MtlsMode::Permissive);
    assert_eq!(
        got["demo/web"],
        PeerAuthentication {
            name: "web".into(),
            namespace: "demo".into(),
            scope: PolicyScope::WorkloadSelector {
                namespace: "demo".into(),
                labels: labels(&[("app", "web")]),
            },
            mode: MtlsMode::Unset,
            port_modes: [(8080, MtlsMode::Disable), (9090, MtlsMode::Strict)].into(),
        }
    );
    assert_eq!(got["other/unset"].mode, MtlsMode::Unset);
}

#[test]
fn peer_authentication_errors_name_the_field() {
    let cases = [
        (
            peer_authentication("demo", "pa", "  mtls: {mode: strict}"),
            r#"PeerAuthentication demo/pa: spec.mtls.mode: "strict" is not one of UNSET, PERMISSIVE, STRICT, DISABLE"#,
        ),
        (
            peer_authentication("demo", "pa", "  portLevelMtls: {http: {mode: STRICT}}"),
            r#"PeerAuthentication demo/pa: spec.portLevelMtls.http: "http" is not a port number"#,
        ),
        (
            peer_authentication("demo", "pa", "  portLevelMtls: {8080: {mode: OFF}}"),
            r#"PeerAuthentication demo/pa: spec.portLevelMtls.8080.mode: "OFF" is not one of UNSET, PERMISSIVE, STRICT, DISABLE"#,
        ),
    ];
    for (yaml, message) in cases {
        assert_eq!(messages(&translate(&yaml)), vec![message.to_string()]);
    }
}

// ---------------------------------------------------------------------------------------------
// Last good versions

#[test]
fn a_bad_update_keeps_the_last_good_version_while_others_apply() {
    let mut translator = Translator::new(TranslateConfig::default());
    let good = policy(
        "demo",
        "deny-web",
        "  action: DENY\n  rules: [{to: [{operation: {ports: ['80']}}]}]",
    );
    let v1 = translator.translate(parse(
        &(good.clone() + &pod("demo", "a", "10.0.0.1", "", "")),
    ));
    assert!(v1.rejections.is_empty());

    let bad = policy(
        "demo",
        "deny-web",
        "  action: DENY\n  rules: [{to: [{operation: {ports: ['80', http]}}]}]",
    );
    let new_bad = policy(
        "demo",
        "brand-new",
        "  rules: [{from: [{source: {ipBlocks: [nope]}}]}]",
    );
    let v2 = translator.translate(parse(
        &[
            bad,
            new_bad,
            pod("demo", "a", "10.0.0.1", "", ""),
            pod("demo", "b", "10.0.0.2", "", ""),
        ]
        .concat(),
    ));
    assert_eq!(
        v2.rejections
            .iter()
            .map(|r| (r.error.object().name.as_str(), r.kept_last_good))
            .collect::<Vec<_>>(),
        vec![("brand-new", false), ("deny-web", true)]
    );
    // The last good deny-web (port 80 only) is in force; the new pod applied.
    assert_eq!(v2.state.authorization_policies.len(), 1);
    assert_eq!(
        v2.state.authorization_policies[0].rules[0].to[0].ports,
        vec![80]
    );
    assert!(v2.state.workloads.contains_key("demo/b"));
    assert_eq!(v2.in_force[&Kind::AuthorizationPolicy], 1);
    assert_eq!(v2.in_force[&Kind::Pod], 2);

    // A schema error from the source (already a rejection) keeps the last good version too.
    let schema_error = Err(TranslateError::Schema {
        object: Box::new(ObjectKey::new(
            Kind::AuthorizationPolicy,
            Some("demo"),
            "deny-web",
        )),
        field: "spec.rules".into(),
        message: "invalid type".into(),
    });
    let v3 = translator.translate(vec![schema_error]);
    assert_eq!(v3.state.authorization_policies[0].name, "deny-web");
    assert!(v3.rejections[0].kept_last_good);

    // Fixing it applies the fix; removing it removes it.
    let fixed = policy(
        "demo",
        "deny-web",
        "  action: DENY\n  rules: [{to: [{operation: {ports: ['8080']}}]}]",
    );
    let v4 = translator.translate(parse(&fixed));
    assert!(v4.rejections.is_empty());
    assert_eq!(
        v4.state.authorization_policies[0].rules[0].to[0].ports,
        vec![8080]
    );
    let v5 = translator.translate(Vec::new());
    assert!(v5.state.authorization_policies.is_empty());
    assert!(v5.state.workloads.is_empty());
    assert_eq!(v5.in_force.values().sum::<usize>(), 0);
}

#[test]
fn a_bad_pod_update_keeps_its_last_good_workload() {
    let mut translator = Translator::new(TranslateConfig::default());
    translator.translate(parse(&pod("demo", "a", "10.0.0.1", "", "")));
    let t = translator.translate(parse(&pod("demo", "a", "not-an-ip", "", "")));
    assert_eq!(t.rejections.len(), 1);
    assert_eq!(t.state.workloads["demo/a"].ips, vec![ip("10.0.0.1")]);
}

#[test]
fn the_later_of_two_definitions_wins() {
    let yaml = policy("demo", "p", "  action: DENY") + &policy("demo", "p", "  action: ALLOW");
    let t = translate(&yaml);
    assert_eq!(only_policy(&t).action, PolicyAction::Allow);
}

#[test]
fn objects_without_namespace_land_in_default() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1}\n";
    let t = translate(yaml);
    assert_eq!(
        t.state.services["default/s"].hostname,
        "s.default.svc.cluster.local"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers

#[test]
fn ip_blocks_parse_like_istio() {
    let ok = [
        ("10.0.0.0/8", "10.0.0.0", 8),
        ("1.2.3.4", "1.2.3.4", 32),
        ("0.0.0.0/0", "0.0.0.0", 0),
        ("fd00::/8", "fd00::", 8),
        ("::1", "::1", 128),
        ("10.1.2.3/8", "10.1.2.3", 8),
    ];
    for (s, addr, prefix) in ok {
        assert_eq!(
            parse_ip_block(s),
            Ok(IpBlock {
                addr: ip(addr),
                prefix
            }),
            "{s}"
        );
    }
    let bad = [
        ("", "the address is not valid"),
        ("10.0.0/8", "the address is not valid"),
        ("10.0.0.0/", "the prefix length is not a number"),
        ("10.0.0.0/-1", "the prefix length is not a number"),
        ("10.0.0.0/33", "the prefix length is longer than 32"),
        ("::/129", "the prefix length is longer than 128"),
        ("10.0.0.0/8/8", "the prefix length is not a number"),
    ];
    for (s, why) in bad {
        assert_eq!(parse_ip_block(s), Err(why), "{s}");
    }
    assert!(
        parse_ip_block("10.1.2.3/8")
            .unwrap()
            .contains(ip("10.200.0.1"))
    );
}

#[test]
fn kinds_are_recognised_by_group_and_kind() {
    let cases = [
        ("v1", "Pod", Some(Kind::Pod)),
        ("v1", "Namespace", Some(Kind::Namespace)),
        ("v1", "Service", Some(Kind::Service)),
        (
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some(Kind::EndpointSlice),
        ),
        (
            "discovery.k8s.io/v1beta1",
            "EndpointSlice",
            Some(Kind::EndpointSlice),
        ),
        (
            "security.istio.io/v1",
            "AuthorizationPolicy",
            Some(Kind::AuthorizationPolicy),
        ),
        (
            "security.istio.io/v1beta1",
            "PeerAuthentication",
            Some(Kind::PeerAuthentication),
        ),
        (
            "networking.istio.io/v1",
            "VirtualService",
            Some(Kind::VirtualService),
        ),
        (
            "networking.istio.io/v1alpha3",
            "DestinationRule",
            Some(Kind::DestinationRule),
        ),
        (
            "gateway.networking.k8s.io/v1",
            "Gateway",
            Some(Kind::Gateway),
        ),
        // Somebody else's kinds.
        ("serving.knative.dev/v1", "Service", None),
        ("apps/v1", "Deployment", None),
        // Istio's own (ingress) Gateway is not the Gateway API's.
        (
            "networking.istio.io/v1",
            "Gateway",
            Some(Kind::IstioGateway),
        ),
        ("v1", "Secret", Some(Kind::Secret)),
        ("networking.istio.io/v1", "ServiceEntry", None),
    ];
    for (api_version, kind, expected) in cases {
        assert_eq!(
            Kind::from_type(api_version, kind),
            expected,
            "{api_version} {kind}"
        );
    }
    assert_eq!(
        ObjectKey::new(Kind::Namespace, Some("x"), "demo").to_string(),
        "Namespace demo"
    );
    assert_eq!(
        ObjectKey::new(Kind::Pod, None, "p").to_string(),
        "Pod default/p"
    );
}

// ---------------------------------------------------------------------------------------------
// Strict parsing (the file source) against lenient (the Kubernetes source)

/// One document parsed both ways.
fn parse_both(yaml: &str) -> (SourceObject, SourceObject) {
    let json: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
    let kind = Kind::from_type(
        json["apiVersion"].as_str().unwrap(),
        json["kind"].as_str().unwrap(),
    )
    .unwrap();
    let key = ObjectKey::new(
        kind,
        json["metadata"]["namespace"].as_str(),
        json["metadata"]["name"].as_str().unwrap(),
    );
    (
        Object::from_value_strict(&key, json.clone()),
        Object::from_value(&key, json),
    )
}

#[test]
fn strict_parsing_rejects_unknown_fields_of_every_kind_naming_object_and_path() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: demo}\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{pod}spec: {{nodeName: a, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIp: 10.0.0.1}}"),
            "Pod demo/web: status.podIp: unknown field `podIp`: the Pod schema has no such field here; did you mean `podIP`?",
        ),
        (
            format!("{pod}spec: {{nodeName: a, serviceAcountName: web, containers: [{{name: c}}]}}"),
            "Pod demo/web: spec.serviceAcountName: unknown field `serviceAcountName`: the Pod schema has no such field here; did you mean `serviceAccountName`?",
        ),
        (
            format!("{pod}spec: {{nodeName: a, containers: [{{name: c, ports: [{{containerport: 80}}]}}]}}"),
            "Pod demo/web: spec.containers[0].ports[0].containerport: unknown field `containerport`: the Pod schema has no such field here; did you mean `containerPort`?",
        ),
        (
            format!("{pod}spec: {{nodename: a, containers: [{{name: c, imagePolicy: x}}]}}\nstatus: {{podIPs: [{{ip: 10.0.0.1, family: v4}}]}}"),
            "Pod demo/web: spec.nodename: unknown field `nodename`: the Pod schema has no such field here; did you mean `nodeName`?; also unknown: spec.containers[0].imagePolicy, status.podIPs[0].family",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, lables: {istio.io/dataplane-mode: ambient}}".to_owned(),
            "Namespace demo: metadata.lables: unknown field `lables`: the Namespace schema has no such field here; did you mean `labels`?",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIp: 10.96.0.1, ports: [{port: 80}]}".to_owned(),
            "Service demo/web: spec.clusterIp: unknown field `clusterIp`: the Service schema has no such field here; did you mean `clusterIP`?",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nsepc: {clusterIP: 10.96.0.1}".to_owned(),
            "Service demo/web: sepc: unknown field `sepc`: the Service schema has no such field here; did you mean `spec`?",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: demo}\naddressType: IPv4\nendpoints: [{adresses: [10.0.0.1]}]".to_owned(),
            "EndpointSlice demo/web-1: endpoints[0].adresses: unknown field `adresses`: the EndpointSlice schema has no such field here; did you mean `addresses`?",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: demo}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1], zone: a, colour: blue}]".to_owned(),
            "EndpointSlice demo/web-1: endpoints[0].colour: unknown field `colour`: the EndpointSlice schema has no such field here (check its spelling, case and indentation)",
        ),
        // Istio kinds' specs were already closed; their metadata is now too.
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo, label: {a: b}}\nspec: {action: DENY}".to_owned(),
            "AuthorizationPolicy demo/deny: metadata.label: unknown field `label`: the AuthorizationPolicy schema has no such field here; did you mean `labels`?",
        ),
    ];
    for (yaml, expected) in &cases {
        let (strict, lenient) = parse_both(yaml);
        let error = strict.expect_err(yaml);
        assert_eq!(error.to_string(), *expected, "{yaml}");
        assert!(matches!(error, TranslateError::Schema { .. }));
        // The Kubernetes source's objects (validated by the API server, possibly newer than
        // this schema) are still read leniently.
        assert!(lenient.is_ok(), "{yaml}: {lenient:?}");
    }
}

#[test]
fn strict_parsing_accepts_what_a_cluster_serves_and_the_open_gateway_spec() {
    let documents = [
        // What `kubectl get pod -o yaml` shows, abridged but with every section.
        "apiVersion: v1
kind: Pod
metadata:
  name: web-5d9c7f
  namespace: demo
  uid: 0f2b
  resourceVersion: '42'
  creationTimestamp: '2024-05-01T10:00:00Z'
  labels: {app: web, pod-template-hash: 5d9c7f}
  annotations: {kubectl.kubernetes.io/restartedAt: x}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d9c7f, uid: a, controller: true, blockOwnerDeletion: true}]
  managedFields: [{manager: kubelet, operation: Update, apiVersion: v1, fieldsType: FieldsV1, fieldsV1: {f:status: {}}}]
spec:
  nodeName: node-a
  serviceAccountName: web
  serviceAccount: web
  hostNetwork: false
  containers:
  - name: web
    image: web:1
    ports: [{name: http, containerPort: 8080, protocol: TCP}]
    resources: {limits: {cpu: 500m}}
    readinessProbe: {httpGet: {path: /, port: 8080}}
  tolerations: [{key: k, operator: Exists, effect: NoSchedule}]
status:
  phase: Running
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}]
  hostIP: 192.168.0.1
  conditions: [{type: Ready, status: 'True', lastProbeTime: null}]
  containerStatuses: [{name: web, ready: true, restartCount: 0, image: web:1, imageID: x, started: true, state: {running: {startedAt: '2024-05-01T10:00:01Z'}}}]
  qosClass: Burstable",
        "apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  ports: [{name: http, port: 80, targetPort: http, protocol: TCP, appProtocol: http}]
  selector: {app: web}
  sessionAffinity: None
  type: ClusterIP
status: {loadBalancer: {}}",
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  infrastructure: {labels: {a: b}}",
    ];
    for yaml in documents {
        let (strict, _) = parse_both(yaml);
        assert!(strict.is_ok(), "{yaml}: {strict:?}");
    }
    // Open below spec only: the Gateway's metadata is still checked.
    let (strict, _) = parse_both(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w, namespace: demo, namepsace: x}\nspec: {gatewayClassName: istio-waypoint}",
    );
    assert!(
        strict
            .unwrap_err()
            .to_string()
            .starts_with("Gateway demo/w: metadata.namepsace: unknown field `namepsace`"),
    );
}

#[test]
fn a_pod_update_with_a_misspelt_field_keeps_its_last_good_workload() {
    let good = pod("demo", "a", "10.0.0.1", "", "  serviceAccountName: web");
    let typo = good.replace("podIP:", "podIp:");
    let strict = |yaml: &str| {
        let (object, _) = parse_both(yaml.trim_end_matches("---\n"));
        vec![object]
    };
    let mut translator = Translator::new(TranslateConfig::default());
    let ns = strict(&namespace("demo", AMBIENT));
    let t = translator.translate(ns.iter().cloned().chain(strict(&good)));
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let t = translator.translate(ns.into_iter().chain(strict(&typo)));
    assert_eq!(
        messages(&t),
        [
            "Pod demo/a: status.podIp: unknown field `podIp`: the Pod schema has no such field here; did you mean `podIP`?"
        ]
    );
    assert!(t.rejections[0].kept_last_good);
    let workload = &t.state.workloads["demo/a"];
    assert!(workload.enrolled);
    assert_eq!(workload.ips, vec![ip("10.0.0.1")]);
    assert_eq!(workload.service_account, "web");
}
