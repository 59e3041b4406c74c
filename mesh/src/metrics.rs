//! Istio's standard TCP metrics, with Istio's names and labels so existing dashboards work, and
//! the guard that records one connection's metrics and access-log line when it ends.
//!
//! A [`ConnectionGuard`] is created when a proxied connection starts and records on drop, so an
//! early return or an error cannot forget to count the close, the bytes or the log line.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::copy::ByteCounts;
use crate::identity::Identity;

/// Who is reporting: the client side's proxy or the server side's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
    Waypoint,
}

impl Reporter {
    /// The `reporter` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }
}

/// One side of a connection, as the metrics label it: its workload when known (shared with the
/// state it came from: an open connection holds a reference, not copies of its names, which
/// were a few hundred bytes of every idle tunnel) and the identity it proved or must prove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    workload: Option<Arc<crate::model::Workload>>,
    pub principal: Option<Identity>,
}

impl Peer {
    /// How the metrics label a side: from its workload when known, else from its identity.
    pub fn of(workload: Option<&Arc<crate::model::Workload>>, identity: Option<&Identity>) -> Peer {
        Peer {
            principal: identity
                .cloned()
                .or_else(|| workload.map(|w| w.identity.clone())),
            workload: workload.cloned(),
        }
    }

    /// The workload's name; empty when unknown.
    pub fn workload_name(&self) -> &str {
        self.workload.as_ref().map_or("", |w| &w.workload_name)
    }

    /// The workload's namespace, else the identity's; empty when neither is known.
    pub fn namespace(&self) -> &str {
        match (&self.workload, &self.principal) {
            (Some(w), _) => &w.namespace,
            (None, Some(identity)) => identity.namespace(),
            (None, None) => "",
        }
    }

    fn app(&self) -> &str {
        self.workload.as_ref().map_or("", |w| &w.canonical_service)
    }

    fn version(&self) -> &str {
        self.workload.as_ref().map_or("", |w| &w.canonical_revision)
    }
}

/// Istio's standard label set for TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_owned()
    } else {
        s.to_owned()
    }
}

/// What is known about a connection when it starts.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    /// The service the client dialled, when it dialled one.
    pub service: Option<Arc<crate::model::Service>>,
    pub mutual_tls: bool,
    /// Client and server addresses, for the access log.
    pub source_addr: std::net::SocketAddr,
    pub destination_addr: std::net::SocketAddr,
}

impl ConnectionInfo {
    fn labels(&self, response_flags: &'static str, local_cluster: &str) -> TcpLabels {
        // The state holds only this cluster's workloads: a known one is in the proxy's own.
        let cluster = |p: &Peer| {
            if p.workload.is_some() {
                or_unknown(local_cluster)
            } else {
                UNKNOWN.to_owned()
            }
        };
        let principal = |p: &Option<Identity>| {
            p.as_ref()
                .map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.to_owned())
        };
        let (svc, svc_name, svc_ns) = match &self.service {
            Some(s) => (s.hostname.clone(), s.name.clone(), s.namespace.clone()),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        TcpLabels {
            reporter: self.reporter.as_str(),
            source_workload: or_unknown(self.source.workload_name()),
            source_workload_namespace: or_unknown(self.source.namespace()),
            source_principal: principal(&self.source.principal),
            source_app: or_unknown(self.source.app()),
            source_version: or_unknown(self.source.version()),
            source_canonical_service: or_unknown(self.source.app()),
            source_canonical_revision: or_unknown(self.source.version()),
            source_cluster: cluster(&self.source),
            destination_workload: or_unknown(self.destination.workload_name()),
            destination_workload_namespace: or_unknown(self.destination.namespace()),
            destination_principal: principal(&self.destination.principal),
            destination_app: or_unknown(self.destination.app()),
            destination_version: or_unknown(self.destination.version()),
            destination_service: svc,
            destination_service_name: svc_name,
            destination_service_namespace: svc_ns,
            destination_canonical_service: or_unknown(self.destination.app()),
            destination_canonical_revision: or_unknown(self.destination.version()),
            destination_cluster: cluster(&self.destination),
            request_protocol: "tcp",
            response_flags,
            connection_security_policy: if self.mutual_tls {
                "mutual_tls"
            } else {
                "none"
            },
        }
    }
}

/// `istio_tcp_*` counters.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    /// The cluster of the workloads this proxy knows (`CLUSTER_ID`).
    cluster: Arc<str>,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    /// Counters of a proxy in cluster `cluster_id`: the `source_cluster`/`destination_cluster`
    /// of a peer whose workload it knows, as Istio labels workloads with their cluster.
    pub fn new(registry: &mut Registry, cluster_id: &str) -> Self {
        let m = Self {
            cluster: cluster_id.into(),
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "Connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "Connections that failed (denied, upstream unreachable, reset), by response_flags",
            m.failed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (server to client direction)",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (client to server direction)",
            m.received.clone(),
        );
        m
    }
}

/// Records one connection: `opened` now; `closed` (or `failed`), bytes and one access-log line
/// when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: TcpMetrics,
    /// Boxed: a guard lives inside every connection's task, often in more than one of its
    /// states, so it is kept small there. The labels are built again at close rather than kept
    /// for the connection's life (two dozen strings per idle connection).
    info: Box<ConnectionInfo>,
    /// Client-to-server is `a_to_b`, server-to-client `b_to_a`.
    pub bytes: Arc<ByteCounts>,
    started: Instant,
    failure: Option<(&'static str, String)>,
}

impl ConnectionGuard {
    pub fn new(metrics: &TcpMetrics, info: ConnectionInfo) -> Self {
        let labels = info.labels("-", &metrics.cluster);
        metrics.opened.get_or_create(&labels).inc();
        Self {
            metrics: metrics.clone(),
            info: Box::new(info),
            bytes: Arc::new(ByteCounts::default()),
            started: Instant::now(),
            failure: None,
        }
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Marks the connection failed with an Envoy-style response flag (`UF` upstream failure,
    /// `UAEX`/`RBAC` denied, `UR` reset, ...) and the reason for the access log.
    pub fn fail(&mut self, response_flag: &'static str, reason: impl Into<String>) {
        self.failure = Some((response_flag, reason.into()));
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let flag = self.failure.as_ref().map_or("-", |(f, _)| *f);
        let labels = &self.info.labels(flag, &self.metrics.cluster);
        let received = self.bytes.a_to_b();
        let sent = self.bytes.b_to_a();
        self.metrics.closed.get_or_create(labels).inc();
        if self.failure.is_some() {
            self.metrics.failed.get_or_create(labels).inc();
        }
        self.metrics.received.get_or_create(labels).inc_by(received);
        self.metrics.sent.get_or_create(labels).inc_by(sent);
        let info = &self.info;
        let ident = |p: &Peer| p.principal.as_ref().map(|i| i.to_string());
        tracing::info!(
            target: "access",
            reporter = info.reporter.as_str(),
            src.addr = %info.source_addr,
            src.workload = info.source.workload_name(),
            src.identity = ident(&info.source).as_deref().unwrap_or("-"),
            dst.addr = %info.destination_addr,
            dst.service = info.service.as_ref().map_or("-", |s| s.hostname.as_str()),
            dst.workload = info.destination.workload_name(),
            dst.identity = ident(&info.destination).as_deref().unwrap_or("-"),
            mtls = info.mutual_tls,
            bytes_sent = sent,
            bytes_recv = received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            flags = flag,
            error = self.failure.as_ref().map_or("-", |(_, r)| r.as_str()),
            "connection complete"
        );
    }
}
