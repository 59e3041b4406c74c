//! The DNS proxy's decisions (tables over a state), its cache (with a hand-moved clock) and its
//! message handling against fake upstreams on loopback.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use mesh::discovery::StoreWriter;
use mesh::model::{Endpoint, Service, State};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::cache::{Cache, CacheKey, Clock, cache_ttl};
use super::metrics::DnsMetrics;
use super::resolve::{Decision, Family, MeshAnswer, SearchPath, decide};
use super::*;
use crate::pods::HostNetwork;

const CLUSTER_DOMAIN: &str = "cluster.local";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn service(namespace: &str, name: &str, vips: &[&str], endpoints: &[(&str, bool)]) -> Service {
    Service {
        name: name.into(),
        namespace: namespace.into(),
        hostname: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        vips: vips.iter().map(|v| ip(v)).collect(),
        ports: Vec::new(),
        endpoints: endpoints
            .iter()
            .map(|(address, ready)| Endpoint {
                workload_uid: None,
                ip: ip(address),
                ready: *ready,
                ports: BTreeMap::new(),
            })
            .collect(),
        labels: BTreeMap::new(),
        waypoint: None,
    }
}

/// `demo/reviews` (VIP), `demo/dual` (two VIPs), `other/ratings` (VIP), `demo/db` (headless,
/// two ready endpoints and one not ready), `demo/ext` (no VIP, no endpoint: ExternalName-like),
/// `demo/big` (headless, 60 ready endpoints).
fn state() -> State {
    let big: Vec<String> = (0..60).map(|i| format!("10.2.0.{}", i + 1)).collect();
    let big: Vec<(&str, bool)> = big.iter().map(|a| (a.as_str(), true)).collect();
    let mut state = State::default();
    for service in [
        service("demo", "reviews", &["10.96.0.5"], &[("10.1.0.7", true)]),
        service("demo", "dual", &["10.96.0.6", "fd00::6"], &[]),
        service("other", "ratings", &["10.96.0.9"], &[]),
        service(
            "demo",
            "db",
            &[],
            &[
                ("10.1.0.20", true),
                ("10.1.0.21", true),
                ("10.1.0.22", false),
            ],
        ),
        service("demo", "ext", &[], &[]),
        service("demo", "big", &[], &big),
    ] {
        state.services.insert(service.key(), Arc::new(service));
    }
    state
}

#[test]
fn kubelet_search_path_and_ndots() {
    let search = SearchPath::kubelet("demo", "cluster.local.");
    assert_eq!(
        search.domains,
        [
            "demo.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local"
        ]
    );
    assert_eq!(search.ndots, 5);
    // Fewer dots than ndots: the search domains first, the name as is last.
    assert_eq!(
        search.candidates("reviews."),
        [
            "reviews.demo.svc.cluster.local",
            "reviews.svc.cluster.local",
            "reviews.cluster.local",
            "reviews",
        ]
    );
    // At least ndots dots: as is first.
    assert_eq!(
        search.candidates("a.b.c.d.e.f")[0],
        "a.b.c.d.e.f",
        "{:?}",
        search.candidates("a.b.c.d.e.f")
    );
    let lower = SearchPath {
        ndots: 1,
        ..search.clone()
    };
    assert_eq!(lower.candidates("reviews.demo")[0], "reviews.demo");
    assert_eq!(
        lower.candidates("reviews.demo")[1],
        "reviews.demo.demo.svc.cluster.local"
    );
    assert!(search.candidates(".").is_empty());
}

