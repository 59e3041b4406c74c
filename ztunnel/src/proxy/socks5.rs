//! SOCKS5 on 15080: outbound for clients without capture (local runs, tests). The client is
//! recognised by its source IP, which must be a pod this node serves; the destination is an IP
//! or a mesh service hostname (`name.namespace.svc.<cluster domain>`, resolved from the mesh's
//! own state). Only CONNECT with no authentication is offered.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::Context;
use super::outbound::{self, Refusal};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// Reply codes (RFC 1928).
const SUCCEEDED: u8 = 0;
const NOT_ALLOWED: u8 = 2;
const HOST_UNREACHABLE: u8 = 4;
const CONNECTION_REFUSED: u8 = 5;
const COMMAND_NOT_SUPPORTED: u8 = 7;
const ADDRESS_NOT_SUPPORTED: u8 = 8;

#[derive(Debug, thiserror::Error)]
enum Socks5Error {
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
    let version = client.read_u8().await?;
    if version != 5 {
        return Err(Socks5Error::Version(version));
    }
    let n = client.read_u8().await?;
    let mut methods = vec![0u8; usize::from(n)];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        client.write_all(&[5, 0xff]).await?;
        return Err(Socks5Error::NoAcceptableMethod);
    }
    client.write_all(&[5, 0]).await?;
    let mut head = [0u8; 4];
    client.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(Socks5Error::Version(head[0]));
    }
    if head[1] != 1 {
        reply(client, COMMAND_NOT_SUPPORTED).await?;
        return Err(Socks5Error::Command(head[1]));
    }
    let ip: Option<IpAddr> = match head[3] {
        1 => {
            let mut b = [0u8; 4];
            client.read_exact(&mut b).await?;
            Some(IpAddr::from(b))
        }
        4 => {
            let mut b = [0u8; 16];
            client.read_exact(&mut b).await?;
            Some(IpAddr::from(b))
        }
        3 => {
            let len = client.read_u8().await?;
            let mut name = vec![0u8; usize::from(len)];
            client.read_exact(&mut name).await?;
            let name = String::from_utf8(name).map_err(|_| Socks5Error::Hostname)?;
            let resolved = ctx.resolve_service_hostname(&name);
            if resolved.is_none() {
                tracing::info!(hostname = %name, "SOCKS5: not a mesh service hostname");
            }
            resolved
        }
        other => {
            reply(client, ADDRESS_NOT_SUPPORTED).await?;
            return Err(Socks5Error::AddressType(other));
        }
    };
    let port = client.read_u16().await?;
    match ip {
        Some(ip) => Ok(Some(SocketAddr::new(ip, port))),
        None => {
            reply(client, HOST_UNREACHABLE).await?;
            Ok(None)
        }
    }
}

async fn reply(client: &mut TcpStream, code: u8) -> std::io::Result<()> {
    client.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await
}
