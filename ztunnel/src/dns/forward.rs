//! Sending a query to the upstream resolvers on a pod's behalf.
//!
//! Sockets come from the pod's network ([`PodNetwork`]): inside the pod's namespace and marked,
//! so the query leaves as the pod's own would (from its IP, under its network policy) and the
//! capture rules let it through instead of redirecting it back to the proxy. Each UDP query
//! gets a new socket (a random source port) and a random id, and only an answer from the
//! upstream it was sent to, with that id and question, is accepted.
//!
//! Upstreams are tried in order within one deadline: a UDP query gets at least two attempts
//! (one lost datagram must not cost the client a SERVFAIL), each a share of the deadline; an
//! upstream that answers SERVFAIL or REFUSED is skipped while another remains.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pods::PodNetwork;

/// The transport a query came in on, and is forwarded over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }
}

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "no upstream DNS resolver is configured: set DNS_UPSTREAMS, or give ztunnel an \
         /etc/resolv.conf with nameservers"
    )]
    NoUpstreams,
    #[error(
        "no answer from upstream {upstream} over {protocol} within {after:?}: is the resolver \
         up and reachable from the pod's network (DNS_UPSTREAMS, network policies)?"
    )]
    Timeout {
        upstream: SocketAddr,
        protocol: &'static str,
        after: Duration,
    },
    #[error("upstream {upstream} over {protocol}: {source}")]
    Io {
        upstream: SocketAddr,
        protocol: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("upstream {upstream} over TCP sent an answer that is not the reply to our query")]
    Mismatch { upstream: SocketAddr },
}

/// An upstream's answer: the bytes as received (id still ours) and parsed.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) bytes: Vec<u8>,
    pub(super) message: Message,
}

/// Sends `query` (encoded, with id `id`, asking `question`) to `upstreams` over `protocol`
/// from the pod's network, within `deadline`.
pub(super) async fn forward(
    network: &dyn PodNetwork,
    upstreams: &[SocketAddr],
    protocol: Protocol,
    query: &[u8],
    id: u16,
    question: &Query,
    deadline: Duration,
) -> Result<Answer, ForwardError> {
    if upstreams.is_empty() {
        return Err(ForwardError::NoUpstreams);
    }
    let attempts = match protocol {
        Protocol::Udp => upstreams.len().max(2),
        Protocol::Tcp => upstreams.len(),
    };
    let per_attempt = deadline / u32::try_from(attempts).unwrap_or(u32::MAX);
    let mut last_error = None;
    let mut refused = None;
    for attempt in 0..attempts {
        let upstream = upstreams[attempt % upstreams.len()];
        let exchange = async {
            match protocol {
                Protocol::Udp => exchange_udp(network, upstream, query, id, question).await,
                Protocol::Tcp => exchange_tcp(network, upstream, query, id, question).await,
            }
        };
        match tokio::time::timeout(per_attempt, exchange).await {
            Ok(Ok(answer)) => {
                let gave_up = matches!(
                    answer.message.response_code(),
                    ResponseCode::ServFail | ResponseCode::Refused
                );
                if gave_up && upstreams.len() > 1 && attempt + 1 < attempts {
                    refused = Some(answer);
                    continue;
                }
                return Ok(answer);
            }
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {
                last_error = Some(ForwardError::Timeout {
                    upstream,
                    protocol: protocol.as_str(),
                    after: per_attempt,
                });
            }
        }
    }
    // An upstream's own SERVFAIL is an answer: pass it on rather than inventing one.
    match (refused, last_error) {
        (Some(answer), _) => Ok(answer),
        (None, Some(e)) => Err(e),
        (None, None) => Err(ForwardError::NoUpstreams),
    }
}

/// Whether `message` is the upstream's reply to our query.
fn is_reply(message: &Message, id: u16, question: &Query) -> bool {
    message.id() == id
        && message.message_type() == MessageType::Response
        && message.queries().first().is_none_or(|q| {
            q.query_type() == question.query_type()
                && q.query_class() == question.query_class()
                && q.name() == question.name()
        })
}

async fn exchange_udp(
    network: &dyn PodNetwork,
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<Answer, ForwardError> {
    let io_error = |source| ForwardError::Io {
        upstream,
        protocol: "udp",
        source,
    };
    let socket = network.udp_socket(upstream).await.map_err(io_error)?;
    // Connected: the kernel drops datagrams from anyone but the upstream, and an ICMP port
    // unreachable surfaces as an error at once instead of a timeout.
    socket.connect(upstream).await.map_err(io_error)?;
    socket.send(query).await.map_err(io_error)?;
    let mut buffer = vec![0u8; 65535];
    loop {
        let len = socket.recv(&mut buffer).await.map_err(io_error)?;
        let bytes = &buffer[..len];
        match Message::from_vec(bytes) {
            Ok(message) if is_reply(&message, id, question) => {
                return Ok(Answer {
                    bytes: bytes.to_vec(),
                    message,
                });
            }
            // A late answer to an earlier query, or garbage: keep waiting for ours.
            _ => tracing::debug!(%upstream, len, "ignoring a datagram that is not our answer"),
        }
    }
}

async fn exchange_tcp(
    network: &dyn PodNetwork,
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<Answer, ForwardError> {
    let io_error = |source| ForwardError::Io {
        upstream,
        protocol: "tcp",
        source,
    };
    let mut stream = network.connect(upstream).await.map_err(io_error)?;
    let _ = stream.set_nodelay(true);
    let len = u16::try_from(query.len())
        .map_err(|_| io_error(io::Error::other("query longer than 65535 bytes")))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(io_error)?;
    let len = stream.read_u16().await.map_err(io_error)?;
    let mut bytes = vec![0u8; usize::from(len)];
    stream.read_exact(&mut bytes).await.map_err(io_error)?;
    match Message::from_vec(&bytes) {
        Ok(message) if is_reply(&message, id, question) => Ok(Answer { bytes, message }),
        _ => Err(ForwardError::Mismatch { upstream }),
    }
}