#[test]
fn mesh_names_and_what_is_forwarded() {
    let state = state();
    let answer = |addresses: &[&str], alias_of: Option<&str>, service: &str| {
        Decision::Answer(MeshAnswer {
            service: service.into(),
            alias_of: alias_of.map(str::to_owned),
            addresses: addresses.iter().map(|a| ip(a)).collect(),
        })
    };
    let reviews = answer(&["10.96.0.5"], None, "demo/reviews");
    let cases: Vec<(&str, &str, Family, Decision)> = vec![
        // The forms the pod's search path expands, and the full name.
        ("demo", "reviews.", Family::V4, reviews.clone()),
        ("demo", "reviews.demo.", Family::V4, reviews.clone()),
        ("demo", "reviews.demo.svc.", Family::V4, reviews.clone()),
        (
            "demo",
            "reviews.demo.svc.cluster.local.",
            Family::V4,
            reviews.clone(),
        ),
        (
            "demo",
            "Reviews.DEMO.svc.Cluster.Local.",
            Family::V4,
            reviews.clone(),
        ),
        // Another namespace's service needs its namespace in the name.
        ("other", "reviews.", Family::V4, Decision::Forward),
        ("other", "reviews.demo.", Family::V4, reviews.clone()),
        (
            "demo",
            "ratings.other.",
            Family::V4,
            answer(&["10.96.0.9"], None, "other/ratings"),
        ),
        // A name the client's resolver already expanded with a search domain: CNAME to the
        // name as typed (Istio).
        (
            "demo",
            "reviews.demo.demo.svc.cluster.local.",
            Family::V4,
            answer(&["10.96.0.5"], Some("reviews.demo"), "demo/reviews"),
        ),
        // The name exists, without an IPv6 address: NODATA, not forwarded.
        (
            "demo",
            "reviews.",
            Family::V6,
            answer(&[], None, "demo/reviews"),
        ),
        (
            "demo",
            "dual.",
            Family::V6,
            answer(&["fd00::6"], None, "demo/dual"),
        ),
        // Headless: the ready endpoints.
        (
            "demo",
            "db.demo.svc.cluster.local.",
            Family::V4,
            answer(&["10.1.0.20", "10.1.0.21"], None, "demo/db"),
        ),
        // No VIP and no ready endpoint (ExternalName, or a headless service with no ready
        // pod): kube-dns knows.
        ("demo", "ext.", Family::V4, Decision::Forward),
        // Not mesh names.
        ("demo", "example.com.", Family::V4, Decision::Forward),
        (
            "demo",
            "nothere.demo.svc.cluster.local.",
            Family::V4,
            Decision::Forward,
        ),
        (
            "demo",
            "reviews.demo.svc.cluster.local.example.",
            Family::V4,
            Decision::Forward,
        ),
        // Pod hostnames of headless services are left to kube-dns.
        (
            "demo",
            "db-0.db.demo.svc.cluster.local.",
            Family::V4,
            Decision::Forward,
        ),
        ("demo", ".", Family::V4, Decision::Forward),
    ];
    for (namespace, name, family, expected) in cases {
        let search = SearchPath::kubelet(namespace, CLUSTER_DOMAIN);
        assert_eq!(
            decide(&state, &search, CLUSTER_DOMAIN, name, family),
            expected,
            "{name} {family:?} from {namespace}"
        );
    }
}

#[test]
fn resolv_conf_nameservers() {
    let text = "# generated\nsearch demo.svc.cluster.local svc.cluster.local\n\
                nameserver 10.96.0.10\nnameserver   fd00::10\nnameserver fe80::1%eth0\n\
                options ndots:5\n;nameserver 1.2.3.4\nnameserver\n";
    assert_eq!(
        nameservers_from_resolv_conf(text),
        vec![
            "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
            "[fd00::10]:53".parse().unwrap()
        ]
    );
}

/// A clock the test moves.
#[derive(Debug)]
struct ManualClock(std::sync::Mutex<Instant>);

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(Self(std::sync::Mutex::new(Instant::now())))
    }

    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn query(host: &str, record_type: RecordType) -> Message {
    let mut message = Message::new();
    message
        .set_id(fastrand::u16(..))
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name(host), record_type));
    message
}

fn a_response(request: &Message, ttl: u32, addresses: &[&str]) -> Message {
    let mut response = request.clone();
    response.set_message_type(MessageType::Response);
    for address in addresses {
        let IpAddr::V4(v4) = ip(address) else {
            panic!("IPv4 only")
        };
        let owner = request.queries()[0].name().clone();
        response.add_answer(Record::from_rdata(owner, ttl, RData::A(A(v4))));
    }
    response
}

fn soa(ttl: u32, minimum: u32) -> Record {
    Record::from_rdata(
        name("example."),
        ttl,
        RData::SOA(SOA::new(
            name("ns.example."),
            name("admin.example."),
            1,
            3600,
            600,
            86400,
            minimum,
        )),
    )
}

