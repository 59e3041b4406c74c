//! ztunnel's DNS proxy on the virtual cluster (`mesh_tests::vcluster`): pods send ordinary DNS
//! queries to their resolver (port 53 of the `dns` pod, as a pod's resolv.conf would name
//! kube-dns), the capture rules redirect them to ztunnel's proxy on 15053 inside the pod, and
//! the proxy answers mesh names itself and forwards the rest to the `dns` pod, a fake upstream
//! that counts what reaches it. Each test builds its own cluster and needs root (skips without
//! it, fails under `CI=true`).
//!
//! What they show: `reviews`, `reviews.demo`, `reviews.demo.svc` and the full name resolve to
//! the VIP without the upstream seeing them, over UDP and TCP; other names are forwarded from
//! the pod's own address and cached for their TTL; a large answer is truncated over UDP and
//! complete over TCP; a silent upstream gives SERVFAIL within the configured deadline; pods
//! outside the mesh, and every pod with `DNS_CAPTURE=false`, reach the real resolver; the
//! queries show in Istio's `istio_dns_*` metrics; a pod connects through the mesh by the name
//! it resolved; a query flood, malformed packets and truncated TCP queries from one pod are
//! answered or dropped and counted (`mesh_dns_dropped_total`) while its neighbour keeps
//! resolving and ztunnel keeps running.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_tests::vcluster::{Cluster, ClusterBuilder, Metrics, Pod, eventually, needs_root};
use ztunnel::capture::NetNs;
use ztunnel::config::{DNS_CAPTURE, DNS_UPSTREAM_TIMEOUT, DNS_UPSTREAMS};
use ztunnel::dns::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use ztunnel::dns::proto::rr::rdata::{A, SOA};
use ztunnel::dns::proto::rr::{Name, RData, Record, RecordType};

/// The port of service `demo/reviews`.
const SERVICE_PORT: u16 = 9080;
/// What the fake upstream answers for any name in the cluster domain: never a VIP, so an
/// answer shows who gave it.
const UPSTREAM_CLUSTER_ANSWER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// What it answers for `*.example.test`, with [`EXAMPLE_TTL`].
const EXAMPLE_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const EXAMPLE_TTL: u32 = 60;
/// `big.example.test` has this many addresses: more than 512 bytes.
const BIG_ANSWERS: u8 = 40;
/// ztunnel's deadline for forwarded queries in these tests (`DNS_UPSTREAM_TIMEOUT_MS`).
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a client waits for any answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);

/// One node. `demo` is ambient: `client`, and `reviews` behind service `reviews`. `infra` is
/// not: `dns` (the fake upstream resolver, on port 53) and `outsider`. ztunnel forwards to the
/// `dns` pod.
fn cluster(dns_capture: bool) -> ClusterBuilder {
    Cluster::builder()
        .node("a")
        .namespace("demo")
        .ambient()
        .namespace("infra")
        .pod("a", "demo", "client")
        .pod("a", "demo", "reviews")
        .pod("a", "infra", "dns")
        .pod("a", "infra", "outsider")
        .service("demo", "reviews", SERVICE_PORT, SERVICE_PORT)
        .ztunnel_env(DNS_CAPTURE, &dns_capture.to_string())
        .ztunnel_env_pod_addr(DNS_UPSTREAMS, "dns", 53)
        .ztunnel_env(
            DNS_UPSTREAM_TIMEOUT,
            &UPSTREAM_TIMEOUT.as_millis().to_string(),
        )
}

/// The resolver every pod asks: port 53 of the `dns` pod.
fn resolver(cluster: &Cluster) -> SocketAddr {
    cluster.pod("dns").addr(53)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn query(host: &str, record_type: RecordType) -> Message {
    let mut message = Message::new();
    message
        .set_id(next_id())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name(host), record_type));
    message
}

fn next_id() -> u16 {
    // Distinct ids per query are all a test client needs.
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    NEXT.fetch_add(7919, Ordering::Relaxed)
}

