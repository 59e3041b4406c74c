#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh::model::{
    GatewayServer, IngressApi, IngressGateway, ServerHost, ServerProtocol, ServerTls, State,
    TlsMode, TlsSecret,
};

use super::plan::{self, plan};

fn server(port: u16, host: &str, credential: Option<&str>) -> GatewayServer {
    GatewayServer {
        index: 0,
        name: format!("s{port}"),
        port,
        bind: None,
        protocol: if credential.is_some() {
            ServerProtocol::Https
        } else {
            ServerProtocol::Http
        },
        hosts: vec![ServerHost {
            namespace: None,
            host: host.into(),
        }],
        tls: credential.map(|c| ServerTls {
            mode: TlsMode::Simple,
            credential: Some(c.into()),
            ca_credential: None,
            min_version: None,
            max_version: None,
            cipher_suites: Vec::new(),
            subject_alt_names: Vec::new(),
        }),
        https_redirect: false,
        routes: String::new(),
    }
}

fn gateway(name: &str, created: &str, servers: Vec<GatewayServer>) -> Arc<IngressGateway> {
    Arc::new(IngressGateway {
        namespace: "demo".into(),
        name: name.into(),
        selector: BTreeMap::from([("istio".into(), "ingress".into())]),
        servers: servers
            .into_iter()
            .map(|s| GatewayServer {
                routes: format!("demo/{name}"),
                ..s
            })
            .collect(),
        created: Some(created.into()),
        api: IngressApi::Istio,
    })
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("istio".into(), "ingress".into())])
}

#[test]
fn the_older_gateway_keeps_a_contested_host_and_the_conflict_is_reported() {
    let state = State {
        ingress_gateways: vec![
            gateway("old", "2026-01-01", vec![server(80, "a.example.com", None)]),
            gateway(
                "new",
                "2026-02-01",
                vec![
                    server(80, "a.example.com", None),
                    server(81, "b.example.com", None),
                ],
            ),
        ],
        ..State::default()
    };
    let p = plan(&state, &labels(), "istio-ingress", [0, 0, 0, 0].into());
    let port80 = &p.ports[&"0.0.0.0:80".parse().unwrap()];
    assert_eq!(port80.servers.len(), 1);
    assert_eq!(port80.servers[0].gateway, "demo/old");
    assert!(p.ports.contains_key(&"0.0.0.0:81".parse().unwrap()));
    assert_eq!(p.problems.len(), 1);
    assert_eq!(p.problems[0].reason, plan::HOST_CONFLICT);
    assert_eq!(p.problems[0].gateway, "demo/new");
    // A gateway pod the selector does not match serves nothing.
    let other = BTreeMap::from([("istio".into(), "eastwest".into())]);
    assert!(
        plan(&state, &other, "istio-ingress", [0, 0, 0, 0].into())
            .ports
            .is_empty()
    );
}

#[test]
fn a_missing_secret_takes_out_its_server_only_and_secrets_come_from_the_gateways_namespace() {
    let mut state = State {
        ingress_gateways: vec![gateway(
            "gw",
            "2026-01-01",
            vec![server(80, "*", None), server(443, "*", Some("cred"))],
        )],
        ..State::default()
    };
    let p = plan(&state, &labels(), "istio-ingress", [0, 0, 0, 0].into());
    assert_eq!(p.ports.len(), 1);
    assert_eq!(p.problems[0].reason, plan::MISSING_SECRET);
    assert_eq!(p.problems[0].secret, "istio-ingress/cred");
    // In the Gateway's namespace it does not count: Istio reads the gateway pod's namespace.
    let secret = |ns: &str| {
        Arc::new(TlsSecret {
            namespace: ns.into(),
            name: "cred".into(),
            version: "1".into(),
            cert_chain: Some(b"x".to_vec()),
            private_key: Some(b"y".to_vec()),
            ca_bundle: None,
        })
    };
    state.secrets.insert("demo/cred".into(), secret("demo"));
    assert_eq!(
        plan(&state, &labels(), "istio-ingress", [0, 0, 0, 0].into())
            .ports
            .len(),
        1
    );
    state
        .secrets
        .insert("istio-ingress/cred".into(), secret("istio-ingress"));
    let p = plan(&state, &labels(), "istio-ingress", [0, 0, 0, 0].into());
    assert_eq!(p.ports.len(), 2);
    assert!(p.problems.is_empty());
    // The TLS builder refuses material that is not PEM, naming the Secret and the key.
    let https = &p.ports[&"0.0.0.0:443".parse().unwrap()].servers[0];
    let e = super::tls::build(https).unwrap_err();
    assert!(e.starts_with("Secret istio-ingress/cred: tls.crt"), "{e}");
}

