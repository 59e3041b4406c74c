use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use mesh::model::Labels;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn workload(ns: &str, name: &str, l: &[(&str, &str)]) -> Workload {
    Workload {
        uid: format!("{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        ips: vec!["10.0.0.2".parse().unwrap()],
        node: "node-a".into(),
        service_account: name.into(),
        identity: Identity::new("cluster.local", ns, name).unwrap(),
        labels: labels(l),
        enrolled: true,
        workload_name: name.into(),
        workload_kind: "deployment".into(),
        canonical_service: name.into(),
        canonical_revision: "latest".into(),
        named_ports: BTreeMap::new(),
    }
}

fn policy(
    ns: &str,
    name: &str,
    scope: PolicyScope,
    action: PolicyAction,
    rules: Vec<Rule>,
) -> Arc<AuthorizationPolicy> {
    Arc::new(AuthorizationPolicy {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action,
        rules,
    })
}

fn state(policies: Vec<Arc<AuthorizationPolicy>>) -> State {
    State {
        authorization_policies: policies,
        root_namespace: "istio-system".into(),
        ..State::default()
    }
}

fn from_principal(p: &str) -> Rule {
    Rule {
        from: vec![Source {
            principals: vec![StringMatch::parse(p)],
            ..Source::default()
        }],
        ..Rule::default()
    }
}

struct Case {
    name: &'static str,
    policies: Vec<Arc<AuthorizationPolicy>>,
    source: Option<Identity>,
    source_ip: &'static str,
    port: u16,
    allowed: bool,
}

fn run(cases: Vec<Case>) {
    let dest = workload("demo", "web", &[("app", "web"), ("version", "v1")]);
    for c in cases {
        let st = state(c.policies);
        let conn = Connection {
            source_identity: c.source.as_ref(),
            source_ip: c.source_ip.parse().unwrap(),
            destination: &dest,
            destination_addr: SocketAddr::new("10.0.0.2".parse().unwrap(), c.port),
        };
        let d = authorize(&st, &conn);
        assert_eq!(d.is_allowed(), c.allowed, "{}: got {d:?}", c.name);
    }
}

fn sleep_id() -> Option<Identity> {
    Some(Identity::new("cluster.local", "client", "sleep").unwrap())
}

#[test]
fn allow_deny_and_scope() {
    use PolicyAction::*;
    let ns = || PolicyScope::Namespace("demo".into());
    let sel = |l: &[(&str, &str)]| PolicyScope::WorkloadSelector {
        namespace: "demo".into(),
        labels: labels(l),
    };
    run(vec![
        Case {
            name: "no policies allow",
            policies: vec![],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "allow with no rules allows nothing",
            policies: vec![policy("demo", "p", ns(), Allow, vec![])],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "allow with one empty rule allows all",
            policies: vec![policy("demo", "p", ns(), Allow, vec![Rule::default()])],
            source: None,
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "deny with no rules denies nothing",
            policies: vec![policy("demo", "p", ns(), Deny, vec![])],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "allow principal matches",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![from_principal("cluster.local/ns/client/sa/sleep")],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "allow principal with spiffe prefix matches too",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![from_principal("spiffe://cluster.local/ns/client/sa/sleep")],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "allow principal mismatch denies",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![from_principal("cluster.local/ns/client/sa/other")],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "plaintext cannot match a principal",
            policies: vec![policy("demo", "p", ns(), Allow, vec![from_principal("*")])],
            source: None,
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "deny beats allow",
            policies: vec![
                policy("demo", "a", ns(), Allow, vec![Rule::default()]),
                policy(
                    "demo",
                    "d",
                    ns(),
                    Deny,
                    vec![from_principal("cluster.local/ns/client/*")],
                ),
            ],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "policy in another namespace does not apply",
            policies: vec![policy(
                "other",
                "p",
                PolicyScope::Namespace("other".into()),
                Allow,
                vec![],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "root namespace policy applies everywhere",
            policies: vec![policy(
                "istio-system",
                "p",
                PolicyScope::Global,
                Deny,
                vec![Rule::default()],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "selector matching the workload applies",
            policies: vec![policy("demo", "p", sel(&[("app", "web")]), Allow, vec![])],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "selector not matching does not apply",
            policies: vec![policy("demo", "p", sel(&[("app", "db")]), Allow, vec![])],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "root namespace selector applies across namespaces",
            policies: vec![policy(
                "istio-system",
                "p",
                PolicyScope::WorkloadSelector {
                    namespace: "istio-system".into(),
                    labels: labels(&[("version", "v1")]),
                },
                Deny,
                vec![Rule::default()],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
    ]);
}

#[test]
fn source_fields() {
    use PolicyAction::Allow;
    let ns = || PolicyScope::Namespace("demo".into());
    let rule = |s: Source| Rule {
        from: vec![s],
        ..Rule::default()
    };
    let block = |s: &str| {
        let (a, p) = s.split_once('/').unwrap();
        IpBlock {
            addr: a.parse().unwrap(),
            prefix: p.parse().unwrap(),
        }
    };
    run(vec![
        Case {
            name: "namespaces",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![rule(Source {
                    namespaces: vec![StringMatch::parse("client")],
                    ..Source::default()
                })],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "notNamespaces excludes",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![rule(Source {
                    not_namespaces: vec![StringMatch::parse("client")],
                    ..Source::default()
                })],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "notPrincipals lets plaintext through",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![rule(Source {
                    not_principals: vec![StringMatch::parse("*")],
                    ..Source::default()
                })],
            )],
            source: None,
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "ipBlocks match",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![rule(Source {
                    ip_blocks: vec![block("10.1.0.0/16")],
                    ..Source::default()
                })],
            )],
            source: None,
            source_ip: "10.1.2.3",
            port: 80,
            allowed: true,
        },
        Case {
            name: "ipBlocks miss",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![rule(Source {
                    ip_blocks: vec![block("10.2.0.0/16")],
                    ..Source::default()
                })],
            )],
            source: None,
            source_ip: "10.1.2.3",
            port: 80,
            allowed: false,
        },
        Case {
            name: "notIpBlocks excludes",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![rule(Source {
                    not_ip_blocks: vec![block("10.1.2.3/32")],
                    ..Source::default()
                })],
            )],
            source: None,
            source_ip: "10.1.2.3",
            port: 80,
            allowed: false,
        },
        Case {
            name: "two sources are ORed",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![Rule {
                    from: vec![
                        Source {
                            namespaces: vec![StringMatch::parse("nope")],
                            ..Source::default()
                        },
                        Source {
                            ip_blocks: vec![block("10.1.0.0/16")],
                            ..Source::default()
                        },
                    ],
                    ..Rule::default()
                }],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.9",
            port: 80,
            allowed: true,
        },
        Case {
            name: "fields within a source are ANDed",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![rule(Source {
                    namespaces: vec![StringMatch::parse("client")],
                    ip_blocks: vec![block("10.9.0.0/16")],
                    ..Source::default()
                })],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.9",
            port: 80,
            allowed: false,
        },
    ]);
}

