//! `ztunnel config`: the operator's view of a running ztunnel, modelled on
//! `istioctl ztunnel-config`. It reads the admin endpoint's `/config_dump` and prints workloads,
//! services, policies, certificates or live connections as a table, JSON or YAML.

use std::net::SocketAddr;

use serde_json::Value;

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Workloads,
    Services,
    Policies,
    Certificates,
    Connections,
    All,
}

pub use mesh::ops::view::{Output, ViewError as OperatorError};
use mesh::ops::view::{cell as s, list, table};

/// Flags of `ztunnel config`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// What to show.
    #[arg(value_enum, default_value = "all")]
    pub section: Section,
    /// The ztunnel's admin address.
    #[arg(long, env = "ZTUNNEL_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Fetches `/config_dump` from `addr`.
pub async fn fetch(addr: SocketAddr) -> Result<Value, OperatorError> {
    mesh::ops::view::fetch("ztunnel", addr, &["state", "certificates"]).await
}

/// Renders `section` of a config dump in `output`.
pub fn render(dump: &Value, section: Section, output: Output) -> Result<String, OperatorError> {
    let selected = select(dump, section);
    match output {
        Output::Table => Ok(tables(dump, section)),
        other => mesh::ops::view::serialize(&selected, other),
    }
}

fn select(dump: &Value, section: Section) -> Value {
    let state = &dump["state"];
    match section {
        Section::Workloads => state["workloads"].clone(),
        Section::Services => state["services"].clone(),
        Section::Policies => serde_json::json!({
            "authorization_policies": state["authorization_policies"],
            "peer_authentications": state["peer_authentications"],
        }),
        Section::Certificates => dump["certificates"].clone(),
        Section::Connections => dump["connections"].clone(),
        Section::All => dump.clone(),
    }
}

fn tables(dump: &Value, section: Section) -> String {
    let mut out = String::new();
    let all = section == Section::All;
    if all || section == Section::Workloads {
        workloads(dump, &mut out);
    }
    if all || section == Section::Services {
        services(dump, &mut out);
    }
    if all || section == Section::Policies {
        policies(dump, &mut out);
    }
    if all || section == Section::Certificates {
        mesh::ops::view::certificates(dump, &mut out);
    }
    if all || section == Section::Connections {
        connections(dump, &mut out);
    }
    out
}