/// Sends `request` to `server` from inside `pod`'s network namespace with plain sockets, as
/// an unmodified application's resolver does, and returns the answer. Over UDP the socket is
/// connected, so only an answer from `server` itself is accepted.
async fn ask(
    pod: &Pod,
    server: SocketAddr,
    request: &Message,
    transport: Transport,
) -> io::Result<Message> {
    let netns = NetNs::from_name(pod.netns().name()).map_err(io::Error::other)?;
    let bytes = request.to_vec().map_err(io::Error::other)?;
    let reply = tokio::task::spawn_blocking(move || {
        netns
            .run(|| exchange_blocking(server, &bytes, transport))
            .map_err(io::Error::other)?
    })
    .await
    .map_err(io::Error::other)??;
    let reply = Message::from_vec(&reply).map_err(io::Error::other)?;
    assert_eq!(
        reply.id(),
        request.id(),
        "the answer carries the query's id"
    );
    assert_eq!(reply.queries(), request.queries(), "and its question");
    Ok(reply)
}

fn exchange_blocking(
    server: SocketAddr,
    request: &[u8],
    transport: Transport,
) -> io::Result<Vec<u8>> {
    match transport {
        Transport::Udp => {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.connect(server)?;
            socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
            socket.send(request)?;
            let mut buffer = vec![0u8; 65535];
            let len = socket.recv(&mut buffer)?;
            buffer.truncate(len);
            Ok(buffer)
        }
        Transport::Tcp => {
            let mut stream = std::net::TcpStream::connect_timeout(&server, CLIENT_TIMEOUT)?;
            stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
            let len = u16::try_from(request.len()).map_err(io::Error::other)?;
            stream.write_all(&len.to_be_bytes())?;
            stream.write_all(request)?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len)?;
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut reply)?;
            Ok(reply)
        }
    }
}

fn addresses(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers()
        .iter()
        .filter_map(|record| match record.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

/// The fake upstream resolver: UDP and TCP on port 53 of a pod. Names in the cluster domain
/// get [`UPSTREAM_CLUSTER_ANSWER`], `big.example.test` [`BIG_ANSWERS`] addresses (truncated
/// over UDP without EDNS, as a real server does), other `*.example.test` names
/// [`EXAMPLE_ANSWER`]; anything else NXDOMAIN with an SOA. It records every query (name and
/// source address) and answers nothing while silent.
#[derive(Debug, Clone)]
struct FakeUpstream {
    seen: Arc<Mutex<Vec<(String, IpAddr)>>>,
    silent: Arc<AtomicBool>,
}

impl FakeUpstream {
    async fn start(pod: &Pod) -> Self {
        let (udp, tcp) = pod
            .run(|| {
                let udp = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 53))?;
                udp.set_nonblocking(true)?;
                let tcp = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 53))?;
                tcp.set_nonblocking(true)?;
                Ok::<_, io::Error>((udp, tcp))
            })
            .unwrap()
            .unwrap();
        let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
        let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
        let fake = Self {
            seen: Arc::new(Mutex::new(Vec::new())),
            silent: Arc::new(AtomicBool::new(false)),
        };
        let serving = fake.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 65535];
            while let Ok((len, peer)) = udp.recv_from(&mut buffer).await {
                if let Some(reply) = serving.answer(&buffer[..len], peer.ip(), Transport::Udp) {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
        });
        let serving = fake.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, peer)) = tcp.accept().await {
                let serving = serving.clone();
                tokio::spawn(async move {
                    while let Ok(len) = stream.read_u16().await {
                        let mut request = vec![0u8; usize::from(len)];
                        if stream.read_exact(&mut request).await.is_err() {
                            return;
                        }
                        let Some(reply) = serving.answer(&request, peer.ip(), Transport::Tcp)
                        else {
                            continue;
                        };
                        let len = u16::try_from(reply.len()).unwrap();
                        let _ = stream.write_all(&len.to_be_bytes()).await;
                        let _ = stream.write_all(&reply).await;
                    }
                });
            }
        });
        fake
    }

    fn answer(&self, request: &[u8], from: IpAddr, transport: Transport) -> Option<Vec<u8>> {
        let request = Message::from_vec(request).ok()?;
        let question = request.queries().first()?.clone();
        let host = question.name().to_ascii().to_ascii_lowercase();
        self.seen.lock().unwrap().push((host.clone(), from));
        if self.silent.load(Ordering::SeqCst) {
            return None;
        }
        let mut reply = request.clone();
        reply
            .set_message_type(MessageType::Response)
            .set_recursion_available(true);
        let owner = question.name().clone();
        let a = |ip: Ipv4Addr, ttl: u32| Record::from_rdata(owner.clone(), ttl, RData::A(A(ip)));
        if question.query_type() != RecordType::A {
            // NODATA for other types: enough for these tests.
        } else if host.ends_with(".cluster.local.") {
            reply.add_answer(a(UPSTREAM_CLUSTER_ANSWER, 5));
        } else if host == "big.example.test." {
            for i in 0..BIG_ANSWERS {
                reply.add_answer(a(Ipv4Addr::new(192, 0, 2, 100 + i), EXAMPLE_TTL));
            }
        } else if host.ends_with(".example.test.") {
            reply.add_answer(a(EXAMPLE_ANSWER, EXAMPLE_TTL));
        } else {
            reply.set_response_code(ResponseCode::NXDomain);
            reply.add_name_server(Record::from_rdata(
                name("test."),
                30,
                RData::SOA(SOA::new(
                    name("ns.test."),
                    name("admin.test."),
                    1,
                    3600,
                    600,
                    86400,
                    30,
                )),
            ));
        }
        let bytes = reply.to_vec().ok()?;
        if transport == Transport::Udp && bytes.len() > usize::from(request.max_payload()) {
            return reply.truncate().to_vec().ok();
        }
        Some(bytes)
    }

    /// How many queries for `host` (with the trailing dot) reached the upstream.
    fn count(&self, host: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(seen, _)| seen == host)
            .count()
    }

    /// Every query that reached it, by name.
    fn seen(&self) -> HashMap<String, Vec<IpAddr>> {
        let mut by_name: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (host, from) in self.seen.lock().unwrap().iter() {
            by_name.entry(host.clone()).or_default().push(*from);
        }
        by_name
    }
}

