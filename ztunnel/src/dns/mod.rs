//! The DNS proxy: port 15053 (UDP and TCP) on the loopback of each captured pod's network
//! namespace, where the capture rules redirect the pod's DNS (port 53, any resolver) when
//! `DNS_CAPTURE` is on, as Istio's ztunnel does in ambient mode.
//!
//! A query for a mesh service (`<svc>.<ns>.svc.<cluster domain>`, or a short form the pod's
//! search path expands to it) is answered from the state ([`resolve`]), with a TTL of
//! [`MESH_TTL_SECONDS`]; anything else is forwarded to the upstream resolvers from the pod's
//! namespace and the answer cached for its TTL ([`cache`]). A query the upstream does not
//! answer in time gets SERVFAIL, never silence; an answer too large for the client's UDP
//! buffer is truncated (TC) so the client retries over TCP. Metrics are Istio's
//! ([`metrics`]).
//!
//! Where the upstream is: with a REDIRECT rule the kernel keeps no original destination a UDP
//! socket could read, and pods have no file system of their own here, so ztunnel cannot read
//! the pod's resolv.conf as Istio's sidecar agent does. The upstreams come from `DNS_UPSTREAMS`
//! (default: the nameservers of ztunnel's own `/etc/resolv.conf`, which for a DaemonSet with
//! the `ClusterFirst` policy is kube-dns, what the pods use too), and the search path is the
//! one kubelet writes for the pod's namespace ([`resolve::SearchPath::kubelet`]).

pub mod cache;
mod forward;
pub mod metrics;
pub mod resolve;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use mesh::discovery::Store;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use forward::{ForwardError, Protocol};
/// The DNS message library, re-exported so tests and tools build messages with the same
/// version the proxy parses them with.
pub use hickory_proto as proto;

use crate::pods::{LocalPod, PodNetwork};
use cache::{Cache, CacheKey, Clock, SystemClock};
use metrics::{DnsLabels, DnsMetrics, DropReason};
use resolve::{Decision, Family, MeshAnswer, SearchPath};

/// The proxy's port in each pod's namespace (Istio's).
pub const DNS_PROXY_PORT: u16 = 15053;
/// The TTL of answers for mesh names (Istio's ztunnel uses 30 s): short enough that a changed
/// VIP or a new headless endpoint reaches clients quickly.
pub const MESH_TTL_SECONDS: u32 = 30;
/// How long a forwarded query may take, over all upstreams and attempts, before the client
/// gets SERVFAIL: under the 5 s a glibc or musl stub waits before retrying, so the client
/// hears SERVFAIL rather than its own timeout.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(4);
/// Queries being handled at once per pod; beyond that a UDP query gets SERVFAIL at once
/// (counted as `overload`), a TCP one waits its turn.
const MAX_IN_FLIGHT: usize = 256;
/// A TCP connection with no complete query for this long is closed (RFC 7766 suggests
/// seconds).
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The UDP payload size the proxy advertises in its own EDNS (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;
/// At most one warning about failing upstreams per this interval (each failure is still
/// counted and logged on the `dns` target at debug).
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Where the default upstreams are read from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What the DNS proxy needs besides the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    pub cluster_domain: String,
    /// Where forwarded queries go, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// See [`DEFAULT_UPSTREAM_TIMEOUT`].
    pub upstream_timeout: Duration,
    /// Cached answers per pod.
    pub cache_capacity: usize,
}

impl DnsConfig {
    pub fn new(cluster_domain: String, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            cluster_domain,
            upstreams,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            cache_capacity: cache::DEFAULT_CAPACITY,
        }
    }
}

/// The nameservers of a resolv.conf, on port 53, in order. IPv6 link-local nameservers with a
/// zone (`fe80::1%eth0`) are skipped: the zone names an interface of ztunnel's namespace, not
/// the pod's.
pub fn nameservers_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The nameservers of ztunnel's own [`RESOLV_CONF`].
pub fn system_upstreams() -> io::Result<Vec<SocketAddr>> {
    std::fs::read_to_string(RESOLV_CONF).map(|text| nameservers_from_resolv_conf(&text))
}