fn nxdomain(request: &Message, soa_record: Option<Record>) -> Message {
    let mut response = request.clone();
    response
        .set_message_type(MessageType::Response)
        .set_response_code(ResponseCode::NXDomain);
    if let Some(record) = soa_record {
        response.add_name_server(record);
    }
    response
}

#[test]
fn cache_keeps_answers_for_their_ttl() {
    let clock = ManualClock::new();
    let mut cache = Cache::new(16, clock.clone());
    let request = query("www.example.", RecordType::A);
    let key = CacheKey::of(&request, &request.queries()[0]);
    let response = a_response(&request, 60, &["192.0.2.1"]);
    assert_eq!(
        cache.insert(key.clone(), &response),
        Some(Duration::from_secs(60))
    );

    clock.advance(Duration::from_secs(10));
    let cached = cache.get(&key).expect("cached within the TTL");
    assert_eq!(cached.answers()[0].ttl(), 50, "TTL counts down");

    // The same name in another case is the same question; another type is not.
    let upper = query("WWW.Example.", RecordType::A);
    assert!(
        cache
            .get(&CacheKey::of(&upper, &upper.queries()[0]))
            .is_some()
    );
    let aaaa = query("www.example.", RecordType::AAAA);
    assert!(
        cache
            .get(&CacheKey::of(&aaaa, &aaaa.queries()[0]))
            .is_none()
    );

    clock.advance(Duration::from_secs(50));
    assert!(cache.get(&key).is_none(), "expired at the TTL");
    assert!(cache.is_empty(), "expired entries are removed");
}

#[test]
fn what_may_be_cached_and_for_how_long() {
    let request = query("nx.example.", RecordType::A);
    // Negative answers: the SOA's TTL, capped by its minimum (RFC 2308).
    assert_eq!(
        cache_ttl(&nxdomain(&request, Some(soa(300, 30)))),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        cache_ttl(&nxdomain(&request, Some(soa(20, 900)))),
        Some(Duration::from_secs(20))
    );
    assert_eq!(
        cache_ttl(&nxdomain(&request, None)),
        None,
        "no SOA, no negative caching"
    );
    // NODATA is negative too.
    let mut nodata = a_response(&request, 0, &[]);
    nodata.add_name_server(soa(60, 60));
    assert_eq!(cache_ttl(&nodata), Some(Duration::from_secs(60)));
    // Capped.
    assert_eq!(
        cache_ttl(&a_response(&request, 7 * 24 * 3600, &["192.0.2.1"])),
        Some(cache::MAX_TTL)
    );
    assert_eq!(
        cache_ttl(&nxdomain(&request, Some(soa(86400, 86400)))),
        Some(cache::MAX_NEGATIVE_TTL)
    );
    // Never: failures, truncated answers, zero TTLs.
    let mut servfail = a_response(&request, 60, &["192.0.2.1"]);
    servfail.set_response_code(ResponseCode::ServFail);
    assert_eq!(cache_ttl(&servfail), None);
    let mut truncated = a_response(&request, 60, &["192.0.2.1"]);
    truncated.set_truncated(true);
    assert_eq!(cache_ttl(&truncated), None);
    assert_eq!(cache_ttl(&a_response(&request, 0, &["192.0.2.1"])), None);
    // The smallest TTL of the answer wins.
    let mut mixed = a_response(&request, 300, &["192.0.2.1"]);
    mixed.add_answer(Record::from_rdata(
        name("nx.example."),
        45,
        RData::A(A([192, 0, 2, 2].into())),
    ));
    assert_eq!(cache_ttl(&mixed), Some(Duration::from_secs(45)));
}

#[test]
fn a_full_cache_evicts_the_entry_closest_to_expiry() {
    let clock = ManualClock::new();
    let mut cache = Cache::new(2, clock.clone());
    let mut keys = Vec::new();
    for (host, ttl) in [("a.example.", 100), ("b.example.", 10), ("c.example.", 50)] {
        let request = query(host, RecordType::A);
        let key = CacheKey::of(&request, &request.queries()[0]);
        cache.insert(key.clone(), &a_response(&request, ttl, &["192.0.2.1"]));
        keys.push(key);
    }
    assert_eq!(cache.len(), 2);
    assert!(cache.get(&keys[0]).is_some());
    assert!(
        cache.get(&keys[1]).is_none(),
        "b expired soonest, so it went"
    );
    assert!(cache.get(&keys[2]).is_some());
}