#[test]
fn https_and_passthrough_share_a_port_by_sni_and_tcp_ports_stand_alone() {
    let passthrough = GatewayServer {
        protocol: ServerProtocol::Tls,
        tls: Some(ServerTls {
            mode: TlsMode::Passthrough,
            credential: None,
            ca_credential: None,
            min_version: None,
            max_version: None,
            cipher_suites: Vec::new(),
            subject_alt_names: Vec::new(),
        }),
        ..server(443, "nginx.example.com", None)
    };
    let tcp = GatewayServer {
        protocol: ServerProtocol::Tcp,
        ..server(31400, "*", None)
    };
    let tcp_on_443 = GatewayServer {
        protocol: ServerProtocol::Tcp,
        ..server(443, "*", None)
    };
    let mut state = State {
        ingress_gateways: vec![
            gateway(
                "gw",
                "2026-01-01",
                vec![
                    server(443, "bookinfo.example.com", Some("cred")),
                    passthrough,
                    tcp,
                ],
            ),
            gateway("late", "2026-02-01", vec![tcp_on_443]),
        ],
        ..State::default()
    };
    state.secrets.insert(
        "istio-ingress/cred".into(),
        Arc::new(TlsSecret {
            namespace: "istio-ingress".into(),
            name: "cred".into(),
            version: "1".into(),
            cert_chain: Some(b"x".to_vec()),
            private_key: Some(b"y".to_vec()),
            ca_bundle: None,
        }),
    );
    let p = plan(&state, &labels(), "istio-ingress", [0, 0, 0, 0].into());
    let tls = &p.ports[&"0.0.0.0:443".parse().unwrap()];
    assert_eq!(tls.class, mesh::model::PortClass::Tls);
    let hosts: Vec<&str> = tls
        .servers
        .iter()
        .map(|s| s.server.hosts[0].host.as_str())
        .collect();
    assert_eq!(hosts, ["bookinfo.example.com", "nginx.example.com"]);
    // A passed-through server needs no Secret.
    assert!(tls.servers[1].credential.is_none());
    let tcp = &p.ports[&"0.0.0.0:31400".parse().unwrap()];
    assert_eq!(tcp.class, mesh::model::PortClass::Tcp);
    // The younger Gateway's TCP server cannot have the TLS port.
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert_eq!(p.problems[0].reason, plan::PORT_CONFLICT);
    assert_eq!(p.problems[0].gateway, "demo/late");
    assert!(
        p.problems[0].message.contains("already served as TLS"),
        "{}",
        p.problems[0].message
    );
}

#[test]
fn ca_cert_credential_name_names_the_client_ca_secret() {
    let secret = |name: &str, ca: bool, keys: bool| {
        Arc::new(TlsSecret {
            namespace: "istio-ingress".into(),
            name: name.into(),
            version: "1".into(),
            cert_chain: keys.then(|| b"cert".to_vec()),
            private_key: keys.then(|| b"key".to_vec()),
            ca_bundle: ca.then(|| b"ca".to_vec()),
        })
    };
    let mut mutual = server(443, "*", Some("cred"));
    if let Some(tls) = mutual.tls.as_mut() {
        tls.mode = TlsMode::Mutual;
        tls.ca_credential = Some("client-ca".into());
    }
    let mut state = State {
        ingress_gateways: vec![gateway("gw", "2026-01-01", vec![mutual])],
        ..State::default()
    };
    // The credential has a ca.crt of its own, but the named CA Secret is what counts.
    state
        .secrets
        .insert("istio-ingress/cred".into(), secret("cred", true, true));
    let p = plan(&state, &labels(), "istio-ingress", [0, 0, 0, 0].into());
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert_eq!(p.problems[0].reason, plan::MISSING_CA);
    assert_eq!(p.problems[0].secret, "istio-ingress/client-ca");
    assert!(p.problems[0].message.contains("caCertCredentialName"));
    state.secrets.insert(
        "istio-ingress/client-ca".into(),
        secret("client-ca", true, false),
    );
    let p = plan(&state, &labels(), "istio-ingress", [0, 0, 0, 0].into());
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    let served = &p.ports.values().next().unwrap().servers[0];
    assert_eq!(
        served.client_ca.as_ref().map(|s| s.name.as_str()),
        Some("client-ca")
    );
}
