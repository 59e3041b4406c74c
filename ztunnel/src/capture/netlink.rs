//! A small blocking netlink client: send a burst of requests in one datagram, read the replies
//! back message by message.
//!
//! Sockets belong to the network namespace of the thread that opens them, so callers open one
//! inside [`super::NetNs::run`]. Protocol-specific message building lives in the callers.

use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkDeserializable, NetlinkMessage, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// How long one reply may take. The kernel answers netlink requests synchronously, so this only
/// guards against a lost reply hanging a pod's setup forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A netlink socket connected to the kernel.
#[derive(Debug)]
pub(super) struct NetlinkSocket {
    socket: Socket,
}

impl NetlinkSocket {
    /// Opens a socket for `protocol` (e.g. `NETLINK_NETFILTER`) in the calling thread's netns.
    pub(super) fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Errors then carry only the header of the failed request, not the whole request.
        socket.set_cap_ack(true)?;
        socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Self { socket })
    }

    /// Sends `messages` in one datagram, so that the kernel sees a batch as one unit.
    pub(super) fn send<I>(&self, messages: &mut [NetlinkMessage<I>]) -> io::Result<()>
    where
        I: NetlinkSerializable,
    {
        let mut buffer = Vec::new();
        for message in messages.iter_mut() {
            message.finalize();
            let start = buffer.len();
            buffer.resize(start + align(message.buffer_len()), 0);
            message.serialize(&mut buffer[start..]);
        }
        let sent = self.socket.send(&buffer, 0)?;
        if sent != buffer.len() {
            return Err(io::Error::other(format!(
                "netlink send was cut short: {sent} of {} bytes",
                buffer.len()
            )));
        }
        Ok(())
    }

    /// Receives one datagram and decodes every netlink message in it.
    pub(super) fn recv<I>(&self) -> io::Result<Vec<NetlinkMessage<I>>>
    where
        I: NetlinkDeserializable,
    {
        let (datagram, _) = self.socket.recv_from_full().map_err(|error| {
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no netlink reply from the kernel within {REPLY_TIMEOUT:?}"),
                )
            } else {
                error
            }
        })?;
        let mut messages = Vec::new();
        let mut offset = 0;
        while offset < datagram.len() {
            let rest = &datagram[offset..];
            let length = NetlinkBuffer::new_checked(rest)
                .map_err(|error| invalid_reply(&error))?
                .length() as usize;
            if length == 0 || length > rest.len() {
                return Err(invalid_reply(&format!(
                    "message length {length} with {} bytes left",
                    rest.len()
                )));
            }
            let message = NetlinkMessage::<I>::deserialize(&rest[..length])
                .map_err(|error| invalid_reply(&error))?;
            messages.push(message);
            offset += align(length);
        }
        Ok(messages)
    }
}

/// Netlink messages start on 4-byte boundaries (`NLMSG_ALIGN`).
fn align(length: usize) -> usize {
    length.div_ceil(4) * 4
}

fn invalid_reply(error: &dyn std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("undecodable netlink reply: {error}"),
    )
}

#[cfg(test)]
mod tests {
    use super::align;

    #[test]
    fn messages_align_to_four_bytes() {
        assert_eq!(align(0), 0);
        assert_eq!(align(1), 4);
        assert_eq!(align(20), 20);
        assert_eq!(align(21), 24);
    }
}