/// Waits until node `a`'s metrics satisfy `check`, returning them; panics with them otherwise.
async fn metrics_until(cluster: &Cluster, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
    let node = cluster.node("a");
    eventually(METRIC_TIMEOUT, || async {
        let metrics = node.metrics().await;
        if check(&metrics) {
            Ok(metrics)
        } else {
            Err(metrics)
        }
    })
    .await
    .unwrap_or_else(|metrics| panic!("{what}:\n{}", metrics.text()))
}

#[tokio::test]
async fn mesh_names_resolve_to_the_vip_in_the_pod() {
    if !needs_root() {
        return;
    }
    let cluster = cluster(true).build().await.unwrap();
    let upstream = FakeUpstream::start(cluster.pod("dns")).await;
    let vip = cluster.vip("demo", "reviews");
    let client = cluster.pod("client");

    for transport in [Transport::Udp, Transport::Tcp] {
        for host in [
            "reviews.",
            "reviews.demo.",
            "reviews.demo.svc.",
            "reviews.demo.svc.cluster.local.",
        ] {
            let reply = ask(
                client,
                resolver(&cluster),
                &query(host, RecordType::A),
                transport,
            )
            .await
            .unwrap_or_else(|e| panic!("{host} over {transport:?}: {e}\n{}", cluster.logs()));
            assert_eq!(
                reply.response_code(),
                ResponseCode::NoError,
                "{host} {transport:?}"
            );
            assert!(reply.authoritative(), "{host}: answered by the mesh");
            assert_eq!(addresses(&reply), [vip], "{host} over {transport:?}");
            assert_eq!(reply.answers()[0].ttl(), ztunnel::dns::MESH_TTL_SECONDS);
        }
    }
    // The service has no IPv6 VIP: the name exists, with no AAAA (not NXDOMAIN).
    let reply = ask(
        client,
        resolver(&cluster),
        &query("reviews.", RecordType::AAAA),
        Transport::Udp,
    )
    .await
    .unwrap();
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    assert!(reply.answers().is_empty());
    assert!(
        upstream.seen().is_empty(),
        "mesh names never reach the upstream: {:?}",
        upstream.seen()
    );

    // A pod outside the mesh is not captured: its resolver answers.
    let reply = ask(
        cluster.pod("outsider"),
        resolver(&cluster),
        &query("reviews.demo.svc.cluster.local.", RecordType::A),
        Transport::Udp,
    )
    .await
    .unwrap();
    assert_eq!(addresses(&reply), [IpAddr::V4(UPSTREAM_CLUSTER_ANSWER)]);
    assert_eq!(upstream.count("reviews.demo.svc.cluster.local."), 1);

    // Eight A queries and one AAAA, from `client`, none forwarded.
    let from_client = [("source_canonical_service", "client")];
    let metrics = metrics_until(&cluster, "DNS queries counted", |m| {
        m.sum("istio_dns_requests_total", &from_client) >= 9.0
    })
    .await;
    let count = |labels: &[(&str, &str)]| metrics.sum("istio_dns_requests_total", labels);
    assert_eq!(count(&from_client), 9.0, "{}", metrics.text());
    assert_eq!(
        count(&[("request_protocol", "udp"), ("request_query_type", "a")]),
        4.0
    );
    assert_eq!(
        count(&[("request_protocol", "tcp"), ("request_query_type", "a")]),
        4.0
    );
    assert_eq!(count(&[("request_query_type", "aaaa")]), 1.0);
    assert_eq!(metrics.sum("istio_dns_upstream_requests_total", &[]), 0.0);

    // Then the pod connects by those names: the answer leads through the mesh to the echo
    // server behind the service, and the destination side sees the client's identity.
    let _server = cluster
        .pod("reviews")
        .serve_echo(SERVICE_PORT)
        .await
        .unwrap();
    for host in ["reviews.", "reviews.demo.svc.cluster.local."] {
        let reply = ask(
            client,
            resolver(&cluster),
            &query(host, RecordType::A),
            Transport::Udp,
        )
        .await
        .unwrap();
        let [resolved] = addresses(&reply)[..] else {
            panic!("{host}: one address expected: {reply:?}")
        };
        assert_eq!(resolved, vip);
        let to = SocketAddr::new(resolved, SERVICE_PORT);
        let echoed = client
            .exchange(to, host.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{host} -> {to}: {e}\n{}", cluster.logs()));
        assert_eq!(echoed, host.as_bytes(), "{host} -> {to}");
    }
    let (source, destination) = (client.identity(), cluster.pod("reviews").identity());
    metrics_until(&cluster, "both connections through the mesh", |m| {
        m.sum(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &source),
                ("destination_principal", &destination),
            ],
        ) >= 2.0
    })
    .await;
}