/// A DNS server on loopback (UDP and TCP on one port) answering with `answer`, counting what it
/// receives; `None` from `answer` means silence.
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
}

type Answerer = Arc<dyn Fn(&Message) -> Option<Message> + Send + Sync>;

impl FakeUpstream {
    async fn start(answer: Answerer) -> Self {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let (counter, answerer) = (queries.clone(), answer.clone());
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 65535];
            while let Ok((len, peer)) = udp.recv_from(&mut buffer).await {
                counter.fetch_add(1, Ordering::SeqCst);
                let request = Message::from_vec(&buffer[..len]).unwrap();
                if let Some(response) = answerer(&request) {
                    let _ = udp.send_to(&response.to_vec().unwrap(), peer).await;
                }
            }
        });
        let (counter, answerer) = (queries.clone(), answer);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let (counter, answerer) = (counter.clone(), answerer.clone());
                tokio::spawn(async move {
                    while let Ok(len) = stream.read_u16().await {
                        let mut request = vec![0u8; usize::from(len)];
                        stream.read_exact(&mut request).await.unwrap();
                        counter.fetch_add(1, Ordering::SeqCst);
                        let request = Message::from_vec(&request).unwrap();
                        let Some(response) = answerer(&request) else {
                            continue;
                        };
                        let bytes = response.to_vec().unwrap();
                        stream.write_u16(bytes.len() as u16).await.unwrap();
                        stream.write_all(&bytes).await.unwrap();
                    }
                });
            }
        });
        Self { addr, queries }
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

/// `*.example.` -> 192.0.2.7 (TTL 60); anything else NXDOMAIN with an SOA (negative TTL 30).
fn example_answers() -> Answerer {
    Arc::new(|request: &Message| {
        let host = request.queries()[0].name().to_ascii().to_ascii_lowercase();
        Some(if host.ends_with(".example.") {
            a_response(request, 60, &["192.0.2.7"])
        } else {
            nxdomain(request, Some(soa(30, 30)))
        })
    })
}

struct Harness {
    dns: PodDns,
    clock: Arc<ManualClock>,
    registry: Registry,
}

fn harness(upstreams: Vec<SocketAddr>, timeout: Duration) -> Harness {
    let writer = StoreWriter::new();
    writer.apply(state());
    let clock = ManualClock::new();
    let mut registry = Registry::default();
    let config = DnsConfig {
        upstream_timeout: timeout,
        ..DnsConfig::new(CLUSTER_DOMAIN.into(), upstreams)
    };
    let proxy = Arc::new(DnsProxy::with_clock(
        config,
        writer.store(),
        DnsMetrics::new(&mut registry),
        clock.clone(),
    ));
    let dns = proxy.for_pod("demo/client", "demo", Arc::new(HostNetwork::default()));
    Harness {
        dns,
        clock,
        registry,
    }
}

impl Harness {
    async fn ask(&self, request: &Message, protocol: Protocol) -> Message {
        let reply = self
            .dns
            .handle(&request.to_vec().unwrap(), protocol)
            .await
            .expect("an answer");
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.id(), request.id(), "the client's id");
        assert_eq!(reply.message_type(), MessageType::Response);
        assert_eq!(reply.queries(), request.queries(), "the client's question");
        reply
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.registry, name, "")
    }

    fn dropped(&self, reason: &str) -> f64 {
        dropped(&self.registry, reason)
    }
}

