//! Tables for Istio `Gateway`s, the VirtualServices bound to them and TLS Secrets.

use super::tests::{messages, translate};

fn gateway(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: demo}}\nspec:\n{spec}\n---\n"
    )
}

#[test]
fn servers_hosts_and_tls_are_read_as_istio_writes_them() {
    let yaml = gateway(
        "  selector: {istio: ingress}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*/bookinfo.example.com\", \"./*.local.example.com\"]\n    tls: {httpsRedirect: true}\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"bookinfo.example.com\"]\n    tls: {mode: MUTUAL, credentialName: bookinfo, caCertCredentialName: bookinfo-clients, minProtocolVersion: TLSV1_2}\n  - port: {number: 8443, name: pass, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: PASSTHROUGH}\n",
    );
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let gw = &t.state.ingress_gateways[0];
    assert_eq!(gw.key(), "demo/gw");
    assert_eq!(gw.selector["istio"], "ingress");
    let [http, https, pass] = &gw.servers[..] else {
        panic!("{:?}", gw.servers)
    };
    assert!(http.https_redirect && http.tls.is_none());
    assert_eq!(http.hosts[0].namespace, None);
    assert_eq!(http.hosts[1].namespace.as_deref(), Some("demo"));
    assert_eq!(http.hosts[1].host, "*.local.example.com");
    let tls = https.tls.as_ref().unwrap();
    assert_eq!(tls.mode, crate::model::TlsMode::Mutual);
    assert_eq!(tls.credential.as_deref(), Some("bookinfo"));
    assert_eq!(tls.ca_credential.as_deref(), Some("bookinfo-clients"));
    // HTTPS passed through is a TLS server routed by SNI, as Istio treats it.
    assert_eq!(pass.protocol, crate::model::ServerProtocol::Tls);
}

#[test]
fn bad_gateways_are_refused_naming_the_field() {
    for (spec, expected) in [
        (
            "  selector: {istio: ingress}\n",
            "spec.servers: at least one server is required",
        ),
        (
            "  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"bad host!\"]\n",
            "spec.servers[0].hosts[0]: \"bad host!\" is not a host",
        ),
        (
            "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE}\n",
            "spec.servers[0].tls.credentialName: mode SIMPLE needs credentialName",
        ),
        (
            "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, serverCertificate: /etc/certs/c.pem, privateKey: /etc/certs/k.pem}\n",
            "spec.servers[0].tls.serverCertificate: certificates from files",
        ),
        (
            "  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*\"]\n  - port: {number: 80, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, credentialName: c}\n",
            "spec.servers[1].port.number: port 80 is already a plain HTTP server",
        ),
        (
            "  servers:\n  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: PASSTHROUGH}\n  - port: {number: 443, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n",
            "spec.servers[1].port.number: port 443 is already a TLS server",
        ),
        (
            "  servers:\n  - port: {number: 80, name: http, protocol: QUIC}\n    hosts: [\"*\"]\n",
            "spec.servers[0].port.protocol: \"QUIC\" is not one of",
        ),
        (
            "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, credentialName: c, caCertCredentialName: ca}\n",
            "spec.servers[0].tls.caCertCredentialName: only MUTUAL and OPTIONAL_MUTUAL verify client certificates",
        ),
    ] {
        let t = translate(&gateway(spec));
        let m = messages(&t).join("\n");
        assert!(m.contains(expected), "{spec}\n=> {m}");
        assert!(t.state.ingress_gateways.is_empty());
    }
}

#[test]
fn virtual_services_bind_to_named_gateways_and_per_match_gateways_filter() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: demo}\nspec:\n  hosts: [bookinfo.example.com]\n  gateways: [gw, other/edge, mesh]\n  http:\n  - match: [{uri: {prefix: /mesh-only}, gateways: [mesh]}]\n    route: [{destination: {host: reviews}}]\n  - route: [{destination: {host: reviews}}]\n";
    let t = translate(yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let bound: Vec<&str> = t
        .state
        .gateway_virtual_services
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(bound, ["demo/gw", "other/edge"]);
    // The match for `mesh` only is not the gateway's; the catch-all is.
    let vs = &t.state.gateway_virtual_services["demo/gw"][0];
    assert_eq!(vs.http.len(), 1);
    assert_eq!(vs.hosts, ["bookinfo.example.com"]);
    assert_eq!(
        t.state.virtual_services[0].http.len(),
        2,
        "the mesh keeps both routes"
    );
}

