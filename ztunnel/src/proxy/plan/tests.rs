use std::collections::BTreeMap;

use super::*;
use mesh::model::WaypointRef;
use mesh::model::{Endpoint, ServicePort, TargetPort};

fn workload(name: &str, ip: &str, enrolled: bool) -> Arc<Workload> {
    Arc::new(Workload {
        uid: format!("demo/{name}"),
        name: name.into(),
        namespace: "demo".into(),
        ips: vec![ip.parse().unwrap()],
        node: "node-b".into(),
        service_account: name.into(),
        identity: Identity::new("cluster.local", "demo", name).unwrap(),
        labels: BTreeMap::new(),
        enrolled,
        workload_name: name.into(),
        workload_kind: "deployment".into(),
        canonical_service: name.into(),
        canonical_revision: "latest".into(),
        named_ports: [("http".to_string(), 8081u16)].into_iter().collect(),
    })
}

fn endpoint(w: &Workload, ready: bool) -> Endpoint {
    Endpoint {
        workload_uid: Some(w.uid.clone()),
        ip: w.ips[0],
        ready,
        ports: BTreeMap::new(),
    }
}

fn state(workloads: Vec<Arc<Workload>>, services: Vec<Service>) -> State {
    let mut st = State::default();
    for w in workloads {
        for ip in &w.ips {
            st.by_ip.insert(*ip, w.clone());
        }
        st.workloads.insert(w.uid.clone(), w);
    }
    for s in services {
        let s = Arc::new(s);
        for vip in &s.vips {
            st.by_vip.insert(*vip, s.clone());
        }
        st.services.insert(s.key(), s);
    }
    st
}