/// The node-wide part of the DNS proxy: configuration, state, metrics. [`DnsProxy::bind`]
/// starts one pod's listeners.
#[derive(Debug)]
pub struct DnsProxy {
    config: DnsConfig,
    store: Store,
    metrics: DnsMetrics,
    clock: Arc<dyn Clock>,
    last_warning: Mutex<Option<Instant>>,
}

impl DnsProxy {
    pub fn new(config: DnsConfig, store: Store, registry: &mut Registry) -> Self {
        Self::with_clock(
            config,
            store,
            DnsMetrics::new(registry),
            Arc::new(SystemClock),
        )
    }

    /// With a clock of the caller's (tests move it to expire cache entries).
    pub fn with_clock(
        config: DnsConfig,
        store: Store,
        metrics: DnsMetrics,
        clock: Arc<dyn Clock>,
    ) -> Self {
        for upstream in &config.upstreams {
            if upstream.ip().is_loopback() {
                tracing::warn!(
                    %upstream,
                    "DNS upstream is a loopback address: queries are forwarded from each pod's \
                     network namespace, where loopback is the pod's own; set DNS_UPSTREAMS to the \
                     cluster DNS service"
                );
            }
        }
        Self {
            config,
            store,
            metrics,
            clock,
            last_warning: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    /// The resolver for one pod: `uid` and `namespace` are the pod's, `network` makes its
    /// upstream sockets.
    pub fn for_pod(
        self: &Arc<Self>,
        uid: &str,
        namespace: &str,
        network: Arc<dyn PodNetwork>,
    ) -> PodDns {
        PodDns {
            proxy: self.clone(),
            uid: uid.to_owned(),
            search: SearchPath::kubelet(namespace, &self.config.cluster_domain),
            network,
            cache: Mutex::new(Cache::new(self.config.cache_capacity, self.clock.clone())),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// Binds `pod`'s DNS listeners inside its network: UDP and TCP on `127.0.0.1:15053`
    /// (where the redirect sends IPv4 queries) and on `[::1]:15053` when the pod has IPv6
    /// loopback. Failing to bind IPv4 is an error; IPv6 is skipped with a debug line.
    pub fn bind(self: &Arc<Self>, pod: &Arc<LocalPod>) -> Result<PodListeners, String> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let addr = SocketAddr::new(ip, DNS_PROXY_PORT);
            let bound = pod
                .network
                .bind_udp(addr)
                .and_then(|socket| Ok((socket, pod.network.bind(addr)?)));
            match bound {
                Ok((socket, listener)) => {
                    udp.push(socket);
                    tcp.push(listener);
                }
                Err(e) if ip.is_ipv6() => {
                    tracing::debug!(pod = %pod.workload.uid, error = %e, "no DNS proxy on [::1]: the pod has no IPv6 loopback");
                }
                Err(e) => return Err(format!("binding the DNS proxy on {addr}: {e}")),
            }
        }
        let dns = Arc::new(self.for_pod(
            &pod.workload.uid,
            &pod.workload.namespace,
            pod.network.clone(),
        ));
        Ok(PodListeners {
            dns,
            udp,
            tcp,
            stop: pod.stop.clone(),
        })
    }

    /// Logs a failing upstream at warn, at most once per [`WARN_INTERVAL`].
    fn warn_upstream_failure(&self, error: &ForwardError) {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if last.is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL) {
            *last = Some(now);
            tracing::warn!(error = %error, "DNS query forwarded upstream failed; the client got SERVFAIL");
        }
    }
}

/// One pod's bound DNS listeners; [`PodListeners::spawn`] serves them until the pod leaves.
#[derive(Debug)]
pub struct PodListeners {
    dns: Arc<PodDns>,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    stop: CancellationToken,
}

impl PodListeners {
    pub fn spawn(self) {
        for socket in self.udp {
            tokio::spawn(serve_udp(self.dns.clone(), socket, self.stop.clone()));
        }
        for listener in self.tcp {
            tokio::spawn(serve_tcp(self.dns.clone(), listener, self.stop.clone()));
        }
    }
}

/// The DNS proxy as one pod sees it: its search path, its upstream sockets, its cache.
#[derive(Debug)]
pub struct PodDns {
    proxy: Arc<DnsProxy>,
    uid: String,
    search: SearchPath,
    network: Arc<dyn PodNetwork>,
    cache: Mutex<Cache>,
    in_flight: Arc<Semaphore>,
}

/// How a query was answered, for the access log.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Mesh,
    Cached,
    Forwarded,
    Failed,
}

