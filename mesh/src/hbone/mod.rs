//! HBONE: TCP tunnelled in HTTP/2 `CONNECT` streams over mutual TLS 1.3, wire-compatible with
//! Istio's ztunnel.
//!
//! [`server`] terminates tunnels and hands each request (peer identity, authority, headers) to
//! the caller, which decides the status. [`client`] opens tunnels over pooled, multiplexed
//! connections. [`stream::H2Stream`] is one tunnel as a byte stream. The HTTP/2 settings both
//! sides use are in [`H2Settings`]; the numbers are backed by `benches/hbone.rs`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderMap;

mod batch_read;
pub mod budget;
pub mod client;
pub mod server;
pub mod stream;

pub use client::{
    ClientConfig, ConnectRequest, DirectConnector, HboneClient, HboneError, TcpConnector,
};
pub use server::{HboneServer, InboundTunnel, ServerConfig, TlsSummary};
pub use stream::H2Stream;

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 flow-control and framing settings.
///
/// Chosen by measurement (`cargo bench -p mesh-tests --bench hbone`: one tunnel on loopback, 2
/// cores, median of 3 runs of 512 MiB). HTTP/2's default 64 KiB stream window held a tunnel to
/// 3.8 Gbit/s against 8.7-9.1 Gbit/s for windows of 256 KiB to 4 MiB, and a 16 MiB window fell
/// back to 7.4 Gbit/s (more data in flight than the caches hold). Loopback has almost no round
/// trip, so it cannot tell 256 KiB from 4 MiB; between nodes the window must cover the
/// bandwidth-delay product (10 Gbit/s x 3 ms = 3.75 MB), hence 4 MiB per stream, as Istio's
/// ztunnel uses, and 16 MiB per connection for several busy tunnels. Frames of 256 KiB moved
/// 8.8 Gbit/s against 6.6 for 16 KiB and 8.6 for 1 MiB: fewer frames and writes per byte, while
/// a bulk tunnel delays others sharing its connection by at most one 256 KiB frame.
///
/// What a tunnel may hold is bounded apart from the windows, because a peer can grant any
/// window and then stop reading: `stream_send_buffer` is what HTTP/2 queues per stream for the
/// socket (one frame; it used to be the 4 MiB window, and a stalled reader cost that per stream),
/// and [`budget`] caps the queue of a whole connection and of the process. What we *receive* is
/// bounded by the windows we grant: at most `stream_window` per stream and `connection_window`
/// per connection wait for an application that does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Largest header block accepted; bigger requests are refused.
    pub max_header_list_size: u32,
    /// Data HTTP/2 may queue per stream before the stream waits for the socket.
    pub stream_send_buffer: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            max_header_list_size: 16 * 1024,
            stream_send_buffer: 256 * 1024,
        }
    }
}

/// Encrypted bytes rustls may hold for the socket before it refuses more plaintext (its default
/// is 64 KiB). HTTP/2 hands over DATA frames of up to [`H2Settings::max_frame_size`] (256 KiB);
/// with the default limit each frame took four `writev`s, each waking the receiving node's
/// ztunnel. 512 KiB takes a whole frame in one.
pub(crate) const TLS_WRITE_BUFFER: usize = 512 * 1024;

/// Handshake deadline for TLS and the HTTP/2 preface, on both sides: a peer that stalls is cut off
/// and does not hold a task forever.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new HBONE connection, on either side, waits for this side's certificate before
/// it fails: the first fetch of an identity waits on the CA, whose requests have their own
/// deadline (`CA_REQUEST_TIMEOUT_MS`, 10 s); later ones answer at once from the cache.
pub const DEFAULT_CERTIFICATE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `:authority` of an HBONE `CONNECT`: where the tunnel's bytes should go.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HboneAuthority(pub SocketAddr);

impl fmt::Display for HboneAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Header names HBONE uses.
pub mod headers {
    pub const FORWARDED: &str = "forwarded";
    pub const BAGGAGE: &str = "baggage";
    pub const TRACEPARENT: &str = "traceparent";
}

/// Builds `forwarded: for="<ip:port>"[;host=<hostname>]` (RFC 7239; IPv6 in brackets).
pub fn forwarded_header(client: SocketAddr, host: Option<&str>) -> String {
    match host {
        Some(h) => format!("for=\"{client}\";host={h}"),
        None => format!("for=\"{client}\""),
    }
}

/// Reads the client address a proxy recorded in a `forwarded` header: the `for=` of the last
/// element (RFC 7239 s. 4: each proxy appends one, so the last is written by the peer itself,
/// and earlier ones come from whoever connected to it; Istio's ztunnel reads the last too), as
/// `ip:port`, `"[v6]:port"` or a bare IP (port 0). `None` when absent or malformed.
pub fn forwarded_for(headers: &HeaderMap) -> Option<SocketAddr> {
    let value = headers.get(headers::FORWARDED)?.to_str().ok()?;
    let last = value.rsplit(',').next()?;
    last.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        v.parse::<SocketAddr>().ok().or_else(|| {
            v.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 0))
        })
    })
}

/// Who the original client of a tunnel is, for policy, metrics and logs.
///
/// The `forwarded` header is the peer's claim, and only a proxy of this mesh that relays other
/// clients' connections (a waypoint, an ingress gateway: `peer_relays`, asked only when the claim
/// names another address, decided by the caller from the peer's verified identity) is entitled
/// to make it. From anyone else the client is the
/// connection's own peer address: a workload with a valid certificate could otherwise claim any
/// address and slip past `ipBlocks` rules. A non-relay's header is still used for its port when
/// it names the peer's own IP (a ztunnel names the application's socket, which is more useful in
/// a log than the tunnel's).
pub fn client_address(
    peer: SocketAddr,
    headers: &HeaderMap,
    peer_relays: impl FnOnce() -> bool,
) -> SocketAddr {
    match forwarded_for(headers) {
        Some(claimed) if claimed.ip() == peer.ip() => {
            if claimed.port() != 0 {
                claimed
            } else {
                peer
            }
        }
        Some(claimed) if peer_relays() => claimed,
        _ => peer,
    }
}

