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
        "  selector: {istio: ingress}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*/bookinfo.example.com\", \"./*.local.example.com\"]\n    tls: {httpsRedirect: true}\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"bookinfo.example.com\"]\n    tls: {mode: MUTUAL, credentialName: bookinfo, minProtocolVersion: TLSV1_2}\n  - port: {number: 8443, name: pass, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: PASSTHROUGH}\n",
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