impl PodDns {
    /// Answers one query (the DNS message as received): `None` when nothing should be sent
    /// back (not a query at all).
    pub async fn handle(&self, request: &[u8], protocol: Protocol) -> Option<Vec<u8>> {
        let message = match Message::from_vec(request) {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(target: "dns", pod = %self.uid, error = %e, "malformed DNS query");
                let reply = format_error(request);
                self.dropped(if reply.is_some() {
                    DropReason::FormErr
                } else {
                    DropReason::Malformed
                });
                return reply;
            }
        };
        if message.message_type() != MessageType::Query {
            self.dropped(DropReason::Malformed);
            return None;
        }
        if message.op_code() != OpCode::Query {
            return encode(
                &reply_to(&message, ResponseCode::NotImp),
                &message,
                protocol,
            );
        }
        let [query] = message.queries() else {
            self.dropped(DropReason::FormErr);
            return encode(
                &reply_to(&message, ResponseCode::FormErr),
                &message,
                protocol,
            );
        };
        let state = self.proxy.store.snapshot();
        let labels = DnsLabels::new(
            &query.query_type().to_string(),
            protocol.as_str(),
            state.workloads.get(&self.uid).map(AsRef::as_ref),
        );
        self.proxy.metrics.request(&labels);

        let family = match (query.query_class(), query.query_type()) {
            (DNSClass::IN, RecordType::A) => Some(Family::V4),
            (DNSClass::IN, RecordType::AAAA) => Some(Family::V6),
            _ => None,
        };
        if let Some(family) = family {
            let decision = resolve::decide(
                &state,
                &self.search,
                &self.proxy.config.cluster_domain,
                &query.name().to_ascii(),
                family,
            );
            if let Decision::Answer(answer) = decision {
                let response = mesh_response(&message, query, &answer);
                self.access_log(
                    query,
                    protocol,
                    Outcome::Mesh,
                    response.answers().len(),
                    None,
                );
                return encode(&response, &message, protocol);
            }
        }
        drop(state);

        let key = CacheKey::of(&message, query);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key);
        if let Some(cached) = cached {
            let response = from_cache(cached, &message);
            self.access_log(
                query,
                protocol,
                Outcome::Cached,
                response.answers().len(),
                None,
            );
            return encode(&response, &message, protocol);
        }
        self.forward(request, &message, query, key, protocol, &labels)
            .await
    }

    async fn forward(
        &self,
        request: &[u8],
        message: &Message,
        query: &Query,
        key: CacheKey,
        protocol: Protocol,
        labels: &DnsLabels,
    ) -> Option<Vec<u8>> {
        // Our own id upstream: the client's may be predictable, ours must not be.
        let id = fastrand::u16(..);
        let mut upstream_query = request.to_vec();
        upstream_query[..2].copy_from_slice(&id.to_be_bytes());
        let started = Instant::now();
        let result = forward::forward(
            self.network.as_ref(),
            &self.proxy.config.upstreams,
            protocol,
            &upstream_query,
            id,
            query,
            self.proxy.config.upstream_timeout,
        )
        .await;
        self.proxy
            .metrics
            .upstream(labels, started.elapsed(), result.is_err());
        match result {
            Ok(answer) => {
                self.cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key, &answer.message);
                self.access_log(
                    query,
                    protocol,
                    Outcome::Forwarded,
                    answer.message.answers().len(),
                    None,
                );
                reply_from_upstream(answer, message, protocol)
            }
            Err(e) => {
                self.proxy.warn_upstream_failure(&e);
                self.access_log(query, protocol, Outcome::Failed, 0, Some(&e));
                encode(
                    &reply_to(message, ResponseCode::ServFail),
                    message,
                    protocol,
                )
            }
        }
    }

    /// Counts a message not handled as a query (`mesh_dns_dropped_total`).
    fn dropped(&self, reason: DropReason) {
        self.proxy.metrics.dropped(reason);
    }

    /// One line per query on the `dns` target (at debug, as Istio's ztunnel).
    fn access_log(
        &self,
        query: &Query,
        protocol: Protocol,
        outcome: Outcome,
        answers: usize,
        error: Option<&ForwardError>,
    ) {
        tracing::debug!(
            target: "dns",
            pod = %self.uid,
            query = %query.query_type(),
            domain = %query.name(),
            protocol = protocol.as_str(),
            result = ?outcome,
            answers,
            error = error.map(tracing::field::display),
        );
    }
}

