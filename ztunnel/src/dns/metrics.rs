//! The DNS proxy's metrics, with the names and labels of Istio's ztunnel, so its dashboards
//! work: `istio_dns_requests_total`, `istio_dns_upstream_requests_total`,
//! `istio_dns_upstream_failures_total` and `istio_dns_upstream_request_duration_seconds`, each
//! by `request_query_type` (`a`, `aaaa`, ...), `request_protocol` (`udp`, `tcp`) and the
//! source pod's canonical service and revision.
//!
//! One difference: Istio counts a forwarded query as an upstream request even when its
//! resolver's cache answers it; here upstream requests are the queries that left for the
//! upstream, so `requests - upstream requests` is what the proxy answered itself (mesh names
//! and cache hits).
//!
//! Beyond Istio's: `mesh_dns_dropped_total{reason}`, the messages the proxy did not handle as
//! queries ([`DropReason`]): dropped without a reply, or answered with an error at once.

use std::time::Duration;

use mesh::model::Workload;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Istio's buckets (it lists 0.005 before 0.001; sorted here, as Prometheus requires).
const DURATION_BUCKETS: [f64; 6] = [0.001, 0.005, 0.01, 0.1, 1.0, 5.0];

/// The labels of every DNS metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    /// The record type asked for, lower case (`a`, `aaaa`, `srv`, ...).
    pub request_query_type: String,
    /// `udp` or `tcp`.
    pub request_protocol: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

impl DnsLabels {
    pub fn new(query_type: &str, protocol: &str, source: Option<&Workload>) -> Self {
        let unknown = || "unknown".to_owned();
        Self {
            request_query_type: query_type.to_ascii_lowercase(),
            request_protocol: protocol.to_owned(),
            source_canonical_service: source.map_or_else(unknown, |w| w.canonical_service.clone()),
            source_canonical_revision: source
                .map_or_else(unknown, |w| w.canonical_revision.clone()),
        }
    }
}

/// Why a message was not handled as a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not even a query header (too short), or a response sent to the proxy: dropped, no
    /// reply.
    Malformed,
    /// A readable header but an unparseable body, or not exactly one question: answered
    /// FORMERR.
    FormErr,
    /// The pod already had the maximum of queries in flight: answered SERVFAIL at once (or
    /// dropped when not even parseable).
    Overload,
    /// A TCP connection closed or idled before the message its length prefix announced.
    TruncatedTcp,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::FormErr => "formerr",
            Self::Overload => "overload",
            Self::TruncatedTcp => "truncated_tcp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

type DurationFamily = Family<DnsLabels, Histogram, fn() -> Histogram>;

/// `istio_dns_*`.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    requests: Family<DnsLabels, Counter>,
    upstream_requests: Family<DnsLabels, Counter>,
    upstream_failures: Family<DnsLabels, Counter>,
    upstream_duration: DurationFamily,
    dropped: Family<DropLabels, Counter>,
}

impl DnsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            dropped: Family::default(),
        };
        registry.register(
            "istio_dns_requests",
            "DNS queries received from pods",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "DNS queries forwarded to the upstream resolver",
            metrics.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Forwarded DNS queries that got no usable answer (the client got SERVFAIL)",
            metrics.upstream_failures.clone(),
        );
        registry.register_with_unit(
            "istio_dns_upstream_request_duration",
            "Time to get an answer from the upstream resolver",
            Unit::Seconds,
            metrics.upstream_duration.clone(),
        );
        registry.register(
            "mesh_dns_dropped",
            "DNS messages from pods not handled as queries, by reason: malformed (dropped), \
             formerr (answered FORMERR), overload (too many in flight: SERVFAIL), truncated_tcp \
             (a TCP message shorter than its length prefix)",
            metrics.dropped.clone(),
        );
        metrics
    }

    pub fn request(&self, labels: &DnsLabels) {
        self.requests.get_or_create(labels).inc();
    }

    /// One query sent upstream, its duration and whether it failed.
    pub fn upstream(&self, labels: &DnsLabels, duration: Duration, failed: bool) {
        self.upstream_requests.get_or_create(labels).inc();
        self.upstream_duration
            .get_or_create(labels)
            .observe(duration.as_secs_f64());
        if failed {
            self.upstream_failures.get_or_create(labels).inc();
        }
    }

    /// One message not handled as a query.
    pub fn dropped(&self, reason: DropReason) {
        self.dropped
            .get_or_create(&DropLabels {
                reason: reason.as_str(),
            })
            .inc();
    }
}