#[test]
fn tls_routes_are_read_for_gateways_and_checked_as_istio_does() {
    // Istio's "ingress gateway without TLS termination" task.
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: nginx, namespace: demo}\nspec:\n  hosts: [nginx.example.com, \"*.apps.example.com\"]\n  gateways: [mygateway]\n  tls:\n  - match:\n    - port: 443\n      sniHosts: [nginx.example.com]\n    route:\n    - destination: {host: my-nginx, port: {number: 443}}\n  - match: [{sniHosts: [\"A.apps.example.com\", \"*.b.apps.example.com\"], gateways: [mygateway]}]\n    route:\n    - destination: {host: my-nginx, port: {number: 443}}\n      weight: 80\n    - destination: {host: other, port: {number: 443}}\n      weight: 20\n";
    let t = translate(yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let vs = &t.state.gateway_virtual_services["demo/mygateway"][0];
    assert_eq!(vs.tls.len(), 2);
    assert_eq!(vs.tls[0].matches[0].sni_hosts, ["nginx.example.com"]);
    assert_eq!(vs.tls[0].matches[0].l4.port, Some(443));
    assert_eq!(
        vs.tls[1].matches[0].sni_hosts,
        ["a.apps.example.com", "*.b.apps.example.com"],
        "lower-cased"
    );
    assert_eq!(vs.tls[1].route.len(), 2);
    assert_eq!(
        vs.tls[1].route[0].destination.host,
        "my-nginx.demo.svc.cluster.local"
    );

    for (tls, expected) in [
        (
            "  - route: [{destination: {host: my-nginx}}]\n",
            "spec.tls[0].match: a TLS route needs at least one match with sniHosts",
        ),
        (
            "  - match: [{port: 443}]\n    route: [{destination: {host: my-nginx}}]\n",
            "spec.tls[0].match[0].sniHosts: at least one SNI name is required",
        ),
        (
            "  - match: [{sniHosts: [other.example.org]}]\n    route: [{destination: {host: my-nginx}}]\n",
            "spec.tls[0].match[0].sniHosts[0]: \"other.example.org\" is not within any of the VirtualService's hosts",
        ),
        (
            "  - match: [{sniHosts: [nginx.example.com]}]\n",
            "spec.tls[0].route: a TLS route needs at least one destination",
        ),
    ] {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: nginx, namespace: demo}}\nspec:\n  hosts: [nginx.example.com]\n  gateways: [mygateway]\n  tls:\n{tls}"
        );
        let t = translate(&yaml);
        let m = messages(&t).join("\n");
        assert!(m.contains(expected), "{tls}\n=> {m}");
        assert!(t.state.gateway_virtual_services.is_empty());
    }
}

#[test]
fn tls_secrets_are_read_and_never_serialized() {
    let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: cred, namespace: istio-ingress}\ntype: kubernetes.io/tls\nstringData: {tls.crt: CERT, tls.key: '-----BEGIN PRIVATE KEY-----'}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: token, namespace: istio-ingress}\nstringData: {token: abc}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: half, namespace: istio-ingress}\nstringData: {tls.crt: CERT}\n";
    let t = translate(yaml);
    let m = messages(&t).join("\n");
    assert!(
        m.contains("Secret istio-ingress/half: data: has a certificate but no tls.key"),
        "{m}"
    );
    let keys: Vec<&str> = t.state.secrets.keys().map(String::as_str).collect();
    assert_eq!(keys, ["istio-ingress/cred"]);
    let dump = serde_json::to_string(&t.state).unwrap();
    assert!(!dump.contains("PRIVATE KEY"), "{dump}");
    assert!(dump.contains("istio-ingress/cred"));
    assert!(!format!("{:?}", t.state.secrets).contains("PRIVATE KEY"));
}

/// Istio's getting-started `bookinfo-gateway` (Gateway API, class `istio`) with an HTTPS
/// listener beside it, and `listeners` given.
fn api_gateway(listeners: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: bookinfo-gateway, namespace: default}}\nspec:\n  gatewayClassName: istio\n  listeners:\n{listeners}---\n"
    )
}

fn http_route(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}---\n"
    )
}

const BOOKINFO_LISTENERS: &str = "  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}\n  - name: https\n    port: 443\n    protocol: HTTPS\n    hostname: \"*.example.com\"\n    tls: {mode: Terminate, certificateRefs: [{name: bookinfo-cert}]}\n    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {shared-gateway: \"true\"}}}}\n";

