//! Turns a finished request ([`crate::proxy::Finish`]) into its metrics and its access-log line.

use std::sync::atomic::Ordering;

use crate::metrics::{RequestProtocol, RequestRecord, log_access, peer_labels, service_labels};
use crate::proxy::Finish;

/// Records one finished request: `istio_requests_total` and friends, then the access log.
/// Marks `finish` recorded, so it is recorded once.
pub fn record(
    finish: &mut Finish,
    status: u16,
    flag: &'static str,
    response_bytes: u64,
    grpc_status: Option<u32>,
) {
    let downstream = finish.downstream();
    let service = finish
        .destination_service
        .clone()
        .unwrap_or_else(|| downstream.service.clone());
    let mut flags = flag.to_owned();
    if finish.retry_overflow {
        flags = if flags == "-" {
            "URX".into()
        } else {
            format!("{flags},URX")
        };
    }
    let cluster = finish.ctx().config.cluster_id.clone();
    let record = RequestRecord {
        source: peer_labels(
            downstream.source.workload.as_deref(),
            downstream.source.identity.as_ref(),
            &cluster,
        ),
        destination: peer_labels(
            finish.destination_workload.as_deref(),
            finish.destination_workload.as_ref().map(|w| &w.identity),
            &cluster,
        ),
        service: service_labels(Some(&service)),
        protocol: if finish.grpc {
            RequestProtocol::Grpc
        } else {
            RequestProtocol::Http
        },
        response_code: status,
        grpc_status,
        response_flags: if flags == "-" { String::new() } else { flags },
        mutual_tls: true,
        duration: finish.elapsed(),
        request_bytes: finish
            .request_bytes
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed)),
        response_bytes,
        method: finish.method.parse().unwrap_or_default(),
        authority: finish.authority.clone(),
        path: finish.path.clone(),
        route: Some(finish.route.clone()),
        subset: finish.subset.clone(),
        endpoint: finish.endpoint,
        attempts: finish.attempts,
        local_reply: finish.local_reply,
        failure_reason: (!finish.reason.is_empty()).then(|| finish.reason.clone()),
    };
    finish.recorded = true;
    finish.ctx().metrics.record(&record);
    log_access(&record);
}
