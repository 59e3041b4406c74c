//! Where a redirected connection was going: `SO_ORIGINAL_DST` (IPv4) and
//! `IP6T_SO_ORIGINAL_DST` (IPv6) read the destination from the connection's conntrack entry,
//! before the capture rules rewrote it to a ztunnel port.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt};

/// The original destination of a connection accepted on a capture listener (15001, 15006).
///
/// IPv4 connections accepted on a dual-stack `[::]` listener (local address `::ffff:a.b.c.d`)
/// are asked over IPv4, as the kernel tracks them as IPv4. `ENOENT` means the kernel has no
/// conntrack entry for the connection: it was not redirected by the capture rules.
pub fn original_destination(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    original_destination_of(stream, stream.local_addr()?)
}

fn original_destination_of(socket: impl AsFd, local: SocketAddr) -> io::Result<SocketAddr> {
    let is_ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let result = if is_ipv4 {
        getsockopt(&socket, sockopt::OriginalDst).map(|sin| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        })
    } else {
        getsockopt(&socket, sockopt::Ip6tOriginalDst).map(|sin6| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            ))
        })
    };
    result.map_err(|errno| {
        let error = io::Error::from(errno);
        io::Error::new(
            error.kind(),
            format!(
                "cannot read the original destination of the connection to {local}: {error}; \
                 was it redirected by the capture rules?"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without NAT there is no conntrack entry to read; the error says what to check.
    #[tokio::test]
    async fn unredirected_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("local address");
        let (_client, accepted) = tokio::join!(tokio::net::TcpStream::connect(address), async {
            listener.accept().await.expect("accept").0
        });
        match original_destination(&accepted) {
            // Connection tracking may be active in this namespace (e.g. NAT rules of the
            // host), in which case the kernel reports the real destination.
            Ok(destination) => assert_eq!(destination, address),
            Err(error) => assert!(
                error.to_string().contains("was it redirected"),
                "unexpected error: {error}"
            ),
        }
    }
}