#[test]
fn ports_when_and_l7_fields() {
    use PolicyAction::*;
    let ns = || PolicyScope::Namespace("demo".into());
    let to = |o: Operation| Rule {
        to: vec![o],
        ..Rule::default()
    };
    let when = |key, values: &[&str], not: &[&str]| Rule {
        when: vec![Condition {
            key,
            values: values.iter().map(|s| s.to_string()).collect(),
            not_values: not.iter().map(|s| s.to_string()).collect(),
        }],
        ..Rule::default()
    };
    let l7 = |mut r: Rule| {
        r.l7_fields = vec!["spec.rules[0].to[0].operation.paths".into()];
        r
    };
    run(vec![
        Case {
            name: "ports",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![to(Operation {
                    ports: vec![80],
                    ..Operation::default()
                })],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "ports miss",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![to(Operation {
                    ports: vec![80],
                    ..Operation::default()
                })],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 8080,
            allowed: false,
        },
        Case {
            name: "notPorts",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![to(Operation {
                    not_ports: vec![80],
                    ..Operation::default()
                })],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "when source.ip CIDR",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![when(ConditionKey::SourceIp, &["10.1.0.0/24"], &[])],
            )],
            source: None,
            source_ip: "10.1.0.77",
            port: 80,
            allowed: true,
        },
        Case {
            name: "when destination.port notValues",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![when(ConditionKey::DestinationPort, &[], &["80"])],
            )],
            source: None,
            source_ip: "10.1.0.77",
            port: 80,
            allowed: false,
        },
        Case {
            name: "when source.principal",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![when(
                    ConditionKey::SourcePrincipal,
                    &["cluster.local/ns/client/sa/sleep"],
                    &[],
                )],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.77",
            port: 80,
            allowed: true,
        },
        Case {
            name: "when source.namespace against plaintext",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![when(ConditionKey::SourceNamespace, &["client"], &[])],
            )],
            source: None,
            source_ip: "10.1.0.77",
            port: 80,
            allowed: false,
        },
        Case {
            name: "when destination.ip",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Deny,
                vec![when(ConditionKey::DestinationIp, &["10.0.0.2"], &[])],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.77",
            port: 80,
            allowed: false,
        },
        Case {
            name: "L7 rule in ALLOW matches nothing (fail closed)",
            policies: vec![policy("demo", "p", ns(), Allow, vec![l7(Rule::default())])],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "L7 rule in DENY is enforced on its L4 parts (more restrictive)",
            policies: vec![policy("demo", "p", ns(), Deny, vec![l7(Rule::default())])],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: false,
        },
        Case {
            name: "L7 rule in DENY whose L4 part does not match lets through",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Deny,
                vec![l7(to(Operation {
                    ports: vec![9000],
                    ..Operation::default()
                }))],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
        Case {
            name: "an L4 rule beside an L7 rule still allows",
            policies: vec![policy(
                "demo",
                "p",
                ns(),
                Allow,
                vec![
                    l7(Rule::default()),
                    from_principal("cluster.local/ns/client/sa/sleep"),
                ],
            )],
            source: sleep_id(),
            source_ip: "10.1.0.1",
            port: 80,
            allowed: true,
        },
    ]);
}