/// The routes list (host, route names) of a listener.
fn listener_routes(t: &super::Translation, key: &str) -> Vec<(String, Vec<String>)> {
    t.state
        .gateway_virtual_services
        .get(key)
        .into_iter()
        .flatten()
        .map(|vs| {
            (
                vs.hosts[0].clone(),
                vs.http.iter().filter_map(|r| r.name.clone()).collect(),
            )
        })
        .collect()
}

#[test]
fn a_gateway_api_gateway_of_class_istio_becomes_listeners_with_their_routes() {
    let yaml = format!(
        "{}{}{}{}",
        api_gateway(BOOKINFO_LISTENERS),
        // The getting-started route: no hostnames, every listener that admits it.
        http_route(
            "bookinfo",
            "default",
            "  parentRefs: [{name: bookinfo-gateway}]\n  rules:\n  - matches: [{path: {type: Exact, value: /productpage}}, {path: {type: PathPrefix, value: /static}}]\n    backendRefs: [{name: productpage, port: 9080}]\n",
        ),
        // Only the https listener, by sectionName, from a namespace its selector admits.
        http_route(
            "shop",
            "shop",
            "  parentRefs: [{name: bookinfo-gateway, namespace: default, sectionName: https}]\n  hostnames: [shop.example.com, other.org]\n  rules:\n  - backendRefs: [{name: shop, port: 80}]\n",
        ),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {shared-gateway: \"true\"}}\n---\n",
    );
    let t = translate(&yaml);
    assert!(t.rejections.is_empty(), "{:?}", messages(&t));
    let gw = &t.state.ingress_gateways[0];
    assert_eq!(gw.api, crate::model::IngressApi::GatewayApi);
    assert_eq!(
        gw.selector,
        [(
            "gateway.networking.k8s.io/gateway-name".to_owned(),
            "bookinfo-gateway".to_owned()
        )]
        .into()
    );
    let labels = gw.selector.clone();
    assert!(gw.applies_to(&labels, "default"));
    assert!(
        !gw.applies_to(&labels, "elsewhere"),
        "only its own namespace"
    );
    let [http, https] = &gw.servers[..] else {
        panic!("{:?}", gw.servers)
    };
    assert_eq!((http.port, http.hosts[0].host.as_str()), (80, "*"));
    assert_eq!(http.routes, "default/bookinfo-gateway:http");
    assert_eq!(https.protocol, crate::model::ServerProtocol::Https);
    assert_eq!(https.hosts[0].host, "*.example.com");
    let tls = https.tls.as_ref().unwrap();
    assert_eq!(tls.credential.as_deref(), Some("bookinfo-cert"));

    // `bookinfo` (namespace default) attaches to http (Same) but not to https (Selector:
    // default lacks the label); `shop` to https only, for the hostname within *.example.com.
    assert_eq!(
        listener_routes(&t, "default/bookinfo-gateway:http"),
        [(
            "*".to_owned(),
            vec![
                "HTTPRoute:default/bookinfo:0".to_owned(),
                "HTTPRoute:default/bookinfo:0".to_owned()
            ]
        )]
    );
    assert_eq!(
        listener_routes(&t, "default/bookinfo-gateway:https"),
        [(
            "shop.example.com".to_owned(),
            vec!["HTTPRoute:shop/shop:0".to_owned()]
        )]
    );
    // The Service parents' view is unchanged: no Service was named.
    assert!(t.state.virtual_services.is_empty());
}

#[test]
fn gateway_api_listeners_attach_by_section_port_hostname_and_allowed_routes() {
    let listeners = "  - {name: a, port: 8080, protocol: HTTP, hostname: a.example.com}\n  - {name: b, port: 8081, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}\n  - {name: c, port: 8082, protocol: HTTP, allowedRoutes: {kinds: [{kind: GRPCRoute}]}}\n";
    // (parentRef, hostnames, route namespace) -> the listeners and hosts it lands on
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: [Case<'_>; 7] = [
        (
            "{name: gw}",
            "[]",
            "default",
            &[("a", "a.example.com"), ("b", "*")],
        ),
        ("{name: gw, sectionName: b}", "[]", "default", &[("b", "*")]),
        (
            "{name: gw, port: 8080}",
            "[]",
            "default",
            &[("a", "a.example.com")],
        ),
        (
            "{name: gw, sectionName: a, port: 8081}",
            "[]",
            "default",
            &[],
        ),
        (
            "{name: gw}",
            "[\"*.example.com\", x.org]",
            "default",
            &[
                ("a", "a.example.com"),
                ("b", "*.example.com"),
                ("b", "x.org"),
            ],
        ),
        (
            "{name: gw, namespace: default}",
            "[]",
            "other",
            &[("b", "*")],
        ),
        ("{name: nope}", "[]", "default", &[]),
    ];
    for (parent, hostnames, namespace, expected) in cases {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: default}}\nspec:\n  gatewayClassName: istio\n  listeners:\n{listeners}---\n{}",
            http_route(
                "r",
                namespace,
                &format!(
                    "  parentRefs: [{parent}]\n  hostnames: {hostnames}\n  rules:\n  - backendRefs: [{{name: web, port: 80}}]\n"
                ),
            )
        );
        let t = translate(&yaml);
        assert!(t.rejections.is_empty(), "{:?}", messages(&t));
        let mut got: Vec<(String, String)> = Vec::new();
        for listener in ["a", "b", "c"] {
            for (host, _) in listener_routes(&t, &format!("default/gw:{listener}")) {
                got.push((listener.to_owned(), host));
            }
        }
        let want: Vec<(String, String)> = expected
            .iter()
            .map(|(l, h)| ((*l).to_owned(), (*h).to_owned()))
            .collect();
        assert_eq!(got, want, "{parent} {hostnames} from {namespace}");
    }
}