/// The upstream's answer as the client gets it: the bytes as received with the client's id,
/// when they fit and still read as what was parsed, else re-encoded from the parsed message.
/// The id is part of what a name compressed with a pointer into the header (offset 0 or 1)
/// reads, so a hostile or broken upstream's answer can mean something else, or nothing, once
/// the id is changed; the client must never get bytes that are not the answer we accepted.
fn reply_from_upstream(
    mut answer: forward::Answer,
    request: &Message,
    protocol: Protocol,
) -> Option<Vec<u8>> {
    answer.bytes[..2].copy_from_slice(&request.id().to_be_bytes());
    answer.message.set_id(request.id());
    if answer.bytes.len() <= size_limit(request, protocol)
        && Message::from_vec(&answer.bytes).is_ok_and(|reread| reread == answer.message)
    {
        return Some(answer.bytes);
    }
    encode(&answer.message, request, protocol)
}

/// The largest response the client takes: its EDNS buffer (at least 512) over UDP.
fn size_limit(request: &Message, protocol: Protocol) -> usize {
    match protocol {
        Protocol::Udp => usize::from(request.max_payload()),
        Protocol::Tcp => usize::from(u16::MAX),
    }
}

/// Encodes `response`, truncated (header, question, TC bit) when it exceeds what the client
/// takes, so it retries over TCP. When even the question section does not fit (a query with
/// many questions, answered FORMERR with them echoed), the questions go too: header, OPT and
/// TC, which always fit in 512 bytes. The client never gets more than its buffer.
fn encode(response: &Message, request: &Message, protocol: Protocol) -> Option<Vec<u8>> {
    let limit = size_limit(request, protocol);
    match response.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Some(bytes),
        Ok(_) => fitted(&response.truncate(), limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a DNS response; answering SERVFAIL");
            fitted(&reply_to(request, ResponseCode::ServFail), limit)
        }
    }
}

/// `response` encoded within `limit` bytes: as it is, or without its questions (TC set).
fn fitted(response: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut bare = response.truncate();
    bare.take_queries();
    bare.to_vec().ok().filter(|bytes| bytes.len() <= limit)
}

/// A response to `request` with `code`, echoing its id, question, RD and CD bits, and an
/// EDNS record when the client sent one (RFC 6891).
fn reply_to(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(request.checking_disabled())
        .set_response_code(code);
    response.add_queries(request.queries().iter().cloned());
    if request.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD).set_version(0);
        response.set_edns(edns);
    }
    response
}