#[test]
fn deny_reason_names_the_policy() {
    let dest = workload("demo", "web", &[]);
    let st = state(vec![policy(
        "demo",
        "block-all",
        PolicyScope::Namespace("demo".into()),
        PolicyAction::Deny,
        vec![Rule::default()],
    )]);
    let d = authorize(
        &st,
        &Connection {
            source_identity: None,
            source_ip: "10.1.0.1".parse().unwrap(),
            destination: &dest,
            destination_addr: "10.0.0.2:80".parse().unwrap(),
        },
    );
    assert_eq!(
        d,
        Decision::Deny {
            policy: Some("demo/block-all".into()),
            reason: "DENY policy demo/block-all rule 0 matched".into()
        }
    );
}

#[test]
fn mtls_mode_inheritance() {
    let dest = workload("demo", "web", &[("app", "web")]);
    let pa = |ns: &str, scope: PolicyScope, mode: MtlsMode, ports: &[(u16, MtlsMode)]| {
        Arc::new(PeerAuthentication {
            name: "pa".into(),
            namespace: ns.into(),
            scope,
            mode,
            port_modes: ports.iter().copied().collect(),
        })
    };
    let st = |pas: Vec<Arc<PeerAuthentication>>| State {
        peer_authentications: pas,
        root_namespace: "istio-system".into(),
        ..State::default()
    };
    let sel = PolicyScope::WorkloadSelector {
        namespace: "demo".into(),
        labels: labels(&[("app", "web")]),
    };
    assert_eq!(
        effective_mtls_mode(&st(vec![]), &dest, 80),
        MtlsMode::Permissive
    );
    let mesh_strict = pa("istio-system", PolicyScope::Global, MtlsMode::Strict, &[]);
    assert_eq!(
        effective_mtls_mode(&st(vec![mesh_strict.clone()]), &dest, 80),
        MtlsMode::Strict
    );
    let ns_permissive = pa(
        "demo",
        PolicyScope::Namespace("demo".into()),
        MtlsMode::Permissive,
        &[],
    );
    assert_eq!(
        effective_mtls_mode(
            &st(vec![mesh_strict.clone(), ns_permissive.clone()]),
            &dest,
            80
        ),
        MtlsMode::Permissive,
        "namespace overrides mesh"
    );
    let sel_unset_port = pa(
        "demo",
        sel.clone(),
        MtlsMode::Unset,
        &[(8080, MtlsMode::Strict)],
    );
    let s = st(vec![mesh_strict, ns_permissive, sel_unset_port]);
    assert_eq!(
        effective_mtls_mode(&s, &dest, 8080),
        MtlsMode::Strict,
        "port level wins"
    );
    assert_eq!(
        effective_mtls_mode(&s, &dest, 80),
        MtlsMode::Permissive,
        "unset inherits namespace"
    );
    let other_ns = pa(
        "other",
        PolicyScope::Namespace("other".into()),
        MtlsMode::Strict,
        &[],
    );
    assert_eq!(
        effective_mtls_mode(&st(vec![other_ns]), &dest, 80),
        MtlsMode::Permissive
    );
}