/// The sum of `name`'s samples whose labels contain `labels` (`""`: all).
fn metric(registry: &Registry, name: &str, labels: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `mesh_dns_dropped_total{reason}`.
fn dropped(registry: &Registry, reason: &str) -> f64 {
    metric(
        registry,
        "mesh_dns_dropped_total",
        &format!("reason=\"{reason}\""),
    )
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

#[tokio::test]
async fn mesh_names_are_answered_without_the_upstream() {
    let upstream = FakeUpstream::start(example_answers()).await;
    let h = harness(vec![upstream.addr], Duration::from_secs(2));

    let request = query("reviews.", RecordType::A);
    let reply = h.ask(&request, Protocol::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    assert!(reply.authoritative());
    assert!(reply.recursion_available());
    assert_eq!(addresses(&reply), [ip("10.96.0.5")]);
    assert_eq!(reply.answers()[0].ttl(), MESH_TTL_SECONDS);
    assert_eq!(reply.answers()[0].name(), &name("reviews."));

    // A search-expanded name: CNAME to the short name, then the address under it.
    let reply = h
        .ask(
            &query("reviews.demo.demo.svc.cluster.local.", RecordType::A),
            Protocol::Udp,
        )
        .await;
    let RData::CNAME(target) = reply.answers()[0].data() else {
        panic!("expected a CNAME first: {reply:?}")
    };
    assert_eq!(target.0, name("reviews.demo."));
    assert_eq!(reply.answers()[1].name(), &name("reviews.demo."));
    assert_eq!(addresses(&reply), [ip("10.96.0.5")]);

    // AAAA of an IPv4-only service: NODATA.
    let reply = h
        .ask(&query("reviews.demo.svc.", RecordType::AAAA), Protocol::Udp)
        .await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    assert!(reply.answers().is_empty());

    // Headless: the ready endpoints.
    let reply = h.ask(&query("db.", RecordType::A), Protocol::Tcp).await;
    let mut found = addresses(&reply);
    found.sort();
    assert_eq!(found, [ip("10.1.0.20"), ip("10.1.0.21")]);

    assert_eq!(upstream.queries(), 0, "the upstream never asked");
    assert_eq!(h.metric("istio_dns_requests_total"), 4.0);
    assert_eq!(h.metric("istio_dns_upstream_requests_total"), 0.0);
}

#[tokio::test]
async fn other_names_and_types_are_forwarded_and_cached_for_their_ttl() {
    let upstream = FakeUpstream::start(example_answers()).await;
    let h = harness(vec![upstream.addr], Duration::from_secs(2));

    let reply = h
        .ask(&query("www.example.", RecordType::A), Protocol::Udp)
        .await;
    assert_eq!(addresses(&reply), [ip("192.0.2.7")]);
    assert!(!reply.authoritative());
    assert_eq!(upstream.queries(), 1);

    // Within the TTL: from the cache, with the TTL left and the client's spelling.
    h.clock.advance(Duration::from_secs(20));
    let reply = h
        .ask(&query("WWW.example.", RecordType::A), Protocol::Udp)
        .await;
    assert_eq!(addresses(&reply), [ip("192.0.2.7")]);
    assert_eq!(reply.answers()[0].ttl(), 40);
    assert_eq!(upstream.queries(), 1, "served from the cache");

    // After the TTL: asked again.
    h.clock.advance(Duration::from_secs(41));
    h.ask(&query("www.example.", RecordType::A), Protocol::Udp)
        .await;
    assert_eq!(upstream.queries(), 2, "expired, forwarded again");

    // NXDOMAIN comes back as is and is cached for the SOA's negative TTL.
    let reply = h
        .ask(&query("nothere.test.", RecordType::A), Protocol::Udp)
        .await;
    assert_eq!(reply.response_code(), ResponseCode::NXDomain);
    let reply = h
        .ask(&query("nothere.test.", RecordType::A), Protocol::Udp)
        .await;
    assert_eq!(reply.response_code(), ResponseCode::NXDomain);
    assert_eq!(upstream.queries(), 3);

    // Types other than A/AAAA go upstream even for mesh names, over TCP too.
    let reply = h
        .ask(
            &query("reviews.demo.svc.cluster.local.", RecordType::SRV),
            Protocol::Tcp,
        )
        .await;
    assert_eq!(reply.response_code(), ResponseCode::NXDomain);
    assert_eq!(upstream.queries(), 4);

    assert_eq!(h.metric("istio_dns_requests_total"), 6.0);
    assert_eq!(h.metric("istio_dns_upstream_requests_total"), 4.0);
    assert_eq!(h.metric("istio_dns_upstream_failures_total"), 0.0);
    assert_eq!(
        h.metric("istio_dns_upstream_request_duration_seconds_count"),
        4.0
    );
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail_in_time() {
    let upstream = FakeUpstream::start(Arc::new(|_: &Message| None)).await;
    let h = harness(vec![upstream.addr], Duration::from_millis(400));

    let started = Instant::now();
    let reply = h
        .ask(&query("www.example.", RecordType::A), Protocol::Udp)
        .await;
    let took = started.elapsed();
    assert_eq!(reply.response_code(), ResponseCode::ServFail);
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(upstream.queries(), 2, "one retry within the deadline");

    // TCP: the same.
    let reply = h
        .ask(&query("www.example.", RecordType::A), Protocol::Tcp)
        .await;
    assert_eq!(reply.response_code(), ResponseCode::ServFail);

    // Failures are not cached: the next query tries again.
    h.ask(&query("www.example.", RecordType::A), Protocol::Udp)
        .await;
    assert_eq!(upstream.queries(), 5);
    assert_eq!(h.metric("istio_dns_upstream_failures_total"), 3.0);
}

#[tokio::test]
async fn no_upstream_or_an_unreachable_one_gives_servfail() {
    let h = harness(Vec::new(), Duration::from_secs(1));
    let reply = h
        .ask(&query("www.example.", RecordType::A), Protocol::Udp)
        .await;
    assert_eq!(reply.response_code(), ResponseCode::ServFail);

    // Nothing listens there: the refusal (ICMP / RST) fails fast, not at the deadline.
    let closed = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let h = harness(vec![closed], Duration::from_secs(5));
    let started = Instant::now();
    let reply = h
        .ask(&query("www.example.", RecordType::A), Protocol::Tcp)
        .await;
    assert_eq!(reply.response_code(), ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_second_upstream_is_tried_when_the_first_fails() {
    let refusing = FakeUpstream::start(Arc::new(|request: &Message| {
        let mut response = request.clone();
        response
            .set_message_type(MessageType::Response)
            .set_response_code(ResponseCode::Refused);
        Some(response)
    }))
    .await;
    let working = FakeUpstream::start(example_answers()).await;
    let h = harness(vec![refusing.addr, working.addr], Duration::from_secs(2));
    let reply = h
        .ask(&query("www.example.", RecordType::A), Protocol::Udp)
        .await;
    assert_eq!(addresses(&reply), [ip("192.0.2.7")]);
    assert_eq!((refusing.queries(), working.queries()), (1, 1));
}

#[tokio::test]
async fn large_answers_are_truncated_for_udp_clients() {
    let upstream = FakeUpstream::start(example_answers()).await;
    let h = harness(vec![upstream.addr], Duration::from_secs(2));

    // 60 addresses do not fit in 512 bytes: TC, no answers, so the client retries over TCP.
    let reply = h
        .ask(
            &query("big.demo.svc.cluster.local.", RecordType::A),
            Protocol::Udp,
        )
        .await;
    assert!(reply.truncated());
    assert!(reply.answers().is_empty());
    // Over TCP, or with a large enough EDNS buffer, all of them.
    let reply = h
        .ask(
            &query("big.demo.svc.cluster.local.", RecordType::A),
            Protocol::Tcp,
        )
        .await;
    assert!(!reply.truncated());
    assert_eq!(addresses(&reply).len(), 60);
    let mut request = query("big.demo.svc.cluster.local.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    request.set_edns(edns);
    let reply = h.ask(&request, Protocol::Udp).await;
    assert!(!reply.truncated());
    assert_eq!(addresses(&reply).len(), 60);
    assert!(reply.extensions().is_some(), "EDNS answered with EDNS");
}

#[tokio::test]
async fn malformed_and_odd_messages() {
    let h = harness(Vec::new(), Duration::from_secs(1));
    // Garbage with a readable header: FORMERR with its id.
    let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xff; 7]);
    let reply = Message::from_vec(&h.dns.handle(&garbage, Protocol::Udp).await.unwrap()).unwrap();
    assert_eq!(reply.id(), 0x1234);
    assert_eq!(reply.response_code(), ResponseCode::FormErr);
    // Too short for a header, or a response: no reply at all.
    assert!(h.dns.handle(&[1, 2, 3], Protocol::Udp).await.is_none());
    let mut response = query("reviews.", RecordType::A);
    response.set_message_type(MessageType::Response);
    assert!(
        h.dns
            .handle(&response.to_vec().unwrap(), Protocol::Udp)
            .await
            .is_none()
    );
    garbage[2] |= 0x80;
    assert!(h.dns.handle(&garbage, Protocol::Udp).await.is_none());
    // Another opcode: NOTIMP.
    let mut notify = query("reviews.", RecordType::A);
    notify.set_op_code(OpCode::Notify);
    let reply = h.ask(&notify, Protocol::Udp).await;
    assert_eq!(reply.response_code(), ResponseCode::NotImp);
    // Two questions: FORMERR.
    let mut two = query("reviews.", RecordType::A);
    two.add_query(Query::query(name("db."), RecordType::A));
    let reply = Message::from_vec(
        &h.dns
            .handle(&two.to_vec().unwrap(), Protocol::Udp)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(reply.response_code(), ResponseCode::FormErr);
    // Forty long questions (found by the dns_message fuzz target): the FORMERR echoing them
    // would exceed a UDP client's 512 bytes, and so would the question section alone. The
    // client gets the header with TC and FORMERR, within its buffer; over TCP all of them.
    let mut many = query("reviews.", RecordType::A);
    for i in 0..40 {
        many.add_query(Query::query(
            name(&format!("a-rather-long-label-{i}.demo.svc.cluster.local.")),
            RecordType::AAAA,
        ));
    }
    let bytes = many.to_vec().unwrap();
    assert!(bytes.len() > 512);
    let reply = h.dns.handle(&bytes, Protocol::Udp).await.unwrap();
    assert!(
        reply.len() <= 512,
        "{} bytes to a 512-byte client",
        reply.len()
    );
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.id(), many.id());
    assert_eq!(reply.response_code(), ResponseCode::FormErr);
    assert!(reply.truncated(), "TC, so the client may retry over TCP");
    let reply = h.dns.handle(&bytes, Protocol::Tcp).await.unwrap();
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(
        reply.queries().len(),
        41,
        "over TCP the questions are echoed"
    );
    assert!(!reply.truncated());

    // Counted: garbage with a header, two questions and forty-one (twice) answered FORMERR;
    // the short message and both responses dropped. NOTIMP is an answer to a well-formed
    // query: not counted.
    assert_eq!(h.dropped("formerr"), 4.0);
    assert_eq!(h.dropped("malformed"), 3.0);
    assert_eq!(h.dropped("overload"), 0.0);
    assert_eq!(h.metric("mesh_dns_dropped_total"), 7.0);
}

#[tokio::test]
async fn beyond_the_in_flight_cap_udp_queries_get_servfail_at_once() {
    // A silent upstream keeps every forwarded query in flight for the whole deadline.
    let upstream = FakeUpstream::start(Arc::new(|_: &Message| None)).await;
    let Harness { dns, registry, .. } = harness(vec![upstream.addr], Duration::from_secs(3));
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve_udp(Arc::new(dns), server, stop.clone()));

    const SENT: usize = MAX_IN_FLIGHT + 44;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(addr).await.unwrap();
    for i in 0..SENT {
        let mut request = query(&format!("host{i}.example."), RecordType::A);
        request.set_id(i as u16);
        client.send(&request.to_vec().unwrap()).await.unwrap();
        if i % 16 == 15 {
            // Let the proxy read, so no query is lost to a full socket buffer.
            tokio::task::yield_now().await;
        }
    }
    // Garbage beyond the cap is dropped, and counted too.
    client.send(&[1, 2, 3]).await.unwrap();
    // The ones over the cap are answered SERVFAIL well before the upstream deadline.
    let started = Instant::now();
    let mut servfail = 0;
    let mut buffer = vec![0u8; 65535];
    while servfail < SENT - MAX_IN_FLIGHT {
        let len = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buffer))
            .await
            .expect("SERVFAIL for the queries over the cap")
            .unwrap();
        let reply = Message::from_vec(&buffer[..len]).unwrap();
        assert_eq!(reply.response_code(), ResponseCode::ServFail);
        assert!(usize::from(reply.id()) >= MAX_IN_FLIGHT, "{}", reply.id());
        servfail += 1;
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        dropped(&registry, "overload"),
        (SENT - MAX_IN_FLIGHT + 1) as f64
    );
    stop.cancel();
}

#[tokio::test]
async fn a_tcp_query_shorter_than_its_length_prefix_is_counted() {
    let Harness { dns, registry, .. } = harness(Vec::new(), Duration::from_secs(1));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve_tcp(Arc::new(dns), listener, stop.clone()));

    // A whole query first: answered on the same connection.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = query("reviews.", RecordType::A).to_vec().unwrap();
    stream.write_u16(request.len() as u16).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    stream.read_exact(&mut reply).await.unwrap();
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(addresses(&reply), [ip("10.96.0.5")]);
    // Then 100 bytes announced, 10 sent, and the client closes: the proxy closes too.
    stream.write_u16(100).await.unwrap();
    stream.write_all(&request[..10]).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closed the connection")
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(dropped(&registry, "truncated_tcp"), 1.0);
    // A client that closes between messages is not counted.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(dropped(&registry, "truncated_tcp"), 1.0);
    stop.cancel();
}

#[tokio::test]
async fn metrics_carry_istio_labels() {
    let upstream = FakeUpstream::start(example_answers()).await;
    let h = harness(vec![upstream.addr], Duration::from_secs(2));
    h.ask(&query("reviews.", RecordType::AAAA), Protocol::Tcp)
        .await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &h.registry).unwrap();
    assert!(
        text.contains(
            "istio_dns_requests_total{request_query_type=\"aaaa\",request_protocol=\"tcp\",\
             source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\"} 1"
        ),
        "{text}"
    );
}