fn service(endpoints: Vec<Endpoint>, target: TargetPort) -> Service {
    Service {
        name: "web".into(),
        namespace: "demo".into(),
        hostname: "web.demo.svc.cluster.local".into(),
        vips: vec!["10.96.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            name: Some("http".into()),
            port: 80,
            target,
            protocol: "TCP".into(),
            app_protocol: Some("http".into()),
        }],
        endpoints,
        labels: BTreeMap::new(),
        waypoint: None,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn enrolled_pod_ip_goes_over_hbone() {
    let web = workload("web", "10.1.0.5", true);
    let st = state(vec![web.clone()], vec![]);
    match plan_outbound(&st, addr("10.1.0.5:8080"), |_| 0) {
        OutboundPlan::Hbone {
            hbone_addr,
            authority,
            identity,
            service,
            ..
        } => {
            assert_eq!(hbone_addr, addr("10.1.0.5:15008"));
            assert_eq!(authority, addr("10.1.0.5:8080"));
            assert_eq!(identity, web.identity);
            assert!(service.is_none());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unenrolled_or_unknown_is_passthrough() {
    let st = state(vec![workload("legacy", "10.1.0.6", false)], vec![]);
    assert!(matches!(
        plan_outbound(&st, addr("10.1.0.6:80"), |_| 0),
        OutboundPlan::Passthrough { addr: a, .. } if a == addr("10.1.0.6:80")
    ));
    assert!(matches!(
        plan_outbound(&st, addr("192.0.2.1:443"), |_| 0),
        OutboundPlan::Passthrough { addr: a, reason: "destination is not a known workload", .. } if a == addr("192.0.2.1:443")
    ));
}

#[test]
fn vip_resolves_to_ready_endpoint_and_target_port() {
    let a = workload("web-a", "10.1.0.7", true);
    let b = workload("web-b", "10.1.0.8", true);
    let c = workload("web-c", "10.1.0.9", true);
    let svc = service(
        vec![endpoint(&a, true), endpoint(&b, false), endpoint(&c, true)],
        TargetPort::Number(8080),
    );
    let st = state(vec![a, b, c], vec![svc]);
    let mut seen = Vec::new();
    for i in 0..4 {
        match plan_outbound(&st, addr("10.96.0.10:80"), |n| {
            assert_eq!(n, 2, "only ready endpoints are candidates");
            i % n
        }) {
            OutboundPlan::Hbone {
                authority,
                hbone_addr,
                service,
                ..
            } => {
                assert_eq!(hbone_addr.port(), 15008);
                assert_eq!(authority.port(), 8080);
                assert_eq!(service.unwrap().name, "web");
                seen.push(authority.ip().to_string());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, ["10.1.0.7", "10.1.0.9", "10.1.0.7", "10.1.0.9"]);
}

#[test]
fn named_target_port_resolves_per_endpoint() {
    let a = workload("web-a", "10.1.0.7", true);
    let mut with_slice_port = endpoint(&a, true);
    with_slice_port.ports.insert("http".into(), 9090);
    let st = state(
        vec![a.clone()],
        vec![service(
            vec![with_slice_port],
            TargetPort::Named("http".into()),
        )],
    );
    assert!(matches!(
        plan_outbound(&st, addr("10.96.0.10:80"), |_| 0),
        OutboundPlan::Hbone { authority, .. } if authority == addr("10.1.0.7:9090")
    ));
    // Without a port in the slice, the pod's container port of that name is used.
    let st = state(
        vec![a.clone()],
        vec![service(
            vec![endpoint(&a, true)],
            TargetPort::Named("http".into()),
        )],
    );
    assert!(matches!(
        plan_outbound(&st, addr("10.96.0.10:80"), |_| 0),
        OutboundPlan::Hbone { authority, .. } if authority == addr("10.1.0.7:8081")
    ));
}

#[test]
fn vip_to_unenrolled_endpoint_is_load_balanced_passthrough() {
    let legacy = workload("legacy", "10.1.0.6", false);
    let st = state(
        vec![legacy.clone()],
        vec![service(
            vec![endpoint(&legacy, true)],
            TargetPort::Number(8080),
        )],
    );
    assert!(matches!(
        plan_outbound(&st, addr("10.96.0.10:80"), |_| 0),
        OutboundPlan::Passthrough { addr: a, service: Some(_), .. } if a == addr("10.1.0.6:8080")
    ));
}

#[test]
fn vip_without_ready_endpoints_or_port_is_unreachable() {
    let a = workload("web-a", "10.1.0.7", true);
    let st = state(
        vec![a.clone()],
        vec![service(vec![endpoint(&a, false)], TargetPort::Number(8080))],
    );
    match plan_outbound(&st, addr("10.96.0.10:80"), |_| 0) {
        OutboundPlan::Unreachable { reason } => {
            assert_eq!(reason, "service demo/web has no ready endpoint for port 80")
        }
        other => panic!("{other:?}"),
    }
    match plan_outbound(&st, addr("10.96.0.10:443"), |_| 0) {
        OutboundPlan::Unreachable { reason } => {
            assert_eq!(reason, "service demo/web has no TCP port 443")
        }
        other => panic!("{other:?}"),
    }
}

fn with_waypoint(mut svc: Service, name: &str) -> Service {
    svc.waypoint = Some(WaypointRef {
        namespace: "demo".into(),
        name: name.into(),
    });
    svc
}

fn waypoint_service(endpoints: Vec<Endpoint>) -> Service {
    let mut svc = service(endpoints, TargetPort::Number(15008));
    svc.name = "waypoint".into();
    svc.hostname = "waypoint.demo.svc.cluster.local".into();
    svc.vips = vec!["10.96.0.99".parse().unwrap()];
    svc
}

#[test]
fn service_with_a_waypoint_goes_to_the_waypoint_with_the_vip_as_authority() {
    let web = workload("web", "10.1.0.5", true);
    let wp = workload("waypoint", "10.1.0.9", false);
    let st = state(
        vec![web.clone(), wp.clone()],
        vec![
            with_waypoint(
                service(vec![endpoint(&web, true)], TargetPort::Number(8080)),
                "waypoint",
            ),
            waypoint_service(vec![endpoint(&wp, true)]),
        ],
    );
    match plan_outbound(&st, addr("10.96.0.10:80"), |_| 0) {
        OutboundPlan::Hbone {
            hbone_addr,
            authority,
            identity,
            waypoint,
            service,
            ..
        } => {
            assert_eq!(hbone_addr, addr("10.1.0.9:15008"));
            assert_eq!(
                authority,
                addr("10.96.0.10:80"),
                "the waypoint gets the VIP:port"
            );
            assert_eq!(identity, wp.identity, "expects the waypoint's identity");
            assert_eq!(waypoint.unwrap().name, "waypoint");
            assert_eq!(service.unwrap().name, "web");
        }
        other => panic!("expected HBONE to the waypoint, got {other:?}"),
    }
    // A pod IP is not steered: workload-addressed traffic skips a service waypoint.
    assert!(matches!(
        plan_outbound(&st, addr("10.1.0.5:8080"), |_| 0),
        OutboundPlan::Hbone { waypoint: None, .. }
    ));
}

#[test]
fn a_missing_or_unready_waypoint_fails_closed() {
    let web = workload("web", "10.1.0.5", true);
    let wp = workload("waypoint", "10.1.0.9", false);
    let svc = with_waypoint(
        service(vec![endpoint(&web, true)], TargetPort::Number(8080)),
        "waypoint",
    );
    let st = state(vec![web.clone()], vec![svc.clone()]);
    match plan_outbound(&st, addr("10.96.0.10:80"), |_| 0) {
        OutboundPlan::Unreachable { reason } => {
            assert!(reason.contains("no Service demo/waypoint"), "{reason}")
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    let st = state(
        vec![web.clone(), wp.clone()],
        vec![svc, waypoint_service(vec![endpoint(&wp, false)])],
    );
    match plan_outbound(&st, addr("10.96.0.10:80"), |_| 0) {
        OutboundPlan::Unreachable { reason } => {
            assert!(reason.contains("no ready pod"), "{reason}")
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
}
