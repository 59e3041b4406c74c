//! SOCKS5 on 15080: outbound for clients without capture (local runs, tests). The client is
//! recognised by its source IP, which must be a pod this node serves; the destination is an IP
//! or a mesh service hostname (`name.namespace.svc.<cluster domain>`, resolved from the mesh's
//! own state). Only CONNECT with no authentication is offered.
//!
//! The handshake's two client messages are parsed by pure functions ([`parse_greeting`],
//! [`parse_request`]) that say how many bytes they need next, so the I/O reads exactly the
//! handshake and never a byte of the payload behind it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::Context;
use super::outbound::{self, Refusal};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const VERSION: u8 = 5;
/// The one authentication method offered: none.
const NO_AUTHENTICATION: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_HOSTNAME: u8 = 3;
const ATYP_IPV6: u8 = 4;

// Reply codes (RFC 1928).
const SUCCEEDED: u8 = 0;
const NOT_ALLOWED: u8 = 2;
const HOST_UNREACHABLE: u8 = 4;
const CONNECTION_REFUSED: u8 = 5;
const COMMAND_NOT_SUPPORTED: u8 = 7;
const ADDRESS_NOT_SUPPORTED: u8 = 8;

/// Why a SOCKS5 handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not SOCKS version 5 (first byte {0:#x})")]
    Version(u8),
    #[error("client offers no 'no authentication' method")]
    NoAcceptableMethod,
    #[error("command {0} is not CONNECT")]
    Command(u8),
    #[error("address type {0} is not supported")]
    AddressType(u8),
    #[error("hostname is not UTF-8")]
    Hostname,
}

impl Socks5Error {
    /// What the client is told before the connection is closed, if anything: RFC 1928 answers
    /// an unacceptable method list, command or address type; a wrong version or a broken
    /// message gets no answer.
    pub fn reply(&self) -> Option<&'static [u8]> {
        match self {
            Socks5Error::NoAcceptableMethod => Some(&[VERSION, NO_ACCEPTABLE_METHOD]),
            Socks5Error::Command(_) => Some(&COMMAND_NOT_SUPPORTED_REPLY),
            Socks5Error::AddressType(_) => Some(&ADDRESS_NOT_SUPPORTED_REPLY),
            Socks5Error::Io(_) | Socks5Error::Version(_) | Socks5Error::Hostname => None,
        }
    }
}

const COMMAND_NOT_SUPPORTED_REPLY: [u8; 10] = reply_packet(COMMAND_NOT_SUPPORTED);
const ADDRESS_NOT_SUPPORTED_REPLY: [u8; 10] = reply_packet(ADDRESS_NOT_SUPPORTED);

/// A reply with `code` and an empty IPv4 bound address.
const fn reply_packet(code: u8) -> [u8; 10] {
    [VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
}

/// The result of parsing the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<T> {
    /// Not complete: at least this many bytes in all are needed to go on (always more than
    /// were given).
    Need(usize),
    /// The message, and how many bytes it took.
    Done(T, usize),
}

/// Where a CONNECT request asks to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Ip(SocketAddr),
    /// A hostname (resolved from the mesh's state by the caller) and a port.
    Hostname(String, u16),
}

/// The greeting: version 5, then the methods the client offers; "no authentication" must be
/// among them.
pub fn parse_greeting(buf: &[u8]) -> Result<Parse<()>, Socks5Error> {
    let Some(&version) = buf.first() else {
        return Ok(Parse::Need(1));
    };
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    let Some(&count) = buf.get(1) else {
        return Ok(Parse::Need(2));
    };
    let len = 2 + usize::from(count);
    let Some(methods) = buf.get(2..len) else {
        return Ok(Parse::Need(len));
    };
    if !methods.contains(&NO_AUTHENTICATION) {
        return Err(Socks5Error::NoAcceptableMethod);
    }
    Ok(Parse::Done((), len))
}