fn workloads(dump: &Value, out: &mut String) {
    let captured: Vec<&str> = dump["pods"]
        .as_array()
        .map(|p| p.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let rows = dump["state"]["workloads"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|w| {
                    let uid = w["uid"].as_str().unwrap_or_default();
                    vec![
                        s(&w["namespace"]),
                        s(&w["name"]),
                        list(&w["ips"]),
                        s(&w["node"]),
                        s(&w["identity"]),
                        if !w["enrolled"].as_bool().unwrap_or(false) {
                            "no (not enrolled)".into()
                        } else if captured.contains(&uid) {
                            "yes (this node)".into()
                        } else {
                            "yes (other node)".into()
                        },
                        // Waypoints serve services (Istio's default `waypoint-for:
                        // service`); traffic to a pod IP goes direct. Waypoint pods say so.
                        if w["labels"]["gateway.istio.io/managed"].is_string() {
                            "(is a waypoint)".into()
                        } else {
                            "-".into()
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        out,
        "WORKLOADS",
        &[
            "NAMESPACE",
            "NAME",
            "IP",
            "NODE",
            "IDENTITY",
            "CAPTURED",
            "WAYPOINT",
        ],
        rows,
    );
}

fn services(dump: &Value, out: &mut String) {
    let rows = dump["state"]["services"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|svc| {
                    let ports = svc["ports"]
                        .as_array()
                        .map(|ps| {
                            ps.iter()
                                .map(|p| {
                                    let target = match &p["target"] {
                                        Value::Object(t) => {
                                            t.values().next().map(s).unwrap_or_default()
                                        }
                                        other => s(other),
                                    };
                                    format!("{}->{}", s(&p["port"]), target)
                                })
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let endpoints = svc["endpoints"].as_array();
                    let ready = endpoints
                        .map(|e| e.iter().filter(|e| e["ready"] == Value::Bool(true)).count())
                        .unwrap_or(0);
                    let total = endpoints.map_or(0, Vec::len);
                    vec![
                        s(&svc["namespace"]),
                        s(&svc["name"]),
                        list(&svc["vips"]),
                        ports,
                        format!("{ready}/{total}"),
                        match &svc["waypoint"] {
                            Value::Object(w) => format!(
                                "{}/{}",
                                w.get("namespace").map(s).unwrap_or_default(),
                                w.get("name").map(s).unwrap_or_default()
                            ),
                            _ => "-".into(),
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        out,
        "SERVICES",
        &[
            "NAMESPACE",
            "NAME",
            "VIPS",
            "PORTS",
            "ENDPOINTS READY",
            "WAYPOINT",
        ],
        rows,
    );
}

fn scope(v: &Value) -> String {
    match v {
        Value::String(global) => global.to_lowercase(),
        Value::Object(m) => match m.iter().next() {
            Some((kind, Value::String(ns))) if kind == "Namespace" => format!("namespace {ns}"),
            Some((_, sel)) => format!("selector {}", s(&sel["labels"])),
            None => "-".into(),
        },
        other => s(other),
    }
}

fn policies(dump: &Value, out: &mut String) {
    let state = &dump["state"];
    let rows = state["authorization_policies"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let rules = p["rules"].as_array().map_or(0, Vec::len);
                    let l7 = p["rules"]
                        .as_array()
                        .map(|r| r.iter().filter(|r| list(&r["l7_fields"]) != "-").count())
                        .unwrap_or(0);
                    vec![
                        s(&p["namespace"]),
                        s(&p["name"]),
                        s(&p["action"]).to_uppercase(),
                        scope(&p["scope"]),
                        format!("{rules} ({l7} with L7 fields)"),
                        serde_json::to_string(&p["rules"]).unwrap_or_default(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        out,
        "AUTHORIZATION POLICIES",
        &["NAMESPACE", "NAME", "ACTION", "SCOPE", "RULES", "DETAIL"],
        rows,
    );
    let rows = state["peer_authentications"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    vec![
                        s(&p["namespace"]),
                        s(&p["name"]),
                        s(&p["mode"]).to_uppercase(),
                        scope(&p["scope"]),
                        serde_json::to_string(&p["port_modes"]).unwrap_or_default(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        out,
        "PEER AUTHENTICATIONS",
        &["NAMESPACE", "NAME", "MODE", "SCOPE", "PORTS"],
        rows,
    );
}

fn connections(dump: &Value, out: &mut String) {
    let rows = dump["connections"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let inbound = c["destination_workload"]
                        .as_str()
                        .is_some_and(|d| !d.is_empty());
                    vec![
                        if inbound { "inbound" } else { "outbound" }.into(),
                        s(&c["source_ip"]),
                        s(&c["destination_addr"]),
                        s(&c["source_identity"]),
                        if inbound {
                            s(&c["destination_workload"])
                        } else {
                            "-".into()
                        },
                        s(&c["bytes_to_server"]),
                        s(&c["bytes_to_client"]),
                        format!("{:.1}s", c["age_ms"].as_f64().unwrap_or(0.0) / 1000.0),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        out,
        "CONNECTIONS",
        &[
            "DIRECTION",
            "SOURCE",
            "DESTINATION",
            "SOURCE IDENTITY",
            "DESTINATION WORKLOAD",
            "BYTES TO SERVER",
            "BYTES TO CLIENT",
            "AGE",
        ],
        rows,
    );
}

/// `ztunnel config`: fetch and print.
pub async fn run(args: ConfigArgs) -> Result<String, OperatorError> {
    let dump = fetch(args.admin).await?;
    render(&dump, args.section, args.output)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tables_name_the_waypoint_of_a_service_and_mark_waypoint_pods() {
        let dump = serde_json::json!({
            "pods": [],
            "state": {
                "workloads": {
                    "demo/waypoint": {
                        "uid": "demo/waypoint", "namespace": "demo", "name": "waypoint",
                        "ips": ["10.0.0.5"], "node": "a", "enrolled": false,
                        "identity": "spiffe://cluster.local/ns/demo/sa/waypoint",
                        "labels": {"gateway.istio.io/managed": "istio.io-mesh-controller"},
                    },
                },
                "services": {
                    "demo/reviews": {
                        "namespace": "demo", "name": "reviews", "vips": ["10.96.0.1"],
                        "ports": [{"port": 9080, "target": {"Number": 9080}}],
                        "endpoints": [],
                        "waypoint": {"namespace": "demo", "name": "waypoint"},
                    },
                    "demo/ratings": {
                        "namespace": "demo", "name": "ratings", "vips": ["10.96.0.2"],
                        "ports": [], "endpoints": [], "waypoint": null,
                    },
                },
            },
        });
        let services = render(&dump, Section::Services, Output::Table).unwrap();
        let reviews = services.lines().find(|l| l.contains("reviews")).unwrap();
        assert!(reviews.trim_end().ends_with("demo/waypoint"), "{services}");
        let ratings = services.lines().find(|l| l.contains("ratings")).unwrap();
        assert!(ratings.trim_end().ends_with('-'), "{services}");
        let workloads = render(&dump, Section::Workloads, Output::Table).unwrap();
        assert!(workloads.contains("(is a waypoint)"), "{workloads}");
    }
}