/// Found by the `dns_message` fuzz target: an upstream answer whose CNAME target is compressed
/// as a pointer to offset 1 (inside the id) parses under the upstream's id, and stops parsing
/// once the proxy writes the client's id over it. The client must get the answer as accepted,
/// re-encoded, never the broken bytes.
#[test]
fn an_answer_whose_names_point_into_the_id_is_re_encoded_for_the_client() {
    let question = query("alias.example.", RecordType::A);
    let mut upstream = question.to_vec().unwrap();
    // Upstream id 0x0000 (byte 1 is a root label), flags: response, RD, RA; one answer.
    upstream[..4].copy_from_slice(&[0x00, 0x00, 0x81, 0x80]);
    upstream[6..8].copy_from_slice(&1u16.to_be_bytes());
    // alias.example. CNAME, TTL 60, rdata: a pointer to offset 1.
    upstream.extend_from_slice(&[0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 0x01]);
    let message = Message::from_vec(&upstream).unwrap();
    assert_eq!(
        message.answers().len(),
        1,
        "the upstream's answer is valid as sent"
    );

    let mut request = question.clone();
    request.set_id(0x00ff);
    let mut patched = upstream.clone();
    patched[..2].copy_from_slice(&0x00ffu16.to_be_bytes());
    assert!(
        Message::from_vec(&patched).is_err(),
        "precondition: with the client's id the same bytes no longer parse"
    );

    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let answer = forward::Answer {
            bytes: upstream.clone(),
            message: message.clone(),
        };
        let reply = reply_from_upstream(answer, &request, protocol).unwrap();
        let reply = Message::from_vec(&reply).expect("the client gets a DNS message");
        assert_eq!(reply.id(), 0x00ff);
        assert_eq!(reply.answers(), message.answers(), "{protocol:?}");
    }

    // An ordinary answer still goes out as the upstream's own bytes, with the client's id.
    let plain = a_response(&question, 60, &["192.0.2.7"]).to_vec().unwrap();
    let answer = forward::Answer {
        bytes: plain.clone(),
        message: Message::from_vec(&plain).unwrap(),
    };
    let reply = reply_from_upstream(answer, &request, Protocol::Udp).unwrap();
    assert_eq!(reply[..2], [0x00, 0xff]);
    assert_eq!(reply[2..], plain[2..]);
}