/// The request: version 5, CONNECT, a reserved byte, then an IPv4 address, an IPv6 address or
/// a hostname (UTF-8), and a port. The head (four bytes) is read whole before any of it is
/// judged.
pub fn parse_request(buf: &[u8]) -> Result<Parse<Destination>, Socks5Error> {
    let Some(&[version, command, _reserved, address_type]) = buf.first_chunk::<4>() else {
        return Ok(Parse::Need(4));
    };
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    if command != CONNECT {
        return Err(Socks5Error::Command(command));
    }
    let rest = &buf[4..];
    let (address, address_len) = match address_type {
        ATYP_IPV4 => match rest.first_chunk::<4>() {
            Some(b) => (Address::Ip(IpAddr::from(*b)), 4),
            None => return Ok(Parse::Need(4 + 4)),
        },
        ATYP_IPV6 => match rest.first_chunk::<16>() {
            Some(b) => (Address::Ip(IpAddr::from(*b)), 16),
            None => return Ok(Parse::Need(4 + 16)),
        },
        ATYP_HOSTNAME => {
            let Some(&name_len) = rest.first() else {
                return Ok(Parse::Need(4 + 1));
            };
            let end = 1 + usize::from(name_len);
            let Some(name) = rest.get(1..end) else {
                return Ok(Parse::Need(4 + end));
            };
            let name = std::str::from_utf8(name).map_err(|_| Socks5Error::Hostname)?;
            (Address::Name(name), end)
        }
        other => return Err(Socks5Error::AddressType(other)),
    };
    let len = 4 + address_len + 2;
    let Some(&port) = rest.get(address_len..).and_then(|p| p.first_chunk::<2>()) else {
        return Ok(Parse::Need(len));
    };
    let port = u16::from_be_bytes(port);
    let destination = match address {
        Address::Ip(ip) => Destination::Ip(SocketAddr::new(ip, port)),
        Address::Name(name) => Destination::Hostname(name.to_owned(), port),
    };
    Ok(Parse::Done(destination, len))
}

enum Address<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// Accepts SOCKS5 clients until `stop` is cancelled.
pub async fn serve(ctx: Arc<Context>, listener: TcpListener, stop: CancellationToken) {
    // Accept errors (EMFILE and friends) back off instead of spinning.
    let mut acceptor = mesh::accept::Acceptor::new(listener, "socks5");
    loop {
        let (client, client_addr) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = acceptor.accept() => accepted,
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(ctx, client, client_addr).await {
                tracing::info!(%client_addr, error = %e, "SOCKS5 request refused");
            }
        });
    }
}

async fn handle(
    ctx: Arc<Context>,
    mut client: TcpStream,
    client_addr: SocketAddr,
) -> Result<(), Socks5Error> {
    let _ = client.set_nodelay(true);
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&ctx, &mut client)).await {
        Ok(Ok(Some(t))) => t,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out").into(),
            );
        }
    };
    let Some(pod) = ctx.pod_by_ip(client_addr.ip()) else {
        reply(&mut client, NOT_ALLOWED).await?;
        tracing::info!(%client_addr, "SOCKS5 client is not a pod this node serves");
        return Ok(());
    };
    match outbound::establish(&ctx, &pod, client_addr, target).await {
        Ok(established) => {
            reply(&mut client, SUCCEEDED).await?;
            outbound::run(client, established).await;
        }
        Err(Refusal::Denied) => reply(&mut client, NOT_ALLOWED).await?,
        Err(Refusal::Unreachable) => reply(&mut client, CONNECTION_REFUSED).await?,
    }
    Ok(())
}

/// Reads the greeting and the request; returns the destination, or `None` after replying with
/// an error itself.
async fn handshake(
    ctx: &Context,
    client: &mut TcpStream,
) -> Result<Option<SocketAddr>, Socks5Error> {
    read_message(client, parse_greeting).await?;
    client.write_all(&[VERSION, NO_AUTHENTICATION]).await?;
    let (name, port) = match read_message(client, parse_request).await? {
        Destination::Ip(addr) => return Ok(Some(addr)),
        Destination::Hostname(name, port) => (name, port),
    };
    match ctx.resolve_service_hostname(&name) {
        Some(ip) => Ok(Some(SocketAddr::new(ip, port))),
        None => {
            tracing::info!(hostname = %name, "SOCKS5: not a mesh service hostname");
            reply(client, HOST_UNREACHABLE).await?;
            Ok(None)
        }
    }
}