/// FORMERR for a message that does not parse, when at least its header does and it is not
/// itself a response (answering those could loop); otherwise nothing.
fn format_error(request: &[u8]) -> Option<Vec<u8>> {
    let header = request.get(..12)?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([header[0], header[1]]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// SERVFAIL for a query that cannot be handled now (too many in flight).
fn overloaded(request: &[u8]) -> Option<Vec<u8>> {
    let message = Message::from_vec(request).ok()?;
    if message.message_type() != MessageType::Query {
        return None;
    }
    let limit = size_limit(&message, Protocol::Udp);
    fitted(&reply_to(&message, ResponseCode::ServFail), limit)
}

/// The authoritative answer for a mesh name: the addresses (shuffled, as Istio, so clients
/// that take the first spread over a headless service's pods) under the queried name, or
/// under the alias with a CNAME to it.
fn mesh_response(request: &Message, query: &Query, answer: &MeshAnswer) -> Message {
    let mut response = reply_to(request, ResponseCode::NoError);
    response.set_authoritative(true);
    let mut owner = query.name().clone();
    if let Some(alias) = &answer.alias_of
        && let Ok(target) = Name::from_ascii(format!("{alias}."))
    {
        response.add_answer(Record::from_rdata(
            owner.clone(),
            MESH_TTL_SECONDS,
            RData::CNAME(CNAME(target.clone())),
        ));
        owner = target;
    }
    let mut addresses = answer.addresses.clone();
    fastrand::shuffle(&mut addresses);
    for ip in addresses {
        let data = match ip {
            IpAddr::V4(ip) => RData::A(A(ip)),
            IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
        };
        response.add_answer(Record::from_rdata(owner.clone(), MESH_TTL_SECONDS, data));
    }
    response
}

/// A cached upstream answer made the reply to `request`: its id, its question (as the client
/// spelled it), its RD and CD bits, and EDNS only if the client sent EDNS.
fn from_cache(mut cached: Message, request: &Message) -> Message {
    cached
        .set_id(request.id())
        .set_recursion_desired(request.recursion_desired())
        .set_checking_disabled(request.checking_disabled());
    *cached.queries_mut() = request.queries().to_vec();
    if request.extensions().is_none() {
        *cached.extensions_mut() = None;
    }
    cached
}

async fn serve_udp(dns: Arc<PodDns>, socket: UdpSocket, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let mut buffer = vec![0u8; 65535];
    loop {
        let (len, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(e) => {
                    tracing::debug!(pod = %dns.uid, error = %e, "DNS proxy: receiving failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let request = buffer[..len].to_vec();
        let Ok(permit) = dns.in_flight.clone().try_acquire_owned() else {
            dns.dropped(DropReason::Overload);
            if let Some(reply) = overloaded(&request) {
                let _ = socket.send_to(&reply, peer).await;
            }
            continue;
        };
        let (dns, socket) = (dns.clone(), socket.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = dns.handle(&request, Protocol::Udp).await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                tracing::debug!(pod = %dns.uid, %peer, error = %e, "DNS proxy: sending the answer failed");
            }
        });
    }
}

async fn serve_tcp(dns: Arc<PodDns>, listener: TcpListener, stop: CancellationToken) {
    // Accept errors (EMFILE and friends) back off instead of spinning.
    let mut acceptor = mesh::accept::Acceptor::new(listener, "dns_tcp");
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = acceptor.accept() => accepted,
        };
        tokio::spawn(serve_tcp_connection(dns.clone(), stream, stop.clone()));
    }
}

/// Queries on one TCP connection, answered in order (RFC 7766 framing: a two-byte length
/// before each message), until the client closes, idles or the pod leaves. A message cut
/// short of its length prefix (the client closed or idled) is counted as `truncated_tcp`.
async fn serve_tcp_connection(dns: Arc<PodDns>, mut stream: TcpStream, stop: CancellationToken) {
    let _ = stream.set_nodelay(true);
    loop {
        let len = tokio::select! {
            _ = stop.cancelled() => return,
            read = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()) => match read {
                Ok(Ok(len)) => len,
                _ => return,
            },
        };
        let mut request = vec![0u8; usize::from(len)];
        let complete = tokio::select! {
            _ = stop.cancelled() => return,
            read = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut request)) => {
                matches!(read, Ok(Ok(_)))
            }
        };
        if !complete {
            tracing::debug!(target: "dns", pod = %dns.uid, announced = len, "DNS query over TCP cut short");
            dns.dropped(DropReason::TruncatedTcp);
            return;
        }
        let Ok(_permit) = dns.in_flight.acquire().await else {
            return;
        };
        let Some(reply) = dns.handle(&request, Protocol::Tcp).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
