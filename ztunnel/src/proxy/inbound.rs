//! Inbound: HBONE tunnels arriving at a local pod (15008) and plaintext connections captured on
//! their way in (15006). Each is authorized, then connected to the pod's port from inside its
//! network; the HBONE answer is 200 only once that worked, 401 when policy denies, 503 when
//! nothing listens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use mesh::copy::Side;
use mesh::hbone::InboundTunnel;
use mesh::metrics::{ConnectionGuard, ConnectionInfo, Reporter};
use mesh::model::{MtlsMode, State, Workload};
use tokio::net::TcpStream;

use super::Context;
use super::live::Registration;
use crate::authz::{Connection, Decision, authorize, effective_mtls_mode};
use crate::pods::LocalPod;

/// How long the inbound waits for the pod's port to accept.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection let in: what the copy needs for the connection's life, and nothing else (the
/// config snapshot it was judged by is not kept).
struct Admitted<T> {
    /// The tunnel (HBONE), or nothing (plaintext: the client socket is the caller's).
    tunnel: T,
    upstream: TcpStream,
    guard: ConnectionGuard,
    registration: Registration,
}

/// Handles one HBONE `CONNECT` to `pod`.
pub async fn hbone(ctx: Arc<Context>, pod: Arc<LocalPod>, tunnel: InboundTunnel) {
    // Admission is boxed, so its state (policy evaluation, the connect to the pod) is freed
    // once the tunnel is up instead of sizing the task for as long as the tunnel lives.
    let Some(mut admitted) = Box::pin(admit_hbone(&ctx, &pod, tunnel)).await else {
        return;
    };
    let bytes = admitted.guard.bytes.clone();
    if !super::copy_until_cancelled(
        std::pin::pin!(mesh::hbone::stream::copy_tcp_and_tunnel(
            &mut admitted.upstream,
            admitted.tunnel,
            &bytes,
            Side::B,
        )),
        &mut admitted.guard,
        &admitted.registration.cancelled,
    )
    .await
    {
        mesh::copy::reset(&admitted.upstream);
    }
}

async fn admit_hbone(
    ctx: &Context,
    pod: &LocalPod,
    tunnel: InboundTunnel,
) -> Option<Admitted<mesh::hbone::H2Stream>> {
    let state = ctx.store.snapshot();
    let authority = tunnel.authority.0;
    let Some(destination) = local_destination(&state, pod, authority) else {
        tracing::info!(
            %authority,
            pod = %pod.workload.uid,
            peer = %tunnel.peer_identity,
            "HBONE authority is not this pod: 400"
        );
        tunnel.reject(StatusCode::BAD_REQUEST);
        return None;
    };
    if ctx.own_ports.inbound_target_is_ztunnel(authority) {
        let source = format!("{} ({})", tunnel.peer_addr, tunnel.peer_identity);
        ctx.self_calls
            .refuse("inbound", &source, authority, &pod.workload.uid);
        tunnel.reject(StatusCode::BAD_REQUEST);
        return None;
    }
    // `forwarded` names the original client only when a waypoint of this pod relays it; from
    // anyone else the client is the tunnel's peer (its ztunnel dials from the client pod's IP).
    let client_addr =
        tunnel.client_address(|| state.is_waypoint_for(&tunnel.peer_identity, &destination));
    let source_ip = client_addr.ip();
    let peer_identity = tunnel.peer_identity.clone();
    let source_workload = state
        .workload_by_ip(source_ip)
        .filter(|w| w.identity == tunnel.peer_identity)
        .cloned();
    let mut guard = ConnectionGuard::new(
        &ctx.metrics,
        ConnectionInfo {
            reporter: Reporter::Destination,
            source: super::peer_of(source_workload.as_ref(), Some(&tunnel.peer_identity)),
            destination: super::peer_of(Some(&destination), Some(&destination.identity)),
            service: None,
            mutual_tls: true,
            source_addr: client_addr,
            destination_addr: authority,
        },
    );
    let decision = authorize(
        &state,
        &Connection {
            source_identity: Some(&tunnel.peer_identity),
            source_ip,
            destination: &destination,
            destination_addr: authority,
        },
    );
    if let Decision::Deny { reason, .. } = decision {
        guard.fail("RBAC", reason);
        tunnel.reject(StatusCode::UNAUTHORIZED);
        return None;
    }
    let upstream = match connect(pod, authority).await {
        Ok(s) => s,
        Err(e) => {
            guard.fail("UF", format!("connect to {authority}: {e}"));
            tunnel.reject(StatusCode::SERVICE_UNAVAILABLE);
            return None;
        }
    };
    let stream = match tunnel.accept_with_headers(super::accept_headers(ctx, &destination)) {
        Ok(s) => s,
        Err(e) => {
            guard.fail("DC", format!("client went away before 200: {e}"));
            return None;
        }
    };
    let registration = ctx.live.register(
        Some(peer_identity),
        source_ip,
        destination.uid.clone(),
        authority,
        guard.bytes.clone(),
    );
    Some(Admitted {
        tunnel: stream,
        upstream,
        guard,
        registration,
    })
}

