//! `waypoint config`: the operator's view of a running waypoint. It reads the admin port's
//! `/config_dump` and prints the services the waypoint serves (with their VirtualService and
//! DestinationRule), each Gateway API route's status per parent, and the health of every
//! upstream cluster (endpoints, ejections, pools, circuit-breaker overflows), as a table, JSON
//! or YAML.

use std::net::SocketAddr;

use mesh::ops::view::{Output, ViewError, cell, table};
use serde_json::Value;

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Services served, with the VirtualService and DestinationRule that apply, and each
    /// Gateway API route's status (`Accepted`, `ResolvedRefs`) per parent.
    Routes,
    /// Upstream clusters: endpoints with health, connections, overflows.
    Upstreams,
    Certificates,
    All,
}

/// Flags of `waypoint config`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    #[arg(value_enum, default_value = "all")]
    pub section: Section,
    /// The waypoint's admin address.
    #[arg(long, env = "WAYPOINT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Fetches `/config_dump` from `addr`.
pub async fn fetch(addr: SocketAddr) -> Result<Value, ViewError> {
    mesh::ops::view::fetch("waypoint", addr, &["services", "upstreams", "certificates"]).await
}

/// Renders `section` of a waypoint's config dump.
pub fn render(dump: &Value, section: Section, output: Output) -> Result<String, ViewError> {
    let selected = match section {
        Section::Routes => dump["services"].clone(),
        Section::Upstreams => dump["upstreams"].clone(),
        Section::Certificates => dump["certificates"].clone(),
        Section::All => dump.clone(),
    };
    if output != Output::Table {
        return mesh::ops::view::serialize(&selected, output);
    }
    let mut out = String::new();
    if matches!(section, Section::Routes | Section::All) {
        routes(dump, &mut out);
        route_statuses(dump, &mut out);
    }
    if matches!(section, Section::Upstreams | Section::All) {
        upstreams(dump, &mut out);
    }
    if matches!(section, Section::Certificates | Section::All) {
        mesh::ops::view::certificates(dump, &mut out);
    }
    Ok(out)
}

fn routes(dump: &Value, out: &mut String) {
    let state = &dump["state"];
    let rows = dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|svc| {
            let vs_key = cell(&svc["virtual_service"]);
            let routes = state["virtual_services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|vs| format!("{}/{}", cell(&vs["namespace"]), cell(&vs["name"])) == vs_key)
                .map_or("default".to_owned(), |vs| {
                    let http = vs["http"].as_array().map_or(0, Vec::len);
                    let tcp = vs["tcp"].as_array().map_or(0, Vec::len);
                    format!("{http} http, {tcp} tcp")
                });
            let routed_by = match &svc["routed_by"] {
                Value::String(s) => s.clone(),
                _ => vs_key,
            };
            vec![
                cell(&svc["service"]),
                cell(&svc["hostname"]),
                routed_by,
                routes,
                cell(&svc["destination_rule"]),
            ]
        })
        .collect();
    table(
        out,
        "SERVICES",
        &[
            "SERVICE",
            "HOSTNAME",
            "ROUTED BY",
            "ROUTES",
            "DESTINATIONRULE",
        ],
        rows,
    );
}

/// Each Gateway API route's `status.parents[]`: one row per parent, `Accepted` and
/// `ResolvedRefs` as `True` or the reason they are not (the message follows).
fn route_statuses(dump: &Value, out: &mut String) {
    let mut rows = Vec::new();
    for route in dump["state"]["route_statuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for parent in route["parents"].as_array().into_iter().flatten() {
            let p = &parent["parent_ref"];
            let mut name = format!(
                "{} {}/{}",
                cell(&p["kind"]),
                cell(&p["namespace"]),
                cell(&p["name"])
            );
            if let Some(section) = p["section_name"].as_str() {
                name.push_str(&format!(" ({section})"));
            }
            let condition = |kind: &str| {
                parent["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == kind)
                    .map_or("-".to_owned(), |c| match c["status"].as_str() {
                        Some("True") => "True".to_owned(),
                        _ => format!("{}: {}", cell(&c["reason"]), cell(&c["message"])),
                    })
            };
            rows.push(vec![
                format!(
                    "{} {}/{}",
                    cell(&route["kind"]),
                    cell(&route["namespace"]),
                    cell(&route["name"])
                ),
                name,
                condition("Accepted"),
                condition("ResolvedRefs"),
            ]);
        }
    }
    if !rows.is_empty() {
        table(
            out,
            "ROUTE STATUS",
            &["ROUTE", "PARENT", "ACCEPTED", "RESOLVEDREFS"],
            rows,
        );
    }
}

