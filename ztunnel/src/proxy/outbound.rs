//! Outbound: a connection a local pod opened (captured on 15001, or through SOCKS5) is planned
//! ([`super::plan`]) and then established: an HBONE tunnel to the destination's node, or plain
//! TCP for destinations outside the mesh. Establishing and copying are separate so SOCKS5 can
//! answer its client in between.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh::copy::Side;
use mesh::hbone::{Baggage, ConnectRequest, H2Stream, HboneAuthority, forwarded_header, headers};
use mesh::metrics::{ConnectionGuard, ConnectionInfo, Reporter};
use tokio::net::TcpStream;

use super::Context;
use super::live::Registration;
use super::plan::{OutboundPlan, plan_outbound};
use crate::pods::LocalPod;

const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The far side of an established outbound connection.
#[derive(Debug)]
pub enum Upstream {
    Tunnel(H2Stream),
    Tcp(TcpStream),
}

/// Why an outbound connection could not be established; the guard has the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Nothing serves the destination (no endpoint, connection refused, 503).
    Unreachable,
    /// A policy at the destination denied it (401).
    Denied,
}

/// An outbound connection ready to carry bytes.
#[derive(Debug)]
pub struct Established {
    pub upstream: Upstream,
    pub guard: ConnectionGuard,
    pub registration: Registration,
}

/// Plans and establishes the connection `client_addr` (in `pod`) opened to
/// `original_destination`.
pub async fn establish(
    ctx: &Arc<Context>,
    pod: &Arc<LocalPod>,
    client_addr: SocketAddr,
    original_destination: SocketAddr,
) -> Result<Established, Refusal> {
    if ctx
        .own_ports
        .outbound_target_is_ztunnel(original_destination, |ip| ctx.pod_by_ip(ip).is_some())
    {
        ctx.self_calls.refuse(
            "outbound",
            &client_addr.to_string(),
            original_destination,
            &pod.workload.uid,
        );
        return Err(Refusal::Denied);
    }
    let state = ctx.store.snapshot();
    let source = state
        .workloads
        .get(&pod.workload.uid)
        .cloned()
        .unwrap_or_else(|| pod.workload.clone());
    let plan = plan_outbound(&state, original_destination, |n| fastrand::usize(..n));
    let source_peer = super::peer_of(Some(&source), Some(&source.identity));
    // Outbound connections are registered (for drain and the operator view) once established;
    // they carry no destination workload, so policy re-checks skip them.
    let register = |guard: &ConnectionGuard| {
        ctx.live.register(
            None,
            client_addr.ip(),
            String::new(),
            original_destination,
            guard.bytes.clone(),
        )
    };
    match plan {
        OutboundPlan::Hbone {
            hbone_addr,
            authority,
            identity,
            workload,
            service: svc,
            waypoint,
        } => {
            if let Some(waypoint) = &waypoint {
                tracing::debug!(%waypoint, %authority, "through the waypoint");
            }
            let mut guard = ConnectionGuard::new(
                &ctx.metrics,
                ConnectionInfo {
                    reporter: Reporter::Source,
                    source: source_peer,
                    destination: super::peer_of(Some(&workload), Some(&identity)),
                    service: svc.clone(),
                    mutual_tls: true,
                    source_addr: client_addr,
                    destination_addr: authority,
                },
            );
            let mut request_headers = http::HeaderMap::new();
            let host = svc.as_ref().map(|s| s.hostname.as_str());
            if let Ok(v) = forwarded_header(client_addr, host).parse() {
                request_headers.insert(headers::FORWARDED, v);
            }
            let baggage = Baggage {
                cluster: Some(ctx.cluster_id.clone()),
                namespace: Some(source.namespace.clone()),
                workload: Some((source.workload_kind.clone(), source.workload_name.clone())),
                service: Some(source.canonical_service.clone()),
                version: Some(source.canonical_revision.clone()),
            };
            if let Ok(v) = baggage.to_header().parse() {
                request_headers.insert(headers::BAGGAGE, v);
            }
            let request = ConnectRequest {
                source: source.identity.clone(),
                destination: identity,
                hbone_addr,
                authority: HboneAuthority(authority),
                headers: request_headers,
            };
            match pod.hbone.connect(request).await {
                Ok(tunnel) => Ok(Established {
                    upstream: Upstream::Tunnel(tunnel),
                    registration: register(&guard),
                    guard,
                }),
                Err(e) => {
                    let refusal = if e.status() == Some(http::StatusCode::UNAUTHORIZED) {
                        guard.fail("RBAC", format!("destination denied: {e}"));
                        Refusal::Denied
                    } else if e.is_certificate() {
                        // Nothing was dialed: this side has no certificate (the CA is down,
                        // refusing or not answering). Said so, so it is not taken for the
                        // destination's fault.
                        guard.fail("UF", format!("source certificate unavailable: {e}"));
                        Refusal::Unreachable
                    } else {
                        guard.fail("UF", e.to_string());
                        Refusal::Unreachable
                    };
                    Err(refusal)
                }
            }
        }
        OutboundPlan::Passthrough {
            addr,
            service: svc,
            reason,
        } => {
            let destination = state.workload_by_ip(addr.ip()).cloned();
            let mut guard = ConnectionGuard::new(
                &ctx.metrics,
                ConnectionInfo {
                    reporter: Reporter::Source,
                    source: source_peer,
                    destination: super::peer_of(destination.as_ref(), None),
                    service: svc,
                    mutual_tls: false,
                    source_addr: client_addr,
                    destination_addr: addr,
                },
            );
            tracing::debug!(%addr, reason, "passthrough");
            match tokio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, pod.network.connect(addr)).await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    Ok(Established {
                        upstream: Upstream::Tcp(stream),
                        registration: register(&guard),
                        guard,
                    })
                }
                Ok(Err(e)) => {
                    guard.fail("UF", format!("connect to {addr}: {e}"));
                    Err(Refusal::Unreachable)
                }
                Err(_) => {
                    guard.fail("UF", format!("connect to {addr} timed out"));
                    Err(Refusal::Unreachable)
                }
            }
        }
        OutboundPlan::Unreachable { reason } => {
            let mut guard = ConnectionGuard::new(
                &ctx.metrics,
                ConnectionInfo {
                    reporter: Reporter::Source,
                    source: source_peer,
                    destination: Default::default(),
                    service: None,
                    mutual_tls: false,
                    source_addr: client_addr,
                    destination_addr: original_destination,
                },
            );
            guard.fail("NR", reason);
            Err(Refusal::Unreachable)
        }
    }
}