/// Handles one plaintext connection captured on its way into `pod` (port 15006).
pub async fn plaintext(
    ctx: Arc<Context>,
    pod: Arc<LocalPod>,
    mut client: TcpStream,
    client_addr: SocketAddr,
    original_destination: SocketAddr,
) {
    let admit = admit_plaintext(&ctx, &pod, client_addr, original_destination);
    let Some(mut admitted) = Box::pin(admit).await else {
        return;
    };
    let bytes = admitted.guard.bytes.clone();
    if !super::copy_until_cancelled(
        std::pin::pin!(mesh::copy::copy_tcp(
            &mut client,
            &mut admitted.upstream,
            &bytes
        )),
        &mut admitted.guard,
        &admitted.registration.cancelled,
    )
    .await
    {
        mesh::copy::reset(&client);
        mesh::copy::reset(&admitted.upstream);
    }
}

async fn admit_plaintext(
    ctx: &Context,
    pod: &LocalPod,
    client_addr: SocketAddr,
    original_destination: SocketAddr,
) -> Option<Admitted<()>> {
    let state = ctx.store.snapshot();
    let Some(destination) = local_destination(&state, pod, original_destination) else {
        tracing::info!(%original_destination, pod = %pod.workload.uid, "plaintext inbound for another address: closed");
        return None;
    };
    if ctx
        .own_ports
        .inbound_target_is_ztunnel(original_destination)
    {
        ctx.self_calls.refuse(
            "inbound",
            &client_addr.to_string(),
            original_destination,
            &pod.workload.uid,
        );
        return None;
    }
    let source_workload = state.workload_by_ip(client_addr.ip()).cloned();
    let mut guard = ConnectionGuard::new(
        &ctx.metrics,
        ConnectionInfo {
            reporter: Reporter::Destination,
            source: super::peer_of(source_workload.as_ref(), None),
            destination: super::peer_of(Some(&destination), Some(&destination.identity)),
            service: None,
            mutual_tls: false,
            source_addr: client_addr,
            destination_addr: original_destination,
        },
    );
    if effective_mtls_mode(&state, &destination, original_destination.port()) == MtlsMode::Strict {
        guard.fail(
            "RBAC",
            "plaintext refused: PeerAuthentication STRICT covers this pod",
        );
        return None;
    }
    if let Decision::Deny { reason, .. } = authorize(
        &state,
        &Connection {
            source_identity: None,
            source_ip: client_addr.ip(),
            destination: &destination,
            destination_addr: original_destination,
        },
    ) {
        guard.fail("RBAC", reason);
        return None;
    }
    let upstream = match connect(pod, original_destination).await {
        Ok(s) => s,
        Err(e) => {
            guard.fail("UF", format!("connect to {original_destination}: {e}"));
            return None;
        }
    };
    let registration = ctx.live.register(
        None,
        client_addr.ip(),
        destination.uid.clone(),
        original_destination,
        guard.bytes.clone(),
    );
    Some(Admitted {
        tunnel: (),
        upstream,
        guard,
        registration,
    })
}

/// The current workload behind `pod`, if `addr` is one of its IPs.
fn local_destination(state: &State, pod: &LocalPod, addr: SocketAddr) -> Option<Arc<Workload>> {
    if !pod.workload.ips.contains(&addr.ip()) {
        return None;
    }
    Some(
        state
            .workloads
            .get(&pod.workload.uid)
            .cloned()
            .unwrap_or_else(|| pod.workload.clone()),
    )
}

async fn connect(pod: &LocalPod, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, pod.network.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