/// The peer's workload metadata carried in `baggage`, as Istio's ztunnel sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// (workload kind, e.g. "deployment", workload name)
    pub workload: Option<(String, String)>,
    pub service: Option<String>,
    pub version: Option<String>,
}

impl Baggage {
    /// What Istio's proxies say of `workload` (in cluster `cluster`): on an outbound CONNECT
    /// the source's, on the 200 the destination's.
    pub fn of_workload(workload: &crate::model::Workload, cluster: &str) -> Self {
        Baggage {
            cluster: Some(cluster.to_owned()),
            namespace: Some(workload.namespace.clone()),
            workload: Some((
                workload.workload_kind.clone(),
                workload.workload_name.clone(),
            )),
            service: Some(workload.canonical_service.clone()),
            version: Some(workload.canonical_revision.clone()),
        }
    }

    pub fn to_header(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.cluster {
            parts.push(format!("k8s.cluster.name={c}"));
        }
        if let Some(n) = &self.namespace {
            parts.push(format!("k8s.namespace.name={n}"));
        }
        if let Some((kind, name)) = &self.workload {
            parts.push(format!("k8s.{kind}.name={name}"));
        }
        if let Some(s) = &self.service {
            parts.push(format!("service.name={s}"));
        }
        if let Some(v) = &self.version {
            parts.push(format!("service.version={v}"));
        }
        parts.join(",")
    }

    pub fn parse(value: &str) -> Self {
        let mut b = Baggage::default();
        for item in value.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim().to_owned());
            match k {
                "k8s.cluster.name" => b.cluster = Some(v),
                "k8s.namespace.name" => b.namespace = Some(v),
                "service.name" => b.service = Some(v),
                "service.version" => b.version = Some(v),
                other => {
                    if let Some(kind) = other
                        .strip_prefix("k8s.")
                        .and_then(|r| r.strip_suffix(".name"))
                    {
                        b.workload = Some((kind.to_owned(), v));
                    }
                }
            }
        }
        b
    }
}

/// A new W3C `traceparent` with random trace and span ids, not sampled.
pub fn new_traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-00",
        fastrand::u128(1..),
        fastrand::u64(1..)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trip_v4_and_v6() {
        for addr in ["10.1.2.3:4567", "[fd00::1]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut h = HeaderMap::new();
            h.insert(
                headers::FORWARDED,
                forwarded_header(addr, Some("echo.default.svc.cluster.local"))
                    .parse()
                    .unwrap(),
            );
            assert_eq!(forwarded_for(&h), Some(addr), "the port is kept");
        }
        let mut h = HeaderMap::new();
        h.insert(
            headers::FORWARDED,
            "for=192.0.2.60;proto=http".parse().unwrap(),
        );
        assert_eq!(forwarded_for(&h), Some("192.0.2.60:0".parse().unwrap()));
        h.insert(
            headers::FORWARDED,
            "for=\"198.51.100.7:1234\", For=\"[fd00::9]:80\";host=x"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            forwarded_for(&h),
            Some("[fd00::9]:80".parse().unwrap()),
            "the last element is the one the peer wrote"
        );
        h.insert(headers::FORWARDED, "for=nonsense".parse().unwrap());
        assert_eq!(forwarded_for(&h), None);
    }

    #[test]
    fn only_a_relay_may_name_another_client() {
        let peer: SocketAddr = "10.1.0.5:40000".parse().unwrap();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(headers::FORWARDED, v.parse().unwrap());
            h
        };
        let none = HeaderMap::new();
        let cases: &[(&HeaderMap, bool, &str)] = &[
            // (headers, peer relays, client)
            (&none, false, "10.1.0.5:40000"),
            (&none, true, "10.1.0.5:40000"),
            // A workload forging another address: ignored.
            (&with("for=\"192.0.2.1:80\""), false, "10.1.0.5:40000"),
            (&with("for=192.0.2.1"), false, "10.1.0.5:40000"),
            // A ztunnel naming its own pod's socket: the port is taken.
            (&with("for=\"10.1.0.5:5555\""), false, "10.1.0.5:5555"),
            (&with("for=10.1.0.5"), false, "10.1.0.5:40000"),
            // A waypoint or gateway relaying its client.
            (&with("for=\"192.0.2.1:80\""), true, "192.0.2.1:80"),
            (&with("for=192.0.2.1"), true, "192.0.2.1:0"),
            (&with("for=garbage"), true, "10.1.0.5:40000"),
        ];
        for (headers, relays, want) in cases {
            assert_eq!(
                client_address(peer, headers, || *relays),
                want.parse::<SocketAddr>().unwrap(),
                "{headers:?} relays={relays}"
            );
        }
    }

    #[test]
    fn baggage_round_trip() {
        let b = Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("demo".into()),
            workload: Some(("deployment".into(), "reviews-v2".into())),
            service: Some("reviews".into()),
            version: Some("v2".into()),
        };
        let h = b.to_header();
        assert_eq!(
            h,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.deployment.name=reviews-v2,\
             service.name=reviews,service.version=v2"
        );
        assert_eq!(Baggage::parse(&h), b);
    }

    #[test]
    fn traceparent_shape() {
        let t = new_traceparent();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));
        assert_ne!(new_traceparent(), t);
    }
}
