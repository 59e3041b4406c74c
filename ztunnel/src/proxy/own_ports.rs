//! Traffic addressed to ztunnel's own listeners is refused, as Istio's ztunnel does
//! (`illegal_ports`, `Error::SelfCall`).
//!
//! Without this, one connection could make ztunnel connect to itself for ever: a plaintext
//! connection to a pod's `:15006` is "for" port 15006, so ztunnel connects to the pod's 15006
//! from inside its network, which is its own listener again; `:15001` loops through the
//! outbound listener and HBONE back into the pod. Each turn opens two sockets, so a node ran out
//! of file descriptors in seconds. The decision is a pure function of the destination and the
//! ports, tested with a table; the handlers count and log each refusal.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The ports of one ztunnel's own listeners: those in each captured pod (outbound 15001,
/// inbound plaintext 15006, HBONE 15008, DNS 15053) and those of the node (admin, metrics,
/// readiness, SOCKS5), as bound.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OwnPorts(BTreeSet<u16>);

impl OwnPorts {
    /// The in-pod ports plus `node_ports` (port 0, not bound, is ignored).
    pub fn new(node_ports: impl IntoIterator<Item = u16>) -> Self {
        let mut ports: BTreeSet<u16> = [
            super::OUTBOUND_PORT,
            super::INBOUND_PLAINTEXT_PORT,
            mesh::hbone::HBONE_PORT,
            crate::dns::DNS_PROXY_PORT,
        ]
        .into();
        ports.extend(node_ports.into_iter().filter(|p| *p != 0));
        Self(ports)
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.contains(&port)
    }

    /// Whether an inbound connection (HBONE authority, or a plaintext connection's original
    /// destination) asks for one of ztunnel's ports in the pod. Such a target is never an
    /// application: it is ztunnel itself.
    pub fn inbound_target_is_ztunnel(&self, target: SocketAddr) -> bool {
        self.contains(target.port())
    }

    /// Whether an outbound connection's original destination is one of ztunnel's listeners:
    /// one of its ports on a loopback or unspecified address (the pod's own loopback, where the
    /// in-pod listeners are) or on a pod this ztunnel serves (`is_local_pod`). The same port on
    /// any other host is an ordinary destination.
    pub fn outbound_target_is_ztunnel(
        &self,
        destination: SocketAddr,
        is_local_pod: impl FnOnce(std::net::IpAddr) -> bool,
    ) -> bool {
        let ip = destination.ip();
        self.contains(destination.port())
            && (ip.is_loopback() || ip.is_unspecified() || is_local_pod(ip))
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SelfCallLabels {
    direction: &'static str,
    port: u16,
}

/// `ztunnel_self_calls_refused_total{direction, port}`.
#[derive(Debug, Clone, Default)]
pub struct SelfCallMetrics {
    refused: Family<SelfCallLabels, Counter>,
}

impl SelfCallMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ztunnel_self_calls_refused",
            "Connections refused because they were addressed to one of ztunnel's own ports \
             (they would loop back into ztunnel), by direction and port",
            m.refused.clone(),
        );
        m
    }

    /// Counts and logs one refusal. `source` is who opened the connection (the client, or for
    /// HBONE the peer and its identity); `pod` the pod it arrived at or left from.
    pub fn refuse(&self, direction: &'static str, source: &str, target: SocketAddr, pod: &str) {
        self.refused
            .get_or_create(&SelfCallLabels {
                direction,
                port: target.port(),
            })
            .inc();
        tracing::warn!(
            direction,
            source,
            %target,
            pod,
            "refused: the connection is addressed to one of ztunnel's own ports (it would loop \
             back into ztunnel); if an application really listens there, move it off ztunnel's ports"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_and_outbound_targets() {
        let own = OwnPorts::new([15000, 15020, 15021, 15080, 0]);
        assert!(!own.contains(0), "an unbound port is not ours");
        let pod: std::net::IpAddr = "10.1.0.5".parse().unwrap();
        let remote: std::net::IpAddr = "10.2.0.9".parse().unwrap();
        let local = |ip| ip == pod;
        let cases: &[(&str, u16, bool, bool)] = &[
            // (ip, port, inbound refused, outbound refused)
            ("10.1.0.5", 15001, true, true),
            ("10.1.0.5", 15006, true, true),
            ("10.1.0.5", 15008, true, true),
            ("10.1.0.5", 15053, true, true),
            ("10.1.0.5", 15000, true, true),
            ("10.1.0.5", 15020, true, true),
            ("10.1.0.5", 8080, false, false),
            ("127.0.0.1", 15001, true, true),
            ("127.0.0.1", 15080, true, true),
            ("0.0.0.0", 15006, true, true),
            ("::1", 15008, true, true),
            // Another host's 15001 is an ordinary destination for outbound traffic (it is
            // refused by that host's ztunnel if it is one).
            ("10.2.0.9", 15001, true, false),
            ("192.0.2.1", 15020, true, false),
            ("127.0.0.1", 8080, false, false),
        ];
        for &(ip, port, inbound, outbound) in cases {
            let addr = SocketAddr::new(ip.parse().unwrap(), port);
            assert_eq!(
                own.inbound_target_is_ztunnel(addr),
                inbound,
                "inbound {addr}"
            );
            assert_eq!(
                own.outbound_target_is_ztunnel(addr, local),
                outbound,
                "outbound {addr}"
            );
        }
        assert!(!local(remote));
    }
}