/// Reads exactly one message as `parse` asks for bytes; a message `parse` refuses gets its
/// reply ([`Socks5Error::reply`]) before the error is returned.
async fn read_message<T, S>(
    client: &mut S,
    parse: fn(&[u8]) -> Result<Parse<T>, Socks5Error>,
) -> Result<T, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(32);
    loop {
        match parse(&buf) {
            Ok(Parse::Done(message, _)) => return Ok(message),
            Ok(Parse::Need(len)) => {
                let have = buf.len();
                debug_assert!(len > have, "a parser asked for {len} bytes holding {have}");
                buf.resize(len, 0);
                client.read_exact(&mut buf[have..]).await?;
            }
            Err(e) => {
                if let Some(bytes) = e.reply() {
                    client.write_all(bytes).await?;
                }
                return Err(e);
            }
        }
    }
}

async fn reply(client: &mut TcpStream, code: u8) -> std::io::Result<()> {
    client.write_all(&reply_packet(code)).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ok<T>(parse: Result<Parse<T>, Socks5Error>) -> Parse<T> {
        parse.unwrap_or_else(|e| panic!("refused: {e}"))
    }

    #[test]
    fn greetings() {
        // curl's greeting: version 5, two methods (none, username/password).
        assert_eq!(ok(parse_greeting(&[5, 2, 0, 2])), Parse::Done((), 4));
        assert_eq!(ok(parse_greeting(&[5, 1, 0])), Parse::Done((), 3));
        // Bytes that follow the greeting are not its own.
        assert_eq!(ok(parse_greeting(&[5, 1, 0, 5, 1])), Parse::Done((), 3));
        // Incomplete: each answer asks for more than it was given.
        assert_eq!(ok(parse_greeting(&[])), Parse::Need(1));
        assert_eq!(ok(parse_greeting(&[5])), Parse::Need(2));
        assert_eq!(ok(parse_greeting(&[5, 3, 2])), Parse::Need(5));
        assert_eq!(ok(parse_greeting(&[5, 255])), Parse::Need(257));

        let refused = |buf: &[u8]| parse_greeting(buf).unwrap_err();
        assert!(matches!(refused(&[4, 1, 0]), Socks5Error::Version(4)));
        assert!(
            refused(&[4]).reply().is_none(),
            "a wrong version is not answered"
        );
        let no_method = refused(&[5, 1, 2]);
        assert!(matches!(no_method, Socks5Error::NoAcceptableMethod));
        assert_eq!(no_method.reply(), Some(&[5u8, 0xff][..]));
        assert!(matches!(refused(&[5, 0]), Socks5Error::NoAcceptableMethod));
    }

    #[test]
    fn requests() {
        let v4 = [5, 1, 0, 1, 10, 1, 2, 3, 0x1f, 0x90];
        assert_eq!(
            ok(parse_request(&v4)),
            Parse::Done(Destination::Ip("10.1.2.3:8080".parse().unwrap()), 10)
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(
            ok(parse_request(&v6)),
            Parse::Done(Destination::Ip("[fd00::7]:80".parse().unwrap()), 22)
        );
        // curl --socks5-hostname: the name as given, port 80.
        let name = b"web.demo.svc.cluster.local";
        let mut by_name = vec![5, 1, 0, 3, name.len() as u8];
        by_name.extend_from_slice(name);
        by_name.extend_from_slice(&[0, 80]);
        assert_eq!(
            ok(parse_request(&by_name)),
            Parse::Done(
                Destination::Hostname("web.demo.svc.cluster.local".into(), 80),
                by_name.len()
            )
        );
        // Incomplete, at each point the original reads stopped at.
        assert_eq!(ok(parse_request(&[5, 1, 0])), Parse::Need(4));
        assert_eq!(ok(parse_request(&v4[..6])), Parse::Need(8));
        assert_eq!(ok(parse_request(&v4[..9])), Parse::Need(10));
        assert_eq!(ok(parse_request(&v6[..5])), Parse::Need(20));
        assert_eq!(ok(parse_request(&[5, 1, 0, 3])), Parse::Need(5));
        assert_eq!(ok(parse_request(&[5, 1, 0, 3, 4, b'a'])), Parse::Need(9));
        assert_eq!(
            ok(parse_request(&[5, 1, 0, 3, 1, b'a'])),
            Parse::Need(8),
            "the port after the name"
        );
        assert_eq!(
            ok(parse_request(&[5, 1, 0, 3, 0, 0, 80])),
            Parse::Done(Destination::Hostname(String::new(), 80), 7)
        );

        let refused = |buf: &[u8]| parse_request(buf).unwrap_err();
        // The head is read whole before it is judged.
        assert_eq!(ok(parse_request(&[4, 1, 0])), Parse::Need(4));
        assert!(matches!(refused(&[4, 1, 0, 1]), Socks5Error::Version(4)));
        let bind = refused(&[5, 2, 0, 1]);
        assert!(matches!(bind, Socks5Error::Command(2)));
        assert_eq!(bind.reply(), Some(&[5u8, 7, 0, 1, 0, 0, 0, 0, 0, 0][..]));
        let atyp = refused(&[5, 1, 0, 9]);
        assert!(matches!(atyp, Socks5Error::AddressType(9)));
        assert_eq!(atyp.reply(), Some(&[5u8, 8, 0, 1, 0, 0, 0, 0, 0, 0][..]));
        // A name that is not UTF-8 is refused as soon as it is read, before the port.
        let bad_name = refused(&[5, 1, 0, 3, 2, 0xc3, 0x28]);
        assert!(matches!(bad_name, Socks5Error::Hostname));
        assert!(bad_name.reply().is_none());
    }

    /// Fed as the I/O feeds it (exactly the bytes asked for), every message parses to what it
    /// parses to whole.
    #[test]
    fn asking_for_bytes_reaches_the_whole_message() {
        let messages: [&[u8]; 3] = [
            &[5, 1, 0, 1, 127, 0, 0, 1, 0, 80],
            &[5, 1, 0, 3, 3, b'a', b'.', b'b', 1, 0],
            &[
                5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 22,
            ],
        ];
        for message in messages {
            let mut len = 0;
            let result = loop {
                match ok(parse_request(&message[..len])) {
                    Parse::Need(more) => {
                        assert!(more > len && more <= message.len(), "{message:?} at {len}");
                        len = more;
                    }
                    done @ Parse::Done(..) => break done,
                }
            };
            assert_eq!(result, ok(parse_request(message)));
        }
    }

    /// The handshake reads exactly its own bytes: what the client sent behind the request (its
    /// first payload bytes) is still in the socket for the tunnel.
    #[tokio::test]
    async fn reads_stop_at_the_end_of_each_message() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(&[5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 80, b'G', b'E', b'T'])
            .await
            .unwrap();
        read_message(&mut server, parse_greeting).await.unwrap();
        let destination = read_message(&mut server, parse_request).await.unwrap();
        assert_eq!(destination, Destination::Ip("10.0.0.1:80".parse().unwrap()));
        let mut payload = [0u8; 3];
        server.read_exact(&mut payload).await.unwrap();
        assert_eq!(&payload, b"GET");

        // A refused greeting is answered before the error is returned.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[5, 1, 2]).await.unwrap();
        let error = read_message(&mut server, parse_greeting).await.unwrap_err();
        assert!(matches!(error, Socks5Error::NoAcceptableMethod));
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [5, 0xff]);
    }
}