/// Copies between the client and an established upstream until both sides end. A failure on
/// either side resets the client's connection (and a plain upstream's), never a clean FIN.
pub async fn run(mut client: TcpStream, mut established: Established) {
    let cancelled = established.registration.cancelled.clone();
    let bytes = established.guard.bytes.clone();
    match established.upstream {
        Upstream::Tunnel(t) => {
            if !super::copy_until_cancelled(
                std::pin::pin!(mesh::hbone::stream::copy_tcp_and_tunnel(
                    &mut client,
                    t,
                    &bytes,
                    Side::A
                )),
                &mut established.guard,
                &cancelled,
            )
            .await
            {
                mesh::copy::reset(&client);
            }
        }
        Upstream::Tcp(mut s) => {
            if !super::copy_until_cancelled(
                std::pin::pin!(mesh::copy::copy_tcp(&mut client, &mut s, &bytes)),
                &mut established.guard,
                &cancelled,
            )
            .await
            {
                mesh::copy::reset(&client);
                mesh::copy::reset(&s);
            }
        }
    }
}

/// A connection captured on 15001.
pub async fn captured(
    ctx: Arc<Context>,
    pod: Arc<LocalPod>,
    client: TcpStream,
    client_addr: SocketAddr,
    original_destination: SocketAddr,
) {
    // Establishing is boxed: its state (planning, and the TLS and HTTP/2 handshakes when the
    // tunnel needs a new pooled connection) is freed once the upstream is up, instead of
    // sizing this task for as long as the connection lives.
    // (`established` is scoped to the block so it does not keep a slot beside `running`.)
    let running = {
        let establishing = Box::pin(establish(&ctx, &pod, client_addr, original_destination));
        let Ok(established) = establishing.await else {
            return;
        };
        run(client, established)
    };
    running.await;
}