fn upstreams(dump: &Value, out: &mut String) {
    let mut rows = Vec::new();
    for cluster in dump["upstreams"]["clusters"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = match cluster["subset"].as_str() {
            Some(subset) => format!(
                "{}:{} ({subset})",
                cell(&cluster["service"]),
                cluster["port"]
            ),
            None => format!("{}:{}", cell(&cluster["service"]), cluster["port"]),
        };
        let lb = match &cluster["load_balancer"] {
            Value::Object(m) => m.keys().next().cloned().unwrap_or_default(),
            other => cell(other),
        };
        // Requests refused at once (503 UO): pending queue, concurrent requests, retries.
        let overflow: u64 = ["pending", "requests", "retries"]
            .iter()
            .filter_map(|k| cluster["overflow"][*k].as_u64())
            .sum();
        let endpoints = cluster["endpoints"].as_array().cloned().unwrap_or_default();
        if let Some(error) = cluster["error"].as_str() {
            rows.push(vec![
                name.clone(),
                lb.clone(),
                "-".into(),
                "-".into(),
                format!("error: {error}"),
                "-".into(),
                "-".into(),
                overflow.to_string(),
            ]);
        }
        for e in &endpoints {
            let health = if e["ejected"] == Value::Bool(true) {
                match e["ejection_left_ms"].as_u64() {
                    Some(ms) => format!("ejected ({}s left)", ms.div_ceil(1000)),
                    None => "ejected".into(),
                }
            } else if e["consecutive_5xx"].as_u64().unwrap_or(0) > 0 {
                format!("ok ({} consecutive 5xx)", e["consecutive_5xx"])
            } else {
                "ok".into()
            };
            let conns =
                e["http1"]["open"].as_u64().unwrap_or(0) + e["http2"]["open"].as_u64().unwrap_or(0);
            rows.push(vec![
                name.clone(),
                lb.clone(),
                cell(&e["address"]),
                cell(&e["workload"]),
                health,
                e["outstanding_requests"].to_string(),
                conns.to_string(),
                overflow.to_string(),
            ]);
        }
        if endpoints.is_empty() && cluster["error"].is_null() {
            rows.push(vec![
                name,
                lb,
                "-".into(),
                "-".into(),
                "no endpoints".into(),
                "-".into(),
                "-".into(),
                overflow.to_string(),
            ]);
        }
    }
    table(
        out,
        "UPSTREAMS",
        &[
            "CLUSTER",
            "LB",
            "ENDPOINT",
            "WORKLOAD",
            "HEALTH",
            "ACTIVE",
            "CONNECTIONS",
            "OVERFLOWS",
        ],
        rows,
    );
}

/// `waypoint config`: fetch and print.
pub async fn run(args: ConfigArgs) -> Result<String, ViewError> {
    let dump = fetch(args.admin).await?;
    render(&dump, args.section, args.output)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dump() -> Value {
        serde_json::json!({
            "services": [{"service": "demo/reviews", "hostname": "reviews.demo.svc.cluster.local",
                          "virtual_service": "demo/reviews", "routed_by": "VirtualService demo/reviews",
                          "destination_rule": "demo/reviews"}],
            "state": {"virtual_services": [{"namespace": "demo", "name": "reviews",
                                            "http": [{}, {}], "tcp": []}],
                      "route_statuses": [{"kind": "HTTPRoute", "namespace": "demo", "name": "reviews",
                          "parents": [{"parent_ref": {"kind": "Service", "namespace": "demo", "name": "reviews"},
                                       "conditions": [
                                          {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "attached"},
                                          {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound",
                                           "message": "backend Service demo/gone does not exist"}]}]}]},
            "upstreams": {"clusters": [
                {"service": "demo/reviews", "subset": "v1", "port": 9080,
                 "load_balancer": "LeastRequest", "error": null,
                 "overflow": {"connections": 0, "pending": 2, "requests": 0, "retries": 0},
                 "endpoints": [
                    {"address": "10.0.1.2:9080", "workload": "demo/reviews-v1", "ejected": false,
                     "consecutive_5xx": 0, "outstanding_requests": 1,
                     "http1": {"open": 2}, "http2": {"open": 0}},
                    {"address": "10.0.1.3:9080", "workload": "demo/reviews-v1b", "ejected": true,
                     "ejection_left_ms": 29500, "consecutive_5xx": 0, "outstanding_requests": 0,
                     "http1": {"open": 0}, "http2": {"open": 0}}]},
                {"service": "demo/reviews", "subset": "v9", "port": 9080,
                 "load_balancer": "LeastRequest", "error": "no subset v9 in DestinationRule demo/reviews",
                 "overflow": {}, "endpoints": []}]},
            "certificates": [{"identity": "spiffe://cluster.local/ns/demo/sa/waypoint",
                              "state": "available", "serial": "ab", "not_after": "2026-11-26"}],
        })
    }

    #[test]
    fn tables_show_routes_health_and_overflows() {
        let text = render(&dump(), Section::All, Output::Table).unwrap();
        assert!(
            text.contains(
                "demo/reviews  reviews.demo.svc.cluster.local  VirtualService demo/reviews  2 http, 0 tcp"
            ),
            "{text}"
        );
        let healthy = text.lines().find(|l| l.contains("10.0.1.2:9080")).unwrap();
        assert!(
            healthy.contains("demo/reviews:9080 (v1)") && healthy.contains(" ok "),
            "{healthy}"
        );
        assert!(
            healthy.trim_end().ends_with('2'),
            "two overflows: {healthy}"
        );
        let ejected = text.lines().find(|l| l.contains("10.0.1.3:9080")).unwrap();
        assert!(ejected.contains("ejected (30s left)"), "{ejected}");
        assert!(text.contains("error: no subset v9"), "{text}");
        let status = text
            .lines()
            .find(|l| l.starts_with("HTTPRoute demo/reviews"))
            .unwrap();
        let cells: Vec<&str> = status
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            cells,
            [
                "HTTPRoute demo/reviews",
                "Service demo/reviews",
                "True",
                "BackendNotFound: backend Service demo/gone does not exist"
            ],
            "{status}"
        );
        let json = render(&dump(), Section::Upstreams, Output::Json).unwrap();
        assert!(json.starts_with("{\n  \"clusters\""), "{json}");
    }
}