#[test]
fn bad_gateway_api_gateways_are_refused_naming_the_field_and_other_classes_ignored() {
    for (listeners, expected) in [
        (
            "    []\n",
            "spec.listeners: at least one listener is required",
        ),
        (
            "  - {name: x, port: 80, protocol: HTTP}\n  - {name: x, port: 81, protocol: HTTP}\n",
            "spec.listeners[1].name: \"x\" is already the name of spec.listeners[0]",
        ),
        (
            "  - {name: x, port: 443, protocol: HTTPS}\n",
            "spec.listeners[0].tls: a HTTPS listener needs tls",
        ),
        (
            "  - {name: x, port: 443, protocol: HTTPS, tls: {certificateRefs: []}}\n",
            "spec.listeners[0].tls.certificateRefs: a listener that terminates TLS needs a certificateRef",
        ),
        (
            "  - {name: x, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: c, namespace: other}]}}\n",
            "spec.listeners[0].tls.certificateRefs[0].namespace: a Secret of another namespace is not served yet",
        ),
        (
            "  - {name: x, port: 443, protocol: HTTPS, tls: {mode: Passthrough}}\n",
            "spec.listeners[0].tls.mode: an HTTPS listener terminates TLS",
        ),
        (
            "  - {name: x, port: 80, protocol: HTTP, hostname: \"10.0.0.1:80\"}\n",
            "spec.listeners[0].hostname: \"10.0.0.1:80\" is not a hostname",
        ),
        (
            "  - {name: x, port: 9000, protocol: UDP}\n",
            "spec.listeners[0].protocol: UDP listeners are not served by this gateway",
        ),
        (
            "  - {name: x, port: 9000, protocol: TCP, tls: {mode: Terminate}}\n",
            "spec.listeners[0].tls: a TCP listener takes no tls",
        ),
        (
            "  - {name: x, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: TLSRoute}]}}\n",
            "spec.listeners[0].allowedRoutes.kinds[0]: gateway.networking.k8s.io/TLSRoute cannot attach to this HTTP listener (InvalidRouteKinds); it takes HTTPRoute, GRPCRoute",
        ),
        (
            "  - {name: x, port: 80, protocol: HTTP}\n  - {name: y, port: 80, protocol: TLS, tls: {mode: Passthrough}}\n",
            "spec.listeners[1].port: port 80 is already a plain HTTP listener",
        ),
    ] {
        let t = translate(&api_gateway(listeners));
        let m = messages(&t).join("\n");
        assert!(m.contains(expected), "{listeners}\n=> {m}");
        assert!(t.state.ingress_gateways.is_empty());
    }
    // A class that is not the ingress class (nor the waypoints') is not ours.
    let other = api_gateway("  - {name: x, port: 80, protocol: HTTP}\n")
        .replace("gatewayClassName: istio", "gatewayClassName: nginx");
    let t = translate(&other);
    assert!(t.rejections.is_empty() && t.state.ingress_gateways.is_empty());
    // The class is configurable.
    let config = super::TranslateConfig {
        ingress_gateway_class: "nginx".into(),
        ..super::TranslateConfig::default()
    };
    let t = super::Translator::new(config).translate(super::tests::parse(&other));
    assert_eq!(t.state.ingress_gateways.len(), 1);
}