#[tokio::test]
async fn other_names_are_forwarded_from_the_pod_and_cached() {
    if !needs_root() {
        return;
    }
    let cluster = cluster(true).build().await.unwrap();
    let upstream = FakeUpstream::start(cluster.pod("dns")).await;
    let client = cluster.pod("client");
    let www = "www.example.test.";

    let first = ask(
        client,
        resolver(&cluster),
        &query(www, RecordType::A),
        Transport::Udp,
    )
    .await
    .unwrap_or_else(|e| panic!("{www}: {e}\n{}", cluster.logs()));
    assert_eq!(addresses(&first), [IpAddr::V4(EXAMPLE_ANSWER)]);
    assert!(!first.authoritative());
    assert_eq!(upstream.count(www), 1);
    assert_eq!(
        upstream.seen()[www],
        [client.ip()],
        "forwarded from the client pod's own address (its namespace)"
    );

    // Within the TTL: from ztunnel's cache, over UDP and TCP.
    for transport in [Transport::Udp, Transport::Tcp] {
        let again = ask(
            client,
            resolver(&cluster),
            &query(www, RecordType::A),
            transport,
        )
        .await
        .unwrap();
        assert_eq!(addresses(&again), [IpAddr::V4(EXAMPLE_ANSWER)]);
        assert!(again.answers()[0].ttl() <= EXAMPLE_TTL);
    }
    assert_eq!(
        upstream.count(www),
        1,
        "the cached answer did not reach the upstream"
    );

    // NXDOMAIN comes back as the upstream said.
    let missing = ask(
        client,
        resolver(&cluster),
        &query("missing.invalid.", RecordType::A),
        Transport::Udp,
    )
    .await
    .unwrap();
    assert_eq!(missing.response_code(), ResponseCode::NXDomain);

    // Too large for UDP without EDNS: truncated, so the client retries over TCP and gets it all.
    let big = "big.example.test.";
    let truncated = ask(
        client,
        resolver(&cluster),
        &query(big, RecordType::A),
        Transport::Udp,
    )
    .await
    .unwrap();
    assert!(truncated.truncated(), "TC set: {truncated:?}");
    assert!(truncated.answers().is_empty());
    let whole = ask(
        client,
        resolver(&cluster),
        &query(big, RecordType::A),
        Transport::Tcp,
    )
    .await
    .unwrap();
    assert!(!whole.truncated());
    assert_eq!(addresses(&whole).len(), usize::from(BIG_ANSWERS));
    // With a large EDNS buffer, UDP carries it too (the cached TCP answer fits).
    let mut large = query(big, RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    large.set_edns(edns);
    let whole = ask(client, resolver(&cluster), &large, Transport::Udp)
        .await
        .unwrap();
    assert_eq!(addresses(&whole).len(), usize::from(BIG_ANSWERS));

    // www (1), missing (1), big over UDP (1, truncated: not cached) and over TCP (1).
    let metrics = metrics_until(&cluster, "forwarded queries counted", |m| {
        m.sum("istio_dns_upstream_requests_total", &[]) >= 4.0
    })
    .await;
    assert_eq!(
        metrics.sum("istio_dns_upstream_requests_total", &[]),
        4.0,
        "{}",
        metrics.text()
    );
    assert_eq!(metrics.sum("istio_dns_upstream_failures_total", &[]), 0.0);
    assert_eq!(
        metrics.sum(
            "istio_dns_requests_total",
            &[("source_canonical_service", "client")]
        ),
        7.0
    );
    assert_eq!(
        metrics.sum("istio_dns_upstream_request_duration_seconds_count", &[]),
        4.0
    );
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail_in_bounded_time() {
    if !needs_root() {
        return;
    }
    let cluster = cluster(true).build().await.unwrap();
    let upstream = FakeUpstream::start(cluster.pod("dns")).await;
    upstream.silent.store(true, Ordering::SeqCst);
    let client = cluster.pod("client");

    for transport in [Transport::Udp, Transport::Tcp] {
        let started = Instant::now();
        let reply = ask(
            client,
            resolver(&cluster),
            &query("slow.example.test.", RecordType::A),
            transport,
        )
        .await
        .unwrap_or_else(|e| panic!("{transport:?}: no answer at all ({e}): SERVFAIL expected"));
        let took = started.elapsed();
        assert_eq!(
            reply.response_code(),
            ResponseCode::ServFail,
            "{transport:?}"
        );
        assert!(
            took < UPSTREAM_TIMEOUT + Duration::from_secs(1),
            "{transport:?}: SERVFAIL after {took:?}"
        );
    }
    assert!(
        upstream.count("slow.example.test.") >= 2,
        "the upstream was asked"
    );

    // The upstream recovers: the failure was not cached.
    upstream.silent.store(false, Ordering::SeqCst);
    let reply = ask(
        client,
        resolver(&cluster),
        &query("slow.example.test.", RecordType::A),
        Transport::Udp,
    )
    .await
    .unwrap();
    assert_eq!(addresses(&reply), [IpAddr::V4(EXAMPLE_ANSWER)]);

    let metrics = metrics_until(&cluster, "failures counted", |m| {
        m.sum("istio_dns_upstream_failures_total", &[]) >= 2.0
    })
    .await;
    assert_eq!(
        metrics.sum("istio_dns_upstream_failures_total", &[]),
        2.0,
        "{}",
        metrics.text()
    );
}

#[tokio::test]
async fn dns_capture_off_leaves_queries_alone() {
    if !needs_root() {
        return;
    }
    let cluster = cluster(false).build().await.unwrap();
    let upstream = FakeUpstream::start(cluster.pod("dns")).await;
    let client = cluster.pod("client");
    for transport in [Transport::Udp, Transport::Tcp] {
        let reply = ask(
            client,
            resolver(&cluster),
            &query("reviews.demo.svc.cluster.local.", RecordType::A),
            transport,
        )
        .await
        .unwrap();
        assert_eq!(
            addresses(&reply),
            [IpAddr::V4(UPSTREAM_CLUSTER_ANSWER)],
            "{transport:?}: the pod's resolver answered, not ztunnel"
        );
    }
    assert_eq!(
        upstream.seen()["reviews.demo.svc.cluster.local."],
        [client.ip(), client.ip()]
    );
    // The rest of the capture still works: the pod reaches the service's VIP.
    let _server = cluster
        .pod("reviews")
        .serve_echo(SERVICE_PORT)
        .await
        .unwrap();
    let echoed = client
        .exchange(
            cluster.service_addr("demo", "reviews", SERVICE_PORT),
            b"hello",
        )
        .await
        .unwrap();
    assert_eq!(echoed, b"hello");
    let metrics = cluster.node("a").metrics().await;
    assert_eq!(metrics.sum("istio_dns_requests_total", &[]), 0.0);
}

/// How many UDP queries the flooding pod fires, and over about how long.
const FLOOD_QUERIES: usize = 5000;
const FLOOD_FOR: Duration = Duration::from_secs(2);
/// How long the neighbour may wait for a mesh answer while the flood goes on.
const NEIGHBOUR_BOUND: Duration = Duration::from_secs(2);

/// The bad input `flooder` sends from its own namespace: [`FLOOD_QUERIES`] UDP queries for
/// distinct non-mesh names (the upstream is silent, so each stays in flight for the whole
/// upstream deadline) with malformed packets in between, fired without waiting for answers
/// over about [`FLOOD_FOR`], and `truncated` TCP queries that announce more than they send.
fn flood_blocking(server: SocketAddr, truncated: usize) -> io::Result<()> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(server)?;
    socket.set_nonblocking(true)?;
    let batches = 100;
    let per_batch = FLOOD_QUERIES / batches;
    let pause = FLOOD_FOR / u32::try_from(batches).unwrap();
    let mut truncated_sent = 0;
    for batch in 0..batches {
        for i in 0..per_batch {
            let host = format!("flood{}.example.test.", batch * per_batch + i);
            let bytes = query(&host, RecordType::A).to_vec().unwrap();
            // A full socket buffer drops the query, as a real flood would.
            let _ = socket.send(&bytes);
        }
        let _ = socket.send(&[0xde, 0xad]);
        let _ = socket.send(&formerr_bait());
        if truncated_sent < truncated && batch % 4 == 0 {
            send_truncated_tcp(server)?;
            truncated_sent += 1;
        }
        std::thread::sleep(pause);
    }
    while truncated_sent < truncated {
        send_truncated_tcp(server)?;
        truncated_sent += 1;
    }
    Ok(())
}

/// A readable query header followed by garbage: the proxy answers FORMERR.
fn formerr_bait() -> Vec<u8> {
    let mut bytes = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    bytes.extend_from_slice(&[0xff; 7]);
    bytes
}

/// Announces a 100-byte query over TCP, sends 10 bytes and closes.
fn send_truncated_tcp(server: SocketAddr) -> io::Result<()> {
    let mut stream = std::net::TcpStream::connect_timeout(&server, CLIENT_TIMEOUT)?;
    stream.write_all(&100u16.to_be_bytes())?;
    stream.write_all(&[0u8; 10])?;
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    // The proxy closes its side without answering.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    assert!(rest.is_empty(), "no answer to a truncated query: {rest:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_and_bad_input_from_one_pod_leave_its_neighbours_resolving() {
    if !needs_root() {
        return;
    }
    let cluster = cluster(true)
        .pod("a", "demo", "flooder")
        .build()
        .await
        .unwrap();
    let upstream = FakeUpstream::start(cluster.pod("dns")).await;
    upstream.silent.store(true, Ordering::SeqCst);
    let vip = cluster.vip("demo", "reviews");
    let server = resolver(&cluster);
    const TRUNCATED: usize = 20;

    let netns = NetNs::from_name(cluster.pod("flooder").netns().name()).unwrap();
    let flood = tokio::task::spawn_blocking(move || {
        netns
            .run(|| flood_blocking(server, TRUNCATED))
            .map_err(io::Error::other)?
    });

    // Meanwhile the neighbour (`client`, same node) keeps resolving a mesh name, promptly.
    let neighbour = cluster.pod("client");
    let mut answered = 0;
    let mut slowest = Duration::ZERO;
    while !flood.is_finished() {
        let started = Instant::now();
        let reply = ask(
            neighbour,
            server,
            &query("reviews.demo.svc.cluster.local.", RecordType::A),
            Transport::Udp,
        )
        .await
        .unwrap_or_else(|e| panic!("the neighbour got no answer during the flood: {e}"));
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert_eq!(addresses(&reply), [vip]);
        assert!(
            took < NEIGHBOUR_BOUND,
            "the neighbour waited {took:?} during the flood"
        );
        answered += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flood.await.unwrap().unwrap();
    assert!(
        answered >= 5,
        "the neighbour asked {answered} times during the flood"
    );
    eprintln!("neighbour: {answered} answers during the flood, slowest {slowest:?}");

    // Once the flood's queries have timed out upstream (its pod answers a mesh name again
    // rather than SERVFAIL for overload), bad input is counted by kind.
    let flooder = cluster.pod("flooder");
    eventually(Duration::from_secs(20), || async {
        match ask(
            flooder,
            server,
            &query("reviews.", RecordType::A),
            Transport::Udp,
        )
        .await
        {
            Ok(reply) if reply.response_code() == ResponseCode::NoError => Ok(()),
            other => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(format!("{other:?}"))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("the flooder's DNS did not recover: {e}\n{}", cluster.logs()));
    const PACED: usize = 20;
    let netns = NetNs::from_name(cluster.pod("flooder").netns().name()).unwrap();
    tokio::task::spawn_blocking(move || {
        netns.run(|| {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            socket.connect(server).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let mut buffer = [0u8; 512];
            for _ in 0..PACED {
                // The FORMERR answer, with the bait's id. On a loaded machine the flood's
                // queries still queued in the socket can fill the in-flight cap again, and an
                // unparseable message that finds it full is dropped unanswered (there is no
                // question to SERVFAIL): the pair is sent again, a few times.
                let len = (0..10)
                    .find_map(|_| {
                        socket.send(&[0xde, 0xad]).unwrap();
                        socket.send(&formerr_bait()).unwrap();
                        socket.recv(&mut buffer).ok()
                    })
                    .expect("FORMERR for a query with a readable header, within 10 tries");
                let reply = Message::from_vec(&buffer[..len]).unwrap();
                assert_eq!(reply.response_code(), ResponseCode::FormErr);
                assert_eq!(reply.id(), 0x1234);
            }
        })
    })
    .await
    .unwrap()
    .unwrap();

    let node = cluster.node("a");
    assert!(
        node.exit_status().is_none(),
        "ztunnel exited under the flood:\n{}",
        cluster.logs()
    );
    let dropped =
        |m: &Metrics, reason: &str| m.sum("mesh_dns_dropped_total", &[("reason", reason)]);
    let metrics = metrics_until(&cluster, "bad input counted", |m| {
        dropped(m, "malformed") >= PACED as f64
            && dropped(m, "formerr") >= PACED as f64
            && dropped(m, "truncated_tcp") >= TRUNCATED as f64
            && dropped(m, "overload") >= 1.0
    })
    .await;
    eprintln!(
        "dropped: malformed {}, formerr {}, overload {}, truncated_tcp {}",
        dropped(&metrics, "malformed"),
        dropped(&metrics, "formerr"),
        dropped(&metrics, "overload"),
        dropped(&metrics, "truncated_tcp"),
    );
    assert_eq!(dropped(&metrics, "truncated_tcp"), TRUNCATED as f64);
    assert!(
        upstream.seen().len() < FLOOD_QUERIES,
        "the cap kept part of the flood from the upstream"
    );

    // Afterwards both pods resolve normally, the flooder too.
    for pod in ["flooder", "client"] {
        let reply = ask(
            cluster.pod(pod),
            server,
            &query("reviews.", RecordType::A),
            Transport::Tcp,
        )
        .await
        .unwrap();
        assert_eq!(addresses(&reply), [vip], "{pod}");
    }
    assert!(node.exit_status().is_none());
}
